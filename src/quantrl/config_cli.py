"""Command-line flags generated from a frozen config dataclass, one flag per field.

Help text comes from the string literal that follows each field in the class body (the convention all
quantrl configs use), read with ``ast`` so config and CLI can never drift apart.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
from typing import Any


def field_docs(cls: type) -> dict[str, str]:
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, (ast.Constant, ast.JoinedStr)):
                val = nxt.value.value if isinstance(nxt.value, ast.Constant) else None
                if isinstance(val, str):
                    docs[node.target.id] = val
    return docs


_GIVEN = "_flags_given"  # namespace attribute: the fields whose flag was on the command line


def _remember(namespace: argparse.Namespace, dest: str) -> None:
    if not hasattr(namespace, _GIVEN):
        setattr(namespace, _GIVEN, set())
    getattr(namespace, _GIVEN).add(dest)


class _Store(argparse._StoreAction):
    def __call__(self, parser, namespace, values, option_string=None):
        _remember(namespace, self.dest)
        super().__call__(parser, namespace, values, option_string)


class _Bool(argparse.BooleanOptionalAction):
    def __call__(self, parser, namespace, values, option_string=None):
        _remember(namespace, self.dest)
        super().__call__(parser, namespace, values, option_string)


def flags_given(args: argparse.Namespace) -> set[str]:
    """The fields set on the command line, also where the value given equals the default."""
    return set(getattr(args, _GIVEN, ()))


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, defaults: Any | None = None) -> None:
    docs = field_docs(cls)
    base = defaults or cls()
    for f in dataclasses.fields(cls):
        default = getattr(base, f.name)
        flag = "--" + f.name.replace("_", "-")
        help_ = f"{docs.get(f.name, '')} (default: {default!r})".replace("%", "%%")  # argparse %-formats help
        if isinstance(default, bool):
            parser.add_argument(flag, dest=f.name, action=_Bool, default=default, help=help_)
        elif isinstance(default, (int, float, str)):
            parser.add_argument(flag, dest=f.name, action=_Store, type=type(default), default=default, help=help_)
        elif default is None:
            parser.add_argument(flag, dest=f.name, action=_Store, default=None, help=help_)
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: no CLI mapping for {type(default).__name__}")


def from_args(cls: type, args: argparse.Namespace):
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})
