"""How the notes API copes when a dependency goes away, and comes back.

The faults are real: ``link.down()`` takes the database's network interface down (its ``eth0``
loses carrier), ``network.partition()`` drops every packet between two groups of services,
``stop()`` ends the cache's process. Nothing in the API is mocked; the tests only watch what a
client would see, and how fast it sees it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import requests
from notes_helpers import wait_until

from pytest_envbox import Environment, ServiceHandle

pytestmark = pytest.mark.envbox("api", scope="module")

#: Without its timeouts the API would wait minutes for TCP to give up; with them, a request that
#: needs the unreachable database is answered 503 within seconds (2 s TCP user timeout or 2 s
#: connect timeout, plus slack for a loaded machine).
QUICKLY = 6.0


def timed(call: Any, *args: Any, **kwargs: Any) -> tuple[requests.Response, float]:
    start = time.monotonic()
    response = call(*args, timeout=30, **kwargs)
    return response, time.monotonic() - start


def create(api: ServiceHandle, title: str) -> dict[str, Any]:
    response = api.http.post("/notes", json={"title": title, "body": f"body of {title}"}, timeout=10)
    assert response.status_code == 201, response.text
    note: dict[str, Any] = response.json()
    return note


def healthy(api: ServiceHandle) -> bool:
    response = api.http.get("/health", timeout=30)
    return response.status_code == 200 and response.json()["status"] == "ok"


@pytest.fixture
def notes(envbox: Environment) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """Two notes: the first one read once (so cached), the second never read (not cached)."""
    api = envbox["api"]
    wait_until(lambda: healthy(api), timeout=20, what="the API and its dependencies are healthy")
    cached, uncached = create(api, "cached"), create(api, "uncached")
    assert api.http.get(f"/notes/{cached['id']}", timeout=10).headers["X-Cache"] == "miss"
    yield cached, uncached


def assert_db_unavailable(response: requests.Response, elapsed: float) -> None:
    assert response.status_code == 503, response.text
    assert response.json()["error"] == "database unavailable"
    assert response.json()["dependency"] == "db"
    assert elapsed < QUICKLY


def test_with_the_database_link_down_cached_notes_are_served_and_the_rest_fails_fast(
    envbox: Environment, notes: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    api, db = envbox["api"], envbox["db"]
    cached, uncached = notes

    db.link.down()
    try:
        # The kernel agrees: the database's interface has no carrier (seen from inside it).
        assert "NO-CARRIER" in db.exec(["ip", "-o", "link", "show", "eth0"]).stdout

        # A cached note does not need the database at all.
        response, elapsed = timed(api.http.get, f"/notes/{cached['id']}")
        assert (response.status_code, response.headers["X-Cache"]) == (200, "hit")
        assert response.json() == cached
        assert elapsed < 1

        # Everything else needs it: a 503 that names the database, and quickly.
        assert_db_unavailable(*timed(api.http.post, "/notes", json={"title": "lost"}))
        assert_db_unavailable(*timed(api.http.get, f"/notes/{uncached['id']}"))
        assert_db_unavailable(*timed(api.http.get, "/notes"))
        assert_db_unavailable(*timed(api.http.delete, f"/notes/{cached['id']}"))

        response, elapsed = timed(api.http.get, "/health")
        assert response.status_code == 503
        assert response.json()["db"] == "down" and response.json()["cache"] == "up"
        assert elapsed < QUICKLY

        # The database itself is fine, only unreachable: inside its sandbox, psql still works,
        # and the write refused above never reached it.
        rows = db.exec(["psql", "-X", "-At", "-c", "SELECT title FROM notes ORDER BY id"])
        assert rows.returncode == 0, rows.stderr
        assert "lost" not in rows.stdout.split("\n") and "uncached" in rows.stdout
    finally:
        db.link.up()

    # It recovers by itself: no restart, the next requests reconnect.
    wait_until(lambda: healthy(api), timeout=20, what="/health says ok again after link.up()")
    assert create(api, "after the outage")["title"] == "after the outage"
    response = api.http.get(f"/notes/{uncached['id']}", timeout=10)
    assert (response.status_code, response.headers["X-Cache"]) == (200, "miss")
    assert api.running and api.stats().oom_kills == 0


def test_a_partition_cuts_the_api_off_from_the_database_only(
    envbox: Environment, notes: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    api, db = envbox["api"], envbox["db"]
    cached, _ = notes

    envbox.network.partition(["api"], ["db"])
    try:
        response, elapsed = timed(api.http.get, "/health")
        assert (response.status_code, response.json()["db"], response.json()["cache"]) == (503, "down", "up")
        assert elapsed < QUICKLY
        assert api.http.get(f"/notes/{cached['id']}", timeout=10).status_code == 200  # from the cache

        # A partition is between services only: the test still reaches the database through its
        # published port, here with psycopg, as any client on the host would.
        with psycopg.connect(host="127.0.0.1", port=db.port(5432), user="postgres", dbname="notes",
                             connect_timeout=5) as conn:  # fmt: skip
            row = conn.execute("SELECT title FROM notes WHERE id = %s", (cached["id"],)).fetchone()
        assert row == ("cached",)
    finally:
        envbox.network.heal()

    wait_until(lambda: healthy(api), timeout=20, what="/health says ok again after heal()")


def test_a_cache_outage_is_not_an_outage(
    envbox: Environment, notes: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    api, cache = envbox["api"], envbox["cache"]
    cached, uncached = notes

    cache.stop()
    try:
        assert not cache.running
        response = api.http.get("/health", timeout=10)
        assert response.status_code == 200  # the API still does its job...
        assert response.json()["status"] == "degraded" and response.json()["cache"] == "down"

        # ...reading everything from the database (a miss, every time), writing as usual.
        for _ in range(2):
            response, elapsed = timed(api.http.get, f"/notes/{cached['id']}")
            assert (response.status_code, response.headers["X-Cache"]) == (200, "miss")
            assert elapsed < QUICKLY
        assert create(api, "written without a cache")["id"] > uncached["id"]
        assert "api: cache unavailable" in api.logs()
    finally:
        cache.start()  # a fresh, empty Redis: every cached copy is gone

    wait_until(lambda: healthy(api), timeout=20, what="/health says ok again after the cache restarted")
    assert api.http.get(f"/notes/{cached['id']}", timeout=10).headers["X-Cache"] == "miss"
    assert api.http.get(f"/notes/{cached['id']}", timeout=10).headers["X-Cache"] == "hit"
