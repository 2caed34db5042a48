"""W4A16 GEMM: bf16/fp16 activations ``[M, K]`` x INT4 group-quantized weights -> ``[M, N]`` (Triton).

Weights arrive in the kernel layout of ``layout.py``: ``qweight_t`` int32 ``[K/8, N]`` (word ``[w, n]`` =
codes k = 8w..8w+7 of column n, nibble i = code + 8) and ``scale_t`` ``[K/G, N]`` (bf16). The dequantized
weight is exactly the ``formats`` one, ``w[k, n] = dtype(fp32(q) * fp32(s))`` rounded once to the
activation dtype, so the engine multiplies by the same weights QAT trained with; only the fp32
accumulation order differs from the reference ``F.linear(x, dequantize_int(...))``.

Unpacking ("magic", also the fp16 path). A ``[BK/8, BN]`` word tile becomes ``[BK/8, 8, BN]`` nibbles by
shift-and-mask with the 8 shifts broadcast on the middle axis; ``(u | 0x4B000000)`` reinterpreted as fp32
is exactly ``2^23 + u``, so one subtraction gives ``q = u - 8`` as fp32 without an int-to-float
conversion. Merging the two leading axes (``tl.reshape``) gives the K-major ``[BK, BN]`` tile (row k =
8 * word row + nibble).

A second unpacking (``W4A16Config.unpack="bf16x2"``, the default for bf16 activations) dequantizes two
weights per instruction with inline PTX, because the magic-number path is ALU-bound on Hopper (~8 fp32
ops per weight; see NOTES.md). Per int32 word and shift s in 0..3: ``lop3`` with mask 0x000F000F and bias
0x43004300 gives the bf16 pair (128 + nibble s, 128 + nibble s+4); one ``fma.rn.bf16x2`` by 1.0 and -136.0
gives the codes q = nibble - 8 exactly; one ``fma.rn.bf16x2`` by the scale pair and -0.0 rounds q * s to
bf16 once, which is ``formats``' weight (q * s is exact in fp32, so its nearest bf16 is the same number).
The gemv widens the pair to two fp32 (shift / mask) for its fp32 FMAs with x: ~4 ops per weight; the mma
path keeps the bf16 halves and joins the 8 nibble tensors back into the K-major tile (``_k_major_tile``),
2 ops per weight before the tensor cores. Off the GPU (``NATIVE=False``) the same integer steps run as
Triton ops, so the interpreter tests the tiling, the order of the nibbles and the constants; the PTX is
compiled by ptxas on CPU (``bench/compile_sm90.py``) and only its results need the device.

Two paths, chosen by M (``pick_config``):
  gemv  M tiny (decode): no tensor cores. Program = (BN columns, one K slice, one row); it keeps a
        ``[BK/8, BN]`` fp32 accumulator of ``x * w`` summed over the 8 nibbles of each word and reduces it
        once at the end. Grid (N/BN, S, M): the M programs sharing a weight tile are adjacent in launch
        order, so the weight is read from DRAM about once.
  mma   M >= 2: dequantize the tile into registers (activation dtype) and ``tl.dot`` (fp32 accumulate);
        BM = 16..128 by M, GROUP_M swizzle so neighbouring programs share weight tiles in L2.
NVFP4A16 (``nvfp4_gemm``; ``FP4=True``) runs the same two kernels on ``layout.nvfp4_repack``'s layout: the
same int32 word order, e2m1 decoded through an fp16 pair (``_fp4_pair``) and scaled by the layer's table of
the 256 e4m3 quotients (``_fp4_scales``); the weight is formats' ``dtype(fp32(q * s_eff))`` bit for bit.
Both split K over S programs when the ``[M, N]`` tile grid alone cannot fill the GPU. Split-K writes fp32
partials ``[S, M, N]`` and a second small kernel sums them in a fixed order, adds the bias and rounds once
(deterministic, unlike atomics: reruns give identical rollouts). K must be a multiple of G and of 8; any
N, and K not a multiple of BK, are handled by masks (masked words/scales load as 0, so a padded
weight is exactly 0).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch

from quantrl.kernels._numerics import cast_out, native_default, round_bf16, widen
from quantrl.kernels._tiles import swizzled_tile
from quantrl.kernels._triton import tl, triton

# Rows at or below this use the gemv path (M = 1 is the decode case; the benchmark reports both paths at
# small M so this crossover can be tuned on the device).
GEMV_MAX_M = 1


@triton.jit
def _nibbles(words):
    """int32 words [R, C] -> fp32 codes [R, 8, C] in [-8, 7]; [r, j, c] = nibble j of words[r, c] minus 8."""
    j = tl.arange(0, 8)
    u = (words[:, None, :] >> (4 * j)[None, :, None]) & 0xF
    return (u | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0


@triton.jit
def _load_scale_tile(st_ptr, rkw, k0, rn, mask2d, n_mask, N, GROUP: tl.constexpr, BK: tl.constexpr):
    """Scales (storage dtype) for a [BK/8, BN] word tile: [1, BN] or [BK/8, BN], broadcastable to it."""
    if GROUP % BK == 0:  # the whole tile is inside one group: one contiguous row of BN scales
        s = tl.load(st_ptr + (k0 // GROUP) * N + rn, mask=n_mask, other=0.0)[None, :]
    else:  # several groups per tile: one scale row per word row (repeated addresses hit L1)
        s = tl.load(st_ptr + (rkw // (GROUP // 8))[:, None] * N + rn[None, :], mask=mask2d, other=0.0)
    return s


@triton.jit
def _load_scales(st_ptr, rkw, k0, rn, mask2d, n_mask, N, GROUP: tl.constexpr, BK: tl.constexpr, NATIVE: tl.constexpr):
    """Scales for a [BK/8, BN] word tile as fp32, broadcastable to [BK/8, 8, BN]."""
    return widen(_load_scale_tile(st_ptr, rkw, k0, rn, mask2d, n_mask, N, GROUP, BK), NATIVE)[:, None, :]


@triton.jit
def _bf16_pair(s):
    """bf16 scales -> int32 words holding the scale's bits twice (the bf16x2 multiplier)."""
    b = s.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return b | (b << 16)


def _dequant8_ptx(out: str) -> str:
    """PTX for one int32 word ($8) and its scale as a bf16 pair ($9) -> the 8 weights $0..$7 (nibbles 0..7),
    as fp32 (``out="f32"``, for the gemv's fp32 FMAs) or bf16 (``"bf16"``, a tensor-core operand). Shift s
    in 0..3 gives the pair (nibble s, nibble s + 4): the low and high halves of one bf16x2 word."""
    body = ""
    for i in range(4):
        body += "mov.b32 t, $8;\n" if i == 0 else f"shr.u32 t, $8, {4 * i};\n"
        body += "lop3.b32 v, t, 0x000F000F, 0x43004300, 0xEA;\n"  # (t & mask) | bias: bf16x2 (128 + nibble)
        body += "fma.rn.bf16x2 q, v, one, m136;\nfma.rn.bf16x2 p, q, $9, nz;\n"  # q = nibble - 8; p = bf16(q*s)
        if out == "f32":
            body += f"shl.b32 ${i}, p, 16;\nand.b32 ${i + 4}, p, 0xFFFF0000;\n"
        else:
            body += f"mov.b32 {{${i}, ${i + 4}}}, p;\n"
    consts = "mov.b32 one, 0x3F803F80;\nmov.b32 m136, 0xC308C308;\nmov.b32 nz, 0x80008000;\n"
    return "{\n.reg .b32 one, m136, nz, t, v, q, p;\n" + consts + body + "}"


_DEQUANT8_F32 = tl.constexpr(_dequant8_ptx("f32"))
_DEQUANT8_BF16 = tl.constexpr(_dequant8_ptx("bf16"))


@triton.jit
def _pair_half(v, HIGH: tl.constexpr):
    """One bf16 of a bf16x2 word, as the fp32 with the same value."""
    if HIGH:
        y = (v & -65536).to(tl.float32, bitcast=True)  # -65536 == 0xFFFF0000
    else:
        y = (v << 16).to(tl.float32, bitcast=True)
    return y


@triton.jit
def _emulated_pair(words, s_pair, SHIFT: tl.constexpr, HIGH: tl.constexpr):
    """The PTX of ``_dequant8_ptx`` for one output, in integer Triton ops (interpreter / NATIVE=False)."""
    v = ((words >> SHIFT) & 0x000F000F) | 0x43004300
    q = _pair_half(v, HIGH) - 136.0  # exact: 128 + nibble - 136
    return round_bf16(q * _pair_half(s_pair, False), False)


@triton.jit
def _dequant8_bf16x2(words, s_pair, NATIVE: tl.constexpr, BF16_OUT: tl.constexpr = False):
    """int32 words [R, C] + bf16 scale pairs (broadcastable) -> 8 tensors [R, C], the weights of nibbles
    0..7: fp32 (or bf16 with ``BF16_OUT``) on the GPU; fp32 holding the same values under NATIVE=False."""
    if NATIVE:
        if BF16_OUT:
            w0, w1, w2, w3, w4, w5, w6, w7 = tl.inline_asm_elementwise(
                _DEQUANT8_BF16, "=h,=h,=h,=h,=h,=h,=h,=h,r,r", [words, s_pair], dtype=(tl.bfloat16,) * 8,
                is_pure=True, pack=1)  # fmt: skip
        else:
            w0, w1, w2, w3, w4, w5, w6, w7 = tl.inline_asm_elementwise(
                _DEQUANT8_F32, "=r,=r,=r,=r,=r,=r,=r,=r,r,r", [words, s_pair], dtype=(tl.float32,) * 8,
                is_pure=True, pack=1)  # fmt: skip
    else:
        w0 = _emulated_pair(words, s_pair, 0, False)
        w1 = _emulated_pair(words, s_pair, 4, False)
        w2 = _emulated_pair(words, s_pair, 8, False)
        w3 = _emulated_pair(words, s_pair, 12, False)
        w4 = _emulated_pair(words, s_pair, 0, True)
        w5 = _emulated_pair(words, s_pair, 4, True)
        w6 = _emulated_pair(words, s_pair, 8, True)
        w7 = _emulated_pair(words, s_pair, 12, True)
    return w0, w1, w2, w3, w4, w5, w6, w7


@triton.jit
def _k_major_tile(words, s_pair, NATIVE: tl.constexpr):
    """int32 words [BKW, BN] -> the dequantized K-major tile [8 * BKW, BN] (row 8w + j = nibble j of word
    row w), bf16 on the GPU. Nested joins put the 8 nibbles on a trailing [2, 2, 2] axis whose flat index is
    j: the innermost join pairs (j, j + 4), the halves of one bf16x2 word, so it costs no data movement."""
    w0, w1, w2, w3, w4, w5, w6, w7 = _dequant8_bf16x2(words, s_pair, NATIVE, True)
    return _join8(w0, w1, w2, w3, w4, w5, w6, w7)


@triton.jit
def _join8(w0, w1, w2, w3, w4, w5, w6, w7):
    """8 tensors [BKW, BN] (the weights of nibbles 0..7) -> the K-major tile [8 * BKW, BN]."""
    # F[..., a, b, c] = w_{4a + 2b + c}: the last join picks c, the middle b, the first a
    f = tl.join(tl.join(tl.join(w0, w4), tl.join(w2, w6)), tl.join(tl.join(w1, w5), tl.join(w3, w7)))
    t = tl.permute(tl.reshape(f, (w0.shape[0], w0.shape[1], 8)), (0, 2, 1))  # [BKW, 8, BN]
    return tl.reshape(t, (w0.shape[0] * 8, w0.shape[1]))


# int32 $2 (codes in bits 0..3 and 16..19) -> fp32 $0, $1: each code's q * 2^-14 (see _fp4_pair). In PTX
# so that no 16-bit tensor exists at the Triton level (Triton 3.6 gives those another layout and converts
# through shared memory, with barriers, in the hot loop); cvt.f32.f16 without .ftz keeps fp16 subnormals.
_FP4_PAIR_PTX = tl.constexpr(
    "{\n.reg .b32 a, b;\n.reg .b16 l, h;\n"
    "and.b32 a, $2, 0x00070007;\nshl.b32 a, a, 9;\nand.b32 b, $2, 0x00080008;\nshl.b32 b, b, 12;\n"
    "or.b32 a, a, b;\nmov.b32 {l, h}, a;\ncvt.f32.f16 $0, l;\ncvt.f32.f16 $1, h;\n}"
)


@triton.jit
def _fp4_half(h):
    """16-bit halves of int32 (low bits) -> fp32: the fp16 holding an e2m1 code's q * 2^-14."""
    return h.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _fp4_pair(words, s14, SHIFT: tl.constexpr, DT: tl.constexpr, NATIVE: tl.constexpr):
    """Nibbles SHIFT/4 and SHIFT/4 + 4 of int32 words [R, C] -> their weights, DT(fp32(q * s_eff)).

    The e2m1 bits (s, e1, e0, m) go to fp16 bits 15 and 11..9, so the fp16 is q * 2^-14 exactly and
    e2m1's subnormal (0.5) is fp16's; ``s14`` (the layer's scale table) is s_eff * 2^14. One mask-shift-or
    builds both halves of a word at once.
    """
    t = words >> SHIFT
    if NATIVE:
        lo, hi = tl.inline_asm_elementwise(_FP4_PAIR_PTX, "=r,=r,r", [t], dtype=(tl.float32, tl.float32),
                                           is_pure=True, pack=1)  # fmt: skip
    else:  # the same steps in Triton ops (the interpreter)
        h = ((t & 0x00070007) << 9) | ((t & 0x00080008) << 12)
        lo = _fp4_half(h)
        hi = _fp4_half(h >> 16)
    return _round_to(lo * s14, DT, NATIVE), _round_to(hi * s14, DT, NATIVE)  # fp32 rounding, as formats


@triton.jit
def _dequant8_fp4(words, s14, DT: tl.constexpr, NATIVE: tl.constexpr):
    """int32 words [R, C] + fp32 scales (broadcastable) -> 8 tensors [R, C], the NVFP4 weights of nibbles
    0..7 rounded to DT (held in DT on the GPU, as fp32 under NATIVE=False)."""
    w0, w4 = _fp4_pair(words, s14, 0, DT, NATIVE)
    w1, w5 = _fp4_pair(words, s14, 4, DT, NATIVE)
    w2, w6 = _fp4_pair(words, s14, 8, DT, NATIVE)
    w3, w7 = _fp4_pair(words, s14, 12, DT, NATIVE)
    return w0, w1, w2, w3, w4, w5, w6, w7


# One fp32 load from the scale table. A Triton gather (tl.load of data-dependent addresses) is a layout
# anchor of its own: Triton 3.6 gives it a layout unlike the weight words' and converts every dequantized
# weight through shared memory (18 barriers per loop iteration in the gemv); as inline PTX the load is an
# elementwise op and keeps the words' layout. ``.nc``: the table is read-only while a kernel runs.
_LUT_LOAD_PTX = tl.constexpr("ld.global.nc.f32 $0, [$1];")


@triton.jit
def _fp4_scales(st_ptr, lut_ptr, rkw, rn, mask2d, N, NATIVE: tl.constexpr):
    """Scales of a [BKW, BN] word tile -> fp32 s_eff * 2^14, [BKW, BN]. Word row w is in group w // 2, whose
    e4m3 byte is byte (w // 2) % 4 of scale word row w // 8 (``layout.nvfp4_repack``); repeated addresses
    hit L1. The byte goes through the layer's 256-entry table (masked words are 0: lut[0] = 0, a zero
    weight)."""
    sw = tl.load(st_ptr + (rkw // 8)[:, None] * N + rn[None, :], mask=mask2d, other=0)
    b = (sw >> (8 * ((rkw // 2) % 4))[:, None]) & 0xFF
    if NATIVE:
        s14 = tl.inline_asm_elementwise(_LUT_LOAD_PTX, "=r,l", [lut_ptr + b], dtype=tl.float32, is_pure=True, pack=1)
    else:
        s14 = tl.load(lut_ptr + b)
    return s14


@triton.jit
def _round_to(x, DTYPE: tl.constexpr, NATIVE: tl.constexpr):
    """fp32 -> nearest DTYPE value, in DTYPE (NATIVE) or as fp32 (interpreter path)."""
    if NATIVE:
        y = x.to(DTYPE)
    else:
        if DTYPE == tl.bfloat16:
            y = round_bf16(x, NATIVE)
        else:
            y = x.to(DTYPE).to(tl.float32)
    return y


@triton.jit
def _x_at(xk, J: tl.constexpr, mask, NATIVE: tl.constexpr):
    """x[8w + J] for the word rows w of a tile, as fp32 [BKW, 1]."""
    return widen(tl.load(xk + J, mask=mask, other=0.0), NATIVE)[:, None]


@triton.jit
def _rows_times8(xk, mask, w0, w1, w2, w3, w4, w5, w6, w7, NATIVE: tl.constexpr):
    """sum_j x[8w + j] * w_j: [BKW, BN] fp32 partial products of a word tile (weights in any float dtype)."""
    acc = _x_at(xk, 0, mask, NATIVE) * w0.to(tl.float32) + _x_at(xk, 1, mask, NATIVE) * w1.to(tl.float32)
    acc += _x_at(xk, 2, mask, NATIVE) * w2.to(tl.float32) + _x_at(xk, 3, mask, NATIVE) * w3.to(tl.float32)
    acc += _x_at(xk, 4, mask, NATIVE) * w4.to(tl.float32) + _x_at(xk, 5, mask, NATIVE) * w5.to(tl.float32)
    acc += _x_at(xk, 6, mask, NATIVE) * w6.to(tl.float32) + _x_at(xk, 7, mask, NATIVE) * w7.to(tl.float32)
    return acc


@triton.jit
def _w4a16_gemv_kernel(
    x_ptr, qt_ptr, st_ptr, lut_ptr, bias_ptr, out_ptr, part_ptr,
    M, N, K, stride_xm, kw_per_split,
    GROUP: tl.constexpr, BN: tl.constexpr, BKW: tl.constexpr,
    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, NATIVE: tl.constexpr, BF16X2: tl.constexpr, FP4: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    m = tl.program_id(2)
    KW = K // 8
    rn = pid_n * BN + tl.arange(0, BN)
    n_mask = rn < N
    j = tl.arange(0, 8)
    kw_lo = pid_s * kw_per_split
    kw_hi = tl.minimum(kw_lo + kw_per_split, KW)
    acc = tl.zeros((BKW, BN), dtype=tl.float32)
    x_row = x_ptr + m * stride_xm
    for kw0 in range(kw_lo, kw_hi, BKW):
        rkw = kw0 + tl.arange(0, BKW)
        kw_mask = rkw < kw_hi
        mask2d = kw_mask[:, None] & n_mask[None, :]
        words = tl.load(qt_ptr + rkw[:, None] * N + rn[None, :], mask=mask2d, other=0)
        if FP4:
            s14 = _fp4_scales(st_ptr, lut_ptr, rkw, rn, mask2d, N, NATIVE)
            w0, w1, w2, w3, w4, w5, w6, w7 = _dequant8_fp4(words, s14, x_ptr.dtype.element_ty, NATIVE)
            acc += _rows_times8(x_row + rkw * 8, kw_mask, w0, w1, w2, w3, w4, w5, w6, w7, NATIVE)
        elif BF16X2:
            sp = _bf16_pair(_load_scale_tile(st_ptr, rkw, kw0 * 8, rn, mask2d, n_mask, N, GROUP, BKW * 8))
            w0, w1, w2, w3, w4, w5, w6, w7 = _dequant8_bf16x2(words, sp, NATIVE)  # each [BKW, BN]
            # x as int32 pairs of bf16 (4 loads per word row, not 8), widened exactly like the weights
            xw = x_row.to(tl.pointer_type(tl.int32), bitcast=True) + rkw * 4
            x01 = tl.load(xw, mask=kw_mask, other=0)[:, None]
            x23 = tl.load(xw + 1, mask=kw_mask, other=0)[:, None]
            x45 = tl.load(xw + 2, mask=kw_mask, other=0)[:, None]
            x67 = tl.load(xw + 3, mask=kw_mask, other=0)[:, None]
            acc += (_pair_half(x01, False) * w0 + _pair_half(x01, True) * w1 + _pair_half(x23, False) * w2
                    + _pair_half(x23, True) * w3 + _pair_half(x45, False) * w4 + _pair_half(x45, True) * w5
                    + _pair_half(x67, False) * w6 + _pair_half(x67, True) * w7)  # fmt: skip
        else:
            sf = _load_scales(st_ptr, rkw, kw0 * 8, rn, mask2d, n_mask, N, GROUP, BKW * 8, NATIVE)
            xv = tl.load(x_row + rkw[:, None] * 8 + j[None, :], mask=kw_mask[:, None], other=0.0)
            xf = widen(xv, NATIVE)  # [BKW, 8]
            w = _round_to(_nibbles(words) * sf, x_ptr.dtype.element_ty, NATIVE).to(tl.float32)
            acc += tl.sum(xf[:, :, None] * w, axis=1)
    y = tl.sum(acc, axis=0)  # [BN]
    if SPLIT:
        tl.store(part_ptr + (pid_s * M + m) * N + rn, y, mask=n_mask)
    else:
        if HAS_BIAS:
            y += widen(tl.load(bias_ptr + rn, mask=n_mask, other=0.0), NATIVE)
        tl.store(out_ptr + m * N + rn, cast_out(y, out_ptr.dtype.element_ty, NATIVE), mask=n_mask)


@triton.jit
def _w4a16_mma_kernel(
    x_ptr, qt_ptr, st_ptr, lut_ptr, bias_ptr, out_ptr, part_ptr,
    M, N, K, stride_xm, k_per_split,
    GROUP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, NATIVE: tl.constexpr, BF16X2: tl.constexpr, FP4: tl.constexpr,
):  # fmt: skip
    pid_s = tl.program_id(1)
    pid_m, pid_n = swizzled_tile(tl.program_id(0), M, N, BM, BN, GROUP_M)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    m_mask = rm < M
    n_mask = rn < N
    k_lo = pid_s * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    dt = x_ptr.dtype.element_ty
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BK):
        rk = k0 + tl.arange(0, BK)
        rkw = k0 // 8 + tl.arange(0, BK // 8)
        a = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=m_mask[:, None] & (rk < k_hi)[None, :],
                    other=0.0)  # fmt: skip
        mask2d = (rkw < k_hi // 8)[:, None] & n_mask[None, :]
        words = tl.load(qt_ptr + rkw[:, None] * N + rn[None, :], mask=mask2d, other=0)
        if FP4:
            s14 = _fp4_scales(st_ptr, lut_ptr, rkw, rn, mask2d, N, NATIVE)
            w0, w1, w2, w3, w4, w5, w6, w7 = _dequant8_fp4(words, s14, dt, NATIVE)
            w = _join8(w0, w1, w2, w3, w4, w5, w6, w7)
        elif BF16X2:
            w = _k_major_tile(words, _bf16_pair(_load_scale_tile(st_ptr, rkw, k0, rn, mask2d, n_mask, N, GROUP, BK)),
                              NATIVE)  # fmt: skip
        else:
            sf = _load_scales(st_ptr, rkw, k0, rn, mask2d, n_mask, N, GROUP, BK, NATIVE)
            w = tl.reshape(_round_to(_nibbles(words) * sf, dt, NATIVE), (BK, BN))
        if NATIVE:
            acc = tl.dot(a, w, acc)
        else:  # interpreter: fp32 operands holding the same bf16/fp16 values (its bf16 dot is broken)
            acc = tl.dot(widen(a, NATIVE), w, acc, input_precision="ieee")
    out_off = rm[:, None] * N + rn[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT:
        tl.store(part_ptr + pid_s * M * N + out_off, acc, mask=mask)
    else:
        if HAS_BIAS:
            acc += widen(tl.load(bias_ptr + rn, mask=n_mask, other=0.0), NATIVE)[None, :]
        tl.store(out_ptr + out_off, cast_out(acc, out_ptr.dtype.element_ty, NATIVE), mask=mask)


@triton.jit
def _splitk_reduce_kernel(part_ptr, bias_ptr, out_ptr, MN, N, S, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
                          NATIVE: tl.constexpr):  # fmt: skip
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(S):  # fixed order: deterministic
        acc += tl.load(part_ptr + s * MN + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += widen(tl.load(bias_ptr + offs % N, mask=mask, other=0.0), NATIVE)
    tl.store(out_ptr + offs, cast_out(acc, out_ptr.dtype.element_ty, NATIVE), mask=mask)


@dataclass(frozen=True)
class W4A16Config:
    """One launch configuration. ``split_k=None``: chosen from the SM count (``pick_config``)."""

    path: str  # "gemv" | "mma"
    bn: int
    bk: int  # K elements per loop step (gemv: 8 * words per step)
    bm: int = 16  # mma only
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 8
    split_k: int | None = None
    unpack: str = "magic"  # "magic" (fp32 magic number) | "bf16x2" (inline PTX; bf16 activations only)


# Starting points for an H100 (132 SMs, ~3 TB/s); the benchmark sweeps a few alternatives. Every default
# unpacks with the bf16x2 PTX (``DEFAULT_UNPACK``; bf16 activations, fp16 falls back to "magic"): compiled
# offline for sm_90 with Triton 3.6 (bench/compile_sm90.py), the hot loop has about half the instructions of
# the magic-number path (gemv 347 vs 795 per 8192 weights, and no shared-memory round trips or barriers
# against 81 and 13; mma tiles 35-45% fewer). Dequantization is what bounds W4A16 on Hopper (NOTES.md), so
# fewer instructions per weight is the speed; kernels_gpu.py times both unpackings at every M to confirm it
# on the device, and falls back to "magic" for its timings if bf16x2 fails its checks there.
DEFAULT_UNPACK = "bf16x2"
GEMV_CONFIG = W4A16Config("gemv", bn=64, bk=128, num_warps=4, num_stages=2)
MMA_CONFIGS = (  # (max M, config): more, smaller tiles while M is small, so the grid fills 132 SMs
    (16, W4A16Config("mma", bm=16, bn=64, bk=128, num_warps=4, num_stages=4)),
    (32, W4A16Config("mma", bm=32, bn=64, bk=128, num_warps=4, num_stages=4)),
    (64, W4A16Config("mma", bm=64, bn=64, bk=64, num_warps=4, num_stages=4)),
    (256, W4A16Config("mma", bm=64, bn=128, bk=64, num_warps=4, num_stages=4)),
    (1 << 62, W4A16Config("mma", bm=128, bn=128, bk=64, num_warps=8, num_stages=3)),
)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter: small grids
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def auto_split(cfg: W4A16Config, m: int, n: int, k: int, n_sm: int) -> int:
    """Split-K so that about two (gemv: four) waves of programs cover the SMs.

    Split-K costs ``S * M * N * 8`` bytes of fp32 partials (written, then read back by the reduction); it
    is capped at a quarter of the weight's ``N * K / 2`` bytes, so at larger M it never costs more than it
    saves.
    """
    if cfg.path == "gemv":
        tiles, target = -(-n // cfg.bn) * m, 4 * n_sm
    else:
        tiles, target = -(-m // cfg.bm) * -(-n // cfg.bn), 2 * n_sm
    k_steps = -(-k // cfg.bk)
    return max(1, min(k_steps, target // max(tiles, 1), k // (64 * m)))


def pick_config(m: int, n: int, k: int, n_sm: int) -> W4A16Config:
    """Path and tiles by M (``GEMV_MAX_M``, ``MMA_CONFIGS``), ``DEFAULT_UNPACK``, then ``auto_split``."""
    cfg = GEMV_CONFIG if m <= GEMV_MAX_M else next(c for limit, c in MMA_CONFIGS if m <= limit)
    return replace(cfg, split_k=auto_split(cfg, m, n, k, n_sm), unpack=DEFAULT_UNPACK)


def _split_ranges(k: int, bk: int, split: int) -> tuple[int, int]:
    """(K elements per split, a multiple of bk; number of non-empty splits)."""
    steps = -(-k // bk)
    per = -(-steps // max(1, min(split, steps)))
    return per * bk, -(-steps // per)


def w4a16_gemm(
    x2d: torch.Tensor,
    qweight_t: torch.Tensor,
    scale_t: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    config: W4A16Config | None = None,
    native: bool | None = None,
) -> torch.Tensor:
    """``x2d [M, K] @ dequant(qweight_t, scale_t) + bias`` -> ``[M, N]`` in x2d's dtype (Triton launch).

    Inputs are validated by the dispatcher (``quantrl.kernels.w4a16_linear``); this expects x2d with a
    unit inner stride, contiguous kernel-layout weights and ``K % group_size == 0``.
    """
    m, k = x2d.shape
    cfg = config or pick_config(m, qweight_t.shape[1], k, sm_count(x2d.device))
    if config is None and cfg.unpack == "bf16x2" and not (x2d.dtype == scale_t.dtype == torch.bfloat16):
        cfg = replace(cfg, unpack="magic")  # bf16x2 rounds weights to bf16; fp16 activations need fp16(q * s)
    if cfg.unpack not in ("magic", "bf16x2"):
        raise ValueError(f"w4a16_gemm: unpack {cfg.unpack!r} (expected 'magic' or 'bf16x2')")
    if cfg.unpack == "bf16x2" and not (x2d.dtype == scale_t.dtype == torch.bfloat16):
        raise ValueError(f"w4a16_gemm: unpack 'bf16x2' needs bf16 activations and scales, got "
                         f"{x2d.dtype} / {scale_t.dtype}")  # fmt: skip
    if cfg.path == "gemv" and cfg.unpack == "bf16x2" and (x2d.data_ptr() % 4 or x2d.stride(0) % 2):
        x2d = x2d.clone(memory_format=torch.contiguous_format)  # it reads x as int32 pairs: 4-byte aligned
    return _launch(x2d, qweight_t, scale_t, None, group_size, bias, cfg, native, "w4a16_gemm")


def nvfp4_gemm(
    x2d: torch.Tensor,
    qweight_t: torch.Tensor,
    scale_t: torch.Tensor,
    lut: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: W4A16Config | None = None,
    native: bool | None = None,
) -> torch.Tensor:
    """NVFP4A16: ``x2d [M, K] @ dequant(...) + bias`` with the weight in ``layout.nvfp4_repack``'s layout and
    the layer's scale table ``layout.nvfp4_scale_lut`` (fp32 [256]); the W4A16 kernels' tiling, split-K and
    paths, with the e2m1 decode in place of the INT4 one (``config.unpack`` is not used). Validated by the
    dispatcher (``quantrl.kernels.nvfp4_linear``)."""
    m, k = x2d.shape
    cfg = config or pick_config(m, qweight_t.shape[1], k, sm_count(x2d.device))
    return _launch(x2d, qweight_t, scale_t, lut, 16, bias, cfg, native, "nvfp4_gemm")


def _launch(x2d, qweight_t, scale_t, lut, group_size, bias, cfg: W4A16Config, native, what: str) -> torch.Tensor:
    """Both formats' launches (``lut`` given: NVFP4): split-K ranges, the path's grid, the reduction."""
    m, k = x2d.shape
    n = qweight_t.shape[1]
    out = torch.empty(m, n, dtype=x2d.dtype, device=x2d.device)
    if m == 0:
        return out
    if cfg.split_k is None:
        cfg = replace(cfg, split_k=auto_split(cfg, m, n, k, sm_count(x2d.device)))
    per, split = _split_ranges(k, cfg.bk, cfg.split_k)
    part = torch.empty(split, m, n, dtype=torch.float32, device=x2d.device) if split > 1 else out
    has_bias = bias is not None
    b = bias if has_bias else out
    nat = native_default(native)
    fp4 = lut is not None
    common = {"GROUP": group_size, "HAS_BIAS": has_bias, "SPLIT": split > 1, "NATIVE": nat, "FP4": fp4,
              "BF16X2": not fp4 and cfg.unpack == "bf16x2", "num_warps": cfg.num_warps,
              "num_stages": cfg.num_stages}  # fmt: skip
    lut = lut if fp4 else scale_t  # an unused pointer argument when not FP4
    if cfg.path == "gemv":
        grid = (triton.cdiv(n, cfg.bn), split, m)
        _w4a16_gemv_kernel[grid](x2d, qweight_t, scale_t, lut, b, out, part, m, n, k, x2d.stride(0), per // 8,
                                 BN=cfg.bn, BKW=cfg.bk // 8, **common)  # fmt: skip
    elif cfg.path == "mma":
        grid = (triton.cdiv(m, cfg.bm) * triton.cdiv(n, cfg.bn), split)
        _w4a16_mma_kernel[grid](x2d, qweight_t, scale_t, lut, b, out, part, m, n, k, x2d.stride(0), per,
                                BM=cfg.bm, BN=cfg.bn, BK=cfg.bk, GROUP_M=cfg.group_m, **common)  # fmt: skip
    else:
        raise ValueError(f"{what}: unknown path {cfg.path!r} (expected 'gemv' or 'mma')")
    if split > 1:
        block = 1024
        _splitk_reduce_kernel[(triton.cdiv(m * n, block),)](part, b, out, m * n, n, split, HAS_BIAS=has_bias,
                                                            BLOCK=block, NATIVE=nat, num_warps=4)  # fmt: skip
    return out
