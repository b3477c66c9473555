"""The services' seccomp filter: an allow-list, Docker's default profile for a container with
Docker's default capabilities, plus the few calls envbox refused before it had one.

Why an allow-list: a deny-list lets through every call nobody thought of, and each kernel brings
new ones (``io_uring_setup`` came with 5.1 and had years of privilege escalations; ``AF_VSOCK``
sockets reach the hypervisor). Docker's list is what real servers are known to run under, so
python, postgres, redis and busybox keep working.

What the program answers, in order:

- a call of another ABI (32-bit calls on a 64-bit kernel, x86_64's x32): ``EPERM``;
- a number above the highest this module's table knows: ``ENOSYS``, as runc does, so that a
  newer libc's new call (``fchmodat2``, ``futex_wait``...) looks like an older kernel and the libc
  falls back to the old call instead of failing;
- a known call on the allow-list: allowed, with the argument checks below;
- any other: ``EPERM``.

The argument checks: ``socket`` and ``socketpair`` refuse ``AF_VSOCK`` (40); ``personality``
allows only Docker's five values (Linux, ``UNAME26``, ``PER_LINUX32``, both, and the query
``0xffffffff``); ``clone`` and ``unshare`` refuse a new user namespace, in which a service would
get ``CAP_SYS_ADMIN`` back (the other namespace flags need a capability the service lacks);
``clone3`` passes its flags in memory, out of a filter's reach: ``ENOSYS``, so libc falls back to
``clone``.

Hand-written classic BPF: libseccomp's Python binding is not on PyPI. The numbers are looked up
as a balanced binary search over ranges of numbers that share an answer (about 50 ranges on
x86_64: seven comparisons for a call, not one per allowed name). The program is assembled once
per process (the supervisor does it before it forks its sandboxes) and installed after
``no_new_privs`` in each service's init before the service starts (it inherits it), and in each
``exec`` command.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import functools
import os
import struct
from collections.abc import Callable

from pytest_envbox.kernel import linux as L
from pytest_envbox.kernel import syscall_tables

__all__ = [
    "ALLOWED",
    "PR_SET_SECCOMP",
    "REFUSED_BEYOND_DOCKER",
    "SECCOMP_MODE_FILTER",
    "SECCOMP_RET_ALLOW",
    "SECCOMP_RET_ERRNO",
    "Policy",
    "install",
    "policy",
    "program",
]

PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
_EPERM = SECCOMP_RET_ERRNO | errno.EPERM
_ENOSYS = SECCOMP_RET_ERRNO | errno.ENOSYS

# BPF opcodes (linux/bpf_common.h)
_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
_JA = 0x05  # BPF_JMP | BPF_JA: an unconditional jump, 32-bit offset
_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_JGE_K = 0x35  # BPF_JMP | BPF_JGE | BPF_K
_JSET_K = 0x45  # BPF_JMP | BPF_JSET | BPF_K
_RET_K = 0x06  # BPF_RET | BPF_K
_MAX_JUMP = 255  # a conditional jump's offsets are 8 bits

# struct seccomp_data: int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6]
_NR, _ARCH, _ARG0_LOW = 0, 4, 16  # (little-endian: the low 32 bits of args[0] come first)

_CLONE_NEWUSER = 0x10000000
_AF_VSOCK = 40
_X32_SYSCALL_BIT = 0x40000000
#: personality(2) values Docker allows: PER_LINUX, UNAME26, PER_LINUX32, both, and the query
_PERSONALITIES = (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)

#: Docker's default seccomp profile for a container with Docker's default capabilities: the
#: names it allows whatever the arguments, as moby/profiles' seccomp/default.json has them at
#: commit cd3bed8061c7b7378b61fc6827c7885779417a75 (2026-06-30). Its unconditional list first,
#: then what the conditional entries add for x86_64 and arm64 with those capabilities: ptrace and
#: process_vm_readv/writev (kernel 4.8 and newer), chroot (CAP_SYS_CHROOT), arch_prctl and
#: modify_ldt (x86). Names a machine's table lacks (32-bit variants, other machines' calls) are
#: ignored there. Docker's argument-checked entries (socket, personality, clone, clone3) are the
#: checks described in the module's docstring, not in this set.
ALLOWED = frozenset({
    "accept", "accept4", "access", "adjtimex", "alarm", "bind", "brk", "cachestat", "capget",
    "capset", "chdir", "chmod", "chown", "chown32", "clock_adjtime", "clock_adjtime64",
    "clock_getres", "clock_getres_time64", "clock_gettime", "clock_gettime64",
    "clock_nanosleep", "clock_nanosleep_time64", "close", "close_range", "connect",
    "copy_file_range", "creat", "dup", "dup2", "dup3", "epoll_create", "epoll_create1",
    "epoll_ctl", "epoll_ctl_old", "epoll_pwait", "epoll_pwait2", "epoll_wait", "epoll_wait_old",
    "eventfd", "eventfd2", "execve", "execveat", "exit", "exit_group", "faccessat",
    "faccessat2", "fadvise64", "fadvise64_64", "fallocate", "fanotify_mark", "fchdir", "fchmod",
    "fchmodat", "fchmodat2", "fchown", "fchown32", "fchownat", "fcntl", "fcntl64", "fdatasync",
    "fgetxattr", "flistxattr", "flock", "fork", "fremovexattr", "fsetxattr", "fstat", "fstat64",
    "fstatat64", "fstatfs", "fstatfs64", "fsync", "ftruncate", "ftruncate64", "futex",
    "futex_requeue", "futex_time64", "futex_wait", "futex_waitv", "futex_wake", "futimesat",
    "getcpu", "getcwd", "getdents", "getdents64", "getegid", "getegid32", "geteuid",
    "geteuid32", "getgid", "getgid32", "getgroups", "getgroups32", "getitimer", "getpeername",
    "getpgid", "getpgrp", "getpid", "getppid", "getpriority", "getrandom", "getresgid",
    "getresgid32", "getresuid", "getresuid32", "getrlimit", "get_robust_list", "getrusage",
    "getsid", "getsockname", "getsockopt", "get_thread_area", "gettid", "gettimeofday",
    "getuid", "getuid32", "getxattr", "getxattrat", "inotify_add_watch", "inotify_init",
    "inotify_init1", "inotify_rm_watch", "io_cancel", "ioctl", "io_destroy", "io_getevents",
    "io_pgetevents", "io_pgetevents_time64", "ioprio_get", "ioprio_set", "io_setup",
    "io_submit", "ipc", "kill", "landlock_add_rule", "landlock_create_ruleset",
    "landlock_restrict_self", "lchown", "lchown32", "lgetxattr", "link", "linkat", "listen",
    "listmount", "listxattr", "listxattrat", "llistxattr", "_llseek", "lremovexattr", "lseek",
    "lsetxattr", "lstat", "lstat64", "madvise", "map_shadow_stack", "membarrier",
    "memfd_create", "memfd_secret", "mincore", "mkdir", "mkdirat", "mknod", "mknodat", "mlock",
    "mlock2", "mlockall", "mmap", "mmap2", "mprotect", "mq_getsetattr", "mq_notify", "mq_open",
    "mq_timedreceive", "mq_timedreceive_time64", "mq_timedsend", "mq_timedsend_time64",
    "mq_unlink", "mremap", "mseal", "msgctl", "msgget", "msgrcv", "msgsnd", "msync", "munlock",
    "munlockall", "munmap", "name_to_handle_at", "nanosleep", "newfstatat", "_newselect",
    "open", "openat", "openat2", "pause", "pidfd_open", "pidfd_send_signal", "pipe", "pipe2",
    "pkey_alloc", "pkey_free", "pkey_mprotect", "poll", "ppoll", "ppoll_time64", "prctl",
    "pread64", "preadv", "preadv2", "prlimit64", "process_mrelease", "pselect6",
    "pselect6_time64", "pwrite64", "pwritev", "pwritev2", "read", "readahead", "readlink",
    "readlinkat", "readv", "recv", "recvfrom", "recvmmsg", "recvmmsg_time64", "recvmsg",
    "remap_file_pages", "removexattr", "removexattrat", "rename", "renameat", "renameat2",
    "restart_syscall", "riscv_hwprobe", "rmdir", "rseq", "rt_sigaction", "rt_sigpending",
    "rt_sigprocmask", "rt_sigqueueinfo", "rt_sigreturn", "rt_sigsuspend", "rt_sigtimedwait",
    "rt_sigtimedwait_time64", "rt_tgsigqueueinfo", "sched_getaffinity", "sched_getattr",
    "sched_getparam", "sched_get_priority_max", "sched_get_priority_min", "sched_getscheduler",
    "sched_rr_get_interval", "sched_rr_get_interval_time64", "sched_setaffinity",
    "sched_setattr", "sched_setparam", "sched_setscheduler", "sched_yield", "seccomp", "select",
    "semctl", "semget", "semop", "semtimedop", "semtimedop_time64", "send", "sendfile",
    "sendfile64", "sendmmsg", "sendmsg", "sendto", "setfsgid", "setfsgid32", "setfsuid",
    "setfsuid32", "setgid", "setgid32", "setgroups", "setgroups32", "setitimer", "setpgid",
    "setpriority", "setregid", "setregid32", "setresgid", "setresgid32", "setresuid",
    "setresuid32", "setreuid", "setreuid32", "setrlimit", "set_robust_list", "setsid",
    "setsockopt", "set_thread_area", "set_tid_address", "setuid", "setuid32", "setxattr",
    "setxattrat", "shmat", "shmctl", "shmdt", "shmget", "shutdown", "sigaltstack", "signalfd",
    "signalfd4", "sigprocmask", "sigreturn", "socketcall", "socketpair", "splice", "stat",
    "stat64", "statfs", "statfs64", "statmount", "statx", "symlink", "symlinkat", "sync",
    "sync_file_range", "syncfs", "sysinfo", "tee", "tgkill", "time", "timer_create",
    "timer_delete", "timer_getoverrun", "timer_gettime", "timer_gettime64", "timer_settime",
    "timer_settime64", "timerfd_create", "timerfd_gettime", "timerfd_gettime64",
    "timerfd_settime", "timerfd_settime64", "times", "tkill", "truncate", "truncate64",
    "ugetrlimit", "umask", "uname", "unlink", "unlinkat", "uretprobe", "utime", "utimensat",
    "utimensat_time64", "utimes", "vfork", "vmsplice", "wait4", "waitid", "waitpid", "write",
    "writev",
    "ptrace", "process_vm_readv", "process_vm_writev", "chroot", "arch_prctl", "modify_ldt",
})  # fmt: skip

#: Docker allows these, envbox refused them before it had an allow-list, and still does: reading
#: or tuning the kernel's clock discipline is no business of a service under test.
REFUSED_BEYOND_DOCKER = frozenset({"adjtimex", "clock_adjtime"})

#: AUDIT_ARCH_* of each machine whose numbers are known here, and its {name: number}
_MACHINES = {
    "x86_64": (0xC000003E, syscall_tables.X86_64),
    "aarch64": (0xC00000B7, syscall_tables.AARCH64),
}

_Code = list[tuple[int, int, int, int]]


def _ret(k: int) -> _Code:
    return [(_RET_K, 0, 0, k)]


def _refuse_if_set(mask: int) -> _Code:
    """clone, unshare: the flags are the first argument."""
    return [(_LD_W_ABS, 0, 0, _ARG0_LOW), (_JSET_K, 0, 1, mask), *_ret(_EPERM), *_ret(SECCOMP_RET_ALLOW)]


def _refuse_if_equal(value: int) -> _Code:
    """socket, socketpair: the address family is the first argument."""
    return [(_LD_W_ABS, 0, 0, _ARG0_LOW), (_JEQ_K, 0, 1, value), *_ret(_EPERM), *_ret(SECCOMP_RET_ALLOW)]


def _allow_only(values: tuple[int, ...]) -> _Code:
    """personality: the kernel reads its argument as an unsigned int, the low 32 bits."""
    n = len(values)
    jumps = [(_JEQ_K, n - i, 0, v) for i, v in enumerate(values)]  # a match lands on the ALLOW
    return [(_LD_W_ABS, 0, 0, _ARG0_LOW), *jumps, *_ret(_EPERM), *_ret(SECCOMP_RET_ALLOW)]


#: the argument checks, by call name
_CHECKS: dict[str, Callable[[], _Code]] = {
    "clone": lambda: _refuse_if_set(_CLONE_NEWUSER),
    "unshare": lambda: _refuse_if_set(_CLONE_NEWUSER),
    "socket": lambda: _refuse_if_equal(_AF_VSOCK),
    "socketpair": lambda: _refuse_if_equal(_AF_VSOCK),
    "personality": lambda: _allow_only(_PERSONALITIES),
    "clone3": lambda: _ret(_ENOSYS),
}


@dataclasses.dataclass(frozen=True)
class Policy:
    """What the filter does on one machine, for ``envbox doctor`` and the docs."""

    machine: str
    #: names allowed (some with an argument check, see ``checked``)
    allowed: frozenset[str]
    #: names refused with EPERM
    refused: frozenset[str]
    #: names whose arguments decide
    checked: frozenset[str]
    #: numbers above this one answer ENOSYS
    highest: int

    def summary(self) -> str:
        """One line, as ``envbox doctor`` prints it."""
        return (f"allow-list (Docker's default profile): {len(self.allowed)} of "
                f"{len(self.allowed) + len(self.refused)} known {self.machine} calls allowed "
                f"({', '.join(sorted(self.checked - {'clone3'}))} by their arguments), "
                f"{len(self.refused)} refused with EPERM, clone3 and numbers above "
                f"{self.highest} answer ENOSYS so libc falls back")  # fmt: skip


def policy(machine: str | None = None) -> Policy | None:
    """The filter's policy on this machine (None where its system call numbers are not known)."""
    machine = machine or os.uname().machine
    if machine not in _MACHINES:
        return None
    table = _MACHINES[machine][1]
    allowed = frozenset(table) & (ALLOWED | set(_CHECKS) - {"clone3"}) - REFUSED_BEYOND_DOCKER
    return Policy(machine, allowed, frozenset(table) - allowed - {"clone3"},
                  frozenset(_CHECKS) & frozenset(table), max(table.values()))  # fmt: skip


def _actions(machine: str) -> list[tuple[int, _Code]]:
    """The ranges of numbers that share an answer: (first number, its code), sorted, from 0 on."""
    table = _MACHINES[machine][1]
    rules = policy(machine)
    assert rules is not None
    by_number: dict[int, _Code] = {}
    for name, nr in table.items():
        check = _CHECKS.get(name)
        by_number[nr] = check() if check else _ret(SECCOMP_RET_ALLOW if name in rules.allowed else _EPERM)
    ranges: list[tuple[int, _Code]] = []
    for nr in range(rules.highest + 1):
        code = by_number.get(nr, _ret(_EPERM))  # a gap in the table: no such call
        if not ranges or len(code) > 1 or code != ranges[-1][1] or len(ranges[-1][1]) > 1:
            ranges.append((nr, code))
    ranges.append((rules.highest + 1, _ret(_ENOSYS)))
    if machine == "x86_64":  # x32 calls: the same numbers (or their own, from 512) with bit 30 set
        ranges.append((_X32_SYSCALL_BIT, _ret(_EPERM)))
    return ranges


def _search(ranges: list[tuple[int, _Code]]) -> _Code:
    """A balanced binary search over the ranges, on the number already in the accumulator."""
    if len(ranges) == 1:
        return ranges[0][1]
    mid = len(ranges) // 2
    low, high = _search(ranges[:mid]), _search(ranges[mid:])
    split = ranges[mid][0]
    if len(low) <= _MAX_JUMP:
        return [(_JGE_K, len(low), 0, split), *low, *high]
    return [(_JGE_K, 0, 1, split), (_JA, 0, 0, len(low)), *low, *high]


@functools.cache
def program(machine: str | None = None) -> bytes | None:
    """The filter for this machine (None where its system call numbers are not known here).

    Assembled once per process: the supervisor does it before it forks (see its zygote), so
    every sandbox and ``exec`` helper finds it made.
    """
    machine = machine or os.uname().machine
    if machine not in _MACHINES:
        return None
    code: _Code = [
        (_LD_W_ABS, 0, 0, _ARCH),
        (_JEQ_K, 1, 0, _MACHINES[machine][0]),
        *_ret(_EPERM),  # another ABI (32-bit calls on a 64-bit kernel): refused
        (_LD_W_ABS, 0, 0, _NR),
        *_search(_actions(machine)),
    ]
    return b"".join(struct.pack("=HBBI", op, jt, jf, k & 0xFFFFFFFF) for op, jt, jf, k in code)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install(code: bytes | None = None) -> bool:
    """Install the filter on the calling thread (inherited by its children and across exec).

    Needs ``no_new_privs`` (or ``CAP_SYS_ADMIN``). Returns False where no table exists for this
    machine (the capability limits then stand alone)."""
    code = program() if code is None else code
    if code is None:
        return False
    buf = ctypes.create_string_buffer(code, len(code))
    prog = _SockFprog(len(code) // 8, ctypes.cast(buf, ctypes.c_void_p).value)
    L.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(prog))
    return True
