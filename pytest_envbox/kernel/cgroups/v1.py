"""The cgroup v1 backend: a directory in each controller's own hierarchy.

Limits: ``memory.limit_in_bytes`` (and ``memory.memsw.limit_in_bytes``, memory plus swap, to the
same value: no swap; ``memory.kmem.tcp.limit_in_bytes`` to it too, so that socket buffers are
charged), ``cpu.cfs_period_us`` and ``cpu.cfs_quota_us``, ``pids.max``. Figures:
``memory.usage_in_bytes``, ``memory.max_usage_in_bytes``, ``cpuacct.usage``, ``pids.current``,
``memory.oom_control`` (``oom_kill``). The ``freezer`` controller pauses. A process gets in by
writing itself into every hierarchy's ``cgroup.procs``: v1 has no way to be cloned into a cgroup.
"""

from __future__ import annotations

import contextlib
import errno
import os

from pytest_envbox.kernel.cgroups.base import (
    FREEZE_POLL,
    CgroupBackend,
    CgroupError,
    Placement,
    ServiceCgroup,
    Usage,
)
from pytest_envbox.kernel.cgroups.cgroupfs import (
    keyed,
    make_dirs,
    read,
    read_int,
    remove_all,
    thaw_tree,
    tree_pids,
    write,
)
from pytest_envbox.kernel.cgroups.host import CgroupHost
from pytest_envbox.kernel.cgroups.quantities import cpu_quota
from pytest_envbox.wait import Deadline, wait_until

__all__ = ["V1Backend", "V1Cgroup"]


class V1Cgroup(ServiceCgroup):
    """A service's cgroup on cgroup v1: ``dirs`` maps each controller to its directory (one
    directory for controllers mounted together, such as ``cpu,cpuacct``)."""

    def __init__(self, name: str, dirs: dict[str, str]) -> None:
        super().__init__(name)
        self.dirs = dirs
        self.procs = tuple(f"{d}/cgroup.procs" for d in dict.fromkeys(dirs.values()))

    def set_limits(self, memory: int | None, cpu: float | None, pids: int | None) -> None:
        if memory is not None:
            m = self.dirs["memory"]
            write(f"{m}/memory.limit_in_bytes", str(memory))
            if os.path.exists(f"{m}/memory.memsw.limit_in_bytes"):
                write(f"{m}/memory.memsw.limit_in_bytes", str(memory))  # memory + swap: no swap
            else:  # no swap accounting (swapaccount=0): swap as little as the kernel may
                with contextlib.suppress(OSError):
                    write(f"{m}/memory.swappiness", "0")
            # Socket buffers: v1 charges them to no one unless this is set (v2 charges them to
            # memory.current); past it, each socket keeps only the kernel's small floor.
            if os.path.exists(f"{m}/memory.kmem.tcp.limit_in_bytes"):
                write(f"{m}/memory.kmem.tcp.limit_in_bytes", str(memory))
        if cpu is not None:
            quota, period = cpu_quota(cpu)
            c = self.dirs["cpu"]
            write(f"{c}/cpu.cfs_period_us", str(period))
            write(f"{c}/cpu.cfs_quota_us", str(quota))
        if pids is not None:
            write(f"{self.dirs['pids']}/pids.max", str(pids))

    def placement(self, *, clone: bool = True) -> Placement:
        return Placement(procs=self.procs)

    def add(self, pid: int) -> None:
        for f in self.procs:
            write(f, str(pid))

    def usage(self) -> Usage:
        m = self.dirs["memory"]
        return Usage(memory=read_int(f"{m}/memory.usage_in_bytes") or 0,
                     peak=read_int(f"{m}/memory.max_usage_in_bytes"),
                     cpu_seconds=(read_int(f"{self.dirs['cpuacct']}/cpuacct.usage") or 0) / 1e9,
                     pids=read_int(f"{self.dirs['pids']}/pids.current") or 0)

    def oom_kills(self) -> int:
        return keyed(f"{self.dirs['memory']}/memory.oom_control", "oom_kill") or 0

    def pids(self) -> list[int]:
        # Every hierarchy holds every process of the service: any one will do.
        d = next(iter(self.dirs.values()), None)
        return tree_pids(d) if d is not None else []

    def is_empty(self) -> bool:
        return not self.pids()

    def set_frozen(self, frozen: bool, timeout: float) -> None:
        freezer = self.dirs.get("freezer")
        if freezer is None:
            raise CgroupError("no freezer here: neither cgroup.freeze (cgroup v2, Linux 5.2+) "
                              "nor the v1 freezer controller is available")
        deadline = Deadline(timeout)
        state = f"{freezer}/freezer.state"
        want = "FROZEN" if frozen else "THAWED"
        write(state, want)

        def reached() -> bool | None:
            if read(state).strip() == want:
                return True
            write(state, want)  # still FREEZING: ask again (a task busy in the kernel may be done)
            return None

        if wait_until(reached, deadline, interval=FREEZE_POLL) is None:
            raise CgroupError(f"the cgroup did not reach {want} within {timeout:g} s")

    def kill_switch(self) -> bool:
        return False  # v1 has no cgroup.kill

    def thaw_below(self) -> None:
        if "freezer" in self.dirs:
            thaw_tree(self.dirs["freezer"])

    def directories(self) -> list[str]:
        return list(dict.fromkeys(self.dirs.values()))


class V1Backend(CgroupBackend):
    """This run's directory in each v1 hierarchy: ``v1`` maps each controller to it."""

    kind = "v1"

    def __init__(self, host: CgroupHost, v1: dict[str, str]) -> None:
        self.host = host
        self.v1 = v1

    @classmethod
    def create(cls, host: CgroupHost, name: str) -> V1Backend:
        """Make the run directory ``<own cgroup>/<name>`` in every v1 hierarchy we use.

        Raise OSError (what :func:`~.disabled.explain` explains), having removed what was made,
        when one cannot be made or the memory, cpu, cpuacct or pids controller is not mounted.
        """
        v1: dict[str, str] = {}
        try:
            for c, own in host.v1.items():
                d = os.path.join(own, name)
                if d not in v1.values():
                    os.mkdir(d)
                v1[c] = d
            missing = [c for c in ("memory", "cpu", "pids") if c not in v1]
            if missing:
                raise OSError(errno.ENOENT, f"cgroup v1 controllers {' '.join(missing)} not mounted")
            if "cpuacct" not in v1:
                raise OSError(errno.ENOENT, "cgroup v1 controller cpuacct not mounted")
        except OSError:
            remove_all(list(dict.fromkeys(v1.values())))
            raise
        return cls(host, v1)

    def service_dirs(self, name: str) -> dict[str, str]:
        """Controller -> the directory service cgroup ``name`` has in its hierarchy (not made)."""
        return {c: os.path.join(run, name) for c, run in self.v1.items()}

    def new(self, name: str) -> ServiceCgroup:
        dirs = self.service_dirs(name)
        make_dirs(list(dict.fromkeys(dirs.values())))
        return V1Cgroup(name, dirs)

    def run_dirs(self) -> list[str]:
        return list(dict.fromkeys(self.v1.values()))

    def can_freeze(self) -> bool:
        return "freezer" in self.v1
