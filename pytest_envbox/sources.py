"""Topology sources: the ``compose`` and ``kubernetes`` keys of ``[tool.envbox]`` (API.md 7).

:mod:`pytest_envbox.compose` and :mod:`pytest_envbox.kubernetes` read the files into envbox
services and what those cannot hold; here that becomes what an environment runs: Compose's named
volumes and Kubernetes' emptyDir/ConfigMap/Secret volumes as the environment's
:class:`~pytest_envbox.mounts.Volume`; a pod's containers as services sharing its network
(``network_of``), its init containers and a Job's containers as ``oneshot`` services started in
order; ``replicas`` pods as services of their own; Kubernetes Services as
:class:`VirtualService` (a name and an address whose ports lead to the selected pods, as
kube-proxy does it). Pure: no kernel, no engine.

A ``[tool.envbox.services.NAME]`` table with an imported name changes only the keys it sets
(:func:`override`).
"""

from __future__ import annotations

import glob
import os
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pytest_envbox.errors import ConfigError, located
from pytest_envbox.mounts import Volume
from pytest_envbox.spec import Service

__all__ = ["Imported", "VirtualService", "import_sources", "override"]

#: The topologies an import adds (unless the project declares one of that name): every service
#: of the compose files, every service of the manifests.
COMPOSE_TOPOLOGY = "compose"
KUBERNETES_TOPOLOGY = "kubernetes"


@dataclass(frozen=True)
class VirtualService:
    """A Kubernetes Service in an environment: ``hostnames`` resolve to one address of the
    environment's subnet whose ``port`` leads to ``target_port`` of one of ``backends`` (picked at
    random per connection); a headless one resolves to the backends' own addresses instead."""

    name: str
    hostnames: tuple[str, ...]
    #: (envbox service whose network namespace is the pod's, port, target port)
    backends: tuple[tuple[str, int, int], ...]
    headless: bool = False
    origin: str = ""


@dataclass(frozen=True)
class Imported:
    """What the ``compose`` and ``kubernetes`` files declare, ready for the catalog."""

    services: dict[str, Service] = field(default_factory=dict)
    origins: dict[str, str] = field(default_factory=dict)
    virtual: dict[str, VirtualService] = field(default_factory=dict)
    topologies: dict[str, tuple[str, ...]] = field(default_factory=dict)
    #: each key read and deliberately ignored, as ``"compose.yaml: services.web.restart"``
    ignored: tuple[str, ...] = ()
    #: unset variables substituted by "" in compose files (as ``docker compose`` warns)
    warnings: tuple[str, ...] = ()
    #: a workload whose pods run as services of other names (replicas, several containers) ->
    #: the service of each of its pods' container: an override by the workload's name applies to
    #: each (``()`` when its pods have several containers: the override must name one)
    workloads: dict[str, tuple[str, ...]] = field(default_factory=dict)


def _files(entries: object, key: str, rootdir: Path, where: str) -> list[Path]:
    """The files a ``compose``/``kubernetes`` list names (globs expanded, sorted), relative to
    the rootdir; each must exist."""
    if not isinstance(entries, list) or not all(isinstance(e, str) and e for e in entries):
        raise ConfigError(f'must be a list of files, like {key.rsplit(".", 1)[-1]} = ["compose.yaml"] '
                          f"(in {where})", key=key)  # fmt: skip
    paths: list[Path] = []
    for i, entry in enumerate(entries):
        full = rootdir / entry
        if any(c in entry for c in "*?["):
            found = sorted(Path(p) for p in glob.glob(str(full), recursive=True) if os.path.isfile(p))
            if not found:
                raise ConfigError(f"{entry!r} matches no file under {rootdir} (in {where})",
                                  key=f"{key}[{i}]")  # fmt: skip
            paths.extend(found)
        elif not full.is_file():
            raise ConfigError(f"{entry!r}: there is no such file under {rootdir}; give its path "
                              f"relative to {rootdir} (in {where})", key=f"{key}[{i}]")  # fmt: skip
        else:
            paths.append(full)
    return paths


def import_sources(rootdir: Path, table: Mapping[str, object], prefix: str, where: str,
                   environ: Mapping[str, str]) -> Imported:  # fmt: skip
    """The services of the ``compose`` and ``kubernetes`` entries of ``table``; a name defined by
    both is a ``ConfigError`` naming both places."""
    parts: list[Imported] = []
    if "compose" in table:
        files = _files(table["compose"], f"{prefix}compose", rootdir, where)
        declared = table.get("services")
        replaced = {n: (t["image"] if isinstance(t["image"], str) else None)
                    for n, t in (declared.items() if isinstance(declared, dict) else ())
                    if isinstance(t, dict) and "image" in t}  # fmt: skip
        parts.append(_compose(files, rootdir, environ, replaced))
    if "kubernetes" in table:
        files = _files(table["kubernetes"], f"{prefix}kubernetes", rootdir, where)
        parts.append(_kubernetes(files, rootdir))
    if len(parts) == 1:
        return parts[0]
    if not parts:
        return Imported()
    a, b = parts
    for name in a.services.keys() & (b.services.keys() | b.virtual.keys()):
        raise ConfigError(f"is defined twice: in {a.origins[name]} and in "
                          f"{b.origins.get(name) or b.virtual[name].origin}; rename one of them",
                          service=name)  # fmt: skip
    return Imported({**a.services, **b.services}, {**a.origins, **b.origins}, b.virtual,
                    {**a.topologies, **b.topologies}, a.ignored + b.ignored, a.warnings,
                    b.workloads)  # fmt: skip


def _rel(path: Path, rootdir: Path) -> str:
    try:
        return str(path.relative_to(rootdir))
    except ValueError:
        return str(path)


# --- Compose ------------------------------------------------------------------------------------


def _compose(files: Sequence[Path], rootdir: Path, environ: Mapping[str, str],
             replaced: Mapping[str, str | None]) -> Imported:  # fmt: skip
    from pytest_envbox.compose import load_compose

    project = load_compose(files, environ=environ, replaced=replaced)
    services: dict[str, Service] = {}
    for name, service in project.services.items():
        changes: dict[str, object] = {}
        mounts = project.volumes.get(name, ())
        if mounts:
            changes["volumes"] = [Volume(m.source or f"{name}.anonymous-{i}", m.target, m.readonly)
                                  for i, m in enumerate(mounts)]  # fmt: skip
        if name in project.stop_signals:
            changes["stop_signal"] = project.stop_signals[name]
        if name in project.healthcheck_disabled:
            changes["healthcheck"] = False
        try:
            services[name] = service.with_changes(**changes) if changes else service
        except ConfigError as exc:
            raise located(exc, project.origins[name]) from None
    ignored = tuple(f"{_rel(i.file, rootdir)}: {'services.' + i.service + '.' if i.service else ''}{i.key}"
                    + ("" if i.service else _TOP_LEVEL_NOTES.get(i.key, ""))
                    for i in project.ignored)  # fmt: skip
    origins = {n: _relative_origin(o, rootdir) for n, o in project.origins.items()}
    return Imported(services, origins, {}, {COMPOSE_TOPOLOGY: tuple(services)}, ignored,
                    tuple(project.warnings))  # fmt: skip


#: Why a top-level key of a compose file is ignored, where its name alone would mislead.
_TOP_LEVEL_NOTES = {
    "volumes": " (the definitions; each named volume is the environment's own)",
    "networks": " (the definitions; each environment is one private network)",
}


def _relative_origin(origin: str, rootdir: Path) -> str:
    file, _, rest = origin.partition(" ")
    return f"{_rel(Path(file), rootdir)} {rest}".strip()


# --- Kubernetes ---------------------------------------------------------------------------------


def _kubernetes(files: Sequence[Path], rootdir: Path) -> Imported:
    from pytest_envbox.kubernetes import POD_NAME, load_manifests

    project = load_manifests(list(files))
    services: dict[str, Service] = {}
    origins: dict[str, str] = {}
    owners: dict[str, list[str]] = {}  # workload -> each pod's network owner
    workloads: dict[str, tuple[str, ...]] = {}
    for w in project.workloads.values():
        if len(w.containers) > 1:
            workloads[w.name] = ()  # which container? the override must name its service
        elif w.pods and w.pods != (w.name,):
            workloads[w.name] = tuple(w.service_name(p, w.containers[0].name) for p in w.pods)
        origin = f"{_rel(w.file, rootdir)} {w.kind}/{w.name}"
        members = [*w.init_containers, *w.containers]
        inits = [c for c in members if c.init]
        for pod in w.pods:
            owner = w.service_name(pod, members[0].name)
            owners.setdefault(w.name, []).append(owner)
            for c in members:
                name = w.service_name(pod, c.name)
                s = c.service
                depends = list(s.depends_on)
                if c.init and c is not inits[0]:
                    depends.append(w.service_name(pod, inits[inits.index(c) - 1].name))
                elif not c.init and inits:
                    depends.append(w.service_name(pod, inits[-1].name))
                volumes = [Volume(f"{pod}.{f.volume}" + (f".{zlib.crc32(f.target.encode()):08x}"
                                                          if f.files and f.files[0].path == "" else ""),
                                  f.target, f.readonly,
                                  tuple((p.path, p.content, p.mode) for p in f.files))
                           for f in c.files]  # fmt: skip
                volumes += [Volume(f"{pod}.{d.volume}", d.target, d.readonly) for d in c.dirs]
                try:
                    services[name] = s.with_changes(
                        name=name,
                        env={k: v.replace(POD_NAME, pod) for k, v in s.env.items()},
                        command=tuple(a.replace(POD_NAME, pod) for a in s.command),
                        args=None if s.args is None else tuple(a.replace(POD_NAME, pod) for a in s.args),
                        depends_on=depends, volumes=[*s.volumes, *volumes],
                        network_of=owner if name != owner else None,
                        oneshot=c.init or w.kind == "Job",
                        # retried as the cluster would: a Job up to its backoffLimit, an init
                        # container (retried without end there) as often as a Job by default
                        retries=w.backoff_limit if c.init or w.kind == "Job" else 0)  # fmt: skip
                except ConfigError as exc:
                    raise located(exc, origin) from None
                origins[name] = f"{origin} container {c.name}" + (f" (pod {pod})" if len(w.pods) > 1 else "")
    virtual: dict[str, VirtualService] = {}
    for ks in project.services.values():
        ns = ks.namespace
        hostnames = (ks.name, f"{ks.name}.{ns}", f"{ks.name}.{ns}.svc", f"{ks.name}.{ns}.svc.cluster.local")
        backends = tuple((owner, b.port, b.target_port) for b in ks.backends
                         for owner in owners.get(b.workload, ()))  # fmt: skip
        virtual[ks.name] = VirtualService(ks.name, hostnames, backends, ks.headless,
                                          f"{_rel(ks.file, rootdir)} Service/{ks.name}")  # fmt: skip
    ignored = tuple(f"{_rel(i.file, rootdir)}: {i.document} {i.key or '(the whole document)'}"
                    for i in project.ignored)  # fmt: skip
    return Imported(services, origins, virtual, {KUBERNETES_TOPOLOGY: tuple(services)}, ignored,
                    (), workloads)  # fmt: skip


# --- overrides ----------------------------------------------------------------------------------

#: Keys whose tables an override merges key by key (the others it replaces).
_MERGED = ("env", "limits")


def override(imported: Service, table: Mapping[str, object], origin: str) -> Service:
    """``imported`` with the keys ``table`` (a ``[tool.envbox.services.NAME]`` table) sets.

    ``env`` and ``limits`` merge key by key; every other key replaces the imported value.
    ``image = false`` runs a host program instead of the image: the table must give its
    ``command``, and the image's ``args`` and ``pull``, and the ``cwd`` and ``user`` that named a
    path and user inside the image, are dropped unless the table sets them. ``command`` replaces
    the image's Entrypoint and Cmd (and an imported ``args``); ``args`` keeps the Entrypoint and
    drops an imported ``command``.
    """
    from pytest_envbox.validate import as_mapping, check_keys

    name = imported.name
    table = dict(as_mapping(table, name, None, "a table of the keys to change"))
    check_keys(table, Service.KEYS, name, "")
    changes: dict[str, object] = {}
    if table.get("image") is False:
        del table["image"]
        if "command" not in table:
            raise ConfigError("image = false runs a host program instead of the image: give its "
                              f'`command`, e.g. command = ["python", "-m", "app"] (in {origin})',
                              service=name, key="command")  # fmt: skip
        changes.update(image=None, args=None, pull="missing", healthcheck=True)
        for key in ("cwd", "user"):
            if key not in table:
                changes[key] = None
    elif "command" in table and "args" not in table:
        changes["args"] = None
    elif "args" in table and "command" not in table:
        changes["command"] = ()
    for key, value in table.items():
        if key in _MERGED and isinstance(value, Mapping):
            base = imported.env if key == "env" else {
                k: getattr(imported.limits, k) for k in imported.limits.KEYS
                if getattr(imported.limits, k) is not None}  # fmt: skip
            changes[key] = {**base, **value}
        elif key == "ports":
            changes.update(ports=value, host_ports={})
        else:
            changes[key] = value
    try:
        return imported.with_changes(**changes)
    except ConfigError as exc:
        raise located(exc, origin) from None
    except TypeError as exc:  # a value of the wrong shape for a field
        raise ConfigError(f"{exc} (in {origin})", service=name) from None

