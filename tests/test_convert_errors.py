"""Conversion errors: each names the file / tensor / flag at fault, and a failed conversion leaves nothing
behind (no output dir, no hidden ``.NAME.tmp-*`` dir, an existing output untouched). Plus the CLI's
exit codes and ``error:`` line."""

import json
import math
import re
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from quantrl import cli
from quantrl.checkpoint.convert_bf16 import convert_to_bf16
from quantrl.checkpoint.convert_fp8 import Fp8ConvertOptions, convert_to_fp8
from quantrl.checkpoint.convert_int import IntConvertOptions, convert_to_int
from quantrl.checkpoint.safetensors_io import CheckpointError, SafetensorsDir, ShardedWriter

RTN = IntConvertOptions(method="rtn", group_size=32)
CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64}


def small_tensors(gen: torch.Generator) -> dict[str, torch.Tensor]:
    def r(*shape):
        return torch.randn(*shape, generator=gen).to(torch.bfloat16)

    return {
        "model.embed_tokens.weight": r(100, 64),
        "model.layers.0.self_attn.q_proj.weight": r(64, 64),
        "model.layers.0.mlp.up_proj.weight": r(96, 64),
        "model.layers.0.mlp.down_proj.weight": r(64, 96),
        "model.layers.0.input_layernorm.weight": r(64),
        "model.layers.1.self_attn.q_proj.weight": r(64, 64),
        "model.norm.weight": r(64),
        "lm_head.weight": r(100, 64),
    }


def write_ckpt(path: Path, tensors: dict[str, torch.Tensor], config: dict | None = CONFIG) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    (path / "tokenizer_config.json").write_text("{}")
    return path


@pytest.fixture
def small_ckpt(tmp_path, gen) -> Path:
    return write_ckpt(tmp_path / "in", small_tensors(gen))


def leftovers(parent: Path) -> list[str]:
    """Hidden temp/trash dirs a conversion may leave beside its output."""
    return sorted(p.name for p in parent.iterdir() if re.match(r"\..*\.(tmp|old)-", p.name))


def assert_raises_naming(fn, *needles, exc=CheckpointError):
    with pytest.raises(exc) as info:
        fn()
    msg = str(info.value)
    for needle in needles:
        assert str(needle) in msg, f"{needle!r} not in error message: {msg}"
    return msg


# ---- bad inputs ------------------------------------------------------------------------------------------


def test_missing_config(small_ckpt, tmp_path):
    (small_ckpt / "config.json").unlink()
    assert_raises_naming(
        lambda: convert_to_fp8(small_ckpt, tmp_path / "out", progress=False), small_ckpt, "config.json"
    )
    assert_raises_naming(
        lambda: convert_to_int(small_ckpt, tmp_path / "out", RTN, progress=False), small_ckpt, "config.json"
    )
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_invalid_config_json(small_ckpt, tmp_path):
    (small_ckpt / "config.json").write_text("{not json")
    assert_raises_naming(
        lambda: convert_to_fp8(small_ckpt, tmp_path / "out", progress=False),
        small_ckpt / "config.json",
        "not valid JSON",
    )


def test_no_weights(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(CONFIG))
    assert_raises_naming(lambda: convert_to_fp8(d, tmp_path / "out", progress=False), d, "no *.safetensors weights")
    (d / "pytorch_model.bin").write_bytes(b"\0" * 16)
    assert_raises_naming(lambda: convert_to_fp8(d, tmp_path / "out", progress=False), d, "PyTorch .bin")
    assert not (tmp_path / "out").exists()


def _truncate_to_4_bytes(raw: bytes) -> bytes:
    return raw[:4]


def _huge_header_length(raw: bytes) -> bytes:
    return struct.pack("<Q", 1 << 40) + raw[8:]


def _garbled_json(raw: bytes) -> bytes:
    return raw[:8] + b"\xff\xfe{{" + raw[12:]


def _header_not_object(raw: bytes) -> bytes:
    blob = b"[1, 2, 3]"
    return struct.pack("<Q", len(blob)) + blob


def _truncated_data(raw: bytes) -> bytes:
    return raw[: len(raw) - 100]


def _bad_dtype(raw: bytes) -> bytes:
    return raw.replace(b'"BF16"', b'"XX16"', 1)


@pytest.mark.parametrize(
    "garble, expected",
    [
        (_truncate_to_4_bytes, "shorter than its 8-byte header length"),
        (_huge_header_length, "corrupt safetensors header"),
        (_garbled_json, "not valid JSON"),
        (_header_not_object, "not a JSON object"),
        (_truncated_data, "do not fit"),
        (_bad_dtype, "corrupt header entry for tensor"),
    ],
    ids=["truncated", "huge-header-length", "garbled-json", "not-an-object", "truncated-data", "unknown-dtype"],
)
def test_corrupt_safetensors(small_ckpt, tmp_path, garble, expected):
    f = small_ckpt / "model.safetensors"
    f.write_bytes(garble(f.read_bytes()))
    assert_raises_naming(lambda: convert_to_fp8(small_ckpt, tmp_path / "out", progress=False), f, expected)
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_index_pointing_to_missing_shard(tmp_path, gen):
    d = tmp_path / "in"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(CONFIG))
    tensors = small_tensors(gen)
    names = list(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:4], "model-00002-of-00002.safetensors": names[4:]}
    for fname, ns in shards.items():
        save_file({n: tensors[n] for n in ns}, str(d / fname))
    weight_map = {n: f for f, ns in shards.items() for n in ns}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert len(SafetensorsDir(d).names()) == len(tensors)  # the intact sharded checkpoint reads fine
    (d / "model-00002-of-00002.safetensors").unlink()
    assert_raises_naming(
        lambda: convert_to_fp8(d, tmp_path / "out", progress=False),
        d / "model.safetensors.index.json",
        "do not exist",
        "model-00002-of-00002.safetensors",
    )
    # a tensor mapped to a shard that does not store it
    save_file(
        {n: tensors[n] for n in shards["model-00002-of-00002.safetensors"][1:]},
        str(d / "model-00002-of-00002.safetensors"),
    )
    missing = shards["model-00002-of-00002.safetensors"][0]
    assert_raises_naming(
        lambda: convert_to_fp8(d, tmp_path / "out", progress=False), "model.safetensors.index.json", missing
    )
    assert not (tmp_path / "out").exists()


def test_already_quantized_input(small_ckpt, tmp_path):
    fp8 = tmp_path / "fp8"
    convert_to_fp8(small_ckpt, fp8, progress=False)
    assert_raises_naming(
        lambda: convert_to_fp8(fp8, tmp_path / "again", progress=False),
        fp8,
        "already quantized",
        "quant_method='fp8'",
        "convert bf16",
    )
    assert_raises_naming(
        lambda: convert_to_int(fp8, tmp_path / "again", RTN, progress=False), fp8, "quant_method='fp8'"
    )
    # without the config, the fp8 tensors themselves give it away
    config = json.loads((fp8 / "config.json").read_text())
    del config["quantization_config"]
    (fp8 / "config.json").write_text(json.dumps(config))
    assert_raises_naming(
        lambda: convert_to_fp8(fp8, tmp_path / "again", progress=False),
        fp8 / "model.safetensors",
        "looks already quantized",
        ".weight",
    )
    int4 = tmp_path / "int4"
    convert_to_int(small_ckpt, int4, RTN, progress=False)
    assert_raises_naming(
        lambda: convert_to_fp8(int4, tmp_path / "again", progress=False), int4, "quant_method='compressed-tensors'"
    )
    config = json.loads((int4 / "config.json").read_text())
    del config["quantization_config"]
    (int4 / "config.json").write_text(json.dumps(config))
    assert_raises_naming(
        lambda: convert_to_fp8(int4, tmp_path / "again", progress=False), int4 / "model.safetensors", ".weight_packed"
    )
    assert not (tmp_path / "again").exists()


def test_bf16_of_unquantized_input(small_ckpt, tmp_path):
    assert_raises_naming(
        lambda: convert_to_bf16(small_ckpt, tmp_path / "out", progress=False), small_ckpt, "no quantization_config"
    )


def test_bf16_refuses_tensors_it_cannot_dequantize_and_drops_activation_scales(small_ckpt, tmp_path):
    """A GPTQ act-order ``weight_g_idx`` copied as is would be a silently wrong "bf16" checkpoint."""
    from safetensors.torch import load_file

    int4 = tmp_path / "int4"
    convert_to_int(small_ckpt, int4, RTN, progress=False)
    tensors = load_file(int4 / "model.safetensors")
    packed = next(n for n in tensors if n.endswith(".weight_packed"))
    module = packed.removesuffix(".weight_packed")
    save_file({**tensors, f"{module}.input_scale": torch.ones(1)}, int4 / "model.safetensors")
    convert_to_bf16(int4, tmp_path / "bf16", progress=False)
    assert not any(n.endswith("input_scale") for n in load_file(tmp_path / "bf16" / "model.safetensors"))
    save_file({**tensors, f"{module}.weight_g_idx": torch.zeros(8, dtype=torch.int32)}, int4 / "model.safetensors")
    assert_raises_naming(lambda: convert_to_bf16(int4, tmp_path / "bf16-2", progress=False), "weight_g_idx")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("convert", ["fp8", "int4"])
def test_non_finite_weight_names_the_tensor(small_ckpt, tmp_path, gen, value, convert):
    tensors = small_tensors(gen)
    bad = "model.layers.0.mlp.up_proj.weight"
    tensors[bad][5, 7] = value
    write_ckpt(small_ckpt, tensors)
    fn = (
        (lambda: convert_to_fp8(small_ckpt, tmp_path / "out", progress=False))
        if convert == "fp8"
        else (lambda: convert_to_int(small_ckpt, tmp_path / "out", RTN, progress=False))
    )
    msg = assert_raises_naming(fn, "model.safetensors", repr(bad), "non-finite")
    assert ("1 NaN" if math.isnan(value) else "1 Inf") in msg
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_group_size_must_divide_k(qwen3_ckpt, tmp_path):
    """qwen3's down_proj has K = 320: not a multiple of 128."""
    opts = IntConvertOptions(method="rtn", group_size=128)
    assert_raises_naming(
        lambda: convert_to_int(qwen3_ckpt.path, tmp_path / "out", opts, progress=False),
        qwen3_ckpt.path,
        "model.layers.0.mlp.down_proj.weight [256, 320]",
        "--group-size 128",
    )
    assert not (tmp_path / "out").exists()


def test_bad_options(small_ckpt, tmp_path):
    with pytest.raises(ValueError, match="ue8m0"):
        convert_to_fp8(
            small_ckpt,
            tmp_path / "out",
            Fp8ConvertOptions(strategy="block", fmt="compressed-tensors", scale_fmt="ue8m0"),
        )
    with pytest.raises(ValueError, match="compressed-tensors for channel"):
        convert_to_fp8(small_ckpt, tmp_path / "out", Fp8ConvertOptions(strategy="channel", fmt="fp8"))
    with pytest.raises(ValueError, match="--quant-type"):
        convert_to_int(small_ckpt, tmp_path / "out", IntConvertOptions(method="rtn", quant_type="W3A16"))
    with pytest.raises(ValueError, match="--method"):
        convert_to_int(small_ckpt, tmp_path / "out", IntConvertOptions(method="awq"))
    assert not (tmp_path / "out").exists()


def test_gptq_needs_data_dir(qwen3_ckpt, tmp_path):
    opts = IntConvertOptions(method="gptq", group_size=64)
    assert_raises_naming(
        lambda: convert_to_int(qwen3_ckpt.path, tmp_path / "out", opts, progress=False), "--data-dir", "--method rtn"
    )
    assert not (tmp_path / "out").exists()


def test_gptq_calibration_data_too_short(qwen3_ckpt, tmp_path):
    data = tmp_path / "calib.txt"
    data.write_text("The sum of 2 and 3 is 5.\n\nTwice 4 is 8.\n")
    opts = IntConvertOptions(
        method="gptq", group_size=64, data_dir=str(data), max_sequence_length=512, num_calibration_samples=4
    )
    assert_raises_naming(
        lambda: convert_to_int(qwen3_ckpt.path, tmp_path / "out", opts, progress=False), data, "too short", "512"
    )
    missing = IntConvertOptions(method="gptq", group_size=64, data_dir=str(tmp_path / "nope.txt"))
    assert_raises_naming(
        lambda: convert_to_int(qwen3_ckpt.path, tmp_path / "out", missing, progress=False),
        tmp_path / "nope.txt",
        exc=FileNotFoundError,
    )
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_gptq_without_tokenizer(qwen3_ckpt, tmp_path):
    d = tmp_path / "in"
    shutil.copytree(qwen3_ckpt.path, d)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (d / f).unlink()
    opts = IntConvertOptions(method="gptq", group_size=64, data_dir="synthetic")
    assert_raises_naming(lambda: convert_to_int(d, tmp_path / "out", opts, progress=False), d, "tokenizer")
    assert not (tmp_path / "out").exists()


# ---- the output directory --------------------------------------------------------------------------------


def test_output_dir_is_input_dir(small_ckpt):
    before = sorted(p.name for p in small_ckpt.iterdir())
    assert_raises_naming(
        lambda: convert_to_fp8(small_ckpt, small_ckpt, progress=False), small_ckpt, "is the input directory"
    )
    same = small_ckpt / ".." / small_ckpt.name  # another spelling of the same directory
    assert_raises_naming(
        lambda: convert_to_fp8(small_ckpt, same, Fp8ConvertOptions(overwrite=True), progress=False), "input directory"
    )
    assert sorted(p.name for p in small_ckpt.iterdir()) == before


def test_output_dir_containing_input_dir(small_ckpt):
    """--overwrite of a directory holding the input would delete the input: refused."""
    parent = small_ckpt.parent
    assert_raises_naming(
        lambda: convert_to_fp8(small_ckpt, parent, Fp8ConvertOptions(overwrite=True), progress=False),
        small_ckpt,
        "inside",
    )
    assert (small_ckpt / "model.safetensors").exists()


def test_existing_output_dir(small_ckpt, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    convert_to_fp8(small_ckpt, out, progress=False)  # an existing *empty* directory is fine
    assert (out / "model.safetensors").exists()
    (out / "marker.txt").write_text("old")
    assert_raises_naming(lambda: convert_to_fp8(small_ckpt, out, progress=False), out, "not empty", "--overwrite")
    assert (out / "marker.txt").exists()
    report = convert_to_int(
        small_ckpt, out, IntConvertOptions(method="rtn", group_size=32, overwrite=True), progress=False
    )
    assert report.output_dir == out.resolve()
    assert not (out / "marker.txt").exists()  # replaced, not merged
    assert json.loads((out / "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"
    assert not leftovers(tmp_path)
    f = tmp_path / "a-file"
    f.write_text("x")
    assert_raises_naming(lambda: convert_to_fp8(small_ckpt, f, progress=False), f, "exists")
    convert_to_fp8(small_ckpt, f, Fp8ConvertOptions(overwrite=True), progress=False)  # --overwrite replaces a file too
    assert (f / "model.safetensors").exists() and not leftovers(tmp_path)


@pytest.mark.parametrize("workers", [1, 2])
def test_failure_midway_leaves_nothing(small_ckpt, tmp_path, gen, monkeypatch, workers):
    """NaN in the last tensor converted: earlier tensors were already written, yet no output appears, the temp
    dir is removed, and an existing output (with --overwrite) is left exactly as it was."""
    tensors = small_tensors(gen)
    names = SafetensorsDir(small_ckpt).names()  # job order
    last = [n for n in names if n.endswith("_proj.weight")][-1]
    assert names.index(last) > 2
    tensors[last][0, 0] = float("nan")
    write_ckpt(small_ckpt, tensors)

    written = []
    real_write = ShardedWriter.write

    def spy(self, name, tensor):
        written.append(name)
        return real_write(self, name, tensor)

    monkeypatch.setattr(ShardedWriter, "write", spy)
    out = tmp_path / "out"
    opts = Fp8ConvertOptions(max_workers=workers)
    assert_raises_naming(lambda: convert_to_fp8(small_ckpt, out, opts, progress=False), repr(last), "NaN")
    assert len(written) >= 2  # it really failed midway
    assert not out.exists() and not leftovers(tmp_path)

    out.mkdir()
    (out / "marker.txt").write_text("previous version")
    from dataclasses import replace

    assert_raises_naming(
        lambda: convert_to_fp8(small_ckpt, out, replace(opts, overwrite=True), progress=False), repr(last)
    )
    assert [p.name for p in out.iterdir()] == ["marker.txt"] and (out / "marker.txt").read_text() == "previous version"
    assert not leftovers(tmp_path)


def test_interrupt_midway_leaves_nothing(small_ckpt, tmp_path, monkeypatch):
    """A KeyboardInterrupt (not an Exception) inside a transform still removes the temp dir."""
    import quantrl.checkpoint.convert_fp8 as convert_fp8_module

    calls = []
    real = convert_fp8_module.quantize_fp8

    def interrupted(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(convert_fp8_module, "quantize_fp8", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert_to_fp8(small_ckpt, tmp_path / "out", progress=False)
    assert len(calls) == 3
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_a_killed_conversions_leftovers_are_reported(small_ckpt, tmp_path):
    (tmp_path / ".out.tmp-deadbeef").mkdir()  # what a SIGKILL mid-conversion leaves
    with pytest.warns(UserWarning, match=r"killed conversion.*\.out\.tmp-deadbeef"):
        convert_to_fp8(small_ckpt, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "config.json").exists()


def test_ctrl_c_with_workers_stops_the_queued_jobs(small_ckpt, tmp_path, monkeypatch):
    """Ctrl-C while two workers convert: the jobs not yet started never start (not the whole model first)."""
    import time

    import quantrl.checkpoint.convert_fp8 as convert_fp8_module
    import quantrl.checkpoint.stream as stream

    calls = []
    real_quantize = convert_fp8_module.quantize_fp8

    def slow(*a, **kw):
        calls.append(1)
        time.sleep(0.2)
        return real_quantize(*a, **kw)

    def ctrl_c(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_fp8_module, "quantize_fp8", slow)
    monkeypatch.setattr(stream, "wait", ctrl_c)
    total = sum(n.endswith("_proj.weight") for n in SafetensorsDir(small_ckpt).names())
    with pytest.raises(KeyboardInterrupt):
        convert_to_fp8(small_ckpt, tmp_path / "out", Fp8ConvertOptions(max_workers=2), progress=False)
    assert len(calls) < total, (len(calls), total)  # without the cancel: every job, Ctrl-C or not
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


# ---- CLI -------------------------------------------------------------------------------------------------


def test_cli_success_and_errors(small_ckpt, tmp_path, capsys):
    out = tmp_path / "fp8"
    assert cli.main(["convert", "fp8", "--model-dir", str(small_ckpt), "--save-dir", str(out), "--no-progress"]) == 0
    stdout = capsys.readouterr().out
    assert "wrote" in stdout and str(out) in stdout
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "fp8"

    # flags reach the options: channel strategy, two workers -> compressed-tensors
    out2 = tmp_path / "fp8-channel"
    argv = [
        "convert",
        "fp8",
        "--model-dir",
        str(small_ckpt),
        "--save-dir",
        str(out2),
        "--strategy",
        "channel",
        "--max-workers",
        "2",
        "--no-progress",
    ]
    assert cli.main(argv) == 0
    qc = json.loads((out2 / "config.json").read_text())["quantization_config"]
    assert (
        qc["quant_method"] == "compressed-tensors"
        and qc["config_groups"]["group_0"]["weights"]["strategy"] == "channel"
    )
    capsys.readouterr()

    # the same output dir again: error, exit 2, one `error:` line naming the directory
    assert cli.main(["convert", "fp8", "--model-dir", str(small_ckpt), "--save-dir", str(out), "--no-progress"]) == 2
    captured = capsys.readouterr()
    (line,) = [ln for ln in captured.err.splitlines() if ln.startswith("error:")]
    assert str(out) in line and "--overwrite" in line
    assert "wrote" not in captured.out

    missing = tmp_path / "no-such-model"
    assert (
        cli.main(["convert", "fp8", "--model-dir", str(missing), "--save-dir", str(tmp_path / "x"), "--no-progress"])
        == 2
    )
    assert re.search(rf"^error: .*{re.escape(str(missing))}.*config\.json", capsys.readouterr().err, re.MULTILINE)

    argv = [
        "convert",
        "int4",
        "--input-dir",
        str(small_ckpt),
        "--output-dir",
        str(tmp_path / "y"),
        "--group-size",
        "32",
        "--no-progress",
    ]
    assert cli.main(argv) == 2  # GPTQ is the default method and needs --data-dir
    assert re.search(r"^error: .*--data-dir", capsys.readouterr().err, re.MULTILINE)

    argv = [
        "convert",
        "int4",
        "--input-dir",
        str(small_ckpt),
        "--output-dir",
        str(tmp_path / "y"),
        "--method",
        "rtn",
        "--group-size",
        "32",
        "--no-progress",
    ]
    assert cli.main(argv) == 0
    argv = ["convert", "bf16", "--input-dir", str(tmp_path / "y"), "--output-dir", str(tmp_path / "z"), "--no-progress"]
    assert cli.main(argv) == 0
    assert "quantization_config" not in json.loads((tmp_path / "z" / "config.json").read_text())
    assert not (tmp_path / "x").exists() and not leftovers(tmp_path)
