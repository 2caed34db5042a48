"""``quantrl pretrain``: the supervised warm start of the embedded default model.

A small Qwen3-shaped decoder learns the synthetic arithmetic task (``quantrl.tasks``) from worked
solutions: sequences are ``<bos> prompt solution <eos>`` with loss on the solution tokens only. The result is
a BF16 HF checkpoint (config, weights, the character tokenizer) that ``quantrl train`` starts RL from.
Reproducible: the model init, the problems and the batch order all come from ``--seed``.
"""

from __future__ import annotations

import functools
import json
import math
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "default_model"


@dataclass(frozen=True)
class PretrainConfig:
    out_dir: str = str(DEFAULT_MODEL_DIR)
    "where the BF16 checkpoint goes"
    difficulty: str = "medium"
    "task preset: easy | medium | hard"
    hidden_size: int = 256
    "model width (multiple of 128: FP8 blocks and INT4 groups of 128 fit)"
    num_layers: int = 4
    "decoder layers"
    intermediate_size: int = 768
    "SwiGLU width"
    steps: int = 1500
    "optimizer steps"
    batch_size: int = 64
    "sequences per step"
    lr: float = 2e-3
    "peak learning rate (cosine decay, 5% warm-up)"
    num_problems: int = 50_000
    "distinct training problems"
    seed: int = 0
    "seed of init, problems and batch order"
    threads: int = 0
    "torch CPU threads (0: torch's default)"
    device: str = "cpu"
    "cpu | cuda (the init is drawn on CPU either way, so a seed gives the same start on both)"
    arch: str = "qwen3"
    "qwen3 (Qwen3 / Qwen3-MoE) | deepseek_v3 (latent attention; with experts, DeepSeek-V3's router from layer 2 on)"
    num_experts: int = 0
    "0: a dense model; > 0: a MoE with this many routed experts (qwen3: in every layer)"
    num_experts_per_tok: int = 2
    "MoE: experts per token (top-k, renormalised)"
    moe_intermediate_size: int = 256
    "MoE: SwiGLU width of one expert"
    router_aux_loss_coef: float = 0.01
    "MoE: weight of the load-balancing loss (transformers' router_aux_loss_coef), so experts share the tokens"
    max_seconds: float = 0.0
    "stop training after this many seconds and save the model as it is (0: run every step); for time-boxed runs"


def model_config(cfg: PretrainConfig, vocab_size: int) -> dict:
    from transformers import Qwen3Config, Qwen3MoeConfig

    padded_vocab = -(-vocab_size // 64) * 64
    common = dict(
        vocab_size=padded_vocab, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.hidden_size // 64, num_key_value_heads=2,
        head_dim=64, max_position_embeddings=512, rope_theta=10000.0, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    if cfg.arch == "deepseek_v3":
        from transformers import DeepseekV3Config

        # Moonlight-shaped: a plain q_proj, a 128-wide latent, heads of 64 + 32 rotary dims, values of 64; with
        # experts, a dense first layer, one shared expert and one expert group (the router's correction bias 0)
        ds = DeepseekV3Config(**{**common, "num_key_value_heads": common["num_attention_heads"]}, q_lora_rank=None,
                              kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
                              n_routed_experts=cfg.num_experts, num_experts_per_tok=cfg.num_experts_per_tok,
                              moe_intermediate_size=cfg.moe_intermediate_size, n_shared_experts=1, n_group=1,
                              topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=True,
                              first_k_dense_replace=1 if cfg.num_experts else cfg.num_layers)  # fmt: skip
        return {**ds.to_dict(), "architectures": ["DeepseekV3ForCausalLM"]}
    if cfg.arch != "qwen3":
        raise ValueError(f"--arch must be qwen3 or deepseek_v3, got {cfg.arch!r}")
    if not cfg.num_experts:
        return {**Qwen3Config(**common).to_dict(), "architectures": ["Qwen3ForCausalLM"]}
    moe = Qwen3MoeConfig(**common, num_experts=cfg.num_experts, num_experts_per_tok=cfg.num_experts_per_tok,
                         moe_intermediate_size=cfg.moe_intermediate_size, norm_topk_prob=True)  # fmt: skip
    return {**moe.to_dict(), "architectures": ["Qwen3MoeForCausalLM"]}


def encode_examples(problems, tok) -> list[tuple[list[int], int]]:
    """[(ids, n_prompt_tokens)]: ``<bos> prompt`` then ``solution <eos>``."""
    out = []
    for p in problems:
        prompt = tok(p.prompt)["input_ids"]  # adds <bos>
        target = tok(p.solution, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        out.append((prompt + target, len(prompt)))
    return out


def collate(examples: list[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    t = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), t), pad_id, dtype=torch.long)
    am = torch.zeros_like(ids)
    lm = torch.zeros_like(ids)
    for i, (seq, n_prompt) in enumerate(examples):
        ids[i, : len(seq)] = torch.tensor(seq)
        am[i, : len(seq)] = 1
        lm[i, n_prompt : len(seq)] = 1  # loss on the solution and <eos>
    return {"input_ids": ids, "attention_mask": am, "loss_mask": lm}


def sft_loss(model, micro, aux_coef: float = 0.0):
    """Summed token NLL of the solution; with ``aux_coef`` (MoE) plus the load-balancing loss, weighted by
    the micro-batch's loss tokens so that the trainer's token mean gives it weight ``aux_coef``."""
    from quantrl.model.moe import Routing
    from quantrl.train.logprobs import token_logprobs

    routing = Routing(balance_mask=micro["attention_mask"].bool()) if aux_coef else None
    logp, _ = token_logprobs(model, micro["input_ids"], micro["attention_mask"], routing=routing)
    nll = -(logp * micro["loss_mask"][:, 1:]).sum()
    if routing is None:
        return nll, {"nll": float(nll.detach())}
    return nll + aux_coef * routing.balance_loss() * micro["loss_mask"][:, 1:].sum(), {"nll": float(nll.detach())}


def greedy_accuracy(model, tok, problems, max_new_tokens: int = 48) -> float:
    from quantrl.rollout import Engine, SamplingParams
    from quantrl.tasks.arithmetic import reward

    engine = Engine(model, kv_cache_tokens=len(problems) * 96, max_batch_size=len(problems))
    prompts = [tok(p.prompt)["input_ids"] for p in problems]
    res = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens,
                                                  stop_token_ids=(tok.eos_token_id,)))
    return sum(reward(tok.decode(r.tokens, skip_special_tokens=True), problems[r.prompt_index]) for r in res) / len(problems)


def pretrain(cfg: PretrainConfig, progress: bool = True) -> dict:
    from quantrl.model import build_model, random_init_
    from quantrl.tasks.arithmetic import make_split
    from quantrl.tasks.tokenizer import build_tokenizer
    from quantrl.train.trainer import TrainConfig, Trainer

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    tok = build_tokenizer()
    hf_cfg = model_config(cfg, len(tok))
    model = random_init_(build_model(hf_cfg, dtype=torch.float32), seed=cfg.seed, std=0.02).to(cfg.device).train()
    train, held = make_split(cfg.num_problems, 256, cfg.seed, cfg.difficulty)
    examples = encode_examples(train, tok)
    trainer = Trainer(model, TrainConfig(mode="bf16", lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.01,
                                         micro_batch_size=cfg.batch_size, grad_clip=1.0))
    loss = functools.partial(sft_loss, aux_coef=cfg.router_aux_loss_coef if cfg.num_experts else 0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    warm = max(1, cfg.steps // 20)
    t0 = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc="pretrain", disable=not progress)
    losses = []
    for step in bar:
        lr = cfg.lr * (step + 1) / warm if step < warm else cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / (cfg.steps - warm)))
        trainer.optimizer.set_lr(lr)
        idx = torch.randint(0, len(examples), (cfg.batch_size,), generator=gen).tolist()
        batch = collate([examples[i] for i in idx], tok.pad_token_id)
        m = trainer.train_step({k: v.to(cfg.device) for k, v in batch.items()}, loss)
        losses.append(m["nll"] / float(batch["loss_mask"].sum()))  # the LM loss, without the balance term
        bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{lr:.1e}")
        if cfg.max_seconds and time.perf_counter() - t0 > cfg.max_seconds:
            break
    bar.close()
    train_s = time.perf_counter() - t0
    # save: config + tokenizer in a staging dir, then the trainer's atomic BF16 checkpoint
    with tempfile.TemporaryDirectory() as src:
        (Path(src) / "config.json").write_text(json.dumps(hf_cfg, indent=2))
        tok.save_pretrained(src)
        trainer.save_checkpoint(cfg.out_dir, src)
    from quantrl.model import load_model

    acc = greedy_accuracy(load_model(cfg.out_dir, dtype=torch.bfloat16, device=cfg.device), tok, held[:128])  # what RL starts from
    summary = {"config": asdict(cfg), "final_loss": sum(losses[-20:]) / min(20, len(losses)),
               "held_out_greedy_accuracy": acc, "train_seconds": train_s, "steps_done": len(losses),
               "params": sum(p.numel() for p in model.parameters())}
    (Path(cfg.out_dir) / "pretrain_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
