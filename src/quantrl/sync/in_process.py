"""In-process weight sync: trainer and engine in one process (typically sharing one GPU).

    sync_weights(trainer_model, engine, version)  ->  SyncStats

Steps: read the engine's format (``SyncTarget.for_engine``, qmax from the trainer's QAT config), refuse
an incompatible trainer (``check_compatible``), then walk the trainer's parameters in buckets of at most
``bucket_bytes``: each bucket is moved to the engine's device (a no-op when they share it) and converted
there through ``quantrl.formats``; finally every converted tensor goes to ONE
``engine.update_weights(..., version, check_equal)`` call, which validates the whole update before
writing anything. Any failure (incompatible trainer, NaN in a weight, a tensor the engine does not
know, a shape the engine does not hold, a missing tensor) raises before the engine is touched: it keeps
serving its previous version, bit for bit.

Memory trade-off. Atomicity needs the whole new model before the first write, so one engine-format copy
is staged: ~1x the engine's weight bytes (BF16: 2 B/param, FP8: ~1 B/param, INT4: ~0.5 B/param)
for the duration of the call, except for tensors already in the engine's dtype and on its device,
which are handed over without a copy. Buckets bound only the *transient* memory on top of that (the
trainer tensors moved to the engine's device and the quantizers' temporaries, one bucket at a time).
Streaming bucket by bucket into the engine would save the staged copy but could leave the engine
half-updated on an error; we choose atomic.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from quantrl.sync.buckets import DEFAULT_BUCKET_BYTES, iter_buckets, nbytes
from quantrl.sync.convert import (
    SyncTarget,
    check_compatible,
    check_complete,
    engine_tensors,
    trainer_params,
    trainer_qmax,
)


@dataclass(frozen=True)
class SyncStats:
    version: int
    "the engine's weight version after the sync (-1 from send_weights: the trainer side does not know it)"
    tensors: int
    "engine tensors loaded (sent, for the trainer side of a distributed sync)"
    trainer_bytes: int
    "bytes of trainer parameters read"
    engine_bytes: int
    "bytes of engine-format tensors produced"
    buckets: int
    "buckets the trainer parameters were processed in (distributed: buffers sent)"
    seconds: float
    "wall time of the whole sync (CUDA-synchronized when the engine is on a GPU)"

    @property
    def gb_per_s(self) -> float:
        """Trainer bytes per second, in GB/s (1e9)."""
        return self.trainer_bytes / max(self.seconds, 1e-12) / 1e9


def _device(model: nn.Module) -> torch.device:
    dev = getattr(model, "device", None)
    return dev if isinstance(dev, torch.device) else next(model.parameters()).device


def stage_engine_tensors(
    trainer_model: nn.Module, target: SyncTarget, device: torch.device, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    strict: bool = True,
) -> tuple[list[tuple[str, torch.Tensor]], int, int]:
    """All engine tensors on ``device``, converted bucket by bucket. Returns (tensors, trainer bytes, buckets)."""
    if strict:
        check_compatible(trainer_model, target)
    modules = dict(trainer_model.named_modules())
    staged: list[tuple[str, torch.Tensor]] = []
    trainer_bytes = buckets = 0
    for bucket in iter_buckets(trainer_params(trainer_model), bucket_bytes):
        buckets += 1
        trainer_bytes += sum(nbytes(t) for _, t in bucket)
        moved = [(n, t.detach().to(device)) for n, t in bucket]  # no copy when already there
        staged += [(n, t.to(device)) for n, t in engine_tensors(moved, target, modules=modules)]
        del moved
    return staged, trainer_bytes, buckets


def sync_weights(trainer_model: nn.Module, engine, version: int, *, target: SyncTarget | None = None,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, check_equal: bool = False,
                 strict: bool = True) -> SyncStats:  # fmt: skip
    """Load the trainer's current weights into ``engine`` in its format and move it to ``version``.

    ``target`` defaults to ``SyncTarget.for_engine(engine, qmax=trainer_qmax(trainer_model))``.
    ``check_equal`` (``--check-weight-update-equal``): the engine verifies afterwards that it holds
    exactly (bitwise) the converted tensors, and raises ``RuntimeError`` otherwise.
    Raises ``ValueError`` (``SyncError`` or the engine's) with the engine untouched on a bad update.
    ``strict=False`` skips ``check_compatible``: for ablations that mismatch on purpose (QAT training
    with a BF16 engine), the engine then gets the trainer's master weights in its own format.
    """
    t0 = time.perf_counter()
    if target is None:
        target = SyncTarget.for_engine(engine, qmax=trainer_qmax(trainer_model))
    device = _device(engine.model)
    staged, trainer_bytes, buckets = stage_engine_tensors(trainer_model, target, device, bucket_bytes, strict)
    check_complete(engine.model, (n for n, _ in staged))
    engine.update_weights(staged, version, check_equal=check_equal)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    engine_bytes = sum(nbytes(t) for _, t in staged)
    return SyncStats(int(version), len(staged), trainer_bytes, engine_bytes, buckets, seconds)
