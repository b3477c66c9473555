"""An image's writable layer lasts as long as its environment: the database keeps its data
across a restart (as a container keeps its own), where the notes example, whose PostgreSQL runs
from the host with its data in a private tmpfs, starts again from an empty one.
"""

from __future__ import annotations

import pytest
from images_helpers import psql

from pytest_envbox import Environment

pytestmark = pytest.mark.envbox("api")  # an environment of its own: this test restarts the database


def test_the_database_keeps_its_data_across_a_restart(envbox: Environment) -> None:
    api, db = envbox["api"], envbox["db"]
    created = api.http.post("/notes", json={"title": "kept", "body": "across a restart"}, timeout=10)
    assert created.status_code == 201, created.text
    note = created.json()
    first_pid = db.pid

    db.restart()  # stopped with the image's StopSignal (SIGINT), started again, ready again

    assert db.pid != first_pid
    # The same data directory, in the same writable layer: the entrypoint found it, made no new
    # cluster, and the row is there, through psql and through the API.
    assert db.logs().count("init process complete") == 1
    assert psql(db, f"SELECT title FROM notes WHERE id = {note['id']}") == "kept"
    listed = api.http.get("/notes", timeout=10)  # a list is always read from the database
    assert listed.status_code == 200, listed.text
    assert {"id": note["id"], "title": "kept"} in listed.json()
