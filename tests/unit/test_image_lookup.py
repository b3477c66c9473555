"""Files read through a stack of layer directories, as overlayfs shows them: whiteouts, opaque
directories, links resolved inside the image; the program on PATH; the image's users."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from pytest_envbox import ConfigError
from pytest_envbox.images.lookup import find_executable, read_file, resolve, resolve_user


def whiteout(path: Path) -> None:
    """A character device 0:0: as root, or unprivileged since Linux 5.8 (whiteouts only)."""
    try:
        os.mknod(path, stat.S_IFCHR | 0o000, os.makedev(0, 0))
    except PermissionError as e:
        pytest.skip(f"this kernel refuses to make a whiteout here ({e}); they need root before 5.8")


def opaque(path: Path) -> None:
    name = "trusted.overlay.opaque" if os.geteuid() == 0 else "user.overlay.opaque"
    try:
        os.setxattr(path, name, b"y")
    except OSError as e:
        pytest.skip(f"this filesystem takes no {name} xattr ({e.strerror})")


def put(root: Path, rel: str, content: str = "", mode: int = 0o644) -> Path:
    p = root / rel.lstrip("/")
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(content)
    p.chmod(mode)
    return p


@pytest.fixture
def layers(tmp_path: Path) -> list[Path]:
    l1, l2, l3 = (tmp_path / f"l{i}" for i in (1, 2, 3))
    for d in (l1, l2, l3):
        d.mkdir()
    put(l1, "/bin/busybox", "#!", 0o755)
    (l1 / "usr/bin").mkdir(parents=True)
    os.symlink("/bin/busybox", l1 / "usr/bin/sh")
    os.symlink("../../bin/busybox", l1 / "usr/bin/cat")
    os.symlink("usr/bin", l1 / "sbin")  # a relative link at the root
    os.symlink("/loop2", l1 / "loop1")
    os.symlink("/loop1", l1 / "loop2")
    put(l1, "/bin/notexec", "x", 0o644)
    put(l1, "/etc/gone", "old")
    put(l1, "/opt/lib/a", "a")
    put(l1, "/opt/lib/b", "b")
    put(l1, "/srv/keep", "keep")
    put(l1, "/etc/passwd", "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:App:/home/app:/bin/sh\n"
        "# a comment\nnohome:x:1001:1001:::/bin/sh\nbroken line\n")  # fmt: skip
    put(l1, "/etc/group", "root:x:0:\napp:x:1000:\nstaff:x:50:app,other\nwheel:x:10:app\n")
    whiteout(l2 / "etc")  # parent must exist: make it a directory first
    (l2 / "etc").unlink()
    (l2 / "etc").mkdir()
    whiteout(l2 / "etc/gone")
    (l2 / "opt/lib").mkdir(parents=True)
    put(l2, "/opt/lib/c", "c")
    opaque(l2 / "opt/lib")
    put(l2, "/srv/new", "new")
    put(l3, "/usr/local/bin/tool", "tool", 0o755)
    put(l3, "/etc/passwd", "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:App:/home/app:/bin/sh\n"
        "nohome:x:1001:1001:::/bin/sh\n")  # fmt: skip
    return [l1, l2, l3]


def test_read_through_the_stack(layers: list[Path]) -> None:
    assert read_file(layers, "/srv/keep") == b"keep"  # a lower layer shows through a directory
    assert read_file(layers, "/srv/new") == b"new"
    assert read_file(layers, "/usr/local/bin/tool") == b"tool"


def test_whiteout_hides_the_file_below(layers: list[Path]) -> None:
    assert read_file(layers, "/etc/gone") is None
    assert read_file(layers[:1], "/etc/gone") == b"old"


def test_opaque_directory_hides_everything_below(layers: list[Path]) -> None:
    assert read_file(layers, "/opt/lib/c") == b"c"
    assert read_file(layers, "/opt/lib/a") is None and read_file(layers, "/opt/lib/b") is None


def test_links_resolve_inside_the_image_never_on_the_host(layers: list[Path]) -> None:
    assert resolve(layers, "/usr/bin/sh") == ("/bin/busybox", str(layers[0] / "bin/busybox"))
    assert resolve(layers, "/usr/bin/cat")[0] == "/bin/busybox"  # type: ignore[index]
    assert resolve(layers, "/sbin/sh")[0] == "/bin/busybox"  # type: ignore[index]
    assert resolve(layers, "/loop1") is None  # bounded hops
    # An absolute link to a host path that exists (/etc/hostname) is looked up in the image.
    os.symlink("/etc/hostname", layers[2] / "hostlink")
    assert read_file(layers, "/hostlink") is None
    os.symlink("../../../../../../etc/hostname", layers[2] / "climb")
    assert read_file(layers, "/climb") is None  # ".." stops at the image's root


def test_find_executable(layers: list[Path]) -> None:
    path = "/usr/local/bin:/usr/bin:/bin"
    assert find_executable(layers, "sh", path) == "/usr/bin/sh"
    assert find_executable(layers, "busybox", path) == "/bin/busybox"
    assert find_executable(layers, "tool", path) == "/usr/local/bin/tool"
    assert find_executable(layers, "notexec", path) is None
    assert find_executable(layers, "python3", path) is None
    assert find_executable(layers, "/bin/busybox", "") == "/bin/busybox"
    assert find_executable(layers, "./busybox", "", cwd="/bin") == "/bin/busybox"
    assert find_executable(layers, "etc", "/") is None  # a directory is no program


@pytest.mark.parametrize(("user", "expected"), [
    ("", (0, 0, [0], "/root")),
    ("root", (0, 0, [0], "/root")),
    ("app", (1000, 1000, [10, 50, 1000], "/home/app")),
    ("1000", (1000, 1000, [10, 50, 1000], "/home/app")),
    ("app:staff", (1000, 50, [50], "/home/app")),
    ("app:7", (1000, 7, [7], "/home/app")),
    ("1000:1000", (1000, 1000, [1000], "/home/app")),
    ("4242", (4242, 0, [0], "/")),  # a uid the image does not list: root's group, home "/"
    ("nohome", (1001, 1001, [1001], "/")),
])  # fmt: skip
def test_resolve_user(layers: list[Path], user: str, expected: tuple[int, int, list[int], str]) -> None:
    assert resolve_user(layers, user, service="svc") == expected


def test_unknown_user_or_group_is_a_config_error(layers: list[Path]) -> None:
    with pytest.raises(ConfigError, match=r"service 'svc', key 'user'.*'postgres' in the image's "
                                          "/etc/passwd"):  # fmt: skip
        resolve_user(layers, "postgres", service="svc")
    with pytest.raises(ConfigError, match=r"key 'user'.*'nogroup' in the image's /etc/group"):
        resolve_user(layers, "app:nogroup", service="svc")
