"""What pytest's terminal shows while a test waits for its services, the engine's log, and the
tests each environment of ``--envbox-report`` names."""

from __future__ import annotations

import json
import re
import sys

import pytest

from tests.conftest import PLUGIN_ARGS

pytest_plugins = ["pytester"]

# ``slow`` needs 2.5 s before it listens (a database's first start, say); ``quick`` listens at once.
# Python itself is each program (not `sh -c`): its prefix stays visible in the sandbox even when it
# lives under /tmp (a checkout's tox venv), which the sandbox's private /tmp hides otherwise.
PYPROJECT = f"""
[tool.envbox.services.slow]
command = ["{sys.executable}", "-c", "import http.server, time; time.sleep(2.5); http.server.test(port=8000, bind='127.0.0.1')"]
ports = [8000]
ready = {{ tcp = 8000 }}

[tool.envbox.services.quick]
command = ["{sys.executable}", "-c", "import socket, time; s = socket.socket(); s.bind(('0.0.0.0', 8001)); s.listen(); time.sleep(1000)"]
ports = [8001]
ready = {{ tcp = 8001 }}
"""  # noqa: E501

TESTS = """
import pytest

@pytest.mark.envbox("slow")
def test_slow(envbox):
    pass

@pytest.mark.envbox("quick")
def test_quick(envbox):
    pass

def test_plain():
    pass
"""

STATUS = re.compile(r"envbox: waiting for slow: tcp port 8000 accepts connections \((\d+\.\d)s of 30s\)")


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makefile(".toml", pyproject=PYPROJECT)
    return pytester


def run(p: pytest.Pytester, *args: str) -> pytest.RunResult:
    return p.runpytest(*PLUGIN_ARGS, "-p", "no:cacheprovider", *args)


@pytest.mark.parametrize("args", ["", "-v", "-q", "-p no:logging"])
def test_a_slow_start_shows_what_it_waits_for_within_a_second_and_a_half(
        project: pytest.Pytester, args: str) -> None:  # fmt: skip
    project.makepyfile(test_status=TESTS)
    result = run(project, *args.split())
    verbosity = args if args.startswith(("-v", "-q")) else ""
    result.assert_outcomes(passed=3)
    out = result.stdout.str()
    lines = out.splitlines()
    shown = [m for m in map(STATUS.fullmatch, lines) if m]
    # Not a terminal (pytester): lines, the first once the wait has taken a second, naming the
    # service, its probe and how long it has waited (measured by the status itself).
    assert shown, out
    assert 1.0 <= float(shown[0][1]) <= 1.5, out
    assert any(re.fullmatch(r"envbox: slow ready after \d+\.\ds", ln) for ln in lines), out
    # nothing for the service that is ready at once
    assert "quick" not in "\n".join(ln for ln in lines if ln.startswith("envbox:")), out
    # pytest's own lines stay whole: no status shares a line with a result
    assert all(ln.startswith("envbox: ") or "envbox: waiting" not in ln for ln in lines), out
    if verbosity == "":
        assert any(re.fullmatch(r"test_status\.py \.\.\.\s+\[100%\]", ln) for ln in lines), out
    elif verbosity == "-v":
        for name in ("test_slow", "test_quick", "test_plain"):
            assert any(re.fullmatch(rf"test_status\.py::{name} PASSED\s+\[\s*\d+%\]", ln)
                       for ln in lines), out  # fmt: skip
    else:
        assert any(re.fullmatch(r"\.\.\.\s+\[100%\]", ln) for ln in lines), out


def test_qq_shows_no_status(project: pytest.Pytester) -> None:
    project.makepyfile(test_status=TESTS)
    result = run(project, "-qq")  # no summary line to count outcomes from
    assert result.ret == pytest.ExitCode.OK
    assert re.search(r"^\.\.\.\s+\[100%\]$", result.stdout.str(), re.M), result.stdout.str()
    assert "envbox: waiting" not in result.stdout.str()


def test_the_engine_logs_each_start_wait_result_and_stop(project: pytest.Pytester) -> None:
    project.makepyfile(test_status="""
        import pytest

        @pytest.mark.envbox("quick")
        def test_quick(envbox):
            pass
    """)
    result = run(project, "--log-cli-level=INFO")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([
        "*INFO*pytest_envbox.engine.environment*environment *: starting 'quick'*",
        "*INFO*pytest_envbox.engine.handle*service 'quick' started: pid *, host ports {8001: *}",
        "*INFO*pytest_envbox.engine.readiness*service 'quick': waiting until tcp port 8001 accepts "
        "connections (timeout 30s)",
        "*INFO*pytest_envbox.engine.readiness*service 'quick' ready after *s",
        "*INFO*pytest_envbox.engine.handle*stopping 'quick'",
        "*INFO*pytest_envbox.engine.handle*service 'quick' exited with return code 143",
        "*INFO*pytest_envbox.engine.environment*environment *: closed",
    ])
    assert "envbox: waiting" not in result.stdout.str()


def test_the_report_lists_the_tests_that_used_each_environment(project: pytest.Pytester) -> None:
    project.makepyfile(test_used="""
        import pytest

        @pytest.mark.envbox("quick", scope="module")
        def test_shared_one(envbox):
            pass

        @pytest.mark.envbox("quick", scope="module")
        def test_shared_two(envbox):
            pass

        @pytest.mark.envbox("quick")
        def test_own(envbox):
            pass

        def test_on_demand(envbox):
            envbox.start("quick")

        def test_plain():
            pass
    """)
    report = project.path / "envbox.json"
    run(project, f"--envbox-report={report}").assert_outcomes(passed=5)
    envs = json.loads(report.read_text())["environments"]
    assert sorted(e["tests"] for e in envs) == [
        ["test_used.py::test_on_demand"],
        ["test_used.py::test_own"],
        ["test_used.py::test_shared_one", "test_used.py::test_shared_two"],
    ]
    assert all(list(e["services"]) == ["quick"] for e in envs)


def test_the_report_lists_the_tests_of_every_xdist_worker(project: pytest.Pytester) -> None:
    pytest.importorskip("xdist")
    project.makepyfile(test_used="""
        import pytest

        @pytest.mark.parametrize("i", range(4))
        @pytest.mark.envbox("quick")
        def test_it(envbox, i):
            pass
    """)
    report = project.path / "envbox.json"
    run(project, "-n", "2", f"--envbox-report={report}").assert_outcomes(passed=4)
    envs = json.loads(report.read_text())["environments"]
    assert sorted(t for e in envs for t in e["tests"]) == [f"test_used.py::test_it[{i}]" for i in range(4)]
    assert all(len(e["tests"]) == 1 for e in envs)


class Screen:
    """Just enough of a terminal to see what pytest's output looks like once drawn: carriage
    return, newline, erase to end of line, cursor up and to a column; colours ignored."""

    def __init__(self) -> None:
        self.rows: list[list[str]] = [[]]
        self.row = self.col = 0

    def feed(self, text: str) -> None:
        for m in re.finditer(r"\x1b\[([0-9;]*)([A-Za-z])|([^\x1b])", text):
            if m[3] is not None:
                self._char(m[3])
                continue
            n = int(m[1].split(";")[0] or 1) if m[1] else 1
            if m[2] == "K":
                del self.rows[self.row][self.col:]
            elif m[2] == "A":
                self.row = max(0, self.row - n)
            elif m[2] == "G":
                self.col = n - 1

    def _char(self, c: str) -> None:
        if c == "\r":
            self.col = 0
        elif c == "\n":
            self.row += 1
            self.col = 0
            while len(self.rows) <= self.row:
                self.rows.append([])
        else:
            line = self.rows[self.row]
            line.extend(" " * (self.col - len(line)))
            line[self.col:self.col + 1] = [c]
            self.col += 1

    def lines(self) -> list[str]:
        return ["".join(r).rstrip() for r in self.rows]


def run_on_a_terminal(p: pytest.Pytester, *args: str, columns: int = 100) -> str:
    """Run pytest in ``p.path`` with a pseudo-terminal as its output, as a user sees it; return
    everything it wrote."""
    import fcntl
    import os
    import pty
    import select
    import struct
    import subprocess
    import termios
    from pathlib import Path

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    env = {**os.environ, "COLUMNS": str(columns), "PYTHONPATH": str(Path(__file__).parents[2]),
           "TERM": "xterm"}  # fmt: skip
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen([sys.executable, "-m", "pytest", *PLUGIN_ARGS, "-p", "no:cacheprovider",
                             *args], cwd=p.path, stdin=slave, stdout=slave, stderr=slave,
                            env=env, close_fds=True)  # fmt: skip
    os.close(slave)
    chunks = []
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 120)
            assert ready, "pytest wrote nothing for 2 minutes"
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: pytest has exited and closed the terminal
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master)
        proc.wait(60)
    return b"".join(chunks).decode(errors="replace")


@pytest.mark.parametrize("verbosity", ["", "-v"])
def test_on_a_terminal_the_status_is_drawn_in_place_and_cleared(
        project: pytest.Pytester, verbosity: str) -> None:  # fmt: skip
    project.makepyfile(test_status=TESTS)
    raw = run_on_a_terminal(project, "-p", "no:xdist", *[verbosity] if verbosity else [])
    assert STATUS.search(raw), raw  # it was drawn...
    screen = Screen()
    screen.feed(raw)
    lines = screen.lines()
    shown = "\n".join(lines)
    assert "envbox: waiting" not in shown and "envbox: slow ready" not in shown, shown  # ...and cleared
    # (rootless on cgroup v1, the summary counts a warning: no cgroups there)
    assert any(re.fullmatch(r"=+ 3 passed(, \d+ warnings?)? in [\d.]+s =+", ln) for ln in lines), shown
    if verbosity == "":  # pytest's line goes on where it was
        assert any(re.fullmatch(r"test_status\.py \.\.\.\s+\[100%\]", ln) for ln in lines), shown
    else:
        for name in ("test_slow", "test_quick", "test_plain"):
            assert any(re.fullmatch(rf"test_status\.py::{name} PASSED\s+\[\s*\d+%\]", ln)
                       for ln in lines), shown  # fmt: skip
