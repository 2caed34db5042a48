"""Run per-tensor conversion jobs over a checkpoint: read one tensor, transform, write, in N workers.

Peak memory is about ``max_workers`` × (largest tensor + its temporaries): a job reads its tensor only
when a worker picks it up, and the writer puts each result at its final file offset at once.
Threads suffice: torch kernels and file IO release the GIL.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass

import torch
from tqdm import tqdm

from quantrl.checkpoint.safetensors_io import CheckpointError, SafetensorsDir, ShardedWriter, TensorSpec

Transform = Callable[[torch.Tensor], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Job:
    source: str
    outputs: tuple[TensorSpec, ...]
    transform: Transform | None = None  # None: copy unchanged under the same name


def copy_job(reader: SafetensorsDir, name: str) -> Job:
    info = reader.infos[name]
    return Job(name, (TensorSpec(name, info.dtype, info.shape),))


def run_jobs(
    reader: SafetensorsDir,
    writer: ShardedWriter,
    jobs: Iterable[Job],
    *,
    max_workers: int = 1,
    device: str | torch.device = "cpu",
    desc: str = "converting",
    progress: bool = True,
) -> None:
    jobs = list(jobs)
    device = torch.device(device)

    def work(job: Job) -> int:
        info = reader.infos[job.source]
        t = reader.read(job.source)
        if job.transform is None:
            writer.write(job.source, t)
            return info.nbytes
        try:
            out = job.transform(t.to(device))
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{info.file.name}: tensor {job.source!r}: {e}") from None
        for name, value in out.items():
            writer.write(name, value)
        return info.nbytes

    total = sum(reader.infos[j.source].nbytes for j in jobs)
    with tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not progress) as bar:
        if max_workers <= 1:
            for job in jobs:
                bar.update(work(job))
            return
        pool = ThreadPoolExecutor(max_workers=max_workers)
        try:
            pending = {pool.submit(work, j) for j in jobs}
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for f in done:
                    if f.exception() is not None:
                        raise f.exception()
                    bar.update(f.result())
        finally:  # a failed job or Ctrl-C: the queued jobs never start, the running ones finish
            pool.shutdown(wait=True, cancel_futures=True)
