"""How :mod:`.protocol`'s messages cross the socket: one frame each, and their one codec.

A frame is a 12-byte header, the body's length (4 bytes, big-endian) and the request id (8
bytes; 0 for an event), then the body: a JSON object with the message's type tag (``t``) and its
fields. Nested values (the sandbox plan, limits, the network wiring) are JSON objects, bytes are
base64 strings (an exec's output: a NUL is then 1.33 bytes on the wire, not JSON's 6 of
``\\u0000``); :func:`decode` turns them back into their types, and the int keys of published
ports back into ints.

The id is in the header, outside the JSON, so that a frame whose body is bad (not JSON, an
unknown type, missing fields, too large) still says which call it belongs to: the receiver fails
that one call (:class:`BadFrame`) and reads on. :func:`encode` is the one place that refuses a
frame over :data:`MAX_FRAME`, on either end; the reader refuses one from its header alone and
skips its body without holding it.

JSON rather than pickle: the two ends are the same package, but nothing that crosses a process
boundary should be able to execute code when decoded.

Imported by the supervisor's lean interpreter (``python -S``): the standard library only.
"""

from __future__ import annotations

import base64
import json
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from pytest_envbox.sandbox.plan import SandboxPlan
from pytest_envbox.supervisor.protocol import (
    MESSAGE_TYPES,
    CgroupLimits,
    ExecInput,
    ExecOutput,
    ExecReply,
    ExecRequest,
    HelloReply,
    Message,
    NetWiring,
    ReserveReply,
    ReserveRequest,
    StartReply,
    StartRequest,
    VirtualAddressRequest,
)

__all__ = ["HEADER_SIZE", "MAX_FRAME", "BadFrame", "FrameReader", "Frames", "ProtocolError", "decode",
           "encode", "recv_messages"]  # fmt: skip

_HEADER = struct.Struct(">IQ")
HEADER_SIZE = _HEADER.size
#: The largest frame body either end sends or accepts (its JSON, not counting the header). No
#: message comes near it (an exec's output is streamed in parts of ``EXEC_CHUNK``): it bounds
#: what a bug or a hostile peer can make the other end hold.
MAX_FRAME = 64 << 20


class ProtocolError(ValueError):
    """A message that cannot cross the socket, or a frame that is not one (too large, not JSON,
    an unknown type tag, the wrong fields...)."""


@dataclass(frozen=True, slots=True)
class BadFrame:
    """What the reader gives in place of a message for a frame it could not decode; ``reason``
    says why. Its request id (from the header) names the call to fail (None: an event, or an
    id-less frame, to log and skip)."""

    reason: str


_BY_TAG: dict[str, type[Message]] = {t.TAG: t for t in MESSAGE_TYPES}
#: Each message's field names, in order (``__slots__`` holds them too, but says less).
_FIELDS: dict[type[Any], tuple[str, ...]] = {
    t: tuple(f.name for f in fields(t))
    for t in (*MESSAGE_TYPES, CgroupLimits, NetWiring)
}


def _plan(d: dict[str, Any]) -> SandboxPlan:
    return SandboxPlan.from_dict(d)


def _ranges(v: list[list[int]]) -> list[tuple[int, int]]:
    return [(a, b) for a, b in v]


def _bytes(s: str) -> bytes:
    return base64.b64decode(s, validate=True)


#: The fields JSON does not give back as they were sent: field -> what makes them so again.
_DECODE: dict[type[Message], dict[str, Callable[[Any], Any]]] = {
    StartRequest: {"plan": _plan, "limits": lambda d: CgroupLimits(**d),
                   "net": lambda d: None if d is None else NetWiring(**d)},
    StartReply: {"ports": lambda d: {int(k): v for k, v in d.items()}},
    ReserveRequest: {"ports": lambda v: [tuple(e) for e in v]},
    ReserveReply: {"refused": lambda v: None if v is None else tuple(v)},
    VirtualAddressRequest: {"ports": lambda v: [(p, [(a, t) for a, t in b]) for p, b in v]},
    ExecRequest: {"plan": _plan, "input": _bytes},
    ExecReply: {"stdout": _bytes, "stderr": _bytes},
    ExecInput: {"data": _bytes},
    ExecOutput: {"data": _bytes},
    HelloReply: {"uid_map": _ranges, "gid_map": _ranges},
}  # fmt: skip


def _nested(obj: Any) -> Any:
    """json's ``default``: bytes as base64, a nested value as a JSON object."""
    if isinstance(obj, bytes):
        return base64.b64encode(obj).decode("ascii")
    if isinstance(obj, SandboxPlan):
        return obj.to_dict()
    names = _FIELDS.get(type(obj))
    if names is None:
        raise TypeError(f"{type(obj).__name__} cannot be sent to the supervisor")
    return {name: getattr(obj, name) for name in names}


def encode(msg: Message, req_id: int | None = None) -> bytes:
    """``msg`` as one frame; ``req_id`` for a request, its reply and its parts (None for an
    event). A message whose body would pass :data:`MAX_FRAME` is a :class:`ProtocolError`."""
    obj: dict[str, Any] = {"t": msg.TAG}
    for name in _FIELDS[type(msg)]:
        obj[name] = getattr(msg, name)
    data = json.dumps(obj, separators=(",", ":"), default=_nested).encode()
    if len(data) > MAX_FRAME:
        raise ProtocolError(f"a {type(msg).__name__} of {len(data)} bytes is larger than a frame "
                            f"may be ({MAX_FRAME} bytes)")  # fmt: skip
    return _HEADER.pack(len(data), req_id or 0) + data


def decode(body: bytes | bytearray) -> Message:
    """A frame's body as its message; anything else (not JSON, an unknown type tag, missing or
    undecodable fields) is a :class:`ProtocolError`."""
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError) as e:  # not JSON, not UTF-8, nested past the stack
        raise ProtocolError(f"a frame that is not JSON: {type(e).__name__}: {e}") from None
    tag = obj.get("t") if isinstance(obj, dict) else None
    cls = _BY_TAG.get(tag) if isinstance(tag, str) else None
    if cls is None:
        raise ProtocolError(f"not a message of the supervisor's protocol: {obj!r:.200}")
    del obj["t"]
    try:
        for name, convert in _DECODE.get(cls, {}).items():
            obj[name] = convert(obj[name])
        return cls(**obj)
    except (KeyError, TypeError, ValueError, AttributeError) as e:  # what a bad field raises
        raise ProtocolError(f"a {cls.__name__} with the wrong fields: {type(e).__name__}: {e}") from None


#: What a read gives: each message (or bad frame) with its request id.
Frames = list[tuple[int | None, Message | BadFrame]]


class FrameReader:
    """Incremental decoder: feed bytes, get whole messages with their request ids (None for an
    event). A frame that is not a message comes out as a :class:`BadFrame` in its place, and
    the frames after it are read as ever: no frame stops the reader."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._skip = 0  # bytes still to come of an oversized frame's body, dropped unread
        # Reads land in one buffer kept for the reader's life: a fresh bytes object per read
        # costs an allocation, and at 256 KiB (past glibc's mmap threshold) an mmap and munmap
        # with their page faults each time: +40 us per call, measured.
        self.chunk = bytearray(1 << 16)
        self.view = memoryview(self.chunk)

    def feed(self, data: bytes | memoryview) -> Frames:
        if self._skip:
            n = min(self._skip, len(data))
            self._skip -= n
            data = data[n:]
        self._buf += data
        out: Frames = []
        while len(self._buf) >= _HEADER.size:
            n, ident = _HEADER.unpack_from(self._buf)
            req_id = ident or None
            if n > MAX_FRAME:
                out.append((req_id, BadFrame(f"a frame of {n} bytes is larger than a frame may be "
                                             f"({MAX_FRAME} bytes)")))  # fmt: skip
                del self._buf[: _HEADER.size]
                held = min(n, len(self._buf))
                del self._buf[:held]
                self._skip = n - held
                continue
            if len(self._buf) < _HEADER.size + n:
                break
            body = self._buf[_HEADER.size : _HEADER.size + n]
            del self._buf[: _HEADER.size + n]
            try:
                out.append((req_id, decode(body)))
            except ProtocolError as e:
                out.append((req_id, BadFrame(str(e))))
        return out


def recv_messages(sock: socket.socket, reader: FrameReader) -> Frames | None:
    """Read what is available (blocking for at least one byte); None at EOF."""
    n = sock.recv_into(reader.chunk)
    if not n:
        return None
    return reader.feed(reader.view[:n])
