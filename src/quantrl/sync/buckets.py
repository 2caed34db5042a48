"""Size-bounded buckets of (name, tensor) pairs, and their flat byte buffers.

A bucket holds consecutive pairs whose bytes sum to at most ``bucket_bytes``; a single tensor larger than
that gets a bucket of its own (tensors are never split). A bucket travels as ONE contiguous ``uint8``
buffer plus ``BucketMeta`` (names, dtypes, shapes, byte offsets): one collective per bucket instead of
one per tensor, and any dtype (fp8, bool, int64, ...) rides the same byte transport. Offsets are aligned
to ``ALIGN`` bytes so every tensor's view into the buffer is aligned for its dtype. The round trip is
bitwise: bytes are copied, never values converted.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

ALIGN = 64  # bytes; >= every dtype's alignment, and a cache line
DEFAULT_BUCKET_BYTES = 512 << 20


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass(frozen=True)
class TensorMeta:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    "byte offset in the bucket's buffer (a multiple of ALIGN)"
    nbytes: int


@dataclass(frozen=True)
class BucketMeta:
    tensors: tuple[TensorMeta, ...]
    nbytes: int
    "size of the flat buffer (payload plus alignment padding)"

    @property
    def payload_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


Named = list[tuple[str, torch.Tensor]]


def iter_buckets(named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[Named]:
    """Group consecutive pairs into buckets of at most ``bucket_bytes`` (payload bytes); lazy: a bucket is
    yielded as soon as the next tensor would overflow it, so an expensive producer runs bucket by bucket."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, t in named:
        n = nbytes(t)
        if bucket and size + n > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += n
    if bucket:
        yield bucket


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as a flat uint8 view (a copy only if ``t`` is not contiguous)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def bucket_meta(bucket: list[tuple[str, torch.Tensor]]) -> BucketMeta:
    metas, off = [], 0
    for name, t in bucket:
        n = nbytes(t)
        metas.append(TensorMeta(name, t.dtype, tuple(t.shape), off, n))
        off += -(-n // ALIGN) * ALIGN
    return BucketMeta(tuple(metas), off)


def flatten_bucket(bucket: list[tuple[str, torch.Tensor]],
                   device: torch.device | str | None = None) -> tuple[torch.Tensor, BucketMeta]:  # fmt: skip
    """One contiguous uint8 buffer (on ``device``, default the first tensor's) holding every tensor's bytes."""
    if not bucket:
        raise ValueError("flatten_bucket: empty bucket")
    meta = bucket_meta(bucket)
    dev = torch.device(device) if device is not None else bucket[0][1].device
    buf = torch.empty(meta.nbytes, dtype=torch.uint8, device=dev)
    for (name, t), m in zip(bucket, meta.tensors):
        if m.nbytes:
            buf[m.offset : m.offset + m.nbytes].copy_(_as_bytes(t))
    return buf, meta


def unflatten_bucket(buf: torch.Tensor, meta: BucketMeta) -> list[tuple[str, torch.Tensor]]:
    """Inverse of ``flatten_bucket``: (name, view into ``buf``) with the original dtypes and shapes.

    The tensors are views (no copy): keep ``buf`` alive, and do not write to it, while they are in use.
    """
    if buf.dtype != torch.uint8 or buf.ndim != 1 or buf.numel() != meta.nbytes:
        raise ValueError(f"unflatten_bucket: expected a flat uint8 buffer of {meta.nbytes} bytes, "
                         f"got {buf.dtype} {list(buf.shape)}")  # fmt: skip
    out = []
    for m in meta.tensors:
        t = buf[m.offset : m.offset + m.nbytes].view(m.dtype).view(m.shape)
        out.append((m.name, t))
    return out
