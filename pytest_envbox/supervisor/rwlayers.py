"""The writable layers of image services: made at a service's first start, kept across its
restarts, removed when its environment releases it, and after a killed run by the janitor.

A writable layer is a directory holding ``upper/`` and ``work/`` (overlayfs' upper and work
directories, see sandbox/imageroot.py). The supervisor makes it: as root, or in rootless mode as
root of its user namespace, so that the layer's root is root's inside the service. Files the
service writes there may belong to any of its users: in rootless mode those are subordinate ids,
which only a process in a user namespace with the same map may delete. The supervisor is in one;
``envbox clean`` is not, so it runs this module (``python -m``) in a fresh one
(:func:`~pytest_envbox.supervisor.userns.enter_user_namespace`, the supervisor's map).

A path to remove comes from a run's record, which is data: it must prove to be a writable layer
(:func:`remove_rw`) before anything is deleted. Standard library only: the supervisor imports it.
"""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import sys

__all__ = ["make_rw", "remove_rw", "reuse_rw"]

_PARTS = frozenset({"upper", "work"})


def make_rw(path: str) -> bool:
    """Make the writable layer ``path`` (and its parents, mode 0700) unless it exists; True when
    it was made now."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        return False
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path), 0o700, exist_ok=True)
        os.mkdir(path, 0o700)
    for part in ("upper", "work"):
        os.mkdir(os.path.join(path, part), 0o755)
    return True


def reuse_rw(path: str) -> None:
    """Ready the writable layer ``path`` for the service's next start (a restart): the mark a
    ``volatile`` overlay leaves in its work directory goes, or the kernel refuses the mount.

    ``volatile`` skips overlayfs' sync of the writable layer at unmount (milliseconds at each
    stop and teardown); the mark says the layer may be incomplete after a host crash. A layer
    lives only within one run, never across a crash, and a service's previous run has ended
    (its mount with it) before the next one starts: its files are all there.
    """
    mark = os.path.join(path, "work", "work", "incompat", "volatile")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(mark, "dirty"))
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(mark)


def _is_rw(parent_fd: int, name: str) -> bool:
    """``name`` below ``parent_fd`` is a real directory of ours holding only upper/ and work/."""
    try:
        st = os.lstat(name, dir_fd=parent_fd)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            return False
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                     dir_fd=parent_fd)  # fmt: skip
    except OSError:
        return False
    try:
        return set(os.listdir(fd)) <= _PARTS
    finally:
        os.close(fd)


def remove_rw(path: str, *, helper: bool = True) -> str | None:
    """Remove the writable layer ``path`` if it proves to be one; return it, or None when it was
    left alone (not one, or already gone).

    The proof: an absolute, normal path; a real directory (no link followed on its last step)
    owned by us, holding nothing but ``upper`` and ``work``. The tree is removed through
    descriptors (``shutil.rmtree`` with ``dir_fd``), never following a link inside; its parent (the
    run's directory) goes too once empty. Files left that we may not delete (subordinate ids, in
    rootless mode, outside the user namespace) are removed by :func:`_in_user_namespace` if
    ``helper``.
    """
    import shutil

    parent, name = os.path.split(path)
    if not (os.path.isabs(path) and os.path.normpath(path) == path and name):
        return None
    try:
        parent_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    failed: list[BaseException] = []
    try:
        if not _is_rw(parent_fd, name):
            return None
        if sys.version_info >= (3, 12):
            shutil.rmtree(name, dir_fd=parent_fd, onexc=lambda *a: failed.append(a[2]))
        else:  # onerror, deprecated since
            shutil.rmtree(name, dir_fd=parent_fd, onerror=lambda *a: failed.append(a[2][1]))
    finally:
        os.close(parent_fd)
    if failed and os.path.lexists(path) and not (helper and os.geteuid() != 0
                                                 and _in_user_namespace(path)):  # fmt: skip
        return None
    with contextlib.suppress(OSError):
        os.rmdir(parent)  # the run's directory, once its last layer is gone
    return path


def _in_user_namespace(path: str) -> bool:
    """Remove ``path`` from a new user namespace with the supervisor's id map (rootless)."""
    # This package from where it was imported, installed or not.
    top = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [top, os.environ.get("PYTHONPATH")]))}
    try:
        done = subprocess.run([sys.executable, "-m", __name__, path], stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=60, check=False, env=env)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0 and not os.path.lexists(path)


def _main(paths: list[str]) -> int:
    from pytest_envbox.supervisor.userns import enter_user_namespace

    enter_user_namespace()
    # As root of the namespace now: our own files are root's, the subordinate ids mapped.
    gone = [remove_rw(p, helper=False) for p in paths]
    return 0 if all(g is not None for g in gone) else 1


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
