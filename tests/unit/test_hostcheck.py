"""The sysctls and files that say whether unprivileged users get user namespaces and subordinate ids."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_envbox.kernel import hostcheck


@pytest.mark.parametrize(("name", "value", "blocked"), [
    ("max_user_namespaces", "0", "user.max_user_namespaces = 0"),
    ("max_user_namespaces", "15000", None),
    ("unprivileged_userns_clone", "0", "kernel.unprivileged_userns_clone = 0"),
    ("unprivileged_userns_clone", "1", None),
    ("apparmor_restrict_unprivileged_userns", "1", "AppArmor"),
    ("apparmor_restrict_unprivileged_userns", "0", None),
])  # fmt: skip
def test_each_sysctl_that_blocks_user_namespaces_is_named_with_its_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, value: str, blocked: str | None
) -> None:
    table = []
    for path, bad, why, fix in hostcheck._USERNS_SYSCTLS:
        fake = tmp_path / Path(path).name
        if fake.name == name:
            fake.write_text(value + "\n")
        table.append((str(fake), bad, why, fix))  # the others do not exist: not blocking
    monkeypatch.setattr(hostcheck, "_USERNS_SYSCTLS", tuple(table))
    found = hostcheck.userns_sysctls()
    if blocked is None:
        assert found == []
    else:
        [(why, fix)] = found
        assert blocked in why and fix.startswith("sudo sysctl -w") and name in fix


def test_subordinate_ranges_are_added_up_by_name_or_uid(tmp_path: Path) -> None:
    f = tmp_path / "subuid"
    f.write_text("alice:100000:65536\nbob:165536:65536\n1000:300000:10\nbad line\n")
    assert hostcheck._ranges(str(f), "alice", 1000) == 65546
    assert hostcheck._ranges(str(f), "carol", 1001) == 0
    assert hostcheck._ranges(str(tmp_path / "missing"), "alice", 1000) == 0
