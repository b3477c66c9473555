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
import os
from collections.abc import Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from pytest_envbox.errors import hide_frames
from pytest_envbox.mounts import HOME, Mount, Volume, tmpfs_sizes
from pytest_envbox.ports import HostRange, parse_host_ports, parse_ports
from pytest_envbox.probe import ExecProbe, HttpProbe, LogProbe, Probe, TcpProbe, probe_from_mapping
from pytest_envbox.validate import (
    DNS_LABEL,
    PIDS_MAX,
    USER,
    argv,
    as_list,
    as_mapping,
    check_keys,
    check_name,
    describe,
    fail,
    is_int,
    parse_cpu,
    parse_duration,
    parse_memory,
    parse_subnet,
    text,
)

__tracebackhide__ = hide_frames  # an error in a declaration shows the user's line, not ours

__all__ = [
    "DNS_LABEL",
    "HOME",
    "POD_IP",
    "ExecProbe",
    "HttpProbe",
    "Limits",
    "LogProbe",
    "Mount",
    "Probe",
    "Service",
    "TcpProbe",
    "Volume",
    "check_name",
    "parse_cpu",
    "parse_duration",
    "parse_memory",
    "parse_subnet",
    "probe_from_mapping",
    "service_from_mapping",
]

@dataclass(frozen=True)
class Limits:
    """Limits of a service: ``memory`` in bytes, ``cpu`` in cores, ``pids`` a count (its cgroup);
    ``nofile``, the open files each of its processes may have (``RLIMIT_NOFILE``).

    None means unlimited, except ``nofile``: None is the default, 1024, as in a containerd
    container. ``Limits(memory="64Mi", cpu="250m")`` stores ``memory=67108864``, ``cpu=0.25``.
    """

    memory: int | None = None
    cpu: float | None = None
    pids: int | None = None
    nofile: int | None = None

    KEYS: ClassVar[tuple[str, ...]] = ("memory", "cpu", "pids", "nofile")

    if TYPE_CHECKING:

        def __init__(
            self,
            memory: int | str | None = None,
            cpu: float | str | None = None,
            pids: int | None = None,
            nofile: int | None = None,
        ) -> None: ...

    def __post_init__(self) -> None:
        self._normalise(service=None)

    def _normalise(self, service: str | None) -> None:
        if self.memory is not None:
            object.__setattr__(self, "memory", parse_memory(self.memory, service=service))
        if self.cpu is not None:
            object.__setattr__(self, "cpu", parse_cpu(self.cpu, service=service))
        if self.pids is not None and (not is_int(self.pids) or self.pids <= 0):
            fail(f"{describe(self.pids)} is not a pid count; use an int > 0", service, "limits.pids")
        if self.pids is not None and self.pids > PIDS_MAX:
            fail(f"{self.pids!r} is more than the kernel's pids.max takes (at most {PIDS_MAX}); "
                 "give fewer, or no pids limit at all", service, "limits.pids")  # fmt: skip
        if self.nofile is not None and (not is_int(self.nofile) or not 0 < self.nofile <= 1 << 20):
            fail(f"{describe(self.nofile)} is not a count of open files; use an int from 1 to "
                 f"{1 << 20} (the kernel's default fs.nr_open)", service, "limits.nofile")

    @classmethod
    def from_value(cls, value: object, *, service: str | None) -> Limits:
        """A :class:`Limits` from itself, a mapping with the keys in :attr:`KEYS`, or None."""
        if value is None:
            return cls()
        if isinstance(value, Limits):
            return value
        table = as_mapping(value, service, "limits", '{ memory = "64Mi", cpu = "250m", pids = 64 }')
        check_keys(table, cls.KEYS, service, "limits.")
        # Validate with the service's name first, so the error says whose limits are wrong.
        draft = object.__new__(cls)
        for name in cls.KEYS:
            object.__setattr__(draft, name, table.get(name))
        draft._normalise(service)
        return cls(draft.memory, draft.cpu, draft.pids, draft.nofile)


# --- readiness probes ----------------------------------------------------------------------------


#: Stands for the service's own address in its ``env`` values and argv (Kubernetes' ``fieldRef:
#: status.podIP``): the engine replaces it once the address is known, at the start.
POD_IP = "@envbox:pod-ip@"


@dataclass(frozen=True, eq=True, unsafe_hash=False)
class Service:
    """One service to run: its command, environment, ports, dependencies, probe and limits.

    >>> Service("cache", "redis-server --port 6379", ports=[6379]).command
    ('redis-server', '--port', '6379')

    Construction validates everything; a mistake raises :class:`ConfigError` naming this service
    and the key. Use :meth:`with_changes` to derive a variant.
    """

    name: str
    #: the whole argv; with an ``image``, () means the image's Entrypoint and Cmd
    command: tuple[str, ...] = ()
    _: KW_ONLY
    env: Mapping[str, str] = field(default_factory=dict)
    pass_env: tuple[str, ...] = ()
    cwd: str | None = None
    ports: tuple[int, ...] = ()
    #: port -> its host port range ``(low, high)`` on 127.0.0.1, for the ports that give one
    #: (``{ port = 6379, host = 6379 }``, ``"8000-8010:80"``); the others get a free port
    host_ports: Mapping[int, HostRange] = field(default_factory=dict)
    depends_on: tuple[str, ...] = ()
    ready: Probe | None = None
    limits: Limits = field(default_factory=Limits)
    mounts: tuple[Mount, ...] = ()
    #: path inside -> size in bytes of a private tmpfs there (``~`` is stored as :data:`HOME`)
    tmpfs: Mapping[str, int] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    user: str | None = None
    stop_timeout: float = 5.0
    #: an OCI image reference (API.md 6); checked against the image grammar when the service is
    #: planned, since reading a reference needs the images layer
    image: str | None = None
    #: with an image: replaces its Cmd, keeps its Entrypoint (Kubernetes' ``args``)
    args: tuple[str, ...] | None = None
    #: with an image: ``"missing"``, ``"always"`` or ``"never"``
    pull: str = "missing"
    #: with an image and no ``ready``: its Healthcheck is the readiness probe (False: none)
    healthcheck: bool = True
    #: the signal that stops it (``"SIGQUIT"``); None: the image's StopSignal, else SIGTERM
    stop_signal: str | None = None
    #: directories of the environment's own, shared by the services naming the same volume
    volumes: tuple[Volume, ...] = ()
    #: the service whose network namespace this one joins (the containers of a Kubernetes pod,
    #: Compose's ``network_mode: service:NAME``): same address, ``localhost`` between them
    network_of: str | None = None
    #: it runs to completion: ready when it exits with code 0, a failure with any other code
    #: (Kubernetes' init containers and Jobs, Compose's ``service_completed_successfully``)
    oneshot: bool = False
    #: a oneshot service that exits with another code is started again, up to this many times
    #: (Kubernetes' Job ``backoffLimit``; an init container is retried too)
    retries: int = 0

    #: The keys of a ``[tool.envbox.services.NAME]`` table.
    KEYS: ClassVar[tuple[str, ...]] = (
        "command", "env", "pass_env", "cwd", "ports", "depends_on", "ready", "limits", "mounts",
        "tmpfs", "aliases", "user", "stop_timeout", "image", "args", "pull", "healthcheck",
        "stop_signal", "volumes", "network_of", "oneshot", "retries",
    )  # fmt: skip
    #: The values of ``pull``, as Kubernetes' IfNotPresent, Always and Never.
    PULL_POLICIES: ClassVar[tuple[str, ...]] = ("missing", "always", "never")

    if TYPE_CHECKING:

        def __init__(
            self,
            name: str,
            command: Sequence[str] | str = (),
            *,
            env: Mapping[str, str] | None = None,
            pass_env: Sequence[str] = (),
            cwd: str | os.PathLike[str] | None = None,
            ports: Sequence[int | str | Mapping[str, object]] = (),
            host_ports: Mapping[int, int | str | tuple[int, int]] | None = None,
            depends_on: Sequence[str] = (),
            ready: Probe | Mapping[str, object] | None = None,
            limits: Limits | Mapping[str, object] | None = None,
            mounts: Sequence[Mount | Mapping[str, object]] = (),
            tmpfs: Mapping[str, int | str] | None = None,
            aliases: Sequence[str] = (),
            user: str | int | None = None,
            stop_timeout: float | str = "5s",
            image: str | None = None,
            args: Sequence[str] | str | None = None,
            pull: str = "missing",
            healthcheck: bool = True,
            stop_signal: str | int | None = None,
            volumes: Sequence[Volume | Mapping[str, object]] = (),
            network_of: str | None = None,
            oneshot: bool = False,
            retries: int = 0,
        ) -> None: ...

    def __post_init__(self) -> None:
        name = check_name(self.name, what="service")
        put = self._put
        self._image_keys(name)
        put("env", _env(self.env, name))
        patterns = as_list(self.pass_env, name, "pass_env", '["AWS_*", "CI"]')
        put("pass_env", tuple(_glob(p, name, f"pass_env[{i}]") for i, p in enumerate(patterns)))
        put("cwd", None if self.cwd is None else text(self.cwd, name, "cwd", "directory"))
        ports, hosts = parse_ports(self.ports, name, parse_host_ports(self.host_ports, name))
        put("ports", ports)
        put("host_ports", hosts)
        put("depends_on", self._names("depends_on", '["cache"]', "service"))
        if name in self.depends_on:
            i = self.depends_on.index(name)
            fail("a service cannot depend on itself; remove it", name, f"depends_on[{i}]")
        put("ready", _ready(self.ready, name))
        put("limits", Limits.from_value(self.limits, service=name))
        entries = as_list(self.mounts, name, "mounts", '[{ source = "./data", target = "/data" }]')
        mounts = tuple(Mount.from_value(m, service=name, index=i) for i, m in enumerate(entries))
        _unique([m.target for m in mounts], name, "mounts", suffix=".target")
        put("mounts", mounts)
        put("tmpfs", tmpfs_sizes(self.tmpfs, name, mounts))
        put("volumes", _volumes(self.volumes, name, mounts))
        self._run_keys(name)
        put("aliases", self._names("aliases", '["shop-api"]', "alias"))
        if name in self.aliases:
            i = self.aliases.index(name)
            fail(
                "an alias equal to the service name is redundant; remove it", name, f"aliases[{i}]"
            )
        put("user", _user(self.user, name))
        put("stop_timeout", parse_duration(self.stop_timeout, service=name, key="stop_timeout"))

    def _image_keys(self, name: str) -> None:
        """``command``, ``image``, ``args`` and ``pull``: a program, or an image and its argv."""
        if self.image is None:
            for key, default in (("args", None), ("pull", "missing")):
                if getattr(self, key) != default:
                    fail("is for images; without `image`, put the whole argv in `command`"
                         if key == "args" else "is for images; remove it or add `image`",
                         name, key)  # fmt: skip
            if self.command == ():
                fail('is missing; say what to run, e.g. command = ["redis-server"], or give an '
                     '`image`', name, "command")  # fmt: skip
            self._put("command", argv(self.command, name, "command"))
            return
        ref = text(self.image, name, "image", "image reference")
        if not ref.strip() or ref != ref.strip():
            fail(f"{ref!r} is not an image reference; write one like \"redis:7\" or "
                 "\"oci:./images/app:1.0\"", name, "image")  # fmt: skip
        self._put("image", ref)
        has_command = self.command not in ((), [], "")
        self._put("command", argv(self.command, name, "command") if has_command else ())
        if self.args is not None:
            if has_command:
                fail("and `command` are both given: `command` is the whole argv (it replaces the "
                     "image's Entrypoint and Cmd), so put the arguments there and remove `args`",
                     name, "args")  # fmt: skip
            self._put("args", _args(self.args, name))
        if self.pull not in self.PULL_POLICIES:
            fail(f"{describe(self.pull)} is not a pull policy; use one of "
                 f"{', '.join(map(repr, self.PULL_POLICIES))}", name, "pull")  # fmt: skip

    def _run_keys(self, name: str) -> None:
        """``stop_signal``, ``network_of``, ``oneshot`` and ``healthcheck``."""
        if self.stop_signal is not None:
            self._put("stop_signal", parse_signal(self.stop_signal, name, "stop_signal"))
        if self.network_of is not None:
            other = check_name(self.network_of, what="service", service=name, key="network_of")
            if other == name:
                fail("a service cannot join its own network; remove it", name, "network_of")
            if other not in self.depends_on:  # its namespace must exist first
                self._put("depends_on", (*self.depends_on, other))
        for key in ("oneshot", "healthcheck"):
            if not isinstance(getattr(self, key), bool):
                fail(f"{describe(getattr(self, key))} is not true or false", name, key)
        if not is_int(self.retries) or not 0 <= self.retries <= 100:
            fail(f"{describe(self.retries)} is not a count of retries; use an int from 0 to 100",
                 name, "retries")  # fmt: skip
        if self.retries and not self.oneshot:
            fail("is for oneshot services (retried when they exit with another code than 0); "
                 "add oneshot = true or remove it", name, "retries")  # fmt: skip
        if self.oneshot and self.ready is not None:
            fail("is for long-running services; a oneshot service is ready when it exits with "
                 "code 0: remove `ready` or `oneshot`", name, "ready")  # fmt: skip

    def _put(self, attr: str, value: object) -> None:
        object.__setattr__(self, attr, value)

    def _names(self, key: str, example: str, what: str) -> tuple[str, ...]:
        items = as_list(getattr(self, key), self.name, key, example)
        names = [
            check_name(n, what=what, service=self.name, key=f"{key}[{i}]")
            for i, n in enumerate(items)
        ]
        return _unique(names, self.name, key)

    def __hash__(self) -> int:
        # env is a dict (as promised to callers); hash its items so equal services hash alike and
        # a Service can key the cache of shared environments.
        values = [getattr(self, f.name) for f in dataclasses.fields(self)
                  if f.name not in ("env", "tmpfs", "host_ports")]  # fmt: skip
        return hash((*values, frozenset(self.env.items()), frozenset(self.tmpfs.items()),
                     frozenset(self.host_ports.items())))  # fmt: skip

    def with_changes(self, **changes: Any) -> Service:
        """A copy with some fields changed, validated again: ``svc.with_changes(ports=[81])``.

        New ``ports`` keep the host ports of those still listed (a host in an entry wins);
        ``host_ports={}`` drops them all: every port then gets a free host port.
        """
        if "ports" in changes and "host_ports" not in changes:
            listed, _ = parse_ports(changes["ports"], self.name)
            changes["host_ports"] = {p: h for p, h in self.host_ports.items() if p in listed}
        return dataclasses.replace(self, **changes)


def _args(value: object, service: str) -> tuple[str, ...]:
    """``args``: like a command, but it may be empty (``args = []``: the Cmd dropped)."""
    if value in ([], ()):
        return ()
    if isinstance(value, str):
        return argv(value, service, "args") if value.strip() else ()
    items = as_list(value, service, "args", '["--port", "8000"]')
    for i, item in enumerate(items):
        if not isinstance(item, str) or "\0" in item:
            fail(f"{describe(item)} is not a string argument; quote every argument", service,
                 f"args[{i}]")  # fmt: skip
    return tuple(items)  # type: ignore[arg-type]  # every item checked above


def _unique(items: list[Any], service: str, key: str, suffix: str = "") -> tuple[Any, ...]:
    seen: set[object] = set()
    for i, item in enumerate(items):
        if item in seen:
            fail(f"{item!r} is listed twice; list it once", service, f"{key}[{i}]{suffix}")
        seen.add(item)
    return tuple(items)


def _env(value: object, service: str) -> dict[str, str]:
    table = as_mapping(value if value is not None else {}, service, "env", '{ LOG_LEVEL = "debug" }')
    env: dict[str, str] = {}
    for name, item in table.items():
        key = f"env.{name}" if isinstance(name, str) else f"env[{name!r}]"
        if not isinstance(name, str) or not name or "=" in name or "\0" in name:
            fail(
                f"{name!r} is not a variable name; use a non-empty name without '='", service, key
            )
        if not isinstance(item, str):
            fail(f'{describe(item)} is not a string; quote it: {name} = "{item}"', service, key)
        if "\0" in item:
            fail(f"{item!r} contains a NUL character", service, key)
        env[name] = item
    return env


def _volumes(value: object, service: str, mounts: tuple[Mount, ...]) -> tuple[Volume, ...]:
    example = '[{ volume = "pgdata", target = "/var/lib/postgresql/data" }]'
    items = as_list(value, service, "volumes", example)
    volumes = tuple(Volume.from_value(v, service=service, index=i) for i, v in enumerate(items))
    taken = {m.target for m in mounts}
    for i, v in enumerate(volumes):
        if v.target in taken:
            fail(f"{v.target!r} is mounted already; mount one thing there", service,
                 f"volumes[{i}].target")  # fmt: skip
        taken.add(v.target)
    return volumes


def parse_signal(value: object, service: str | None, key: str) -> str:
    """A signal by name (``"SIGQUIT"``, ``"QUIT"``) or number, as its name: ``"SIGQUIT"``."""
    import signal

    try:
        if is_int(value):
            return signal.Signals(value).name
        if isinstance(value, str):
            name = value.upper()
            return signal.Signals[name if name.startswith("SIG") else "SIG" + name].name
    except (KeyError, ValueError):
        pass
    fail(f"{describe(value) if not isinstance(value, str) else repr(value)} is not a signal; use a "
         'name like "SIGQUIT" or "SIGINT"', service, key)  # fmt: skip


def _glob(value: object, service: str, key: str) -> str:
    pattern = text(value, service, key, "variable name pattern")
    if "=" in pattern:
        fail(f"{pattern!r} holds '='; give only names or globs like 'AWS_*'", service, key)
    return pattern


def _ready(value: object, service: str) -> Probe | None:
    if value is None:
        return None
    if isinstance(value, Probe) and type(value) is not Probe:
        return value
    if isinstance(value, Mapping):
        return probe_from_mapping(value, service=service)
    fail(
        f"{describe(value)} is not a probe; use probe.tcp(...) or a table like {{ tcp = 6379 }}",
        service,
        "ready",
    )


def _user(value: object, service: str) -> str | None:
    if value is None:
        return None
    if is_int(value) and value >= 0:
        return str(value)
    if isinstance(value, str) and USER.match(value):
        return value
    shown = repr(value) if isinstance(value, str) else describe(value)
    fail(
        f'{shown} is not a user; use a user name like "postgres", a uid like "1000", '
        'either with a group: "postgres:postgres", "1000:1000"',
        service,
        "user",
    )


def service_from_mapping(name: str, value: Mapping[str, object]) -> Service:
    """A :class:`Service` from a ``[tool.envbox.services.NAME]`` table (see ``Service.KEYS``)."""
    check_name(name, what="service")
    table = as_mapping(value, name, None, "a table: [tool.envbox.services.NAME] with a command")
    check_keys(table, Service.KEYS, name, "")
    if "command" not in table and "image" not in table:
        fail('is missing; say what to run, e.g. command = ["redis-server"], or give an `image`',
             name, "command")  # fmt: skip
    kwargs = {k: v for k, v in table.items() if k != "command"}
    return Service(name, table.get("command", ()), **kwargs)  # type: ignore[arg-type]

