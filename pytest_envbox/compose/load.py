"""``load_compose``: compose files in, envbox services out (API.md 7).

The steps, in Compose's order: ``.env`` next to the first file (the process environment wins
over it); each file read (:mod:`.yamlfile`), interpolated (:mod:`.interpolate`) and its short
forms normalised (:mod:`.forms`); the files merged in order (:mod:`.merge`); services outside
the active profiles dropped; each service converted (:mod:`.convert`); ``depends_on`` checked
for unknown services and cycles. Relative paths (bind mounts, ``env_file``) start at the
project directory, the first file's directory, as ``docker compose -f a -f b`` resolves them.
"""

from __future__ import annotations

import copy
import difflib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from pytest_envbox.compose.convert import ServiceExtras, VolumeMount, convert_service
from pytest_envbox.compose.forms import normalise_service
from pytest_envbox.compose.interpolate import (
    ComposeError,
    interpolate_tree,
    lookup_in,
    parse_env_file,
)
from pytest_envbox.compose.merge import merge_service
from pytest_envbox.compose.yamlfile import Reset, read_yaml
from pytest_envbox.errors import ConfigError
from pytest_envbox.spec import Service
from pytest_envbox.validate import check_name

__all__ = ["TOP_LEVEL", "TOP_LEVEL_IGNORED", "ComposeProject", "Ignored", "load_compose"]

#: Top-level keys: ``services`` is read; ``include`` is refused; the others are definitions
#: (networks, volumes...) that services refer to, or metadata.
TOP_LEVEL = ("version", "name", "services", "networks", "volumes", "configs", "secrets", "models",
             "include")  # fmt: skip
#: Top-level keys read and ignored: the project name, the obsolete version, and the definitions of
#: networks (an environment is one private network) and volumes (private to the environment).
TOP_LEVEL_IGNORED = ("version", "name", "networks", "volumes", "models")
_PROFILE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]+")


class Ignored(NamedTuple):
    """A key that was read and deliberately ignored: for ``envbox doctor --config``."""

    file: Path
    service: str | None
    key: str


@dataclass(frozen=True)
class ComposeProject:
    """What compose files declare, as envbox services, and what those cannot hold yet."""

    files: tuple[Path, ...]
    #: the services of the active profiles, in file order
    services: Mapping[str, Service]
    #: service -> where it is declared, e.g. ``"compose.yaml services.web"`` (Catalog.origins)
    origins: Mapping[str, str]
    ignored: tuple[Ignored, ...]
    #: service -> its named and anonymous volumes (private to the environment, API.md 7)
    volumes: Mapping[str, tuple[VolumeMount, ...]]
    #: service -> the signal that stops it (``"SIGQUIT"``), for those that set ``stop_signal``
    stop_signals: Mapping[str, str]
    #: services whose image's Healthcheck is turned off (``disable: true``, ``[NONE]``)
    healthcheck_disabled: frozenset[str]
    #: unset variables substituted by an empty string, as ``docker compose`` warns
    warnings: tuple[str, ...]


def _fail_for(name: str, setters: Mapping[str, Path], default: Path) -> Any:
    def fail(message: str, key: str) -> ConfigError:
        top = re.split(r"[.\[]", key, maxsplit=1)[0]
        return ComposeError(message, file=setters.get(top, default), service=name, key=key)

    return fail


def _read(path: Path, lookup: Any, warnings: list[str], defined: dict[str, dict[str, Any]],
          ignored: list[Ignored]) -> dict[str, Any]:  # fmt: skip
    """The services of one file, interpolated, normalised, ``extends`` resolved; its top-level
    ``secrets`` and ``configs`` definitions are added to ``defined``, the top-level keys that do
    not matter to ``ignored``."""
    doc = read_yaml(path)
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ComposeError("a compose file is a mapping with `services:`", file=path, service=None, key=None)
    for key in doc:
        if str(key).startswith("x-"):
            continue
        if key == "include":
            raise ComposeError("cannot be honoured by envbox yet: list the included files in "
                               "`compose` instead (they are merged in order)", file=path,
                               service=None, key="include")  # fmt: skip
        if key in TOP_LEVEL_IGNORED:
            ignored.append(Ignored(path, None, str(key)))
        if key not in TOP_LEVEL:
            close = difflib.get_close_matches(str(key), TOP_LEVEL, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ComposeError(f"unknown top-level key {key!r}; {hint}accepted: {', '.join(TOP_LEVEL)}",
                               file=path, service=None, key=str(key))  # fmt: skip
    tree = interpolate_tree(doc, lookup, path, warnings)
    assert isinstance(tree, dict)
    for section in ("secrets", "configs"):
        table = tree.get(section) or {}
        if not isinstance(table, dict):
            raise ComposeError("must be a mapping of names to definitions", file=path, service=None,
                               key=section)  # fmt: skip
        defined[section].update(table)
    services = tree.get("services") or {}
    if not isinstance(services, dict):
        raise ComposeError("must be a mapping of service names to services", file=path, service=None,
                           key="services")  # fmt: skip
    out: dict[str, Any] = {}
    for name, body in services.items():
        if isinstance(body, Reset):
            out[str(name)] = body
            continue
        if not isinstance(body, dict):
            raise ComposeError("must be a mapping of the service's keys", file=path, service=str(name),
                               key=None)  # fmt: skip

        def fail(message: str, key: str, name: str = str(name)) -> ConfigError:
            return ComposeError(message, file=path, service=name, key=key)

        out[str(name)] = normalise_service(body, fail)
    for name in out:
        out[name] = _extended(name, out, path, ())
    return out


def _extended(name: str, services: dict[str, Any], path: Path, chain: tuple[str, ...]) -> Any:
    """Service ``name`` with its ``extends: {service: base}`` merged in (the base first, then the
    service, by the rules of several files); a base in another file is refused."""
    body = services[name]
    if isinstance(body, Reset) or body.get("extends") is None:
        return body
    given = body["extends"]
    spec = {"service": given} if isinstance(given, str) else given
    if not isinstance(spec, dict) or not isinstance(spec.get("service"), str):
        raise ComposeError("must be {service: NAME} or NAME", file=path, service=name, key="extends")
    if spec.get("file") is not None:
        raise ComposeError("a base service in another file cannot be honoured by envbox (its "
                           "relative paths would start elsewhere); list that file first in "
                           "`compose` and extend within one file, or use YAML anchors",
                           file=path, service=name, key="extends.file")  # fmt: skip
    base = spec["service"]
    if name in chain:
        raise ComposeError(f"extends forms a cycle: {' -> '.join([*chain, name])}; remove one",
                           file=path, service=name, key="extends")  # fmt: skip
    if base not in services or isinstance(services[base], Reset):
        raise ComposeError(f"extends {base!r}, which is not a service of this file", file=path,
                           service=name, key="extends.service")  # fmt: skip
    parent = _extended(base, services, path, (*chain, name))
    rest = {k: v for k, v in body.items() if k != "extends"}
    return merge_service(copy.deepcopy(parent), rest, path, {})


def _active(name: str, body: dict[str, Any], profiles: set[str], setters: Mapping[str, Path],
            first: Path) -> bool:  # fmt: skip
    declared = body.get("profiles") or []
    for i, profile in enumerate(declared):
        if not isinstance(profile, str) or not _PROFILE.fullmatch(profile):
            raise _fail_for(name, setters, first)(f"{profile!r} is not a profile name", f"profiles[{i}]")
    return not declared or "*" in profiles or bool(profiles & set(declared))


def _check_cycles(deps: Mapping[str, Sequence[str]], setters: Mapping[str, Mapping[str, Path]],
                  joined: Mapping[str, str], default: Path) -> None:  # fmt: skip
    """A ``depends_on`` cycle is a ComposeError at its first dependency (``a -> b`` of
    ``a -> b -> a``): the file that set ``a``'s ``depends_on``, the service ``a`` and the key
    ``depends_on.b`` (``network_mode`` when ``a`` only joins ``b``'s network: ``joined``). The
    message spells the cycle out, with each service's file when they are not all in one."""
    done: set[str] = set()
    path: list[str] = []

    def visit(name: str) -> None:
        if name in done:
            return
        if name in path:
            cycle = [*path[path.index(name):], name]
            first, dep = cycle[0], cycle[1]
            top = "network_mode" if joined.get(first) == dep else "depends_on"
            places = {n: setters[n].get("depends_on", setters[n].get("network_mode", default))
                      for n in cycle[:-1]}  # fmt: skip
            where = "" if len(set(places.values())) == 1 else " (" + ", ".join(
                f"{n} in {places[n].name}" for n in cycle[:-1]) + ")"  # fmt: skip
            raise ComposeError(f"depends_on forms a cycle: {' -> '.join(cycle)}{where}; remove one of "
                               "these dependencies", file=setters[first].get(top, default),
                               service=first, key=top if top == "network_mode" else f"depends_on.{dep}")
        path.append(name)
        for dep in deps[name]:
            visit(dep)
        path.pop()
        done.add(name)

    for name in deps:
        visit(name)


def load_compose(files: Sequence[Path], *, environ: Mapping[str, str], profiles: Sequence[str] = (),
                 replaced: Mapping[str, str | None] | None = None) -> ComposeProject:  # fmt: skip
    """The envbox services of compose ``files``, merged in order (``-f a -f b``).

    ``environ`` is the process environment (interpolation, and ``environment`` entries without a
    value); ``.env`` beside the first file adds to it, never over it. ``profiles`` are the active
    ones; when empty, ``COMPOSE_PROFILES`` (comma-separated) is read from ``environ``/``.env``.
    Every mistake, and every key that cannot be honoured, is a :class:`ConfigError` naming the
    file, the service and the key. ``replaced``: services whose image the project overrides
    (None: a host program instead): their ``build:`` is ignored.
    """
    if not files:
        raise ConfigError("no compose file given; list at least one, like compose = [\"compose.yaml\"]")
    paths = tuple(Path(f).absolute() for f in files)
    project_dir = paths[0].parent
    dotenv_path = project_dir / ".env"
    dotenv = parse_env_file(dotenv_path, lookup_in(environ)) if dotenv_path.is_file() else {}
    lookup = lookup_in(environ, dotenv)
    warnings: list[str] = []

    merged: dict[str, dict[str, Any]] = {}
    setters: dict[str, dict[str, Path]] = {}
    defined: dict[str, dict[str, Any]] = {"secrets": {}, "configs": {}}
    top_ignored: list[Ignored] = []
    for path in paths:
        for name, body in _read(path, lookup, warnings, defined, top_ignored).items():
            if isinstance(body, Reset):
                merged.pop(name, None)
                setters.pop(name, None)
                continue
            keys = setters.setdefault(name, {})
            merged[name] = merge_service(merged.get(name), body, path, keys)

    active = set(profiles) if profiles else {
        p.strip() for p in (lookup("COMPOSE_PROFILES") or "").split(",") if p.strip()}
    services: dict[str, Service] = {}
    extras: dict[str, ServiceExtras] = {}
    origins: dict[str, str] = {}
    disabled: dict[str, list[str]] = {}
    for name, body in merged.items():
        first = next(iter(setters[name].values()), paths[0])
        if not _active(name, body, active, setters[name], first):
            disabled[name] = list(body.get("profiles") or [])
            continue
        fail = _fail_for(name, setters[name], first)
        try:
            check_name(name, what="service")
        except ConfigError as exc:
            raise ComposeError(str(exc), file=first, service=None, key=f"services.{name}") from None
        services[name], extras[name] = convert_service(name, body, project_dir, lookup, fail, defined,
                                                       replaced)  # fmt: skip
        origins[name] = f"{first.name} services.{name}"

    deps: dict[str, list[str]] = {}
    joined: dict[str, str] = {}  # service -> the service whose network it joins (network_mode)
    for name, ex in extras.items():
        fail = _fail_for(name, setters[name], paths[0])
        kept = []
        for dep, required in ex.depends_on.items():
            if dep in services:
                kept.append(dep)
            elif not required:
                continue
            elif dep in disabled:
                raise fail(f"depends on {dep!r}, which is only in the profiles "
                           f"{', '.join(disabled[dep])}; activate one of them, or remove the "
                           "dependency", f"depends_on.{dep}")  # fmt: skip
            else:
                close = difflib.get_close_matches(dep, list(services), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise fail(f"depends on {dep!r}, which is not a service{hint}; services: "
                           f"{', '.join(services)}", f"depends_on.{dep}")  # fmt: skip
        mode = str(merged[name].get("network_mode") or "")
        if mode.startswith("service:"):
            owner = mode.partition(":")[2]
            if owner not in services:
                raise fail(f"network_mode: {mode} names no service of these files; services: "
                           f"{', '.join(services)}", "network_mode")  # fmt: skip
            if owner not in kept:
                joined[name] = owner
            kept = list(dict.fromkeys([*kept, owner]))
            services[name] = services[name].with_changes(network_of=owner)
        if kept:
            services[name] = services[name].with_changes(depends_on=kept)
        deps[name] = kept
    _check_cycles(deps, setters, joined, paths[0])
    for ex in extras.values():  # a service others wait to complete runs to completion
        for dep in ex.completed:
            if dep in services and not services[dep].oneshot:
                services[dep] = services[dep].with_changes(oneshot=True, ready=None)

    ignored = top_ignored + [Ignored(setters[name].get(re.split(r"[.\[]", key)[0], paths[0]), name, key)
                             for name, ex in extras.items() for key in ex.ignored]  # fmt: skip
    return ComposeProject(
        files=paths,
        services=services,
        origins=origins,
        ignored=tuple(ignored),
        volumes={n: tuple(ex.volumes) for n, ex in extras.items() if ex.volumes},
        stop_signals={n: ex.stop_signal for n, ex in extras.items() if ex.stop_signal},
        healthcheck_disabled=frozenset(n for n, ex in extras.items() if ex.healthcheck_disabled),
        warnings=tuple(dict.fromkeys(warnings)),
    )
