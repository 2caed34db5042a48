"""FP8 GEMM on the GPU: ``torch._scaled_mm`` fed with the numbers ``formats.fp8`` defines.

Why a second activation quantizer: ``formats.quantize_fp8_activation`` checks for NaN/Inf with a host
sync, which is right for a reference but illegal inside a CUDA graph. ``quantize_act_graph_safe``
composes the same primitive (``scale_from_amax``) with the same arithmetic (fp32 division, clamp to
±448, round-to-nearest-even cast), so its output equals the reference bit for bit (tested on CPU,
ragged groups included); it only skips the NaN check. Every CUDA FP8 path uses it.

``torch._scaled_mm`` layouts (cuBLAS, SM90, CUDA >= 12.9 for blockwise), all scales *dequantization*
multipliers in fp32:
  block   a [M, K] row-major, scale_a [M, K/128] column-major (1×128);  b = w.t() [K, N] column-major,
          scale_b = weight_scale_inv.t() [K/128, N/128] (128×128)
  channel scale_a [M, 1] (per token), scale_b [1, N]
  tensor  scale_a, scale_b scalars
It is not bit-identical to the dequantize-then-fp32-matmul reference (different accumulation order, bf16
output), so each layer compares both once on its first CUDA call and keeps the fast path only if they
agree to a relative error of ``kernels.dispatch.PROBE_RTOL``; otherwise it warns and stays on the reference path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from quantrl.formats import FP8_DTYPE, FP8_MAX
from quantrl.formats.fp8 import scale_from_amax
from quantrl.kernels.dispatch import scaled_mm_block


def quantize_act_graph_safe(
    x2d: torch.Tensor, strategy: str, group: int, scale_fmt: str | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, K] -> (q [M, K] fp8, dequant scale): [M, ceil(K/group)] (group), [M, 1] (token), [1] (tensor)."""
    m, k = x2d.shape
    if strategy == "group" and k % group:
        # a ragged last group: zero padding never raises a max-abs, so the scales are formats' scales
        q, s = quantize_act_graph_safe(F.pad(x2d, (0, group - k % group)), strategy, group, scale_fmt)
        return q[:, :k].contiguous(), s
    if strategy == "group":
        tiles = x2d.reshape(m, k // group, group)  # [M, K/g, g]
    elif strategy == "token":
        tiles = x2d.reshape(m, 1, k)
    else:
        tiles = x2d.reshape(1, 1, m * k)
    s = scale_from_amax(tiles.abs().amax(-1).float(), scale_fmt)  # [rows, tiles per row]
    q = torch.div(tiles, s[..., None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).view(m, k)
    return q, (s.view(1) if strategy == "tensor" else s)


# Weight-scale strategy -> the activation strategy cuBLAS pairs with it.
_PAIRED_ACT = {"block": "group", "channel": "token", "tensor": "tensor"}


def fast_path_supported(
    strategy: str, act_strategy: str, n: int, k: int, block_size: tuple[int, int], act_group: int
) -> bool:
    """Shapes ``torch._scaled_mm`` takes: dims multiple of 16; blockwise needs exact 128 tiles."""
    if not hasattr(torch, "_scaled_mm") or n % 16 or k % 16 or _PAIRED_ACT[strategy] != act_strategy:
        return False
    if strategy == "block":
        return tuple(block_size) == (128, 128) and act_group == 128 and n % 128 == 0 and k % 128 == 0
    return True


def device_supports_fp8(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def scaled_mm(
    x2d: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    strategy: str,
    act_strategy: str,
    act_group: int,
    scale_fmt: str | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """y [M, N] = fp8 GEMM of x2d [M, K] (activation dtype) with weight [N, K] fp8, in x2d's dtype."""
    xq, xs = quantize_act_graph_safe(x2d, act_strategy, act_group, scale_fmt)
    y = scaled_mm_quantized(xq, xs, weight, weight_scale, strategy, x2d.dtype)
    return y if bias is None else y + bias


def scaled_mm_quantized(
    xq: torch.Tensor, xs: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, strategy: str,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``torch._scaled_mm`` on already-quantized operands: xq [M, K] fp8 with its dequant scales, weight
    [N, K] fp8 with ``weight_scale`` (layouts in the module note) -> [M, N] in ``out_dtype``."""
    if strategy == "block":
        return scaled_mm_block(xq, xs, weight, weight_scale, out_dtype)
    ws = weight_scale.float()
    if strategy == "channel":
        sa, sb = xs.reshape(-1, 1), ws.reshape(1, -1)  # [M, 1], [1, N]
    else:
        sa, sb = xs.reshape(()), ws.reshape(())
    return torch._scaled_mm(xq, weight.t(), scale_a=sa, scale_b=sb, out_dtype=out_dtype)
