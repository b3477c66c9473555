"""One container of a pod template as an envbox :class:`~pytest_envbox.spec.Service` (and the
:class:`~pytest_envbox.kubernetes.model.Container` around it); the mapping is the package's."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pytest_envbox.compose.convert import DEFAULT_TMPFS
from pytest_envbox.errors import ConfigError
from pytest_envbox.kubernetes.document import Doc
from pytest_envbox.kubernetes.expand import expand
from pytest_envbox.kubernetes.keys import CONTAINER, PROBE, SECURITY, VOLUME_MOUNT
from pytest_envbox.kubernetes.model import (
    POD_IP,
    POD_NAME,
    Container,
    DirMount,
    FileMount,
    ProbeTiming,
    ProjectedFile,
)
from pytest_envbox.probe import ExecProbe, HttpProbe, Probe, TcpProbe
from pytest_envbox.spec import Limits, Service, parse_cpu, parse_memory
from pytest_envbox.validate import describe, is_int

__all__ = ["Pod", "convert_container", "probe_timeout"]

#: Kubernetes' defaults for a probe: initialDelaySeconds, periodSeconds, timeoutSeconds,
#: failureThreshold.
_PROBE_DEFAULTS = (0, 10, 1, 3)
#: envbox polls at most this far apart, whatever periodSeconds says (see the package docstring).
_MAX_INTERVAL = 1.0
_PULL = {"IfNotPresent": "missing", "Always": "always", "Never": "never"}


@dataclass
class Pod:
    """What a container's conversion needs from its pod and the project."""

    doc: Doc
    #: the pod spec's path: ``spec.template.spec`` (``spec`` for a Pod)
    path: str
    namespace: str
    labels: Mapping[str, str]
    security: dict[str, Any]
    #: volume name -> (its definition, its path)
    volumes: dict[str, tuple[dict[str, Any], str]]
    #: volume names mounted by more than one container of the pod
    shared: set[str]
    data: Mapping[str, Mapping[str, bytes]]
    #: StatefulSet volumeClaimTemplates names: private directories
    claims: set[str] = field(default_factory=set)


def probe_timeout(initial: float, period: float, attempt: float, threshold: int) -> float:
    """The envbox probe's overall timeout: the delay, then ``failureThreshold`` periods each
    followed by an attempt's timeout (Kubernetes' defaults give 0 + 3 x (10 + 1) = 33 s)."""
    return initial + threshold * (period + attempt)


def _data(
    pod: Pod, kind: str, ref: dict[str, Any], path: str, key: str | None = None
) -> dict[str, bytes] | None:
    """The ConfigMap or Secret ``ref`` names (None when it, or ``key``, is missing and optional)."""
    doc = pod.doc
    name = doc.text(ref.get("name"), f"{path}.name")
    optional = doc.flag(ref.get("optional"), f"{path}.optional")
    found = pod.data.get(f"{kind}/{name}")
    if found is None:
        if optional:
            return None
        raise doc.fail(
            f"{kind} {name!r} is not in the manifests; add it, or mark the reference optional: true", path
        )
    if key is not None and key not in found:
        if optional:
            return None
        raise doc.fail(
            f"{kind} {name!r} has no key {key!r} (it has {', '.join(sorted(found)) or 'none'}); "
            "add the key, or mark the reference optional: true",
            f"{path}.key",
        )
    return dict(found)


def _text(doc: Doc, raw: bytes, path: str) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise doc.fail("is not UTF-8 text, so it cannot be an environment value", path) from None


def _env(body: dict[str, Any], pod: Pod, path: str) -> tuple[dict[str, str], list[str]]:
    """``envFrom`` then ``env`` (which wins), values expanded as Kubernetes does, in order."""
    doc = pod.doc
    env: dict[str, str] = {}
    placeholders: list[str] = []
    for i, src in enumerate(doc.seq(body.get("envFrom"), f"{path}.envFrom")):
        where = f"{path}.envFrom[{i}]"
        src = doc.mapping(src, where)
        refs = [
            (k, "ConfigMap" if k == "configMapRef" else "Secret")
            for k in ("configMapRef", "secretRef")
            if k in src
        ]
        unknown = set(src) - {"configMapRef", "secretRef", "prefix"}
        if len(refs) != 1 or unknown:
            raise doc.fail("must hold one of configMapRef or secretRef (and an optional prefix)", where)
        (ref_key, kind), prefix = refs[0], src.get("prefix") or ""
        found = _data(pod, kind, doc.mapping(src[ref_key], f"{where}.{ref_key}"), f"{where}.{ref_key}")
        for key, raw in (found or {}).items():
            env[f"{prefix}{key}"] = _text(doc, raw, f"{where}.{ref_key} key {key!r}")
    for i, item in enumerate(doc.seq(body.get("env"), f"{path}.env")):
        where = f"{path}.env[{i}]"
        item = doc.mapping(item, where)
        name = doc.text(item.get("name"), f"{where}.name")
        if "valueFrom" in item:
            value = _value_from(
                doc.mapping(item["valueFrom"], f"{where}.valueFrom"), pod, f"{where}.valueFrom"
            )
            if value is None:
                continue
            if POD_IP in value or POD_NAME in value:
                placeholders.append(name)
        else:
            raw = item.get("value", "")
            if not isinstance(raw, str):
                raise doc.fail(f'{describe(raw)} is not a string; quote it: value: "{raw}"', f"{where}.value")
            value = expand(raw, env)
            if POD_IP in value or POD_NAME in value:
                placeholders.append(name)
        env[name] = value
    return env, placeholders


def _value_from(src: dict[str, Any], pod: Pod, where: str) -> str | None:
    doc = pod.doc
    for ref_key, kind in (("configMapKeyRef", "ConfigMap"), ("secretKeyRef", "Secret")):
        if ref_key in src:
            ref = doc.mapping(src[ref_key], f"{where}.{ref_key}")
            key = doc.text(ref.get("key"), f"{where}.{ref_key}.key")
            found = _data(pod, kind, ref, f"{where}.{ref_key}", key)
            return None if found is None else _text(doc, found[key], f"{where}.{ref_key}")
    if "fieldRef" in src:
        ref = doc.mapping(src["fieldRef"], f"{where}.fieldRef")
        field_path = doc.text(ref.get("fieldPath"), f"{where}.fieldRef.fieldPath")
        if field_path == "metadata.name":
            return POD_NAME
        if field_path == "metadata.namespace":
            return pod.namespace
        if field_path == "status.podIP":
            return POD_IP
        if field_path.startswith("metadata.labels['") and field_path.endswith("']"):
            return pod.labels.get(field_path[len("metadata.labels['") : -2], "")
        raise doc.fail(
            f"fieldPath {field_path!r} is not provided by envbox; use metadata.name, "
            "metadata.namespace, metadata.labels['KEY'] or status.podIP, or a value",
            f"{where}.fieldRef.fieldPath",
        )
    raise doc.fail(
        "must hold configMapKeyRef, secretKeyRef or fieldRef (resourceFieldRef is not "
        "provided by envbox: write the value)",
        where,
    )


def _ports(body: dict[str, Any], doc: Doc, path: str) -> tuple[list[int], dict[str, int]]:
    numbers: list[int] = []
    names: dict[str, int] = {}
    for i, item in enumerate(doc.seq(body.get("ports"), f"{path}.ports")):
        where = f"{path}.ports[{i}]"
        item = doc.mapping(item, where)
        number = doc.number(item.get("containerPort"), f"{where}.containerPort", low=1, high=65535)
        protocol = item.get("protocol", "TCP")
        if protocol != "TCP":
            raise doc.fail(
                f"protocol {protocol!r} is not supported: envbox services talk TCP; remove the port",
                f"{where}.protocol",
            )
        for key in item:
            if key in ("hostPort", "hostIP"):
                doc.ignore(f"{where}.{key}")
            elif key not in ("containerPort", "name", "protocol"):
                raise doc.fail(f"unknown field {key!r}", f"{where}.{key}")
        if "name" in item:
            name = doc.text(item["name"], f"{where}.name")
            if name in names:
                raise doc.fail(f"port name {name!r} is declared twice; rename one", f"{where}.name")
            names[name] = number
        if number not in numbers:
            numbers.append(number)
    return numbers, names


def _limits(body: dict[str, Any], doc: Doc, path: str) -> tuple[Limits, list[str]]:
    res = doc.mapping(body.get("resources"), f"{path}.resources")
    limits = doc.mapping(res.get("limits"), f"{path}.resources.limits")
    requests = doc.mapping(res.get("requests"), f"{path}.resources.requests")
    for key in res:
        if key == "claims":
            doc.ignore(f"{path}.resources.claims")
        elif key not in ("limits", "requests"):
            raise doc.fail(f"unknown field {key!r}", f"{path}.resources.{key}")
    got: dict[str, Any] = {}
    from_requests: list[str] = []
    for section, table in (("limits", limits), ("requests", requests)):
        for name, value in table.items():
            where = f"{path}.resources.{section}.{name}"
            if name in ("memory", "cpu"):
                if name in got:
                    continue
                try:
                    got[name] = (parse_memory if name == "memory" else parse_cpu)(value)
                except ConfigError as exc:
                    raise doc.fail(str(exc), where) from None
                if section == "requests":
                    from_requests.append(name)
            elif name == "ephemeral-storage":
                doc.ignore(where)
            else:
                raise doc.fail(
                    f"resource {name!r} cannot be given: services get no host devices "
                    "or huge pages; remove it",
                    where,
                )
    return Limits(**got), from_requests


def _probe(
    body: dict[str, Any], doc: Doc, path: str, port_names: Mapping[str, int]
) -> tuple[Probe | None, ProbeTiming | None]:
    if body.get("readinessProbe") is None:
        return None, None
    where = f"{path}.readinessProbe"
    spec = doc.mapping(body["readinessProbe"], where)
    doc.check(spec, PROBE, where)
    initial, period, attempt, threshold = (
        doc.number(spec.get(k, d), f"{where}.{k}", low=0 if k == "initialDelaySeconds" else 1)
        for k, d in zip(
            ("initialDelaySeconds", "periodSeconds", "timeoutSeconds", "failureThreshold"),
            _PROBE_DEFAULTS,
            strict=True,
        )
    )
    timing = ProbeTiming(float(initial), float(period), float(attempt), threshold)
    timeout = probe_timeout(initial, period, attempt, threshold)
    interval = min(float(period), _MAX_INTERVAL)
    kinds = [k for k in ("httpGet", "tcpSocket", "exec", "grpc") if k in spec]
    if len(kinds) != 1:
        raise doc.fail("must hold exactly one of httpGet, tcpSocket, exec or grpc", where)
    kind = kinds[0]
    action = doc.mapping(spec[kind], f"{where}.{kind}", required=True)
    if kind == "grpc":  # no gRPC health client here: the port accepting a connection instead
        port = doc.number(action.get("port"), f"{where}.grpc.port", low=1, high=65535)
        for key in action:
            if key not in ("port", "service"):
                raise doc.fail(f"unknown field {key!r}", f"{where}.grpc.{key}")
        doc.ignore(f"{where}.grpc (checked as tcpSocket on port {port}: envbox has no gRPC health client)")
        return TcpProbe(port, timeout=timeout, interval=interval), timing
    if kind == "exec":
        command = doc.strings(action.get("command"), f"{where}.exec.command")
        if not command:
            raise doc.fail("is empty; give the command to run", f"{where}.exec.command")
        return ExecProbe(command, timeout=timeout, interval=interval), timing
    for key in action:
        if key == "httpHeaders":
            doc.ignore(f"{where}.{kind}.{key}")
        elif key == "host":
            raise doc.fail("probes reach the pod itself; remove host", f"{where}.{kind}.host")
        elif key == "scheme":
            if action[key] != "HTTP":
                raise doc.fail(
                    f"scheme {action[key]!r} is not supported: envbox probes speak plain "
                    "HTTP; probe a plain-HTTP port or use tcpSocket",
                    f"{where}.{kind}.scheme",
                )
        elif key not in ("port", "path"):
            raise doc.fail(f"unknown field {key!r}", f"{where}.{kind}.{key}")
    raw = action.get("port")
    if isinstance(raw, str) and not raw.isdigit():
        if raw not in port_names:
            raise doc.fail(
                f"port {raw!r} is not a name of the container's ports "
                f"({', '.join(port_names) or 'none named'}); "
                "name the port or give its number",
                f"{where}.{kind}.port",
            )
        number = port_names[raw]
    else:
        number = doc.number(
            int(raw) if isinstance(raw, str) else raw, f"{where}.{kind}.port", low=1, high=65535
        )
    if kind == "tcpSocket":
        return TcpProbe(number, timeout=timeout, interval=interval), timing
    return HttpProbe(number, str(action.get("path") or "/"), timeout=timeout, interval=interval), timing


def _user(body: dict[str, Any], pod: Pod, path: str) -> str | None:
    doc = pod.doc
    own = doc.mapping(body.get("securityContext"), f"{path}.securityContext")
    doc.check(own, SECURITY, f"{path}.securityContext")
    if doc.flag(own.get("privileged"), f"{path}.securityContext.privileged"):
        raise doc.fail(
            "services never get the host's privileges; remove privileged: true",
            f"{path}.securityContext.privileged",
        )
    caps = doc.mapping(own.get("capabilities"), f"{path}.securityContext.capabilities")
    if caps.get("add"):
        raise doc.fail(
            "envbox gives services no capabilities on the host; run the program without "
            "them and remove capabilities.add",
            f"{path}.securityContext.capabilities.add",
        )
    if "drop" in caps:
        doc.ignore(f"{path}.securityContext.capabilities.drop")
    merged = {k: v for k, v in pod.security.items() if k in ("runAsUser", "runAsGroup")}
    merged.update({k: v for k, v in own.items() if k in ("runAsUser", "runAsGroup")})
    uid, gid = merged.get("runAsUser"), merged.get("runAsGroup")
    for key, value in (("runAsUser", uid), ("runAsGroup", gid)):
        if value is not None and not is_int(value):
            raise doc.fail(f"{describe(value)} is not a uid", f"{path}.securityContext.{key}")
    if uid is None:
        if gid is not None:  # the image's user with another group: the spec cannot say it
            doc.ignore(f"{path}.securityContext.runAsGroup")
        return None
    return f"{uid}:{gid}" if gid is not None else str(uid)


def _files(value: object, kind: str, pod: Pod, vpath: str) -> tuple[str, list[ProjectedFile]]:
    """The files of a configMap or secret volume (``vpath`` is its path), by their paths."""
    doc = pod.doc
    vol = doc.mapping(value, vpath, required=True)
    ref = {"name": vol.get("name" if kind == "ConfigMap" else "secretName"), "optional": vol.get("optional")}
    found = _data(pod, kind, ref, vpath)
    default = vol.get("defaultMode", 0o644)
    doc.number(default, f"{vpath}.defaultMode", high=0o777)
    files: list[ProjectedFile] = []
    if found is None:
        return f"{kind}/{ref['name']}", files
    items = doc.seq(vol.get("items"), f"{vpath}.items")
    if not items:
        return f"{kind}/{ref['name']}", [ProjectedFile(k, v, default) for k, v in found.items()]
    for i, item in enumerate(items):
        where = f"{vpath}.items[{i}]"
        item = doc.mapping(item, where)
        key = doc.text(item.get("key"), f"{where}.key")
        if key not in found:
            if ref["optional"]:
                continue
            raise doc.fail(
                f"{kind} {ref['name']!r} has no key {key!r} (it has {', '.join(sorted(found))}); "
                "add the key or remove the item",
                f"{where}.key",
            )
        rel = doc.text(item.get("path"), f"{where}.path")
        if rel.startswith("/") or ".." in rel.split("/"):
            raise doc.fail(f"{rel!r} must be a relative path inside the volume", f"{where}.path")
        files.append(
            ProjectedFile(rel, found[key], doc.number(item.get("mode", default), f"{where}.mode", high=0o777))
        )
    return f"{kind}/{ref['name']}", files


def _mounts(
    body: dict[str, Any], pod: Pod, path: str
) -> tuple[list[FileMount], list[DirMount], dict[str, int]]:
    doc = pod.doc
    files: list[FileMount] = []
    dirs: list[DirMount] = []
    tmpfs: dict[str, int] = {}
    for i, item in enumerate(doc.seq(body.get("volumeMounts"), f"{path}.volumeMounts")):
        where = f"{path}.volumeMounts[{i}]"
        item = doc.mapping(item, where)
        doc.check(item, VOLUME_MOUNT, where)
        name = doc.text(item.get("name"), f"{where}.name")
        target = doc.text(item.get("mountPath"), f"{where}.mountPath")
        readonly = doc.flag(item.get("readOnly"), f"{where}.readOnly")
        sub = item.get("subPath")
        if name in pod.claims:
            dirs.append(DirMount(name, target, "", None, readonly))
            continue
        if name not in pod.volumes:
            raise doc.fail(
                f"no volume {name!r} in the pod ({', '.join(pod.volumes) or 'none'}); declare it "
                f"under {pod.path}.volumes",
                f"{where}.name",
            )
        vol, vpath = pod.volumes[name]
        if "configMap" in vol or "secret" in vol:
            kind = "ConfigMap" if "configMap" in vol else "Secret"
            source, projected = _files(
                vol["configMap" if kind == "ConfigMap" else "secret"],
                kind,
                pod,
                f"{vpath}.{'configMap' if kind == 'ConfigMap' else 'secret'}",
            )
            if sub is not None:
                chosen = [f for f in projected if f.path == sub]
                if not chosen:
                    raise doc.fail(
                        f"subPath {sub!r} is no file of volume {name!r} "
                        f"({', '.join(f.path for f in projected)})",
                        f"{where}.subPath",
                    )
                projected = [ProjectedFile("", chosen[0].content, chosen[0].mode)]
            files.append(FileMount(name, source, target, tuple(projected)))
        elif "emptyDir" in vol:
            spec = doc.mapping(vol["emptyDir"], f"{vpath}.emptyDir")
            medium = spec.get("medium") or ""
            size = spec.get("sizeLimit")
            try:
                size_bytes = None if size is None else parse_memory(size)
            except ConfigError as exc:
                raise doc.fail(str(exc), f"{vpath}.emptyDir.sizeLimit") from None
            if medium == "Memory" and name not in pod.shared and sub is None:
                tmpfs[target] = size_bytes or DEFAULT_TMPFS
            else:
                dirs.append(DirMount(name, target, medium, size_bytes, readonly))
        else:  # persistentVolumeClaim, checked at the pod: a private directory
            dirs.append(DirMount(name, target, "", None, readonly))
    return files, dirs, tmpfs


def convert_container(
    body: dict[str, Any], pod: Pod, path: str, service_name: str, *, init: bool
) -> Container:
    """The container at ``path`` as the envbox service ``service_name`` (raises KubeError)."""
    doc = pod.doc
    doc.check(body, CONTAINER, path)
    name = doc.text(body.get("name"), f"{path}.name")
    image = doc.text(body.get("image"), f"{path}.image")
    env, placeholders = _env(body, pod, path)
    command = [expand(a, env) for a in doc.strings(body.get("command"), f"{path}.command")]
    args = [expand(a, env) for a in doc.strings(body.get("args"), f"{path}.args")]
    ports, port_names = _ports(body, doc, path)
    limits, from_requests = _limits(body, doc, path)
    ready, timing = _probe(body, doc, path, port_names)
    files, dirs, tmpfs = _mounts(body, pod, path)
    policy = body.get("imagePullPolicy", "IfNotPresent")
    if not isinstance(policy, str) or policy not in _PULL:
        raise doc.fail(f"{policy!r} is not Always, IfNotPresent or Never", f"{path}.imagePullPolicy")
    cwd = body.get("workingDir")
    kwargs: dict[str, Any] = {
        "image": image,
        "env": env,
        "ports": ports,
        "limits": limits,
        "ready": ready,
        "tmpfs": tmpfs,
        "user": _user(body, pod, path),
        "pull": _PULL[policy],
        "cwd": doc.text(cwd, f"{path}.workingDir") if cwd is not None else None,
    }
    if args and not command:
        # The image's Entrypoint with these arguments; an empty list is no list, as the
        # container runtime reads it (the image's Cmd stays).
        kwargs["args"] = args
    try:
        # k8s command replaces the Entrypoint and drops the Cmd: the whole argv, args after it.
        service = Service(service_name, [*command, *args] if command else (), **kwargs)
    except ConfigError as exc:
        raise doc.fail(str(exc), path) from None
    return Container(
        name=name,
        service=service,
        init=init,
        port_names=port_names,
        files=tuple(files),
        dirs=tuple(dirs),
        probe=timing,
        requests_as_limits=tuple(from_requests),
        placeholders=tuple(placeholders),
    )
