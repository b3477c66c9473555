"""What Kubernetes manifests declare, as frozen data the engine can run (see the package docstring).

Each :class:`Container` carries an envbox :class:`~pytest_envbox.spec.Service` named for the
first pod of its workload (replica 0), plus what the spec cannot hold: files to write from
ConfigMaps and Secrets, directories shared between a pod's containers, the probe's Kubernetes
timings, and which values are placeholders the engine fills per pod (its name, its address).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from pytest_envbox import spec
from pytest_envbox.errors import ConfigError
from pytest_envbox.spec import Service

__all__ = [
    "POD_IP",
    "POD_NAME",
    "Backend",
    "Container",
    "DirMount",
    "FileMount",
    "Ignored",
    "KubeError",
    "KubeProject",
    "KubeService",
    "ProbeTiming",
    "ProjectedFile",
    "ServicePort",
    "Workload",
]

#: Stands for the pod's IP address (``fieldRef: status.podIP``) in env values, command and args:
#: the engine replaces every occurrence with the address the pod's network namespace gets.
POD_IP = spec.POD_IP
#: Stands for the pod's name (``fieldRef: metadata.name``), replaced by the engine per replica
#: with that replica's pod name (:attr:`Workload.pods`).
POD_NAME = "@envbox:pod-name@"


class KubeError(ConfigError):
    """A :class:`ConfigError` about a manifest: its file, document (``Kind/name``) and field path."""

    def __init__(self, message: str, *, file: Path, document: str | None, path: str | None) -> None:
        where = " ".join(p for p in (document, path) if p)
        super().__init__(f"{where}: {message} (in {file})" if where else f"{message} (in {file})")
        self.file = file
        self.document = document
        self.path = path
        self.key = path


class Ignored(NamedTuple):
    """A key (or a whole document: ``key`` None) read and deliberately ignored, for
    ``envbox doctor --config``. ``document`` is ``Kind/name``."""

    file: Path
    document: str
    key: str | None


@dataclass(frozen=True)
class ProjectedFile:
    """One file of a ConfigMap or Secret volume: ``path`` relative to the mount, its bytes, mode."""

    path: str
    content: bytes
    mode: int


@dataclass(frozen=True)
class FileMount:
    """A ConfigMap or Secret volume mounted at ``target``: the engine writes ``files`` into a
    private host directory and bind-mounts it (read-only unless ``readonly`` is False). With a
    ``subPath`` the mount is one file: ``target`` is that file and ``files`` holds it alone, with
    ``path`` "" (the engine mounts the file itself)."""

    volume: str
    source: str  # "ConfigMap/NAME" or "Secret/NAME"
    target: str
    files: tuple[ProjectedFile, ...]
    readonly: bool = True


@dataclass(frozen=True)
class DirMount:
    """An ``emptyDir`` (or a StatefulSet's claim template) shared by several containers of a pod,
    or not memory-backed: the engine makes one empty directory per pod (a tmpfs when ``medium`` is
    ``Memory``, capped at ``size`` bytes) and bind-mounts it at ``target`` in each container."""

    volume: str
    target: str
    medium: str  # "" (disk) or "Memory"
    size: int | None
    readonly: bool = False


@dataclass(frozen=True)
class ProbeTiming:
    """A readinessProbe's own numbers (seconds, and a count), kept for the engine: ``Service.ready``
    holds the derived interval and overall timeout (see the package docstring)."""

    initial_delay: float
    period: float
    attempt_timeout: float
    failure_threshold: int


@dataclass(frozen=True)
class Container:
    """One container of a pod: its envbox service (named for replica 0) and what the spec lacks."""

    name: str
    service: Service
    init: bool
    #: the names of ``ports[].name`` -> containerPort
    port_names: Mapping[str, int]
    files: tuple[FileMount, ...] = ()
    dirs: tuple[DirMount, ...] = ()
    probe: ProbeTiming | None = None
    #: "memory", "cpu": limits taken from ``resources.requests`` because no limit was given
    requests_as_limits: tuple[str, ...] = ()
    #: env names whose value holds :data:`POD_IP` or :data:`POD_NAME`
    placeholders: tuple[str, ...] = ()


@dataclass(frozen=True)
class Workload:
    """A Pod, Deployment, StatefulSet or Job: its pod template, run ``replicas`` times."""

    kind: str
    name: str
    file: Path
    replicas: int
    #: the pod template's labels (what Services select)
    labels: Mapping[str, str]
    init_containers: tuple[Container, ...]
    containers: tuple[Container, ...]
    #: the pods' names, one per replica (``frontend``; ``frontend-0``...; ``db-0`` for a StatefulSet)
    pods: tuple[str, ...]
    #: a Job's ``backoffLimit`` (default 6): how many times its failed containers are retried
    backoff_limit: int = 6

    def service_name(self, pod: str, container: str) -> str:
        """The envbox service of ``container`` in ``pod``: the pod's name when the pod has one
        container (and the container is no init container), else ``<pod>-<container>``."""
        single = len(self.containers) == 1 and self.containers[0].name == container
        return pod if single else f"{pod}-{container}"

    def service_names(self) -> tuple[str, ...]:
        """Every envbox service this workload runs, pod by pod, init containers first."""
        return tuple(self.service_name(pod, c.name) for pod in self.pods
                     for c in (*self.init_containers, *self.containers))  # fmt: skip


@dataclass(frozen=True)
class ServicePort:
    """A port of a Service: ``port`` reaches ``target`` (a number, or a container port's name)."""

    name: str | None
    port: int
    target: int | str


@dataclass(frozen=True)
class Backend:
    """Where a Service port leads in one selected workload: each of its pods' ``target_port``."""

    workload: str
    port: int
    target_port: int


@dataclass(frozen=True)
class KubeService:
    """A Service: its name resolves inside the environment; each port reaches the backends."""

    name: str
    file: Path
    selector: Mapping[str, str]
    ports: tuple[ServicePort, ...]
    #: ClusterIP, NodePort, LoadBalancer: all run as ClusterIP (a name and a virtual address)
    type: str
    #: ``clusterIP: None``: the name resolves to the pods' addresses, no DNAT
    headless: bool
    #: the workloads whose pod labels match the selector, in file order
    selects: tuple[str, ...]
    backends: tuple[Backend, ...]
    #: its ``metadata.namespace``: the name also resolves as ``NAME.NAMESPACE[.svc[.cluster.local]]``
    namespace: str = "default"


@dataclass(frozen=True)
class KubeProject:
    """What the manifests declare: workloads, Services, ConfigMaps and Secrets, and what was
    ignored."""

    files: tuple[Path, ...]
    workloads: Mapping[str, Workload]
    services: Mapping[str, KubeService]
    #: ConfigMap and Secret contents, "ConfigMap/NAME" -> key -> bytes (Secret data decoded)
    data: Mapping[str, Mapping[str, bytes]]
    ignored: tuple[Ignored, ...]

    def envbox_services(self) -> dict[str, Service]:
        """Every container of every workload's first pod, by envbox service name (replica 0);
        a workload scaled to 0 replicas has none."""
        return {c.service.name: c.service for w in self.workloads.values() if w.pods
                for c in (*w.init_containers, *w.containers)}  # fmt: skip
