"""A service cannot hold the host's memory in TCP buffers: its sockets are charged to it.

Runs on cgroup v1 (hybrid here), and on cgroup v2 in the ``cgroupv2`` tox lane.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

from pytest_envbox import Environment, Service
from pytest_envbox.kernel.cgroups import detect
from pytest_envbox.sandbox.init import NOFILE

HOG = Path(__file__).with_name("tcp_hog.py")
MEMORY = 64 << 20
# Where the hog stops when nothing else does: far from the host's tcp_mem pressure (1.1 GiB and
# up on 4 GiB of RAM), and over 4 times the memory limit.
CEILING = 320 << 20

pytestmark = pytest.mark.skipif(
    detect().version == "none", reason="no cgroup filesystem mounted on this host"
)


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
