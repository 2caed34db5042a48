"""Decode throughput of quantrl's rollout engine (BF16 / FP8 / INT4) on one GPU, next to transformers.

Model: Qwen3-0.6B shapes (hidden 1024, 28 layers, 16 q / 8 kv heads of 128, SwiGLU 3072, vocab 151936,
tied embeddings), random weights from ``build_model`` + ``random_init_``; FP8 and INT4 engines get the
BF16 weights quantized through ``quantrl.formats`` (FP8 128x128 blocks; INT4 group 128). transformers
runs ``Qwen3ForCausalLM.generate`` on the same BF16 weights in the same process.

Decode tokens/s is measured differentially, so prefill cancels out: every sequence generates exactly
N_short, then N_long tokens (no stop tokens), and

    decode tok/s = batch * (N_long - N_short) / (t_long - t_short)      (best of --repeats runs each)

Roofline: a decode step must read every weight once (lm_head included; the embedding only gathers B
rows), so step time >= weight bytes / 3.0e12 B/s (H100 copy bandwidth) and
roofline tok/s = batch * 3.0e12 / weight bytes. It ignores KV-cache reads, so it is a loose bound at
large batch. INT4's bytes are its packed format; note that until the W4A16 kernel lands, our CUDA path
computes from a cached dequantized BF16 weight and reads BF16 bytes.

Targets (issue 4): BF16 batch 1 >= 50% of roofline and >= 20x transformers; INT4 batch 1 >= 1.8x BF16.
Run: ``python bench/rollout_gpu.py`` (needs CUDA; writes bench/results/rollout_gpu.json).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time

import torch

from _common import write_results

COPY_BANDWIDTH = 3.0e12  # bytes/s, H100 SXM copy bandwidth
QWEN3_06B = {
    "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 1024, "intermediate_size": 3072,
    "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
    "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 40960, "tie_word_embeddings": True,
    "hidden_act": "silu", "attention_bias": False,
}  # fmt: skip


def weight_bytes(model) -> int:
    """Bytes one decode step reads: every engine tensor except the embedding, plus lm_head (tied or not)."""
    from quantrl.model import engine_state

    state = engine_state(model)
    total = sum(t.numel() * t.element_size() for n, t in state.items() if n != "model.embed_tokens.weight")
    if "lm_head.weight" not in state:  # tied: lm_head reads the embedding matrix
        w = model.lm_head.weight
        total += w.numel() * w.element_size()
    return total


def sync_time(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def decode_rate(run, batch: int, n_short: int, n_long: int, repeats: int) -> float:
    """Tokens/s of the decode phase from two generate lengths (warm-up run of each first)."""
    run(n_short), run(n_long)
    t_short = min(sync_time(lambda: run(n_short)) for _ in range(repeats))
    t_long = min(sync_time(lambda: run(n_long)) for _ in range(repeats))
    return batch * (n_long - n_short) / max(t_long - t_short, 1e-9)


def engine_rate(model, prompts: list[list[int]], args) -> float:
    from quantrl.rollout import Engine, SamplingParams

    batch, seq_len = len(prompts), args.prompt_len + args.n_long
    engine = Engine(model, kv_cache_tokens=batch * seq_len, max_seq_len=seq_len, max_batch_size=batch,
                    max_prefill_tokens=max(8192, args.prompt_len), use_cuda_graph=not args.no_cuda_graph)  # fmt: skip

    def run(n: int) -> None:
        res = engine.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=n, seed=0))
        assert all(len(r.tokens) == n for r in res)

    rate = decode_rate(run, batch, args.n_short, args.n_long, args.repeats)
    engine.cache.free()
    return rate


def hf_rate(bf16_model, prompts: list[list[int]], args) -> float:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(**{k: v for k, v in QWEN3_06B.items() if k != "model_type"})
    hf = Qwen3ForCausalLM(cfg).to(device="cuda", dtype=torch.bfloat16).eval()
    missing, unexpected = hf.load_state_dict(bf16_model.state_dict(), strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    ids = torch.tensor(prompts, device="cuda")

    def run(n: int) -> None:
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                          max_new_tokens=n, min_new_tokens=n, pad_token_id=0)  # fmt: skip
        assert out.shape[1] == ids.shape[1] + n

    with torch.no_grad():
        rate = decode_rate(run, len(prompts), args.n_short, args.n_long, args.repeats)
    del hf
    return rate


def build(fmt: str):
    from quantrl.model import QuantScheme, build_model, random_init_

    scheme = {"bf16": QuantScheme(), "fp8": QuantScheme.fp8_block(), "int4": QuantScheme.int4(128)}[fmt]
    # same seed: the quantized engines hold the BF16 engine's weights, quantized through formats
    return random_init_(build_model(QWEN3_06B, scheme, dtype=torch.bfloat16, device="cuda"), seed=0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64, 256])
    p.add_argument("--formats", nargs="+", choices=["bf16", "fp8", "int4"], default=["bf16", "fp8", "int4"])
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--n-short", type=int, default=16)
    p.add_argument("--n-long", type=int, default=144)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    p.add_argument("--no-cuda-graph", action="store_true", help="eager decode (to see what CUDA graphs buy)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("bench/rollout_gpu.py measures GPU decode throughput and needs a CUDA device (the issue's targets are "
              "for an H100); no CUDA device is visible, so nothing was measured.", file=sys.stderr)  # fmt: skip
        return 2
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    prompts_all = torch.randint(0, QWEN3_06B["vocab_size"], (max(args.batches), args.prompt_len), generator=g).tolist()
    rows: list[dict] = []
    hf: dict[int, float] = {}
    for fmt in args.formats:
        model = build(fmt)
        wbytes = weight_bytes(model)
        for batch in args.batches:
            prompts = prompts_all[:batch]
            rate = engine_rate(model, prompts, args)
            roof = batch * COPY_BANDWIDTH / wbytes
            row = {"format": fmt, "batch": batch, "tok_s": rate, "weight_bytes": wbytes, "roofline_tok_s": roof,
                   "frac_roofline": rate / roof}  # fmt: skip
            if fmt == "bf16" and not args.no_hf:
                hf[batch] = hf_rate(model, prompts, args)
                row["hf_tok_s"] = hf[batch]
            rows.append(row)
            print(f"  {fmt:5s} batch {batch:4d}: {rate:10.1f} tok/s ({rate / roof:6.1%} of roofline)", flush=True)
        del model
        gc.collect()
        torch.cuda.empty_cache()

    bf16 = {r["batch"]: r["tok_s"] for r in rows if r["format"] == "bf16"}
    for r in rows:
        if r["batch"] in hf:
            r["speedup_vs_hf"] = r["tok_s"] / hf[r["batch"]]
        if r["batch"] in bf16:
            r["speedup_vs_bf16"] = r["tok_s"] / bf16[r["batch"]]

    mode = "eager" if args.no_cuda_graph else "CUDA graphs"
    print(f"\nQwen3-0.6B shapes, random weights, prompt {args.prompt_len}, decode {args.n_short}->{args.n_long} "
          f"tokens, {mode}; roofline = weight bytes / {COPY_BANDWIDTH / 1e12:.1f} TB/s")  # fmt: skip
    print(f"{'format':<7}{'batch':>6}{'tok/s':>12}{'roofline':>12}{'% roof':>8}{'HF tok/s':>11}{'x HF':>8}"
          f"{'x BF16':>8}{'weights MB':>12}")  # fmt: skip
    for r in rows:
        hf_s = f"{r['hf_tok_s']:>11.1f}" if "hf_tok_s" in r else f"{'':>11}"
        x_hf = f"{r['speedup_vs_hf']:>8.1f}" if "speedup_vs_hf" in r else f"{'':>8}"
        x_bf = f"{r['speedup_vs_bf16']:>8.2f}" if "speedup_vs_bf16" in r else f"{'':>8}"
        print(f"{r['format']:<7}{r['batch']:>6}{r['tok_s']:>12.1f}{r['roofline_tok_s']:>12.1f}"
              f"{r['frac_roofline']:>8.1%}{hf_s}{x_hf}{x_bf}{r['weight_bytes'] / 1e6:>12.1f}")  # fmt: skip

    targets = {}
    b1 = {r["format"]: r for r in rows if r["batch"] == 1}
    if "bf16" in b1:
        targets["bf16_b1_ge_50pct_roofline"] = b1["bf16"]["frac_roofline"] >= 0.5
        if "speedup_vs_hf" in b1["bf16"]:
            targets["bf16_b1_ge_20x_hf"] = b1["bf16"]["speedup_vs_hf"] >= 20
        if "int4" in b1:
            targets["int4_b1_ge_1.8x_bf16"] = b1["int4"]["speedup_vs_bf16"] >= 1.8
    for name, ok in targets.items():
        print(f"target {name}: {'met' if ok else 'NOT met'}")
    path = write_results("rollout_gpu", {
        "model": {"config": QWEN3_06B, "weights": "random (build_model + random_init_, seed 0)"},
        "method": {"prompt_len": args.prompt_len, "n_short": args.n_short, "n_long": args.n_long,
                   "repeats": args.repeats, "cuda_graph": not args.no_cuda_graph, "copy_bandwidth_Bps": COPY_BANDWIDTH,
                   "sampling": "temperature 1.0, no top-k/top-p, no stop tokens"},
        "rows": rows,
        "targets": targets,
    })  # fmt: skip
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
