"""Benchmark: three designs of a port relay, side by side, against direct loopback.

Each design relays ``127.0.0.1:<its port>`` to the same server on the host (the
``bench_start_relay`` server: upload sink, download source, 1-byte echo), in a process of its own
(``--serve DESIGN PORT``), so that what is measured is the relay, not namespaces or veths (the
relay that envbox runs adds a hop over its environment's bridge; see ``run.py``'s ``relay``):

- ``epoll-splice``: envbox's relay (``pytest_envbox.supervisor.relay.Relay``): one epoll loop,
  non-blocking ``splice`` through a pipe per direction (after a direction's first full 64 KiB
  read; small messages are copied);
- ``epoll-copy``: the same loop shape with ``recv_into`` a reused buffer and ``send``;
- ``threads-splice``: the design before it: a thread per direction, blocking ``splice``.

Variants are interleaved (the order rotates every trial). Prints MB/s up and down, the mean
1-byte round trip, and each as a ratio to direct loopback measured in the same run.

    PYTHONPATH=. python3 benchmarks/bench_relay_designs.py [--trials 5] [--seconds 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import select
import socket
import statistics
import subprocess
import sys
import threading
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
if str(HERE.parent) not in sys.path:
    sys.path.insert(1, str(HERE.parent))

import bench_start_relay as R  # noqa: E402

DESIGNS = ("epoll-splice", "epoll-copy", "threads-splice")


def serve_envbox(port: int) -> None:
    from pytest_envbox.supervisor.relay import Relay

    ns = os.open("/proc/self/ns/net", os.O_RDONLY)
    r = Relay(ns, port)  # no network: it connects to 127.0.0.1:port in this namespace
    print("PORT", r.host_port, flush=True)
    threading.Event().wait()


def serve_copy(port: int) -> None:
    """recv_into/send on one epoll loop; a direction stops reading while its bytes wait."""
    ls = socket.create_server(("127.0.0.1", 0), backlog=4096)
    ls.setblocking(False)
    ep = select.epoll()
    ep.register(ls.fileno(), select.EPOLLIN)
    print("PORT", ls.getsockname()[1], flush=True)
    # fd -> [sock, peer fd, pending memoryview or None, eof]
    side: dict[int, list[Any]] = {}
    buf = bytearray(1 << 18)
    masks: dict[int, int] = {}  # what each socket is watched for, when not EPOLLIN

    def mask(fd: int) -> int:
        me, peer = side[fd], side[side[fd][1]]
        reading = 0 if me[2] is not None or me[3] else select.EPOLLIN
        return reading | (select.EPOLLOUT if peer[2] is not None else 0)

    def drop(fd: int) -> None:
        """The connection of ``fd`` is over: both its sockets go."""
        for f in (fd, side[fd][1]):
            with contextlib.suppress(OSError):
                ep.unregister(f)
            masks.pop(f, None)
            side.pop(f)[0].close()

    while True:
        for fd, ev in ep.poll():
            if fd == ls.fileno():
                while True:
                    try:
                        c, _ = ls.accept()
                    except BlockingIOError:
                        break
                    u = socket.create_connection(("127.0.0.1", port))
                    for s in (c, u):
                        s.setblocking(False)
                        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    side[c.fileno()] = [c, u.fileno(), None, False]
                    side[u.fileno()] = [u, c.fileno(), None, False]
                    ep.register(c.fileno(), select.EPOLLIN)
                    ep.register(u.fileno(), select.EPOLLIN)
                continue
            if fd not in side:
                continue
            me = side[fd]
            peer = side[me[1]]
            try:
                if ev & select.EPOLLOUT and peer[2] is not None:  # peer's bytes wait for us
                    n = me[0].send(peer[2])
                    peer[2] = peer[2][n:] if n < len(peer[2]) else None
                if ev & (select.EPOLLIN | select.EPOLLHUP) and me[2] is None and not me[3]:
                    n = me[0].recv_into(buf)
                    if n == 0:
                        me[3] = True
                        peer[0].shutdown(socket.SHUT_WR)
                    else:
                        try:
                            k = peer[0].send(memoryview(buf)[:n])
                        except BlockingIOError:
                            k = 0
                        if k < n:
                            me[2] = memoryview(bytes(buf[k:n]))
            except OSError as e:
                if e.errno in (errno.EAGAIN,):
                    continue
                drop(fd)
                continue
            if me[3] and peer[3] and me[2] is None and peer[2] is None:  # both directions done
                drop(fd)
                continue
            for f in (fd, me[1]):
                m, was = mask(f), masks.get(f, select.EPOLLIN)
                if m == was:
                    continue
                # 0: unregistered (a hung-up socket would be reported on and on)
                if not was:
                    ep.register(f, m)
                elif not m:
                    ep.unregister(f)
                else:
                    ep.modify(f, m)
                masks[f] = m


def serve_threads(port: int) -> None:
    """The relay before the event loop: two threads per connection, each blocked in splice."""
    ls = socket.create_server(("127.0.0.1", 0), backlog=128)
    print("PORT", ls.getsockname()[1], flush=True)

    def pump(src: socket.socket, dst: socket.socket) -> None:
        r, w = os.pipe2(os.O_CLOEXEC)
        with contextlib.suppress(OSError):
            import fcntl

            fcntl.fcntl(w, 1031, 1 << 20)
        try:
            while True:
                n = os.splice(src.fileno(), w, 1 << 20)
                if n == 0:
                    break
                while n:
                    n -= os.splice(r, dst.fileno(), n)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def serve(c: socket.socket) -> None:
        u = socket.create_connection(("127.0.0.1", port))
        for s in (c, u):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        threading.Thread(target=pump, args=(u, c), daemon=True).start()
        pump(c, u)

    while True:
        c, _ = ls.accept()
        threading.Thread(target=serve, args=(c,), daemon=True).start()


@contextlib.contextmanager
def relay(design: str, port: int) -> Iterator[int]:
    p = subprocess.Popen([sys.executable, __file__, "--serve", design, str(port)], stdout=subprocess.PIPE,
                         text=True, env={**os.environ, "PYTHONPATH": str(HERE.parent)})  # fmt: skip
    try:
        assert p.stdout is not None
        _, got = p.stdout.readline().split()
        yield int(got)
    finally:
        p.kill()
        p.wait()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--serve", nargs=2, metavar=("DESIGN", "PORT"), help=argparse.SUPPRESS)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--rtts", type=int, default=5000)
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    if args.serve:
        design, port = args.serve[0], int(args.serve[1])
        serve = {"epoll-splice": serve_envbox, "epoll-copy": serve_copy, "threads-splice": serve_threads}
        serve[design](port)
        return 0
    up: dict[str, list[float]] = defaultdict(list)
    down: dict[str, list[float]] = defaultdict(list)
    lat: dict[str, list[float]] = defaultdict(list)
    with contextlib.ExitStack() as stack:
        direct = stack.enter_context(R.direct_server())
        ports = {"direct": ("127.0.0.1", direct),
                 **{d: ("127.0.0.1", stack.enter_context(relay(d, direct))) for d in DESIGNS}}
        for port in ports.values():  # warm each path
            R.upload(port, 0.1)
            R.download(port, 0.1)
            R.latency(port, 500)
        names = list(ports)
        for t in range(args.trials):
            order = names[t % len(names):] + names[:t % len(names)]
            for k in order:
                up[k].append(R.upload(ports[k], args.seconds) / 1e6)
            for k in order:
                down[k].append(R.download(ports[k], args.seconds) / 1e6)
            for k in order:
                lat[k].append(R.latency(ports[k], args.rtts)[0] * 1e6)
    med = {k: {"upload_MBps": statistics.median(up[k]), "download_MBps": statistics.median(down[k]),
               "round_trip_us": statistics.median(lat[k])} for k in up}  # fmt: skip
    d = med["direct"]
    print(f"{'':<16} {'upload MB/s':>12} {'ratio':>6} {'download MB/s':>14} {'ratio':>6} "
          f"{'1-byte RTT us':>14} {'added':>7}")
    for k, m in med.items():
        m["upload_ratio"] = m["upload_MBps"] / d["upload_MBps"]
        m["download_ratio"] = m["download_MBps"] / d["download_MBps"]
        m["added_us"] = m["round_trip_us"] - d["round_trip_us"]
        print(f"{k:<16} {m['upload_MBps']:>12.0f} {m['upload_ratio']:>6.2f} {m['download_MBps']:>14.0f} "
              f"{m['download_ratio']:>6.2f} {m['round_trip_us']:>14.1f} {m['added_us']:>+7.1f}")
    if args.json:
        every = {"upload": up, "download": down, "rtt": lat}
        out = {"trials": args.trials, "medians": med, "all": every}
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
