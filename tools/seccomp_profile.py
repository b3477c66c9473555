"""Writes ``pytest_envbox/data/seccomp-envbox.json``: a container seccomp profile under which
pytest-envbox runs rootless inside a container that has no added capability.

Run it from the repository's root after a change to the allow-list in
``pytest_envbox/kernel/seccomp.py``::

    python3 tools/seccomp_profile.py > pytest_envbox/data/seccomp-envbox.json

``tests/unit/test_seccomp_profile.py`` checks that the file is what this script makes.

What it is: Docker's default profile for a container with the default capabilities (the names
envbox's own service filter starts from, ``seccomp.ALLOWED``, and Docker's argument checks on
``socket`` and ``personality``), plus the calls envbox's rootless mode makes inside the user
namespace it creates: namespaces (``unshare``, ``clone``, ``clone3``, ``setns``), mounts
(``mount``, ``umount2``, ``pivot_root`` and the new mount API) and the sandbox's host name
(``sethostname``, ``setdomainname``).

Why that grants no privilege: the kernel checks a capability for each of these calls itself,
over the namespace concerned. A container without ``CAP_SYS_ADMIN`` still cannot mount, or make
any namespace but a user namespace, in its own namespaces: only in the user namespace it creates,
where it is root over nothing of the host's. What the profile does widen is the kernel code a
process can reach (user namespaces make more of the kernel reachable to an unprivileged user: the
reason Docker's default refuses them). Podman's default profile allows user namespaces and
mounts already; of these calls it refuses ``sethostname`` without ``CAP_SYS_ADMIN`` (EPERM, even
in a UTS namespace of the process's own user namespace) and does not list ``setdomainname``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pytest_envbox.kernel import seccomp

#: What envbox's rootless mode calls, beyond the allow-list, in the user namespace it makes.
NAMESPACE_CALLS = (
    "clone", "clone3", "fsconfig", "fsmount", "fsopen", "fspick", "mount", "mount_setattr",
    "move_mount", "open_tree", "pivot_root", "setdomainname", "sethostname", "setns", "umount",
    "umount2", "unshare",
)  # fmt: skip

_AF_VSOCK = 40


def profile() -> dict[str, Any]:
    """The profile, as the OCI runtime's JSON (Docker's and podman's ``--security-opt seccomp=``)."""
    names = sorted(set(seccomp.ALLOWED) | set(NAMESPACE_CALLS))
    rules: list[dict[str, Any]] = [{"names": names, "action": "SCMP_ACT_ALLOW"}]
    rules.append({"names": ["socket"], "action": "SCMP_ACT_ALLOW",
                  "args": [{"index": 0, "value": _AF_VSOCK, "op": "SCMP_CMP_NE"}]})  # fmt: skip
    for value in seccomp._PERSONALITIES:
        rules.append({"names": ["personality"], "action": "SCMP_ACT_ALLOW",
                      "args": [{"index": 0, "value": value, "op": "SCMP_CMP_EQ"}]})  # fmt: skip
    return {
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": 1,
        "archMap": [
            {"architecture": "SCMP_ARCH_X86_64", "subArchitectures": ["SCMP_ARCH_X86", "SCMP_ARCH_X32"]},
            {"architecture": "SCMP_ARCH_AARCH64", "subArchitectures": ["SCMP_ARCH_ARM"]},
        ],
        "syscalls": rules,
    }


def text() -> str:
    return json.dumps(profile(), indent=1) + "\n"


if __name__ == "__main__":
    sys.stdout.write(text())
