"""``ServiceHandle``: one service of an environment, running or stopped; its ``Link`` and ``Stats``."""

from __future__ import annotations

import contextlib
import logging
import re
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pytest_envbox.engine import readiness
from pytest_envbox.engine.client import SupervisorClient, SupervisorError
from pytest_envbox.engine.commands import run_command
from pytest_envbox.engine.faults import Link
from pytest_envbox.engine.figures import Run, Stats, memory_limit_text
from pytest_envbox.errors import EnvboxError, HostUnsupported, ServiceFailed
from pytest_envbox.sandbox.plan import SandboxPlan
from pytest_envbox.spec import HttpProbe, Service
from pytest_envbox.supervisor.protocol import (
    CgroupLimits,
    ExitedEvent,
    FreezeRequest,
    NetWiring,
    PrepareRequest,
    ReleaseRequest,
    SignalRequest,
    StartRequest,
    StatsRequest,
    SupervisorDied,
    TcpCheckRequest,
)

if TYPE_CHECKING:
    import requests


__all__ = ["ServiceHandle", "published_ports", "start_level", "stop_all"]

_log = logging.getLogger(__name__)  # each start (pid, ports), stop and exit; readiness.py: the waits


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
    """A running (or stopped) service of an :class:`~pytest_envbox.Environment`."""

    def __init__(self, spec: Service, plan: SandboxPlan, sup: SupervisorClient, *, env_id: str,
                 wire: NetWiring, workdir: Path,
                 on_ready: Callable[[ServiceHandle], None] | None = None) -> None:  # fmt: skip
        """Made by :class:`~pytest_envbox.Environment` (never by a user): ``wire`` is the
        service's address on the environment's network (for a service with ``network_of``, the
        one it shares), ``on_ready`` its readiness callback."""
        self.spec = spec
        self.name = spec.name
        self._plan = plan
        self._sup = sup
        self._on_ready = on_ready
        self._slot = f"{env_id}/{spec.name}"
        self._net = wire
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
        self._runs: list[Run] = []
        self._create()

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
    def exit_reason(self) -> str | None:
        """Why the service is not running, as words to follow its name; None while it runs.

        ``"exited with return code 3"`` for a plain exit; after an OOM kill, ``"was OOM-killed
        (memory limit 48Mi), return code 137"``, or, when the main process exited by itself after
        losing some of its processes, ``"exited with return code 1 after 2 of its processes were
        OOM-killed (memory limit 48Mi)"``; ``"was lost: the envbox supervisor process died"``;
        ``"could not be started"`` when its start failed (the error raised then said why). Meant
        for messages; code should test :attr:`returncode` and ``runs[-1].oom_kills``.
        """
        if self.running:
            return None
        if self._reason:
            return self._reason
        if self._returncode is None:
            return "could not be started"
        return f"exited with return code {self._returncode}"

    @property
    def runs(self) -> tuple[Run, ...]:
        """One :class:`Run` per start of the service, oldest first: its times and, once it has
        ended, its return code and its cgroup's totals (a snapshot: later changes are not seen)."""
        return tuple(self._runs)

    @property
    def link(self) -> Link:
        """Faults on the service's network link: ``down()``, ``up()``, ``delay()``, ``loss()``,
        ``clear()`` (see :class:`Link`)."""
        return Link(self._sup, self._slot, self.name)

    @property
    def ip(self) -> str:
        """The service's address on the environment's private network (it keeps it on restart)."""
        return self._net.ip

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

    def wait_for_log(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        """Wait until a line of the log matches ``pattern`` (``re.search``); return the match.

        Lines of the current run are searched, from its start (after ``restart()``, the new
        run's), including those written before the call. ``NotReady``, with the log's tail, on
        timeout or when the service exits first.
        """
        return readiness.wait_for_log(_ReadinessView(self), pattern, timeout)

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
            r = self._sup.call(StatsRequest(self._slot))
        except (HostUnsupported, SupervisorError) as e:
            raise self._cgroup_error(e, "stats()") from None
        return Stats(r.memory_bytes, r.memory_peak_bytes, r.cpu_seconds, r.pids, r.oom_kills)

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
            self._sup.call(FreezeRequest(self._slot, frozen))
        except (HostUnsupported, SupervisorError) as e:
            raise self._cgroup_error(e, "pause()" if frozen else "resume()") from None

    def _cgroup_error(self, e: HostUnsupported | SupervisorError, what: str) -> EnvboxError:
        if isinstance(e, HostUnsupported):
            return HostUnsupported(f"service {self.name!r}: {what} needs cgroups; {e}")
        return EnvboxError(f"service {self.name!r}: {what} failed: {e}")

    def exec(self, argv: Sequence[str] | str, *, timeout: float | None = 60.0,
             input: str | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
        """Run a command inside the service: its namespaces, its user, its environment.

        Like ``subprocess.run(..., capture_output=True, text=True)``: a ``CompletedProcess`` with
        the exit code and output; ``subprocess.TimeoutExpired`` after ``timeout`` seconds. A
        command that cannot be run at all gives exit code 127 and says why on stderr, as a shell
        would. Each of stdout, stderr and ``input`` may hold up to 256 MiB
        (:mod:`~pytest_envbox.engine.commands`); a command that writes more is killed, and
        ``EnvboxError`` says how to move it through a mount instead.
        """
        args = shlex.split(argv) if isinstance(argv, str) else list(argv)
        if not args:
            raise ValueError("exec() needs a command")
        if not self.running:
            raise ServiceFailed(self.name, self._returncode, readiness.log_tail(self.log_path),
                                reason=f"is not running (return code {self._returncode}): "
                                "cannot exec in it")  # fmt: skip
        return run_command(self._sup, self.name, self._slot, self._plan, args, timeout=timeout, input=input)

    # --- internals ----------------------------------------------------------------------------

    def _signal(self, sig: int, target: Literal["main", "init"], *, wait: bool = True,
                thaw: bool = False) -> None:  # fmt: skip
        request = SignalRequest(self._slot, int(sig), target, thaw)
        if wait:
            self._sup.call(request)
        else:
            self._sup.send(request)

    def _on_event(self, msg: ExitedEvent | SupervisorDied) -> None:
        if isinstance(msg, SupervisorDied):
            self._reason = "was lost: the envbox supervisor process died"
            self._exited.set()
            return
        with self._lock:
            if msg.generation != self._generation:
                return
            self._returncode = msg.returncode
            self._oom_kills = msg.oom_kills
            if self._runs and self._runs[-1].stopped is None:
                self._runs[-1] = replace(
                    self._runs[-1], stopped=time.time(), returncode=self._returncode,
                    oom_kills=self._oom_kills, memory_peak_bytes=msg.memory_peak_bytes,
                    cpu_seconds=msg.cpu_seconds)  # fmt: skip
            # 137 is the OOM killer's SIGKILL unless the supervisor sent one (stop(), kill()).
            if self._oom_kills and self._returncode == 128 + signal.SIGKILL and not msg.killed:
                self._reason = (f"was OOM-killed ({memory_limit_text(self.spec)}), "
                                f"return code {self._returncode}")  # fmt: skip
            elif self._oom_kills:  # a child was killed; the main process exited by itself
                self._reason = (f"exited with return code {self._returncode} after "
                                f"{self._oom_kills} of its processes were OOM-killed "
                                f"({memory_limit_text(self.spec)})")  # fmt: skip
        self._exited.set()
        _log.info("service %r %s", self.name, self.exit_reason)

    def _create(self) -> None:
        """Give the service its ``/etc`` files and listen for its events.

        ``/etc/hosts`` is the environment's own file (see ``Environment._list_hosts``), bound
        read-only: services started later are added to it in place, and every service sees them.
        Its real path, as for every mount source: the sandbox refuses a symbolic link on the way.
        """
        self._plan.etc_files = {"/etc/hostname": self.name + "\n"}
        self._plan.mounts = [*(m for m in self._plan.mounts if m[1] != "/etc/hosts"),
                             (str(self._hosts.resolve()), "/etc/hosts", True)]  # fmt: skip
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
            self._runs.append(Run(started=time.time()))
        ports = list(self.spec.ports)
        ready = self.spec.ready
        if isinstance(ready, HttpProbe) and ready.port not in ports:
            ports.append(ready.port)  # the HTTP probe goes through a relay like the test does
        try:
            # The first start also creates the service's network namespace and publishes its
            # ports; both outlive restarts, so a restarted service keeps its host ports.
            lim, owner = self.spec.limits, self.spec.network_of
            join = None if owner is None else f"{self._slot.rsplit('/', 1)[0]}/{owner}"
            r = self._sup.call(StartRequest(
                self._slot, self._plan, str(self.log_path), ports, self._generation,
                CgroupLimits(lim.memory, lim.cpu, lim.pids), self._net, join))  # fmt: skip
        except HostUnsupported:
            self._exited.set()
            raise
        except SupervisorError as e:
            self._exited.set()
            raise ServiceFailed(self.name, None, readiness.log_tail(self.log_path),
                                reason=f"could not be started: {e}") from None  # fmt: skip
        self._pid = r.pid
        self._ports = r.ports
        _log.info("service %r started: pid %d, host ports %s", self.name, r.pid, r.ports)

    def _wait_ready(self) -> None:
        readiness.wait_service(_ReadinessView(self), self.spec, self._spawn)
        with self._lock:  # the exit event may be recording the end of this run meanwhile
            if self._runs:
                self._runs[-1] = replace(self._runs[-1], ready=time.time())
        if self._on_ready is not None:
            self._on_ready(self)

    def _raise_if_exited(self) -> None:
        if not self.running:
            raise ServiceFailed(self.name, self._returncode, readiness.log_tail(self.log_path),
                                reason=self._reason)  # fmt: skip

    def _tcp_check(self, port: int) -> bool:
        return self._sup.call(TcpCheckRequest(self._slot, port)).ok

    def _forget(self) -> None:
        self._sup.on_event(self._slot, None)
        self._exited.set()
        self._pid = None


class _ReadinessView:
    """A handle as :mod:`~pytest_envbox.engine.readiness` sees it (a ``ReadinessTarget``): the
    current run's log, exit and checks, without the rest of the handle."""

    __slots__ = ("_h",)

    def __init__(self, handle: ServiceHandle) -> None:
        self._h = handle

    @property
    def name(self) -> str:
        return self._h.name

    @property
    def log_path(self) -> Path:
        return self._h.log_path

    @property
    def log_start(self) -> int:
        return self._h._log_start

    @property
    def exited(self) -> threading.Event:
        return self._h._exited

    @property
    def returncode(self) -> int | None:
        return self._h.returncode

    def raise_if_exited(self) -> None:
        self._h._raise_if_exited()

    def tcp_check(self, port: int) -> bool:
        return self._h._tcp_check(port)

    def port(self, p: int) -> int:
        return self._h.port(p)

    def exec(self, argv: Sequence[str], *, timeout: float | None) -> subprocess.CompletedProcess[str]:
        return self._h.exec(argv, timeout=timeout)


def published_ports(h: ServiceHandle) -> dict[int, int]:
    """Every port the service publishes (its probe's too), to its host port."""
    return dict(h._ports)


def start_level(sup: SupervisorClient, handles: Sequence[ServiceHandle]) -> None:
    """Start services that depend on none of each other, together, and wait until all are ready.

    Together means overlapped, not one after the other: the supervisor prepares a sandbox for
    each at once (``prepare``: namespaces, filesystem, cgroup, each in its own process), the
    starts are sent together, and the readiness probes run side by side.
    """
    if len(handles) == 1:
        handles[0]._spawn()
        handles[0]._wait_ready()
        return
    sup.send(PrepareRequest(len(handles)))
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


def stop_all(sup: SupervisorClient, handles: Sequence[ServiceHandle], disown: str | None, *,
             remove: str | None = None) -> None:  # fmt: skip
    """Stop the services and release their sandboxes; forget ``disown`` (a directory the
    supervisor was to delete if the test process died first); have the supervisor delete
    ``remove`` now. Never raises.

    SIGTERM to all at once, then wait for each: teardown takes the slowest service's time, not
    the sum.
    """
    if any(h.running for h in handles):
        _log.info("stopping %s", ", ".join(repr(h.name) for h in handles if h.running))
    for h in handles:
        with contextlib.suppress(EnvboxError, OSError):
            if h.running:  # a paused service is resumed first, to handle it
                h._signal(signal.SIGTERM, "main", wait=False, thaw=True)
    for h in handles:
        with contextlib.suppress(EnvboxError, OSError):
            h._await_exit(h.spec.stop_timeout)
    with contextlib.suppress(EnvboxError, OSError):
        sup.call(ReleaseRequest([h._slot for h in handles], disown, remove))
    for h in handles:
        h._forget()
