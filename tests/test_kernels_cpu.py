"""quantrl.kernels without a GPU: the W4A16 and NVFP4 kernel layouts (pure torch) and the dispatchers' reference path.

The dispatchers must compute exactly the ``formats`` numbers on CPU (bitwise), accept the same inputs and
raise the same errors, and the package must import on a machine without Triton.
"""

import subprocess
import sys

import pytest
import torch

from quantrl import formats as fm
from quantrl import kernels
from quantrl.kernels import w4a16_repack, w4a16_unrepack
from quantrl.model.linear import Fp8Linear, W4A16Linear
from quantrl.model.quant_scheme import QuantScheme


def rand(shape, dtype, gen):
    return (torch.randn(shape, generator=gen) * torch.exp(torch.randn(shape, generator=gen))).to(dtype)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


@pytest.mark.parametrize("n,k,g", [(1, 32, 32), (37, 256, 64), (300, 384, 128), (64, 4096, 32)])
def test_repack_is_exactly_reversible(n, k, g, gen):
    # arbitrary words (all 32 bits, negative included) and scales (any bf16 bit pattern, NaN too):
    # the repack must move bits, never reinterpret them
    words = torch.randint(-(2**31), 2**31 - 1, (n, k // 8), generator=gen, dtype=torch.int32)
    scale = torch.randint(-(2**15), 2**15 - 1, (n, k // g), generator=gen, dtype=torch.int16).view(torch.bfloat16)
    qt, st = w4a16_repack(words, scale)
    assert qt.shape == (k // 8, n) and st.shape == (k // g, n) and qt.is_contiguous() and st.is_contiguous()
    assert qt.dtype == torch.int32 and st.dtype == torch.bfloat16
    back_w, back_s = w4a16_unrepack(qt, st)
    assert torch.equal(back_w, words) and torch.equal(bits(back_s), bits(scale))
    # kernel layout: word [w, n] is the checkpoint's word [n, w]; scale row = one group of all columns
    assert torch.equal(qt[3 % (k // 8)], words[:, 3 % (k // 8)]) and torch.equal(bits(st[0]), bits(scale[:, 0]))


def test_repack_rejects_bad_shapes():
    with pytest.raises(ValueError, match="int32"):
        w4a16_repack(torch.zeros(4, 4, dtype=torch.int64), torch.ones(4, 1, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="disagree on N"):
        w4a16_repack(torch.zeros(4, 4, dtype=torch.int32), torch.ones(5, 1, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="multiple of 8"):
        w4a16_repack(torch.zeros(4, 4, dtype=torch.int32), torch.ones(4, 8, dtype=torch.bfloat16))  # G = 4
    with pytest.raises(ValueError, match="disagree on N"):
        w4a16_unrepack(torch.zeros(4, 4, dtype=torch.int32), torch.ones(1, 5, dtype=torch.bfloat16))


@pytest.mark.parametrize("n,k", [(1, 16), (37, 256), (64, 4096)])
def test_nvfp4_repack_is_exactly_reversible(n, k, gen):
    packed = torch.randint(0, 256, (n, k // 2), generator=gen, dtype=torch.int32).to(torch.uint8)
    scale = torch.randint(0, 256, (n, k // 16), generator=gen, dtype=torch.int32).to(torch.uint8)
    scale = scale.view(torch.float8_e4m3fn)  # NaN bytes included: bits are moved, never read
    qt, st = kernels.nvfp4_repack(packed, scale)
    groups = k // 16
    assert qt.dtype == torch.int32 and qt.shape == (k // 8, n) and st.dtype == torch.int32
    assert st.shape == (-(-groups // 4), n)
    back_p, back_s = kernels.nvfp4_unrepack(qt, st)
    assert torch.equal(back_p, packed) and torch.equal(bits(back_s), bits(scale))
    # word [w, n] holds elements 8w..8w+7 of row n: nibble i has element MAG_AT[i]'s magnitude in bits 0..2
    # and element SIGN_AT[i]'s sign in bit 3 (the decode's byte-permute order)
    from quantrl.kernels.layout import NVFP4_MAG_AT, NVFP4_SIGN_AT

    codes = fm.unpack_nvfp4(packed).to(torch.int32)
    w = 3 % (k // 8)
    for i in range(8):
        nib = (qt[w] >> (4 * i)) & 0xF
        assert torch.equal(nib & 7, codes[:, 8 * w + NVFP4_MAG_AT[i]] & 7)
        assert torch.equal(nib >> 3, codes[:, 8 * w + NVFP4_SIGN_AT[i]] >> 3)
    # scale word [r, n]: byte j is group 4r + j of row n; bytes past the last group are 0
    for g in range(4 * st.shape[0]):
        byte = (st[g // 4] >> (8 * (g % 4))) & 0xFF
        want = scale.view(torch.uint8)[:, g].to(torch.int32) if g < groups else torch.zeros(n, dtype=torch.int32)
        assert torch.equal(byte, want), g


def test_nvfp4_decode_table_is_formats_weights(gen):
    """Entry [d, b] holds formats' weights of magnitudes 0..7 under e4m3 byte b in bf16 (d = 0) and fp16
    (d = 1), low bytes then high bytes, and flipping an entry's sign bit gives formats' weight of the
    negative code, bit for bit (-0.0 included): the kernel's decode is exactly these lookups and flips. Any
    global scale, from one that overflows fp16 to one that makes subnormals."""
    every = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    finite = torch.isfinite(every.view(torch.float8_e4m3fn).float())
    codes = torch.arange(16, dtype=torch.uint8).repeat(256, 1)  # one group per scale byte: codes 0..15
    scales = every.view(torch.float8_e4m3fn).view(256, 1)
    for gs in (torch.rand(4, generator=gen) * 10.0 ** torch.randint(-30, 30, (4,), generator=gen)).tolist():
        gs_t = torch.tensor([gs])
        table = kernels.nvfp4_decode_table(gs_t)
        assert table.dtype == torch.int32 and table.shape == (2, 256, 4)
        for d, dtype in enumerate((torch.bfloat16, torch.float16)):
            raw = table[d].contiguous().view(torch.uint8).to(torch.int32)  # [256, 16]
            mags = raw[:, :8] | (raw[:, 8:] << 8)  # [256, 8] 16-bit patterns
            want = fm.dequantize_nvfp4(codes, scales, gs_t, dtype).view(torch.int16).to(torch.int32) & 0xFFFF
            assert torch.equal(mags[finite], want[finite, :8]), (gs, dtype)
            assert torch.equal((mags ^ 0x8000)[finite], want[finite, 8:]), (gs, dtype)
    with pytest.raises(ValueError, match="one float"):
        kernels.nvfp4_decode_table(torch.ones(2))
    with pytest.raises(ValueError):
        kernels.nvfp4_decode_table(torch.tensor([-1.0]))


def test_nvfp4_repack_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        kernels.nvfp4_repack(torch.zeros(4, 8, dtype=torch.int32), torch.ones(4, 1, dtype=torch.float8_e4m3fn))
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        kernels.nvfp4_repack(torch.zeros(4, 8, dtype=torch.uint8), torch.ones(4, 1, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="groups of 16"):
        kernels.nvfp4_unrepack(torch.zeros(4, 4, dtype=torch.int32), torch.ones(2, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="int32"):
        kernels.nvfp4_unrepack(torch.zeros(4, 4, dtype=torch.int32), torch.ones(1, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="K=100"):
        kernels.nvfp4_linear(torch.zeros(2, 100), torch.zeros(4, 4, dtype=torch.int32),
                             torch.zeros(1, 4, dtype=torch.int32), torch.ones(1))  # fmt: skip


@pytest.mark.parametrize("group_size", [32, 128])
@pytest.mark.parametrize("qmax", [7, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int4_dispatch_reference_equals_formats(group_size, qmax, dtype, gen):
    w = rand((33, 256), dtype, gen)
    packed, s = kernels.quantize_pack_int4(w, group_size, qmax)
    q, s_ref = fm.quantize_int4(w, group_size, qmax)
    assert torch.equal(packed, fm.pack_int4(q)) and torch.equal(bits(s), bits(s_ref))
    for out in (None, torch.bfloat16, torch.float32):
        fq = kernels.fake_quantize_int4(w, group_size, qmax, out)
        assert torch.equal(bits(fq), bits(fm.fake_quantize_int4(w, group_size, qmax, dtype=out)))
    wr = w.clone().requires_grad_()
    kernels.fake_quantize_int4(wr, group_size, qmax, torch.bfloat16).float().mul(3.0).sum().backward()
    assert torch.equal(wr.grad, torch.full_like(w, 3.0))  # straight-through


@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
def test_fp8_dispatch_reference_equals_formats(scale_fmt, gen):
    w = rand((200, 300), torch.bfloat16, gen)
    q, s = kernels.quantize_fp8_block(w, (128, 128), scale_fmt)
    q_ref, s_ref = fm.quantize_fp8(w, "block", (128, 128), scale_fmt)
    assert torch.equal(bits(q), bits(q_ref)) and torch.equal(s, s_ref)
    x = rand((2, 3, 300), torch.bfloat16, gen)
    q, s = kernels.quantize_fp8_activation(x, 128, scale_fmt)
    q_ref, s_ref = fm.quantize_fp8_activation(x, 128, scale_fmt)
    assert q.shape == x.shape and s.shape == (2, 3, 3)
    assert torch.equal(bits(q), bits(q_ref)) and torch.equal(s, s_ref)


def _w4a16_layer(n, k, g, gen, bias=True):
    layer = W4A16Linear(k, n, bias, QuantScheme.int4(g))
    w = rand((n, k), torch.float32, gen)
    q, s = fm.quantize_int4(w, g, 7)
    t = {"weight_packed": fm.pack_int4(q), "weight_scale": s}
    if bias:
        t["bias"] = rand((n,), torch.bfloat16, gen)
    layer.load_(t)
    return layer


@pytest.mark.parametrize("g", [32, 128])
def test_w4a16_linear_reference_equals_the_engine_layer(g, gen):
    layer = _w4a16_layer(96, 256, g, gen)
    qt, st = w4a16_repack(layer.weight_packed, layer.weight_scale)
    for dtype in (torch.bfloat16, torch.float32):
        x = rand((2, 5, 256), dtype, gen)
        y = kernels.w4a16_linear(x, qt, st, None if layer.bias is None else layer.bias.to(dtype), group_size=g)
        assert y.shape == (2, 5, 96) and torch.equal(y, layer.to(dtype)(x))
    assert torch.equal(kernels.w4a16_dequantize(qt, st, torch.bfloat16), layer.dequantized_weight(torch.bfloat16))


def test_fp8_block_linear_reference_equals_the_engine_layer(gen):
    layer = Fp8Linear(256, 192, True, QuantScheme.fp8_block())
    wq, ws = fm.quantize_fp8(rand((192, 256), torch.float32, gen) / 8, "block")
    layer.load_({"weight": wq, "weight_scale_inv": ws, "bias": rand((192,), torch.bfloat16, gen)})
    x = rand((7, 256), torch.bfloat16, gen)
    y = kernels.fp8_block_linear(x, layer.weight, layer.weight_scale_inv, layer.bias)
    assert torch.equal(y, layer(x))
    xq, xs = fm.quantize_fp8_activation(x)
    assert torch.equal(kernels.fp8_block_gemm(xq, xs, wq, ws, layer.bias), layer(x))


def test_dispatch_errors_name_the_problem(gen):
    w = rand((16, 96), torch.bfloat16, gen)
    with pytest.raises(ValueError, match="not divisible by group_size=64"):
        kernels.quantize_pack_int4(w, 64)
    with pytest.raises(ValueError, match="qmax"):
        kernels.fake_quantize_int4(w, 32, qmax=6)
    with pytest.raises(ValueError, match="backend must be one of"):
        kernels.quantize_pack_int4(w, 32, backend="cuda")
    bad = w.clone()
    bad[3, 5] = float("nan")
    for fn in (lambda: kernels.quantize_pack_int4(bad, 32), lambda: kernels.quantize_fp8_block(bad),
               lambda: kernels.quantize_fp8_activation(bad), lambda: kernels.fake_quantize_int4(bad, 32)):  # fmt: skip
        with pytest.raises(ValueError, match="1 NaN"):
            fn()
    qt, st = w4a16_repack(*kernels.quantize_pack_int4(w, 32))
    with pytest.raises(ValueError, match="K=64 but the weight holds K=96"):
        kernels.w4a16_linear(torch.zeros(2, 64, dtype=torch.bfloat16), qt, st)
    with pytest.raises(ValueError, match="group size 32, not 128"):
        kernels.w4a16_linear(w[:2], qt, st, group_size=128)


def test_package_imports_and_falls_back_without_triton():
    """A machine without Triton: ``quantrl.kernels`` imports and every dispatcher takes the reference path."""
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "import torch, quantrl.kernels as K\n"
        "from quantrl import formats as fm\n"
        "assert not K.triton_available() and not K.interpreted()\n"
        "w = torch.randn(8, 64, dtype=torch.bfloat16)\n"
        "p, s = K.quantize_pack_int4(w, 32)\n"
        "q, s2 = fm.quantize_int4(w, 32)\n"
        "assert torch.equal(p, fm.pack_int4(q)) and torch.equal(s, s2)\n"
        "try:\n"
        "    K.quantize_pack_int4(w, 32, backend='triton')\n"
        "    raise SystemExit('backend=triton should fail without triton')\n"
        "except RuntimeError as e:\n"
        "    assert 'triton is not installed' in str(e)\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_fp8_block_gemm_checks_b_scale_layout():
    xq, xs = fm.quantize_fp8_activation(torch.randn(4, 256))
    bq, bs = fm.quantize_fp8_activation(torch.randn(200, 256))  # 1x128 scales [200, 2]
    assert kernels.fp8_block_gemm(xq, xs, bq, bs, b_scale="row").shape == (4, 200)
    with pytest.raises(ValueError, match=r"128x128 b blocks \(2, 2\)"):
        kernels.fp8_block_gemm(xq, xs, bq, bs)  # read as a weight, the scales have the wrong shape
    with pytest.raises(ValueError, match="b_scale must be"):
        kernels.fp8_block_gemm(xq, xs, bq, bs, b_scale="column")
    with pytest.raises(ValueError, match="gemm must be"):
        kernels.fp8_block_gemm(xq, xs, bq, bs, b_scale="row", gemm="cublas")


def test_scaled_mm_probe_keeps_only_an_agreeing_cublas(monkeypatch):
    """The once-per-recipe check behind gemm="auto" (its CUDA call is replaced by stand-ins here)."""
    from quantrl.kernels import dispatch

    xq, xs = fm.quantize_fp8_activation(torch.randn(4, 256))
    wq, ws = fm.quantize_fp8(torch.randn(256, 256), "block")
    good = dispatch._reference_block_gemm(xq, xs, wq, ws, None, torch.float32, "block")
    calls = []

    def fallback():
        calls.append(1)
        return good

    cases = {"agrees": lambda *a: good * (1 + 1e-3), "wrong": lambda *a: good * 1.5, "raises": None}
    for name, fake in cases.items():
        monkeypatch.setattr(dispatch, "_SCALED_MM_OK", {})

        def stand_in(*a, fake=fake):
            if fake is None:
                raise RuntimeError("Invalid scaling configuration")
            return fake(*a)

        monkeypatch.setattr(dispatch, "scaled_mm_block", stand_in)
        calls.clear()
        if name == "agrees":
            y = dispatch._try_scaled_mm(xq, xs, wq, ws, torch.float32, "row", fallback)
            assert y is not None and dispatch._SCALED_MM_OK == {("cpu", None, "row"): True} and len(calls) == 1
            dispatch._try_scaled_mm(xq, xs, wq, ws, torch.float32, "row", fallback)
            assert len(calls) == 1, "probed once per recipe, not per call"
        else:
            with pytest.warns(UserWarning, match="disagrees" if name == "wrong" else "no blockwise FP8"):
                assert dispatch._try_scaled_mm(xq, xs, wq, ws, torch.float32, "row", fallback) is None
            assert dispatch._SCALED_MM_OK == {("cpu", None, "row"): False}


def test_scaled_mm_probe_compares_like_with_like_when_there_is_a_bias(monkeypatch, recwarn):
    from quantrl.kernels import dispatch

    xq, xs = fm.quantize_fp8_activation(torch.randn(4, 256))
    wq, ws = fm.quantize_fp8(torch.randn(256, 256), "block")
    bias = torch.full((256,), 100.0)
    monkeypatch.setattr(dispatch, "_SCALED_MM_OK", {})
    monkeypatch.setattr(dispatch, "scaled_mm_block_supported", lambda *a: True)
    monkeypatch.setattr(dispatch, "scaled_mm_block", lambda xq, xs, wq, ws, dt, b: dispatch._reference_block_gemm(
        xq, xs, wq, ws, None, dt, b))  # fmt: skip  # what cuBLAS returns: no bias
    y = kernels.fp8_block_gemm(xq, xs, wq, ws, bias, torch.float32)
    assert dispatch._SCALED_MM_OK == {("cpu", None, "block"): True} and not recwarn.list
    assert torch.equal(y, dispatch._reference_block_gemm(xq, xs, wq, ws, None, torch.float32, "block") + bias)
