"""Each environment's private network: names, addresses, isolation, published ports, link faults.

Traffic stays inside namespaces these tests create (and 127.0.0.1): services talk over their
environment's bridge; nothing is sent anywhere else.
"""

from __future__ import annotations

import os
import re
import sys
import time

import pytest
import requests

from pytest_envbox import Environment, HostUnsupported, Service, probe
from pytest_envbox.engine.client import SupervisorClient, get_supervisor
from pytest_envbox.supervisor.network import MAX_FREE_HUBS
from pytest_envbox.supervisor.protocol import CensusRequest
from pytest_envbox.wait import Deadline, wait_until
from tests.kernel import host_links, our_mounts

PY = sys.executable

# Answers every GET with $MARK; listens on $BIND (default: every address).
SERVER = """
import http.server, os
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = os.environ["MARK"].encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer((os.environ.get("BIND", "0.0.0.0"), 8000), H).serve_forever()
"""

# Run inside a client: fetch a URL, print the body, or "failed: <why>" (exit 1).
FETCH = """
import sys, urllib.request
try:
    print(urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2])).read().decode())
except Exception as e:
    print("failed:", type(e).__name__, e)
    sys.exit(1)
"""

RESOLVE = "import socket, sys; print(' '.join(socket.gethostbyname(n) for n in sys.argv[1:]))"


def web(mark: str = "web", **kw: object) -> Service:
    env = {"MARK": mark, **kw.pop("env", {})}  # type: ignore[dict-item]
    return Service("web", [PY, "-c", SERVER], ports=[8000], ready=probe.tcp(8000), env=env, **kw)  # type: ignore[arg-type]


def client(**kw: object) -> Service:
    return Service("client", ["sleep", "1000"], **kw)  # type: ignore[arg-type]


def fetch(env: Environment, url: str, timeout: float = 5.0, src: str = "client") -> str:
    r = env[src].exec([PY, "-c", FETCH, url, str(timeout)], timeout=timeout + 30)
    return r.stdout.strip()


def test_services_reach_each_other_by_name_and_alias() -> None:
    with Environment([web(aliases=["www", "shop-web"]), client(depends_on=["web"])]) as env:
        assert env["web"].ip != env["client"].ip
        resolved = env["client"].exec([PY, "-c", RESOLVE, "web", "www", "shop-web", "client"]).stdout.split()
        assert resolved == [env["web"].ip] * 3 + [env["client"].ip]
        assert fetch(env, "http://web:8000/") == "web"
        assert fetch(env, "http://shop-web:8000/") == "web"
        # The service's own view: its address on eth0, and only the subnet's route.
        addrs = env["client"].exec(["cat", "/proc/net/fib_trie"]).stdout
        assert env["client"].ip in addrs


def test_two_environments_with_the_same_names_and_subnet_cannot_reach_each_other() -> None:
    """Given the same subnet (each gets one of its own by default), at most one is routed from
    the host (see test_reachable.py); neither reaches the other."""
    net = "198.19.254.0/24"
    one = Environment([web("one"), client(), Service("extra", ["sleep", "1000"])], subnet=net)
    two = Environment([web("two"), client()], subnet=net)
    with one, two:
        assert one["web"].ip == two["web"].ip  # the same subnet, the same addresses
        assert not (one.network.routed and two.network.routed)
        assert fetch(one, "http://web:8000/") == "one"
        assert fetch(two, "http://web:8000/") == "two"
        # An address that exists only in `one` is unreachable from `two`.
        extra = one["extra"].ip
        assert extra not in {two["web"].ip, two["client"].ip}
        out = fetch(two, f"http://{extra}:8000/", timeout=1.0)
        assert out.startswith("failed:"), out
        # And the published ports of each reach its own.
        assert one["web"].http.get("/").text == "one"
        assert two["web"].http.get("/").text == "two"


def test_hosts_file_of_a_running_service_gains_a_service_started_later() -> None:
    with Environment([client()]) as env:
        assert "later" not in env["client"].exec(["cat", "/etc/hosts"]).stdout
        later = Service("later", [PY, "-c", SERVER], ports=[8000], ready=probe.tcp(8000),
                        env={"MARK": "later"}, aliases=["late"])  # fmt: skip
        env.start(later)
        hosts = env["client"].exec(["cat", "/etc/hosts"]).stdout
        assert f"{env['later'].ip}\tlater late" in hosts
        assert fetch(env, "http://late:8000/") == "later"


def test_a_published_port_reaches_a_service_listening_on_its_network_address_only() -> None:
    # BIND=web: it resolves its own name (via /etc/hosts) and listens there, not on loopback.
    with Environment([web("bound", env={"BIND": "web"})]) as env:
        listening = env["web"].exec(["cat", "/proc/net/tcp"]).stdout
        assert "0100007F:1F40" not in listening  # not on 127.0.0.1:8000
        assert env["web"].http.get("/", timeout=5).text == "bound"


def test_link_down_cuts_the_service_off_and_up_restores_it() -> None:
    with Environment([web(), client(depends_on=["web"])]) as env:
        assert fetch(env, "http://web:8000/") == "web"
        env["web"].link.down()
        assert fetch(env, "http://web:8000/", timeout=1.0).startswith("failed:")
        with pytest.raises(requests.RequestException):
            env["web"].http.get("/", timeout=1.0)  # the published port goes over the link too
        env["web"].link.up()
        got = wait_until(lambda: fetch(env, "http://web:8000/", timeout=1.0) == "web" or None,
                         Deadline(10))  # fmt: skip
        assert got
        env["web"].link.down()
        env["web"].link.clear()  # clear() brings it up too
        assert env["web"].http.get("/", timeout=5).text == "web"


TIMER = """
import socket, sys, time
best = []
for _ in range(5):
    t = time.perf_counter()
    socket.create_connection((sys.argv[1], 8000), timeout=10).close()
    best.append(time.perf_counter() - t)
print(min(best) * 1000)
"""


def test_link_delay_raises_the_round_trip_and_clear_removes_it() -> None:
    with Environment([web(), client(depends_on=["web"])]) as env:
        def rtt_ms() -> float:
            return float(env["client"].exec([PY, "-c", TIMER, "web"]).stdout)

        base = rtt_ms()
        try:
            env["web"].link.delay(200)
        except HostUnsupported as e:
            assert "service 'web': link.delay() needs the kernel's netem" in str(e)
            assert "modprobe sch_netem" in str(e)
            pytest.skip("this kernel has no netem qdisc (sch_netem): link.delay() is unsupported here")
        delayed = rtt_ms()
        assert 150 <= delayed - base <= 400, (base, delayed)
        env["web"].link.clear()
        assert rtt_ms() < base + 50


def _net_namespaces(pid: int) -> set[str]:
    """The network namespaces a process holds open (by fd) or has a thread in."""
    found = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            found.add(os.readlink(f"/proc/{pid}/task/{tid}/ns/net"))
        except OSError:
            continue
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("net:["):
            found.add(target)
    return found


def _holds_nothing_but_its_own(sup: SupervisorClient) -> bool:
    """The supervisor holds its own namespace and, once networks were used, one hub made ahead:
    nothing of any environment (the relay loop's thread leaves a released service's namespaces)."""
    census = sup.call(CensusRequest())
    expected = 1 + int(census.spare_hubs)
    return not census.slots and not census.hubs and len(_net_namespaces(sup.pid)) == expected


def test_teardown_leaves_no_network_namespace_or_link() -> None:
    """Nothing on the host but the links of the hubs kept for the next environments, down: no
    route of theirs (their subnets are routed only while an environment has them)."""
    sup = get_supervisor()
    before_links = host_links()
    for i in range(10):
        with Environment([web(), client(aliases=[f"c{i}"])]) as env:
            assert len(_net_namespaces(sup.pid)) >= 4  # its own, the hub, two services
            assert env["web"].http.get("/").text == "web"
    assert wait_until(lambda: _holds_nothing_but_its_own(sup) or None, Deadline(5)), (
        sup.call(CensusRequest()), _net_namespaces(sup.pid))
    kept = set(sup.call(CensusRequest()).host_links)
    assert host_links() == before_links  # environments' links aside (ours: just below)
    assert len(kept) <= MAX_FREE_HUBS + 1  # the hubs kept, and the one made ahead
    for link in kept:
        with open(f"/sys/class/net/{link}/flags") as f:
            assert not int(f.read(), 16) & 1, f"{link} is up"  # down: its route is gone
    with open("/proc/net/route") as f:
        assert not [line for line in f if line.split()[0] in kept]


def test_the_next_environment_reuses_the_hub_and_inherits_nothing_from_it() -> None:
    """A closed environment's hub is reset and reused (destroying a bridge stalls the kernel's
    network configuration for tens of milliseconds). The next environment, with the same names
    and subnet, hence the same addresses behind new MACs, reaches its services from the test
    and from each other, with none of the faults the first one left in place."""
    sup = get_supervisor()
    with Environment([web("one"), client()]) as first:
        assert first["web"].http.get("/", timeout=5).text == "one"  # the hub learns web's MAC
        assert fetch(first, "http://web:8000/") == "one"
        first.network.partition(["client"], ["web"])
        first["client"].link.loss(100)
        assert fetch(first, "http://web:8000/", timeout=1.0).startswith("failed")
        hub = sup.call(CensusRequest()).hub_netns[first.id]
    assert wait_until(lambda: sup.call(CensusRequest()).spare_hubs >= 1 or None, Deadline(5))
    with Environment([web("two"), client()]) as second:
        assert second["web"].ip == first["web"].ip  # the same address, a new MAC behind it
        assert sup.call(CensusRequest()).hub_netns[second.id] == hub  # the same hub
        assert second["web"].http.get("/", timeout=5).text == "two"
        assert fetch(second, "http://web:8000/", timeout=5.0) == "two"
        assert fetch(second, "http://client:8000/", timeout=1.0).startswith("failed")  # sanity


def test_loss_100_fails_connections_and_clear_restores_them() -> None:
    with Environment([web(), client(depends_on=["web"])]) as env:
        env["web"].link.loss(100)
        assert fetch(env, "http://web:8000/", timeout=1.0).startswith("failed:")
        env["web"].link.clear()
        assert fetch(env, "http://web:8000/") == "web"
        env["web"].link.loss(100)
        env["web"].link.loss(0)  # loss(0) removes it too
        assert fetch(env, "http://web:8000/") == "web"


# Counts datagrams on UDP 9999; "FIN" writes to /tmp/done how many arrived, and how many the
# kernel dropped because this socket's buffer was full (not the link's doing: not counted as lost).
SINK = """
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
s.bind(("0.0.0.0", 9999))
print("listening", flush=True)
n = 0
while True:
    data = s.recv(2048)
    if data == b"WARM":
        continue
    if data != b"FIN":
        n += 1
        continue
    drops = 0
    for line in open("/proc/net/udp").read().splitlines()[1:]:
        fields = line.split()
        if fields[1].endswith(":270F"):
            drops = int(fields[-1])
    open("/tmp/done", "w").write(f"{n} {drops}")
"""

# Sends at a steady rate, as a client would: a burst of 1000 would overflow the kernel's
# per-CPU backlog (net.core.netdev_max_backlog) and lose datagrams that no fault dropped.
SEND = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(int(sys.argv[2])):
    s.sendto(sys.argv[3].encode(), (sys.argv[1], 9999))
    time.sleep(0.0002)
"""


def test_loss_30_drops_about_30_percent_of_1000_datagrams() -> None:
    sink = Service("sink", [PY, "-c", SINK], ready=probe.log("listening"))
    with Environment([sink, client(depends_on=["sink"])]) as env:
        # Loss hits every frame, ARP too: resolve the sink's address before, or a lost ARP
        # exchange would drop every datagram sent until the next try (a second later).
        env["client"].exec([PY, "-c", SEND, "sink", "1", "WARM"])
        env["sink"].link.loss(30)
        env["client"].exec([PY, "-c", SEND, "sink", "1000", "x"])
        env["sink"].link.clear()
        # Datagrams on a link keep their order: once a FIN (sent with no loss) has arrived,
        # every earlier datagram has arrived or was dropped.
        def done() -> str | None:
            env["client"].exec([PY, "-c", SEND, "sink", "1", "FIN"])
            r = env["sink"].exec(["cat", "/tmp/done"])
            return r.stdout.strip() or None

        received, overflowed = (int(x) for x in (wait_until(done, Deadline(10)) or "-1 0").split())
        lost = 1000 - received - overflowed  # dropped on the link
        assert 200 <= lost <= 400, f"{lost} of 1000 datagrams lost with loss(30) ({overflowed} " \
            "more overflowed the receiver's buffer)"


def test_partition_cuts_exactly_the_named_pairs_and_heal_restores_them() -> None:
    services = [Service(n, [PY, "-c", SERVER], ports=[8000], ready=probe.tcp(8000), env={"MARK": n})
                for n in ("a", "b", "c")]  # fmt: skip
    with Environment(services) as env:
        def reach(src: str, dst: str) -> bool:
            return fetch(env, f"http://{dst}:8000/", timeout=1.0, src=src) == dst

        def recovers(src: str, dst: str) -> bool:
            """After heal(): a neighbour (ARP) entry that failed meanwhile takes a moment."""
            return wait_until(lambda: reach(src, dst) or None, Deadline(10)) is True

        env.network.partition(["a"], ["b", "c"])
        assert not reach("a", "b") and not reach("b", "a")
        assert not reach("a", "c") and not reach("c", "a")
        assert reach("b", "c") and reach("c", "b")  # not named together: untouched
        assert env["a"].http.get("/", timeout=5).text == "a"  # the test's own traffic too
        env.network.heal()
        assert recovers("a", "b") and recovers("b", "a") and recovers("c", "a")
        env.network.partition(["b"], ["c"])
        assert not reach("b", "c") and reach("a", "b") and reach("a", "c")
        env.network.heal()
        assert recovers("b", "c")
        with pytest.raises(KeyError, match="no service 'nope'"):
            env.network.partition(["a"], ["nope"])


def test_the_subnet_is_configurable() -> None:
    with Environment([client()], subnet="10.99.0.0/28") as env:
        assert env.network.subnet == "10.99.0.0/28"
        assert env["client"].ip == "10.99.0.2"  # .1 is the environment's own end of the bridge
        assert "10.99.0.2/28" in env["client"].exec(["ip", "-4", "-o", "addr", "show", "eth0"]).stdout


# Ready one second after it starts; says when it started, by the clock every process shares.
SLOW = """
import os, sys, time
print("started", time.clock_gettime(time.CLOCK_MONOTONIC), flush=True)
time.sleep(1)
print("ready", time.clock_gettime(time.CLOCK_MONOTONIC), flush=True)
time.sleep(1000)
"""


def _stamp(env: Environment, name: str, what: str) -> float:
    m = re.search(rf"^{what} ([\d.]+)$", env[name].logs(), re.M)
    assert m is not None, env[name].logs()
    return float(m.group(1))


def test_three_independent_services_start_in_parallel() -> None:
    slow = [Service(n, [PY, "-c", SLOW], ready=probe.log("^ready")) for n in ("s1", "s2", "s3")]
    t0 = time.monotonic()
    with Environment(slow) as env:
        elapsed = time.monotonic() - t0
        assert elapsed < 1.6, f"three services ready 1 s after their start took {elapsed:.2f} s"
        starts = [_stamp(env, n, "started") for n in ("s1", "s2", "s3")]
        assert max(starts) - min(starts) < 0.3


def test_a_service_starts_only_after_its_dependencies_are_ready() -> None:
    slow = [Service(n, [PY, "-c", SLOW], ready=probe.log("^ready")) for n in ("s1", "s2")]
    after = Service("after", [PY, "-c", SLOW], ready=probe.log("^ready"), depends_on=["s1", "s2"])
    with Environment([*slow, after]) as env:
        ready = max(_stamp(env, n, "ready") for n in ("s1", "s2"))
        assert _stamp(env, "after", "started") >= ready


@pytest.mark.slow
def test_200_environments_leave_the_host_as_it_was() -> None:
    sup = get_supervisor()

    def host_state() -> tuple[list[str], list[str]]:
        # What envbox could have made only (its links, its mounts), never the host's counts,
        # which other programs change at any time; environments' links aside: see the teardown
        # test.
        return sorted(host_links()), our_mounts()

    with Environment([client()]):
        pass  # the supervisor is up, a spare prepared
    before = host_state()
    for i in range(200):
        with Environment([client(), Service("peer", ["sleep", "1000"], aliases=[f"p{i}"])]) as env:
            if i % 50 == 0:
                assert env["peer"].ip != env["client"].ip
    assert host_state() == before
    assert wait_until(lambda: _holds_nothing_but_its_own(sup) or None, Deadline(5)), (
        sup.call(CensusRequest()), _net_namespaces(sup.pid))


def test_a_loopback_only_service_is_published_on_its_loopback_without_the_links_faults() -> None:
    with Environment([web("lo-only", env={"BIND": "127.0.0.1"})]) as env:
        h = env["web"]
        assert h.http.get("/", timeout=5).text == "lo-only"  # its address refused: loopback
        h.link.loss(100)
        assert h.http.get("/", timeout=5).text == "lo-only"  # as documented: no link crossed


@pytest.mark.needs_root("the test process itself makes a network namespace and an nf_tables table")
def test_hundreds_of_drop_rules_go_in_one_batch() -> None:
    """A partition of 12 services against 13 is 312 rules: every one acknowledged, no ENOBUFS."""
    from pytest_envbox.kernel import netlink, nftables

    hub = netlink.new_netns()
    try:
        drops = [nftables.Drop(iif=f"v{i}", oif=f"v{j}") for i in range(20) for j in range(20)]

        def replace() -> None:
            nftables.replace_table("envbox", drops)
            nftables.replace_table("envbox", drops[:3])  # replaced as a whole
            nftables.replace_table("envbox", [])

        netlink.call_in(hub, replace)
    finally:
        os.close(hub)
