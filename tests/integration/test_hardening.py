"""The best sandboxes' defaults, each shown from inside a real service (as root there, the worst
case): remove the default and its test fails."""

from __future__ import annotations

import json
import os
import sys
import textwrap
from collections.abc import Iterator

import pytest

from pytest_envbox import Environment, Service, probe
from pytest_envbox.engine.client import get_supervisor

PY = sys.executable

SYSCALLS = r"""
import ctypes, errno, json, os, socket, struct, threading
libc = ctypes.CDLL(None, use_errno=True)
def call(nr, *args):
    r = libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) for a in args])
    return "ok" if r >= 0 else errno.errorcode[ctypes.get_errno()]
out = {}
out["seccomp"] = [l.split()[1] for l in open("/proc/self/status") if l.startswith("Seccomp:")][0]
out["keyctl"] = call(250, 0, -3, 0)                 # KEYCTL_GET_KEYRING_ID, session keyring
out["unshare_user"] = call(272, 0x10000000)         # CLONE_NEWUSER
out["clone3"] = call(435, 0, 0)
out["bpf"] = call(321, 0, 0, 0)
out["init_module"] = call(175, 0, 0, 0)
out["finit_module"] = call(313, -1, 0, 0)
fd = os.open("/proc/self/ns/net", os.O_RDONLY)
out["setns"] = call(308, fd, 0)
try:
    libc.mount(b"none", b"/mnt", b"tmpfs", 0, None) == 0 and out.setdefault("mount", "ok")
except Exception as e:
    out["mount"] = str(e)
out.setdefault("mount", errno.errorcode[ctypes.get_errno()])
r = libc.mount(None, b"/", None, 0x20 | 0x1000, None)   # MS_REMOUNT | MS_BIND: read-write again
out["remount_rw"] = "ok" if r == 0 else errno.errorcode[ctypes.get_errno()]
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # bring eth0 down: SIOCSIFFLAGS
    try:
        import fcntl
        fcntl.ioctl(s.fileno(), 0x8914, struct.pack("16sH14x", b"eth0", 0))
        out["link_down"] = "ok"
    except OSError as e:
        out["link_down"] = errno.errorcode[e.errno]
pid = os.fork()
if pid == 0:
    os._exit(3)
out["fork"] = os.waitpid(pid, 0)[1] >> 8
t = threading.Thread(target=lambda: None); t.start(); t.join(); out["thread"] = "ok"
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def env() -> Iterator[Environment]:
    services = [Service("box", ["sleep", "1000"]),
                Service("other", ["sh", "-c", "echo secret > /tmp/other-file; echo ready; exec sleep 1000"],
                        ready=probe.log("^ready$"))]
    with Environment(services) as e:
        yield e


def run(env: Environment, code: str, service: str = "box") -> dict:  # type: ignore[type-arg]
    r = env[service].exec([PY, "-c", textwrap.dedent(code)], timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.splitlines()[-1])  # type: ignore[no-any-return]


def test_a_default_seccomp_filter_refuses_what_docker_refuses(env: Environment) -> None:
    out = run(env, SYSCALLS)
    assert out["seccomp"] == "2"  # filter mode
    # Allowed by capabilities, refused by the filter: the kernel keyring, new user namespaces.
    assert out["keyctl"] == "EPERM"
    assert out["unshare_user"] == "EPERM"
    assert out["clone3"] == "ENOSYS"  # its flags are out of a filter's reach: libc falls back
    assert out["bpf"] == "EPERM"
    # ...while what programs need still works.
    assert out["fork"] == 3 and out["thread"] == "ok"


def test_a_root_service_cannot_remount_mount_setns_load_modules_or_rewire_its_network(
    env: Environment,
) -> None:
    out = run(env, SYSCALLS)
    assert out["remount_rw"] == "EPERM"
    assert out["mount"] == "EPERM"
    assert out["setns"] == "EPERM"
    assert out["init_module"] == "EPERM" and out["finit_module"] == "EPERM"
    assert out["link_down"] == "EPERM"
    assert env["box"].exec(["sh", "-c", "ip -o link show eth0"]).stdout.count("UP") >= 1


def test_a_service_sees_neither_the_processes_nor_the_files_of_another(env: Environment) -> None:
    other_pid = env["other"].pid
    script = ("for p in /proc/[0-9]*; do cat $p/comm; done | grep -c '^sleep$'; cat /tmp/other-file; "
              "ls /proc/*/root/tmp 2>/dev/null | grep -c other-file")
    r = env["box"].exec(["sh", "-c", script])
    sleeps, *rest = r.stdout.split()
    assert sleeps == "1"  # its own: the other service's sleep is not there
    assert "secret" not in r.stdout and rest == ["0"], r
    assert other_pid is not None and str(other_pid) not in r.stdout
    mine = env["other"].exec(["cat", "/tmp/other-file"]).stdout
    assert mine == "secret\n"  # it is there, in the other service's own /tmp


def test_no_directory_fd_reaches_a_service_and_its_cwd_is_inside_its_root(env: Environment) -> None:
    """The runc CVE-2024-21626 lesson: a directory fd of the host (or a cwd left on one) would let a
    service walk out of its root with openat(fd, "..")."""
    code = """
        import json, os
        out = {}
        for pid in ("2", "self"):  # the service and an exec'd command (the init is not visible)
            fds = os.listdir(f"/proc/{pid}/fd")
            dirs = [fd for fd in fds if os.path.isdir(f"/proc/{pid}/fd/{fd}")]
            cwd = os.stat(f"/proc/{pid}/cwd")
            named = os.stat(os.readlink(f"/proc/{pid}/cwd"))  # the same path, from its root
            out[pid] = {"dir_fds": dirs, "cwd_inside": (cwd.st_dev, cwd.st_ino) ==
                        (named.st_dev, named.st_ino)}
        print(json.dumps(out))
    """
    out = run(env, code)
    for pid in ("2", "self"):
        assert out[pid] == {"dir_fds": [], "cwd_inside": True}, (pid, out)
    # The init, seen from here: no directory fd either, and its cwd is its root's "/".
    service = env["box"].pid
    assert service is not None
    with open(f"/proc/{service}/stat") as f:
        init = int(f.read().rsplit(")", 1)[1].split()[1])
    dirs = [fd for fd in os.listdir(f"/proc/{init}/fd") if os.path.isdir(f"/proc/{init}/fd/{fd}")]
    assert dirs == []
    inside = os.stat(f"/proc/{init}/root{env.rootdir}")  # its working directory, from its root
    cwd = os.stat(f"/proc/{init}/cwd")
    assert (inside.st_dev, inside.st_ino) == (cwd.st_dev, cwd.st_ino)


def test_the_supervisors_own_files_are_close_on_exec() -> None:
    """Nothing the supervisor opens can reach a service through a fork and exec."""
    with Environment([Service("w", ["sleep", "1000"])]):
        sup = get_supervisor().pid
        leaky = []
        for fd in os.listdir(f"/proc/{sup}/fd"):
            if int(fd) < 3:
                continue
            try:
                with open(f"/proc/{sup}/fdinfo/{fd}") as f:
                    flags = int(next(ln for ln in f if ln.startswith("flags:")).split()[1], 8)
                target = os.readlink(f"/proc/{sup}/fd/{fd}")
            except (OSError, StopIteration):
                continue  # closed meanwhile
            if not flags & 0o2000000:  # O_CLOEXEC
                leaky.append((fd, target))
        assert leaky == []


def test_sys_is_read_only() -> None:
    with Environment([Service("w", ["sleep", "1000"])]) as e:
        r = e["w"].exec(["sh", "-c", "echo 1 > /sys/kernel/uevent_helper; touch /sys/x"])
        assert r.stderr.count("Read-only file system") == 2, r


def test_a_private_devpts_and_no_controlling_terminal(env: Environment) -> None:
    """No pty of the host is there, and none of the host's terminals is the service's."""
    box = env["box"]
    assert box.exec(["ls", "/dev/pts"]).stdout.split() == ["ptmx"]
    # The mount on top at /dev/pts (rootless, the host's is still below it, covered) is a devpts.
    mounts = [ln for ln in box.exec(["cat", "/proc/self/mountinfo"]).stdout.splitlines()
              if ln.split()[4] == "/dev/pts"]  # fmt: skip
    assert mounts and " - devpts " in mounts[-1], mounts
    if os.path.isdir("/dev/pts"):  # a devpts instance of its own, not the host's
        inside = int(box.exec(["stat", "-c", "%d", "/dev/pts"]).stdout)
        assert inside != os.stat("/dev/pts").st_dev
    fields = box.exec(["cat", "/proc/2/stat"]).stdout.rsplit(")", 1)[1].split()
    sid, tty = int(fields[3]), int(fields[4])
    assert sid == 2 and tty == 0  # its own session, no controlling terminal (TIOCSTI needs one)
