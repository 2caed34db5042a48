"""Quantization error of every weight format, against bits per weight (the choice a user makes).

Weights: every quantizable Linear of the embedded model (or ``--model DIR``), and a heavy-tailed random
matrix (normal times exp(normal): a few large outliers per row, where block scales matter). For each format
the fake quantization from ``quantrl.formats`` (exactly what the engine computes with) gives:

    rel_rms     ||W - Q(W)|| / ||W||           (Frobenius, over all Linears together)
    sqnr_db     -20 log10(rel_rms)
    bits        storage bits per weight, scales included (e.g. INT4 g128: 4 + 16/128; NVFP4: 4 + 8/16)

Run: ``python bench/formats_error.py`` (CPU, seconds); writes ``bench/results/formats_error.json`` and a
bar chart next to it.
"""

from __future__ import annotations

import argparse
import math

import torch
from _common import RESULTS, write_results

from quantrl.checkpoint.layout import is_quantizable
from quantrl.checkpoint.safetensors_io import SafetensorsDir
from quantrl.formats import fake_quantize_fp8, fake_quantize_int, fake_quantize_nvfp4

# name -> (fake quant of a bf16 [N, K] weight, storage bits per weight)
FORMATS = {
    "fp8 block128": (lambda w: fake_quantize_fp8(w), 8 + 32 / 128**2),
    "fp8 channel": (lambda w: fake_quantize_fp8(w, "channel"), 8.0),
    "mxfp8 (1x32, e8m0)": (lambda w: fake_quantize_fp8(w, "block", (1, 32), "ue8m0"), 8 + 8 / 32),
    "int8 g128": (lambda w: fake_quantize_int(w, 8, 128, 127), 8 + 16 / 128),
    "int4 g128": (lambda w: fake_quantize_int(w, 4, 128, 7), 4 + 16 / 128),
    "int4 g32": (lambda w: fake_quantize_int(w, 4, 32, 7), 4 + 16 / 32),
    "nvfp4 (g16, e4m3)": (lambda w: fake_quantize_nvfp4(w), 4 + 8 / 16),
}


def weights(model_dir: str | None) -> dict[str, list[torch.Tensor]]:
    from quantrl.rl.pretrain import DEFAULT_MODEL_DIR

    reader = SafetensorsDir(model_dir or DEFAULT_MODEL_DIR)
    model = [reader.read(n).to(torch.bfloat16) for n, i in reader.infos.items() if is_quantizable(n, i.shape)]
    g = torch.Generator().manual_seed(0)
    tailed = (torch.randn(1024, 1024, generator=g) * torch.exp(torch.randn(1024, 1024, generator=g))).bfloat16()
    return {"embedded model": model, "heavy-tailed random": [tailed]}


def error(ws: list[torch.Tensor], fq) -> float:
    num = sum(float((w.float() - fq(w).float()).square().sum()) for w in ws)
    den = sum(float(w.float().square().sum()) for w in ws)
    return math.sqrt(num / den)


def plot(results: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(FORMATS)
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    height = 0.8 / len(results)
    for i, (src, rows) in enumerate(results.items()):
        ys = [j + i * height for j in range(len(names))]
        ax.barh(ys, [rows[n]["sqnr_db"] for n in names], height=height, label=src)
    ax.set_yticks([j + height * (len(results) - 1) / 2 for j in range(len(names))])
    ax.set_yticklabels([f"{n}  [{FORMATS[n][1]:.3g} bits]" for n in names], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("SQNR of the fake-quantized weights (dB), higher is better")
    ax.set_title("weight formats: quantization error at their storage cost")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None, help="HF model dir (default: the embedded model)")
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args()
    results: dict[str, dict] = {}
    for src, ws in weights(args.model).items():
        rows = {}
        for name, (fq, bits) in FORMATS.items():
            rel = error(ws, fq)
            rows[name] = {"bits": bits, "rel_rms": rel, "sqnr_db": -20 * math.log10(rel)}
        results[src] = rows
        print(f"\n{src} ({sum(w.numel() for w in ws) / 1e6:.2f}M weights)")
        print(f"{'format':<22}{'bits/weight':>12}{'rel RMS error':>15}{'SQNR dB':>10}")
        for name, r in rows.items():
            print(f"{name:<22}{r['bits']:>12.3f}{r['rel_rms']:>15.3e}{r['sqnr_db']:>10.1f}")
    if args.no_write:
        return
    path = write_results("formats_error", {"config": vars(args), "results": results})
    RESULTS.joinpath("formats_error").mkdir(exist_ok=True)
    plot(results, RESULTS / "formats_error" / "sqnr.png")
    print(f"wrote {path} and {RESULTS / 'formats_error' / 'sqnr.png'}")


if __name__ == "__main__":
    main()
