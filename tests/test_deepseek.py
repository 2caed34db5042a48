"""DeepSeek-V3 (the architecture of Moonlight-16B-A3B and Kimi-K2) end to end: conversion quantizes every
latent-attention and expert Linear and keeps the fp32 router and its correction bias; the engine's latent
KV cache gives the logprobs and expert choices of a full forward; a bf16 QAT trainer hands the engine its
fake-quantized weights bitwise and its fp32 router unrounded; it trains in every mode.

Shapes: hidden 128, latent 128, queries through a rank-128 path, 2 heads of 64 + 32 (rotary) dims, values
64, experts 128 wide in 2 groups of 4, top-2 of the best group, a shared expert, a dense first layer.
"""

import json

import pytest
import torch
from _tiny_models import bf16_fp8_int4, deepseek_v3_config, lm_loss, pattern_batch, random_prompts
from safetensors.torch import load_file

from quantrl.checkpoint.convert_int import IntConvertOptions, convert_to_int
from quantrl.formats import fake_quantize_fp8, fake_quantize_int
from quantrl.model import Fp8Linear, QuantScheme, W4A16Linear, build_model, dequantized_weights, load_model
from quantrl.model.moe import Fp32Router, Routing
from quantrl.rollout import Engine, SamplingParams
from quantrl.sync import sync_weights
from quantrl.train.logprobs import token_logprobs
from quantrl.train.qat import QATConfig, QATLinear, prepare_qat
from quantrl.train.trainer import TrainConfig, Trainer

GROUP = 32
LOGPROB_ATOL = 1e-5
ROUTERS = ["model.layers.1.mlp.gate", "model.layers.2.mlp.gate"]  # layer 0 is dense (first_k_dense_replace)
ATTENTION = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")


def ds_cfg(**kw):
    return deepseek_v3_config(hidden_size=128, intermediate_size=256, moe_intermediate_size=128, num_attention_heads=2,
                              num_key_value_heads=2, q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=64,
                              qk_rope_head_dim=32, v_head_dim=64, **kw)  # fmt: skip


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return bf16_fp8_int4(ds_cfg(), tmp_path_factory.mktemp("deepseek"), GROUP)


FAKE = {
    "fp8": (Fp8Linear, lambda w: fake_quantize_fp8(w)),
    "int4": (W4A16Linear, lambda w: fake_quantize_int(w, 4, GROUP, 7)),
}


def quantized_names() -> list[str]:
    attn = [f"model.layers.{i}.self_attn.{p}.weight" for i in range(3) for p in ATTENTION]
    mlps = ["model.layers.0.mlp"] + [f"model.layers.{i}.mlp.{e}" for i in (1, 2)
                                     for e in ["shared_experts", *(f"experts.{j}" for j in range(8))]]  # fmt: skip
    return attn + [f"{m}.{p}_proj.weight" for m in mlps for p in ("gate", "up", "down")]


@pytest.mark.parametrize("kind", list(FAKE))
def test_conversion_quantizes_latent_attention_and_experts_keeps_the_router(ckpts, kind):
    cls, fake = FAKE[kind]
    qc = json.loads((ckpts[kind] / "config.json").read_text())["quantization_config"]
    assert set(ROUTERS) <= set(qc.get("modules_to_not_convert") or qc.get("ignore"))
    stored, src = load_file(ckpts[kind] / "model.safetensors"), load_file(ckpts["bf16"] / "model.safetensors")
    for r in ROUTERS:  # byte-identical, never quantized
        for t in ("weight", "e_score_correction_bias"):
            assert torch.equal(stored[f"{r}.{t}"], src[f"{r}.{t}"])
    model = load_model(ckpts[kind], dtype=torch.bfloat16)
    modules, deq = dict(model.named_modules()), dequantized_weights(model)
    assert all(isinstance(modules[r], Fp32Router) and modules[r].weight.dtype == torch.float32 for r in ROUTERS)
    names = quantized_names()
    assert len(names) == 3 * 5 + 3 + 2 * 9 * 3
    for name in names:
        assert isinstance(modules[name.removesuffix(".weight")], cls), name
        assert torch.equal(deq[name], fake(src[name]).to(torch.bfloat16)), name


@pytest.mark.parametrize("kind", ["bf16", "int4"])
def test_latent_kv_cache_gives_the_full_forwards_logprobs_and_experts(ckpts, kind):
    """Prefill, decode and slot compaction through the cached latents: every sampled token's logprob and
    every token's experts are those of one full-sequence forward."""
    model = load_model(ckpts[kind], dtype=torch.float32)
    prompts = random_prompts([5, 12, 3], seed=1)
    engine = Engine(model, kv_cache_tokens=60, max_prefill_tokens=16)  # 3 slots for 6 samples
    assert engine.cache.bytes_per_token == 3 * (128 + 32) * 4  # the latent + the shared roped key, not 2 x heads
    params = SamplingParams(n=2, temperature=0.8, max_new_tokens=8, seed=0, return_routing=True)
    results = engine.generate(prompts, params)
    assert len(results) == 6
    for r in results:
        ids = torch.tensor([prompts[r.prompt_index] + r.tokens])
        routing = Routing(record=True)
        with torch.no_grad():
            expected = token_logprobs(model, ids, temperature=0.8, routing=routing)[0][0, len(prompts[r.prompt_index]) - 1 :]
        assert torch.allclose(torch.tensor(r.logprobs), expected, rtol=0, atol=LOGPROB_ATOL)
        full = routing.stacked(1, ids.shape[1])[0, :-1]  # [P + G - 1, L_moe, k]
        assert torch.equal(r.routing.long().sort(-1).values, full.long().sort(-1).values)


def test_bf16_qat_trainer_syncs_fake_quant_experts_and_the_fp32_router(ckpts):
    trainer = load_model(ckpts["bf16"], dtype=torch.bfloat16)
    prepare_qat(trainer, QATConfig(group_size=GROUP, qmax=7, dtype=torch.bfloat16))
    engine = Engine(build_model(trainer.config, QuantScheme.int4(GROUP), dtype=torch.bfloat16), kv_cache_tokens=256)
    sync_weights(trainer, engine, version=1, check_equal=True)
    deq = dequantized_weights(engine.model)
    swapped = {n for n, m in trainer.named_modules() if isinstance(m, QATLinear)}
    assert swapped == {n.removesuffix(".weight") for n in quantized_names()}
    for name in swapped:
        with torch.no_grad():
            assert torch.equal(deq[f"{name}.weight"], trainer.get_submodule(name).fake_quantized_weight()), name
    for r in ROUTERS:
        for t in ("weight", "e_score_correction_bias"):
            got = engine.model.get_parameter(f"{r}.{t}")
            assert got.dtype == torch.float32 and torch.equal(got, trainer.get_parameter(f"{r}.{t}")), (r, t)


@pytest.mark.parametrize("mode", ["bf16", "int4-qat", "fp8"])
def test_deepseek_trains_the_router_not_its_bias(ckpts, mode):
    torch.manual_seed(0)
    model = load_model(ckpts["bf16"], dtype=torch.bfloat16).train()
    router, bias = (model.get_parameter(f"{ROUTERS[0]}.{t}") for t in ("weight", "e_score_correction_bias"))
    before = router.detach().clone(), bias.detach().clone()
    tr = Trainer(model, TrainConfig(mode=mode, lr=3e-3, micro_batch_size=4, qat_group_size=GROUP))
    batch = pattern_batch()  # a learnable pattern
    losses = [tr.train_step(batch, lm_loss)["loss"] for _ in range(12)]
    assert losses[-1] < 0.7 * losses[0], losses
    assert router.dtype == torch.float32 and not torch.equal(router.detach(), before[0])
    assert torch.equal(bias, before[1])  # moved only by load balancing, which is not a gradient


def test_bf16_checkpoint_keeps_the_router_fp32(ckpts, tmp_path):
    model = load_model(ckpts["bf16"], dtype=torch.bfloat16)
    with torch.no_grad():
        model.get_parameter(f"{ROUTERS[0]}.e_score_correction_bias").add_(1e-4)  # not representable in bf16
    out = Trainer(model, TrainConfig(mode="int4-qat", qat_group_size=GROUP)).save_checkpoint(tmp_path / "c", ckpts["bf16"])
    saved = load_file(out / "model.safetensors")
    assert {saved[f"{r}.{t}"].dtype for r in ROUTERS for t in ("weight", "e_score_correction_bias")} == {torch.float32}
    assert saved["model.layers.0.self_attn.o_proj.weight"].dtype == torch.bfloat16
    back = load_model(out, dtype=torch.bfloat16)
    for name, p in model.named_parameters():
        assert torch.equal(back.get_parameter(name), p), name


def test_gptq_on_a_deepseek_checkpoint(ckpts, tmp_path):
    """GPTQ through transformers' DeepSeek-V3 layers: every latent-attention Linear, the dense MLP, the shared
    expert and every routed expert (on its routed tokens) calibrated; routers untouched."""
    import shutil

    from quantrl.tasks.tokenizer import build_tokenizer

    src = tmp_path / "bf16"
    shutil.copytree(ckpts["bf16"], src)
    build_tokenizer().save_pretrained(src)  # calibration text needs a tokenizer; its ids fit the 300-row vocab
    opts = IntConvertOptions(method="gptq", group_size=GROUP, data_dir="synthetic", num_calibration_samples=8,
                             max_sequence_length=64)  # fmt: skip
    out = convert_to_int(src, tmp_path / "gptq", opts, progress=False).output_dir
    deq = dequantized_weights(load_model(out, dtype=torch.bfloat16))
    orig = load_file(src / "model.safetensors")
    names = quantized_names()
    rtn = {n: FAKE["int4"][1](orig[n]).to(torch.bfloat16) for n in names}
    same = [n for n in names if torch.equal(deq[n], rtn[n])]
    # an expert no calibration token reached is rounded to nearest (H = I); all others moved
    assert all(".experts." in n for n in same) and len(same) < len(names) // 4, same
    assert all(torch.equal(load_file(out / "model.safetensors")[f"{r}.weight"], orig[f"{r}.weight"]) for r in ROUTERS)


@pytest.mark.parametrize("kind", list(FAKE))
def test_transformers_reads_our_deepseek_checkpoints(ckpts, kind):
    """transformers' DeepSeek-V3 fuses our per-expert tensors (gate_up_proj [E, 2I, H]) and dequantizes
    (FP8, CPU) or decompresses (INT4, compressed-tensors) them to our fake quantization; FP8 attention
    Linears too, where the output width is a whole number of 128-blocks (its loader gets ragged ones, here
    q_b_proj's 192 and kv_a_proj_with_mqa's 160 rows, wrong: see tests/test_convert_fp8.py)."""
    from transformers import AutoModelForCausalLM

    state = AutoModelForCausalLM.from_pretrained(ckpts[kind], dtype=torch.bfloat16).state_dict()
    fake = FAKE[kind][1]
    src = load_file(ckpts["bf16"] / "model.safetensors")
    for layer in (1, 2):
        gate_up = state[f"model.layers.{layer}.mlp.experts.gate_up_proj"]
        down = state[f"model.layers.{layer}.mlp.experts.down_proj"]
        for e in range(8):
            g, u, d = (fake(src[f"model.layers.{layer}.mlp.experts.{e}.{p}_proj.weight"]).to(torch.bfloat16)
                       for p in ("gate", "up", "down"))  # fmt: skip
            assert torch.equal(gate_up[e].to(torch.bfloat16), torch.cat([g, u])), (layer, e)
            assert torch.equal(down[e].to(torch.bfloat16), d), (layer, e)
    if kind == "fp8":
        for name in [f"model.layers.{i}.self_attn.{p}.weight" for i in range(3) for p in ("q_a_proj", "kv_b_proj", "o_proj")]:
            assert torch.equal(state[name].to(torch.bfloat16), fake(src[name]).to(torch.bfloat16)), name


@pytest.mark.parametrize("kind", ["bf16", "int4", "fp8"])
def test_absorbed_decode_equals_the_expansion_and_follows_updates(ckpts, kind, monkeypatch):
    """Decode attends in latent space through kv_b_proj's absorbed weight (weight-only formats): the same
    samples and logprobs as expanding every cached latent, and after a weight update the absorbed weight
    is the new one. FP8's kv_b_proj also quantizes its input latents per call, which the absorbed form
    skips (SGLang's choice, the default): its logprobs stay near the W8A8 forward's, not equal to them;
    ``absorb_fp8_decode = False`` expands and is exact."""
    from quantrl.model import engine_state
    from quantrl.model.decoder import MLAttention

    model = load_model(ckpts[kind], dtype=torch.float32)
    prompts = random_prompts([5, 9], seed=2)
    params = SamplingParams(n=2, temperature=0.9, max_new_tokens=8, seed=1)

    def gaps(results):  # |engine - full forward| of every sampled token
        out = []
        for r in results:
            ids = torch.tensor([prompts[r.prompt_index] + r.tokens])
            with torch.no_grad():
                lp = token_logprobs(model, ids, temperature=0.9)[0][0, len(prompts[r.prompt_index]) - 1 :]
            out.append((torch.tensor(r.logprobs) - lp).abs())
        return torch.cat(out)

    absorbed = Engine(model, kv_cache_tokens=256).generate(prompts, params)
    attn = model.model.layers[1].self_attn
    assert attn._w is not None
    if kind == "fp8":
        near = gaps(absorbed)
        assert 1e-4 < float(near.mean()) < 1e-2 and float(near.max()) < 0.1, near
        monkeypatch.setattr(MLAttention, "absorb_fp8_decode", False)
        assert float(gaps(Engine(model, kv_cache_tokens=256).generate(prompts, params)).max()) <= LOGPROB_ATOL
    else:
        monkeypatch.setattr(MLAttention, "absorb_decode", False)
        expanded = Engine(model, kv_cache_tokens=256).generate(prompts, params)
        assert [r.tokens for r in absorbed] == [r.tokens for r in expanded]
        assert max(abs(a - b) for x, y in zip(absorbed, expanded) for a, b in zip(x.logprobs, y.logprobs)) < 1e-5
    monkeypatch.undo()
    engine = Engine(model, kv_cache_tokens=256)
    engine.generate(prompts, params)  # the absorbed weights now cached
    other = load_model(ckpts[kind], dtype=torch.float32)
    update = {n: t.clone() for n, t in engine_state(other).items()}
    name = next(n for n in update if "layers.1.self_attn.kv_b_proj" in n and update[n].is_floating_point())
    update[name] = update[name].flip(0).contiguous()  # another kv_b_proj for layer 1
    engine.update_weights(update.items(), version=1)
    after = engine.generate(prompts, params)
    lin = model.model.layers[1].self_attn.kv_b_proj
    assert torch.equal(attn._w.view(-1, attn._w.shape[-1]), lin.dequantized_weight(torch.float32))  # refreshed
    if kind != "fp8":
        assert float(gaps(after).max()) <= LOGPROB_ATOL


def test_multi_token_prediction_layers_are_skipped_with_a_warning(ckpts, tmp_path):
    """DeepSeek-V3's checkpoints store their MTP layer after the decoder's (model.layers.61 of 61); we, like
    transformers, decode next tokens only: such tensors are skipped, other strays still fail the load."""
    import shutil

    from safetensors.torch import save_file

    from quantrl.checkpoint.safetensors_io import CheckpointError

    src = tmp_path / "mtp"
    shutil.copytree(ckpts["bf16"], src)
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.3.eh_proj.weight"] = torch.zeros(128, 256, dtype=torch.bfloat16)  # the MTP layer's
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.warns(UserWarning, match="1 multi-token-prediction layer"):
        model = load_model(src, dtype=torch.float32)
    assert model.config.mtp_layers == 1
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "num_nextn_predict_layers": 0}))
    with pytest.raises(CheckpointError, match="unexpected"):
        load_model(src, dtype=torch.float32)
