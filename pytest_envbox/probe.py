"""Readiness probes, as users write them: ``probe.tcp(6379)``, ``probe.http(8000, "/health")``.

Each factory returns a frozen, validated probe spec (see :mod:`pytest_envbox.spec`); the engine
decides how to run it. ``timeout`` and ``interval`` take seconds or strings like ``"500ms"``,
``"20s"``; ``interval=None`` lets the engine notice readiness as soon as it can.

This module shadows the builtin ``exec`` on purpose: ``probe.exec([...])`` mirrors the TOML key
``exec``, and nobody calls the builtin through this module.
"""

from __future__ import annotations

from collections.abc import Sequence

from pytest_envbox.spec import ExecProbe, HttpProbe, LogProbe, TcpProbe

__all__ = ["exec", "http", "log", "tcp"]

Duration = float | str


def tcp(port: int, *, timeout: Duration = "30s", interval: Duration | None = None) -> TcpProbe:
    """Ready when ``port`` accepts a TCP connection inside the service's network.

    >>> tcp(6379).describe()
    'tcp port 6379 accepts connections'
    """
    return TcpProbe(port, timeout=timeout, interval=interval)


def http(
    port: int,
    path: str = "/",
    *,
    status: int | None = None,
    timeout: Duration = "30s",
    interval: Duration | None = None,
) -> HttpProbe:
    """Ready when ``GET path`` on ``port`` returns ``status`` (by default: any 2xx).

    >>> http(8000, "/health").describe("api")
    'GET http://api:8000/health returns 2xx'
    """
    return HttpProbe(port, path, status, timeout=timeout, interval=interval)


def log(pattern: str, *, timeout: Duration = "30s", interval: Duration | None = None) -> LogProbe:
    """Ready when a line of stdout or stderr matches the regex ``pattern`` (``re.search``).

    >>> log(r"Ready to accept").regex.search("* Ready to accept connections") is not None
    True
    """
    return LogProbe(pattern, timeout=timeout, interval=interval)


def exec(
    argv: Sequence[str] | str, *, timeout: Duration = "30s", interval: Duration | None = None
) -> ExecProbe:
    """Ready when ``argv``, run inside the service's namespaces and cgroup, exits 0.

    A str is split like a shell would, without expansion:

    >>> exec("pg_isready -U postgres").argv
    ('pg_isready', '-U', 'postgres')
    """
    return ExecProbe(argv, timeout=timeout, interval=interval)
