"""``quantrl`` command line: thin parsers over typed functions; each subcommand lives in its own module."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from quantrl import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="quantrl",
        description="Low-precision RL post-training of LLMs: FP8 / INT4 (W4A16) rollout, FP8 training, INT4 QAT.",
    )
    parser.add_argument("--version", action="version", version=f"quantrl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    from quantrl.commands import register_all

    register_all(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
