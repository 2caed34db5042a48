"""Data-parallel training (``Trainer(dp_group=...)``), two gloo processes on CPU.

Each replica trains on its own rows of every batch; the step must equal one trainer's step on the whole
batch (fp32 model: equal up to the order in which fp32 sums are taken) and both replicas must end with
bit-identical parameters. Uneven token counts per row make a wrong normalization (per replica instead
of over the group) visible. A bf16 model with the optimizer offloaded must take exactly the whole
batch's step.
"""

import functools
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from quantrl.train.trainer import TrainConfig, Trainer

STEPS = 3


def _worker(rank: int, world: int, store_file: str) -> None:
    from test_trainer import batch, lm_loss, tiny

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))  # fmt: skip
    try:
        b = batch(n=6, t=16)
        b["loss_mask"][:, :5] = 0
        b["loss_mask"][0, :12] = 0  # replica 0's rows carry fewer tokens than replica 1's
        cfg = TrainConfig(mode="int4-qat", lr=1e-3, micro_batch_size=2, qat_group_size=64)
        whole = Trainer(tiny(torch.float32), cfg)
        dp = Trainer(tiny(torch.float32), cfg, dp_group=dist.group.WORLD)
        rows = slice(3 * rank, 3 * rank + 3)
        dp._dp_sum_grads = functools.partial(dp._dp_sum_grads, bucket_elems=20_000)  # several buckets
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
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # passed; skip C++ static destructors (see test_sync_distributed)


def test_two_replicas_take_the_whole_batch_step(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "rendezvous")), nprocs=2, join=True)
