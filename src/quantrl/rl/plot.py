"""``quantrl plot RUN_DIR...``: the figures people compare recipes with.

    reward.png      training reward (smoothed) and held-out accuracy vs step, one line per run
    mismatch.png    mean |logprob_train - logprob_rollout| vs step, one line per run (log scale)
    throughput.png  median rollout tokens/s per run
    entropy.png     the policy's mean token entropy on the trained tokens vs step (an entropy collapse shows here)
    correction.png  runs with a train-rollout correction: fraction of tokens whose importance weight was
                    truncated / clipped / masked, and fraction rejected, vs step
    routing.png     MoE runs with routing replay: fraction of expert choices the trainer's router would
                    have made differently from the engine's, vs step
"""

from __future__ import annotations

import json
from pathlib import Path


def _labels(runs: list[Path]) -> dict[Path, str]:
    """"recipe (dir)" per run, the dir named by as many trailing path parts as it takes to tell runs apart
    (``a/bf16`` and ``b/bf16``)."""

    def recipe(run: Path) -> str | None:
        cfg_path = run / "config.json"
        return json.loads(cfg_path.read_text()).get("recipe") if cfg_path.exists() else None

    parts = [run.resolve().parts for run in runs]
    k = 1
    while k < max(map(len, parts)) and len({p[-k:] for p in parts}) < len(set(parts)):
        k += 1
    out = {}
    for run, p in zip(runs, parts):
        name, r = "/".join(p[-k:]), recipe(run)
        out[run] = f"{r} ({name})" if r and r != name else name
    return out


def _smooth(xs: list[float], k: int) -> list[float]:
    out, acc = [], []
    for x in xs:
        acc.append(x)
        acc = acc[-k:]
        out.append(sum(acc) / len(acc))
    return out


def _step_lines(ax, runs: list[tuple[Path, list[dict]]], label: dict[Path, str], key: str, smooth: int = 1) -> bool:
    """One line of ``key`` vs step per run that logs it; whether any run did."""
    drawn = False
    for run, rows in runs:
        steps = [r for r in rows if key in r]
        if steps:
            ax.plot([r["step"] for r in steps], _smooth([r[key] for r in steps], smooth), label=label[run])
            drawn = True
    if drawn:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return drawn


def _save(fig, path: Path, paths: list[Path]) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    paths.append(path)


def plot_runs(run_dirs: list[str | Path], out_dir: str | Path, smooth: int = 5) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from quantrl.rl.run_dir import RunDir

    if smooth < 1:
        raise ValueError(f"smooth must be >= 1 (1: no smoothing), got {smooth}")
    runs = [(Path(r), RunDir(r).metrics()) for r in run_dirs]
    label = _labels([r for r, _ in runs])
    missing = [str(r) for r, m in runs if not m]
    if missing:
        raise FileNotFoundError(f"no metrics.jsonl rows in: {', '.join(missing)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []

    fig, (ax_r, ax_e) = plt.subplots(1, 2, figsize=(12, 4.5))
    for run, rows in runs:
        steps = [r for r in rows if "reward" in r]
        line = ax_r.plot([r["step"] for r in steps], _smooth([r["reward"] for r in steps], smooth), label=label[run])[0]
        ev = [r for r in rows if "eval_accuracy" in r]
        if ev:
            ax_e.plot([r["step"] for r in ev], [r["eval_accuracy"] for r in ev], "o-", color=line.get_color(), label=label[run])
    ax_r.set(title=f"training reward (mean over samples, {smooth}-step moving average)", xlabel="step", ylabel="reward")
    ax_e.set(title="held-out accuracy (mean over samples; greedy by default)", xlabel="step", ylabel="accuracy")
    for ax in (ax_r, ax_e):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # no eval rows (--eval-interval 0): an empty panel, no legend
            ax.legend(fontsize=8)
    _save(fig, out / "reward.png", paths)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    values = []
    for run, rows in runs:
        steps = [r for r in rows if "mismatch_abs_mean" in r]
        values += [r["mismatch_abs_mean"] for r in steps]
        ax.plot([r["step"] for r in steps], [r["mismatch_abs_mean"] for r in steps], label=label[run])
    ax.set(title="train-rollout mismatch: mean |logp_train - logp_rollout|", xlabel="step", ylabel="mean |Δ logprob|")
    positive = [v for v in values if v > 0]
    if positive and len(positive) == len(values):
        ax.set_yscale("log")
    elif positive:  # exact zeros (identical engines) would vanish from a log axis: linear below the smallest
        ax.set_yscale("symlog", linthresh=min(positive))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    _save(fig, out / "mismatch.png", paths)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    labels, rates = [], []
    for run, rows in runs:
        vals = sorted(r["rollout_tokens_per_s"] for r in rows if "rollout_tokens_per_s" in r)
        if vals:
            labels.append(label[run])
            rates.append(vals[len(vals) // 2])
    ax.barh(labels, rates)
    ax.set(title="rollout throughput (median over steps)", xlabel="generated tokens / s")
    ax.grid(alpha=0.3, axis="x")
    _save(fig, out / "throughput.png", paths)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    if _step_lines(ax, runs, label, "entropy", smooth):
        ax.set(title=f"policy entropy on the trained tokens ({smooth}-step moving average)", xlabel="step",
               ylabel="nats per token")  # fmt: skip
        _save(fig, out / "entropy.png", paths)
    else:
        plt.close(fig)

    fig, (ax_c, ax_j) = plt.subplots(1, 2, figsize=(12, 4.5))
    if _step_lines(ax_c, runs, label, "is_clipped_frac"):
        ax_c.set(title="importance weights truncated / clipped / masked", xlabel="step", ylabel="fraction of tokens")
        _step_lines(ax_j, runs, label, "rs_rejected_frac")
        ax_j.set(title="tokens rejected (rejection sampling, veto)", xlabel="step", ylabel="fraction of tokens")
        _save(fig, out / "correction.png", paths)
    else:
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    if _step_lines(ax, runs, label, "routing_flip_frac"):
        ax.set(title="MoE routing: expert choices where trainer and engine disagree", xlabel="step",
               ylabel="fraction of (token, layer) choices")  # fmt: skip
        _save(fig, out / "routing.png", paths)
    else:
        plt.close(fig)
    return paths
