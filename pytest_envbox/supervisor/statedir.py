"""The state directory, where runs keep their records: one that no other user can write.

``/run/envbox`` as root. Otherwise ``$XDG_RUNTIME_DIR/envbox`` when ``XDG_RUNTIME_DIR`` is a
directory of ours with mode 0700 (systemd's ``/run/user/<uid>``), else ``/tmp/envbox-<uid>``. That
last name is predictable, in a directory everyone may write: another user could make it first,
mode 0777, and plant records there (the janitor deletes the directories a dead run's record
lists; ``envbox clean`` signals the supervisor a kept run's record names) or symbolic links (a
write would follow them, as the user running the tests). So the directory is made with mode 0700,
then opened (never through a link) and checked through that descriptor: a directory, owned by
us. A mode wider than 0700 on a directory of ours is tightened (envbox made it 0755 before);
anything else is refused with :class:`~pytest_envbox.errors.HostUnsupported`, naming the path,
its owner and mode, and the fix. Files inside are reached through that descriptor only, never
through a link, and made afresh (``O_EXCL``) where they are written.

Only the standard library (and the error tree): the lean supervisor imports it.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from types import TracebackType

from pytest_envbox.errors import HostUnsupported

__all__ = ["StateDir", "outer_uid", "problem", "remove_temp_dir", "state_dir"]

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO found there returns at once (and is then refused as no plain file).
_FILE = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
#: The names ``tempfile.mkdtemp(prefix="envbox-")`` makes (``Environment``'s working directories):
#: the only directories the janitor deletes.
_TEMP_NAME = re.compile(r"envbox-[a-z0-9_]{8}")


def outer_uid() -> int:
    """Our uid on the host, also inside a user namespace (rootless mode: root in there)."""
    uid = os.geteuid()
    if uid == 0:
        try:
            with open("/proc/self/uid_map") as f:
                inside, outside, _count = f.readline().split()
            if inside == "0":
                return int(outside)
        except (OSError, ValueError):
            pass
    return uid


def state_dir() -> str:
    """Where the records are: ``/run/envbox`` for root; ``$XDG_RUNTIME_DIR/envbox`` when that is
    a directory of ours that no one else may enter; else ``/tmp/envbox-<uid>``."""
    uid = outer_uid()
    if uid == 0:
        return "/run/envbox"
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if os.path.isabs(runtime) and _private(runtime):
        return os.path.join(runtime, "envbox")
    return f"/tmp/envbox-{uid}"


def _private(path: str) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) == 0o700


class StateDir:
    """The state directory, held open: the files in it are reached through this descriptor.

    ``with StateDir.open() as d: d.write("x.json", data)``.
    """

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self.fd = fd

    @classmethod
    def open(cls, path: str | None = None, *, create: bool = True) -> StateDir:
        """The directory (``state_dir()`` by default), made with mode 0700 if missing and
        ``create``; :class:`HostUnsupported` when it is not safe to use, ``FileNotFoundError``
        when it is missing and not ``create``."""
        path = path or state_dir()
        made: OSError | None = None
        if create:
            try:
                os.mkdir(path, 0o700)
            except FileExistsError:
                pass
            except OSError as e:  # no parent, or not ours to write in
                made = e
        try:
            fd = os.open(path, _DIR)
        except FileNotFoundError:
            if not create:
                raise
            why = os.strerror(made.errno or 0) if made is not None else "it vanished"
            raise HostUnsupported(_refusal(path, f"it cannot be made: {why}")) from None
        except OSError as e:  # a link (ELOOP), a file (ENOTDIR), another user's 0700 (EACCES)
            raise HostUnsupported(_refusal(path, os.strerror(e.errno or 0))) from None
        try:
            st = os.fstat(fd)
            if st.st_uid != os.geteuid():
                raise HostUnsupported(_refusal(path, "not yours"))
            if stat.S_IMODE(st.st_mode) != 0o700:
                os.fchmod(fd, 0o700)  # ours, made wider by an older envbox (0755) or a umask
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd)

    def __enter__(self) -> StateDir:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:  # fmt: skip
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def names(self) -> list[str]:
        return os.listdir(self.fd)

    def read(self, name: str) -> bytes | None:
        """The content of plain file ``name``; None when it is missing, a link or not a file."""
        try:
            fd = os.open(name, os.O_RDONLY | _FILE, dir_fd=self.fd)
        except OSError:
            return None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            chunks = []
            while chunk := os.read(fd, 1 << 16):
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)

    def write(self, name: str, data: bytes) -> None:
        """Replace ``name`` at once: a new file ``<name>.tmp``, renamed over it (a reader never
        sees half a file; a link at either name is replaced, not followed)."""
        tmp = name + ".tmp"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _FILE
        try:
            fd = os.open(tmp, flags, 0o600, dir_fd=self.fd)
        except FileExistsError:  # left by a writer killed midway (or put there): replaced
            os.unlink(tmp, dir_fd=self.fd)
            fd = os.open(tmp, flags, 0o600, dir_fd=self.fd)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.replace(tmp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)

    def lock_file(self, name: str) -> int:
        """A descriptor of plain file ``name`` (for ``flock``), made if missing; a link found
        there is removed, never followed."""
        flags = os.O_RDWR | os.O_CREAT | _FILE
        try:
            return os.open(name, flags, 0o600, dir_fd=self.fd)
        except OSError as e:
            if e.errno != errno.ELOOP:
                raise
        os.unlink(name, dir_fd=self.fd)
        return os.open(name, flags, 0o600, dir_fd=self.fd)

    def unlink(self, name: str) -> bool:
        """Remove ``name`` (a link itself, never its target); False if it was already gone."""
        try:
            os.unlink(name, dir_fd=self.fd)
        except FileNotFoundError:
            return False
        return True


def problem(path: str | None = None) -> str | None:
    """Why the state directory cannot be used (it is made on the way if missing), or None."""
    try:
        StateDir.open(path).close()
    except HostUnsupported as e:
        return str(e)
    return None


def remove_temp_dir(path: str) -> str | None:
    """Remove ``path`` if it is one of envbox's own temporary directories; return its real path,
    or None when it was left alone.

    A record says which directories to delete; a record is data, so each path must prove itself:
    directly in the temporary directory (no ``..``, nothing else), named as ``mkdtemp`` names
    ours, a real directory (not a link) owned by us, and not the state directory. The last
    component is looked up without following a link, from a descriptor of its parent, and
    ``shutil.rmtree`` with ``dir_fd`` removes the tree through descriptors, never following a link
    inside. In the sticky ``/tmp``, a directory that is ours stays ours until we remove it.
    """
    import shutil  # (these two only here: the supervisor stays small, and so do its forks)
    import tempfile

    tmp = tempfile.gettempdir()
    parent, name = os.path.split(path)
    if not (os.path.isabs(path) and os.path.normpath(path) == path and _TEMP_NAME.fullmatch(name)
            and parent in (tmp, os.path.realpath(tmp))
            and name != os.path.basename(state_dir())):  # fmt: skip
        return None
    try:
        parent_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.lstat(name, dir_fd=parent_fd)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            return None
        shutil.rmtree(name, ignore_errors=True, dir_fd=parent_fd)
    except OSError:
        return None
    finally:
        os.close(parent_fd)
    return os.path.join(os.path.realpath(parent), name)


def _refusal(path: str, why: str) -> str:
    """The error for a state directory that cannot be used: what is there, and the fix."""
    try:
        st = os.lstat(path)
        kind = ("a directory" if stat.S_ISDIR(st.st_mode) else
                "a symbolic link" if stat.S_ISLNK(st.st_mode) else "a file")  # fmt: skip
        found = f"{kind} owned by {_user(st.st_uid)} with mode {stat.S_IMODE(st.st_mode):04o}"
    except OSError as e:
        found = f"missing ({e.strerror})"
    fix = f"remove it (`sudo rm -rf {path}`)"
    if outer_uid() != 0:
        fix += (f", or set XDG_RUNTIME_DIR to a directory of yours with mode 0700 (as systemd's "
                f"/run/user/{outer_uid()} is)")  # fmt: skip
    return (f"envbox's state directory {path} cannot be used ({why}): it is {found}, and it must "
            f"be a directory of your own ({_user(os.geteuid())}) that no other user can write, "
            f"or they could plant run records and links there for envbox to follow. Nothing was "
            f"written there. Fix: {fix}.")  # fmt: skip


def _user(uid: int) -> str:
    import pwd

    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"
