"""Every TOML snippet of the docs and the README is true: each one that declares services loads as
written, and its services that this machine can run start and become ready, as written.

What cannot run here is named, with why, so a new snippet is never skipped by accident: programs
that stand for the reader's own project (``shop.api``), images from registries that are not
reachable offline, and the compose files and manifests a snippet only names. Fragments (a key or
two, shown inside a service) are checked inside a service table. Redis snippets are also reached
from the test and from another service in tests/integration/test_docs_servers.py.
"""

from __future__ import annotations

import re
import shutil
import textwrap
from pathlib import Path

import pytest

from pytest_envbox import Environment, Service
from pytest_envbox.config import load_project_config
from tests.conftest import POSTGRES, cgroups_problem, in_ci, need_program

ROOT = Path(__file__).resolve().parents[2]
PAGES = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]

#: Programs that stand for the reader's project, not this machine's.
PROJECT_PROGRAMS = ("shop.api", "services/cache.py", "services/api.py", "frontend")
#: Stand-ins for the files a compose or kubernetes snippet names.
COMPOSE = "services:\n  db: {image: postgres:16}\n  api: {image: example/api:1, ports: [8000]}\n"
MANIFESTS = textwrap.dedent("""\
    apiVersion: apps/v1
    kind: Deployment
    metadata: {name: redis-replica}
    spec:
      replicas: 2
      selector: {matchLabels: {app: r}}
      template:
        metadata: {labels: {app: r}}
        spec: {containers: [{name: r, image: "redis:7"}]}
    ---
    apiVersion: apps/v1
    kind: Deployment
    metadata: {name: frontend}
    spec:
      selector: {matchLabels: {app: f}}
      template:
        metadata: {labels: {app: f}}
        spec: {containers: [{name: f, image: "frontend:1", ports: [{containerPort: 80}]}]}
""")


def snippets() -> list[tuple[str, str]]:
    found = []
    for page in PAGES:
        for i, block in enumerate(re.findall(r"```toml\n(.*?)```", page.read_text(), re.S)):
            found.append((f"{page.relative_to(ROOT)}#{i}", block))
    return found


SNIPPETS = snippets()


def _project(tmp_path: Path, block: str) -> tuple[Path, bool]:
    """A project holding the snippet, and what it names: fixtures, compose files, manifests; and
    whether the snippet is a fragment (keys shown alone: checked in a stand-in service, not run)."""
    for d in ("fixtures", "out", "build/api-image"):
        (tmp_path / d).mkdir(parents=True, exist_ok=True)
    (tmp_path / "fixtures" / "hello.txt").write_text("hello\n")
    (tmp_path / "compose.yaml").write_text(COMPOSE)
    (tmp_path / "deploy").mkdir(exist_ok=True)
    (tmp_path / "deploy" / "app.yaml").write_text(MANIFESTS)
    (tmp_path / "deploy" / "db.yaml").write_text("")
    declares = re.search(r"^\[(tool\.envbox|services\.|topologies)", block, re.M)
    if not declares:  # a fragment: keys of one service, shown alone
        lines = [ln for ln in block.splitlines() if ln.strip() and not ln.startswith("#")]
        keys = [ln.split("=", 1)[0].strip() for ln in lines if "=" in ln and not ln.startswith(" ")]
        block = "".join(f'[tool.envbox.services.s{i}]\ncommand = ["sleep", "1000"]\n{ln}\n'
                        for i, ln in enumerate(lines)) if len(set(keys)) < len(keys) else (
            '[tool.envbox.services.s]\ncommand = ["sleep", "1000"]\n' + block)  # fmt: skip
    elif block.lstrip().startswith("[tool.envbox.topologies]"):  # a topology of the page's services
        block = ('[tool.envbox.services.api]\ncommand = ["sleep", "1000"]\n'
                 '[tool.envbox.services.cache]\ncommand = ["sleep", "1000"]\n' + block)  # fmt: skip
    name = "pyproject.toml" if "[tool.envbox" in block else "envbox.toml"
    (tmp_path / name).write_text(block)
    return tmp_path, not declares


def _why_not_here(service: Service) -> str | None:
    if service.image is not None:  # images.md's and kubernetes.md's Redis run in test_docs_images.py
        return f"image {service.image}: a registry that is not reachable offline"
    argv = " ".join(service.command)
    for program in PROJECT_PROGRAMS:
        if program in argv:
            return f"{program}: the reader's project"
    if shutil.which(service.command[0]) is None:
        # .ci/run installs every program the docs name: in CI a missing one is this test's failure
        if in_ci():
            pytest.fail(f"{service.name}: {service.command[0]} is not installed (add it to .ci/run)")
        return f"{service.command[0]}: not installed here"
    return None


def test_the_docs_have_toml_snippets() -> None:
    assert len(SNIPPETS) >= 25, len(SNIPPETS)


@pytest.mark.parametrize(("where", "block"), SNIPPETS, ids=[w for w, _ in SNIPPETS])
def test_a_toml_snippet_loads_and_its_services_run(where: str, block: str, tmp_path: Path) -> None:
    root, fragment = _project(tmp_path, block)
    if 'user = "postgres"' in block:  # the user exists only where PostgreSQL is installed
        need_program(POSTGRES, "postgresql")
    catalog = load_project_config(root, environ={})  # a ConfigError fails the snippet
    if fragment:
        return
    runnable = []
    for name, service in catalog.services.items():
        why = _why_not_here(service)
        deps_ok = all(_why_not_here(catalog.services[d]) is None for d in service.depends_on
                      if d in catalog.services)  # fmt: skip
        if why is None and deps_ok and not service.host_ports:
            runnable.append(name)
    if not runnable:
        return  # loaded and checked; nothing this machine can start (said by _why_not_here)
    limited = [n for n in runnable if catalog.services[n].limits.memory or catalog.services[n].limits.cpu]
    if limited and cgroups_problem():
        runnable = [n for n in runnable if n not in limited]
    with Environment(runnable, catalog=catalog, rootdir=root) as env:
        for name in runnable:
            handle = env[name]
            assert handle.running or (handle.spec.oneshot and handle.returncode == 0), handle.logs()
