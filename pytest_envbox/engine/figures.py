"""What a service's runs add up to: ``Stats`` (now, from its cgroup) and ``Run`` (one per start).

Plain records, kept apart from the handle that fills them: the report, the summary and the
plugin's OOM notes read them.
"""

from __future__ import annotations

from dataclasses import dataclass

from pytest_envbox.kernel.cgroups import format_memory
from pytest_envbox.spec import Service

__all__ = ["Run", "Stats", "memory_limit_text"]


@dataclass(frozen=True)
class Stats:
    """A service's resource use, from its cgroup (see :meth:`ServiceHandle.stats`).

    ``memory_peak_bytes`` is the kernel's high-water mark where it keeps one (cgroup v1, and v2
    from Linux 5.19), otherwise the highest value seen by ``stats()`` calls. ``oom_kills`` counts
    processes of the service killed for exceeding its memory limit.
    """

    memory_bytes: int
    memory_peak_bytes: int
    cpu_seconds: float
    pids: int
    oom_kills: int


@dataclass(frozen=True)
class Run:
    """One start of a service (see :attr:`ServiceHandle.runs`): when it started, became ready and
    stopped, as Unix time (``time.time()``), and, once it has ended, how it ended and its cgroup's
    totals.

    ``ready`` is None until the readiness probe has passed (and stays None for a run that never
    became ready); ``stopped``, ``returncode``, ``memory_peak_bytes`` and ``cpu_seconds`` are None
    while it runs (the last two also without cgroups). ``oom_kills`` counts processes of the run
    killed for exceeding its memory limit. ``Environment.report()`` writes each run as a JSON
    object with these fields as keys, in this order.
    """

    started: float
    ready: float | None = None
    stopped: float | None = None
    returncode: int | None = None
    oom_kills: int = 0
    memory_peak_bytes: int | None = None
    cpu_seconds: float | None = None


def memory_limit_text(spec: Service) -> str:
    """The memory limit an OOM kill of ``spec``'s processes is blamed on, for messages:
    ``"memory limit 48Mi"``, or ``"memory limit of a parent cgroup"`` when it declares none."""
    limit = spec.limits.memory
    return f"memory limit {format_memory(limit) if limit else 'of a parent cgroup'}"
