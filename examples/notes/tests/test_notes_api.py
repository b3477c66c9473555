"""The notes API's behaviour, against the real PostgreSQL and Redis servers.

One environment for the whole module (``scope="module"``): PostgreSQL's initdb is paid once. Each
test creates the notes it needs, so that no test depends on another's leftovers. What the API
says is checked against what the servers hold: ``psql`` run inside the database's sandbox,
``redis-cli`` inside the cache's.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import requests

from pytest_envbox import Environment, ServiceHandle

pytestmark = pytest.mark.envbox("api", scope="module")  # with db and cache, its depends_on


def create(api: ServiceHandle, title: str, body: str = "") -> dict[str, Any]:
    response = api.http.post("/notes", json={"title": title, "body": body}, timeout=10)
    assert response.status_code == 201, response.text
    note: dict[str, Any] = response.json()
    assert response.headers["Location"] == f"/notes/{note['id']}"
    return note


def psql(envbox: Environment, sql: str) -> str:
    """Run SQL in the database's sandbox (as its user, over its socket in /tmp); unaligned output."""
    result = envbox["db"].exec(["psql", "-X", "-At", "-v", "ON_ERROR_STOP=1", "-c", sql])
    assert result.returncode == 0, result.stderr
    return result.stdout.rstrip("\n")


def redis_cli(envbox: Environment, *args: str) -> str:
    result = envbox["cache"].exec(["redis-cli", *args])
    assert result.returncode == 0, result.stderr
    return result.stdout.rstrip("\n")


def test_health_reports_every_dependency(envbox: Environment) -> None:
    response = envbox["api"].http.get("/health", timeout=10)
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "db": "up", "cache": "up"}


def test_create_read_list_update_delete(envbox: Environment) -> None:
    api = envbox["api"]
    note = create(api, "shopping", "tea, milk")
    assert note["title"] == "shopping" and note["body"] == "tea, milk"

    assert api.http.get(f"/notes/{note['id']}", timeout=10).json() == note
    listed = api.http.get("/notes", timeout=10).json()
    assert {"id": note["id"], "title": "shopping"} in listed

    updated = api.http.put(f"/notes/{note['id']}", json={"title": "shopping", "body": "tea"}, timeout=10)
    assert updated.status_code == 200
    assert updated.json()["body"] == "tea"
    assert updated.json()["updated_at"] > note["updated_at"]

    assert api.http.delete(f"/notes/{note['id']}", timeout=10).status_code == 204
    assert api.http.get(f"/notes/{note['id']}", timeout=10).status_code == 404
    assert api.http.delete(f"/notes/{note['id']}", timeout=10).status_code == 404
    assert note["id"] not in [n["id"] for n in api.http.get("/notes", timeout=10).json()]


def test_a_note_is_really_stored_in_postgres(envbox: Environment) -> None:
    note = create(envbox["api"], "in the database", "ünïcødé ✓ and 'quotes'")
    row = psql(envbox, f"SELECT title || '|' || body FROM notes WHERE id = {note['id']}")
    assert row == "in the database|ünïcødé ✓ and 'quotes'"
    # The API created its table in the "notes" database that services/postgres.sh made.
    assert psql(envbox, "SELECT current_database(), to_regclass('public.notes')") == "notes|notes"


def test_a_read_fills_the_cache_and_the_next_read_is_a_hit(envbox: Environment) -> None:
    api = envbox["api"]
    note = create(api, "cache me")
    key = f"note:{note['id']}"
    assert redis_cli(envbox, "EXISTS", key) == "0"  # writing does not fill the cache

    first = api.http.get(f"/notes/{note['id']}", timeout=10)
    assert first.headers["X-Cache"] == "miss"
    assert json.loads(redis_cli(envbox, "GET", key)) == note == first.json()
    assert 0 < int(redis_cli(envbox, "TTL", key)) <= 300  # cached copies expire

    second = api.http.get(f"/notes/{note['id']}", timeout=10)
    assert second.headers["X-Cache"] == "hit"
    assert second.json() == note


def test_cached_reads_do_not_touch_the_database_until_a_write_drops_the_copy(envbox: Environment) -> None:
    api = envbox["api"]
    note = create(api, "before")
    api.http.get(f"/notes/{note['id']}", timeout=10)  # now cached

    # Behind the API's back: the database changes, the cached copy does not (cache-aside).
    psql(envbox, f"UPDATE notes SET title = 'changed in SQL' WHERE id = {note['id']}")
    stale = api.http.get(f"/notes/{note['id']}", timeout=10)
    assert (stale.headers["X-Cache"], stale.json()["title"]) == ("hit", "before")

    # A write through the API drops the copy: the next read goes to the database.
    api.http.put(f"/notes/{note['id']}", json={"title": "after", "body": ""}, timeout=10)
    assert redis_cli(envbox, "EXISTS", f"note:{note['id']}") == "0"
    fresh = api.http.get(f"/notes/{note['id']}", timeout=10)
    assert (fresh.headers["X-Cache"], fresh.json()["title"]) == ("miss", "after")


def test_delete_drops_the_cached_copy(envbox: Environment) -> None:
    api = envbox["api"]
    note = create(api, "short-lived")
    api.http.get(f"/notes/{note['id']}", timeout=10)
    assert redis_cli(envbox, "EXISTS", f"note:{note['id']}") == "1"

    assert api.http.delete(f"/notes/{note['id']}", timeout=10).status_code == 204
    assert redis_cli(envbox, "EXISTS", f"note:{note['id']}") == "0"
    assert psql(envbox, f"SELECT count(*) FROM notes WHERE id = {note['id']}") == "0"
    assert api.http.get(f"/notes/{note['id']}", timeout=10).status_code == 404


@pytest.mark.parametrize(
    ("data", "status", "error"),
    [
        (b"{not json", 400, "invalid JSON"),
        (b"[1, 2]", 400, "expected a JSON object"),
        (b'{"body": "no title"}', 400, "title"),
        (b'{"title": "x", "body": 42}', 400, "body"),
        (b'{"title": "nul \\u0000 byte"}', 400, "NUL"),  # PostgreSQL's text cannot hold it
        (b" " * (2**20 + 1), 413, "larger than 1048576 bytes"),  # MAX_BODY in pyproject.toml
    ],
    ids=["not-json", "not-an-object", "no-title", "body-not-a-string", "nul", "too-large"],
)
def test_bad_requests_are_refused_with_a_reason(
    envbox: Environment, data: bytes, status: int, error: str
) -> None:
    response = requests.post(envbox["api"].url("/notes"), data=data, timeout=10,
                             headers={"Content-Type": "application/json"})  # fmt: skip
    assert response.status_code == status
    assert error in response.json()["error"]


def test_unknown_paths_and_notes_are_404(envbox: Environment) -> None:
    api = envbox["api"]
    assert api.http.get("/nope", timeout=10).status_code == 404
    assert api.http.get("/notes/999999999", timeout=10).json() == {"error": "no such note"}
    assert api.http.put("/notes/999999999", json={"title": "x"}, timeout=10).status_code == 404
