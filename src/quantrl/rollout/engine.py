"""The rollout engine: batched generation with per-token logprobs, and atomic weight updates.

Scheduling (continuous batching over a fixed set of KV slots):
  * a generate call with longest prompt P and ``max_new_tokens`` M cuts the KV pool into
    ``capacity // (P + M)`` slots (at most ``max_batch_size``); prompts that cannot fit raise before
    anything is allocated;
  * samples wait in FIFO order; whenever slots are free, waiting samples are admitted: each distinct
    prompt among them is prefilled once (right-padded batch, bounded by ``max_prefill_tokens``; a longer
    prompt is prefilled alone) and its
    KV copied to the slots of its other samples (``n`` > 1 shares the prompt);
  * otherwise every active sequence decodes one token;
  * a sequence that samples a stop token or reaches M tokens leaves at once: the last active slots move
    into the holes, so active sequences always fill slots [0, B) and finished ones cost nothing.
Per step there is one host sync (the sampled tokens, needed for stop checks).

MoE routing (``SamplingParams(return_routing=True)``): every prefill and decode step also brings the
experts each fed token was routed to back to the host, and each result carries them
(``GenerationResult.routing``) for the trainer to replay.

Weights: ``update_weights`` validates a whole update (names, shapes, dtypes, complete units) before
touching anything, so a bad update raises ``ValueError`` and the engine keeps serving the previous
version bit for bit; see ``weight_update``.
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from quantrl.model.decoder import Decoder, KVContext
from quantrl.model.moe import Routing
from quantrl.rollout.kv_cache import KVCache
from quantrl.rollout.sampling import SamplingParams, make_generator, sample
from quantrl.rollout.weight_update import apply_update, check_loaded, plan_update

CPU_DEFAULT_KV_BYTES = 1 << 30
CUDA_DEFAULT_KV_FRACTION = 0.5  # of the memory free when the engine is built


@dataclass
class GenerationResult:
    prompt_index: int
    "which prompt of the call"
    sample_index: int
    "which of its n samples"
    tokens: list[int]
    "generated token ids (a stop token, when one ended the sample, is the last)"
    logprobs: list[float]
    "log softmax(logits / temperature) of each generated token (unfiltered; see sampling)"
    finish_reason: str
    "stop | length"
    weight_version: int
    "engine.weight_version that produced the sample"
    routing: torch.Tensor | None = None
    "return_routing: experts [P + G - 1, L_moe, k] (int16, CPU) of each fed token (prompt, then all generated but the last)"


@dataclass
class _Active:
    """Active sequences, compacted: entry i lives in KV slot i."""

    ids: list[int] = field(default_factory=list)  # sample id
    lengths: list[int] = field(default_factory=list)  # tokens already in the cache
    last: list[int] = field(default_factory=list)  # last sampled token, fed by the next decode step


class _Routes:
    """MoE experts of one generate call: each sample's prompt rows, then one row per decode step. Decode
    steps are kept whole (one tensor a step) and split by sample once at the end."""

    def __init__(self, total: int):
        self.prompt: list[torch.Tensor | None] = [None] * total  # [P, L_moe, k]
        self.steps: list[torch.Tensor] = []  # [B_step, L_moe, k]
        self.ids: list[int] = []  # sample of each row of the concatenated steps

    def decode(self, ids: list[int], experts: torch.Tensor) -> None:
        self.steps.append(experts.to("cpu", torch.int16))
        self.ids += ids

    def per_sample(self) -> list[torch.Tensor]:
        """[P + G - 1, L_moe, k] per sample: its decode rows in step order after its prompt's."""
        total = len(self.prompt)
        if not self.steps:
            return list(self.prompt)
        sample = torch.tensor(self.ids)
        order = sample.argsort(stable=True)  # by sample, steps in order within one
        counts = torch.bincount(sample, minlength=total).tolist()
        decoded = torch.cat(self.steps)[order].split(counts)
        return [torch.cat([p, d]) for p, d in zip(self.prompt, decoded)]


class Engine:
    def __init__(self, model: Decoder, *, kv_cache_tokens: int | None = None, kv_cache_bytes: int | None = None,
                 max_batch_size: int = 256, max_prefill_tokens: int = 8192, max_seq_len: int | None = None,
                 use_cuda_graph: bool = False, kv_cache_dtype: str = "auto"):  # fmt: skip
        """``kv_cache_tokens`` or ``kv_cache_bytes`` sizes the KV cache (default: half the free GPU memory,
        or 1 GiB on CPU); ``kv_cache_dtype`` ``fp8_e4m3`` stores it in FP8 (``rollout.kv_cache``).
        ``max_seq_len`` fixes the positions per KV slot for every call (prompt +
        max_new_tokens must fit in it); without it each call uses its own longest prompt + max_new_tokens.
        A fixed length keeps one KV layout, so CUDA graphs (``use_cuda_graph``, CUDA only) are captured
        once instead of once per distinct request length."""
        self.model = model.eval()
        if kv_cache_tokens is None and kv_cache_bytes is None:
            dev = model.device
            if dev.type == "cuda":
                kv_cache_bytes = int(torch.cuda.mem_get_info(dev)[0] * CUDA_DEFAULT_KV_FRACTION)
            else:
                kv_cache_bytes = CPU_DEFAULT_KV_BYTES
        self.cache = KVCache.for_model(model, max_tokens=kv_cache_tokens, budget_bytes=kv_cache_bytes,
                                       dtype=kv_cache_dtype)
        if max_batch_size < 1 or max_prefill_tokens < 1:
            raise ValueError("max_batch_size and max_prefill_tokens must be positive")
        self.max_batch_size, self.max_prefill_tokens = max_batch_size, max_prefill_tokens
        if max_seq_len is not None and not 1 <= max_seq_len <= self.cache.capacity:
            raise ValueError(f"max_seq_len={max_seq_len} must be in [1, {self.cache.capacity}] (the KV cache's tokens)")
        self.max_seq_len = max_seq_len
        self.weight_version = 0
        # a failed update's tensors (their units may hold neither version) and why; generate refuses while any
        self._unloaded: set[str] = set()
        self._inconsistent: str | None = None
        self._graphs = None
        if use_cuda_graph:
            if model.device.type != "cuda":
                raise ValueError("use_cuda_graph needs a model on a CUDA device")
            from quantrl.rollout.cuda_graph import DecodeGraphs

            self._graphs = DecodeGraphs(model, max_batch_size)

    # ---- generation -------------------------------------------------------------------------------
    def _check_prompts(self, prompts: Sequence[Sequence[int]]) -> list[list[int]]:
        if len(prompts) == 0:
            raise ValueError("generate: no prompts")
        vocab = self.model.config.vocab_size
        out = []
        for i, p in enumerate(prompts):
            p = [int(t) for t in p]
            if not p:
                raise ValueError(f"generate: prompt {i} is empty")
            bad = [t for t in p if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"generate: prompt {i} has token ids outside [0, {vocab}): {bad[:5]}")
            out.append(p)
        return out

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams = SamplingParams()
    ) -> list[GenerationResult]:
        """``n`` samples for each token-id prompt; results ordered prompt-major (prompt i, sample j at i*n + j)."""
        if self._unloaded:
            raise RuntimeError(f"generate: {self._inconsistent}; {len(self._unloaded)} of its tensors (e.g. "
                               f"{sorted(self._unloaded)[:2]}) need a successful update_weights first")  # fmt: skip
        prompts = self._check_prompts(prompts)
        lens = [len(p) for p in prompts]
        seq_len = self.cache.check_fits(lens, params.max_new_tokens)
        if self.max_seq_len is not None:
            if seq_len > self.max_seq_len:
                raise ValueError(f"prompt of {max(lens)} tokens + max_new_tokens={params.max_new_tokens} = {seq_len} "
                                 f"exceeds the engine's max_seq_len={self.max_seq_len}")  # fmt: skip
            seq_len = self.max_seq_len
        total = len(prompts) * params.n
        num_slots = min(self.cache.capacity // seq_len, self.max_batch_size, total)
        k, v = self.cache.slots(num_slots, seq_len)
        gen = make_generator(params.seed, self.model.device)
        tokens: list[list[int]] = [[] for _ in range(total)]
        logprobs: list[list[float]] = [[] for _ in range(total)]
        reasons: list[str] = [""] * total
        stop = set(params.stop_token_ids)
        pending = deque(range(total))  # sample s belongs to prompt s // n
        act = _Active()
        routes: _Routes | None = None
        if params.return_routing:
            if self.model.num_moe_layers == 0:
                raise ValueError("return_routing: the model has no MoE layers to report routing for")
            routes = _Routes(total)
        with torch.no_grad():
            while pending or act.ids:
                first = len(act.ids)
                if pending and first < num_slots:
                    admitted = self._admit(pending, num_slots - first, lens, params.n)
                    logits, order = self._prefill(admitted, prompts, params.n, k, v, first, routes)
                    act.ids += order
                    act.lengths += [lens[s // params.n] for s in order]
                    act.last += [0] * len(order)
                else:
                    logits, experts = self._decode(act, k, v, record=routes is not None)
                    if routes is not None:
                        routes.decode(act.ids, experts)
                    act.lengths = [n + 1 for n in act.lengths]
                    first = 0
                new_tok, new_lp = sample(logits, params, gen)
                if self.model.tp.world > 1:  # a tensor-parallel shard goes on with rank 0's tokens
                    new_tok, new_lp = self.model.tp.from_lead(new_tok.contiguous(), new_lp.contiguous())
                done = []
                for row, (t, lp) in enumerate(zip(new_tok.tolist(), new_lp.tolist()), start=first):
                    s = act.ids[row]
                    if lp != lp:  # NaN logits sample token 0 with NaN logprob: garbage, not a sample
                        raise FloatingPointError(f"generate: the logits of sample {s} (prompt {s // params.n}) "
                                                 f"are NaN after {len(tokens[s])} tokens, at weight version "
                                                 f"{self.weight_version}")  # fmt: skip
                    tokens[s].append(t)
                    logprobs[s].append(lp)
                    act.last[row] = t
                    if t in stop or len(tokens[s]) >= params.max_new_tokens:
                        reasons[s] = "stop" if t in stop else "length"
                        done.append(row)
                if done:
                    self._compact(act, done, k, v)
        per_sample = routes.per_sample() if routes is not None else [None] * total
        return [
            GenerationResult(s // params.n, s % params.n, tokens[s], logprobs[s], reasons[s], self.weight_version,
                             per_sample[s])
            for s in range(total)
        ]

    def _admit(self, pending: deque[int], free: int, lens: list[int], n: int) -> list[int]:
        """Up to ``free`` waiting samples; their distinct prompts, padded to the longest, within max_prefill_tokens."""
        taken: list[int] = []
        prompts: set[int] = set()
        longest = 0
        while pending and len(taken) < free:
            p = pending[0] // n
            if p not in prompts:
                grown = max(longest, lens[p])
                if prompts and (len(prompts) + 1) * grown > self.max_prefill_tokens:
                    break
                prompts.add(p)
                longest = grown
            taken.append(pending.popleft())
        return taken

    def _prefill(self, samples: list[int], prompts: list[list[int]], n: int, k: list[torch.Tensor],
                 v: list[torch.Tensor], first: int,
                 routes: _Routes | None) -> tuple[torch.Tensor, list[int]]:  # fmt: skip
        """Prefill each distinct prompt once into slots [first, first + U), copy its KV to the slots of its other
        samples [first + U, first + A). Returns logits [A, V] in slot order and the sample ids in slot order;
        with ``routes``, each admitted sample gets its prompt's experts [P, L_moe, k]."""
        groups: dict[int, list[int]] = {}
        for s in samples:
            groups.setdefault(s // n, []).append(s)
        uniq = list(groups)
        t = max(len(prompts[p]) for p in uniq)
        dev = self.model.device
        ids = torch.zeros(len(uniq), t, dtype=torch.long)  # right-padded [U, T]
        for i, p in enumerate(uniq):
            ids[i, : len(prompts[p])] = torch.tensor(prompts[p])
        lens = torch.tensor([len(prompts[p]) for p in uniq])
        routing = Routing(record=True) if routes is not None else None
        ctx = KVContext(k, v, "prefill", slot_start=first)
        logits = self.model.prefill(ids.to(dev), lens.to(dev), ctx, routing)  # [U, V]
        if routing is not None:
            experts = routing.stacked(len(uniq), t).to("cpu", torch.int16)  # [U, T, L_moe, k]
            for i, p in enumerate(uniq):
                for s in groups[p]:  # the samples sharing this prefill share its KV, hence its routing
                    routes.prompt[s] = experts[i, : len(prompts[p])]
        src_rows = [i for i, p in enumerate(uniq) for _ in groups[p][1:]]
        order = [groups[p][0] for p in uniq] + [s for p in uniq for s in groups[p][1:]]
        if src_rows:
            src = torch.tensor([first + r for r in src_rows], device=dev)
            dst = torch.arange(first + len(uniq), first + len(order), device=dev)
            for cache in (*k, *v):
                cache[dst, :, :t] = cache[src, :, :t]
            logits = logits[torch.tensor(list(range(len(uniq))) + src_rows, device=dev)]
        return logits, order

    def _decode(self, act: _Active, k: list[torch.Tensor], v: list[torch.Tensor],
                record: bool) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
        """Logits [B, V] for the active rows; with ``record``, the experts they were routed to [B, L_moe, k]."""
        dev = self.model.device
        tokens = torch.tensor(act.last, dtype=torch.long, device=dev)
        positions = torch.tensor(act.lengths, dtype=torch.long, device=dev)  # the fed token's position
        if self._graphs is not None:
            try:
                return self._graphs.run(tokens, positions, k, v)
            except (RuntimeError, ValueError) as e:  # a failed capture must not stop generation: go eager, loudly
                why = str(e).splitlines()[0]
                warnings.warn(f"CUDA graph decode failed ({why}); continuing without CUDA graphs", stacklevel=2)
                self._graphs = None
        ctx = KVContext(k, v, "decode", kv_len=max(act.lengths) + 1)
        routing = Routing(record=True) if record else None
        logits = self.model.decode(tokens, positions, ctx, routing)
        return logits, (routing.stacked(len(act.ids), 1)[:, 0] if routing else None)

    def _compact(self, act: _Active, done: list[int], k: list[torch.Tensor], v: list[torch.Tensor]) -> None:
        """Drop finished rows; the last live rows move into their slots (KV copied) so slots stay [0, B)."""
        finished = set(done)
        keep = len(act.ids) - len(finished)
        holes = [r for r in range(keep) if r in finished]
        movers = [r for r in range(keep, len(act.ids)) if r not in finished]
        if holes:
            span = max(act.lengths[r] for r in movers)
            dev = self.model.device
            dst, src = torch.tensor(holes, device=dev), torch.tensor(movers, device=dev)
            for cache in (*k, *v):
                cache[dst, :, :span] = cache[src, :, :span]
            for lst in (act.ids, act.lengths, act.last):
                for h, m in zip(holes, movers):
                    lst[h] = lst[m]
        for lst in (act.ids, act.lengths, act.last):
            del lst[keep:]

    # ---- weights ----------------------------------------------------------------------------------
    def update_weights(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int, check_equal: bool = False
    ) -> None:
        """Load (name, tensor) pairs in the engine's format and move to ``version``.

        Atomic: the whole update is validated first; any unknown name, wrong shape or dtype, or incomplete
        unit (a weight without its scales) raises ``ValueError`` and nothing changes. ``check_equal``
        verifies afterwards that the engine holds exactly the given tensors (``RuntimeError`` if not).
        Once validation has passed, a failure while loading (an OOM in a layer's post-processing) or a
        failed check leaves weights that are neither version: the version is not advanced, and ``generate``
        refuses to sample until later successful updates have covered every tensor of the failed one.
        """
        plan = plan_update(self.model, named_tensors)
        names = {unit.full_name(attr) for unit, tensors in plan for attr in tensors}
        before = self._unloaded
        self._unloaded = before | names
        why = self._inconsistent
        self._inconsistent = f"the update to weight version {int(version)} failed while loading"
        apply_update(plan)
        for m in self.model.modules():  # caches derived from the weights (latent attention's absorbed kv_b_proj)
            if hasattr(m, "after_weight_update"):
                m.after_weight_update()
        if check_equal:
            self._inconsistent = f"the update to weight version {int(version)} did not load bit for bit"
            check_loaded(plan)
        self._unloaded = before - names
        self._inconsistent = why if self._unloaded else None
        self.weight_version = int(version)
