"""Limits as the kernel takes them, and byte counts as a user reads them.

Apart from the backends because the engine's messages and reports use :func:`format_memory` too,
and importing it must not depend on which cgroup backend this host has.
"""

from __future__ import annotations

__all__ = ["CPU_PERIOD_US", "cpu_quota", "format_memory"]

CPU_PERIOD_US = 100_000


def cpu_quota(cores: float, period: int = CPU_PERIOD_US) -> tuple[int, int]:
    """``(quota_us, period_us)`` for ``cores`` (``0.25`` -> ``(25000, 100000)``); at least 1 ms."""
    if cores <= 0:
        raise ValueError(f"cpu must be > 0 cores, not {cores!r}")
    return max(1000, round(cores * period)), period


def format_memory(n: int) -> str:
    """A byte count the way a user would have written it: ``67108864`` -> ``"64Mi"``."""
    for unit, size in (("Gi", 1 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    for unit, size in (("G", 10**9), ("M", 10**6), ("k", 10**3)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)
