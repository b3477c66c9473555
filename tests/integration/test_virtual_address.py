"""Virtual addresses (Kubernetes Services as kube-proxy makes them) in an environment's hub:
a connection to the address's port goes to the target port of one of its backends, at random,
and the network's faults still hold for it.

Traffic stays inside namespaces these tests create: the services talk over their environment's
bridge, and the test process connects through the hub (root: the host link; rootless: a socket
lent by the hub).
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from typing import TypeVar

import pytest

from pytest_envbox import Environment, Service, probe
from pytest_envbox.engine.client import get_supervisor
from pytest_envbox.engine.virtual import set_virtual_address
from pytest_envbox.errors import EnvboxError
from pytest_envbox.kernel import netlink
from pytest_envbox.supervisor.protocol import CensusRequest
from pytest_envbox.wait import Deadline, wait_until

PY = sys.executable
T = TypeVar("T")

# Answers every TCP connection, and every UDP datagram, on $PORT with $MARK.
BACKEND = """
import os, socket, socketserver, threading
mark, port = os.environ["MARK"].encode(), int(os.environ["PORT"])
class T(socketserver.BaseRequestHandler):
    def handle(self):
        self.request.sendall(mark)
class U(socketserver.BaseRequestHandler):
    def handle(self):
        self.request[1].sendto(mark, self.client_address)
socketserver.ThreadingTCPServer.allow_reuse_address = True
udp = socketserver.UDPServer(("0.0.0.0", port), U)
threading.Thread(target=udp.serve_forever, daemon=True).start()
socketserver.ThreadingTCPServer(("0.0.0.0", port), T).serve_forever()
"""

# Run inside a client: up to argv[3] connections (or datagrams, argv[5] == "udp") to
# argv[1]:argv[2], each waiting argv[4] seconds at most; stops early once every name of argv[6]
# (comma-separated; none: never) answered. Prints a JSON object: answer -> count ("failed"
# for the connections that got none).
PROBE = """
import json, socket, sys
addr, port, count, proto = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[5]
timeout = float(sys.argv[4])
want = set(filter(None, sys.argv[6].split(",")))
seen = {}
for _ in range(count):
    try:
        if proto == "udp":
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(timeout)
                s.sendto(b"?", (addr, port))
                answer = s.recv(100).decode()
        else:
            with socket.create_connection((addr, port), timeout=timeout) as s:
                answer = s.recv(100).decode()
    except OSError as e:
        answer = "failed"
    seen[answer] = seen.get(answer, 0) + 1
    if want and want <= set(seen):
        break
print(json.dumps(seen))
"""


def backend(name: str, port: int = 8080) -> Service:
    return Service(name, [PY, "-c", BACKEND], env={"MARK": name, "PORT": str(port)},
                   ready=probe.tcp(port))  # fmt: skip


def client() -> Service:
    return Service("client", ["sleep", "1000"])


def probe_vip(env: Environment, address: str, port: int, count: int, *, timeout: float = 2.0,
              proto: str = "tcp", until: tuple[str, ...] = ()) -> Counter[str]:  # fmt: skip
    """What ``count`` connections from the client to ``address:port`` were answered with."""
    r = env["client"].exec([PY, "-c", PROBE, address, str(port), str(count), str(timeout), proto,
                            ",".join(until)], timeout=count * timeout + 30)  # fmt: skip
    assert r.returncode == 0, r.stderr
    return Counter(json.loads(r.stdout))


def vip_of(env: Environment) -> str:
    """The Service's address as the lead's config layer names it."""
    return env._subnet().address("service/web")


def set_vip(env: Environment, address: str, ports: dict[int, list[tuple[str, int]]]) -> None:
    assert env._sup is not None
    set_virtual_address(env._sup, env.id, address, ports)


def test_connections_to_a_virtual_address_spread_over_its_backends_on_their_target_ports() -> None:
    """Three backends, one of them on another target port: each takes about a third of 150
    connections (each with 1/3: the i-th rule of n taken with 1/(n-i)); UDP too; and the
    test process's own connection."""
    services = [backend("web-0"), backend("web-1"), backend("web-2", 9090), client()]
    with Environment(services) as env:
        vip = vip_of(env)
        assert vip not in {env[s.name].ip for s in services}
        set_vip(env, vip, {80: [(env["web-0"].ip, 8080), (env["web-1"].ip, 8080),
                                (env["web-2"].ip, 9090)]})  # fmt: skip
        seen = probe_vip(env, vip, 80, 150)
        assert set(seen) == {"web-0", "web-1", "web-2"}, seen
        assert all(20 <= n <= 80 for n in seen.values()), seen  # 50 each; 5 deviations off
        assert probe_vip(env, vip, 8080, 1, timeout=1.0) == {"failed": 1}  # only port 80
        udp = probe_vip(env, vip, 80, 200, proto="udp", until=("web-0", "web-1", "web-2"))
        assert {"web-0", "web-1", "web-2"} <= set(udp), udp
        with env.network.reachable(), socket.create_connection((vip, 80), timeout=10) as s:
            assert s.recv(100).decode() in {"web-0", "web-1", "web-2"}


def test_setting_it_again_replaces_its_ports_and_no_ports_removes_it() -> None:
    with Environment([backend("web-0"), backend("web-1", 9090), client()]) as env:
        vip = vip_of(env)
        set_vip(env, vip, {80: [(env["web-0"].ip, 8080), (env["web-1"].ip, 9090)]})
        assert set(probe_vip(env, vip, 80, 100, until=("web-0", "web-1"))) == {"web-0", "web-1"}
        set_vip(env, vip, {81: [(env["web-1"].ip, 9090)], 82: [(env["web-0"].ip, 8080)]})
        assert probe_vip(env, vip, 81, 20) == {"web-1": 20}
        assert probe_vip(env, vip, 82, 5) == {"web-0": 5}
        assert probe_vip(env, vip, 80, 1, timeout=1.0) == {"failed": 1}  # replaced: gone
        set_vip(env, vip, {})
        assert probe_vip(env, vip, 81, 1, timeout=1.0) == {"failed": 1}
        set_vip(env, vip, {80: [(env["web-0"].ip, 8080)]})  # and back
        assert probe_vip(env, vip, 80, 5) == {"web-0": 5}


def test_a_partition_down_link_or_lossy_link_keeps_that_backend_out() -> None:
    """Faults are rules on the hub's bridge ports; a connection through a virtual address crosses
    the hub (client -> hub -> backend): they hold for it. Connections that chose the cut-off
    backend fail; the others all reach the other one."""
    with Environment([backend("web-0"), backend("web-1"), client()]) as env:
        vip = vip_of(env)
        set_vip(env, vip, {80: [(env["web-0"].ip, 8080), (env["web-1"].ip, 8080)]})
        assert set(probe_vip(env, vip, 80, 100, until=("web-0", "web-1"))) == {"web-0", "web-1"}

        def cut_off(what: str) -> None:
            seen = probe_vip(env, vip, 80, 24, timeout=0.5)
            assert "web-1" not in seen and seen["web-0"] > 0, (what, seen)
            assert seen["failed"] > 0, (what, seen)  # some chose web-1: half of them, about

        def recovers() -> bool:
            return wait_until(lambda: "web-1" in probe_vip(env, vip, 80, 50, until=("web-1",))
                              or None, Deadline(15)) is True  # fmt: skip

        env.network.partition(["client"], ["web-1"])
        cut_off("partition")
        env.network.heal()
        assert recovers()
        env.network.partition(["web-1"], ["client", "web-0"])  # the other way round, in a group
        cut_off("partition, web-1 first")
        env.network.heal()
        assert recovers()
        env["web-1"].link.down()
        cut_off("link down")
        env["web-1"].link.up()
        assert recovers()
        env["web-1"].link.loss(100)
        cut_off("loss")
        env["web-1"].link.clear()
        assert recovers()
        env.network.partition(["client"], ["web-0", "web-1"])
        assert probe_vip(env, vip, 80, 4, timeout=0.5) == {"failed": 4}


def test_bad_requests_are_refused_with_the_reason() -> None:
    with Environment([backend("web-0"), client()]) as env:
        vip, web = vip_of(env), env["web-0"].ip
        cases: list[tuple[str, dict[int, list[tuple[str, int]]], str]] = [
            (env["client"].ip, {80: [(web, 8080)]}, "is a service's address"),
            ("192.0.2.1", {80: [(web, 8080)]}, "is not a host address of the subnet"),
            (env._subnet().gateway, {80: [(web, 8080)]}, "the hub's or the host's address"),
            ("nope", {80: [(web, 8080)]}, "is not an IPv4 address"),
            (vip, {80: []}, "port 80 has no backend"),
            (vip, {0: [(web, 8080)]}, "port 0 is not from 1 to 65535"),
            (vip, {80: [(web, 70000)]}, "port 70000 is not from 1 to 65535"),
            (vip, {80: [("192.0.2.1", 8080)]}, "is not another address of"),
        ]
        for address, ports, why in cases:
            with pytest.raises(EnvboxError, match=why):
                set_vip(env, address, ports)
        set_vip(env, vip, {80: [(web, 8080)]})  # none of them changed anything
        assert probe_vip(env, vip, 80, 3) == {"web-0": 3}


def test_the_next_environment_on_the_hub_has_no_virtual_address_left() -> None:
    """A closed environment's hub is reset and reused: its virtual addresses go with the rest."""
    sup = get_supervisor()
    with Environment([backend("web-0"), client()]) as first:
        vip = vip_of(first)
        set_vip(first, vip, {80: [(first["web-0"].ip, 8080)]})
        assert probe_vip(first, vip, 80, 3) == {"web-0": 3}
        hub = sup.call(CensusRequest()).hub_netns[first.id]
    assert wait_until(lambda: sup.call(CensusRequest()).spare_hubs >= 1 or None, Deadline(5))
    with Environment([backend("web-0"), client()]) as second:
        assert sup.call(CensusRequest()).hub_netns[second.id] == hub  # the same hub
        assert vip_of(second) == vip and second["web-0"].ip == first["web-0"].ip
        assert probe_vip(second, vip, 80, 1, timeout=1.0) == {"failed": 1}
        set_vip(second, vip, {80: [(second["web-0"].ip, 8080)]})  # and it can be made again
        assert probe_vip(second, vip, 80, 3) == {"web-0": 3}


# --- the hub's kernel state, seen from inside (root: the test enters the hub's namespace) ------


def _hub(env: Environment) -> str:
    """A path that opens the environment's hub namespace (the supervisor's fd of it)."""
    sup = get_supervisor()
    ns = f"net:[{sup.call(CensusRequest()).hub_netns[env.id]}]"
    for fd in os.listdir(f"/proc/{sup.pid}/fd"):
        try:
            if os.readlink(f"/proc/{sup.pid}/fd/{fd}") == ns:
                return f"/proc/{sup.pid}/fd/{fd}"
        except OSError:
            continue
    raise AssertionError(f"no fd of the supervisor's is {ns}")


def _in_netns(path: str, fn: Callable[[], T]) -> T:
    """``fn()`` on a thread that entered the namespace at ``path``."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return netlink.call_in(fd, fn)
    finally:
        os.close(fd)


def _has_table(name: str) -> bool:
    """Whether this thread's netns has nf_tables table ``name`` in the ip family (a GETTABLE)."""
    body = struct.pack("=BBH", socket.AF_INET, 0, 0)
    name_attr = name.encode() + b"\0"
    body += struct.pack("=HH", 4 + len(name_attr), 1) + name_attr + b"\0" * (-len(name_attr) % 4)
    msg = struct.pack("=IHHII", 16 + len(body), 10 << 8 | 1, 0x1 | 0x4, 1, 0) + body
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12) as s:
        s.send(msg)
        data = s.recv(65536)
    if struct.unpack_from("=H", data, 4)[0] != 2:  # not NLMSG_ERROR: the table itself
        return True
    code: int = -struct.unpack_from("=i", data, 16)[0]
    assert code in (0, 2), os.strerror(code)  # ENOENT: none
    return code == 0


def _hub_state(hub: str) -> tuple[str, bool, list[str]]:
    """The hub's addresses on br0, whether it has the virtual addresses' table, and the sysctls
    they change."""
    addrs = subprocess.run(["nsenter", f"--net={hub}", "ip", "-4", "-o", "addr", "show", "br0"],
                           capture_output=True, text=True, check=True).stdout  # fmt: skip
    inet = " ".join(sorted(w for line in addrs.splitlines() for w in line.split() if "/" in w))

    def read() -> tuple[bool, list[str]]:
        keys = ["ipv4/conf/br0/forwarding", "ipv4/conf/all/send_redirects",
                "ipv4/conf/br0/send_redirects", "bridge/bridge-nf-call-iptables"]  # fmt: skip
        values = []
        for k in keys:
            if os.path.exists(f"/proc/sys/net/{k}"):  # the last: where br_netfilter is
                with open(f"/proc/sys/net/{k}") as f:
                    values.append(f.read().strip())
        return _has_table("envbox-vip"), values

    table, sysctls = _in_netns(hub, read)
    return inet, table, sysctls


@pytest.mark.needs_root("the test enters the hub's network namespace to look at it")
def test_the_hub_holds_the_address_rules_and_sysctls_only_while_it_has_a_virtual_address() -> None:
    with Environment([backend("web-0"), client()]) as env:
        hub = _hub(env)
        before = _hub_state(hub)
        assert before[1] is False
        vip = vip_of(env)
        set_vip(env, vip, {80: [(env["web-0"].ip, 8080)]})
        inet, table, sysctls = _hub_state(hub)
        assert inet.split() == sorted([*before[0].split(), f"{vip}/32"]) and table
        assert sysctls[:3] == ["1", "0", "0"]  # forwarding on the bridge, no redirects
        assert sysctls[3:] in ([], ["0"])  # nor bridged frames handed to the ip hooks
        set_vip(env, vip, {})
        assert _hub_state(hub) == before
        set_vip(env, vip, {80: [(env["web-0"].ip, 8080)]})
    assert wait_until(lambda: get_supervisor().call(CensusRequest()).spare_hubs >= 1 or None, Deadline(5))
    assert _hub_state(hub) == before  # reset for the next environment
