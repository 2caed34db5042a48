"""Per-token logprobs and entropies of given sequences under the trainer's model.

For ``input_ids [B, T]`` with ``attention_mask [B, T]`` (left or right padding), position t's logits
predict token t+1, so results are ``[B, T-1]`` aligned with ``input_ids[:, 1:]`` and zeroed where that
target, or the token predicting it, is padding. ``temperature`` divides the logits first: the rollout engine reports logprobs of the
temperature-scaled policy, and the two must be the same quantity for mismatch and importance ratios.
``routing`` (MoE models): experts to replay per token, [B, T, L_moe, k], or a ``quantrl.model.moe.Routing``
(which also counts how often the replayed experts differ from the model's own choice).
"""

from __future__ import annotations

import torch
from torch import nn

from quantrl.model.moe import Routing


def token_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    entropy_grad: bool = True,
    routing: torch.Tensor | Routing | None = None,
    pack: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logprobs [B, T-1], entropies [B, T-1] of the temperature-scaled next-token distribution or None).
    ``entropy_grad=False`` computes the entropy outside autograd, one row at a time: a metric then costs
    one [T, V] temporary instead of keeping a second [B, T, V] for the backward. ``pack=True`` runs the
    right-padded sequences packed into as few rows as fit (``quantrl.train.packing``): the same values up
    to GEMM rounding, fewer padded tokens."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if routing is not None and not isinstance(routing, Routing):
        routing = Routing(replay=routing.to(input_ids.device))
    if pack:
        return _packed_logprobs(model, input_ids, attention_mask, temperature, with_entropy, entropy_grad, routing)
    logits = model(input_ids, attention_mask) if routing is None else model(input_ids, attention_mask, routing=routing)
    # a target counts only if it and its predecessor are real tokens: the first real token of a
    # left-padded row has no real context to be predicted from
    scored = attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
    return _next_token(logits, input_ids[:, 1:], scored, temperature, with_entropy, entropy_grad)


def _next_token(logits: torch.Tensor, targets: torch.Tensor, scored: torch.Tensor, temperature: float,
                with_entropy: bool, entropy_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """logits [B, T, V] -> (logprob of targets [B, T-1], entropy or None), zero where not ``scored``."""
    logits = logits[:, :-1].float()  # [B, T-1, V]: position t predicts targets[:, t]
    if temperature != 1.0:
        logits = logits / temperature
    logp_all = logits.log_softmax(-1)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1).masked_fill(~scored, 0.0)
    entropy = None
    if with_entropy and entropy_grad:
        entropy = -(logp_all.exp() * logp_all).sum(-1).masked_fill(~scored, 0.0)
    elif with_entropy:
        with torch.no_grad():
            entropy = torch.stack([-(lp.exp() * lp).sum(-1) for lp in logp_all]).masked_fill(~scored, 0.0)
    return logp, entropy


def _packed_logprobs(model, input_ids, attention_mask, temperature, with_entropy, entropy_grad, routing):
    from quantrl.model.moe import FREE
    from quantrl.train.packing import pack

    if routing is not None and (routing.record or routing.balance_mask is not None):
        raise ValueError("token_logprobs(pack=True) replays routing only: recording experts or a balance loss "
                         "would see the packed rows")  # fmt: skip
    p = pack(input_ids, attention_mask)
    if routing is not None and routing.replay is not None:  # the same experts, token for token (the caller's
        routing.replay = p.rows(routing.replay, FREE)  # Routing goes on counting flips, now in packed rows)
    logits = model(p.input_ids, p.valid, positions=p.positions, routing=routing, segments=p.segments)
    # a packed token predicts the next one only inside its own sequence
    scored = p.valid[:, 1:] & p.valid[:, :-1] & (p.segments[:, 1:] == p.segments[:, :-1])
    logp, entropy = _next_token(logits, p.input_ids[:, 1:], scored, temperature, with_entropy, entropy_grad)
    return p.unpack(logp), (p.unpack(entropy) if entropy is not None else None)
