"""NVFP4 weights: 4-bit floats with two-level scales (compressed-tensors ``nvfp4-pack-quantized``).

Format. Elements are FP4 E2M1 (1 sign, 2 exponent, 1 mantissa bit): ±{0, 0.5, 1, 1.5, 2, 3, 4, 6}.
A weight ``[N, K]`` (K % 16 == 0) is cut into groups of 16 consecutive input channels; each group has an
FP8 E4M3 scale, and the tensor one fp32 *global* scale ``gs`` that maps the tensor's largest group to the
top of e4m3's range, so that the 3-mantissa-bit group scales keep their precision whatever the tensor's
magnitude. The arithmetic, fixed here for conversion, weight sync, QAT and the engine:

    gs    = 448 * 6 / amax|W|                             fp32, ``weight_global_scale`` [1]
    s     = e4m3(clamp(amax_16 / 6 * gs, 2^-9, 448))      ``weight_scale`` [N, K/16] float8_e4m3fn
    s_eff = fp32(s) / gs                                  one fp32 division
    q     = e2m1(clamp(w / s_eff, -6, 6))                 round to nearest, ties to even
    deq   = (fp32(q) * s_eff) rounded once to the output dtype

``deq`` is exactly what compressed-tensors (and so transformers and vLLM's emulation) decompress: they
multiply the fp4 value by ``bf16(s) / gs`` in fp32, and bf16 holds every e4m3 value exactly. The floor
2^-9 (e4m3's smallest subnormal) keeps an all-zero group at codes 0, never 0/0; ``amax|W|`` is floored at
2^-100 so that an all-zero tensor still gets a finite ``gs``.

Codes and packing. A code is ``sign << 3 | m`` with ``m`` the index of the magnitude in ``E2M1_VALUES``
(so -0.0 is code 8); two codes per uint8 along K, element 2i in the low nibble: ``weight_packed`` [N, K/2].

Hopper has no FP4 tensor cores: an H100 engine computes NVFP4A16 (weights dequantized, BF16 activations),
as vLLM does below SM100. The format still matters there: it is what a Blackwell deployment serves, and
QAT against it keeps the train-rollout mismatch at the floor for that deployment.
"""

from __future__ import annotations

import torch

from quantrl.formats._checks import check_amax, check_float_tensor, row_chunks
from quantrl.formats.fp8 import FP8_DTYPE, FP8_MAX
from quantrl.formats.ste import straight_through

GROUP = 16
FP4_MAX = 6.0
SCALE_DTYPE = FP8_DTYPE
SCALE_MIN = 2.0**-9  # smallest positive e4m3 (subnormal)
AMAX_FLOOR = 2.0**-100
# magnitudes by code & 7; the sign is bit 3
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_VALUES = torch.tensor(E2M1_MAGNITUDES + tuple(-v for v in E2M1_MAGNITUDES), dtype=torch.float32)
# Round-to-nearest-even boundaries between consecutive magnitudes: a midpoint goes to the even mantissa
# (0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4); "strict" means > rather than >=.
_BOUNDS = ((0.25, True), (0.75, False), (1.25, True), (1.75, False), (2.5, True), (3.5, False), (5.0, True))


def _check_weight(w: torch.Tensor, what: str) -> None:
    check_float_tensor(w, what=what, ndim=2)
    if w.shape[1] % GROUP:
        raise ValueError(f"{what}: K={w.shape[1]} (weight shape {tuple(w.shape)}) is not divisible by {GROUP}")


def global_scale_nvfp4(w: torch.Tensor) -> torch.Tensor:
    """fp32 [1]: ``448 * 6 / amax|w|`` (compressed-tensors' ``weight_global_scale``)."""
    _check_weight(w, "global_scale_nvfp4")
    amax = w.abs().amax().float()
    check_amax(amax, w, "global_scale_nvfp4")
    return (FP8_MAX * FP4_MAX / amax.clamp_min(AMAX_FLOOR)).reshape(1)


def _check_global_scale(gs: torch.Tensor, what: str) -> torch.Tensor:
    if gs.numel() != 1 or not gs.is_floating_point():
        raise ValueError(f"{what}: global scale must be one float, got {gs.dtype} {tuple(gs.shape)}")
    if not bool(torch.isfinite(gs).all() and (gs > 0).all()):
        raise ValueError(f"{what}: global scale must be finite and positive, got {float(gs)}")
    return gs.float().reshape(1)


def _e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """fp32 values already divided by their scale -> uint8 codes (sign << 3 | magnitude index)."""
    a = x.abs()
    m = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    for bound, strict in _BOUNDS:  # values past 6 land on index 7: the clamp is free
        m += (a > bound) if strict else (a >= bound)
    return m | (torch.signbit(x).to(torch.uint8) << 3)


def _group_scales(g: torch.Tensor, gs: torch.Tensor, src: torch.Tensor, what: str) -> torch.Tensor:
    """[R, K/16, 16] -> e4m3 group scales [R, K/16]."""
    amax = g.abs().amax(dim=-1).float()
    check_amax(amax, src, what)
    return (amax / FP4_MAX * gs).clamp_(SCALE_MIN, FP8_MAX).to(SCALE_DTYPE)


def _grouped(w: torch.Tensor):
    n, k = w.shape
    for c in row_chunks(n, k, w):
        yield c, w[c].view(-1, k // GROUP, GROUP)


def quantize_nvfp4(
    w: torch.Tensor, global_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[N, K]`` -> ``(codes uint8 [N, K], scale e4m3 [N, K/16], global_scale fp32 [1])``.

    ``global_scale`` defaults to ``global_scale_nvfp4(w)``; pass one to quantize against a fixed one.
    """
    _check_weight(w, "quantize_nvfp4")
    gs = global_scale_nvfp4(w) if global_scale is None else _check_global_scale(global_scale, "quantize_nvfp4")
    gs = gs.to(w.device)
    n, k = w.shape
    codes = torch.empty(n, k, dtype=torch.uint8, device=w.device)
    scale = torch.empty(n, k // GROUP, dtype=SCALE_DTYPE, device=w.device)
    for c, g in _grouped(w):
        scale[c] = _group_scales(g, gs, w, "quantize_nvfp4")
        s_eff = scale[c].float().div_(gs).unsqueeze(-1)
        codes[c] = _e2m1_codes(torch.div(g, s_eff)).view(-1, k)
    return codes, scale, gs


def dequantize_nvfp4(
    codes: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """``fp32(e2m1[codes]) * (fp32(scale) / global_scale)`` per group, rounded once to ``dtype``."""
    if codes.ndim != 2 or codes.dtype != torch.uint8:
        raise ValueError(f"dequantize_nvfp4: expected 2-D uint8 codes, got {codes.dtype} {tuple(codes.shape)}")
    n, k = codes.shape
    if k % GROUP or tuple(scale.shape) != (n, k // GROUP):
        raise ValueError(f"dequantize_nvfp4: scale shape {tuple(scale.shape)} does not fit codes {tuple(codes.shape)} "
                         f"(expected ({n}, {k // GROUP}) e4m3 scales, one per {GROUP} elements)")  # fmt: skip
    gs = _check_global_scale(global_scale, "dequantize_nvfp4").to(codes.device)
    table = E2M1_VALUES.to(codes.device)
    out = torch.empty(n, k, dtype=dtype, device=codes.device)
    for c in row_chunks(n, k, codes):
        v = table[codes[c].long() & 15].view(-1, k // GROUP, GROUP)
        out[c] = v.mul_(scale[c].float().div_(gs).unsqueeze(-1)).view(-1, k)
    return out


def _fake_quantize(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    codes, scale, gs = quantize_nvfp4(w)
    return dequantize_nvfp4(codes, scale, gs, dtype)


def fake_quantize_nvfp4(w: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Quantize-dequantize with the straight-through gradient, output in ``dtype`` (default ``w.dtype``).

    Equals ``dequantize_nvfp4(*quantize_nvfp4(w), dtype)`` bit for bit: the global scale is recomputed from
    ``w`` each call, as weight sync does, so QAT's forward is the engine's weight after every sync.
    """
    _check_weight(w, "fake_quantize_nvfp4")
    return straight_through(w, _fake_quantize, dtype or w.dtype)


def pack_nvfp4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, K] (0..15, K even) -> uint8 [N, K/2], element 2i in the low nibble."""
    if codes.dtype != torch.uint8 or codes.ndim != 2 or codes.shape[1] % 2:
        raise ValueError(f"pack_nvfp4: expected 2-D uint8 codes with an even K, got {codes.dtype} {tuple(codes.shape)}")
    if codes.numel() and int(codes.max()) > 15:
        raise ValueError(f"pack_nvfp4: codes must lie in [0, 15], got max {int(codes.max())}")
    pairs = codes.view(codes.shape[0], -1, 2)  # [N, K/2, 2]: low, high nibble of each byte
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_nvfp4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] -> uint8 codes [N, K]."""
    if packed.dtype != torch.uint8 or packed.ndim != 2:
        raise ValueError(f"unpack_nvfp4: expected 2-D uint8 bytes, got {packed.dtype} {tuple(packed.shape)}")
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).view(packed.shape[0], -1)
