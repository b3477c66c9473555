"""The sandbox's root filesystem, assembled in the child from the host's (read-only) root.

:func:`build_base` makes the part every service shares while a spare waits; :func:`finish_root`
adds one service's mounts and files once its plan arrives.
"""

from __future__ import annotations

import errno
import os
import stat

from pytest_envbox.kernel import linux as L
from pytest_envbox.sandbox import sysfs
from pytest_envbox.sandbox.imageroot import enter_image
from pytest_envbox.sandbox.plan import HOME, SandboxPlan, SetupError

__all__ = ["TMPFS_SIZES", "RootBuilder", "build_base", "finish_root", "open_host"]

_DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty")

_Mi = 1 << 20
#: The default size of each private tmpfs (``Service.tmpfs`` changes them). Without a cap each
#: would be half the host's RAM, and without a memory limit a service could fill the host's
#: memory. /tmp, /var/tmp and HOME hold what tests put there (a PostgreSQL cluster of the
#: examples takes about 40 MiB); /run holds sockets and pid files; /dev/shm is Docker's 64M.
TMPFS_SIZES = {"/tmp": 512 * _Mi, "/var/tmp": 512 * _Mi, HOME: 512 * _Mi, "/run": 64 * _Mi,
               "/dev/shm": 64 * _Mi}  # fmt: skip
#: /dev holds only nodes, links and mount points: runc's size.
_DEV_SIZE = 64 * _Mi


def _sized(size: int) -> str:
    """tmpfs options for ``size`` bytes, with as many inodes as 4 KiB pages (at least 1024): an
    inode costs the kernel memory too, and a tmpfs of empty files is otherwise unbounded."""
    return f"size={size},nr_inodes={max(1024, size >> 12)}"


_OLD = "/old"  # the host's root, while the new root is assembled
_NEW = "/new"  # the new root


class RootBuilder:
    """Assembles the new root under ``/new`` from the host's root at ``/old``.

    The host tree is bound read-only as a whole. A path that must exist but does not (a mount
    target, ``HOME``) is created without touching the host: its nearest host directory is
    "shadowed" by a tmpfs holding read-only binds of that directory's entries, and the new entry is
    made in the tmpfs. Directories we created (tmpfs mounts and what we made inside them) are
    tracked in ``ours``: only there may anything be created.
    """

    def __init__(self) -> None:
        self.root = _NEW
        self.ours: set[str] = set()
        self.shadows: list[str] = []
        self.home = HOME
        #: an image's root: every path is the sandbox's own (the writable layer takes what is
        #: made), so nothing is shadowed
        self.all_ours = False

    def resolve(self, path: str) -> str:
        """``path`` inside the new root with symlinks followed as the service would see them."""
        parts = [p for p in path.split("/") if p]
        out: list[str] = []
        hops = 0
        while parts:
            part = parts.pop(0)
            if part == ".":
                continue
            if part == "..":
                if out:
                    out.pop()
                continue
            cand = "/" + "/".join([*out, part])
            try:
                link = os.readlink(_NEW + cand)
            except OSError:
                out.append(part)
                continue
            hops += 1
            if hops > 40:
                raise SetupError(f"too many symbolic links resolving {path}")
            parts = [p for p in link.split("/") if p] + parts
            if link.startswith("/"):
                out = []
        return "/" + "/".join(out)

    def tmpfs(self, path: str, options: str = "mode=0755", size: int | None = None) -> None:
        if size is not None:
            options = f"{options},{_sized(size)}"
        L.mount("tmpfs", _NEW + path, "tmpfs", L.MS_NOSUID | L.MS_NODEV, options)
        self.ours.add(path)

    def shadow(self, d: str) -> None:
        """Replace directory ``d`` of the new root by a tmpfs mirroring what was there.

        The current view of ``d`` (host binds and whatever we mounted below it already) is first
        bound aside, recursively, and its entries bound back into the tmpfs, so a shadow hides
        nothing and the order of shadows does not matter. Binds keep their source's read-only
        flag.
        """
        stage = f"/stage{len(self.shadows)}"
        os.mkdir(stage)
        # ``d`` may be a directory another service can write to: a symbolic link swapped in for
        # an entry after it is listed must not be followed to a host path. The staged copy
        # refuses to follow any link on it (nosymfollow), so such a bind fails instead; the
        # flag is cleared from the mirror once it is built (a host mount that had it loses it).
        fd = self.open_new(d)
        try:
            L.bind_fd(fd, stage, L.MOUNT_ATTR_NOSYMFOLLOW)
        finally:
            os.close(fd)
        st = os.stat(stage)
        try:
            self.tmpfs(d, f"mode={stat.S_IMODE(st.st_mode):o},uid={st.st_uid},gid={st.st_gid}")
        except OSError as e:  # rootless: an owner unmapped in the user namespace
            if e.errno != errno.EINVAL:
                raise
            self.tmpfs(d, f"mode={stat.S_IMODE(st.st_mode):o}")
        self.shadows.append(d)
        for entry in os.scandir(stage):
            src, dst = entry.path, _NEW + d.rstrip("/") + "/" + entry.name
            if entry.is_symlink():
                os.symlink(os.readlink(src), dst)
                continue
            if entry.is_dir(follow_symlinks=False):
                os.mkdir(dst)
            else:
                _touch(dst)
            L.mount(src, dst, None, L.MS_BIND | L.MS_REC)
        L.mount_setattr(_NEW + d, 0, clear=L.MOUNT_ATTR_NOSYMFOLLOW)

    def open_new(self, path: str) -> int:
        """An ``O_PATH`` descriptor of ``path`` in the new root, no symbolic link followed."""
        # /new afresh each time: a descriptor opened earlier would miss a shadow mounted on it.
        new = os.open(_NEW, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            return L.open_nofollow(new, path.lstrip("/") or ".")
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise SetupError(f"{path} changed into a symbolic link while the sandbox was "
                                 "being assembled; refused") from None  # fmt: skip
            raise
        finally:
            os.close(new)

    def bind(self, src: str, dst: str, *, readonly: bool) -> None:
        """Bind ``src`` (recursively) at ``dst``: ``nodev``, ``nosuid``, read-only if asked.

        ``nodev`` and ``nosuid`` even on writable binds, so nothing inside can use a device node
        or a setuid binary through them. (They do not stop root inside from *creating* such files
        in a writable host directory; only a user namespace does: the rootless mode.)
        """
        L.mount(src, dst, None, L.MS_BIND | L.MS_REC)
        attrs = L.MOUNT_ATTR_NOSUID | L.MOUNT_ATTR_NODEV
        L.mount_setattr(dst, attrs | L.MOUNT_ATTR_RDONLY if readonly else attrs)

    def bind_host(self, fd: int, dst: str, *, readonly: bool) -> None:
        """:meth:`bind` from an open host path (see :func:`open_host`): what was checked is bound."""
        attrs = L.MOUNT_ATTR_NOSUID | L.MOUNT_ATTR_NODEV
        L.bind_fd(fd, dst, attrs | L.MOUNT_ATTR_RDONLY if readonly else attrs)

    def ensure(self, path: str, *, is_dir: bool) -> str:
        """Make ``path`` exist in the new root (as a dir or a file); return it resolved."""
        path = self.resolve(path)
        if os.path.lexists(_NEW + path):
            return path
        parent = os.path.dirname(path)
        parent = self.ensure(parent, is_dir=True)
        if parent not in self.ours and not self.all_ours:
            self.shadow(parent)
        name = os.path.basename(path)
        # Made through a descriptor of the parent, so no symbolic link can send it elsewhere.
        pfd = self.open_new(parent)
        try:
            if is_dir:
                os.mkdir(name, 0o755, dir_fd=pfd)
            else:
                os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                                 | os.O_CLOEXEC, 0o644, dir_fd=pfd))  # fmt: skip
        finally:
            os.close(pfd)
        made = parent.rstrip("/") + "/" + name
        if is_dir:
            self.ours.add(made)
        return made


#: The sandbox's own filesystems, which hide the host's directories of the same name.
_PRIVATE = ("/tmp", "/var/tmp", "/run", "/dev")


def _under(path: str, dirs: tuple[str, ...]) -> bool:
    return any(path == d or path.startswith(d + "/") for d in dirs)


def _touch(path: str) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))


# What runc makes read-only and masks by default: writing /proc/sys (kernel.core_pattern, say)
# would change the host kernel itself, and these files tell the host's secrets.
_READONLY_PATHS = ("/proc/sys", "/proc/sysrq-trigger", "/proc/irq", "/proc/bus", "/proc/fs")
_MASKED_PATHS = (
    "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
    "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi",
)  # fmt: skip  (and runc's masks under /sys: see sysfs.py)


def _protect_kernel_files() -> None:
    for path in _READONLY_PATHS:
        p = _NEW + path
        if os.path.exists(p):
            L.mount(p, p, None, L.MS_BIND | L.MS_REC)
            L.mount_setattr(p, L.MOUNT_ATTR_RDONLY | L.MOUNT_ATTR_NOSUID | L.MOUNT_ATTR_NODEV)
    for path in _MASKED_PATHS:
        p = _NEW + path
        if os.path.isdir(p):
            L.mount("tmpfs", p, "tmpfs", L.MS_RDONLY | L.MS_NOSUID | L.MS_NODEV, "size=0")
        elif os.path.exists(p):
            L.mount(_OLD + "/dev/null", p, None, L.MS_BIND)
            L.mount_setattr(p, L.MOUNT_ATTR_RDONLY | L.MOUNT_ATTR_NOSUID, recursive=False)


def _run_skeleton(b: RootBuilder) -> None:
    """Recreate the host's ``/run`` subdirectories, empty, as a fresh boot would have them.

    Servers expect their runtime directory (``/run/postgresql``...) to exist and be writable by
    their user; it does, with the host's owner and mode, but nothing of the host's is in it.
    """
    try:
        entries = list(os.scandir(_OLD + "/run"))
    except OSError:
        return
    for entry in entries:
        if not entry.is_dir(follow_symlinks=False):
            continue
        st = entry.stat(follow_symlinks=False)
        dst = _NEW + "/run/" + entry.name
        try:
            os.mkdir(dst, stat.S_IMODE(st.st_mode))
            os.chmod(dst, stat.S_IMODE(st.st_mode))
            os.chown(dst, st.st_uid, st.st_gid)
        except OSError:
            pass  # e.g. an id unmapped in a user namespace: the directory stays root's
        b.ours.add("/run/" + entry.name)


def build_base(*, cgroup_view: bool) -> RootBuilder:
    """The part of the sandbox's filesystem every service shares; done ahead of time.

    Needs a private mount namespace, and to be in the network namespace the service will have
    (for ``/sys``). ``cgroup_view``: the sandbox is in its service's cgroup namespace already, so
    ``/sys/fs/cgroup`` shows the service's cgroup (otherwise :func:`finish_root` may mount it).
    Leaves the host's root at ``/old`` and the new root, not yet pivoted into, at ``/new``.
    """
    L.mount(None, "/", None, L.MS_REC | L.MS_PRIVATE)
    # bubblewrap's trick: a tmpfs over /tmp becomes the new root of this mount namespace, the
    # host's root moves below it to /old, with the host's /tmp visible again at /old/tmp.
    L.mount("tmpfs", "/tmp", "tmpfs", L.MS_NOSUID | L.MS_NODEV, "mode=0755")
    os.mkdir("/tmp/old")
    os.mkdir("/tmp/new")
    L.pivot_root("/tmp", "/tmp/old")
    os.chdir("/")
    b = RootBuilder()
    b.bind(_OLD, _NEW, readonly=True)
    # The host's /proc and /dev (with their submounts) are replaced, not covered: fewer mounts to
    # copy now and to tear down when the service ends.
    for path in ("/proc", "/dev", "/sys"):
        if os.path.ismount(_NEW + path):
            try:
                L.umount2(_NEW + path, L.MNT_DETACH)
            except OSError:
                pass  # rootless: mounts from the host are locked in a user namespace; covered
    L.mount("proc", _NEW + "/proc", "proc", L.MS_NOSUID | L.MS_NODEV | L.MS_NOEXEC)
    _protect_kernel_files()
    sysfs.mount_sysfs(_NEW)
    sysfs.mount_cgroup_view(_NEW, _OLD, own=cgroup_view)
    b.tmpfs("/dev", size=_DEV_SIZE)
    # The host's device nodes, each bound read-only: the device still reads and writes (a
    # read-only mount stops only changes to the inode: chmod, chown, utimes, setxattr fail with
    # EROFS), so no root inside can chmod the host's /dev/null. runc instead makes nodes of its
    # own with mknod, on a /dev that then cannot be nodev: it relies on the devices cgroup to stop
    # root inside (CAP_MKNOD is in Docker's set) from making a usable node of the host's disk.
    # Here /dev stays nodev, and rootless (where mknod is refused) works the same way. Measured
    # (6 nodes): 0.38 ms for these binds against 0.05 ms for mknod, in the spare, off the start.
    for node in _DEV_NODES:
        _touch(f"{_NEW}/dev/{node}")
        L.mount(f"{_OLD}/dev/{node}", f"{_NEW}/dev/{node}", None, L.MS_BIND)
        L.mount_setattr(f"{_NEW}/dev/{node}", L.MOUNT_ATTR_RDONLY | L.MOUNT_ATTR_NOSUID,
                        recursive=False)  # fmt: skip
    os.mkdir(_NEW + "/dev/pts")
    L.mount("devpts", _NEW + "/dev/pts", "devpts", L.MS_NOSUID | L.MS_NOEXEC,
            "newinstance,ptmxmode=0666,mode=620")  # fmt: skip
    os.symlink("pts/ptmx", _NEW + "/dev/ptmx")
    os.mkdir(_NEW + "/dev/shm")
    b.tmpfs("/dev/shm", "mode=1777", TMPFS_SIZES["/dev/shm"])
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):  # fmt: skip
        os.symlink(target, f"{_NEW}/dev/{name}")
    b.tmpfs("/tmp", "mode=1777", TMPFS_SIZES["/tmp"])
    if os.path.isdir(_NEW + "/var/tmp"):  # the other shared temporary directory (and its sockets)
        b.tmpfs("/var/tmp", "mode=1777", TMPFS_SIZES["/var/tmp"])
    b.tmpfs("/run", size=TMPFS_SIZES["/run"])
    _run_skeleton(b)
    b.home = b.ensure(HOME, is_dir=True)
    L.mount("tmpfs", _NEW + b.home, "tmpfs", L.MS_NOSUID | L.MS_NODEV,
            f"mode=0700,{_sized(TMPFS_SIZES[HOME])}")  # fmt: skip
    return b


def open_host(root: int, path: str, what: str) -> int:
    """An ``O_PATH`` descriptor of the host's ``path``, refusing every symbolic link on the way.

    Mount sources are checked for symbolic links when the declaration is read, and their real
    path is what the plan holds; a link there now was put there since, by a service that can
    write to its directory (Kubernetes' CVE-2017-1002101): following it would bind any host path
    into the sandbox. ``root`` is a descriptor of the host's root.
    """
    try:
        return L.open_nofollow(root, path.lstrip("/") or ".")
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise SetupError(f"{what} {path}: {e.strerror}") from e
    parts = [p for p in path.split("/") if p]
    for i in range(1, len(parts) + 1):
        link = "/" + "/".join(parts[:i])
        try:
            to = os.readlink(_OLD + link)
        except OSError:
            continue
        raise SetupError(
            f"{what} {path} is now a symbolic link ({link} -> {to}); it was a real file or "
            f"directory when the service was declared, and is refused, not followed (a process "
            f"that can write to {os.path.dirname(link)} replaced it). Put the real directory or "
            "file back")  # fmt: skip
    raise SetupError(f"{what} {path}: a symbolic link on the way; refused, not followed")


def _expose(b: RootBuilder, plan: SandboxPlan, host: int) -> None:
    """The host paths the service needs (its cwd...), where the sandbox hides the host's."""
    for source, path in plan.expose:
        # /tmp itself (say) cannot be exposed: the service's own /tmp is there.
        if not _under(path, (*_PRIVATE, HOME)) or path in (*_PRIVATE, HOME):
            continue
        try:
            fd = open_host(host, source, "exposed path")
        except SetupError:
            if not os.path.lexists(_OLD + source):
                continue  # gone: nothing to expose, as before
            raise
        try:
            is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
            b.bind_host(fd, _NEW + b.ensure(path, is_dir=is_dir), readonly=True)
        finally:
            os.close(fd)


def _bind_mounts(b: RootBuilder, plan: SandboxPlan, host: int) -> None:
    for source, target, readonly in sorted(plan.mounts, key=lambda m: m[1].count("/")):
        fd = open_host(host, source, "mount source")
        try:
            st = os.fstat(fd)
            is_dir = stat.S_ISDIR(st.st_mode)
            if source in plan.own and is_dir and st.st_uid == os.getuid() != plan.uid:
                # A new volume of the environment: its first service's user gets it, as Docker
                # gives a container the volume it creates (here too as root of a user namespace,
                # which the engine outside is not).
                L.fchown_fd(fd, plan.uid, plan.gid)
            b.bind_host(fd, _NEW + b.ensure(target, is_dir=is_dir), readonly=readonly)
        except OSError as e:
            raise SetupError(f"mount {source} -> {target}: {e.strerror}") from e
        finally:
            os.close(fd)


def _tmpfs_sizes(b: RootBuilder, sizes: dict[str, int], *, image: bool = False) -> None:
    """``Service.tmpfs``: a private directory resized (a remount, a few microseconds, only where
    the size is not the default), any other path a new empty tmpfs of that size. In an image only
    ``/tmp`` and ``/dev/shm`` are such directories (see imageroot.py), and ``~`` is the image
    user's home."""
    for path, size in sizes.items():
        if image and path == HOME:
            path = b.home
        if path in TMPFS_SIZES and (not image or path in ("/tmp", "/dev/shm")):
            own = _NEW + (b.home if path == HOME else path)
            if size != TMPFS_SIZES[path] and os.path.ismount(own):  # /var/tmp may be missing
                L.mount(None, own, None, L.MS_REMOUNT | L.MS_NOSUID | L.MS_NODEV, _sized(size))
            continue
        try:
            b.tmpfs(b.ensure(path, is_dir=True), "mode=1777", size)
        except OSError as e:
            raise SetupError(f"tmpfs {path}: {e.strerror}") from e


def finish_root(b: RootBuilder, plan: SandboxPlan, *, new_netns: bool = False,
                cgroup_view: bool | None = None) -> None:  # fmt: skip
    """The service's own part of the filesystem (its mounts, /etc files); pivot into it.

    ``new_netns``: the sandbox joined another network namespace since :func:`build_base` (a
    restart): ``/sys`` is made anew for it. ``cgroup_view``: True when the sandbox got its cgroup
    namespace since (then ``/sys/fs/cgroup`` shows it), None when nothing changed.
    """
    if new_netns:
        sysfs.renew_sysfs(_NEW)
    if cgroup_view:
        sysfs.mount_cgroup_view(_NEW, _OLD, own=True)  # over build_base's empty tmpfs
    if plan.image is not None:
        enter_image(plan.image)  # the image's overlay is /new from here on
        b.all_ours = True
        b.ours = {"/"}
        b.shadows = []  # build_base's (for HOME) are under the host-based root, gone with it
        b.home = plan.env.get("HOME", "/")
    else:
        os.chown(_NEW + b.home, plan.uid, plan.gid)
    _tmpfs_sizes(b, plan.tmpfs, image=plan.image is not None)
    host = os.open(_OLD, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if plan.image is None:
            _expose(b, plan, host)
        # Generated files live on the sandbox's own tmpfs, never on the host's disk.
        for i, (target, content) in enumerate(plan.etc_files.items()):
            source = f"/generated{i}"
            with open(source, "w") as f:
                f.write(content)
            b.bind(source, _NEW + b.ensure(target, is_dir=False), readonly=True)
        _bind_mounts(b, plan, host)
    finally:
        os.close(host)
    if plan.image is not None:
        b.ensure(plan.cwd, is_dir=True)  # a WorkingDir the image lacks: made, as Docker does
    for d in b.shadows:
        L.mount(None, _NEW + d, None, L.MS_REMOUNT | L.MS_BIND | L.MS_RDONLY | L.MS_NOSUID
                | L.MS_NODEV)  # fmt: skip
    os.chdir(_NEW)
    L.pivot_root(".", ".")
    L.umount2(".", L.MNT_DETACH)
    os.chdir("/")


# --- process ----------------------------------------------------------------------------------
