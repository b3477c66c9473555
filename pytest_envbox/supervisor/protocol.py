"""Framing for the supervisor's socket: 4-byte big-endian length, then one JSON object.

JSON rather than pickle: the two ends are the same package, but nothing that crosses a process
boundary should be able to execute code when decoded.
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any

_HEADER = struct.Struct(">I")
MAX_FRAME = 64 << 20


def encode(obj: dict[str, Any]) -> bytes:
    data = json.dumps(obj, separators=(",", ":")).encode()
    return _HEADER.pack(len(data)) + data


class FrameReader:
    """Incremental decoder: feed bytes, get whole messages."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buf += data
        out: list[dict[str, Any]] = []
        while len(self._buf) >= _HEADER.size:
            (n,) = _HEADER.unpack_from(self._buf)
            if n > MAX_FRAME:
                raise ValueError(f"frame of {n} bytes is too large")
            if len(self._buf) < _HEADER.size + n:
                break
            out.append(json.loads(self._buf[_HEADER.size : _HEADER.size + n]))
            del self._buf[: _HEADER.size + n]
        return out


def recv_messages(sock: socket.socket, reader: FrameReader) -> list[dict[str, Any]] | None:
    """Read what is available (blocking for at least one byte); None at EOF."""
    data = sock.recv(1 << 16)
    if not data:
        return None
    return reader.feed(data)
