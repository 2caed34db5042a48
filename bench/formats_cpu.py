"""Throughput of the reference quantizers (``quantrl.formats``) on CPU.

Input: one 8192×8192 bf16 weight (128 MiB). Figures are GB/s of *input* bytes. Baselines in the same run:
a naive Python loop over 128×128 tiles doing the same math, and compressed-tensors' own
``pack_to_int32`` (packing only, from the same int8 codes). Run: ``python bench/formats_cpu.py``.
"""

from __future__ import annotations

import argparse

import torch
from _common import best_of, write_results
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

from quantrl.formats import pack_int4, quantize_fp8, quantize_int4
from quantrl.formats.fp8 import FP8_MAX


def naive_fp8_blocks(w: torch.Tensor, b: int = 128):
    n, k = w.shape
    q = torch.empty(n, k, dtype=torch.float8_e4m3fn)
    s = torch.empty((n + b - 1) // b, (k + b - 1) // b)
    for i in range(0, n, b):
        for j in range(0, k, b):
            blk = w[i:i + b, j:j + b].float()
            sc = blk.abs().max() / FP8_MAX
            sc = sc if sc > 0 else torch.ones(())
            q[i:i + b, j:j + b] = (blk / sc).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
            s[i // b, j // b] = sc
    return q, s


def naive_int4_tiles(w: torch.Tensor, g: int = 128, rows: int = 128):
    n, k = w.shape
    q = torch.empty(n, k, dtype=torch.int8)
    s = torch.empty(n, k // g, dtype=torch.bfloat16)
    for i in range(0, n, rows):
        for j in range(0, k, g):
            blk = w[i:i + rows, j:j + g].float()
            sc = (blk.abs().amax(1, keepdim=True) / 7).clamp(min=torch.finfo(torch.bfloat16).tiny).bfloat16()
            q[i:i + rows, j:j + g] = torch.round(blk / sc.float()).clamp(-7, 7).to(torch.int8)
            s[i:i + rows, j // g] = sc[:, 0]
    return pack_int4(q), s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    w = torch.randn(args.size, args.size, generator=torch.Generator().manual_seed(0)).bfloat16()
    gb = w.numel() * w.element_size() / 1e9
    q4, _ = quantize_int4(w)

    # the naive loops must compute the same numbers, or their timings mean nothing
    qa, sa = quantize_fp8(w)
    qb, sb = naive_fp8_blocks(w)
    assert torch.equal(qa.view(torch.uint8), qb.view(torch.uint8)) and torch.equal(sa, sb)
    pa, _ = naive_int4_tiles(w)
    assert torch.equal(pa, pack_int4(q4)) and torch.equal(pack_int4(q4), pack_to_int32(q4, 4))

    cases = {
        "fp8_block128_quantize": lambda: quantize_fp8(w),
        "fp8_block128_naive_tile_loop": lambda: naive_fp8_blocks(w),
        "int4_g128_quantize_and_pack": lambda: pack_int4(quantize_int4(w)[0]),
        "int4_g128_naive_tile_loop_and_pack": lambda: naive_int4_tiles(w),
        "int4_pack_only_quantrl": lambda: pack_int4(q4),
        "int4_pack_only_compressed_tensors": lambda: pack_to_int32(q4, 4),
    }
    rows = {}
    for name, fn in cases.items():
        t = best_of(fn, repeats=args.repeats)
        # pack-only cases read int8 codes (half the bytes of the bf16 weight); report GB/s of what they read
        in_gb = q4.numel() / 1e9 if "pack_only" in name else gb
        rows[name] = {"seconds": t, "input_GB": in_gb, "GB_per_s": in_gb / t}
    base = {
        "fp8_block128_quantize": "fp8_block128_naive_tile_loop",
        "int4_g128_quantize_and_pack": "int4_g128_naive_tile_loop_and_pack",
        "int4_pack_only_quantrl": "int4_pack_only_compressed_tensors",
    }
    for ours, ref in base.items():
        rows[ours]["speedup_vs"] = {ref: rows[ref]["seconds"] / rows[ours]["seconds"]}
    print(f"{'case':<40}{'ms':>10}{'GB/s in':>10}{'speedup':>10}")
    for name, r in rows.items():
        sp = next(iter(r.get("speedup_vs", {}).values()), None)
        print(f"{name:<40}{r['seconds'] * 1e3:>10.1f}{r['GB_per_s']:>10.2f}{(f'{sp:.2f}x' if sp else ''):>10}")
    path = write_results("formats_cpu", {"shape": [args.size, args.size], "input_dtype": "bfloat16", "results": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
