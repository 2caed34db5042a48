"""One-pass FP8 (e4m3) quantization kernels: 1xG per-token activations and 128x128 weight blocks.

Numbers: exactly ``formats.fp8`` (module note there): amax in fp32 (exact), ``s = amax / 448`` (IEEE
division; ``ue8m0`` rounds s up to a power of two, capped at 2^119), ``s = 1`` where that gives 0,
``q = e4m3(clamp(x / s, -448, 448))`` with round-to-nearest-even. Edge tiles use only their real
elements: masked loads read 0, which never raises a max-abs.

Layout. Each program loads its whole tile once, reduces the max-abs in registers and writes the codes and
the scale: 2 bytes read and 1 byte written per element (bf16 in), the minimum.
  activations  x [M, K] -> q [M, K], s [M, ceil(K/G)] fp32; tile = ROWS rows x GPP groups x G
               (3-D so that each group's amax is one reduction over the last axis)
  weights      w [N, K] -> q [N, K], s [ceil(N/BN), ceil(K/BK)] fp32; tile = one BN x BK block
  both axes    x [M, K] -> the activation quantization of x (1xG along K) *and* of x^T (1xG along M,
               stored transposed [K, M]), from one read of x; tile = one G x G square, whose row and
               column max-abs are those two quantizations' scales. FP8 training needs both for every
               activation and gradient (fprop/dgrad reduce over K, wgrad over M): one pass moves 2 + 2
               bytes per element instead of 2 + 1 + (2 + 2) + (2 + 1) with a separate transpose copy.
Codes are stored through a uint8 view of the fp8 output (see ``_numerics`` for why).

NaN/Inf: the max-abs is taken over integer bit patterns, so a tile holding NaN/Inf gets a non-finite
scale; the Python wrapper checks all scales with one reduction and raises naming the tensor
(``check=False`` skips that host sync, e.g. inside CUDA-graph capture).
"""

from __future__ import annotations

import torch

from quantrl.formats._checks import cdiv, check_amax
from quantrl.kernels._numerics import abs_bits, div_by_recip, fp8_scale, native_default, recip_rn, to_e4m3_bits, widen
from quantrl.kernels._triton import tl, triton


@triton.jit
def _fp8_act_quant_kernel(
    x_ptr, q_ptr, s_ptr, M, K, stride_xm, n_groups,
    ROWS: tl.constexpr, GPP: tl.constexpr, GROUP: tl.constexpr, UE8M0: tl.constexpr, NATIVE: tl.constexpr,
):  # fmt: skip
    rm = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    g = tl.program_id(1) * GPP + tl.arange(0, GPP)
    c = tl.arange(0, GROUP)
    k = g[None, :, None] * GROUP + c[None, None, :]  # [1, GPP, GROUP]
    mask = (rm < M)[:, None, None] & (k < K)
    x = tl.load(x_ptr + rm[:, None, None] * stride_xm + k, mask=mask, other=0.0)
    xf = widen(x, NATIVE)
    s = fp8_scale(tl.max(abs_bits(xf), axis=2), UE8M0)  # [ROWS, GPP]
    sk, bk, r = recip_rn(s)
    y = tl.minimum(tl.maximum(div_by_recip(xf, sk[:, :, None], bk[:, :, None], r[:, :, None]), -448.0), 448.0)
    tl.store(q_ptr + rm[:, None, None] * K + k, to_e4m3_bits(y, NATIVE), mask=mask)
    tl.store(s_ptr + rm[:, None] * n_groups + g[None, :], s, mask=(rm < M)[:, None] & (g < n_groups)[None, :])


@triton.jit
def _fp8_block_quant_kernel(
    x_ptr, q_ptr, s_ptr, N, K, stride_xn, n_kb,
    BN: tl.constexpr, BK: tl.constexpr, UE8M0: tl.constexpr, NATIVE: tl.constexpr,
):  # fmt: skip
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = pid_k * BK + tl.arange(0, BK)
    mask = (rn < N)[:, None] & (rk < K)[None, :]
    x = tl.load(x_ptr + rn[:, None] * stride_xn + rk[None, :], mask=mask, other=0.0)
    xf = widen(x, NATIVE)
    s = fp8_scale(tl.max(tl.max(abs_bits(xf), axis=1), axis=0), UE8M0)  # scalar
    sk, bk, r = recip_rn(s)
    y = tl.minimum(tl.maximum(div_by_recip(xf, sk, bk, r), -448.0), 448.0)
    tl.store(q_ptr + rn[:, None] * K + rk[None, :], to_e4m3_bits(y, NATIVE), mask=mask)
    tl.store(s_ptr + pid_n * n_kb + pid_k, s)


@triton.jit
def _fp8_act_quant_2d_kernel(
    x_ptr, q_ptr, s_ptr, qt_ptr, st_ptr, M, K, stride_xm,
    GROUP: tl.constexpr, UE8M0: tl.constexpr, NATIVE: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = pid_m * GROUP + tl.arange(0, GROUP)
    rk = pid_k * GROUP + tl.arange(0, GROUP)
    m_ok = rm < M
    k_ok = rk < K
    mask = m_ok[:, None] & k_ok[None, :]
    xf = widen(tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=mask, other=0.0), NATIVE)  # [G, G]
    a = abs_bits(xf)
    s_row = fp8_scale(tl.max(a, axis=1), UE8M0)  # [G]: token m's group pid_k along K
    s_col = fp8_scale(tl.max(a, axis=0), UE8M0)  # [G]: channel k's group pid_m along M
    sk, bk, r = recip_rn(s_row)
    q = to_e4m3_bits(tl.minimum(tl.maximum(div_by_recip(xf, sk[:, None], bk[:, None], r[:, None]), -448.0), 448.0),
                     NATIVE)  # fmt: skip
    tl.store(q_ptr + rm[:, None] * K + rk[None, :], q, mask=mask)
    tl.store(s_ptr + pid_k * M + rm, s_row, mask=m_ok)  # scales column-major (see the launcher)
    sk, bk, r = recip_rn(s_col)
    qt = to_e4m3_bits(tl.minimum(tl.maximum(div_by_recip(xf, sk[None, :], bk[None, :], r[None, :]), -448.0), 448.0),
                      NATIVE)  # fmt: skip
    # [K, M] output: transpose in registers so the store runs along M, its contiguous axis
    tl.store(qt_ptr + rk[:, None] * M + rm[None, :], tl.trans(qt), mask=k_ok[:, None] & m_ok[None, :])
    tl.store(st_ptr + pid_m * K + rk, s_col, mask=k_ok)


def _pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def act_quant_supported(group_size: int) -> bool:
    return _pow2(group_size) and 16 <= group_size <= 1024


def act_quant_2d_supported(group_size: int) -> bool:
    return _pow2(group_size) and 16 <= group_size <= 128  # a G x G fp32 tile in registers


def block_quant_supported(block_size: tuple[int, int]) -> bool:
    bn, bk = block_size
    return _pow2(bn) and _pow2(bk) and bn * bk <= 1 << 15 and bk >= 16


def _check_scales(s: torch.Tensor, x: torch.Tensor, what: str) -> None:
    check_amax(s, x, what)  # raises (with NaN/Inf counts) iff a scale is non-finite


def quantize_fp8_activation_triton(
    x: torch.Tensor, group_size: int = 128, scale_fmt: str | None = None, check: bool = True,
    native: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``x [..., K]`` -> ``(q [..., K] e4m3, s [..., ceil(K/G)] fp32)``, bit-exact with
    ``formats.quantize_fp8_activation``."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    n_groups = cdiv(k, group_size)
    q = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(m, n_groups, dtype=torch.float32, device=x.device)
    gpp = max(1, min(triton.next_power_of_2(n_groups), 2048 // group_size))
    rows = max(1, min(triton.next_power_of_2(m), 4096 // (gpp * group_size)))
    grid = (triton.cdiv(m, rows), triton.cdiv(n_groups, gpp))
    if m:
        _fp8_act_quant_kernel[grid](x2, q.view(torch.uint8), s, m, k, x2.stride(0), n_groups, ROWS=rows, GPP=gpp,
                                    GROUP=group_size, UE8M0=scale_fmt == "ue8m0", NATIVE=native_default(native),
                                    num_warps=4)  # fmt: skip
    if check:
        _check_scales(s, x, "quantize_fp8_activation")
    return q.view(x.shape), s.view(*x.shape[:-1], n_groups)


def quantize_fp8_block_triton(
    w: torch.Tensor, block_size: tuple[int, int] = (128, 128), scale_fmt: str | None = None, check: bool = True,
    native: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``w [N, K]`` -> ``(q [N, K] e4m3, s [ceil(N/bn), ceil(K/bk)] fp32)``, bit-exact with
    ``formats.quantize_fp8(w, "block", block_size)``."""
    n, k = w.shape
    if w.stride(-1) != 1:
        w = w.contiguous()
    bn, bk = block_size
    nb, kb = cdiv(n, bn), cdiv(k, bk)
    q = torch.empty(n, k, dtype=torch.float8_e4m3fn, device=w.device)
    s = torch.empty(nb, kb, dtype=torch.float32, device=w.device)
    warps = 8 if bn * bk >= 8192 else 4
    _fp8_block_quant_kernel[(kb, nb)](w, q.view(torch.uint8), s, n, k, w.stride(0), kb, BN=bn, BK=bk,
                                      UE8M0=scale_fmt == "ue8m0", NATIVE=native_default(native),
                                      num_warps=warps)  # fmt: skip
    if check:
        _check_scales(s, w, "quantize_fp8")
    return q, s


def quantize_fp8_activation_2d_triton(
    x: torch.Tensor, group_size: int = 128, scale_fmt: str | None = None, check: bool = True,
    native: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """``x [M, K]`` -> ``(q [M, K], s [M, ceil(K/G)], qt [K, M], st [K, ceil(M/G)])``: bit-exact with
    ``formats.quantize_fp8_activation`` of ``x`` and of ``x.t()``, in one pass over x."""
    m, k = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    n_kg, n_mg = cdiv(k, group_size), cdiv(m, group_size)
    q = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    # Scales column-major ([groups, rows] in memory, returned as [rows, groups] views): the layout the
    # block GEMMs read row scales in (cuBLAS's scale_a, and the Triton GEMM without a pointer per row).
    s = torch.empty(n_kg, m, dtype=torch.float32, device=x.device).t()
    qt = torch.empty(k, m, dtype=torch.float8_e4m3fn, device=x.device)
    st = torch.empty(n_mg, k, dtype=torch.float32, device=x.device).t()
    if m and k:
        _fp8_act_quant_2d_kernel[(n_mg, n_kg)](x, q.view(torch.uint8), s, qt.view(torch.uint8), st, m, k,
                                               x.stride(0), GROUP=group_size,
                                               UE8M0=scale_fmt == "ue8m0", NATIVE=native_default(native),
                                               num_warps=8 if group_size >= 128 else 4)  # fmt: skip
    if check:
        _check_scales(s, x, "quantize_fp8_activation_2d")
    return q, s, qt, st
