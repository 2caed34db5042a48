"""The model's tensors as the engine and checkpoints name them, grouped into update units.

A *unit* is what must be replaced together: a Linear's weight with its scales (``q_proj.weight`` +
``q_proj.weight_scale_inv``; ``weight_packed`` + ``weight_scale`` [+ ``weight_shape``]), or one plain
tensor (an embedding, a norm weight, a bias). Loading a checkpoint and ``Engine.update_weights`` both
resolve names through ``tensor_index``; ``dequantized_weights`` is the engine's view of every Linear
weight, for equality checks against ``quantrl.formats``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from quantrl.model.linear import QLinear, WeightSpec


@dataclass(frozen=True)
class Unit:
    name: str
    "module name for a Linear (``model.layers.0.mlp.up_proj``), the tensor's full name otherwise"
    module: nn.Module
    "owner of the tensors"
    specs: dict[str, WeightSpec]
    "attribute on ``module`` -> expected shape / dtype"
    linear: QLinear | None = None
    "set for a Linear's weight group (loads are bracketed by its restore / post-process hooks)"

    def full_name(self, attr: str) -> str:
        return f"{self.name}.{attr}" if self.linear is not None else self.name

    def tensor(self, attr: str) -> torch.Tensor:
        return getattr(self.module, attr)


def _tied_lm_head(model: nn.Module, name: str, module: nn.Module) -> bool:
    """A tied lm_head owns no tensor of its own: its weight is ``model.embed_tokens.weight``."""
    emb = getattr(getattr(model, "model", None), "embed_tokens", None)
    return name == "lm_head" and emb is not None and getattr(module, "weight", None) is emb.weight


def weight_units(model: nn.Module) -> list[Unit]:
    units: list[Unit] = []
    for mname, mod in model.named_modules():
        if isinstance(mod, QLinear):
            if not _tied_lm_head(model, mname, mod):
                units.append(Unit(mname, mod, mod.specs(), linear=mod))
            if mod.bias is not None:
                units.append(Unit(f"{mname}.bias", mod, {"bias": WeightSpec(tuple(mod.bias.shape), mod.bias.dtype)}))
            continue
        for pname, p in mod.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            units.append(Unit(full, mod, {pname: WeightSpec(tuple(p.shape), p.dtype)}))
    return units


def tensor_index(model: nn.Module) -> dict[str, tuple[Unit, str]]:
    """Full tensor name -> (unit, attribute), e.g. ``model.layers.0.self_attn.q_proj.weight_scale_inv``."""
    return {u.full_name(attr): (u, attr) for u in weight_units(model) for attr in u.specs}


def engine_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor in the engine's format under its checkpoint name (the tensors an update replaces)."""
    return {name: unit.tensor(attr) for name, (unit, attr) in tensor_index(model).items()}


def linear_modules(model: nn.Module) -> dict[str, QLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QLinear)}


def dequantized_weights(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """``<module>.weight`` -> the [N, K] weight each Linear computes with (dequantized through formats)."""
    return {f"{n}.weight": m.dequantized_weight(dtype) for n, m in linear_modules(model).items()}
