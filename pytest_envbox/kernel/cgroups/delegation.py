"""Delegation on cgroup v2: whether the test run's cgroup is its own to reorganise, and doing so.

cgroup v2 gives controllers to the children of a non-root cgroup only when it holds no processes
itself (its "no internal processes" rule). A test run started in a cgroup made for it (``systemd-run
--scope -p Delegate=yes pytest``, a CI job's container) is in such a cgroup with its own
processes; they move one level down, into a leaf, as podman, crun and Docker-in-Docker do, but
only when the cgroup is delegated to the test run and every process there descends from it.
"""

from __future__ import annotations

import contextlib
import errno
import os

from pytest_envbox.kernel.cgroups.cgroupfs import read, write
from pytest_envbox.kernel.cgroups.host import V2_CONTROLLERS

__all__ = ["LEAF", "delegated", "enable_controllers", "movable", "v2_base", "vacate"]

LEAF = "envbox-tests"


def v2_base(own: str) -> str:
    """Where run directories go in cgroup v2: our cgroup, or its parent if we are in its leaf.

    After :func:`vacate` moved a shell and its pytest into ``<cgroup>/envbox-tests``, the next
    run starts there; its runs belong next to the leaf (where the controllers are already
    enabled), not in a leaf of the leaf.
    """
    return os.path.dirname(own) if os.path.basename(own) == LEAF else own


def delegated(own: str, top: str | None) -> bool:
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


def vacate(own: str) -> None:
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
            procs = movable(own)
            if not procs:
                return
            with contextlib.suppress(FileExistsError):
                os.mkdir(leaf)
            for p in procs:
                with contextlib.suppress(ProcessLookupError):
                    write(f"{leaf}/cgroup.procs", str(p))
        raise OSError(errno.EBUSY, "processes keep appearing in the cgroup", own)
    finally:
        os.close(lock_fd)


def movable(own: str) -> list[int]:
    """The processes of ``own``, if they all descend from the test run's first one there.

    Raise EBUSY, naming them, when some do not (a stranger's processes are not ours to move).
    """
    procs = [int(p) for p in read(f"{own}/cgroup.procs").split()]
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


def enable_controllers(d: str) -> None:
    """Pass the memory, cpu and pids controllers down to the children of ``d``."""
    with open(os.path.join(d, "cgroup.subtree_control")) as f:
        have = set(f.read().split())
    need = [c for c in V2_CONTROLLERS if c not in have]
    if need:
        write(os.path.join(d, "cgroup.subtree_control"), " ".join("+" + c for c in need))

