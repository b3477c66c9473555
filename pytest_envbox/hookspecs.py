"""Hooks that conftest files and plugins implement to extend pytest-envbox.

Registered with ``pytest_addhooks``; implement them in a ``conftest.py`` or a plugin like any
pytest hook.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    import pytest

    from .spec import Service

hookspec = pluggy.HookspecMarker("pytest")


@hookspec
def pytest_envbox_services(config: pytest.Config) -> Sequence[Service] | None:
    """Declare services in Python, next to (or instead of) ``[tool.envbox]``.

    Called once per session. Every implementation is called and the results are merged with the
    services of ``pyproject.toml`` / ``envbox.toml``; a name declared twice is a ``ConfigError``
    naming both places.

    :param config: The pytest config object.
    :return: The services this conftest or plugin declares (or None for none).

    Example::

        def pytest_envbox_services(config):
            return [Service("echo", "python -m http.server 8080", ports=[8080])]
    """
