"""Weight sync: trainer weights -> the engine's format (through ``quantrl.formats``) -> transfer ->
``engine.update_weights`` (atomic).

    convert.py      SyncTarget (the engine's format), engine_tensors (the conversion), compatibility checks
    buckets.py      size-bounded buckets, flattened to one uint8 buffer each
    in_process.py   sync_weights(trainer_model, engine, version): trainer and engine in one process
    distributed.py  send_weights / receive_weights: torch.distributed broadcast (NCCL on GPU, gloo on CPU)
    ray_engines.py  RayEngines: rollout engines as Ray actors, fed by that broadcast (--placement ray)

``check_equal=True`` (``--check-weight-update-equal``) makes the engine verify, bit for bit, that it holds
what was sent.
"""

from quantrl.sync.buckets import DEFAULT_BUCKET_BYTES, BucketMeta, flatten_bucket, iter_buckets, unflatten_bucket
from quantrl.sync.convert import (
    SyncError,
    SyncTarget,
    check_compatible,
    check_complete,
    engine_tensors,
    trainer_params,
    trainer_qmax,
)
from quantrl.sync.in_process import SyncStats, sync_weights

__all__ = [
    "DEFAULT_BUCKET_BYTES",
    "BucketMeta",
    "SyncError",
    "SyncStats",
    "SyncTarget",
    "check_compatible",
    "check_complete",
    "engine_tensors",
    "flatten_bucket",
    "iter_buckets",
    "sync_weights",
    "trainer_params",
    "trainer_qmax",
    "unflatten_bucket",
]
