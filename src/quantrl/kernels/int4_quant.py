"""One-pass INT4 group quantization kernels: quantize + pack (weight sync) and fake quant (QAT forward).

Numbers: exactly ``formats.int4`` (module note there). Per group of G input channels of a row:

    amax     = max |w| in fp32 (exact; integer max over bit patterns, so NaN/Inf cannot be skipped)
    s_stored = bf16(clamp(amax / div, 2^-126, bf16_max / 8))      div = 7 (qmax 7) or 7.5 (qmax 8)
    q        = clamp(round_half_even(fp32(w) / fp32(s_stored)), qlo, qhi)    (IEEE division)
    packed   = 8 codes (q + 8) per int32, code i of a word in bits 4i..4i+3, words along K
    fake     = dtype(fp32(q) * fp32(s_stored))                    (the product is exact; one rounding)

Dividing by the *stored* bf16 scale (not the fp32 quotient) is what makes fake quant, real quant and
the engine's dequantization the same numbers.

Layout. A program owns ROWS rows x one group: it loads the tile once, takes the group amax over it and
writes the scales and either the packed words or the fake-quantized values. The pack kernel loads the
tile as [ROWS, G/8, 8] so that the 8 codes of each output word sit on the last axis and one reduction
builds the word (consecutive codes in a thread: a 16-byte load of 8 bf16). Program 0 of the grid walks
the groups of a row band first, so neighbouring programs touch neighbouring memory (the small scale
stores merge in L2). A group holding NaN/Inf gets a non-finite scale; the wrapper checks the scales with
one reduction and raises naming the tensor.
"""

from __future__ import annotations

import torch

from quantrl.formats._checks import check_amax
from quantrl.formats.int4 import int_range
from quantrl.kernels._numerics import (
    abs_bits,
    bits_to_f32,
    cast_out,
    div_by_recip,
    div_rn,
    native_default,
    recip_rn,
    rne_int,
    to_bf16,
    widen,
)
from quantrl.kernels._triton import tl, triton

_BF16 = torch.finfo(torch.bfloat16)
SCALE_MIN = float(_BF16.tiny)  # 2^-126
SCALE_MAX_INT4 = float(_BF16.max) / 8  # exact: a power-of-two division


@triton.jit
def _group_scale(amax_bits, DIV: tl.constexpr, SMIN: tl.constexpr, SMAX: tl.constexpr, NATIVE: tl.constexpr):
    """int32 amax bits -> stored bf16 scale (non-finite where the group held NaN/Inf)."""
    amax = bits_to_f32(amax_bits)
    s = tl.minimum(tl.maximum(div_rn(amax, DIV), SMIN), SMAX)
    return to_bf16(tl.where(amax_bits >= 0x7F800000, amax, s), NATIVE)


@triton.jit
def _codes(xf, sk, bk, r, QLO: tl.constexpr, QHI: tl.constexpr):
    """Integer codes ``clamp(rne(x / s))`` from ``recip_rn(s)`` (broadcastable to xf)."""
    return tl.minimum(tl.maximum(rne_int(div_by_recip(xf, sk, bk, r)), QLO), QHI)


@triton.jit
def _int4_quant_pack_kernel(
    w_ptr, packed_ptr, s_ptr, N, K, stride_wn,
    ROWS: tl.constexpr, GROUP: tl.constexpr, DIV: tl.constexpr, QLO: tl.constexpr, QHI: tl.constexpr,
    SMIN: tl.constexpr, SMAX: tl.constexpr, NATIVE: tl.constexpr,
):  # fmt: skip
    pid_g = tl.program_id(0)
    rn = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
    kw = tl.arange(0, GROUP // 8)
    j = tl.arange(0, 8)
    k = pid_g * GROUP + kw[:, None] * 8 + j[None, :]  # [G/8, 8]
    n_mask = rn < N
    w = tl.load(w_ptr + rn[:, None, None] * stride_wn + k[None, :, :], mask=n_mask[:, None, None], other=0.0)
    xf = widen(w, NATIVE)  # [ROWS, G/8, 8]
    s = _group_scale(tl.max(tl.max(abs_bits(xf), axis=2), axis=1), DIV, SMIN, SMAX, NATIVE)  # [ROWS] bf16
    sk, bk, r = recip_rn(widen(s, NATIVE))  # [ROWS]
    q = _codes(xf, sk[:, None, None], bk[:, None, None], r[:, None, None], QLO, QHI).to(tl.int32)
    # the 8 shifted nibbles occupy disjoint bits, so their wrapping int32 sum is their OR (and ``tl.sum``
    # is a native reduction, also in the interpreter, where a custom combine function runs per element)
    word = tl.sum((q + 8) << (4 * j)[None, None, :], axis=2)  # [ROWS, G/8]
    kw_total = K // 8
    tl.store(packed_ptr + rn[:, None] * kw_total + pid_g * (GROUP // 8) + kw[None, :], word,
             mask=n_mask[:, None])  # fmt: skip
    tl.store(s_ptr + rn * (K // GROUP) + pid_g, s, mask=n_mask)


@triton.jit
def _int4_fake_quant_kernel(
    w_ptr, out_ptr, s_ptr, N, K, stride_wn,
    ROWS: tl.constexpr, GROUP: tl.constexpr, DIV: tl.constexpr, QLO: tl.constexpr, QHI: tl.constexpr,
    SMIN: tl.constexpr, SMAX: tl.constexpr, NATIVE: tl.constexpr,
):  # fmt: skip
    pid_g = tl.program_id(0)
    rn = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
    k = pid_g * GROUP + tl.arange(0, GROUP)
    n_mask = rn < N
    w = tl.load(w_ptr + rn[:, None] * stride_wn + k[None, :], mask=n_mask[:, None], other=0.0)
    xf = widen(w, NATIVE)  # [ROWS, G]
    s = _group_scale(tl.max(abs_bits(xf), axis=1), DIV, SMIN, SMAX, NATIVE)  # [ROWS] bf16
    sf = widen(s, NATIVE)
    sk, bk, r = recip_rn(sf)  # [ROWS]
    # exact in fp32; + 0.0 makes a -0.0 code +0.0, as the engine's integer 0 dequantizes (IEEE: no compiler
    # drops it without no-signed-zeros), and contracts with the product into one FFMA
    deq = _codes(xf, sk[:, None], bk[:, None], r[:, None], QLO, QHI) * sf[:, None] + 0.0
    tl.store(out_ptr + rn[:, None] * K + k[None, :], cast_out(deq, out_ptr.dtype.element_ty, NATIVE),
             mask=n_mask[:, None])  # fmt: skip
    tl.store(s_ptr + rn * (K // GROUP) + pid_g, s, mask=n_mask)


def supported(group_size: int) -> bool:
    """Power-of-two groups of 8..1024 (32, 64 and 128 in practice)."""
    return 8 <= group_size <= 1024 and group_size & (group_size - 1) == 0


def _launch(kernel, w: torch.Tensor, out: torch.Tensor, s: torch.Tensor, group_size: int, qmax: int,
            native: bool | None) -> None:  # fmt: skip
    n, k = w.shape
    qlo, qhi, div = int_range(4, qmax)
    rows = max(1, min(triton.next_power_of_2(n), 4096 // group_size))
    grid = (k // group_size, triton.cdiv(n, rows))
    kernel[grid](w, out, s, n, k, w.stride(0), ROWS=rows, GROUP=group_size, DIV=float(div), QLO=float(qlo),
                 QHI=float(qhi), SMIN=SCALE_MIN, SMAX=SCALE_MAX_INT4, NATIVE=native_default(native),
                 num_warps=4)  # fmt: skip


def quantize_pack_int4_triton(
    w: torch.Tensor, group_size: int = 128, qmax: int = 7, check: bool = True, native: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [N, K]`` -> ``(weight_packed int32 [N, K/8], weight_scale bf16 [N, K/G])``, bit-exact with
    ``pack_int4(quantize_int4(w, group_size, qmax)[0])`` and its scale."""
    if w.stride(-1) != 1:
        w = w.contiguous()
    n, k = w.shape
    packed = torch.empty(n, k // 8, dtype=torch.int32, device=w.device)
    s = torch.empty(n, k // group_size, dtype=torch.bfloat16, device=w.device)
    _launch(_int4_quant_pack_kernel, w, packed, s, group_size, qmax, native)
    if check:
        check_amax(s, w, "quantize_int4")
    return packed, s


def fake_quantize_int4_triton(
    w: torch.Tensor, group_size: int = 128, qmax: int = 7, dtype: torch.dtype | None = None, check: bool = True,
    native: bool | None = None,
) -> torch.Tensor:  # fmt: skip
    """Fused INT4 quantize-dequantize forward, bit-exact with ``formats.fake_quantize_int4`` (no STE here)."""
    if w.stride(-1) != 1:
        w = w.contiguous()
    n, k = w.shape
    out = torch.empty(n, k, dtype=dtype or w.dtype, device=w.device)
    s = torch.empty(n, k // group_size, dtype=torch.bfloat16, device=w.device)
    _launch(_int4_fake_quant_kernel, w, out, s, group_size, qmax, native)
    if check:
        check_amax(s, w, "fake_quantize_int4")
    return out
