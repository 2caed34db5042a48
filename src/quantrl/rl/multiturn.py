"""Multi-turn rollouts: the policy and an environment take turns. Every token the policy sampled keeps
the logprob the engine gave it, in the context it was sampled in.

An environment is a function (``--custom-env-path module:fn`` or ``file.py:fn``)

    env(prompt: Prompt, transcript: str) -> str | None

Given the prompt and the text of the episode so far (policy turns and earlier observations, decoded),
it returns the next observation to append: a tool's output, a user's reply. None ends the episode.

Token discipline is what keeps the train-rollout mismatch measurable and the IS correction valid. The
policy's turns stay the engine's token ids and are never decoded and re-encoded. An observation is
encoded on its own, without special tokens, and appended. The trainer then recomputes logprobs of
exactly the sampled tokens, on exactly the context they were sampled in. Observation tokens carry loss
mask 0 and logprob 0. (The Miles mismatch study names text post-processing of responses as what breaks
this for agent RL.)

An episode ends when the environment returns None ("stop"). It also ends when a turn or an observation
reaches ``max_new_tokens`` over the whole response ("length"; the observation is cut to fit), or after
``max_turns`` policy turns ("max_turns"). A turn ends at the stop tokens (EOS). Each turn is one engine
call over every live episode. Turn 1 samples the n episodes of a prompt from one prefill; later turns
prefill their whole context again (no prefix cache).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

from quantrl.rl.data import Prompt

EnvFn = Callable[[Prompt, str], "str | None"]
TURN_SEED = 1_000_033  # seeds of later turns: the call's seed + turn * this


@dataclass
class Episode:
    """One sample of a multi-turn rollout, shaped like ``rollout.GenerationResult`` for the RL loop."""

    prompt_index: int
    sample_index: int
    tokens: list[int] = field(default_factory=list)
    "every token after the prompt: policy turns and observations"
    logprobs: list[float] = field(default_factory=list)
    "the engine's logprob of each policy token; 0.0 on observation tokens"
    loss_mask: list[int] = field(default_factory=list)
    "1 on policy tokens, 0 on observation tokens"
    finish_reason: str = "stop"
    "stop (the environment ended it) | length | max_turns"
    weight_version: int = 0
    "the oldest engine weight version among its turns"
    turns: int = 0
    "policy turns taken"
    routing: torch.Tensor | None = None
    "MoE routing of its last turn's call (which prefilled everything before): [fed tokens, L_moe, k]"


def load_env_fn(spec: str) -> EnvFn:
    """The environment ``spec`` names; its observations must be strings (or None)."""
    from quantrl.rl.custom_reward import resolve_function

    fn = resolve_function(spec, "--custom-env-path")

    def env(prompt: Prompt, transcript: str) -> str | None:
        obs = fn(prompt, transcript)
        if obs is not None and not isinstance(obs, str):
            raise TypeError(f"--custom-env-path {spec!r} returned a {type(obs).__name__} for the prompt of row "
                            f"{prompt.index}; an environment returns the observation text or None")  # fmt: skip
        return obs

    return env


def generate_episodes(engine, prompts: Sequence[Prompt], prompt_ids: Sequence[list[int]], params, env: EnvFn,
                      tokenizer, max_turns: int) -> list[Episode]:  # fmt: skip
    """``params.n`` episodes per prompt, prompt-major; ``engine`` is anything with ``generate(ids, params)``
    (a local ``Engine`` or ``RayEngines``)."""
    if max_turns < 1:
        raise ValueError(f"max_turns must be >= 1, got {max_turns}")
    n, budget = params.n, params.max_new_tokens
    episodes = [Episode(p, s) for p in range(len(prompt_ids)) for s in range(n)]
    live = list(range(len(episodes)))
    for turn in range(max_turns):
        if not live:
            break
        if turn == 0:  # n samples of each prompt from one prefill
            results = engine.generate([list(ids) for ids in prompt_ids], params)
            by_episode = {r.prompt_index * n + r.sample_index: r for r in results}
        else:
            room = max(budget - len(episodes[i].tokens) for i in live)
            seed = None if params.seed is None else params.seed + turn * TURN_SEED
            contexts = [list(prompt_ids[episodes[i].prompt_index]) + episodes[i].tokens for i in live]
            results = engine.generate(contexts, replace(params, n=1, max_new_tokens=room, seed=seed))
            by_episode = {live[r.prompt_index]: r for r in results}
        still = []
        for i in live:
            ep, r = episodes[i], by_episode[i]
            room = budget - len(ep.tokens)
            toks, lps = r.tokens[:room], r.logprobs[:room]  # a later turn may run past this episode's budget
            ep.tokens += toks
            ep.logprobs += lps
            ep.loss_mask += [1] * len(toks)
            ep.turns += 1
            ep.weight_version = r.weight_version if ep.turns == 1 else min(ep.weight_version, r.weight_version)
            ep.routing = r.routing
            if r.finish_reason == "length" or len(ep.tokens) >= budget:
                ep.finish_reason = "length"
                continue
            if ep.turns == max_turns:
                ep.finish_reason = "max_turns"
                continue
            obs = env(prompts[ep.prompt_index], tokenizer.decode(ep.tokens, skip_special_tokens=True))
            if obs is None:
                ep.finish_reason = "stop"
                continue
            obs_ids = list(tokenizer(obs, add_special_tokens=False)["input_ids"])
            cut = obs_ids[: budget - len(ep.tokens)]
            ep.tokens += cut
            ep.logprobs += [0.0] * len(cut)
            ep.loss_mask += [0] * len(cut)
            if len(cut) < len(obs_ids) or len(ep.tokens) >= budget:
                ep.finish_reason = "length"
                continue
            still.append(i)
        live = still
    return episodes
