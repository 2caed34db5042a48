"""FP8 KV cache (``--kv-cache-dtype fp8_e4m3``): the static-scale format, the engine's logprobs against a
full forward that rounds K and V the same way (fp32: equal to summation order), twice the tokens per
byte, per-layer scales from a checkpoint (loaded, checked, kept on save, handed to built engines)."""

import json

import pytest
import torch
from _tiny_models import deepseek_v3_config, full_forward_logprobs, qwen3_config, random_prompts, save_model
from safetensors.torch import load_file, save_file

from quantrl.checkpoint.safetensors_io import CheckpointError
from quantrl.formats import FP8_DTYPE, dequantize_fp8, fake_quantize_fp8_static, quantize_fp8, quantize_fp8_static
from quantrl.model import load_model
from quantrl.rollout import Engine, SamplingParams
from quantrl.rollout.kv_cache import KVCache

LOGPROB_ATOL = 1e-5  # as tests/test_engine.py: the same function summed in another order, fp32


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("kv")
    return {"qwen3": save_model(qwen3_config(), base / "qwen3"),
            "deepseek": save_model(deepseek_v3_config(), base / "ds")}


def max_gap(model, prompts, results, temperature):
    """The largest |engine logprob - full-forward logprob| over every sampled token."""
    gaps = [torch.tensor(r.logprobs) - full_forward_logprobs(model, prompts[r.prompt_index], r.tokens, temperature)
            for r in results]  # fmt: skip
    return max(float(g.abs().max()) for g in gaps)


def test_static_format_is_the_tensor_strategy_with_a_given_scale():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 96, generator=g, dtype=torch.float32).to(torch.bfloat16) * 3
    q, s = quantize_fp8(x, strategy="tensor")  # s = amax / 448, one for the tensor
    ours = quantize_fp8_static(x, s.reshape(()))
    assert ours.dtype == FP8_DTYPE and torch.equal(ours.view(torch.uint8), q.view(torch.uint8))
    fq = fake_quantize_fp8_static(x, s.reshape(()))
    assert fq.dtype == torch.bfloat16 and torch.equal(fq, dequantize_fp8(q, s, dtype=torch.bfloat16))
    # past 448 * scale: saturated, never NaN (e4m3fn has no Inf)
    big = quantize_fp8_static(torch.tensor([1e4, -1e4, 0.0]), torch.tensor(1.0))
    assert big.float().tolist() == [448.0, -448.0, 0.0]
    # the straight-through gradient
    w = x.float().requires_grad_(True)
    fake_quantize_fp8_static(w, torch.tensor(0.05)).sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


@pytest.mark.parametrize("arch", ["qwen3", "deepseek"])
def test_fp8_cache_logprobs_equal_a_forward_that_rounds_kv_alike(dirs, arch):
    """The engine with an FP8 cache computes the trainer's function once the trainer rounds K and V as the
    cache does (``set_kv_fake_quant``); without that rounding the two differ by the cache's error.
    DeepSeek: its latent and roped key are what the cache holds (absorbed decode reads them)."""
    model = load_model(dirs[arch], dtype=torch.float32)
    prompts = random_prompts([5, 12, 3, 9], seed=1)
    params = SamplingParams(n=3, temperature=0.8, max_new_tokens=8, seed=0)
    # 70 tokens: three slots for 12 samples, so admission and compaction copy FP8 slots too
    results = Engine(model, kv_cache_tokens=70, kv_cache_dtype="fp8_e4m3", max_prefill_tokens=24).generate(
        prompts, params)  # fmt: skip
    plain = max_gap(model, prompts, results, 0.8)
    model.set_kv_fake_quant(True)
    rounded = max_gap(model, prompts, results, 0.8)
    model.set_kv_fake_quant(False)
    assert rounded <= LOGPROB_ATOL and plain > 100 * LOGPROB_ATOL, (rounded, plain)
    exact = Engine(model, kv_cache_tokens=70, max_prefill_tokens=24).generate(prompts, params)
    assert max_gap(model, prompts, exact, 0.8) <= LOGPROB_ATOL  # the default cache is untouched by all this


def test_fp8_cache_holds_twice_the_tokens(dirs):
    model = load_model(dirs["qwen3"], dtype=torch.bfloat16)
    bf16 = KVCache.for_model(model, budget_bytes=1 << 20)
    fp8 = KVCache.for_model(model, budget_bytes=1 << 20, dtype="fp8_e4m3")
    assert fp8.bytes_per_token * 2 == bf16.bytes_per_token and fp8.capacity == 2 * bf16.capacity
    k, v = fp8.slots(2, 16)
    assert k[0].dtype == FP8_DTYPE and v[0].shape == (2, 2, 16, 32)
    with pytest.raises(ValueError, match="fp8_e4m3"):
        KVCache.for_model(model, max_tokens=8, dtype="int8")


def with_scales(src, dst, scales):
    """A copy of checkpoint ``src`` with ``scales`` ({name: tensor}) added to its safetensors."""
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            save_file({**load_file(f), **scales}, dst / f.name)
        else:
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_checkpoint_scales_load_save_and_reach_built_engines(dirs, tmp_path):
    from quantrl.sync.ray_engines import EngineSpec, EngineWorker
    from quantrl.train.trainer import TrainConfig, Trainer

    scales = {"model.layers.0.self_attn.k_scale": torch.tensor(0.02),
              "model.layers.1.self_attn.v_scale": torch.tensor([0.005])}
    path = with_scales(dirs["qwen3"], tmp_path / "scaled", scales)
    model = load_model(path, dtype=torch.float32)
    as_floats = {n: float(t) for n, t in scales.items()}
    assert {n: float(t) for n, t in model.kv_scale_tensors().items()} == pytest.approx(as_floats)
    prompts, params = random_prompts([6, 9], seed=2), SamplingParams(n=2, temperature=1.0, max_new_tokens=6, seed=1)
    scaled = Engine(model, kv_cache_tokens=256, kv_cache_dtype="fp8_e4m3").generate(prompts, params)
    unscaled = Engine(load_model(dirs["qwen3"], dtype=torch.float32), kv_cache_tokens=256,
                      kv_cache_dtype="fp8_e4m3").generate(prompts, params)  # fmt: skip
    assert [r.logprobs for r in scaled] != [r.logprobs for r in unscaled]  # the scales are used
    model.set_kv_fake_quant(True)
    assert max_gap(model, prompts, scaled, 1.0) <= LOGPROB_ATOL
    # a trainer's BF16 checkpoint keeps them, so a resumed run's engine quantizes alike
    saved = Trainer(load_model(path, dtype=torch.bfloat16), TrainConfig()).save_checkpoint(tmp_path / "saved", path)
    assert set(load_model(saved).kv_scale_tensors()) == set(scales)
    # an engine actor builds its model (weights come by sync): the scales travel in its spec
    worker = EngineWorker(EngineSpec(json.loads((path / "config.json").read_text()), dtype=torch.float32,
                                     kv_cache_tokens=64, kv_cache_dtype="fp8_e4m3",
                                     kv_scales=as_floats))  # fmt: skip
    assert worker.engine.cache.dtype == FP8_DTYPE
    assert set(worker.engine.model.kv_scale_tensors()) == set(scales)


@pytest.mark.parametrize("bad, match", [
    ({"model.layers.0.self_attn.k_scale": torch.tensor(-1.0)}, "positive"),
    ({"model.layers.0.self_attn.v_scale": torch.ones(2)}, "shape"),
    ({"model.layers.9.self_attn.k_scale": torch.tensor(1.0)}, "no k_scale"),
])  # fmt: skip
def test_bad_checkpoint_scales_are_refused_by_name(dirs, tmp_path, bad, match):
    path = with_scales(dirs["qwen3"], tmp_path / "bad", bad)
    with pytest.raises(CheckpointError, match=match) as e:
        load_model(path)
    assert next(iter(bad)) in str(e.value)
