"""Rollout engines as Ray actors, fed by ``torch.distributed`` weight broadcasts (``--placement ray``).

    engines = RayEngines(EngineSpec(...), num_engines=4)     one actor per engine, anywhere in the cluster
    engines.generate(prompt_ids, params)                     the batch split across engines, results merged
    pending = engines.submit(prompt_ids, params)             the same, returning at once (async rollout) ...
    results, seconds = engines.collect(pending)              ... and its results
    engines.sync_weights(trainer_model, version, target)     one broadcast, every engine loads it atomically
    engines.close()
    world, store = host_world(trainers, engines, backend); join_world(world, rank)   the run's world

Placement. Each engine is a Ray actor holding one ``Engine``: one GPU (``num_gpus=1``; Ray sets
``CUDA_VISIBLE_DEVICES``, so ``device="cuda"`` is that GPU) or, on CPU, ``cpus_per_engine`` CPUs. The
process that builds ``RayEngines`` is the trainer: in ``quantrl train --placement ray`` it is itself a Ray
actor with one GPU, so Ray never hands its GPU to an engine. With ``EngineSpec.tp = N`` an engine is N
such actors, each holding one tensor-parallel shard (``quantrl.model.tensor_parallel``) and joined in a
group of their own; they all receive each weight broadcast and sample each share in lockstep, and rank 0
returns the results.

Weights. The trainers and the engines form one ``torch.distributed`` world (``World``; NCCL on GPU, gloo
on CPU): trainer replicas are ranks [0, T), engine ``e``'s shard ``r`` is rank ``T + e * tp + r``. With
T > 1 two groups are made, the replicas' data-parallel group and the weight-sync group {0} + engines
(with T = 1 the default group serves both), and with tp > 1 one group per engine. The rendezvous store listens on a port the OS picks (no race for a free port) at its host's
IP, so ranks on other nodes reach it: ``quantrl train`` hosts it in a ``Rendezvous`` actor, a standalone
``RayEngines(world=None)`` in its own process. The weight protocol is ``sync.distributed``'s: rank 0
converts bucket by bucket through ``quantrl.formats`` and broadcasts; each engine stages the whole update
and loads it with one atomic ``update_weights``. A conversion error (NaN in a weight) reaches every
engine before anything is loaded; an engine that rejects the update keeps its previous version and its
error is raised here. The world is the default process group, so a process in it cannot hold another.

Rollout. A batch of P prompts is cut into contiguous shares as even as possible, one per engine (engines
with no share stay idle). Engine ``e`` samples with ``engine_seed(seed, e)`` (engine 0 keeps ``seed``; the
others are spread by a large odd constant, so that engine 1 at step t does not reuse engine 0's stream of
step t + 1): with one engine the samples are exactly a local ``Engine``'s; with several, each share's
samples are those of a local engine given that share and seed. ``GenerationResult.prompt_index`` refers
to the whole batch.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field, replace
from datetime import timedelta

import torch
from torch import nn

from quantrl.model.quant_scheme import QuantScheme
from quantrl.sync.buckets import DEFAULT_BUCKET_BYTES
from quantrl.sync.convert import SyncTarget
from quantrl.sync.in_process import SyncStats

RENDEZVOUS_TIMEOUT = timedelta(minutes=30)  # also bounds each collective: a weight broadcast of a large model


def import_ray():
    try:
        import ray
    except ImportError as e:
        raise ImportError("--placement ray needs Ray: pip install 'ray>=2.9' (or pip install 'quantrl[ray]')") from e
    return ray


@dataclass(frozen=True)
class EngineSpec:
    """What an engine actor builds: the decoder (weights arrive with the first sync) and its ``Engine``."""

    hf_config: dict
    "the model's config.json"
    scheme: QuantScheme = field(default_factory=QuantScheme)
    "the rollout format of every Linear"
    dtype: torch.dtype = torch.bfloat16
    "model dtype"
    device: str = "cpu"
    "cpu or cuda (the actor's GPU)"
    kv_cache_tokens: int | None = None
    "KV cache positions (None: the Engine's default budget)"
    max_batch_size: int = 256
    "concurrent sequences"
    max_seq_len: int | None = None
    "fixed positions per KV slot (needed by CUDA graphs)"
    use_cuda_graph: bool = False
    "decode under CUDA graphs"
    threads: int = 1
    "torch CPU threads in the actor"
    tp: int = 1
    "GPUs (actors) per engine, one tensor-parallel shard each (slime's --rollout-num-gpus-per-engine)"
    expert_parallel: bool = False
    "with tp > 1: MoE experts spread whole over the shards instead of each split tp ways"
    free_kv_after_generate: bool = False
    "free the KV cache after every generate (the engine shares its GPU with a trainer: --colocate)"
    kv_cache_dtype: str = "auto"
    "auto (the model dtype) or fp8_e4m3"
    kv_scales: dict[str, float] = field(default_factory=dict)
    "FP8 KV-cache scales other than 1.0, by checkpoint name (the engine's model is built, not loaded)"


@dataclass(frozen=True)
class World:
    """The ``torch.distributed`` world of a Ray run: trainer ranks [0, trainers), then the engines' ranks."""

    host: str
    "where the rendezvous store listens"
    port: int
    "its port"
    trainers: int
    "data-parallel trainer replicas (rank 0 sends the weights)"
    engines: int
    "rollout engines"
    backend: str
    "nccl | gloo"
    tp: int = 1
    "ranks (GPUs) per engine: engine e's tensor-parallel rank r is rank trainers + e * tp + r"

    @property
    def size(self) -> int:
        return self.trainers + self.engines * self.tp

    def engine_rank(self, engine: int, tp_rank: int = 0) -> int:
        return self.trainers + engine * self.tp + tp_rank


def host_world(trainers: int, engines: int, backend: str, tp: int = 1):
    """Open the world's rendezvous store in this process, on a port the OS picks. Returns (World, store);
    keep the store alive as long as the world is in use."""
    import torch.distributed as dist

    host = import_ray().util.get_node_ip_address()
    store = dist.TCPStore(host, 0, trainers + engines * tp, is_master=True, timeout=RENDEZVOUS_TIMEOUT,
                          wait_for_workers=False)  # fmt: skip
    return World(host, store.port, trainers, engines, backend, tp), store


class Rendezvous:
    """A CPU-less Ray actor that hosts a world's store inside the cluster, so the process driving a run
    (a laptop over ``ray://``, say) need not be reachable from the nodes."""

    def open(self, trainers: int, engines: int, backend: str, tp: int = 1) -> World:
        world, self._store = host_world(trainers, engines, backend, tp)
        return world


def join_world(world: World, rank: int):
    """Join as ``rank``; returns (data-parallel group, weight-sync group, tensor-parallel group): the first two
    None with one trainer (the default group then serves), the last None outside a multi-GPU engine.
    Every rank of the world must call this: making a group is collective (all make them in one order)."""
    import torch.distributed as dist

    store = dist.TCPStore(world.host, world.port, world.size, is_master=False, timeout=RENDEZVOUS_TIMEOUT)
    dist.init_process_group(world.backend, store=store, rank=rank, world_size=world.size, timeout=RENDEZVOUS_TIMEOUT)
    dp = sync = tp = None
    if world.trainers > 1:
        dp = dist.new_group(list(range(world.trainers)))
        sync = dist.new_group([0, *range(world.trainers, world.size)])
    if world.tp > 1:
        for e in range(world.engines):
            ranks = [world.engine_rank(e, r) for r in range(world.tp)]
            group = dist.new_group(ranks)
            if rank in ranks:
                tp = group
    return dp, sync, tp


def check_resources(ray, *, gpus: float, cpus: float, what: str) -> None:
    """Refuse up front what the cluster can never place (a Ray actor that does not fit waits forever)."""
    total = ray.cluster_resources()
    have_gpus, have_cpus = total.get("GPU", 0), total.get("CPU", 0)
    if gpus > have_gpus or cpus > have_cpus:
        raise RuntimeError(f"{what} needs {gpus:g} GPU(s) and {cpus:g} CPU(s); the Ray cluster has {have_gpus:g} "
                           f"GPU(s) and {have_cpus:g} CPU(s) in all")  # fmt: skip


class EngineWorker:
    """The body of one engine actor (a plain class: ``RayEngines`` wraps it with ``ray.remote``)."""

    def __init__(self, spec: EngineSpec, tp_rank: int = 0):
        from quantrl.model import build_model
        from quantrl.model.tensor_parallel import TPContext
        from quantrl.rollout import Engine

        torch.set_num_threads(max(1, spec.threads))
        # a shard of a multi-GPU engine; its group exists once the world is joined (``join`` sets it)
        self.tp = TPContext(tp_rank, spec.tp, expert_parallel=spec.expert_parallel) if spec.tp > 1 else None
        model = build_model(spec.hf_config, spec.scheme, dtype=spec.dtype, device=spec.device, tp=self.tp)
        model.set_kv_scales(spec.kv_scales)
        self.free_kv = spec.free_kv_after_generate
        self.engine = Engine(model, kv_cache_tokens=spec.kv_cache_tokens, max_batch_size=spec.max_batch_size,
                             max_seq_len=spec.max_seq_len, use_cuda_graph=spec.use_cuda_graph,
                             kv_cache_dtype=spec.kv_cache_dtype)  # fmt: skip

    def join(self, world: World, rank: int) -> None:
        if world.backend == "nccl":
            torch.cuda.set_device(0)  # the actor's one visible GPU
        _, self.sync_group, tp_group = join_world(world, rank)
        if self.tp is not None:
            self.tp.group = tp_group

    def target(self, qmax: int) -> SyncTarget:
        return SyncTarget.for_engine(self.engine, qmax=qmax)

    def generate(self, prompts, params):
        """(results, seconds); the shards of a multi-GPU engine sample in lockstep, and only its rank 0
        returns the (identical) results."""
        t0 = time.perf_counter()
        results = self.engine.generate(prompts, params)
        if self.free_kv:  # colocated: the trainer gets the memory back until the next rollout
            self.engine.cache.free()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        return (results if self.tp is None or self.tp.lead else None), time.perf_counter() - t0

    def receive(self, version: int, check_equal: bool) -> SyncStats:
        from quantrl.sync.distributed import receive_weights

        return receive_weights(self.engine, self.sync_group, src=0, version=version, check_equal=check_equal)

    def weight_version(self) -> int:
        return self.engine.weight_version

    def state(self) -> dict[str, torch.Tensor]:
        """Every engine tensor under its checkpoint name, on the CPU (for checks, not for the hot path)."""
        from quantrl.model import engine_state

        return {n: t.cpu() for n, t in engine_state(self.engine.model).items()}

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


@dataclass
class PendingRollout:
    """Samples being generated: one Ray reference per engine with a share (its rank 0's), where each share
    starts, and the other shards' references of multi-GPU engines (waited for, their results empty)."""

    refs: list
    offsets: list[int]
    shards: list = field(default_factory=list)


def engine_seed(seed: int, engine: int) -> int:
    return (seed + engine * 0x9E3779B97F4A7C15) % (1 << 63)


def shares(total: int, parts: int) -> list[tuple[int, int]]:
    """[start, stop) of ``parts`` contiguous, as-even-as-possible shares of ``total`` (the first ones larger)."""
    base, extra = divmod(total, parts)
    out, start = [], 0
    for i in range(parts):
        stop = start + base + (i < extra)
        out.append((start, stop))
        start = stop
    return out


class RayEngines:
    """``num_engines`` engine actors and the ``torch.distributed`` world that feeds them weights."""

    def __init__(self, spec: EngineSpec, num_engines: int = 1, cpus_per_engine: float = 1.0,
                 world: World | None = None, placement_group=None):  # fmt: skip
        """``world``: the run's world, this process its rank 0 (other trainer ranks join it themselves);
        None: a world of this process and the engines, its store hosted here. ``placement_group``
        (--colocate): engine ``e`` runs in bundle ``e`` with half its GPU, beside the trainer there."""
        import torch.distributed as dist

        ray = import_ray()
        if num_engines < 1:
            raise ValueError(f"num_engines must be >= 1, got {num_engines}")
        if world is not None and world.engines != num_engines:
            raise ValueError(f"the world has {world.engines} engine ranks, asked for {num_engines} engines")
        if dist.is_initialized():
            raise RuntimeError("RayEngines makes this process rank 0 of a new torch.distributed world, "
                               "but one is already initialized here")  # fmt: skip
        if not ray.is_initialized():
            raise RuntimeError("RayEngines needs a connected Ray (ray.init(...)) in this process")
        if world is not None and world.tp != spec.tp:
            raise ValueError(f"the world has {world.tp} ranks per engine, the spec asks for {spec.tp}")
        self._ray = ray
        self.workers = []  # engine e's shards are workers[e * tp : (e + 1) * tp], its rank 0 first
        self.tp = spec.tp
        cuda = torch.device(spec.device).type == "cuda"
        options = {"num_gpus": 1, "num_cpus": 1} if cuda else {"num_gpus": 0, "num_cpus": cpus_per_engine}
        if not cuda:
            spec = replace(spec, threads=max(1, int(cpus_per_engine)))
        n = num_engines * spec.tp
        if placement_group is not None and spec.tp != 1:
            raise ValueError("colocated engines take one GPU each, shared with a trainer (tp 1)")
        if placement_group is None:
            check_resources(ray, gpus=n * options["num_gpus"], cpus=n * options["num_cpus"],
                            what=f"{num_engines} rollout engine(s) of {spec.tp} GPU(s)")  # fmt: skip
        elif cuda:
            options["num_gpus"] = 0.5  # the bundle's GPU, shared with its trainer
        self._store = None
        if world is None:
            world, self._store = host_world(1, num_engines, "nccl" if cuda else "gloo", spec.tp)
        actor = ray.remote(**options)(EngineWorker)
        if placement_group is None:
            self.workers = [actor.remote(spec, r) for _ in range(num_engines) for r in range(spec.tp)]
        else:
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            self.workers = [actor.options(scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group, e))
                            .remote(spec, 0) for e in range(num_engines)]  # fmt: skip
        try:  # engines that cannot be built fail here, not as a rendezvous timeout
            ray.get([w.weight_version.remote() for w in self.workers])
            joined = [w.join.remote(world, world.trainers + i) for i, w in enumerate(self.workers)]
            self.dp_group, self.sync_group, _ = join_world(world, 0)
            ray.get(joined)
        except BaseException:
            self._kill()
            if dist.is_initialized():
                dist.destroy_process_group()
            raise
        self._outstanding: list = []  # submitted generate calls not yet collected
        self.last_wait_s = 0.0
        self.weight_version = 0

    @property
    def num_engines(self) -> int:
        return len(self.workers) // self.tp

    def target(self, qmax: int = 7) -> SyncTarget:
        """The engines' weight format (they are built from one spec, so engine 0 speaks for all)."""
        return self._ray.get(self.workers[0].target.remote(qmax))

    def submit(self, prompts, params) -> PendingRollout:
        """Start sampling ``prompts`` on the engines and return at once (``collect`` waits for the results).

        Work queues per engine: a ``sync_weights`` issued meanwhile waits for the samples to finish, so
        they come from the weights the engines held when this was called."""
        parts = [(a, b) for a, b in shares(len(prompts), self.num_engines) if b > a]
        refs, others = [], []
        for e, (a, b) in enumerate(parts):
            p = params if params.seed is None else replace(params, seed=engine_seed(params.seed, e))
            share = [list(x) for x in prompts[a:b]]
            calls = [w.generate.remote(share, p) for w in self.workers[e * self.tp : (e + 1) * self.tp]]
            refs.append(calls[0])
            others += calls[1:]
        self._outstanding += refs + others
        return PendingRollout(refs, [a for a, _ in parts], others)

    def collect(self, pending: PendingRollout) -> tuple[list, float]:
        """(results prompt-major with ``prompt_index`` into the submitted prompts, the slowest engine's seconds)."""
        results, slowest = [], 0.0
        for offset, (part, secs) in zip(pending.offsets, self._ray.get(pending.refs)):
            for r in part:
                r.prompt_index += offset
            results += part
            slowest = max(slowest, secs)
        self._ray.get(pending.shards)  # the other shards sampled the same in lockstep: done too
        done = {r.hex() for r in pending.refs + pending.shards}
        self._outstanding = [r for r in self._outstanding if r.hex() not in done]
        return results, slowest

    def generate(self, prompts, params):
        """Like ``Engine.generate``: results prompt-major, ``prompt_index`` into ``prompts``."""
        return self.collect(self.submit(prompts, params))[0]

    def sync_weights(self, trainer_model: nn.Module, version: int, *, target: SyncTarget,
                     bucket_bytes: int = DEFAULT_BUCKET_BYTES, check_equal: bool = False,
                     strict: bool = True) -> SyncStats:  # fmt: skip
        """Broadcast the trainer's weights in ``target``'s format; every engine moves to ``version``.

        Raises the trainer's ``SyncError`` (nothing loaded anywhere) or the first engine's error (that
        engine keeps its previous version); ``self.weight_version`` moves only when every engine loaded it.
        """
        from quantrl.sync.distributed import EngineRejected, send_weights

        t_wait = time.perf_counter()
        if self._outstanding:  # let submitted samples finish first: a broadcast must not wait on them
            self._ray.wait(self._outstanding, num_returns=len(self._outstanding), fetch_local=False)
        self.last_wait_s = time.perf_counter() - t_wait  # the trainer waiting for samples, not syncing
        t0 = time.perf_counter()
        pending = [w.receive.remote(int(version), check_equal) for w in self.workers]
        error: BaseException | None = None
        try:
            stats = send_weights(trainer_model, target, self.sync_group, src=0, bucket_bytes=bucket_bytes, strict=strict)
        except (ValueError, TypeError, RuntimeError) as e:
            error = e
        engine_errors = []
        for e, ref in enumerate(pending):
            try:
                self._ray.get(ref)
            except self._ray.exceptions.RayTaskError as ex:
                engine_errors.append(f"engine {e}: {ex.cause if ex.cause is not None else ex}")
            except self._ray.exceptions.RayError as ex:  # a dead engine: no update can reach it any more
                engine_errors.append(f"engine {e} is gone: {ex}")
        if isinstance(error, EngineRejected) or (error is None and engine_errors):
            raise EngineRejected(f"weight sync of version {version} to the Ray engines failed: an engine that rejected it "
                                 f"keeps its previous version (and its weights, or refuses to sample if it failed while "
                                 f"loading), the others named no error and hold version {version} "
                                 "(the engines now disagree: sync again before sampling): "
                                 + "; ".join(engine_errors)) from error  # fmt: skip
        if error is not None:  # the trainer could not convert: every engine was told and loaded nothing
            raise error
        self.weight_version = int(version)
        return replace(stats, version=int(version), seconds=time.perf_counter() - t0)

    def versions(self) -> list[int]:
        return self._ray.get([w.weight_version.remote() for w in self.workers])

    def states(self) -> list[dict[str, torch.Tensor]]:
        return self._ray.get([w.state.remote() for w in self.workers])

    def _kill(self) -> None:
        for w in self.workers:
            self._ray.kill(w)
        self.workers = []

    def close(self) -> None:
        """Leave the torch.distributed world and stop the actors (idempotent)."""
        import torch.distributed as dist

        if not self.workers:
            return
        try:
            self._ray.get([w.close.remote() for w in self.workers], timeout=60)
        except (self._ray.exceptions.RayError, TimeoutError):  # a dead actor cannot say goodbye; it is killed below
            warnings.warn("a Ray engine did not leave the weight-sync group cleanly; killing it", stacklevel=2)
        if dist.is_initialized():
            dist.destroy_process_group()
        self._kill()
