"""Every Triton kernel compiles for sm_90 (H100/H200) on this CPU machine, without spilling registers.

The CPU tests run the kernels in Triton's interpreter, which never meets the real compiler; this runs the
full pipeline down to ptxas (bundled with Triton) for every specialization the GPU paths launch
(``bench/compile_sm90.py``), so a kernel that would fail to compile, or spill, on the device fails here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


@pytest.mark.skipif(not PTXAS.exists(), reason=f"this Triton wheel bundles no ptxas ({PTXAS})")
def test_every_kernel_compiles_for_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT / "bench")])
    env["TRITON_CACHE_DIR"] = str(ROOT / ".pytest_cache" / "triton-sm90")  # not the user's ~/.triton
    proc = subprocess.run([sys.executable, "bench/compile_sm90.py", "--no-write"], cwd=ROOT, env=env, check=False,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "0 failures" in out and "_w4a16_gemv_kernel" in out and "_fp8_block_gemm_kernel" in out, out[-3000:]
