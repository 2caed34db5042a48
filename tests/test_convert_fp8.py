"""BF16 -> FP8 checkpoint conversion (``convert_to_fp8``), end to end on tiny Qwen3 / Llama checkpoints.

Each case converts once (module-scoped) and transformers loads the result once; the tests then check the
tensors we wrote, the config, the copied files, transformers' dequantized weights against
``formats.fake_quantize_fp8`` (bitwise, invariants 1 and 3), the logits, and the BF16 round trip.

transformers' ``quant_method: fp8`` loader infers the block size as ``N // scale_rows``, which is wrong for
dims > 128 that are not multiples of 128; the fp8-dialect interop cases therefore use the Llama checkpoint
(every dim a multiple of 128 or <= 128), the compressed-tensors cases the Qwen3 one (320-wide dims), and
``test_transformers_fp8_dialect_ragged_dims`` documents the transformers bug as a strict xfail.
"""

import json
import math
from types import SimpleNamespace

import pytest
import torch

from quantrl.checkpoint.convert_bf16 import Bf16ConvertOptions, convert_to_bf16
from quantrl.checkpoint.convert_fp8 import Fp8ConvertOptions, convert_to_fp8
from quantrl.checkpoint.safetensors_io import CheckpointError
from quantrl.formats import FP8_DTYPE, dequantize_fp8, fake_quantize_fp8, quantize_fp8

# Stated bound for end to end: FP8 e4m3 (<= 2^-4 relative error per weight) through 2 layers.
LOGITS_REL_ERROR = 0.1  # measured ~0.045 on these models

# id -> (checkpoint, options). The dialect is "fp8" for block + auto/fp8, else compressed-tensors.
CASES = {
    "fp8-block": ("llama", Fp8ConvertOptions()),
    "fp8-block-ue8m0-2workers": ("llama", Fp8ConvertOptions(scale_fmt="ue8m0", max_workers=2)),
    "ct-block": ("qwen3", Fp8ConvertOptions(fmt="compressed-tensors")),
    "ct-channel-2workers": ("qwen3", Fp8ConvertOptions(strategy="channel", max_workers=2)),
    "ct-tensor": ("qwen3", Fp8ConvertOptions(strategy="tensor", fmt="compressed-tensors")),
}


def expected_scale_shape(strategy: str, shape: tuple[int, int]) -> tuple[int, ...]:
    n, k = shape
    return {"block": (math.ceil(n / 128), math.ceil(k / 128)), "channel": (n, 1), "tensor": (1,)}[strategy]


def fake_quant(ckpt, name: str, opts: Fp8ConvertOptions, dtype=None) -> torch.Tensor:
    return fake_quantize_fp8(ckpt.tensors[name], opts.strategy, opts.block_size, opts.scale_fmt, dtype=dtype)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    )


@pytest.fixture(scope="module", params=list(CASES))
def conv(request, tiny_ckpts, tmp_path_factory, ckpt_tools):
    ckpt_name, opts = CASES[request.param]
    ckpt = tiny_ckpts[ckpt_name]
    dialect = "fp8" if opts.fmt == "fp8" or (opts.fmt == "auto" and opts.strategy == "block") else "compressed-tensors"
    out = tmp_path_factory.mktemp(f"fp8-{request.param}") / "out"
    report = convert_to_fp8(ckpt.path, out, opts, progress=False)
    hf = ckpt_tools.load_hf(out, compressed_tensors=dialect == "compressed-tensors")
    with torch.no_grad():
        hf_logits = hf(ckpt.input_ids).logits.float()
    return SimpleNamespace(
        id=request.param,
        ckpt=ckpt,
        opts=opts,
        dialect=dialect,
        out=out,
        report=report,
        tensors=ckpt_tools.read(out),
        hf_state={k: v.detach().clone() for k, v in hf.state_dict().items()},
        hf_logits=hf_logits,
        scale_suffix="_scale_inv" if dialect == "fp8" else "_scale",
    )


def test_quantized_tensors_and_scales(conv):
    ckpt, opts = conv.ckpt, conv.opts
    targets = ckpt.quantizable()
    assert len(targets) == 14  # 7 Linear per layer x 2 layers
    expected_names = set(ckpt.tensors) | {t + conv.scale_suffix for t in targets}
    assert set(conv.tensors) == expected_names
    for name in targets:
        w, q, s = ckpt.tensors[name], conv.tensors[name], conv.tensors[name + conv.scale_suffix]
        assert q.dtype == FP8_DTYPE and q.shape == w.shape, name
        assert s.dtype == torch.float32 and tuple(s.shape) == expected_scale_shape(opts.strategy, tuple(w.shape)), name
        assert bool((s > 0).all()) and bool(torch.isfinite(s).all()), name
        # the stored pair is exactly formats' quantize_fp8, and dequantizes to formats' fake quant
        q_ref, s_ref = quantize_fp8(w, opts.strategy, opts.block_size, opts.scale_fmt)
        assert same_bytes(q, q_ref) and torch.equal(s, s_ref), name
        block = opts.block_size if opts.strategy == "block" else None  # channel / tensor: read from the scale's shape
        assert torch.equal(dequantize_fp8(q, s, block), fake_quant(ckpt, name, opts)), name
        if opts.scale_fmt == "ue8m0":
            mantissa, _ = torch.frexp(s)
            assert bool((mantissa == 0.5).all()), f"{name}: ue8m0 scales must be powers of two"
    assert conv.report.quantized == len(targets) and conv.report.kept == len(ckpt.tensors) - len(targets)


def test_kept_tensors_are_byte_identical(conv):
    kept = [n for n in conv.ckpt.tensors if n not in conv.ckpt.quantizable()]
    assert "model.embed_tokens.weight" in kept and "model.norm.weight" in kept
    if conv.ckpt.name == "qwen3":
        assert "lm_head.weight" in kept and "model.layers.0.self_attn.q_norm.weight" in kept
    for name in kept:
        assert same_bytes(conv.tensors[name], conv.ckpt.tensors[name]), name


def test_config(conv):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationConfig

    config = json.loads((conv.out / "config.json").read_text())
    original = json.loads((conv.ckpt.path / "config.json").read_text())
    qc = config.pop("quantization_config")
    assert config == original
    if conv.dialect == "fp8":
        assert qc["quant_method"] == "fp8" and qc["fmt"] == "e4m3" and qc["activation_scheme"] == "dynamic"
        assert qc["weight_block_size"] == [128, 128]
        assert qc.get("scale_fmt") == conv.opts.scale_fmt
        not_converted = qc["modules_to_not_convert"]
    else:
        parsed = QuantizationConfig.model_validate(qc)  # compressed-tensors' own schema
        assert parsed.format == "float-quantized" and parsed.quantization_status == "compressed"
        (group,) = parsed.config_groups.values()
        assert group.targets == ["Linear"]
        w = group.weights
        assert (w.num_bits, w.type, w.strategy, w.symmetric) == (8, "float", conv.opts.strategy, True)
        assert w.block_structure == ([128, 128] if conv.opts.strategy == "block" else None)
        assert group.input_activations.dynamic is True
        not_converted = parsed.ignore
    assert {"lm_head", "model.embed_tokens"} <= set(not_converted)
    quantized_modules = {n[: -len(".weight")] for n in conv.ckpt.quantizable()}
    assert not quantized_modules & set(not_converted)


def test_tokenizer_and_generation_files_copied(conv, ckpt_tools):
    src = ckpt_tools.aux_files(conv.ckpt.path)
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"} <= set(src)
    assert ckpt_tools.aux_files(conv.out) == src


def test_transformers_dequantizes_to_fake_quant(conv):
    """Invariant 3 (and 1): transformers' CPU dequantization == formats.fake_quantize_fp8, bit for bit."""
    hf, ckpt = conv.hf_state, conv.ckpt
    for name in ckpt.quantizable():
        assert hf[name].dtype == torch.bfloat16
        assert torch.equal(hf[name], fake_quant(ckpt, name, conv.opts)), name
    for name, t in ckpt.tensors.items():
        if name not in ckpt.quantizable():
            assert torch.equal(hf[name], t), name
    if ckpt.name == "llama":  # tied: transformers' lm_head is the (unquantized) embedding
        assert torch.equal(hf["lm_head.weight"], ckpt.tensors["model.embed_tokens.weight"])


def test_logits_close_to_bf16(conv, ckpt_tools):
    err = ckpt_tools.rel_error(conv.hf_logits, conv.ckpt.logits)
    assert 0 < err < LOGITS_REL_ERROR, f"{conv.id}: logits relative error {err:.4f}"


def test_bf16_round_trip(conv, ckpt_tools, tmp_path):
    out = tmp_path / "bf16"
    report = convert_to_bf16(conv.out, out, progress=False)
    back = ckpt_tools.read(out)
    assert set(back) == set(conv.ckpt.tensors)
    for name, t in conv.ckpt.tensors.items():
        if name in conv.ckpt.quantizable():
            assert back[name].dtype == torch.bfloat16
            assert torch.equal(back[name], conv.hf_state[name]), name  # == transformers == fake quant
        else:
            assert same_bytes(back[name], t), name
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert config == json.loads((conv.ckpt.path / "config.json").read_text())
    assert ckpt_tools.aux_files(out) == ckpt_tools.aux_files(conv.ckpt.path)
    assert report.quantized == len(conv.ckpt.quantizable())


def test_bf16_round_trip_float32(tiny_ckpts, ckpt_tools, tmp_path):
    """``--dtype float32``: fp32(q) * s without the final bf16 rounding (== fake quant in fp32)."""
    ckpt, opts = tiny_ckpts["qwen3"], Fp8ConvertOptions(strategy="channel")
    convert_to_fp8(ckpt.path, tmp_path / "fp8", opts, progress=False)
    convert_to_bf16(tmp_path / "fp8", tmp_path / "fp32", Bf16ConvertOptions(dtype="float32"), progress=False)
    back = ckpt_tools.read(tmp_path / "fp32")
    config = json.loads((tmp_path / "fp32" / "config.json").read_text())
    assert config["dtype"] == "float32"
    for name in ckpt.quantizable():
        assert back[name].dtype == torch.float32
        assert torch.equal(back[name], fake_quant(ckpt, name, opts, dtype=torch.float32)), name
    assert torch.equal(back["model.norm.weight"], ckpt.tensors["model.norm.weight"])  # kept tensors keep their dtype


@pytest.mark.parametrize(
    "ckpt_name, opts",
    [
        ("qwen3", Fp8ConvertOptions(fmt="compressed-tensors")),
        ("llama", Fp8ConvertOptions(scale_fmt="ue8m0")),
        ("qwen3", Fp8ConvertOptions(strategy="tensor")),
    ],
    ids=["ct-block", "fp8-block-ue8m0", "ct-tensor"],
)
def test_one_and_two_workers_byte_identical(tiny_ckpts, tmp_path, ckpt_tools, ckpt_name, opts):
    """Same bytes whatever the thread count, also when the output spans several shards."""
    from dataclasses import replace

    ckpt = tiny_ckpts[ckpt_name]
    small = 400_000  # bytes per shard: the ~1.1 MB output spans several shards
    outs = {}
    for workers in (1, 2):
        outs[workers] = tmp_path / f"w{workers}"
        convert_to_fp8(
            ckpt.path, outs[workers], replace(opts, max_workers=workers, max_shard_bytes=small), progress=False
        )
    files = sorted(p.name for p in outs[1].iterdir())
    assert files == sorted(p.name for p in outs[2].iterdir())
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) >= 3
    one, two = ckpt_tools.read(outs[1]), ckpt_tools.read(outs[2])
    assert set(one) == set(two)
    for name in one:
        assert same_bytes(one[name], two[name]), name
    for f in files:
        assert (outs[1] / f).read_bytes() == (outs[2] / f).read_bytes(), f


# ---- the fp8 dialect on dims that are not multiples of 128 ------------------------------------------------


@pytest.fixture(scope="module")
def fp8_dialect_ragged(tiny_ckpts, tmp_path_factory):
    ckpt = tiny_ckpts["qwen3"]
    out = tmp_path_factory.mktemp("fp8-ragged") / "out"
    convert_to_fp8(ckpt.path, out, Fp8ConvertOptions(fmt="fp8"), progress=False)
    return ckpt, out


def test_fp8_dialect_ragged_dims_ours(fp8_dialect_ragged, ckpt_tools, tmp_path):
    """Our side of the fp8 dialect on 320-wide dims: edge blocks use only their real elements."""
    ckpt, out = fp8_dialect_ragged
    tensors = ckpt_tools.read(out)
    assert tensors["model.layers.0.mlp.gate_proj.weight_scale_inv"].shape == (3, 2)  # [320, 256]
    assert tensors["model.layers.0.mlp.down_proj.weight_scale_inv"].shape == (2, 3)  # [256, 320]
    convert_to_bf16(out, tmp_path / "bf16", progress=False)
    back = ckpt_tools.read(tmp_path / "bf16")
    for name in ckpt.quantizable():
        assert torch.equal(back[name], fake_quantize_fp8(ckpt.tensors[name])), name


@pytest.mark.xfail(
    strict=True,
    reason="transformers' fp8 (finegrained) loader infers the block size as N // scale_rows, so a 320-wide "
    "dim with 128x128 blocks (3 scale rows) is rejected or dequantized wrongly; strict so we notice a fix",
)
def test_transformers_fp8_dialect_ragged_dims(fp8_dialect_ragged, ckpt_tools):
    ckpt, out = fp8_dialect_ragged
    hf = ckpt_tools.load_hf(out, compressed_tensors=False).state_dict()
    for name in ckpt.quantizable():
        assert torch.equal(hf[name], fake_quantize_fp8(ckpt.tensors[name])), name


def test_mxfp8_checkpoint(tiny_ckpts, ckpt_tools, tmp_path):
    """--format mxfp8: e4m3 weights with E8M0 scale bytes per 1x32; compressed-tensors parses the config,
    transformers dequantizes to exactly formats' 1x32 ue8m0 fake quant, and the BF16 round trip agrees."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationConfig

    from quantrl.formats import decode_e8m0

    ckpt = tiny_ckpts["qwen3"]
    out = convert_to_fp8(ckpt.path, tmp_path / "mx", Fp8ConvertOptions(fmt="mxfp8"), progress=False).output_dir
    tensors = ckpt_tools.read(out)
    for name in ckpt.quantizable():
        w, q, s = ckpt.tensors[name], tensors[name], tensors[name + "_scale"]
        q_ref, s_ref = quantize_fp8(w, "block", (1, 32), "ue8m0")
        assert s.dtype == torch.uint8 and s.shape == (w.shape[0], w.shape[1] // 32), name
        assert same_bytes(q, q_ref) and torch.equal(decode_e8m0(s), s_ref), name
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    parsed = QuantizationConfig.model_validate(qc)
    (group,) = parsed.config_groups.values()
    assert parsed.format == "mxfp8-quantized"
    for args, dynamic in ((group.weights, False), (group.input_activations, True)):
        assert (args.num_bits, args.type, args.strategy, args.group_size, args.dynamic) == (8, "float", "group", 32, dynamic)
        assert args.scale_dtype == torch.uint8
    hf = ckpt_tools.load_hf(out, compressed_tensors=True)
    state = hf.state_dict()
    for name in ckpt.quantizable():
        assert torch.equal(state[name], fake_quantize_fp8(ckpt.tensors[name], "block", (1, 32), "ue8m0")), name
    with torch.no_grad():  # transformers runs the dequantized weights with BF16 activations
        assert ckpt_tools.rel_error(hf(ckpt.input_ids).logits.float(), ckpt.logits) < LOGITS_REL_ERROR
    back = ckpt_tools.read(convert_to_bf16(out, tmp_path / "back", progress=False).output_dir)
    assert all(torch.equal(back[n], state[n]) for n in ckpt.quantizable())
    from _tiny_models import qwen3_config, save_model

    ragged = save_model(qwen3_config(hidden_size=64, intermediate_size=80, head_dim=16), tmp_path / "ragged")
    with pytest.raises(CheckpointError, match="not divisible by 32.*down_proj"):
        convert_to_fp8(ragged, tmp_path / "r", Fp8ConvertOptions(fmt="mxfp8"), progress=False)
