"""Train-rollout mismatch: how far the sampling policy (rollout engine) is from the trained policy.

Over the sampled (response) tokens, with ``r = logp_train - logp_rollout`` per token:

    mean/max |r|           the headline figure the published low-precision runs log per step
    k3 = E[exp(r) - 1 - r] an unbiased, non-negative estimate of KL(pi_rollout || pi_train) from samples
                           drawn by the rollout policy (Schulman's k3)
    ratio = exp(r)         the importance ratio pi_train / pi_rollout, summarized by quantiles

Correction (importance weights on the policy-gradient loss, detached):
    TIS: w = min(ratio, C)                          truncated importance sampling (Yao et al.)
    MIS: w = ratio if 1/C <= ratio <= C else 0      masked importance sampling: drop tokens whose
                                                    sampler and learner disagree too much
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if x.shape != mask.shape:
        raise ValueError(f"mismatch: values {tuple(x.shape)} and mask {tuple(mask.shape)} differ in shape")
    return x[mask.bool()]


def quantiles(x: torch.Tensor, qs: tuple[float, ...]) -> list[float]:
    """``torch.quantile``'s linear interpolation by one sort: any length (torch.quantile stops at 2^24
    elements, a long-context step's worth of tokens) and any device."""
    s = x.flatten().sort().values
    out = []
    for q in qs:
        pos = q * (s.numel() - 1)
        lo = int(pos)
        hi = min(lo + 1, s.numel() - 1)
        out.append(float(s[lo] + (s[hi] - s[lo]) * (pos - lo)))
    return out


def mismatch_metrics(logp_train: torch.Tensor, logp_rollout: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Per-step mismatch figures over the tokens where ``mask`` is true (any shape, e.g. [B, T])."""
    r = _masked(logp_train.detach().float() - logp_rollout.detach().float(), mask)
    if r.numel() == 0:
        raise ValueError("mismatch_metrics: mask selects no tokens")
    ratio = r.exp()
    q = quantiles(ratio, (0.01, 0.5, 0.99))
    return {
        "mismatch_abs_mean": float(r.abs().mean()),
        "mismatch_abs_max": float(r.abs().max()),
        "mismatch_k3": float((ratio - 1 - r).mean()),
        "is_ratio_mean": float(ratio.mean()),
        "is_ratio_min": float(ratio.min()),
        "is_ratio_max": float(ratio.max()),
        "is_ratio_p01": float(q[0]),
        "is_ratio_p50": float(q[1]),
        "is_ratio_p99": float(q[2]),
        "tokens": float(r.numel()),
    }


@dataclass(frozen=True)
class ISConfig:
    mode: str | None = None
    "None (off), 'tis' (truncate ratios at cap) or 'mis' (mask tokens with ratio outside [1/cap, cap])"
    cap: float = 2.0
    "C: truncation / masking threshold"

    def __post_init__(self):
        if self.mode not in (None, "tis", "mis"):
            raise ValueError(f"IS mode must be None, 'tis' or 'mis', got {self.mode!r}")
        if not self.cap > 1.0:
            raise ValueError(f"IS cap must be > 1, got {self.cap}")


def importance_weights(
    logp_train: torch.Tensor, logp_rollout: torch.Tensor, mask: torch.Tensor, cfg: ISConfig
) -> tuple[torch.Tensor, dict[str, float]]:
    """Detached per-token weights (same shape as the inputs) and the fraction of tokens clipped/masked."""
    ratio = (logp_train.detach().float() - logp_rollout.detach().float()).exp()
    m = mask.bool()
    if cfg.mode is None:
        return torch.ones_like(ratio), {"is_clipped_frac": 0.0}
    if cfg.mode == "tis":
        clipped = (ratio > cfg.cap) & m
        w = ratio.clamp(max=cfg.cap)
    else:
        clipped = ((ratio > cfg.cap) | (ratio < 1.0 / cfg.cap)) & m
        w = torch.where(clipped, torch.zeros_like(ratio), ratio)
    frac = float(clipped.sum()) / max(1, int(m.sum()))
    return w * m, {"is_clipped_frac": frac}
