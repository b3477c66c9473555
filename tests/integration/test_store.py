"""The image store with real processes: once across processes, nothing trusted after SIGKILL,
nothing left by a bad blob, prune, and (rootless) layers owned as the user namespace sees them."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from filelock import FileLock

from pytest_envbox.errors import ImageError
from pytest_envbox.images import nsrun
from pytest_envbox.images.archive import import_archive
from pytest_envbox.images.store import PRUNE_GRACE, ImageRecord, Store
from tests.imagekit.build import busybox_image, redis_image, whiteout_image  # noqa: F401  (fixtures)

REPO = str(Path(__file__).resolve().parents[2])
DATA = os.urandom(256 * 1024)
DIGEST = "sha256:" + hashlib.sha256(DATA).hexdigest()


def _child(code: str, *args: str) -> subprocess.Popen[str]:
    """A Python process running ``code`` (a store client), from this checkout."""
    prelude = "import sys, os, time; from pathlib import Path; from pytest_envbox.images.store import Store\n"
    return subprocess.Popen([sys.executable, "-c", prelude + textwrap.dedent(code), *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def _leftovers(store: Store) -> list[str]:
    return os.listdir(store.root / "tmp")


def test_two_processes_ingesting_one_blob_fill_it_once(tmp_path: Path) -> None:
    root, count, started = tmp_path / "store", tmp_path / "count", tmp_path / "started"
    Store(root)
    (tmp_path / "data").write_bytes(DATA)
    code = """
        root, count, started, data, digest, role = sys.argv[1:]
        from pytest_envbox.wait import Deadline, wait_until
        def fill(out):
            with open(count, "a") as f:
                f.write(role + "\\n")
            if role == "first":  # hold the lock until the second is about to take it
                Path(started).write_text("")
                wait_until(lambda: os.path.exists(started + ".second") or None, Deadline(30))
            out.write(Path(data).read_bytes())
        if role == "second":
            wait_until(lambda: os.path.exists(started) or None, Deadline(30))
            Path(started + ".second").write_text("")
        print(Store(Path(root)).ingest(digest, None, fill))
    """
    first = _child(code, str(root), str(count), str(started), str(tmp_path / "data"), DIGEST, "first")
    second = _child(code, str(root), str(count), str(started), str(tmp_path / "data"), DIGEST, "second")
    outs = [p.communicate(timeout=60) for p in (first, second)]
    assert [p.returncode for p in (first, second)] == [0, 0], outs
    assert count.read_text() == "first\n", "the second process filled the blob again"
    assert outs[0][0] == outs[1][0] and Path(outs[0][0].strip()).read_bytes() == DATA


def test_threads_ingesting_one_blob_fill_it_once(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    calls: list[int] = []
    gate = threading.Barrier(8)

    def fill(out: object) -> None:
        calls.append(1)
        out.write(DATA)  # type: ignore[attr-defined]

    def worker() -> None:
        gate.wait()
        store.ingest(DIGEST, len(DATA), fill)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert store.read_blob(DIGEST) == DATA


def test_a_digest_mismatch_a_truncated_or_a_failing_fill_leave_nothing(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    with pytest.raises(ImageError, match="its content is sha256:"):
        # The last byte flipped (not replaced: random data ends in b"!" once in 256 runs)
        store.ingest(DIGEST, None, lambda out: out.write(DATA[:-1] + bytes([DATA[-1] ^ 1])) and None)
    with pytest.raises(ImageError, match="truncated"):
        store.ingest(DIGEST, len(DATA), lambda out: out.write(DATA[:1000]) and None)
    with pytest.raises(ImageError, match="more than"):
        store.ingest(DIGEST, 1000, lambda out: out.write(DATA) and None)

    def broken(out: object) -> None:
        raise ConnectionResetError("the registry hung up")

    with pytest.raises(ConnectionResetError):
        store.ingest(DIGEST, len(DATA), broken)
    assert not store.has_blob(DIGEST)
    assert os.listdir(store.root / "blobs/sha256") == [] and _leftovers(store) == []


def test_sigkill_during_ingest_leaves_nothing_trusted_and_a_new_ingest_works(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = Store(root)
    code = """
        def fill(out):
            out.write(b"half of it")
            out.flush()
            print("writing", flush=True)
            sys.stdin.read()  # until killed
        Store(Path(sys.argv[1])).ingest(sys.argv[2], None, fill)
    """
    child = subprocess.Popen([sys.executable, "-c", "import sys, os; from pathlib import Path; "
                              "from pytest_envbox.images.store import Store\n" + textwrap.dedent(code),
                              str(root), DIGEST], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)  # fmt: skip
    assert child.stdout is not None and child.stdout.readline() == "writing\n"
    assert _leftovers(store), "the child writes under a temporary name"
    child.send_signal(signal.SIGKILL)
    child.wait()
    child.stdout.close()
    assert child.stdin is not None
    child.stdin.close()
    assert not store.has_blob(DIGEST), "a killed ingest left a blob a later run trusts"
    assert store.ingest(DIGEST, len(DATA), lambda out: out.write(DATA) and None).read_bytes() == DATA
    assert _leftovers(store) == [], "the killed ingest's temporary file was not swept"


def test_sigkill_during_unpack_leaves_no_layer_and_a_new_unpack_works(
    tmp_path: Path, busybox_image: Path,  # noqa: F811
) -> None:  # fmt: skip
    root = tmp_path / "store"
    store = Store(root, rootless=False)
    image = import_archive(store, "oci", str(busybox_image))
    layer = image.layers[0]
    # In-process unpacking (rootless=False) so that the child stops at a point we choose: the
    # first file it writes (then its temporary directory is half-filled).
    code = """
        import json
        from pytest_envbox.images import unpack
        from pytest_envbox.images.store import LayerRef
        real = unpack._copy
        def stop(*args):
            real(*args)
            print("half", flush=True)
            sys.stdin.read()
        unpack._copy = stop
        Store(Path(sys.argv[1]), rootless=False).unpack([LayerRef(**json.loads(sys.argv[2]))])
    """
    child = subprocess.Popen([sys.executable, "-c", "import sys; from pathlib import Path; "
                              "from pytest_envbox.images.store import Store\n" + textwrap.dedent(code),
                              str(root), json.dumps(layer.__dict__)], cwd=REPO, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert child.stdout is not None and child.stdout.readline() == "half\n"
    assert any(n.startswith("layer-") for n in _leftovers(store))
    child.send_signal(signal.SIGKILL)
    child.wait()
    child.stdout.close()
    assert child.stdin is not None
    child.stdin.close()
    assert not store.layer_path(layer.diff_id).exists(), "a killed unpack left a layer a later run trusts"
    (path,) = store.unpack([layer])
    assert (path / "bin/busybox").read_bytes() == Path("/bin/busybox").read_bytes()
    assert _leftovers(store) == [], "the killed unpack's temporary directory was not swept"


def _record(name: str, image: object, when: float) -> ImageRecord:
    return ImageRecord(name=name, digest=image.manifest, config=image.config,  # type: ignore[attr-defined]
                       layers=list(image.layers), size=image.size, pulled=when, last_used=when)  # type: ignore[attr-defined]


def _age(store: Store, seconds: float) -> None:
    """Make every blob and layer look unused for ``seconds`` (past the prune grace)."""
    then = time.time() - seconds
    for d in (store.root / "blobs/sha256", store.root / "locks"):
        for n in os.listdir(d):
            os.utime(d / n, (then, then))


def test_prune_keeps_what_images_need_and_removes_the_rest(
    tmp_path: Path, busybox_image: Path, whiteout_image: Path,  # noqa: F811
) -> None:  # fmt: skip
    store = Store(tmp_path / "store")
    now = time.time()
    busybox = import_archive(store, "oci", str(busybox_image))
    layered = import_archive(store, "oci", str(whiteout_image))
    store.unpack(busybox.layers)
    store.unpack(layered.layers)
    store.save_image(_record("oci:busybox", busybox, now))
    store.save_image(_record("oci:layered", layered, now - 10 * 86400))
    stray = store.ingest(DIGEST, None, lambda out: out.write(DATA) and None)
    dead = store.root / "tmp" / ("blob-" + "0" * 64 + ".12345")
    dead.write_bytes(b"a killed run's")
    held = store.root / "tmp" / ("blob-" + "1" * 64 + ".999")
    held.write_bytes(b"a live run's")
    with FileLock(str(store.root / "locks" / ("blob-" + "1" * 64 + ".lock"))):
        # Within the grace everything stored is kept (a pull may be storing it); the dead
        # run's temporary file goes, the live one's (its lock held) stays.
        assert store.prune()[0] == 1
        assert held.exists() and stray.exists() and not dead.exists()
        _age(store, PRUNE_GRACE + 60)
        removed, freed = store.prune(older_than=86400)
        assert held.exists(), "a temporary file whose lock is held was removed"
    assert not stray.exists()
    assert [r.name for r in store.images()] == ["oci:busybox"]
    for layer in busybox.layers:
        assert store.has_blob(layer.digest) and store.layer_path(layer.diff_id).is_dir()
    assert store.has_blob(busybox.config) and store.has_blob(busybox.manifest)
    for layer in layered.layers[1:]:
        assert not store.has_blob(layer.digest) and not store.layer_path(layer.diff_id).exists()
    assert not store.has_blob(layered.config)
    # the old image's record, its config and manifest, two layers' blobs and dirs, the stray blob
    assert removed == 8 and freed > len(DATA)
    assert os.listdir(store.root / "tmp") == [held.name]


def test_prune_within_the_grace_keeps_blobs_a_pull_is_storing(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    store.ingest(DIGEST, None, lambda out: out.write(DATA) and None)
    store.prune(older_than=0)
    assert store.has_blob(DIGEST)


def test_records_round_trip_and_touch(tmp_path: Path, busybox_image: Path) -> None:  # noqa: F811
    store = Store(tmp_path / "store")
    image = import_archive(store, "oci", str(busybox_image))
    rec = _record("oci:/x:latest", image, 1.0)
    store.save_image(rec)
    assert store.load_image("oci:/x:latest") == rec
    store.touch("oci:/x:latest")
    loaded = store.load_image("oci:/x:latest")
    assert loaded is not None and loaded.last_used > 1.0
    assert store.load_image("nothing") is None
    assert [r.name for r in store.images()] == ["oci:/x:latest"]


def test_unpacked_layers_keep_their_owners_as_the_services_see_them(
    tmp_path: Path, redis_image: Path,  # noqa: F811
) -> None:  # fmt: skip
    store = Store(tmp_path / "store")
    image = import_archive(store, "oci", str(redis_image))
    started = time.monotonic()
    (layer,) = store.unpack(image.layers)
    took = time.monotonic() - started
    passwd = (layer / "etc/passwd").read_text()
    redis = next(line.split(":") for line in passwd.splitlines() if line.startswith("redis:"))
    want = [int(redis[2]), int(redis[3])]
    paths = [str(layer / "var/lib/redis"), str(layer / "etc/redis/redis.conf"), str(layer / "usr/bin")]
    if store.rootless:
        ids = nsrun.call("pytest_envbox.images.unpack:lstat_ids", {"paths": paths})
    else:
        ids = [[os.lstat(p).st_uid, os.lstat(p).st_gid] for p in paths]
    assert ids[0] == want, f"/var/lib/redis is owned by {ids[0]}, redis is {want}"
    assert ids[2] == [0, 0]
    size = sum(lay.size for lay in image.layers) >> 20
    print(f"redis image: {size} MiB of layers unpacked in {took:.2f} s")
    store.save_image(_record("redis", image, 0.0))
    assert store.prune(older_than=1)[0] == 1 and layer.is_dir(), "only the record goes within the grace"
    _age(store, PRUNE_GRACE + 60)
    # Rootless, the layer's files belong to subordinate ids: only the namespace can remove them.
    store.prune(older_than=1)
    assert not layer.exists() and os.listdir(store.root / "layers/sha256") == []


def test_nsrun_reports_errors_as_messages_and_its_cost(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="No such file"):
        nsrun.call("pytest_envbox.images.unpack:lstat_ids", {"paths": [str(tmp_path / "missing")]})
    times = []
    for _ in range(5):
        started = time.monotonic()
        nsrun.call("pytest_envbox.images.unpack:lstat_ids", {"paths": [str(tmp_path)]})
        times.append(time.monotonic() - started)
    print(f"nsrun: {min(times) * 1000:.0f} ms per call (best of 5)")
