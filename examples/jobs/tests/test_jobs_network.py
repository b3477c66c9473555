"""Aliases: redis is declared with aliases = ["queue"], and the other services only know "queue".

Every service's /etc/hosts maps each name and alias of its environment to that service's address
on the environment's private network.
"""

from __future__ import annotations

import re

import pytest
from jobs_client import redis_cli, submit, wait_for_job

from pytest_envbox import Environment

pytestmark = pytest.mark.envbox(topology="jobs", scope="module")


@pytest.mark.parametrize("service", ["api", "worker", "gateway"])
def test_queue_resolves_to_the_redis_service(envbox: Environment, service: str) -> None:
    result = envbox[service].exec(["getent", "hosts", "queue"])
    assert result.returncode == 0, result.stderr
    address, *names = result.stdout.split()
    assert address == envbox["redis"].ip
    assert names == ["redis", "queue"]  # the service's name first, then its aliases


def test_an_undeclared_name_does_not_resolve(envbox: Environment) -> None:
    # No DNS server, no route out: only the names of the environment exist.
    result = envbox["api"].exec(["getent", "hosts", "cache"])
    assert result.returncode == 2  # getent: key not found
    assert result.stdout == ""


def test_the_services_are_configured_with_the_alias_only(envbox: Environment) -> None:
    for service in ("api", "worker"):
        env = dict(line.split("=", 1) for line in envbox[service].exec(["env"]).stdout.splitlines())
        assert env["QUEUE_URL"] == "redis://queue:6379/0"
    assert "host=queue,port=6379" in envbox["api"].logs()  # what the api's client says it uses


def test_the_clients_reached_redis_through_the_alias(envbox: Environment) -> None:
    """redis sees the api's and the worker's connections coming from their own addresses."""
    job_id = submit(envbox["gateway"], "wordcount", "to be or not to be")
    assert wait_for_job(envbox["gateway"], job_id)["status"] == "done"

    clients = redis_cli(envbox["redis"], "CLIENT", "LIST")
    client = re.compile(r"addr=(?P<ip>[\d.]+):\d+ .*?name=(?P<name>\S*)")
    seen = {m["name"]: m["ip"] for m in client.finditer(clients)}  # client name -> its address
    assert seen["api"] == envbox["api"].ip
    assert seen["worker"] == envbox["worker"].ip
    assert len({envbox[s].ip for s in envbox}) == len(envbox)  # one address per service
