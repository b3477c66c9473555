"""An image's config (the OCI/Docker config blob) and the defaults it gives a service.

The config says how the image's authors meant it to run: its environment, Entrypoint and Cmd,
working directory, user, ports, stop signal and health check. A declaration overrides each of
them (API.md 6): :func:`apply_image_defaults` fills only what the service leaves unsaid, and
:func:`image_argv` makes the argv as Docker does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pytest_envbox.errors import ConfigError, ImageError
from pytest_envbox.probe import ExecProbe, docker_healthcheck
from pytest_envbox.spec import Service
from pytest_envbox.validate import USER

__all__ = ["Healthcheck", "ImageConfig", "apply_image_defaults", "image_argv", "parse_signal"]

#: Docker's defaults for a health check that leaves them out (seconds, and a count).


@dataclass(frozen=True)
class Healthcheck:
    """The config's ``Healthcheck``: ``test`` as written (``("CMD", ...)``, ``("CMD-SHELL",
    "...")``, ``("NONE",)``), durations in seconds (None where the config leaves them out)."""

    test: tuple[str, ...]
    interval: float | None = None
    timeout: float | None = None
    start_period: float | None = None
    retries: int | None = None


@dataclass(frozen=True)
class ImageConfig:
    """What a service takes from its image's config (see :meth:`from_json`)."""

    env: tuple[tuple[str, str], ...] = ()
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    workdir: str = ""
    user: str = ""
    #: the TCP ones only ("6379/tcp", or a bare "6379"); UDP ones are not published
    exposed_ports: tuple[int, ...] = ()
    stop_signal: str = ""
    healthcheck: Healthcheck | None = None
    os: str = "linux"
    architecture: str = ""
    diff_ids: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, data: bytes) -> ImageConfig:
        """Parse a config blob. Every field may be missing or null (``docker save`` writes
        ``"Entrypoint": null``); what is not JSON, or not an object, is an :class:`ImageError`."""
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise ImageError(f"the image config is not JSON ({e})") from None
        if not isinstance(doc, dict):
            raise ImageError("the image config is not a JSON object")
        c = _dict(doc.get("config"))
        env = []
        for item in _strings(c.get("Env")):
            key, eq, value = item.partition("=")
            if eq and key:
                env.append((key, value))
        ports = []
        for spec in _dict(c.get("ExposedPorts")):
            number, _, proto = str(spec).partition("/")
            if proto in ("", "tcp") and number.isdigit() and 0 < int(number) < 65536:
                ports.append(int(number))
        hc = None
        h = _dict(c.get("Healthcheck"))
        test = _strings(h.get("Test"))
        if test:
            hc = Healthcheck(test=test, interval=_seconds(h.get("Interval")),
                             timeout=_seconds(h.get("Timeout")),
                             start_period=_seconds(h.get("StartPeriod")),
                             retries=_count(h.get("Retries")))  # fmt: skip
        rootfs = _dict(doc.get("rootfs"))
        return cls(env=tuple(env), entrypoint=_strings(c.get("Entrypoint")),
                   cmd=_strings(c.get("Cmd")), workdir=_str(c.get("WorkingDir")),
                   user=_str(c.get("User")), exposed_ports=tuple(sorted(set(ports))),
                   stop_signal=_str(c.get("StopSignal")), healthcheck=hc,
                   os=_str(doc.get("os")) or "linux", architecture=_str(doc.get("architecture")),
                   diff_ids=_strings(rootfs.get("diff_ids")))  # fmt: skip


def _dict(v: object) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def _str(v: object) -> str:
    return v if isinstance(v, str) else ""


def _strings(v: object) -> tuple[str, ...]:
    if isinstance(v, str):  # an old builder's Cmd as one string
        return (v,)
    return tuple(x for x in v if isinstance(x, str)) if isinstance(v, list) else ()


def _seconds(v: object) -> float | None:
    """Nanoseconds (Go's time.Duration) to seconds; 0 means "the default", as in Docker."""
    if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0:
        return v / 1e9
    return None


def _count(v: object) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


def parse_signal(text: str) -> int | None:
    """A ``StopSignal`` ("SIGQUIT", "QUIT", "3") as a number; None for "" or one unknown here
    (then SIGTERM, as Docker falls back for a signal it cannot parse at run time)."""
    import signal

    text = text.strip()
    if not text:
        return None
    if text.isdigit():
        n = int(text)
        return n if 0 < n < signal.NSIG else None
    name = text.upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    sig = getattr(signal.Signals, name, None) if name in signal.Signals.__members__ else None
    return int(sig) if sig is not None else None


def _probe(hc: Healthcheck | None) -> ExecProbe | None:
    """The health check as a readiness probe (``NONE``, or anything but ``CMD`` and
    ``CMD-SHELL``: none); see :func:`pytest_envbox.probe.docker_healthcheck`."""
    if hc is None or not hc.test:
        return None
    return docker_healthcheck(hc.test, interval=hc.interval, timeout=hc.timeout, retries=hc.retries,
                              start_period=hc.start_period)  # fmt: skip


def apply_image_defaults(spec: Service, config: ImageConfig) -> Service:
    """The service with what its image's config supplies where the declaration is silent: ``Env``
    under ``env`` (the declaration wins), ``ExposedPorts`` as ``ports``, ``Healthcheck`` as
    ``ready`` (unless ``healthcheck`` is false, or the service is ``oneshot``), ``WorkingDir`` as
    ``cwd``, ``User`` as ``user``.

    A ``User`` the declaration grammar does not take stays out of the spec;
    :func:`pytest_envbox.engine.imageplan.plan_for_image` resolves it from the config.
    """
    changes: dict[str, Any] = {}
    if config.env:
        changes["env"] = {**dict(config.env), **spec.env}
    if not spec.ports and config.exposed_ports:
        changes["ports"] = list(config.exposed_ports)
    if spec.ready is None and spec.healthcheck and not spec.oneshot:
        probe = _probe(config.healthcheck)
        if probe is not None:
            changes["ready"] = probe
    if spec.cwd is None and config.workdir:
        changes["cwd"] = config.workdir
    if spec.user is None and config.user and USER.fullmatch(config.user):
        changes["user"] = config.user
    return spec.with_changes(**changes) if changes else spec


def image_argv(spec: Service, config: ImageConfig) -> list[str]:
    """The argv as Docker makes it: ``command`` replaces Entrypoint and Cmd; otherwise the
    Entrypoint followed by ``args`` (when given) or the Cmd."""
    if spec.command:
        return list(spec.command)
    argv = [*config.entrypoint, *(spec.args if spec.args is not None else config.cmd)]
    if not argv:
        raise ConfigError(f"the image {spec.image} has neither Entrypoint nor Cmd; give command",
                          service=spec.name, key="command")  # fmt: skip
    return argv
