"""Cgroups: one per service, with its limits, its usage figures, a freezer and a kill switch.

One narrow interface, :class:`ServiceCgroup` (made by :class:`CgroupTree`), over the two kernel
interfaces:

- **cgroup v2** (unified): ``memory.max`` + ``memory.swap.max = 0``, ``cpu.max``, ``pids.max``;
  ``memory.events`` (``oom_kill``), ``memory.peak``, ``cpu.stat``; ``cgroup.freeze``, ``cgroup.kill``.
- **cgroup v1** (legacy): ``memory.limit_in_bytes`` (+ ``memory.memsw.limit_in_bytes``),
  ``memory.max_usage_in_bytes``, ``memory.oom_control`` (``oom_kill``), ``cpu.cfs_quota_us``,
  ``cpuacct.usage``, ``pids.max``, the ``freezer`` controller.
- **hybrid** (v1 controllers plus a controller-less cgroup2 mount, as on this project's own CI):
  limits and figures in v1; freezing, killing and "is it empty" in a child of the cgroup2 mount,
  which offers ``cgroup.freeze``, ``cgroup.kill`` and ``cgroup.events`` even without controllers
  (runc and crun do the same).

Everything is nested under the cgroup the test process is already in, never at a hierarchy root
it does not own and never next to it: ``<own cgroup>/envbox-<pid>-<start time>/<n>``. The run
directory names its supervisor, so a later run (or ``envbox clean``) can tell a stale one (its
supervisor is gone: SIGKILLed) from a live one and remove it.

Hand-written on purpose: no maintained Python library covers v1, v2 and hybrid hosts (the few
that exist are v1-only or wrap systemd over D-Bus), and this module is imported by the lean
supervisor, where a dependency would also cost start-up time.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from dataclasses import dataclass, field

#: v1 controllers we use; ``cpuacct`` may be co-mounted with ``cpu`` (one directory for both).
V1_CONTROLLERS = ("memory", "cpu", "cpuacct", "pids", "freezer")
#: v2 controllers a service's cgroup needs enabled from its parents.
V2_CONTROLLERS = ("memory", "cpu", "pids")
CPU_PERIOD_US = 100_000
RUN_PREFIX = "envbox-"


class CgroupError(Exception):
    """Cgroups cannot be used here (the message says why and how to fix it), or an operation failed."""


@dataclass(frozen=True)
class CgroupHost:
    """Where this process's cgroups are, per the kernel's own view of it.

    ``v1`` maps each v1 controller we use to the directory of our own cgroup in its hierarchy;
    ``unified`` is our own cgroup's directory in the cgroup2 hierarchy (None if not mounted).
    """

    version: str  # "v2" | "v1" | "hybrid" | "none"
    v1: dict[str, str] = field(default_factory=dict)
    unified: str | None = None
    v2_controllers: tuple[str, ...] = ()
    #: the directory the cgroup2 mount shows at its top: everything a container (with a cgroup
    #: namespace or a bind mount of its own cgroup) can see, so the test run's world.
    unified_top: str | None = None

    def describe(self) -> str:
        if self.version == "v2":
            return f"cgroup v2 at {self.unified} (controllers: {' '.join(self.v2_controllers) or 'none'})"
        if self.version in ("v1", "hybrid"):
            where = ", ".join(f"{c}: {d}" for c, d in sorted(self.v1.items()))
            extra = f"; cgroup2 (freeze/kill) at {self.unified}" if self.unified else ""
            return f"cgroup {self.version} ({where}{extra})"
        return "no cgroup filesystem mounted"


def _unescape(path: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal."""
    for code, ch in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        path = path.replace(code, ch)
    return path


def parse_host(mountinfo: str, proc_cgroup: str) -> CgroupHost:
    """Find our cgroups from ``/proc/self/mountinfo`` and ``/proc/self/cgroup`` (pure: testable).

    A hierarchy mounted with a root other than ``/`` (a container's view) maps our path relative
    to that root; when our path is not below it (another cgroup namespace), the mount's own root
    is taken as ours.
    """
    own_v1: dict[str, str] = {}
    own_v2: str | None = None
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _hid, ctrls, path = parts
        if ctrls == "":
            own_v2 = path
        for c in ctrls.split(","):
            if c in V1_CONTROLLERS:
                own_v1[c] = path
    v1: dict[str, str] = {}
    unified: str | None = None
    unified_top: str | None = None
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, rfields = left.split(), right.split()
        if len(fields) < 5 or len(rfields) < 3:
            continue
        root, point, fstype, superopts = _unescape(fields[3]), _unescape(fields[4]), rfields[0], rfields[2]
        if fstype == "cgroup":
            for c in superopts.split(","):
                if c in V1_CONTROLLERS and c in own_v1 and c not in v1:
                    v1[c] = _join(point, root, own_v1[c])
        elif fstype == "cgroup2" and own_v2 is not None and unified is None:
            unified = _join(point, root, own_v2)
            unified_top = point
    controllers: tuple[str, ...] = ()
    if unified is not None:
        with contextlib.suppress(OSError), open(os.path.join(unified, "cgroup.controllers")) as f:
            controllers = tuple(f.read().split())
    if v1:
        version = "hybrid" if unified is not None else "v1"
    elif unified is not None:
        version = "v2"
    else:
        version = "none"
    return CgroupHost(version, v1, unified, controllers, unified_top)


def _join(point: str, root: str, own: str) -> str:
    if root != "/" and (own == root or own.startswith(root.rstrip("/") + "/")):
        own = own[len(root):]
    elif root != "/":
        own = "/"
    return point.rstrip("/") + ("/" + own.strip("/") if own.strip("/") else "")


def detect() -> CgroupHost:
    try:
        with open("/proc/self/mountinfo") as f:
            mountinfo = f.read()
        with open("/proc/self/cgroup") as f:
            proc_cgroup = f.read()
    except OSError:
        return CgroupHost("none")
    return parse_host(mountinfo, proc_cgroup)


# --- quantities ---------------------------------------------------------------------------------


def cpu_quota(cores: float, period: int = CPU_PERIOD_US) -> tuple[int, int]:
    """``(quota_us, period_us)`` for ``cores`` (``0.25`` -> ``(25000, 100000)``); at least 1 ms."""
    if cores <= 0:
        raise ValueError(f"cpu must be > 0 cores, not {cores!r}")
    return max(1000, round(cores * period)), period


def format_memory(n: int) -> str:
    """A byte count the way a user would have written it: ``67108864`` -> ``"64Mi"``."""
    for unit, size in (("Gi", 1 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    for unit, size in (("G", 10**9), ("M", 10**6), ("k", 10**3)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


# --- files ----------------------------------------------------------------------------------------


def _write(path: str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _read(path: str) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):  # cgroup files give at most a page per read
            chunks.append(chunk)
        return b"".join(chunks).decode()
    finally:
        os.close(fd)


def _read_int(path: str) -> int | None:
    try:
        return int(_read(path).split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _keyed(path: str, key: str) -> int | None:
    """The value of ``key`` in a flat-keyed file (``memory.events``, ``cpu.stat``...)."""
    try:
        for line in _read(path).splitlines():
            k, _, v = line.partition(" ")
            if k == key:
                return int(v)
    except (OSError, ValueError):
        pass
    return None


def _rmdir(path: str, deadline: float) -> None:
    """Remove a cgroup directory; an emptied cgroup can take a moment to become removable."""
    while True:
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.001)


# --- the tree of this run ---------------------------------------------------------------------------


def run_name(pid: int) -> str:
    """``envbox-<pid>-<start time>``: unique per process on this boot, and checkable for liveness."""
    return f"{RUN_PREFIX}{pid}-{_starttime(pid)}"


def _starttime(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "0"


def _is_stale(name: str) -> bool:
    """Is this run directory's supervisor gone (dead, a zombie nobody reaped yet, or its pid
    reused by another process)?"""
    try:
        pid_s, start = name[len(RUN_PREFIX):].split("-", 1)
        pid = int(pid_s)
    except ValueError:
        return False  # not one of ours: leave it alone
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return True
    return fields[0] in ("Z", "X") or fields[19] != start


class CgroupTree:
    """This supervisor's run directory in every hierarchy it uses, and the services below it."""

    def __init__(self, host: CgroupHost, name: str, *, may_move: bool = True) -> None:
        self.host = host
        self.name = name
        #: False for a dry run (``envbox doctor``): never move the test run's processes; then
        #: ``would_move`` says that a real run would have (see :func:`_vacate`).
        self.may_move = may_move
        self.would_move = False
        self.leftover: list[ServiceCgroup] = []  # could not be removed yet: retried at the end
        self.count = 0  # service cgroups made: their names
        self.v1: dict[str, str] = {}  # controller -> run directory
        self.unified: str | None = None  # run directory in cgroup2
        self.v2 = host.version == "v2"
        self.problem: str | None = None
        self.services: dict[str, ServiceCgroup] = {}
        try:
            self._create()
        except OSError as e:
            self.problem = self._explain(e)
            self._remove_dirs()

    def _explain(self, e: OSError) -> str:
        where = self.host.describe()
        delegate = "`systemd-run --user --scope -p Delegate=yes pytest ...` (without --user as root)"
        if e.errno == errno.EROFS:
            why = "the cgroup filesystem is mounted read-only (a container without cgroup access?)"
            fix = ("make it writable: in Docker, `--privileged`, or `--cgroupns=private` with a "
                   "writable /sys/fs/cgroup")  # fmt: skip
        elif e.errno in (errno.EACCES, errno.EPERM):
            why = "this user may not create cgroups there"
            fix = f"run the tests as root, or on cgroup v2 in a delegated cgroup of their own: {delegate}"
        elif e.errno == errno.EBUSY and self.v2:
            why = (f"the cgroup this test run is in ({self.host.unified}) holds processes, and "
                   "cgroup v2 gives no controllers to the children of a cgroup with processes of "
                   "its own (its 'no internal processes' rule); envbox moves them into a leaf only "
                   "when the cgroup is delegated to the test run (the trusted.delegate or "
                   "user.delegate attribute systemd sets, owned by the user running the tests, or "
                   "all a container sees) and they all descend from the test run's first "
                   "process")  # fmt: skip
            fix = f"run pytest in a cgroup of its own: {delegate}"
        elif e.errno == errno.ENOENT:
            why = f"{e.strerror or e}"
            fix = ("enable them: on cgroup v2 in the parent's cgroup.subtree_control (or let systemd "
                   f"delegate them: {delegate}); on cgroup v1, mount their hierarchies")  # fmt: skip
        else:
            why = f"{e.strerror or e} ({getattr(e, 'filename', None) or 'cgroupfs'})"
            fix = f"run the tests as root, or on cgroup v2 in a delegated cgroup of their own: {delegate}"
        return f"cgroups cannot be used here: {why}; found {where}. To fix: {fix}"

    def _create(self) -> None:
        if self.host.version == "none":
            raise OSError(errno.ENOENT, "no cgroup filesystem is mounted")
        if self.v2:
            assert self.host.unified is not None
            missing = [c for c in V2_CONTROLLERS if c not in self.host.v2_controllers]
            if missing:
                raise OSError(errno.ENOENT, f"controllers {' '.join(missing)} not available",
                              self.host.unified)  # fmt: skip
            own = v2_base(self.host.unified)
            # Our own cgroup passes the controllers down, then our run directory does too.
            try:
                _enable(own)
            except OSError as e:
                if e.errno != errno.EBUSY:
                    raise
                if not _delegated(own, self.host.unified_top):
                    raise OSError(errno.EBUSY, "not delegated to the test run", own) from None
                if not self.may_move:
                    _movable(own)  # the same check, read-only: EBUSY if a real run would refuse
                    self.would_move = True
                    return
                _vacate(own)
                _enable(own)
            self.unified = os.path.join(own, self.name)
            os.mkdir(self.unified)
            _enable(self.unified)
            return
        for c, own in self.host.v1.items():
            d = os.path.join(own, self.name)
            if d not in self.v1.values():
                os.mkdir(d)
            self.v1[c] = d
        missing = [c for c in ("memory", "cpu", "pids") if c not in self.v1]
        if missing:
            raise OSError(errno.ENOENT, f"cgroup v1 controllers {' '.join(missing)} not mounted")
        if "cpuacct" not in self.v1:
            raise OSError(errno.ENOENT, "cgroup v1 controller cpuacct not mounted")
        if self.host.unified is not None:
            with contextlib.suppress(OSError):
                d = os.path.join(self.host.unified, self.name)
                os.mkdir(d)
                self.unified = d

    @property
    def usable(self) -> bool:
        return self.problem is None

    def new(self) -> ServiceCgroup:
        """A new, empty cgroup for one run of a service: ``<run dir>/<n>``.

        Made ahead of time, for a spare sandbox that moves itself in while it is prepared (see
        ``sandbox.init.run_spare``): moving a process between cgroups waits for an RCU grace period
        (cgroup_threadgroup_rwsem), about 6 ms after the kernel has been idle, which must not be
        spent on a start. A number, not the service's name: a spare's service is not known yet,
        and cgroup v2 cannot rename a cgroup.
        """
        if self.problem is not None:
            raise CgroupError(self.problem)
        self.count += 1
        return ServiceCgroup(self, str(self.count))

    def adopt(self, slot: str, cg: ServiceCgroup) -> None:
        """``cg`` is now the cgroup of the service in ``slot`` (its previous run's is removed)."""
        self.release(slot)
        self.services[slot] = cg

    def discard(self, cg: ServiceCgroup) -> None:
        """Remove a cgroup that no service took (its spare died, or was never used)."""
        try:
            done = cg.remove(timeout=0.5)
        except Exception:  # a cleanup step: the rest must still run
            done = False
        if not done:
            self.leftover.append(cg)

    def release(self, slot: str) -> None:
        """Kill what is left of a service's cgroup and remove it; never raises.

        A cgroup whose processes do not die at once (stuck in the kernel) is not waited for
        here, where the supervisor would stall: it is retried at :meth:`remove`.
        """
        cg = self.services.pop(slot, None)
        if cg is not None:
            self.discard(cg)

    def remove(self) -> None:
        for slot in list(self.services):
            self.release(slot)
        for cg in self.leftover:
            with contextlib.suppress(Exception):
                cg.remove(timeout=5.0)
        self.leftover.clear()
        self._remove_dirs()

    def _remove_dirs(self) -> None:
        """Remove the run directories, with anything still below them (ours alone)."""
        deadline = time.monotonic() + 2.0
        for d in {*self.v1.values(), *([self.unified] if self.unified else [])}:
            with contextlib.suppress(OSError):
                if any(os.path.isdir(os.path.join(d, n)) for n in os.listdir(d)):
                    _kill_dir(d)
                _rmtree(d, deadline)


LEAF = "envbox-tests"


def v2_base(own: str) -> str:
    """Where run directories go in cgroup v2: our cgroup, or its parent if we are in its leaf.

    After :func:`_vacate` moved a shell and its pytest into ``<cgroup>/envbox-tests``, the next
    run starts there; its runs belong next to the leaf (where the controllers are already
    enabled), not in a leaf of the leaf.
    """
    return os.path.dirname(own) if os.path.basename(own) == LEAF else own


def _delegated(own: str, top: str | None) -> bool:
    """Is ``own`` the test run's to reorganise? Delegated to it, or all a container can see.

    Delegated: marked so by systemd (``trusted.delegate``, which only root can read, or
    ``user.delegate`` for a user's own manager), or owned by the (non-root) user we run as, which
    is what delegating a cgroup to a user means.
    """
    if top is not None and own.rstrip("/") == top.rstrip("/"):
        return True
    for attr in ("trusted.delegate", "user.delegate"):  # systemd 251+ marks delegated units
        try:
            if os.getxattr(own, attr).strip() in (b"1", b"yes", b"true"):
                return True
        except OSError:
            continue
    try:
        return os.geteuid() != 0 and os.stat(own).st_uid == os.geteuid()
    except OSError:
        return False


def _ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def _vacate(own: str) -> None:
    """Move every process of ``own`` to the leaf ``own/envbox-tests``, if they are all ours.

    cgroup v2 gives controllers to the children of a non-root cgroup only when it holds no
    processes itself. In a cgroup made for the test run (``systemd-run --scope -p Delegate=yes
    pytest``, a CI job's container) every process descends from the one that entered it: the
    highest of our ancestors still in it (pytest, tox, a container's init). They all move one level
    down, as podman, crun and Docker-in-Docker do; the limits then apply below. A process that does
    not descend from it (another job, a daemon) is not ours to move: EBUSY, and the caller
    explains. Serialised with ``flock`` (stdlib: the lean supervisor cannot import ``filelock``)
    because every xdist worker's supervisor may try at once.
    """
    import fcntl

    lock_fd = os.open(own, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        leaf = os.path.join(own, LEAF)
        for _ in range(10):  # processes may fork while we move them
            procs = _movable(own)
            if not procs:
                return
            with contextlib.suppress(FileExistsError):
                os.mkdir(leaf)
            for p in procs:
                with contextlib.suppress(ProcessLookupError):
                    _write(f"{leaf}/cgroup.procs", str(p))
        raise OSError(errno.EBUSY, "processes keep appearing in the cgroup", own)
    finally:
        os.close(lock_fd)


def _movable(own: str) -> list[int]:
    """The processes of ``own``, if they all descend from the test run's first one there.

    Raise EBUSY, naming them, when some do not (a stranger's processes are not ours to move).
    """
    procs = [int(p) for p in _read(f"{own}/cgroup.procs").split()]
    inside = set(procs)
    top, p = os.getpid(), os.getpid()
    while p > 0:
        if p in inside:
            top = p
        p = _ppid(p) if p > 1 else 0
    strangers = [p for p in procs if not _descends_from(p, top)]
    if strangers:
        raise OSError(errno.EBUSY, f"processes {strangers[:5]} there do not descend from "
                      f"the test run's first process ({top})", own)  # fmt: skip
    return procs


def _descends_from(pid: int, root: int) -> bool:
    for _ in range(4096):
        if pid == root:
            return True
        if pid <= 1:
            return False
        pid = _ppid(pid)
    return False


def _enable(d: str) -> None:
    """Pass the memory, cpu and pids controllers down to the children of ``d``."""
    with open(os.path.join(d, "cgroup.subtree_control")) as f:
        have = set(f.read().split())
    need = [c for c in V2_CONTROLLERS if c not in have]
    if need:
        _write(os.path.join(d, "cgroup.subtree_control"), " ".join("+" + c for c in need))


class ServiceCgroup:
    """One service's cgroup, in every hierarchy in use."""

    def __init__(self, tree: CgroupTree, name: str) -> None:
        self.name = name
        self.tree = tree
        self.v2 = tree.v2
        self.dirs: dict[str, str] = {}  # v1 controller -> dir
        self.unified: str | None = None
        self.peak = 0  # sampled, where the kernel keeps no peak
        made: list[str] = []
        try:
            for c, run in tree.v1.items():
                d = os.path.join(run, name)
                if d not in made:
                    os.mkdir(d)
                    made.append(d)
                self.dirs[c] = d
            if tree.unified is not None:
                self.unified = os.path.join(tree.unified, name)
                os.mkdir(self.unified)
                made.append(self.unified)
        except OSError:
            for d in reversed(made):
                with contextlib.suppress(OSError):
                    os.rmdir(d)
            raise
        self.frozen = False  # paused: signals wait until it is thawed, exec would hang

    # --- set up -----------------------------------------------------------------------------------

    def set_limits(self, memory: int | None, cpu: float | None, pids: int | None) -> None:
        """Write the limits; raise OSError when the kernel refuses one (say, below current use)."""
        if self.v2:
            assert self.unified is not None
            d = self.unified
            if memory is not None:
                _write(f"{d}/memory.max", str(memory))
                with contextlib.suppress(FileNotFoundError):  # no swap accounting: no swap to limit
                    _write(f"{d}/memory.swap.max", "0")
            if cpu is not None:
                quota, period = cpu_quota(cpu)
                _write(f"{d}/cpu.max", f"{quota} {period}")
            if pids is not None:
                _write(f"{d}/pids.max", str(pids))
            return
        if memory is not None:
            m = self.dirs["memory"]
            _write(f"{m}/memory.limit_in_bytes", str(memory))
            if os.path.exists(f"{m}/memory.memsw.limit_in_bytes"):
                _write(f"{m}/memory.memsw.limit_in_bytes", str(memory))  # memory + swap: no swap
            else:
                with contextlib.suppress(OSError):
                    _write(f"{m}/memory.swappiness", "0")
        if cpu is not None:
            quota, period = cpu_quota(cpu)
            c = self.dirs["cpu"]
            _write(f"{c}/cpu.cfs_period_us", str(period))
            _write(f"{c}/cpu.cfs_quota_us", str(quota))
        if pids is not None:
            _write(f"{self.dirs['pids']}/pids.max", str(pids))

    def procs_files(self) -> list[str]:
        """Every ``cgroup.procs`` a process must be written to, to be in this cgroup."""
        return [f"{d}/cgroup.procs" for d in self._dirs()]

    def add(self, pid: int) -> None:
        """Move a process (and so every child it will have) into this cgroup."""
        for f in self.procs_files():
            _write(f, str(pid))

    # --- figures -------------------------------------------------------------------------------

    def stats(self) -> dict[str, int | float]:
        if self.v2:
            d = self.unified
            mem = _read_int(f"{d}/memory.current") or 0
            peak = _read_int(f"{d}/memory.peak")
            usec = _keyed(f"{d}/cpu.stat", "usage_usec") or 0
            cpu = usec / 1e6
            pids = _read_int(f"{d}/pids.current") or 0
        else:
            m = self.dirs["memory"]
            mem = _read_int(f"{m}/memory.usage_in_bytes") or 0
            peak = _read_int(f"{m}/memory.max_usage_in_bytes")
            cpu = (_read_int(f"{self.dirs['cpuacct']}/cpuacct.usage") or 0) / 1e9
            pids = _read_int(f"{self.dirs['pids']}/pids.current") or 0
        self.peak = max(self.peak, mem, peak or 0)
        return {"memory_bytes": mem, "memory_peak_bytes": self.peak, "cpu_seconds": cpu,
                "pids": pids, "oom_kills": self.oom_kills()}  # fmt: skip

    def oom_kills(self) -> int:
        if self.v2:
            return _keyed(f"{self.unified}/memory.events", "oom_kill") or 0
        return _keyed(f"{self.dirs['memory']}/memory.oom_control", "oom_kill") or 0

    # --- freezer and kill --------------------------------------------------------------------------

    def _freeze_file(self) -> str | None:
        if self.unified is not None and os.path.exists(f"{self.unified}/cgroup.freeze"):
            return f"{self.unified}/cgroup.freeze"
        return None

    def freeze(self, frozen: bool, timeout: float = 5.0) -> None:
        """Stop (or restart) every process of the cgroup; return once the kernel says it is done.

        A freeze that does not complete in time (a process stuck in the kernel) is undone before
        the error is raised: a half-frozen service is worse than one that was never paused.
        """
        try:
            self._set_frozen(frozen, timeout)
        except (CgroupError, OSError):
            if frozen:
                try:
                    self._set_frozen(False, 1.0)
                except (CgroupError, OSError):
                    self.frozen = True  # perhaps frozen still: every later step thaws first
                    raise
            raise
        self.frozen = frozen

    def _set_frozen(self, frozen: bool, timeout: float) -> None:
        f = self._freeze_file()
        deadline = time.monotonic() + timeout
        if f is not None:
            _write(f, "1" if frozen else "0")
            events = f"{self.unified}/cgroup.events"
            while _keyed(events, "frozen") != (1 if frozen else 0):
                if time.monotonic() > deadline:
                    raise CgroupError("the cgroup did not " + ("freeze" if frozen else "thaw")
                                      + f" within {timeout:g} s")  # fmt: skip
                time.sleep(0.0005)
            return
        if "freezer" not in self.dirs:
            raise CgroupError("no freezer here: neither cgroup.freeze (cgroup v2, Linux 5.2+) "
                              "nor the v1 freezer controller is available")  # fmt: skip
        state = f"{self.dirs['freezer']}/freezer.state"
        want = "FROZEN" if frozen else "THAWED"
        _write(state, want)
        while _read(state).strip() != want:
            if time.monotonic() > deadline:
                raise CgroupError(f"the cgroup did not reach {want} within {timeout:g} s")
            _write(state, want)
            time.sleep(0.0005)

    def _dirs(self) -> list[str]:
        return [*dict.fromkeys(self.dirs.values()), *([self.unified] if self.unified else [])]

    def pids(self) -> list[int]:
        """Every process in the cgroup and in any cgroup the service made below it."""
        d = self.unified if self.unified is not None else next(iter(self.dirs.values()), None)
        return _tree_pids(d) if d is not None else []

    def kill(self) -> None:
        """SIGKILL every process in the cgroup (and below), race-free: nothing can fork meanwhile."""
        if self.unified is not None and os.path.exists(f"{self.unified}/cgroup.kill"):
            with contextlib.suppress(OSError):
                _write(f"{self.unified}/cgroup.kill", "1")
                return
        # Freeze, kill each task, thaw: a frozen task cannot fork, and dies once thawed. The thaw
        # happens whatever the freeze did (it may have half-worked), down to any cgroup the
        # service froze below its own.
        try:
            with contextlib.suppress(CgroupError, OSError):
                self._set_frozen(True, 1.0)
            for pid in self.pids():
                with contextlib.suppress(OSError):
                    os.kill(pid, 9)
        finally:
            with contextlib.suppress(CgroupError, OSError):
                self._set_frozen(False, 1.0)
            if "freezer" in self.dirs:
                _thaw_tree(self.dirs["freezer"])
            self.frozen = False

    def is_empty(self) -> bool:
        if self.unified is not None:
            populated = _keyed(f"{self.unified}/cgroup.events", "populated")
            if populated is not None:
                return populated == 0
        return not self.pids()

    def remove(self, timeout: float = 5.0) -> bool:
        """Kill what is left, then remove the directories, the service's own sub-cgroups first.

        Return False (and leave them) when the processes did not die within ``timeout``.
        """
        deadline = time.monotonic() + timeout
        if not self.is_empty():
            self.kill()
            while not self.is_empty():
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.001)
        ok = True
        for d in self._dirs():
            try:
                _rmtree(d, deadline)
            except OSError:
                ok = False
        return ok


def _thaw_tree(d: str) -> None:
    """THAWED into every v1 freezer cgroup from ``d`` down (a frozen task dies only once thawed)."""
    for sub, _dirs, _files in os.walk(d):
        with contextlib.suppress(OSError):
            _write(f"{sub}/freezer.state", "THAWED")


def _tree_pids(d: str) -> list[int]:
    pids: list[int] = []
    for sub, _dirs, _files in os.walk(d):
        with contextlib.suppress(OSError, ValueError):
            pids.extend(int(p) for p in _read(f"{sub}/cgroup.procs").split())
    return pids


def _rmtree(d: str, deadline: float) -> None:
    """Remove a cgroup and the cgroups below it, deepest first (cgroupfs has no recursive rmdir).

    One rmdir first: a service's cgroup rarely has cgroups below it, and walking a cgroup
    directory (dozens of control files in each v1 hierarchy) costs more than removing it.
    """
    try:
        os.rmdir(d)
        return
    except FileNotFoundError:
        return
    except OSError as e:
        if e.errno not in (errno.EBUSY, errno.ENOTEMPTY):
            raise
    for sub, _dirs, _files in os.walk(d, topdown=False):
        _rmdir(sub, deadline)


# --- stale runs -----------------------------------------------------------------------------------


def clean_stale(host: CgroupHost | None = None) -> list[str]:
    """Remove the run directories of supervisors that are gone (SIGKILLed); return what was removed.

    Only ``envbox-<pid>-<start>`` directories directly under our own cgroup, whose process is not
    alive: never a sibling's, never a live run's. Leftover processes in them are killed first.
    """
    host = host or detect()
    removed: list[str] = []
    owns = [*dict.fromkeys(host.v1.values()), *([v2_base(host.unified)] if host.unified else [])]
    for own in owns:
        try:
            names = [n for n in os.listdir(own) if n.startswith(RUN_PREFIX)]
        except OSError:
            continue
        for name in names:
            if not _is_stale(name):
                continue
            run = os.path.join(own, name)
            with contextlib.suppress(OSError):
                _kill_dir(run)
                _rmtree(run, time.monotonic() + 2.0)
                removed.append(run)
    return removed


def _kill_dir(d: str) -> None:
    """SIGKILL everything in ``d`` and below, then wait (briefly) until it is gone."""
    if os.path.exists(f"{d}/cgroup.kill"):
        with contextlib.suppress(OSError):
            _write(f"{d}/cgroup.kill", "1")
    else:
        for pid in _tree_pids(d):
            with contextlib.suppress(OSError):
                os.kill(pid, 9)
        _thaw_tree(d)
    deadline = time.monotonic() + 2.0
    while _tree_pids(d) and time.monotonic() < deadline:
        time.sleep(0.001)
