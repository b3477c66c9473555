"""Every Python snippet of the docs and the README runs as written, as a user would run it.

A block of tests runs in a pytest project (pytester) whose ``pyproject.toml`` declares what the
block names, and its tests must pass; a conftest block runs as ``conftest.py`` with a small test
that uses it; a script runs in a subprocess and must exit 0; a ``>>>`` session runs as a doctest;
a fragment (a few lines of a test, using ``envbox``) runs as the body of a marked test; a
signature is compared with the code's. Which block runs how, in which project, is said by
``RUNS``, block by block: nothing is guessed from the page. A block is ``page#n``, the n-th
```python block of its page: a block added above others shifts them, and the tables follow.

Images come from a registry on loopback (tests/imagekit), as in test_docs_images.py. What
cannot run here is named in ``NOT_HERE``, with why (the reader's own project, such as an ``api``
serving ``/orders`` or a compose file of its own, manifests a page only names), so a new snippet
is never skipped by accident: a block neither run nor listed fails the test. Listed blocks are
still compiled, so a syntax error in one fails too. A block that needs what a host may lack
(cgroups, rootless on cgroup v1; a client library that is no test dependency) skips saying so.
The TOML snippets run in test_docs_snippets.py.
"""

from __future__ import annotations

import ast
import doctest
import importlib.util
import inspect
import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from pytest_envbox import Environment
from pytest_envbox.plugin.fixtures import _signature
from tests.conftest import PLUGIN_ARGS, cgroups_problem, in_ci, need_program
from tests.imagekit.build import redis_layout
from tests.imagekit.registry import RegistryServer, open_registry, push_layout  # noqa: F401

pytest_plugins = ["pytester"]

# yaml is imported above, before the in-process pytest runs below, which would otherwise import it
# anew and drop it after: libyaml's parser keeps the node classes of the first yaml module, which a
# second one does not recognise, so every later YAML file in this process would read as untagged.
assert yaml

ROOT = Path(__file__).resolve().parents[2]
PAGES = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]
SHOP = ROOT / "examples" / "shop"
#: tests/imagekit's cache of built images, read before pytester moves HOME (where it would be
#: built again, in 20 s).
IMAGE_CACHE = os.environ.get("ENVBOX_TEST_IMAGES") or os.path.expanduser("~/.cache/envbox-test-images")


def blocks() -> dict[str, str]:
    found = {}
    for page in PAGES:
        for i, block in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), re.S)):
            found[f"{page.relative_to(ROOT)}#{i}"] = block
    return found


BLOCKS = blocks()


def _toml(page: str, first_line: str) -> str:
    """The ```toml block of ``page`` that starts with ``first_line``: the declarations a Python
    block of that page relies on."""
    for body in re.findall(r"```toml\n(.*?)```", (ROOT / page).read_text(), re.S):
        if body.startswith(first_line):
            return str(body)
    raise AssertionError(f"{page} has no ```toml block starting with {first_line!r}")


def _shop(path: Path) -> None:
    """examples/shop: the catalog and cache services and the ``shop`` topology most pages use."""
    toml = (SHOP / "pyproject.toml").read_text()
    if cgroups_problem():  # as test_docs_snippets.py: no limits where a rootless run has no cgroups
        toml = re.sub(r"^limits = .*$", "", toml, flags=re.M)
    (path / "pyproject.toml").write_text(toml)
    (path / "tests").mkdir(exist_ok=True)
    shutil.copytree(SHOP / "services", path / "services")
    shutil.copytree(SHOP / "fixtures", path / "fixtures")


def _quick_start(path: Path) -> None:
    """docs/index.md's quick start: its pyproject table, and the cache and files it serves."""
    (path / "pyproject.toml").write_text(_toml("docs/index.md", "[tool.envbox.services.cache]"))
    shutil.copytree(SHOP / "services", path / "services")
    shutil.copytree(SHOP / "fixtures", path / "fixtures")


def _static(path: Path) -> None:
    """docs/declaring.md's hook serves ``tests/static`` of the rootdir."""
    (path / "pyproject.toml").write_text("[tool.pytest.ini_options]\n")
    (path / "tests" / "static").mkdir(parents=True)
    (path / "tests" / "static" / "index.html").write_text("static\n")


def _stand_in_api(path: Path) -> None:
    """An ``api`` with a memory limit, standing in for the reader's (docs/limits.md's stats())."""
    (path / "pyproject.toml").write_text(
        '[tool.envbox.services.api]\ncommand = ["sleep", "1000"]\nlimits = { memory = "128Mi" }\n')


def _image(path: Path) -> None:
    """docs/images.md's cache. Its registry is the test's: see ``_serve_the_image``."""
    toml = _toml("docs/images.md", "[tool.envbox.services.cache]")
    if cgroups_problem():
        toml = re.sub(r"^limits = .*$", "", toml, flags=re.M)
    (path / "pyproject.toml").write_text(toml)


def _serve_the_image(path: Path, registry: RegistryServer) -> None:
    """The image of ``_image``'s project, from a real registry on loopback; the one change to the
    TOML, as in test_docs_images.py: the registry's port, chosen free at run time, replaces 5000."""
    toml = (path / "pyproject.toml").read_text()
    for ref in re.findall(r'image = "localhost:5000/([^"]+)"', toml):
        push_layout(redis_layout(), "latest", registry, ref)
    (path / "pyproject.toml").write_text(toml.replace("localhost:5000", registry.host))


def _notes(path: Path) -> None:
    """The README's compose quick start: its pyproject table, with examples/compose's files (the
    README's compose.yaml is an excerpt of that one), whose conftest serves the images from a
    registry on loopback instead of Docker Hub."""
    header = "# pyproject.toml (excerpt of examples/compose/pyproject.toml)\n[tool.envbox]"
    (path / "pyproject.toml").write_text(_toml("README.md", header))
    example = ROOT / "examples" / "compose"
    for d in ("services", "migrations"):
        shutil.copytree(example / d, path / d)
    for f in ("compose.yaml", "conftest.py"):
        shutil.copy(example / f, path / f)


def _empty(path: Path) -> None:
    (path / "pyproject.toml").write_text("[tool.pytest.ini_options]\n")


PROJECTS: dict[str, Callable[[Path], None]] = {
    "shop": _shop, "quick start": _quick_start, "static": _static, "stand-in api": _stand_in_api,
    "image": _image, "notes": _notes, "empty": _empty,
}  # fmt: skip


@dataclass(frozen=True)
class Run:
    """How a block runs. ``how``: ``tests`` (a test module; ``passed`` tests must pass),
    ``conftest`` (as conftest.py, with the test module ``test``), ``fragment`` (the body of a test
    marked ``envbox(marker)``, after ``prelude``), ``script`` (``python3 name``, fed ``stdin``;
    its output must hold ``expect``), ``unittest``, ``doctest`` (in the globals the block
    ``after`` made), ``signature`` (compared with the parameters of ``of``)."""

    how: str
    project: str = "empty"
    passed: int = 1
    test: str = ""
    marker: str = ""
    prelude: str = ""
    name: str = "doc_script.py"
    stdin: str = ""
    expect: tuple[str, ...] = ()
    after: str = ""
    of: Callable[..., object] | None = None
    #: "cgroups", or modules the block (or its services) import that are not dependencies (redis)
    needs: tuple[str, ...] = ()
    hidden: tuple[str, ...] = ()  # a signature's parameters left out of the docs on purpose
    same_as: str = ""  # the file of the repository the page says the block is


HOOKS_TEST = """
import pytest
from pytest_envbox import Service

@pytest.mark.envbox(Service("web", ["sleep", "1000"]))
def test_modified(envbox):
    assert envbox["web"].exec(["printenv", "LOG_LEVEL"]).stdout == "debug\\n"
"""
SERVICES_TEST = """
import pytest

@pytest.mark.envbox("echo", "static")
def test_declared_in_python(envbox):
    assert envbox["echo"].http.get("/").status_code == 200
    assert envbox["static"].http.get("/index.html").text == "static\\n"
"""

RUNS: dict[str, Run] = {
    # compose.yaml's api has cgroup limits; the api imports psycopg and redis.
    "README.md#1": Run("tests", "notes", needs=("cgroups", "psycopg", "redis")),
    "docs/declaring.md#0": Run("script"),  # Service() validates; nothing runs shop.api
    "docs/declaring.md#1": Run("doctest", after="docs/declaring.md#0"),
    "docs/declaring.md#2": Run("conftest", "static", test=SERVICES_TEST),
    "docs/declaring.md#3": Run("conftest", test=HOOKS_TEST, expect=("web 1 ",)),
    "docs/images.md#0": Run("tests", "image"),
    "docs/index.md#0": Run("tests", "quick start"),
    "docs/isolation.md#0": Run("tests", "shop"),
    "docs/limits.md#0": Run("fragment", "stand-in api", marker='"api"', needs=("cgroups",)),
    "docs/network.md#1": Run("tests", needs=("redis",)),
    "docs/python-api.md#0": Run("script", expect=("200\nweb\n",)),
    # The plugin's plumbing (its hooks, its pulled images) is no user's business.
    "docs/python-api.md#1": Run("signature", of=Environment,
                                hidden=("on_ready", "on_close", "modify_service", "images")),
    "docs/python-api.md#2": Run("script"),
    # "This script (it is examples/shop/run_shop.py)": run there, Enter pressed at once.
    "docs/python-api.md#3": Run("script", "shop", name="run_shop.py", stdin="\n",
                                same_as="examples/shop/run_shop.py",
                                expect=("catalog: port 8000 is 127.0.0.1:", "press Enter")),
    "docs/python-api.md#4": Run("unittest", "shop", expect=("Ran 1 test", "OK")),
    "docs/testing.md#1": Run("signature", of=_signature),
    "docs/testing.md#2": Run("tests", "shop", passed=3),
    "docs/testing.md#3": Run("tests", "shop", passed=4),
    "docs/testing.md#4": Run("tests", "shop"),
    "docs/testing.md#6": Run("fragment", "shop", marker='"catalog"', prelude='catalog = envbox["catalog"]'),
    "docs/testing.md#9": Run("fragment", "shop", marker='"cache"'),
}

#: Blocks that cannot run here, with why. They are compiled.
NOT_HERE: dict[str, str] = {
    "README.md#0": "the README's quick start: tests/plugin/test_quickstart.py runs it",
    "docs/compose.md#0": "the page's compose.yaml is the reader's (web, db images)",
    "docs/kubernetes.md#0": "the manifests the page only names (deploy/app.yaml: a frontend image)",
    "docs/network.md#0": "api: the reader's project (CACHE_URL, /orders)",
    "docs/network.md#2": "api: the reader's project (/orders, /health telling the cache is down)",
    "docs/testing.md#0": "api: the reader's project (/orders)",
    "docs/testing.md#5": "api: the reader's project (/orders, a second port 9090)",
    "docs/testing.md#7": "db: PostgreSQL and api, the reader's project",
    "docs/testing.md#8": "db: PostgreSQL with a database shop, the reader's",
}


def test_every_python_block_is_run_or_listed() -> None:
    assert len(BLOCKS) >= 30, len(BLOCKS)
    assert not set(RUNS) & set(NOT_HERE), set(RUNS) & set(NOT_HERE)
    unplaced = set(BLOCKS) - set(RUNS) - set(NOT_HERE)
    assert not unplaced, f"say how these run (RUNS) or why they cannot (NOT_HERE): {sorted(unplaced)}"
    gone = (set(RUNS) | set(NOT_HERE)) - set(BLOCKS)
    assert not gone, f"no such block any more: {sorted(gone)}"


def test_the_block_run_elsewhere_is_the_one_run_there() -> None:
    assert BLOCKS["README.md#0"].startswith("# tests/test_web.py")  # test_quickstart.py's


@pytest.mark.parametrize("where", sorted(NOT_HERE))
def test_a_block_that_cannot_run_here_compiles(where: str) -> None:
    compile(BLOCKS[where], where, "exec")


def _params(line: str) -> str:
    """The parameter list of a signature written as a call, ``Name(a, *, b=None)``."""
    args = ast.parse(f"def f{line[line.index('('):].strip()}: pass").body[0].args  # type: ignore[attr-defined]
    return ast.unparse(args)


def _code_params(of: Callable[..., object], hidden: tuple[str, ...]) -> str:
    """The parameters of ``of`` as the docs write them: no annotations, none of ``hidden``."""
    sig = inspect.signature(of)
    bare = sig.replace(parameters=[p.replace(annotation=inspect.Parameter.empty)
                                   for p in sig.parameters.values() if p.name not in hidden],
                       return_annotation=inspect.Signature.empty)
    return _params(f"f{bare}")


def _run_pytest(pytester: pytest.Pytester, run: Run, block: str) -> None:
    tests = pytester.path / "tests"
    tests.mkdir(exist_ok=True)
    if run.how == "conftest":
        (pytester.path / "conftest.py").write_text(block)
        block = run.test
    elif run.how == "fragment":
        body = textwrap.indent(f"{run.prelude}\n{block}", "    ")
        block = f"import pytest\n\n@pytest.mark.envbox({run.marker})\ndef test_fragment(envbox):\n{body}"
    (tests / "test_doc.py").write_text(block)
    result = pytester.runpytest(*PLUGIN_ARGS, "-p", "no:cacheprovider", "-s", "-rs", "tests")
    skipped = result.parseoutcomes().get("skipped", 0)
    if skipped and not in_ci():  # what the block needs and this host lacks (image tools...)
        pytest.skip(" ".join(ln for ln in result.outlines if ln.startswith("SKIPPED")))
    result.assert_outcomes(passed=run.passed)
    for text in run.expect:
        assert text in result.stdout.str()


def _run_script(path: Path, run: Run, block: str) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    (path / run.name).write_text(block)
    argv = [sys.executable, run.name] if run.how == "script" else [
        sys.executable, "-m", "unittest", "-v", run.name.removesuffix(".py")]  # fmt: skip
    r = subprocess.run(argv, cwd=path, env=env, input=run.stdin, capture_output=True, text=True,
                       timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    for text in run.expect:
        assert text in r.stdout + r.stderr, r.stdout + r.stderr


@pytest.mark.parametrize("where", sorted(RUNS))
def test_a_block_runs_as_written(where: str, pytester: pytest.Pytester, request: pytest.FixtureRequest,
                                 tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    run, block = RUNS[where], BLOCKS[where]
    if run.same_as:
        assert block in (ROOT / run.same_as).read_text(), f"{where} is no longer {run.same_as}"
    if "cgroups" in run.needs and cgroups_problem():
        pytest.skip(f"needs cgroups: {cgroups_problem()}")
    for module in set(run.needs) - {"cgroups"}:
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (the block or its services import it; not a "
                        "test dependency)")  # fmt: skip
        if module == "redis" and run.project != "notes":  # the notes project runs Redis's image
            need_program("redis-server", "redis-server")
    if run.how == "signature":
        assert run.of is not None
        assert _params(block) == _code_params(run.of, run.hidden), where
        return
    if run.how == "doctest":
        globs: dict[str, object] = {}
        exec(compile(BLOCKS[run.after], run.after, "exec"), globs)
        test = doctest.DocTestParser().get_doctest(block, globs, where, where, 0)
        runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
        runner.run(test)
        assert runner.failures == 0 and runner.tries > 0, where
        return
    PROJECTS[run.project](pytester.path)
    # Images: the store in tmp_path, which conftest's clean-up removes (rootless too), and
    # tests/imagekit's cache where it is, not below the HOME pytester makes.
    monkeypatch.setenv("ENVBOX_STORE", str(tmp_path / "store"))
    monkeypatch.setenv("ENVBOX_TEST_IMAGES", IMAGE_CACHE)
    if run.project == "image":
        _serve_the_image(pytester.path, request.getfixturevalue("open_registry"))
    if run.how in ("script", "unittest"):
        _run_script(pytester.path, run, block)
    else:
        _run_pytest(pytester, run, block)
