"""The services' default seccomp filter: Docker's list of system calls a container has no business
making, refused with ``EPERM``.

Capabilities already stop most of them (no ``CAP_SYS_MODULE``, ``CAP_SYS_ADMIN``...). The filter
adds what capabilities cannot say: no kernel keyring (``keyctl``, ``add_key``, ``request_key``, not
namespaced), no ``bpf`` or ``perf_event_open`` (kernel attack surface), no new user namespace (in
which a service would get ``CAP_SYS_ADMIN`` back and could mount and ``setns`` again), no
``userfaultfd``, and the time, swap, reboot, accounting and module calls even where a capability
would allow them. Everything else is allowed: a deny-list, so real servers keep working.

Hand-written, about forty BPF instructions: libseccomp's Python binding is not on PyPI (it comes
with the C library, as distribution packages), and a static deny-list needs none of its
generality. The filter is installed after ``no_new_privs`` (no privilege needed) in each
service's init, before the service starts (it inherits it), and in each ``exec`` command.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import struct

from pytest_envbox.kernel import linux as L

__all__ = [
    "PR_SET_SECCOMP",
    "SECCOMP_MODE_FILTER",
    "SECCOMP_RET_ALLOW",
    "SECCOMP_RET_ERRNO",
    "install",
    "program",
]

PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000

# BPF opcodes (linux/bpf_common.h)
_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_JGE_K = 0x35  # BPF_JMP | BPF_JGE | BPF_K
_JSET_K = 0x45  # BPF_JMP | BPF_JSET | BPF_K
_RET_K = 0x06  # BPF_RET | BPF_K

# struct seccomp_data: int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6]
_NR, _ARCH, _ARG0_LOW = 0, 4, 16  # (little-endian: the low 32 bits of args[0] come first)

_CLONE_NEWUSER = 0x10000000

#: per machine: (AUDIT_ARCH_*, {name: number})
_TABLES: dict[str, tuple[int, dict[str, int]]] = {
    "x86_64": (0xC000003E, {
        "kexec_load": 246, "kexec_file_load": 320, "init_module": 175, "finit_module": 313,
        "delete_module": 176, "bpf": 321, "perf_event_open": 298, "keyctl": 250, "add_key": 248,
        "request_key": 249, "userfaultfd": 323, "mount": 165, "umount2": 166, "pivot_root": 155,
        "setns": 308, "swapon": 167, "swapoff": 168, "reboot": 169, "acct": 163,
        "settimeofday": 164, "clock_settime": 227, "clock_adjtime": 305, "adjtimex": 159,
        "open_by_handle_at": 304, "lookup_dcookie": 212, "quotactl": 179, "syslog": 103,
        "iopl": 172, "ioperm": 173, "vhangup": 153, "uselib": 134, "fsopen": 430, "fsmount": 432,
        "fspick": 433, "move_mount": 429, "open_tree": 428, "mount_setattr": 442,
    }),
    "aarch64": (0xC00000B7, {
        "kexec_load": 104, "kexec_file_load": 294, "init_module": 105, "finit_module": 273,
        "delete_module": 106, "bpf": 280, "perf_event_open": 241, "keyctl": 219, "add_key": 217,
        "request_key": 218, "userfaultfd": 282, "mount": 40, "umount2": 39, "pivot_root": 41,
        "setns": 268, "swapon": 224, "swapoff": 225, "reboot": 142, "acct": 89,
        "settimeofday": 170, "clock_settime": 112, "clock_adjtime": 266, "adjtimex": 171,
        "open_by_handle_at": 265, "lookup_dcookie": 18, "quotactl": 60, "syslog": 116,
        "vhangup": 58, "fsopen": 430, "fsmount": 432, "fspick": 433, "move_mount": 429,
        "open_tree": 428, "mount_setattr": 442,
    }),
}  # fmt: skip
#: calls whose first argument is clone flags: refused when they ask for a new user namespace
_CLONE_CALLS = {"x86_64": {"unshare": 272, "clone": 56}, "aarch64": {"unshare": 97, "clone": 220}}
#: clone3 passes its flags in memory, out of a filter's reach: ENOSYS makes libc fall back to clone
_CLONE3 = 435


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k & 0xFFFFFFFF)


@functools.cache
def program(machine: str | None = None) -> bytes | None:
    """The filter for this machine (None where its system call numbers are not known here).

    Assembled once per process: the supervisor does it before it forks (see its zygote), so
    every sandbox and ``exec`` helper finds it made.
    """
    machine = machine or os.uname().machine
    if machine not in _TABLES:
        return None
    arch, table = _TABLES[machine]
    eperm = SECCOMP_RET_ERRNO | errno.EPERM
    enosys = SECCOMP_RET_ERRNO | errno.ENOSYS
    denied = sorted(set(table.values()))
    clones = sorted(_CLONE_CALLS[machine].values())
    out = [
        _insn(_LD_W_ABS, 0, 0, _ARCH),
        _insn(_JEQ_K, 1, 0, arch),
        _insn(_RET_K, 0, 0, eperm),  # another ABI (32-bit calls on a 64-bit kernel): refused
        _insn(_LD_W_ABS, 0, 0, _NR),
    ]
    if machine == "x86_64":  # the x32 ABI: same table with bit 30 set
        out += [_insn(_JGE_K, 0, 1, 0x40000000), _insn(_RET_K, 0, 0, eperm)]
    out += [_insn(_JEQ_K, 0, 1, _CLONE3), _insn(_RET_K, 0, 0, enosys)]
    # One comparison per denied call; a match jumps to the EPERM at the end of the list.
    n = len(denied)
    for i, nr in enumerate(denied):
        out.append(_insn(_JEQ_K, n - i + len(clones), 0, nr))
    # unshare/clone: check their flags.
    for i, nr in enumerate(clones):
        out.append(_insn(_JEQ_K, len(clones) - i + 1, 0, nr))
    out.append(_insn(_RET_K, 0, 0, SECCOMP_RET_ALLOW))
    out.append(_insn(_RET_K, 0, 0, eperm))  # the denied calls land here
    # A clone call: refuse CLONE_NEWUSER, allow the rest.
    out += [
        _insn(_LD_W_ABS, 0, 0, _ARG0_LOW),
        _insn(_JSET_K, 0, 1, _CLONE_NEWUSER),
        _insn(_RET_K, 0, 0, eperm),
        _insn(_RET_K, 0, 0, SECCOMP_RET_ALLOW),
    ]
    return b"".join(out)


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
