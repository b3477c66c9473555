"""A service that can write where another mount's source lives swaps that source for a symbolic
link (Kubernetes' CVE-2017-1002101): the next start must refuse it, never bind the link's target."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pytest_envbox import ConfigError, Environment, Mount, Service, ServiceFailed
from pytest_envbox.engine.client import get_supervisor
from tests.kernel import cgroup_dirs, children, started_sandboxes

# Run inside the attacker: replace ``path`` (a directory) by a symbolic link to ``target``.
# A shell, not this interpreter: with the rootdir under the host's /tmp, an interpreter there (a
# tox virtualenv in a checkout under /tmp) is hidden by the service's private /tmp.
SWAP = 'mv "$1" "$1.was" && ln -s "$2" "$1"'


def _victim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A host directory no service declares, with a marker file: what the attacker wants."""
    victim = tmp_path_factory.mktemp("victim")
    (victim / "marker").write_text("host secret\n")
    return victim


def _link_to(victim: Path, link: Path) -> str:
    # Relative, so it leads to the victim from wherever the host's root is mounted (the
    # sandbox's setup sees it at /old; an absolute link would point into the setup's own root).
    return os.path.relpath(victim, link.parent)


def _untouched(victim: Path) -> bool:
    return sorted(p.name for p in victim.iterdir()) == ["marker"]


def _swap(attacker: Environment, name: str, inside: str, target: str) -> None:
    r = attacker[name].exec(["sh", "-c", SWAP, "swap", inside, target])
    assert r.returncode == 0, r.stderr


def _layout(tmp_path: Path) -> None:
    (tmp_path / "shared" / "spool").mkdir(parents=True)
    (tmp_path / "shared" / "sub" / "spool").mkdir(parents=True)


def _a(*extra: dict[str, object]) -> Service:
    return Service("a", ["sleep", "1000"],
                   mounts=[{"source": "shared", "target": "/shared", "readonly": False}, *extra])


def test_a_mount_source_swapped_for_a_symlink_is_refused_at_the_next_start(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    _layout(tmp_path)
    victim = _victim(tmp_path_factory)
    b = Service("b", ["sleep", "1000"],
                mounts=[{"source": "shared/spool", "target": "/spool", "readonly": False}])
    with Environment([_a(), b], rootdir=tmp_path) as env:
        env["b"].stop()
        _swap(env, "a", "/shared/spool", _link_to(victim, tmp_path / "shared" / "spool"))
        with pytest.raises(ServiceFailed) as info:
            env["b"].start()
        message = str(info.value)
        assert "service 'b'" in message and f"{tmp_path}/shared/spool" in message
        assert "is now a symbolic link" in message and "not followed" in message
        assert not env["b"].running
        # Declared again after the swap: refused before anything starts, naming the real path.
        with pytest.raises(ConfigError, match=r"mounts\[0\]\.source.*symbolic link") as declared:
            env.start(b.with_changes(name="b2"))
        assert str(victim) in str(declared.value)
    assert _untouched(victim)


def test_a_service_swapping_its_own_second_source_is_refused_at_its_restart(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    _layout(tmp_path)
    victim = _victim(tmp_path_factory)
    a = _a({"source": "shared/spool", "target": "/spool", "readonly": False})
    with Environment([a], rootdir=tmp_path) as env:
        _swap(env, "a", "/shared/spool", _link_to(victim, tmp_path / "shared" / "spool"))
        with pytest.raises(ServiceFailed, match="is now a symbolic link"):
            env["a"].restart()
        assert not env["a"].running
    assert _untouched(victim)


def test_an_intermediate_directory_swapped_for_a_symlink_is_refused_too(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    _layout(tmp_path)
    victim = _victim(tmp_path_factory)
    (victim / "spool").mkdir()  # so that shared/sub/spool, through the link, exists
    (victim / "spool" / "marker").write_text("host secret\n")
    b = Service("b", ["sleep", "1000"],
                mounts=[{"source": "shared/sub/spool", "target": "/spool", "readonly": False}])
    with Environment([_a(), b], rootdir=tmp_path) as env:
        env["b"].stop()
        _swap(env, "a", "/shared/sub", _link_to(victim, tmp_path / "shared" / "sub"))
        with pytest.raises(ServiceFailed) as info:
            env["b"].start()
        assert f"{tmp_path}/shared/sub ->" in str(info.value)
        assert "is now a symbolic link" in str(info.value)
    assert sorted(p.name for p in victim.iterdir()) == ["marker", "spool"]
    assert [p.name for p in (victim / "spool").iterdir()] == ["marker"]


def _state(sup: int) -> tuple[set[int], set[str]]:
    """This supervisor's started sandboxes and its sandboxes' cgroups: only what this test's own
    supervisor made (another pytest worker on the host starts services of its own at any
    moment; a host-wide listing of ``envbox-`` directories would see theirs)."""
    return started_sandboxes(sup), {d for pid in children(sup) for d in cgroup_dirs(pid).values()}


@pytest.mark.parametrize("case", ["symlinked-source", "proc-source", "loopback-subnet", "huge-memory"])
def test_a_dangerous_declaration_starts_nothing(case: str, tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "link").symlink_to("data")
    sup = get_supervisor().pid
    before = _state(sup)
    with pytest.raises(ConfigError) as info:
        if case == "symlinked-source":
            Environment([Service("svc", ["true"], mounts=[Mount("link", "/data")])],
                        rootdir=tmp_path).open()
        elif case == "proc-source":
            proc = {"source": "/proc/sys", "target": "/x", "readonly": False}
            Environment([Service("svc", ["true"], mounts=[proc])]).open()
        elif case == "loopback-subnet":
            Environment([Service("svc", ["true"])], subnet="127.0.0.0/24").open()
        else:
            Environment([Service("svc", ["true"], limits={"memory": "99999Ei"})]).open()
    assert "subnet" in str(info.value) or "service 'svc'" in str(info.value)
    assert _state(sup) == before
