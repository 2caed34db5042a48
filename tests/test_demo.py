"""``quantrl demo`` end to end on the embedded model (~30 s on 2 CPU cores): every format converts, loads in
transformers and lands where the formats put it: 8-bit near BF16, 4-bit further off, GPTQ closer than RTN,
half / about a quarter of the bytes."""

import json

import pytest

from quantrl.cli import main
from quantrl.commands.demo import DemoConfig, print_table, run_demo

FORMATS = ["bf16", "fp8 block128", "fp8 channel", "mxfp8", "int4 g128 rtn", "int4 g128 gptq", "nvfp4 rtn",
           "nvfp4 gptq"]  # fmt: skip


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, run_demo(DemoConfig(out_dir=str(out)), progress=False)


@pytest.mark.slow
def test_demo_compares_every_format(demo, capsys):
    out, rows = demo
    by = {r["format"]: r for r in rows}
    assert [r["format"] for r in rows] == FORMATS
    assert json.loads((out / "summary.json").read_text())["results"] == rows
    assert by["bf16"]["kl"] == 0.0 and by["bf16"]["top1"] == 1.0
    for name in FORMATS[1:]:
        r = by[name]
        assert (out / name.replace(" ", "-") / "config.json").exists()
        assert 0.0 < r["kl"] < 1e-2 and r["top1"] >= 0.98, r
        assert abs(r["ppl"] - by["bf16"]["ppl"]) < 0.05 * by["bf16"]["ppl"], r
    bf16_mb = by["bf16"]["MB"]
    for name in ("fp8 block128", "fp8 channel", "mxfp8"):
        assert 0.45 < by[name]["MB"] / bf16_mb < 0.6
        assert by[name]["kl"] < by["int4 g128 rtn"]["kl"] and by[name]["kl"] < by["nvfp4 rtn"]["kl"]
    for name in ("int4 g128 rtn", "int4 g128 gptq", "nvfp4 rtn", "nvfp4 gptq"):
        assert 0.2 < by[name]["MB"] / bf16_mb < 0.35
    for fmt in ("int4 g128", "nvfp4"):  # GPTQ on the task's own text beats round-to-nearest
        assert by[f"{fmt} gptq"]["kl"] < by[f"{fmt} rtn"]["kl"]
    print_table(rows)
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 1 + len(FORMATS) and all(t.startswith(f) for t, f in zip(table[1:], FORMATS, strict=True))


def test_demo_cli_rejects_a_missing_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a Hugging Face model directory"):
        main(["demo", "--out-dir", str(tmp_path / "d"), "--model", str(tmp_path / "nope"), "--no-progress"])
    assert not (tmp_path / "d").exists()  # nothing written before the check
