"""What a host that says no is told: each situation's facts give its own refusal and fix."""

from __future__ import annotations

import errno
import os

import pytest

from pytest_envbox.kernel.refusal import Facts, Step, classify, platform_refusal

NAMESPACES = Step("namespaces", "unshare(CLONE_NEWNS|...)")
MOUNTS = Step("mounts", "mount(MS_PRIVATE) and a tmpfs")


def failed(step: Step, code: int = errno.EPERM) -> Step:
    return Step(step.name, step.call, code, "Operation not permitted")


def rootless_steps(fail_at: str, code: int = errno.EPERM) -> tuple[Step, ...]:
    steps = []
    for name, call in (("user namespace", "unshare(CLONE_NEWUSER)"),
                       ("id map", "writing /proc/self/uid_map"),
                       (NAMESPACES.name, NAMESPACES.call), (MOUNTS.name, MOUNTS.call)):  # fmt: skip
        if name == fail_at:
            steps.append(Step(name, call, code, "Operation not permitted"))
            break
        steps.append(Step(name, call))
    return tuple(steps)


def test_a_host_that_refuses_nothing_has_no_refusal() -> None:
    assert classify(Facts(steps=(NAMESPACES, MOUNTS))) is None
    assert classify(Facts(rootless=True, steps=rootless_steps("none"))) is None


@pytest.mark.parametrize(("platform", "name", "fix"), [
    ("darwin", "macOS", "Linux VM"), ("win32", "Windows", "WSL 2"), ("freebsd14", "freebsd14", "Linux"),
])  # fmt: skip
def test_not_linux(platform: str, name: str, fix: str) -> None:
    found = classify(Facts(platform=platform))
    assert found is not None and found.kind == "platform"
    assert found.headline == f"this is {name}, not Linux"
    assert fix in found.block() and "docs/ci.md#macos-and-windows" in found.block()
    assert platform_refusal(platform) == found


def test_root_in_a_container_without_cap_sys_admin() -> None:
    found = classify(Facts(seccomp=2, cap_sys_admin=False, steps=(failed(NAMESPACES),)))
    assert found is not None and found.kind == "container-capabilities"
    block = found.block()
    assert "without CAP_SYS_ADMIN" in block and "seccomp filter is also on this process" in block
    assert "--privileged" in block and "privileged = true" in block and "shell executor" in block
    assert block.endswith("docs/ci.md#containers")


def test_root_with_the_capability_but_a_seccomp_filter() -> None:
    found = classify(Facts(seccomp=2, steps=(failed(NAMESPACES),)))
    assert found is not None and found.kind == "container-seccomp"
    assert "Seccomp: 2" in found.why
    assert any("seccomp=unconfined" in fix for fix in found.fixes)
    assert found.refused == "unshare(CLONE_NEWNS|...): EPERM (Operation not permitted)"


def test_root_refused_by_a_security_module_quotes_the_kernel_log() -> None:
    denial = 'apparmor="DENIED" operation="mount" profile="ci-runner" pid=42 comm="python3"'
    found = classify(Facts(denials=(denial,), steps=(NAMESPACES, failed(MOUNTS))))
    assert found is not None and found.kind == "refused"
    assert denial in found.why and "security module" in found.headline


@pytest.mark.parametrize(("sysctl", "value", "good"), [
    ("user.max_user_namespaces", "0", "15000"), ("kernel.unprivileged_userns_clone", "0", "1"),
])  # fmt: skip
def test_user_namespaces_switched_off(sysctl: str, value: str, good: str) -> None:
    found = classify(Facts(uid=1000, rootless=True, sysctls={sysctl: value},
                           steps=rootless_steps("user namespace")))  # fmt: skip
    assert found is not None and found.kind == "userns-disabled"
    assert f"`sudo sysctl -w {sysctl}={good}`" in found.block()
    assert "/etc/sysctl.d/" in found.block() and 'sudo -E env "PATH=$PATH"' in found.block()


def test_rootless_in_a_container_whose_profile_refuses_user_namespaces() -> None:
    found = classify(Facts(uid=1000, rootless=True, seccomp=2, steps=rootless_steps("user namespace")))
    assert found is not None and found.kind == "container-seccomp"
    block = found.block()
    assert "--privileged" in block
    # Docker's profile, GitLab's docker executor: rootless with the shipped profile also works,
    # named so that the host, where the container is started, can find it
    assert "seccomp=seccomp-envbox.json" in block and "pytest_envbox package (its data directory)" in block


@pytest.mark.parametrize("fail_at", ["id map", "namespaces", "mounts"])
def test_apparmor_restriction_user_namespace_made_then_its_capabilities_denied(fail_at: str) -> None:
    """Ubuntu 24.04: the namespace is made, then writing uid_map (or anything later) is EPERM."""
    found = classify(Facts(uid=1001, rootless=True, apparmor="unprivileged_userns (enforce)",
                           sysctls={"kernel.apparmor_restrict_unprivileged_userns": "1"},
                           steps=rootless_steps(fail_at)))  # fmt: skip
    assert found is not None and found.kind == "userns-capabilities"
    block = found.block()
    assert "kernel.apparmor_restrict_unprivileged_userns = 1" in block
    assert "'unprivileged_userns (enforce)'" in block
    assert "`sudo sysctl -w kernel.apparmor_restrict_unprivileged_userns=0`" in block
    assert '`sudo -E env "PATH=$PATH" python -m pytest`' in block
    assert "userns," in block and block.endswith("docs/ci.md#apparmor")
    assert block.splitlines()[0] == ("pytest-envbox cannot start services here: the user "
                                     "namespace's capabilities are denied")  # fmt: skip


def test_the_same_refusal_without_apparmor_names_what_is_there() -> None:
    found = classify(Facts(uid=1001, rootless=True, seccomp=2, steps=rootless_steps("namespaces")))
    assert found is not None and found.kind == "userns-capabilities"
    assert "seccomp filter on this process" in found.why and "AppArmor does this" in found.why


def test_other_errnos_are_named() -> None:
    full = classify(Facts(uid=1000, rootless=True, steps=rootless_steps("user namespace", errno.ENOSPC)))
    assert full is not None and "user.max_user_namespaces" in full.why
    assert "ENOSPC" in full.refused
    no_userns = classify(Facts(uid=1000, rootless=True, steps=rootless_steps("user namespace", errno.EINVAL)))
    assert no_userns is not None and "CONFIG_USER_NS" in no_userns.why


def test_the_block_has_one_line_per_part() -> None:
    found = classify(Facts(seccomp=2, cap_sys_admin=False, steps=(failed(NAMESPACES),)))
    assert found is not None
    labels = [line.split(":", 1)[0].strip() for line in found.block().splitlines()[1:]]
    assert labels == ["refused", "why", "fix", "or", "more"]


@pytest.mark.parametrize(("name", "code", "kind", "says"), [
    ("network sysctls", errno.EROFS, "container-paths", "/proc/sys read-only"),
    ("proc", errno.EPERM, "container-paths", "masks parts of /proc"),
    ("host name", errno.EPERM, "container-seccomp", "refuses sethostname"),
])  # fmt: skip
def test_a_containers_later_refusals_give_privileged_or_the_rootless_recipe(
        name: str, code: int, kind: str, says: str) -> None:  # fmt: skip
    """Measured in podman's defaults (tests/integration/test_containers.py): the namespaces are
    made, then /proc/sys is read-only, a user namespace may not mount its own /proc, and the
    seccomp profile refuses sethostname."""
    steps = (*rootless_steps("none"), Step(name, f"{name} call", code, os.strerror(code)))
    found = classify(Facts(rootless=True, seccomp=2, cap_sys_admin=False, steps=steps))
    assert found is not None and found.kind == kind and says in found.why
    block = found.block()
    assert "--privileged" in block and "seccomp-envbox.json" in block and "unmask=ALL" in block
    assert block.endswith("docs/ci.md#containers")


def test_a_refused_host_name_without_a_filter_is_not_blamed_on_seccomp() -> None:
    steps = (*rootless_steps("none"), Step("host name", "sethostname()", errno.EPERM, "nope"))
    found = classify(Facts(rootless=True, steps=steps))
    assert found is not None and found.kind != "container-seccomp"
