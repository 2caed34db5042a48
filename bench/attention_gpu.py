"""Decode attention on one GPU: quantrl's Triton kernel over the KV cache against SDPA, BF16 and FP8 caches.

What is timed is one layer's decode attention of the Qwen3-0.6B shapes (16 query heads, 8 KV heads, head
dim 128; ``QWEN3_06B``) for B rows whose cached context is ``ctx`` tokens, inside KV-cache slots of
``--slot`` positions (the engine's layout: a graph's shapes are the slot's). Rows:

    kernel          quantrl.kernels.decode_attention, BF16 cache: reads each row's ctx keys
    kernel-fp8      the same over an FP8 (e4m3) cache: one byte a value, read as stored
    sdpa-slot       SDPA over the whole slot with a mask: what the engine's CUDA-graph decode ran before
    sdpa-ctx        SDPA over exactly ctx keys, no mask (flash): the best SDPA can do (eager, one length)
    sdpa-fp8        dequantize ctx keys of the FP8 cache to BF16, then sdpa-ctx: the FP8 path before

Bytes: the K and V the row must read (B x 8 heads x ctx x 128 x 2 x itemsize) plus q and the output;
``pct_bw`` = bytes / time / the copy bandwidth measured on this device (``_common.roofline``), beside
% of the H100's 3.0 TB/s. FLOPs (4 x B x 16 x ctx x 128) are far below the tensor cores' peak at every
row: decode attention is a bandwidth problem. Each figure is the median of CUDA-graph replays of one
call per cache copy, copies cycled past ~3x the L2 so the cache comes from DRAM. Checked first: the
kernel against the reference (dequantize + SDPA) on every timed input, relative error recorded.

Run: ``python bench/attention_gpu.py`` (needs CUDA; writes bench/results/attention_gpu.json). ``--smoke``:
tiny shapes on CPU through Triton's interpreter, the same code, writes nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F
from _common import H100_COPY_BW, Timer, copies_for, describe_roofline, roofline, smoke_or_cuda, write_results
from rollout_gpu import QWEN3_06B

HQ, HKV, D = QWEN3_06B["num_attention_heads"], QWEN3_06B["num_key_value_heads"], QWEN3_06B["head_dim"]
CHECK_RTOL = 2e-2  # kernel vs dequantize + SDPA (dispatch.ATTN_PROBE_RTOL)


def attn_bytes(b: int, ctx: int, itemsize: int) -> int:
    return b * HKV * ctx * D * 2 * itemsize + 2 * b * HQ * D * 2


def make_inputs(b: int, slot: int, ctx: int, copies: int, device) -> list[dict]:
    """``copies`` independent caches (random K/V, their FP8 codes with per-layer scales) of one shape."""
    from quantrl.formats.fp8 import quantize_fp8_static

    out = []
    for i in range(copies):
        g = torch.Generator(device=device).manual_seed(i)
        k = torch.randn(b, HKV, slot, D, generator=g, device=device, dtype=torch.bfloat16)
        v = torch.randn(b, HKV, slot, D, generator=g, device=device, dtype=torch.bfloat16)
        ks = torch.tensor(4.0 / 448, device=device)  # randn's |x| < 4 to ~6e-5: saturation almost never
        out.append({"q": torch.randn(b, HQ, D, generator=g, device=device, dtype=torch.bfloat16), "k": k, "v": v,
                    "k8": quantize_fp8_static(k, ks), "v8": quantize_fp8_static(v, ks), "ks": ks,
                    "lens": torch.full((b,), ctx, device=device), "ctx": ctx})  # fmt: skip
    return out


def variants(slot: int) -> dict:
    """name -> (fn(inputs) -> out, cache bytes per element)."""
    from quantrl.formats.fp8 import dequantize_fp8_static
    from quantrl.kernels.decode_attention import decode_attention_triton

    scale = D**-0.5

    def sdpa(q, k, v, mask=None):
        out = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        return out[:, :, 0]

    def slot_mask(x):  # [B, 1, 1, slot]: keys < len, as the engine's decode masks are built
        return (torch.arange(slot, device=x["q"].device)[None, :] < x["lens"][:, None])[:, None, None]

    def ctx_view(t, x):
        return t[:, :, : x["ctx"]]

    return {
        "kernel": (lambda x: decode_attention_triton(x["q"], x["k"], x["v"], x["lens"], scale), 2),
        "kernel-fp8": (lambda x: decode_attention_triton(x["q"], x["k8"], x["v8"], x["lens"], scale, x["ks"], x["ks"]), 1),
        "sdpa-slot": (lambda x: sdpa(x["q"], x["k"], x["v"], slot_mask(x)), 2),
        "sdpa-ctx": (lambda x: sdpa(x["q"], ctx_view(x["k"], x), ctx_view(x["v"], x)), 2),
        "sdpa-fp8": (lambda x: sdpa(x["q"], dequantize_fp8_static(ctx_view(x["k8"], x), x["ks"]),
                                    dequantize_fp8_static(ctx_view(x["v8"], x), x["ks"])), 1),
    }  # fmt: skip


def check(inputs: list[dict], fns: dict) -> dict:
    """Kernel vs the reference (``dispatch.decode_attention_reference``) on the first copy: rel errors."""
    from quantrl.kernels.dispatch import decode_attention_reference

    x = inputs[0]
    ref = decode_attention_reference(x["q"], x["k"], x["v"], x["lens"], D**-0.5).float()
    ref8 = decode_attention_reference(x["q"], x["k8"], x["v8"], x["lens"], D**-0.5, x["ks"], x["ks"]).float()
    err = {}
    for name, want in (("kernel", ref), ("kernel-fp8", ref8)):
        got = fns[name][0](x).float()
        err[name] = float((got - want).norm() / want.norm())
    return err


def bench_row(b: int, ctx: int, slot: int, timer: Timer, device, failures: list[str]) -> dict:
    copies = copies_for(attn_bytes(b, slot, 1), device)  # the fp8 slot's bytes: every variant sees a cold cache
    inputs = make_inputs(b, slot, ctx, copies, device)
    fns = variants(slot)
    errs = check(inputs, fns)
    for name, e in errs.items():
        if not e <= CHECK_RTOL:
            failures.append(f"{name} B={b} ctx={ctx}: relative error {e:.2e} > {CHECK_RTOL}")
    row = {"batch": b, "ctx": ctx, "slot": slot, "copies": copies, "rel_error": errs, "us": {}, "bytes": {}}
    for name, (fn, itemsize) in fns.items():
        t = timer([lambda x=x, fn=fn: fn(x) for x in inputs])
        row["us"][name] = t * 1e6
        row["bytes"][name] = attn_bytes(b, ctx, itemsize)
    del inputs
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def annotate(rows: list[dict], bw: float) -> None:
    for r in rows:
        us = r["us"]
        r["pct_bw"] = {n: r["bytes"][n] / (us[n] * 1e-6) / bw for n in us}
        r["pct_bw_h100"] = {n: r["bytes"][n] / (us[n] * 1e-6) / H100_COPY_BW for n in us}
        r["speedup"] = {
            "kernel_vs_sdpa_slot": us["sdpa-slot"] / us["kernel"],
            "kernel_vs_sdpa_ctx": us["sdpa-ctx"] / us["kernel"],
            "kernel_fp8_vs_sdpa_fp8": us["sdpa-fp8"] / us["kernel-fp8"],
            "kernel_fp8_vs_kernel": us["kernel"] / us["kernel-fp8"],
        }


def print_table(rows: list[dict], roof: dict) -> None:
    names = list(rows[0]["us"]) if rows else []
    print(f"\ndecode attention, {HQ} q / {HKV} kv heads x {D} (us; % of measured copy bandwidth); "
          f"{describe_roofline(roof)}")  # fmt: skip
    print(f"{'B':>4} {'ctx':>5} " + " ".join(f"{n:>18}" for n in names) + "   kernel/slot  kernel/ctx  fp8/sdpa-fp8")
    for r in rows:
        cells = " ".join(f"{r['us'][n]:9.1f} ({r['pct_bw'][n]:5.0%})" for n in names)
        s = r["speedup"]
        print(f"{r['batch']:4d} {r['ctx']:5d} {cells}   {s['kernel_vs_sdpa_slot']:10.2f}x {s['kernel_vs_sdpa_ctx']:10.2f}x "
              f"{s['kernel_fp8_vs_sdpa_fp8']:12.2f}x")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64, 256])
    p.add_argument("--ctx", type=int, nargs="+", default=[1024, 4096], help="cached tokens per row")
    p.add_argument("--slot", type=int, default=4096, help="KV-cache slot length (the graph's key axis)")
    p.add_argument("--reps", type=int, default=7, help="graph replays per figure (median)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (interpreter): checks the script")
    p.add_argument("--no-write", action="store_true", help="do not write bench/results/attention_gpu.json")
    return p


def main() -> int:
    args = build_parser().parse_args()
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before quantrl.kernels' @triton.jit run
        args.batches, args.ctx, args.slot, args.reps = [1, 3], [40, 100], 128, 1
    rc = smoke_or_cuda(args, "tiny shapes on CPU through Triton's interpreter", "bench/attention_gpu.py times "
                       "GPU decode attention")  # fmt: skip
    if rc is not None:
        return rc
    if any(c > args.slot for c in args.ctx):
        print(f"every --ctx must fit the --slot of {args.slot}", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.smoke else "cuda")
    roof = roofline(device, smoke=args.smoke)
    print(describe_roofline(roof), flush=True)
    timer, rows, failures = Timer(device, args.reps), [], []
    t0 = time.perf_counter()
    interrupted = False
    try:  # SIGINT (the session's step timeout): write what was timed so far
        for b in args.batches:
            for ctx in args.ctx:
                rows.append(bench_row(b, ctx, args.slot, timer, device, failures))
                figures = ", ".join(f"{n} {t:.1f} us" for n, t in rows[-1]["us"].items())
                print(f"B={b} ctx={ctx}: {figures}", flush=True)
    except KeyboardInterrupt:
        interrupted = True
        print(f"interrupted: writing the {len(rows)} rows timed so far", flush=True)
    annotate(rows, roof["measured_copy_Bps"])
    print_table(rows, roof)
    print(f"correctness: {len(failures)} failure(s)")
    for f in failures:
        print(f"  FAIL {f}")
    print(f"total {time.perf_counter() - t0:.0f} s")
    if not args.no_write:
        import triton

        path = write_results("attention_gpu", {
            "roofline": roof,
            "method": {"reps": args.reps, "timing": "median of CUDA-graph replays, one call per cache copy, copies "
                       "cycled past ~3x L2", "heads": {"q": HQ, "kv": HKV, "dim": D}, "slot": args.slot,
                       "triton": triton.__version__},
            "failures": failures, "interrupted": interrupted, "rows": rows,
        }, smoke=args.smoke)  # fmt: skip
        if path:
            print(f"wrote {path}")
    return 0 if not failures and not interrupted else 1


if __name__ == "__main__":
    sys.exit(main())
