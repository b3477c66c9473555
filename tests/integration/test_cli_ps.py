"""`envbox ps` lists live runs and their services; `envbox clean` removes the records of dead ones."""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import sys

from pytest_envbox import Environment, Service
from pytest_envbox.engine.client import get_supervisor
from pytest_envbox.supervisor.records import state_dir
from pytest_envbox.wait import Deadline, wait_until

PY = sys.executable


def envbox(*args: str) -> str:
    r = subprocess.run([PY, "-m", "pytest_envbox.cli", *args], capture_output=True, text=True,
                       timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_ps_lists_the_services_of_this_run_with_pids_and_addresses() -> None:
    with Environment([Service("web", ["sleep", "1000"]), Service("db", ["sleep", "1000"])]) as env:
        sup = get_supervisor().pid
        web, db = env["web"], env["db"]
        expect = [f"{web.name}  pid {web.pid}  {web.ip}", f"{db.name}  pid {db.pid}  {db.ip}"]
        # The record is written when the supervisor is idle: wait for it, with a deadline.
        def listed() -> str | None:
            out = envbox("ps")
            return out if all(e in out for e in expect) else None

        out = wait_until(listed, Deadline(10))
        assert out is not None, envbox("ps")
        me = pwd.getpwuid(os.geteuid()).pw_name
        assert f"supervisor {sup}, user {me}, test process {os.getpid()}" in out
    assert wait_until(lambda: f"pid {web.pid}" not in envbox("ps") or None, Deadline(10))


def test_clean_removes_the_record_of_a_killed_run_and_never_a_live_one() -> None:
    from pytest_envbox.supervisor.records import janitor

    get_supervisor()
    d = state_dir()
    os.makedirs(d, exist_ok=True)
    stale = os.path.join(d, "envbox-999999999-1.json")  # no such process: its run is gone
    live = [n for n in os.listdir(d) if n.startswith(f"envbox-{get_supervisor().pid}-")]
    # Holding the janitor's lock: a supervisor starting meanwhile (another xdist worker's) does
    # not clean it first; `envbox clean` does, lock or not.
    with janitor() as mine:
        assert mine
        with open(stale, "w") as f:
            json.dump({"supervisor": 999999999, "environments": {}}, f)
        assert "record of killed runs" in envbox("ps") or "records of killed runs" in envbox("ps")
        out = envbox("clean")
    assert f"removed {stale}" in out
    assert not os.path.exists(stale)
    assert all(os.path.exists(os.path.join(d, n)) for n in live)


def test_one_janitor_at_a_time() -> None:
    from pytest_envbox.supervisor.records import janitor

    with janitor() as first, janitor() as second:
        assert (first, second) == (True, False)  # the second one need not wait, nor clean
    with janitor() as again:
        assert again
