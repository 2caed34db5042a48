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
