"""Checking what users write, one value at a time: quantities, durations, names, ports, lists.

Every check raises a :class:`~pytest_envbox.errors.ConfigError` naming the service, the exact key
and what is accepted instead; the spec classes (:mod:`pytest_envbox.spec`,
:mod:`pytest_envbox.probe`) are built from these.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import shlex
from collections.abc import Iterable, Mapping, Sequence
from decimal import ROUND_CEILING, Decimal
from typing import Any, NoReturn, TypeGuard

from pytest_envbox.errors import ConfigError, hide_frames

__tracebackhide__ = hide_frames  # an error in a declaration shows the user's line, not ours

__all__ = [
    "CPU_HELP",
    "CPU_MAX",
    "DNS_LABEL",
    "DURATION_HELP",
    "KERNEL_DIRS",
    "MEMORY_HELP",
    "MEMORY_MAX",
    "NAME_HELP",
    "PIDS_MAX",
    "USER",
    "argv",
    "as_list",
    "as_mapping",
    "check_keys",
    "check_mount_source",
    "check_name",
    "describe",
    "fail",
    "is_int",
    "is_number",
    "parse_cpu",
    "parse_duration",
    "parse_memory",
    "parse_subnet",
    "port",
    "positive_duration",
    "real_source",
    "text",
]

#: A service, alias or topology name: it becomes a hostname on the private network.
#: Anchored with ``\A``/``\Z`` so ``match``, ``search`` and ``fullmatch`` all check the whole name.
DNS_LABEL = re.compile(r"\A[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")

_ID = r"(?:[a-z_][a-z0-9_.-]*\$?|\d+)"
#: A user as Docker and Compose write it: a name or uid, optionally ``:group`` (name or gid).
USER = re.compile(rf"\A{_ID}(?::{_ID})?\Z")

# Binary and decimal suffixes as Kubernetes spells them; "K" is accepted beside Kubernetes' "k"
# because people write it.
_MEMORY_UNITS = {
    "": 1,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
    "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
}  # fmt: skip
_MEMORY = re.compile(r"(\d+(?:\.\d+)?)([A-Za-z]*)")
_CPU = re.compile(r"(\d+(?:\.\d+)?)(m?)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")

#: The largest memory limit: the kernel reads it into a signed 64-bit count of bytes.
MEMORY_MAX = 2**63 - 1
#: The largest cpu limit, in cores: far more than any machine has, and well inside what the
#: kernel's CFS bandwidth control takes (a quota of at most 2**44 - 1 microseconds per period).
CPU_MAX = 1_000_000
#: The largest pid limit: ``pids.max`` refuses more than the kernel's ``PID_MAX_LIMIT``.
PIDS_MAX = 2**22

MEMORY_HELP = 'use bytes as an int or a string like "64Mi", "1Gi", "500M"'
CPU_HELP = 'use cores as a number (0.5, 2) or millicores as a string like "250m"'
DURATION_HELP = 'use seconds as a number or a string like "500ms", "10s", "2m", "1h"'
NAME_HELP = (
    "use a DNS label: 1 to 63 lowercase letters, digits or '-', "
    "starting and ending with a letter or digit"
)


# --- small checks shared by every spec -----------------------------------------------------------


def fail(message: str, service: str | None, key: str | None) -> NoReturn:
    raise ConfigError(message, service=service, key=key)


def is_int(value: object) -> TypeGuard[int]:
    # bool is an int subclass; `ports = [true]` is a mistake, never port 1.
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> TypeGuard[int | float]:
    return (is_int(value) or isinstance(value, float)) and math.isfinite(value)


def describe(value: object) -> str:
    """``'80' (a str)``: shows both the value and its type, for wrong-type messages."""
    name = type(value).__name__
    return f"{value!r} ({'an' if name[:1] in 'aeiou' else 'a'} {name})"


def as_list(value: object, service: str | None, key: str, example: str) -> Sequence[object]:
    """A list or tuple, but not a str: ``ports = "80"`` would otherwise iterate characters."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        fail(f"{describe(value)} is not a list; write it as {example}", service, key)
    return value


def as_mapping(
    value: object, service: str | None, key: str | None, example: str
) -> Mapping[Any, object]:
    if not isinstance(value, Mapping):
        fail(f"{describe(value)} is not a table; write it as {example}", service, key)
    return value


def text(value: object, service: str | None, key: str, what: str) -> str:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value:
        fail(f"{describe(value)} is not a valid {what}; use a non-empty string", service, key)
    if "\0" in value:
        fail(f"{value!r} contains a NUL character, which no {what} may hold", service, key)
    return value


def check_keys(
    given: Iterable[object], accepted: Sequence[str], service: str | None, prefix: str
) -> None:
    """Reject unknown keys, suggesting the closest accepted one: typos are the usual cause."""
    for key in given:
        if key in accepted:
            continue
        close = difflib.get_close_matches(str(key), accepted, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        fail(
            f"unknown key {str(key)!r}; {hint}accepted keys: {', '.join(accepted)}",
            service,
            f"{prefix}{key}",
        )


def argv(value: object, service: str | None, key: str) -> tuple[str, ...]:
    """A command line: a str is split like a shell would (no expansion), a list is taken as is."""
    if isinstance(value, str):
        try:
            parts = shlex.split(value)
        except ValueError as exc:  # unbalanced quotes
            fail(
                f"{value!r} cannot be split into arguments ({exc}); fix the quoting", service, key
            )
    else:
        items = as_list(value, service, key, '["program", "arg"] or "program arg"')
        for i, item in enumerate(items):
            if not isinstance(item, str):
                fail(
                    f"{describe(item)} is not a string; quote every argument", service, f"{key}[{i}]"
                )
        parts = list(items)  # type: ignore[arg-type]  # every item checked above
    if not parts or not parts[0]:
        fail("the command is empty; give at least the program to run", service, key)
    for i, part in enumerate(parts):
        if "\0" in part:
            fail(f"{part!r} contains a NUL character", service, f"{key}[{i}]")
    return tuple(parts)


def port(value: object, service: str | None, key: str) -> int:
    if not is_int(value) or not 1 <= value <= 65535:
        fail(f"{describe(value)} is not a port; use an int from 1 to 65535", service, key)
    return value


def parse_subnet(value: object, *, key: str = "subnet") -> str:
    """An environment's private IPv4 network, ``"198.18.0.0/24"``: checked, in its normal form."""
    import ipaddress

    if not isinstance(value, str):
        raise ConfigError(f"{describe(value)} is not a subnet; write it as a string, e.g. "
                          "'198.18.0.0/24'", key=key)  # fmt: skip
    try:
        net = ipaddress.IPv4Network(value, strict=True)
    except ValueError as e:
        raise ConfigError(f"{value!r} is not an IPv4 subnet ({e}); write an address and a prefix "
                          "length, e.g. '198.18.0.0/24'", key=key) from None  # fmt: skip
    if net.prefixlen > 29:
        raise ConfigError(f"subnet {value!r} is too small for an environment; use a /29 or "
                          "larger, e.g. '198.18.0.0/24'", key=key)  # fmt: skip
    for special, what in _SPECIAL_NETS:
        if net.overlaps(ipaddress.IPv4Network(special)):
            raise ConfigError(f"subnet {value!r} overlaps {special}, {what}; {_SUBNET_HELP}",
                              key=key)  # fmt: skip
    if not any(net.subnet_of(ipaddress.IPv4Network(ok)) for ok in _PRIVATE_NETS):
        raise ConfigError(f"subnet {value!r} is public address space, which belongs to real "
                          f"hosts; {_SUBNET_HELP}", key=key)  # fmt: skip
    return str(net)


# Addresses a service's network must not take: the kernel gives them a meaning of their own
# (127/8 is everyone's loopback, a multicast or broadcast address is no host).
_SPECIAL_NETS = (
    ("0.0.0.0/8", "the unspecified network"), ("127.0.0.0/8", "the loopback network"),
    ("169.254.0.0/16", "the link-local network"), ("224.0.0.0/4", "the multicast range"),
    ("240.0.0.0/4", "the reserved range with the broadcast address"),
)  # fmt: skip
# Where a private network may be: RFC 1918, shared (RFC 6598), benchmarking (RFC 2544) and the
# documentation networks (RFC 5737). Never routed on the Internet, so no real host is shadowed.
_PRIVATE_NETS = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10",
                 "198.18.0.0/15", "192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24")  # fmt: skip
_SUBNET_HELP = ("use a private range (10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, "
                "100.64.0.0/10 or 198.18.0.0/15), e.g. '198.18.0.0/24'")  # fmt: skip


def check_name(
    name: object, *, what: str = "service", service: str | None = None, key: str | None = None
) -> str:
    """Return ``name`` if it is a DNS label, else raise a :class:`ConfigError` suggesting one.

    Names become hostnames in ``/etc/hosts`` of every service, hence the DNS rules.

    >>> check_name("shop-api")
    'shop-api'
    """
    if isinstance(name, str) and DNS_LABEL.match(name):
        return name
    message = f"{describe(name) if not isinstance(name, str) else repr(name)} is not a valid {what}"
    message += f" name; {NAME_HELP}"
    if isinstance(name, str):
        candidate = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:63].strip("-")
        if candidate and DNS_LABEL.match(candidate):
            message += f", e.g. {candidate!r}"
    fail(message, service, key)


#: Host directories no mount may take its source from (see :func:`check_mount_source`).
KERNEL_DIRS = ("/proc", "/sys", "/dev")


def check_mount_source(source: str, service: str | None, key: str) -> None:
    """Refuse a source that would hand the service the host kernel's files or leave the rootdir.

    ``/proc``, ``/sys`` and ``/dev`` are the host kernel's own interfaces (writing
    ``/proc/sys/kernel/core_pattern`` or a cgroup's ``release_agent`` runs a program as root on
    the host; a device node reaches the hardware), so nothing under them is a source, read-only
    or not; nor is ``/``, whose recursive bind carries all three along (and every host file is
    visible read-only at its own path anyway). A relative source is a path below the rootdir:
    ``..`` may not climb out of it. Symbolic links are refused where the host is checked
    (:func:`~pytest_envbox.validate.real_source`).
    """
    if source.startswith("/"):
        normal = "/" + os.path.normpath(source).lstrip("/")
        if normal == "/":
            fail("mounting '/' would bring the host's /proc, /sys and /dev with it (and every host "
                 "file is already visible read-only at its own path); mount only the directory "
                 "you need, e.g. '/srv/data'", service, key)  # fmt: skip
        for kernel in KERNEL_DIRS:
            if normal == kernel or normal.startswith(kernel + "/"):
                fail(f"{source!r} is under {kernel}, the host kernel's own files, which no service "
                     "may be given; mount a regular file or directory instead", service, key)  # fmt: skip
    elif os.path.normpath(source).split("/")[0] == "..":
        fail(f"{source!r} climbs out of the rootdir; a relative source must stay inside it (to "
             "mount something outside, give its absolute path)", service, key)  # fmt: skip


def real_source(source: str, rootdir: str, service: str | None, key: str) -> str:
    """The host path of a mount source, checked on this host: it exists, and no symbolic link
    is on its way (below the rootdir, for a relative source).

    A link is refused, not followed: where a service can write, it could swap a directory for a
    link to any host path, and the link is what the next start would bind (see
    :mod:`pytest_envbox.sandbox.rootfs`). The plan holds a path without links, so such a swap is
    caught at every start. ``rootdir`` must be a real path itself (symbolic links resolved).
    """
    start = "/" if source.startswith("/") else rootdir
    path = os.path.normpath(os.path.join(start, source))
    if not os.path.lexists(path):
        fail(f"mount source {path!r} does not exist; give an existing file or directory "
             "(relative paths start at the rootdir)", service, key)  # fmt: skip
    parts = [p for p in path[len(start):].split("/") if p]
    for i in range(1, len(parts) + 1):
        here = os.path.join(start, *parts[:i])
        if os.path.islink(here):
            real = os.path.realpath(path)
            inside = real == rootdir or real.startswith(rootdir.rstrip("/") + "/")
            fix = os.path.relpath(real, rootdir) if inside and start != "/" else real
            fail(f"mount source {path!r} goes through a symbolic link ({here} -> "
                 f"{os.readlink(here)}), and a mount source is never followed through one; "
                 f"give the real path, {fix!r}", service, key)  # fmt: skip
    if not os.path.exists(path):
        fail(f"mount source {path!r} is not reachable; give an existing file or directory", service,
             key)  # fmt: skip
    check_mount_source(path, service, key)
    return path


# --- quantities and durations --------------------------------------------------------------------


def parse_memory(
    value: int | str, *, service: str | None = None, key: str = "limits.memory"
) -> int:
    """Bytes from an int or a Kubernetes quantity: ``"64Mi"`` is 64 * 2**20, ``"500M"`` 500e6.

    Fractions are allowed (``"1.5Gi"``) and rounded up to a whole byte, as Kubernetes does.
    """
    if is_int(value):
        if value > 0:
            return _memory_fits(value, value, service, key)
        fail(f"{value!r} is not a positive memory quantity; {MEMORY_HELP}", service, key)
    if isinstance(value, str):
        match = _MEMORY.fullmatch(value.strip())
        if match and match[2] in _MEMORY_UNITS:
            size = Decimal(match[1]) * _MEMORY_UNITS[match[2]]
            result = int(size.to_integral_value(rounding=ROUND_CEILING))
            if result > 0:
                return _memory_fits(value, result, service, key)
            fail(f"{value!r} is not a positive memory quantity; {MEMORY_HELP}", service, key)
        hint = _memory_hint(match[1], match[2]) if match else ""
        fail(f"{value!r} is not a memory quantity{hint}; {MEMORY_HELP}", service, key)
    fail(f"{describe(value)} is not a memory quantity; {MEMORY_HELP}", service, key)


def _memory_fits(value: int | str, size: int, service: str | None, key: str) -> int:
    # The kernel reads a limit into a signed 64-bit count of bytes; beyond it, the number written
    # to memory.max would wrap around into some small, surprising limit.
    if size > MEMORY_MAX:
        fail(f"{value!r} is more than the kernel can limit (at most {MEMORY_MAX} bytes, 8Ei - 1); "
             "give a smaller quantity, or no memory limit at all", service, key)  # fmt: skip
    return size


def _memory_hint(number: str, suffix: str) -> str:
    """Suggest the quantity meant by a near-miss suffix such as ``mi``, ``MB`` or ``GiB``."""
    base = suffix[:-1] if suffix[-1:] in ("b", "B") else suffix
    wanted = {base.lower(), base.lower() + "i"} if base else set()
    close = [u for u in _MEMORY_UNITS if u and u != "k" and u.lower() in wanted]
    quoted = [f'"{number}{unit}"' for unit in close]
    return f" (did you mean {' or '.join(quoted)}?)" if close else ""


def parse_cpu(value: float | str, *, service: str | None = None, key: str = "limits.cpu") -> float:
    """Cores from a number (``0.5``, ``2``) or Kubernetes millicores (``"250m"`` is 0.25)."""
    cores: float | None = None
    if is_number(value):
        cores = float(value)
    elif isinstance(value, str) and (match := _CPU.fullmatch(value.strip())):
        cores = float(match[1]) / (1000 if match[2] else 1)
    if cores is None or not cores > 0:
        shown = repr(value) if isinstance(value, (str, int, float)) else describe(value)
        qualifier = " positive" if cores is not None else ""
        fail(f"{shown} is not a{qualifier} cpu quantity; {CPU_HELP}", service, key)
    if cores > CPU_MAX:
        fail(f"{value!r} is more cores than a cpu limit may give (at most {CPU_MAX}); give "
             "fewer, or no cpu limit at all", service, key)  # fmt: skip
    return cores


def parse_duration(
    value: float | str, *, service: str | None = None, key: str = "duration"
) -> float:
    """Seconds from a number or a string like ``"500ms"``, ``"1.5s"``, ``"2m"``, ``"1m30s"``.

    A bare numeric string (``"10"``) means seconds, like a bare number.
    """
    if is_number(value) and value >= 0:
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        if _NUMBER.fullmatch(text):
            return float(text)
        parts = _DURATION_PART.findall(text)
        # findall skips what it cannot match; rebuilding the text proves nothing was skipped.
        if parts and "".join(n + u for n, u in parts) == text:
            return sum(float(n) * _DURATION_UNITS[u] for n, u in parts)
    shown = repr(value) if isinstance(value, (str, int, float)) else describe(value)
    fail(f"{shown} is not a duration; {DURATION_HELP}", service, key)


def positive_duration(value: float | str, service: str | None, key: str) -> float:
    seconds = parse_duration(value, service=service, key=key)
    if seconds <= 0:
        fail(f"{value!r} must be longer than zero; {DURATION_HELP}", service, key)
    return seconds


# --- limits and mounts ---------------------------------------------------------------------------
