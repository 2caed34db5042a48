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
from _tiny_models import bf16_fp8_int4, lm_loss, pattern_batch, qwen3_moe_config, random_prompts, save_model
from safetensors.torch import load_file

from quantrl.checkpoint.convert_fp8 import convert_to_fp8
from quantrl.checkpoint.convert_int import IntConvertOptions, convert_to_int
from quantrl.formats import fake_quantize_fp8, fake_quantize_int
from quantrl.model import Bf16Linear, Fp8Linear, QuantScheme, W4A16Linear, build_model, dequantized_weights, load_model
from quantrl.model.moe import FREE, Routing, SparseMoeBlock, dense_dispatch
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
    return bf16_fp8_int4(moe_cfg(), tmp_path_factory.mktemp("moe"), GROUP)


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


def test_gptq_on_a_moe_checkpoint(ckpts, tmp_path):
    """GPTQ for attention, the dense layer and every routed expert (on the tokens routed to it), routers
    untouched; the exact Hessians are checked in tests/test_gptq_model.py."""
    import shutil

    from quantrl.tasks.tokenizer import build_tokenizer

    src = tmp_path / "bf16"
    shutil.copytree(ckpts["bf16"], src)
    build_tokenizer().save_pretrained(src)  # calibration text needs a tokenizer; the ids fit the 300-row vocab
    opts = IntConvertOptions(method="gptq", group_size=GROUP, data_dir="synthetic", num_calibration_samples=8,
                             max_sequence_length=64)  # fmt: skip
    out = convert_to_int(src, tmp_path / "gptq", opts, progress=False).output_dir
    deq = dequantized_weights(load_model(out, dtype=torch.bfloat16))
    orig = load_file(src / "model.safetensors")
    rtn = {n: FAKE["int4"][1](w).to(torch.bfloat16) for n, w in orig.items() if n in deq}
    gptq = [n for n in deq if ".self_attn." in n or ".mlp." in n and not n.endswith(".mlp.gate.weight")]
    assert len(gptq) == 3 * 4 + 3 + N_EXPERT_LINEARS and all(not torch.equal(deq[n], rtn[n]) for n in gptq)
    assert all(torch.equal(deq[f"{r}.weight"], orig[f"{r}.weight"]) for r in ROUTERS)


@pytest.mark.parametrize("kind", ["bf16", "int4"])
def test_engine_logprobs_equal_full_forward(ckpts, kind):
    """Prefill, decode and slot compaction route every token as one full-sequence forward does.

    (Not FP8: W8A8 with dynamic activation scales is discontinuous, so an fp32-rounding difference between
    two batch shapes can move an activation across an e4m3 rounding boundary (1/8 of that element). The
    routing stays the same, but this model's routers, drawn at 5x the usual init scale, pass the step on:
    measured 4e-4 here, 2e-6 with the routers scaled down 25x.)"""
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
    batch = pattern_batch()  # a learnable pattern
    losses = [tr.train_step(batch, lm_loss)["loss"] for _ in range(15)]
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


# ---- routing replay (R3) ----------------------------------------------------------------------------


def replay_tensor(result, seq_len: int) -> torch.Tensor:
    """A result's routing as the [1, T, L_moe, k] replay of its full sequence (the last token routes freely)."""
    r = torch.full((1, seq_len, *result.routing.shape[1:]), FREE, dtype=torch.long)
    r[0, : len(result.routing)] = result.routing.long()
    return r


@pytest.mark.parametrize("kind", ["bf16", "int4"])
def test_engine_routing_is_what_a_full_forward_routes(ckpts, kind):
    model = load_model(ckpts[kind], dtype=torch.float32)
    prompts = random_prompts([5, 12, 3], seed=1)
    engine = Engine(model, kv_cache_tokens=60, max_prefill_tokens=16)
    results = engine.generate(prompts, SamplingParams(n=2, temperature=0.8, max_new_tokens=8, seed=0,
                                                      return_routing=True))  # fmt: skip
    for r in results:
        ids = torch.tensor([prompts[r.prompt_index] + r.tokens])
        assert r.routing.dtype == torch.int16 and r.routing.shape == (ids.shape[1] - 1, 2, 2)
        rec = Routing(record=True)
        with torch.no_grad():
            model(ids, routing=rec)
        free = rec.stacked(1, ids.shape[1])[0, :-1]  # [T-1, L_moe, k]
        assert torch.equal(free.sort(-1).values, r.routing.long().sort(-1).values)


def test_replay_is_used_and_free_rows_route_by_themselves(gen):
    model = load_model_from_cfg(moe_cfg())
    ids = torch.randint(0, 300, (2, 9), generator=gen)
    rec = Routing(record=True)
    with torch.no_grad():
        own = model(ids, routing=rec)
        experts = rec.stacked(2, 9)  # [B, T, L_moe, k]
        assert torch.equal(model(ids, routing=Routing(replay=experts)), own)  # replaying its own choice: no-op
        assert torch.equal(model(ids, routing=Routing(replay=torch.full_like(experts, FREE))), own)
        other = experts.clone()
        other[0, 4, 0] = (other[0, 4, 0] + 1) % 6  # another expert pair for one token in the first MoE layer
        if other[0, 4, 0, 0] == other[0, 4, 0, 1]:
            other[0, 4, 0, 1] = (other[0, 4, 0, 1] + 1) % 6
        moved = model(ids, routing=Routing(replay=other))
    assert torch.equal(moved[1], own[1]) and torch.equal(moved[0, :4], own[0, :4])  # causal: earlier tokens keep
    assert not torch.allclose(moved[0, 4], own[0, 4])
    with pytest.raises(ValueError, match="routing replay has shape"):
        model(ids, routing=Routing(replay=experts[..., :1]))
    for bad in (experts + 6, torch.cat([experts[..., :1], torch.full_like(experts[..., :1], FREE)], -1),
                experts[..., :1].expand_as(experts)):  # out of range, half FREE, one expert twice
        with pytest.raises(ValueError, match=r"must name 2 distinct experts in \[0, 6\)"):
            model(ids, routing=Routing(replay=bad))


def test_router_gets_gradient_under_replay(gen):
    model = load_model_from_cfg(moe_cfg()).train()
    ids = torch.randint(0, 300, (2, 9), generator=gen)
    rec = Routing(record=True)
    with torch.no_grad():
        model(ids, routing=rec)
    logp, _ = token_logprobs(model, ids, routing=rec.stacked(2, 9))
    logp.sum().backward()
    assert model.get_parameter(f"{ROUTERS[0]}.weight").grad.abs().sum() > 0


def test_replay_removes_the_routing_part_of_a_quantized_rollouts_mismatch(tmp_path):
    """BF16 trainer, FP8 engine of the same weights: the engine routes some tokens to other experts, and
    through the KV cache every later token sees it. Replaying its routing makes the trainer score the
    tokens through the experts that sampled them: the mismatch |logp_train - logp_rollout| falls, its
    worst tokens most (measured: mean 0.060 -> 0.042, max 1.09 -> 0.16, 10% of choices flipped).
    Experts drawn with std 0.1 so that they, not attention, dominate the output, as in a trained MoE."""
    src = save_model(moe_cfg(), tmp_path / "bf16", dtype=torch.bfloat16, expert_std=0.1)
    trainer = load_model(src, dtype=torch.float32)
    engine = Engine(load_model(convert_to_fp8(src, tmp_path / "fp8", progress=False).output_dir, dtype=torch.float32),
                    kv_cache_tokens=4096)  # fmt: skip
    prompts = random_prompts([6, 10, 4, 8], seed=5)
    results = engine.generate(prompts, SamplingParams(n=4, temperature=1.0, max_new_tokens=12, seed=1,
                                                      return_routing=True))  # fmt: skip
    flips = 0
    free_err, replay_err = [], []
    for r in results:
        p = prompts[r.prompt_index]
        ids = torch.tensor([p + r.tokens])
        rec = Routing(record=True)
        with torch.no_grad():
            lp_free = token_logprobs(trainer, ids)[0][0, len(p) - 1 :]
            trainer(ids, routing=rec)
            lp_replay = token_logprobs(trainer, ids, routing=replay_tensor(r, ids.shape[1]))[0][0, len(p) - 1 :]
        own = rec.stacked(1, ids.shape[1])[0, :-1].sort(-1).values
        flips += int((own != r.routing.long().sort(-1).values).any(-1).sum())
        rollout = torch.tensor(r.logprobs)
        free_err.append((lp_free - rollout).abs())
        replay_err.append((lp_replay - rollout).abs())
    free_err, replay_err = torch.cat(free_err), torch.cat(replay_err)
    assert flips > 0, "the test needs a rollout that routes differently"
    assert replay_err.mean() < 0.85 * free_err.mean(), (replay_err.mean(), free_err.mean())
    assert replay_err.max() < 0.5 * free_err.max(), (replay_err.max(), free_err.max())


def test_dense_dispatch_keeps_per_call_activation_scales_to_the_routed_tokens(gen):
    """FP8 with one activation scale per call (compressed-tensors ``tensor`` strategy): under the dense
    dispatch an expert's scale must come from its own tokens only, as in the grouped one."""
    scheme = QuantScheme(method="fp8", fp8_strategy="tensor", scale_suffix="weight_scale", act_strategy="tensor",
                         scale_dtype=torch.float32)  # fmt: skip
    from quantrl.model import random_init_

    model = random_init_(build_model(moe_cfg().to_dict(), scheme, dtype=torch.float32), seed=3, std=0.1)
    ids = torch.randint(0, 300, (3, 10), generator=gen)
    with torch.no_grad():
        grouped = model(ids)
        with dense_dispatch():
            dense = model(ids)
    assert float((dense - grouped).abs().max() / grouped.abs().max()) <= 1e-6


def test_balance_loss_equals_transformers_aux_loss(tmp_path, gen):
    """Routing(balance_mask=...).balance_loss() is transformers' Qwen-MoE ``aux_loss`` (padding excluded), and
    it reaches the router through autograd."""
    from _tiny_models import reference

    path = save_model(moe_cfg(), tmp_path / "m")
    ref, ours = reference(path), load_model(path, dtype=torch.float32)
    ids = torch.randint(0, 300, (3, 10), generator=gen)
    am = torch.ones_like(ids)
    am[0, 7:], am[2, 4:] = 0, 0
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=am, output_router_logits=True).aux_loss
    routing = Routing(balance_mask=am.bool())
    ours(ids, am, routing=routing)
    loss = routing.balance_loss()
    assert torch.allclose(loss, expected, rtol=1e-5, atol=0), (loss, expected)
    loss.backward()
    assert ours.get_parameter(f"{ROUTERS[0]}.weight").grad.abs().sum() > 0
