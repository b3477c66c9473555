"""pytest-envbox against the alternatives: one command, one table, one JSON file.

    python3 -m tox -e bench                       # as root: installs what it needs, ~5-6 min
    python3 benchmarks/run.py [--json PATH] [--quick] [--podman auto|no]

Every figure is a median over repeated runs, shown with its min and max; every comparison is a
ratio of two figures measured in this same run, with the variants interleaved (the order rotates
every iteration) so that drift and background load hit them alike. Sections:

1. ``single``: start-to-ready and stop of one service, the same command everywhere
   (``busybox httpd -f -p PORT``, a real server that starts in about a millisecond, so what is
   measured is the tool, not the server): a bare ``subprocess`` spawn; ``unshare --fork --pid
   --mount --uts --ipc --net``; ``bwrap --unshare-all --ro-bind / /`` (if installed); envbox
   without and with memory+cpu+pids limits (its own network, port published on 127.0.0.1); and
   podman (``--network none``, and its bridge with the port published and the same limits) and
   testcontainers-python against ``podman system service``.
2. ``topology``: 5 and 20 services with dependencies (levels of services, each depending on two
   of the level before): start-to-ready of the whole topology and its teardown, against the
   slowest of the same services started bare.
3. ``pytest``: the wall time of a real pytest run of 100 tests, each with a function-scoped
   2-service environment, against the same 100 tests with one module-scoped environment and
   with no services at all.
4. ``relay``: bulk throughput and 1-byte round trip through a published port, against direct
   loopback (the ``bench_start_relay`` measures); and bursts of 200, 1000 and 2000 clients
   connecting at once (each has a byte echoed), against the same server on the host, with the
   supervisor's threads and RSS while the 2000 are connected (``bench_burst``).
5. ``memory``: the supervisor's RSS, idle and with 20 services, and what one more service costs
   (its init's PSS plus the supervisor's growth).
6. ``images`` (``bench_images.py``): a Debian redis image from a ``docker-registry`` on
   127.0.0.1: start+stop of the cached image against ``redis-server`` on the host (and a
   1-layer busybox image against the host's busybox); 100 pytest tests each with a fresh redis
   from the image, against host redis; pull+unpack into an empty store against ``skopeo copy``
   + ``umoci unpack``; start-to-ready against ``podman run --rm`` and testcontainers-python of
   the same image.

Readiness is the same everywhere: ``127.0.0.1:PORT`` accepts a connection inside the server's
network namespace (envbox's ``tcp`` probe; for the others, see ``_measure.py``).

Podman changes host state: ``_podman.py`` restores it and checks that it did. Podman never runs
in the project's test command: only here.

Targets are printed PASS/FAIL; the exit status is 0 unless the benchmark itself broke.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
if str(HERE.parent) not in sys.path:
    sys.path.insert(1, str(HERE.parent))  # a checkout without the package installed

import _measure as M  # noqa: E402
import _podman  # noqa: E402

from pytest_envbox import Environment, Service, probe  # noqa: E402
from pytest_envbox.engine.client import get_supervisor  # noqa: E402

PORT = 8080  # inside namespaces of its own: no clash possible
LIMITS = {"memory": "256Mi", "cpu": 1, "pids": 256}
PODMAN_LIMITS = ["--memory", "256m", "--cpus", "1", "--pids-limit", "256"]
UNSHARE = ["--fork", "--pid", "--mount", "--uts", "--ipc", "--net"]
TARGETS = {
    "single: envbox with network and limits / unshare": ("<=", 1.5),
    "topology 20: envbox ready - slowest bare service (ms)": ("<=", 150.0),
    "pytest: overhead of 100 function-scoped 2-service tests (s)": ("<", 2.0),
    "relay: throughput / loopback (worst direction)": (">=", 0.75),
    "relay: added round trip (us)": ("<", 30.0),
    "relay: burst of 2000 clients / same server on the host": ("<=", 2.0),
    "relay: supervisor threads with 2000 connections open": ("<", 20.0),
    "memory: supervisor RSS with 20 services (MiB)": ("<", 40.0),
    "podman: podman bridge with limits / envbox with limits": (">=", 50.0),
    "images: redis image start+stop / host redis-server": ("<=", 1.2),
    "images: 1-layer busybox image start+stop / host busybox": ("<=", 1.2),
    "images: 100 redis image tests, overhead / host redis": ("<=", 1.2),
    "images: pull+unpack / skopeo copy + umoci unpack": ("<=", 1.0),
    "images: podman run --rm to ready / envbox": (">=", 20.0),
    "images: testcontainers to ready / envbox": (">=", 20.0),
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@functools.cache
def busybox() -> str:
    bb = shutil.which("busybox")
    if bb is None:
        raise SystemExit("busybox is needed (apt-get install busybox)")
    return os.path.realpath(bb)


def httpd(port: int | str) -> list[str]:
    return [busybox(), "httpd", "-f", "-p", str(port), "-h", "/tmp"]


# --- 1. one service -------------------------------------------------------------------------------

Cycle = M.Cycle
measure = M.measure


def bare_cycle(port: int) -> Cycle:
    argv = httpd(f"127.0.0.1:{port}")

    def run() -> tuple[float, float]:
        t0 = time.perf_counter()
        p = subprocess.Popen(argv)
        M.wait_accepting(p.pid, port, own_netns=False)
        t1 = time.perf_counter()
        p.terminate()
        p.wait()
        return t1 - t0, time.perf_counter() - t1
    return run


def unshare_cycle() -> Cycle:
    """util-linux unshare blocks SIGTERM while it waits for its child, and the command, PID 1 of
    its namespace without a handler, ignores it: SIGKILL to unshare is the stop that works
    (``--kill-child`` takes the command along); stopped means the command has been reaped."""
    unshare = shutil.which("unshare")
    assert unshare is not None
    argv = [unshare, *UNSHARE, "--kill-child", *httpd(PORT)]

    def run() -> tuple[float, float]:
        t0 = time.perf_counter()
        p = subprocess.Popen(argv)
        M.wait_accepting(p.pid, PORT)
        t1 = time.perf_counter()
        inner = M.descendants(p.pid)
        p.kill()
        p.wait()
        M.wait_gone(inner)
        M.reap_all()
        return t1 - t0, time.perf_counter() - t1
    return run


def bwrap_cycle() -> Cycle:
    bwrap = shutil.which("bwrap")
    assert bwrap is not None
    argv = [bwrap, "--unshare-all", "--die-with-parent", "--ro-bind", "/", "/", "--dev", "/dev",
            "--proc", "/proc", "--tmpfs", "/tmp", *httpd(PORT)]  # fmt: skip

    def run() -> tuple[float, float]:
        t0 = time.perf_counter()
        p = subprocess.Popen(argv)
        M.wait_accepting(p.pid, PORT)
        t1 = time.perf_counter()
        inner = M.descendants(p.pid)
        p.terminate()  # bwrap dies; --die-with-parent kills the sandbox
        p.wait()
        M.wait_gone(inner)
        M.reap_all()
        return t1 - t0, time.perf_counter() - t1
    return run


def envbox_cycle(limits: dict[str, Any] | None) -> Cycle:
    counter = iter(range(10**9))

    def run() -> tuple[float, float]:
        svc = Service(f"web{next(counter)}", httpd(PORT), ports=[PORT], ready=probe.tcp(PORT),
                      limits=limits or {})  # fmt: skip
        env = Environment([svc])
        t0 = time.perf_counter()
        env.open()
        t1 = time.perf_counter()
        env.close()
        return t1 - t0, time.perf_counter() - t1
    return run


def bench_single(n: int, warmup: int, podman: _podman.Podman | None, docker_host: str | None,
                 n_podman: int, info: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    variants: dict[str, Cycle] = {
        "bare": bare_cycle(18080),
        "unshare": unshare_cycle(),
        "envbox": envbox_cycle(None),
        "envbox_limits": envbox_cycle(LIMITS),
    }
    if shutil.which("bwrap"):
        variants["bwrap"] = bwrap_cycle()
    raw = measure(variants, n, warmup)
    if podman is not None:
        pv: dict[str, Cycle] = {
            "podman_none": lambda: _podman.run_container(
                podman, ["--network", "none"], ["httpd", "-f", "-p", str(PORT), "-h", "/www"], PORT),
            "podman_bridge_limits": lambda: _podman.run_container(
                podman, ["-p", f"127.0.0.1::{PORT}", *PODMAN_LIMITS],
                ["httpd", "-f", "-p", str(PORT), "-h", "/www"], PORT),
        }
        if docker_host is not None:
            pv["testcontainers"] = lambda: _podman.testcontainers_cycle(docker_host, PORT, LIMITS)
        # envbox once more, interleaved with podman: it then pays for podman's teardown, which
        # the kernel finishes after `podman rm` returns (a CNI bridge port and a namespace freed
        # under the RTNL lock). Both ratios are reported: to envbox in the main loop (each tool
        # in its own steady state: the target's) and to envbox beside podman (pessimistic).
        pv["envbox_limits_near_podman"] = envbox_cycle(LIMITS)
        raw.update(measure(pv, n_podman, 1))
        true_runs = [_podman.run_true(podman, ["--network", "none"]) for _ in range(max(3, n_podman // 2))]
        raw["podman_run_true_none"] = {"total": true_runs}
    failures = {k: len(parts.pop("failures", [])) for k, parts in raw.items()}
    dropped = sorted(k for k, parts in raw.items() if parts.pop("dropped", None))
    for k in dropped:
        del raw[k]
    stats = {k: {part: M.summary(v) for part, v in parts.items()} for k, parts in raw.items()}
    med = {k: s["total"]["median"] for k, s in stats.items()}
    ratios = {f"{k} / unshare": med[k] / med["unshare"] for k in med if k != "unshare"}
    if "podman_bridge_limits" in med:
        ratios["podman_bridge_limits / envbox_limits"] = med["podman_bridge_limits"] / med["envbox_limits"]
        ratios["podman_none / envbox"] = med["podman_none"] / med["envbox"]
        ratios["podman_bridge_limits / envbox_limits beside podman"] = (
            med["podman_bridge_limits"] / med["envbox_limits_near_podman"])
    if "testcontainers" in med:
        ratios["testcontainers / envbox_limits"] = med["testcontainers"] / med["envbox_limits"]
    return {"command": httpd(PORT), "n": n, "n_podman": n_podman, "limits": LIMITS, "ms": stats,
            "ratios": ratios, "failed_runs": {k: v for k, v in failures.items() if v}, "dropped": dropped, "podman": info}  # fmt: skip


# --- 2. topologies --------------------------------------------------------------------------------


def topology(n: int) -> list[Service]:
    """Levels of ``width`` services; each one after the first level depends on two of the level
    before (so a level starts when both of its dependencies' level is ready)."""
    width = 5 if n >= 10 else 2
    out: list[Service] = []
    for i in range(n):
        level, k = divmod(i, width)
        deps = [] if level == 0 else sorted({f"s{(level - 1) * width + k}",
                                             f"s{(level - 1) * width + (k + 1) % width}"})
        deps = [d for d in deps if int(d[1:]) < n]
        out.append(Service(f"s{i}", httpd(PORT), ports=[PORT], ready=probe.tcp(PORT), depends_on=deps))
    return out


def bare_service(port: int) -> tuple[float, float]:
    return bare_cycle(port)()


def bench_topology(reps: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for n in (5, 20):
        services = topology(n)
        ready, teardown, slowest_bare = [], [], []
        for _ in range(reps):
            # The same n services bare, one after the other: the slowest one's start-to-ready.
            slowest_bare.append(max(bare_service(19000 + i)[0] for i in range(n)))
            env = Environment(services)
            t0 = time.perf_counter()
            env.open()
            t1 = time.perf_counter()
            env.close()
            ready.append(t1 - t0)
            teardown.append(time.perf_counter() - t1)
        levels = -(-n // (5 if n >= 10 else 2))
        out[str(n)] = {"levels": levels, "ready_ms": M.summary(ready), "teardown_ms": M.summary(teardown),
                       "slowest_bare_ms": M.summary(slowest_bare),
                       "ready_minus_slowest_bare_ms": M.summary(
                           [a - b for a, b in zip(ready, slowest_bare, strict=True)])}  # fmt: skip
    return out


# --- 3. pytest ------------------------------------------------------------------------------------

PYTEST_FILES = {
    "function": '''
        import pytest

        @pytest.mark.envbox("a", "b")
        @pytest.mark.parametrize("i", range(100))
        def test_function_scoped(envbox, i):
            assert envbox["a"].port(8080) != envbox["b"].port(8080)
        ''',
    "module": '''
        import pytest

        pytestmark = pytest.mark.envbox("a", "b", scope="module")

        @pytest.mark.parametrize("i", range(100))
        def test_module_scoped(envbox, i):
            assert envbox["a"].port(8080) != envbox["b"].port(8080)
        ''',
    "none": '''
        import pytest

        @pytest.mark.parametrize("i", range(100))
        def test_no_services(i):
            assert i >= 0
        ''',
}


def bench_pytest(reps: int) -> dict[str, Any]:
    bb = busybox()
    with tempfile.TemporaryDirectory(prefix="envbox-bench-pytest-") as d:
        root = Path(d)
        svc = f'command = ["{bb}", "httpd", "-f", "-p", "8080", "-h", "/tmp"]\nports = [8080]\nready = {{ tcp = 8080 }}\n'
        (root / "pyproject.toml").write_text(
            "[tool.pytest.ini_options]\naddopts = \"-p no:cacheprovider\"\n\n"
            f"[tool.envbox.services.a]\n{svc}\n[tool.envbox.services.b]\n{svc}")
        for name, text in PYTEST_FILES.items():
            (root / f"test_{name}.py").write_text(textwrap.dedent(text))
        env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
               "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
        times: dict[str, list[float]] = defaultdict(list)
        for r in range(reps):
            order = list(PYTEST_FILES)
            order = order[r % 3:] + order[: r % 3]
            for name in order:
                t0 = time.perf_counter()
                p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "pytest_envbox.plugin",
                                    f"test_{name}.py"], cwd=root, env=env, capture_output=True, text=True)
                times[name].append(time.perf_counter() - t0)
                if p.returncode != 0 or "100 passed" not in p.stdout:
                    raise RuntimeError(f"pytest run {name} failed:\n{p.stdout[-2000:]}{p.stderr[-2000:]}")
    s = {k: M.summary(v, 1.0) for k, v in times.items()}
    fn, mod, none = (s[k]["median"] for k in ("function", "module", "none"))
    return {"tests": 100, "seconds": s, "overhead_function_s": fn - none, "overhead_module_s": mod - none,
            "overhead_per_function_test_ms": (fn - none) * 10}  # fmt: skip


# --- 4. relay -------------------------------------------------------------------------------------


def bench_relay(trials: int, seconds: float, reps: int) -> dict[str, Any]:
    import bench_burst
    import bench_start_relay as R

    r = R.bench_relay(trials, seconds, 5000)
    return {"burst": bench_burst.bench_burst(reps),"upload_MBps": r["upload_MBps"], "download_MBps": r["download_MBps"],
            "ratio_upload": r["ratio"]["upload relay/direct"],
            "ratio_download": r["ratio"]["download relay/direct"],
            "ratio_routed": {k: v for k, v in r["ratio"].items() if "routed" in k},
            "latency_us": r["latency_us"], "added_latency_us": r["added_latency_us"],
            "latency_p99_us": r["latency_p99_us"], "all_trials": r["all_trials"],
            "trials": trials, "trial_seconds": seconds}  # fmt: skip


# --- 5. memory ------------------------------------------------------------------------------------


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def bench_memory(n: int = 20) -> dict[str, Any]:
    sup = get_supervisor()
    idle = M.rss_kib(sup.pid)
    services = [Service(f"m{i}", httpd(PORT), ports=[PORT], ready=probe.tcp(PORT)) for i in range(n)]
    with Environment(services) as env:
        busy = M.rss_kib(sup.pid)
        inits = [_ppid(env[s.name].pid or 0) for s in services]
        init_pss = [M.pss_kib(p) for p in inits]
        init_rss = [M.rss_kib(p) for p in inits]
        service_pss = [M.pss_kib(env[s.name].pid or 0) for s in services]
    per_service = (busy - idle) / n + sum(init_pss) / n
    return {"supervisor_rss_idle_MiB": idle / 1024, "supervisor_rss_with_services_MiB": busy / 1024,
            "services": n, "supervisor_growth_per_service_KiB": (busy - idle) / n,
            "init_pss_KiB": M.summary([float(x) for x in init_pss], 1.0),
            "init_rss_KiB": M.summary([float(x) for x in init_rss], 1.0),
            "service_itself_pss_KiB": M.summary([float(x) for x in service_pss], 1.0),
            "overhead_per_service_KiB": per_service}  # fmt: skip


# --- report ---------------------------------------------------------------------------------------


def row(what: str, s: dict[str, Any], unit: str = "ms", ratio: str = "") -> str:
    return (f"  {what:<46} {s['median']:>9.1f} {s['min']:>9.1f} {s['max']:>9.1f} {unit:<4} {ratio}")


def report(res: dict[str, Any]) -> dict[str, Any]:
    head = f"  {'':<46} {'median':>9} {'min':>9} {'max':>9}"
    figures: dict[str, float] = {}
    if "single" in res and "error" not in res["single"]:
        r = res["single"]
        print(f"\n== 1. one service, start-to-ready + stop: {' '.join(r['command'][1:])} (n={r['n']}, podman n={r['n_podman']})")
        print(head + "       ratio")
        labels = {
            "bare": "bare subprocess",
            "unshare": "unshare " + " ".join(UNSHARE),
            "bwrap": "bwrap --unshare-all --ro-bind / /",
            "envbox": "envbox (network, published port)",
            "envbox_limits": "envbox + memory, cpu, pids limits",
            "podman_none": "podman run --network none",
            "podman_bridge_limits": "podman run bridge -p, same limits",
            "testcontainers": "testcontainers-python (podman service)",
            "envbox_limits_near_podman": "envbox + limits (beside podman)",
            "podman_run_true_none": "podman run --rm --network none true",
        }
        for k, label in labels.items():
            if k not in r["ms"]:
                continue
            ratio = r["ratios"].get(f"{k} / unshare")
            print(row(label, r["ms"][k]["total"], ratio=f"{ratio:6.2f}x unshare" if ratio else ""))
            if "ready" in r["ms"][k] and k in ("envbox", "envbox_limits", "unshare", "podman_bridge_limits"):
                print(row("  of which start-to-ready", r["ms"][k]["ready"]))
        for k in ("podman_bridge_limits / envbox_limits", "podman_none / envbox", "testcontainers / envbox_limits",
                  "podman_bridge_limits / envbox_limits beside podman"):
            if k in r["ratios"]:
                print(f"  ratio {k:<60} {r['ratios'][k]:8.1f}x")
        figures["single: envbox with network and limits / unshare"] = r["ratios"]["envbox_limits / unshare"]
        if "podman_bridge_limits / envbox_limits" in r["ratios"]:
            figures["podman: podman bridge with limits / envbox with limits"] = r["ratios"]["podman_bridge_limits / envbox_limits"]
        if r["podman"]:
            print(f"  podman: {r['podman']}")
        if r.get("failed_runs"):
            print(f"  runs that failed and were run again: {r['failed_runs']}")
        if r.get("dropped"):
            print(f"  dropped after failing three times in a row: {', '.join(r['dropped'])}")
    if "topology" in res and "error" not in res["topology"]:
        print("\n== 2. topologies with dependencies (busybox httpd per service)")
        print(head)
        for n in ("5", "20"):
            t = res["topology"][n]
            print(row(f"{n} services, {t['levels']} levels: start-to-ready", t["ready_ms"]))
            print(row(f"{n} services: teardown", t["teardown_ms"]))
            print(row(f"{n} services: slowest one bare", t["slowest_bare_ms"]))
            print(row(f"{n} services: ready - slowest bare", t["ready_minus_slowest_bare_ms"]))
        figures["topology 20: envbox ready - slowest bare service (ms)"] = \
            res["topology"]["20"]["ready_minus_slowest_bare_ms"]["median"]
    if "pytest" in res and "error" not in res["pytest"]:
        p = res["pytest"]
        print("\n== 3. a real pytest run of 100 tests (wall time of the whole run)")
        print(head)
        for k, label in (("none", "no services"), ("module", "one module-scoped 2-service env"),
                         ("function", "a 2-service env per test")):
            print(row(label, p["seconds"][k], unit="s"))
        print(f"  overhead, function scope: {p['overhead_function_s']:.2f} s in all, "
              f"{p['overhead_per_function_test_ms']:.1f} ms per test; module scope: {p['overhead_module_s']:.2f} s")
        figures["pytest: overhead of 100 function-scoped 2-service tests (s)"] = p["overhead_function_s"]
    if "relay" in res and "error" not in res["relay"]:
        r = res["relay"]
        print(f"\n== 4. published port (relay) vs direct loopback ({r['trials']} trials)")
        print(f"  upload   relay {r['upload_MBps']['relay']:8.0f} MB/s  direct {r['upload_MBps']['direct']:8.0f} MB/s  ratio {r['ratio_upload']:.2f}")
        print(f"  download relay {r['download_MBps']['relay']:8.0f} MB/s  direct {r['download_MBps']['direct']:8.0f} MB/s  ratio {r['ratio_download']:.2f}")
        for k, v in r.get("ratio_routed", {}).items():  # root: the test to handle.ip, no relay
            print(f"  {k.split()[0]:<8} to the service's address (routed, no relay): ratio {v:.2f}")
        print(f"  1-byte round trip: relay {r['latency_us']['relay']:.1f} us, direct {r['latency_us']['direct']:.1f} us, "
              f"added {r['added_latency_us']:.1f} us")
        figures["relay: throughput / loopback (worst direction)"] = min(r["ratio_upload"], r["ratio_download"])
        figures["relay: added round trip (us)"] = r["added_latency_us"]
        import bench_burst

        bench_burst.print_burst(r["burst"])
        figures["relay: burst of 2000 clients / same server on the host"] = r["burst"]["sizes"]["2000"]["ratio"]
        figures["relay: supervisor threads with 2000 connections open"] = r["burst"]["supervisor_threads_at_2000"]
    if "images" in res and "error" not in res["images"]:
        import bench_images

        bench_images.print_images(res["images"], row, head)
        figures.update(bench_images.figures(res["images"]))
    if "memory" in res and "error" not in res["memory"]:
        m = res["memory"]
        print("\n== 5. memory")
        print(f"  supervisor RSS idle {m['supervisor_rss_idle_MiB']:.1f} MiB, with {m['services']} services "
              f"{m['supervisor_rss_with_services_MiB']:.1f} MiB ({m['supervisor_growth_per_service_KiB']:.0f} KiB per service)")
        print(f"  per service: init PSS {m['init_pss_KiB']['median']:.0f} KiB (RSS {m['init_rss_KiB']['median']:.0f} KiB, "
              f"mostly shared), overhead in all {m['overhead_per_service_KiB']:.0f} KiB")
        figures["memory: supervisor RSS with 20 services (MiB)"] = m["supervisor_rss_with_services_MiB"]
    for k, v in res.items():
        if isinstance(v, dict) and "error" in v:
            print(f"\n== {k}: FAILED TO RUN: {v['error'].splitlines()[-1]}")
    print("\n== targets")
    verdicts = {}
    for name, (op, target) in TARGETS.items():
        if name not in figures:
            verdicts[name] = "not measured"
        else:
            v = figures[name]
            ok = {"<=": v <= target, "<": v < target, ">=": v >= target}[op]
            verdicts[name] = "PASS" if ok else "FAIL"
        fig = f"{figures[name]:.2f}" if name in figures else "-"
        print(f"  {name:<62} {fig:>8}  {op} {target:<6} {verdicts[name]}")
    return {"figures": figures, "verdicts": verdicts}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", metavar="PATH", help="also write every figure here")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    ap.add_argument("--podman", choices=["auto", "no"], default="auto",
                    help="auto: install podman with apt if missing (as root) and run it; no: skip it")
    ap.add_argument("--only", nargs="*", choices=["single", "topology", "pytest", "relay", "memory", "images"])
    args = ap.parse_args(argv)
    n, reps, n_podman, trials = (5, 2, 3, 2) if args.quick else (20, 7, 10, 5)
    why = _podman.install_if_missing(log, {"busybox": "busybox"})  # the command every variant runs
    if why is not None:
        raise SystemExit(f"the benchmark runs busybox httpd: {why}")
    started = time.monotonic()
    M.set_subreaper()
    sections = args.only or ["single", "topology", "pytest", "relay", "memory", "images"]
    res: dict[str, Any] = {"meta": {"python": sys.version.split()[0], "kernel": platform.release(),
                                    "cpus": os.cpu_count(), "argv": sys.argv[1:],
                                    "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}}  # fmt: skip
    # A warm supervisor, as in a test session after its first environment; its cold start apart.
    t0 = time.perf_counter()
    with Environment([Service("warm", httpd(PORT), ready=probe.tcp(PORT))]):
        pass
    res["meta"]["first_environment_ms (cold supervisor)"] = (time.perf_counter() - t0) * 1e3

    def section(name: str, fn: Callable[[], dict[str, Any]]) -> None:
        if name not in sections:
            return
        log(f"running {name} ...")
        t = time.monotonic()
        try:
            res[name] = fn()
        except Exception:
            res[name] = {"error": traceback.format_exc()}
            log(res[name]["error"])
        res[name]["section_seconds"] = time.monotonic() - t

    def single() -> dict[str, Any]:
        if args.podman == "no":
            return bench_single(n, 3, None, None, 0, {"skipped": "--podman no"})
        why = _podman.install_if_missing(log, _podman.PODMAN)
        if why is not None:
            log(f"podman skipped: {why}")
            return bench_single(n, 3, None, None, 0, {"skipped": why})
        with _podman.podman_session(log) as (pm, info):
            docker_host = None
            try:
                import testcontainers  # type: ignore[import-not-found]  # noqa: F401

                docker_host = pm.start_service()
                os.environ.update(_podman.testcontainers_env(docker_host))
            except ImportError:
                info["testcontainers"] = "not installed (pip install testcontainers; tox -e bench does)"
            result = bench_single(n, 3, pm, docker_host, n_podman, info)
        return result  # info is completed (host state) when the session ends

    section("single", single)
    section("topology", lambda: bench_topology(reps))
    section("pytest", lambda: bench_pytest(max(3, reps // 2)))
    section("relay", lambda: bench_relay(trials, 0.5 if args.quick else 1.0, 2 if args.quick else 3))
    section("memory", bench_memory)

    def images() -> dict[str, Any]:
        import bench_images

        return bench_images.bench_images(n, max(3, reps // 2), 3 if args.quick else 4, 3 if args.quick else 6,
                                         args.podman != "no", log)  # fmt: skip

    section("images", images)
    res["meta"]["wall_seconds"] = time.monotonic() - started
    res["targets"] = report(res)
    print(f"\n(wall time {res['meta']['wall_seconds']:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=str) + "\n")
        print(f"(JSON: {args.json})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
