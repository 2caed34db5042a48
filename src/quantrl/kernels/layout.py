"""W4A16 kernel layout: the engine's post-process repack of compressed-tensors ``pack-quantized`` weights.

Checkpoint layout (``formats.int4``): ``weight_packed`` int32 ``[N, K/8]``, word ``[n, w]`` holds codes
``k = 8w .. 8w+7`` of output row ``n`` (code i of the word in bits 4i..4i+3, stored q + 8), and
``weight_scale`` bf16 ``[N, K/G]``.

Kernel layout: both transposed, ``qweight_t`` int32 ``[K/8, N]`` and ``scale_t`` ``[K/G, N]``, contiguous.

Why. A GEMM program owns a block of BN output columns and walks K. In the kernel layout one row of words
(8 consecutive k for each of BN consecutive columns) is one contiguous, coalesced ``BN * 4``-byte load,
the scales of a group are one contiguous ``BN * 2``-byte row, and the nibbles of the ``[BK/8, BN]`` word
tile unpack (shift, mask) straight into the ``[BK, BN]`` K-major tile ``tl.dot`` takes as B, with no
shuffle of bits between words. The checkpoint layout would make every program read ``BN`` rows ``K/2``
bytes apart. The words themselves are not re-encoded, so the repack is exactly reversible: it is a pure
transpose of 32-bit words and 16-bit scales, and ``unrepack(repack(w)) == w`` bit for bit
(``restore_weights_before_loading`` relies on that).
"""

from __future__ import annotations

import torch

from quantrl.formats._checks import cdiv


def _check_pair(packed: torch.Tensor, scale: torch.Tensor, what: str, packed_name: str, scale_name: str) -> None:
    if packed.dtype != torch.int32 or packed.ndim != 2:
        raise ValueError(f"{what}: {packed_name} must be a 2-D int32 tensor, got {packed.dtype} {tuple(packed.shape)}")
    if scale.ndim != 2 or not scale.is_floating_point():
        raise ValueError(f"{what}: {scale_name} must be a 2-D float tensor, got {scale.dtype} {tuple(scale.shape)}")


def w4a16_repack(weight_packed: torch.Tensor, weight_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Checkpoint ``(weight_packed [N, K/8], weight_scale [N, K/G])`` -> kernel ``(qweight_t [K/8, N],
    scale_t [K/G, N])``, both contiguous, same dtypes and device."""
    _check_pair(weight_packed, weight_scale, "w4a16_repack", "weight_packed", "weight_scale")
    if weight_packed.shape[0] != weight_scale.shape[0]:
        raise ValueError(
            f"w4a16_repack: weight_packed {tuple(weight_packed.shape)} and weight_scale {tuple(weight_scale.shape)} "
            "disagree on N (dim 0)"
        )
    k = weight_packed.shape[1] * 8
    if weight_scale.shape[1] == 0 or k % weight_scale.shape[1] or (k // weight_scale.shape[1]) % 8:
        raise ValueError(
            f"w4a16_repack: {weight_scale.shape[1]} scale groups do not divide K={k} into groups that are a "
            "multiple of 8"
        )
    return weight_packed.t().contiguous(), weight_scale.t().contiguous()


def w4a16_unrepack(qweight_t: torch.Tensor, scale_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of ``w4a16_repack``: kernel layout -> checkpoint ``(weight_packed, weight_scale)``."""
    _check_pair(qweight_t, scale_t, "w4a16_unrepack", "qweight_t", "scale_t")
    if qweight_t.shape[1] != scale_t.shape[1]:
        raise ValueError(
            f"w4a16_unrepack: qweight_t {tuple(qweight_t.shape)} and scale_t {tuple(scale_t.shape)} disagree on N (dim 1)"
        )
    return qweight_t.t().contiguous(), scale_t.t().contiguous()


def group_size_of(qweight_t: torch.Tensor, scale_t: torch.Tensor) -> int:
    """G from the kernel-layout shapes (K = 8 * qweight_t rows, groups = scale_t rows)."""
    k = qweight_t.shape[0] * 8
    if scale_t.shape[0] == 0 or k % scale_t.shape[0]:
        raise ValueError(f"scale_t {tuple(scale_t.shape)} does not divide K={k} into groups")
    return k // scale_t.shape[0]


# ------------------------------------------------------------------------------------------------------
# NVFP4 (formats.nvfp4): the same word transpose, plus a per-layer scale table
# ------------------------------------------------------------------------------------------------------
# Checkpoint: ``weight_packed`` uint8 [N, K/2] (element 2i in the low nibble of byte i) and e4m3
# ``weight_scale`` [N, K/16]. Read as little-endian int32, four bytes are one word holding elements
# k = 8w .. 8w+7 with element i in bits 4i..4i+3: the INT4 word order, so the kernel layout is again a pure
# transpose, ``qweight_t`` int32 [K/8, N]. The scale bytes travel as int32 words too, ``scale_t`` int32
# [ceil(K/64), N], byte j of word [r, n] the e4m3 bits of group 4r + j of column n (zero bytes pad the
# last word): the kernel then loads scales in the same layout as the weight words (Triton gives 8-bit
# tiles another layout, converted through shared memory with barriers, in the hot loop) and extracts the
# byte with a shift; the bytes and their count are unchanged.
#
# The scale table. The weight is ``fp32(e2m1 * (fp32(s) / gs))`` rounded to the output dtype, one IEEE
# division per group; an e4m3 byte has only 256 values, so every quotient is computed once per layer and
# load: ``lut[b] = (fp32(e4m3 b) / gs) * 2^14``. The 2^14 undoes the kernel's e2m1 decode, which yields
# ``q * 2^-14`` (e2m1 bits placed in an fp16: its subnormals are e2m1's). Both scalings by 2^14 are exact,
# so the kernel's fp32 product ``(q * 2^-14) * lut[b]`` is the same rounding of the same exact number as
# formats' ``q * s_eff``.
NVFP4_LUT_SHIFT = 2.0**14


def nvfp4_repack(weight_packed: torch.Tensor, weight_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Checkpoint ``(weight_packed uint8 [N, K/2], weight_scale e4m3 [N, K/16])`` -> kernel ``(qweight_t
    int32 [K/8, N], scale_t int32 [ceil(K/64), N])``, contiguous, same device."""
    if weight_packed.dtype != torch.uint8 or weight_packed.ndim != 2 or weight_packed.shape[1] % 8:
        raise ValueError(f"nvfp4_repack: weight_packed must be 2-D uint8 [N, K/2] with K a multiple of 16, got "
                         f"{weight_packed.dtype} {tuple(weight_packed.shape)}")  # fmt: skip
    n, half_k = weight_packed.shape
    groups = half_k // 8
    if weight_scale.dtype != torch.float8_e4m3fn or tuple(weight_scale.shape) != (n, groups):
        raise ValueError(f"nvfp4_repack: weight_scale must be float8_e4m3fn {(n, groups)}, got "
                         f"{weight_scale.dtype} {tuple(weight_scale.shape)}")  # fmt: skip
    words = weight_packed.contiguous().view(torch.int32)  # [N, K/8]
    padded = torch.zeros(n, 4 * cdiv(groups, 4), dtype=torch.uint8, device=weight_scale.device)
    padded[:, :groups] = weight_scale.view(torch.uint8)
    return words.t().contiguous(), padded.view(torch.int32).t().contiguous()  # [K/8, N], [ceil(K/64), N]


def check_nvfp4_layout(qweight_t: torch.Tensor, scale_t: torch.Tensor, what: str) -> None:
    """int32 [K/8, N] words and int32 [ceil(K/64), N] scale words of one weight, or a ValueError naming ``what``."""
    if qweight_t.dtype != torch.int32 or qweight_t.ndim != 2 or scale_t.dtype != torch.int32 or scale_t.ndim != 2:
        raise ValueError(f"{what}: expected int32 [K/8, N] words and int32 [ceil(K/64), N] scale words, got "
                         f"{qweight_t.dtype} {tuple(qweight_t.shape)} / {scale_t.dtype} {tuple(scale_t.shape)}")  # fmt: skip
    kw = qweight_t.shape[0]
    if qweight_t.shape[1] != scale_t.shape[1] or kw % 2 or scale_t.shape[0] != cdiv(kw // 2, 4):
        raise ValueError(f"{what}: qweight_t {tuple(qweight_t.shape)} and scale_t {tuple(scale_t.shape)} do not "
                         "describe one [N, K] weight (groups of 16, four group scales per word)")  # fmt: skip


def nvfp4_unrepack(qweight_t: torch.Tensor, scale_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of ``nvfp4_repack``: kernel layout -> checkpoint ``(weight_packed, weight_scale)``."""
    check_nvfp4_layout(qweight_t, scale_t, "nvfp4_unrepack")
    packed = qweight_t.t().contiguous().view(torch.uint8)  # [N, K/2]
    groups = qweight_t.shape[0] // 2
    scale = scale_t.t().contiguous().view(torch.uint8)[:, :groups].contiguous()
    return packed, scale.view(torch.float8_e4m3fn)


def nvfp4_scale_lut(global_scale: torch.Tensor) -> torch.Tensor:
    """fp32 [256]: ``lut[b] = (fp32(e4m3 bits b) / global_scale) * 2^14`` on global_scale's device (the
    division is formats' own, tensor by tensor). Refuses a global scale so small that the largest e4m3
    scale would overflow fp32 after the 2^14 (weights above ~1e35)."""
    if global_scale.numel() != 1 or not global_scale.is_floating_point():
        raise ValueError(f"nvfp4_scale_lut: global scale must be one float, got {global_scale.dtype} "
                         f"{tuple(global_scale.shape)}")  # fmt: skip
    gs = global_scale.float().reshape(1)
    if not bool(torch.isfinite(gs).all() and (gs > 0).all()):
        raise ValueError(f"nvfp4_scale_lut: global scale must be finite and positive, got {float(gs)}")
    codes = torch.arange(256, dtype=torch.int32, device=gs.device).to(torch.uint8)
    lut = codes.view(torch.float8_e4m3fn).float().div_(gs).mul_(NVFP4_LUT_SHIFT)
    finite = torch.cat((lut[:0x7F], lut[0x80:0xFF]))  # 0x7F / 0xFF are e4m3fn's NaN
    if not bool(torch.isfinite(finite).all()):
        raise ValueError(f"nvfp4_scale_lut: global scale {float(gs)} is too small for the kernel's scale table")
    return lut
