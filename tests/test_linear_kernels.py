"""The engine Linears on their Triton kernel paths (CUDA, or CPU through Triton's interpreter).

W4A16Linear (and Nvfp4Linear, the same protocol): repack at post-process, kernel output within the bf16 rounding floor of the reference, new
weights after restore/load/post-process in the same buffers, and a warned fallback when the first-call
comparison fails. Fp8Linear (128x128 blocks): the kernels.fp8_block_linear path, exact tiles and ragged."""

import pytest
import torch

pytest.importorskip("triton")

from quantrl import formats as fm
from quantrl import kernels
from quantrl.model import QuantScheme
from quantrl.model.linear import W4A16Linear

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
pytestmark = [
    pytest.mark.skipif(not (CUDA or kernels.interpreted()), reason="needs CUDA or TRITON_INTERPRET=1"),
    pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning"),  # numpy inside the interpreter
]


def _load(lin, w, g):
    q, s = fm.quantize_int4(w, g, 7)
    lin.restore_weights_before_loading()
    lin.load_({"weight_packed": fm.pack_int4(q).to(DEV), "weight_scale": s.to(DEV)})
    lin.post_process_weights()


def _layer(n, k, g, gen, bias=True):
    lin = W4A16Linear(k, n, bias, QuantScheme.int4(g), torch.bfloat16, DEV)
    lin.kernel_backend = "triton"  # on CPU: the interpreter
    if bias:
        with torch.no_grad():
            lin.bias.copy_(torch.randn(n, generator=gen).to(torch.bfloat16))
    return lin


def _rel(a, b):
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


@pytest.mark.parametrize("m", [1, 5])
def test_kernel_path_matches_reference_and_follows_updates(m, gen):
    n, k, g = 80, 256, 128
    lin = _layer(n, k, g, gen)
    _load(lin, torch.randn(n, k, generator=gen), g)
    assert lin._kernel_valid and lin._kernel_weights[0].shape == (k // 8, n)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16).to(DEV)
    y = lin(x)  # first call: compared with the reference, then answered by the kernel
    assert lin._kernel_ok is True and torch.equal(lin(x), y)  # as every later call is
    assert _rel(y, lin.reference_forward(x)) < 3e-3
    addr = lin._kernel_weights[0].data_ptr()
    _load(lin, torch.randn(n, k, generator=gen), g)  # an update: same buffers, new numbers
    assert lin._kernel_weights[0].data_ptr() == addr
    y2 = lin(x)
    ref2 = lin.reference_forward(x)
    assert _rel(y2, ref2) < 3e-3 and _rel(y2, y) > 0.1


def test_failed_probe_falls_back_to_the_reference(gen, monkeypatch):
    n, k, g = 64, 128, 128
    lin = _layer(n, k, g, gen, bias=False)
    _load(lin, torch.randn(n, k, generator=gen), g)
    monkeypatch.setattr(lin, "_kernel_forward", lambda x: torch.zeros(x.shape[0], n, dtype=x.dtype, device=x.device))
    x = torch.randn(3, k, generator=gen).to(torch.bfloat16).to(DEV)
    with pytest.warns(UserWarning, match="W4A16 kernel disabled"):
        y = lin(x)
    assert lin._kernel_ok is False and torch.equal(y, lin.reference_forward(x))
    assert torch.equal(lin(x), lin.reference_forward(x))  # stays on the reference, no second warning
    _load(lin, torch.randn(n, k, generator=gen), g)
    assert not lin._kernel_valid or lin._kernel_ok is False


def test_first_call_answers_with_the_kernel_it_keeps(gen, monkeypatch):
    """A kernel that agrees with the reference to 2^-7 (not bit for bit) is kept, and the first call already
    returns its answer: the same input then gives the same output on the first call and every later one."""
    n, k, g = 64, 128, 128
    lin = _layer(n, k, g, gen, bias=False)
    _load(lin, torch.randn(n, k, generator=gen), g)
    real = lin._kernel_forward
    monkeypatch.setattr(lin, "_kernel_forward", lambda x: real(x) * (1 + 2**-7))
    x = torch.randn(4, k, generator=gen).to(torch.bfloat16).to(DEV)
    first = lin(x)
    assert lin._kernel_ok is True and not torch.equal(first, lin.reference_forward(x))
    assert torch.equal(first, lin(x))


def test_probe_on_a_prefill_also_checks_the_one_row_path(gen, monkeypatch):
    """The first call is usually a prefill (many rows: the mma path); decode steps then take the gemv path.
    A kernel wrong only at M = 1 must be caught by that first probe, not silently used for decoding."""
    n, k, g = 64, 128, 128
    lin = _layer(n, k, g, gen, bias=False)
    _load(lin, torch.randn(n, k, generator=gen), g)
    real = lin._kernel_forward
    monkeypatch.setattr(lin, "_kernel_forward", lambda x: real(x) if x.shape[0] > 1 else -real(x))
    x = torch.randn(6, k, generator=gen).to(torch.bfloat16).to(DEV)
    with pytest.warns(UserWarning, match="W4A16 kernel disabled"):
        lin(x)
    x1 = x[:1]
    assert lin._kernel_ok is False and torch.equal(lin(x1), lin.reference_forward(x1))


def test_int8_and_fp32_activations_never_take_the_kernel(gen):
    lin8 = W4A16Linear(128, 32, False, QuantScheme(method="int", num_bits=8), torch.bfloat16, DEV)
    lin8.kernel_backend = "triton"
    lin8.post_process_weights()
    assert not lin8._kernel_valid
    lin = _layer(32, 128, 128, gen, bias=False)
    _load(lin, torch.randn(32, 128, generator=gen), 128)
    x = torch.randn(2, 128, generator=gen).to(DEV)
    assert torch.equal(lin(x), lin.reference_forward(x)) and lin._kernel_ok is None  # fp32: reference, no probe


@pytest.mark.parametrize("n,k,m", [(256, 384, 3), (200, 320, 1)])  # exact tiles, and ragged N and K
def test_fp8_block_linear_kernel_path_matches_reference(n, k, m, gen):
    from quantrl.model.linear import Fp8Linear

    lin = Fp8Linear(k, n, True, QuantScheme.fp8_block(), torch.bfloat16, DEV)
    lin.kernel_backend = "triton"
    q, s = fm.quantize_fp8(torch.randn(n, k, generator=gen), "block", (128, 128))
    with torch.no_grad():
        lin.load_({"weight": q.to(DEV), "weight_scale_inv": s.to(DEV)})
        lin.bias.copy_(torch.randn(n, generator=gen).to(torch.bfloat16))
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16).to(DEV)
    with torch.no_grad():
        ref = lin.reference_forward(x)
        y = lin(x)  # probed against the reference, kept, and the answer is the kernel's
        assert lin._fast is True and torch.equal(lin(x), y) and _rel(y, ref) < 3e-3


# ---------------------------------------------------------------------------------------------------------
# Nvfp4Linear: the same kernel protocol (repack + decode table at post-process, probe, in-place refills)
# ---------------------------------------------------------------------------------------------------------
def _nvfp4_layer(n, k, gen):
    from quantrl.model.linear import Nvfp4Linear

    lin = Nvfp4Linear(k, n, True, QuantScheme.nvfp4(), torch.bfloat16, DEV)
    lin.kernel_backend = "triton"
    with torch.no_grad():
        lin.bias.copy_(torch.randn(n, generator=gen).to(torch.bfloat16))
    return lin


def _load_nvfp4(lin, w):
    codes, s, gs = fm.quantize_nvfp4(w)
    lin.restore_weights_before_loading()
    lin.load_({"weight_packed": fm.pack_nvfp4(codes).to(DEV), "weight_scale": s.to(DEV),
               "weight_global_scale": gs.to(DEV)})  # fmt: skip
    lin.post_process_weights()


@pytest.mark.parametrize("m", [1, 5])
def test_nvfp4_kernel_path_matches_reference_and_follows_updates(m, gen):
    n, k = 80, 256
    lin = _nvfp4_layer(n, k, gen)
    _load_nvfp4(lin, torch.randn(n, k, generator=gen))
    q, s, table = lin._kernel_weights
    assert lin._kernel_valid and q.shape == (k // 8, n) and s.shape == (k // 64, n) and table.shape == (2, 256, 4)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16).to(DEV)
    y = lin(x)  # first call: compared with the reference, then answered by the kernel
    assert lin._kernel_ok is True and torch.equal(lin(x), y) and _rel(y, lin.reference_forward(x)) < 3e-3
    addrs = [t.data_ptr() for t in lin._kernel_weights]
    _load_nvfp4(lin, 100 * torch.randn(n, k, generator=gen))  # new numbers, and a new global scale
    assert [t.data_ptr() for t in lin._kernel_weights] == addrs
    y2, ref2 = lin(x), lin.reference_forward(x)
    assert _rel(y2, ref2) < 3e-3 and _rel(y2, y) > 0.1


def test_nvfp4_extreme_global_scales_keep_the_kernel(gen):
    """The decode table holds formats' final weights, so any finite global scale works on the kernel path:
    a tiny one (weights near bf16's top, where a table of scale quotients overflowed) and a huge one (small
    e4m3 scales make subnormal weights)."""
    n, k = 32, 64
    x = torch.randn(3, k, generator=gen).to(torch.bfloat16).to(DEV)
    for gs in (1e-36, 1e36):
        lin = _nvfp4_layer(n, k, gen)
        lin.restore_weights_before_loading()
        lin.load_({"weight_packed": torch.randint(0, 256, (n, k // 2), generator=gen).to(torch.uint8).to(DEV),
                   "weight_scale": torch.randint(1, 0x50, (n, k // 16), generator=gen).to(torch.uint8)
                   .view(torch.float8_e4m3fn).to(DEV),
                   "weight_global_scale": torch.tensor([gs], device=DEV)})  # fmt: skip
        lin.post_process_weights()
        ref = lin.reference_forward(x)
        assert bool(torch.isfinite(ref).all()) and lin._kernel_valid
        y = lin(x)  # the probe, answered by the kernel
        assert lin._kernel_ok is True and torch.equal(lin(x), y) and _rel(y, ref) < 3e-3
