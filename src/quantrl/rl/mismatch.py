"""Train-rollout mismatch: how far the sampling policy (rollout engine) is from the trained policy.

Over the sampled (response) tokens, with ``r = logp_train - logp_rollout`` per token:

    mean/max |r|           the headline figure the published low-precision runs log per step
    k3 = E[exp(r) - 1 - r] an unbiased, non-negative estimate of KL(pi_rollout || pi_train) from samples
                           drawn by the rollout policy (Schulman's k3)
    ratio = exp(r)         the importance ratio pi_train / pi_rollout, summarized by quantiles
    |sum_t r|, |mean_t r|  per sequence: the log of the sequence's ratio and its per-token (geometric) mean

Correction: detached weights on the policy-gradient term, from the ratio at one of three levels

    token       rho_t = exp(r_t)                          one weight per token (Yao et al.'s TIS)
    sequence    rho_t = exp(sum_s r_s)                    the sequence's likelihood ratio, on all its tokens
    geometric   rho_t = exp(mean_s r_s)                   its per-token geometric mean (length-free)

shaped by the mode, with bounds [L, U] (``cap_low``, ``cap``; L = 1/U unless given):

    tis    w = min(rho, U)                                truncated importance sampling
    clip   w = clamp(rho, L, U)                           two-sided truncation
    mis    w = rho if L <= rho <= U else 0                masked importance sampling

then rejection sampling, which keeps the weight but drops what it rejects (w = 0): tokens, or whole
sequences (sequence / geometric level), whose ratio at ``rs_level`` lies outside ``[rs_cap_low, rs_cap]``,
and with the veto every sequence holding one token whose ratio is below ``veto`` (a token the trainer
finds vastly less likely than the sampler did: one such token is enough to distrust the whole sample).
``batch_normalize`` finally scales the weights to mean 1 over what has a nonzero weight: tokens at token
level, sequences otherwise (self-normalized IS), so the correction moves the direction, not the step size.
These are the options of slime's / Miles' MIS helper and of verl's rollout correction. A sequence ratio
is a product over hundreds of tokens, so its log is clamped at +-20 before ``exp``: a finite weight that
truncation or masking then decides, never inf.

Weights are computed once per step, over the whole batch (every data-parallel replica's rows with a
summing ``reduce``), before it is cut into micro-batches: batch normalization sees the step, not a slice.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

IS_MODES = ("tis", "clip", "mis")
IS_LEVELS = ("token", "sequence", "geometric")
LOG_RATIO_BOUND = 20.0  # exp(20) = 4.9e8: far past any cap, still finite in fp32


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
    """Per-step mismatch figures over the tokens where ``mask`` is true (any shape, e.g. [B, T]; the
    per-sequence figures need rows, [B, T], and cover the rows with at least one token)."""
    d = logp_train.detach().float() - logp_rollout.detach().float()
    r = _masked(d, mask)
    if r.numel() == 0:
        raise ValueError("mismatch_metrics: mask selects no tokens")
    ratio = r.exp()
    q = quantiles(ratio, (0.01, 0.5, 0.99))
    out = {
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
    if d.ndim == 2:
        m = mask.float()
        rows = m.sum(1) > 0
        seq = (d * m).sum(1)[rows]
        out["mismatch_seq_abs_mean"] = float(seq.abs().mean())
        out["mismatch_geo_abs_mean"] = float((seq / m.sum(1)[rows]).abs().mean())
    return out


@dataclass(frozen=True)
class ISConfig:
    mode: str | None = None
    "None (no weights), 'tis' (min(rho, cap)), 'clip' (clamp(rho, cap_low, cap)) or 'mis' (0 outside [cap_low, cap])"
    cap: float = 2.0
    "U: the upper bound of the weights"
    cap_low: float | None = None
    "L: the lower bound of 'clip' / 'mis'; None: 1 / cap"
    level: str = "token"
    "where rho is taken: 'token', 'sequence' (product over the sequence) or 'geometric' (its per-token mean)"
    rs_level: str | None = None
    "rejection sampling: None (off) or the level whose ratio outside [rs_cap_low, rs_cap] drops the token / sequence"
    rs_cap: float | None = None
    "rejection upper bound; None: cap"
    rs_cap_low: float | None = None
    "rejection lower bound; None: 1 / rs_cap"
    veto: float = 0.0
    "reject every sequence with a token whose ratio is below this (0: off; e.g. 1e-4)"
    batch_normalize: bool = False
    "scale the kept weights to mean 1 over the step (tokens at token level, sequences otherwise)"

    def __post_init__(self):
        if self.mode not in (None, *IS_MODES):
            raise ValueError(f"IS mode must be None or one of {IS_MODES}, got {self.mode!r}")
        for name in ("level", "rs_level"):
            v = getattr(self, name)
            if v not in IS_LEVELS and not (name == "rs_level" and v is None):
                raise ValueError(f"IS {name} must be one of {IS_LEVELS}, got {v!r}")
        lo, hi = self.bounds
        if not hi > 1.0 or not 0 < lo < 1.0:
            raise ValueError(f"IS cap must be > 1 and cap_low in (0, 1), got cap={self.cap}, cap_low={self.cap_low}")
        lo, hi = self.rs_bounds
        if not hi > 1.0 or not 0 < lo < 1.0:
            raise ValueError(f"rejection bounds need rs_cap > 1 and rs_cap_low in (0, 1), got {self.rs_cap}, "
                             f"{self.rs_cap_low}")  # fmt: skip
        if not 0 <= self.veto < 1:
            raise ValueError(f"veto threshold must be in [0, 1), got {self.veto}")
        if self.batch_normalize and self.mode is None:
            raise ValueError("batch_normalize normalizes importance weights: it needs an IS mode")

    @property
    def bounds(self) -> tuple[float, float]:
        return (1.0 / self.cap if self.cap_low is None else self.cap_low), self.cap

    @property
    def rs_bounds(self) -> tuple[float, float]:
        hi = self.cap if self.rs_cap is None else self.rs_cap
        return (1.0 / hi if self.rs_cap_low is None else self.rs_cap_low), hi

    @property
    def active(self) -> bool:
        """Whether any weight can differ from 1 (else the correction is skipped)."""
        return self.mode is not None or self.rs_level is not None or self.veto > 0


def level_ratio(log_ratio: torch.Tensor, mask: torch.Tensor, level: str) -> torch.Tensor:
    """``rho`` [B, T] at ``level`` for per-token log ratios [B, T]: exp of the token's own, or of its row's
    sum or mean over masked tokens on every token of the row (the log clamped at +-LOG_RATIO_BOUND)."""
    if level != "token":
        m = mask.float()
        s = (log_ratio * m).sum(1, keepdim=True)  # [B, 1]
        if level == "geometric":
            s = s / m.sum(1, keepdim=True).clamp(min=1)
        log_ratio = s.expand_as(log_ratio)
    return log_ratio.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND).exp()


def importance_weights(
    logp_train: torch.Tensor,
    logp_rollout: torch.Tensor,
    mask: torch.Tensor,
    cfg: ISConfig,
    reduce: Callable[[list[float]], list[float]] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Detached weights [B, T] (0 off the mask; the formulas are in the module note) and the step's
    ``is_clipped_frac`` (tokens whose weight truncation / clipping / masking changed), ``rs_rejected_frac``
    (tokens rejection or the veto dropped) and ``is_weight_mean`` (over the tokens with a nonzero weight,
    before normalization). ``reduce`` sums lists of floats over data-parallel replicas, so fractions and the
    normalization cover the whole step's batch."""
    if logp_train.ndim != 2 or logp_train.shape != logp_rollout.shape or mask.shape != logp_train.shape:
        raise ValueError(f"importance_weights: need equal [B, T] logprobs and mask, got {tuple(logp_train.shape)}, "
                         f"{tuple(logp_rollout.shape)}, {tuple(mask.shape)}")  # fmt: skip
    m = mask.bool()
    if not cfg.active:
        return m.float(), {"is_clipped_frac": 0.0}
    log_ratio = logp_train.detach().float() - logp_rollout.detach().float()
    rho = level_ratio(log_ratio, m, cfg.level)
    lo, hi = cfg.bounds
    outside = (rho > hi) | (rho < lo)
    if cfg.mode == "tis":
        w, changed = rho.clamp(max=hi), rho > hi
    elif cfg.mode == "clip":
        w, changed = rho.clamp(lo, hi), outside
    elif cfg.mode == "mis":
        w, changed = torch.where(outside, torch.zeros_like(rho), rho), outside
    else:
        w, changed = torch.ones_like(rho), torch.zeros_like(m)
    keep = m.clone()
    if cfg.rs_level is not None:
        rs_lo, rs_hi = cfg.rs_bounds
        rs_rho = level_ratio(log_ratio, m, cfg.rs_level)
        keep &= (rs_rho >= rs_lo) & (rs_rho <= rs_hi)
    if cfg.veto > 0:
        vetoed = ((log_ratio < math.log(cfg.veto)) & m).any(dim=1, keepdim=True)  # [B, 1]
        keep &= ~vetoed
    w = w * keep
    live = w > 0  # what the step learns from: neither rejected nor masked
    # the units normalization averages over: kept tokens, or (sequence levels) sequences, one weight each
    units, unit_w = (live.any(1), w.amax(1)) if cfg.level != "token" else (live, w)
    sums = torch.stack([t.sum().double() for t in (m, changed & m, m & ~keep, live, w, units, unit_w)]).tolist()
    n_tok, n_changed, n_rejected, n_live, live_w, n_units, units_w = sums if reduce is None else reduce(sums)
    if cfg.batch_normalize and units_w > 0:
        w = w * (n_units / units_w)
    denom = max(n_tok, 1.0)
    return w, {"is_clipped_frac": n_changed / denom, "rs_rejected_frac": n_rejected / denom,
               "is_weight_mean": live_w / max(n_live, 1.0)}  # fmt: skip
