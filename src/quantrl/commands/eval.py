"""``quantrl eval``: a checkpoint's held-out accuracy (avg@k, pass@k) with the rollout engine; ``--compare``
scores several (a BF16 checkpoint and its conversions, say) under the same prompts and seeds."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    from quantrl.config_cli import add_dataclass_args
    from quantrl.rl.evaluate import EvalConfig

    p = sub.add_parser("eval", help="score a checkpoint (any format) on a prompt set: accuracy avg@k and pass@k")
    add_dataclass_args(p, EvalConfig)
    p.add_argument("--compare", nargs="+", metavar="DIR", default=None,
                   help="score each of these model directories instead of --model, one table (--out: a JSON list)")
    p.set_defaults(func=_eval)


def _line(out: dict) -> str:
    k = out["config"]["n_samples_per_eval_prompt"]
    extra = f", pass@{k} {out[f'eval_pass_at_{k}']:.3f}" if k > 1 else ""
    return (f"{out['model']}: accuracy {out['eval_accuracy']:.3f} (avg@{k} over {out['prompts']} prompts){extra}; "
            f"{out['response_len']:.1f} tokens a response, {out['truncated_frac']:.1%} cut at --max-new-tokens, "
            f"{out['tokens_per_s']:.0f} tokens/s")  # fmt: skip


def _eval(args: argparse.Namespace) -> int:
    from quantrl.checkpoint.safetensors_io import CheckpointError
    from quantrl.config_cli import from_args
    from quantrl.rl.evaluate import EvalConfig, evaluate

    try:
        cfg = from_args(EvalConfig, args)
        if not args.compare:
            print(_line(evaluate(cfg)))
            return 0
        if cfg.save_samples:
            raise ValueError("--save-samples names one file: score the models one at a time to keep their samples")
        outs = []
        for model in args.compare:
            outs.append(evaluate(dataclasses.replace(cfg, model=model, out="")))
            print(_line(outs[-1]))
    except (CheckpointError, OSError, ValueError) as e:  # DataError is a ValueError
        print(f"error: {e}")
        return 2
    if cfg.out:
        Path(cfg.out).write_text(json.dumps(outs, indent=2) + "\n")
    return 0
