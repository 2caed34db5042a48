"""The straight-through estimator, shared by every fake-quant function.

Fake quantization is a step function (zero gradient almost everywhere), so QAT pretends it is the
identity in the backward pass: d fq(w) / d w = 1. It must be an ``autograd.Function`` rather than the
common ``w + (fq(w) - w).detach()`` trick, because that sum is not bit-identical to ``fq(w)`` in
floating point, and the forward must equal what the rollout engine dequantizes, to the last bit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


class StraightThrough(torch.autograd.Function):
    """``y = fn(w, *args)`` forward; the upstream gradient reaches ``w`` unchanged (cast to w's dtype)."""

    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, fn: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
        ctx.w_dtype = w.dtype
        ctx.n_extra = 1 + len(args)
        return fn(w, *args)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        return (grad.to(ctx.w_dtype), *([None] * ctx.n_extra))


def straight_through(w: torch.Tensor, fn: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
    """Apply ``fn`` with the STE when autograd is recording, plainly otherwise."""
    if torch.is_grad_enabled() and w.requires_grad:
        return StraightThrough.apply(w, fn, *args)
    return fn(w, *args)
