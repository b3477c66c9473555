"""Run directories: named after their supervisor, so that a dead run's are told from a live one's.

Each supervisor's cgroups go in ``<own cgroup>/envbox-<pid>-<start time>`` (and its record for
``envbox ps`` is ``envbox-<pid>-<start time>.json``, see :mod:`pytest_envbox.supervisor.records`).
The start time makes the name unique on this boot even when pids are reused, so a later run (or
``envbox clean``) can tell a stale directory (its supervisor was SIGKILLed) from a live one.
"""

from __future__ import annotations

import contextlib
import os

from pytest_envbox.kernel.cgroups.cgroupfs import kill_dir, rmtree
from pytest_envbox.kernel.cgroups.delegation import v2_base
from pytest_envbox.kernel.cgroups.host import CgroupHost, detect
from pytest_envbox.wait import Deadline

__all__ = ["RUN_PREFIX", "clean_stale", "is_stale", "run_name"]

RUN_PREFIX = "envbox-"


def run_name(pid: int) -> str:
    """``envbox-<pid>-<start time>``: unique per process on this boot, and checkable for liveness."""
    return f"{RUN_PREFIX}{pid}-{_starttime(pid)}"


def _starttime(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "0"


def is_stale(name: str) -> bool:
    """Is the supervisor this run name names gone (dead, a zombie nobody reaped yet, or its pid
    reused by another process)? False for a name that is not one of ours."""
    try:
        pid_s, start = name[len(RUN_PREFIX):].split("-", 1)
        pid = int(pid_s)
    except ValueError:
        return False  # not one of ours: leave it alone
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return True
    return fields[0] in ("Z", "X") or fields[19] != start


def clean_stale(host: CgroupHost | None = None) -> list[str]:
    """Remove the run directories of supervisors that are gone (SIGKILLed); return what was removed.

    Only ``envbox-<pid>-<start>`` directories directly under our own cgroup, whose process is not
    alive: never a sibling's, never a live run's. Leftover processes in them are killed first.
    """
    host = host or detect()
    removed: list[str] = []
    owns = [*dict.fromkeys(host.v1.values()), *([v2_base(host.unified)] if host.unified else [])]
    for own in owns:
        try:
            names = [n for n in os.listdir(own) if n.startswith(RUN_PREFIX)]
        except OSError:
            continue
        for name in names:
            if not is_stale(name):
                continue
            run = os.path.join(own, name)
            with contextlib.suppress(OSError):
                kill_dir(run)
                rmtree(run, Deadline(2.0))
                removed.append(run)
    return removed
