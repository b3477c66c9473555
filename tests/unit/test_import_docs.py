"""What the README and docs/compose.md show of compose imports is what the code and the example do.

The README's compose quick start shows excerpts of ``examples/compose`` (which tox's tests lane
runs): each of its blocks says, on its first line, which file it is (``(excerpt of PATH)``: it
may leave keys out but not differ; ``(PATH)``: the whole file, its docstring aside). The tables of
docs/compose.md are copies of ``pytest_envbox/compose/keys.py``'s, and docs/kubernetes.md's "Every
field" of ``pytest_envbox/kubernetes/keys.py``'s, compared here both ways: a key added to one and
not the other fails.
"""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

import pytest
import yaml

from pytest_envbox.compose import keys
from pytest_envbox.compose.load import TOP_LEVEL_IGNORED
from pytest_envbox.kubernetes import keys as kube

ROOT = Path(__file__).resolve().parents[2]
CLAIM = re.compile(r"^# \S+ \((?P<excerpt>excerpt of )?(?P<path>examples/\S+)\)$")


def section(text: str, heading: str) -> str:
    """The text under ``heading`` (a Markdown heading line), up to the next heading of its level."""
    level = heading.split(" ", 1)[0]
    start = text.index(f"\n{heading}\n") + len(heading) + 2
    end = text.find(f"\n{level} ", start)
    return text[start:] if end < 0 else text[start:end]


def blocks(text: str) -> list[tuple[str, str]]:
    """The fenced code blocks of ``text``: (language, body)."""
    return re.findall(r"^```(\w+)\n(.*?)^```$", text, re.S | re.M)


def differences(shown: object, real: object, where: str = "") -> list[str]:
    """Where ``shown`` differs from ``real``: a mapping may leave keys out, each key it has must
    hold what ``real`` holds there (recursively); anything else must be equal."""
    if isinstance(shown, dict) and isinstance(real, dict):
        out = []
        for key, value in shown.items():
            if key not in real:
                out.append(f"{where}{key}: not in the file")
            else:
                out.extend(differences(value, real[key], f"{where}{key}."))
        return out
    return [] if shown == real else [f"{where.rstrip('.')}: shown {shown!r}, the file has {real!r}"]


def parse(lang: str, text: str) -> object:
    return yaml.safe_load(text) if lang == "yaml" else tomllib.loads(text)


def claimed_blocks(text: str) -> list[tuple[str, str, bool, Path]]:
    """The blocks that name the file they show: (language, body, excerpt?, path)."""
    out = []
    for lang, body in blocks(text):
        match = CLAIM.match(body.splitlines()[0]) if body.strip() else None
        if match:
            out.append((lang, body, bool(match["excerpt"]), ROOT / match["path"]))
    return out


QUICK_START = section((ROOT / "README.md").read_text(), "## Quick start with a compose file")


def test_every_file_block_of_the_readme_compose_quick_start_names_its_file() -> None:
    shown = [(lang, excerpt, path.relative_to(ROOT).as_posix())
             for lang, _, excerpt, path in claimed_blocks(QUICK_START)]  # fmt: skip
    assert shown == [("yaml", True, "examples/compose/compose.yaml"),
                     ("toml", True, "examples/compose/pyproject.toml"),
                     ("python", False, "examples/compose/tests/test_notes.py")]  # fmt: skip
    assert len(blocks(QUICK_START)) == 4  # and the console block, which shows commands


EXCERPTS = [b for b in claimed_blocks(QUICK_START) if b[0] in ("yaml", "toml")]


@pytest.mark.parametrize(("lang", "body", "excerpt", "path"), EXCERPTS, ids=[b[3].name for b in EXCERPTS])
def test_the_readme_compose_excerpts_are_what_the_example_says(
        lang: str, body: str, excerpt: bool, path: Path) -> None:  # fmt: skip
    shown, real = parse(lang, body), parse(lang, path.read_text())
    assert shown, body
    assert not differences(shown, real), (path, differences(shown, real))


def test_the_readme_compose_test_is_the_examples_test() -> None:
    (_, body, _, path), = [b for b in claimed_blocks(QUICK_START) if b[0] == "python"]
    source = path.read_text()
    docstring = ast.parse(source).body[0]
    assert isinstance(docstring, ast.Expr) and isinstance(docstring.value, ast.Constant)
    code = "".join(source.splitlines(keepends=True)[docstring.end_lineno or 0:]).lstrip("\n")
    assert body.split("\n", 1)[1] == code


def test_the_example_readme_configuration_is_the_examples_pyproject() -> None:
    example = ROOT / "examples" / "compose"
    (body,) = [b for lang, b in blocks(section((example / "README.md").read_text(), "## The configuration"))
               if lang == "toml"]  # fmt: skip
    real = tomllib.loads((example / "pyproject.toml").read_text())
    assert not differences(tomllib.loads(body), real)


def test_differences_is_strict_where_it_must_be() -> None:
    real = {"services": {"a": {"image": "x", "ports": ["1:1", "2:2"], "env": {"A": "1"}}}}
    assert not differences({"services": {"a": {"image": "x"}}}, real)
    assert differences({"services": {"a": {"ports": ["1:1"]}}}, real)  # a list is shown whole
    assert differences({"services": {"b": {}}}, real)
    assert differences({"services": {"a": {"env": {"A": 1}}}}, real)


# --- docs/compose.md and keys.py -----------------------------------------------------------------

COMPOSE_DOC = (ROOT / "docs" / "compose.md").read_text()


def table_keys(text: str) -> list[str]:
    """The keys of the first table in ``text``: each row's first cell, its backticked names outside
    parentheses (what is inside says more: ``healthcheck`` (``CMD``, ...)), ``key: value`` and
    ``key (value)`` as the key alone; a dotted name stays whole (``deploy.mode``)."""
    table = re.search(r"^\|.*?(?=\n[^|]|\Z)", text, re.M | re.S)
    assert table, text
    rows = re.findall(r"^\|(.*?)\|.*$", table[0], re.M)
    assert rows[0].strip() and set(rows[1].strip()) <= {"-", " "}, rows[:2]
    found = []
    for cell in rows[2:]:
        cell = re.sub(r"\([^()]*\)", "", cell)
        found.extend(re.split(r"[:\s]", token, maxsplit=1)[0] for token in re.findall(r"`([^`]+)`", cell))
    return found


def heads(names: list[str]) -> set[str]:
    return {name.split(".", 1)[0] for name in names}


def missing(wanted: object, shown: set[str]) -> list[str]:
    return sorted(set(wanted) - shown)  # type: ignore[call-overload]


def test_the_mapped_table_is_keys_mapped() -> None:
    shown = heads(table_keys(section(COMPOSE_DOC, "## What maps")))
    assert not missing(keys.MAPPED, shown), "docs/compose.md does not map these"
    assert not missing(shown, {*keys.MAPPED, *keys.BY_VALUE}), "keys.py does not map these"


def test_the_ignored_table_is_keys_ignored_and_deploys() -> None:
    names = table_keys(section(COMPOSE_DOC, "## What is ignored"))
    top = {n for n in names if "." not in n}
    assert not missing(keys.IGNORED, top), "docs/compose.md does not list these as ignored"
    assert not missing(top, {*keys.IGNORED, *keys.BY_VALUE}), "keys.py does not ignore these"
    deploy = {n.split(".", 1)[1] for n in names if n.startswith("deploy.") and n.count(".") == 1}
    assert deploy == set(keys.DEPLOY_IGNORED)
    others = {n for n in names if "." in n} - {f"deploy.{k}" for k in deploy}
    assert others == {"deploy.resources.reservations"}


def test_the_refused_table_is_keys_refused() -> None:
    shown = heads(table_keys(section(COMPOSE_DOC, "## What is refused")))
    assert not missing(keys.REFUSED, shown), "docs/compose.md does not list these as refused"
    assert not missing(keys.BY_VALUE, shown), "refused for some values: docs/compose.md does not say so"
    # A mapped key may be refused for some values (UDP `ports`, `extends` from another file).
    assert not missing(shown, {*keys.REFUSED, *keys.BY_VALUE, *keys.MAPPED}), "keys.py does not refuse these"


def test_the_top_level_keys_ignored_are_keys_top_level_ignored() -> None:
    (sentence,) = re.findall(r"The top-level (.*?) definitions are read and\s+ignored", COMPOSE_DOC, re.S)
    assert set(re.findall(r"`([^`]+)`", sentence)) == set(TOP_LEVEL_IGNORED)


@pytest.mark.parametrize(("cell", "names"), [
    ("`healthcheck` (`CMD`, `NONE`)", ["healthcheck"]),
    ("`network_mode: host` (or `none`), `pid`/`ipc`", ["network_mode", "pid", "ipc"]),
    ("`deploy.mode`, UDP `ports`", ["deploy.mode", "ports"]),
])  # fmt: skip
def test_table_keys_reads_a_cell_as_the_docs_write_it(cell: str, names: list[str]) -> None:
    assert table_keys(f"| key | why |\n| --- | --- |\n| {cell} | x (`y`) |\n") == names


# --- docs/kubernetes.md and kubernetes/keys.py ---------------------------------------------------

#: The rows of docs/kubernetes.md's "Every field", by their first cell: keys.py's table for each.
KUBE_ROWS = {
    "`metadata` (every object)": kube.METADATA,
    "pod spec (a Pod's `spec`, a template's `spec`)": kube.POD,
    "container (`containers`, `initContainers`)": kube.CONTAINER,
    "container `securityContext`": kube.SECURITY,
    "pod `securityContext`": kube.POD_SECURITY,
    "`readinessProbe`": kube.PROBE,
    "`volumeMounts`": kube.VOLUME_MOUNT,
    **{f"{kind} `spec`": table for kind, table in kube.WORKLOAD.items()},
    "Service `spec`": kube.SERVICE,
}


def test_every_table_of_kubernetes_keys_has_its_row() -> None:
    tables = {name: value for name, value in vars(kube).items() if isinstance(value, kube.Keys)}
    rows = list(KUBE_ROWS.values())
    assert all(any(t is r for r in rows) for t in [*tables.values(), *kube.WORKLOAD.values()])


def test_the_kubernetes_fields_table_is_keys_py() -> None:
    text = section((ROOT / "docs" / "kubernetes.md").read_text(), "## Every field")
    rows = [[c.strip() for c in line.strip("|").split("|")]
            for line in text.splitlines() if line.startswith("|")]  # fmt: skip
    assert rows[0] == ["object", "read", "ignored, and listed", "refused"]
    documented = {}
    for label, *columns in rows[2:]:
        documented[label] = [set(re.findall(r"`([^`]+)`", cell)) for cell in columns]
    assert set(documented) == set(KUBE_ROWS)
    for label, table in KUBE_ROWS.items():
        read, ignored, refused = documented[label]
        assert (read, ignored, refused) == (set(table.mapped), set(table.ignored), set(table.refused)), label
