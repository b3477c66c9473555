"""The end-of-run figures: per service, over every environment of the run (and every xdist worker).

Pure functions over :meth:`~pytest_envbox.Environment.report` dicts, so that the terminal summary, the
``--envbox-report`` JSON and their tests need no running service.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pytest_envbox.kernel.cgroups import format_memory

__all__ = [
    "ServiceTotals",
    "enter_command",
    "kept",
    "table",
    "totals",
]

@dataclass
class ServiceTotals:
    """One row of the summary: a service's runs added up."""

    name: str
    starts: int = 0
    ready_seconds: list[float] = field(default_factory=list)
    memory_peak_bytes: int | None = None
    memory_limit: int | None = None
    cpu_seconds: float = 0.0
    oom_kills: int = 0

    @property
    def median_ready(self) -> float | None:
        return statistics.median(self.ready_seconds) if self.ready_seconds else None


def totals(reports: Iterable[Mapping[str, Any]]) -> list[ServiceTotals]:
    """Per service name, in order of first appearance: starts, times to ready, peak, cpu, OOMs."""
    rows: dict[str, ServiceTotals] = {}
    for env in reports:
        for name, svc in env.get("services", {}).items():
            row = rows.setdefault(name, ServiceTotals(name))
            limit = (svc.get("limits") or {}).get("memory")
            if limit is not None:
                row.memory_limit = max(row.memory_limit or 0, int(limit))
            for run in svc.get("runs", []):
                row.starts += 1
                if run.get("ready") is not None and run.get("started") is not None:
                    row.ready_seconds.append(float(run["ready"]) - float(run["started"]))
                peak = run.get("memory_peak_bytes")
                if peak is not None:
                    row.memory_peak_bytes = max(row.memory_peak_bytes or 0, int(peak))
                row.cpu_seconds += float(run.get("cpu_seconds") or 0.0)
                row.oom_kills += int(run.get("oom_kills") or 0)
    return list(rows.values())


def table(rows: list[ServiceTotals]) -> list[str]:
    """The terminal summary's lines (a header and one line per service)."""
    head = ("service", "starts", "ready (median)", "peak memory / limit", "cpu", "OOM kills")
    body = []
    for r in rows:
        ready = "-" if r.median_ready is None else f"{r.median_ready * 1000:.0f} ms"
        peak = "-" if r.memory_peak_bytes is None else _mib(r.memory_peak_bytes)
        limit = "no limit" if r.memory_limit is None else format_memory(r.memory_limit)
        body.append((r.name, str(r.starts), ready, f"{peak} / {limit}", f"{r.cpu_seconds:.2f} s",
                     str(r.oom_kills)))  # fmt: skip
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body, strict=True)]
    return ["  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
            for line in (head, *body)]  # fmt: skip


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f}Mi"


def enter_command(pid: int, rootless: bool = False) -> str:
    """How to get a shell inside a running service: its namespaces (the user namespace too in
    rootless mode, where you become its root), its root directory and working directory.

    Named one by one, not ``--all``: that would also join the host's time namespace, which a
    process inside a user namespace may no longer do."""
    user = "--user " if rootless else ""
    return (f"nsenter --target {pid} {user}--mount --uts --ipc --net --pid --cgroup "
            "--root --wd /bin/sh")


def kept(reports: Iterable[Mapping[str, Any]]) -> list[str]:
    """For each environment kept by ``--envbox-keep``: why, and per service how to reach it
    (published ports, log) and how to enter it; then how to remove them all."""
    lines = []
    for env in reports:
        if not env.get("kept"):
            continue
        lines.append(f"environment {env['id']} kept ({env['kept']}), network {env.get('subnet')}:")
        for name, svc in env.get("services", {}).items():
            pid = svc.get("pid")
            if pid is None:
                lines.append(f"  {name}: not running; log {svc.get('log')}")
                continue
            ports = ", ".join(f"{p} -> 127.0.0.1:{h}" for p, h in (svc.get("ports") or {}).items())
            lines.append(f"  {name}: pid {pid}, {svc.get('ip')}"
                         f"{', ' + ports if ports else ''}; log {svc.get('log')}")  # fmt: skip
            lines.append(f"    enter: {enter_command(int(pid), bool(env.get('rootless')))}")
    if lines:
        ids = " ".join(str(env["id"]) for env in reports if env.get("kept"))
        lines.append(f"remove kept environments with: envbox clean {ids}")
    return lines
