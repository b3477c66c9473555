"""Variable interpolation and ``.env`` files, as the Compose Specification defines them.

``$VAR`` and ``${VAR}``; ``${VAR:-default}`` (unset or empty), ``${VAR-default}`` (unset);
``${VAR:?error}`` / ``${VAR?error}`` (a :class:`ConfigError` naming the file, the service, the
key and the message); ``${VAR:+alt}`` / ``${VAR+alt}`` (``alt`` when set and non-empty / set);
defaults nest (``${A:-${B:-x}}``); ``$$`` is a literal ``$``. An unset variable without a default
becomes the empty string and a warning, as ``docker compose`` warns. A ``$`` that starts none of
these (``$1``, ``${A/x/y}``) is an error, as in Compose: write ``$$`` for a literal one.

Interpolation applies to values, never to keys, per file before files are merged.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pytest_envbox.compose.yamlfile import Override
from pytest_envbox.errors import ConfigError

__all__ = ["ComposeError", "Place", "interpolate", "interpolate_tree", "lookup_in", "parse_env_file"]

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_OPERATORS = (":-", ":?", ":+", "-", "?", "+")


class ComposeError(ConfigError):
    """A :class:`ConfigError` about a compose file, its place (file, service, key) named."""

    def __init__(self, message: str, *, file: Path, service: str | None, key: str | None) -> None:
        super().__init__(f"{message} (in {file})", service=service, key=key or None)
        self.file = file


@dataclass
class Place:
    """Where a value sits, for messages: the file, the service (if any) and the key path."""

    file: Path
    service: str | None
    key: str
    warnings: list[str] = field(default_factory=list)

    def error(self, message: str) -> ConfigError:
        return ComposeError(message, file=self.file, service=self.service, key=self.key)


def interpolate(text: str, lookup: Callable[[str], str | None], place: Place) -> str:
    """``text`` with its variables substituted from ``lookup`` (None: the variable is unset)."""
    out, _ = _scan(text, 0, lookup, place, nested=False)
    return out


def _scan(text: str, i: int, lookup: Callable[[str], str | None], place: Place,
          nested: bool) -> tuple[str, int]:  # fmt: skip
    """Substitute from ``i`` to the end, or (``nested``) to the ``}`` closing a default."""
    parts: list[str] = []
    n = len(text)
    while i < n:
        c = text[i]
        if nested and c == "}":
            return "".join(parts), i
        if c != "$":
            parts.append(c)
            i += 1
            continue
        nxt = text[i + 1] if i + 1 < n else ""
        if nxt == "$":
            parts.append("$")
            i += 2
        elif nxt == "{":
            value, i = _braced(text, i + 2, lookup, place)
            parts.append(value)
        elif m := _NAME.match(text, i + 1):
            parts.append(_value(m[0], lookup, place))
            i = m.end()
        else:
            raise place.error(f"invalid interpolation in {text!r} at '$' (position {i}): write "
                              "${NAME}, $NAME, or $$ for a literal '$'")  # fmt: skip
    if nested:
        raise place.error(f"invalid interpolation in {text!r}: '${{' is never closed by '}}'")
    return "".join(parts), i


def _braced(text: str, i: int, lookup: Callable[[str], str | None], place: Place) -> tuple[str, int]:
    """``${NAME[op arg]}`` starting after ``${``; returns its value and the index after ``}``."""
    m = _NAME.match(text, i)
    if m is None:
        raise place.error(f"invalid interpolation in {text!r}: '${{' must be followed by a variable "
                          "name, as in ${NAME} or ${NAME:-default}")  # fmt: skip
    name, i = m[0], m.end()
    if i < len(text) and text[i] == "}":
        return _value(name, lookup, place), i + 1
    op = next((o for o in _OPERATORS if text.startswith(o, i)), None)
    if op is None:
        raise place.error(f"invalid interpolation in {text!r}: ${{{name} is followed by "
                          f"{text[i:i + 1]!r}; Compose knows ${{{name}}}, ${{{name}:-default}}, "
                          f"${{{name}-default}}, ${{{name}:?error}}, ${{{name}?error}}, "
                          f"${{{name}:+alt}} and ${{{name}+alt}}")  # fmt: skip
    # The argument is interpolated too (nested defaults); only its value is used when needed,
    # but a malformed one is an error either way, as in Compose.
    arg, end = _scan(text, i + len(op), lookup, place, nested=True)
    value = lookup(name)
    colon = op.startswith(":")
    missing = value is None or (colon and value == "")
    kind = op[-1]
    if kind == "-":
        result = arg if missing else value
    elif kind == "+":
        result = "" if missing else arg
    else:  # "?"
        if missing:
            why = "is not set" if value is None else "is empty"
            raise place.error(f"variable {name} {why}: {arg or 'it is required'}; set it in the "
                              "environment or in .env")  # fmt: skip
        result = value
    return result or "", end + 1


def _value(name: str, lookup: Callable[[str], str | None], place: Place) -> str:
    value = lookup(name)
    if value is None:
        where = f"service {place.service!r}, key {place.key!r}" if place.service else place.key
        place.warnings.append(f"variable {name} is not set; an empty string is used instead "
                              f"({place.file}, {where})")  # fmt: skip
        return ""
    return value


def interpolate_tree(doc: object, lookup: Callable[[str], str | None], file: Path,
                     warnings: list[str]) -> object:  # fmt: skip
    """A copy of a compose document with every string value interpolated (keys untouched).

    Top-level ``x-`` extension fields are skipped: they are templates, used through anchors (which
    YAML already copied where they are used), never read themselves.
    """

    def walk(value: object, path: list[str | int]) -> object:
        if isinstance(value, str):
            service = str(path[1]) if len(path) >= 2 and path[0] == "services" else None
            rest = path[2:] if service is not None else path
            place = Place(file, service, _key(rest), warnings)
            return interpolate(value, lookup, place)
        if isinstance(value, dict):
            return {k: walk(v, [*path, k]) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v, [*path, i]) for i, v in enumerate(value)]
        if isinstance(value, Override):
            return Override(walk(value.value, path))
        return value

    if isinstance(doc, dict):
        return {k: (v if str(k).startswith("x-") else walk(v, [k])) for k, v in doc.items()}
    return walk(doc, [])


def _key(path: list[str | int]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# --- .env files ----------------------------------------------------------------------------------

_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "\\": "\\", '"': '"', "$": "$$"}


def parse_env_file(path: Path, lookup: Callable[[str], str | None], *, raw: bool = False,
                   service: str | None = None, key: str = ".env") -> dict[str, str]:  # fmt: skip
    """The variables of an env file (``.env`` or an ``env_file``), in Compose's syntax.

    ``VAR=VAL``, ``export VAR=VAL``, ``# comments``, blank lines; single quotes literal, double
    quotes with ``\\n \\t \\r \\\\ \\"`` escapes (and may span lines); unquoted and double-quoted
    values are interpolated, from the variables defined above in the same file first, then
    ``lookup``; an inline comment needs a space before its ``#``. ``VAR`` alone (no ``=``) is left
    out (unset). ``raw``: the value after ``=`` is taken as is (``format: raw``).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ComposeError(f"cannot read env file {path}: {exc.strerror or exc}", file=path,
                           service=service, key=key) from None  # fmt: skip
    found: dict[str, str] = {}

    def local(name: str) -> str | None:
        return found[name] if name in found else lookup(name)

    lines = text.splitlines()
    i = 0
    while i < len(lines):
        number, line = i + 1, lines[i].strip()
        i += 1
        if not line or line.startswith("#"):
            continue
        if line.startswith("export ") or line.startswith("export\t"):
            line = line[7:].lstrip()
        name, eq, value = line.partition("=")
        name = name.strip()
        if not _NAME.fullmatch(name):
            raise ComposeError(f"line {number}: {name!r} is not a variable name; write VAR=VALUE",
                               file=path, service=service, key=key)  # fmt: skip
        if not eq:
            continue
        value = value.lstrip()
        place = Place(path, service, f"{key} line {number}")
        if raw:
            found[name] = value
        elif value.startswith("'"):
            end = _closing(value, "'")
            while end < 0 and i < len(lines):
                value += "\n" + lines[i]
                i += 1
                end = _closing(value, "'")
            if end < 0:
                raise ComposeError(f"line {number}: the quote after {name}= is never closed",
                                   file=path, service=service, key=key)  # fmt: skip
            found[name] = value[1:end].replace("\\'", "'")
        elif value.startswith('"'):
            end = _closing(value, '"')
            while end < 0 and i < len(lines):
                value += "\n" + lines[i]
                i += 1
                end = _closing(value, '"')
            if end < 0:
                raise ComposeError(f"line {number}: the quote after {name}= is never closed",
                                   file=path, service=service, key=key)  # fmt: skip
            body = re.sub(r"\\(.)", lambda m: _ESCAPES.get(m[1], "\\" + m[1]), value[1:end])
            found[name] = interpolate(body, local, place)
        else:
            value = re.split(r"\s#", value, maxsplit=1)[0].rstrip()
            found[name] = interpolate(value, local, place)
    return found


def _closing(value: str, quote: str) -> int:
    """Index of the quote closing ``value[0]``, skipping backslash-escaped ones; -1 if none."""
    j = 1
    while j < len(value):
        if value[j] == "\\":
            j += 2
            continue
        if value[j] == quote:
            return j
        j += 1
    return -1


def lookup_in(*tables: Mapping[str, str]) -> Callable[[str], str | None]:
    """A lookup trying each table in turn (the first holding the name wins)."""

    def lookup(name: str) -> str | None:
        for table in tables:
            if name in table:
                return table[name]
        return None

    return lookup

