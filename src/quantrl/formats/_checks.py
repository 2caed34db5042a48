"""Input validation shared by every format: fail early, in words, before torch fails deep inside."""

from __future__ import annotations

import torch


def check_float_tensor(x: torch.Tensor, *, what: str, ndim: int | None = None, min_ndim: int = 1) -> None:
    """Raise ``ValueError``/``TypeError`` for inputs no quantizer can handle (type, rank, emptiness).

    NaN/Inf are caught later for free: every quantizer computes a max-abs, which is NaN or Inf exactly
    when its block holds one (``check_amax``).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point() or x.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise TypeError(f"{what}: expected a floating-point tensor (bf16/fp16/fp32), got {x.dtype}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{what}: expected a {ndim}-D tensor, got shape {tuple(x.shape)}")
    if x.ndim < min_ndim:
        raise ValueError(f"{what}: expected at least {min_ndim} dimension(s), got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{what}: tensor is empty (shape {tuple(x.shape)})")


def check_amax(amax: torch.Tensor, x: torch.Tensor, what: str) -> None:
    """Raise if a block max-abs is NaN/Inf (NaN propagates through max): the input held one.

    A NaN scale would otherwise be masked to 1 (or poison a whole block); callers prepend the tensor name.
    """
    if bool(torch.isfinite(amax).all()):
        return
    nan = int(torch.isnan(x).sum())
    inf = int(torch.isinf(x).sum())
    raise ValueError(f"{what}: input contains non-finite values ({nan} NaN, {inf} Inf of {x.numel()} elements)")


def check_block_size(block_size: tuple[int, int] | list[int]) -> tuple[int, int]:
    if len(block_size) != 2 or any(int(b) <= 0 for b in block_size):
        raise ValueError(f"block_size must be two positive ints, got {block_size!r}")
    return int(block_size[0]), int(block_size[1])


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# Elements per chunk for the CPU reference paths: ~1 MB of fp32 temporaries stays in a core's L2,
# where whole-tensor passes stream every temporary through DRAM (measured several times slower).
# On a GPU the opposite holds: every chunk is a handful of kernel launches, so tensors go whole.
CHUNK_ELEMS = 1 << 18


def chunk_elems(like: torch.Tensor) -> int:
    return CHUNK_ELEMS if like.device.type == "cpu" else 1 << 62


def row_chunks(n_rows: int, row_elems: int, like: torch.Tensor) -> list[slice]:
    """Slices over the leading dim, each about ``chunk_elems(like)`` elements (one slice off-CPU)."""
    step = max(1, chunk_elems(like) // max(1, row_elems))
    return [slice(i, min(i + step, n_rows)) for i in range(0, n_rows, step)]
