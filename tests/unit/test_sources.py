"""``compose = [...]`` and ``kubernetes = [...]`` in ``[tool.envbox]``: imported services, overrides
by name, Kubernetes pods and Services as the engine runs them, and bad input named by place."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import pytest

from pytest_envbox.config import load_project_config, select, start_levels
from pytest_envbox.errors import ConfigError
from pytest_envbox.mounts import Volume
from pytest_envbox.probe import ExecProbe
from pytest_envbox.spec import Limits

DATA = Path(__file__).resolve().parents[1] / "data"


def project(tmp_path: Path, toml: str, **files: str) -> Path:
    (tmp_path / "pyproject.toml").write_text(textwrap.dedent(toml))
    for name, text in files.items():
        path = tmp_path / name.replace("__", "/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return tmp_path


COMPOSE = """\
    services:
      web:
        image: example/web:1
        command: ["serve", "--port", "8000"]
        environment: {LOG: info, DB: "postgres://db:5432/app"}
        ports: ["8080:8000"]
        depends_on: {db: {condition: service_healthy}}
        restart: always
        deploy: {resources: {limits: {memory: 256M, cpus: "0.5"}}}
        working_dir: /srv
        user: app
      db:
        image: postgres:16
        stop_signal: SIGINT
        volumes: [pgdata:/var/lib/postgresql/data]
        healthcheck: {test: ["CMD", "pg_isready"], interval: 1s}
    volumes:
      pgdata: {}
"""


def test_compose_services_join_the_catalog_with_a_topology_and_ignored_keys(tmp_path: Path) -> None:
    root = project(tmp_path, '[tool.envbox]\ncompose = ["compose.yaml"]\n', **{"compose.yaml": COMPOSE})
    catalog = load_project_config(root, environ={})
    assert set(catalog.services) == {"web", "db"}
    web, db = catalog.services["web"], catalog.services["db"]
    assert web.image == "example/web:1" and web.args == ("serve", "--port", "8000")
    assert web.ports == (8000,) and not web.host_ports  # 8080 on the host is not bound
    assert web.limits == Limits(memory=256 * 2**20, cpu=0.5)
    assert web.depends_on == ("db",)
    assert db.stop_signal == "SIGINT"
    assert db.volumes == (Volume("pgdata", "/var/lib/postgresql/data"),)
    assert catalog.topologies["compose"] == ("web", "db")
    assert catalog.origins["web"] == "compose.yaml services.web"
    assert "compose.yaml: services.web.restart" in catalog.ignored
    assert [s.name for s in select(catalog, ["web"])] == ["db", "web"]


def test_an_override_changes_only_the_keys_it_sets(tmp_path: Path) -> None:
    root = project(tmp_path, """\
        [tool.envbox]
        compose = ["compose.yaml"]
        [tool.envbox.services.web]
        limits = { memory = "512Mi" }
        env = { LOG = "debug" }
        ports = [9000]
    """, **{"compose.yaml": COMPOSE})
    web = load_project_config(root, environ={}).services["web"]
    assert web.limits == Limits(memory=512 * 2**20, cpu=0.5)  # cpu kept
    assert web.env == {"LOG": "debug", "DB": "postgres://db:5432/app"}
    assert web.ports == (9000,)
    assert web.image == "example/web:1" and web.args == ("serve", "--port", "8000")
    assert web.cwd == "/srv" and web.user == "app" and web.depends_on == ("db",)


def test_image_false_runs_a_host_program_instead_of_the_image(tmp_path: Path) -> None:
    root = project(tmp_path, """\
        [tool.envbox]
        compose = ["compose.yaml"]
        [tool.envbox.services.web]
        image = false
        command = ["python3", "-m", "http.server", "8000"]
    """, **{"compose.yaml": COMPOSE})
    catalog = load_project_config(root, environ={})
    web = catalog.services["web"]
    assert web.image is None and web.args is None
    assert web.command == ("python3", "-m", "http.server", "8000")
    assert web.cwd is None and web.user is None  # paths and users of the image, dropped
    assert web.env["DB"] == "postgres://db:5432/app" and web.ports == (8000,)
    assert "pyproject.toml [tool.envbox.services.web]" in catalog.origins["web"]


def test_image_false_without_a_command_says_what_to_give(tmp_path: Path) -> None:
    root = project(tmp_path, '[tool.envbox]\ncompose = ["compose.yaml"]\n'
                   '[tool.envbox.services.web]\nimage = false\n', **{"compose.yaml": COMPOSE})
    with pytest.raises(ConfigError) as info:
        load_project_config(root, environ={})
    assert info.value.service == "web" and info.value.key == "command"
    assert "host program" in str(info.value) and "pyproject.toml" in str(info.value)


def test_an_override_with_an_unknown_key_names_it(tmp_path: Path) -> None:
    root = project(tmp_path, '[tool.envbox]\ncompose = ["compose.yaml"]\n'
                   '[tool.envbox.services.db]\nlimit = { memory = "1Gi" }\n', **{"compose.yaml": COMPOSE})
    with pytest.raises(ConfigError, match="did you mean 'limits'") as info:
        load_project_config(root, environ={})
    assert info.value.service == "db"


def test_a_missing_file_and_a_glob_matching_nothing_are_named(tmp_path: Path) -> None:
    root = project(tmp_path, '[tool.envbox]\ncompose = ["compose.yml"]\n')
    with pytest.raises(ConfigError, match=r"'compose\.yml': there is no such file") as info:
        load_project_config(root, environ={})
    assert info.value.key == "tool.envbox.compose[0]"
    root = project(tmp_path, '[tool.envbox]\nkubernetes = ["deploy/*.yaml"]\n')
    with pytest.raises(ConfigError, match="matches no file"):
        load_project_config(root, environ={})


def test_guestbook_replicas_and_services_become_services_and_virtual_addresses(tmp_path: Path) -> None:
    shutil.copytree(DATA / "kubernetes" / "guestbook", tmp_path / "deploy")
    root = project(tmp_path, '[tool.envbox]\nkubernetes = ["deploy/*.yaml"]\n')
    catalog = load_project_config(root)
    assert set(catalog.services) == {"frontend-0", "frontend-1", "frontend-2", "redis-master",
                                     "redis-replica-0", "redis-replica-1"}
    replica = catalog.virtual["redis-replica"]
    assert replica.backends == (("redis-replica-0", 6379, 6379), ("redis-replica-1", 6379, 6379))
    assert "redis-replica.default.svc.cluster.local" in replica.hostnames
    assert catalog.virtual["frontend"].backends[0] == ("frontend-0", 80, 80)
    assert set(catalog.topologies["kubernetes"]) == set(catalog.services)
    assert catalog.origins["frontend-1"] == ("deploy/frontend-deployment.yaml Deployment/frontend "
                                             "container php-redis (pod frontend-1)")
    # requests stand in for limits where no limit is given (docs/kubernetes.md)
    assert catalog.services["redis-master"].limits == Limits(memory=100 * 2**20, cpu=0.1)


POD = """\
    apiVersion: v1
    kind: ConfigMap
    metadata: {name: app-config}
    data: {app.conf: "level=debug\\n"}
    ---
    apiVersion: apps/v1
    kind: Deployment
    metadata: {name: api}
    spec:
      replicas: 2
      selector: {matchLabels: {app: api}}
      template:
        metadata: {labels: {app: api}}
        spec:
          initContainers:
          - {name: migrate, image: "app:1", command: ["migrate"]}
          - {name: seed, image: "app:1", command: ["seed"]}
          containers:
          - name: app
            image: "app:1"
            ports: [{containerPort: 8000, name: http}]
            env:
            - {name: POD, valueFrom: {fieldRef: {fieldPath: metadata.name}}}
            volumeMounts:
            - {name: config, mountPath: /etc/app}
            - {name: scratch, mountPath: /scratch}
          - name: proxy
            image: "proxy:1"
            volumeMounts: [{name: scratch, mountPath: /data}]
          volumes:
          - {name: config, configMap: {name: app-config}}
          - {name: scratch, emptyDir: {}}
    ---
    apiVersion: v1
    kind: Service
    metadata: {name: api}
    spec:
      selector: {app: api}
      ports: [{port: 80, targetPort: http}]
"""


def test_a_pods_init_containers_run_in_order_and_its_containers_share_its_network(tmp_path: Path) -> None:
    root = project(tmp_path, '[tool.envbox]\nkubernetes = ["app.yaml"]\n', **{"app.yaml": POD})
    catalog = load_project_config(root)
    s = catalog.services
    assert s["api-0-migrate"].oneshot and s["api-0-seed"].oneshot and not s["api-0-app"].oneshot
    assert s["api-0-seed"].depends_on == ("api-0-migrate",)
    assert s["api-0-seed"].network_of == "api-0-migrate"
    assert set(s["api-0-app"].depends_on) == {"api-0-seed", "api-0-migrate"}
    assert s["api-1-proxy"].network_of == "api-1-migrate"
    assert s["api-1-app"].env["POD"] == "api-1"
    conf = next(v for v in s["api-0-app"].volumes if v.target == "/etc/app")
    assert conf.readonly and conf.files == (("app.conf", b"level=debug\n", 0o644),)
    scratch = {v.name for n in ("api-0-app", "api-0-proxy") for v in s[n].volumes if v.target != "/etc/app"}
    assert scratch == {"api-0.scratch"}  # one directory per pod, shared by its containers
    assert catalog.virtual["api"].backends == (("api-0-migrate", 80, 8000), ("api-1-migrate", 80, 8000))
    levels = [[x.name for x in lvl] for lvl in start_levels(select(catalog, ["api-0-app", "api-0-proxy"]))]
    assert levels == [["api-0-migrate"], ["api-0-seed"], ["api-0-app", "api-0-proxy"]]


def test_a_name_in_both_compose_and_kubernetes_is_refused(tmp_path: Path) -> None:
    manifest = "apiVersion: v1\nkind: Pod\nmetadata: {name: db}\nspec: {containers: [{name: db, image: x}]}\n"
    root = project(tmp_path, '[tool.envbox]\ncompose = ["compose.yaml"]\nkubernetes = ["k.yaml"]\n',
                   **{"compose.yaml": COMPOSE, "k.yaml": manifest})
    with pytest.raises(ConfigError, match=r"defined twice: in compose.yaml services.db and in k.yaml Pod/db"):
        load_project_config(root, environ={})


def test_a_toml_service_named_as_a_kubernetes_service_is_refused(tmp_path: Path) -> None:
    shutil.copytree(DATA / "kubernetes" / "microservices-demo", tmp_path / "deploy")
    root = project(tmp_path, '[tool.envbox]\nkubernetes = ["deploy/*.yaml"]\n'
                   '[tool.envbox.services.frontend-external]\ncommand = ["true"]\n')
    with pytest.raises(ConfigError, match="name of a Kubernetes Service") as info:
        load_project_config(root)
    assert info.value.service == "frontend-external"


@pytest.mark.parametrize(("files", "place"), [
    ({"compose.yaml": "services:\n  web:\n    image: [x\n"}, "compose.yaml, line 4, column 1"),
    ({"compose.yaml": "services:\n  web:\n    image: ${TAG?set TAG to the tag to test}\n"},
     "set TAG to the tag to test"),
    ({"compose.yaml": "services:\n  a: {image: x, depends_on: [b]}\n  b: {image: x, depends_on: [a]}\n"},
     "a -> b -> a"),
    ({"k.yaml": "kind: Service\napiVersion: v1\nmetadata: {name: s}\nspec: {selector: {app: none}, "
                "ports: [{port: 80}]}\n"}, "selects no pod"),
    ({"k.yaml": "kind: Pod\napiVersion: v1\nmetadata: {name: p, labels: {app: p}}\nspec: {containers: "
                "[{name: c, image: x}]}\n---\nkind: Service\napiVersion: v1\nmetadata: {name: s}\nspec: "
                "{selector: {app: p}, ports: [{port: 80, targetPort: web}]}\n"}, "web"),
    ({"k.yaml": "kind: Pod\napiVersion: v1\nmetadata: {name: p}\nspec: {containers: [{name: c, image: x, "
                "env: [{name: A, valueFrom: {configMapKeyRef: {name: cm, key: nope}}}]}]}\n---\n"
                "kind: ConfigMap\napiVersion: v1\nmetadata: {name: cm}\ndata: {a: b}\n"}, "nope"),
])  # fmt: skip
def test_bad_files_are_a_config_error_naming_the_file_and_the_place(
        tmp_path: Path, files: dict[str, str], place: str) -> None:  # fmt: skip
    key = "compose" if "compose.yaml" in files else "kubernetes"
    root = project(tmp_path, f'[tool.envbox]\n{key} = ["{next(iter(files))}"]\n', **files)
    with pytest.raises(ConfigError) as info:
        load_project_config(root, environ={})
    assert place in str(info.value)
    assert str(root / next(iter(files))) in str(info.value)  # the file, by its path
    assert getattr(info.value, "file", None) == root / next(iter(files))


def test_a_cycle_made_by_an_override_names_where_each_service_is_declared(tmp_path: Path) -> None:
    # A manifest cannot make a cycle (a pod's second container waits for its first, which makes
    # the pod's network); an override's depends_on can, and the error traces it to both files.
    manifest = ("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n"
                "spec: {containers: [{name: a, image: x}, {name: b, image: x}]}\n")
    root = project(tmp_path, '[tool.envbox]\nkubernetes = ["k.yaml"]\n[tool.envbox.services.p-a]\n'
                   'depends_on = ["p-b"]\n', **{"k.yaml": manifest})
    catalog = load_project_config(root)
    with pytest.raises(ConfigError) as info:
        select(catalog, ["p-a"])
    assert (info.value.service, info.value.key) == ("p-a", "depends_on")
    assert "p-a -> p-b -> p-a; remove one of these dependencies (declared in p-a: " in str(info.value)
    assert "k.yaml Pod/p container a, with pyproject.toml [tool.envbox.services.p-a]" in str(info.value)
    assert "p-b: " in str(info.value) and "k.yaml Pod/p container b)" in str(info.value)


def test_an_override_named_as_a_workload_changes_each_of_its_replicas(tmp_path: Path) -> None:
    shutil.copytree(DATA / "kubernetes" / "guestbook", tmp_path / "deploy")
    root = project(tmp_path, """\
        [tool.envbox]
        kubernetes = ["deploy/*.yaml"]
        [tool.envbox.services.redis-replica]
        image = "oci:./redis:latest"
        args = ["redis-server", "--replicaof", "redis-master", "6379"]
    """)
    catalog = load_project_config(root)
    for name in ("redis-replica-0", "redis-replica-1"):
        assert catalog.services[name].image == "oci:./redis:latest"
        assert catalog.services[name].args == ("redis-server", "--replicaof", "redis-master", "6379")
        assert "pyproject.toml [tool.envbox.services.redis-replica]" in catalog.origins[name]
    assert catalog.services["frontend-0"].image == "gcr.io/google-samples/gb-frontend:v5"


def test_an_override_named_as_a_workload_of_several_containers_must_name_one(tmp_path: Path) -> None:
    root = project(tmp_path, '[tool.envbox]\nkubernetes = ["app.yaml"]\n[tool.envbox.services.api]\n'
                   'limits = { memory = "1Gi" }\n', **{"app.yaml": POD})
    with pytest.raises(ConfigError, match="several containers"):
        load_project_config(root)


def test_image_false_drops_what_names_the_image_and_keeps_the_rest(tmp_path: Path) -> None:
    # What docs/compose.md's Overrides says, key by key: the compose command (args) goes with
    # the entrypoint, since the table's command is the whole argv.
    compose = """\
        services:
          api:
            image: team/api:1
            pull_policy: always
            entrypoint: ["/entry.sh"]
            command: ["serve", "--port", "8000"]
            working_dir: /srv
            user: app
            environment: {A: b}
            ports: [8000]
            depends_on: [db]
            tmpfs: [/tmp]
            stop_grace_period: 3s
            stop_signal: SIGINT
            healthcheck: {test: ["CMD", "true"]}
            networks: {default: {aliases: [web]}}
            cpus: 0.5
          db: {image: x}
    """
    root = project(tmp_path, '[tool.envbox]\ncompose = ["compose.yaml"]\n[tool.envbox.services.api]\n'
                   'image = false\ncommand = ["python3", "-m", "http.server", "8000"]\n',
                   **{"compose.yaml": compose})
    api = load_project_config(root, environ={}).services["api"]
    assert (api.image, api.pull, api.command, api.args) == (
        None, "missing", ("python3", "-m", "http.server", "8000"), None)
    assert (api.cwd, api.user) == (None, None)
    assert (api.env, api.ports, api.depends_on) == ({"A": "b"}, (8000,), ("db",))
    assert api.tmpfs == {"/tmp": 512 << 20}
    assert (api.stop_timeout, api.stop_signal, api.aliases, api.limits.cpu) == (3.0, "SIGINT", ("web",), 0.5)
    assert isinstance(api.ready, ExecProbe) and api.ready.argv == ("true",)


def test_a_service_built_by_compose_runs_from_the_checkout_with_image_false(tmp_path: Path) -> None:
    compose = "services:\n  api:\n    build: .\n    ports: [8000]\n    environment: {DB: db}\n"
    root = project(tmp_path, '[tool.envbox]\ncompose = ["compose.yaml"]\n[tool.envbox.services.api]\n'
                   'image = false\ncommand = ["python3", "-m", "http.server"]\n', **{"compose.yaml": compose})
    catalog = load_project_config(root, environ={})
    api = catalog.services["api"]
    assert api.image is None and api.command == ("python3", "-m", "http.server") and api.env == {"DB": "db"}
    assert "compose.yaml: services.api.build" in catalog.ignored
    root = project(tmp_path, '[tool.envbox]\ncompose = ["compose.yaml"]\n', **{"compose.yaml": compose})
    with pytest.raises(ConfigError, match="image = false") as info:
        load_project_config(root, environ={})
    assert (info.value.service, info.value.key) == ("api", "build")


def test_asking_for_a_kubernetes_service_starts_the_pods_it_selects(tmp_path: Path) -> None:
    root = project(tmp_path, '[tool.envbox]\nkubernetes = ["app.yaml"]\n', **{"app.yaml": POD})
    catalog = load_project_config(root)
    names = [s.name for s in select(catalog, ["api"])]  # the Service api: both pods, all containers
    assert set(names) == {f"api-{i}-{c}" for i in (0, 1) for c in ("migrate", "seed", "app", "proxy")}
