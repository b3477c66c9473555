"""The servers the documentation declares work as written: reached from the test through their
published port and from another service by name (issue 16: the documented Redis refused both)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pytest_envbox import Environment, Service, probe
from pytest_envbox.config import load_project_config
from pytest_envbox.engine.client import rootless
from tests.conftest import need_program

DOCS = Path(__file__).resolve().parents[2] / "docs"
redis = pytest.importorskip("redis")


def _redis_snippets() -> list[tuple[str, str]]:
    """Every TOML block of docs/ that declares a Redis server, with where it is."""
    found = []
    for page in sorted(DOCS.glob("*.md")):
        for i, block in enumerate(re.findall(r"```toml\n(.*?)```", page.read_text(), re.S)):
            if '"redis-server"' in block and "image =" not in block:  # images: docs/images.md
                found.append((f"{page.name}#{i}", block))
    return found


SNIPPETS = _redis_snippets()


def test_the_docs_declare_redis_somewhere() -> None:
    assert len(SNIPPETS) >= 4, SNIPPETS  # declaring.md (2), limits.md, network.md


@pytest.mark.parametrize(("where", "block"), SNIPPETS, ids=[w for w, _ in SNIPPETS])
def test_a_documented_redis_answers_the_test_and_the_other_services(
        where: str, block: str, tmp_path: Path) -> None:  # fmt: skip
    need_program("redis-server", "redis-server")
    name = "pyproject.toml" if "[tool.envbox" in block else "envbox.toml"
    (tmp_path / name).write_text(block)
    catalog = load_project_config(tmp_path)
    [cache] = [s for s in catalog.services.values() if s.command[0] == "redis-server"]
    # the documented ready probe, or one: some snippets show only the command and limits
    cache = cache if cache.ready is not None else cache.with_changes(ready=probe.tcp(6379))
    if rootless():  # limits need a delegated cgroup v2 there (tested in test_rootless.py)
        cache = cache.with_changes(limits={})
    client = Service("client", ["sleep", "1000"])
    with Environment([cache, client], rootdir=tmp_path) as env:
        client_ = redis.Redis(port=env[cache.name].port(6379))
        try:
            assert client_.ping() is True, where
        finally:
            client_.close()
            client_.connection_pool.disconnect()
        r = env["client"].exec(["redis-cli", "-h", cache.name, "-p", "6379", "ping"], timeout=10)
        assert r.stdout.strip() == "PONG", f"{where}: {r.stdout}{r.stderr}"
