"""Run inside a service: queue kernel memory in loopback TCP buffers, as a hostile service would.

Opens connections to itself and writes to each until the kernel says no, never reading. Every 16
connections it prints ``queued <bytes>``: the socket memory of its network namespace as the
kernel accounts it (``ss -tm``: each socket's receive plus send queue, ``skmem`` r + w).
It stops at the first refusal (no more fds, no more memory), after ``argv[2]`` seconds, or once
``argv[1]`` bytes are queued (a ceiling that keeps the host far from tcp_mem pressure when
nothing else bounds it); then prints ``done <connections> <why>``.

argv: ceiling in bytes, seconds
"""

import os
import re
import socket
import subprocess
import sys
import time

CEILING, SECONDS = int(sys.argv[1]), float(sys.argv[2])
SKMEM = re.compile(r"skmem:\(r(\d+),rb\d+,t\d+,tb\d+,f\d+,w(\d+)")
# ss needs a few fds: kept free here, given back before each measurement.
spare = [os.open("/dev/null", os.O_RDONLY) for _ in range(8)]


def queued() -> int:
    for fd in spare:
        os.close(fd)
    try:
        out = subprocess.run(["ss", "-tmnH"], capture_output=True, text=True, check=True).stdout
    finally:
        spare[:] = [os.open("/dev/null", os.O_RDONLY) for _ in range(8)]
    return sum(int(r) + int(w) for r, w in SKMEM.findall(out))


listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(4096)
chunk = b"x" * (1 << 16)
held: list[socket.socket] = []
start = time.monotonic()
why = "time"
while time.monotonic() - start < SECONDS:
    try:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    except OSError as e:
        why = e.strerror or str(e)
        break
    held += [client, server]
    client.setblocking(False)
    try:
        while True:
            client.send(chunk)
    except OSError:  # full (EAGAIN), or refused
        pass
    if len(held) % 32 == 0:
        q = queued()
        print("queued", q, flush=True)
        if q > CEILING:
            why = "ceiling"
            break
print("queued", queued(), flush=True)
print("done", len(held) // 2, why, flush=True)
