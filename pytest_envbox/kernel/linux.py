"""The Linux system calls pytest-envbox needs, and nothing else.

Python 3.11 has no ``unshare``, ``setns``, ``mount``, ``pivot_root``, ``prctl`` or capability calls
(3.12 added only the first two), so they are bound here with ctypes, once, and every failure is an
``OSError`` carrying errno and the call that failed, like the calls in :mod:`os`. No library covers
this small set without pulling in much more (python-prctl, pyroute2's namespace helpers), and each
wrapper is a single C call.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
import sys

__all__ = [
    "AT_RECURSIVE",
    "CAP_NAMES",
    "CLONE_INTO_CGROUP",
    "CLONE_NEWCGROUP",
    "CLONE_NEWIPC",
    "CLONE_NEWNET",
    "CLONE_NEWNS",
    "CLONE_NEWPID",
    "CLONE_NEWUSER",
    "CLONE_NEWUTS",
    "CLONE_PARENT",
    "CLOSE_RANGE_CLOEXEC",
    "DOCKER_DEFAULT_CAPS",
    "IFF_UP",
    "MNT_DETACH",
    "MOUNT_ATTR_NODEV",
    "MOUNT_ATTR_NOSUID",
    "MOUNT_ATTR_NOSYMFOLLOW",
    "MOUNT_ATTR_RDONLY",
    "MS_BIND",
    "MS_MOVE",
    "MS_NODEV",
    "MS_NOEXEC",
    "MS_NOSUID",
    "MS_PRIVATE",
    "MS_RDONLY",
    "MS_REC",
    "MS_REMOUNT",
    "MS_SLAVE",
    "PR_CAPBSET_DROP",
    "PR_CAPBSET_READ",
    "PR_CAP_AMBIENT",
    "PR_CAP_AMBIENT_CLEAR_ALL",
    "PR_SET_CHILD_SUBREAPER",
    "PR_SET_DUMPABLE",
    "PR_SET_NO_NEW_PRIVS",
    "PR_SET_PDEATHSIG",
    "SIOCGIFFLAGS",
    "SIOCSIFFLAGS",
    "bind_fd",
    "capbset_drop_except",
    "capbset_has",
    "capget",
    "capset",
    "clear_ambient_caps",
    "close_range_cloexec",
    "fork_with",
    "last_cap",
    "loopback_up",
    "map_own_ids",
    "mount",
    "mount_setattr",
    "open_nofollow",
    "pivot_root",
    "prctl",
    "set_child_subreaper",
    "set_dumpable",
    "set_no_new_privs",
    "set_pdeathsig",
    "setns",
    "umount2",
    "unshare",
]

# Namespace flags (linux/sched.h).
CLONE_PARENT = 0x00008000
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_INTO_CGROUP = 0x200000000  # clone3 only (Linux 5.7)
_SYS_CLONE3 = 435  # the same number on every architecture (it came after the table was unified)

# mount(2) flags (linux/mount.h).
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_MOVE = 0x2000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MNT_DETACH = 0x2

# mount_setattr(2).
AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
#: Path lookups through the mount refuse every symbolic link on it (Linux 5.10).
MOUNT_ATTR_NOSYMFOLLOW = 0x00200000

# prctl(2) options.
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

CLOSE_RANGE_CLOEXEC = 1 << 2

# Syscalls without a glibc wrapper everywhere. Numbers of the newer calls are shared by all
# architectures; pivot_root differs.
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "armv7l": 218, "ppc64le": 203, "s390x": 217}
# clone's arguments other than flags are all zero here, so the argument orders that differ
# between architectures do not matter, except on s390x (flags second): not listed, it falls back
# to os.fork.
_SYS_CLONE = {"x86_64": 56, "aarch64": 220, "riscv64": 220, "loongarch64": 220, "ppc64le": 120}
_SYS_CLOSE_RANGE = 436
_SYS_MOUNT_SETATTR = 442
# The new mount API and openat2, the same number on every architecture (asm-generic).
_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429
_SYS_OPENAT2 = 437
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08
_OPEN_TREE_CLONE = 1
_AT_EMPTY_PATH = 0x1000
_MOVE_MOUNT_F_EMPTY_PATH = 0x04
_AT_FDCWD = -100

# Capability numbers (linux/capability.h) and Docker's default set, which services keep at most.
CAP_NAMES = (
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID",
    "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW",
    "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT",
    "SYS_ADMIN", "SYS_BOOT", "SYS_NICE", "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD",
    "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP", "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG",
    "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF", "CHECKPOINT_RESTORE",
)  # fmt: skip
DOCKER_DEFAULT_CAPS = frozenset(
    CAP_NAMES.index(n)
    for n in (
        "CHOWN", "DAC_OVERRIDE", "FSETID", "FOWNER", "MKNOD", "NET_RAW", "SETGID", "SETUID",
        "SETFCAP", "SETPCAP", "NET_BIND_SERVICE", "SYS_CHROOT", "KILL", "AUDIT_WRITE",
    )
)

# The C library is already loaded in this process: no need for ctypes.util.find_library, which
# would run ldconfig in a subprocess.
_libc = ctypes.CDLL(None, use_errno=True)
_MACHINE = os.uname().machine
if sys.platform.startswith("linux"):  # elsewhere, importing must work; calling is refused later
    _libc.syscall.restype = ctypes.c_long
    _libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                            ctypes.c_void_p]  # fmt: skip
    _libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    _libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                            ctypes.c_ulong]  # fmt: skip


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def _b(path: str | None) -> bytes | None:
    return None if path is None else os.fsencode(path)


def unshare(flags: int) -> None:
    """Move the calling thread into new namespaces (``unshare(2)``)."""
    _check(_libc.unshare(ctypes.c_int(flags)), f"unshare({flags:#x})")


def setns(fd: int, nstype: int = 0) -> None:
    """Join the namespace that ``fd`` (an open ``/proc/PID/ns/*`` file) refers to."""
    _check(_libc.setns(ctypes.c_int(fd), ctypes.c_int(nstype)), f"setns({nstype:#x})")


def mount(source: str | None, target: str, fstype: str | None = None, flags: int = 0,
          data: str | None = None) -> None:  # fmt: skip
    """``mount(2)``; raises ``OSError`` naming the target."""
    res = _libc.mount(_b(source), _b(target), _b(fstype), ctypes.c_ulong(flags),
                      ctypes.c_char_p(_b(data)) if data is not None else None)  # fmt: skip
    _check(res, f"mount {source or fstype} on {target}")


def umount2(target: str, flags: int = 0) -> None:
    """``umount2(2)``."""
    _check(_libc.umount2(_b(target), ctypes.c_int(flags)), f"umount {target}")


class _CloneArgs(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in (
        "flags", "pidfd", "child_tid", "parent_tid", "exit_signal", "stack", "stack_size", "tls",
        "set_tid", "set_tid_size", "cgroup")]  # fmt: skip


def fork_with(flags: int, *, python_fixups: bool = True, cgroup_fd: int | None = None) -> int:
    """``fork()`` with extra ``clone(2)`` flags; returns 0 in the child, its pid in the parent.

    For ``CLONE_PARENT | CLONE_NEWPID``: a child that is PID 1 of a new PID namespace and the
    *caller's parent's* child, in one call (``os.fork`` has no flags). Python's own fork
    bookkeeping runs around it, as ``os.fork`` does. Only for single-threaded callers.

    ``python_fixups=False`` skips that bookkeeping (``PyOS_BeforeFork`` and the ``AfterFork``
    hooks, which run every ``os.register_at_fork`` handler: threading, logging, random...). They
    touch objects all over the heap, and each page touched in a forked child is a copy: about
    0.7 ms of a spare's CPU here. Safe only when the caller is single-threaded, holds no lock,
    and the child neither starts threads nor relies on those handlers (a spare does not).
    """
    nr = _SYS_CLONE.get(_MACHINE)
    if nr is None and cgroup_fd is None:
        raise OSError(errno.ENOSYS, f"clone: unknown syscall number on {_MACHINE}")
    api = ctypes.pythonapi
    args = None
    if cgroup_fd is not None:
        # clone3 with CLONE_INTO_CGROUP: the child starts in that cgroup (v2), with no move
        # and none of the grace-period wait a move costs (see cgroups.CgroupTree.new).
        # clone3 refuses an exit signal with CLONE_PARENT (EINVAL): the child then signals its
        # new parent as the caller would (SIGCHLD here), as legacy clone does when it ignores it.
        exit_signal = 0 if flags & CLONE_PARENT else 17
        args = _CloneArgs(flags=flags | CLONE_INTO_CGROUP, exit_signal=exit_signal, cgroup=cgroup_fd)
    if python_fixups:
        api.PyOS_BeforeFork()
    if args is not None:
        pid = _libc.syscall(ctypes.c_long(_SYS_CLONE3), ctypes.byref(args),
                            ctypes.c_size_t(ctypes.sizeof(args)))  # fmt: skip
    else:
        assert nr is not None
        # All other arguments zero: the same stack (copy-on-write, as fork), no tids, no tls.
        # Their order differs between architectures; zeros make that moot.
        pid = _libc.syscall(ctypes.c_long(nr), ctypes.c_ulong(flags | 17), None, None, None, None)
    err = ctypes.get_errno()
    if python_fixups:
        if pid == 0:
            api.PyOS_AfterFork_Child()
        else:
            api.PyOS_AfterFork_Parent()
    if pid < 0:
        raise OSError(err, f"clone({flags:#x}): {os.strerror(err)}")
    return int(pid)


def pivot_root(new_root: str, put_old: str) -> None:
    """``pivot_root(2)``: make ``new_root`` the root mount, the old root going to ``put_old``."""
    nr = _SYS_PIVOT_ROOT.get(_MACHINE)
    if nr is None:
        raise OSError(0, f"pivot_root: unknown syscall number on {_MACHINE}")
    res = _libc.syscall(ctypes.c_long(nr), ctypes.c_char_p(_b(new_root)),
                        ctypes.c_char_p(_b(put_old)))  # fmt: skip
    _check(res, f"pivot_root({new_root}, {put_old})")


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]  # fmt: skip


def mount_setattr(path: str, attr_set: int, *, recursive: bool = True, clear: int = 0,
                  dirfd: int = _AT_FDCWD) -> None:
    """Set (and ``clear``) mount attributes on ``path`` and, by default, every mount below it
    (kernel >= 5.12). ``dirfd`` with ``path`` "": a detached tree from :func:`bind_fd`.

    One call makes a whole bound tree read-only, where ``mount(MS_REMOUNT)`` would need one call
    per submount.
    """
    attr = _MountAttr(attr_set, clear, 0, 0)
    flags = (AT_RECURSIVE if recursive else 0) | (_AT_EMPTY_PATH if not path else 0)
    res = _libc.syscall(ctypes.c_long(_SYS_MOUNT_SETATTR), ctypes.c_int(dirfd),
                        ctypes.c_char_p(os.fsencode(path)), ctypes.c_uint(flags), ctypes.byref(attr),
                        ctypes.c_size_t(ctypes.sizeof(attr)))  # fmt: skip
    _check(res, f"mount_setattr({path or dirfd})")


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def open_nofollow(dirfd: int, path: str) -> int:
    """An ``O_PATH`` descriptor of ``path`` below ``dirfd``, refusing any symbolic link on the way
    (``openat2``, Linux 5.6).

    ``ELOOP`` when a component (the last one included) is a symbolic link; ``..`` cannot climb
    above ``dirfd`` either. The caller closes the descriptor.
    """
    how = _OpenHow(os.O_PATH | os.O_CLOEXEC, 0,
                   _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS | _RESOLVE_BENEATH)  # fmt: skip
    res = _libc.syscall(ctypes.c_long(_SYS_OPENAT2), ctypes.c_int(dirfd),
                        ctypes.c_char_p(os.fsencode(path)), ctypes.byref(how),
                        ctypes.c_size_t(ctypes.sizeof(how)))  # fmt: skip
    return _check(res, f"openat2({path})")


def fchown_fd(fd: int, uid: int, gid: int) -> None:
    """``chown`` the file an ``O_PATH`` descriptor refers to (``fchownat`` with
    ``AT_EMPTY_PATH``; ``fchown`` refuses such descriptors): the file that was opened, never what a
    path names now."""
    _check(_libc.fchownat(ctypes.c_int(fd), ctypes.c_char_p(b""), ctypes.c_uint(uid),
                          ctypes.c_uint(gid), ctypes.c_int(0x1000)), "fchownat")  # fmt: skip


def bind_fd(fd: int, target: str, attrs: int = 0) -> None:
    """Bind what ``fd`` refers to (and every mount below it) at ``target``, with mount ``attrs``.

    The copy gets its attributes (``MOUNT_ATTR_RDONLY``...) before it is attached, so it is never
    visible with fewer restrictions than asked.
    """
    tree = _check(_libc.syscall(ctypes.c_long(_SYS_OPEN_TREE), ctypes.c_int(fd), ctypes.c_char_p(b""),
                                ctypes.c_uint(_OPEN_TREE_CLONE | os.O_CLOEXEC | AT_RECURSIVE
                                              | _AT_EMPTY_PATH)), f"open_tree({target})")  # fmt: skip
    try:
        if attrs:
            mount_setattr("", attrs, dirfd=tree)
        _check(_libc.syscall(ctypes.c_long(_SYS_MOVE_MOUNT), ctypes.c_int(tree), ctypes.c_char_p(b""),
                             ctypes.c_int(_AT_FDCWD), ctypes.c_char_p(os.fsencode(target)),
                             ctypes.c_uint(_MOVE_MOUNT_F_EMPTY_PATH)), f"move_mount({target})")  # fmt: skip
    finally:
        os.close(tree)


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    """``prctl(2)``."""
    return _check(_libc.prctl(option, arg2, arg3, arg4, arg5), f"prctl({option})")


def set_pdeathsig(sig: int) -> None:
    """Have the kernel send ``sig`` to this process when the thread that forked it exits."""
    prctl(PR_SET_PDEATHSIG, sig)


def set_no_new_privs() -> None:
    """Forbid gaining privileges through execve (setuid bits, file capabilities)."""
    prctl(PR_SET_NO_NEW_PRIVS, 1)


def set_child_subreaper() -> None:
    """Adopt orphaned descendants, so they are reaped here rather than by the host's init."""
    prctl(PR_SET_CHILD_SUBREAPER, 1)


def set_dumpable(flag: bool) -> None:
    """Clear (or set) the dumpable flag: a non-dumpable process cannot be ptraced by its peers."""
    prctl(PR_SET_DUMPABLE, int(flag))


def _read_last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 63  # unknown: try every possible one (dropping an unknown capability is harmless)


# Read once, at import: sandboxes drop capabilities after their /proc is gone.
_LAST_CAP = _read_last_cap()


def last_cap() -> int:
    """The highest capability number the running kernel knows."""
    return _LAST_CAP


def capbset_drop_except(keep: frozenset[int]) -> None:
    """Drop every capability not in ``keep`` from the bounding set (needs CAP_SETPCAP)."""
    for cap in range(last_cap() + 1):
        if cap not in keep:
            try:
                prctl(PR_CAPBSET_DROP, cap)
            except OSError as e:
                if e.errno == errno.EINVAL:
                    break  # past the kernel's last capability
                raise


def capbset_has(cap: int) -> bool:
    """Whether ``cap`` is in this thread's bounding set."""
    return prctl(PR_CAPBSET_READ, cap) == 1


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]  # fmt: skip


_CAP_V3 = 0x20080522


def capget() -> tuple[int, int, int]:
    """This thread's (effective, permitted, inheritable) capability sets as bit masks."""
    hdr = _CapHeader(_CAP_V3, 0)
    data = (_CapData * 2)()
    _check(_libc.capget(ctypes.byref(hdr), data), "capget")
    def join(name: str) -> int:
        return int(getattr(data[0], name)) | (int(getattr(data[1], name)) << 32)
    return join("effective"), join("permitted"), join("inheritable")


def capset(effective: int, permitted: int, inheritable: int) -> None:
    """Set this thread's capability sets (each only ever narrowed)."""
    hdr = _CapHeader(_CAP_V3, 0)
    data = (_CapData * 2)()
    for i in (0, 1):
        data[i].effective = (effective >> (32 * i)) & 0xFFFFFFFF
        data[i].permitted = (permitted >> (32 * i)) & 0xFFFFFFFF
        data[i].inheritable = (inheritable >> (32 * i)) & 0xFFFFFFFF
    _check(_libc.capset(ctypes.byref(hdr), data), "capset")


def clear_ambient_caps() -> None:
    """Empty the ambient capability set (kernels before 4.3 have none: nothing to clear)."""
    try:
        prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    except OSError:
        pass


def close_range_cloexec(first: int) -> None:
    """Mark every fd from ``first`` up close-on-exec in one call (kernel >= 5.11).

    Marking rather than closing lets the setup code keep using its status pipe until the exec.
    Older kernels fall back to walking ``/proc/self/fd``.
    """
    res = _libc.syscall(ctypes.c_long(_SYS_CLOSE_RANGE), ctypes.c_uint(first),
                        ctypes.c_uint(0xFFFFFFFF), ctypes.c_uint(CLOSE_RANGE_CLOEXEC))  # fmt: skip
    if res == 0:
        return
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd >= first:
            try:
                os.set_inheritable(fd, False)
            except OSError:
                pass


SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1


def loopback_up() -> None:
    """Bring ``lo`` up in the calling thread's network namespace.

    A new network namespace starts with ``lo`` down. One ioctl does it; netlink (pyroute2, ~300 ms
    to import) would be overkill for this one flag.
    """
    import fcntl
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifr = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, ifr))[1]
        fcntl.ioctl(s.fileno(), SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))


def map_own_ids(uid: int, gid: int) -> None:
    """In a user namespace just made: map our own uid and gid (outside) to root inside.

    The only map an unprivileged process may write for itself, after denying ``setgroups``.
    """
    for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)
