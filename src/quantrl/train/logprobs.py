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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logprobs [B, T-1], entropies [B, T-1] of the temperature-scaled next-token distribution or None).
    ``entropy_grad=False`` computes the entropy outside autograd, one row at a time: a metric then costs
    one [T, V] temporary instead of keeping a second [B, T, V] for the backward."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if routing is None:
        logits = model(input_ids, attention_mask)
    else:
        if not isinstance(routing, Routing):
            routing = Routing(replay=routing.to(input_ids.device))
        logits = model(input_ids, attention_mask, routing=routing)
    logits = logits[:, :-1].float()  # [B, T-1, V]: predicts input_ids[:, 1:]
    if temperature != 1.0:
        logits = logits / temperature
    logp_all = logits.log_softmax(-1)
    target = input_ids[:, 1:]
    # a target counts only if it and its predecessor are real tokens: the first real token of a
    # left-padded row has no real context to be predicted from
    valid = attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
    logp = logp_all.gather(-1, target.unsqueeze(-1)).squeeze(-1).masked_fill(~valid, 0.0)  # [B, T-1]
    entropy = None
    if with_entropy and entropy_grad:
        entropy = -(logp_all.exp() * logp_all).sum(-1).masked_fill(~valid, 0.0)
    elif with_entropy:
        with torch.no_grad():
            entropy = torch.stack([-(lp.exp() * lp).sum(-1) for lp in logp_all]).masked_fill(~valid, 0.0)
    return logp, entropy
