"""``export_kubernetes``: what it writes is valid Kubernetes (checked against the API's own OpenAPI
schemas by kubernetes-validate, not by hand), and loading it back gives the same services."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytest_envbox import ConfigError, Service, probe
from pytest_envbox.config import load_project_config
from pytest_envbox.kubernetes import load_manifests
from pytest_envbox.kubernetes.container import probe_timeout
from pytest_envbox.kubernetes.export import NAME_LABEL, Export, export_kubernetes, probe_numbers, to_yaml
from pytest_envbox.mounts import Volume
from pytest_envbox.spec import HOME, Limits

#: The Kubernetes release whose schemas the manifests are checked against (kubernetes-validate
#: ships 1.25 to 1.37): the oldest one still supported upstream when this was written.
KUBERNETES = "1.32.0"


def validate(documents: tuple[dict[str, Any], ...]) -> None:
    """Every object against the schema of its kind; strict: an unknown field fails too."""
    assert documents
    for doc in documents:
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def round_trip(export: Export, directory: Path) -> Any:
    path = directory / "export.yaml"
    path.write_text(to_yaml(export.documents, ["a header line", ""]))
    return load_manifests([path])


def comparable(service: Service) -> Service:
    """``service`` as the loader gives its container back: every key both sides hold kept. Not
    held by the loader: ``depends_on`` (pods have no order), ``aliases`` (they are Services:
    checked apart), ``stop_timeout`` (the loader ignores terminationGracePeriodSeconds, checked
    apart), the probe's ``interval`` (the loader polls at 1 s whatever periodSeconds says).
    ``volumes``, ``oneshot`` and ``retries`` are the pod's and the workload's (an emptyDir, a
    Job's backoffLimit): the catalog the project makes of the manifests has them, checked apart."""
    ready = None if service.ready is None else dataclasses.replace(service.ready, interval=1.0)
    return dataclasses.replace(service, depends_on=(), aliases=(), stop_timeout=5.0, ready=ready,
                               volumes=(), oneshot=False, retries=0)


def as_imported(service: Service) -> tuple[tuple[Volume, ...], bool, int]:
    """What the catalog made of the manifests holds of ``service``'s volumes (each an emptyDir
    ``volume-<i>`` of its one pod, named after the pod), ``oneshot`` and ``retries``."""
    volumes = tuple(Volume(f"{service.name}.volume-{i}", v.target, v.readonly)
                    for i, v in enumerate(service.volumes))  # fmt: skip
    return volumes, service.oneshot, service.retries


# --- generated declarations ------------------------------------------------------------------

NAMES = st.from_regex(r"\A[a-z][a-z0-9-]{0,12}[a-z0-9]\Z")
IMAGES = st.sampled_from(["redis:7", "postgres:16.4", "localhost:5000/shop/api:1.0",
                          "registry.example.com/app@sha256:" + "a" * 64])  # fmt: skip
# Text that Kubernetes would expand ($(NAME), $$), YAML's line breaks (NEL, LS included) and
# any other character but NUL; short, or long enough for the dumper to fold it.
CHARS = st.one_of(st.sampled_from(list("$()AZ_ \\\"'#:-\n\t\x85\u2028")),
                  st.characters(exclude_characters="\0", exclude_categories=("Cs",)))  # fmt: skip
SHORT = st.text(CHARS, max_size=12)
TEXT = SHORT | st.tuples(SHORT, SHORT).map(lambda t: (t[0] + " and more words ") * 8 + t[1])
ARGS = st.lists(TEXT, max_size=4)
ENV_NAMES = st.from_regex(r"\A[A-Za-z_][A-Za-z0-9_]{0,8}\Z")
PATHS = st.from_regex(r"\A/(srv|data|cache|var/lib|tmp|home/x)(/[a-z0-9._-]{1,6}){0,2}\Z").filter(
    lambda p: not p.endswith(("/.", "/..")) and "/../" not in p and "/./" not in p
)
# Whole seconds from 2: the timeouts a probe's integer fields express exactly.
TIMEOUTS = st.integers(min_value=2, max_value=900)
IDS = st.integers(0, 65535)
INTERVALS = st.none() | st.integers(min_value=1, max_value=30) | st.floats(0.05, 20)


@st.composite
def services(draw: st.DrawFn) -> list[Service]:
    names = draw(st.lists(NAMES, min_size=1, max_size=8, unique=True))
    count = draw(st.integers(1, min(3, len(names))))
    spare = names[count:]
    out = []
    for i, name in enumerate(names[:count]):
        ports = draw(st.lists(st.integers(1, 65535), max_size=3, unique=True))
        kwargs: dict[str, Any] = {
            "image": draw(IMAGES),
            "pull": draw(st.sampled_from(Service.PULL_POLICIES)),
            "env": draw(st.dictionaries(ENV_NAMES, TEXT, max_size=4)),
            "ports": ports,
            "cwd": draw(st.none() | PATHS),
            "user": draw(st.none() | IDS.map(str) | st.tuples(IDS, IDS).map("{0[0]}:{0[1]}".format)),
            "tmpfs": draw(st.dictionaries(PATHS, st.integers(1, 2**36), max_size=2)),
            "limits": Limits(
                memory=draw(st.none() | st.integers(1, 2**40) | st.integers(1, 4096).map(lambda m: m << 20)),
                cpu=draw(st.none() | st.integers(1, 16000).map(lambda m: m / 1000)),
            ),
            "stop_timeout": draw(st.integers(0, 120)),
            "depends_on": [n for n in names[:i] if draw(st.booleans())],
            "aliases": [spare.pop() for _ in range(draw(st.integers(0, len(spare))))],
        }
        tmpfs = kwargs["tmpfs"]
        targets = draw(st.lists(PATHS.filter(lambda t, taken=tmpfs: t not in taken), max_size=2, unique=True))
        kwargs["volumes"] = [Volume(f"{name}-{j}", t, draw(st.booleans())) for j, t in enumerate(targets)]
        argv = draw(st.sampled_from(["none", "command", "args"]))
        if argv == "command":
            kwargs["command"] = [draw(TEXT.filter(bool)), *draw(ARGS)]
        elif argv == "args":
            kwargs["args"] = draw(st.lists(TEXT, min_size=1, max_size=4))
        timing = {"timeout": draw(TIMEOUTS), "interval": draw(INTERVALS)}
        port = draw(st.sampled_from(ports) if ports else st.integers(1, 65535))
        if draw(st.booleans()):  # runs to completion, retried: a Job (and no readiness probe)
            kwargs.update(oneshot=True, retries=draw(st.integers(0, 100)))
        else:
            kwargs["ready"] = draw(st.sampled_from([
                None,
                probe.tcp(port, **timing),
                probe.http(port, draw(st.from_regex(r"\A/[a-z0-9/._-]{0,10}\Z")), **timing),
                probe.exec([draw(TEXT.filter(bool)), *draw(ARGS)], **timing),
            ]))  # fmt: skip
        out.append(Service(name, kwargs.pop("command", ()), **kwargs))
    return out


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(services())
def test_generated_declarations_validate_and_come_back_the_same(declared: list[Service]) -> None:
    exported = export_kubernetes(declared)
    validate(exported.documents)
    with tempfile.TemporaryDirectory() as tmp:
        project = round_trip(exported, Path(tmp))
        (Path(tmp) / "envbox.toml").write_text('kubernetes = ["export.yaml"]\n')
        catalog = load_project_config(Path(tmp))
    # Every key both sides hold: image, pull, command, args, env, cwd, ports, limits.memory and
    # limits.cpu, ready (kind, port, path, argv, timeout), user, tmpfs; and in the catalog,
    # volumes, oneshot and retries.
    assert project.envbox_services() == {s.name: comparable(s) for s in declared}
    imported = {s.name: catalog.services[s.name] for s in declared}
    assert {n: (c.volumes, c.oneshot, c.retries) for n, c in imported.items()} == {
        s.name: as_imported(s) for s in declared}  # fmt: skip
    for s in declared:
        # aliases: Services of those names selecting the service's one pod, on the same ports
        names = sorted(n for n, ks in project.services.items() if ks.selects == (s.name,))
        assert names == sorted((s.name, *s.aliases))
        for name in names:
            backends = project.services[name].backends
            assert [(b.port, b.target_port) for b in backends] == [(p, p) for p in s.ports]
            assert project.services[name].headless == (not s.ports)
        pod = next(d for d in exported.documents if d["kind"] in ("Deployment", "Job")
                   and d["metadata"]["name"] == s.name)["spec"]["template"]["spec"]  # fmt: skip
        assert pod["terminationGracePeriodSeconds"] == s.stop_timeout
    assert {n.key for n in exported.notes} <= {"depends_on", "ready.interval"}


def test_a_full_declaration_is_valid_kubernetes_and_each_mapping_is_as_documented() -> None:
    db = Service("db", image="postgres:16.4", env={"POSTGRES_PASSWORD": "test", "URL": "pg://$(HOST)"},
                 ports=[5432], ready=probe.exec(["pg_isready", "-U", "postgres"], timeout=30),
                 limits={"memory": "256Mi", "cpu": "250m"}, tmpfs={"/var/lib/postgresql/data": "1Gi"},
                 user="999:999", stop_timeout="20s", pull="always", cwd="/srv")  # fmt: skip
    api = Service("api", image="registry.example.com/shop/api:1.0", args=["--port", "8000"],
                  ports=[8000, 9090], ready=probe.http(8000, "/health", timeout=21), aliases=["shop-api"],
                  limits={"cpu": 2, "memory": 1000})  # fmt: skip
    worker = Service("worker", ["python3", "-m", "worker", "--log", "$(LEVEL)"], image="shop/worker:1")
    exported = export_kubernetes([db, api, worker])
    validate(exported.documents)
    assert [(d["kind"], d["metadata"]["name"]) for d in exported.documents] == [
        ("Deployment", "db"), ("Service", "db"), ("Deployment", "api"), ("Service", "api"),
        ("Service", "shop-api"), ("Deployment", "worker"), ("Service", "worker"),
    ]  # fmt: skip
    deployment = exported.documents[0]
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["selector"]["matchLabels"] == {NAME_LABEL: "db"}
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["imagePullPolicy"] == "Always" and container["workingDir"] == "/srv"
    assert container["env"] == [{"name": "POSTGRES_PASSWORD", "value": "test"},
                                {"name": "URL", "value": "pg://$$(HOST)"}]  # fmt: skip
    assert container["resources"] == {"limits": {"memory": "256Mi", "cpu": "250m"}}
    assert container["securityContext"] == {"runAsUser": 999, "runAsGroup": 999}
    assert pod["volumes"] == [{"name": "tmpfs-0", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}}]
    assert container["volumeMounts"] == [{"name": "tmpfs-0", "mountPath": "/var/lib/postgresql/data"}]
    assert pod["terminationGracePeriodSeconds"] == 20
    assert container["readinessProbe"] == {
        "exec": {"command": ["pg_isready", "-U", "postgres"]},
        "initialDelaySeconds": 0, "periodSeconds": 1, "timeoutSeconds": 1, "failureThreshold": 15,
    }  # fmt: skip
    api_container = exported.documents[2]["spec"]["template"]["spec"]["containers"][0]
    assert api_container["args"] == ["--port", "8000"] and "command" not in api_container
    assert api_container["resources"] == {"limits": {"cpu": "2", "memory": "1000"}}
    assert api_container["readinessProbe"]["httpGet"] == {"path": "/health", "port": 8000, "scheme": "HTTP"}
    assert exported.documents[4]["spec"] == exported.documents[3]["spec"] == {
        "type": "ClusterIP", "selector": {NAME_LABEL: "api"},
        "ports": [{"name": "tcp-8000", "protocol": "TCP", "port": 8000, "targetPort": 8000},
                  {"name": "tcp-9090", "protocol": "TCP", "port": 9090, "targetPort": 9090}]}  # fmt: skip
    worker_container = exported.documents[5]["spec"]["template"]["spec"]["containers"][0]
    assert worker_container["command"] == ["python3", "-m", "worker", "--log", "$$(LEVEL)"]
    assert "args" not in worker_container
    assert exported.documents[6]["spec"] == {"type": "ClusterIP", "selector": {NAME_LABEL: "worker"},
                                             "clusterIP": "None"}  # fmt: skip
    assert exported.notes == ()


def test_the_yaml_has_the_header_and_one_document_per_object(tmp_path: Path) -> None:
    exported = export_kubernetes([Service("cache", image="redis:7", ports=[6379], env={"X": "yes"})])
    text = to_yaml(exported.documents, ["Generated by envbox export", ""])
    assert text.startswith("# Generated by envbox export\n#\n---\napiVersion: apps/v1\n")
    assert text.count("---\n") == 2  # a Deployment, a Service
    assert "value: 'yes'" in text  # YAML 1.1 would read a bare yes as true
    assert round_trip(exported, tmp_path).envbox_services()["cache"].env == {"X": "yes"}


def test_a_service_without_an_image_is_an_error_naming_it_and_the_fix() -> None:
    declared = [Service("cache", image="redis:7"), Service("api", ["python3", "-m", "api"]),
                Service("worker", ["./worker"])]  # fmt: skip
    with pytest.raises(ConfigError) as caught:
        export_kubernetes(declared)
    assert caught.value.service == "api" and caught.value.key == "image"
    message = str(caught.value)
    assert "give it an `image`" in message and "--skip-host-programs" in message and "'worker'" in message


def test_skipping_host_programs_leaves_them_out_with_a_note_each() -> None:
    declared = [Service("cache", image="redis:7"),
                Service("api", ["python3", "-m", "api"], depends_on=["cache"])]  # fmt: skip
    exported = export_kubernetes(declared, skip_host_programs=True)
    assert {d["metadata"]["name"] for d in exported.documents} == {"cache"}
    assert exported.skipped == ("api",)
    assert [(n.service, n.key) for n in exported.notes] == [("api", "image")]
    validate(exported.documents)


def test_each_key_without_a_kubernetes_form_gets_one_note_and_stays_out() -> None:
    svc = Service("app", image="oci:./images/app:1.0", args=[],
                  mounts=[{"source": "./fixtures", "target": "/data"}], ready=probe.log("listening"),
                  limits={"pids": 64, "nofile": 4096, "memory": "64Mi"},
                  user="postgres", pass_env=["AWS_*"], ports=[{"port": 80, "host": 8080}],
                  depends_on=["db"], tmpfs={"~": "16Mi"})  # fmt: skip
    exported = export_kubernetes([svc, Service("db", image="postgres:16.4")])
    keys = [n.key for n in exported.notes]
    assert keys == ["image", "args", "mounts", "ready", "limits.pids", "limits.nofile", "user",
                    "pass_env", "host_ports", "depends_on", "tmpfs"]  # fmt: skip
    assert all(n.service == "app" for n in exported.notes)
    assert "./fixtures -> /data" in str(exported.notes[2])
    validate(exported.documents)
    [container] = exported.documents[0]["spec"]["template"]["spec"]["containers"]
    assert {"readinessProbe", "securityContext", "args"}.isdisjoint(container)
    assert container["resources"] == {"limits": {"memory": "64Mi"}}
    assert container["volumeMounts"] == [{"name": "tmpfs-0", "mountPath": HOME}]


def test_values_kubernetes_cannot_hold_exactly_are_rounded_up_with_a_note(tmp_path: Path) -> None:
    ready = probe.http(6379, "/", status=204, timeout="2.5s", interval="200ms")
    svc = Service("app", image="redis:7", ports=[6379], ready=ready, limits={"cpu": 0.0005},
                  stop_timeout="1500ms")  # fmt: skip
    exported = export_kubernetes([svc])
    assert [n.key for n in exported.notes] == ["stop_timeout", "limits.cpu", "ready.timeout",
                                               "ready.interval", "ready.status"]  # fmt: skip
    validate(exported.documents)
    back = round_trip(exported, tmp_path).envbox_services()["app"]
    assert back.ready is not None and back.ready.timeout == 3.0
    assert back.limits.cpu == 0.001


@pytest.mark.parametrize("timeout", [2, 3, 30, 33, 601])
@pytest.mark.parametrize("interval", [None, 1, 2, 5, 10, 0.1, 7.5])
def test_the_probe_numbers_give_back_the_timeout(timeout: int, interval: float | None) -> None:
    initial, period, attempt, threshold = probe_numbers(timeout, interval)
    assert min(period, attempt, threshold) >= 1 and 0 <= initial <= period
    assert probe_timeout(initial, period, attempt, threshold) == timeout


@pytest.mark.parametrize(("name", "key"), [("1cache", "name"), ("cache", "aliases[0]")])
def test_a_name_kubernetes_refuses_is_an_error(name: str, key: str) -> None:
    svc = Service(name, image="redis:7", aliases=["2nd"] if key != "name" else [])
    with pytest.raises(ConfigError, match="starts with a letter") as caught:
        export_kubernetes([svc])
    assert caught.value.key == key


def test_an_alias_that_names_another_service_is_an_error() -> None:
    with pytest.raises(ConfigError, match="also names service 'cache'"):
        export_kubernetes([Service("cache", image="redis:7"),
                           Service("db", image="redis:7", aliases=["cache"])])


def test_oneshot_volumes_and_the_keys_a_cluster_does_it_its_own_way(tmp_path: Path) -> None:
    from pytest_envbox import Volume

    services = [
        Service("migrate", image="app:1", command=["migrate"], oneshot=True, retries=3,
                volumes=[Volume("data", "/data")]),
        Service("api", image="app:1", ports=[8000], stop_signal="QUIT", network_of="migrate",
                volumes=[Volume("data", "/srv/data", readonly=True),
                         Volume("conf", "/etc/app", files=(("a.conf", b"x", 0o644),))]),
    ]
    out = export_kubernetes(services)
    job = out.documents[0]
    assert (job["kind"], job["spec"]["backoffLimit"]) == ("Job", 3)
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    validate(out.documents)
    keys = {(n.service, n.key) for n in out.notes}
    assert {("api", "stop_signal"), ("api", "network_of"), ("api", "volumes"), ("migrate", "volumes")} <= keys
    (tmp_path / "k.yaml").write_text(to_yaml(out.documents))
    (tmp_path / "pyproject.toml").write_text('[tool.envbox]\nkubernetes = ["k.yaml"]\n')
    back = load_project_config(tmp_path).services
    assert back["migrate"].oneshot and back["migrate"].retries == 3  # the Job, read back
    assert {(v.target, v.readonly) for v in back["api"].volumes} == {("/srv/data", True)}
