"""``envbox --help`` and each ``envbox CMD --help`` are plain text for a terminal (no Sphinx
markup leaking from docstrings), list every command, and give every option a help text."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_envbox import cli
from tests.unit.test_docs_reference import cli_commands

REPO = Path(__file__).parents[2]
COMMANDS = sorted(cli_commands(cli.build_parser()))
#: reStructuredText / Sphinx: double backquotes, roles (:mod:`x`, :class:`x`, :func:`x`, ...)
MARKUP = re.compile(r"``|:[a-z]+:`")


def help_text(*args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "pytest_envbox.cli", *args, "--help"],
                       capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "100"})  # fmt: skip
    assert r.returncode == 0 and r.stderr == "", r
    return r.stdout


def test_envbox_help_is_plain_text_and_lists_every_command() -> None:
    text = help_text()
    assert not MARKUP.search(text), text
    listed = re.findall(r"^    ([a-z]+) +\S", text, re.M)
    assert listed == [c for c in cli_commands(cli.build_parser())], text  # every one, in order
    assert "ps" in listed and "logs" in listed


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_help_is_plain_text_with_a_description(command: str) -> None:
    text = help_text(command)
    assert not MARKUP.search(text), text
    assert text.startswith(f"usage: envbox {command} "), text
    description = text.split("\n\n")[1]  # after the usage: what the command does
    assert not description.startswith(("options:", "positional arguments:")), text


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_and_argument_has_help(command: str) -> None:
    parser = cli_commands(cli.build_parser())[command]
    missing = [a.dest for a in parser._actions if not a.help or a.help == argparse.SUPPRESS]
    assert not missing, f"envbox {command}: no help for {missing}"
    markup = [a.help for a in parser._actions if a.help and MARKUP.search(a.help)]
    assert not markup, markup
