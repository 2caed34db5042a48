"""BF16 -> NVFP4 weight-only checkpoints (``quantrl convert nvfp4``), round to nearest, streaming.

Output is compressed-tensors ``nvfp4-pack-quantized`` (the NVFP4A16 preset): per quantized Linear
``weight_packed`` uint8 [N, K/2], ``weight_scale`` e4m3 [N, K/16] and ``weight_global_scale`` fp32 [1],
numbers from ``quantrl.formats.nvfp4``. vLLM serves it (FP4 GEMMs on Blackwell, weight-only below) and
transformers loads it through compressed-tensors; quantrl's engine runs it weight-only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from quantrl.checkpoint.convert_common import ConvertReport, write_converted
from quantrl.checkpoint.layout import ensure_unquantized, is_quantizable, kept_modules, load_config, module_of
from quantrl.checkpoint.quant_config import ct_nvfp4_config
from quantrl.checkpoint.safetensors_io import CheckpointError, SafetensorsDir, TensorSpec
from quantrl.checkpoint.stream import Job, copy_job
from quantrl.formats.nvfp4 import GROUP, SCALE_DTYPE, pack_nvfp4, quantize_nvfp4


@dataclass(frozen=True)
class Nvfp4ConvertOptions:
    max_workers: int = 1
    "tensors converted in parallel"
    device: str = "cpu"
    "where quantization runs (cpu or cuda)"
    overwrite: bool = False
    "replace an existing non-empty output directory"
    max_shard_bytes: int = 5 * 1024**3
    "size limit of one output safetensors shard"


def nvfp4_tensors(module: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """A Linear's ``[N, K]`` weight -> its three checkpoint tensors (CPU)."""
    codes, scale, gs = quantize_nvfp4(w)
    return {f"{module}.weight_packed": pack_nvfp4(codes).cpu(), f"{module}.weight_scale": scale.cpu(),
            f"{module}.weight_global_scale": gs.cpu()}  # fmt: skip


def convert_to_nvfp4(input_dir: str | Path, output_dir: str | Path, opts: Nvfp4ConvertOptions = Nvfp4ConvertOptions(),
                     *, progress: bool = True) -> ConvertReport:  # fmt: skip
    config = load_config(input_dir)
    reader = SafetensorsDir(input_dir)
    ensure_unquantized(config, reader, input_dir)
    targets = [n for n, i in reader.infos.items() if is_quantizable(n, i.shape)]
    if not targets:
        raise CheckpointError(f"{input_dir}: no Linear weights to quantize")
    bad = [f"{n} {list(reader.infos[n].shape)}" for n in targets if reader.infos[n].shape[1] % GROUP]
    if bad:
        raise CheckpointError(f"{input_dir}: {len(bad)} Linear weight(s) have K not divisible by {GROUP}, e.g. {bad[:3]}")

    def job(name: str) -> Job:
        n, k = reader.infos[name].shape
        m = module_of(name)
        outputs = (TensorSpec(f"{m}.weight_packed", torch.uint8, (n, k // 2)),
                   TensorSpec(f"{m}.weight_scale", SCALE_DTYPE, (n, k // GROUP)),
                   TensorSpec(f"{m}.weight_global_scale", torch.float32, (1,)))  # fmt: skip
        return Job(name, outputs, lambda w: nvfp4_tensors(m, w))

    target_set = set(targets)
    jobs = [job(n) if n in target_set else copy_job(reader, n) for n in reader.names()]
    qc = ct_nvfp4_config(kept_modules(reader))
    out_config = {**config, "quantization_config": qc, "quantrl_quantization": {"method": "rtn", "format": "nvfp4"}}
    return write_converted(
        input_dir, output_dir, reader, out_config, jobs,
        overwrite=opts.overwrite, max_workers=opts.max_workers, device=opts.device,
        desc="nvfp4 rtn", max_shard_bytes=opts.max_shard_bytes, progress=progress,
    )
