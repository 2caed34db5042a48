"""``quantrl eval``: a checkpoint's accuracy on a prompt set, sampled by the rollout engine.

The checkpoint can be in any format quantrl loads (BF16, FP8, MXFP8, INT4/INT8, NVFP4), with an FP8 KV
cache or not, so a trained BF16 checkpoint and its conversions are scored by one procedure: the held-out
evaluation of ``quantrl train`` (the same rewards, the same seeds), run once. Per prompt, k samples;
``accuracy`` is their mean reward (avg@k) and ``pass_at_k`` the mean over prompts of the best one.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

DTYPES = ("bfloat16", "float16", "float32")


def eval_seed(seed: int, step: int) -> int:
    """The sampling seed of the held-out evaluation after RL step ``step`` (0: before training)."""
    return seed * 1_000_003 + 7_919 * (step + 1)


@dataclass(frozen=True)
class EvalConfig:
    model: str = ""
    "HF model directory, any format quantrl loads ('': the embedded model)"
    eval_data: str = ""
    "JSONL/parquet prompts with labels; '': the embedded arithmetic task's held-out split, as quantrl train makes it"
    input_key: str = "prompt"
    "prompt column (slime --input-key)"
    label_key: str = "label"
    "answer column (slime --label-key; dotted keys read nested fields)"
    apply_chat_template: bool = False
    "render prompts with the tokenizer's chat template"
    metadata_keys: str = ""
    "comma-separated columns handed to --custom-rm-path's function"
    custom_rm_path: str = ""
    "your reward, module:function or file.py:function (as quantrl train's); '': the math reward"
    custom_env_path: str = ""
    "multi-turn episodes with this environment (as quantrl train's)"
    max_turns: int = 4
    "with --custom-env-path: policy turns per episode at most"
    eval_size: int = 64
    "embedded task: held-out prompts (quantrl train's --eval-size)"
    num_prompts: int = 64
    "embedded task: training prompts drawn before the held-out ones (quantrl train's --num-prompts)"
    difficulty: str = "medium"
    "embedded task difficulty"
    n_samples_per_eval_prompt: int = 1
    "samples per prompt (k)"
    eval_temperature: float = 0.0
    "sampling temperature (0: greedy, which needs k = 1)"
    top_p: float = 1.0
    "nucleus sampling"
    max_new_tokens: int = 48
    "response length limit"
    kv_cache_dtype: str = "auto"
    "auto or fp8_e4m3 (the checkpoint's k_scale / v_scale, or 1.0)"
    max_batch_size: int = 256
    "sequences sampled at once"
    device: str = "cpu"
    "cpu or cuda"
    dtype: str = "bfloat16"
    "activation / high-precision weight dtype"
    seed: int = 0
    "sampling seed (quantrl train's --seed and step give the same samples)"
    step: int = 0
    "the RL step whose held-out seed to use"
    out: str = ""
    "write the figures as JSON here"
    save_samples: str = ""
    "write every sample (prompt index, sample index, response, reward, finish reason) as JSONL here"

    def __post_init__(self):
        if self.n_samples_per_eval_prompt < 1 or (self.n_samples_per_eval_prompt > 1 and self.eval_temperature <= 0):
            raise ValueError("--n-samples-per-eval-prompt must be >= 1, and > 1 needs --eval-temperature > 0 "
                             "(greedy samples are all the same)")  # fmt: skip
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")


def eval_figures(rewards: torch.Tensor, k: int) -> dict[str, float]:
    """``eval_accuracy`` (mean of ``rewards`` [prompts * k], each prompt's k samples contiguous) and, for
    k > 1, ``eval_pass_at_{k}`` (mean over prompts of the best sample)."""
    out = {"eval_accuracy": float(rewards.mean())}
    if k > 1:
        out[f"eval_pass_at_{k}"] = float(rewards.view(-1, k).max(1).values.mean())
    return out


def reward_function(custom_rm_path: str):
    """``reward(response_text, Prompt) -> float``: your function, or the math reward on the prompt's label."""
    if custom_rm_path:
        from quantrl.rl.custom_reward import load_reward_fn

        return load_reward_fn(custom_rm_path)
    from quantrl.rl.rewards import math_reward

    return lambda text, prompt: math_reward(text, prompt.label or "")


def embedded_split(num_prompts: int, eval_size: int, seed: int, difficulty: str):
    """(training prompts, held-out prompts) of the embedded arithmetic task, as ``quantrl train`` draws them."""
    from quantrl.rl.data import Prompt
    from quantrl.tasks.arithmetic import make_split

    train, held = make_split(num_prompts, eval_size, seed + 1, difficulty)
    return ([Prompt(text=p.prompt, label=p.answer, index=i) for i, p in enumerate(train)],
            [Prompt(text=p.prompt, label=p.answer, index=i) for i, p in enumerate(held)])  # fmt: skip


def evaluate(cfg: EvalConfig) -> dict:
    """Sample every prompt k times and score the samples; the figures (also written to ``cfg.out``)."""
    from transformers import AutoTokenizer

    from quantrl.model import load_model
    from quantrl.rl.data import encode_prompt, load_prompts
    from quantrl.rl.loop import default_model_dir
    from quantrl.rollout import Engine, SamplingParams

    model_dir = cfg.model or default_model_dir()
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    if cfg.eval_data:
        prompts = load_prompts(cfg.eval_data, cfg.input_key, cfg.label_key, tokenizer=tok,
                               apply_chat_template=cfg.apply_chat_template,
                               metadata_keys=tuple(k for k in cfg.metadata_keys.split(",") if k))  # fmt: skip
    else:
        prompts = embedded_split(cfg.num_prompts, cfg.eval_size, cfg.seed, cfg.difficulty)[1]
    reward = reward_function(cfg.custom_rm_path)
    model = load_model(model_dir, dtype=getattr(torch, cfg.dtype), device=cfg.device)
    ids = [encode_prompt(tok, p) for p in prompts]
    k = cfg.n_samples_per_eval_prompt
    batch = min(cfg.max_batch_size, len(ids) * k)
    engine = Engine(model, kv_cache_tokens=batch * (max(map(len, ids)) + cfg.max_new_tokens), max_batch_size=batch,
                    kv_cache_dtype=cfg.kv_cache_dtype)  # fmt: skip
    params = SamplingParams(n=k, temperature=cfg.eval_temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                            stop_token_ids=(tok.eos_token_id,), seed=eval_seed(cfg.seed, cfg.step))  # fmt: skip
    t0 = time.perf_counter()
    if cfg.custom_env_path:
        from quantrl.rl.multiturn import generate_episodes, load_env_fn

        results = generate_episodes(engine, prompts, ids, params, load_env_fn(cfg.custom_env_path), tok, cfg.max_turns)
    else:
        results = sorted(engine.generate(ids, params), key=lambda r: (r.prompt_index, r.sample_index))
    seconds = time.perf_counter() - t0
    texts = [tok.decode(r.tokens, skip_special_tokens=True) for r in results]
    rewards = torch.tensor([reward(t, prompts[r.prompt_index]) for t, r in zip(texts, results)], dtype=torch.float32)
    tokens = sum(len(r.tokens) for r in results)
    out = {
        "model": str(model_dir),
        "prompts": len(prompts),
        **eval_figures(rewards, k),
        "response_len": tokens / len(results),
        "truncated_frac": sum(r.finish_reason == "length" for r in results) / len(results),
        "tokens_per_s": tokens / max(seconds, 1e-9),
        "config": asdict(cfg),
    }
    if cfg.save_samples:
        Path(cfg.save_samples).write_text("".join(
            json.dumps({"prompt_index": r.prompt_index, "sample_index": r.sample_index, "response": text,
                        "reward": rw, "finish_reason": r.finish_reason}) + "\n"
            for r, text, rw in zip(results, texts, rewards.tolist())))  # fmt: skip
    if cfg.out:
        Path(cfg.out).write_text(json.dumps(out, indent=2) + "\n")
    return out
