"""``quantrl demo``: the whole offline path on a model small enough for a laptop CPU.

1. builds a byte-level BPE tokenizer and a small Qwen3-shaped model, trained for a minute on built-in
   arithmetic prose (no downloads), and saves it as a BF16 HF checkpoint;
2. converts it with ``quantrl convert``: FP8 128×128 blocks, FP8 per channel, INT4 g128 RTN, INT4 g128
   GPTQ (calibrated on the same kind of text);
3. loads every checkpoint with *transformers* (the consumer users already have) and compares, on held-out
   text, perplexity, KL(bf16 ‖ quantized), top-1 agreement and size on disk.
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
    arch: str = "qwen3"
    "qwen3 or llama"
    hidden: int = 256
    "model width"
    layers: int = 4
    "decoder layers"
    train_steps: int = 150
    "warm-up training steps on the built-in text"
    seed: int = 0
    "seed for data, init and training"
    overwrite: bool = True
    "replace earlier demo checkpoints"


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def _evaluate(model_dir: Path, quantized: bool, tokens: torch.Tensor, ref_logp: torch.Tensor | None):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    cfg = json.loads((model_dir / "config.json").read_text()).get("quantization_config", {})
    kwargs = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if cfg.get("quant_method") == "compressed-tensors" else {}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, **kwargs).eval()
    with torch.no_grad():
        logp = model(tokens).logits.float().log_softmax(-1)  # [B, L, V]
    nll = -logp[:, :-1].gather(-1, tokens[:, 1:, None]).mean()
    row = {"ppl": math.exp(float(nll))}
    if ref_logp is not None:
        row["kl"] = float((ref_logp.exp() * (ref_logp - logp)).sum(-1).mean())
        row["top1"] = float((logp.argmax(-1) == ref_logp.argmax(-1)).float().mean())
    return row, logp


def run_demo(cfg: DemoConfig, progress: bool = True) -> list[dict]:
    import warnings

    from transformers import logging as hf_logging

    from quantrl.checkpoint.calibration import default_calibration_texts
    from quantrl.checkpoint.convert_fp8 import Fp8ConvertOptions, convert_to_fp8
    from quantrl.checkpoint.convert_int import IntConvertOptions, convert_to_int
    from quantrl.tiny import build_tokenizer, save_model, tiny_config, train_tiny_lm

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*loading attributes.*")
    out = Path(cfg.out_dir)
    texts = default_calibration_texts(1024, seed=cfg.seed)
    held_out = default_calibration_texts(16, seed=cfg.seed + 1)
    tok = build_tokenizer(texts)
    stream = torch.tensor(tok("\n\n".join(texts), add_special_tokens=False)["input_ids"])
    model = train_tiny_lm(tiny_config(cfg.arch, len(tok), cfg.hidden, cfg.layers, cfg.hidden * 3), stream,
                          steps=cfg.train_steps, seed=cfg.seed, progress=progress)
    bf16_dir = out / "bf16"
    if bf16_dir.exists() and cfg.overwrite:
        import shutil

        shutil.rmtree(bf16_dir)
    save_model(model, tok, bf16_dir)

    variants = {
        "fp8 block128": lambda d: convert_to_fp8(bf16_dir, d, Fp8ConvertOptions(overwrite=cfg.overwrite), progress=progress),
        "fp8 channel": lambda d: convert_to_fp8(bf16_dir, d, Fp8ConvertOptions(strategy="channel", overwrite=cfg.overwrite), progress=progress),
        "int4 g128 rtn": lambda d: convert_to_int(bf16_dir, d, IntConvertOptions(method="rtn", overwrite=cfg.overwrite), progress=progress),
        "int4 g128 gptq": lambda d: convert_to_int(
            bf16_dir, d, IntConvertOptions(method="gptq", data_dir="synthetic", num_calibration_samples=64,
                                           max_sequence_length=256, overwrite=cfg.overwrite), progress=progress),
    }
    eval_tokens = torch.tensor(tok("\n\n".join(held_out), add_special_tokens=False)["input_ids"])
    eval_tokens = eval_tokens[: (eval_tokens.numel() // 256) * 256].view(-1, 256)[:8]  # [B, 256]
    base, ref_logp = _evaluate(bf16_dir, False, eval_tokens, None)
    rows = [{"format": "bf16", **base, "kl": 0.0, "top1": 1.0, "MB": _dir_bytes(bf16_dir) / 1e6, "convert_s": 0.0}]
    for name, convert in variants.items():
        d = out / name.replace(" ", "-")
        t0 = time.perf_counter()
        convert(d)
        secs = time.perf_counter() - t0
        row, _ = _evaluate(d, True, eval_tokens, ref_logp)
        rows.append({"format": name, **row, "MB": _dir_bytes(d) / 1e6, "convert_s": secs})
    (out / "summary.json").write_text(json.dumps({"config": asdict(cfg), "results": rows}, indent=2) + "\n")
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'format':<16}{'held-out ppl':>13}{'KL(bf16||q)':>13}{'top-1 agree':>13}{'MB on disk':>12}{'convert s':>11}")
    for r in rows:
        print(f"{r['format']:<16}{r['ppl']:>13.3f}{r['kl']:>13.2e}{r['top1']:>13.1%}{r['MB']:>12.2f}{r['convert_s']:>11.2f}")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train a tiny model, convert it to FP8/INT4, compare in transformers (CPU, ~1 min)")
    d = DemoConfig()
    p.add_argument("--out-dir", default=d.out_dir)
    p.add_argument("--arch", choices=["qwen3", "llama"], default=d.arch)
    p.add_argument("--hidden", type=int, default=d.hidden)
    p.add_argument("--layers", type=int, default=d.layers)
    p.add_argument("--train-steps", type=int, default=d.train_steps)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    cfg = DemoConfig(out_dir=args.out_dir, arch=args.arch, hidden=args.hidden, layers=args.layers,
                     train_steps=args.train_steps, seed=args.seed)
    rows = run_demo(cfg, progress=not args.no_progress)
    print(f"\n{cfg.arch} model (hidden {cfg.hidden}, {cfg.layers} layers), checkpoints in {cfg.out_dir}:")
    print_table(rows)
    return 0
