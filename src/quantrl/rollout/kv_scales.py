"""FP8 KV-cache scales: calibrate each layer's static ``k_scale`` / ``v_scale`` and add them to a checkpoint.

An FP8 KV cache (SGLang's / vLLM's ``--kv-cache-dtype fp8_e4m3``, ``quantrl.rollout.kv_cache``) stores
``e4m3(K / k_scale)`` with one fixed scale per layer. Without scales in the checkpoint, engines use 1.0.
That saturates anything past 448 and drops small values into e4m3's subnormals (below 2^-6), where they
keep fewer than 3 mantissa bits. Calibration runs the model over text and takes the largest |K| and |V|
each layer caches: the cached values themselves, K after its norm and RoPE, DeepSeek's latent and roped
key. It then sets ``scale = amax * headroom / 448``. ``headroom`` > 1 leaves range for values that grow
as RL moves the weights: the scales are static, and a value past ``448 * scale`` saturates. vLLM's
on-the-fly scales divide by 200, a headroom of 2.24.

Output: the input checkpoint, tensor for tensor, plus ``model.layers.{i}.self_attn.k_scale`` / ``v_scale``
(fp32, shape [1], llm-compressor's layout). A compressed-tensors config also gets llm-compressor's
``kv_cache_scheme`` (8-bit float, per tensor, static, symmetric).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from quantrl.checkpoint.calibration import GptqCalibrationOptions, gptq_calibration_batches
from quantrl.checkpoint.convert_common import ConvertReport, write_converted
from quantrl.checkpoint.layout import load_config
from quantrl.checkpoint.safetensors_io import SafetensorsDir, TensorSpec
from quantrl.checkpoint.stream import copy_job
from quantrl.formats.fp8 import FP8_MAX
from quantrl.model.decoder import Decoder
from quantrl.model.load import KV_SCALE_SUFFIXES, load_model

KV_CACHE_SCHEME = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}


@dataclass(frozen=True)
class KVScaleOptions:
    data_dir: str = "synthetic"
    "calibration texts: parquet (text column), .txt or .jsonl; 'synthetic' for built-in text"
    num_calibration_samples: int = 64
    "calibration windows"
    max_sequence_length: int = 512
    "tokens per window"
    headroom: float = 1.0
    "scale = amax * headroom / 448: > 1 leaves range for values that grow during RL"
    seed: int = 0
    "window sampling seed"

    def __post_init__(self):
        if not self.headroom >= 1.0:
            raise ValueError(f"headroom must be >= 1 (below 1 the calibration data itself saturates), "
                             f"got {self.headroom}")  # fmt: skip


def calibrate_kv_scales(model: Decoder, batches: list[torch.Tensor], headroom: float = 1.0,
                        progress: bool = True) -> dict[str, torch.Tensor]:  # fmt: skip
    """``{checkpoint name: fp32 [1] scale}`` for every layer's K and V, from full forwards of ``batches``
    (``[B, L]`` token ids, unpadded). An all-zero K or V keeps the scale 1.0."""
    from tqdm.auto import tqdm

    scales = model.kv_scales()
    for s in scales.values():
        s.amax = [torch.zeros((), device=model.device), torch.zeros((), device=model.device)]
    try:
        with torch.no_grad():
            for ids in tqdm(batches, desc="kv-scale calibration", unit="batch", disable=not progress):
                model(ids.to(model.device))
        out = {}
        for prefix, s in scales.items():
            for attr, amax in zip(("k_scale", "v_scale"), s.amax):
                scale = amax.float().cpu() * headroom / FP8_MAX
                out[f"{prefix}.{attr}"] = torch.where(scale > 0, scale, torch.ones_like(scale)).reshape(1)
        return out
    finally:
        for s in scales.values():
            s.amax = None


def add_kv_scales(input_dir: str | Path, output_dir: str | Path, opts: KVScaleOptions = KVScaleOptions(), *,
                  device: str = "cpu", overwrite: bool = False, max_shard_bytes: int = 5 * 10**9,
                  progress: bool = True) -> ConvertReport:  # fmt: skip
    """Copy checkpoint ``input_dir`` (any format quantrl loads) to ``output_dir`` with calibrated FP8
    KV-cache scales (replacing any it had)."""
    input_dir = Path(input_dir)
    config = load_config(input_dir)
    model = load_model(input_dir, dtype=torch.float32, device=device)
    batches = gptq_calibration_batches(input_dir, GptqCalibrationOptions(
        data_dir=opts.data_dir, num_calibration_samples=opts.num_calibration_samples,
        max_sequence_length=opts.max_sequence_length, seed=opts.seed))  # fmt: skip
    scales = calibrate_kv_scales(model, batches, opts.headroom, progress=progress)
    del model
    qc = config.get("quantization_config")
    if qc and qc.get("quant_method") == "compressed-tensors":
        config = {**config, "quantization_config": {**qc, "kv_cache_scheme": dict(KV_CACHE_SCHEME)}}
    reader = SafetensorsDir(input_dir)
    jobs = [copy_job(reader, n) for n in reader.names() if not n.endswith(KV_SCALE_SUFFIXES)]

    def write_scales(writer) -> None:
        for name, t in scales.items():
            writer.write(name, t)

    return write_converted(input_dir, output_dir, reader, config, jobs, overwrite=overwrite, max_workers=1,
                           device="cpu", desc="copy", max_shard_bytes=max_shard_bytes, extra=write_scales,
                           extra_specs=[TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in scales.items()],
                           extra_quantized=len(scales), progress=progress)  # fmt: skip
