"""Every line of docs/isolation.md's tables is checked by a test that exists.

The tables that say what a service sees and what it can and cannot do end with a "checked by"
column naming tests as ``file.py::test_name`` (or ``file.py::Class::test_name``); this test reads
them and fails when a row names no test or a test that is gone, so the page cannot claim what
nothing checks.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "isolation.md"
_REF = re.compile(r"`([\w/.-]+\.py)::([\w:]+)`")


def tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """Each markdown table of ``text``: its header cells and its rows' cells."""
    found: list[tuple[list[str], list[list[str]]]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and re.match(r"^\|[\s:|-]+\|$", lines[i + 1]):
            header = _cells(lines[i])
            rows = []
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(_cells(lines[i]))
                i += 1
            found.append((header, rows))
        else:
            i += 1
    return found


def _cells(line: str) -> list[str]:
    # A pipe inside backticks (`a|b`) is not a column separator.
    parts = re.split(r"\|(?=(?:[^`]*`[^`]*`)*[^`]*$)", line.strip())
    return [p.strip() for p in parts[1:-1]]


def defined_tests(path: Path) -> set[str]:
    """``test_x`` and ``Class::test_x`` for the tests defined in ``path``."""
    tree = ast.parse(path.read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef):
            names |= {f"{node.name}::{f.name}" for f in node.body
                      if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))}  # fmt: skip
    return names


def _locate(file: str) -> Path | None:
    for base in (ROOT, ROOT / "tests", ROOT / "tests" / "integration", ROOT / "tests" / "unit",
                 ROOT / "tests" / "plugin"):  # fmt: skip
        if (base / file).is_file():
            return base / file
    return None


def problems(text: str) -> list[str]:
    """What is wrong with the "checked by" columns of ``text``: rows naming no test, or a test
    that does not exist."""
    out = []
    checked = [(h, rows) for h, rows in tables(text) if h and h[-1].lower() == "checked by"]
    if not checked:
        return ["no table has a 'checked by' column"]
    for header, rows in checked:
        for row in rows:
            what = row[0] if row else "?"
            refs = _REF.findall(row[-1]) if len(row) == len(header) else []
            if not refs:
                out.append(f"row {what!r} names no test in its 'checked by' column")
            for file, name in refs:
                path = _locate(file)
                if path is None:
                    out.append(f"row {what!r}: no file {file}")
                elif name not in defined_tests(path):
                    out.append(f"row {what!r}: {file} has no test {name}")
    return out


def test_every_row_of_the_isolation_tables_names_a_test_that_exists() -> None:
    found = problems(PAGE.read_text())
    assert not found, "docs/isolation.md:\n" + "\n".join(found)


def test_the_check_finds_a_row_without_a_test_and_a_test_that_is_gone() -> None:
    text = ("| aspect | envbox | checked by |\n| --- | --- | --- |\n"
            "| hostname | the service's | `test_sandbox.py::test_hostname_is_the_service_name` |\n"
            "| ipc | private | |\n"
            "| gone | - | `test_sandbox.py::test_that_never_was` |\n")  # fmt: skip
    assert problems(text) == ["row 'ipc' names no test in its 'checked by' column",
                              "row 'gone': test_sandbox.py has no test test_that_never_was"]
