"""Reading service declarations, and planning which services to start in which order.

Declarations come from ``envbox.toml`` or ``[tool.envbox]`` in ``pyproject.toml`` (see
:func:`load_project_config`) and from the ``pytest_envbox_services`` hook (merged with
:func:`merge_services`). A test then asks for some of them by name, by topology or inline;
:func:`select` adds what they depend on, and :func:`start_levels` groups them into waves that can
start in parallel. All of this is pure and fast, so every mistake surfaces as a
:class:`ConfigError` before a single process is started.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pytest_envbox.errors import ConfigError, located
from pytest_envbox.ports import check_environment_host_ports
from pytest_envbox.sources import Imported, VirtualService, import_sources, override
from pytest_envbox.spec import Service, check_name, parse_subnet, service_from_mapping

__all__ = ["TOP_LEVEL_KEYS", "Catalog", "load_project_config", "merge_services", "select", "start_levels"]

TOP_LEVEL_KEYS = ("services", "topologies", "subnet", "insecure_registries", "compose", "kubernetes")


@dataclass(frozen=True)
class Catalog:
    """Every declared service by name, the named topologies, and where each service was defined.

    ``origins`` maps a service name to a human description of its source, such as
    ``"pyproject.toml [tool.envbox.services.api]"``, so that a clash can name both places.
    """

    services: Mapping[str, Service] = field(default_factory=dict)
    topologies: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    origins: Mapping[str, str] = field(default_factory=dict)
    #: every environment's private network (``subnet = "198.18.0.0/24"``); None: the default
    subnet: str | None = None
    #: registries (``host[:port]``) reached over plain HTTP; loopback ones always may be
    insecure_registries: tuple[str, ...] = ()
    #: Kubernetes Services of the ``kubernetes`` manifests, by name (see sources.py)
    virtual: Mapping[str, VirtualService] = field(default_factory=dict)
    #: keys of the ``compose``/``kubernetes`` files read and ignored (``envbox doctor --config``)
    ignored: tuple[str, ...] = ()
    #: what reading them had to say (an unset variable substituted by "")
    warnings: tuple[str, ...] = ()

    def names(self) -> list[str]:
        """The service names, sorted: the list shown when a name is unknown."""
        return sorted(self.services)


def _read_toml(path: Path) -> dict[str, object]:
    try:
        with path.open("rb") as file:
            return tomllib.load(file)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}; fix its syntax") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None


def _unknown(key: str, accepted: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, accepted, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown key {key!r}; {hint}accepted keys: {', '.join(accepted)}"


def _known(names: Iterable[str], what: str = "services") -> str:
    listed = sorted(names)
    return f"known {what}: {', '.join(listed)}" if listed else f"no {what} are declared"


def load_project_config(rootdir: Path, environ: Mapping[str, str] | None = None) -> Catalog:
    """The services and topologies declared at ``rootdir``.

    ``envbox.toml`` wins when it exists (its keys are those of ``[tool.envbox]``, without the
    prefix) and ``pyproject.toml`` is then not read at all; otherwise ``[tool.envbox]`` of
    ``pyproject.toml``; otherwise nothing is declared and the catalog is empty. The services of
    the ``compose`` and ``kubernetes`` files come first; a ``services`` table of the same name
    overrides the keys it sets (see sources.py). ``environ`` (default: ``os.environ``) is what
    compose files interpolate.
    """
    envbox_toml = rootdir / "envbox.toml"
    pyproject = rootdir / "pyproject.toml"
    if envbox_toml.is_file():
        file, prefix = "envbox.toml", ""
        table: object = _read_toml(envbox_toml)
    elif pyproject.is_file():
        file, prefix = "pyproject.toml", "tool.envbox."
        tool = _read_toml(pyproject).get("tool")
        table = tool.get("envbox") if isinstance(tool, dict) else None
        if table is None:
            return Catalog()
    else:
        return Catalog()
    where = f"{file} [{prefix.rstrip('.')}]" if prefix else file
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table with keys among {', '.join(TOP_LEVEL_KEYS)}")
    for key in table:
        if key not in TOP_LEVEL_KEYS:
            raise ConfigError(f"{_unknown(key, TOP_LEVEL_KEYS)} (in {where})", key=prefix + key)

    imported = import_sources(rootdir, table, prefix, where, os.environ if environ is None else environ)
    services: dict[str, Service] = dict(imported.services)
    origins: dict[str, str] = dict(imported.origins)
    declared = table.get("services", {})
    if not isinstance(declared, dict):
        raise ConfigError(
            f"must be a table of services, like [{prefix}services.NAME] (in {file})",
            key=f"{prefix}services",
        )
    for name, body in declared.items():
        origin = f"{file} [{prefix}services.{name}]"
        if name in imported.services:
            services[name] = override(imported.services[name], body, f"{origin}, over {origins[name]}")
            origins[name] = f"{origins[name]}, with {origin}"
            continue
        if name in imported.workloads and name not in imported.services:
            _override_workload(name, body, imported, services, origins, origin)
            continue
        if name in imported.virtual:
            raise ConfigError(f"is the name of a Kubernetes Service ({imported.virtual[name].origin}) "
                              f"that selects other pods; rename it (in {origin})", service=name)  # fmt: skip
        try:
            services[name] = service_from_mapping(name, body)
        except ConfigError as exc:
            raise located(exc, origin) from None
        origins[name] = origin

    topologies = _load_topologies(table.get("topologies", {}), services, file, prefix)
    for topology, members in imported.topologies.items():
        topologies.setdefault(topology, members)
    subnet = None
    if "subnet" in table:
        try:
            subnet = parse_subnet(table["subnet"], key=f"{prefix}subnet")
        except ConfigError as exc:
            raise located(exc, where) from None
    insecure = _registries(table.get("insecure_registries", []), f"{prefix}insecure_registries", where)
    return Catalog(services, topologies, origins, subnet, insecure, imported.virtual,
                   imported.ignored, imported.warnings)  # fmt: skip


def _override_workload(name: str, body: object, imported: Imported, services: dict[str, Service],
                       origins: dict[str, str], origin: str) -> None:  # fmt: skip
    """An override named as a Kubernetes workload: the same change to each of its pods' service
    (``frontend`` for ``frontend-0``, ``frontend-1``...), when its pods have one container."""
    members = imported.workloads[name]
    if not members:
        raise ConfigError(f"names a workload whose pods have several containers; override each "
                          f"container's service instead (`envbox doctor --config` lists them) "
                          f"(in {origin})", service=name)  # fmt: skip
    for member in members:
        services[member] = override(services[member], body, f"{origin}, over {origins[member]}")  # type: ignore[arg-type]
        origins[member] = f"{origins[member]}, with {origin}"


def _registries(value: object, key: str, where: str) -> tuple[str, ...]:
    """``insecure_registries``: registry hosts, as a reference names them (``host[:port]``)."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f'must be a list of registry hosts, like ["registry.lan:5000"] (in {where})',
                          key=key)  # fmt: skip
    for i, host in enumerate(value):
        if not host or "/" in host or host != host.strip():
            raise ConfigError(f"{host!r} is not a registry host; write it as a reference names it, "
                              f'"host" or "host:port", without a scheme or path (in {where})',
                              key=f"{key}[{i}]")  # fmt: skip
    return tuple(value)


def _load_topologies(
    declared: object, services: Mapping[str, Service], file: str, prefix: str
) -> dict[str, tuple[str, ...]]:
    key = f"{prefix}topologies"
    if not isinstance(declared, dict):
        raise ConfigError(f'must be a table like shop = ["api", "cache"] (in {file})', key=key)
    topologies: dict[str, tuple[str, ...]] = {}
    for name, members in declared.items():
        where = f"{file} [{key}]"
        try:
            check_name(name, what="topology", key=f"{key}.{name}")
        except ConfigError as exc:
            raise located(exc, where) from None
        if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
            raise ConfigError(
                f'{members!r} is not a list of service names; write {name} = ["api", "cache"] '
                f"(in {where})",
                key=f"{key}.{name}",
            )
        for i, member in enumerate(members):
            if member not in services:
                raise ConfigError(
                    f"{member!r} is not a declared service; {_known(services)} (in {where})",
                    key=f"{key}.{name}[{i}]",
                )
            if member in members[:i]:
                raise ConfigError(
                    f"{member!r} is listed twice; list it once (in {where})",
                    key=f"{key}.{name}[{i}]",
                )
        topologies[name] = tuple(members)
    return topologies


def merge_services(catalog: Catalog, extra: Iterable[tuple[Service, str]]) -> Catalog:
    """A catalog with ``extra`` (service, origin) pairs added, e.g. from conftest hooks.

    A name may be defined once only, even identically: two definitions are a copy-paste waiting
    to drift, and which one wins would otherwise depend on plugin order.
    """
    services = dict(catalog.services)
    origins = dict(catalog.origins)
    for service, origin in extra:
        if not isinstance(service, Service):
            raise ConfigError(
                f"{origin} returned {service!r}, which is not a Service; "
                "return Service(...) objects"
            )
        if service.name in services:
            raise ConfigError(
                f"is defined twice: in {origins.get(service.name, 'an earlier declaration')} and "
                f"in {origin}; rename or remove one of them",
                service=service.name,
            )
        services[service.name] = service
        origins[service.name] = origin
    return dataclasses.replace(catalog, services=services, origins=origins)


def _dependency_order(
    roots: Iterable[str], resolve: Callable[[str, str | None], Service],
    origins: Mapping[str, str] | None = None,
) -> list[Service]:  # fmt: skip
    """Depth-first, dependencies before dependents, roots in the order given.

    ``resolve(name, wanted_by)`` finds a service (``wanted_by`` is None for a root) or raises.
    A ``depends_on`` cycle raises a :class:`ConfigError` that spells it out: ``a -> b -> a``,
    with where each service of it is declared (``origins``): a cycle made by an override of an
    imported service (a pod's second container depends on its first) is then traced to its files.
    """
    order: list[Service] = []
    done: set[str] = set()
    path: list[str] = []

    def visit(name: str, wanted_by: str | None) -> None:
        if name in done:
            return
        if name in path:
            cycle = [*path[path.index(name) :], name]
            where = "; ".join(f"{n}: {origins[n]}" for n in cycle[:-1] if origins and n in origins)
            raise ConfigError(
                f"depends_on forms a cycle: {' -> '.join(cycle)}; remove one of these dependencies"
                + (f" (declared in {where})" if where else ""),
                service=cycle[0],
                key="depends_on",
            )
        service = resolve(name, wanted_by)
        path.append(name)
        for dependency in service.depends_on:
            visit(dependency, name)
        path.pop()
        done.add(name)
        order.append(service)

    for root in roots:
        visit(root, None)
    return order


def select(
    catalog: Catalog, names: Sequence[str | Service], topology: str | None = None
) -> list[Service]:
    """The services a test asked for, plus everything they depend on, in start order.

    ``names`` holds catalog names or inline :class:`Service` objects; ``topology`` adds the
    members of a declared topology first. Dependencies resolve among the inline services first,
    then the catalog. An inline service may reuse a catalog name only with the same definition.
    """
    inline: dict[str, Service] = {}
    requested: list[str] = []
    if topology is not None:
        if topology not in catalog.topologies:
            raise ConfigError(
                f"unknown topology {topology!r}{_suggest(topology, catalog.topologies)}; "
                f"{_known(catalog.topologies, 'topologies')}"
            )
        requested.extend(catalog.topologies[topology])
    for item in names:
        if isinstance(item, Service):
            _check_inline(item, inline, catalog)
            inline[item.name] = item
            requested.append(item.name)
        elif isinstance(item, str) and item not in catalog.services and item in catalog.virtual:
            requested.extend(_pods_of(catalog, item))  # a Kubernetes Service: the pods it selects
        elif isinstance(item, str):
            requested.append(item)
        else:
            raise ConfigError(f"{item!r} is not a service name or a Service")

    def resolve(name: str, wanted_by: str | None) -> Service:
        if name in inline:
            return inline[name]
        if name in catalog.services:
            return catalog.services[name]
        known = {*catalog.services, *inline}
        if wanted_by is None:
            raise ConfigError(f"unknown service {name!r}{_suggest(name, known)}; {_known(known)}")
        raise ConfigError(
            f"depends on {name!r}, which is not declared{_suggest(name, known)}; {_known(known)}",
            service=wanted_by,
            key="depends_on",
        )

    selected = _dependency_order(requested, resolve, catalog.origins)
    _check_hostnames(selected)
    check_environment_host_ports(selected)
    return selected


def _pods_of(catalog: Catalog, name: str) -> list[str]:
    """The services of the pods a Kubernetes Service selects: each pod's network owner and the
    services that join its network (its other containers)."""
    owners = list(dict.fromkeys(owner for owner, _, _ in catalog.virtual[name].backends))
    return [s.name for s in catalog.services.values()
            if s.name in owners or s.network_of in owners]  # fmt: skip


def _suggest(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_inline(service: Service, inline: Mapping[str, Service], catalog: Catalog) -> None:
    earlier = inline.get(service.name)
    if earlier is not None and earlier != service:
        raise ConfigError(
            "two different inline services share this name; rename one of them",
            service=service.name,
        )
    declared = catalog.services.get(service.name)
    if declared is not None and declared != service:
        origin = catalog.origins.get(service.name, "the project config")
        raise ConfigError(
            f"an inline Service differs from the one declared in {origin}; "
            "rename the inline one, or use the declared one by its name",
            service=service.name,
        )


def _check_hostnames(services: Iterable[Service]) -> None:
    """Names and aliases become /etc/hosts entries: one name must mean one service."""
    owners: dict[str, str] = {}
    for service in services:
        for i, hostname in enumerate((service.name, *service.aliases)):
            owner = owners.setdefault(hostname, service.name)
            if owner != service.name:
                raise ConfigError(
                    f"{hostname!r} already names service {owner!r} in this environment; "
                    "pick another alias",
                    service=service.name,
                    key=f"aliases[{i - 1}]" if i else "name",
                )


def start_levels(services: Sequence[Service]) -> list[list[Service]]:
    """Group ``services`` into start waves: level 0 depends on nothing, level n on levels < n.

    Within a level, services keep their order in ``services``; each level can start in parallel
    once the previous one is ready. Every dependency must be in ``services``.
    """
    by_name: dict[str, Service] = {}
    for service in services:
        if service.name in by_name:
            raise ConfigError("is listed twice in one environment", service=service.name)
        by_name[service.name] = service

    def resolve(name: str, wanted_by: str | None) -> Service:
        if name in by_name:
            return by_name[name]
        raise ConfigError(
            f"depends on {name!r}, which is not part of this environment; "
            f"add it, or remove it from depends_on; services here: {', '.join(sorted(by_name))}",
            service=wanted_by,
            key="depends_on",
        )

    level: dict[str, int] = {}
    for service in _dependency_order(by_name, resolve):
        level[service.name] = 1 + max((level[d] for d in service.depends_on), default=-1)
    levels: list[list[Service]] = [[] for _ in range(max(level.values(), default=-1) + 1)]
    for service in services:
        levels[level[service.name]].append(service)
    return levels
