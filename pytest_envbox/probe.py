"""Readiness probes, as users write them: ``probe.tcp(6379)``, ``probe.http(8000, "/health")``.

Each factory returns a frozen, validated probe spec (see :mod:`pytest_envbox.spec`); the engine
decides how to run it. ``timeout`` and ``interval`` take seconds or strings like ``"500ms"``,
``"20s"``; ``interval=None`` lets the engine notice readiness as soon as it can.

This module shadows the builtin ``exec`` on purpose: ``probe.exec([...])`` mirrors the TOML key
``exec``, and nobody calls the builtin through this module.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from pytest_envbox.errors import hide_frames
from pytest_envbox.validate import (
    argv,
    as_mapping,
    check_keys,
    describe,
    fail,
    is_int,
    port,
    positive_duration,
)

__tracebackhide__ = hide_frames  # an error in a declaration shows the user's line, not ours

__all__ = [
    "PROBE_KEYS",
    "ExecProbe",
    "HttpProbe",
    "LogProbe",
    "Probe",
    "TcpProbe",
    "exec",
    "http",
    "log",
    "probe_from_mapping",
    "tcp",
]

Duration = float | str


@dataclass(frozen=True)
class Probe:
    """Base of the readiness probes: a ``timeout`` (> 0 s) and an optional poll ``interval``.

    ``interval=None`` leaves the cadence to the engine, which reacts as soon as it can tell.
    Build probes with :mod:`pytest_envbox.probe` (``probe.tcp(6379)``) or a TOML ``ready`` table.
    """

    timeout: float = field(default=30.0, kw_only=True)
    interval: float | None = field(default=None, kw_only=True)

    #: The TOML key that selects this kind of probe (``tcp``, ``http``, ``log``, ``exec``).
    kind: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self._normalise(service=None, prefix="")

    def _normalise(self, service: str | None, prefix: str) -> None:
        object.__setattr__(
            self, "timeout", positive_duration(self.timeout, service, f"{prefix}timeout")
        )
        if self.interval is not None:
            interval = positive_duration(self.interval, service, f"{prefix}interval")
            object.__setattr__(self, "interval", interval)

    def describe(self, service: str | None = None) -> str:
        """One line saying when the service counts as ready, for messages and reports."""
        raise NotImplementedError


@dataclass(frozen=True)
class TcpProbe(Probe):
    """Ready when ``port`` accepts a TCP connection inside the service's network."""

    port: int
    kind: ClassVar[str] = "tcp"

    if TYPE_CHECKING:

        def __init__(
            self, port: int, *, timeout: float | str = 30.0, interval: float | str | None = None
        ) -> None: ...

    def _normalise(self, service: str | None, prefix: str) -> None:
        super()._normalise(service, prefix)
        port(self.port, service, f"{prefix}tcp" if prefix else "port")

    def describe(self, service: str | None = None) -> str:
        return f"tcp port {self.port} accepts connections"


@dataclass(frozen=True)
class HttpProbe(Probe):
    """Ready when ``GET path`` on ``port`` answers ``status`` (None: any 2xx)."""

    port: int
    path: str = "/"
    status: int | None = None
    kind: ClassVar[str] = "http"

    if TYPE_CHECKING:

        def __init__(
            self,
            port: int,
            path: str = "/",
            status: int | None = None,
            *,
            timeout: float | str = 30.0,
            interval: float | str | None = None,
        ) -> None: ...

    def _normalise(self, service: str | None, prefix: str) -> None:
        super()._normalise(service, prefix)
        port(self.port, service, f"{prefix}http" if prefix else "port")
        path_key = f"{prefix}path"
        if not isinstance(self.path, str) or not self.path.startswith("/"):
            fail(f"{describe(self.path)} is not a URL path; start it with '/'", service, path_key)
        if any(c.isspace() or not c.isprintable() for c in self.path):
            fail(
                f"{self.path!r} holds spaces or control characters; %-encode them",
                service,
                path_key,
            )
        if self.status is not None and (not is_int(self.status) or not 100 <= self.status <= 599):
            fail(
                f"{describe(self.status)} is not an HTTP status; use an int from 100 to 599, "
                "or leave it out to accept any 2xx",
                service,
                f"{prefix}status",
            )

    def describe(self, service: str | None = None) -> str:
        expected = "2xx" if self.status is None else str(self.status)
        return f"GET http://{service or '<svc>'}:{self.port}{self.path} returns {expected}"


@dataclass(frozen=True)
class LogProbe(Probe):
    """Ready when a line of stdout or stderr matches ``pattern`` (with ``re.search``)."""

    pattern: str
    kind: ClassVar[str] = "log"

    if TYPE_CHECKING:

        def __init__(
            self, pattern: str, *, timeout: float | str = 30.0, interval: float | str | None = None
        ) -> None: ...

    def _normalise(self, service: str | None, prefix: str) -> None:
        super()._normalise(service, prefix)
        key = f"{prefix}log" if prefix else "pattern"
        if not isinstance(self.pattern, str) or not self.pattern:
            # An empty pattern matches the first line of any output: surely not what was meant.
            fail(
                f"{describe(self.pattern)} is not a regular expression; give the text that "
                "the service prints when it is ready",
                service,
                key,
            )
        try:
            re.compile(self.pattern)
        except re.error as exc:
            fail(f"{self.pattern!r} is not a valid regular expression: {exc}", service, key)

    @property
    def regex(self) -> re.Pattern[str]:
        """The compiled pattern (``re`` caches compilations, so this is cheap to call)."""
        return re.compile(self.pattern)

    def describe(self, service: str | None = None) -> str:
        return f"a log line matches {self.pattern!r}"


@dataclass(frozen=True)
class ExecProbe(Probe):
    """Ready when ``argv``, run inside the service's namespaces, exits 0."""

    argv: tuple[str, ...]
    kind: ClassVar[str] = "exec"

    if TYPE_CHECKING:

        def __init__(
            self,
            argv: Sequence[str] | str,
            *,
            timeout: float | str = 30.0,
            interval: float | str | None = None,
        ) -> None: ...

    def _normalise(self, service: str | None, prefix: str) -> None:
        super()._normalise(service, prefix)
        object.__setattr__(
            self, "argv", argv(self.argv, service, f"{prefix}exec" if prefix else "argv")
        )

    def describe(self, service: str | None = None) -> str:
        return f"`{shlex.join(self.argv)}` exits 0"


_PROBE_KINDS: dict[str, type[TcpProbe | HttpProbe | LogProbe | ExecProbe]] = {
    "tcp": TcpProbe,
    "http": HttpProbe,
    "log": LogProbe,
    "exec": ExecProbe,
}
PROBE_KEYS = ("tcp", "http", "log", "exec", "path", "status", "timeout", "interval")


def probe_from_mapping(value: Mapping[str, object], *, service: str | None) -> Probe:
    """A probe from its TOML form, e.g. ``{ http = 8000, path = "/health", timeout = "20s" }``.

    Exactly one of ``tcp``, ``http``, ``log``, ``exec`` says the kind; ``path`` and ``status``
    belong to ``http``; ``timeout`` and ``interval`` apply to all.
    """
    table = as_mapping(value, service, "ready", '{ tcp = 6379 } or { http = 8000, path = "/health" }')
    check_keys(table, PROBE_KEYS, service, "ready.")
    kinds = [k for k in _PROBE_KINDS if k in table]
    if len(kinds) != 1:
        found = f"has {' and '.join(kinds)}" if kinds else "says no kind of probe"
        fail(f"{found}; give exactly one of tcp, http, log, exec", service, "ready")
    kind = kinds[0]
    if kind != "http":
        for key in ("path", "status"):
            if key in table:
                fail(f"only applies to http probes, not {kind}", service, f"ready.{key}")
    cls = _PROBE_KINDS[kind]
    common = {k: table[k] for k in ("timeout", "interval") if k in table}
    extra = {k: table[k] for k in ("path", "status") if k in table}
    # Check the draft with the service's name and TOML keys, then build the real one.
    draft = object.__new__(cls)
    fields = {"timeout": 30.0, "interval": None, **common, **_draft_fields(cls, table[kind], extra)}
    for name, item in fields.items():
        object.__setattr__(draft, name, item)
    draft._normalise(service, "ready.")
    return dataclasses.replace(draft)


def _draft_fields(cls: type[Probe], main: object, extra: Mapping[str, object]) -> dict[str, object]:
    if cls is HttpProbe:
        return {"port": main, "path": extra.get("path", "/"), "status": extra.get("status")}
    return {{TcpProbe: "port", LogProbe: "pattern", ExecProbe: "argv"}[cls]: main}



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


#: Docker's health check defaults (interval and timeout in seconds, retries) where an image's
#: config or a compose file leaves them out (or gives 0).
HEALTHCHECK_DEFAULTS = (30.0, 30.0, 3)


def docker_healthcheck(test: Sequence[str], *, interval: float | None = None,
                       timeout: float | None = None, retries: int | None = None,
                       start_period: float | None = None, poll: float | None = None,
                       ) -> ExecProbe | None:  # fmt: skip
    """A Docker health check (an image's ``Healthcheck``, a compose file's ``healthcheck``) as a
    readiness probe: ``CMD`` an argv, ``CMD-SHELL`` through ``/bin/sh -c``; anything else None.

    Readiness waits as long as Docker takes to call the container unhealthy (start period, then
    ``retries`` checks of ``interval`` + ``timeout``), but polls every ``poll`` (None: the
    engine's own cadence): the check's interval (30 s by default) is a steady-state period, and
    a test would wait it out. Internal (not in ``__all__``): images and compose files share it.
    """
    kind, rest = (test[0], list(test[1:])) if test else ("", [])
    if kind == "CMD" and rest:
        argv_ = rest
    elif kind == "CMD-SHELL" and rest:
        argv_ = ["/bin/sh", "-c", " ".join(rest)]
    else:
        return None
    every, wait, tries = HEALTHCHECK_DEFAULTS
    deadline = (start_period or 0.0) + (retries or tries) * ((interval or every) + (timeout or wait))
    return ExecProbe(argv_, timeout=deadline, interval=poll)
