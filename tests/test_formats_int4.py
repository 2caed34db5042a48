"""INT4 (and INT8) group quantization: bit-exact fake/real/dequant, packing vs compressed-tensors, STE."""

import pytest
import torch

try:  # the GPU machine has no compressed-tensors: only the comparisons with it skip there (CI installs it)
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
except ImportError:
    pack_to_int32 = unpack_from_int32 = None
needs_ct = pytest.mark.skipif(pack_to_int32 is None, reason="compressed-tensors is not installed")

from quantrl.formats.int4 import (
    dequantize_int,
    dequantize_int4,
    fake_quantize_int,
    fake_quantize_int4,
    int_range,
    pack_int,
    pack_int4,
    quantize_int,
    quantize_int4,
    unpack_int,
    unpack_int4,
)

SHAPES = [(64, 128), (33, 256), (1, 32), (300, 384), (7, 4096)]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def rand(shape, dtype, gen):
    return (torch.randn(shape, generator=gen) * torch.exp(torch.randn(shape, generator=gen))).to(dtype)


@pytest.mark.parametrize("shape,group_size", [(s, g) for s in SHAPES for g in (32, 64, 128) if s[1] % g == 0])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("qmax", [7, 8])
def test_fake_quant_equals_dequant_of_real_quant_bitwise(shape, dtype, group_size, qmax, gen):
    w = rand(shape, dtype, gen)
    q, s = quantize_int4(w, group_size, qmax)
    lo, hi, _ = int_range(4, qmax)
    assert q.dtype == torch.int8 and q.shape == shape and int(q.min()) >= lo and int(q.max()) <= hi
    assert s.dtype == torch.bfloat16 and s.shape == (shape[0], shape[1] // group_size)
    for out in (torch.bfloat16, torch.float32, dtype):
        fq = fake_quantize_int4(w, group_size, qmax, dtype=out)
        deq = dequantize_int4(q, s, group_size, out)
        as_int = {2: torch.int16, 4: torch.int32, 8: torch.int64}[fq.element_size()]
        assert fq.dtype == out and torch.equal(fq.view(as_int), deq.view(as_int))  # bits: +0.0, never -0.0
    # and through the packed form the engine receives
    q2 = unpack_int4(pack_int4(q), shape[1])
    assert torch.equal(q2, q)


@pytest.mark.parametrize("qmax,div,lo", [(7, 7.0, -7), (8, 7.5, -8)])
def test_scale_convention_and_range(qmax, div, lo, gen):
    w = rand((16, 256), torch.float32, gen)
    q, s = quantize_int4(w, 128, qmax, scale_dtype=torch.float32)
    absmax = w.view(16, 2, 128).abs().amax(-1)
    assert torch.equal(s, absmax / div)
    # the largest-magnitude element of each group maps to the end of the range (±7.5 may round either way)
    idx = w.view(16, 2, 128).abs().argmax(-1, keepdim=True)
    top_q = q.view(16, 2, 128).gather(-1, idx)
    top_w = w.view(16, 2, 128).gather(-1, idx)
    assert bool((top_q[top_w > 0] == 7).all())
    neg = top_q[top_w < 0]
    assert bool(((neg == -7) | (neg == lo)).all())
    assert int(q.min()) >= lo and int(q.max()) <= 7 and int(q.min()) == lo


def test_quantization_divides_by_the_stored_bf16_scale(gen):
    """Codes come from the rounded scale: w / bf16(s), not w / fp32(s) (slime's STE/rollout mismatch)."""
    w = rand((64, 128), torch.float32, gen)
    q, s = quantize_int4(w, 128, 7)
    expect = torch.round(w.view(64, 1, 128) / s.float().unsqueeze(-1)).clamp(-7, 7).view(64, 128)
    assert torch.equal(q.float(), expect)
    s32 = (w.view(64, 1, 128).abs().amax(-1) / 7).unsqueeze(-1)
    q32 = torch.round(w.view(64, 1, 128) / s32).clamp(-7, 7).view(64, 128)
    assert not torch.equal(q32, expect), "fp32 and bf16 scales should differ on some element of random data"


@pytest.mark.parametrize("qmax", [127, 128])
@needs_ct
def test_int8_group_quant_round_trip(qmax, gen):
    w = rand((40, 256), torch.bfloat16, gen)
    q, s = quantize_int(w, 8, 128, qmax)
    lo, hi, _ = int_range(8, qmax)
    assert int(q.min()) >= lo and int(q.max()) <= hi
    assert torch.equal(fake_quantize_int(w, 8, 128, qmax, dtype=torch.bfloat16), dequantize_int(q, s, 128))
    packed = pack_int(q, 8)
    assert torch.equal(packed, pack_to_int32(q, 8)) and torch.equal(unpack_int(packed, 256, 8), q)


@pytest.mark.parametrize("k", [8, 16, 24, 128, 77, 1, 4095])
@needs_ct
def test_pack_int4_matches_compressed_tensors_bitwise(k, gen):
    q = torch.randint(-8, 8, (13, k), generator=gen, dtype=torch.int8)
    ours = pack_int4(q)
    assert ours.dtype == torch.int32 and ours.shape == (13, -(-k // 8))
    assert torch.equal(ours, pack_to_int32(q, 4))
    assert torch.equal(unpack_int4(ours, k), q)
    assert torch.equal(unpack_from_int32(ours, 4, torch.Size((13, k))), q)


def test_pack_layout_element_i_in_bits_4i():
    q = torch.tensor([[-8, -7, 0, 1, 2, 3, 6, 7]], dtype=torch.int8)
    word = int(pack_int4(q)[0, 0]) & 0xFFFFFFFF
    assert [(word >> (4 * i)) & 0xF for i in range(8)] == [int(v) + 8 for v in q[0]]


@pytest.mark.parametrize("k", [4, 77, 256])
@needs_ct
def test_pack_int8_matches_compressed_tensors(k, gen):
    q = torch.randint(-128, 128, (5, k), generator=gen, dtype=torch.int8)
    assert torch.equal(pack_int(q, 8), pack_to_int32(q, 8))
    assert torch.equal(unpack_from_int32(pack_int(q, 8), 8, torch.Size((5, k))), q)


def test_zero_groups_are_finite_and_zero(gen):
    w = rand((8, 256), torch.bfloat16, gen)
    w[:, :128] = 0
    w[3] = 0
    for qmax in (7, 8):
        q, s = quantize_int4(w, 128, qmax)
        assert bool(torch.isfinite(s.float()).all()) and bool((s > 0).all())
        assert bool((q[:, :128] == 0).all()) and bool((q[3] == 0).all())
        fq = fake_quantize_int4(w, 128, qmax)
        assert bool(torch.isfinite(fq.float()).all()) and bool((fq[:, :128] == 0).all())


def test_fp16_scale_saturates_instead_of_inf():
    w = torch.full((2, 32), 1e6)
    w[1] = 1e-9
    q, s = quantize_int4(w, 32, 7, scale_dtype=torch.float16)
    assert bool(torch.isfinite(s.float()).all()) and bool((s > 0).all())
    assert torch.equal(
        fake_quantize_int4(w, 32, 7, scale_dtype=torch.float16), dequantize_int4(q, s, 32, torch.float32)
    )


def test_fp16_scales_of_small_groups_are_not_floored_at_fp16s_smallest_normal():
    w = torch.linspace(-1e-4, 1e-4, 64).reshape(1, 64)
    q, s = quantize_int4(w, 32, 7, scale_dtype=torch.float16)
    assert float(s.max()) < 1.5e-5 and int(q.abs().max()) == 7  # absmax / 7, not 6.1e-5
    deq = dequantize_int4(q, s, 32, torch.float32)
    assert float((deq - w).abs().max()) <= float(s.float().max()) / 2 * 1.01


def test_straight_through_gradient_reaches_master_weight(gen):
    w = rand((32, 128), torch.float32, gen).requires_grad_()
    x = torch.randn(5, 128, generator=gen)
    up = torch.randn(5, 32, generator=gen)
    y = x @ fake_quantize_int4(w, 32, dtype=torch.float32).t()
    y.backward(up)
    assert torch.equal(w.grad, up.t() @ x)  # d(x W'^T)/dW' = up^T x, and dW'/dW = 1
    w2 = rand((32, 128), torch.float32, gen).requires_grad_()
    g = torch.randn(32, 128, generator=gen).bfloat16()
    fake_quantize_int4(w2, 128, dtype=torch.bfloat16).backward(g)
    assert w2.grad.dtype == torch.float32 and torch.equal(w2.grad, g.float())


def test_bad_input_errors(gen):
    with pytest.raises(ValueError, match="not divisible by group_size"):
        quantize_int4(torch.randn(4, 100, generator=gen), 128)
    with pytest.raises(ValueError, match="2-D"):
        quantize_int4(torch.randn(128, generator=gen))
    with pytest.raises(ValueError, match="empty"):
        quantize_int4(torch.empty(0, 128))
    with pytest.raises(ValueError, match="qmax"):
        quantize_int4(torch.randn(4, 128, generator=gen), qmax=6)
    w = torch.randn(4, 128, generator=gen)
    w[1, 2] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        quantize_int4(w)
    with pytest.raises(ValueError, match="non-finite"):
        fake_quantize_int4(w)
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(torch.tensor([[9, 0]], dtype=torch.int8))
    with pytest.raises(ValueError, match="int8"):
        pack_int4(torch.zeros(2, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="words"):
        unpack_int4(torch.zeros(2, 3, dtype=torch.int32), 100)
    with pytest.raises(ValueError, match="scale shape"):
        dequantize_int4(torch.zeros(4, 128, dtype=torch.int8), torch.ones(4, 2), 128)
