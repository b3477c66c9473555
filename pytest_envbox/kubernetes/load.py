"""``load_manifests``: Kubernetes manifests in, a :class:`KubeProject` out (API.md 7).

The steps: every file's documents read (:func:`~pytest_envbox.compose.yamlfile.read_yaml_documents`),
``List`` kinds flattened; ConfigMaps and Secrets first (as ``kubectl apply`` makes every object
exist before a pod starts, their order in the files does not matter); then each workload's pod
template (:mod:`.container` for each container); then each Service, matched to the workloads
whose pod labels its selector selects.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pytest_envbox.compose.yamlfile import read_yaml_documents
from pytest_envbox.errors import ConfigError
from pytest_envbox.kubernetes.container import Pod, convert_container
from pytest_envbox.kubernetes.document import Doc
from pytest_envbox.kubernetes.keys import METADATA, POD, POD_SECURITY, SERVICE, WORKLOAD
from pytest_envbox.kubernetes.model import (
    Backend,
    Container,
    Ignored,
    KubeError,
    KubeProject,
    KubeService,
    ServicePort,
    Workload,
)
from pytest_envbox.validate import DNS_LABEL, NAME_HELP

__all__ = ["load_manifests"]

_WORKLOADS = ("Pod", "Deployment", "StatefulSet", "Job")
_DATA = ("ConfigMap", "Secret")


def _documents(path: Path) -> list[tuple[dict[str, Any], str]]:
    """The objects of one file, each with where it sits (``document 2``, ``document 2 items[0]``)."""
    out: list[tuple[dict[str, Any], str]] = []
    for i, doc in enumerate(read_yaml_documents(path, what="Kubernetes manifest")):
        if doc is None:
            continue
        where = f"document {i + 1}"
        if not isinstance(doc, dict) or not isinstance(doc.get("kind"), str):
            raise KubeError(
                "is not a Kubernetes object (a mapping with apiVersion, kind and metadata)",
                file=path,
                document=where,
                path=None,
            )
        if doc["kind"].endswith("List") and isinstance(doc.get("items"), list):
            for j, item in enumerate(doc.get("items") or []):
                if not isinstance(item, dict) or not isinstance(item.get("kind"), str):
                    raise KubeError(
                        "is not a Kubernetes object", file=path, document=where, path=f"items[{j}]"
                    )
                out.append((item, f"{where} items[{j}]"))
        else:
            out.append((doc, where))
    return out


def _open(
    body: dict[str, Any], path: Path, where: str, ignored: list[Ignored]
) -> tuple[Doc, str, dict[str, Any]]:
    """The document's :class:`Doc` (named ``Kind/name``), namespace and checked metadata."""
    kind = body["kind"]
    meta = body.get("metadata")
    name = meta.get("name") if isinstance(meta, dict) else None
    if not isinstance(name, str) or not name:
        raise KubeError(
            "has no name; give it one", file=path, document=f"{kind} ({where})", path="metadata.name"
        )
    doc = Doc(path, f"{kind}/{name}", ignored)
    assert isinstance(meta, dict)
    doc.check(meta, METADATA, "metadata")
    namespace = meta.get("namespace", "default")
    return doc, doc.text(namespace, "metadata.namespace"), meta


def _secret_bytes(doc: Doc, body: dict[str, Any]) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    binary_key = "data" if body["kind"] == "Secret" else "binaryData"
    text_key = "stringData" if body["kind"] == "Secret" else "data"
    for key, value in doc.mapping(body.get(binary_key), binary_key).items():
        try:
            if not isinstance(value, str):
                raise doc.fail(f"{value!r} is not a base64 string; quote it", f"{binary_key}.{key}")
            out[str(key)] = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise doc.fail(
                f"is not base64; encode the value (base64 -w0), or put it under {text_key} as text",
                f"{binary_key}.{key}",
            ) from None
    for key, value in doc.mapping(body.get(text_key), text_key).items():
        if not isinstance(value, str):
            raise doc.fail(f"{value!r} is not a string; quote it", f"{text_key}.{key}")
        out[str(key)] = value.encode()
    for key in body:
        if key in ("immutable", "type"):
            doc.ignore(key)
        elif key not in ("apiVersion", "kind", "metadata", binary_key, text_key):
            raise doc.fail(f"unknown field {key!r}", key)
    return out


def _replicas(doc: Doc, kind: str, spec: dict[str, Any]) -> int:
    key = "parallelism" if kind == "Job" else "replicas"
    return doc.number(spec.get(key, 1), f"spec.{key}", high=1000)


def _pods(kind: str, name: str, replicas: int) -> tuple[str, ...]:
    if kind == "StatefulSet" or replicas > 1:
        return tuple(f"{name}-{i}" for i in range(replicas))
    return (name,) if replicas else ()


def _workload(
    body: dict[str, Any],
    doc: Doc,
    namespace: str,
    meta: dict[str, Any],
    data: Mapping[str, Mapping[str, bytes]],
) -> Workload:
    kind, name = body["kind"], doc.name.split("/", 1)[1]
    spec = doc.mapping(body.get("spec"), "spec", required=True)
    claims: set[str] = set()
    if kind == "Pod":
        replicas, labels, pod_spec, path = 1, doc.labels(meta.get("labels"), "metadata.labels"), spec, "spec"
    else:
        doc.check(spec, WORKLOAD[kind], "spec")
        replicas = _replicas(doc, kind, spec)
        template = doc.mapping(spec.get("template"), "spec.template", required=True)
        tmeta = doc.mapping(template.get("metadata"), "spec.template.metadata")
        doc.check(tmeta, METADATA, "spec.template.metadata")
        labels = doc.labels(tmeta.get("labels"), "spec.template.metadata.labels")
        selector = doc.mapping(spec.get("selector"), "spec.selector")
        if "matchExpressions" in selector:
            raise doc.fail(
                "is not supported; select the pods with matchLabels", "spec.selector.matchExpressions"
            )
        wanted = doc.labels(selector.get("matchLabels"), "spec.selector.matchLabels")
        if any(labels.get(k) != v for k, v in wanted.items()):
            raise doc.fail(
                f"{wanted} does not select the template's labels {labels}; make them match",
                "spec.selector.matchLabels",
            )
        pod_spec, path = (
            doc.mapping(template.get("spec"), "spec.template.spec", required=True),
            "spec.template.spec",
        )
        for i, claim in enumerate(doc.seq(spec.get("volumeClaimTemplates"), "spec.volumeClaimTemplates")):
            where = f"spec.volumeClaimTemplates[{i}]"
            claim_meta = doc.mapping(doc.mapping(claim, where).get("metadata"), f"{where}.metadata")
            claims.add(doc.text(claim_meta.get("name"), f"{where}.metadata.name"))
        if claims:
            doc.ignore("spec.volumeClaimTemplates")
    doc.check(pod_spec, POD, path)
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if doc.flag(pod_spec.get(key), f"{path}.{key}"):
            raise doc.fail(
                f"{key}: true cannot be honoured: each pod has its own namespaces in its "
                "environment; remove it",
                f"{path}.{key}",
            )
    security = doc.mapping(pod_spec.get("securityContext"), f"{path}.securityContext")
    doc.check(security, POD_SECURITY, f"{path}.securityContext")
    volumes = _volumes(doc, pod_spec, path)
    inits = doc.seq(pod_spec.get("initContainers"), f"{path}.initContainers")
    mains = doc.seq(pod_spec.get("containers"), f"{path}.containers")
    if not mains:
        raise doc.fail("is empty; a pod runs at least one container", f"{path}.containers")
    entries = [(c, f"{path}.initContainers[{i}]", True) for i, c in enumerate(inits)]
    entries += [(c, f"{path}.containers[{i}]", False) for i, c in enumerate(mains)]
    seen: dict[str, str] = {}
    mounts: dict[str, int] = {}
    for c, where, _init in entries:
        c = doc.mapping(c, where)
        cname = doc.text(c.get("name"), f"{where}.name")
        if cname in seen:
            raise doc.fail(
                f"container name {cname!r} is used twice (also at {seen[cname]}); rename one", f"{where}.name"
            )
        seen[cname] = where
        for m in doc.seq(c.get("volumeMounts"), f"{where}.volumeMounts"):
            if isinstance(m, dict) and isinstance(m.get("name"), str):
                mounts[m["name"]] = mounts.get(m["name"], 0) + 1
    pods = _pods(kind, name, replicas)
    single = len(mains) == 1
    for pod in pods or (name,):
        for cname, where in seen.items():
            is_init = where.startswith(f"{path}.initContainers")
            svc = pod if single and not is_init else f"{pod}-{cname}"
            if not DNS_LABEL.match(svc):
                raise doc.fail(
                    f"makes the envbox service name {svc!r}, which is not a DNS label ({NAME_HELP}); "
                    "shorten or rename the workload or the container",
                    f"{where}.name",
                )
    ctx = Pod(
        doc, path, namespace, labels, security, volumes, {v for v, n in mounts.items() if n > 1}, data, claims
    )
    first = (pods or (name,))[0]
    converted: list[Container] = []
    for c, where, is_init in entries:
        svc = first if single and not is_init else f"{first}-{c['name']}"
        converted.append(convert_container(c, ctx, where, svc, init=is_init))
    return Workload(
        kind=kind,
        name=name,
        file=doc.file,
        replicas=replicas,
        labels=labels,
        init_containers=tuple(c for c in converted if c.init),
        containers=tuple(c for c in converted if not c.init),
        pods=pods,
        backoff_limit=doc.number(spec.get("backoffLimit", 6), "spec.backoffLimit", high=100)
        if kind == "Job" else 6,
    )


def _volumes(doc: Doc, pod_spec: dict[str, Any], path: str) -> dict[str, tuple[dict[str, Any], str]]:
    out: dict[str, tuple[dict[str, Any], str]] = {}
    for i, vol in enumerate(doc.seq(pod_spec.get("volumes"), f"{path}.volumes")):
        where = f"{path}.volumes[{i}]"
        vol = doc.mapping(vol, where)
        name = doc.text(vol.get("name"), f"{where}.name")
        kinds = [k for k in vol if k != "name"]
        if len(kinds) != 1:
            raise doc.fail(f"must have one volume source besides its name, not {kinds or 'none'}", where)
        kind = kinds[0]
        if kind == "hostPath":
            raise doc.fail(
                "cannot be honoured: services never see the host's directories through a "
                "manifest; put the files in a ConfigMap, or override the service with "
                "`mounts` in [tool.envbox.services.NAME]",
                f"{where}.hostPath",
            )
        if kind == "persistentVolumeClaim":
            doc.ignore(f"{where}.persistentVolumeClaim")  # a private, empty directory per pod
        elif kind not in ("configMap", "secret", "emptyDir"):
            raise doc.fail(
                f"volume source {kind!r} is not supported; use configMap, secret or emptyDir",
                f"{where}.{kind}",
            )
        if name in out:
            raise doc.fail(f"volume name {name!r} is used twice; rename one", f"{where}.name")
        out[name] = (vol, where)
    return out


def _service(body: dict[str, Any], doc: Doc, workloads: Mapping[str, Workload]) -> KubeService:
    name = doc.name.split("/", 1)[1]
    spec = doc.mapping(body.get("spec"), "spec", required=True)
    doc.check(spec, SERVICE, "spec")
    if not DNS_LABEL.match(name):
        raise doc.fail(f"{name!r} is not a valid name in the environment; {NAME_HELP}", "metadata.name")
    kind = spec.get("type", "ClusterIP")
    if kind == "ExternalName":
        raise doc.fail(
            "an ExternalName Service points outside the environment, which is unreachable; "
            "declare a workload that serves the name instead",
            "spec.type",
        )
    if kind not in ("ClusterIP", "NodePort", "LoadBalancer"):
        raise doc.fail(f"{kind!r} is not a Service type", "spec.type")
    headless = spec.get("clusterIP") == "None"
    if spec.get("clusterIP") not in (None, "None", ""):
        doc.ignore("spec.clusterIP")
    selector = doc.labels(spec.get("selector"), "spec.selector")
    if not selector:
        raise doc.fail(
            "is missing: a Service without a selector has no pods in the environment "
            "(no Endpoints are read); select a workload's pod labels",
            "spec.selector",
        )
    selects = [w for w in workloads.values() if all(w.labels.get(k) == v for k, v in selector.items())]
    if not selects:
        known = (
            "; ".join(f"{w.kind}/{w.name}: {dict(w.labels)}" for w in workloads.values()) or "no workloads"
        )
        raise doc.fail(
            f"{selector} selects no pod of the manifests ({known}); fix the selector or "
            "the pod template's labels",
            "spec.selector",
        )
    ports: list[ServicePort] = []
    backends: list[Backend] = []
    for i, item in enumerate(doc.seq(spec.get("ports"), "spec.ports")):
        where = f"spec.ports[{i}]"
        item = doc.mapping(item, where)
        for key in item:
            if key in ("nodePort", "appProtocol"):
                doc.ignore(f"{where}.{key}")
            elif key not in ("name", "port", "targetPort", "protocol"):
                raise doc.fail(f"unknown field {key!r}", f"{where}.{key}")
        if item.get("protocol", "TCP") != "TCP":
            raise doc.fail(
                f"protocol {item['protocol']!r} is not supported: services in an environment talk "
                "TCP; remove the port",
                f"{where}.protocol",
            )
        number = doc.number(item.get("port"), f"{where}.port", low=1, high=65535)
        target = item.get("targetPort", number)
        if isinstance(target, str) and target.isdigit():
            target = int(target)
        if not isinstance(target, str):
            target = doc.number(target, f"{where}.targetPort", low=1, high=65535)
        pname = item.get("name")
        ports.append(ServicePort(None if pname is None else doc.text(pname, f"{where}.name"), number, target))
        found = []
        for w in selects:
            if isinstance(target, int):
                found.append(Backend(w.name, number, target))
                continue
            declared = [c.port_names[target] for c in w.containers if target in c.port_names]
            if declared:
                found.append(Backend(w.name, number, declared[0]))
        if not found:
            raise doc.fail(
                f"targetPort {target!r} is no port name of a container in the selected "
                f"workloads ({', '.join(w.name for w in selects)}); name the container "
                "port or give the number",
                f"{where}.targetPort",
            )
        backends += found
    return KubeService(
        name=name,
        file=doc.file,
        selector=selector,
        ports=tuple(ports),
        type=kind,
        headless=headless,
        selects=tuple(w.name for w in selects),
        backends=tuple(backends),
    )


def load_manifests(files: Sequence[Path], *, environ: Mapping[str, str] = os.environ) -> KubeProject:
    """The workloads, Services, ConfigMaps and Secrets of the manifests in ``files``.

    ``environ`` is accepted for symmetry with ``load_compose``; manifests have no interpolation
    (``$(VAR)`` expands from the container's own env, as in Kubernetes), so it is not read.
    Every mistake, and every field that cannot be honoured, is a :class:`ConfigError` naming the
    file, the document (``Kind/name``) and the field path.
    """
    del environ
    if not files:
        raise ConfigError('no manifest given; list at least one, like kubernetes = ["deploy/app.yaml"]')
    paths = tuple(Path(f).absolute() for f in files)
    ignored: list[Ignored] = []
    objects: list[tuple[dict[str, Any], Doc, str, dict[str, Any]]] = []
    seen: dict[str, Path] = {}
    for path in paths:
        for body, where in _documents(path):
            kind = body["kind"]
            if kind not in (*_WORKLOADS, *_DATA, "Service"):
                meta = body.get("metadata")
                name = meta.get("name") if isinstance(meta, dict) else None
                ignored.append(Ignored(path, f"{kind}/{name}" if name else f"{kind} ({where})", None))
                continue
            doc, namespace, meta = _open(body, path, where, ignored)
            if kind not in _DATA:
                for key in body:
                    if key == "status":
                        doc.ignore(key)
                    elif key not in ("apiVersion", "kind", "metadata", "spec"):
                        raise doc.fail(f"unknown field {key!r}; a {kind} has apiVersion, kind, "
                                       "metadata and spec", str(key))  # fmt: skip
            group = "workload" if kind in _WORKLOADS else kind
            ident = f"{group}/{doc.name.split('/', 1)[1]}"
            if ident in seen:
                raise doc.fail(
                    f"is declared twice (also in {seen[ident]}); envbox runs one namespace, so "
                    "names must be unique across the manifests",
                    "metadata.name",
                )
            seen[ident] = path
            objects.append((body, doc, namespace, meta))
    data: dict[str, dict[str, bytes]] = {}
    for body, doc, _ns, _meta in objects:
        if body["kind"] in _DATA:
            data[doc.name] = _secret_bytes(doc, body)
    workloads: dict[str, Workload] = {}
    owners: dict[str, str] = {}
    for body, doc, namespace, meta in objects:
        if body["kind"] in _WORKLOADS:
            w = _workload(body, doc, namespace, meta, data)
            for svc in w.service_names():
                if svc in owners:
                    raise doc.fail(
                        f"makes the envbox service {svc!r}, which {owners[svc]} makes too; "
                        "rename a workload or a container",
                        "metadata.name",
                    )
                owners[svc] = doc.name
            workloads[w.name] = w
    services: dict[str, KubeService] = {}
    for body, doc, namespace, _meta in objects:
        if body["kind"] == "Service":
            name = doc.name.split("/", 1)[1]
            services[name] = dataclasses.replace(_service(body, doc, workloads), namespace=namespace)
    return KubeProject(files=paths, workloads=workloads, services=services, data=data, ignored=tuple(ignored))
