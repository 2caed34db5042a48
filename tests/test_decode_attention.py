"""Decode attention (``kernels.decode_attention``) against an fp64 softmax over the same cached values.

The Triton kernel runs on CUDA or in Triton's CPU interpreter (TRITON_INTERPRET=1, set by conftest when
there is no GPU), outputs poisoned before each run. In the interpreter every product and sum is fp32 and the
output is rounded once, so it must equal the fp64 answer rounded to bf16 up to fp32 summation error; on the
device the probabilities are rounded to bf16 before the P @ V tensor-core product (flash attention's
choice), which the looser device bound allows for. The reference (dequantize + SDPA, the engine's CPU
path) is held to the same fp64 answer.
"""

import pytest
import torch

from quantrl import kernels
from quantrl.formats.fp8 import FP8_DTYPE, dequantize_fp8_static, quantize_fp8_static
from quantrl.kernels.dispatch import decode_attention, decode_attention_reference

triton = pytest.importorskip("triton")
from quantrl.kernels.decode_attention import BLOCK_N, decode_attention_triton, pick_splits, tiles_for

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
pytestmark = [
    pytest.mark.skipif(not (CUDA or kernels.interpreted()), reason="needs CUDA or TRITON_INTERPRET=1"),
    pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning"),  # numpy inside the interpreter
]
NATIVE = [False, True] if CUDA else [False]
# |out - truth| / |truth| (norms): one bf16 rounding is ~1.7e-3 on random data; the device also rounds p
TOL = {False: 2.5e-3, True: 8e-3}


def make_cache(b, hq, hkv, length, d, dtype, gen, fp8=False, pool_slots=None):
    """q [B, Hq, D] and K/V views [B, Hkv, L, D] into a larger pool (strided like the engine's slots),
    with the fp32 values they stand for (dequantized, for the fp64 truth)."""
    slots = pool_slots or b + 2
    q = torch.randn(b, hq, d, generator=gen).to(dtype)
    k = torch.randn(slots, hkv, length + 7, d, generator=gen) * 3
    v = torch.randn(slots, hkv, length + 7, d, generator=gen)
    ks = vs = None
    if fp8:
        ks, vs = torch.tensor(0.02), torch.tensor(0.005)
        k, v = quantize_fp8_static(k, ks), quantize_fp8_static(v, vs)
        kf, vf = dequantize_fp8_static(k, ks, torch.float64), dequantize_fp8_static(v, vs, torch.float64)
        ks, vs = ks.to(DEV), vs.to(DEV)
    else:
        k, v = k.to(dtype), v.to(dtype)
        kf, vf = k.double(), v.double()
    view = (slice(0, b), slice(None), slice(0, length))
    return q.to(DEV), k.to(DEV)[view], v.to(DEV)[view], ks, vs, kf[view], vf[view]


def truth(q, kf, vf, lens, scale, window=None):
    """fp64 softmax attention per row over keys [max(0, len - window), len)."""
    b, hq, _ = q.shape
    g = hq // kf.shape[1]
    out = torch.empty(b, hq, vf.shape[-1], dtype=torch.float64)
    for i in range(b):
        n = int(lens[i])
        lo = 0 if window is None else max(0, n - window)
        k, v = kf[i, :, lo:n].repeat_interleave(g, 0), vf[i, :, lo:n].repeat_interleave(g, 0)  # [Hq, n, D]
        p = torch.softmax(torch.einsum("hd,hnd->hn", q[i].double().cpu(), k) * scale, dim=-1)
        out[i] = torch.einsum("hn,hnd->hd", p, v)
    return out


def rel(a, b):
    return float((a.double().cpu() - b).norm() / b.norm())


CASES = [  # (B, Hq, Hkv, L, D, window, splits)
    (1, 2, 1, 1, 64, None, None),  # one key
    (3, 4, 2, 100, 32, None, None),
    (2, 16, 8, 300, 128, None, None),  # Qwen3-0.6B's heads
    (2, 6, 3, 200, 16, 50, None),  # a sliding layer
    (2, 7, 1, 130, 80, None, 3),  # G = 7 (not a power of two), D = 80 (not a power of two), forced splits
    (4, 8, 8, 257, 64, 64, 1),  # MHA, one split, a window of exactly one tile
]


@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("native", NATIVE)
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_the_fp64_softmax(case, fp8, native, gen):
    b, hq, hkv, length, d, window, splits = case
    q, k, v, ks, vs, kf, vf = make_cache(b, hq, hkv, length, d, torch.bfloat16, gen, fp8)
    lens = torch.randint(1, length + 1, (b,), generator=gen)
    lens[0] = length
    want = truth(q, kf, vf, lens, d**-0.5, window)
    out = decode_attention_triton(q, k, v, lens.to(DEV), d**-0.5, ks, vs, window, splits=splits, native=native)
    assert out.shape == (b, hq, d) and out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    assert rel(out, want) <= TOL[native]
    # the engine's CPU path, held to the same answer
    assert rel(decode_attention_reference(q, k, v, lens.to(DEV), d**-0.5, ks, vs, window), want) <= 5e-3


@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("q_scale", [3e4, 1.0, 1e-4])
def test_fp8_cache_attends_in_fp16_with_the_query_brought_into_range(q_scale, gen):
    """The device path of an FP8 cache multiplies in fp16 (e4m3 widens to it exactly); q goes in divided by
    a power of two above its max-abs, so a bf16 q beyond fp16's 65504 cannot overflow and a tiny one keeps
    its bits. fp16 dots and e4m3 -> fp16 are exact in the interpreter too, so this runs everywhere."""
    q, k, v, ks, vs, kf, vf = make_cache(2, 16, 8, 300, 128, torch.bfloat16, gen, fp8=True)
    q = (q.float() * q_scale).bfloat16()
    lens = torch.tensor([300, 77])
    scale = 128**-0.5 / q_scale
    out = decode_attention_triton(q, k, v, lens.to(DEV), scale, ks, vs, splits=3, native=True)
    assert torch.isfinite(out).all()
    assert rel(out, truth(q, kf, vf, lens, scale)) <= TOL[True]


@pytest.mark.usefixtures("poisoned_empty")
def test_split_count_does_not_change_the_answer(gen):
    """Merging chunks is exact algebra: 1 split and many agree to fp32 summation error (before the
    single bf16 rounding, compared here in fp16 output to see more bits)."""
    q, k, v, _, _, _, _ = make_cache(2, 8, 2, 600, 64, torch.float16, gen)
    lens = torch.tensor([600, 65]).to(DEV)
    one = decode_attention_triton(q, k, v, lens, 0.125, splits=1)
    for s in (2, 5, 10):
        many = decode_attention_triton(q, k, v, lens, 0.125, splits=s)
        assert (many.float() - one.float()).abs().max() <= 2e-3 * one.float().abs().max()


def test_keys_past_a_rows_length_are_never_read(gen):
    """NaN after each row's length (what an unwritten slot position could hold) must not reach the output."""
    q, k, v, _, _, _, _ = make_cache(2, 4, 2, 200, 32, torch.bfloat16, gen)
    lens = torch.tensor([130, 7])
    k[0, :, 130:] = float("nan")
    v[1, :, 7:] = float("nan")
    out = decode_attention_triton(q, k, v, lens.to(DEV), 32**-0.5)
    assert torch.isfinite(out).all()


def test_pick_splits_fills_the_machine_and_never_splits_below_a_tile():
    assert pick_splits(8, 4096, 132) == 33  # 2 waves of 132 SMs over 8 programs per split
    assert pick_splits(256 * 8, 4096, 132) == 1
    assert pick_splits(1, 100, 132) == 2  # 100 keys: two 64-key tiles at most
    assert pick_splits(1, 100, 132, block_n=32) == 4
    assert pick_splits(1, 1, 132) == 1
    assert BLOCK_N == 64
    assert tiles_for(2, 128, 128) == (16, 64)  # Qwen3: a 2-head group padded to 16 rows
    assert tiles_for(16, 512, 512) == (16, 32)  # latent attention: 16 heads a program, 32 latents a tile
    assert tiles_for(64, 128, 128) == (64, 64)


@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("native", [False, True])
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize(("heads", "rank", "rot", "length"), [(4, 64, 16, 90), (20, 128, 32, 150), (16, 512, 64, 40)])
def test_latent_attention_reads_each_latent_tile_once_for_keys_and_values(heads, rank, rot, length, fp8, native, gen):
    """DeepSeek's absorbed decode: one shared KV head whose keys are [latent, k_rot] and whose values are
    the latent itself (v is k); 20 heads take two head blocks; FP8 latent and roped key with their own scales.
    The device's fp16 path of an FP8 cache runs in the interpreter too (its bf16 dots do not)."""
    if native and not (CUDA or fp8):
        pytest.skip("the interpreter multiplies bf16 dot operands as raw bits")
    b = 3
    q = torch.randn(b, heads, rank + rot, generator=gen).bfloat16()
    lat = torch.randn(b + 1, 1, length + 5, rank, generator=gen)
    rope = torch.randn(b + 1, 1, length + 5, rot, generator=gen) * 2
    if fp8:
        ls, rs = torch.tensor(0.01), torch.tensor(0.03)
        lat, rope = quantize_fp8_static(lat, ls), quantize_fp8_static(rope, rs)
        lf, rf = dequantize_fp8_static(lat, ls, torch.float64), dequantize_fp8_static(rope, rs, torch.float64)
        ls, rs = ls.to(DEV), rs.to(DEV)
    else:
        lat, rope, ls, rs = lat.bfloat16(), rope.bfloat16(), None, None
        lf, rf = lat.double(), rope.double()
    view = (slice(0, b), slice(None), slice(0, length))
    lat_d, rope_d = lat.to(DEV)[view], rope.to(DEV)[view]
    lens = torch.tensor([length, 1, 33])
    scale = (rank + rot) ** -0.5
    want = truth(q, torch.cat([lf, rf], -1)[view], lf[view], lens, scale)
    out = decode_attention_triton(q.to(DEV), lat_d, lat_d, lens.to(DEV), scale, ls, ls, k_rope=rope_d,
                                  rope_scale=rs, native=native)  # fmt: skip
    assert out.shape == (b, heads, rank) and rel(out, want) <= TOL[native]
    ref = decode_attention(q.to(DEV), lat_d, lat_d, lens.to(DEV), scale=scale, k_scale=ls, v_scale=ls, k_rope=rope_d,
                           rope_scale=rs, backend="reference")  # fmt: skip
    assert rel(ref, want) <= 5e-3


def test_dispatch_reference_on_cpu_and_argument_errors(gen):
    q, k, v, ks, vs, kf, vf = make_cache(2, 4, 2, 50, 32, torch.bfloat16, gen, fp8=True)
    lens = torch.tensor([50, 3]).to(DEV)
    want = truth(q, kf, vf, lens.cpu(), 0.2)
    assert rel(decode_attention(q, k, v, lens, scale=0.2, k_scale=ks, v_scale=vs, backend="reference"), want) < 5e-3
    assert rel(decode_attention(q, k, v, lens, scale=0.2, k_scale=ks, v_scale=vs, backend="triton"), want) < 5e-3
    with pytest.raises(ValueError, match="do not group"):
        decode_attention(q[:, :3], k, v, lens, scale=0.2, k_scale=ks, v_scale=vs)
    with pytest.raises(ValueError, match=r"expected q \[B, Hq, D\]"):
        decode_attention(q, k, v, lens[:1], scale=0.2, k_scale=ks, v_scale=vs)
    with pytest.raises(ValueError, match="needs k_scale and v_scale"):
        decode_attention(q, k, v, lens, scale=0.2, backend="triton")
    assert k.dtype == FP8_DTYPE


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("case", [CASES[2], CASES[3], CASES[4]])
def test_device_conversions_match_the_fp64_softmax(case, fp8, gen):
    """The GPU session's pick of the interpreter cases, on the device's native paths (bf16 / fp16 tensor
    cores, e4m3 -> fp16 conversions): Qwen3's heads, a sliding window, G = 7 with D = 80 and forced splits."""
    test_kernel_matches_the_fp64_softmax(case, fp8, True, gen)


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True])
def test_kernel_under_a_cuda_graph_follows_lengths_and_scales(fp8, gen):
    """One captured launch serves every step: new lengths and new scale values are read at replay."""
    q, k, v, ks, vs, kf, vf = make_cache(4, 16, 8, 512, 128, torch.bfloat16, gen, fp8)
    lens = torch.tensor([512, 1, 100, 300], device=DEV)
    decode_attention_triton(q, k, v, lens, 128**-0.5, ks, vs)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention_triton(q, k, v, lens, 128**-0.5, ks, vs)
    for new in ([5, 512, 64, 65], [200, 2, 511, 1]):
        lens.copy_(torch.tensor(new))
        if fp8:
            ks.mul_(2.0)
            kf = kf * 2.0
        graph.replay()
        assert rel(out, truth(q, kf, vf, lens.cpu(), 128**-0.5)) <= TOL[True]


@pytest.mark.gpu
def test_auto_dispatch_keeps_the_kernel_after_its_check(gen):
    from quantrl.kernels import dispatch

    q, k, v, _, _, kf, vf = make_cache(8, 16, 8, 1000, 128, torch.bfloat16, gen)
    lens = torch.randint(1, 1001, (8,), generator=gen).to(DEV)
    dispatch._ATTN_OK.clear()
    out = decode_attention(q, k, v, lens, scale=128**-0.5)
    assert list(dispatch._ATTN_OK.values()) == [True]
    assert rel(out, truth(q, kf, vf, lens.cpu(), 128**-0.5)) <= TOL[True]


@pytest.mark.gpu
def test_a_growing_key_axis_compiles_the_kernel_once_per_split_mode(gen):
    """Eager decode hands the kernel one more key every step; the split count changes with it, which must
    not recompile (S is a runtime argument): at most two specializations, split or not."""
    from quantrl.kernels.decode_attention import _decode_attn_kernel

    q, k, v, _, _, _, _ = make_cache(1, 16, 8, 1200, 128, torch.bfloat16, gen)
    before = sum(len(c[0]) for c in _decode_attn_kernel.device_caches.values())
    for n in range(64, 1200, 97):  # 1 .. 19 key tiles: split counts 1 .. 19
        decode_attention_triton(q, k[:, :, :n], v[:, :, :n], torch.full((1,), n, device=DEV), 0.1)
    after = sum(len(c[0]) for c in _decode_attn_kernel.device_caches.values())
    assert after - before <= 2


@pytest.mark.parametrize(("arch", "kv_dtype"), [("qwen3", "auto"), ("qwen3", "fp8_e4m3"), ("mistral", "auto"),
                                               ("deepseek", "auto"), ("deepseek", "fp8_e4m3")])  # fmt: skip
def test_the_engine_decodes_through_the_kernel(tmp_path, monkeypatch, arch, kv_dtype):
    """The engine with the kernel forced (interpreted here) returns the logprobs of a full forward, fp32,
    to summation order: GQA (Qwen3), a 5-token sliding window that decode outruns (Mistral), DeepSeek's
    absorbed latent decode, and FP8 caches against a forward that rounds K and V (latent and roped key)
    alike. Every decode layer call went through the kernel."""
    from _tiny_models import (
        deepseek_v3_config,
        full_forward_logprobs,
        mistral_config,
        qwen3_config,
        random_prompts,
        save_model,
    )

    from quantrl.kernels import decode_attention as da
    from quantrl.model import load_model
    from quantrl.model.decoder import KVContext
    from quantrl.rollout import Engine, SamplingParams

    config = {"qwen3": qwen3_config, "mistral": mistral_config, "deepseek": deepseek_v3_config}[arch]()
    model = load_model(save_model(config, tmp_path / arch), dtype=torch.float32, device=DEV)
    calls = []
    real = da.decode_attention_triton
    monkeypatch.setattr(da, "decode_attention_triton", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setattr(KVContext, "attention_backend", "triton")
    prompts = random_prompts([5, 12, 3], seed=2)
    params = SamplingParams(n=2, temperature=0.8, max_new_tokens=9, seed=0)
    results = Engine(model, kv_cache_tokens=64, kv_cache_dtype=kv_dtype).generate(prompts, params)
    decode_tokens = sum(len(r.tokens) - 1 for r in results)
    assert len(calls) >= model.config.num_layers * (params.max_new_tokens - 1) and decode_tokens > 0
    model.set_kv_fake_quant(kv_dtype == "fp8_e4m3")
    gap = max(float((torch.tensor(r.logprobs) - full_forward_logprobs(model, prompts[r.prompt_index], r.tokens,
                                                                      0.8)).abs().max()) for r in results)  # fmt: skip
    assert gap <= 1e-5


def test_auto_dispatch_checks_the_kernel_once_and_drops_a_wrong_one(monkeypatch, gen):
    """The CUDA-only "auto" logic, driven on CPU (the interpreter's kernel standing in): a kernel that agrees
    with the reference is kept after one check; one that disagrees is warned about once and never used
    again for that configuration, and its first answer is the reference's."""
    from quantrl.kernels import decode_attention as da
    from quantrl.kernels import dispatch

    q, k, v, _, _, _, _ = make_cache(2, 4, 2, 70, 32, torch.bfloat16, gen)
    lens = torch.tensor([70, 9])
    monkeypatch.setattr(dispatch, "use_triton", lambda *a, **kw: True)
    monkeypatch.setattr(dispatch, "_ATTN_OK", {})
    calls = []
    real = da.decode_attention_triton
    monkeypatch.setattr(da, "decode_attention_triton", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    ref = decode_attention_reference(q, k, v, lens, 0.2)
    out = decode_attention(q, k, v, lens, scale=0.2)
    assert list(dispatch._ATTN_OK.values()) == [True] and len(calls) == 1
    assert float((out.float() - ref.float()).norm() / ref.float().norm()) < 5e-3
    decode_attention(q, k, v, lens, scale=0.2)
    assert len(calls) == 2  # kept: no second check, the kernel alone

    dispatch._ATTN_OK.clear()
    monkeypatch.setattr(da, "decode_attention_triton", lambda *a, **kw: real(*a, **kw) * 2)
    with pytest.warns(UserWarning, match="decode attention kernel disabled"):
        out = decode_attention(q, k, v, lens, scale=0.2)
    assert torch.equal(out, ref) and list(dispatch._ATTN_OK.values()) == [False]
    assert torch.equal(decode_attention(q, k, v, lens, scale=0.2), ref)  # the reference from now on
