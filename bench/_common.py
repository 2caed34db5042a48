"""Shared bits of the benchmarks: timing, environment record, roofline, JSON output."""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"

# The H100 SXM figures the issues' targets were written against: the one place they are defined. A GPU bench
# reports % of these *and* % of the copy bandwidth it measures on the device actually used; targets stated
# as "% of roofline" are evaluated against the measured figure (the device may not be an H100).
H100_COPY_BW = 3.0e12  # B/s, measured copy_ bandwidth (bytes read + written)
H100_PEAK_BF16 = 800e12  # FLOP/s, dense
H100_PEAK_FP8 = 1260e12  # FLOP/s, dense

L2_BYTES = 50 * 2**20  # the H100's L2: timed inputs are cycled past ~3x of it
COPY_BW_BYTES = 1 << 30  # >= 1 GiB: far past any L2, so the copy runs at DRAM bandwidth
SMOKE_COPY_BW_BYTES = 16 << 20  # --smoke runs: the same code, in milliseconds


def best_of(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Best wall time in seconds (min over repeats: the least-disturbed run on a shared machine)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def cuda_event_times(fn: Callable[[], object], repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn`` between two CUDA events (one warm-up call first)."""
    fn()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return times


def error_line(e: BaseException) -> str:
    """``Type: first line of the message``: what a bench records for a step that failed and went on."""
    text = str(e)
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def smoke_or_cuda(args, smoke_banner: str, needs: str) -> int | None:
    """The GPU benches' common start: ``--smoke`` shrinks the run (``args.apply_smoke``) and says so; without
    it and without CUDA, explain and return exit code 2 (nothing measured); else None (go on)."""
    if args.smoke:
        print(f"smoke run: {smoke_banner}; the figures mean nothing, nothing is written")
        return None
    if not torch.cuda.is_available():
        print(f"{needs}; no CUDA device is visible, so nothing was measured.", file=sys.stderr)
        return 2
    return None


def measure_copy_bandwidth(device: torch.device | str | None = None, nbytes: int = COPY_BW_BYTES,
                           repeats: int = 5) -> float:  # fmt: skip
    """Bytes read + written per second by one ``dst.copy_(src)`` of ``nbytes`` on ``device`` (best of
    ``repeats``): what the memory system of the device actually used delivers, i.e. the roofline a
    bandwidth-bound kernel is held to. CUDA: timed with events; CPU: wall clock."""
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    t = _copy_seconds(device, nbytes, repeats)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the buffers died with _copy_seconds: hand the 2 GiB back to the bench
    return 2 * nbytes / t


def _copy_seconds(device: torch.device, nbytes: int, repeats: int) -> float:
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)  # written once: no lazily mapped zero pages
    dst = torch.empty_like(src)
    if device.type == "cuda":
        return min(cuda_event_times(lambda: dst.copy_(src), repeats))
    return best_of(lambda: dst.copy_(src), repeats)


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({environment_cpu()})"


def roofline(device: torch.device | str, smoke: bool = False) -> dict:
    """The bandwidth roofline record every GPU bench stores: measured on ``device`` and the H100 constants."""
    nbytes = SMOKE_COPY_BW_BYTES if smoke else COPY_BW_BYTES
    bw = measure_copy_bandwidth(device, nbytes)
    return {
        "measured_copy_Bps": bw,
        "measured_on": device_name(device),
        "measured_how": f"dst.copy_(src) of {nbytes / 2**30:.3g} GiB, (bytes read + written) / time, best of 5",
        "h100_copy_Bps": H100_COPY_BW,
        "h100_peak_bf16_flops": H100_PEAK_BF16,
        "h100_peak_fp8_flops": H100_PEAK_FP8,
        "targets_against": "measured_copy_Bps: '% of roofline' targets use the bandwidth measured on the device "
        "actually used; the h100_* constants are the issues' reference figures, reported beside it",
    }


def describe_roofline(roof: dict) -> str:
    bw = roof["measured_copy_Bps"]
    return (f"roofline: measured copy bandwidth {bw / 1e12:.2f} TB/s on {roof['measured_on']} "
            f"({bw / H100_COPY_BW:.0%} of the H100's {H100_COPY_BW / 1e12:.1f} TB/s); targets use the measured figure")  # fmt: skip


def environment_cpu() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return cpu


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def _gpu() -> dict:
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {
        "device": props.name,
        "device_count": torch.cuda.device_count(),
        "compute_capability": f"{props.major}.{props.minor}",
        "sm_count": props.multi_processor_count,
        "gpu_memory_GiB": round(props.total_memory / 2**30, 1),
        "cudnn": torch.backends.cudnn.version(),
    }


def environment() -> dict:
    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),  # noqa: UP017 (device Python may be < 3.11)
        "cpu": environment_cpu(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,  # the CUDA torch was built with (None: a CPU build)
        "triton": _version("triton"),
        "transformers": _version("transformers"),
    }
    if torch.cuda.is_available():
        env.update(_gpu())
    return env


def write_results(name: str, payload: dict, smoke: bool = False) -> Path | None:
    """bench/results/<name>.json with the environment record. ``smoke``: assemble and serialize the same JSON
    (so a value JSON cannot hold fails here, not on the GPU) but write nothing; returns None."""
    text = json.dumps({"environment": environment(), **payload}, indent=2) + "\n"
    if smoke:
        print(f"smoke run: {name} results assembled ({len(text)} bytes of JSON), not written")
        return None
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------------------
# timing under CUDA graphs (the GPU benches)
# ---------------------------------------------------------------------------------------------------------
class Timer:
    """Seconds per call of a list of zero-argument callables (one per weight copy)."""

    def __init__(self, device: torch.device, reps: int):
        self.device, self.reps = device, reps

    def __call__(self, fns: list, capture: bool = True) -> float:
        """``capture=False`` for code with host syncs (eager launches, launch gaps included)."""
        if self.device.type != "cuda":
            for f in fns:
                f()
            t0 = time.perf_counter()
            for f in fns:
                f()
            return (time.perf_counter() - t0) / len(fns)
        for f in fns:  # compile / autotune / allocate outside the graph
            f()
        torch.cuda.synchronize()

        def run():
            for f in fns:
                f()

        if capture:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                run()
            run = graph.replay

        return statistics.median(cuda_event_times(run, self.reps)) / len(fns)


def copies_for(nbytes: int, device: torch.device) -> int:
    """Weight copies to cycle through so that one pass exceeds ~3x the L2 (1 on CPU)."""
    if device.type != "cuda":
        return 1
    return int(min(256, max(1, math.ceil(3 * L2_BYTES / max(nbytes, 1)))))
