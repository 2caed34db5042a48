"""``QuantScheme``: which Linear variant every module gets, read from a HF ``quantization_config``.

Dialects (the ones ``quantrl convert`` writes, also what SGLang / vLLM / transformers read):
  ``quant_method: fp8``                 128×128 FP8 blocks, ``<m>.weight_scale_inv``, dynamic 1×128 activations
  compressed-tensors ``float-quantized`` FP8 block / channel / tensor, ``<m>.weight_scale``
  compressed-tensors ``pack-quantized`` symmetric group INT4/INT8 (W4A16/W8A16), ``weight_packed`` + ``weight_scale``
  compressed-tensors ``mxfp8-quantized`` MXFP8 W8A8: ``weight`` e4m3, ``weight_scale`` E8M0 bytes per 1×32, dynamic
                                        1×32 activations (an fp8 scheme: block (1, 32), ue8m0, uint8 scales)
  compressed-tensors ``nvfp4-pack-quantized`` NVFP4 weights (``weight_packed`` uint8, e4m3 ``weight_scale`` per 16,
                                        ``weight_global_scale``); NVFP4A16: activations stay in the model dtype
Modules named in ``modules_to_not_convert`` / ``ignore`` keep a high-precision Linear, and so do
``lm_head`` and the embedding, always.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from quantrl.formats.fp8 import MXFP8_BLOCK, MXFP8_SCALE_FMT

METHODS = ("none", "fp8", "int", "nvfp4")
IGNORE_RULES = ("quantrl", "compressed-tensors", "transformers")


@dataclass(frozen=True)
class QuantScheme:
    method: str = "none"
    "none (high-precision Linears) | fp8 (W8A8, dynamic activations) | int (W4A16 / W8A16) | nvfp4 (NVFP4A16)"
    fp8_strategy: str = "block"
    "fp8 weight scales: block | channel | tensor"
    block_size: tuple[int, int] = (128, 128)
    "fp8 block strategy: weight tile (rows, cols)"
    scale_suffix: str = "weight_scale_inv"
    "name of the fp8 scale tensor: weight_scale_inv (quant_method fp8) or weight_scale (compressed-tensors)"
    act_strategy: str = "group"
    "fp8 dynamic activation scales: group (1×act_group per token) | token | tensor"
    act_group: int = 128
    "fp8 activation group size along K"
    scale_fmt: str | None = None
    "fp8: None or ue8m0 (power-of-two scales, weights and activations)"
    num_bits: int = 4
    "int: 4 or 8"
    group_size: int = 128
    "int: input channels per scale"
    scale_dtype: torch.dtype = torch.bfloat16
    "weight_scale dtype: int bf16 (or the checkpoint's), fp8 fp32 (uint8: MXFP8's E8M0 bytes), nvfp4 e4m3"
    ignore: tuple[str, ...] = ()
    "modules kept in high precision, matched by ignore_rule"
    ignore_rule: str = "quantrl"
    ("how ignore entries match a module name, as the dialect that wrote them: quantrl (a name, a dotted "
     "suffix or prefix, or 're:<regex>' matching the whole name) | compressed-tensors (the exact name, or "
     "'re:<regex>' matching from the start) | transformers (modules_to_not_convert: a regex matching from the "
     "start up to a module boundary, or a plain suffix)")

    def __post_init__(self) -> None:
        if self.ignore_rule not in IGNORE_RULES:
            raise ValueError(f"ignore_rule must be one of {IGNORE_RULES}, got {self.ignore_rule!r}")
        if self.method not in METHODS:
            raise ValueError(f"quantization method must be one of {METHODS}, got {self.method!r}")
        if self.method == "int" and self.num_bits not in (4, 8):
            raise ValueError(f"int weights must have 4 or 8 bits, got {self.num_bits}")
        if self.method == "fp8" and self.fp8_strategy not in ("block", "channel", "tensor"):
            raise ValueError(f"fp8 strategy must be block, channel or tensor, got {self.fp8_strategy!r}")
        if self.method == "fp8" and self.scale_dtype == torch.uint8 and self.scale_fmt != "ue8m0":
            raise ValueError("fp8 scales stored as E8M0 bytes (uint8) must be powers of two: scale_fmt='ue8m0'")

    @classmethod
    def fp8_block(cls, block_size: tuple[int, int] = (128, 128)) -> QuantScheme:
        """The slime / DeepSeek recipe: 128×128 weight blocks, 1×128 dynamic activations."""
        return cls(method="fp8", block_size=block_size, act_group=block_size[1], scale_dtype=torch.float32)

    @classmethod
    def int4(cls, group_size: int = 128) -> QuantScheme:
        """W4A16, compressed-tensors pack-quantized layout."""
        return cls(method="int", num_bits=4, group_size=group_size)

    @classmethod
    def mxfp8(cls) -> QuantScheme:
        """MXFP8 W8A8 (compressed-tensors mxfp8-quantized): 1×32 e4m3 blocks with E8M0 scales, both operands."""
        return cls(method="fp8", block_size=MXFP8_BLOCK, scale_suffix="weight_scale", act_group=MXFP8_BLOCK[1],
                   scale_fmt=MXFP8_SCALE_FMT, scale_dtype=torch.uint8)  # fmt: skip

    @property
    def is_mxfp8(self) -> bool:
        return self.method == "fp8" and self.scale_dtype == torch.uint8

    @classmethod
    def nvfp4(cls) -> QuantScheme:
        """NVFP4 weights, BF16 activations (compressed-tensors nvfp4-pack-quantized, the NVFP4A16 preset)."""
        return cls(method="nvfp4", num_bits=4, group_size=16, scale_dtype=torch.float8_e4m3fn)

    def quantizes(self, module: str) -> bool:
        """Does Linear ``module`` (e.g. ``model.layers.0.mlp.up_proj``) get the quantized variant?"""
        if self.method == "none" or module == "lm_head" or module.endswith("embed_tokens"):
            return False
        return not any(_matches(module, pat, self.ignore_rule) for pat in self.ignore)

    @classmethod
    def from_hf(cls, qc: dict[str, Any] | None) -> QuantScheme:
        if not qc:
            return cls()
        method = qc.get("quant_method")
        if method == "fp8":
            fmt = qc.get("fmt", "e4m3")
            if fmt != "e4m3":
                raise ValueError(f"fp8 fmt {fmt!r} is not supported (e4m3 only)")
            if qc.get("activation_scheme", "dynamic") != "dynamic":
                raise ValueError("fp8 activation_scheme must be dynamic (static input scales are not supported)")
            bs = qc.get("weight_block_size")
            if not bs:
                raise ValueError("quant_method fp8 without weight_block_size (per-tensor fp8) is not supported")
            return cls(
                method="fp8", block_size=(int(bs[0]), int(bs[1])), act_group=int(bs[1]), scale_fmt=qc.get("scale_fmt"),
                scale_dtype=torch.float32, ignore=tuple(qc.get("modules_to_not_convert") or ()),
                ignore_rule="transformers",
            )
        if method == "compressed-tensors":
            return _from_compressed_tensors(qc)
        raise ValueError(
            f"unsupported quantization_config.quant_method {method!r} (supported: fp8, compressed-tensors)"
        )


def _matches(module: str, pat: str, rule: str = "quantrl") -> bool:
    """Does ignore entry ``pat`` name ``module``, under the rule of the dialect that wrote it?"""
    if rule == "compressed-tensors":  # compressed_tensors.utils.match_name (and vLLM)
        return re.match(pat[3:], module) is not None if pat.startswith("re:") else module == pat
    if rule == "transformers":  # transformers' should_convert_module; 're:' accepted too, as a plain regex
        key = pat[3:] if pat.startswith("re:") else pat
        return re.match(rf"(?:{key})(?:(?<=\.)|(?=\.|$))", module) is not None or module.endswith(key)
    if pat.startswith("re:"):
        return re.fullmatch(pat[3:], module) is not None
    # a name, a dotted suffix ("lm_head", "mlp.gate") or a subtree prefix ("model.layers.0")
    return module == pat or module.endswith("." + pat) or module.startswith(pat + ".")


def _from_compressed_tensors(qc: dict[str, Any]) -> QuantScheme:
    groups = list((qc.get("config_groups") or {}).values())
    if len(groups) != 1 or not groups[0].get("weights"):
        raise ValueError("only single-group compressed-tensors configs are supported")
    g = groups[0]
    if "Linear" not in (g.get("targets") or ["Linear"]):
        raise ValueError(f"compressed-tensors targets {g.get('targets')} are not supported (Linear only)")
    w, acts, fmt = g["weights"], g.get("input_activations"), qc.get("format")
    ignore = tuple(qc.get("ignore") or ())
    if not w.get("symmetric", True):
        raise ValueError("asymmetric (zero-point) weights are not supported")
    if fmt == "float-quantized" and w.get("type") == "float" and int(w.get("num_bits", 8)) == 8:
        strategy = w.get("strategy")
        if strategy not in ("block", "channel", "tensor"):
            raise ValueError(f"compressed-tensors fp8 weight strategy {strategy!r} is not supported")
        if not acts or not acts.get("dynamic", False):
            raise ValueError("compressed-tensors fp8 needs dynamic input activations (W8A8-dynamic)")
        bs = tuple(int(b) for b in (w.get("block_structure") or (128, 128)))
        act_strategy = acts.get("strategy", "token")
        if act_strategy not in ("group", "token", "tensor"):
            raise ValueError(f"compressed-tensors activation strategy {act_strategy!r} is not supported")
        return QuantScheme(
            method="fp8", fp8_strategy=strategy, block_size=(bs[0], bs[1]), scale_suffix="weight_scale",
            act_strategy=act_strategy, act_group=int(acts.get("group_size") or bs[1]), scale_dtype=torch.float32,
            ignore=ignore, ignore_rule="compressed-tensors",
        )
    if fmt == "pack-quantized" and w.get("type") == "int" and w.get("strategy") == "group":
        if acts:
            raise ValueError("int weights with quantized activations (W4A8) are not supported")
        return QuantScheme(method="int", num_bits=int(w["num_bits"]), group_size=int(w["group_size"]), ignore=ignore,
                           ignore_rule="compressed-tensors")
    if fmt == "mxfp8-quantized":
        if (w.get("type"), int(w.get("num_bits", 0)), w.get("group_size")) != ("float", 8, MXFP8_BLOCK[1]):
            raise ValueError(f"mxfp8-quantized needs 8-bit float weights in groups of {MXFP8_BLOCK[1]}, got {w}")
        if not acts:
            raise ValueError("weight-only MXFP8 (MXFP8A16) is not supported; MXFP8 W8A8 (dynamic 1x32 activations) is")
        if not acts.get("dynamic", False) or acts.get("group_size") != MXFP8_BLOCK[1]:
            raise ValueError(f"MXFP8 activations must be dynamic in groups of {MXFP8_BLOCK[1]}, got {acts}")
        return dataclasses.replace(QuantScheme.mxfp8(), ignore=ignore, ignore_rule="compressed-tensors")
    if fmt == "nvfp4-pack-quantized":
        if (w.get("type"), int(w.get("num_bits", 0)), w.get("group_size")) != ("float", 4, 16):
            raise ValueError(f"nvfp4-pack-quantized needs 4-bit float weights in groups of 16, got {w}")
        if acts:  # W4A4 NVFP4: what vLLM does below SM100 too
            warnings.warn("NVFP4 checkpoint with quantized activations (W4A4): activations are not quantized here; "
                          "the model runs weight-only (NVFP4A16), as on GPUs without FP4 tensor cores", stacklevel=3)  # fmt: skip
        return dataclasses.replace(QuantScheme.nvfp4(), ignore=ignore, ignore_rule="compressed-tensors")
    raise ValueError(f"unsupported compressed-tensors format {fmt!r} with weights {w}")
