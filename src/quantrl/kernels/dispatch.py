"""One function per kernel: Triton when the tensor is on CUDA and Triton is importable, else the
``formats`` reference. Same arguments, same results (bit for bit for the quantizers; GEMMs agree to
rounding), same validation and error messages either way.

``backend``: ``"auto"`` (the rule above), ``"reference"`` (always ``formats``), ``"triton"`` (the kernel,
or an error saying why not; CPU tensors are accepted when the process runs Triton's interpreter,
TRITON_INTERPRET=1, which is how the CPU tests exercise the kernels). Shapes or options a kernel does
not cover (e.g. a non-power-of-two group) silently use the reference under ``"auto"``.

Layering: this module depends on ``formats`` only (never on ``model``), and imports the kernel modules
lazily, so ``quantrl.kernels`` imports on machines without Triton.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
import torch.nn.functional as F

from quantrl.formats import (
    FP8_DTYPE,
    dequantize_fp8,
    dequantize_fp8_activation,
    dequantize_int,
    dequantize_nvfp4,
    pack_int4,
    quantize_fp8,
    quantize_int4,
    unpack_int4,
    unpack_nvfp4,
)
from quantrl.formats import fake_quantize_int4 as _ref_fake_quantize_int4
from quantrl.formats import (
    quantize_fp8_activation as _ref_quantize_fp8_activation,
)
from quantrl.formats._checks import cdiv, check_block_size, check_float_tensor
from quantrl.formats.fp8 import _check_scale_fmt, dequantize_fp8_static
from quantrl.formats.int4 import _check_weight, int_range
from quantrl.formats.ste import straight_through
from quantrl.kernels._triton import HAVE_TRITON
from quantrl.kernels.layout import (
    check_nvfp4_layout,
    group_size_of,
    nvfp4_decode_table,
    nvfp4_unrepack,
    w4a16_unrepack,
)

Backend = Literal["auto", "triton", "reference"]
_BACKENDS = ("auto", "triton", "reference")


def triton_available() -> bool:
    return HAVE_TRITON


def interpreted() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1 at import)."""
    if not HAVE_TRITON:
        return False
    from quantrl.kernels._numerics import INTERPRETED

    return INTERPRETED


def use_triton(t: torch.Tensor, backend: str, supported: bool = True, what: str = "kernel", why: str = "") -> bool:
    """Decide the path for tensor ``t`` (see the module note); raises for an impossible ``"triton"``."""
    if backend not in _BACKENDS:
        raise ValueError(f"{what}: backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "reference":
        return False
    if backend == "auto":
        return HAVE_TRITON and t.is_cuda and supported
    if not HAVE_TRITON:
        raise RuntimeError(f"{what}: backend='triton' but triton is not installed")
    if not (t.is_cuda or interpreted()):
        raise RuntimeError(f"{what}: backend='triton' needs a CUDA tensor (or TRITON_INTERPRET=1), got {t.device}")
    if not supported:
        raise ValueError(f"{what}: the Triton kernel does not support this input ({why})")
    return True


# ------------------------------------------------------------------------------------------------------
# FP8
# ------------------------------------------------------------------------------------------------------
def quantize_fp8_block(
    w: torch.Tensor,
    block_size: tuple[int, int] = (128, 128),
    scale_fmt: str | None = None,
    *,
    backend: Backend = "auto",
    check: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``formats.quantize_fp8(w, "block", block_size, scale_fmt)``: ``(q [N, K] e4m3, scale_inv fp32
    [ceil(N/bn), ceil(K/bk)])``. ``check=False`` skips the kernel's NaN/Inf host sync."""
    _check_scale_fmt(scale_fmt)
    check_float_tensor(w, what="quantize_fp8", ndim=2)
    bs = check_block_size(block_size)
    ok = False
    if HAVE_TRITON:
        from quantrl.kernels.fp8_quant import block_quant_supported

        ok = block_quant_supported(bs)
    if use_triton(w, backend, ok, "quantize_fp8_block", f"block_size={bs}"):
        from quantrl.kernels.fp8_quant import quantize_fp8_block_triton

        return quantize_fp8_block_triton(w, bs, scale_fmt, check=check)
    return quantize_fp8(w, "block", bs, scale_fmt)


def quantize_fp8_activation(
    x: torch.Tensor,
    group_size: int = 128,
    scale_fmt: str | None = None,
    *,
    backend: Backend = "auto",
    check: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``formats.quantize_fp8_activation``: 1 x ``group_size`` per-token groups along the last dim."""
    _check_scale_fmt(scale_fmt)
    if group_size <= 0:
        raise ValueError(f"group_size must be positive, got {group_size}")
    check_float_tensor(x, what="quantize_fp8_activation")
    ok = False
    if HAVE_TRITON:
        from quantrl.kernels.fp8_quant import act_quant_supported

        ok = act_quant_supported(group_size)
    if use_triton(x, backend, ok, "quantize_fp8_activation", f"group_size={group_size}"):
        from quantrl.kernels.fp8_quant import quantize_fp8_activation_triton

        return quantize_fp8_activation_triton(x, group_size, scale_fmt, check=check)
    return _ref_quantize_fp8_activation(x, group_size, scale_fmt)


def quantize_fp8_activation_2d(
    x: torch.Tensor,
    group_size: int = 128,
    scale_fmt: str | None = None,
    *,
    backend: Backend = "auto",
    check: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both 1 x ``group_size`` quantizations of a 2-D ``x [M, K]`` that FP8 training needs:
    ``quantize_fp8_activation(x)`` (groups along K) and ``quantize_fp8_activation(x.t())`` (along M,
    codes ``[K, M]``), as ``(q, s, qt, st)``. One pass over x on CUDA."""
    _check_scale_fmt(scale_fmt)
    check_float_tensor(x, what="quantize_fp8_activation_2d", ndim=2)
    ok = False
    if HAVE_TRITON:
        from quantrl.kernels.fp8_quant import act_quant_2d_supported

        ok = act_quant_2d_supported(group_size)
    if use_triton(x, backend, ok, "quantize_fp8_activation_2d", f"group_size={group_size}"):
        from quantrl.kernels.fp8_quant import quantize_fp8_activation_2d_triton

        return quantize_fp8_activation_2d_triton(x, group_size, scale_fmt, check=check)
    q, s = _ref_quantize_fp8_activation(x, group_size, scale_fmt)
    qt, st = _ref_quantize_fp8_activation(x.t().contiguous(), group_size, scale_fmt)
    return q, s, qt, st


BScale = Literal["block", "row"]
Gemm = Literal["auto", "scaled_mm", "triton"]


def _check_fp8_operands(xq, xs, wq, ws, b_scale: str = "block") -> None:
    if b_scale not in ("block", "row"):
        raise ValueError(f"fp8_block_gemm: b_scale must be 'block' (128x128) or 'row' (1x128), got {b_scale!r}")
    if xq.dtype != FP8_DTYPE or wq.dtype != FP8_DTYPE or xq.ndim != 2 or wq.ndim != 2:
        raise TypeError(
            f"fp8_block_gemm: expected 2-D {FP8_DTYPE} operands, got {xq.dtype} {tuple(xq.shape)} and "
            f"{wq.dtype} {tuple(wq.shape)}"
        )
    (m, k), (n, k2) = xq.shape, wq.shape
    if k != k2:
        raise ValueError(f"fp8_block_gemm: K differs: activations {tuple(xq.shape)}, weight {tuple(wq.shape)}")
    kb = cdiv(k, 128)
    want_ws = (cdiv(n, 128), kb) if b_scale == "block" else (n, kb)
    if tuple(xs.shape) != (m, kb) or tuple(ws.shape) != want_ws:
        raise ValueError(
            f"fp8_block_gemm: scales {tuple(xs.shape)} / {tuple(ws.shape)} do not fit 1x128 activation blocks "
            f"({m}, {kb}) and {'128x128' if b_scale == 'block' else '1x128'} b blocks {want_ws}"
        )


def _reference_block_gemm(xq, xs, wq, ws, bias, out_dtype, b_scale: str) -> torch.Tensor:
    xf = dequantize_fp8_activation(xq, xs, 128, dtype=torch.float32)
    if b_scale == "block":
        wf = dequantize_fp8(wq, ws.float(), (128, 128), dtype=torch.float32)
    else:
        wf = dequantize_fp8_activation(wq, ws.float(), 128, dtype=torch.float32)
    return F.linear(xf, wf, None if bias is None else bias.float()).to(out_dtype)


# (device type, index, b_scale) -> blockwise torch._scaled_mm works here (absent: not yet probed)
_SCALED_MM_OK: dict[tuple[str, int | None, str], bool] = {}


def scaled_mm_block(xq, xs, wq, ws, out_dtype, b_scale: str = "block") -> torch.Tensor:
    """cuBLAS blockwise FP8 (DeepSeek-V3 recipes). scale_a [M, K/128] column-major (1x128); b = wq.t()
    [K, N] column-major with scale_b [K/128, N/128] (128x128: ``ws.t()``) or [K/128, N] row-major (1x128)."""
    sb = ws.float().t() if b_scale == "block" else ws.float().t().contiguous()
    return torch._scaled_mm(xq, wq.t(), scale_a=xs.t().contiguous().t(), scale_b=sb, out_dtype=out_dtype)


def scaled_mm_block_supported(n: int, k: int, device: torch.device, b_scale: str = "block") -> bool:
    """Shapes cuBLAS's blockwise recipes take (exact 128 tiles) on an SM89+ device with ``_scaled_mm``,
    unless this process found it missing or wrong there."""
    return (
        device.type == "cuda"
        and hasattr(torch, "_scaled_mm")
        and n % 128 == 0
        and k % 128 == 0
        and torch.cuda.get_device_capability(device) >= (8, 9)
        and _SCALED_MM_OK.get((device.type, device.index, b_scale), True)
    )


PROBE_RTOL = 2e-2  # _scaled_mm vs the Triton/reference GEMM on their first call (both bf16-rounded fp32 sums)


def _try_scaled_mm(xq, xs, wq, ws, out_dtype, b_scale: str, fallback) -> torch.Tensor | None:
    """``_scaled_mm`` for ``gemm="auto"``: the first call per (device, recipe) is compared with ``fallback()``
    and the result remembered, so a cuBLAS that rejects the recipe or reads the scales differently costs one
    warning, not wrong numbers. Under CUDA-graph capture (no host syncs allowed) nothing is probed."""
    key = (xq.device.type, xq.device.index, b_scale)
    try:
        y = scaled_mm_block(xq, xs, wq, ws, out_dtype, b_scale)
    except (RuntimeError, NotImplementedError, ValueError) as e:
        _SCALED_MM_OK[key] = False
        warnings.warn(f"torch._scaled_mm has no blockwise FP8 ({b_scale}) here ({e}); using the Triton GEMM",
                      stacklevel=3)  # fmt: skip
        return None
    if key not in _SCALED_MM_OK and not (xq.is_cuda and torch.cuda.is_current_stream_capturing()):
        ref = fallback().float()
        err = float((y.float() - ref).norm() / ref.norm().clamp_min(1e-30))
        _SCALED_MM_OK[key] = err <= PROBE_RTOL
        if not _SCALED_MM_OK[key]:
            warnings.warn(f"torch._scaled_mm blockwise FP8 ({b_scale}) disagrees with the Triton GEMM (rel err "
                          f"{err:.2e}); not using it", stacklevel=3)  # fmt: skip
            return None
    return y


def fp8_block_gemm(
    xq: torch.Tensor,
    xs: torch.Tensor,
    wq: torch.Tensor,
    ws: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    *,
    b_scale: BScale = "block",
    backend: Backend = "auto",
    gemm: Gemm = "auto",
) -> torch.Tensor:
    """``[M, N]`` = (xq, 1x128 scales xs) @ (wq [N, K], scales ws).T + bias, fp32 accumulate. ``ws`` is
    128x128 blocks ``[N/128, K/128]`` (a weight) or, with ``b_scale="row"``, 1x128 ``[N, K/128]``.

    Reference: ``fp32(dequant(x)) @ fp32(dequant(w)).T`` rounded once (``Fp8Linear``'s CPU numbers). On
    CUDA ``gemm="auto"`` takes blockwise ``torch._scaled_mm`` where cuBLAS has it (exact 128 tiles; checked
    once against the Triton GEMM), else the Triton GEMM; ``gemm`` forces one of them."""
    if gemm not in ("auto", "scaled_mm", "triton"):
        raise ValueError(f"fp8_block_gemm: gemm must be 'auto', 'scaled_mm' or 'triton', got {gemm!r}")
    _check_fp8_operands(xq, xs, wq, ws, b_scale)
    triton_ok = use_triton(xq, backend, True, "fp8_block_gemm")

    def fallback(b: torch.Tensor | None) -> torch.Tensor:
        if triton_ok:
            from quantrl.kernels.block_gemm import fp8_block_gemm_triton

            return fp8_block_gemm_triton(xq, xs, wq, ws, b, out_dtype, b_scale=b_scale)
        return _reference_block_gemm(xq, xs, wq, ws, b, out_dtype, b_scale)

    if gemm == "scaled_mm":
        y = scaled_mm_block(xq, xs, wq, ws, out_dtype, b_scale)
        return y if bias is None else y + bias
    n, k = wq.shape
    if gemm == "auto" and backend == "auto" and scaled_mm_block_supported(n, k, xq.device, b_scale):
        y = _try_scaled_mm(xq, xs, wq, ws, out_dtype, b_scale, lambda: fallback(None))  # bias-free compare
        if y is not None:
            return y if bias is None else y + bias
    return fallback(bias)


def fp8_block_linear(
    x: torch.Tensor,
    wq: torch.Tensor,
    ws: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    backend: Backend = "auto",
    gemm: Gemm = "auto",
    check: bool = True,
) -> torch.Tensor:
    """W8A8 blockwise linear: quantize ``x [..., K]`` to 1x128 e4m3 groups (Triton on CUDA), multiply by the
    128x128-block weight ``(wq [N, K], ws)`` with ``fp8_block_gemm``, output in x's dtype."""
    k = x.shape[-1]
    xq, xs = quantize_fp8_activation(x.reshape(-1, k), 128, backend=backend, check=check)
    y = fp8_block_gemm(xq, xs, wq, ws, bias, x.dtype, backend=backend, gemm=gemm)
    return y.view(*x.shape[:-1], wq.shape[0])


# ------------------------------------------------------------------------------------------------------
# INT4
# ------------------------------------------------------------------------------------------------------
def _int4_kernel_ok(group_size: int) -> bool:
    if not HAVE_TRITON:
        return False
    from quantrl.kernels.int4_quant import supported

    return supported(group_size)


def quantize_pack_int4(
    w: torch.Tensor, group_size: int = 128, qmax: int = 7, *, backend: Backend = "auto", check: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pack_int4(q), s)`` for ``q, s = formats.quantize_int4(w, group_size, qmax)``: compressed-tensors
    ``weight_packed`` int32 ``[N, K/8]`` and ``weight_scale`` bf16 ``[N, K/G]``, in one pass on CUDA."""
    int_range(4, qmax)
    _check_weight(w, group_size, "quantize_int4")
    if use_triton(w, backend, _int4_kernel_ok(group_size), "quantize_pack_int4", f"group_size={group_size}"):
        from quantrl.kernels.int4_quant import quantize_pack_int4_triton

        return quantize_pack_int4_triton(w, group_size, qmax, check=check)
    q, s = quantize_int4(w, group_size, qmax)
    return pack_int4(q), s


def _fake_int4_kernel(w: torch.Tensor, group_size: int, qmax: int, dtype: torch.dtype, check: bool) -> torch.Tensor:
    from quantrl.kernels.int4_quant import fake_quantize_int4_triton

    return fake_quantize_int4_triton(w, group_size, qmax, dtype, check=check)


def fake_quantize_int4(
    w: torch.Tensor,
    group_size: int = 128,
    qmax: int = 7,
    dtype: torch.dtype | None = None,
    *,
    backend: Backend = "auto",
    check: bool = True,
) -> torch.Tensor:
    """``formats.fake_quantize_int4`` (bf16 scales, straight-through gradient); fused on CUDA.
    ``check=False`` skips the kernel's NaN/Inf host sync."""
    int_range(4, qmax)
    _check_weight(w, group_size, "fake_quantize_int4")
    if use_triton(w, backend, _int4_kernel_ok(group_size), "fake_quantize_int4", f"group_size={group_size}"):
        return straight_through(w, _fake_int4_kernel, group_size, qmax, dtype or w.dtype, check)
    return _ref_fake_quantize_int4(w, group_size, qmax, dtype=dtype)


def _check_w4a16(x: torch.Tensor, qweight_t: torch.Tensor, scale_t: torch.Tensor, group_size: int | None) -> int:
    check_float_tensor(x, what="w4a16_linear")
    if qweight_t.dtype != torch.int32 or qweight_t.ndim != 2:
        raise ValueError(
            f"w4a16_linear: qweight_t must be 2-D int32 [K/8, N], got {qweight_t.dtype} {tuple(qweight_t.shape)}"
        )
    k = qweight_t.shape[0] * 8
    if x.shape[-1] != k:
        raise ValueError(
            f"w4a16_linear: x has K={x.shape[-1]} but the weight holds K={k} (qweight_t {tuple(qweight_t.shape)})"
        )
    g = group_size_of(qweight_t, scale_t)
    if group_size is not None and g != group_size:
        raise ValueError(f"w4a16_linear: scale_t {tuple(scale_t.shape)} implies group size {g}, not {group_size}")
    if g % 8 or tuple(scale_t.shape) != (k // g, qweight_t.shape[1]):
        raise ValueError(
            f"w4a16_linear: scale_t {tuple(scale_t.shape)} does not fit qweight_t {tuple(qweight_t.shape)}"
        )
    return g


def w4a16_dequantize(
    qweight_t: torch.Tensor, scale_t: torch.Tensor, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """The ``[N, K]`` weight the kernel multiplies by (``formats.dequantize_int`` of the checkpoint form)."""
    packed, scale = w4a16_unrepack(qweight_t, scale_t)
    k = packed.shape[1] * 8
    return dequantize_int(unpack_int4(packed, k), scale, group_size_of(qweight_t, scale_t), dtype)


def w4a16_linear(
    x: torch.Tensor,
    qweight_t: torch.Tensor,
    scale_t: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    group_size: int | None = None,
    backend: Backend = "auto",
    config=None,
) -> torch.Tensor:
    """``y [..., N] = x [..., K] @ W.T + bias`` with the INT4 weight in the kernel layout
    (``w4a16_repack``). Reference: ``formats.dequantize_int(...)`` in x's dtype, then a GEMM with fp32
    accumulation rounded once (what ``W4A16Linear`` computes on CPU). Kernel: bf16/fp16 activations; ``config`` overrides the tiles."""
    g = _check_w4a16(x, qweight_t, scale_t, group_size)
    ok = x.dtype in (torch.bfloat16, torch.float16)
    if use_triton(x, backend, ok, "w4a16_linear", f"activation dtype {x.dtype}"):
        from quantrl.kernels.w4a16 import w4a16_gemm

        k, n = x.shape[-1], qweight_t.shape[1]
        x2 = x.reshape(-1, k)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        y = w4a16_gemm(x2, qweight_t.contiguous(), scale_t.contiguous(), g, bias, config)
        return y.view(*x.shape[:-1], n)
    return linear_fp32_acc(x, w4a16_dequantize(qweight_t, scale_t, x.dtype), bias)


def nvfp4_dequantize(
    qweight_t: torch.Tensor, scale_t: torch.Tensor, global_scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """The ``[N, K]`` weight the NVFP4 kernel multiplies by (``formats.dequantize_nvfp4`` of the checkpoint form)."""
    packed, scale = nvfp4_unrepack(qweight_t, scale_t)
    return dequantize_nvfp4(unpack_nvfp4(packed), scale, global_scale, dtype)


def nvfp4_linear(
    x: torch.Tensor,
    qweight_t: torch.Tensor,
    scale_t: torch.Tensor,
    global_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    table: torch.Tensor | None = None,
    backend: Backend = "auto",
    config=None,
) -> torch.Tensor:
    """``y [..., N] = x [..., K] @ W.T + bias``, W NVFP4 in the kernel layout (``nvfp4_repack``). Reference:
    ``formats.dequantize_nvfp4`` in x's dtype, then a GEMM with fp32 accumulation rounded once. Kernel:
    bf16/fp16 activations; ``table`` is the layer's ``nvfp4_decode_table(global_scale)`` (computed when not
    given; a layer keeps its own, refilled per load, so the forward has no host sync)."""
    check_float_tensor(x, what="nvfp4_linear")
    k = qweight_t.shape[0] * 8 if qweight_t.ndim == 2 else -1
    if x.shape[-1] != k:
        raise ValueError(f"nvfp4_linear: x has K={x.shape[-1]} but the weight holds K={k} "
                         f"(qweight_t {qweight_t.dtype} {tuple(qweight_t.shape)})")  # fmt: skip
    check_nvfp4_layout(qweight_t, scale_t, "nvfp4_linear")
    if use_triton(x, backend, x.dtype in (torch.bfloat16, torch.float16), "nvfp4_linear", f"activation dtype {x.dtype}"):
        from quantrl.kernels.w4a16 import nvfp4_gemm

        if table is None:
            table = nvfp4_decode_table(global_scale.to(x.device))
        if table.dtype != torch.int32 or table.shape != (2, 256, 4) or not table.is_contiguous() \
                or table.data_ptr() % 16 or table.device != x.device:  # the kernel loads 16-byte entries
            raise ValueError(f"nvfp4_linear: table must be a contiguous, 16-byte aligned int32 [2, 256, 4] on "
                             f"{x.device} (nvfp4_decode_table), got {table.dtype} {tuple(table.shape)} on {table.device}")  # fmt: skip
        x2 = x.reshape(-1, k)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        y = nvfp4_gemm(x2, qweight_t.contiguous(), scale_t.contiguous(), table, bias, config)
        return y.view(*x.shape[:-1], qweight_t.shape[1])
    return linear_fp32_acc(x, nvfp4_dequantize(qweight_t, scale_t, global_scale, x.dtype), bias)


def linear_fp32_acc(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` with a low-precision GEMM's numbers on every device: fp32 accumulation, rounded once to
    x's dtype (the function the kernels compute; ``model``'s Linears all go through it).

    On CUDA that is what cuBLAS does for bf16. On CPU, bf16 GEMMs run natively only where the CPU has
    AVX512-BF16/AMX; elsewhere torch's fallback is ~7x slower than fp32 (measured: 1280x256x768, 115 ms
    vs 15 ms on a 2-core Xeon without AVX-512). An fp32 GEMM of the same bf16 values, rounded once, is the
    same function (up to summation order), so the CPU always takes it.
    """
    if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16):
        return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)
    return F.linear(x, weight, bias)


# ------------------------------------------------------------------------------------------------------
# Decode attention
# ------------------------------------------------------------------------------------------------------
# (device type, index, q dtype, cache dtype, G, D, Dv, sliding, rope dims) -> the kernel agreed with the reference
_ATTN_OK: dict[tuple, bool] = {}
ATTN_PROBE_RTOL = 2e-2  # both are fp32 softmax sums of bf16 products; they differ by the rounding of p and V


def decode_attention_reference(q, k, v, lens, scale: float, k_scale=None, v_scale=None, window: int | None = None,
                               k_rope=None, rope_scale=None, attn_mask=None) -> torch.Tensor:  # fmt: skip
    """The engine's decode attention before the kernel, as the kernel's oracle: an FP8 cache dequantized to
    q's dtype (``formats.dequantize_fp8_static``), then SDPA with keys [max(0, len - window), len) per row;
    latent attention's keys are [k, k_rope]. ``attn_mask`` [B, 1, 1, L]: that mask, already built (the
    decoder makes one per step for all its layers)."""
    if k.dtype == FP8_DTYPE:
        k, v = dequantize_fp8_static(k, k_scale, q.dtype), dequantize_fp8_static(v, v_scale, q.dtype)
        if k_rope is not None:
            k_rope = dequantize_fp8_static(k_rope, rope_scale, q.dtype)
    if k_rope is not None:
        k = torch.cat([k, k_rope], dim=-1)
    if attn_mask is None:
        j = torch.arange(k.shape[2], device=q.device)
        mask = j[None, :] < lens[:, None]  # [B, L]
        if window is not None:
            mask &= j[None, :] >= lens[:, None] - window
        attn_mask = mask[:, None, None]
    out = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=attn_mask, scale=scale,
                                         enable_gqa=q.shape[1] != k.shape[1])  # fmt: skip
    return out[:, :, 0]


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lens: torch.Tensor,
    *,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    window: int | None = None,
    k_rope: torch.Tensor | None = None,
    rope_scale: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """One query token per row over a KV cache: q [B, Hq, D], k [B, Hkv, L, D], v [B, Hkv, L, Dv] (model
    dtype, or ``float8_e4m3fn`` codes with fp32 ``k_scale`` / ``v_scale``), lens [B] (keys [0, len) are
    real, len >= 1; ``window``: only the last ``window`` of them) -> [B, Hq, Dv] in q's dtype. Latent
    attention (DeepSeek's absorbed decode): ``k_rope`` [B, Hkv, L, Dr] are the keys' last Dr dims (q is
    [B, Hq, D + Dr]; FP8 scale ``rope_scale``), and ``v`` may be ``k`` itself. ``attn_mask``: the same
    keys as a bool [B, 1, 1, L] mask, when the caller has it (the reference then does not rebuild it).

    ``"auto"`` on CUDA runs the Triton kernel (``kernels.decode_attention``: reads only each row's keys,
    FP8 codes as stored), checked once per configuration against the reference and dropped, with a
    warning, if it disagrees or fails; not checked under CUDA-graph capture (no host syncs there: the
    engine's warm-up steps run first)."""
    dr = 0 if k_rope is None else k_rope.shape[-1]
    if q.ndim != 3 or k.ndim != 4 or v.ndim != 4 or k.shape[:3] != v.shape[:3] or k.shape[0] != q.shape[0] \
            or k.shape[-1] + dr != q.shape[-1] or lens.shape != (q.shape[0],) \
            or (k_rope is not None and k_rope.shape[:3] != k.shape[:3]):  # fmt: skip
        rope = "" if k_rope is None else f", k_rope {tuple(k_rope.shape)}"
        raise ValueError(f"decode_attention: expected q [B, Hq, D], k [B, Hkv, L, D], v [B, Hkv, L, Dv], lens [B]; "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}, {tuple(lens.shape)}{rope}")  # fmt: skip
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"decode_attention: {q.shape[1]} query heads do not group over {k.shape[1]} KV heads")
    ok = False
    if HAVE_TRITON:
        from quantrl.kernels.decode_attention import supported

        ok = supported(q, k, v, k_rope)
    args = (q, k, v, lens, scale, k_scale, v_scale, window, k_rope, rope_scale)
    why = f"q {q.dtype}, cache {k.dtype}, head dims {q.shape[-1]}/{v.shape[-1]}"
    if not use_triton(q, backend, ok, "decode_attention", why):
        return decode_attention_reference(*args, attn_mask)
    from quantrl.kernels.decode_attention import decode_attention_triton

    key = (q.device.type, q.device.index, q.dtype, k.dtype, q.shape[1] // k.shape[1], q.shape[-1], v.shape[-1],
           window is not None, dr)  # fmt: skip
    if backend == "triton" or _ATTN_OK.get(key):
        return decode_attention_triton(*args)
    if key in _ATTN_OK or (q.is_cuda and torch.cuda.is_current_stream_capturing()):
        return decode_attention_reference(*args)
    ref = decode_attention_reference(*args)
    try:
        out = decode_attention_triton(*args)
        err = float((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))
        _ATTN_OK[key], why = err <= ATTN_PROBE_RTOL, f"relative error {err:.2e} against the reference"
    except (RuntimeError, ValueError) as e:  # a Triton compile / launch failure
        _ATTN_OK[key], why = False, str(e).splitlines()[0] if str(e) else type(e).__name__
    if not _ATTN_OK[key]:
        warnings.warn(f"decode attention kernel disabled for q {q.dtype}, cache {k.dtype}, {key[4]} query heads per KV "
                      f"head, head dims {key[5]}/{key[6]} ({why}); using dequantize + SDPA", stacklevel=2)  # fmt: skip
        return ref
    return out
