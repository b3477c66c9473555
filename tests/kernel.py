"""What the kernel says about processes and namespaces: the ground truth for leak checks."""

from __future__ import annotations

import os
import re


def ns_inode(pid: int, kind: str) -> str:
    """``/proc/PID/ns/KIND`` as the kernel names it, e.g. ``pid:[4026532001]``."""
    return os.readlink(f"/proc/{pid}/ns/{kind}")


def holders(ns: str) -> list[int]:
    """Every pid that is in, or holds an fd to, the namespace named ``ns`` (e.g. ``net:[...]``)."""
    kind = ns.split(":", 1)[0]
    kind = {"mnt": "mnt", "net": "net", "pid": "pid", "uts": "uts", "ipc": "ipc"}[kind]
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            if os.readlink(f"/proc/{pid}/ns/{kind}") == ns:
                found.append(pid)
                continue
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == ns:
                        found.append(pid)
                        break
                except OSError:
                    pass
        except OSError:
            pass  # exited meanwhile
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def children(pid: int) -> list[int]:
    """Direct children of ``pid``, from every process's parent field (no CONFIG_PROC_CHILDREN needed)."""
    out: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(entry))
    return out


def started_sandboxes(supervisor: int) -> set[int]:
    """Children of the supervisor that run a service: inits with a child of their own.

    (Its other children are prepared inits still waiting for a service, with no child yet.)
    """
    return {pid for pid in children(supervisor) if children(pid)}


def cgroup_dirs(pid: int) -> dict[str, str]:
    """The cgroup directories of ``pid`` as the host sees them: controller (or "unified") -> path.

    Read straight from ``/proc/PID/cgroup`` and the host's cgroup mounts, independently of the
    plugin's own detection code. A mount's root (mountinfo's fourth field) is taken off the path:
    in a privileged container on cgroup v1, the hierarchy mounted at /sys/fs/cgroup/pids starts
    at the container's own cgroup, which /proc/PID/cgroup names from the host's root.
    """
    mounts: dict[str, tuple[str, str]] = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fstype, _src, opts = right.split()[:3]
            root, point = left.split()[3:5]
            if fstype == "cgroup2":
                mounts.setdefault("unified", (root, point))
            elif fstype == "cgroup":
                for opt in opts.split(","):
                    mounts.setdefault(opt, (root, point))
    out: dict[str, str] = {}
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            _hid, ctrls, path = line.rstrip("\n").split(":", 2)
            for c in ctrls.split(",") if ctrls else ["unified"]:
                if c in mounts:
                    root, point = mounts[c]
                    if root != "/" and (path == root or path.startswith(root + "/")):
                        path = path[len(root):]
                    out[c] = point.rstrip("/") + path
    return out


def read_cgroup_file(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def rss_kib(pid: int) -> int:
    """Resident memory of ``pid`` in KiB, as the kernel counts it."""
    with open(f"/proc/{pid}/status") as f:
        return int(next(ln for ln in f if ln.startswith("VmRSS:")).split()[1])


def cpu_seconds(pid: int) -> float:
    """CPU time ``pid`` has used so far, user and system (its threads included)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


_OUR_VETH = re.compile(r"v\d+")


def host_links() -> set[str]:
    """The links in the host's network namespace that the project could have made and should
    not have: a service's veth (``v<N>``, made in its hub) that ended up here. Environments'
    own host links (``envbox<N>``) aside: other xdist workers and parallel runs make and delete
    theirs at any time. Never the host's other links: other programs (podman, VPNs, Docker) add
    and remove theirs at any time."""
    return {n for n in os.listdir("/sys/class/net") if _OUR_VETH.fullmatch(n)}


def our_mounts() -> list[str]:
    """This mount namespace's mounts that the project could have made: every path it mounts on
    or from (state dirs, stores, writable layers, run dirs) names envbox. Mount ids aside, and
    never the host's count: other programs (podman, systemd) mount at any time."""
    with open("/proc/self/mountinfo") as f:
        return sorted(ln.split(" - ")[0].split(" ", 4)[4] for ln in f if "envbox" in ln)
