"""An image's config: parsing (tolerant of nulls), the defaults it gives a service, the argv."""

from __future__ import annotations

import json
import signal

import pytest

from pytest_envbox import ConfigError, ImageError, Service
from pytest_envbox.images.imageconfig import (
    Healthcheck,
    ImageConfig,
    apply_image_defaults,
    image_argv,
    parse_signal,
)
from pytest_envbox.probe import ExecProbe, TcpProbe

REDIS = {
    "architecture": "amd64",
    "os": "linux",
    "config": {
        "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/bin:/bin", "REDIS_VERSION=7.2.4", "NOEQ"],
        "Entrypoint": ["docker-entrypoint.sh"],
        "Cmd": ["redis-server"],
        "WorkingDir": "/data",
        "User": "redis",
        "ExposedPorts": {"6379/tcp": {}, "53/udp": {}, "8080": {}},
        "StopSignal": "SIGQUIT",
        "Healthcheck": {"Test": ["CMD-SHELL", "redis-cli ping"], "Interval": 5_000_000_000,
                        "Timeout": 2_000_000_000, "StartPeriod": 1_000_000_000, "Retries": 4},
    },
    "rootfs": {"type": "layers", "diff_ids": ["sha256:" + "a" * 64, "sha256:" + "b" * 64]},
}  # fmt: skip


def cfg(doc: object) -> ImageConfig:
    return ImageConfig.from_json(json.dumps(doc).encode())


def test_from_json_reads_every_field() -> None:
    c = cfg(REDIS)
    assert c.env == (("PATH", "/usr/local/sbin:/usr/local/bin:/usr/bin:/bin"),
                     ("REDIS_VERSION", "7.2.4"))  # fmt: skip
    assert c.entrypoint == ("docker-entrypoint.sh",) and c.cmd == ("redis-server",)
    assert (c.workdir, c.user, c.stop_signal) == ("/data", "redis", "SIGQUIT")
    assert c.exposed_ports == (6379, 8080)  # udp left out
    assert c.healthcheck == Healthcheck(("CMD-SHELL", "redis-cli ping"), 5.0, 2.0, 1.0, 4)
    assert (c.os, c.architecture) == ("linux", "amd64")
    assert c.diff_ids == ("sha256:" + "a" * 64, "sha256:" + "b" * 64)


NULLS = {"Env": None, "Entrypoint": None, "Cmd": None, "ExposedPorts": None, "Healthcheck": None}


@pytest.mark.parametrize("doc", [{}, {"config": None}, {"config": NULLS, "rootfs": None}])
def test_from_json_tolerates_nulls_and_missing(doc: object) -> None:
    assert cfg(doc) == ImageConfig()


@pytest.mark.parametrize("data", [b"not json", b"[1, 2]", b"\xff\xfe"])
def test_from_json_refuses_what_is_not_a_config(data: bytes) -> None:
    with pytest.raises(ImageError, match="image config"):
        ImageConfig.from_json(data)


@pytest.mark.parametrize(("text", "sig"), [("SIGQUIT", signal.SIGQUIT), ("QUIT", signal.SIGQUIT),
                         ("3", 3), ("sigusr1", signal.SIGUSR1), ("", None), ("SIGNOPE", None)])  # fmt: skip
def test_parse_signal(text: str, sig: int | None) -> None:
    assert parse_signal(text) == sig


def test_defaults_fill_what_the_declaration_leaves_out() -> None:
    s = apply_image_defaults(Service("cache", image="redis:7"), cfg(REDIS))
    assert s.env == {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/bin:/bin", "REDIS_VERSION": "7.2.4"}
    assert s.ports == (6379, 8080)
    assert isinstance(s.ready, ExecProbe)
    assert s.ready.argv == ("/bin/sh", "-c", "redis-cli ping")
    assert s.ready.timeout == pytest.approx(1 + 4 * (5 + 2))  # when Docker says unhealthy
    assert (s.cwd, s.user) == ("/data", "redis")


def test_the_declaration_wins() -> None:
    spec = Service("cache", image="redis:7", env={"REDIS_VERSION": "mine"}, ports=[7000],
                   ready=TcpProbe(7000), cwd="/srv", user="1000")  # fmt: skip
    s = apply_image_defaults(spec, cfg(REDIS))
    assert s.env["REDIS_VERSION"] == "mine" and "PATH" in s.env
    assert s.ports == (7000,) and s.ready == TcpProbe(7000)
    assert (s.cwd, s.user) == ("/srv", "1000")


@pytest.mark.parametrize(("test", "argv"), [(["CMD", "pg_isready", "-U", "x"], ("pg_isready", "-U", "x")),
                         (["NONE"], None), ([], None)])  # fmt: skip
def test_healthcheck_kinds(test: list[str], argv: tuple[str, ...] | None) -> None:
    doc = {"config": {"Healthcheck": {"Test": test}}}
    s = apply_image_defaults(Service("db", image="postgres"), cfg(doc))
    assert (s.ready.argv if isinstance(s.ready, ExecProbe) else None) == argv
    if argv is not None:
        assert s.ready is not None and s.ready.timeout == 3 * 60  # Docker's defaults: 3 x (30 + 30)


def test_a_user_with_a_group_name_is_the_services_user() -> None:
    """ "name:group", as Docker writes it, is the service's user (resolved in the image's files)."""
    s = apply_image_defaults(Service("db", image="postgres"), cfg({"config": {"User": "app:staff"}}))
    assert s.user == "app:staff"


def test_image_argv() -> None:
    c = cfg(REDIS)
    assert image_argv(Service("c", image="r"), c) == ["docker-entrypoint.sh", "redis-server"]
    assert image_argv(Service("c", image="r", args=["--port", "1"]), c) == [
        "docker-entrypoint.sh", "--port", "1"]  # fmt: skip
    assert image_argv(Service("c", image="r", args=[]), c) == ["docker-entrypoint.sh"]
    assert image_argv(Service("c", ["sh", "-c", "x"], image="r"), c) == ["sh", "-c", "x"]
    only_cmd = cfg({"config": {"Cmd": ["nginx", "-g", "daemon off;"]}})
    assert image_argv(Service("w", image="n"), only_cmd) == ["nginx", "-g", "daemon off;"]


def test_image_argv_empty_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"service 'c', key 'command'.*neither Entrypoint nor Cmd; "
                                          "give command"):  # fmt: skip
        image_argv(Service("c", image="scratch"), ImageConfig())
