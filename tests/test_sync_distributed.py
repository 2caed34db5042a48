"""Weight sync over ``torch.distributed`` (gloo, two CPU processes on loopback).

Rank 0 is the trainer (INT4 QAT), rank 1 the engine. The engine must end up bit for bit where an
in-process sync of the same trainer puts it, with ``check_equal=True`` passing; an update the engine
rejects, a conversion the trainer cannot do, and an engine failure of any type must raise on both ranks
(not hang one in a collective) and leave the engine as it was.
"""


import pytest
import torch
from _gloo import spawn_gloo

from quantrl.model import QuantScheme, engine_state
from quantrl.rollout.weight_update import bitwise_equal
from quantrl.sync import SyncError, SyncTarget, sync_weights
from quantrl.sync.distributed import receive_weights, send_weights
from quantrl.train.qat import QATConfig, prepare_qat

BF16 = torch.bfloat16
SCHEME = QuantScheme.int4(128)


def _qat_trainer():
    from test_sync import make_trainer, tiny_cfg

    trainer = make_trainer(tiny_cfg(), BF16, seed=3)
    prepare_qat(trainer, QATConfig(group_size=128, qmax=7, dtype=BF16))
    return trainer


def _trainer_rank() -> None:
    from test_sync import make_trainer, tiny_cfg

    target = SyncTarget.from_scheme(SCHEME, BF16, qmax=7)  # no engine in this process
    stats = send_weights(_qat_trainer(), target, src=0, bucket_bytes=64 << 10)
    assert stats.buckets > 1 and stats.tensors == 3 + 14 * 3 + 2 * 8 and stats.trainer_bytes > 0
    # 1. the engine rejects the update (scale shapes for group 64): the trainer learns it
    with pytest.raises(RuntimeError, match="an engine rank rejected the update"):
        send_weights(make_trainer(tiny_cfg(), BF16), target.replace(group_size=64), src=0)
    # 2. the trainer cannot convert (NaN): it raises, and the engine is told
    nan = make_trainer(tiny_cfg(), BF16)
    with torch.no_grad():
        nan.get_parameter("model.layers.0.self_attn.o_proj.weight")[0, 0] = float("nan")
    with pytest.raises(SyncError, match="o_proj.weight"):
        send_weights(nan, target, src=0, bucket_bytes=64 << 10)
    # 3. the engine fails in a way no validation names (a TypeError): the trainer learns it, no hang
    with pytest.raises(RuntimeError, match="an engine rank rejected the update"):
        send_weights(_qat_trainer(), target, src=0)


def _engine_rank() -> None:
    from test_sync import make_engine, snapshot, tiny_cfg, unchanged

    engine = make_engine(tiny_cfg(), SCHEME)
    stats = receive_weights(engine, src=0, version=3, check_equal=True)
    assert engine.weight_version == 3 and stats.buckets > 1
    reference = make_engine(tiny_cfg(), SCHEME)
    sync_weights(_qat_trainer(), reference, version=3)
    got, want = engine_state(engine.model), engine_state(reference.model)
    assert got.keys() == want.keys() and all(bitwise_equal(got[n], want[n]) for n in want)
    before = snapshot(engine)
    with pytest.raises(ValueError, match="nothing was loaded"):
        receive_weights(engine, src=0, version=4)
    assert engine.weight_version == 3 and unchanged(engine, before)
    with pytest.raises(SyncError, match=r"the trainer \(rank 0\) failed.*o_proj.weight"):
        receive_weights(engine, src=0, version=5, check_equal=True)
    assert engine.weight_version == 3 and unchanged(engine, before)

    def broken(*args, **kwargs):
        raise TypeError("an engine bug")

    engine.update_weights = broken
    with pytest.raises(TypeError, match="an engine bug"):
        receive_weights(engine, src=0, version=6)


def _ranks(rank: int, world: int) -> None:
    (_trainer_rank if rank == 0 else _engine_rank)()


def test_gloo_broadcast_sync_equals_in_process_sync(tmp_path):
    spawn_gloo(_ranks, 2, tmp_path)
