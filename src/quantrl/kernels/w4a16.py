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
NVFP4A16 (``nvfp4_gemm``; ``FP4=True``) runs the same two kernels on ``layout.nvfp4_repack``'s layout:
int32 words of 8 codes (bits rearranged for the decode) and the layer's decode table, which holds formats'
weight for each of the 256 e4m3 scales x 8 magnitudes. Per word, 8 byte permutes (``prmt``) look the 8
weights up and pair them, two ``lop3`` put the signs in (``_fp4_decode_ptx``): no float arithmetic, and
the weight is formats' ``dtype(fp32(q * s_eff))`` bit for bit by construction.
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


def _fp4_decode_ptx(out: str) -> str:
    """PTX for one kernel word ($8, ``layout.nvfp4_repack``) and its group's table entry ($9..$12: the low
    bytes of magnitudes 0..3, 4..7, then the high bytes) -> the weights of codes 0..7, $0..$7: 16-bit
    (``out="h"``, a tensor-core operand), or fp32 from bf16 (``"bf16"``) or from fp16 (``"fp16"``) for
    the gemv's FMAs. Byte permutes only: the table holds formats' rounded numbers (``layout``'s note)."""
    body = (
        "and.b32 m, $8, 0x77777777;\nshr.u32 mb, m, 16;\n"  # byte selectors a0 a4 a1 a5 | a2 a6 a3 a7
        "prmt.b32 la, $9, $10, m;\nprmt.b32 ha, $11, $12, m;\n"
        "prmt.b32 lb, $9, $10, mb;\nprmt.b32 hb, $11, $12, mb;\n"
        "and.b32 t, $8, 0x80808080;\nxor.b32 ha, ha, t;\n"  # the signs, already at the high bytes' bit 7
        "shl.b32 t, $8, 4;\nand.b32 t, t, 0x80808080;\nxor.b32 hb, hb, t;\n"
    )
    for i, (lo, hi, sel) in enumerate((("la", "ha", "0x5140"), ("la", "ha", "0x7362"),
                                       ("lb", "hb", "0x5140"), ("lb", "hb", "0x7362"))):  # fmt: skip
        body += f"prmt.b32 p, {lo}, {hi}, {sel};\n"  # the pair (code i, code i + 4)
        if out == "h":
            body += f"mov.b32 {{${i}, ${i + 4}}}, p;\n"
        elif out == "bf16":
            body += f"shl.b32 ${i}, p, 16;\nand.b32 ${i + 4}, p, 0xFFFF0000;\n"
        else:
            body += f"mov.b32 {{l, h}}, p;\ncvt.f32.f16 ${i}, l;\ncvt.f32.f16 ${i + 4}, h;\n"
    return "{\n.reg .b32 m, mb, la, ha, lb, hb, t, p;\n.reg .b16 l, h;\n" + body + "}"


_FP4_DECODE_H = tl.constexpr(_fp4_decode_ptx("h"))
_FP4_DECODE_BF16 = tl.constexpr(_fp4_decode_ptx("bf16"))
_FP4_DECODE_FP16 = tl.constexpr(_fp4_decode_ptx("fp16"))


@triton.jit
def _prmt(a, b, sel):
    """PTX ``prmt.b32`` (default mode, selector nibbles' bit 3 clear) in Triton ops: byte i of the result is
    byte ``(sel >> 4i) & 7`` of the 8 bytes {b, a}."""
    out = a & 0
    for i in tl.static_range(4):
        idx = (sel >> (4 * i)) & 7
        byte = (tl.where(idx < 4, a, b) >> (8 * (idx & 3))) & 0xFF
        out = out | (byte << (8 * i))
    return out


@triton.jit
def _fp16_half(v, HIGH: tl.constexpr):
    """One fp16 of an int32 holding two, as fp32 (the interpreter path: a 16-bit tensor is fine there)."""
    h = (v >> 16) if HIGH else v
    return h.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _fp4_out(p, DT: tl.constexpr, HIGH: tl.constexpr):
    """One weight of a decoded pair word, as fp32 (the interpreter's stand-in for DT)."""
    if DT == tl.bfloat16:
        y = _pair_half(p, HIGH)
    else:
        y = _fp16_half(p, HIGH)
    return y


@triton.jit
def _dequant8_fp4(words, t0, t1, t2, t3, DT: tl.constexpr, NATIVE: tl.constexpr, F32_OUT: tl.constexpr):
    """Kernel words [R, C] + their groups' table entries (4 int32 tensors, broadcastable) -> 8 tensors [R, C],
    the NVFP4 weights of codes 0..7: on the GPU DT (or fp32 with ``F32_OUT``); fp32 under NATIVE=False."""
    if NATIVE:
        if F32_OUT and DT == tl.bfloat16:
            w0, w1, w2, w3, w4, w5, w6, w7 = tl.inline_asm_elementwise(
                _FP4_DECODE_BF16, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r,r", [words, t0, t1, t2, t3],
                dtype=(tl.float32,) * 8, is_pure=True, pack=1)  # fmt: skip
        elif F32_OUT:
            w0, w1, w2, w3, w4, w5, w6, w7 = tl.inline_asm_elementwise(
                _FP4_DECODE_FP16, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r,r", [words, t0, t1, t2, t3],
                dtype=(tl.float32,) * 8, is_pure=True, pack=1)  # fmt: skip
        elif DT == tl.bfloat16:
            w0, w1, w2, w3, w4, w5, w6, w7 = tl.inline_asm_elementwise(
                _FP4_DECODE_H, "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r,r,r", [words, t0, t1, t2, t3],
                dtype=(tl.bfloat16,) * 8, is_pure=True, pack=1)  # fmt: skip
        else:
            w0, w1, w2, w3, w4, w5, w6, w7 = tl.inline_asm_elementwise(
                _FP4_DECODE_H, "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r,r,r", [words, t0, t1, t2, t3],
                dtype=(tl.float16,) * 8, is_pure=True, pack=1)  # fmt: skip
    else:  # the PTX's steps in Triton ops (-2139062144 is 0x80808080 as int32)
        m = words & 0x77777777
        mb = m >> 16
        la = _prmt(t0, t1, m)
        ha = _prmt(t2, t3, m) ^ (words & -2139062144)
        lb = _prmt(t0, t1, mb)
        hb = _prmt(t2, t3, mb) ^ ((words << 4) & -2139062144)
        p04 = _prmt(la, ha, 0x5140)
        p15 = _prmt(la, ha, 0x7362)
        p26 = _prmt(lb, hb, 0x5140)
        p37 = _prmt(lb, hb, 0x7362)
        w0, w4 = _fp4_out(p04, DT, False), _fp4_out(p04, DT, True)
        w1, w5 = _fp4_out(p15, DT, False), _fp4_out(p15, DT, True)
        w2, w6 = _fp4_out(p26, DT, False), _fp4_out(p26, DT, True)
        w3, w7 = _fp4_out(p37, DT, False), _fp4_out(p37, DT, True)
    return w0, w1, w2, w3, w4, w5, w6, w7


# One 16-byte table entry: the group's byte (shift, mask), its address (one 32x64-bit multiply-add, on the
# FMA pipe) and one 16-byte load. A Triton gather (tl.load of data-dependent addresses) is a layout anchor
# of its own: Triton 3.6 gives it a layout unlike the weight words' and converts every dequantized weight
# through shared memory (18 barriers per gemv loop iteration, measured with an earlier table); as inline
# PTX the load is an elementwise op and keeps the words' layout. ``.nc``: the table is read-only here.
_TABLE_LOAD_PTX = tl.constexpr(
    "{\n.reg .b32 b;\n.reg .b64 a;\nshr.u32 b, $4, $5;\nand.b32 b, b, 255;\nmad.wide.u32 a, b, 16, $6;\n"
    "ld.global.nc.v4.u32 {$0, $1, $2, $3}, [a];\n}"
)


@triton.jit
def _fp4_table(st_ptr, tab_ptr, rkw, rn, mask2d, N, DT: tl.constexpr, NATIVE: tl.constexpr):
    """Table entries for a [BKW, BN] word tile -> 4 int32 tensors [BKW, BN]. Word row w is in group w // 2,
    whose e4m3 byte is byte (w // 2) % 4 of scale word row w // 8 (``layout.nvfp4_repack``); repeated
    addresses hit L1. Masked words and scales load as 0, and byte 0's entry is all zeros, a zero weight."""
    sw = tl.load(st_ptr + (rkw // 8)[:, None] * N + rn[None, :], mask=mask2d, other=0)
    shift = ((rkw << 2) & 24)[:, None]  # 8 * ((w // 2) % 4) for w >= 0, without signed division
    table = tab_ptr + (0 if DT == tl.bfloat16 else 1024)  # [2, 256, 4] int32: this dtype's half
    if NATIVE:
        t0, t1, t2, t3 = tl.inline_asm_elementwise(_TABLE_LOAD_PTX, "=r,=r,=r,=r,r,r,l", [sw, shift, table],
                                                   dtype=(tl.int32,) * 4, is_pure=True, pack=1)  # fmt: skip
    else:
        entry = table + 4 * ((sw >> shift) & 0xFF)
        t0, t1, t2, t3 = tl.load(entry), tl.load(entry + 1), tl.load(entry + 2), tl.load(entry + 3)
    return t0, t1, t2, t3


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


# int32 $2 holding two fp16 -> fp32 $0 (low half), $1 (high half); in PTX so that no 16-bit tensor exists
# at the Triton level (Triton 3.6 gives those another layout, converted through shared memory in the loop).
_FP16_PAIR_PTX = tl.constexpr("{\n.reg .b16 l, h;\nmov.b32 {l, h}, $2;\ncvt.f32.f16 $0, l;\ncvt.f32.f16 $1, h;\n}")


@triton.jit
def _x_pair(xw, mask, FP16: tl.constexpr, NATIVE: tl.constexpr):
    """Two consecutive activations read as one int32 -> (x[2i], x[2i + 1]) as fp32 [BKW, 1] each."""
    v = tl.load(xw, mask=mask, other=0)[:, None]
    if not FP16:
        lo, hi = _pair_half(v, False), _pair_half(v, True)
    elif NATIVE:
        lo, hi = tl.inline_asm_elementwise(_FP16_PAIR_PTX, "=r,=r,r", [v], dtype=(tl.float32, tl.float32),
                                           is_pure=True, pack=1)  # fmt: skip
    else:
        lo, hi = _fp16_half(v, False), _fp16_half(v, True)
    return lo, hi


@triton.jit
def _rows_times8_pairs(x_row, rkw, mask, w0, w1, w2, w3, w4, w5, w6, w7, FP16: tl.constexpr, NATIVE: tl.constexpr):
    """sum_j x[8w + j] * w_j: [BKW, BN] fp32 partial products of a word tile (weights as fp32), x read as
    int32 pairs (4 loads per word row, not 8), bf16 or fp16."""
    xw = x_row.to(tl.pointer_type(tl.int32), bitcast=True) + rkw * 4
    x0, x1 = _x_pair(xw, mask, FP16, NATIVE)
    x2, x3 = _x_pair(xw + 1, mask, FP16, NATIVE)
    x4, x5 = _x_pair(xw + 2, mask, FP16, NATIVE)
    x6, x7 = _x_pair(xw + 3, mask, FP16, NATIVE)
    return x0 * w0 + x1 * w1 + x2 * w2 + x3 * w3 + x4 * w4 + x5 * w5 + x6 * w6 + x7 * w7


@triton.jit
def _w4a16_gemv_kernel(
    x_ptr, qt_ptr, st_ptr, tab_ptr, bias_ptr, out_ptr, part_ptr,
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
    dt = x_ptr.dtype.element_ty
    for kw0 in range(kw_lo, kw_hi, BKW):
        rkw = kw0 + tl.arange(0, BKW)
        kw_mask = rkw < kw_hi
        mask2d = kw_mask[:, None] & n_mask[None, :]
        words = tl.load(qt_ptr + rkw[:, None] * N + rn[None, :], mask=mask2d, other=0)
        if FP4:
            t0, t1, t2, t3 = _fp4_table(st_ptr, tab_ptr, rkw, rn, mask2d, N, dt, NATIVE)
            w0, w1, w2, w3, w4, w5, w6, w7 = _dequant8_fp4(words, t0, t1, t2, t3, dt, NATIVE, True)
            acc += _rows_times8_pairs(x_row, rkw, kw_mask, w0, w1, w2, w3, w4, w5, w6, w7, dt == tl.float16, NATIVE)
        elif BF16X2:
            sp = _bf16_pair(_load_scale_tile(st_ptr, rkw, kw0 * 8, rn, mask2d, n_mask, N, GROUP, BKW * 8))
            w0, w1, w2, w3, w4, w5, w6, w7 = _dequant8_bf16x2(words, sp, NATIVE)  # each [BKW, BN]
            acc += _rows_times8_pairs(x_row, rkw, kw_mask, w0, w1, w2, w3, w4, w5, w6, w7, False, NATIVE)
        else:
            sf = _load_scales(st_ptr, rkw, kw0 * 8, rn, mask2d, n_mask, N, GROUP, BKW * 8, NATIVE)
            xv = tl.load(x_row + rkw[:, None] * 8 + j[None, :], mask=kw_mask[:, None], other=0.0)
            xf = widen(xv, NATIVE)  # [BKW, 8]
            w = _round_to(_nibbles(words) * sf, dt, NATIVE).to(tl.float32)
            acc += tl.sum(xf[:, :, None] * w, axis=1)
    y = tl.sum(acc, axis=0)  # [BN]
    if SPLIT:
        tl.store(part_ptr + (pid_s * M + m) * N + rn, y, mask=n_mask)
    else:
        if HAS_BIAS:
            y += widen(tl.load(bias_ptr + rn, mask=n_mask, other=0.0), NATIVE)
        tl.store(out_ptr + m * N + rn, cast_out(y, out_ptr.dtype.element_ty, NATIVE), mask=n_mask)


@triton.jit
def _weight_tile(words, st_ptr, tab_ptr, rkw, k0, rn, mask2d, n_mask, N, DT: tl.constexpr, GROUP: tl.constexpr,
                 BK: tl.constexpr, BN: tl.constexpr, NATIVE: tl.constexpr, BF16X2: tl.constexpr,
                 FP4: tl.constexpr):  # fmt: skip
    """A [BK/8, BN] word tile -> the dequantized K-major [BK, BN] weight tile in DT (the mma paths' decode:
    NVFP4 table, bf16x2 PTX or magic-number unpacking), exactly formats' weights."""
    if FP4:
        t0, t1, t2, t3 = _fp4_table(st_ptr, tab_ptr, rkw, rn, mask2d, N, DT, NATIVE)
        w0, w1, w2, w3, w4, w5, w6, w7 = _dequant8_fp4(words, t0, t1, t2, t3, DT, NATIVE, False)
        w = _join8(w0, w1, w2, w3, w4, w5, w6, w7)
    elif BF16X2:
        w = _k_major_tile(words, _bf16_pair(_load_scale_tile(st_ptr, rkw, k0, rn, mask2d, n_mask, N, GROUP, BK)),
                          NATIVE)  # fmt: skip
    else:
        sf = _load_scales(st_ptr, rkw, k0, rn, mask2d, n_mask, N, GROUP, BK, NATIVE)
        w = tl.reshape(_round_to(_nibbles(words) * sf, DT, NATIVE), (BK, BN))
    return w


@triton.jit
def _mma(a, w, acc, NATIVE: tl.constexpr):
    """acc + a @ w on the tensor cores; the interpreter multiplies fp32 operands holding the same bf16/fp16
    values (its bf16 dot is broken)."""
    if NATIVE:
        acc = tl.dot(a, w, acc)
    else:
        acc = tl.dot(widen(a, NATIVE), w, acc, input_precision="ieee")
    return acc


@triton.jit
def _w4a16_mma_kernel(
    x_ptr, qt_ptr, st_ptr, tab_ptr, bias_ptr, out_ptr, part_ptr,
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
        w = _weight_tile(words, st_ptr, tab_ptr, rkw, k0, rn, mask2d, n_mask, N, dt, GROUP, BK, BN, NATIVE, BF16X2, FP4)
        acc = _mma(a, w, acc, NATIVE)
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
    if cfg.path == "gemv" and cfg.unpack == "bf16x2":
        x2d = _int32_readable(x2d)
    return _launch(x2d, qweight_t, scale_t, None, group_size, bias, cfg, native, "w4a16_gemm")


def nvfp4_gemm(
    x2d: torch.Tensor,
    qweight_t: torch.Tensor,
    scale_t: torch.Tensor,
    table: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: W4A16Config | None = None,
    native: bool | None = None,
) -> torch.Tensor:
    """NVFP4A16: ``x2d [M, K] @ dequant(...) + bias`` with the weight in ``layout.nvfp4_repack``'s layout and
    the layer's ``layout.nvfp4_decode_table`` (int32 [2, 256, 4]); the W4A16 kernels' tiling, split-K and
    paths, with the e2m1 decode in place of the INT4 one (``config.unpack`` is not used). Validated by the
    dispatcher (``quantrl.kernels.nvfp4_linear``)."""
    m, k = x2d.shape
    cfg = config or pick_config(m, qweight_t.shape[1], k, sm_count(x2d.device))
    if cfg.path == "gemv":
        x2d = _int32_readable(x2d)
    return _launch(x2d, qweight_t, scale_t, table, 16, bias, cfg, native, "nvfp4_gemm")


def _int32_readable(x2d: torch.Tensor) -> torch.Tensor:
    """x2d itself, or a contiguous copy where the gemv could not read its rows as int32 pairs."""
    return x2d.clone(memory_format=torch.contiguous_format) if x2d.data_ptr() % 4 or x2d.stride(0) % 2 else x2d


def _launch(x2d, qweight_t, scale_t, table, group_size, bias, cfg: W4A16Config, native, what: str) -> torch.Tensor:
    """Both formats' launches (``table`` given: NVFP4): split-K ranges, the path's grid, the reduction."""
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
    fp4 = table is not None
    # NVFP4 mma: with no register ceiling, ptxas (Triton 3.9's) squeezes the 16-row tile into 96 registers
    # and spills one; with this one it takes ~122 and every tile fits (bench/compile_sm90.py).
    maxnreg = 168 if fp4 and cfg.path == "mma" else None
    common = {"GROUP": group_size, "HAS_BIAS": has_bias, "SPLIT": split > 1, "NATIVE": nat, "FP4": fp4,
              "BF16X2": not fp4 and cfg.unpack == "bf16x2", "num_warps": cfg.num_warps,
              "num_stages": cfg.num_stages, "maxnreg": maxnreg}  # fmt: skip
    tab = table if fp4 else scale_t  # an unused pointer argument when not FP4
    if cfg.path == "gemv":
        grid = (triton.cdiv(n, cfg.bn), split, m)
        _w4a16_gemv_kernel[grid](x2d, qweight_t, scale_t, tab, b, out, part, m, n, k, x2d.stride(0), per // 8,
                                 BN=cfg.bn, BKW=cfg.bk // 8, **common)  # fmt: skip
    elif cfg.path == "mma":
        grid = (triton.cdiv(m, cfg.bm) * triton.cdiv(n, cfg.bn), split)
        _w4a16_mma_kernel[grid](x2d, qweight_t, scale_t, tab, b, out, part, m, n, k, x2d.stride(0), per,
                                BM=cfg.bm, BN=cfg.bn, BK=cfg.bk, GROUP_M=cfg.group_m, **common)  # fmt: skip
    else:
        raise ValueError(f"{what}: unknown path {cfg.path!r} (expected 'gemv' or 'mma')")
    if split > 1:
        block = 1024
        _splitk_reduce_kernel[(triton.cdiv(m * n, block),)](part, b, out, m * n, n, split, HAS_BIAS=has_bias,
                                                            BLOCK=block, NATIVE=nat, num_warps=4)  # fmt: skip
    return out
