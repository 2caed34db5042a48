"""Grouped FP8 block GEMM for mixture-of-experts layers: the routed pairs' rows, e4m3 with 1x128 scales,
through their experts' 128x128-block e4m3 weights in one launch (no host sync, static shapes).

The numbers are ``block_gemm``'s for each row (a row's 1x128 activation quantization depends on that row
alone, so the expert loop's per-expert calls quantize the same codes): per 128-wide K block one fp8
``tl.dot``, promoted to fp32 and scaled by the row's and the weight block's scales. Layout: weights
stacked [E, N, K] e4m3 with scales [E, ceil(N/128), ceil(K/128)] fp32 (each expert's ``weight`` /
``weight_scale_inv`` as stored); activations quantized once, xq [M, K] and xs [M, ceil(K/128)]; pairs in
per-expert blocks of BM rows (``moe_routing.align_pairs``); a block's rows of x are gathered by token
(``row_div`` = top-k) or by pair (1), and output rows are written in pair order [T*k, N].
"""

from __future__ import annotations

import torch

from quantrl.formats._checks import cdiv
from quantrl.kernels._numerics import cast_out, native_default
from quantrl.kernels._triton import tl, triton
from quantrl.kernels.moe_routing import block_pairs

SCALE_BLOCK = 128


@triton.jit
def _moe_fp8_kernel(
    a_ptr, as_ptr, w_ptr, ws_ptr, sorted_ptr, block_expert_ptr, out_ptr,
    N, K, n_kb, stride_am, stride_sam, stride_we, stride_wse, num_pairs,
    ROW_DIV: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, NATIVE: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m)
    if e >= 0:
        pairs, valid, rows = block_pairs(sorted_ptr, pid_m, num_pairs, ROW_DIV, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        n_mask = rn < N
        w = w_ptr + e.to(tl.int64) * stride_we
        ws = ws_ptr + e.to(tl.int64) * stride_wse
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for kb in range(n_kb):
            rk = kb * BK + tl.arange(0, BK)
            k_mask = rk < K
            a = tl.load(a_ptr + rows[:, None] * stride_am + rk[None, :], mask=valid[:, None] & k_mask[None, :],
                        other=0.0)  # [BM, BK] e4m3: the block's rows, gathered  # fmt: skip
            b = tl.load(w + rn[None, :] * K + rk[:, None], mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            sa = tl.load(as_ptr + rows * stride_sam + kb, mask=valid, other=0.0)
            sb = tl.load(ws + (rn // BK) * n_kb + kb, mask=n_mask, other=0.0)
            acc += (tl.dot(a, b) * sa[:, None]) * sb[None, :]
        tl.store(out_ptr + pairs[:, None] * N + rn[None, :], cast_out(acc, out_ptr.dtype.element_ty, NATIVE),
                 mask=valid[:, None] & n_mask[None, :])  # fmt: skip


def moe_fp8_gemm(
    xq: torch.Tensor, xs: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, sorted_ids: torch.Tensor,
    block_expert: torch.Tensor, num_pairs: int, row_div: int, bm: int, out_dtype: torch.dtype = torch.bfloat16,
    bn: int = 64, native: bool | None = None,
) -> torch.Tensor:  # fmt: skip
    """out [num_pairs, N] in ``out_dtype``: row p = dequant(xq, xs)[p // row_div] @ dequant(expert of p).T,
    fp32 accumulation. ``xq`` e4m3 [M, K] with ``xs`` fp32 [M, ceil(K/128)] (``quantize_fp8_activation``),
    ``weight`` e4m3 [E, N, K] with ``weight_scale`` fp32 [E, ceil(N/128), ceil(K/128)], contiguous."""
    k, n = xq.shape[1], weight.shape[1]
    out = torch.empty(num_pairs, n, dtype=out_dtype, device=xq.device)
    if num_pairs == 0:
        return out
    n_kb = cdiv(k, SCALE_BLOCK)
    xs = xs.float()
    grid = (block_expert.numel(), triton.cdiv(n, bn))
    _moe_fp8_kernel[grid](
        xq, xs, weight, weight_scale, sorted_ids, block_expert, out, n, k, n_kb, xq.stride(0), xs.stride(0),
        weight.stride(0), weight_scale.stride(0), num_pairs, ROW_DIV=row_div, BM=bm, BN=bn, BK=SCALE_BLOCK,
        NATIVE=native_default(native), num_warps=4, num_stages=3,
    )  # fmt: skip
    return out
