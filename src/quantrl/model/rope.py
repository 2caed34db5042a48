"""Rotary position embeddings, computed the way transformers computes them (fp32 frequencies, the
``rotate_half`` convention), so that logits match HF to fp32 rounding.

Llama-3 scaling keeps high-frequency dimensions (wavelength < L/high_freq_factor), divides the
low-frequency ones (wavelength > L/low_freq_factor) by ``factor``, and interpolates linearly in between,
L being the pre-training context.

YaRN (Qwen3's long-context scaling, DeepSeek-V3) blends, per dimension, the extrapolated frequency
(kept) and the interpolated one (divided by ``factor``) with a linear ramp between the dimensions that
make ``beta_fast`` and ``beta_slow`` rotations over L, and multiplies cos and sin by ``attention_factor``.

DeepSeek's MLA rotates interleaved pairs (x0, x1), (x2, x3), ... rather than the two halves of a head
(``apply_rope_interleaved``, transformers' ``apply_rotary_pos_emb_interleave``).
"""

from __future__ import annotations

import math

import torch

from quantrl.model.config import RopeConfig


def inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """fp32 [head_dim / 2] inverse frequencies (HF's formula, bit for bit)."""
    base = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float) / head_dim))
    if rope.rope_type == "default":
        return base
    if rope.rope_type == "linear":
        return base / rope.factor
    if rope.rope_type == "yarn":
        return _yarn_inv_freq(rope, head_dim)
    old = rope.original_max_position_embeddings
    low_wavelen, high_wavelen = old / rope.low_freq_factor, old / rope.high_freq_factor
    wavelen = 2 * math.pi / base
    scaled = torch.where(wavelen > low_wavelen, base / rope.factor, base)
    smooth = (old / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn_inv_freq(rope: RopeConfig, dim: int) -> torch.Tensor:
    """transformers' ``_compute_yarn_parameters``, step for step (so the bits agree)."""
    base, old = rope.theta, rope.original_max_position_embeddings

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(old / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: no zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    extrapolation = 1 - ramp
    return (1.0 / (rope.factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation


def rope_cos_sin(freqs: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype,
                 attention_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """positions [...] (int) -> cos, sin [..., head_dim] in ``dtype`` (angles in fp32, like HF; YaRN's
    ``attention_factor`` multiplies both in fp32)."""
    angles = positions[..., None].float() * freqs.to(positions.device)  # [..., D/2]
    emb = torch.cat((angles, angles), dim=-1)  # [..., D]
    cos, sin = emb.cos(), emb.sin()
    if attention_factor != 1.0:
        cos, sin = cos * attention_factor, sin * attention_factor
    return cos.to(dtype), sin.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D], cos/sin [B, T, D] -> rotated x (in x's dtype, as HF)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, T, D]: broadcast over heads
    return x * cos + _rotate_half(x) * sin


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """As ``apply_rope``, on interleaved pairs: out = [x_even cos - x_odd sin, x_odd cos + x_even sin]
    (the rotated halves come out de-interleaved, as transformers lays them out)."""
    half = cos.shape[-1] // 2
    cos, sin = cos[..., :half].unsqueeze(1), sin[..., :half].unsqueeze(1)  # [B, 1, T, D/2]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
