"""Starting, reaching, stopping and entering services; readiness; nothing left behind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pytest_envbox import Environment, NotReady, Service, ServiceFailed, probe
from pytest_envbox.engine.client import get_supervisor
from pytest_envbox.wait import Deadline, wait_until
from tests.kernel import alive, holders, ns_inode, our_mounts, started_sandboxes

PY = sys.executable
HTTP = [PY, "-m", "http.server", "8000", "--bind", "127.0.0.1"]


def py(code: str) -> list[str]:
    return [PY, "-c", textwrap.dedent(code)]


def eventually(cond: object, timeout: float = 10.0) -> bool:
    return wait_until(lambda: True if cond() else None, Deadline(timeout)) is True  # type: ignore[operator]


def test_published_port_answers_on_127_0_0_1_only() -> None:
    with Environment([Service("web", HTTP, ports=[8000], ready=probe.http(8000))]) as env:
        web = env["web"]
        assert web.http.get("/").status_code == 200
        assert web.url("/x").startswith(f"http://127.0.0.1:{web.port(8000)}/")
        s = socket.socket()
        with pytest.raises(ConnectionRefusedError):
            s.connect(("127.0.0.2", web.port(8000)))  # still loopback, another address
        s.close()


def test_restart_gives_a_new_pid_and_the_port_answers_again() -> None:
    with Environment([Service("web", HTTP, ports=[8000], ready=probe.tcp(8000))]) as env:
        web = env["web"]
        old_pid, port = web.pid, web.port(8000)
        web.restart()
        assert web.running and web.pid != old_pid and web.pid is not None
        assert not alive(old_pid)  # type: ignore[arg-type]
        assert web.port(8000) == port
        assert web.http.get("/").status_code == 200


def test_exec_runs_inside_the_service() -> None:
    with Environment([Service("box", ["sleep", "1000"])]) as env:
        box = env["box"]
        r = box.exec(["sh", "-c", "hostname; readlink /proc/self/ns/pid; echo $HOME; cat"],
                     input="from stdin")  # fmt: skip
        hostname, pidns, home, stdin = r.stdout.splitlines()
        assert r.returncode == 0
        assert hostname == "box"
        assert pidns == ns_inode(box.pid, "pid")  # type: ignore[arg-type]
        assert home == "/home/envbox"
        assert stdin == "from stdin"
        assert box.exec(["sh", "-c", "exit 3"]).returncode == 3
        missing = box.exec(["no-such-command-xyz"])
        assert missing.returncode == 127 and "no-such-command-xyz" in missing.stderr
        with pytest.raises(subprocess.TimeoutExpired):
            box.exec(["sleep", "30"], timeout=0.3)


def test_sigterm_reaches_the_service_through_init() -> None:
    code = """
        import signal, sys
        def bye(*_):
            print("got SIGTERM", flush=True)
            sys.exit(7)
        signal.signal(signal.SIGTERM, bye)
        print("ready", flush=True)
        while True:
            signal.pause()
    """
    with Environment([Service("term", py(code), ready=probe.log("^ready$"))]) as env:
        term = env["term"]
        term.stop(timeout=5)
        assert term.returncode == 7
        assert "got SIGTERM" in term.logs()
        # From inside: PID 1 is the init, which has a handler and passes SIGTERM on (without
        # one, the kernel would drop a signal sent to a namespace's PID 1).
        term.start()
        term.exec([sys.executable, "-c", "import os, signal; os.kill(1, signal.SIGTERM)"])
        assert eventually(lambda: not term.running) and term.returncode == 7
        assert term.logs().count("got SIGTERM") == 2


def test_returncode_is_128_plus_signal_and_kill_waits() -> None:
    with Environment([Service("victim", ["sleep", "1000"])]) as env:
        v = env["victim"]
        pid = v.pid
        assert v.exit_reason is None and v.runs[-1].stopped is None
        v.kill()
        assert not v.running and v.returncode == 128 + signal.SIGKILL
        assert v.exit_reason == "exited with return code 137"
        assert v.runs[-1].returncode == 137 and v.runs[-1].oom_kills == 0
        assert not alive(pid)  # type: ignore[arg-type]
        v.start()
        assert v.running and v.exit_reason is None
        assert len(v.runs) == 2 and v.runs[1].started >= v.runs[0].stopped  # type: ignore[operator]


def test_orphans_are_reaped_no_zombies() -> None:
    code = """
        import os, signal, time
        for i in range(3):
            pid = os.fork()
            if pid == 0:
                if os.fork() == 0:          # orphaned at once: its parent exits below
                    time.sleep(0.2)
                    print("orphan", os.getpid(), "exits", flush=True)
                    os._exit(0)
                os._exit(0)
            os.waitpid(pid, 0)
        print("ready", flush=True)
        signal.pause()
    """
    with Environment([Service("forker", py(code), ready=probe.log("^ready$"))]) as env:
        f = env["forker"]
        pidns = ns_inode(f.pid, "pid")  # type: ignore[arg-type]
        assert eventually(lambda: f.logs().count("exits") == 3)

        def zombies() -> list[int]:
            out = []
            for pid in holders(pidns):
                with open(f"/proc/{pid}/stat") as st:
                    if st.read().rsplit(")", 1)[1].split()[0] == "Z":
                        out.append(pid)
            return out

        assert eventually(lambda: zombies() == [] and len(holders(pidns)) == 2), zombies()


def test_readiness_probes_of_each_kind() -> None:
    services = [
        Service("t", HTTP, ready=probe.tcp(8000)),
        Service("h", HTTP, ports=[8000], ready=probe.http(8000, "/", status=200)),
        Service("l", py("print('hello there', flush=True); import time; time.sleep(100)"),
                ready=probe.log(r"hello \w+")),
        Service("e", ["sleep", "1000"], ready=probe.exec(["true"])),
    ]
    with Environment(services) as env:
        assert all(env[n].running for n in "thle")
        # Ready means ready: the tcp-probed server answers at once.
        connect = "import socket; socket.create_connection(('127.0.0.1', 8000), timeout=1)"
        assert env["t"].exec([PY, "-c", connect]).returncode == 0
        assert env["h"].http.get("/").status_code == 200


def test_exit_before_ready_fails_at_once_with_code_and_log() -> None:
    svc = Service("crash", ["sh", "-c", "echo starting up; echo fatal: no config >&2; exit 3"],
                  ready=probe.tcp(9, timeout="30s"))  # fmt: skip
    env = Environment([svc])
    with pytest.raises(ServiceFailed) as info:
        env.open()
    msg = str(info.value)
    assert info.value.returncode == 3
    assert "crash" in msg and "3" in msg and "fatal: no config" in msg


def test_probe_timeout_raises_not_ready_with_probe_and_log() -> None:
    svc = Service("slow", ["sh", "-c", "echo still warming up; exec sleep 100"],
                  ready=probe.tcp(8123, timeout=0.5))  # fmt: skip
    with pytest.raises(NotReady) as info, Environment([svc]):
        pass
    assert "slow" in str(info.value) and "8123" in str(info.value)
    assert "still warming up" in str(info.value)


def test_wait_for_log_returns_the_match() -> None:
    talk = Service("talk", py("print('port=4242', flush=True); import time; time.sleep(100)"))
    with Environment([talk]) as env:
        m = env["talk"].wait_for_log(r"port=(\d+)", timeout=10)
        assert m.group(1) == "4242"
        with pytest.raises(NotReady):
            env["talk"].wait_for_log("never printed", timeout=0.2)


def test_teardown_leaves_no_process_namespace_or_temp_dir() -> None:
    code = """
        import os, signal
        for _ in range(2):
            if os.fork() == 0:
                signal.pause()
        print("ready", flush=True)
        signal.pause()
    """
    sup = get_supervisor()
    before = started_sandboxes(sup.pid)
    env = Environment([Service("family", py(code), ports=[8000], ready=probe.log("^ready$"))])
    with env:
        f = env["family"]
        namespaces = [ns_inode(f.pid, k) for k in ("pid", "net", "mnt", "uts", "ipc")]  # type: ignore[arg-type]
        assert len(holders(namespaces[0])) == 4  # init, service and its two children
        workdir = env.workdir
        assert workdir is not None and workdir.exists()
        mounts_before = our_mounts()
    for ns in namespaces:
        assert holders(ns) == [], ns
    assert started_sandboxes(sup.pid) <= before
    assert not workdir.exists()
    assert our_mounts() == mounts_before


def test_services_start_in_dependency_order() -> None:
    a = Service("a", py("import time; print('a up', time.monotonic(), flush=True); time.sleep(100)"),
                ready=probe.log("a up"))  # fmt: skip
    b = Service("b", ["sleep", "1000"], depends_on=["a"])
    with Environment([b, a]) as env:
        assert list(env.services) == ["a", "b"]


def test_start_adds_a_service_to_a_running_environment() -> None:
    with Environment() as env:
        h = env.start(Service("late", HTTP, ports=[8000], ready=probe.http(8000)))
        assert env["late"] is h and h.http.get("/").status_code == 200
        with pytest.raises(KeyError, match="late"):
            env["missing"]


def test_start_of_a_service_whose_dependencies_already_run() -> None:
    """Regression: the levels already running are skipped, not started as empty levels."""
    base = Service("base", ["sleep", "1000"])
    with Environment([base]) as env:
        base_pid = env["base"].pid
        h = env.start(Service("dep", ["sleep", "1000"], depends_on=["base"]))
        h2 = env.start(Service("dep2", ["sleep", "1000"], depends_on=["base", "dep"]))
        assert h.running and h2.running and env["base"].pid == base_pid
        assert list(env.services) == ["base", "dep", "dep2"]


def test_environment_start_failure_leaves_nothing() -> None:
    good = Service("good", ["sleep", "1000"])
    bad = Service("bad", ["sh", "-c", "exit 1"], depends_on=["good"], ready=probe.tcp(1))
    env = Environment([good, bad])
    with pytest.raises(ServiceFailed):
        env.open()
    assert not env["good"].running
    assert os.path.exists(str(env.workdir)) is False


def test_rootdir_under_host_tmp_stays_visible_read_only(tmp_path: Path) -> None:
    (tmp_path / "data.txt").write_text("from the checkout\n")
    svc = Service("reader", ["sleep", "1000"])
    with Environment([svc], rootdir=tmp_path) as env:
        r = env["reader"].exec(["sh", "-c", "pwd; cat data.txt; touch x 2>&1 || true; ls /tmp"])
        lines = r.stdout.splitlines()
        assert lines[0] == str(tmp_path)
        assert lines[1] == "from the checkout"
        assert "Read-only file system" in r.stdout
        assert tmp_path.name not in lines[3:]  # the rest of the host's /tmp stays hidden


def test_mounts_bind_host_paths_at_targets_that_do_not_exist_on_the_host(tmp_path: Path) -> None:
    (tmp_path / "fixtures").mkdir()
    (tmp_path / "fixtures" / "a.json").write_text("{}\n")
    (tmp_path / "out").mkdir()
    svc = Service("m", ["sleep", "1000"], mounts=[
        {"source": "./fixtures", "target": "/data/in"},
        {"source": str(tmp_path / "out"), "target": "/srv/envbox-out", "readonly": False},
    ])  # fmt: skip
    with Environment([svc], rootdir=tmp_path) as env:
        r = env["m"].exec(["sh", "-c", "cat /data/in/a.json && touch /srv/envbox-out/made && "
                                       "(touch /data/in/x 2>/dev/null && echo writable || echo ro)"])
        assert r.stdout.split() == ["{}", "ro"], r
    assert (tmp_path / "out" / "made").exists()
    assert not Path("/data/in").exists() and not Path("/srv/envbox-out").exists()


def test_cwd_that_is_tmp_itself_keeps_the_private_tmp() -> None:
    with Environment([Service("w", ["sleep", "1000"])], rootdir="/tmp") as env:
        r = env["w"].exec(["sh", "-c", "pwd && touch /tmp/x && ls /tmp"])
        assert r.returncode == 0, r
        assert r.stdout.split() == ["/tmp", "x"]


def test_not_root_with_rootless_mode_off_is_host_unsupported_before_anything_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pytest_envbox import HostUnsupported
    from pytest_envbox.engine import client as _client

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(_client, "_rootless_mode", "no")
    env = Environment([Service("w", ["sleep", "1000"])])
    try:
        with pytest.raises(HostUnsupported, match="rootless mode is off"):
            env.open()
    finally:
        env.close()


def test_kernel_settings_are_read_only_and_secrets_masked() -> None:
    masked = [p for p in ("/proc/kcore", "/proc/keys", "/proc/timer_list", "/proc/sched_debug")
              if os.path.exists(p)]  # fmt: skip
    with Environment([Service("root-svc", ["sleep", "1000"])]) as env:
        r = env["root-svc"].exec(["sh", "-c",
            "cat /proc/sys/kernel/core_pattern > /proc/sys/kernel/core_pattern && echo WROTE; "
            "echo 1 > /proc/sys/vm/drop_caches && echo DROPPED; "
            "touch /var/tmp/mine && echo vartmp-ok; ls /sys/firmware | wc -l"])  # fmt: skip
        assert "WROTE" not in r.stdout and "DROPPED" not in r.stdout
        assert "Read-only file system" in r.stderr
        assert r.stdout.split() == ["vartmp-ok", "0"], r
        for path in masked:
            assert env["root-svc"].exec(["sh", "-c", f"wc -c < {path}"]).stdout.strip() == "0", path


def test_writable_mounts_get_no_devices_and_no_setuid(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    svc = Service("m", ["sleep", "1000"], mounts=[{"source": str(out), "target": "/out",
                                                   "readonly": False}])  # fmt: skip
    with Environment([svc], rootdir=tmp_path) as env:
        r = env["m"].exec(["sh", "-c", "grep ' /out ' /proc/self/mountinfo; "
                                       "mknod /out/disk b 254 0 && echo MKNOD; touch /out/ok"])
        # the last /out line: the service's own mount, on top of any the host has at /out
        opts = [ln for ln in r.stdout.splitlines() if " /out " in ln][-1].split()[5].split(",")
        assert "rw" in opts and "nodev" in opts and "nosuid" in opts, r.stdout
    assert (out / "ok").exists()


def test_exec_timeout_kills_the_command() -> None:
    with Environment([Service("box", ["sleep", "1000"])]) as env:
        box = env["box"]
        pidns = ns_inode(box.pid, "pid")  # type: ignore[arg-type]
        with pytest.raises(subprocess.TimeoutExpired):
            box.exec(["sleep", "77"], timeout=0.3)
        assert eventually(lambda: len(holders(pidns)) == 2)  # init and the service, no sleep 77


def test_exec_probe_that_hangs_is_not_ready() -> None:
    svc = Service("hang", ["sleep", "1000"], ready=probe.exec(["sleep", "100"], timeout=0.5))
    with pytest.raises(NotReady, match="hang"), Environment([svc]):
        pass


def test_a_failing_service_fails_its_parallel_siblings_at_once() -> None:
    import time

    quick = Service("quick", ["sh", "-c", "exit 3"], ready=probe.tcp(1))
    slow = Service("slow", ["sleep", "1000"], ready=probe.tcp(1, timeout=60))
    t0 = time.monotonic()
    env = Environment([quick, slow])
    with pytest.raises(ServiceFailed, match="quick"):
        env.open()
    assert time.monotonic() - t0 < 30  # far below the sibling's 60 s probe timeout
    assert not env["slow"].running


def test_closed_environment_refuses_to_start() -> None:
    from pytest_envbox import EnvboxError

    env = Environment([Service("w", ["sleep", "1000"])])
    with env:
        pass
    with pytest.raises(EnvboxError, match="closed"):
        env.start(Service("late", ["sleep", "1000"]))


def test_wait_for_log_after_restart_sees_only_the_new_run() -> None:
    code = "import os; print('run', os.getpid(), flush=True); import time; time.sleep(100)"
    with Environment([Service("r", py(code), ready=probe.log("^run"))]) as env:
        r = env["r"]
        r.restart()
        m = r.wait_for_log(r"^run (\d+)", timeout=10)
        assert m.group(1) == "2"  # pid 2 in every run: it is the new run's line...
        assert r.logs().count("run 2") == 2  # ...and both runs are in the log


def test_pid_is_the_service_and_an_immediate_stop_is_graceful() -> None:
    for _ in range(20):  # the race this guards against (SIGTERM before init's handlers) is narrow
        with Environment([Service("quick", ["sleep", "1000"])]) as env:
            h = env["quick"]
            cmdline = Path(f"/proc/{h.pid}/cmdline")
            # (right after the exec, the kernel may still be filling in the new command line)
            assert eventually(lambda c=cmdline: c.read_bytes().split(b"\0")[0].endswith(b"sleep"))
            h.stop(timeout=30)
            assert h.returncode == 128 + signal.SIGTERM  # not 137: no SIGKILL after the grace


def test_a_reaped_service_has_no_pid_to_signal() -> None:
    """The kernel reports a reaped process's pidfd as pid -1: never use it as a pid."""
    from pytest_envbox.supervisor.sync import pidfd_pid as _pidfd_pid

    child = subprocess.Popen(["true"])
    fd = os.pidfd_open(child.pid)
    try:
        assert _pidfd_pid(fd) == child.pid
        child.wait()
        assert _pidfd_pid(fd) is None
    finally:
        os.close(fd)


def test_services_that_exit_at_once_never_report_a_bogus_pid() -> None:
    for _ in range(30):
        env = Environment([Service("job", ["true"])])
        try:
            env.open()
        except ServiceFailed:
            pass  # it exited before it could be called ready: fine
        job = env["job"]
        assert job.pid is None or job.pid > 0
        job.kill(signal.SIGTERM)  # a no-op on an exited service, never a stray signal
        env.close()
        assert job.returncode in (0, 128 + signal.SIGTERM)  # ended by itself, or by our kill


def test_a_relative_workdir_is_under_the_rootdir_and_kept(tmp_path: Path) -> None:
    """Regression: ``workdir="wd"`` failed at start (its hosts file was bound by a relative path
    from the sandbox's mount namespace)."""
    env = Environment([Service("cat", ["sh", "-c", "cat /etc/hosts; exec sleep 1000"],
                               ready=probe.log("cat"))],
                      rootdir=tmp_path, workdir="wd")  # fmt: skip
    with env:
        assert env.workdir == tmp_path / "wd"
        assert "cat" in env["cat"].logs()
    assert (tmp_path / "wd" / "cat.log").exists()  # a given workdir is the user's: kept


def test_a_service_that_exits_while_its_exec_probe_starts_is_reported_as_exited() -> None:
    """The probe's exec races the exit (the namespaces vanish under it): the error is the exit,
    with its code and log, never "cannot exec". Often lost 1 start in 10 before."""
    for _ in range(15):
        svc = Service("x", ["sh", "-c", "echo bye; sleep 0.05; exit 3"],
                      ready=probe.exec(["false"], interval="10ms"))  # fmt: skip
        with pytest.raises(ServiceFailed) as e, Environment([svc]):
            pass
        assert "return code 3" in str(e.value) and "bye" in str(e.value), str(e.value)
