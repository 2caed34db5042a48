"""Data-parallel communication for the trainer: gradient sums over the replicas, and the distributed
optimizer's two collectives.

Plain data parallelism all-reduces every fp32 gradient, so every replica holds all gradients and steps
the whole model's fp32 masters and Adam moments (18 B per parameter on every GPU, with bf16 weights).

The distributed optimizer (Megatron/slime's ``--use-distributed-optimizer``, ZeRO stage 1 with the
gradients freed after the reduction) gives each replica the masters and moments of one contiguous run
of parameters, about 1/N of the model's elements (``owners``): each gradient is *reduced* to its owner
only, the owner steps it, and the stepped weights are *broadcast* from their owners. Parameters are
never split, so each element's update is the very arithmetic one replica would do with all of them; the
gradient norm is assembled from per-parameter norms in parameter order, the same vector one replica
would stack. With two replicas (where any reduction order gives the same a+b) sharded and unsharded
steps are equal bit for bit.

Buckets hold consecutive parameters of one owner, dtype and device, at most ``bucket_elems`` elements
(a parameter larger than that is a bucket of its own), so each collective is one flat tensor.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist

DEFAULT_BUCKET_ELEMS = 1 << 26  # 256 MB of fp32


def comm_device(group=None) -> torch.device:
    """Where a backend's buffers live: the current CUDA device for NCCL, the CPU otherwise."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def owners(numels: Sequence[int], world: int) -> list[int]:
    """The rank owning each parameter: contiguous runs, balanced by element count (a parameter goes to the
    rank whose 1/``world`` share of all elements holds its midpoint)."""
    total = sum(numels)
    out, seen = [], 0
    for n in numels:
        out.append(min(world - 1, int((seen + n / 2) * world // max(total, 1))))
        seen += n
    return out


def _buckets(idx: Sequence[int], keys: Sequence, sizes: Sequence[int], bucket_elems: int) -> Iterator[list[int]]:
    """Runs of consecutive ``idx`` with one key, at most ``bucket_elems`` elements (or one parameter)."""
    bucket, size = [], 0
    for i in idx:
        if bucket and (keys[i] != keys[bucket[0]] or size + sizes[i] > bucket_elems):
            yield bucket
            bucket, size = [], 0
        bucket.append(i)
        size += sizes[i]
    if bucket:
        yield bucket


@torch.no_grad()
def sum_gradients(opt, group, *, to_owners: bool = False, bucket_elems: int = DEFAULT_BUCKET_ELEMS) -> None:
    """Sum the (fp32, already token-normalized) gradients of ``opt`` (a ``MasterAdamW``) over ``group``.

    ``to_owners=False``: all-reduce; every replica ends with every sum. ``to_owners=True`` (the distributed
    optimizer): each sum lands on the parameter's owner (``opt.owner``) alone, and the others drop their
    copy. A parameter no replica has a gradient for keeps None everywhere.
    """
    grads = opt.master_grads()
    params = opt.params
    dev = comm_device(group)
    has = torch.tensor([g is not None for g in grads], dtype=torch.int32, device=dev)
    dist.all_reduce(has, op=dist.ReduceOp.MAX, group=group)
    live = [i for i, h in enumerate(has.tolist()) if h]
    rank = dist.get_rank(group)
    keys = opt.owner if to_owners else [0] * len(params)
    for bucket in _buckets(live, keys, [p.numel() for p in params], bucket_elems):
        flat = torch.cat([(grads[i] if grads[i] is not None else torch.zeros(params[i].shape, device=params[i].device))
                          .reshape(-1).to(dev) for i in bucket])  # fmt: skip
        owner = keys[bucket[0]]
        if to_owners:
            dist.reduce(flat, dst=dist.get_global_rank(group, owner) if group is not None else owner, group=group)
        else:
            dist.all_reduce(flat, group=group)
        offset = 0
        for i in bucket:
            p = params[i]
            mine = not to_owners or owner == rank
            opt.set_master_grad(i, flat[offset : offset + p.numel()].view(p.shape).to(p.device) if mine else None)
            offset += p.numel()
        del flat


def sharded_grad_norm(grads: Sequence[torch.Tensor | None], group) -> torch.Tensor | None:
    """The global L2 norm when each gradient lives on its owner alone (None elsewhere): per-parameter norms,
    summed over ``group`` (each owner's entry plus exact zeros), then the norm of those that have a
    gradient anywhere, in parameter order: the vector one replica holding every gradient would stack.
    None when no replica has a gradient."""
    dev = comm_device(group)
    norms = torch.zeros(len(grads), device=dev)
    live = torch.zeros(len(grads), dtype=torch.int32, device=dev)
    for i, g in enumerate(grads):
        if g is not None:
            norms[i], live[i] = torch.linalg.vector_norm(g).to(dev), 1
    dist.all_reduce(live, op=dist.ReduceOp.MAX, group=group)
    dist.all_reduce(norms, group=group)
    if not live.any():
        return None
    return torch.linalg.vector_norm(norms[live.bool()])


@torch.no_grad()
def broadcast_from_owners(opt, group, bucket_elems: int = DEFAULT_BUCKET_ELEMS) -> None:
    """After a distributed-optimizer step: every parameter's stepped weights from its owner to the others."""
    params = opt.params
    dev = comm_device(group)
    rank = dist.get_rank(group)
    keys = [(o, p.dtype) for o, p in zip(opt.owner, params)]
    for bucket in _buckets(range(len(params)), keys, [p.numel() for p in params], bucket_elems):
        owner, dtype = keys[bucket[0]]
        if owner == rank:
            flat = torch.cat([params[i].detach().reshape(-1).to(dev) for i in bucket])
        else:
            flat = torch.empty(sum(params[i].numel() for i in bucket), dtype=dtype, device=dev)
        # as bytes: gloo does not broadcast every dtype (bf16), and bytes are what must arrive
        src = dist.get_global_rank(group, owner) if group is not None else owner
        dist.broadcast(flat.view(torch.uint8), src=src, group=group)
        if owner != rank:
            offset = 0
            for i in bucket:
                p = params[i]
                p.copy_(flat[offset : offset + p.numel()].view(p.shape))  # bumps p._version: QAT/FP8 caches follow
                offset += p.numel()
        del flat
