"""Each cgroup backend against a fake cgroup filesystem: directories and control files in tmp_path.

What is checked is what the kernel would be told (which file, which value) and how its answers
are read; no root needed. The kernel's side (a write refused, a freeze) is in
tests/integration/test_cgroups.py, on this host's hierarchies and on cgroup v2 in the VM lane.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_envbox.kernel import cgroups
from pytest_envbox.kernel.cgroups import (
    CgroupHost,
    CgroupsUnavailable,
    CgroupTree,
    DisabledBackend,
    HybridBackend,
    HybridCgroup,
    V1Backend,
    V1Cgroup,
    V2Cgroup,
)


def files(d: Path, content: dict[str, str] | None = None) -> Path:
    """Make directory ``d`` with these control files, name -> text."""
    d.mkdir(parents=True, exist_ok=True)
    for name, text in (content or {}).items():
        (d / name).write_text(text)
    return d


def control(d: Path, name: str) -> str:
    return (d / name).read_text()


# --- limits -------------------------------------------------------------------------------------


def test_v2_limits_go_to_memory_max_swap_max_cpu_max_and_pids_max(tmp_path: Path) -> None:
    d = files(tmp_path / "1", {"memory.max": "", "memory.swap.max": "", "cpu.max": "", "pids.max": ""})
    V2Cgroup("1", str(d)).set_limits(memory=64 << 20, cpu=0.25, pids=20)
    assert control(d, "memory.max") == str(64 << 20)
    assert control(d, "memory.swap.max") == "0"  # no swap: the limit is the memory it gets
    assert control(d, "cpu.max") == "25000 100000"  # quota and period, in microseconds
    assert control(d, "pids.max") == "20"


def test_v2_without_swap_accounting_only_memory_is_limited(tmp_path: Path) -> None:
    d = files(tmp_path / "1", {"memory.max": ""})
    V2Cgroup("1", str(d)).set_limits(memory=1 << 30, cpu=None, pids=None)
    assert control(d, "memory.max") == str(1 << 30)
    assert not (d / "memory.swap.max").exists()  # a control file is never created


def test_a_limit_not_declared_is_not_written(tmp_path: Path) -> None:
    d = files(tmp_path / "1", {"memory.max": "", "memory.swap.max": "", "cpu.max": "", "pids.max": ""})
    V2Cgroup("1", str(d)).set_limits(memory=None, cpu=None, pids=8)
    assert [control(d, n) for n in ("memory.max", "memory.swap.max", "cpu.max")] == ["", "", ""]
    assert control(d, "pids.max") == "8"


def v1_dirs(tmp_path: Path, *, memsw: bool = True) -> dict[str, str]:
    mem = {"memory.limit_in_bytes": "", "memory.swappiness": "", "memory.usage_in_bytes": "",
           "memory.max_usage_in_bytes": "", "memory.oom_control": ""}  # fmt: skip
    if memsw:
        mem["memory.memsw.limit_in_bytes"] = ""
        mem["memory.kmem.tcp.limit_in_bytes"] = ""
    memory = files(tmp_path / "memory" / "1", mem)
    cpu = files(tmp_path / "cpu,cpuacct" / "1", {"cpu.cfs_period_us": "", "cpu.cfs_quota_us": "",
                                                  "cpuacct.usage": ""})  # fmt: skip
    pids = files(tmp_path / "pids" / "1", {"pids.max": "", "pids.current": ""})
    freezer = files(tmp_path / "freezer" / "1", {"freezer.state": "THAWED"})
    return {"memory": str(memory), "cpu": str(cpu), "cpuacct": str(cpu), "pids": str(pids),
            "freezer": str(freezer)}  # fmt: skip


def test_v1_limits_go_to_each_controller_with_memory_and_swap_limited_alike(tmp_path: Path) -> None:
    dirs = v1_dirs(tmp_path)
    V1Cgroup("1", dirs).set_limits(memory=48 << 20, cpu=1.5, pids=16)
    mem, cpu = Path(dirs["memory"]), Path(dirs["cpu"])
    assert control(mem, "memory.limit_in_bytes") == str(48 << 20)
    assert control(mem, "memory.memsw.limit_in_bytes") == str(48 << 20)  # memory + swap: no swap
    assert control(mem, "memory.kmem.tcp.limit_in_bytes") == str(48 << 20)  # socket buffers
    assert control(mem, "memory.swappiness") == ""
    assert control(cpu, "cpu.cfs_period_us") == "100000"
    assert control(cpu, "cpu.cfs_quota_us") == "150000"
    assert control(Path(dirs["pids"]), "pids.max") == "16"


def test_v1_without_swap_accounting_turns_swappiness_down_instead(tmp_path: Path) -> None:
    dirs = v1_dirs(tmp_path, memsw=False)
    V1Cgroup("1", dirs).set_limits(memory=48 << 20, cpu=None, pids=None)
    mem = Path(dirs["memory"])
    assert control(mem, "memory.limit_in_bytes") == str(48 << 20)
    assert not (mem / "memory.memsw.limit_in_bytes").exists()
    assert not (mem / "memory.kmem.tcp.limit_in_bytes").exists()  # a kernel without it: skipped
    assert control(mem, "memory.swappiness") == "0"


def test_hybrid_limits_are_v1_limits_and_nothing_is_written_in_cgroup2(tmp_path: Path) -> None:
    dirs = v1_dirs(tmp_path)
    unified = files(tmp_path / "unified" / "1", {"memory.max": "", "pids.max": ""})
    HybridCgroup("1", dirs, str(unified)).set_limits(memory=32 << 20, cpu=0.5, pids=4)
    assert control(Path(dirs["memory"]), "memory.limit_in_bytes") == str(32 << 20)
    assert control(Path(dirs["cpu"]), "cpu.cfs_quota_us") == "50000"
    assert [control(unified, n) for n in ("memory.max", "pids.max")] == ["", ""]


# --- figures ------------------------------------------------------------------------------------


def test_v2_stats_read_current_peak_cpu_pids_and_oom_kills(tmp_path: Path) -> None:
    d = files(tmp_path / "1", {
        "memory.current": "1048576\n", "memory.peak": "4194304\n", "pids.current": "3\n",
        "cpu.stat": "usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\n",
        "memory.events": "low 0\nhigh 0\nmax 7\noom 2\noom_kill 1\n",
    })  # fmt: skip
    assert V2Cgroup("1", str(d)).stats() == {"memory_bytes": 1 << 20, "memory_peak_bytes": 4 << 20,
                                             "cpu_seconds": 2.5, "pids": 3, "oom_kills": 1}  # fmt: skip


def test_where_the_kernel_keeps_no_peak_the_highest_use_seen_is_reported(tmp_path: Path) -> None:
    d = files(tmp_path / "1", {"memory.current": "3000\n"})  # memory.peak: Linux 5.19
    cg = V2Cgroup("1", str(d))
    assert cg.stats()["memory_peak_bytes"] == 3000
    (d / "memory.current").write_text("1000\n")
    assert cg.stats() == {"memory_bytes": 1000, "memory_peak_bytes": 3000, "cpu_seconds": 0.0,
                          "pids": 0, "oom_kills": 0}  # fmt: skip


def test_v1_stats_read_usage_max_usage_cpuacct_pids_and_oom_control(tmp_path: Path) -> None:
    dirs = v1_dirs(tmp_path)
    mem, cpu = Path(dirs["memory"]), Path(dirs["cpuacct"])
    (mem / "memory.usage_in_bytes").write_text("2097152\n")
    (mem / "memory.max_usage_in_bytes").write_text("8388608\n")
    (mem / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    (cpu / "cpuacct.usage").write_text("1500000000\n")  # nanoseconds
    (Path(dirs["pids"]) / "pids.current").write_text("5\n")
    assert V1Cgroup("1", dirs).stats() == {"memory_bytes": 2 << 20, "memory_peak_bytes": 8 << 20,
                                           "cpu_seconds": 1.5, "pids": 5, "oom_kills": 2}  # fmt: skip


def test_an_empty_cgroup_is_told_by_cgroup_events_where_there_is_one(tmp_path: Path) -> None:
    d = files(tmp_path / "1", {"cgroup.events": "populated 1\nfrozen 0\n", "cgroup.procs": ""})
    cg = V2Cgroup("1", str(d))
    assert not cg.is_empty()  # populated says so, though cgroup.procs lists none (a child's)
    (d / "cgroup.events").write_text("populated 0\nfrozen 0\n")
    assert cg.is_empty()
    v1 = V1Cgroup("1", {"memory": str(files(tmp_path / "memory" / "1", {"cgroup.procs": "42\n"}))})
    assert not v1.is_empty() and v1.pids() == [42]


# --- freezer and kill ---------------------------------------------------------------------------


def test_v1_pause_writes_freezer_state_and_waits_until_it_reads_so(tmp_path: Path) -> None:
    dirs = v1_dirs(tmp_path)
    cg = V1Cgroup("1", dirs)
    cg.freeze(True)
    assert cg.frozen and control(Path(dirs["freezer"]), "freezer.state") == "FROZEN"
    cg.freeze(False)
    assert not cg.frozen and control(Path(dirs["freezer"]), "freezer.state") == "THAWED"


def test_a_freeze_that_does_not_complete_in_time_is_undone(tmp_path: Path) -> None:
    # cgroup.events never says frozen (a process stuck in the kernel): thawed again, then raised.
    d = files(tmp_path / "1", {"cgroup.freeze": "", "cgroup.events": "populated 1\nfrozen 0\n"})
    cg = V2Cgroup("1", str(d))
    with pytest.raises(cgroups.CgroupError, match=r"did not freeze within 0\.02 s"):
        cg.freeze(True, timeout=0.02)
    assert control(d, "cgroup.freeze") == "0" and not cg.frozen


def test_without_a_freezer_pause_is_refused(tmp_path: Path) -> None:
    dirs = v1_dirs(tmp_path)
    del dirs["freezer"]
    with pytest.raises(cgroups.CgroupError, match="no freezer here"):
        V1Cgroup("1", dirs).freeze(True)
    with pytest.raises(cgroups.CgroupError, match="no freezer here"):
        V2Cgroup("1", str(files(tmp_path / "old-kernel"))).freeze(True)  # no cgroup.freeze


def test_kill_uses_cgroup_kill_where_there_is_one(tmp_path: Path) -> None:
    d = files(tmp_path / "1", {"cgroup.kill": ""})
    V2Cgroup("1", str(d)).kill()
    assert control(d, "cgroup.kill") == "1"


def test_v1_kill_freezes_kills_each_process_and_thaws(tmp_path: Path) -> None:
    dirs = v1_dirs(tmp_path)
    below = files(Path(dirs["freezer"]) / "nested", {"freezer.state": "FROZEN"})  # the service's own
    child = subprocess.Popen(["sleep", "60"])
    try:
        (Path(dirs["memory"]) / "cgroup.procs").write_text(f"{child.pid}\n")
        V1Cgroup("1", dirs).kill()
        assert child.wait(timeout=10) == -9
    finally:
        child.kill()
        child.wait()
    assert control(Path(dirs["freezer"]), "freezer.state") == "THAWED"
    assert control(below, "freezer.state") == "THAWED"  # a frozen task dies only once thawed


# --- placement ----------------------------------------------------------------------------------


def test_v2_places_a_process_by_cloning_it_into_the_directory(tmp_path: Path) -> None:
    d = files(tmp_path / "1", {"cgroup.procs": ""})
    place = V2Cgroup("1", str(d)).placement()
    assert place.cgroup_fd is not None and place.procs == ()
    try:
        assert os.fstat(place.cgroup_fd).st_ino == d.stat().st_ino
    finally:
        place.close()
    assert place.cgroup_fd is None


def test_v2_places_a_plain_fork_through_cgroup_procs(tmp_path: Path) -> None:
    d = files(tmp_path / "1", {"cgroup.procs": ""})
    place = V2Cgroup("1", str(d)).placement(clone=False)
    assert place.cgroup_fd is None
    assert place.procs == (f"{d}/cgroup.procs",)
    # Where the directory cannot be opened, a clone falls back to the move too.
    gone = V2Cgroup("2", str(tmp_path / "2")).placement()
    assert gone.cgroup_fd is None and gone.procs == (f"{tmp_path / '2'}/cgroup.procs",)


def test_v1_places_through_each_hierarchy_once_and_hybrid_through_cgroup2_too(tmp_path: Path) -> None:
    dirs = v1_dirs(tmp_path)
    expected = tuple(f"{dirs[c]}/cgroup.procs" for c in ("memory", "cpu", "pids", "freezer"))
    v1 = V1Cgroup("1", dirs).placement()  # cpu and cpuacct share a directory: written once
    assert v1.cgroup_fd is None and v1.procs == expected
    unified = str(files(tmp_path / "unified" / "1"))
    hybrid = HybridCgroup("1", dirs, unified).placement()  # controller-less: no clone3 into it
    assert hybrid.cgroup_fd is None and hybrid.procs == (*expected, f"{unified}/cgroup.procs")


def test_a_placement_enters_by_writing_zero_or_hands_its_files_over_opened(tmp_path: Path) -> None:
    dirs = v1_dirs(tmp_path)
    for d in set(dirs.values()):
        (Path(d) / "cgroup.procs").write_text("")
    place = V1Cgroup("1", dirs).placement()
    place.enter()  # "0": the writing process itself
    assert {control(Path(d), "cgroup.procs") for d in dirs.values()} == {"0"}
    fds = place.open_procs()
    try:
        assert len(fds) == len(place.procs)
        for fd in fds:
            assert os.get_inheritable(fd) is False
            os.write(fd, b"7")
    finally:
        for fd in fds:
            os.close(fd)
    assert {control(Path(d), "cgroup.procs") for d in dirs.values()} == {"7"}
    assert cgroups.NOWHERE.cgroup_fd is None and cgroups.NOWHERE.procs == ()


def test_open_procs_leaves_no_fd_open_when_one_file_cannot_be_opened(tmp_path: Path) -> None:
    ok = files(tmp_path / "a", {"cgroup.procs": ""})
    place = cgroups.Placement(procs=(f"{ok}/cgroup.procs", f"{tmp_path}/missing/cgroup.procs"))
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(FileNotFoundError):
        place.open_procs()
    assert set(os.listdir("/proc/self/fd")) == before


# --- choosing a backend, and none ---------------------------------------------------------------


def fake_v1_host(tmp_path: Path, controllers: tuple[str, ...] = ("memory", "cpu", "cpuacct", "pids"),
                 unified: str | None = None) -> CgroupHost:  # fmt: skip
    own = {c: str(files(tmp_path / ("cpu,cpuacct" if c in ("cpu", "cpuacct") else c) / "own"))
           for c in controllers}  # fmt: skip
    return CgroupHost("hybrid" if unified else "v1", own, unified)


def test_a_v1_run_gets_a_directory_in_each_hierarchy_and_removes_them_all(tmp_path: Path) -> None:
    host = fake_v1_host(tmp_path)
    tree = CgroupTree(host, "envbox-1-2")
    assert type(tree.backend) is V1Backend and tree.problem is None
    runs = sorted({os.path.join(d, "envbox-1-2") for d in host.v1.values()})
    assert sorted(tree.backend.run_dirs()) == runs and all(os.path.isdir(d) for d in runs)
    cg = tree.new()
    assert isinstance(cg, V1Cgroup) and sorted(cg.directories()) == [f"{r}/1" for r in runs]
    tree.adopt("env/db", cg)
    assert tree.service("env/db") is cg
    tree.remove()
    assert not any(os.path.exists(d) for d in runs)


def test_a_hybrid_run_uses_cgroup2_where_it_can_make_a_directory_there(tmp_path: Path) -> None:
    unified = files(tmp_path / "unified" / "own")
    tree = CgroupTree(fake_v1_host(tmp_path, unified=str(unified)), "envbox-1-2")
    assert type(tree.backend) is HybridBackend
    cg = tree.new()
    assert isinstance(cg, HybridCgroup) and cg.unified == f"{unified}/envbox-1-2/1"
    tree.remove()
    assert not (unified / "envbox-1-2").exists()
    # A cgroup2 mount without room for us (read-only, another's): the v1 backend alone.
    tree = CgroupTree(fake_v1_host(tmp_path, unified=str(tmp_path / "nowhere")), "envbox-1-3")
    assert type(tree.backend) is V1Backend
    tree.remove()


def test_a_missing_controller_disables_cgroups_and_leaves_no_directory(tmp_path: Path) -> None:
    host = fake_v1_host(tmp_path, controllers=("memory", "cpu", "cpuacct"))
    tree = CgroupTree(host, "envbox-1-2")
    assert isinstance(tree.backend, DisabledBackend)
    assert tree.problem is not None and "pids not mounted" in tree.problem
    assert not any(os.path.exists(os.path.join(d, "envbox-1-2")) for d in host.v1.values())


def test_without_cgroups_every_operation_raises_the_explanation_or_does_nothing() -> None:
    tree = CgroupTree(CgroupHost("none"), "envbox-1-2")
    why = tree.problem
    assert why is not None and why.startswith("cgroups cannot be used here: no cgroup filesystem")
    assert "To fix:" in why
    with pytest.raises(CgroupsUnavailable) as e:
        tree.new()
    assert str(e.value) == why
    tree.check_limits()  # nothing declared: nothing to refuse
    tree.check_limits(memory=None, cpu=None, pids=None)
    with pytest.raises(CgroupsUnavailable, match="no cgroup filesystem"):
        tree.check_limits(pids=8)
    with pytest.raises(CgroupsUnavailable, match="no cgroup filesystem"):
        tree.service("env/db")
    tree.release("env/db")
    tree.remove()
    assert tree.backend.run_dirs() == [] and not tree.backend.can_freeze()


def test_a_service_without_a_cgroup_on_a_host_with_cgroups_says_so(tmp_path: Path) -> None:
    tree = CgroupTree(fake_v1_host(tmp_path), "envbox-1-2")
    with pytest.raises(CgroupsUnavailable, match="the service has no cgroup"):
        tree.service("env/db")
    tree.remove()


@pytest.mark.parametrize(
    ("version", "err", "says"),
    [("v2", errno.EROFS, ["read-only", "--privileged"]),
     ("v1", errno.EACCES, ["may not create cgroups", "run the tests as root"]),
     ("v2", errno.EBUSY, ["no internal processes", "Delegate=yes"]),
     ("v2", errno.ENOENT, ["subtree_control", "mount their hierarchies"])],
)  # fmt: skip
def test_the_disabled_backend_says_why_and_how_to_fix_it(version: str, err: int, says: list[str]) -> None:
    host = CgroupHost(version, unified="/sys/fs/cgroup/test.scope")
    backend = DisabledBackend.from_error(host, OSError(err, os.strerror(err)))
    assert backend.problem.startswith("cgroups cannot be used here: ")
    assert "found " + host.describe() in backend.problem
    for text in says:
        assert text in backend.problem


# --- run names ----------------------------------------------------------------------------------


def test_a_run_is_stale_once_its_supervisor_is_gone() -> None:
    assert cgroups.run_name(os.getpid()).startswith(f"envbox-{os.getpid()}-")
    assert not cgroups.is_stale(cgroups.run_name(os.getpid()))
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        name = cgroups.run_name(child.pid)
        assert not cgroups.is_stale(name)
    finally:
        child.kill()
        child.wait()
    assert cgroups.is_stale(name)
    assert not cgroups.is_stale("envbox-tests")  # not a run of ours: never touched
