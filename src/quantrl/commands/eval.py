"""``quantrl eval``: a checkpoint's held-out accuracy (avg@k, pass@k) with the rollout engine."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from quantrl.config_cli import add_dataclass_args
    from quantrl.rl.evaluate import EvalConfig

    p = sub.add_parser("eval", help="score a checkpoint (any format) on a prompt set: accuracy avg@k and pass@k")
    add_dataclass_args(p, EvalConfig)
    p.set_defaults(func=_eval)


def _eval(args: argparse.Namespace) -> int:
    from quantrl.checkpoint.safetensors_io import CheckpointError
    from quantrl.config_cli import from_args
    from quantrl.rl.evaluate import EvalConfig, evaluate

    try:
        out = evaluate(from_args(EvalConfig, args))
    except (CheckpointError, OSError, ValueError) as e:  # DataError is a ValueError
        print(f"error: {e}")
        return 2
    k = out["config"]["n_samples_per_eval_prompt"]
    extra = f", pass@{k} {out[f'eval_pass_at_{k}']:.3f}" if k > 1 else ""
    print(f"{out['model']}: accuracy {out['eval_accuracy']:.3f} (avg@{k} over {out['prompts']} prompts){extra}; "
          f"{out['response_len']:.1f} tokens a response, {out['truncated_frac']:.1%} cut at --max-new-tokens, "
          f"{out['tokens_per_s']:.0f} tokens/s")  # fmt: skip
    return 0
