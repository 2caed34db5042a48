"""Which tensors of a HF checkpoint are quantized, and what the quantized tensors are called.

Rule (slime's, made explicit): a 2-D ``*.weight`` of a Linear layer is quantized; embeddings,
``lm_head``, norms and MoE routers (``mlp.gate``, ``router``, ``shared_expert_gate``) stay in their
original precision, because they are small, precision-sensitive, or not GEMMs in the engine.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from quantrl.checkpoint.safetensors_io import CheckpointError, SafetensorsDir

KEEP_LEAVES = {"lm_head", "embed_tokens", "wte", "wpe", "embed_out", "gate", "router", "shared_expert_gate", "score"}
QUANTIZED_SUFFIXES = (".weight_scale_inv", ".weight_scale", ".weight_packed", ".weight_zero_point", ".input_scale")


def module_of(weight_name: str) -> str:
    return weight_name.removesuffix(".weight")


def is_quantizable(name: str, shape: tuple[int, ...]) -> bool:
    if not name.endswith(".weight") or len(shape) != 2:
        return False
    leaf = module_of(name).rsplit(".", 1)[-1]
    return leaf not in KEEP_LEAVES and "norm" not in leaf and "embed" not in leaf


def kept_modules(reader: SafetensorsDir) -> list[str]:
    """2-D weights left in original precision, as module names (``modules_to_not_convert`` / ``ignore``).

    ``lm_head`` is always listed: a tied checkpoint has no ``lm_head.weight`` but the model has the Linear.
    """
    kept = {module_of(n) for n, i in reader.infos.items() if len(i.shape) == 2 and n.endswith(".weight") and not is_quantizable(n, i.shape)}
    kept.add("lm_head")
    return sorted(kept)


def load_config(model_dir: str | Path) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.exists():
        raise CheckpointError(f"{model_dir}: no config.json (expected a HuggingFace model directory)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def ensure_unquantized(config: dict, reader: SafetensorsDir, model_dir: str | Path) -> None:
    """Refuse to quantize an already-quantized checkpoint (convert it to bf16 first)."""
    qc = config.get("quantization_config")
    if qc:
        raise CheckpointError(
            f"{model_dir}: already quantized (quantization_config.quant_method={qc.get('quant_method')!r}); "
            "run `quantrl convert bf16` first"
        )
    for name, info in reader.infos.items():
        if name.endswith(QUANTIZED_SUFFIXES) or info.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            raise CheckpointError(f"{info.file}: tensor {name!r} ({info.dtype}) looks already quantized; run `quantrl convert bf16` first")
