"""Quantization-aware training (INT4, NVFP4, MXFP8): Linear layers whose forward uses fake-quantized weights.

Master weights stay in high precision (bf16/fp32) and receive the straight-through gradient. The forward
weight is ``formats.fake_quantize_int4`` (``fake_quantize_nvfp4``) of the master in the engine's dtype, so
it equals, bit for bit, what the rollout engine dequantizes after a weight sync (``quantize_int4`` +
``pack_int4``; ``quantize_nvfp4`` + ``pack_nvfp4``).

MXFP8 is W8A8: its forward also fake-quantizes the input in 1×32 groups (power-of-two scales), as the
MXFP8 engine quantizes its activations, and the STE carries both gradients. Hopper has no MX GEMM, so this
is MXFP8's forward numerics with BF16 GEMMs and a BF16 backward (real MXFP8 training would quantize the
backward GEMMs' operands too). The dequantized MXFP8 values are exact in bf16 (4 significant bits times a
power of two), so trainer and engine differ only in fp32 summation order.

The fake-quantized weight is computed once per optimizer step, not once per micro-batch: it is cached
against the master's version counter, which every in-place optimizer update bumps. The cached tensor keeps
its STE graph node (which saves no tensors), so every micro-batch's backward reaches the master.

slime's switches are honoured: ``OPEN_TRAINING_INT4_FAKE_QAT_FLAG=1`` turns QAT on and
``OPEN_TRAINING_INT4_GROUP_SIZE`` sets the group size (``slime_env`` reads them for ``QATConfig.from_env``
and for ``quantrl train``'s recipe and ``--group-size``, ``quantrl.rl.recipes.apply_slime_env``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
from torch import nn

from quantrl import kernels
from quantrl.checkpoint.layout import is_quantizable
from quantrl.formats.fp8 import (
    MXFP8_BLOCK,
    MXFP8_SCALE_FMT,
    fake_quantize_fp8,
    fake_quantize_fp8_activation,
    quantize_fp8,
)
from quantrl.formats.int4 import fake_quantize_int4, quantize_int4
from quantrl.formats.nvfp4 import GROUP as NVFP4_GROUP
from quantrl.formats.nvfp4 import fake_quantize_nvfp4, quantize_nvfp4
from quantrl.train.swap import swap_linears

ENV_FLAG = "OPEN_TRAINING_INT4_FAKE_QAT_FLAG"
ENV_GROUP = "OPEN_TRAINING_INT4_GROUP_SIZE"
FORMATS = ("int4", "nvfp4", "mxfp8")


@dataclass(frozen=True)
class QATConfig:
    fmt: str = "int4"
    "int4 (group INT4, the engine's W4A16) | nvfp4 (e2m1 + e4m3 scales per 16 + global scale) | mxfp8 (W8A8, 1x32)"
    group_size: int = 128
    "input channels per INT4 scale (128 for Qwen3/Moonlight, 32 for Kimi-K2)"
    qmax: int = 7
    "7: s = absmax/7, q in [-7, 7] (slime/Kimi); 8: s = absmax/7.5, q in [-8, 7]"
    dtype: torch.dtype = torch.bfloat16
    "dtype of the fake-quantized weight and of the scales: the rollout engine's"
    targets: tuple[str, ...] = ()
    "regexes of module names to quantize (empty: every quantizable Linear)"
    exclude: tuple[str, ...] = ()
    "regexes of module names to leave alone (on top of embeddings, lm_head, norms, routers)"

    def __post_init__(self) -> None:
        if self.fmt not in FORMATS:
            raise ValueError(f"QAT format must be one of {FORMATS}, got {self.fmt!r}")
        if self.fmt != "int4":  # fixed by the format
            object.__setattr__(self, "group_size", NVFP4_GROUP if self.fmt == "nvfp4" else MXFP8_BLOCK[1])

    @classmethod
    def from_env(cls, **overrides) -> QATConfig | None:
        """The config slime's environment variables ask for, or None when QAT is off."""
        on, group = slime_env()
        if not on:
            return None
        if group is not None:
            overrides.setdefault("group_size", group)
        return cls(**overrides)


def slime_env() -> tuple[bool | None, int | None]:
    """(``OPEN_TRAINING_INT4_FAKE_QAT_FLAG`` as a bool, ``OPEN_TRAINING_INT4_GROUP_SIZE``), each None when
    unset; ``ValueError`` for a value that is neither."""
    flag = os.environ.get(ENV_FLAG, "").strip().lower()
    group = os.environ.get(ENV_GROUP, "").strip()
    if flag and flag not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        raise ValueError(f"{ENV_FLAG}={flag!r}: expected 1 or 0")
    if group and not (group.isdigit() and int(group) > 0):
        raise ValueError(f"{ENV_GROUP}={group!r}: expected a positive group size, e.g. 128 or 32")
    return (flag in ("1", "true", "yes", "on") if flag else None), (int(group) if group else None)


def fake_quantize(w: torch.Tensor, cfg: QATConfig) -> torch.Tensor:
    """The QAT forward weight (scales in cfg.dtype, STE): the fused kernel on CUDA for bf16, formats otherwise."""
    if cfg.fmt == "nvfp4":
        return fake_quantize_nvfp4(w, cfg.dtype)
    if cfg.fmt == "mxfp8":
        return fake_quantize_fp8(w, "block", MXFP8_BLOCK, MXFP8_SCALE_FMT, dtype=cfg.dtype)
    if cfg.dtype == torch.bfloat16:
        return kernels.fake_quantize_int4(w, cfg.group_size, cfg.qmax, cfg.dtype)
    return fake_quantize_int4(w, cfg.group_size, cfg.qmax, scale_dtype=cfg.dtype, dtype=cfg.dtype)


class QATLinear(nn.Linear):
    """``nn.Linear`` with a fake-quantized (INT4, NVFP4, MXFP8) forward weight; same parameters and state-dict names."""

    def __init__(self, in_features: int, out_features: int, bias: bool, cfg: QATConfig, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if in_features % cfg.group_size:
            raise ValueError(f"QATLinear: in_features={in_features} is not divisible by group_size={cfg.group_size}")
        self.cfg = cfg
        self._cache: tuple[tuple, torch.Tensor] | None = None

    @classmethod
    def from_linear(cls, lin: nn.Linear, cfg: QATConfig) -> QATLinear:
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = lin.in_features, lin.out_features
        new.weight, new.bias = lin.weight, lin.bias  # share the master parameters (optimizer state stays valid)
        if lin.in_features % cfg.group_size:
            raise ValueError(f"QATLinear: in_features={lin.in_features} is not divisible by group_size={cfg.group_size}")
        new.cfg = cfg
        new._cache = None
        return new

    def __getstate__(self) -> dict:
        # the cached weight is a graph node (no deepcopy or pickle of it): a copy recomputes its own
        return {**super().__getstate__(), "_cache": None}

    def fake_quantized_weight(self) -> torch.Tensor:
        grad = torch.is_grad_enabled() and self.weight.requires_grad
        key = (self.weight._version, self.weight.data_ptr(), grad)
        if self._cache is None or self._cache[0] != key:
            w = fake_quantize(self.weight, self.cfg)
            self._cache = (key, w)
        return self._cache[1]

    def quantized(self) -> tuple[torch.Tensor, ...]:
        """What the engine receives at weight sync: INT4 (q int8 [N, K], scale [N, K/G]); NVFP4 (codes uint8
        [N, K], e4m3 scale [N, K/16], global scale [1]); MXFP8 (q e4m3 [N, K], power-of-two scale fp32 [N, K/32])."""
        with torch.no_grad():
            if self.cfg.fmt == "nvfp4":
                return quantize_nvfp4(self.weight)
            if self.cfg.fmt == "mxfp8":
                return quantize_fp8(self.weight, "block", MXFP8_BLOCK, MXFP8_SCALE_FMT)
            return quantize_int4(self.weight, self.cfg.group_size, self.cfg.qmax, scale_dtype=self.cfg.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.fake_quantized_weight()
        bias = None if self.bias is None else self.bias.to(w.dtype)
        x = x.to(w.dtype)
        if self.cfg.fmt == "mxfp8":  # the engine's dynamic 1x32 activation quantization
            x = fake_quantize_fp8_activation(x, MXFP8_BLOCK[1], MXFP8_SCALE_FMT)
        return kernels.linear_fp32_acc(x, w, bias)

    def extra_repr(self) -> str:
        if self.cfg.fmt != "int4":
            return f"{super().extra_repr()}, {self.cfg.fmt}"
        return f"{super().extra_repr()}, int4 g{self.cfg.group_size} qmax={self.cfg.qmax}"


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(re.search(p, name) for p in patterns)


def prepare_qat(model: nn.Module, cfg: QATConfig) -> list[str]:
    """Swap every eligible ``nn.Linear`` of ``model`` for a ``QATLinear`` in place; returns their names.

    Eligible: a plain Linear (``nn.Linear`` or the decoder's ``Bf16Linear``) that ``checkpoint.layout``
    would quantize (not embeddings, lm_head, norms, MoE routers), matching ``cfg.targets`` (if given) and
    not ``cfg.exclude``. A targeted Linear whose input
    size does not divide the group size is an error, not a silent skip.
    """

    def make(name: str, module: nn.Module) -> QATLinear | None:
        if not is_quantizable(f"{name}.weight", tuple(module.weight.shape)):
            return None
        if (cfg.targets and not _matches(name, cfg.targets)) or _matches(name, cfg.exclude):
            return None
        return QATLinear.from_linear(module, cfg)

    swapped = swap_linears(model, make)
    if not swapped:
        raise ValueError("prepare_qat: no Linear layer matched (check targets/exclude)")
    return swapped


def qat_modules(model: nn.Module) -> dict[str, QATLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QATLinear)}
