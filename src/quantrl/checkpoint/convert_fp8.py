"""BF16 -> FP8 e4m3 checkpoint conversion (``quantrl convert fp8``), streaming, any device.

``--format mxfp8`` writes MXFP8 (compressed-tensors ``mxfp8-quantized``): 1×32 blocks, power-of-two
scales stored as E8M0 bytes, dynamic 1×32 activations; it fixes the strategy, block size and scale format.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from quantrl.checkpoint.convert_common import ConvertReport, write_converted
from quantrl.checkpoint.layout import ensure_unquantized, is_quantizable, kept_modules, load_config
from quantrl.checkpoint.quant_config import ct_fp8_config, ct_mxfp8_config, fp8_block_config
from quantrl.checkpoint.safetensors_io import CheckpointError, SafetensorsDir, TensorSpec
from quantrl.checkpoint.stream import Job, copy_job
from quantrl.formats._checks import cdiv, check_block_size
from quantrl.formats.fp8 import FP8_DTYPE, MXFP8_BLOCK, MXFP8_SCALE_FMT, encode_e8m0, quantize_fp8


@dataclass(frozen=True)
class Fp8ConvertOptions:
    strategy: str = "block"
    "block | channel | tensor: granularity of the fp32 scales"
    block_size: tuple[int, int] = (128, 128)
    "weight block (rows, cols) for the block strategy"
    scale_fmt: str | None = None
    "None, or 'ue8m0' to round block scales up to powers of two (DeepGEMM)"
    fmt: str = "auto"
    "output dialect: 'fp8' (DeepSeek/slime style), 'compressed-tensors' (float-quantized), 'mxfp8', or auto"
    max_workers: int = 1
    "tensors converted in parallel"
    device: str = "cpu"
    "where quantization runs (cpu or cuda)"
    overwrite: bool = False
    "replace an existing non-empty output directory"
    max_shard_bytes: int = 5 * 1024**3
    "size limit of one output safetensors shard"


def resolve_format(opts: Fp8ConvertOptions) -> str:
    fmt = opts.fmt
    if fmt == "auto":
        fmt = "fp8" if opts.strategy == "block" else "compressed-tensors"
    if fmt not in ("fp8", "compressed-tensors", "mxfp8"):
        raise ValueError(f"--format must be auto, fp8, compressed-tensors or mxfp8, got {fmt!r}")
    if fmt == "fp8" and opts.strategy != "block":
        raise ValueError("the 'fp8' dialect stores 128x128 block scales only; use --format compressed-tensors for channel/tensor")
    if fmt == "compressed-tensors" and opts.scale_fmt:
        raise ValueError("--scale-fmt ue8m0 is only expressible in the 'fp8' dialect")
    if opts.strategy == "block" and fmt != "mxfp8":
        check_block_size(opts.block_size)  # before planning divides by it
    return fmt


def scale_shape(strategy: str, block_size: tuple[int, int], shape: tuple[int, ...]) -> tuple[int, ...]:
    n, k = shape
    if strategy == "block":
        return (cdiv(n, block_size[0]), cdiv(k, block_size[1]))
    return (n, 1) if strategy == "channel" else (1,)


def convert_to_fp8(model_dir: str | Path, save_dir: str | Path, opts: Fp8ConvertOptions = Fp8ConvertOptions(), *, progress: bool = True) -> ConvertReport:
    fmt = resolve_format(opts)
    mx = fmt == "mxfp8"
    if mx:
        opts = dataclasses.replace(opts, strategy="block", block_size=MXFP8_BLOCK, scale_fmt=MXFP8_SCALE_FMT)
    config = load_config(model_dir)
    reader = SafetensorsDir(model_dir)
    ensure_unquantized(config, reader, model_dir)
    scale_suffix = "_scale_inv" if fmt == "fp8" else "_scale"
    if mx:  # compressed-tensors' group strategy needs whole groups
        bad = [f"{n} {list(i.shape)}" for n, i in reader.infos.items() if is_quantizable(n, i.shape) and i.shape[1] % MXFP8_BLOCK[1]]
        if bad:
            raise CheckpointError(f"{model_dir}: {len(bad)} Linear weight(s) have K not divisible by {MXFP8_BLOCK[1]}, "
                                  f"e.g. {bad[:3]}")  # fmt: skip

    def make_job(name: str) -> Job:
        info = reader.infos[name]
        if not is_quantizable(name, info.shape):
            return copy_job(reader, name)
        scale_name = name + scale_suffix

        def transform(w: torch.Tensor) -> dict[str, torch.Tensor]:
            q, s = quantize_fp8(w, opts.strategy, opts.block_size, opts.scale_fmt)
            return {name: q, scale_name: encode_e8m0(s) if mx else s}

        outputs = (
            TensorSpec(name, FP8_DTYPE, info.shape),
            TensorSpec(scale_name, torch.uint8 if mx else torch.float32, scale_shape(opts.strategy, opts.block_size, info.shape)),
        )
        return Job(name, outputs, transform)

    jobs = [make_job(n) for n in reader.names()]
    kept = kept_modules(reader)
    if fmt == "fp8":
        qc = fp8_block_config(opts.block_size, kept, opts.scale_fmt)
    elif mx:
        qc = ct_mxfp8_config(kept)
    else:
        qc = ct_fp8_config(opts.strategy, opts.block_size, kept)
    return write_converted(
        model_dir, save_dir, reader, {**config, "quantization_config": qc}, jobs,
        overwrite=opts.overwrite, max_workers=opts.max_workers, device=opts.device,
        desc="mxfp8" if mx else f"fp8 {opts.strategy}", max_shard_bytes=opts.max_shard_bytes, progress=progress,
    )
