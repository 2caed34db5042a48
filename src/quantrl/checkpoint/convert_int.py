"""BF16 -> INT4 / INT8 weight-only checkpoints (``quantrl convert int4``): RTN or GPTQ, written in
compressed-tensors ``pack-quantized`` form (``weight_packed`` int32, ``weight_scale`` bf16,
``weight_shape``), which SGLang, vLLM and transformers load.

RTN streams tensor by tensor like the FP8 converter. GPTQ runs the model one decoder layer at a time
(``gptq_model``) and writes each layer's packed weights as soon as they exist.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from quantrl.checkpoint.calibration import GptqCalibrationOptions, gptq_calibration_batches
from quantrl.checkpoint.convert_common import ConvertReport, write_converted
from quantrl.checkpoint.layout import ensure_unquantized, is_quantizable, kept_modules, load_config, module_of
from quantrl.checkpoint.quant_config import ct_int_config
from quantrl.checkpoint.safetensors_io import CheckpointError, SafetensorsDir, ShardedWriter, TensorSpec
from quantrl.checkpoint.stream import Job, copy_job
from quantrl.formats._checks import cdiv
from quantrl.formats.int4 import pack_int, quantize_int

QUANT_TYPES = {"W4A16": 4, "W8A16": 8}


@dataclass(frozen=True)
class IntConvertOptions(GptqCalibrationOptions):
    method: str = "gptq"
    "gptq (calibrated, layer by layer) or rtn (round to nearest, no data)"
    quant_type: str = "W4A16"
    "W4A16 (int4) or W8A16 (int8) weights, bf16 activations"
    group_size: int = 128
    "input channels per scale"
    qmax: int = 7
    "7: s=absmax/7, q in [-7,7] (slime/Kimi QAT); 8: s=absmax/7.5, q in [-8,7] (compressed-tensors). int8: 127/128"
    max_workers: int = 1
    "tensors converted in parallel (RTN and copies)"
    device: str = "cpu"
    "where quantization (and GPTQ's forward passes) run"
    overwrite: bool = False
    "replace an existing non-empty output directory"
    max_shard_bytes: int = 5 * 1024**3
    "size limit of one output safetensors shard"


def _num_bits(opts: IntConvertOptions) -> int:
    if opts.quant_type not in QUANT_TYPES:
        raise ValueError(f"--quant-type must be one of {sorted(QUANT_TYPES)}, got {opts.quant_type!r}")
    return QUANT_TYPES[opts.quant_type]


def _qmax(opts: IntConvertOptions, num_bits: int) -> int:
    # --qmax 7|8 names the convention; for int8 it maps to 127|128
    if num_bits == 8 and opts.qmax in (7, 8):
        return 127 if opts.qmax == 7 else 128
    return opts.qmax


def packed_specs(name: str, shape: tuple[int, ...], num_bits: int, group_size: int) -> tuple[TensorSpec, ...]:
    n, k = shape
    m = module_of(name)
    return (
        TensorSpec(f"{m}.weight_packed", torch.int32, (n, cdiv(k * num_bits, 32))),
        TensorSpec(f"{m}.weight_scale", torch.bfloat16, (n, k // group_size)),
        TensorSpec(f"{m}.weight_shape", torch.int64, (2,)),
    )


def packed_tensors(name: str, q: torch.Tensor, s: torch.Tensor, num_bits: int) -> dict[str, torch.Tensor]:
    m = module_of(name)
    return {
        f"{m}.weight_packed": pack_int(q.cpu(), num_bits),
        f"{m}.weight_scale": s.cpu(),
        f"{m}.weight_shape": torch.tensor(list(q.shape), dtype=torch.int64),
    }


def convert_to_int(
    input_dir: str | Path, output_dir: str | Path, opts: IntConvertOptions = IntConvertOptions(), *, progress: bool = True
) -> ConvertReport:
    num_bits = _num_bits(opts)
    qmax = _qmax(opts, num_bits)
    if opts.method not in ("gptq", "rtn"):
        raise ValueError(f"--method must be gptq or rtn, got {opts.method!r}")
    config = load_config(input_dir)
    reader = SafetensorsDir(input_dir)
    ensure_unquantized(config, reader, input_dir)
    targets = [n for n, i in reader.infos.items() if is_quantizable(n, i.shape)]
    bad = [f"{n} {list(reader.infos[n].shape)}" for n in targets if reader.infos[n].shape[1] % opts.group_size]
    if bad:
        raise CheckpointError(
            f"{input_dir}: {len(bad)} Linear weight(s) have K not divisible by --group-size {opts.group_size}, e.g. {bad[:3]}"
        )
    if not targets:
        raise CheckpointError(f"{input_dir}: no Linear weights to quantize")

    def rtn_job(name: str) -> Job:
        info = reader.infos[name]

        def transform(w: torch.Tensor) -> dict[str, torch.Tensor]:
            q, s = quantize_int(w, num_bits, opts.group_size, qmax)
            return packed_tensors(name, q, s, num_bits)

        return Job(name, packed_specs(name, info.shape, num_bits, opts.group_size), transform)

    target_set = set(targets)  # built once, not once per name (that was O(names x targets))
    kept = [copy_job(reader, n) for n in reader.names() if n not in target_set]
    extra = extra_specs = None
    if opts.method == "rtn":
        jobs = kept + [rtn_job(n) for n in targets]
    else:
        jobs = kept
        batches = gptq_calibration_batches(input_dir, opts)
        extra_specs = [s for n in targets for s in packed_specs(n, reader.infos[n].shape, num_bits, opts.group_size)]

        def extra(writer: ShardedWriter) -> None:
            from quantrl.checkpoint.gptq_model import gptq_quantize_layers

            done: set[str] = set()
            for name, q, s in gptq_quantize_layers(
                input_dir, reader, set(targets), batches, num_bits=num_bits, group_size=opts.group_size, qmax=qmax,
                dampening_frac=opts.dampening_frac, act_order=opts.act_order, device=opts.device, progress=progress,
            ):
                for out_name, t in packed_tensors(name, q, s, num_bits).items():
                    writer.write(out_name, t)
                done.add(name)
            for name in targets:  # Linear weights outside the decoder stack: round to nearest
                if name not in done:
                    job = rtn_job(name)
                    for out_name, t in job.transform(reader.read(name).to(opts.device)).items():
                        writer.write(out_name, t)

    qc = ct_int_config(num_bits, opts.group_size, kept_modules(reader))
    provenance = {"method": opts.method, "qmax": qmax, "group_size": opts.group_size, "num_bits": num_bits}
    if opts.method == "gptq":
        provenance.update(
            dampening_frac=opts.dampening_frac, act_order=opts.act_order,
            num_calibration_samples=opts.num_calibration_samples, max_sequence_length=opts.max_sequence_length,
        )
    out_config = {**config, "quantization_config": qc, "quantrl_quantization": provenance}
    return write_converted(
        input_dir, output_dir, reader, out_config, jobs,
        overwrite=opts.overwrite, max_workers=opts.max_workers, device=opts.device,
        desc=f"{opts.quant_type} {opts.method}", max_shard_bytes=opts.max_shard_bytes,
        extra=extra, extra_specs=extra_specs, extra_quantized=len(targets) if extra else 0, progress=progress,
    )
