"""Property tests (hypothesis) with extreme values: zeros, subnormals, ±448, the largest bf16, outliers."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantrl.formats import (
    dequantize_fp8,
    dequantize_int4,
    fake_quantize_fp8,
    fake_quantize_int4,
    pack_int4,
    quantize_fp8,
    quantize_int4,
    unpack_int4,
)

BF16_MAX = torch.finfo(torch.bfloat16).max
SPECIAL = [0.0, -0.0, 448.0, -448.0, BF16_MAX, -BF16_MAX, 9.2e-41, -9.2e-41, 1e-38, 2.0**-9, 2.0**-6, 1.0]


@st.composite
def weights(draw, k_multiple: int = 1, max_dim: int = 300):
    n = draw(st.integers(1, 40))
    k = draw(st.integers(1, max_dim // k_multiple)) * k_multiple
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    mag = draw(st.sampled_from([1e-30, 1e-3, 1.0, 1e3, 1e30]))
    w = torch.randn(n, k, generator=gen) * mag
    kind = draw(st.sampled_from(["plain", "zeros", "zero_rows", "specials", "outlier"]))
    if kind == "zeros":
        w.zero_()
    elif kind == "zero_rows":
        w[:: draw(st.integers(1, 3))] = 0
    elif kind == "specials":
        idx = torch.randint(0, n * k, (max(1, n * k // 4),), generator=gen)
        vals = torch.tensor(SPECIAL)[torch.randint(0, len(SPECIAL), idx.shape, generator=gen)]
        w.view(-1)[idx] = vals
    elif kind == "outlier":
        w.view(-1)[int(torch.randint(0, n * k, (1,), generator=gen))] = draw(st.sampled_from([1e4, -3e5, BF16_MAX]))
    dtype = draw(st.sampled_from([torch.bfloat16, torch.float32]))
    return w.to(dtype)


@settings(max_examples=150, deadline=None)
@given(w=weights(), strategy=st.sampled_from(["block", "channel", "tensor"]), fmt=st.sampled_from([None, "ue8m0"]),
       block=st.sampled_from([(128, 128), (32, 64), (1, 128)]))
def test_fp8_round_trip_is_finite_and_bit_exact(w, strategy, fmt, block):
    q, s = quantize_fp8(w, strategy, block, fmt)
    assert not torch.isnan(q.float()).any()
    assert bool(torch.isfinite(s).all()) and bool((s > 0).all())
    deq = dequantize_fp8(q, s, block if strategy == "block" else None, torch.float32)
    assert bool(torch.isfinite(deq).all())
    assert torch.equal(fake_quantize_fp8(w, strategy, block, fmt, torch.float32), deq)
    assert torch.equal(fake_quantize_fp8(w, strategy, block, fmt, torch.bfloat16), deq.bfloat16())
    # zeros stay zero, signs never flip
    wf = w.float()
    assert bool((deq[wf == 0] == 0).all())
    assert bool((deq * wf >= 0).all())


@settings(max_examples=150, deadline=None)
@given(w=weights(k_multiple=32), group=st.sampled_from([32, 64, 128]), qmax=st.sampled_from([7, 8]))
def test_int4_round_trip_is_finite_and_bit_exact(w, group, qmax):
    if w.shape[1] % group:
        group = 32
    q, s = quantize_int4(w, group, qmax)
    assert bool(torch.isfinite(s.float()).all()) and bool((s > 0).all())
    assert torch.equal(unpack_int4(pack_int4(q), w.shape[1]), q)
    for dtype in (torch.bfloat16, torch.float32):
        deq = dequantize_int4(q, s, group, dtype)
        assert bool(torch.isfinite(deq).all())
        assert torch.equal(fake_quantize_int4(w, group, qmax, dtype=dtype), deq)
    wf = w.float()
    deq = dequantize_int4(q, s, group, torch.float32)
    assert bool((deq[wf == 0] == 0).all()) and bool((deq * wf >= 0).all())
    # error within half a step, plus what the bf16 rounding of the scale moves the top code (8 * s * 2^-8);
    # groups whose scale hit the cap (values near the largest bf16) are clipped by design
    step = s.float().repeat_interleave(group, dim=1)
    capped = step == BF16_MAX / 8
    err = (deq - wf).abs()
    assert bool(((err <= step * 0.5 + step * 8 * 2**-8) | capped).all())


def test_cache_chunking_does_not_change_any_number(monkeypatch):
    """CPU paths work in cache-sized chunks, GPU paths on whole tensors: both must give the same bits."""
    import quantrl.formats._checks as checks
    from quantrl.formats import dequantize_fp8_activation, quantize_fp8_activation

    w = (torch.randn(700, 1536, generator=torch.Generator().manual_seed(5)) * 3).bfloat16()
    w[::7, 100:300] = 0

    def everything():
        out = []
        for strategy in ("block", "channel", "tensor"):
            q, s = quantize_fp8(w, strategy)
            out += [q.view(torch.uint8), s, dequantize_fp8(q, s, dtype=torch.float32), fake_quantize_fp8(w, strategy)]
        qa, sa = quantize_fp8_activation(w)
        out += [qa.view(torch.uint8), sa, dequantize_fp8_activation(qa, sa)]
        q4, s4 = quantize_int4(w, 128, 8)
        out += [q4, s4, pack_int4(q4), dequantize_int4(q4, s4, 128), fake_quantize_int4(w, 32)]
        return out

    small = everything()  # default chunking: many chunks for these shapes
    monkeypatch.setattr(checks, "CHUNK_ELEMS", 1 << 62)
    whole = everything()
    assert all(torch.equal(a, b) for a, b in zip(small, whole))
