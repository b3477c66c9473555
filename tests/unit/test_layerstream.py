"""LayerStream: a layer's bytes inflated and hashed on a thread, read as a file by tar."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import threading
import zlib

import pytest

from pytest_envbox.images.layerstream import LayerStream

DATA = os.urandom(300_000) + b"\0" * 700_000  # incompressible, then very compressible


def read_all(s: LayerStream, n: int = 10_000) -> bytes:
    parts = []
    while chunk := s.read(n):
        assert len(chunk) <= n
        parts.append(chunk)
    s.drain()
    return b"".join(parts)


@pytest.mark.parametrize("blob", [
    gzip.compress(DATA),
    DATA,  # plain tar: no magic, passed through
    gzip.compress(DATA[:400_000]) + gzip.compress(DATA[400_000:]),  # two members, as gzip allows
    gzip.compress(DATA) + b"\0" * 1000,  # zero padding after the last member
], ids=["gzip", "plain", "two-members", "padded"])  # fmt: skip
def test_reads_the_uncompressed_bytes_and_hashes_them(blob: bytes) -> None:
    s = LayerStream(io.BytesIO(blob), "layer")
    assert read_all(s) == DATA
    assert s.sha.hexdigest() == hashlib.sha256(DATA).hexdigest() and s.size == len(DATA)


def test_a_truncated_gzip_is_an_eoferror_in_the_reader() -> None:
    blob = gzip.compress(DATA)
    s = LayerStream(io.BytesIO(blob[: len(blob) // 2]), "layer")
    with pytest.raises(EOFError, match="ended before"):
        read_all(s)


def test_corrupt_bytes_are_a_zlib_error_in_the_reader() -> None:
    blob = bytearray(gzip.compress(DATA))
    blob[200:260] = b"x" * 60
    s = LayerStream(io.BytesIO(bytes(blob)), "layer")
    with pytest.raises(zlib.error):
        read_all(s)


def test_close_midway_stops_the_thread() -> None:
    s = LayerStream(io.BytesIO(gzip.compress(DATA * 8)), "layer")
    assert s.read(10) == DATA[:10]
    s.close()
    assert not [t for t in threading.enumerate() if t.name == "envbox-layer-inflate"]
