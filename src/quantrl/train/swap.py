"""Which modules the training-side Linear swaps (QAT, FP8 training) may replace."""

from __future__ import annotations

from torch import nn


def is_plain_linear(module: nn.Module) -> bool:
    """A high-precision Linear: ``nn.Linear`` or our decoder's ``Bf16Linear`` (not a subclass: those are
    already specialised, e.g. a QAT or FP8 Linear)."""
    from quantrl.model.linear import Bf16Linear

    return type(module) in (nn.Linear, Bf16Linear)
