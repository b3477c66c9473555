"""compose.yaml's named volume ``db-data`` (PostgreSQL's data directory): it outlives a restart of
``db`` within an environment, each environment has its own, and it is gone with the environment.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from compose_helpers import psql, run

from pytest_envbox import Environment
from pytest_envbox.config import load_project_config


@pytest.mark.envbox("api")  # an environment of its own: this test restarts the database
def test_the_named_volume_survives_a_restart_of_db(envbox: Environment) -> None:
    api, db = envbox["api"], envbox["db"]
    created = api.http.post("/notes", json={"title": "kept", "body": "in db-data"}, timeout=10)
    assert created.status_code == 201, created.text
    note = created.json()
    # The cluster is in the volume, a directory of the environment's own (envbox.volume() says
    # where), mounted at the image's PGDATA.
    volume = envbox.volume("db-data")
    assert run(db, "sh", "-c", 'cat "$PGDATA/PG_VERSION"') == (volume / "PG_VERSION").read_text().strip()
    first_pid = db.pid

    db.restart()  # stopped with the image's StopSignal (SIGINT), started again, ready again

    assert db.pid != first_pid
    # The same volume: the entrypoint found the cluster, made no new one, and the row is there.
    assert db.logs().count("init process complete") == 1
    assert psql(db, f"SELECT title FROM notes WHERE id = {note['id']}") == "kept"
    listed = api.http.get("/notes", timeout=10)  # a list is always read from the database
    assert listed.status_code == 200, listed.text
    assert {"id": note["id"], "title": "kept"} in listed.json()


def test_each_environment_has_its_own_volume_gone_with_it(pytestconfig: pytest.Config) -> None:
    # The Python API, to look after the environments have closed: the same declarations as the
    # plugin's (pyproject.toml and compose.yaml; POSTGRES_IMAGE is set by conftest.py).
    root = pytestconfig.rootpath
    catalog = load_project_config(root)
    volumes: list[Path] = []
    with Environment(["db"], catalog=catalog, rootdir=root) as one, \
            Environment(["db"], catalog=catalog, rootdir=root) as two:  # fmt: skip
        volumes += [one.volume("db-data"), two.volume("db-data")]
        assert volumes[0] != volumes[1]
        assert all((v / "PG_VERSION").is_file() for v in volumes)  # two clusters, one per volume
        psql(one["db"], "CREATE TABLE only_in_one (id int)")
        assert psql(one["db"], "SELECT to_regclass('only_in_one') IS NOT NULL") == "t"
        assert psql(two["db"], "SELECT to_regclass('only_in_one') IS NOT NULL") == "f"
    assert [v.exists() for v in volumes] == [False, False]
