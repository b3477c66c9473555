"""macOS and Windows developers run the same suite: the tests that need services skip (or, in
CI, error) with one clear line; no import error, no traceback from ctypes.

The platform is faked in a child interpreter before pytest is imported: ``sys.platform`` says
darwin or win32, and the functions only Linux has (``os.pipe2``, ``os.unshare``...) are gone, so
that anything of the plugin that touched Linux on the way would fail here.
"""

from __future__ import annotations

import sys

import pytest

pytest_plugins = ["pytester"]

FAKE = """
import os, sys
sys.platform = {platform!r}
for name in ("pipe2", "O_PATH", "memfd_create", "pidfd_open", "unshare", "setns",
             "sched_getaffinity", "eventfd", "splice"):
    if hasattr(os, name):
        delattr(os, name)
if sys.argv[1] == "doctor":
    from pytest_envbox.cli import main
    sys.exit(main(["doctor"]))
import pytest
sys.exit(pytest.main(sys.argv[1:]))
"""

TESTS = """
    import pytest

    @pytest.mark.envbox("web")
    def test_web(envbox):
        assert envbox["web"].pid

    @pytest.mark.envbox("web", scope="module")
    def test_shared(envbox):
        pass

    def test_plain():
        pass
"""


@pytest.fixture
def fake(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    for var in ("CI", "ENVBOX_ROOTLESS", "PYTEST_ADDOPTS"):
        monkeypatch.delenv(var, raising=False)
    # only this plugin: others (hypothesis) read the platform's sysconfig, which a fake lacks
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    pytester.makefile(".toml", pyproject='[tool.envbox.services.web]\ncommand = ["sleep", "100"]\n')
    pytester.makepyfile(test_services=TESTS)
    return pytester


def run(p: pytest.Pytester, platform: str, *args: str) -> pytest.RunResult:
    script = p.path / "fake_platform.py"
    script.write_text(FAKE.format(platform=platform))
    if args[:1] == ("doctor",):
        return p.run(sys.executable, str(script), "doctor")
    return p.run(sys.executable, str(script), "-p", "pytest_envbox.plugin", "-p", "no:cacheprovider",
                 "-rs", *args)  # fmt: skip


# (not win32: pytest itself reads the console through Windows' io classes when it believes it)
@pytest.mark.parametrize(("platform", "name"), [("darwin", "macOS"), ("freebsd14", "freebsd14")])
def test_on_another_platform_the_tests_that_need_services_skip(
    fake: pytest.Pytester, platform: str, name: str
) -> None:
    result = run(fake, platform)
    assert result.ret == pytest.ExitCode.OK, result.stdout.str() + result.stderr.str()
    result.assert_outcomes(passed=1, skipped=2)
    result.stdout.fnmatch_lines([
        f"SKIPPED * pytest-envbox cannot start services here: this is {name}, not Linux "
        "(`envbox doctor` says why and how to fix it)",
    ])  # fmt: skip
    assert "Traceback" not in result.stdout.str() + result.stderr.str()


def test_in_ci_on_another_platform_they_error_with_the_fix(
    fake: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CI", "true")
    result = run(fake, "darwin")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.assert_outcomes(passed=1, errors=2)
    text = result.stdout.str()
    assert text.count("Lima, colima, UTM, multipass") == 1, text  # the whole block, once
    assert "docs/ci.md#macos-and-windows" in text
    assert "ctypes" not in text and "Traceback" not in text, text


def test_doctor_on_another_platform_says_so_in_one_block(fake: pytest.Pytester) -> None:
    result = run(fake, "win32", "doctor")
    assert result.ret == 1
    out = result.stdout.str()
    assert out.splitlines()[0].split() == ["linux", "MISSING", "this", "is", "Windows,", "not", "Linux"]
    assert "WSL 2" in out and result.stderr.str() == ""


def test_a_bad_ini_value_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nenvbox_unavailable = maybe\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*envbox_unavailable = 'maybe' (in *.ini): it must be one of "
                                 "'error', 'skip'*"])  # fmt: skip
