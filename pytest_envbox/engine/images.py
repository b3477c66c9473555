"""Images for the engine: one store and one puller per process, shared by every environment.

The front ends set how progress is drawn (:func:`~pytest_envbox.images.progress.set_default_show`); environments ask for a service's
image with :func:`prepare`, which pulls it only as its ``pull`` policy says and remembers it.
"""

from __future__ import annotations

import os
import secrets
import threading
from collections.abc import Sequence
from pathlib import Path

from pytest_envbox.engine.client import rootless
from pytest_envbox.engine.planning import plan_for_image
from pytest_envbox.images.imageconfig import apply_image_defaults
from pytest_envbox.images.pull import PreparedImage, Puller, reference_of
from pytest_envbox.images.store import Store, store_root
from pytest_envbox.sandbox.plan import SandboxPlan
from pytest_envbox.spec import Service

__all__ = ["open_store", "plan_image", "prepare", "rw_dir"]

_lock = threading.Lock()
_store: Store | None = None
_pullers: dict[tuple[str, ...], Puller] = {}
#: Names this process's writable layers: ``rw/<pid>-<random>/<environment>-<service>``.
_token = f"{os.getpid()}-{secrets.token_hex(4)}"


def open_store() -> Store:
    """The store of this user (``$ENVBOX_STORE``, else ``$XDG_CACHE_HOME/envbox``)."""
    global _store
    with _lock:
        if _store is None or _store.root != store_root():
            _store = Store(store_root(), rootless=os.geteuid() != 0 or rootless())
        return _store


def prepare(spec: Service, rootdir: Path, insecure: Sequence[str] = ()) -> PreparedImage:
    """The image of ``spec``, in the store and unpacked, as its ``pull`` policy says."""
    assert spec.image is not None
    ref = reference_of(spec.image, base=str(rootdir), service=spec.name)
    store = open_store()
    with _lock:
        key = tuple(sorted(insecure))
        puller = _pullers.get(key)
        if puller is None or puller.store is not store:
            puller = _pullers[key] = Puller(store, insecure=key)
    return puller.get(ref, spec.pull)


def rw_dir(environment: str, service: str) -> str:
    """Where the writable layer of ``service`` in ``environment`` lives while it runs."""
    global _token
    if not _token.startswith(f"{os.getpid()}-"):  # a fork (xdist's workers are processes)
        _token = f"{os.getpid()}-{secrets.token_hex(4)}"
    return str(open_store().rw_root / _token / f"{environment}-{service}")


def plan_image(spec: Service, rootdir: Path, environment: str, insecure: Sequence[str] = ()
               ) -> tuple[Service, SandboxPlan]:  # fmt: skip
    """``spec`` with its image's defaults under the declaration, and its sandbox plan."""
    image = prepare(spec, rootdir, insecure)
    resolved = apply_image_defaults(spec, image.config)
    plan = plan_for_image(resolved, rootdir, image.config, list(image.layers),
                          rw_dir(environment, spec.name), open_store().userxattr, image.reference)
    return resolved, plan
