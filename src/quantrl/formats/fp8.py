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
                  capped at 2^119 so that 448 * s stays finite, floored at 2^-127 (E8M0's smallest:
                  a larger scale only shrinks w / s, and a tile of tiny values stays storable)
           s = 1 where that gives 0 (all-zero tile, or amax so small s underflows): never 0/0
    q    = e4m3(clamp(w / s, -448, 448))        (IEEE division; round-to-nearest-even cast)
    deq  = fp32(q) * s, rounded once to the output dtype

The clamp is not cosmetic: with a rounded (or power-of-two, or subnormal) ``s`` the quotient can land
past 448, and e4m3fn has no Inf, so an unclamped cast would produce NaN.

MXFP8 (OCP microscaling) is this arithmetic with 1×32 blocks and ue8m0 scales, for weights (block size
(1, 32)) and activations (group 32) alike. Its checkpoints (compressed-tensors ``mxfp8-quantized``) store
each power-of-two scale as an E8M0 byte, the biased exponent: ``s = 2^(e - 127)`` (``encode_e8m0`` /
``decode_e8m0``; 255 is NaN and never written). Rounding the scale *up* to a power of two is what
SGLang/DeepGEMM (``ceil_to_ue8m0``) and cuBLAS do too (no element saturates); OCP's reference rule rounds
down and clamps, and llm-compressor's ``generate_mx_scales`` differs from ours where a block's max has
mantissa 1.75 (it doubles that scale). Any of these scales loads and dequantizes the same way.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from quantrl.formats._checks import cdiv, check_amax, check_block_size, check_float_tensor, chunk_elems, row_chunks
from quantrl.formats.ste import straight_through

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
DEFAULT_BLOCK = (128, 128)
DEFAULT_ACT_GROUP = 128
# Largest power of two s with 448 * s finite in fp32; rounding up could otherwise push the scale of a
# near-fp32-max tile to 2^120, whose 448 * 2^120 overflows on dequantization.
UE8M0_MAX_SCALE = 2.0**119
UE8M0_MIN_SCALE = 2.0**-127  # E8M0 code 0

Strategy = Literal["block", "channel", "tensor"]
ScaleFmt = Literal["ue8m0"] | None
STRATEGIES: tuple[str, ...] = ("block", "channel", "tensor")


def _check_scale_fmt(scale_fmt: str | None) -> None:
    if scale_fmt not in (None, "ue8m0"):
        raise ValueError(f"scale_fmt must be None or 'ue8m0', got {scale_fmt!r}")


def _check_group(group_size: int) -> None:
    if group_size <= 0:
        raise ValueError(f"group_size must be positive, got {group_size}")


def scale_from_amax(amax: torch.Tensor, scale_fmt: ScaleFmt = None) -> torch.Tensor:
    """fp32 dequantization scale from an fp32 max-abs (see the module note for the exact rule)."""
    s = amax.float() / FP8_MAX
    if scale_fmt == "ue8m0":
        # s = m * 2^e with m in [0.5, 1): a power of two already when m == 0.5, else round up to 2^e.
        m, e = torch.frexp(s)
        s = torch.where(s > 0, torch.ldexp(torch.ones_like(s), e - (m == 0.5).to(e.dtype)), s)
        s = torch.where(s > 0, s.clamp(min=UE8M0_MIN_SCALE, max=UE8M0_MAX_SCALE), s)
    return torch.where(s > 0, s, torch.ones_like(s))


E8M0_BIAS = 127
MXFP8_BLOCK = (1, 32)  # weight blocks; activations use groups of MXFP8_BLOCK[1] along K
MXFP8_SCALE_FMT = "ue8m0"


def encode_e8m0(scale: torch.Tensor) -> torch.Tensor:
    """Power-of-two fp32 scales -> uint8 biased exponents (MX scale storage); anything else raises."""
    s = scale.float()
    m, e = torch.frexp(s)  # s = m * 2^e, m = 0.5 exactly for a power of two
    code = e.to(torch.int32) - 1 + E8M0_BIAS
    bad = (m != 0.5) | (code < 0) | (code > 254)
    if bool(bad.any()):
        v = float(s[bad].reshape(-1)[0])
        raise ValueError(f"encode_e8m0: scales must be powers of two in [2^-127, 2^127], got {v!r} "
                         f"({int(bad.sum())} of {s.numel()})")  # fmt: skip
    return code.to(torch.uint8)


def decode_e8m0(code: torch.Tensor) -> torch.Tensor:
    """uint8 biased exponents -> fp32 scales ``2^(e - 127)`` (exact; 255, E8M0's NaN, raises)."""
    if code.dtype != torch.uint8:
        raise TypeError(f"decode_e8m0: expected uint8 exponents, got {code.dtype}")
    if bool((code == 255).any()):
        raise ValueError("decode_e8m0: code 255 (NaN) in the scales")
    return torch.ldexp(torch.ones(code.shape, dtype=torch.float32, device=code.device), code.to(torch.int32) - E8M0_BIAS)


def _quantize_into(out: torch.Tensor, x: torch.Tensor, s: torch.Tensor) -> None:
    """out (fp8) = e4m3(clamp(x / s)); ``s`` (fp32) broadcastable to ``x``; the cast happens in the copy."""
    out.copy_(torch.div(x, s).clamp_(-FP8_MAX, FP8_MAX))


def _padded_rows(x: torch.Tensor, bn: int, bk: int) -> torch.Tensor:
    """[N, K] -> [ceil(N/bn)*bn, ceil(K/bk), bk], zero-padded at the bottom/right edges (a view if no pad)."""
    n, k = x.shape
    pn, pk = (-n) % bn, (-k) % bk
    if pn or pk:
        x = F.pad(x, (0, pk, 0, pn))
    return x.view(n + pn, (k + pk) // bk, bk)


def _unpad(rows: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Inverse of ``_padded_rows``: [Np, kb, bk] -> [N, K], dropping the padding."""
    out = rows.view(rows.shape[0], -1)
    return out if out.shape == (n, k) else out[:n, :k].contiguous()


def _rowwise_amax(r: torch.Tensor) -> torch.Tensor:
    """[R, kb, bk] -> [R, kb] fp32 (exact: max and the widening are exact)."""
    return r.abs().amax(-1).float()


def _tile_shape(strategy: str, block_size: tuple[int, int], n: int, k: int) -> tuple[int, int]:
    """Every strategy is a tiling: tensor = one N×K tile, channel = 1×K tiles, block = bn×bk tiles."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy == "tensor":
        return n, k
    if strategy == "channel":
        return 1, k
    return check_block_size(block_size)


def _tile_chunks(nb: int, kb: int, bn: int, bk: int, like: torch.Tensor) -> list[tuple[slice, slice]]:
    """(block-row slice, block-col slice) pairs covering the tile grid, each about CHUNK_ELEMS elements."""
    rows = row_chunks(nb, bn * kb * bk, like)
    cols = row_chunks(kb, bn * bk, like) if rows[0].stop - rows[0].start == 1 else [slice(0, kb)]
    return [(r, c) for r in rows for c in cols]


def _quantize_tiles(
    x: torch.Tensor, bn: int, bk: int, scale_fmt: ScaleFmt, what: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] (any float dtype) -> (q [Np, kb, bk] fp8 padded rows, s [nb, kb] fp32).

    Works through cache-sized chunks of whole tiles, scaling and quantizing each chunk while it is hot,
    so fp32 temporaries never stream through main memory (several times faster on CPU than
    whole-tensor passes). ``x / s`` with bf16 ``x`` and fp32 ``s`` promotes ``x`` exactly, so x is never
    copied to fp32.
    """
    r = _padded_rows(x, bn, bk)  # [Np, kb, bk]
    np_rows, kb, _ = r.shape
    nb = np_rows // bn
    q = torch.empty(r.shape, dtype=FP8_DTYPE, device=x.device)
    if nb == 1 and bn * kb * bk > chunk_elems(x):  # one huge tile row (per-tensor): scales first, then rows
        chunks = row_chunks(np_rows, kb * bk, x)
        amax = torch.stack([_rowwise_amax(r[c]).amax(0) for c in chunks]).amax(0, keepdim=True)  # [1, kb]
        check_amax(amax, x, what)
        s = scale_from_amax(amax, scale_fmt)
        for c in chunks:
            _quantize_into(q[c], r[c], s[:, :, None])
        return q, s
    s = torch.empty(nb, kb, dtype=torch.float32, device=x.device)
    for bi, bj in _tile_chunks(nb, kb, bn, bk, x):
        rows = slice(bi.start * bn, bi.stop * bn)
        rc = r[rows, bj]  # [rows, cols/bk, bk]
        amax = _rowwise_amax(rc).view(-1, bn, rc.shape[1]).amax(1)  # [blocks, cols/bk]
        check_amax(amax, x, what)
        sb = scale_from_amax(amax, scale_fmt)
        s[bi, bj] = sb
        _quantize_into(q[rows, bj], rc, sb.repeat_interleave(bn, 0)[:, :, None])
    return q, s


def _dequantize_tiles(q: torch.Tensor, s: torch.Tensor, bn: int, dtype: torch.dtype) -> torch.Tensor:
    """(q [Np, kb, bk] fp8, s [nb, kb]) -> [Np, kb, bk] in ``dtype``: fp32(q) * s, rounded once."""
    np_rows, kb, bk = q.shape
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    s = s.float()
    for c in row_chunks(np_rows, kb * bk, q):
        rows_s = s[torch.arange(c.start, c.stop, device=q.device) // bn]  # [rows, kb]
        out[c].copy_(q[c].float().mul_(rows_s[:, :, None]))
    return out


def _qdq(x: torch.Tensor, bn: int, bk: int, scale_fmt: ScaleFmt, dtype: torch.dtype, what: str) -> torch.Tensor:
    """Quantize-dequantize a 2-D tensor, never leaving the padded-rows layout in between."""
    q, s = _quantize_tiles(x, bn, bk, scale_fmt, what)
    return _unpad(_dequantize_tiles(q, s, bn, dtype), *x.shape)


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
    q, s = _quantize_tiles(w, bn, bk, scale_fmt, "quantize_fp8")
    return _unpad(q, n, k), (s.view(1) if strategy == "tensor" else s)


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
    if not scale.is_floating_point():  # e.g. raw E8M0 bytes: decode_e8m0 them first
        raise TypeError(f"dequantize_fp8: expected float scales, got {scale.dtype} (E8M0 bytes: decode_e8m0 first)")
    bn, bk = _infer_tile(q, scale, block_size)
    n, k = q.shape
    s = scale.reshape(cdiv(n, bn), cdiv(k, bk))
    return _unpad(_dequantize_tiles(_padded_rows(q, bn, bk), s, bn, dtype), n, k)


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
    return straight_through(w, _qdq, bn, bk, scale_fmt, dtype or w.dtype, "fake_quantize_fp8")


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
    _check_group(group_size)
    check_float_tensor(x, what="quantize_fp8_activation")
    rows = _rows(x)
    q, s = _quantize_tiles(rows, 1, group_size, scale_fmt, "quantize_fp8_activation")  # s: [M, kb]
    return _unpad(q, *rows.shape).view(x.shape), s.view(*x.shape[:-1], s.shape[-1])


def dequantize_fp8_activation(
    q: torch.Tensor, scale: torch.Tensor, group_size: int = DEFAULT_ACT_GROUP, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Inverse of ``quantize_fp8_activation``: ``fp32(q) * scale`` per 1×g group, rounded to ``dtype``."""
    if q.dtype != FP8_DTYPE:
        raise TypeError(f"dequantize_fp8_activation: expected {FP8_DTYPE} values, got {q.dtype}")
    _check_group(group_size)
    expected = (*q.shape[:-1], cdiv(q.shape[-1], group_size))
    if tuple(scale.shape) != expected:
        raise ValueError(
            f"dequantize_fp8_activation: scale shape {tuple(scale.shape)} does not match {expected} "
            f"for values {tuple(q.shape)} and group size {group_size}"
        )
    rows = _rows(q)
    m, k = rows.shape
    t = _dequantize_tiles(_padded_rows(rows, 1, group_size), scale.reshape(m, -1), 1, dtype)
    return _unpad(t, m, k).view(q.shape)


def fake_quantize_fp8_activation(
    x: torch.Tensor, group_size: int = DEFAULT_ACT_GROUP, scale_fmt: ScaleFmt = None, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """1×g quantize-dequantize of activations/gradients (STE gradient): what an FP8 GEMM consumes."""
    _check_scale_fmt(scale_fmt)
    _check_group(group_size)
    check_float_tensor(x, what="fake_quantize_fp8_activation")

    def qdq(v: torch.Tensor) -> torch.Tensor:
        return _qdq(_rows(v), 1, group_size, scale_fmt, dtype or v.dtype, "fake_quantize_fp8_activation").view(v.shape)

    return straight_through(x, qdq)


# ---- static per-tensor scale: the FP8 KV cache ----------------------------------------------------------
# SGLang's and vLLM's ``--kv-cache-dtype fp8_e4m3`` store keys and values as q = e4m3(x / s) with one fixed
# fp32 scale per layer for K and one for V (a checkpoint's ``self_attn.k_scale`` / ``v_scale``; 1.0 when it
# has none), and attend to q * s. A fixed scale makes a token's stored value independent of the rest of
# its batch, and costs no reduction on the decode path. The clamp keeps values past 448 * s finite.


def quantize_fp8_static(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``e4m3(clamp(fp32(x) / scale, -448, 448))`` for a fixed fp32 ``scale`` (a 0-d tensor or a float)."""
    return (x.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def dequantize_fp8_static(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``fp32(q) * scale`` rounded once to ``dtype``."""
    if q.dtype != FP8_DTYPE:
        raise TypeError(f"dequantize_fp8_static: expected {FP8_DTYPE} values, got {q.dtype}")
    return (q.float() * scale).to(dtype)


def fake_quantize_fp8_static(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """What a static-scale FP8 store gives back, in ``x``'s dtype; the gradient passes straight through."""
    return straight_through(x, lambda v: dequantize_fp8_static(quantize_fp8_static(v, scale), scale, v.dtype))
