"""Rollout engine: logprobs against a full forward, sampling semantics, KV budget errors, atomic weight
updates (BF16, FP8, INT4), and the ``quantrl generate`` command.

Logprob tolerance: 1e-5 absolute in fp32. The engine (prefill + cached decode, batched) and the full
forward compute the same function with different summation orders; measured differences are ~1e-6.
"""

import pytest
import torch
from _tiny_models import full_forward_logprobs, qwen3_config, random_prompts, save_model

from quantrl.formats import (
    encode_e8m0,
    fake_quantize_fp8,
    fake_quantize_int4,
    fake_quantize_nvfp4,
    pack_int4,
    pack_nvfp4,
    quantize_fp8,
    quantize_int4,
    quantize_nvfp4,
)
from quantrl.model import QuantScheme, build_model, dequantized_weights, engine_state, load_model, random_init_
from quantrl.model.linear import QLinear
from quantrl.rollout import Engine, SamplingParams
from quantrl.rollout.weight_update import bitwise_equal

LOGPROB_ATOL = 1e-5



@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_model(qwen3_config(), tmp_path_factory.mktemp("qwen3"))


@pytest.fixture(scope="module")
def model(model_dir):
    return load_model(model_dir, dtype=torch.float32)


@pytest.mark.parametrize("kv_tokens", [4096, 70])  # 70: 3 slots for 12 samples -> admission + compaction
def test_logprobs_equal_full_forward(model, kv_tokens):
    prompts = random_prompts([5, 12, 3, 9], seed=1)
    params = SamplingParams(n=3, temperature=0.8, top_k=50, top_p=0.9, max_new_tokens=8, seed=0,
                            stop_token_ids=[7, 11, 13])  # fmt: skip
    engine = Engine(model, kv_cache_tokens=kv_tokens, max_prefill_tokens=24)
    results = engine.generate(prompts, params)
    assert [(r.prompt_index, r.sample_index) for r in results] == [(i, j) for i in range(4) for j in range(3)]
    for r in results:
        assert len(r.tokens) == len(r.logprobs) and 1 <= len(r.tokens) <= 8
        assert r.finish_reason == ("stop" if r.tokens[-1] in (7, 11, 13) else "length")
        expected = full_forward_logprobs(model, prompts[r.prompt_index], r.tokens, 0.8)
        assert torch.allclose(torch.tensor(r.logprobs), expected, rtol=0, atol=LOGPROB_ATOL)
    # samples of one prompt differ (n > 1 must not repeat one sample)
    assert len({tuple(r.tokens) for r in results[:3]}) > 1


def test_seed_determinism(model):
    prompts = random_prompts([4, 6], seed=2)
    engine = Engine(model, kv_cache_tokens=512)
    def run(seed):
        results = engine.generate(prompts, SamplingParams(n=2, max_new_tokens=10, seed=seed))
        return [(r.tokens, r.logprobs) for r in results]

    assert run(5) == run(5)
    assert run(5) != run(6)


def test_top_k_1_and_tiny_top_p_equal_greedy(model):
    prompts = random_prompts([3, 10, 6], seed=4)
    engine = Engine(model, kv_cache_tokens=512)
    def tokens(**kw):
        return [r.tokens for r in engine.generate(prompts, SamplingParams(max_new_tokens=10, **kw))]

    greedy = tokens(temperature=0)
    top1 = tokens(temperature=1.3, top_k=1, seed=1)
    nucleus = tokens(temperature=1.0, top_p=1e-6, seed=2)
    assert greedy == top1 == nucleus


def test_stop_token_ends_sample(model):
    prompt = random_prompts([6], seed=5)[0]
    engine = Engine(model, kv_cache_tokens=512)
    greedy = engine.generate([prompt], SamplingParams(temperature=0, max_new_tokens=10))[0].tokens
    stop = greedy[3]
    first = greedy.index(stop)
    r = engine.generate([prompt], SamplingParams(temperature=0, max_new_tokens=10, stop_token_ids=[stop]))[0]
    assert r.tokens == greedy[: first + 1] and r.finish_reason == "stop"


def test_prompt_too_long_for_kv_cache_raises_before_allocating(model):
    engine = Engine(model, kv_cache_tokens=60)
    sizes = r"prompt of 50 tokens \+ max_new_tokens=20 needs 70 KV-cache tokens.*holds 60 tokens"
    with pytest.raises(ValueError, match=sizes):
        engine.generate([[1] * 5, [2] * 50], SamplingParams(max_new_tokens=20))
    assert engine.cache._pool is None
    with pytest.raises(ValueError, match="outside"):
        engine.generate([[1, 10_000]], SamplingParams(max_new_tokens=2))


# ---- weight updates ---------------------------------------------------------------------------------
def _snapshot(engine, prompts):
    r = engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=6))
    return [(x.tokens, x.logprobs) for x in r]


def _spy_hooks(model, calls):
    """Record restore / load / post-process calls of every Linear, in order."""
    for name, lin in model.named_modules():
        if isinstance(lin, QLinear):
            for hook in ("restore_weights_before_loading", "load_", "post_process_weights"):
                orig = getattr(lin, hook)

                def spy(*a, _orig=orig, _hook=hook, _name=name):
                    calls.append((_hook, _name))
                    return _orig(*a)

                setattr(lin, hook, spy)


def test_bf16_update_good_and_bad(model_dir):
    model = load_model(model_dir, dtype=torch.float32)
    engine = Engine(model, kv_cache_tokens=512)
    prompts = random_prompts([5, 8], seed=6)
    before = _snapshot(engine, prompts)
    state = {n: t.clone() for n, t in engine_state(model).items()}
    new = {n: t + 0.05 * torch.randn_like(t) for n, t in state.items()}
    name = "model.layers.0.mlp.up_proj.weight"
    bad_updates = {
        "shape": [(name, new[name][:, :-1])],
        "dtype": [(name, new[name].to(torch.bfloat16))],
        "unknown": [("model.layers.0.mlp.up_proj.weight", new[name]), ("model.layers.9.mlp.up_proj.weight", new[name])],
        "typo": [("lm_head.weigth", new["lm_head.weight"])],
        "nan": [("model.norm.weight", torch.full_like(state["model.norm.weight"], float("nan")))],
        "inf": [(name, new[name].index_fill(1, torch.tensor([3]), float("inf")))],
    }
    for why, update in bad_updates.items():
        with pytest.raises(ValueError, match="nothing was loaded"):
            engine.update_weights(update, version=1)
        assert engine.weight_version == 0, why
        assert _snapshot(engine, prompts) == before, why
        assert all(torch.equal(t, state[n]) for n, t in engine_state(model).items()), why

    calls: list = []
    _spy_hooks(model, calls)
    engine.update_weights(new.items(), version=3, check_equal=True)
    assert engine.weight_version == 3
    after = engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=6))
    assert [(x.tokens, x.logprobs) for x in after] != before and after[0].weight_version == 3
    hooks = [h for h, _ in calls]
    n_lin = 2 * 7 + 1
    assert hooks == ["restore_weights_before_loading"] * n_lin + ["load_"] * n_lin + ["post_process_weights"] * n_lin
    # the engine now computes what a fresh model with the new weights computes
    fresh = build_model(model.config, dtype=torch.float32)
    with torch.no_grad():
        for n, t in new.items():
            fresh.get_parameter(n).copy_(t)
    assert _snapshot(Engine(fresh, kv_cache_tokens=512), prompts) == [(x.tokens, x.logprobs) for x in after]


def test_nan_logits_raise_instead_of_sampling_token_0(model_dir):
    model = load_model(model_dir, dtype=torch.float32)
    with torch.no_grad():  # past update_weights' checks: e.g. an activation overflow in low precision
        model.get_parameter("model.norm.weight")[5] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN after 0 tokens"):
        Engine(model, kv_cache_tokens=256).generate(random_prompts([4], seed=1), SamplingParams(max_new_tokens=3))


def test_check_equal_detects_a_load_that_did_not_happen(model_dir, monkeypatch):
    model = load_model(model_dir, dtype=torch.float32)
    engine = Engine(model, kv_cache_tokens=256)
    name = "model.norm.weight"
    monkeypatch.setattr("quantrl.rollout.engine.apply_update", lambda plan: None)
    with pytest.raises(RuntimeError, match="differ after loading"):
        engine.update_weights([(name, torch.full_like(model.get_parameter(name), 2.0))], version=1, check_equal=True)
    assert engine.weight_version == 0
    prompts, params = random_prompts([4], seed=1), SamplingParams(max_new_tokens=3)
    # the weights are no version's: no samples from them until an update loads completely
    with pytest.raises(RuntimeError, match="version 1 did not load bit for bit; 1 of its tensors .*model.norm"):
        engine.generate(prompts, params)
    monkeypatch.undo()
    engine.update_weights([(name, torch.full_like(model.get_parameter(name), 2.0))], version=2, check_equal=True)
    assert engine.weight_version == 2 and len(engine.generate(prompts, params)) == 1


def test_a_load_that_fails_midway_blocks_generation(model_dir, monkeypatch):
    engine = Engine(load_model(model_dir, dtype=torch.float32), kv_cache_tokens=256)
    name = "model.norm.weight"

    def oom(plan):
        raise torch.OutOfMemoryError("simulated OOM in post-processing")

    monkeypatch.setattr("quantrl.rollout.engine.apply_update", oom)
    with pytest.raises(torch.OutOfMemoryError):
        engine.update_weights([(name, torch.ones_like(engine.model.get_parameter(name)))], version=1)
    prompts, params = random_prompts([4], seed=1), SamplingParams(max_new_tokens=3)
    with pytest.raises(RuntimeError, match="version 1 failed while loading"):
        engine.generate(prompts, params)
    monkeypatch.undo()
    other = "model.layers.0.input_layernorm.weight"  # an update of other tensors leaves model.norm unloaded
    engine.update_weights([(other, torch.ones_like(engine.model.get_parameter(other)))], version=2)
    with pytest.raises(RuntimeError, match="version 1 failed while loading"):
        engine.generate(prompts, params)
    engine.update_weights([(name, torch.ones_like(engine.model.get_parameter(name)))], version=3)
    assert engine.weight_version == 3 and len(engine.generate(prompts, params)) == 1


@pytest.mark.parametrize("kind", ["fp8", "mxfp8", "int4", "nvfp4"])
def test_quantized_engine_update(kind):
    """Trainer BF16 weights -> formats real quantization -> update: the engine then computes with exactly
    fake_quant(trainer weights) (invariant 5); a partial unit (weight without its scale) is refused."""
    cfg = qwen3_config(hidden_size=192, intermediate_size=320, head_dim=48)
    scheme = {"fp8": QuantScheme.fp8_block(), "mxfp8": QuantScheme.mxfp8(), "int4": QuantScheme.int4(group_size=32),
              "nvfp4": QuantScheme.nvfp4()}[kind]  # fmt: skip
    model = random_init_(build_model(cfg.to_dict(), scheme, dtype=torch.bfloat16), seed=0)
    trainer = random_init_(build_model(cfg.to_dict(), dtype=torch.bfloat16), seed=1)
    engine = Engine(model, kv_cache_tokens=256)
    prompts = random_prompts([4, 7], seed=7)
    before, state = _snapshot(engine, prompts), {n: t.clone() for n, t in engine_state(model).items()}

    update, expected = [], {}
    for name, w in trainer.state_dict().items():
        m = name.removesuffix(".weight")
        if name.endswith("_proj.weight"):
            if kind == "fp8":
                q, s = quantize_fp8(w)
                update += [(name, q), (f"{m}.weight_scale_inv", s)]
                expected[name] = fake_quantize_fp8(w)
            elif kind == "mxfp8":
                q, s = quantize_fp8(w, "block", (1, 32), "ue8m0")
                update += [(name, q), (f"{m}.weight_scale", encode_e8m0(s))]
                expected[name] = fake_quantize_fp8(w, "block", (1, 32), "ue8m0")
            elif kind == "int4":
                q, s = quantize_int4(w, group_size=32)
                update += [(f"{m}.weight_packed", pack_int4(q)), (f"{m}.weight_scale", s)]
                expected[name] = fake_quantize_int4(w, group_size=32)
            else:
                codes, s, gs = quantize_nvfp4(w)
                update += [(f"{m}.weight_packed", pack_nvfp4(codes)), (f"{m}.weight_scale", s),
                           (f"{m}.weight_global_scale", gs)]  # fmt: skip
                expected[name] = fake_quantize_nvfp4(w)
        else:
            update.append((name, w))
            expected[name] = w

    partial = [(n, t) for n, t in update if not n.endswith(("weight_scale_inv", "weight_scale"))]
    with pytest.raises(ValueError, match="incomplete update of 'model.layers.0.self_attn.q_proj'"):
        engine.update_weights(partial, version=1)
    assert engine.weight_version == 0 and _snapshot(engine, prompts) == before
    assert all(bitwise_equal(t, state[n]) for n, t in engine_state(model).items())

    # a value post-processing would choke on, or the engine sample garbage from, in the LAST unit: refused
    # before the first write (E8M0's NaN byte, fp8's NaN code, a NaN scale)
    last = max(i for i, (n, _) in enumerate(update) if n.endswith(("weight_scale_inv", "weight_scale")))
    bad_name, poisoned = update[last][0], update[last][1].clone()
    codes = poisoned.view(torch.uint8) if poisoned.element_size() == 1 else None
    if codes is not None:
        codes.view(-1)[0] = 255 if kind == "mxfp8" else 0x7F
    else:
        poisoned.view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match=f"'{bad_name}': 1 of {poisoned.numel()} values are"):
        engine.update_weights([*update[:last], (bad_name, poisoned), *update[last + 1 :]], version=1)
    assert engine.weight_version == 0 and _snapshot(engine, prompts) == before
    assert all(bitwise_equal(t, state[n]) for n, t in engine_state(model).items())

    decoded = model.model.layers[0].mlp.up_proj._decoded_scale if kind == "mxfp8" else None
    engine.update_weights(update, version=1, check_equal=True)
    deq = dequantized_weights(model)
    assert all(torch.equal(deq[n], expected[n]) for n in deq)
    assert _snapshot(engine, prompts) != before
    if kind == "mxfp8":  # the decoded fp32 scales were refilled where captured CUDA graphs read them
        assert model.model.layers[0].mlp.up_proj._decoded_scale is decoded


def test_generate_command(tmp_path, capsys):
    from _tiny_models import bpe_tokenizer

    from quantrl.cli import main

    tok = bpe_tokenizer(["the quick brown fox jumps over the lazy dog"] * 4, vocab_size=300)
    save_model(qwen3_config(vocab_size=len(tok)), tmp_path)
    tok.save_pretrained(tmp_path)
    rc = main(["generate", "--model", str(tmp_path), "--prompt", "the quick", "--max-new-tokens", "5", "--n", "2",
               "--seed", "0", "--dtype", "float32"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0
    assert out.count("mean logprob") == 2 and "finish: length" in out
    # an end-of-turn id named only in generation_config.json stops generation too
    import json

    ids = tok("the quick")["input_ids"]
    engine = Engine(load_model(tmp_path, dtype=torch.float32), kv_cache_tokens=64)
    first = engine.generate([ids], SamplingParams(temperature=0, max_new_tokens=1))[0].tokens[0]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [first]}))
    assert main(["generate", "--model", str(tmp_path), "--prompt", "the quick", "--max-new-tokens", "5",
                 "--temperature", "0", "--dtype", "float32"]) == 0  # fmt: skip
    assert "finish: stop, 1 tokens" in capsys.readouterr().out


def test_cuda_graph_bucketing_logic_on_cpu(model):
    """The CUDA-graph decode path's static-shape logic (bucket padding with dummy rows in free slots,
    attention over the whole slot length, recapture on a new KV layout), with capture replaced by an
    eager replay so that it runs on CPU. It must give what the plain decode path gives."""
    from quantrl.rollout.cuda_graph import DecodeGraphs

    class EagerGraphs(DecodeGraphs):
        captured: list = []

        def _capture(self, b, ctx):
            out = torch.empty(b, model.config.vocab_size)
            graphs = self

            class Replay:
                def replay(self):
                    out.copy_(graphs.step(b, ctx)[0])

            self.captured.append((b, ctx.k[0].shape))
            return Replay(), (out, None)

    prompts = random_prompts([5, 12, 3, 9, 4], seed=8)
    params = SamplingParams(n=2, temperature=0.9, max_new_tokens=7, seed=3, stop_token_ids=[7, 11, 13, 17, 19])
    plain = Engine(model, kv_cache_tokens=4096).generate(prompts, params)
    engine = Engine(model, kv_cache_tokens=4096, max_batch_size=10)
    engine._graphs = EagerGraphs(model, 10)
    graphed = engine.generate(prompts, params)
    assert [r.tokens for r in graphed] == [r.tokens for r in plain]
    for a, b in zip(graphed, plain):
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), rtol=0, atol=LOGPROB_ATOL)
    assert {b for b, _ in EagerGraphs.captured} <= {1, 2, 4, 8, 10} and len(EagerGraphs.captured) >= 2
    engine.generate(prompts[:1], SamplingParams(max_new_tokens=3))  # new layout (slots, L): captured again
    assert EagerGraphs.captured[-1][1][0] == 1
