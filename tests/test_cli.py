"""`rotserve --help` teaches: every command is listed and every option shows its default."""

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
def test_each_command_explains_its_options_and_defaults(name):
    res = subprocess.run(
        [sys.executable, "-m", "rotserve.cli", name, "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"usage: rotserve {name}")
    options = re.findall(r"^\s{2}(--[a-z][\w-]*)", res.stdout, re.M)
    assert len(options) >= 2
    assert "default" in res.stdout.lower()
