"""A layer's tar stream, decompressed and hashed on a thread of its own while tar reads it.

Unpacking a layer is three kinds of work: inflating gzip, hashing the result (its ``diff_id``),
and parsing tar and creating files. The first two run in C with the GIL released (zlib and
hashlib release it for buffers this size), so a second thread does them while the unpacking
thread parses and writes: a redis image unpacks in about the time its files take to create,
where one thread did all three in turn (measured in benchmarks/bench_images.py against
``skopeo copy`` + ``umoci unpack``). ``gzip.GzipFile`` is not used: it inflates in the caller's
thread, in small reads.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import zlib
from collections.abc import Iterator
from typing import BinaryIO

from pytest_envbox.errors import ImageError

__all__ = ["LayerStream"]

_CHUNK = 1 << 18  # compressed bytes read at a time
_AHEAD = 16  # decompressed chunks queued ahead of the reader (bounded memory: a few MiB)
_GZIP, _ZSTD = b"\x1f\x8b", b"\x28\xb5\x2f\xfd"


class LayerStream:
    """A readable file of the layer's uncompressed tar; ``sha`` and ``size`` once read to the end.

    Errors of the stream (a truncated or corrupt gzip) are raised by :meth:`read`, in the
    reader's thread, as the exceptions gzip raises (``EOFError``, ``zlib.error``).
    """

    def __init__(self, f: BinaryIO, where: str) -> None:
        self.sha = hashlib.sha256()
        self.size = 0
        self._chunks = self._source(f, where)
        self._q: queue.Queue[bytes | BaseException] = queue.Queue(_AHEAD)
        self._stop = threading.Event()
        self._buf = memoryview(b"")
        self._done = False
        self._thread = threading.Thread(target=self._run, name="envbox-layer-inflate", daemon=True)
        self._thread.start()

    @staticmethod
    def _source(f: BinaryIO, where: str) -> Iterator[bytes]:
        """The uncompressed bytes, by the blob's magic (docker archives do not say which)."""
        head = f.read(4)
        f.seek(0)
        if head[:2] == _GZIP:
            return _gunzip(f)
        if head == _ZSTD:
            try:
                import zstandard  # type: ignore[import-not-found]  # optional
            except ImportError:
                raise ImageError(f"{where} is zstd-compressed: install the `zstandard` module "
                                 "(pip install zstandard) to use it") from None  # fmt: skip
            return _reader_chunks(zstandard.ZstdDecompressor().stream_reader(f))
        return _reader_chunks(f)

    def _run(self) -> None:
        try:
            for data in self._chunks:
                self.sha.update(data)
                self.size += len(data)
                if not self._put(data):
                    return
            self._put(b"")
        except BaseException as e:  # handed to the reader, who raises it
            self._put(e)

    def _put(self, item: bytes | BaseException) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (all that is left with -1); b"" at the end."""
        if n < 0:
            parts = []
            while chunk := self.read(_CHUNK):
                parts.append(chunk)
            return b"".join(parts)
        while not self._buf and not self._done:
            item = self._q.get()
            if isinstance(item, BaseException):
                self._done = True
                raise item
            if not item:
                self._done = True
            self._buf = memoryview(item)
        out, self._buf = self._buf[:n], self._buf[n:]
        return out.tobytes()

    def drain(self) -> None:
        """Read to the end (tar's trailing blocks count in the digest)."""
        while self.read(_CHUNK):
            pass
        self._thread.join()

    def close(self) -> None:
        """Stop the thread (an unpack that failed midway reads no further)."""
        self._stop.set()
        self._thread.join()


def _reader_chunks(f: BinaryIO) -> Iterator[bytes]:
    while data := f.read(_CHUNK):
        yield data


def _gunzip(f: BinaryIO) -> Iterator[bytes]:
    """Inflate gzip members one after another (a blob may hold several, as gzip allows, and
    zero padding after the last, which gzip skips)."""
    d = zlib.decompressobj(wbits=31)  # gzip header and trailer (CRC-32, size) checked by zlib
    pending = b""
    started = False  # some of the current member has been fed
    while True:
        data = d.unconsumed_tail or pending or f.read(_CHUNK)
        pending = b""
        if not data:
            if started:
                raise EOFError("Compressed file ended before the end-of-stream marker was reached")
            return
        if not started:
            data = data.lstrip(b"\0")
            if not data:
                continue
            started = True
        out = d.decompress(data, _CHUNK * 8)
        if out:
            yield out
        if d.eof:
            pending, d, started = d.unused_data, zlib.decompressobj(wbits=31), False
