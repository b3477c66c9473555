"""What a service sees besides its image or the host's files: host mounts, private tmpfs sizes
and the environment's own volumes. Pure data, validated when built (see :mod:`pytest_envbox.spec`).
"""

from __future__ import annotations

import os
import posixpath
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from pytest_envbox.errors import hide_frames
from pytest_envbox.validate import (
    as_mapping,
    check_keys,
    check_mount_source,
    describe,
    fail,
    parse_memory,
    text,
)

__tracebackhide__ = hide_frames  # an error in a declaration shows the user's line, not ours

__all__ = ["HOME", "Mount", "Volume", "mount_target", "tmpfs_sizes"]

#: Where each service finds its private, writable home directory (``~`` in ``tmpfs``).
HOME = "/home/envbox"

_FORBIDDEN_TARGETS = ("/proc", "/sys", "/dev")


def mount_target(value: object, service: str | None, key: str, allow: tuple[str, ...] = ()) -> str:
    target = text(value, service, key, "mount target")
    normal = posixpath.normpath(target)
    if not target.startswith("/") or target.startswith("//"):
        fail(f"{target!r} is not an absolute path; use e.g. '/data'", service, key)
    if normal != target.rstrip("/") and target != "/":
        fail(f"{target!r} is not a normalised path; use {normal!r}", service, key)
    if normal == "/":
        fail("cannot mount over '/'; mount under a directory such as '/data'", service, key)
    for forbidden in _FORBIDDEN_TARGETS:
        if normal in allow:
            break
        if normal == forbidden or normal.startswith(forbidden + "/"):
            fail(
                f"{target!r} is under {forbidden}, which the sandbox owns; pick another target",
                service,
                key,
            )
    return normal


@dataclass(frozen=True)
class Mount:
    """A host file or directory made visible at ``target`` inside the service (read-only default).

    ``source`` may be relative: it is resolved against the rootdir when the service starts.
    """

    source: str
    target: str
    readonly: bool = True

    KEYS: ClassVar[tuple[str, ...]] = ("source", "target", "readonly")

    if TYPE_CHECKING:

        def __init__(
            self, source: str | os.PathLike[str], target: str, readonly: bool = True
        ) -> None: ...

    def __post_init__(self) -> None:
        self._normalise(service=None, prefix="")

    def _normalise(self, service: str | None, prefix: str) -> None:
        object.__setattr__(self, "source", text(self.source, service, f"{prefix}source", "path"))
        object.__setattr__(self, "target", mount_target(self.target, service, f"{prefix}target"))
        if not isinstance(self.readonly, bool):
            fail(f"{describe(self.readonly)} is not true or false", service, f"{prefix}readonly")
        check_mount_source(self.source, service, f"{prefix}source")

    @classmethod
    def from_value(cls, value: object, *, service: str | None, index: int) -> Mount:
        """A :class:`Mount` from itself or a ``{ source, target, readonly }`` mapping."""
        if isinstance(value, Mount):
            return value
        prefix = f"mounts[{index}]."
        example = '{ source = "./fixtures", target = "/data" }'
        table = as_mapping(value, service, f"mounts[{index}]", example)
        check_keys(table, cls.KEYS, service, prefix)
        for required in ("source", "target"):
            if required not in table:
                fail(f"is missing; write the mount as {example}", service, prefix + required)
        draft = object.__new__(cls)
        for name in cls.KEYS:
            object.__setattr__(draft, name, table.get(name, True))
        draft._normalise(service, prefix)
        return cls(draft.source, draft.target, draft.readonly)




#: The sandbox's own writable directories, each a tmpfs that ``tmpfs`` may resize.
_PRIVATE_TMPFS = ("/tmp", "/var/tmp", "/run", "/dev/shm", HOME)


def tmpfs_sizes(value: object, service: str, mounts: tuple[Mount, ...]) -> dict[str, int]:
    """``tmpfs``: path -> size. A private directory (``/tmp``, ``~``...) is resized; any other
    absolute path gets a new empty tmpfs. Mounted before ``mounts``, so a mount may go inside a
    tmpfs, never a tmpfs inside (or on) a mount."""
    example = '{ "/tmp" = "2Gi", "/cache" = "256Mi" }'
    table = as_mapping(value if value is not None else {}, service, "tmpfs", example)
    sizes: dict[str, int] = {}
    for path, size in table.items():
        key = f"tmpfs[{path!r}]"
        target = HOME if path == "~" else mount_target(path, service, key, allow=_PRIVATE_TMPFS)
        if target in sizes:
            fail(f"{path!r} names {target}, listed already; list it once", service, key)
        for m in mounts:
            if target == m.target or target.startswith(m.target.rstrip("/") + "/"):
                fail(f"{path!r} would be hidden by the mount at {m.target!r}; put the tmpfs "
                     "elsewhere, or the mount inside it", service, key)  # fmt: skip
        sizes[target] = parse_memory(size, service=service, key=key)  # type: ignore[arg-type]
    return sizes


_VOLUME_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


@dataclass(frozen=True)
class Volume:
    """A directory of the environment's own, mounted at ``target``: every service of the
    environment that names the same volume shares it; it starts empty (or holding ``files``) and
    is removed with the environment. Compose's named volumes, Kubernetes' emptyDir, ConfigMap and
    Secret volumes become these; ``{ volume = "pgdata", target = "/var/lib/postgresql/data" }``
    in a ``volumes`` list declares one.

    ``files`` are written into it when it is made: ``(path relative to it, content, mode)``. One
    file of path ``""`` makes the volume that single file, mounted at ``target`` (a Kubernetes
    ``subPath`` of a ConfigMap).
    """

    name: str
    target: str
    readonly: bool = False
    files: tuple[tuple[str, bytes, int], ...] = ()

    KEYS: ClassVar[tuple[str, ...]] = ("volume", "target", "readonly")

    def __post_init__(self) -> None:
        self._normalise(service=None, prefix="")

    def _normalise(self, service: str | None, prefix: str) -> None:
        name = text(self.name, service, f"{prefix}volume", "volume name")
        if not _VOLUME_NAME.fullmatch(name):
            fail(f"{name!r} is not a volume name; use letters, digits, '_', '.' and '-' (up to 128, "
                 "starting with a letter or digit)", service, f"{prefix}volume")  # fmt: skip
        object.__setattr__(self, "target", mount_target(self.target, service, f"{prefix}target"))
        if not isinstance(self.readonly, bool):
            fail(f"{describe(self.readonly)} is not true or false", service, f"{prefix}readonly")
        for path, content, mode in self.files:
            if path.startswith("/") or ".." in path.split("/") or (path == "" and len(self.files) > 1):
                fail(f"{path!r} is not a path inside the volume", service, f"{prefix}files")
            if not isinstance(content, bytes) or not 0 <= mode <= 0o7777:
                fail(f"{path!r} needs bytes and a mode", service, f"{prefix}files")

    @property
    def single_file(self) -> bool:
        """The volume is one file (a ``subPath`` mount), not a directory."""
        return len(self.files) == 1 and self.files[0][0] == ""

    @classmethod
    def from_value(cls, value: object, *, service: str | None, index: int) -> Volume:
        """A :class:`Volume` from itself or a ``{ volume, target, readonly }`` mapping."""
        if isinstance(value, Volume):
            return value
        prefix = f"volumes[{index}]."
        example = '{ volume = "pgdata", target = "/var/lib/postgresql/data" }'
        table = as_mapping(value, service, f"volumes[{index}]", example)
        check_keys(table, cls.KEYS, service, prefix)
        for required in ("volume", "target"):
            if required not in table:
                fail(f"is missing; write the volume as {example}", service, prefix + required)
        draft = object.__new__(cls)
        object.__setattr__(draft, "name", table["volume"])
        object.__setattr__(draft, "target", table["target"])
        object.__setattr__(draft, "readonly", table.get("readonly", False))
        object.__setattr__(draft, "files", ())
        draft._normalise(service, prefix)
        return cls(draft.name, draft.target, draft.readonly)
