"""Benchmark: a suite of 40 tests over a 3-service topology, with and without pytest-xdist.

Writes a small project to a temporary directory (three services that call each other by name:
``web`` and ``api`` HTTP servers and a ``cache``; 40 tests, each with its own environment of the
topology, function scope), runs it with ``-n 0`` and with ``-n 2``, and reports both wall times.
Both runs must pass; the figures are informative (a benchmark never fails CI).

    PYTHONPATH=. python3 benchmarks/bench_xdist.py [--workers 2] [--tests 40]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PYPROJECT = """
[tool.envbox.services.cache]
command = ["{py}", "-m", "http.server", "6379"]
ready = {{ tcp = 6379 }}

[tool.envbox.services.api]
command = ["{py}", "-m", "http.server", "8000"]
ports = [8000]
ready = {{ http = 8000 }}
depends_on = ["cache"]
limits = {{ memory = "128Mi" }}

[tool.envbox.services.web]
command = ["{py}", "-m", "http.server", "8080"]
ports = [8080]
ready = {{ http = 8080 }}
depends_on = ["api"]

[tool.envbox.topologies]
shop = ["web", "api", "cache"]
"""

TESTS = """
import urllib.request

import pytest


@pytest.mark.parametrize("i", range({n}))
@pytest.mark.envbox(topology="shop")
def test_web_reaches_api_by_name(envbox, i):
    assert envbox["web"].http.get("/").status_code == 200
    fetch = "import urllib.request as u; print(u.urlopen('http://api:8000/', timeout=5).status)"
    assert envbox["web"].exec(["{py}", "-c", fetch]).stdout.strip() == "200"
"""


def run(project: Path, workers: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "pytest_envbox.plugin"]
    args += ["-n", str(workers)] if workers else ["-p", "no:xdist"]
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    if workers:
        args += ["-p", "xdist.plugin"]
    t0 = time.perf_counter()
    r = subprocess.run(args, cwd=project, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    last = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr[-500:]
    print(f"  -n {workers}: {dt:6.2f} s   {last}")
    if r.returncode != 0:
        print(r.stdout[-3000:], r.stderr[-2000:])
    return dt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--tests", type=int, default=40)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="envbox-bench-") as d:
        project = Path(d)
        (project / "pyproject.toml").write_text(PYPROJECT.format(py=sys.executable))
        (project / "test_suite.py").write_text(TESTS.format(n=args.tests, py=sys.executable))
        print(f"== {args.tests} tests, each with its own 3-service environment (web -> api -> cache)")
        serial = run(project, 0)
        parallel = run(project, args.workers)
        print(f"  speed-up with -n {args.workers}: {serial / parallel:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
