"""What an unprivileged user can do on this host: the facts behind ``envbox doctor``'s rootless lines.

Rootless mode runs the supervisor in a user namespace, where the user is root over namespaces it
creates. Whether that works depends on sysctls that distributions set differently, on
``/etc/subuid`` and ``newuidmap`` (for services running as other users), and on whether the
cgroup tree is delegated to the user. Each is checked for real here: the namespaces are created in
a forked child, which tries the same steps a sandbox takes (private mounts, a read-only bind of
``/``, a tmpfs, a bridge and a veth) and reports each step.

Standard library only, like the rest of the CLI's checks.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import select
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pytest_envbox.kernel import linux as L

__all__ = [
    "SubIds",
    "in_child",
    "network_faults",
    "subids",
    "try_user_namespace",
    "userns_sysctls",
]

#: sysctls that disable or restrict unprivileged user namespaces: (path, bad value, why, fix)
_USERNS_SYSCTLS = (
    ("/proc/sys/user/max_user_namespaces", "0",
     "user namespaces are disabled (user.max_user_namespaces = 0)",
     "sudo sysctl -w user.max_user_namespaces=15000"),
    ("/proc/sys/kernel/unprivileged_userns_clone", "0",
     "unprivileged user namespaces are disabled (kernel.unprivileged_userns_clone = 0)",
     "sudo sysctl -w kernel.unprivileged_userns_clone=1"),
    ("/proc/sys/kernel/apparmor_restrict_unprivileged_userns", "1",
     "AppArmor restricts unprivileged user namespaces "
     "(kernel.apparmor_restrict_unprivileged_userns = 1, Ubuntu 23.10 and later)",
     "sudo sysctl -w kernel.apparmor_restrict_unprivileged_userns=0, or an AppArmor profile "
     "that allows `userns` for your Python interpreter"),
)  # fmt: skip


def userns_sysctls() -> list[tuple[str, str]]:
    """(what is wrong, how to fix it) for each sysctl that stops unprivileged user namespaces."""
    found = []
    for path, bad, why, fix in _USERNS_SYSCTLS:
        with contextlib.suppress(OSError):
            if Path(path).read_text().strip() == bad:
                found.append((why, fix))
    return found


@dataclass
class SubIds:
    """The user's subordinate id ranges, and whether ``newuidmap``/``newgidmap`` can map them."""

    uids: int
    gids: int
    helpers: bool
    #: the first range of each, ``(start, count)``: what rootless mode maps (from id 1 inside)
    uid_range: tuple[int, int] | None = None
    gid_range: tuple[int, int] | None = None

    @property
    def usable(self) -> bool:
        return self.uid_range is not None and self.gid_range is not None and self.helpers


def _read_ranges(path: str, user: str, uid: int) -> list[tuple[int, int]]:
    found = []
    with contextlib.suppress(OSError):
        for line in Path(path).read_text().splitlines():
            parts = line.strip().split(":")
            if (len(parts) == 3 and parts[0] in (user, str(uid)) and parts[1].isdigit()
                    and parts[2].isdigit() and int(parts[2]) > 0):  # fmt: skip
                found.append((int(parts[1]), int(parts[2])))
    return found


def _ranges(path: str, user: str, uid: int) -> int:
    return sum(count for _start, count in _read_ranges(path, user, uid))


def subids(uid: int | None = None) -> SubIds:
    uid = os.getuid() if uid is None else uid
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    uids, gids = _read_ranges("/etc/subuid", user, uid), _read_ranges("/etc/subgid", user, uid)
    return SubIds(sum(c for _s, c in uids), sum(c for _s, c in gids),
                  bool(shutil.which("newuidmap") and shutil.which("newgidmap")),
                  uids[0] if uids else None, gids[0] if gids else None)  # fmt: skip


def in_child(work: Callable[[], object], timeout: float = 10.0) -> tuple[object, int]:
    """``work()`` in a forked child (whose namespaces and mounts die with it): its result, sent
    back as JSON (None when it did not finish within ``timeout``), and the child's pid."""
    r, w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # the child: never returns
        os.close(r)
        with contextlib.suppress(BaseException):
            os.write(w, json.dumps(work()).encode())
        os._exit(0)
    os.close(w)
    chunks = []
    try:
        while select.select([r], [], [], timeout)[0]:
            data = os.read(r, 65536)
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(r)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)
        os.waitpid(pid, 0)
    try:
        return json.loads(b"".join(chunks) or b"null"), pid
    except ValueError:
        return None, pid


def try_user_namespace(timeout: float = 10.0) -> dict[str, str | None]:
    """In a forked child: enter a user namespace and the sandbox's other namespaces and try the
    sandbox's steps. Returns step -> None (it worked) or the error; a step after a failed one is
    not tried (and not in the result)."""
    uid, gid = os.getuid(), os.getgid()

    def work() -> dict[str, str | None]:
        results: dict[str, str | None] = {}
        with contextlib.suppress(BaseException):  # the failed step is in results already
            _steps(uid, gid, results)
        return results

    out, _pid = in_child(work, timeout)
    return out if isinstance(out, dict) and out else {"user namespace": "the check did not finish"}


def _steps(uid: int, gid: int, results: dict[str, str | None]) -> None:
    from pytest_envbox.kernel import netlink  # now: the tmpfs mounted on /tmp below may hide the package

    def step(name: str, fn: object) -> None:
        try:
            fn()  # type: ignore[operator]
        except Exception as e:
            results[name] = str(e) if isinstance(e, OSError) else f"{type(e).__name__}: {e}"
            raise
        results[name] = None

    def enter_userns() -> None:
        L.unshare(L.CLONE_NEWUSER)
        L.map_own_ids(uid, gid)

    def namespaces() -> None:
        L.unshare(L.CLONE_NEWNS | L.CLONE_NEWPID | L.CLONE_NEWUTS | L.CLONE_NEWIPC
                  | L.CLONE_NEWNET | L.CLONE_NEWCGROUP)  # fmt: skip

    def mounts() -> None:
        L.mount(None, "/", None, L.MS_REC | L.MS_PRIVATE)
        L.mount("tmpfs", "/tmp", "tmpfs", L.MS_NOSUID | L.MS_NODEV, "mode=0755")
        os.mkdir("/tmp/root")
        L.mount("/", "/tmp/root", None, L.MS_BIND | L.MS_REC)
        L.mount_setattr("/tmp/root", L.MOUNT_ATTR_RDONLY)

    def network() -> None:
        L.loopback_up()
        with netlink.Netlink() as nl:
            nl.add_bridge("br0")
            own = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            nl.add_veth("veth0", "eth0", own, master=nl.index("br0"))

    step("user namespace", enter_userns)
    step("namespaces", namespaces)
    step("mounts", mounts)
    step("network", network)


def network_faults() -> dict[str, str | None]:
    """In a throwaway network namespace (the hub's steps): a bridge, netem on it (``link.delay``),
    and an nf_tables bridge table with a random-drop rule (``link.loss``, ``partition``).
    Returns feature -> None (works) or the kernel's error. Needs CAP_NET_ADMIN."""
    from pytest_envbox.kernel import netlink, nftables

    results: dict[str, str | None] = {}
    try:
        fd, nl, bridge = netlink.make_hub()
    except OSError as e:
        return {"bridge": str(e)}
    results["bridge"] = None
    try:
        def delay() -> None:
            nl.netem(bridge, 1.0)

        def drop() -> None:
            nftables.replace_table("envbox-doctor", [nftables.Drop(iif="a", oif="b", percent=50)])

        for feature, attempt in (("netem", delay), ("nf_tables", drop)):
            try:
                netlink.call_in(fd, attempt)
                results[feature] = None
            except OSError as e:
                results[feature] = e.strerror or str(e)
    finally:
        nl.close()
        os.close(fd)
    return results
