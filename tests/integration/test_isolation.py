"""Rows of docs/isolation.md that no other test checks: each one shown from inside a service."""

from __future__ import annotations

import os
import signal
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_envbox import Environment, Service, probe
from pytest_envbox.wait import Deadline, wait_until

NAMESPACES = ("pid", "mnt", "uts", "ipc", "net", "cgroup")


@pytest.fixture(scope="module")
def env() -> Iterator[Environment]:
    with Environment([Service("box", ["sleep", "1000"])]) as e:
        yield e


def test_each_service_has_its_own_namespaces(env: Environment) -> None:
    out = env["box"].exec(["sh", "-c", "for n in " + " ".join(NAMESPACES)
                           + "; do readlink /proc/self/ns/$n; done"]).stdout.split()  # fmt: skip
    host = [os.readlink(f"/proc/self/ns/{n}") for n in NAMESPACES]
    assert len(out) == len(NAMESPACES)
    assert not set(out) & set(host), (out, host)


def test_system_v_ipc_is_private(env: Environment) -> None:
    # A System V message queue made on the host is not in the service's IPC namespace.
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    qid = libc.msgget(0, 0o600 | 0o1000)  # IPC_PRIVATE, IPC_CREAT
    assert qid >= 0, ctypes.get_errno()
    try:
        listed = Path("/proc/sysvipc/msg").read_text().split("\n")[1:]
        assert any(line.split()[1] == str(qid) for line in listed if line.split())
        inside = env["box"].exec(["cat", "/proc/sysvipc/msg"]).stdout.split("\n")[1:]
        assert [line for line in inside if line.strip()] == []
    finally:
        libc.msgctl(qid, 0, None)  # IPC_RMID


def test_run_has_the_hosts_directories_empty_and_writable_by_their_owners(env: Environment) -> None:
    host_dirs = sorted(e.name for e in os.scandir("/run") if e.is_dir(follow_symlinks=False))
    host_files = sorted(e.name for e in os.scandir("/run") if e.is_file(follow_symlinks=False))
    script = ("import os, json; print(json.dumps({e.name: (e.is_dir(follow_symlinks=False), "
              "os.listdir(e.path) if e.is_dir(follow_symlinks=False) else None, "
              "oct(e.stat(follow_symlinks=False).st_mode)) for e in os.scandir('/run')}))")  # fmt: skip
    import json

    inside = json.loads(env["box"].exec([sys.executable, "-c", script]).stdout)
    for name in host_dirs:
        assert name in inside and inside[name][0], name
        assert inside[name][1] == [], (name, inside[name][1])
        assert inside[name][2] == oct(os.lstat(f"/run/{name}").st_mode), name
    assert not set(host_files) & set(inside), "a file of the host's /run is visible"


def test_var_tmp_is_a_private_writable_tmpfs(env: Environment) -> None:
    marker = tempfile.mkdtemp(dir="/var/tmp", prefix="envbox-host-")
    try:
        r = env["box"].exec(["sh", "-c", f"ls -d {marker} 2>&1; echo x > /var/tmp/inside && "
                                         "cat /var/tmp/inside; stat -f -c %T /var/tmp"])  # fmt: skip
        assert "No such file" in r.stdout
        assert r.stdout.splitlines()[1:] == ["x", "tmpfs"]
        assert not os.path.exists("/var/tmp/inside")
    finally:
        os.rmdir(marker)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
                                 signal.SIGUSR2, signal.SIGWINCH, signal.SIGCONT])  # fmt: skip
def test_init_forwards_each_listed_signal_to_the_service(sig: signal.Signals) -> None:
    # os.write in the handler: print() there may re-enter stdout's buffer if the signal lands
    # while the main line's print('up') is still flushing (seen rootless in CI).
    code = (f"import os, signal\nsignal.signal({int(sig)}, lambda *a: os.write(1, b'got {int(sig)}\\n'))"
            "\nprint('up', flush=True)\nwhile True:\n    signal.pause()\n")  # fmt: skip
    with Environment([Service("sig", [sys.executable, "-c", code], ready=probe.log("^up$"))]) as e:
        h = e["sig"]
        h.kill(sig)
        h.wait_for_log(f"^got {int(sig)}$", timeout=10)
        assert h.running


def test_stdout_and_stderr_go_interleaved_to_the_log_and_stdin_is_empty() -> None:
    script = "read x; echo \"read=$?\"; echo one; echo two >&2; echo three; echo done"
    with Environment([Service("io", ["sh", "-c", script + "; exec sleep 1000"],
                              ready=probe.log("^done$"))]) as e:  # fmt: skip
        assert wait_until(lambda: "done" in e["io"].logs() or None, Deadline(10))
        assert e["io"].logs().splitlines() == ["read=1", "one", "two", "three", "done"]


def test_the_init_cannot_be_ptraced_or_read_by_the_service(env: Environment) -> None:
    # The init held envbox's privileges while it set up; it is non-dumpable, so even root inside
    # (without CAP_SYS_PTRACE) can neither attach to it nor read its memory or its environment.
    code = ("import ctypes, errno, json\nlibc = ctypes.CDLL(None, use_errno=True)\nout = {}\n"
            "r = libc.ptrace(ctypes.c_long(16), ctypes.c_long(1), None, None)\n"  # PTRACE_ATTACH
            "out['attach'] = 'ok' if r == 0 else errno.errorcode[ctypes.get_errno()]\n"
            "for f in ('mem', 'environ'):\n    try:\n        open(f'/proc/1/{f}', 'rb').read(1)\n"
            "        out[f] = 'ok'\n    except OSError as e:\n        out[f] = errno.errorcode[e.errno]\n"
            "print(json.dumps(out))\n")  # fmt: skip
    import json

    r = env["box"].exec([sys.executable, "-c", code])
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"attach": "EPERM", "mem": "EACCES", "environ": "EACCES"}
