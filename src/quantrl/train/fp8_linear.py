"""FP8 blockwise training linear (TransformerEngine's Float8BlockScaling / DeepSeek-V3 recipe).

All three GEMMs of a Linear run on e4m3 operands with fp32 scales:

    fprop  y  = x  @ W^T    x: 1×128 groups along K (per token)     W: 128×128 blocks
    dgrad  dx = dy @ W      dy: 1×128 groups along N (per token)    W^T: the same 128×128 blocks, transposed
    wgrad  dW = dy^T @ x    dy^T, x^T: 1×128 groups along M (per channel, over 128 tokens)

128×128 weight blocks are what make one quantized weight serve both fprop and dgrad (a block's transpose
is a block); activations and gradients are quantized along whichever dim the GEMM reduces. Weights stay
BF16/FP32 masters; with ``fp8_param_gather`` the quantized weight is cached once per optimizer step
(keyed on the master's version counter) and reused by every micro-batch and by the FP8 weight sync,
which stays correct with any optimizer, CPU-offloaded Adam included, because the cache is derived state.

On CPU (and whenever the fused path is unavailable) each GEMM is emulated: the quantized operands are
dequantized with ``formats`` and multiplied in fp32 - the same quantized numbers an FP8 tensor-core GEMM
consumes, accumulated in fp32. On CUDA ``torch._scaled_mm`` with blockwise scales is tried once per
process and kept only if it agrees with the emulation.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn as nn

from quantrl.formats.fp8 import (
    dequantize_fp8,
    dequantize_fp8_activation,
    quantize_fp8,
    quantize_fp8_activation,
)
from quantrl.model import fp8_gemm

BLOCK = 128


def _deq_rows(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return dequantize_fp8_activation(q, s, BLOCK, torch.float32)


def _deq_blocks(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return dequantize_fp8(q, s, (BLOCK, BLOCK), torch.float32)


def _emulated_gemm(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """a [M, R] fp32, b [N, R] fp32 (already dequantized) -> a @ b^T in ``out_dtype``, fp32 accumulate."""
    return (a @ b.t()).to(out_dtype)


_SCALED_MM_OK: bool | None = None


def _scaled_mm_fprop(xq, xs, wq, ws, out_dtype) -> torch.Tensor | None:
    """x [M, K] (1×128) @ W^T with W [N, K] (128×128) through ``torch._scaled_mm``; None if unsupported.

    The call itself is the rollout engine's (``model.fp8_gemm``); the first use per process is checked
    against the emulation and kept only if they agree.
    """
    global _SCALED_MM_OK
    if _SCALED_MM_OK is False or not xq.is_cuda:
        return None
    n, k = wq.shape
    if not (fp8_gemm.fast_path_supported("block", "group", n, k, (BLOCK, BLOCK), BLOCK)
            and fp8_gemm.device_supports_fp8(xq.device)):  # fmt: skip
        return None
    try:
        y = fp8_gemm.scaled_mm_quantized(xq, xs, wq, ws, "block", out_dtype)
    except (RuntimeError, TypeError, ValueError, NotImplementedError) as e:
        _SCALED_MM_OK = False
        warnings.warn(f"torch._scaled_mm blockwise FP8 unavailable ({e}); using the emulated FP8 GEMM", stacklevel=2)
        return None
    if _SCALED_MM_OK is None:
        ref = _emulated_gemm(_deq_rows(xq, xs), _deq_blocks(wq, ws), torch.float32)
        err = float((y.float() - ref).norm() / ref.norm().clamp_min(1e-30))
        _SCALED_MM_OK = err <= fp8_gemm.PROBE_RTOL
        if not _SCALED_MM_OK:
            warnings.warn(f"torch._scaled_mm blockwise FP8 disagrees with the emulation (rel err {err:.2e}); not using it",
                          stacklevel=2)  # fmt: skip
            return None
    return y


class _Fp8BlockLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
        out_dtype = x.dtype
        xq, xs = quantize_fp8_activation(x, BLOCK)  # per token, along K
        y = _scaled_mm_fprop(xq, xs, wq, ws, out_dtype)
        if y is None:
            y = _emulated_gemm(_deq_rows(xq, xs), _deq_blocks(wq, ws), out_dtype)
        xtq, xts = quantize_fp8_activation(x.t(), BLOCK)  # [K, M]: per channel, along tokens (for wgrad)
        ctx.save_for_backward(xtq, xts, wq, ws)
        ctx.w_dtype = weight.dtype
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor):
        xtq, xts, wq, ws = ctx.saved_tensors
        dy = dy.contiguous()
        dyq, dys = quantize_fp8_activation(dy, BLOCK)  # [M, N] along N
        dx = _emulated_gemm(_deq_rows(dyq, dys), _deq_blocks(wq, ws).t(), dy.dtype)  # [M, N] @ [N, K]
        dytq, dyts = quantize_fp8_activation(dy.t(), BLOCK)  # [N, M] along M
        dw = _emulated_gemm(_deq_rows(dytq, dyts), _deq_rows(xtq, xts), torch.float32)  # [N, M] @ [M, K]
        return dx, dw.to(ctx.w_dtype), None, None


class Fp8BlockTrainLinear(nn.Linear):
    """``nn.Linear`` whose three GEMMs run in FP8 (1×128 activations/gradients, 128×128 weights)."""

    fp8_param_gather: bool = False

    @classmethod
    def from_linear(cls, lin: nn.Linear, fp8_param_gather: bool = False) -> Fp8BlockTrainLinear:
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = lin.in_features, lin.out_features
        new.weight, new.bias = lin.weight, lin.bias
        new.fp8_param_gather = fp8_param_gather
        new._cache = None
        return new

    def fp8_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(q fp8 [N, K], scale_inv fp32 [N/128, K/128]) of the current master: the FP8 engine's weight."""
        key = (self.weight._version, self.weight.data_ptr())
        cache = getattr(self, "_cache", None)
        if cache is not None and cache[0] == key:
            return cache[1]
        with torch.no_grad():
            qs = quantize_fp8(self.weight.detach(), "block", (BLOCK, BLOCK))
        if self.fp8_param_gather:
            self._cache = (key, qs)
        return qs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])  # [M, K]
        wq, ws = self.fp8_weight()
        y = _Fp8BlockLinearFn.apply(x2, self.weight, wq, ws).view(*lead, self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fp8 blockwise, param_gather={self.fp8_param_gather}"


def prepare_fp8_training(model: nn.Module, fp8_param_gather: bool = False) -> list[str]:
    """Swap every quantizable ``nn.Linear`` (not embeddings, lm_head, norms, routers) in place."""
    from quantrl.checkpoint.layout import is_quantizable
    from quantrl.train.swap import swap_linears

    swapped = swap_linears(model, lambda name, m: Fp8BlockTrainLinear.from_linear(m, fp8_param_gather)
                           if is_quantizable(f"{name}.weight", tuple(m.weight.shape)) else None)  # fmt: skip
    if not swapped:
        raise ValueError("prepare_fp8_training: no Linear layer to convert")
    return swapped
