"""Benchmark: sandbox start+stop and port-relay throughput/latency, against baselines.

Everything is measured in one run, interleaved so that drift (CPU frequency, page cache, other
load) hits every variant alike:

1. start+stop of one long-running command (``sleep 1000``), N times each:
   ``bare`` (``subprocess.Popen`` + SIGTERM + wait), ``unshare`` (util-linux
   ``unshare --pid --fork --kill-child --mount --uts --ipc --net``, started until the command has
   been exec'd, then killed and reaped), ``unshare /bin/true`` run to completion, ``envbox open``
   (a fresh ``Environment`` per iteration, ``open()`` + ``close()``, warm supervisor) and
   ``envbox restart`` (``handle.stop()`` + ``handle.start()`` on a kept environment).
2. bulk throughput (upload and download) and 1-byte round-trip latency through
   ``handle.port(p)`` (the relay into a sandboxed server) against the same server script run
   directly on the host.

Targets: envbox start+stop <= 2x unshare; relay throughput >= 0.65x direct; relay adds < 50 us
per round trip. PASS/FAIL is printed, the exit status is always 0 (a benchmark never fails CI).

Usage (as root, or wherever envbox runs)::

    PYTHONPATH=. python3 benchmarks/bench_start_relay.py [--n 30] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

from _measure import set_subreaper

from pytest_envbox import Environment, Service, probe

TARGET_START_RATIO = 2.0  # envbox start+stop <= 2x unshare
TARGET_THROUGHPUT_RATIO = 0.65  # relay >= 0.65x direct loopback
TARGET_ADDED_LATENCY_US = 50.0  # relay adds < 50 us per 1-byte round trip
TARGET_LIMITS_EXTRA_MS = 3.0  # memory + cpu + pids limits add < 3 ms to start+stop
LIMITS = {"memory": "256Mi", "cpu": "1", "pids": 256}

SERVER_PORT = 9000  # inside the sandbox (its own network namespace: no clash possible)
UNSHARE_FLAGS = ["--pid", "--fork", "--mount", "--uts", "--ipc", "--net"]

# The server, run both as a sandboxed service and as a plain host process. The first byte of each
# connection picks the mode: "U" upload (sink everything, then answer the byte count), "D" download
# (send until the client goes away), "E" echo (1-byte round trips).
SERVER = r"""
import socket, sys, threading

def handle(c):
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        mode = c.recv(1)
        if mode == b"U":
            buf = bytearray(1 << 20)
            n = 0
            while True:
                k = c.recv_into(buf)
                if not k:
                    break
                n += k
            c.sendall(n.to_bytes(8, "big"))
        elif mode == b"D":
            chunk = memoryview(bytes(1 << 20))
            while True:
                c.sendall(chunk)
        elif mode == b"E":
            while True:
                b = c.recv(64)
                if not b:
                    break
                c.sendall(b)
    except OSError:
        pass
    finally:
        c.close()

ls = socket.socket()
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind((sys.argv[2] if len(sys.argv) > 2 else "127.0.0.1", int(sys.argv[1])))
ls.listen(16)
print("PORT", ls.getsockname()[1], flush=True)
while True:
    conn, _ = ls.accept()
    threading.Thread(target=handle, args=(conn,), daemon=True).start()
"""


# --- small helpers ------------------------------------------------------------------------------


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def ms(seconds: float) -> float:
    return seconds * 1e3


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def _exe(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None


def wait_exec(parent: int, exe: str, timeout: float = 5.0) -> int:
    """Pid of ``parent``'s child once it has exec'd ``exe`` (polls /proc, ~50 us granularity)."""
    deadline = time.monotonic() + timeout
    child = None
    while time.monotonic() < deadline:
        if child is None:
            kids = _children(parent)
            child = kids[0] if kids else None
        if child is not None and _exe(child) == exe:
            return child
        time.sleep(0.00005)
    raise TimeoutError(f"no child of {parent} exec'd {exe} within {timeout}s")


# --- 1. start + stop ------------------------------------------------------------------------


def run_bare(cmd: list[str]) -> float:
    """Popen returns once exec has happened (CLOEXEC error pipe); then SIGTERM and reap."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd)
    p.terminate()
    p.wait()
    return time.perf_counter() - t0


def run_unshare(unshare: str, cmd: list[str], subreaper: bool) -> float:
    """unshare up to the exec of ``cmd`` (PID 1 of its namespace), then kill and reap both.

    util-linux unshare with --fork blocks SIGINT and SIGTERM in the parent while it waits (2.38),
    and the command, PID 1 of its namespace with no handler, ignores SIGTERM: SIGKILL to unshare
    is the stop that works, with --kill-child (PR_SET_PDEATHSIG=SIGKILL) taking the command along.
    """
    t0 = time.perf_counter()
    p = subprocess.Popen([unshare, *UNSHARE_FLAGS, "--kill-child", *cmd])
    try:
        child = wait_exec(p.pid, cmd[0])
    except TimeoutError:
        p.kill()
        p.wait()
        raise
    p.kill()
    p.wait()
    if subreaper:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(child, 0)  # the namespace's PID 1, reparented to us: gone means all gone
    else:
        while os.path.exists(f"/proc/{child}"):
            time.sleep(0.00005)
    return time.perf_counter() - t0


def run_unshare_true(unshare: str, true: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([unshare, *UNSHARE_FLAGS, true], check=True)
    return time.perf_counter() - t0


def run_envbox_open_close(cmd: list[str], i: int, phases: dict[str, list[float]] | None = None,
                          limits: dict[str, Any] | None = None) -> float:  # fmt: skip
    t0 = time.perf_counter()
    env = Environment([Service(f"s{i}", cmd, limits=limits or {})])
    t1 = time.perf_counter()
    env.open()
    t2 = time.perf_counter()
    env.close()
    t3 = time.perf_counter()
    if phases is not None:
        phases["Environment() (plan, not timed above)"].append(t1 - t0)
        phases["open()"].append(t2 - t1)
        phases["close()"].append(t3 - t2)
    return t3 - t1


def bench_start_stop(n: int, warmup: int) -> dict[str, Any]:
    sleep = shutil.which("sleep")
    unshare = shutil.which("unshare")
    true = "/bin/true" if os.path.exists("/bin/true") else shutil.which("true")
    if sleep is None or unshare is None or true is None:
        raise RuntimeError("need sleep, unshare and true on PATH")
    cmd = [os.path.realpath(sleep), "1000"]
    subreaper = set_subreaper()

    # Warm supervisor: the first Environment starts it (a new interpreter, ~100+ ms, once per
    # test process); that cost is reported on its own, not mixed into the per-start figures.
    t0 = time.perf_counter()
    kept = Environment([Service("kept", cmd)])
    kept.open()
    first_open = time.perf_counter() - t0
    handle = kept["kept"]

    samples: dict[str, list[float]] = defaultdict(list)
    restart_parts: dict[str, list[float]] = defaultdict(list)
    variants: list[tuple[str, Callable[[int], float]]] = [
        ("bare", lambda i: run_bare(cmd)),
        ("unshare", lambda i: run_unshare(unshare, cmd, subreaper)),
        ("unshare_true", lambda i: run_unshare_true(unshare, true)),
        ("envbox_open_close", lambda i: run_envbox_open_close(cmd, i)),
        ("envbox_limits", lambda i: run_envbox_open_close(cmd, i, limits=LIMITS)),
    ]

    def restart(i: int) -> float:
        t0 = time.perf_counter()
        handle.stop()
        t1 = time.perf_counter()
        handle.start()
        t2 = time.perf_counter()
        restart_parts["stop"].append(t1 - t0)
        restart_parts["start"].append(t2 - t1)
        return t2 - t0

    variants.append(("envbox_restart", restart))
    try:
        for i in range(warmup + n):
            # Rotate the order every iteration so no variant always follows the same one.
            for k in range(len(variants)):
                name, fn = variants[(i + k) % len(variants)]
                dt = fn(i)
                if i >= warmup:
                    samples[name].append(dt)
        for v in restart_parts.values():
            del v[:warmup]
    finally:
        kept.close()

    med = {k: ms(median(v)) for k, v in samples.items()}
    return {
        "n": n,
        "command": cmd,
        "unshare_flags": UNSHARE_FLAGS,
        "subreaper": subreaper,
        "first_open_ms (cold supervisor)": ms(first_open),
        "median_ms": med,
        "min_ms": {k: ms(min(v)) for k, v in samples.items()},
        "restart_median_ms": {k: ms(median(v)) for k, v in restart_parts.items()},
        "limits_extra_ms": med["envbox_limits"] - med["envbox_open_close"],
        "ratio": {
            "envbox_open_close/unshare": med["envbox_open_close"] / med["unshare"],
            "envbox_restart/unshare": med["envbox_restart"] / med["unshare"],
            "envbox_open_close/bare": med["envbox_open_close"] / med["bare"],
            "envbox_restart/bare": med["envbox_restart"] / med["bare"],
        },
    }


# --- paced: as a test suite uses it (a test body between start and stop) ---------------------


def bench_paced(n: int, body: float = 0.03, gap: float = 0.005) -> dict[str, Any]:
    """start+stop with ``body`` seconds of "test" between them and ``gap`` between tests.

    The back-to-back loop above is the worst case for work done in the background (the next
    spare sandbox, its cgroup move): here that work has the test's time to finish, as in a real
    suite, and the kernel is idle between tests, as it is there (some kernel paths, e.g. a cgroup
    move's RCU grace period, cost more after idle). The body and the gap are not timed.
    """
    sleep = os.path.realpath(shutil.which("sleep") or "/bin/sleep")
    unshare = shutil.which("unshare")
    if unshare is None:
        raise RuntimeError("need unshare on PATH")
    subreaper = set_subreaper()
    cmd = [sleep, "1000"]
    out: dict[str, list[float]] = defaultdict(list)
    for i in range(n + 3):
        env = Environment([Service(f"p{i}", cmd)])
        t0 = time.perf_counter()
        env.open()
        t1 = time.perf_counter()
        time.sleep(body)
        t2 = time.perf_counter()
        env.close()
        t3 = time.perf_counter()
        time.sleep(gap)
        u = run_unshare_paced(unshare, cmd, subreaper, body)
        time.sleep(gap)
        if i >= 3:
            out["envbox_open"].append(t1 - t0)
            out["envbox_close"].append(t3 - t2)
            out["envbox"].append((t1 - t0) + (t3 - t2))
            out["unshare"].append(u)
    med = {k: ms(median(v)) for k, v in out.items()}
    return {"n": n, "body_ms": body * 1000, "gap_ms": gap * 1000, "median_ms": med,
            "ratio_envbox/unshare": med["envbox"] / med["unshare"]}  # fmt: skip


def run_unshare_paced(unshare: str, cmd: list[str], subreaper: bool, body: float) -> float:
    """Like :func:`run_unshare`, with ``body`` seconds (untimed) between start and kill."""
    t0 = time.perf_counter()
    p = subprocess.Popen([unshare, *UNSHARE_FLAGS, "--kill-child", *cmd])
    child = wait_exec(p.pid, cmd[0])
    t1 = time.perf_counter()
    time.sleep(body)
    t2 = time.perf_counter()
    p.kill()
    p.wait()
    if subreaper:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(child, 0)
    else:
        while os.path.exists(f"/proc/{child}"):
            time.sleep(0.00005)
    return (t1 - t0) + (time.perf_counter() - t2)


# --- where envbox start+stop time goes (instrumented, separate pass) -----------------------


@contextlib.contextmanager
def instrument_supervisor_calls() -> Iterator[dict[str, list[float]]]:
    """Time every SupervisorClient.call by operation (patched here, in this process only)."""
    from pytest_envbox.engine import client as _client

    per_op: dict[str, list[float]] = defaultdict(list)
    orig = _client.SupervisorClient.call

    def timed(self: Any, request: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return orig(self, request)
        finally:
            per_op[request.TAG].append(time.perf_counter() - t0)

    _client.SupervisorClient.call = timed  # type: ignore[method-assign]
    try:
        yield per_op
    finally:
        _client.SupervisorClient.call = orig  # type: ignore[method-assign]


class _StampedEvent(threading.Event):
    """A ``threading.Event`` that remembers when it was set (already set, as a fresh handle is)."""

    def __init__(self) -> None:
        super().__init__()
        self.stamp = float("nan")

    def set(self) -> None:
        self.stamp = time.perf_counter()
        super().set()

    def clear(self) -> None:
        self.stamp = float("nan")
        super().clear()


def bench_breakdown(n: int) -> dict[str, Any]:
    """Phases of open()/close(), supervisor round trips by op, and the stop() wake-up delay."""
    sleep = os.path.realpath(shutil.which("sleep") or "/bin/sleep")
    cmd = [sleep, "1000"]
    phases: dict[str, list[float]] = defaultdict(list)
    exit_known: list[float] = []
    stop_total: list[float] = []
    with instrument_supervisor_calls() as per_op:
        for i in range(n):
            run_envbox_open_close(cmd, 10_000 + i, phases)
        ops_open_close = {op: (len(v) / n, ms(median(v))) for op, v in per_op.items()}
        per_op.clear()
        # stop(): how long after the exit event reaches this process does stop() return?
        with Environment([Service("lag", cmd)]) as env:
            h = env["lag"]
            for _ in range(n):
                # Private attribute, swapped only here: stamp the moment the exit becomes known.
                stamped = _StampedEvent()
                h._exited = stamped
                t0 = time.perf_counter()
                h.stop()
                t1 = time.perf_counter()
                stop_total.append(t1 - t0)
                exit_known.append(stamped.stamp - t0)
                h.start()
    return {
        "phases_median_ms": {k: ms(median(v)) for k, v in phases.items()},
        "supervisor_calls_per_open_close": {op: {"calls": c, "median_ms": m}
                                            for op, (c, m) in ops_open_close.items()},
        "stop_median_ms": ms(median(stop_total)),
        "stop_exit_known_median_ms": ms(median(exit_known)),
        "stop_returns_after_exit_known_median_ms": ms(median(
            [a - b for a, b in zip(stop_total, exit_known, strict=True)])),
    }


# --- 2. relay ----------------------------------------------------------------------------------


Addr = tuple[str, int]


def _connect(addr: Addr, mode: bytes) -> socket.socket:
    s = socket.create_connection(addr)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.sendall(mode)
    return s


def upload(port: Addr, seconds: float) -> float:
    """Send for ``seconds``, then wait for the server's byte count: bytes/s that arrived."""
    chunk = memoryview(bytes(1 << 20))
    with _connect(port, b"U") as s:
        sent = 0
        t0 = time.perf_counter()
        end = t0 + seconds
        while time.perf_counter() < end:
            s.sendall(chunk)
            sent += len(chunk)
        s.shutdown(socket.SHUT_WR)
        got = b""
        while len(got) < 8:
            part = s.recv(8 - len(got))
            if not part:
                raise ConnectionError("server closed before answering the byte count")
            got += part
        t1 = time.perf_counter()
    received = int.from_bytes(got, "big")
    if received != sent:
        raise RuntimeError(f"upload: sent {sent} bytes, server got {received}")
    return received / (t1 - t0)


def download(port: Addr, seconds: float) -> float:
    """Receive for ``seconds`` (from the first byte on): bytes/s."""
    buf = bytearray(1 << 20)
    with _connect(port, b"D") as s:
        n = s.recv_into(buf)
        t0 = time.perf_counter()
        end = t0 + seconds
        n = 0
        while True:
            k = s.recv_into(buf)
            if not k:
                raise ConnectionError("server closed during download")
            n += k
            t = time.perf_counter()
            if t >= end:
                break
    return n / (t - t0)


def latency(port: Addr, rtts: int, warm: int = 200) -> tuple[float, list[float]]:
    """Mean 1-byte round trip (seconds) over ``rtts`` on one connection, and each sample."""
    with _connect(port, b"E") as s:
        one = b"x"
        for _ in range(warm):
            s.sendall(one)
            s.recv(1)
        each: list[float] = []
        clock = time.perf_counter
        t_start = clock()
        for _ in range(rtts):
            t0 = clock()
            s.sendall(one)
            if not s.recv(1):
                raise ConnectionError("server closed during latency test")
            each.append(clock() - t0)
        mean = (clock() - t_start) / rtts
    return mean, each


@contextlib.contextmanager
def direct_server() -> Iterator[int]:
    """The server script as a plain host process on an ephemeral 127.0.0.1 port."""
    p = subprocess.Popen([sys.executable, "-c", SERVER, "0"], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None
        line = p.stdout.readline().split()
        if len(line) != 2 or line[0] != "PORT":
            raise RuntimeError(f"direct server did not start: {line}")
        yield int(line[1])
    finally:
        p.kill()
        p.wait()


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


def bench_relay(trials: int, seconds: float, rtts: int) -> dict[str, Any]:
    # On all its addresses, as the docs advise: the relay then reaches it over its link (the
    # path every test's traffic takes), and the test may reach its address directly (routed).
    server = Service("sink", [sys.executable, "-c", SERVER, str(SERVER_PORT), "0.0.0.0"],
                     ports=[SERVER_PORT], ready=probe.tcp(SERVER_PORT))
    up: dict[str, list[float]] = defaultdict(list)
    down: dict[str, list[float]] = defaultdict(list)
    lat: dict[str, list[float]] = defaultdict(list)
    each: dict[str, list[float]] = defaultdict(list)
    with Environment([server]) as env, direct_server() as direct_port:
        sink = env["sink"]
        ports = {"relay": ("127.0.0.1", sink.port(SERVER_PORT)), "direct": ("127.0.0.1", direct_port)}
        if env.network.routed:  # root: the kernel's path to the service's address, no relay
            ports["routed"] = (sink.ip, SERVER_PORT)
        # Warm both paths (first connection, TCP autotuning, the relay's thread creation).
        for port in ports.values():
            upload(port, 0.1)
            download(port, 0.1)
            latency(port, 500)
        for t in range(trials):
            order = tuple(ports) if t % 2 == 0 else tuple(reversed(ports))
            for which in order:
                up[which].append(upload(ports[which], seconds))
            for which in order:
                down[which].append(download(ports[which], seconds))
            for which in order:
                mean, samples = latency(ports[which], rtts)
                lat[which].append(mean)
                each[which].extend(samples)

    def mbps(xs: list[float]) -> float:
        return median(xs) / 1e6

    out: dict[str, Any] = {
        "trials": trials,
        "trial_seconds": seconds,
        "rtts_per_trial": rtts,
        "upload_MBps": {k: mbps(v) for k, v in up.items()},
        "download_MBps": {k: mbps(v) for k, v in down.items()},
        "latency_us": {k: median(v) * 1e6 for k, v in lat.items()},
        "latency_p50_us": {k: percentile(v, 0.50) * 1e6 for k, v in each.items()},
        "latency_p99_us": {k: percentile(v, 0.99) * 1e6 for k, v in each.items()},
        "all_trials": {
            "upload_MBps": {k: [x / 1e6 for x in v] for k, v in up.items()},
            "download_MBps": {k: [x / 1e6 for x in v] for k, v in down.items()},
            "latency_us": {k: [x * 1e6 for x in v] for k, v in lat.items()},
        },
    }
    out["ratio"] = {
        "upload relay/direct": out["upload_MBps"]["relay"] / out["upload_MBps"]["direct"],
        "download relay/direct": out["download_MBps"]["relay"] / out["download_MBps"]["direct"],
    }
    if "routed" in ports:
        out["ratio"]["upload routed/direct"] = out["upload_MBps"]["routed"] / out["upload_MBps"]["direct"]
        out["ratio"]["download routed/direct"] = (out["download_MBps"]["routed"]
                                                  / out["download_MBps"]["direct"])
    out["added_latency_us"] = out["latency_us"]["relay"] - out["latency_us"]["direct"]
    out["added_latency_p50_us"] = out["latency_p50_us"]["relay"] - out["latency_p50_us"]["direct"]
    return out


# --- report ----------------------------------------------------------------------------------


def print_start_stop(r: dict[str, Any]) -> None:
    med, lo = r["median_ms"], r["min_ms"]
    print(f"\n== start+stop of {' '.join(r['command'])}  (n={r['n']}, medians; min in brackets)")
    labels = {
        "bare": "bare Popen + SIGTERM + wait",
        "unshare": "unshare (exec'd, then SIGKILL + reap)",
        "unshare_true": "unshare /bin/true, to completion",
        "envbox_open_close": "envbox Environment open+close",
        "envbox_limits": "  the same with memory+cpu+pids limits",
        "envbox_restart": "envbox handle.stop()+start()",
    }
    for key, label in labels.items():
        print(f"  {label:<40} {med[key]:8.2f} ms  [{lo[key]:.2f}]")
    rs = r["restart_median_ms"]
    print(f"  {'  of which stop / start':<40} {rs['stop']:8.2f} / {rs['start']:.2f} ms")
    print(f"  {'first open (cold supervisor)':<40} {r['first_open_ms (cold supervisor)']:8.2f} ms")
    for k, v in r["ratio"].items():
        print(f"  ratio {k:<34} {v:8.2f}x")
    for k in ("envbox_open_close/unshare", "envbox_restart/unshare"):
        v = r["ratio"][k]
        print(f"  target {k} <= {TARGET_START_RATIO:.1f}x: {verdict(v <= TARGET_START_RATIO)}"
              f" ({v:.2f}x)")
    extra = r["limits_extra_ms"]
    print(f"  target limits add < {TARGET_LIMITS_EXTRA_MS:.0f} ms: "
          f"{verdict(extra < TARGET_LIMITS_EXTRA_MS)} ({extra:+.2f} ms)")


def print_paced(r: dict[str, Any]) -> None:
    med = r["median_ms"]
    print(f"\n== paced start+stop, as in a test suite: {r['body_ms']:.0f} ms test body, "
          f"{r['gap_ms']:.0f} ms between tests, neither timed (n={r['n']}, medians)")
    print(f"  {'unshare (until exec, and SIGKILL + reap)':<40} {med['unshare']:8.2f} ms")
    print(f"  {'envbox open+close':<40} {med['envbox']:8.2f} ms  (open {med['envbox_open']:.2f}, "
          f"close {med['envbox_close']:.2f})")
    print(f"  ratio envbox/unshare (informative)       {r['ratio_envbox/unshare']:8.2f}x")


def print_breakdown(r: dict[str, Any]) -> None:
    print("\n== where envbox open+close time goes (instrumented pass, medians)")
    for k, v in r["phases_median_ms"].items():
        print(f"  {k:<40} {v:8.2f} ms")
    print("  supervisor round trips per open+close:")
    for op, d in sorted(r["supervisor_calls_per_open_close"].items(), key=lambda kv: -kv[1]["median_ms"]):
        print(f"    {op:<22} x{d['calls']:<4.0f} {d['median_ms']:8.3f} ms each")
    print(f"  {'handle.stop()':<40} {r['stop_median_ms']:8.2f} ms: exit known after "
          f"{r['stop_exit_known_median_ms']:.2f} ms, stop() returns "
          f"{r['stop_returns_after_exit_known_median_ms']:.2f} ms later")


def print_relay(r: dict[str, Any]) -> None:
    print(f"\n== relay vs direct loopback ({r['trials']} trials of {r['trial_seconds']:g} s, "
          f"{r['rtts_per_trial']} round trips per latency trial; medians)")
    for key, label in (("upload_MBps", "upload"), ("download_MBps", "download")):
        d = r[key]
        print(f"  {label:<10} relay {d['relay']:9.1f} MB/s   direct {d['direct']:9.1f} MB/s   "
              f"ratio {d['relay'] / d['direct']:.2f}")
        if "routed" in d:  # the test to handle.ip, root mode: no relay
            print(f"  {label:<10} routed to the service's address {d['routed']:9.1f} MB/s   "
                  f"ratio {d['routed'] / d['direct']:.2f}")
    lat, p50, p99 = r["latency_us"], r["latency_p50_us"], r["latency_p99_us"]
    for which in lat:
        print(f"  latency {which:<7} mean {lat[which]:7.1f} us   p50 {p50[which]:7.1f} us   "
              f"p99 {p99[which]:7.1f} us")
    worst = min(v for k, v in r["ratio"].items() if k.startswith(("upload relay", "download relay")))
    print(f"  target throughput relay/direct >= {TARGET_THROUGHPUT_RATIO}: "
          f"{verdict(worst >= TARGET_THROUGHPUT_RATIO)} (worst direction {worst:.2f})")
    added = r["added_latency_us"]
    print(f"  target added latency < {TARGET_ADDED_LATENCY_US:g} us: "
          f"{verdict(added < TARGET_ADDED_LATENCY_US)} ({added:.1f} us on the median of trial means; "
          f"{r['added_latency_p50_us']:.1f} us on p50)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=30, help="start+stop iterations per variant (30)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed iterations first (3)")
    ap.add_argument("--trials", type=int, default=5, help="relay trials per measure (5)")
    ap.add_argument("--trial-seconds", type=float, default=1.0, help="length of a throughput trial")
    ap.add_argument("--rtts", type=int, default=5000, help="round trips per latency trial (5000)")
    ap.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    ap.add_argument("--skip-start", action="store_true", help="skip the start+stop part")
    ap.add_argument("--skip-relay", action="store_true", help="skip the relay part")
    ap.add_argument("--no-breakdown", action="store_true", help="skip the instrumented pass")
    args = ap.parse_args(argv)

    t_all = time.perf_counter()
    results: dict[str, Any] = {
        "meta": {
            "python": sys.version.split()[0],
            "kernel": platform.release(),
            "cpus": os.cpu_count(),
            "argv": sys.argv[1:],
        },
        "targets": {
            "start_stop_envbox/unshare_max": TARGET_START_RATIO,
            "throughput_relay/direct_min": TARGET_THROUGHPUT_RATIO,
            "added_latency_us_max": TARGET_ADDED_LATENCY_US,
        },
    }
    verdicts: dict[str, bool] = {}
    parts: list[tuple[str, bool, Callable[[], dict[str, Any]], Callable[[dict[str, Any]], None]]] = [
        ("start_stop", args.skip_start, lambda: bench_start_stop(args.n, args.warmup), print_start_stop),
        ("paced", args.skip_start, lambda: bench_paced(args.n), print_paced),
        ("breakdown", args.skip_start or args.no_breakdown, lambda: bench_breakdown(args.n),
         print_breakdown),
        ("relay", args.skip_relay, lambda: bench_relay(args.trials, args.trial_seconds, args.rtts),
         print_relay),
    ]
    for name, skip, run, show in parts:
        if skip:
            continue
        try:
            r = run()
        except Exception as e:  # a benchmark reports, it does not fail the build
            traceback.print_exc()
            results[name] = {"error": f"{type(e).__name__}: {e}"}
            print(f"\n== {name}: ERROR {type(e).__name__}: {e}")
            continue
        results[name] = r
        show(r)
        if name == "start_stop":
            verdicts["start_stop"] = r["ratio"]["envbox_open_close/unshare"] <= TARGET_START_RATIO
            verdicts["restart"] = r["ratio"]["envbox_restart/unshare"] <= TARGET_START_RATIO
            verdicts["limits"] = r["limits_extra_ms"] < TARGET_LIMITS_EXTRA_MS
        elif name == "relay":
            verdicts["throughput"] = min(r["ratio"].values()) >= TARGET_THROUGHPUT_RATIO
            verdicts["latency"] = r["added_latency_us"] < TARGET_ADDED_LATENCY_US

    results["verdicts"] = {k: verdict(v) for k, v in verdicts.items()}
    results["meta"]["wall_seconds"] = time.perf_counter() - t_all
    summary = ", ".join(f"{k} {verdict(v)}" for k, v in verdicts.items()) or "nothing measured"
    print(f"\n== summary: {summary}  ({results['meta']['wall_seconds']:.1f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
            f.write("\n")
        print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
