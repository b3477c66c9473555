"""A service cannot hold the host's memory in TCP buffers: its sockets are charged to it, and
each of its processes may have NOFILE of them.

Runs on cgroup v1 (hybrid here), and on cgroup v2 in the ``cgroupv2`` tox lane.
"""

from __future__ import annotations

import shutil
import signal
import sys
from pathlib import Path

import pytest

from pytest_envbox import Environment, Service
from pytest_envbox.kernel.cgroups import detect
from pytest_envbox.sandbox.plan import NOFILE

HOG = Path(__file__).with_name("tcp_hog.py")
MEMORY = 64 << 20
# Where the hog stops when nothing else does: far from the host's tcp_mem pressure (1.1 GiB and
# up on 4 GiB of RAM), and over 4 times the memory limit.
CEILING = 320 << 20

NOFILE_REPORT = """
import resource
print(*resource.getrlimit(resource.RLIMIT_NOFILE))
try:
    resource.setrlimit(resource.RLIMIT_NOFILE, (1 << 16, 1 << 16))
    print("raised")
except (OSError, ValueError):
    print("refused")
"""


def test_each_process_of_a_service_may_open_1024_files_or_what_it_declares_and_no_more() -> None:
    # One environment each: two services started at once hit a separate, older problem on
    # cgroup v2 (the zygote's clone fails with EINVAL), which this test is not about.
    for name, limits, n in (("default", {}, NOFILE), ("wide", {"nofile": 4096}, 4096)):
        with Environment([Service(name, ["sleep", "inf"], limits=limits)]) as env:
            h = env[name]
            # The service itself, as the kernel says; then a command run in it, which tries to
            # raise its limit as a server asking for more files would.
            with open(f"/proc/{h.pid}/limits") as f:
                line = next(ln for ln in f if ln.startswith("Max open files"))
            assert line.split()[3:5] == [str(n), str(n)], line
            r = h.exec([sys.executable, "-c", NOFILE_REPORT])
            assert r.stdout == f"{n} {n}\nrefused\n", (name, r.stdout, r.stderr)


@pytest.mark.needs_cgroups
@pytest.mark.skipif(detect().version == "none", reason="no cgroup filesystem mounted on this host")
@pytest.mark.skipif(shutil.which("ss") is None, reason="the hog measures with ss (iproute2)")
def test_loopback_connections_that_are_never_read_cannot_queue_far_beyond_the_memory_limit() -> None:
    """A service with a 64 MiB limit opens connections to itself and writes without reading.

    Before socket buffers were charged (cgroup v1), it queued 546 MiB in 144 connections within
    a second (up to the host's tcp_mem, 2.2 GiB here). Now the kernel charges them to the
    service's cgroup (``memory.kmem.tcp.limit_in_bytes`` on v1, ``memory.max`` on v2): past the
    limit each socket keeps one small buffer, and it may have NOFILE sockets. So: the limit, plus
    NOFILE / 2 connections of at most ~70 KiB each (measured: one 32 KiB buffer at each end),
    or an OOM kill.
    """
    hog = Service("hog", ["sleep", "inf"], limits={"memory": MEMORY})
    with Environment([hog]) as env:
        r = env["hog"].exec([sys.executable, str(HOG), str(CEILING), "20"], timeout=60)
    lines = r.stdout.splitlines()
    peak = max((int(line.split()[1]) for line in lines if line.startswith("queued")), default=0)
    bound = MEMORY + NOFILE // 2 * (96 << 10)
    assert peak < bound, f"{peak >> 20} MiB queued in TCP buffers: {lines[-1:]} {r.stderr[-500:]}"
    # It did try: hundreds of connections, until refused (no more fds) or killed (memory).
    if r.returncode == 0:
        done = lines[-1].split()
        assert done[0] == "done" and int(done[1]) > 256 and done[2] != "ceiling", lines[-3:]
    else:
        assert r.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL), (r.returncode, r.stderr)
