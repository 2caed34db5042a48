"""Tiny HF checkpoints for the model / engine tests (random init, non-trivial norms and biases)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    DeepseekV3Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3Config,
    Qwen3MoeConfig,
)

VOCAB = 300
COMMON = dict(vocab_size=VOCAB, num_hidden_layers=2, max_position_embeddings=256)


def qwen3_config(**kw):
    base = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                tie_word_embeddings=False)  # fmt: skip
    return Qwen3Config(**{**COMMON, **base, **kw})


def qwen3_yarn_config(**kw):
    # YaRN as Qwen3 ships it for long contexts: attention_factor 0.1 ln(4) + 1 scales cos and sin
    rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16}
    return qwen3_config(**{"rope_parameters": rope, "max_position_embeddings": 64, **kw})


def llama3_config(**kw):
    # original context 16 < the positions the tests use, so all three llama3 frequency bands matter
    rope = {"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}  # fmt: skip
    base = dict(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=1,
                rope_parameters=rope, tie_word_embeddings=False)  # fmt: skip
    return LlamaConfig(**{**COMMON, **base, **kw})


def qwen2_tied_config(**kw):
    base = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                tie_word_embeddings=True)  # fmt: skip
    return Qwen2Config(**{**COMMON, **base, **kw})


def mistral_config(**kw):
    base = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, sliding_window=5,
                tie_word_embeddings=False)  # fmt: skip
    return MistralConfig(**{**COMMON, **base, **kw})


def qwen3_moe_config(**kw):
    # three layers: MoE, dense (mlp_only_layers), MoE; 6 experts, top-2, renormalised
    base = dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=48, num_experts=6, num_experts_per_tok=2,
                norm_topk_prob=True, mlp_only_layers=[1], num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                tie_word_embeddings=False)  # fmt: skip
    return Qwen3MoeConfig(**{**COMMON, "num_hidden_layers": 3, **base, **kw})


def qwen2_moe_config(**kw):
    # MoE on every second layer (decoder_sparse_step=2), top-3 of 5 without renormalisation, a shared expert
    base = dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=80,
                num_experts=5, num_experts_per_tok=3, decoder_sparse_step=2, num_attention_heads=4,
                num_key_value_heads=2, tie_word_embeddings=False)  # fmt: skip
    return Qwen2MoeConfig(**{**COMMON, **base, **kw})


def deepseek_v3_config(**kw):
    # DeepSeek-V3 / Kimi-K2 layout: low-rank queries, YaRN with the MLA softmax correction, a dense first layer,
    # 8 routed experts in 2 groups (only the best group is chosen from), top-2, one shared expert
    rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
            "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}  # fmt: skip
    base = dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_attention_heads=4,
                num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                v_head_dim=16, n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=2, n_shared_experts=1,
                first_k_dense_replace=1, routed_scaling_factor=2.5, rope_parameters=rope, tie_word_embeddings=False)  # fmt: skip
    return DeepseekV3Config(**{**COMMON, "num_hidden_layers": 3, "max_position_embeddings": 64, **base, **kw})


def moonlight_config(**kw):
    # Moonlight-16B-A3B's layout: a plain q_proj (q_lora_rank None), default RoPE, one expert group
    return deepseek_v3_config(**{"q_lora_rank": None, "n_group": 1, "topk_group": 1, "rope_parameters":
                                 {"rope_type": "default", "rope_theta": 50000.0}, **kw})  # fmt: skip


def save_model(config, path: Path, dtype: torch.dtype = torch.float32, seed: int = 0,
               expert_std: float | None = None) -> Path:
    """Random-init HF model saved as safetensors; norms and biases randomised so that loading them matters,
    MoE routers scaled up so that routing is far from uniform (the top-k choice then decides the output);
    ``expert_std`` re-draws the experts' weights (large: the MoE output dominates the residual stream)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.5)
            elif name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.1)  # router logits of std ~1.5: soft, so the second choice matters too
            elif expert_std is not None and ".experts." in name:
                p.normal_(0.0, expert_std)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # DeepSeek-V3: it must move the choice, so it must load
                b.normal_(0.0, 0.3)
    model.to(dtype).save_pretrained(path)
    return path


def bf16_fp8_int4(config, base: Path, group_size: int) -> dict[str, Path]:
    """A bf16 checkpoint of ``config`` and its FP8 (128x128 blocks) and INT4 (RTN, ``group_size``) conversions."""
    from quantrl.checkpoint.convert_fp8 import convert_to_fp8
    from quantrl.checkpoint.convert_int import IntConvertOptions, convert_to_int

    src = save_model(config, base / "bf16", dtype=torch.bfloat16)
    return {
        "bf16": src,
        "fp8": convert_to_fp8(src, base / "fp8", progress=False).output_dir,
        "int4": convert_to_int(src, base / "int4", IntConvertOptions(method="rtn", group_size=group_size),
                               progress=False).output_dir,
    }  # fmt: skip


def pattern_batch(n: int = 8, t: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    """[n, t] token rows with a learnable rule (token i+1 = 7 * first + i mod 300), every token scored."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, 1), generator=g)
    ids = torch.cat([ids] + [(ids * 7 + i) % VOCAB for i in range(1, t)], 1)
    am = torch.ones_like(ids)
    return {"input_ids": ids, "attention_mask": am, "loss_mask": am.clone()}


def lm_loss(model, micro):
    """Summed next-token NLL over ``loss_mask`` (a ``Trainer.train_step`` loss) and its token count."""
    from quantrl.train.logprobs import token_logprobs

    logp, _ = token_logprobs(model, micro["input_ids"], micro["attention_mask"])
    mask = micro["loss_mask"][:, 1:]
    return -(logp * mask).sum(), {"tokens": float(mask.sum())}


def reference(path: Path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def full_forward_logprobs(model, prompt, tokens, temperature):
    """log softmax(logits / T) of ``tokens`` given ``prompt`` from one full-sequence forward."""
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits = model(ids)[0, len(prompt) - 1 : -1].float() / temperature
    return logits.log_softmax(-1).gather(-1, torch.tensor(tokens)[:, None])[:, 0]


def random_prompts(lengths, seed: int = 0, vocab: int = VOCAB) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def bpe_tokenizer(texts, vocab_size: int = 400):
    """A byte-level BPE trained on ``texts``: a real HF fast tokenizer, nothing downloaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)  # fmt: skip
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)
