"""One manifest document being read: where it is (for errors) and typed access to its fields.

Every error is a :class:`~pytest_envbox.kubernetes.model.KubeError` naming the file, the document
(``Deployment/frontend``) and the field path (``spec.template.spec.containers[0].ports[1]``),
so that a report says where to look without a traceback.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_envbox.kubernetes.keys import Keys
from pytest_envbox.kubernetes.model import Ignored, KubeError
from pytest_envbox.validate import describe, is_int

__all__ = ["Doc"]


@dataclass
class Doc:
    """A document's file and ``Kind/name``, and the list its ignored keys are recorded in."""

    file: Path
    name: str
    ignored: list[Ignored] = field(default_factory=list)

    def fail(self, message: str, path: str | None) -> KubeError:
        """The error to raise about ``path`` in this document."""
        return KubeError(message, file=self.file, document=self.name, path=path)

    def ignore(self, path: str | None) -> None:
        self.ignored.append(Ignored(self.file, self.name, path))

    def check(self, body: dict[str, Any], keys: Keys, path: str) -> None:
        """Record ignored keys, refuse refused and unknown ones (``path`` is the body's own)."""
        known = (*keys.mapped, *keys.ignored, *keys.refused)
        for key in body:
            where = f"{path}.{key}" if path else str(key)
            if key in keys.refused:
                raise self.fail(f"cannot be honoured by envbox: {keys.refused[key]}", where)
            if key in keys.ignored:
                self.ignore(where)
            elif key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise self.fail(f"unknown field {key!r}; {hint}known here: {', '.join(known)}", where)

    def mapping(self, value: object, path: str, *, required: bool = False) -> dict[str, Any]:
        """``value`` as a mapping (None: an empty one, unless ``required``)."""
        if value is None and not required:
            return {}
        if not isinstance(value, dict):
            raise self.fail(f"{describe(value)} is not a mapping", path)
        return value

    def seq(self, value: object, path: str) -> list[Any]:
        """``value`` as a list (None: an empty one)."""
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.fail(f"{describe(value)} is not a list", path)
        return value

    def text(self, value: object, path: str) -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(f"{describe(value)} is not a non-empty string; quote it", path)
        return value

    def number(self, value: object, path: str, *, low: int = 0, high: int = 2**31 - 1) -> int:
        if not is_int(value) or not low <= value <= high:
            raise self.fail(f"{describe(value)} is not an integer from {low} to {high}", path)
        return value

    def flag(self, value: object, path: str) -> bool:
        if value is None:
            return False
        if not isinstance(value, bool):
            raise self.fail(f"{describe(value)} is not true or false", path)
        return value

    def strings(self, value: object, path: str) -> list[str]:
        """A list of strings (a command, args): each item checked."""
        items = self.seq(value, path)
        for i, item in enumerate(items):
            if not isinstance(item, str):
                raise self.fail(f"{describe(item)} is not a string; quote it", f"{path}[{i}]")
        return items

    def labels(self, value: object, path: str) -> dict[str, str]:
        """A label map (or a selector): string keys and string values."""
        table = self.mapping(value, path)
        for key, item in table.items():
            if not isinstance(key, str) or not isinstance(item, str):
                raise self.fail(f"{key!r}: {item!r} is not a string label; quote the value",
                                f"{path}.{key}")  # fmt: skip
        return table
