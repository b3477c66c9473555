"""``envbox up`` with nothing declared and its kept logs, ``envbox logs``, and ``envbox clean``
by environment id, with its question before stopping kept environments.

Kept environments are made for real, by a script of their own that calls ``env.keep()`` and
exits: its supervisor lives on for them, as after ``pytest --envbox-keep``. The tests stop
environments by id only: ``envbox clean`` without ids and with a "yes" stops every kept
environment of the user, so its test runs with a state directory of its own (``alone``).
"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_envbox.wait import Deadline, wait_until
from tests.integration.test_cli import read_until
from tests.kernel import alive

PY = sys.executable
REPO = Path(__file__).parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}

#: Opens one environment per argument (a service of that name, which says hello and sleeps),
#: keeps them all, and exits: it prints each environment's id and its service's pid, as JSON.
KEEPER = textwrap.dedent("""
    import json, sys
    from pytest_envbox import Environment, Service

    out = []
    for name in sys.argv[1:]:
        env = Environment([Service(name, ["sh", "-c", f"echo hello from {name}; exec sleep 1000"])])
        env.open()
        out.append([env.id, name, env[name].pid])
        env.keep("kept by test_cli_runs")
        env.close()
    print(json.dumps(out))
""")


def envbox(*args: str, check: bool = True, cwd: Path | None = None, stdin: int | None = None,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([PY, "-m", "pytest_envbox.cli", *args], capture_output=True, text=True,
                       timeout=120, env=ENV if env is None else env, cwd=cwd, stdin=stdin)  # fmt: skip
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


class Kept:
    """The environments one keeper script left: [(id, service, pid)], and its supervisor."""

    def __init__(self, *names: str) -> None:
        r = subprocess.run([PY, "-c", KEEPER, *names], capture_output=True, text=True, timeout=120,
                           env=ENV)  # fmt: skip
        assert r.returncode == 0, r.stderr
        self.envs: list[tuple[str, str, int]] = [(e, n, p) for e, n, p in json.loads(r.stdout)]
        # Its record says so once the supervisor has detached (written when idle): wait for it.
        out = wait_until(lambda: self._listed(), Deadline(20))
        assert out is not None, envbox("ps").stdout
        before = out.split(f"environment {self.envs[0][0]}:")[0]
        self.supervisor = int(re.findall(r"supervisor (\d+)", before)[-1])

    def _listed(self) -> str | None:
        out = envbox("ps").stdout
        listed = all(f"environment {e}: kept (kept by test_cli_runs)" in out for e, _, _ in self.envs)
        return out if listed else None

    def stop(self) -> None:
        """Whatever a failed test left: stopped by id (this test's environments only)."""
        left = [e for e, _, pid in self.envs if alive(pid)]
        if left:
            envbox("clean", *left, check=False)


@pytest.fixture
def kept_factory() -> Iterator[list[Kept]]:
    made: list[Kept] = []
    yield made
    for k in made:
        k.stop()


def keep(made: list[Kept], *names: str) -> Kept:
    k = Kept(*names)
    made.append(k)
    return k


def gone(pid: int) -> bool | None:
    return not alive(pid) or None


# --- envbox up ---------------------------------------------------------------------------------


def test_up_with_nothing_declared_says_so_and_where_it_looked(tmp_path: Path) -> None:
    r = envbox("up", check=False, cwd=tmp_path)
    assert r.returncode == 1 and r.stdout == "", r
    assert r.stderr == (f"envbox: no services are declared in {tmp_path} (looked for envbox.toml, "
                        "then [tool.envbox] in pyproject.toml: neither is there); run it in the "
                        "project's directory, or pass --rootdir\n")  # fmt: skip
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    r = envbox("up", check=False, cwd=tmp_path)
    assert r.returncode == 1 and "services are up" not in r.stdout + r.stderr, r
    assert "pyproject.toml is there, without services in [tool.envbox]" in r.stderr, r.stderr
    (tmp_path / "envbox.toml").write_text("")
    r = envbox("up", "--rootdir", str(tmp_path), check=False)
    assert r.returncode == 1 and "envbox.toml is there and declares none" in r.stderr, r.stderr


@pytest.fixture
def ticker(tmp_path: Path) -> Path:
    """A project with one service that says hello, then ticks (its log grows while it runs)."""
    (tmp_path / "envbox.toml").write_text(textwrap.dedent("""
        [services.ticker]
        command = ["sh", "-c", '''echo hello from ticker; i=0
                               while :; do i=$((i+1)); echo tick $i; sleep 0.1; done''']
        ready = { log = "hello from ticker", timeout = "10s" }
    """))
    return tmp_path


def test_up_keeps_its_logs_after_ctrl_c_and_envbox_logs_follows_them(ticker: Path) -> None:
    proc = subprocess.Popen([PY, "-m", "pytest_envbox.cli", "up"], cwd=ticker, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    follow = None
    logdir = None
    try:
        out = read_until(proc, "services are up")
        m = re.search(r"^envbox: starting ticker; logs in (\S+)$", out, re.M)
        assert m is not None, out
        logdir = Path(m[1])
        assert logdir.name.startswith("envbox-up-") and logdir.is_dir(), out
        env_id = re.search(r"^envbox: environment (\S+): services are up", out, re.M)
        assert env_id is not None and f"log {logdir / 'ticker.log'}" in out, out
        # `envbox logs` reads a live environment's service, by name (and by --env).
        for args in (["ticker"], ["ticker", "--env", env_id[1]]):
            shown = envbox("logs", *args).stdout
            assert shown.startswith("hello from ticker\n"), shown
        # -f prints what the service writes next: ticks past those of its first read.
        follow = subprocess.Popen([PY, "-m", "pytest_envbox.cli", "logs", "ticker", "-f"],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=ENV)  # fmt: skip
        first = read_until(follow, "tick 1\n")
        last = max(int(n) for n in re.findall(r"tick (\d+)", first))
        read_until(follow, f"tick {last + 5}\n")
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert proc.wait(timeout=30) == 0
        assert proc.stdout is not None
        assert proc.stdout.read().decode().endswith(f"envbox: torn down; the logs stay in {logdir}\n")
        # The environment has ended: so does `envbox logs -f`, saying so.
        assert follow.wait(timeout=30) == 0
        assert follow.stdout is not None
        assert f"envbox: environment {env_id[1]} has ended" in follow.stdout.read().decode()
        log = (logdir / "ticker.log").read_text()
        assert log.startswith("hello from ticker\ntick 1\n") and f"tick {last + 5}\n" in log
        # Nothing live has it now.
        r = envbox("logs", "ticker", "--env", env_id[1], check=False)
        assert r.returncode == 1 and f"no live environment {env_id[1]}" in r.stderr, r.stderr
    finally:
        for p in (proc, follow):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        if logdir is not None:
            shutil.rmtree(logdir, ignore_errors=True)


def test_up_writes_its_logs_where_logs_says(ticker: Path, tmp_path: Path) -> None:
    where = tmp_path / "my" / "logs"
    proc = subprocess.Popen([PY, "-m", "pytest_envbox.cli", "up", "--logs", str(where)], cwd=ticker,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        out = read_until(proc, "services are up")
        assert f"logs in {where}\n" in out and f"log {where / 'ticker.log'}" in out, out
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (where / "ticker.log").read_text().startswith("hello from ticker\n")


def test_up_that_fails_to_start_keeps_the_logs_that_say_why_and_no_empty_directory(
    tmp_path: Path,
) -> None:
    (tmp_path / "envbox.toml").write_text(textwrap.dedent("""
        [services.broken]
        command = ["sh", "-c", "echo cannot read my configuration; exit 3"]
        ready = { log = "listening", timeout = "10s" }
    """))
    r = envbox("up", check=False, cwd=tmp_path)
    assert r.returncode == 1, r
    m = re.search(r"^envbox: starting broken; logs in (\S+)$", r.stdout, re.M)
    assert m is not None, r.stdout
    logdir = Path(m[1])
    try:
        assert f"envbox: not started; the logs stay in {logdir}\n" in r.stderr, r.stderr
        assert (logdir / "broken.log").read_text() == "cannot read my configuration\n"
    finally:
        shutil.rmtree(logdir, ignore_errors=True)
    # Nothing started (a service no one declared): no directory left behind (in TMPDIR).
    temp = tmp_path / "temp"
    temp.mkdir()
    r = envbox("up", "nosuch", check=False, cwd=tmp_path, env={**ENV, "TMPDIR": str(temp)})
    assert r.returncode == 1 and r.stdout == "", r
    assert r.stderr == "envbox: unknown service 'nosuch'; known services: broken\n"
    assert list(temp.iterdir()) == []


# --- envbox logs, envbox clean ID ----------------------------------------------------------------


def test_logs_of_a_kept_environment_and_the_choice_between_two(kept_factory: list[Kept]) -> None:
    first = keep(kept_factory, "shared")
    second = keep(kept_factory, "shared")
    (a, _, _), (b, _, _) = first.envs[0], second.envs[0]
    r = envbox("logs", "shared", check=False)
    assert r.returncode == 1, r
    assert "service 'shared' runs in 2 environments" in r.stderr and "choose one with --env ID" in r.stderr
    assert a in r.stderr and b in r.stderr, r.stderr
    assert envbox("logs", "shared", "--env", b).stdout == "hello from shared\n"
    r = envbox("logs", "nosuch", "--env", b, check=False)
    assert r.returncode == 1, r
    assert f"no service 'nosuch' in environment {b} (services there: shared;" in r.stderr, r.stderr


def test_clean_id_stops_that_environment_alone(kept_factory: list[Kept]) -> None:
    one = keep(kept_factory, "one")
    other = keep(kept_factory, "other")
    (one_id, _, one_pid), (other_id, _, other_pid) = one.envs[0], other.envs[0]
    r = envbox("clean", one_id)
    assert f"stopped kept environment {one_id} (one; kept by test_cli_runs)" in r.stdout, r.stdout
    # `envbox clean` waits for the teardown: its supervisor is gone when it returns.
    assert not alive(one_pid) and not alive(one.supervisor)
    assert alive(other_pid) and alive(other.supervisor)
    assert f"environment {one_id}:" not in envbox("ps").stdout
    # An id no run lists stops nothing, and says so.
    r = envbox("clean", one_id, other_id, check=False)
    assert r.returncode == 1 and f"no live environment {one_id}" in r.stderr, r.stderr
    assert alive(other_pid)
    envbox("clean", other_id)
    assert not alive(other_pid) and not alive(other.supervisor)


def test_clean_id_of_a_run_that_keeps_two_stops_one_and_the_run_ends_with_the_last(
    kept_factory: list[Kept],
) -> None:
    both = keep(kept_factory, "left", "right")
    (left, _, left_pid), (right, _, right_pid) = both.envs
    r = envbox("clean", left)
    assert f"stopped kept environment {left} (left;" in r.stdout, r.stdout
    assert f"still keeps {right}" in r.stdout, r.stdout
    assert not alive(left_pid)
    assert alive(right_pid) and alive(both.supervisor)
    assert envbox("logs", "right", "--env", right).stdout == "hello from right\n"
    envbox("clean", right)
    assert not alive(right_pid)
    assert wait_until(lambda: gone(both.supervisor), Deadline(20))  # it ends once nothing runs


def test_clean_never_stops_an_environment_a_test_is_using() -> None:
    from pytest_envbox import Environment, Service

    with Environment([Service("busy", ["sleep", "1000"])]) as env:
        pid = env["busy"].pid
        assert pid is not None
        assert wait_until(lambda: f"environment {env.id}: busy" in envbox("ps").stdout or None, Deadline(10))
        r = envbox("clean", env.id, check=False)
        assert r.returncode == 1, r
        # (the test processes the supervisor watches: this one, and xdist's controller under -n)
        said = rf"{env.id} is not kept: a test process \((\d+, )*{os.getpid()}(, \d+)*\) is using it"
        assert re.search(said, r.stderr) and "nothing was stopped" in r.stderr, r.stderr
        assert alive(pid)


# --- envbox clean without ids: ask first ----------------------------------------------------------

#: The scenario of ``envbox clean`` without ids, run in a state directory of its own (see
#: ``alone``), where the only kept environment is its own: a "yes" there stops nothing of another
#: test's (an xdist worker's next door, or another run on this host). Prints what it saw, as JSON.
ASKED = textwrap.dedent("""
    import json, os, pty, subprocess, sys
    from pytest_envbox.wait import Deadline, wait_until
    from tests.integration.test_cli_runs import KEEPER, envbox, clean_on_a_terminal
    from tests.kernel import alive

    keeper = subprocess.run([sys.executable, "-c", KEEPER, "asked"], capture_output=True,
                            text=True, timeout=120, check=True)
    ((env, _, pid),) = json.loads(keeper.stdout)
    kept = f"environment {env}: kept"
    assert wait_until(lambda: kept in envbox("ps").stdout or None, Deadline(20)), envbox("ps")
    seen = {"env": env, "pid": pid, "ps": envbox("ps").stdout}
    seen["script"] = envbox("clean", stdin=subprocess.DEVNULL).stderr
    seen["alive after script"] = alive(pid)
    seen["n"] = clean_on_a_terminal("n")
    seen["alive after n"] = alive(pid)
    seen["y"] = clean_on_a_terminal("y")
    seen["alive after y"] = alive(pid)
    seen["ps after y"] = envbox("ps").stdout
    print(json.dumps(seen))
""")


def alone(tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    """A command prefix and environment that give a process tree a state directory of its own:
    as root, a tmpfs over /run/envbox in a new mount namespace; otherwise XDG_RUNTIME_DIR."""
    if os.geteuid() == 0:
        mount = 'mount -t tmpfs -o mode=0700 tmpfs /run/envbox && exec "$0" "$@"'
        return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", mount], ENV
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    return [], {**ENV, "XDG_RUNTIME_DIR": str(runtime)}


def clean_on_a_terminal(answer: str) -> str:
    """``envbox clean`` with a terminal for stdin, answering ``answer``: its output."""
    controller, terminal = pty.openpty()
    try:
        proc = subprocess.Popen([PY, "-m", "pytest_envbox.cli", "clean"], stdin=terminal,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=ENV)  # fmt: skip
        try:
            out = read_until(proc, "Stop them? [y/N] ")
            os.write(controller, answer.encode() + b"\n")
            assert proc.wait(timeout=60) == 0
            assert proc.stdout is not None
            return out + proc.stdout.read().decode()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    finally:
        os.close(controller)
        os.close(terminal)


def test_clean_asks_before_stopping_kept_environments(tmp_path: Path) -> None:
    prefix, env = alone(tmp_path)
    r = subprocess.run([*prefix, PY, "-c", ASKED], capture_output=True, text=True, timeout=300,
                       env=env)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    seen = json.loads(r.stdout)
    env_id, pid = seen["env"], seen["pid"]
    supervisor = int(re.findall(r"supervisor (\d+)", seen["ps"])[0])
    try:
        # No terminal to ask, no --yes: left running, and told how to stop it.
        assert seen["alive after script"]
        assert seen["script"] == (f"envbox: 1 kept environment left running, as there is no "
                                  f"terminal to ask: {env_id} (asked; kept by test_cli_runs). Stop "
                                  f"it with `envbox clean {env_id}`, or every kept one with "
                                  "`envbox clean --yes`\n")  # fmt: skip
        # On a terminal: listed, then asked; "n" stops nothing.
        assert f"  {env_id} (asked; kept by test_cli_runs), run envbox-{supervisor}-" in seen["n"]
        assert "the kept environments are left running" in seen["n"] and seen["alive after n"]
        # "y" stops it, and waits until it is gone.
        assert f"stopped kept environment {env_id} (asked; kept by test_cli_runs)" in seen["y"]
        assert not seen["alive after y"] and not alive(supervisor)
        assert "envbox: no run alive on this host" in seen["ps after y"]
    finally:
        if alive(pid):  # a failure above: this state directory's supervisor, by its pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(supervisor, signal.SIGTERM)
