"""The interface every cgroup backend implements, and what callers get back from it.

Two levels, as in crun's cgroup managers and youki's ``CgroupManager``: a :class:`CgroupBackend`
is this run's directories in the hierarchies the host has, and makes a :class:`ServiceCgroup` for
each run of a service; that one is limited, placed into, measured, frozen, killed and removed.
What differs between v2, v1 and hybrid hosts is in the abstract methods; what is the same (undoing
a half-done freeze, the freeze-kill-thaw fallback, waiting for the processes to die before
removing) is written once here.
"""

from __future__ import annotations

import contextlib
import os
import signal
from abc import ABC, abstractmethod
from typing import ClassVar, NamedTuple, final

from pytest_envbox.kernel.cgroups.cgroupfs import RETRY, rmtree, write
from pytest_envbox.wait import Deadline, wait_until

__all__ = ["FREEZE_POLL", "NOWHERE", "CgroupBackend", "CgroupError", "CgroupsUnavailable", "Placement",
           "ServiceCgroup", "Usage"]  # fmt: skip

#: The pause between two looks at a freezer that is not done yet: a freeze usually completes in
#: well under a millisecond, and a pause() or a stop waits for it.
FREEZE_POLL = 0.0005


class CgroupError(Exception):
    """A cgroup operation could not be done: no freezer here, a freeze that did not complete..."""


class CgroupsUnavailable(CgroupError):
    """This run has no cgroups (the disabled backend); the message says why and how to fix it.

    The one error of the disabled backend: callers catch it where a missing cgroup matters (limits
    declared, ``stats()`` asked for) and never test a message to find out.
    """


@final
class Placement:
    """How a new process gets into a service's cgroup, as the cgroup's backend decided.

    One way at most:

    - ``cgroup_fd`` (cgroup v2): the cgroup's directory, open. The process is cloned straight in
      (``clone3`` with ``CLONE_INTO_CGROUP``, Linux 5.7): it never moves, so it never waits for the
      RCU grace period a move costs (``cgroup_threadgroup_rwsem``, about 6 ms on an idle kernel).
      Its creator closes the fd (:meth:`close`) once the process is cloned.
    - ``procs``: the ``cgroup.procs`` file of each hierarchy; the process writes itself in
      (:meth:`enter`) before it does anything that counts, and every child it has from then on
      is in the cgroup too.
    - neither (:data:`NOWHERE`): no cgroup; the process stays where it is.
    """

    __slots__ = ("cgroup_fd", "procs")

    def __init__(self, cgroup_fd: int | None = None, procs: tuple[str, ...] = ()) -> None:
        self.cgroup_fd = cgroup_fd
        self.procs = procs

    def open_procs(self) -> list[int]:
        """``procs`` opened for writing (close-on-exec), for a process that cannot open them itself:
        a spare gets them from the zygote over a socket, and writes ``0`` into each."""
        fds: list[int] = []
        try:
            for path in self.procs:
                fds.append(os.open(path, os.O_WRONLY | os.O_CLOEXEC))
        except OSError:
            for fd in fds:
                os.close(fd)
            raise
        return fds

    def enter(self) -> None:
        """Move the calling process into the cgroup through ``procs`` (with ``cgroup_fd``, the
        clone that creates the process does it instead, and this does nothing)."""
        for path in self.procs:
            write(path, "0")

    def close(self) -> None:
        """Close ``cgroup_fd``: the process was cloned (its creator's copy is not needed any more)."""
        if self.cgroup_fd is not None:
            os.close(self.cgroup_fd)
            self.cgroup_fd = None


#: No cgroup: a process placed so stays where it is.
NOWHERE = Placement()


class Usage(NamedTuple):
    """What a backend reads of a cgroup's use; :meth:`ServiceCgroup.stats` adds the sampled peak."""

    memory: int
    #: the kernel's own peak, where it keeps one (cgroup v2 from Linux 5.19, v1); else None
    peak: int | None
    cpu_seconds: float
    pids: int


class ServiceCgroup(ABC):
    """One service's cgroup for one run, in every hierarchy its backend uses.

    Callers use :meth:`set_limits`, :meth:`placement` or :meth:`add`, :meth:`stats`,
    :meth:`freeze`, :meth:`kill`, :meth:`is_empty` and :meth:`remove`. A backend implements the
    abstract methods (its files); the rest is common to all.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.peak = 0  # sampled, where the kernel keeps no peak
        self.frozen = False  # paused: signals wait until it is thawed, exec would hang

    # --- what each backend implements ------------------------------------------------------------

    @abstractmethod
    def set_limits(self, memory: int | None, cpu: float | None, pids: int | None) -> None:
        """Write the limits; raise OSError when the kernel refuses one (say, below current use).

        ``memory`` in bytes (swap none), ``cpu`` in cores, ``pids`` the most processes at once;
        None leaves that one unlimited.
        """

    @abstractmethod
    def placement(self, *, clone: bool = True) -> Placement:
        """How a new process gets into this cgroup from its first instruction (see :class:`Placement`).

        ``clone``: its creator can clone it in (``clone3``: the zygote, an ``exec`` helper);
        False for a plain ``fork``. On cgroup v2 it opens the cgroup's directory (one ``open``);
        elsewhere it opens nothing.
        """

    @abstractmethod
    def add(self, pid: int) -> None:
        """Move a running process (and so every child it will have) into this cgroup."""

    @abstractmethod
    def usage(self) -> Usage:
        """Current memory, the kernel's peak, CPU time and processes (0 for a figure not kept)."""

    @abstractmethod
    def oom_kills(self) -> int:
        """How many processes the kernel's OOM killer killed in this cgroup."""

    @abstractmethod
    def pids(self) -> list[int]:
        """Every process in the cgroup and in any cgroup the service made below it."""

    @abstractmethod
    def is_empty(self) -> bool:
        """No process left in the cgroup (or below it)."""

    @abstractmethod
    def set_frozen(self, frozen: bool, timeout: float) -> None:
        """Switch the kernel's freezer and wait until it says it is done; CgroupError on timeout
        or without a freezer. Callers use :meth:`freeze`, which also undoes a half-done freeze."""

    @abstractmethod
    def kill_switch(self) -> bool:
        """SIGKILL every process at once where the kernel can (``cgroup.kill``, Linux 5.14);
        False where it cannot, and :meth:`kill` freezes, kills each and thaws instead."""

    @abstractmethod
    def directories(self) -> list[str]:
        """This cgroup's directory in each hierarchy, each once: what :meth:`remove` removes."""

    @abstractmethod
    def thaw_below(self) -> None:
        """Thaw any cgroup the service froze below its own, after :meth:`kill`'s SIGKILLs (a task
        frozen by the v1 freezer dies only once thawed)."""

    # --- common to every backend -----------------------------------------------------------------

    def stats(self) -> dict[str, int | float]:
        """The run's figures so far: ``memory_bytes``, ``memory_peak_bytes``, ``cpu_seconds``,
        ``pids``, ``oom_kills``. The peak is sampled here too, where the kernel keeps none."""
        u = self.usage()
        self.peak = max(self.peak, u.memory, u.peak or 0)
        return {"memory_bytes": u.memory, "memory_peak_bytes": self.peak, "cpu_seconds": u.cpu_seconds,
                "pids": u.pids, "oom_kills": self.oom_kills()}  # fmt: skip

    def freeze(self, frozen: bool, timeout: float = 5.0) -> None:
        """Stop (or restart) every process of the cgroup; return once the kernel says it is done.

        A freeze that does not complete in time (a process stuck in the kernel) is undone before
        the error is raised: a half-frozen service is worse than one that was never paused.
        """
        try:
            self.set_frozen(frozen, timeout)
        except (CgroupError, OSError):
            if frozen:
                try:
                    self.set_frozen(False, 1.0)
                except (CgroupError, OSError):
                    self.frozen = True  # perhaps frozen still: every later step thaws first
                    raise
            raise
        self.frozen = frozen

    def kill(self) -> None:
        """SIGKILL every process in the cgroup (and below), race-free: nothing can fork meanwhile."""
        if self.kill_switch():
            return
        # Freeze, kill each task, thaw: a frozen task cannot fork, and dies once thawed. The thaw
        # happens whatever the freeze did (it may have half-worked), down to any cgroup the
        # service froze below its own.
        try:
            with contextlib.suppress(CgroupError, OSError):
                self.set_frozen(True, 1.0)
            for pid in self.pids():
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        finally:
            with contextlib.suppress(CgroupError, OSError):
                self.set_frozen(False, 1.0)
            self.thaw_below()
            self.frozen = False

    def remove(self, timeout: float = 5.0) -> bool:
        """Kill what is left, then remove the directories, the service's own sub-cgroups first.

        Return False (and leave them) when the processes did not die within ``timeout``.
        """
        deadline = Deadline(timeout)
        if not self.is_empty():
            self.kill()
            if wait_until(lambda: True if self.is_empty() else None, deadline, interval=RETRY) is None:
                return False
        ok = True
        for d in self.directories():
            try:
                rmtree(d, deadline)
            except OSError:
                ok = False
        return ok


class CgroupBackend(ABC):
    """This run's directory in each hierarchy the host offers, and how services' cgroups are made there.

    One per supervisor, chosen by :func:`~pytest_envbox.kernel.cgroups.tree.open_backend` once its
    run directories are made (or the disabled one, which says why they could not be).
    """

    #: ``"v2"``, ``"v1"``, ``"hybrid"`` or ``"disabled"``
    kind: ClassVar[str]
    #: a dry run (``envbox doctor``) found that a real one would first move the test run's
    #: processes into a leaf (see :func:`~pytest_envbox.kernel.cgroups.delegation.vacate`)
    would_move: bool = False

    @property
    def problem(self) -> str | None:
        """Why this run has no cgroups, and how to fix that (the disabled backend); else None.
        For people (``envbox doctor``, the supervisor's greeting): code catches
        :class:`CgroupsUnavailable` instead."""
        return None

    def require(self) -> None:
        """Raise :class:`CgroupsUnavailable` where there are no cgroups; nothing otherwise."""
        return None  # every backend but the disabled one makes cgroups

    @abstractmethod
    def new(self, name: str) -> ServiceCgroup:
        """Make the cgroup ``<run directory>/<name>`` in every hierarchy (all or none: OSError)."""

    @abstractmethod
    def run_dirs(self) -> list[str]:
        """This run's directories, each once: removed, with anything left below, at the end."""

    @abstractmethod
    def can_freeze(self) -> bool:
        """Whether a service's cgroup here can be frozen (``pause()``): for ``envbox doctor``."""
