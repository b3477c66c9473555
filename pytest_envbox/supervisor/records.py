"""The host-wide record of live runs, for ``envbox ps`` and ``envbox clean``.

Each supervisor keeps one small JSON file, ``<state dir>/envbox-<pid>-<start time>.json``, saying
whose it is and which services it runs (pids, addresses); it is rewritten when that changes (when
the supervisor is idle, off any start's path) and removed when the supervisor ends. A file whose
supervisor is gone (SIGKILLed) is stale: the next supervisor, or ``envbox clean``, removes it.
Standard library only: the lean supervisor imports it. Writes are atomic (a temporary file,
renamed), so a reader never sees half a file.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from pytest_envbox.kernel.cgroups.runs import RUN_PREFIX, is_stale, run_name
from pytest_envbox.supervisor.protocol import Done, Handlers, KeepRequest, OwnDirRequest

if TYPE_CHECKING:
    from pytest_envbox.supervisor.server import Supervisor

__all__ = ["RunRecord", "StateWriter", "clean_stale", "janitor", "outer_uid", "remove", "runs",
           "state_dir", "write"]  # fmt: skip


def outer_uid() -> int:
    """Our uid on the host, also inside a user namespace (rootless mode: root in there)."""
    uid = os.geteuid()
    if uid == 0:
        try:
            with open("/proc/self/uid_map") as f:
                inside, outside, _count = f.readline().split()
            if inside == "0":
                return int(outside)
        except (OSError, ValueError):
            pass
    return uid


def state_dir() -> str:
    """Where the records are: ``/run/envbox`` for root, the user's runtime directory otherwise."""
    uid = outer_uid()
    if uid == 0:
        return "/run/envbox"
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return os.path.join(runtime, "envbox")
    return f"/tmp/envbox-{uid}"


def write(name: str, record: dict[str, Any], directory: str | None = None) -> None:
    d = directory or state_dir()
    os.makedirs(d, mode=0o755, exist_ok=True)
    path = os.path.join(d, name + ".json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f)
    os.replace(tmp, path)


def remove(name: str, directory: str | None = None) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(directory or state_dir(), name + ".json"))


def runs(directory: str | None = None) -> list[tuple[str, dict[str, Any] | None]]:
    """Every record: (run name, its content), content None when its supervisor is gone."""
    d = directory or state_dir()
    try:
        names = sorted(n[:-5] for n in os.listdir(d) if n.startswith(RUN_PREFIX) and n.endswith(".json"))
    except FileNotFoundError:
        return []
    out: list[tuple[str, dict[str, Any] | None]] = []
    for name in names:
        if is_stale(name):
            out.append((name, None))
            continue
        try:
            with open(os.path.join(d, name + ".json")) as f:
                out.append((name, json.load(f)))
        except (OSError, ValueError):
            continue  # removed meanwhile
    return out


@contextlib.contextmanager
def janitor(directory: str | None = None) -> Iterator[bool]:
    """The janitor's lock: yields True for the one process (of all the xdist workers starting at
    once) that should clean up after dead runs now, False for the others, who need not wait.

    ``flock`` (stdlib: the lean supervisor cannot import ``filelock``); released at exit, even
    by SIGKILL.
    """
    import fcntl

    d = directory or state_dir()
    try:
        os.makedirs(d, mode=0o755, exist_ok=True)
        fd = os.open(os.path.join(d, "janitor.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError:
        yield True  # no state directory: clean anyway (cleaning is idempotent)
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
    """Remove the records of supervisors that are gone; return their paths."""
    d = directory or state_dir()
    removed = []
    with contextlib.suppress(OSError):  # a supervisor killed while it wrote its record
        for n in os.listdir(d):
            if n.startswith(RUN_PREFIX) and n.endswith(".json.tmp") and is_stale(n[:-9]):
                os.unlink(os.path.join(d, n))
    for name, record in runs(d):
        if record is None:
            path = os.path.join(d, name + ".json")
            removed += _remove_dirs(path)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                removed.append(path)
    return removed


def _remove_dirs(record_path: str) -> list[str]:
    """The temporary directories a dead run's record lists (an ``Environment`` without a
    ``workdir`` makes one): removed, if they still look like ours."""
    import shutil
    import tempfile

    try:
        with open(record_path) as f:
            dirs = json.load(f).get("dirs") or []
    except (OSError, ValueError, AttributeError):
        return []
    tmp = os.path.realpath(tempfile.gettempdir())
    gone = []
    for d in dirs:
        real = os.path.realpath(str(d))
        # Only what envbox makes: tempfile.mkdtemp(prefix="envbox-") in the temporary directory.
        if os.path.dirname(real) == tmp and os.path.basename(real).startswith("envbox-") \
                and os.path.isdir(real) and not os.path.islink(str(d)):  # fmt: skip
            shutil.rmtree(real, ignore_errors=True)
            gone.append(real)
    return gone


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
            envs.setdefault(env, {})[name] = {"pid": s.main_pid, "init": s.init_pid, "ip": s.ip}
        tests = [sup.test_pid, *(p for p in sup.watched if p != sup.test_pid)]
        record = {"supervisor": os.getpid(), "owner": outer_uid(), "tests": tests,
                  "cwd": os.getcwd(), "environments": envs, "kept": sup.kept,
                  "dirs": sorted(self.dirs),
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
        import shutil  # only here: the supervisor stays small, and so do its forks

        for d in self.dirs:
            shutil.rmtree(d, ignore_errors=True)
        self.dirs.clear()
        if self.writer is not None:
            self.writer.close()  # its last write done before the record goes
        with contextlib.suppress(OSError):
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
            with contextlib.suppress(OSError):
                write(self.name, record)

    def close(self) -> None:
        """Write what is pending, then stop."""
        with self.cond:
            self.closed = True
            self.cond.notify()
        self.thread.join(timeout=5)
