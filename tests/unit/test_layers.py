"""The package's structure, read from its source: layers, import cycles, private names, sizes.

A newcomer finds the room for a change by its layer (docs/design.md): each layer imports only
from the layers below it, nothing imports in a circle, and a module's private names stay private.
These tests fail on the first import that breaks that, naming it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "pytest_envbox"

#: Bottom to top. A module may import from its own layer and those below, never above.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("errors", "validate", "wait", "probe", "ports", "mounts", "spec", "sources", "config",
              "compose", "kubernetes")),
    ("kernel", ("kernel",)),
    ("sandbox", ("sandbox",)),
    ("supervisor", ("supervisor",)),
    ("images", ("images",)),
    ("engine", ("engine",)),
    ("front ends", ("plugin", "cli")),
    ("public", ("__init__",)),
]
#: Beside each other, never into each other: the CLI must run without pytest.
SIBLINGS_APART = ("plugin", "cli")
#: Modules allowed past the size limit, with why (data tables). Keep it short.
LONG_MODULES: dict[str, str] = {}
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts.pop()
        out[".".join(["pytest_envbox", *parts])] = path
    return out


MODULES = _modules()


def _top(module: str) -> str:
    """The first component below the package: ``kernel`` for ``pytest_envbox.kernel.linux``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _layer(module: str) -> int:
    top = _top(module)
    for rank, (_name, tops) in enumerate(LAYERS):
        if top in tops:
            return rank
    raise AssertionError(f"{module} is in no layer: add its folder to LAYERS in {__file__}")


def _type_checking_only(tree: ast.Module) -> set[int]:
    """Line numbers of imports under ``if TYPE_CHECKING:`` (no import at run time)."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                for inner in ast.walk(sub):
                    if isinstance(inner, ast.Import | ast.ImportFrom):
                        lines.add(inner.lineno)
    return lines


def _imports(module: str, path: Path) -> list[tuple[str, list[str], int, bool]]:
    """(imported module, names taken from it, line, at run time?) for each package import."""
    tree = ast.parse(path.read_text(), str(path))
    typing_only = _type_checking_only(tree)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("pytest_envbox"):
                    out.append((alias.name, [], node.lineno, node.lineno not in typing_only))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            if not source.startswith("pytest_envbox"):
                continue
            names = [a.name for a in node.names]
            runtime = node.lineno not in typing_only
            # ``from pytest_envbox.kernel import linux``: an import of the submodule itself.
            subs = [n for n in names if f"{source}.{n}" in MODULES]
            for n in subs:
                out.append((f"{source}.{n}", [], node.lineno, runtime))
            rest = [n for n in names if n not in subs]
            if rest or not subs:
                out.append((source, rest, node.lineno, runtime))
    return out


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def test_every_module_is_in_a_layer() -> None:
    for module in MODULES:
        _layer(module)


def test_each_layer_imports_only_from_itself_and_the_layers_below() -> None:
    wrong = []
    for module, imports in GRAPH.items():
        for target, _names, line, runtime in imports:
            if target not in MODULES or not runtime:
                continue
            if _layer(target) > _layer(module):
                wrong.append(f"{MODULES[module].relative_to(PACKAGE.parent)}:{line}: {module} "
                             f"({LAYERS[_layer(module)][0]}) imports {target} "
                             f"({LAYERS[_layer(target)][0]}), a layer above it")  # fmt: skip
            a, b = _top(module), _top(target)
            if a != b and a in SIBLINGS_APART and b in SIBLINGS_APART:
                wrong.append(f"{module} imports {target}: {' and '.join(SIBLINGS_APART)} stay apart")
    assert not wrong, "\n".join(wrong)


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the list of modules around it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for t in sorted(edges.get(m, ())):
            if state.get(t) == 1:
                return [*path[path.index(t):], t]
            if t not in state:
                found = visit(t)
                if found:
                    return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_no_import_cycle() -> None:
    """Function-level imports count too: a lazy import that closes a circle still ties the two
    modules together (each must be understood with the other)."""
    edges = {m: {t for t, _n, _l, runtime in imports if runtime and t in MODULES and t != m}
             for m, imports in GRAPH.items()}  # fmt: skip
    # A package's __init__ importing its own submodules is how a package presents itself.
    for m in edges:
        edges[m] = {t for t in edges[m] if not (MODULES[m].name == "__init__.py" and t.startswith(m + "."))}
    cycle = _cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_private_name_is_imported_from_another_module() -> None:
    wrong = [f"{MODULES[m].relative_to(PACKAGE.parent)}:{line}: from {target} import {name}"
             for m, imports in GRAPH.items() for target, names, line, _rt in imports
             for name in names if name.startswith("_") and not name.startswith("__")]  # fmt: skip
    assert not wrong, "private names imported across modules:\n" + "\n".join(wrong)


def test_every_module_with_public_names_declares_all() -> None:
    missing = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text())
        public = [n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef)
                  and not n.name.startswith("_")]  # fmt: skip
        declared = any(isinstance(n, ast.Assign)
                       and any(getattr(t, "id", None) == "__all__" for t in n.targets)
                       for n in tree.body)  # fmt: skip
        if public and not declared and path.name != "__main__.py":
            missing.append(f"{module} ({', '.join(public[:4])}...)")
    assert not missing, "modules with public names and no __all__:\n" + "\n".join(missing)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_is_not_too_long(module: str) -> None:
    lines = len(MODULES[module].read_text().splitlines())
    if module in LONG_MODULES:
        return
    assert lines <= MAX_LINES, (f"{module} has {lines} lines (more than {MAX_LINES}): split it along "
                                "its seams, one mechanism per module")  # fmt: skip
