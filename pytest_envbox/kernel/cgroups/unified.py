"""cgroup2's core files, which every non-root cgroup2 directory has, controllers or not.

``cgroup.freeze`` (Linux 5.2), ``cgroup.kill`` (5.14) and ``cgroup.events`` (``populated``,
``frozen``): the v2 backend uses them in the service's cgroup, the hybrid one in the service's
directory of a controller-less cgroup2 mount (as runc and crun do), where the v1 freezer would
need a controller the host may not mount, and cannot tell when a cgroup became empty.
"""

from __future__ import annotations

import os

from pytest_envbox.kernel.cgroups.base import FREEZE_POLL, CgroupError
from pytest_envbox.kernel.cgroups.cgroupfs import keyed, write
from pytest_envbox.wait import Deadline, wait_until

__all__ = ["freeze", "kill", "populated"]


def freeze(d: str, frozen: bool, timeout: float) -> bool:
    """Freeze (or thaw) cgroup ``d`` and wait until ``cgroup.events`` says it is done.

    False, having done nothing, where the kernel has no ``cgroup.freeze`` (before Linux 5.2);
    CgroupError when it is not done within ``timeout``.
    """
    f = f"{d}/cgroup.freeze"
    if not os.path.exists(f):
        return False
    deadline = Deadline(timeout)
    write(f, "1" if frozen else "0")
    events, done = f"{d}/cgroup.events", 1 if frozen else 0
    if wait_until(lambda: True if keyed(events, "frozen") == done else None, deadline,
                  interval=FREEZE_POLL) is None:  # fmt: skip
        raise CgroupError("the cgroup did not " + ("freeze" if frozen else "thaw") + f" within {timeout:g} s")
    return True


def kill(d: str) -> bool:
    """SIGKILL every process in ``d`` and below at once; False where the kernel cannot (before 5.14)."""
    if os.path.exists(f"{d}/cgroup.kill"):
        try:
            write(f"{d}/cgroup.kill", "1")
            return True
        except OSError:
            pass
    return False


def populated(d: str) -> int | None:
    """1 while ``d`` or a cgroup below it has a process, 0 when none has; None if unreadable."""
    return keyed(f"{d}/cgroup.events", "populated")
