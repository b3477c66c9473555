"""The first failing start on a host that says no: the refusal explained, once per process.

A start that fails with ``EPERM`` where the sandbox makes its namespaces or mounts says only
``unshare(0x6e020000): Operation not permitted``. That is true and useless to someone on a GitHub
runner or in a GitLab container: :func:`explain` probes the host (:mod:`.kernel.refusal`) and, when
it finds the refusal, gives a :class:`~pytest_envbox.errors.HostUnsupported` that says what was
refused, why, and the fix for that host. The probe runs once per process, and only after a
failure that could be one (a refused call), so a working host never pays for it.
"""

from __future__ import annotations

import threading

from pytest_envbox.engine.client import rootless
from pytest_envbox.errors import HostUnsupported
from pytest_envbox.kernel import refusal

__all__ = ["explain", "host_refusal"]

_lock = threading.Lock()
_found: dict[bool, refusal.Refusal | None] = {}
#: what a failure caused by a refusal says somewhere in its message
_REFUSED = ("Operation not permitted", "Permission denied", "No space left on device", "EPERM", "EACCES",
            "Read-only file system", "EROFS")  # a container's /proc/sys


def host_refusal() -> refusal.Refusal | None:
    """This host's refusal for this process's mode (rootless or not), probed once."""
    mode = rootless()
    with _lock:
        if mode not in _found:
            _found[mode] = refusal.classify(refusal.probe(mode))
        return _found[mode]


def explain(error: BaseException) -> HostUnsupported | None:
    """The refusal behind ``error``, as a HostUnsupported to raise instead; None when ``error``
    is something else (a service's own failure, a bad declaration) or the host refuses nothing."""
    if isinstance(error, HostUnsupported) and error.refusal is not None:
        return None  # explained already
    if not any(word in str(error) for word in _REFUSED):
        return None
    found = host_refusal()
    if found is None:
        return None
    return HostUnsupported(f"{found.block()}\n  (the start failed with: {error})", refusal=found.kind)
