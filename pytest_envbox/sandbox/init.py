"""Turning a freshly forked process into a sandboxed service.

The supervisor forks a child into a new PID namespace; that child runs :func:`run_init`, which
becomes PID 1 of the sandbox: it joins the service's network namespace, takes new mount, UTS and IPC
namespaces, builds the sandbox's root, forks the service and then acts as its init (forwarding
signals, reaping zombies, exiting with the service's status). :func:`exec_in_sandbox` is the same
last step for ``ServiceHandle.exec``, from a helper that joined a running sandbox's namespaces.

As in bubblewrap, the work is planned first (:class:`SandboxPlan`, plain data built by the engine)
and carried out here in one place, in the child, in a fixed order.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

from pytest_envbox.kernel import linux as L
from pytest_envbox.kernel import seccomp

#: Where each service finds its private, writable home directory.
HOME = "/home/envbox"
#: Signals the init passes on to the service (as tini does).
FORWARDED_SIGNALS = (
    signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2,
    signal.SIGWINCH, signal.SIGCONT,
)  # fmt: skip
_DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty")


@dataclass
class SandboxPlan:
    """Everything the child needs to set up one service, as plain data (it crosses a socket)."""

    name: str
    argv: list[str]
    executable: str
    env: dict[str, str]
    cwd: str
    uid: int
    gid: int
    groups: list[int]
    #: (host source, target inside, readonly)
    mounts: list[tuple[str, str, bool]] = field(default_factory=list)
    #: target inside -> content of a generated file, bound read-only (``/etc/hosts``...)
    etc_files: dict[str, str] = field(default_factory=dict)
    #: host paths the service needs (its cwd, its interpreter's prefix) that must stay visible,
    #: read-only at the same path, even where the sandbox puts a private tmpfs (``/tmp``...)
    expose: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        # Shallow: dataclasses.asdict deep-copies every list and dict, on the start path.
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SandboxPlan:
        d = dict(d)
        d["mounts"] = [tuple(m) for m in d.get("mounts", [])]
        return cls(**d)


class SetupError(Exception):
    """A step of the sandbox setup failed; the message says which."""


# --- filesystem -------------------------------------------------------------------------------

_OLD = "/old"  # the host's root, while the new root is assembled
_NEW = "/new"  # the new root


class _RootBuilder:
    """Assembles the new root under ``/new`` from the host's root at ``/old``.

    The host tree is bound read-only as a whole. A path that must exist but does not (a mount
    target, ``HOME``) is created without touching the host: its nearest host directory is
    "shadowed" by a tmpfs holding read-only binds of that directory's entries, and the new entry is
    made in the tmpfs. Directories we created (tmpfs mounts and what we made inside them) are
    tracked in ``ours``: only there may anything be created.
    """

    def __init__(self) -> None:
        self.ours: set[str] = set()
        self.shadows: list[str] = []
        self.home = HOME

    def resolve(self, path: str) -> str:
        """``path`` inside the new root with symlinks followed as the service would see them."""
        parts = [p for p in path.split("/") if p]
        out: list[str] = []
        hops = 0
        while parts:
            part = parts.pop(0)
            if part == ".":
                continue
            if part == "..":
                if out:
                    out.pop()
                continue
            cand = "/" + "/".join([*out, part])
            try:
                link = os.readlink(_NEW + cand)
            except OSError:
                out.append(part)
                continue
            hops += 1
            if hops > 40:
                raise SetupError(f"too many symbolic links resolving {path}")
            parts = [p for p in link.split("/") if p] + parts
            if link.startswith("/"):
                out = []
        return "/" + "/".join(out)

    def tmpfs(self, path: str, options: str = "mode=0755") -> None:
        L.mount("tmpfs", _NEW + path, "tmpfs", L.MS_NOSUID | L.MS_NODEV, options)
        self.ours.add(path)

    def shadow(self, d: str) -> None:
        """Replace directory ``d`` of the new root by a tmpfs mirroring what was there.

        The current view of ``d`` (host binds and whatever we mounted below it already) is first
        bound aside, recursively, and its entries bound back into the tmpfs, so a shadow hides
        nothing and the order of shadows does not matter. Binds keep their source's read-only
        flag.
        """
        stage = f"/stage{len(self.shadows)}"
        os.mkdir(stage)
        L.mount(_NEW + d, stage, None, L.MS_BIND | L.MS_REC)
        st = os.stat(stage)
        try:
            self.tmpfs(d, f"mode={stat.S_IMODE(st.st_mode):o},uid={st.st_uid},gid={st.st_gid}")
        except OSError as e:  # rootless: an owner unmapped in the user namespace
            if e.errno != errno.EINVAL:
                raise
            self.tmpfs(d, f"mode={stat.S_IMODE(st.st_mode):o}")
        self.shadows.append(d)
        for entry in os.scandir(stage):
            src, dst = entry.path, _NEW + d.rstrip("/") + "/" + entry.name
            if entry.is_symlink():
                os.symlink(os.readlink(src), dst)
                continue
            if entry.is_dir(follow_symlinks=False):
                os.mkdir(dst)
            else:
                _touch(dst)
            L.mount(src, dst, None, L.MS_BIND | L.MS_REC)

    def bind(self, src: str, dst: str, *, readonly: bool) -> None:
        """Bind ``src`` (recursively) at ``dst``: ``nodev``, ``nosuid``, read-only if asked.

        ``nodev`` and ``nosuid`` even on writable binds, so nothing inside can use a device node
        or a setuid binary through them. (They do not stop root inside from *creating* such files
        in a writable host directory; only a user namespace does: the rootless mode.)
        """
        L.mount(src, dst, None, L.MS_BIND | L.MS_REC)
        attrs = L.MOUNT_ATTR_NOSUID | L.MOUNT_ATTR_NODEV
        L.mount_setattr(dst, attrs | L.MOUNT_ATTR_RDONLY if readonly else attrs)

    def ensure(self, path: str, *, is_dir: bool) -> str:
        """Make ``path`` exist in the new root (as a dir or a file); return it resolved."""
        path = self.resolve(path)
        if os.path.lexists(_NEW + path):
            return path
        parent = os.path.dirname(path)
        parent = self.ensure(parent, is_dir=True)
        if parent not in self.ours:
            self.shadow(parent)
        full = _NEW + parent.rstrip("/") + "/" + os.path.basename(path)
        if is_dir:
            os.mkdir(full, 0o755)
            self.ours.add(full[len(_NEW):])
        else:
            _touch(full)
        return full[len(_NEW):]


#: The sandbox's own filesystems, which hide the host's directories of the same name.
_PRIVATE = ("/tmp", "/var/tmp", "/run", "/dev")


def _under(path: str, dirs: tuple[str, ...]) -> bool:
    return any(path == d or path.startswith(d + "/") for d in dirs)


def _touch(path: str) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))


# What runc makes read-only and masks by default: writing /proc/sys (kernel.core_pattern, say)
# would change the host kernel itself, and these files tell the host's secrets.
_READONLY_PATHS = ("/proc/sys", "/proc/sysrq-trigger", "/proc/irq", "/proc/bus", "/proc/fs")
_MASKED_PATHS = (
    "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
    "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi",
    "/sys/firmware", "/sys/devices/virtual/powercap",
)  # fmt: skip


def _protect_kernel_files() -> None:
    for path in _READONLY_PATHS:
        p = _NEW + path
        if os.path.exists(p):
            L.mount(p, p, None, L.MS_BIND | L.MS_REC)
            L.mount_setattr(p, L.MOUNT_ATTR_RDONLY | L.MOUNT_ATTR_NOSUID | L.MOUNT_ATTR_NODEV)
    for path in _MASKED_PATHS:
        p = _NEW + path
        if os.path.isdir(p):
            L.mount("tmpfs", p, "tmpfs", L.MS_RDONLY | L.MS_NOSUID | L.MS_NODEV, "size=0")
        elif os.path.exists(p):
            L.mount(_OLD + "/dev/null", p, None, L.MS_BIND)
            L.mount_setattr(p, L.MOUNT_ATTR_RDONLY | L.MOUNT_ATTR_NOSUID, recursive=False)


def _run_skeleton(b: _RootBuilder) -> None:
    """Recreate the host's ``/run`` subdirectories, empty, as a fresh boot would have them.

    Servers expect their runtime directory (``/run/postgresql``...) to exist and be writable by
    their user; it does, with the host's owner and mode, but nothing of the host's is in it.
    """
    try:
        entries = list(os.scandir(_OLD + "/run"))
    except OSError:
        return
    for entry in entries:
        if not entry.is_dir(follow_symlinks=False):
            continue
        st = entry.stat(follow_symlinks=False)
        dst = _NEW + "/run/" + entry.name
        try:
            os.mkdir(dst, stat.S_IMODE(st.st_mode))
            os.chmod(dst, stat.S_IMODE(st.st_mode))
            os.chown(dst, st.st_uid, st.st_gid)
        except OSError:
            pass  # e.g. an id unmapped in a user namespace: the directory stays root's
        b.ours.add("/run/" + entry.name)


def build_base() -> _RootBuilder:
    """The part of the sandbox's filesystem every service shares; done ahead of time.

    Needs a private mount namespace. Leaves the host's root at ``/old`` and the new root, not yet
    pivoted into, at ``/new``.
    """
    L.mount(None, "/", None, L.MS_REC | L.MS_PRIVATE)
    # bubblewrap's trick: a tmpfs over /tmp becomes the new root of this mount namespace, the
    # host's root moves below it to /old, with the host's /tmp visible again at /old/tmp.
    L.mount("tmpfs", "/tmp", "tmpfs", L.MS_NOSUID | L.MS_NODEV, "mode=0755")
    os.mkdir("/tmp/old")
    os.mkdir("/tmp/new")
    L.pivot_root("/tmp", "/tmp/old")
    os.chdir("/")
    b = _RootBuilder()
    b.bind(_OLD, _NEW, readonly=True)
    # The host's /proc and /dev (with their submounts) are replaced, not covered: fewer mounts to
    # copy now and to tear down when the service ends.
    for path in ("/proc", "/dev"):
        if os.path.ismount(_NEW + path):
            try:
                L.umount2(_NEW + path, L.MNT_DETACH)
            except OSError:
                pass  # rootless: mounts from the host are locked in a user namespace; covered
    L.mount("proc", _NEW + "/proc", "proc", L.MS_NOSUID | L.MS_NODEV | L.MS_NOEXEC)
    _protect_kernel_files()
    b.tmpfs("/dev")
    for node in _DEV_NODES:
        _touch(f"{_NEW}/dev/{node}")
        L.mount(f"{_OLD}/dev/{node}", f"{_NEW}/dev/{node}", None, L.MS_BIND)
    os.mkdir(_NEW + "/dev/pts")
    L.mount("devpts", _NEW + "/dev/pts", "devpts", L.MS_NOSUID | L.MS_NOEXEC,
            "newinstance,ptmxmode=0666,mode=620")  # fmt: skip
    os.symlink("pts/ptmx", _NEW + "/dev/ptmx")
    os.mkdir(_NEW + "/dev/shm")
    b.tmpfs("/dev/shm", "mode=1777")
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):  # fmt: skip
        os.symlink(target, f"{_NEW}/dev/{name}")
    b.tmpfs("/tmp", "mode=1777")
    if os.path.isdir(_NEW + "/var/tmp"):
        b.tmpfs("/var/tmp", "mode=1777")  # the other shared temporary directory (and its sockets)
    b.tmpfs("/run")
    _run_skeleton(b)
    b.home = b.ensure(HOME, is_dir=True)
    L.mount("tmpfs", _NEW + b.home, "tmpfs", L.MS_NOSUID | L.MS_NODEV, "mode=0700")
    return b


def finish_root(b: _RootBuilder, plan: SandboxPlan) -> None:
    """The service's own part of the filesystem (its mounts, /etc files); pivot into it."""
    os.chown(_NEW + b.home, plan.uid, plan.gid)
    for path in plan.expose:
        # /tmp itself (say) cannot be exposed: the service's own /tmp is there.
        if (_under(path, (*_PRIVATE, HOME)) and path not in (*_PRIVATE, HOME)
                and os.path.exists(_OLD + path)):  # fmt: skip
            b.bind(_OLD + path, _NEW + b.ensure(path, is_dir=os.path.isdir(_OLD + path)), readonly=True)
    # Generated files live on the sandbox's own tmpfs, never on the host's disk: nothing to clean.
    for i, (target, content) in enumerate(plan.etc_files.items()):
        source = f"/generated{i}"
        with open(source, "w") as f:
            f.write(content)
        b.bind(source, _NEW + b.ensure(target, is_dir=False), readonly=True)
    for source, target, readonly in sorted(plan.mounts, key=lambda m: m[1].count("/")):
        try:
            is_dir = os.path.isdir(_OLD + source)
            b.bind(_OLD + source, _NEW + b.ensure(target, is_dir=is_dir), readonly=readonly)
        except OSError as e:
            raise SetupError(f"mount {source} -> {target}: {e.strerror}") from e
    for d in b.shadows:
        L.mount(None, _NEW + d, None, L.MS_REMOUNT | L.MS_BIND | L.MS_RDONLY | L.MS_NOSUID
                | L.MS_NODEV)  # fmt: skip
    os.chdir(_NEW)
    L.pivot_root(".", ".")
    L.umount2(".", L.MNT_DETACH)
    os.chdir("/")


# --- process ----------------------------------------------------------------------------------


def close_fds_except(keep: Iterable[int]) -> None:
    keep = sorted(set(keep))
    lo = 3
    for fd in keep:
        if fd >= lo:
            os.closerange(lo, fd)
            lo = fd + 1
    os.closerange(lo, 1 << 20)


def _report(sync: socket.socket, msg: str) -> None:
    try:
        sync.send(msg.encode()[:4000])
    except OSError:
        pass


def drop_privileges(plan: SandboxPlan) -> None:
    """Become the service's user with at most Docker's default capabilities and no new privileges.

    Order matters: the bounding set can only be cut while CAP_SETPCAP is held (before setuid);
    the inheritable and ambient sets are emptied so no capability survives the exec but what the
    kernel grants root from the bounding set.
    """
    if L.capbset_has(21):  # CAP_SYS_ADMIN still there: cut the bounding set
        L.capbset_drop_except(L.DOCKER_DEFAULT_CAPS)
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
    seccomp.install()  # Docker's deny-list; inherited by everything the service starts


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
        sync.send(b"exec")  # carries our pid (SO_PASSCRED) to the supervisor
        os.execvpe(argv[0], argv, plan.env)
    except SetupError as e:
        _report(sync, f"error:{e}")
    except OSError as e:
        what = argv[0] if e.filename is None else os.fsdecode(e.filename)
        _report(sync, f"error:{what}: {e.strerror}")
    except BaseException as e:
        _report(sync, f"error:{type(e).__name__}: {e}")
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
        L.unshare(L.CLONE_NEWNS | L.CLONE_NEWUTS | L.CLONE_NEWIPC | L.CLONE_NEWNET
                  | (L.CLONE_NEWCGROUP if placed else 0))
        L.loopback_up()
        netns = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        builder = build_base()
        # The bounding set limits only what later execs get: cut it now, ahead of time.
        L.capbset_drop_except(L.DOCKER_DEFAULT_CAPS)
        socket.send_fds(ctl, [b"ready"], [netns])
        os.close(netns)
        msg, fds, _flags, _addr = socket.recv_fds(ctl, 256 << 10, 2, socket.MSG_CMSG_CLOEXEC)
        if not msg or not fds:
            os._exit(0)  # the supervisor is done with us
        plan = SandboxPlan.from_dict(json.loads(msg))
        log_fd = fds[0]
        os.dup2(devnull, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        if len(fds) == 2:  # a restart: back into the slot's network namespace
            L.setns(fds[1], L.CLONE_NEWNET)
            os.close(fds[1])
        if not placed:
            # The supervisor has put us in the service's cgroup by now: that becomes its "/".
            L.unshare(L.CLONE_NEWCGROUP)
        socket.sethostname(plan.name)
        finish_root(builder, plan)
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
            socket.send_fds(ctl, [b"exec"], [pidfd])
        except OSError:  # the supervisor died before the death signal was set again
            os.kill(pid, signal.SIGKILL)
            raise
        os.close(pidfd)
        os.close(log_fd)
        ctl.close()
        _be_init(pid)
    except SetupError as e:
        _report(ctl, f"error:{e}")
    except OSError as e:
        if e.errno == errno.ENOSYS:
            _report(ctl, f"unsupported:this kernel lacks a system call pytest-envbox needs ({e}); "
                    "use Linux 5.12 or newer")  # fmt: skip
        else:
            _report(ctl, f"error:sandbox setup failed: {e}")
    except BaseException as e:
        _report(ctl, f"error:sandbox setup failed: {type(e).__name__}: {e}")
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
