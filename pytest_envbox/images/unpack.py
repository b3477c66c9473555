"""Unpacking one image layer into an empty directory, safely, as an overlayfs lower directory.

Python 3.11.2 (Debian 12's) has no tarfile extraction filters, and ``TarFile.extractall`` trusts
the archive, so this module creates every entry itself, relative to directory file descriptors
it opened with ``O_NOFOLLOW``: no path in a hostile layer can leave the layer's directory.

- Absolute names and ``..`` components are refused (an ``ImageError`` naming the member and the
  layer), never rewritten: a layer that has them was made to attack, not by a build tool.
- A symlink is never followed while entries are created: every parent component must be a real
  directory (opened ``O_DIRECTORY | O_NOFOLLOW``). Symlinks themselves are created as written:
  their targets are resolved by the kernel inside the service's root at run time.
- A hardlink may only point to a non-directory extracted earlier in this same layer.
- Character and block devices are skipped (rootless cannot make them, and the sandbox provides
  its own ``/dev``); FIFOs are made. Setuid and setgid bits on files are dropped in both modes:
  the sandbox runs with ``no_new_privs``, where they do nothing, and a setuid-root file in a
  store on the host would be a host risk.
- Regular files get exactly the bytes the layer holds; GNU/PAX sparse files are written with
  holes (seek), not expanded.
- Owners are the tar's uid/gid when we are root (or root of the user namespace); an id the
  namespace does not map falls back to 0 (counted in :attr:`Unpacked.unmapped`). Modes and mtimes
  are kept; of the extended attributes only ``user.*`` (and ``trusted.*`` as real root) are kept,
  never ``*.overlay.*`` (a layer must not forge overlayfs metadata) nor ``security.capability``.
- OCI whiteouts are converted, not applied, since each layer is its own overlayfs lower
  directory: ``.wh.NAME`` becomes a whiteout (character device 0:0) named NAME, and
  ``.wh..wh..opq`` marks its directory opaque (``trusted.overlay.opaque`` as root,
  ``user.overlay.opaque`` rootless, where the overlay is mounted with ``userxattr``).

The uncompressed stream is hashed while it is read and must match the layer's ``diff_id``.
"""

from __future__ import annotations

import errno
import gzip
import os
import shutil
import stat
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO, cast

from pytest_envbox.errors import ImageError
from pytest_envbox.images.layerstream import LayerStream

__all__ = ["Unpacked", "install_layers", "remove_trees", "unpack_layer"]

_BUF = 1 << 20
_TAR_BUF = 1 << 16
_WHITEOUT = ".wh."
_OPAQUE = ".wh..wh..opq"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass
class Unpacked:
    """What unpacking a layer did: bytes of its tar stream and what it left out, and why."""

    size: int = 0
    entries: int = 0
    unmapped: int = 0  # entries whose owner the user namespace does not map (owned by 0 instead)
    skipped: list[str] = field(default_factory=list)  # "path: why"


def _parts(name: str, what: str, where: str) -> list[str]:
    """A member name as path components below the layer's root; refuses escapes."""
    if name.startswith("/"):
        raise ImageError(f"{where}: member {what!r} has an absolute path: refused")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ImageError(f"{where}: member {what!r} has a '..' component: refused")
    return parts


class _Tree:
    """The layer's directory, reached only through directory fds opened without following links."""

    def __init__(self, root_fd: int, where: str) -> None:
        self.root = root_fd
        self.where = where
        self.files: set[tuple[str, ...]] = set()  # non-directories made in this layer (link targets)
        # Directories' mode, owner and mtime, set once their entries are in (a 0555 directory
        # would refuse them; each new entry changes the mtime).
        self.dirs: dict[tuple[str, ...], tuple[int, int, int, int]] = {}
        self._cache: tuple[tuple[str, ...], int] | None = None

    def forget(self) -> None:
        if self._cache is not None:
            os.close(self._cache[1])
            self._cache = None

    def parent(self, parts: tuple[str, ...], member: str) -> int:
        """An fd of the directory ``parts``, made as needed; the caller must not close it."""
        if self._cache is not None and self._cache[0] == parts:
            return self._cache[1]
        self.forget()
        fd = os.dup(self.root)
        try:
            for i, part in enumerate(parts):
                try:
                    nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    # A tar may omit the directories above an entry: make them, as tar does.
                    os.mkdir(part, 0o755, dir_fd=fd)
                    self.dirs.setdefault(parts[: i + 1], (0o755, 0, 0, -1))
                    nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except OSError as e:
                    if e.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise ImageError(f"{self.where}: member {member!r} goes through "
                                         f"{'/'.join(parts[: i + 1])!r}, which is not a directory "
                                         "(a symlink?): refused") from None  # fmt: skip
                    raise
                os.close(fd)
                fd = nfd
        except BaseException:
            os.close(fd)
            raise
        self._cache = (parts, fd)
        return fd

    def clear(self, pfd: int, name: str, path: tuple[str, ...], keep_dir: bool) -> bool:
        """Make room for a new entry; True when a directory is there and kept (merged into)."""
        try:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if stat.S_ISDIR(st.st_mode):
            if keep_dir:
                return True
            shutil.rmtree(name, dir_fd=pfd)
            self.files = {p for p in self.files if p[: len(path)] != path}
            self.dirs = {p: v for p, v in self.dirs.items() if p[: len(path)] != path}
        else:
            os.unlink(name, dir_fd=pfd)
            self.files.discard(path)
        return False


def _owner(fd: int | None, name: str, pfd: int, uid: int, gid: int, out: Unpacked) -> None:
    """chown, falling back to 0 for ids the user namespace does not map (EINVAL)."""
    try:
        if fd is not None:
            os.fchown(fd, uid, gid)
        else:
            os.chown(name, uid, gid, dir_fd=pfd, follow_symlinks=False)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        out.unmapped += 1
        if fd is not None:
            os.fchown(fd, 0, 0)
        else:
            os.chown(name, 0, 0, dir_fd=pfd, follow_symlinks=False)


def _xattrs(fd: int, member: tarfile.TarInfo, real_root: bool) -> None:
    for key, value in member.pax_headers.items():
        if not key.startswith("SCHILY.xattr."):
            continue
        name = key[len("SCHILY.xattr."):]
        wanted = name.startswith("user.") or (real_root and name.startswith("trusted."))
        if ".overlay." in name or not wanted:
            continue  # security.capability, ACLs, SELinux labels: not for a test's sandbox
        try:
            os.setxattr(fd, name, value.encode("utf-8", "surrogateescape"))
        except OSError as e:
            if e.errno not in (errno.ENOTSUP, errno.EPERM):
                raise


def _write_file(tf: tarfile.TarFile, fd: int, m: tarfile.TarInfo) -> None:
    sparse = cast("list[tuple[int, int]] | None", m.sparse)  # typeshed says bytes: it is not
    if sparse:
        # The archive holds the data blocks one after the other; holes stay holes (a 1 TiB
        # sparse file costs what it holds). Read straight from the stream: tarfile's own file
        # object would seek backwards over its read-ahead, which a stream cannot.
        raw = cast(BinaryIO, tf.fileobj)
        raw.seek(m.offset_data)
        for offset, numbytes in sparse:
            if offset + numbytes > m.size:
                raise ImageError(f"member {m.name!r}: sparse block past the file's size")
            os.lseek(fd, offset, os.SEEK_SET)
            _copy(raw, fd, numbytes, m.name)
        os.ftruncate(fd, m.size)
        return
    src = tf.extractfile(m)
    assert src is not None
    _copy(cast(BinaryIO, src), fd, m.size, m.name)


def _copy(src: BinaryIO, fd: int, size: int, name: str) -> None:
    left = size
    while left > 0:
        data = src.read(min(left, _BUF))
        if not data:
            raise ImageError(f"member {name!r} ends early: the layer is truncated")
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        left -= len(data)


def _entry(tf: tarfile.TarFile, m: tarfile.TarInfo, tree: _Tree, opaque: str, out: Unpacked) -> None:
    where = tree.where
    parts = _parts(m.name, m.name, where)
    real_root = os.geteuid() == 0 and opaque.startswith("trusted.")
    chown = os.geteuid() == 0
    mode = m.mode & 0o7777
    if not parts:  # the layer's root itself ("./")
        if m.isdir():
            tree.dirs[()] = (mode, m.uid, m.gid, int(m.mtime))
        return
    *up, name = parts
    path = tuple(parts)
    pfd = tree.parent(tuple(up), m.name)
    if name == _OPAQUE:
        dfd = os.open(".", _DIR_FLAGS, dir_fd=pfd)
        try:
            os.setxattr(dfd, opaque, b"y")
        finally:
            os.close(dfd)
        return
    if name.startswith(_WHITEOUT):
        target = name[len(_WHITEOUT):]
        if target.startswith(".wh.") or not target:
            out.skipped.append(f"{m.name}: an AUFS special whiteout, meaningless here")
            return
        tree.clear(pfd, target, (*up, target), keep_dir=False)
        os.mknod(target, stat.S_IFCHR | 0o600, os.makedev(0, 0), dir_fd=pfd)
        tree.files.add((*up, target))
        return
    if m.ischr() or m.isblk():
        out.skipped.append(f"{m.name}: a device node (the sandbox provides its own /dev)")
        return
    merged = tree.clear(pfd, name, path, keep_dir=m.isdir())
    if m.isdir():
        if not merged:
            os.mkdir(name, 0o700, dir_fd=pfd)  # its mode once its entries are in (it may be 0555)
        tree.dirs[path] = (mode, m.uid, m.gid, int(m.mtime))
        dfd = os.open(name, _DIR_FLAGS, dir_fd=pfd)
        try:
            _xattrs(dfd, m, real_root)
        finally:
            os.close(dfd)
        return
    if m.islnk():
        lparts = tuple(_parts(m.linkname, m.name, where))
        if lparts not in tree.files:
            raise ImageError(f"{where}: member {m.name!r} is a hardlink to {m.linkname!r}, which is "
                             "not a file of this layer: refused")  # fmt: skip
        lfd = os.dup(tree.parent(lparts[:-1], m.name))
        try:
            pfd = tree.parent(tuple(up), m.name)
            os.link(lparts[-1], name, src_dir_fd=lfd, dst_dir_fd=pfd, follow_symlinks=False)
        finally:
            os.close(lfd)
        tree.files.add(path)
        return
    if m.issym():
        os.symlink(m.linkname, name, dir_fd=pfd)
        if chown:
            _owner(None, name, pfd, m.uid, m.gid, out)
        os.utime(name, ns=(int(m.mtime) * 10**9,) * 2, dir_fd=pfd, follow_symlinks=False)
        tree.files.add(path)
        return
    if m.isfifo():
        os.mkfifo(name, 0o600, dir_fd=pfd)
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
    elif m.isreg():
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=pfd)  # fmt: skip
    else:
        out.skipped.append(f"{m.name}: an entry of type {m.type!r}, unknown")
        return
    try:
        if m.isreg():
            _write_file(tf, fd, m)
        if chown:
            _owner(fd, name, pfd, m.uid, m.gid, out)
        if mode & (stat.S_ISUID | stat.S_ISGID):
            out.skipped.append(f"{m.name}: setuid/setgid bits dropped")
        os.fchmod(fd, mode & ~(stat.S_ISUID | stat.S_ISGID))
        _xattrs(fd, m, real_root)
        os.utime(fd, ns=(int(m.mtime) * 10**9,) * 2)
    finally:
        os.close(fd)
    tree.files.add(path)



def _finish_dirs(tree: _Tree, chown: bool, out: Unpacked) -> None:
    """Directories' modes, owners and mtimes, deepest first (after all their entries are in)."""
    tree.forget()
    for path in sorted(tree.dirs, key=len, reverse=True):
        mode, uid, gid, mtime = tree.dirs[path]
        if path:
            fd = os.open(path[-1], _DIR_FLAGS, dir_fd=tree.parent(path[:-1], "/".join(path)))
        else:
            fd = os.dup(tree.root)
        try:
            if chown:
                _owner(fd, "", -1, uid, gid, out)
            os.fchmod(fd, mode & ~stat.S_ISUID)
            if mtime >= 0:
                os.utime(fd, ns=(mtime * 10**9,) * 2)
        finally:
            os.close(fd)
    tree.forget()


def unpack_layer(f: BinaryIO, dest: str, diff_id: str, *, where: str, userxattr: bool) -> Unpacked:
    """Unpack the layer blob ``f`` (gzip, zstd or plain tar) into the empty directory ``dest``.

    ``where`` names the layer in errors (its digest); ``userxattr`` marks opaque directories with
    ``user.overlay.opaque`` (rootless) rather than ``trusted.overlay.opaque``. Raises
    ``ImageError`` when the layer is hostile, truncated or not the ``diff_id`` it should be;
    ``dest`` is then left half-filled for the caller to remove.
    """
    reader = LayerStream(f, where)
    opaque = "user.overlay.opaque" if userxattr else "trusted.overlay.opaque"
    out = Unpacked()
    root = os.open(dest, _DIR_FLAGS)
    tree = _Tree(root, where)
    try:
        # A small read-ahead: Python 3.11's stream reader copies what is left of it at every read.
        with tarfile.open(fileobj=reader, mode="r|", bufsize=_TAR_BUF) as tf:  # type: ignore[call-overload]
            for m in tf:
                _entry(tf, m, tree, opaque, out)
                out.entries += 1
        reader.drain()
        _finish_dirs(tree, os.geteuid() == 0, out)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, ValueError) as e:
        # ValueError: what tarfile raises for some malformed headers (a bad number field).
        raise ImageError(f"{where}: not a readable layer ({e})") from None
    finally:
        reader.close()
        tree.forget()
        os.close(root)
    got = "sha256:" + reader.sha.hexdigest()
    if got != diff_id:
        raise ImageError(f"{where}: the layer's content is {got}, not the diff_id {diff_id} its "
                         "image names: corrupt or tampered with")  # fmt: skip
    out.size = reader.size
    return out


def install_layers(layers: list[dict[str, str]], tmp: str, userxattr: bool,
                   progress: Callable[[Any], None] | None = None) -> list[int]:
    """Unpack each layer ``{"blob", "digest", "diff_id", "dest"}`` into a temporary directory in
    ``tmp``, then rename it to ``dest``; one already there is kept. The caller holds each layer's
    lock, so a temporary directory of the same layer is a killed run's, removed first. Runs in the
    store's process (root) or in the user namespace (:mod:`pytest_envbox.images.nsrun`).
    Returns the uncompressed size of each layer (0 when it was there)."""
    sizes = []
    for layer in layers:
        dest = layer["dest"]
        if os.path.isdir(dest):
            sizes.append(0)
            continue
        prefix = "layer-" + layer["diff_id"].partition(":")[2]
        remove_trees([os.path.join(tmp, n) for n in os.listdir(tmp) if n.startswith(prefix + ".")])
        work = os.path.join(tmp, f"{prefix}.{os.getpid()}")
        os.mkdir(work, 0o700)
        os.chmod(work, 0o755)  # the layer's root unless its tar has a "./" entry (umask aside)
        try:
            with open(layer["blob"], "rb") as f:
                done = unpack_layer(f, work, layer["diff_id"], where=f"layer {layer['digest']}",
                                    userxattr=userxattr)  # fmt: skip
            os.rename(work, dest)
        except BaseException:
            remove_trees([work])
            raise
        sizes.append(done.size)
        if progress is not None:
            progress([layer["diff_id"], done.size])
    return sizes


def remove_trees(paths: list[str], progress: Callable[[Any], None] | None = None) -> None:
    """Remove directories (or files) that may hold other owners' files: layers, their temporaries."""
    for path in paths:
        if os.path.isdir(path) and not os.path.islink(path):
            # A layer may hold 0555 directories: make them writable on the way down.
            for top, dirs, _files in os.walk(path):
                for d in dirs:
                    full = os.path.join(top, d)
                    if not os.path.islink(full):
                        os.chmod(full, 0o700)
            os.chmod(path, 0o700)
            shutil.rmtree(path)
        else:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


def lstat_ids(paths: list[str], progress: Callable[[Any], None] | None = None) -> list[list[int]]:
    """``[uid, gid]`` of each path (not followed) as this process sees them: rootless, run in the
    user namespace (:func:`pytest_envbox.images.nsrun.call`), the ids the services see."""
    return [[st.st_uid, st.st_gid] for st in (os.lstat(p) for p in paths)]
