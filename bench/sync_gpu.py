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
tensor into preallocated tensors (bandwidth + one launch per tensor). Roofline: a sync must at least read
the trainer bytes and write the engine bytes, so ``roofline_ms = (trainer + engine bytes) / copy
bandwidth``, with the bandwidth measured on this device (a 1 GiB ``copy_``, ``_common.roofline``) and the
H100's 3.0 TB/s; ``pct_roofline*`` = roofline_ms / sync_ms.

Target (issue 6): a full sync of the 0.5B model in <= 50 ms in-process, for every engine format.
Run: ``python bench/sync_gpu.py`` (needs CUDA; writes bench/results/sync_gpu.json). ``--smoke``: a tiny
model on CPU through the same code, writes nothing.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time

import torch
from _common import H100_COPY_BW, describe_roofline, error_line, roofline, smoke_or_cuda, write_results
from rollout_gpu import QWEN3_06B, SMOKE_CONFIG

TARGET_MS = 50.0
FORMATS = ("bf16", "fp8", "fp8-param-gather", "int4-qat")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cuda_times(fn, repeats: int, device: torch.device, warmup: int = 0) -> list[float]:
    """Wall seconds of ``fn`` per run, CUDA-synchronized before and after each run (plain wall time on CPU)."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t0)
    return out


def median_ms(times: list[float]) -> float:
    return 1e3 * statistics.median(times)


def build_pair(fmt: str, config: dict, device: torch.device):
    """(trainer, engine) on ``device``, the trainer prepared for its training mode."""
    from quantrl.model import QuantScheme, build_model, random_init_
    from quantrl.rollout import Engine
    from quantrl.train.fp8_linear import Fp8BlockTrainLinear, prepare_fp8_training
    from quantrl.train.qat import QATConfig, prepare_qat

    scheme = {"bf16": QuantScheme(), "fp8": QuantScheme.fp8_block(), "fp8-param-gather": QuantScheme.fp8_block(),
              "int4-qat": QuantScheme.int4(128)}[fmt]  # fmt: skip
    trainer = random_init_(build_model(config, dtype=torch.bfloat16, device=device), seed=1)
    for p in trainer.parameters():
        p.requires_grad_(True)
    if fmt == "int4-qat":
        prepare_qat(trainer, QATConfig(group_size=128, qmax=7, dtype=torch.bfloat16))
    elif fmt == "fp8-param-gather":
        prepare_fp8_training(trainer, fp8_param_gather=True)
        for m in trainer.modules():  # what the step's first forward does: fill the FP8 weight cache
            if isinstance(m, Fp8BlockTrainLinear):
                m.fp8_weight()
    engine_model = random_init_(build_model(config, scheme, dtype=torch.bfloat16, device=device), seed=0)
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


def floor_times(trainer, repeats: int, device: torch.device) -> dict:
    """Plain copies of the trainer's bytes: one flat buffer, and one copy per tensor."""
    from quantrl.sync import trainer_params

    params = [p.detach() for _, p in trainer_params(trainer)]
    total = sum(p.numel() * p.element_size() for p in params)
    src = torch.empty(total, dtype=torch.uint8, device=device).random_(0, 256)
    dst = torch.empty_like(src)
    flat = cuda_times(lambda: dst.copy_(src), repeats, device, warmup=2)
    dsts = [torch.empty_like(p) for p in params]

    def per_tensor():
        for d, p in zip(dsts, params):
            d.copy_(p)

    each = cuda_times(per_tensor, repeats, device, warmup=2)
    src = dst = dsts = None  # free before the next measurement (the lambdas are done)
    return {"trainer_bytes": total, "tensors": len(params), "flat_copy_ms": median_ms(flat),
            "per_tensor_copy_ms": median_ms(each)}  # fmt: skip


def bench_format(fmt: str, args, config: dict, dev: torch.device) -> dict:
    from quantrl.sync import SyncTarget, sync_weights, trainer_qmax
    from quantrl.sync.in_process import stage_engine_tensors

    trainer, engine = build_pair(fmt, config, dev)
    bucket = args.bucket_mb << 20
    version = iter(range(1, 1 << 30))
    first = sync_weights(trainer, engine, next(version), bucket_bytes=bucket, check_equal=True)
    check_forward_weight(trainer, engine, fmt)
    total = cuda_times(lambda: sync_weights(trainer, engine, next(version), bucket_bytes=bucket),
                       args.repeats, dev, warmup=args.warmup)  # fmt: skip
    target = SyncTarget.for_engine(engine, qmax=trainer_qmax(trainer))
    convert = cuda_times(lambda: stage_engine_tensors(trainer, target, dev, bucket), args.repeats, dev, warmup=1)
    staged, _, _ = stage_engine_tensors(trainer, target, dev, bucket)
    load = cuda_times(lambda: engine.update_weights(staged, next(version)), args.repeats, dev, warmup=1)
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
    trainer = engine = staged = None  # free the GPU memory (the lambdas are done)
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return row


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--bucket-mb", type=int, default=512, help="sync bucket size (MiB of trainer bytes)")
    p.add_argument("--profile", action="store_true", help="print the top CUDA kernels of one sync per format")
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU: checks the script, writes no results")
    return p


def apply_smoke(args) -> None:
    """--smoke: one timed run of each phase, no profiler (its CUDA activity needs a GPU)."""
    args.repeats, args.warmup, args.profile = 1, 1, False


def measure_floor(config: dict, repeats: int, dev: torch.device) -> dict:
    from quantrl.model import build_model, random_init_

    trainer = random_init_(build_model(config, dtype=torch.bfloat16, device=dev), seed=1)
    floor = floor_times(trainer, repeats, dev)
    del trainer
    tb = floor["trainer_bytes"]
    floor["flat_copy_GBps"] = tb / (floor["flat_copy_ms"] * 1e-3) / 1e9
    floor["per_tensor_copy_GBps"] = tb / (floor["per_tensor_copy_ms"] * 1e-3) / 1e9
    return floor


def add_rooflines(rows: list[dict], floor: dict, bw: float) -> None:
    """x flat copy, and the read-trainer + write-engine roofline against the measured and the H100 bandwidth."""
    for r in rows:
        r["x_flat_copy"] = r["sync_ms"] / floor["flat_copy_ms"]
        moved = r["trainer_bytes"] + r["engine_bytes"]
        r["roofline_ms"], r["roofline_ms_h100"] = 1e3 * moved / bw, 1e3 * moved / H100_COPY_BW
        r["pct_roofline"] = r["roofline_ms"] / r["sync_ms"]
        r["pct_roofline_h100"] = r["roofline_ms_h100"] / r["sync_ms"]


def print_table(rows: list[dict], floor: dict, args, roof: dict) -> None:
    tb = floor["trainer_bytes"]
    print(f"\n{'smoke model' if args.smoke else 'Qwen3-0.6B shapes'} ({tb / 2 / 1e6:.0f}M bf16 parameters, "
          f"{tb / 1e9:.2f} GB), in-process sync on {roof['measured_on']}, median of {args.repeats}")  # fmt: skip
    print(describe_roofline(roof) + "; roofline = (trainer + engine bytes) / copy bandwidth")
    print(f"{'format':<18}{'sync ms':>9}{'GB/s':>8}{'convert ms':>12}{'load ms':>9}{'engine MB':>11}{'x copy':>8}"
          f"{'% roof':>8}{'% H100':>8}")  # fmt: skip
    for r in rows:
        print(f"{r['format']:<18}{r['sync_ms']:>9.2f}{r['trainer_GBps']:>8.1f}{r['convert_ms']:>12.2f}"
              f"{r['load_ms']:>9.2f}{r['engine_bytes'] / 1e6:>11.1f}{r['x_flat_copy']:>8.1f}"
              f"{r['pct_roofline']:>8.1%}{r['pct_roofline_h100']:>8.1%}")  # fmt: skip
    print(f"{'floor: flat copy':<18}{floor['flat_copy_ms']:>9.2f}{floor['flat_copy_GBps']:>8.1f}")
    print(f"{'floor: per tensor':<18}{floor['per_tensor_copy_ms']:>9.2f}{floor['per_tensor_copy_GBps']:>8.1f}"
          f"   ({floor['tensors']} copies)")  # fmt: skip


def main() -> int:
    args = build_parser().parse_args()
    if args.smoke:
        apply_smoke(args)
    rc = smoke_or_cuda(args, "tiny model on CPU", "bench/sync_gpu.py measures GPU weight-sync time and needs a "
                       "CUDA device (the issue's target is for an H100)")  # fmt: skip
    if rc is not None:
        return rc
    torch.manual_seed(0)
    dev = torch.device("cpu") if args.smoke else torch.device("cuda", torch.cuda.current_device())
    config = SMOKE_CONFIG if args.smoke else QWEN3_06B
    roof = roofline(dev, smoke=args.smoke)
    print(describe_roofline(roof), flush=True)
    rows, errors, floor, interrupted = [], {}, {}, False
    try:  # SIGINT (the session's step timeout): keep the formats measured so far
        for fmt in args.formats:
            try:
                row = bench_format(fmt, args, config, dev)
            except Exception as e:  # noqa: BLE001 -- a failed check or kernel: this format's row only
                errors[fmt] = error_line(e)
                print(f"  {fmt:17s} ERROR {errors[fmt]}", flush=True)
                continue
            rows.append(row)
            print(f"  {fmt:17s} {row['sync_ms']:8.2f} ms  ({row['trainer_GBps']:6.1f} GB/s of trainer bytes)", flush=True)
        floor = measure_floor(config, args.repeats, dev)
    except KeyboardInterrupt:
        interrupted = True
        print(f"interrupted: writing the {len(rows)} formats measured so far", flush=True)
    if floor:  # not measured when interrupted before it
        add_rooflines(rows, floor, roof["measured_copy_Bps"])
        print_table(rows, floor, args, roof)
    targets = {f"{r['format']}_sync_le_{TARGET_MS:.0f}ms": r["sync_ms"] <= TARGET_MS for r in rows}
    for name, ok in targets.items():
        print(f"{'smoke (meaningless): ' if args.smoke else ''}target {name}: {'met' if ok else 'NOT met'}")
    path = write_results("sync_gpu", {
        "roofline": roof,
        "model": {"config": config, "weights": "random (build_model + random_init_)"},
        "method": {"repeats": args.repeats, "warmup": args.warmup, "bucket_bytes": args.bucket_mb << 20,
                   "statistic": "median, CUDA-synchronized", "GBps": "trainer bytes / sync time",
                   "roofline_ms": "(trainer + engine bytes) / measured copy bandwidth (_h100: / 3.0 TB/s)",
                   "checked": "check_equal=True on the first sync; one Linear bitwise vs the trainer's forward"},
        "floor": floor,
        "rows": rows,
        "targets": targets,
        "errors": errors,
        "interrupted": interrupted,
    }, smoke=args.smoke)  # fmt: skip
    if path:
        print(f"wrote {path}")
    return 1 if errors or interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
