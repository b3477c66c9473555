"""What a service, as root inside, can do to the files the sandbox gives it: the host's device
nodes (nothing), its private tmpfs (fill them up to their cap, no further) and /sys (read its own
network devices and cgroup, nothing of the host's). Each attack runs from inside the service."""

from __future__ import annotations

import json
import os
import sys
import textwrap
from collections.abc import Iterator

import pytest

from pytest_envbox import Environment, Service
from pytest_envbox.wait import Deadline, wait_until
from tests.conftest import cgroups_problem

PY = sys.executable
NODES = ("null", "zero", "full", "random", "urandom", "tty")
MiB = 1 << 20


def run(env: Environment, code: str, service: str = "box") -> dict:  # type: ignore[type-arg]
    r = env[service].exec([PY, "-c", textwrap.dedent(code)], timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.splitlines()[-1])  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def env() -> Iterator[Environment]:
    limits = {} if cgroups_problem() else {"memory": "96Mi"}  # none rootless on cgroup v1
    box = Service("box", ["sleep", "1000"], limits=limits,
                  tmpfs={"/tmp": "8Mi", "/var/cache/app": "4Mi", "~": "16Mi"})  # fmt: skip
    with Environment([box]) as e:
        yield e


# --- item: the host's device nodes --------------------------------------------------------------


def test_root_inside_cannot_chmod_chown_or_touch_the_hosts_device_nodes(env: Environment) -> None:
    before = {n: os.stat(f"/dev/{n}") for n in NODES}
    # Each change sets what the node has now (its mode, owner, mtime): harmless even where it
    # succeeds (the old code), which the host's ctime then shows.
    out = run(env, f"""
        import errno, json, os
        out = {{}}
        for n in {NODES!r}:
            p = "/dev/" + n
            st = os.stat(p)
            for what, change in (("chmod", lambda: os.chmod(p, st.st_mode & 0o7777)),
                                 ("chown", lambda: os.chown(p, st.st_uid, st.st_gid)),
                                 ("utime", lambda: os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns)))):
                try:
                    change()
                    out[n + "." + what] = "ok"
                except OSError as e:
                    out[n + "." + what] = errno.errorcode[e.errno]
        with open("/dev/null", "w") as f:
            out["null.write"] = f.write("x" * 4096)
        with open("/dev/zero", "rb") as f:
            out["zero.read"] = f.read(8).hex()
        with open("/dev/urandom", "rb") as f:
            out["urandom.read"] = len(f.read(16))
        print(json.dumps(out))
    """)
    changes = ("chmod", "chown", "utime")
    tried = {k: v for k, v in out.items() if k.split(".")[1] in changes}
    assert tried == {f"{n}.{w}": "EROFS" for n in NODES for w in changes}
    assert out["null.write"] == 4096 and out["zero.read"] == "00" * 8 and out["urandom.read"] == 16
    after = {n: os.stat(f"/dev/{n}") for n in NODES}
    for n in NODES:
        assert (after[n].st_mode, after[n].st_uid, after[n].st_ctime_ns) == \
            (before[n].st_mode, before[n].st_uid, before[n].st_ctime_ns), n


def test_dev_is_a_small_private_tmpfs(env: Environment) -> None:
    mounts = env["box"].exec(["cat", "/proc/self/mountinfo"]).stdout.splitlines()
    dev = [ln for ln in mounts if ln.split()[4] == "/dev"][-1]
    assert " - tmpfs " in dev and "size=65536k" in dev and "nodev" in dev.split()[5], dev
    for n in NODES:  # each node a read-only bind
        node = [ln for ln in mounts if ln.split()[4] == f"/dev/{n}"][-1]
        assert node.split()[5].startswith("ro,"), node


# --- item: capped tmpfs ---------------------------------------------------------------------------


def _mount_options(env: Environment, service: str = "box") -> dict[str, str]:
    """Mount point -> super options of the topmost mount there."""
    out: dict[str, str] = {}
    for ln in env[service].exec(["cat", "/proc/self/mountinfo"]).stdout.splitlines():
        fields = ln.split()
        out[fields[4]] = fields[-1]
    return out


def test_every_private_tmpfs_has_a_size_and_inode_cap(env: Environment) -> None:
    with Environment([Service("other", ["sleep", "1000"])]) as plain:
        opts = _mount_options(plain, "other")  # the defaults
    expect = {"/tmp": 512, "/var/tmp": 512, "/home/envbox": 512, "/run": 64, "/dev/shm": 64,
              "/dev": 64}  # fmt: skip
    for path, mib in expect.items():
        if path == "/var/tmp" and not os.path.isdir("/var/tmp"):
            continue
        assert f"size={mib * 1024}k" in opts[path] and "nr_inodes=" in opts[path], (path, opts[path])
    opts = _mount_options(env)  # as declared
    assert "size=8192k,nr_inodes=2048" in opts["/tmp"], opts["/tmp"]
    assert "size=16384k" in opts["/home/envbox"], opts["/home/envbox"]
    assert "size=4096k" in opts["/var/cache/app"], opts["/var/cache/app"]


@pytest.mark.parametrize(("path", "cap"), [("/tmp", 8), ("/var/cache/app", 4), ("/home/envbox", 16)])
def test_writing_past_a_tmpfs_cap_fails_with_enospc(env: Environment, path: str, cap: int) -> None:
    # Writes at most the cap plus one MiB, in 1 MiB chunks: bounded in size and time.
    out = run(env, f"""
        import errno, json, os
        written, err = 0, None
        fd = os.open({path!r} + "/fill", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        chunk = b"x" * (1 << 20)
        try:
            for _ in range({cap} + 1):
                written += os.write(fd, chunk)
        except OSError as e:
            err = errno.errorcode[e.errno]
        os.close(fd)
        st = os.statvfs({path!r})
        os.unlink({path!r} + "/fill")
        print(json.dumps({{"written": written, "err": err, "mode": oct(os.stat({path!r}).st_mode & 0o7777),
                          "size": st.f_blocks * st.f_frsize}}))
    """)
    assert out["err"] == "ENOSPC", out
    assert out["written"] <= cap * MiB and out["size"] == cap * MiB, out
    if path == "/var/cache/app":  # a new tmpfs: writable by every user, as Docker's --tmpfs
        assert out["mode"] == "0o1777"


def test_a_tmpfs_with_more_inodes_than_its_cap_fails_with_enospc(env: Environment) -> None:
    out = run(env, """
        import errno, json, os
        made, err = 0, None
        try:
            while made < 5000:  # 4Mi: 1024 inodes
                os.close(os.open(f"/var/cache/app/f{made}", os.O_WRONLY | os.O_CREAT, 0o600))
                made += 1
        except OSError as e:
            err = errno.errorcode[e.errno]
        for i in range(made):
            os.unlink(f"/var/cache/app/f{i}")
        print(json.dumps({"made": made, "err": err}))
    """)
    assert out["err"] == "ENOSPC" and out["made"] < 1024, out


@pytest.mark.needs_cgroups
def test_tmpfs_files_count_in_the_services_memory(env: Environment) -> None:
    box = env["box"]
    r = box.exec(["sh", "-c", "head -c 12582912 /dev/zero > ~/twelve && echo written"])
    assert r.stdout.strip() == "written", r
    with_file = box.stats().memory_bytes
    assert with_file >= 12 * MiB, box.stats()
    box.exec(["rm", "/home/envbox/twelve"])
    # Removing the file gives its 12 MiB back to the cgroup: they were charged to the service.
    freed = wait_until(lambda: with_file - box.stats().memory_bytes >= 11 * MiB or None, Deadline(5))
    assert freed, (with_file, box.stats())


# --- item: /sys -----------------------------------------------------------------------------------


def test_sys_lists_only_the_services_own_network_devices(env: Environment) -> None:
    assert sorted(env["box"].exec(["ls", "/sys/class/net"]).stdout.split()) == ["eth0", "lo"]


def test_sys_fs_cgroup_shows_the_services_own_cgroup_and_no_other(env: Environment) -> None:
    box = env["box"]
    listing = box.exec(["find", "/sys/fs/cgroup", "-mindepth", "1", "-type", "d"]).stdout.split()
    if cgroups_problem():  # no cgroup of its own: an empty tmpfs, nothing of the host's
        assert listing == [] and box.exec(["ls", "-A", "/sys/fs/cgroup"]).stdout == ""
        return
    # The roots of the controllers only: not one cgroup below (no other run's, no host's).
    assert all(d.count("/") == 4 for d in listing), listing
    v2 = box.exec(["test", "-e", "/sys/fs/cgroup/memory.max"]).returncode == 0
    if v2:
        limit = box.exec(["cat", "/sys/fs/cgroup/memory.max"]).stdout
    else:
        limit = box.exec(["cat", "/sys/fs/cgroup/memory/memory.limit_in_bytes"]).stdout
    assert int(limit) == 96 * MiB
    assert box.exec(["cat", "/sys/fs/cgroup/" + ("" if v2 else "pids/") + "cgroup.procs"]).stdout.split()


def test_sys_is_read_only_a_sysfs_and_masks_firmware(env: Environment) -> None:
    box = env["box"]
    r = box.exec(["sh", "-c", "touch /sys/x; mkdir /sys/fs/cgroup/x; ls -A /sys/firmware | wc -l"])
    assert r.stderr.count("Read-only file system") == 2, r
    assert r.stdout.strip() == "0"


def test_a_restarted_service_sees_its_own_network_devices_in_sys() -> None:
    with Environment([Service("again", ["sleep", "1000"])]) as e:
        h = e["again"]
        h.restart()  # back into its network namespace, after its spare mounted /sys in another
        assert sorted(h.exec(["ls", "/sys/class/net"]).stdout.split()) == ["eth0", "lo"]
        assert h.exec(["ls", "/sys/fs/cgroup"]).returncode == 0
