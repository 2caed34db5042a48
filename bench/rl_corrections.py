"""Train-rollout correction, GSPO and the FP8 KV cache on the embedded default: reward, mismatch, and how
much each correction touched. Same model, seeds and data for every run of a suite.

Suites (each run is ``quantrl train`` with the flags shown in RUNS):
    floor  INT4 PTQ rollout (mismatch ~1.6e-3): corrections at the numeric mismatch floor; GSPO vs GRPO
    lag    BF16, lr 5e-4, engines synced every 5th step: a sampler up to 4 updates behind the trainer
    kv     the FP8 KV cache next to BF16 and INT4-QAT trainers, with and without --kv-fake-quant

    python bench/rl_corrections.py --device cpu            # all suites, 40 steps: ~15 runs of ~80 s here
    python bench/rl_corrections.py --suites lag --no-write # a trial
Writes ``bench/results/rl_corrections_<device>.json`` and, per suite, the ``quantrl plot`` figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import statistics
from pathlib import Path

import torch
from _common import RESULTS, write_results

from quantrl.rl.loop import RLConfig, train
from quantrl.rl.plot import plot_runs

LAG = {"recipe": "bf16", "lr": 5e-4, "update_weights_interval": 5}
RUNS: dict[str, dict[str, dict]] = {
    "floor": {
        "int4-ptq": {"recipe": "int4-ptq"},
        "int4-ptq-tis": {"recipe": "int4-ptq", "is_mode": "tis"},
        "int4-ptq-tis-rs-veto-norm": {"recipe": "int4-ptq", "is_mode": "tis", "rs_level": "token",
                                      "rs_veto_threshold": 1e-4, "is_batch_normalize": True},
        "int4-ptq-geo-mis": {"recipe": "int4-ptq", "is_mode": "mis", "is_level": "geometric", "is_cap": 1.05},
        "int4-qat-grpo-4steps": {"recipe": "int4-qat", "num_steps_per_rollout": 4},
        "int4-qat-gspo-4steps": {"recipe": "int4-qat", "num_steps_per_rollout": 4, "advantage_estimator": "gspo",
                                 "clip_eps": 3e-4, "clip_eps_high": 4e-4},
    },
    "lag": {
        "synced": {"recipe": "bf16", "lr": 5e-4},
        "lag5": LAG,
        "lag5-tis": {**LAG, "is_mode": "tis"},
        "lag5-geo-mis-veto": {**LAG, "is_mode": "mis", "is_level": "geometric", "is_cap": 1.05,
                              "rs_veto_threshold": 1e-4},
    },
    "kv": {
        "bf16": {"recipe": "bf16"},
        "bf16-kv8": {"recipe": "bf16", "kv_cache_dtype": "fp8_e4m3"},
        "bf16-kv8-fq": {"recipe": "bf16", "kv_cache_dtype": "fp8_e4m3", "kv_fake_quant": True},
        "int4-qat": {"recipe": "int4-qat"},
        "int4-qat-kv8": {"recipe": "int4-qat", "kv_cache_dtype": "fp8_e4m3"},
        "int4-qat-kv8-fq": {"recipe": "int4-qat", "kv_cache_dtype": "fp8_e4m3", "kv_fake_quant": True},
    },
}  # fmt: skip


def _mean(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if key in r]
    return statistics.mean(vals) if vals else None


def summarize(rows: list[dict]) -> dict:
    steps = [r for r in rows if "reward" in r]
    k = max(1, len(steps) // 5)
    evals = [r["eval_accuracy"] for r in rows if "eval_accuracy" in r]
    blocks = [steps[i : i + k] for i in range(0, len(steps), k)]
    return {
        "reward_first": statistics.mean(r["reward"] for r in steps[:k]),
        "reward_last": statistics.mean(r["reward"] for r in steps[-k:]),
        "reward_per_block": [statistics.mean(r["reward"] for r in b) for b in blocks],
        "block_steps": k,
        "eval_accuracy": evals,
        "mismatch_mean": _mean(steps, "mismatch_abs_mean"),
        "mismatch_per_block": [_mean(b, "mismatch_abs_mean") for b in blocks],
        "mismatch_seq_mean": _mean(steps, "mismatch_seq_abs_mean"),
        "is_clipped_frac_mean": _mean(steps, "is_clipped_frac"),
        "rs_rejected_frac_mean": _mean(steps, "rs_rejected_frac"),
        "pg_clipfrac_mean": _mean(steps, "pg_clipfrac"),
        "truncated_frac_last": statistics.mean(r["truncated_frac"] for r in steps[-k:]),
        "response_len_mean": _mean(steps, "response_len"),
    }


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--num-steps", type=int, default=40)
    ap.add_argument("--suites", nargs="+", choices=list(RUNS), default=list(RUNS))
    ap.add_argument("--out", default="runs/rl_corrections")
    ap.add_argument("--no-write", action="store_true", help="keep bench/results/ untouched (trial runs)")
    return ap


def main() -> None:
    args = build_parser().parse_args()
    out, name = Path(args.out), f"rl_corrections_{args.device}"
    results: dict[str, dict] = {}
    for suite in args.suites:
        results[suite] = {}
        for run_name, flags in RUNS[suite].items():
            run = out / suite / run_name
            shutil.rmtree(run, ignore_errors=True)
            # evaluations every 10 steps fall on synced steps of the lag runs (synced every 5th)
            cfg = dataclasses.replace(RLConfig(), run_dir=str(run), num_steps=args.num_steps, device=args.device,
                                      eval_interval=10, save_interval=0, **flags)  # fmt: skip
            results[suite][run_name] = {"flags": flags, **summarize(train(cfg, progress=True))}
        print(f"\n{suite}: {'run':<28}{'reward first->last':>20}{'|dlogp|':>10}{'changed':>9}{'rejected':>9}"
              f"{'eval last':>10}")  # fmt: skip
        for run_name, s in results[suite].items():
            changed, rejected = (("-" if f is None else f"{f:.2%}") for f in (s["is_clipped_frac_mean"],
                                                                             s["rs_rejected_frac_mean"]))  # fmt: skip
            last_eval = s["eval_accuracy"][-1] if s["eval_accuracy"] else float("nan")
            print(f"{'':<7}{run_name:<28}{s['reward_first']:>10.3f}->{s['reward_last']:<8.3f}"
                  f"{s['mismatch_mean']:>10.2e}{changed:>9}{rejected:>9}{last_eval:>10.3f}")  # fmt: skip
        fig_dir = (out / "plots" / suite) if args.no_write else RESULTS / name / suite
        plot_runs([out / suite / r for r in RUNS[suite]], fig_dir)
    if args.no_write:
        print(f"--no-write: plots under {out / 'plots'}, nothing under bench/results/")
        return
    print(f"wrote {write_results(name, {'config': vars(args), 'results': results})}")


if __name__ == "__main__":
    main()
