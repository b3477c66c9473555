"""The seccomp allow-list, attacked from inside a real service (as root there, the worst case):
what issue 15 found open (AF_VSOCK sockets to the hypervisor, io_uring, any personality) is
refused by the filter, and what servers need still works.

Each refusal is shown to be the filter's: the same call made by this test process, outside any
sandbox, is not refused the same way (vsock and io_uring work on the host, or fail otherwise).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import socket
import sys
import textwrap
from collections.abc import Iterator

import pytest

from pytest_envbox import Environment, Service
from pytest_envbox.kernel import syscall_tables

PY = sys.executable
TABLE = syscall_tables.X86_64 if os.uname().machine == "x86_64" else syscall_tables.AARCH64
FCHMODAT2 = 452  # Linux 6.6, the same number everywhere; newer than the generated tables
NR = {**TABLE, "fchmodat2": FCHMODAT2}
AF_VSOCK = 40
ADDR_NO_RANDOMIZE = 0x0040000

PROBE = r"""
import ctypes, errno, json, os, socket, sys
NR = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
def call(name, *args):
    r = libc.syscall(ctypes.c_long(NR[name]), *[ctypes.c_long(a) for a in args])
    return r if r >= 0 else errno.errorcode[ctypes.get_errno()]
def sock(family, kind=socket.SOCK_STREAM):
    try:
        socket.socket(family, kind).close()
        return "ok"
    except OSError as e:
        return errno.errorcode[e.errno]
out = {"seccomp": [l.split()[1] for l in open("/proc/self/status") if l.startswith("Seccomp:")][0]}
out["vsock"] = sock(40)
out["vsock_dgram"] = sock(40, socket.SOCK_DGRAM)
pair = (ctypes.c_int * 2)()
r = libc.socketpair(40, socket.SOCK_STREAM, 0, pair)
out["vsock_pair"] = "ok" if r == 0 else errno.errorcode[ctypes.get_errno()]
params = ctypes.create_string_buffer(120)  # struct io_uring_params, zeroed
out["io_uring_setup"] = call("io_uring_setup", 1, ctypes.addressof(params))
out["io_uring_enter"] = call("io_uring_enter", -1, 0, 0, 0, 0, 0)
out["io_uring_register"] = call("io_uring_register", -1, 0, 0, 0)
out["personality_query"] = call("personality", 0xFFFFFFFF)
out["personality_aslr_off"] = call("personality", 0x0040000)  # ADDR_NO_RANDOMIZE
out["personality_linux32"] = call("personality", 0x8)        # Docker allows it...
call("personality", 0x0)                                     # ...and back
out["personality_after"] = call("personality", 0xFFFFFFFF)
out["fchmodat2"] = call("fchmodat2", -100, 0, 0, 0xFFFF)       # newer than the table: ENOSYS
# A sample of what servers need.
out["inet"], out["inet6"], out["unix"] = sock(socket.AF_INET), sock(socket.AF_INET6), sock(socket.AF_UNIX)
out["netlink"] = sock(socket.AF_NETLINK, socket.SOCK_RAW)
out["getppid"] = call("getppid")
out["memfd"] = os.memfd_create("x") >= 0
out["eventfd"] = os.eventfd(0) >= 0
out["pidfd"] = os.pidfd_open(os.getpid()) >= 0
out["random"] = len(os.getrandom(8)) == 8
r, w = os.pipe(); os.write(w, b"hi"); out["pipe"] = os.read(r, 2) == b"hi"
import select; ep = select.epoll(); ep.register(r); out["epoll"] = True
path, buf = ctypes.create_string_buffer(b"/"), ctypes.create_string_buffer(256)
out["statx"] = call("statx", -100, ctypes.addressof(path), 0, 0xFFF, ctypes.addressof(buf)) == 0
pid = os.fork()
if pid == 0:
    os._exit(3)
out["fork"] = os.waitpid(pid, 0)[1] >> 8
import subprocess, threading
t = threading.Thread(target=lambda: None); t.start(); t.join(); out["thread"] = True
out["sh"] = subprocess.run(["sh", "-c", "echo ok"], capture_output=True, text=True).stdout
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def env() -> Iterator[Environment]:
    with Environment([Service("box", ["sleep", "1000"])]) as e:
        yield e


@pytest.fixture(scope="module")
def inside(env: Environment) -> dict:  # type: ignore[type-arg]
    r = env["box"].exec([PY, "-c", textwrap.dedent(PROBE), json.dumps(NR)], timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.splitlines()[-1])  # type: ignore[no-any-return]


def _host_errno_of(make: object) -> int | None:
    try:
        make()  # type: ignore[operator]
        return None
    except OSError as e:
        return e.errno


def test_no_vsock_socket_inside_a_service(inside: dict) -> None:  # type: ignore[type-arg]
    assert inside["seccomp"] == "2"
    assert inside["vsock"] == inside["vsock_dgram"] == inside["vsock_pair"] == "EPERM"
    # The filter's answer, not the kernel's: outside the sandbox the same call is not EPERM.
    assert _host_errno_of(lambda: socket.socket(AF_VSOCK, socket.SOCK_STREAM).close()) != errno.EPERM


def test_no_io_uring_inside_a_service(inside: dict) -> None:  # type: ignore[type-arg]
    assert inside["io_uring_setup"] == "EPERM"
    assert inside["io_uring_enter"] == inside["io_uring_register"] == "EPERM"
    libc = ctypes.CDLL(None, use_errno=True)
    params = ctypes.create_string_buffer(120)
    fd = libc.syscall(ctypes.c_long(NR["io_uring_setup"]), ctypes.c_long(1),
                      ctypes.c_void_p(ctypes.addressof(params)))  # fmt: skip
    try:  # outside: a ring, or the host's refusal (io_uring_disabled), not the filter's
        assert fd >= 0 or ctypes.get_errno() != errno.EPERM or _io_uring_disabled()
    finally:
        if fd >= 0:
            os.close(fd)


def _io_uring_disabled() -> bool:
    try:
        with open("/proc/sys/kernel/io_uring_disabled") as f:
            return f.read().strip() != "0"
    except OSError:
        return False


def test_personality_only_takes_dockers_values_inside_a_service(inside: dict) -> None:  # type: ignore[type-arg]
    assert inside["personality_aslr_off"] == "EPERM"  # turning ASLR off for what it runs
    assert inside["personality_query"] == 0  # the query works: PER_LINUX
    assert inside["personality_linux32"] == 0  # allowed (returns the old persona)
    assert inside["personality_after"] == 0


def test_a_call_newer_than_the_table_answers_enosys_so_libc_falls_back(inside: dict) -> None:  # type: ignore[type-arg]
    assert max(TABLE.values()) < FCHMODAT2
    assert inside["fchmodat2"] == "ENOSYS"


def test_what_servers_need_still_works(inside: dict) -> None:  # type: ignore[type-arg]
    assert inside["inet"] == inside["inet6"] == inside["unix"] == inside["netlink"] == "ok"
    assert isinstance(inside["getppid"], int)  # 0: exec's parent is outside the pid namespace
    for what in ("memfd", "eventfd", "pidfd", "random", "pipe", "epoll", "statx", "thread"):
        assert inside[what] is True, what
    assert inside["fork"] == 3 and inside["sh"] == "ok\n"


@pytest.mark.parametrize("argv", [
    ["sh", "-c", "echo ok"],
    ["busybox", "sh", "-c", "busybox ls / >/dev/null && echo ok"],
    ["redis-server", "--version"],
    ["postgres", "--version"],
])  # fmt: skip
def test_real_programs_run_under_the_filter(env: Environment, argv: list[str]) -> None:
    if shutil.which(argv[0]) is None:
        pytest.skip(f"{argv[0]} is not installed")
    r = env["box"].exec(argv, timeout=60)
    assert r.returncode == 0, r.stderr
