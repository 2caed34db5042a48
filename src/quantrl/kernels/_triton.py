"""Optional Triton import: ``quantrl.kernels`` imports without Triton; only the kernel modules need it."""

from __future__ import annotations

import os

try:  # Triton is an optional dependency (GPU machines); everything here must import without it
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None
    tl = None
    HAVE_TRITON = False


def interpret_requested() -> bool:
    """TRITON_INTERPRET=1: ``@triton.jit`` (at decoration time) builds CPU-interpreted kernels."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")
