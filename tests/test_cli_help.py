"""Every subcommand's --help renders (argparse %-formats help strings, so a stray '%' in a config docstring breaks it)."""

import pytest

from quantrl.cli import build_parser


def _subcommands(parser):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (name,), sub
                for path, subsub in _subcommands(sub):
                    yield (name, *path), subsub


@pytest.mark.parametrize("path", [p for p, _ in _subcommands(build_parser())], ids=" ".join)
def test_help_renders(path, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([*path, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: quantrl " + " ".join(path))
