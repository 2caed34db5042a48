"""The rollout engine on CUDA with CUDA-graph decode: BF16, FP8 (128x128 blocks) and INT4 (W4A16) engines.

What graphs could get wrong and an eager CPU test cannot see: a replay reading stale inputs or the wrong KV
slots (bucket padding, compaction after stops), and captured weights going stale after ``update_weights``.
So the graphed engine's logprobs are compared with a full-sequence forward of the same tokens, before and
after a weight update (and against the *old* weights, which must then be clearly further off). Tolerance:
bf16 activations, cached decode vs full forward. Measured with the same test run eagerly on CPU: mean
|error| 0.003 (bf16), 0.010 (fp8: activation quantization amplifies the bf16 differences; max 0.25), 0.004
(int4), against 2.6 for the stale weights; required here: mean < 0.05, max < 1, stale > 10x.
"""

import pytest
import torch
from _tiny_models import qwen3_config, random_prompts

from quantrl.formats import encode_e8m0, pack_int4, pack_nvfp4, quantize_fp8, quantize_int4, quantize_nvfp4
from quantrl.model import QuantScheme, build_model, random_init_
from quantrl.rollout import Engine, SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
DEV = "cuda"
SCHEMES = {"bf16": None, "fp8": QuantScheme.fp8_block(), "mxfp8": QuantScheme.mxfp8(),
           "int4": QuantScheme.int4(group_size=128), "nvfp4": QuantScheme.nvfp4()}  # fmt: skip
CFG = qwen3_config(hidden_size=256, intermediate_size=512, head_dim=64).to_dict()


def logprob_errors(model, prompts, results, temperature: float) -> torch.Tensor:
    """|engine logprob - full-forward logprob| of every generated token under ``model``."""
    errs = []
    for r in results:
        prompt = prompts[r.prompt_index]
        ids = torch.tensor([prompt + r.tokens], device=DEV)
        with torch.no_grad():
            logits = model(ids)[0, len(prompt) - 1 : -1].float() / temperature
        ref = logits.log_softmax(-1).gather(-1, torch.tensor(r.tokens, device=DEV)[:, None])[:, 0]
        errs.append((torch.tensor(r.logprobs, device=DEV) - ref).abs())
    return torch.cat(errs)


def engine_update(trainer, kind: str) -> list[tuple[str, torch.Tensor]]:
    """The trainer's BF16 weights in the engine's format (as weight sync sends them)."""
    update = []
    for name, w in trainer.state_dict().items():
        m = name.removesuffix(".weight")
        if name.endswith("_proj.weight") and kind == "fp8":
            q, s = quantize_fp8(w)
            update += [(name, q), (f"{m}.weight_scale_inv", s)]
        elif name.endswith("_proj.weight") and kind == "mxfp8":
            q, s = quantize_fp8(w, "block", (1, 32), "ue8m0")
            update += [(name, q), (f"{m}.weight_scale", encode_e8m0(s))]
        elif name.endswith("_proj.weight") and kind == "int4":
            q, s = quantize_int4(w, group_size=128)
            update += [(f"{m}.weight_packed", pack_int4(q)), (f"{m}.weight_scale", s)]
        elif name.endswith("_proj.weight") and kind == "nvfp4":
            codes, s, gs = quantize_nvfp4(w)
            update += [(f"{m}.weight_packed", pack_nvfp4(codes)), (f"{m}.weight_scale", s), (f"{m}.weight_global_scale", gs)]
        else:
            update.append((name, w))
    return update


@pytest.mark.parametrize("kind", list(SCHEMES))
def test_cuda_graph_decode_matches_a_full_forward_and_follows_weight_updates(kind):
    model = random_init_(build_model(CFG, SCHEMES[kind], dtype=torch.bfloat16, device=DEV), seed=0, std=0.1)
    old = random_init_(build_model(CFG, SCHEMES[kind], dtype=torch.bfloat16, device=DEV), seed=0, std=0.1)
    engine = Engine(model, kv_cache_tokens=4096, max_seq_len=64, max_batch_size=16, use_cuda_graph=True)
    prompts = random_prompts([5, 12, 3, 9, 4], seed=8)
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=24, seed=3, stop_token_ids=[7, 11, 13, 17, 19])
    res = engine.generate(prompts, params)
    assert engine._graphs is not None, "graph capture failed and the engine fell back to eager decode"
    assert len(engine._graphs._graphs) >= 2, "stops should shrink the batch across buckets"
    assert any(r.finish_reason == "stop" for r in res) and any(r.finish_reason == "length" for r in res)
    err = logprob_errors(model, prompts, res, 1.0)
    assert float(err.mean()) < 0.05 and float(err.max()) < 1.0

    trainer = random_init_(build_model(CFG, dtype=torch.bfloat16, device=DEV), seed=1, std=0.1)
    engine.update_weights(engine_update(trainer, kind), version=1)
    res2 = engine.generate(prompts, params)
    new_err = logprob_errors(model, prompts, res2, 1.0)
    stale_err = logprob_errors(old, prompts, res2, 1.0)
    assert float(new_err.mean()) < 0.05 and float(new_err.max()) < 1.0
    assert float(stale_err.mean()) > 10 * float(new_err.mean()) + 1e-3, "replays kept the old weights"
    assert [r.weight_version for r in res2] == [1] * len(res2)
    from quantrl.model.linear import _KernelLinear

    packed = [m for m in model.modules() if isinstance(m, _KernelLinear)]
    assert all(m._kernel_ok is True for m in packed), "an INT4 / NVFP4 layer fell back from its kernel"
    engine.cache.free()  # the graphs wrote into the old pool: they must be captured again on the new one
    res3 = engine.generate(prompts, params)
    err3 = logprob_errors(model, prompts, res3, 1.0)
    assert float(err3.mean()) < 0.05 and float(err3.max()) < 1.0


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_moe_cuda_graph_decode_routes_and_scores_like_a_full_forward(arch):
    """Qwen3-MoE and DeepSeek-V3 (latent KV cache, fp32 grouped router) in fp32 on CUDA: graphed decode runs
    the dense (capture-safe) expert dispatch and returns its expert choices from the graph; both must equal
    what an eager full forward (grouped dispatch) gives for the same tokens: routing exactly, logprobs
    within fp32 rounding."""
    from _tiny_models import deepseek_v3_config, qwen3_moe_config

    from quantrl.model.moe import Routing

    if arch == "qwen3_moe":
        cfg = qwen3_moe_config(hidden_size=256, intermediate_size=256, moe_intermediate_size=128, head_dim=64).to_dict()
    else:
        cfg = deepseek_v3_config(hidden_size=256, intermediate_size=256, moe_intermediate_size=128,
                                 kv_lora_rank=128, q_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32,
                                 v_head_dim=64).to_dict()  # fmt: skip
    model = random_init_(build_model(cfg, dtype=torch.float32, device=DEV), seed=0, std=0.1)
    engine = Engine(model, kv_cache_tokens=4096, max_seq_len=64, max_batch_size=16, use_cuda_graph=True)
    prompts = random_prompts([5, 12, 3, 9, 4], seed=8)
    params = SamplingParams(n=3, temperature=0.9, max_new_tokens=10, seed=1, stop_token_ids=[7, 11, 13],
                            return_routing=True)  # fmt: skip
    results = engine.generate(prompts, params)
    assert engine._graphs is not None and engine._graphs._graphs  # decode really ran under graphs
    assert logprob_errors(model, prompts, results, 0.9).max() < 1e-4
    for r in results:
        ids = torch.tensor([prompts[r.prompt_index] + r.tokens], device=DEV)
        rec = Routing(record=True)
        with torch.no_grad():
            model(ids, routing=rec)
        own = rec.stacked(1, ids.shape[1])[0, :-1].cpu().sort(-1).values
        assert torch.equal(own, r.routing.long().sort(-1).values)


@pytest.mark.parametrize("grouped", [True, False])
@pytest.mark.parametrize("kind", ["fp8", "int4"])
def test_quantized_moe_experts_are_all_probed_before_capture(kind, grouped, monkeypatch):
    """With the grouped MoE kernels (the default for INT4 / FP8 experts) graphed decode runs them, checked
    against the expert loop at the first prefill. Without them, graph warm-up dispatches densely, so every
    expert's fast path is probed eagerly (an expert no token reached would otherwise be captured on its
    reference path). Either way graphed logprobs stay within the bf16 tolerances of the dense test above."""
    from _tiny_models import qwen3_moe_config

    from quantrl.model import Fp8Linear, W4A16Linear
    from quantrl.model.moe import SparseMoeBlock

    monkeypatch.setattr(SparseMoeBlock, "grouped_kernel", grouped)
    cfg = qwen3_moe_config(hidden_size=256, intermediate_size=256, moe_intermediate_size=128, head_dim=64).to_dict()
    model = random_init_(build_model(cfg, SCHEMES[kind], dtype=torch.bfloat16, device=DEV), seed=0, std=0.1)
    engine = Engine(model, kv_cache_tokens=4096, max_seq_len=64, max_batch_size=16, use_cuda_graph=True)
    prompts = random_prompts([5, 12, 3], seed=8)
    results = engine.generate(prompts, SamplingParams(n=2, temperature=0.9, max_new_tokens=10, seed=1))
    experts = [lin for m in model.modules() if isinstance(m, SparseMoeBlock) for e in m.experts
               for lin in (e.gate_proj, e.up_proj, e.down_proj)]  # fmt: skip
    flag = (lambda lin: lin._fast) if kind == "fp8" else (lambda lin: lin._kernel_ok)
    assert all(isinstance(lin, Fp8Linear if kind == "fp8" else W4A16Linear) for lin in experts)
    if grouped:
        assert all(m._fused_ok is True for m in model.modules() if isinstance(m, SparseMoeBlock))
    else:
        assert all(flag(lin) is True for lin in experts), [flag(lin) for lin in experts]
    errs = logprob_errors(model, prompts, results, 0.9)
    assert errs.mean() < 0.05 and errs.max() < 1, (errs.mean(), errs.max())


def test_fp8_kv_cache_under_cuda_graphs_matches_the_rounding_forward():
    """An FP8 KV cache on CUDA, graphed decode (fp8 slot copies, index writes, dequantized reads): the
    logprobs follow a full forward that rounds K and V alike much more closely than one that does not."""
    model = random_init_(build_model(CFG, dtype=torch.bfloat16, device=DEV), seed=0, std=0.1)
    engine = Engine(model, kv_cache_tokens=4096, max_seq_len=64, max_batch_size=16, use_cuda_graph=True,
                    kv_cache_dtype="fp8_e4m3")  # fmt: skip
    prompts = random_prompts([5, 12, 3, 9, 4], seed=8)
    res = engine.generate(prompts, SamplingParams(n=3, temperature=1.0, max_new_tokens=24, seed=3,
                                                  stop_token_ids=[7, 11, 13, 17, 19]))  # fmt: skip
    assert engine._graphs is not None, "graph capture failed and the engine fell back to eager decode"
    assert engine.cache.dtype == torch.float8_e4m3fn
    plain = logprob_errors(model, prompts, res, 1.0)
    model.set_kv_fake_quant(True)
    rounded = logprob_errors(model, prompts, res, 1.0)
    model.set_kv_fake_quant(False)
    assert float(rounded.mean()) < 0.05 and float(rounded.max()) < 1.0
    assert float(rounded.mean()) < float(plain.mean())
