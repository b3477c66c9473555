"""The host-wide record of live runs, for ``envbox ps`` and ``envbox clean``.

Each supervisor keeps one small JSON file, ``<state dir>/envbox-<pid>-<start time>.json``, saying
whose it is and which services it runs (pids, addresses); it is rewritten when that changes (when
the supervisor is idle, off any start's path) and removed when the supervisor ends. A file whose
supervisor is gone (SIGKILLed) is stale: the next supervisor, or ``envbox clean``, removes it.
Standard library only: the lean supervisor imports it. Writes are atomic (a temporary file,
renamed), so a reader never sees half a file. Every file goes through
:class:`~pytest_envbox.supervisor.statedir.StateDir`: a directory that is the user's alone, in
which no link is followed; and a record's list of directories to delete is only a list of
candidates, each removed only if it proves to be envbox's own.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from pytest_envbox.errors import HostUnsupported
from pytest_envbox.kernel.cgroups.runs import RUN_PREFIX, is_stale, run_name
from pytest_envbox.supervisor.protocol import Done, Handlers, KeepRequest, OwnDirRequest
from pytest_envbox.supervisor.rwlayers import remove_rw
from pytest_envbox.supervisor.statedir import StateDir, outer_uid, remove_temp_dir, state_dir

if TYPE_CHECKING:
    from pytest_envbox.supervisor.server import Supervisor

__all__ = ["RunRecord", "StateWriter", "clean_stale", "janitor", "remove", "runs", "state_dir",
           "write"]  # fmt: skip


def write(name: str, record: dict[str, Any], directory: str | None = None) -> None:
    """Write run ``name``'s record, replacing the last one at once (a reader never sees half)."""
    with StateDir.open(directory) as d:
        d.write(name + ".json", json.dumps(record).encode())


def remove(name: str, directory: str | None = None) -> None:
    with contextlib.suppress(FileNotFoundError), StateDir.open(directory, create=False) as d:
        d.unlink(name + ".json")


def runs(directory: str | None = None) -> list[tuple[str, dict[str, Any] | None]]:
    """Every record: (run name, its content), content None when its supervisor is gone."""
    try:
        d = StateDir.open(directory, create=False)
    except FileNotFoundError:
        return []
    with d:
        return _runs(d)


def _runs(d: StateDir) -> list[tuple[str, dict[str, Any] | None]]:
    names = sorted(n[:-5] for n in d.names() if n.startswith(RUN_PREFIX) and n.endswith(".json"))
    out: list[tuple[str, dict[str, Any] | None]] = []
    for name in names:
        if is_stale(name):
            out.append((name, None))
            continue
        data = d.read(name + ".json")
        if data is None:
            continue  # removed meanwhile
        try:
            record = json.loads(data)
        except ValueError:
            continue
        if isinstance(record, dict):
            out.append((name, record))
    return out


@contextlib.contextmanager
def janitor(directory: str | None = None) -> Iterator[bool]:
    """The janitor's lock: yields True for the one process (of all the xdist workers starting at
    once) that should clean up after dead runs now, False for the others, who need not wait.

    ``flock`` (stdlib: the lean supervisor cannot import ``filelock``); released at exit, even
    by SIGKILL. An unsafe state directory raises :class:`~pytest_envbox.errors.HostUnsupported`.
    """
    import fcntl

    fd = None
    with contextlib.suppress(OSError), StateDir.open(directory) as d:
        fd = d.lock_file("janitor.lock")
    if fd is None:
        yield True  # no lock file: clean anyway (cleaning is idempotent)
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def clean_stale(directory: str | None = None) -> list[str]:
    """Remove the records of supervisors that are gone, and the temporary directories they list
    (only those that prove to be envbox's, see :func:`~.statedir.remove_temp_dir`); return the
    paths removed."""
    try:
        d = StateDir.open(directory, create=False)
    except FileNotFoundError:
        return []
    removed = []
    with d:
        with contextlib.suppress(OSError):  # a supervisor killed while it wrote its record
            for n in d.names():
                if n.startswith(RUN_PREFIX) and n.endswith(".json.tmp") and is_stale(n[:-9]):
                    d.unlink(n)
        for name, record in _runs(d):
            if record is None:
                removed += _remove_dirs(d, name + ".json")
                if d.unlink(name + ".json"):
                    removed.append(os.path.join(d.path, name + ".json"))
    return removed


def _remove_dirs(d: StateDir, record_name: str) -> list[str]:
    """The temporary directories a dead run's record lists (an ``Environment`` without a
    ``workdir`` makes one): removed, if they prove to be ours."""
    try:
        dirs = json.loads(d.read(record_name) or b"{}").get("dirs") or []
    except (ValueError, AttributeError):
        return []
    gone = [remove_temp_dir(p) for p in dirs if isinstance(p, str)] if isinstance(dirs, list) else []
    return [p for p in gone if p is not None] + _remove_rw(d, record_name)


def _remove_rw(d: StateDir, record_name: str) -> list[str]:
    """The writable layers of a dead run's image services (see rwlayers.py)."""
    try:
        rw = json.loads(d.read(record_name) or b"{}").get("rw") or []
    except (ValueError, AttributeError):
        return []
    gone = [remove_rw(p) for p in rw if isinstance(p, str)] if isinstance(rw, list) else []
    return [p for p in gone if p is not None]


class RunRecord:
    """This supervisor's own record (for ``envbox ps``), rewritten when idle once ``dirty``;
    and the directories to delete if the test process dies before it can."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self.name = run_name(os.getpid())
        self.dirty = False
        self.dirs: set[str] = set()
        self.writer: StateWriter | None = None  # started on first use (after the zygote)

    def handlers(self) -> Handlers:
        return {OwnDirRequest: self.own_dir, KeepRequest: self.keep}

    def write(self) -> None:
        """This run's record for ``envbox ps``: whose it is, its services' pids and addresses."""
        self.dirty = False
        sup = self.sup
        envs: dict[str, dict[str, Any]] = {}
        for slot, s in sup.services.slots.items():
            env, _, name = slot.partition("/")
            envs.setdefault(env, {})[name] = {"pid": s.main_pid, "init": s.init_pid, "ip": s.ip,
                                              "log": s.log_path}  # fmt: skip
        tests = [sup.test_pid, *(p for p in sup.watched if p != sup.test_pid)]
        record = {"supervisor": os.getpid(), "owner": outer_uid(), "tests": tests,
                  "cwd": os.getcwd(), "environments": envs, "kept": sup.kept,
                  "dirs": sorted(self.dirs), "rw": sorted(sup.services.rw.values()),
                  "rootless": "in-userns" in sys.argv}  # fmt: skip
        if self.writer is None:
            self.writer = StateWriter(self.name)
        self.writer.put(record)

    def own_dir(self, req_id: int, req: OwnDirRequest) -> Done:
        """Directories to delete if the test process dies before it can.

        Recorded at once in the run's record: if this supervisor is SIGKILLed too, `envbox clean`
        (or the next run) removes them."""
        (self.dirs.add if req.own else self.dirs.discard)(req.path)
        self.write()
        return Done()

    def keep(self, req_id: int, req: KeepRequest) -> Done:
        """Keep environment ``env`` running after the test process ends (``--envbox-keep``)."""
        self.sup.kept[req.env] = req.why
        self.dirty = True
        return Done()

    def close(self) -> None:
        """The owned directories go, then the record (its last write done first)."""
        for d in self.dirs:
            remove_temp_dir(d)  # a path the test process sent: removed only if it proves ours
        self.dirs.clear()
        if self.writer is not None:
            self.writer.close()  # its last write done before the record goes
        with contextlib.suppress(OSError, HostUnsupported):
            remove(self.name)


class StateWriter:
    """Writes the run's record on a thread of its own, the newest version only.

    A write is a file replaced by rename, which on ext4 (``auto_da_alloc``) waits for the new
    file's data to reach the disk: a millisecond or more under I/O load, which a request on the
    loop would otherwise wait out (every ``open()`` of an environment records its directory).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.cond = threading.Condition()
        self.record: dict[str, Any] | None = None
        self.closed = False
        self.thread = threading.Thread(target=self._run, name="state", daemon=True)
        self.thread.start()

    def put(self, record: dict[str, Any]) -> None:
        with self.cond:
            self.record = record  # an older one not yet written is superseded
            self.cond.notify()

    def _run(self) -> None:
        while True:
            with self.cond:
                while self.record is None and not self.closed:
                    self.cond.wait()
                record, self.record = self.record, None
                if record is None:
                    return  # closed, and nothing left to write
            with contextlib.suppress(OSError, HostUnsupported):  # (refused at hello already)
                write(self.name, record)

    def close(self) -> None:
        """Write what is pending, then stop."""
        with self.cond:
            self.closed = True
            self.cond.notify()
        self.thread.join(timeout=5)
