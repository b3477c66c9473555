"""What a user reads when something is wrong: the message once, not the plugin's insides.

A mistake in the project's declarations stops the run at the first test that needs a service,
reported once, with exit code 4 (usage error); a failure of one test's service stays that test's
error; either way the short summary shows the message and pytest-envbox's frames are not shown.
A misspelt marker is named.
"""

from __future__ import annotations

import sys

import pytest

from tests.conftest import PLUGIN_ARGS

pytest_plugins = ["pytester"]

TYPO = """
[tool.envbox.services.app]
command = ["sleep", "1000"]
port = [8000]
"""
#: the part of the ConfigError that only its full text has (the summary line is cut before it)
TYPO_MESSAGE = "unknown key 'port'; did you mean 'ports'?"
SIX_TESTS = """
    import pytest

    @pytest.mark.envbox("app")
    def test_1(): pass

    @pytest.mark.envbox("app")
    def test_2(envbox): pass

    def test_3(envbox): pass

    @pytest.mark.envbox("app")
    class TestMore:
        def test_4(self): pass
        def test_5(self): pass
        def test_6(self): pass
"""


@pytest.fixture
def terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """An 80-column terminal, not CI: pytest cuts each short summary line to the width (on CI,
    or with -vv, it writes the whole message)."""
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("BUILD_NUMBER", raising=False)


def run(p: pytest.Pytester, *args: str) -> pytest.RunResult:
    return p.runpytest(*PLUGIN_ARGS, "-p", "no:cacheprovider", *args)


def output(result: pytest.RunResult) -> list[str]:
    return result.outlines + result.errlines


@pytest.mark.usefixtures("terminal")
def test_a_typo_in_pyproject_is_reported_once_and_stops_the_run(pytester: pytest.Pytester) -> None:
    pytester.makefile(".toml", pyproject=TYPO)
    pytester.makepyfile(test_typo=SIX_TESTS)
    result = run(pytester)
    lines = output(result)
    text = "\n".join(lines)
    assert len(lines) < 30, text
    assert result.ret == pytest.ExitCode.USAGE_ERROR, text
    result.assert_outcomes(errors=1)  # the first test that needs a service; the others do not run
    assert text.count(TYPO_MESSAGE) == 1, text
    # the summary line shows the message (cut to the width), not pytest_envbox.errors.ConfigE...
    result.stdout.fnmatch_lines([
        "ERROR test_typo.py::test_1 - service 'app', key 'port': unknown key*",
        "*Interrupted: pytest-envbox: the project's configuration is invalid (above)*",
    ])  # fmt: skip
    assert "pytest_envbox/" not in text, text  # no frame of the plugin, config.py or the rest
    assert "ConfigE..." not in text


def test_full_trace_shows_where_the_error_was_raised(pytester: pytest.Pytester) -> None:
    pytester.makefile(".toml", pyproject=TYPO)
    pytester.makepyfile(test_typo=SIX_TESTS)
    result = run(pytester, "--full-trace")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stdout.fnmatch_lines(["*pytest_envbox/config.py:*"])


@pytest.mark.parametrize("ci", [False, True], ids=["terminal", "ci"])
def test_with_xdist_each_worker_reports_it_at_most_once(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, ci: bool
) -> None:
    """Each worker reads the configuration itself, so each may report it once before the
    controller stops the run; on CI pytest writes the short summary lines in full, so there the
    message is also in each summary line (and nowhere else)."""
    pytest.importorskip("xdist")
    monkeypatch.setenv("COLUMNS", "80")
    if ci:
        monkeypatch.setenv("CI", "true")
    else:
        monkeypatch.delenv("CI", raising=False)
        monkeypatch.delenv("BUILD_NUMBER", raising=False)
    pytester.makefile(".toml", pyproject=TYPO)
    pytester.makepyfile(test_typo=SIX_TESTS)
    result = run(pytester, "-n", "2")
    text = "\n".join(output(result))
    assert result.ret == pytest.ExitCode.USAGE_ERROR, text
    errors = result.parseoutcomes().get("errors", 0)
    assert 1 <= errors <= 2, text
    assert text.count(" ERROR at setup of ") == errors, text
    assert text.count(TYPO_MESSAGE) == errors * (2 if ci else 1), text


def test_the_configuration_is_read_only_when_a_test_needs_a_service(pytester: pytest.Pytester) -> None:
    """Not at collection: compose files interpolate variables that session fixtures may set, and
    services hooks may start registries; a run of tests that need no service is not stopped."""
    pytester.makefile(".toml", pyproject=TYPO)
    pytester.makepyfile(test_typo=SIX_TESTS + "\n    def test_plain(): pass\n")
    assert run(pytester, "--collect-only").ret == pytest.ExitCode.OK
    run(pytester, "-k", "plain").assert_outcomes(passed=1)


def test_a_conftest_fixture_can_set_what_the_configuration_needs(pytester: pytest.Pytester) -> None:
    """A session fixture runs before the configuration is read, as examples/compose needs."""
    pytester.makefile(".toml", pyproject="[tool.envbox]\n")
    pytester.makeconftest("""
        import os
        import pytest
        from pytest_envbox import Service

        @pytest.fixture(scope="session", autouse=True)
        def command():
            os.environ["SERVICE_COMMAND"] = "sleep"

        def pytest_envbox_services(config):
            return [Service("app", [os.environ["SERVICE_COMMAND"], "1000"])]
    """)
    pytester.makepyfile("""
        import pytest

        @pytest.mark.envbox("app")
        def test_it(envbox):
            assert envbox["app"].running
    """)
    run(pytester).assert_outcomes(passed=1)


FAILING = """
    import pytest
    from pytest_envbox import Service, probe

    BROKEN = Service("broken", ["sh", "-c", "echo the-log-line; exit 3"], ready=probe.tcp(9000))

    @pytest.mark.envbox(BROKEN)
    def test_setup_1(): pass

    @pytest.mark.envbox(BROKEN)
    def test_setup_2(envbox): pass

    def test_body(envbox):
        envbox.start(BROKEN)
"""


@pytest.mark.usefixtures("terminal")
def test_a_service_that_fails_is_each_tests_error_with_its_message(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_failing=FAILING)
    result = run(pytester, "--envbox-logs=never")
    result.assert_outcomes(errors=2, failed=1)  # not stopped: each test declared its own
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    text = result.stdout.str()
    assert "pytest_envbox/" not in text, text
    result.stdout.fnmatch_lines([
        "*test_body*",
        ">       envbox.start(BROKEN)",  # the test's own line stays
        "E       pytest_envbox.errors.ServiceFailed: service 'broken' exited with return code 3 *",
        "E       the-log-line",
        "test_failing.py:13: ServiceFailed",
    ])  # fmt: skip
    for line in ("FAILED test_failing.py::test_body", "ERROR test_failing.py::test_setup_1",
                 "ERROR test_failing.py::test_setup_2"):  # fmt: skip
        result.stdout.fnmatch_lines([f"{line} - service 'broken' exited with return cod*"])


@pytest.mark.usefixtures("terminal")
def test_a_bad_inline_service_shows_the_users_line_and_the_message(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_inline="""
        import pytest
        from pytest_envbox import Service

        @pytest.mark.envbox(Service("tmp", ["sleep", "1"], ports=["abc"]))
        def test_it(envbox): pass
    """)
    result = run(pytester)
    text = result.stdout.str()
    assert "pytest_envbox/" not in text, text
    result.stdout.fnmatch_lines([
        "test_inline.py:4: in <module>",
        # ([ is fnmatch's: ? stands for the brackets of ports[0])
        "E   pytest_envbox.errors.ConfigError: service 'tmp', key 'ports?0?': 'abc' (a str) is not a port;*",
        "ERROR test_inline.py - service 'tmp', key 'ports?0?': 'abc'*",
    ])  # fmt: skip


def test_a_bug_keeps_its_frames(pytester: pytest.Pytester) -> None:
    """Only EnvboxErrors, whose messages say what to fix, lose the plugin's frames."""
    pytester.makeconftest("""
        def pytest_envbox_services(config):
            raise RuntimeError("a bug in a hook")
    """)
    pytester.makepyfile("def test_it(envbox): pass")
    result = run(pytester)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*pytest_envbox/plugin/fixtures.py:*", "E * RuntimeError: a bug in a hook"])


MARKER_TYPO = """
    import pytest

    @pytest.mark.envbx("app")
    def test_typo(envbox):
        envbox["app"]

    def test_none(envbox):
        envbox["app"]

    @pytest.mark.envbox("app")
    def test_marked(envbox):
        envbox["nope"]
"""


def test_a_misspelt_marker_is_named_when_a_service_is_missing(pytester: pytest.Pytester) -> None:
    pytester.makefile(".toml", pyproject=f"""
        [tool.envbox.services.app]
        command = ["{sys.executable}", "-c", "import time; time.sleep(1000)"]
    """)
    pytester.makepyfile(test_marker=MARKER_TYPO)
    result = run(pytester, "-W", "ignore::pytest.PytestUnknownMarkWarning")
    result.assert_outcomes(failed=3)
    no_marker = ("KeyError: \"no service 'app' in this environment (it has: none): this test has no "
                 "@pytest.mark.envbox(...) marker, so its environment has only the services it "
                 "started (envbox.start)")  # fmt: skip
    lines = [line for line in result.outlines if line.startswith("E ")]
    assert [line.split("E", 1)[1].strip() for line in lines] == [
        no_marker + "; did you mean @pytest.mark.envbox? this test has @pytest.mark.envbx\"",
        no_marker + '"',
        "KeyError: \"no service 'nope' in this environment (it has: app)\"",
    ], "\n".join(result.outlines)


def test_the_marker_is_registered_so_strict_markers_catches_a_typo(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_marker=MARKER_TYPO)
    result = run(pytester, "--strict-markers", "--collect-only")
    assert result.ret == pytest.ExitCode.INTERRUPTED  # a collection error
    result.stdout.fnmatch_lines(["*'envbx' not found in `markers` configuration option*"])
    assert "'envbox' not found" not in result.stdout.str()
    # without --strict-markers pytest warns of it
    warned = run(pytester, "--collect-only")
    warned.stdout.fnmatch_lines(["*PytestUnknownMarkWarning: Unknown pytest.mark.envbx*"])
