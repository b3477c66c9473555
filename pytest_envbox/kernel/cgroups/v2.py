"""The cgroup v2 backend: one unified hierarchy, every controller and file in one directory.

Limits: ``memory.max`` with ``memory.swap.max = 0``, ``cpu.max``, ``pids.max``. Figures:
``memory.current``, ``memory.peak``, ``cpu.stat``, ``pids.current``, ``memory.events``
(``oom_kill``). The core files for freezing, killing and "is it empty" (see :mod:`.unified`).
New processes are cloned straight into their cgroup (``CLONE_INTO_CGROUP``): no move at all.
"""

from __future__ import annotations

import contextlib
import errno
import os

from pytest_envbox.kernel.cgroups import unified
from pytest_envbox.kernel.cgroups.base import CgroupBackend, CgroupError, Placement, ServiceCgroup, Usage
from pytest_envbox.kernel.cgroups.cgroupfs import keyed, read_int, tree_pids, write
from pytest_envbox.kernel.cgroups.delegation import delegated, enable_controllers, movable, v2_base, vacate
from pytest_envbox.kernel.cgroups.host import V2_CONTROLLERS, CgroupHost
from pytest_envbox.kernel.cgroups.quantities import cpu_quota

__all__ = ["V2Backend", "V2Cgroup"]


class V2Cgroup(ServiceCgroup):
    """A service's cgroup on cgroup v2: the one directory ``path``."""

    def __init__(self, name: str, path: str) -> None:
        super().__init__(name)
        self.path = path
        self.procs = (f"{path}/cgroup.procs",)

    def set_limits(self, memory: int | None, cpu: float | None, pids: int | None) -> None:
        d = self.path
        if memory is not None:
            write(f"{d}/memory.max", str(memory))
            with contextlib.suppress(FileNotFoundError):  # no swap accounting: no swap to limit
                write(f"{d}/memory.swap.max", "0")
        if cpu is not None:
            quota, period = cpu_quota(cpu)
            write(f"{d}/cpu.max", f"{quota} {period}")
        if pids is not None:
            write(f"{d}/pids.max", str(pids))

    def placement(self, *, clone: bool = True) -> Placement:
        if clone:
            with contextlib.suppress(OSError):  # then the way a plain fork gets in: a move
                return Placement(cgroup_fd=os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
        return Placement(procs=self.procs)

    def add(self, pid: int) -> None:
        write(self.procs[0], str(pid))

    def usage(self) -> Usage:
        d = self.path
        return Usage(memory=read_int(f"{d}/memory.current") or 0, peak=read_int(f"{d}/memory.peak"),
                     cpu_seconds=(keyed(f"{d}/cpu.stat", "usage_usec") or 0) / 1e6,
                     pids=read_int(f"{d}/pids.current") or 0)  # fmt: skip

    def oom_kills(self) -> int:
        return keyed(f"{self.path}/memory.events", "oom_kill") or 0

    def pids(self) -> list[int]:
        return tree_pids(self.path)

    def is_empty(self) -> bool:
        populated = unified.populated(self.path)
        return populated == 0 if populated is not None else not self.pids()

    def set_frozen(self, frozen: bool, timeout: float) -> None:
        if not unified.freeze(self.path, frozen, timeout):
            raise CgroupError("no freezer here: neither cgroup.freeze (cgroup v2, Linux 5.2+) "
                              "nor the v1 freezer controller is available")  # fmt: skip

    def kill_switch(self) -> bool:
        return unified.kill(self.path)

    def thaw_below(self) -> None:
        pass  # a SIGKILLed task dies in a frozen cgroup v2 (the kernel wakes it to die)

    def directories(self) -> list[str]:
        return [self.path]


class V2Backend(CgroupBackend):
    """This run's directory in the unified hierarchy, with memory, cpu and pids passed down."""

    kind = "v2"

    def __init__(self, host: CgroupHost, run: str | None, *, would_move: bool = False) -> None:
        self.host = host
        #: None only for a dry run that stopped where a real one would move processes
        self.run = run
        self.would_move = would_move

    @classmethod
    def create(cls, host: CgroupHost, name: str, *, may_move: bool = True) -> V2Backend:
        """Make the run directory ``<own cgroup>/<name>`` with the controllers enabled down to it.

        Raise OSError (what :func:`~.disabled.explain` explains) when that cannot be done.
        ``may_move=False`` (a dry run, ``envbox doctor``) never moves the test run's processes:
        where a real run would, it checks that it could and stops there (``would_move``).
        """
        if host.unified is None:
            raise OSError(errno.ENOENT, "no cgroup2 filesystem is mounted")
        missing = [c for c in V2_CONTROLLERS if c not in host.v2_controllers]
        if missing:
            raise OSError(errno.ENOENT, f"controllers {' '.join(missing)} not available", host.unified)
        own = v2_base(host.unified)
        # Our own cgroup passes the controllers down, then our run directory does too.
        try:
            enable_controllers(own)
        except OSError as e:
            if e.errno != errno.EBUSY:
                raise
            if not delegated(own, host.unified_top):
                raise OSError(errno.EBUSY, "not delegated to the test run", own) from None
            if not may_move:
                movable(own)  # the same check, read-only: EBUSY if a real run would refuse
                return cls(host, None, would_move=True)
            vacate(own)
            enable_controllers(own)
        run = os.path.join(own, name)
        os.mkdir(run)
        try:
            enable_controllers(run)
        except OSError:
            with contextlib.suppress(OSError):
                os.rmdir(run)
            raise
        return cls(host, run)

    def new(self, name: str) -> V2Cgroup:
        if self.run is None:
            raise CgroupError("a dry run makes no service cgroups")
        path = os.path.join(self.run, name)
        os.mkdir(path)
        return V2Cgroup(name, path)

    def run_dirs(self) -> list[str]:
        return [self.run] if self.run is not None else []

    def can_freeze(self) -> bool:
        # cgroup.freeze: from Linux 5.2, in every cgroup but the root
        probe = self.run if self.run is not None else self.host.unified
        return probe is not None and os.path.exists(os.path.join(probe, "cgroup.freeze"))
