"""BF16 -> NVFP4 weight-only checkpoints (``quantrl convert nvfp4``): round to nearest (streaming) or GPTQ
(``--method gptq``: calibrated layer by layer on the NVFP4 grid, ``checkpoint.gptq.gptq_quantize_nvfp4``).

Output is compressed-tensors ``nvfp4-pack-quantized`` (the NVFP4A16 preset): per quantized Linear
``weight_packed`` uint8 [N, K/2], ``weight_scale`` e4m3 [N, K/16] and ``weight_global_scale`` fp32 [1],
numbers from ``quantrl.formats.nvfp4``. vLLM serves it (FP4 GEMMs on Blackwell, weight-only below) and
transformers loads it through compressed-tensors; quantrl's engine runs it weight-only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from quantrl.checkpoint.calibration import GptqCalibrationOptions, gptq_calibration_batches
from quantrl.checkpoint.convert_common import ConvertReport, write_converted
from quantrl.checkpoint.layout import ensure_unquantized, is_quantizable, kept_modules, load_config, module_of
from quantrl.checkpoint.quant_config import ct_nvfp4_config
from quantrl.checkpoint.safetensors_io import CheckpointError, SafetensorsDir, ShardedWriter, TensorSpec
from quantrl.checkpoint.stream import Job, copy_job
from quantrl.formats.nvfp4 import GROUP, SCALE_DTYPE, pack_nvfp4, quantize_nvfp4


@dataclass(frozen=True)
class Nvfp4ConvertOptions(GptqCalibrationOptions):
    method: str = "rtn"
    "rtn (round to nearest, no data) or gptq (calibrated, layer by layer)"
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
    return _checkpoint_tensors(module, *quantize_nvfp4(w))


def _checkpoint_tensors(module: str, codes: torch.Tensor, scale: torch.Tensor, gs: torch.Tensor) -> dict[str, torch.Tensor]:
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

    if opts.method not in ("gptq", "rtn"):
        raise ValueError(f"--method must be gptq or rtn, got {opts.method!r}")

    def specs(name: str) -> tuple[TensorSpec, ...]:
        n, k = reader.infos[name].shape
        m = module_of(name)
        return (TensorSpec(f"{m}.weight_packed", torch.uint8, (n, k // 2)),
                TensorSpec(f"{m}.weight_scale", SCALE_DTYPE, (n, k // GROUP)),
                TensorSpec(f"{m}.weight_global_scale", torch.float32, (1,)))  # fmt: skip

    def job(name: str) -> Job:
        return Job(name, specs(name), lambda w: nvfp4_tensors(module_of(name), w))

    target_set = set(targets)
    kept = [copy_job(reader, n) for n in reader.names() if n not in target_set]
    extra = extra_specs = None
    provenance: dict = {"method": opts.method, "format": "nvfp4"}
    if opts.method == "rtn":
        jobs = kept + [job(n) for n in targets]
    else:
        jobs = kept
        batches = gptq_calibration_batches(input_dir, opts)
        extra_specs = [s for n in targets for s in specs(n)]
        provenance.update(dampening_frac=opts.dampening_frac, act_order=opts.act_order,
                          num_calibration_samples=opts.num_calibration_samples,
                          max_sequence_length=opts.max_sequence_length)  # fmt: skip

        def extra(writer: ShardedWriter) -> None:
            from quantrl.checkpoint.gptq_model import gptq_quantize_layers_nvfp4

            done: set[str] = set()
            for name, codes, scale, gs in gptq_quantize_layers_nvfp4(
                input_dir, reader, target_set, batches, dampening_frac=opts.dampening_frac, act_order=opts.act_order,
                device=opts.device, progress=progress,
            ):  # fmt: skip
                for out_name, t in _checkpoint_tensors(module_of(name), codes, scale, gs).items():
                    writer.write(out_name, t)
                done.add(name)
            for name in targets:  # Linear weights outside the decoder stack: round to nearest
                if name not in done:
                    for out_name, t in nvfp4_tensors(module_of(name), reader.read(name).to(opts.device)).items():
                        writer.write(out_name, t)

    qc = ct_nvfp4_config(kept_modules(reader))
    out_config = {**config, "quantization_config": qc, "quantrl_quantization": provenance}
    return write_converted(
        input_dir, output_dir, reader, out_config, jobs,
        overwrite=opts.overwrite, max_workers=opts.max_workers, device=opts.device,
        desc=f"nvfp4 {opts.method}", max_shard_bytes=opts.max_shard_bytes,
        extra=extra, extra_specs=extra_specs, extra_quantized=len(targets) if extra else 0, progress=progress,
    )
