"""FP8 (e4m3) quantization: the single definition that conversion, weight sync, training and kernels use.

Format. ``float8_e4m3fn`` has 1 sign, 4 exponent and 3 mantissa bits, no infinities, a largest finite
value of 448, normals down to 2^-6 and subnormals down to 2^-9. Rounding a normal value to it costs at
most 2^-4 relative error (half an ulp).

Scales. Checkpoints store ``q`` (fp8) and a *dequantization* multiplier ``s`` (fp32) with ``w ≈ q * s``;
block checkpoints call it ``weight_scale_inv`` (DeepSeek-V3, slime, SGLang, vLLM, transformers).
The granularity of ``s`` is the strategy:

    block      one s per bn×bk tile of an [N, K] weight -> s: [ceil(N/bn), ceil(K/bk)]
    channel    one s per output row                    -> s: [N, 1]
    tensor     one s for everything                    -> s: [1]
    activation one s per token per g channels (1×g)    -> s: [..., ceil(K/g)]
               (the blockwise recipe's activation/gradient scheme, DeepSeek-V3 / TE Float8BlockScaling)

Edge tiles of shapes that do not divide the block use only their real elements (zero padding never
raises a max-abs).

Arithmetic, fixed here; kernels must reproduce it bit for bit:

    amax = max |w| over the tile, in fp32       (exact: bf16/fp16 -> fp32 and max are exact)
    s    = amax / 448 in fp32                   (one IEEE division, round to nearest even)
           ue8m0: s rounded *up* to a power of two (DeepGEMM's scale format, exponent-only),
                  capped at 2^119 so that 448 * s stays finite
           s = 1 where that gives 0 (all-zero tile, or amax so small s underflows): never 0/0
    q    = e4m3(clamp(w / s, -448, 448))        (IEEE division; round-to-nearest-even cast)
    deq  = fp32(q) * s, rounded once to the output dtype

The clamp is not cosmetic: with a rounded (or power-of-two, or subnormal) ``s`` the quotient can land
past 448, and e4m3fn has no Inf, so an unclamped cast would produce NaN.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from quantrl.formats._checks import cdiv, check_block_size, check_float_tensor
from quantrl.formats.ste import straight_through

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
DEFAULT_BLOCK = (128, 128)
DEFAULT_ACT_GROUP = 128
# Largest power of two s with 448 * s finite in fp32; rounding up could otherwise push the scale of a
# near-fp32-max tile to 2^120, whose 448 * 2^120 overflows on dequantization.
UE8M0_MAX_SCALE = 2.0**119

Strategy = Literal["block", "channel", "tensor"]
ScaleFmt = Literal["ue8m0"] | None
STRATEGIES: tuple[str, ...] = ("block", "channel", "tensor")


def _check_scale_fmt(scale_fmt: str | None) -> None:
    if scale_fmt not in (None, "ue8m0"):
        raise ValueError(f"scale_fmt must be None or 'ue8m0', got {scale_fmt!r}")


def scale_from_amax(amax: torch.Tensor, scale_fmt: ScaleFmt = None) -> torch.Tensor:
    """fp32 dequantization scale from an fp32 max-abs (see the module note for the exact rule)."""
    s = amax.float() / FP8_MAX
    if scale_fmt == "ue8m0":
        # s = m * 2^e with m in [0.5, 1): a power of two already when m == 0.5, else round up to 2^e.
        m, e = torch.frexp(s)
        s = torch.where(s > 0, torch.ldexp(torch.ones_like(s), e - (m == 0.5).to(e.dtype)), s)
        s = s.clamp_(max=UE8M0_MAX_SCALE)
    return torch.where(s > 0, s, torch.ones_like(s))


def _quantize_with_scale(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """e4m3(clamp(x / s)); ``x`` fp32 and ``s`` broadcastable to it."""
    return (x / s).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def _tiles(x: torch.Tensor, bn: int, bk: int) -> torch.Tensor:
    """[N, K] -> [ceil(N/bn), bn, ceil(K/bk), bk], zero-padded at the bottom/right edges."""
    n, k = x.shape
    pn, pk = (-n) % bn, (-k) % bk
    if pn or pk:
        x = F.pad(x, (0, pk, 0, pn))
    return x.view((n + pn) // bn, bn, (k + pk) // bk, bk)


def _untile(t: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Inverse of ``_tiles``: [nb, bn, kb, bk] -> [N, K], dropping the padding."""
    nb, bn, kb, bk = t.shape
    out = t.reshape(nb * bn, kb * bk)
    return out if out.shape == (n, k) else out[:n, :k].contiguous()


def _amax_over(x: torch.Tensor, dim: tuple[int, ...] | int) -> torch.Tensor:
    # max(amax, -amin) reads x twice but allocates no |x| temporary the size of the weight.
    return torch.maximum(x.amax(dim=dim), x.amin(dim=dim).neg())


def _tile_shape(strategy: str, block_size: tuple[int, int], n: int, k: int) -> tuple[int, int]:
    """Every strategy is a tiling: tensor = one N×K tile, channel = 1×K tiles, block = bn×bk tiles."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy == "tensor":
        return n, k
    if strategy == "channel":
        return 1, k
    return check_block_size(block_size)


def _quantize_tiles(
    x: torch.Tensor, bn: int, bk: int, scale_fmt: ScaleFmt
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 [N, K] -> (q tiles [nb, bn, kb, bk] fp8, s [nb, kb] fp32)."""
    t = _tiles(x, bn, bk)
    s = scale_from_amax(_amax_over(t, (1, 3)), scale_fmt)
    return _quantize_with_scale(t, s[:, None, :, None]), s


def _qdq(x: torch.Tensor, bn: int, bk: int, scale_fmt: ScaleFmt, dtype: torch.dtype) -> torch.Tensor:
    """Quantize-dequantize a 2-D tensor tile by tile, never leaving the tiled view in between."""
    n, k = x.shape
    q, s = _quantize_tiles(x.float(), bn, bk, scale_fmt)
    return _untile(q.float().mul_(s[:, None, :, None]), n, k).to(dtype)


def quantize_fp8(
    w: torch.Tensor,
    strategy: Strategy = "block",
    block_size: tuple[int, int] = DEFAULT_BLOCK,
    scale_fmt: ScaleFmt = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 2-D weight ``[N, K]`` to e4m3. Returns ``(q [N, K] fp8, scale fp32)``, ``w ≈ q * scale``.

    ``scale`` has shape ``[ceil(N/bn), ceil(K/bk)]`` (block), ``[N, 1]`` (channel) or ``[1]`` (tensor).
    """
    _check_scale_fmt(scale_fmt)
    check_float_tensor(w, what="quantize_fp8", ndim=2)
    n, k = w.shape
    bn, bk = _tile_shape(strategy, block_size, n, k)
    q, s = _quantize_tiles(w.float(), bn, bk, scale_fmt)
    return _untile(q, n, k), (s.view(1) if strategy == "tensor" else s)


def _infer_tile(q: torch.Tensor, scale: torch.Tensor, block_size: tuple[int, int] | None) -> tuple[int, int]:
    if q.ndim != 2:
        raise ValueError(f"dequantize_fp8: expected a 2-D weight, got shape {tuple(q.shape)}")
    n, k = q.shape
    if block_size is None and scale.numel() == 1:
        return n, k
    if block_size is None and tuple(scale.shape) == (n, 1):
        return 1, k
    bn, bk = check_block_size(block_size or DEFAULT_BLOCK)
    if tuple(scale.shape) != (cdiv(n, bn), cdiv(k, bk)):
        raise ValueError(
            f"dequantize_fp8: scale shape {tuple(scale.shape)} fits neither per-tensor [1], per-channel [{n}, 1] "
            f"nor {bn}x{bk} blocks [{cdiv(n, bn)}, {cdiv(k, bk)}] for weight {tuple(q.shape)}"
        )
    return bn, bk


def dequantize_fp8(
    q: torch.Tensor,
    scale: torch.Tensor,
    block_size: tuple[int, int] | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """``fp32(q) * scale`` rounded once to ``dtype``; per-tensor/per-channel layouts are read from the
    scale's shape, block scales need ``block_size`` unless it is the default 128×128."""
    if q.dtype != FP8_DTYPE:
        raise TypeError(f"dequantize_fp8: expected {FP8_DTYPE} values, got {q.dtype}")
    if q.numel() == 0:
        raise ValueError("dequantize_fp8: tensor is empty")
    bn, bk = _infer_tile(q, scale, block_size)
    n, k = q.shape
    t = _tiles(q.float(), bn, bk).mul_(scale.float().reshape(cdiv(n, bn), 1, cdiv(k, bk), 1))
    return _untile(t, n, k).to(dtype)


def fake_quantize_fp8(
    w: torch.Tensor,
    strategy: Strategy = "block",
    block_size: tuple[int, int] = DEFAULT_BLOCK,
    scale_fmt: ScaleFmt = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Quantize-dequantize onto the e4m3 grid, in ``dtype`` (default ``w.dtype``), with the STE gradient.

    Must equal ``dequantize_fp8(*quantize_fp8(w, ...), dtype=dtype)`` bit for bit: this is the weight
    an FP8 rollout engine computes with.
    """
    _check_scale_fmt(scale_fmt)
    check_float_tensor(w, what="fake_quantize_fp8", ndim=2)
    bn, bk = _tile_shape(strategy, block_size, *w.shape)
    return straight_through(w, _qdq, bn, bk, scale_fmt, dtype or w.dtype)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[..., K] -> [M, K] (a view when possible)."""
    return x.reshape(-1, x.shape[-1])


def quantize_fp8_activation(
    x: torch.Tensor, group_size: int = DEFAULT_ACT_GROUP, scale_fmt: ScaleFmt = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token 1×``group_size`` quantization along the last dim.

    ``x [..., K]`` -> ``(q [..., K] fp8, scale [..., ceil(K/group_size)] fp32)``; a ragged last group
    uses its real elements.
    """
    _check_scale_fmt(scale_fmt)
    if group_size <= 0:
        raise ValueError(f"group_size must be positive, got {group_size}")
    check_float_tensor(x, what="quantize_fp8_activation")
    rows = _rows(x)
    q, s = _quantize_tiles(rows.float(), 1, group_size, scale_fmt)  # s: [M, kb]
    return _untile(q, *rows.shape).view(x.shape), s.view(*x.shape[:-1], s.shape[-1])


def dequantize_fp8_activation(
    q: torch.Tensor, scale: torch.Tensor, group_size: int = DEFAULT_ACT_GROUP, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Inverse of ``quantize_fp8_activation``: ``fp32(q) * scale`` per 1×g group, rounded to ``dtype``."""
    if q.dtype != FP8_DTYPE:
        raise TypeError(f"dequantize_fp8_activation: expected {FP8_DTYPE} values, got {q.dtype}")
    expected = (*q.shape[:-1], cdiv(q.shape[-1], group_size))
    if tuple(scale.shape) != expected:
        raise ValueError(
            f"dequantize_fp8_activation: scale shape {tuple(scale.shape)} does not match {expected} "
            f"for values {tuple(q.shape)} and group size {group_size}"
        )
    rows = _rows(q)
    m, k = rows.shape
    t = _tiles(rows.float(), 1, group_size).mul_(scale.float().reshape(m, 1, -1, 1))
    return _untile(t, m, k).view(q.shape).to(dtype)


def fake_quantize_fp8_activation(
    x: torch.Tensor, group_size: int = DEFAULT_ACT_GROUP, scale_fmt: ScaleFmt = None, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """1×g quantize-dequantize of activations/gradients (STE gradient): what an FP8 GEMM consumes."""
    _check_scale_fmt(scale_fmt)
    check_float_tensor(x, what="fake_quantize_fp8_activation")

    def qdq(v: torch.Tensor) -> torch.Tensor:
        return _qdq(_rows(v), 1, group_size, scale_fmt, dtype or v.dtype).view(v.shape)

    return straight_through(x, qdq)
