"""The README's quick start, run as written: its pyproject table and its test file, in a project."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import PLUGIN_ARGS

pytest_plugins = ["pytester"]

README = Path(__file__).resolve().parents[2] / "README.md"


def _block(text: str, lang: str, first_line: str) -> str:
    """The fenced ``lang`` block of the quick start whose first line is ``first_line``."""
    for body in re.findall(rf"```{lang}\n(.*?)```", text, re.S):
        if body.startswith(first_line):
            return str(body)
    raise AssertionError(f"README has no ```{lang} block starting with {first_line!r}")


def test_the_readme_quick_start_passes(pytester: pytest.Pytester) -> None:
    text = README.read_text()
    pytester.makefile(".toml", pyproject=_block(text, "toml", "# pyproject.toml"))
    test = _block(text, "python", "# tests/test_web.py")
    (pytester.path / "tests").mkdir()
    (pytester.path / "tests" / "test_web.py").write_text(test)
    result = pytester.runpytest(*PLUGIN_ARGS, "-p", "no:cacheprovider", "-q")
    result.assert_outcomes(passed=1)
    console = _block(text, "console", "$ python3 -m pytest -q")
    assert "1 passed" in console  # what the README promises
