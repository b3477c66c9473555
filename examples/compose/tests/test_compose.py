"""The notes API as compose.yaml describes it: what it stores is in the database and the cache of
the compose file, the migrate service ran to completion before the API started, and each service
is the compose service with the overrides of pyproject.toml.

One environment for the module (``scope="module"``): ``api`` and what it depends on in the
compose file, ``db``, ``cache`` and ``migrate``.
"""

from __future__ import annotations

import json

import pytest
from compose_helpers import psql, run

from pytest_envbox import Environment, Limits

pytestmark = pytest.mark.envbox("api", scope="module")


def test_a_note_is_stored_in_postgres_and_cached_in_redis(envbox: Environment) -> None:
    api = envbox["api"]
    created = api.http.post("/notes", json={"title": "from compose", "body": "ünïcødé ✓"}, timeout=10)
    assert created.status_code == 201, created.text
    note = created.json()
    # In the database: psql, run inside the db service's image.
    assert psql(envbox["db"], f"SELECT title || '|' || body FROM notes WHERE id = {note['id']}") == \
        "from compose|ünïcødé ✓"

    first = api.http.get(f"/notes/{note['id']}", timeout=10)
    assert (first.headers["X-Cache"], first.json()) == ("miss", note)
    # In the cache: redis-cli, run inside the cache service's image.
    assert json.loads(run(envbox["cache"], "redis-cli", "GET", f"note:{note['id']}")) == note
    second = api.http.get(f"/notes/{note['id']}", timeout=10)
    assert (second.headers["X-Cache"], second.json()) == ("hit", note)


def test_migrate_completed_before_the_api_started(envbox: Environment) -> None:
    migrate, api = envbox["migrate"], envbox["api"]
    # service_completed_successfully: migrate is a oneshot service; it ran, exited 0, and only
    # then was the API started (one run each, times from the same clock, taken by the engine as
    # it saw migrate exit and as it started the API).
    assert (migrate.running, migrate.returncode) == (False, 0)
    assert [r.returncode for r in migrate.runs] == [0]
    assert migrate.runs[0].stopped is not None
    assert migrate.runs[0].stopped <= api.runs[0].started
    # What it did: psql's replies to migrations/001_notes.sql, in its log, and the schema in the
    # database, which the API found as it started (it exits when the schema is missing).
    assert migrate.logs().count("CREATE TABLE") == 2
    assert psql(envbox["db"], "SELECT version FROM schema_migrations") == "1"
    assert "api: schema version 1" in api.logs()


def test_each_service_is_the_compose_service_with_the_overrides(
        envbox: Environment, compose_images: dict[str, str]) -> None:  # fmt: skip
    api, db, cache = envbox["api"].spec, envbox["db"].spec, envbox["cache"].spec
    # ${POSTGRES_IMAGE:-postgres:16}, interpolated from the environment conftest.py set: it was
    # set before pytest-envbox read compose.yaml (with IMAGES_FROM=docker.io, the defaults).
    assert db.image == compose_images.get("POSTGRES_IMAGE", "postgres:16")
    assert cache.image == compose_images.get("REDIS_IMAGE", "redis:7")
    assert envbox["migrate"].spec.image == db.image
    # api: the compose service (environment, ports, depends_on) run from the checkout.
    assert api.image is None
    assert api.command == ("python3", "-u", "services/api.py", "--port", "8000")
    assert api.env["DATABASE_URL"] == "postgresql://notes:notes-secret@db:5432/notes"
    assert (api.ports, set(api.depends_on)) == ((8000,), {"db", "cache", "migrate"})
    # limits merge key by key: the compose file's cpus stay, its memory is the override's.
    assert db.limits == Limits(memory="256Mi", cpu="1", pids=64)
    assert cache.limits == Limits(memory="64Mi", cpu="500m", pids=32)
