"""Control files and directories of the cgroup filesystem, as every backend and the run tree use them.

Raw ``os.open``/``os.read``/``os.write`` rather than ``open()``: a write is one ``write(2)``
whose error is the kernel's answer (a limit below current use, a process that is gone), where a
buffered file would report it only at close; and the lean supervisor pays no buffering layer.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal

from pytest_envbox.wait import Deadline, wait_until

__all__ = ["RETRY", "keyed", "kill_dir", "make_dirs", "read", "read_int", "remove_all", "rmdir", "rmtree",
           "thaw_tree", "tree_pids", "write"]  # fmt: skip

#: The pause between two looks at a cgroup that the kernel is still emptying or removing: short,
#: since that takes it well under a millisecond, and a stop or a restart waits for it.
RETRY = 0.001


def write(path: str, value: str) -> None:
    """Write ``value`` to a control file, in one system call (never creates the file)."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def read(path: str) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):  # cgroup files give at most a page per read
            chunks.append(chunk)
        return b"".join(chunks).decode()
    finally:
        os.close(fd)


def read_int(path: str) -> int | None:
    """The first number in a file (``memory.current``...), None if it is missing or unreadable."""
    try:
        return int(read(path).split()[0])
    except (OSError, ValueError, IndexError):
        return None


def keyed(path: str, key: str) -> int | None:
    """The value of ``key`` in a flat-keyed file (``memory.events``, ``cpu.stat``...)."""
    try:
        for line in read(path).splitlines():
            k, _, v = line.partition(" ")
            if k == key:
                return int(v)
    except (OSError, ValueError):
        pass
    return None


def rmdir(path: str, deadline: Deadline) -> None:
    """Remove a cgroup directory; an emptied cgroup can take a moment to become removable (EBUSY)."""

    def removed() -> bool | None:
        try:
            os.rmdir(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            if e.errno != errno.EBUSY:
                raise
            return None
        return True

    if wait_until(removed, deadline, interval=RETRY) is None:
        raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), path)


def rmtree(d: str, deadline: Deadline) -> None:
    """Remove a cgroup and the cgroups below it, deepest first (cgroupfs has no recursive rmdir).

    One rmdir first: a service's cgroup rarely has cgroups below it, and walking a cgroup
    directory (dozens of control files in each v1 hierarchy) costs more than removing it.
    """
    try:
        os.rmdir(d)
        return
    except FileNotFoundError:
        return
    except OSError as e:
        if e.errno not in (errno.EBUSY, errno.ENOTEMPTY):
            raise
    for sub, _dirs, _files in os.walk(d, topdown=False):
        rmdir(sub, deadline)


def tree_pids(d: str) -> list[int]:
    """Every process in cgroup ``d`` and in the cgroups below it."""
    pids: list[int] = []
    for sub, _dirs, _files in os.walk(d):
        with contextlib.suppress(OSError, ValueError):
            pids.extend(int(p) for p in read(f"{sub}/cgroup.procs").split())
    return pids


def thaw_tree(d: str) -> None:
    """THAWED into every v1 freezer cgroup from ``d`` down (a frozen task dies only once thawed)."""
    for sub, _dirs, _files in os.walk(d):
        with contextlib.suppress(OSError):
            write(f"{sub}/freezer.state", "THAWED")


def kill_dir(d: str) -> None:
    """SIGKILL everything in ``d`` and below, then wait (briefly) until it is gone."""
    if os.path.exists(f"{d}/cgroup.kill"):
        with contextlib.suppress(OSError):
            write(f"{d}/cgroup.kill", "1")
    else:
        for pid in tree_pids(d):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        thaw_tree(d)
    wait_until(lambda: None if tree_pids(d) else True, Deadline(2.0), interval=RETRY)


def make_dirs(paths: list[str]) -> None:
    """Make each directory, or none: the ones made are removed again if one fails (OSError)."""
    made: list[str] = []
    try:
        for d in paths:
            os.mkdir(d)
            made.append(d)
    except OSError:
        for d in reversed(made):
            with contextlib.suppress(OSError):
                os.rmdir(d)
        raise


def remove_all(dirs: list[str]) -> None:
    """Remove run directories with anything still below them (ours alone), killing what is left;
    never raises (what cannot be removed stays, for the next run's :func:`~.runs.clean_stale`)."""
    deadline = Deadline(2.0)
    for d in dirs:
        with contextlib.suppress(OSError):
            if any(os.path.isdir(os.path.join(d, n)) for n in os.listdir(d)):
                kill_dir(d)
            rmtree(d, deadline)
