"""BF16 -> NVFP4 weight-only checkpoints (``convert_to_nvfp4``), compressed-tensors ``nvfp4-pack-quantized``.

Checked: layout and config (parsed by the ``compressed_tensors`` library), transformers' load through
compressed-tensors dequantizes to exactly ``formats.fake_quantize_nvfp4`` of the BF16 weights (bitwise), our
engine computes with the same weights, logits stay near BF16, the BF16 round trip, and the CLI's errors.
"""

import json

import pytest
import torch

from quantrl.checkpoint.convert_bf16 import convert_to_bf16
from quantrl.checkpoint.convert_nvfp4 import convert_to_nvfp4
from quantrl.checkpoint.safetensors_io import CheckpointError
from quantrl.cli import main
from quantrl.formats import fake_quantize_nvfp4
from quantrl.model import Nvfp4Linear, dequantized_weights, load_model

LOGITS_REL_ERROR = 0.35  # stated bound through 2 layers of random weights (INT4 g32 measures ~0.2 here)


def module(name: str) -> str:
    return name[: -len(".weight")]


@pytest.fixture(scope="module", params=["qwen3", "llama"])
def conv(request, tiny_ckpts, tmp_path_factory):
    ckpt = tiny_ckpts[request.param]
    out = tmp_path_factory.mktemp(f"nvfp4-{request.param}") / "out"
    report = convert_to_nvfp4(ckpt.path, out, progress=False)
    return ckpt, out, report


def test_layout_and_config(conv, ckpt_tools):
    ckpt, out, report = conv
    tensors = ckpt_tools.read(out)
    targets = ckpt.quantizable()
    assert len(targets) == 14 and report.quantized == 14
    expected = {n for n in ckpt.tensors if n not in targets}
    for name in targets:
        m = module(name)
        expected |= {f"{m}.weight_packed", f"{m}.weight_scale", f"{m}.weight_global_scale"}
        n, k = ckpt.tensors[name].shape
        assert tensors[f"{m}.weight_packed"].dtype == torch.uint8 and tensors[f"{m}.weight_packed"].shape == (n, k // 2)
        assert tensors[f"{m}.weight_scale"].dtype == torch.float8_e4m3fn
        assert tensors[f"{m}.weight_scale"].shape == (n, k // 16)
        assert tensors[f"{m}.weight_global_scale"].dtype == torch.float32
    assert set(tensors) == expected
    config = json.loads((out / "config.json").read_text())
    qc = config.pop("quantization_config")
    assert config.pop("quantrl_quantization") == {"method": "rtn", "format": "nvfp4"}
    assert config == json.loads((ckpt.path / "config.json").read_text())
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationConfig

    parsed = QuantizationConfig.model_validate(qc)
    (group,) = parsed.config_groups.values()
    w = group.weights
    assert parsed.format == "nvfp4-pack-quantized" and group.input_activations is None
    assert (w.num_bits, w.type, w.strategy, w.group_size, w.scale_dtype) == (4, "float", "tensor_group", 16,
                                                                           torch.float8_e4m3fn)  # fmt: skip
    assert {"lm_head", "model.embed_tokens"} <= set(parsed.ignore)


def test_transformers_dequantizes_to_our_fake_quant(conv, ckpt_tools):
    ckpt, out, _ = conv
    hf = ckpt_tools.load_hf(out, compressed_tensors=True)
    state = hf.state_dict()
    ours = dequantized_weights(load_model(out, dtype=torch.bfloat16))
    for name in ckpt.quantizable():
        want = fake_quantize_nvfp4(ckpt.tensors[name])
        assert torch.equal(state[name], want), name
        assert torch.equal(ours[name], want), name
    with torch.no_grad():
        err = ckpt_tools.rel_error(hf(ckpt.input_ids).logits.float(), ckpt.logits)
    assert 0 < err < LOGITS_REL_ERROR, f"logits relative error {err:.4f}"


def test_engine_holds_nvfp4_linears(conv):
    _, out, _ = conv
    model = load_model(out, dtype=torch.bfloat16)
    assert isinstance(model.model.layers[0].self_attn.q_proj, Nvfp4Linear)
    assert not isinstance(model.lm_head, Nvfp4Linear)


def test_bf16_round_trip(conv, ckpt_tools, tmp_path):
    ckpt, out, _ = conv
    convert_to_bf16(out, tmp_path / "back", progress=False)
    back = ckpt_tools.read(tmp_path / "back")
    assert set(back) == set(ckpt.tensors)
    for name, t in ckpt.tensors.items():
        want = fake_quantize_nvfp4(t) if name in ckpt.quantizable() else t
        assert torch.equal(back[name], want), name
    assert "quantization_config" not in json.loads((tmp_path / "back" / "config.json").read_text())


def test_refuses_quantized_input_and_ragged_k(conv, tmp_path, capsys):
    from _tiny_models import qwen3_config, save_model

    ragged = save_model(qwen3_config(hidden_size=64, intermediate_size=200, head_dim=16), tmp_path / "ragged")
    with pytest.raises(CheckpointError, match="not divisible by 16.*down_proj"):
        convert_to_nvfp4(ragged, tmp_path / "r", progress=False)
    _, out, _ = conv
    with pytest.raises(CheckpointError):
        convert_to_nvfp4(out, tmp_path / "again", progress=False)
    assert main(["convert", "nvfp4", "--input-dir", str(out), "--output-dir", str(tmp_path / "cli"), "--no-progress"]) == 2
    assert "error:" in capsys.readouterr().err


def test_w4a4_nvfp4_checkpoint_runs_weight_only(conv, tmp_path):
    """An NVFP4 W4A4 checkpoint (llm-compressor's NVFP4 preset: input_global_scale per Linear) loads with a
    warning and computes exactly what its NVFP4A16 twin computes."""
    import shutil

    from safetensors.torch import load_file, save_file

    _, out, _ = conv
    w4a4 = tmp_path / "w4a4"
    shutil.copytree(out, w4a4)
    config = json.loads((w4a4 / "config.json").read_text())
    group = config["quantization_config"]["config_groups"]["group_0"]
    group["input_activations"] = {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16,
                                  "symmetric": True, "dynamic": "local", "scale_dtype": "torch.float8_e4m3fn"}  # fmt: skip
    (w4a4 / "config.json").write_text(json.dumps(config))
    (shard,) = w4a4.glob("*.safetensors")
    tensors = load_file(shard)
    for name in [n for n in tensors if n.endswith(".weight_global_scale")]:
        tensors[name.replace("weight_global_scale", "input_global_scale")] = torch.tensor([1.5])
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.warns(UserWarning, match="runs weight-only"):
        model = load_model(w4a4, dtype=torch.bfloat16)
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        assert torch.equal(model(ids), load_model(out, dtype=torch.bfloat16)(ids))


def test_gptq_checkpoint(tiny_ckpts, ckpt_tools, tmp_path, capsys):
    """``--method gptq``: the same layout and config (provenance says gptq), global scales from the BF16
    weights (RTN's), codes that differ from RTN in every decoder Linear, and transformers (through
    compressed-tensors) and our engine both compute with exactly ``formats.dequantize_nvfp4`` of what was
    written; the logits stay near BF16."""
    from quantrl.checkpoint.convert_nvfp4 import Nvfp4ConvertOptions
    from quantrl.formats import dequantize_nvfp4, unpack_nvfp4

    ckpt = tiny_ckpts["qwen3"]
    opts = Nvfp4ConvertOptions(method="gptq", data_dir="synthetic", num_calibration_samples=8, max_sequence_length=64)
    out = convert_to_nvfp4(ckpt.path, tmp_path / "gptq", opts, progress=False).output_dir
    rtn = ckpt_tools.read(convert_to_nvfp4(ckpt.path, tmp_path / "rtn", progress=False).output_dir)
    tensors = ckpt_tools.read(out)
    assert {n: (t.dtype, t.shape) for n, t in tensors.items()} == {n: (t.dtype, t.shape) for n, t in rtn.items()}
    prov = json.loads((out / "config.json").read_text())["quantrl_quantization"]
    assert prov["method"] == "gptq" and prov["format"] == "nvfp4" and prov["num_calibration_samples"] == 8
    hf_state = ckpt_tools.load_hf(out, compressed_tensors=True).state_dict() if _has_ct() else None
    ours = dequantized_weights(load_model(out, dtype=torch.bfloat16))
    for name in ckpt.quantizable():
        m = module(name)
        assert torch.equal(tensors[f"{m}.weight_global_scale"], rtn[f"{m}.weight_global_scale"]), name
        assert not torch.equal(tensors[f"{m}.weight_packed"], rtn[f"{m}.weight_packed"]), f"{name}: GPTQ equals RTN"
        want = dequantize_nvfp4(unpack_nvfp4(tensors[f"{m}.weight_packed"]), tensors[f"{m}.weight_scale"],
                                tensors[f"{m}.weight_global_scale"], torch.bfloat16)  # fmt: skip
        assert torch.equal(ours[name], want), name
        if hf_state is not None:
            assert torch.equal(hf_state[name], want), name
    with torch.no_grad():
        logits = load_model(out, dtype=torch.float32)(ckpt.input_ids)
    assert 0 < ckpt_tools.rel_error(logits.float(), ckpt.logits) < LOGITS_REL_ERROR
    args = ["convert", "nvfp4", "--input-dir", str(ckpt.path), "--output-dir", str(tmp_path / "cli"), "--method",
            "gptq", "--no-progress"]  # fmt: skip
    assert main(args) == 2 and "GPTQ needs calibration text" in capsys.readouterr().err


def _has_ct() -> bool:
    import importlib.util

    return importlib.util.find_spec("compressed_tensors") is not None
