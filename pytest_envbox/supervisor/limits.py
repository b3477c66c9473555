"""Each service's cgroup as the supervisor uses it: its limits at start, its figures, pause and
resume. The cgroups themselves are :mod:`pytest_envbox.kernel.cgroups`'s."""

from __future__ import annotations

import contextlib
import errno
from typing import TYPE_CHECKING

from pytest_envbox.kernel import cgroups
from pytest_envbox.supervisor.protocol import (
    CgroupLimits,
    Done,
    FreezeRequest,
    Handlers,
    StatsReply,
    StatsRequest,
    Unsupported,
)

if TYPE_CHECKING:
    from pytest_envbox.supervisor.server import Supervisor
    from pytest_envbox.supervisor.spares import Spare

__all__ = ["ServiceCgroups"]


class ServiceCgroups:
    """The services' cgroups, in the supervisor's tree (``sup.cgroups``, made at hello)."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup

    def handlers(self) -> Handlers:
        return {StatsRequest: self.stats, FreezeRequest: self.freeze}

    def give(self, slot: str, spare: Spare, pid: int, limits: CgroupLimits) -> None:
        """The service's cgroup for this run: the spare's own, with the limits in place before
        the service's first instruction. A spare prepared before cgroups were set up (or without
        one) is moved into a new cgroup here, on the start's path (see
        :meth:`~pytest_envbox.kernel.cgroups.CgroupTree.new`)."""
        cg, spare.cgroup = spare.cgroup, None
        if cg is None:
            try:
                cg = self.sup.cgroups.new()
            except cgroups.CgroupsUnavailable:
                return  # none in this run: the service runs without (and declared no limits)
            try:
                cg.add(pid)  # the init, so every process of the service, from the start
            except OSError:
                self.sup.cgroups.discard(cg)
                raise
        self.sup.cgroups.adopt(slot, cg)
        try:
            cg.set_limits(memory=limits.memory, cpu=limits.cpu, pids=limits.pids)
        except OSError as e:
            why = e.strerror
            if e.errno == errno.EBUSY:
                used = cg.stats()["memory_bytes"]
                why = (f"the sandbox's init already uses {cgroups.format_memory(int(used))} "
                       "of memory; raise the memory limit")  # fmt: skip
            raise ValueError(f"the kernel refused the limits {limits.as_dict()}: {why}") from None

    def thaw(self, slot: str) -> None:
        """Resume a paused service: a frozen process cannot act on a signal (on cgroup v1 it
        cannot even die of SIGKILL)."""
        cg = self.sup.cgroups.services.get(slot)
        if cg is not None and cg.frozen:  # set whenever it may be frozen (see freeze())
            with contextlib.suppress(cgroups.CgroupError, OSError):
                cg.freeze(False, timeout=1.0)

    def figures(self, slot: str) -> dict[str, int | float]:
        """The run's totals, read before its cgroup goes (none without a cgroup)."""
        cg = self.sup.cgroups.services.get(slot)
        figures: dict[str, int | float] = {}
        if cg is not None:
            with contextlib.suppress(OSError):
                figures = cg.stats()
        return figures

    def _cgroup(self, slot: str) -> cgroups.ServiceCgroup:
        try:
            return self.sup.cgroups.service(slot)
        except cgroups.CgroupsUnavailable as e:
            raise Unsupported(str(e)) from None

    def stats(self, req_id: int, req: StatsRequest) -> StatsReply:
        f = self._cgroup(req.slot).stats()
        return StatsReply(int(f["memory_bytes"]), int(f["memory_peak_bytes"]), float(f["cpu_seconds"]),
                          int(f["pids"]), int(f["oom_kills"]))  # fmt: skip

    def freeze(self, req_id: int, req: FreezeRequest) -> Done:
        frozen = req.frozen
        try:
            self._cgroup(req.slot).freeze(frozen)
        except (cgroups.CgroupError, OSError) as e:
            raise ValueError(f"could not {'pause' if frozen else 'resume'} the service: {e}") from None
        return Done()
