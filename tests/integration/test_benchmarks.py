"""The benchmark command still runs (a smoke run of its quick sections, no podman): what it prints
and writes is checked for shape, never for speed (targets live in the benchmark's own report)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.needs_root("unshare, bwrap and podman baselines run as root"),
    pytest.mark.skipif(shutil.which("busybox") is None, reason="the benchmark's service is busybox httpd"),
]


def test_quick_benchmark_writes_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "run.py"), "--quick", "--podman", "no",
                        "--only", "single", "topology", "memory", "--json", str(out)],
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    single = res["single"]
    assert "error" not in single, single.get("error")
    for variant in ("bare", "unshare", "envbox", "envbox_limits"):
        s = single["ms"][variant]["total"]
        assert s["n"] == 5 and 0 < s["min"] <= s["median"] <= s["max"]
    assert single["ratios"]["envbox_limits / unshare"] > 0
    assert set(res["topology"]) >= {"5", "20"} and res["topology"]["20"]["ready_ms"]["n"] == 2
    assert 0 < res["memory"]["supervisor_rss_with_services_MiB"] < 1024
    assert "== targets" in r.stdout and "single: envbox with network and limits / unshare" in r.stdout
