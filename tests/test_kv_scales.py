"""Calibrated FP8 KV-cache scales (``quantrl convert kv-scales``): the largest |K| / |V| each layer caches,
checked against transformers' own KV cache of the same tokens; the written checkpoint (tensors, config,
everything else copied) loads in quantrl and transformers; the CLI."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from quantrl.checkpoint.calibration import GptqCalibrationOptions, gptq_calibration_batches
from quantrl.checkpoint.safetensors_io import SafetensorsDir
from quantrl.formats import FP8_MAX
from quantrl.model import load_model
from quantrl.rollout.kv_scales import KVScaleOptions, add_kv_scales, calibrate_kv_scales

OPTS = KVScaleOptions(num_calibration_samples=8, max_sequence_length=64)


@pytest.fixture(scope="module")
def batches(qwen3_ckpt):
    return gptq_calibration_batches(qwen3_ckpt.path, GptqCalibrationOptions(
        data_dir="synthetic", num_calibration_samples=8, max_sequence_length=64))  # fmt: skip


def test_scales_are_the_cached_amax_transformers_sees(qwen3_ckpt, batches):
    scales = calibrate_kv_scales(load_model(qwen3_ckpt.path, dtype=torch.float32), batches, progress=False)
    hf = AutoModelForCausalLM.from_pretrained(qwen3_ckpt.path, dtype=torch.float32).eval()
    amax = {}
    with torch.no_grad():
        for ids in batches:
            cache = hf(ids, use_cache=True).past_key_values  # post-norm, post-RoPE keys, as an engine caches them
            for i, layer in enumerate(cache.layers):
                for attr, t in (("k_scale", layer.keys), ("v_scale", layer.values)):
                    name = f"model.layers.{i}.self_attn.{attr}"
                    amax[name] = max(amax.get(name, 0.0), float(t.abs().max()))
    assert set(scales) == set(amax) and len(scales) == 4
    for name, s in scales.items():
        assert s.dtype == torch.float32 and s.shape == (1,)
        assert float(s) * FP8_MAX == pytest.approx(amax[name], rel=1e-5), name
    doubled = calibrate_kv_scales(load_model(qwen3_ckpt.path, dtype=torch.float32), batches, headroom=2.0,
                                  progress=False)  # fmt: skip
    assert all(torch.equal(doubled[n], 2 * scales[n]) for n in scales)


def test_checkpoint_with_scales_loads_in_quantrl_and_transformers(qwen3_ckpt, tmp_path):
    out = tmp_path / "scaled"
    report = add_kv_scales(qwen3_ckpt.path, out, OPTS, progress=False)
    assert report.quantized == 4
    src, dst = SafetensorsDir(qwen3_ckpt.path), SafetensorsDir(out)
    assert set(dst.names()) == set(src.names()) | {f"model.layers.{i}.self_attn.{a}" for i in (0, 1)
                                                    for a in ("k_scale", "v_scale")}  # fmt: skip
    assert all(torch.equal(dst.read(n), src.read(n)) for n in src.names())  # the rest copied bit for bit
    assert (out / "tokenizer.json").exists()
    model = load_model(out)
    assert set(model.kv_scale_tensors()) == {n for n in dst.names() if n.endswith("_scale")}
    assert all(float(t) != 1.0 for t in model.kv_scale_tensors().values())
    AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)  # extra tensors: ignored, not an error
    # a checkpoint that has scales gets new ones, not two of each
    again = add_kv_scales(out, tmp_path / "again", KVScaleOptions(num_calibration_samples=8, max_sequence_length=64,
                                                                   headroom=2.0), progress=False)  # fmt: skip
    twice = SafetensorsDir(again.output_dir)
    assert sorted(twice.names()) == sorted(dst.names())
    torch.testing.assert_close(twice.read("model.layers.0.self_attn.k_scale"),
                               2 * dst.read("model.layers.0.self_attn.k_scale"))  # fmt: skip


def test_compressed_tensors_config_gets_the_kv_cache_scheme(qwen3_ckpt, tmp_path):
    from quantrl.checkpoint.convert_int import IntConvertOptions, convert_to_int

    int4 = convert_to_int(qwen3_ckpt.path, tmp_path / "int4", IntConvertOptions(method="rtn", group_size=64),
                          progress=False).output_dir  # fmt: skip
    out = add_kv_scales(int4, tmp_path / "int4-kv", OPTS, progress=False).output_dir
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["kv_cache_scheme"] == {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False,
                                     "symmetric": True}  # fmt: skip
    assert qc["config_groups"] == json.loads((int4 / "config.json").read_text())["quantization_config"]["config_groups"]
    assert len(load_model(out).kv_scale_tensors()) == 4


def test_cli_and_bad_options(qwen3_ckpt, tmp_path, capsys):
    from quantrl.cli import main

    out = tmp_path / "cli"
    assert main(["convert", "kv-scales", "--input-dir", str(qwen3_ckpt.path), "--output-dir", str(out),
                 "--num-calibration-samples", "4", "--max-sequence-length", "32", "--no-progress"]) == 0  # fmt: skip
    assert "4 tensors converted" in capsys.readouterr().out
    assert main(["convert", "kv-scales", "--input-dir", str(qwen3_ckpt.path), "--output-dir", str(tmp_path / "x"),
                 "--headroom", "0.5"]) == 2  # fmt: skip
    assert "headroom" in capsys.readouterr().err
    assert main(["convert", "kv-scales", "--input-dir", str(tmp_path / "missing"), "--output-dir",
                 str(tmp_path / "y")]) == 2  # fmt: skip
