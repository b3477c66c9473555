"""The shipped container seccomp profile (``pytest_envbox/data/seccomp-envbox.json``) is what
``tools/seccomp_profile.py`` makes from the service filter's allow-list: an edit of one without
the other shows up here. And it never lets through the calls container escapes are made of."""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path
from types import ModuleType

from tests.conftest import load_by_path

ROOT = Path(__file__).resolve().parents[2]
PROFILE = files("pytest_envbox") / "data" / "seccomp-envbox.json"


def _tool() -> ModuleType:
    return load_by_path("seccomp_profile", ROOT / "tools" / "seccomp_profile.py")


def test_the_shipped_profile_is_what_the_tool_makes() -> None:
    assert PROFILE.read_text() == _tool().text(), (
        "regenerate: python3 tools/seccomp_profile.py > pytest_envbox/data/seccomp-envbox.json")


def test_it_allows_envbox_rootless_calls_and_refuses_what_escapes_are_made_of() -> None:
    profile = json.loads(PROFILE.read_text())
    assert profile["defaultAction"] == "SCMP_ACT_ERRNO"
    allowed = {n for rule in profile["syscalls"] if rule["action"] == "SCMP_ACT_ALLOW" for n in rule["names"]}
    assert set(_tool().NAMESPACE_CALLS) <= allowed
    # open_by_handle_at: the "shocker" escape; the others load code into, or reconfigure, the kernel.
    for name in ("open_by_handle_at", "bpf", "keyctl", "add_key", "request_key", "kexec_load",
                 "kexec_file_load", "init_module", "finit_module", "delete_module", "reboot",
                 "swapon", "swapoff", "perf_event_open", "iopl", "ioperm", "acct", "settimeofday",
                 "clock_settime", "syslog", "quotactl", "userfaultfd"):  # fmt: skip
        assert name not in allowed, name
    # socket refuses AF_VSOCK (the hypervisor's sockets); personality has Docker's five values.
    socket = [r for r in profile["syscalls"] if r["names"] == ["socket"]]
    assert socket == [{"names": ["socket"], "action": "SCMP_ACT_ALLOW",
                       "args": [{"index": 0, "value": 40, "op": "SCMP_CMP_NE"}]}]  # fmt: skip
    assert len([r for r in profile["syscalls"] if r["names"] == ["personality"]]) == 5
