"""Block-scaled FP8 GEMM (Triton fallback for ``torch._scaled_mm`` without blockwise scaling).

    y[m, n] = sum_kb  sa[m, kb] * sb[n // 128, kb] * sum_{k in block kb} a[m, k] * b[n, k]

a: e4m3 ``[M, K]`` with 1x128 dequant scales ``sa [M, ceil(K/128)]`` (``quantize_fp8_activation``);
b: e4m3 ``[N, K]`` with either 128x128 scales ``sb [ceil(N/128), ceil(K/128)]`` (a weight as stored, its
``weight_scale_inv``: ``b_scale="block"``) or 1x128 scales ``sb [N, ceil(K/128)]`` (a second activation,
as FP8 training's wgrad ``dy^T @ x`` has: ``b_scale="row"``); fp32 accumulate, output bf16 (or the
requested dtype), optional bias.

Layout. One program = a BM x BN output tile; its b scales are loaded per column (``n // 128``, or ``n`` for
row scales), so any BN works. The K loop steps exactly one scale block (BK = 128): each step is one fp8
``tl.dot`` (K-major operands: b is read from the row-major weight as a [BK, BN] tile whose K axis is
contiguous, which is what fp8 tensor cores want), whose fp32 result is
scaled by the two scale vectors (rows by a's, columns by b's) and added to the accumulator. Promoting every
128-long partial sum to fp32 is also what keeps the tensor cores' limited fp8 accumulation precision
from growing with K (DeepSeek-V3's recipe). Ragged M, N and a ragged last K block are masked (masked
codes load as 0). GROUP_M swizzling keeps neighbouring programs on shared weight tiles.
"""

from __future__ import annotations

import torch

from quantrl.formats._checks import cdiv
from quantrl.kernels._numerics import cast_out, native_default, widen
from quantrl.kernels._tiles import swizzled_tile
from quantrl.kernels._triton import tl, triton

SCALE_BLOCK = 128


@triton.jit
def _fp8_block_gemm_kernel(
    a_ptr, as_ptr, b_ptr, bs_ptr, bias_ptr, out_ptr, M, N, K, stride_am, stride_bn, n_kb,
    stride_sam, stride_sak, stride_sbn, stride_sbk,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, HAS_BIAS: tl.constexpr,
    B_ROWWISE: tl.constexpr, NATIVE: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = swizzled_tile(tl.program_id(0), M, N, BM, BN, GROUP_M)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    m_mask = rm < M
    n_mask = rn < N
    sb_row = rn if B_ROWWISE else rn // BK  # b's scale row: per column (1x128) or per 128 columns
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for kb in range(n_kb):
        rk = kb * BK + tl.arange(0, BK)
        k_mask = rk < K
        a = tl.load(a_ptr + rm[:, None] * stride_am + rk[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptr + rn[None, :] * stride_bn + rk[:, None], mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        sa = tl.load(as_ptr + rm * stride_sam + kb * stride_sak, mask=m_mask, other=0.0)
        sb = tl.load(bs_ptr + sb_row * stride_sbn + kb * stride_sbk, mask=n_mask, other=0.0)
        # two broadcast multiplies, not one by the [BM, BN] outer product: that tile would be a third
        # BM x BN fp32 register set beside acc and the dot (it spilled at 128 x 128 with row scales)
        acc += (tl.dot(a, b) * sa[:, None]) * sb[None, :]
    if HAS_BIAS:
        acc += widen(tl.load(bias_ptr + rn, mask=n_mask, other=0.0), NATIVE)[None, :]
    tl.store(out_ptr + rm[:, None] * N + rn[None, :], cast_out(acc, out_ptr.dtype.element_ty, NATIVE),
             mask=m_mask[:, None] & n_mask[None, :])  # fmt: skip


def pick_tiles(m: int) -> tuple[int, int, int, int]:
    """(BM, BN, num_warps, num_stages) by M (starting points for an H100; the benchmark reports them)."""
    if m <= 16:
        return 16, 64, 4, 4
    if m <= 64:
        return 64, 64, 4, 4
    if m <= 256:
        return 64, 128, 4, 4
    return 128, 128, 8, 3


def fp8_block_gemm_triton(
    xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor, bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16, tiles: tuple[int, int, int, int] | None = None,
    native: bool | None = None, b_scale: str = "block",
) -> torch.Tensor:  # fmt: skip
    """``xq [M, K]`` e4m3 with ``xs [M, ceil(K/128)]``, ``wq [N, K]`` e4m3 with ``ws [ceil(N/128),
    ceil(K/128)]`` (``b_scale="block"``) or ``[N, ceil(K/128)]`` (``"row"``) -> ``[M, N]`` in
    ``out_dtype`` (plus bias), fp32 accumulation."""
    m, k = xq.shape
    n = wq.shape[0]
    n_kb = cdiv(k, SCALE_BLOCK)
    out = torch.empty(m, n, dtype=out_dtype, device=xq.device)
    if m == 0:
        return out
    bm, bn, warps, stages = tiles or pick_tiles(m)
    # Scales go in with their strides. Row-scaled operands (wgrad) are read K-block-major ([n_kb, rows] in
    # memory), so a K step's scales are contiguous from one scalar base: row-major, each thread kept a
    # 64-bit pointer per row it holds and the 128 x 128 tile spilled on sm_90. quantize_fp8_activation_2d
    # (FP8 training's quantizer) writes them that way, so this is a copy only for other callers.
    xs, ws = xs.float(), ws.float()
    if b_scale == "row":
        xs, ws = xs.t().contiguous().t(), ws.t().contiguous().t()
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    has_bias = bias is not None
    _fp8_block_gemm_kernel[grid](xq, xs, wq, ws, bias if has_bias else out, out, m, n, k, xq.stride(0),
                                 wq.stride(0), n_kb, *xs.stride(), *ws.stride(), BM=bm, BN=bn, BK=SCALE_BLOCK,
                                 GROUP_M=8, HAS_BIAS=has_bias, B_ROWWISE=b_scale == "row",
                                 NATIVE=native_default(native), num_warps=warps,
                                 num_stages=stages)  # fmt: skip
    return out
