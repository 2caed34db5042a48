"""Routed (token, expert) pairs sorted into per-expert blocks, for the grouped MoE GEMMs (``moe_w4a16``,
``moe_fp8``).

``align_pairs`` sorts the T*k pairs p = t*k + j by expert and pads each expert's run to a multiple of BM:
``sorted_ids`` [P] (pair index, or T*k for padding) and ``block_expert`` [P/BM] (the expert of each BM-row
block, -1 past the last), with P an upper bound fixed by T, k, E and BM alone, so the shapes are static
and the work stays on the device (no host sync: CUDA graphs capture it). ``block_pairs`` is the kernels'
side: a block's pair indices and the activation rows they read.
"""

from __future__ import annotations

import torch

from quantrl.formats._checks import cdiv
from quantrl.kernels._triton import tl, triton


def block_rows(pairs: int, experts: int) -> int:
    """BM by the pairs an expert gets on average: 16 at decode (a few rows each), up to 64 in prefill."""
    per = pairs / max(experts, 1)
    return 16 if per <= 16 else 32 if per <= 32 else 64


def align_pairs(experts: torch.Tensor, num_experts: int, bm: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted_ids int32 [P], block_expert int32 [P / bm]) for routed experts [T, k] (module note). Device
    ops only: counts, offsets and the scatter stay on the GPU, and P depends on shapes alone."""
    flat = experts.reshape(-1)
    n = flat.numel()
    p_max = cdiv(n + num_experts * (bm - 1), bm) * bm  # every expert's run padded by < bm rows
    order = flat.argsort(stable=True)  # pairs by expert, each expert's in pair order
    # not torch.bincount: its output size depends on the largest id, a host sync CUDA graphs cannot capture
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + bm - 1) // bm * bm
    run_start = torch.cumsum(counts, 0) - counts  # where each expert's pairs begin in `order`
    ends = torch.cumsum(padded, 0)  # where each expert's padded run ends in sorted_ids
    e_sorted = flat[order]
    pos = (ends - padded)[e_sorted] + torch.arange(n, device=flat.device) - run_start[e_sorted]
    sorted_ids = torch.full((p_max,), n, dtype=torch.int32, device=flat.device)
    sorted_ids[pos] = order.to(torch.int32)
    block_start = torch.arange(0, p_max, bm, device=flat.device)
    block_expert = torch.searchsorted(ends, block_start, right=True)  # the run holding each block's first row
    return sorted_ids, torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)


@triton.jit
def block_pairs(sorted_ptr, pid_m, num_pairs, ROW_DIV: tl.constexpr, BM: tl.constexpr):
    """(pairs int64 [BM], valid [BM], rows [BM]) of block ``pid_m``: its pair indices, which are real (not
    padding), and the activation row each reads (pair // ``ROW_DIV``; padding reads row 0, masked)."""
    pairs = tl.load(sorted_ptr + pid_m * BM + tl.arange(0, BM)).to(tl.int64)
    valid = pairs < num_pairs
    return pairs, valid, tl.where(valid, pairs // ROW_DIV, 0)
