"""The image services docs/images.md declares run as written, from a real registry on loopback
(the one change: the registry's port, chosen free at run time, replaces ``localhost:5000``)."""

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

BLOCKS = [b for b in re.findall(r"```toml\n(.*?)```", (DOCS / "images.md").read_text(), re.S)
          if "image = " in b]  # fmt: skip


def test_the_images_page_declares_an_image_service() -> None:
    assert BLOCKS and all('image = "localhost:5000/' in b for b in BLOCKS), BLOCKS


@pytest.mark.parametrize("block", BLOCKS)
def test_a_documented_image_service_answers(block: str, open_registry: RegistryServer,  # noqa: F811
                                            redis_image: Path, tmp_path: Path,  # noqa: F811
                                            monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setenv("ENVBOX_STORE", str(tmp_path / "store"))
    for ref in re.findall(r'image = "localhost:5000/([^"]+)"', block):
        push_layout(redis_image, "latest", open_registry, ref)
    (tmp_path / "pyproject.toml").write_text(block.replace("localhost:5000", open_registry.host))
    [service] = load_project_config(tmp_path).services.values()
    if rootless():  # limits need a delegated cgroup v2 there (tested in test_rootless.py)
        service = service.with_changes(limits={})
    with Environment([service], rootdir=tmp_path) as env:
        client = redis.Redis(port=env[service.name].port(6379))
        try:
            assert client.ping() is True
        finally:
            client.close()
            client.connection_pool.disconnect()
