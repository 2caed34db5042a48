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
MAX_HEAD_DIM = 512  # latent attention's kv_lora_rank; the widest value row (acc [16, 512] fp32)


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


@triton.jit
def _scores(qd, kt, qk_scale, FP8: tl.constexpr, F16: tl.constexpr, PREC: tl.constexpr, NATIVE: tl.constexpr):
    """[BLOCK_G, BLOCK_N] = (q . K_j) * qk_scale for a key tile kt [BLOCK_N, BLOCK_D]."""
    return tl.dot(qd, tl.trans(_operand(kt, FP8, F16, NATIVE)), input_precision=PREC) * qk_scale


@triton.jit(do_not_specialize=["S"])  # Triton specializes ints divisible by 16: S = 16, 32 would recompile
def _decode_attn_kernel(
    q_ptr, k_ptr, v_ptr, r_ptr, lens_ptr, ks_ptr, vs_ptr, rs_ptr, out_ptr, part_ptr, lse_ptr,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl,
    stride_rb, stride_rh, stride_rl, qk_scale, chunk, window, S,
    G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, DV: tl.constexpr,
    BLOCK_DV: tl.constexpr, DR: tl.constexpr, BLOCK_DR: tl.constexpr, V_IS_K: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, FP8: tl.constexpr, F16: tl.constexpr, PREC: tl.constexpr,
    NATIVE: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    n_blocks: tl.constexpr = (G + BLOCK_G - 1) // BLOCK_G  # query-head blocks per KV head
    hk = tl.program_id(1) // n_blocks
    g0 = (tl.program_id(1) % n_blocks) * BLOCK_G
    split = tl.program_id(2)
    n_q = (tl.num_programs(1) // n_blocks) * G  # query heads
    length = tl.load(lens_ptr + b).to(tl.int32)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, length)
    if window > 0:
        lo = tl.maximum(lo, length - window)
    g = g0 + tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    heads = hk * G + g
    g_mask = g < G
    k_scale = qk_scale
    r_scale = qk_scale
    out_scale = 1.0
    if FP8:  # read on the device at every launch: a CUDA graph replays with the scales' current values
        k_scale = qk_scale * tl.load(ks_ptr)
        r_scale = qk_scale * tl.load(rs_ptr)
        out_scale = tl.load(vs_ptr)
    q_row = q_ptr + b * stride_qb + heads[:, None] * stride_qh
    q = tl.load(q_row + d[None, :], mask=g_mask[:, None] & (d < D)[None, :], other=0.0)  # [BLOCK_G, BLOCK_D]
    qd = _operand(q, False, F16, NATIVE)
    if DR > 0:  # latent attention: each key also has DR roped dimensions, stored apart (q holds them after D)
        dr = tl.arange(0, BLOCK_DR)
        qr = tl.load(q_row + D + dr[None, :], mask=g_mask[:, None] & (dr < DR)[None, :], other=0.0)
        qrd = _operand(qr, False, F16, NATIVE)
    if F16:  # e4m3 widens exactly to fp16 at one instruction a pair (to bf16 it takes more): q joins it
        # there, divided by a power of two above its max-abs (exact; fp16 then holds more of q's bits than
        # bf16 does, and no q can overflow), and the scores are scaled back
        qmax = tl.max(tl.max(abs_bits(widen(q, NATIVE)), axis=1), axis=0)
        if DR > 0:
            qmax = tl.maximum(qmax, tl.max(tl.max(abs_bits(widen(qr, NATIVE)), axis=1), axis=0))
        e = tl.minimum(tl.maximum(qmax >> 23, 1), 252)
        inv = ((253 - e) << 23).to(tl.float32, bitcast=True)  # 1 / 2^(e - 126)
        qd = (widen(q, NATIVE) * inv).to(tl.float16)
        if DR > 0:
            qrd = (widen(qr, NATIVE) * inv).to(tl.float16)
        k_scale = k_scale * ((e + 1) << 23).to(tl.float32, bitcast=True)
        r_scale = r_scale * ((e + 1) << 23).to(tl.float32, bitcast=True)
    m_i = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_DV), tl.float32)
    k_base = k_ptr + b * stride_kb + hk * stride_kh
    v_base = v_ptr + b * stride_vb + hk * stride_vh
    for start in range(lo, hi, BLOCK_N):  # every tile holds >= 1 real key, so m_i is finite after the first
        n = start + tl.arange(0, BLOCK_N)
        n_mask = n < hi
        kt = tl.load(k_base + n[:, None] * stride_kl + d[None, :], mask=n_mask[:, None] & (d < D)[None, :],
                     other=0.0)  # [BLOCK_N, BLOCK_D]  # fmt: skip
        s = _scores(qd, kt, k_scale, FP8, F16, PREC, NATIVE)  # [BLOCK_G, BLOCK_N], log2 units
        if DR > 0:
            rt = tl.load(r_ptr + b * stride_rb + hk * stride_rh + n[:, None] * stride_rl + dr[None, :],
                         mask=n_mask[:, None] & (dr < DR)[None, :], other=0.0)  # fmt: skip
            s += _scores(qrd, rt, r_scale, FP8, F16, PREC, NATIVE)
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if V_IS_K:  # latent attention's values are its keys' first DV dims: the tile already loaded
            vo = _operand(kt, FP8, F16, NATIVE)
        else:
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


def supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_rope: torch.Tensor | None = None) -> bool:
    """Shapes and dtypes the kernel takes (anything else runs the reference under ``backend="auto"``)."""
    hq, hkv = q.shape[1], k.shape[1]
    d = k.shape[-1] + (0 if k_rope is None else k_rope.shape[-1])
    return (
        q.dtype in (torch.bfloat16, torch.float16, torch.float32)
        and k.dtype == v.dtype
        and k.dtype in (q.dtype, torch.float8_e4m3fn)
        and (k_rope is None or (k_rope.dtype == k.dtype and k_rope.stride(-1) == 1 and (v is k or v.shape[-1] > 0)))
        and hq % hkv == 0
        and q.shape[-1] == d
        and max(k.shape[-1], v.shape[-1]) <= MAX_HEAD_DIM
        and (k_rope is None or k_rope.shape[-1] <= 128)
        and k.stride(-1) == 1
        and v.stride(-1) == 1
        and q.stride(-1) == 1
    )


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # the interpreter: an H100's count, so CPU tests see the device's split choices
    return torch.cuda.get_device_properties(device).multi_processor_count


def tiles_for(g: int, d: int, dv: int) -> tuple[int, int]:
    """(BLOCK_G, BLOCK_N): query heads per program (<= 8192 fp32 accumulators over 128 threads) and keys
    per tile (a K tile of <= 16K elements: 64 keys at head dim 128, 32 at latent attention's 512)."""
    block_dv = max(16, triton.next_power_of_2(dv))
    block_g = max(MIN_BLOCK_G, min(triton.next_power_of_2(g), 8192 // block_dv))
    return block_g, max(16, min(BLOCK_N, 16384 // max(16, triton.next_power_of_2(d))))


def pick_splits(programs: int, max_len: int, sm_count: int, block_n: int = BLOCK_N) -> int:
    """Chunks of the key axis for ``programs`` (row, head-block) pairs: enough for ~2 waves over the SMs,
    never a chunk under one tile. A function of the static slot length (not the rows' lengths), so a
    captured grid serves any step."""
    return max(1, min(cdiv(max_len, block_n), cdiv(2 * sm_count, programs)))


def decode_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: torch.Tensor, scale: float,
    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None, window: int | None = None,
    k_rope: torch.Tensor | None = None, rope_scale: torch.Tensor | None = None,
    splits: int | None = None, native: bool | None = None,
) -> torch.Tensor:  # fmt: skip
    """See the module note. ``k_scale`` / ``v_scale``: an FP8 cache's fp32 dequantization scales (one
    element each, on q's device; read by the kernel, so no host sync and CUDA-graph safe). Latent
    attention: ``k_rope`` [B, Hkv, L, Dr] holds the keys' last Dr dims (q [B, Hq, D + Dr]; its scale
    ``rope_scale``), and ``v`` may be ``k`` itself (values = the latent keys: each tile is read once)."""
    bsz, hq, _ = q.shape
    hkv, max_len, d, dv = k.shape[1], k.shape[2], k.shape[-1], v.shape[-1]
    dr = 0 if k_rope is None else k_rope.shape[-1]
    fp8 = k.dtype == torch.float8_e4m3fn
    out = torch.empty(bsz, hq, dv, dtype=q.dtype, device=q.device)
    if bsz == 0:
        return out
    if fp8 and (k_scale is None or v_scale is None or (k_rope is not None and rope_scale is None)):
        raise ValueError("decode_attention: an FP8 cache needs k_scale and v_scale (and rope_scale with k_rope)")
    g = hq // hkv
    block_g, block_n = tiles_for(g, d, dv)
    programs = bsz * hkv * cdiv(g, block_g)
    s = splits or pick_splits(programs, max_len, _sm_count(q.device), block_n)
    chunk = cdiv(cdiv(max_len, s), block_n) * block_n  # chunks of whole tiles
    s = cdiv(max_len, chunk)
    part = torch.empty(bsz * hq * s * dv if s > 1 else 1, dtype=torch.float32, device=q.device)
    lse = torch.empty(bsz * hq * s if s > 1 else 1, dtype=torch.float32, device=q.device)
    ks, vs, rs = (k_scale, v_scale, rope_scale if k_rope is not None else k_scale) if fp8 else (lens,) * 3
    codes = (lambda t: t.view(torch.uint8)) if fp8 else (lambda t: t)
    r = k if k_rope is None else k_rope
    native = native_default(native)
    block_dv = max(16, triton.next_power_of_2(dv))
    _decode_attn_kernel[(bsz, programs // bsz, s)](
        q, codes(k), codes(v), codes(r), lens, ks, vs, rs, out, part, lse, q.stride(0), q.stride(1),
        *k.stride()[:3], *v.stride()[:3], *r.stride()[:3], scale * LOG2E, chunk, window or 0, s,
        G=g, BLOCK_G=block_g, D=d, BLOCK_D=max(16, triton.next_power_of_2(d)), DV=dv, BLOCK_DV=block_dv,
        DR=dr, BLOCK_DR=max(16, triton.next_power_of_2(dr)), V_IS_K=v is k, BLOCK_N=block_n, SPLIT=s > 1,
        FP8=fp8, F16=fp8 and native and q.dtype != torch.float32,
        PREC="ieee" if q.dtype == torch.float32 else "tf32", NATIVE=native, num_stages=2,
        num_warps=8 if max(d, dv) > 128 else 4,  # wide rows: 4 warps ran out of registers (fp8 latent spilled)
    )  # fmt: skip
    if s > 1:
        _merge_kernel[(bsz * hq,)](part, lse, out, s, DV=dv, BLOCK_DV=block_dv,
                                   BLOCK_S=max(2, triton.next_power_of_2(s)), NATIVE=native, num_warps=4)  # fmt: skip
    return out
