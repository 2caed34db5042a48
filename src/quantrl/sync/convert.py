"""Trainer parameters -> the rollout engine's tensors, through the very same ``quantrl.formats`` functions.

The trainer holds HF-named high-precision parameters (bf16, or fp32 masters); the engine holds each
Linear in its own format. ``engine_tensors`` maps one to the other, tensor by tensor (lazily, so callers
can bound how much is converted at a time):

    engine            trainer ``<m>.weight`` of a Linear the engine quantizes      everything else
    none (BF16)       ``<m>.weight`` = w.to(dtype)                                  t.to(dtype)
    fp8               ``quantize_fp8(w, strategy, block_size, scale_fmt)``          t.to(dtype)
                      -> ``<m>.weight`` (e4m3) + ``<m>.weight_scale_inv`` | ``<m>.weight_scale``
                         (MXFP8: 1×32 blocks, ue8m0, scales as E8M0 bytes, ``encode_e8m0``)
    int (W4A16/W8A16) ``quantize_int(w, num_bits, group_size, qmax, scale_dtype)``  t.to(dtype)
                      -> ``<m>.weight_packed`` (``pack_int``) + ``<m>.weight_scale`` + ``<m>.weight_shape``
    nvfp4 (NVFP4A16)  ``quantize_nvfp4(w)``                                        t.to(dtype)
                      -> ``<m>.weight_packed`` (``pack_nvfp4``) + ``<m>.weight_scale`` (e4m3)
                         + ``<m>.weight_global_scale``

"Everything else" is embeddings, ``lm_head``, norms, biases and any Linear the engine keeps in high
precision. Which Linears are quantized is the engine's decision, recorded in ``SyncTarget.modules``
(``SyncTarget.for_engine`` reads it off the engine's modules); never the trainer's.

Bit-exactness. The weight is quantized as the trainer holds it (an fp32 master is *not* rounded to bf16
first), which is what the trainer's own quantized forward does: ``QATLinear`` fake-quantizes its master
with ``fake_quantize_int4(master, G, qmax, scale_dtype=dtype, dtype=dtype)`` (NVFP4 QAT with
``fake_quantize_nvfp4(master, dtype)``) and ``Fp8BlockTrainLinear``
runs on ``quantize_fp8(master, "block", (128, 128))``. The ``formats`` invariant
``dequant(real_quant(w)) == fake_quant(w)`` then makes the engine compute with exactly the trainer's
forward weights. ``check_compatible`` refuses a trainer whose quantized forward does not match the
engine's format (QAT group size, qmax or dtype; FP8 training into a non-block engine), because such a
sync would succeed and silently hand the engine other weights than the ones the trainer trained.

``qmax`` is not recorded in an engine (a packed INT4 checkpoint does not say whether it used absmax/7 or
absmax/7.5); ``SyncTarget.for_engine`` takes it as an argument, and ``trainer_qmax`` reads it from the
trainer's QAT config when QAT is on (7, slime's convention, otherwise).

Tied embeddings. Parameters come from ``named_parameters()`` (deduplicated), so a tied ``lm_head.weight``
is never sent; the engine's tied ``lm_head`` is the embedding it receives.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from quantrl import kernels
from quantrl.checkpoint.layout import is_quantizable
from quantrl.formats import FP8_DTYPE, encode_e8m0, pack_int, pack_nvfp4, quantize_fp8, quantize_int, quantize_nvfp4
from quantrl.formats.fp8 import MXFP8_BLOCK, MXFP8_SCALE_FMT
from quantrl.formats.int4 import int_range
from quantrl.model.linear import Fp8Linear, Nvfp4Linear, W4A16Linear
from quantrl.model.moe import KEEP_FP32
from quantrl.model.quant_scheme import QuantScheme
from quantrl.model.state import linear_modules, tensor_index
from quantrl.train.fp8_linear import BLOCK as FP8_TRAIN_BLOCK
from quantrl.train.fp8_linear import Fp8BlockTrainLinear
from quantrl.train.qat import QATLinear

METHODS = ("none", "fp8", "int", "nvfp4")
FP8_STRATEGIES = ("block", "channel", "tensor")


class SyncError(ValueError):
    """A weight sync that cannot produce the engine's weights (raised before the engine is touched)."""


@dataclass(frozen=True)
class SyncTarget:
    """The engine's weight format: what ``engine_tensors`` must produce."""

    method: str = "none"
    "none (high precision) | fp8 (e4m3 + fp32 scales) | int (packed INT4/INT8 + scales) | nvfp4 (e2m1 + e4m3 scales)"
    dtype: torch.dtype = torch.bfloat16
    "the engine's model dtype: non-quantized tensors are cast to it, quantized Linears dequantize to it"
    strategy: str = "block"
    "fp8: weight scale granularity, block | channel | tensor"
    block_size: tuple[int, int] = (128, 128)
    "fp8 block strategy: weight tile (rows, cols)"
    scale_fmt: str | None = None
    "fp8: None or ue8m0 (power-of-two scales)"
    scale_name: str = "weight_scale_inv"
    "fp8: name of the scale tensor, weight_scale_inv (quant_method fp8) or weight_scale (compressed-tensors)"
    num_bits: int = 4
    "int: 4 or 8"
    group_size: int = 128
    "int: input channels per scale"
    qmax: int = 7
    "int: 7 (absmax/7, [-7, 7], slime/QAT) or 8 (absmax/7.5, [-8, 7], GPTQ); not recorded in the engine"
    scale_dtype: torch.dtype | None = None
    "dtype of the engine's scale tensors (None: fp32 for fp8, bf16 for int, e4m3 for nvfp4; uint8: MXFP8's E8M0)"
    modules: frozenset[str] | None = None
    "Linear modules the engine holds quantized (None: every quantizable Linear weight, minus ``ignore``)"
    ignore: tuple[str, ...] = ()
    "with ``modules=None``: modules kept in high precision (QuantScheme.ignore patterns)"
    ignore_rule: str = "quantrl"
    "how ``ignore`` entries match (QuantScheme.ignore_rule)"
    fp32_names: frozenset[str] = frozenset()
    "tensors the engine keeps in fp32 whatever its dtype (DeepSeek-V3's router: ``KEEP_FP32``), sent as fp32"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"SyncTarget.method must be one of {METHODS}, got {self.method!r}")
        if self.method == "fp8" and self.strategy not in FP8_STRATEGIES:
            raise ValueError(f"SyncTarget.strategy must be one of {FP8_STRATEGIES}, got {self.strategy!r}")
        if self.method == "fp8" and self.scale_fmt not in (None, "ue8m0"):
            raise ValueError(f"SyncTarget.scale_fmt must be None or 'ue8m0', got {self.scale_fmt!r}")
        if self.method == "fp8" and self.scale_dtype == torch.uint8 and self.scale_fmt != "ue8m0":
            raise ValueError("SyncTarget: E8M0 (uint8) fp8 scales need scale_fmt='ue8m0'")
        if self.method == "int":
            if self.num_bits not in (4, 8):
                raise ValueError(f"SyncTarget.num_bits must be 4 or 8, got {self.num_bits}")
            int_range(self.num_bits, self.qmax)  # raises for a qmax that fits neither convention
            if self.group_size <= 0:
                raise ValueError(f"SyncTarget.group_size must be positive, got {self.group_size}")
        object.__setattr__(self, "block_size", (int(self.block_size[0]), int(self.block_size[1])))
        if self.method == "nvfp4":
            if self.scale_dtype not in (None, torch.float8_e4m3fn):
                raise ValueError(f"SyncTarget: nvfp4 scales are float8_e4m3fn, got {self.scale_dtype}")
            object.__setattr__(self, "group_size", 16)
            object.__setattr__(self, "scale_dtype", torch.float8_e4m3fn)
        if self.scale_dtype is None:
            object.__setattr__(self, "scale_dtype", torch.float32 if self.method == "fp8" else torch.bfloat16)
        if self.modules is not None:
            object.__setattr__(self, "modules", frozenset(self.modules))

    # ---- construction -----------------------------------------------------------------------------
    @classmethod
    def for_engine(cls, engine, qmax: int = 7) -> SyncTarget:
        """The format of ``engine`` (an ``Engine``, or its ``Decoder``), read off its Linear modules.

        ``qmax`` (INT engines only) is not recorded in the engine: pass the trainer's (``trainer_qmax``).
        Every quantized Linear must share one format (a mixed-format engine is refused).
        """
        model = engine if isinstance(engine, nn.Module) else engine.model
        dtype = getattr(model, "dtype", None)
        if not isinstance(dtype, torch.dtype):
            dtype = next(model.parameters()).dtype
        fp32 = frozenset(n for n, p in model.named_parameters() if getattr(p, KEEP_FP32, False))
        kinds = (Fp8Linear, W4A16Linear, Nvfp4Linear)
        quantized = {n: m for n, m in linear_modules(model).items() if isinstance(m, kinds)}
        scheme = getattr(model, "scheme", None)
        # expert parallelism: the other ranks' experts travel in the update too, in this rank's format
        foreign = frozenset(f"{e}.{p}" for e in (model.foreign_experts() if hasattr(model, "foreign_experts") else ())
                            for p in ("gate_proj", "up_proj", "down_proj") if scheme.quantizes(f"{e}.{p}"))  # fmt: skip
        if not quantized:
            return cls(method="none", dtype=dtype, modules=frozenset(), fp32_names=fp32)
        formats = {}
        for name, m in quantized.items():
            if isinstance(m, Fp8Linear):
                fmt = dict(method="fp8", strategy=m.strategy, block_size=tuple(m.block_size), scale_fmt=m.scale_fmt,
                           scale_name=m.scale_name, scale_dtype=m.weight_scale_tensor.dtype)  # fmt: skip
            elif isinstance(m, Nvfp4Linear):
                fmt = dict(method="nvfp4")
            else:
                fmt = dict(method="int", num_bits=m.num_bits, group_size=m.group_size, scale_dtype=m.weight_scale.dtype)
            formats.setdefault(tuple(sorted(fmt.items(), key=lambda kv: kv[0])), []).append(name)
        if len(formats) > 1:
            listed = "; ".join(f"{dict(k)} for {v[:2]}{'...' if len(v) > 2 else ''}" for k, v in formats.items())
            raise SyncError(f"SyncTarget.for_engine: the engine's Linears use {len(formats)} formats ({listed}); "
                            "weight sync supports one quantized format per engine")  # fmt: skip
        (fmt_items,) = formats
        rule = {"ignore": tuple(scheme.ignore), "ignore_rule": scheme.ignore_rule} if isinstance(scheme, QuantScheme) else {}
        extra = {"qmax": qmax} if dict(fmt_items)["method"] == "int" else {}
        return cls(dtype=dtype, modules=frozenset(quantized) | foreign, fp32_names=fp32, **rule, **dict(fmt_items), **extra)

    @classmethod
    def from_scheme(cls, scheme: QuantScheme, dtype: torch.dtype = torch.bfloat16, qmax: int = 7) -> SyncTarget:
        """The format an engine built with ``scheme`` holds, for a trainer process that has no engine at
        hand (``torch.distributed`` sync). Quantized modules follow the rule (``modules=None``)."""
        rule = {"ignore": tuple(scheme.ignore), "ignore_rule": scheme.ignore_rule}
        if scheme.method == "fp8":
            return cls(method="fp8", dtype=dtype, strategy=scheme.fp8_strategy, block_size=tuple(scheme.block_size),
                       scale_fmt=scheme.scale_fmt, scale_name=scheme.scale_suffix, scale_dtype=scheme.scale_dtype,
                       **rule)  # fmt: skip
        if scheme.method == "int":
            return cls(method="int", dtype=dtype, num_bits=scheme.num_bits, group_size=scheme.group_size, qmax=qmax,
                       scale_dtype=scheme.scale_dtype, **rule)  # fmt: skip
        if scheme.method == "nvfp4":
            return cls(method="nvfp4", dtype=dtype, **rule)
        return cls(method="none", dtype=dtype)

    def replace(self, **changes) -> SyncTarget:
        return dataclasses.replace(self, **changes)

    # ---- queries ----------------------------------------------------------------------------------
    def quantizes(self, module: str, weight_shape: tuple[int, ...]) -> bool:
        """Does the engine hold Linear ``module`` (whose weight has ``weight_shape``) quantized?"""
        if self.method == "none" or len(weight_shape) != 2:
            return False
        if self.modules is not None:
            return module in self.modules
        if not is_quantizable(f"{module}.weight", tuple(weight_shape)):
            return False
        return QuantScheme(method=self.method, ignore=self.ignore, ignore_rule=self.ignore_rule).quantizes(module)

    def describe(self) -> str:
        if self.method == "fp8" and self.scale_dtype == torch.uint8:
            return f"mxfp8 (1x{self.block_size[1]} blocks, E8M0 scales)"
        if self.method == "fp8":
            tile = f"{self.block_size[0]}x{self.block_size[1]} blocks" if self.strategy == "block" else self.strategy
            return f"fp8 e4m3 ({tile}, {self.scale_name} {self.scale_dtype}{', ue8m0' if self.scale_fmt else ''})"
        if self.method == "int":
            return f"int{self.num_bits} (group {self.group_size}, qmax {self.qmax}, scale {self.scale_dtype})"
        if self.method == "nvfp4":
            return "nvfp4 (e2m1, e4m3 scales per 16, fp32 global scale)"
        return f"high precision ({self.dtype})"


# ---- the trainer side -------------------------------------------------------------------------------
def trainer_params(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The trainer's HF-named parameters, tied ones once (``named_parameters`` deduplicates)."""
    return [(n, p) for n, p in model.named_parameters()]


def trainer_qmax(model: nn.Module, default: int = 7) -> int:
    """qmax of the trainer's INT4 QAT (all QAT Linears must agree), ``default`` without QAT."""
    found = {m.cfg.qmax for m in model.modules() if isinstance(m, QATLinear) and m.cfg.fmt == "int4"}
    if len(found) > 1:
        raise SyncError(f"trainer: QAT Linears use different qmax values {sorted(found)}")
    return found.pop() if found else default


def check_compatible(model: nn.Module, target: SyncTarget) -> None:
    """Refuse a trainer whose quantized forward differs from what the engine would compute with.

    A ``QATLinear`` needs an engine of its format (INT4 or NVFP4) that quantizes that module, computing in
    the QAT dtype; INT4 also needs the same group size and qmax, and scales in the QAT dtype; an ``Fp8BlockTrainLinear`` needs an FP8 engine
    with 128x128 blocks, plain (non-ue8m0) fp32 scales. Plain Linears sync to any engine format.
    """
    problems: list[str] = []
    for name, m in model.named_modules():
        if isinstance(m, QATLinear):
            c = m.cfg
            fmt, method = c.fmt.upper(), {"int4": "int", "nvfp4": "nvfp4", "mxfp8": "fp8"}[c.fmt]
            if not target.quantizes(name, tuple(m.weight.shape)):
                problems.append(f"{name}: trains with {fmt} QAT but the engine keeps it in high precision")
                continue
            if target.method != method:
                problems.append(f"{name}: trains with {fmt} QAT but the engine holds it as {target.describe()}")
                continue
            want = {"compute dtype": (c.dtype, target.dtype)}
            if c.fmt == "mxfp8":
                want.update({"blocks": (MXFP8_BLOCK, target.block_size), "scale format": (MXFP8_SCALE_FMT, target.scale_fmt),
                             "strategy": ("block", target.strategy)})  # fmt: skip
            if method == "int":
                want.update({"num_bits": (4, target.num_bits), "group_size": (c.group_size, target.group_size),
                             "qmax": (c.qmax, target.qmax), "scale dtype": (c.dtype, target.scale_dtype)})  # fmt: skip
            bad = [f"{k} {a} vs engine {b}" for k, (a, b) in want.items() if a != b]
            if bad:
                problems.append(f"{name}: QAT ({', '.join(bad)})")
        elif isinstance(m, Fp8BlockTrainLinear):
            if not target.quantizes(name, tuple(m.weight.shape)) or target.method != "fp8":
                problems.append(f"{name}: trains with FP8 128x128 blocks but the engine holds it as "
                                f"{target.describe() if target.method != 'fp8' else 'high precision'}")  # fmt: skip
            elif (target.strategy, target.block_size, target.scale_fmt) != ("block", (FP8_TRAIN_BLOCK,) * 2, None):
                problems.append(f"{name}: trains with FP8 128x128 blocks but the engine uses {target.describe()}")
            elif target.scale_dtype != torch.float32:  # rounded scales: other weights than the forward's
                problems.append(f"{name}: trains with fp32 FP8 block scales but the engine holds "
                                f"{target.scale_dtype} ones")  # fmt: skip
    if problems:
        more = f" ... and {len(problems) - 4} more" if len(problems) > 4 else ""
        raise SyncError(
            f"weight sync: the trainer's quantized forward does not match the engine ({target.describe()}); "
            f"the engine would not compute with the trained weights: {'; '.join(problems[:4])}{more}"
        )


def _reuse_fp8(mod: nn.Module | None, target: SyncTarget) -> bool:
    """An FP8 training Linear already holds (or cheaply makes) exactly the engine's (q, scale)."""
    return (
        isinstance(mod, Fp8BlockTrainLinear)
        and (target.strategy, target.block_size, target.scale_fmt) == ("block", (FP8_TRAIN_BLOCK,) * 2, None)
    )


def _convert_linear(name: str, module: str, w: torch.Tensor, target: SyncTarget,
                    mod: nn.Module | None) -> list[tuple[str, torch.Tensor]]:  # fmt: skip
    if target.method == "fp8":
        if _reuse_fp8(mod, target):
            q, s = mod.fp8_weight()  # the cached fp8_param_gather copy: the very numbers the forward used
        elif target.strategy == "block":  # one pass on CUDA (kernels), formats itself elsewhere
            q, s = kernels.quantize_fp8_block(w, target.block_size, target.scale_fmt)
        else:
            q, s = quantize_fp8(w, target.strategy, target.block_size, target.scale_fmt)
        # formats' FP8 scales are fp32; an engine holding other scale dtypes (a checkpoint's choice) gets
        # them rounded, as loading that checkpoint's scales would; MXFP8 ones are E8M0 bytes (exact).
        s = encode_e8m0(s) if target.scale_dtype == torch.uint8 else s.to(target.scale_dtype)
        return [(name, q), (f"{module}.{target.scale_name}", s)]
    if target.method == "nvfp4":
        codes, s, gs = quantize_nvfp4(w)
        return [(f"{module}.weight_packed", pack_nvfp4(codes)), (f"{module}.weight_scale", s),
                (f"{module}.weight_global_scale", gs)]  # fmt: skip
    if target.num_bits == 4 and target.scale_dtype == torch.bfloat16:  # quantize + pack in one pass on CUDA
        packed, s = kernels.quantize_pack_int4(w, target.group_size, target.qmax)
    else:
        q, s = quantize_int(w, target.num_bits, target.group_size, target.qmax, target.scale_dtype)
        packed = pack_int(q, target.num_bits)
    shape = torch.tensor(list(w.shape), dtype=torch.int64, device=w.device)
    return [
        (f"{module}.weight_packed", packed),
        (f"{module}.weight_scale", s),
        (f"{module}.weight_shape", shape),
    ]


def convert_one(name: str, t: torch.Tensor, target: SyncTarget,
                module: nn.Module | None = None) -> list[tuple[str, torch.Tensor]]:  # fmt: skip
    """One trainer tensor -> its engine tensors (``module``: the trainer's owner, for FP8 reuse)."""
    t = t.detach()
    mname = name[: -len(".weight")] if name.endswith(".weight") else None
    try:
        if mname is not None and target.quantizes(mname, tuple(t.shape)):
            return _convert_linear(name, mname, t, target, module)
        if not t.is_floating_point() or t.dtype in (FP8_DTYPE, torch.float8_e5m2):
            raise SyncError(f"expected a high-precision float tensor, got {t.dtype}")
        return [(name, t.to(torch.float32 if name in target.fp32_names else target.dtype))]
    except (ValueError, TypeError) as e:
        what = f"trainer tensor {name!r} {t.dtype} {list(t.shape)} -> {target.describe()}"
        raise SyncError(f"weight sync: {what}: {e}") from e


def engine_tensors(named_params: Iterable[tuple[str, torch.Tensor]], target: SyncTarget, *,
                   modules: Mapping[str, nn.Module] | None = None) -> Iterator[tuple[str, torch.Tensor]]:  # fmt: skip
    """Trainer (HF-named) parameters -> (name, tensor) pairs in the engine's format, lazily.

    ``modules`` (``dict(trainer.named_modules())``) lets an ``Fp8BlockTrainLinear`` hand over its
    ``fp8_weight()`` (cached with ``fp8_param_gather``: the same numbers, not quantized twice).
    Outputs live on the input tensor's device; a non-quantized tensor already in the engine's dtype is
    passed through without a copy. Runs under ``torch.no_grad``.
    """
    modules = modules or {}
    for name, t in named_params:
        mname = name[: -len(".weight")] if name.endswith(".weight") else None
        with torch.no_grad():  # not held across the yield: grad mode is thread state the caller shares
            out = convert_one(name, t, target, modules.get(mname) if mname is not None else None)
        yield from out


def check_complete(engine_model: nn.Module, names: Iterable[str]) -> None:
    """``SyncError`` unless ``names`` cover every tensor the engine needs (a partial update would leave
    some engine tensors on the previous version while the version number moves on)."""
    given = set(names)
    index = tensor_index(engine_model)
    missing = sorted(n for n, (u, a) in index.items() if not u.specs[a].optional and n not in given)
    if missing:
        raise SyncError(
            f"weight sync: the trainer provides no value for {len(missing)} engine tensor(s), e.g. {missing[:4]} "
            "(different architecture, or tied embeddings on one side only?); nothing was loaded"
        )
