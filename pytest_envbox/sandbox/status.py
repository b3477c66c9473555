"""What a sandbox tells the supervisor on its control socket: one datagram per word.

``ready`` (a spare, its network namespace attached), ``exec`` (the service or command is running:
a pidfd of the service attached, or the command's pid in its credentials), or why not: an error,
or that this host cannot do what is needed (the supervisor answers that as ``HostUnsupported``).
The words are made here, on the sandbox's side, and read by the supervisor through :func:`why`
alone.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["EXEC", "READY", "Why", "error", "unsupported", "why"]

READY = b"ready"
EXEC = b"exec"
_ERROR = b"error:"
_UNSUPPORTED = b"unsupported:"
#: A datagram of this size always fits (the supervisor reads up to 4096 bytes).
_MAX = 4000


@dataclass(frozen=True)
class Why:
    """Why a sandbox could not do what it was asked; ``unsupported``: the host cannot."""

    text: str
    unsupported: bool = False


def error(text: str) -> bytes:
    """The word for a failure (a missing program, a mount that failed...)."""
    return (_ERROR + text.encode(errors="replace"))[:_MAX]


def unsupported(text: str) -> bytes:
    """The word for a host that lacks what is needed; ``text`` says what and how to enable it."""
    return (_UNSUPPORTED + text.encode(errors="replace"))[:_MAX]


def why(msg: bytes) -> Why | None:
    """The reason a message gives, or None when it is no reason (``ready``, ``exec``)."""
    if msg.startswith(_ERROR):
        return Why(msg[len(_ERROR):].decode(errors="replace"))
    if msg.startswith(_UNSUPPORTED):
        return Why(msg[len(_UNSUPPORTED):].decode(errors="replace"), unsupported=True)
    return None
