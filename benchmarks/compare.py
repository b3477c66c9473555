"""Two checkouts of pytest-envbox side by side: is a change slower on the start path?

    python3 benchmarks/compare.py OLD_CHECKOUT NEW_CHECKOUT [--rounds 7] [--cycles 20]

For a refactoring that must not cost speed ("within 10% of before, in the same run"). Each round
runs, for each checkout in turn (the order alternating, so that drift and background load hit both
alike), the two figures ``tox -e bench`` reports for the engine and the plugin:

- ``start+stop``: ``--cycles`` start-to-ready and stop of one ``busybox httpd`` service with
  memory, cpu and pids limits (``envbox_limits`` in ``run.py``), in a fresh process per round
  whose supervisor is warmed up first; the round's median;
- ``pytest 100``: the wall time of a pytest run of 100 tests, each with a function-scoped
  2-service environment (``run.py``'s ``pytest`` section).

Only the public API and ``-p pytest_envbox.plugin`` are used, so any two versions compare. Prints
the medians over the rounds and NEW/OLD ratios; exit status 1 when a ratio is above ``--limit``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

CYCLE = """
import json, statistics, sys, time
from pytest_envbox import Environment, Service, probe

bb, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
limits = {"memory": "64Mi", "cpu": 0.5, "pids": 64}
times = []
for i in range(n + 3):  # three to warm up: the supervisor, its spares and hubs
    env = Environment([Service(f"web{i}", [bb, "httpd", "-f", "-p", str(port), "-h", "/tmp"],
                               ports=[port], ready=probe.tcp(port), limits=limits)])
    t0 = time.perf_counter()
    env.open()
    env.close()
    times.append(time.perf_counter() - t0)
print(json.dumps(statistics.median(times[3:])))
"""

TESTS = '''
import pytest

@pytest.mark.envbox("a", "b")
@pytest.mark.parametrize("i", range(100))
def test_function_scoped(envbox, i):
    assert envbox["a"].port(8080) != envbox["b"].port(8080)
'''


def _env(checkout: Path) -> dict[str, str]:
    return {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1", "PYTHONPATH": str(checkout)}


def start_stop(checkout: Path, bb: str, cycles: int) -> float:
    p = subprocess.run([sys.executable, "-c", CYCLE, bb, "8080", str(cycles)], env=_env(checkout),
                       capture_output=True, text=True, cwd=tempfile.gettempdir())  # fmt: skip
    if p.returncode != 0:
        raise SystemExit(f"start+stop with {checkout} failed:\n{p.stderr[-3000:]}")
    return float(json.loads(p.stdout))


def pytest_run(checkout: Path, project: Path) -> float:
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "pytest_envbox.plugin",
                        "-p", "no:cacheprovider", "test_function.py"], cwd=project,
                       env=_env(checkout), capture_output=True, text=True)  # fmt: skip
    took = time.perf_counter() - t0
    if p.returncode != 0 or "100 passed" not in p.stdout:
        raise SystemExit(f"pytest with {checkout} failed:\n{p.stdout[-2000:]}{p.stderr[-2000:]}")
    return took


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--cycles", type=int, default=20)
    ap.add_argument("--limit", type=float, default=1.10, help="largest NEW/OLD ratio accepted")
    args = ap.parse_args()
    bb = shutil.which("busybox")
    if bb is None:
        raise SystemExit("busybox is needed (apt-get install busybox)")
    bb = os.path.realpath(bb)
    checkouts = {"old": args.old.resolve(), "new": args.new.resolve()}
    figures: dict[str, dict[str, list[float]]] = {k: {"start+stop": [], "pytest 100": []} for k in checkouts}
    with tempfile.TemporaryDirectory(prefix="envbox-compare-") as d:
        project = Path(d)
        svc = f'command = ["{bb}", "httpd", "-f", "-p", "8080", "-h", "/tmp"]\nports = [8080]\nready = {{ tcp = 8080 }}\n'
        (project / "pyproject.toml").write_text(f"[tool.envbox.services.a]\n{svc}\n[tool.envbox.services.b]\n{svc}")
        (project / "test_function.py").write_text(textwrap.dedent(TESTS))
        for r in range(args.rounds):
            order = ["old", "new"] if r % 2 == 0 else ["new", "old"]
            for which in order:
                figures[which]["start+stop"].append(start_stop(checkouts[which], bb, args.cycles))
                figures[which]["pytest 100"].append(pytest_run(checkouts[which], project))
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    worst = 0.0
    print(f"{'figure':<12} {'old (median)':>14} {'new (median)':>14} {'new/old':>8}")
    for figure in ("start+stop", "pytest 100"):
        old, new = (statistics.median(figures[k][figure]) for k in ("old", "new"))
        unit, scale = ("ms", 1e3) if figure == "start+stop" else ("s", 1.0)
        ratio = new / old
        worst = max(worst, ratio)
        print(f"{figure:<12} {old * scale:>11.2f} {unit:<2} {new * scale:>11.2f} {unit:<2} {ratio:>8.3f}")
    print(json.dumps({"rounds": args.rounds, "cycles": args.cycles, "figures": figures}))
    ok = worst <= args.limit
    print(f"{'PASS' if ok else 'FAIL'}: the largest new/old ratio is {worst:.3f} (limit {args.limit})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
