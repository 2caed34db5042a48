"""Triton kernels vs the ``formats`` reference, on small shapes.

Runs on a CUDA device, or on CPU through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1
when there is no GPU), so the kernels' indexing, masking, tiling and exact-rounding code is checked on
every machine with Triton installed. Outputs are poisoned (every byte 0xFF) before each run. Quantizers
must match bit for bit; GEMMs must land within one unit in the last place of the output dtype of an fp32
reference on the engine's dequantized weights (the kernel rounds its fp32 accumulator once, so only the
summation order differs from the reference).
"""

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl

from quantrl import formats as fm
from quantrl import kernels
from quantrl.kernels import _numerics as nm
from quantrl.kernels.block_gemm import fp8_block_gemm_triton
from quantrl.kernels.fp8_quant import quantize_fp8_activation_triton, quantize_fp8_block_triton
from quantrl.kernels.int4_quant import fake_quantize_int4_triton, quantize_pack_int4_triton
from quantrl.kernels.w4a16 import W4A16Config, nvfp4_gemm, pick_config, w4a16_gemm

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
pytestmark = [
    pytest.mark.skipif(not (CUDA or kernels.interpreted()), reason="needs CUDA or TRITON_INTERPRET=1"),
    pytest.mark.usefixtures("poisoned_empty"),
    pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning"),  # numpy inside the interpreter
]
# The interpreter emulates the conversions with integer ops (NATIVE=False); a GPU checks both.
NATIVE = [False, True] if CUDA else [False]


def rand(shape, dtype, gen, device=DEV):
    x = torch.randn(shape, generator=gen) * torch.exp(torch.randn(shape, generator=gen))
    return x.to(dtype).to(device)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.to(a.device).double()
    return float((a - b).norm() / b.norm())


def gemm_ulps(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
              acc_bits: int = 20) -> float:  # fmt: skip
    """max |y - ref| / allowance for ``ref = x @ w.T + bias`` computed in fp64 on y's device (x, w: the exact
    operand values), where the allowance is one unit in the last place of y's dtype at |ref| plus the
    summation term ``2^-acc_bits * (|x| @ |w|.T)``: 20 for fp32 accumulation, 13 for Hopper's FP8 tensor
    cores, which keep ~14 bits inside an MMA (DeepSeek-V3 report, sec. 3.3.2). A kernel that rounds an
    fp32 accumulator once scores <= 1; NaN (an unwritten or poisoned element) scores inf."""
    mant = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}[y.dtype]
    x, w = x.to(y.device, torch.float64), w.to(y.device, torch.float64)
    ref = x @ w.T + (0 if bias is None else bias.to(y.device, torch.float64))
    ulp = torch.exp2(torch.floor(torch.log2(ref.abs().clamp_min(2.0**-100))) - mant)
    err = (y.double() - ref).abs() / (ulp + 2.0**-acc_bits * (x.abs() @ w.abs().T))
    return float(err.nan_to_num(nan=float("inf")).max())


# ---------------------------------------------------------------------------------------------------------
# exact-rounding helpers
# ---------------------------------------------------------------------------------------------------------
@triton.jit
def _convert_kernel(x_ptr, bf_ptr, rbf_ptr, wid_ptr, e4_ptr, rne_ptr, n, NATIVE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    bf = nm.to_bf16(x, NATIVE)
    tl.store(bf_ptr + offs, bf, mask=mask)
    tl.store(rbf_ptr + offs, nm.round_bf16(x, NATIVE), mask=mask)
    tl.store(wid_ptr + offs, nm.widen(bf, NATIVE), mask=mask)
    tl.store(e4_ptr + offs, nm.to_e4m3_bits(tl.minimum(tl.maximum(x, -448.0), 448.0), NATIVE), mask=mask)
    tl.store(rne_ptr + offs, nm.rne_int(tl.minimum(tl.maximum(x, -4e6), 4e6)), mask=mask)


def _rounding_cases() -> torch.Tensor:
    """Every finite bf16 and e4m3 value, the midpoints between neighbours (ties) and one fp32 ulp either side,
    half-integers, subnormals, and the largest finite floats."""
    b = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    b = b[torch.isfinite(b)].unique()
    e = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
    e = e[torch.isfinite(e)].unique()
    vals = [b, e, torch.arange(-40, 41).float() / 2]
    for v in (b, e):
        mid = (v[1:].double() + v[:-1].double()) / 2
        mid = mid.float()
        vals += [
            mid,
            torch.nextafter(mid, torch.tensor(float("inf"))),
            torch.nextafter(mid, torch.tensor(-float("inf"))),
        ]
    vals.append(torch.tensor([0.0, -0.0, 2.0**-149, -(2.0**-149), 2.0**-130, 3.4e38, -3.4e38, 448.0, 464.0, 2.0**-10]))
    x = torch.cat(vals)
    return x[torch.isfinite(x)]


@pytest.mark.parametrize("native", NATIVE)
def test_rounding_helpers_match_torch_casts(native):
    x = _rounding_cases().to(DEV)
    n = x.numel()
    bf = torch.empty(n, dtype=torch.bfloat16, device=DEV)
    rbf = torch.empty(n, device=DEV)
    wid = torch.empty(n, device=DEV)
    e4 = torch.empty(n, dtype=torch.uint8, device=DEV)
    rne = torch.empty(n, device=DEV)
    block = 1 << 14
    _convert_kernel[(triton.cdiv(n, block),)](x, bf, rbf, wid, e4, rne, n, NATIVE=native, BLOCK=block)
    as_bf16 = x.to(torch.bfloat16)
    assert torch.equal(bits(bf), bits(as_bf16))  # RNE, overflow to +-inf like torch
    assert torch.equal(bits(rbf), bits(as_bf16.float())) and torch.equal(bits(wid), bits(as_bf16.float()))
    assert torch.equal(e4, bits(x.clamp(-448, 448).to(torch.float8_e4m3fn)))
    assert torch.equal(rne, torch.round(x.clamp(-4e6, 4e6)))


# ---------------------------------------------------------------------------------------------------------
# INT4 quantize + pack, fake quant
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("qmax", [7, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_int4_quant_pack_bitwise(group_size, qmax, dtype, gen):
    w = rand((37, 384), dtype, gen)  # 37 rows: a partial row tile
    w[5, :group_size] = 0  # an all-zero group: finite scale, codes 0
    packed, s = quantize_pack_int4_triton(w, group_size, qmax)
    q_ref, s_ref = fm.quantize_int4(w.cpu(), group_size, qmax)
    assert torch.equal(packed.cpu(), fm.pack_int4(q_ref)) and torch.equal(bits(s.cpu()), bits(s_ref))


def _extremes(dtype, device=DEV) -> torch.Tensor:
    """Rows of subnormals, ties, the dtype's largest values, mixed magnitudes within a group, signed zeros
    (-0.0 must keep its sign through the quantizers' division: code 0x80, not 0x00)."""
    fi = torch.finfo(dtype)
    rows = [
        torch.full((128,), fi.tiny) * torch.arange(128),  # down to 0 and subnormal
        torch.full((128,), fi.max) * torch.linspace(-1, 1, 128),
        torch.arange(128).float() - 63.5,  # exact halves after scaling
        torch.cat([torch.tensor([7.0]), torch.arange(127).float() / 18]),  # x / s near .5 boundaries
        torch.cat([torch.tensor([fi.max]), torch.full((127,), fi.tiny)]),
        torch.cat([torch.tensor([3.0, -5.0]), torch.tensor([-0.0, 0.0] * 63)]),
    ]
    return torch.stack(rows).to(dtype).to(device)


@pytest.mark.parametrize("qmax", [7, 8])
def test_int4_kernels_on_extreme_values(qmax):
    for dtype in (torch.bfloat16, torch.float32):
        w = _extremes(dtype)
        packed, s = quantize_pack_int4_triton(w, 32, qmax)
        q_ref, s_ref = fm.quantize_int4(w.cpu(), 32, qmax)
        assert torch.equal(packed.cpu(), fm.pack_int4(q_ref)) and torch.equal(bits(s.cpu()), bits(s_ref))
        fq = fake_quantize_int4_triton(w, 32, qmax, torch.bfloat16)
        assert torch.isfinite(fq).all()
        assert torch.equal(bits(fq.cpu()), bits(fm.fake_quantize_int4(w.cpu(), 32, qmax, dtype=torch.bfloat16)))


@pytest.mark.parametrize("group_size", [32, 128])
@pytest.mark.parametrize("qmax", [7, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int4_fake_quant_bitwise(group_size, qmax, dtype, gen):
    w = rand((33, 256), dtype, gen)
    for out in (torch.bfloat16, torch.float16, torch.float32):
        fq = fake_quantize_int4_triton(w, group_size, qmax, out)
        ref = fm.fake_quantize_int4(w.cpu(), group_size, qmax, dtype=out)
        assert fq.dtype == out and torch.equal(bits(fq.cpu()), bits(ref))


def test_int4_fake_quant_dispatch_straight_through(gen):
    w = rand((16, 128), torch.bfloat16, gen).requires_grad_()
    y = kernels.fake_quantize_int4(w, 64, 7, torch.bfloat16, backend="triton")
    assert torch.equal(bits(y.detach().cpu()), bits(fm.fake_quantize_int4(w.detach().cpu(), 64, 7)))
    (y.float() * 2).sum().backward()
    assert torch.equal(w.grad, torch.full_like(w, 2.0))


# ---------------------------------------------------------------------------------------------------------
# FP8 quantization
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(5, 300), (1, 1000), (2, 3, 256), (17, 64)])
@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp8_activation_quant_bitwise(shape, scale_fmt, dtype, gen):
    x = rand(shape, dtype, gen)
    x.view(-1, shape[-1])[0, : min(128, shape[-1])] = 0  # an all-zero group: scale 1, codes 0
    q, s = quantize_fp8_activation_triton(x, 128, scale_fmt)
    q_ref, s_ref = fm.quantize_fp8_activation(x.cpu(), 128, scale_fmt)
    assert q.shape == x.shape and s.shape == s_ref.shape
    assert torch.equal(bits(q.cpu()), bits(q_ref)) and torch.equal(s.cpu(), s_ref)


@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
def test_fp8_activation_quant_extremes_and_other_groups(scale_fmt, gen):
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        x = _extremes(dtype)
        q, s = quantize_fp8_activation_triton(x, 32, scale_fmt)
        q_ref, s_ref = fm.quantize_fp8_activation(x.cpu(), 32, scale_fmt)
        assert torch.equal(bits(q.cpu()), bits(q_ref)) and torch.equal(s.cpu(), s_ref)
    # fp32 values straight onto the e4m3 grid (a 448 in the group makes s = 1): every rounding case
    x = _rounding_cases()
    x = x[x.abs() <= 448][:8192]
    x = torch.cat([x, torch.zeros((-x.numel()) % 1024)]).view(-1, 1024)
    x[:, 0] = 448.0
    q, s = quantize_fp8_activation_triton(x.to(DEV), 1024, scale_fmt)
    q_ref, s_ref = fm.quantize_fp8_activation(x, 1024, scale_fmt)
    assert torch.equal(s_ref, torch.ones_like(s_ref))
    assert torch.equal(bits(q.cpu()), bits(q_ref)) and torch.equal(s.cpu(), s_ref)


@pytest.mark.parametrize("shape", [(200, 300), (128, 256), (1, 20), (300, 129)])
@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
def test_fp8_activation_quant_2d_is_both_directions_bitwise(shape, scale_fmt, gen):
    """One pass, two quantizations: of x along K and of x^T along M, ragged on both axes."""
    for dtype, g in ((torch.bfloat16, 128), (torch.float32, 32)):
        x = rand(shape, dtype, gen)
        x[: min(g, shape[0]), : min(g, shape[1])] = 0  # an all-zero tile: scale 1 both ways
        q, s, qt, st = kernels.quantize_fp8_activation_2d(x, g, scale_fmt, backend="triton")
        q_ref, s_ref = fm.quantize_fp8_activation(x.cpu(), g, scale_fmt)
        qt_ref, st_ref = fm.quantize_fp8_activation(x.cpu().t().contiguous(), g, scale_fmt)
        assert torch.equal(bits(q.cpu()), bits(q_ref)) and torch.equal(s.cpu(), s_ref)
        assert torch.equal(bits(qt.cpu()), bits(qt_ref)) and torch.equal(st.cpu(), st_ref)
    ref = kernels.quantize_fp8_activation_2d(x.cpu(), g, scale_fmt, backend="reference")
    assert all(torch.equal(bits(a), bits(b)) for a, b in zip(ref, (q_ref, s_ref, qt_ref, st_ref)))


def test_fp8_activation_quant_2d_rejects_nonfinite(gen):
    x = rand((130, 256), torch.bfloat16, gen)
    x[129, 3] = float("inf")
    with pytest.raises(ValueError, match="1 Inf"):
        kernels.quantize_fp8_activation_2d(x, backend="triton")


@pytest.mark.parametrize("shape", [(200, 300), (128, 256), (1, 20), (300, 129)])
@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
def test_fp8_block_quant_bitwise(shape, scale_fmt, gen):
    for dtype in (torch.bfloat16, torch.float32):
        w = rand(shape, dtype, gen)
        w[: min(128, shape[0]), : min(128, shape[1])] = 0  # an all-zero block
        q, s = quantize_fp8_block_triton(w, (128, 128), scale_fmt)
        q_ref, s_ref = fm.quantize_fp8(w.cpu(), "block", (128, 128), scale_fmt)
        assert torch.equal(bits(q.cpu()), bits(q_ref)) and torch.equal(s.cpu(), s_ref)


def test_fp8_block_quant_extremes_and_other_blocks(gen):
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        w = _extremes(dtype)
        for block in ((128, 128), (1, 32), (64, 16)):
            q, s = quantize_fp8_block_triton(w, block)
            q_ref, s_ref = fm.quantize_fp8(w.cpu(), "block", block)
            assert torch.equal(bits(q.cpu()), bits(q_ref)) and torch.equal(s.cpu(), s_ref)


def test_nonfinite_input_is_a_clear_error(gen):
    w = rand((140, 256), torch.bfloat16, gen)
    w[7, 100] = float("nan")
    w[30, 200] = -float("inf")
    cases = {
        "quantize_int4": lambda: quantize_pack_int4_triton(w, 32),
        "fake_quantize_int4": lambda: fake_quantize_int4_triton(w, 128),
        "quantize_fp8_activation": lambda: quantize_fp8_activation_triton(w),
        "quantize_fp8": lambda: quantize_fp8_block_triton(w),
    }
    for name, fn in cases.items():
        with pytest.raises(ValueError, match=rf"{name}: input contains non-finite values \(1 NaN, 1 Inf"):
            fn()
    _, s = quantize_fp8_block_triton(w, check=False)  # no host sync: the bad block's scale says it
    assert torch.equal(torch.isfinite(s).cpu(), torch.tensor([[False, False], [True, True]]))


# ---------------------------------------------------------------------------------------------------------
# GEMMs
# ---------------------------------------------------------------------------------------------------------
def _int4_weight(n, k, g, qmax, gen, act_dtype=torch.bfloat16):
    w = rand((n, k), torch.float32, gen, "cpu")
    q, s = fm.quantize_int4(w, g, qmax)
    qt, st = kernels.w4a16_repack(fm.pack_int4(q), s)
    w_eng = fm.dequantize_int4(q, s, g, act_dtype)  # the engine's weight, rounded to the activation dtype
    return qt.to(DEV), st.to(DEV), w_eng.float()


CONFIGS = {
    "auto": None,
    "gemv-split3": W4A16Config("gemv", bn=32, bk=64, split_k=3),
    "mma16": W4A16Config("mma", bm=16, bn=32, bk=64, split_k=1),
    "mma16-split2": W4A16Config("mma", bm=16, bn=64, bk=128, split_k=2),
    "mma64": W4A16Config("mma", bm=64, bn=64, bk=32, split_k=1),
    "gemv-bf16x2": W4A16Config("gemv", bn=32, bk=64, split_k=1, unpack="bf16x2"),
    "gemv-bf16x2-split3": W4A16Config("gemv", bn=64, bk=128, split_k=3, unpack="bf16x2"),
    "mma16-bf16x2-split2": W4A16Config("mma", bm=16, bn=32, bk=64, split_k=2, unpack="bf16x2"),
    "mma64-bf16x2": W4A16Config("mma", bm=64, bn=64, bk=128, split_k=1, unpack="bf16x2"),
}


@pytest.mark.parametrize(
    "m,g,config",
    [(1, 128, "auto"), (1, 32, "gemv-split3"), (3, 64, "gemv-split3"), (3, 32, "auto"), (3, 128, "mma16"),
     (17, 64, "mma16-split2"), (17, 32, "auto"), (64, 128, "mma64"), (64, 32, "auto"), (1, 128, "gemv-bf16x2"),
     (1, 32, "gemv-bf16x2"), (2, 64, "gemv-bf16x2-split3"), (3, 128, "gemv-bf16x2-split3"),
     (5, 32, "mma16-bf16x2-split2"), (17, 128, "mma16-bf16x2-split2"), (64, 64, "mma64-bf16x2")],
)  # fmt: skip
def test_w4a16_gemm_matches_reference(m, g, config, gen):
    n, k = 200, 384  # N not a multiple of any tile; K = 3 x 128
    qt, st, w = _int4_weight(n, k, g, 8 if m == 3 else 7, gen)
    x = rand((m, k), torch.bfloat16, gen) / 4
    bias = rand((n,), torch.bfloat16, gen)
    y = w4a16_gemm(x, qt, st, g, bias, CONFIGS[config])
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    assert gemm_ulps(y, x, w, bias) <= 1.0
    assert rel_error(y, x.cpu().float() @ w.T + bias.float()) < 3e-3  # bf16 output rounding: ~1.7e-3


@pytest.mark.parametrize("config", ["auto", "gemv-split3", "mma16-split2", "gemv-bf16x2", "mma16-bf16x2-split2"])
def test_w4a16_gemm_ragged_k_and_fp16(config, gen):
    n, k, g = 72, 320, 64  # K = 2.5 x 128: the last K tile is partial
    for act in (torch.bfloat16, torch.float16):
        qt, st, w = _int4_weight(n, k, g, 7, gen, act)
        m = 5 if config.startswith("mma") else 1
        x = rand((m, k), act, gen) / 4
        if "bf16x2" in config and act == torch.float16:  # its weights are bf16(q * s), not fp16(q * s)
            with pytest.raises(ValueError, match="bf16 activations"):
                w4a16_gemm(x, qt, st, g, None, CONFIGS[config])
            continue
        y = w4a16_gemm(x, qt, st, g, None, CONFIGS[config])
        assert y.dtype == act and gemm_ulps(y, x, w) <= 1.0


@pytest.mark.parametrize("path", ["gemv", "mma"])
@pytest.mark.parametrize("unpack", ["magic", "bf16x2"])
@pytest.mark.parametrize("g", [32, 128])
def test_w4a16_unpacks_the_formats_weights_exactly(path, unpack, g, gen):
    """Rows of the identity as x read out every dequantized weight, in place: each path and unpacking gives
    formats' bits (a K-order slip in the bf16x2 tile's joins would permute rows here)."""
    n, k = 24, 128  # one ragged column tile: the interpreter runs the gemv once per identity row
    qt, st, w = _int4_weight(n, k, g, 8, gen)  # qmax 8: codes -8..7, every nibble value
    eye = torch.eye(k, dtype=torch.bfloat16, device=DEV)
    cfg = W4A16Config(path, bn=32, bk=64, bm=64, split_k=1, unpack=unpack)
    y = w4a16_gemm(eye, qt, st, g, None, cfg)
    assert torch.equal(y.cpu().float(), w.T)


def test_w4a16_bf16x2_gemv_reads_misaligned_and_strided_x(gen):
    """The bf16x2 gemv reads x as int32 pairs: a view starting at an odd element, or rows an odd number of
    elements apart, must still give the right result (the launcher copies such x first)."""
    qt, st, w = _int4_weight(32, 128, 32, 7, gen)
    base = rand((3, 259), torch.bfloat16, gen)  # rows 259 apart; column 1 onward: an odd start
    cfg = W4A16Config("gemv", bn=32, bk=64, split_k=1, unpack="bf16x2")
    for x in (base[:, 1:129], base[:1, 3:131]):
        assert gemm_ulps(w4a16_gemm(x, qt, st, 32, None, cfg), x, w) <= 1.0


def test_w4a16_unpack_option_is_checked(gen):
    qt, st, _ = _int4_weight(32, 128, 32, 7, gen)
    x = rand((20, 128), torch.bfloat16, gen)
    with pytest.raises(ValueError, match="unpack 'lut'"):
        w4a16_gemm(x, qt, st, 32, None, W4A16Config("gemv", bn=32, bk=64, unpack="lut"))


def test_w4a16_linear_dispatch_matches_engine_layer(gen):
    from quantrl.model.linear import W4A16Linear
    from quantrl.model.quant_scheme import QuantScheme

    layer = W4A16Linear(256, 96, True, QuantScheme.int4(32))
    q, s = fm.quantize_int4(rand((96, 256), torch.float32, gen, "cpu"), 32, 7)
    layer.load_({"weight_packed": fm.pack_int4(q), "weight_scale": s, "bias": rand((96,), torch.bfloat16, gen, "cpu")})
    qt, st = kernels.w4a16_repack(layer.weight_packed, layer.weight_scale)
    x = rand((2, 3, 256), torch.bfloat16, gen, "cpu") / 4
    y = kernels.w4a16_linear(x.to(DEV), qt.to(DEV), st.to(DEV), layer.bias.to(DEV), backend="triton")
    bias = layer.bias.detach()
    assert y.shape == (2, 3, 96) and gemm_ulps(y.view(6, 96), x.view(6, 256), layer.dequantized_weight(), bias) <= 1.0
    with torch.no_grad():
        assert gemm_ulps(layer(x).view(6, 96), x.view(6, 256), layer.dequantized_weight(), bias) <= 1.0


@triton.jit
def _div_kernel(a_ptr, b_ptr, q_ptr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    k, bk, r = nm.recip_rn(tl.load(b_ptr + offs))
    tl.store(q_ptr + offs, nm.div_by_recip(tl.load(a_ptr + offs), k, bk, r))


def _hard_quotients(n, gen):
    """(a, b) fp32 pairs where a reciprocal-based division is most likely to round wrong: divisor
    significands next to 1 and 2, quotient significands next to 2, quotients on and next to e4m3 / half-integer
    ties, signed zeros, and scales from fp32's subnormals to 2^118."""
    def u():
        return torch.rand(n, generator=gen, dtype=torch.float64)

    def e(lo, hi):  # random powers of two
        return 2.0 ** torch.randint(lo, hi, (n,), generator=gen).double()

    ulp = torch.randint(1, 1024, (n,), generator=gen).double() * 2.0**-23
    bs = [(1 + ulp) * e(-60, 60), (2 - ulp) * e(-60, 60), (1 + u()) * e(-149, 117), (1 + u()) * e(-10, 10)]
    qs = [(u() * 2 - 1) * 448, (2 - u() * 2**-10) * e(-12, 8) * torch.sign(u() - 0.5),
          torch.randint(-3584, 3585, (n,), generator=gen).double() / 8 + torch.randint(-2, 3, (n,), generator=gen) * 2.0**-21,
          torch.randint(-16, 17, (n,), generator=gen).double() / 2]  # fmt: skip
    out = []
    for b in bs:
        b = b.float()
        for q in qs:
            a = (q * b.double()).float()
            a[:64] = torch.tensor([0.0, -0.0] * 32)
            out.append((a, b))
    return out


def test_reciprocal_division_is_ieee_division(gen):
    """``recip_rn`` + ``div_by_recip`` (the quantizers' x / s) against IEEE fp32 division, 16 x 2^16 hard
    pairs: bit for bit wherever |a / b| >= 2^-11, and below that still under 2^-10 with a's sign, which
    is all e4m3 and integer rounding can see."""
    n = 1 << 16
    for a, b in _hard_quotients(n, gen):
        assert bool(torch.isfinite(a).all() and (b > 0).all())
        q = torch.empty_like(a, device=DEV)
        _div_kernel[(1,)](a.to(DEV), b.to(DEV), q, BLOCK=n)
        got, want = q.cpu(), a / b  # torch's CPU fp32 division is IEEE
        big = want.abs() >= 2.0**-11
        assert torch.equal(got[big].view(torch.int32), want[big].view(torch.int32))
        assert bool((got[~big].abs() < 2.0**-10).all())
        assert torch.equal(torch.signbit(got), torch.signbit(want))


@triton.jit
def _prmt_kernel(a_ptr, b_ptr, c_ptr, out_ptr, BLOCK: tl.constexpr):
    from quantrl.kernels.w4a16 import _prmt

    offs = tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, _prmt(tl.load(a_ptr + offs), tl.load(b_ptr + offs), tl.load(c_ptr + offs)))


def test_prmt_emulation_follows_ptx_semantics(gen):
    """The interpreter's stand-in for ``prmt.b32`` (the NVFP4 decode) against PTX's definition: byte i of d is
    byte ``(c >> 4i) & 7`` of ``(b << 32) | a``; CUB's documented example, then random operands against a
    Python transcription of that rule (selector nibbles with bit 3 clear, as the decode uses them)."""
    n = 64
    a = torch.randint(-(2**31), 2**31, (n,), generator=gen, dtype=torch.int64).to(torch.int32)
    b = torch.randint(-(2**31), 2**31, (n,), generator=gen, dtype=torch.int64).to(torch.int32)
    c = torch.randint(0, 2**16, (n,), generator=gen, dtype=torch.int32) & 0x7777
    a[0], b[0], c[0] = 0x03020100, 0x07060504, 0x7531
    out = torch.empty(n, dtype=torch.int32, device=DEV)
    _prmt_kernel[(1,)](a.to(DEV), b.to(DEV), c.to(DEV), out, BLOCK=n)
    got = out.cpu()
    assert int(got[0]) == 0x07050301
    for i in range(n):
        src = (int(b[i]) & 0xFFFFFFFF) << 32 | (int(a[i]) & 0xFFFFFFFF)
        want = sum(((src >> (8 * ((int(c[i]) >> (4 * j)) & 7))) & 0xFF) << (8 * j) for j in range(4))
        assert int(got[i]) & 0xFFFFFFFF == want, i


# NVFP4A16: the same kernels with the e2m1 decode and the layer's decode table
def _nvfp4_weight(n, k, gen, act_dtype=torch.bfloat16, every_code=False):
    """(qweight_t, scale_t, decode table, engine weight fp32). ``every_code``: random codes 0..15 and random e4m3
    scale bytes (subnormal to 448), so every nibble value and a wide spread of table entries occur."""
    if every_code:
        codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int32).to(torch.uint8)
        scale = torch.randint(1, 0x7F, (n, k // 16), generator=gen, dtype=torch.int32).to(torch.uint8)
        scale = scale.view(torch.float8_e4m3fn)
        gs = torch.tensor([2.0**5 * 1.37])
    else:
        codes, scale, gs = fm.quantize_nvfp4(rand((n, k), torch.float32, gen, "cpu"))
    qt, st = kernels.nvfp4_repack(fm.pack_nvfp4(codes), scale)
    w_eng = fm.dequantize_nvfp4(codes, scale, gs, act_dtype)
    return qt.to(DEV), st.to(DEV), kernels.nvfp4_decode_table(gs.to(DEV)), w_eng.float()


@pytest.mark.parametrize(
    "m,config",
    [(1, "auto"), (1, "gemv-split3"), (3, "gemv-split3"), (3, "auto"), (3, "mma16"), (17, "mma16-split2"),
     (64, "mma64"), (64, "auto")],
)  # fmt: skip
def test_nvfp4_gemm_matches_reference(m, config, gen):
    n, k = 200, 384  # N not a multiple of any tile; K = 24 groups of 16
    qt, st, table, w = _nvfp4_weight(n, k, gen)
    x = rand((m, k), torch.bfloat16, gen) / 4
    bias = rand((n,), torch.bfloat16, gen)
    y = nvfp4_gemm(x, qt, st, table, bias, CONFIGS[config])
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    assert gemm_ulps(y, x, w, bias) <= 1.0


@pytest.mark.parametrize("config", ["auto", "gemv-split3", "mma16-split2", "mma64"])
def test_nvfp4_gemm_ragged_k_and_fp16(config, gen):
    n, k = 72, 336  # K = 21 groups of 16: the last K tile is partial and ends inside a word-row pair
    for act in (torch.bfloat16, torch.float16):
        qt, st, table, w = _nvfp4_weight(n, k, gen, act)
        m = 5 if config.startswith("mma") else 1
        x = rand((m, k), act, gen) / 4
        y = nvfp4_gemm(x, qt, st, table, None, CONFIGS[config])
        assert y.dtype == act and gemm_ulps(y, x, w) <= 1.0


@pytest.mark.parametrize("path", ["gemv", "mma"])
@pytest.mark.parametrize("act", [torch.bfloat16, torch.float16])
def test_nvfp4_unpacks_the_formats_weights_exactly(path, act, gen):
    """Rows of the identity read out every dequantized weight in place: all 16 codes under e4m3 scales from
    subnormal to 448 give formats' values, in both paths (the gemv one row at a time; -0.0 reads out as +0.0,
    the accumulator starts at +0)."""
    n, k = 40, 128
    qt, st, table, w = _nvfp4_weight(n, k, gen, act, every_code=True)
    eye = torch.eye(k, dtype=act, device=DEV)
    cfg = W4A16Config(path, bn=32, bk=64, bm=64, split_k=1)
    rows = [eye] if path == "mma" else [eye[i : i + 1] for i in (0, 1, 7, 8, 15, 16, 63, 64, 127)]
    for x in rows:
        y = nvfp4_gemm(x, qt, st, table, None, cfg)
        want = w.T[x.argmax(dim=1).cpu()]
        assert torch.equal(y.cpu().float(), want)


def test_nvfp4_linear_dispatch_matches_engine_layer(gen):
    from quantrl.model.linear import Nvfp4Linear
    from quantrl.model.quant_scheme import QuantScheme

    layer = Nvfp4Linear(256, 96, True, QuantScheme.nvfp4())
    codes, scale, gs = fm.quantize_nvfp4(rand((96, 256), torch.float32, gen, "cpu"))
    layer.load_({"weight_packed": fm.pack_nvfp4(codes), "weight_scale": scale, "weight_global_scale": gs,
                 "bias": rand((96,), torch.bfloat16, gen, "cpu")})  # fmt: skip
    qt, st = kernels.nvfp4_repack(layer.weight_packed, layer.weight_scale)
    x = rand((2, 3, 256), torch.bfloat16, gen, "cpu") / 4
    bias, w = layer.bias.detach(), layer.dequantized_weight()
    assert torch.equal(kernels.nvfp4_dequantize(qt, st, gs), w)
    y = kernels.nvfp4_linear(x.to(DEV), qt.to(DEV), st.to(DEV), gs.to(DEV), layer.bias.to(DEV), backend="triton")
    assert y.shape == (2, 3, 96) and gemm_ulps(y.view(6, 96), x.view(6, 256), w, bias) <= 1.0
    ref = kernels.nvfp4_linear(x, qt, st, gs, layer.bias, backend="reference")
    with torch.no_grad():
        assert torch.equal(layer(x), ref)  # the CPU layer is the dispatcher's reference


def test_pick_config_paths_by_m():
    assert pick_config(1, 4096, 4096, 132).path == "gemv"
    for m in (2, 16, 64, 256, 4096):
        c = pick_config(m, 4096, 4096, 132)
        assert c.path == "mma" and c.bm <= max(16, m) and c.split_k >= 1
    assert pick_config(1, 4096, 4096, 132).split_k > 1  # decode: split K to fill the SMs
    assert pick_config(4096, 4096, 4096, 132).split_k == 1


@pytest.mark.parametrize("m", [1, 20, 70])
def test_fp8_block_gemm_matches_reference(m, gen):
    n, k = 200, 300  # ragged N and a partial last K block
    x = rand((m, k), torch.bfloat16, gen, "cpu")
    w = rand((n, k), torch.bfloat16, gen, "cpu")
    bias = rand((n,), torch.bfloat16, gen, "cpu")
    xq, xs = fm.quantize_fp8_activation(x, 128)
    wq, ws = fm.quantize_fp8(w, "block")
    xd = fm.dequantize_fp8_activation(xq, xs, 128, torch.float32)
    wd = fm.dequantize_fp8(wq, ws, (128, 128), torch.float32)
    for out, b in ((torch.bfloat16, bias), (torch.float16, None), (torch.float32, bias)):
        y = fp8_block_gemm_triton(xq.to(DEV), xs.to(DEV), wq.to(DEV), ws.to(DEV), None if b is None else b.to(DEV), out)
        assert y.dtype == out and gemm_ulps(y, xd, wd, b) <= 1.0
        assert rel_error(y, xd @ wd.T + (0 if b is None else b.float())) < 3e-3


@pytest.mark.parametrize("m", [1, 70])
def test_fp8_block_gemm_row_scaled_b(m, gen):
    """FP8 training's wgrad: both operands in 1x128 groups along the reduced dim (b scales per row)."""
    n, k = 150, 300  # ragged N and a partial last K block: row scales need no 128 alignment of N
    a = rand((m, k), torch.bfloat16, gen, "cpu")
    b = rand((n, k), torch.bfloat16, gen, "cpu")
    aq, as_ = fm.quantize_fp8_activation(a, 128)
    bq, bs = fm.quantize_fp8_activation(b, 128)
    ad = fm.dequantize_fp8_activation(aq, as_, 128, torch.float32)
    bd = fm.dequantize_fp8_activation(bq, bs, 128, torch.float32)
    for out in (torch.float32, torch.bfloat16):
        y = fp8_block_gemm_triton(aq.to(DEV), as_.to(DEV), bq.to(DEV), bs.to(DEV), None, out, b_scale="row")
        assert gemm_ulps(y, ad, bd) <= 1.0
        ref = kernels.fp8_block_gemm(aq, as_, bq, bs, out_dtype=out, b_scale="row", backend="reference")
        assert gemm_ulps(ref, ad, bd) <= 1.0
    # the block-scaled reading of the same scales is a different function: the flag must matter
    wrong = fp8_block_gemm_triton(aq.to(DEV), as_.to(DEV), bq.to(DEV), bs[::128].contiguous().to(DEV), None,
                                  torch.float32)  # fmt: skip
    assert gemm_ulps(wrong, ad, bd) > 10


def test_fp8_block_linear_triton_path(gen):
    x = rand((3, 5, 256), torch.bfloat16, gen, "cpu")
    wq, ws = fm.quantize_fp8(rand((256, 256), torch.bfloat16, gen, "cpu"), "block")
    ref = kernels.fp8_block_linear(x, wq, ws, backend="reference")
    y = kernels.fp8_block_linear(x.to(DEV), wq.to(DEV), ws.to(DEV), backend="triton", gemm="triton")
    assert y.shape == (3, 5, 256)
    xq, xs = fm.quantize_fp8_activation(x.reshape(-1, 256))
    xd = fm.dequantize_fp8_activation(xq, xs, 128, torch.float32)
    wd = fm.dequantize_fp8(wq, ws, dtype=torch.float32)
    assert gemm_ulps(y.reshape(-1, 256), xd, wd) <= 1.0 and gemm_ulps(ref.reshape(-1, 256), xd, wd) <= 1.0


def test_public_names_stay_functions():
    """Importing a kernel module must not shadow a dispatcher of the same name on the package."""
    import importlib

    for mod in ("block_gemm", "fp8_quant", "int4_quant", "w4a16", "layout", "dispatch", "_numerics"):
        importlib.import_module(f"quantrl.kernels.{mod}")

    assert all(callable(getattr(kernels, name)) for name in kernels.__all__)
