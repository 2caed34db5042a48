"""A preallocated KV cache, sized once from a memory budget, carved into equal slots per ``generate``.

Storage is one flat pool per layer for keys and values, ``capacity`` tokens long. A generate call with
longest prompt P and ``max_new_tokens`` M needs at most L = P + M positions per sequence, so the pool is
viewed as ``capacity // L`` slots of shape [kv_heads, L, head_dim] (latent attention: [1, L, kv_lora_rank]
latents and [1, L, qk_rope_head_dim] roped shared keys), a free reshape (the pool itself is
allocated once, zero-filled so that never-written positions can never inject NaN through a masked
attention weight of 0). Whether a request fits is decided from sizes alone, before any allocation.

``fp8_e4m3`` (SGLang's / vLLM's ``--kv-cache-dtype``) stores the pool as ``float8_e4m3fn``, the values
quantized with each layer's fixed scales (``formats.fp8.quantize_fp8_static``; the attention layers do
it, ``model.decoder.KVContext``). That halves the bytes a token costs, so the same budget holds twice the
tokens. Here decode dequantizes the cached prefix to the model dtype before attention, so the memory
is saved but not yet the bandwidth (an attention kernel reading FP8 directly would save both).
"""

from __future__ import annotations

import torch

from quantrl.formats.fp8 import FP8_DTYPE
from quantrl.model.decoder import Decoder

KV_CACHE_DTYPES = ("auto", "fp8_e4m3")


class KVCache:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str, *, max_tokens: int | None = None,
                 budget_bytes: int | None = None, v_dim: int | None = None):  # fmt: skip
        """``v_dim``: width of a value row when it differs from the key's ``head_dim`` (latent attention)."""
        if (max_tokens is None) == (budget_bytes is None):
            raise ValueError("give exactly one of max_tokens or budget_bytes for the KV cache")
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.v_dim = head_dim if v_dim is None else v_dim
        self.dtype, self.device = dtype, torch.device(device)
        itemsize = torch.empty((), dtype=dtype).element_size()
        self.bytes_per_token = num_layers * num_kv_heads * (head_dim + self.v_dim) * itemsize  # K and V, every layer
        self.capacity = int(max_tokens) if max_tokens is not None else int(budget_bytes) // self.bytes_per_token
        if max_tokens is not None:
            self.budget_desc = f"max_tokens={max_tokens}"
        else:
            self.budget_desc = f"a {budget_bytes / 2**20:.1f} MiB budget"
        if self.capacity < 1:
            raise ValueError(
                f"a KV cache from {self.budget_desc} holds no token ({self.bytes_per_token} bytes per token)"
            )
        self._pool: torch.Tensor | None = None  # [layers, capacity * kv_heads * (head_dim + v_dim)]: all K, then all V

    @classmethod
    def for_model(cls, model: Decoder, *, max_tokens: int | None = None, budget_bytes: int | None = None,
                  dtype: str = "auto") -> KVCache:  # fmt: skip
        """``dtype``: ``auto`` (the model's) or ``fp8_e4m3`` (SGLang's name: one byte a value, half the bytes
        of BF16 for twice the tokens, each layer's fixed ``k_scale`` / ``v_scale``)."""
        if dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv cache dtype must be one of {KV_CACHE_DTYPES}, got {dtype!r}")
        store = FP8_DTYPE if dtype == "fp8_e4m3" else model.dtype
        c = model.config
        if c.mla is not None:  # the latent and the roped shared key: one "head" each
            return cls(c.num_layers, 1, c.mla.kv_lora_rank, store, model.device, max_tokens=max_tokens,
                       budget_bytes=budget_bytes, v_dim=c.mla.qk_rope_head_dim)  # fmt: skip
        heads = model.tp.split(c.num_kv_heads, "num_key_value_heads")  # this rank's, with tensor parallelism
        return cls(c.num_layers, heads, c.head_dim, store, model.device,
                   max_tokens=max_tokens, budget_bytes=budget_bytes)  # fmt: skip

    @property
    def nbytes(self) -> int:
        return self.capacity * self.bytes_per_token

    def check_fits(self, prompt_lens: list[int], max_new_tokens: int) -> int:
        """Positions one sequence needs (longest prompt + max_new_tokens); ``ValueError`` if the cache is smaller."""
        longest = max(prompt_lens)
        need = longest + max_new_tokens
        if need > self.capacity:
            raise ValueError(
                f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} needs {need} KV-cache tokens, "
                f"but the KV cache holds {self.capacity} tokens "
                f"(from {self.budget_desc}; {self.bytes_per_token} bytes per token); "
                "shorten the prompt, lower max_new_tokens or give the engine a larger KV budget"
            )
        return need

    def slots(self, num_slots: int, seq_len: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-layer key and value views [num_slots, kv_heads, seq_len, head_dim] over the pool."""
        if num_slots * seq_len > self.capacity:
            raise ValueError(f"{num_slots} slots x {seq_len} positions exceed the KV cache's {self.capacity} tokens")
        k_all = self.capacity * self.num_kv_heads * self.head_dim  # the K part of a layer's pool
        if self._pool is None:
            self._pool = torch.zeros(self.num_layers, k_all + self.capacity * self.num_kv_heads * self.v_dim,
                                     dtype=self.dtype, device=self.device)  # fmt: skip
        rows = num_slots * self.num_kv_heads * seq_len
        k_shape = (num_slots, self.num_kv_heads, seq_len, self.head_dim)
        v_shape = (num_slots, self.num_kv_heads, seq_len, self.v_dim)
        return ([self._pool[i, : rows * self.head_dim].view(k_shape) for i in range(self.num_layers)],
                [self._pool[i, k_all : k_all + rows * self.v_dim].view(v_shape) for i in range(self.num_layers)])  # fmt: skip

    def free(self) -> None:
        self._pool = None
