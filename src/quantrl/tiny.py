"""Small HF models and tokenizers that quantrl builds itself (no hub downloads), for demos and tests.

``build_tokenizer`` trains a byte-level BPE on given text; ``train_tiny_lm`` briefly trains a small
Qwen3/Llama-shaped transformers model on that text so its weights have the structure (outlier channels,
non-uniform logits) that makes quantization error visible, unlike a random init.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm


def build_tokenizer(texts: Sequence[str], vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def tiny_config(arch: str = "qwen3", vocab_size: int = 512, hidden: int = 256, layers: int = 4, inter: int = 768):
    from transformers import LlamaConfig, Qwen3Config

    common = dict(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 128), max_position_embeddings=1024,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
    )
    if arch == "qwen3":
        return Qwen3Config(head_dim=64, **common)
    if arch == "llama":
        return LlamaConfig(head_dim=64, **common)
    raise ValueError(f"tiny_config: arch must be qwen3 or llama, got {arch!r}")


def train_tiny_lm(config, token_stream: torch.Tensor, *, steps: int = 150, batch: int = 8, seq_len: int = 128,
                  lr: float = 3e-3, seed: int = 0, progress: bool = True):
    """Next-token training on random windows of ``token_stream`` (1-D LongTensor); returns the model (fp32)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    n = token_stream.numel() - seq_len - 1
    bar = tqdm(range(steps), desc="training tiny LM", disable=not progress)
    for _ in bar:
        starts = torch.randint(0, n, (batch,), generator=gen)
        x = torch.stack([token_stream[s : s + seq_len + 1] for s in starts.tolist()])  # [B, L+1]
        loss = model(input_ids=x[:, :-1], labels=x[:, :-1].clone(), return_dict=True).loss
        # labels are shifted inside the model: predicting x[t+1] from x[:t+1]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


def save_model(model, tokenizer, path: str | Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    path = Path(path)
    model.to(dtype).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
