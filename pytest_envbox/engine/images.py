"""Images for the engine: one store and one puller per process, shared by every environment.

The front ends set how progress is drawn (:func:`~pytest_envbox.images.progress.set_default_show`);
environments ask for a service's image with :func:`prepare`, which pulls it only as its ``pull``
policy says and remembers what it prepared.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path

from pytest_envbox.engine.client import rootless
from pytest_envbox.engine.imageplan import PreparedImage
from pytest_envbox.images.pull import Puller, reference_of
from pytest_envbox.images.store import Store, store_root
from pytest_envbox.spec import Service

__all__ = ["open_store", "prepare"]

_lock = threading.Lock()
_store: Store | None = None
_pullers: dict[tuple[str, ...], Puller] = {}


def open_store() -> Store:
    """The store of this user (``$ENVBOX_STORE``, else ``$XDG_CACHE_HOME/envbox``)."""
    global _store
    with _lock:
        root = store_root()
        if _store is None or _store.root != root:
            _store = Store(root, rootless=os.geteuid() != 0 or rootless())
            _pullers.clear()
        return _store


def prepare(spec: Service, rootdir: Path, insecure: Sequence[str] = ()) -> PreparedImage:
    """The image of ``spec``, in the store and unpacked, as its ``pull`` policy says."""
    assert spec.image is not None
    ref = reference_of(spec.image, base=str(rootdir), service=spec.name)
    store = open_store()
    with _lock:
        key = tuple(sorted(insecure))
        puller = _pullers.get(key)
        if puller is None:
            puller = _pullers[key] = Puller(store, insecure=key)
    got = puller.get(ref, spec.pull)
    return PreparedImage(got.reference, got.config, got.layers, store.rw_root, store.userxattr)
