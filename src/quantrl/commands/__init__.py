"""Subcommand registry: each module exposes ``register(subparsers)``."""

from __future__ import annotations

import argparse


def register_all(sub: argparse._SubParsersAction) -> None:
    from quantrl.commands import convert, demo, eval, generate, plot, train

    for module in (train, eval, plot, convert, generate, demo):
        module.register(sub)
