"""Declarations that are wrong for this host fail before anything starts, naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_envbox import ConfigError, Environment, Mount, Service
from pytest_envbox.config import load_project_config
from pytest_envbox.engine.client import get_supervisor
from tests.kernel import started_sandboxes

CASES = {
    "unknown-user": (lambda: Service("svc", ["true"], user="no-such-user-xyz"), "user"),
    "command-not-on-path": (lambda: Service("svc", ["no-such-binary-xyz"]), "command"),
    "command-path-missing": (lambda: Service("svc", ["/nonexistent/bin/x"]), "command"),
    "command-not-executable": (lambda: Service("svc", ["/etc/passwd"]), "command"),
    "cwd-missing": (lambda: Service("svc", ["true"], cwd="/nonexistent-dir"), "cwd"),
    "mount-source-missing": (
        lambda: Service("svc", ["true"], mounts=[Mount("./no-such-dir", "/data")]),
        "mounts[0].source",
    ),
    "unknown-dependency": (lambda: Service("svc", ["true"], depends_on=["ghost"]), "ghost"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_host_dependent_errors_name_the_key_and_start_nothing(case: str, tmp_path: Path) -> None:
    make, key = CASES[case]
    sup = get_supervisor()
    before = started_sandboxes(sup.pid)
    with pytest.raises(ConfigError) as info:
        Environment([make()], rootdir=tmp_path).open()
    assert key in str(info.value)
    assert "svc" in str(info.value)
    assert started_sandboxes(sup.pid) == before


def test_bad_project_file_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    (tmp_path / "envbox.toml").write_text('[services.api]\ncommand = ["true"]\nport = [80]\n')
    with pytest.raises(ConfigError, match="port") as info:
        load_project_config(tmp_path)
    assert "ports" in str(info.value)  # the suggestion
