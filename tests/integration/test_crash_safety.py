"""Nothing survives a pytest run that is SIGKILLed mid-test, nor a SIGKILLed supervisor."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pytest_envbox import Environment, Service
from pytest_envbox.engine.client import SupervisorClient
from pytest_envbox.kernel.cgroups import detect
from pytest_envbox.wait import Deadline, wait_until
from tests.conftest import PLUGIN_ARGS, cgroups_problem
from tests.kernel import alive, cgroup_dirs, holders, our_mounts

INNER = """
    import os, threading
    from pytest_envbox import Service
    from pytest_envbox.engine.client import get_supervisor

    def test_hangs(envbox):
        h = envbox.start(Service("victim", ["sleep", "1000"]))
        pidns = os.readlink(f"/proc/{h.pid}/ns/pid")
        with open(os.environ["REPORT"] + ".tmp", "w") as f:
            f.write(f"{h.pid} {get_supervisor().pid} {pidns} {envbox.workdir}")
        os.rename(os.environ["REPORT"] + ".tmp", os.environ["REPORT"])
        threading.Event().wait(120)  # hangs here until the outer test kills this pytest
"""


def _until(cond: object, timeout: float) -> bool:
    return wait_until(lambda: True if cond() else None, Deadline(timeout)) is True  # type: ignore[operator]


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["plain", "xdist"])
def test_sigkill_of_pytest_leaves_no_service_alive(tmp_path: Path, workers: list[str]) -> None:
    """With xdist, the killed process is the controller; its workers may sit in a test for long."""
    pytest.importorskip("xdist")
    (tmp_path / "test_inner.py").write_text(textwrap.dedent(INNER))
    report = tmp_path / "report"
    env = {**os.environ, "REPORT": str(report), "PYTHONPATH": str(Path(__file__).parents[2])}
    child = subprocess.Popen(
        [sys.executable, "-m", "pytest", *PLUGIN_ARGS, "-q", "-p", "no:cacheprovider",
         f"--basetemp={tmp_path / 'basetemp'}",  # a killed run's own, removed with ours
         *(workers or ["-p", "no:xdist"]), str(tmp_path / "test_inner.py")],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        assert _until(lambda: report.exists() or child.poll() is not None, 60)
        assert report.exists(), "the inner test never started its service"
        pid_s, sup_s, pidns, _workdir = report.read_text().split()
        pid, sup = int(pid_s), int(sup_s)
        assert alive(pid) and alive(sup)
        cgroups = [d for d in cgroup_dirs(pid).values() if "/envbox-" in d]
        if detect().version != "none" and not cgroups_problem():
            assert cgroups, "the service is in no envbox cgroup"
        # The environment's network: its hub and the service's namespace (veths live in them).
        networks = _net_namespaces(sup) - {os.readlink("/proc/self/ns/net")}
        assert os.readlink(f"/proc/{pid}/ns/net") in networks and len(networks) >= 2, networks
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    try:
        assert _until(lambda: not alive(pid) and not alive(sup) and not holders(pidns), 5)
        # The supervisor saw its test process die and removed the service's cgroups too.
        assert _until(lambda: not any(os.path.exists(d) for d in cgroups), 5), cgroups
        # Nothing holds the network namespaces any more: they, their bridge and veths are gone.
        assert _until(lambda: not any(holders(ns) for ns in networks), 5), networks
    finally:
        _kill_processes_in(tmp_path)  # orphaned xdist workers, still waiting in the inner test


def _net_namespaces(pid: int) -> set[str]:
    """The network namespaces a process is in (any thread) or holds by an fd."""
    found = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            found.add(os.readlink(f"/proc/{pid}/task/{tid}/ns/net"))
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("net:["):
                found.add(target)
    return found


def _kill_processes_in(directory: Path) -> None:
    """SIGKILL the processes whose working directory is ``directory`` (ones this test started)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.readlink(f"/proc/{entry}/cwd") == str(directory):
                    os.kill(int(entry), signal.SIGKILL)
            except OSError:
                pass


@pytest.mark.parametrize("user", [None, "nobody"])
def test_sigkill_of_the_supervisor_kills_every_service(user: str | None) -> None:
    """Also for a service of another user: changing uid clears the death signal, set anew."""
    sup = SupervisorClient()  # a private one, so killing it does not disturb other tests
    try:
        env = Environment([Service("orphan", ["sleep", "1000"], user=user)])
        import pytest_envbox.engine.environment as environment

        original = environment.get_supervisor
        environment.get_supervisor = lambda: sup
        try:
            env.open()
        finally:
            environment.get_supervisor = original
        pid = env["orphan"].pid
        assert pid is not None
        pidns = os.readlink(f"/proc/{pid}/ns/pid")
        os.kill(sup.pid, signal.SIGKILL)
        assert _until(lambda: not alive(pid) and not holders(pidns), 5)
        assert _until(lambda: not env["orphan"].running, 5)
        env.close()  # the supervisor is gone: the environment still removes its own files
        assert env.workdir is not None and not env.workdir.exists()
    finally:
        sup.close()


def test_after_kill_9_of_a_whole_xdist_run_the_next_run_starts_clean(tmp_path: Path) -> None:
    """Everything of the run SIGKILLed at once (controller, workers, supervisors): what only a
    supervisor could remove (its cgroups, its record for `envbox ps`) stays, and the next run's
    janitor removes it as it starts."""
    pytest.importorskip("xdist")
    from pytest_envbox.kernel.cgroups import run_name
    from pytest_envbox.supervisor.records import state_dir

    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / "test_inner.py").write_text(textwrap.dedent(INNER))
    report = killed / "report"
    env = {**os.environ, "REPORT": str(report), "PYTHONPATH": str(Path(__file__).parents[2])}
    child = subprocess.Popen(
        [sys.executable, "-m", "pytest", *PLUGIN_ARGS, "-q", "-p", "no:cacheprovider", "-n", "2",
         f"--basetemp={killed / 'basetemp'}", str(killed / "test_inner.py")],
        cwd=killed, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert _until(lambda: report.exists() or child.poll() is not None, 60)
        pid_s, sup_s, _pidns, _workdir = report.read_text().split()
        pid, sup = int(pid_s), int(sup_s)
        record = os.path.join(state_dir(), run_name(sup) + ".json")
        cgroups = [d for d in cgroup_dirs(pid).values() if "/envbox-" in d]
        runs = {os.path.dirname(d) for d in cgroups}
        assert _until(lambda: os.path.exists(record), 10), "the run has no record"
    finally:
        _kill_processes_in(killed)  # all of it at once, supervisors included (same cwd)
        child.wait()
    assert _until(lambda: not alive(sup) and not alive(pid), 5)
    assert os.path.exists(record) and all(os.path.isdir(r) for r in runs), "nothing was left?"

    # The next run: a plain test of its own, under xdist too.
    nxt = tmp_path / "next"
    nxt.mkdir()
    (nxt / "test_next.py").write_text(textwrap.dedent("""
        from pytest_envbox import Service

        def test_it(envbox):
            assert envbox.start(Service("fresh", ["sleep", "1000"])).running
    """))
    r = subprocess.run(
        [sys.executable, "-m", "pytest", *PLUGIN_ARGS, "-q", "-p", "no:cacheprovider", "-n", "2",
         f"--basetemp={nxt / 'basetemp'}", str(nxt / "test_next.py")],
        cwd=nxt, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:]
    assert not os.path.exists(record)
    assert not any(os.path.exists(d) for d in runs), runs


# --- the matrix: SIGKILL at each point of an environment's life -------------------------------

MATRIX_CONFTEST = """
    import json, os
    from pytest_envbox.engine.client import get_supervisor

    def _report(name, handle):
        cgroups = {}
        with open(f"/proc/{handle.pid}/cgroup") as f:
            cgroups = f.read()
        info = {"pid": handle.pid, "supervisor": get_supervisor().pid,
                "pidns": os.readlink(f"/proc/{handle.pid}/ns/pid"),
                "netns": os.readlink(f"/proc/{handle.pid}/ns/net"), "cgroup": cgroups,
                "log": str(handle.log_path)}
        path = os.path.join(os.environ["REPORT_DIR"], name)
        with open(path + ".tmp", "w") as f:
            json.dump(info, f)
        os.rename(path + ".tmp", path)

    def pytest_envbox_service_ready(handle):
        _report(handle.name, handle)
"""

MATRIX_TESTS = """
    import os, threading, pytest
    from pytest_envbox import Service, probe

    TRAP = "trap 'echo got-term' TERM; " if os.environ.get("IGNORE_TERM") else ""
    FIRST = Service("first", ["sh", "-c", TRAP + "echo up; while :; do sleep 0.1; done"],
                    ready=probe.log("^up$"), stop_timeout=60)
    NEVER = Service("never", ["sleep", "1000"], depends_on=["first"],
                    ready=probe.log("never printed", timeout=120))

    def wait_forever():
        threading.Event().wait(120)

    @pytest.mark.envbox(FIRST, NEVER)
    def test_startup(envbox):
        pass  # never reached: "never" is not ready before the kill

    @pytest.mark.envbox(FIRST)
    def test_running(envbox):
        wait_forever()

    @pytest.mark.envbox(FIRST)
    def test_teardown(envbox):
        pass  # then teardown: SIGTERM, which "first" ignores, and up to 60 s of waiting
"""

KILL_POINTS = ["startup", "running", "teardown"]


def _mountinfo() -> list[str]:
    return our_mounts()


MATRIX = [(point, victim) for point in KILL_POINTS for victim in ("pytest", "supervisor", "service")
          if (point, victim) != ("startup", "service")]  # that is a ServiceFailed (test_lifecycle)


@pytest.mark.parametrize(("point", "victim"), [*MATRIX, ("startup", "ctrl-c")])
def test_sigkill_at_any_point_leaves_nothing_after_envbox_clean(
    tmp_path: Path, point: str, victim: str
) -> None:
    """SIGKILL of pytest, of the supervisor or of a service, while an environment starts, runs or
    is torn down, and Ctrl-C while it starts: every process ends, and after ``envbox clean`` no
    cgroup, network namespace or mount of it remains."""
    (tmp_path / "conftest.py").write_text(textwrap.dedent(MATRIX_CONFTEST))
    (tmp_path / "test_matrix.py").write_text(textwrap.dedent(MATRIX_TESTS))
    reports = tmp_path / "reports"
    reports.mkdir()
    mounts = _mountinfo()
    env = {**os.environ, "REPORT_DIR": str(reports), "PYTHONPATH": str(Path(__file__).parents[2]),
           "IGNORE_TERM": "1" if point == "teardown" else ""}
    child = subprocess.Popen(
        [sys.executable, "-m", "pytest", *PLUGIN_ARGS, "-q", "-p", "no:cacheprovider",
         f"--basetemp={tmp_path / 'basetemp'}", "-p", "no:xdist", f"test_matrix.py::test_{point}"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    first = reports / "first"
    try:
        assert _until(lambda: first.exists() or child.poll() is not None, 60), "no report"
        assert first.exists(), child.stdout.read().decode() if child.stdout else ""
        info = json.loads(first.read_text())
        pid, sup = info["pid"], info["supervisor"]
        cgroups = [d for d in cgroup_dirs(pid).values() if "/envbox-" in d]
        if point == "teardown":  # kill while the teardown waits for "first" to stop
            log = Path(info["log"])
            assert _until(lambda: "got-term" in log.read_text(), 30), "teardown never began"
        if victim == "ctrl-c":  # what the terminal sends pytest's process group; pytest tears down
            os.kill(child.pid, signal.SIGINT)
        else:
            os.kill({"pytest": child.pid, "supervisor": sup, "service": pid}[victim], signal.SIGKILL)
        if victim != "pytest" and point != "running":
            # pytest carries on: the start fails, or the teardown ends, and so does the run.
            quick = 10 if victim == "ctrl-c" else 60  # Ctrl-C: about a second here
            assert _until(lambda: child.poll() is not None, quick), "pytest did not finish"
    finally:
        _kill_processes_in(tmp_path)  # test_running waits forever: it is SIGKILLed too
        child.wait()
    # Every process of it ends by itself: the service, its init and namespace, the supervisor.
    assert _until(lambda: not alive(pid) and not holders(info["pidns"]), 10)
    assert _until(lambda: not alive(sup), 10)
    r = subprocess.run([sys.executable, "-m", "pytest_envbox.cli", "clean"], capture_output=True,
                       text=True, timeout=60, env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert not any(os.path.exists(d) for d in cgroups), cgroups
    assert _until(lambda: not holders(info["netns"]), 10)
    assert _mountinfo() == mounts


def test_the_temporary_directory_of_a_run_killed_whole_goes_with_envbox_clean(tmp_path: Path) -> None:
    """An Environment without a workdir makes a temporary directory, which its supervisor removes;
    when the script and its supervisor are both SIGKILLed, `envbox clean` does."""
    script = textwrap.dedent("""
        import os, sys, threading
        from pytest_envbox import Environment, Service
        from pytest_envbox.engine.client import get_supervisor
        env = Environment([Service("w", ["sleep", "1000"])])
        env.open()
        print(env.workdir, get_supervisor().pid, env["w"].pid, flush=True)
        threading.Event().wait(120)
    """)
    from pytest_envbox.supervisor.records import janitor

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    with janitor() as mine:  # no supervisor starting meanwhile cleans up first: `envbox clean` does
        assert mine
        _run_killed_whole(tmp_path, script, env)


def _run_killed_whole(tmp_path: Path, script: str, env: dict[str, str]) -> None:
    child = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path, env=env,
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert child.stdout is not None
        workdir, sup, pid = child.stdout.readline().split()
        assert os.path.isdir(workdir) and os.path.basename(workdir).startswith("envbox-")
    finally:
        _kill_processes_in(tmp_path)  # the script and its supervisor, at once
        child.wait()
    assert _until(lambda: not alive(int(sup)) and not alive(int(pid)), 10)
    assert os.path.isdir(workdir)  # nobody was left to remove it...
    r = subprocess.run([sys.executable, "-m", "pytest_envbox.cli", "clean"], capture_output=True,
                       text=True, timeout=60, env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert not os.path.exists(workdir), r.stdout  # ...until now
    assert f"removed {os.path.realpath(workdir)}" in r.stdout
