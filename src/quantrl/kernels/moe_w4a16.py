"""Grouped W4A16 GEMM for mixture-of-experts layers: every routed (token, expert) pair through its expert's
INT4 (or NVFP4) weight in one launch, with no host sync and static shapes (so a CUDA graph captures it).

Why. A MoE decode step with E experts and top-k routing touches k experts per token. Looping over experts
needs the per-expert counts on the host (a sync per layer, no CUDA graph); the graph-safe alternative,
every expert on every row, costs E/k times the FLOPs and reads every expert's weights each step
(Qwen3-30B-A3B: 128 experts, top 8, so 16x). Here each pair reads its own expert's weights only.

Layout. A layer's experts are stacked: qweight_t int32 [E, K/8, N], scale_t [E, K/G, N] (each expert's
W4A16 kernel layout, ``layout.w4a16_repack``); the pairs come sorted into per-expert blocks of BM rows
(``moe_routing.align_pairs``). Program (block, N tile): gathers its BM rows of x
(row = pair // ``row_div``: the token for the first GEMMs, the pair itself for the down projection),
dequantizes its expert's weight tile as the dense W4A16 mma kernel does (same helpers: exactly formats'
weights) and writes its output rows in pair order [T*k, N]. Blocks of padding or past the end return.
Numbers: per row, the dense kernel's (fp32 accumulation over K, rounded once); only the summation order
depends on the tile.
"""

from __future__ import annotations

import torch

from quantrl.kernels._numerics import cast_out, native_default
from quantrl.kernels._triton import tl, triton
from quantrl.kernels.moe_routing import block_pairs
from quantrl.kernels.w4a16 import _mma, _weight_tile


@triton.jit
def _moe_w4a16_kernel(
    x_ptr, qt_ptr, st_ptr, tab_ptr, sorted_ptr, block_expert_ptr, out_ptr,
    N, K, stride_xm, stride_qe, stride_se, stride_te, num_pairs,
    ROW_DIV: tl.constexpr, GROUP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    NATIVE: tl.constexpr, BF16X2: tl.constexpr, FP4: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m)
    if e >= 0:
        pairs, valid, rows = block_pairs(sorted_ptr, pid_m, num_pairs, ROW_DIV, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        n_mask = rn < N
        qt = qt_ptr + e.to(tl.int64) * stride_qe
        st = st_ptr + e.to(tl.int64) * stride_se
        tab = tab_ptr + e.to(tl.int64) * stride_te  # NVFP4: this expert's decode table
        dt = x_ptr.dtype.element_ty
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            rkw = k0 // 8 + tl.arange(0, BK // 8)
            a = tl.load(x_ptr + rows[:, None] * stride_xm + rk[None, :], mask=valid[:, None] & (rk < K)[None, :],
                        other=0.0)  # [BM, BK]: the block's rows, gathered  # fmt: skip
            mask2d = (rkw < K // 8)[:, None] & n_mask[None, :]
            words = tl.load(qt + rkw[:, None] * N + rn[None, :], mask=mask2d, other=0)
            w = _weight_tile(words, st, tab, rkw, k0, rn, mask2d, n_mask, N, dt, GROUP, BK, BN, NATIVE, BF16X2, FP4)
            acc = _mma(a, w, acc, NATIVE)
        tl.store(out_ptr + pairs[:, None] * N + rn[None, :], cast_out(acc, out_ptr.dtype.element_ty, NATIVE),
                 mask=valid[:, None] & n_mask[None, :])  # fmt: skip


def moe_w4a16_gemm(
    x: torch.Tensor, qweight_t: torch.Tensor, scale_t: torch.Tensor, group_size: int, sorted_ids: torch.Tensor,
    block_expert: torch.Tensor, num_pairs: int, row_div: int, bm: int, bn: int = 64, bk: int = 128,
    native: bool | None = None, unpack: str | None = None, table: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """out [num_pairs, N]: row p = x[p // row_div] @ dequant(expert of p).T in x's dtype. ``qweight_t``
    [E, K/8, N], ``scale_t`` [E, K/G, N] (contiguous per expert); ``sorted_ids`` / ``block_expert`` from
    ``moe_routing.align_pairs(..., bm)``. ``unpack``: "bf16x2" (default for bf16 activations and scales) or
    "magic". NVFP4 experts (``table``: each expert's ``layout.nvfp4_decode_table``, [E, 2, 256, 4] int32;
    ``nvfp4_repack``'s words and int32 scale words): the dense NVFP4 kernel's table decode."""
    k, n = x.shape[1], qweight_t.shape[-1]
    out = torch.empty(num_pairs, n, dtype=x.dtype, device=x.device)
    if num_pairs == 0:
        return out
    fp4 = table is not None
    bf16x2 = not fp4 and (unpack or ("bf16x2" if x.dtype == scale_t.dtype == torch.bfloat16 else "magic")) == "bf16x2"
    if bf16x2 and not x.dtype == scale_t.dtype == torch.bfloat16:
        raise ValueError(f"moe_w4a16_gemm: unpack 'bf16x2' needs bf16 activations and scales, got "
                         f"{x.dtype} / {scale_t.dtype}")  # fmt: skip
    bk = min(bk, max(16, triton.next_power_of_2(k)))  # a tile no wider than K (tiny test models)
    grid = (block_expert.numel(), triton.cdiv(n, bn))
    _moe_w4a16_kernel[grid](
        x, qweight_t, scale_t, table if fp4 else scale_t, sorted_ids, block_expert, out, n, k, x.stride(0),
        qweight_t.stride(0), scale_t.stride(0), table.stride(0) if fp4 else 0, num_pairs, ROW_DIV=row_div,
        GROUP=16 if fp4 else group_size, BM=bm, BN=bn, BK=bk, NATIVE=native_default(native), BF16X2=bf16x2,
        FP4=fp4, num_warps=4, num_stages=4, maxnreg=168 if fp4 else None,
    )  # fmt: skip
    return out
