"""Where compose.yaml's images come from in this example: a registry of our own, on loopback.

compose.yaml names its images ``${POSTGRES_IMAGE:-postgres:16}`` and ``${REDIS_IMAGE:-redis:7}``,
as a team's file often does, and pytest-envbox interpolates them from the environment pytest runs
in, as ``docker compose`` would. With Docker Hub within reach, nothing is needed: the defaults
apply (``IMAGES_FROM=docker.io python3 -m pytest examples/compose`` does just that). CI runs
offline, so here, for the session, the images are built by the pytest-envbox repository's test
kit (``tests/imagekit``: from Debian's packages with mmdebstrap and umoci, once per machine,
cached in ``~/.cache/envbox-test-images``), pushed to a real registry (Debian's
``docker-registry``) started on a free port of 127.0.0.1, and the two variables point there.

When: pytest-envbox reads the project's configuration (pyproject.toml, then compose.yaml) once, the
first time a test needs a service, inside its function-scoped ``envbox`` fixture. The session
fixture below is set up before any function-scoped fixture of the first test, so the variables
are in ``os.environ`` by then (``tests/test_compose_config.py`` checks that ``db`` runs the image
of this registry). A fixture rather than ``pytest_configure``: a missing tool then skips the
tests, with the ``apt-get`` line to run, and the images are built only when a test runs.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from importlib.metadata import entry_points
from pathlib import Path

import pytest

if not any(ep.value == "pytest_envbox.plugin" for ep in entry_points(group="pytest11")):
    pytest_plugins = ["pytest_envbox.plugin"]  # a checkout where pytest-envbox is not installed

REPOSITORY = Path(__file__).resolve().parents[2]  # the pytest-envbox checkout this example is in
# Debian 12's PostgreSQL is 15 (Docker Hub's postgres:16 is the next major): the tag says so.
LOCAL = {"POSTGRES_IMAGE": "library/postgres:15", "REDIS_IMAGE": "library/redis:7"}


@pytest.fixture(scope="session", autouse=True)
def compose_images() -> Iterator[dict[str, str]]:
    """``POSTGRES_IMAGE`` and ``REDIS_IMAGE`` for the session: the local registry's references
    (``127.0.0.1:PORT/library/postgres:15``...), or none with ``IMAGES_FROM=docker.io``."""
    if os.environ.get("IMAGES_FROM") == "docker.io":
        yield {}  # compose.yaml's defaults: postgres:16, redis:7
        return
    for tool in ("mmdebstrap", "umoci", "skopeo", "docker-registry"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is missing: apt-get install mmdebstrap umoci skopeo docker-registry")
    sys.path.insert(0, str(REPOSITORY))
    from tests.imagekit.build import postgres_layout, redis_layout
    from tests.imagekit.registry import RegistryServer, push_layout

    layouts = {"POSTGRES_IMAGE": postgres_layout(), "REDIS_IMAGE": redis_layout()}  # once per machine
    root = Path(tempfile.mkdtemp(prefix="envbox-example-registry-"))
    registry = RegistryServer(root, "open")  # anonymous pull and push, plain HTTP: on loopback
    registry.start()
    try:
        for variable, layout in layouts.items():
            push_layout(layout, "latest", registry, LOCAL[variable])
        images = {variable: f"{registry.host}/{repository}" for variable, repository in LOCAL.items()}
        with pytest.MonkeyPatch.context() as mp:  # os.environ as it was, after the session
            for variable, reference in images.items():
                mp.setenv(variable, reference)
            yield images
    finally:
        registry.stop()
        shutil.rmtree(root, ignore_errors=True)
