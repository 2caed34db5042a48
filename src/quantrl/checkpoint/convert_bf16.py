"""FP8 / INT4 / INT8 / NVFP4 -> BF16 (``quantrl convert bf16``): for evaluation, round trips and re-quantizing.

Reads both dialects quantrl writes (``quant_method: fp8`` block checkpoints and compressed-tensors
``float-quantized`` / ``pack-quantized`` / ``nvfp4-pack-quantized``) and dequantizes through ``quantrl.formats``, so the BF16 weights
are exactly what our rollout engine computes with.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from quantrl.checkpoint.convert_common import ConvertReport, write_converted
from quantrl.checkpoint.layout import load_config
from quantrl.checkpoint.safetensors_io import CheckpointError, SafetensorsDir, TensorSpec
from quantrl.checkpoint.stream import Job, copy_job
from quantrl.formats._checks import cdiv
from quantrl.formats.fp8 import FP8_DTYPE, decode_e8m0, dequantize_fp8
from quantrl.formats.int4 import dequantize_int, unpack_int
from quantrl.formats.nvfp4 import dequantize_nvfp4, unpack_nvfp4


@dataclass(frozen=True)
class Bf16ConvertOptions:
    dtype: str = "bfloat16"
    "output dtype of dequantized weights (bfloat16, float16, float32)"
    max_workers: int = 1
    "tensors converted in parallel"
    device: str = "cpu"
    "where dequantization runs"
    overwrite: bool = False
    "replace an existing non-empty output directory"
    max_shard_bytes: int = 5 * 1024**3
    "size limit of one output safetensors shard"


@dataclass(frozen=True)
class _Scheme:
    kind: str  # "fp8" | "int" | "nvfp4"
    scale_suffix: str = ""
    block_size: tuple[int, int] | None = None
    num_bits: int = 4
    group_size: int = 128


def _scheme(config: dict, model_dir: str | Path) -> _Scheme:
    qc = config.get("quantization_config")
    if not qc:
        raise CheckpointError(f"{model_dir}: config.json has no quantization_config; nothing to dequantize")
    method = qc.get("quant_method")
    if method == "fp8":
        bs = qc.get("weight_block_size")
        return _Scheme("fp8", "_scale_inv", tuple(bs) if bs else None)
    if method == "compressed-tensors":
        groups = list((qc.get("config_groups") or {}).values())
        if len(groups) != 1 or not groups[0].get("weights"):
            raise CheckpointError(f"{model_dir}: only single-group compressed-tensors configs are supported")
        w = groups[0]["weights"]
        if qc.get("format") == "float-quantized" and w.get("type") == "float":
            bs = w.get("block_structure")
            return _Scheme("fp8", "_scale", tuple(bs) if w.get("strategy") == "block" else None)
        if qc.get("format") == "mxfp8-quantized" and w.get("type") == "float":
            return _Scheme("fp8", "_scale", (1, int(w.get("group_size") or 32)))
        if qc.get("format") == "pack-quantized" and w.get("type") == "int" and w.get("strategy") == "group":
            if not w.get("symmetric", True):
                raise CheckpointError(f"{model_dir}: asymmetric (zero-point) int weights are not supported")
            return _Scheme("int", num_bits=int(w["num_bits"]), group_size=int(w["group_size"]))
        if qc.get("format") == "nvfp4-pack-quantized" and w.get("type") == "float":
            return _Scheme("nvfp4")
        raise CheckpointError(f"{model_dir}: unsupported compressed-tensors format {qc.get('format')!r} / weights {w}")
    raise CheckpointError(f"{model_dir}: unsupported quant_method {method!r}")


def convert_to_bf16(model_dir: str | Path, save_dir: str | Path, opts: Bf16ConvertOptions = Bf16ConvertOptions(), *, progress: bool = True) -> ConvertReport:
    dtype = getattr(torch, opts.dtype, None)
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"--dtype must be bfloat16, float16 or float32, got {opts.dtype!r}")
    config = load_config(model_dir)
    scheme = _scheme(config, model_dir)
    reader = SafetensorsDir(model_dir)
    infos = reader.infos
    jobs: list[Job] = []
    consumed: set[str] = set()

    for name, info in infos.items():
        if scheme.kind == "fp8" and info.dtype == FP8_DTYPE:
            scale_name = name + scheme.scale_suffix
            if scale_name not in infos:
                raise CheckpointError(f"{info.file}: FP8 tensor {name!r} has no {scale_name!r}")
            n, k = info.shape
            sshape = infos[scale_name].shape
            bs = scheme.block_size
            if bs is not None and tuple(sshape) != (cdiv(n, bs[0]), cdiv(k, bs[1])):
                bs = None  # per-channel / per-tensor scale stored under a block config: read from its shape

            def fp8_transform(q: torch.Tensor, scale_name: str = scale_name, bs=bs) -> dict[str, torch.Tensor]:
                s = reader.read(scale_name).to(q.device)
                s = decode_e8m0(s) if s.dtype == torch.uint8 else s  # MXFP8: E8M0 bytes
                return {q_name(scale_name, scheme.scale_suffix): dequantize_fp8(q, s, bs, dtype)}

            jobs.append(Job(name, (TensorSpec(name, dtype, info.shape),), fp8_transform))
            consumed.add(scale_name)
        elif scheme.kind == "int" and name.endswith(".weight_packed"):
            m = name[: -len(".weight_packed")]
            scale_name, shape_name = f"{m}.weight_scale", f"{m}.weight_shape"
            for needed in (scale_name, shape_name):
                if needed not in infos:
                    raise CheckpointError(f"{info.file}: packed tensor {name!r} has no {needed!r}")
            n, k = (int(v) for v in reader.read(shape_name).tolist())

            def int_transform(p: torch.Tensor, m: str = m, k: int = k) -> dict[str, torch.Tensor]:
                q = unpack_int(p.cpu(), k, scheme.num_bits).to(p.device)
                s = reader.read(f"{m}.weight_scale").to(p.device)
                return {f"{m}.weight": dequantize_int(q, s, scheme.group_size, dtype)}

            jobs.append(Job(name, (TensorSpec(f"{m}.weight", dtype, (n, k)),), int_transform))
            consumed.update((scale_name, shape_name))
        elif scheme.kind == "nvfp4" and name.endswith(".weight_packed"):
            m = name[: -len(".weight_packed")]
            for needed in (f"{m}.weight_scale", f"{m}.weight_global_scale"):
                if needed not in infos:
                    raise CheckpointError(f"{info.file}: packed tensor {name!r} has no {needed!r}")

            def fp4_transform(p: torch.Tensor, m: str = m) -> dict[str, torch.Tensor]:
                s, gs = (reader.read(f"{m}.{t}").to(p.device) for t in ("weight_scale", "weight_global_scale"))
                return {f"{m}.weight": dequantize_nvfp4(unpack_nvfp4(p), s, gs, dtype)}

            jobs.append(Job(name, (TensorSpec(f"{m}.weight", dtype, (info.shape[0], 2 * info.shape[1])),), fp4_transform))
            consumed.update((f"{m}.weight_scale", f"{m}.weight_global_scale"))
    if not jobs:
        raise CheckpointError(f"{model_dir}: no quantized weights found for {scheme.kind} config")
    sources = {j.source for j in jobs}
    rest = [n for n in infos if n not in consumed and n not in sources]
    unknown = [n for n in rest if n.endswith(".weight_g_idx") or (infos[n].dtype.is_floating_point
                                                                   and infos[n].dtype.itemsize == 1)]  # fmt: skip
    if unknown:  # copied as they are, they would be silently wrong weights in a "bf16" checkpoint
        raise CheckpointError(f"{model_dir}: {len(unknown)} tensor(s) this {scheme.kind} dequantizer does not "
                              f"understand (act-order g_idx, other fp8 formats), e.g. {unknown[:3]}")  # fmt: skip
    # activation / KV-cache scales mean nothing without quantization: a strict loader would reject them
    rest = [n for n in rest if not n.endswith(ACTIVATION_SCALE_SUFFIXES)]
    jobs += [copy_job(reader, n) for n in rest]  # kept tensors keep their dtype (--dtype is the dequantized one)
    out_config = {k: v for k, v in config.items() if k not in ("quantization_config", "quantrl_quantization")}
    for key in [k for k in ("dtype", "torch_dtype") if k in config] or ["torch_dtype"]:
        out_config[key] = opts.dtype
    return write_converted(
        model_dir, save_dir, reader, out_config, jobs,
        overwrite=opts.overwrite, max_workers=opts.max_workers, device=opts.device,
        desc=f"dequantize -> {opts.dtype}", max_shard_bytes=opts.max_shard_bytes, progress=progress,
    )


ACTIVATION_SCALE_SUFFIXES = (".input_scale", ".input_global_scale", ".k_scale", ".v_scale")


def q_name(scale_name: str, suffix: str) -> str:
    """``X.weight_scale_inv`` -> ``X.weight``."""
    return scale_name[: -len(suffix)]
