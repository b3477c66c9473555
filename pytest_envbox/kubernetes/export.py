"""Declared services as Kubernetes manifests: ``export_kubernetes(services)`` (API.md 7).

The inverse of :func:`~pytest_envbox.kubernetes.load_manifests`: loading what this writes gives
back the same :class:`~pytest_envbox.spec.Service` for every key both sides hold (the round trip
is tested over generated declarations, ``tests/unit/test_kube_export.py``). Pure logic (no
engine, no kernel): the objects are plain dicts; :func:`to_yaml` dumps them with PyYAML, imported
only then.

Each service becomes a Deployment (``replicas: 1``, its pods labelled and selected by
``app.kubernetes.io/name: <name>``, one container named as the service) and a Service of the
same name selecting that pod. Mapping (Service key -> manifest):

===============  ===================================================================================
image, pull      container image; imagePullPolicy (missing: IfNotPresent, always: Always, never: Never)
command          command, no args (the whole argv: Kubernetes' command replaces the Entrypoint and
                 the Cmd, as envbox's does); ``$`` is written ``$$`` where Kubernetes would expand it
args             args (the Entrypoint kept); ``args = []`` has no form (an empty args keeps the Cmd)
env              env, in order, values escaped as command's
cwd              workingDir
ports            containerPort named ``tcp-<port>``; a ClusterIP Service ``<name>`` with port =
                 targetPort = the container port; no ports: a headless Service (clusterIP None), so
                 that the name still resolves, as every service's does in an environment
aliases          one more Service per alias, selecting the same pod (a DNS-1035 label each)
limits           resources.limits: memory in the largest binary unit that is exact (``64Mi``,
                 else bytes), cpu in millicores (``250m``, whole cores as ``2``; rounded up to
                 1m, with a note); Kubernetes sets the requests equal
ready            readinessProbe: tcp -> tcpSocket, http -> httpGet (path), exec -> exec.
                 periodSeconds = the interval rounded up to whole seconds (1 when none is
                 given, and at most timeout - 1), timeoutSeconds 1, failureThreshold and
                 initialDelaySeconds chosen so that initialDelay + failureThreshold x
                 (period + timeoutSeconds) is the probe's timeout, which is what the loader
                 reads back (exact for whole seconds >= 2; else rounded up, with a note)
user             securityContext.runAsUser[/runAsGroup] for ``uid[:gid]``
tmpfs            an emptyDir volume ``tmpfs-<i>`` (medium Memory, sizeLimit) mounted at the path
volumes          an emptyDir volume ``volume-<i>`` per volume without files (readOnly kept)
oneshot, retries a Job (restartPolicy Never, backoffLimit = retries) instead of a Deployment
stop_timeout     terminationGracePeriodSeconds (whole seconds, rounded up)
===============  ===================================================================================

The pod spec also says ``enableServiceLinks: false`` and ``automountServiceAccountToken: false``:
an environment gives a service neither ``<NAME>_SERVICE_HOST`` variables nor an API token, so
the pod sees the same environment the test saw.

No Kubernetes form, never dropped silently: a service without ``image`` (a program of this
machine) is a :class:`ConfigError` naming it and the fix (give it an ``image``), unless
``skip_host_programs`` (the CLI's ``--skip-host-programs``) leaves it out with a note. Each of
these is left out of the manifests with one :class:`Note` per service and key: ``mounts`` (host
paths), ``ready`` a log probe, ``ready.status`` (Kubernetes takes any 200-399), ``limits.pids``
and ``limits.nofile`` (node settings, not pod fields), a ``user`` given by name, ``pass_env``,
``host_ports``, ``depends_on`` (pods start together), ``args = []``, ``stop_signal`` (the
image's STOPSIGNAL rules), volumes holding files, a volume shared between services (an emptyDir is
one pod's), ``network_of`` (a pod of its own); and notes for values
changed on the way (rounded timeouts, intervals, cpu, stop_timeout) and for local images
(``oci:``, ``oci-archive:``, ``docker-archive:``), which a cluster cannot pull. A name or alias
that is no DNS-1035 label (a Service name starts with a letter) is a :class:`ConfigError`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pytest_envbox.errors import ConfigError
from pytest_envbox.probe import ExecProbe, HttpProbe, LogProbe, Probe, TcpProbe
from pytest_envbox.spec import HOME, Service

__all__ = ["NAME_LABEL", "Export", "Note", "export_kubernetes", "probe_numbers", "to_yaml"]

#: The label every exported pod carries, and every exported Service selects.
NAME_LABEL = "app.kubernetes.io/name"
_PULL = {"missing": "IfNotPresent", "always": "Always", "never": "Never"}
_BINARY = (("Ei", 2**60), ("Pi", 2**50), ("Ti", 2**40), ("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10))
#: A Service's name: Kubernetes wants a DNS-1035 label (envbox's names may start with a digit).
_DNS_1035 = re.compile(r"\A[a-z]([-a-z0-9]{0,61}[a-z0-9])?\Z")
_UID = re.compile(r"\A(\d+)(?::(\d+))?\Z")
_LOCAL_IMAGE = ("oci:", "oci-archive:", "docker-archive:")


@dataclass(frozen=True)
class Note:
    """What the manifests cannot say (or say differently) about one key of one service."""

    service: str
    key: str
    message: str

    def __str__(self) -> str:
        return f"service {self.service!r}, key {self.key!r}: {self.message}"


@dataclass(frozen=True)
class Export:
    """The objects to apply, in order (per service: its Deployment, then its Services), and the
    notes about what they leave out; ``skipped`` lists the services left out entirely."""

    documents: tuple[dict[str, Any], ...]
    notes: tuple[Note, ...]
    skipped: tuple[str, ...] = ()


def export_kubernetes(services: Sequence[Service], *, skip_host_programs: bool = False) -> Export:
    """Deployments and Services for ``services`` (see the module docstring for the mapping).

    Raises :class:`ConfigError` for a service without ``image`` (unless ``skip_host_programs``),
    for a name Kubernetes refuses, and for two objects of the same name.
    """
    hosted = [s.name for s in services if s.image is None]
    if hosted and not skip_host_programs:
        others = f" (nor do {', '.join(map(repr, hosted[1:]))})" if len(hosted) > 1 else ""
        raise ConfigError(
            f"has no `image`{others}: a cluster runs images, not programs of this machine; give "
            "it an `image` (build one from the checkout and push it where the cluster pulls "
            "from), or leave it out with `envbox export --skip-host-programs`",
            service=hosted[0],
            key="image",
        )
    notes: list[Note] = []
    documents: list[dict[str, Any]] = []
    owners: dict[str, str] = {}
    for service in services:
        if service.image is None:
            notes.append(Note(service.name, "image", "has no image: left out of the manifests "
                              "(--skip-host-programs); services that use it must find it elsewhere"))
            continue
        for i, name in enumerate((service.name, *service.aliases)):
            key = "name" if i == 0 else f"aliases[{i - 1}]"
            if not _DNS_1035.match(name):
                raise ConfigError(f"{name!r} cannot name a Kubernetes Service, whose name starts "
                                  "with a letter; rename it", service=service.name, key=key)
            if name in owners:
                raise ConfigError(f"{name!r} also names service {owners[name]!r}; one namespace "
                                  "holds one Service of a name: rename one", service=service.name, key=key)
            owners[name] = service.name
        notes += _notes(service)
        for v in service.volumes:
            sharing = [o.name for o in services if o is not service and o.image is not None
                       and any(w.name == v.name for w in o.volumes)]  # fmt: skip
            if sharing and not v.files:
                notes.append(Note(service.name, "volumes", f"{v.name!r} is shared with "
                                  f"{', '.join(sharing)}; an emptyDir is one pod's own: use a "
                                  "PersistentVolumeClaim (ReadWriteMany) to share it"))
        documents.append(_deployment(service, notes))
        documents += [_service(service, name) for name in (service.name, *service.aliases)]
    return Export(tuple(documents), tuple(notes), tuple(hosted))


def to_yaml(documents: Iterable[dict[str, Any]], header: Sequence[str] = ()) -> str:
    """Multi-document YAML (``---`` before each object), ``header`` lines as comments on top.

    Keys keep their order (``apiVersion``, ``kind``, ``metadata``, ``spec``: as people write
    them); PyYAML's safe dumper quotes every string that YAML 1.1, which the loader and
    Kubernetes read, would take for something else (``"yes"``, ``"0755"``). Text outside ASCII
    is written as escapes: written raw, a NEL (U+0085) or a line separator inside quotes reads
    back as a line break folded into a space (the round-trip test found it).
    """
    import yaml  # 15 ms; paid only by an export

    body = yaml.safe_dump_all(list(documents), explicit_start=True, sort_keys=False,
                              default_flow_style=False, allow_unicode=False, width=100)  # fmt: skip
    return "".join(f"# {line}\n" if line else "#\n" for line in header) + body


def _labels(service: Service) -> dict[str, str]:
    return {NAME_LABEL: service.name}


def _deployment(service: Service, notes: list[Note]) -> dict[str, Any]:
    grace = math.ceil(service.stop_timeout)
    if grace != service.stop_timeout:
        notes.append(Note(service.name, "stop_timeout", f"{service.stop_timeout:g} s is not whole "
                          f"seconds: terminationGracePeriodSeconds is {grace}"))
    pod: dict[str, Any] = {
        "enableServiceLinks": False,
        "automountServiceAccountToken": False,
        "terminationGracePeriodSeconds": grace,
        "containers": [_container(service, notes)],
    }
    plain = [v for v in service.volumes if not v.files]
    if service.tmpfs or plain:
        pod["volumes"] = [{"name": f"tmpfs-{i}", "emptyDir": {"medium": "Memory", "sizeLimit": _memory(size)}}
                          for i, size in enumerate(service.tmpfs.values())]  # fmt: skip
        pod["volumes"] += [{"name": f"volume-{i}", "emptyDir": {}} for i in range(len(plain))]
    if service.oneshot:  # runs to completion: a Job, retried as often as the service is
        pod["restartPolicy"] = "Never"
        return {"apiVersion": "batch/v1", "kind": "Job",
                "metadata": {"name": service.name, "labels": _labels(service)},
                "spec": {"backoffLimit": service.retries,
                         "template": {"metadata": {"labels": _labels(service)}, "spec": pod}}}  # fmt: skip
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": service.name, "labels": _labels(service)},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": _labels(service)},
            "template": {"metadata": {"labels": _labels(service)}, "spec": pod},
        },
    }


def _service(service: Service, name: str) -> dict[str, Any]:
    spec: dict[str, Any] = {"type": "ClusterIP", "selector": _labels(service)}
    if service.ports:
        spec["ports"] = [{"name": f"tcp-{p}", "protocol": "TCP", "port": p, "targetPort": p}
                         for p in service.ports]  # fmt: skip
    else:
        spec["clusterIP"] = "None"  # headless: the name resolves to the pod, with no port to map
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "labels": _labels(service)}, "spec": spec}  # fmt: skip


def _escape(text: str) -> str:
    """``text`` as Kubernetes must read it to give back ``text``: ``$(NAME)`` and ``$$`` are
    the only forms it expands (:mod:`.expand`), so only text holding one is escaped (each ``$``
    doubled); ``$HOME`` and ``${X}`` stay as written, for the program's shell."""
    return text.replace("$", "$$") if "$(" in text or "$$" in text else text


def _container(service: Service, notes: list[Note]) -> dict[str, Any]:
    assert service.image is not None  # export_kubernetes leaves image-less services out
    body: dict[str, Any] = {
        "name": service.name,
        "image": service.image,
        "imagePullPolicy": _PULL[service.pull],
    }
    if service.command:
        body["command"] = [_escape(a) for a in service.command]
    elif service.args:
        body["args"] = [_escape(a) for a in service.args]
    if service.cwd is not None:
        body["workingDir"] = service.cwd
    if service.env:
        body["env"] = [{"name": k, "value": _escape(v)} for k, v in service.env.items()]
    if service.ports:
        body["ports"] = [{"name": f"tcp-{p}", "containerPort": p, "protocol": "TCP"} for p in service.ports]
    limits: dict[str, str] = {}
    if service.limits.memory is not None:
        limits["memory"] = _memory(service.limits.memory)
    if service.limits.cpu is not None:
        limits["cpu"] = _cpu(service, notes)
    if limits:
        body["resources"] = {"limits": limits}
    if service.ready is not None and not isinstance(service.ready, LogProbe):
        body["readinessProbe"] = _probe(service, service.ready, notes)
    user = _UID.match(service.user or "")
    if user:
        body["securityContext"] = {"runAsUser": int(user[1])}
        if user[2] is not None:
            body["securityContext"]["runAsGroup"] = int(user[2])
    mounts: list[dict[str, Any]] = [{"name": f"tmpfs-{i}", "mountPath": path}
                                    for i, path in enumerate(service.tmpfs)]  # fmt: skip
    mounts += [{"name": f"volume-{i}", "mountPath": v.target, **({"readOnly": True} if v.readonly else {})}
               for i, v in enumerate(v for v in service.volumes if not v.files)]  # fmt: skip
    if mounts:
        body["volumeMounts"] = mounts
    return body


def _memory(size: int) -> str:
    """``64Mi`` where a binary unit is exact, else the bytes (Kubernetes reads both)."""
    for unit, factor in _BINARY:
        if size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def _cpu(service: Service, notes: list[Note]) -> str:
    cores = service.limits.cpu
    assert cores is not None
    millis = cores * 1000
    whole = round(millis)
    if abs(millis - whole) > 1e-6 or whole < 1:
        # Kubernetes keeps cpu to the millicore (it would round up itself); say so here.
        whole = max(1, math.ceil(millis - 1e-6))
        notes.append(Note(service.name, "limits.cpu", f"{cores:g} cores is finer than Kubernetes' "
                          f"millicore: exported as {whole}m"))
    return str(whole // 1000) if whole % 1000 == 0 else f"{whole}m"


def probe_numbers(timeout: float, interval: float | None) -> tuple[int, int, int, int]:
    """(initialDelaySeconds, periodSeconds, timeoutSeconds, failureThreshold) for an envbox probe.

    The loader reads back ``timeout = initialDelay + failureThreshold x (period + timeoutSeconds)``
    (``kubernetes.container.probe_timeout``), so the numbers are chosen to make that the probe's
    timeout: each attempt may take 1 s (Kubernetes' default), the period is the interval in whole
    seconds (1, the shortest, when none is given), and the remainder of the division is the
    initial delay (less than one period). Exact for whole seconds from 2; anything else is
    rounded up to one.
    """
    total = max(2, math.ceil(timeout - 1e-9))
    period = min(max(1, math.ceil(interval - 1e-9)) if interval else 1, total - 1)
    threshold = total // (period + 1)
    return total - threshold * (period + 1), period, 1, threshold


def _probe(service: Service, ready: Probe, notes: list[Note]) -> dict[str, Any]:
    initial, period, attempt, threshold = probe_numbers(ready.timeout, ready.interval)
    total = initial + threshold * (period + attempt)
    if total != ready.timeout:
        notes.append(Note(service.name, "ready.timeout", f"{ready.timeout:g} s is not whole seconds "
                          f"(at least 2), which probes count in: exported as {total} s (initialDelay"
                          "Seconds + failureThreshold x (periodSeconds + timeoutSeconds))"))
    if ready.interval is not None and period != ready.interval:
        notes.append(Note(service.name, "ready.interval", f"{ready.interval:g} s is exported as "
                          f"periodSeconds: {period} (whole seconds, and one attempt must fit in the "
                          "timeout)"))
    action: dict[str, Any]
    if isinstance(ready, TcpProbe):
        action = {"tcpSocket": {"port": ready.port}}
    elif isinstance(ready, HttpProbe):
        action = {"httpGet": {"path": ready.path, "port": ready.port, "scheme": "HTTP"}}
        if ready.status is not None:
            notes.append(Note(service.name, "ready.status", f"Kubernetes counts any status from 200 "
                              f"to 399 as ready, not only {ready.status}"))
    else:
        assert isinstance(ready, ExecProbe)
        action = {"exec": {"command": list(ready.argv)}}
    return {**action, "initialDelaySeconds": initial, "periodSeconds": period,
            "timeoutSeconds": attempt, "failureThreshold": threshold}  # fmt: skip


def _notes(service: Service) -> list[Note]:
    """One note per key that the manifests leave out (the numbers' notes come with them)."""
    name = service.name
    out: list[Note] = []
    assert service.image is not None
    if service.image.startswith(_LOCAL_IMAGE):
        out.append(Note(name, "image", f"{service.image!r} is an image on this machine, which a "
                        "cluster cannot pull: push it to a registry and export that reference"))
    if service.args == ():
        out.append(Note(name, "args", "an empty args (drop the image's Cmd) has no Kubernetes "
                        "form, where an empty args keeps the Cmd: give `command` (the whole argv)"))
    if service.mounts:
        paths = ", ".join(f"{m.source} -> {m.target}" for m in service.mounts)
        out.append(Note(name, "mounts", f"host paths ({paths}) are not on a cluster's nodes: left "
                        "out; put the files in the image, or in a ConfigMap mounted there"))
    if isinstance(service.ready, LogProbe):
        out.append(Note(name, "ready", f"a log probe ({service.ready.pattern!r}) has no Kubernetes "
                        "form: no readinessProbe; give the service a tcp, http or exec probe"))
    for key in ("pids", "nofile"):
        if getattr(service.limits, key) is not None:
            out.append(Note(name, f"limits.{key}", "is a node setting in Kubernetes (the kubelet's "
                            "podPidsLimit; the runtime's open files limit), not a pod field: left out"))
    if service.user is not None and not _UID.match(service.user):
        out.append(Note(name, "user", f"{service.user!r} holds a name, and Kubernetes takes only "
                        "numeric ids (runAsUser, runAsGroup): left out, so the image's USER runs; "
                        "give the uid[:gid]"))
    if service.pass_env:
        out.append(Note(name, "pass_env", f"{', '.join(service.pass_env)}: variables of the "
                        "machine running the tests are not the cluster's: left out; set them in "
                        "`env` (or a Secret)"))
    if service.host_ports:
        out.append(Note(name, "host_ports", "fixed host ports publish on 127.0.0.1 of the test "
                        "machine: left out; reach the Service with `kubectl port-forward`, a "
                        "NodePort or an Ingress"))
    if service.depends_on:
        out.append(Note(name, "depends_on", f"{', '.join(service.depends_on)}: Kubernetes starts "
                        "every pod at once, with no order: the service must retry until they are "
                        "ready (or wait in an initContainer)"))
    if service.stop_signal is not None:
        out.append(Note(name, "stop_signal", f"{service.stop_signal}: a container is stopped with "
                        "its image's STOPSIGNAL (SIGTERM by default): left out; set it in the image"))
    for v in service.volumes:
        if v.files:
            out.append(Note(name, "volumes", f"{v.name!r} holds files written at the start: left "
                            f"out; put them in a ConfigMap (or Secret) mounted at {v.target}"))
    if service.network_of is not None:
        out.append(Note(name, "network_of", f"joins {service.network_of!r}'s network, as a "
                        "container of its pod would: exported as a pod of its own, which reaches "
                        f"{service.network_of!r} by its Service name, not localhost; to keep "
                        "localhost, put both containers in one pod"))
    if HOME in service.tmpfs:
        out.append(Note(name, "tmpfs", f"'~' is envbox's {HOME}; the tmpfs is mounted there, "
                        "while the pod's HOME is the image's"))
    return out
