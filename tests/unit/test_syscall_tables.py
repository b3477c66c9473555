"""The generated system call tables are what ``tools/syscall_tables.py`` makes from the installed
kernel headers: a header upgrade, or a hand edit, shows up here.

The seccomp allow-list is a list of names; a wrong or missing number would allow the wrong call or
refuse a needed one, so the tables are checked whole, not sampled.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest

from pytest_envbox.kernel import syscall_tables

ROOT = Path(__file__).resolve().parents[2]
X86_64_HEADER = Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h")
GENERIC_HEADER = Path("/usr/include/asm-generic/unistd.h")

needs_headers = pytest.mark.skipif(
    not (X86_64_HEADER.exists() and GENERIC_HEADER.exists() and shutil.which("cpp")),
    reason="the kernel headers (Debian: linux-libc-dev) or cpp are not installed",
)


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("syscall_tables_tool", ROOT / "tools/syscall_tables.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


@needs_headers
def test_the_module_is_what_the_generator_makes() -> None:
    text = (ROOT / "pytest_envbox/kernel/syscall_tables.py").read_text()
    fix = "python3 tools/syscall_tables.py > pytest_envbox/kernel/syscall_tables.py"
    assert text == generator().module_text(), f"regenerate: {fix}"


@needs_headers
def test_x86_64_is_the_header_line_by_line() -> None:
    """Read independently of the generator: every ``#define __NR_name number``."""
    header = X86_64_HEADER.read_text()
    found = {m[1]: int(m[2]) for m in re.finditer(r"^#define __NR_(\w+)\s+(\d+)\s*$", header, re.M)}
    assert found == syscall_tables.X86_64


def test_the_tables_know_what_the_filter_needs() -> None:
    """Spot checks against numbers well known on each machine (man 2 syscall, strace -y)."""
    assert {k: syscall_tables.X86_64[k] for k in ("read", "write", "open", "clone", "socket",
            "personality", "unshare", "io_uring_setup", "newfstatat", "clone3")} == {
        "read": 0, "write": 1, "open": 2, "clone": 56, "socket": 41, "personality": 135,
        "unshare": 272, "io_uring_setup": 425, "newfstatat": 262, "clone3": 435}  # fmt: skip
    assert {k: syscall_tables.AARCH64[k] for k in ("read", "write", "openat", "clone", "socket",
            "personality", "unshare", "io_uring_setup", "newfstatat", "fstat", "mmap", "clone3",
            "renameat", "getrlimit", "memfd_secret")} == {
        "read": 63, "write": 64, "openat": 56, "clone": 220, "socket": 198, "personality": 92,
        "unshare": 97, "io_uring_setup": 425, "newfstatat": 79, "fstat": 80, "mmap": 222,
        "clone3": 435, "renameat": 38, "getrlimit": 163, "memfd_secret": 447}  # fmt: skip
    # arm64 has no legacy calls and no 32-bit variants
    assert not {"open", "fork", "stat", "fstatat64", "fcntl64", "mmap2"} & set(syscall_tables.AARCH64)
    # numbers are unique within a table
    for table in (syscall_tables.X86_64, syscall_tables.AARCH64):
        assert len(set(table.values())) == len(table)
