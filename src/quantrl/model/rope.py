"""Rotary position embeddings, computed the way transformers computes them (fp32 frequencies, the
``rotate_half`` convention), so that logits match HF to fp32 rounding.

Llama-3 scaling keeps high-frequency dimensions (wavelength < L/high_freq_factor), divides the
low-frequency ones (wavelength > L/low_freq_factor) by ``factor``, and interpolates linearly in between,
L being the pre-training context.
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
    old = rope.original_max_position_embeddings
    low_wavelen, high_wavelen = old / rope.low_freq_factor, old / rope.high_freq_factor
    wavelen = 2 * math.pi / base
    scaled = torch.where(wavelen > low_wavelen, base / rope.factor, base)
    smooth = (old / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(freqs: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [...] (int) -> cos, sin [..., head_dim] in ``dtype`` (angles in fp32, like HF)."""
    angles = positions[..., None].float() * freqs.to(positions.device)  # [..., D/2]
    emb = torch.cat((angles, angles), dim=-1)  # [..., D]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D], cos/sin [B, T, D] -> rotated x (in x's dtype, as HF)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, T, D]: broadcast over heads
    return x * cos + _rotate_half(x) * sin
