"""Binding a host path that was opened without following symbolic links (Linux >= 5.6).

A bind mount by path follows every symbolic link on the way, at the moment of the mount. When a
service can write to a directory that holds another mount's source, it can swap that source (or a
directory on its path) for a symbolic link to any host path, and the next bind would expose the
link's target: Kubernetes' CVE-2017-1002101. So sources are opened first, with ``openat2``
refusing every symbolic link (:func:`open_nofollow`), and the bind is made from the open file
descriptor (:func:`bind_fd`, ``open_tree`` + ``move_mount``), so what is checked is what is
mounted. These are the new mount API's calls, which :mod:`~pytest_envbox.kernel.linux` does not
bind; like it, every failure is an ``OSError`` naming its call.
"""

from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["MOUNT_ATTR_NOSYMFOLLOW", "bind_fd", "clear_attrs", "open_nofollow"]

# System call numbers shared by every architecture since they were added (asm-generic).
_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429
_SYS_OPENAT2 = 437
_SYS_MOUNT_SETATTR = 442

#: Path lookups through the mount refuse every symbolic link on it (Linux 5.10).
MOUNT_ATTR_NOSYMFOLLOW = 0x00200000
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08
_OPEN_TREE_CLONE = 1
_AT_EMPTY_PATH = 0x1000
_AT_RECURSIVE = 0x8000
_MOVE_MOUNT_F_EMPTY_PATH = 0x04
_AT_FDCWD = -100

_libc = ctypes.CDLL(None, use_errno=True)
if sys.platform.startswith("linux"):
    _libc.syscall.restype = ctypes.c_long


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]  # fmt: skip


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def open_nofollow(dirfd: int, path: str) -> int:
    """An ``O_PATH`` descriptor of ``path`` below ``dirfd``, refusing any symbolic link on the way.

    ``ELOOP`` when a component (the last one included) is a symbolic link; ``..`` cannot climb
    above ``dirfd`` either. The caller closes the descriptor.
    """
    how = _OpenHow(os.O_PATH | os.O_CLOEXEC, 0,
                   _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS | _RESOLVE_BENEATH)  # fmt: skip
    res = _libc.syscall(ctypes.c_long(_SYS_OPENAT2), ctypes.c_int(dirfd),
                        ctypes.c_char_p(os.fsencode(path)), ctypes.byref(how),
                        ctypes.c_size_t(ctypes.sizeof(how)))  # fmt: skip
    return _check(res, f"openat2({path})")


def bind_fd(fd: int, target: str, attrs: int = 0) -> None:
    """Bind what ``fd`` refers to (and every mount below it) at ``target``, with mount ``attrs``.

    The copy gets its attributes (``MOUNT_ATTR_RDONLY``...) before it is attached, so it is never
    visible with fewer restrictions than asked.
    """
    tree = _check(_libc.syscall(ctypes.c_long(_SYS_OPEN_TREE), ctypes.c_int(fd), ctypes.c_char_p(b""),
                                ctypes.c_uint(_OPEN_TREE_CLONE | os.O_CLOEXEC | _AT_RECURSIVE
                                              | _AT_EMPTY_PATH)), f"open_tree({target})")  # fmt: skip
    try:
        if attrs:
            _setattr(tree, b"", _AT_EMPTY_PATH, attrs, 0, target)
        _check(_libc.syscall(ctypes.c_long(_SYS_MOVE_MOUNT), ctypes.c_int(tree), ctypes.c_char_p(b""),
                             ctypes.c_int(_AT_FDCWD), ctypes.c_char_p(os.fsencode(target)),
                             ctypes.c_uint(_MOVE_MOUNT_F_EMPTY_PATH)), f"move_mount({target})")  # fmt: skip
    finally:
        os.close(tree)


def clear_attrs(path: str, attrs: int) -> None:
    """Clear mount ``attrs`` on ``path`` and every mount below it."""
    _setattr(_AT_FDCWD, os.fsencode(path), 0, 0, attrs, path)


def _setattr(dirfd: int, path: bytes, flags: int, set_: int, clear: int, what: str) -> None:
    attr = _MountAttr(set_, clear, 0, 0)
    _check(_libc.syscall(ctypes.c_long(_SYS_MOUNT_SETATTR), ctypes.c_int(dirfd), ctypes.c_char_p(path),
                         ctypes.c_uint(flags | _AT_RECURSIVE), ctypes.byref(attr),
                         ctypes.c_size_t(ctypes.sizeof(attr))), f"mount_setattr({what})")  # fmt: skip
