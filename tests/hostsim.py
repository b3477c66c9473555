"""Hosts that say no, made here: a seccomp filter that refuses what such a host refuses.

Two refusals cannot be had on this machine for real, so a test installs a filter in a child
process that answers the same calls with the same errno:

- ``container``: what Docker's default seccomp profile does to a process without
  ``CAP_SYS_ADMIN`` (Podman's lets these through; a real podman container is in
  test_containers.py): ``unshare`` and ``clone`` with any namespace flag, ``setns`` and the mount
  calls are ``EPERM``;
- ``apparmor``: what Ubuntu's ``kernel.apparmor_restrict_unprivileged_userns=1`` does: a new user
  namespace is made, but every call that needs a capability inside it is ``EPERM`` (the filter
  lets ``unshare(CLONE_NEWUSER)`` alone through and refuses the other namespace flags, ``setns`` and
  the mount calls; on Ubuntu it is AppArmor's ``unprivileged_userns`` profile that denies them).

Use: ``python tests/hostsim.py KIND PROGRAM ARGS...`` installs the filter (after
``no_new_privs``, as a container runtime does) and execs the program, which inherits it.
x86_64 and aarch64 only (the numbers below); elsewhere :func:`supported` is False.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
import sys

# classic BPF
_LD_W_ABS, _JEQ_K, _JSET_K, _RET_K = 0x20, 0x15, 0x45, 0x06
_ALLOW, _ERRNO = 0x7FFF0000, 0x00050000
_NS_FLAGS = 0x7E020080  # CLONE_NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET|NEWTIME
_NEWUSER = 0x10000000

#: machine -> (AUDIT_ARCH, numbers: unshare, clone, clone3, setns, mount-like calls)
_CALLS = {
    "x86_64": (0xC000003E, 272, 56, 435, 308,
               (165, 166, 155, 442, 428, 429, 430, 431, 432, 433)),
    "aarch64": (0xC00000B7, 97, 220, 435, 268,
                (40, 39, 41, 442, 428, 429, 430, 431, 432, 433)),
}  # fmt: skip


def supported() -> bool:
    return os.uname().machine in _CALLS


def program(kind: str) -> bytes:
    arch, unshare, clone, clone3, setns, mounts = _CALLS[os.uname().machine]
    eperm = _ERRNO | errno.EPERM
    refused = [setns, *mounts]
    code: list[tuple[int, int, int, int]] = [
        (_LD_W_ABS, 0, 0, 4), (_JEQ_K, 1, 0, arch), (_RET_K, 0, 0, eperm), (_LD_W_ABS, 0, 0, 0)
    ]  # fmt: skip
    # clone3 passes its flags in memory: ENOSYS, so that libc falls back to clone (as Docker does)
    code += [(_JEQ_K, 0, 1, clone3), (_RET_K, 0, 0, _ERRNO | errno.ENOSYS)]
    for nr in refused:
        code += [(_JEQ_K, 0, 1, nr), (_RET_K, 0, 0, eperm)]
    # unshare and clone: look at the flags (the first argument, its low 32 bits)
    code += [(_JEQ_K, 1, 0, unshare), (_JEQ_K, 0, 7, clone),
             (_LD_W_ABS, 0, 0, 16), (0x54, 0, 0, _NS_FLAGS)]  # ALU AND: only the namespace flags
    if kind == "apparmor":  # CLONE_NEWUSER alone passes: the namespace is made
        code += [(_JEQ_K, 3, 0, _NEWUSER)]
    elif kind == "container":
        code += [(_JEQ_K, 3, 0, 0xFFFFFFFF)]  # (never: keeps the jump offsets the same)
    else:
        raise ValueError(f"unknown kind {kind!r}: container or apparmor")
    code += [(_JEQ_K, 2, 0, 0), (_RET_K, 0, 0, eperm), (_RET_K, 0, 0, eperm), (_RET_K, 0, 0, _ALLOW)]
    code += [(_RET_K, 0, 0, _ALLOW)]
    return b"".join(struct.pack("=HBBI", op, jt, jf, k & 0xFFFFFFFF) for op, jt, jf, k in code)


class _Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install(kind: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
    code = program(kind)
    buf = ctypes.create_string_buffer(code, len(code))
    prog = _Fprog(len(code) // 8, ctypes.cast(buf, ctypes.c_void_p).value)
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
    if libc.prctl(22, 2, ctypes.addressof(prog), 0, 0) != 0:  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
        raise OSError(ctypes.get_errno(), "PR_SET_SECCOMP")


if __name__ == "__main__":
    install(sys.argv[1])
    os.execvp(sys.argv[2], sys.argv[2:])
