"""Atomic weight updates: validate everything, then load.

An update is a list of (name, tensor) in the engine's format: BF16 ``<m>.weight``; FP8 ``<m>.weight`` +
``<m>.weight_scale_inv`` (or ``weight_scale``); INT ``<m>.weight_packed`` + ``<m>.weight_scale``
(``<m>.weight_shape`` optional); plain tensors (embedding, norms, biases) by their own names. It must
cover *complete units* (a Linear's weight together with its scales), because a new weight with an old
scale is a silently wrong model.

``plan_update`` checks every name, shape, dtype, unit and value (no NaN/Inf in a float or fp8 tensor, no
NaN byte in E8M0 scales: what post-processing would choke on, or the engine would sample garbage from)
before anything is written and reports all problems at once; only then does ``apply_update`` restore
kernel layouts, copy in place and post-process. After validation the only possible failures are device
errors.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from quantrl.model.state import Unit, tensor_index
from quantrl.model.tensor_parallel import local_tensor

MAX_LISTED = 8


Plan = list[tuple[Unit, dict[str, torch.Tensor]]]


def _invalid_values(t: torch.Tensor, spec) -> tuple[str, torch.Tensor] | None:
    """(what, count) of the values no engine can serve; the count is a 0-d tensor on ``t``'s device, so
    that all tensors of an update cost one host sync."""
    if spec.e8m0:
        return "E8M0 NaN bytes (255)", (t == 255).sum()
    if t.dtype == torch.float8_e4m3fn:  # its only non-finite codes: S.1111.111
        return "NaN", ((t.view(torch.uint8) & 0x7F) == 0x7F).sum()
    if t.dtype == torch.float8_e5m2:  # exponent all ones: Inf or NaN
        return "NaN/Inf", ((t.view(torch.uint8) & 0x7C) == 0x7C).sum()
    if t.is_floating_point():
        return "NaN/Inf", t.numel() - torch.isfinite(t).sum()
    return None


def _value_errors(counts: list[tuple[str, torch.Tensor, str, torch.Tensor]]) -> list[str]:
    """[(name, tensor, what, count)] -> one error per tensor with a nonzero count (one sync per device)."""
    by_device: dict[torch.device, list] = {}
    for item in counts:
        by_device.setdefault(item[3].device, []).append(item)
    errors = []
    for items in by_device.values():
        bad = torch.stack([c for *_, c in items]).tolist()
        errors += [f"{name!r}: {b} of {t.numel()} values are {what}" for (name, t, what, _), b in zip(items, bad) if b]
    return errors


def plan_update(model: nn.Module, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> Plan:
    """[(unit, {attribute: tensor})] for a valid update; ``ValueError`` listing every problem otherwise."""
    index = tensor_index(model)
    foreign = model.foreign_experts() if hasattr(model, "foreign_experts") else frozenset()
    errors: list[str] = []
    plan: dict[str, tuple[Unit, dict[str, torch.Tensor]]] = {}
    seen: set[str] = set()
    counts: list[tuple[str, torch.Tensor, str, torch.Tensor]] = []
    for item in named_tensors:
        try:
            name, t = item
        except (TypeError, ValueError):
            errors.append(f"expected (name, tensor) pairs, got {type(item).__name__}")
            continue
        if name in seen:
            errors.append(f"{name!r} given twice")
            continue
        seen.add(name)
        if not isinstance(t, torch.Tensor):
            errors.append(f"{name!r} is a {type(t).__name__}, not a tensor")
            continue
        if name not in index and name.rsplit(".", 2)[0] in foreign:
            continue  # expert parallelism: another rank's expert, for it to load
        if name not in index:
            hint = " (lm_head is tied to model.embed_tokens.weight)" if name == "lm_head.weight" else ""
            errors.append(f"unknown tensor {name!r}{hint}")
            continue
        unit, attr = index[name]
        spec = unit.specs[attr]
        try:  # a tensor-parallel engine is given whole tensors and keeps its piece
            t = local_tensor(unit, attr, t, name)
        except ValueError as e:
            errors.append(str(e))
            continue
        if tuple(t.shape) != spec.shape or t.dtype != spec.dtype:
            errors.append(f"{name!r}: got {t.dtype} {list(t.shape)}, the engine holds {spec.dtype} {list(spec.shape)}")
            continue
        if attr == "weight_shape" and t.tolist() != unit.tensor(attr).tolist():
            errors.append(f"{name!r} says {t.tolist()}, the engine's module is {unit.tensor(attr).tolist()}")
            continue
        if (bad := _invalid_values(t, spec)) is not None:
            counts.append((name, t, *bad))
        plan.setdefault(unit.name, (unit, {}))[1][attr] = t
    errors += _value_errors(counts)
    for unit, given in plan.values():
        missing = [unit.full_name(a) for a, s in unit.specs.items() if a not in given and not s.optional]
        if missing:
            errors.append(
                f"incomplete update of {unit.name!r}: got {sorted(given)}, missing {missing} "
                "(a weight and its scales go together)"
            )
    if not seen and not errors:
        errors.append("no tensors given")
    if errors:
        more = f"\n  ... and {len(errors) - MAX_LISTED} more" if len(errors) > MAX_LISTED else ""
        listed = "\n  ".join(errors[:MAX_LISTED])
        raise ValueError(f"update_weights: {len(errors)} problem(s), nothing was loaded:\n  {listed}{more}")
    return list(plan.values())


def apply_update(plan: Plan) -> None:
    """Restore kernel layouts of the touched Linears, copy every tensor in place, post-process them."""
    linears = [u.linear for u, _ in plan if u.linear is not None]
    with torch.no_grad():
        for lin in linears:
            lin.restore_weights_before_loading()
        for unit, tensors in plan:
            if unit.linear is not None:
                unit.linear.load_(tensors)
            else:
                for attr, t in tensors.items():
                    unit.tensor(attr).copy_(t)
        for lin in linears:
            lin.post_process_weights()


_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bits (fp8 has no ``torch.equal`` on CPU; -0.0 vs 0.0 and NaNs count too)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype == torch.bool:
        return torch.equal(a, b)
    as_int = _SAME_SIZE_INT[a.element_size()]
    return torch.equal(a.contiguous().view(as_int), b.to(a.device).contiguous().view(as_int))


def check_loaded(plan: Plan) -> None:
    """``RuntimeError`` unless the engine now holds exactly (bitwise) the given tensors."""
    bad = []
    for unit, tensors in plan:
        for attr, t in tensors.items():
            held = unit.tensor(attr)
            if not bitwise_equal(held, t):
                bad.append(unit.full_name(attr))
    if bad:
        raise RuntimeError(
            f"update_weights(check_equal=True): {len(bad)} tensor(s) differ after loading, e.g. {bad[:MAX_LISTED]}"
        )
