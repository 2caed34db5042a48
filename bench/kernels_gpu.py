"""quantrl.kernels on one GPU: W4A16 GEMM, FP8 block linear and the quantization kernels, against
baselines timed in the same process.

Correctness first: every kernel is compared with the ``formats`` reference (quantizers bit for bit; GEMMs
against an fp64 product of the exact dequantized operands: relative error < 3e-3 and within two output
ulps plus the fp32 summation-order term), and the script exits 1 before timing anything if one fails.
Baselines are checked too (a failing baseline is timed but marked, never used for a target).

Figures. Each time is the median over ``--reps`` CUDA-graph replays (events) of one call per weight copy:
every method cycles through enough copies of its weight to exceed the 50 MB L2 (so decode reads DRAM, as
it does in a real model), divided by the number of copies. Beside every time: bytes moved (each input
read once, each output written once) / time as % of the copy bandwidth measured on this device (a 1 GiB
``copy_``, ``_common.roofline``) and of the H100's 3.0 TB/s, and 2MNK / time as % of the H100's 800 TFLOP/s
(bf16) or 1260 TFLOP/s (fp8). Ratios are baseline time / our time. The bandwidth target is evaluated
against the measured copy bandwidth.

  W4A16   ours (``w4a16_linear``, group 128, path by M) vs ``F.linear`` bf16 (cuBLAS) and
          ``torch.ops.aten._weight_int4pack_mm`` (tinygemm; same codes and scales, zero points 0)
  NVFP4   ``nvfp4_linear`` (NVFP4A16: the W4A16 kernels with an e2m1 decode, e4m3 scales per 16) vs the
          same ``F.linear`` and our W4A16 at the same M
  FP8     ``fp8_block_linear`` (Triton 1x128 activation quantization included) through
          ``torch._scaled_mm`` blockwise and through the Triton block GEMM, vs ``F.linear`` bf16
  quant   8192 x 8192 bf16 (128 MB) through each quantizer vs the ``formats`` reference on the GPU and a
          plain ``copy_`` (the measured copy bandwidth)

Shapes (N x K): 4096x4096, 14336x4096, 4096x14336, 8192x8192 and the linears of the ~0.5B Qwen3-shaped
model of ``rollout_gpu.py``. M: 1..256 (+1024, 4096 for FP8).

Targets (issue 5): W4A16 at M=1 >= 3.0x BF16 on the three largest shapes; >= 1.5x _weight_int4pack_mm at
M=1..16; never slower than BF16 at M=32..256; FP8 block linear >= 1.4x BF16 at M>=4096 on 8192x8192;
quantize / pack / fake-quant kernels >= 80% of the (measured) copy bandwidth.

Run on the GPU machine: ``python bench/kernels_gpu.py`` (~3-5 minutes; writes bench/results/kernels_gpu.json).
Without a GPU: ``--dry-run`` prints the plan (bytes, FLOPs, H100 roofline floors); ``--smoke`` (or ``--tiny``,
which also runs on a GPU) runs the checks, the timing, the tables and the target code on tiny shapes
through Triton's CPU interpreter and writes nothing.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import zlib
from dataclasses import dataclass

import torch
from _common import (
    H100_COPY_BW,
    H100_PEAK_BF16,
    H100_PEAK_FP8,
    Timer,
    copies_for,
    describe_roofline,
    error_line,
    roofline,
    write_results,
)
from rollout_gpu import QWEN3_06B

W4A16_MS = [1, 2, 4, 8, 16, 32, 64, 128, 256]
FP8_MS = W4A16_MS + [1024, 4096]
GROUP = 128
QUANT_SHAPE = (8192, 8192)


def _model_shapes(cfg: dict) -> dict[str, tuple[int, int]]:
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    return {"0.6b.q_proj": (q, h), "0.6b.k_v_proj": (kv, h), "0.6b.o_proj": (h, q), "0.6b.gate_up": (inter, h),
            "0.6b.down_proj": (h, inter)}  # fmt: skip


SHAPES = {"4096x4096": (4096, 4096), "14336x4096": (14336, 4096), "4096x14336": (4096, 14336),
          "8192x8192": (8192, 8192), **_model_shapes(QWEN3_06B)}  # fmt: skip
LARGEST = ("14336x4096", "4096x14336", "8192x8192")
TINY_SHAPES = {"tiny.256x384": (256, 384), "tiny.200x256": (200, 256)}


@dataclass(frozen=True)
class TargetSpec:
    """Which rows the issue's targets read. ``--smoke`` points them at the tiny shapes, so every branch of
    ``evaluate_targets`` runs on CPU (its verdicts are then meaningless and printed as such)."""

    largest: tuple[str, ...] = LARGEST
    fp8_shape: str = "8192x8192"
    fp8_min_m: int = 4096
    mid_ms: tuple[int, int] = (32, 256)


SMOKE_TARGETS = TargetSpec(largest=tuple(TINY_SHAPES), fp8_shape="tiny.256x384", fp8_min_m=20, mid_ms=(17, 256))


# ---------------------------------------------------------------------------------------------------------
# bookkeeping: bytes, FLOPs, roofline
# ---------------------------------------------------------------------------------------------------------
def w4a16_bytes(m: int, n: int, k: int, g: int = GROUP) -> int:
    return m * k * 2 + n * k // 2 + (n * k // g) * 2 + m * n * 2


def nvfp4_bytes(m: int, n: int, k: int) -> int:
    return m * k * 2 + n * k // 2 + n * k // 16 + 2 * 256 * 16 + m * n * 2  # e4m3 scale per 16, the 8 KB decode table


def bf16_bytes(m: int, n: int, k: int) -> int:
    return m * k * 2 + n * k * 2 + m * n * 2


def int4pack_bytes(m: int, n: int, k: int, g: int = GROUP) -> int:
    return m * k * 2 + n * k // 2 + (n * k // g) * 4 + m * n * 2  # scales and zeros: 2 bf16 per group


def fp8_linear_bytes(m: int, n: int, k: int) -> int:
    """x read once (bf16), weight fp8 + block scales, output bf16 (the fp8 activations round-trip ignored)."""
    return m * k * 2 + n * k + math.ceil(n / 128) * math.ceil(k / 128) * 4 + m * n * 2


def floor_us(nbytes: int, flops: int, peak: float) -> float:
    """The plan's floor on an H100 (the device is not known before it runs)."""
    return 1e6 * max(nbytes / H100_COPY_BW, flops / peak)


def pct_bw(nbytes: int, t: float | None, bw: float) -> float | None:
    return None if not t else nbytes / t / bw


def pct_flops(flops: int, t: float | None, peak: float) -> float | None:
    return None if not t else flops / t / peak


# ---------------------------------------------------------------------------------------------------------
# correctness helpers
# ---------------------------------------------------------------------------------------------------------
def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    y, ref = y.double(), ref.to(y.device).double()
    return float((y - ref).norm() / ref.norm())


# Hopper's FP8 tensor cores accumulate with ~14 significant bits inside each MMA (DeepSeek-V3 report, sec.
# 3.3.2), so an FP8 GEMM's sum carries ~2^-13 |x||w| where BF16 MMAs (fp32 accumulation) carry ~2^-20
FP8_ACC_BITS = 13


def gemm_ok(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias=None, ulps: float = 2.0,
            acc_bits: int = 20) -> tuple[bool, float]:  # fmt: skip
    """(passes, relative error) against an fp64 x @ w.T (+ bias) on y's device (see the module note)."""
    mant = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}[y.dtype]
    xd, wd = x.to(y.device, torch.float64), w.to(y.device, torch.float64)
    ref = xd @ wd.T + (0 if bias is None else bias.to(y.device, torch.float64))
    allow = torch.exp2(torch.floor(torch.log2(ref.abs().clamp_min(2.0**-100))) - mant) + 2.0**-acc_bits * (
        xd.abs() @ wd.abs().T
    )
    err = ((y.double() - ref).abs() / allow).nan_to_num(nan=float("inf"))
    rel = rel_error(y, ref)
    return bool(err.max() <= ulps and rel < 3e-3), rel


def bitwise(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def rand(shape, dtype, device, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator(device).manual_seed(seed)
    return (torch.randn(shape, generator=g, device=device) * scale).to(dtype)


# ---------------------------------------------------------------------------------------------------------
# weights in every format
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Weights:
    n: int
    k: int
    bf16: torch.Tensor  # [N, K], the quantized weight dequantized (so every method multiplies the same numbers)
    qt: torch.Tensor  # int32 [K/8, N]
    st: torch.Tensor  # bf16 [K/G, N]
    w_deq: torch.Tensor  # bf16 [N, K]: formats.dequantize_int4
    fp8_q: torch.Tensor
    fp8_s: torch.Tensor
    fp8_deq: torch.Tensor  # fp32
    nv: tuple  # NVFP4 kernel layout: (qweight_t int32 [K/8, N], scale_t uint8 [K/16, N], table int32 [2, 256, 4], gs)
    nv_deq: torch.Tensor  # bf16 [N, K]: formats.dequantize_nvfp4


def make_weights(n: int, k: int, device, seed: int) -> Weights:
    from quantrl import formats as fm
    from quantrl import kernels

    w = rand((n, k), torch.bfloat16, device, seed, 1 / math.sqrt(k))
    q, s = fm.quantize_int4(w, GROUP, 7)
    qt, st = kernels.w4a16_repack(fm.pack_int4(q), s)
    w_deq = fm.dequantize_int4(q, s, GROUP, torch.bfloat16)
    fq, fs = fm.quantize_fp8(w, "block")
    codes, ns, gs = fm.quantize_nvfp4(w)
    nq, nst = kernels.nvfp4_repack(fm.pack_nvfp4(codes), ns)
    nv = (nq, nst, kernels.nvfp4_decode_table(gs), gs)
    return Weights(n, k, w_deq, qt, st, w_deq, fq, fs, fm.dequantize_fp8(fq, fs, dtype=torch.float32), nv,
                   fm.dequantize_nvfp4(codes, ns, gs, torch.bfloat16))


def int4pack_weight(wt: Weights):
    """tinygemm operands for the same codes: (packed, scales_and_zeros) or None if this torch lacks it."""
    if wt.qt.device.type != "cuda" or not hasattr(torch.ops.aten, "_weight_int4pack_mm"):
        return None
    from quantrl import formats as fm
    from quantrl import kernels

    packed, scale = kernels.w4a16_unrepack(wt.qt, wt.st)
    u = fm.unpack_int4(packed, wt.k).to(torch.int32) + 8  # [N, K] in 0..15
    try:
        w_uint8 = (u[:, ::2] << 4 | u[:, 1::2]).to(torch.uint8)
        packed_tg = torch.ops.aten._convert_weight_to_int4pack(w_uint8, 8)
    except RuntimeError:
        try:  # older signature: int32 [N, K] codes
            packed_tg = torch.ops.aten._convert_weight_to_int4pack(u, 8)
        except RuntimeError:
            return None
    # tinygemm dequantizes (u - 8) * scale + zero; zero = 0 gives q * scale
    sz = torch.stack([scale.t(), torch.zeros_like(scale.t())], dim=-1).contiguous()  # [K/G, N, 2]
    return packed_tg, sz


# ---------------------------------------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------------------------------------
def run_checks(shapes: dict, device, tiny: bool) -> tuple[list[str], dict]:
    """(failures, notes); a check that raises (a Triton compile error too) is a failure, the others go on."""
    failures: list[str] = []
    notes: dict = {"w4a16_rel_error_max": 0.0, "nvfp4_rel_error_max": 0.0, "fp8_rel_error_max": 0.0, "int4pack_verified": {}, "scaled_mm": {}}
    ms_w = [1, 3, 17] if tiny else [1, 3, 16, 64, 256]
    ms_f = [1, 20] if tiny else [1, 256, 4096]
    for name, (n, k) in shapes.items():
        try:
            _check_shape(name, n, k, ms_w, ms_f, device, failures, notes)
        except Exception as e:  # noqa: BLE001 -- a Triton compile error is no RuntimeError: record it, go on
            failures.append(f"{name}: {error_line(e)}")
    try:
        _check_quantizers(device, tiny, failures)
    except Exception as e:  # noqa: BLE001
        failures.append(f"quantizers: {error_line(e)}")
    return failures, notes


def _check_shape(name: str, n: int, k: int, ms_w, ms_f, device, failures: list[str], notes: dict) -> None:
    from quantrl import formats as fm
    from quantrl import kernels
    from quantrl.kernels.w4a16 import W4A16Config, nvfp4_gemm, w4a16_gemm

    wt = make_weights(n, k, device, zlib.crc32(name.encode()) % 1000)
    tg = int4pack_weight(wt)
    for m in ms_w:
        x = rand((m, k), torch.bfloat16, device, m)
        bias = rand((n,), torch.bfloat16, device, 7) if m == 3 else None
        y = kernels.w4a16_linear(x, wt.qt, wt.st, bias, backend="triton")
        ok, rel = gemm_ok(y, x, wt.w_deq, bias)
        notes["w4a16_rel_error_max"] = max(notes["w4a16_rel_error_max"], rel)
        if not ok:
            failures.append(f"w4a16 {name} M={m}: rel error {rel:.2e}")
        if m <= 16:  # the other path and the other gemv unpacking too (the tables and the sweep time them)
            others = [W4A16Config("gemv", bn=64, bk=128, unpack=u) for u in ("magic", "bf16x2")]
            if m == 1:
                others.append(W4A16Config("mma", bm=16, bn=64, bk=128))
            for cfg in others:
                ok, rel = gemm_ok(w4a16_gemm(x, wt.qt, wt.st, GROUP, None, cfg), x, wt.w_deq)
                if not ok:
                    failures.append(f"w4a16 {name} M={m} {cfg}: rel error {rel:.2e}")
        nq, nst, table, gs = wt.nv
        y = kernels.nvfp4_linear(x, nq, nst, gs, bias, table=table, backend="triton")
        ok, rel = gemm_ok(y, x, wt.nv_deq, bias)
        notes["nvfp4_rel_error_max"] = max(notes["nvfp4_rel_error_max"], rel)
        if not ok:
            failures.append(f"nvfp4 {name} M={m}: rel error {rel:.2e}")
        if m <= 16:  # the path pick_config did not choose at this M
            cfg = W4A16Config("mma", bm=16, bn=64, bk=128) if m == 1 else W4A16Config("gemv", bn=64, bk=128)
            ok, rel = gemm_ok(nvfp4_gemm(x, nq, nst, table, None, cfg), x, wt.nv_deq)
            if not ok:
                failures.append(f"nvfp4 {name} M={m} {cfg}: rel error {rel:.2e}")
        if tg is not None:
            try:
                yt = torch.ops.aten._weight_int4pack_mm(x, tg[0], GROUP, tg[1])
                notes["int4pack_verified"][f"{name} M={m}"] = gemm_ok(yt, x, wt.w_deq, ulps=1e9)[1] < 1e-2
            except RuntimeError as e:
                notes["int4pack_verified"][f"{name} M={m}"] = f"error: {str(e).splitlines()[0]}"
    for m in ms_f:
        x = rand((m, k), torch.bfloat16, device, 100 + m)
        xq, xs = kernels.quantize_fp8_activation(x, backend="triton")
        xq_r, xs_r = fm.quantize_fp8_activation(x)
        if not (bitwise(xq, xq_r) and bitwise(xs, xs_r)):
            failures.append(f"fp8 activation quant {name} M={m}: not bit-exact")
        xd = fm.dequantize_fp8_activation(xq_r, xs_r, 128, torch.float32)
        y = kernels.fp8_block_linear(x, wt.fp8_q, wt.fp8_s, backend="triton", gemm="triton")
        ok, rel = gemm_ok(y, xd, wt.fp8_deq, acc_bits=FP8_ACC_BITS)
        notes["fp8_rel_error_max"] = max(notes["fp8_rel_error_max"], rel)
        if not ok:
            failures.append(f"fp8 triton gemm {name} M={m}: rel error {rel:.2e}")
        if device.type == "cuda":
            try:
                ym = kernels.fp8_block_linear(x, wt.fp8_q, wt.fp8_s, gemm="scaled_mm")
                ok_mm, rel_mm = gemm_ok(ym, xd, wt.fp8_deq, ulps=4.0, acc_bits=FP8_ACC_BITS)
                notes["scaled_mm"][f"{name} M={m}"] = rel_mm
                if not ok_mm:
                    failures.append(f"torch._scaled_mm blockwise {name} M={m}: rel error {rel_mm:.2e}")
            except (RuntimeError, ValueError) as e:
                notes["scaled_mm"][f"{name} M={m}"] = f"unavailable: {str(e).splitlines()[0]}"


def _check_quantizers(device, tiny: bool, failures: list[str]) -> None:
    """The quantizers, bit for bit, on the benchmark's large input."""
    from quantrl import formats as fm
    from quantrl import kernels

    qn, qk = (300, 384) if tiny else QUANT_SHAPE
    w = rand((qn, qk), torch.bfloat16, device, 5)
    if not all(map(bitwise, kernels.quantize_fp8_block(w, backend="triton"), fm.quantize_fp8(w, "block"))):
        failures.append("quantize_fp8_block: not bit-exact")
    for g, qmax in ((128, 7), (32, 8)):
        p, s = kernels.quantize_pack_int4(w, g, qmax, backend="triton")
        q_r, s_r = fm.quantize_int4(w, g, qmax)
        if not (bitwise(p, fm.pack_int4(q_r)) and bitwise(s, s_r)):
            failures.append(f"quantize_pack_int4 G={g} qmax={qmax}: not bit-exact")
        if not bitwise(kernels.fake_quantize_int4(w, g, qmax, backend="triton"), fm.fake_quantize_int4(w, g, qmax)):
            failures.append(f"fake_quantize_int4 G={g} qmax={qmax}: not bit-exact")


# ---------------------------------------------------------------------------------------------------------
# timing runs
# ---------------------------------------------------------------------------------------------------------
def _cycle(make_one, count: int) -> list:
    return [make_one(i) for i in range(count)]


def bench_gemms(shapes: dict, ms_w: list[int], ms_f: list[int], device, timer: Timer, notes: dict,
                rows: list[dict]) -> list[dict]:  # fmt: skip
    """Every method at every M, shape by shape, appended to ``rows`` as each shape ends (an interrupted run
    keeps the shapes done). A shape that raises is recorded in ``notes["gemm_errors"]`` and skipped."""
    for name, (n, k) in shapes.items():
        t0 = time.perf_counter()
        try:
            got = bench_shape(name, n, k, ms_w, ms_f, device, timer, notes)
        except Exception as e:  # noqa: BLE001 -- e.g. the weights do not fit: the other shapes go on
            notes.setdefault("gemm_errors", {})[name] = error_line(e)
            print(f"  {name}: ERROR {notes['gemm_errors'][name]}", flush=True)
            got = []
        rows += got
        print(f"  timed {name}: {len(got)} figures in {time.perf_counter() - t0:.1f} s", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def bench_shape(name: str, n: int, k: int, ms_w: list[int], ms_f: list[int], device, timer: Timer,
                notes: dict) -> list[dict]:  # fmt: skip
    from dataclasses import replace

    import torch.nn.functional as F

    from quantrl import kernels
    from quantrl.kernels.w4a16 import pick_config, sm_count, w4a16_gemm

    rows = []
    wt = make_weights(n, k, device, 1)
    tg = int4pack_weight(wt)
    c_bf = copies_for(n * k * 2, device)
    c_i4 = copies_for(n * k // 2, device)
    c_f8 = copies_for(n * k, device)
    bf_w = [wt.bf16.clone() for _ in range(c_bf)]
    i4_w = [(wt.qt.clone(), wt.st.clone()) for _ in range(c_i4)]
    tg_w = [(tg[0].clone(), tg[1].clone()) for _ in range(c_i4)] if tg is not None else []
    f8_w = [(wt.fp8_q.clone(), wt.fp8_s.clone()) for _ in range(c_f8)]
    nv_w = [tuple(t.clone() for t in wt.nv) for _ in range(c_i4)]
    # verified only if checked (with --skip-checks there is nothing to go on: all([]) would say True)
    checked = [v for key, v in notes.get("int4pack_verified", {}).items() if key.startswith(name + " ")]
    tg_ok = bool(checked) and all(v is True for v in checked)
    def timed(label: str, fns: list) -> float | None:
        """One figure; a method that fails (a compile error, a capture error) loses its row, not the run."""
        try:
            return timer(fns)
        except Exception as e:  # noqa: BLE001
            notes.setdefault("timing_errors", {})[f"{name} M={m} {label}"] = error_line(e)
            print(f"  {name} M={m} {label}: ERROR {notes['timing_errors'][f'{name} M={m} {label}']}", flush=True)
            return None

    for m in sorted(set(ms_w) | set(ms_f)):
        x = rand((m, k), torch.bfloat16, device, m, 0.5)
        flops = 2 * m * n * k
        t_bf = timed("F.linear", [lambda w=w, x=x: F.linear(x, w) for w in bf_w])
        if t_bf is None:
            continue
        base = {"shape": name, "n": n, "k": k, "m": m, "flops": flops}
        rows.append({**base, "kernel": "bf16", "method": "F.linear", "time_s": t_bf, "bytes": bf16_bytes(m, n, k)})
        if m in ms_w:
            t = timed("w4a16", [lambda qt=qt, st=st, x=x: kernels.w4a16_linear(x, qt, st, backend="triton")
                                for qt, st in i4_w])  # fmt: skip
            ours = {}
            if t is not None:
                ours = {**base, "kernel": "w4a16", "method": "quantrl", "time_s": t, "bytes": w4a16_bytes(m, n, k),
                        "x_bf16": t_bf / t}  # fmt: skip
                rows.append(ours)
            # the other unpacking on the same tiles: the bf16x2 PTX (default) against the fp32 magic number
            cfg = replace(pick_config(m, n, k, sm_count(device)), unpack="magic")
            t_mg = timed("w4a16 magic", [lambda qt=qt, st=st, x=x, c=cfg: w4a16_gemm(x, qt, st, GROUP, None, c)
                                         for qt, st in i4_w])  # fmt: skip
            if t_mg is not None:
                rows.append({**base, "kernel": "w4a16", "method": "quantrl magic unpack", "time_s": t_mg,
                             "bytes": w4a16_bytes(m, n, k), "x_bf16": t_bf / t_mg, "config": repr(cfg)})  # fmt: skip
                if ours:
                    ours["x_magic_unpack"] = t_mg / t
            t_nv = timed("nvfp4", [lambda q=q, st=st, tab=tab, gs=gs, x=x: kernels.nvfp4_linear(
                x, q, st, gs, table=tab, backend="triton") for q, st, tab, gs in nv_w])  # fmt: skip
            if t_nv is not None:
                rows.append({**base, "kernel": "nvfp4", "method": "quantrl", "time_s": t_nv,
                             "bytes": nvfp4_bytes(m, n, k), "x_bf16": t_bf / t_nv,
                             **({"x_w4a16": t / t_nv} if t is not None else {})})  # fmt: skip
            if tg_w:
                t_tg = timed("_weight_int4pack_mm", [lambda p=p, sz=sz, x=x: torch.ops.aten._weight_int4pack_mm(
                    x, p, GROUP, sz) for p, sz in tg_w])  # fmt: skip
                if t_tg is not None:
                    rows.append({**base, "kernel": "w4a16", "method": "_weight_int4pack_mm", "time_s": t_tg,
                                 "bytes": int4pack_bytes(m, n, k), "x_bf16": t_bf / t_tg, "verified": tg_ok})  # fmt: skip
                    if ours:
                        ours["x_int4pack"] = t_tg / t
        if m in ms_f:
            for gemm in ("scaled_mm", "triton"):
                if gemm == "scaled_mm" and (device.type != "cuda" or n % 128 or k % 128):
                    continue
                t = timed(f"fp8 {gemm}", [lambda q=q, s=s, g=gemm, x=x: kernels.fp8_block_linear(
                    x, q, s, backend="triton", gemm=g, check=False) for q, s in f8_w])  # fmt: skip
                if t is not None:
                    rows.append({**base, "kernel": "fp8", "method": f"act_quant+{gemm}", "time_s": t,
                                 "bytes": fp8_linear_bytes(m, n, k), "x_bf16": t_bf / t})  # fmt: skip
    return rows


def sweep_configs() -> list:
    """Alternative tiles at small M, bf16x2 unpacking (the default) unless named; the magic unpacking once per
    path for the comparison. Offline sm_90 compiles put every gemv tile here within ~10% in instructions
    per weight (bench/compile_sm90.py), so this mainly settles occupancy and memory behaviour."""
    from quantrl.kernels.w4a16 import W4A16Config

    b = {"unpack": "bf16x2"}
    return [W4A16Config("gemv", bn=64, bk=128, **b), W4A16Config("gemv", bn=32, bk=256, **b),
            W4A16Config("gemv", bn=64, bk=256, **b), W4A16Config("gemv", bn=128, bk=128, num_warps=8, **b),
            W4A16Config("gemv", bn=128, bk=256, num_warps=8, **b), W4A16Config("gemv", bn=64, bk=128, unpack="magic"),
            W4A16Config("mma", bm=16, bn=64, bk=128, **b), W4A16Config("mma", bm=16, bn=128, bk=128, **b),
            W4A16Config("mma", bm=16, bn=128, bk=64, num_warps=8, **b), W4A16Config("mma", bm=16, bn=64, bk=128),
            # M = 64 / 256: at BM = 64 dequantization costs about as much as the MMA (compile_sm90's estimate);
            # BM = 128 halves it at M = 256 but leaves fewer programs to fill the SMs
            W4A16Config("mma", bm=64, bn=128, bk=64, **b), W4A16Config("mma", bm=64, bn=64, bk=64, **b),
            W4A16Config("mma", bm=128, bn=128, bk=64, num_warps=8, num_stages=3, **b),
            W4A16Config("mma", bm=64, bn=128, bk=64)]  # fmt: skip


def bench_sweep(device, timer: Timer, shapes: dict, ms: tuple[int, ...], configs: list, bw: float) -> list[dict]:
    """Alternative W4A16 tile configs at small M (for tuning the defaults; the GPU run: the largest shapes)."""
    from quantrl.kernels.w4a16 import pick_config, sm_count, w4a16_gemm

    rows = []
    for name, (n, k) in shapes.items():
        wt = make_weights(n, k, device, 2)
        ws = [(wt.qt.clone(), wt.st.clone()) for _ in range(copies_for(n * k // 2, device))]
        for m in ms:
            x = rand((m, k), torch.bfloat16, device, m, 0.5)
            default = pick_config(m, n, k, sm_count(device))
            for cfg in (c for c in configs if m <= 16 or (c.path == "mma" and c.bm > 16)):  # larger M: the mma tiles that fit it
                t = timer([lambda qt=qt, st=st, x=x, cfg=cfg: w4a16_gemm(x, qt, st, GROUP, None, cfg) for qt, st in ws])
                rows.append({"shape": name, "m": m, "config": repr(cfg), "default": repr(default), "time_s": t,
                             "pct_bw": pct_bw(w4a16_bytes(m, n, k), t, bw)})  # fmt: skip
    return rows


def bench_quant(device, timer: Timer, tiny: bool) -> list[dict]:
    from quantrl import formats as fm
    from quantrl import kernels

    n, k = (300, 384) if tiny else QUANT_SHAPE
    w = rand((n, k), torch.bfloat16, device, 3)
    el = n * k
    dst = torch.empty_like(w)
    t_copy = timer([lambda: dst.copy_(w)])
    rows = [{"kernel": "copy_", "method": "torch", "time_s": t_copy, "bytes": 4 * el}]
    cases = {  # name: (ours, reference, bytes moved)
        "fp8 block 128x128": (lambda: kernels.quantize_fp8_block(w, backend="triton", check=False), lambda: fm.quantize_fp8(w, "block"),
                              el * 3 + 4 * math.ceil(n / 128) * math.ceil(k / 128)),
        "fp8 activation 1x128": (lambda: kernels.quantize_fp8_activation(w, backend="triton", check=False),
                                 lambda: fm.quantize_fp8_activation(w), el * 3 + 4 * n * math.ceil(k / 128)),
        "fp8 activation 2d (x, x^T)": (lambda: kernels.quantize_fp8_activation_2d(w, backend="triton", check=False),
                                       lambda: (fm.quantize_fp8_activation(w), fm.quantize_fp8_activation(w.t().contiguous())),
                                       el * 4 + 4 * (n * math.ceil(k / 128) + k * math.ceil(n / 128))),
        "int4 quantize+pack G128": (lambda: kernels.quantize_pack_int4(w, 128, backend="triton", check=False),
                                    lambda: fm.pack_int4(fm.quantize_int4(w, 128)[0]), el * 2 + el // 2 + el // 64),
        "int4 quantize+pack G32": (lambda: kernels.quantize_pack_int4(w, 32, backend="triton", check=False),
                                   lambda: fm.pack_int4(fm.quantize_int4(w, 32)[0]), el * 2 + el // 2 + el // 16),
        "int4 fake quant G128": (lambda: kernels.fake_quantize_int4(w, 128, backend="triton", check=False),
                                 lambda: fm.fake_quantize_int4(w, 128), el * 4 + el // 64),
    }  # fmt: skip
    for name, (ours, ref, nbytes) in cases.items():
        t = timer([ours])
        t_ref = timer([ref], capture=False)  # formats checks for NaN with a host sync: not capturable
        rows.append({"kernel": name, "method": "quantrl", "time_s": t, "bytes": nbytes, "time_ref_s": t_ref,
                     "x_reference": None if not t_ref else t_ref / t, "pct_same_size_copy": (nbytes / t) / (4 * el / t_copy)})  # fmt: skip
    return rows


# ---------------------------------------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------------------------------------
def _f(v, fmt: str, width: int) -> str:
    return f"{'-':>{width}}" if v is None else f"{v:>{width}{fmt}}"


def print_plan(shapes: dict, ms_w: list[int], ms_f: list[int]) -> None:
    print("planned measurements on an H100 (floor = max(bytes / 3.0 TB/s, FLOPs / peak)):")
    print(f"{'shape':<18}{'M':>6}{'w4a16 MB':>10}{'floor us':>10}{'bf16 MB':>10}{'floor us':>10}{'fp8 MB':>10}"
          f"{'floor us':>10}{'GFLOP':>9}")  # fmt: skip
    for name, (n, k) in shapes.items():
        for m in sorted(set(ms_w) | set(ms_f)):
            fl = 2 * m * n * k
            w4 = (
                f"{w4a16_bytes(m, n, k) / 1e6:>10.2f}{floor_us(w4a16_bytes(m, n, k), fl, H100_PEAK_BF16):>10.2f}"
                if m in ms_w
                else f"{'':>20}"
            )
            print(f"{name:<18}{m:>6}{w4}{bf16_bytes(m, n, k) / 1e6:>10.2f}{floor_us(bf16_bytes(m, n, k), fl, H100_PEAK_BF16):>10.2f}"
                  f"{fp8_linear_bytes(m, n, k) / 1e6:>10.2f}{floor_us(fp8_linear_bytes(m, n, k), fl, H100_PEAK_FP8):>10.2f}"
                  f"{fl / 1e9:>9.3f}")  # fmt: skip
    n, k = QUANT_SHAPE
    print(f"quantizers on {n}x{k} bf16 ({n * k * 2 / 2**20:.0f} MiB): fp8 block / 1x128, int4 pack G128 / G32, "
          "int4 fake quant; copy_ of the same tensor for the measured bandwidth")  # fmt: skip


def annotate(rows: list[dict], bw: float) -> None:
    """Per row: time in us, % of the measured copy bandwidth ``bw`` and of the H100's, % of the H100's peak FLOPs."""
    for r in rows:
        t = r.get("time_s")
        r["time_us"] = None if t is None else t * 1e6
        if "bytes" in r:
            r["pct_bw_measured"] = pct_bw(r["bytes"], t, bw)
            r["pct_bw_h100"] = pct_bw(r["bytes"], t, H100_COPY_BW)
        if "flops" in r:
            r["pct_peak_flops_h100"] = pct_flops(
                r["flops"], t, H100_PEAK_FP8 if r["kernel"] == "fp8" else H100_PEAK_BF16
            )


def _by_key(rows: list[dict]) -> dict:
    return {(r["kernel"], r["method"], r["shape"], r["m"]): r for r in rows if "shape" in r}


def print_w4a16_table(by: dict) -> None:
    print("\nW4A16 (group 128): time us, ratio vs baseline; %BW: of the measured copy bandwidth, %H100: of 3.0 TB/s; "
          "%FL: of the H100's 800 TFLOP/s")  # fmt: skip
    print(f"{'shape':<18}{'M':>5}{'ours us':>9}{'%BW':>6}{'%H100':>6}{'%FL':>6}{'bf16 us':>9}{'%BW':>6}{'x bf16':>8}"
          f"{'i4pk us':>9}{'%BW':>6}{'x i4pk':>8}{'x magic':>8}")  # fmt: skip
    for (kern, meth, shape, m), r in by.items():
        if kern != "w4a16" or meth != "quantrl":
            continue
        bf = by.get(("bf16", "F.linear", shape, m), {})
        tg = by.get(("w4a16", "_weight_int4pack_mm", shape, m), {})
        print(f"{shape:<18}{m:>5}{_f(r['time_us'], '.1f', 9)}{_f(r['pct_bw_measured'], '.0%', 6)}"
              f"{_f(r['pct_bw_h100'], '.0%', 6)}{_f(r['pct_peak_flops_h100'], '.0%', 6)}{_f(bf.get('time_us'), '.1f', 9)}"
              f"{_f(bf.get('pct_bw_measured'), '.0%', 6)}{_f(r.get('x_bf16'), '.2f', 8)}{_f(tg.get('time_us'), '.1f', 9)}"
              f"{_f(tg.get('pct_bw_measured'), '.0%', 6)}{_f(r.get('x_int4pack'), '.2f', 8)}"
              f"{_f(r.get('x_magic_unpack'), '.2f', 8)}")  # fmt: skip


def print_nvfp4_table(by: dict) -> None:
    print("\nNVFP4A16 (e4m3 scales per 16): time us; %BW of the measured copy bandwidth; x bf16 = F.linear time / "
          "ours; x w4a16 = our INT4 (group 128) time / ours")  # fmt: skip
    print(f"{'shape':<18}{'M':>5}{'ours us':>9}{'%BW':>6}{'%H100':>6}{'x bf16':>8}{'x w4a16':>8}")
    for (kern, meth, shape, m), r in by.items():
        if kern == "nvfp4" and meth == "quantrl":
            print(f"{shape:<18}{m:>5}{_f(r['time_us'], '.1f', 9)}{_f(r['pct_bw_measured'], '.0%', 6)}"
                  f"{_f(r['pct_bw_h100'], '.0%', 6)}{_f(r.get('x_bf16'), '.2f', 8)}{_f(r.get('x_w4a16'), '.2f', 8)}")


def print_fp8_table(by: dict) -> None:
    print("\nFP8 block linear (1x128 activation quantization included): %BW of the measured copy bandwidth, "
          "%FL of the H100's 1260 TFLOP/s fp8")  # fmt: skip
    print(f"{'shape':<18}{'M':>5}{'bf16 us':>9}{'mm us':>9}{'x bf16':>8}{'%BW':>6}{'%FL':>6}{'triton us':>10}"
          f"{'x bf16':>8}{'%BW':>6}{'%FL':>6}")  # fmt: skip
    for (kern, meth, shape, m), bf in by.items():
        if kern != "bf16":
            continue
        mm = by.get(("fp8", "act_quant+scaled_mm", shape, m), {})
        tr = by.get(("fp8", "act_quant+triton", shape, m), {})
        if not (mm or tr):
            continue
        print(f"{shape:<18}{m:>5}{_f(bf['time_us'], '.1f', 9)}{_f(mm.get('time_us'), '.1f', 9)}"
              f"{_f(mm.get('x_bf16'), '.2f', 8)}{_f(mm.get('pct_bw_measured'), '.0%', 6)}"
              f"{_f(mm.get('pct_peak_flops_h100'), '.0%', 6)}{_f(tr.get('time_us'), '.1f', 10)}"
              f"{_f(tr.get('x_bf16'), '.2f', 8)}{_f(tr.get('pct_bw_measured'), '.0%', 6)}"
              f"{_f(tr.get('pct_peak_flops_h100'), '.0%', 6)}")  # fmt: skip


def print_tables(rows: list[dict], quant: list[dict], sweep: list[dict], roof: dict) -> None:
    print(f"\n{describe_roofline(roof)}")
    by = _by_key(rows)
    print_w4a16_table(by)
    print_nvfp4_table(by)
    print_fp8_table(by)
    if sweep:
        print("\nW4A16 config sweep (time us, % of the measured copy bandwidth)")
        for r in sweep:
            print(
                f"  {r['shape']:<12} M={r['m']:<3} {r['time_s'] * 1e6:8.1f} us {_f(r['pct_bw'], '.0%', 6)}  {r['config']}"
            )
    print("\nquantizers (GB/s of bytes moved; % of the measured copy bandwidth, of 3.0 TB/s, and of a copy_ of the "
          "same tensor; x formats on the same device)")  # fmt: skip
    print(f"  {'kernel':<26}{'us':>9}   {'GB/s':>9}     {'%BW':>6}{'%H100':>6}{'%same':>6}{'x ref':>7}")
    for r in quant:
        gbs = r["bytes"] / r["time_s"] / 1e9
        print(f"  {r['kernel']:<26}{r['time_us']:>9.1f} us{gbs:>9.0f} GB/s{_f(r['pct_bw_measured'], '.0%', 6)}"
              f"{_f(r['pct_bw_h100'], '.0%', 6)}{_f(r.get('pct_same_size_copy'), '.0%', 6)}"
              f"{_f(r.get('x_reference'), '.1f', 7)}x")  # fmt: skip


def evaluate_targets(rows: list[dict], quant: list[dict], spec: TargetSpec = TargetSpec()) -> dict:
    """Issue 5's targets; the bandwidth one against the copy bandwidth measured on this device."""
    by = _by_key(rows)
    t: dict[str, bool] = {}
    ours = {(s, m): r for (k, me, s, m), r in by.items() if k == "w4a16" and me == "quantrl"}
    if all((s, 1) in ours for s in spec.largest):
        t["w4a16_m1_ge_3x_bf16_largest"] = all(ours[(s, 1)]["x_bf16"] >= 3.0 for s in spec.largest)
    vs_tg = [r["x_int4pack"] for (s, m), r in ours.items() if m <= 16 and "x_int4pack" in r
             and by[("w4a16", "_weight_int4pack_mm", s, m)].get("verified")]  # fmt: skip
    if vs_tg:
        t["w4a16_m1_16_ge_1.5x_int4pack"] = min(vs_tg) >= 1.5
    lo, hi = spec.mid_ms
    mid = [r["x_bf16"] for (s, m), r in ours.items() if lo <= m <= hi]
    if mid:
        t["w4a16_m32_256_not_slower_than_bf16"] = min(mid) >= 1.0
    fp8 = [r["x_bf16"] for (k, me, s, m), r in by.items() if k == "fp8" and s == spec.fp8_shape and m >= spec.fp8_min_m]
    if fp8:
        t["fp8_m4096_8192_ge_1.4x_bf16"] = max(fp8) >= 1.4
    qk = [r for r in quant if r["method"] == "quantrl"]
    if qk:
        t["quant_kernels_ge_80pct_measured_copy_bw"] = all(r["pct_bw_measured"] >= 0.8 for r in qk)
    return t


def print_targets(targets: dict, smoke: bool) -> None:
    for name, ok in targets.items():
        verdict = "met" if ok else "NOT met"
        print(f"{'smoke (meaningless on tiny shapes): ' if smoke else ''}target {name}: {verdict}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="print the planned table (bytes, FLOPs, floors) and exit")
    p.add_argument("--tiny", action="store_true", help="tiny shapes; on CPU through Triton's interpreter")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes on CPU through Triton's interpreter, every stage incl. sweep, tables, targets; "
                        "writes nothing")  # fmt: skip
    p.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), help="subset of shapes (default: all)")
    p.add_argument("--ms", type=int, nargs="+", help="subset of M (default: 1..256, +1024/4096 for FP8)")
    p.add_argument("--reps", type=int, default=7, help="graph replays per figure (median)")
    p.add_argument("--sweep", action="store_true",
                   help="on CUDA: time alternative W4A16 configs instead of the tables, at --ms (M <= 256) on --shapes "
                        "(default: the three largest)")  # fmt: skip
    p.add_argument("--skip-checks", action="store_true", help="time without the correctness gate (debugging only)")
    p.add_argument("--no-write", action="store_true", help="do not write bench/results/kernels_gpu.json")
    return p


def run_correctness(shapes: dict, device, tiny: bool) -> tuple[bool, dict]:
    """(passed, notes) of the correctness gate, printed. If only W4A16 checks fail, they are rerun with the
    magic-number unpacking as the default: when that passes, the timings go on with it (the bf16x2 failures
    recorded in ``notes["bf16x2_failures"]``), so one wrong PTX path does not cost the session its figures."""
    from quantrl.kernels import w4a16

    t0 = time.perf_counter()
    failures, notes = run_checks(shapes, device, tiny)
    if failures and all(f.startswith("w4a16 ") for f in failures) and w4a16.DEFAULT_UNPACK == "bf16x2":
        print(f"correctness: {len(failures)} W4A16 failure(s) with bf16x2 as the default, e.g. {failures[0]}; "
              "rechecking with the magic-number unpacking", flush=True)  # fmt: skip
        w4a16.DEFAULT_UNPACK = "magic"
        bf16x2_failures = failures
        failures, notes = run_checks(shapes, device, tiny)
        failures = [f for f in failures if "bf16x2" not in f]  # the explicit bf16x2 checks fail as before
        notes["bf16x2_failures"] = bf16x2_failures
    notes["w4a16_default_unpack"] = w4a16.DEFAULT_UNPACK
    notes["failures"] = failures  # in the JSON: the figures beside them are of kernels that failed a check
    print(f"correctness: {len(failures)} failure(s) ({time.perf_counter() - t0:.0f} s); "
          f"max rel error w4a16 {notes['w4a16_rel_error_max']:.2e}, fp8 {notes['fp8_rel_error_max']:.2e}", flush=True)  # fmt: skip
    for f in failures:
        print(f"  FAIL {f}")
    for key in ("scaled_mm", "int4pack_verified"):
        bad = {k: v for k, v in notes[key].items() if isinstance(v, str) or v is False}
        if bad:
            print(f"  note: {key}: {dict(list(bad.items())[:3])}{' ...' if len(bad) > 3 else ''}")
    return not failures, notes


def main() -> int:
    args = build_parser().parse_args()
    tiny = args.tiny or args.smoke
    shapes = TINY_SHAPES if tiny else {s: SHAPES[s] for s in (args.shapes or SHAPES)}
    ms_w = [m for m in (args.ms or ([1, 3, 17] if tiny else W4A16_MS)) if m <= 256]
    ms_f = args.ms or ([1, 20] if tiny else FP8_MS)
    if args.dry_run:
        print_plan(shapes, ms_w, ms_f)
        return 0
    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not tiny:
        print("bench/kernels_gpu.py times GPU kernels and needs a CUDA device; use --dry-run or --smoke here.",
              file=sys.stderr)  # fmt: skip
        return 2
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before quantrl.kernels' @triton.jit run
    if args.smoke:
        print(
            "smoke run: tiny shapes on CPU through Triton's interpreter; the figures mean nothing, nothing is written"
        )
    from quantrl import kernels

    if not kernels.triton_available():
        print("triton is not installed", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    roof = roofline(device, smoke=not cuda)
    print(describe_roofline(roof), flush=True)
    notes: dict = {}
    passed = True
    if not args.skip_checks:
        # a failed check is recorded and the timing goes on: on a rare GPU session figures marked
        # "checks failed" are worth more than none (the exit status still says it failed)
        passed, notes = run_correctness(shapes, device, tiny)
        notes["passed"] = passed
    timer = Timer(device, args.reps)
    rows, sweep, quant = [], [], []
    interrupted = False
    try:  # SIGINT (the session's step timeout): write what was timed so far
        if not (args.sweep and cuda):
            bench_gemms(shapes, ms_w, ms_f, device, timer, notes, rows)
        if args.smoke:  # one tiny shape, two configs: the sweep's code, not its figures
            sweep = bench_sweep(device, timer, dict(list(TINY_SHAPES.items())[:1]), (1,), sweep_configs()[::4][:2],
                                roof["measured_copy_Bps"])  # fmt: skip
        elif args.sweep and cuda:
            sweep = bench_sweep(device, timer, {s: SHAPES[s] for s in (args.shapes or LARGEST)}, tuple(ms_w),
                                sweep_configs(), roof["measured_copy_Bps"])  # fmt: skip
        if not (args.sweep and cuda):
            quant = bench_quant(device, timer, tiny)
    except KeyboardInterrupt:
        interrupted = True
        print(f"interrupted: writing the {len(rows)} GEMM figures timed so far", flush=True)
    notes["interrupted"] = interrupted
    annotate(rows, roof["measured_copy_Bps"])
    annotate(quant, roof["measured_copy_Bps"])
    print_tables(rows, quant, sweep, roof)
    targets = evaluate_targets(rows, quant, SMOKE_TARGETS if args.smoke else TargetSpec()) if cuda or args.smoke else {}
    print_targets(targets, args.smoke)
    print(f"total {time.perf_counter() - t0:.0f} s")
    if (cuda and not args.no_write and not tiny) or args.smoke:
        import triton

        path = write_results("kernels_gpu", {
            "roofline": roof,
            "method": {"reps": args.reps, "timing": "median of CUDA-graph replays, weight copies cycled past L2",
                       "pct_bw_measured": "bytes moved / time / roofline.measured_copy_Bps (targets use this)",
                       "pct_bw_h100": "bytes moved / time / 3.0 TB/s", "pct_peak_flops_h100": "2MNK / time / H100 peak",
                       "group_size": GROUP, "triton": triton.__version__},
            "checks": notes, "rows": rows, "quant": quant, "sweep": sweep, "targets": targets,
        }, smoke=args.smoke)  # fmt: skip
        if path:
            print(f"wrote {path}")
    return 0 if passed and not interrupted else 1


if __name__ == "__main__":
    sys.exit(main())
