"""Unit tests of the declaration specs: parsing, normalisation and the quality of error messages."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import pytest

from pytest_envbox import probe
from pytest_envbox.errors import ConfigError
from pytest_envbox.spec import (
    DNS_LABEL,
    ExecProbe,
    HttpProbe,
    Limits,
    LogProbe,
    Mount,
    Service,
    TcpProbe,
    check_name,
    parse_cpu,
    parse_duration,
    parse_memory,
    probe_from_mapping,
    service_from_mapping,
)

# --- quantities and durations --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("64Mi", 64 * 2**20),
        ("1Gi", 2**30),
        ("512Ki", 512 * 2**10),
        ("2Ti", 2 * 2**40),
        ("500M", 500_000_000),
        ("1G", 1_000_000_000),
        ("5K", 5_000),
        ("5k", 5_000),
        ("1.5Gi", 3 * 2**29),
        ("1048576", 1048576),
        (4096, 4096),
        (" 64Mi ", 64 * 2**20),
    ],
)
def test_parse_memory_accepts_bytes_and_kubernetes_suffixes(
    value: int | str, expected: int
) -> None:
    assert parse_memory(value) == expected


def test_parse_memory_rounds_fractional_bytes_up() -> None:
    assert parse_memory("0.1Ki") == 103


@pytest.mark.parametrize("value", ["64Xi", "abc", "", "-1Mi", "1.Mi", 0, -5, True, 1.5, None])
def test_parse_memory_rejects_what_is_not_a_positive_quantity(value: object) -> None:
    with pytest.raises(ConfigError, match="memory quantity"):
        parse_memory(value)  # type: ignore[arg-type]


def test_parse_memory_error_names_service_key_and_accepted_forms() -> None:
    with pytest.raises(ConfigError) as info:
        parse_memory("64Xi", service="api")
    assert str(info.value) == (
        "service 'api', key 'limits.memory': '64Xi' is not a memory quantity; "
        'use bytes as an int or a string like "64Mi", "1Gi", "500M"'
    )
    assert (info.value.service, info.value.key) == ("api", "limits.memory")


@pytest.mark.parametrize(
    ("value", "hint"), [("64mi", '"64Mi"'), ("64MB", '"64Mi" or "64M"'), ("1GiB", '"1Gi"')]
)
def test_parse_memory_suggests_the_suffix_meant(value: str, hint: str) -> None:
    with pytest.raises(ConfigError, match=f"did you mean {re.escape(hint)}"):
        parse_memory(value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("250m", 0.25), ("1500m", 1.5), ("1", 1.0), ("0.5", 0.5), (2, 2.0), (0.5, 0.5)],
)
def test_parse_cpu_accepts_cores_and_millicores(value: float | str, expected: float) -> None:
    assert parse_cpu(value) == expected


@pytest.mark.parametrize("value", ["abc", "250 mcores", "", "0m", 0, -1, True, float("nan")])
def test_parse_cpu_rejects_what_is_not_a_positive_quantity(value: object) -> None:
    with pytest.raises(ConfigError, match="cpu quantity") as info:
        parse_cpu(value, service="api")  # type: ignore[arg-type]
    assert info.value.key == "limits.cpu"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("500ms", 0.5),
        ("10s", 10.0),
        ("1.5s", 1.5),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("1m30s", 90.0),
        ("10", 10.0),
        (3, 3.0),
        (0.25, 0.25),
        (0, 0.0),
    ],
)
def test_parse_duration_accepts_seconds_and_unit_strings(
    value: float | str, expected: float
) -> None:
    assert parse_duration(value) == pytest.approx(expected)


@pytest.mark.parametrize("value", ["5 parsecs", "5x", "s", "", "-1s", "1.s", -1, True, None])
def test_parse_duration_rejects_what_is_not_a_duration(value: object) -> None:
    with pytest.raises(ConfigError, match="is not a duration") as info:
        parse_duration(value, service="api", key="stop_timeout")  # type: ignore[arg-type]
    assert (info.value.service, info.value.key) == ("api", "stop_timeout")


# --- names ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "api", "shop-api", "0", "a1-b2", "x" * 63])
def test_dns_labels_are_accepted(name: str) -> None:
    assert DNS_LABEL.match(name)
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", "Api", "my_api", "-a", "a-", "a.b", "x" * 64, "api\n"])
def test_names_that_are_not_dns_labels_are_rejected(name: str) -> None:
    assert not DNS_LABEL.match(name)
    with pytest.raises(ConfigError, match="not a valid topology name"):
        check_name(name, what="topology")


def test_check_name_suggests_a_valid_label() -> None:
    with pytest.raises(ConfigError, match=r"e.g. 'my-api'"):
        check_name("My_API")


# --- limits and mounts ---------------------------------------------------------------------------


def test_limits_normalise_quantities() -> None:
    limits = Limits(memory="64Mi", cpu="250m", pids=64)
    assert (limits.memory, limits.cpu, limits.pids) == (64 * 2**20, 0.25, 64)
    assert Limits() == Limits(None, None, None, None)
    assert Limits.from_value({"nofile": 4096}, service="api").nofile == 4096
    assert Limits.from_value({"memory": 1024}, service="api") == Limits(memory="1Ki")


def test_limits_from_value_rejects_unknown_keys_listing_the_accepted_ones() -> None:
    with pytest.raises(ConfigError) as info:
        Limits.from_value({"memroy": "1Gi"}, service="api")
    message = str(info.value)
    assert "service 'api'" in message and "limits.memroy" in message
    assert "did you mean 'memory'" in message and "memory, cpu, pids, nofile" in message


def test_mount_defaults_to_read_only_and_normalises_a_trailing_slash() -> None:
    mount = Mount("./fixtures", "/data/")
    assert mount == Mount("./fixtures", "/data", readonly=True)


@pytest.mark.parametrize("target", ["data", "/", "/proc", "/sys/fs", "/dev/shm", "/a/../b", "//a"])
def test_mount_rejects_targets_it_cannot_or_must_not_mount_on(target: str) -> None:
    with pytest.raises(ConfigError, match="key 'target'"):
        Mount("./x", target)


def test_tmpfs_sizes_are_stored_in_bytes_with_home_as_its_path() -> None:
    service = Service("api", ["server"], tmpfs={"/tmp": "2Gi", "~": "1Mi", "/dev/shm": 4096,
                                                "/var/cache/app/": "8Mi"})  # fmt: skip
    assert service.tmpfs == {"/tmp": 2 << 30, "/home/envbox": 1 << 20, "/dev/shm": 4096,
                             "/var/cache/app": 8 << 20}  # fmt: skip
    assert hash(service) == hash(Service("api", ["server"], tmpfs=dict(service.tmpfs)))
    # A mount may go inside a tmpfs (it is mounted after).
    Service("api", ["server"], tmpfs={"/data": "1Mi"}, mounts=[{"source": ".", "target": "/data/x"}])


# --- probes --------------------------------------------------------------------------------------


def test_probe_factories_build_validated_specs() -> None:
    assert probe.tcp(6379) == TcpProbe(6379, timeout=30.0)
    http = probe.http(8000, "/health", status=200, timeout="20s", interval="100ms")
    assert (http.port, http.path, http.status, http.timeout, http.interval) == (
        8000,
        "/health",
        200,
        20.0,
        0.1,
    )
    assert probe.log(r"Ready to accept").regex.search("* Ready to accept connections")
    assert probe.exec("pg_isready -U postgres").argv == ("pg_isready", "-U", "postgres")
    assert probe.exec(["true"]).argv == ("true",)


def test_probes_describe_themselves_in_one_line() -> None:
    assert probe.tcp(6379).describe() == "tcp port 6379 accepts connections"
    assert probe.http(8000, "/health").describe() == "GET http://<svc>:8000/health returns 2xx"
    assert probe.http(8000, status=204).describe("api") == "GET http://api:8000/ returns 204"
    assert "Ready" in probe.log("Ready").describe()
    assert probe.exec(["pg_isready", "-q"]).describe() == "`pg_isready -q` exits 0"


@pytest.mark.parametrize(
    "make",
    [
        lambda: probe.tcp(0),
        lambda: probe.tcp(True),
        lambda: probe.http(8000, "health"),
        lambda: probe.http(8000, status=600),
        lambda: probe.log("("),
        lambda: probe.log(""),
        lambda: probe.exec([]),
        lambda: probe.tcp(1, timeout=0),
        lambda: probe.tcp(1, interval="soon"),
    ],
    ids=["port-0", "port-bool", "path", "status", "regex", "empty-regex", "argv", "timeout", "ivl"],
)
def test_probe_factories_reject_bad_arguments(make: Any) -> None:
    with pytest.raises(ConfigError):
        make()


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ({"tcp": 6379}, TcpProbe(6379)),
        (
            {"http": 8000, "path": "/health", "status": 200, "timeout": "20s"},
            HttpProbe(8000, "/health", 200, timeout=20),
        ),
        ({"http": 8000}, HttpProbe(8000)),
        (
            {"log": "Ready to accept", "interval": "50ms"},
            LogProbe("Ready to accept", interval=0.05),
        ),
        ({"exec": ["pg_isready"]}, ExecProbe(("pg_isready",))),
        ({"exec": "pg_isready -q"}, ExecProbe(("pg_isready", "-q"))),
    ],
    ids=["tcp", "http-full", "http-default", "log", "exec-list", "exec-str"],
)
def test_probe_from_mapping_reads_the_toml_forms(table: dict[str, object], expected: Any) -> None:
    assert probe_from_mapping(table, service="api") == expected


def test_probe_from_mapping_names_service_and_toml_key() -> None:
    with pytest.raises(ConfigError) as info:
        probe_from_mapping({"http": 70000}, service="api")
    assert (info.value.service, info.value.key) == ("api", "ready.http")


# --- services ------------------------------------------------------------------------------------


def test_service_splits_a_string_command_with_shlex() -> None:
    service = Service("api", "python -m shop.api --name 'my shop'")
    assert service.command == ("python", "-m", "shop.api", "--name", "my shop")


def test_service_keeps_empty_arguments_after_the_program() -> None:
    service = Service("cache", ["redis-server", "--save", ""])
    assert service.command == ("redis-server", "--save", "")


def test_service_defaults_are_normalised() -> None:
    service = Service("api", ["x"])
    assert service.env == {} and service.pass_env == () and service.ports == ()
    assert service.limits == Limits() and service.mounts == () and service.ready is None
    assert service.stop_timeout == 5.0 and service.user is None and service.cwd is None


def test_service_normalises_every_field() -> None:
    service = Service(
        "api",
        ["x"],
        env={"A": "1"},
        pass_env=["AWS_*"],
        ports=[8000, 8001],
        depends_on=["cache"],
        ready={"tcp": 8000},
        limits={"memory": "64Mi", "cpu": "250m"},
        mounts=[{"source": "./f", "target": "/data", "readonly": False}],
        aliases=["shop-api"],
        user=1000,
        stop_timeout="2s",
    )
    assert service.ports == (8000, 8001) and service.depends_on == ("cache",)
    assert service.pass_env == ("AWS_*",) and service.aliases == ("shop-api",)
    assert service.ready == TcpProbe(8000)
    assert service.limits == Limits(memory=64 * 2**20, cpu=0.25)
    assert service.mounts == (Mount("./f", "/data", readonly=False),)
    assert service.user == "1000" and service.stop_timeout == 2.0


def test_service_copies_env_so_later_changes_do_not_leak_in() -> None:
    env = {"A": "1"}
    service = Service("api", ["x"], env=env)
    env["A"] = "2"
    assert service.env == {"A": "1"}


def test_service_is_frozen_comparable_and_hashable() -> None:
    a = Service("api", "x --y", env={"A": "1"}, ports=[80])
    b = Service("api", ["x", "--y"], env={"A": "1"}, ports=(80,))
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.name = "other"  # type: ignore[misc]


def test_with_changes_revalidates() -> None:
    service = Service("api", ["x"], ports=[80])
    assert service.with_changes(ports=[81]).ports == (81,)
    assert service.with_changes(ports=[81]).command == ("x",)
    with pytest.raises(ConfigError, match=r"ports\[0\]"):
        service.with_changes(ports=[0])


def test_service_positional_arguments_stop_after_command() -> None:
    with pytest.raises(TypeError):
        Service("api", ["x"], {"A": "1"})  # type: ignore[call-arg]


def test_limits_given_as_mapping_name_the_service() -> None:
    with pytest.raises(ConfigError, match=r"service 'api', key 'limits.memory'"):
        Service("api", ["x"], limits={"memory": "lots"})


@pytest.mark.parametrize("user", ["postgres", "_apt", "www-data", "nobody$", "0", "1000:1000",
                                  "postgres:postgres", "nobody:1000", "1000:staff"])  # fmt: skip
def test_user_syntax_accepts_names_uids_and_a_group(user: str) -> None:
    assert Service("db", ["x"], user=user).user == user


@pytest.mark.parametrize("user", ["1000:", ":1000", "a:b:c", "Postgres", "pg admin", ""])
def test_user_syntax_refuses_what_is_not_a_user(user: str) -> None:
    with pytest.raises(ConfigError, match="is not a user"):
        Service("db", ["x"], user=user)


def test_service_from_mapping_reads_the_api_example() -> None:
    service = service_from_mapping(
        "api",
        {
            "command": "python -m shop.api --port 8000",
            "env": {"CACHE_URL": "redis://cache:6379/0"},
            "ports": [8000],
            "depends_on": ["cache"],
            "ready": {"http": 8000, "path": "/health", "timeout": "20s"},
            "limits": {"memory": "128Mi", "cpu": "1", "pids": 128},
            "mounts": [{"source": "./fixtures", "target": "/data"}],
            "aliases": ["shop-api"],
        },
    )
    assert service == Service(
        "api",
        ["python", "-m", "shop.api", "--port", "8000"],
        env={"CACHE_URL": "redis://cache:6379/0"},
        ports=[8000],
        depends_on=["cache"],
        ready=probe.http(8000, "/health", timeout="20s"),
        limits=Limits(memory=128 * 2**20, cpu=1, pids=128),
        mounts=[Mount("./fixtures", "/data")],
        aliases=["shop-api"],
    )


def _mount(**overrides: object) -> dict[str, object]:
    return {"source": "./data", "target": "/data", **overrides}


# (id, service name, table without "command" unless overridden, offending key, extra text)
BAD_DECLARATIONS: list[tuple[str, str, dict[str, Any], str, str]] = [
    ("name-uppercase", "Api", {}, "Api", "DNS label"),
    ("name-underscore", "my_api", {}, "my_api", "e.g. 'my-api'"),
    ("name-too-long", "a" * 64, {}, "a" * 64, "DNS label"),
    ("name-trailing-dash", "api-", {}, "api-", "DNS label"),
    ("command-missing", "api", {"command": None}, "command", "is missing"),
    ("command-empty-str", "api", {"command": ""}, "command", "empty"),
    ("command-empty-list", "api", {"command": []}, "command", "empty"),
    ("command-int", "api", {"command": 5}, "command", "not a list"),
    ("command-item-int", "api", {"command": ["sleep", 5]}, "command[1]", "quote"),
    ("command-bad-quotes", "api", {"command": "echo 'hi"}, "command", "quoting"),
    ("port-zero", "api", {"ports": [0]}, "ports[0]", "1 to 65535"),
    ("port-70000", "api", {"ports": [80, 70000]}, "ports[1]", "1 to 65535"),
    ("ports-str", "api", {"ports": "80"}, "ports", "not a list"),
    ("port-str-item", "api", {"ports": ["80"]}, "ports[0]", "1 to 65535"),
    ("port-bool", "api", {"ports": [True]}, "ports[0]", "bool"),
    ("ports-duplicate", "api", {"ports": [80, 81, 80]}, "ports[2]", "twice"),
    ("probe-two-kinds", "api", {"ready": {"tcp": 80, "http": 80}}, "ready", "exactly one"),
    ("probe-no-kind", "api", {"ready": {"timeout": "1s"}}, "ready", "exactly one"),
    ("probe-unknown-key", "api", {"ready": {"tcp": 80, "timout": "1s"}}, "ready.timout", "timeout"),
    ("probe-bad-regex", "api", {"ready": {"log": "Ready ("}}, "ready.log", "regular expression"),
    ("probe-bad-status", "api", {"ready": {"http": 80, "status": 99}}, "ready.status", "100"),
    ("probe-bad-path", "api", {"ready": {"http": 80, "path": "health"}}, "ready.path", "'/'"),
    ("probe-path-on-tcp", "api", {"ready": {"tcp": 80, "path": "/"}}, "ready.path", "http"),
    ("probe-bad-port", "api", {"ready": {"tcp": 0}}, "ready.tcp", "1 to 65535"),
    ("probe-zero-timeout", "api", {"ready": {"tcp": 80, "timeout": 0}}, "ready.timeout", "zero"),
    ("probe-not-table", "api", {"ready": 80}, "ready", "probe"),
    ("memory-64Xi", "api", {"limits": {"memory": "64Xi"}}, "limits.memory", '"64Mi"'),
    ("memory-negative", "api", {"limits": {"memory": -1}}, "limits.memory", "positive"),
    ("cpu-abc", "api", {"limits": {"cpu": "abc"}}, "limits.cpu", "250m"),
    ("cpu-zero", "api", {"limits": {"cpu": 0}}, "limits.cpu", "positive"),
    ("pids-zero", "api", {"limits": {"pids": 0}}, "limits.pids", "> 0"),
    ("pids-str", "api", {"limits": {"pids": "64"}}, "limits.pids", "int"),
    ("nofile-zero", "api", {"limits": {"nofile": 0}}, "limits.nofile", "from 1 to 1048576"),
    ("nofile-huge", "api", {"limits": {"nofile": 1 << 30}}, "limits.nofile", "fs.nr_open"),
    ("nofile-str", "api", {"limits": {"nofile": "4096"}}, "limits.nofile", "an int"),
    ("limits-unknown", "api", {"limits": {"mem": "1Gi"}}, "limits.mem", "memory, cpu, pids, nofile"),
    ("limits-not-table", "api", {"limits": "1Gi"}, "limits", "table"),
    ("duration-parsecs", "api", {"stop_timeout": "5 parsecs"}, "stop_timeout", '"500ms"'),
    ("mount-relative", "api", {"mounts": [_mount(target="data")]}, "mounts[0].target", "absolute"),
    ("mount-proc", "api", {"mounts": [_mount(target="/proc/x")]}, "mounts[0].target", "/proc"),
    ("mount-no-source", "api", {"mounts": [{"target": "/d"}]}, "mounts[0].source", "missing"),
    ("mount-unknown-key", "api", {"mounts": [_mount(ro=True)]}, "mounts[0].ro", "readonly"),
    ("mount-readonly-str", "api", {"mounts": [_mount(readonly="no")]}, "mounts[0].readonly", ""),
    ("mount-dup-target", "api", {"mounts": [_mount(), _mount()]}, "mounts[1].target", "twice"),
    ("mounts-not-list", "api", {"mounts": _mount()}, "mounts", "not a list"),
    ("tmpfs-not-table", "api", {"tmpfs": ["/tmp"]}, "tmpfs", '"/tmp" = "2Gi"'),
    ("tmpfs-relative", "api", {"tmpfs": {"cache": "1Mi"}}, "tmpfs['cache']", "absolute"),
    ("tmpfs-root", "api", {"tmpfs": {"/": "1Mi"}}, "tmpfs['/']", "'/'"),
    ("tmpfs-sys", "api", {"tmpfs": {"/sys/x": "1Mi"}}, "tmpfs['/sys/x']", "/sys"),
    ("tmpfs-dev", "api", {"tmpfs": {"/dev": "1Mi"}}, "tmpfs['/dev']", "/dev"),
    ("tmpfs-size", "api", {"tmpfs": {"/tmp": "2Gb"}}, "tmpfs['/tmp']", '"64Mi"'),
    ("tmpfs-zero", "api", {"tmpfs": {"/tmp": 0}}, "tmpfs['/tmp']", "positive"),
    ("tmpfs-home-twice", "api", {"tmpfs": {"~": "1Mi", "/home/envbox": "2Mi"}},
     "tmpfs['/home/envbox']", "once"),
    ("tmpfs-under-mount", "api", {"mounts": [_mount(target="/data")], "tmpfs": {"/data/c": "1Mi"}},
     "tmpfs['/data/c']", "hidden by the mount at '/data'"),
    ("user-root-colon", "api", {"user": "root:"}, "user", "with a group"),
    ("user-space", "api", {"user": "bad user"}, "user", "with a group"),
    ("user-negative", "api", {"user": -1}, "user", "uid"),
    ("unknown-key-suggests", "api", {"port": [80]}, "port", "did you mean 'ports'?"),
    ("unknown-key-lists", "api", {"zzz": 1}, "zzz", "accepted keys: command, env"),
    ("env-int-value", "api", {"env": {"PORT": 8000}}, "env.PORT", 'PORT = "8000"'),
    ("env-bad-name", "api", {"env": {"A=B": "1"}}, "env.A=B", "'='"),
    ("env-not-table", "api", {"env": ["A=1"]}, "env", "table"),
    ("pass-env-str", "api", {"pass_env": "HOME"}, "pass_env", "not a list"),
    ("cwd-empty", "api", {"cwd": ""}, "cwd", "non-empty"),
    ("depends-on-self", "api", {"depends_on": ["api"]}, "depends_on[0]", "itself"),
    ("depends-on-str", "api", {"depends_on": "cache"}, "depends_on", '["cache"]'),
    ("depends-on-dup", "api", {"depends_on": ["db", "db"]}, "depends_on[1]", "twice"),
    ("alias-invalid", "api", {"aliases": ["Shop_API"]}, "aliases[0]", "DNS label"),
    ("alias-is-name", "api", {"aliases": ["api"]}, "aliases[0]", "service name"),
]


@pytest.mark.parametrize(
    ("name", "table", "key", "extra"),
    [case[1:] for case in BAD_DECLARATIONS],
    ids=[case[0] for case in BAD_DECLARATIONS],
)
def test_bad_declaration_raises_config_error_naming_service_and_key(
    name: str, table: dict[str, Any], key: str, extra: str
) -> None:
    declaration = {"command": ["server"], **table}
    if declaration["command"] is None:
        del declaration["command"]
    with pytest.raises(ConfigError) as info:
        service_from_mapping(name, declaration)
    message = str(info.value)
    assert name in message
    assert key in message
    assert extra in message
    if key != name:  # a bad service name is not a key: there is no valid service to name
        assert (info.value.service, info.value.key) == (name, key)


def test_bad_declarations_table_is_large_enough() -> None:
    assert len(BAD_DECLARATIONS) >= 20
    assert len({case[0] for case in BAD_DECLARATIONS}) == len(BAD_DECLARATIONS)


def test_service_from_mapping_rejects_a_non_table() -> None:
    with pytest.raises(ConfigError, match=r"service 'api'.*not a table"):
        service_from_mapping("api", ["server"])  # type: ignore[arg-type]
