"""Benchmark: wiring services onto an environment's network, and topology start-to-ready.

1. **Wiring cost per service** (median, N = 1, 5 and 20 services): a hub (namespace + bridge)
   and N veth pairs with addresses, as the supervisor makes them (``netlink.make_hub`` and
   ``netlink.attach``, raw rtnetlink), against the same wiring with iproute2's ``ip -batch``
   (one ``ip`` process for the hub side, one per service inside its namespace). The service
   namespaces are made beforehand and not timed. Target: under 5 ms per service.
2. **Start-to-ready of a topology** of 5 and of 10 independent TCP servers (a Python process
   that listens on a port), with envbox (``Environment.open()``, a ``tcp`` probe each) against
   the same processes started bare on the host (all at once, ready when each port accepts).
   Target: a 10-service topology ready within 150 ms of its slowest bare service.

Runs as root (or wherever envbox runs); PASS/FAIL is printed, the exit status is always 0.

    PYTHONPATH=. python3 benchmarks/bench_network.py [--n 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from typing import Any

from pytest_envbox import Environment, Service, probe
from pytest_envbox.kernel import netlink

TARGET_WIRING_MS = 5.0
TARGET_TOPOLOGY_EXTRA_MS = 150.0
SERVER = ("import socket, sys\ns = socket.socket()\ns.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
          "s.bind(('0.0.0.0', int(sys.argv[1])))\ns.listen(64)\nwhile True:\n    s.accept()[0].close()\n")


def ms(x: float) -> float:
    return x * 1000.0


def wiring_netlink(n: int) -> float:
    """Seconds to make a hub and wire ``n`` prepared namespaces onto it (the supervisor's way)."""
    spaces = [netlink.new_netns() for _ in range(n)]
    try:
        t0 = time.perf_counter()
        fd, nl, bridge = netlink.make_hub()  # (the supervisor has one made ahead)
        nl.add_address(bridge, "198.18.0.1", 24)
        for i, ns in enumerate(spaces):
            netlink.attach(nl, bridge, f"v{i + 1}", ns, f"198.18.0.{i + 2}", 24)
        dt = time.perf_counter() - t0
        nl.close()
        os.close(fd)
        return dt
    finally:
        for ns in spaces:
            os.close(ns)


def wiring_ip_batch(n: int) -> float:
    """The same with iproute2: ``ip -batch`` for the hub, then one ``ip -batch`` per service."""
    ip = shutil.which("ip")
    unshare = shutil.which("unshare")
    if ip is None or unshare is None:
        raise RuntimeError("needs ip and unshare")
    holders = [subprocess.Popen([unshare, "--net", "sleep", "60"]) for _ in range(n + 1)]
    try:
        pids = [p.pid for p in holders]
        for pid in pids:  # wait until each is in its namespace
            while os.readlink(f"/proc/{pid}/ns/net") == os.readlink("/proc/self/ns/net"):
                time.sleep(0.0005)
        hub, services = pids[0], pids[1:]
        t0 = time.perf_counter()
        script = ["link add br0 type bridge", "addr add 198.18.0.1/24 dev br0", "link set br0 up"]
        for i, pid in enumerate(services):
            script += [f"link add v{i + 1} type veth peer name eth0 netns {pid}",
                       f"link set v{i + 1} master br0", f"link set v{i + 1} up"]  # fmt: skip
        subprocess.run(["nsenter", f"--net=/proc/{hub}/ns/net", ip, "-batch", "-"],
                       input="\n".join(script) + "\n", text=True, check=True)  # fmt: skip
        for i, pid in enumerate(services):
            inside = [f"addr add 198.18.0.{i + 2}/24 dev eth0", "link set eth0 up"]
            subprocess.run(["nsenter", f"--net=/proc/{pid}/ns/net", ip, "-batch", "-"],
                           input="\n".join(inside) + "\n", text=True, check=True)  # fmt: skip
        return time.perf_counter() - t0
    finally:
        for p in holders:
            p.kill()
            p.wait()


def bench_wiring(reps: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for n in (1, 5, 20):
        nl_t = [wiring_netlink(n) / n for _ in range(reps)]
        try:
            ipb = statistics.median(wiring_ip_batch(n) / n for _ in range(max(3, reps // 4)))
        except (RuntimeError, subprocess.CalledProcessError, FileNotFoundError) as e:
            ipb = float("nan")
            print(f"  (ip -batch not measured: {e})")
        out[str(n)] = {"netlink_ms_per_service": ms(statistics.median(nl_t)),
                       "ip_batch_ms_per_service": ms(ipb)}  # fmt: skip
    return out


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def bare_ready(n: int, base_port: int) -> float:
    """Seconds from starting ``n`` servers at once until every one accepts a connection."""
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", SERVER, str(base_port + i)]) for i in range(n)]
    try:
        pending = set(range(n))
        while pending:
            pending = {i for i in pending if not _accepts(base_port + i)}
            if pending:
                time.sleep(0.001)  # a poll, as envbox's probes poll
        return time.perf_counter() - t0
    finally:
        for p in procs:
            p.kill()
            p.wait()


def envbox_ready(n: int) -> float:
    services = [Service(f"s{i}", [sys.executable, "-c", SERVER, "9000"], ready=probe.tcp(9000))
                for i in range(n)]  # fmt: skip
    env = Environment(services)
    t0 = time.perf_counter()
    env.open()
    dt = time.perf_counter() - t0
    env.close()
    return dt


def bench_topology(reps: int) -> dict[str, Any]:
    with Environment([Service("warm", ["true"])]):
        pass  # a warm supervisor, as in a test session after its first environment
    out: dict[str, Any] = {}
    for n in (5, 10):
        bare, boxed = [], []
        for r in range(reps):
            bare.append(bare_ready(n, 23000 + 100 * (r % 10)))
            boxed.append(envbox_ready(n))
        b, e = statistics.median(bare), statistics.median(boxed)
        out[str(n)] = {"bare_ms": ms(b), "envbox_ms": ms(e), "extra_ms": ms(e - b)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20, help="repetitions (20)")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    results: dict[str, Any] = {}

    print(f"== wiring cost per service (median of {args.n}; namespaces made beforehand)")
    w = results["wiring"] = bench_wiring(args.n)
    for n, r in w.items():
        print(f"  N={n:>2}: raw netlink {r['netlink_ms_per_service']:6.2f} ms/service   "
              f"ip -batch {r['ip_batch_ms_per_service']:6.2f} ms/service")
    worst = max(r["netlink_ms_per_service"] for r in w.values())
    wiring_ok = worst < TARGET_WIRING_MS
    print(f"  target wiring < {TARGET_WIRING_MS:.0f} ms per service: "
          f"{'PASS' if wiring_ok else 'FAIL'} (worst {worst:.2f} ms)")

    reps = max(5, args.n // 2)
    print(f"\n== start-to-ready of N independent TCP servers (median of {reps})")
    t = results["topology"] = bench_topology(reps)
    for n, r in t.items():
        print(f"  N={n:>2}: bare {r['bare_ms']:7.1f} ms   envbox {r['envbox_ms']:7.1f} ms   "
              f"extra {r['extra_ms']:+7.1f} ms")
    extra = t["10"]["extra_ms"]
    topo_ok = extra < TARGET_TOPOLOGY_EXTRA_MS
    print(f"  target 10 services ready within {TARGET_TOPOLOGY_EXTRA_MS:.0f} ms of bare: "
          f"{'PASS' if topo_ok else 'FAIL'} ({extra:+.1f} ms)")
    results["verdicts"] = {"wiring": wiring_ok, "topology": topo_ok}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
