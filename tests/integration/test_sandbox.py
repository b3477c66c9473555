"""What a service sees from inside its sandbox, checked with a real process reporting it."""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import struct
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_envbox import ConfigError, Environment, Service, probe

HERE = Path(__file__).parent
CAP_SYS_ADMIN = 21


@pytest.fixture(scope="module")
def host_secrets() -> Iterator[tuple[str, int]]:
    """A file in the host's /tmp and a listener on the host's loopback, both off limits."""
    secret = Path("/tmp") / f"envbox-host-secret-{os.getpid()}"
    secret.write_text("host only")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    os.environ["ENVBOX_TEST_LEAK"] = "must not leak"
    os.environ["ENVBOX_TEST_PASSED"] = "passed through"
    yield str(secret), listener.getsockname()[1]
    listener.close()
    secret.unlink()


def _inspector(name: str, secrets: tuple[str, int], **kw: object) -> Service:
    return Service(name, [sys.executable, str(HERE / "inspect_service.py"), secrets[0],
                          str(secrets[1])], ready=probe.log("^REPORT "), **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def views(host_secrets: tuple[str, int]) -> Iterator[dict[str, dict]]:  # type: ignore[type-arg]
    services = [
        _inspector("inspect", host_secrets, pass_env=["ENVBOX_TEST_PASS*"], env={"MINE": "1"}),
        # A shell, not Python: the interpreter may live where "nobody" may not read (/root).
        Service("nobody-svc", ["sh", "-c", NOBODY_SCRIPT], user="nobody", ready=probe.log("^REPORT")),
    ]
    with Environment(services) as env:
        line = env["inspect"].wait_for_log("^REPORT (.*)$", timeout=10).group(1)
        out = {"inspect": json.loads(line)}
        line = env["nobody-svc"].wait_for_log("^REPORT (.*)$", timeout=10).group(1)
        out["nobody-svc"] = json.loads(line)
        out["subnet"] = {"network": env.network.subnet}
        yield out


NOBODY_SCRIPT = r"""
home=$( (touch "$HOME/x" && touch /tmp/x && echo ok) 2>/dev/null || echo denied)
capeff=$(sed -n 's/^CapEff:[[:space:]]*//p' /proc/self/status)
printf 'REPORT {"uid": %s, "gid": %s, "groups": [%s], "writable": "%s", "capeff": "%s"}\n' \
  "$(id -u)" "$(id -g)" "$(id -G | tr ' ' ',')" "$home" "$capeff"
exec sleep 1000
"""


def test_sees_only_its_own_processes_under_an_init(views: dict[str, dict]) -> None:  # type: ignore[type-arg]
    v = views["inspect"]
    assert v["pid"] == 2
    assert v["pids"] == [1, 2]


def test_hostname_is_the_service_name(views: dict[str, dict]) -> None:  # type: ignore[type-arg]
    assert views["inspect"]["hostname"] == "inspect"
    assert views["inspect"]["etc_hostname"] == "inspect"
    assert "inspect" in views["inspect"]["etc_hosts"]


def test_host_filesystem_is_read_only_tmp_and_home_are_private(views: dict[str, dict]) -> None:  # type: ignore[type-arg]
    w = views["inspect"]["writable"]
    assert w["/"] == "EROFS"
    assert w["/usr"] == "EROFS"
    assert w["/etc"] == "EROFS"
    assert w[views["inspect"]["cwd"]] == "EROFS"
    assert w["/tmp"] == "ok"
    assert w["/home/envbox"] == "ok"
    assert w["/dev/shm"] == "ok"
    assert w["/run"] == "ok"
    assert views["inspect"]["host_file_visible"] is False


def test_no_host_variable_leaks_in(views: dict[str, dict]) -> None:  # type: ignore[type-arg]
    env = views["inspect"]["env"]
    assert env.pop("PATH") == os.environ["PATH"]
    assert env == {
        "HOME": "/home/envbox",
        "HOSTNAME": "inspect",
        "LANG": "C.UTF-8",
        "TMPDIR": "/tmp",
        "MINE": "1",
        "ENVBOX_TEST_PASSED": "passed through",
    }


def test_only_stdio_fds_at_exec(views: dict[str, dict]) -> None:  # type: ignore[type-arg]
    fds = views["inspect"]["fds"]
    assert sorted(int(fd) for fd in fds) == [0, 1, 2]
    assert fds["0"] == "/dev/null"


def test_no_new_privileges_and_no_cap_sys_admin(views: dict[str, dict]) -> None:  # type: ignore[type-arg]
    st = views["inspect"]["status"]
    assert st["NoNewPrivs"] == "1"
    bounding = int(st["CapBnd"], 16)
    assert not bounding & (1 << CAP_SYS_ADMIN)
    for cap in (12, 16, 19):  # NET_ADMIN, SYS_MODULE, SYS_PTRACE
        assert not bounding & (1 << cap)
    assert int(st["CapInh"], 16) == 0
    assert int(st["CapAmb"], 16) == 0
    assert int(views["nobody-svc"]["capeff"], 16) == 0


def test_no_route_out_and_host_loopback_unreachable(views: dict[str, dict]) -> None:  # type: ignore[type-arg]
    v = views["inspect"]
    # IPv4: the environment's subnet on eth0, nothing else (no default route, no way beyond).
    routes = set()
    for line in v["routes"]:
        iface, dest, _gw, _flags, _r, _u, _m, mask = line.split()[:8]
        addr = [socket.inet_ntoa(struct.pack("<I", int(x, 16))) for x in (dest, mask)]
        routes.add((iface, *addr))
    net = ipaddress.IPv4Network(views["subnet"]["network"])
    assert routes == {("eth0", str(net.network_address), str(net.netmask))}
    # IPv6: link-local and multicast on eth0 only; no default route (::/0).
    assert not [r for r in v["routes6"] if r.split()[0] == "0" * 32 and r.split()[1] == "00"]
    assert all(r.split()[0].startswith(("fe80", "ff")) for r in v["routes6"]), v["routes6"]
    assert v["host_loopback"] == "ECONNREFUSED"


def test_minimal_dev(views: dict[str, dict]) -> None:  # type: ignore[type-arg]
    assert set(views["inspect"]["dev"]) == {
        "null", "zero", "full", "random", "urandom", "tty", "pts", "ptmx", "shm",
        "fd", "stdin", "stdout", "stderr",
    }  # fmt: skip


def test_user_switching_with_groups(views: dict[str, dict]) -> None:  # type: ignore[type-arg]
    import pwd

    nobody = pwd.getpwnam("nobody")
    v = views["nobody-svc"]
    assert (v["uid"], v["gid"]) == (nobody.pw_uid, nobody.pw_gid)
    assert sorted(v["groups"]) == sorted(set(os.getgrouplist("nobody", nobody.pw_gid)))
    assert v["writable"] == "ok"  # HOME and /tmp belong to the service's user


def test_service_runs_in_a_new_session(views: dict[str, dict]) -> None:  # type: ignore[type-arg]
    assert views["inspect"]["session_leader"] is True


def test_a_host_program_runs_as_user_and_group_by_name() -> None:
    """``user = "nobody:nogroup"``, as Docker writes ``--user``: that group alone."""
    import grp
    import pwd

    try:
        gid = grp.getgrnam("nogroup").gr_gid
    except KeyError:
        pytest.skip("no nogroup group on this host")
    svc = Service("n", ["sh", "-c", "echo $(id -u) $(id -g) $(id -G); exec sleep 1000"],
                  user="nobody:nogroup", ready=probe.log(r"^\d"))  # fmt: skip
    with Environment([svc]) as env:
        assert env["n"].logs().split() == [str(pwd.getpwnam("nobody").pw_uid), str(gid), str(gid)]
    with pytest.raises(ConfigError, match="no group 'no-such-group' on this host"):
        Environment([Service("n", ["true"], user="nobody:no-such-group")]).open()
