"""``quantrl demo``: the offline path on the embedded model, on a laptop CPU in about a minute.

1. takes the embedded BF16 model (or ``--model DIR``);
2. converts it with ``quantrl convert``: FP8 128×128 blocks, FP8 per channel, MXFP8, INT4 g128 RTN, INT4
   g128 GPTQ (calibrated on task text written to a ``.txt`` file), NVFP4 (RTN);
3. loads every checkpoint with *transformers* (the consumer users already have) and compares, on held-out
   task text, perplexity, KL(bf16 ‖ quantized), top-1 agreement and size on disk.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class DemoConfig:
    out_dir: str = "runs/demo"
    "where checkpoints and the summary JSON go"
    model: str = ""
    "BF16 HF model directory (default: the embedded model)"
    seed: int = 0
    "seed of the calibration and held-out problems"


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def _evaluate(model_dir: Path, tokens: torch.Tensor, mask: torch.Tensor, ref_logp: torch.Tensor | None):
    """Solution-token perplexity, KL(bf16 || model) and top-1 agreement (``mask`` [B, L]: solution tokens)."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    cfg = json.loads((model_dir / "config.json").read_text()).get("quantization_config", {})
    kwargs = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if cfg.get("quant_method") == "compressed-tensors" else {}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, **kwargs).eval()
    with torch.no_grad():
        logp = model(tokens).logits.float().log_softmax(-1)[:, :-1]  # [B, L-1, V]: predicts tokens[:, 1:]
    m = mask[:, 1:].bool()
    nll = -logp.gather(-1, tokens[:, 1:, None])[..., 0][m].mean()
    row = {"ppl": math.exp(float(nll))}
    if ref_logp is not None:
        row["kl"] = float((ref_logp.exp() * (ref_logp - logp)).sum(-1)[m].mean())
        row["top1"] = float((logp.argmax(-1) == ref_logp.argmax(-1))[m].float().mean())
    return row, logp


def run_demo(cfg: DemoConfig, progress: bool = True) -> list[dict]:
    import warnings

    from transformers import AutoTokenizer
    from transformers import logging as hf_logging

    from quantrl.checkpoint.convert_fp8 import Fp8ConvertOptions, convert_to_fp8
    from quantrl.checkpoint.convert_int import IntConvertOptions, convert_to_int
    from quantrl.checkpoint.convert_nvfp4 import Nvfp4ConvertOptions, convert_to_nvfp4
    from quantrl.rl.loop import default_model_dir
    from quantrl.tasks.arithmetic import make_split

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*loading attributes.*")
    bf16_dir = Path(cfg.model or default_model_dir())
    if not (bf16_dir / "config.json").is_file():
        raise FileNotFoundError(f"demo: {bf16_dir} is not a Hugging Face model directory (no config.json)")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(str(bf16_dir))
    calib, held = make_split(2000, 64, cfg.seed + 7, "medium")
    calib_file = out / "calibration.txt"
    calib_file.write_text("\n\n".join(p.prompt + p.solution for p in calib) + "\n")

    def ids(problems) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ``<bos> prompt solution <eos>`` [B, T] and the solution-token mask [B, T]."""
        rows = [(tok(p.prompt)["input_ids"], tok(p.solution, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
                for p in problems]  # fmt: skip
        t = max(len(a) + len(b) for a, b in rows)
        x = torch.full((len(rows), t), tok.pad_token_id, dtype=torch.long)
        m = torch.zeros_like(x)
        for i, (a, b) in enumerate(rows):
            x[i, : len(a) + len(b)] = torch.tensor(a + b)
            m[i, len(a) : len(a) + len(b)] = 1
        return x, m

    variants = {
        "fp8 block128": lambda d: convert_to_fp8(bf16_dir, d, Fp8ConvertOptions(overwrite=True), progress=progress),
        "fp8 channel": lambda d: convert_to_fp8(bf16_dir, d, Fp8ConvertOptions(strategy="channel", overwrite=True), progress=progress),
        "mxfp8": lambda d: convert_to_fp8(bf16_dir, d, Fp8ConvertOptions(fmt="mxfp8", overwrite=True), progress=progress),
        "int4 g128 rtn": lambda d: convert_to_int(bf16_dir, d, IntConvertOptions(method="rtn", overwrite=True), progress=progress),
        "int4 g128 gptq": lambda d: convert_to_int(
            bf16_dir, d, IntConvertOptions(method="gptq", data_dir=str(calib_file), num_calibration_samples=64,
                                           max_sequence_length=256, overwrite=True), progress=progress),
        "nvfp4 rtn": lambda d: convert_to_nvfp4(bf16_dir, d, Nvfp4ConvertOptions(overwrite=True), progress=progress),
        "nvfp4 gptq": lambda d: convert_to_nvfp4(
            bf16_dir, d, Nvfp4ConvertOptions(method="gptq", data_dir=str(calib_file), num_calibration_samples=64,
                                             max_sequence_length=256, overwrite=True), progress=progress),
    }
    eval_tokens, eval_mask = ids(held)
    base, ref_logp = _evaluate(bf16_dir, eval_tokens, eval_mask, None)
    rows = [{"format": "bf16", **base, "kl": 0.0, "top1": 1.0, "MB": _dir_bytes(bf16_dir) / 1e6, "convert_s": 0.0}]
    for name, convert in variants.items():
        d = out / name.replace(" ", "-")
        t0 = time.perf_counter()
        convert(d)
        secs = time.perf_counter() - t0
        row, _ = _evaluate(d, eval_tokens, eval_mask, ref_logp)
        rows.append({"format": name, **row, "MB": _dir_bytes(d) / 1e6, "convert_s": secs})
    (out / "summary.json").write_text(json.dumps({"config": asdict(cfg), "results": rows}, indent=2) + "\n")
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'format':<16}{'solution ppl':>13}{'KL(bf16||q)':>13}{'top-1 agree':>13}{'MB on disk':>12}{'convert s':>11}")
    for r in rows:
        print(f"{r['format']:<16}{r['ppl']:>13.3f}{r['kl']:>13.2e}{r['top1']:>13.1%}{r['MB']:>12.2f}{r['convert_s']:>11.2f}")


def register(sub: argparse._SubParsersAction) -> None:
    from quantrl.config_cli import add_dataclass_args

    p = sub.add_parser("demo", help="convert the embedded model to FP8/MXFP8/INT4 / NVFP4 (RTN, GPTQ) and compare in transformers (CPU)")
    add_dataclass_args(p, DemoConfig)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    from quantrl.config_cli import from_args

    cfg = from_args(DemoConfig, args)
    rows = run_demo(cfg, progress=not args.no_progress)
    print(f"\nheld-out problems (solution tokens), checkpoints in {cfg.out_dir}:")
    print_table(rows)
    return 0
