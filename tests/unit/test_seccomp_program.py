"""The services' seccomp filter, run by a small classic-BPF interpreter over ``struct seccomp_data``
inputs: what each system call gets, and that the kernel would load the program; no root, no
prctl.

The interpreter knows exactly the instructions ``seccomp.program`` emits (LD W ABS, JEQ K, JGE K,
JSET K, RET K) and refuses any other opcode, so a new kind of instruction cannot slip through
untested. Constants are copied by hand from the kernel's headers, not imported from the module
under test (<linux/seccomp.h>, <linux/audit.h>, <linux/bpf_common.h>, <linux/filter.h>,
<linux/sched.h>; checked once by a C program compiled against Debian's linux-libc-dev 6.1).
System call numbers are checked against the installed <asm/unistd_64.h> and
<asm-generic/unistd.h> (aarch64's table) where they are present.
"""

from __future__ import annotations

import errno
import re
import struct
from pathlib import Path

import pytest

from pytest_envbox.kernel import seccomp

# <linux/seccomp.h>
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
EPERM = SECCOMP_RET_ERRNO | errno.EPERM
ENOSYS = SECCOMP_RET_ERRNO | errno.ENOSYS
# <linux/audit.h>: EM_* | __AUDIT_ARCH_64BIT (0x80000000) | __AUDIT_ARCH_LE (0x40000000)
AUDIT_ARCH_X86_64, AUDIT_ARCH_I386 = 0xC000003E, 0x40000003
AUDIT_ARCH_AARCH64, AUDIT_ARCH_ARM = 0xC00000B7, 0x40000028
ARCH = {"x86_64": AUDIT_ARCH_X86_64, "aarch64": AUDIT_ARCH_AARCH64}
# <asm/unistd.h>: x32 calls are the x86_64 numbers (or their own, from 512) with this bit set
X32_SYSCALL_BIT = 0x40000000
# <linux/filter.h>
BPF_MAXINSNS = 4096
# <linux/sched.h>, <asm/signal.h>
CLONE_VM, CLONE_FS, CLONE_FILES, CLONE_SIGHAND = 0x100, 0x200, 0x400, 0x800
CLONE_THREAD, CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWNET = 0x10000, 0x20000, 0x10000000, 0x40000000
SIGCHLD = 17

# System call numbers this test uses (checked against the headers below, where present).
ORDINARY = {
    "x86_64": {"read": 0, "write": 1, "openat": 257, "mmap": 9, "execve": 59},
    "aarch64": {"read": 63, "write": 64, "openat": 56, "mmap": 222, "execve": 221},
}
CLONE = {"x86_64": 56, "aarch64": 220}
UNSHARE = {"x86_64": 272, "aarch64": 97}
CLONE3 = 435  # the same everywhere since 5.3

# The deny-list the module's docstring describes (Docker's): a name dropped from or added to a
# table must show up here.
DENIED_X86_64 = {
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "bpf",
    "perf_event_open", "keyctl", "add_key", "request_key", "userfaultfd", "mount", "umount2",
    "pivot_root", "setns", "swapon", "swapoff", "reboot", "acct", "settimeofday", "clock_settime",
    "clock_adjtime", "adjtimex", "open_by_handle_at", "lookup_dcookie", "quotactl", "syslog",
    "iopl", "ioperm", "vhangup", "uselib", "fsopen", "fsmount", "fspick", "move_mount",
    "open_tree", "mount_setattr",
}  # fmt: skip
DENIED_AARCH64 = DENIED_X86_64 - {"iopl", "ioperm", "uselib"}  # x86-only calls

# BPF opcodes (<linux/bpf_common.h>): class | size | mode, or class | op | source
LD_W_ABS = 0x00 | 0x00 | 0x20  # BPF_LD | BPF_W | BPF_ABS
JEQ_K = 0x05 | 0x10 | 0x00  # BPF_JMP | BPF_JEQ | BPF_K
JGE_K = 0x05 | 0x30 | 0x00  # BPF_JMP | BPF_JGE | BPF_K
JSET_K = 0x05 | 0x40 | 0x00  # BPF_JMP | BPF_JSET | BPF_K
RET_K = 0x06 | 0x00  # BPF_RET | BPF_K
JUMPS = {JEQ_K, JGE_K, JSET_K}
SECCOMP_DATA_SIZE = 64  # int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6]


def insns(prog: bytes) -> list[tuple[int, int, int, int]]:
    """struct sock_filter { __u16 code; __u8 jt; __u8 jf; __u32 k; }, 8 bytes each."""
    assert len(prog) % 8 == 0
    return [struct.unpack_from("=HBBI", prog, off) for off in range(0, len(prog), 8)]


def seccomp_data(nr: int, arch: int, args: tuple[int, ...] = ()) -> bytes:
    """struct seccomp_data, little-endian (both machines here): nr, arch, ip, args[6]."""
    return struct.pack("<iIQ6Q", nr, arch, 0x401000, *args, *[0] * (6 - len(args)))


def run(prog: bytes, data: bytes) -> int:
    """Run the program as the kernel's classic-BPF interpreter would; its return value."""
    code = insns(prog)
    a = 0
    pc = 0
    for _ in range(len(code)):  # jumps are forward only: at most one pass
        op, jt, jf, k = code[pc]
        if op == LD_W_ABS:
            a = struct.unpack_from("<I", data, k)[0]
            pc += 1
        elif op == JEQ_K:
            pc += 1 + (jt if a == k else jf)
        elif op == JGE_K:
            pc += 1 + (jt if a >= k else jf)
        elif op == JSET_K:
            pc += 1 + (jt if a & k else jf)
        elif op == RET_K:
            return int(k)
        else:
            raise AssertionError(f"instruction {pc}: opcode {op:#x} is not known to this test")
        assert pc < len(code), f"jump out of the program at {pc}"
    raise AssertionError("ran past the end without a RET")


def call(machine: str, nr: int, *args: int, arch: int | None = None) -> int:
    prog = seccomp.program(machine)
    assert prog is not None
    return run(prog, seccomp_data(nr, ARCH[machine] if arch is None else arch, args))


machines = pytest.mark.parametrize("machine", ["x86_64", "aarch64"])


def test_unknown_machines_have_no_program() -> None:
    for machine in ("i686", "armv7l", "riscv64", "s390x", "ppc64le", "mips64"):
        assert seccomp.program(machine) is None
    assert seccomp.program("x86_64") is not None
    assert seccomp.program("aarch64") is not None


def test_the_deny_lists() -> None:
    assert set(seccomp._TABLES["x86_64"][1]) == DENIED_X86_64
    assert set(seccomp._TABLES["aarch64"][1]) == DENIED_AARCH64
    assert seccomp._TABLES["x86_64"][0] == AUDIT_ARCH_X86_64
    assert seccomp._TABLES["aarch64"][0] == AUDIT_ARCH_AARCH64


@machines
def test_the_kernel_would_load_it(machine: str) -> None:
    """What the kernel's bpf_check_classic and seccomp_check_filter ask of a program: at most
    BPF_MAXINSNS instructions, every jump inside it, a RET last, and loads of aligned words
    within seccomp_data. And only opcodes this test's interpreter knows, reached or not."""
    prog = seccomp.program(machine)
    assert prog is not None
    code = insns(prog)
    assert 0 < len(code) <= BPF_MAXINSNS
    assert code[-1][0] == RET_K
    for pc, (op, jt, jf, k) in enumerate(code):
        assert op in {LD_W_ABS, RET_K} | JUMPS, f"{pc}: opcode {op:#x}"
        if op in JUMPS:
            assert pc + 1 + jt < len(code) and pc + 1 + jf < len(code), f"{pc}: jumps out"
        else:
            assert jt == jf == 0
        if op == LD_W_ABS:
            assert k % 4 == 0 and k + 4 <= SECCOMP_DATA_SIZE
        if op == RET_K:
            assert k in (SECCOMP_RET_ALLOW, EPERM, ENOSYS)


@machines
def test_every_denied_call_gets_eperm(machine: str) -> None:
    for name, nr in seccomp._TABLES[machine][1].items():
        assert call(machine, nr) == EPERM, name
        assert call(machine, nr, 0xFFFFFFFF, 1, 2, 3, 4, 5) == EPERM, name  # whatever the args


@machines
def test_clone3_gets_enosys_so_libc_falls_back_to_clone(machine: str) -> None:
    assert call(machine, CLONE3) == ENOSYS
    assert call(machine, CLONE3, 0x7FFF_0000_1000, 88) == ENOSYS


@machines
def test_ordinary_calls_are_allowed(machine: str) -> None:
    for name, nr in ORDINARY[machine].items():
        assert call(machine, nr, 3, 0x1000, 0) == SECCOMP_RET_ALLOW, name


@machines
def test_clone_and_unshare_only_without_a_new_user_namespace(machine: str) -> None:
    clone, unshare = CLONE[machine], UNSHARE[machine]
    thread = CLONE_VM | CLONE_FS | CLONE_FILES | CLONE_SIGHAND | CLONE_THREAD
    assert call(machine, clone, SIGCHLD) == SECCOMP_RET_ALLOW  # fork()
    assert call(machine, clone, thread, 0x7F00_0000_0000) == SECCOMP_RET_ALLOW  # pthread_create
    assert call(machine, clone, SIGCHLD | CLONE_NEWNS | CLONE_NEWNET) == SECCOMP_RET_ALLOW
    assert call(machine, unshare, CLONE_NEWNS) == SECCOMP_RET_ALLOW
    assert call(machine, unshare, 0) == SECCOMP_RET_ALLOW
    assert call(machine, unshare, CLONE_NEWUSER) == EPERM
    assert call(machine, unshare, CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET) == EPERM
    assert call(machine, clone, CLONE_NEWUSER | SIGCHLD) == EPERM
    assert call(machine, clone, 0xFFFFFFFF) == EPERM
    # CLONE_NEWUSER in another argument is not the flags: allowed.
    assert call(machine, clone, SIGCHLD, CLONE_NEWUSER) == SECCOMP_RET_ALLOW


@machines
def test_every_number_gets_what_its_table_says(machine: str) -> None:
    """All of 0..1023 (today's tables end below 470): the denied ones EPERM, clone3 ENOSYS,
    everything else (clone and unshare without flags among them) allowed."""
    denied = set(seccomp._TABLES[machine][1].values())
    for nr in range(1024):
        expected = EPERM if nr in denied else ENOSYS if nr == CLONE3 else SECCOMP_RET_ALLOW
        assert call(machine, nr) == expected, nr


def test_a_foreign_abi_is_refused() -> None:
    """32-bit calls on a 64-bit kernel come with another AUDIT_ARCH (and another numbering)."""
    for nr in (0, 1, 3, 4, 11, 120, 435):  # i386: read is 3, write 4, execve 11
        assert call("x86_64", nr, arch=AUDIT_ARCH_I386) == EPERM
        assert call("x86_64", nr, arch=AUDIT_ARCH_AARCH64) == EPERM
        assert call("aarch64", nr, arch=AUDIT_ARCH_ARM) == EPERM
        assert call("aarch64", nr, arch=AUDIT_ARCH_X86_64) == EPERM


def test_x32_calls_are_refused_on_x86_64() -> None:
    """x32 shares AUDIT_ARCH_X86_64: the filter tells it by the number's bit 30."""
    for nr in [*ORDINARY["x86_64"].values(), CLONE["x86_64"], UNSHARE["x86_64"], CLONE3, 512, 547]:
        assert call("x86_64", nr | X32_SYSCALL_BIT) == EPERM, nr
        assert call("x86_64", nr) != EPERM, nr


def _numbers(header: Path) -> dict[str, int]:
    text = header.read_text()
    return {m[1]: int(m[2]) for m in re.finditer(r"^#define __NR(?:3264)?_(\w+)\s+(\d+)\s*$", text, re.M)}


@pytest.mark.parametrize(("machine", "header"), [
    ("x86_64", "/usr/include/x86_64-linux-gnu/asm/unistd_64.h"),
    ("aarch64", "/usr/include/asm-generic/unistd.h"),  # arm64's uapi unistd.h is the generic table
])  # fmt: skip
def test_system_call_numbers_match_the_kernel_headers(machine: str, header: str) -> None:
    path = Path(header)
    if not path.exists():
        pytest.skip(f"{header} is not installed (Debian: linux-libc-dev)")
    kernel = _numbers(path)
    ours = {**seccomp._TABLES[machine][1], **seccomp._CLONE_CALLS[machine], "clone3": seccomp._CLONE3}
    assert {name: kernel.get(name) for name in ours} == ours
    used_here = {**ORDINARY[machine], "clone": CLONE[machine], "unshare": UNSHARE[machine],
                 "clone3": CLONE3}  # fmt: skip
    assert {name: kernel.get(name) for name in used_here} == used_here
