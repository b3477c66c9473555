"""The test process's side of the supervisor: start it on first use, call it, hear its events
(the calls and events go through :class:`~pytest_envbox.engine.channel.Channel`)."""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

from pytest_envbox.engine.channel import Channel, EventHandler, SupervisorError
from pytest_envbox.errors import EnvboxError, HostUnsupported
from pytest_envbox.supervisor.protocol import HelloRequest, ShutdownRequest

__all__ = [
    "EventHandler",
    "SupervisorClient",
    "SupervisorError",
    "get_supervisor",
    "rootless",
    "set_rootless_mode",
    "shutdown_supervisor",
]

#: ``auto`` (rootless when not root), ``yes`` or ``no``: from ``--envbox-rootless``, or the
#: ``ENVBOX_ROOTLESS`` environment variable for the engine without pytest.
_rootless_mode = os.environ.get("ENVBOX_ROOTLESS", "auto")


def set_rootless_mode(mode: str) -> None:
    """``auto``, ``yes`` or ``no``; applies to supervisors started from now on."""
    global _rootless_mode
    if mode not in ("auto", "yes", "no"):
        raise ValueError(f"rootless mode must be auto, yes or no, not {mode!r}")
    _rootless_mode = mode


def rootless() -> bool:
    """Whether this process's services run in a user namespace (rootless mode)."""
    mode = os.environ.get("ENVBOX_ROOTLESS", _rootless_mode) if _rootless_mode == "auto" else _rootless_mode
    if mode == "yes":
        return True
    if mode == "no":
        return False
    # Root without CAP_SYS_ADMIN (a container's default set) can make no namespace but a user
    # namespace: rootless mode is its only way, and works where the container's seccomp profile
    # lets user namespaces be made (kernel/refusal.py explains it when it does not).
    return os.geteuid() != 0 or _boxed_root()


@functools.cache
def _boxed_root() -> bool:
    from pytest_envbox.kernel.refusal import boxed_root

    return boxed_root()


class SupervisorClient(Channel):
    """Calls into one supervisor process, which it starts. Thread-safe: calls may come from
    several threads."""

    def __init__(self) -> None:
        if not sys.platform.startswith("linux"):
            raise HostUnsupported(
                f"pytest-envbox needs Linux namespaces and cgroups; this is {sys.platform}. "
                "Run the tests on a Linux machine, VM or container."
            )
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        #: sockets the supervisor makes in an environment's network come over this one
        #: (``LendRequest``, see engine/reach.py); ``fds_lock`` pairs each request with its message
        self.fds, fds_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.fds_lock = threading.Lock()
        # A lean interpreter: no site-packages (-S), and the package's __init__ (the whole engine)
        # not run, only the supervisor's few modules. Every sandbox is forked from it, and forking
        # and exiting cost in proportion to its memory (2.6 ms of CPU at 21 MB, 0.5 ms at 9 MB).
        code = (
            "import sys, types; p = types.ModuleType('pytest_envbox'); "
            f"p.__path__ = [{str(Path(__file__).resolve().parent.parent)!r}]; "
            "sys.modules['pytest_envbox'] = p; "
            "from pytest_envbox.supervisor.server import main; main()"
        )
        self._proc = subprocess.Popen(
            # -P: not the working directory first on sys.path (a project's json.py, say).
            [sys.executable, "-S", *(["-P"] if sys.version_info >= (3, 11) else []), "-c", code,
             str(theirs.fileno()), f"fds={fds_theirs.fileno()}", *(["rootless"] if rootless() else [])],
            pass_fds=[theirs.fileno(), fds_theirs.fileno()],
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # the terminal's Ctrl-C is for pytest, which tears down
        )
        theirs.close()
        fds_theirs.close()
        self.owner_pid = os.getpid()
        super().__init__(ours)
        try:
            hello = self.call(HelloRequest(watch=_processes_to_outlive()))
        except HostUnsupported:
            self.close()
            raise
        self.pid = hello.pid
        #: why the supervisor's cgroups are unusable (no limits, stats, pause), None if they are
        self.cgroup_problem = hello.cgroup_problem
        #: the id maps of its user namespace, ``{"uid": [(first inside, count)...], "gid": ...}``
        self.ids = {"uid": hello.uid_map, "gid": hello.gid_map}

    def maps(self, kind: str, ident: int) -> bool:
        """Is ``ident`` (a uid or gid inside) mapped in the supervisor's user namespace?"""
        return any(start <= ident < start + count for start, count in self.ids.get(kind, []))

    def close(self) -> None:
        """Ask the supervisor to tear everything down and wait until it has exited.

        Unless it keeps environments (``--envbox-keep``): then it lives on, detached, until
        ``envbox clean``.
        """
        kept = None
        if not self.dead:
            with contextlib.suppress(EnvboxError, OSError):  # it answers at once, then tears down
                kept = self.call(ShutdownRequest(), timeout=30).kept
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        if kept:
            self._sock.close()
            self.fds.close()
            self._proc.returncode = 0  # not ours to wait for any more (and no ResourceWarning)
            return
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._sock.close()
        self.fds.close()


def _processes_to_outlive() -> list[int]:
    """Processes besides this one whose death must also end every sandbox.

    A pytest-xdist worker blocked in a test does not notice at once that its controller was
    killed; its services must not wait for it. (Its parent is the controller: execnet starts
    workers as children.)
    """
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return [os.getppid()]
    return []


_lock = threading.Lock()
_client: SupervisorClient | None = None


def get_supervisor() -> SupervisorClient:
    """This process's supervisor, started on first use (again after a fork or its death)."""
    global _client
    with _lock:
        if _client is None or _client.dead or _client.owner_pid != os.getpid():
            _client = SupervisorClient()
        return _client


def shutdown_supervisor() -> None:
    """Tear down this process's supervisor, if it has one (at exit, or at pytest's end)."""
    global _client
    with _lock:
        client, _client = _client, None
    if client is not None and client.owner_pid == os.getpid():
        client.close()


atexit.register(shutdown_supervisor)

