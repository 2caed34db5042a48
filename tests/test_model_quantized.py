"""Quantized checkpoints written by our converters load into the decoder and generate; the weights the
engine computes with are exactly ``formats``' fake quantization of the original BF16 weights (bitwise,
invariant 1); the FP8 and W4A16 Linear outputs equal explicit references built from ``formats``.

Shapes: hidden 192 and intermediate 320 are not multiples of 128, so FP8 blocks have ragged edges.
"""

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from _tiny_models import qwen3_config, random_prompts, save_model

from quantrl.checkpoint.convert_fp8 import Fp8ConvertOptions, convert_to_fp8
from quantrl.checkpoint.convert_int import IntConvertOptions, convert_to_int
from quantrl.checkpoint.convert_nvfp4 import convert_to_nvfp4
from quantrl.checkpoint.safetensors_io import SafetensorsDir
from quantrl.formats import (
    decode_e8m0,
    dequantize_fp8,
    dequantize_fp8_activation,
    dequantize_int,
    fake_quantize_fp8,
    fake_quantize_int,
    fake_quantize_nvfp4,
    quantize_fp8,
    quantize_fp8_activation,
    unpack_int4,
)
from quantrl.model import (
    Bf16Linear,
    Fp8Linear,
    Nvfp4Linear,
    QuantScheme,
    W4A16Linear,
    build_model,
    dequantized_weights,
    load_model,
)
from quantrl.model.fp8_gemm import quantize_act_graph_safe
from quantrl.rollout import Engine, SamplingParams

GROUP = 32



@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    base = tmp_path_factory.mktemp("quant")
    cfg = qwen3_config(hidden_size=192, intermediate_size=320, head_dim=48)
    src = save_model(cfg, base / "bf16", dtype=torch.bfloat16)
    fp8, rtn = Fp8ConvertOptions, IntConvertOptions
    return {
        "bf16": src,
        "fp8": convert_to_fp8(src, base / "fp8", progress=False).output_dir,
        "fp8_channel": convert_to_fp8(src, base / "fp8_channel", fp8(strategy="channel"), progress=False).output_dir,
        "int4": convert_to_int(src, base / "int4", rtn(method="rtn", group_size=GROUP), progress=False).output_dir,
        "int8": convert_to_int(src, base / "int8", rtn(method="rtn", group_size=GROUP, quant_type="W8A16"),
                               progress=False).output_dir,
        "mxfp8": convert_to_fp8(src, base / "mxfp8", fp8(fmt="mxfp8"), progress=False).output_dir,
        "nvfp4": convert_to_nvfp4(src, base / "nvfp4", progress=False).output_dir,
    }  # fmt: skip


FAKE = {
    "fp8": (Fp8Linear, lambda w: fake_quantize_fp8(w)),
    "fp8_channel": (Fp8Linear, lambda w: fake_quantize_fp8(w, strategy="channel")),
    "int4": (W4A16Linear, lambda w: fake_quantize_int(w, 4, GROUP, 7)),
    "int8": (W4A16Linear, lambda w: fake_quantize_int(w, 8, GROUP, 127)),
    "mxfp8": (Fp8Linear, lambda w: fake_quantize_fp8(w, "block", (1, 32), "ue8m0")),
    "nvfp4": (Nvfp4Linear, lambda w: fake_quantize_nvfp4(w)),
}


@pytest.mark.parametrize("kind", list(FAKE))
def test_dequantized_weights_equal_formats_fake_quant(checkpoints, kind):
    cls, fake = FAKE[kind]
    model = load_model(checkpoints[kind], dtype=torch.bfloat16)
    original = SafetensorsDir(checkpoints["bf16"])
    deq = dequantized_weights(model)
    assert len(deq) == 2 * 7 + 1
    for name, w in deq.items():
        expected = original.read(name)
        if name == "lm_head.weight":  # stays high precision
            assert isinstance(model.lm_head, Bf16Linear)
        else:
            expected = fake(expected)
        assert w.dtype == torch.bfloat16 and torch.equal(w, expected), name
    assert isinstance(model.model.layers[1].mlp.down_proj, cls)
    assert torch.equal(model.model.embed_tokens.weight, original.read("model.embed_tokens.weight"))


@pytest.mark.parametrize("kind", ["fp8", "mxfp8", "int4", "nvfp4"])
def test_quantized_checkpoints_generate(checkpoints, kind):
    model = load_model(checkpoints[kind], dtype=torch.bfloat16)
    engine = Engine(model, kv_cache_tokens=512)
    res = engine.generate(random_prompts([3, 6]), SamplingParams(n=2, max_new_tokens=6, seed=0))
    assert [len(r.tokens) for r in res] == [6] * 4
    assert all(lp <= 0 and lp == lp for r in res for lp in r.logprobs)
    # Outputs are those of the dequantized weights: a BF16 model holding them computes the same logits
    # (bitwise for the weight-only formats, whose activations stay bf16; FP8 adds only its activation rounding:
    # ~5% on this model).
    bf16 = load_model(checkpoints["bf16"], dtype=torch.bfloat16)
    with torch.no_grad():
        for name, w in dequantized_weights(model).items():
            bf16.get_parameter(name).copy_(w)
        ids = torch.tensor([random_prompts([8], seed=1)[0]])
        q_logits, b_logits = model(ids).float(), bf16(ids).float()
    if kind in ("int4", "nvfp4"):
        assert torch.equal(q_logits, b_logits)
    else:
        assert 0 < float((q_logits - b_logits).norm() / b_logits.norm()) < 0.1


def test_fp8_block_linear_equals_explicit_reference(checkpoints, gen):
    model = load_model(checkpoints["fp8"], dtype=torch.bfloat16)
    lin = model.model.layers[0].mlp.down_proj  # [192, 320]: 2x3 blocks, ragged edges in both dims
    assert isinstance(lin, Fp8Linear) and lin.weight_scale_inv.shape == (2, 3)
    x = torch.randn(2, 5, 320, generator=gen).to(torch.bfloat16) * 3
    q, s = quantize_fp8_activation(x)  # 1x128 groups (last one ragged: 64)
    xd = dequantize_fp8_activation(q, s, dtype=torch.float32)
    wd = dequantize_fp8(lin.weight, lin.weight_scale_inv, (128, 128), dtype=torch.float32)
    expected = (xd @ wd.T).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(lin(x), expected)


def test_mxfp8_linear_quantizes_both_operands_in_1x32_blocks(checkpoints, gen):
    model = load_model(checkpoints["mxfp8"], dtype=torch.bfloat16)
    lin = model.model.layers[0].mlp.down_proj  # [192, 320]: 10 blocks of 32 per row
    assert lin.weight_scale.dtype == torch.uint8 and lin.weight_scale.shape == (192, 10)
    x = torch.randn(2, 5, 320, generator=gen).to(torch.bfloat16) * 3
    q, s = quantize_fp8_activation(x, 32, "ue8m0")
    assert bool((torch.frexp(s)[0] == 0.5).all())  # power-of-two activation scales
    xd = dequantize_fp8_activation(q, s, 32, dtype=torch.float32)
    wd = dequantize_fp8(lin.weight, decode_e8m0(lin.weight_scale), (1, 32), dtype=torch.float32)
    expected = (xd @ wd.T).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(lin(x), expected)
    assert QuantScheme.from_hf(json.loads((checkpoints["mxfp8"] / "config.json").read_text())["quantization_config"]) \
        == dataclasses.replace(QuantScheme.mxfp8(), ignore=("lm_head", "model.embed_tokens"),
                               ignore_rule="compressed-tensors")  # fmt: skip


def test_fp8_channel_linear_quantizes_activations_per_token(checkpoints, gen):
    model = load_model(checkpoints["fp8_channel"], dtype=torch.bfloat16)
    lin = model.model.layers[0].self_attn.q_proj
    assert lin.weight_scale.shape == (192, 1) and lin.act_strategy == "token"
    x = torch.randn(7, 192, generator=gen).to(torch.bfloat16)
    q, s = quantize_fp8_activation(x, group_size=192)
    xd = dequantize_fp8_activation(q, s, 192, torch.float32)
    expected = (xd @ lin.dequantized_weight(torch.float32).T).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(lin(x), expected)


def test_w4a16_linear_equals_dequantize_then_linear(checkpoints, gen):
    model = load_model(checkpoints["int4"], dtype=torch.bfloat16)
    lin = model.model.layers[1].self_attn.o_proj
    x = torch.randn(3, 192, generator=gen).to(torch.bfloat16)
    w = dequantize_int(unpack_int4(lin.weight_packed, 192), lin.weight_scale, GROUP, torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(lin(x), F.linear(x, w))


@pytest.mark.parametrize("strategy,group,k", [("group", 128, 256), ("group", 128, 320), ("token", 256, 256),
                                              ("tensor", 256, 256)])  # fmt: skip
def test_graph_safe_activation_quant_equals_formats(strategy, group, k, gen):
    """The CUDA paths' sync-free activation quantizer is formats' quantizer, bit for bit (ragged K too)."""
    x = torch.randn(6, k, generator=gen).to(torch.bfloat16) * 5
    x[0, :128] = 0  # an all-zero group must take the scale-1 rule, as in formats
    q, s = quantize_act_graph_safe(x, strategy, group, None)
    if strategy == "tensor":
        eq, es = quantize_fp8(x, "tensor")
    else:
        eq, es = quantize_fp8_activation(x, group)
    assert torch.equal(q.view(torch.uint8), eq.view(torch.uint8)) and torch.equal(s, es)


def test_scheme_respects_ignored_modules():
    qc = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128],
          "modules_to_not_convert": ["lm_head", "model.layers.1.mlp.down_proj", "re:.*self_attn\\.k_proj"]}  # fmt: skip
    model = build_model(qwen3_config().to_dict(), qc, dtype=torch.bfloat16)
    layers = model.model.layers
    assert isinstance(layers[1].mlp.down_proj, Bf16Linear) and isinstance(layers[0].mlp.down_proj, Fp8Linear)
    assert isinstance(layers[0].self_attn.k_proj, Bf16Linear) and isinstance(layers[0].self_attn.q_proj, Fp8Linear)
    with pytest.raises(ValueError, match="quant_method 'awq'"):
        QuantScheme.from_hf({"quant_method": "awq"})


def test_ignore_entries_match_as_their_dialects_libraries_match_them():
    """compressed-tensors' ``ignore`` by its own ``match_name`` (exact names, 're:' from the start);
    quant_method fp8's ``modules_to_not_convert`` by transformers' ``should_convert_module``."""
    from compressed_tensors.utils.match import match_name
    from transformers.quantizers.quantizers_utils import should_convert_module

    from quantrl.checkpoint.quant_config import ct_int_config

    names = [f"model.layers.{i}.{m}" for i in (0, 1, 11) for m in ("self_attn.q_proj", "self_attn.k_proj",
             "mlp.up_proj", "mlp.gate_proj", "mlp.gate")] + ["lm_head"]  # fmt: skip
    ignore = ["lm_head", "re:.*self_attn", "re:model.layers.1.mlp", "mlp.gate", "model.layers.0.mlp.up_proj"]
    ct = QuantScheme.from_hf(ct_int_config(4, 32, ignore))
    skip = ["lm_head", "model.layers.*.self_attn", "model.layers.1", "mlp.gate", "k_proj"]
    fp8 = QuantScheme.from_hf({"quant_method": "fp8", "weight_block_size": [128, 128], "modules_to_not_convert": skip})
    for name in names:
        assert ct.quantizes(name) == (not any(match_name(name, t) for t in ignore)), name
        assert fp8.quantizes(name) == should_convert_module(name, skip), name
    assert not ct.quantizes("model.layers.0.self_attn.q_proj") and ct.quantizes("model.layers.0.mlp.gate")


def test_nvfp4_configs():
    from quantrl.checkpoint.quant_config import ct_nvfp4_config

    qc = ct_nvfp4_config(["lm_head", "model.layers.0.mlp.up_proj"])
    scheme = QuantScheme.from_hf(qc)
    assert scheme == dataclasses.replace(QuantScheme.nvfp4(), ignore=tuple(qc["ignore"]), ignore_rule="compressed-tensors")
    assert not scheme.quantizes("model.layers.0.mlp.up_proj") and scheme.quantizes("model.layers.1.mlp.up_proj")
    w4a4 = {**qc, "config_groups": {"group_0": {**qc["config_groups"]["group_0"], "input_activations": {
        "num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16, "dynamic": "local"}}}}
    with pytest.warns(UserWarning, match="runs weight-only"):
        assert QuantScheme.from_hf(w4a4).method == "nvfp4"
    mxfp4 = {**qc, "config_groups": {"group_0": {**qc["config_groups"]["group_0"], "weights": {
        **qc["config_groups"]["group_0"]["weights"], "group_size": 32}}}}
    with pytest.raises(ValueError, match="groups of 16"):
        QuantScheme.from_hf(mxfp4)


def test_loading_a_mismatched_checkpoint_names_the_tensors(checkpoints, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(checkpoints["fp8"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"]["weight_block_size"] = [64, 64]  # scales on disk are for 128x128 blocks
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="weight_scale_inv.*shape"):
        load_model(bad)


def _cpu_scaled_mm_rowwise() -> bool:
    """Whether this torch's CPU ``_scaled_mm`` takes per-row scales (2.13 does; 2.11 only per-tensor)."""
    a = torch.ones(16, 32).to(torch.float8_e4m3fn)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.bfloat16)
    except RuntimeError:
        return False
    return True


@pytest.mark.parametrize("kind", ["fp8", "fp8_channel"])
def test_fp8_fast_path_guard(checkpoints, kind, monkeypatch, gen):
    """The CUDA fast-path logic, run on CPU by pretending the device qualifies: the first call compares
    ``torch._scaled_mm`` with the reference and keeps (and answers with) it only if they agree; a wrong fast path (here:
    garbage, standing in for a mis-laid-out scale) is caught, warned about, and never used."""
    model = load_model(checkpoints[kind], dtype=torch.bfloat16)
    lin = model.model.layers[0].mlp.up_proj
    x = torch.randn(4, 192, generator=gen).to(torch.bfloat16)
    monkeypatch.setattr(Fp8Linear, "_fast_usable", lambda self, x2d: self._fast is not False)
    from quantrl.model import fp8_gemm

    calls = []
    real = fp8_gemm.scaled_mm
    monkeypatch.setattr(fp8_gemm, "scaled_mm", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        ref = lin.reference_forward(x)
        if kind == "fp8_channel" and _cpu_scaled_mm_rowwise():  # the real fast path runs on CPU here
            first = lin(x)  # probed, kept, answered by the fast path as every later call is
            assert lin._fast is True and len(calls) == 1
            fast = lin(x)
            assert len(calls) == 2 and torch.equal(fast, first)
            assert float((fast.float() - ref.float()).norm() / ref.float().norm()) < 1e-2
        else:  # no blockwise (before torch 2.13 no rowwise) CPU scaling: the probe's error disables the fast path
            with pytest.warns(UserWarning, match="fast path disabled"):
                assert torch.equal(lin(x), ref)
            assert lin._fast is False
        # a fast path within the probe's tolerance but not bit-equal is kept and answers from the first call on
        monkeypatch.setattr("quantrl.model.fp8_gemm.scaled_mm", lambda x2d, *a: ref * (1 + 2**-7))
        lin._fast = None
        first = lin(x)
        assert lin._fast is True and not torch.equal(first, ref) and torch.equal(first, lin(x))
        monkeypatch.setattr("quantrl.model.fp8_gemm.scaled_mm", lambda x2d, *a: torch.zeros(x2d.shape[0], 320))
        lin._fast = None
        with pytest.warns(UserWarning, match="fast path disabled"):
            assert torch.equal(lin(x), ref)
        assert lin._fast is False and torch.equal(lin(x), ref)
