"""Our decoder against transformers on tiny fp32 checkpoints (Qwen3, Llama-3 rope scaling, Qwen3 with YaRN,
Qwen2 with biases and tied embeddings, Mistral sliding window, Qwen3-MoE with a dense layer between MoE
layers, Qwen2-MoE with a shared expert, DeepSeek-V3 (latent attention with low-rank queries, YaRN, grouped
sigmoid routing with a correction bias, a shared expert) and Moonlight's variant of it).

Logit tolerance: max |ours - HF| over real tokens <= 1e-4 * max |HF| (fp32; both compute the same
function, differences are summation order only, measured ~3e-7).
"""

import pytest
import torch
from _tiny_models import (
    deepseek_v3_config,
    llama3_config,
    mistral_config,
    moonlight_config,
    qwen2_moe_config,
    qwen2_tied_config,
    qwen3_config,
    qwen3_moe_config,
    qwen3_yarn_config,
    random_prompts,
    reference,
    save_model,
)

from quantrl.model import ModelConfig, load_model
from quantrl.model.rope import inv_freq
from quantrl.rollout import Engine, SamplingParams

CONFIGS = {
    "qwen3": qwen3_config,
    "llama3": llama3_config,
    "qwen3_yarn": qwen3_yarn_config,
    "qwen2_tied": qwen2_tied_config,
    "mistral_swa": mistral_config,
    "qwen3_moe": qwen3_moe_config,
    "qwen2_moe": qwen2_moe_config,
    "deepseek_v3": deepseek_v3_config,
    "moonlight": moonlight_config,
}
MOE = ("qwen3_moe", "qwen2_moe", "deepseek_v3", "moonlight")
REL_TOL = 1e-4



@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (HF reference, ours), both fp32 from the same saved checkpoint."""
    out = {}
    for name, make in CONFIGS.items():
        path = save_model(make(), tmp_path_factory.mktemp(name))
        out[name] = (reference(path), load_model(path, dtype=torch.float32))
    return out


def _rel_err(ours: torch.Tensor, ref: torch.Tensor, real: torch.Tensor) -> float:
    return float(((ours - ref).abs() * real[..., None]).max() / ref.abs().max())


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("side", ["left", "right"])
def test_logits_match_transformers_on_padded_batches(models, name, side, gen):
    ref, ours = models[name]
    b, t = 3, 14
    ids = torch.randint(0, ref.config.vocab_size, (b, t), generator=gen)
    mask = torch.ones(b, t, dtype=torch.long)
    if side == "left":
        mask[0, :5], mask[1, :1] = 0, 0
    else:
        mask[0, 9:], mask[2, 4:] = 0, 0
    positions = (mask.cumsum(-1) - 1).clamp_min(0)  # what HF generate passes; HF forward would not derive it
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        got = ours(ids, attention_mask=mask)
    assert got.shape == expected.shape
    assert _rel_err(got, expected, mask) <= REL_TOL


@pytest.mark.parametrize("name", ["qwen3", "llama3", "qwen3_moe", "deepseek_v3", "moonlight"])
def test_greedy_generation_matches_transformers(models, name):
    ref, ours = models[name]
    prompts = random_prompts([4, 11, 7], seed=3)
    got = Engine(ours, kv_cache_tokens=1024).generate(prompts, SamplingParams(temperature=0, max_new_tokens=12))
    for p, r in zip(prompts, got):
        ids = torch.tensor([p])
        out = ref.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                           eos_token_id=None, pad_token_id=0)  # fmt: skip
        assert r.tokens == out[0, len(p):].tolist()
        assert r.finish_reason == "length"


def test_parameter_names_are_hf_names(models):
    # transformers 5 fuses MoE experts in memory (experts.gate_up_proj) and splits them again on save;
    # our MoE names are the checkpoint's, which load_model already requires one to one
    for name, (ref, ours) in models.items():
        if name not in MOE:
            assert set(dict(ours.named_parameters())) == set(dict(ref.named_parameters())), name


@pytest.mark.parametrize("name", MOE)
def test_moe_dense_dispatch_equals_grouped(models, name, gen):
    """The CUDA-graph (dense) dispatch computes the eager (grouped) one's sum: zero weights add nothing."""
    from quantrl.model.moe import dense_dispatch

    _, ours = models[name]
    ids = torch.randint(0, ours.config.vocab_size, (3, 10), generator=gen)
    with torch.no_grad():
        grouped = ours(ids)
        with dense_dispatch():
            dense = ours(ids)
    assert float((dense - grouped).abs().max() / grouped.abs().max()) <= 1e-6


def test_moe_config_layers_and_experts(models):
    q3 = models["qwen3_moe"][1].config
    assert q3.moe_layers == (True, False, True) and (q3.num_experts, q3.num_experts_per_tok) == (6, 2)
    assert q3.norm_topk_prob and q3.qk_norm and not q3.shared_expert_intermediate_size
    q2 = models["qwen2_moe"][1].config
    assert q2.moe_layers == (False, True) and q2.shared_expert_intermediate_size == 80 and q2.qkv_bias
    hub_style = {**qwen3_moe_config().to_dict(), "num_experts": 6}  # the hub's key, not transformers 5's
    hub_style.pop("num_local_experts", None)
    assert ModelConfig.from_hf(hub_style).num_experts == 6
    with pytest.raises(ValueError, match="num_experts_per_tok=7"):
        ModelConfig.from_hf({**hub_style, "num_experts_per_tok": 7})
    with pytest.raises(ValueError, match="use_sliding_window"):
        ModelConfig.from_hf({**hub_style, "use_sliding_window": True})


def test_deepseek_v3_config_and_routing(models, gen):
    ref, ours = models["deepseek_v3"]
    c = ours.config
    assert c.moe_layers == (False, True, True) and (c.n_group, c.topk_group, c.routed_scaling_factor) == (2, 1, 2.5)
    assert c.shared_experts_intermediate_size == 32 and c.mla.q_lora_rank == 32 and c.head_dim == 8
    assert models["moonlight"][1].config.mla.q_lora_rank == 0
    assert ours.model.layers[1].mlp.gate.weight.dtype == torch.float32
    # the correction bias moves choices: zeroed, the same router picks other experts for some tokens
    from quantrl.model.moe import route_grouped

    gate = ours.model.layers[1].mlp.gate
    logits = gate(torch.randn(64, c.hidden_size, generator=gen))
    kw = dict(top_k=2, n_group=2, topk_group=1, normalize=True, scaling=2.5)
    w, experts, _ = route_grouped(logits, gate.e_score_correction_bias, **kw)
    _, unbiased, _ = route_grouped(logits, torch.zeros_like(gate.e_score_correction_bias), **kw)
    assert (experts.sort(-1).values != unbiased.sort(-1).values).any()
    assert ((experts // 4) == (experts[:, :1] // 4)).all()  # both experts from the one chosen group
    torch.testing.assert_close(w.sum(-1), torch.full((64,), 2.5))  # renormalised, then scaled


def test_kimi_k2_config_reads_as_deepseek_v3(models):
    """Kimi-K2's config.json: model_type kimi_k2 (remote code in transformers), transformers 4's rope dialect;
    the same architecture and numbers as DeepSeek-V3's."""
    d = deepseek_v3_config().to_dict()
    rope = d.pop("rope_parameters")
    kimi = {**d, "model_type": "kimi_k2", "rope_theta": rope["rope_theta"],
            "rope_scaling": {"type": "yarn", **{k: v for k, v in rope.items() if k not in ("rope_type", "rope_theta")}}}  # fmt: skip
    assert ModelConfig.from_hf(kimi) == models["deepseek_v3"][1].config


def test_yarn_inv_freq_equals_transformers(models):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for name in ("qwen3_yarn", "deepseek_v3"):
        ref, ours = models[name]
        expected, factor = ROPE_INIT_FUNCTIONS["yarn"](ref.config, "cpu")
        assert torch.equal(inv_freq(ours.config.rope, ours.config.head_dim), expected), name
        assert ours.config.rope.attention_factor == factor, name
    assert models["qwen3_yarn"][1].config.rope.attention_factor > 1.1  # Qwen3's YaRN scales cos/sin; DeepSeek's
    # mscale = mscale_all_dim cancels there and goes into the softmax scale instead
    assert models["deepseek_v3"][1].config.mla.softmax_scale > (16 + 8) ** -0.5


def test_llama3_inv_freq_equals_transformers(models):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    ref, ours = models["llama3"]
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](ref.config, "cpu")
    got = inv_freq(ours.config.rope, ours.config.head_dim)
    assert torch.equal(got, expected)
    unscaled = ModelConfig.from_hf({**ref.config.to_dict(), "rope_parameters": {"rope_theta": 50000.0}})
    assert not torch.equal(got, inv_freq(unscaled.rope, unscaled.head_dim))  # the scaling does something


def test_config_reads_both_rope_dialects_and_biases():
    v4 = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
          "num_attention_heads": 2, "rope_theta": 5e5, "attention_bias": True,
          "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 8192}}  # fmt: skip
    cfg = ModelConfig.from_hf(v4)
    assert (cfg.rope.rope_type, cfg.rope.theta, cfg.num_kv_heads, cfg.head_dim) == ("llama3", 5e5, 2, 4)
    assert cfg.qkv_bias and cfg.o_bias and not cfg.qk_norm
    qwen2 = ModelConfig.from_hf(qwen2_tied_config().to_dict())
    assert qwen2.qkv_bias and not qwen2.o_bias and qwen2.tie_word_embeddings


def test_unsupported_configs_raise_clearly():
    with pytest.raises(ValueError, match="unsupported model_type 'gemma2'"):
        ModelConfig.from_hf({"model_type": "gemma2"})
    bad_rope = {**qwen3_config().to_dict(), "rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}
    with pytest.raises(ValueError, match="rope_type 'longrope'"):
        ModelConfig.from_hf(bad_rope)
    with pytest.raises(ValueError, match="noaux_tc"):
        ModelConfig.from_hf({**deepseek_v3_config().to_dict(), "topk_method": "greedy"})
    with pytest.raises(ValueError, match="n_group=3 must divide"):
        ModelConfig.from_hf({**deepseek_v3_config().to_dict(), "n_group": 3})
