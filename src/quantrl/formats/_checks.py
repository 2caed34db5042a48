"""Input validation shared by every format: fail early, in words, before torch fails deep inside."""

from __future__ import annotations

import torch


def check_float_tensor(x: torch.Tensor, *, what: str, ndim: int | None = None, min_ndim: int = 1) -> None:
    """Raise ``ValueError``/``TypeError`` for inputs no quantizer can handle.

    Finite-ness is checked here (one extra read of the input) because a NaN scale silently poisons
    a whole block of the checkpoint; callers prepend the tensor name to the message.
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
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        nan = int(torch.isnan(x).sum())
        raise ValueError(
            f"{what}: input contains non-finite values ({nan} NaN, {bad - nan} Inf of {x.numel()} elements)"
        )


def check_block_size(block_size: tuple[int, int] | list[int]) -> tuple[int, int]:
    if len(block_size) != 2 or any(int(b) <= 0 for b in block_size):
        raise ValueError(f"block_size must be two positive ints, got {block_size!r}")
    return int(block_size[0]), int(block_size[1])


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
