"""GRPO: group-normalized advantages and the PPO-clipped policy loss (as in slime / verl, written for quantrl).

Advantages. Rewards ``r [B]`` come as ``B = prompts x n`` samples, the ``n`` samples of a prompt contiguous.
Per group ``g``:

    A_i = (r_i - mean_g(r)) / (std_g(r) + eps)      normalize_std=True  (GRPO)
    A_i =  r_i - mean_g(r)                          normalize_std=False (Dr. GRPO / REINFORCE baseline)
    A_i =  r_i - mean_{j != i} r_j                  leave_one_out=True  (RLOO: n/(n-1) (r_i - mean_g(r)))

``ADVANTAGE_ESTIMATORS`` names the three (``--advantage-estimator grpo | dr-grpo | rloo``).

``std_g`` is the *unbiased* (Bessel, ``N-1``) standard deviation, ``torch.std``'s default: slime's
``_post_process_rewards`` and verl's ``compute_grpo_outcome_advantage`` both call ``torch.std`` with no
argument, so advantages match theirs number for number. A group whose rewards are all equal (and a
group of one sample) gets advantage exactly 0: it carries no signal, and ``(r - mean) / (0 + eps)`` would
turn the float rounding of ``mean`` into a spurious +-1e-2. ``informative_groups`` names those with a
signal, for DAPO's dynamic sampling (``--dynamic-sampling``: such groups are dropped and more prompts sampled).

Policy loss. Per response token t (``mask`` = 1), with ``A`` the advantage of the token's sequence:

    ratio_t = exp(logp_t - old_logp_t)                                                  token level (GRPO, PPO)
    ratio_t = sg[exp(mean_s (logp_s - old_logp_s))] * exp(logp_t - sg[logp_t])         sequence level (GSPO)
    pg_t    = max(-A * ratio_t, -A * clamp(ratio_t, 1 - clip_eps, 1 + clip_eps_high))   PPO clip; DAPO clip-higher
    w_t     = is_weight_t                                                               TIS / MIS, detached (1 if off)
    kl_t    = min(exp(ref_t - logp_t) - (ref_t - logp_t) - 1, 10)                       k3 estimator of KL(pi||ref)
    H_t     = -sum_v p_t(v) log p_t(v)                                                  entropy of the next-token policy
    loss_t  = w_t * pg_t + kl_coef * kl_t - entropy_coef * H_t

``old_logp`` is the trainer's own logprob of the sampled tokens before this update (equal to ``logp``
detached when each rollout batch is used for one optimizer step). ``is_weight`` is the train-rollout
mismatch correction (``rl.mismatch.importance_weights`` of ``old_logp`` against the logprobs the FP8/INT4
engine reported while sampling, computed once per step): as in slime's TIS it multiplies the per-token
surrogate, not the ratio inside the clip. The k3 term is clamped at 10 like verl's / slime's
``low_var_kl``, so one wild token cannot dominate the step.

GSPO (``ratio_level="sequence"``, ``--advantage-estimator gspo``) clips the sequence's geometric-mean ratio
``s_i`` instead of each token's: the token form above has the value ``s_i`` on every token of sequence i and
the gradient ``s_i * grad logp_t``, so under token-mean aggregation it is slime's GSPO loss exactly, and a
clipped sequence stops all of its tokens. Its ratios sit near 1 (a mean over the sequence), so GSPO's clip
ranges are ~1e-3 (the paper: 3e-4 below, 4e-4 above), not PPO's 0.2.

Aggregation over tokens:

    token-mean            sum_{i,t} mask * loss_t / sum_{i,t} mask                 (DAPO, slime default)
    seq-mean-token-mean   mean_i [ sum_t mask * loss_t / sum_t mask ]   over rows with >= 1 token (GRPO paper)
    token_sum=True        sum_{i,t} mask * loss_t    (for ``Trainer.train_step``: it divides by the batch's
                          total loss tokens, so token-mean is exact however the batch is micro-batched)

Tensor alignment: every logprob tensor is ``[B, T-1]`` as ``train.logprobs.token_logprobs`` returns it
(position t scores ``input_ids[:, t+1]``), and ``mask`` is ``loss_mask[:, 1:]``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from quantrl.train.logprobs import token_logprobs

AGGREGATIONS = ("token-mean", "seq-mean-token-mean")
RATIO_LEVELS = ("token", "sequence")
KL_CLAMP = 10.0  # verl / slime low_var_kl clamp


ADVANTAGE_ESTIMATORS = {"grpo": {}, "dr-grpo": {"normalize_std": False},
                        "rloo": {"normalize_std": False, "leave_one_out": True}, "gspo": {}}  # fmt: skip
RATIO_LEVEL_OF_ESTIMATOR = {"gspo": "sequence"}  # GSPO: GRPO's advantages, the sequence-level ratio


def group_advantages(
    rewards: torch.Tensor, n: int, *, normalize_std: bool = True, eps: float = 1e-6, unbiased: bool = True,
    leave_one_out: bool = False,
) -> torch.Tensor:
    """GRPO advantages ``[B]`` (fp32) for rewards ``[B]`` in contiguous groups of ``n`` (see the module note)."""
    if rewards.ndim != 1:
        raise ValueError(f"group_advantages: rewards must be 1-D [prompts * n], got shape {tuple(rewards.shape)}")
    if n <= 0 or rewards.numel() % n:
        raise ValueError(f"group_advantages: {rewards.numel()} rewards do not split into groups of n={n}")
    r = rewards.detach().float().view(-1, n)
    if not torch.isfinite(r).all():
        raise ValueError("group_advantages: rewards contain NaN or Inf")
    adv = r - r.mean(dim=1, keepdim=True)
    if leave_one_out and n > 1:  # the baseline of each sample is the mean of the others
        adv = adv * (n / (n - 1))
    if normalize_std and n > 1:
        adv = adv / (r.std(dim=1, keepdim=True, correction=1 if unbiased else 0) + eps)
    constant = ~informative_groups(rewards, n)[:, None]  # no signal: exactly zero, not rounding noise
    return adv.masked_fill(constant, 0.0).view(-1)


def informative_groups(rewards: torch.Tensor, n: int) -> torch.Tensor:
    """[prompts] bool: the groups of ``n`` contiguous rewards that are not all equal (slime's
    ``check_reward_nonzero_std``): only they have nonzero advantages, so only they carry a gradient."""
    r = rewards.detach().view(-1, n)
    return (r != r[:, :1]).any(dim=1)


def _k3(ref_logp: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    d = ref_logp.float() - logp
    return (d.exp() - d - 1).clamp(max=KL_CLAMP)


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    is_weight: torch.Tensor | None = None,
    ratio_level: str = "token",
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    aggregation: str = "token-mean",
    token_sum: bool = False,
) -> tuple[torch.Tensor, dict[str, float]]:
    """GRPO/PPO loss (scalar, differentiable in ``logp``) and metrics; the formula is in the module note.

    Metrics are means over masked tokens: ``pg_clipfrac`` (tokens where the clipped branch is taken),
    ``approx_kl`` (mean ``old_logp - logp``, slime's / verl's ``ppo_kl``), ``ratio_mean`` (at ``ratio_level``),
    ``pg_loss``, ``kl_ref`` (mean k3) when ``ref_logp`` is given, and
    ``entropy`` when ``entropy`` [B, T] (the policy's, differentiable when ``entropy_coef`` > 0) is.
    With ``token_sum=True`` the loss is the masked *sum* and each metric ``m`` becomes ``m_sum`` (mean x
    tokens) next to ``loss_tokens``, so values summed over micro-batches turn into batch means with
    :func:`reduce_metrics`.
    """
    if logp.ndim != 2:
        raise ValueError(f"policy_loss: logp must be [B, T], got shape {tuple(logp.shape)}")
    for name, t in (("old_logp", old_logp), ("mask", mask), ("is_weight", is_weight), ("ref_logp", ref_logp),
                    ("entropy", entropy)):  # fmt: skip
        if t is not None and t.shape != logp.shape:
            raise ValueError(f"policy_loss: {name} has shape {tuple(t.shape)}, logp has {tuple(logp.shape)}")
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"policy_loss: advantages must be [B]={logp.shape[0]}, got shape {tuple(advantages.shape)}")
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"policy_loss: aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    if token_sum and aggregation != "token-mean":
        # a per-sequence mean cannot be rebuilt from per-micro-batch token sums
        raise ValueError("policy_loss: token_sum=True needs aggregation='token-mean'")
    clip_eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    if not (0 < clip_eps < 1 and clip_eps_high > 0):
        raise ValueError(f"policy_loss: need 0 < clip_eps < 1 and clip_eps_high > 0, got {clip_eps}, {clip_eps_high}")
    if ratio_level not in RATIO_LEVELS:
        raise ValueError(f"policy_loss: ratio_level must be one of {RATIO_LEVELS}, got {ratio_level!r}")

    m = mask.float()
    logp = logp.float()
    old = old_logp.detach().float()
    adv = advantages.detach().float().unsqueeze(1)  # [B, 1]
    log_ratio = logp - old
    if ratio_level == "sequence":  # GSPO-token: the value of the sequence's mean log ratio, each token's gradient
        seq = (log_ratio.detach() * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp(min=1)  # [B, 1]
        log_ratio = seq + logp - logp.detach()
    ratio = log_ratio.exp()
    pg1 = -adv * ratio
    pg2 = -adv * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps_high)
    pg = torch.maximum(pg1, pg2)
    if is_weight is not None:
        pg = pg * is_weight.detach().float()
    per_token = pg
    kl = None
    if ref_logp is not None:
        kl = _k3(ref_logp.detach(), logp)
        if kl_coef:
            per_token = per_token + kl_coef * kl
    elif kl_coef:
        raise ValueError("policy_loss: kl_coef > 0 needs ref_logp")
    if entropy_coef and entropy is None:
        raise ValueError("policy_loss: entropy_coef > 0 needs the entropy")
    if entropy_coef:
        per_token = per_token - entropy_coef * entropy.float()

    tokens = m.sum()
    if token_sum or aggregation == "token-mean":
        loss = (per_token * m).sum()
        if not token_sum:
            loss = loss / tokens.clamp(min=1)
    else:
        row_tokens = m.sum(1)
        rows = row_tokens > 0
        seq = (per_token * m).sum(1)[rows] / row_tokens[rows]
        loss = seq.mean() if seq.numel() else (per_token * m).sum()  # no tokens: a zero that keeps the graph

    with torch.no_grad():
        n_tok = float(tokens)

        def mean(x: torch.Tensor) -> float:
            return float((x * m).sum()) / max(n_tok, 1.0)

        metrics = {
            "pg_loss": mean(pg),
            "pg_clipfrac": mean((pg2 > pg1).float()),
            "approx_kl": mean(-log_ratio),
            "ratio_mean": mean(ratio),
        }
        if kl is not None:
            metrics["kl_ref"] = mean(kl)
        if entropy is not None:
            metrics["entropy"] = mean(entropy.float())
    if token_sum:
        metrics = {f"{k}_sum": v * n_tok for k, v in metrics.items()}
        metrics["loss_tokens"] = n_tok
    return loss, metrics


def reduce_metrics(sums: dict[str, float]) -> dict[str, float]:
    """Turn token-weighted sums (``m_sum`` + ``loss_tokens``, e.g. as ``Trainer.train_step`` adds them up over
    micro-batches) into batch means ``m``; other keys pass through."""
    tokens = sums.get("loss_tokens")
    if tokens is None:
        raise KeyError("reduce_metrics: no 'loss_tokens' (were the metrics made with token_sum=True?)")
    out = {k: v for k, v in sums.items() if not k.endswith("_sum")}
    for k, v in sums.items():
        if k.endswith("_sum"):
            out[k[: -len("_sum")]] = v / max(tokens, 1.0)
    return out


@dataclass(frozen=True)
class GRPOConfig:
    clip_eps: float = 0.2
    "PPO clip range below 1 (slime --eps-clip)"
    clip_eps_high: float | None = None
    "PPO clip range above 1, DAPO clip-higher, e.g. 0.28 (slime --eps-clip-high); None: clip_eps"
    ratio_level: str = "token"
    "the PPO ratio per token (GRPO) or per sequence (GSPO; clip ranges ~1e-3)"
    kl_coef: float = 0.0
    "weight of the k3 KL to the reference policy (slime --kl-loss-coef); needs ref_logp in the batch"
    entropy_coef: float = 0.0
    "weight of the entropy bonus (slime --entropy-coef); the entropy is measured and logged either way"
    temperature: float = 1.0
    "sampling temperature: logits are divided by it, so logp is the same quantity the engine reported"
    pack: bool = False
    "run each micro-batch's sequences packed into as few rows as fit (quantrl.train.packing)"

    def __post_init__(self):
        if not 0 < self.clip_eps < 1:
            raise ValueError(f"clip_eps must be in (0, 1), got {self.clip_eps}")
        if self.clip_eps_high is not None and self.clip_eps_high <= 0:
            raise ValueError(f"clip_eps_high must be > 0, got {self.clip_eps_high}")
        if self.kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {self.kl_coef}")
        if self.entropy_coef < 0:
            raise ValueError(f"entropy_coef must be >= 0, got {self.entropy_coef}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.ratio_level not in RATIO_LEVELS:
            raise ValueError(f"ratio_level must be one of {RATIO_LEVELS}, got {self.ratio_level!r}")


LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, float]]]


def make_loss_fn(cfg: GRPOConfig = GRPOConfig()) -> LossFn:
    """A ``loss_fn(model, micro_batch)`` for ``Trainer.train_step`` (token_sum mode; token-mean over the batch).

    Micro-batch keys: ``input_ids``, ``attention_mask``, ``loss_mask`` ``[B, T]`` (1 on response tokens;
    position 0 is never a target), ``advantages [B]``; optional ``[B, T-1]`` logprobs aligned with
    ``input_ids[:, 1:]``: ``old_logp`` (absent: ``logp.detach()``, exact for one update per rollout batch),
    ``is_weight`` (the mismatch correction, ``rl.mismatch.importance_weights``), ``ref_logp`` (needed when
    kl_coef > 0); ``routing`` ``[B, T, L_moe, k]`` (MoE routing replay). Pass the summed metrics of
    ``train_step`` through :func:`reduce_metrics`.
    """

    def loss_fn(model: nn.Module, micro: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        if micro["loss_mask"][:, 0].any():
            # the trainer divides by loss_mask.sum() over [B, T]; a first-position token has no logprob
            raise ValueError("GRPO loss_fn: loss_mask[:, 0] must be 0 (the first token is never predicted)")
        logp, entropy = token_logprobs(model, micro["input_ids"], micro["attention_mask"], temperature=cfg.temperature,
                                       with_entropy=True, entropy_grad=cfg.entropy_coef > 0,
                                       routing=micro.get("routing"), pack=cfg.pack)  # fmt: skip
        old = micro.get("old_logp")
        return policy_loss(
            logp,
            logp.detach() if old is None else old,
            micro["advantages"],
            micro["loss_mask"][:, 1:],
            clip_eps=cfg.clip_eps,
            clip_eps_high=cfg.clip_eps_high,
            is_weight=micro.get("is_weight"),
            ratio_level=cfg.ratio_level,
            ref_logp=micro.get("ref_logp"),
            kl_coef=cfg.kl_coef,
            entropy=entropy,
            entropy_coef=cfg.entropy_coef,
            token_sum=True,
        )

    return loss_fn
