"""Group-wise symmetric integer weights (INT4 W4A16, also INT8 W8A16): one definition for QAT, sync,
conversion and kernels.

Format. A weight ``[N, K]`` is cut into groups of ``G`` consecutive input channels (G = 128, 64 or 32);
each group has one scale ``s`` and integer codes ``q`` with ``w ≈ q * s``. Two range conventions exist:

    qmax = 7  (slime / Kimi-K2 QAT, the default): s = absmax / 7,   q in [-7, 7]
    qmax = 8  (compressed-tensors / GPTQ):        s = absmax / 7.5, q in [-8, 7]

(and their 8-bit analogues qmax = 127 / 128 with divisors 127 / 127.5 and ranges [-127, 127] / [-128, 127]).

Bit-exactness. The engine receives ``s`` in its own dtype (bf16), so the scale is rounded to that dtype
*before* quantizing and the codes are computed against the stored scale:

    s_stored = dtype_s(clamp(absmax / div, tiny, max / 2^(bits-1)))   (fp32 division, one rounding)
    q        = clamp(round_half_even(fp32(w) / fp32(s_stored)), qlo, qhi)
    deq      = (fp32(q) * fp32(s_stored)) rounded once to the output dtype

so quantize-dequantize in training (fake quant), real quantization at weight sync and the engine's
dequantization are the same numbers. slime computes its STE scale in fp32 but ships a bf16 scale to the
rollout engine, a mismatch this ordering removes. The clamp to the dtype's smallest normal keeps an
all-zero group at a finite scale with codes 0 (never 0/0); the upper cap keeps a group holding the
largest bf16 value from dequantizing to Inf.

Packing (compressed-tensors ``pack-quantized``): codes are stored offset by 2^(bits-1) (q + 8 for INT4),
8 nibbles per little-endian int32 along K, element i of a row in bits 4i..4i+3 of word i // 8; the row is
zero-padded to a whole word. INT8 is the same with 4 bytes per word.
"""

from __future__ import annotations

import sys

import torch

from quantrl.formats._checks import cdiv, check_amax, check_float_tensor, row_chunks
from quantrl.formats.ste import straight_through

DEFAULT_GROUP = 128
SCALE_DTYPE = torch.bfloat16


def int_range(num_bits: int, qmax: int) -> tuple[int, int, float]:
    """(qlo, qhi, divisor) for a symmetric ``num_bits`` code with the given convention."""
    half = 1 << (num_bits - 1)
    if qmax == half - 1:
        return -qmax, qmax, float(qmax)
    if qmax == half:
        return -half, half - 1, (2 * half - 1) / 2
    raise ValueError(f"qmax for {num_bits}-bit codes must be {half - 1} (restricted) or {half} (full range), got {qmax}")


def _check_weight(w: torch.Tensor, group_size: int, what: str) -> None:
    check_float_tensor(w, what=what, ndim=2)
    if group_size <= 0:
        raise ValueError(f"{what}: group_size must be positive, got {group_size}")
    if w.shape[1] % group_size:
        raise ValueError(f"{what}: K={w.shape[1]} (weight shape {tuple(w.shape)}) is not divisible by group_size={group_size}")


def _group_scale(
    g: torch.Tensor,
    div: float,
    scale_dtype: torch.dtype,
    num_bits: int,
    src: torch.Tensor | None = None,
    what: str = "group scale",
) -> torch.Tensor:
    """[R, K/G, G] (any float dtype) -> stored scale [R, K/G] in ``scale_dtype``.

    NaN/Inf in ``g`` raise (``src``, the whole input, only feeds the error message's counts).
    """
    absmax = g.abs().amax(dim=-1).float()
    check_amax(absmax, g if src is None else src, what)
    fi = torch.finfo(scale_dtype)
    # The floor only keeps an all-zero group's scale nonzero. fp16's smallest normal (6e-5) would coarsen
    # every group below 4e-4: its floor is the smallest subnormal (codes divide by the stored scale, so a
    # subnormal one stays exact). The upper cap (a power-of-two division) keeps |q| * s finite.
    lo = 2.0**-24 if scale_dtype == torch.float16 else fi.tiny
    return (absmax / div).clamp_(lo, fi.max / (1 << (num_bits - 1))).to(scale_dtype)


def _codes(g: torch.Tensor, s: torch.Tensor, qlo: int, qhi: int) -> torch.Tensor:
    """[R, K/G, G] and stored scale [R, K/G] -> integer-valued fp32 codes [R, K/G, G].

    ``g / fp32(s)`` promotes a bf16 ``g`` exactly, so no fp32 copy of the weight is made.
    """
    return torch.div(g, s.float().unsqueeze(-1)).round_().clamp_(qlo, qhi)


def _grouped_chunks(w: torch.Tensor, group_size: int):
    """Yield (row slice, [rows, K/G, G] view) over cache-sized row chunks of ``w``."""
    n, k = w.shape
    for c in row_chunks(n, k, w):
        yield c, w[c].view(-1, k // group_size, group_size)


def quantize_int(
    w: torch.Tensor, num_bits: int, group_size: int, qmax: int, scale_dtype: torch.dtype = SCALE_DTYPE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-wise symmetric quantization of ``[N, K]`` -> ``(q int8 [N, K], scale [N, K/G] scale_dtype)``."""
    qlo, qhi, div = int_range(num_bits, qmax)
    _check_weight(w, group_size, f"quantize_int{num_bits}")
    n, k = w.shape
    q = torch.empty(n, k, dtype=torch.int8, device=w.device)
    s = torch.empty(n, k // group_size, dtype=scale_dtype, device=w.device)
    for c, g in _grouped_chunks(w, group_size):
        s[c] = _group_scale(g, div, scale_dtype, num_bits, w, f"quantize_int{num_bits}")
        q[c].copy_(_codes(g, s[c], qlo, qhi).view(-1, k))
    return q, s


def quantize_int4(
    w: torch.Tensor, group_size: int = DEFAULT_GROUP, qmax: int = 7, scale_dtype: torch.dtype = SCALE_DTYPE
) -> tuple[torch.Tensor, torch.Tensor]:
    """INT4 group quantization: ``(q int8 [N, K] in [-qmax, 7], scale [N, K/group_size])``."""
    return quantize_int(w, 4, group_size, qmax, scale_dtype)


def dequantize_int(
    q: torch.Tensor, scale: torch.Tensor, group_size: int, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """``fp32(q) * fp32(scale)`` per group, rounded once to ``dtype``."""
    if q.ndim != 2 or q.dtype not in (torch.int8, torch.int32, torch.uint8):
        raise ValueError(f"dequantize_int: expected 2-D integer codes, got {q.dtype} {tuple(q.shape)}")
    n, k = q.shape
    if group_size <= 0:
        raise ValueError(f"dequantize_int: group_size must be positive, got {group_size}")
    if k % group_size or tuple(scale.shape) != (n, k // group_size):
        raise ValueError(
            f"dequantize_int: scale shape {tuple(scale.shape)} does not fit codes {tuple(q.shape)} "
            f"with group_size={group_size} (expected ({n}, {k // group_size if k % group_size == 0 else '?'}))"
        )
    out = torch.empty(n, k, dtype=dtype, device=q.device)
    for c in row_chunks(n, k, q):
        g = q[c].float().view(-1, k // group_size, group_size)
        out[c] = g.mul_(scale[c].float().unsqueeze(-1)).view(-1, k)
    return out


dequantize_int4 = dequantize_int


def _fake_quantize(
    w: torch.Tensor, num_bits: int, group_size: int, qmax: int, scale_dtype: torch.dtype, dtype: torch.dtype
) -> torch.Tensor:
    # Straight from the grouped view to the output dtype; no int8 tensor is materialised.
    qlo, qhi, div = int_range(num_bits, qmax)
    n, k = w.shape
    out = torch.empty(n, k, dtype=dtype, device=w.device)
    for c, g in _grouped_chunks(w, group_size):
        s = _group_scale(g, div, scale_dtype, num_bits, w, f"fake_quantize_int{num_bits}")
        # + 0.0: a small negative weight rounds to code -0.0; the engine's integer 0 dequantizes to +0.0
        out[c] = _codes(g, s, qlo, qhi).mul_(s.float().unsqueeze(-1)).add_(0.0).view(-1, k)
    return out


def fake_quantize_int(
    w: torch.Tensor,
    num_bits: int,
    group_size: int,
    qmax: int,
    scale_dtype: torch.dtype = SCALE_DTYPE,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Quantize-dequantize with the straight-through gradient, output in ``dtype`` (default ``w.dtype``).

    Equals ``dequantize_int(*quantize_int(w, ...), dtype=dtype)`` bit for bit; pass the engine's dtype
    (bf16) so the QAT forward sees exactly the rollout engine's weights.
    """
    int_range(num_bits, qmax)
    _check_weight(w, group_size, f"fake_quantize_int{num_bits}")
    return straight_through(w, _fake_quantize, num_bits, group_size, qmax, scale_dtype, dtype or w.dtype)


def fake_quantize_int4(
    w: torch.Tensor,
    group_size: int = DEFAULT_GROUP,
    qmax: int = 7,
    scale_dtype: torch.dtype = SCALE_DTYPE,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """INT4 fake quantization (see ``fake_quantize_int``)."""
    return fake_quantize_int(w, 4, group_size, qmax, scale_dtype, dtype)


def _check_codes(q: torch.Tensor, num_bits: int) -> None:
    if q.dtype != torch.int8 or q.ndim != 2:
        raise ValueError(f"pack_int{num_bits}: expected 2-D int8 codes, got {q.dtype} {tuple(q.shape)}")
    if q.numel() == 0:
        raise ValueError(f"pack_int{num_bits}: tensor is empty")
    half = 1 << (num_bits - 1)
    lo, hi = int(q.min()), int(q.max())
    if lo < -half or hi > half - 1:
        raise ValueError(f"pack_int{num_bits}: codes must lie in [{-half}, {half - 1}], got [{lo}, {hi}]")


def _words_to_bytes(packed: torch.Tensor) -> torch.Tensor:
    """int32 [N, W] -> uint8 [N, 4W] in little-endian byte order, whatever the host's."""
    b = packed.contiguous().view(torch.uint8).view(packed.shape[0], -1, 4)
    return (b.flip(-1) if sys.byteorder == "big" else b).reshape(packed.shape[0], -1)


def _bytes_to_words(b: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 4W] little-endian -> int32 [N, W]."""
    b = b.view(b.shape[0], -1, 4)
    b = b.flip(-1).contiguous() if sys.byteorder == "big" else b.contiguous()
    return b.view(torch.int32).view(b.shape[0], -1)


def _pack_rows(q: torch.Tensor) -> torch.Tensor:
    """int8 [R, K] in [-8, 7] -> int32 [R, ceil(K/8)]."""
    u = (q + 8).view(torch.uint8)  # int8 add cannot overflow on [-8, 7]; the bits are then 0..15
    pad = (-q.shape[1]) % 8
    if pad:
        u = torch.nn.functional.pad(u, (0, pad))
    pairs = u.view(q.shape[0], -1, 2)  # [R, 4W, 2]: low nibble, high nibble of each byte
    return _bytes_to_words(pairs[..., 0] | (pairs[..., 1] << 4))


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 codes [N, K] in [-8, 7] -> int32 [N, ceil(K/8)] (compressed-tensors ``pack-quantized``)."""
    _check_codes(q, 4)
    n, k = q.shape
    out = torch.empty(n, cdiv(k, 8), dtype=torch.int32, device=q.device)
    for c in row_chunks(n, k, q):
        out[c] = _pack_rows(q[c])
    return out


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """int32 [N, ceil(K/8)] -> int8 codes [N, K] in [-8, 7]."""
    if packed.dtype != torch.int32 or packed.ndim != 2:
        raise ValueError(f"unpack_int4: expected 2-D int32 words, got {packed.dtype} {tuple(packed.shape)}")
    if packed.shape[1] != cdiv(k, 8):
        raise ValueError(f"unpack_int4: {packed.shape[1]} words per row cannot hold K={k} (need {cdiv(k, 8)})")
    b = _words_to_bytes(packed)
    nib = torch.stack((b & 0xF, b >> 4), dim=-1).view(packed.shape[0], -1)  # [N, 8W]
    return (nib[:, :k].to(torch.int8) - 8)


def pack_int8(q: torch.Tensor) -> torch.Tensor:
    """int8 codes [N, K] -> int32 [N, ceil(K/4)] (compressed-tensors ``pack-quantized``, 8 bits)."""
    _check_codes(q, 8)
    n, k = q.shape
    u = (q.to(torch.int16) + 128).to(torch.uint8)
    pad = (-k) % 4
    if pad:
        u = torch.nn.functional.pad(u, (0, pad))
    return _bytes_to_words(u)


def unpack_int8(packed: torch.Tensor, k: int) -> torch.Tensor:
    """int32 [N, ceil(K/4)] -> int8 codes [N, K]."""
    if packed.dtype != torch.int32 or packed.ndim != 2 or packed.shape[1] != cdiv(k, 4):
        raise ValueError(f"unpack_int8: expected int32 [N, {cdiv(k, 4)}] for K={k}, got {packed.dtype} {tuple(packed.shape)}")
    return (_words_to_bytes(packed)[:, :k].to(torch.int16) - 128).to(torch.int8)


def pack_int(q: torch.Tensor, num_bits: int) -> torch.Tensor:
    if num_bits == 4:
        return pack_int4(q)
    if num_bits == 8:
        return pack_int8(q)
    raise ValueError(f"pack_int: num_bits must be 4 or 8, got {num_bits}")


def unpack_int(packed: torch.Tensor, k: int, num_bits: int) -> torch.Tensor:
    if num_bits == 4:
        return unpack_int4(packed, k)
    if num_bits == 8:
        return unpack_int8(packed, k)
    raise ValueError(f"unpack_int: num_bits must be 4 or 8, got {num_bits}")
