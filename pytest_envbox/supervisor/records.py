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
from collections.abc import Iterator
from typing import Any

from pytest_envbox.kernel.cgroups.runs import RUN_PREFIX, is_stale


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
