"""The run tree: this supervisor's backend, and the cgroups of its services by slot.

The backend is chosen once, by what the host has (:func:`open_backend`); everything else here is
bookkeeping that is the same on every host: which cgroup is a slot's now, and removing those
whose processes do not die at once later, so that the supervisor's loop never stalls on one.
"""

from __future__ import annotations

import contextlib
import errno

from pytest_envbox.kernel.cgroups.base import CgroupBackend, CgroupsUnavailable, ServiceCgroup
from pytest_envbox.kernel.cgroups.cgroupfs import remove_all
from pytest_envbox.kernel.cgroups.disabled import DisabledBackend
from pytest_envbox.kernel.cgroups.host import CgroupHost
from pytest_envbox.kernel.cgroups.hybrid import HybridBackend
from pytest_envbox.kernel.cgroups.v1 import V1Backend
from pytest_envbox.kernel.cgroups.v2 import V2Backend

__all__ = ["CgroupTree", "open_backend"]


def open_backend(host: CgroupHost, name: str, *, may_move: bool = True) -> CgroupBackend:
    """The backend for this host, with the run directory ``name`` made in each of its hierarchies.

    Never raises: where the directories cannot be made, the disabled backend, which says why.
    ``may_move=False``: a dry run (``envbox doctor``), which never moves the test run's processes
    on cgroup v2 but says, in ``would_move``, that a real run would (see :mod:`.delegation`).
    """
    try:
        if host.version == "v2":
            return V2Backend.create(host, name, may_move=may_move)
        if host.version in ("v1", "hybrid"):
            return HybridBackend.extend(V1Backend.create(host, name), name)
        raise OSError(errno.ENOENT, "no cgroup filesystem is mounted")
    except OSError as e:
        return DisabledBackend.from_error(host, e)


class CgroupTree:
    """This supervisor's run directory in every hierarchy it uses, and the services below it.

    ``services`` maps a slot to its current run's cgroup. Made with ``CgroupHost("none")``, a
    placeholder with no cgroups, until the real one is made (the supervisor's hello).
    """

    def __init__(self, host: CgroupHost, name: str, *, may_move: bool = True) -> None:
        self.host = host
        self.name = name
        self.backend = open_backend(host, name, may_move=may_move)
        self.services: dict[str, ServiceCgroup] = {}
        self.leftover: list[ServiceCgroup] = []  # could not be removed yet: retried at the end
        self.count = 0  # service cgroups made: their names

    @property
    def problem(self) -> str | None:
        """Why this run has no cgroups and how to fix that, for people; None when it has them."""
        return self.backend.problem

    @property
    def would_move(self) -> bool:
        return self.backend.would_move

    def check_limits(self, memory: int | None = None, cpu: float | None = None,
                     pids: int | None = None) -> None:  # fmt: skip
        """Raise :class:`CgroupsUnavailable` when limits are declared and this run cannot apply
        them; asked before a start takes a sandbox, so that a refused one costs nothing."""
        if memory is not None or cpu is not None or pids is not None:
            self.backend.require()

    def new(self) -> ServiceCgroup:
        """A new, empty cgroup for one run of a service: ``<run dir>/<n>``.

        Made ahead of time, for a spare sandbox that moves itself in while it is prepared (see
        ``sandbox.init.run_spare``): moving a process between cgroups waits for an RCU grace period
        (cgroup_threadgroup_rwsem), about 6 ms after the kernel has been idle, which must not be
        spent on a start. A number, not the service's name: a spare's service is not known yet,
        and cgroup v2 cannot rename a cgroup. :class:`CgroupsUnavailable` without cgroups.
        """
        self.backend.require()
        self.count += 1
        return self.backend.new(str(self.count))

    def service(self, slot: str) -> ServiceCgroup:
        """The cgroup of the service in ``slot``; :class:`CgroupsUnavailable` when it has none."""
        cg = self.services.get(slot)
        if cg is None:
            self.backend.require()
            raise CgroupsUnavailable("the service has no cgroup")
        return cg

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
        """Remove every service's cgroup, then the run directories (the run's end)."""
        for slot in list(self.services):
            self.release(slot)
        for cg in self.leftover:
            with contextlib.suppress(Exception):
                cg.remove(timeout=5.0)
        self.leftover.clear()
        remove_all(self.backend.run_dirs())
