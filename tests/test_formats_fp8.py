"""FP8 e4m3 reference numerics: round trips, scale layouts, error bounds, bad input."""

import pytest
import torch

from quantrl.formats import fp8
from quantrl.formats.fp8 import (
    FP8_DTYPE,
    FP8_MAX,
    dequantize_fp8,
    dequantize_fp8_activation,
    fake_quantize_fp8,
    fake_quantize_fp8_activation,
    quantize_fp8,
    quantize_fp8_activation,
)

SHAPES = [(128, 128), (256, 384), (300, 200), (1, 7), (129, 257), (77, 1000)]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def rand(shape, dtype, gen, scale=1.0):
    # heavy-ish tails so block maxima vary between blocks
    w = torch.randn(shape, generator=gen) * scale * torch.exp(torch.randn(shape, generator=gen))
    return w.to(dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("strategy", ["block", "channel", "tensor"])
@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
def test_fake_quant_equals_dequant_of_quant_bitwise(shape, dtype, strategy, scale_fmt, gen):
    w = rand(shape, dtype, gen)
    q, s = quantize_fp8(w, strategy, scale_fmt=scale_fmt)
    for out in (torch.bfloat16, torch.float32, dtype):
        fq = fake_quantize_fp8(w, strategy, scale_fmt=scale_fmt, dtype=out)
        dq = dequantize_fp8(q, s, (128, 128) if strategy == "block" else None, dtype=out)
        assert fq.dtype == out and torch.equal(fq, dq)


@pytest.mark.parametrize("shape,block", [((300, 200), (128, 128)), ((129, 257), (64, 32)), ((5, 9), (2, 4))])
def test_block_scale_shape_and_edge_blocks_use_real_elements(shape, block, gen):
    w = rand(shape, torch.float32, gen)
    q, s = quantize_fp8(w, "block", block)
    n, k = shape
    bn, bk = block
    assert q.shape == shape and q.dtype == FP8_DTYPE
    assert s.shape == (-(-n // bn), -(-k // bk)) and s.dtype == torch.float32
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            blk = w[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk]
            assert s[i, j] == blk.abs().max() / FP8_MAX
            # the largest element of each block lands exactly on ±448
            assert q[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk].float().abs().max() == FP8_MAX


def test_channel_and_tensor_scale_shapes(gen):
    w = rand((33, 70), torch.bfloat16, gen)
    _, sc = quantize_fp8(w, "channel")
    _, st = quantize_fp8(w, "tensor")
    assert sc.shape == (33, 1) and st.shape == (1,)
    torch.testing.assert_close(sc[:, 0], w.float().abs().amax(1) / FP8_MAX, rtol=0, atol=0)
    assert st[0] == w.float().abs().max() / FP8_MAX


@pytest.mark.parametrize("strategy", ["block", "channel", "tensor"])
def test_element_error_within_e4m3_bound(strategy, gen):
    w = rand((257, 300), torch.float32, gen)
    q, s = quantize_fp8(w, strategy)
    dq = dequantize_fp8(q, s, dtype=torch.float32)
    scale = dequantize_fp8(torch.ones_like(q), s, dtype=torch.float32)  # s broadcast to [N, K]
    # normals: half an ulp = 2^-4 relative; e4m3 subnormals: absolute spacing 2^-9 * s, half of it 2^-10 * s
    bound = torch.maximum(w.abs() * 2.0**-4, scale * 2.0**-10) * (1 + 2.0**-20)
    assert bool(((dq - w).abs() <= bound).all())


def test_ue8m0_scales_are_powers_of_two_not_below_exact(gen):
    w = rand((256, 512), torch.bfloat16, gen)
    _, s = quantize_fp8(w, "block", scale_fmt="ue8m0")
    _, s_exact = quantize_fp8(w, "block")
    m, _ = torch.frexp(s)
    assert bool((m == 0.5).all())
    assert bool((s >= s_exact).all()) and bool((s < 2 * s_exact).all())


def test_ue8m0_keeps_exact_powers_of_two():
    w = torch.zeros(128, 128)
    w[0, 0] = 448.0 * 2.0**-3
    _, s = quantize_fp8(w, scale_fmt="ue8m0")
    assert s.item() == 2.0**-3


def test_ue8m0_scale_of_a_tiny_block_is_e8m0s_smallest():
    """A block whose max is below 448 * 2^-127: its scale must still be an E8M0 code (MXFP8 checkpoints)."""
    w = torch.ones(2, 64)
    w[0, :32] = 1e-37
    q, s = quantize_fp8(w, "block", (1, 32), "ue8m0")
    assert s[0, 0].item() == 2.0**-127 and fp8.decode_e8m0(fp8.encode_e8m0(s)).equal(s)
    deq = fp8.dequantize_fp8(q, s, (1, 32), torch.float32)
    assert torch.equal(deq, fake_quantize_fp8(w, "block", (1, 32), "ue8m0", dtype=torch.float32))


def test_all_zero_blocks_give_finite_scale_and_zero_values(gen):
    w = rand((256, 256), torch.bfloat16, gen)
    w[:128, 128:] = 0
    for strategy in ("block", "channel", "tensor"):
        for fmt in (None, "ue8m0"):
            q, s = quantize_fp8(w if strategy == "block" else torch.zeros_like(w), strategy, scale_fmt=fmt)
            assert bool(torch.isfinite(s).all()) and bool((s > 0).all())
            dq = dequantize_fp8(q, s, dtype=torch.float32)
            assert bool(torch.isfinite(dq).all())
    q, s = quantize_fp8(w)
    assert s[0, 1] == 1.0 and bool((q[:128, 128:].float() == 0).all())


def test_values_at_fp8_max_and_tiny_blocks_stay_finite():
    w = torch.zeros(2, 256, dtype=torch.float32)
    w[0, :128] = torch.tensor([448.0, -448.0] * 64)
    w[1, :128] = torch.tensor([1e-42, -3e-44] * 64)  # fp32 subnormals: amax/448 underflows towards 0
    w[1, 128:] = torch.finfo(torch.bfloat16).max
    for fmt in (None, "ue8m0"):
        q, s = quantize_fp8(w, "channel", scale_fmt=fmt)
        assert not torch.isnan(q.float()).any()
        dq = dequantize_fp8(q, s, dtype=torch.float32)
        assert bool(torch.isfinite(dq).all())
        assert dq[0, 0] == 448.0 or fmt == "ue8m0"


@pytest.mark.parametrize("shape", [(7, 128), (2, 3, 200), (4, 1, 5, 256), (1, 64)])
@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
def test_activation_per_token_groups(shape, scale_fmt, gen):
    x = rand(shape, torch.bfloat16, gen)
    q, s = quantize_fp8_activation(x, 128, scale_fmt)
    k = shape[-1]
    assert q.shape == x.shape and s.shape == (*shape[:-1], -(-k // 128))
    if scale_fmt is None:
        rows = x.float().reshape(-1, k)
        for g in range(s.shape[-1]):
            ref = rows[:, g * 128:(g + 1) * 128].abs().amax(1) / FP8_MAX
            assert torch.equal(s.reshape(-1, s.shape[-1])[:, g], ref)
    for out in (torch.bfloat16, torch.float32):
        fq = fake_quantize_fp8_activation(x, 128, scale_fmt, dtype=out)
        assert torch.equal(fq, dequantize_fp8_activation(q, s, 128, out))


def test_activation_scales_do_not_leak_between_tokens(gen):
    x = rand((4, 256), torch.float32, gen)
    x[2] *= 1000.0  # one loud token must not change the others' quantization
    q, s = quantize_fp8_activation(x)
    q1, s1 = quantize_fp8_activation(x[:1])
    assert torch.equal(q[:1].float(), q1.float()) and torch.equal(s[:1], s1)


def test_fake_quant_straight_through_gradient(gen):
    w = rand((130, 260), torch.float32, gen).requires_grad_()
    g = torch.randn(130, 260, generator=gen)
    fake_quantize_fp8(w, dtype=torch.bfloat16).backward(g.bfloat16())
    assert torch.equal(w.grad, g.bfloat16().float())
    x = rand((3, 256), torch.float32, gen).requires_grad_()
    gx = torch.randn(3, 256, generator=gen)
    fake_quantize_fp8_activation(x).backward(gx)
    assert torch.equal(x.grad, gx)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_is_a_clear_error(bad, gen):
    w = rand((64, 64), torch.bfloat16, gen)
    w[3, 5] = bad
    for fn in (lambda: quantize_fp8(w), lambda: fake_quantize_fp8(w), lambda: quantize_fp8_activation(w)):
        with pytest.raises(ValueError, match="non-finite"):
            fn()


def test_shape_and_argument_errors(gen):
    with pytest.raises(ValueError, match="2-D"):
        quantize_fp8(torch.randn(2, 3, 4, generator=gen))
    with pytest.raises(ValueError, match="empty"):
        quantize_fp8(torch.empty(0, 128))
    with pytest.raises(ValueError, match="strategy"):
        quantize_fp8(torch.randn(4, 4, generator=gen), "row")
    with pytest.raises(ValueError, match="scale_fmt"):
        quantize_fp8(torch.randn(4, 4, generator=gen), scale_fmt="e8m0")
    with pytest.raises(TypeError, match="floating-point"):
        quantize_fp8(torch.ones(4, 4, dtype=torch.int32))
    q, s = quantize_fp8(torch.randn(256, 256, generator=gen))
    with pytest.raises(ValueError, match="scale shape"):
        dequantize_fp8(q, s, block_size=(64, 64))
    with pytest.raises(TypeError):
        dequantize_fp8(q.float(), s)


def test_quantization_is_pure(gen):
    w = rand((200, 300), torch.float32, gen)
    keep = w.clone()
    quantize_fp8(w)
    fake_quantize_fp8(w)
    quantize_fp8_activation(w)
    assert torch.equal(w, keep)
    assert fp8.FP8_MAX == torch.finfo(FP8_DTYPE).max


def test_e8m0_codec_round_trips_every_code_and_refuses_the_rest():
    from quantrl.formats import decode_e8m0, encode_e8m0

    codes = torch.arange(255, dtype=torch.uint8)
    scales = decode_e8m0(codes)
    assert scales[127] == 1.0 and scales[0] == 2.0**-127 and scales[254] == 2.0**127
    assert torch.equal(encode_e8m0(scales), codes)
    for bad in (3.0, 0.0, -1.0, 2.0**-128, float("inf")):
        with pytest.raises(ValueError, match="powers of two"):
            encode_e8m0(torch.tensor([1.0, bad]))
    with pytest.raises(ValueError, match="NaN"):
        decode_e8m0(torch.tensor([255], dtype=torch.uint8))
    # ue8m0 block scales (what MXFP8 stores) always encode
    w = torch.randn(64, 96) * torch.logspace(-30, 30, 96)
    _, s = quantize_fp8(w, "block", (1, 32), "ue8m0")
    assert torch.equal(decode_e8m0(encode_e8m0(s)), s)


def test_group_sizes_and_scale_dtypes_are_checked():
    x = torch.randn(2, 64)
    q, s = quantize_fp8_activation(x, 32)
    for call in (lambda: fake_quantize_fp8_activation(x, 0), lambda: fp8.dequantize_fp8_activation(q, s, 0)):
        with pytest.raises(ValueError, match="group_size must be positive"):
            call()
    wq, ws = quantize_fp8(x, "block", (1, 32), "ue8m0")
    with pytest.raises(TypeError, match="decode_e8m0 first"):
        fp8.dequantize_fp8(wq, fp8.encode_e8m0(ws), (1, 32))
