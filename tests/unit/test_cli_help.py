"""Every option of every subcommand says what it is, its unit and its default."""

from __future__ import annotations

import argparse

import pytest

import vfiomig
from vfiomig.cli._main import build_parser


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


SUBCOMMANDS = ("receive", "send", "bench", "demo")


def test_the_subcommands_are_all_there() -> None:
    assert set(_subparsers()) == set(SUBCOMMANDS)


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_every_option_has_help_with_its_default(name: str) -> None:
    missing, no_default, no_unit = [], [], []
    for action in _subparsers()[name]._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS:
            continue
        flag = action.option_strings[-1]
        text = action.help or ""
        if len(text) < 10:
            missing.append(flag)
            continue
        has_default = action.default not in (None, False, [], argparse.SUPPRESS) and not isinstance(
            action, argparse._HelpAction | argparse._CountAction
        )
        if has_default and "default" not in text:
            no_default.append(flag)
        metavar = str(action.metavar or "")
        if metavar.startswith("SIZE") and "K/M/G/T" not in text:
            no_unit.append(flag)
        if metavar in ("SECONDS", "S") and "default" not in text and not action.required:
            no_default.append(flag)
        if "BYTES" in metavar:
            no_unit.append(f"{flag} (metavar {metavar}: say SIZE and the suffixes)")
    assert not missing, f"{name}: options without help: {missing}"
    assert not no_default, f"{name}: help does not say the default: {no_default}"
    assert not no_unit, f"{name}: sizes without their units: {no_unit}"


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"vfiomig {vfiomig.__version__}"
