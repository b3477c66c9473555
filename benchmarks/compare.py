"""Two checkouts of pytest-envbox side by side: is a change slower on the start path?

    python3 benchmarks/compare.py OLD_CHECKOUT NEW_CHECKOUT [--rounds 7] [--cycles 20]

For a refactoring that must not cost speed ("within 10% of before, in the same run"). The two
figures ``tox -e bench`` reports for the engine and the plugin, each interleaved between the two
checkouts (the order alternating, so that drift and background load hit both alike):

- ``start+stop``: start-to-ready and stop of one ``busybox httpd`` service with memory, cpu
  and pids limits (``envbox_limits`` in ``run.py``), ``--cycles`` per round: one process per
  checkout, asked for one cycle at a time, alternately, so that both see the same moment of
  the machine (whose speed drifts by half within minutes here);
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

#: A worker per checkout: one start+stop cycle per line it reads, its time on a line back.
WORKER = """
import sys, time
from pytest_envbox import Environment, Service, probe

bb, port = sys.argv[1], int(sys.argv[2])
limits = {"memory": "64Mi", "cpu": 0.5, "pids": 64}
for i, _ in enumerate(sys.stdin):
    env = Environment([Service(f"web{i}", [bb, "httpd", "-f", "-p", str(port), "-h", "/tmp"],
                               ports=[port], ready=probe.tcp(port), limits=limits)])
    t0 = time.perf_counter()
    env.open()
    env.close()
    print(time.perf_counter() - t0, flush=True)
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


class Worker:
    """A process running one checkout's engine, which does a start+stop cycle when asked."""

    def __init__(self, checkout: Path, bb: str, port: int) -> None:
        self.checkout = checkout
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER, bb, str(port)], env=_env(checkout),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     cwd=tempfile.gettempdir())  # fmt: skip

    def cycle(self) -> float:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"start+stop with {self.checkout} failed (see its stderr above)")
        return float(line)

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


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
        # Cycle by cycle, alternating: the two see the same moment of the machine's drift.
        workers = {k: Worker(path, bb, 8080) for k, path in checkouts.items()}
        try:
            for i in range(args.cycles * args.rounds + 6):  # six to warm up: supervisors, spares, hubs
                for which in (["old", "new"] if i % 2 == 0 else ["new", "old"]):
                    took = workers[which].cycle()
                    if i >= 6:
                        figures[which]["start+stop"].append(took)
        finally:
            for w in workers.values():
                w.close()
        for r in range(args.rounds):
            for which in (["old", "new"] if r % 2 == 0 else ["new", "old"]):
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
