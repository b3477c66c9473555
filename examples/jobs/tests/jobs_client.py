"""Helpers for the tests: talk to the system as a client would, and wait for conditions.

Nothing here sleeps for a fixed time to let something happen: ``wait_until`` polls a condition
until it holds, and fails with the last value it saw once its deadline has passed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

from pytest_envbox import ServiceHandle

T = TypeVar("T")


def wait_until(check: Callable[[], T], *, timeout: float = 10.0, interval: float = 0.02,
               what: str = "the condition") -> T:  # fmt: skip
    """Call ``check`` until it returns something truthy; return that. AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not hold within {timeout}s (last value: {value!r})")
        time.sleep(interval)  # the pause between two checks of the condition, not a guess


def submit(entrance: ServiceHandle, op: str, payload: object) -> str:
    """POST a job through ``entrance`` (the gateway, or the api itself); return its id."""
    response = entrance.http.post("/jobs", json={"op": op, "payload": payload}, timeout=10)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def job(entrance: ServiceHandle, job_id: str) -> dict[str, Any]:
    response = entrance.http.get(f"/jobs/{job_id}", timeout=10)
    assert response.status_code == 200, response.text
    return dict(response.json())


def wait_for_job(entrance: ServiceHandle, job_id: str, *, timeout: float = 10.0,
                 status: tuple[str, ...] = ("done", "failed")) -> dict[str, Any]:  # fmt: skip
    """Poll GET /jobs/<id> until its status is one of ``status``; return the job."""

    def finished() -> dict[str, Any] | None:
        current = job(entrance, job_id)
        return current if current["status"] in status else None

    return wait_until(finished, timeout=timeout, what=f"job {job_id} in status {'/'.join(status)}")


def redis_cli(redis: ServiceHandle, *args: str) -> str:
    """Run redis-cli inside the redis service (its own loopback: 127.0.0.1:6379); return its output."""
    result = redis.exec(["redis-cli", *args], timeout=10)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()
