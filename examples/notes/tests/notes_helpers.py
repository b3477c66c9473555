"""Small helpers shared by the notes tests: waiting on a condition, asking the kernel."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def wait_until(condition: Callable[[], T], *, timeout: float, what: str) -> T:
    """Call ``condition`` until it returns something true, and return that; fail after ``timeout``.

    The short pause between two calls is a poll interval, not a synchronisation: the outcome
    depends only on the condition becoming true before the deadline.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"after {timeout} s, still not true: {what} (last: {result!r})")
        time.sleep(0.05)


def kernel_memory_limit(pid: int) -> int:
    """The memory limit of the cgroup of host process ``pid``, as the kernel has it (v1 or v2)."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):  # cgroup v1 (and hybrid): the memory hierarchy
            return int(Path(f"/sys/fs/cgroup/memory{path}/memory.limit_in_bytes").read_text())
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        if line.startswith("0::"):  # cgroup v2: the unified hierarchy
            return int(Path(f"/sys/fs/cgroup{line[3:]}/memory.max").read_text())
    raise LookupError(f"no memory cgroup for pid {pid}")
