"""``torch.distributed`` weight sync: the trainer rank broadcasts, engine ranks receive.

Every rank of ``group`` takes part: the trainer rank (``src``, a global rank) calls ``send_weights``, each
other rank ``receive_weights``. NCCL (GPU, buffers on the current CUDA device) or gloo (CPU buffers).

Protocol, in order, all from ``src``:
    for each bucket:  broadcast_object_list([("bucket", BucketMeta)])   names, dtypes, shapes, offsets
                      broadcast(uint8 buffer of BucketMeta.nbytes)       the bucket's bytes, flattened
    then:             broadcast_object_list([("end", tensor count)])    or ("error", message) if the
                                                                         trainer failed to convert
    finally:          all_reduce(ok, MIN)                                every rank says whether it succeeded

The trainer converts lazily (one bucket of engine-format tensors at a time, ``bucket_bytes`` bounds the
flat buffer). An engine rank stages every received buffer and calls ``engine.update_weights`` ONCE, so its
update is atomic (validated as a whole; a bad one leaves it on its previous version): it holds one
engine-format copy of the model in flight, as the in-process sync does. The final ``all_reduce`` lets the
trainer learn whether the engines accepted the update (``send_weights`` raises if one did not). With
several engine ranks each one's update is atomic on its own: a rank that rejects keeps its previous
version while the others move on, and every rank raises.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch import nn

from quantrl.sync.buckets import DEFAULT_BUCKET_BYTES, flatten_bucket, iter_buckets, nbytes, unflatten_bucket
from quantrl.sync.convert import SyncError, SyncTarget, check_compatible, check_complete, engine_tensors, trainer_params
from quantrl.sync.in_process import SyncStats, _device
from quantrl.train.data_parallel import comm_device


class EngineRejected(RuntimeError):
    """The trainer sent a complete update, and an engine rank refused to load it (its own error says why)."""


def _broadcast_object(obj, src: int, group, device: torch.device):
    box = [obj if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src, group=group, device=device)
    return box[0]


def _all_ok(ok: bool, group, device: torch.device) -> bool:
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item())


def send_weights(trainer_model: nn.Module, target: SyncTarget, group=None, src: int = 0,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, strict: bool = True) -> SyncStats:  # fmt: skip
    """Trainer side: convert to ``target`` (the engines' format) bucket by bucket and broadcast.

    Returns after every engine rank has loaded the update; raises ``SyncError`` if the conversion failed
    (the engines are told and load nothing) and ``EngineRejected`` if an engine rank rejected the update.
    ``strict=False`` skips ``check_compatible`` (as ``sync_weights`` does, for deliberate ablations).
    """
    if dist.get_rank() != src:
        raise ValueError(f"send_weights must run on the source rank {src}, this is rank {dist.get_rank()}")
    t0 = time.perf_counter()
    dev = comm_device(group)
    read = {"bytes": 0}

    def counted():
        for n, t in trainer_params(trainer_model):
            read["bytes"] += nbytes(t)
            yield n, t

    error: BaseException | None = None
    sent = buckets = engine_bytes = 0
    try:
        if strict:
            check_compatible(trainer_model, target)
        pending = iter_buckets(engine_tensors(counted(), target, modules=dict(trainer_model.named_modules())),
                               bucket_bytes)  # fmt: skip
    except Exception as e:  # noqa: BLE001 -- any failure here must still reach the engines, or they wait forever
        error, pending = e, iter(())
    while error is None:
        try:  # conversion errors, of any type, are reported to the engines (communication errors are fatal)
            bucket = next(pending, None)
            if bucket is None:
                break
            buf, meta = flatten_bucket(bucket, dev)
        except Exception as e:  # noqa: BLE001
            error = e
            break
        _broadcast_object(("bucket", meta), src, group, dev)
        dist.broadcast(buf, src=src, group=group)
        sent += len(meta.tensors)
        engine_bytes += meta.payload_bytes
        buckets += 1
        del buf, bucket
    _broadcast_object(("error", f"{type(error).__name__}: {error}") if error else ("end", sent), src, group, dev)
    ok = _all_ok(error is None, group, dev)
    if error is not None:
        raise error
    if not ok:
        raise EngineRejected("weight sync: an engine rank rejected the update (its own error says why); "
                           "a rank that rejected it keeps its previous version (and, rejected at validation, "
                           "its weights; failed while loading, it refuses to sample until a sync succeeds)")  # fmt: skip
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return SyncStats(-1, sent, read["bytes"], engine_bytes, buckets, time.perf_counter() - t0)


def receive_weights(engine, group=None, src: int = 0, *, version: int, check_equal: bool = False) -> SyncStats:
    """Engine side: receive every bucket from ``src``, then ONE ``engine.update_weights(..., version,
    check_equal)`` (atomic). Raises (and loads nothing) if the trainer reported an error, the update is
    incomplete or invalid; ``RuntimeError`` if another rank failed."""
    if dist.get_rank() == src:
        raise ValueError(f"receive_weights runs on engine ranks, not on the source rank {src}")
    t0 = time.perf_counter()
    dev = comm_device(group)
    received: list[tuple[str, torch.Tensor]] = []
    buckets = 0
    error: BaseException | None = None
    while True:
        kind, payload = _broadcast_object(None, src, group, dev)
        if kind == "bucket":
            buf = torch.empty(payload.nbytes, dtype=torch.uint8, device=dev)
            dist.broadcast(buf, src=src, group=group)
            received += unflatten_bucket(buf, payload)  # views: buf stays alive through them
            buckets += 1
        elif kind == "end":
            if payload != len(received):
                error = RuntimeError(f"weight sync: trainer sent {payload} tensors, {len(received)} arrived")
            break
        elif kind == "error":
            error = SyncError(f"weight sync: the trainer (rank {src}) failed, nothing was loaded: {payload}")
            break
        else:
            raise RuntimeError(f"weight sync protocol: unexpected message {kind!r} from rank {src}")
    if error is None:
        try:
            check_complete(engine.model, (n for n, _ in received))
            engine.update_weights(received, version, check_equal=check_equal)
        except Exception as e:  # noqa: BLE001 -- the trainer waits in the all_reduce below: always reach it
            error = e
    ok = _all_ok(error is None, group, dev)
    if error is not None:
        raise error
    if not ok:
        raise RuntimeError(f"weight sync: this rank loaded version {version}, but another rank failed")
    engine_dev = _device(engine.model)
    if engine_dev.type == "cuda":
        torch.cuda.synchronize(engine_dev)
    engine_bytes = sum(nbytes(t) for _, t in received)
    return SyncStats(int(version), len(received), 0, engine_bytes, buckets, time.perf_counter() - t0)
