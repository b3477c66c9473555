"""The notes API under load stays within its memory limit, and keeps answering.

The API is declared with ``limits = { memory = "128Mi", pids = 48 }``: past that, the kernel kills
it. It is built to stay bounded (at most ``WORKERS`` requests at once, a body over ``MAX_BODY``
discarded in small chunks, never held whole); this test checks that the design holds with
thousands of concurrent requests, some with large bodies and some far too large. It can fail: set
``MAX_BODY = "16777216"`` in pyproject.toml (the API then reads the 8 MiB bodies whole) and the
API is OOM-killed half-way, which the test's report shows in an ``envbox: OOM`` section.
"""

from __future__ import annotations

import collections
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from notes_helpers import kernel_memory_limit

from pytest_envbox import Environment

pytestmark = pytest.mark.envbox("api", scope="module")

REQUESTS = 3000
CLIENTS = 32
LARGE = 512 * 2**10  # under MAX_BODY (1 MiB): stored
TOO_LARGE = 8 * 2**20  # over MAX_BODY: refused with 413


def text(size: int) -> str:
    line = "All work and no play makes a large note. "
    return (line * (size // len(line) + 1))[:size]


def test_thousands_of_concurrent_requests_stay_within_the_memory_limit(envbox: Environment) -> None:
    api, db, cache = envbox["api"], envbox["db"], envbox["cache"]
    limit = api.spec.limits.memory
    assert limit == 128 * 2**20
    assert kernel_memory_limit(api.pid) == limit  # what the kernel enforces, read from its cgroup

    # Notes to read: small ones (cached after one read) and large ones.
    small = [api.http.post("/notes", json={"title": f"small {i}", "body": "x" * 200}, timeout=10).json()
             for i in range(20)]  # fmt: skip
    large = [api.http.post("/notes", json={"title": f"large {i}", "body": text(LARGE)}, timeout=10).json()
             for i in range(4)]  # fmt: skip
    for note in small:
        assert api.http.get(f"/notes/{note['id']}", timeout=10).status_code == 200
    before, pid = api.stats(), api.pid

    large_body = {"title": "large", "body": text(LARGE)}
    too_large = b'{"title": "too large", "body": "' + b"x" * TOO_LARGE + b'"}'
    sessions = threading.local()

    def one(i: int) -> tuple[str, int]:
        """Request number i of a fixed mix; returns (kind, status)."""
        http = getattr(sessions, "http", None) or requests.Session()
        sessions.http = http
        url, kind = api.url, i % 50
        if kind < 20:
            r = http.get(url(f"/notes/{small[i % len(small)]['id']}"), timeout=30)
            return "get cached", r.status_code
        if kind < 30:
            r = http.post(url("/notes"), json={"title": f"load {i}", "body": "y" * 500}, timeout=30)
            return "post small", r.status_code
        if kind < 35:
            r = http.post(url("/notes"), json=large_body, timeout=30)
            return "post large", r.status_code
        if kind < 40:
            r = http.get(url(f"/notes/{large[i % len(large)]['id']}"), timeout=30)
            return "get large", r.status_code
        if kind < 44:
            r = http.put(url(f"/notes/{small[i % len(small)]['id']}"),
                         json={"title": f"small {i}", "body": "z" * 300}, timeout=30)  # fmt: skip
            return "put small", r.status_code
        if kind < 48:
            return "list", http.get(url("/notes?limit=100"), timeout=30).status_code
        if kind < 49:
            return "health", http.get(url("/health"), timeout=30).status_code
        r = http.post(url("/notes"), data=too_large, timeout=30, headers={"Content-Type": "application/json"})
        return "post too large", r.status_code

    with ThreadPoolExecutor(max_workers=CLIENTS) as pool:
        outcomes = collections.Counter(pool.map(one, range(REQUESTS)))

    expected = {"get cached": 200, "post small": 201, "post large": 201, "get large": 200,
                "put small": 200, "list": 200, "health": 200, "post too large": 413}  # fmt: skip
    unexpected = {outcome: n for outcome, n in outcomes.items() if expected[outcome[0]] != outcome[1]}
    assert not unexpected, f"unexpected answers (kind, status): count: {unexpected}"
    assert sum(outcomes.values()) == REQUESTS

    stats = api.stats()
    assert stats.cpu_seconds > before.cpu_seconds  # the load did reach it
    assert stats.oom_kills == 0, "the API was OOM-killed under load"
    assert stats.memory_peak_bytes <= limit
    assert stats.pids <= api.spec.limits.pids
    assert api.running and api.pid == pid and len(api.runs) == 1  # the same process, never restarted
    assert api.http.get("/health", timeout=10).json() == {"status": "ok", "db": "up", "cache": "up"}

    # Every write that was answered 201 is in the database, no more, no less.
    posted = outcomes["post small", 201] + outcomes["post large", 201]
    count = db.exec(["psql", "-X", "-At", "-c", "SELECT count(*) FROM notes WHERE title LIKE 'l%'"])
    assert count.stdout == f"{posted + len(large)}\n", count.stderr
    # The servers behind it held up too.
    assert db.stats().oom_kills == 0 and cache.stats().oom_kills == 0
    print(f"\napi under load: peak {stats.memory_peak_bytes / 2**20:.1f} MiB of {limit / 2**20:.0f} MiB, "
          f"{stats.cpu_seconds - before.cpu_seconds:.1f} cpu s; db peak "
          f"{db.stats().memory_peak_bytes / 2**20:.1f} MiB; {dict(outcomes)}")  # fmt: skip
