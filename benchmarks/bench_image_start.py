"""Benchmark: what an image root costs at start, against the same command as a host program.

The image is the host's static busybox in one layer, made on the spot (no registry, no store).
Both services run ``busybox sleep 1000``; measured interleaved, N times each, warm supervisor:

- ``start``: ``handle.stop()`` + ``handle.start()`` of a kept environment (the start path: the
  overlay mount and the moves for the image, the host's root binds for the host program);
- ``open``: a fresh ``Environment`` per iteration, ``open()`` + ``close()`` (the writable layer
  made and removed too).

Prints medians in ms and the ratio image / host. Exit status 0 unless the benchmark broke.

Usage (as root, or wherever envbox runs)::

    PYTHONPATH=. python3 benchmarks/bench_image_start.py [--n 30] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from _measure import summary

from pytest_envbox import Environment, Service
from pytest_envbox.engine.client import rootless
from pytest_envbox.engine.imageplan import PreparedImage
from pytest_envbox.images.imageconfig import ImageConfig

BUSYBOX = "/usr/bin/busybox"


def busybox_image(base: Path) -> PreparedImage:
    layer = base / "layer"
    (layer / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, layer / "bin/busybox")
    (layer / "etc").mkdir()
    (layer / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    config = ImageConfig.from_json(json.dumps({"config": {"Env": ["PATH=/bin"]}}).encode())
    return PreparedImage("oci:/bench/busybox", config, (layer,), base / "rw", userxattr=rootless())


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--json")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="envbox-bench-image-"))
    try:
        img = busybox_image(base)
        host = Service("host", [BUSYBOX, "sleep", "1000"])
        image = Service("image", ["busybox", "sleep", "1000"], image=img.reference)
        kinds = ("start host", "start image", "open host", "open image")
        samples: dict[str, list[float]] = {k: [] for k in kinds}
        with Environment([host, image], images={"image": img}, rootdir=base) as env:
            for h in (env["host"], env["image"]):  # warm up
                h.stop()
                h.start()
            for _ in range(args.n):
                for name in ("host", "image"):
                    h = env[name]
                    h.stop()
                    samples[f"start {name}"].append(timed(h.start))
        for _ in range(args.n):
            for name, spec in (("host", host), ("image", image)):
                e = Environment([spec], images={"image": img}, rootdir=base)
                samples[f"open {name}"].append(timed(lambda e=e: (e.open(), e.close())))  # type: ignore[misc]
        out = {k: summary(v) for k, v in samples.items()}
        for what in ("start", "open"):
            h, i = out[f"{what} host"]["median"], out[f"{what} image"]["median"]
            out[f"{what} ratio"] = i / h
            print(f"{what:5s}: host program {h:.2f} ms, image {i:.2f} ms (median of {args.n}); "
                  f"image / host = {i / h:.2f}")  # fmt: skip
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=2))
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
