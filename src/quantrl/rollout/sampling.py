"""Sampling parameters, token sampling and the logprob the trainer needs.

Which logprob. For every sampled token we return log softmax(logits / temperature)[token]: the
temperature-scaled policy *before* top-k / top-p filtering. That is the quantity an RL trainer
recomputes from its own forward pass (it knows the temperature, and it does not re-run the filters), so
train-rollout mismatch and importance weights compare like with like. When top-k / top-p are active the
token was drawn from the renormalised filtered distribution, whose logprob is larger; we do not return
that one. With temperature 0 (greedy) the logprob is under the unscaled (temperature 1) policy.

Randomness. One ``torch.Generator`` per ``generate`` call, seeded from ``seed`` (fresh entropy when
None); each step draws one Exp(1) variate per (row, vocabulary entry) and picks
argmax(p / E) (the exponential race, equivalent to sampling from p). The same seed, prompts and engine
settings give the same samples; a different batch composition may not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    "samples per prompt"
    temperature: float = 1.0
    "logits are divided by this; 0 means greedy"
    top_p: float = 1.0
    "nucleus: keep the smallest set of tokens with probability mass >= top_p (1 = off)"
    top_k: int = 0
    "keep the k most likely tokens (0 or -1 = off)"
    max_new_tokens: int = 128
    "generation stops after this many tokens (finish_reason 'length')"
    stop_token_ids: tuple[int, ...] = ()
    "sampling one of these ends the sample (finish_reason 'stop'); the stop token is part of the output"
    seed: int | None = None
    "seed of the sampling generator (None: nondeterministic)"
    return_routing: bool = False
    "MoE models: return the experts each fed token was routed to (GenerationResult.routing), for routing replay"

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be >= 0 (or -1 = off), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def filter_top_k_top_p(scaled: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Scaled logits [B, V] with everything outside top-k, then top-p, set to -inf (vLLM's order)."""
    if 0 < top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, top_k, dim=-1).values[:, -1:]  # [B, 1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if top_p < 1.0:
        probs, order = torch.sort(scaled.softmax(-1), dim=-1, descending=True)  # [B, V]
        before = probs.cumsum(-1) - probs  # mass of strictly more likely tokens
        drop_sorted = before >= top_p  # the most likely token always survives (before = 0)
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        scaled = scaled.masked_fill(drop, float("-inf"))
    return scaled


def sample(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] -> (tokens [B] int64, logprobs [B] fp32 under softmax(logits / T), unfiltered)."""
    logits = logits.float()
    if params.greedy:
        tokens = logits.argmax(-1)
        return tokens, logits.log_softmax(-1).gather(-1, tokens[:, None])[:, 0]
    scaled = logits / params.temperature
    logprobs = scaled.log_softmax(-1)
    probs = filter_top_k_top_p(scaled, params.top_k, params.top_p).softmax(-1)
    race = torch.empty_like(probs).exponential_(generator=generator)  # E ~ Exp(1) per entry
    tokens = (probs / race).argmax(-1)
    return tokens, logprobs.gather(-1, tokens[:, None])[:, 0]
