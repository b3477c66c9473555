"""The README's compose quick start, as it shows it (tests/unit/test_import_docs.py keeps the two
the same): one test of its own environment, api and what api depends on."""

import pytest


@pytest.mark.envbox("api")           # api, and what it depends on: db, cache, migrate
def test_a_note_is_stored(envbox):
    assert envbox["migrate"].returncode == 0     # the one-shot migration ran first, and passed
    api = envbox["api"]                          # on a free 127.0.0.1 port: API_PORT is not bound
    assert api.http.post("/notes", json={"title": "hello"}).status_code == 201
