"""One decoder for the Qwen3 / Qwen2 / Llama / Mistral family, Qwen3-MoE / Qwen2-MoE and DeepSeek-V3, used
by the trainer and the engine.

Parameter names are HF's (``model.embed_tokens.weight``, ``model.layers.{i}.self_attn.q_proj.weight``,
``model.norm.weight``, ``lm_head.weight``), so a HF checkpoint or a trainer's state dict maps one to one.
Linear layers are ``QLinear`` variants chosen by a ``QuantScheme``; embedding, norms, ``lm_head`` and
MoE routers stay in the model dtype (MoE layers: ``quantrl.model.moe``). Build with the dtype you want and never call ``.to(dtype)`` on the model:
that would also cast fp8 weights and fp32 scales (``.to(device)`` is fine).

Three entry points:
  forward(input_ids, attention_mask, positions)  full sequences, left- or right-padded -> logits [B, T, V]
  prefill(input_ids, lens, kv)                   right-padded prompts into KV-cache slots -> last logits [B, V]
  decode(tokens, positions, kv)                  one token per active slot -> logits [B, V]
Padding is handled by positions (RoPE) plus a boolean attention mask, never by shifting tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from quantrl.formats.fp8 import FP8_DTYPE, dequantize_fp8_static, fake_quantize_fp8_static, quantize_fp8_static
from quantrl.kernels.dispatch import decode_attention
from quantrl.model.config import ModelConfig
from quantrl.model.linear import Bf16Linear, Fp8Linear, QLinear, make_linear
from quantrl.model.moe import MLP, Routing, SparseMoeBlock
from quantrl.model.quant_scheme import QuantScheme
from quantrl.model.rope import apply_rope, apply_rope_interleaved, inv_freq, rope_cos_sin
from quantrl.model.tensor_parallel import COLUMN, ROW, SINGLE, TPContext, VocabParallelEmbedding, parallel_linear


class RMSNorm(nn.Module):
    """HF's RMSNorm: statistics in fp32, the weight multiplies in the input dtype."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


@dataclass
class KVContext:
    """Where a cached forward writes keys/values and what it attends to.

    ``k[i]`` / ``v[i]``: layer i's cache view [slots, kv_heads, L, head_dim]; a sequence owns one slot and
    its token at position p lives at index p (left-aligned, no padding inside a slot). Latent attention
    (``MLAttention``) keeps its latent in ``k[i]`` [slots, 1, L, kv_lora_rank] and its roped shared key in
    ``v[i]`` [slots, 1, L, qk_rope_head_dim].
    prefill: the batch's B sequences go to slots [slot_start, slot_start + B) at positions 0..T-1.
    decode:  the B active sequences occupy slots [0, B); token b is written at ``write_pos[b]`` and
             attends to keys [0, kv_len) of its slot (masked to <= its position).
    An FP8 cache (``float8_e4m3fn`` views) stores ``quantize_fp8_static`` of each value with the layer's
    fixed scale and gives back its dequantization; attention sees those values in prefill as well (the
    layers fake-quantize K and V before attending), so a prompt and its continuation read the same numbers.
    """

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    mode: Literal["prefill", "decode"]
    slot_start: int = 0
    write_pos: torch.Tensor | None = None
    kv_len: int = 0
    _rows: torch.Tensor | None = field(default=None, repr=False)
    attention_backend: ClassVar[str] = "auto"  # decode attention (kernels.decode_attention): "reference" in benches

    @property
    def fp8(self) -> bool:
        return self.k[0].dtype == FP8_DTYPE

    def store(self, layer: int, index: tuple, k: torch.Tensor, v: torch.Tensor, k_scale: torch.Tensor,
              v_scale: torch.Tensor) -> None:  # fmt: skip
        """Write K and V at ``index`` of layer ``layer``'s cache views (quantized when the cache is FP8)."""
        for cache, x, scale in ((self.k[layer], k, k_scale), (self.v[layer], v, v_scale)):
            cache[index] = quantize_fp8_static(x, scale) if cache.dtype == FP8_DTYPE else x

    def attend(self, layer: int, q: torch.Tensor, k_scale: torch.Tensor, v_scale: torch.Tensor, scale: float,
               mask: torch.Tensor, window: int | None = None, latent: bool = False) -> torch.Tensor:  # fmt: skip
        """Decode attention of q [B, Hq, D] (slots [0, B)) over keys [0, position] of each slot, the last
        ``window`` only on sliding layers -> [B, Hq, Dv]: the Triton kernel on CUDA (reads each row's keys
        only, FP8 codes as stored), dequantize + SDPA elsewhere (``kernels.decode_attention``).
        ``latent``: DeepSeek's absorbed decode, q [B, H, r + rot] against keys [latent, roped key] and
        values = the latent (one shared head; ``k_scale`` the latent's, ``v_scale`` the roped key's).
        ``mask``: the step's decode mask [B, 1, 1, kv_len] for those keys (``Decoder.decode``)."""
        b = q.shape[0]
        k, v = self.k[layer][:b, :, : self.kv_len], self.v[layer][:b, :, : self.kv_len]
        if latent:
            return decode_attention(q, k, k, self.write_pos + 1, scale=scale, k_scale=k_scale, v_scale=k_scale,
                                    k_rope=v, rope_scale=v_scale, attn_mask=mask,
                                    backend=self.attention_backend)  # fmt: skip
        return decode_attention(q, k, v, self.write_pos + 1, scale=scale, k_scale=k_scale, v_scale=v_scale,
                                window=window, attn_mask=mask, backend=self.attention_backend)  # fmt: skip

    def load(self, layer: int, b: int, k_scale: torch.Tensor, v_scale: torch.Tensor,
             dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Keys and values [b, kv_heads, kv_len, D] of slots [0, b) (dequantized when the cache is FP8)."""
        out = []
        for cache, scale in ((self.k[layer], k_scale), (self.v[layer], v_scale)):
            c = cache[:b, :, : self.kv_len]
            out.append(dequantize_fp8_static(c, scale, dtype) if c.dtype == FP8_DTYPE else c)
        return out[0], out[1]


class KVScales(nn.Module):
    """A layer's fixed FP8 KV-cache scales (fp32, 1.0 unless the checkpoint has ``self_attn.k_scale`` /
    ``v_scale``; not parameters, not in the state dict, so weight sync never touches them) and whether the
    full-sequence forward (the trainer's) rounds K and V as an FP8 cache would (``fake_quant``, STE)."""

    def __init__(self, device: torch.device | str):
        super().__init__()
        self.register_buffer("k_scale", torch.ones((), dtype=torch.float32, device=device), persistent=False)
        self.register_buffer("v_scale", torch.ones((), dtype=torch.float32, device=device), persistent=False)
        self.fake_quant = False
        self.amax: list[torch.Tensor] | None = None  # calibration (rollout.kv_scales): the largest |K|, |V| seen

    def round_kv(self, k: torch.Tensor, v: torch.Tensor, kv: KVContext | None) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V as attention must see them: an FP8 cache's values, or the inputs unchanged."""
        if self.amax is not None:
            for seen, x in zip(self.amax, (k, v)):
                torch.maximum(seen, x.detach().abs().amax().float(), out=seen)
        if self.fake_quant or (kv is not None and kv.fp8):
            return fake_quantize_fp8_static(k, self.k_scale), fake_quantize_fp8_static(v, self.v_scale)
        return k, v


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, prefix: str, scheme: QuantScheme, dtype: torch.dtype,
                 device: torch.device | str, tp: TPContext = SINGLE):  # fmt: skip
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.tp = tp  # this rank's heads: num_heads / world of the queries, num_kv_heads / world of the keys
        self.num_heads = tp.split(cfg.num_heads, "num_attention_heads")
        self.num_kv_heads, self.head_dim = tp.split(cfg.num_kv_heads, "num_key_value_heads"), d
        args = (scheme, dtype, device)
        self.q_proj = parallel_linear(COLUMN, tp, f"{prefix}.q_proj", h, cfg.num_heads * d, cfg.qkv_bias, *args)
        self.k_proj = parallel_linear(COLUMN, tp, f"{prefix}.k_proj", h, cfg.num_kv_heads * d, cfg.qkv_bias, *args)
        self.v_proj = parallel_linear(COLUMN, tp, f"{prefix}.v_proj", h, cfg.num_kv_heads * d, cfg.qkv_bias, *args)
        self.o_proj = parallel_linear(ROW, tp, f"{prefix}.o_proj", cfg.num_heads * d, h, cfg.o_bias, *args)
        if cfg.qk_norm:  # Qwen3: RMSNorm over each head before RoPE
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps, dtype, device)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps, dtype, device)
        self.qk_norm = cfg.qk_norm
        self.kv_scales = KVScales(device)
        self.window: int | None = None  # keys this far back at most, on sliding layers (DecoderLayer sets it)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                kv: KVContext | None, layer: int) -> torch.Tensor:  # fmt: skip
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim)  # [B, T, Hq, D]
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, D]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = keys, values = self.kv_scales.round_kv(k, v, kv)
        ks, vs = self.kv_scales.k_scale, self.kv_scales.v_scale
        if kv is not None and kv.mode == "prefill":
            kv.store(layer, (slice(kv.slot_start, kv.slot_start + b), slice(None), slice(None, t)), k, v, ks, vs)
        elif kv is not None:  # decode: t == 1, active slots are [0, B); [B, Hkv, D] at (slot b, position pos_b)
            kv.store(layer, (kv._rows, slice(None), kv.write_pos), k[:, :, 0], v[:, :, 0], ks, vs)
            out = kv.attend(layer, q[:, :, 0], ks, vs, self.head_dim**-0.5, mask, self.window)  # [B, Hq, D]
            return self.tp.all_reduce(self.o_proj(out.reshape(b, 1, self.num_heads * self.head_dim)))
        out = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask, scale=self.head_dim**-0.5, enable_gqa=self.num_heads != self.num_kv_heads
        )  # [B, Hq, T, D]
        return self.tp.all_reduce(self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim)))


class MLAttention(nn.Module):
    """DeepSeek's multi-head latent attention, as transformers computes it. Per token, one latent
    c = kv_a_layernorm(kv_a_proj_with_mqa(x)[:r]) and one roped key part k_rot shared by every head; each
    head's key is [k_nope, k_rot] and its value v, with [k_nope, v] = kv_b_proj(c). The cache holds c and
    k_rot (r + d_rot numbers a token instead of 2 x heads x head_dim).

    Full sequences and prefill expand the latents through kv_b_proj, as transformers does. Decode absorbs
    kv_b_proj instead (DeepSeek's own inference trick): with W_uk, W_uv its key and value halves,
    q_nope . (W_uk c) = (q_nope W_uk) . c, so each head's query moves into latent space, attends over the
    cached [c, k_rot] directly (one shared "kv head"), and its latent output is mapped by W_uv. That is
    O(heads x r) per cached token instead of expanding every cached token through an r x heads(nope + v)
    GEMM each step. The same function, summed in another order; a weight-only kv_b_proj (BF16, INT4,
    NVFP4) is absorbed through its dequantized weight (cached, refreshed in place after an update).

    An FP8 (W8A8) kv_b_proj also quantizes its input latents per call, which the absorbed form cannot
    reproduce. Expanding every cached latent each step costs L x r x heads x (nope + v) x 2 FLOPs a layer
    (Kimi-K2 at 4K context: ~68 GFLOP per layer per token), so by default decode absorbs its dequantized
    weight as SGLang does (``absorb_fp8_decode``): the prefill keeps the W8A8 expansion, decode the FP8
    weights with unquantized latents. The difference is measured (tests/test_deepseek.py) and shows in
    the mismatch metrics; ``absorb_fp8_decode = False`` keeps the exact expansion."""

    absorb_decode = True  # class switch (tests, debugging)
    absorb_fp8_decode = True  # FP8 kv_b_proj: absorb its dequantized weight (SGLang) instead of expanding

    def __init__(self, cfg: ModelConfig, prefix: str, scheme: QuantScheme, dtype: torch.dtype,
                 device: torch.device | str, tp: TPContext = SINGLE):  # fmt: skip
        super().__init__()
        m, h = cfg.mla, cfg.hidden_size
        self.tp, self.mla = tp, m
        self.num_heads = tp.split(cfg.num_heads, "num_attention_heads")  # this rank's; the latent path is whole
        qk, args = m.qk_nope_head_dim + m.qk_rope_head_dim, (scheme, dtype, device)
        if m.q_lora_rank:
            self.q_a_proj = make_linear(f"{prefix}.q_a_proj", h, m.q_lora_rank, cfg.o_bias, *args)
            self.q_a_layernorm = RMSNorm(m.q_lora_rank, 1e-6, dtype, device)  # transformers' default eps
            self.q_b_proj = parallel_linear(COLUMN, tp, f"{prefix}.q_b_proj", m.q_lora_rank, cfg.num_heads * qk, False,
                                            *args)  # fmt: skip
        else:
            self.q_proj = parallel_linear(COLUMN, tp, f"{prefix}.q_proj", h, cfg.num_heads * qk, False, *args)
        self.kv_a_proj_with_mqa = make_linear(f"{prefix}.kv_a_proj_with_mqa", h, m.kv_lora_rank + m.qk_rope_head_dim,
                                              cfg.o_bias, *args)  # fmt: skip
        self.kv_a_layernorm = RMSNorm(m.kv_lora_rank, 1e-6, dtype, device)
        self.kv_b_proj = parallel_linear(COLUMN, tp, f"{prefix}.kv_b_proj", m.kv_lora_rank,
                                         cfg.num_heads * (m.qk_nope_head_dim + m.v_head_dim), False, *args)  # fmt: skip
        self.o_proj = parallel_linear(ROW, tp, f"{prefix}.o_proj", cfg.num_heads * m.v_head_dim, h, cfg.o_bias, *args)
        self.rope = apply_rope_interleaved if m.rope_interleave else apply_rope
        self._w: torch.Tensor | None = None  # kv_b_proj's weight [H, nope + v, r], dequantized, for decode
        self._w_key: tuple | None = None  # the versions of kv_b_proj's tensors it was made from
        lin = self.kv_b_proj
        self._kv_b_tensors = [a for a in lin.specs() if isinstance(getattr(lin, a, None), torch.Tensor)]
        self.kv_scales = KVScales(device)  # k_scale for the cached latent, v_scale for the roped shared key

    def absorbed_weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_uk [H, nope, r], W_uv [H, v, r]) of kv_b_proj, dequantized; recomputed, in place (a CUDA graph
        reads that storage), when its tensors have changed since."""
        lin, m = self.kv_b_proj, self.mla
        key = tuple(getattr(lin, a)._version for a in self._kv_b_tensors)
        if self._w is None or self._w_key != key or self._w.dtype != dtype:
            w = lin.dequantized_weight(dtype).view(self.num_heads, m.qk_nope_head_dim + m.v_head_dim, -1)
            if self._w is None or self._w.dtype != dtype:
                self._w = w.clone()
            else:
                self._w.copy_(w)
            self._w_key = key
        return self._w[:, : m.qk_nope_head_dim], self._w[:, m.qk_nope_head_dim :]

    def after_weight_update(self) -> None:
        """Refresh the absorbed weights now (graphed decode replays without running Python)."""
        if self._w is not None:
            self.absorbed_weights(self._w.dtype)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                kv: KVContext | None, layer: int) -> torch.Tensor:  # fmt: skip
        b, t, _ = x.shape
        m, heads = self.mla, self.num_heads
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if m.q_lora_rank else self.q_proj(x)
        q = q.view(b, t, heads, -1).transpose(1, 2)  # [B, H, T, nope + rot]
        q_pass, q_rot = q.split([m.qk_nope_head_dim, m.qk_rope_head_dim], dim=-1)
        latent, k_rot = self.kv_a_proj_with_mqa(x).split([m.kv_lora_rank, m.qk_rope_head_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)  # [B, T, r]
        q_rot, k_rot = self.rope(q_rot, cos, sin), self.rope(k_rot[:, None], cos, sin)[:, 0]  # k_rot [B, T, rot]
        latent, k_rot = self.kv_scales.round_kv(latent, k_rot, kv)
        ks, vs = self.kv_scales.k_scale, self.kv_scales.v_scale
        if kv is not None and kv.mode == "prefill":
            kv.store(layer, (slice(kv.slot_start, kv.slot_start + b), 0, slice(None, t)), latent, k_rot, ks, vs)
        elif kv is not None:  # decode: t == 1; attend to the slot's whole cached latent
            kv.store(layer, (kv._rows, 0, kv.write_pos), latent[:, 0], k_rot[:, 0], ks, vs)
            if self.absorb_decode and (self.absorb_fp8_decode or not isinstance(self.kv_b_proj, Fp8Linear)):
                w_uk, w_uv = self.absorbed_weights(x.dtype)
                query = torch.cat([torch.einsum("bhn,hnr->bhr", q_pass[:, :, 0], w_uk), q_rot[:, :, 0]], dim=-1)
                out = kv.attend(layer, query, ks, vs, m.softmax_scale, mask, latent=True)  # [B, H, r]: one latent head
                out = torch.einsum("bhr,hvr->bhv", out, w_uv)  # [B, H, v]
                return self.tp.all_reduce(self.o_proj(out.reshape(b, t, heads * m.v_head_dim)))
            latent, k_rot = (c[:, 0] for c in kv.load(layer, b, ks, vs, x.dtype))  # [B, Lk, r], [B, Lk, rot]
        lk = latent.shape[1]
        k_nope, values = self.kv_b_proj(latent).view(b, lk, heads, -1).transpose(1, 2).split(
            [m.qk_nope_head_dim, m.v_head_dim], dim=-1)  # [B, H, Lk, nope], [B, H, Lk, v]  # fmt: skip
        keys = torch.cat([k_nope, k_rot[:, None].expand(-1, heads, -1, -1)], dim=-1)
        out = F.scaled_dot_product_attention(torch.cat([q_pass, q_rot], dim=-1), keys, values, attn_mask=mask,
                                             scale=m.softmax_scale)  # [B, H, T, v]  # fmt: skip
        return self.tp.all_reduce(self.o_proj(out.transpose(1, 2).reshape(b, t, heads * m.v_head_dim)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, i: int, scheme: QuantScheme, dtype: torch.dtype, device: torch.device | str,
                 tp: TPContext = SINGLE):  # fmt: skip
        super().__init__()
        prefix = f"model.layers.{i}"
        self.self_attn = (MLAttention if cfg.mla else Attention)(cfg, f"{prefix}.self_attn", scheme, dtype, device, tp)
        self.mlp = (SparseMoeBlock if cfg.is_moe(i) else MLP)(cfg, f"{prefix}.mlp", scheme, dtype, device, tp=tp)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.layer, self.sliding = i, cfg.is_sliding(i)
        if self.sliding and not cfg.mla:
            self.self_attn.window = cfg.sliding_window
        self.moe_index = sum(cfg.is_moe(j) for j in range(i)) if cfg.is_moe(i) else None  # among MoE layers

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, masks: dict[bool, torch.Tensor],
                kv: KVContext | None, routing: Routing | None) -> torch.Tensor:  # fmt: skip
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, masks[self.sliding], kv, self.layer)
        x = self.post_attention_layernorm(h)
        return h + (self.mlp(x) if self.moe_index is None else self.mlp(x, routing, self.moe_index))


def vocab_parallel(cfg: ModelConfig, tp: TPContext) -> bool:
    """Split the vocabulary (embedding rows, lm_head rows) over a tensor-parallel group, when it divides."""
    return tp.world > 1 and cfg.vocab_size % tp.world == 0


class DecoderModel(nn.Module):
    """The ``model.`` prefix of HF names: embedding, layers, final norm."""

    def __init__(self, cfg: ModelConfig, scheme: QuantScheme, dtype: torch.dtype, device: torch.device | str,
                 tp: TPContext = SINGLE):  # fmt: skip
        super().__init__()
        if vocab_parallel(cfg, tp):
            self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, dtype, device, tp)
        else:
            self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=torch.zeros(
                cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device))  # fmt: skip
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, scheme, dtype, device, tp) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig, scheme: QuantScheme | None = None, dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str = "cpu", tp: TPContext | None = None):  # fmt: skip
        """``tp``: this process's place in a tensor-parallel group (``quantrl.model.tensor_parallel``)."""
        super().__init__()
        self.config, self.scheme, self.dtype, self.tp = cfg, scheme or QuantScheme(), dtype, tp or SINGLE
        self.model = DecoderModel(cfg, self.scheme, dtype, device, self.tp)
        self.vocab_parallel = vocab_parallel(cfg, self.tp)  # lm_head's rows split, logits all-gathered
        if self.vocab_parallel:
            self.lm_head: QLinear = parallel_linear(COLUMN, self.tp, "lm_head", cfg.hidden_size, cfg.vocab_size, False,
                                                    QuantScheme(), dtype, device)  # fmt: skip
        else:
            self.lm_head = Bf16Linear(cfg.hidden_size, cfg.vocab_size, False, dtype, device)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight  # one Parameter, two names (as in HF)
        # fp32 and not persistent: never part of a checkpoint or a weight update
        self.register_buffer("inv_freq", inv_freq(cfg.rope, cfg.head_dim).to(device), persistent=False)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(h)
        return self.tp.all_gather(logits) if self.vocab_parallel else logits

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    # ---- masks ------------------------------------------------------------------------------------
    def _masks(self, allowed: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> dict[bool, torch.Tensor]:
        """allowed [B, Tq, Tk] (causal & real keys) -> {sliding?: bool mask [B, 1, Tq, Tk]}."""
        masks = {False: allowed[:, None]}
        w = self.config.sliding_window
        if w is not None:
            near = (q_pos[:, :, None] - k_pos[:, None, :]) < w  # [B, Tq, Tk]
            masks[True] = (allowed & near)[:, None]
        return masks

    def _sequence_masks(self, positions: torch.Tensor, valid: torch.Tensor,
                        segments: torch.Tensor | None = None) -> dict[bool, torch.Tensor]:  # fmt: skip
        """Full / prefill forward over T padded tokens: causal by index, real keys only, and with
        ``segments`` [B, T] (packed sequences) keys of the query's own segment only.

        The diagonal is always allowed so that a padding query never sees an all-masked row (NaN); its
        output is garbage that nobody reads.
        """
        t = positions.shape[1]
        idx = torch.arange(t, device=positions.device)
        causal = idx[None, :] <= idx[:, None]  # [Tq, Tk]
        allowed = causal[None] & valid[:, None, :]
        if segments is not None:
            allowed = allowed & (segments[:, :, None] == segments[:, None, :])  # [B, Tq, Tk]
        allowed = allowed | torch.eye(t, dtype=torch.bool, device=positions.device)[None]
        return self._masks(allowed, positions, positions)

    # ---- forward paths ----------------------------------------------------------------------------
    def _layers(self, h: torch.Tensor, positions: torch.Tensor, masks: dict[bool, torch.Tensor],
                kv: KVContext | None, routing: Routing | None) -> torch.Tensor:  # fmt: skip
        cos, sin = rope_cos_sin(self.inv_freq, positions, h.dtype, self.config.rope.attention_factor)  # [B, T, D]
        for layer in self.model.layers:
            h = layer(h, cos, sin, masks, kv, routing)
        return self.model.norm(h)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      positions: torch.Tensor | None = None, routing: Routing | None = None,
                      segments: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """Final normed hidden states [B, T, H] of full sequences (no cache).

        ``attention_mask`` [B, T] (1 = token, 0 = padding; left or right). ``positions`` default to the
        count of real tokens before each one (HF ``generate``'s rule), i.e. 0.. for every sequence.
        ``routing``: MoE experts to replay and/or record (``quantrl.model.moe.Routing``). ``segments``
        [B, T]: several sequences packed in a row (``quantrl.train.packing``), each attending to itself.
        """
        valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        if positions is None:
            positions = (valid.long().cumsum(-1) - 1).clamp_min(0)
        h = self.model.embed_tokens(input_ids)
        return self._layers(h, positions, self._sequence_masks(positions, valid, segments), None, routing)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, routing: Routing | None = None,
                segments: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """Logits [B, T, V] in the model dtype (see ``hidden_states`` for the arguments)."""
        return self._logits(self.hidden_states(input_ids, attention_mask, positions, routing, segments))

    def prefill(self, input_ids: torch.Tensor, lens: torch.Tensor, kv: KVContext,
                routing: Routing | None = None) -> torch.Tensor:  # fmt: skip
        """Right-padded prompts [B, T] with lengths [B] into cache slots; logits [B, V] at each last token."""
        b, t = input_ids.shape
        positions = torch.arange(t, device=input_ids.device).expand(b, t)
        valid = positions < lens[:, None]
        h = self._layers(self.model.embed_tokens(input_ids), positions, self._sequence_masks(positions, valid), kv,
                         routing)  # fmt: skip
        last = h[torch.arange(b, device=h.device), lens - 1]  # [B, H]: lm_head only where we sample
        return self._logits(last)

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, kv: KVContext,
               routing: Routing | None = None) -> torch.Tensor:  # fmt: skip
        """One new token per active slot: tokens [B] at positions [B] -> logits [B, V]."""
        b = tokens.shape[0]
        kv.write_pos, kv._rows = positions, torch.arange(b, device=tokens.device)
        k_pos = torch.arange(kv.kv_len, device=tokens.device)
        allowed = (k_pos[None, :] <= positions[:, None])[:, None, :]  # [B, 1, Lk]
        masks = self._masks(allowed, positions[:, None], k_pos.expand(b, -1))
        h = self._layers(self.model.embed_tokens(tokens[:, None]), positions[:, None], masks, kv, routing)
        return self._logits(h[:, 0])

    def foreign_experts(self) -> frozenset[str]:
        """Module names of the MoE experts other ranks hold (expert parallelism; empty otherwise)."""
        return frozenset(n for layer in self.model.layers if isinstance(layer.mlp, SparseMoeBlock)
                         for n in layer.mlp.foreign())  # fmt: skip

    def is_foreign(self, name: str, foreign: frozenset[str] | None = None) -> bool:
        """Is tensor ``name`` (``...experts.{j}.{proj}.{tensor}``) one of another rank's experts'?"""
        foreign = self.foreign_experts() if foreign is None else foreign
        return bool(foreign) and name.rsplit(".", 2)[0] in foreign

    def kv_scales(self) -> dict[str, KVScales]:
        """Each layer's FP8 KV-cache scales by the HF prefix of its checkpoint tensors
        (``model.layers.{i}.self_attn`` + ``.k_scale`` / ``.v_scale``)."""
        return {f"model.layers.{i}.self_attn": layer.self_attn.kv_scales for i, layer in enumerate(self.model.layers)}

    def kv_scale_tensors(self) -> dict[str, torch.Tensor]:
        """The FP8 KV-cache scales that differ from the default 1.0, under their checkpoint names
        (``model.layers.{i}.self_attn.k_scale`` / ``v_scale``): what a checkpoint or an engine must be given."""
        return {f"{prefix}.{attr}": getattr(scales, attr) for prefix, scales in self.kv_scales().items()
                for attr in ("k_scale", "v_scale") if float(getattr(scales, attr)) != 1.0}  # fmt: skip

    def set_kv_scales(self, named: dict[str, torch.Tensor | float]) -> None:
        """Set FP8 KV-cache scales by checkpoint name; ``ValueError`` names a bad one."""
        scales = self.kv_scales()
        for name, value in named.items():
            prefix, _, attr = name.rpartition(".")
            t = torch.as_tensor(value, dtype=torch.float32)
            if prefix not in scales or attr not in ("k_scale", "v_scale"):
                raise ValueError(f"{name!r} names no k_scale / v_scale of this {self.config.num_layers}-layer model")
            if t.numel() != 1 or not bool(torch.isfinite(t).all()) or float(t) <= 0:
                raise ValueError(f"{name!r} must be one positive finite scale (a per-tensor FP8 KV cache), "
                                 f"got {t.flatten()[:4].tolist()} of shape {tuple(t.shape)}")  # fmt: skip
            getattr(scales[prefix], attr).fill_(float(t))

    def set_kv_fake_quant(self, on: bool) -> None:
        """Full-sequence forwards round K and V as the FP8 KV cache stores them (the trainer's side of an
        FP8-KV rollout: the engine's logprobs then come from the same attention inputs)."""
        for scales in self.kv_scales().values():
            scales.fake_quant = on

    @property
    def num_moe_layers(self) -> int:
        return sum(self.config.is_moe(i) for i in range(self.config.num_layers))
