"""The tox lanes that change the host (a user and a virtualenv for the rootless lane; QEMU and a
kernel for the cgroup v2 VM) run only where asked: CI (``CI=true``, or ``.ci/run``) or
``ENVBOX_HOST_LANES=1``. Anywhere else they say what they would change, and change nothing."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run(script: str, tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), **env}
    return subprocess.run(["bash", str(ROOT / ".ci" / script), *args], env=base, capture_output=True,
                          text=True, timeout=60)  # fmt: skip


@pytest.mark.skipif(os.geteuid() != 0, reason="as another user the lane skips anyway: not root")
def test_the_rootless_lane_says_what_it_would_change_and_skips(tmp_path: Path) -> None:
    base = tmp_path / "rootless"
    r = run("rootless", tmp_path, ENVBOX_ROOTLESS_BASE=str(base))
    assert r.returncode == 0, r.stderr
    assert "SKIPPED: this lane changes the host" in r.stdout and "envbox-ci" in r.stdout
    assert "ENVBOX_HOST_LANES=1" in r.stdout
    assert not base.exists()


def test_the_vm_lane_says_what_it_would_change_and_skips(tmp_path: Path) -> None:
    cache = tmp_path / "v2vm"
    r = run("v2vm", tmp_path, "true", V2VM_DIR=str(cache))
    assert r.returncode == 0, r.stderr
    assert "SKIPPED" in r.stdout
    if os.geteuid() == 0:
        assert "qemu-system-x86" in r.stdout and "ENVBOX_HOST_LANES=1" in r.stdout
    assert not cache.exists() or not any(cache.iterdir())


def test_ci_runs_them() -> None:
    text = (ROOT / ".ci" / "run").read_text()
    assert "ENVBOX_HOST_LANES=1" in text and "python3 -m tox" in text
