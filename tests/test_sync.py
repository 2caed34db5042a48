"""Weight sync (in-process): the engine computes with exactly the trainer's (quantized) forward weights.

Bitwise claims (atol = rtol = 0) after ``sync_weights``: INT4 engine dequantized weights == the QAT
Linears' fake-quantized weights; FP8 engine == ``fake_quantize_fp8(trainer weight)``; BF16 engine ==
the trainer's weights in bf16; every non-Linear tensor == the trainer's, cast. End to end (fp32, INT4
QAT): engine sampling logprobs == the trainer's recomputed logprobs within 1e-5 (fp32 rounding of two
summation orders; the engine tests measure ~1e-6), while the unquantized master weights miss by far more.
A sync that cannot produce the engine's weights raises and leaves the engine's version and tensors as
they were, bit for bit.
"""

import pytest
import torch
from _tiny_models import qwen3_config, random_prompts

from quantrl.formats import fake_quantize_fp8, fake_quantize_nvfp4
from quantrl.model import QuantScheme, build_model, dequantized_weights, engine_state, random_init_
from quantrl.model.state import linear_modules
from quantrl.rollout import Engine, SamplingParams
from quantrl.rollout.weight_update import bitwise_equal
from quantrl.sync import (
    SyncError,
    SyncTarget,
    engine_tensors,
    flatten_bucket,
    iter_buckets,
    sync_weights,
    trainer_params,
    unflatten_bucket,
)
from quantrl.sync.buckets import ALIGN
from quantrl.train.fp8_linear import Fp8BlockTrainLinear, prepare_fp8_training
from quantrl.train.logprobs import token_logprobs
from quantrl.train.qat import QATConfig, QATLinear, prepare_qat

BF16, FP32 = torch.bfloat16, torch.float32
LOGPROB_ATOL = 1e-5



def tiny_cfg(**kw) -> dict:
    """Qwen3, 2 layers, hidden 128 / intermediate 256 (every K a multiple of 128), k/v_proj N = 64 (a ragged
    128x128 FP8 block), q/k/v/o biases, vocab 300."""
    return qwen3_config(hidden_size=128, intermediate_size=256, head_dim=32, attention_bias=True, **kw).to_dict()


def make_trainer(cfg: dict, dtype: torch.dtype, seed: int = 1):
    model = random_init_(build_model(cfg, dtype=dtype), seed=seed, std=0.1)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # norms away from 1, so that syncing them matters
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
    return model


def make_engine(cfg: dict, scheme: QuantScheme, dtype: torch.dtype = BF16) -> Engine:
    return Engine(random_init_(build_model(cfg, scheme, dtype=dtype), seed=7), kv_cache_tokens=128)


def snapshot(engine: Engine) -> dict:
    return {n: t.clone() for n, t in engine_state(engine.model).items()}


def unchanged(engine: Engine, before: dict) -> bool:
    now = engine_state(engine.model)
    return now.keys() == before.keys() and all(bitwise_equal(now[n], t) for n, t in before.items())


FP8_CHANNEL_CT = QuantScheme(method="fp8", fp8_strategy="channel", scale_suffix="weight_scale", act_strategy="token",
                             scale_dtype=FP32)  # fmt: skip
CASES = {  # name: (engine scheme, trainer dtype, trainer mode, tied embeddings)
    "bf16": (QuantScheme(), BF16, None, False),
    "fp8-block": (QuantScheme.fp8_block(), BF16, None, False),
    "fp8-block-fp32-master": (QuantScheme.fp8_block(), FP32, None, False),
    "fp8-channel-compressed-tensors": (FP8_CHANNEL_CT, BF16, None, False),
    "fp8-train-param-gather": (QuantScheme.fp8_block(), BF16, "fp8", False),
    "int4-qat": (QuantScheme.int4(128), BF16, "qat", False),
    "int4-qat-qmax8": (QuantScheme.int4(128), BF16, "qat-qmax8", False),  # for_engine takes qmax from the QAT config
    "int4-qat-tied": (QuantScheme.int4(128), BF16, "qat", True),
    "mxfp8": (QuantScheme.mxfp8(), BF16, None, False),
    "mxfp8-qat": (QuantScheme.mxfp8(), BF16, "mxfp8-qat", False),
    "nvfp4-ptq": (QuantScheme.nvfp4(), BF16, None, False),
    "nvfp4-ptq-fp32-master": (QuantScheme.nvfp4(), FP32, None, False),
    "nvfp4-qat": (QuantScheme.nvfp4(), BF16, "nvfp4-qat", False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_engine_weights_bitwise_equal_trainer_forward_weights(case, monkeypatch):
    scheme, tdtype, mode, tied = CASES[case]
    cfg = tiny_cfg(tie_word_embeddings=tied)
    trainer = make_trainer(cfg, tdtype)
    if mode in ("qat", "qat-qmax8"):
        prepare_qat(trainer, QATConfig(group_size=128, qmax=8 if mode == "qat-qmax8" else 7, dtype=BF16))
    elif mode in ("nvfp4-qat", "mxfp8-qat"):
        prepare_qat(trainer, QATConfig(fmt=mode.removesuffix("-qat"), dtype=BF16))
    elif mode == "fp8":
        prepare_fp8_training(trainer, fp8_param_gather=True)
    engine = make_engine(cfg, scheme)
    calls = []
    if mode == "fp8":  # the cached fp8_weight() must be handed over, not recomputed
        import quantrl.sync.convert as conv

        orig = conv.quantize_fp8
        monkeypatch.setattr(conv, "quantize_fp8", lambda *a, **k: calls.append(1) or orig(*a, **k))

    stats = sync_weights(trainer, engine, version=5, bucket_bytes=64 << 10, check_equal=True)

    assert engine.weight_version == 5
    assert stats.buckets > 1 and stats.tensors == len(engine_state(engine.model))  # every engine tensor, once
    assert calls == []
    deq = dequantized_weights(engine.model)
    engine_linears = linear_modules(engine.model)
    assert sum(type(m).__name__ != "Bf16Linear" for m in engine_linears.values()) == (0 if case == "bf16" else 14)
    for name in deq:
        tmod = trainer.get_submodule(name.removesuffix(".weight"))
        w = tmod.weight.detach()
        if isinstance(tmod, QATLinear):
            with torch.no_grad():
                expected = tmod.fake_quantized_weight()
        elif scheme.method == "fp8" and name != "lm_head.weight":
            expected = fake_quantize_fp8(w, scheme.fp8_strategy, scheme.block_size, scheme.scale_fmt, dtype=BF16)
        elif scheme.method == "nvfp4" and name != "lm_head.weight":
            expected = fake_quantize_nvfp4(w, BF16)  # of the master as held: an fp32 one is not rounded first
        else:
            expected = w.to(BF16)
        assert expected.dtype == BF16 and torch.equal(deq[name], expected), name
        if isinstance(tmod, Fp8BlockTrainLinear):
            assert torch.equal(deq[name], fake_quantize_fp8(w, dtype=BF16))
    # embedding, norms, biases: the trainer's values in the engine's dtype
    linear_weights = {f"{n}.weight" for n in engine_linears}
    plain = [(n, p) for n, p in trainer_params(trainer) if n not in linear_weights]
    assert len(plain) == 1 + 2 * (4 + 4) + 1  # embedding, per layer 4 norms + 4 biases, final norm
    assert any(n == "lm_head.weight" for n, _ in trainer_params(trainer)) == (not tied)  # tied: sent once
    state = engine_state(engine.model)
    for n, p in plain:
        assert bitwise_equal(state[n], p.detach().to(BF16)), n


def test_fp32_master_is_quantized_as_held_not_rounded_to_bf16_first():
    """The FP8 engine gets quantize(master), what an FP8 training forward uses; quantize(bf16(master))
    would differ on some elements (a double rounding), so the choice is observable."""
    w = torch.randn(256, 128, generator=torch.Generator().manual_seed(0)) * 0.05
    target = SyncTarget(method="fp8", modules=frozenset({"m"}))
    (_, q), (_, s) = list(engine_tensors([("m.weight", w)], target))
    (_, q16), _ = list(engine_tensors([("m.weight", w.to(BF16))], target))
    assert not bitwise_equal(q, q16)
    assert torch.equal(q.float() * s.repeat_interleave(128, 0).repeat_interleave(128, 1), fake_quantize_fp8(w))


@pytest.mark.parametrize("fmt", ["int4", "nvfp4", "mxfp8"])
def test_qat_engine_logprobs_equal_trainer_recompute(fmt):
    cfg = tiny_cfg()
    trainer = make_trainer(cfg, FP32)
    master = make_trainer(cfg, FP32)  # the same weights without QAT: the negative control
    if fmt == "int4":
        prepare_qat(trainer, QATConfig(group_size=128, qmax=7, dtype=FP32))
        scheme = QuantScheme(method="int", num_bits=4, group_size=128, scale_dtype=FP32)
    else:
        prepare_qat(trainer, QATConfig(fmt=fmt, dtype=FP32))
        scheme = QuantScheme.nvfp4() if fmt == "nvfp4" else QuantScheme.mxfp8()
    engine = make_engine(cfg, scheme, FP32)
    sync_weights(trainer, engine, version=1)

    prompts = random_prompts([3, 9, 5], seed=3)
    results = engine.generate(prompts, SamplingParams(n=2, temperature=0.9, max_new_tokens=8, seed=0))
    assert all(r.weight_version == 1 for r in results)
    worst = control = 0.0
    for r in results:
        prompt = prompts[r.prompt_index]
        ids = torch.tensor([prompt + r.tokens])
        rollout = torch.tensor(r.logprobs)
        with torch.no_grad():
            lp = token_logprobs(trainer, ids, temperature=0.9)[0][0, len(prompt) - 1 :]
            lp_master = token_logprobs(master, ids, temperature=0.9)[0][0, len(prompt) - 1 :]
        worst = max(worst, float((lp - rollout).abs().max()))
        control = max(control, float((lp_master - rollout).abs().max()))
    assert worst <= LOGPROB_ATOL, worst
    assert control > 100 * LOGPROB_ATOL, control  # the comparison can tell quantized from unquantized weights


def test_bad_syncs_raise_and_leave_the_engine_unchanged():
    cfg = tiny_cfg()
    engine = make_engine(cfg, QuantScheme.int4(128))
    engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=2, seed=0))
    before = snapshot(engine)
    plain = make_trainer(cfg, BF16)

    def qat(**kw):
        t = make_trainer(cfg, BF16)
        prepare_qat(t, QATConfig(**{"group_size": 128, "qmax": 7, "dtype": BF16, **kw}))
        return t

    nan = make_trainer(cfg, BF16)
    with torch.no_grad():
        nan.get_parameter("model.layers.1.mlp.down_proj.weight")[3, 5] = float("nan")
    bad = {
        # the engine refuses the shapes: weight_scale [N, K/64] where it holds [N, K/128]
        "target group size": (plain, SyncTarget.for_engine(engine).replace(group_size=64), "nothing was loaded"),
        "qat group size": (qat(group_size=64), None, "group_size 64 vs engine 128"),
        "qat vs explicit qmax": (qat(qmax=8), SyncTarget.for_engine(engine, qmax=7), "qmax 8 vs engine 7"),
        "qat dtype": (qat(dtype=FP32), None, "scale dtype torch.float32 vs engine torch.bfloat16"),
        "qat into bf16 target": (qat(), SyncTarget(method="none"), "trains with INT4 QAT"),
        "nvfp4 qat into an int4 engine": (qat(fmt="nvfp4"), None, "trains with NVFP4 QAT but the engine holds it as int4"),
        "mxfp8 qat into 128-block fp8": (qat(fmt="mxfp8"), SyncTarget(method="fp8"), r"blocks \(1, 32\) vs engine \(128, 128\)"),
        "nan": (nan, None, "'model.layers.1.mlp.down_proj.weight'.*non-finite"),
        "tied trainer, untied engine": (make_trainer(tiny_cfg(tie_word_embeddings=True), BF16), None,
                                        r"no value for 1 engine tensor\(s\), e.g. \['lm_head.weight'\]"),
    }  # fmt: skip
    for why, (trainer, target, match) in bad.items():
        with pytest.raises(ValueError, match=match):
            sync_weights(trainer, engine, version=1, target=target)
        assert engine.weight_version == 0, why
        assert unchanged(engine, before), why


def test_fp8_training_needs_a_block_fp8_engine():
    cfg = tiny_cfg()
    trainer = make_trainer(cfg, BF16)
    prepare_fp8_training(trainer)
    # bf16 block scales (QuantScheme(method="fp8")'s default) would round the forward's fp32 ones
    for scheme, why in ((FP8_CHANNEL_CT, "128x128 blocks"), (QuantScheme.int4(128), "128x128 blocks"),
                        (QuantScheme(), "128x128 blocks"), (QuantScheme(method="fp8"), "torch.bfloat16 ones")):
        engine = make_engine(cfg, scheme)
        before = snapshot(engine)
        with pytest.raises(SyncError, match=why):
            sync_weights(trainer, engine, version=1)
        assert engine.weight_version == 0 and unchanged(engine, before)


@pytest.mark.parametrize("scheme", [QuantScheme.fp8_block(), FP8_CHANNEL_CT, QuantScheme.mxfp8(), QuantScheme.int4(128),
                                    QuantScheme.nvfp4(), QuantScheme()],
                         ids=["fp8-block", "fp8-channel", "mxfp8", "int4", "nvfp4", "bf16"])  # fmt: skip
def test_target_from_scheme_matches_the_engine(scheme):
    """A trainer process without the engine (distributed sync) builds the same target from the scheme."""
    cfg = tiny_cfg()
    engine = make_engine(cfg, scheme)
    from_engine, from_scheme = SyncTarget.for_engine(engine), SyncTarget.from_scheme(scheme, BF16)
    assert from_engine.replace(modules=None) == from_scheme
    params = trainer_params(make_trainer(cfg, BF16))
    a, b = dict(engine_tensors(params, from_engine)), dict(engine_tensors(params, from_scheme))
    assert a.keys() == b.keys() == engine_state(engine.model).keys()
    assert all(bitwise_equal(a[n], b[n]) for n in a)


# ---- buckets -----------------------------------------------------------------------------------------
def mixed_tensors(gen) -> list[tuple[str, torch.Tensor]]:
    return [
        ("fp8", (torch.randn(33, 17, generator=gen) * 40).to(torch.float8_e4m3fn)),
        ("int32", torch.randint(-(2**31), 2**31 - 1, (5, 7), generator=gen, dtype=torch.int32)),
        ("bf16", torch.randn(3, 5, 7, generator=gen).to(BF16)),
        ("fp32.noncontiguous", torch.randn(8, 6, generator=gen).t()),
        ("int64", torch.randint(-(2**62), 2**62, (3,), generator=gen, dtype=torch.int64)),
        ("negzero.nan", torch.tensor([-0.0, float("nan"), float("inf")])),
        ("scalar", torch.tensor(2.5, dtype=torch.float64)),
        ("bool", torch.rand(9, generator=gen) > 0.5),
        ("empty", torch.empty(0, 4)),
        ("big", torch.randn(1000, generator=gen)),  # 4000 bytes: larger than the bucket on its own
        ("tail.int8", torch.randint(-128, 127, (13,), generator=gen, dtype=torch.int8)),
    ]


def test_bucket_round_trip_is_bitwise_and_bounded(gen):
    tensors = mixed_tensors(gen)
    limit = 1024
    buckets = list(iter_buckets(iter(tensors), limit))
    assert [n for b in buckets for n, _ in b] == [n for n, _ in tensors]  # order kept, nothing lost
    for b in buckets:
        size = sum(t.numel() * t.element_size() for _, t in b)
        assert size <= limit or len(b) == 1, [n for n, _ in b]
    assert ["big"] in [[n for n, _ in b] for b in buckets]
    out = []
    for b in buckets:
        buf, meta = flatten_bucket(b)
        assert buf.dtype == torch.uint8 and buf.ndim == 1 and buf.numel() == meta.nbytes
        assert all(m.offset % ALIGN == 0 for m in meta.tensors)
        out += unflatten_bucket(buf.clone(), meta)
    assert [n for n, _ in out] == [n for n, _ in tensors]
    for (n, a), (_, b) in zip(tensors, out):
        assert b.dtype == a.dtype and b.shape == a.shape and bitwise_equal(a, b), n


def test_bucket_errors():
    with pytest.raises(ValueError, match="bucket_bytes must be positive"):
        list(iter_buckets([("a", torch.ones(1))], 0))
    buf, meta = flatten_bucket([("a", torch.ones(3)), ("b", torch.ones(2, dtype=torch.int64))])
    with pytest.raises(ValueError, match="flat uint8 buffer"):
        unflatten_bucket(buf[:-1], meta)
