"""Exact-rounding building blocks shared by every kernel (Triton ``@jit`` helpers).

The ``formats`` reference fixes every rounding: IEEE fp32 division, round-half-to-even to integers,
round-to-nearest-even casts to bf16 and e4m3. The kernels reproduce those bit for bit, so each rounding
step lives here once:

    div_rn(a, b)        ``tl.math.div_rn``, IEEE round-to-nearest (Triton's fp32 ``/`` need not be; torch's
                        inductor calls div_rn to match eager CUDA for the same reason)
    recip_rn(b) +       the same quotient for many a over one b (a quantizer's elements over their scale):
    div_by_recip(a, ..) one IEEE reciprocal per scale, then per element a product and two FMA corrections
                        (Markstein) instead of div_rn's MUFU.RCP, FCHK and branch around a slow path per
                        element (the quantizers' SASS: 18-35% fewer instructions); see ``div_by_recip``
    rne_int(x)          (|x| + 1.5*2^23) - 1.5*2^23 with x's sign put back: exact round-half-even for
                        |x| < 2^22 (two IEEE adds, no multiply for the compiler to contract into an FMA)
    abs_bits(x)         |x| as int32 bits. Non-negative floats order like their bit patterns and every
                        NaN/Inf pattern (>= 0x7F800000) is above every finite one, so an *integer* max gives
                        the exact max-abs and cannot drop a NaN (``tl.max`` on floats may ignore NaN)
    to_bf16 / widen     fp32 <-> bf16 (and fp16/fp32 pass-through)
    to_e4m3_bits        fp32 (already clamped to ±448) -> e4m3fn bit pattern as uint8

``NATIVE`` (a constexpr) selects the hardware conversion (``cvt.rn`` on the GPU). Triton's CPU interpreter
(TRITON_INTERPRET=1, used by the CPU tests) truncates fp32->bf16, rounds fp32->fp8 approximately, widens
bf16 subnormals wrongly, and multiplies bf16 ``tl.dot`` operands as raw uint16 bits (seen with Triton
3.9), so with ``NATIVE=False`` the same conversions are done with integer bit operations, which are exact
everywhere, and the W4A16 ``tl.dot`` takes fp32 operands holding the same bf16 values. Everything else in
a kernel (indexing, masks, tiling, reductions) is the same code on both paths; the GPU tests run the
quantizers with both settings of ``NATIVE`` against ``formats``.
"""

from __future__ import annotations

from quantrl.kernels._triton import interpret_requested, tl, triton


@triton.jit
def div_rn(a, b):
    return tl.math.div_rn(a, b)


@triton.jit
def recip_rn(b):
    """Per-divisor setup of ``div_by_recip`` for b > 0: ``(k, b * k, RN(1 / (b * k)))``, k a power of two
    that brings b into [2^-80, 2^100) (exact scaling: subnormal and huge scales keep the argument below)."""
    k = tl.where(b < 8.271806125530277e-25, 1.2676506002282294e30, tl.where(b >= 1.2676506002282294e30,
                 7.888609052210118e-31, 1.0))  # 2^-80, 2^100, 2^100, 2^-100  # fmt: skip
    bk = b * k
    return k, bk, div_rn(1.0, bk)


@triton.jit
def div_by_recip(a, k, bk, r):
    """``RN(a / b)`` (IEEE fp32, = ``div_rn(a, b)``) from ``recip_rn(b)``, for the quotients a quantizer uses.

    Why it is exact. With ``r = RN(1/b')`` (b' = b*k) and ``q0 = RN(a' r)`` (a' = a*k), q0 is within 2 ulps
    of Q = a/b. One correction ``q1 = RN(q0 + (a' - b' q0) r)`` (the residual is exact in an FMA) is within
    half an ulp plus a hair, so faithful; a second from the faithful q1 is RN(Q) by Markstein's theorem (y
    within half an ulp of 1/b, q within one ulp of a/b => RN(q + r y) = RN(a/b); no underflow). b' in
    [2^-80, 2^100) keeps r normal and, for every |Q| >= 2^-11, a' and the residual's grid above fp32's
    subnormal step; smaller |Q| can be off in low bits but stay far below 2^-10, where both e4m3 and the
    integer rounding give 0, and their sign is a's. The residual is written ``q b' - a'`` and subtracted,
    so a = -0.0 gives -0.0 (``(-0) + (+0)`` would be +0); negations are products by -1 (true IEEE
    negations, folded into the FMAs' operand modifiers). ``tests/test_kernels_triton.py`` checks it against
    IEEE division on 2^20 hard pairs (the interpreter's fma is exact), the interpreter tests run it in
    every quantizer, and the GPU tests compare the quantizers with ``formats`` bit for bit.
    """
    ak = a * k
    nak = ak * -1.0  # not ``-ak``: Triton lowers that to ``0 - ak``, which turns -0.0 into +0.0
    q = ak * r
    q = tl.fma(tl.fma(q, bk, nak) * -1.0, r, q)
    return tl.fma(tl.fma(q, bk, nak) * -1.0, r, q)


@triton.jit
def rne_int(x):
    """Round fp32 to the nearest integer, ties to even (|x| < 2^22), keeping the sign of zero like
    ``torch.round`` (-0.3 -> -0.0; the bare magic-number sum would give +0.0)."""
    b = x.to(tl.int32, bitcast=True)
    a = (b & 0x7FFFFFFF).to(tl.float32, bitcast=True)
    r = (a + 12582912.0) - 12582912.0
    return (r.to(tl.int32, bitcast=True) | (b & -2147483648)).to(tl.float32, bitcast=True)


@triton.jit
def abs_bits(xf):
    """fp32 -> int32 bit pattern of |x| (ordered like |x|; NaN/Inf >= 0x7F800000)."""
    return xf.to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def bits_to_f32(b):
    return b.to(tl.float32, bitcast=True)


@triton.jit
def widen(x, NATIVE: tl.constexpr):
    """bf16 / fp16 / fp32 -> fp32, exact."""
    if x.dtype == tl.bfloat16:
        if NATIVE:
            y = x.to(tl.float32)
        else:
            b = x.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
            y = (b << 16).to(tl.float32, bitcast=True)
    else:
        y = x.to(tl.float32)
    return y


@triton.jit
def to_bf16(x, NATIVE: tl.constexpr):
    """fp32 -> bf16, round to nearest even."""
    if NATIVE:
        y = x.to(tl.bfloat16)
    else:
        b = x.to(tl.int32, bitcast=True)
        r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
        y = r.to(tl.int16).to(tl.bfloat16, bitcast=True)
    return y


@triton.jit
def round_bf16(x, NATIVE: tl.constexpr):
    """fp32 -> the nearest bf16 value, kept in fp32 (exact: bf16 widens exactly)."""
    if NATIVE:
        y = x.to(tl.bfloat16).to(tl.float32)
    else:
        b = x.to(tl.int32, bitcast=True)
        r = (b + 0x7FFF + ((b >> 16) & 1)) & -65536  # 0xFFFF0000: keep the rounded high half
        y = r.to(tl.float32, bitcast=True)
    return y


@triton.jit
def cast_out(x, DTYPE: tl.constexpr, NATIVE: tl.constexpr):
    """fp32 -> a store dtype (bf16 / fp16 / fp32), rounded once to nearest even."""
    if DTYPE == tl.bfloat16:
        y = to_bf16(x, NATIVE)
    else:
        y = x.to(DTYPE)
    return y


@triton.jit
def to_e4m3_bits(x, NATIVE: tl.constexpr):
    """fp32 in [-448, 448] -> e4m3fn bits (uint8), round to nearest even (what ``tensor.to(fp8)`` does)."""
    if NATIVE:
        y = x.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    else:
        b = x.to(tl.int32, bitcast=True)
        sign = (b >> 24) & 0x80
        a_bits = b & 0x7FFFFFFF
        a = a_bits.to(tl.float32, bitcast=True)
        # below 2^-6 (e4m3's smallest normal): multiples of 2^-9; code 8 is exactly 2^-6, so rounding up
        # from the subnormal range lands on the right normal code
        sub = rne_int(a * 512.0).to(tl.int32)
        # normal: round 23 mantissa bits to 3 (ties to even); a carry bumps the exponent, as it must
        nb = a_bits + 0x7FFFF + ((a_bits >> 20) & 1)
        nor = (nb >> 20) - 960  # rebias 127 -> 7: (127 - 7) << 3
        code = tl.where(a_bits < 0x3C800000, sub, nor)
        y = (code | sign).to(tl.uint8)
    return y


@triton.jit
def fp8_scale(amax_bits, UE8M0: tl.constexpr):
    """int32 max-abs bits -> fp32 dequant scale exactly as ``formats.fp8.scale_from_amax``;
    non-finite (the block held NaN/Inf) where the input was, for the wrapper's check."""
    amax = bits_to_f32(amax_bits)
    s = div_rn(amax, 448.0)
    if UE8M0:
        # round up to a power of two: carry any mantissa bit into the exponent; subnormal s is first
        # scaled into the normal range by 2^64 (exact), rounded there, and scaled back (exact: a power of 2)
        tiny = s < 1.1754943508222875e-38
        sn = tl.where(tiny, s * 18446744073709551616.0, s)
        p = bits_to_f32((sn.to(tl.int32, bitcast=True) + 0x7FFFFF) & 0x7F800000)
        p = tl.where(tiny, p * 5.421010862427522e-20, p)
        # floor 2^-127 (E8M0's smallest) in the bit domain: as a literal it is subnormal, which Triton
        # would type fp64; positive floats order like their bits
        p = bits_to_f32(tl.maximum(p.to(tl.int32, bitcast=True), 0x00400000))
        s = tl.where(s > 0, tl.minimum(p, 6.64613997892458e35), s)  # cap 2^119
    s = tl.where(s > 0, s, 1.0)
    return tl.where(amax_bits >= 0x7F800000, amax, s)


@triton.jit
def _probe_kernel(x_ptr):
    tl.store(x_ptr, 1.0)


def _is_interpreted() -> bool:
    """Whether ``@triton.jit`` produced interpreter kernels in this process (decided at decoration)."""
    try:
        from triton.runtime.interpreter import InterpretedFunction

        return isinstance(_probe_kernel, InterpretedFunction)
    except ImportError:  # pragma: no cover - other triton layouts
        return interpret_requested()


INTERPRETED = _is_interpreted()


def native_default(native: bool | None) -> bool:
    """Hardware conversions unless running in the interpreter (see the module note)."""
    return (not INTERPRETED) if native is None else bool(native)
