"""Decode attention over the engine's KV cache: one query token per sequence, BF16/FP16 or FP8 keys/values.

Why a kernel. A decode step reads every cached key and value once; that read is the step's attention
cost. SDPA over the cache reads whatever length it is handed: under CUDA graphs that is the whole slot
(static shapes), masked, and an FP8 cache had first to be dequantized into a model-dtype copy (one more
read and a write of twice the bytes). Here each program reads only the positions its row attends to,
and FP8 codes are read as they are stored (one byte per value), so an FP8 cache halves the bytes of BF16.

What it computes (``dispatch.decode_attention``'s reference, the engine's SDPA path): for row b, query
head h, keys j in [lo_b, len_b) with lo_b = max(0, len_b - window) for sliding layers,
    out[b, h] = softmax_j(scale * q[b, h] . K[b, h // G, j]) @ V[b, h // G, :]
where G = query heads per KV head (grouped-query attention) and an FP8 cache holds K / k_scale and
V / v_scale as e4m3 codes. The scales are folded in, not applied per value: scores are
(q . K_codes) * (scale * k_scale) and the output is (p @ V_codes) * v_scale, exact algebra that saves a
multiply per cached value (and differs from dequantize-then-attend only by that copy's bf16 rounding).

Layout and split (flash-decoding). Grid (B, Hkv, S): a program takes one row, one KV head with all its
G query heads (each K/V tile is read once for the group, the point of GQA: G query rows padded to >= 16
make one tensor-core tile), and one of S chunks of the key axis, and runs the online softmax over its
chunk in BLOCK_N-key tiles. With S > 1 it writes fp32 partials (output [B, Hq, S, Dv], log-sum-exp
[B, Hq, S]) and a second kernel merges the chunks; S is chosen so that B * Hkv * S fills the SMs, and
it is a function of the static slot length only, so a CUDA graph captures one grid that serves every
length: chunks past a row's length return at once. S is a runtime argument (only S > 1 is compiled in), so
eager decode, whose key axis grows by one every step, compiles the kernel once, not once per split count.
Shapes: q [B, Hq, D]; k [B, Hkv, L, D], v [B, Hkv, L, Dv] (any strides with a unit last one, the cache's
slot views); lens [B] int (keys [0, len) are real, len >= 1); out [B, Hq, Dv] in q's dtype.
"""

from __future__ import annotations

import torch

from quantrl.formats._checks import cdiv
from quantrl.kernels._numerics import abs_bits, cast_out, native_default, widen
from quantrl.kernels._triton import tl, triton

LOG2E = 1.4426950408889634
BLOCK_N = 64  # keys per tile: a 64 x 128 bf16 K tile is 16 KB, V the same; two stages fit in shared memory
MIN_BLOCK_G = 16  # tl.dot's smallest M: a group of fewer query heads is padded with zero rows
MAX_HEAD_DIM = 256  # a [BLOCK_G, 256] fp32 accumulator is the most the register file takes per program


@triton.jit
def _e4m3_to_f32(b):
    """e4m3fn code (uint8) -> its fp32 value, exact, by integer operations (the interpreter's fp8
    conversions are approximate; the device converts natively). The cache never holds NaN codes."""
    b = b.to(tl.int32)
    e = (b >> 3) & 0xF
    m = b & 0x7
    mag = tl.where(e == 0, m.to(tl.float32) * 0.001953125, ((e + 120) << 23 | m << 20).to(tl.float32, bitcast=True))
    return tl.where((b & 0x80) != 0, mag * -1.0, mag)


@triton.jit
def _operand(x, FP8: tl.constexpr, F16: tl.constexpr, NATIVE: tl.constexpr):
    """A loaded tile as a tl.dot operand: on the device the cache's dtype, fp8 codes widened exactly to
    fp16 (``F16``, bf16/fp16 queries) or fp32; fp32 in the interpreter (which multiplies bf16 dot operands
    as raw bits)."""
    if FP8:
        if NATIVE:
            y = x.to(tl.float8e4nv, bitcast=True).to(tl.float16 if F16 else tl.float32)
        else:
            y = _e4m3_to_f32(x)
    elif NATIVE:
        y = x
    else:
        y = widen(x, NATIVE)
    return y


@triton.jit(do_not_specialize=["S"])  # Triton specializes ints divisible by 16: S = 16, 32 would recompile
def _decode_attn_kernel(
    q_ptr, k_ptr, v_ptr, lens_ptr, ks_ptr, vs_ptr, out_ptr, part_ptr, lse_ptr,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl,
    qk_scale, chunk, window, S,
    G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, DV: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, FP8: tl.constexpr, F16: tl.constexpr,
    PREC: tl.constexpr, NATIVE: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    hk = tl.program_id(1)
    split = tl.program_id(2)
    n_q = tl.num_programs(1) * G  # query heads
    length = tl.load(lens_ptr + b).to(tl.int32)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, length)
    if window > 0:
        lo = tl.maximum(lo, length - window)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    heads = hk * G + g
    g_mask = g < G
    out_scale = 1.0
    if FP8:  # read on the device at every launch: a CUDA graph replays with the scales' current values
        qk_scale = qk_scale * tl.load(ks_ptr)
        out_scale = tl.load(vs_ptr)
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=g_mask[:, None] & (d < D)[None, :], other=0.0)  # fmt: skip
    qd = _operand(q, False, F16, NATIVE)  # [BLOCK_G, BLOCK_D]
    if F16:  # e4m3 widens exactly to fp16 at one instruction a pair (to bf16 it takes more): q
        # joins it there, scaled by a power of two to |q| < 1 (exact; fp16 then holds more of q's bits
        # than bf16 does, and no q can overflow), and the scores are scaled back
        e = tl.minimum(tl.maximum(tl.max(tl.max(abs_bits(widen(q, NATIVE)), axis=1), axis=0) >> 23, 1), 252)
        qd = (widen(q, NATIVE) * ((253 - e) << 23).to(tl.float32, bitcast=True)).to(tl.float16)  # q / 2^(e - 126)
        qk_scale = qk_scale * ((e + 1) << 23).to(tl.float32, bitcast=True)
    m_i = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_DV), tl.float32)
    k_base = k_ptr + b * stride_kb + hk * stride_kh
    v_base = v_ptr + b * stride_vb + hk * stride_vh
    for start in range(lo, hi, BLOCK_N):  # every tile holds >= 1 real key, so m_i is finite after the first
        n = start + tl.arange(0, BLOCK_N)
        n_mask = n < hi
        kt = tl.load(k_base + n[None, :] * stride_kl + d[:, None], mask=(d < D)[:, None] & n_mask[None, :],
                     other=0.0)  # [BLOCK_D, BLOCK_N]: K^T  # fmt: skip
        s = tl.dot(qd, _operand(kt, FP8, F16, NATIVE), input_precision=PREC) * qk_scale  # [BLOCK_G, BLOCK_N]: log2
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        vt = tl.load(v_base + n[:, None] * stride_vl + dv[None, :], mask=n_mask[:, None] & (dv < DV)[None, :],
                     other=0.0)  # [BLOCK_N, BLOCK_DV]  # fmt: skip
        vo = _operand(vt, FP8, F16, NATIVE)
        acc = acc * alpha[:, None] + tl.dot(p.to(vo.dtype), vo, input_precision=PREC)
        m_i = m_new
    out = acc * (out_scale / tl.where(l_i > 0.0, l_i, 1.0))[:, None]
    if not SPLIT:
        tl.store(out_ptr + (b * n_q + heads)[:, None] * DV + dv[None, :], cast_out(out, out_ptr.dtype.element_ty, NATIVE),
                 mask=g_mask[:, None] & (dv < DV)[None, :])  # fmt: skip
    else:  # an empty chunk leaves lse = -inf: weight 0 in the merge
        row = (b * n_q + heads) * S + split
        tl.store(part_ptr + row[:, None] * DV + dv[None, :], out, mask=g_mask[:, None] & (dv < DV)[None, :])
        lse = tl.where(l_i > 0.0, m_i + tl.math.log2(tl.maximum(l_i, 1e-30)), float("-inf"))
        tl.store(lse_ptr + row, lse, mask=g_mask)


@triton.jit(do_not_specialize=["S"])
def _merge_kernel(part_ptr, lse_ptr, out_ptr, S, DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_S: tl.constexpr,
                  NATIVE: tl.constexpr):  # fmt: skip
    """One (row, query head): out = sum_s w_s o_s / sum_s w_s, w_s = 2^(lse_s - max lse)."""
    r = tl.program_id(0)
    s = tl.arange(0, BLOCK_S)
    dv = tl.arange(0, BLOCK_DV)
    lse = tl.load(lse_ptr + r * S + s, mask=s < S, other=float("-inf"))
    w = tl.math.exp2(lse - tl.max(lse, axis=0))  # the chunk holding key len - 1 is never empty: a finite max
    o = tl.load(part_ptr + (r * S + s)[:, None] * DV + dv[None, :], mask=(s < S)[:, None] & (dv < DV)[None, :],
                other=0.0)  # fmt: skip
    out = tl.sum(o * w[:, None], axis=0) / tl.sum(w, axis=0)
    tl.store(out_ptr + r * DV + dv, cast_out(out, out_ptr.dtype.element_ty, NATIVE), mask=dv < DV)


def supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Shapes and dtypes the kernel takes (anything else runs the reference under ``backend="auto"``)."""
    hq, hkv = q.shape[1], k.shape[1]
    return (
        q.dtype in (torch.bfloat16, torch.float16, torch.float32)
        and k.dtype == v.dtype
        and k.dtype in (q.dtype, torch.float8_e4m3fn)
        and hq % hkv == 0
        and max(q.shape[-1], v.shape[-1]) <= MAX_HEAD_DIM
        and k.stride(-1) == 1
        and v.stride(-1) == 1
        and q.stride(-1) == 1
    )


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # the interpreter: an H100's count, so CPU tests see the device's split choices
    return torch.cuda.get_device_properties(device).multi_processor_count


def pick_splits(batch: int, kv_heads: int, max_len: int, sm_count: int) -> int:
    """Chunks of the key axis: enough programs for ~2 waves over the SMs, never a chunk under one tile.
    A function of the static slot length (not the rows' lengths), so a captured grid serves any step."""
    tiles = cdiv(max_len, BLOCK_N)
    return max(1, min(tiles, cdiv(2 * sm_count, batch * kv_heads)))


def decode_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: torch.Tensor, scale: float,
    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None, window: int | None = None,
    splits: int | None = None, native: bool | None = None,
) -> torch.Tensor:  # fmt: skip
    """See the module note. ``k_scale`` / ``v_scale``: an FP8 cache's fp32 dequantization scales (one
    element each, on q's device; read by the kernel, so no host sync and CUDA-graph safe)."""
    bsz, hq, d = q.shape
    hkv, max_len, dv = k.shape[1], k.shape[2], v.shape[-1]
    fp8 = k.dtype == torch.float8_e4m3fn
    out = torch.empty(bsz, hq, dv, dtype=q.dtype, device=q.device)
    if bsz == 0:
        return out
    s = splits or pick_splits(bsz, hkv, max_len, _sm_count(q.device))
    chunk = cdiv(cdiv(max_len, s), BLOCK_N) * BLOCK_N  # chunks of whole tiles
    s = cdiv(max_len, chunk)
    part = torch.empty(bsz * hq * s * dv if s > 1 else 1, dtype=torch.float32, device=q.device)
    lse = torch.empty(bsz * hq * s if s > 1 else 1, dtype=torch.float32, device=q.device)
    if fp8 and (k_scale is None or v_scale is None):
        raise ValueError("decode_attention: an FP8 cache needs k_scale and v_scale")
    ks, vs = (k_scale, v_scale) if fp8 else (lens, lens)  # not read without FP8
    g = hq // hkv
    kc, vc = (k.view(torch.uint8), v.view(torch.uint8)) if fp8 else (k, v)
    native = native_default(native)
    _decode_attn_kernel[(bsz, hkv, s)](
        q, kc, vc, lens, ks, vs, out, part, lse, q.stride(0), q.stride(1), *k.stride()[:3], *v.stride()[:3],
        scale * LOG2E, chunk, window or 0, s,
        G=g, BLOCK_G=max(MIN_BLOCK_G, triton.next_power_of_2(g)), D=d, BLOCK_D=max(16, triton.next_power_of_2(d)),
        DV=dv, BLOCK_DV=max(16, triton.next_power_of_2(dv)), BLOCK_N=BLOCK_N, SPLIT=s > 1, FP8=fp8,
        F16=fp8 and native and q.dtype != torch.float32, PREC="ieee" if q.dtype == torch.float32 else "tf32", NATIVE=native,
        num_warps=4, num_stages=2,
    )  # fmt: skip
    if s > 1:
        _merge_kernel[(bsz * hq,)](part, lse, out, s, DV=dv, BLOCK_DV=max(16, triton.next_power_of_2(dv)),
                                   BLOCK_S=max(2, triton.next_power_of_2(s)), NATIVE=native, num_warps=4)  # fmt: skip
    return out
