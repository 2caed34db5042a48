"""CUDA graphs for the decode step (GPU only, opt-in through ``Engine(use_cuda_graph=True)``).

At batch 1 a decode step is a few hundred small kernels; launching them from Python costs more than
reading the weights, so the step is captured once per batch bucket and replayed. Static shapes are the
price: a graph attends over the whole slot length L (masked), and a batch of B runs in the smallest
bucket b >= B, whose b - B dummy rows (token 0 at position 0) write into free slots [B, b), which hold
no live sequence because the engine keeps active sequences compacted into slots [0, B).

Graphs belong to one KV layout (number of slots, L); a generate call with another layout recaptures
lazily. Weight updates copy in place, so captured graphs stay valid across them. Sampling stays outside
the graph (it uses a host-seeded generator). MoE models run static-shape dispatches inside the graph:
INT4, NVFP4 and FP8-block experts the grouped kernels (``kernels.moe_w4a16`` / ``moe_fp8``: each routed
pair through its own expert), other formats the dense dispatch (every expert on every row); the graph also outputs every MoE layer's
chosen experts, for routing replay.
"""

from __future__ import annotations

import warnings

import torch

from quantrl.model.decoder import Decoder, KVContext
from quantrl.model.moe import Routing, SparseMoeBlock, dense_dispatch


def batch_buckets(max_batch: int) -> list[int]:
    small = [b for b in (1, 2, 4, 8) if b < max_batch]
    return small + list(range(16, max_batch, 16)) + [max_batch]


class DecodeGraphs:
    def __init__(self, model: Decoder, max_batch: int):
        self.model = model
        self.max_batch = max_batch
        self.buckets = batch_buckets(max_batch)
        dev = model.device
        self._tokens = torch.zeros(max_batch, dtype=torch.long, device=dev)
        self._positions = torch.zeros(max_batch, dtype=torch.long, device=dev)
        self._layout: tuple[int, int, int] | None = None  # (slots, positions, KV pool address)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, torch.Tensor | None]]] = {}
        self._moe = model.num_moe_layers > 0
        cfg = model.config
        blocks = [m for m in model.modules() if isinstance(m, SparseMoeBlock)]
        grouped = all(b.grouped_kernel_possible() for b in blocks)  # INT4 / NVFP4 / FP8 experts: grouped kernels instead
        if self._moe and cfg.num_experts > 4 * cfg.num_experts_per_tok and not grouped:
            warnings.warn(
                f"CUDA graphs on a MoE model run all {cfg.num_experts} experts on every row "
                f"({cfg.num_experts / cfg.num_experts_per_tok:.0f}x the routed experts' FLOPs and weight reads); "
                "eager decode may be faster",
                stacklevel=3,
            )
        self._pool = None

    def reset(self) -> None:
        self._graphs.clear()
        self._pool = None
        self._layout = None

    def _bucket(self, b: int, num_slots: int) -> int:
        return min(next(x for x in self.buckets if x >= b), num_slots)

    def step(self, b: int, ctx: KVContext) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One decode of the first b static rows: (logits [b, V], MoE experts [b, L_moe, k] or None)."""
        routing = Routing(record=True) if self._moe else None
        logits = self.model.decode(self._tokens[:b], self._positions[:b], ctx, routing)
        return logits, (routing.stacked(b, 1)[:, 0] if routing else None)

    def _capture(self, b: int, ctx: KVContext) -> tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, torch.Tensor | None]]:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        # warm-up: lazy inits and FP8 / W4A16 fast-path probes run eagerly, not in the graph; MoE blocks
        # dispatch densely, as they will in the graph, so every expert is probed, not only the routed ones
        with torch.cuda.stream(side), dense_dispatch():
            for _ in range(2):
                self.step(b, ctx)  # rewrites the same K/V it will write when replayed
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self.step(b, ctx)
        self._pool = graph.pool()
        return graph, out

    def run(
        self, tokens: torch.Tensor, positions: torch.Tensor, k: list[torch.Tensor], v: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits [B, V] for tokens [B] at positions [B] (active sequences in slots [0, B)), and for MoE
        models the experts each row was routed to [B, L_moe, k]."""
        num_slots, seq_len = k[0].shape[0], k[0].shape[2]
        layout = (num_slots, seq_len, k[0].data_ptr())  # a freed and reallocated KV pool: new addresses
        if self._layout != layout:
            self.reset()
            self._layout = layout
        n = tokens.shape[0]
        b = self._bucket(n, min(num_slots, self.max_batch))
        self._tokens[:n].copy_(tokens)
        self._tokens[n:b].zero_()
        self._positions[:n].copy_(positions)
        self._positions[n:b].zero_()
        if b not in self._graphs:
            self._graphs[b] = self._capture(b, KVContext(k, v, "decode", kv_len=seq_len))
        graph, (logits, experts) = self._graphs[b]
        graph.replay()
        return logits[:n], (None if experts is None else experts[:n])
