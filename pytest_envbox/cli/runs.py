"""``envbox clean`` and ``envbox logs``: the environments the runs' records list, acted upon.

Every supervisor keeps a record of its environments and their services (pids, addresses, log
files: :mod:`pytest_envbox.supervisor.records`). An environment's id is the one ``envbox ps``
shows (``<test process pid>-<n>``). Standard library only, as the rest of the command line.

``clean`` stops only what it is told to, or what the user agreed to: an environment that a test
is using is never stopped (it is not kept: its test process ends it), a kept one is stopped when
named, or after a "yes" (asked on a terminal, ``--yes`` in a script). What killed runs left
behind is debris nobody can use, removed without asking.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from pytest_envbox.errors import EnvboxError
from pytest_envbox.kernel import cgroups
from pytest_envbox.supervisor import records

__all__ = ["Found", "clean", "environments", "logs"]

#: How long a supervisor (or a kept environment's services) may take to end once signalled.
STOP_TIMEOUT = 15.0


@dataclass
class Found:
    """An environment a live run's record lists."""

    run: str  #: the run's name (``envbox-<supervisor pid>-<start time>``)
    record: dict[str, Any]
    env: str  #: its id, as ``envbox ps`` shows it

    @property
    def kept(self) -> str | None:
        """Why it is kept (``--envbox-keep``, ``Environment.keep``), or None: a test uses it."""
        why = (self.record.get("kept") or {}).get(self.env)
        return None if why is None else str(why)

    @property
    def services(self) -> dict[str, dict[str, Any]]:
        return dict((self.record.get("environments") or {}).get(self.env) or {})

    @property
    def supervisor(self) -> int:
        return int(self.record.get("supervisor") or 0)

    def describe(self) -> str:
        names = ", ".join(self.services) or "no services"
        return f"{self.env} ({names}; {self.kept})" if self.kept else f"{self.env} ({names})"


def environments() -> list[Found]:
    """Every environment of the live runs this user may act on (root: root's runs)."""
    found = []
    for run, rec in records.runs():
        if rec is None or not rec.get("supervisor"):
            continue
        if os.geteuid() != 0 and rec.get("owner") != os.geteuid():
            continue
        envs = list(rec.get("environments") or {})
        envs += [e for e in rec.get("kept") or {} if e not in envs]
        found += [Found(run, rec, env) for env in envs]
    return found


def _tests(f: Found) -> str:
    return ", ".join(map(str, f.record.get("tests") or [])) or "?"


def _lookup(ids: Sequence[str], every: list[Found]) -> list[Found]:
    """The environments named, each once; an :class:`EnvboxError` for an id no run lists."""
    by_id: dict[str, list[Found]] = {}
    for f in every:
        by_id.setdefault(f.env, []).append(f)
    unknown = [i for i in ids if i not in by_id]
    if unknown:
        listed = ", ".join(sorted(by_id)) or "none"
        raise EnvboxError(f"no live environment {', '.join(unknown)} (`envbox ps` lists them; "
                          f"live now: {listed})")  # fmt: skip
    return [f for i in dict.fromkeys(ids) for f in by_id[i]]


@contextlib.contextmanager
def _pidfd(pid: int) -> Iterator[int | None]:
    """A pidfd of ``pid``, None when it is gone; closed after."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        yield None
        return
    try:
        yield fd
    finally:
        os.close(fd)


def _wait_gone(fds: Sequence[int], timeout: float) -> bool:
    """Wait until every process of ``fds`` (pidfds) has ended; False at the deadline."""
    end = time.monotonic() + timeout
    left = list(fds)
    while left:
        rest = end - time.monotonic()
        if rest <= 0:
            return False
        ready = select.select(left, [], [], rest)[0]
        left = [fd for fd in left if fd not in ready]
    return True


def _stop_run(run: str, supervisor: int) -> bool:
    """SIGTERM a supervisor (it tears down all its environments) and wait for it to end;
    SIGKILL past the timeout. False when it was gone already (or its pid is another's now)."""
    with _pidfd(supervisor) as fd:
        if fd is None or cgroups.is_stale(run):  # a pid reused: not that supervisor any more
            return False
        try:
            signal.pidfd_send_signal(fd, signal.SIGTERM)
            if not _wait_gone([fd], STOP_TIMEOUT):
                print(f"envbox: supervisor {supervisor} did not end in {STOP_TIMEOUT:.0f} s; "
                      "killing it", file=sys.stderr)  # fmt: skip
                signal.pidfd_send_signal(fd, signal.SIGKILL)
                _wait_gone([fd], STOP_TIMEOUT)
        except OSError:
            return False
    return True


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _stop_services(f: Found) -> None:
    """Stop one kept environment of a run that keeps others: SIGKILL the init of each of its
    services (the whole sandbox goes with it). Its supervisor then frees its slots' processes;
    it ends, with everything it made, when its last kept environment is stopped."""
    with contextlib.ExitStack() as stack:
        fds = []
        for info in f.services.values():
            init = info.get("init")
            if not init:
                continue  # that service has exited
            fd = stack.enter_context(_pidfd(int(init)))
            # A child of that supervisor: the pid is not one reused by another process since.
            if fd is None or _parent(int(init)) != f.supervisor or cgroups.is_stale(f.run):
                continue
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(fd, signal.SIGKILL)
                fds.append(fd)
        if not _wait_gone(fds, STOP_TIMEOUT):
            print(f"envbox: the services of {f.env} did not end in {STOP_TIMEOUT:.0f} s",
                  file=sys.stderr)  # fmt: skip


def _stop(chosen: list[Found], every: list[Found]) -> int:
    """Stop the kept environments ``chosen``: a run all of whose kept environments are chosen
    is ended (its supervisor tears everything down); of a run that keeps others as well, the
    chosen environments' services are stopped. Returns how many were stopped."""
    stopped = 0
    for run in dict.fromkeys(f.run for f in chosen):
        mine = [f for f in chosen if f.run == run]
        others = [f for f in every if f.run == run and f.kept and f not in mine]
        if not others:
            if not _stop_run(run, mine[0].supervisor):
                continue
        else:
            for f in mine:
                _stop_services(f)
        for f in mine:
            print(f"stopped kept environment {f.describe()}")
            stopped += 1
        if others:
            print(f"  (its run {run} still keeps {', '.join(o.env for o in others)}: the network "
                  "and cgroups of the stopped ones go with the last)")  # fmt: skip
    return stopped


def _confirm(kept: list[Found], stdin: TextIO) -> bool:
    """Ask on the terminal whether to stop the kept environments listed."""
    print(f"envbox: {len(kept)} kept environment{'s are' if len(kept) != 1 else ' is'} running:")
    for f in kept:
        print(f"  {f.describe()}, run {f.run}, in {f.record.get('cwd')}")
    print("Stop them? [y/N] ", end="", flush=True)
    answer = stdin.readline()
    return answer.strip().lower() in ("y", "yes")


def _clean_stale() -> None:
    """What runs killed with SIGKILL left behind: cgroup directories, temporary directories
    and records (processes, namespaces, veths and mounts die with their supervisor)."""
    removed = cgroups.clean_stale()
    for path in removed:
        print(f"removed {path}")
    found = records.clean_stale()
    for path in found:
        print(f"removed {path}")
    files = [p for p in found if p.endswith(".json")]
    temp = len(found) - len(files)
    print(f"envbox: {len(removed)} stale cgroup director{'y' if len(removed) == 1 else 'ies'}, "
          f"{temp} temporary director{'y' if temp == 1 else 'ies'} "
          f"and {len(files)} stale run record{'' if len(files) == 1 else 's'} removed")  # fmt: skip


def clean(ids: Sequence[str] = (), yes: bool = False, stdin: TextIO | None = None) -> int:
    """``envbox clean [ID ...] [--yes]``.

    With ids: stop those kept environments, nothing else (an id no run lists, or an environment
    a test is using, is an error, and then nothing is stopped). Without: remove what killed runs
    left behind, and stop every kept environment after asking on the terminal (``yes`` does not
    ask). Without a terminal to ask and without ``yes``, the kept environments are left running,
    listed on stderr with how to stop them: a script never stops what it did not name.
    """
    stdin = sys.stdin if stdin is None else stdin
    every = environments()
    if ids:
        chosen = _lookup(ids, every)
        busy = [f for f in chosen if not f.kept]
        if busy:
            raise EnvboxError("; ".join(
                f"{f.env} is not kept: a test process ({_tests(f)}) is using it, and ends it"
                for f in busy) + "; nothing was stopped")  # fmt: skip
        stopped = _stop(chosen, every)
        print(f"envbox: {stopped} kept environment{'' if stopped == 1 else 's'} stopped")
        return 0
    kept = [f for f in every if f.kept]
    if kept and not yes:
        if stdin.isatty():
            yes = _confirm(kept, stdin)
            if not yes:
                print("envbox: the kept environments are left running")
        else:
            one = len(kept) == 1
            print(f"envbox: {len(kept)} kept environment{'' if one else 's'} left running, as there "
                  f"is no terminal to ask: {'; '.join(f.describe() for f in kept)}. Stop "
                  f"{'it' if one else 'them'} with `envbox clean {' '.join(f.env for f in kept)}`, "
                  "or every kept one with `envbox clean --yes`", file=sys.stderr)  # fmt: skip
    stopped = _stop(kept, every) if kept and yes else 0
    _clean_stale()
    if stopped:
        print(f"envbox: {stopped} kept environment{'' if stopped == 1 else 's'} stopped")
    return 0


def logs(name: str, env: str | None = None, follow: bool = False) -> int:
    """``envbox logs NAME [--env ID] [-f]``: print the log of service ``name`` of a live (a test
    is using it) or kept environment; with ``follow``, then what it writes, until its
    environment ends or Ctrl-C."""
    every = _lookup([env], environments()) if env is not None else environments()
    matches = [f for f in every if name in f.services]
    if not matches:
        where = f"environment {env}" if env is not None else "any live or kept environment"
        names = sorted({s for f in every for s in f.services})
        raise EnvboxError(f"no service {name!r} in {where} (services there: "
                          f"{', '.join(names) or 'none'}; `envbox ps` lists them)")  # fmt: skip
    if len(matches) > 1:
        raise EnvboxError(f"service {name!r} runs in {len(matches)} environments: "
                          f"{'; '.join(f.describe() for f in matches)}: choose one with --env ID")
    f = matches[0]
    path = f.services[name].get("log")
    if not path:
        raise EnvboxError(f"the record of environment {f.env} has no log file for {name!r} (a "
                          "run of an older envbox?)")  # fmt: skip
    try:
        log = open(path, "rb")  # noqa: SIM115 (held open to follow it)
    except OSError as e:
        raise EnvboxError(f"cannot read the log of {name!r} ({path}): {e.strerror or e}") from None
    with log, _pidfd(f.supervisor) as sup:
        _copy(log)
        if not follow or sup is None:
            return 0
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C ends it, quietly
        while True:
            # Woken when the supervisor ends (the environment with it), else to read what is new.
            ended = bool(select.select([sup], [], [], 0.25)[0])
            _copy(log)
            if ended or name not in _current_services(f):
                print(f"envbox: environment {f.env} has ended", file=sys.stderr)
                return 0


def _copy(log: Any) -> None:
    """What the file has past what was read: to stdout, in chunks."""
    out = sys.stdout.buffer
    while chunk := log.read(1 << 16):
        out.write(chunk)
    out.flush()


def _current_services(f: Found) -> dict[str, Any]:
    """The services the run's record lists for ``f``'s environment now (none once gone)."""
    for g in environments():
        if g.run == f.run and g.env == f.env:
            return g.services
    return {}
