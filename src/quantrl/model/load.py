"""Build a ``Decoder`` from a config, or load one from a HF directory (BF16, FP8, INT4/INT8).

The Linear variant of every module follows ``quantization_config`` (``QuantScheme.from_hf``); tensors
are read one at a time with ``SafetensorsDir`` and copied into the preallocated modules, so peak memory
is the model plus one tensor. Every expected tensor must be present and every stored tensor must be
used (a stale or foreign checkpoint fails by name instead of running with zeros).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path

import torch

from quantrl.checkpoint.layout import load_config
from quantrl.checkpoint.safetensors_io import CheckpointError, SafetensorsDir
from quantrl.model.config import ModelConfig
from quantrl.model.decoder import Decoder
from quantrl.model.linear import WeightSpec
from quantrl.model.moe import KEEP_FP32
from quantrl.model.quant_scheme import QuantScheme
from quantrl.model.state import linear_modules, tensor_index
from quantrl.model.tensor_parallel import TPContext, local_tensor

HIGH_PRECISION = (torch.float32, torch.bfloat16, torch.float16)
# Stored by some exporters, recomputed by every loader.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
# NVFP4 W4A4 checkpoints calibrate a static activation global scale; the weight-only engine never uses it
NVFP4_ACT_SUFFIXES = (".input_global_scale",)
# an FP8 KV cache's fixed per-layer scales (llm-compressor's kv_cache_scheme; SGLang and vLLM read them)
KV_SCALE_SUFFIXES = (".self_attn.k_scale", ".self_attn.v_scale")


def build_model(config: ModelConfig | dict, quant_scheme: QuantScheme | dict | None = None,
                dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu",
                tp: TPContext | None = None) -> Decoder:  # fmt: skip
    """A decoder with the given structure and zero weights (norms at 1, scales at 1); load it or
    ``quantrl.model.random_init.random_init_`` it. ``config`` / ``quant_scheme`` may be HF dicts (``config.json`` /
    ``quantization_config``). ``tp``: this rank's shard of a tensor-parallel model."""
    cfg = config if isinstance(config, ModelConfig) else ModelConfig.from_hf(config)
    scheme = quant_scheme if isinstance(quant_scheme, QuantScheme) else QuantScheme.from_hf(quant_scheme)
    with torch.no_grad():
        return Decoder(cfg, scheme, dtype, device, tp).eval()


def _scale_dtype(scheme: QuantScheme, reader: SafetensorsDir) -> QuantScheme:
    """Keep scales in the dtype the checkpoint stores them in (converting would change the numbers)."""
    if scheme.method in ("none", "nvfp4") or scheme.is_mxfp8:  # NVFP4 / MXFP8 scales: e4m3 / E8M0 by definition
        return scheme
    suffix = "." + ("weight_scale" if scheme.method == "int" else scheme.scale_suffix)
    dtypes = {i.dtype for n, i in reader.infos.items() if n.endswith(suffix)}
    if len(dtypes) > 1:
        raise CheckpointError(f"{reader.dir}: {suffix[1:]} tensors have mixed dtypes {sorted(map(str, dtypes))}")
    if not dtypes:
        return scheme
    (dt,) = dtypes
    if dt not in HIGH_PRECISION:
        raise CheckpointError(f"{reader.dir}: {suffix[1:]} tensors are {dt}, expected a float dtype")
    return dataclasses.replace(scheme, scale_dtype=dt)


def _coerce(name: str, t: torch.Tensor, spec: WeightSpec, model_dtype: torch.dtype, where: Path,
            keep_fp32: bool = False) -> torch.Tensor:  # fmt: skip
    """Check one checkpoint tensor against what the module holds; cast only high-precision parameters
    (``keep_fp32``: one the model keeps in fp32, such as DeepSeek-V3's router, from any float dtype)."""
    if tuple(t.shape) != spec.shape:
        raise CheckpointError(
            f"{where}: tensor {name!r} has shape {list(t.shape)}, the model expects {list(spec.shape)}"
        )
    if t.dtype == spec.dtype:
        return t
    if (spec.dtype == model_dtype or keep_fp32) and t.dtype in HIGH_PRECISION:
        return t.to(spec.dtype)  # e.g. a bf16 checkpoint loaded in fp32
    if spec.dtype == torch.int64 and t.dtype == torch.int32 and name.endswith(".weight_shape"):
        return t.to(torch.int64)
    raise CheckpointError(f"{where}: tensor {name!r} is {t.dtype}, the model expects {spec.dtype}")


def load_model(
    path: str | os.PathLike, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu",
    tp: TPContext | None = None,
) -> Decoder:
    """Load a HF model directory (config.json + safetensors) into our decoder (with ``tp``: this rank's shard)."""
    path = Path(path)
    config = load_config(path)
    try:
        cfg = ModelConfig.from_hf(config)
        scheme = QuantScheme.from_hf(config.get("quantization_config"))
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path / 'config.json'}: {e}") from None
    reader = SafetensorsDir(path)
    model = build_model(cfg, _scale_dtype(scheme, reader), dtype, device, tp)
    index = tensor_index(model)
    stored = set(reader.names())
    ignored = IGNORED_SUFFIXES + KV_SCALE_SUFFIXES + (NVFP4_ACT_SUFFIXES if scheme.method == "nvfp4" else ())
    missing = [n for n, (u, a) in index.items() if n not in stored and not u.specs[a].optional]
    foreign = model.foreign_experts()  # expert parallelism: other ranks' experts, stored here too
    # DeepSeek-V3's multi-token-prediction layers follow the decoder's; like transformers, sampling skips them
    mtp = tuple(f"model.layers.{cfg.num_layers + i}." for i in range(cfg.mtp_layers))
    unexpected = [n for n in stored if n not in index and not n.endswith(ignored) and not model.is_foreign(n, foreign)
                  and not (mtp and n.startswith(mtp)) and not (n == "lm_head.weight" and cfg.tie_word_embeddings)]  # fmt: skip
    if mtp and any(n.startswith(mtp) for n in stored):
        warnings.warn(f"{path}: its {cfg.mtp_layers} multi-token-prediction layer(s) are not used (next-token "
                      "decoding only)", stacklevel=2)  # fmt: skip
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: checkpoint does not match a {cfg.model_type} model with {scheme.method} Linears: "
            f"{len(missing)} missing tensor(s) {sorted(missing)[:4]}, "
            f"{len(unexpected)} unexpected {sorted(unexpected)[:4]}"
        )
    with torch.no_grad():
        for name, (unit, attr) in index.items():
            if name not in stored:
                continue
            t = local_tensor(unit, attr, reader.read(name), name)  # with tp: this rank's piece
            t = _coerce(name, t, unit.specs[attr], dtype, path, getattr(unit.tensor(attr), KEEP_FP32, False))
            if attr == "weight_shape" and t.tolist() != list(unit.tensor(attr).tolist()):
                expected = unit.tensor(attr).tolist()
                raise CheckpointError(f"{path}: {name!r} says {t.tolist()}, the model expects {expected}")
            unit.tensor(attr).copy_(t)
        for lin in linear_modules(model).values():
            lin.post_process_weights()
        _load_kv_scales(model, reader, [n for n in stored if n.endswith(KV_SCALE_SUFFIXES)], path)
    return model


def _load_kv_scales(model: Decoder, reader: SafetensorsDir, names: list[str], where: Path) -> None:
    """A checkpoint's per-layer ``k_scale`` / ``v_scale`` into the layers' FP8 KV-cache scales."""
    try:
        model.set_kv_scales({n: reader.read(n) for n in names})
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None
