"""Linear variants: one interface, four storage formats, numerics from ``quantrl.formats``.

    Bf16Linear      ``weight`` in the model dtype (bf16, or fp32 in parity tests); also what training uses
    Fp8Linear       ``weight`` fp8 e4m3 + ``weight_scale_inv`` / ``weight_scale`` fp32 (block / channel / tensor),
                    W8A8 with dynamic per-token activation scales (1×128 groups for blocks); MXFP8 is its
                    1×32-block ue8m0 case, with the scales stored as E8M0 bytes (uint8)
    W4A16Linear     ``weight_packed`` int32 + ``weight_scale`` + ``weight_shape`` (compressed-tensors
                    pack-quantized, INT4 or INT8), activations stay in the model dtype
    Nvfp4Linear     ``weight_packed`` uint8 + e4m3 ``weight_scale`` + fp32 ``weight_global_scale``
                    (compressed-tensors nvfp4-pack-quantized), activations stay in the model dtype

Tensors are stored under their checkpoint names and shapes, so a checkpoint loads, and a trainer's
update arrives, by name. The interface the engine relies on:
    specs()                          suffix -> WeightSpec (shape, dtype, optional): what an update must give
    load_(tensors)                   copy a complete set in place (addresses never change: CUDA graphs stay valid)
    dequantized_weight(dtype)        the [N, K] weight this layer computes with, as the engine sees it
    restore_weights_before_loading() / post_process_weights()
                                     bracket every load: undo / redo any kernel-specific layout

CPU paths compute with exactly the quantized numbers (dequantize through ``formats``, then an ordinary
matmul), so they are the oracle for the GPU paths.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from quantrl.formats import (
    FP8_DTYPE,
    decode_e8m0,
    dequantize_fp8,
    dequantize_fp8_activation,
    dequantize_int,
    dequantize_nvfp4,
    quantize_fp8,
    quantize_fp8_activation,
    unpack_int,
    unpack_nvfp4,
)
from quantrl.formats._checks import cdiv
from quantrl.kernels import (
    fp8_block_linear,
    nvfp4_decode_table,
    nvfp4_linear,
    nvfp4_repack,
    triton_available,
    w4a16_linear,
    w4a16_repack,
)
from quantrl.kernels import linear_fp32_acc as linear
from quantrl.kernels.dispatch import PROBE_RTOL as SCALED_MM_PROBE_RTOL
from quantrl.model import fp8_gemm
from quantrl.model.quant_scheme import QuantScheme


def _capturing(x: torch.Tensor) -> bool:
    """Inside CUDA-graph capture (host syncs are illegal there)? Never on CPU (CPU builds cannot even ask)."""
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def _refill(old: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    """``new``'s values in ``old``'s memory when the two match (captured CUDA graphs keep their addresses)."""
    if old is not None and old.shape == new.shape and old.dtype == new.dtype:
        return old.copy_(new)
    return new


@dataclass(frozen=True)
class WeightSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype
    optional: bool = False
    e8m0: bool = False
    "uint8 E8M0 scale exponents (MX formats), where byte 255 is NaN"


class QLinear(nn.Module):
    """Base class: the bias (always high precision) and the load/restore/post-process protocol."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = dtype
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    def specs(self) -> dict[str, WeightSpec]:
        raise NotImplementedError

    def load_(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy already-validated tensors (suffix -> tensor) into this layer's storage, in place."""
        with torch.no_grad():
            for suffix, t in tensors.items():
                getattr(self, suffix).copy_(t)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        raise NotImplementedError

    def restore_weights_before_loading(self) -> None:
        """Bring storage back to checkpoint layout before a load (no kernel layout yet: nothing to undo)."""

    def post_process_weights(self) -> None:
        """Derive any kernel-specific layout from freshly loaded checkpoint-layout tensors."""

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Bf16Linear(QLinear):
    """Plain high-precision Linear (``weight`` is a trainable Parameter, as the trainer needs)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str = "cpu"):  # fmt: skip
        super().__init__(in_features, out_features, bias, dtype, device)
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=dtype, device=device))

    def specs(self) -> dict[str, WeightSpec]:
        return {"weight": WeightSpec((self.out_features, self.in_features), self.weight.dtype)}

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.weight.detach().to(dtype or self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class Fp8Linear(QLinear):
    """W8A8 FP8: e4m3 weights with fp32 scales, activations quantized per call (dynamic).

    Activation groups follow the scheme: 1×``act_group`` per token for block weights (the blockwise
    recipe), one scale per token for channel weights, one per call for tensor weights.
    CPU (and any shape cuBLAS cannot take): q_x, s_x = formats.quantize_fp8_activation(x); the output is
    fp32(dequant(q_x, s_x)) @ fp32(dequant(q_w, s_w)).T rounded once to x's dtype.
    CUDA (SM89+): ``torch._scaled_mm`` on the same fp8 operands and scales (see ``fp8_gemm``); the
    128x128-block recipe goes through ``kernels.fp8_block_linear`` (Triton activation quantization, then
    blockwise ``_scaled_mm`` or the Triton block GEMM, which also takes ragged shapes). Either way the first
    CUDA call is compared with the reference, and a disagreeing fast path is warned about and never used.
    MXFP8 (uint8 E8M0 scales, 1×32 blocks) always takes the reference path: Hopper has no MX GEMM.
    """

    fast_path_enabled = True  # class switch (benchmarks / debugging)
    kernel_backend = "auto"  # "triton": the Triton path on CPU tensors too (Triton's interpreter, for tests)

    def __init__(self, in_features: int, out_features: int, bias: bool, scheme: QuantScheme,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu"):  # fmt: skip
        super().__init__(in_features, out_features, bias, dtype, device)
        self.strategy, self.block_size = scheme.fp8_strategy, tuple(scheme.block_size)
        self.act_strategy, self.act_group, self.scale_fmt = scheme.act_strategy, scheme.act_group, scheme.scale_fmt
        self.scale_name = scheme.scale_suffix
        n, k = out_features, in_features
        if self.strategy == "block":
            sshape: tuple[int, ...] = (cdiv(n, self.block_size[0]), cdiv(k, self.block_size[1]))
        else:
            sshape = (n, 1) if self.strategy == "channel" else (1,)
        self.register_buffer("weight", torch.zeros(n, k, dtype=FP8_DTYPE, device=device))
        self.register_buffer(self.scale_name, torch.ones(sshape, dtype=scheme.scale_dtype, device=device))
        self._fast: bool | None = None  # None: not yet compared against the reference on this device
        recipe = (self.strategy, self.block_size, self.act_strategy, self.act_group, self.scale_fmt)
        self._blockwise_recipe = recipe == ("block", (128, 128), "group", 128, None)  # what the kernels take
        self._e8m0 = scheme.scale_dtype == torch.uint8  # MXFP8: scales stored as E8M0 bytes
        self._decoded_scale: torch.Tensor | None = None  # MXFP8: fp32 scales, decoded once per load, kept in place
        self._decoded_valid = False

    @property
    def weight_scale_tensor(self) -> torch.Tensor:
        return getattr(self, self.scale_name)

    def specs(self) -> dict[str, WeightSpec]:
        s = self.weight_scale_tensor
        return {
            "weight": WeightSpec(tuple(self.weight.shape), FP8_DTYPE),
            self.scale_name: WeightSpec(tuple(s.shape), s.dtype, e8m0=self._e8m0),
        }

    def weight_scale_fp32(self) -> torch.Tensor:
        s = self.weight_scale_tensor
        if not self._e8m0:
            return s.float()
        # decoding checks for E8M0's NaN code (a host sync): done at post-process, never inside a CUDA graph
        return self._decoded_scale if self._decoded_valid else decode_e8m0(s)

    def restore_weights_before_loading(self) -> None:
        self._decoded_valid = False

    def post_process_weights(self) -> None:
        if self._e8m0:  # refilled in place: captured graphs keep reading it
            self._decoded_scale = _refill(self._decoded_scale, decode_e8m0(self.weight_scale_tensor))
            self._decoded_valid = True

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        bs = self.block_size if self.strategy == "block" else None
        return dequantize_fp8(self.weight, self.weight_scale_fp32(), bs, dtype or self.compute_dtype)

    def quantize_dequantize_input(self, x2d: torch.Tensor) -> torch.Tensor:
        """[M, K] -> fp32 [M, K]: the activation values the FP8 GEMM multiplies (reference arithmetic).

        CPU: ``formats`` itself. CUDA: the sync-free twin (bit-identical, see ``fp8_gemm``), so that this
        path can also run inside a CUDA graph.
        """
        group = self.act_group if self.act_strategy == "group" else x2d.shape[1]
        if x2d.is_cuda:
            q, s = fp8_gemm.quantize_act_graph_safe(x2d, self.act_strategy, group, self.scale_fmt)
        elif self.act_strategy == "tensor":
            q, s = quantize_fp8(x2d, "tensor", scale_fmt=self.scale_fmt)
        else:
            q, s = quantize_fp8_activation(x2d, group, self.scale_fmt)
        if self.act_strategy == "tensor":
            return dequantize_fp8(q, s, dtype=torch.float32)
        return dequantize_fp8_activation(q, s, group, dtype=torch.float32)

    def reference_forward(self, x2d: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.float()
        y = F.linear(self.quantize_dequantize_input(x2d), self.dequantized_weight(torch.float32), bias)
        return y.to(x2d.dtype)

    def _kernel_path(self, x2d: torch.Tensor) -> bool:
        """128x128 blocks with 1x128 activations go through ``kernels.fp8_block_linear``: Triton activation
        quantization, then blockwise ``torch._scaled_mm`` or, where cuBLAS refuses (or for ragged shapes),
        the Triton block-scaled GEMM."""
        on_device = x2d.is_cuda or self.kernel_backend == "triton"
        return self._blockwise_recipe and on_device and triton_available()

    def _fast_forward(self, x2d: torch.Tensor) -> torch.Tensor:
        if self._kernel_path(x2d):
            backend = "triton" if self.kernel_backend == "triton" else "auto"
            return fp8_block_linear(x2d, self.weight, self.weight_scale_tensor, self.bias, backend=backend, check=False)
        return fp8_gemm.scaled_mm(x2d, self.weight, self.weight_scale_tensor, self.strategy, self.act_strategy,
                                  self.act_group, self.scale_fmt, self.bias)  # fmt: skip

    def _fast_usable(self, x2d: torch.Tensor) -> bool:
        if not (self.fast_path_enabled and self._fast is not False) or self._e8m0:
            return False
        if self._kernel_path(x2d):
            return True
        if not x2d.is_cuda:
            return False
        shape_ok = fp8_gemm.fast_path_supported(
            self.strategy, self.act_strategy, self.out_features, self.in_features, self.block_size, self.act_group
        )
        if not (shape_ok and fp8_gemm.device_supports_fp8(x2d.device)):
            self._fast = False
            return False
        return True

    def _probe(self, x2d: torch.Tensor) -> torch.Tensor:
        """First CUDA call: run both paths, keep the fast one only if it agrees with the reference, and
        answer with the path that will answer every later call (the same input gives the same output)."""
        ref = self.reference_forward(x2d)
        try:
            fast = self._fast_forward(x2d)
            err = _rel_err(fast, ref)
            ok = err <= SCALED_MM_PROBE_RTOL
            why = f"relative error {err:.2e} against the reference"
        except (RuntimeError, ValueError, NotImplementedError) as e:  # no blockwise cuBLAS, unsupported M, ...
            ok, why = False, str(e).splitlines()[0]
        self._fast = ok
        if not ok:
            warnings.warn(
                f"Fp8Linear [{self.out_features}x{self.in_features}]: torch._scaled_mm fast path disabled ({why}); "
                "using the dequantize + fp32 matmul reference path",
                stacklevel=3,
            )
        return fast if ok else ref

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, self.in_features)  # [..., K] -> [M, K]
        if not self._fast_usable(x2d):
            y = self.reference_forward(x2d)
        elif self._fast and _capturing(x2d):
            y = self._fast_forward(x2d)
        elif self._fast:
            try:
                y = self._fast_forward(x2d)
            except (RuntimeError, ValueError, NotImplementedError) as e:  # a row count cuBLAS rejects: fall back
                self._fast = False
                warnings.warn(
                    f"Fp8Linear [{self.out_features}x{self.in_features}]: torch._scaled_mm failed for "
                    f"{x2d.shape[0]} rows ({str(e).splitlines()[0]}); using the reference path",
                    stacklevel=2,
                )
                y = self.reference_forward(x2d)
        elif _capturing(x2d):  # never probe (host sync) inside a CUDA graph
            y = self.reference_forward(x2d)
        else:
            y = self._probe(x2d)
        return y.view(*x.shape[:-1], self.out_features)


class _DequantCache:
    """A dequantized copy of a packed weight for CUDA paths without a kernel, refilled in place by
    ``_fill_cache`` and invalid from a restore to the next post-process."""

    _cache: torch.Tensor | None = None
    _cache_valid: bool = False

    def _fill_cache(self) -> None:
        with torch.no_grad():
            self._cache = _refill(self._cache, self.dequantized_weight(self.compute_dtype))
        self._cache_valid = True

    def _weight_for(self, x: torch.Tensor) -> torch.Tensor:
        if self._cache_valid and self._cache is not None and self._cache.dtype == x.dtype:
            return self._cache
        return self.dequantized_weight(x.dtype)


class _KernelLinear(_DequantCache, QLinear):
    """A packed weight with a Triton kernel on CUDA (W4A16Linear, Nvfp4Linear share this protocol).

    ``post_process_weights`` derives the kernel's layout (``_kernel_layout``) from the checkpoint-layout
    buffers, which are always kept, so ``restore_weights_before_loading`` only invalidates the derived
    copies and post-process refills them in place (same addresses: captured CUDA graphs keep reading the
    right memory). The kernel's first call is compared with the reference; on disagreement (or without
    Triton, or for what the kernel does not take) the layer falls back to a cached dequantized weight
    (correct, BF16 speed and memory). CPU dequantizes through ``formats`` on every call.
    """

    cache_on_cuda = True  # class switch: False dequantizes per call on CUDA too (when the kernel is off)
    kernel_enabled = True  # class switch: False keeps CUDA on the dequantized-cache path
    kernel_backend = "auto"  # "triton": the kernel on CPU tensors too (Triton's interpreter, for tests)
    PROBE_RTOL = 1e-2  # the kernel's only difference from the reference is fp32 summation order (~1e-3)
    kernel_name = "kernel"  # for messages
    weight_packed: torch.Tensor

    def _init_kernel_state(self) -> None:
        self._kernel_weights: tuple[torch.Tensor, ...] | None = None
        self._kernel_valid = False
        self._kernel_ok: bool | None = None  # None: not yet compared against the reference on this device

    def _kernel_supported(self) -> bool:
        return True

    def _kernel_layout(self) -> tuple[torch.Tensor, ...]:
        """The kernel's tensors, derived from the checkpoint-layout buffers (ValueError: not for the kernel)."""
        raise NotImplementedError

    def _kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def restore_weights_before_loading(self) -> None:
        self._cache_valid = False
        self._kernel_valid = False

    def _wants_kernel(self) -> bool:
        on_device = self.weight_packed.is_cuda or self.kernel_backend == "triton"
        return self.kernel_enabled and self._kernel_ok is not False and self._kernel_supported() and on_device \
            and triton_available()  # fmt: skip

    def _disable_kernel(self, why: str, stacklevel: int) -> None:
        self._kernel_ok = False
        warnings.warn(
            f"{type(self).__name__} [{self.out_features}x{self.in_features}]: {self.kernel_name} kernel disabled "
            f"({why}); using the cached dequantized weight",
            stacklevel=stacklevel + 1,
        )
        if self.cache_on_cuda and self.weight_packed.is_cuda:
            self._fill_cache()

    def post_process_weights(self) -> None:
        if self._wants_kernel():
            try:
                new = self._kernel_layout()
            except ValueError as e:  # a weight the kernel layout cannot take
                self._disable_kernel(str(e), 2)
                return
            old = self._kernel_weights or (None,) * len(new)
            self._kernel_weights = tuple(_refill(o, t) for o, t in zip(old, new, strict=True))
            self._kernel_valid = True
        elif self.cache_on_cuda and self.weight_packed.is_cuda:
            self._fill_cache()

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self._weight_for(x), self.bias)

    def _probe(self, x: torch.Tensor) -> torch.Tensor:
        """First kernel call: keep the kernel only if it agrees with the reference on these activations, and
        on their first row alone: one row takes the gemv path, more rows the mma path (the first call is
        usually a prefill, the calls after it decode steps), so both paths are checked before either runs.
        Answers with the kernel once it is kept."""
        ref = self.reference_forward(x)
        try:
            x2d = x.reshape(-1, x.shape[-1])
            y = self._kernel_forward(x)
            with torch.no_grad():
                err = _rel_err(y.detach(), ref)
                if x2d.shape[0] > 1:  # the reference is row by row: its first row is the one-row answer
                    err = max(err, _rel_err(self._kernel_forward(x2d[:1]), ref.reshape(-1, ref.shape[-1])[:1]))
            ok, why = err <= self.PROBE_RTOL, f"relative error {err:.2e} against the reference"
        except (RuntimeError, ValueError, NotImplementedError) as e:  # a Triton compile / launch failure
            ok, why = False, str(e).splitlines()[0] if str(e) else type(e).__name__
        if not ok:
            self._disable_kernel(why, 3)
            return ref
        self._kernel_ok = True
        return y  # the path every later call takes: the same input gives the same output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        usable = self._kernel_valid and self._kernel_ok is not False and x.dtype in (torch.bfloat16, torch.float16)
        if not usable:
            return self.reference_forward(x)
        if self._kernel_ok:
            return self._kernel_forward(x)
        if _capturing(x):  # never probe (host sync) inside a CUDA graph
            return self.reference_forward(x)
        return self._probe(x)


class W4A16Linear(_KernelLinear):
    """Weight-only group INT4 (or INT8): packed codes + scales, activations in the model dtype.

    CPU: the weight is unpacked and dequantized through ``formats`` (to x's dtype) on every call, then a
    GEMM with fp32 accumulation. CUDA, INT4: ``post_process_weights`` repacks into the W4A16 Triton
    kernel's layout (``kernels.w4a16_repack``: a transpose of the same words and scales), and the kernel
    unpacks on the fly (``_KernelLinear``: first-call check, fallback to a dequantized cache, which is
    also INT8's path).
    """

    kernel_name = "W4A16"

    def __init__(self, in_features: int, out_features: int, bias: bool, scheme: QuantScheme,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu"):  # fmt: skip
        super().__init__(in_features, out_features, bias, dtype, device)
        if in_features % scheme.group_size:
            raise ValueError(
                f"W4A16Linear: in_features={in_features} is not divisible by group_size={scheme.group_size}"
            )
        self.num_bits, self.group_size = scheme.num_bits, scheme.group_size
        n, k = out_features, in_features
        words = cdiv(k * self.num_bits, 32)
        self.register_buffer("weight_packed", torch.zeros(n, words, dtype=torch.int32, device=device))
        groups = k // self.group_size
        self.register_buffer("weight_scale", torch.ones(n, groups, dtype=scheme.scale_dtype, device=device))
        self.register_buffer("weight_shape", torch.tensor([n, k], dtype=torch.int64, device=device))
        self._init_kernel_state()

    def specs(self) -> dict[str, WeightSpec]:
        return {
            "weight_packed": WeightSpec(tuple(self.weight_packed.shape), torch.int32),
            "weight_scale": WeightSpec(tuple(self.weight_scale.shape), self.weight_scale.dtype),
            "weight_shape": WeightSpec((2,), torch.int64, optional=True),
        }

    def codes(self) -> torch.Tensor:
        """int8 codes [N, K] (signed, offset removed)."""
        return unpack_int(self.weight_packed, self.in_features, self.num_bits)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_int(self.codes(), self.weight_scale, self.group_size, dtype or self.compute_dtype)

    def _kernel_supported(self) -> bool:
        return self.num_bits == 4

    def _kernel_layout(self) -> tuple[torch.Tensor, ...]:
        return w4a16_repack(self.weight_packed, self.weight_scale)

    def _kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        q, s = self._kernel_weights
        return w4a16_linear(x, q, s, self.bias, group_size=self.group_size, backend="triton")


class Nvfp4Linear(_KernelLinear):
    """Weight-only NVFP4 (NVFP4A16): packed e2m1 codes, e4m3 group scales and a global scale.

    Hopper has no FP4 tensor cores; CUDA runs the W4A16 kernels with an e2m1 decode (``kernels.nvfp4_linear``:
    4.5 bits per weight read, BF16 tensor cores), on the layout ``post_process_weights`` derives
    (``kernels.nvfp4_repack``: the same words transposed, bits rearranged for the decode; and the layer's
    decode table, formats' weight for each e4m3 scale x e2m1 magnitude), with
    ``_KernelLinear``'s first-call check and dequantized-cache fallback. CPU dequantizes through ``formats``
    on every call (then a GEMM with fp32 accumulation).
    """

    kernel_name = "NVFP4"

    def __init__(self, in_features: int, out_features: int, bias: bool, scheme: QuantScheme,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu"):  # fmt: skip
        super().__init__(in_features, out_features, bias, dtype, device)
        if in_features % 16:
            raise ValueError(f"Nvfp4Linear: in_features={in_features} is not divisible by 16")
        n, k = out_features, in_features
        self.register_buffer("weight_packed", torch.zeros(n, k // 2, dtype=torch.uint8, device=device))
        self.register_buffer("weight_scale", torch.ones(n, k // 16, dtype=torch.float8_e4m3fn, device=device))
        self.register_buffer("weight_global_scale", torch.ones(1, dtype=torch.float32, device=device))
        self._init_kernel_state()

    def specs(self) -> dict[str, WeightSpec]:
        return {name: WeightSpec(tuple(t.shape), t.dtype)
                for name, t in (("weight_packed", self.weight_packed), ("weight_scale", self.weight_scale),
                                ("weight_global_scale", self.weight_global_scale))}  # fmt: skip

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_nvfp4(unpack_nvfp4(self.weight_packed), self.weight_scale, self.weight_global_scale,
                                dtype or self.compute_dtype)  # fmt: skip

    def _kernel_layout(self) -> tuple[torch.Tensor, ...]:
        q, s = nvfp4_repack(self.weight_packed, self.weight_scale)
        return q, s, nvfp4_decode_table(self.weight_global_scale)

    def _kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        q, s, table = self._kernel_weights
        return nvfp4_linear(x, q, s, self.weight_global_scale, self.bias, table=table, backend="triton")


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


def make_linear(name: str, in_features: int, out_features: int, bias: bool, scheme: QuantScheme,
                dtype: torch.dtype, device: torch.device | str) -> QLinear:  # fmt: skip
    """The variant for module ``name`` under ``scheme`` (lm_head and ignored modules stay high precision)."""
    if not scheme.quantizes(name):
        return Bf16Linear(in_features, out_features, bias, dtype, device)
    if scheme.method == "fp8":
        return Fp8Linear(in_features, out_features, bias, scheme, dtype, device)
    if scheme.method == "nvfp4":
        return Nvfp4Linear(in_features, out_features, bias, scheme, dtype, device)
    return W4A16Linear(in_features, out_features, bias, scheme, dtype, device)
