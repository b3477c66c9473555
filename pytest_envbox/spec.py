"""What users declare: frozen, validated specs of services, probes, limits and mounts.

Everything here is pure data. A spec is checked once, when it is built, so that a typo in
``pyproject.toml`` or a conftest fails before anything is started, with a :class:`ConfigError`
naming the service, the exact key (``ports[1]``, ``env.FOO``, ``ready.http``...) and what is
accepted instead. After construction every field holds its normalised type (``command`` a tuple,
``limits.memory`` bytes as an int, durations in seconds), so the layers above never re-parse.

The classes accept friendlier input types than they store (a str command, ``"64Mi"``, a mapping
for ``limits``). At run time the dataclass ``__init__`` takes anything and ``__post_init__``
normalises it; for type checkers each class declares its real, wider ``__init__`` signature under
``TYPE_CHECKING`` while the fields keep their precise, normalised types.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import posixpath
import re
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field
from decimal import ROUND_CEILING, Decimal
from typing import TYPE_CHECKING, Any, ClassVar, NoReturn, TypeGuard

from pytest_envbox.errors import ConfigError

__all__ = [
    "DNS_LABEL",
    "ExecProbe",
    "HttpProbe",
    "Limits",
    "LogProbe",
    "Mount",
    "Probe",
    "Service",
    "TcpProbe",
    "check_name",
    "parse_cpu",
    "parse_duration",
    "parse_memory",
    "parse_subnet",
    "probe_from_mapping",
    "service_from_mapping",
]

#: A service, alias or topology name: it becomes a hostname on the private network.
#: Anchored with ``\A``/``\Z`` so ``match``, ``search`` and ``fullmatch`` all check the whole name.
DNS_LABEL = re.compile(r"\A[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")

_USER = re.compile(r"\A(?:[a-z_][a-z0-9_.-]*\$?|\d+|\d+:\d+)\Z")

# Binary and decimal suffixes as Kubernetes spells them; "K" is accepted beside Kubernetes' "k"
# because people write it.
_MEMORY_UNITS = {
    "": 1,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
    "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
}  # fmt: skip
_MEMORY = re.compile(r"(\d+(?:\.\d+)?)([A-Za-z]*)")
_CPU = re.compile(r"(\d+(?:\.\d+)?)(m?)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")

_MEMORY_HELP = 'use bytes as an int or a string like "64Mi", "1Gi", "500M"'
_CPU_HELP = 'use cores as a number (0.5, 2) or millicores as a string like "250m"'
_DURATION_HELP = 'use seconds as a number or a string like "500ms", "10s", "2m", "1h"'
_NAME_HELP = (
    "use a DNS label: 1 to 63 lowercase letters, digits or '-', "
    "starting and ending with a letter or digit"
)


# --- small checks shared by every spec -----------------------------------------------------------


def _fail(message: str, service: str | None, key: str | None) -> NoReturn:
    raise ConfigError(message, service=service, key=key)


def _is_int(value: object) -> TypeGuard[int]:
    # bool is an int subclass; `ports = [true]` is a mistake, never port 1.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> TypeGuard[int | float]:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _what(value: object) -> str:
    """``'80' (a str)``: shows both the value and its type, for wrong-type messages."""
    name = type(value).__name__
    return f"{value!r} ({'an' if name[:1] in 'aeiou' else 'a'} {name})"


def _list(value: object, service: str | None, key: str, example: str) -> Sequence[object]:
    """A list or tuple, but not a str: ``ports = "80"`` would otherwise iterate characters."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        _fail(f"{_what(value)} is not a list; write it as {example}", service, key)
    return value


def _mapping(
    value: object, service: str | None, key: str | None, example: str
) -> Mapping[Any, object]:
    if not isinstance(value, Mapping):
        _fail(f"{_what(value)} is not a table; write it as {example}", service, key)
    return value


def _text(value: object, service: str | None, key: str, what: str) -> str:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value:
        _fail(f"{_what(value)} is not a valid {what}; use a non-empty string", service, key)
    if "\0" in value:
        _fail(f"{value!r} contains a NUL character, which no {what} may hold", service, key)
    return value


def _check_keys(
    given: Iterable[object], accepted: Sequence[str], service: str | None, prefix: str
) -> None:
    """Reject unknown keys, suggesting the closest accepted one: typos are the usual cause."""
    for key in given:
        if key in accepted:
            continue
        close = difflib.get_close_matches(str(key), accepted, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        _fail(
            f"unknown key {str(key)!r}; {hint}accepted keys: {', '.join(accepted)}",
            service,
            f"{prefix}{key}",
        )


def _argv(value: object, service: str | None, key: str) -> tuple[str, ...]:
    """A command line: a str is split like a shell would (no expansion), a list is taken as is."""
    if isinstance(value, str):
        try:
            parts = shlex.split(value)
        except ValueError as exc:  # unbalanced quotes
            _fail(
                f"{value!r} cannot be split into arguments ({exc}); fix the quoting", service, key
            )
    else:
        items = _list(value, service, key, '["program", "arg"] or "program arg"')
        for i, item in enumerate(items):
            if not isinstance(item, str):
                _fail(
                    f"{_what(item)} is not a string; quote every argument", service, f"{key}[{i}]"
                )
        parts = list(items)  # type: ignore[arg-type]  # every item checked above
    if not parts or not parts[0]:
        _fail("the command is empty; give at least the program to run", service, key)
    for i, part in enumerate(parts):
        if "\0" in part:
            _fail(f"{part!r} contains a NUL character", service, f"{key}[{i}]")
    return tuple(parts)


def _port(value: object, service: str | None, key: str) -> int:
    if not _is_int(value) or not 1 <= value <= 65535:
        _fail(f"{_what(value)} is not a port; use an int from 1 to 65535", service, key)
    return value


def parse_subnet(value: object, *, key: str = "subnet") -> str:
    """An environment's private IPv4 network, ``"198.18.0.0/24"``: checked, in its normal form."""
    import ipaddress

    if not isinstance(value, str):
        raise ConfigError(f"{_what(value)} is not a subnet; write it as a string, e.g. "
                          "'198.18.0.0/24'", key=key)  # fmt: skip
    try:
        net = ipaddress.IPv4Network(value, strict=True)
    except ValueError as e:
        raise ConfigError(f"{value!r} is not an IPv4 subnet ({e}); write an address and a prefix "
                          "length, e.g. '198.18.0.0/24'", key=key) from None  # fmt: skip
    if net.prefixlen > 29:
        raise ConfigError(f"subnet {value!r} is too small for an environment; use a /29 or "
                          "larger, e.g. '198.18.0.0/24'", key=key)  # fmt: skip
    return str(net)


def check_name(
    name: object, *, what: str = "service", service: str | None = None, key: str | None = None
) -> str:
    """Return ``name`` if it is a DNS label, else raise a :class:`ConfigError` suggesting one.

    Names become hostnames in ``/etc/hosts`` of every service, hence the DNS rules.

    >>> check_name("shop-api")
    'shop-api'
    """
    if isinstance(name, str) and DNS_LABEL.match(name):
        return name
    message = f"{_what(name) if not isinstance(name, str) else repr(name)} is not a valid {what}"
    message += f" name; {_NAME_HELP}"
    if isinstance(name, str):
        candidate = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:63].strip("-")
        if candidate and DNS_LABEL.match(candidate):
            message += f", e.g. {candidate!r}"
    _fail(message, service, key)


# --- quantities and durations --------------------------------------------------------------------


def parse_memory(
    value: int | str, *, service: str | None = None, key: str = "limits.memory"
) -> int:
    """Bytes from an int or a Kubernetes quantity: ``"64Mi"`` is 64 * 2**20, ``"500M"`` 500e6.

    Fractions are allowed (``"1.5Gi"``) and rounded up to a whole byte, as Kubernetes does.
    """
    if _is_int(value):
        if value > 0:
            return value
        _fail(f"{value!r} is not a positive memory quantity; {_MEMORY_HELP}", service, key)
    if isinstance(value, str):
        match = _MEMORY.fullmatch(value.strip())
        if match and match[2] in _MEMORY_UNITS:
            size = Decimal(match[1]) * _MEMORY_UNITS[match[2]]
            result = int(size.to_integral_value(rounding=ROUND_CEILING))
            if result > 0:
                return result
            _fail(f"{value!r} is not a positive memory quantity; {_MEMORY_HELP}", service, key)
        hint = _memory_hint(match[1], match[2]) if match else ""
        _fail(f"{value!r} is not a memory quantity{hint}; {_MEMORY_HELP}", service, key)
    _fail(f"{_what(value)} is not a memory quantity; {_MEMORY_HELP}", service, key)


def _memory_hint(number: str, suffix: str) -> str:
    """Suggest the quantity meant by a near-miss suffix such as ``mi``, ``MB`` or ``GiB``."""
    base = suffix[:-1] if suffix[-1:] in ("b", "B") else suffix
    wanted = {base.lower(), base.lower() + "i"} if base else set()
    close = [u for u in _MEMORY_UNITS if u and u != "k" and u.lower() in wanted]
    quoted = [f'"{number}{unit}"' for unit in close]
    return f" (did you mean {' or '.join(quoted)}?)" if close else ""


def parse_cpu(value: float | str, *, service: str | None = None, key: str = "limits.cpu") -> float:
    """Cores from a number (``0.5``, ``2``) or Kubernetes millicores (``"250m"`` is 0.25)."""
    cores: float | None = None
    if _is_number(value):
        cores = float(value)
    elif isinstance(value, str) and (match := _CPU.fullmatch(value.strip())):
        cores = float(match[1]) / (1000 if match[2] else 1)
    if cores is None or not cores > 0:
        shown = repr(value) if isinstance(value, (str, int, float)) else _what(value)
        qualifier = " positive" if cores is not None else ""
        _fail(f"{shown} is not a{qualifier} cpu quantity; {_CPU_HELP}", service, key)
    return cores


def parse_duration(
    value: float | str, *, service: str | None = None, key: str = "duration"
) -> float:
    """Seconds from a number or a string like ``"500ms"``, ``"1.5s"``, ``"2m"``, ``"1m30s"``.

    A bare numeric string (``"10"``) means seconds, like a bare number.
    """
    if _is_number(value) and value >= 0:
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        if _NUMBER.fullmatch(text):
            return float(text)
        parts = _DURATION_PART.findall(text)
        # findall skips what it cannot match; rebuilding the text proves nothing was skipped.
        if parts and "".join(n + u for n, u in parts) == text:
            return sum(float(n) * _DURATION_UNITS[u] for n, u in parts)
    shown = repr(value) if isinstance(value, (str, int, float)) else _what(value)
    _fail(f"{shown} is not a duration; {_DURATION_HELP}", service, key)


def _positive_duration(value: float | str, service: str | None, key: str) -> float:
    seconds = parse_duration(value, service=service, key=key)
    if seconds <= 0:
        _fail(f"{value!r} must be longer than zero; {_DURATION_HELP}", service, key)
    return seconds


# --- limits and mounts ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """Cgroup limits of a service: ``memory`` in bytes, ``cpu`` in cores, ``pids`` a count.

    None means unlimited. ``Limits(memory="64Mi", cpu="250m")`` stores ``memory=67108864``,
    ``cpu=0.25``.
    """

    memory: int | None = None
    cpu: float | None = None
    pids: int | None = None

    KEYS: ClassVar[tuple[str, ...]] = ("memory", "cpu", "pids")

    if TYPE_CHECKING:

        def __init__(
            self,
            memory: int | str | None = None,
            cpu: float | str | None = None,
            pids: int | None = None,
        ) -> None: ...

    def __post_init__(self) -> None:
        self._normalise(service=None)

    def _normalise(self, service: str | None) -> None:
        if self.memory is not None:
            object.__setattr__(self, "memory", parse_memory(self.memory, service=service))
        if self.cpu is not None:
            object.__setattr__(self, "cpu", parse_cpu(self.cpu, service=service))
        if self.pids is not None and (not _is_int(self.pids) or self.pids <= 0):
            _fail(f"{_what(self.pids)} is not a pid count; use an int > 0", service, "limits.pids")

    @classmethod
    def from_value(cls, value: object, *, service: str | None) -> Limits:
        """A :class:`Limits` from itself, a mapping with the keys in :attr:`KEYS`, or None."""
        if value is None:
            return cls()
        if isinstance(value, Limits):
            return value
        table = _mapping(value, service, "limits", '{ memory = "64Mi", cpu = "250m", pids = 64 }')
        _check_keys(table, cls.KEYS, service, "limits.")
        # Validate with the service's name first, so the error says whose limits are wrong.
        draft = object.__new__(cls)
        for name in cls.KEYS:
            object.__setattr__(draft, name, table.get(name))
        draft._normalise(service)
        return cls(draft.memory, draft.cpu, draft.pids)


_FORBIDDEN_TARGETS = ("/proc", "/sys", "/dev")


def _mount_target(value: object, service: str | None, key: str) -> str:
    target = _text(value, service, key, "mount target")
    normal = posixpath.normpath(target)
    if not target.startswith("/") or target.startswith("//"):
        _fail(f"{target!r} is not an absolute path; use e.g. '/data'", service, key)
    if normal != target.rstrip("/") and target != "/":
        _fail(f"{target!r} is not a normalised path; use {normal!r}", service, key)
    if normal == "/":
        _fail("cannot mount over '/'; mount under a directory such as '/data'", service, key)
    for forbidden in _FORBIDDEN_TARGETS:
        if normal == forbidden or normal.startswith(forbidden + "/"):
            _fail(
                f"{target!r} is under {forbidden}, which the sandbox owns; pick another target",
                service,
                key,
            )
    return normal


@dataclass(frozen=True)
class Mount:
    """A host file or directory made visible at ``target`` inside the service (read-only default).

    ``source`` may be relative: it is resolved against the rootdir when the service starts.
    """

    source: str
    target: str
    readonly: bool = True

    KEYS: ClassVar[tuple[str, ...]] = ("source", "target", "readonly")

    if TYPE_CHECKING:

        def __init__(
            self, source: str | os.PathLike[str], target: str, readonly: bool = True
        ) -> None: ...

    def __post_init__(self) -> None:
        self._normalise(service=None, prefix="")

    def _normalise(self, service: str | None, prefix: str) -> None:
        object.__setattr__(self, "source", _text(self.source, service, f"{prefix}source", "path"))
        object.__setattr__(self, "target", _mount_target(self.target, service, f"{prefix}target"))
        if not isinstance(self.readonly, bool):
            _fail(f"{_what(self.readonly)} is not true or false", service, f"{prefix}readonly")

    @classmethod
    def from_value(cls, value: object, *, service: str | None, index: int) -> Mount:
        """A :class:`Mount` from itself or a ``{ source, target, readonly }`` mapping."""
        if isinstance(value, Mount):
            return value
        prefix = f"mounts[{index}]."
        example = '{ source = "./fixtures", target = "/data" }'
        table = _mapping(value, service, f"mounts[{index}]", example)
        _check_keys(table, cls.KEYS, service, prefix)
        for required in ("source", "target"):
            if required not in table:
                _fail(f"is missing; write the mount as {example}", service, prefix + required)
        draft = object.__new__(cls)
        for name in cls.KEYS:
            object.__setattr__(draft, name, table.get(name, True))
        draft._normalise(service, prefix)
        return cls(draft.source, draft.target, draft.readonly)


# --- readiness probes ----------------------------------------------------------------------------


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
            self, "timeout", _positive_duration(self.timeout, service, f"{prefix}timeout")
        )
        if self.interval is not None:
            interval = _positive_duration(self.interval, service, f"{prefix}interval")
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
        _port(self.port, service, f"{prefix}tcp" if prefix else "port")

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
        _port(self.port, service, f"{prefix}http" if prefix else "port")
        path_key = f"{prefix}path"
        if not isinstance(self.path, str) or not self.path.startswith("/"):
            _fail(f"{_what(self.path)} is not a URL path; start it with '/'", service, path_key)
        if any(c.isspace() or not c.isprintable() for c in self.path):
            _fail(
                f"{self.path!r} holds spaces or control characters; %-encode them",
                service,
                path_key,
            )
        if self.status is not None and (not _is_int(self.status) or not 100 <= self.status <= 599):
            _fail(
                f"{_what(self.status)} is not an HTTP status; use an int from 100 to 599, "
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
            _fail(
                f"{_what(self.pattern)} is not a regular expression; give the text that "
                "the service prints when it is ready",
                service,
                key,
            )
        try:
            re.compile(self.pattern)
        except re.error as exc:
            _fail(f"{self.pattern!r} is not a valid regular expression: {exc}", service, key)

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
            self, "argv", _argv(self.argv, service, f"{prefix}exec" if prefix else "argv")
        )

    def describe(self, service: str | None = None) -> str:
        return f"`{shlex.join(self.argv)}` exits 0"


_PROBE_KINDS: dict[str, type[TcpProbe | HttpProbe | LogProbe | ExecProbe]] = {
    "tcp": TcpProbe,
    "http": HttpProbe,
    "log": LogProbe,
    "exec": ExecProbe,
}
_PROBE_KEYS = ("tcp", "http", "log", "exec", "path", "status", "timeout", "interval")


def probe_from_mapping(value: Mapping[str, object], *, service: str | None) -> Probe:
    """A probe from its TOML form, e.g. ``{ http = 8000, path = "/health", timeout = "20s" }``.

    Exactly one of ``tcp``, ``http``, ``log``, ``exec`` says the kind; ``path`` and ``status``
    belong to ``http``; ``timeout`` and ``interval`` apply to all.
    """
    table = _mapping(value, service, "ready", '{ tcp = 6379 } or { http = 8000, path = "/health" }')
    _check_keys(table, _PROBE_KEYS, service, "ready.")
    kinds = [k for k in _PROBE_KINDS if k in table]
    if len(kinds) != 1:
        found = f"has {' and '.join(kinds)}" if kinds else "says no kind of probe"
        _fail(f"{found}; give exactly one of tcp, http, log, exec", service, "ready")
    kind = kinds[0]
    if kind != "http":
        for key in ("path", "status"):
            if key in table:
                _fail(f"only applies to http probes, not {kind}", service, f"ready.{key}")
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


# --- services ------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=True, unsafe_hash=False)
class Service:
    """One service to run: its command, environment, ports, dependencies, probe and limits.

    >>> Service("cache", "redis-server --port 6379", ports=[6379]).command
    ('redis-server', '--port', '6379')

    Construction validates everything; a mistake raises :class:`ConfigError` naming this service
    and the key. Use :meth:`with_changes` to derive a variant.
    """

    name: str
    command: tuple[str, ...]
    _: KW_ONLY
    env: Mapping[str, str] = field(default_factory=dict)
    pass_env: tuple[str, ...] = ()
    cwd: str | None = None
    ports: tuple[int, ...] = ()
    depends_on: tuple[str, ...] = ()
    ready: Probe | None = None
    limits: Limits = field(default_factory=Limits)
    mounts: tuple[Mount, ...] = ()
    aliases: tuple[str, ...] = ()
    user: str | None = None
    stop_timeout: float = 5.0

    #: The keys of a ``[tool.envbox.services.NAME]`` table.
    KEYS: ClassVar[tuple[str, ...]] = (
        "command", "env", "pass_env", "cwd", "ports", "depends_on", "ready", "limits", "mounts",
        "aliases", "user", "stop_timeout",
    )  # fmt: skip

    if TYPE_CHECKING:

        def __init__(
            self,
            name: str,
            command: Sequence[str] | str,
            *,
            env: Mapping[str, str] | None = None,
            pass_env: Sequence[str] = (),
            cwd: str | os.PathLike[str] | None = None,
            ports: Sequence[int] = (),
            depends_on: Sequence[str] = (),
            ready: Probe | Mapping[str, object] | None = None,
            limits: Limits | Mapping[str, object] | None = None,
            mounts: Sequence[Mount | Mapping[str, object]] = (),
            aliases: Sequence[str] = (),
            user: str | int | None = None,
            stop_timeout: float | str = "5s",
        ) -> None: ...

    def __post_init__(self) -> None:
        name = check_name(self.name, what="service")
        put = self._put
        put("command", _argv(self.command, name, "command"))
        put("env", _env(self.env, name))
        patterns = _list(self.pass_env, name, "pass_env", '["AWS_*", "CI"]')
        put("pass_env", tuple(_glob(p, name, f"pass_env[{i}]") for i, p in enumerate(patterns)))
        put("cwd", None if self.cwd is None else _text(self.cwd, name, "cwd", "directory"))
        ports = _list(self.ports, name, "ports", "ports = [8000]")
        put(
            "ports",
            _unique([_port(p, name, f"ports[{i}]") for i, p in enumerate(ports)], name, "ports"),
        )
        put("depends_on", self._names("depends_on", '["cache"]', "service"))
        if name in self.depends_on:
            i = self.depends_on.index(name)
            _fail("a service cannot depend on itself; remove it", name, f"depends_on[{i}]")
        put("ready", _ready(self.ready, name))
        put("limits", Limits.from_value(self.limits, service=name))
        entries = _list(self.mounts, name, "mounts", '[{ source = "./data", target = "/data" }]')
        mounts = tuple(Mount.from_value(m, service=name, index=i) for i, m in enumerate(entries))
        _unique([m.target for m in mounts], name, "mounts", suffix=".target")
        put("mounts", mounts)
        put("aliases", self._names("aliases", '["shop-api"]', "alias"))
        if name in self.aliases:
            i = self.aliases.index(name)
            _fail(
                "an alias equal to the service name is redundant; remove it", name, f"aliases[{i}]"
            )
        put("user", _user(self.user, name))
        put("stop_timeout", parse_duration(self.stop_timeout, service=name, key="stop_timeout"))

    def _put(self, attr: str, value: object) -> None:
        object.__setattr__(self, attr, value)

    def _names(self, key: str, example: str, what: str) -> tuple[str, ...]:
        items = _list(getattr(self, key), self.name, key, example)
        names = [
            check_name(n, what=what, service=self.name, key=f"{key}[{i}]")
            for i, n in enumerate(items)
        ]
        return _unique(names, self.name, key)

    def __hash__(self) -> int:
        # env is a dict (as promised to callers); hash its items so equal services hash alike and
        # a Service can key the cache of shared environments.
        values = [getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "env"]
        return hash((*values, frozenset(self.env.items())))

    def with_changes(self, **changes: Any) -> Service:
        """A copy with some fields changed, validated again: ``svc.with_changes(ports=[81])``."""
        return dataclasses.replace(self, **changes)


def _unique(items: list[Any], service: str, key: str, suffix: str = "") -> tuple[Any, ...]:
    seen: set[object] = set()
    for i, item in enumerate(items):
        if item in seen:
            _fail(f"{item!r} is listed twice; list it once", service, f"{key}[{i}]{suffix}")
        seen.add(item)
    return tuple(items)


def _env(value: object, service: str) -> dict[str, str]:
    table = _mapping(value if value is not None else {}, service, "env", '{ LOG_LEVEL = "debug" }')
    env: dict[str, str] = {}
    for name, item in table.items():
        key = f"env.{name}" if isinstance(name, str) else f"env[{name!r}]"
        if not isinstance(name, str) or not name or "=" in name or "\0" in name:
            _fail(
                f"{name!r} is not a variable name; use a non-empty name without '='", service, key
            )
        if not isinstance(item, str):
            _fail(f'{_what(item)} is not a string; quote it: {name} = "{item}"', service, key)
        if "\0" in item:
            _fail(f"{item!r} contains a NUL character", service, key)
        env[name] = item
    return env


def _glob(value: object, service: str, key: str) -> str:
    pattern = _text(value, service, key, "variable name pattern")
    if "=" in pattern:
        _fail(f"{pattern!r} holds '='; give only names or globs like 'AWS_*'", service, key)
    return pattern


def _ready(value: object, service: str) -> Probe | None:
    if value is None:
        return None
    if isinstance(value, Probe) and type(value) is not Probe:
        return value
    if isinstance(value, Mapping):
        return probe_from_mapping(value, service=service)
    _fail(
        f"{_what(value)} is not a probe; use probe.tcp(...) or a table like {{ tcp = 6379 }}",
        service,
        "ready",
    )


def _user(value: object, service: str) -> str | None:
    if value is None:
        return None
    if _is_int(value) and value >= 0:
        return str(value)
    if isinstance(value, str) and _USER.match(value):
        return value
    shown = repr(value) if isinstance(value, str) else _what(value)
    _fail(
        f'{shown} is not a user; use a user name like "postgres", a uid like "1000" '
        'or "uid:gid" like "1000:1000"',
        service,
        "user",
    )


def service_from_mapping(name: str, value: Mapping[str, object]) -> Service:
    """A :class:`Service` from a ``[tool.envbox.services.NAME]`` table (see ``Service.KEYS``)."""
    check_name(name, what="service")
    table = _mapping(value, name, None, "a table: [tool.envbox.services.NAME] with a command")
    _check_keys(table, Service.KEYS, name, "")
    if "command" not in table:
        _fail('is missing; say what to run, e.g. command = ["redis-server"]', name, "command")
    kwargs = {k: v for k, v in table.items() if k != "command"}
    return Service(name, table["command"], **kwargs)  # type: ignore[arg-type]
