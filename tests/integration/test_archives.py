"""Images from files (``oci:``, ``oci-archive:``, ``docker-archive:``) written by umoci and skopeo,
read into the store and unpacked; and each way such a file can be wrong, as an ImageError."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest

from pytest_envbox.errors import ImageError
from pytest_envbox.images.archive import import_archive
from pytest_envbox.images.store import Store
from tests.imagekit.build import (  # noqa: F401  (fixtures)
    busybox_archive_files,
    busybox_image,
    whiteout_image,
)

BUSYBOX = Path("/bin/busybox").read_bytes() if Path("/bin/busybox").exists() else b""


def _check_busybox(store: Store, layers: list[Path]) -> None:
    (layer,) = layers
    assert (layer / "bin/busybox").read_bytes() == BUSYBOX
    assert (layer / "bin/sh").readlink() == Path("busybox")
    assert "app:x:1000:1000" in (layer / "etc/passwd").read_text()


@pytest.mark.parametrize("transport", ["oci", "oci-archive", "docker-archive"])
def test_each_transport_is_imported_and_unpacked(
    tmp_path: Path, transport: str, busybox_image: Path, busybox_archive_files: dict[str, Path],  # noqa: F811
) -> None:  # fmt: skip
    store = Store(tmp_path / "store")
    path = busybox_image if transport == "oci" else busybox_archive_files[transport]
    image = import_archive(store, transport, str(path))
    config = json.loads(store.read_blob(image.config))
    assert config["config"]["Entrypoint"] == ["/bin/busybox"]
    assert [layer.diff_id for layer in image.layers] == config["rootfs"]["diff_ids"]
    manifest = json.loads(store.read_blob(image.manifest))
    assert manifest["config"]["digest"] == image.config
    assert [d["digest"] for d in manifest["layers"]] == [layer.digest for layer in image.layers]
    _check_busybox(store, store.unpack(image.layers))
    # Read again: the same digests (docker-archive's synthesized manifest is stable), nothing new.
    again = import_archive(store, transport, str(path))
    assert again == image


def test_an_oci_layout_tag_is_chosen_and_an_unknown_one_lists_the_tags(
    tmp_path: Path, busybox_image: Path, whiteout_image: Path,  # noqa: F811
) -> None:  # fmt: skip
    # Two images in one layout: busybox as "small", the layered one as "layered".
    layout = tmp_path / "layout"
    shutil.copytree(whiteout_image, layout)
    index = json.loads((layout / "index.json").read_text())
    (small,) = json.loads((busybox_image / "index.json").read_text())["manifests"]
    small["annotations"] = {"org.opencontainers.image.ref.name": "small"}
    index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"] = "layered"
    index["manifests"].append(small)
    (layout / "index.json").write_text(json.dumps(index))
    for blob in (busybox_image / "blobs/sha256").iterdir():
        if not (layout / "blobs/sha256" / blob.name).exists():
            shutil.copy(blob, layout / "blobs/sha256" / blob.name)
    store = Store(tmp_path / "store")
    assert len(import_archive(store, "oci", str(layout), "layered").layers) == 3
    assert len(import_archive(store, "oci", str(layout), "small").layers) == 1
    with pytest.raises(ImageError, match=r"no image tagged 'nope'.*layered, small") as e:
        import_archive(store, "oci", str(layout), "nope")
    assert e.value.reference == f"oci:{layout}:nope"
    with pytest.raises(ImageError, match=r"holds 2 images: name one by its tag \(layered, small\)"):
        import_archive(store, "oci", str(layout))


def test_a_corrupt_blob_is_refused_and_not_stored(tmp_path: Path, busybox_image: Path) -> None:  # noqa: F811
    layout = tmp_path / "layout"
    shutil.copytree(busybox_image, layout)
    store = Store(tmp_path / "store")
    other = Store(tmp_path / "other")
    manifest = json.loads(other.read_blob(import_archive(other, "oci", str(layout)).manifest))
    layer = layout / "blobs/sha256" / manifest["layers"][0]["digest"].partition(":")[2]
    data = bytearray(layer.read_bytes())
    data[100] ^= 0xFF
    layer.write_bytes(bytes(data))
    with pytest.raises(ImageError, match="corrupt or tampered with") as e:
        import_archive(store, "oci", str(layout))
    assert e.value.reference == f"oci:{layout}"
    assert not store.has_blob(manifest["layers"][0]["digest"])
    assert list((store.root / "tmp").iterdir()) == []


def test_missing_files_and_non_layouts_are_clear_errors(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    with pytest.raises(ImageError, match="not a directory"):
        import_archive(store, "oci", str(tmp_path / "nothing"))
    with pytest.raises(ImageError, match="no such file"):
        import_archive(store, "oci-archive", str(tmp_path / "nothing.tar"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageError, match="not an OCI image layout"):
        import_archive(store, "oci", str(tmp_path / "empty"))
    (tmp_path / "text.tar").write_text("not a tar")
    with pytest.raises(ImageError, match="not a tar archive"):
        import_archive(store, "docker-archive", str(tmp_path / "text.tar"))
    with tarfile.open(tmp_path / "other.tar", "w") as tf:
        tf.add(__file__, "test.py")
    with pytest.raises(ImageError, match=r"not a docker archive \(no manifest.json\)") as e:
        import_archive(store, "docker-archive", str(tmp_path / "other.tar"))
    assert e.value.reference == f"docker-archive:{tmp_path / 'other.tar'}"
    with pytest.raises(ImageError, match="not an OCI image layout"):
        import_archive(store, "oci-archive", str(tmp_path / "other.tar"))


def test_a_docker_archive_tag_chooses_by_repo_tags(
    tmp_path: Path, busybox_archive_files: dict[str, Path],  # noqa: F811
) -> None:  # fmt: skip
    store = Store(tmp_path / "store")
    path = str(busybox_archive_files["docker-archive"])
    assert import_archive(store, "docker-archive", path, "envbox/busybox:latest").layers
    with pytest.raises(ImageError, match=r"no image tagged 'other:1'.*envbox/busybox:latest"):
        import_archive(store, "docker-archive", path, "other:1")
