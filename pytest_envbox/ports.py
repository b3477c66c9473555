"""Published ports as users write them: an int, a table, or a Compose-style string.

``ports = [6379]`` publishes port 6379 of the service on a free port of the host's 127.0.0.1,
chosen per environment. A host port can be fixed, or taken from a range, opt-in::

    ports = [
        6379,                                # a free host port (the default)
        { port = 6380, host = 6380 },        # exactly 127.0.0.1:6380
        { port = 80, host = "8000-8010" },   # the first free port of 8000..8010
        "5432:5432",                         # Compose's "HOST:PORT"
        "9000-9010:80",                      # a host range for one port
        "7000-7005:7000-7005",               # ranges of equal length: pairwise, 7000 -> 7000...
    ]

A declaration stores the service's ports as a tuple of ints (``Service.ports``, what code reads)
and the host side apart, as ``Service.host_ports``: port -> ``(low, high)``, a fixed port being a
range of one. Every check here raises a :class:`~pytest_envbox.errors.ConfigError` naming the
service, the key (``ports[1].host``) and the fix; whether a host port is free is only known
when the environment opens (see ``engine/hostports.py``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Protocol

from pytest_envbox.errors import ConfigError, hide_frames
from pytest_envbox.validate import as_list, as_mapping, check_keys, describe, fail, is_int
from pytest_envbox.validate import port as check_port

__tracebackhide__ = hide_frames  # an error in a declaration shows the user's line, not ours

__all__ = ["ENTRY_KEYS", "HostRange", "check_environment_host_ports", "host_text", "parse_host_ports",
           "parse_ports"]  # fmt: skip

#: The keys of a ``{ port = 80, host = 8080 }`` entry.
ENTRY_KEYS = ("port", "host")

#: A host port or range, inclusive: ``(6379, 6379)`` is exactly 6379.
HostRange = tuple[int, int]

_NUMBER = re.compile(r"\d{1,5}")
_RANGE = re.compile(r"(\d{1,5})\s*-\s*(\d{1,5})")
_PORT_HELP = "use an int from 1 to 65535"
_FORMS = ('write 6379 (a free host port), { port = 6379, host = 6379 }, '
          '{ port = 80, host = "8000-8010" } or "HOST:PORT" like "6379:6379"')  # fmt: skip


def _number(text: str, service: str | None, key: str, what: str) -> int:
    if not _NUMBER.fullmatch(text) or not 1 <= int(text) <= 65535:
        fail(f"{text!r} is not a {what}; {_PORT_HELP}", service, key)
    return int(text)


def _span(text: str, service: str | None, key: str, what: str) -> HostRange:
    """``"8000"`` or ``"8000-8010"`` as an inclusive range."""
    text = text.strip()
    m = _RANGE.fullmatch(text)
    if m is None:
        n = _number(text, service, key, what)
        return n, n
    low = _number(m[1], service, key, what)
    high = _number(m[2], service, key, what)
    if low > high:
        fail(f"{text!r} is backwards; write the low end first: '{high}-{low}'", service, key)
    return low, high


def _host(value: object, service: str | None, key: str) -> HostRange:
    """A host port: an int, ``"8000"``, ``"8000-8010"`` or a ``(low, high)`` pair."""
    if is_int(value):
        if not 1 <= value <= 65535:
            fail(f"{value!r} is not a host port; {_PORT_HELP}", service, key)
        return value, value
    if isinstance(value, str):
        return _span(value, service, key, "host port or range ('8000-8010')")
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(is_int(v) for v in value):
        return _span(f"{value[0]}-{value[1]}", service, key, "host range")
    fail(f'{describe(value)} is not a host port; use an int like 8080 or a range like '
         f'"8000-8010"', service, key)  # fmt: skip


def _entry(item: object, service: str | None, i: int) -> list[tuple[int, HostRange | None, str]]:
    """(port, host range or None, the key naming its host) for each port one entry declares."""
    key = f"ports[{i}]"
    if is_int(item):
        return [(check_port(item, service, key), None, key)]
    if isinstance(item, Mapping):
        table = as_mapping(item, service, key, "{ port = 6379, host = 6379 }")
        check_keys(table, ENTRY_KEYS, service, f"{key}.")
        if "port" not in table:
            fail("is missing; write the entry as { port = 6379, host = 6379 }", service,
                 f"{key}.port")  # fmt: skip
        port = check_port(table["port"], service, f"{key}.port")
        host = table.get("host")
        return [(port, None if host is None else _host(host, service, f"{key}.host"), f"{key}.host")]
    if isinstance(item, str):
        return _compose(item, service, key)
    fail(f"{describe(item)} is not a port; {_FORMS}", service, key)


def _compose(text: str, service: str | None, key: str) -> list[tuple[int, HostRange | None, str]]:
    """Compose's short syntax, ``"HOST:PORT"``: each side a number or a range."""
    spec = text.strip()
    if spec.endswith("/udp"):
        fail(f"{text!r} is a UDP port; only TCP ports are published", service, key)
    spec = spec.removesuffix("/tcp")
    parts = spec.split(":")
    if len(parts) == 1:
        fail(f"{text!r} (a str) is not a port; {_PORT_HELP}, or write \"HOST:{spec}\" to fix "
             "its host port", service, key)  # fmt: skip
    if len(parts) > 2:
        fail(f"{text!r} names a host address; ports are published on 127.0.0.1 only: write "
             f"'{':'.join(parts[-2:])}'", service, key)  # fmt: skip
    host_text, port_text = parts
    if not host_text.strip():
        fail(f"{text!r} has no host port; write {port_text.strip() or 'the port'} as an int for a "
             "free host port", service, key)  # fmt: skip
    ports = _span(port_text, service, key, "port or port range")
    hosts = _span(host_text, service, key, "host port or range")
    if ports[0] == ports[1]:
        return [(ports[0], hosts, key)]
    if hosts[1] - hosts[0] != ports[1] - ports[0]:
        fail(f"{text!r} maps {ports[1] - ports[0] + 1} ports onto {hosts[1] - hosts[0] + 1} host "
             "ports; a port range needs a host range of the same length, e.g. "
             f"'{ports[0]}-{ports[1]}:{ports[0]}-{ports[1]}'", service, key)  # fmt: skip
    return [(p, (hosts[0] + k, hosts[0] + k), key) for k, p in enumerate(range(ports[0], ports[1] + 1))]


def parse_ports(
    value: object, service: str | None, kept: Mapping[int, HostRange] | None = None
) -> tuple[tuple[int, ...], dict[int, HostRange]]:
    """The ports of a ``ports`` declaration, and the host range of each that gives one.

    ``kept``: host ranges already known (``Service.host_ports``, or what ``with_changes`` keeps)
    for ports that the entries give without a host; a host in an entry wins. A port listed twice,
    or one fixed host port given to two ports, is a :class:`ConfigError`.
    """
    entries = as_list(value, service, "ports", "ports = [8000]")
    ports: list[int] = []
    hosts: dict[int, HostRange] = {}
    keys: dict[int, str] = {}
    for i, item in enumerate(entries):
        for port, host, host_key in _entry(item, service, i):
            if port in keys:
                fail(f"{port!r} is listed twice; list it once", service, f"ports[{i}]")
            ports.append(port)
            keys[port] = host_key
            if host is not None:
                hosts[port] = host
    for port, host in (kept or {}).items():
        if port not in keys:
            fail(f"{port!r} has a host port but is not in ports; add it to ports, or remove it",
                 service, f"host_ports[{port}]")  # fmt: skip
        if port not in hosts:
            hosts[port] = host
            keys[port] = f"host_ports[{port}]"
    fixed: dict[int, int] = {}
    for port in ports:
        low, high = hosts.get(port, (0, -1))
        if low == high:
            if low in fixed:
                fail(f"host port {low} is given to port {fixed[low]} already; give each port its "
                     "own host port, or a range", service, keys[port])  # fmt: skip
            fixed[low] = port
    return tuple(ports), {p: hosts[p] for p in ports if p in hosts}


def parse_host_ports(value: object, service: str | None) -> dict[int, HostRange]:
    """``host_ports`` as given to :class:`~pytest_envbox.Service`: port -> host port or range."""
    table = as_mapping(value if value is not None else {}, service, "host_ports",
                       '{6379: 6379, 80: "8000-8010"}')  # fmt: skip
    out: dict[int, HostRange] = {}
    for port, host in table.items():
        key = f"host_ports[{port!r}]"
        out[check_port(port, service, key)] = _host(host, service, key)
    return out


def host_text(host: HostRange) -> str:
    """``"6379"`` or ``"8000-8010"``."""
    return str(host[0]) if host[0] == host[1] else f"{host[0]}-{host[1]}"


class _Declared(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def ports(self) -> tuple[int, ...]: ...
    @property
    def host_ports(self) -> Mapping[int, HostRange]: ...


def check_environment_host_ports(services: Iterable[_Declared]) -> None:
    """One fixed host port, one service: two services of an environment cannot both be
    published on ``127.0.0.1:6379`` (ranges may overlap: each takes a free port of its own)."""
    owners: dict[int, tuple[str, int]] = {}
    for service in services:
        for i, port in enumerate(service.ports):
            low, high = service.host_ports.get(port, (0, -1))
            if low != high:
                continue
            owner = owners.setdefault(low, (service.name, port))
            if owner[0] != service.name:
                raise ConfigError(
                    f"host port {low} (for port {port}) is also given to service {owner[0]!r} "
                    f"(for its port {owner[1]}) in this environment; give one of them another "
                    f"host port, a range like \"{low}-{min(low + 10, 65535)}\", or none",
                    service=service.name, key=f"ports[{i}].host",
                )  # fmt: skip
