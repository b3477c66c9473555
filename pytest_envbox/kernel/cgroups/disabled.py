"""The disabled backend: no cgroups in this run, and the explanation of why and how to fix it.

Where the run's directories cannot be made (no cgroup filesystem, a read-only one in a container,
not root on cgroup v1, a v2 cgroup not delegated to the test run...), services still run, without
limits, figures or a freezer. This backend makes that one case out of every operation: making a
service's cgroup, and asking for one where limits are declared, raise :class:`CgroupsUnavailable`
with the explanation; there is nothing to remove. Callers catch that one error; none of them
tests a message to find out whether cgroups are there.
"""

from __future__ import annotations

import errno

from pytest_envbox.kernel.cgroups.base import CgroupBackend, CgroupsUnavailable, ServiceCgroup
from pytest_envbox.kernel.cgroups.host import CgroupHost

__all__ = ["DisabledBackend", "explain"]


class DisabledBackend(CgroupBackend):
    """No cgroups: ``why`` says why, and how to fix it (see :func:`explain`)."""

    kind = "disabled"

    def __init__(self, why: str) -> None:
        self.why = why

    @classmethod
    def from_error(cls, host: CgroupHost, e: OSError) -> DisabledBackend:
        return cls(explain(host, e))

    @property
    def problem(self) -> str:
        return self.why

    def require(self) -> None:
        raise CgroupsUnavailable(self.why)

    def new(self, name: str) -> ServiceCgroup:
        raise CgroupsUnavailable(self.why)

    def run_dirs(self) -> list[str]:
        return []

    def can_freeze(self) -> bool:
        return False


def explain(host: CgroupHost, e: OSError) -> str:
    """Why this run's directories could not be made (``e``), and how to fix that, for people."""
    where = host.describe()
    delegate = "`systemd-run --user --scope -p Delegate=yes pytest ...` (without --user as root)"
    if e.errno == errno.EROFS:
        why = "the cgroup filesystem is mounted read-only (a container without cgroup access?)"
        fix = ("make it writable: in Docker, `--privileged`, or `--cgroupns=private` with a "
               "writable /sys/fs/cgroup")  # fmt: skip
    elif e.errno in (errno.EACCES, errno.EPERM):
        why = "this user may not create cgroups there"
        fix = f"run the tests as root, or on cgroup v2 in a delegated cgroup of their own: {delegate}"
    elif e.errno == errno.EBUSY and host.version == "v2":
        why = (f"the cgroup this test run is in ({host.unified}) holds processes, and "
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
