"""Tests over several CPU processes: ``spawn_gloo(body, world, tmp_path, *args)`` runs ``body(rank, world,
*args)`` in ``world`` processes joined in one gloo group (a file rendezvous: a TCP port picked free here
can be taken before the workers bind it)."""

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world: int, store_file: str, body, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))  # fmt: skip
    try:
        body(rank, world, *args)
    finally:
        dist.destroy_process_group()
    # Passed. Leave without C++ static destructors: now and then (1 run in 4 right after a Ray test in the
    # same pytest process) a gloo thread calls std::terminate while the interpreter finalizes, which
    # mp.spawn reports as a failed rank although every check above passed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_gloo(body, world: int, tmp_path, *args) -> None:
    """``body`` must be a module-level function (the workers import it by name)."""
    mp.spawn(_worker, args=(world, str(tmp_path / "rendezvous"), body, args), nprocs=world, join=True)
