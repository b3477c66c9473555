"""Kubernetes manifests written by others (tests/data/kubernetes, see its README): what
load_manifests maps, which Services select which workloads, what it ignores and refuses."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from pytest_envbox.kubernetes import POD_IP, Backend, DirMount, KubeError, KubeProject, load_manifests
from pytest_envbox.probe import ExecProbe, HttpProbe, TcpProbe
from pytest_envbox.spec import Limits

DATA = Path(__file__).resolve().parents[1] / "data" / "kubernetes"
BOUTIQUE = DATA / "microservices-demo" / "kubernetes-manifests.yaml"
GUESTBOOK = sorted((DATA / "guestbook").glob("*.yaml"))
CASSANDRA = sorted((DATA / "cassandra").glob("*.yaml"))
MiB = 2**20


def ignored_keys(project: KubeProject) -> Counter[str | None]:
    """How often each key path was ignored, the document left out."""
    return Counter(i.key for i in project.ignored)


def test_guestbook() -> None:
    project = load_manifests(GUESTBOOK)
    assert set(project.workloads) == {"frontend", "redis-master", "redis-replica"}
    frontend, master, replica = (project.workloads[n] for n in ("frontend", "redis-master", "redis-replica"))
    assert frontend.pods == ("frontend-0", "frontend-1", "frontend-2")
    assert master.pods == ("redis-master",) and replica.pods == ("redis-replica-0", "redis-replica-1")
    (php,) = frontend.containers
    assert (php.name, php.service.name, php.service.image) == ("php-redis", "frontend-0",
                                                              "gcr.io/google-samples/gb-frontend:v5")  # fmt: skip  # noqa: E501
    assert php.service.env == {"GET_HOSTS_FROM": "dns"} and php.service.ports == (80,)
    # only requests are given: they are the limits, and it is said
    assert php.service.limits == Limits(memory=100 * MiB, cpu=0.1)
    assert php.requests_as_limits == ("cpu", "memory")
    assert master.containers[0].service.image == "registry.k8s.io/redis:e2e"
    services = project.services
    assert {n: s.selects for n, s in services.items()} == {
        "frontend": ("frontend",), "redis-master": ("redis-master",), "redis-replica": ("redis-replica",)}
    assert services["frontend"].type == "NodePort" and not services["frontend"].headless
    assert services["frontend"].backends == (Backend("frontend", 80, 80),)
    assert services["redis-replica"].backends == (Backend("redis-replica", 6379, 6379),)
    assert project.ignored == ()


@pytest.fixture
def boutique() -> KubeProject:
    """The demo as published."""
    return load_manifests([BOUTIQUE])


def test_microservices_demo_checks_its_grpc_probes_as_tcp_and_says_so(boutique: KubeProject) -> None:
    ad = boutique.workloads["adservice"].containers[0]
    assert ad.service.ready == TcpProbe(9555, timeout=ad.service.ready.timeout, interval=1.0)  # type: ignore[union-attr]
    notes = [i for i in boutique.ignored if i.key and ".grpc" in i.key]
    assert len(notes) == 9  # every workload but the frontend (httpGet), redis-cart and the load generator
    assert notes[0].document == "Deployment/adservice"
    assert notes[0].key == ("spec.template.spec.containers[0].readinessProbe.grpc (checked as tcpSocket on "
                            "port 9555: envbox has no gRPC health client)")


def test_microservices_demo_workloads(boutique: KubeProject) -> None:
    assert list(boutique.workloads) == [
        "frontend", "adservice", "currencyservice", "cartservice", "redis-cart", "loadgenerator",
        "recommendationservice", "checkoutservice", "emailservice", "paymentservice",
        "shippingservice", "productcatalogservice"]  # fmt: skip
    frontend = boutique.workloads["frontend"].containers[0]
    s = frontend.service
    assert (s.name, s.user, s.ports) == ("frontend", "1000:1000", (8080,))
    assert s.image == "us-central1-docker.pkg.dev/online-boutique-ci/microservices-demo/frontend:v0.10.6"
    assert s.limits == Limits(memory=128 * MiB, cpu=0.2) and frontend.requests_as_limits == ()
    assert s.ready == HttpProbe(8080, "/_healthz", timeout=10 + 3 * (10 + 1), interval=1.0)
    assert s.env["PRODUCT_CATALOG_SERVICE_ADDR"] == "productcatalogservice:3550"
    redis = boutique.workloads["redis-cart"].containers[0]
    assert redis.service.ready == TcpProbe(6379, timeout=0 + 3 * (5 + 1), interval=1.0)
    assert redis.dirs == (DirMount("redis-data", "/data", "", None),)
    load = boutique.workloads["loadgenerator"]
    (check,) = load.init_containers
    assert (check.service.name, load.containers[0].service.name) == ("loadgenerator-frontend-check", "loadgenerator")  # noqa: E501
    # its shell script's $(seq ...) and $(wget ...) are no Kubernetes variables: left for the shell
    assert "for i in $(seq 1 $MAX_RETRIES); do" in check.service.command[2]
    assert all(isinstance(c.service.ready, TcpProbe)
               for n, w in boutique.workloads.items() if n not in ("frontend", "loadgenerator")
               for c in w.containers)  # fmt: skip


def test_microservices_demo_services(boutique: KubeProject) -> None:
    services = boutique.services
    assert len(services) == 12
    assert all(s.selects == (s.name,) for n, s in services.items() if n != "frontend-external")
    assert services["frontend-external"].selects == ("frontend",)
    assert services["frontend-external"].type == "LoadBalancer"
    assert services["frontend"].backends == (Backend("frontend", 80, 8080),)
    assert services["emailservice"].backends == (Backend("emailservice", 5000, 8080),)


def test_microservices_demo_ignored(boutique: KubeProject) -> None:
    whole = sorted(i.document for i in boutique.ignored if i.key is None)
    assert whole == sorted(f"ServiceAccount/{n}" for n in boutique.workloads if n != "redis-cart")
    keys = ignored_keys(boutique)
    container = "spec.template.spec.containers[0]."
    assert keys[container + "livenessProbe"] == 11  # not the loadgenerator
    assert keys[container + "securityContext.readOnlyRootFilesystem"] == 12
    assert keys["spec.template.spec.serviceAccountName"] == 11
    assert keys["spec.template.spec.securityContext.fsGroup"] == 12
    assert keys["spec.template.spec.securityContext.runAsNonRoot"] == 12
    assert keys[container + "readinessProbe.httpGet.httpHeaders"] == 1
    assert keys["spec.template.metadata.annotations"] == 2
    assert set(keys) <= {None, "spec.template.metadata.annotations", "spec.template.spec.serviceAccountName",
                         "spec.template.spec.terminationGracePeriodSeconds", "spec.template.spec.restartPolicy",  # noqa: E501
                         "spec.template.spec.securityContext.fsGroup",
                         "spec.template.spec.securityContext.runAsNonRoot",
                         "spec.template.spec.initContainers[0].securityContext.allowPrivilegeEscalation",
                         "spec.template.spec.initContainers[0].securityContext.readOnlyRootFilesystem",
                         "spec.template.spec.initContainers[0].securityContext.capabilities.drop",
                         container + "livenessProbe", container + "readinessProbe.httpGet.httpHeaders",
                         *(n.key for n in boutique.ignored if n.key and ".grpc" in n.key),
                         container + "securityContext.allowPrivilegeEscalation",
                         container + "securityContext.readOnlyRootFilesystem",
                         container + "securityContext.capabilities.drop"}  # fmt: skip


def test_cassandra_refuses_the_added_capability() -> None:
    with pytest.raises(KubeError) as info:
        load_manifests(CASSANDRA)
    assert (info.value.document, info.value.path) == (
        "StatefulSet/cassandra", "spec.template.spec.containers[0].securityContext.capabilities.add")


def test_cassandra_without_it(tmp_path: Path) -> None:
    service, statefulset = CASSANDRA
    text = statefulset.read_text().replace("        securityContext:\n          capabilities:\n"
                                           "            add:\n              - IPC_LOCK\n", "")  # fmt: skip
    (tmp_path / statefulset.name).write_text(text)
    project = load_manifests([service, tmp_path / statefulset.name])
    db = project.workloads["cassandra"]
    assert (db.kind, db.pods) == ("StatefulSet", ("cassandra-0", "cassandra-1", "cassandra-2"))
    (c,) = db.containers
    assert c.service.name == "cassandra-0" and c.service.pull == "always"
    assert c.service.ports == (7000, 7001, 7199, 9042) and c.port_names["cql"] == 9042
    assert c.service.env["POD_IP"] == POD_IP and c.placeholders == ("POD_IP",)
    assert c.service.env["CASSANDRA_SEEDS"] == "cassandra-0.cassandra.default.svc.cluster.local"
    assert c.service.ready == ExecProbe(["/bin/bash", "-c", "/ready-probe.sh"], timeout=15 + 3 * (10 + 5), interval=1.0)  # noqa: E501
    assert c.service.limits == Limits(memory=2**30, cpu=0.5) and c.requests_as_limits == ()
    assert c.dirs == (DirMount("cassandra-data", "/var/lib/cassandra", "", None),)
    cassandra = project.services["cassandra"]
    assert cassandra.headless and cassandra.selects == ("cassandra",)
    assert cassandra.backends == (Backend("cassandra", 9042, 9042),)
    documents = {i.document for i in project.ignored if i.key is None}
    assert documents == {"StorageClass/fast"}
    keys = ignored_keys(project)
    assert keys["spec.template.spec.terminationGracePeriodSeconds"] == 1
    assert keys["spec.template.spec.containers[0].livenessProbe"] == 1
    assert keys["spec.template.spec.containers[0].lifecycle"] == 1
    assert keys["spec.volumeClaimTemplates"] == 1
