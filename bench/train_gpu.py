"""Training step time on one GPU: BF16 vs INT4 QAT vs FP8 blockwise, same model, same batch, same run.

Model: Qwen3-0.6B shapes (``bench/rollout_gpu.py``'s ``QWEN3_06B``), random bf16 weights, trained with
quantrl's ``Trainer`` (fp32-master AdamW) on a next-token loss over ``--batch`` sequences of ``--seq-len``
tokens in micro-batches of ``--micro-batch``. Step time is the median of ``--steps`` steps after
``--warmup`` warm-up steps (CUDA-synchronized), so the once-per-step fake quantization of QAT and the
FP8 weight quantization are included.

FLOPs: ~6 * params * tokens per step for the GEMMs; the roofline column is that over the H100's
~800 TFLOP/s BF16 (FP8: ~1260 TFLOP/s) — a loose bound (attention, norms and the optimizer are not GEMMs).
Targets (issue 6): INT4 QAT step <= 1.10x the BF16 step.
Weight-sync timings live in ``bench/sync_gpu.py``. Run: ``python bench/train_gpu.py`` (needs CUDA).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from _common import write_results
from rollout_gpu import QWEN3_06B

PEAK_FLOPS = {"bf16": 800e12, "int4-qat": 800e12, "fp8": 1260e12}


def lm_loss(model, micro):
    from quantrl.train.logprobs import token_logprobs

    logp, _ = token_logprobs(model, micro["input_ids"], micro["attention_mask"])
    return -(logp * micro["loss_mask"][:, 1:]).sum(), {}


SMOKE_CONFIG = {**QWEN3_06B, "vocab_size": 512, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
                "num_attention_heads": 2, "num_key_value_heads": 1}  # --smoke: the same code path on CPU in seconds


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def step_times(mode: str, args) -> dict:
    from quantrl.model import build_model, random_init_
    from quantrl.train.trainer import TrainConfig, Trainer

    torch.manual_seed(0)
    config = SMOKE_CONFIG if args.smoke else QWEN3_06B
    dev = "cpu" if args.smoke else "cuda"
    model = random_init_(build_model(config, dtype=torch.bfloat16, device=dev), seed=0).train()
    params = sum(p.numel() for p in model.parameters())
    trainer = Trainer(model, TrainConfig(mode=mode, lr=1e-6, micro_batch_size=args.micro_batch, qat_group_size=128))
    g = torch.Generator(device=dev).manual_seed(0)
    ids = torch.randint(0, config["vocab_size"], (args.batch, args.seq_len), device=dev, generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": torch.ones_like(ids)}
    times = []
    for i in range(args.warmup + args.steps):
        _sync(dev)
        t0 = time.perf_counter()
        trainer.train_step(batch, lm_loss)
        _sync(dev)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    flops = 6 * params * args.batch * args.seq_len
    out = {"step_s": med, "steps": times, "params": params, "tokens_per_s": args.batch * args.seq_len / med,
           "gemm_flops": flops, "pct_of_peak": 100 * flops / med / PEAK_FLOPS[mode],
           "peak_mem_GB": torch.cuda.max_memory_allocated() / 1e9 if dev == "cuda" else 0.0}
    del trainer, model
    if dev == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--modes", nargs="+", default=["bf16", "int4-qat", "fp8"])
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU: checks the script, writes no results")
    args = ap.parse_args()
    if args.smoke:
        for m in args.modes:
            r = step_times(m, args)
            print(f"smoke {m}: {r['step_s']:.3f} s/step")
        return
    if not torch.cuda.is_available():
        sys.exit("bench/train_gpu.py needs a CUDA device (it times GPU training steps); none is available")
    rows = {m: step_times(m, args) for m in args.modes}
    base = rows.get("bf16", {}).get("step_s")
    print(f"{'mode':<10}{'step s':>9}{'x bf16':>8}{'tok/s':>10}{'% peak':>8}{'mem GB':>8}")
    for m, r in rows.items():
        r["vs_bf16"] = r["step_s"] / base if base else None
        ratio = f"{r['vs_bf16']:.2f}" if base else "-"
        print(f"{m:<10}{r['step_s']:>9.3f}{ratio:>8}{r['tokens_per_s']:>10.0f}{r['pct_of_peak']:>8.1f}{r['peak_mem_GB']:>8.1f}")
    path = write_results("train_gpu", {"config": vars(args), "model": "qwen3-0.6B shapes, random", "results": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
