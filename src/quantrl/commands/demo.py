"""``quantrl demo``: what each low-precision format does to a small model's weights and logits.

Builds a small Qwen3-shaped transformers model (random init, seeded), fake-quantizes every Linear
weight except ``lm_head`` with each format, and reports the weight error and the logit drift against the
BF16 model on the same random tokens. Runs on CPU in seconds.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch

from quantrl.formats import fake_quantize_fp8, fake_quantize_int4

FORMATS: dict[str, dict] = {
    "fp8-block128": {"kind": "fp8", "strategy": "block"},
    "fp8-block128-ue8m0": {"kind": "fp8", "strategy": "block", "scale_fmt": "ue8m0"},
    "fp8-channel": {"kind": "fp8", "strategy": "channel"},
    "fp8-tensor": {"kind": "fp8", "strategy": "tensor"},
    "int4-g128-qmax7": {"kind": "int4", "group_size": 128, "qmax": 7},
    "int4-g128-qmax8": {"kind": "int4", "group_size": 128, "qmax": 8},
    "int4-g32-qmax7": {"kind": "int4", "group_size": 32, "qmax": 7},
}


@dataclass(frozen=True)
class DemoConfig:
    hidden_size: int = 256
    "model width"
    num_layers: int = 4
    "decoder layers"
    seq_len: int = 64
    "tokens per sequence in the logit comparison"
    batch: int = 4
    "sequences in the logit comparison"
    seed: int = 0
    "seed for weights and tokens"


def build_tiny_qwen3(cfg: DemoConfig):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(cfg.seed)
    config = Qwen3Config(
        vocab_size=1024,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.hidden_size * 3,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    return Qwen3ForCausalLM(config).to(torch.bfloat16).eval()


def fake_quantize(w: torch.Tensor, spec: dict) -> torch.Tensor:
    opts = {k: v for k, v in spec.items() if k != "kind"}
    if spec["kind"] == "fp8":
        return fake_quantize_fp8(w, dtype=w.dtype, **opts)
    return fake_quantize_int4(w, dtype=w.dtype, **opts)


def run_demo(cfg: DemoConfig) -> list[dict]:
    model = build_tiny_qwen3(cfg)
    tokens = torch.randint(0, model.config.vocab_size, (cfg.batch, cfg.seq_len), generator=torch.Generator().manual_seed(cfg.seed))
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")}
    originals = {n: m.weight.detach().clone() for n, m in linears.items()}
    with torch.no_grad():
        ref = model(tokens).logits.float()
        ref_logp = ref.log_softmax(-1)
        rows = []
        for name, spec in FORMATS.items():
            t0 = time.perf_counter()
            num = den = 0.0
            for n, m in linears.items():
                fq = fake_quantize(originals[n], spec)
                num += float((fq.float() - originals[n].float()).pow(2).sum())
                den += float(originals[n].float().pow(2).sum())
                m.weight.copy_(fq)
            quant_s = time.perf_counter() - t0
            logits = model(tokens).logits.float()
            logp = logits.log_softmax(-1)
            kl = float((ref_logp.exp() * (ref_logp - logp)).sum(-1).mean())
            rows.append(
                {
                    "format": name,
                    "weight_rel_rmse": (num / den) ** 0.5,
                    "logit_rel_err": float((logits - ref).norm() / ref.norm()),
                    "kl_bf16_to_q": kl,
                    "top1_agree": float((logits.argmax(-1) == ref.argmax(-1)).float().mean()),
                    "quantize_s": quant_s,
                }
            )
            for n, m in linears.items():
                m.weight.copy_(originals[n])
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'format':<22}{'weight rel RMSE':>16}{'logit rel err':>15}{'KL(bf16||q)':>13}{'top-1 agree':>13}")
    for r in rows:
        print(
            f"{r['format']:<22}{r['weight_rel_rmse']:>16.4%}{r['logit_rel_err']:>15.4%}"
            f"{r['kl_bf16_to_q']:>13.2e}{r['top1_agree']:>13.1%}"
        )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="show what FP8 / INT4 formats do to a small model (CPU, seconds)")
    defaults = DemoConfig()
    for field, default in defaults.__dict__.items():
        p.add_argument(f"--{field.replace('_', '-')}", type=int, default=default)
    p.set_defaults(func=lambda a: _main(a))


def _main(args: argparse.Namespace) -> int:
    cfg = DemoConfig(**{k: getattr(args, k) for k in DemoConfig.__dataclass_fields__})
    print(f"tiny Qwen3 (hidden {cfg.hidden_size}, {cfg.num_layers} layers), every Linear but lm_head fake-quantized:")
    print_table(run_demo(cfg))
    return 0
