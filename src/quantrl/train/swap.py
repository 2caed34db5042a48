"""Which modules the training-side Linear swaps (QAT, FP8 training) may replace."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


def is_plain_linear(module: nn.Module) -> bool:
    """A high-precision Linear: ``nn.Linear`` or our decoder's ``Bf16Linear`` (not a subclass: those are
    already specialised, e.g. a QAT or FP8 Linear)."""
    from quantrl.model.linear import Bf16Linear

    return type(module) in (nn.Linear, Bf16Linear)


def swap_linears(model: nn.Module, make: Callable[[str, nn.Module], nn.Module | None]) -> list[str]:
    """Replace each plain Linear for which ``make(name, module)`` returns a module; returns the names."""
    swapped = []
    for name, module in list(model.named_modules()):
        if not is_plain_linear(module):
            continue
        new = make(name, module)
        if new is None:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        swapped.append(name)
    return swapped
