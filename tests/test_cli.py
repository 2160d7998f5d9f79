"""`rotserve --help` teaches: every command is listed and every option shows its default."""

import argparse
import importlib
import re
import subprocess
import sys

import pytest

from rotserve.cli import COMMANDS, main


def test_top_level_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert re.search(rf"^\s+{name}\s+\S", out, re.M), name


def test_an_unknown_command_is_an_error_that_shows_the_commands(capsys):
    assert main(["extrakt"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'extrakt'" in err and "extract" in err


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_command_starts_with_its_usage(name):
    res = subprocess.run(
        [sys.executable, "-m", "rotserve.cli", name, "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"usage: rotserve {name}")


def option_help_lines(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each option's rendered help as one string (its help may continue on later lines)."""
    blocks: dict[str, str] = {}
    current = None
    for line in parser.format_help().splitlines():
        m = re.match(r"^\s{2}(--[a-z][\w-]*)", line)
        if m:
            current = m.group(1)
            blocks[current] = line
        elif current and re.match(r"^\s{3,}\S", line):
            blocks[current] += " " + line.strip()
        else:
            current = None
    return blocks


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_option_that_takes_a_value_states_its_default(name, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")
    parser = importlib.import_module(COMMANDS[name][0]).build_parser()
    lines = option_help_lines(parser)
    valued = [
        a
        for a in parser._actions
        if a.option_strings and a.nargs != 0 and a.help is not argparse.SUPPRESS
    ]
    assert valued, f"{name} has no options?"
    for action in valued:
        flag = next(o for o in action.option_strings if o.startswith("--"))
        assert flag in lines, f"{name} {flag} is not in --help"
        assert "default" in lines[flag].lower(), f"{name} {flag} does not state its default"
        if action.default not in (None, argparse.SUPPRESS):
            shown = str(action.default)
            assert shown in lines[flag], f"{name} {flag}: help does not show {shown!r}"
