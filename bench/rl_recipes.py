"""Every precision recipe on the same model, seeds and data: reward, accuracy, mismatch, throughput.

Runs ``quantrl.rl.loop.train`` once per recipe (bf16, fp8-rollout, fp8, int4-qat, int4-ptq,
int4-qat-bf16-rollout, nvfp4-qat, nvfp4-ptq) into ``--out/RECIPE``, then writes a summary JSON (final reward and accuracy,
mean / late-training mismatch, each recipe's mismatch as a multiple of bf16's, median rollout tokens/s)
to ``bench/results/rl_recipes_<device>.json`` and the ``quantrl plot`` figures next to it.

Expected from the published runs: int4-qat mismatch <= 1.2x bf16; int4-ptq and int4-qat-bf16-rollout
>= 2x; final reward of int4-qat and fp8 within noise of bf16.
Run: on CPU with the embedded model, ``python bench/rl_recipes.py --device cpu --num-steps 40``; on a GPU with a
warm-started tens-of-millions-parameter model, ``bash bench/gpu_session_rl.sh`` (pretrain, then this).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
from pathlib import Path

import torch
from _common import RESULTS, write_results

from quantrl.rl.loop import RLConfig, train
from quantrl.rl.plot import plot_runs
from quantrl.rl.pretrain import DEFAULT_MODEL_DIR
from quantrl.rl.recipes import RECIPES


def summarize(rows: list[dict]) -> dict:
    steps = [r for r in rows if "reward" in r]
    k = max(1, len(steps) // 5)
    evals = [r for r in rows if "eval_accuracy" in r]
    mm = [r["mismatch_abs_mean"] for r in steps]
    return {
        "reward_first": statistics.mean(r["reward"] for r in steps[:k]),
        "reward_last": statistics.mean(r["reward"] for r in steps[-k:]),
        "eval_accuracy_first": evals[0]["eval_accuracy"] if evals else None,
        "eval_accuracy_last": evals[-1]["eval_accuracy"] if evals else None,
        "mismatch_mean": statistics.mean(mm),
        "mismatch_late": statistics.mean(mm[-k:]),
        "mismatch_k3_mean": statistics.mean(r["mismatch_k3"] for r in steps),
        "rollout_tokens_per_s_median": statistics.median(r["rollout_tokens_per_s"] for r in steps),
        "train_tokens_per_s_median": statistics.median(r["train_tokens_per_s"] for r in steps),
        "sync_s_median": statistics.median(r["sync_s"] for r in steps),
    }


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default="", help="HF model dir (default: the embedded model)")
    ap.add_argument("--num-steps", type=int, default=40)
    ap.add_argument("--prompts-per-step", type=int, default=16)
    ap.add_argument("--n-samples-per-prompt", type=int, default=8)
    ap.add_argument("--eval-interval", type=int, default=10)
    ap.add_argument("--lr", type=float, default=RLConfig.lr)
    ap.add_argument("--num-prompts", type=int, default=RLConfig.num_prompts, help="synthetic task: training prompts")
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES))
    ap.add_argument("--out", default="runs/rl_recipes")
    ap.add_argument("--cuda-graph", action="store_true", help="rollout decode under CUDA graphs (CUDA only)")
    ap.add_argument("--no-write", action="store_true", help="keep bench/results/ untouched (trial runs)")
    return ap


def main() -> None:
    args = build_parser().parse_args()
    out = Path(args.out)
    summary = {}
    for recipe in args.recipes:
        run = out / recipe
        shutil.rmtree(run, ignore_errors=True)
        cfg = dataclasses.replace(
            RLConfig(), recipe=recipe, model=args.model, run_dir=str(run), num_steps=args.num_steps,
            prompts_per_step=args.prompts_per_step, n_samples_per_prompt=args.n_samples_per_prompt,
            eval_interval=args.eval_interval, save_interval=0, device=args.device, lr=args.lr,
            num_prompts=args.num_prompts, cuda_graph=args.cuda_graph,
        )
        summary[recipe] = summarize(train(cfg, progress=True))
    base = summary.get("bf16", {}).get("mismatch_mean")
    print(f"{'recipe':<24}{'reward first->last':>20}{'eval first->last':>18}{'|dlogp|':>10}{'x bf16':>8}{'rollout tok/s':>15}")
    for recipe, s in summary.items():
        s["mismatch_vs_bf16"] = s["mismatch_mean"] / base if base else None
        ev = f"{s['eval_accuracy_first']:.2f}->{s['eval_accuracy_last']:.2f}" if s["eval_accuracy_first"] is not None else "-"
        ratio = f"{s['mismatch_vs_bf16']:.2f}" if base else "-"
        print(f"{recipe:<24}{s['reward_first']:>10.3f}->{s['reward_last']:<8.3f}{ev:>18}{s['mismatch_mean']:>10.5f}"
              f"{ratio:>8}{s['rollout_tokens_per_s_median']:>15.0f}")
    name = f"rl_recipes_{args.device}"
    fig_dir = (out / "plots") if args.no_write else RESULTS / name
    figs = plot_runs([out / r for r in args.recipes], fig_dir)
    if args.no_write:
        print(f"--no-write: plots in {fig_dir}, nothing under bench/results/")
        return
    warm = Path(args.model or DEFAULT_MODEL_DIR) / "pretrain_summary.json"  # what the runs started from
    path = write_results(name, {"config": vars(args), "warm_start": json.loads(warm.read_text()) if warm.exists() else None,
                                "results": summary})  # fmt: skip
    print(f"wrote {path} and {', '.join(str(f) for f in figs)}")


if __name__ == "__main__":
    main()
