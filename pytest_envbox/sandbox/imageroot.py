"""An image service's root: the image's layers under an overlay, in place of the host's root.

:func:`~pytest_envbox.sandbox.rootfs.build_base` prepares the host-based root at ``/new`` while
the spare waits: ``/proc``, ``/sys``, ``/dev`` and ``/tmp`` of the sandbox's own. For an image
service, :func:`enter_image` mounts the overlay (the layers read-only, the service's writable
layer on top), moves those four into it, and moves the overlay over ``/new``; from there the root is
finished as for a host program (``/etc/hosts``, ``mounts``), except that every path of the
overlay is the sandbox's own: a missing mount target is made in the writable layer, never on a
host directory.

``/tmp`` is the sandbox's private tmpfs, as for host programs (API.md 6; ``Service.tmpfs`` sizes
it); ``/var/tmp`` and ``/run`` stay the image's, in the writable layer (as under Docker): the
writable layer is the service's alone already, and a tmpfs there would hide what images put in
them (a database image's ``/run/postgresql``, owned by its user).
"""

from __future__ import annotations

import ctypes
import errno
import os

from pytest_envbox.kernel import linux as L
from pytest_envbox.sandbox.plan import ImageRoot, SetupError

__all__ = ["IMAGE_MOVED", "enter_image", "overlay_options"]

_NEW = "/new"
_OLD = "/old"
_STAGE = "/image"
#: What the sandbox makes of its own in any root; the rest of the root is the image's.
IMAGE_MOVED = ("/proc", "/sys", "/dev", "/tmp")

# mount(2) takes its options in one page; past that, the new mount API adds layers one by one.
_PAGE = 4096
_SYS_FSOPEN, _SYS_FSCONFIG, _SYS_FSMOUNT, _SYS_MOVE_MOUNT = 430, 431, 432, 429  # every arch
_FSCONFIG_SET_FLAG, _FSCONFIG_SET_STRING, _FSCONFIG_CMD_CREATE = 0, 1, 6
_FSMOUNT_CLOEXEC, _MOVE_MOUNT_F_EMPTY_PATH, _AT_FDCWD = 1, 4, -100
# Its own handle on the C library: the kernel module's is private to it, and these four calls
# (the new mount API) are used only here.
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _escape(path: str) -> str:
    """A path as an overlay option value: ``:`` separates layers and ``,`` options."""
    if "," in path or "\\" in path:
        raise SetupError(f"an image layer path holds ',' or '\\' ({path}), which overlayfs "
                         "options cannot carry; set ENVBOX_STORE to a plainer path")  # fmt: skip
    return path.replace(":", "\\:")


def overlay_options(image: ImageRoot, prefix: str = _OLD) -> str:
    """The overlay's mount options, the host paths seen below ``prefix``."""
    lower = ":".join(_escape(prefix + p) for p in image.lower)
    opts = (f"lowerdir={lower},upperdir={_escape(prefix + image.rw)}/upper,"
            f"workdir={_escape(prefix + image.rw)}/work,volatile")  # fmt: skip
    return opts + ",userxattr" if image.userxattr else opts


def _sys(nr: int, *args: object, what: str) -> int:
    res = int(_libc.syscall(ctypes.c_long(nr), *args))
    if res < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return res


def _mount_new_api(image: ImageRoot, target: str) -> None:
    """The overlay through fsopen/fsconfig, one ``lowerdir+`` per layer (Linux 6.8): for a stack
    whose options do not fit in a page."""
    fs = _sys(_SYS_FSOPEN, ctypes.c_char_p(b"overlay"), ctypes.c_uint(1), what="fsopen(overlay)")
    try:
        def put(key: str, value: str | None) -> None:
            cmd = _FSCONFIG_SET_FLAG if value is None else _FSCONFIG_SET_STRING
            v = None if value is None else ctypes.c_char_p(os.fsencode(value))
            _sys(_SYS_FSCONFIG, ctypes.c_int(fs), ctypes.c_uint(cmd),
                 ctypes.c_char_p(key.encode()), v, ctypes.c_int(0), what=f"fsconfig({key})")  # fmt: skip

        try:
            for layer in image.lower:
                put("lowerdir+", _OLD + layer)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            raise SetupError(f"the image has {len(image.lower)} layers, too many for one mount "
                             "option page, and this kernel lacks overlayfs' 'lowerdir+' (Linux "
                             "6.8); flatten the image or use a newer kernel") from None  # fmt: skip
        put("upperdir", _OLD + image.rw + "/upper")
        put("workdir", _OLD + image.rw + "/work")
        put("volatile", None)
        if image.userxattr:
            put("userxattr", None)
        _sys(_SYS_FSCONFIG, ctypes.c_int(fs), ctypes.c_uint(_FSCONFIG_CMD_CREATE), None, None,
             ctypes.c_int(0), what="fsconfig(create)")  # fmt: skip
        mnt = _sys(_SYS_FSMOUNT, ctypes.c_int(fs), ctypes.c_uint(_FSMOUNT_CLOEXEC),
                   ctypes.c_uint(L.MOUNT_ATTR_NOSUID | L.MOUNT_ATTR_NODEV), what="fsmount")  # fmt: skip
    finally:
        os.close(fs)
    try:
        _sys(_SYS_MOVE_MOUNT, ctypes.c_int(mnt), ctypes.c_char_p(b""), ctypes.c_int(_AT_FDCWD),
             ctypes.c_char_p(os.fsencode(target)), ctypes.c_uint(_MOVE_MOUNT_F_EMPTY_PATH),
             what="move_mount")  # fmt: skip
    finally:
        os.close(mnt)


def _mount_relative(image: ImageRoot, target: str) -> bool:
    """The overlay with its lower layers as paths relative to their common directory, which
    the mount resolves from the working directory; False when that does not fit in a page either."""
    common = os.path.commonpath(image.lower)
    if common in image.lower:
        common = os.path.dirname(common)
    lower = ":".join(_escape(os.path.relpath(p, common)) for p in image.lower)
    rest = overlay_options(image).split(",", 1)[1]
    opts = f"lowerdir={lower},{rest}"
    if len(opts) >= _PAGE:
        return False
    here = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.chdir(_OLD + common)
        L.mount("overlay", target, "overlay", L.MS_NOSUID | L.MS_NODEV, opts)
    finally:
        os.fchdir(here)
        os.close(here)
    return True


def mount_overlay(image: ImageRoot, target: str) -> None:
    """The image's overlay at ``target`` (nosuid, nodev).

    ``volatile`` (Linux 5.10): no sync of the writable layer's filesystem when the overlay goes
    (overlayfs otherwise syncs the whole filesystem holding it, ``~/.cache`` say, at every stop
    and teardown: milliseconds, seconds under write load). The layer is thrown away with its
    run, so a host crash has nothing to lose; supervisor/rwlayers.py ``reuse_rw`` clears the
    mark that makes the kernel refuse the next mount at a restart."""
    opts = overlay_options(image)
    try:
        if len(opts) < _PAGE:
            L.mount("overlay", target, "overlay", L.MS_NOSUID | L.MS_NODEV, opts)
            return
        try:
            _mount_new_api(image, target)
        except SetupError:
            # Before Linux 6.8: the layers named relative to the directory they share (the
            # store's layers/sha256/: 65 bytes a layer, about 60 in a page), if that fits.
            if not _mount_relative(image, target):
                raise
    except OSError as e:
        raise SetupError(f"the image's overlay could not be mounted ({e.strerror}); its layers "
                         f"{image.lower[0]}... and writable layer {image.rw}") from e  # fmt: skip


def _move(src: str, dst: str) -> None:
    """Move the mount tree at ``src`` to ``dst``; where the kernel refuses to move it (a host
    mount locked in a user namespace: rootless ``/sys``), bind it there instead."""
    try:
        L.mount(src, dst, None, L.MS_MOVE)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EPERM):
            raise
        L.mount(src, dst, None, L.MS_BIND | L.MS_REC)


def enter_image(image: ImageRoot) -> None:
    """Make the image's overlay the new root at ``/new``, with the sandbox's ``/proc``, ``/sys``,
    ``/dev`` and ``/tmp`` moved into it (mount points made in the writable layer where the image has
    none)."""
    os.mkdir(_STAGE)
    mount_overlay(image, _STAGE)
    for path in IMAGE_MOVED:
        dst = _STAGE + path
        if os.path.islink(dst) or (os.path.lexists(dst) and not os.path.isdir(dst)):
            raise SetupError(f"the image's {path} is not a directory; the sandbox mounts its own "
                             "there")  # fmt: skip
        if not os.path.lexists(dst):
            os.mkdir(dst, {"/dev": 0o755, "/tmp": 0o1777}.get(path, 0o555))
        _move(_NEW + path, dst)
    # Over the host-based root: the pivot detaches both, with everything below them.
    L.mount(_STAGE, _NEW, None, L.MS_MOVE)
