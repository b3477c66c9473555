"""The plan of one service's sandbox: plain data, built by the engine, carried out by the child.

As in bubblewrap, the work is planned first (:class:`SandboxPlan`) and carried out in one place,
in the child, in a fixed order (:mod:`pytest_envbox.sandbox.rootfs`, :mod:`pytest_envbox.sandbox.init`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pytest_envbox.mounts import HOME

__all__ = ["HOME", "NOFILE", "ImageRoot", "SandboxPlan", "SetupError"]

#: Open files per process (``RLIMIT_NOFILE``, soft and hard) unless the service declares
#: ``limits.nofile``: containerd's default. Each socket may hold some kernel memory that no
#: memory limit refuses (see docs/limits.md, "Socket buffers"); this bounds how many one
#: process can have, and the service cannot raise it (no ``CAP_SYS_RESOURCE``).
NOFILE = 1024


@dataclass
class ImageRoot:
    """An image service's root: its layers stacked read-only under a writable layer."""

    #: the unpacked layers (host paths), TOP first, as overlayfs' ``lowerdir`` lists them
    lower: list[str]
    #: a host directory holding ``upper/`` and ``work/``: the supervisor makes it at the first
    #: start, keeps it across restarts and removes it when the environment closes
    rw: str
    #: the layers mark whiteouts and opaque directories with ``user.overlay.*`` (rootless)
    userxattr: bool = False


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
    #: (real host path, path inside) of what the service needs (its cwd, its interpreter's
    #: prefix) that must stay visible, read-only, even where the sandbox puts a private tmpfs
    #: (``/tmp``...); the path inside is as the declaration names it, symbolic links and all
    expose: list[tuple[str, str]] = field(default_factory=list)
    #: RLIMIT_NOFILE, soft and hard, for the service and its ``exec`` commands
    nofile: int = NOFILE
    #: path inside -> size in bytes of its tmpfs, where it differs from the default
    #: (``Service.tmpfs``; :data:`HOME` for the home directory)
    tmpfs: dict[str, int] = field(default_factory=dict)
    #: an image service: the image is its root, not the host's (see sandbox/imageroot.py)
    image: ImageRoot | None = None
    #: the signal that stops it (an image's ``StopSignal``); None: SIGTERM
    stop_signal: int | None = None
    #: mount sources (the environment's new volumes) to give to ``uid``/``gid`` if still ours
    own: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        # Shallow: dataclasses.asdict deep-copies every list and dict, on the start path.
        d = dict(self.__dict__)
        if self.image is not None:
            d["image"] = dict(self.image.__dict__)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SandboxPlan:
        d = dict(d)
        d["mounts"] = [tuple(m) for m in d.get("mounts", [])]
        d["expose"] = [tuple(e) for e in d.get("expose", [])]
        if isinstance(d.get("image"), dict):
            d["image"] = ImageRoot(**d["image"])
        return cls(**d)


class SetupError(Exception):
    """A step of the sandbox setup failed; the message says which."""


# --- filesystem -------------------------------------------------------------------------------
