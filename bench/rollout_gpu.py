"""Decode throughput of quantrl's rollout engine (BF16 / FP8 / INT4, opt-in NVFP4) on one GPU, next to transformers.

Model: Qwen3-0.6B shapes (hidden 1024, 28 layers, 16 q / 8 kv heads of 128, SwiGLU 3072, vocab 151936,
tied embeddings), random weights from ``build_model`` + ``random_init_``; FP8 and INT4 engines get the
BF16 weights quantized through ``quantrl.formats`` (FP8 128x128 blocks; INT4 group 128). transformers
runs ``Qwen3ForCausalLM.generate`` on the same BF16 weights in the same process.

Decode tokens/s is measured differentially, so prefill cancels out: every sequence generates exactly
N_short, then N_long tokens (no stop tokens), and

    decode tok/s = batch * (N_long - N_short) / (t_long - t_short)      (best of --repeats runs each)

Roofline: a decode step must read every weight once (lm_head included; the embedding only gathers B
rows), so step time >= weight bytes / copy bandwidth and roofline tok/s = batch * bandwidth / weight
bytes, with the bandwidth measured on this device (a 1 GiB ``copy_``, ``_common.roofline``; the target
uses it) and, beside it, the H100's 3.0e12 B/s. It ignores KV-cache reads, so it is a loose bound at
large batch. INT4's bytes are its packed format (the W4A16 kernel reads them; a layer whose first-call
check fails falls back to a cached BF16 weight, which ``linear_paths`` reports). ``--formats ... nvfp4`` adds
the NVFP4A16 engine (the same kernels with an e2m1 decode: 4.5 bits per weight read).

Targets (issue 4): BF16 batch 1 >= 50% of roofline and >= 20x transformers; INT4 batch 1 >= 1.8x BF16.
Run: ``python bench/rollout_gpu.py`` (needs CUDA; writes bench/results/rollout_gpu.json). ``--smoke``: the same
code on CPU with a tiny model (transformers baseline included, no CUDA graphs), writes nothing.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time

import torch
from _common import H100_COPY_BW, describe_roofline, error_line, roofline, smoke_or_cuda, write_results

QWEN3_06B = {
    "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 1024, "intermediate_size": 3072,
    "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
    "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 40960, "tie_word_embeddings": True,
    "hidden_act": "silu", "attention_bias": False,
}  # fmt: skip
# --smoke (every GPU bench): the same code path on CPU in seconds
SMOKE_CONFIG = {**QWEN3_06B, "vocab_size": 512, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
                "num_attention_heads": 2, "num_key_value_heads": 1}  # fmt: skip


def weight_bytes(model) -> int:
    """Bytes one decode step reads: every engine tensor except the embedding, plus lm_head (tied or not)."""
    from quantrl.model import engine_state

    state = engine_state(model)
    total = sum(t.numel() * t.element_size() for n, t in state.items() if n != "model.embed_tokens.weight")
    if "lm_head.weight" not in state:  # tied: lm_head reads the embedding matrix
        w = model.lm_head.weight
        total += w.numel() * w.element_size()
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def sync_time(fn, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def decode_rate(run, batch: int, n_short: int, n_long: int, repeats: int, device: torch.device) -> float:
    """Tokens/s of the decode phase from two generate lengths (warm-up run of each first)."""
    run(n_short), run(n_long)
    t_short = min(sync_time(lambda: run(n_short), device) for _ in range(repeats))
    t_long = min(sync_time(lambda: run(n_long), device) for _ in range(repeats))
    if t_long <= t_short:  # timing noise larger than the decode it should measure (a loaded CPU): no figure
        return float("nan")
    return batch * (n_long - n_short) / (t_long - t_short)


def linear_paths(model) -> dict[str, int]:
    """Quantized Linears by the path their first-call check left them on: ``fast`` (Triton W4A16 / NVFP4 kernel /
    FP8 kernels or ``_scaled_mm``), ``reference`` (fell back, with a warning) or ``unprobed``. A row's speed
    means nothing for its format unless every layer is ``fast``."""
    from quantrl.model.linear import Fp8Linear, _KernelLinear

    out: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, (_KernelLinear, Fp8Linear)):
            state = m._kernel_ok if isinstance(m, _KernelLinear) else m._fast
            key = {True: "fast", False: "reference", None: "unprobed"}[state]
            out[key] = out.get(key, 0) + 1
    return out


def engine_rate(model, prompts: list[list[int]], args) -> tuple[float, bool]:
    """(decode tok/s, whether CUDA graphs were still in use at the end: a failed capture falls back to eager)."""
    from quantrl.rollout import Engine, SamplingParams

    batch, seq_len = len(prompts), args.prompt_len + args.n_long
    engine = Engine(model, kv_cache_tokens=batch * seq_len, max_seq_len=seq_len, max_batch_size=batch,
                    max_prefill_tokens=max(8192, args.prompt_len), use_cuda_graph=not args.no_cuda_graph)  # fmt: skip

    def run(n: int) -> None:
        res = engine.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=n, seed=0))
        assert all(len(r.tokens) == n for r in res)

    rate = decode_rate(run, batch, args.n_short, args.n_long, args.repeats, model.device)
    engine.cache.free()
    return rate, engine._graphs is not None


def hf_model(bf16_model, config: dict):
    """transformers' Qwen3 holding ``bf16_model``'s weights, built once on its device (not on the CPU in fp32)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(**{k: v for k, v in config.items() if k != "model_type"})
    with torch.device(bf16_model.device):
        hf = Qwen3ForCausalLM(cfg).to(dtype=torch.bfloat16).eval()
    missing, unexpected = hf.load_state_dict(bf16_model.state_dict(), strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return hf


def hf_rate(hf, prompts: list[list[int]], args) -> float:
    ids = torch.tensor(prompts, device=hf.device)

    def run(n: int) -> None:
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                          max_new_tokens=n, min_new_tokens=n, pad_token_id=0)  # fmt: skip
        assert out.shape[1] == ids.shape[1] + n

    with torch.no_grad():
        return decode_rate(run, len(prompts), args.n_short, args.n_long, args.repeats, hf.device)


def build(fmt: str, config: dict, device: str):
    from quantrl.model import QuantScheme, build_model, random_init_

    scheme = {"bf16": QuantScheme(), "fp8": QuantScheme.fp8_block(), "int4": QuantScheme.int4(128),
              "nvfp4": QuantScheme.nvfp4()}[fmt]  # fmt: skip
    # same seed: the quantized engines hold the BF16 engine's weights, quantized through formats
    return random_init_(build_model(config, scheme, dtype=torch.bfloat16, device=device), seed=0)


def apply_smoke(args) -> None:
    """--smoke: tiny model and lengths on CPU, eager decode (CUDA graphs need CUDA)."""
    args.batches, args.hf_batches = [1, 2], None
    args.prompt_len, args.n_short, args.n_long, args.repeats = 8, 2, 5, 1
    args.no_cuda_graph = True


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64, 256])
    p.add_argument("--formats", nargs="+", choices=["bf16", "fp8", "int4", "nvfp4"], default=["bf16", "fp8", "int4"])
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--n-short", type=int, default=16)
    p.add_argument("--n-long", type=int, default=144)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    p.add_argument(
        "--hf-batches",
        type=int,
        nargs="+",
        help="batches the transformers baseline runs at (default: all of --batches; the target uses 1)",
    )
    p.add_argument("--no-cuda-graph", action="store_true", help="eager decode (to see what CUDA graphs buy)")
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU: checks the script, writes no results")
    return p


def measure(args, config: dict, device: str, bw: float, rows: list[dict], errors: dict) -> list[dict]:
    """One row per (format, batch), appended to ``rows`` as measured: engine tok/s and its roofline;
    transformers' tok/s on the BF16 rows. A format that fails is recorded in ``errors``; the others go on."""
    for fmt in args.formats:
        try:
            _measure_format(fmt, args, config, device, bw, rows)
        except Exception as e:  # noqa: BLE001 -- a kernel compile or capture error: this format's rows only
            errors[fmt] = error_line(e)
            print(f"  {fmt}: ERROR {errors[fmt]}", flush=True)
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def _measure_format(fmt: str, args, config: dict, device: str, bw: float, rows: list[dict]) -> None:
    from quantrl.kernels import dispatch

    g = torch.Generator().manual_seed(0)
    prompts_all = torch.randint(0, config["vocab_size"], (max(args.batches), args.prompt_len), generator=g).tolist()
    hf_batches = set(args.batches if args.hf_batches is None else args.hf_batches)
    model = build(fmt, config, device)
    wbytes = weight_bytes(model)
    hf = hf_model(model, config) if fmt == "bf16" and not args.no_hf and hf_batches & set(args.batches) else None
    for batch in args.batches:
        prompts = prompts_all[:batch]
        rate, graphed = engine_rate(model, prompts, args)
        roof, roof_h100 = batch * bw / wbytes, batch * H100_COPY_BW / wbytes
        row = {"format": fmt, "batch": batch, "tok_s": rate, "weight_bytes": wbytes, "roofline_tok_s": roof,
               "frac_roofline": rate / roof, "roofline_tok_s_h100": roof_h100, "frac_roofline_h100": rate / roof_h100,
               "cuda_graph": graphed, "linear_paths": linear_paths(model),
               # FP8: whether blockwise torch._scaled_mm served (False: the Triton GEMM took over)
               "scaled_mm_ok": {b: ok for (_, _, b), ok in dispatch._SCALED_MM_OK.items()}}  # fmt: skip
        if set(row["linear_paths"]) - {"fast"} or (graphed != (not args.no_cuda_graph)):
            print(f"  note: {fmt} batch {batch}: linear paths {row['linear_paths']}, CUDA graphs {graphed}")
        if hf is not None and batch in hf_batches:
            row["hf_tok_s"] = hf_rate(hf, prompts, args)
        rows.append(row)
        hf_s = f", transformers {row['hf_tok_s']:.1f} tok/s" if "hf_tok_s" in row else ""
        print(f"  {fmt:5s} batch {batch:4d}: {rate:10.1f} tok/s ({rate / roof:6.1%} of the measured roofline, "
              f"{rate / roof_h100:6.1%} of the H100's){hf_s}", flush=True)  # fmt: skip


def add_speedups(rows: list[dict]) -> None:
    bf16 = {r["batch"]: r["tok_s"] for r in rows if r["format"] == "bf16"}
    hf = {r["batch"]: r["hf_tok_s"] for r in rows if "hf_tok_s" in r}
    for r in rows:
        if r["batch"] in hf:
            r["speedup_vs_hf"] = r["tok_s"] / hf[r["batch"]]
        if r["batch"] in bf16:
            r["speedup_vs_bf16"] = r["tok_s"] / bf16[r["batch"]]


def print_table(rows: list[dict], args, roof: dict, model_name: str) -> None:
    mode = "eager" if args.no_cuda_graph else "CUDA graphs"
    print(f"\n{model_name}, random weights, prompt {args.prompt_len}, decode {args.n_short}->{args.n_long} "
          f"tokens, {mode}; roofline = weight bytes / copy bandwidth")  # fmt: skip
    print(describe_roofline(roof))
    print(f"{'format':<7}{'batch':>6}{'tok/s':>12}{'roofline':>12}{'% roof':>8}{'% H100':>8}{'HF tok/s':>11}{'x HF':>8}"
          f"{'x BF16':>8}{'weights MB':>12}")  # fmt: skip
    for r in rows:
        hf_s = f"{r['hf_tok_s']:>11.1f}" if "hf_tok_s" in r else f"{'':>11}"
        x_hf = f"{r['speedup_vs_hf']:>8.1f}" if "speedup_vs_hf" in r else f"{'':>8}"
        x_bf = f"{r['speedup_vs_bf16']:>8.2f}" if "speedup_vs_bf16" in r else f"{'':>8}"
        print(f"{r['format']:<7}{r['batch']:>6} {r['tok_s']:>11.1f} {r['roofline_tok_s']:>11.1f}"
              f"{r['frac_roofline']:>8.1%}{r['frac_roofline_h100']:>8.1%}{hf_s}{x_hf}{x_bf}"
              f"{r['weight_bytes'] / 1e6:>12.1f}")  # fmt: skip


def evaluate_targets(rows: list[dict]) -> dict:
    """Issue 4's targets; "% of roofline" against the bandwidth measured on this device."""
    targets = {}
    b1 = {r["format"]: r for r in rows if r["batch"] == 1}
    if "bf16" in b1:
        targets["bf16_b1_ge_50pct_measured_roofline"] = b1["bf16"]["frac_roofline"] >= 0.5
        if "speedup_vs_hf" in b1["bf16"]:
            targets["bf16_b1_ge_20x_hf"] = b1["bf16"]["speedup_vs_hf"] >= 20
        if "int4" in b1:
            targets["int4_b1_ge_1.8x_bf16"] = b1["int4"]["speedup_vs_bf16"] >= 1.8
    return targets


def main() -> int:
    args = build_parser().parse_args()
    if args.smoke:
        apply_smoke(args)
    rc = smoke_or_cuda(args, "tiny model on CPU, eager decode", "bench/rollout_gpu.py measures GPU decode "
                       "throughput and needs a CUDA device (the issue's targets are for an H100)")  # fmt: skip
    if rc is not None:
        return rc
    torch.manual_seed(0)
    device = "cpu" if args.smoke else "cuda"
    config = SMOKE_CONFIG if args.smoke else QWEN3_06B
    roof = roofline(device, smoke=args.smoke)
    print(describe_roofline(roof), flush=True)
    rows: list[dict] = []
    errors: dict = {}
    interrupted = False
    try:  # SIGINT (the session's step timeout): keep the rows measured so far
        measure(args, config, device, roof["measured_copy_Bps"], rows, errors)
    except KeyboardInterrupt:
        interrupted = True
        print(f"interrupted: writing the {len(rows)} rows measured so far", flush=True)
    add_speedups(rows)
    print_table(rows, args, roof, "smoke model (tiny)" if args.smoke else "Qwen3-0.6B shapes")
    targets = evaluate_targets(rows)
    for name, ok in targets.items():
        print(f"{'smoke (meaningless): ' if args.smoke else ''}target {name}: {'met' if ok else 'NOT met'}")
    path = write_results("rollout_gpu", {
        "roofline": roof,
        "model": {"config": config, "weights": "random (build_model + random_init_, seed 0)"},
        "method": {"prompt_len": args.prompt_len, "n_short": args.n_short, "n_long": args.n_long,
                   "repeats": args.repeats, "cuda_graph": not args.no_cuda_graph,
                   "hf_batches": sorted(set(args.batches if args.hf_batches is None else args.hf_batches)),
                   "roofline": "batch * copy bandwidth / weight bytes; frac_roofline: measured bandwidth (targets), "
                   "frac_roofline_h100: 3.0 TB/s",
                   "sampling": "temperature 1.0, no top-k/top-p, no stop tokens"},
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
