"""MoE RL under low-precision rollout, with and without rollout routing replay (R3).

A quantized rollout engine moves its routers' inputs, so for some tokens it picks other experts than the
BF16 trainer would; through the KV cache every later token sees that choice. R3 has the trainer replay
the engine's experts. This bench warm-starts a small Qwen3-MoE on the synthetic task
(``quantrl pretrain --num-experts``, or ``--model DIR``), then runs the same seeds and data under each
``--recipes`` entry twice, routing replay off and on, and reports per run: mean and worst-token
train-rollout mismatch, the fraction of expert choices the two sides disagree on, and reward.

Run: ``python bench/moe_routing_replay.py`` (CPU, about 30 minutes on 2 cores) writes
``bench/results/moe_routing_replay_<device>.json`` and the ``quantrl plot`` figures beside it.
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
from quantrl.rl.pretrain import PretrainConfig, pretrain


def summarize(rows: list[dict]) -> dict:
    steps = [r for r in rows if "reward" in r]
    k = max(1, len(steps) // 5)
    flips = [r["routing_flip_frac"] for r in steps if "routing_flip_frac" in r]
    return {
        "reward_first": statistics.mean(r["reward"] for r in steps[:k]),
        "reward_last": statistics.mean(r["reward"] for r in steps[-k:]),
        "mismatch_mean": statistics.mean(r["mismatch_abs_mean"] for r in steps),
        "mismatch_max_mean": statistics.mean(r["mismatch_abs_max"] for r in steps),
        "mismatch_k3_mean": statistics.mean(r["mismatch_k3"] for r in steps),
        "routing_flip_frac_mean": statistics.mean(flips) if flips else None,
        "rollout_tokens_per_s_median": statistics.median(r["rollout_tokens_per_s"] for r in steps),
    }


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default="", help="a MoE HF model dir (default: pretrain one into --out/model)")
    ap.add_argument("--pretrain-steps", type=int, default=1000)
    ap.add_argument("--num-experts", type=int, default=8)
    ap.add_argument("--num-experts-per-tok", type=int, default=2)
    ap.add_argument("--recipes", nargs="+", default=["bf16", "fp8-rollout", "int4-ptq", "int4-qat"])
    ap.add_argument("--num-steps", type=int, default=20)
    ap.add_argument("--prompts-per-step", type=int, default=8)
    ap.add_argument("--n-samples-per-prompt", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default="runs/moe_routing_replay")
    ap.add_argument("--no-write", action="store_true", help="keep bench/results/ untouched (trial runs)")
    return ap


def main() -> None:
    args = build_parser().parse_args()
    out = Path(args.out)
    model = Path(args.model) if args.model else out / "model"
    if not args.model and not (model / "config.json").exists():
        pretrain(PretrainConfig(out_dir=str(model), steps=args.pretrain_steps, num_experts=args.num_experts,
                                num_experts_per_tok=args.num_experts_per_tok, threads=args.threads,
                                device=args.device))  # fmt: skip
    summary, runs = {}, []
    for recipe in args.recipes:
        for replay in (False, True):
            name = f"{recipe}+R3" if replay else recipe
            run = out / name
            shutil.rmtree(run, ignore_errors=True)
            cfg = dataclasses.replace(
                RLConfig(), recipe=recipe, model=str(model), run_dir=str(run), num_steps=args.num_steps,
                prompts_per_step=args.prompts_per_step, n_samples_per_prompt=args.n_samples_per_prompt,
                eval_interval=0, save_interval=0, device=args.device, threads=args.threads,
                use_rollout_routing_replay=replay,
            )
            summary[name] = summarize(train(cfg, progress=True))
            runs.append(run)
    print(f"{'run':<22}{'reward first->last':>20}{'|dlogp| mean':>14}{'|dlogp| max':>13}{'flips':>8}")
    for name, s in summary.items():
        flips = "-" if s["routing_flip_frac_mean"] is None else f"{s['routing_flip_frac_mean']:.3f}"
        print(f"{name:<22}{s['reward_first']:>10.3f}->{s['reward_last']:<8.3f}{s['mismatch_mean']:>14.5f}"
              f"{s['mismatch_max_mean']:>13.4f}{flips:>8}")
    for recipe in args.recipes:  # what replay changes, recipe by recipe
        off, on = summary[recipe], summary[f"{recipe}+R3"]
        on["mismatch_mean_vs_no_replay"] = on["mismatch_mean"] / off["mismatch_mean"]
        on["mismatch_max_vs_no_replay"] = on["mismatch_max_mean"] / off["mismatch_max_mean"]
    name = f"moe_routing_replay_{args.device}"
    fig_dir = (out / "plots") if args.no_write else RESULTS / name
    figs = plot_runs(runs, fig_dir)
    if args.no_write:
        print(f"--no-write: plots in {fig_dir}, nothing under bench/results/")
        return
    warm = model / "pretrain_summary.json"
    path = write_results(name, {"config": vars(args), "warm_start": json.loads(warm.read_text()) if warm.exists() else None,
                                "results": summary})  # fmt: skip
    print(f"wrote {path} and {', '.join(str(f) for f in figs)}")


if __name__ == "__main__":
    main()
