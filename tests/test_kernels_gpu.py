"""quantrl.kernels on a CUDA device at full size: every kernel vs ``formats`` over many shapes.

M from 1 to 4096 and layer shapes up to 14336 x 4096, K and N including non-multiples of every tile;
outputs poisoned before each run (``poisoned_empty``). Quantizers: bit-exact, with both the hardware and
the integer-emulated conversions (``native``). GEMMs: within one output ulp plus the fp32 summation-order
term of an fp64 reference on the exact dequantized operands (``gemm_ulps``), and a relative error under
3e-3 (bf16 output rounding alone is ~1.7e-3). Also: split-K is deterministic, the kernels replay inside
CUDA graphs, and the Triton FP8 GEMM agrees with ``torch._scaled_mm``.
"""

from dataclasses import replace

import pytest
import torch

pytest.importorskip("triton")

from test_kernels_triton import gemm_ulps, rel_error

FP8_MMA_ACC_BITS = 13  # on the GPU, FP8 tensor cores accumulate with ~14 bits inside each MMA (gemm_ulps)

from quantrl import formats as fm
from quantrl import kernels
from quantrl.kernels.block_gemm import fp8_block_gemm_triton
from quantrl.kernels.fp8_quant import (
    quantize_fp8_activation_2d_triton,
    quantize_fp8_activation_triton,
    quantize_fp8_block_triton,
)
from quantrl.kernels.int4_quant import fake_quantize_int4_triton, quantize_pack_int4_triton
from quantrl.kernels.w4a16 import W4A16Config, nvfp4_gemm, w4a16_gemm

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("poisoned_empty")]
DEV = "cuda"


def rand(shape, dtype, seed):
    g = torch.Generator(DEV).manual_seed(seed)
    x = torch.randn(shape, generator=g, device=DEV) * torch.exp(torch.randn(shape, generator=g, device=DEV))
    return x.to(dtype)


def bits(t):
    return t.contiguous().view(torch.uint8)


QUANT_SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (1000, 4160), (3, 128)]


@pytest.mark.parametrize("shape", QUANT_SHAPES)
@pytest.mark.parametrize("native", [True, False])
def test_int4_quant_pack_and_fake_quant_bitwise(shape, native):
    for i, (dtype, g, qmax) in enumerate([(torch.bfloat16, 128, 7), (torch.bfloat16, 32, 8), (torch.float32, 64, 7),
                                          (torch.float16, 128, 8)]):  # fmt: skip
        w = rand(shape, dtype, i)
        packed, s = quantize_pack_int4_triton(w, g, qmax, native=native)
        q_ref, s_ref = fm.quantize_int4(w, g, qmax)
        assert torch.equal(packed, fm.pack_int4(q_ref)) and torch.equal(bits(s), bits(s_ref))
        fq = fake_quantize_int4_triton(w, g, qmax, torch.bfloat16, native=native)
        assert torch.equal(bits(fq), bits(fm.fake_quantize_int4(w, g, qmax, dtype=torch.bfloat16)))
    # and once against the CPU reference (the CUDA reference computes the same numbers)
    w = rand(shape, torch.bfloat16, 99)
    q_cpu, s_cpu = fm.quantize_int4(w.cpu(), 128, 7)
    packed, s = quantize_pack_int4_triton(w, 128, 7, native=native)
    assert torch.equal(packed.cpu(), fm.pack_int4(q_cpu)) and torch.equal(bits(s.cpu()), bits(s_cpu))


@pytest.mark.parametrize("shape", QUANT_SHAPES + [(1, 4100), (4096, 14336 + 64)])
@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
def test_fp8_quant_bitwise(shape, native, scale_fmt):
    for i, dtype in enumerate((torch.bfloat16, torch.float32)):
        x = rand(shape, dtype, 10 + i)
        x[: min(128, shape[0]), :128] = 0
        q, s = quantize_fp8_block_triton(x, (128, 128), scale_fmt, native=native)
        q_ref, s_ref = fm.quantize_fp8(x, "block", (128, 128), scale_fmt)
        assert torch.equal(bits(q), bits(q_ref)) and torch.equal(s, s_ref)
        q, s = quantize_fp8_activation_triton(x, 128, scale_fmt, native=native)
        q_ref, s_ref = fm.quantize_fp8_activation(x, 128, scale_fmt)
        assert torch.equal(bits(q), bits(q_ref)) and torch.equal(s, s_ref)
        q2, s2, qt, st = quantize_fp8_activation_2d_triton(x, 128, scale_fmt, native=native)
        qt_ref, st_ref = fm.quantize_fp8_activation(x.t().contiguous(), 128, scale_fmt)
        assert torch.equal(bits(q2), bits(q_ref)) and torch.equal(s2, s_ref)
        assert torch.equal(bits(qt), bits(qt_ref)) and torch.equal(st, st_ref)


def _int4_weight(n, k, g, seed, act=torch.bfloat16):
    q, s = fm.quantize_int4(rand((n, k), torch.float32, seed), g, 7)
    qt, st = kernels.w4a16_repack(fm.pack_int4(q), s)
    return qt, st, fm.dequantize_int4(q, s, g, act)


W4A16_SHAPES = [(4096, 4096, 128), (14336, 4096, 32), (4096, 14336, 64), (3072, 1024, 128), (1000, 4160, 32)]
MS = [1, 2, 3, 4, 8, 16, 17, 32, 64, 100, 128, 256, 1024, 4096]


@pytest.mark.parametrize("n,k,g", W4A16_SHAPES)
def test_w4a16_gemm_all_m(n, k, g):
    qt, st, w = _int4_weight(n, k, g, n + k)
    bias = rand((n,), torch.bfloat16, 1)
    for m in MS:
        x = rand((m, k), torch.bfloat16, m) / 4
        y = w4a16_gemm(x, qt, st, g, bias if m % 2 else None)
        b = bias if m % 2 else None
        assert gemm_ulps(y, x, w, b) <= 2.0, f"M={m}"
        assert rel_error(y, x.double() @ w.double().T + (0 if b is None else b.double())) < 3e-3, f"M={m}"


@pytest.mark.parametrize("m", [1, 2, 4, 8, 16])
def test_w4a16_both_paths_at_small_m(m):
    n, k, g = 4096, 4096, 128
    qt, st, w = _int4_weight(n, k, g, 5)
    x = rand((m, k), torch.bfloat16, 6) / 4
    configs = [W4A16Config("gemv", bn=64, bk=128), W4A16Config("gemv", bn=128, bk=64, split_k=1),
               W4A16Config("mma", bm=16, bn=64, bk=128), W4A16Config("mma", bm=16, bn=128, bk=64, split_k=4)]  # fmt: skip
    for cfg in configs + [replace(c, unpack=u) for c in configs for u in ("magic", "bf16x2")]:
        y = w4a16_gemm(x, qt, st, g, None, cfg)
        assert gemm_ulps(y, x, w) <= 2.0, cfg
        y2 = w4a16_gemm(x, qt, st, g, None, cfg)
        assert torch.equal(y, y2), f"split-K must be deterministic: {cfg}"


@pytest.mark.parametrize("path", ["gemv", "mma"])
@pytest.mark.parametrize("unpack", ["magic", "bf16x2"])
def test_w4a16_unpackings_give_the_formats_weights_bitwise(path, unpack):
    """x = identity rows reads every dequantized weight out in place: the PTX unpacking (and the joins that
    rebuild the K-major tile) must give formats' bf16 weights bit for bit, not merely close ones."""
    n, k, g = 1000, 512, 32
    qt, st, w = _int4_weight(n, k, g, 11)
    eye = torch.eye(k, dtype=torch.bfloat16, device="cuda")
    cfg = W4A16Config(path, bn=64, bk=128, bm=64, split_k=1, unpack=unpack)
    assert torch.equal(w4a16_gemm(eye, qt, st, g, None, cfg).float(), w.T.float())


def _nvfp4_weight(n, k, seed, act=torch.bfloat16):
    codes, s, gs = fm.quantize_nvfp4(rand((n, k), torch.float32, seed))
    qt, st = kernels.nvfp4_repack(fm.pack_nvfp4(codes), s)
    return qt, st, kernels.nvfp4_decode_table(gs), gs, fm.dequantize_nvfp4(codes, s, gs, act)


@pytest.mark.parametrize("n,k", [(4096, 4096), (14336, 4096), (4096, 14336), (3072, 1024), (1000, 4160)])
def test_nvfp4_gemm_all_m(n, k):
    qt, st, table, gs, w = _nvfp4_weight(n, k, n + k)
    bias = rand((n,), torch.bfloat16, 1)
    for m in MS:
        x = rand((m, k), torch.bfloat16, m) / 4
        b = bias if m % 2 else None
        y = kernels.nvfp4_linear(x, qt, st, gs, b, table=table)
        assert gemm_ulps(y, x, w, b) <= 2.0, f"M={m}"
        assert rel_error(y, x.double() @ w.double().T + (0 if b is None else b.double())) < 3e-3, f"M={m}"


@pytest.mark.parametrize("path", ["gemv", "mma"])
@pytest.mark.parametrize("act", [torch.bfloat16, torch.float16])
def test_nvfp4_decode_gives_the_formats_weights_bitwise(path, act):
    """Every code under every finite positive e4m3 scale (random bytes) read out through identity rows: the
    byte permutes of the decode (inline PTX) must give formats' weights bit for bit."""
    n, k = 1000, 512
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.int32).to(torch.uint8)
    scale = torch.randint(1, 0x7F, (n, k // 16), generator=g, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn)
    gs = torch.tensor([37.13])
    qt, st = kernels.nvfp4_repack(fm.pack_nvfp4(codes), scale)
    w = fm.dequantize_nvfp4(codes.to(DEV), scale.to(DEV), gs.to(DEV), act)
    eye = torch.eye(k, dtype=act, device=DEV)
    cfg = W4A16Config(path, bn=64, bk=128, bm=64, split_k=1)
    y = nvfp4_gemm(eye, qt.to(DEV), st.to(DEV), kernels.nvfp4_decode_table(gs.to(DEV)), None, cfg)
    assert torch.equal(y.float(), w.T.float())


def test_w4a16_fp16_activations():
    qt, st, w = _int4_weight(4096, 4096, 64, 7, torch.float16)
    for m in (1, 16, 256):
        x = rand((m, 4096), torch.float16, m) / 4
        y = kernels.w4a16_linear(x, qt, st)
        assert y.dtype == torch.float16 and gemm_ulps(y, x, w) <= 2.0


@pytest.mark.parametrize("m", [1, 16, 100, 1024, 4096])
@pytest.mark.parametrize("n,k", [(4096, 4096), (8192, 8192), (1000, 4100)])
def test_fp8_block_gemm(m, n, k):
    x = rand((m, k), torch.bfloat16, m)
    w = rand((n, k), torch.bfloat16, n) / 64
    xq, xs = fm.quantize_fp8_activation(x)
    wq, ws = fm.quantize_fp8(w, "block")
    xd = fm.dequantize_fp8_activation(xq, xs, 128, torch.float32)
    wd = fm.dequantize_fp8(wq, ws, (128, 128), torch.float32)
    y = fp8_block_gemm_triton(xq, xs, wq, ws)
    assert gemm_ulps(y, xd, wd, acc_bits=FP8_MMA_ACC_BITS) <= 2.0 and rel_error(y, xd.double() @ wd.double().T) < 3e-3
    if n % 128 == 0 and k % 128 == 0 and torch.cuda.get_device_capability() >= (9, 0):
        try:
            ref_mm = kernels.fp8_block_linear(x, wq, ws, gemm="scaled_mm")
        except RuntimeError as e:  # no blockwise cuBLAS in this torch: the Triton GEMM is the path then
            pytest.skip(f"torch._scaled_mm blockwise unavailable: {e}")
        assert rel_error(ref_mm, y) < 4e-3


@pytest.mark.parametrize("m", [128, 1000, 4096])
def test_fp8_wgrad_gemm_row_scales(m):
    """FP8 training's wgrad shape: dy^T [N, M] @ x^T [K, M]^T, both 1x128 along the M (token) axis."""
    n, k = 4096, 1024
    a = rand((n, m), torch.bfloat16, m)
    b = rand((k, m), torch.bfloat16, m + 1)
    aq, as_ = fm.quantize_fp8_activation(a)
    bq, bs = fm.quantize_fp8_activation(b)
    ad = fm.dequantize_fp8_activation(aq, as_, 128, torch.float32)
    bd = fm.dequantize_fp8_activation(bq, bs, 128, torch.float32)
    y = fp8_block_gemm_triton(aq, as_, bq, bs, None, torch.float32, b_scale="row")
    assert gemm_ulps(y, ad, bd, acc_bits=FP8_MMA_ACC_BITS) <= 2.0
    if m % 128 == 0 and torch.cuda.get_device_capability() >= (9, 0):
        try:
            ym = kernels.fp8_block_gemm(aq, as_, bq, bs, out_dtype=torch.float32, b_scale="row", gemm="scaled_mm")
        except RuntimeError as e:  # no 1x128 x 1x128 cuBLAS recipe in this torch: Triton is the path then
            pytest.skip(f"torch._scaled_mm 1x128 x 1x128 unavailable: {e}")
        assert rel_error(ym, y) < 1e-3  # fp8 tensor cores accumulate a 128-block in reduced precision


def test_fp8_training_linear_on_cuda_matches_the_reference():
    """Fp8BlockTrainLinear on CUDA (auto: blockwise _scaled_mm where cuBLAS has it, else the Triton GEMM) vs
    the same layer on CPU (formats + fp32 matmuls): forward and both gradients."""
    from torch import nn

    from quantrl.kernels import dispatch
    from quantrl.train.fp8_linear import Fp8BlockTrainLinear

    torch.manual_seed(0)
    lin = nn.Linear(1024, 2048, bias=False).to(torch.bfloat16)
    x = torch.randn(1000, 1024).to(torch.bfloat16)
    dy = torch.randn(1000, 2048).to(torch.bfloat16)
    res = []
    for dev in ("cpu", DEV):
        layer = Fp8BlockTrainLinear.from_linear(nn.Linear(1024, 2048, bias=False, device=dev, dtype=torch.bfloat16))
        layer.weight = nn.Parameter(lin.weight.detach().to(dev).clone())
        xi = x.detach().to(dev).requires_grad_()
        y = layer(xi)
        y.backward(dy.to(dev))
        res.append([t.float().cpu() for t in (y, xi.grad, layer.weight.grad)])
    for name, a, b in zip(("y", "dx", "dW"), *res):
        assert rel_error(b, a) < 4e-3, name
    print("scaled_mm recipes:", dispatch._SCALED_MM_OK)


def test_kernels_replay_in_cuda_graphs():
    qt, st, _ = _int4_weight(4096, 4096, 128, 3)
    nq, nst, table, gs, _ = _nvfp4_weight(4096, 4096, 9)
    x = rand((4, 4096), torch.bfloat16, 4)
    wq, ws = fm.quantize_fp8(rand((4096, 4096), torch.bfloat16, 5), "block")

    def run():
        return (kernels.w4a16_linear(x, qt, st), kernels.nvfp4_linear(x, nq, nst, gs, table=table),
                kernels.fp8_block_linear(x, wq, ws, gemm="triton", check=False))  # fmt: skip

    eager = run()
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        out = run()
    x.copy_(rand((4, 4096), torch.bfloat16, 6))
    graph.replay()
    fresh = run()
    for a, b, e in zip(out, fresh, eager, strict=True):
        assert torch.equal(a, b) and not torch.equal(a, e)


def test_nonfinite_errors_on_gpu():
    w = rand((256, 256), torch.bfloat16, 8)
    w[1, 2] = float("nan")
    for fn in (lambda: kernels.quantize_pack_int4(w), lambda: kernels.quantize_fp8_block(w),
               lambda: kernels.quantize_fp8_activation(w), lambda: kernels.fake_quantize_int4(w)):  # fmt: skip
        with pytest.raises(ValueError, match="1 NaN"):
            fn()
