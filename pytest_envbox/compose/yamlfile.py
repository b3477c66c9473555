"""Reading one compose file: PyYAML's safe loader, imported only when a compose file is read.

PyYAML costs 15 to 18 ms to import (``python -X importtime -c "import yaml"``, PyYAML 6.0.3 with
libyaml), which a project without compose files should never pay, so nothing imports it at module
level. The loader is PyYAML's safe loader, libyaml's ``CSafeLoader`` when PyYAML was built with it
(reading Airflow's 13 kB compose file then takes 5 ms instead of 19), else ``SafeLoader``: no
Python objects, no arbitrary tags; it is extended only with the two tags the
Compose Specification defines for override files, ``!reset`` and ``!override`` (see
:mod:`pytest_envbox.compose.merge`); any other tag is an error, as with ``yaml.safe_load``.
Anchors, aliases and merge keys (``<<: *base``) are YAML's own and resolved by the loader (merge
keys by this module, as the YAML type's definition says: see ``flatten_mapping``).
Plain scalars are typed as YAML 1.2 does (Compose's Go parser): see :func:`_loader`.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pytest_envbox.errors import ConfigError

__all__ = ["Override", "Reset", "YamlError", "read_yaml", "read_yaml_documents"]


class YamlError(ConfigError):
    """A file that is not valid YAML, or holds a tag the safe loader does not construct: ``file``,
    and the ``line`` and ``column`` (from 1) where the parser stopped, when it said so."""

    def __init__(self, message: str, *, file: Path, line: int | None = None,
                 column: int | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.file, self.line, self.column = file, line, column


class Reset:
    """``!reset``: the attribute is removed from what earlier files declared."""

    def __repr__(self) -> str:
        return "!reset"


@dataclass(frozen=True)
class Override:
    """``!override VALUE``: the attribute replaces the earlier one instead of merging with it."""

    value: object


_BOOL, _INT, _FLOAT = ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:int",
                       "tag:yaml.org,2002:float")  # fmt: skip


def _flatten_mapping(yaml: Any, self: Any, node: Any) -> None:
    """Merge keys as YAML defines them (https://yaml.org/type/merge.html): the mapping's own keys
    win, then of ``<<: [a, b]`` the earlier mapping, as in Compose's Go parser. Written here
    because PyYAML 6.0.4 changed its own to keep a later mapping's value when the keys are
    distinct string objects (6.0.3 followed the spec). Nodes are told apart by their ``id``, not
    their class: libyaml's parser makes the node classes of the first ``yaml`` module imported, and
    a re-imported one (pytester's in-process runs) has others."""
    merge: list[tuple[Any, Any]] = []
    index = 0
    while index < len(node.value):
        key_node, value_node = node.value[index]
        if key_node.tag == "tag:yaml.org,2002:merge":
            del node.value[index]
            if value_node.id == "mapping":
                self.flatten_mapping(value_node)
                merge.extend(value_node.value)
            elif value_node.id == "sequence":
                each = []
                for sub in value_node.value:
                    if sub.id != "mapping":
                        raise yaml.constructor.ConstructorError(
                            "while constructing a mapping", node.start_mark,
                            f"expected a mapping for merging, but found {sub.id}",
                            sub.start_mark)  # fmt: skip
                    self.flatten_mapping(sub)
                    each.append(sub.value)
                for pairs in reversed(each):  # later pairs win: the first mapping last
                    merge.extend(pairs)
            else:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark, "expected a mapping "
                    f"or list of mappings for merging, but found {value_node.id}",
                    value_node.start_mark)  # fmt: skip
        elif key_node.tag == "tag:yaml.org,2002:value":
            key_node.tag = "tag:yaml.org,2002:str"
            index += 1
        else:
            index += 1
    if merge:
        node.value = merge + node.value


@functools.cache
def _loader() -> type[Any]:
    import yaml

    # libyaml's parser when PyYAML was built with it (several times faster), else the Python one;
    # either way the safe constructor: plain data only.
    base = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

    class ComposeLoader(base):  # type: ignore[valid-type,misc]
        """SafeLoader plus ``!reset`` and ``!override``; nothing else is constructed."""

        def flatten_mapping(self, node: Any) -> None:
            _flatten_mapping(yaml, self, node)

    def reset(loader: yaml.SafeLoader, node: yaml.Node) -> Reset:
        return Reset()

    def override(loader: yaml.SafeLoader, node: yaml.Node) -> Override:
        if isinstance(node, yaml.MappingNode):
            return Override(loader.construct_mapping(node, deep=True))
        if isinstance(node, yaml.SequenceNode):
            return Override(loader.construct_sequence(node, deep=True))
        return Override(loader.construct_scalar(node))  # type: ignore[arg-type]

    # YAML 1.2's core schema, as Compose's Go parser reads files: `yes`/`on` stay strings,
    # "22:22" is no base-60 int (1342), "0755" no octal; only true/false are booleans.
    ComposeLoader.yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in rules if tag not in (_BOOL, _INT, _FLOAT)]
        for first, rules in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    ComposeLoader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                        list("tTfF"))  # fmt: skip
    ComposeLoader.add_implicit_resolver(_INT, re.compile(r"^(?:[-+]?(?:0|[1-9][0-9]*)|0x[0-9a-fA-F]+)$"),
                                        list("-+0123456789"))  # fmt: skip
    ComposeLoader.add_implicit_resolver(_FLOAT, re.compile(
        r"^(?:[-+]?(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?|[-+]?[0-9]+[eE][-+]?[0-9]+"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"), list("-+0123456789."))  # fmt: skip
    ComposeLoader.add_constructor("!reset", reset)
    ComposeLoader.add_constructor("!override", override)
    return ComposeLoader


def _text(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} {path} is not UTF-8 text ({exc}); save it as UTF-8") from None


def _syntax_error(path: Path, exc: Exception) -> ConfigError:
    import yaml

    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
        line, column = (mark.line + 1, mark.column + 1) if mark else (None, None)
        what = " ".join(p for p in (exc.context, exc.problem) if p)
        if isinstance(exc, yaml.constructor.ConstructorError):
            # A tag such as !!python/object: the safe loader builds plain data only, never objects.
            return YamlError(f"{where}: a tag envbox does not read: {what}; YAML is read as plain "
                             "data (PyYAML safe loading), so remove the tag", file=path, line=line,
                             column=column)  # fmt: skip
        return YamlError(f"{where}: not valid YAML: {what}; fix its syntax", file=path, line=line,
                         column=column)  # fmt: skip
    return YamlError(f"{path}: not valid YAML: {exc}; fix its syntax", file=path)


def read_yaml(path: Path) -> object:
    """The document in ``path``; malformed YAML is a :class:`ConfigError` with line and column."""
    import yaml

    text = _text(path, "compose file")
    try:
        # A SafeLoader subclass: yaml.load with it is exactly yaml.safe_load plus two inert tags.
        return yaml.load(text, Loader=_loader())
    except yaml.YAMLError as exc:
        raise _syntax_error(path, exc) from None


@functools.cache
def _manifest_loader() -> type[Any]:
    import yaml

    class ManifestLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
        """PyYAML's safe loader, with merge keys as YAML defines them (see _flatten_mapping)."""

        def flatten_mapping(self, node: Any) -> None:
            _flatten_mapping(yaml, self, node)

    return ManifestLoader


def read_yaml_documents(path: Path, *, what: str) -> list[object]:
    """Every document of a multi-document file (``---`` between them), empty ones included as None.

    PyYAML's own safe loader (libyaml's when built with it), without the Compose tags and with
    YAML 1.1 typing: Kubernetes reads manifests with go-yaml v2, which is YAML 1.1 too
    (``defaultMode: 0644`` is octal 420, ``yes`` a boolean). ``what`` names the file in errors
    ("Kubernetes manifest"); malformed YAML is a :class:`ConfigError` with line and column.
    """
    import yaml

    text = _text(path, what)
    try:
        return list(yaml.load_all(text, Loader=_manifest_loader()))
    except yaml.YAMLError as exc:
        raise _syntax_error(path, exc) from None
