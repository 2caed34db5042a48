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

Every quantization and GEMM goes through ``quantrl.kernels``, so the numbers are ``formats``' on every
device: on CPU each GEMM is the exact product of the dequantized operands, accumulated in fp32 (the same
quantized numbers an FP8 tensor-core GEMM consumes); on CUDA the Triton quantizers (bit-exact with
``formats``) feed blockwise ``torch._scaled_mm`` (1x128 x 128x128 for fprop and dgrad, 1x128 x 1x128 for
wgrad; each recipe checked once per process against the Triton GEMM) or the Triton block-scaled GEMM
where cuBLAS lacks the recipe or the shape is not whole 128 tiles.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from quantrl import kernels
from quantrl.train.optimizer import FP32_GRAD_SINK

BLOCK = 128


def _quant_both(t: torch.Tensor, backend: str):
    """``t [M, K]`` in 1x128 groups along K and along M (codes of t^T ``[K, M]``), one pass on CUDA."""
    return kernels.quantize_fp8_activation_2d(t.contiguous(), BLOCK, backend=backend, check=False)


def _transpose_blocks(wq: torch.Tensor, ws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W^T of a 128x128-block weight, ``([K, N], [K/128, N/128])``: a block's transpose is a block, so
    dgrad multiplies by exactly the numbers fprop did (no requantization)."""
    return wq.t().contiguous(), ws.t().contiguous()


def _fprop(xq, xs, wq, ws, bias: torch.Tensor | None, dtype: torch.dtype, backend: str) -> torch.Tensor:
    """y [M, N] = x [M, K] @ W^T + bias on the quantized operands. The bias goes in where the FP8 engine's
    ``Fp8Linear`` puts it (the same call), so trainer and engine stay one function."""
    b = None if bias is None else bias.to(dtype)
    return kernels.fp8_block_gemm(xq, xs, wq, ws, b, out_dtype=dtype, backend=backend)


class _Fp8BlockLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                layer: Fp8BlockTrainLinear) -> torch.Tensor:  # fmt: skip
        be = layer.kernel_backend
        wq, ws = layer.fp8_weight()
        # per token along K (fprop); per channel along tokens, as x^T [K, M] (wgrad)
        xq, xs, xtq, xts = _quant_both(x, be)
        y = _fprop(xq, xs, wq, ws, bias, x.dtype, be)
        ctx.save_for_backward(xtq, xts, wq, ws)
        ctx.layer, ctx.w_dtype = layer, weight.dtype
        ctx.b_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor):
        xtq, xts, wq, ws = ctx.saved_tensors
        layer, be = ctx.layer, ctx.layer.kernel_backend
        wtq, wts = layer.fp8_weight_t() if layer.fp8_param_gather else _transpose_blocks(wq, ws)
        dyq, dys, dytq, dyts = _quant_both(dy, be)  # [M, N] along N (dgrad); dy^T [N, M] along M (wgrad)
        dx = kernels.fp8_block_gemm(dyq, dys, wtq, wts, out_dtype=dy.dtype, backend=be)  # [M, N] @ ([K, N] = W^T)^T
        dw = kernels.fp8_block_gemm(dytq, dyts, xtq, xts, out_dtype=torch.float32, b_scale="row",
                                    backend=be)  # [N, M] @ [K, M]^T  # fmt: skip
        db = None if ctx.b_dtype is None else dy.float().sum(0).to(ctx.b_dtype)
        sink = getattr(layer.weight, FP32_GRAD_SINK, None)
        if sink is not None:  # the optimizer's fp32 accumulator takes dW unrounded (no bf16 .grad at all)
            sink(dw)
            return dx, None, db, None
        return dx, dw.to(ctx.w_dtype), db, None


class Fp8BlockTrainLinear(nn.Linear):
    """``nn.Linear`` whose three GEMMs run in FP8 (1×128 activations/gradients, 128×128 weights)."""

    fp8_param_gather: bool = False
    kernel_backend: str = "auto"  # quantrl.kernels backend; "triton" runs the kernels in the CPU tests
    _cache: dict | None = None  # slot -> ((version, data_ptr), (q, scale)); also for a directly built one

    @classmethod
    def from_linear(cls, lin: nn.Linear, fp8_param_gather: bool = False) -> Fp8BlockTrainLinear:
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = lin.in_features, lin.out_features
        new.weight, new.bias = lin.weight, lin.bias
        new.fp8_param_gather = fp8_param_gather
        new._cache = None
        return new

    def _cached(self, slot: str, make) -> tuple[torch.Tensor, torch.Tensor]:
        """``make()`` of the current master, kept (with ``fp8_param_gather``) until the optimizer changes it."""
        key = (self.weight._version, self.weight.data_ptr())
        cache = self._cache.get(slot) if self._cache else None
        if cache is not None and cache[0] == key:
            return cache[1]
        with torch.no_grad():
            qs = make()
        # inference-mode tensors must not outlive inference mode: autograd could not save them later
        if self.fp8_param_gather and not torch.is_inference_mode_enabled():
            self._cache = {k: v for k, v in (self._cache or {}).items() if v[0] == key}
            self._cache[slot] = (key, qs)
        return qs

    def fp8_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(q fp8 [N, K], scale_inv fp32 [N/128, K/128]) of the current master: the FP8 engine's weight."""
        w = self.weight.detach()
        return self._cached("w", lambda: kernels.quantize_fp8_block(w, (BLOCK, BLOCK), backend=self.kernel_backend))

    def fp8_weight_t(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``fp8_weight()`` transposed for dgrad (cached alongside it with ``fp8_param_gather``)."""
        return self._cached("wt", lambda: _transpose_blocks(*self.fp8_weight()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])  # [M, K]
        if torch.is_grad_enabled() and (x2.requires_grad or self.weight.requires_grad):
            y = _Fp8BlockLinearFn.apply(x2, self.weight, self.bias, self)
        else:  # no backward (logprob recomputation, eval): x^T, quantized only for wgrad, is not needed
            be = self.kernel_backend
            xq, xs = kernels.quantize_fp8_activation(x2.contiguous(), BLOCK, backend=be, check=False)
            y = _fprop(xq, xs, *self.fp8_weight(), self.bias, x2.dtype, be)
        return y.view(*lead, self.out_features)

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
