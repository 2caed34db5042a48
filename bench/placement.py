"""Where the time of an RL step goes under each placement: local, Ray, Ray with async rollout.

Runs ``quantrl train`` (one recipe, same seed and data) three times:
    local        trainer and engine in this process, one after the other
    ray          trainer and engine(s) as Ray actors, still one after the other (on-policy)
    ray-async    the engines sample step t+1 while step t trains (one step off-policy, TIS on)
and reports per step: wall time, rollout, train, sync, how long the trainer waited for samples, and the
mismatch (with async it also holds one step of policy lag). On CPU, trainer and each engine get one
thread (``--threads 1``), so the trainer and an engine can really run at once on two cores.

Run: ``python bench/placement.py --device cpu`` (the embedded model); on a multi-GPU node,
``python bench/placement.py --device cuda --model DIR --rollout-num-engines 2``. Writes
``bench/results/placement_<device>.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import statistics
from pathlib import Path

import torch
from _common import write_results

from quantrl.rl.loop import RLConfig, train

PLACEMENTS = {
    "local": {"placement": "local"},
    "ray": {"placement": "ray"},
    "ray-async": {"placement": "ray", "async_rollout": True, "is_mode": "tis"},
}


def summarize(rows: list[dict]) -> dict:
    steps = [r for r in rows if "reward" in r][1:]  # step 1 pays start-up costs (and has nothing to overlap)
    med = lambda key: statistics.median(r.get(key, 0.0) for r in steps)
    return {
        "steps_timed": len(steps),
        "step_s_median": med("step_s"),
        "rollout_s_median": med("rollout_s"),
        # async: the trainer waits for samples when it collects them, and when the sync lets them finish first
        "rollout_wait_s_median": statistics.median(r["rollout_wait_s"] + r["sync_rollout_wait_s"] for r in steps)
        if "rollout_wait_s" in steps[0] else med("rollout_s"),
        "train_s_median": med("train_s"),
        "sync_s_median": med("sync_s"),
        "mismatch_mean": statistics.mean(r["mismatch_abs_mean"] for r in steps),
        "reward_mean": statistics.mean(r["reward"] for r in steps),
        "rollout_weight_lag": statistics.mean(r["step"] - 1 - r["rollout_weight_version"] for r in steps),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default="", help="HF model dir (default: the embedded model)")
    ap.add_argument("--recipe", default="int4-qat")
    ap.add_argument("--num-steps", type=int, default=12)
    ap.add_argument("--prompts-per-step", type=int, default=RLConfig.prompts_per_step)
    ap.add_argument("--n-samples-per-prompt", type=int, default=RLConfig.n_samples_per_prompt)
    ap.add_argument("--rollout-num-engines", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads of the trainer and of each engine")
    ap.add_argument("--out", default="runs/placement")
    ap.add_argument("--no-write", action="store_true", help="keep bench/results/ untouched (trial runs)")
    args = ap.parse_args()
    results = {}
    for name, flags in PLACEMENTS.items():
        run = Path(args.out) / name
        shutil.rmtree(run, ignore_errors=True)
        engines = args.rollout_num_engines if flags["placement"] == "ray" else 1
        cfg = dataclasses.replace(RLConfig(), recipe=args.recipe, model=args.model, run_dir=str(run),
                                  num_steps=args.num_steps, prompts_per_step=args.prompts_per_step,
                                  n_samples_per_prompt=args.n_samples_per_prompt, eval_interval=0, save_interval=0,
                                  device=args.device, threads=args.threads, rollout_num_engines=engines,
                                  **flags)  # fmt: skip
        results[name] = summarize(train(cfg, progress=True))
    base = results["local"]["step_s_median"]
    print(f"{'placement':<11}{'step s':>8}{'x local':>9}{'rollout':>9}{'waited':>8}{'train':>8}{'sync':>8}{'|dlogp|':>10}{'lag':>5}")
    for name, r in results.items():
        r["step_speedup_vs_local"] = base / r["step_s_median"]
        print(f"{name:<11}{r['step_s_median']:>8.2f}{r['step_speedup_vs_local']:>9.2f}{r['rollout_s_median']:>9.2f}"
              f"{r['rollout_wait_s_median']:>8.2f}{r['train_s_median']:>8.2f}{r['sync_s_median']:>8.3f}"
              f"{r['mismatch_mean']:>10.5f}{r['rollout_weight_lag']:>5.1f}")  # fmt: skip
    if not args.no_write:
        print(f"wrote {write_results(f'placement_{args.device}', {'config': vars(args), 'results': results})}")


if __name__ == "__main__":
    main()
