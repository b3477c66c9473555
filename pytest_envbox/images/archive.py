"""Images from files: ``oci:DIR[:TAG]``, ``oci-archive:FILE[:TAG]``, ``docker-archive:FILE``.

Each is read into the store (:class:`~pytest_envbox.images.store.Store`), every blob verified by
its digest on the way, and described as the pull code wants it: an :class:`Imported`.

- ``oci:`` is an OCI image layout (image-spec ``image-layout.md``): ``oci-layout``,
  ``index.json`` and ``blobs/<alg>/<hex>``. The tag is the index entry's
  ``org.opencontainers.image.ref.name`` annotation; with no tag, an index of one image is that
  image, and one of several is an error listing the tags.
- ``oci-archive:`` is a tar of such a layout (what ``skopeo copy ... oci-archive:`` writes). Its
  members are streamed into the store from the tar (random access, no copy of the layout first).
- ``docker-archive:`` is what ``docker save`` and ``podman save`` write: ``manifest.json`` with
  ``Config``, ``Layers`` and ``RepoTags``, layers as plain or gzipped tars. It has no manifest of
  its own, so the manifest digest is that of an OCI manifest synthesized from the config and
  layers (compact JSON, stored as a blob like the others): stable for the same archive content.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any, BinaryIO

from pytest_envbox.errors import ImageError
from pytest_envbox.images.store import LayerRef, Store

__all__ = ["Imported", "import_archive"]

_REF_NAME = "org.opencontainers.image.ref.name"
_INDEX_TYPES = ("application/vnd.oci.image.index.v1+json",
                "application/vnd.docker.distribution.manifest.list.v2+json")  # fmt: skip
_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le", "s390x": "s390x"}


@dataclass(frozen=True)
class Imported:
    """An image read into the store: what an :class:`~pytest_envbox.images.store.ImageRecord` needs."""

    manifest: str               # the manifest's digest (docker-archive: of a synthesized one)
    config: str                 # the config blob's digest
    layers: tuple[LayerRef, ...]  # bottom first, diff_ids from the config
    size: int                   # bytes of the blobs (config and layers)


class _Source:
    """Files of a layout, from a directory or from a tar: opened by their path in the layout."""

    def __init__(self, path: str, transport: str, reference: str) -> None:
        self.reference = reference
        self.tar: tarfile.TarFile | None = None
        self.dir = path
        self.members: dict[str, tarfile.TarInfo] = {}
        if transport == "oci":
            if not os.path.isdir(path):
                raise ImageError(f"{path} is not a directory (an OCI image layout)", reference=reference)
            return
        if not os.path.isfile(path):
            raise ImageError(f"no such file: {path}", reference=reference)
        try:
            self.tar = tarfile.open(path, "r:*")  # noqa: SIM115  (closed by close())
            self.members = {os.path.normpath(m.name): m for m in self.tar.getmembers() if m.isreg()}
        except (tarfile.TarError, OSError, EOFError) as e:
            raise ImageError(f"{path} is not a tar archive ({e})", reference=reference) from None

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()

    def has(self, name: str) -> bool:
        if self.tar is not None:
            return os.path.normpath(name) in self.members
        return os.path.isfile(os.path.join(self.dir, name))

    def open(self, name: str) -> IO[bytes]:
        if self.tar is None:
            try:
                return open(os.path.join(self.dir, name), "rb")
            except OSError as e:
                raise ImageError(f"cannot read {name} in the layout: {e}", reference=self.reference) from None
        m = self.members.get(os.path.normpath(name))
        f = self.tar.extractfile(m) if m is not None else None
        if f is None:
            raise ImageError(f"the archive has no {name}", reference=self.reference)
        return f

    def json(self, name: str) -> Any:
        with self.open(name) as f:
            try:
                return json.loads(f.read())
            except ValueError as e:
                raise ImageError(f"{name} is not JSON ({e})", reference=self.reference) from None


def _copier(src: _Source, name: str) -> Callable[[BinaryIO], None]:
    def fill(out: BinaryIO) -> None:
        with src.open(name) as f:
            while chunk := f.read(1 << 20):
                out.write(chunk)

    return fill


def _blob_name(digest: str) -> str:
    algo, _, hexpart = digest.partition(":")
    return f"blobs/{algo}/{hexpart}"


def _ingest(store: Store, src: _Source, digest: str, size: int | None, name: str | None = None) -> None:
    try:
        store.ingest(digest, size, _copier(src, name or _blob_name(digest)))
    except ImageError as e:
        raise ImageError(str(e), reference=src.reference) from None


def _layers(store: Store, src: _Source, config_digest: str, layers: list[tuple[str, str, int]]) -> Imported:
    """The config's diff_ids matched with the layers (digest, media type, size), as LayerRefs."""
    try:
        config = json.loads(store.read_blob(config_digest))
        diff_ids = list(config["rootfs"]["diff_ids"])
    except (ValueError, KeyError, TypeError) as e:
        raise ImageError(f"the image config has no rootfs.diff_ids ({e})", reference=src.reference) from None
    if len(diff_ids) != len(layers):
        raise ImageError(f"the config names {len(diff_ids)} layers, the manifest {len(layers)}",
                         reference=src.reference)  # fmt: skip
    refs = tuple(LayerRef(digest=d, media_type=t, size=s, diff_id=i)
                 for (d, t, s), i in zip(layers, diff_ids, strict=True))  # fmt: skip
    size = store.blob_path(config_digest).stat().st_size + sum(r.size for r in refs)
    return Imported(manifest="", config=config_digest, layers=refs, size=size)


def _pick(entries: list[dict[str, Any]], tag: str | None, reference: str) -> dict[str, Any]:
    tags = [e.get("annotations", {}).get(_REF_NAME) for e in entries]
    if tag is not None:
        for e, t in zip(entries, tags, strict=True):
            if t == tag:
                return e
        have = ", ".join(sorted(t for t in tags if t)) or "none"
        raise ImageError(f"no image tagged {tag!r} in the layout; its tags: {have}", reference=reference)
    if len(entries) == 1:
        return entries[0]
    if not entries:
        raise ImageError("the layout's index.json lists no image", reference=reference)
    have = ", ".join(sorted(t for t in tags if t)) or "untagged"
    raise ImageError(f"the layout holds {len(entries)} images: name one by its tag ({have})",
                     reference=reference)  # fmt: skip


def _host_image(store: Store, src: _Source, index: dict[str, Any]) -> dict[str, Any]:
    """From an image index: the entry for this host's platform (as a registry pull chooses)."""
    arch = _ARCH.get(platform.machine(), platform.machine())
    found = []
    for e in index.get("manifests", []):
        p = e.get("platform", {})
        found.append(f"{p.get('os')}/{p.get('architecture')}")
        if p.get("os") == "linux" and p.get("architecture") == arch:
            return dict(e)
    raise ImageError(f"no image for linux/{arch} in the index; it has {', '.join(found) or 'none'}",
                     reference=src.reference)  # fmt: skip


def _oci(store: Store, src: _Source, tag: str | None) -> Imported:
    if not src.has("oci-layout") or not src.has("index.json"):
        raise ImageError("not an OCI image layout (no oci-layout or index.json)", reference=src.reference)
    entry = _pick(list(src.json("index.json").get("manifests", [])), tag, src.reference)
    for _depth in range(3):  # an index may point to an index (per platform)
        digest, size = entry["digest"], entry.get("size")
        _ingest(store, src, digest, size)
        manifest = json.loads(store.read_blob(digest))
        if entry.get("mediaType", manifest.get("mediaType")) not in _INDEX_TYPES:
            break
        entry = _host_image(store, src, manifest)
    else:
        raise ImageError("image indexes nested too deep", reference=src.reference)
    config = manifest["config"]
    _ingest(store, src, config["digest"], config.get("size"))
    layers = []
    for layer in manifest["layers"]:
        _ingest(store, src, layer["digest"], layer.get("size"))
        layers.append((layer["digest"], layer.get("mediaType", _LAYER_TAR), int(layer["size"])))
    out = _layers(store, src, config["digest"], layers)
    return Imported(manifest=digest, config=out.config, layers=out.layers, size=out.size)


def _sha256_of(src: _Source, name: str) -> tuple[str, int, bool]:
    """A file's digest, size and whether it is gzipped (docker archives do not say)."""
    sha, size, head = hashlib.sha256(), 0, b""
    with src.open(name) as f:
        while chunk := f.read(1 << 20):
            head = head or chunk[:2]
            sha.update(chunk)
            size += len(chunk)
    return "sha256:" + sha.hexdigest(), size, head == b"\x1f\x8b"


def _docker(store: Store, src: _Source, tag: str | None) -> Imported:
    if not src.has("manifest.json"):
        raise ImageError("not a docker archive (no manifest.json)", reference=src.reference)
    images = src.json("manifest.json")
    if tag is not None:
        # docker and skopeo write Docker Hub names in full: "busybox:1" is docker.io/library/busybox:1
        names = {tag, f"docker.io/{tag}", f"docker.io/library/{tag}"}
        images = [i for i in images if names & set(i.get("RepoTags") or [])]
    if len(images) != 1:
        have = ", ".join(t for i in src.json("manifest.json") for t in i.get("RepoTags") or []) or "untagged"
        what = f"no image tagged {tag!r}" if tag is not None and not images else f"{len(images)} images"
        raise ImageError(f"the archive holds {what}: name one by its tag ({have})", reference=src.reference)
    image = images[0]
    config_digest, config_size, _ = _sha256_of(src, image["Config"])
    _ingest(store, src, config_digest, config_size, image["Config"])
    layers = []
    for name in image["Layers"]:
        digest, size, gz = _sha256_of(src, name)
        _ingest(store, src, digest, size, name)
        layers.append((digest, _LAYER_TAR + ("+gzip" if gz else ""), size))
    out = _layers(store, src, config_digest, layers)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": _OCI_MANIFEST,
        "config": {"mediaType": _OCI_CONFIG, "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": t, "digest": d, "size": s} for d, t, s in layers],
    }, separators=(",", ":"), sort_keys=True).encode()  # fmt: skip
    digest = "sha256:" + hashlib.sha256(manifest).hexdigest()

    def fill(out: BinaryIO) -> None:
        out.write(manifest)

    store.ingest(digest, len(manifest), fill)
    return Imported(manifest=digest, config=out.config, layers=out.layers, size=out.size)


def import_archive(store: Store, transport: str, path: str, tag: str | None = None, *,
                   reference: str | None = None) -> Imported:  # fmt: skip
    """Read the image at ``path`` (``transport``: ``oci``, ``oci-archive`` or ``docker-archive``)
    into ``store``; ``tag`` chooses one of several images. ``reference`` (the image as written)
    is named in every ``ImageError``: a missing file, not a layout, an unknown tag (the error
    lists those there are), a blob whose content does not match its digest."""
    reference = reference or f"{transport}:{path}" + (f":{tag}" if tag else "")
    if transport not in ("oci", "oci-archive", "docker-archive"):
        raise ImageError(f"{transport!r} is not a file transport", reference=reference)
    src = _Source(path, transport, reference)
    try:
        if transport == "docker-archive":
            return _docker(store, src, tag)
        return _oci(store, src, tag)
    except (KeyError, TypeError, AttributeError) as e:
        raise ImageError(f"malformed image description (missing {e})", reference=reference) from None
    finally:
        src.close()
