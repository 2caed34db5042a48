"""Checkpoint conversion throughput and peak memory on CPU.

Generates a Llama-shaped BF16 checkpoint of about 2 GB (random weights, several shards), then runs, each
in a fresh subprocess so that peak RSS is its own:
  floor      read every tensor with ``safetensors.safe_open`` and touch it (no conversion)
  fp8 w1/w2  ``convert_to_fp8`` (128x128 blocks) with 1 and 2 workers
  int4 rtn   ``convert_to_int(method="rtn")`` W4A16 g128
GB/s is input bytes over wall time; peak RSS is the child's high-water mark (reset just before the work
starts) minus its RSS at that moment, i.e. what the conversion itself holds at its peak. Run: ``python bench/convert_cpu.py``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from _common import write_results

CHILD = r"""
import json, sys, time
import torch
from quantrl.checkpoint.convert_fp8 import Fp8ConvertOptions, convert_to_fp8
from quantrl.checkpoint.convert_int import IntConvertOptions, convert_to_int

def status_mb(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024

case, src, dst = sys.argv[1], sys.argv[2], sys.argv[3]
rss_before = status_mb("VmRSS")
with open("/proc/self/clear_refs", "w") as f:  # reset the peak-RSS mark (VmHWM) to the current RSS
    f.write("5")
t0 = time.perf_counter()
if case == "floor":
    from safetensors import safe_open
    from pathlib import Path
    total = 0.0
    for f in sorted(Path(src).glob("*.safetensors")):
        with safe_open(f, "pt") as g:
            for k in g.keys():
                t = g.get_tensor(k)
                total += float(torch.empty_like(t).copy_(t).view(-1)[-1].float())  # read every byte
elif case.startswith("fp8"):
    convert_to_fp8(src, dst, Fp8ConvertOptions(max_workers=int(case[-1])), progress=False)
elif case == "int4_rtn":
    convert_to_int(src, dst, IntConvertOptions(method="rtn", group_size=128), progress=False)
secs = time.perf_counter() - t0
print(json.dumps({"seconds": secs, "peak_rss_MB": status_mb("VmHWM"), "rss_before_MB": rss_before}))
"""


def make_checkpoint(path: Path, layers: int, hidden: int, inter: int, vocab: int) -> int:
    from transformers import LlamaConfig

    from quantrl.checkpoint.safetensors_io import ShardedWriter, TensorSpec

    path.mkdir(parents=True)
    kv = hidden // 4
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=hidden // 128, num_key_value_heads=kv // 128, tie_word_embeddings=False)
    cfg.save_pretrained(path)
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv, hidden),
            p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
            p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
        })
    writer = ShardedWriter(path, [TensorSpec(n, torch.bfloat16, s) for n, s in shapes.items()], max_shard_bytes=500 * 1024**2)
    gen = torch.Generator().manual_seed(0)
    for n, s in shapes.items():
        writer.write(n, (torch.randn(s, generator=gen) * 0.02).bfloat16())
    writer.close()
    return sum(torch.Size(s).numel() * 2 for s in shapes.values())


def run_child(case: str, src: Path, dst: Path) -> dict:
    shutil.rmtree(dst, ignore_errors=True)
    out = subprocess.run([sys.executable, "-c", CHILD, case, str(src), str(dst)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--work-dir", default=None, help="where the generated checkpoint goes (default: a temp dir)")
    args = ap.parse_args()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="quantrl-bench-"))
    src = work / "bf16"
    try:
        nbytes = make_checkpoint(src, args.layers, args.hidden, args.intermediate, args.vocab)
        largest = max(args.vocab * args.hidden, args.intermediate * args.hidden) * 2
        rows = {}
        for case in ("floor", "fp8_w1", "fp8_w2", "int4_rtn"):
            r = run_child(case, src, work / "out")
            rows[case] = {
                "seconds": r["seconds"],
                "GB_per_s": nbytes / 1e9 / r["seconds"],
                "peak_rss_MB": r["peak_rss_MB"],
                "peak_rss_over_start_MB": r["peak_rss_MB"] - r["rss_before_MB"],
            }
        for case, r in rows.items():
            r["vs_floor"] = rows["floor"]["seconds"] / r["seconds"]
        print(f"checkpoint: {nbytes / 1e9:.2f} GB bf16, largest tensor {largest / 1e6:.0f} MB")
        print(f"{'case':<10}{'s':>8}{'GB/s':>8}{'x floor':>9}{'peak RSS over start (MB)':>26}")
        for case, r in rows.items():
            print(f"{case:<10}{r['seconds']:>8.2f}{r['GB_per_s']:>8.2f}{r['vs_floor']:>9.2f}{r['peak_rss_over_start_MB']:>26.0f}")
        path = write_results("convert_cpu", {
            "checkpoint_GB": nbytes / 1e9, "largest_tensor_MB": largest / 1e6,
            "layers": args.layers, "hidden": args.hidden, "intermediate": args.intermediate, "vocab": args.vocab,
            "results": rows,
        })
        print(f"wrote {path}")
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
