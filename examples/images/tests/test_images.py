"""The notes API on PostgreSQL and Redis images: what it stores is in the images' servers, and
those servers are the programs the images hold, not the host's.

One environment for the module (``scope="module"``): the images are pulled, and PostgreSQL's
first start (initdb) is paid, once.
"""

from __future__ import annotations

import json

import pytest
from images_helpers import psql, run

from pytest_envbox import Environment

pytestmark = pytest.mark.envbox("api", scope="module")  # with db and cache, its depends_on


def test_a_note_is_stored_in_postgres_and_cached_in_redis(envbox: Environment) -> None:
    api = envbox["api"]
    created = api.http.post("/notes", json={"title": "from an image", "body": "ünïcødé ✓"}, timeout=10)
    assert created.status_code == 201, created.text
    note = created.json()
    # In the database: psql, run inside the postgres image.
    assert psql(envbox["db"], f"SELECT title || '|' || body FROM notes WHERE id = {note['id']}") == \
        "from an image|ünïcødé ✓"

    first = api.http.get(f"/notes/{note['id']}", timeout=10)
    assert (first.headers["X-Cache"], first.json()) == ("miss", note)
    # In the cache: redis-cli, run inside the redis image.
    assert json.loads(run(envbox["cache"], "redis-cli", "GET", f"note:{note['id']}")) == note
    second = api.http.get(f"/notes/{note['id']}", timeout=10)
    assert (second.headers["X-Cache"], second.json()) == ("hit", note)


def test_the_servers_are_the_images_own(envbox: Environment, pytestconfig: pytest.Config) -> None:
    db, cache = envbox["db"], envbox["cache"]
    # The versions the servers give the API over the network are those of the images' programs.
    health = envbox["api"].http.get("/health", timeout=10).json()
    assert run(db, "postgres", "--version") == f"postgres (PostgreSQL) {health['db']}"
    assert f" v={health['cache']} " in run(cache, "redis-server", "--version")
    # The image's configuration applies: its PG_MAJOR (Env) is the server's, and its PGDATA is
    # where the entrypoint made the cluster, owned by the image's postgres user.
    major = run(db, "sh", "-c", 'echo "$PG_MAJOR"')
    assert health["db"].startswith(f"{major}.")
    data = run(db, "sh", "-c", 'cat "$PGDATA/PG_VERSION"; stat -c %U "$PGDATA"')
    assert data.split() == [major, "postgres"]
    # The services see the images' files, not the host's: the checkout the API runs from (a host
    # program, it sees the host read-only) is not there.
    checkout = str(pytestconfig.rootpath / "services" / "api.py")
    assert envbox["api"].exec(["test", "-f", checkout]).returncode == 0
    assert [s.exec(["test", "-e", checkout]).returncode for s in (db, cache)] == [1, 1]
