"""Mixture-of-experts end to end: Qwen3-MoE checkpoints convert to FP8 / INT4 with routers kept in BF16,
transformers reads the experts we wrote, the engine's sampling logprobs equal a full forward, the training
swaps (QAT, FP8) take every expert and never a router, and a sync hands the engine exactly the QAT
forward's expert weights (bitwise), so the INT4 engine and the QAT trainer route and score alike.

Shapes: hidden 256, expert width 128, dense width 256 — every K a multiple of 128, so FP8 blocks are
whole (transformers fuses experts into one [E, 2I, H] tensor, and that only dequantizes block scales
correctly when I is a multiple of the block) and QAT can use group 128.
"""

import json

import pytest
import torch
from _tiny_models import qwen3_moe_config, random_prompts, save_model
from safetensors.torch import load_file

from quantrl.checkpoint.convert_fp8 import convert_to_fp8
from quantrl.checkpoint.convert_int import IntConvertOptions, convert_to_int
from quantrl.formats import fake_quantize_fp8, fake_quantize_int
from quantrl.model import Bf16Linear, Fp8Linear, QuantScheme, W4A16Linear, build_model, dequantized_weights, load_model
from quantrl.model.moe import SparseMoeBlock
from quantrl.rollout import Engine, SamplingParams
from quantrl.sync import sync_weights
from quantrl.train.fp8_linear import Fp8BlockTrainLinear, prepare_fp8_training
from quantrl.train.logprobs import token_logprobs
from quantrl.train.qat import QATConfig, QATLinear, prepare_qat
from quantrl.train.trainer import TrainConfig, Trainer

GROUP = 32
LOGPROB_ATOL = 1e-5
ROUTERS = ["model.layers.0.mlp.gate", "model.layers.2.mlp.gate"]  # layer 1 is dense (mlp_only_layers)
N_EXPERT_LINEARS = 2 * 6 * 3  # two MoE layers x six experts x gate/up/down


def moe_cfg(**kw):
    return qwen3_moe_config(hidden_size=256, intermediate_size=256, moe_intermediate_size=128, head_dim=64, **kw)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    base = tmp_path_factory.mktemp("moe")
    src = save_model(moe_cfg(), base / "bf16", dtype=torch.bfloat16)
    return {
        "bf16": src,
        "fp8": convert_to_fp8(src, base / "fp8", progress=False).output_dir,
        "int4": convert_to_int(src, base / "int4", IntConvertOptions(method="rtn", group_size=GROUP),
                               progress=False).output_dir,
    }  # fmt: skip


FAKE = {
    "fp8": (Fp8Linear, lambda w: fake_quantize_fp8(w)),
    "int4": (W4A16Linear, lambda w: fake_quantize_int(w, 4, GROUP, 7)),
}


def expert_names(layer: int, expert: int) -> list[str]:
    return [f"model.layers.{layer}.mlp.experts.{expert}.{p}_proj.weight" for p in ("gate", "up", "down")]


@pytest.mark.parametrize("kind", list(FAKE))
def test_converted_experts_quantized_routers_kept(ckpts, kind):
    cls, fake = FAKE[kind]
    qc = json.loads((ckpts[kind] / "config.json").read_text())["quantization_config"]
    kept = qc.get("modules_to_not_convert") or qc.get("ignore")
    assert set(ROUTERS) <= set(kept)
    stored = load_file(ckpts[kind] / "model.safetensors")
    src = load_file(ckpts["bf16"] / "model.safetensors")
    for r in ROUTERS:  # byte-identical, never quantized
        assert torch.equal(stored[f"{r}.weight"], src[f"{r}.weight"])

    model = load_model(ckpts[kind], dtype=torch.bfloat16)
    linears = dict(model.named_modules())
    assert all(type(linears[r]) is Bf16Linear for r in ROUTERS)
    deq = dequantized_weights(model)
    experts = [n for layer in (0, 2) for e in range(6) for n in expert_names(layer, e)]
    assert len(experts) == N_EXPERT_LINEARS
    for name in experts:
        assert isinstance(linears[name.removesuffix(".weight")], cls), name
        assert torch.equal(deq[name], fake(src[name]).to(torch.bfloat16)), name


@pytest.mark.parametrize("kind", list(FAKE))
def test_transformers_reads_our_experts(ckpts, kind):
    """transformers fuses experts on load (gate_up_proj [E, 2I, H], down_proj [E, H, I]); what it holds
    after dequantizing (CPU) or decompressing (compressed-tensors) is our fake quantization, expert by expert."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(ckpts[kind], dtype=torch.bfloat16)
    state = ref.state_dict()
    _, fake = FAKE[kind]
    src = load_file(ckpts["bf16"] / "model.safetensors")
    for layer in (0, 2):
        gate_up = state[f"model.layers.{layer}.mlp.experts.gate_up_proj"]
        down = state[f"model.layers.{layer}.mlp.experts.down_proj"]
        for e in range(6):
            g, u, d = (fake(src[n]).to(torch.bfloat16) for n in expert_names(layer, e))
            assert torch.equal(gate_up[e].to(torch.bfloat16), torch.cat([g, u])), (layer, e)
            assert torch.equal(down[e].to(torch.bfloat16), d), (layer, e)
        assert torch.equal(state[f"model.layers.{layer}.mlp.gate.weight"], src[f"model.layers.{layer}.mlp.gate.weight"])


@pytest.mark.parametrize("kind", ["bf16", "int4"])
def test_engine_logprobs_equal_full_forward(ckpts, kind):
    """Prefill, decode and slot compaction route every token as one full-sequence forward does.

    (FP8 is W8A8 with dynamic activation scales: an fp32-rounding difference between two batch shapes can
    move an activation across an e4m3 rounding boundary, and a router near a tie then picks another
    expert for a prompt token, which every later token sees through the KV cache: measured up to 1.6e-2
    on this model. The routing-replay tests hold FP8 to the bound.)"""
    model = load_model(ckpts[kind], dtype=torch.float32)
    prompts = random_prompts([5, 12, 3], seed=1)
    engine = Engine(model, kv_cache_tokens=60, max_prefill_tokens=16)  # 3 slots for 6 samples
    results = engine.generate(prompts, SamplingParams(n=2, temperature=0.8, max_new_tokens=8, seed=0))
    assert len(results) == 6
    for r in results:
        prompt = prompts[r.prompt_index]
        with torch.no_grad():
            expected = token_logprobs(model, torch.tensor([prompt + r.tokens]), temperature=0.8)[0][0, len(prompt) - 1 :]
        assert torch.allclose(torch.tensor(r.logprobs), expected, rtol=0, atol=LOGPROB_ATOL)


def test_training_swaps_take_experts_not_routers(ckpts):
    for prepare, cls in ((lambda m: prepare_qat(m, QATConfig(group_size=128, qmax=7)), QATLinear),
                         (lambda m: prepare_fp8_training(m), Fp8BlockTrainLinear)):  # fmt: skip
        model = load_model(ckpts["bf16"], dtype=torch.bfloat16)
        swapped = set(prepare(model))
        assert not swapped & set(ROUTERS)
        experts = {n.removesuffix(".weight") for layer in (0, 2) for e in range(6) for n in expert_names(layer, e)}
        assert experts <= swapped and len(swapped) == N_EXPERT_LINEARS + 3 * 4 + 3  # + attention, + dense MLP
        assert all(isinstance(model.get_submodule(n), cls) for n in swapped)


def test_int4_qat_sync_gives_the_engine_the_trainers_experts_and_routing(ckpts):
    trainer = load_model(ckpts["bf16"], dtype=torch.float32)
    prepare_qat(trainer, QATConfig(group_size=128, qmax=7, dtype=torch.float32))
    engine_scheme = QuantScheme(method="int", num_bits=4, group_size=128, scale_dtype=torch.float32)
    engine = Engine(build_model(trainer.config, engine_scheme, dtype=torch.float32), kv_cache_tokens=256)
    sync_weights(trainer, engine, version=1, check_equal=True)

    deq = dequantized_weights(engine.model)
    for name, mod in trainer.named_modules():
        if isinstance(mod, QATLinear):
            with torch.no_grad():
                assert torch.equal(deq[f"{name}.weight"], mod.fake_quantized_weight()), name
    for r in ROUTERS:
        assert torch.equal(deq[f"{r}.weight"], trainer.get_parameter(f"{r}.weight").detach())

    prompts = random_prompts([4, 9], seed=2)
    results = engine.generate(prompts, SamplingParams(n=2, temperature=0.9, max_new_tokens=8, seed=0))
    for r in results:
        prompt = prompts[r.prompt_index]
        with torch.no_grad():
            lp = token_logprobs(trainer, torch.tensor([prompt + r.tokens]), temperature=0.9)[0][0, len(prompt) - 1 :]
        assert torch.allclose(torch.tensor(r.logprobs), lp, rtol=0, atol=LOGPROB_ATOL)


@pytest.mark.parametrize("mode", ["bf16", "int4-qat", "fp8"])
def test_moe_model_trains_and_the_router_learns(ckpts, mode):
    torch.manual_seed(0)
    model = load_model(ckpts["bf16"], dtype=torch.bfloat16).train()
    router_before = model.get_parameter(f"{ROUTERS[0]}.weight").detach().clone()
    tr = Trainer(model, TrainConfig(mode=mode, lr=3e-3, micro_batch_size=4, qat_group_size=128))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 300, (8, 1), generator=g)
    ids = torch.cat([ids] + [(ids * 7 + i) % 300 for i in range(1, 16)], 1)  # a learnable pattern
    am = torch.ones_like(ids)
    batch = {"input_ids": ids, "attention_mask": am, "loss_mask": am.clone()}

    def loss(m, micro):
        logp, _ = token_logprobs(m, micro["input_ids"], micro["attention_mask"])
        mask = micro["loss_mask"][:, 1:]
        return -(logp * mask).sum(), {"tokens": float(mask.sum())}

    losses = [tr.train_step(batch, loss)["loss"] for _ in range(15)]
    assert losses[-1] < 0.7 * losses[0], losses
    assert not torch.equal(model.get_parameter(f"{ROUTERS[0]}.weight").detach(), router_before)


def test_moe_block_routes_top_k_with_weights(gen):
    """One token's output is the weighted sum of exactly its top-k experts (renormalised)."""
    model = load_model_from_cfg(moe_cfg())
    block: SparseMoeBlock = model.model.layers[0].mlp
    x = torch.randn(5, 256, generator=gen)
    with torch.no_grad():
        out = block(x[None])[0]
        probs = torch.softmax(block.gate(x), -1)
        for t in range(5):
            w, idx = probs[t].topk(2)
            w = w / w.sum()
            expected = sum(w[j] * block.experts[int(idx[j])](x[t : t + 1])[0] for j in range(2))
            assert torch.allclose(out[t], expected, rtol=1e-5, atol=1e-6)


def load_model_from_cfg(cfg):
    from quantrl.model import random_init_

    model = random_init_(build_model(cfg.to_dict(), dtype=torch.float32), seed=3, std=0.1)
    return model
