"""Getting an image ready to run: into the store (from a registry or a file), its layers unpacked.

:class:`Puller` is what the engine and ``envbox pull`` use. It follows the pull policy
(``missing``, ``always``, ``never``: Kubernetes' IfNotPresent, Always, Never), downloads a
registry image's blobs in parallel into the store (which verifies each against its digest and
stores it once, across processes), unpacks the layers, and remembers what it prepared for the
life of the process: the hundredth test of a session that uses ``redis:7`` costs a dictionary
lookup and a ``stat``, not a registry round trip.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pytest_envbox.errors import ConfigError, ImageError
from pytest_envbox.images import archive
from pytest_envbox.images.imageconfig import ImageConfig
from pytest_envbox.images.progress import PullProgress, Show
from pytest_envbox.images.reference import ImageRef, parse_reference
from pytest_envbox.images.registry import Descriptor, Registry
from pytest_envbox.images.store import ImageRecord, LayerRef, Store

__all__ = ["POLICIES", "PulledImage", "Puller", "reference_of"]

POLICIES = ("missing", "always", "never")
#: Blobs downloaded at once: skopeo's and containerd's default is 3 (more mostly helps far
#: registries; the store's verification is the bottleneck on loopback).
_PARALLEL = 3


@dataclass(frozen=True)
class PulledImage:
    """An image in the store with its layers unpacked: what a service's root is made of."""

    reference: str
    record: ImageRecord
    config: ImageConfig
    #: unpacked layer directories, bottom first
    layers: tuple[Path, ...]


def reference_of(text: str, *, base: str | None = None, service: str | None = None) -> ImageRef:
    """``text`` as a reference, or a :class:`ConfigError` naming the service and key ``image``."""
    try:
        return parse_reference(text, base=base)
    except ValueError as e:
        raise ConfigError(str(e), service=service, key="image") from None


class Puller:
    """Pulls and prepares images into ``store``; one per process is enough (it keeps the
    registry's connections and what it prepared).

    ``show`` draws progress (see :mod:`~pytest_envbox.images.progress`); ``insecure``: registries
    reached over plain HTTP besides loopback ones.
    """

    def __init__(self, store: Store, *, insecure: Sequence[str] = (), show: Show | None = None
                 ) -> None:  # fmt: skip
        # show None: the front end's default (images.progress.set_default_show)
        self.store = store
        self.show = show
        self._insecure = tuple(insecure)
        self._registry: Registry | None = None
        self._prepared: dict[str, PulledImage] = {}
        self._lock = threading.Lock()

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            self._registry = Registry(insecure=self._insecure)
        return self._registry

    def close(self) -> None:
        if self._registry is not None:
            self._registry.close()
            self._registry = None

    def get(self, ref: ImageRef, policy: str = "missing") -> PulledImage:
        """The image ``ref``, pulled as ``policy`` says and unpacked; :class:`ImageError` when it
        cannot be had (the reference and the registry's answer in the message)."""
        name = str(ref)
        with self._lock:
            known = self._prepared.get(name)
            if known is not None and policy != "always" and all(p.is_dir() for p in known.layers):
                return known
            record = self.pull(ref, policy)
            config = ImageConfig.from_json(self.store.read_blob(record.config))
            progress = PullProgress(name, self.show)
            progress.phase("unpacking")
            layers = tuple(self.store.unpack(record.layers))
            progress.finish(f"unpacked {name}")
            self.store.touch(name)
            prepared = PulledImage(name, record, config, layers)
            self._prepared[name] = prepared
            return prepared

    def pull(self, ref: ImageRef, policy: str = "missing") -> ImageRecord:
        """The image's record in the store, fetched as ``policy`` says (layers not unpacked)."""
        name = str(ref)
        if policy not in POLICIES:
            raise ConfigError(f"{policy!r} is not a pull policy; use one of {', '.join(POLICIES)}",
                              key="pull")  # fmt: skip
        record = self.store.load_image(name)
        if record is not None and not self._complete(record):
            record = None  # blobs pruned since: fetch again
        if policy == "never":
            if record is None:
                raise ImageError('is not in the store and pull = "never" forbids fetching it; run '
                                 f'`envbox pull {name}` first, or set pull = "missing"',
                                 reference=name)  # fmt: skip
            return record
        if record is not None and policy == "missing":
            return record
        if ref.transport != "docker":
            return self._import(ref)
        return self._from_registry(ref, record)

    def _complete(self, record: ImageRecord) -> bool:
        return self.store.has_blob(record.config) and all(
            self.store.has_blob(layer.digest) for layer in record.layers)

    def _import(self, ref: ImageRef) -> ImageRecord:
        name = str(ref)
        progress = PullProgress(name, self.show)
        progress.phase("importing")
        got = archive.import_archive(self.store, ref.transport, ref.path, ref.tag, reference=name)
        now = time.time()
        record = ImageRecord(name=name, digest=got.manifest, config=got.config,
                             layers=list(got.layers), size=got.size, pulled=now, last_used=now)
        self.store.save_image(record)
        progress.finish(f"imported {name}")
        return record

    def _from_registry(self, ref: ImageRef, known: ImageRecord | None) -> ImageRecord:
        name = str(ref)
        progress = PullProgress(name, self.show)
        manifest = self.registry.manifest(ref)
        if known is not None and known.digest == manifest.digest:
            progress.finish(f"{name} is up to date")
            return known
        missing = [d for d in manifest.layers if not self.store.has_blob(d.digest)]
        for d in manifest.layers:
            progress.layer(d.digest, d.size if d not in missing else 0, d.size)
        progress.phase("downloading")
        config_path = self.store.ingest(manifest.config.digest, manifest.config.size,
                                        self._filler(ref, manifest.config, None))  # fmt: skip
        config = ImageConfig.from_json(config_path.read_bytes())
        if len(config.diff_ids) != len(manifest.layers):
            raise ImageError(f"its manifest lists {len(manifest.layers)} layers but its config "
                             f"{len(config.diff_ids)} (rootfs.diff_ids): the image is corrupt; "
                             "push it again", reference=name)  # fmt: skip
        if missing:
            with ThreadPoolExecutor(min(_PARALLEL, len(missing)), "envbox-pull") as pool:
                jobs = [pool.submit(self.store.ingest, d.digest, d.size, self._filler(ref, d, progress))
                        for d in missing]  # fmt: skip
                for job in jobs:
                    job.result()  # the first failure raises; the store keeps nothing unverified
        layers = [LayerRef(d.digest, d.media_type, d.size, diff) for d, diff in
                  zip(manifest.layers, config.diff_ids, strict=True)]  # fmt: skip
        now = time.time()
        record = ImageRecord(name=name, digest=manifest.digest, config=manifest.config.digest,
                             layers=layers, size=sum(d.size for d in manifest.layers)
                             + manifest.config.size, pulled=now, last_used=now)  # fmt: skip
        self.store.save_image(record)
        progress.finish(f"pulled {name}")
        return record

    def _filler(self, ref: ImageRef, desc: Descriptor, progress: PullProgress | None
                ) -> Callable[[BinaryIO], None]:  # fmt: skip
        def fill(out: BinaryIO) -> None:
            report = None if progress is None else (lambda n: progress.layer(desc.digest, n, desc.size))
            self.registry.blob(ref, desc, out, report)
            if progress is not None:
                progress.layer(desc.digest, desc.size, desc.size)

        return fill
