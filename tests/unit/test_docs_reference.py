"""The reference pages name every key, option and command the code accepts (and so stay true)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from pytest_envbox import Limits, Mount, Service, cli
from pytest_envbox.config import TOP_LEVEL_KEYS
from pytest_envbox.probe import PROBE_KEYS

DOCS = Path(__file__).resolve().parents[2] / "docs"


def cli_commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The subcommands of the ``envbox`` parser, by name."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _text(page: str) -> str:
    return (DOCS / page).read_text()


def test_every_configuration_key_is_documented() -> None:
    declaring = _text("declaring.md")
    keys = {*Service.KEYS, *Limits.KEYS, *Mount.KEYS, *PROBE_KEYS, *TOP_LEVEL_KEYS}
    missing = sorted(k for k in keys if f"`{k}" not in declaring)
    assert not missing, f"docs/declaring.md does not document: {missing}"


def test_every_option_is_documented() -> None:
    import pytest_envbox.plugin as plugin

    source = Path(plugin.__file__).read_text()
    options = set(re.findall(r'addoption\(\s*"(--envbox-[a-z-]+)"', source))
    assert options >= {"--envbox-logs", "--envbox-report", "--envbox-keep", "--envbox-rootless"}
    testing = _text("testing.md")
    assert not sorted(o for o in options if f"`{o}" not in testing)


def test_every_command_is_documented() -> None:
    # the parser itself: a command may register itself from its own module (cli/export.py)
    commands = set(cli_commands(cli.build_parser()))
    assert commands == {"doctor", "up", "ps", "logs", "clean", "pull", "images", "prune", "export"}
    api = _text("python-api.md")
    assert not sorted(c for c in commands if f"envbox {c}" not in api)


def test_every_source_file_the_docs_name_exists() -> None:
    """A file the docs name (``engine/handle.py``, ``records.py``) is one the repository has:
    a path must exist from the repository's root or the package's; a bare name somewhere in the
    package (after a move, the docs would otherwise name a file that is gone)."""
    root = DOCS.parent
    package = root / "pytest_envbox"
    files = {p.name for p in root.rglob("*.py") if ".tox" not in p.parts}
    missing = []
    for page in sorted([*DOCS.glob("*.md"), root / "README.md"]):
        for name in sorted(set(re.findall(r"`((?:[\w.-]+/)*[\w-]+\.py)`", page.read_text()))):
            found = ((root / name).exists() or (package / name).exists()) if "/" in name else name in files
            if not found:
                missing.append(f"{page.relative_to(root)}: {name}")
    assert not missing, "the docs name files that do not exist:\n" + "\n".join(missing)
