"""Hooks that conftest files and plugins implement to extend pytest-envbox.

Registered with ``pytest_addhooks``; implement them in a ``conftest.py`` or a plugin like any
pytest hook. None is ``firstresult``: each docstring says why. pytest-envbox calls every hook
through pluggy's hook caller, so ``tryfirst``/``trylast``, ``wrapper=True``, ``hookwrapper=True``
and pluggy's tracing apply as to any hook.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    import pytest

    from pytest_envbox.engine.environment import Environment
    from pytest_envbox.engine.handle import ServiceHandle
    from pytest_envbox.engine.report import ServiceTotals
    from pytest_envbox.spec import Service

__all__ = [
    "hookspec",
    "pytest_envbox_environment_closed",
    "pytest_envbox_modify_service",
    "pytest_envbox_service_ready",
    "pytest_envbox_services",
]

hookspec = pluggy.HookspecMarker("pytest")


@hookspec
def pytest_envbox_services(config: pytest.Config) -> Sequence[Service] | None:
    """Declare services in Python, next to (or instead of) ``[tool.envbox]``.

    Called once per session. Every implementation is called and the results are merged with the
    services of ``pyproject.toml`` / ``envbox.toml``; a name declared twice is a ``ConfigError``
    naming both places. Not ``firstresult``: every conftest's and plugin's services count.

    To name those places, each conftest or plugin is called on its own (in registration order),
    so a ``wrapper=True`` (or ``hookwrapper=True``) implementation wraps the implementations of
    its own conftest or plugin only: its ``yield`` gives their results, a list with one list
    per implementation that returned one (empty when there is none), and it returns such a
    list (``[*results, [Service(...)]]`` adds services).

    :param config: The pytest config object.
    :return: The services this conftest or plugin declares (or None for none).

    Example::

        def pytest_envbox_services(config):
            return [Service("echo", "python -m http.server 8080", ports=[8080])]
    """


@hookspec
def pytest_envbox_modify_service(config: pytest.Config, service: Service) -> Service | None:
    """Change a service before any environment uses it: inject environment variables, mounts,
    limits... for every service of the project, whatever declared it.

    Called once per declared service (``[tool.envbox]``, ``envbox.toml`` or
    ``pytest_envbox_services``) and once per ``Service`` written in a marker. Implementations are
    chained: each gets what the previous one returned. The name cannot change. Not
    ``firstresult``: every implementation's change applies, not only the first one's.

    To chain them and name the one that returned something wrong, each conftest or plugin is
    called on its own, in the order pluggy calls implementations (the last registered first,
    ``tryfirst``/``trylast`` respected, a conftest or plugin whose implementation is a wrapper
    before the others). A ``wrapper=True`` (or ``hookwrapper=True``) implementation wraps the
    implementations of its own conftest or plugin only: its ``yield`` gives their results as a
    list (empty when there is none or they returned None), and it returns a list of at most one
    ``Service`` (``[dataclasses.replace(service, ...)]``).

    :param config: The pytest config object.
    :param service: The service as declared (or as an earlier implementation returned it).
    :return: A new ``Service`` (``dataclasses.replace(service, ...)``), or None to keep it.

    Example::

        import dataclasses

        def pytest_envbox_modify_service(config, service):
            if service.name == "api":
                return dataclasses.replace(service, env={**service.env, "LOG_LEVEL": "debug"})
    """


@hookspec
def pytest_envbox_service_ready(handle: ServiceHandle) -> None:
    """A service of an environment has started and passed its readiness probe.

    Called on each start (``restart()`` too), from the thread that waited for it: services of
    one dependency level may call it side by side. Seed data, warm caches, or log, here. Not
    ``firstresult``: a notification, every implementation is called; results are ignored.

    :param handle: The service's :class:`~pytest_envbox.ServiceHandle`.
    """


@hookspec
def pytest_envbox_environment_closed(environment: Environment,
                                     stats: Mapping[str, ServiceTotals]) -> None:  # fmt: skip
    """An environment has been torn down: every service stopped, everything released.

    Not ``firstresult``: a notification, every implementation is called; results are ignored.

    :param environment: The :class:`~pytest_envbox.Environment`; ``environment.report()`` has
        each run's times and figures.
    :param stats: Per service name: its starts, median time to ready, peak memory against its
        limit, cpu seconds and OOM kills in this environment (as in the run's summary).
    """
