"""Benchmark: a burst of clients connecting at once through a published port, against the host.

The same server (a selectors echo server, /usr/bin/python3, accepting until its queue is empty)
runs bare on the host and as a service with its port published. N clients (200, 1000, 2000)
connect at once, non-blocking, and each has one byte echoed: the time until every one has its
byte back, through the relay and directly (interleaved, best of ``--reps``). While the 2000 are
connected, the supervisor's threads and RSS are read from /proc.

    PYTHONPATH=. python3 benchmarks/bench_burst.py [--reps 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import selectors
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

from pytest_envbox import Environment, Service, probe  # noqa: E402
from pytest_envbox.engine.client import get_supervisor  # noqa: E402

PY = "/usr/bin/python3"  # not under /tmp, where a service's private /tmp would hide it
PORT = 8000
SIZES = (200, 1000, 2000)

ECHO = """
import selectors, socket, sys
sel = selectors.DefaultSelector()
ls = socket.socket()
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind((sys.argv[1], int(sys.argv[2])))
ls.listen(4096)
ls.setblocking(False)
sel.register(ls, selectors.EVENT_READ)
print("PORT", ls.getsockname()[1], flush=True)
while True:
    for key, _ in sel.select():
        if key.fileobj is ls:
            while True:
                try:
                    c, _ = ls.accept()
                except BlockingIOError:
                    break
                c.setblocking(False)
                sel.register(c, selectors.EVENT_READ)
            continue
        c = key.fileobj
        try:
            data = c.recv(65536)
        except OSError:
            data = b""
        if data:
            c.send(data)
        else:
            sel.unregister(c)
            c.close()
"""


@contextlib.contextmanager
def on_host() -> Iterator[int]:
    p = subprocess.Popen([PY, "-c", ECHO, "127.0.0.1", "0"], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None
        _, port = p.stdout.readline().split()
        yield int(port)
    finally:
        p.kill()
        p.wait()


def burst(port: int, n: int) -> tuple[float, list[socket.socket]]:
    """Seconds until ``n`` clients connecting at once each had a byte echoed; the open clients."""
    sel = selectors.DefaultSelector()
    socks = []
    t0 = time.perf_counter()
    for _ in range(n):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        sel.register(s, selectors.EVENT_WRITE)
        socks.append(s)
    answered, end = 0, t0 + 120
    while answered < n:
        events = sel.select(timeout=max(0.0, end - time.perf_counter()))
        if not events:
            raise TimeoutError(f"{n - answered} of {n} clients got no answer within 120 s")
        for key, ev in events:
            s = key.fileobj  # type: ignore[assignment]
            if ev & selectors.EVENT_WRITE:
                err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    raise OSError(err, "a connect failed")
                s.send(b"x")
                sel.modify(s, selectors.EVENT_READ)
            else:
                if s.recv(1) != b"x":
                    raise ConnectionError("no echo")
                sel.unregister(s)
                answered += 1
    return time.perf_counter() - t0, socks


def _status(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(ln for ln in f if ln.startswith(key + ":")).split()[1])


def bench_burst(reps: int = 3) -> dict[str, Any]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * max(SIZES) + 1000
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(need, hard)), hard))
    sup = get_supervisor().pid
    svc = Service("echo", [PY, "-c", ECHO, "0.0.0.0", str(PORT)], ports=[PORT], ready=probe.tcp(PORT),
                  limits={"nofile": 3 * max(SIZES)})  # fmt: skip
    out: dict[str, Any] = {"reps": reps, "sizes": {}}
    try:
        with on_host() as host_port, Environment([svc]) as env:
            relay_port = env["echo"].port(PORT)
            idle_rss = _status(sup, "VmRSS")
            for n in SIZES:
                t: dict[str, list[float]] = {"host": [], "relay": []}
                for r in range(reps):
                    for which in (("host", "relay") if r % 2 == 0 else ("relay", "host")):
                        dt, socks = burst(host_port if which == "host" else relay_port, n)
                        t[which].append(dt)
                        if which == "relay" and n == max(SIZES):
                            out["supervisor_threads_at_2000"] = _status(sup, "Threads")
                            out["supervisor_rss_MiB_at_2000"] = _status(sup, "VmRSS") / 1024
                        for s in socks:
                            s.close()
                best = {k: min(v) for k, v in t.items()}
                out["sizes"][str(n)] = {
                    "host_s": best["host"], "relay_s": best["relay"], "ratio": best["relay"] / best["host"],
                    "median_host_s": statistics.median(t["host"]),
                    "median_relay_s": statistics.median(t["relay"]), "all": t,
                }  # fmt: skip
            out["supervisor_rss_MiB_idle"] = idle_rss / 1024
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return out


def print_burst(r: dict[str, Any]) -> None:
    print(f"  burst of N clients, connect + 1-byte echo each (best of {r['reps']}):")
    for n, s in r["sizes"].items():
        print(f"    N={n:>5}: relay {s['relay_s'] * 1e3:7.1f} ms   host {s['host_s'] * 1e3:7.1f} ms   "
              f"ratio {s['ratio']:.2f}")
    print(f"  supervisor with 2000 relayed connections open: {r['supervisor_threads_at_2000']} threads, "
          f"RSS {r['supervisor_rss_MiB_at_2000']:.1f} MiB (idle with the service: "
          f"{r['supervisor_rss_MiB_idle']:.1f} MiB)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    r = bench_burst(args.reps)
    print_burst(r)
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
