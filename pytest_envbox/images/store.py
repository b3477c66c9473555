"""The image store: blobs and unpacked layers, content-addressed, shared by every run.

Layout under :func:`store_root` (``$ENVBOX_STORE``, else ``$XDG_CACHE_HOME/envbox``, else
``~/.cache/envbox``)::

    blobs/sha256/<hex>          verified blobs (layers as pulled, configs, manifests), read-only
    layers/sha256/<hex>/        a layer unpacked, named by its diff_id: an overlayfs lower dir
    images/<sha256 of name>.json  one ImageRecord per reference, written atomically
    locks/blob-<hex>.lock, locks/layer-<hex>.lock   filelock files, kept
    tmp/                        downloads and unpacks in progress (never trusted, swept)
    rw/                         writable layers of running services (their owner manages them)

Only a completed, verified entry ever has its final name: a blob is written to ``tmp/``, hashed
as it is written, checked for size and digest, fsynced and renamed; a layer is unpacked into
``tmp/`` with its diff_id checked and renamed. A process killed at any point leaves at most a
temporary name, removed by the next run that takes the same lock (or by :meth:`Store.prune`).
Each blob and layer has a lock (``filelock``, an ``flock`` that the kernel drops with its
process), so threads, xdist workers and parallel runs that want one blob download it once: the
second waits, then finds it.

Rootless, layers are unpacked (and removed) as root of a user namespace with the supervisor's id
map (:mod:`pytest_envbox.images.nsrun`), so their files belong to the ids the services see.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO, cast

from filelock import FileLock, Timeout

from pytest_envbox.errors import ImageError
from pytest_envbox.images import unpack

__all__ = ["PRUNE_GRACE", "ImageRecord", "LayerRef", "Store", "store_root"]

#: Blobs and layers no image records yet are kept this long (seconds) by :meth:`Store.prune`: a
#: pull in progress has stored them but not yet written its record.
PRUNE_GRACE = 3600.0
_HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True)
class LayerRef:
    """One layer of an image: its blob (as pulled) and its diff_id (the uncompressed tar's)."""

    digest: str
    media_type: str
    size: int
    diff_id: str


@dataclass
class ImageRecord:
    """What the store knows of one reference: its manifest, config and layers (bottom first)."""

    name: str
    digest: str
    config: str
    layers: list[LayerRef]
    size: int
    pulled: float
    last_used: float

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> ImageRecord:
        data = json.loads(text)
        data["layers"] = [LayerRef(**layer) for layer in data["layers"]]
        return cls(**data)


def store_root() -> Path:
    """``$ENVBOX_STORE``, else ``$XDG_CACHE_HOME/envbox``, else ``~/.cache/envbox``."""
    if os.environ.get("ENVBOX_STORE"):
        return Path(os.environ["ENVBOX_STORE"])
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "envbox"


def _hex(digest: str) -> str:
    algo, _, hexpart = digest.partition(":")
    if algo != "sha256" or len(hexpart) != 64 or not set(hexpart) <= _HEX:
        raise ImageError(f"{digest!r} is not a sha256 digest (sha256:<64 lowercase hex digits>)")
    return hexpart


class _HashingWriter:
    """The temporary blob file, hashed and counted as it is written; refuses bytes past ``size``."""

    def __init__(self, f: BinaryIO, digest: str, size: int | None) -> None:
        self.f = f
        self.digest = digest
        self.limit = size
        self.sha = hashlib.sha256()
        self.written = 0

    def write(self, data: bytes) -> int:
        if self.limit is not None and self.written + len(data) > self.limit:
            raise ImageError(f"blob {self.digest}: more than the {self.limit} bytes its descriptor says")
        self.sha.update(data)
        self.written += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()

    def tell(self) -> int:
        return self.written

    def writable(self) -> bool:
        return True


class Store:
    """The content-addressed store at ``root`` (default :func:`store_root`)."""

    def __init__(self, root: Path | None = None, *, rootless: bool | None = None) -> None:
        self.root = Path(root) if root is not None else store_root()
        self.rootless = os.geteuid() != 0 if rootless is None else rootless
        self._blobs = self.root / "blobs" / "sha256"
        self._layers = self.root / "layers" / "sha256"
        self._images = self.root / "images"
        self._locks = self.root / "locks"
        self._tmp = self.root / "tmp"
        for d in (self._blobs, self._layers, self._images, self._locks, self._tmp, self.rw_root):
            d.mkdir(parents=True, exist_ok=True)

    @property
    def rw_root(self) -> Path:
        """Where services' writable layers live (made and removed by their supervisor)."""
        return self.root / "rw"

    @property
    def userxattr(self) -> bool:
        """True when layers mark opaque directories with ``user.overlay.*`` (rootless)."""
        return self.rootless

    def _lock_path(self, kind: str, hexpart: str) -> Path:
        return self._locks / f"{kind}-{hexpart}.lock"

    def _lock(self, kind: str, hexpart: str) -> FileLock:
        # A new object each time: FileLock objects may be shared per thread, and two objects on
        # one file exclude each other (flock is per open file), across threads and processes.
        return FileLock(str(self._lock_path(kind, hexpart)), thread_local=False)

    # Blobs

    def blob_path(self, digest: str) -> Path:
        return self._blobs / _hex(digest)

    def has_blob(self, digest: str) -> bool:
        """Whether the blob is stored; if so it counts as just used, so a concurrent
        :meth:`prune` keeps it for the pull that asked."""
        path = self.blob_path(digest)
        with contextlib.suppress(FileNotFoundError):
            os.utime(path)
            return True
        return False

    def read_blob(self, digest: str) -> bytes:
        try:
            return self.blob_path(digest).read_bytes()
        except FileNotFoundError:
            raise ImageError(f"blob {digest} is not in the store at {self.root}") from None

    def ingest(self, digest: str, size: int | None, fill: Callable[[BinaryIO], None]) -> Path:
        """Store the blob ``digest``, which ``fill(out)`` writes, once across threads and processes.

        ``size``, when given, is checked (a longer stream is cut off at once). On a short or long
        stream, a digest mismatch or an exception from ``fill`` nothing is stored: ``ImageError``
        (or ``fill``'s exception) and the temporary file is gone. Returns the blob's path.
        """
        hexpart = _hex(digest)
        path = self._blobs / hexpart
        if self.has_blob(digest):
            return path
        with self._lock("blob", hexpart):
            if self.has_blob(digest):
                return path  # another process stored it while we waited
            self._sweep(f"blob-{hexpart}.")
            tmp = self._tmp / f"blob-{hexpart}.{os.getpid()}"
            try:
                with open(tmp, "wb") as f:
                    out = _HashingWriter(f, digest, size)
                    fill(cast(BinaryIO, out))
                    if size is not None and out.written != size:
                        raise ImageError(f"blob {digest}: truncated, {out.written} of {size} bytes")
                    got = "sha256:" + out.sha.hexdigest()
                    if got != digest:
                        raise ImageError(f"blob {digest}: its content is {got}: corrupt or tampered with")
                    f.flush()
                    os.fsync(f.fileno())
                os.chmod(tmp, 0o444)
                os.rename(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        return path

    def _sweep(self, prefix: str) -> None:
        """Remove temporaries of one blob: the caller holds its lock, so they are a dead run's."""
        for name in os.listdir(self._tmp):
            if name.startswith(prefix):
                unpack.remove_trees([str(self._tmp / name)])

    # Layers

    def layer_path(self, diff_id: str) -> Path:
        """The layer's directory (there once :meth:`unpack` made it)."""
        return self._layers / _hex(diff_id)

    def unpack(self, layers: Sequence[LayerRef],
               progress: Callable[[str, int], None] | None = None) -> list[Path]:  # fmt: skip
        """Unpack each layer once across processes (its blob must be stored); the layer dirs,
        bottom first. ``progress(diff_id, bytes)`` after each layer unpacked here."""
        paths = [self.layer_path(layer.diff_id) for layer in layers]
        missing = {layer.diff_id: layer for layer, p in zip(layers, paths, strict=True) if not p.is_dir()}
        if missing:
            for layer in missing.values():
                if not self.blob_path(layer.digest).is_file():
                    raise ImageError(f"layer {layer.digest} is not in the store: pull the image first")
            with contextlib.ExitStack() as locks:
                for diff_id in sorted(missing):  # one order for every process: no deadlock
                    locks.enter_context(self._lock("layer", _hex(diff_id)))
                todo = [
                    {"blob": str(self.blob_path(layer.digest)), "digest": layer.digest,
                     "diff_id": layer.diff_id, "dest": str(self.layer_path(layer.diff_id))}
                    for layer in missing.values() if not self.layer_path(layer.diff_id).is_dir()
                ]  # fmt: skip
                if todo:
                    report = (lambda v: progress(v[0], v[1])) if progress else None
                    args = {"layers": todo, "tmp": str(self._tmp), "userxattr": self.userxattr}
                    self._in_namespace("install_layers", args, report)
        for layer in layers:
            # Recently used, so a concurrent prune keeps it (see PRUNE_GRACE). The lock file, not
            # the layer: rootless, a layer's root may belong to an id of the user namespace.
            self._lock_path("layer", _hex(layer.diff_id)).touch()
        return paths

    def _in_namespace(self, func: str, args: dict[str, Any], progress: Callable[[Any], None] | None) -> Any:
        """``unpack.<func>(**args)``: here as root, in the user namespace rootless."""
        if not self.rootless:
            return getattr(unpack, func)(**args, progress=progress)
        from pytest_envbox.images import nsrun

        return nsrun.call(f"pytest_envbox.images.unpack:{func}", args, progress)

    # Image records

    def _record_path(self, name: str) -> Path:
        return self._images / (hashlib.sha256(name.encode()).hexdigest() + ".json")

    def save_image(self, rec: ImageRecord) -> None:
        path = self._record_path(rec.name)
        tmp = self._tmp / f"image-{path.stem}.{os.getpid()}.{id(rec)}"
        tmp.write_text(rec.to_json())
        os.rename(tmp, path)

    def load_image(self, name: str) -> ImageRecord | None:
        try:
            return ImageRecord.from_json(self._record_path(name).read_text())
        except FileNotFoundError:
            return None
        except (ValueError, TypeError, KeyError):
            return None  # a record from another version of envbox: pull again

    def images(self) -> list[ImageRecord]:
        out = []
        for p in sorted(self._images.glob("*.json")):
            with contextlib.suppress(FileNotFoundError, ValueError, TypeError, KeyError):
                out.append(ImageRecord.from_json(p.read_text()))
        return sorted(out, key=lambda r: r.name)

    def touch(self, name: str) -> None:
        rec = self.load_image(name)
        if rec is not None:
            rec.last_used = time.time()
            self.save_image(rec)

    # Pruning

    def prune(self, older_than: float | None = None) -> tuple[int, int]:
        """Remove images not used for ``older_than`` seconds (None: keep every image), then every
        blob and layer no remaining image needs (unless younger than :data:`PRUNE_GRACE`: a pull
        in progress), and temporaries whose lock is free. Returns (items removed, bytes freed).
        Writable layers under :attr:`rw_root` are their supervisor's (and the janitor's)."""
        now = time.time()
        removed = freed = 0
        for p in self._images.glob("*.json"):
            with contextlib.suppress(FileNotFoundError, ValueError, TypeError, KeyError):
                rec = ImageRecord.from_json(p.read_text())
                if older_than is not None and rec.last_used < now - older_than:
                    p.unlink()
                    removed += 1
        keep_blobs: set[str] = set()
        keep_layers: set[str] = set()
        for rec in self.images():
            keep_blobs.update(_hex(d) for d in (rec.digest, rec.config) if d.startswith("sha256:"))
            keep_blobs.update(_hex(layer.digest) for layer in rec.layers)
            keep_layers.update(_hex(layer.diff_id) for layer in rec.layers)
        for name in os.listdir(self._blobs):
            path = self._blobs / name
            if name in keep_blobs or _young(path, now):
                continue
            with self._lock("blob", name), contextlib.suppress(FileNotFoundError):
                size = path.stat().st_size
                path.unlink()
                removed, freed = removed + 1, freed + size
        temps = self._free_temps()
        gone = [name for name in os.listdir(self._layers)
                if name not in keep_layers and not _young(self._lock_path("layer", name), now)]  # fmt: skip
        with contextlib.ExitStack() as locks:
            for name in sorted(gone):
                locks.enter_context(self._lock("layer", name))
            stale = [str(self._layers / n) for n in gone] + temps
            if stale:
                freed += sum(_du(p) for p in stale)
                self._in_namespace("remove_trees", {"paths": stale}, None)
                removed += len(stale)
        return removed, freed

    def _free_temps(self) -> list[str]:
        """Temporaries whose blob or layer lock nobody holds: a killed run's. Call only while
        holding no lock of those (it takes and drops each)."""
        out = []
        for name in os.listdir(self._tmp):
            kind, _, rest = name.partition("-")
            hexpart = rest.split(".", 1)[0]
            if kind not in ("blob", "layer", "image"):
                continue
            if kind == "image":
                if _young(self._tmp / name, time.time()):
                    continue
                out.append(str(self._tmp / name))
                continue
            # Free lock: nobody is writing it (temporaries are made and gone under their lock).
            with contextlib.suppress(Timeout), self._lock(kind, hexpart).acquire(timeout=0):
                out.append(str(self._tmp / name))
        return out


def _young(path: Path, now: float) -> bool:
    try:
        return path.lstat().st_mtime > now - PRUNE_GRACE
    except FileNotFoundError:
        return True


def _du(path: str) -> int:
    total = 0
    with contextlib.suppress(OSError):
        st = os.lstat(path)
        total += st.st_blocks * 512
        if os.path.isdir(path) and not os.path.islink(path):
            for top, dirs, files in os.walk(path):
                for n in dirs + files:
                    with contextlib.suppress(OSError):
                        total += os.lstat(os.path.join(top, n)).st_blocks * 512
    return total

