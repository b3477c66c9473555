"""The sandbox's first process: a spare that waits for its plan, then the service's init.

The supervisor clones a spare into a new PID namespace; it runs :func:`run_spare`, which becomes
PID 1 of the sandbox: it prepares the namespaces and the shared part of the root while it waits,
then, given a plan, finishes the root (:mod:`pytest_envbox.sandbox.rootfs`), forks the service and
acts as its init (forwarding signals, reaping zombies, exiting with the service's status).
:func:`exec_command` is the same last step for ``ServiceHandle.exec``, from a helper that joined a
running sandbox's namespaces.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
import socket
from collections.abc import Iterable, Sequence
from typing import Any, NoReturn

from pytest_envbox.kernel import linux as L
from pytest_envbox.kernel import seccomp
from pytest_envbox.sandbox import status, sysfs
from pytest_envbox.sandbox.plan import SandboxPlan, SetupError
from pytest_envbox.sandbox.rootfs import build_base, finish_root

__all__ = [
    "FORWARDED_SIGNALS",
    "NET_SYSCTLS",
    "close_fds_except",
    "drop_privileges",
    "exec_command",
    "limit_open_files",
    "refuse_router_advice",
    "run_spare",
]

#: Signals the init passes on to the service (as tini does).
FORWARDED_SIGNALS = (
    signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2,
    signal.SIGWINCH, signal.SIGCONT,
)  # fmt: skip


def close_fds_except(keep: Iterable[int]) -> None:
    keep = sorted(set(keep))
    lo = 3
    for fd in keep:
        if fd >= lo:
            os.closerange(lo, fd)
            lo = fd + 1
    os.closerange(lo, 1 << 20)


#: Written in each sandbox's new network namespace before its ``eth0`` exists (an interface takes
#: ``default``'s values when it arrives): no IPv6 router advertisement, autoconfiguration or
#: redirect, no IPv4 redirect. Otherwise a service that forges a router advertisement on the
#: shared bridge becomes its neighbours' default router (Docker's CVE-2020-13401).
NET_SYSCTLS = tuple(
    (f"/proc/sys/net/{path}", "0")
    for conf in ("all", "default")
    for path in (f"ipv6/conf/{conf}/accept_ra", f"ipv6/conf/{conf}/autoconf",
                 f"ipv6/conf/{conf}/accept_redirects", f"ipv4/conf/{conf}/accept_redirects")
)  # fmt: skip


def refuse_router_advice() -> None:
    """Apply :data:`NET_SYSCTLS` in the calling thread's network namespace (``/proc/sys/net`` is
    the opener's namespace's). A host without IPv6 has no ``ipv6`` directory: nothing to refuse."""
    for path, value in NET_SYSCTLS:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)


def _report(sync: socket.socket, msg: bytes) -> None:
    try:
        sync.send(msg)
    except OSError:
        pass


def limit_open_files(n: int) -> None:
    """Set ``RLIMIT_NOFILE`` to ``n``, soft and hard (see :data:`~.plan.NOFILE`).

    The hard limit too: a process may raise its soft limit up to its hard one, and a service runs
    without ``CAP_SYS_RESOURCE``, so it cannot raise the hard one back. Above our own hard limit
    that takes ``CAP_SYS_RESOURCE`` in the host's user namespace: without it (rootless), the
    service gets our hard limit."""
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))
    except (OSError, ValueError):
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(n, hard), min(n, hard)))


def drop_privileges(plan: SandboxPlan) -> None:
    """Become the service's user with at most Docker's default capabilities and no new privileges.

    Order matters: the bounding set can only be cut while CAP_SETPCAP is held (before setuid);
    the inheritable and ambient sets are emptied so no capability survives the exec but what the
    kernel grants root from the bounding set.
    """
    if L.capbset_has(21):  # CAP_SYS_ADMIN still there: cut the bounding set
        L.capbset_drop_except(L.DOCKER_DEFAULT_CAPS)
    limit_open_files(plan.nofile)
    try:
        os.setgroups(plan.groups)
    except PermissionError:
        if plan.groups:
            raise
        # Rootless: a user namespace whose setgroups is denied. The process keeps the groups it
        # had on the host (unmapped: nobody's group inside), as under bubblewrap and podman.
    os.setresgid(plan.gid, plan.gid, plan.gid)
    os.setresuid(plan.uid, plan.uid, plan.uid)
    mask = sum(1 << c for c in L.DOCKER_DEFAULT_CAPS)
    eff, perm, _inh = L.capget()
    L.capset(eff & mask, perm & mask, 0)
    L.clear_ambient_caps()
    L.set_no_new_privs()
    seccomp.install()  # Docker's allow-list; inherited by everything the service starts


def _chdir_inside(cwd: str) -> None:
    try:
        os.chdir(cwd)
    except OSError as e:
        raise SetupError(f"cwd {cwd!r}: {e.strerror}") from e
    here = os.getcwd()
    # Outside the root, getcwd(2) answers "(unreachable)/...": refuse to run there.
    if not here.startswith("/") or not os.path.samefile(here, cwd):
        raise SetupError(f"cwd {cwd!r} is not inside the sandbox")


def exec_command(plan: SandboxPlan, argv: list[str], sync: socket.socket,
                 stdio: tuple[int, int, int]) -> NoReturn:  # fmt: skip
    """The last steps before an ``exec`` command runs inside a service. Never returns.

    As the service would be: its cwd, user, limits and environment; ``argv[0]`` is looked up on
    the service's ``PATH`` inside the sandbox.

    On success the sync socket, close-on-exec, simply closes; on failure it carries the reason.
    """
    try:
        for i, fd in enumerate(stdio):
            os.dup2(fd, i)
        os.setsid()
        _chdir_inside(plan.cwd)
        drop_privileges(plan)
        L.set_pdeathsig(signal.SIGKILL)  # exec's helper: cleared by the uid change
        for sig in FORWARDED_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        L.close_range_cloexec(3)
        sync.send(status.EXEC)  # carries our pid (SO_PASSCRED) to the supervisor
        os.execvpe(argv[0], argv, plan.env)
    except SetupError as e:
        _report(sync, status.error(f"{e}"))
    except OSError as e:
        what = argv[0] if e.filename is None else os.fsdecode(e.filename)
        _report(sync, status.error(f"{what}: {e.strerror}"))
    except BaseException as e:
        _report(sync, status.error(f"{type(e).__name__}: {e}"))
    os._exit(127)


_ALL_SIGNALS = [sig for sig in signal.valid_signals() if sig not in (signal.SIGKILL, signal.SIGSTOP)]


def run_spare(ctl: socket.socket, cgroup_procs: Sequence[int] = (), *,
              in_cgroup: bool = False) -> NoReturn:  # fmt: skip
    """PID 1 of a new sandbox, prepared before it is needed. Never returns.

    Forked ahead of time into new PID, mount, UTS, IPC and network namespaces with the shared part
    of the filesystem built, it sends ``ready`` with its network namespace, then waits on ``ctl``
    for a plan and the service's log (and, for a restart, the network namespace to join). Then it
    finishes the filesystem, becomes the service's user with the service's limits, spawns the
    service and stays as its init. ``ctl`` carries back ``exec`` with a pidfd
    of the service (how the supervisor learns its host pid), or ``error:<why>``.

    ``cgroup_procs`` are the ``cgroup.procs`` files of the service's cgroup, opened for writing:
    the spare moves itself in (a wait of milliseconds, paid here rather than on the start's
    path) and gets its cgroup namespace. ``in_cgroup``: it was cloned straight into it (v2).
    Without either, the supervisor moves it once it is used.
    """
    code = 125
    try:
        L.set_pdeathsig(signal.SIGKILL)  # our parent is the supervisor (see its zygote)
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        os.setsid()
        devnull = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
        close_fds_except([ctl.fileno(), devnull, *cgroup_procs])
        for fd in cgroup_procs:
            os.write(fd, b"0")
            os.close(fd)
        # A network namespace of its own too: a new service takes it (made here, in parallel,
        # rather than in the supervisor's loop); a restarted one joins its old one instead.
        placed = bool(cgroup_procs) or in_cgroup
        # Not placed: whether the supervisor moved us into a cgroup by the start (see below).
        cgroups_before = "" if placed else sysfs.own_cgroups()
        L.unshare(L.CLONE_NEWNS | L.CLONE_NEWUTS | L.CLONE_NEWIPC | L.CLONE_NEWNET
                  | (L.CLONE_NEWCGROUP if placed else 0))
        refuse_router_advice()
        L.loopback_up()
        netns = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        builder = build_base(cgroup_view=placed)
        # The bounding set limits only what later execs get: cut it now, ahead of time.
        L.capbset_drop_except(L.DOCKER_DEFAULT_CAPS)
        socket.send_fds(ctl, [status.READY], [netns])
        os.close(netns)
        msg, fds, _flags, _addr = socket.recv_fds(ctl, 256 << 10, 2, socket.MSG_CMSG_CLOEXEC)
        if not msg or not fds:
            os._exit(0)  # the supervisor is done with us
        plan = SandboxPlan.from_dict(json.loads(msg))
        log_fd = fds[0]
        os.dup2(devnull, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        restart = len(fds) == 2
        if restart:  # back into the slot's network namespace
            L.setns(fds[1], L.CLONE_NEWNET)
            os.close(fds[1])
        cgroup_view = None
        if not placed:
            # The supervisor has put us in the service's cgroup by now, if it has one: that
            # becomes its "/".
            cgroup_view = sysfs.own_cgroups(builder.root) != cgroups_before
            L.unshare(L.CLONE_NEWCGROUP)
        socket.sethostname(plan.name)
        finish_root(builder, plan, new_netns=restart, cgroup_view=cgroup_view)
        _chdir_inside(plan.cwd)
        # Init drops to the service's user and limits first, so that the service can be started
        # with posix_spawn (vfork): forking this Python process would cost milliseconds.
        drop_privileges(plan)
        L.set_pdeathsig(signal.SIGKILL)  # cleared by the kernel when the uid changed
        L.set_dumpable(False)
        L.close_range_cloexec(3)
        actions = [(os.POSIX_SPAWN_DUP2, devnull, 0), (os.POSIX_SPAWN_DUP2, log_fd, 1),
                   (os.POSIX_SPAWN_DUP2, log_fd, 2)]  # fmt: skip
        common: dict[str, Any] = {"file_actions": actions, "setsid": True,
                                  "setsigdef": _ALL_SIGNALS, "setsigmask": []}  # fmt: skip
        forwarder = _Forwarder()
        try:
            if plan.executable:
                pid = os.posix_spawn(plan.executable, plan.argv, plan.env, **common)
            else:
                os.environ["PATH"] = plan.env.get("PATH", os.defpath)
                pid = os.posix_spawnp(plan.argv[0], plan.argv, plan.env, **common)
        except OSError as e:
            raise SetupError(f"{plan.executable or plan.argv[0]}: {e.strerror}") from e
        forwarder.started(pid)
        pidfd = os.pidfd_open(pid)
        try:
            socket.send_fds(ctl, [status.EXEC], [pidfd])
        except OSError:  # the supervisor died before the death signal was set again
            os.kill(pid, signal.SIGKILL)
            raise
        os.close(pidfd)
        os.close(log_fd)
        ctl.close()
        _be_init(pid)
    except SetupError as e:
        _report(ctl, status.error(f"{e}"))
    except OSError as e:
        if e.errno == errno.ENOSYS:
            _report(ctl, status.unsupported(f"this kernel lacks a system call pytest-envbox needs ({e}); "
                                            "use Linux 5.12 or newer"))  # fmt: skip
        else:
            _report(ctl, status.error(f"sandbox setup failed: {e}"))
    except BaseException as e:
        _report(ctl, status.error(f"sandbox setup failed: {type(e).__name__}: {e}"))
    os._exit(code)


class _Forwarder:
    """The init's signal handlers, installed before the service exists.

    The kernel drops a signal sent to a namespace's PID 1 unless PID 1 has a handler for it, so
    the handlers must be in place before anyone can know the service has started (the supervisor
    may send SIGTERM the moment it hears ``exec``). A signal that comes before the service does
    is passed on as soon as it exists.
    """

    def __init__(self) -> None:
        self.child: int | None = None
        self.early: list[int] = []
        for sig in FORWARDED_SIGNALS:
            signal.signal(sig, self._forward)

    def _forward(self, sig: int, _frame: object) -> None:
        if self.child is None:
            self.early.append(sig)
            return
        try:
            os.kill(self.child, sig)
        except ProcessLookupError:
            pass

    def started(self, child: int) -> None:
        self.child = child
        for sig in self.early:
            self._forward(sig, None)


def _be_init(child: int) -> NoReturn:
    """Reap every process; exit with the service's status when it exits.

    When the service exits, init exits with its code (or 128 + signal), and the kernel then kills
    whatever else is left in the namespace, as with tini.
    """
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            os._exit(0)
        except OSError as e:  # pragma: no cover - EINTR is retried by Python itself
            if e.errno != errno.EINTR:
                os._exit(125)
            continue
        if pid == child:
            code = os.waitstatus_to_exitcode(status)
            os._exit(128 - code if code < 0 else code)
