"""Rollout engines as Ray actors (``--placement ray``), on a local Ray instance with CPU actors.

After ``RayEngines.sync_weights`` every engine actor holds, bit for bit, what an in-process sync of the
same QAT trainer puts into a local engine; their samples are a local engine's (one engine: the whole
batch; several: each share with its seed); a conversion the trainer cannot do and an update the engines
reject both raise, and leave every engine on its previous version, bit for bit.
"""

import pytest
import torch

ray = pytest.importorskip("ray")

from quantrl.model import QuantScheme, engine_state
from quantrl.rollout import SamplingParams
from quantrl.rollout.weight_update import bitwise_equal
from quantrl.sync import SyncError, SyncTarget, sync_weights
from quantrl.sync.distributed import EngineRejected
from quantrl.sync.ray_engines import EngineSpec, RayEngines, engine_seed, shares
from quantrl.train.qat import QATConfig, prepare_qat

BF16 = torch.bfloat16
SCHEME = QuantScheme.int4(128)


@pytest.fixture(scope="module")
def local_ray():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


def _qat_trainer(seed=3):
    from test_sync import make_trainer, tiny_cfg

    trainer = make_trainer(tiny_cfg(), BF16, seed=seed)
    prepare_qat(trainer, QATConfig(group_size=128, qmax=7, dtype=BF16))
    return trainer


def _equal_states(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(bitwise_equal(a[n], b[n]) for n in a)


def test_shares_cover_the_batch_evenly():
    assert shares(7, 3) == [(0, 3), (3, 5), (5, 7)]
    assert shares(2, 3) == [(0, 1), (1, 2), (2, 2)]
    assert shares(6, 1) == [(0, 6)]


def test_ray_engines_match_a_local_engine(local_ray):
    from test_sync import make_engine, tiny_cfg

    spec = EngineSpec(tiny_cfg(), SCHEME, kv_cache_tokens=4096, max_batch_size=16)
    engines = RayEngines(spec, num_engines=2)
    try:
        target = engines.target(qmax=7)
        assert target == SyncTarget.for_engine(make_engine(tiny_cfg(), SCHEME), qmax=7)
        trainer = _qat_trainer()
        stats = engines.sync_weights(trainer, 1, target=target, bucket_bytes=64 << 10, check_equal=True)
        assert stats.version == 1 and stats.buckets > 1 and engines.versions() == [1, 1]
        local = make_engine(tiny_cfg(), SCHEME)
        local.cache = type(local.cache).for_model(local.model, max_tokens=4096)
        sync_weights(trainer, local, version=1)
        want = engine_state(local.model)
        states = engines.states()
        assert all(_equal_states(s, want) for s in states)

        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, 300, (int(n),), generator=g).tolist() for n in (5, 9, 3)]
        params = SamplingParams(n=2, temperature=1.0, max_new_tokens=6, seed=11)
        got = engines.generate(prompts, params)
        assert [(r.prompt_index, r.sample_index) for r in got] == [(p, s) for p in range(3) for s in range(2)]
        # engine 0 sampled prompts 0-1 with seed 11, engine 1 prompt 2 with engine_seed(11, 1)
        assert engine_seed(11, 0) == 11 and engine_seed(11, 1) not in (11, 12)
        ref = local.generate(prompts[:2], params) + local.generate(prompts[2:], SamplingParams(
            n=2, temperature=1.0, max_new_tokens=6, seed=engine_seed(11, 1)))  # fmt: skip
        assert [(r.tokens, r.logprobs, r.finish_reason) for r in got] == [
            (r.tokens, r.logprobs, r.finish_reason) for r in ref]  # fmt: skip
        assert all(r.weight_version == 1 for r in got)

        # 1. the trainer cannot convert (NaN): nothing is loaded anywhere
        nan = _qat_trainer()
        with torch.no_grad():
            nan.get_parameter("model.layers.0.self_attn.o_proj.weight")[0, 0] = float("nan")
        with pytest.raises(SyncError, match="o_proj.weight"):
            engines.sync_weights(nan, 2, target=target, bucket_bytes=64 << 10)
        # 2. the engines reject the update (scales for group 64): both say why, both keep version 1
        with pytest.raises(EngineRejected, match="(?s)engine 0: .*scale.*engine 1: "):
            engines.sync_weights(_qat_trainer(seed=4), 3, target=target.replace(group_size=64), strict=False)
        assert engines.weight_version == 1 and engines.versions() == [1, 1]
        assert all(_equal_states(s, want) for s in engines.states())
    finally:
        engines.close()
    assert engines.workers == []


def _synced_with_a_local_twin(engines, cfg: dict):
    """An fp32 trainer's weights synced (checked) into the Ray engines and into a local engine: that local
    engine and the state it holds."""
    from test_sync import make_engine, make_trainer

    trainer = make_trainer(cfg, torch.float32)
    engines.sync_weights(trainer, 1, target=engines.target(qmax=7), check_equal=True)
    local = make_engine(cfg, QuantScheme(), torch.float32)
    local.cache = type(local.cache).for_model(local.model, max_tokens=4096)
    sync_weights(trainer, local, version=1)
    return local, engine_state(local.model)


def _assert_samples_alike(engines, local, lengths, prompt_seed: int, seed: int) -> None:
    """The Ray engines sample the local engine's tokens, with its logprobs to fp32 rounding."""
    g = torch.Generator().manual_seed(prompt_seed)
    prompts = [torch.randint(0, 300, (int(n),), generator=g).tolist() for n in lengths]
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=6, seed=seed)
    got, ref = engines.generate(prompts, params), local.generate(prompts, params)
    assert [r.tokens for r in got] == [r.tokens for r in ref]
    assert max(abs(a - b) for x, y in zip(got, ref) for a, b in zip(x.logprobs, y.logprobs)) < 1e-5


def test_a_two_gpu_engine_holds_its_shards_and_samples_what_one_process_samples(local_ray):
    """--rollout-num-gpus-per-engine 2: one engine over two actors (tensor parallelism, gloo here). After a
    sync each shard holds its rows / columns of what a local engine holds (the row-parallel o_proj bias on
    rank 0 only, half the vocabulary's embedding rows), and the engine samples the local engine's tokens,
    with its logprobs to fp32 rounding."""
    from test_sync import tiny_cfg

    f32 = torch.float32
    spec = EngineSpec(tiny_cfg(), QuantScheme(), f32, kv_cache_tokens=4096, max_batch_size=16, tp=2)
    engines = RayEngines(spec, num_engines=1)
    try:
        assert engines.num_engines == 1 and len(engines.workers) == 2
        local, want = _synced_with_a_local_twin(engines, tiny_cfg())
        attn = "model.layers.1.self_attn"
        for rank, state in enumerate(engines.states()):
            assert torch.equal(state[f"{attn}.q_proj.weight"], want[f"{attn}.q_proj.weight"].chunk(2, 0)[rank])
            assert torch.equal(state[f"{attn}.o_proj.weight"], want[f"{attn}.o_proj.weight"].chunk(2, 1)[rank])
            bias = want[f"{attn}.o_proj.bias"] if rank == 0 else torch.zeros_like(want[f"{attn}.o_proj.bias"])
            assert torch.equal(state[f"{attn}.o_proj.bias"], bias)
            assert torch.equal(state["model.embed_tokens.weight"], want["model.embed_tokens.weight"].chunk(2, 0)[rank])
        assert engines.versions() == [1, 1]
        _assert_samples_alike(engines, local, (5, 9, 3), prompt_seed=0, seed=11)
    finally:
        engines.close()


def test_an_expert_parallel_engine_holds_half_the_experts_and_samples_like_one_process(local_ray):
    from _tiny_models import qwen3_moe_config

    cfg = qwen3_moe_config(num_experts=4, moe_intermediate_size=64).to_dict()
    f32 = torch.float32
    spec = EngineSpec(cfg, QuantScheme(), f32, kv_cache_tokens=4096, max_batch_size=16, tp=2, expert_parallel=True)
    engines = RayEngines(spec, num_engines=1)
    try:
        local, want = _synced_with_a_local_twin(engines, cfg)
        for rank, state in enumerate(engines.states()):
            held = sorted({n.split(".experts.")[1].split(".")[0] for n in state if n.startswith("model.layers.0.mlp.experts.")})
            assert held == [str(j) for j in range(2 * rank, 2 * rank + 2)]  # experts 0-1 on rank 0, 2-3 on rank 1
            w = f"model.layers.0.mlp.experts.{2 * rank}.down_proj.weight"
            assert torch.equal(state[w], want[w])  # whole, not split
        _assert_samples_alike(engines, local, (4, 7), prompt_seed=1, seed=5)
    finally:
        engines.close()
