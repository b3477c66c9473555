"""One merged compose service as an envbox :class:`~pytest_envbox.spec.Service` (API.md 7).

What the spec cannot hold yet is returned beside it in :class:`ServiceExtras` (named volumes,
the stop signal, a disabled image health check), for the engine to add later.
"""

from __future__ import annotations

import difflib
import os
import shlex
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_envbox.compose.forms import compose_bytes, compose_duration
from pytest_envbox.compose.interpolate import ComposeError, parse_env_file
from pytest_envbox.compose.keys import (
    BY_VALUE,
    DEPLOY_IGNORED,
    HEALTHCHECK_KEYS,
    IGNORED,
    MAPPED,
    REFUSED,
    refused_value,
)
from pytest_envbox.errors import ConfigError
from pytest_envbox.probe import ExecProbe, docker_healthcheck
from pytest_envbox.spec import Limits, Mount, Service
from pytest_envbox.validate import describe, is_int

__all__ = ["DEFAULT_TMPFS", "ServiceExtras", "VolumeMount", "convert_service"]

#: The size of a compose ``tmpfs`` that gives none (Docker's has no cap; envbox caps every
#: tmpfs, and this is the size of its own /tmp).
DEFAULT_TMPFS = 512 * 2**20
#: Docker's health check defaults (seconds, and a count), as in ``images/imageconfig.py``.
_CONDITIONS = ("service_started", "service_healthy")


@dataclass(frozen=True)
class VolumeMount:
    """A named (``source``) or anonymous (``source`` None) volume mounted at ``target``.

    Compose gives it an empty (or image-seeded) writable directory that outlives a container
    restart and may be shared by several services; envbox has no such mount yet.
    """

    source: str | None
    target: str
    readonly: bool = False


@dataclass
class ServiceExtras:
    """What a compose service says that :class:`Service` cannot hold (yet)."""

    volumes: list[VolumeMount] = field(default_factory=list)
    stop_signal: str | None = None
    #: ``healthcheck: {disable: true}`` or ``test: [NONE]``: the image's Healthcheck is off too
    healthcheck_disabled: bool = False
    #: dependency -> required (``required: false`` drops it when that service is not loaded)
    depends_on: dict[str, bool] = field(default_factory=dict)
    #: dependencies with the condition service_completed_successfully
    completed: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


Fail = Callable[[str, str], ConfigError]


def _table(value: object, key: str, fail: Fail) -> dict[str, Any]:
    """A mapping (None: an empty one), or the error saying that ``key`` must be one."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise fail(f"{describe(value)} is not a mapping", key)
    return value


def _argv(value: object, key: str, fail: Fail) -> list[str]:
    if isinstance(value, str):
        try:
            return shlex.split(value)
        except ValueError as exc:
            raise fail(f"{value!r} cannot be split into arguments ({exc}); fix the quoting", key) from None
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise fail(f"{describe(value)} is not a command; write a string or a list of strings", key)


def _check_keys(body: dict[str, Any], extras: ServiceExtras, fail: Fail) -> None:
    known = tuple(dict.fromkeys((*MAPPED, *IGNORED, *REFUSED, *BY_VALUE)))
    for key, value in body.items():
        if key.startswith("x-"):
            continue
        if key in REFUSED:
            raise fail(f"cannot be honoured by envbox: {REFUSED[key]}", key)
        instead = refused_value(key, value)
        if instead is not None:
            raise fail(f"{key}: {value} cannot be honoured by envbox: {instead}", key)
        if key == "network_mode" and str(value).startswith("service:"):
            continue  # mapped: network_of (load.py)
        if key in IGNORED or (key not in MAPPED and key in known):
            extras.ignored.append(key)
        elif key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise fail(f"unknown key {key!r}; {hint}see the Compose Specification's service keys", key)


def _program(body: dict[str, Any], fail: Fail) -> dict[str, Any]:
    """``command`` and ``entrypoint`` as Service's ``command``/``args`` (API.md 6 and 7).

    ``command`` alone replaces the image's Cmd (``args``). A non-null ``entrypoint`` replaces the
    Entrypoint and, as Compose says, drops the image's Cmd: the argv is the entrypoint followed by
    ``command`` (if any), given whole as ``command``. ``entrypoint: []`` with a ``command``
    makes the command the whole argv.
    """
    command = body.get("command")
    entrypoint = body.get("entrypoint")
    args = None if command is None else _argv(command, "command", fail)
    if entrypoint is None:
        return {} if args is None else {"args": args}
    whole = [*_argv(entrypoint, "entrypoint", fail), *(args or [])]
    if not whole:
        raise fail("is empty and there is no command: nothing is left to run; give a command",
                   "entrypoint")  # fmt: skip
    return {"command": whole}


def _env(body: dict[str, Any], project_dir: Path, lookup: Callable[[str], str | None],
         fail: Fail, name: str) -> dict[str, str]:  # fmt: skip
    env: dict[str, str] = {}
    for i, item in enumerate(body.get("env_file") or []):
        path = project_dir / os.path.expanduser(str(item["path"]))
        if not path.is_file():
            if item.get("required", True) is False:
                continue
            raise fail(f"env file {path} does not exist; create it, or mark it `required: false`",
                       f"env_file[{i}]")  # fmt: skip
        raw = item.get("format") == "raw"
        env.update(parse_env_file(path, lookup, raw=raw, service=name, key=f"env_file[{i}]"))
    for key, value in (body.get("environment") or {}).items():
        resolved = value if value is not None else lookup(key)
        if resolved is None:
            env.pop(key, None)  # unset: removed, even from env_file (the Compose spec says so)
        else:
            env[key] = resolved
    return env


def _ports(body: dict[str, Any], fail: Fail) -> list[int]:
    ports: list[int] = []
    for key in ("ports", "expose"):
        for i, entry in enumerate(body.get(key) or []):
            protocol = entry.get("protocol", "tcp")
            if protocol != "tcp":
                raise fail(f"port {entry['target']}/{protocol}: envbox publishes TCP ports only; "
                           "remove the entry (an override file can, with `ports: !override [...]`)",
                           f"{key}[{i}]")  # fmt: skip
            if entry["target"] not in ports:
                ports.append(entry["target"])
    return ports


def _depends(body: dict[str, Any], extras: ServiceExtras, fail: Fail) -> None:
    for dep, given in (body.get("depends_on") or {}).items():
        options = _table(given, f"depends_on.{dep}", fail)
        condition = options.get("condition", "service_started")
        key = f"depends_on.{dep}.condition"
        if condition == "service_completed_successfully":
            extras.completed.append(dep)  # that service runs to completion: oneshot (load.py)
        elif condition not in _CONDITIONS:
            raise fail(f"{condition!r} is not a condition; use service_started, service_healthy or "
                       "service_completed_successfully", key)  # fmt: skip
        extras.depends_on[dep] = options.get("required", True) is not False


def _healthcheck(body: dict[str, Any], extras: ServiceExtras, fail: Fail) -> ExecProbe | None:
    """The readiness probe, by :func:`pytest_envbox.probe.docker_healthcheck`, as an image's
    Healthcheck is mapped; ``NONE`` or ``disable`` marks the image's own check off."""
    hc = body.get("healthcheck")
    if hc is None:
        return None
    if not isinstance(hc, dict):
        raise fail(f"{describe(hc)} is not a mapping with test, interval, timeout, retries", "healthcheck")
    for key in hc:
        if key not in HEALTHCHECK_KEYS:
            raise fail(f"unknown key {key!r}; accepted: {', '.join(HEALTHCHECK_KEYS)}", f"healthcheck.{key}")
    if hc.get("disable") is True:
        extras.healthcheck_disabled = True
        return None
    test = hc.get("test")
    if test is None:
        extras.ignored.extend(f"healthcheck.{k}" for k in hc if k != "disable")
        return None
    if isinstance(test, str):
        test = ["CMD-SHELL", test]
    if not isinstance(test, list) or not test or not all(isinstance(t, str) for t in test):
        raise fail(f"{describe(test)} is not a health check; write [CMD, prog, arg...], "
                   "[CMD-SHELL, 'command'] or a string", "healthcheck.test")  # fmt: skip
    if test[0] == "NONE":
        extras.healthcheck_disabled = True
        return None
    if test[0] not in ("CMD", "CMD-SHELL") or len(test) < 2:
        raise fail(f"{test!r} is not a health check; its first item is CMD, CMD-SHELL or NONE, "
                   "followed by the command", "healthcheck.test")  # fmt: skip

    def seconds(key: str, default: float) -> float:
        value = hc.get(key)
        if value is None:
            return default
        return compose_duration(value, f"healthcheck.{key}", fail) or default  # 0: the default

    retries = hc.get("retries", 0)
    if not is_int(retries) or retries < 0:
        raise fail(f"{describe(retries)} is not a count of retries", "healthcheck.retries")
    return docker_healthcheck(test, interval=seconds("interval", 0.0), timeout=seconds("timeout", 0.0),
                              retries=retries, start_period=seconds("start_period", 0.0),
                              poll=seconds("start_interval", 0.0) or None)  # fmt: skip


def _one(values: dict[str, Any], read: Callable[[object, str], Any], fail: Fail) -> Any:
    """The value given under one or two spellings (``mem_limit`` and deploy's ``memory``), each
    read by ``read(value, key)``: they must agree, as the Compose spec requires."""
    found = {k: read(v, k) for k, v in values.items() if v is not None}
    if len(set(found.values())) > 1:
        said = " and ".join(f"{k}={values[k]!r}" for k in found)
        raise fail(f"{said} disagree; give one", next(iter(found)))
    return next(iter(found.values()), None)


def _cores(value: object, key: str, fail: Fail) -> float | None:
    try:
        cores = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise fail(f"{describe(value)} is not a number of cores like 0.5 or '1.5'", key) from None
    return cores or None  # 0: unlimited, as in Docker


def _pids(value: object, key: str, fail: Fail) -> int | None:
    if not is_int(value):
        raise fail(f"{describe(value)} is not a count of processes", key)
    return value if value > 0 else None  # -1 (or 0): unlimited, as in Docker


def _limits(body: dict[str, Any], extras: ServiceExtras, fail: Fail) -> Limits:
    deploy = _table(body.get("deploy"), "deploy", fail)
    for key in deploy:
        if key in DEPLOY_IGNORED:
            extras.ignored.append(f"deploy.{key}")
        elif key == "replicas":
            if deploy[key] not in (0, 1):
                raise fail("envbox runs one copy of a service; use replicas: 1", "deploy.replicas")
        elif key != "resources":
            raise fail(f"unknown key {key!r}", f"deploy.{key}")
    resources = _table(deploy.get("resources"), "deploy.resources", fail)
    extras.ignored.extend(f"deploy.resources.{k}" for k in resources if k != "limits")
    limits = _table(resources.get("limits"), "deploy.resources.limits", fail)
    for key in limits:
        if key not in ("memory", "cpus", "pids"):
            raise fail("cannot be honoured by envbox: only memory, cpus and pids are limited",
                       f"deploy.resources.limits.{key}")  # fmt: skip
    deployed = "deploy.resources.limits."
    memory = _one({"mem_limit": body.get("mem_limit"), deployed + "memory": limits.get("memory")},
                  lambda v, k: compose_bytes(v, k, fail), fail)  # fmt: skip
    cpu = _one({"cpus": body.get("cpus"), deployed + "cpus": limits.get("cpus")},
               lambda v, k: _cores(v, k, fail), fail)  # fmt: skip
    pids = _one({"pids_limit": body.get("pids_limit"), deployed + "pids": limits.get("pids")},
                lambda v, k: _pids(v, k, fail), fail)  # fmt: skip
    nofile = None
    ulimits = _table(body.get("ulimits"), "ulimits", fail)
    for key, value in ulimits.items():
        if key != "nofile":
            extras.ignored.append(f"ulimits.{key}")
        elif is_int(value):
            nofile = value
        elif isinstance(value, dict) and is_int(value.get("soft")):
            nofile = value["soft"]
        else:
            raise fail(f"{describe(value)} is not a count, nor {{soft: N, hard: N}}", "ulimits.nofile")
    return Limits(memory=memory, cpu=cpu, pids=pids, nofile=nofile)


def _relocated(exc: ConfigError, fail: Fail, prefix: str = "") -> ConfigError:
    """A spec error (``service 'x', key 'k': ...``) again, with the compose file named."""
    message = str(exc)
    for said in (f"service {exc.service!r}, key {exc.key!r}: ", f"key {exc.key!r}: ",
                 f"service {exc.service!r}: "):  # fmt: skip
        message = message.removeprefix(said)
    return fail(message, prefix + (exc.key or ""))


def _tmpfs_size(options: str, key: str, fail: Fail) -> int:
    for option in options.split(","):
        name, _, value = option.partition("=")
        if name.strip() == "size":
            return compose_bytes(value.strip(), key, fail)
    return DEFAULT_TMPFS


def _mounts(body: dict[str, Any], project_dir: Path, extras: ServiceExtras,
            fail: Fail) -> tuple[list[Mount], dict[str, int]]:  # fmt: skip
    mounts: list[Mount] = []
    tmpfs: dict[str, int] = {}
    for i, entry in enumerate(body.get("volumes") or []):
        key = f"volumes[{i}]"
        kind, target = entry.get("type", "volume"), entry["target"]
        readonly = entry.get("read_only", False) is True
        if kind == "bind":
            source = os.path.expanduser(str(entry.get("source", "")))
            try:
                mounts.append(Mount(os.path.normpath(project_dir / source), target, readonly))
            except ConfigError as exc:
                raise _relocated(exc, fail, prefix=f"{key}.") from None
        elif kind == "volume":
            source = entry.get("source")
            extras.volumes.append(VolumeMount(str(source) if source else None, target, readonly))
        elif kind == "tmpfs":
            size = _table(entry.get("tmpfs"), f"{key}.tmpfs", fail).get("size")
            tmpfs[target] = DEFAULT_TMPFS if size is None else compose_bytes(size, f"{key}.tmpfs.size", fail)
        else:
            raise fail(f"a {kind!r} mount cannot be honoured by envbox; use a bind mount, a named "
                       "volume or a tmpfs", f"{key}.type")  # fmt: skip
    for i, item in enumerate(body.get("tmpfs") or []):
        path, _, options = str(item).partition(":")
        tmpfs[path] = _tmpfs_size(options, f"tmpfs[{i}]", fail)
    if body.get("shm_size") is not None:
        tmpfs["/dev/shm"] = compose_bytes(body["shm_size"], "shm_size", fail)
    return mounts, tmpfs


def _grants(body: dict[str, Any], project_dir: Path, defined: Mapping[str, Any], extras: ServiceExtras,
            fail: Fail) -> list[Mount]:  # fmt: skip
    """``secrets`` and ``configs`` backed by a ``file:`` as read-only mounts of that file (what
    Docker Compose does too); a secret from the environment, inline content or an external one
    cannot be given."""
    mounts: list[Mount] = []
    for key in ("secrets", "configs"):
        for i, entry in enumerate(body.get(key) or []):
            source = entry["source"]
            definition = _table(defined.get(key, {}).get(source), f"{key}[{i}]", fail)
            if not definition:
                raise fail(f"{source!r} is not declared under the top-level `{key}:`; declare it, "
                           f"e.g. {key}: {{{source}: {{file: ./{source}.txt}}}}", f"{key}[{i}]")  # fmt: skip
            if not isinstance(definition.get("file"), str):
                given = ", ".join(k for k in definition if k != "name") or "nothing"
                raise fail(f"{source!r} comes from {given}, which envbox cannot provide: only a "
                           f"`file:` is mounted; write the value to a file and declare `file:`",
                           f"{key}[{i}]")  # fmt: skip
            extras.ignored.extend(f"{key}[{i}].{k}" for k in ("uid", "gid", "mode") if k in entry)
            path = os.path.normpath(project_dir / os.path.expanduser(definition["file"]))
            try:
                mounts.append(Mount(path, entry["target"], readonly=True))
            except ConfigError as exc:
                raise _relocated(exc, fail, prefix=f"{key}[{i}].") from None
    return mounts


def _aliases(body: dict[str, Any], name: str, extras: ServiceExtras, fail: Fail) -> list[str]:
    aliases: list[str] = []
    for network, options in (body.get("networks") or {}).items():
        if network != "default":  # the membership: every service is on the environment's network
            extras.ignored.append(f"networks.{network}")
        for key, value in _table(options, f"networks.{network}", fail).items():
            if key == "aliases":
                if not isinstance(value, list):
                    raise fail(f"{describe(value)} is not a list of names", f"networks.{network}.aliases")
                aliases += [str(a) for a in value if a != name and a not in aliases]
            else:
                extras.ignored.append(f"networks.{network}.{key}")
    return aliases


def _stop_signal(value: object, fail: Fail) -> str:
    text = str(value).strip().upper()
    name = text if text.startswith("SIG") or text.isdigit() else "SIG" + text
    if text.isdigit() and 0 < int(text) < signal.NSIG:
        return signal.Signals(int(text)).name
    if name in signal.Signals.__members__:
        return name
    raise fail(f"{value!r} is not a signal; write one like SIGQUIT, QUIT or 3", "stop_signal")


_PULL = {"always": "always", "never": "never", "missing": "missing", "if_not_present": "missing",
         "daily": "missing", "weekly": "missing"}  # fmt: skip


#: The image of a service built by ``build:`` whose override runs a host program instead
#: (``image = false``); the override removes it.
REPLACED_IMAGE = "envbox/replaced-by-override"


def convert_service(
    name: str, body: dict[str, Any], project_dir: Path, lookup: Callable[[str], str | None], fail: Fail,
    defined: Mapping[str, Any] | None = None, replaced: Mapping[str, str | None] | None = None,
) -> tuple[Service, ServiceExtras]:
    """The :class:`Service` of compose service ``name`` (merged, normalised, interpolated).

    ``replaced``: services whose image the project's override gives (None: ``image = false``, a
    host program); their ``build:`` is then ignored rather than refused."""
    extras = ServiceExtras()
    if replaced is not None and name in replaced and "build" in body:
        body = {k: v for k, v in body.items() if k != "build"}
        extras.ignored.append("build")
        if not body.get("image"):
            body["image"] = replaced[name] or REPLACED_IMAGE
    _check_keys(body, extras, fail)
    image = body.get("image")
    if not isinstance(image, str) or not image.strip():
        raise fail(f"{describe(image)} is not an image reference; every service needs `image:` "
                   "(envbox does not build: build the image and reference it)", "image")  # fmt: skip
    try:
        return _convert(name, body, image, project_dir, lookup, fail, extras, defined or {})
    except ComposeError:
        raise
    except ConfigError as exc:  # from the spec classes: the same words, with the file named
        raise _relocated(exc, fail) from None


def _convert(name: str, body: dict[str, Any], image: str, project_dir: Path,
             lookup: Callable[[str], str | None], fail: Fail, extras: ServiceExtras,
             defined: Mapping[str, Any]) -> tuple[Service, ServiceExtras]:  # fmt: skip
    kwargs: dict[str, Any] = _program(body, fail)
    kwargs["env"] = _env(body, project_dir, lookup, fail, name)
    kwargs["ports"] = _ports(body, fail)
    _depends(body, extras, fail)
    kwargs["ready"] = _healthcheck(body, extras, fail)
    kwargs["limits"] = _limits(body, extras, fail)
    mounts, kwargs["tmpfs"] = _mounts(body, project_dir, extras, fail)
    kwargs["mounts"] = mounts + _grants(body, project_dir, defined, extras, fail)
    kwargs["aliases"] = _aliases(body, name, extras, fail)
    if body.get("user") is not None:
        kwargs["user"] = str(body["user"])
    if body.get("working_dir") is not None:
        kwargs["cwd"] = str(body["working_dir"])
    if body.get("stop_grace_period") is not None:
        kwargs["stop_timeout"] = compose_duration(body["stop_grace_period"], "stop_grace_period", fail)
    if body.get("stop_signal") is not None:
        extras.stop_signal = _stop_signal(body["stop_signal"], fail)
    policy = body.get("pull_policy")
    if policy is not None:
        if str(policy) == "build":
            raise fail(f"build: {REFUSED['build']}", "pull_policy")
        if str(policy) not in _PULL and not str(policy).startswith("every_"):
            raise fail(f"{policy!r} is not a pull policy; use always, never, missing", "pull_policy")
        kwargs["pull"] = _PULL.get(str(policy), "missing")
    return Service(name, image=image, **kwargs), extras
