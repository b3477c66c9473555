"""Several compose files merged in order, as ``docker compose -f a.yaml -f b.yaml`` does.

The Compose Specification's rules ("Merge and override"): mappings are merged key by key, a
later scalar replaces an earlier one, sequences are appended; except ``command``, ``entrypoint``
and ``healthcheck.test``, which the later file replaces, and the sequences whose entries are
unique by a key, where a later entry replaces the earlier one with the same key: ``volumes``
(by ``target``), ``ports`` (by ip, target, published and protocol), ``secrets`` and ``configs``
(by target). Other sequences (``expose``, ``dns``, ``profiles``...) drop repeated entries.
``!reset`` removes what earlier files set; ``!override VALUE`` replaces it without merging.

Files are normalised first (:func:`.forms.normalise_service`), so list and mapping forms of
``environment``, ``depends_on`` and ``networks`` merge by name.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pytest_envbox.compose.yamlfile import Override, Reset

__all__ = ["merge_service", "strip_markers"]

#: Replaced, never merged: the later file's value is the whole value.
_REPLACED = {("command",), ("entrypoint",), ("healthcheck", "test")}


def _unique_key(key: tuple[str, ...]) -> Callable[[Any], object] | None:
    if key in (("volumes",), ("secrets",), ("configs",)):
        return lambda item: item.get("target") if isinstance(item, dict) else item
    if key == ("ports",):
        return lambda item: (item.get("host_ip"), item.get("target"), item.get("published"),
                             item.get("protocol")) if isinstance(item, dict) else item  # fmt: skip
    return None


def _merge(old: Any, new: Any, path: tuple[str, ...]) -> Any:
    if isinstance(new, Override):
        return strip_markers(new.value)
    if path in _REPLACED:
        return strip_markers(new)
    if isinstance(old, dict) and isinstance(new, dict):
        merged = dict(old)
        for key, value in new.items():
            if isinstance(value, Reset):
                merged.pop(key, None)
            elif key in merged:
                merged[key] = _merge(merged[key], value, (*path, str(key)))
            else:
                merged[key] = strip_markers(value)
        return merged
    if isinstance(old, list) and isinstance(new, list):
        unique = _unique_key(path)
        if unique is not None:
            # An entry with the key of an earlier one takes its place; the others are appended.
            later = {unique(item): item for item in strip_markers(new)}
            merged_list = [later.pop(unique(item), item) for item in old]
            return merged_list + list(later.values())
        return old + [item for item in strip_markers(new) if item not in old]
    return strip_markers(new)


def strip_markers(value: Any) -> Any:
    """``value`` without ``!reset`` entries (removed) or ``!override`` wrappers (unwrapped)."""
    if isinstance(value, Override):
        return strip_markers(value.value)
    if isinstance(value, dict):
        return {k: strip_markers(v) for k, v in value.items() if not isinstance(v, Reset)}
    if isinstance(value, list):
        return [strip_markers(v) for v in value if not isinstance(v, Reset)]
    return value


def merge_service(old: dict[str, Any] | None, new: dict[str, Any], file: Path,
                  setters: dict[str, Path]) -> dict[str, Any]:  # fmt: skip
    """``new`` (a service of ``file``) merged onto ``old`` (the same service from earlier files).

    ``setters`` records, per top-level key, the last file that set it, so an error about a key
    names the file it came from.
    """
    for key, value in new.items():
        if isinstance(value, Reset):
            setters.pop(key, None)
        else:
            setters[key] = file
    if old is None:
        return strip_markers(new)  # type: ignore[no-any-return]
    return _merge(old, new, ())  # type: ignore[no-any-return]
