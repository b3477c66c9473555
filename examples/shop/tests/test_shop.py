"""The example shop's services, each started in its own sandbox by pytest-envbox.

Tests reach a service through the port envbox publishes on the host's 127.0.0.1: ``handle.port()``
for raw TCP, ``handle.http`` for HTTP.
"""

from __future__ import annotations

import ipaddress
import socket

import pytest

from pytest_envbox import Environment, Service, ServiceHandle, probe


def kv(handle: ServiceHandle, *commands: str, port: int = 6379) -> list[str]:
    """Send commands to a cache service through its published port; return its replies."""
    with socket.create_connection(("127.0.0.1", handle.port(port)), timeout=5) as conn:
        replies = conn.makefile("r")
        out = []
        for command in commands:
            conn.sendall(command.encode() + b"\n")
            out.append(replies.readline().rstrip("\n"))
        return out


# --- services by name (declared in pyproject.toml, or by the hook in conftest.py) ----------------


@pytest.mark.envbox("catalog")
def test_catalog_serves_the_products_of_its_data_mount(envbox: Environment) -> None:
    response = envbox["catalog"].http.get("/products")
    assert response.status_code == 200
    assert {p["sku"] for p in response.json()} == {"tea-green", "tea-black", "mug-blue"}


@pytest.mark.envbox("catalog")
def test_an_unknown_product_is_a_404_and_is_logged(envbox: Environment) -> None:
    catalog = envbox["catalog"]
    assert catalog.http.get("/products/teapot").status_code == 404
    # http.server logs each request on stderr; wait_for_log returns the re.Match.
    match = catalog.wait_for_log(r'"GET /products/(\S+) HTTP/1.1" 404', timeout=5)
    assert match[1] == "teapot"
    assert "catalog: serving 3 products on 127.0.0.1:8000" in catalog.logs()


@pytest.mark.envbox("cache")
def test_cache_stores_and_returns_values(envbox: Environment) -> None:
    cache = envbox["cache"]
    assert kv(cache, "SET colour blue", "GET colour", "DEL colour", "GET colour") == [
        "OK", "blue", "1", "(nil)",
    ]  # fmt: skip


@pytest.mark.envbox("cache")
def test_the_cache_stays_within_its_memory_limit(envbox: Environment) -> None:
    cache = envbox["cache"]
    before = cache.stats()  # from its cgroup: limits = { memory = "64Mi", pids = 32 }
    kv(cache, *(f"SET key{i} {'x' * 1000}" for i in range(1000)))  # about 1 MB of values
    stats = cache.stats()
    assert stats.memory_bytes > before.memory_bytes + 2**19  # the values are counted
    assert stats.oom_kills == 0
    assert stats.memory_peak_bytes < 64 * 2**20
    assert stats.pids <= 32


@pytest.mark.envbox("cache")
def test_a_cache_that_grows_past_its_limit_is_oom_killed(envbox: Environment) -> None:
    """What production would do to a leaking cache, here in the test: the kernel kills it."""
    cache = envbox["cache"]
    megabyte = "x" * 2**20
    for i in range(256):  # up to 256 MiB: far past its 64Mi limit
        if kv(cache, f"SET big{i} {megabyte}") != ["OK"]:
            break  # the connection closed without an answer: the cache is gone
    assert cache.stats().oom_kills >= 1


@pytest.mark.envbox("cache")
def test_a_paused_cache_does_not_answer_until_resumed(envbox: Environment) -> None:
    cache = envbox["cache"]
    cache.pause()  # every process of the service frozen: a hung dependency
    with socket.create_connection(("127.0.0.1", cache.port(6379)), timeout=5) as conn:
        conn.settimeout(0.3)
        conn.sendall(b"PING\n")
        with pytest.raises(TimeoutError):
            conn.recv(64)
        cache.resume()
        conn.settimeout(5)
        assert conn.recv(64) == b"PONG\n"


@pytest.mark.envbox("files")
def test_a_service_declared_by_the_conftest_hook(envbox: Environment) -> None:
    products = envbox["files"].http.get("/products.json").json()
    assert products[0]["sku"] == "tea-green"


# --- lifecycle -----------------------------------------------------------------------------------


@pytest.mark.envbox("cache")
def test_restart_is_a_fresh_process_on_the_same_port(envbox: Environment) -> None:
    cache = envbox["cache"]
    pid, port = cache.pid, cache.port(6379)
    assert kv(cache, "SET greeting hello") == ["OK"]

    cache.restart()  # SIGTERM, wait until it exits, start again, wait until ready

    assert cache.running and cache.pid != pid
    assert cache.port(6379) == port
    assert kv(cache, "GET greeting") == ["(nil)"]  # its memory went with the old process
    assert "cache: shutting down with 1 keys" in cache.logs()  # SIGTERM reached the service


@pytest.mark.envbox("cache")
def test_a_killed_service_reports_its_return_code(envbox: Environment) -> None:
    cache = envbox["cache"]
    cache.kill()  # SIGKILL by default; returns once the process is gone
    assert not cache.running
    assert cache.returncode == 137  # 128 + SIGKILL
    cache.start()
    assert kv(cache, "PING") == ["PONG"]


# --- exec: run a command inside a running service ---------------------------------------------


@pytest.mark.envbox("cache")
def test_exec_runs_a_client_inside_the_service(envbox: Environment) -> None:
    cache = envbox["cache"]
    kv(cache, "SET colour green")
    # Inside the sandbox 127.0.0.1:6379 is the cache itself; the cwd is the rootdir, read-only.
    result = cache.exec(["python3", "services/kv.py", "GET colour"])
    assert result.returncode == 0, result.stderr
    assert result.stdout == "green\n"


# --- a topology, shared by the module's tests --------------------------------------------------

SEEN_PIDS: set[int | None] = set()


@pytest.mark.envbox(topology="shop", scope="module")
def test_the_topology_starts_every_member(envbox: Environment) -> None:
    assert sorted(envbox.services) == ["cache", "catalog"]
    assert envbox["catalog"].http.get("/health").json() == {"status": "ok"}
    SEEN_PIDS.add(envbox["cache"].pid)


@pytest.mark.envbox(topology="shop", scope="module")
def test_tests_with_the_same_marker_and_scope_share_one_environment(envbox: Environment) -> None:
    SEEN_PIDS.add(envbox["cache"].pid)
    assert len(SEEN_PIDS) == 1


# --- the environment's private network ------------------------------------------------------------


@pytest.mark.envbox(topology="shop")
def test_services_reach_each_other_by_name(envbox: Environment) -> None:
    # Inside the catalog's sandbox, the cache is simply "cache" (each service's /etc/hosts).
    r = envbox["catalog"].exec(["python3", "services/kv.py", "--host", "cache", "PING"])
    assert r.stdout == "PONG\n", r.stderr
    assert envbox["cache"].ip != envbox["catalog"].ip


@pytest.mark.envbox(topology="shop")
def test_a_partition_cuts_the_catalog_off_from_the_cache(envbox: Environment) -> None:
    catalog = envbox["catalog"]
    envbox.network.partition(["catalog"], ["cache"])
    r = catalog.exec(["python3", "services/kv.py", "--host", "cache", "PING"])
    assert r.returncode == 1 and "timed out" in r.stderr  # packets vanish, as in a real partition
    assert kv(envbox["cache"], "PING") == ["PONG"]  # the test's own way in is untouched
    envbox.network.heal()


# --- services defined in the test itself ----------------------------------------------------------

SCRATCH = Service(
    "scratch",
    ["python3", "services/cache.py", "--port", "7000"],
    ports=[7000],
    # Ready when a client run inside the service gets an answer.
    ready=probe.exec(["python3", "services/kv.py", "--port", "7000", "PING"], timeout="10s"),
)


@pytest.mark.envbox(SCRATCH)
def test_an_inline_service(envbox: Environment) -> None:
    assert kv(envbox["scratch"], "PING", port=7000) == ["PONG"]


def test_without_a_marker_services_start_on_demand(envbox: Environment) -> None:
    assert len(envbox) == 0
    cache = envbox.start("cache")  # by name, or a Service
    assert kv(cache, "PING") == ["PONG"]


# --- isolation: what a service sees ---------------------------------------------------------------


@pytest.mark.envbox("catalog", scope="class")
class TestIsolation:
    def test_the_hostname_is_the_service_name(self, envbox: Environment) -> None:
        catalog = envbox["catalog"]
        assert catalog.http.get("/whoami").json()["hostname"] == "catalog"
        assert catalog.exec(["hostname"]).stdout == "catalog\n"

    def test_it_sees_only_its_own_processes(self, envbox: Environment) -> None:
        code = "import os; print(*sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))"
        pids = [int(p) for p in envbox["catalog"].exec(["python3", "-c", code]).stdout.split()]
        # PID 1 is envbox's init, then the service, then this very command.
        assert pids[0] == 1
        assert len(pids) <= 4

    def test_the_host_filesystem_is_read_only(self, envbox: Environment) -> None:
        catalog = envbox["catalog"]
        for path in ("/etc/envbox-was-here", "/data/new.json"):
            result = catalog.exec(["touch", path])
            assert result.returncode != 0
            assert "Read-only file system" in result.stderr

    def test_tmp_and_home_are_private_and_writable(self, envbox: Environment) -> None:
        result = envbox["catalog"].exec(
            ["sh", "-c", 'echo scratch > /tmp/a && echo home > "$HOME/b" && cat /tmp/a "$HOME/b"']
        )
        assert result.stdout == "scratch\nhome\n"

    def test_the_environment_is_the_base_plus_env(self, envbox: Environment) -> None:
        lines = envbox["catalog"].exec(["env"]).stdout.splitlines()
        env = dict(line.split("=", 1) for line in lines)
        assert sorted(env) == [
            "CATALOG_NAME", "HOME", "HOSTNAME", "LANG", "PATH", "PYTHONUNBUFFERED", "TMPDIR",
        ]  # fmt: skip
        assert env["HOME"] == "/home/envbox"
        assert env["HOSTNAME"] == "catalog"

    def test_there_is_no_route_out(self, envbox: Environment) -> None:
        # Inspect the routing table rather than send anything anywhere: only the environment's
        # own subnet, on eth0; no default route (destination 0.0.0.0, mask 0.0.0.0).
        routes = envbox["catalog"].exec(["cat", "/proc/net/route"]).stdout.splitlines()[1:]
        subnet = ipaddress.IPv4Network(envbox.network.subnet)  # e.g. 198.18.0.0/24
        little_endian = [a.packed[::-1].hex().upper() for a in (subnet.network_address, subnet.netmask)]
        assert [(r.split()[0], r.split()[1], r.split()[7]) for r in routes] == [("eth0", *little_endian)]
        assert ipaddress.IPv4Address(envbox["catalog"].ip) in subnet

    def test_loopback_is_its_own_not_the_hosts(self, envbox: Environment) -> None:
        with socket.create_server(("127.0.0.1", 0)) as host_server:  # listening on the host
            port = host_server.getsockname()[1]
            code = f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2)"
            result = envbox["catalog"].exec(["python3", "-c", code])
        assert "Connection refused" in result.stderr
