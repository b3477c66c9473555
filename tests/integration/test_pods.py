"""What Compose files and Kubernetes pods need of the engine: services sharing one network
namespace (``network_of``), services that run to completion (``oneshot``), the environment's own
volumes, ``stop_signal`` and the address placeholder; checked against what the kernel says."""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import pytest

from pytest_envbox import Environment, Service, ServiceFailed, probe
from pytest_envbox.mounts import Volume
from pytest_envbox.spec import POD_IP

PY = sys.executable


def py(code: str) -> list[str]:
    return [PY, "-c", textwrap.dedent(code)]


ECHO = py("""
    import socket, sys
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen()
    while True:
        c, _ = s.accept(); c.sendall(b"hello from localhost"); c.close()
""")


def _netns(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def test_a_pods_containers_share_one_network_namespace_and_reach_each_other_on_localhost() -> None:
    app = Service("pod-app", [*ECHO, "7000"], ready=probe.tcp(7000), ports=[7000])
    sidecar = Service("pod-sidecar", ["sleep", "1000"], network_of="pod-app")
    other = Service("other", ["sleep", "1000"])
    with Environment([app, sidecar, other]) as env:
        a, s, o = env["pod-app"], env["pod-sidecar"], env["other"]
        assert a.pid and s.pid and o.pid
        assert _netns(a.pid) == _netns(s.pid) != _netns(o.pid)
        assert os.stat(f"/proc/{a.pid}/ns/mnt").st_ino != os.stat(f"/proc/{s.pid}/ns/mnt").st_ino
        got = s.exec(py("""
            import socket; c = socket.create_connection(("127.0.0.1", 7000)); print(c.recv(99).decode())
        """))
        assert got.stdout.strip() == "hello from localhost", got.stderr
        assert s.ip == a.ip
        hosts = s.exec(["cat", "/etc/hosts"]).stdout
        assert f"{a.ip}\tpod-sidecar" in hosts and f"{a.ip}\tpod-app" in hosts
        # The published port of the pod reaches the container listening in it.
        assert a.port(7000)
        # A restarted sidecar goes back into the pod's namespace.
        s.restart()
        assert s.pid and _netns(s.pid) == _netns(a.pid)


def test_oneshot_services_complete_before_their_dependents_start(tmp_path: Path) -> None:
    marker = tmp_path / "out"
    marker.mkdir()
    init = Service("init", ["sh", "-c", "echo migrated > /out/done"], oneshot=True,
                   mounts=[{"source": str(marker), "target": "/out", "readonly": False}])
    app = Service("app", ["sh", "-c", "cat /out/done && exec sleep 1000"], depends_on=["init"],
                  mounts=[{"source": str(marker), "target": "/out"}], ready=probe.log("migrated"))
    with Environment([app, init]) as env:
        assert env["init"].returncode == 0 and not env["init"].running
        assert env["app"].running
        assert "migrated" in env["app"].logs()


def test_a_oneshot_service_that_fails_fails_the_environment_with_its_code_and_log() -> None:
    bad = Service("migrate", ["sh", "-c", "echo schema broken; exit 3"], oneshot=True)
    app = Service("app", ["sleep", "1000"], depends_on=["migrate"])
    env = Environment([app, bad])
    with pytest.raises(ServiceFailed) as info:
        env.open()
    assert "return code 3" in str(info.value) and "schema broken" in str(info.value)
    assert "app" not in env  # never started


def test_volumes_are_shared_by_name_hold_their_files_and_go_with_the_environment() -> None:
    files = (("app.conf", b"level=debug\n", 0o644), ("sub/x", b"x", 0o600))
    writer = Service("writer", ["sh", "-c", "echo data > /data/f && exec sleep 1000"],
                     volumes=[Volume("shared", "/data")], user="nobody")
    reader = Service("reader", ["sleep", "1000"], depends_on=["writer"],
                     volumes=[{"volume": "shared", "target": "/mnt/in", "readonly": True},
                              Volume("conf", "/etc/app", readonly=True, files=files),
                              Volume("one", "/etc/one.conf", readonly=True,
                                     files=(("", b"single\n", 0o400),))])
    with Environment([writer, reader]) as env:
        r = env["reader"]
        assert r.exec(["cat", "/mnt/in/f"]).stdout == "data\n"
        assert r.exec(["cat", "/etc/app/app.conf", "/etc/app/sub/x"]).stdout == "level=debug\nx"
        assert r.exec(["cat", "/etc/one.conf"]).stdout == "single\n"
        denied = r.exec(["sh", "-c", "echo no > /mnt/in/g"])
        assert denied.returncode != 0 and "Read-only" in denied.stderr
        volumes = env.volume("shared").parent
        assert sorted(p.name for p in volumes.iterdir()) == ["conf", "one", "shared"]
        assert env.volume("one").read_bytes() == b"single\n"
        assert volumes.parent != env.workdir  # apart from the logs, which a run may keep
    assert not volumes.exists()


def test_volumes_go_with_the_environment_even_when_its_workdir_is_kept(tmp_path: Path) -> None:
    svc = Service("s", ["sh", "-c", "echo x > /v/f && exec sleep 1000"], volumes=[Volume("v", "/v")],
                  user="nobody")
    with Environment([svc], workdir=tmp_path / "work") as env:
        volume = env.volume("v")
        assert env["s"].exec(["cat", "/v/f"]).stdout == "x\n"
    assert (tmp_path / "work" / "s.log").exists()  # the logs stay
    assert not volume.exists() and not volume.parent.exists()


def test_stop_signal_is_the_signal_a_stop_sends() -> None:
    code = py("""
        import signal, sys, time
        signal.signal(signal.SIGQUIT, lambda *a: sys.exit(42))
        print("up", flush=True)
        time.sleep(1000)
    """)
    with Environment([Service("s", code, stop_signal="QUIT", ready=probe.log("up"))]) as env:
        env["s"].stop()
        assert env["s"].returncode == 42


def test_the_address_placeholder_becomes_the_services_own_address() -> None:
    svc = Service("s", ["sh", "-c", f"echo $MY_IP {POD_IP}; exec sleep 1000"],
                  env={"MY_IP": f"ip={POD_IP}"}, ready=probe.log("ip="))
    side = Service("side", ["sh", "-c", f"echo side {POD_IP}; exec sleep 1000"], network_of="s",
                   ready=probe.log("side"))
    with Environment([svc, side]) as env:
        ip = env["s"].ip
        assert f"ip={ip} {ip}" in env["s"].logs()
        assert f"side {ip}" in env["side"].logs()


def test_a_oneshot_service_is_retried_until_it_completes(tmp_path: Path) -> None:
    marker = tmp_path / "tries"
    marker.mkdir()
    # Fails twice (its dependency "not up yet"), then completes: as a Job retried by the cluster.
    flaky = Service("job", ["sh", "-c", "echo x >> /t/n; [ $(wc -l < /t/n) -ge 3 ]"], oneshot=True,
                    retries=3, mounts=[{"source": str(marker), "target": "/t", "readonly": False}])
    with Environment([flaky, Service("app", ["sleep", "1000"], depends_on=["job"])]) as env:
        assert env["job"].returncode == 0 and [r.returncode for r in env["job"].runs] == [1, 1, 0]
        assert env["app"].running
