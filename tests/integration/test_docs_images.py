"""The image services the docs declare run as written, from a real registry on loopback: those of
docs/images.md (the one change: the registry's port, chosen free at run time, replaces
``localhost:5000``) and the Docker Hub Redis of docs/kubernetes.md (pushed under its name to that
registry, whose address is put before it). Their image is Redis built offline from Debian's."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pytest_envbox import Environment
from pytest_envbox.config import load_project_config
from pytest_envbox.engine.client import rootless
from tests.imagekit.build import redis_image  # noqa: F401  (a fixture)
from tests.imagekit.registry import RegistryServer, open_registry, push_layout  # noqa: F401

DOCS = Path(__file__).resolve().parents[2] / "docs"
redis = pytest.importorskip("redis")

def _blocks(page: str, image: str) -> list[str]:
    return [b for b in re.findall(r"```toml\n(.*?)```", (DOCS / page).read_text(), re.S)
            if f'image = "{image}' in b]  # fmt: skip


#: Docker Hub's redis, as docs/kubernetes.md's export example declares it
HUB_REDIS = 'image = "redis:'
BLOCKS = _blocks("images.md", "localhost:5000/") + _blocks("kubernetes.md", "redis:")


def test_the_pages_declare_image_services() -> None:
    assert len([b for b in BLOCKS if HUB_REDIS in b]) == 1, BLOCKS
    assert [b for b in _blocks("images.md", "") if "localhost:5000/" not in b] == []
    assert len(BLOCKS) >= 2, BLOCKS


@pytest.mark.parametrize("block", BLOCKS)
def test_a_documented_image_service_answers(block: str, open_registry: RegistryServer,  # noqa: F811
                                            redis_image: Path, tmp_path: Path,  # noqa: F811
                                            monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setenv("ENVBOX_STORE", str(tmp_path / "store"))
    for ref in re.findall(r'image = "localhost:5000/([^"]+)"', block):
        push_layout(redis_image, "latest", open_registry, ref)
    for ref in re.findall(r'image = "(redis:[^"]+)"', block):
        push_layout(redis_image, "latest", open_registry, f"library/{ref}")
    block = block.replace(HUB_REDIS, f'image = "{open_registry.host}/library/redis:')
    (tmp_path / "pyproject.toml").write_text(block.replace("localhost:5000", open_registry.host))
    [service] = load_project_config(tmp_path).services.values()
    if rootless():  # limits need a delegated cgroup v2 there (tested in test_rootless.py)
        service = service.with_changes(limits={})
    with Environment([service], rootdir=tmp_path) as env:
        client = redis.Redis(port=env[service.name].port(6379))
        try:
            assert client.ping() is True
        except redis.exceptions.ConnectionError as e:  # with what the server said
            pytest.fail(f"{e}\n{env[service.name].logs()}")
        finally:
            client.close()
            client.connection_pool.disconnect()
