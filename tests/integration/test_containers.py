"""Where users run it: inside a container. Real podman containers (runc), running this checkout
with the host's own Python (tests/podmankit.py): ``--privileged``, envbox works as on the host;
with podman's defaults (its seccomp profile, its capabilities), it says what was refused and
how to fix it, as an error on CI and a skip elsewhere.

What podman's defaults refuse, measured (the first test keeps it measured): its seccomp profile
lets ``unshare``, ``clone``, ``mount`` and ``setns`` through; the kernel refuses them because the
container has no ``CAP_SYS_ADMIN``. Adding that capability opens them (with ``CAP_NET_ADMIN``, a
writable ``/proc/sys`` and writable cgroups, which on cgroup v1 only ``--privileged`` gives, the
container is privileged in all but name). The profile the package ships
(pytest_envbox/data/seccomp-envbox.json) is for the other way: rootless mode, no capability added,
where podman's profile refuses one call envbox needs (``sethostname`` in a user namespace's own
UTS namespace); with it the example suite passes (its test below).
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
from collections.abc import Iterator
from importlib.resources import files
from pathlib import Path

import pytest

from tests import podmankit

pytestmark = [pytest.mark.slow]

PY = sys.executable
REPO = podmankit.REPO


@pytest.fixture(scope="module")
def podman() -> Iterator[podmankit.PodmanHost]:
    reason = podmankit.unavailable()
    if reason is not None:
        pytest.skip(reason)
    host = podmankit.PodmanHost()
    t0 = time.monotonic()
    yield host
    left = host.close()
    print(f"container tests: {time.monotonic() - t0:.1f} s in containers")
    # The leak check: containers, mounts, cgroups (envbox's, inside the container's), network
    # state, podman's storage: all gone.
    assert not left, f"the container tests left this on the host: {left}"


def _out(r: object) -> str:
    return f"exit {r.returncode}\n--- stdout\n{r.stdout[-6000:]}\n--- stderr\n{r.stderr[-3000:]}"  # type: ignore[attr-defined]


#: In the container: what the kernel and podman's seccomp filter answer, as JSON.
PROBE = r"""
import ctypes, errno, json, os
libc = ctypes.CDLL(None, use_errno=True)
status = dict(line.split(":\t", 1) for line in open("/proc/self/status").read().splitlines() if ":\t" in line)
out = {k: status[k].strip() for k in ("Seccomp", "Seccomp_filters", "CapEff", "NoNewPrivs")}
def child(call):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        rc = call()
        os.write(w, (errno.errorcode.get(ctypes.get_errno(), "?") if rc else "ok").encode())
        os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    return os.read(r, 64).decode()
flags = {"0": 0, "CLONE_NEWUSER": 0x10000000, "CLONE_NEWNS": 0x20000, "CLONE_NEWNET": 0x40000000,
         "CLONE_NEWPID": 0x20000000, "CLONE_NEWCGROUP": 0x02000000}
out["unshare"] = {name: child(lambda f=f: libc.unshare(f)) for name, f in flags.items()}
out["mount tmpfs"] = child(lambda: libc.mount(b"none", b"/mnt", b"tmpfs", 0, None))
# In a user and UTS namespace of its own, as envbox's rootless sandbox names itself:
out["sethostname in a user namespace"] = child(
    lambda: libc.unshare(0x10000000 | 0x04000000) or libc.sethostname(b"envbox", 6))
# KEYCTL_GET_KEYRING_ID of the session keyring: the kernel allows it anyone (podman's profile
# too); Docker's, and envbox's, refuse the call.
out["keyctl"] = child(lambda: libc.syscall(250, 0, -3, 0) < 0 and -1)
print(json.dumps(out))
"""

CAP_SYS_ADMIN = 21


def _probe(podman: podmankit.PodmanHost, *options: str) -> dict[str, object]:
    r = podman.run([PY, "-c", PROBE], options=options)
    assert r.returncode == 0, _out(r)
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def test_podmans_default_seccomp_profile_lets_namespaces_through_and_capabilities_refuse_them(
        podman: podmankit.PodmanHost) -> None:  # fmt: skip
    default = _probe(podman)
    print("podman defaults:", default)
    assert default["Seccomp"] == "2" and default["Seccomp_filters"] == "1"  # a filter is there
    assert not int(str(default["CapEff"]), 16) & (1 << CAP_SYS_ADMIN)
    unshare = default["unshare"]
    assert isinstance(unshare, dict)
    # The filter allows unshare: a call the kernel never refuses passes, and so does a user
    # namespace (which needs no capability) ...
    assert unshare["0"] == "ok" and unshare["CLONE_NEWUSER"] == "ok"
    # ... while what needs CAP_SYS_ADMIN is refused by the kernel, as on a host without it.
    for ns in ("CLONE_NEWNS", "CLONE_NEWNET", "CLONE_NEWPID", "CLONE_NEWCGROUP"):
        assert unshare[ns] == "EPERM", (ns, default)
    assert default["mount tmpfs"] == "EPERM"
    # One call the profile itself refuses without CAP_SYS_ADMIN, even where the kernel allows it:
    # a host name in a user namespace's own UTS namespace (envbox's rootless sandboxes).
    assert default["sethostname in a user namespace"] == "EPERM" and default["keyctl"] == "ok"

    # The same seccomp profile, with the capability: everything passes (a privileged container in
    # all but name; the shipped profile serves rootless mode, without the capability).
    admin = _probe(podman, "--cap-add", "SYS_ADMIN")
    print("podman defaults + CAP_SYS_ADMIN:", admin)
    assert admin["Seccomp"] == "2"
    assert admin["unshare"] == dict.fromkeys(unshare, "ok") and admin["mount tmpfs"] == "ok"


PROFILE = str(files("pytest_envbox") / "data" / "seccomp-envbox.json")
#: The rootless recipe: no capability added, a user other than root, the shipped profile, and
#: /proc and /sys unmasked (a user namespace may mount its own proc only where the container's
#: is not partly hidden). Docker: --security-opt systempaths=unconfined for unmask=ALL.
ROOTLESS = ["--security-opt", f"seccomp={PROFILE}", "--security-opt", "unmask=ALL",
            "--security-opt", "no-new-privileges"]  # fmt: skip


def test_the_shipped_profile_grants_no_capability(podman: podmankit.PodmanHost) -> None:
    """As root in the container, with the profile: what needs CAP_SYS_ADMIN is still refused
    (by the kernel), a user namespace and a host name in it are allowed, and the profile is the
    one in force (keyctl, which podman's default lets through, is refused)."""
    p = _probe(podman, "--security-opt", f"seccomp={PROFILE}")
    print("shipped profile:", p)
    assert p["Seccomp"] == "2" and p["keyctl"] == "EPERM"
    unshare = p["unshare"]
    assert isinstance(unshare, dict) and unshare["CLONE_NEWUSER"] == "ok"
    assert {unshare[ns] for ns in ("CLONE_NEWNS", "CLONE_NEWNET", "CLONE_NEWPID")} == {"EPERM"}
    assert p["mount tmpfs"] == "EPERM" and p["sethostname in a user namespace"] == "ok"


#: The shop's tests of cgroup features: rootless on cgroup v1 (or in a container's read-only
#: cgroup tree) they raise HostUnsupported, as they must.
CGROUP_TESTS = "not memory_limit and not oom_killed and not paused"


def test_the_example_shop_passes_rootless_in_an_unprivileged_container_with_the_profile(
        podman: podmankit.PodmanHost, tmp_path: Path) -> None:  # fmt: skip
    shop = tmp_path / "shop"
    shutil.copytree(REPO / "examples" / "shop", shop, ignore=shutil.ignore_patterns("__pycache__"))
    shop.chmod(0o755)
    conf = shop / "pyproject.toml"
    # Services without limits: limits need cgroups, which this container cannot give a user.
    text, n = re.subn(r"(?m)^limits = .*\n", "", conf.read_text())
    assert n >= 2, "examples/shop declares its limits otherwise now: update this test"
    conf.write_text(text)
    t0 = time.monotonic()
    r = podman.run([PY, "-m", "pytest", "-p", "no:cacheprovider", "--basetemp=/tmp/envbox-pytest", "-q",
                    "-W", "ignore::RuntimeWarning", "-k", CGROUP_TESTS],
                   options=ROOTLESS, user="65534:65534", env={"HOME": "/tmp", "CI": "true"},
                   binds=[str(shop)], cwd=str(shop), timeout=240)  # fmt: skip
    print(f"examples/shop rootless with the profile: {time.monotonic() - t0:.1f} s")
    assert r.returncode == 0, _out(r)
    assert re.search(r"(?m)^(\d+) passed, 3 deselected in ", r.stdout), _out(r)

    # The same without the profile (podman's default): the sandbox cannot name itself, and the
    # refusal says so, with the profile as the fix.
    r = podman.run([PY, "-m", "pytest", "-p", "no:cacheprovider", "--basetemp=/tmp/envbox-pytest", "-q",
                    "-W", "ignore::RuntimeWarning", "-x", "-k", "conftest_hook"],
                   options=ROOTLESS[2:], user="65534:65534", env={"HOME": "/tmp", "CI": "true"},
                   binds=[str(shop)], cwd=str(shop))  # fmt: skip
    assert r.returncode == 1 and "HostUnsupported" in r.stdout, _out(r)
    assert "sethostname" in r.stdout and "seccomp-envbox.json" in r.stdout, _out(r)


def test_the_example_shop_passes_in_a_privileged_container(podman: podmankit.PodmanHost) -> None:
    t0 = time.monotonic()
    r = podman.run([PY, "-m", "pytest", "-p", "no:cacheprovider", "--basetemp=/tmp/envbox-pytest",
                    "-q", "examples/shop"], options=["--privileged"], env={"CI": "true"},
                   timeout=240)  # fmt: skip
    print(f"examples/shop in a privileged container: {time.monotonic() - t0:.1f} s")
    assert r.returncode == 0, _out(r)
    summary = r.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"=*\s*\d+ passed in [\d.]+s\s*=*", summary), _out(r)
    # Limits were enforced there, with cgroups: the cache's test of its memory limit saw an OOM kill.
    assert re.search(r"^cache\s.*\s[1-9]\d*\s*$", r.stdout, re.M), _out(r)


def test_the_cgroup_tests_pass_in_a_privileged_container(podman: podmankit.PodmanHost) -> None:
    """In a privileged container on cgroup v1 the hierarchies are mounted from the container's
    own cgroup, while /proc/PID/cgroup names paths from the host's root: envbox's limits, and
    the tests that read them back (tests/kernel.py), must nest there."""
    r = podman.run([PY, "-m", "pytest", "-p", "no:cacheprovider", "--basetemp=/tmp/envbox-pytest",
                    "-q", "-rs", "tests/integration/test_cgroups.py"], options=["--privileged"],
                   env={"CI": "true"}, timeout=240)  # fmt: skip
    assert r.returncode == 0, _out(r)
    assert re.search(r"^=*\s*\d+ passed", r.stdout.strip().splitlines()[-1]), _out(r)


#: A project with one test of one service, as a user would have it.
PROJECT = {
    "pyproject.toml": """
[tool.pytest.ini_options]
addopts = "-p no:cacheprovider"

[tool.envbox.services.sleeper]
command = ["sleep", "60"]
""",
    "conftest.py": """
from importlib.metadata import entry_points

if not any(ep.value == "pytest_envbox.plugin" for ep in entry_points(group="pytest11")):
    pytest_plugins = ["pytest_envbox.plugin"]
""",
    "test_one.py": """
import pytest


@pytest.mark.envbox("sleeper")
def test_the_service_runs(envbox):
    assert envbox["sleeper"].pid > 0
""",
}


@pytest.fixture
def project(tmp_path: Path) -> Path:
    for name, text in PROJECT.items():
        (tmp_path / name).write_text(text.lstrip())
    return tmp_path


def _names_the_cause_and_fix(text: str) -> bool:
    """The refusal is there, says why (what a container's defaults refuse: /proc/sys read-only,
    parts of /proc hidden, a seccomp filter, no CAP_SYS_ADMIN) and what to do: ``--privileged``,
    or rootless with the shipped profile."""
    low = text.lower()
    causes = ("/proc", "seccomp", "cap_sys_admin")
    return ("cannot start services here" in low and any(c in low for c in causes)
            and "--privileged" in low and "seccomp-envbox.json" in low)  # fmt: skip


def test_doctor_in_a_default_container_names_the_refusal_and_the_fix(podman: podmankit.PodmanHost) -> None:
    r = podman.run([PY, "-m", "pytest_envbox.cli", "doctor"])
    assert r.returncode == 1, _out(r)
    # Not the line on envbox's own filter for services ("seccomp  OK  allow-list ..."): the refusal.
    text = "\n".join(line for line in r.stdout.splitlines() if not re.match(r"seccomp\s+OK\b", line))
    assert _names_the_cause_and_fix(text), _out(r)


def test_on_ci_a_test_in_a_default_container_errors_with_the_refusal(
        podman: podmankit.PodmanHost, project: Path) -> None:  # fmt: skip
    r = podman.run([PY, "-m", "pytest", "--basetemp=/tmp/envbox-pytest", "-rs", "test_one.py"],
                   env={"CI": "true"}, binds=[str(project)], cwd=str(project))  # fmt: skip
    assert r.returncode == 1, _out(r)
    assert "HostUnsupported" in r.stdout and " 1 error" in r.stdout, _out(r)
    assert _names_the_cause_and_fix(r.stdout), _out(r)


def test_elsewhere_a_test_in_a_default_container_is_skipped_with_the_reason(
        podman: podmankit.PodmanHost, project: Path) -> None:  # fmt: skip
    r = podman.run([PY, "-m", "pytest", "--basetemp=/tmp/envbox-pytest", "-rs", "test_one.py"],
                   binds=[str(project)], cwd=str(project))  # fmt: skip
    assert r.returncode == 0, _out(r)
    # The summary's line is the refusal's headline; `envbox doctor` (above) has the rest.
    skipped = [line for line in r.stdout.splitlines() if line.startswith("SKIPPED")]
    assert len(skipped) == 1 and "cannot start services here" in skipped[0], _out(r)
    assert re.search(r"=+ 1 skipped[ ,]", r.stdout), _out(r)
