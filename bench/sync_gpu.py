"""In-process weight-sync time on one GPU: trainer (BF16 / FP8 training / INT4 QAT) -> engine (BF16 / FP8 / INT4).

Model: Qwen3-0.6B shapes (``QWEN3_06B`` from ``rollout_gpu.py``: hidden 1024, 28 layers, tied
embeddings, ~0.6B parameters), random weights (``build_model`` + ``random_init_``), trainer and engine on
the same GPU. Rows:

    bf16               BF16 trainer      -> BF16 engine        (cast/copy only)
    fp8                BF16 trainer      -> FP8 engine         (quantize_fp8, 128x128 blocks, at sync time)
    fp8-param-gather   FP8 training      -> FP8 engine         (Fp8BlockTrainLinear's cached fp8_weight())
    int4-qat           INT4 QAT trainer  -> INT4 engine        (quantize_int + pack_int, group 128)

Each figure is the median of ``--repeats`` CUDA-synchronized runs of the full ``sync_weights`` call
(conversion, staging, validation, engine load, the engine's post-processing) after ``--warmup`` runs;
the first warm-up runs with ``check_equal=True`` and one Linear per row is checked bitwise against the
trainer's forward weight, so a fast wrong sync cannot pass. The phases are timed apart too: ``convert``
(``stage_engine_tensors``) and ``load`` (``engine.update_weights`` of the staged tensors).

GB/s are *trainer* bytes (the parameters read) per second. The floor, measured in the same run: one
``torch.Tensor.copy_`` of a flat buffer of the same bytes (bandwidth) and one ``copy_`` per trainer
tensor into preallocated tensors (bandwidth + one launch per tensor).

Target (issue 6): a full sync of the 0.5B model in <= 50 ms in-process, for every engine format.
Run: ``python bench/sync_gpu.py`` (needs CUDA; writes bench/results/sync_gpu.json).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time

import torch

from _common import write_results
from rollout_gpu import QWEN3_06B

TARGET_MS = 50.0
FORMATS = ("bf16", "fp8", "fp8-param-gather", "int4-qat")


def cuda_times(fn, repeats: int, warmup: int = 0) -> list[float]:
    """Wall seconds of ``fn`` per run, CUDA-synchronized before and after each run."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return out


def median_ms(times: list[float]) -> float:
    return 1e3 * statistics.median(times)


def build_pair(fmt: str):
    """(trainer, engine) on the GPU, the trainer prepared for its training mode."""
    from quantrl.model import QuantScheme, build_model, random_init_
    from quantrl.rollout import Engine
    from quantrl.train.fp8_linear import Fp8BlockTrainLinear, prepare_fp8_training
    from quantrl.train.qat import QATConfig, prepare_qat

    scheme = {"bf16": QuantScheme(), "fp8": QuantScheme.fp8_block(), "fp8-param-gather": QuantScheme.fp8_block(),
              "int4-qat": QuantScheme.int4(128)}[fmt]  # fmt: skip
    trainer = random_init_(build_model(QWEN3_06B, dtype=torch.bfloat16, device="cuda"), seed=1)
    for p in trainer.parameters():
        p.requires_grad_(True)
    if fmt == "int4-qat":
        prepare_qat(trainer, QATConfig(group_size=128, qmax=7, dtype=torch.bfloat16))
    elif fmt == "fp8-param-gather":
        prepare_fp8_training(trainer, fp8_param_gather=True)
        for m in trainer.modules():  # what the step's first forward does: fill the FP8 weight cache
            if isinstance(m, Fp8BlockTrainLinear):
                m.fp8_weight()
    engine_model = random_init_(build_model(QWEN3_06B, scheme, dtype=torch.bfloat16, device="cuda"), seed=0)
    engine = Engine(engine_model, kv_cache_tokens=256, max_batch_size=1)
    return trainer, engine


def check_forward_weight(trainer, engine, fmt: str) -> None:
    """One Linear, bitwise: the engine's dequantized weight == the trainer's forward weight."""
    from quantrl.formats import fake_quantize_fp8

    name = "model.layers.1.mlp.down_proj"
    got = engine.model.get_submodule(name).dequantized_weight(torch.bfloat16)
    mod = trainer.get_submodule(name)
    with torch.no_grad():
        if fmt == "int4-qat":
            want = mod.fake_quantized_weight()
        elif fmt.startswith("fp8"):
            want = fake_quantize_fp8(mod.weight, dtype=torch.bfloat16)
        else:
            want = mod.weight.to(torch.bfloat16)
    if not torch.equal(got, want):
        raise AssertionError(f"{fmt}: engine weight of {name} differs from the trainer's forward weight")


def floor_times(trainer, repeats: int) -> dict:
    """Plain copies of the trainer's bytes: one flat buffer, and one copy per tensor."""
    from quantrl.sync import trainer_params

    params = [p.detach() for _, p in trainer_params(trainer)]
    total = sum(p.numel() * p.element_size() for p in params)
    src = torch.empty(total, dtype=torch.uint8, device="cuda").random_(0, 256)
    dst = torch.empty_like(src)
    flat = cuda_times(lambda: dst.copy_(src), repeats, warmup=2)
    dsts = [torch.empty_like(p) for p in params]

    def per_tensor():
        for d, p in zip(dsts, params):
            d.copy_(p)

    each = cuda_times(per_tensor, repeats, warmup=2)
    del src, dst, dsts
    return {"trainer_bytes": total, "tensors": len(params), "flat_copy_ms": median_ms(flat),
            "per_tensor_copy_ms": median_ms(each)}  # fmt: skip


def bench_format(fmt: str, args) -> dict:
    from quantrl.sync import SyncTarget, sync_weights, trainer_qmax
    from quantrl.sync.in_process import stage_engine_tensors

    trainer, engine = build_pair(fmt)
    bucket = args.bucket_mb << 20
    version = iter(range(1, 1 << 30))
    first = sync_weights(trainer, engine, next(version), bucket_bytes=bucket, check_equal=True)
    check_forward_weight(trainer, engine, fmt)
    total = cuda_times(lambda: sync_weights(trainer, engine, next(version), bucket_bytes=bucket),
                       args.repeats, warmup=args.warmup)  # fmt: skip
    target = SyncTarget.for_engine(engine, qmax=trainer_qmax(trainer))
    dev = torch.device("cuda", torch.cuda.current_device())
    convert = cuda_times(lambda: stage_engine_tensors(trainer, target, dev, bucket), args.repeats, warmup=1)
    staged, _, _ = stage_engine_tensors(trainer, target, dev, bucket)
    load = cuda_times(lambda: engine.update_weights(staged, next(version)), args.repeats, warmup=1)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            sync_weights(trainer, engine, next(version), bucket_bytes=bucket)
        print(f"--- {fmt}: one sync under the profiler")
        print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=12))
    ms = median_ms(total)
    row = {
        "format": fmt,
        "target": target.describe(),
        "sync_ms": ms,
        "sync_ms_all": [1e3 * t for t in total],
        "convert_ms": median_ms(convert),
        "load_ms": median_ms(load),
        "trainer_bytes": first.trainer_bytes,
        "engine_bytes": first.engine_bytes,
        "tensors": first.tensors,
        "trainer_GBps": first.trainer_bytes / (ms * 1e-3) / 1e9,
    }
    del trainer, engine, staged
    gc.collect()
    torch.cuda.empty_cache()
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--bucket-mb", type=int, default=512, help="sync bucket size (MiB of trainer bytes)")
    p.add_argument("--profile", action="store_true", help="print the top CUDA kernels of one sync per format")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("bench/sync_gpu.py measures GPU weight-sync time and needs a CUDA device (the issue's target is for an "
              "H100); no CUDA device is visible, so nothing was measured.", file=sys.stderr)  # fmt: skip
        return 2
    torch.manual_seed(0)
    rows = []
    for fmt in args.formats:
        row = bench_format(fmt, args)
        rows.append(row)
        print(f"  {fmt:17s} {row['sync_ms']:8.2f} ms  ({row['trainer_GBps']:6.1f} GB/s of trainer bytes)", flush=True)
    from quantrl.model import build_model, random_init_

    trainer = random_init_(build_model(QWEN3_06B, dtype=torch.bfloat16, device="cuda"), seed=1)
    floor = floor_times(trainer, args.repeats)
    del trainer
    tb = floor["trainer_bytes"]
    floor["flat_copy_GBps"] = tb / (floor["flat_copy_ms"] * 1e-3) / 1e9
    floor["per_tensor_copy_GBps"] = tb / (floor["per_tensor_copy_ms"] * 1e-3) / 1e9
    for r in rows:
        r["x_flat_copy"] = r["sync_ms"] / floor["flat_copy_ms"]

    print(f"\nQwen3-0.6B shapes ({tb / 2 / 1e6:.0f}M bf16 parameters, {tb / 1e9:.2f} GB), in-process sync on "
          f"{torch.cuda.get_device_name()}, median of {args.repeats}")  # fmt: skip
    print(f"{'format':<18}{'sync ms':>9}{'GB/s':>8}{'convert ms':>12}{'load ms':>9}{'engine MB':>11}{'x copy':>8}")
    for r in rows:
        print(f"{r['format']:<18}{r['sync_ms']:>9.2f}{r['trainer_GBps']:>8.1f}{r['convert_ms']:>12.2f}"
              f"{r['load_ms']:>9.2f}{r['engine_bytes'] / 1e6:>11.1f}{r['x_flat_copy']:>8.1f}")  # fmt: skip
    print(f"{'floor: flat copy':<18}{floor['flat_copy_ms']:>9.2f}{floor['flat_copy_GBps']:>8.1f}")
    print(f"{'floor: per tensor':<18}{floor['per_tensor_copy_ms']:>9.2f}{floor['per_tensor_copy_GBps']:>8.1f}"
          f"   ({floor['tensors']} copies)")  # fmt: skip
    targets = {f"{r['format']}_sync_le_{TARGET_MS:.0f}ms": r["sync_ms"] <= TARGET_MS for r in rows}
    for name, ok in targets.items():
        print(f"target {name}: {'met' if ok else 'NOT met'}")
    path = write_results("sync_gpu", {
        "model": {"config": QWEN3_06B, "weights": "random (build_model + random_init_)"},
        "method": {"repeats": args.repeats, "warmup": args.warmup, "bucket_bytes": args.bucket_mb << 20,
                   "statistic": "median, CUDA-synchronized", "GBps": "trainer bytes / sync time",
                   "checked": "check_equal=True on the first sync; one Linear bitwise vs the trainer's forward"},
        "floor": floor,
        "rows": rows,
        "targets": targets,
    })  # fmt: skip
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
