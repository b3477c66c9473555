"""Services that misbehave: a flood of output (1 GB; for a while), SIGTERM ignored, a fork bomb."""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest

from pytest_envbox import Environment, Service, probe
from pytest_envbox.engine.client import get_supervisor
from pytest_envbox.supervisor.logs import LOG_CAP, LOG_TAIL
from pytest_envbox.wait import Deadline, wait_until
from tests.kernel import alive, cgroup_dirs, cpu_seconds, read_cgroup_file, rss_kib


def test_a_service_flooding_1_gb_of_output_gets_a_capped_log_with_its_last_words() -> None:
    flood = Service("flood", ["sh", "-c", "head -c 1073741824 /dev/zero; echo last-words"])
    with Environment([flood]) as env:
        h = env["flood"]
        sup = get_supervisor().pid
        rss = rss_kib(sup), rss_kib(os.getpid())
        assert wait_until(lambda: (not h.running) or None, Deadline(120)), "still flooding"
        assert h.returncode == 0
        size = h.log_path.stat().st_size
        # The file: the first LOG_CAP bytes, a marker, the last LOG_TAIL bytes of the rest.
        assert LOG_CAP < size <= LOG_CAP + LOG_TAIL + 200, size
        with open(h.log_path, "rb") as f:
            f.seek(LOG_CAP)
            rest = f.read()
        dropped = (1 << 30) + len("last-words\n") - LOG_CAP
        assert rest.startswith(b"\n[envbox: the log reached 64 MiB; " + str(dropped).encode())
        assert rest.endswith(b"\0\0\0last-words\n")
        # Neither the supervisor nor the test process held the flood in memory.
        assert rss_kib(sup) - rss[0] < 16 << 10 and rss_kib(os.getpid()) - rss[1] < 16 << 10
        assert h.logs().endswith("last-words\n")


def test_a_service_that_ignores_sigterm_is_killed_after_its_stop_timeout() -> None:
    stubborn = Service("stubborn", ["sh", "-c", "trap 'echo got-term' TERM; echo up; "
                                                "while :; do sleep 0.05; done"],
                       ready=probe.log("^up$"), stop_timeout="300ms")  # fmt: skip
    env = Environment([stubborn])
    env.open()
    h = env["stubborn"]
    pid = h.pid
    assert pid is not None
    h.stop()
    assert "got-term" in h.logs()  # SIGTERM first, and the service chose to ignore it
    assert h.returncode == 128 + signal.SIGKILL  # then SIGKILL, once the grace was over
    assert not alive(pid)
    h.start()  # teardown does the same
    pid = h.pid
    assert pid is not None
    env.close()
    assert not alive(pid) and h.returncode == 128 + signal.SIGKILL


@pytest.mark.needs_cgroups
def test_a_fork_bomb_stays_within_its_pids_and_cpu_limits() -> None:
    # Every process forks for ever; a failed fork (the pids limit) is retried at once: all spin.
    code = ("import os\nprint('lit', flush=True)\nwhile True:\n    try:\n        os.fork()\n"
            "    except OSError:\n        pass\n")
    bomb = Service("bomb", [sys.executable, "-c", code], ready=probe.log("^lit$"),
                   limits={"pids": 32, "cpu": "500m"})  # fmt: skip
    with Environment([bomb]) as env:
        h = env["bomb"]
        pid = h.pid
        assert pid is not None
        cg = cgroup_dirs(pid)
        assert wait_until(lambda: h.stats().pids >= 30 or None, Deadline(10)), h.stats()
        before, t0 = h.stats().cpu_seconds, time.monotonic()
        assert wait_until(lambda: time.monotonic() - t0 >= 2 or None, Deadline(5))
        used = (h.stats().cpu_seconds - before) / (time.monotonic() - t0)
        pids = h.stats().pids
        # The kernel holds it: never more than 32 tasks, about half a core however many spin.
        assert pids <= 32
        assert used <= 0.5 * 1.2, used
        limit_file = cg.get("pids", cg.get("unified", "")) + "/pids.max"
        assert read_cgroup_file(limit_file) == "32"
    assert not alive(pid)


def test_a_service_flooding_its_output_costs_the_supervisor_a_small_share_of_one_core() -> None:
    # `yes` for 4 s, as fast as it can. Before each service's output had a CPU budget in the
    # supervisor (logs.LOG_CPU_SHARE), this cost the supervisor 0.2 core; now the supervisor
    # stops reading over budget and `yes` waits in write() (its log: a few MiB a second).
    flood = Service("flood", ["sh", "-c", "timeout 4 yes; echo last-words"])
    with Environment([flood]) as env:
        h = env["flood"]
        sup = get_supervisor().pid
        spent, t0 = cpu_seconds(sup), time.monotonic()
        # The log is served during the flood.
        assert wait_until(lambda: "y\ny\n" in h.logs() or None, Deadline(10))
        assert wait_until(lambda: (not h.running) or None, Deadline(30)), "still flooding"
        share = (cpu_seconds(sup) - spent) / (time.monotonic() - t0)
        assert share < 0.1, f"the supervisor used {share:.2f} core"
        assert h.returncode == 0
        assert h.logs().endswith("y\nlast-words\n")  # its last words, after the flood


def test_a_line_a_quiet_service_writes_is_in_its_log_at_once() -> None:
    # The budget is spent by floods only: a service writing now and then is read the moment it
    # writes (its line is not held back for a pause).
    ticker = Service("ticker", [sys.executable, "-c",
                                "import time\nfor i in range(20):\n"
                                "    print('tick', i, time.time(), flush=True)\n"
                                "    time.sleep(0.05)\n"
                                "time.sleep(60)\n"])  # fmt: skip
    with Environment([ticker]) as env:
        h = env["ticker"]
        late = []
        for i in range(20):
            m = h.wait_for_log(rf"^tick {i} (\S+)$", timeout=10)
            late.append(time.time() - float(m.group(1)))
        assert max(late) < 0.2, late
