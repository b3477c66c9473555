"""How pytest-envbox read compose.yaml, as ``envbox doctor --config`` reports it, and the compose
file's host ports, which are not bound."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import yaml

from pytest_envbox import Environment
from pytest_envbox.config import load_project_config


def test_doctor_lists_the_services_and_the_ignored_keys(pytestconfig: pytest.Config) -> None:
    r = subprocess.run([sys.executable, "-m", "pytest_envbox.cli", "doctor", "--config",
                        "--rootdir", str(pytestconfig.rootpath)],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    report = r.stdout
    # Each service, where it comes from, and migrate made a oneshot by service_completed_successfully.
    assert "from compose.yaml services.api, with pyproject.toml [tool.envbox.services.api]" in report
    assert "from compose.yaml services.migrate\n" in report
    assert [line.split()[0] for line in report.splitlines() if "[oneshot]" in line] == ["migrate"]
    # What compose.yaml says that does not matter to a test run: read, ignored, and listed (api's
    # build among them: it runs from the checkout). restart comes through the x-restart anchor.
    for key in ("services.api.build", "services.api.container_name", "services.api.logging",
                "services.api.restart", "services.db.restart", "services.db.labels",
                "services.cache.restart", "services.migrate.restart"):
        assert f"compose.yaml: {key}\n" in report, key


def test_the_compose_files_host_ports_are_not_bound(pytestconfig: pytest.Config) -> None:
    # compose.yaml publishes api on the host port ${API_PORT:-8000}. Take a port first, as a
    # developer's own `docker compose up` would, and make it the file's API_PORT: the environment
    # starts all the same, and the API's port 8000 is published on another, free, port.
    root = pytestconfig.rootpath
    compose = yaml.safe_load((root / "compose.yaml").read_text())
    assert compose["services"]["api"]["ports"] == ["${API_PORT:-8000}:8000"]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        host_port = taken.getsockname()[1]
        # The Python API, with its own reading of the files: the plugin's has no API_PORT.
        catalog = load_project_config(root, environ={**os.environ, "API_PORT": str(host_port)})
        with Environment(["api"], catalog=catalog, rootdir=root) as env:  # with db, cache, migrate
            api = env["api"]
            assert api.port(8000) != host_port
            assert api.http.get("/health", timeout=10).status_code == 200
            # The compose file's host port is still this test's: a connection to it lands here.
            with socket.create_connection(("127.0.0.1", host_port), timeout=10):
                conn, _ = taken.accept()
                conn.close()
