"""One MoE layer's decode on one GPU: INT4 and FP8 experts through the grouped kernels against the other dispatches.

The layer is Qwen3-30B-A3B's (hidden 2048, 128 experts of intermediate 768, top 8, INT4 group 128;
``QWEN3_30B_A3B_MOE``), random weights (``build_model`` + ``random_init_``, one decoder layer), T tokens a
step. Rows, all computing the same sum (FMT = int4 or fp8, 128x128 blocks):

    grouped-FMT    the grouped kernel (kernels.moe_w4a16 / moe_fp8): routing sorted on the device, three
                   grouped GEMMs
    dense-FMT      every expert on every row: what a CUDA-graphed INT4 / FP8 decode ran before
    loop-FMT       eager loop over the routed experts (the Linears' kernels; one host sync a layer, no graph)
    loop-bf16      the same loop with BF16 experts (cuBLAS): the BF16 engine's MoE
    router         the router and top-k alone (in every row above), for scale

Bytes: the weights of the experts the step touches (distinct experts x 3 x 2048 x 768 x 0.5 B for INT4,
1 B for FP8, 2 B for BF16, + scales), the floor a decode step cannot go under; ``pct_bw`` = bytes / time / the copy bandwidth
measured here. grouped and dense are timed as CUDA-graph replays (their point), the loops eagerly (they
sync). Checked first: grouped vs loop per format (the expert loop's numbers), relative errors recorded.

Run: ``python bench/moe_gpu.py`` (needs CUDA; writes bench/results/moe_gpu.json). ``--smoke``: a tiny
layer on CPU through Triton's interpreter, the same code, writes nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from _common import (
    H100_COPY_BW,
    Timer,
    describe_roofline,
    roofline,
    smoke_or_cuda,
    write_results,
)

QWEN3_30B_A3B_MOE = {
    "model_type": "qwen3_moe", "vocab_size": 1024, "hidden_size": 2048, "intermediate_size": 6144,
    "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True,
    "num_hidden_layers": 1, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
    "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 4096, "tie_word_embeddings": False,
    "hidden_act": "silu", "attention_bias": False, "mlp_only_layers": [], "decoder_sparse_step": 1,
}  # fmt: skip
SMOKE_MOE = {**QWEN3_30B_A3B_MOE, "hidden_size": 128, "moe_intermediate_size": 64, "num_experts": 8,
             "num_experts_per_tok": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 64}  # fmt: skip
CHECK_RTOL = 1e-2  # SparseMoeBlock.FUSED_PROBE_RTOL
GROUP = 128


def group_of(config: dict) -> int:
    """INT4 group size: 128 (the issue's), 32 for the smoke layer's narrow experts."""
    return GROUP if config["moe_intermediate_size"] % GROUP == 0 else 32


def moe_block(config: dict, fmt: str, device: str):
    from quantrl.model import QuantScheme, build_model, random_init_
    from quantrl.model.moe import SparseMoeBlock

    scheme = {"int4": QuantScheme.int4(group_of(config)), "fp8": QuantScheme.fp8_block(), "bf16": QuantScheme()}[fmt]
    model = random_init_(build_model(config, scheme, dtype=torch.bfloat16, device=device), seed=0)
    return next(m for m in model.modules() if isinstance(m, SparseMoeBlock))


def expert_bytes(config: dict, distinct: int, fmt: str) -> int:
    h, i = config["hidden_size"], config["moe_intermediate_size"]
    per = 3 * h * i
    if fmt == "fp8":
        return distinct * (per + 3 * -(-h // 128) * -(-i // 128) * 4)
    return distinct * (per * 2 if fmt == "bf16" else per // 2 + (per // group_of(config)) * 2)


def bench_row(t: int, config: dict, blocks: dict, reps: int, device: torch.device, failures: list[str]) -> dict:
    from quantrl.model.moe import route

    g = torch.Generator(device=device).manual_seed(t)
    x = torch.randn(t, config["hidden_size"], generator=g, device=device, dtype=torch.bfloat16)
    lead = blocks["int4"]
    with torch.no_grad():
        weights, experts, _ = route(lead.gate(x), lead.top_k, lead.normalize, None)  # [T, k] each
        distinct = int(experts.unique().numel())
        row = {"tokens": t, "distinct_experts": distinct, "rel_error_grouped_vs_loop": {}, "us": {}, "bytes": {}}
        variants = {}
        for fmt in ("int4", "fp8"):
            block = blocks[fmt]
            loop = block._grouped(x, weights, experts)
            if block._stack is None:
                block._stack = block._stack_experts()
            if not block._stack:
                raise RuntimeError(f"bench/moe_gpu.py: the {fmt} experts did not stack (kernels off?)")
            err = float((block._fused(x, weights, experts).float() - loop.float()).norm() / loop.float().norm())
            row["rel_error_grouped_vs_loop"][fmt] = err
            if not err <= CHECK_RTOL:
                failures.append(f"grouped {fmt} T={t}: relative error {err:.2e} against the expert loop")
            variants[f"grouped-{fmt}"] = (lambda b=block: b._fused(x, weights, experts), True, fmt, distinct)
            variants[f"dense-{fmt}"] = (lambda b=block: b._dense(x, weights, experts), True, fmt,
                                        config["num_experts"])  # fmt: skip
            variants[f"loop-{fmt}"] = (lambda b=block: b._grouped(x, weights, experts), False, fmt, distinct)
        variants["loop-bf16"] = (lambda: blocks["bf16"]._grouped(x, weights, experts), False, "bf16", distinct)
        variants["router"] = (lambda: lead.gate(x).topk(lead.top_k, dim=-1), True, None, 0)
        for name, (fn, graph, fmt, touched) in variants.items():
            row["us"][name] = Timer(device, reps)([fn], capture=graph) * 1e6
            row["bytes"][name] = expert_bytes(config, touched, fmt) if fmt else 0
    return row


def annotate(rows: list[dict], bw: float) -> None:
    for r in rows:
        us = r["us"]
        r["pct_bw"] = {n: r["bytes"][n] / (us[n] * 1e-6) / bw for n in us if r["bytes"][n]}
        r["pct_bw_h100"] = {n: r["bytes"][n] / (us[n] * 1e-6) / H100_COPY_BW for n in us if r["bytes"][n]}
        r["speedup"] = {f"grouped_{f}_vs_{other}": us[other] / us[f"grouped-{f}"]
                        for f in ("int4", "fp8") for other in (f"dense-{f}", f"loop-{f}", "loop-bf16")}  # fmt: skip


def print_table(rows: list[dict], roof: dict, config: dict) -> None:
    names = list(rows[0]["us"]) if rows else []
    print(f"\nMoE layer decode, {config['num_experts']} experts top {config['num_experts_per_tok']}, hidden "
          f"{config['hidden_size']}, expert width {config['moe_intermediate_size']} (us; % of measured copy "
          f"bandwidth over the touched experts' bytes); {describe_roofline(roof)}")  # fmt: skip
    print(f"{'T':>4} {'experts':>7} " + " ".join(f"{n:>18}" for n in names) + "   grouped vs: dense, loop, bf16 loop")
    for r in rows:
        cells = " ".join(f"{r['us'][n]:9.1f} ({r['pct_bw'][n]:5.0%})" if n in r["pct_bw"] else f"{r['us'][n]:9.1f}        "
                         for n in names)  # fmt: skip
        s = r["speedup"]
        ratios = "  ".join(f"{f} {s[f'grouped_{f}_vs_dense-{f}']:.2f}x {s[f'grouped_{f}_vs_loop-{f}']:.2f}x "
                           f"{s[f'grouped_{f}_vs_loop-bf16']:.2f}x" for f in ("int4", "fp8"))  # fmt: skip
        print(f"{r['tokens']:4d} {r['distinct_experts']:7d} {cells}   {ratios}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 256], help="tokens per decode step")
    p.add_argument("--reps", type=int, default=7, help="replays / calls per figure (median)")
    p.add_argument("--smoke", action="store_true", help="a tiny layer on CPU (interpreter): checks the script")
    p.add_argument("--no-write", action="store_true", help="do not write bench/results/moe_gpu.json")
    return p


def main() -> int:
    args = build_parser().parse_args()
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before quantrl.kernels' @triton.jit run
        args.tokens, args.reps = [1, 5], 1
    rc = smoke_or_cuda(args, "a tiny layer on CPU through Triton's interpreter", "bench/moe_gpu.py times GPU "
                       "MoE decode")  # fmt: skip
    if rc is not None:
        return rc
    device = torch.device("cpu" if args.smoke else "cuda")
    config = SMOKE_MOE if args.smoke else QWEN3_30B_A3B_MOE
    if args.smoke:  # the interpreter's W4A16 kernels stand in for the device's
        from quantrl.model.linear import Fp8Linear, _KernelLinear

        _KernelLinear.kernel_backend = Fp8Linear.kernel_backend = "triton"
    roof = roofline(device, smoke=args.smoke)
    print(describe_roofline(roof), flush=True)
    t0 = time.perf_counter()
    blocks = {fmt: moe_block(config, fmt, str(device)) for fmt in ("int4", "fp8", "bf16")}
    rows, failures, interrupted = [], [], False
    try:  # SIGINT (the session's step timeout): write what was timed so far
        for t in args.tokens:
            rows.append(bench_row(t, config, blocks, args.reps, device, failures))
            print(f"T={t}: " + ", ".join(f"{n} {v:.1f} us" for n, v in rows[-1]["us"].items()), flush=True)
    except KeyboardInterrupt:
        interrupted = True
        print(f"interrupted: writing the {len(rows)} rows timed so far", flush=True)
    annotate(rows, roof["measured_copy_Bps"])
    print_table(rows, roof, config)
    print(f"correctness: {len(failures)} failure(s)")
    for f in failures:
        print(f"  FAIL {f}")
    print(f"total {time.perf_counter() - t0:.0f} s")
    if not args.no_write:
        import triton

        path = write_results("moe_gpu", {
            "roofline": roof, "layer": config,
            "method": {"reps": args.reps, "timing": "grouped / dense / router: median CUDA-graph replay; loops: "
                       "median eager call (they sync)", "bytes": "the touched experts' weights",
                       "triton": triton.__version__},
            "failures": failures, "interrupted": interrupted, "rows": rows,
        }, smoke=args.smoke)  # fmt: skip
        if path:
            print(f"wrote {path}")
    return 0 if not failures and not interrupted else 1


if __name__ == "__main__":
    sys.exit(main())
