"""Pure cgroup logic: finding our cgroups from /proc text, and the quantity conversions."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pytest_envbox import ConfigError, Limits
from pytest_envbox.kernel import cgroups
from pytest_envbox.kernel.cgroups import cpu_quota, format_memory, parse_host

HYBRID_MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
39 31 0:35 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
HYBRID_CGROUP = """\
8:pids:/user.slice
6:freezer:/
4:memory:/user.slice/session-3.scope
2:cpu,cpuacct:/user.slice
0::/user.slice/session-3.scope
"""


def test_hybrid_host_maps_each_controller_to_our_own_cgroup() -> None:
    host = parse_host(HYBRID_MOUNTINFO, HYBRID_CGROUP)
    assert host.version == "hybrid"
    assert host.v1 == {
        "cpu": "/sys/fs/cgroup/cpu,cpuacct/user.slice",
        "cpuacct": "/sys/fs/cgroup/cpu,cpuacct/user.slice",
        "memory": "/sys/fs/cgroup/memory/user.slice/session-3.scope",
        "freezer": "/sys/fs/cgroup/freezer",
        "pids": "/sys/fs/cgroup/pids/user.slice",
    }
    assert host.unified == "/sys/fs/cgroup/unified/user.slice/session-3.scope"


def test_v2_host() -> None:
    mi = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
    host = parse_host(mi, "0::/user.slice/user-1000.slice/session-2.scope\n")
    assert host.version == "v2"
    assert host.v1 == {}
    assert host.unified == "/sys/fs/cgroup/user.slice/user-1000.slice/session-2.scope"


def test_container_view_with_a_mount_root_maps_relative_paths() -> None:
    # A container without a cgroup namespace: the mount's root is the container's cgroup.
    mi = "30 23 0:26 /docker/abc /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"
    assert parse_host(mi, "0::/docker/abc\n").unified == "/sys/fs/cgroup"
    assert parse_host(mi, "0::/docker/abc/sub\n").unified == "/sys/fs/cgroup/sub"
    # Our path is not below the mount's root (another namespace): the mount's root is ours.
    assert parse_host(mi, "0::/elsewhere\n").unified == "/sys/fs/cgroup"


def test_escaped_mount_points() -> None:
    mi = r"30 23 0:26 / /sys/fs/my\040cgroup rw - cgroup2 cgroup2 rw" + "\n"
    assert parse_host(mi, "0::/\n").unified == "/sys/fs/my cgroup"


def test_no_cgroups_mounted() -> None:
    assert parse_host("22 1 0:21 / /proc rw - proc proc rw\n", "0::/\n").version == "none"


@pytest.mark.parametrize(
    ("cpu", "quota"),
    [("250m", 25_000), ("200m", 20_000), ("1", 100_000), (0.5, 50_000), (2, 200_000),
     ("1500m", 150_000), ("1m", 1_000), (0.001, 1_000)],
)  # fmt: skip
def test_cpu_to_quota_and_period(cpu: str | float, quota: int) -> None:
    cores = Limits(cpu=cpu).cpu
    assert cores is not None
    assert cpu_quota(cores) == (quota, 100_000)


def test_cpu_quota_has_a_floor_of_one_millisecond() -> None:
    assert cpu_quota(0.0001) == (1000, 100_000)


@pytest.mark.parametrize("cpu", ["0", "-1", "250x", "m", "", "1.5.5", "-250m", True, [1]])
def test_bad_cpu_quantities(cpu: object) -> None:
    with pytest.raises(ConfigError, match="cpu"):
        Limits(cpu=cpu)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("memory", "size"),
    [("64Mi", 64 << 20), ("1Gi", 1 << 30), ("512Ki", 512 << 10), ("500M", 500_000_000),
     ("1G", 1_000_000_000), ("1.5Gi", 3 << 29), (4096, 4096), ("100k", 100_000)],
)  # fmt: skip
def test_memory_quantities(memory: str | int, size: int) -> None:
    assert Limits(memory=memory).memory == size


@pytest.mark.parametrize("memory", ["64MB", "64mi", "-1Mi", "0", 0, "Mi", "1.2.3Gi", 1.5, True])
def test_bad_memory_quantities(memory: object) -> None:
    with pytest.raises(ConfigError, match="memory"):
        Limits(memory=memory)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("n", "text"),
    [(64 << 20, "64Mi"), (1 << 30, "1Gi"), (512 << 10, "512Ki"), (500_000_000, "500M"), (1000, "1k"),
     (1234567, "1234567")],
)  # fmt: skip
def test_format_memory_gives_what_a_user_wrote(n: int, text: str) -> None:
    assert format_memory(n) == text


def test_runs_go_next_to_the_leaf_a_previous_run_moved_the_shell_into() -> None:
    assert cgroups.v2_base("/sys/fs/cgroup/user.slice/run-1.scope") == "/sys/fs/cgroup/user.slice/run-1.scope"
    assert cgroups.v2_base("/sys/fs/cgroup/run-1.scope/envbox-tests") == "/sys/fs/cgroup/run-1.scope"


def test_only_a_delegated_cgroup_or_the_top_of_the_mount_is_ours_to_reorganise(tmp_path: Path) -> None:
    d = str(tmp_path)
    assert cgroups.delegated("/sys/fs/cgroup", "/sys/fs/cgroup")  # a container's whole view
    if os.geteuid() != 0:
        assert cgroups.delegated(d, "/sys/fs/cgroup")  # owned by the (non-root) user: delegated
        pytest.skip("trusted.* attributes need root")
    assert not cgroups.delegated(d, "/sys/fs/cgroup")  # root's, unmarked
    os.setxattr(d, "trusted.delegate", b"1")  # as systemd marks a Delegate=yes unit
    assert cgroups.delegated(d, "/sys/fs/cgroup")
