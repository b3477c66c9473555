"""The hybrid backend: cgroup v1 controllers, plus a controller-less cgroup2 mount beside them.

Limits and figures as on v1 (the controllers are there). Freezing, killing and "is it empty" in
the service's directory of the cgroup2 mount, which has ``cgroup.freeze``, ``cgroup.kill`` and
``cgroup.events`` without any controller (runc and crun do the same): the kernel freezes and
kills the whole cgroup at once and says when it is empty, where v1 needs a ``freezer``
controller and a walk over ``cgroup.procs``. A process writes itself into both.
"""

from __future__ import annotations

import os

from pytest_envbox.kernel.cgroups import unified
from pytest_envbox.kernel.cgroups.base import ServiceCgroup
from pytest_envbox.kernel.cgroups.cgroupfs import make_dirs, tree_pids
from pytest_envbox.kernel.cgroups.v1 import V1Backend, V1Cgroup

__all__ = ["HybridBackend", "HybridCgroup"]


class HybridCgroup(V1Cgroup):
    """A service's cgroup on a hybrid host: its v1 ``dirs``, and ``unified``, its cgroup2 directory."""

    def __init__(self, name: str, dirs: dict[str, str], unified: str) -> None:
        super().__init__(name, dirs)
        self.unified = unified
        self.procs = (*self.procs, f"{unified}/cgroup.procs")

    # Placed and added as on v1, with cgroup2's cgroup.procs among ``procs``: cgroup2 without
    # controllers is not worth a clone3 (a move into each v1 hierarchy is needed anyway).

    def pids(self) -> list[int]:
        return tree_pids(self.unified)

    def is_empty(self) -> bool:
        populated = unified.populated(self.unified)
        return populated == 0 if populated is not None else not self.pids()

    def set_frozen(self, frozen: bool, timeout: float) -> None:
        if not unified.freeze(self.unified, frozen, timeout):
            super().set_frozen(frozen, timeout)  # a kernel before 5.2: the v1 freezer

    def kill_switch(self) -> bool:
        return unified.kill(self.unified)

    def directories(self) -> list[str]:
        return [*super().directories(), self.unified]


class HybridBackend(V1Backend):
    """This run's directory in every v1 hierarchy and in the cgroup2 mount (``unified``)."""

    kind = "hybrid"

    def __init__(self, v1: V1Backend, unified: str) -> None:
        super().__init__(v1.host, v1.v1)
        self.unified = unified

    @classmethod
    def extend(cls, v1: V1Backend, name: str) -> V1Backend:
        """``v1``'s run, with its directory in the cgroup2 mount made too; ``v1`` itself when the
        cgroup2 mount has no room for it (read-only, another owner's): the v1 freezer then."""
        if v1.host.unified is None:
            return v1
        d = os.path.join(v1.host.unified, name)
        try:
            os.mkdir(d)
        except OSError:
            return v1
        return cls(v1, d)

    def new(self, name: str) -> ServiceCgroup:
        dirs = self.service_dirs(name)
        own = os.path.join(self.unified, name)
        make_dirs([*dict.fromkeys(dirs.values()), own])
        return HybridCgroup(name, dirs, own)

    def run_dirs(self) -> list[str]:
        return [*super().run_dirs(), self.unified]

    def can_freeze(self) -> bool:
        return super().can_freeze() or os.path.exists(os.path.join(self.unified, "cgroup.freeze"))

