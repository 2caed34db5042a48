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
from quantrl.formats.nvfp4 import dequantize_nvfp4, pack_nvfp4, unpack_nvfp4


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
# NVFP4 (formats.nvfp4): the same word transpose with the nibbles rearranged, plus a per-layer decode table
# ------------------------------------------------------------------------------------------------------
# Checkpoint: ``weight_packed`` uint8 [N, K/2] (element 2i in the low nibble of byte i) and e4m3
# ``weight_scale`` [N, K/16]. Four bytes, read as a little-endian int32, hold codes c_0..c_7 of k = 8w..8w+7
# (code j in bits 4j..4j+3: magnitude index a_j = c_j & 7, sign s_j = c_j >> 3).
#
# The decode table. The weight is ``dtype(fp32(e2m1 * (fp32(s) / gs)))``; a group's e4m3 byte b has 256
# values and a code's magnitude 8, so a layer's every weight magnitude is one of 256 x 8 numbers. They are
# computed once per load by ``formats.dequantize_nvfp4`` itself (so they are formats' numbers by
# construction, rounding and subnormals included) in bf16 and in fp16: ``table`` int32 [2, 256, 4], row
# [d, b] the 16-byte entry of byte b in dtype d (0 bf16, 1 fp16): the low bytes of magnitudes 0..7, then
# their high bytes. A negative code is the same entry with its sign bit flipped (IEEE rounding is
# symmetric), so the kernel decodes with byte permutes (``prmt``) and no float arithmetic at all.
#
# The kernel word. ``prmt`` takes 4 byte selectors from the low 16 bits of a register, 3 index bits per
# nibble with the nibble's bit 3 clear, and a bf16x2 pair holds codes (j, j + 4) (what the GEMMs' join
# expects), so the repack rearranges each word's bits (a bit permutation, exactly reversible):
#     nibble i of the kernel word:  magnitude a[MAG_AT[i]] in bits 0..2, sign s[SIGN_AT[i]] in bit 3
# With m = word & 0x77777777, the selectors m (nibbles a0 a4 a1 a5) and m >> 16 (a2 a6 a3 a7) pick the low
# and high bytes of four weights each, the signs of the first four are ``word & 0x80808080`` and those of
# the others ``(word << 4) & 0x80808080``, exactly the high bytes' sign bits, and two more permutes per
# four weights interleave low and high bytes into the pairs (c0, c4), (c1, c5), (c2, c6), (c3, c7).
# ``qweight_t`` int32 [K/8, N] is the transposed kernel words. The scale bytes travel as int32 words,
# ``scale_t`` int32 [ceil(K/64), N], byte j of word [r, n] the e4m3 bits of group 4r + j of column n (zero
# bytes pad the last word): the kernel loads them in the weight words' layout (Triton gives 8-bit tiles
# another layout, converted through shared memory with barriers, in the hot loop) and takes the byte with
# a shift; the bytes and their count are unchanged.
NVFP4_MAG_AT = (0, 4, 1, 5, 2, 6, 3, 7)
NVFP4_SIGN_AT = (2, 0, 6, 4, 3, 1, 7, 5)
NVFP4_TABLE_DTYPES = (torch.bfloat16, torch.float16)


def _codes_per_word(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] -> uint8 nibbles [N, K/8, 8] in word order (nibble j of each little-endian int32)."""
    return unpack_nvfp4(packed).view(packed.shape[0], -1, 8)


def _kernel_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Checkpoint codes [..., 8] of each word -> the kernel word's nibbles [..., 8] (``NVFP4_MAG_AT``)."""
    mag, sign = codes & 7, codes >> 3
    return mag[..., list(NVFP4_MAG_AT)] | (sign[..., list(NVFP4_SIGN_AT)] << 3)


def _checkpoint_codes(nibbles: torch.Tensor) -> torch.Tensor:
    """Inverse of ``_kernel_nibbles``."""
    codes = torch.empty_like(nibbles)
    codes[..., list(NVFP4_MAG_AT)] = nibbles & 7
    sign = torch.empty_like(nibbles)
    sign[..., list(NVFP4_SIGN_AT)] = nibbles >> 3
    return codes | (sign << 3)


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
    nibbles = _kernel_nibbles(_codes_per_word(weight_packed))  # [N, K/8, 8]
    words = pack_nvfp4(nibbles.view(n, -1)).view(torch.int32)  # [N, K/8]
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
    kernel_bytes = qweight_t.t().contiguous().view(torch.uint8)  # [N, K/2]
    n = kernel_bytes.shape[0]
    packed = pack_nvfp4(_checkpoint_codes(_codes_per_word(kernel_bytes)).view(n, -1))
    groups = qweight_t.shape[0] // 2
    scale = scale_t.t().contiguous().view(torch.uint8)[:, :groups].contiguous()
    return packed, scale.view(torch.float8_e4m3fn)


def nvfp4_decode_table(global_scale: torch.Tensor) -> torch.Tensor:
    """int32 [2, 256, 4] on global_scale's device: for bf16 (0) and fp16 (1) and every e4m3 byte b, the
    weights of magnitudes 0..7 under scale b, ``formats.dequantize_nvfp4``'s numbers, as their 8 low bytes
    then their 8 high bytes (the kernel's ``prmt`` tables)."""
    if global_scale.numel() != 1 or not global_scale.is_floating_point():
        raise ValueError(f"nvfp4_decode_table: global scale must be one float, got {global_scale.dtype} "
                         f"{tuple(global_scale.shape)}")  # fmt: skip
    dev = global_scale.device
    codes = torch.zeros(256, 16, dtype=torch.uint8, device=dev)  # one group per scale byte
    codes[:, :8] = torch.arange(8, dtype=torch.uint8, device=dev)
    scales = torch.arange(256, dtype=torch.int32, device=dev).to(torch.uint8).view(torch.float8_e4m3fn)[:, None]
    out = []
    for dtype in NVFP4_TABLE_DTYPES:
        w = dequantize_nvfp4(codes, scales, global_scale, dtype)[:, :8].contiguous().view(torch.uint8)  # [256, 16]
        out.append(torch.cat((w[:, 0::2], w[:, 1::2]), dim=1).view(torch.int32))  # low bytes, high bytes
    return torch.stack(out)
