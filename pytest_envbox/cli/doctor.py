"""``envbox doctor``: can services run here, and if not, what to change.

Each line is a check done for real (a namespace made in a child, a cgroup made and removed, one
sandboxed service started), never a guess from file names; a host that refuses the sandbox's first
steps gets the one block of :mod:`pytest_envbox.kernel.refusal` (what was refused, why, the fix)
instead of the lines that would only repeat it.
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import warnings
from pathlib import Path

from pytest_envbox.errors import EnvboxError
from pytest_envbox.kernel import cgroups, hostcheck, refusal, seccomp
from pytest_envbox.supervisor import statedir

__all__ = ["cgroup_check", "doctor"]


def cgroup_check(root: bool) -> tuple[bool, str]:
    """Can services get cgroups here? Tries for real: makes this process's run directory, removes it."""
    host = cgroups.detect()
    if host.version == "none":
        return False, "no cgroup filesystem mounted: limits, stats() and pause() are unavailable"
    if not root and host.version != "v2":
        return False, (f"{host.describe()}; cgroup {host.version} hierarchies cannot be delegated "
                       "to a user: limits, stats() and pause() need root here (cgroup v2 with "
                       "a delegated subtree would do)")  # fmt: skip
    # A dry run: it never moves the test run's processes (cgroups.delegation.vacate), it says it would.
    tree = cgroups.CgroupTree(host, cgroups.run_name(os.getpid()), may_move=False)
    try:
        if tree.problem is not None:
            return False, tree.problem
        usable = "memory cpu pids" + (" freezer" if tree.backend.can_freeze() else "")
        if host.version == "v2":
            assert host.unified is not None
            where = cgroups.v2_base(host.unified)
            if tree.would_move:
                where += (f" (a test run first moves the processes of {where} into "
                          f"{where}/{cgroups.LEAF}: the cgroup is delegated to it)")  # fmt: skip
        else:
            where = host.v1["memory"]
        return True, (f"{host.describe()}; usable: {usable}; services' cgroups go in "
                      f"envbox-<pid>-<start>/ below {where}")
    finally:
        tree.remove()


class _Report:
    """``envbox doctor``'s lines: a name, a verdict (OK, NOTE, MISSING) and what to know."""

    def __init__(self) -> None:
        self.ok = True

    def line(self, name: str, verdict: str, text: str) -> None:
        if verdict == "MISSING":
            self.ok = False
        print(f"{name:<18} {verdict:<7} {text}", flush=True)


def doctor() -> int:
    """Print what this host supports, one line each; 0 when services can run here."""
    out = _Report()
    linux = sys.platform.startswith("linux")
    if not linux:
        found = refusal.platform_refusal()
        out.line("linux", "MISSING", found.headline)
        print(found.block(), flush=True)
        return 1
    out.line("linux", "OK", platform.platform())
    release = tuple(int(x) for x in platform.release().split(".")[:2] if x.isdigit())
    out.line("kernel", "OK" if release >= (5, 12) else "MISSING", platform.release()
             if release >= (5, 12) else
             f"{platform.release()}: kernel 5.12 or newer is needed (mount_setattr)")  # fmt: skip
    from pytest_envbox.engine.client import rootless

    root = not rootless()
    try:
        import pwd

        user = pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        user = f"uid {os.geteuid()}"
    if root:
        out.line("privileges", "OK", "root")
    else:
        why = (f"not root ({user})" if os.geteuid() != 0 else "root without CAP_SYS_ADMIN (a "
               "container's capabilities)" if refusal.boxed_root() else "root, in rootless mode "
               "(ENVBOX_ROOTLESS=yes)")  # fmt: skip
        out.line("privileges", "NOTE", f"{why}: services run rootless, in a user namespace; the "
                 "rootless lines below say what that can do here")  # fmt: skip
    # The sandbox's first steps, tried in a child: a refusal is the answer, whatever follows.
    refused = refusal.classify(refusal.probe(not root))
    if refused is not None:
        out.line("host", "MISSING", refused.headline)
        print(refused.block(), flush=True)
    unsafe = statedir.problem()
    out.line("state directory", "MISSING" if unsafe else "OK", unsafe or
             f"{statedir.state_dir()}: yours alone (mode 0700), for `envbox ps` and `envbox clean`")
    blocked = hostcheck.userns_sysctls()
    if blocked and not root and refused is None:
        # The probe (the real calls, as this interpreter) got past the sysctl: an AppArmor profile
        # grants this program user namespaces, as docs/ci.md#apparmor shows. A note, not a failure.
        out.line("user namespaces", "NOTE", "; ".join(why for why, _ in blocked) + ": but this "
                 "interpreter's were not refused (an AppArmor profile allows it), so rootless "
                 "mode works here")  # fmt: skip
        blocked = []
    elif blocked:
        out.line("user namespaces", "NOTE" if root else "MISSING", "; ".join(
            f"{why}: enable with `{fix}`" for why, fix in blocked))  # fmt: skip
    else:
        out.line("user namespaces", "OK", "available to unprivileged users")
    good, text = cgroup_check(root)
    # Not fatal: services without limits run without cgroups (with a warning).
    out.line("cgroups", "OK" if good else "NOTE", text)
    if refused is None:  # (else both would only repeat the refusal, with the wrong fix)
        if root:
            _network(out)
        else:
            _rootless(out, user, blocked=bool(blocked), limits=good)
    _seccomp(out)
    if refused is None:
        _sandbox(out, root)
    _images(out, release)
    return 0 if out.ok else 1


def _seccomp(out: _Report) -> None:
    """The services' system call filter: its kind and size on this machine."""
    rules = seccomp.policy()
    if rules is None:
        out.line("seccomp", "NOTE", f"no system call table for {platform.machine()} here: services "
                 "run without a seccomp filter (their capabilities still limit them)")  # fmt: skip
    else:
        out.line("seccomp", "OK", f"the filter envbox puts on services: {rules.summary()}")


def _images(out: _Report, release: tuple[int, ...]) -> None:
    """Image services: overlayfs and the store (a NOTE at worst: host programs need neither).
    Only looks: the store's records are read as `envbox images` reads them, nothing is made,
    and the pull machinery (requests) is not imported."""
    import json

    try:
        from pytest_envbox.images.progress import human_bytes
        from pytest_envbox.images.store import store_root
    except ImportError as e:  # filelock missing: a broken installation
        out.line("images", "NOTE", f"image services cannot run: {e}")
        return
    root = store_root()
    sizes = []
    with contextlib.suppress(OSError):
        for rec in (root / "images").glob("*.json"):
            with contextlib.suppress(OSError, ValueError, TypeError):
                sizes.append(int(json.loads(rec.read_text()).get("size", 0)))
    if root.exists() and not os.access(root, os.W_OK | os.X_OK):
        out.line("images", "NOTE", f"image services cannot run: the store {root} is not writable "
                 "by you; set ENVBOX_STORE to a writable directory")  # fmt: skip
        return
    text = (f"store {root}: {len(sizes)} image{'s' if len(sizes) != 1 else ''}, "
            f"{human_bytes(sum(sizes))}")  # fmt: skip
    with contextlib.suppress(OSError):
        if "overlay" not in Path("/proc/filesystems").read_text().split():
            # A module the first mount loads (every distribution builds it).
            text = f"overlayfs not loaded yet (the first image service loads it); {text}"
    if release < (6, 8):
        out.line("images", "NOTE", f"{text}; kernel before 6.8: an image of more than about 60 "
                 "layers cannot be mounted (overlayfs' lowerdir+), flatten such an image")  # fmt: skip
    else:
        out.line("images", "OK", text)


def _sandbox(out: _Report, root: bool) -> None:
    """Start one real sandboxed service, as a test would (rootless when not root)."""
    try:
        from pytest_envbox.engine.environment import Environment
        from pytest_envbox.spec import Service
    except ImportError as e:  # a broken installation (requests missing, say)
        out.line("sandbox", "MISSING", f"the engine cannot be imported: {e}")
        return
    try:
        with warnings.catch_warnings():  # "no cgroups": the cgroups line said it already
            warnings.simplefilter("ignore", RuntimeWarning)
            with Environment([Service("doctor", ["sleep", "60"])], rootdir="/"):
                pass
        how = "" if root else ", in a user namespace (rootless mode)"
        out.line("sandbox", "OK", f"a service started in new pid/mount/uts/ipc/net namespaces{how}")
    except EnvboxError as e:
        out.line("sandbox", "MISSING", f"could not start a sandboxed service: {e}")


def _network(out: _Report) -> None:
    """The private network and its faults, tried in a throwaway namespace."""
    found = hostcheck.network_faults()
    if found.get("bridge") is not None:
        out.line("network", "MISSING", f"cannot make a bridge in a new network namespace "
                 f"({found['bridge']}): load the modules with `modprobe bridge veth`")  # fmt: skip
        return
    missing = []
    if found.get("netem") is not None:
        missing.append(f"link.delay() needs the netem qdisc ({found['netem']}: `modprobe "
                       "sch_netem`, in Debian's and Ubuntu's linux-modules-extra)")  # fmt: skip
    if found.get("nf_tables") is not None:
        missing.append(f"link.loss() and network.partition() need nf_tables for bridges "
                       f"({found['nf_tables']}: `modprobe nf_tables nf_tables_bridge nft_numgen`)")
    text = ("private networks (bridge, veth; raw rtnetlink, no pyroute2 needed)"
            + ("; link.delay(), link.loss(), network.partition() work" if not missing
               else "; " + "; ".join(missing)))  # fmt: skip
    out.line("network", "NOTE" if missing else "OK", text)
    _addresses(out)


def _addresses(out: _Report) -> None:
    """Whether the host can route service addresses to the environments (root mode)."""
    from pytest_envbox.kernel import netlink
    from pytest_envbox.supervisor import subnets

    try:
        with netlink.Netlink() as nl:
            free, held, why = subnets.survey(nl.routes(), os.listdir("/sys/class/net"))
    except OSError as e:
        out.line("addresses", "NOTE", f"the host's routes cannot be read ({e}): service addresses "
                 "may not be routed from the host; `with env.network.reachable():` reaches them")
        return
    if free:
        skipped = f"; skipped: {why}" if why else ""
        out.line("addresses", "OK", f"routed from the host: each environment gets a /24 of "
                 f"{subnets.POOL} ({free} free, {held} held now{skipped})")  # fmt: skip
    else:
        out.line("addresses", "NOTE", f"not routed from the host: no /24 of {subnets.POOL} is free "
                 f"({why or 'all are held'}); `with env.network.reachable():` reaches them")


def _rootless(out: _Report, user: str, *, blocked: bool, limits: bool) -> None:
    """What rootless mode can and cannot do for this user here, each tried for real."""
    tried = hostcheck.try_user_namespace()
    steps = (("user namespace", "a user namespace, with you as root inside"),
             ("namespaces", "new mount, pid, uts, ipc, net and cgroup namespaces in it"),
             ("mounts", "private mounts, a tmpfs, / bound read-only"),
             ("network", "a bridge and a veth pair (the private network)"))  # fmt: skip
    can, cannot = [], []
    for key, what in steps:
        if key not in tried:
            cannot.append(f"{what} (not tried: an earlier step failed)")
        elif tried[key] is None:
            can.append(what)
        else:
            cannot.append(f"{what}: {tried[key]}")
    fix = "" if not blocked else " (see the user namespaces line for the fix)"
    out.line("rootless sandbox", "OK" if not cannot else "MISSING",
             ("can make " + "; ".join(can)) if not cannot
             else "cannot make " + "; ".join(cannot) + fix)  # fmt: skip
    ids = hostcheck.subids()
    if ids.usable:
        out.line("subordinate ids", "OK", f"{ids.uids} uids and {ids.gids} gids in /etc/subuid "
                 "and /etc/subgid, and newuidmap: services may run as other users")  # fmt: skip
    else:
        missing = []
        if not ids.uids or not ids.gids:
            missing.append(f"no range for {user} in /etc/subuid and /etc/subgid (add one: `sudo "
                           f"usermod --add-subuids 100000-165535 --add-subgids 100000-165535 "
                           f"{user}`)")  # fmt: skip
        if not ids.helpers:
            missing.append("no newuidmap/newgidmap (`sudo apt install uidmap`)")
        out.line("subordinate ids", "NOTE", "services can run only as you (root inside); a "
                 "service's `user` needs " + " and ".join(missing))  # fmt: skip
    out.line("addresses", "NOTE", "rootless, service addresses are not routed from the host: "
             "Python clients reach them inside `with env.network.reachable():`")
    out.line("rootless limits", "OK" if limits else "NOTE",
             "memory, cpu and pids limits can be enforced for you" if limits else
             "services that declare limits cannot run rootless here (see the cgroups line); "
             "services without limits can")  # fmt: skip
