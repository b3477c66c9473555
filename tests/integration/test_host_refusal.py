"""Hosts that say no, for real: ``envbox doctor``, the first failing start and a pytest run under
a seccomp filter that refuses what a container's profile, or AppArmor's user namespace
restriction, refuses (tests/hostsim.py; the real container is in test_containers.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests import hostsim
from tests.conftest import PLUGIN_ARGS

pytestmark = pytest.mark.skipif(not hostsim.supported(), reason="tests/hostsim.py knows x86_64 and aarch64")

SIM = str(Path(hostsim.__file__))
ROOT = os.geteuid() == 0


def under(kind: str, argv: list[str], *, cwd: Path | str = "/",
          **env: str) -> subprocess.CompletedProcess[str]:  # fmt: skip
    clean = {k: v for k, v in os.environ.items() if k not in ("CI", "ENVBOX_ROOTLESS", "PYTEST_ADDOPTS")}
    return subprocess.run([sys.executable, SIM, kind, *argv], capture_output=True, text=True,
                          timeout=120, cwd=cwd, env={**clean, **env})  # fmt: skip


def doctor(kind: str, **env: str) -> subprocess.CompletedProcess[str]:
    return under(kind, [sys.executable, "-m", "pytest_envbox.cli", "doctor"], **env)


def lines(out: str) -> dict[str, str]:
    return {ln[:18].strip(): ln[19:] for ln in out.splitlines() if ln[:1].isalpha()}


def test_doctor_in_a_container_profile_names_seccomp_and_the_fix() -> None:
    r = doctor("container")
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stderr == "", r.stderr
    host = lines(r.stdout)["host"]
    assert host.startswith("MISSING a seccomp filter refuses"), r.stdout
    assert "Seccomp: 2 in /proc/self/status" in r.stdout
    assert "--privileged" in r.stdout and "privileged = true" in r.stdout
    assert "docs/ci.md#containers" in r.stdout
    # the lines that would only repeat the refusal (with a wrong fix: modprobe) are not printed
    assert "modprobe" not in r.stdout and "sandbox " not in r.stdout
    assert r.stdout.count("pytest-envbox cannot start services here") == 1


def test_doctor_under_an_apparmor_style_refusal_gives_the_sysctl_and_sudo() -> None:
    """A user namespace is made, then every call that needs its capabilities is refused: what
    kernel.apparmor_restrict_unprivileged_userns=1 does on Ubuntu 24.04 (GitHub's runners)."""
    r = doctor("apparmor", ENVBOX_ROOTLESS="yes")
    assert r.returncode == 1, r.stdout + r.stderr
    assert lines(r.stdout)["host"] == "MISSING the user namespace's capabilities are denied", r.stdout
    assert "in a new user namespace (which was made)" in r.stdout
    assert "`sudo sysctl -w kernel.apparmor_restrict_unprivileged_userns=0`" in r.stdout
    assert "/etc/sysctl.d/" in r.stdout
    assert '`sudo -E env "PATH=$PATH" python -m pytest`' in r.stdout
    assert "docs/ci.md#apparmor" in r.stdout


def test_the_unrestricted_host_has_no_refusal_line() -> None:
    r = subprocess.run([sys.executable, "-m", "pytest_envbox.cli", "doctor"], capture_output=True,
                       text=True, timeout=120, cwd="/")  # fmt: skip
    assert "host" not in lines(r.stdout), r.stdout
    assert "cannot start services here" not in r.stdout


PROFILED = """
import sys
from pytest_envbox.cli import main
from pytest_envbox.kernel import hostcheck
# the sysctl of Ubuntu 24.04, as a file this test writes: set, though this host's calls pass
hostcheck._USERNS_SYSCTLS = tuple(
    (sys.argv[1] if "apparmor" in path else "/nonexistent", bad, why, fix)
    for path, bad, why, fix in hostcheck._USERNS_SYSCTLS)
sys.exit(main(["doctor"]))
"""


def test_a_restriction_the_probe_got_past_is_a_note_not_a_failure(tmp_path: Path) -> None:
    """Ubuntu 24.04 with an AppArmor profile that allows this interpreter user namespaces
    (docs/ci.md#apparmor): the sysctl still says 1, but the real calls pass. The doctor believes
    the calls, as the first start does, and does not fail the step that runs it."""
    sysctl = tmp_path / "apparmor_restrict_unprivileged_userns"
    sysctl.write_text("1\n")
    clean = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}
    r = subprocess.run([sys.executable, "-c", PROFILED, str(sysctl)], capture_output=True, text=True,
                       timeout=120, cwd="/", env={**clean, "ENVBOX_ROOTLESS": "yes"})  # fmt: skip
    found = lines(r.stdout)
    assert "host" not in found, r.stdout
    verdict, text = found["user namespaces"].split(None, 1)
    assert verdict == "NOTE" and text.startswith("AppArmor restricts"), r.stdout
    assert "were not refused" in text, r.stdout
    assert not any(v.startswith("MISSING") and "user namespace" in v for v in found.values()), r.stdout


START = """
import os, sys
from pytest_envbox import Environment, HostUnsupported, Service
try:
    with Environment([Service("web", ["sleep", "60"])]):
        print("STARTED")
except HostUnsupported as e:
    print("REFUSAL", e.refusal)
    print(e)
"""


@pytest.mark.parametrize(("kind", "rootless", "expected"), [
    ("container", "", "container-seccomp"),
    ("apparmor", "yes", "userns-capabilities"),
])  # fmt: skip
def test_the_first_failing_start_says_what_was_refused_and_leaves_nothing(
    tmp_path: Path, kind: str, rootless: str, expected: str
) -> None:
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {"TMPDIR": str(temp)} | ({"ENVBOX_ROOTLESS": rootless} if rootless else {})
    r = under(kind, [sys.executable, "-c", START], **env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "STARTED" not in r.stdout
    if not ROOT and kind == "container":
        expected = "container-seccomp"  # rootless: the profile refuses the user namespace itself
    assert f"REFUSAL {expected}" in r.stdout, r.stdout
    assert "pytest-envbox cannot start services here:" in r.stdout
    assert "(the start failed with: " in r.stdout  # the kernel's own words are kept
    assert "Traceback" not in r.stderr, r.stderr
    assert list(temp.iterdir()) == []  # the environment's workdir is gone


PROJECT = """
[tool.envbox.services.web]
command = ["sleep", "100"]
"""
TESTS = """
import pytest

@pytest.mark.envbox("web")
def test_web(envbox):
    assert envbox["web"].pid

@pytest.mark.envbox("web")
def test_web_again(envbox):
    assert envbox["web"].pid

def test_started_in_the_test(envbox):
    from pytest_envbox import Service
    envbox.start(Service("other", ["sleep", "100"]))

def test_plain():
    pass
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "pyproject.toml").write_text(PROJECT)
    (tmp_path / "test_services.py").write_text(textwrap.dedent(TESTS))
    return tmp_path


def run_pytest(project: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return under("container", [sys.executable, "-m", "pytest", *PLUGIN_ARGS, "-p", "no:cacheprovider",
                               "-rs", "-q", *args], cwd=project, **env)  # fmt: skip


def test_outside_ci_the_tests_that_need_services_skip_with_the_reason(project: Path) -> None:
    r = run_pytest(project)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 passed, 3 skipped" in r.stdout, r.stdout
    skipped = [ln for ln in r.stdout.splitlines() if ln.startswith("SKIPPED")]
    assert len(skipped) == 3, r.stdout
    for line in skipped:
        assert "pytest-envbox cannot start services here: a seccomp filter refuses" in line, line
        assert "`envbox doctor` says why" in line


def test_in_ci_they_error_the_first_with_the_whole_explanation(project: Path) -> None:
    r = run_pytest(project, CI="true")
    out = r.stdout
    assert r.returncode == 1, out + r.stderr
    assert "1 passed, 3 errors" in out, out
    assert out.count("  why:     ") == 1, out  # the explanation once, for the first test
    assert "--privileged" in out
    assert out.count("(the error of test_services.py::test_web says why and how to fix it)") >= 2, out
    assert "Traceback" not in out and "pytest_envbox/" not in out, out


def test_the_option_overrides_ci(project: Path) -> None:
    r = run_pytest(project, "--envbox-unavailable=skip", CI="true")
    assert r.returncode == 0 and "1 passed, 3 skipped" in r.stdout, r.stdout
    (project / "pytest.ini").write_text("[pytest]\nenvbox_unavailable = error\n")
    r = run_pytest(project)
    assert r.returncode == 1 and "1 passed, 3 errors" in r.stdout, r.stdout
