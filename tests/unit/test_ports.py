"""Published ports as declared (pytest_envbox/ports.py): every form of a host port, and every
mistake a ConfigError naming the service, the key and the fix, before anything starts."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from pytest_envbox import ConfigError, Service
from pytest_envbox.config import load_project_config, select
from pytest_envbox.engine.hostports import taken_reason
from pytest_envbox.kernel.portholders import Holder, holders
from pytest_envbox.supervisor.hostports import HostPorts
from pytest_envbox.supervisor.protocol import ReserveRequest


def svc(ports: object, **kw: object) -> Service:
    return Service("cache", ["redis-server"], ports=ports, **kw)  # type: ignore[arg-type]


# --- the forms ----------------------------------------------------------------------------------


def test_an_int_publishes_on_a_free_host_port_as_before() -> None:
    s = svc([6379, 80])
    assert s.ports == (6379, 80) and s.host_ports == {}


@pytest.mark.parametrize(("entry", "port", "host"), [
    ({"port": 6379, "host": 6379}, 6379, (6379, 6379)),
    ({"port": 80, "host": 8080}, 80, (8080, 8080)),
    ({"port": 80, "host": "8000-8010"}, 80, (8000, 8010)),
    ({"port": 80, "host": "8080"}, 80, (8080, 8080)),
    ({"port": 80, "host": " 8000 - 8010 "}, 80, (8000, 8010)),
    ("6379:6379", 6379, (6379, 6379)),
    ("8080:80", 80, (8080, 8080)),
    ("8000-8010:80", 80, (8000, 8010)),
    ("8080:80/tcp", 80, (8080, 8080)),
    ("1024-1024:80", 80, (1024, 1024)),
])  # fmt: skip
def test_a_host_port_or_range_is_kept_beside_the_port(entry: object, port: int, host: tuple[int, int]
                                                      ) -> None:  # fmt: skip
    s = svc([entry])
    assert s.ports == (port,) and s.host_ports == {port: host}


def test_a_table_without_host_is_a_free_host_port() -> None:
    s = svc([{"port": 6379}])
    assert s.ports == (6379,) and s.host_ports == {}


def test_ranges_on_both_sides_map_pairwise() -> None:
    s = svc(["7000-7002:7100-7102"])
    assert s.ports == (7100, 7101, 7102)
    assert s.host_ports == {7100: (7000, 7000), 7101: (7001, 7001), 7102: (7002, 7002)}


def test_forms_mix_and_keep_their_order() -> None:
    s = svc([6379, {"port": 6380, "host": 6380}, {"port": 80, "host": "8000-8010"}, "5432:5432"])
    assert s.ports == (6379, 6380, 80, 5432)  # url() still uses the first
    assert s.host_ports == {6380: (6380, 6380), 80: (8000, 8010), 5432: (5432, 5432)}


@pytest.mark.parametrize("given", [{80: 8080}, {80: "8080"}, {80: (8080, 8080)}, {80: [8080, 8080]}])
def test_host_ports_may_be_given_apart_in_python(given: object) -> None:
    assert svc([80], host_ports=given).host_ports == {80: (8080, 8080)}


def test_a_host_in_an_entry_wins_over_host_ports() -> None:
    assert svc(["9090:80"], host_ports={80: 8080}).host_ports == {80: (9090, 9090)}


def test_toml_takes_every_form(tmp_path: Path) -> None:
    (tmp_path / "envbox.toml").write_text(
        '[services.cache]\ncommand = "redis-server"\n'
        'ports = [6379, { port = 6380, host = 6380 }, { port = 80, host = "8000-8010" }, '
        '"7000-7001:7000-7001", "9000-9010:90"]\n'
    )
    s = load_project_config(tmp_path).services["cache"]
    assert s.ports == (6379, 6380, 80, 7000, 7001, 90)
    assert s.host_ports == {6380: (6380, 6380), 80: (8000, 8010), 7000: (7000, 7000),
                            7001: (7001, 7001), 90: (9000, 9010)}  # fmt: skip


def test_equality_hash_and_repr_count_the_host_ports() -> None:
    a, b = svc([{"port": 80, "host": 8080}]), svc(["8080:80"])
    assert a == b and hash(a) == hash(b)
    assert a != svc([80]) and a != svc(["8081:80"])
    assert "host_ports={80: (8080, 8080)}" in repr(a)
    assert {a: 1}[b] == 1


def test_with_changes_keeps_the_host_ports_of_the_ports_still_listed() -> None:
    s = svc([6379, {"port": 80, "host": 8080}])
    assert s.with_changes(env={"A": "1"}).host_ports == {80: (8080, 8080)}
    assert s.with_changes(ports=[80, 81]).host_ports == {80: (8080, 8080)}
    assert s.with_changes(ports=[6379]).host_ports == {}  # 80 is gone, and its host port
    assert s.with_changes(ports=["9090:80"]).host_ports == {80: (9090, 9090)}
    assert s.with_changes(host_ports={}).host_ports == {}  # every port on a free host port
    assert s.with_changes(ports=[81], host_ports={81: "9000-9001"}).host_ports == {81: (9000, 9001)}


# --- the mistakes ------------------------------------------------------------------------------


@pytest.mark.parametrize(("ports", "key", "message"), [
    ([{"port": 0, "host": 80}], "ports[0].port", "0 (an int) is not a port; use an int from 1 to 65535"),
    ([{"host": 80}], "ports[0].port", "is missing; write the entry as { port = 6379, host = 6379 }"),
    ([{"port": 80, "hots": 80}], "ports[0].hots", "did you mean 'host'?"),
    ([{"port": 80, "host": 0}], "ports[0].host", "0 is not a host port; use an int from 1 to 65535"),
    ([{"port": 80, "host": 70000}], "ports[0].host", "70000 is not a host port; use an int from 1"),
    ([{"port": 80, "host": True}], "ports[0].host", "True (a bool) is not a host port; use an int"),
    ([{"port": 80, "host": 8.5}], "ports[0].host",
     'not a host port; use an int like 8080 or a range like "8000-8010"'),
    ([{"port": 80, "host": "8010-8000"}], "ports[0].host",
     "'8010-8000' is backwards; write the low end first: '8000-8010'"),
    ([{"port": 80, "host": "80a"}], "ports[0].host",
     "'80a' is not a host port or range ('8000-8010'); use an int from 1 to 65535"),
    ([{"port": 80, "host": "0-10"}], "ports[0].host", "'0' is not a host port or range"),
    ([{"port": 80, "host": (1, 2, 3)}], "ports[0].host", "is not a host port"),
    ([{"port": 80, "host": "8000-70000"}], "ports[0].host", "'70000' is not a host port or range"),
    (["80"], "ports[0]", "'80' (a str) is not a port; use an int from 1 to 65535, or write \"HOST:80\""),
    (["abc:80"], "ports[0]", "'abc' is not a host port or range"),
    (["8080:0"], "ports[0]", "'0' is not a port or port range; use an int from 1 to 65535"),
    (["8080:x"], "ports[0]", "'x' is not a port or port range"),
    (["127.0.0.1:8080:80"], "ports[0]",
     "names a host address; ports are published on 127.0.0.1 only: write '8080:80'"),
    (["53:53/udp"], "ports[0]", "is a UDP port; only TCP ports are published"),
    ([":80"], "ports[0]", "has no host port; write 80 as an int for a free host port"),
    (["8080:80-82"], "ports[0]",
     "maps 3 ports onto 1 host ports; a port range needs a host range of the same length, "
     "e.g. '80-82:80-82'"),
    (["8000-8001:80-82"], "ports[0]", "maps 3 ports onto 2 host ports"),
    (["9000-9001:82-80"], "ports[0]", "'82-80' is backwards"),
    ([1.5], "ports[0]",
     "1.5 (a float) is not a port; write 6379 (a free host port), { port = 6379, host = 6379 }"),
    ([80, "8080:80"], "ports[1]", "80 is listed twice; list it once"),
    (["79-81:79-81", 80], "ports[1]", "80 is listed twice"),
    ([{"port": 80, "host": 8080}, {"port": 81, "host": 8080}], "ports[1].host",
     "host port 8080 is given to port 80 already; give each port its own host port, or a range"),
    (["8080:80", "8080:81"], "ports[1]", "host port 8080 is given to port 80 already"),
    (["8080-8081:80-81", {"port": 82, "host": 8081}], "ports[1].host", "host port 8081 is given to port 81"),
])  # fmt: skip
def test_a_bad_port_entry_names_the_key_and_the_fix(ports: object, key: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        svc(ports)
    assert (info.value.service, info.value.key) == ("cache", key)
    assert message in str(info.value)


def test_ranges_may_overlap_and_a_fixed_port_may_sit_in_a_range() -> None:
    s = svc([{"port": 80, "host": "8000-8010"}, {"port": 81, "host": "8000-8010"}, "8005:82"])
    assert s.host_ports == {80: (8000, 8010), 81: (8000, 8010), 82: (8005, 8005)}


@pytest.mark.parametrize(("given", "key", "message"), [
    ({6379: 6379}, "host_ports[6379]",
     "6379 has a host port but is not in ports; add it to ports, or remove it"),
    ({80: 0}, "host_ports[80]", "0 is not a host port"),
    ({"80": 8080}, "host_ports['80']", "'80' (a str) is not a port"),
    ([80], "host_ports", "is not a table"),
])  # fmt: skip
def test_bad_host_ports_name_the_key(given: object, key: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        svc([80], host_ports=given)
    assert (info.value.service, info.value.key) == ("cache", key)
    assert message in str(info.value)


def test_a_bad_entry_in_toml_names_the_file_and_the_key(tmp_path: Path) -> None:
    (tmp_path / "envbox.toml").write_text(
        '[services.api]\ncommand = "x"\nports = [{ port = 80, host = "9-1" }]\n')
    with pytest.raises(ConfigError) as info:
        load_project_config(tmp_path)
    assert (info.value.service, info.value.key) == ("api", "ports[0].host")
    assert "backwards" in str(info.value) and "envbox.toml" in str(info.value)


def test_host_ports_is_no_toml_key(tmp_path: Path) -> None:
    (tmp_path / "envbox.toml").write_text('[services.api]\ncommand = "x"\nhost_ports = { 80 = 80 }\n')
    with pytest.raises(ConfigError, match="unknown key 'host_ports'"):
        load_project_config(tmp_path)


def test_one_fixed_host_port_for_two_services_of_an_environment_is_refused() -> None:
    a = Service("a", ["x"], ports=["8080:80"])
    b = Service("b", ["x"], ports=[81, {"port": 80, "host": 8080}])
    with pytest.raises(ConfigError) as info:
        select_services([a, b])
    assert (info.value.service, info.value.key) == ("b", "ports[1].host")
    assert ("host port 8080 (for port 80) is also given to service 'a' (for its port 80) in this "
            'environment; give one of them another host port, a range like "8080-8090", or none'
            ) in str(info.value)  # fmt: skip


def test_two_services_may_share_a_host_range() -> None:
    a = Service("a", ["x"], ports=["8000-8010:80"])
    b = Service("b", ["x"], ports=["8000-8010:80", "8005:81"])
    assert [s.name for s in select_services([a, b])] == ["a", "b"]


def select_services(services: list[Service]) -> list[Service]:
    from pytest_envbox.config import Catalog

    return select(Catalog(), list(services))


# --- who holds a port (kernel/portholders.py) ---------------------------------------------------


def test_the_holder_of_a_port_is_found_from_proc() -> None:
    wildcards = ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::"))
    for family, address in wildcards:
        with socket.socket(family) as s:
            s.bind((address, 0))
            s.listen()
            [h] = holders(s.getsockname()[1])
            assert (h.pid, h.uid, h.listening) == (os.getpid(), os.getuid(), True), address
            assert h.comm and "python" in h.cmdline


def test_a_holder_is_named_as_well_as_this_process_may_know_it() -> None:
    from pytest_envbox.engine.hostports import _who

    assert _who(Holder(65534, True), supervisor=1) == "a process of another user (uid 65534, nobody)"
    assert _who(Holder(4242424, True), supervisor=1) == "a process of another user (uid 4242424, 4242424)"
    mine = _who(Holder(os.getuid(), True), supervisor=1)
    assert mine.startswith("a socket of user ") and "that no process here shows" in mine
    shown = _who(Holder(0, True, 77, "redis-server", "redis-server  *:6379\n" + "x" * 200), 1)
    assert shown.startswith("pid 77 (redis-server, user root): redis-server *:6379 xxx")
    assert shown.endswith("...") and len(shown) < 140
    assert _who(Holder(0, True, 9, "python3", "python3 -c ... pytest_envbox.supervisor.server"), 9) == (
        "this test process's own envbox supervisor (pid 9): another environment open at the same "
        "time publishes it")  # fmt: skip


def test_a_port_held_elsewhere_has_no_holder() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.2", 0))  # another loopback address: no obstacle to 127.0.0.1
        s.listen()
        assert holders(s.getsockname()[1]) == []


# --- the supervisor's reservation (supervisor/hostports.py), on real sockets of 127.0.0.1 ------


def _free_ports(n: int) -> list[int]:
    """n ports free at the moment on 127.0.0.1 (bound, then let go)."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _host_ports() -> HostPorts:
    from types import SimpleNamespace

    return HostPorts(SimpleNamespace(services=SimpleNamespace(slots={})))  # type: ignore[arg-type]


def test_a_reservation_holds_every_port_or_none() -> None:
    import errno

    a, b, c = _free_ports(3)
    hp = _host_ports()
    try:
        assert hp.reserve(1, ReserveRequest([("e1/a", 80, a, a)])).refused is None
        assert [h.pid for h in holders(a)] == [os.getpid()]  # listening already
        reply = hp.reserve(2, ReserveRequest([("e2/x", 80, c, c), ("e2/y", 81, a, a)]))
        # a is held (by e1): e2 gets nothing, and c, bound on the way, is let go
        assert reply.refused == ("e2/y", 81, a, a, errno.EADDRINUSE)
        assert "e2/x" not in hp.held and "e2/y" not in hp.held and holders(c) == []
        with socket.socket() as taken:  # anyone's socket, not only ours
            taken.bind(("127.0.0.1", b))
            taken.listen()
            reply = hp.reserve(3, ReserveRequest([("e3/z", 80, b, b)]))
            assert reply.refused == ("e3/z", 80, b, b, errno.EADDRINUSE)
        assert hp.reserve(4, ReserveRequest([("e3/z", 80, b, b)])).refused is None
        sock = hp.take("e1/a", 80)
        assert sock is not None and sock.getsockname() == ("127.0.0.1", a)
        assert hp.take("e1/a", 80) is None  # the relay's now
        sock.close()
    finally:
        hp.drop()
    assert hp.held == {} and holders(b) == []


def test_a_range_takes_its_first_free_port_after_the_fixed_ones() -> None:
    base = _free_ports(1)[0]
    hp = _host_ports()
    try:
        # The range comes first in the request, the fixed port inside it second: fixed first.
        reply = hp.reserve(1, ReserveRequest([("e/a", 80, base, base + 5), ("e/b", 81, base, base)]))
        if reply.refused is not None:
            pytest.skip(f"a port near {base} was taken meanwhile: {reply.refused}")
        assert hp.held["e/b"][81].getsockname()[1] == base
        assert base < hp.held["e/a"][80].getsockname()[1] <= base + 5
    finally:
        hp.drop("e")
    assert hp.held == {}


def test_a_privileged_port_refused_says_how_to_get_one() -> None:
    import errno

    reason = taken_reason(80, (80, 80), errno.EACCES, supervisor=1)
    assert "its port 80 cannot be published on 127.0.0.1:80: host ports below" in reason
    assert "need root (CAP_NET_BIND_SERVICE)" in reason and "{ port = 80, host = 8080 }" in reason
