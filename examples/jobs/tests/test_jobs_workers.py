"""More workers on one queue: a service defined in the test module itself, next to declared ones.

The marker names an inline ``Service`` and the ``jobs`` topology; the inline service's
``depends_on`` is resolved among the declared services.
"""

from __future__ import annotations

import pytest
from jobs_client import redis_cli, submit, wait_for_job

from pytest_envbox import Environment, Service, probe

# The same program as the declared worker, under another name: its hostname, and so the name
# it writes in each job's "worker" field and in its processing list, is "worker-2".
SECOND_WORKER = Service(
    "worker-2",
    ["python3", "-u", "services/worker.py"],
    env={"QUEUE_URL": "redis://queue:6379/0"},
    depends_on=["redis"],
    ready=probe.log("worker ready", timeout="10s"),
    limits={"memory": "96Mi", "cpu": "500m", "pids": 16},
)


@pytest.mark.envbox(SECOND_WORKER, topology="jobs")  # function scope: a fresh environment
def test_two_workers_share_the_queue(envbox: Environment) -> None:
    gateway = envbox["gateway"]
    assert sorted(envbox) == ["api", "gateway", "redis", "worker", "worker-2"]
    assert redis_cli(envbox["redis"], "EXISTS", "jobs:seq") == "0"  # a new, empty queue

    ids = [submit(gateway, "sleep", 0.3) for _ in range(4)]
    workers = [wait_for_job(gateway, i)["worker"] for i in ids]
    # Each worker takes one job at a time: while one sleeps, the other takes the next.
    assert sorted(set(workers)) == ["worker", "worker-2"], workers
    for name in ("worker", "worker-2"):
        assert envbox[name].logs().count(" sleep done in ") == workers.count(name)
