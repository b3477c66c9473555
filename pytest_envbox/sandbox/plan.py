"""The plan of one service's sandbox: plain data, built by the engine, carried out by the child.

As in bubblewrap, the work is planned first (:class:`SandboxPlan`) and carried out in one place,
in the child, in a fixed order (:mod:`pytest_envbox.sandbox.rootfs`, :mod:`pytest_envbox.sandbox.init`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pytest_envbox.spec import HOME

__all__ = ["HOME", "SandboxPlan", "SetupError"]


@dataclass
class SandboxPlan:
    """Everything the child needs to set up one service, as plain data (it crosses a socket)."""

    name: str
    argv: list[str]
    executable: str
    env: dict[str, str]
    cwd: str
    uid: int
    gid: int
    groups: list[int]
    #: (host source, target inside, readonly)
    mounts: list[tuple[str, str, bool]] = field(default_factory=list)
    #: target inside -> content of a generated file, bound read-only (``/etc/hosts``...)
    etc_files: dict[str, str] = field(default_factory=dict)
    #: host paths the service needs (its cwd, its interpreter's prefix) that must stay visible,
    #: read-only at the same path, even where the sandbox puts a private tmpfs (``/tmp``...)
    expose: list[str] = field(default_factory=list)
    #: path inside -> size in bytes of its tmpfs, where it differs from the default
    #: (``Service.tmpfs``; :data:`HOME` for the home directory)
    tmpfs: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        # Shallow: dataclasses.asdict deep-copies every list and dict, on the start path.
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SandboxPlan:
        d = dict(d)
        d["mounts"] = [tuple(m) for m in d.get("mounts", [])]
        return cls(**d)


class SetupError(Exception):
    """A step of the sandbox setup failed; the message says which."""


# --- filesystem -------------------------------------------------------------------------------
