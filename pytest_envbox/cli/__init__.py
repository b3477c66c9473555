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
import shutil
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from pytest_envbox.cli import export as exporting
from pytest_envbox.cli.doctor import cgroup_check, doctor
from pytest_envbox.cli.runs import clean, logs
from pytest_envbox.engine.report import enter_command
from pytest_envbox.errors import EnvboxError
from pytest_envbox.supervisor import records

__all__ = [
    "DESCRIPTION",
    "build_parser",
    "cgroup_check",
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
    except BrokenPipeError:  # `envbox doctor | head`: the reader has gone; not an error of ours
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # (else Python's exit flush fails again)
        return 141  # as a shell reports a command killed by SIGPIPE
