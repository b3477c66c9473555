"""Rootless mode: the supervisor as root of a user namespace of its own, and its id maps."""

from __future__ import annotations

import errno
import os

from pytest_envbox.kernel import linux as L

__all__ = ["enter_user_namespace", "id_map", "no_user_namespace"]


def enter_user_namespace() -> None:
    """Rootless mode: become root of a new user namespace, mapped to our own user and group.

    Everything the supervisor and its sandboxes make from now on (PID, mount, network...
    namespaces) is owned by it, so the supervisor may do there all that root may; on the host it
    is still its user. With a subordinate id range (``/etc/subuid``, ``/etc/subgid``) and the
    setuid ``newuidmap``/``newgidmap``, ids 1... inside map to that range, so services may run as
    other users (``nobody``, ``postgres``), as podman does; otherwise only our own id is mapped
    and ``setgroups`` is denied, as the kernel requires for an unprivileged map. Must run while
    the process has a single thread.
    """
    uid, gid = os.geteuid(), os.getegid()
    sub = None
    if uid != 0:
        from pytest_envbox.kernel import hostcheck  # pwd, shutil: only in rootless mode

        ids = hostcheck.subids(uid)
        if ids.usable:
            sub = ids
    if sub is None:
        L.unshare(L.CLONE_NEWUSER)
        L.map_own_ids(uid, gid)
        return
    assert sub.uid_range is not None and sub.gid_range is not None
    # newuidmap must run outside the new namespace, on our pid: a child does it once we are in.
    r, w = os.pipe2(os.O_CLOEXEC)
    child = os.fork()
    if child == 0:
        code = 1
        try:
            os.close(w)
            os.read(r, 1)
            parent = str(os.getppid())
            (us, uc), (gs, gc) = sub.uid_range, sub.gid_range
            import subprocess

            ok = subprocess.run(["newuidmap", parent, "0", str(uid), "1", "1", str(us), str(uc)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0
            ok = ok and subprocess.run(["newgidmap", parent, "0", str(gid), "1", "1", str(gs), str(gc)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0
            code = 0 if ok else 1
        finally:
            os._exit(code)
    os.close(r)
    try:
        L.unshare(L.CLONE_NEWUSER)
    finally:
        os.write(w, b"x")
        os.close(w)
        _, status = os.waitpid(child, 0)
    if status != 0:
        maps = []
        for name in ("uid_map", "gid_map"):
            with open(f"/proc/self/{name}") as f:
                maps.append(f.read().strip())
        if not any(maps):  # the helpers failed before writing anything: map our own id only
            L.map_own_ids(uid, gid)
        elif not all(maps):  # newuidmap worked, newgidmap not: no half-mapped namespace
            raise OSError(errno.EPERM, "newgidmap failed after newuidmap: check /etc/subgid")


def id_map(name: str) -> list[tuple[int, int]]:
    """Our user namespace's id map: ``(first id inside, count)`` of each line (the ids outside
    are no business of the test process's)."""
    ranges = []
    with open(f"/proc/self/{name}") as f:
        for line in f:
            if line.strip():
                inside, _outside, count = (int(x) for x in line.split())
                ranges.append((inside, count))
    return ranges


def no_user_namespace(e: OSError) -> str:
    """Why rootless mode cannot start here, and how to enable it."""
    from pytest_envbox.kernel import hostcheck

    fixes = "; ".join(f"{why}: enable with `{fix}`" for why, fix in hostcheck.userns_sysctls())
    return (f"rootless mode needs an unprivileged user namespace, and this host refused one "
            f"({e}). " + (fixes or "Check `envbox doctor` for what is missing") +
            "; or run the tests as root (--envbox-rootless=no).")  # fmt: skip
