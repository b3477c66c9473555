"""The services' seccomp filter, run by a small classic-BPF interpreter over ``struct seccomp_data``
inputs: what each system call gets, and that the kernel would load the program; no root, no
prctl.

The interpreter knows exactly the instructions ``seccomp.program`` emits (LD W ABS, JEQ K, JGE K,
JSET K, RET K) and refuses any other opcode, so a new kind of instruction cannot slip through
untested. Constants are copied by hand from the kernel's headers, not imported from the module
under test (<linux/seccomp.h>, <linux/audit.h>, <linux/bpf_common.h>, <linux/filter.h>,
<linux/sched.h>; checked once by a C program compiled against Debian's linux-libc-dev 6.1).
The numbers the test copies are checked against the generated tables (kernel/syscall_tables.py,
which test_syscall_tables.py checks against the kernel's headers).
"""

from __future__ import annotations

import errno
import struct

import pytest

from pytest_envbox.kernel import seccomp, syscall_tables

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

# The deny-list the filter had before it became an allow-list: every one must stay refused.
FORMERLY_DENIED_X86_64 = {
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "bpf",
    "perf_event_open", "keyctl", "add_key", "request_key", "userfaultfd", "mount", "umount2",
    "pivot_root", "setns", "swapon", "swapoff", "reboot", "acct", "settimeofday", "clock_settime",
    "clock_adjtime", "adjtimex", "open_by_handle_at", "lookup_dcookie", "quotactl", "syslog",
    "iopl", "ioperm", "vhangup", "uselib", "fsopen", "fsmount", "fspick", "move_mount",
    "open_tree", "mount_setattr",
}  # fmt: skip
FORMERLY_DENIED_AARCH64 = FORMERLY_DENIED_X86_64 - {"iopl", "ioperm", "uselib"}  # x86-only calls
# What issue 15 found open: refused now, as Docker refuses them.
IO_URING = {"io_uring_setup", "io_uring_enter", "io_uring_register"}
AF_VSOCK, AF_UNIX, AF_INET, AF_INET6, AF_NETLINK, AF_PACKET = 40, 1, 2, 10, 16, 17
# personality(2): PER_LINUX, UNAME26, PER_LINUX32, both, the query (<linux/personality.h>)
PERSONALITIES = {0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF}
ADDR_NO_RANDOMIZE, READ_IMPLIES_EXEC = 0x0040000, 0x0400000

# BPF opcodes (<linux/bpf_common.h>): class | size | mode, or class | op | source
LD_W_ABS = 0x00 | 0x00 | 0x20  # BPF_LD | BPF_W | BPF_ABS
JA = 0x05 | 0x00  # BPF_JMP | BPF_JA
JEQ_K = 0x05 | 0x10 | 0x00  # BPF_JMP | BPF_JEQ | BPF_K
JGE_K = 0x05 | 0x30 | 0x00  # BPF_JMP | BPF_JGE | BPF_K
JSET_K = 0x05 | 0x40 | 0x00  # BPF_JMP | BPF_JSET | BPF_K
RET_K = 0x06 | 0x00  # BPF_RET | BPF_K
JUMPS = {JEQ_K, JGE_K, JSET_K}  # conditional
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
    return steps(prog, data)[0]


def steps(prog: bytes, data: bytes) -> tuple[int, int]:
    """The program's return value and how many instructions it ran to get there."""
    code = insns(prog)
    a = 0
    pc = 0
    for n in range(1, len(code) + 1):  # jumps are forward only: at most one pass
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
        elif op == JA:
            pc += 1 + k
        elif op == RET_K:
            return int(k), n
        else:
            raise AssertionError(f"instruction {pc}: opcode {op:#x} is not known to this test")
        assert pc < len(code), f"jump out of the program at {pc}"
    raise AssertionError("ran past the end without a RET")


def table(machine: str) -> dict[str, int]:
    return {"x86_64": syscall_tables.X86_64, "aarch64": syscall_tables.AARCH64}[machine]


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


    for machine in ("i686", "armv7l", "riscv64", "s390x", "ppc64le", "mips64"):
        assert seccomp.program(machine) is None
        assert seccomp.policy(machine) is None
    assert seccomp.program("x86_64") is not None
    assert seccomp.program("aarch64") is not None


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
        assert op in {LD_W_ABS, RET_K, JA} | JUMPS, f"{pc}: opcode {op:#x}"
        if op in JUMPS:
            assert pc + 1 + jt < len(code) and pc + 1 + jf < len(code), f"{pc}: jumps out"
        elif op == JA:
            assert jt == jf == 0 and pc + 1 + k < len(code), f"{pc}: jumps out"
        else:
            assert jt == jf == 0
        if op == LD_W_ABS:
            assert k % 4 == 0 and k + 4 <= SECCOMP_DATA_SIZE
        if op == RET_K:
            assert k in (SECCOMP_RET_ALLOW, EPERM, ENOSYS)


@machines
def test_every_formerly_denied_call_stays_refused(machine: str) -> None:
    denied = FORMERLY_DENIED_X86_64 if machine == "x86_64" else FORMERLY_DENIED_AARCH64
    assert denied <= set(table(machine))
    for name in denied:
        assert call(machine, table(machine)[name]) == EPERM, name
        assert call(machine, table(machine)[name], 0xFFFFFFFF, 1, 2, 3, 4, 5) == EPERM, name


@machines
def test_io_uring_is_refused(machine: str) -> None:
    for name in IO_URING:
        assert call(machine, table(machine)[name], 8, 0x7F00_0000_0000) == EPERM, name


@machines
def test_every_known_call_gets_what_the_policy_says(machine: str) -> None:
    """The allow-list, name by name: Docker's names (less envbox's extra refusals) allowed
    whatever their arguments, the ones with argument checks tested below, the rest EPERM."""
    rules = seccomp.policy(machine)
    assert rules is not None and rules.machine == machine
    checked = {"clone", "unshare", "socket", "socketpair", "personality", "clone3"}
    assert rules.checked == checked
    for name, nr in table(machine).items():
        if name in checked:
            continue
        allowed = name in seccomp.ALLOWED and name not in seccomp.REFUSED_BEYOND_DOCKER
        assert (name in rules.allowed) == allowed, name
        expected = SECCOMP_RET_ALLOW if allowed else EPERM
        assert call(machine, nr, 3, 0x1000, 0) == expected, name
        assert call(machine, nr, 0xFFFFFFFF, 40, 0x10000000) == expected, name
    assert rules.refused == set(table(machine)) - rules.allowed - {"clone3"}
    assert "adjtimex" in rules.refused and "personality" in rules.allowed


@machines
def test_ordinary_calls_are_allowed(machine: str) -> None:
    for name, nr in ORDINARY[machine].items():
        assert call(machine, nr, 3, 0x1000, 0) == SECCOMP_RET_ALLOW, name


@machines
def test_unknown_numbers_in_the_table_get_eperm_and_newer_ones_enosys(machine: str) -> None:
    """A gap in the table is no call; a number above the table's highest may be a call newer
    than the table (fchmodat2 is 452): ENOSYS, so libc falls back to the older call."""
    highest = max(table(machine).values())
    known = set(table(machine).values())
    for nr in range(highest + 1):
        if nr not in known:
            assert call(machine, nr) == EPERM, nr
    for nr in (highest + 1, highest + 2, 452, 1023, 0x3FFFFFFF):
        assert call(machine, nr) == ENOSYS, nr
    assert call(machine, 0x3FFFFFFF) == ENOSYS


@machines
def test_no_vsock_sockets(machine: str) -> None:
    """AF_VSOCK reaches the hypervisor's and the host's vsock ports: refused, as Docker does."""
    for name in ("socket", "socketpair"):
        nr = table(machine)[name]
        assert call(machine, nr, AF_VSOCK, 1, 0) == EPERM, name
        for family in (AF_UNIX, AF_INET, AF_INET6, AF_NETLINK, AF_PACKET, 39, 41, 45):
            assert call(machine, nr, family, 1, 0) == SECCOMP_RET_ALLOW, (name, family)


@machines
def test_personality_only_takes_dockers_values(machine: str) -> None:
    nr = table(machine)["personality"]
    for value in PERSONALITIES:
        assert call(machine, nr, value) == SECCOMP_RET_ALLOW, hex(value)
    for value in (ADDR_NO_RANDOMIZE, READ_IMPLIES_EXEC, 0x1, 0x9, 0x20001, 0xFFFFFFFE):
        assert call(machine, nr, value) == EPERM, hex(value)


@machines
def test_clone3_gets_enosys_so_libc_falls_back_to_clone(machine: str) -> None:
    assert call(machine, CLONE3) == ENOSYS
    assert call(machine, CLONE3, 0x7FFF_0000_1000, 88) == ENOSYS


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
def test_a_call_is_found_by_a_binary_search(machine: str) -> None:
    """Every number, known or not, is answered within a few comparisons (log2 of the ranges),
    not after one comparison per allowed call."""
    prog = seccomp.program(machine)
    assert prog is not None
    longest = max(steps(prog, seccomp_data(nr, ARCH[machine], (0,)))[1] for nr in range(1024))
    assert longest <= 4 + 8 + 7  # prologue, at most 8 comparisons, personality's check


def test_far_branches_jump_with_ja() -> None:
    """Past 255 instructions a conditional jump cannot reach: the search then jumps with JA."""
    ranges = [(n, [(RET_K, 0, 0, EPERM if n % 2 else SECCOMP_RET_ALLOW)]) for n in range(600)]
    code = [(LD_W_ABS, 0, 0, 0), *seccomp._search(ranges)]  # nr into the accumulator first
    prog = b"".join(struct.pack("=HBBI", *insn) for insn in code)
    assert any(op == JA for op, *_ in insns(prog))
    for nr in range(600):
        assert run(prog, seccomp_data(nr, 0)) == (EPERM if nr % 2 else SECCOMP_RET_ALLOW), nr


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
    assert call("x86_64", -1) == EPERM  # nr is an int: -1 is 0xffffffff to the filter


def test_the_policy_line_for_envbox_doctor() -> None:
    rules = seccomp.policy("x86_64")
    assert rules is not None
    line = rules.summary()
    assert line.startswith("allow-list") and "ENOSYS" in line and "x86_64" in line
    assert f"{len(rules.allowed)} of {len(rules.allowed) + len(rules.refused)}" in line


@pytest.mark.parametrize("machine", ["x86_64", "aarch64"])
def test_the_numbers_this_test_uses_match_the_tables(machine: str) -> None:
    """The hand-copied numbers above against the generated tables (which
    test_syscall_tables.py checks against the kernel's headers)."""
    used_here = {**ORDINARY[machine], "clone": CLONE[machine], "unshare": UNSHARE[machine],
                 "clone3": CLONE3}  # fmt: skip
    assert {name: table(machine).get(name) for name in used_here} == used_here
