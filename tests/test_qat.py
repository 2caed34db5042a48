"""INT4 and NVFP4 QAT: fake-quant forward equals the engine's dequantized weights; STE; once-per-step caching."""

import pytest
import torch
from torch import nn

from quantrl.formats import (
    dequantize_int4,
    dequantize_nvfp4,
    fake_quantize_int4,
    pack_int4,
    pack_nvfp4,
    unpack_int4,
    unpack_nvfp4,
)
from quantrl.train.qat import QATConfig, QATLinear, prepare_qat, qat_modules


class Block(nn.Module):
    def __init__(self, d=128, f=256):
        super().__init__()
        self.embed_tokens = nn.Embedding(50, d)
        self.q_proj = nn.Linear(d, d, bias=False)
        self.up_proj = nn.Linear(d, f, bias=True)
        self.down_proj = nn.Linear(f, d, bias=False)
        self.norm = nn.LayerNorm(d)
        self.gate = nn.Linear(d, 4, bias=False)  # MoE router: stays high precision
        self.lm_head = nn.Linear(d, 50, bias=False)

    def forward(self, ids):
        h = self.embed_tokens(ids)
        h = h + self.down_proj(torch.relu(self.up_proj(self.q_proj(h))))
        return self.lm_head(self.norm(h)) + self.gate(h).sum(-1, keepdim=True)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return Block()


def test_prepare_qat_swaps_only_linear_weights(model):
    names = prepare_qat(model, QATConfig(group_size=32))
    assert sorted(names) == ["down_proj", "q_proj", "up_proj"]
    assert type(model.lm_head) is nn.Linear and type(model.gate) is nn.Linear
    assert isinstance(model.up_proj, QATLinear) and isinstance(model.up_proj, nn.Linear)
    assert "up_proj.weight" in model.state_dict() and "up_proj.bias" in model.state_dict()


def test_targets_and_exclude(model):
    assert prepare_qat(model, QATConfig(group_size=32, targets=("proj",), exclude=("down",))) == ["q_proj", "up_proj"]
    with pytest.raises(ValueError, match="no Linear"):
        prepare_qat(Block(), QATConfig(group_size=32, targets=("nothing",)))


def test_group_size_must_divide(model):
    with pytest.raises(ValueError, match="not divisible by group_size"):
        prepare_qat(model, QATConfig(group_size=96))


def test_forward_weight_is_exactly_what_the_engine_dequantizes(model):
    prepare_qat(model, QATConfig(group_size=32, qmax=7))
    for m in qat_modules(model).values():
        q, s = m.quantized()
        engine_w = dequantize_int4(unpack_int4(pack_int4(q), m.in_features), s, 32, torch.bfloat16)
        assert torch.equal(m.fake_quantized_weight(), engine_w)
        x = torch.randn(3, m.in_features)
        bias = None if m.bias is None else m.bias.bfloat16()
        assert torch.equal(m(x), torch.nn.functional.linear(x.bfloat16(), engine_w, bias))


def test_nvfp4_forward_weight_is_exactly_what_the_engine_dequantizes(model):
    assert QATConfig(fmt="nvfp4", group_size=128).group_size == 16  # fixed by the format
    with pytest.raises(ValueError, match="QAT format"):
        QATConfig(fmt="int3")
    prepare_qat(model, QATConfig(fmt="nvfp4"))
    for m in qat_modules(model).values():
        codes, s, gs = m.quantized()
        engine_w = dequantize_nvfp4(unpack_nvfp4(pack_nvfp4(codes)), s, gs, torch.bfloat16)
        w = m.fake_quantized_weight()
        assert torch.equal(w, engine_w) and not torch.equal(w, m.weight.detach().bfloat16())
        x = torch.randn(3, m.in_features, requires_grad=True)
        m(x).sum().backward()  # the straight-through gradient reaches the master
        assert m.weight.grad is not None and bool(m.weight.grad.abs().sum() > 0)
    with pytest.raises(ValueError, match="not divisible by group_size=16"):
        prepare_qat(nn.Sequential(nn.Linear(24, 8)), QATConfig(fmt="nvfp4"))


def test_mxfp8_qat_quantizes_weight_and_input_like_the_engine(model, gen):
    from quantrl.formats import dequantize_fp8, dequantize_fp8_activation, encode_e8m0, quantize_fp8_activation
    from quantrl.model import Fp8Linear, QuantScheme

    prepare_qat(model, QATConfig(fmt="mxfp8", dtype=torch.float32))
    m = model.up_proj
    assert m.cfg.group_size == 32
    q, s = m.quantized()
    engine = Fp8Linear(m.in_features, m.out_features, True, QuantScheme.mxfp8(), torch.float32)
    engine.load_({"weight": q, "weight_scale": encode_e8m0(s), "bias": m.bias.detach()})
    x = torch.randn(4, m.in_features, generator=gen, requires_grad=True)
    with torch.no_grad():
        xq, xs = quantize_fp8_activation(x, 32, "ue8m0")
        ref = torch.nn.functional.linear(dequantize_fp8_activation(xq, xs, 32, torch.float32),
                                         dequantize_fp8(q, s, (1, 32), torch.float32), m.bias)
        torch.testing.assert_close(engine(x), ref, rtol=0, atol=0)
    y = m(x)
    torch.testing.assert_close(y.detach(), ref, rtol=1e-6, atol=1e-6)  # fp32 summation order only
    y.sum().backward()  # the STE reaches both the input and the master
    assert x.grad is not None and m.weight.grad is not None


def test_straight_through_gradient_reaches_master(model):
    prepare_qat(model, QATConfig(group_size=32))
    m = model.up_proj
    x = torch.randn(5, 128)
    g = torch.randn(5, 256).bfloat16()
    m(x).backward(g)
    # STE: dL/dW = dL/dW' = g^T x (in bf16 matmul precision), reaching the fp32 master
    expect = (g.t() @ x.bfloat16()).float()
    assert m.weight.grad.dtype == torch.float32
    torch.testing.assert_close(m.weight.grad, expect, rtol=1e-2, atol=1e-2)


def test_a_trained_qat_model_deep_copies(model):
    """A copy mid-training (a reference or EMA model) recomputes its own fake-quant weight."""
    import copy

    prepare_qat(model, QATConfig(group_size=32))
    model.up_proj(torch.randn(5, 128)).sum().backward()  # the cache now holds a graph node
    twin = copy.deepcopy(model)
    x = torch.randn(3, 128)
    assert twin.up_proj._cache is None and torch.equal(twin.up_proj(x), model.up_proj(x))


def test_fake_quant_computed_once_per_optimizer_step(model, monkeypatch):
    prepare_qat(model, QATConfig(group_size=32))
    calls = []
    from quantrl.train import qat

    real = qat.fake_quantize_int4
    count = qat.fake_quantize
    monkeypatch.setattr(qat, "fake_quantize", lambda *a, **k: calls.append(1) or count(*a, **k))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 50, (4, 7))
    for _step in range(2):
        calls.clear()
        for _micro in range(3):
            model(ids).pow(2).mean().backward()
        assert len(calls) == 3, "one fake quant per QAT Linear per step, whatever the number of micro-batches"
        fresh = real(model.q_proj.weight.detach(), 32, 7, dtype=torch.bfloat16)
        assert torch.equal(model.q_proj.fake_quantized_weight(), fresh), "the cache must follow the optimizer step"
        opt.step()
        opt.zero_grad()


def test_micro_batch_gradients_accumulate_through_the_cache(model):
    prepare_qat(model, QATConfig(group_size=32))
    ids = torch.randint(0, 50, (6, 5))
    model(ids).pow(2).mean().backward()
    model(ids).pow(2).mean().backward()
    two = model.q_proj.weight.grad.clone()
    model.zero_grad()
    model(ids).pow(2).mean().backward()
    torch.testing.assert_close(two, 2 * model.q_proj.weight.grad)


def test_env_switches(monkeypatch):
    monkeypatch.delenv("OPEN_TRAINING_INT4_FAKE_QAT_FLAG", raising=False)
    assert QATConfig.from_env() is None
    monkeypatch.setenv("OPEN_TRAINING_INT4_FAKE_QAT_FLAG", "1")
    monkeypatch.setenv("OPEN_TRAINING_INT4_GROUP_SIZE", "32")
    cfg = QATConfig.from_env(qmax=8)
    assert cfg is not None and cfg.group_size == 32 and cfg.qmax == 8


def test_qat_model_trains(model):
    prepare_qat(model, QATConfig(group_size=32))
    torch.manual_seed(1)
    ids = torch.randint(0, 50, (16, 8))
    target = torch.randint(0, 50, (16, 8))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(model(ids).float().reshape(-1, 50), target.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    # after training, the forward weight is still exactly the INT4 grid of the master
    m = model.down_proj
    assert torch.equal(m.fake_quantized_weight(), fake_quantize_int4(m.weight.detach(), 32, 7, dtype=torch.bfloat16))
