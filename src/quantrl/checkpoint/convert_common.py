"""The skeleton every converter shares: safe output dir, planned writer, config, aux files."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from quantrl.checkpoint.output_dir import atomic_output_dir, copy_aux_files
from quantrl.checkpoint.safetensors_io import SafetensorsDir, ShardedWriter, TensorSpec
from quantrl.checkpoint.stream import Job, run_jobs


@dataclass(frozen=True)
class ConvertReport:
    output_dir: Path
    input_bytes: int
    output_bytes: int
    seconds: float
    quantized: int
    kept: int

    def summary(self) -> str:
        gb = self.input_bytes / 1e9
        return (
            f"wrote {self.output_dir}: {self.quantized} tensors converted, {self.kept} kept, "
            f"{gb:.3f} GB -> {self.output_bytes / 1e9:.3f} GB in {self.seconds:.1f} s ({gb / max(self.seconds, 1e-9):.2f} GB/s in)"
        )


def write_converted(
    in_dir: str | Path,
    out_dir: str | Path,
    reader: SafetensorsDir,
    config: dict,
    jobs: list[Job],
    *,
    overwrite: bool,
    max_workers: int,
    device: str,
    desc: str,
    max_shard_bytes: int,
    extra: Callable[[ShardedWriter], None] | None = None,
    extra_specs: list[TensorSpec] | None = None,
    extra_quantized: int = 0,
    progress: bool = True,
) -> ConvertReport:
    """Plan all outputs, stream the jobs (and ``extra``, for work that is not per-tensor) into a temp dir
    beside ``out_dir``, then write config + aux files and rename into place."""
    t0 = time.perf_counter()
    specs = [s for j in jobs for s in j.outputs] + list(extra_specs or [])
    with atomic_output_dir(out_dir, input_dir=in_dir, overwrite=overwrite) as tmp:
        writer = ShardedWriter(tmp, specs, max_shard_bytes=max_shard_bytes, metadata={"producer": "quantrl"})
        try:
            run_jobs(reader, writer, jobs, max_workers=max_workers, device=device, desc=desc, progress=progress)
            if extra is not None:
                extra(writer)
        except BaseException:
            writer.abort()
            raise
        writer.close()
        copy_aux_files(in_dir, tmp)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    quantized = sum(1 for j in jobs if j.transform is not None) + extra_quantized
    return ConvertReport(
        output_dir=Path(out_dir).resolve(),
        input_bytes=reader.total_bytes,
        output_bytes=writer.total_bytes,
        seconds=time.perf_counter() - t0,
        quantized=quantized,
        kept=sum(1 for j in jobs if j.transform is None),
    )
