"""The ``envbox`` command: the engine without pytest (``doctor``, ``up``, ``clean``).

It imports nothing from pytest: it reads the project's declarations with :mod:`.config` and runs
them with :class:`~pytest_envbox.Environment`, as the plugin does.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from . import cgroups, state
from .config import load_project_config
from .environment import Environment
from .errors import EnvboxError
from .spec import Service
from .summary import enter_command


def _cgroup_check(root: bool) -> tuple[bool, str]:
    """Can services get cgroups here? Tries for real: makes this process's run directory, removes it."""
    host = cgroups.detect()
    if host.version == "none":
        return False, "no cgroup filesystem mounted: limits, stats() and pause() are unavailable"
    if not root:
        return False, f"{host.describe()}; as non-root, cgroups are not writable (run as root)"
    # A dry run: it never moves the test run's processes (cgroups._vacate), it says it would.
    tree = cgroups.CgroupTree(host, cgroups.run_name(os.getpid()), may_move=False)
    try:
        if not tree.usable:
            return False, tree.problem or "unusable"
        probe_dir = tree.unified or host.unified  # the run directory just made, if any
        freezer = "freezer" in tree.v1 or (
            probe_dir is not None and os.path.exists(os.path.join(probe_dir, "cgroup.freeze"))
        )  # cgroup.freeze: cgroup v2 from Linux 5.2 (a root cgroup has none)
        usable = "memory cpu pids" + (" freezer" if freezer else "")
        if host.version == "v2":
            assert host.unified is not None
            where = cgroups.v2_base(host.unified)
            if tree.would_move:
                where += (f" (a test run first moves the processes of {where} into "
                          f"{where}/{cgroups.LEAF}: the cgroup is delegated to it)")  # fmt: skip
        else:
            where = os.path.dirname(tree.v1["memory"])
        return True, (f"{host.describe()}; usable: {usable}; services' cgroups go in "
                      f"envbox-<pid>-<start>/ below {where}")
    finally:
        tree.remove()


def doctor() -> int:
    """Print what this host supports, one line each; 0 when services can run here."""
    ok = True

    def line(name: str, good: bool, text: str) -> None:
        nonlocal ok
        ok = ok and good
        print(f"{name:<18} {'OK  ' if good else 'MISSING'} {text}")

    linux = sys.platform.startswith("linux")
    line("linux", linux, platform.platform() if linux else f"this is {sys.platform}: use Linux")
    if not linux:
        return 1
    release = tuple(int(x) for x in platform.release().split(".")[:2] if x.isdigit())
    line("kernel", release >= (5, 12), platform.release() if release >= (5, 12)
         else f"{platform.release()}: kernel 5.12 or newer is needed (mount_setattr)")  # fmt: skip
    root = os.geteuid() == 0
    line("privileges", root, "root" if root else
         "not root: run as root (rootless mode is planned)")  # fmt: skip
    try:
        users = int(Path("/proc/sys/user/max_user_namespaces").read_text())
    except OSError:
        users = 0
    print(f"{'user namespaces':<18} {'OK  ' if users else 'NOTE'} "
          f"{'available' if users else 'disabled (user.max_user_namespaces = 0)'}")  # fmt: skip
    good, text = _cgroup_check(root)
    # Not fatal: services without limits run without cgroups (with a warning).
    print(f"{'cgroups':<18} {'OK  ' if good else 'NOTE'} {text}")
    if root:
        try:
            with Environment([Service("doctor", ["sleep", "60"])], rootdir="/"):
                pass
            line("sandbox", True, "a service started in new pid/mount/uts/ipc/net namespaces")
        except EnvboxError as e:
            line("sandbox", False, f"could not start a sandboxed service: {e}")
    return 0 if ok else 1


def up(names: Sequence[str], topology: str | None, rootdir: Path) -> int:
    """Start services from the project's declarations and keep them until Ctrl-C."""
    catalog = load_project_config(rootdir)
    if not names and topology is None:
        names = catalog.names()
    env = Environment(list(names), topology=topology, catalog=catalog, rootdir=rootdir)
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with env:
        for name, h in env.services.items():
            ports = ", ".join(f"{p} -> 127.0.0.1:{h.port(p)}" for p in h.spec.ports) or "no ports"
            print(f"{name}: {h.ip} on the environment's network, pid {h.pid}, {ports}, "
                  f"log {h.log_path}", flush=True)  # fmt: skip
        print("envbox: services are up; Ctrl-C tears them down", flush=True)
        stop.wait()
    print("envbox: torn down", flush=True)
    return 0


def _stop_kept(timeout: float = 15.0) -> int:
    """SIGTERM every supervisor kept alive by ``--envbox-keep`` (this user's; anyone's as
    root) and wait for each to tear down its environments; return how many there were."""
    import select

    stopped = 0
    for name, rec in state.runs():
        if not rec or not rec.get("kept") or not rec.get("supervisor"):
            continue
        if os.geteuid() != 0 and rec.get("owner") != os.geteuid():
            continue
        try:
            pidfd = os.pidfd_open(int(rec["supervisor"]))
        except OSError:
            continue  # gone meanwhile
        try:
            if cgroups._is_stale(name):  # the pid was reused: not that supervisor any more
                continue
            signal.pidfd_send_signal(pidfd, signal.SIGTERM)
            if not select.select([pidfd], [], [], timeout)[0]:
                print(f"envbox: supervisor {rec['supervisor']} did not end in {timeout:.0f} s; "
                      "killing it", file=sys.stderr)  # fmt: skip
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                select.select([pidfd], [], [], timeout)
        except OSError:
            continue
        finally:
            os.close(pidfd)
        stopped += 1
        for env, why in rec["kept"].items():
            names = ", ".join(rec.get("environments", {}).get(env, {})) or "no services"
            print(f"stopped kept environment {env} ({names}; {why})")
    return stopped


def clean() -> int:
    """Stop environments kept by ``--envbox-keep``, and remove what runs killed with SIGKILL
    left behind: their cgroup directories and records.

    Processes, namespaces, veths and mounts need no cleaning: they die with the supervisor.
    """
    kept = _stop_kept()
    removed = cgroups.clean_stale()
    for path in removed:
        print(f"removed {path}")
    records = state.clean_stale()
    for path in records:
        print(f"removed {path}")
    print(f"envbox: {kept} kept run{'' if kept == 1 else 's'} stopped, "
          f"{len(removed)} stale cgroup director{'y' if len(removed) == 1 else 'ies'} "
          f"and {len(records)} stale run record{'' if len(records) == 1 else 's'} removed")  # fmt: skip
    return 0


def ps() -> int:
    """The runs alive on this host (those of this user; all of them as root), and their services."""
    import pwd

    records = state.runs()
    alive = [(name, rec) for name, rec in records if rec is not None]
    stale = len(records) - len(alive)
    for name, rec in alive:
        try:
            owner = pwd.getpwuid(int(rec.get("owner", -1))).pw_name
        except (KeyError, ValueError):
            owner = str(rec.get("owner"))
        tests = ", ".join(str(p) for p in rec.get("tests") or []) or "-"
        print(f"{name}: supervisor {rec.get('supervisor')}, user {owner}, test process {tests}, "
              f"in {rec.get('cwd')}")  # fmt: skip
        envs = rec.get("environments") or {}
        kept = rec.get("kept") or {}
        if not envs:
            print("  (no service running)")
        for env, services in envs.items():
            if env in kept:
                print(f"  environment {env}: kept ({kept[env]}); `envbox clean` removes it")
            for svc, info in services.items():
                pid = info.get("pid") or "exited"
                print(f"  environment {env}: {svc}  pid {pid}  {info.get('ip') or ''}".rstrip())
                if env in kept and info.get("pid"):
                    print(f"    enter: {enter_command(int(info['pid']))}")
    if not alive:
        print("envbox: no run alive on this host")
    if stale:
        print(f"envbox: {stale} record{'s' if stale != 1 else ''} of killed runs: "
              "`envbox clean` removes them")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="envbox", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("doctor", help="check what this host supports")
    sub.add_parser("clean", help="remove what killed runs left behind (cgroups, records)")
    sub.add_parser("ps", help="list the runs alive on this host and their services")
    p_up = sub.add_parser("up", help="start services in the foreground")
    p_up.add_argument("names", nargs="*", help="services (default: all)")
    p_up.add_argument("--topology", default=None)
    p_up.add_argument("--rootdir", type=Path, default=Path.cwd())
    args = parser.parse_args(argv)
    try:
        if args.command == "doctor":
            return doctor()
        if args.command == "clean":
            return clean()
        if args.command == "ps":
            return ps()
        return up(args.names, args.topology, args.rootdir.resolve())
    except EnvboxError as e:
        print(f"envbox: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
