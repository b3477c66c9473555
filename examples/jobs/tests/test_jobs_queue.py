"""The job flow end to end, through the gateway, in one environment shared by the module's tests.

``scope="module"``: the services start once for this module and keep their state from one test to
the next (the queue's data, the job counter, a stopped and restarted worker). ``exec`` runs
redis-cli inside the redis service to look at the queue itself.
"""

from __future__ import annotations

import hashlib

import pytest
from jobs_client import job, redis_cli, submit, wait_for_job, wait_until

from pytest_envbox import Environment

pytestmark = pytest.mark.envbox(topology="jobs", scope="module")

# What the tests of this module learn and hand on to the next ones: a module-level dict
# outlives each test, as the module's environment does.
SHARED: dict[str, object] = {}
REDIS_PIDS: set[int | None] = set()


@pytest.fixture(autouse=True)
def _note_the_redis_pid(envbox: Environment) -> None:
    REDIS_PIDS.add(envbox["redis"].pid)


def test_a_job_goes_through_the_gateway_to_the_worker_and_back(envbox: Environment) -> None:
    assert sorted(envbox.services) == ["api", "gateway", "redis", "worker"]
    gateway = envbox["gateway"]

    response = gateway.http.post("/jobs", json={"op": "wordcount", "payload": "the cat and the hat"})
    assert response.status_code == 202
    assert response.headers["Via"] == "1.1 gateway"  # it came through the proxy
    job_id = response.json()["id"]

    done = wait_for_job(gateway, job_id)
    assert done["status"] == "done", done
    assert done["result"] == {"words": 5, "top": [["the", 2], ["cat", 1], ["and", 1]]}
    assert done["worker"] == "worker"  # the worker's hostname is its service name
    envbox["worker"].wait_for_log(rf"worker worker: {job_id} wordcount done in [\d.]+ ms", timeout=5)
    SHARED["first_job"] = job_id


def test_the_environment_and_its_data_persist_across_the_module(envbox: Environment) -> None:
    if "first_job" not in SHARED:
        pytest.skip("builds on test_a_job_goes_through_the_gateway_to_the_worker_and_back")
    assert len(REDIS_PIDS) == 1  # the same redis process as in the previous test
    first = job(envbox["gateway"], str(SHARED["first_job"]))  # the previous test's job is still there
    assert first["status"] == "done" and first["result"]["words"] == 5
    assert redis_cli(envbox["redis"], "GET", "jobs:seq") == "1"  # nothing was reset in between
    # Ids keep counting in the same queue.
    assert submit(envbox["gateway"], "sha256", "") == "j2"


def test_bad_jobs_are_refused_before_they_reach_the_queue(envbox: Environment) -> None:
    gateway, redis = envbox["gateway"], envbox["redis"]
    seq = redis_cli(redis, "GET", "jobs:seq")
    for bad in ({"op": "rm -rf", "payload": "/"}, {"op": "sleep", "payload": 3600}, [1, 2]):
        response = gateway.http.post("/jobs", json=bad)
        assert response.status_code == 400, response.text
    assert gateway.http.post("/jobs", data=b"not json").status_code == 400
    assert gateway.http.get("/jobs/j999").status_code == 404
    assert redis_cli(redis, "GET", "jobs:seq") == seq  # no id was used up


def test_jobs_pile_up_while_the_worker_is_stopped_and_drain_when_it_is_back(envbox: Environment) -> None:
    gateway, redis, worker = envbox["gateway"], envbox["redis"], envbox["worker"]
    wait_until(lambda: redis_cli(redis, "LLEN", "jobs") == "0", what="an empty queue")

    worker.stop()  # SIGTERM: it finishes cleanly
    assert worker.returncode == 0 and "worker worker: stopping" in worker.logs()

    texts = [f"document {i}" for i in range(5)]
    ids = [submit(gateway, "sha256", text) for text in texts]

    # Nobody takes them: they are all in the Redis list, oldest at the right end.
    assert redis_cli(redis, "LLEN", "jobs") == "5"
    assert redis_cli(redis, "LRANGE", "jobs", "0", "-1").split() == ids[::-1]
    assert {job(gateway, i)["status"] for i in ids} == {"queued"}
    assert gateway.http.get("/stats").json()["queued"] == 5

    worker.start()  # its readiness probe waits for a new "worker ready" line
    assert worker.logs().count("worker ready") == 2  # one per run

    wait_until(lambda: redis_cli(redis, "LLEN", "jobs") == "0", what="the queue drained")
    for job_id, text in zip(ids, texts, strict=True):
        done = wait_for_job(gateway, job_id)
        assert done["result"] == hashlib.sha256(text.encode()).hexdigest()
    # Taken in the order they were submitted: the right end of the list first.
    started = [float(job(gateway, i)["started"]) for i in ids]
    assert started == sorted(started)


def test_a_job_held_by_a_killed_worker_is_not_lost(envbox: Environment) -> None:
    gateway, redis, worker = envbox["gateway"], envbox["redis"], envbox["worker"]
    job_id = submit(gateway, "sleep", 1.5)
    wait_for_job(gateway, job_id, status=("running",))

    worker.kill()  # SIGKILL in the middle of the job: no chance to clean up
    assert not worker.running and worker.returncode == 137
    # The job moved atomically from the queue to the worker's own list, and is still there.
    assert redis_cli(redis, "LRANGE", "jobs:processing:worker", "0", "-1") == job_id
    assert job(gateway, job_id)["status"] == "running"

    worker.start()
    worker.wait_for_log(r"requeued 1 unfinished job\(s\)", timeout=5)
    done = wait_for_job(gateway, job_id, timeout=10)
    assert done["status"] == "done" and done["result"] == {"slept": 1.5}
    assert redis_cli(redis, "LLEN", "jobs:processing:worker") == "0"


def test_the_services_stayed_within_their_limits(envbox: Environment) -> None:
    for name in envbox:
        stats = envbox[name].stats()
        limits = envbox[name].spec.limits
        assert stats.oom_kills == 0, name
        assert stats.memory_peak_bytes <= limits.memory, name
        assert stats.pids <= limits.pids, name
    assert len(REDIS_PIDS) == 1  # every test of the module ran against the same redis
