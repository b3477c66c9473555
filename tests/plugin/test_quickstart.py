"""The README's quick start, run as written: its pyproject table and its test file, in a project."""

from __future__ import annotations

import os
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


DOCS = README.parent / "docs" / "index.md"


def test_the_docs_quick_start_commands_run_as_written(tmp_path: Path) -> None:
    """docs/index.md's quick start, step by step: install with its command into a new virtual
    environment, declare its two services, write its test, run its command."""
    import shutil
    import subprocess
    import sys

    text = DOCS.read_text()
    install = _block(text, "sh", "python3 -m pip install .").split("#")[0].split()
    run_cmd = _block(text, "console", "$ python3 -m pytest -q").splitlines()[0][2:].split()
    assert install[:4] == ["python3", "-m", "pip", "install"] and run_cmd[:3] == ["python3", "-m", "pytest"]
    venv = tmp_path / "venv"
    # Inherit the test environment's packages (pytest, requests...): the install adds the plugin.
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True,
                   timeout=120)  # fmt: skip
    python = str(venv / "bin" / "python3")
    r = subprocess.run([python, *install[1:]], cwd=README.parent, capture_output=True, text=True,
                       timeout=600)  # fmt: skip
    if r.returncode != 0 and "No matching distribution found for hatchling" in r.stderr:
        pytest.skip("the package index is unreachable: pip cannot fetch the build backend")
    assert r.returncode == 0, r.stdout + r.stderr
    project = tmp_path / "project"
    (project / "tests").mkdir(parents=True)
    (project / "pyproject.toml").write_text(_block(text, "toml", "[tool.envbox.services.cache]"))
    (project / "tests" / "test_shop.py").write_text(_block(text, "python", "import socket"))
    # "a key-value server from your repository" and the files it serves: the example project's.
    example = README.parent / "examples" / "shop"
    shutil.copytree(example / "services", project / "services")
    shutil.copytree(example / "fixtures", project / "fixtures")
    # The installed plugin loads through its entry point: no -p, no PYTHONPATH.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTEST_ADDOPTS")}
    env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '')}"
    r = subprocess.run([python, *run_cmd[1:], "-p", "no:cacheprovider"], cwd=project, env=env,
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 passed" in r.stdout
    doctor = subprocess.run([str(venv / "bin" / "envbox"), "doctor"], env=env, capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
