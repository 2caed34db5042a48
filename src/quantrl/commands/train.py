"""``quantrl train`` (the RL loop) and ``quantrl pretrain`` (the embedded model's warm start)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from quantrl.config_cli import add_dataclass_args
    from quantrl.rl.loop import RLConfig
    from quantrl.rl.pretrain import PretrainConfig

    p = sub.add_parser("train", help="RL post-training with low-precision rollout (default: embedded model + arithmetic, CPU)")
    add_dataclass_args(p, RLConfig)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_train)

    p = sub.add_parser("pretrain", help="supervised warm start of the embedded default model on the synthetic task")
    add_dataclass_args(p, PretrainConfig)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_pretrain)


def _train(args: argparse.Namespace) -> int:
    from quantrl.config_cli import flags_given, from_args
    from quantrl.rl.loop import RLConfig, train
    from quantrl.rl.recipes import apply_slime_env

    cfg = from_args(RLConfig, args)
    if cfg.resume:
        cfg = resumed_config(cfg, flags_given(args))
    else:  # a resumed run keeps the recipe and group size it started with
        cfg = apply_slime_env(cfg, flags_given(args))
    rows = train(cfg, progress=not args.no_progress)
    steps = [r for r in rows if "reward" in r]
    if steps:
        k = max(1, len(steps) // 5)
        first = sum(r["reward"] for r in steps[:k]) / k
        last = sum(r["reward"] for r in steps[-k:]) / k
        mm = sum(r["mismatch_abs_mean"] for r in steps) / len(steps)
        print(f"{cfg.recipe}: reward {first:.3f} (first {k} steps) -> {last:.3f} (last {k}); "
              f"mean |logp_train - logp_rollout| {mm:.5f}; metrics in {cfg.run_dir}/metrics.jsonl")
    evals = [r for r in rows if "eval_accuracy" in r]
    if evals:
        print("held-out accuracy: " + ", ".join(f"step {r['step']}: {r['eval_accuracy']:.3f}" for r in evals))
    return 0


def resumed_config(cfg, given: set[str]):
    """On --resume, the run's saved config, with only the flags given on this command line (``given``)
    changed, also to their default value (``--is-mode ''`` after a TIS run)."""
    import dataclasses
    import json
    from pathlib import Path

    from quantrl.rl.loop import RLConfig

    saved_path = Path(cfg.run_dir) / "config.json"
    if not saved_path.exists():
        return cfg
    saved = json.loads(saved_path.read_text())
    fields = {f.name for f in dataclasses.fields(RLConfig)}
    merged = {k: v for k, v in saved.items() if k in fields}
    merged.update({k: getattr(cfg, k) for k in given & fields})
    return RLConfig(**{**merged, "resume": True})


def _pretrain(args: argparse.Namespace) -> int:
    from quantrl.config_cli import from_args
    from quantrl.rl.pretrain import PretrainConfig, pretrain

    summary = pretrain(from_args(PretrainConfig, args), progress=not args.no_progress)
    print(f"wrote {summary['config']['out_dir']}: loss {summary['final_loss']:.4f}, "
          f"held-out greedy accuracy {summary['held_out_greedy_accuracy']:.3f}")
    return 0
