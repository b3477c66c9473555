"""The sandbox's ``/sys``: a sysfs of the service's own network namespace, and its own cgroup.

The host's ``/sys``, even read-only, tells every network interface of the host and the whole
cgroup tree (other runs' services included); and a runtime that sizes itself from
``/sys/fs/cgroup`` (a JVM, Go's ``GOMAXPROCS`` helpers, Node) would read the host's values, not
the service's limits. So, as runc does, the sandbox mounts:

- a new sysfs, read-only: a sysfs lists the network devices of the namespace of whoever mounts
  it, so the mount is made once the sandbox is in the service's network namespace (the spare's
  own, made before :func:`~pytest_envbox.sandbox.rootfs.build_base`; a restarted service's old
  one, joined after its plan came: then :func:`renew_sysfs`);
- runc's masks over ``/sys/firmware`` and ``/sys/devices/virtual/powercap``;
- at ``/sys/fs/cgroup``, read-only, the service's own cgroup seen through its cgroup namespace,
  as Docker shows it: cgroup2 on a v2 host; on v1 (and hybrid) a tmpfs holding one mount per v1
  hierarchy the service is placed in (and the cgroup2 one of a hybrid host at ``unified``), so
  ``memory/memory.limit_in_bytes`` is the service's limit. A service without a cgroup of its own
  (none on this host, or rootless on v1) gets an empty read-only tmpfs there: nothing of the
  host's, nothing to size itself from.

Where the kernel refuses a mount (rootless, in some user-namespace setups), the host's view stays
as it was bound, read-only (for sysfs), or the empty tmpfs stands (for the cgroup view).
"""

from __future__ import annotations

import os

from pytest_envbox.kernel import linux as L
from pytest_envbox.kernel.cgroups import V1_CONTROLLERS

__all__ = ["mount_cgroup_view", "mount_sysfs", "own_cgroups", "renew_sysfs"]

_RO = L.MS_RDONLY | L.MS_NOSUID | L.MS_NODEV | L.MS_NOEXEC
#: What runc masks under /sys by default (the rest of its masks are under /proc: see rootfs).
_MASKED = ("firmware", "devices/virtual/powercap")
#: Submounts of /sys that a renewed sysfs takes over as they are (see :func:`renew_sysfs`).
_KEPT = ("fs/cgroup", *_MASKED)


def mount_sysfs(root: str) -> bool:
    """A new read-only sysfs at ``root/sys`` for the caller's network namespace, with runc's
    masks; False (the host's read-only ``/sys`` stays) where the kernel refuses the mount."""
    mounted = True
    try:
        L.mount("sysfs", root + "/sys", "sysfs", _RO)
    except PermissionError:
        mounted = False  # rootless, where the user namespace may not mount a sysfs
    for path in _MASKED:
        _mask(f"{root}/sys/{path}")
    return mounted


def _mask(p: str) -> None:
    if os.path.isdir(p):
        L.mount("tmpfs", p, "tmpfs", _RO, "size=0")


def renew_sysfs(root: str) -> None:
    """A restarted service joined its old network namespace after :func:`mount_sysfs` ran in the
    spare's: a new sysfs for it, with the masks and cgroup view moved over (a move costs a few
    microseconds; mounting them again, a hundred or more on cgroup v1). Measured: 0.10 ms per
    restart, where mounting everything again took 0.24 ms (v1 hybrid host, 5 hierarchies)."""
    stage = "/sys-renewed"
    os.mkdir(stage)
    try:
        L.mount("sysfs", stage, "sysfs", _RO)
    except PermissionError:
        os.rmdir(stage)
        return  # as in mount_sysfs: the host's, read-only
    for path in _KEPT:
        src = f"{root}/sys/{path}"
        if os.path.ismount(src) and os.path.isdir(f"{stage}/{path}"):
            L.mount(src, f"{stage}/{path}", None, L.MS_MOVE)
    L.umount2(root + "/sys", L.MNT_DETACH)
    L.mount(stage, root + "/sys", None, L.MS_MOVE)
    os.rmdir(stage)


def own_cgroups(root: str = "") -> str:
    """What ``/proc/self/cgroup`` says (``root``: where the /proc to read is): compared before and
    after a start, whether the supervisor moved this process into a cgroup of its own."""
    with open(root + "/proc/self/cgroup") as f:
        return f.read()


def mount_cgroup_view(root: str, host: str, *, own: bool) -> None:
    """At ``root/sys/fs/cgroup``: the service's own cgroup, read-only, or (not ``own``, or where
    the kernel refuses) an empty read-only tmpfs. Needs the cgroup namespace made in the
    service's cgroup: every cgroup mount shows that cgroup as its root. ``host``: where the host's
    root is (its mounts say whether this is a hybrid host)."""
    target = root + "/sys/fs/cgroup"
    if own:
        try:
            _cgroup_mounts(root, hybrid=os.path.ismount(host + "/sys/fs/cgroup/unified"))
            return
        except OSError:
            # Rootless where the kernel refuses a cgroup mount: whatever got mounted goes.
            if os.path.ismount(target):
                L.umount2(target, L.MNT_DETACH)
    L.mount("tmpfs", target, "tmpfs", _RO, "mode=0755,size=0")


def _cgroup_mounts(root: str, *, hybrid: bool) -> None:
    target = root + "/sys/fs/cgroup"
    v1: list[str] = []
    v2 = False
    with open(root + "/proc/self/cgroup") as f:  # the new root's /proc: "/" is a bare tmpfs by now
        for line in f:
            _id, controllers, _path = line.rstrip("\n").split(":", 2)
            if not controllers:
                v2 = True
            elif any(c in V1_CONTROLLERS for c in controllers.split(",")):
                v1.append(controllers)
    if not v1:
        L.mount("cgroup2", target, "cgroup2", _RO)
        return
    L.mount("tmpfs", target, "tmpfs", L.MS_NOSUID | L.MS_NODEV | L.MS_NOEXEC, "mode=0755,size=0")
    for controllers in v1:
        os.mkdir(f"{target}/{controllers}")
        L.mount("cgroup", f"{target}/{controllers}", "cgroup", _RO, controllers)
        if "," in controllers:  # co-mounted (cpu,cpuacct): each name a link, as on the host
            for c in controllers.split(","):
                os.symlink(controllers, f"{target}/{c}")
    # A hybrid host's controller-less cgroup2, where the service's freezing and killing happen.
    if v2 and hybrid:
        os.mkdir(target + "/unified")
        L.mount("cgroup2", target + "/unified", "cgroup2", _RO)
    L.mount_setattr(target, L.MOUNT_ATTR_RDONLY, recursive=False)
