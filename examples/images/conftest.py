"""The example's database and cache, PostgreSQL and Redis images, pulled from a registry.

With Docker Hub within reach, a project of yours declares them in ``pyproject.toml``
(``image = "postgres:16"``, ``image = "redis:7"``: README.md) and needs none of this file but
its first lines. CI runs offline, so here the images come from a registry of our own instead: the
pytest-envbox repository's test kit (``tests/imagekit``) builds them from Debian's packages
(mmdebstrap, umoci; once per machine, cached in ``~/.cache/envbox-test-images``) and runs a real
registry (Debian's ``docker-registry``) on a free loopback port for the session, and they are
pushed there. That is this example's offline stand-in for Docker Hub: pytest-envbox pulls from it
as from Docker Hub, over the same protocol, and runs what it pulled as it would run
``postgres:16``. Since the registry's port is known only once it runs, the services are declared
here, in Python, with the ``pytest_envbox_services`` hook; only their ``image`` differs from the
``pyproject.toml`` tables of README.md.

``IMAGES_FROM=docker.io python3 -m pytest examples/images`` runs the same tests against Docker
Hub's ``postgres:16`` and ``redis:7`` instead, on a machine that reaches it.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from pytest_envbox import Service, probe

if not any(ep.value == "pytest_envbox.plugin" for ep in entry_points(group="pytest11")):
    pytest_plugins = ["pytest_envbox.plugin"]  # a checkout where pytest-envbox is not installed

REPOSITORY = Path(__file__).resolve().parents[2]  # the pytest-envbox checkout this example is in
DOCKER_HUB = {"db": "postgres:16", "cache": "redis:7"}
# Debian 12's PostgreSQL is 15 (Docker Hub's postgres:16 is the next major): the tag says so.
LOCAL = {"db": "library/postgres:15", "cache": "library/redis:7"}
PG_ISREADY = ["pg_isready", "-q", "-h", "127.0.0.1", "-U", "notes", "-d", "notes"]


def pytest_envbox_services(config: pytest.Config) -> list[Service]:
    """``db`` and ``cache``, as README.md's ``pyproject.toml`` tables declare them, but for
    ``image``. Called once per session (per xdist worker), when a test first needs a service."""
    images = DOCKER_HUB if os.environ.get("IMAGES_FROM") == "docker.io" else local_registry(config)
    return [
        Service(
            "db",
            image=images["db"],
            # The official image's convention: on the first start, with an empty data directory,
            # its entrypoint runs initdb and makes this role, with this password, and this database.
            env={"POSTGRES_USER": "notes", "POSTGRES_PASSWORD": "notes-secret", "POSTGRES_DB": "notes"},
            ports=[5432],
            # Over TCP, not the socket: the official entrypoint's temporary server (while it makes
            # the database) listens on the socket only, and is not the server the API will reach.
            ready=probe.exec(PG_ISREADY, timeout="60s"),
            limits={"memory": "256Mi", "cpu": "1", "pids": 64},
            stop_timeout="10s",  # the image's StopSignal, SIGINT, is a fast shutdown: a checkpoint
        ),
        Service(
            "cache",
            image=images["cache"],  # its own Cmd: redis-server, protected mode off as on Docker Hub
            ports=[6379],
            ready=probe.tcp(6379),
            limits={"memory": "64Mi", "cpu": "500m", "pids": 32},
            stop_timeout="2s",
        ),
    ]


def local_registry(config: pytest.Config) -> dict[str, str]:
    """Build the images (once per machine), start a registry for the session, push them there:
    the references to pull them by, ``127.0.0.1:PORT/library/postgres:15`` and the like."""
    for tool in ("mmdebstrap", "umoci", "skopeo", "docker-registry"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is missing: apt-get install mmdebstrap umoci skopeo docker-registry")
    sys.path.insert(0, str(REPOSITORY))
    from tests.imagekit.build import postgres_layout, redis_layout
    from tests.imagekit.registry import RegistryServer, push_layout

    layouts = {"db": postgres_layout(), "cache": redis_layout()}  # about a minute each, once
    root = Path(tempfile.mkdtemp(prefix="envbox-example-registry-"))
    config.add_cleanup(lambda: shutil.rmtree(root, ignore_errors=True))
    registry = RegistryServer(root, "open")  # anonymous pull and push, plain HTTP: on loopback
    config.add_cleanup(registry.stop)  # cleanups run last first: stopped, then removed
    registry.start()
    for service, layout in layouts.items():
        push_layout(layout, "latest", registry, LOCAL[service])
    return {service: f"{registry.host}/{repository}" for service, repository in LOCAL.items()}
