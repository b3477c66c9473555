"""The ``envbox`` command as a user runs it: ``up`` in the foreground with Ctrl-C, ``doctor`` as
root and as an unprivileged user."""

from __future__ import annotations

import os
import platform
import pwd
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from pytest_envbox.kernel import hostcheck
from tests.conftest import cgroups_problem
from tests.kernel import alive, cgroup_dirs, children, holders, ns_inode

PY = sys.executable
REPO = Path(__file__).parents[2]


def read_until(proc: subprocess.Popen[bytes], marker: str, timeout: float = 60.0) -> str:
    """The process's output up to ``marker`` (a deadline, no sleep; unbuffered reads, so that
    select() sees all there is)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    out = b""
    end = time.monotonic() + timeout
    while marker.encode() not in out:
        left = end - time.monotonic()
        assert left > 0 and select.select([fd], [], [], left)[0], out.decode()
        data = os.read(fd, 65536)
        assert data, f"envbox ended early: {out.decode()}"
        out += data
    return out.decode()


def test_envbox_up_brings_up_the_example_and_ctrl_c_leaves_nothing() -> None:
    if cgroups_problem():  # rootless on cgroup v1: the example declares limits
        r = subprocess.run([PY, "-m", "pytest_envbox.cli", "up", "--topology", "shop"],
                           cwd=REPO / "examples" / "shop", capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)  # fmt: skip
        assert r.returncode == 1
        assert "service 'catalog' declares limits, but cgroups cannot be used here" in r.stderr
        return
    proc = subprocess.Popen([PY, "-m", "pytest_envbox.cli", "up", "--topology", "shop"],
                            cwd=REPO / "examples" / "shop", stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    try:
        out = read_until(proc, "services are up")
        found = dict(re.findall(r"^(\w+): [\d.]+ on the environment's network, pid (\d+),", out, re.M))
        assert set(found) == {"catalog", "cache"}, out
        assert re.search(r"^envbox: network [\d.]+/24, (routed from this host|not routed)", out, re.M), out
        pids = {name: int(p) for name, p in found.items()}
        port = re.search(r"catalog: .* 8000 -> 127\.0\.0\.1:(\d+)", out)
        logs = re.findall(r"log (\S+)", out)
        assert port is not None and logs, out
        assert requests.get(f"http://127.0.0.1:{port[1]}/health", timeout=10).status_code == 200
        supervisor = children(proc.pid)
        netns = [ns_inode(p, "net") for p in pids.values()]
        cgroups = [d for p in pids.values() for d in cgroup_dirs(p).values() if "envbox-" in d]
        assert cgroups  # the example declares limits
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert proc.wait(timeout=30) == 0
        assert proc.stdout is not None
        assert b"torn down" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # Nothing is left but the logs, kept in the directory printed: processes, supervisor,
    # namespaces, cgroups are gone.
    assert not any(alive(p) for p in [*pids.values(), *supervisor])
    assert all(holders(ns) == [] for ns in netns)
    assert not any(os.path.exists(d) for d in cgroups), cgroups
    try:
        assert all(Path(log).is_file() for log in logs), logs
        cache_log = next(Path(x) for x in logs if x.endswith("cache.log"))
        assert "ready to accept connections" in cache_log.read_text()
    finally:
        for d in {Path(log).parent for log in logs}:
            shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def nobody_copy() -> Iterator[Path]:
    """The package, copied where an unprivileged user can read it (this checkout and the test's
    interpreter may be under /root)."""
    d = Path(tempfile.mkdtemp(prefix="envbox-nobody-"))
    try:
        shutil.copytree(REPO / "pytest_envbox", d / "pytest_envbox",
                        ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
        for path in [d, *d.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        yield d
    finally:
        shutil.rmtree(d)


def test_doctor_as_an_unprivileged_user_says_what_rootless_mode_can_and_cannot_do(
    nobody_copy: Path,
) -> None:
    if os.geteuid() == 0:  # as nobody, with the system's interpreter
        python = shutil.which("python3", path="/usr/bin:/usr/local/bin")
        if python is None:
            pytest.skip("no system python3 that an unprivileged user can run")
        # The checks need the standard library only: the package is loaded without its
        # __init__ (which imports requests), as the supervisor loads it.
        code = ("import sys, types; p = types.ModuleType('pytest_envbox'); "
                f"p.__path__ = [{str(nobody_copy / 'pytest_envbox')!r}]; "
                "sys.modules['pytest_envbox'] = p; "
                "from pytest_envbox.cli import main; sys.exit(main(['doctor']))")  # fmt: skip
        # nobody's state directory inside the copy, removed with it (by default it would be
        # /tmp/envbox-65534, left behind: nobody's own, which a test must not keep)
        run = nobody_copy / "run"
        run.mkdir(mode=0o700)
        os.chown(run, 65534, 65534)
        r = subprocess.run([python, "-c", code], user=65534, group=65534, extra_groups=[],
                           capture_output=True, text=True, timeout=60, cwd="/",
                           env={**os.environ, "XDG_RUNTIME_DIR": str(run)})  # fmt: skip
        user = "nobody"
    else:  # the rootless lane: as ourselves, the whole doctor, a real sandbox included
        r = subprocess.run([PY, "-m", "pytest_envbox.cli", "doctor"], capture_output=True,
                           text=True, timeout=60, cwd="/")  # fmt: skip
        user = pwd.getpwuid(os.geteuid()).pw_name
        assert r.returncode == 0, r.stdout + r.stderr
        assert "rootless mode" in r.stdout.splitlines()[-2], r.stdout  # the sandbox line
        assert r.stdout.splitlines()[-1].startswith("images             OK      store "), r.stdout
    lines = {ln[:18].strip(): ln[19:] for ln in r.stdout.splitlines()}
    assert r.stderr == "", r.stderr
    assert lines["privileges"].startswith(f"NOTE    not root ({user})"), r.stdout
    if os.geteuid() == 0:
        assert lines["state directory"].startswith(f"OK      {nobody_copy}/run/envbox"), r.stdout
    # This machine allows unprivileged user namespaces: every step is tried for real.
    assert lines["user namespaces"].startswith("OK"), r.stdout
    assert lines["rootless sandbox"].startswith("OK      can make a user namespace"), r.stdout
    assert "a bridge and a veth pair" in lines["rootless sandbox"]
    ids = hostcheck.subids()
    assert lines["subordinate ids"].startswith("OK" if ids.usable else "NOTE"), r.stdout
    assert "env.network.reachable()" in lines["addresses"], r.stdout
    cgroup_v2 = cgroup_dirs(os.getpid()).keys() == {"unified"}
    if not cgroup_v2:  # v1/hybrid: no limits without root, and the doctor says why
        assert lines["rootless limits"].startswith("NOTE    services that declare limits"), r.stdout
        assert "cannot be delegated to a user" in lines["cgroups"], r.stdout


@pytest.mark.needs_root("the doctor's report as root")
def test_doctor_as_root_says_every_piece_works_here_and_which_faults_this_kernel_has() -> None:
    from pytest_envbox import Environment, HostUnsupported, Service

    r = subprocess.run([PY, "-m", "pytest_envbox.cli", "doctor"], capture_output=True, text=True,
                       timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    lines = {ln[:18].strip(): ln[19:] for ln in r.stdout.splitlines()}
    assert list(lines) == ["linux", "kernel", "privileges", "state directory", "user namespaces",
                           "cgroups", "network", "addresses", "seccomp", "sandbox", "images"]  # fmt: skip
    assert "MISSING" not in r.stdout
    # The store, as `envbox images` counts it; a kernel before 6.8 says what it limits.
    assert re.match(r"(OK|NOTE) +store .*: \d+ images?, ", lines["images"]), lines["images"]
    release = tuple(int(x) for x in platform.release().split(".")[:2])
    assert ("kernel before 6.8" in lines["images"]) == (release < (6, 8)), lines["images"]
    # The filter's policy: its kind, its size on this machine, the ENOSYS rule.
    seccomp = lines["seccomp"]
    assert seccomp.startswith("OK      the filter envbox puts on services: allow-list"), seccomp
    assert "refused with EPERM" in lines["seccomp"] and "answer ENOSYS" in lines["seccomp"]
    # The network line agrees with what link.delay() does here (this kernel may lack netem).
    with Environment([Service("w", ["sleep", "1000"])]) as env:
        try:
            env["w"].link.delay(1)
            has_netem = True
        except HostUnsupported:
            has_netem = False
        # The addresses line agrees with what an environment gets here.
        verdict = "OK      routed from the host" if env.network.routed else "NOTE    not routed"
        assert lines["addresses"].startswith(verdict), (lines["addresses"], env.network.why_unrouted)
    assert ("link.delay() needs the netem qdisc" not in lines["network"]) == has_netem, lines["network"]
