"""Layer unpacking against hostile tars: nothing outside the layer's directory is touched.

Each hostile layer is built here with tarfile and unpacked into ``tmp_path/layer``; a victim
directory beside it (``tmp_path/victim``) must be exactly as it was afterwards. Whiteouts are
checked by mounting a real overlay of two unpacked layers (root only: mknod of a whiteout and
overlayfs need root here; tests/integration/test_store.py covers the rootless namespace).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from pytest_envbox.errors import ImageError
from pytest_envbox.images.unpack import unpack_layer

ROOT = os.geteuid() == 0


def _info(name: str, kind: bytes = tarfile.REGTYPE, **attrs: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    info.mtime = 1700000000
    for key, value in attrs.items():
        setattr(info, key, value)
    return info


def _tar(*entries: tuple[tarfile.TarInfo, bytes] | tarfile.TarInfo, fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for e in entries:
            if isinstance(e, tuple):
                info, data = e
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            else:
                tf.addfile(e)
    return buf.getvalue()


def _diff_id(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    v = tmp_path / "victim"
    v.mkdir()
    (v / "file").write_text("precious")
    return v


def _snapshot(path: Path) -> list[tuple[str, int, int, bytes]]:
    out = []
    for top, dirs, files in os.walk(path):
        for n in sorted(dirs + files):
            p = Path(top) / n
            st = p.lstat()
            data = p.read_bytes() if stat.S_ISREG(st.st_mode) else b""
            out.append((str(p), st.st_mode, st.st_size, data))
    return sorted(out)


def _unpack(tmp_path: Path, data: bytes, diff_id: str | None = None, userxattr: bool = not ROOT) -> Path:
    dest = tmp_path / "layer"
    dest.mkdir(exist_ok=True)
    unpack_layer(io.BytesIO(data), str(dest), diff_id or _diff_id(data), where="layer sha256:test",
                 userxattr=userxattr)  # fmt: skip
    return dest


def _refused(tmp_path: Path, victim: Path, data: bytes, member: str) -> None:
    before = _snapshot(victim)
    with pytest.raises(ImageError) as e:
        _unpack(tmp_path, data)
    assert member in str(e.value) and "layer sha256:test" in str(e.value), str(e.value)
    assert _snapshot(victim) == before


def test_an_absolute_name_is_refused(tmp_path: Path, victim: Path) -> None:
    _refused(tmp_path, victim, _tar((_info(f"{victim}/file"), b"pwned")), f"{victim}/file")


def test_a_dotdot_name_is_refused(tmp_path: Path, victim: Path) -> None:
    _refused(tmp_path, victim, _tar((_info("a/../../victim/file"), b"pwned")), "a/../../victim/file")


@pytest.mark.parametrize("target", ["absolute", "relative"])
def test_a_file_through_a_symlinked_directory_is_refused(tmp_path: Path, victim: Path, target: str) -> None:
    link = str(victim) if target == "absolute" else "../victim"
    data = _tar(_info("d", tarfile.SYMTYPE, linkname=link), (_info("d/file"), b"pwned"),
                (_info("d/new"), b"pwned"))  # fmt: skip
    _refused(tmp_path, victim, data, "d/file")


def test_a_symlink_is_created_as_written_and_never_followed(tmp_path: Path, victim: Path) -> None:
    before = _snapshot(victim)
    dest = _unpack(tmp_path, _tar(_info("etc", tarfile.DIRTYPE),
                                  _info("etc/shadow", tarfile.SYMTYPE, linkname=f"{victim}/file"),
                                  (_info("etc/shadow"), b"replaced, not written through")))  # fmt: skip
    # The second entry replaced the link (tar semantics) rather than writing through it.
    assert (dest / "etc/shadow").read_bytes() == b"replaced, not written through"
    assert not (dest / "etc/shadow").is_symlink()
    assert _snapshot(victim) == before


@pytest.mark.parametrize("linkname", ["/etc/passwd", "../victim/file", "etc/passwd", "l/file"])
def test_a_hardlink_outside_the_layer_is_refused(tmp_path: Path, victim: Path, linkname: str) -> None:
    data = _tar(_info("l", tarfile.SYMTYPE, linkname=str(victim)),
                _info("h", tarfile.LNKTYPE, linkname=linkname))  # fmt: skip
    _refused(tmp_path, victim, data, "'h'")
    assert os.stat(victim / "file").st_nlink == 1


def test_a_hardlink_to_a_file_of_the_layer_shares_its_inode(tmp_path: Path) -> None:
    dest = _unpack(tmp_path, _tar(_info("bin", tarfile.DIRTYPE), (_info("bin/a"), b"x"),
                                  _info("bin/b", tarfile.LNKTYPE, linkname="bin/a")))  # fmt: skip
    assert os.stat(dest / "bin/a").st_ino == os.stat(dest / "bin/b").st_ino


def test_device_nodes_are_skipped_and_fifos_made(tmp_path: Path) -> None:
    data = _tar(_info("dev", tarfile.DIRTYPE),
                _info("dev/sda", tarfile.BLKTYPE, devmajor=8, devminor=0),
                _info("dev/mem", tarfile.CHRTYPE, devmajor=1, devminor=1),
                _info("dev/pipe", tarfile.FIFOTYPE))  # fmt: skip
    dest = _unpack(tmp_path, data)
    assert sorted(os.listdir(dest / "dev")) == ["pipe"]
    assert stat.S_ISFIFO(os.lstat(dest / "dev/pipe").st_mode)


def test_setuid_and_setgid_bits_are_dropped_from_files(tmp_path: Path) -> None:
    dest = _unpack(tmp_path, _tar((_info("su", mode=0o4755), b"#!"), (_info("sg", mode=0o2755), b"#!"),
                                  _info("shared", tarfile.DIRTYPE, mode=0o3775)))  # fmt: skip
    assert stat.S_IMODE(os.stat(dest / "su").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(dest / "sg").st_mode) == 0o755
    # setgid on a directory only picks the group of new files, sticky restricts deletes: kept
    assert stat.S_IMODE(os.stat(dest / "shared").st_mode) == 0o3775


@pytest.mark.parametrize("fmt", ["gnu", "posix"])
def test_a_huge_sparse_file_is_written_with_holes(tmp_path: Path, fmt: str) -> None:
    if shutil.which("tar") is None:
        pytest.skip("GNU tar is needed to write a sparse archive")
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "sparse", "wb") as f:
        f.seek(1 << 40)  # 1 TiB apparent size
        f.write(b"end")
    archive = tmp_path / "sparse.tar"
    subprocess.run(["tar", "--sparse", f"--format={fmt}", "-cf", str(archive), "-C", str(src), "sparse"],
                   check=True)  # fmt: skip
    data = archive.read_bytes()
    assert len(data) < 1 << 20
    dest = _unpack(tmp_path, data)
    st = os.stat(dest / "sparse")
    assert st.st_size == (1 << 40) + 3
    assert st.st_blocks * 512 < 1 << 20, "the holes were written out"
    with open(dest / "sparse", "rb") as f:
        f.seek(1 << 40)
        assert f.read() == b"end"


def test_a_duplicated_entry_is_the_last_one(tmp_path: Path) -> None:
    dest = _unpack(tmp_path, _tar((_info("a"), b"first"), (_info("a"), b"second")))
    assert (dest / "a").read_bytes() == b"second"


def test_a_directory_replaced_by_a_file_later_in_the_layer(tmp_path: Path) -> None:
    dest = _unpack(tmp_path, _tar(_info("d", tarfile.DIRTYPE), (_info("d/x"), b"x"),
                                  (_info("d"), b"now a file"),
                                  (_info("f"), b"a file"), _info("f", tarfile.DIRTYPE)))  # fmt: skip
    assert (dest / "d").read_bytes() == b"now a file"
    assert (dest / "f").is_dir()


def test_a_read_only_directory_gets_its_entries_then_its_mode(tmp_path: Path) -> None:
    dest = _unpack(tmp_path, _tar(_info("ro", tarfile.DIRTYPE, mode=0o555), (_info("ro/x"), b"x")))
    assert stat.S_IMODE(os.stat(dest / "ro").st_mode) == 0o555
    assert os.stat(dest / "ro").st_mtime == 1700000000
    os.chmod(dest / "ro", 0o755)  # for tmp_path's cleanup as a user


def test_missing_parent_directories_are_made(tmp_path: Path) -> None:
    dest = _unpack(tmp_path, _tar((_info("./usr/share/doc/x"), b"x")))
    assert (dest / "usr/share/doc/x").read_bytes() == b"x"
    assert stat.S_IMODE(os.stat(dest / "usr").st_mode) == 0o755


def test_owners_are_the_layers(tmp_path: Path) -> None:
    if not ROOT:
        pytest.skip("chown to other ids needs root (rootless: the user namespace, test_store.py)")
    dest = _unpack(tmp_path, _tar((_info("f", uid=1000, gid=1001), b"x"),
                                  _info("l", tarfile.SYMTYPE, linkname="f", uid=7, gid=8)))  # fmt: skip
    assert (os.lstat(dest / "f").st_uid, os.lstat(dest / "f").st_gid) == (1000, 1001)
    assert (os.lstat(dest / "l").st_uid, os.lstat(dest / "l").st_gid) == (7, 8)


def test_forged_overlay_and_capability_xattrs_are_dropped(tmp_path: Path) -> None:
    info = _info("f")
    info.pax_headers = {
        "SCHILY.xattr.trusted.overlay.redirect": "/etc", "SCHILY.xattr.user.overlay.opaque": "y",
        "SCHILY.xattr.security.capability": "\x01\x00\x00\x02", "SCHILY.xattr.user.note": "kept",
    }  # fmt: skip
    dest = _unpack(tmp_path, _tar((info, b"x")))
    names = os.listxattr(dest / "f")
    assert not [n for n in names if "overlay" in n or n.startswith("security.capability")], names
    assert os.getxattr(dest / "f", "user.note") == b"kept"


def test_gzip_layers_are_read_and_hashed_uncompressed(tmp_path: Path) -> None:
    data = _tar((_info("a"), b"x"))
    dest = tmp_path / "layer"
    dest.mkdir()
    unpack_layer(io.BytesIO(gzip.compress(data)), str(dest), _diff_id(data), where="layer z", userxattr=False)
    assert (dest / "a").read_bytes() == b"x"


def test_a_wrong_diff_id_is_an_error_naming_both(tmp_path: Path) -> None:
    data = _tar((_info("a"), b"x"))
    with pytest.raises(ImageError, match="not the diff_id sha256:0000") as e:
        _unpack(tmp_path, data, diff_id="sha256:" + "0" * 64)
    assert _diff_id(data) in str(e.value)


def test_a_truncated_layer_is_an_error(tmp_path: Path) -> None:
    data = _tar((_info("a"), b"x" * 100_000))
    with pytest.raises(ImageError, match=r"truncated|not a readable layer"):
        _unpack(tmp_path, data[:50_000])
    with pytest.raises(ImageError, match="not a readable layer"):
        _unpack(tmp_path, gzip.compress(data)[:-20])


def test_zstd_without_the_module_says_what_to_install(tmp_path: Path) -> None:
    try:
        import zstandard  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("zstandard is installed here")
    with pytest.raises(ImageError, match="zstandard"):
        _unpack(tmp_path, b"\x28\xb5\x2f\xfd" + b"\0" * 100)


def _overlay(tmp_path: Path, layers: list[bytes]) -> Path:
    dirs = []
    for i, data in enumerate(layers):
        d = tmp_path / f"l{i}"
        d.mkdir()
        unpack_layer(io.BytesIO(data), str(d), _diff_id(data), where=f"layer {i}", userxattr=False)
        dirs.append(d)
    merged = tmp_path / "merged"
    merged.mkdir()
    lower = ":".join(str(d) for d in reversed(dirs))
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={lower}", str(merged)], check=True)
    return merged


@pytest.mark.needs_root("mknod of a whiteout outside a user namespace, and mounting an overlay")
def test_whiteouts_hide_lower_files_and_opaque_directories_in_a_real_overlay(tmp_path: Path) -> None:
    lower = _tar(_info("data", tarfile.DIRTYPE), (_info("data/a"), b"a"), (_info("data/b"), b"b"),
                 _info("etc", tarfile.DIRTYPE), (_info("etc/motd"), b"motd"), (_info("etc/keep"), b"k"),
                 _info("gone", tarfile.DIRTYPE), (_info("gone/x"), b"x"))  # fmt: skip
    upper = _tar(_info("data", tarfile.DIRTYPE), (_info("data/.wh..wh..opq"), b""), (_info("data/c"), b"c"),
                 (_info("etc/.wh.motd"), b""), (_info(".wh.gone"), b""))  # fmt: skip
    merged = _overlay(tmp_path, [lower, upper])
    try:
        assert sorted(os.listdir(merged)) == ["data", "etc"]
        assert sorted(os.listdir(merged / "data")) == ["c"]
        assert sorted(os.listdir(merged / "etc")) == ["keep"]
    finally:
        subprocess.run(["umount", str(merged)], check=True)
    st = os.lstat(tmp_path / "l1/etc/motd")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert os.getxattr(tmp_path / "l1/data", "trusted.overlay.opaque") == b"y"
