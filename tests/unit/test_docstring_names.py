"""Every function, class, method or module a docstring names exists.

Docstrings outlive the code they point at: a module moves, a function is renamed, and the prose
still names the old one. This reads every docstring in the package (module, class, function) and
checks two kinds of names against the code:

- Sphinx roles (``:func:``, ``:meth:``, ``:class:``, ``:mod:``, ``:attr:``, ``:data:``,
  ``:exc:``, with the ``~`` and leading-dot forms): always references, always checked;
- double-backticked dotted names and calls (``wait_until()``, ``cgroups.CgroupTree``,
  ``ServiceHandle.stats``), checked only when they look like the package's code: their first
  component is a name in scope (the function's own parameters and locals, its class, its module,
  its package, the package root, the builtins), an importable module (``os.fork``,
  ``requests.Session``), or a name the package defines somewhere (then it must be in scope too).
  Kernel files (``memory.max``, ``cgroup.procs``) and TOML keys (``limits.memory``) are none of
  these, and are left alone; so are an example's variables (``env.network``, see
  ``EXAMPLE_VARIABLES``) and a bare ``restart()`` that names a method away from its class.

A name is resolved as Sphinx would find it from where it is written: relative to the docstring's
class, its module, its package, then the package root, then as an absolute import.
"""

from __future__ import annotations

import ast
import builtins
import dataclasses
import functools
import importlib
import importlib.util
import inspect
import re
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

ROOT = "pytest_envbox"
PACKAGE = Path(__file__).resolve().parents[2] / ROOT

#: Modules read but never imported, with why.
NOT_IMPORTED = {f"{ROOT}.cli.__main__": "runs the command when imported"}
#: Names that stand for an instance in an example (``env.network``, ``handle.link``), not for the
#: module or function of the same name. Keep it short.
EXAMPLE_VARIABLES = {
    "env": "an Environment",
    "environment": "an Environment (hook arguments)",
    "envbox": "the fixture's value",
    "handle": "a ServiceHandle",
    "svc": "a Service",
}

ROLE = re.compile(r":(?:py:)?(?:func|meth|class|mod|attr|data|exc|obj):`([^`]+)`")
LITERAL = re.compile(r"``([^`]+)``")
NAME = re.compile(r"\A(?P<path>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)(?P<call>\(.*\))?\Z", re.S)
MAN_PAGE = re.compile(r"\(\d\)\Z")  # ``clone(2)`` is the manual's page, not a call
NEWLINE = "\n"


class _Untyped:
    """A name that exists (a parameter, an instance attribute) but whose members are unknown."""


UNTYPED = _Untyped()
MISSING = object()


def _module_names() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join([ROOT, *parts])] = path
    return out


MODULES = _module_names()


def _defined_names() -> tuple[set[str], set[str]]:
    """(the package's module names, classes and module-level names; the methods of its classes).

    Methods are apart: ``link``, ``pids`` or ``ready`` are methods, and also the first word of
    ``link.delay`` (a hook's key), ``pids.max`` (a kernel file) or ``ready.http`` (a TOML key).
    """
    names: set[str] = {ROOT}
    members: set[str] = set()
    for module, path in MODULES.items():
        names.update(module.split(".")[:2])  # the root and its folders, not every leaf module
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                names.add(node.name)
                members.update(item.name for item in node.body
                               if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef))  # fmt: skip
        for stmt in tree.body:
            if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef):
                names.add(stmt.name)
            names.update(_assigned(stmt))
    return names, members


def _assigned(stmt: ast.stmt) -> Iterator[str]:
    targets: list[ast.expr] = []
    if isinstance(stmt, ast.Assign):
        targets = stmt.targets
    elif isinstance(stmt, ast.AnnAssign):
        targets = [stmt.target]
    for target in targets:
        for node in ast.walk(target):
            if isinstance(node, ast.Name):
                yield node.id


DEFINED, MEMBERS = _defined_names()


def _import(name: str) -> ModuleType | None:
    if name in NOT_IMPORTED:
        return None
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


@functools.cache
def _instance_attributes(cls: type) -> frozenset[str]:
    """Attributes a class declares without a class-level value: fields, annotations, ``self.x =``."""
    names: set[str] = set()
    for klass in cls.__mro__:
        names.update(getattr(klass, "__annotations__", {}))
        slots = getattr(klass, "__slots__", ())
        names.update([slots] if isinstance(slots, str) else slots)
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        for node in ast.walk(ast.parse(source)):
            if (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
                    and isinstance(node.value, ast.Name) and node.value.id == "self"):  # fmt: skip
                names.add(node.attr)
    if dataclasses.is_dataclass(cls):
        names.update(f.name for f in dataclasses.fields(cls))
    return frozenset(names)


def _member(obj: object, name: str) -> object:
    """``obj.name``, a submodule of a package, or an instance attribute of a class; else MISSING."""
    if obj is UNTYPED or isinstance(obj, property | functools.cached_property):
        return UNTYPED  # the members of a value we only know by name are not checked
    try:
        return getattr(obj, name)
    except AttributeError:
        pass
    if isinstance(obj, ModuleType) and hasattr(obj, "__path__"):
        sub = _import(f"{obj.__name__}.{name}")
        if sub is not None:
            return sub
    if isinstance(obj, type) and name in _instance_attributes(obj):
        return UNTYPED
    return MISSING


def _walk(obj: object, parts: list[str]) -> bool:
    for part in parts:
        obj = _member(obj, part)
        if obj is MISSING:
            return False
    return True


class Scope:
    """Where a docstring is written: its module, the classes around it, its function's locals."""

    def __init__(self, module: str, classes: list[str], local_names: set[str]) -> None:
        self.module = _import(module)
        self.package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
        self.classes: list[object] = []
        obj: object = self.module
        for name in classes:
            obj = _member(obj, name) if obj is not None else MISSING
            if isinstance(obj, type):
                self.classes.append(obj)
        self.local_names = local_names

    def first(self, name: str) -> object:
        """What ``name`` means here: locals, classes (innermost first), module, package, root."""
        if name in self.local_names:
            return UNTYPED
        for cls in reversed(self.classes):
            found = _member(cls, name)
            if found is not MISSING:
                return found
        for container in (self.module, _import(self.package), _import(ROOT), builtins):
            if container is not None:
                found = _member(container, name)
                if found is not MISSING:
                    return found
        return MISSING

    def resolves(self, path: str) -> bool:
        parts = path.split(".")
        found = self.first(parts[0])
        if found is not MISSING and _walk(found, parts[1:]):
            return True
        return _absolute(parts)


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _absolute(parts: list[str]) -> bool:
    """``a.b.c`` as an absolute name: the longest importable module, then attributes."""
    if not _importable(parts[0]):
        return False
    for cut in range(len(parts), 0, -1):
        module = _import(".".join(parts[:cut]))
        if module is not None:
            return _walk(module, parts[cut:])
    return False


def _role_target(text: str) -> str:
    """``~a.b``, ``.b``, ``title <a.b>``, ``a.b()`` -> ``a.b``."""
    if text.endswith(">") and "<" in text:
        text = text[text.rindex("<") + 1 : -1]
    return text.lstrip("~").lstrip(".").removesuffix("()")


def _local_names(node: ast.AST) -> set[str]:
    """A function's parameters and every name bound in its body (nested functions, variables)."""
    if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        return set()
    args = node.args
    names = {a.arg for a in [*args.posonlyargs, *args.args, *args.kwonlyargs]}
    names.update(a.arg for a in (args.vararg, args.kwarg) if a is not None)
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store):
            names.add(sub.id)
        elif isinstance(sub, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) and sub is not node:
            names.add(sub.name)
    return names


def _docstrings(module: str, path: Path) -> Iterator[tuple[str, int, Scope]]:
    """(docstring, line of its first line, where it is written) for every docstring of a module."""
    tree = ast.parse(path.read_text(), str(path))

    def visit(node: ast.AST, classes: list[str], in_function: bool) -> Iterator[tuple[str, int, Scope]]:
        body = getattr(node, "body", None)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node, clean=False)
            if doc is not None and isinstance(body, list):
                first = body[0]
                assert isinstance(first, ast.Expr)
                yield doc, first.lineno, Scope(module, [] if in_function else classes, _local_names(node))
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                yield from visit(child, [*classes, child.name], in_function)
            elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                inner = in_function or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
                yield from visit(child, classes, inner)
            else:
                yield from visit(child, classes, in_function)

    yield from visit(tree, [], False)


def _candidates(doc: str) -> Iterator[tuple[int, str, bool, bool]]:
    """(offset, dotted name, always a reference?, a call?) for every name a docstring may name."""
    for match in ROLE.finditer(doc):
        yield match.start(), _role_target(match.group(1)), True, False
    for match in LITERAL.finditer(doc):
        text = match.group(1).strip()
        name = NAME.match(text)
        if name is None or MAN_PAGE.search(text):
            continue
        if "." in name["path"] or name["call"] is not None:
            yield match.start(), name["path"], False, name["call"] is not None


def _is_reference(path: str, call: bool, scope: Scope) -> bool:
    """Whether a backticked name looks like the package's code (see the module docstring)."""
    first = path.split(".")[0]
    if first in EXAMPLE_VARIABLES:
        return False
    if scope.first(first) is not MISSING or _importable(first):
        return True
    if "." not in path and call and first in MEMBERS:
        return False  # a method named away from its class, as ``restart()`` in prose
    return first in DEFINED or first.startswith("_")


def _missing(doc: str, scope: Scope) -> Iterator[tuple[int, str]]:
    """(offset, name) for every name in ``doc`` that points at the package's code and is not there."""
    for offset, target, always, call in _candidates(doc):
        if (always or _is_reference(target, call, scope)) and not scope.resolves(target):
            yield offset, target


def test_every_name_in_a_docstring_exists() -> None:
    missing = [
        f"{path.relative_to(PACKAGE.parent)}:{line + doc.count(NEWLINE, 0, offset)}: {name}"
        for module, path in MODULES.items()
        for doc, line, scope in _docstrings(module, path)
        for offset, name in _missing(doc, scope)
    ]
    assert not missing, "docstrings name what does not exist:\n  " + "\n  ".join(missing)


def test_stale_names_are_found_and_kernel_files_are_not_names() -> None:
    # sandbox/init.py's docstring before the split named two functions long gone.
    doc = """The child runs :func:`run_init`; :func:`exec_in_sandbox` is the same for ``exec``.
    It waits with :func:`pytest_envbox._wait.wait_until` (``_wait.wait_until()``), see
    ``sandbox.run_spare``. Existing: :func:`run_spare`, :func:`~.rootfs.finish_root`,
    :class:`~pytest_envbox.Environment`, :mod:`selectors`, ``build_base()``, ``os.fork``,
    ``SandboxPlan.from_dict``, ``L.setns``. Not names: ``memory.max``, ``cgroup.procs``,
    ``limits.memory``, ``ready.http``, ``clone(2)``, ``env.network``, ``pyproject.toml``."""
    scope = Scope(f"{ROOT}.sandbox.init", [], set())
    assert [name for _offset, name in _missing(doc, scope)] == [
        "run_init", "exec_in_sandbox", "pytest_envbox._wait.wait_until", "_wait.wait_until",
        "sandbox.run_spare",
    ]  # fmt: skip
