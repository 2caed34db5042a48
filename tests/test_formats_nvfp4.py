"""NVFP4: bit-exact fake/real/dequant, round-to-nearest-even, packing and decompression vs compressed-tensors."""

import pytest
import torch

try:  # the GPU machine has no compressed-tensors: only the comparisons with it skip there (CI installs it)
    from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8, unpack_fp4_from_uint8
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize
    from compressed_tensors.quantization.utils import generate_gparam
except ImportError:
    pack_fp4_to_uint8 = None
needs_ct = pytest.mark.skipif(pack_fp4_to_uint8 is None, reason="compressed-tensors is not installed")

from quantrl.formats.nvfp4 import (
    E2M1_VALUES,
    dequantize_nvfp4,
    fake_quantize_nvfp4,
    pack_nvfp4,
    quantize_nvfp4,
    unpack_nvfp4,
)

SHAPES = [(64, 128), (33, 48), (1, 16), (300, 384)]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def rand(shape, dtype, gen):
    return (torch.randn(shape, generator=gen) * torch.exp(torch.randn(shape, generator=gen))).to(dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fake_quant_equals_dequant_of_real_quant_bitwise(shape, dtype, gen):
    w = rand(shape, dtype, gen)
    codes, scale, gs = quantize_nvfp4(w)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15
    assert scale.dtype == torch.float8_e4m3fn and scale.shape == (shape[0], shape[1] // 16)
    assert gs.dtype == torch.float32 and gs.shape == (1,)
    assert torch.equal(fake_quantize_nvfp4(w), dequantize_nvfp4(codes, scale, gs, dtype))


def test_arithmetic_follows_the_two_level_recipe(gen):
    """Recomputed here from the formula, group by group, independent of the implementation's loops."""
    w = rand((8, 64), torch.float32, gen)
    codes, scale, gs = quantize_nvfp4(w)
    assert torch.equal(gs, (448 * 6 / w.abs().max()).reshape(1))
    g = w.view(8, 4, 16)
    want_s = (g.abs().amax(-1) / 6 * gs).clamp(2**-9, 448).to(torch.float8_e4m3fn)
    assert torch.equal(scale.float(), want_s.float())
    s_eff = want_s.float() / gs
    x = (g / s_eff.unsqueeze(-1)).clamp(-6, 6)
    grid = E2M1_VALUES[:8]
    # nearest magnitude; a tie (exactly between two) goes to the one with an even index (even mantissa)
    d = (x.abs().unsqueeze(-1) - grid).abs()
    best = d.min(-1, keepdim=True).values
    cands = (d == best).float() * (1 + (torch.arange(8) % 2 == 0).float())
    want = grid[cands.argmax(-1)] * torch.where(torch.signbit(x), -1.0, 1.0)
    assert torch.equal(E2M1_VALUES[codes.long()].view(8, 4, 16), want)
    # the largest group's scale is at the top of e4m3 and its largest element at the top of e2m1
    assert float(scale.float().max()) == 448.0 and int((codes & 7).max()) == 7


def test_exact_ties_at_unit_scale():
    """With s_eff exactly 1 every midpoint is a true tie and must go to the even mantissa."""
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -1.25])
    w = torch.cat([ties, torch.tensor([6.0] * 8)]).reshape(1, 16)
    gs = torch.tensor([64.0])  # group amax 6 -> s = 6 / 6 * 64 = 64, exact in e4m3 -> s_eff = 1
    codes, scale, _ = quantize_nvfp4(w, global_scale=gs)
    assert float(scale.float()[0, 0] / gs) == 1.0
    got = E2M1_VALUES[codes.long()].reshape(-1)[:8]
    assert got.tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -1.0]


def test_zero_tensor_and_zero_groups_dequantize_to_zero():
    w = torch.zeros(4, 32)
    codes, scale, gs = quantize_nvfp4(w)
    assert torch.isfinite(gs).all() and torch.equal(dequantize_nvfp4(codes, scale, gs, torch.float32), w)
    w[0, :16] = torch.linspace(-1, 1, 16)
    codes, scale, gs = quantize_nvfp4(w)
    out = dequantize_nvfp4(codes, scale, gs, torch.float32)
    assert torch.equal(out[1:], w[1:]) and torch.equal(out[0, 16:], w[0, 16:])


def test_error_is_bounded_by_half_a_step(gen):
    """|w - deq| <= half the gap between neighbouring e2m1 values at that magnitude, times the group scale."""
    w = rand((64, 256), torch.float32, gen)
    codes, scale, gs = quantize_nvfp4(w)
    deq = dequantize_nvfp4(codes, scale, gs, torch.float32)
    s_eff = (scale.float() / gs).repeat_interleave(16, dim=1)
    x = (w / s_eff).abs()
    gap = torch.where(x < 2, 0.5, torch.where(x < 4, 1.0, 2.0))
    over = (w.abs() > 6 * s_eff)  # a group whose e4m3 scale rounded down: its max clamps to 6
    err = (w - deq).abs()
    assert bool((err[~over] <= gap[~over] / 2 * s_eff[~over] * (1 + 1e-6)).all())
    assert float(torch.cat([err[over] / w.abs()[over], torch.zeros(1)]).max()) < 0.07  # e4m3 rounds by at most 2^-4


def test_pack_unpack_roundtrip_and_layout():
    codes = torch.arange(16, dtype=torch.uint8).repeat(3, 2)  # [3, 32]
    packed = pack_nvfp4(codes)
    assert packed.shape == (3, 16) and packed[0, 0] == 0x10 and packed[0, 1] == 0x32
    assert torch.equal(unpack_nvfp4(packed), codes)


@pytest.mark.parametrize("bad", [torch.zeros(2, 3, dtype=torch.uint8), torch.zeros(2, 4, dtype=torch.int8),
                                 torch.full((2, 4), 16, dtype=torch.uint8)])  # fmt: skip
def test_pack_rejects_bad_codes(bad):
    with pytest.raises(ValueError, match="pack_nvfp4"):
        pack_nvfp4(bad)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="not divisible by 16"):
        quantize_nvfp4(torch.ones(4, 24))
    w = torch.ones(4, 32)
    w[1, 3] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        quantize_nvfp4(w)
    with pytest.raises(ValueError, match="finite and positive"):
        quantize_nvfp4(torch.ones(4, 32), global_scale=torch.tensor([0.0]))
    codes, scale, gs = quantize_nvfp4(torch.ones(4, 32))
    with pytest.raises(ValueError, match="does not fit"):
        dequantize_nvfp4(codes, scale[:, :1], gs)


def test_straight_through_gradient(gen):
    w = rand((16, 64), torch.float32, gen).requires_grad_()
    y = fake_quantize_nvfp4(w, torch.bfloat16)
    assert y.dtype == torch.bfloat16
    g = torch.randn(16, 64, generator=gen, dtype=torch.bfloat16)
    y.backward(g)
    assert torch.equal(w.grad, g.float())


@needs_ct
@pytest.mark.parametrize("shape", SHAPES)
def test_compressed_tensors_packs_and_decompresses_the_same(shape, gen):
    """Their packer on our values gives our bytes; their unpack + dequantize of our tensors gives our deq."""
    w = rand(shape, torch.bfloat16, gen)
    codes, scale, gs = quantize_nvfp4(w)
    values = E2M1_VALUES[codes.long()]
    assert torch.equal(pack_fp4_to_uint8(values), pack_nvfp4(codes))
    packed = pack_nvfp4(codes)
    theirs = unpack_fp4_from_uint8(packed, shape[0], shape[1])  # bf16 e2m1 values
    assert torch.equal(theirs.float(), values)
    args = QuantizationArgs(num_bits=4, type="float", strategy="tensor_group", group_size=16, symmetric=True,
                            dynamic=False, scale_dtype=torch.float8_e4m3fn)  # fmt: skip
    deq = dequantize(theirs, scale.to(torch.bfloat16), args=args, global_scale=gs, dtype=torch.bfloat16)
    assert torch.equal(deq, dequantize_nvfp4(codes, scale, gs, torch.bfloat16))
    want_gs = generate_gparam(w.float().amin(), w.float().amax())
    assert torch.equal(want_gs, gs)
