"""``quantrl plot RUN_DIR... [--out DIR]``: reward / accuracy, mismatch and throughput figures (PNG)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="PNG figures comparing runs: reward and accuracy, mismatch, rollout throughput")
    p.add_argument("run_dirs", nargs="+", help="run directories (each with metrics.jsonl)")
    p.add_argument("--out", default=None, help="output directory (default: FIRST_RUN/plots)")
    p.add_argument("--smooth", type=_positive, default=5, help="moving-average window for the reward curve (1: none)")
    p.set_defaults(func=_main)


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def _main(args: argparse.Namespace) -> int:
    from pathlib import Path

    from quantrl.rl.plot import plot_runs

    out = args.out or str(Path(args.run_dirs[0]) / "plots")
    for path in plot_runs(args.run_dirs, out, args.smooth):
        print(f"wrote {path}")
    return 0
