"""load_manifests, field by field: what a container, a pod and a Service become."""

from __future__ import annotations

import base64
import textwrap
from pathlib import Path

import pytest

from pytest_envbox.errors import ConfigError
from pytest_envbox.kubernetes import (
    POD_IP,
    POD_NAME,
    Backend,
    Container,
    DirMount,
    FileMount,
    Ignored,
    KubeProject,
    ProbeTiming,
    ProjectedFile,
    ServicePort,
    load_manifests,
)
from pytest_envbox.probe import ExecProbe, HttpProbe, TcpProbe
from pytest_envbox.spec import Limits


def load(tmp_path: Path, *docs: str) -> KubeProject:
    files = []
    for i, doc in enumerate(docs):
        path = tmp_path / f"m{i}.yaml"
        path.write_text(textwrap.dedent(doc))
        files.append(path)
    return load_manifests(files)


def pod(containers: str, extra: str = "", name: str = "app") -> str:
    """A Pod document; ``containers`` and ``extra`` (pod spec keys) indented at the spec's level."""
    body = textwrap.indent(textwrap.dedent(containers).strip("\n"), "    ")
    more = textwrap.indent(textwrap.dedent(extra).strip("\n"), "  ") if extra else ""
    head = f"apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  labels: {{app: {name}}}\n"
    return f"{head}spec:\n{more}\n  containers:\n{body}\n"


def container(tmp_path: Path, body: str, *others: str, extra: str = "") -> Container:
    project = load(tmp_path, pod(body, extra), *others)
    (c,) = project.workloads["app"].containers
    return c


BINARY = base64.b64encode(bytes([255, 0])).decode()
CM = """
apiVersion: v1
kind: ConfigMap
metadata: {name: settings}
data: {LEVEL: debug, HOST: db, app.conf: "a = 1\\n"}
"""
SECRET = f"""
apiVersion: v1
kind: Secret
metadata: {{name: creds}}
type: Opaque
data: {{PASSWORD: {base64.b64encode(b"s3cret").decode()}, key.bin: {BINARY}}}
stringData: {{USER: admin}}
"""
SECRET_TEXT = f"""
apiVersion: v1
kind: Secret
metadata: {{name: creds}}
data: {{PASSWORD: {base64.b64encode(b"s3cret").decode()}}}
stringData: {{USER: admin}}
"""


# --- command and args ----------------------------------------------------------------------------


def test_command_replaces_the_entrypoint_and_args_follow(tmp_path: Path) -> None:
    body = "- {name: c, image: redis:7, command: [redis-server], args: [--port, '6380']}"
    s = container(tmp_path, body).service
    assert (s.image, s.command, s.args) == ("redis:7", ("redis-server", "--port", "6380"), None)


def test_args_alone_keep_the_entrypoint(tmp_path: Path) -> None:
    s = container(tmp_path, "- {name: c, image: redis:7, args: [--port, '6380']}").service
    assert (s.command, s.args) == ((), ("--port", "6380"))


def test_neither_keeps_entrypoint_and_cmd(tmp_path: Path) -> None:
    s = container(tmp_path, "- {name: c, image: redis:7}").service
    assert (s.command, s.args) == ((), None)
    s = container(tmp_path, "- {name: c, image: redis:7, command: [], args: []}").service
    assert (s.command, s.args) == ((), None)  # empty lists are no lists, as the runtime reads them
    s = container(tmp_path, "- {name: c, image: redis:7, command: [redis-server], args: []}").service
    assert (s.command, s.args) == (("redis-server",), None)


def test_zero_replicas_run_no_pod(tmp_path: Path) -> None:
    project = load(tmp_path, DEPLOYMENT.replace("replicas: 3", "replicas: 0"))
    assert project.workloads["web"].pods == () and project.workloads["web"].service_names() == ()
    assert project.envbox_services() == {}


def test_command_and_args_expand_the_containers_env(tmp_path: Path) -> None:
    s = container(tmp_path, """
        - name: c
          image: app:1
          command: ["/bin/sh", "-c", "echo $(GREETING) $$(GREETING) $(UNSET) $HOME"]
          args: ["$(GREETING)-$(PORT)"]
          env: [{name: GREETING, value: hi}, {name: PORT, value: "80"}]
    """).service
    assert s.command == ("/bin/sh", "-c", "echo hi $(GREETING) $(UNSET) $HOME", "hi-80")


def test_env_values_expand_the_variables_before_them_only(tmp_path: Path) -> None:
    s = container(tmp_path, """
        - name: c
          image: app:1
          env:
          - {name: A, value: a}
          - {name: B, value: "$(A)-$(C)"}
          - {name: C, value: c}
    """).service
    assert s.env == {"A": "a", "B": "a-$(C)", "C": "c"}


# --- env, envFrom, valueFrom ---------------------------------------------------------------------


def test_value_from_config_map_and_secret_keys(tmp_path: Path) -> None:
    s = container(tmp_path, """
        - name: c
          image: app:1
          env:
          - {name: LOG, valueFrom: {configMapKeyRef: {name: settings, key: LEVEL}}}
          - {name: PW, valueFrom: {secretKeyRef: {name: creds, key: PASSWORD}}}
          - {name: USER, valueFrom: {secretKeyRef: {name: creds, key: USER}}}
          - {name: GONE, valueFrom: {configMapKeyRef: {name: nowhere, key: X, optional: true}}}
          - {name: NOKEY, valueFrom: {secretKeyRef: {name: creds, key: X, optional: true}}}
    """, CM, SECRET).service
    assert s.env == {"LOG": "debug", "PW": "s3cret", "USER": "admin"}


def test_env_from_with_prefix_and_env_winning(tmp_path: Path) -> None:
    s = container(tmp_path, """
        - name: c
          image: app:1
          envFrom:
          - configMapRef: {name: settings}
            prefix: CFG_
          - secretRef: {name: creds}
          - secretRef: {name: absent, optional: true}
          env: [{name: USER, value: override}]
    """, CM.replace('app.conf: "a = 1\\n"', "X: y"), SECRET_TEXT).service
    assert s.env == {"CFG_LEVEL": "debug", "CFG_HOST": "db", "CFG_X": "y", "PASSWORD": "s3cret",
                     "USER": "override"}  # fmt: skip


def test_env_from_a_secret_that_is_not_text_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"envFrom\[0\]\.secretRef key 'key.bin'.*not UTF-8"):
        container(tmp_path, "- {name: c, image: a, envFrom: [{secretRef: {name: creds}}]}", SECRET)


def test_field_refs_pod_name_ip_namespace_labels(tmp_path: Path) -> None:
    c = container(tmp_path, """
        - name: c
          image: app:1
          command: [run, --bind=$(MY_IP)]
          env:
          - {name: MY_NAME, valueFrom: {fieldRef: {fieldPath: metadata.name}}}
          - {name: MY_IP, valueFrom: {fieldRef: {fieldPath: status.podIP}}}
          - {name: NS, valueFrom: {fieldRef: {fieldPath: metadata.namespace}}}
          - {name: APP, valueFrom: {fieldRef: {fieldPath: "metadata.labels['app']"}}}
          - {name: URL, value: "http://$(MY_IP):80"}
    """)
    assert c.service.env == {"MY_NAME": POD_NAME, "MY_IP": POD_IP, "NS": "default", "APP": "app",
                             "URL": f"http://{POD_IP}:80"}  # fmt: skip
    assert c.placeholders == ("MY_NAME", "MY_IP", "URL")
    assert c.service.command == ("run", f"--bind={POD_IP}")


# --- ports, resources, probes, user, cwd, pull ---------------------------------------------------


def test_ports_and_their_names(tmp_path: Path) -> None:
    c = container(tmp_path, """
        - name: c
          image: app:1
          ports: [{containerPort: 8080, name: http}, {containerPort: 9090, protocol: TCP, hostPort: 9090}]
    """)
    assert c.service.ports == (8080, 9090)
    assert c.port_names == {"http": 8080}


def test_limits_and_requests_only_where_no_limit(tmp_path: Path) -> None:
    c = container(tmp_path, """
        - name: c
          image: app:1
          resources:
            limits: {memory: 256Mi}
            requests: {memory: 64Mi, cpu: 500m}
    """)
    assert c.service.limits == Limits(memory=256 * 2**20, cpu=0.5)
    assert c.requests_as_limits == ("cpu",)
    c = container(tmp_path, "- {name: c, image: a, resources: {limits: {cpu: 1, memory: 1Gi}}}")
    assert (c.service.limits, c.requests_as_limits) == (Limits(memory=2**30, cpu=1.0), ())


def test_http_probe_by_port_name_and_the_timing_formula(tmp_path: Path) -> None:
    c = container(tmp_path, """
        - name: c
          image: app:1
          ports: [{containerPort: 8080, name: web}]
          readinessProbe:
            httpGet: {path: /healthz, port: web, scheme: HTTP}
            initialDelaySeconds: 5
            periodSeconds: 2
            timeoutSeconds: 3
            failureThreshold: 4
    """)
    assert c.service.ready == HttpProbe(8080, "/healthz", timeout=5 + 4 * (2 + 3), interval=1.0)
    assert c.probe == ProbeTiming(5.0, 2.0, 3.0, 4)


def test_probe_defaults(tmp_path: Path) -> None:
    probe = "{tcpSocket: {port: 6379}, periodSeconds: 1}"
    c = container(tmp_path, f"- {{name: c, image: a, readinessProbe: {probe}}}")
    assert c.service.ready == TcpProbe(6379, timeout=0 + 3 * (1 + 1), interval=1.0)
    c = container(tmp_path, "- {name: c, image: a, readinessProbe: {exec: {command: [pg_isready]}}}")
    assert c.service.ready == ExecProbe(["pg_isready"], timeout=33.0, interval=1.0)
    assert c.probe == ProbeTiming(0.0, 10.0, 1.0, 3)


def test_http_probe_by_number_default_path(tmp_path: Path) -> None:
    c = container(tmp_path, "- {name: c, image: a, readinessProbe: {httpGet: {port: 80}}}")
    assert c.service.ready == HttpProbe(80, "/", timeout=33.0, interval=1.0)


def test_user_from_pod_and_container_security_contexts(tmp_path: Path) -> None:
    extra = "securityContext: {runAsUser: 1000, runAsGroup: 2000, fsGroup: 3000}"
    assert container(tmp_path, "- {name: c, image: a}", extra=extra).service.user == "1000:2000"
    c = container(tmp_path, "- {name: c, image: a, securityContext: {runAsUser: 7}}", extra=extra)
    assert c.service.user == "7:2000"
    assert container(tmp_path, "- {name: c, image: a, securityContext: {runAsUser: 7}}").service.user == "7"
    assert container(tmp_path, "- {name: c, image: a}").service.user is None


def test_run_as_group_alone_is_reported(tmp_path: Path) -> None:
    project = load(tmp_path, pod("- {name: c, image: a, securityContext: {runAsGroup: 5}}"))
    assert project.workloads["app"].containers[0].service.user is None
    key = "spec.containers[0].securityContext.runAsGroup"
    assert Ignored(tmp_path / "m0.yaml", "Pod/app", key) in project.ignored


def test_working_dir_and_pull_policy(tmp_path: Path) -> None:
    s = container(tmp_path, "- {name: c, image: a, workingDir: /srv, imagePullPolicy: Always}").service
    assert (s.cwd, s.pull) == ("/srv", "always")
    assert container(tmp_path, "- {name: c, image: a, imagePullPolicy: Never}").service.pull == "never"
    assert container(tmp_path, "- {name: c, image: a}").service.pull == "missing"


# --- volumes -------------------------------------------------------------------------------------


def test_config_map_and_secret_volumes_become_files(tmp_path: Path) -> None:
    c = container(tmp_path, """
        - name: c
          image: a
          volumeMounts:
          - {name: conf, mountPath: /etc/app}
          - {name: one, mountPath: /etc/app.conf, subPath: app.conf}
          - {name: tls, mountPath: /run/tls}
    """, CM, SECRET, extra="""
        volumes:
        - {name: conf, configMap: {name: settings, items: [{key: app.conf, path: sub/app.conf, mode: 0600}]}}
        - {name: one, configMap: {name: settings}}
        - {name: tls, secret: {secretName: creds, defaultMode: 0400}}
    """)
    conf, one, tls = c.files
    source = "ConfigMap/settings"
    assert conf == FileMount("conf", source, "/etc/app", (ProjectedFile("sub/app.conf", b"a = 1\n", 0o600),))
    assert one == FileMount("one", source, "/etc/app.conf", (ProjectedFile("", b"a = 1\n", 0o644),))
    assert tls.source == "Secret/creds" and tls.readonly
    assert {f.path: (f.content, f.mode) for f in tls.files} == {
        "PASSWORD": (b"s3cret", 0o400), "key.bin": (b"\xff\x00", 0o400), "USER": (b"admin", 0o400)}


def test_empty_dirs(tmp_path: Path) -> None:
    project = load(tmp_path, pod("""
        - name: a
          image: a
          volumeMounts: [{name: shared, mountPath: /shared}, {name: ram, mountPath: /cache}]
        - name: b
          image: b
          volumeMounts: [{name: shared, mountPath: /in, readOnly: true}, {name: disk, mountPath: /d},
                         {name: shm, mountPath: /dev/shm}]
        - {name: c, image: c, volumeMounts: [{name: shm, mountPath: /dev/shm}]}
    """, extra="""
        volumes:
        - {name: shared, emptyDir: {}}
        - {name: ram, emptyDir: {medium: Memory, sizeLimit: 64Mi}}
        - {name: disk, emptyDir: {}}
        - {name: shm, emptyDir: {medium: Memory}}
    """))
    a, b, c = project.workloads["app"].containers
    assert a.service.tmpfs == {"/cache": 64 * 2**20}
    assert a.dirs == (DirMount("shared", "/shared", "", None),)
    assert b.dirs == (DirMount("shared", "/in", "", None, readonly=True), DirMount("disk", "/d", "", None),
                      DirMount("shm", "/dev/shm", "Memory", None))  # shared by b and c: one per pod
    assert c.dirs == (DirMount("shm", "/dev/shm", "Memory", None),) and b.service.tmpfs == {}


# --- workloads, names, replicas ------------------------------------------------------------------


DEPLOYMENT = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, annotations: {note: x}}
spec:
  replicas: 3
  strategy: {type: RollingUpdate}
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web, tier: front}}
    spec:
      nodeSelector: {disk: ssd}
      initContainers: [{name: migrate, image: app:1, command: [migrate]}]
      containers:
      - {name: server, image: app:1, ports: [{containerPort: 8080, name: http}]}
      - {name: proxy, image: envoy:1, ports: [{containerPort: 9901}]}
"""


def test_deployment_replicas_names_and_ignored_keys(tmp_path: Path) -> None:
    project = load(tmp_path, DEPLOYMENT)
    w = project.workloads["web"]
    assert (w.kind, w.replicas, dict(w.labels), w.pods) == ("Deployment", 3, {"app": "web", "tier": "front"},
                                                            ("web-0", "web-1", "web-2"))  # fmt: skip
    assert [c.service.name for c in w.init_containers] == ["web-0-migrate"]
    assert [c.service.name for c in w.containers] == ["web-0-server", "web-0-proxy"]
    assert w.service_names()[:3] == ("web-0-migrate", "web-0-server", "web-0-proxy")
    assert len(w.service_names()) == 9 and w.service_name("web-2", "proxy") == "web-2-proxy"
    assert w.init_containers[0].init and w.init_containers[0].service.command == ("migrate",)
    f = tmp_path / "m0.yaml"
    assert set(project.ignored) == {Ignored(f, "Deployment/web", "metadata.annotations"),
                                    Ignored(f, "Deployment/web", "spec.strategy"),
                                    Ignored(f, "Deployment/web", "spec.template.spec.nodeSelector")}
    assert set(project.envbox_services()) == {"web-0-migrate", "web-0-server", "web-0-proxy"}


def test_anchors_aliases_and_merge_keys_as_yaml_resolves_them(tmp_path: Path) -> None:
    project = load(tmp_path, """
        apiVersion: apps/v1
        kind: Deployment
        metadata: {name: web, labels: &labels {app: web, tier: front}}
        spec:
          selector: {matchLabels: *labels}
          template:
            metadata: {labels: *labels}
            spec:
              containers:
              - &server
                name: server
                image: app:1
                env: &env [{name: LEVEL, value: debug}, {name: PORT, value: "8080"}]
                resources: {limits: &small {memory: 64Mi, cpu: 250m}}
              - <<: *server           # a merge key: the keys of *server, then these over them
                name: worker
                args: [work]
              - <<: [{name: side, image: side:2}, *server]   # several: the first one wins
                env: [{name: ROLE, value: side}]
                resources: {limits: {<<: *small, cpu: "1"}}
        """)  # fmt: skip
    w = project.workloads["web"]
    assert dict(w.labels) == {"app": "web", "tier": "front"}
    server, worker, side = (c.service for c in w.containers)
    assert (server.name, server.image, server.args) == ("web-server", "app:1", None)
    assert server.env == {"LEVEL": "debug", "PORT": "8080"} == worker.env
    assert (worker.name, worker.image, worker.args) == ("web-worker", "app:1", ("work",))
    assert worker.limits == server.limits == Limits(memory=64 << 20, cpu=0.25)
    assert (side.name, side.image, side.env) == ("web-side", "side:2", {"ROLE": "side"})
    assert side.limits == Limits(memory=64 << 20, cpu=1.0)


def test_an_anchor_does_not_reach_the_next_document(tmp_path: Path) -> None:
    # Anchors are per document, as YAML says: an alias to one in an earlier document is an error
    # at the alias, not a silent copy.
    first = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a, labels: &l {app: a}}\n"
    with pytest.raises(ConfigError, match=r"m0\.yaml, line 7, column 29: not valid YAML: .*undefined alias"):
        load(tmp_path, first + "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: b, labels: *l}\n")


def test_statefulset_pods_are_numbered_and_job_uses_parallelism(tmp_path: Path) -> None:
    sts = ("apiVersion: apps/v1\nkind: StatefulSet\nmetadata: {name: db}\nspec:\n  serviceName: db\n"
           "  selector: {matchLabels: {app: db}}\n  template:\n    metadata: {labels: {app: db}}\n"
           "    spec: {containers: [{name: pg, image: postgres:16,\n"
           "                         volumeMounts: [{name: data, mountPath: /var/lib/pg}]}]}\n"
           "  volumeClaimTemplates: [{metadata: {name: data}, spec: {}}]\n")  # fmt: skip
    job = ("apiVersion: batch/v1\nkind: Job\nmetadata: {name: seed}\nspec:\n  parallelism: 2\n"
           "  backoffLimit: 1\n  template:\n    metadata: {labels: {job: seed}}\n"
           "    spec: {restartPolicy: Never, containers: [{name: s, image: a}]}\n")  # fmt: skip
    project = load(tmp_path, sts, job)
    db, seed = project.workloads["db"], project.workloads["seed"]
    assert (db.pods, db.containers[0].service.name) == (("db-0",), "db-0")
    assert db.containers[0].dirs == (DirMount("data", "/var/lib/pg", "", None),)
    assert (seed.kind, seed.replicas, seed.pods) == ("Job", 2, ("seed-0", "seed-1"))


def test_list_kind_is_flattened_and_other_kinds_ignored(tmp_path: Path) -> None:
    doc = """
    apiVersion: v1
    kind: List
    items:
    - {apiVersion: v1, kind: ServiceAccount, metadata: {name: sa}}
    - apiVersion: v1
      kind: Pod
      metadata: {name: p, labels: {a: b}}
      spec: {containers: [{name: c, image: a}]}
    ---
    apiVersion: networking.k8s.io/v1
    kind: Ingress
    metadata: {name: web}
    ---
    """
    project = load(tmp_path, doc)
    assert list(project.workloads) == ["p"]
    f = tmp_path / "m0.yaml"
    assert set(project.ignored) == {Ignored(f, "ServiceAccount/sa", None), Ignored(f, "Ingress/web", None)}


# --- Services ------------------------------------------------------------------------------------


def test_service_selects_workloads_and_resolves_named_target_ports(tmp_path: Path) -> None:
    svc = """
    apiVersion: v1
    kind: Service
    metadata: {name: web}
    spec:
      type: LoadBalancer
      selector: {app: web}
      ports:
      - {name: http, port: 80, targetPort: http, nodePort: 30080}
      - {port: 9901}
    """
    headless = ("apiVersion: v1\nkind: Service\nmetadata: {name: web-pods}\n"
                "spec: {clusterIP: None, selector: {tier: front}, ports: [{port: 8080, targetPort: 8080}]}\n")
    project = load(tmp_path, DEPLOYMENT, svc, headless)
    web = project.services["web"]
    assert (web.type, web.headless, web.selects) == ("LoadBalancer", False, ("web",))
    assert dict(web.selector) == {"app": "web"}
    assert web.ports == (ServicePort("http", 80, "http"), ServicePort(None, 9901, 9901))
    assert web.backends == (Backend("web", 80, 8080), Backend("web", 9901, 9901))
    assert project.services["web-pods"].headless
    assert Ignored(tmp_path / "m1.yaml", "Service/web", "spec.ports[0].nodePort") in project.ignored


@pytest.mark.parametrize("kind", ["Pod", "Deployment"])
def test_objects_in_any_order_across_files(tmp_path: Path, kind: str) -> None:
    user = pod("- {name: c, image: a, envFrom: [{configMapRef: {name: settings}}]}")
    if kind == "Deployment":
        user = DEPLOYMENT.replace("ports: [{containerPort: 9901}]",
                                  "envFrom: [{configMapRef: {name: settings}}]")
    project = load(tmp_path, user, CM)
    assert project.data["ConfigMap/settings"]["LEVEL"] == b"debug"
