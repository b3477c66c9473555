"""Service addresses reachable from the test process: a subnet of its own per live environment,
routed from the host through a link into the environment's hub (root mode), or sockets made in
the environment's network (``env.network.reachable()``, rootless); and what stays unreachable.

Traffic goes only to addresses of environments these tests open, and to 127.0.0.1. Rootless,
nothing connects to a service address outside ``reachable()`` (the host would route it out).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_envbox import Environment, Service, probe
from pytest_envbox.engine.client import get_supervisor, rootless
from pytest_envbox.supervisor.protocol import CensusRequest
from pytest_envbox.supervisor.subnets import host_end, link_name
from pytest_envbox.wait import Deadline, wait_until
from tests.conftest import PLUGIN_ARGS

REDIS = "/usr/bin/redis-server"
PY = "/usr/bin/python3"

# Tries a TCP connection: prints "connected" or "failed: <why>".
CONNECT = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])).close()
    print("connected")
except OSError as e:
    print("failed:", type(e).__name__, e)
"""

ECHO = """
import socket
s = socket.socket()
s.bind(("0.0.0.0", 7000))
s.listen()
while True:
    c, _ = s.accept()
    c.sendall(b"hello from " + socket.gethostname().encode())
    c.close()
"""


def echo(name: str = "echo") -> Service:
    return Service(name, [PY, "-c", ECHO], ports=[7000], ready=probe.tcp(7000))


def client() -> Service:
    return Service("client", ["sleep", "1000"])


def greet(ip: str, timeout: float = 5.0) -> str:
    with socket.create_connection((ip, 7000), timeout=timeout) as s:
        return s.recv(100).decode()


def routes() -> dict[str, str]:
    """The host's IPv4 routes in its main table: destination -> link (from /proc/net/route)."""
    out = {}
    with open("/proc/net/route") as f:
        for line in f.read().splitlines()[1:]:
            iface, dst, _gw, _flags, _rc, _use, _metric, mask = line.split()[:8]
            net = ipaddress.IPv4Network((socket.inet_ntoa(int(dst, 16).to_bytes(4, "little")),
                                         bin(int(mask, 16)).count("1")))  # fmt: skip
            out[str(net)] = iface
    return out


def envbox_links() -> set[str]:
    return {n for n in os.listdir("/sys/class/net") if n.startswith("envbox")}


def sentinel_topology() -> list[Service]:
    """A redis master, its replica, and a sentinel watching the master (by address: the sentinel
    reports addresses, which is the point)."""
    conf = ("ip=$(getent hosts master | cut -d' ' -f1); "
            "printf 'port 26379\\nprotected-mode no\\nsentinel monitor mymaster %s 6379 1\\n' \"$ip\""
            " > /tmp/s.conf; exec " + REDIS + " /tmp/s.conf --sentinel")  # fmt: skip
    common = ["--protected-mode", "no", "--save", "", "--appendonly", "no", "--dir", "/tmp",
              "--repl-diskless-sync-delay", "0"]  # fmt: skip
    return [
        Service("master", [REDIS, "--port", "6379", *common], ports=[6379], ready=probe.tcp(6379)),
        Service("replica", [REDIS, "--port", "6379", "--replicaof", "master", "6379", *common],
                ports=[6379], depends_on=["master"],
                ready=probe.log("MASTER <-> REPLICA sync: Finished with success")),
        Service("sentinel", ["sh", "-c", conf], ports=[26379], depends_on=["replica"],
                ready=probe.log("Sentinel ID is")),
    ]  # fmt: skip


def test_a_redis_sentinel_client_discovers_and_uses_the_master_and_its_replica() -> None:
    """Issue 16's done-when: redis-py's Sentinel client, unchanged, given the sentinel's address,
    gets the master's and the replica's addresses from it and uses them (root: routed; rootless:
    inside reachable())."""
    redis = pytest.importorskip("redis")
    if not os.access(REDIS, os.X_OK):
        pytest.skip(f"{REDIS} is not installed")
    with Environment(sentinel_topology()) as env, env.network.reachable():
        if rootless():
            assert not env.network.routed and "rootless" in (env.network.why_unrouted or "")
        sentinel = redis.Sentinel([(env["sentinel"].ip, 26379)], socket_timeout=5)
        master = sentinel.master_for("mymaster", socket_timeout=5)
        replica = sentinel.slave_for("mymaster", socket_timeout=5)
        try:
            assert sentinel.discover_master("mymaster") == (env["master"].ip, 6379)
            assert master.set("greeting", "hello")
            assert master.get("greeting") == b"hello"
            # The sentinel learns of the replica from the master (its INFO): wait for it.
            replicas = wait_until(lambda: sentinel.discover_slaves("mymaster") or None, Deadline(30))
            assert replicas == [(env["replica"].ip, 6379)]
            assert wait_until(lambda: replica.get("greeting"), Deadline(10)) == b"hello"
            assert replica.info("replication")["role"] == "slave"
        finally:  # their sockets, closed now: not by the collector during a later test
            for client in (master, replica, *sentinel.sentinels):
                client.connection_pool.disconnect()


@pytest.mark.needs_root("root mode routes subnets from the host")
def test_each_live_environment_gets_a_subnet_of_its_own_routed_from_the_host() -> None:
    with Environment([echo()]) as one, Environment([echo()]) as two:
        nets = [ipaddress.IPv4Network(e.network.subnet) for e in (one, two)]
        assert nets[0] != nets[1] and all(n.subnet_of(ipaddress.IPv4Network("198.18.0.0/15")) for n in nets)
        assert one.network.routed and two.network.routed and one.network.why_unrouted is None
        for env, net in zip((one, two), nets, strict=True):
            assert routes()[str(net)] == link_name(net)  # the kernel's route of the host's end
            assert greet(env["echo"].ip) == "hello from echo"
            assert env["echo"].ip != host_end(net)
        census = get_supervisor().call(CensusRequest())
        assert {link_name(n) for n in nets} <= set(census.host_links)
    left = routes()
    assert not any(str(n) in left for n in nets), left  # closed: no route of theirs stays


@pytest.mark.needs_root("root mode routes subnets from the host")
def test_an_explicit_subnet_that_another_environment_routes_runs_unrouted() -> None:
    net = "198.19.255.0/24"  # the pool's last /24: taken only when every other one is
    with Environment([echo()], subnet=net) as one, Environment([echo()], subnet=net) as two:
        assert one.network.subnet == two.network.subnet == net
        assert one["echo"].ip == two["echo"].ip
        assert one.network.routed and not two.network.routed
        assert "another environment" in (two.network.why_unrouted or "")
        assert greet(one["echo"].ip) == "hello from echo"
        assert two["echo"].port(7000)  # its published port works as ever
        with two.network.reachable():  # and so does the way in without a route
            sock = socket.create_connection((two["echo"].ip, 7000), timeout=5)
            assert sock.recv(100) == b"hello from echo"
            sock.close()


@pytest.mark.needs_root("root mode routes subnets from the host")
def test_a_subnet_inside_another_processs_idle_larger_one_runs_unrouted() -> None:
    """Another process's environment on 10.213.0.0/16, idle (its hub kept for the next one: its
    link down, so no route, only its address, 10.213.255.254, outside the /24 below). Routing
    10.213.0.0/24 here would take that part of its subnet from it once its link is up again."""
    other = ipaddress.IPv4Network("10.213.0.0/16")
    name = link_name(other)
    peer = f"ebxp{os.getpid()}"
    subprocess.run(["ip", "link", "add", name, "type", "veth", "peer", "name", peer], check=True)
    try:
        subprocess.run(["ip", "addr", "add", f"{host_end(other)}/16", "dev", name], check=True)
        with Environment([client()], subnet="10.213.0.0/24") as env:
            assert not env.network.routed
            assert "another environment" in (env.network.why_unrouted or "")
            assert "10.213.0.0/24" not in routes()
    finally:
        subprocess.run(["ip", "link", "del", name], check=True)


def test_reachable_says_emfile_when_the_test_process_has_no_descriptor_left_for_the_lent_ones() -> None:
    """The kernel installs as many passed descriptors as the receiver may have, and drops the
    rest: with none left, the connect fails as one without a descriptor does (EMFILE), and the
    next one, with descriptors again, gets there."""
    import resource

    net = "198.19.254.0/24"
    with Environment([echo()], subnet=net) as one, Environment([echo()], subnet=net) as two:
        if two.network.routed:  # rootless: the only one, and unrouted
            one, two = two, one
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        with two.network.reachable():
            sock = socket.socket()
            sock.settimeout(5)
            fillers = []
            resource.setrlimit(resource.RLIMIT_NOFILE, (sock.fileno() + 1, hard))
            try:
                while True:
                    try:
                        fillers.append(os.open("/dev/null", os.O_RDONLY))
                    except OSError:
                        break
                with pytest.raises(OSError) as e:
                    sock.connect((two["echo"].ip, 7000))
                assert e.value.errno == errno.EMFILE, e.value
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
                for fd in fillers:
                    os.close(fd)
                sock.close()
            with socket.create_connection((two["echo"].ip, 7000), timeout=5) as again:
                assert again.recv(100) == b"hello from echo"


@pytest.fixture
def host_servers() -> Iterator[list[socket.socket]]:
    """Two listening sockets of the test process: on every address, and (once known) on the
    environment's host end; each counts nothing, a connection is what must not happen."""
    socks: list[socket.socket] = []
    yield socks
    for s in socks:
        s.close()


@pytest.mark.needs_root("root mode routes subnets from the host")
def test_a_service_cannot_connect_to_the_host_through_its_link(host_servers: list[socket.socket]) -> None:
    with Environment([client()]) as env:
        net = ipaddress.IPv4Network(env.network.subnet)
        for addr in ("0.0.0.0", host_end(net)):
            s = socket.socket()
            s.bind((addr, 0))
            s.listen()
            host_servers.append(s)
        for s in host_servers:
            port = s.getsockname()[1]
            out = env["client"].exec([PY, "-c", CONNECT, host_end(net), str(port), "1"]).stdout
            assert out.startswith("failed: TimeoutError"), out  # dropped in the hub, silently
        # Still no default route: only the subnet's.
        table = env["client"].exec(["cat", "/proc/net/route"]).stdout.splitlines()[1:]
        destination = socket.inet_aton(str(net.network_address))[::-1].hex().upper()
        assert [line.split()[1] for line in table] == [destination]


# Sends crafted Ethernet frames out of eth0 (CAP_NET_RAW): to argv[1] (a MAC), from this service's
# address, IPv4 to each "ip:port:kind" of argv[2:] (kind: udp, or TCP flags: syn, ack, and SYN with
# FIN or URG, which a Linux listener also takes as an opening, or with RST; "<flags>-<ip>": with a
# loose source route on to <ip>, which a host forwards where it accepts source routes), in order.
CRAFT = r"""
import socket, struct, sys
def csum(b):
    if len(b) % 2: b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xFFFF); s += s >> 16
    return ~s & 0xFFFF
dst_mac = bytes.fromhex(sys.argv[1].replace(":", ""))
me = open("/sys/class/net/eth0/address").read().strip()
src_mac = bytes.fromhex(me.replace(":", ""))
src_ip = socket.inet_aton(sys.argv[2])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("eth0", 0))
for i, spec in enumerate(sys.argv[3:]):
    ip, port, kind = spec.split(":")
    dst_ip = socket.inet_aton(ip)
    sport = 40000 + i
    if kind == "udp":
        l4 = struct.pack("!HHHH", sport, int(port), 8, 0); proto = 17
    else:
        kind, _, via = kind.partition("-")
        flags = {"syn": 0x02, "ack": 0x10, "synfin": 0x03, "synurg": 0x22, "synrst": 0x06}[kind]
        ack = 1 if kind == "ack" else 0
        l4 = struct.pack("!HHIIBBHHH", sport, int(port), 1, ack, 5 << 4, flags, 1024, 0, 0)
        proto = 6
    pseudo = src_ip + dst_ip + struct.pack("!BBH", 0, proto, len(l4))
    c = csum(pseudo + l4)
    l4 = l4[:16] + struct.pack("!H", c) + l4[18:] if proto == 6 else l4[:6] + struct.pack("!H", c)
    opts = bytes([0x83, 7, 4]) + socket.inet_aton(via) + b"\x01" if proto == 6 and via else b""
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45 + len(opts) // 4, 0, 20 + len(opts) + len(l4), i, 0,
                      64, proto, 0, src_ip, dst_ip) + opts
    hdr = hdr[:10] + struct.pack("!H", csum(hdr)) + hdr[12:]
    s.send(dst_mac + src_mac + b"\x08\x00" + hdr + l4)
print("sent")
"""


@pytest.mark.needs_root("the test sniffs the host's end of the link (AF_PACKET)")
def test_crafted_frames_from_a_service_reach_neither_the_host_nor_another_environment() -> None:
    """A root service has CAP_NET_RAW: it can address any frame to the host's end of the link.
    Only a segment that opens nothing may cross (the positive control, sent last: frames cross
    the bridge in order, so once it is seen, any earlier one that crossed was seen too)."""
    with Environment([client()]) as a, Environment([echo()]) as b:
        net = ipaddress.IPv4Network(a.network.subnet)
        link, host = link_name(net), host_end(net)
        with open(f"/sys/class/net/{link}/address") as f:
            mac = f.read().strip()
        sniff = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        sniff.bind((link, 0))
        sniff.settimeout(5)
        me = a["client"].ip
        frames = [f"{host}:22:syn", f"{b['echo'].ip}:7000:syn", f"{b['echo'].ip}:7000:ack",
                  f"{host}:53:udp", f"{host}:22:synfin", f"{host}:22:synurg", f"{host}:22:synrst",
                  f"{host}:7000:ack-{b['echo'].ip}", f"{host}:22:ack"]  # fmt: skip
        out = a["client"].exec([PY, "-c", CRAFT, mac, me, *frames])
        assert out.stdout.strip() == "sent", out.stderr
        seen = []
        while True:
            frame = sniff.recv(2048)
            if frame[12:14] != b"\x08\x00" or frame[26:30] != socket.inet_aton(me):
                continue  # not one of the service's IPv4 packets (ARP, the host's own...)
            seen.append(struct_id(frame))
            if seen[-1] == len(frames) - 1:
                break
        sniff.close()
        assert seen == [len(frames) - 1], [frames[i] for i in seen]


def struct_id(frame: bytes) -> int:
    """The IPv4 identification field (CRAFT numbers its packets by it)."""
    return int.from_bytes(frame[18:20], "big")


@pytest.mark.needs_root("root mode routes subnets from the host")
def test_faults_hit_the_tests_direct_traffic() -> None:
    with Environment([echo()]) as env:
        h = env["echo"]
        assert greet(h.ip) == "hello from echo"
        h.link.down()
        with pytest.raises(OSError):
            greet(h.ip, timeout=1)
        h.link.up()
        assert wait_until(lambda: _greets(h.ip), Deadline(10))
        h.link.loss(100)
        with pytest.raises(OSError):
            greet(h.ip, timeout=1)
        h.link.clear()
        assert wait_until(lambda: _greets(h.ip), Deadline(10))


def _greets(ip: str) -> bool | None:
    try:
        return greet(ip, timeout=1) == "hello from echo" or None
    except OSError:
        return None


INNER = """
    import os, threading
    from pytest_envbox import Service
    from pytest_envbox.engine.client import get_supervisor

    def test_hangs(envbox):
        envbox.start(Service("victim", ["sleep", "1000"]))
        with open(os.environ["REPORT"] + ".tmp", "w") as f:
            f.write(f"{envbox.network.subnet} {get_supervisor().pid}")
        os.rename(os.environ["REPORT"] + ".tmp", os.environ["REPORT"])
        threading.Event().wait(120)
"""


@pytest.mark.needs_root("root mode routes subnets from the host")
@pytest.mark.parametrize("also_supervisor", [False, True], ids=["pytest", "pytest-and-supervisor"])
def test_after_kill_9_of_pytest_no_host_link_or_route_remains(tmp_path: Path, also_supervisor: bool) -> None:
    """Killed with its supervisor, no code of ours runs after: the kernel deletes the link with
    the hub's namespace (a veth pair goes with either end)."""
    (tmp_path / "test_inner.py").write_text(textwrap.dedent(INNER))
    report = tmp_path / "report"
    env = {**os.environ, "REPORT": str(report), "PYTHONPATH": str(Path(__file__).parents[2])}
    child = subprocess.Popen([sys.executable, "-m", "pytest", *PLUGIN_ARGS, "-q", "-p", "no:cacheprovider",
                              "-p", "no:xdist", str(tmp_path / "test_inner.py")], cwd=tmp_path, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        assert wait_until(lambda: report.exists() or child.poll() is not None or None, Deadline(60))
        assert report.exists(), child.communicate()[0].decode()[-2000:]
        subnet, sup = report.read_text().split()
        net = ipaddress.IPv4Network(subnet)
        link = link_name(net)
        assert link in envbox_links() and routes().get(str(net)) == link
    finally:
        if also_supervisor and report.exists():
            os.kill(int(sup), signal.SIGKILL)
        child.send_signal(signal.SIGKILL)
        child.wait()
    # The supervisor sees its test process die, closes the hub: the kernel deletes both ends.
    assert wait_until(lambda: (link not in envbox_links() and str(net) not in routes()) or None,
                      Deadline(10)), (envbox_links(), routes())  # fmt: skip


def test_an_environment_without_services_frees_the_network_it_was_given() -> None:
    sup = get_supervisor()
    with Environment() as env:
        assert ipaddress.IPv4Network(env.network.subnet).prefixlen == 24  # given now: bound
        assert env.id in sup.call(CensusRequest()).hubs
    assert env.id not in sup.call(CensusRequest()).hubs
