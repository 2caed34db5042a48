"""Data-parallel training (``Trainer(dp_group=...)``), two gloo processes on CPU.

Each replica trains on its own rows of every batch; the step must equal one trainer's step on the whole
batch (fp32 model: equal up to the order in which fp32 sums are taken) and both replicas must end with
bit-identical parameters. Uneven token counts per row make a wrong normalization (per replica instead
of over the group) visible. A bf16 model with the optimizer offloaded must take exactly the whole
batch's step. The distributed optimizer (each replica steps the parameters it owns) must take plain data
parallelism's steps bit for bit, hold only its share of the state, and save shards that merge into the
state of one optimizer and load into any sharding.
"""

import dataclasses

import torch
import torch.distributed as dist
from _gloo import spawn_gloo

from quantrl.train.optimizer import merge_state_dicts
from quantrl.train.trainer import TrainConfig, Trainer

STEPS = 3


def _replicas(rank: int, world: int) -> None:
    from test_trainer import batch, lm_loss, tiny

    b = batch(n=6, t=16)
    b["loss_mask"][:, :5] = 0
    b["loss_mask"][0, :12] = 0  # replica 0's rows carry fewer tokens than replica 1's
    cfg = TrainConfig(mode="int4-qat", lr=1e-3, micro_batch_size=2, qat_group_size=64)
    whole = Trainer(tiny(torch.float32), cfg)
    dp = Trainer(tiny(torch.float32), cfg, dp_group=dist.group.WORLD)
    rows = slice(3 * rank, 3 * rank + 3)
    dp.bucket_elems = 20_000  # several buckets
    for _ in range(STEPS):
        want = whole.train_step(b, lm_loss)
        got = dp.train_step({k: v[rows] for k, v in b.items()}, lm_loss)
        assert abs(got["loss"] - want["loss"]) <= 1e-5 * abs(want["loss"]), (got, want)
        assert abs(got["grad_norm"] - want["grad_norm"]) <= 1e-4 * want["grad_norm"], (got, want)
        assert got["tokens"] == want["tokens"]  # metric sums cover the whole batch
    for (name, p), (_, q) in zip(dp.model.named_parameters(), whole.model.named_parameters()):
        assert torch.allclose(p, q, rtol=0, atol=1e-5), name
        mine, others = p.detach().clone(), [torch.empty_like(p) for _ in range(world)]
        dist.all_gather(others, mine)
        assert all(torch.equal(mine, o) for o in others), f"replicas differ in {name}"
    # bf16 parameters, fp32 gradients and masters apart from them, the optimizer offloaded. One micro-batch
    # per replica is one of the whole trainer's: the same bf16 gradients, summed in fp32 by both (two
    # terms: in either order the same bits), so the steps are equal bit for bit.
    cfg = TrainConfig(mode="int4-qat", lr=1e-3, micro_batch_size=3, qat_group_size=64, optimizer_cpu_offload=True)
    whole, dp = Trainer(tiny(), cfg), Trainer(tiny(), cfg, dp_group=dist.group.WORLD)
    for _ in range(STEPS):
        want = whole.train_step(b, lm_loss)
        assert dp.train_step({k: v[rows] for k, v in b.items()}, lm_loss) == want
    for (name, p), (_, q) in zip(dp.model.named_parameters(), whole.model.named_parameters()):
        assert p.dtype == torch.bfloat16 and torch.equal(p, q), name
    for dtype, offload in ((torch.float32, False), (torch.bfloat16, True)):
        _distributed_optimizer(rank, world, {k: v[rows] for k, v in b.items()}, dtype, offload)


def _distributed_optimizer(rank, world, rows, dtype, offload):
    from test_trainer import lm_loss, tiny

    cfg = TrainConfig(mode="int4-qat", lr=1e-3, micro_batch_size=2, qat_group_size=64, optimizer_cpu_offload=offload)
    plain = Trainer(tiny(dtype), cfg, dp_group=dist.group.WORLD)
    zero = Trainer(tiny(dtype), dataclasses.replace(cfg, distributed_optimizer=True), dp_group=dist.group.WORLD)
    zero.bucket_elems = 20_000  # buckets cut by owner and by size
    for _ in range(STEPS):
        assert zero.train_step(rows, lm_loss) == plain.train_step(rows, lm_loss)
    for (name, p), (_, q) in zip(zero.model.named_parameters(), plain.model.named_parameters()):
        assert torch.equal(p, q), name
    opt = zero.optimizer
    owned = [m is not None for m in opt.masters]
    assert owned == [o == rank for o in opt.owner] and 0 < sum(owned) < len(owned)
    assert len(opt.opt.state) == sum(owned)  # Adam moments for its own parameters only
    held = torch.tensor([sum(p.numel() for p, o in zip(opt.params, owned) if o)])
    dist.all_reduce(held)
    assert int(held) == sum(p.numel() for p in opt.params)  # the shards cover the model once
    shards = [None] * world
    dist.all_gather_object(shards, opt.state_dict())
    merged, full = merge_state_dicts(shards), plain.optimizer.state_dict()
    assert merged["params"].keys() == full["params"].keys()
    for name, entry in full["params"].items():
        assert entry.keys() == merged["params"][name].keys()
        assert all(torch.equal(v, merged["params"][name][k]) for k, v in entry.items()), name
    # the unsharded state resumes sharded, and the merged shards resume unsharded: the runs go on as one
    resumed = Trainer(tiny(dtype), dataclasses.replace(cfg, distributed_optimizer=True), dp_group=dist.group.WORLD)
    unsharded = Trainer(tiny(dtype), cfg, dp_group=dist.group.WORLD)
    for tr, state in ((resumed, full), (unsharded, merged)):
        tr.model.load_state_dict(plain.model.state_dict())
        tr.optimizer.load_state_dict(state)
    want = plain.train_step(rows, lm_loss)
    assert resumed.train_step(rows, lm_loss) == want == unsharded.train_step(rows, lm_loss)
    for (name, p), (_, q), (_, r) in zip(resumed.model.named_parameters(), plain.model.named_parameters(),
                                         unsharded.model.named_parameters()):  # fmt: skip
        assert torch.equal(p, q) and torch.equal(r, q), name


def test_two_replicas_take_the_whole_batch_step(tmp_path):
    spawn_gloo(_replicas, 2, tmp_path)
