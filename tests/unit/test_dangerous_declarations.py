"""Declarations that would hand a service the host (its kernel files, its root, a path outside
the project, a symbolic link another service can swap, a network with a meaning of its own, a
limit the kernel cannot take) are a ConfigError naming the service, the key and the fix."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from pytest_envbox.config import load_project_config
from pytest_envbox.errors import ConfigError
from pytest_envbox.spec import Limits, Mount, parse_subnet, service_from_mapping
from pytest_envbox.validate import CPU_MAX, MEMORY_MAX, PIDS_MAX, real_source


def _mount(**overrides: object) -> dict[str, Any]:
    return {"mounts": [{"source": "./data", "target": "/data", **overrides}]}


# (id, table, offending key, the fix or reason the message must give)
CASES: list[tuple[str, dict[str, Any], str, str]] = [
    ("proc-rw", _mount(source="/proc/sys/kernel", readonly=False), "mounts[0].source",
     "under /proc, the host kernel's own files"),
    ("proc-itself", _mount(source="/proc"), "mounts[0].source", "under /proc"),
    ("sys-release-agent", _mount(source="/sys/fs/cgroup", readonly=False), "mounts[0].source",
     "under /sys"),
    ("dev", _mount(source="/dev/shm"), "mounts[0].source", "mount a regular file or directory"),
    ("proc-spelled-oddly", _mount(source="//proc/./sys/"), "mounts[0].source", "under /proc"),
    ("root-rw", _mount(source="/", readonly=False), "mounts[0].source",
     "mount only the directory you need"),
    ("root-ro", _mount(source="/"), "mounts[0].source", "/proc, /sys and /dev with it"),
    ("relative-escape", _mount(source="../../etc"), "mounts[0].source",
     "give its absolute path"),
    ("relative-escape-inner", _mount(source="data/../../etc"), "mounts[0].source", "rootdir"),
    ("memory-99999Ei", {"limits": {"memory": "99999Ei"}}, "limits.memory", "8Ei - 1"),
    ("memory-8Ei", {"limits": {"memory": "8Ei"}}, "limits.memory", "no memory limit"),
    ("memory-int", {"limits": {"memory": 2**63}}, "limits.memory", str(MEMORY_MAX)),
    ("cpu-huge", {"limits": {"cpu": 1e7}}, "limits.cpu", f"at most {CPU_MAX}"),
    ("cpu-huge-millicores", {"limits": {"cpu": "9999999999m"}}, "limits.cpu", "no cpu limit"),
    ("pids-huge", {"limits": {"pids": PIDS_MAX + 1}}, "limits.pids", f"at most {PIDS_MAX}"),
]  # fmt: skip


@pytest.mark.parametrize(("table", "key", "fix"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_dangerous_declaration_names_the_service_the_key_and_the_fix(
    table: dict[str, Any], key: str, fix: str
) -> None:
    with pytest.raises(ConfigError) as info:
        service_from_mapping("api", {"command": ["server"], **table})
    assert info.value.service == "api" and info.value.key == key
    assert "service 'api'" in str(info.value) and fix in str(info.value)


def test_the_largest_limits_the_kernel_takes_are_accepted() -> None:
    limits = Limits(memory=MEMORY_MAX, cpu=CPU_MAX, pids=PIDS_MAX)
    assert (limits.memory, limits.cpu, limits.pids) == (2**63 - 1, 1_000_000, 2**22)
    assert Limits(memory="7Ei").memory == 7 * 2**60


@pytest.mark.parametrize("source", ["/proc-data", "/srv/dev", "data/../other", ".", "/sysroot/x"])
def test_sources_that_only_look_like_kernel_dirs_or_climb_inside_are_accepted(source: str) -> None:
    assert Mount(source, "/data").source == source


@pytest.mark.parametrize(
    ("subnet", "reason"),
    [("127.0.0.0/24", "the loopback network"), ("169.254.0.0/24", "link-local"),
     ("224.0.0.0/24", "multicast"), ("0.0.0.0/8", "unspecified"), ("0.0.0.0/0", "unspecified"),
     ("255.255.255.0/24", "broadcast"), ("240.0.0.0/24", "reserved"),
     ("8.8.8.0/24", "public address space"), ("100.0.0.0/16", "public"),
     ("126.0.0.0/7", "loopback")],
)  # fmt: skip
def test_a_subnet_with_a_meaning_of_its_own_is_refused(subnet: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason) as info:
        parse_subnet(subnet)
    assert info.value.key == "subnet" and "use a private range" in str(info.value)


@pytest.mark.parametrize("subnet", ["10.0.0.0/8", "172.16.5.0/24", "192.168.1.0/24",
                                    "100.64.0.0/24", "198.18.0.0/15", "192.0.2.0/29"])  # fmt: skip
def test_private_subnets_are_accepted(subnet: str) -> None:
    assert parse_subnet(subnet) == subnet


def test_a_loopback_subnet_in_the_project_file_names_the_top_level_key(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text('[tool.envbox]\nsubnet = "127.0.0.0/24"\n')
    with pytest.raises(ConfigError, match="loopback") as info:
        load_project_config(tmp_path)
    assert info.value.key == "tool.envbox.subnet"


# --- mount sources on this host ------------------------------------------------------------------


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A rootdir holding data/ (a real directory), link -> data, and out -> a directory outside."""
    (tmp_path / "proj" / "data" / "sub").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (tmp_path / "proj" / "link").symlink_to("data")
    (tmp_path / "proj" / "out").symlink_to(tmp_path / "outside")
    return tmp_path / "proj"


def test_a_real_source_is_its_path_below_the_rootdir(root: Path) -> None:
    assert real_source("data/sub", str(root), "api", "mounts[0].source") == f"{root}/data/sub"
    assert real_source(f"{root}/data", str(root), "api", "mounts[0].source") == f"{root}/data"
    assert real_source(".", str(root), "api", "mounts[0].source") == str(root)


@pytest.mark.parametrize(("source", "fix"), [("link", "'data'"), ("link/sub", "'data/sub'")])
def test_a_source_through_a_link_inside_the_rootdir_suggests_the_real_relative_path(
    root: Path, source: str, fix: str
) -> None:
    with pytest.raises(ConfigError) as info:
        real_source(source, str(root), "api", "mounts[0].source")
    message = str(info.value)
    assert f"({root}/link -> data)" in message and f"give the real path, {fix}" in message
    assert info.value.service == "api" and info.value.key == "mounts[0].source"


def test_a_source_through_a_link_leading_outside_suggests_the_absolute_real_path(root: Path) -> None:
    with pytest.raises(ConfigError, match=f"give the real path, '{root.parent}/outside'"):
        real_source("out", str(root), "api", "mounts[0].source")
    # An absolute path is checked from / down: here the link is the last component.
    with pytest.raises(ConfigError, match="symbolic link"):
        real_source(f"{root}/out", str(root), "api", "mounts[0].source")


def test_an_absolute_source_under_a_linked_directory_suggests_the_real_one(tmp_path: Path) -> None:
    # As /var/run -> /run on Debian: the declaration must name /run/... itself.
    (tmp_path / "run" / "app").mkdir(parents=True)
    (tmp_path / "var").mkdir()
    (tmp_path / "var" / "run").symlink_to("../run")
    with pytest.raises(ConfigError, match=f"give the real path, '{tmp_path}/run/app'"):
        real_source(f"{tmp_path}/var/run/app", "/nonexistent", "api", "mounts[0].source")


def test_a_relative_source_resolving_into_proc_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="under /proc"):
        real_source("proc/sys", "/", "api", "mounts[0].source")


def test_a_missing_or_dangling_source_is_named(root: Path) -> None:
    (root / "dangling").symlink_to("nowhere")
    with pytest.raises(ConfigError, match="does not exist"):
        real_source("nowhere", str(root), "api", "mounts[0].source")
    with pytest.raises(ConfigError, match="symbolic link"):
        real_source("dangling", str(root), "api", "mounts[0].source")


def test_a_rootdir_under_a_linked_path_is_taken_by_its_real_path(root: Path, tmp_path: Path) -> None:
    from pytest_envbox import Service
    from pytest_envbox.engine.planning import plan_for

    alias = tmp_path / "alias"
    alias.symlink_to(root)
    plan = plan_for(Service("api", ["true"], mounts=[Mount("data", "/data")]), alias)
    assert plan.mounts == [(f"{os.path.realpath(root)}/data", "/data", True)]
