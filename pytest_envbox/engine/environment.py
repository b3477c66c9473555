"""``Environment`` and ``ServiceHandle``: the engine's public face, usable without pytest.

An :class:`Environment` is a set of services started together (in dependency order, independent
ones in parallel) and torn down together. Each running service is a :class:`ServiceHandle`, which
refers to its :class:`~pytest_envbox.spec.Service` (the frozen declaration) but never is one.

Everything is checked before anything is started: users, commands, working directories and mount
sources are resolved when the environment is built, so bad input is a ``ConfigError`` with nothing
to clean up.
"""

from __future__ import annotations

import contextlib
import fnmatch
import itertools
import os
import pwd
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import astuple, dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from pytest_envbox.config import Catalog, select, start_levels
from pytest_envbox.engine import readiness
from pytest_envbox.engine.client import SupervisorClient, SupervisorError, get_supervisor, rootless
from pytest_envbox.errors import ConfigError, EnvboxError, HostUnsupported, NotReady, ServiceFailed
from pytest_envbox.kernel.cgroups import format_memory
from pytest_envbox.sandbox.init import HOME, SandboxPlan
from pytest_envbox.spec import HttpProbe, Service, parse_subnet
from pytest_envbox.wait import Deadline, wait_until

if TYPE_CHECKING:
    import requests

__all__ = ["Environment", "Link", "Network", "ServiceHandle", "Stats"]

_env_ids = itertools.count(1)
#: Each environment's private network. Any subnet works (it exists only inside the environment's
#: own namespaces, never on the host), but a service's configuration may name real addresses;
#: 198.18.0.0/15 is reserved for benchmarking (RFC 2544): never routed, seldom used by anyone.
DEFAULT_SUBNET = "198.18.0.0/24"


def _unsupported(e: SupervisorError, prefix: str = "") -> HostUnsupported | None:
    """The supervisor's ``unsupported:<why and fix>`` answer as a HostUnsupported, else None."""
    text = str(e)
    if "unsupported:" not in text:
        return None
    return HostUnsupported(prefix + text.split("unsupported:", 1)[1])


class _Subnet:
    """An environment's IPv4 subnet: the hub (bridge) takes the first address, services the next."""

    def __init__(self, subnet: str) -> None:
        import ipaddress

        self.network = ipaddress.IPv4Network(parse_subnet(subnet))
        hosts = self.network.hosts()
        self.gateway = str(next(hosts))
        self._free = hosts
        self.assigned: dict[str, str] = {}

    def address(self, name: str) -> str:
        """The service's address (the same one for the environment's lifetime)."""
        if name not in self.assigned:
            try:
                self.assigned[name] = str(next(self._free))
            except StopIteration:
                raise ConfigError(f"subnet {self.network} has no address left for service "
                                  f"{name!r}; choose a larger subnet") from None  # fmt: skip
        return self.assigned[name]

    def wire(self, name: str) -> dict[str, Any]:
        return {"ip": self.address(name), "prefix": self.network.prefixlen, "gateway": self.gateway}

_DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _resolve_user(spec: Service) -> tuple[int, int, list[int]]:
    """(uid, gid, supplementary groups) for the service's ``user`` (default: the caller's)."""
    user = spec.user
    if user is None:
        return os.getuid(), os.getgid(), sorted(set(os.getgroups()) | {os.getgid()})
    if ":" in user:
        uid_s, gid_s = user.split(":", 1)
        return int(uid_s), int(gid_s), [int(gid_s)]
    if user.isdigit():
        uid = int(user)
        try:
            pw = pwd.getpwuid(uid)
        except KeyError:
            return uid, uid, [uid]  # no passwd entry: its own group, nothing else
        return uid, pw.pw_gid, sorted(set(os.getgrouplist(pw.pw_name, pw.pw_gid)))
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise ConfigError(
            f"there is no user {user!r} on this host; use a name from /etc/passwd, "
            "a numeric uid, or 'uid:gid'", service=spec.name, key="user",
        ) from None
    return pw.pw_uid, pw.pw_gid, sorted(set(os.getgrouplist(pw.pw_name, pw.pw_gid)))


def _rootless_ids(uid: int, gid: int, groups: list[int]) -> tuple[int, int, list[int]]:
    """Ids inside rootless mode's user namespace: the caller is root there; other users keep
    their numbers, which exist there when a subordinate id range is mapped (checked at open)."""
    if uid in (os.getuid(), 0):  # the caller, or root: both are the namespace's root
        return 0, 0, []
    return uid, gid, groups


def _check_ids(sup: SupervisorClient, specs: Iterable[Service], plans: Mapping[str, SandboxPlan]
               ) -> None:  # fmt: skip
    """Refuse, before anything starts, a service whose user does not exist in the user namespace."""
    for spec in specs:
        plan = plans[spec.name]
        missing = [f"{kind} {i}" for kind, ids in (("uid", [plan.uid]), ("gid", [plan.gid, *plan.groups]))
                   for i in sorted(set(ids)) if not sup.maps(kind, i)]  # fmt: skip
        if missing:
            raise HostUnsupported(
                f"service {spec.name!r} runs as user {spec.user!r}, but in rootless mode only your "
                f"own user (as root) and a subordinate id range exist in the services' user "
                f"namespace, and {', '.join(missing)} is not mapped. Give your user a range of "
                f"65536 ids (`sudo usermod --add-subuids 100000-165535 --add-subgids "
                f"100000-165535 $USER`) and install newuidmap (`sudo apt install uidmap`); or "
                f"remove `user` to run it as yourself; or run the tests as root "
                f"(--envbox-rootless=no).")  # fmt: skip


def _base_env(spec: Service) -> dict[str, str]:
    """API 1.1: a fixed base, ``pass_env`` matches from the host, then the service's ``env``."""
    env = {
        "PATH": os.environ.get("PATH", _DEFAULT_PATH),
        "HOME": HOME,
        "HOSTNAME": spec.name,
        "LANG": "C.UTF-8",
        "TMPDIR": "/tmp",
    }
    for pattern in spec.pass_env:
        for key, value in os.environ.items():
            if fnmatch.fnmatchcase(key, pattern):
                env[key] = value
    env.update(spec.env)
    return env


def plan_for(spec: Service, rootdir: Path) -> SandboxPlan:
    """Check a declaration against this host and turn it into a sandbox plan. Starts nothing."""
    uid, gid, groups = _resolve_user(spec)
    if rootless():
        uid, gid, groups = _rootless_ids(uid, gid, groups)
    env = _base_env(spec)
    cwd = Path(spec.cwd) if spec.cwd else rootdir
    if not cwd.is_absolute():
        cwd = rootdir / cwd
    if not cwd.is_dir():
        raise ConfigError(f"working directory {str(cwd)!r} does not exist on this host; "
                          "give an existing directory (relative paths start at the rootdir)",
                          service=spec.name, key="cwd")  # fmt: skip
    mounts: list[tuple[str, str, bool]] = []
    for i, m in enumerate(spec.mounts):
        src = Path(m.source) if os.path.isabs(m.source) else rootdir / m.source
        if not src.exists():
            raise ConfigError(f"mount source {str(src)!r} does not exist; give an existing file "
                              "or directory (relative paths start at the rootdir)",
                              service=spec.name, key=f"mounts[{i}].source")  # fmt: skip
        mounts.append((str(src.resolve()), m.target, m.readonly))
    argv0 = spec.command[0]
    if "/" in argv0:
        exe = argv0 if os.path.isabs(argv0) else str(cwd / argv0)
        inside_mount = any(exe == t or exe.startswith(t.rstrip("/") + "/") for _, t, _ in mounts)
        if not inside_mount and not (os.path.isfile(exe) and os.access(exe, os.X_OK)):
            raise ConfigError(f"{argv0!r} is not an executable file on this host",
                              service=spec.name, key="command")  # fmt: skip
        executable = exe if not inside_mount else ""
    else:
        found = shutil.which(argv0, path=env["PATH"])
        if found is None:
            raise ConfigError(f"{argv0!r} was not found on PATH ({env['PATH']}); install it or "
                              "give its full path", service=spec.name, key="command")  # fmt: skip
        executable = found
    # The cwd and the program's prefix (a virtualenv, say) stay visible even under /tmp, which is
    # otherwise private: a checkout or a tox env living there must still run.
    expose = [str(cwd)]
    if executable:
        expose.append(os.path.dirname(os.path.dirname(executable)))
    return SandboxPlan(name=spec.name, argv=list(spec.command), executable=executable, env=env,
                       cwd=str(cwd), uid=uid, gid=gid, groups=groups, mounts=mounts,
                       expose=expose)  # fmt: skip


class Environment:
    """A set of sandboxed services, started together and torn down together.

    Example::

        with Environment([Service("web", "python -m http.server 8000", ports=[8000],
                                  ready=probe.http(8000))]) as env:
            assert env["web"].http.get("/").status_code == 200

    ``services`` are :class:`Service` objects or names from ``catalog`` (the project's
    declarations); every dependency is added. ``rootdir`` anchors relative paths (default: the
    current directory). Logs and generated files go to ``workdir`` (default: a temporary directory
    removed on exit, which also holds the logs: pass a directory to keep them).
    """

    def __init__(
        self,
        services: Iterable[Service | str] = (),
        *,
        topology: str | None = None,
        catalog: Catalog | None = None,
        rootdir: str | os.PathLike[str] | None = None,
        workdir: str | os.PathLike[str] | None = None,
        subnet: str | None = None,
        on_ready: Callable[[ServiceHandle], None] | None = None,
        on_close: Callable[[Environment], None] | None = None,
        modify_service: Callable[[Service], Service] | None = None,
    ) -> None:
        self.catalog = catalog if catalog is not None else Catalog({}, {}, {})
        self._net = _Subnet(subnet or self.catalog.subnet or DEFAULT_SUBNET)
        #: called after each start of a service has passed its readiness probe, and once the
        #: environment is closed (the pytest plugin calls its hooks from these)
        self.on_ready = on_ready
        self.on_close = on_close
        #: applied to the Service objects given to start() (the plugin's modify_service hook)
        self.modify_service = modify_service
        self.rootdir = Path(rootdir if rootdir is not None else os.getcwd()).resolve()
        specs = select(self.catalog, list(services), topology)
        self._levels = start_levels(specs)
        self._plans = {s.name: plan_for(s, self.rootdir) for s in specs}
        self._specs = {s.name: s for s in specs}
        self.id = f"{os.getpid()}-{next(_env_ids)}"
        self._given_workdir = Path(workdir) if workdir is not None else None
        self.workdir: Path | None = None
        self._handles: dict[str, ServiceHandle] = {}
        self._order: list[str] = []  # start order, for teardown in reverse
        self._listed: set[str] = set()  # services in the environment's /etc/hosts
        self.network = Network(self)
        self._sup: SupervisorClient | None = None
        self._closed = False
        #: why the environment is to outlive the process (``--envbox-keep``), see ``_keep()``
        self._keep_reason: str | None = None
        self._kept = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("open" if self._sup is not None else "not started")
        return f"<Environment {self.id} {state}: {', '.join(self._handles) or 'no services'}>"

    # --- mapping of running services ------------------------------------------------------

    @property
    def services(self) -> Mapping[str, ServiceHandle]:
        """The services of this environment by name (a read-only view)."""
        from types import MappingProxyType

        return MappingProxyType(self._handles)

    def __getitem__(self, name: str) -> ServiceHandle:
        try:
            return self._handles[name]
        except KeyError:
            known = ", ".join(sorted(self._handles)) or "none"
            raise KeyError(f"no service {name!r} in this environment; it has: {known}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._handles

    def __iter__(self) -> Iterator[str]:
        return iter(self._handles)

    def __len__(self) -> int:
        return len(self._handles)

    # --- lifecycle ----------------------------------------------------------------------------

    def __enter__(self) -> Environment:
        self.open()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:  # fmt: skip
        self.close()

    def open(self) -> None:
        """Start every declared service; on any failure, tear down what started and raise."""
        if self._closed:
            raise EnvboxError("this environment is closed; create a new Environment to start services")
        if self._sup is not None:
            return
        if not sys.platform.startswith("linux"):
            raise HostUnsupported(
                f"pytest-envbox runs services in Linux namespaces; this is {sys.platform}. "
                "Run the tests on Linux (a VM or a container will do)."
            )
        if os.geteuid() != 0 and not rootless():
            raise HostUnsupported(
                "rootless mode is off (--envbox-rootless=no, or ENVBOX_ROOTLESS=no) and this "
                "process is not root: namespaces, mounts and networks need root or a user "
                "namespace. Run the tests as root, or allow rootless mode (auto or yes)."
            )
        sup = get_supervisor()
        _check_cgroups(sup, self._specs.values())
        if sup.ids:
            _check_ids(sup, self._specs.values(), self._plans)
        self._sup = sup
        if self._given_workdir is not None:
            self._given_workdir.mkdir(parents=True, exist_ok=True)
            self.workdir = self._given_workdir
        else:
            self.workdir = Path(tempfile.mkdtemp(prefix="envbox-"))
            self._sup.send("own_dir", path=str(self.workdir), own=True)
        try:
            self._list_hosts(self._specs.values(), fresh=True)
            self._start_levels(self._levels)
        except BaseException:
            self.close()
            raise

    def start(self, service: Service | str) -> ServiceHandle:
        """Start one more service (and whatever it depends on that is not here yet)."""
        if self._closed:
            raise EnvboxError("this environment is closed; create a new Environment to start services")
        if self._sup is None:
            self.open()
        if isinstance(service, Service) and self.modify_service is not None:
            service = self.modify_service(service)
        if isinstance(service, str) and service in self._handles:
            h = self._handles[service]
            if not h.running:
                h.start()
            return h
        specs = select(self.catalog, [service, *self._specs.values()], None)
        new = [s for s in specs if s.name not in self._handles]
        assert self._sup is not None
        _check_cgroups(self._sup, new)
        levels = start_levels([*self._specs.values(), *(s for s in new if s.name not in self._specs)])
        plans = {s.name: self._plans.get(s.name) or plan_for(s, self.rootdir) for s in new}
        if self._sup.ids:
            _check_ids(self._sup, new, plans)
        for s in new:
            self._plans[s.name] = plans[s.name]
            self._specs[s.name] = s
        wanted = {s.name for s in new}
        self._list_hosts(new)
        # Only the levels with a new service: the others (all running already) have nothing to do.
        self._start_levels([lvl for lvl in ([s for s in lvl if s.name in wanted] for lvl in levels) if lvl])
        name = service if isinstance(service, str) else service.name
        return self._handles[name]

    def _list_hosts(self, specs: Iterable[Service], *, fresh: bool = False) -> None:
        """Add services (name and aliases) to the environment's ``/etc/hosts``, in place.

        One file, bound into every service: appending to it (same inode) is how running services
        learn of one started later. Programs that cache lookups keep their old answers.
        """
        assert self.workdir is not None
        lines = []
        if fresh:
            lines.append("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n")
        for spec in specs:
            if spec.name not in self._listed:
                address = self._net.address(spec.name)  # may fail (subnet full): before listing
                self._listed.add(spec.name)
                lines.append(f"{address}\t{' '.join([spec.name, *spec.aliases])}\n")
        with open(self.workdir / "hosts", "w" if fresh else "a") as f:
            f.write("".join(lines))  # one write: a reader sees the old file or the new one

    def _start_levels(self, levels: Sequence[Sequence[Service]]) -> None:
        """Start level after level; the services of a level together.

        Together means overlapped, not one after the other: the supervisor prepares a sandbox for
        each at once (``prepare``: namespaces, filesystem, cgroup, each in its own process), the
        starts are sent together, and the readiness probes run side by side. A level starts
        once every service of the one before is ready.
        """
        assert self._sup is not None and self.workdir is not None
        for level in levels:
            handles = []
            for spec in level:
                h = ServiceHandle(self, spec, self._plans[spec.name], self._sup, self.workdir)
                self._handles[spec.name] = h
                self._order.append(spec.name)
                h._create()
                handles.append(h)
            if len(handles) == 1:
                handles[0]._spawn()
                handles[0]._wait_ready()
                continue
            self._sup.send("prepare", count=len(handles))
            with ThreadPoolExecutor(max_workers=len(handles)) as pool:
                for step in (ServiceHandle._spawn, ServiceHandle._wait_ready):
                    futures = [pool.submit(step, h) for h in handles]
                    done, _ = wait(futures, return_when=FIRST_EXCEPTION)
                    failed = [f for f in futures if f in done and f.exception() is not None]
                    if failed:
                        # Fail at once: stop the siblings, whose probes then end without waiting
                        # out their own timeouts, and report the first failure.
                        if step is ServiceHandle._spawn:
                            wait(futures)  # every start answered: none is left half-made
                        for h in handles:
                            with contextlib.suppress(EnvboxError, OSError):
                                if h.running:
                                    h._signal(signal.SIGKILL, "init", wait=False)
                        error = failed[0].exception()
                        assert error is not None
                        raise error

    def report(self) -> dict[str, Any]:
        """What happened in this environment: per service, its limits and one record per run
        (start, ready and stop times as Unix time; return code; peak memory, cpu seconds and
        OOM kills from its cgroup, once the run ended). The JSON of ``--envbox-report``."""
        services: dict[str, dict[str, Any]] = {}
        for name, h in self._handles.items():
            lim = h.spec.limits
            services[name] = {"limits": {"memory": lim.memory, "cpu": lim.cpu, "pids": lim.pids},
                              "ip": h.ip, "runs": [dict(r) for r in h.runs],
                              "log": str(h.log_path)}  # fmt: skip
            if self._kept:  # how to reach it now: its host pid and published ports
                services[name].update(pid=h.pid, ports={str(p): h.port(p) for p in h._ports})
        return {"id": self.id, "subnet": str(self._net.network), "services": services,
                "kept": self._keep_reason if self._kept else None, "rootless": rootless()}  # fmt: skip

    def _keep(self, why: str) -> None:
        """Leave the services running at ``close()``, and after this process ends, until
        ``envbox clean`` (the plugin's ``--envbox-keep``, for a failed test)."""
        self._keep_reason = why

    def close(self) -> None:
        """Stop every service (reverse start order) and release everything. Idempotent."""
        if self._closed or self._sup is None:
            self._closed = True
            return
        self._closed = True
        handles = [self._handles[n] for n in reversed(self._order)]
        if self._keep_reason is not None and any(h.running for h in handles):
            with contextlib.suppress(EnvboxError, OSError):
                self._sup.call("keep", env=self.id, why=self._keep_reason)
                self._kept = True
        if self._kept:
            if self.on_close is not None:
                self.on_close(self)
            return
        # SIGTERM to all at once, then wait for each: teardown takes the slowest service's
        # time, not the sum.
        for h in handles:
            with contextlib.suppress(EnvboxError, OSError):
                if h.running:  # a paused service is resumed first, to handle it
                    h._signal(signal.SIGTERM, "main", wait=False, thaw=True)
        for h in handles:
            with contextlib.suppress(EnvboxError, OSError):
                h._await_exit(h.spec.stop_timeout)
        owned = self._given_workdir is None and self.workdir is not None
        with contextlib.suppress(EnvboxError, OSError):
            self._sup.call("release", slots=[h._slot for h in handles],
                           disown=str(self.workdir) if owned else None)  # fmt: skip
        for h in handles:
            h._forget()
        if owned and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
        if self.on_close is not None:
            self.on_close(self)


class Network:
    """An environment's private network (``env.network``): partitions between groups of services.

    ``partition(["api"], ["cache", "db"])`` drops every packet between a service of the first
    group and one of the second, both ways, until ``heal()``; other traffic, and the test's own
    through published ports, is untouched. Partitions add up: each call cuts more pairs.
    """

    def __init__(self, env: Environment) -> None:
        self._env = env

    def __repr__(self) -> str:
        return f"<Network of {self._env.id}: {self._env._net.network}>"

    @property
    def subnet(self) -> str:
        return str(self._env._net.network)

    def partition(self, group_a: Iterable[str | ServiceHandle],
                  group_b: Iterable[str | ServiceHandle]) -> None:  # fmt: skip
        """Cut all traffic between the services of ``group_a`` and those of ``group_b``."""
        a, b = self._names(group_a), self._names(group_b)
        both = set(a) & set(b)
        if both:
            raise ValueError(f"network.partition(): {sorted(both)} in both groups; a service "
                             "cannot be cut off from itself")  # fmt: skip
        self._call("partition", a=a, b=b)

    def heal(self) -> None:
        """Undo every partition."""
        self._call("heal")

    def _names(self, group: Iterable[str | ServiceHandle]) -> list[str]:
        if isinstance(group, str):
            group = [group]  # one name, not its letters
        names = [g.name if isinstance(g, ServiceHandle) else g for g in group]
        for n in names:
            if n not in self._env._handles:
                known = ", ".join(sorted(self._env._handles)) or "none"
                raise KeyError(f"network.partition(): no service {n!r} in this environment; it "
                               f"has: {known}")  # fmt: skip
        if not names:
            raise ValueError("network.partition(): each group needs at least one service")
        return names

    def _call(self, op: str, **kw: Any) -> None:
        sup = self._env._sup
        if sup is None:
            if op == "heal":
                return
            raise EnvboxError("network.partition(): the environment is not open")
        try:
            sup.call(op, env=self._env.id, **kw)
        except SupervisorError as e:
            raise _unsupported(e) or EnvboxError(f"network.{op}() failed: {e}") from None


class Link:
    """Faults on one service's network link (``handle.link``), for testing how others cope.

    Applied on the environment's side of the service's veth pair, so they hit its traffic with
    other services and with the test through a published port alike, and the service cannot undo
    them. What each affects:

    - ``down()`` / ``up()``: the link itself; nothing reaches the service or leaves it.
    - ``delay(ms, jitter_ms=0)``: packets *to* the service wait ``ms`` (netem); a round trip
      through it grows by ``ms``. Needs the kernel's ``sch_netem``; ``HostUnsupported`` otherwise.
    - ``loss(percent)``: that share of packets is dropped at random, in each direction on its
      own (a drop rule on the environment's bridge, nf_tables).
    - ``clear()``: no delay, no loss, link up.
    """

    def __init__(self, handle: ServiceHandle) -> None:
        self._h = handle

    def __repr__(self) -> str:
        return f"<Link of {self._h.name!r}>"

    def down(self) -> None:
        """Cut the service's link: connections to and from it fail until ``up()``."""
        self._do("down")

    def up(self) -> None:
        self._do("up")

    def delay(self, ms: float, jitter_ms: float = 0) -> None:
        """Delay packets to the service by ``ms`` milliseconds (plus or minus ``jitter_ms``)."""
        for key, v in (("ms", ms), ("jitter_ms", jitter_ms)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"link.delay(): {key} must be a number of milliseconds >= 0, "
                                 f"not {v!r}")  # fmt: skip
        self._do("delay", delay_ms=float(ms), jitter_ms=float(jitter_ms))

    def loss(self, percent: float) -> None:
        """Drop ``percent`` % of the packets crossing the link, each way, at random.

        ``loss(100)`` drops everything (connections fail, the link stays up); ``loss(0)`` none.
        """
        if isinstance(percent, bool) or not isinstance(percent, (int, float)) or not 0 <= percent <= 100:
            raise ValueError(f"link.loss(): percent must be a number from 0 to 100, not {percent!r}")
        self._do("loss", percent=round(percent))

    def clear(self) -> None:
        """Remove every fault from the link: no delay, no loss, link up."""
        self._do("clear")

    def _do(self, action: str, **kw: Any) -> None:
        h = self._h
        try:
            h._sup.call("link", slot=h._slot, action=action, **kw)
        except SupervisorError as e:
            raise (_unsupported(e, f"service {h.name!r}: ")
                   or EnvboxError(f"service {h.name!r}: link.{action}() failed: {e}")) from None


@dataclass(frozen=True)
class Stats:
    """A service's resource use, from its cgroup (see :meth:`ServiceHandle.stats`).

    ``memory_peak_bytes`` is the kernel's high-water mark where it keeps one (cgroup v1, and v2
    from Linux 5.19), otherwise the highest value seen by ``stats()`` calls. ``oom_kills`` counts
    processes of the service killed for exceeding its memory limit.
    """

    memory_bytes: int
    memory_peak_bytes: int
    cpu_seconds: float
    pids: int
    oom_kills: int


_warned_no_cgroups = False


def _check_cgroups(sup: SupervisorClient, specs: Iterable[Service]) -> None:
    """Refuse limits where cgroups cannot be written, before anything starts; else warn once."""
    global _warned_no_cgroups
    problem = sup.cgroups.get("problem")
    if not problem:
        return
    limited = [s.name for s in specs if any(v is not None for v in astuple(s.limits))]
    if limited:
        raise HostUnsupported(f"service {limited[0]!r} declares limits, but {problem}")
    if not _warned_no_cgroups:
        _warned_no_cgroups = True
        warnings.warn(f"pytest-envbox runs services without cgroups (no limits, no stats(), no "
                      f"pause()): {problem}", RuntimeWarning, stacklevel=3)  # fmt: skip


def _make_session(base: str) -> requests.Session:
    import requests

    class BaseUrlSession(requests.Session):
        """A ``requests.Session`` whose relative URLs resolve against the service's URL."""

        def request(self, method: str | bytes, url: Any, *a: Any, **kw: Any) -> Any:
            if isinstance(url, str) and not url.startswith(("http://", "https://")):
                url = base.rstrip("/") + "/" + url.lstrip("/")
            return super().request(method, url, *a, **kw)

    return BaseUrlSession()


class ServiceHandle:
    """A running (or stopped) service of an :class:`Environment`."""

    def __init__(self, env: Environment, spec: Service, plan: SandboxPlan,
                 sup: SupervisorClient, workdir: Path) -> None:  # fmt: skip
        self.spec = spec
        self.name = spec.name
        self._plan = plan
        self._sup = sup
        self._env = env
        self._slot = f"{env.id}/{spec.name}"
        self._net = env._net.wire(spec.name)
        self._hosts = workdir / "hosts"
        self.log_path = workdir / f"{spec.name}.log"
        self._log_start = 0
        self._ports: dict[int, int] = {}
        self._pid: int | None = None
        self._returncode: int | None = None
        self._generation = 0
        self._exited = threading.Event()
        self._exited.set()
        self._lock = threading.Lock()
        self._session: requests.Session | None = None
        self._reason = ""
        self._oom_kills = 0
        #: one record per start: wall-clock times and, once it ended, its cgroup's totals
        self.runs: list[dict[str, Any]] = []

    def __repr__(self) -> str:
        state = "running" if self.running else f"exited {self._returncode}"
        return f"<ServiceHandle {self.name} pid={self._pid} {state}>"

    # --- state --------------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """Host pid of the service's main process (None when it is not running)."""
        return self._pid if self.running else None

    @property
    def running(self) -> bool:
        return not self._exited.is_set()

    @property
    def returncode(self) -> int | None:
        """None while running; the exit code, or 128 + signal number, once it has exited."""
        return None if self.running else self._returncode

    @property
    def link(self) -> Link:
        """Faults on the service's network link: ``down()``, ``up()``, ``delay()``, ``loss()``,
        ``clear()`` (see :class:`Link`)."""
        return Link(self)

    @property
    def ip(self) -> str:
        """The service's address on the environment's private network (it keeps it on restart)."""
        return str(self._net["ip"])

    # --- ports and HTTP -----------------------------------------------------------------------

    def port(self, p: int) -> int:
        """The host port on 127.0.0.1 where the service's port ``p`` is published."""
        try:
            return self._ports[p]
        except KeyError:
            ports = list(self.spec.ports) or "none"
            raise KeyError(f"service {self.name!r} publishes no port {p}; its ports are {ports} "
                           "(declare it in 'ports')") from None  # fmt: skip

    def url(self, path: str = "/", port: int | None = None, scheme: str = "http") -> str:
        """A URL on 127.0.0.1 reaching ``port`` (default: the first declared) of the service."""
        if port is None:
            if not self.spec.ports:
                raise KeyError(f"service {self.name!r} declares no ports; add 'ports' to use url()")
            port = self.spec.ports[0]
        return f"{scheme}://127.0.0.1:{self.port(port)}/{path.lstrip('/')}"

    @property
    def http(self) -> requests.Session:
        """A ``requests.Session`` whose relative URLs resolve against :meth:`url`."""
        if self._session is None:
            self._session = _make_session(self.url("/"))
        return self._session

    # --- logs ---------------------------------------------------------------------------------

    def logs(self) -> str:
        """Everything the service wrote to stdout and stderr so far (all its runs)."""
        try:
            return self.log_path.read_bytes().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, pattern: str, timeout: float = 30.0) -> Any:
        """Wait until a line of the log matches ``pattern`` (``re.search``); return the match.

        Lines of the current run are searched, from its start (after ``restart()``, the new
        run's), including those written before the call.
        """
        import re

        regex = re.compile(pattern)
        follower = readiness.LogFollower(self.log_path, self._log_start)  # this run's output
        deadline = Deadline(timeout)

        def check() -> re.Match[str] | None:
            m = follower.search(regex)
            if m is None and not self.running:
                m = follower.search(regex)  # what it wrote before exiting
                if m is None:
                    raise NotReady(self.name, f"log line matching {pattern!r} (the service "
                                   f"exited with {self._returncode})", timeout,
                                   readiness.log_tail(self.log_path))  # fmt: skip
            return m

        m = wait_until(check, deadline, wake=None)
        if m is None:
            raise NotReady(self.name, f"log line matching {pattern!r}", timeout,
                           readiness.log_tail(self.log_path))  # fmt: skip
        return m

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the service again after ``stop()`` (same ports, same name) and wait until ready."""
        if self.running:
            return
        self._spawn()
        self._wait_ready()

    def stop(self, timeout: float | None = None) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` (default: the service's ``stop_timeout``).

        A paused service is resumed first, so that it can shut down cleanly.
        """
        if not self.running:
            return
        self._signal(signal.SIGTERM, "main", wait=False, thaw=True)
        self._await_exit(self.spec.stop_timeout if timeout is None else timeout)

    def _await_exit(self, grace: float) -> None:
        """Wait ``grace`` seconds for the service to exit, then SIGKILL its whole sandbox."""
        if self._exited.wait(grace):
            return
        self._signal(signal.SIGKILL, "init")
        self._exited.wait(10.0)

    def restart(self) -> None:
        """Stop, then start again: a new process (new pid), the same published ports."""
        self.stop()
        self.start()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the service's main process; for SIGKILL, wait until it is gone.

        SIGKILL resumes a paused service first; another signal sent to a paused service is
        queued by the kernel and handled on ``resume()``.
        """
        if not self.running:
            return
        self._signal(sig, "main")
        if sig == signal.SIGKILL:
            self._exited.wait(10.0)

    def stats(self) -> Stats:
        """Memory (now and peak), cpu seconds, process count and OOM kills, from the cgroup.

        The figures of the current run: a restarted service starts from zero.
        """
        try:
            r = self._sup.call("stats", slot=self._slot)
        except SupervisorError as e:
            raise self._cgroup_error(e, "stats()") from None
        return Stats(int(r["memory_bytes"]), int(r["memory_peak_bytes"]), float(r["cpu_seconds"]),
                     int(r["pids"]), int(r["oom_kills"]))  # fmt: skip

    def pause(self) -> None:
        """Freeze every process of the service (cgroup freezer): no cpu, no progress, until resume()."""
        self._freeze(True)

    def resume(self) -> None:
        """Let a paused service run again."""
        self._freeze(False)

    def _freeze(self, frozen: bool) -> None:
        if not self.running:
            raise ServiceFailed(self.name, self._returncode, readiness.log_tail(self.log_path),
                                reason=f"is not running (return code {self._returncode}): cannot "
                                f"{'pause' if frozen else 'resume'} it")  # fmt: skip
        try:
            self._sup.call("freeze", slot=self._slot, frozen=frozen)
        except SupervisorError as e:
            raise self._cgroup_error(e, "pause()" if frozen else "resume()") from None

    def _cgroup_error(self, e: SupervisorError, what: str) -> EnvboxError:
        return (_unsupported(e, f"service {self.name!r}: {what} needs cgroups; ")
                or EnvboxError(f"service {self.name!r}: {what} failed: {e}"))

    def exec(self, argv: Sequence[str] | str, *, timeout: float | None = 60.0,
             input: str | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
        """Run a command inside the service: its namespaces, its user, its environment.

        Like ``subprocess.run(..., capture_output=True, text=True)``: a ``CompletedProcess`` with
        the exit code and output; ``subprocess.TimeoutExpired`` after ``timeout`` seconds. A
        command that cannot be run at all gives exit code 127 and says why on stderr, as a shell
        would.
        """
        args = shlex.split(argv) if isinstance(argv, str) else list(argv)
        if not args:
            raise ValueError("exec() needs a command")
        if not self.running:
            raise ServiceFailed(self.name, self._returncode, readiness.log_tail(self.log_path),
                                reason=f"is not running (return code {self._returncode}): "
                                "cannot exec in it")  # fmt: skip
        try:
            r = self._sup.call("exec", slot=self._slot, plan=self._plan.to_dict(), argv=args,
                               input=input, timeout=timeout)  # fmt: skip
        except SupervisorError as e:
            raise EnvboxError(f"service {self.name!r}: cannot exec {args[0]!r}: {e}") from None
        stdout, stderr = r["stdout"], r["stderr"]
        if r.get("exec_error"):
            stderr += f"envbox: {r['exec_error']}\n"
        if r["timed_out"]:
            raise subprocess.TimeoutExpired(args, timeout or 0.0, stdout, stderr)
        return subprocess.CompletedProcess(args, r["returncode"], stdout, stderr)

    # --- internals ----------------------------------------------------------------------------

    def _signal(self, sig: int, target: str, *, wait: bool = True, thaw: bool = False) -> None:
        (self._sup.call if wait else self._sup.send)("signal", slot=self._slot, sig=int(sig),
                                                       target=target, thaw=thaw)  # fmt: skip

    def _on_event(self, msg: dict[str, Any]) -> None:
        if msg["event"] == "supervisor_died":
            self._reason = "was lost: the envbox supervisor process died"
            self._exited.set()
            return
        with self._lock:
            if msg.get("generation") != self._generation:
                return
            self._returncode = int(msg["returncode"])
            self._oom_kills = int(msg.get("oom_kills") or 0)
            if self.runs and self.runs[-1]["stopped"] is None:
                figures = msg.get("stats") or {}
                self.runs[-1].update(
                    stopped=time.time(), returncode=self._returncode, oom_kills=self._oom_kills,
                    memory_peak_bytes=figures.get("memory_peak_bytes"),
                    cpu_seconds=figures.get("cpu_seconds"))  # fmt: skip
            # 137 is the OOM killer's SIGKILL unless the supervisor sent one (stop(), kill()).
            if self._oom_kills and self._returncode == 128 + signal.SIGKILL and not msg.get("killed"):
                self._reason = (f"was OOM-killed ({self._memory_limit_text()}), "
                                f"return code {self._returncode}")  # fmt: skip
            elif self._oom_kills:  # a child was killed; the main process exited by itself
                self._reason = (f"exited with return code {self._returncode} after "
                                f"{self._oom_kills} of its processes were OOM-killed "
                                f"({self._memory_limit_text()})")  # fmt: skip
        self._exited.set()

    def _memory_limit_text(self) -> str:
        limit = self.spec.limits.memory
        return f"memory limit {format_memory(limit) if limit else 'of a parent cgroup'}"

    def _create(self) -> None:
        """Give the service its ``/etc`` files and listen for its events.

        ``/etc/hosts`` is the environment's own file (see :meth:`Environment._list_hosts`), bound
        read-only: services started later are added to it in place, and every service sees them.
        """
        self._plan.etc_files = {"/etc/hostname": self.name + "\n"}
        self._plan.mounts = [*(m for m in self._plan.mounts if m[1] != "/etc/hosts"),
                             (str(self._hosts), "/etc/hosts", True)]  # fmt: skip
        self._sup.on_event(self._slot, self._on_event)

    def _spawn(self) -> None:
        """Fork the sandbox; return once the service's command has been exec'd."""
        try:
            self._log_start = self.log_path.stat().st_size
        except FileNotFoundError:
            self._log_start = 0
        with self._lock:
            self._generation += 1
            self._returncode = None
            self._oom_kills = 0
            self._reason = ""
            self._exited.clear()
            self.runs.append({"started": time.time(), "ready": None, "stopped": None,
                              "returncode": None, "oom_kills": 0, "memory_peak_bytes": None,
                              "cpu_seconds": None})  # fmt: skip
        ports = list(self.spec.ports)
        ready = self.spec.ready
        if isinstance(ready, HttpProbe) and ready.port not in ports:
            ports.append(ready.port)  # the HTTP probe goes through a relay like the test does
        try:
            # The first start also creates the service's network namespace and publishes its
            # ports; both outlive restarts, so a restarted service keeps its host ports.
            lim = self.spec.limits
            r = self._sup.call("start", slot=self._slot, plan=self._plan.to_dict(),
                               log_path=str(self.log_path), ports=ports,
                               generation=self._generation, net=self._net,
                               limits={"memory": lim.memory, "cpu": lim.cpu, "pids": lim.pids})  # fmt: skip
        except SupervisorError as e:
            self._exited.set()
            unsupported = _unsupported(e)
            if unsupported is not None:
                raise unsupported from None
            raise ServiceFailed(self.name, None, readiness.log_tail(self.log_path),
                                reason=f"could not be started: {e}") from None  # fmt: skip
        self._pid = r["pid"]
        self._ports = {int(p): hp for p, hp in r["ports"].items()}

    def _wait_ready(self) -> None:
        readiness.wait_ready(self, self.spec.ready)
        if self.runs:
            self.runs[-1]["ready"] = time.time()
        if self._env.on_ready is not None:
            self._env.on_ready(self)

    def _raise_if_exited(self) -> None:
        if not self.running:
            raise ServiceFailed(self.name, self._returncode, readiness.log_tail(self.log_path),
                                reason=self._reason)  # fmt: skip

    def _tcp_check(self, port: int) -> bool:
        return bool(self._sup.call("tcp_check", slot=self._slot, port=port)["ok"])

    def _forget(self) -> None:
        self._sup.on_event(self._slot, None)
        self._exited.set()
        self._pid = None
