"""Rollout: batched generation with per-token logprobs over BF16 / FP8 / INT4 weights, KV cache,
sampling, and atomic weight updates from the trainer."""

from quantrl.rollout.engine import Engine, GenerationResult
from quantrl.rollout.kv_cache import KVCache
from quantrl.rollout.sampling import SamplingParams

__all__ = ["Engine", "GenerationResult", "KVCache", "SamplingParams"]
