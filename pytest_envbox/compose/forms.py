"""Compose's short forms rewritten as its long forms, and its quantities read.

Each file's services are normalised before files are merged (see :mod:`.merge`), so that
``environment: [A=1]`` in one file and ``environment: {A: 2}`` in the next merge by name, and
``ports``/``volumes`` entries compare by what they mean, not by how they were written:

- ``environment`` -> ``{NAME: str or None}`` (None: take it from the environment);
- ``depends_on`` -> ``{name: {condition, required, restart}}``; ``networks`` -> ``{name: {...}}``;
- ``env_file`` -> ``[{path, required, format}]``; ``tmpfs``, ``dns``... -> lists;
- ``ports`` -> one ``{target, published, host_ip, protocol}`` per container port (ranges expanded);
- ``expose`` -> one ``{target, protocol}`` per port;
- ``volumes`` -> ``{type, source, target, read_only, ...}``;
- ``secrets``/``configs`` -> ``{source, target, ...}``, the target made absolute.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from pytest_envbox.compose.yamlfile import Override, Reset
from pytest_envbox.errors import ConfigError
from pytest_envbox.validate import describe, is_int, is_number

__all__ = ["compose_bytes", "compose_duration", "normalise_service"]

Fail = Callable[[str, str], ConfigError]

_BYTES = re.compile(r"(\d+(?:\.\d+)?)\s*([bkmgt]?)b?", re.IGNORECASE)
_BYTE_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PORT = re.compile(r"(\d{1,5})(?:-(\d{1,5}))?")


def compose_bytes(value: object, key: str, fail: Fail) -> int:
    """Bytes as Compose writes them: an int, or ``"512m"``, ``"1g"``, ``"300mb"``, ``"2048k"``
    (binary units, any case, as Docker reads them: ``1g`` is 2**30 bytes)."""
    if is_int(value) and value > 0:
        return value
    if isinstance(value, str) and (m := _BYTES.fullmatch(value.strip())):
        size = int(float(m[1]) * _BYTE_UNITS[m[2].lower()])
        if size > 0:
            return size
    raise fail(f"{describe(value)} is not a byte value; write bytes as an int or a string like "
               "'512m', '1g', '300mb' (b, k, m, g: binary units)", key)  # fmt: skip


def compose_duration(value: object, key: str, fail: Fail) -> float:
    """Seconds from a Compose duration: ``"1m30s"``, ``"10s"``, ``"1h2m3.5s"``, ``"500ms"``,
    ``"2us"`` (Go's units, combined without separators); a bare number is seconds."""
    if is_number(value) and value >= 0:
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        parts = _DURATION_PART.findall(text)
        if parts and "".join(n + u for n, u in parts) == text:
            return sum(float(n) * _DURATION_UNITS[u] for n, u in parts)
    raise fail(f"{describe(value)} is not a duration; write it like '10s', '1m30s', '500ms' "
               "(units h, m, s, ms, us, ns)", key)  # fmt: skip


def _scalar(value: object) -> str | None:
    """An environment value as a string: YAML's true/false as Compose writes them, numbers too."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _environment(value: object, fail: Fail) -> dict[str, Any]:
    if isinstance(value, dict):  # a !reset entry stays, for the merge to remove
        return {str(k): v if isinstance(v, Reset) else _scalar(v) for k, v in value.items()}
    if isinstance(value, list):
        out: dict[str, str | None] = {}
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise fail(f"{describe(item)} is not NAME=VALUE", f"environment[{i}]")
            name, eq, val = item.partition("=")
            out[name] = val if eq else None
        return out
    raise fail(f"{describe(value)} is neither a list of NAME=VALUE nor a mapping", "environment")


def _depends_on(value: object, fail: Fail) -> dict[str, Any]:
    if isinstance(value, list):
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise fail(f"{describe(item)} is not a service name", f"depends_on[{i}]")
        return {name: {"condition": "service_started"} for name in value}
    if isinstance(value, dict):
        return {str(k): {} if v is None else v for k, v in value.items()}
    raise fail(f"{describe(value)} is neither a list of services nor a mapping", "depends_on")


def _names_map(value: object, key: str, fail: Fail) -> dict[str, Any]:
    if isinstance(value, list):
        return {str(item): None for item in value}
    if isinstance(value, dict):
        return dict(value)
    raise fail(f"{describe(value)} is neither a list nor a mapping", key)


def _env_files(value: object, fail: Fail) -> list[dict[str, Any]]:
    items = value if isinstance(value, list) else [value]
    out = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            out.append({"path": item, "required": True})
        elif isinstance(item, dict) and isinstance(item.get("path"), str):
            out.append({"required": True, **item})
        else:
            raise fail(f"{describe(item)} is not a file path or {{path: ...}}", f"env_file[{i}]")
    return out


def _port_span(text: str, key: str, fail: Fail) -> list[int]:
    m = _PORT.fullmatch(text.strip())
    if m is None:
        raise fail(f"{text!r} is not a port or a range of ports like '8000-8010'", key)
    low, high = int(m[1]), int(m[2] or m[1])
    if not 1 <= low <= high <= 65535:
        raise fail(f"{text!r} is not a port from 1 to 65535 (or a range, low end first)", key)
    return list(range(low, high + 1))


def _ports(value: object, fail: Fail) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise fail(f"{describe(value)} is not a list of ports", "ports")
    out: list[dict[str, Any]] = []
    for i, item in enumerate(value):
        key = f"ports[{i}]"
        if is_int(item):
            out.append({"target": item, "protocol": "tcp"})
        elif isinstance(item, str):
            spec, _, protocol = item.strip().partition("/")
            host, colon, container = spec.rpartition(":")
            host_ip, _, published = host.rpartition(":") if colon else ("", "", "")
            for target in _port_span(container, key, fail):
                out.append({"target": target, "published": published or None,
                            "host_ip": host_ip.strip("[]") or None,
                            "protocol": protocol.lower() or "tcp"})  # fmt: skip
        elif isinstance(item, dict):
            given: object = item.get("target")
            if not (is_int(given) or isinstance(given, str)):
                raise fail(f"{describe(given)} is not a container port; give target: 80", f"{key}.target")
            for port in _port_span(str(given), f"{key}.target", fail):
                out.append({**item, "target": port, "protocol": str(item.get("protocol", "tcp")).lower()})
        else:
            raise fail(f"{describe(item)} is not a port; write '8080:80', '80' or {{target: 80}}", key)
    return out


def _expose(value: object, fail: Fail) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise fail(f"{describe(value)} is not a list of ports", "expose")
    out = []
    for i, item in enumerate(value):
        spec, _, protocol = str(item).strip().partition("/")
        for port in _port_span(spec, f"expose[{i}]", fail):
            out.append({"target": port, "protocol": protocol.lower() or "tcp"})
    return out


def _volume(item: object, key: str, fail: Fail) -> dict[str, Any]:
    """A ``volumes`` entry in its long form; the short form ``SOURCE:TARGET[:MODE]``."""
    if isinstance(item, dict):
        if not isinstance(item.get("target"), str):
            raise fail(f"{describe(item.get('target'))} is not a path inside the container",
                       f"{key}.target")  # fmt: skip
        return dict(item)
    if not isinstance(item, str):
        raise fail(f"{describe(item)} is not a volume; write './data:/data:ro' or a mapping", key)
    parts = item.split(":")
    if len(parts) == 1:  # an anonymous volume at that path
        return {"type": "volume", "source": None, "target": parts[0]}
    if len(parts) > 3:
        raise fail(f"{item!r} is not SOURCE:TARGET[:MODE]", key)
    source, target, mode = parts[0], parts[1], parts[2] if len(parts) == 3 else ""
    options = set(mode.split(",")) - {""}
    unknown = options - {"ro", "rw", "z", "Z", "cached", "delegated", "consistent", "nocopy"}
    if unknown:
        raise fail(f"{item!r} has the mode {mode!r}; use 'ro' or 'rw'", key)
    bind = source.startswith((".", "/", "~")) or "/" in source
    return {"type": "bind" if bind else "volume", "source": source, "target": target,
            "read_only": "ro" in options}  # fmt: skip


def _grants(value: object, key: str, fail: Fail) -> list[dict[str, Any]]:
    """``secrets``/``configs`` entries as ``{source, target, ...}``; the target defaults to
    ``/run/secrets/SOURCE`` (a relative secret target is under ``/run/secrets``) or ``/SOURCE``."""
    out = []
    for i, item in enumerate(_list(value)):
        entry = {"source": item} if isinstance(item, str) else item
        if not isinstance(entry, dict) or not isinstance(entry.get("source"), str):
            raise fail(f"{describe(item)} is not a {key[:-1]} name nor {{source: NAME, target: PATH}}",
                       f"{key}[{i}]")  # fmt: skip
        target = str(entry.get("target") or entry["source"])
        if key == "secrets" and not target.startswith("/"):
            target = f"/run/secrets/{target}"
        elif not target.startswith("/"):
            target = f"/{target}"
        out.append({**entry, "target": target})
    return out


def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else [value]


_FORMS: dict[str, Callable[[object, Fail], object]] = {
    "environment": _environment,
    "depends_on": _depends_on,
    "networks": lambda v, f: _names_map(v, "networks", f),
    "env_file": _env_files,
    "ports": _ports,
    "expose": _expose,
    "volumes": lambda v, f: [_volume(x, f"volumes[{i}]", f) for i, x in enumerate(_list(v))],
    "tmpfs": lambda v, f: _list(v),
    "dns": lambda v, f: _list(v),
    "dns_search": lambda v, f: _list(v),
    "profiles": lambda v, f: _list(v),
    "secrets": lambda v, f: _grants(v, "secrets", f),
    "configs": lambda v, f: _grants(v, "configs", f),
}


def normalise_service(body: dict[str, Any], fail: Fail) -> dict[str, Any]:
    """A service's mapping with the short forms above rewritten in their long forms.

    ``fail(message, key)`` builds the error for a malformed value. ``!override`` values are
    normalised inside their marker; ``!reset`` is left for the merge.
    """
    out: dict[str, Any] = {}
    for key, value in body.items():
        form = _FORMS.get(key)
        if form is None or value is None or isinstance(value, Reset):
            out[key] = value
        elif isinstance(value, Override):
            out[key] = Override(form(value.value, fail))
        else:
            out[key] = form(value, fail)
    return out
