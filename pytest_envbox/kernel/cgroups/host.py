"""Which cgroup hierarchies this process is in, and where: read from the kernel's own view of it.

``/proc/self/mountinfo`` says where each hierarchy is mounted (and from which root, in a
container); ``/proc/self/cgroup`` says which cgroup of each hierarchy we are in. Together they
give our own cgroup's directory in every hierarchy, and so the host's kind: cgroup v2, v1,
hybrid (v1 controllers plus a cgroup2 mount without controllers) or none. Parsing is pure
(:func:`parse_host`), so it is unit-tested on text from real hosts.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

__all__ = ["V1_CONTROLLERS", "V2_CONTROLLERS", "CgroupHost", "detect", "parse_host"]

#: v1 controllers we use; ``cpuacct`` may be co-mounted with ``cpu`` (one directory for both).
V1_CONTROLLERS = ("memory", "cpu", "cpuacct", "pids", "freezer")
#: v2 controllers a service's cgroup needs enabled from its parents.
V2_CONTROLLERS = ("memory", "cpu", "pids")


@dataclass(frozen=True)
class CgroupHost:
    """Where this process's cgroups are, per the kernel's own view of it.

    ``v1`` maps each v1 controller we use to the directory of our own cgroup in its hierarchy;
    ``unified`` is our own cgroup's directory in the cgroup2 hierarchy (None if not mounted).
    """

    version: str  # "v2" | "v1" | "hybrid" | "none"
    v1: dict[str, str] = field(default_factory=dict)
    unified: str | None = None
    v2_controllers: tuple[str, ...] = ()
    #: the directory the cgroup2 mount shows at its top: everything a container (with a cgroup
    #: namespace or a bind mount of its own cgroup) can see, so the test run's world.
    unified_top: str | None = None

    def describe(self) -> str:
        if self.version == "v2":
            return f"cgroup v2 at {self.unified} (controllers: {' '.join(self.v2_controllers) or 'none'})"
        if self.version in ("v1", "hybrid"):
            where = ", ".join(f"{c}: {d}" for c, d in sorted(self.v1.items()))
            extra = f"; cgroup2 (freeze/kill) at {self.unified}" if self.unified else ""
            return f"cgroup {self.version} ({where}{extra})"
        return "no cgroup filesystem mounted"


def _unescape(path: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal."""
    for code, ch in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        path = path.replace(code, ch)
    return path


def parse_host(mountinfo: str, proc_cgroup: str) -> CgroupHost:
    """Find our cgroups from ``/proc/self/mountinfo`` and ``/proc/self/cgroup`` (pure: testable).

    A hierarchy mounted with a root other than ``/`` (a container's view) maps our path relative
    to that root; when our path is not below it (another cgroup namespace), the mount's own root
    is taken as ours.
    """
    own_v1: dict[str, str] = {}
    own_v2: str | None = None
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _hid, ctrls, path = parts
        if ctrls == "":
            own_v2 = path
        for c in ctrls.split(","):
            if c in V1_CONTROLLERS:
                own_v1[c] = path
    v1: dict[str, str] = {}
    unified: str | None = None
    unified_top: str | None = None
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, rfields = left.split(), right.split()
        if len(fields) < 5 or len(rfields) < 3:
            continue
        root, point, fstype, superopts = _unescape(fields[3]), _unescape(fields[4]), rfields[0], rfields[2]
        if fstype == "cgroup":
            for c in superopts.split(","):
                if c in V1_CONTROLLERS and c in own_v1 and c not in v1:
                    v1[c] = _join(point, root, own_v1[c])
        elif fstype == "cgroup2" and own_v2 is not None and unified is None:
            unified = _join(point, root, own_v2)
            unified_top = point
    controllers: tuple[str, ...] = ()
    if unified is not None:
        with contextlib.suppress(OSError), open(os.path.join(unified, "cgroup.controllers")) as f:
            controllers = tuple(f.read().split())
    if v1:
        version = "hybrid" if unified is not None else "v1"
    elif unified is not None:
        version = "v2"
    else:
        version = "none"
    return CgroupHost(version, v1, unified, controllers, unified_top)


def _join(point: str, root: str, own: str) -> str:
    if root != "/" and (own == root or own.startswith(root.rstrip("/") + "/")):
        own = own[len(root):]
    elif root != "/":
        own = "/"
    return point.rstrip("/") + ("/" + own.strip("/") if own.strip("/") else "")


def detect() -> CgroupHost:
    """This process's cgroups, from ``/proc/self``; ``"none"`` where that cannot be read."""
    try:
        with open("/proc/self/mountinfo") as f:
            mountinfo = f.read()
        with open("/proc/self/cgroup") as f:
            proc_cgroup = f.read()
    except OSError:
        return CgroupHost("none")
    return parse_host(mountinfo, proc_cgroup)
