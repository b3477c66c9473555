"""pytest-envbox: the services a test needs, each in its own Linux namespaces, without a daemon.

Declare services in ``pyproject.toml`` (``[tool.envbox.services.NAME]``), in ``envbox.toml`` or
from a ``pytest_envbox_services`` hook, ask for them with ``@pytest.mark.envbox("name")``, and use
them through the ``envbox`` fixture. Outside pytest, :class:`Environment` does the same::

    from pytest_envbox import Environment, Service, probe

    web = Service("web", "python -m http.server 8000", ports=[8000], ready=probe.http(8000))
    with Environment([web]) as env:
        print(env["web"].http.get("/").status_code)
"""

from __future__ import annotations

from pytest_envbox import probe
from pytest_envbox.engine.environment import Environment
from pytest_envbox.engine.figures import Stats
from pytest_envbox.engine.handle import ServiceHandle
from pytest_envbox.errors import (
    ConfigError,
    EnvboxError,
    HostUnsupported,
    ImageError,
    NotReady,
    ServiceFailed,
)
from pytest_envbox.spec import Limits, Mount, Service, Volume

__all__ = [
    "ConfigError",
    "EnvboxError",
    "Environment",
    "HostUnsupported",
    "ImageError",
    "Limits",
    "Mount",
    "NotReady",
    "Service",
    "ServiceFailed",
    "ServiceHandle",
    "Stats",
    "Volume",
    "probe",
]
__version__ = "0.1.0"
