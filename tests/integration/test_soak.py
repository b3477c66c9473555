"""Soak: hundreds of start/stop cycles leave nothing behind and do not grow the supervisor."""

from __future__ import annotations

import gc
import os
import time

import pytest

from pytest_envbox import Environment, Service, probe
from pytest_envbox.engine.client import get_supervisor
from pytest_envbox.supervisor import statedir
from pytest_envbox.supervisor.protocol import CensusRequest
from pytest_envbox.wait import Deadline, wait_until
from tests.conftest import cgroups_problem
from tests.kernel import children, host_links, our_mounts, rss_kib

CYCLES = int(os.environ.get("ENVBOX_SOAK_CYCLES", "500"))


def descendants(pid: int) -> set[int]:
    out: set[int] = set()
    todo = [pid]
    while todo:
        for child in children(todo.pop()):
            out.add(child)
            todo.append(child)
    return out



def fds(pid: int) -> int:
    """Open descriptors, but for the state directory: the supervisor's record writer holds it
    open while it writes, on a thread of its own, whenever the loop was idle (records.py)."""
    state = str(statedir.state_dir())
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += os.readlink(f"/proc/{pid}/fd/{fd}") != state
        except OSError:
            pass  # closed meanwhile
    return count


def run_dirs(sup: int) -> list[str]:
    """The service cgroups below this supervisor's run directories (every hierarchy)."""
    found = []
    for root, dirs, _files in os.walk("/sys/fs/cgroup"):
        if f"/envbox-{sup}-" in root + "/":
            found += [os.path.join(root, d) for d in dirs]
    return found


def host_state() -> tuple[list[str], list[str]]:
    mounts = our_mounts()
    # Environments' links aside: other runs make theirs at any time, and ours are those of the
    # hubs kept for the next environment (tests/integration/test_network.py checks them).
    return sorted(host_links()), mounts


@pytest.mark.slow
def test_hundreds_of_cycles_of_a_three_service_environment_leave_the_host_as_it_was() -> None:
    limited = {} if cgroups_problem() else {"limits": {"memory": "64Mi", "pids": 16}}
    services = [
        Service("db", ["sleep", "1000"], **limited),  # type: ignore[arg-type]
        Service("cache", ["sleep", "1000"], depends_on=["db"]),
        # A published port (its relay) and a log probe, without paying for an interpreter.
        Service("api", ["sh", "-c", "echo up; exec sleep 1000"], ports=[8000],
                depends_on=["cache"], ready=probe.log("^up$")),
    ]  # fmt: skip

    def cycle() -> None:
        with Environment(services) as env:
            assert env["api"].running and env["db"].running

    for _ in range(5):  # warm: the supervisor, its spare and spare hub, the imports
        cycle()
    sup = get_supervisor().pid

    def settled() -> tuple[int, int, int, int] | None:
        census = get_supervisor().call(CensusRequest())
        if census.slots or census.hubs:
            return None
        # Prepared ahead: at most one spare (an init and nothing below it) and one hub.
        gc.collect()  # earlier tests' clients not closed yet (in this xdist worker) are not ours
        return (len(descendants(sup)), fds(sup), fds(os.getpid()), len(run_dirs(sup)))

    before = wait_until(settled, Deadline(10))
    host_before = host_state()
    rss_before = rss_kib(sup)
    t0 = time.perf_counter()
    for _ in range(CYCLES):
        cycle()
    elapsed = time.perf_counter() - t0
    after = wait_until(lambda: settled() == before or None, Deadline(10)) and settled()
    rss_after = rss_kib(sup)
    print(f"\nsoak: {CYCLES} cycles of 3 services in {elapsed:.1f} s = {CYCLES / elapsed:.1f} "
          f"cycles/s; supervisor RSS {rss_before} KiB before, {rss_after} KiB after")  # fmt: skip
    # Processes below the supervisor, its fds, the test process's fds, service cgroups: as before.
    assert after == before, (before, settled())
    # The host's links and mounts (everything else is in namespaces that are gone).
    assert host_state() == host_before
    # Flat memory: a leak of even 4 KiB a cycle would show as 2 MiB.
    assert rss_after - rss_before < 2048, (rss_before, rss_after)
