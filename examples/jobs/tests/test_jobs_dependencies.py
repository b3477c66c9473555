"""depends_on: asking for one service brings up what it depends on, ready, before it.

pyproject.toml declares gateway -> api -> redis; the worker depends on redis too, but nothing
depends on the worker, so asking for the gateway does not start it.
"""

from __future__ import annotations

import pytest
from jobs_client import job, submit, wait_until

from pytest_envbox import Environment


@pytest.mark.envbox("gateway")  # only the gateway is named
def test_the_gateway_brings_up_the_api_and_the_queue(envbox: Environment) -> None:
    assert sorted(envbox.services) == ["api", "gateway", "redis"]  # no worker: nobody needs it
    redis, api, gateway = envbox["redis"], envbox["api"], envbox["gateway"]
    assert all(s.running for s in (redis, api, gateway))

    # Each one was started only once what it depends on had passed its readiness probe.
    assert redis.runs[0].ready is not None and redis.runs[0].ready <= api.runs[0].started
    assert api.runs[0].ready is not None and api.runs[0].ready <= gateway.runs[0].started
    assert "Ready to accept connections" in redis.logs()  # redis's own readiness line

    # Without a worker, a job is accepted and queued, and stays so.
    job_id = submit(gateway, "sha256", "nobody runs me")
    assert job(gateway, job_id)["status"] == "queued"
    assert gateway.http.get("/stats").json() == {"queued": 1, "done": 0}


@pytest.mark.envbox("gateway")
def test_the_gateway_reports_what_it_depends_on_going_down(envbox: Environment) -> None:
    redis, api, gateway = envbox["redis"], envbox["api"], envbox["gateway"]
    assert gateway.http.get("/health").json() == {"status": "ok", "upstream": "api:8000"}

    # The queue goes away: the api answers 503, the gateway says which link of the chain broke.
    redis.stop()
    health = gateway.http.get("/health")
    assert health.status_code == 502
    assert health.json()["error"] == "upstream /health answered 503"
    assert api.http.get("/health").json()["queue"] == "down"

    # A fresh, empty redis: the api's client reconnects by itself, to the same name "queue".
    redis.start()
    wait_until(lambda: gateway.http.get("/health").status_code == 200, what="gateway healthy again")

    # The api itself goes away: the gateway cannot reach its upstream at all.
    api.stop()
    assert not api.running and api.returncode == 0  # SIGTERM, and it exited cleanly
    health = gateway.http.get("/health")
    assert health.status_code == 502
    assert "Connection refused" in health.json()["error"]
    assert gateway.http.post("/jobs", json={"op": "sha256", "payload": "x"}).status_code == 502

    api.start()  # waits for its readiness probe: the gateway is healthy at once
    assert gateway.http.get("/health").status_code == 200
    assert "api: shutting down" in api.logs()
