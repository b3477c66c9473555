"""The ``envbox`` command: the engine without pytest (``doctor``, ``up``, ``ps``, ``logs``,
``clean``; ``pull``, ``images``, ``prune`` for the image store; ``export`` for Kubernetes manifests).

It imports nothing from pytest: ``up`` reads the project's declarations with
:mod:`pytest_envbox.config` and runs them with :class:`~pytest_envbox.Environment`, as the plugin
does; ``ps``, ``logs`` and ``clean`` read the records of live runs
(:mod:`pytest_envbox.supervisor.records`, see :mod:`.runs`). ``envbox --help`` shows
:data:`DESCRIPTION`, plain text: this docstring is for the API reference.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import signal
import sys
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path

from pytest_envbox.cli import export as exporting
from pytest_envbox.cli.runs import clean, logs
from pytest_envbox.engine.report import enter_command
from pytest_envbox.errors import EnvboxError
from pytest_envbox.kernel import cgroups, hostcheck, seccomp
from pytest_envbox.supervisor import records, statedir

__all__ = [
    "DESCRIPTION",
    "build_parser",
    "clean",
    "doctor",
    "logs",
    "main",
    "ps",
    "up",
]

#: What ``envbox --help`` says before the commands: plain text, for a terminal.
DESCRIPTION = """\
Run a project's envbox services without pytest, and look after what test runs leave.

The services are those declared in envbox.toml, or in [tool.envbox] of pyproject.toml, in the
current directory (or --rootdir). `envbox CMD --help` says more about each command."""

#: ``envbox --help``'s closing lines.
EPILOG = """\
examples:
  envbox doctor              can services run here?
  envbox up                  start every declared service, until Ctrl-C
  envbox ps                  the runs alive, their environments and services
  envbox logs web -f         follow service web's log (of a test's or a kept environment)
  envbox clean 4242-1        stop kept environment 4242-1 (left by pytest --envbox-keep)"""

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
    out.line("linux", "OK" if linux else "MISSING",
             platform.platform() if linux else f"this is {sys.platform}: use Linux")  # fmt: skip
    if not linux:
        return 1
    release = tuple(int(x) for x in platform.release().split(".")[:2] if x.isdigit())
    out.line("kernel", "OK" if release >= (5, 12) else "MISSING", platform.release()
             if release >= (5, 12) else
             f"{platform.release()}: kernel 5.12 or newer is needed (mount_setattr)")  # fmt: skip
    root = os.geteuid() == 0
    try:
        import pwd

        user = pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        user = f"uid {os.geteuid()}"
    out.line("privileges", "OK" if root else "NOTE", "root" if root else
             f"not root ({user}): services run rootless, in a user namespace; the rootless "
             "lines below say what that can do here")  # fmt: skip
    unsafe = statedir.problem()
    out.line("state directory", "MISSING" if unsafe else "OK", unsafe or
             f"{statedir.state_dir()}: yours alone (mode 0700), for `envbox ps` and `envbox clean`")
    blocked = hostcheck.userns_sysctls()
    if blocked:
        out.line("user namespaces", "NOTE" if root else "MISSING", "; ".join(
            f"{why}: enable with `{fix}`" for why, fix in blocked))  # fmt: skip
    else:
        out.line("user namespaces", "OK", "available to unprivileged users")
    good, text = cgroup_check(root)
    # Not fatal: services without limits run without cgroups (with a warning).
    out.line("cgroups", "OK" if good else "NOTE", text)
    if root:
        _network(out)
    else:
        _rootless(out, user, blocked=bool(blocked), limits=good)
    _seccomp(out)
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
        out.line("seccomp", "OK", rules.summary())


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


def _nothing_declared(rootdir: Path) -> str:
    """Why no service is declared at ``rootdir``: what was looked for, and what was found."""
    if (rootdir / "envbox.toml").is_file():
        found = "envbox.toml is there and declares none"
    elif (rootdir / "pyproject.toml").is_file():
        found = "pyproject.toml is there, without services in [tool.envbox]"
    else:
        found = "neither is there"
    return (f"no services are declared in {rootdir} (looked for envbox.toml, then [tool.envbox] "
            f"in pyproject.toml: {found}); run it in the project's directory, or pass --rootdir")


def up(names: Sequence[str], topology: str | None, rootdir: Path, logdir: Path | None = None) -> int:
    """Start services from the project's declarations and keep them until Ctrl-C (or SIGTERM).

    Their logs (and the environment's generated files) go to ``logdir``, made if need be and
    kept after Ctrl-C, when the services are gone and the logs are what is left to read; by
    default a new directory ``envbox-up-*`` in the temporary directory. Both ends say where.
    Returns 1, having started nothing, when nothing is declared.
    """
    import tempfile

    from pytest_envbox.cli.images import line_printer
    from pytest_envbox.config import load_project_config
    from pytest_envbox.engine import waiting
    from pytest_envbox.engine.environment import Environment
    from pytest_envbox.images.progress import set_default_show

    # Pulls and slow starts say what they wait for, on standard error (as `envbox pull` does).
    show = line_printer(sys.stderr)
    set_default_show(show)
    waiting.set_default_show(show)
    catalog = load_project_config(rootdir)
    if not catalog.services:
        print(f"envbox: {_nothing_declared(rootdir)}", file=sys.stderr, flush=True)
        return 1
    if not names and topology is None:
        names = catalog.names()
    made = logdir is None
    if logdir is None:
        logdir = Path(tempfile.mkdtemp(prefix="envbox-up-"))
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        env = Environment(list(names), topology=topology, catalog=catalog, rootdir=rootdir,
                          workdir=logdir)  # fmt: skip
        what = ", ".join(names) if names else f"topology {topology}"
        print(f"envbox: starting {what}; logs in {logdir}", flush=True)
        env.open()
    except BaseException:
        # A start that failed: its logs say why, unless nothing was started (then no litter).
        if made and not any(logdir.glob("*.log")):
            shutil.rmtree(logdir, ignore_errors=True)
        else:
            print(f"envbox: not started; the logs stay in {logdir}", file=sys.stderr, flush=True)
        raise
    with env:
        for name, h in env.services.items():
            ports = ", ".join(f"{p} -> 127.0.0.1:{h.port(p)}" for p in h.spec.ports) or "no ports"
            print(f"{name}: {h.ip} on the environment's network, pid {h.pid}, {ports}, "
                  f"log {h.log_path}", flush=True)  # fmt: skip
        net = env.network
        how = ("routed from this host: connect to the addresses above" if net.routed else
               f"not routed from this host ({net.why_unrouted})")  # fmt: skip
        print(f"envbox: network {net.subnet}, {how}", flush=True)
        print(f"envbox: environment {env.id}: services are up; `envbox logs NAME -f` follows a "
              "log; Ctrl-C tears them down", flush=True)  # fmt: skip
        stop.wait()
    print(f"envbox: torn down; the logs stay in {logdir}", flush=True)
    return 0


def ps() -> int:
    """The runs alive on this host (those of this user; all of them as root), and their services."""
    import pwd

    found = records.runs()
    alive = [(name, rec) for name, rec in found if rec is not None]
    stale = len(found) - len(alive)
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
                print(f"  environment {env}: kept ({kept[env]}); `envbox clean {env}` stops it")
            for svc, info in services.items():
                pid = info.get("pid") or "exited"
                print(f"  environment {env}: {svc}  pid {pid}  {info.get('ip') or ''}".rstrip())
                if env in kept and info.get("pid"):
                    print(f"    enter: {enter_command(int(info['pid']), bool(rec.get('rootless')))}")
    if not alive:
        print("envbox: no run alive on this host")
    if stale:
        print(f"envbox: {stale} record{'s' if stale != 1 else ''} of killed runs: "
              "`envbox clean` removes them")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``envbox`` command line: every command and option with a help text, plain text only
    (a terminal shows it as written; tests/unit/test_cli_help.py holds it to that)."""
    parser = argparse.ArgumentParser(prog="envbox", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                title="commands")  # fmt: skip

    def command(name: str, text: str, more: str = "") -> argparse.ArgumentParser:
        first = text[0].upper() + text[1:] + "."
        return sub.add_parser(name, help=text, description=f"{first}\n\n{more}" if more else first,
                              formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip

    def rootdir(p: argparse.ArgumentParser, what: str) -> None:
        p.add_argument("--rootdir", type=Path, default=Path.cwd(), metavar="DIR",
                       help=f"the project's directory: {what} (default: the current directory)")

    p_doctor = command("doctor", "check what this host supports, one line each",
                       "Exits 0 when services can run here, 1 when something they need is missing.")
    p_doctor.add_argument("--config", action="store_true",
                          help="instead: show the project's services, where each comes from, and "
                          "the keys of its compose files and manifests that are ignored")
    rootdir(p_doctor, "where envbox.toml or pyproject.toml is read, with --config")
    p_up = command("up", "start services in the foreground, until Ctrl-C",
                   "\nPrints each service's address, pid, published ports and log file. Ctrl-C "
                   "(or SIGTERM)\nstops them all; their logs stay in the directory printed.")
    p_up.add_argument("names", nargs="*", metavar="NAME",
                      help="services to start, with those they depend on (default: every declared one)")
    p_up.add_argument("--topology", default=None, metavar="NAME",
                      help="start this topology's services instead (a [tool.envbox.topologies] entry)")
    p_up.add_argument("--logs", type=Path, default=None, metavar="DIR",
                      help="write the services' logs to DIR, made if need be and appended to "
                      "(default: a new envbox-up-* directory in the temporary directory)")
    rootdir(p_up, "where envbox.toml or pyproject.toml is read")
    command("ps", "list the runs alive on this host: their environments, services, pids, addresses",
            "\nThis user's runs (root's, as root). Kept environments show how to enter a service.")
    p_logs = command("logs", "print the log of a service of a live or kept environment",
                     "\nA live environment is one a test (or `envbox up`) is using; a kept one was "
                     "left running\nby pytest --envbox-keep. `envbox ps` lists both.")
    p_logs.add_argument("name", metavar="NAME", help="the service's name")
    p_logs.add_argument("--env", default=None, metavar="ID",
                        help="the environment's id, as `envbox ps` shows it (needed when several "
                        "environments have a service NAME)")
    p_logs.add_argument("-f", "--follow", action="store_true",
                        help="then print what the service writes, until its environment ends or Ctrl-C")
    p_clean = command("clean", "stop kept environments and remove what killed runs left behind",
                      "\nWith IDs: stop those kept environments, nothing else. Without: remove the "
                      "cgroups,\ntemporary directories and records of killed runs, and stop every "
                      "kept environment\nafter asking (--yes: without asking). Without a terminal "
                      "to ask and without --yes,\nkept environments are left running and listed. "
                      "An environment a test is using is\nnever stopped.")
    p_clean.add_argument("ids", nargs="*", metavar="ID",
                         help="kept environments to stop, as `envbox ps` shows them")
    p_clean.add_argument("-y", "--yes", action="store_true",
                         help="stop every kept environment without asking (for scripts)")
    p_pull = command("pull", "pull images into the store (with progress) and unpack them")
    p_pull.add_argument("refs", nargs="+", metavar="REF", help="image references, as `image` takes them")
    p_pull.add_argument("--rootdir", type=Path, default=Path.cwd(), metavar="DIR",
                        help="where relative oci: paths and insecure_registries are read from "
                        "(default: the current directory)")
    command("images", "list the images in the store: references, digests, sizes, last used")
    p_prune = command("prune", "remove from the store what no image needs, and images unused "
                      "since --older-than")  # fmt: skip
    p_prune.add_argument("--older-than", default=None, metavar="DURATION",
                         help='also remove images not used for DURATION ("7d", "12h", "0" for all)')
    exporting.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``envbox`` with ``argv`` (default: the process's); the exit status. An
    :class:`~pytest_envbox.errors.EnvboxError` is printed as one line, status 1."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "doctor" and args.config:
            from pytest_envbox.cli.configreport import config_report

            return config_report(args.rootdir.resolve())
        if args.command == "doctor":
            return doctor()
        if args.command == "clean":
            return clean(args.ids, yes=args.yes)
        if args.command == "logs":
            return logs(args.name, args.env, follow=args.follow)
        if args.command == "ps":
            return ps()
        if args.command == "export":
            return exporting.export(args)
        if args.command in ("pull", "images", "prune"):
            from pytest_envbox.cli import images  # requests and the store: only when asked

            if args.command == "pull":
                return images.pull(args.refs, args.rootdir.resolve())
            return images.images() if args.command == "images" else images.prune(args.older_than)
        logdir = args.logs.resolve() if args.logs is not None else None
        return up(args.names, args.topology, args.rootdir.resolve(), logdir)
    except EnvboxError as e:
        print(f"envbox: {e}", file=sys.stderr)
        return 1
