"""Rootless mode: the supervisor and every sandbox in a user namespace of their own.

Each test runs the engine in a child process (a process has one supervisor, and this test
process's may be root's): with ``ENVBOX_ROOTLESS=yes`` even as root, so the root lane checks
rootless mode too; the unprivileged lane runs everything rootless anyway.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pytest_envbox.kernel import hostcheck
from tests.kernel import alive

REPO = Path(__file__).parents[2]

PROBE = r"""
import json, os, sys, requests
from pytest_envbox import Environment, Service, probe
web = Service("web", [sys.executable, "-m", "http.server", "8000"], ports=[8000],
              ready=probe.http(8000))
box = Service("box", ["sleep", "1000"])
with Environment([web, box]) as env:
    pid = env["web"].pid
    r = env["box"].exec(["sh", "-c", "id -u; hostname; cat /proc/self/uid_map; "
                                     f"{sys.executable} -c 'import urllib.request as u; "
                                     "u.urlopen(\"http://web:8000/\")' && echo by-name; "
                                     "touch /etc/x 2>&1 || true; cat /proc/self/status"])
    r.stdout += r.stderr
    status = dict(line.split(":", 1) for line in r.stdout.splitlines() if ":" in line)
    print(json.dumps({
        "pid": pid, "sup_uid_map": open(f"/proc/{pid}/uid_map").read().split(),
        "userns": os.readlink(f"/proc/{pid}/ns/user"), "own_userns": os.readlink("/proc/self/ns/user"),
        "lines": r.stdout.splitlines()[:2], "by_name": "by-name" in r.stdout,
        "etc": "Read-only file system" in r.stdout,
        "published": requests.get(env["web"].url(), timeout=10).status_code,
        "capeff": status.get("CapEff", "").strip(), "nnp": status.get("NoNewPrivs", "").strip(),
    }))
"""


def run_rootless(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=120, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO), "ENVBOX_ROOTLESS": "yes",
                               **env})  # fmt: skip


def test_services_run_in_a_user_namespace_mapped_to_the_caller_and_work_as_usual() -> None:
    r = run_rootless(PROBE)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.splitlines()[-1])
    # A user namespace of its own, where the caller is root (uid 0 inside = our uid outside).
    assert out["userns"] != out["own_userns"]
    assert out["sup_uid_map"][:3] == ["0", str(os.geteuid()), "1"]
    assert out["lines"] == ["0", "box"]
    # Everything else as in root mode: names, published ports, read-only host, no privileges.
    assert out["by_name"] and out["published"] == 200
    assert out["etc"], "the host's /etc is writable"
    assert out["nnp"] == "1"
    assert int(out["capeff"], 16) & (1 << 21) == 0  # no CAP_SYS_ADMIN, even in its namespace
    assert not alive(out["pid"])  # torn down when the script ended


def test_a_service_user_exists_only_with_a_subordinate_id_range() -> None:
    code = """
        import json
        from pytest_envbox import Environment, HostUnsupported, Service
        try:
            with Environment([Service("n", ["sleep", "1000"], user="nobody")]) as env:
                with open(f"/proc/{env['n'].pid}/status") as f:
                    uid = [ln.split()[1] for ln in f if ln.startswith("Uid:")][0]
                inside = env["n"].exec(["id", "-u"]).stdout.strip()
                print(json.dumps({"uid": int(uid), "inside": inside}))
        except HostUnsupported as e:
            print(json.dumps({"error": str(e)}))
    """
    r = run_rootless(code)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.splitlines()[-1])
    ids = hostcheck.subids()
    if os.geteuid() != 0 and ids.usable:  # mapped from id 1 inside: nobody is range + 65533
        assert ids.uid_range is not None
        assert out == {"uid": ids.uid_range[0] + 65533, "inside": "65534"}, out
    else:  # root in rootless mode, or a user without a range: refused, with the fix
        assert "service 'n' runs as user 'nobody'" in out["error"]
        assert "usermod --add-subuids" in out["error"] and "uidmap" in out["error"]


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux's unshare")
def test_a_host_without_user_namespaces_gets_host_unsupported_naming_the_sysctl() -> None:
    """``user.max_user_namespaces`` is per user namespace: set to 0 in one made for the test, it
    forbids new ones inside it, as the sysctl does for a whole host."""
    code = """
        from pytest_envbox import Environment, HostUnsupported, Service
        try:
            Environment([Service("w", ["sleep", "1000"])]).open()
        except HostUnsupported as e:
            print("HostUnsupported:", e)
    """
    script = (f"echo 0 > /proc/sys/user/max_user_namespaces && exec {sys.executable} -c "
              f"'{textwrap.dedent(code)}'")  # fmt: skip
    r = subprocess.run(["unshare", "--user", "--map-root-user", "sh", "-c", script],
                       capture_output=True, text=True, timeout=120, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": str(REPO), "ENVBOX_ROOTLESS": "yes"})  # fmt: skip
    assert r.returncode == 0, r.stderr
    first = "HostUnsupported: pytest-envbox cannot start services here: user namespaces are switched off"
    assert first in r.stdout, r.stdout
    assert "refused: unshare(CLONE_NEWUSER): ENOSPC (No space left on device)" in r.stdout, r.stdout
    assert "user.max_user_namespaces = 0" in r.stdout
    assert "sysctl -w user.max_user_namespaces" in r.stdout
