"""Tensor parallelism for the rollout engine: one model over ``world`` processes (Megatron's split).

A block's input projections are *column*-parallel (each rank holds ``out / world`` rows: its attention
heads, its slice of the SwiGLU width) and its output projection *row*-parallel (``in / world`` columns),
so a block needs one all-reduce, of its output: attention after ``o_proj``, a dense MLP after
``down_proj``, a MoE block after the sum of its experts (each expert split the same way) and shared
expert. The vocabulary is split too: the embedding by rows (an all-reduce fills each token's row in) and
``lm_head`` by its output (the logits are all-gathered), when ``vocab_size`` divides. Norms, routers and
DeepSeek's latent path (``q_a_proj``, ``kv_a_proj_with_mqa``) are replicated. Every rank then computes the same logits and, given the same
seed, samples the same tokens; the engine still takes rank 0's tokens on every rank (``from_lead``), so a
last-bit difference can never split the shards. A row-parallel bias is held by rank 0 (zeros elsewhere),
so the all-reduce adds it once.

Expert parallelism (``expert_parallel=True``): instead of splitting every expert, rank r holds experts
[r E / world, (r + 1) E / world) whole (what FP8 needs when an expert's width does not split into
128-row tiles, e.g. Qwen3-30B-A3B's 768 over 8) and computes them for the tokens routed to them; the
block's one all-reduce then also gathers the experts. A shared expert is then held whole by every rank
and added by rank 0. The other ranks' experts are *foreign* names: a checkpoint or update carries them,
and this rank skips them.

Weights come in whole, under their checkpoint names (a checkpoint, or the trainer's weight sync), and
each rank keeps its piece (``shard_tensor``): rows or columns of the weight, and of every scale or packed
tensor with them. A piece must hold whole quantization blocks (FP8 128x128 tiles, INT4 groups and
int32 words, NVFP4 groups): a split that would cut one is refused by name.

The sums are taken in another order than on one device (per-rank partial GEMMs, then the all-reduce),
so a TP engine agrees with a single-device one to rounding, not bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from quantrl.model.linear import Fp8Linear, Nvfp4Linear, QLinear, W4A16Linear, make_linear
from quantrl.model.quant_scheme import QuantScheme

COLUMN, ROW = 0, 1  # the weight dimension a parallel Linear splits: out_features, in_features
WHOLE = 1 << 62  # a granularity spanning a whole dimension: that tensor is not split along it


@dataclass(eq=False)
class TPContext:
    """Shared by every module of one model shard (a Ray engine sets ``group`` once its world is joined)."""

    rank: int = 0
    "this process's place in the tensor-parallel group"
    world: int = 1
    "processes sharing each layer"
    group: Any = None
    "the torch.distributed group (None: the default group)"
    expert_parallel: bool = False
    "MoE experts are spread whole over the ranks (E / world each) instead of each one split world ways"

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's ``x`` concatenated along the last dimension, in rank order."""
        if self.world == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def from_lead(self, *ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``ts`` as rank 0 holds them, on every rank (in place): what the engine samples, so that the shards
        never disagree on a token even where their logits differ in the last bit."""
        if self.world > 1:
            src = dist.get_global_rank(self.group, 0) if self.group is not None else 0
            for t in ts:
                dist.broadcast(t, src=src, group=self.group)
        return ts

    @property
    def lead(self) -> bool:
        return self.rank == 0

    def owned_experts(self, num_experts: int) -> range:
        """The experts this rank holds: all of them (each split), or with expert parallelism its 1/world run."""
        if not (self.expert_parallel and self.world > 1):
            return range(num_experts)
        n = self.split(num_experts, "num_experts")
        return range(self.rank * n, (self.rank + 1) * n)

    def split(self, n: int, what: str) -> int:
        if n % self.world:
            raise ValueError(f"tensor parallelism: {what}={n} does not split into {self.world} equal shards")
        return n // self.world


def parallel_linear(dim: int, tp: TPContext | None, name: str, in_features: int, out_features: int, bias: bool,
                    scheme: QuantScheme, dtype: torch.dtype, device: torch.device | str) -> QLinear:  # fmt: skip
    """``make_linear`` for this rank's shard: ``dim`` COLUMN splits out_features, ROW in_features."""
    if tp is None or tp.world == 1:
        return make_linear(name, in_features, out_features, bias, scheme, dtype, device)
    if dim == COLUMN:
        lin = make_linear(name, in_features, tp.split(out_features, f"{name} out_features"), bias, scheme, dtype, device)
    else:
        lin = make_linear(name, tp.split(in_features, f"{name} in_features"), out_features, bias, scheme, dtype, device)
    lin.tp_dim, lin.tp = dim, tp
    return lin


class VocabParallelEmbedding(nn.Module):
    """This rank's rows [r V / world, (r + 1) V / world) of the embedding (``model.embed_tokens.weight``):
    ids outside them look up zeros, and the all-reduce fills them in from their owner."""

    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype, device: torch.device | str,
                 tp: TPContext):  # fmt: skip
        super().__init__()
        n = tp.split(vocab_size, "vocab_size")
        self.weight = nn.Parameter(torch.zeros(n, hidden_size, dtype=dtype, device=device))
        self.start, self.tp, self.tp_dim = tp.rank * n, tp, COLUMN

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        mine = (local >= 0) & (local < self.weight.shape[0])
        out = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight) * mine[..., None]
        return self.tp.all_reduce(out)


def _granularity(lin: nn.Module, attr: str) -> tuple[int, int] | None:
    """Weight elements (rows, cols) one element of ``attr`` covers; None for a tensor with no weight layout."""
    if attr == "weight":  # a plain weight: BF16, FP8 values, an embedding
        return 1, 1
    if isinstance(lin, Fp8Linear):  # channel: one scale a row; tensor: a 1-D scale, the same for every shard
        return tuple(lin.block_size) if lin.strategy == "block" else (1, WHOLE)
    if isinstance(lin, W4A16Linear):
        return {"weight_packed": (1, 32 // lin.num_bits), "weight_scale": (1, lin.group_size)}.get(attr)
    if isinstance(lin, Nvfp4Linear):
        return {"weight_packed": (1, 2), "weight_scale": (1, 16)}.get(attr)
    return None


def shard_tensor(lin: nn.Module, attr: str, t: torch.Tensor, name: str) -> torch.Tensor:
    """This rank's piece of the whole tensor ``t`` of a parallel Linear's (or embedding's) ``attr``."""
    dim, tp = lin.tp_dim, lin.tp
    # weight rows (COLUMN) or columns (ROW) held here
    local = (lin.out_features, lin.in_features)[dim] if isinstance(lin, QLinear) else lin.weight.shape[dim]
    if attr == "bias":
        if dim == ROW:  # added once, by rank 0, before the all-reduce
            return t if tp.rank == 0 else torch.zeros_like(t)
        return t[tp.rank * local : (tp.rank + 1) * local]
    if attr == "weight_shape":
        whole = [lin.out_features * (tp.world if dim == COLUMN else 1), lin.in_features * (tp.world if dim == ROW else 1)]
        if t.tolist() != whole:
            raise ValueError(f"{name!r} says {t.tolist()}, the whole module is {whole}")
        return torch.tensor([lin.out_features, lin.in_features], dtype=t.dtype)
    g = _granularity(lin, attr)
    if g is None or t.ndim != 2 or g[dim] == WHOLE:  # a scale of a whole row, or of the tensor: the same for all
        return t
    if local % g[dim]:
        raise ValueError(f"tensor parallelism: {name} cannot be split into {tp.world} shards of {local} "
                         f"{'rows' if dim == COLUMN else 'columns'}: its blocks are {g[dim]} wide")  # fmt: skip
    n = local // g[dim]
    if t.shape[dim] != n * tp.world:
        raise ValueError(f"tensor parallelism: {name} has {t.shape[dim]} along dim {dim}, expected {n * tp.world}")
    return t.narrow(dim, tp.rank * n, n)


def local_tensor(unit, attr: str, t: torch.Tensor, name: str) -> torch.Tensor:
    """``t`` (a ``model.state.Unit``'s whole ``attr``) as this rank holds it: its piece of a parallel
    Linear's tensor, ``t`` itself for anything replicated."""
    lin = unit.linear if unit.linear is not None else unit.module
    if not isinstance(getattr(lin, "tp", None), TPContext) or lin.tp.world == 1 or not hasattr(lin, "tp_dim"):
        return t
    return shard_tensor(lin, attr, t, name)


SINGLE = TPContext()  # one process: no split, no all-reduce
