"""``--custom-rm-path``: a user's reward function in place of the math reward (slime's flag).

The spec names a function: ``package.module:function``, ``package.module.function`` or
``path/to/file.py:function``. It is called once per sample as

    fn(response, label)                 response: the decoded sample, label: the prompt's label (or None)

with ``prompt=`` (the prompt text the engine saw) and ``metadata=`` (the row's ``--metadata-keys``
columns) added when the function takes parameters of those names (or ``**kwargs``). It returns a number
(bool counts as 0/1); anything else, or NaN/Inf, is an error naming the function and the prompt's row.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
from collections.abc import Callable
from pathlib import Path

from quantrl.rl.data import Prompt

RewardFn = Callable[[str, Prompt], float]


def resolve_function(spec: str, flag: str = "--custom-rm-path") -> Callable:
    """The function ``spec`` names (``module:fn``, ``module.fn`` or ``file.py:fn``); errors name ``flag``."""
    if ":" in spec:
        where, name = spec.rsplit(":", 1)
    elif "." in spec:
        where, name = spec.rsplit(".", 1)
    else:
        raise ValueError(f"{flag} {spec!r}: give module:function, module.function or file.py:function")
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise FileNotFoundError(f"{flag} {spec!r}: no file {path}")
        module_spec = importlib.util.spec_from_file_location(f"quantrl_custom_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise ValueError(f"{flag} {spec!r}: cannot import {where!r} ({e})") from None
    fn = getattr(module, name, None)
    if fn is None:
        raise ValueError(f"{flag} {spec!r}: {where!r} has no function {name!r}")
    if not callable(fn):
        raise TypeError(f"{flag} {spec!r}: {where}.{name} is a {type(fn).__name__}, not a function")
    return fn


def load_reward_fn(spec: str) -> RewardFn:
    """The reward ``(response text, Prompt) -> float`` that calls the function ``spec`` names."""
    fn = resolve_function(spec)
    params = inspect.signature(fn).parameters
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    extra = [k for k in ("prompt", "metadata") if takes_all or k in params]

    def reward(response: str, prompt: Prompt) -> float:
        kw = {k: prompt.text if k == "prompt" else prompt.metadata for k in extra}
        value = fn(response, prompt.label, **kw)
        if isinstance(value, bool):
            value = float(value)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"--custom-rm-path {spec!r} returned {value!r} for the prompt of row {prompt.index}; "
                             "a reward must be a finite number")  # fmt: skip
        return float(value)

    return reward
