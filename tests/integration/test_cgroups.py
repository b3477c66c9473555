"""Limits, figures, the freezer and cleanup of services' cgroups, checked against the kernel's files.

Runs on whatever this host has: cgroup v1 (hybrid here), and cgroup v2 in the ``cgroupv2`` tox lane
(a real v2 kernel in a VM). Where the test reads a kernel file directly, it picks the v1 or v2 name.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pytest_envbox import EnvboxError, Environment, Service, ServiceFailed, probe
from pytest_envbox.engine.client import SupervisorClient
from pytest_envbox.kernel.cgroups import clean_stale, detect
from pytest_envbox.wait import Deadline, wait_until
from tests.kernel import cgroup_dirs, read_cgroup_file

PY = sys.executable
V2 = detect().version == "v2"

pytestmark = pytest.mark.skipif(
    detect().version == "none", reason="no cgroup filesystem mounted on this host"
)

HOG = "import time\nb = []\nprint('ready', flush=True)\nwhile True:\n    b.append(b'x' * (1 << 20))\n"
BUSY = "print('ready', flush=True)\nwhile True: pass\n"


def _until(cond: object, timeout: float) -> bool:
    return wait_until(lambda: True if cond() else None, Deadline(timeout)) is True  # type: ignore[operator]


def _limit_files(dirs: dict[str, str]) -> dict[str, str]:
    if V2:
        d = dirs["unified"]
        return {"memory": read_cgroup_file(f"{d}/memory.max"), "cpu": read_cgroup_file(f"{d}/cpu.max"),
                "pids": read_cgroup_file(f"{d}/pids.max")}  # fmt: skip
    return {
        "memory": read_cgroup_file(f"{dirs['memory']}/memory.limit_in_bytes"),
        "cpu": read_cgroup_file(f"{dirs['cpu']}/cpu.cfs_quota_us") + " "
        + read_cgroup_file(f"{dirs['cpu']}/cpu.cfs_period_us"),
        "pids": read_cgroup_file(f"{dirs['pids']}/pids.max"),
    }


@pytest.mark.needs_cgroups
def test_limits_are_in_the_kernel_and_the_service_sees_its_cgroup_as_root() -> None:
    svc = Service("lim", ["sleep", "1000"], limits={"memory": "48Mi", "cpu": "250m", "pids": 20})
    with Environment([svc]) as env:
        h = env["lim"]
        assert h.pid is not None
        dirs = cgroup_dirs(h.pid)
        assert all("/envbox-" in d for c, d in dirs.items() if c in ("memory", "pids", "unified"))
        assert _limit_files(dirs) == {"memory": str(48 << 20), "cpu": "25000 100000", "pids": "20"}
        # Its own view (cgroup namespace): its cgroup is "/" in every hierarchy.
        # An exec'd command is in the same cgroup (outside it, its paths would read "/..").
        inside = h.exec(["cat", "/proc/self/cgroup"]).stdout.split()
        assert inside and all(line.endswith(":/") for line in inside), inside
        assert h.exec(["cat", "/proc/1/cgroup"]).stdout.split() == inside
    for d in dirs.values():
        if "/envbox-" in d:
            assert not os.path.exists(d), f"{d} left behind"


@pytest.mark.needs_cgroups
def test_oom_kill_before_ready_names_the_service_and_the_limit() -> None:
    svc = Service("hog", [PY, "-c", HOG], limits={"memory": "48Mi"}, ready=probe.log("never"))
    with pytest.raises(ServiceFailed) as info:
        Environment([svc]).open()
    assert "service 'hog' was OOM-killed (memory limit 48Mi)" in str(info.value)


@pytest.mark.needs_cgroups
def test_oom_kill_while_running_is_counted() -> None:
    go = "import os, time\nwhile not os.path.exists('/tmp/go'):\n    time.sleep(0.01)\n"
    svc = Service("hog", [PY, "-c", go + HOG], limits={"memory": "48Mi"})
    with Environment([svc]) as env:
        h = env["hog"]
        assert h.stats().oom_kills == 0
        h.exec(["touch", "/tmp/go"])  # now it grows until the kernel kills it
        assert _until(lambda: not h.running, 30)
        assert h.returncode == 128 + signal.SIGKILL
        st = h.stats()
        assert st.oom_kills >= 1
        assert 40 << 20 <= st.memory_peak_bytes <= (48 << 20) + (1 << 20)
        assert "was OOM-killed (memory limit 48Mi)" in (h.exit_reason or "")


@pytest.mark.needs_cgroups
def test_cpu_limit_200m_gives_about_a_fifth_of_a_core() -> None:
    svc = Service("busy", [PY, "-c", BUSY], limits={"cpu": "200m"}, ready=probe.log("ready"))
    with Environment([svc]) as env:
        h = env["busy"]
        s0, t0 = h.stats().cpu_seconds, time.monotonic()
        threading.Event().wait(2.0)  # the measurement window, not a synchronisation
        s1, t1 = h.stats().cpu_seconds, time.monotonic()
        share = (s1 - s0) / (t1 - t0)
        assert 0.10 <= share <= 0.30, f"a 200m service used {share:.0%} of a core"


FORKER = """
import os, time
n = 0
for _ in range(100):
    try:
        if os.fork() == 0:
            time.sleep(1000)
            os._exit(0)
        n += 1
    except OSError:
        pass
print("forked", n, flush=True)
time.sleep(1000)
"""


@pytest.mark.needs_cgroups
def test_pids_limit_caps_the_number_of_tasks() -> None:
    svc = Service("forker", [PY, "-c", FORKER], limits={"pids": 16}, ready=probe.log("forked"))
    with Environment([svc]) as env:
        h = env["forker"]
        m = re.search(r"forked (\d+)", h.logs())
        assert m is not None
        forked = int(m.group(1))
        assert forked < 16  # the service itself and its init count too
        st = h.stats()
        assert st.pids <= 16
        assert h.pid is not None
        dirs = cgroup_dirs(h.pid)
        current = read_cgroup_file(f"{dirs['unified' if V2 else 'pids']}/pids.current")
        assert int(current) <= 16


@pytest.mark.needs_cgroups
def test_pause_stops_cpu_time_and_resume_restarts_it() -> None:
    svc = Service("spin", [PY, "-c", BUSY], ready=probe.log("ready"))
    with Environment([svc]) as env:
        h = env["spin"]
        h.pause()
        a = h.stats().cpu_seconds
        threading.Event().wait(0.3)
        b = h.stats().cpu_seconds
        assert b - a < 0.01, f"a paused service used {b - a:.3f} s of cpu"
        h.resume()
        assert _until(lambda: h.stats().cpu_seconds - b > 0.05, 5)
        # A paused service is still torn down, resumed first so that it handles SIGTERM (not
        # left frozen until the stop timeout ends in SIGKILL): pause it again and leave it so.
        h.pause()
    assert not h.running
    assert h.returncode == 128 + signal.SIGTERM


@pytest.mark.needs_cgroups
def test_a_paused_service_refuses_exec_and_still_stops_cleanly() -> None:
    """stop() resumes it first, so SIGTERM is handled (143), not left pending until SIGKILL."""
    with Environment([Service("nap", ["sleep", "1000"], stop_timeout="20s")]) as env:
        h = env["nap"]
        h.pause()
        with pytest.raises(EnvboxError, match=r"service 'nap'.*paused.*resume\(\) it first"):
            h.exec(["true"])
        h.stop()
        assert h.returncode == 128 + signal.SIGTERM


@pytest.mark.needs_cgroups
def test_a_restarted_service_gets_a_fresh_cgroup() -> None:
    with Environment([Service("idle", ["sleep", "1000"], limits={"pids": 8})]) as env:
        h = env["idle"]
        # A command run in the service counts in its cgroup: one second of busy loop.
        h.exec(["timeout", "1", "sh", "-c", "while :; do :; done"])
        used = h.stats().cpu_seconds
        assert used >= 0.1  # of the second's core: less when another process shares it
        h.restart()
        assert h.stats().cpu_seconds < used / 2  # the new run's figures, not the old run's


@pytest.mark.needs_cgroups
def test_cgroups_a_service_made_below_its_own_are_removed_too() -> None:
    """A service managing cgroups (a container runtime, systemd) nests its own: all are removed,
    and every process in them is killed, even one outside the service's PID namespace."""
    stray = subprocess.Popen(["sleep", "1000"])  # not the service's: only its cgroup says so
    try:
        with Environment([Service("nest", ["sleep", "1000"], limits={"pids": 8})]) as env:
            h = env["nest"]
            assert h.pid is not None
            pid = h.pid
            dirs = {d for d in cgroup_dirs(pid).values() if "/envbox-" in d}
            assert dirs
            for d in dirs:
                os.makedirs(f"{d}/inner/deeper")
                for p in (pid, stray.pid):
                    with open(f"{d}/inner/deeper/cgroup.procs", "w") as f:
                        f.write(str(p))
            assert all(d + "/inner/deeper" in cgroup_dirs(stray.pid).values() for d in dirs)
        assert not any(os.path.exists(d) for d in dirs), dirs
        assert stray.wait(timeout=5) == -signal.SIGKILL
    finally:
        stray.kill()
        stray.wait()


WORKER_HOG = """
import os, sys, time
print("ready", flush=True)
while not os.path.exists("/tmp/go"):
    time.sleep(0.01)
child = os.fork()
if child == 0:
    b = []
    while True:
        b.append(b"x" * (1 << 20))
os.waitpid(child, 0)
print("worker lost", flush=True)
if os.path.exists("/tmp/exit"):
    sys.exit(1)
time.sleep(1000)
"""


@pytest.mark.needs_cgroups
@pytest.mark.parametrize("end", ["exits-by-itself", "killed-by-the-test"])
def test_a_worker_oom_killed_is_told_apart_from_the_service_oom_killed(end: str) -> None:
    svc = Service("pool", [PY, "-c", WORKER_HOG], limits={"memory": "48Mi"}, ready=probe.log("ready"))
    with Environment([svc]) as env:
        h = env["pool"]
        if end == "exits-by-itself":
            h.exec(["touch", "/tmp/exit"])
        h.exec(["touch", "/tmp/go"])
        h.wait_for_log("worker lost", timeout=30)
        if end == "killed-by-the-test":
            assert h.running and h.stats().oom_kills >= 1
            h.kill()  # SIGKILL from the test: 137, but not the OOM killer's
            code = 137
        else:
            assert _until(lambda: not h.running, 10)
            code = 1
        assert h.returncode == code
        assert h.exit_reason == (f"exited with return code {code} after {h.runs[-1].oom_kills} of its "
                             "processes were OOM-killed (memory limit 48Mi)")  # fmt: skip


@pytest.mark.needs_cgroups
def test_stats_of_a_service_without_limits() -> None:
    with Environment([Service("plain", ["sleep", "1000"])]) as env:
        st = env["plain"].stats()
        assert st.pids == 2  # its init and sleep
        assert st.memory_bytes > 0
        assert st.oom_kills == 0


@pytest.mark.needs_cgroups
def test_a_killed_supervisor_leaves_cgroups_that_the_next_one_removes() -> None:
    sup = SupervisorClient()
    try:
        import pytest_envbox.engine.environment as environment

        original = environment.get_supervisor
        environment.get_supervisor = lambda: sup
        try:
            env = Environment([Service("stale", ["sleep", "1000"], limits={"pids": 8})])
            env.open()
        finally:
            environment.get_supervisor = original
        pid = env["stale"].pid
        assert pid is not None
        dirs = [d for d in cgroup_dirs(pid).values() if "/envbox-" in d]
        runs = {os.path.dirname(d) for d in dirs}
        assert runs
        os.kill(sup.pid, signal.SIGKILL)
        assert _until(lambda: not env["stale"].running, 5)
        env.close()
        assert all(os.path.isdir(r) for r in runs), "a SIGKILLed supervisor cannot clean up"
    finally:
        sup.close()
    # What `envbox clean` and every new supervisor do first:
    removed = clean_stale()
    assert runs <= set(removed)
    assert not any(os.path.exists(r) for r in runs)


@pytest.mark.needs_root("writes a stale run directory into the host's cgroup tree")
def test_envbox_doctor_reports_cgroups_and_clean_removes_stale_runs() -> None:
    # A generous bound: in the cgroup v2 VM lane, Python runs 20 to 40 times slower.
    r = subprocess.run([PY, "-m", "pytest_envbox.cli", "doctor"], capture_output=True, text=True,
                       timeout=240)  # fmt: skip
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("cgroups"))
    assert "OK" in line and detect().version in line and "memory cpu pids" in line, line
    # A run directory whose supervisor is gone (no such pid and start time): stale.
    host = detect()
    own = host.unified if host.version == "v2" else host.v1["pids"]
    assert own is not None
    stale = os.path.join(own, "envbox-999999999-1")
    os.mkdir(stale)
    os.mkdir(os.path.join(stale, "1.svc"))
    sibling = os.path.join(own, "not-envbox")  # never touched
    os.mkdir(sibling)
    try:
        r = subprocess.run([PY, "-m", "pytest_envbox.cli", "clean"], capture_output=True, text=True,
                           timeout=240)  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert f"removed {stale}" in r.stdout
        assert not os.path.exists(stale)
        assert os.path.isdir(sibling)
    finally:
        for d in (os.path.join(stale, "1.svc"), stale, sibling):
            if os.path.isdir(d):
                os.rmdir(d)


SCRIPT = """
import sys
from pytest_envbox import Environment, HostUnsupported, Service
try:
    with Environment([Service("inner", ["sleep", "1000"], limits={"pids": 9})]) as env:
        print(open(f"/proc/{env['inner'].pid}/cgroup").read().strip().split("::")[1])
        print(open(f"/proc/self/cgroup").read().strip().split("::")[1])
except HostUnsupported as e:
    print("unsupported:", e)
"""


def _run_script_in(cg: str, script: str) -> subprocess.CompletedProcess[str]:
    """Run ``script`` with a new Python whose shell first moved itself into cgroup ``cg``."""
    return subprocess.run(
        ["sh", "-c", f'echo $$ > {cg}/cgroup.procs && exec "$0" -c "$1"', PY, script],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.dirname(__file__)))},
    )  # fmt: skip


@pytest.mark.skipif(not V2, reason="the 'no internal processes' rule is cgroup v2's")
@pytest.mark.parametrize("case", ["delegated", "not-delegated", "shared-with-a-stranger"])
def test_v2_test_run_in_a_cgroup_with_processes(case: str) -> None:
    """A test run in a delegated cgroup of its own moves itself to a leaf (once: a second run from
    the leaf puts its runs next to it). Processes in a cgroup not delegated to the test run, or
    shared with a stranger, are never moved: a clear refusal instead."""
    from pytest_envbox.kernel import cgroups

    own = detect().unified
    assert own is not None
    cgroups.enable_controllers(own)  # the parent of a cgroup made for a test run passes the controllers on
    cg = os.path.join(own, f"envbox-test-{os.getpid()}")
    os.mkdir(cg)
    if case != "not-delegated":
        os.setxattr(cg, "trusted.delegate", b"1")  # what systemd's Delegate=yes sets
    other = None
    try:
        if case == "shared-with-a-stranger":
            other = subprocess.Popen(["sleep", "1000"])
            with open(f"{cg}/cgroup.procs", "w") as f:
                f.write(str(other.pid))
        r = _run_script_in(cg, SCRIPT)
        assert r.returncode == 0, r.stderr
        rel = cg[len(own):]
        if case == "delegated":
            service_cg, runner_cg = r.stdout.split()
            assert re.fullmatch(re.escape(rel) + r"/envbox-\d+-\d+/\d+", service_cg), service_cg
            assert runner_cg == rel + "/envbox-tests"
            # The next run starts in the leaf: its services go next to the leaf, not into it.
            r = _run_script_in(os.path.join(cg, "envbox-tests"), SCRIPT)
            assert r.returncode == 0, r.stderr
            service_cg, runner_cg = r.stdout.split()
            assert re.fullmatch(re.escape(rel) + r"/envbox-\d+-\d+/\d+", service_cg), service_cg
            assert runner_cg == rel + "/envbox-tests"
            assert not os.path.exists(os.path.join(cg, "envbox-tests", "envbox-tests"))
        else:
            assert "unsupported:" in r.stdout and "no internal processes" in r.stdout, r.stdout
            assert "inner" in r.stdout and "systemd-run" in r.stdout and "delegate" in r.stdout
            assert not os.path.exists(os.path.join(cg, "envbox-tests")), "moved processes"
    finally:
        if other is not None:
            other.kill()
            other.wait()
        leaf = os.path.join(cg, "envbox-tests")
        for d in (leaf, cg):
            if os.path.isdir(d):
                assert _until(lambda d=d: not read_cgroup_file(f"{d}/cgroup.procs"), 10)
                assert not [n for n in os.listdir(d) if n.startswith("envbox-") and n != "envbox-tests"]
                os.rmdir(d)


READONLY_SCRIPT = """
import warnings
from pytest_envbox import Environment, HostUnsupported, Service
try:
    with Environment([Service("capped", ["sleep", "1000"], limits={"memory": "64Mi"})]):
        print("started with limits")
except HostUnsupported as e:
    print("unsupported:", e)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for _ in range(2):
        with Environment([Service("free", ["sleep", "1000"])]) as env:
            print("started without limits", env["free"].running)
            try:
                env["free"].stats()
            except HostUnsupported as e:
                print("stats:", e)
print("warnings:", len([w for w in caught if "without cgroups" in str(w.message)]))
"""


@pytest.mark.needs_root("remounts the cgroup filesystem read-only in a mount namespace")
def test_a_read_only_cgroupfs_refuses_limits_but_runs_the_rest() -> None:
    """As in a container whose /sys/fs/cgroup is read-only: a real read-only mount, in a private
    mount namespace of the child only."""
    import shutil

    if shutil.which("unshare") is None:
        pytest.skip("needs util-linux unshare")
    remount = ("for m in $(awk '$9==\"cgroup\"||$9==\"cgroup2\"{print $5}' /proc/self/mountinfo); "
               "do mount -o remount,bind,ro \"$m\"; done")  # fmt: skip
    r = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         f'{remount} && exec "$0" -c "$1"', PY, READONLY_SCRIPT],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.dirname(__file__)))},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "started with limits" not in out, out
    assert "unsupported: service 'capped' declares limits, but cgroups cannot be used here" in out
    assert "read-only" in out and "--privileged" in out
    assert out.count("started without limits True") == 2
    assert "stats: service 'free': stats() needs cgroups" in out
    assert "warnings: 1" in out  # said once, not per environment


def _as_user_in(cg: str, uid: int, work: Callable[[], str]) -> str:
    """Fork; the child enters cgroup ``cg`` as root, becomes ``uid`` (no capabilities left) and
    returns ``work()``'s text (or its error) through a pipe. The interpreter is already loaded:
    the unprivileged child needs no access to where Python is installed."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        out = "child failed"
        try:
            os.close(r)
            with open(f"{cg}/cgroup.procs", "w") as f:
                f.write("0")
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            out = work()
        except BaseException as e:
            out = f"error: {type(e).__name__}: {e}"
        finally:
            os.write(w, out.encode())
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        text = f.read()
    os.waitpid(pid, 0)
    return text


@pytest.mark.skipif(not V2 or os.geteuid() != 0, reason="a cgroup v2 delegation, set up as root")
def test_v2_an_unprivileged_user_uses_a_subtree_delegated_to_it() -> None:
    """What ``systemd-run --user --scope -p Delegate=yes`` gives a user: its own cgroup, owned by
    it, marked delegated. The cgroup layer then works without any privilege: its run moves to a
    leaf, services get cgroups with limits, figures, the freezer, kill and removal."""
    from pytest_envbox.kernel import cgroups

    own = detect().unified
    assert own is not None
    cgroups.enable_controllers(own)  # what systemd does for a delegated unit's parent
    cg = os.path.join(own, f"envbox-user-{os.getpid()}")
    os.mkdir(cg)
    uid = 4321
    for name in ("", "cgroup.procs", "cgroup.subtree_control", "cgroup.threads"):
        os.chown(os.path.join(cg, name), uid, uid)
    os.setxattr(cg, "user.delegate", b"1")  # as a user's systemd marks it

    def work() -> str:
        tree = cgroups.CgroupTree(cgroups.detect(), cgroups.run_name(os.getpid()))
        if tree.problem:
            return "problem: " + tree.problem
        svc = tree.new()
        svc.set_limits(memory=32 << 20, cpu=0.5, pids=8)
        child = subprocess.Popen(["sleep", "1000"])
        svc.add(child.pid)
        st = svc.stats()
        assert isinstance(svc, cgroups.V2Cgroup)
        limit = read_cgroup_file(f"{svc.path}/memory.max")
        svc.freeze(True)
        svc.freeze(False)
        svc.kill()
        child.wait()
        tree.remove()
        return f"ok pids={st['pids']} memory.max={limit} empty={svc.is_empty()}"

    try:
        out = _as_user_in(cg, uid, work)
        assert out == f"ok pids=1 memory.max={32 << 20} empty=True", out
        assert not [n for n in os.listdir(cg) if n.startswith("envbox-") and n != "envbox-tests"]
    finally:
        leaf = os.path.join(cg, "envbox-tests")
        for d in (leaf, cg):
            if os.path.isdir(d):
                assert _until(lambda d=d: not read_cgroup_file(f"{d}/cgroup.procs"), 10)
                os.rmdir(d)


@pytest.mark.skipif(not V2 or os.geteuid() != 0, reason="a cgroup v2 delegation, set up as root")
def test_v2_rootless_services_get_their_limits_in_a_subtree_delegated_to_the_user() -> None:
    """Rootless mode end to end on cgroup v2: an unprivileged user in a cgroup delegated to it
    (as ``systemd-run --user --scope -p Delegate=yes`` makes) runs services in a user namespace,
    each with its limits in a cgroup of its own."""
    from pytest_envbox import Environment, Service
    from pytest_envbox.engine import client as _client
    from pytest_envbox.kernel import cgroups

    python = "/usr/bin/python3"
    if not os.access(python, os.X_OK):
        pytest.skip("no system python3 for the unprivileged user's supervisor")
    own = detect().unified
    assert own is not None
    cgroups.enable_controllers(own)
    cg = os.path.join(own, f"envbox-rootless-{os.getpid()}")
    os.mkdir(cg)
    uid = 4322
    for name in ("", "cgroup.procs", "cgroup.subtree_control", "cgroup.threads"):
        os.chown(os.path.join(cg, name), uid, uid)
    os.setxattr(cg, "user.delegate", b"1")

    def work() -> str:
        # This test's interpreter may live where the user may not read (/root): the supervisor
        # runs the system's, with the package from where it is installed (readable).
        sys.executable = python
        _client.set_rootless_mode("auto")  # not root: rootless
        services = [Service("capped", ["sleep", "1000"], limits={"memory": "48Mi", "cpu": "500m",
                                                                  "pids": 8})]  # fmt: skip
        with Environment(services, rootdir="/") as env:
            pid = env["capped"].pid
            assert pid is not None
            with open(f"/proc/{pid}/uid_map") as f:
                mapping = f.read().split()[:3]
            dirs = cgroup_dirs(pid)
            path = dirs["unified"]
            limits = [read_cgroup_file(f"{path}/{n}") for n in ("memory.max", "cpu.max", "pids.max")]
            stats = env["capped"].stats()  # its init and the service: 2 pids
        return f"map={mapping} limits={limits} pids={stats.pids} gone={not os.path.exists(path)}"

    try:
        out = _as_user_in(cg, uid, work)
        assert out == (f"map=['0', '{uid}', '1'] limits=['{48 << 20}', '50000 100000', '8'] "
                       "pids=2 gone=True"), out
    finally:
        leaf = os.path.join(cg, "envbox-tests")
        for d in (leaf, cg):
            if os.path.isdir(d):
                assert _until(lambda d=d: not read_cgroup_file(f"{d}/cgroup.procs"), 10)
                for sub in sorted((os.path.join(d, n) for n in os.listdir(d)
                                   if os.path.isdir(os.path.join(d, n))), reverse=True):  # fmt: skip
                    os.rmdir(sub)
                os.rmdir(d)


_CLONE_INTO = """
import os, sys
from pytest_envbox.kernel import linux as L
fd = os.open(sys.argv[1], os.O_PATH | os.O_DIRECTORY)
helper = os.fork()
if helper == 0:  # clones a child of ours straight into the cgroup, as the zygote clones spares
    try:
        if L.fork_with(L.CLONE_PARENT | L.CLONE_NEWPID, python_fixups=False, cgroup_fd=fd) == 0:
            os._exit(7)
    except OSError as e:
        print(e, flush=True)
    os._exit(0)
os.waitpid(helper, 0)
pid, status = os.wait()  # the spare-like child is ours (CLONE_PARENT)
print("child", os.waitstatus_to_exitcode(status))
"""


def _v2_root() -> str | None:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        if " - cgroup2 " in line:
            return line.split()[4]
    return None


@pytest.mark.skipif(os.geteuid() != 0, reason="clones into the cgroup v2 root: needs root")
def test_clone_parent_into_a_v2_cgroup() -> None:
    """clone3(CLONE_PARENT | CLONE_INTO_CGROUP), as the zygote makes each spare on cgroup v2:
    clone3 refuses an exit signal with CLONE_PARENT, which once made every spare on v2 fail."""
    root = _v2_root()
    if root is None:
        pytest.skip("no cgroup v2 hierarchy is mounted")
    own = [ln[3:] for ln in Path("/proc/self/cgroup").read_text().splitlines() if ln.startswith("0::")]
    target = root + (own[0] if own else "/")
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", _CLONE_INTO, target], capture_output=True, text=True,
                          timeout=30, cwd=repo)  # fmt: skip
    assert done.stdout.strip() == "child 7", done.stdout + done.stderr
