"""load_compose, key by key: what maps to a Service, what is ignored, what is refused."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pytest_envbox.compose import DEFAULT_TMPFS, ComposeProject, Ignored, VolumeMount, load_compose
from pytest_envbox.compose.forms import compose_bytes, compose_duration
from pytest_envbox.compose.interpolate import ComposeError
from pytest_envbox.compose.yamlfile import YamlError
from pytest_envbox.errors import ConfigError
from pytest_envbox.probe import ExecProbe
from pytest_envbox.spec import Mount


def load(tmp_path: Path, *docs: str, environ: dict[str, str] | None = None,
         profiles: tuple[str, ...] = (), dotenv: str | None = None) -> ComposeProject:  # fmt: skip
    files = []
    for i, doc in enumerate(docs):
        path = tmp_path / ("compose.yaml" if i == 0 else f"override{i}.yaml")
        path.write_text(textwrap.dedent(doc))
        files.append(path)
    if dotenv is not None:
        (tmp_path / ".env").write_text(textwrap.dedent(dotenv))
    return load_compose(files, environ=environ or {}, profiles=profiles)


def error(tmp_path: Path, *docs: str, **kwargs: object) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, *docs, **kwargs)  # type: ignore[arg-type]
    return info.value


def one(doc: str, tmp_path: Path, **kwargs: object):  # type: ignore[no-untyped-def]
    project = load(tmp_path, doc, **kwargs)  # type: ignore[arg-type]
    (service,) = project.services.values()
    return service


# --- command and entrypoint ----------------------------------------------------------------------


@pytest.mark.parametrize(("command", "args"), [
    ("redis-server --save ''", ("redis-server", "--save", "")),
    ('["redis-server", "--port", "6380"]', ("redis-server", "--port", "6380")),
    ("''", ()),
    ("[]", ()),
])  # fmt: skip
def test_command_replaces_the_cmd_only(tmp_path: Path, command: str, args: tuple[str, ...]) -> None:
    s = one(f"services:\n  cache:\n    image: redis:7\n    command: {command}\n", tmp_path)
    assert s.args == args
    assert s.command == ()


def test_no_command_keeps_the_image_cmd(tmp_path: Path) -> None:
    s = one("services:\n  cache:\n    image: redis:7\n", tmp_path)
    assert s.args is None and s.command == () and s.image == "redis:7"


@pytest.mark.parametrize(("entrypoint", "command", "argv"), [
    ("/bin/bash", '["-c", "echo hi"]', ("/bin/bash", "-c", "echo hi")),
    ('["tini", "--"]', "server --fast", ("tini", "--", "server", "--fast")),
    ("/entry.sh", None, ("/entry.sh",)),
    ("[]", "run me", ("run", "me")),
])  # fmt: skip
def test_entrypoint_makes_the_whole_argv(tmp_path: Path, entrypoint: str, command: str | None,
                                         argv: tuple[str, ...]) -> None:  # fmt: skip
    doc = f"services:\n  app:\n    image: app:1\n    entrypoint: {entrypoint}\n"
    if command is not None:
        doc += f"    command: {command}\n"
    s = one(doc, tmp_path)
    assert s.command == argv
    assert s.args is None


def test_an_empty_entrypoint_without_command_is_an_error(tmp_path: Path) -> None:
    e = error(tmp_path, "services:\n  app:\n    image: app:1\n    entrypoint: []\n")
    assert e.service == "app" and e.key == "entrypoint"


# --- environment ---------------------------------------------------------------------------------


def test_environment_list_and_map_forms(tmp_path: Path) -> None:
    project = load(tmp_path, """
        services:
          a:
            image: x
            environment: [A=1, B=with=equals, C=, FROM_HOST, MISSING]
          b:
            image: x
            environment: {A: 1, B: true, C: yes, D: "", FROM_HOST: null, MISSING: , F: 1.5}
        """, environ={"FROM_HOST": "host"})  # fmt: skip
    assert project.services["a"].env == {"A": "1", "B": "with=equals", "C": "", "FROM_HOST": "host"}
    assert project.services["b"].env == {"A": "1", "B": "true", "C": "yes", "D": "", "FROM_HOST": "host",
                                         "F": "1.5"}  # fmt: skip


def test_env_file_relative_to_the_compose_file_and_environment_wins(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "a.env").write_text("A=from-a\nB=from-a\nC=from-a\nGONE=from-a\n")
    (tmp_path / "conf" / "b.env").write_text("B=from-b\n")
    s = one("""
        services:
          app:
            image: x
            env_file: [conf/a.env, ./conf/b.env, {path: conf/missing.env, required: false}]
            environment: {C: from-environment, GONE: }
        """, tmp_path)  # fmt: skip
    assert s.env == {"A": "from-a", "B": "from-b", "C": "from-environment"}


def test_env_file_as_a_string_and_raw_format(tmp_path: Path) -> None:
    (tmp_path / "app.env").write_text("A='$x'\n")
    assert one("services:\n  a:\n    image: x\n    env_file: app.env\n", tmp_path).env == {"A": "$x"}
    s = one("services:\n  a:\n    image: x\n    env_file: [{path: app.env, format: raw}]\n", tmp_path)
    assert s.env == {"A": "'$x'"}


def test_a_missing_env_file_is_an_error(tmp_path: Path) -> None:
    e = error(tmp_path, "services:\n  app:\n    image: x\n    env_file: nope.env\n")
    assert (e.service, e.key) == ("app", "env_file[0]")
    assert "nope.env" in str(e) and "compose.yaml" in str(e)


# --- ports ---------------------------------------------------------------------------------------


def test_ports_every_form_gives_container_ports_and_no_host_port(tmp_path: Path) -> None:
    s = one("""
        services:
          web:
            image: x
            ports:
              - "8080:80"
              - "127.0.0.1:8443:443/tcp"
              - "3000"
              - 3001
              - "9000-9002:9000-9002"
              - "[::1]:6001:6001"
              - {target: 5000, published: 5555}
              - {target: 5001, host_ip: 127.0.0.1, published: "6000-6010", protocol: tcp}
              - "8081:80"
            expose: ["7000", 7001, "7100-7101/tcp", "3000"]
        """, tmp_path)  # fmt: skip
    assert s.ports == (80, 443, 3000, 3001, 9000, 9001, 9002, 6001, 5000, 5001, 7000, 7001, 7100, 7101)
    assert dict(s.host_ports) == {}


@pytest.mark.parametrize(("entry", "key"), [('"5000:5000/udp"', "ports[0]"), ("{target: 53, protocol: udp}",
                                            "ports[0]"), ('"53/sctp"', "ports[0]")])  # fmt: skip
def test_udp_ports_are_refused(tmp_path: Path, entry: str, key: str) -> None:
    e = error(tmp_path, f"services:\n  dns:\n    image: x\n    ports:\n      - {entry}\n")
    assert (e.service, e.key) == ("dns", key)
    assert "TCP" in str(e)


def test_udp_expose_is_refused(tmp_path: Path) -> None:
    e = error(tmp_path, "services:\n  dns:\n    image: x\n    expose: [53/udp]\n")
    assert e.key == "expose[0]"


@pytest.mark.parametrize("entry", ['"http"', '"70000"', '"90-80"', "{published: 80}"])
def test_malformed_ports_are_errors(tmp_path: Path, entry: str) -> None:
    e = error(tmp_path, f"services:\n  web:\n    image: x\n    ports:\n      - {entry}\n")
    assert e.service == "web" and (e.key or "").startswith("ports[0]")


# --- depends_on ----------------------------------------------------------------------------------


def test_depends_on_list_and_map(tmp_path: Path) -> None:
    project = load(tmp_path, """
        services:
          api:
            image: x
            depends_on: [db, cache]
          worker:
            image: x
            depends_on:
              db: {condition: service_healthy, restart: true}
              cache: {condition: service_started}
              optional: {condition: service_started, required: false}
          db: {image: x}
          cache: {image: x}
        """)  # fmt: skip
    assert project.services["api"].depends_on == ("db", "cache")
    assert project.services["worker"].depends_on == ("db", "cache")


def test_service_completed_successfully_makes_the_dependency_oneshot(tmp_path: Path) -> None:
    project = load(tmp_path, """
        services:
          app: {image: x, depends_on: {migrate: {condition: service_completed_successfully}}}
          migrate: {image: x, healthcheck: {test: [CMD, "true"]}}
        """)  # fmt: skip
    assert project.services["migrate"].oneshot and project.services["migrate"].ready is None
    assert not project.services["app"].oneshot and project.services["app"].depends_on == ("migrate",)


def test_network_mode_service_joins_that_services_network(tmp_path: Path) -> None:
    project = load(tmp_path, """
        services:
          vpn: {image: x}
          app: {image: x, network_mode: "service:vpn"}
        """)  # fmt: skip
    assert project.services["app"].network_of == "vpn" and project.services["app"].depends_on == ("vpn",)
    assert not [i for i in project.ignored if i.key == "network_mode"]
    e = error(tmp_path, 'services:\n  app: {image: x, network_mode: "service:nope"}\n')
    assert (e.service, e.key) == ("app", "network_mode") and "names no service" in str(e)


def test_an_unknown_condition_is_an_error(tmp_path: Path) -> None:
    e = error(tmp_path, "services:\n  a: {image: x, depends_on: {b: {condition: ready}}}\n  b: {image: x}\n")
    assert e.key == "depends_on.b.condition"


def test_a_dependency_on_an_unknown_service_is_an_error(tmp_path: Path) -> None:
    e = error(tmp_path, "services:\n  a: {image: x, depends_on: [dbb]}\n  db: {image: x}\n")
    assert (e.service, e.key) == ("a", "depends_on.dbb")
    assert "did you mean 'db'" in str(e)


def test_a_depends_on_cycle_names_the_cycle_and_the_file(tmp_path: Path) -> None:
    e = error(tmp_path, """
        services:
          a: {image: x, depends_on: [b]}
          b: {image: x, depends_on: [c]}
          c: {image: x, depends_on: [a]}
        """)  # fmt: skip
    assert isinstance(e, ComposeError)
    # The place, as for every other compose error: the file, the service, the dependency's key.
    assert (e.file, e.service, e.key) == (tmp_path / "compose.yaml", "a", "depends_on.b")
    assert "depends_on forms a cycle: a -> b -> c -> a;" in str(e)
    assert str(e).startswith("service 'a', key 'depends_on.b': ")
    assert str(e).endswith(f"(in {tmp_path / 'compose.yaml'})")


def test_a_cycle_across_files_names_the_file_of_each_service(tmp_path: Path) -> None:
    e = error(tmp_path, "services:\n  a: {image: x, depends_on: [b]}\n  b: {image: x}\n",
              "services:\n  b: {depends_on: {a: {condition: service_healthy}}}\n")
    assert isinstance(e, ComposeError)
    assert (e.file, e.service, e.key) == (tmp_path / "compose.yaml", "a", "depends_on.b")
    assert "a -> b -> a (a in compose.yaml, b in override1.yaml)" in str(e)


def test_a_cycle_through_network_mode_names_that_key(tmp_path: Path) -> None:
    e = error(tmp_path, """
        services:
          app: {image: x, network_mode: "service:vpn"}
          vpn: {image: x, depends_on: [app]}
        """)  # fmt: skip
    assert isinstance(e, ComposeError)
    assert (e.file, e.service, e.key) == (tmp_path / "compose.yaml", "app", "network_mode")
    assert "app -> vpn -> app" in str(e)


# --- healthcheck ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("test", "argv"), [
    ('["CMD", "pg_isready", "-U", "postgres"]', ("pg_isready", "-U", "postgres")),
    ('["CMD-SHELL", "curl -f http://localhost || exit 1"]',
     ("/bin/sh", "-c", "curl -f http://localhost || exit 1")),
    ("redis-cli ping | grep PONG", ("/bin/sh", "-c", "redis-cli ping | grep PONG")),
])  # fmt: skip
def test_healthcheck_test_forms(tmp_path: Path, test: str, argv: tuple[str, ...]) -> None:
    s = one(f"services:\n  db:\n    image: x\n    healthcheck:\n      test: {test}\n", tmp_path)
    assert isinstance(s.ready, ExecProbe)
    assert s.ready.argv == argv
    assert s.ready.timeout == 3 * (30 + 30)  # Docker's defaults: retries * (interval + timeout)
    assert s.ready.interval is None


def test_healthcheck_timings_give_the_overall_timeout(tmp_path: Path) -> None:
    s = one("""
        services:
          db:
            image: x
            healthcheck:
              test: [CMD, check]
              interval: 10s
              timeout: 5s
              retries: 4
              start_period: 1m30s
              start_interval: 500ms
        """, tmp_path)  # fmt: skip
    assert s.ready.timeout == 90 + 4 * (10 + 5)
    assert s.ready.interval == 0.5


@pytest.mark.parametrize("hc", ["{test: [NONE]}", "{disable: true}", "{test: [CMD, x], disable: true}"])
def test_a_disabled_healthcheck_has_no_probe_and_is_reported(tmp_path: Path, hc: str) -> None:
    project = load(tmp_path, f"services:\n  db:\n    image: x\n    healthcheck: {hc}\n")
    assert project.services["db"].ready is None
    assert project.healthcheck_disabled == {"db"}


@pytest.mark.parametrize("hc", ["{test: [CMD]}", "{test: [RUN, x]}", "{test: 5}", "{tst: [CMD, x]}",
                                "{test: [CMD, x], retries: -1}", "{test: [CMD, x], interval: soon}"])
def test_malformed_healthchecks_are_errors(tmp_path: Path, hc: str) -> None:
    e = error(tmp_path, f"services:\n  db:\n    image: x\n    healthcheck: {hc}\n")
    assert e.service == "db" and (e.key or "").startswith("healthcheck")


# --- durations and bytes -------------------------------------------------------------------------


def fail(message: str, key: str) -> ConfigError:
    return ConfigError(message, key=key)


@pytest.mark.parametrize(("text", "seconds"), [("1m30s", 90.0), ("10s", 10.0), ("1h2m3.5s", 3723.5),
                                               ("500ms", 0.5), ("2us", 2e-6), ("1h5m30s20ms", 3930.02),
                                               (5, 5.0), ("0s", 0.0)])  # fmt: skip
def test_compose_durations(text: object, seconds: float) -> None:
    assert compose_duration(text, "k", fail) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["10", "1m 30s", "ten", "10sec", "", True, -1])
def test_bad_durations(text: object) -> None:
    with pytest.raises(ConfigError, match="duration"):
        compose_duration(text, "k", fail)


@pytest.mark.parametrize(("text", "size"), [
    ("512m", 512 * 2**20), ("1g", 2**30), ("1G", 2**30), ("300mb", 300 * 2**20), ("2048k", 2 * 2**20),
    ("2b", 2), (1024, 1024), ("1.5g", 3 * 2**29), ("50M", 50 * 2**20),
])  # fmt: skip
def test_compose_bytes(text: object, size: int) -> None:
    assert compose_bytes(text, "k", fail) == size


@pytest.mark.parametrize("text", ["64Mi", "lots", "", 0, -5, "1x"])
def test_bad_bytes(text: object) -> None:
    with pytest.raises(ConfigError, match="byte value"):
        compose_bytes(text, "k", fail)


# --- limits, user, cwd, stop -----------------------------------------------------------------------


def test_deploy_resources_limits(tmp_path: Path) -> None:
    project = load(tmp_path, """
        services:
          a:
            image: x
            deploy:
              resources:
                limits: {cpus: '0.50', memory: 50M, pids: 64}
                reservations: {cpus: '0.25', memory: 20M}
              restart_policy: {condition: on-failure}
          b: {image: x, mem_limit: 1g, cpus: 1.5, pids_limit: 100}
          c: {image: x, pids_limit: -1, cpus: 0}
          d: {image: x, ulimits: {nofile: {soft: 2048, hard: 4096}, nproc: 65535}}
          e: {image: x, ulimits: {nofile: 4096}}
        """)  # fmt: skip
    a, b, c, d, e = (project.services[n].limits for n in "abcde")
    assert (a.memory, a.cpu, a.pids) == (50 * 2**20, 0.5, 64)
    assert (b.memory, b.cpu, b.pids) == (2**30, 1.5, 100)
    assert (c.memory, c.cpu, c.pids) == (None, None, None)
    assert (d.nofile, e.nofile) == (2048, 4096)
    ignored = {(i.service, i.key) for i in project.ignored}
    assert {("a", "deploy.resources.reservations"), ("a", "deploy.restart_policy"),
            ("d", "ulimits.nproc")} <= ignored  # fmt: skip


def test_mem_limit_and_deploy_memory_must_agree(tmp_path: Path) -> None:
    e = error(tmp_path, """
        services:
          a: {image: x, mem_limit: 1g, deploy: {resources: {limits: {memory: 2g}}}}
        """)  # fmt: skip
    assert e.service == "a" and "disagree" in str(e)
    same = load(tmp_path, "services:\n  a: {image: x, mem_limit: 1g, cpus: '0.5', pids_limit: 10, deploy: "
                          "{resources: {limits: {memory: 1024m, cpus: 0.5, pids: 10}}}}\n")  # fmt: skip
    limits = same.services["a"].limits
    assert (limits.memory, limits.cpu, limits.pids) == (2**30, 0.5, 10)


def test_an_unsupported_limit_is_refused(tmp_path: Path) -> None:
    e = error(tmp_path, "services:\n  a: {image: x, deploy: {resources: {limits: {devices: []}}}}\n")
    assert e.key == "deploy.resources.limits.devices"


def test_user_working_dir_and_stop(tmp_path: Path) -> None:
    project = load(tmp_path, """
        services:
          a: {image: x, user: 1000, working_dir: /srv, stop_grace_period: 1m30s, stop_signal: SIGQUIT}
          b: {image: x, user: "1000:1000", stop_signal: INT}
          c: {image: x, user: postgres, stop_signal: 15}
        """)  # fmt: skip
    a, b, c = (project.services[n] for n in "abc")
    assert (a.user, a.cwd, a.stop_timeout) == ("1000", "/srv", 90.0)
    assert (b.user, c.user) == ("1000:1000", "postgres")
    assert b.stop_timeout == 5.0  # envbox's default, not Compose's 10 s: teardown stays fast
    assert project.stop_signals == {"a": "SIGQUIT", "b": "SIGINT", "c": "SIGTERM"}


def test_a_bad_stop_signal_is_an_error(tmp_path: Path) -> None:
    assert error(tmp_path, "services:\n  a: {image: x, stop_signal: SIGNOPE}\n").key == "stop_signal"


def test_a_bad_user_is_an_error_naming_the_file(tmp_path: Path) -> None:
    e = error(tmp_path, "services:\n  a: {image: x, user: 'postgres:'}\n")
    assert (e.service, e.key) == ("a", "user") and "compose.yaml" in str(e)


# --- volumes, tmpfs, networks --------------------------------------------------------------------


def test_volumes_bind_named_anonymous_and_tmpfs(tmp_path: Path) -> None:
    project = load(tmp_path, """
        services:
          db:
            image: x
            volumes:
              - ./init:/docker-entrypoint-initdb.d:ro
              - ./data/seed.sql:/seed.sql
              - /srv/shared:/shared:rw
              - db-data:/var/lib/postgresql/data
              - /anonymous
              - type: bind
                source: ./conf
                target: /etc/conf
                read_only: true
              - type: volume
                source: cache
                target: /cache
                read_only: true
              - type: tmpfs
                target: /scratch
                tmpfs: {size: 64m}
            tmpfs: [/run/app, "/tmp/big:size=1g,mode=1777"]
            shm_size: 256m
        volumes: {db-data: {}, cache: {external: true}}
        """)  # fmt: skip
    s = project.services["db"]
    assert s.mounts == (
        Mount(str(tmp_path / "init"), "/docker-entrypoint-initdb.d", readonly=True),
        Mount(str(tmp_path / "data/seed.sql"), "/seed.sql", readonly=False),
        Mount("/srv/shared", "/shared", readonly=False),
        Mount(str(tmp_path / "conf"), "/etc/conf", readonly=True),
    )
    assert project.volumes["db"] == (VolumeMount("db-data", "/var/lib/postgresql/data"),
                                     VolumeMount(None, "/anonymous"),
                                     VolumeMount("cache", "/cache", readonly=True))  # fmt: skip
    assert dict(s.tmpfs) == {"/scratch": 64 * 2**20, "/run/app": DEFAULT_TMPFS, "/tmp/big": 2**30,
                             "/dev/shm": 256 * 2**20}  # fmt: skip


@pytest.mark.parametrize(("volume", "key"), [
    ('"a:b:c:d"', "volumes[0]"),
    ('"./x:/y:rx"', "volumes[0]"),
    ("{type: image, source: img, target: /i}", "volumes[0].type"),
    ("{type: bind, source: ., target: rel}", "volumes[0].target"),
])  # fmt: skip
def test_bad_volumes_are_errors(tmp_path: Path, volume: str, key: str) -> None:
    e = error(tmp_path, f"services:\n  a:\n    image: x\n    volumes:\n      - {volume}\n")
    assert (e.service, e.key) == ("a", key)


def test_network_aliases(tmp_path: Path) -> None:
    project = load(tmp_path, """
        services:
          backend:
            image: x
            networks:
              back: {aliases: [database, db]}
              admin: {aliases: [mysql, backend], ipv4_address: 172.16.0.9}
          front: {image: x, networks: [back]}
        networks: {back: {}, admin: {}}
        """)  # fmt: skip
    assert project.services["backend"].aliases == ("database", "db", "mysql")
    assert project.services["front"].aliases == ()
    assert Ignored(tmp_path / "compose.yaml", "backend", "networks.admin.ipv4_address") in project.ignored


# --- names, keys: ignored and refused ------------------------------------------------------------


def test_a_service_name_that_is_no_dns_label_is_an_error(tmp_path: Path) -> None:
    e = error(tmp_path, "services:\n  Web_App: {image: x}\n")
    assert "'web-app'" in str(e) and "compose.yaml" in str(e)


def test_harmless_keys_are_ignored_and_listed(tmp_path: Path) -> None:
    project = load(tmp_path, """
        services:
          web:
            image: x
            restart: always
            logging: {driver: json-file}
            labels: [a=b]
            container_name: my-web
            hostname: web1
            privileged: false
            network_mode: bridge
            init: true
            x-custom: anything
        """)  # fmt: skip
    keys = [i.key for i in project.ignored if i.service == "web"]
    assert keys == ["restart", "logging", "labels", "container_name", "hostname", "privileged",
                    "network_mode", "init"]  # fmt: skip
    assert all(i.file == tmp_path / "compose.yaml" for i in project.ignored)


@pytest.mark.parametrize(("key", "value", "advice"), [
    ("build", ".", "oci-archive"),
    ("build", "{context: ., dockerfile: Dockerfile}", "image:"),
    ("privileged", "true", "privileges"),
    ("network_mode", "host", "private network"),
    ("network_mode", "container:abc", "private network"),
    ("network_mode", "none", "network_mode"),
    ("pid", "host", "own namespaces"),
    ("ipc", "host", "own namespaces"),
    ("uts", "host", "own namespaces"),
    ("userns_mode", "host", "own namespaces"),
    ("devices", "[/dev/fuse]", "devices"),
    ("cap_add", "[NET_ADMIN]", "capabilities"),
    ("scale", "3", "one copy"),
    ("deploy", "{replicas: 2}", "one copy"),
    ("sysctls", "{net.core.somaxconn: 1024}", "kernel parameters"),
    ("volumes_from", "[db]", "host paths"),
    ("extra_hosts", '["host.docker.internal:host-gateway"]', "alias"),
    ("pull_policy", "build", "build the image"),
    ("post_start", "[{command: x}]", "hooks"),
    ("gpus", "all", "devices"),
])  # fmt: skip
def test_keys_that_cannot_be_honoured_are_refused(tmp_path: Path, key: str, value: str, advice: str) -> None:
    e = error(tmp_path, f"services:\n  app:\n    image: x\n    {key}: {value}\n")
    assert (e.service, e.key) == ("app", "deploy.replicas" if key == "deploy" else key)
    assert advice in str(e)
    assert str(tmp_path / "compose.yaml") in str(e)


def test_an_unknown_key_is_an_error_with_a_suggestion(tmp_path: Path) -> None:
    e = error(tmp_path, "services:\n  app:\n    imgae: x\n")
    assert e.key == "imgae" and "did you mean 'image'" in str(e)


def test_a_service_without_image_is_an_error(tmp_path: Path) -> None:
    e = error(tmp_path, "services:\n  app:\n    command: run\n")
    assert (e.service, e.key) == ("app", "image")


@pytest.mark.parametrize(("policy", "pull"), [
    ("always", "always"), ("never", "never"), ("missing", "missing"), ("if_not_present", "missing"),
    ("daily", "missing"),
])  # fmt: skip
def test_pull_policy(tmp_path: Path, policy: str, pull: str) -> None:
    assert one(f"services:\n  a: {{image: x, pull_policy: {policy}}}\n", tmp_path).pull == pull


# --- YAML ----------------------------------------------------------------------------------------


def test_malformed_yaml_names_the_file_line_and_column(tmp_path: Path) -> None:
    e = error(tmp_path, "services:\n  web:\n    image: x\n    ports: [80, 81\n  db:\n    image: y\n")
    assert str(tmp_path / "compose.yaml") in str(e)
    assert "line 5, column 5" in str(e)


def test_tabs_are_malformed_yaml_too(tmp_path: Path) -> None:
    e = error(tmp_path, "services:\n\tweb: {image: x}\n")
    assert "line 2, column 1" in str(e)


def test_anchors_merge_keys_and_extension_fields(tmp_path: Path) -> None:
    project = load(tmp_path, """
        x-common: &common
          image: app:${TAG:-1}
          environment: &env
            A: "1"
            B: "2"
          restart: always
        x-undefined: ${THIS_IS_NOT_READ:?never interpolated}
        services:
          one:
            <<: *common
            command: one
          two:
            <<: *common
            environment:
              <<: *env
              B: "3"
        """)  # fmt: skip
    one_, two = project.services["one"], project.services["two"]
    assert (one_.image, one_.args, one_.env) == ("app:1", ("one",), {"A": "1", "B": "2"})
    assert two.env == {"A": "1", "B": "3"}


def test_of_several_merged_mappings_the_first_wins(tmp_path: Path) -> None:
    # YAML's merge key (yaml.org/type/merge.html) and Compose's Go parser: earlier mappings of
    # the list override later ones, the mapping's own keys override them all. (PyYAML 6.0.4's
    # own merge keeps the later one: yamlfile.py merges by itself.)
    project = load(tmp_path, """
        x-a: &a {image: a:1, command: from-a, user: "1"}
        x-b: &b {image: b:1, command: from-b, working_dir: /b}
        services:
          s:
            <<: [*a, *b]
            user: "2"
        """)  # fmt: skip
    s = project.services["s"]
    assert (s.image, s.args, s.user, s.cwd) == ("a:1", ("from-a",), "2", "/b")


def test_yaml_1_2_scalars_as_compose_reads_them(tmp_path: Path) -> None:
    s = one("""
        services:
          a:
            image: x
            ports: [22:22]
            environment: {YES: yes, OFF: off, OCTAL: 0755}
        """, tmp_path)  # fmt: skip
    assert s.ports == (22,)  # YAML 1.1 would read 22:22 as 1342
    assert s.env == {"YES": "yes", "OFF": "off", "OCTAL": "0755"}


@pytest.mark.parametrize(("doc", "words"), [
    ("- a\n- b\n", "mapping"),
    ("servics: {}\n", "did you mean 'services'"),
    ("include: [other.yaml]\n", "include"),
    ("services: [a]\n", "mapping"),
    ("services:\n  a: image\n", "mapping"),
])  # fmt: skip
def test_malformed_documents(tmp_path: Path, doc: str, words: str) -> None:
    assert words in str(error(tmp_path, doc))


def test_unknown_tags_are_refused(tmp_path: Path) -> None:
    e = error(tmp_path, "services:\n  a: !!python/object:os.system {image: x}\n")
    assert isinstance(e, YamlError)
    assert (e.file, e.line, e.column) == (tmp_path / "compose.yaml", 2, 6)
    assert "line 2, column 6: a tag envbox does not read" in str(e) and "python/object" in str(e)


def test_an_empty_file_declares_nothing(tmp_path: Path) -> None:
    assert load(tmp_path, "").services == {}


def test_no_file_is_an_error() -> None:
    with pytest.raises(ConfigError, match="no compose file"):
        load_compose([], environ={})


# --- interpolation in files ----------------------------------------------------------------------


def test_interpolation_from_environ_and_dotenv(tmp_path: Path) -> None:
    project = load(tmp_path, """
        services:
          db:
            image: postgres:${PG_VERSION:-15}
            environment:
              POSTGRES_PASSWORD: ${PASSWORD}
              FROM_DOTENV: ${ONLY_IN_DOTENV}
              LITERAL: $$HOME
              ${NOT_A_KEY}: kept
            command: ["sh", "-c", "echo $${HOSTNAME}"]
        """, environ={"PASSWORD": "from-environ", "PG_VERSION": "16"},
        dotenv="PASSWORD=from-dotenv\nONLY_IN_DOTENV=dotenv\nPG_VERSION=14\n")  # fmt: skip
    db = project.services["db"]
    assert db.image == "postgres:16"
    assert db.env == {"POSTGRES_PASSWORD": "from-environ", "FROM_DOTENV": "dotenv", "LITERAL": "$HOME",
                      "${NOT_A_KEY}": "kept"}  # fmt: skip
    assert db.args == ("sh", "-c", "echo ${HOSTNAME}")


def test_required_variable_error_in_a_file(tmp_path: Path) -> None:
    e = error(tmp_path, "services:\n  db:\n    image: x\n    environment:\n"
              "      - PASSWORD=${DB_PASSWORD:?set DB_PASSWORD to the test password}\n")
    assert (e.service, e.key) == ("db", "environment[0]")
    assert "set DB_PASSWORD to the test password" in str(e)
    assert str(tmp_path / "compose.yaml") in str(e)


def test_unset_variables_are_warned(tmp_path: Path) -> None:
    project = load(tmp_path, "services:\n  db:\n    image: x\n    environment:\n      - A=${UNSET_ONE}\n")
    assert project.services["db"].env == {"A": ""}
    assert len(project.warnings) == 1 and "UNSET_ONE" in project.warnings[0]


# --- several files -------------------------------------------------------------------------------


BASE = """
    services:
      web:
        image: web:1
        build: .
        command: serve --port 80
        environment: [A=base, B=base]
        ports: ["8080:80", "9000"]
        expose: [7000]
        volumes: [./a:/data, ./logs:/logs]
        healthcheck: {test: [CMD, old], interval: 10s, retries: 2}
        depends_on: [db]
        labels: {a: b}
      db:
        image: postgres:15
"""


def test_files_merge_in_order(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    override = """
        services:
          web:
            image: web:2
            build: !reset null
            command: ["serve", "--port", "81"]
            environment: {B: override, C: override}
            ports: ["8081:81", "9000"]
            expose: [7000, 7001]
            volumes: [./b:/data]
            healthcheck: {test: [CMD, new]}
            depends_on: {cache: {condition: service_healthy}}
          cache:
            image: redis:7
    """
    project = load(tmp_path, BASE, override)
    web = project.services["web"]
    assert web.image == "web:2"
    assert web.args == ("serve", "--port", "81")
    assert web.env == {"A": "base", "B": "override", "C": "override"}
    assert web.ports == (80, 9000, 81, 7000, 7001)
    # the entry for /data takes the place of the earlier one; ports too (by ip, target, published)
    assert web.mounts == (Mount(str(tmp_path / "b"), "/data", False),
                          Mount(str(tmp_path / "logs"), "/logs", False))  # fmt: skip
    assert web.ready.argv == ("new",) and web.ready.timeout == 2 * (10 + 30)
    assert web.depends_on == ("db", "cache")
    assert list(project.services) == ["web", "db", "cache"]


def test_the_file_that_set_a_refused_key_is_named(tmp_path: Path) -> None:
    e = error(tmp_path, BASE, "services:\n  web:\n    image: web:2\n")
    assert e.key == "build" and str(tmp_path / "compose.yaml") in str(e)
    e = error(tmp_path, BASE, "services:\n  web: {build: !reset null}\n  db: {privileged: true}\n")
    assert (e.service, e.key) == ("db", "privileged") and str(tmp_path / "override1.yaml") in str(e)


def test_override_tag_replaces_instead_of_merging(tmp_path: Path) -> None:
    project = load(tmp_path, BASE, "services:\n  web:\n    build: !reset\n    ports: !override ['443']\n"
                                   "    environment: !override {Z: z}\n")  # fmt: skip
    web = project.services["web"]
    assert web.ports == (443, 7000)
    assert web.env == {"Z": "z"}


def test_reset_removes_a_whole_service_or_one_entry(tmp_path: Path) -> None:
    project = load(tmp_path, BASE, "services:\n  web:\n    build: !reset\n    environment: {A: !reset null}\n"
                                   "    depends_on: !reset []\n  db: !reset\n")  # fmt: skip
    assert list(project.services) == ["web"]
    assert project.services["web"].env == {"B": "base"}


def test_relative_paths_start_at_the_first_files_directory(tmp_path: Path) -> None:
    (tmp_path / "deploy").mkdir()
    (tmp_path / "deploy" / "override.yaml").write_text("services:\n  web:\n    volumes: [./c:/c]\n")
    (tmp_path / "compose.yaml").write_text(textwrap.dedent(BASE).replace("build: .", ""))
    project = load_compose([tmp_path / "compose.yaml", tmp_path / "deploy" / "override.yaml"], environ={})
    assert Mount(str(tmp_path / "c"), "/c", False) in project.services["web"].mounts


def test_ignored_keys_name_the_file_that_set_them(tmp_path: Path) -> None:
    project = load(tmp_path, BASE.replace("build: .", ""), "services:\n  web:\n    labels: {c: d}\n"
                                                            "    restart: always\n")  # fmt: skip
    assert Ignored(tmp_path / "override1.yaml", "web", "labels") in project.ignored
    assert Ignored(tmp_path / "override1.yaml", "web", "restart") in project.ignored


# --- profiles ------------------------------------------------------------------------------------


PROFILED = """
    services:
      app: {image: x}
      debug: {image: x, profiles: [debug]}
      tools: {image: x, profiles: [tools, debug]}
"""


@pytest.mark.parametrize(("profiles", "environ", "names"), [
    ((), {}, ["app"]),
    (("debug",), {}, ["app", "debug", "tools"]),
    (("tools",), {}, ["app", "tools"]),
    (("*",), {}, ["app", "debug", "tools"]),
    ((), {"COMPOSE_PROFILES": "tools, other"}, ["app", "tools"]),
])  # fmt: skip
def test_profiles(
    tmp_path: Path, profiles: tuple[str, ...], environ: dict[str, str], names: list[str]
) -> None:
    assert list(load(tmp_path, PROFILED, profiles=profiles, environ=environ).services) == names


def test_a_dependency_outside_the_active_profiles(tmp_path: Path) -> None:
    doc = PROFILED.replace("app: {image: x}", "app: {image: x, depends_on: [debug]}")
    e = error(tmp_path, doc)
    assert (e.service, e.key) == ("app", "depends_on.debug") and "profiles debug" in str(e)
    doc = PROFILED.replace("app: {image: x}", "app: {image: x, depends_on: {debug: {required: false}}}")
    assert load(tmp_path, doc).services["app"].depends_on == ()


def test_origins(tmp_path: Path) -> None:
    assert load(tmp_path, PROFILED).origins == {"app": "compose.yaml services.app"}


# --- cost -----------------------------------------------------------------------------------------


def test_yaml_is_imported_only_when_a_compose_file_is_read(tmp_path: Path) -> None:
    (tmp_path / "compose.yaml").write_text("services: {a: {image: x}}\n")
    code = ("import sys, pathlib, pytest_envbox, pytest_envbox.compose as c, pytest_envbox.config\n"
            "assert 'yaml' not in sys.modules, 'yaml imported too early'\n"
            f"c.load_compose([pathlib.Path({str(tmp_path / 'compose.yaml')!r})], environ={{}})\n"
            "assert 'yaml' in sys.modules\n")  # fmt: skip
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


@pytest.mark.parametrize(("doc", "key"), [
    ("deploy: 5", "deploy"),
    ("deploy: {resources: [1]}", "deploy.resources"),
    ("deploy: {resources: {limits: x}}", "deploy.resources.limits"),
    ("ulimits: [nofile]", "ulimits"),
    ("networks: {back: [x]}", "networks.back"),
    ("networks: {back: {aliases: db}}", "networks.back.aliases"),
    ("depends_on: {db: yes}", "depends_on.db"),
    ("volumes: [{type: tmpfs, target: /t, tmpfs: 5}]", "volumes[0].tmpfs"),
    ("environment: [5]", "environment[0]"),
    ("command: 5", "command"),
    ("env_file: [{required: false}]", "env_file[0]"),
])  # fmt: skip
def test_values_of_the_wrong_shape_are_errors_naming_the_key(tmp_path: Path, doc: str, key: str) -> None:
    e = error(tmp_path, f"services:\n  app:\n    image: x\n    {doc}\n  db:\n    image: y\n")
    assert (e.service, e.key) == ("app", key)


def test_command_and_entrypoint_lists_are_replaced_not_appended(tmp_path: Path) -> None:
    base = "services:\n  a: {image: x, command: [serve, --port, '80'], entrypoint: [tini, --]}\n"
    override = "services:\n  a: {command: [serve, --port, '81'], entrypoint: [dumb-init]}\n"
    project = load(tmp_path, base, override)
    assert project.services["a"].command == ("dumb-init", "serve", "--port", "81")
    project = load(tmp_path, "services:\n  a: {image: x, command: [serve, --port, '80']}\n",
                   "services:\n  a: {command: [serve]}\n")  # fmt: skip
    assert project.services["a"].args == ("serve",)


@pytest.fixture(params=["libyaml", "python"])
def yaml_parser(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both parsers PyYAML may have: libyaml's (when built with it) and its pure-Python one."""
    import yaml

    from pytest_envbox.compose import yamlfile

    if request.param == "python":
        monkeypatch.delattr(yaml, "CSafeLoader", raising=False)
    elif not getattr(yaml, "__with_libyaml__", False):
        pytest.skip("PyYAML is built without libyaml here")
    yamlfile._loader.cache_clear()
    request.addfinalizer(yamlfile._loader.cache_clear)
    return str(request.param)


def test_both_yaml_parsers_read_compose_files_alike(tmp_path: Path, yaml_parser: str) -> None:
    project = load(tmp_path, """
        x-base: &base {image: x, environment: {A: yes}}
        services:
          a:
            <<: *base
            ports: [22:22]
            build: !reset null
            command: !override [run]
        """)  # fmt: skip
    a = project.services["a"]
    assert (a.env, a.ports, a.args) == ({"A": "yes"}, (22,), ("run",))
    e = error(tmp_path, "services:\n  a:\n    image: [x\n")
    assert "line 4, column 1" in str(e)


def test_extends_a_service_of_the_same_file(tmp_path: Path) -> None:
    project = load(tmp_path, """
        services:
          common:
            image: busybox
            environment: {TZ: utc, PORT: "80"}
            command: [serve]
            ports: ["80"]
            healthcheck: {test: [CMD, check], interval: 5s}
          cli:
            extends: {service: common}
            environment: [PORT=8080]
            command: [cli]
            ports: ["81"]
            healthcheck: {retries: 1}
          deeper:
            extends: cli
            user: "1000"
        """)  # fmt: skip
    cli, deeper = project.services["cli"], project.services["deeper"]
    assert (cli.image, cli.env, cli.args, cli.ports) == ("busybox", {"TZ": "utc", "PORT": "8080"}, ("cli",),
                                                         (80, 81))  # fmt: skip
    assert cli.ready.argv == ("check",) and cli.ready.timeout == 1 * (5 + 30)
    assert (deeper.args, deeper.user, deeper.env["PORT"]) == (("cli",), "1000", "8080")


@pytest.mark.parametrize(("extends", "key", "words"), [
    ("{service: base, file: other.yaml}", "extends.file", "another file"),
    ("{service: nope}", "extends.service", "not a service"),
    ("{file: x}", "extends", "service: NAME"),
    ("app", "extends", "cycle"),
])  # fmt: skip
def test_extends_errors(tmp_path: Path, extends: str, key: str, words: str) -> None:
    e = error(tmp_path, f"services:\n  base: {{image: x}}\n  app:\n    image: x\n    extends: {extends}\n")
    assert (e.service, e.key) == ("app", key)
    assert words in str(e) and "compose.yaml" in str(e)


def test_secrets_and_configs_backed_by_files_are_read_only_mounts(tmp_path: Path) -> None:
    project = load(tmp_path, """
        services:
          db:
            image: x
            secrets: [db_password, {source: cert, target: server.crt, mode: 0440}]
            configs: [app_conf, {source: cert, target: /etc/ssl/cert.pem}]
        secrets:
          db_password: {file: ./secrets/pw.txt}
          cert: {file: /etc/ssl/certs/ca.pem}
        configs:
          app_conf: {file: conf/app.conf}
          cert: {file: /etc/ssl/certs/ca.pem}
        """)  # fmt: skip
    assert project.services["db"].mounts == (
        Mount(str(tmp_path / "secrets/pw.txt"), "/run/secrets/db_password"),
        Mount("/etc/ssl/certs/ca.pem", "/run/secrets/server.crt"),
        Mount(str(tmp_path / "conf/app.conf"), "/app_conf"),
        Mount("/etc/ssl/certs/ca.pem", "/etc/ssl/cert.pem"),
    )
    assert Ignored(tmp_path / "compose.yaml", "db", "secrets[1].mode") in project.ignored


@pytest.mark.parametrize(("definitions", "words"), [
    ("", "not declared"),
    ("secrets: {pw: {environment: DB_PASSWORD}}", "environment"),
    ("secrets: {pw: {external: true}}", "external"),
    ("secrets: {pw: {content: hunter2}}", "content"),
])  # fmt: skip
def test_secrets_that_are_no_file_are_refused(tmp_path: Path, definitions: str, words: str) -> None:
    e = error(tmp_path, f"services:\n  db:\n    image: x\n    secrets: [pw]\n{definitions}\n")
    assert (e.service, e.key) == ("db", "secrets[0]") and words in str(e)


def test_secret_entries_merge_by_target(tmp_path: Path) -> None:
    defs = "secrets: {a: {file: a.txt}, b: {file: b.txt}}\n"
    project = load(tmp_path, "services:\n  s: {image: x, secrets: [a, b]}\n" + defs,
                   "services:\n  s: {secrets: [{source: b, target: a}]}\n")  # fmt: skip
    assert project.services["s"].mounts == (Mount(str(tmp_path / "b.txt"), "/run/secrets/a"),
                                            Mount(str(tmp_path / "b.txt"), "/run/secrets/b"))  # fmt: skip


def test_top_level_definitions_are_ignored_and_listed(tmp_path: Path) -> None:
    project = load(tmp_path, """
        version: "3.8"
        name: shop
        services: {a: {image: x}}
        networks: {back: {driver: bridge}}
        volumes: {data: {driver: local}}
        x-anything: {}
        """)  # fmt: skip
    top = [(None, "version"), (None, "name"), (None, "networks"), (None, "volumes")]
    assert [(i.service, i.key) for i in project.ignored] == top
