"""``ModelConfig``: the few numbers our decoder needs, read from a HF ``config.json`` dict.

Supported families: Qwen3 (q/k RMSNorm, ``attention_bias`` on all four projections), Qwen2 (bias on
q/k/v, none on o), Llama (``attention_bias``, ``mlp_bias``, Llama-3 ``rope_scaling``), Mistral
(sliding-window attention), the mixture-of-experts Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B) and
Qwen2-MoE (with its sigmoid-gated shared expert), and DeepSeek-V3 (``deepseek_v3``: Moonlight-16B-A3B,
DeepSeek-V3, the architecture of Kimi-K2): multi-head latent attention (``MLAConfig``), YaRN RoPE, and a
sigmoid router with group-limited top-k and a score-correction bias. Anything else is refused by name
rather than run subtly wrong.

Both config dialects are read: transformers 5 writes ``rope_parameters`` (with ``rope_theta`` inside),
transformers 4 writes ``rope_theta`` and ``rope_scaling`` at the top level.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

# Kimi-K2 ships its own model_type (and remote code) for DeepSeek-V3's architecture and weight names
ALIASES = {"kimi_k2": "deepseek_v3"}
SUPPORTED_MODEL_TYPES = ("qwen3", "qwen2", "llama", "mistral", "qwen3_moe", "qwen2_moe", "deepseek_v3", *ALIASES)
QK_NORM_TYPES = ("qwen3", "qwen3_moe")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    "base of the rotary frequencies (rope_theta)"
    rope_type: str = "default"
    "default | linear | llama3"
    factor: float = 1.0
    "linear / llama3: how much the context was stretched"
    low_freq_factor: float = 1.0
    "llama3: wavelengths above original_max_position_embeddings / low_freq_factor are divided by factor"
    high_freq_factor: float = 4.0
    "llama3: wavelengths below original_max_position_embeddings / high_freq_factor are kept"
    original_max_position_embeddings: int = 8192
    "llama3 / yarn: the pre-training context length"
    beta_fast: float = 32.0
    "yarn: rotations above which a dimension is extrapolated (kept)"
    beta_slow: float = 1.0
    "yarn: rotations below which a dimension is interpolated (divided by factor)"
    attention_factor: float = 1.0
    "yarn: multiplies cos and sin (from factor, mscale and mscale_all_dim, as transformers derives it)"
    truncate: bool = True
    "yarn: round the correction range to whole dimensions"
    mscale_all_dim: float = 0.0
    "yarn, DeepSeek's MLA: the softmax scale is multiplied by yarn_mscale(factor, mscale_all_dim)^2"


@dataclass(frozen=True)
class MLAConfig:
    """DeepSeek's multi-head latent attention: keys and values come from one low-rank latent per token."""

    q_lora_rank: int
    "rank of the query's low-rank path (q_a_proj, q_a_layernorm, q_b_proj); 0: a plain q_proj"
    kv_lora_rank: int
    "width of the key/value latent (kv_a_proj_with_mqa -> kv_a_layernorm -> kv_b_proj)"
    qk_nope_head_dim: int
    "per head: query/key dimensions without RoPE"
    qk_rope_head_dim: int
    "per head: query/key dimensions with RoPE (the key's are one vector shared by all heads)"
    v_head_dim: int
    "per head: value dimensions"
    rope_interleave: bool = True
    "RoPE over interleaved pairs (x0, x1), (x2, x3), ... (DeepSeek's layout) instead of halves"
    softmax_scale: float = 0.0
    "q.k scale: qk_head_dim^-0.5, times the YaRN mscale_all_dim correction squared"


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    "qwen3 | qwen2 | llama | mistral | qwen3_moe | qwen2_moe | deepseek_v3"
    vocab_size: int
    "rows of the embedding and of lm_head"
    hidden_size: int
    "residual stream width"
    intermediate_size: int
    "SwiGLU inner width"
    num_layers: int
    "decoder layers"
    num_heads: int
    "query heads"
    num_kv_heads: int
    "key/value heads (grouped-query attention: num_heads is a multiple)"
    head_dim: int
    "width of one head (Qwen3 sets it independently of hidden_size)"
    rms_norm_eps: float = 1e-6
    "RMSNorm epsilon"
    rope: RopeConfig = field(default_factory=RopeConfig)
    "rotary embedding parameters"
    max_position_embeddings: int = 32768
    "longest context the model was trained for (informative; the engine's KV budget is the real limit)"
    tie_word_embeddings: bool = False
    "lm_head shares the embedding matrix"
    qkv_bias: bool = False
    "q/k/v projections have a bias (Qwen2; attention_bias elsewhere)"
    o_bias: bool = False
    "o_proj has a bias (attention_bias on Llama/Qwen3)"
    mlp_bias: bool = False
    "gate/up/down projections have a bias (Llama mlp_bias)"
    qk_norm: bool = False
    "RMSNorm over head_dim on queries and keys before RoPE (Qwen3)"
    sliding_window: int | None = None
    "keys further back than this many positions are masked on sliding layers"
    layer_types: tuple[str, ...] = ()
    "per layer: full_attention | sliding_attention"
    eos_token_ids: tuple[int, ...] = ()
    "end-of-sequence ids from the config (default stop tokens for the CLI)"
    num_experts: int = 0
    "routed experts per MoE layer (0: a dense model)"
    num_experts_per_tok: int = 0
    "experts each token is routed to (top-k)"
    moe_intermediate_size: int = 0
    "SwiGLU inner width of one routed expert"
    norm_topk_prob: bool = False
    "renormalise the top-k router probabilities to sum to 1"
    shared_expert_intermediate_size: int = 0
    "Qwen2-MoE: inner width of the always-on expert (0: none), scaled by sigmoid(shared_expert_gate(x))"
    moe_layers: tuple[bool, ...] = ()
    "per layer: MoE block (True) or dense MLP; empty means all dense"
    router: str = "softmax"
    "softmax (Qwen-MoE: top-k of softmax probabilities) | sigmoid (DeepSeek-V3: group-limited top-k, fp32)"
    n_group: int = 1
    "sigmoid router: experts fall into this many groups ..."
    topk_group: int = 1
    "... and only the best topk_group groups (by the sum of their two best scores) are chosen from"
    routed_scaling_factor: float = 1.0
    "sigmoid router: the routed experts' weights are multiplied by this"
    shared_experts_intermediate_size: int = 0
    "DeepSeek-V3: inner width of the always-on, ungated shared_experts MLP (n_shared_experts x moe width)"
    mla: MLAConfig | None = None
    "DeepSeek-V3: multi-head latent attention (None: grouped-query attention)"
    mtp_layers: int = 0
    "DeepSeek-V3: multi-token-prediction layers stored after the decoder layers (num_nextn_predict_layers); unused"

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads={self.num_heads} is not a multiple of num_key_value_heads={self.num_kv_heads}"
            )
        if len(self.layer_types) != self.num_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
        if self.moe_layers and len(self.moe_layers) != self.num_layers:
            raise ValueError(f"moe_layers has {len(self.moe_layers)} entries for {self.num_layers} layers")
        if any(self.moe_layers) and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"num_experts_per_tok={self.num_experts_per_tok} must be in [1, num_experts={self.num_experts}]"
            )
        if any(self.moe_layers) and self.moe_intermediate_size < 1:
            raise ValueError(f"moe_intermediate_size={self.moe_intermediate_size} must be positive")
        if self.router == "sigmoid" and (self.num_experts % self.n_group or not 0 < self.topk_group <= self.n_group):
            raise ValueError(f"n_group={self.n_group} must divide n_routed_experts={self.num_experts} and "
                             f"topk_group={self.topk_group} be in [1, n_group]")  # fmt: skip
        if self.router == "sigmoid" and self.num_experts_per_tok > self.topk_group * self.num_experts // self.n_group:
            raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} exceeds the experts of topk_group="
                             f"{self.topk_group} groups")  # fmt: skip

    def is_moe(self, layer: int) -> bool:
        return bool(self.moe_layers) and self.moe_layers[layer]

    def is_sliding(self, layer: int) -> bool:
        return self.sliding_window is not None and self.layer_types[layer] == "sliding_attention"

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> ModelConfig:
        """Read a HF ``config.json`` dict; ``ValueError`` naming the field for anything unsupported."""
        mt = d.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            supported = ", ".join(SUPPORTED_MODEL_TYPES)
            raise ValueError(f"unsupported model_type {mt!r}: quantrl's decoder supports {supported}")
        mt = ALIASES.get(mt, mt)
        d = _as_transformers_resolves({**d, "model_type": mt})
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"{mt}: hidden_act {act!r} is not supported (SwiGLU with silu only)")
        hidden, heads = int(d["hidden_size"]), int(d["num_attention_heads"])
        layers = int(d["num_hidden_layers"])
        attn_bias = bool(d.get("attention_bias", False))
        window, layer_types = _attention_layout(mt, d, layers)
        eos = d.get("eos_token_id")
        moe = _moe_fields(mt, d, layers)
        rope = _rope(d)
        mla = _mla(d, rope) if mt == "deepseek_v3" else None
        return cls(
            model_type=mt,
            vocab_size=int(d["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(d["intermediate_size"]),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=int(d.get("num_key_value_heads") or heads),
            # MLA: the rotary part of a head (transformers' head_dim for DeepSeek-V3)
            head_dim=mla.qk_rope_head_dim if mla else int(d.get("head_dim") or hidden // heads),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope=rope,
            mla=mla,
            mtp_layers=int(d.get("num_nextn_predict_layers") or 0) if mla else 0,
            max_position_embeddings=int(d.get("max_position_embeddings", 32768)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            # Qwen2 hard-codes q/k/v bias and o without; Qwen2-MoE makes the q/k/v bias a field
            qkv_bias={"qwen2": True, "qwen2_moe": bool(d.get("qkv_bias", True))}.get(mt, attn_bias),
            o_bias=False if mt in ("qwen2", "qwen2_moe") else attn_bias,
            mlp_bias=bool(d.get("mlp_bias", False)),
            qk_norm=mt in QK_NORM_TYPES,
            sliding_window=window,
            layer_types=layer_types,
            eos_token_ids=tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),)),
            **moe,
        )


def _as_transformers_resolves(d: dict[str, Any]) -> dict[str, Any]:
    """``d`` with every field transformers' config class fills in when config.json leaves it out (its
    per-family defaults: Qwen3's head_dim 128, Mistral's 4096 window, Qwen2's max_window_layers 28, ...,
    and what it derives: layer_types, rope parameters), so that a sparse config.json means here what it
    means to transformers. Without transformers, or for a config it rejects, ``d`` as it is."""
    try:
        from transformers import CONFIG_MAPPING

        hf = CONFIG_MAPPING[d["model_type"]](**{k: v for k, v in d.items() if k != "model_type"})
    except (ImportError, KeyError, TypeError, ValueError):
        return d
    return {**d, **hf.to_dict()}


def _moe_fields(mt: str, d: dict[str, Any], layers: int) -> dict[str, Any]:
    """The MoE fields as transformers' Qwen2-MoE / Qwen3-MoE / DeepSeek-V3 resolve them (hub configs say
    ``num_experts`` / ``n_routed_experts``, transformers 5 writes ``num_local_experts``). A Qwen layer is MoE
    unless listed in ``mlp_only_layers`` or off the ``decoder_sparse_step`` grid; a DeepSeek-V3 layer is
    MoE from ``first_k_dense_replace`` on."""
    if mt == "deepseek_v3":
        if d.get("topk_method", "noaux_tc") != "noaux_tc" or d.get("scoring_func", "sigmoid") != "sigmoid":
            raise ValueError(f"{mt}: only topk_method noaux_tc with scoring_func sigmoid is supported")
        experts = int(d.get("n_routed_experts", d.get("num_local_experts", 0)) or 0)
        first_moe = int(d.get("first_k_dense_replace") or 0)
        return {
            "num_experts": experts,
            "num_experts_per_tok": int(d["num_experts_per_tok"]),
            "moe_intermediate_size": int(d["moe_intermediate_size"]),
            "norm_topk_prob": bool(d.get("norm_topk_prob", True)),
            "moe_layers": tuple(experts > 0 and i >= first_moe for i in range(layers)),
            "router": "sigmoid",
            "n_group": int(d.get("n_group") or 1),
            "topk_group": int(d.get("topk_group") or 1),
            "routed_scaling_factor": float(d.get("routed_scaling_factor", 1.0)),
            "shared_experts_intermediate_size": int(d.get("n_shared_experts") or 0) * int(d["moe_intermediate_size"]),
        }
    if not mt.endswith("_moe"):
        return {}
    if d.get("use_sliding_window"):  # each MoE family has its own layer rule; refuse rather than guess
        raise ValueError(f"{mt}: use_sliding_window is not supported")
    experts = int(d.get("num_experts", d.get("num_local_experts", 0)) or 0)
    step, dense_only = int(d.get("decoder_sparse_step", 1)), set(d.get("mlp_only_layers") or ())
    moe_layers = tuple(experts > 0 and i not in dense_only and (i + 1) % step == 0 for i in range(layers))
    return dict(
        num_experts=experts,
        num_experts_per_tok=int(d.get("num_experts_per_tok", 0)),
        moe_intermediate_size=int(d["moe_intermediate_size"]),
        norm_topk_prob=bool(d.get("norm_topk_prob", False)),
        shared_expert_intermediate_size=int(d.get("shared_expert_intermediate_size", 0)) if mt == "qwen2_moe" else 0,
        moe_layers=moe_layers,
    )


def _mla(d: dict[str, Any], rope: RopeConfig) -> MLAConfig:
    nope, rot = int(d["qk_nope_head_dim"]), int(d["qk_rope_head_dim"])
    scale = (nope + rot) ** -0.5
    if rope.rope_type != "default" and rope.mscale_all_dim:  # transformers' yarn_apply_mscale
        m = _yarn_mscale(rope.factor, rope.mscale_all_dim)
        scale = scale * m * m
    return MLAConfig(q_lora_rank=int(d.get("q_lora_rank") or 0), kv_lora_rank=int(d["kv_lora_rank"]),
                     qk_nope_head_dim=nope, qk_rope_head_dim=rot, v_head_dim=int(d["v_head_dim"]),
                     rope_interleave=bool(d.get("rope_interleave", True)), softmax_scale=scale)  # fmt: skip


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _rope(d: dict[str, Any]) -> RopeConfig:
    params = d.get("rope_parameters")
    if params is not None and not isinstance(params, dict):
        raise ValueError(f"rope_parameters must be a dict, got {params!r}")
    if params and "rope_theta" not in params and all(isinstance(v, dict) for v in params.values()):
        raise ValueError("per-layer-type rope_parameters are not supported")
    scaling = dict(params or d.get("rope_scaling") or {})
    theta = float(scaling.pop("rope_theta", d.get("rope_theta", 10000.0)))
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope_type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    prf = scaling.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
    if prf not in (None, 1, 1.0):
        raise ValueError(f"partial_rotary_factor={prf} is not supported (rotary over the whole head only)")
    if rope_type == "default":
        return RopeConfig(theta=theta)
    if rope_type == "linear":
        return RopeConfig(theta=theta, rope_type="linear", factor=float(scaling["factor"]))
    if rope_type == "yarn":
        factor = float(scaling["factor"])
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention_factor = scaling.get("attention_factor")
        if attention_factor is None:  # transformers' _compute_yarn_parameters
            attention_factor = (_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
                                if mscale and mscale_all_dim else _yarn_mscale(factor))  # fmt: skip
        return RopeConfig(
            theta=theta, rope_type="yarn", factor=factor,
            original_max_position_embeddings=int(scaling.get("original_max_position_embeddings")
                                                 or d.get("max_position_embeddings", 8192)),
            beta_fast=float(scaling.get("beta_fast") or 32), beta_slow=float(scaling.get("beta_slow") or 1),
            attention_factor=float(attention_factor), truncate=bool(scaling.get("truncate", True)),
            mscale_all_dim=float(mscale_all_dim or 0.0),
        )  # fmt: skip
    return RopeConfig(
        theta=theta,
        rope_type="llama3",
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
    )


def _attention_layout(mt: str, d: dict[str, Any], layers: int) -> tuple[int | None, tuple[str, ...]]:
    """(sliding_window, layer_types) as transformers resolves them."""
    window = d.get("sliding_window")
    types = d.get("layer_types")
    if types is not None:
        bad = sorted(set(types) - {"full_attention", "sliding_attention"})
        if bad:
            raise ValueError(f"{mt}: layer types {bad} are not supported")
        return (int(window) if window else None), tuple(types)
    if mt == "mistral":  # every layer slides when a window is set
        return (int(window) if window else None), ("sliding_attention" if window else "full_attention",) * layers
    if mt in ("qwen2", "qwen3") and d.get("use_sliding_window") and window:
        first = int(d.get("max_window_layers", layers))
        return int(window), tuple("sliding_attention" if i >= first else "full_attention" for i in range(layers))
    return None, ("full_attention",) * layers
