"""Services can also be declared in Python: every conftest may implement this hook.

Its services join those of pyproject.toml; a name declared in both places is a ConfigError.
"""

from __future__ import annotations

import pytest

from pytest_envbox import Mount, Service, probe


def pytest_envbox_services(config: pytest.Config) -> list[Service]:
    return [
        # The standard library's file server, publishing ./fixtures read-only.
        Service(
            "files",
            ["python3", "-m", "http.server", "9000", "--bind", "127.0.0.1", "--directory", "/srv"],
            ports=[9000],
            mounts=[Mount("fixtures", "/srv")],
            ready=probe.http(9000, timeout="10s"),
        ),
    ]
