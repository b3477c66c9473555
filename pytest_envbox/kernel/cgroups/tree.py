"""The run tree: this supervisor's run directory in every hierarchy, and its services' cgroups.

(Being split into backends: see the package's docstring.)
"""

from __future__ import annotations

import contextlib
import errno
import os

from pytest_envbox.kernel.cgroups.cgroupfs import (
    RETRY,
    keyed,
    kill_dir,
    read,
    read_int,
    rmtree,
    thaw_tree,
    tree_pids,
    write,
)
from pytest_envbox.kernel.cgroups.delegation import delegated, enable_controllers, movable, v2_base, vacate
from pytest_envbox.kernel.cgroups.host import V2_CONTROLLERS, CgroupHost
from pytest_envbox.kernel.cgroups.quantities import cpu_quota
from pytest_envbox.wait import Deadline, wait_until

__all__ = ["FREEZE_POLL", "CgroupError", "CgroupTree", "ServiceCgroup"]

#: The pause between two looks at a freezer that is not done yet: a freeze usually completes in
#: well under a millisecond, and a pause() or a stop waits for it.
FREEZE_POLL = 0.0005


class CgroupError(Exception):
    """Cgroups cannot be used here (the message says why and how to fix it), or an operation failed."""


class CgroupTree:
    """This supervisor's run directory in every hierarchy it uses, and the services below it."""

    def __init__(self, host: CgroupHost, name: str, *, may_move: bool = True) -> None:
        self.host = host
        self.name = name
        #: False for a dry run (``envbox doctor``): never move the test run's processes; then
        #: ``would_move`` says that a real run would have (see
        #: :func:`.delegation.vacate`).
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
                enable_controllers(own)
            except OSError as e:
                if e.errno != errno.EBUSY:
                    raise
                if not delegated(own, self.host.unified_top):
                    raise OSError(errno.EBUSY, "not delegated to the test run", own) from None
                if not self.may_move:
                    movable(own)  # the same check, read-only: EBUSY if a real run would refuse
                    self.would_move = True
                    return
                vacate(own)
                enable_controllers(own)
            self.unified = os.path.join(own, self.name)
            os.mkdir(self.unified)
            enable_controllers(self.unified)
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
        ``sandbox.run_spare``): moving a process between cgroups waits for an RCU grace period
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
        deadline = Deadline(2.0)
        for d in {*self.v1.values(), *([self.unified] if self.unified else [])}:
            with contextlib.suppress(OSError):
                if any(os.path.isdir(os.path.join(d, n)) for n in os.listdir(d)):
                    kill_dir(d)
                rmtree(d, deadline)



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
                write(f"{d}/memory.max", str(memory))
                with contextlib.suppress(FileNotFoundError):  # no swap accounting: no swap to limit
                    write(f"{d}/memory.swap.max", "0")
            if cpu is not None:
                quota, period = cpu_quota(cpu)
                write(f"{d}/cpu.max", f"{quota} {period}")
            if pids is not None:
                write(f"{d}/pids.max", str(pids))
            return
        if memory is not None:
            m = self.dirs["memory"]
            write(f"{m}/memory.limit_in_bytes", str(memory))
            if os.path.exists(f"{m}/memory.memsw.limit_in_bytes"):
                write(f"{m}/memory.memsw.limit_in_bytes", str(memory))  # memory + swap: no swap
            else:
                with contextlib.suppress(OSError):
                    write(f"{m}/memory.swappiness", "0")
        if cpu is not None:
            quota, period = cpu_quota(cpu)
            c = self.dirs["cpu"]
            write(f"{c}/cpu.cfs_period_us", str(period))
            write(f"{c}/cpu.cfs_quota_us", str(quota))
        if pids is not None:
            write(f"{self.dirs['pids']}/pids.max", str(pids))

    def procs_files(self) -> list[str]:
        """Every ``cgroup.procs`` a process must be written to, to be in this cgroup."""
        return [f"{d}/cgroup.procs" for d in self._dirs()]

    def add(self, pid: int) -> None:
        """Move a process (and so every child it will have) into this cgroup."""
        for f in self.procs_files():
            write(f, str(pid))

    # --- figures -------------------------------------------------------------------------------

    def stats(self) -> dict[str, int | float]:
        if self.v2:
            d = self.unified
            mem = read_int(f"{d}/memory.current") or 0
            peak = read_int(f"{d}/memory.peak")
            usec = keyed(f"{d}/cpu.stat", "usage_usec") or 0
            cpu = usec / 1e6
            pids = read_int(f"{d}/pids.current") or 0
        else:
            m = self.dirs["memory"]
            mem = read_int(f"{m}/memory.usage_in_bytes") or 0
            peak = read_int(f"{m}/memory.max_usage_in_bytes")
            cpu = (read_int(f"{self.dirs['cpuacct']}/cpuacct.usage") or 0) / 1e9
            pids = read_int(f"{self.dirs['pids']}/pids.current") or 0
        self.peak = max(self.peak, mem, peak or 0)
        return {"memory_bytes": mem, "memory_peak_bytes": self.peak, "cpu_seconds": cpu,
                "pids": pids, "oom_kills": self.oom_kills()}  # fmt: skip

    def oom_kills(self) -> int:
        if self.v2:
            return keyed(f"{self.unified}/memory.events", "oom_kill") or 0
        return keyed(f"{self.dirs['memory']}/memory.oom_control", "oom_kill") or 0

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
        deadline = Deadline(timeout)
        if f is not None:
            write(f, "1" if frozen else "0")
            events, done = f"{self.unified}/cgroup.events", 1 if frozen else 0
            if wait_until(lambda: True if keyed(events, "frozen") == done else None, deadline,
                          interval=FREEZE_POLL) is None:  # fmt: skip
                raise CgroupError("the cgroup did not " + ("freeze" if frozen else "thaw")
                                  + f" within {timeout:g} s")  # fmt: skip
            return
        if "freezer" not in self.dirs:
            raise CgroupError("no freezer here: neither cgroup.freeze (cgroup v2, Linux 5.2+) "
                              "nor the v1 freezer controller is available")  # fmt: skip
        state = f"{self.dirs['freezer']}/freezer.state"
        want = "FROZEN" if frozen else "THAWED"
        write(state, want)

        def reached() -> bool | None:
            if read(state).strip() == want:
                return True
            write(state, want)  # still FREEZING: ask again (a task busy in the kernel may be done)
            return None

        if wait_until(reached, deadline, interval=FREEZE_POLL) is None:
            raise CgroupError(f"the cgroup did not reach {want} within {timeout:g} s")

    def _dirs(self) -> list[str]:
        return [*dict.fromkeys(self.dirs.values()), *([self.unified] if self.unified else [])]

    def pids(self) -> list[int]:
        """Every process in the cgroup and in any cgroup the service made below it."""
        d = self.unified if self.unified is not None else next(iter(self.dirs.values()), None)
        return tree_pids(d) if d is not None else []

    def kill(self) -> None:
        """SIGKILL every process in the cgroup (and below), race-free: nothing can fork meanwhile."""
        if self.unified is not None and os.path.exists(f"{self.unified}/cgroup.kill"):
            with contextlib.suppress(OSError):
                write(f"{self.unified}/cgroup.kill", "1")
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
                thaw_tree(self.dirs["freezer"])
            self.frozen = False

    def is_empty(self) -> bool:
        if self.unified is not None:
            populated = keyed(f"{self.unified}/cgroup.events", "populated")
            if populated is not None:
                return populated == 0
        return not self.pids()

    def remove(self, timeout: float = 5.0) -> bool:
        """Kill what is left, then remove the directories, the service's own sub-cgroups first.

        Return False (and leave them) when the processes did not die within ``timeout``.
        """
        deadline = Deadline(timeout)
        if not self.is_empty():
            self.kill()
            if wait_until(lambda: True if self.is_empty() else None, deadline, interval=RETRY) is None:
                return False
        ok = True
        for d in self._dirs():
            try:
                rmtree(d, deadline)
            except OSError:
                ok = False
        return ok


