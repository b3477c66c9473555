"""Fixed host ports and ranges (issue 16, item 3): honoured, kept over a restart, freed at
teardown; a taken one fails the environment before anything starts, naming who holds it.

Traffic stays on 127.0.0.1 and inside the environments' own namespaces.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from pytest_envbox import Environment, Service, ServiceFailed, probe
from pytest_envbox.engine.client import get_supervisor, rootless
from pytest_envbox.kernel.portholders import holders
from pytest_envbox.supervisor.protocol import CensusRequest
from pytest_envbox.wait import Deadline, wait_until
from tests.kernel import started_sandboxes

# Answers each connection with $MARK, then closes. A host program: the service's rootdir may be
# a checkout under /tmp, which the sandbox's private /tmp hides.
PY = "/usr/bin/python3"
SERVER = """
import os, socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 7000))
s.listen()
while True:
    c, _ = s.accept()
    c.sendall(os.environ["MARK"].encode())
    c.close()
"""
ROOT = Path(__file__).resolve().parents[2]


def server(name: str = "web", mark: str = "web", ports: object = (7000,)) -> Service:
    return Service(name, [PY, "-c", SERVER], ports=ports, env={"MARK": mark},  # type: ignore[arg-type]
                   ready=probe.tcp(7000))  # fmt: skip


def free_ports(n: int) -> list[int]:
    """n ports free on 127.0.0.1 now, apart from each other (bound together, then let go)."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def free_range(width: int) -> int:
    """The low end of ``width`` consecutive ports free on 127.0.0.1 now, outside the ephemeral
    range (where the relays' own free ports come from)."""
    for low in range(20000 + os.getpid() % 5000 * 2, 32000, width):
        if all(not holders(p) for p in range(low, low + width)):
            return low
    pytest.skip("no free range of host ports")


def fetch(port: int) -> str:
    # A generous deadline, not a timing: other suites may load this machine heavily.
    with socket.create_connection(("127.0.0.1", port), timeout=30) as c:
        return c.recv(100).decode()


@contextmanager
def held(port: int) -> Iterator[socket.socket]:
    """A plain socket of this process listening on 127.0.0.1:port."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()
        yield s


def nothing_started(env: Environment) -> None:
    """Nothing of the environment is left in the supervisor: no slot, no network, no sandbox."""
    sup = get_supervisor()
    census = sup.call(CensusRequest())
    assert not [s for s in census.slots if s.startswith(env.id + "/")]
    assert env.id not in census.hubs
    assert len(env.services) == 0 or all(not h.running for h in env.services.values())


def test_a_fixed_host_port_is_honoured_kept_over_a_restart_and_freed_at_teardown() -> None:
    [port] = free_ports(1)
    env = Environment([server(ports=[{"port": 7000, "host": port}])])
    with env:
        web = env["web"]
        assert web.port(7000) == port
        assert web.url("/x") == f"http://127.0.0.1:{port}/x"
        assert fetch(port) == "web"
        h = holders(port)[0]
        assert h.pid == get_supervisor().pid and h.listening
        pid = web.pid
        web.restart()
        assert web.pid != pid and web.port(7000) == port
        assert fetch(port) == "web"
    assert holders(port) == [] or all(not h.listening for h in holders(port))
    # Right after, another environment takes the same port.
    with Environment([server(mark="again", ports=[f"{port}:7000"])]) as env2:
        assert env2["web"].port(7000) == port and fetch(port) == "again"


def test_a_range_gives_each_environment_a_port_of_its_own() -> None:
    low = free_range(3)
    spec = server(ports=[f"{low}-{low + 2}:7000"])
    with Environment([spec]) as one, Environment([spec.with_changes(env={"MARK": "two"})]) as two:
        a, b = one["web"].port(7000), two["web"].port(7000)
        assert low <= a <= low + 2 and low <= b <= low + 2 and a != b
        assert a == low  # the first free one
        assert (fetch(a), fetch(b)) == ("web", "two")


def test_pairwise_ranges_and_a_fixed_port_inside_another_services_range() -> None:
    low = free_range(4)
    a = Service("a", [PY, "-c", SERVER.replace("7000", "7001")], env={"MARK": "a"},
                ports=[f"{low}-{low + 1}:7000-7001"], ready=probe.tcp(7001))  # fmt: skip
    b = server("b", "b", ports=[{"port": 7000, "host": f"{low}-{low + 3}"}])
    with Environment([a, b]) as env:
        assert (env["a"].port(7000), env["a"].port(7001)) == (low, low + 1)
        assert env["b"].port(7000) == low + 2  # steps over the ports that a fixes
        assert (fetch(low + 1), fetch(low + 2)) == ("a", "b")


def test_a_port_held_by_a_plain_socket_fails_the_environment_naming_the_holder() -> None:
    free, taken = free_ports(2)
    sup = get_supervisor()
    before = started_sandboxes(sup.pid)
    first = server("first", ports=[{"port": 7000, "host": free}])
    second = server("second", ports=[f"{taken}:7000"]).with_changes(depends_on=["first"])
    env = Environment([first, second])
    with held(taken), pytest.raises(ServiceFailed) as info:
        env.open()
    text = str(info.value)
    assert info.value.service == "second"
    assert f"its port 7000 cannot be published: host port {taken} is taken on 127.0.0.1" in text
    comm = Path("/proc/self/comm").read_text().strip()
    assert f"held by pid {os.getpid()} ({comm}, user " in text
    assert f'stop that process, or give another host port, a range (host = "{taken}-{taken + 20}")' in text
    # Before anything started: no service ran, and the port reserved for `first` is free again.
    assert env.services == {} or all(h.returncode is None and h.pid is None for h in env.services.values())
    nothing_started(env)
    assert started_sandboxes(sup.pid) <= before
    assert holders(free) == []


def test_a_service_started_later_reserves_its_port_before_it_starts() -> None:
    free, taken = free_ports(2)
    with Environment([server("first", ports=[f"{free}:7000"])]) as env:
        with held(taken), pytest.raises(ServiceFailed, match=f"host port {taken} is taken"):
            env.start(server("late", ports=[f"{taken}:7000"]))
        census = get_supervisor().call(CensusRequest())
        assert f"{env.id}/late" not in census.slots and f"{env.id}/first" in census.slots
        assert fetch(free) == "web"
        # Once the port is free, the same service starts, on it.
        late = env.start("late")
        assert late.port(7000) == taken and fetch(taken) == "web"


def test_a_port_held_by_another_environment_of_this_process_says_so() -> None:
    [port] = free_ports(1)
    with Environment([server(ports=[f"{port}:7000"])]) as one:
        other = Environment([server(mark="other", ports=[f"{port}:7000"])])
        with pytest.raises(ServiceFailed) as info:
            other.open()
        text = str(info.value)
        assert f"this test process's own envbox supervisor (pid {get_supervisor().pid})" in text
        assert "give a range" in text and "or no host port" in text and "handle.port(7000)" in text
        nothing_started(other)
        assert fetch(one["web"].port(7000)) == "web"  # the first one is untouched


def other_run(port: int) -> subprocess.Popen[str]:
    """Another test process (as an xdist worker would be) with an environment that fixes
    ``port``; it holds it until its stdin closes."""
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from pytest_envbox import Environment, Service, probe
        svc = Service("web", [{PY!r}, "-c", {SERVER!r}], ports=["{port}:7000"], env={{"MARK": "x"}},
                      ready=probe.tcp(7000))
        with Environment([svc]):
            print("up", flush=True)
            sys.stdin.read()
    """)
    other = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert other.stdout is not None and other.stdout.readline() == "up\n"
    return other


def test_a_port_held_by_another_test_run_names_its_supervisor_and_suggests_a_range() -> None:
    [port] = free_ports(1)
    other = other_run(port)
    try:
        env = Environment([server(ports=[f"{port}:7000"])])
        with pytest.raises(ServiceFailed) as info:
            env.open()
        text = str(info.value)
        assert f"of another test run or xdist worker (pid {other.pid}: " in text
        assert f'give a range (host = "{port}-{port + 20}") or no host port' in text
        nothing_started(env)
    finally:
        assert other.stdin is not None
        other.stdin.close()
        other.wait(30)


def test_a_fixed_port_is_free_again_after_kill_9_of_the_test_process_that_held_it() -> None:
    [port] = free_ports(1)
    other = other_run(port)
    other.kill()
    other.wait(10)
    # Its supervisor sees the end of its socket, tears down and exits: the port goes with it.
    gone = wait_until(lambda: True if not any(h.listening for h in holders(port)) else None, Deadline(10))
    assert gone, holders(port)
    with Environment([server(ports=[f"{port}:7000"])]) as env:
        assert fetch(env["web"].port(7000)) == "web"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to bind as another user")
def test_a_holder_of_another_user_is_found_by_its_uid_alone() -> None:
    """Another user's fds are unreadable: the socket is found, its process is not; the message
    then names the uid (the words: tests/unit/test_ports.py)."""
    import pytest_envbox.kernel.portholders as portholders

    [port] = free_ports(1)
    holder = subprocess.Popen(
        [PY, "-c", f"import socket,sys; s=socket.socket(); s.bind(('127.0.0.1',{port})); "
                   "s.listen(); print('up', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, user=65534, group=65534)  # fmt: skip
    # The module alone (it needs only the standard library), where the other user can read it
    # (pytest's tmp_path is private to root).
    lookup = Path(tempfile.mkdtemp(prefix="envbox-test-"))
    (lookup / "portholders.py").write_text(Path(portholders.__file__).read_text())
    for path in (lookup, lookup / "portholders.py"):
        path.chmod(0o755)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "up\n"
        [seen_by_root] = holders(port)
        assert (seen_by_root.pid, seen_by_root.uid) == (holder.pid, 65534)
        out = subprocess.run([PY, "-c", f"import portholders; print(portholders.holders({port}))"],
                             cwd=lookup, capture_output=True, text=True, user=65533, group=65533,
                             extra_groups=[], check=True)  # fmt: skip
        expected = "Holder(uid=65534, listening=True, pid=None, comm='', cmdline='', ppid=None)"
        assert out.stdout.strip() == f"[{expected}]"
    finally:
        shutil.rmtree(lookup)
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(10)


def test_a_port_below_the_unprivileged_ones_works_as_root_and_is_refused_clearly_rootless() -> None:
    start = int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    if start <= 1:
        pytest.skip("this host lets anyone bind any port")
    port = next((p for p in range(min(start, 1024) - 1, 0, -1) if not holders(p)), None)
    if port is None:
        pytest.skip("no free privileged port")
    env = Environment([server(ports=[{"port": 7000, "host": port}])])
    if not rootless():
        with env:
            assert env["web"].port(7000) == port and fetch(port) == "web"
        return
    with pytest.raises(ServiceFailed) as info:
        env.open()
    assert f"host ports below {start} need root (CAP_NET_BIND_SERVICE), and rootless mode" in str(info.value)
    nothing_started(env)
