"""The plugin as users run it: pytester projects with real services."""

from __future__ import annotations

import ipaddress
import json
import sys
from pathlib import Path

import pytest

from tests.conftest import PLUGIN_ARGS, cgroups_problem

pytest_plugins = ["pytester"]

PYPROJECT = f"""
[tool.envbox.services.web]
command = ["{sys.executable}", "-m", "http.server", "8000", "--bind", "127.0.0.1"]
ports = [8000]
ready = {{ http = 8000 }}

[tool.envbox.services.worker]
command = ["sleep", "1000"]
depends_on = ["web"]

[tool.envbox.topologies]
shop = ["web", "worker"]
"""


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makefile(".toml", pyproject=PYPROJECT)
    return pytester


def run(p: pytest.Pytester, *args: str) -> pytest.RunResult:
    return p.runpytest(*PLUGIN_ARGS, "-p", "no:cacheprovider", *args)


def test_marker_by_name_starts_the_service_and_its_dependencies(project: pytest.Pytester) -> None:
    project.makepyfile("""
        import pytest

        @pytest.mark.envbox("worker")
        def test_it(envbox):
            assert set(envbox.services) == {"web", "worker"}
            assert envbox["web"].http.get("/").status_code == 200
            assert envbox["worker"].exec(["hostname"]).stdout.strip() == "worker"
    """)
    run(project).assert_outcomes(passed=1)


def test_unknown_name_fails_at_setup_listing_known_names(project: pytest.Pytester) -> None:
    project.makepyfile("""
        import pytest

        @pytest.mark.envbox("nope")
        def test_it(envbox):
            pass
    """)
    result = run(project)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*ConfigError*nope*web*worker*"])


def test_topology_and_inline_service(project: pytest.Pytester) -> None:
    project.makepyfile(f"""
        import pytest
        from pytest_envbox import Service, probe

        @pytest.mark.envbox(topology="shop")
        def test_topology(envbox):
            assert set(envbox.services) == {{"web", "worker"}}

        @pytest.mark.envbox(Service("tmp", ["{sys.executable}", "-m", "http.server", "9000"],
                                    ports=[9000], ready=probe.tcp(9000)))
        def test_inline(envbox):
            assert envbox["tmp"].http.get("/").status_code == 200
    """)
    run(project).assert_outcomes(passed=2)


def test_hook_declares_services_and_duplicates_name_both_places(project: pytest.Pytester) -> None:
    project.makeconftest("""
        from pytest_envbox import Service

        def pytest_envbox_services(config):
            return [Service("extra", ["sleep", "1000"]), Service("web", ["true"])]
    """)
    project.makepyfile("""
        import pytest

        @pytest.mark.envbox("extra")
        def test_it(envbox):
            assert envbox["extra"].running
    """)
    result = run(project)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*ConfigError*web*pyproject.toml*conftest.py*"])


def test_failing_test_gets_the_service_log_as_a_report_section(project: pytest.Pytester) -> None:
    project.makepyfile("""
        import pytest

        @pytest.mark.envbox("web")
        def test_it(envbox):
            envbox["web"].http.get("/marker-path-xyz")
            assert False
    """)
    result = run(project)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*envbox: web*", "*full log:*web.log*", "*marker-path-xyz*"])
    result = run(project, "--envbox-logs=never")
    assert "envbox: web" not in result.stdout.str()


def test_without_marker_the_environment_is_empty_and_starts_on_demand(project: pytest.Pytester) -> None:
    project.makepyfile("""
        def test_it(envbox):
            assert len(envbox) == 0
            web = envbox.start("web")
            assert web.http.get("/").status_code == 200
    """)
    run(project).assert_outcomes(passed=1)


def test_module_scope_shares_one_environment(project: pytest.Pytester) -> None:
    project.makepyfile("""
        import pytest
        pytestmark = pytest.mark.envbox("web", scope="module")
        pids = set()

        def test_one(envbox):
            pids.add(envbox["web"].pid)

        def test_two(envbox):
            pids.add(envbox["web"].pid)
            assert len(pids) == 1

        @pytest.mark.envbox("worker")
        def test_closest_marker_wins(envbox):
            assert "worker" in envbox.services
    """)
    run(project).assert_outcomes(passed=3)


def test_bad_marker_arguments_name_the_test(project: pytest.Pytester) -> None:
    project.makepyfile("""
        import pytest

        @pytest.mark.envbox("web", scope="forever")
        def test_it(envbox):
            pass
    """)
    result = run(project)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*test_bad_marker_arguments_name_the_test.py::test_it*scope*forever*"])


def test_marker_alone_starts_services_without_the_fixture_argument(project: pytest.Pytester) -> None:
    project.makepyfile("""
        import pytest

        @pytest.mark.envbox("web")
        def test_it():
            pass
    """)
    result = run(project, "-rP")  # the default, on-failure: a passing test has no section
    result.assert_outcomes(passed=1)
    assert "envbox: web" not in result.stdout.str()
    result = run(project, "--envbox-logs=always", "-rP")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*envbox: web*", "*web: running*"])


def test_a_service_oom_killed_during_the_test_is_named_in_its_failure(project: pytest.Pytester) -> None:
    """The test fails for its own reason (the service stopped answering); the report says why."""
    hog = ("import os, time\\nwhile not os.path.exists('/tmp/go'): time.sleep(0.01)\\n"
           "b = []\\nwhile True: b.append(b'x' * (1 << 20))\\n")
    project.makepyfile(f"""
        import pytest
        from pytest_envbox import Service
        from pytest_envbox.wait import Deadline, wait_until

        @pytest.mark.envbox(Service("hog", ["{sys.executable}", "-c", "{hog}"],
                                    limits={{"memory": "48Mi"}}))
        def test_it(envbox):
            h = envbox["hog"]
            h.exec(["touch", "/tmp/go"])
            wait_until(lambda: (not h.running) or None, Deadline(30))
            assert h.running, "the hog went away"
    """)
    result = run(project)
    if cgroups_problem():  # rootless on cgroup v1: the limit is refused, and the test says why
        result.assert_outcomes(errors=1)
        result.stdout.fnmatch_lines(["*HostUnsupported: service 'hog' declares limits, but "
                                     "cgroups cannot be used here*"])  # fmt: skip
        return
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        "*envbox: OOM*",
        "*service 'hog' was OOM-killed (memory limit 48Mi), return code 137*",
    ])


def test_terminal_summary_and_json_report(project: pytest.Pytester) -> None:
    project.makepyfile("""
        import pytest

        @pytest.mark.envbox("web")
        def test_one(envbox):
            envbox["web"].restart()

        @pytest.mark.envbox("web")
        def test_two(envbox):
            assert envbox["web"].http.get("/").status_code == 200
    """)
    report = project.path / "envbox.json"
    result = run(project, f"--envbox-report={report}")
    result.assert_outcomes(passed=2)
    measured = not cgroups_problem()  # rootless on cgroup v1: no cgroup, no figures (shown as -)
    result.stdout.fnmatch_lines([
        "*envbox services*",
        "service*starts*ready (median)*peak memory / limit*cpu*OOM kills",
        "web*3*ms*Mi / no limit*s*0" if measured else "web*3*ms*- / no limit*0.00 s*0",
        f"envbox: report written to {report}",
    ])
    data = json.loads(report.read_text())
    envs = data["environments"]
    pool = ipaddress.IPv4Network("198.18.0.0/15")  # each its own /24 of it
    assert len(envs) == 2 and all(ipaddress.IPv4Network(e["subnet"]).subnet_of(pool) for e in envs)
    runs = [r for e in envs for r in e["services"]["web"]["runs"]]
    assert len(runs) == 3  # test_one restarted it
    for r in runs:
        assert list(r) == ["started", "ready", "stopped", "returncode", "oom_kills",
                           "memory_peak_bytes", "cpu_seconds"]  # fmt: skip
        assert r["started"] <= r["ready"] <= r["stopped"]
        assert r["returncode"] is not None and r["oom_kills"] == 0
        if measured:
            assert r["memory_peak_bytes"] > 0 and r["cpu_seconds"] >= 0
        else:
            assert r["memory_peak_bytes"] is None and r["cpu_seconds"] is None
    assert envs[0]["services"]["web"]["limits"] == {"memory": None, "cpu": None, "pids": None}


def test_the_summary_covers_xdist_workers(project: pytest.Pytester) -> None:
    pytest.importorskip("xdist")
    project.makepyfile("""
        import pytest

        @pytest.mark.parametrize("i", range(4))
        @pytest.mark.envbox("web")
        def test_it(envbox, i):
            assert envbox["web"].running
    """)
    result = run(project, "-n", "2")
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(["*envbox services*", "web*4*ms*"])


def test_hooks_modify_services_and_hear_of_ready_services_and_closed_environments(
    project: pytest.Pytester,
) -> None:
    project.makeconftest("""
        import dataclasses, json, os

        EVENTS = []

        def pytest_envbox_modify_service(config, service):
            return dataclasses.replace(service, env={**service.env, "INJECTED": service.name})

        def pytest_envbox_service_ready(handle):
            EVENTS.append(("ready", handle.name, handle.running))

        def pytest_envbox_environment_closed(environment, stats):
            EVENTS.append(("closed", sorted(stats), [row.starts for row in stats.values()]))

        def pytest_sessionfinish(session):
            with open(os.path.join(str(session.config.rootpath), "events.json"), "w") as f:
                json.dump(EVENTS, f)
    """)
    project.makepyfile("""
        import pytest
        from pytest_envbox import Service

        @pytest.mark.envbox("web")
        def test_declared(envbox):
            assert envbox["web"].exec(["printenv", "INJECTED"]).stdout == "web\\n"

        def test_started_on_demand(envbox):
            h = envbox.start(Service("adhoc", ["sleep", "1000"]))
            assert h.exec(["printenv", "INJECTED"]).stdout == "adhoc\\n"
    """)
    run(project).assert_outcomes(passed=2)
    events = json.loads((project.path / "events.json").read_text())
    assert events == [["ready", "web", True], ["closed", ["web"], [1]],
                      ["ready", "adhoc", True], ["closed", ["adhoc"], [1]]]  # fmt: skip


def test_a_modify_hook_that_renames_a_service_is_a_config_error(project: pytest.Pytester) -> None:
    project.makeconftest("""
        import dataclasses

        def pytest_envbox_modify_service(config, service):
            return dataclasses.replace(service, name="other")
    """)
    project.makepyfile("""
        import pytest

        @pytest.mark.envbox("web")
        def test_it(envbox):
            pass
    """)
    result = run(project)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*renamed service 'web' to 'other'; the name cannot change*"])


WRAPPERS = {
    # wrapper=True: the yield gives the results of this conftest's other implementations (none).
    "wrapper": """
        import dataclasses
        import pytest
        from pytest_envbox import Service

        @pytest.hookimpl(wrapper=True)
        def pytest_envbox_services(config):
            results = yield
            return [*results, [Service("extra", ["sleep", "1000"])]]

        @pytest.hookimpl(wrapper=True)
        def pytest_envbox_modify_service(config, service):
            results = yield
            assert results == []
            return [dataclasses.replace(service, env={**service.env, "WRAPPED": service.name})]
    """,
    "hookwrapper": """
        import dataclasses
        import pytest
        from pytest_envbox import Service

        @pytest.hookimpl(hookwrapper=True)
        def pytest_envbox_services(config):
            outcome = yield
            outcome.force_result([*outcome.get_result(), [Service("extra", ["sleep", "1000"])]])

        @pytest.hookimpl(hookwrapper=True)
        def pytest_envbox_modify_service(config, service):
            outcome = yield
            outcome.force_result([dataclasses.replace(service, env={**service.env,
                                                                    "WRAPPED": service.name})])
    """,
}


@pytest.mark.parametrize("style", ["wrapper", "hookwrapper"])
def test_wrapper_implementations_of_the_services_and_modify_hooks_work(
    project: pytest.Pytester, style: str
) -> None:
    project.makeconftest(WRAPPERS[style])
    # A plain implementation in a plugin: pluggy calls the conftest's wrapper first, and each
    # plugin gets the service as the one before left it.
    project.makepyfile(plain="""
        import dataclasses

        def pytest_envbox_modify_service(config, service):
            return dataclasses.replace(service, env={**service.env,
                                                     "AFTER": service.env.get("WRAPPED", "-")})
    """)
    project.syspathinsert()
    project.makepyfile("""
        import pytest

        @pytest.mark.envbox("extra", "web")
        def test_it(envbox):
            for name in ("extra", "web"):
                out = envbox[name].exec(["printenv", "WRAPPED", "AFTER"]).stdout
                assert out == f"{name}\\n{name}\\n"
    """)
    run(project, "-p", "plain").assert_outcomes(passed=1)


def test_a_services_hook_that_returns_no_list_names_its_conftest(project: pytest.Pytester) -> None:
    project.makeconftest("""
        from pytest_envbox import Service

        def pytest_envbox_services(config):
            return Service("extra", ["true"])
    """)
    project.makepyfile("""
        def test_it(envbox):
            pass
    """)
    result = run(project)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*must return a list of Service objects, not Service (in *conftest.py)*"])


SCOPE_CONFTEST = """
    import os

    SEEN = []  # (scope group, pid of the service), in test order


    def alive(pid):
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False


    def record(group, envbox):
        pid = envbox["web"].pid
        # Every earlier group's service is gone by now; this group's is the same one.
        for g, p in SEEN:
            if g != group:
                assert not alive(p), f"{g}'s service (pid {p}) outlived its scope"
            else:
                assert p == pid, f"{g} did not share one environment"
        SEEN.append((group, pid))
"""


@pytest.mark.parametrize("scope", ["function", "class", "module", "package", "session"])
def test_each_scope_shares_one_environment_and_tears_it_down_when_the_scope_ends(
    project: pytest.Pytester, scope: str,
) -> None:
    """Two groups of two tests each, one group per scope unit: the tests of a group share one
    service (same pid); when the next group starts, the first group's service is gone (for
    session scope, the two groups are one)."""
    project.makeconftest(SCOPE_CONFTEST)
    group_of = {"function": lambda u, t: f"{u}{t}", "class": lambda u, t: u,
                "module": lambda u, t: u, "package": lambda u, t: u,
                "session": lambda u, t: "all"}[scope]  # fmt: skip
    for unit in ("a", "b"):
        body = ["import pytest", "from conftest import record", ""]
        if scope == "class":
            body += ["@pytest.mark.envbox('web', scope='class')", f"class TestGroup{unit.upper()}:"]
            for t in (1, 2):
                body += [f"    def test_{t}(self, envbox):", f"        record({group_of(unit, t)!r}, envbox)"]
        else:
            body += [f"pytestmark = pytest.mark.envbox('web', scope={scope!r})"]
            for t in (1, 2):
                body += [f"def test_{t}(envbox):", f"    record({group_of(unit, t)!r}, envbox)"]
        target = project.path / f"pkg_{unit}" if scope == "package" else project.path
        target.mkdir(exist_ok=True)
        if scope == "package":
            (target / "__init__.py").write_text("")
        (target / f"test_{unit}.py").write_text("\n".join(body) + "\n")
    if scope == "class":  # both classes in one module
        (project.path / "test_b.py").unlink()
        a = (project.path / "test_a.py").read_text()
        b_class = "\n".join(line for line in [
            "@pytest.mark.envbox('web', scope='class')", "class TestGroupB:",
            "    def test_1(self, envbox):", "        record('b', envbox)",
            "    def test_2(self, envbox):", "        record('b', envbox)"])  # fmt: skip
        (project.path / "test_a.py").write_text(a + "\n\n" + b_class + "\n")
    result = run(project, "-p", "no:randomly", "--rootdir", str(project.path))
    result.assert_outcomes(passed=4)


def run_subprocess(p: pytest.Pytester, *args: str) -> pytest.RunResult:
    """pytest in a process of its own (from the checkout, when the package is not installed)."""
    p._monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parents[2]))
    return p.runpytest_subprocess(*PLUGIN_ARGS, "-p", "no:cacheprovider", *args)


def test_keep_leaves_a_failed_tests_environment_until_envbox_clean(project: pytest.Pytester) -> None:
    import os
    import re
    import shlex
    import subprocess

    import requests

    from pytest_envbox.wait import Deadline, wait_until
    from tests.kernel import alive, cgroup_dirs

    project.makepyfile("""
        import pytest

        @pytest.mark.envbox("web")
        def test_fails(envbox):
            assert envbox["web"].http.get("/").status_code == 404

        @pytest.mark.envbox(topology="shop")
        def test_passes(envbox):
            with open("passing-pids", "w") as f:
                f.write(f"{envbox['web'].pid} {envbox['worker'].pid}")
    """)
    # A real pytest process of its own: the environment must outlive it.
    result = run_subprocess(project, "--envbox-keep")
    result.assert_outcomes(failed=1, passed=1)
    out = result.stdout.str()
    result.stdout.fnmatch_lines([
        "*envbox: kept environments (--envbox-keep)*",
        "environment * kept (test_*.py::test_fails failed at call), network 198.1*.0/24:",
        "  web: pid *, 198.1*.2, 8000 -> 127.0.0.1:*; log *web.log",
        "    enter: nsenter --target * --mount --uts --ipc --net --pid --cgroup --root --wd /bin/sh",
        "remove kept environments with: envbox clean *-*",
    ])  # fmt: skip
    m = re.search(r"web: pid (\d+), [\d.]+, 8000 -> 127\.0\.0\.1:(\d+)", out)
    enter = re.search(r"enter: (nsenter .*)", out)
    assert m is not None and enter is not None, out
    pid, port = int(m[1]), int(m[2])
    cgroups = cgroup_dirs(pid)
    try:
        # pytest has ended; the failed test's service still runs, published and enterable.
        assert alive(pid)
        assert requests.get(f"http://127.0.0.1:{port}/", timeout=10).status_code == 200
        entered = subprocess.run([*shlex.split(enter[1]), "-c", "hostname; cat /etc/hostname"],
                                 capture_output=True, text=True, timeout=30)  # fmt: skip
        assert entered.stdout.split()[0] == "web", entered.stderr
        # The passing test's environment is gone, as always.
        others = [int(p) for p in (project.path / "passing-pids").read_text().split()]
        assert wait_until(lambda: not any(alive(p) for p in others) or None, Deadline(10))
        ps = subprocess.run([sys.executable, "-m", "pytest_envbox.cli", "ps"], capture_output=True,
                            text=True, timeout=60).stdout  # fmt: skip
        assert "kept (test_keep_leaves" in ps and f"web  pid {pid}" in ps, ps
        sup = int(re.findall(r"supervisor (\d+)", ps.split(f"web  pid {pid}")[0])[-1])
    finally:
        kept = re.findall(r"^environment (\S+) kept", out, re.M)  # by id: only this test's
        assert f"remove kept environments with: envbox clean {' '.join(kept)}" in out
        cleaned = subprocess.run([sys.executable, "-m", "pytest_envbox.cli", "clean", *kept],
                                 capture_output=True, text=True, timeout=60)  # fmt: skip
    assert cleaned.returncode == 0 and "stopped kept environment" in cleaned.stdout, cleaned
    # `envbox clean` waits for the teardown: nothing of it is left when it returns.
    assert not alive(pid) and not alive(sup)
    assert not any(os.path.exists(d) for c, d in cgroups.items() if "envbox-" in d), cgroups
    ps = subprocess.run([sys.executable, "-m", "pytest_envbox.cli", "ps"], capture_output=True,
                        text=True, timeout=60).stdout  # fmt: skip
    assert f"supervisor {sup}" not in ps


def test_keep_leaves_nothing_when_every_test_passes(project: pytest.Pytester) -> None:
    from pytest_envbox.wait import Deadline, wait_until
    from tests.kernel import alive

    project.makepyfile("""
        import os

        import pytest

        @pytest.mark.envbox("web", scope="module")
        def test_passes(envbox):
            with open("pids", "w") as f:
                f.write(f"{envbox['web'].pid} {os.getpid()}")
    """)
    result = run_subprocess(project, "--envbox-keep")
    result.assert_outcomes(passed=1)
    assert "kept" not in result.stdout.str()
    web, _ = (int(p) for p in (project.path / "pids").read_text().split())
    assert wait_until(lambda: not alive(web) or None, Deadline(10))
