"""Images (issue 17): what running an OCI image costs, against a host program and the tools
people use for images today. ``run.py --only images`` runs it; each part's variants are
interleaved (the order rotating every iteration), every comparison is a ratio within this run.

The image is the test suite's Debian ``redis-server`` image (``tests/imagekit/build.py``
``redis_layout()``: one 67 MB gzip layer, Cmd ``redis-server --protected-mode no --save ""``,
User ``redis``), pushed with ``skopeo copy`` into a real ``docker-registry`` on 127.0.0.1
(``tests/imagekit/registry.py``) and pulled from there, over plain HTTP on loopback. The host
program is the host's own ``/usr/bin/redis-server`` (the same Debian 12 package) with the same
arguments. Readiness is ``127.0.0.1:6379`` accepting a connection in the server's network
namespace everywhere (envbox's ``tcp`` probe; ``_measure.wait_accepting`` for podman), except
testcontainers, which is ready when a ``PING`` through its published port gets ``+PONG``.

1. ``start_stop``: ``open()`` + ``close()`` of a fresh ``Environment`` with one service, warm
   supervisor, image already in the store: the redis image against ``redis-server`` on the
   host; and ``bench_image_start.py``'s one-layer busybox image (``busybox httpd``) against
   the host's busybox.
2. ``pytest``: a real pytest run (a subprocess, as ``run.py``'s ``pytest`` section) of 100
   tests, each with a function-scoped redis service that answers a ``PING``: from the image,
   from the host's ``redis-server``, and the same 100 tests with no service. Overhead = run
   time - the no-service run.
3. ``pull``: pull + unpack of the image from the registry: envbox (the ``Puller`` on
   ``open_store()``, what ``envbox pull`` runs, into a fresh empty ``$ENVBOX_STORE`` each time;
   its unpack timed apart) against ``skopeo copy docker://... oci:DIR:latest`` followed by
   ``umoci unpack --image DIR:latest BUNDLE`` (``--rootless`` when not root), each into a
   fresh directory, removed and synced before the next.
4. ``podman``: start-to-ready of the same image: envbox (the image cached in its store,
   ``open()`` of a fresh environment, port published) against ``podman run --rm -d -p
   127.0.0.1::6379`` (the image already in podman's own storage, pulled from the same registry
   beforehand; ``_podman.py``'s private storage, runc, host state restored) and
   testcontainers-python's ``DockerContainer`` against ``podman system service``; and
   ``redis-server`` as a bare host process, the floor (what redis itself takes to listen).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import _measure as M
import _podman

from pytest_envbox import Environment, Service, probe
from pytest_envbox.engine.images import open_store
from pytest_envbox.images.pull import Puller, reference_of
from pytest_envbox.wait import Deadline, wait_until

ROOT = Path(__file__).resolve().parent.parent
REPO = "envbox-bench/redis"
PORT = 6379
REDIS_ARGS = ["--protected-mode", "no", "--save", ""]  # the image's Cmd after redis-server
HOST_REDIS = "/usr/bin/redis-server"
HTTPD_PORT = 8080

Log = Callable[[str], None]


# --- set-up ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def redis_in_registry(tmp: Path, log: Log) -> Iterator[tuple[str, Path]]:
    """The test suite's redis image in a ``docker-registry`` on 127.0.0.1: (its reference, the
    OCI layout it was pushed from)."""
    import pytest

    try:
        from tests.imagekit.build import redis_layout
        from tests.imagekit.registry import RegistryServer, push_layout

        layout = redis_layout()  # cached in ~/.cache/envbox-test-images; ~30 s to build once
    except pytest.skip.Exception as e:  # a missing tool: a BaseException, made an ordinary one
        raise RuntimeError(f"the redis image cannot be built: {e}") from None
    missing = [t for t in ("docker-registry", "skopeo", "umoci") if shutil.which(t) is None]
    if missing:
        raise RuntimeError(f"needs {', '.join(missing)} (apt-get install docker-registry skopeo umoci)")
    (tmp / "registry").mkdir()
    server = RegistryServer(tmp / "registry", "open")
    server.start()
    try:
        t0 = time.perf_counter()
        push_layout(layout, "latest", server, f"{REPO}:latest")
        log(f"  redis image pushed to {server.host} in {time.perf_counter() - t0:.1f} s")
        yield f"{server.host}/{REPO}:latest", layout
    finally:
        server.stop()


@contextlib.contextmanager
def store_at(path: Path) -> Iterator[None]:
    """``$ENVBOX_STORE`` set to ``path`` meanwhile (``open_store()`` follows it)."""
    old = os.environ.get("ENVBOX_STORE")
    os.environ["ENVBOX_STORE"] = str(path)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("ENVBOX_STORE", None)
        else:
            os.environ["ENVBOX_STORE"] = old


def envbox_pull(ref: str) -> None:
    """What ``envbox pull REF`` does (``cli/images.py``): a ``Puller`` on ``open_store()``,
    ``get(ref, "always")``: download, verify, unpack."""
    puller = Puller(open_store())
    try:
        puller.get(reference_of(ref), "always")
    finally:
        puller.close()


def ping(port: int) -> bool | None:
    """True once redis on ``127.0.0.1:port`` answers ``PING``; None before (refused, reset)."""
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG") or None
    except OSError:
        return None


# --- 1. start+stop --------------------------------------------------------------------------------


def open_close(make: Callable[[str], tuple[Service, dict[str, Any]]], rootdir: Path) -> M.Cycle:
    """``open()`` (start-to-ready) and ``close()`` of a fresh one-service ``Environment``;
    ``make(name)`` gives the service and the environment's ``images`` mapping."""
    counter = itertools.count()

    def run() -> tuple[float, float]:
        svc, images = make(f"s{next(counter)}")
        env = Environment([svc], images=images, rootdir=rootdir)
        t0 = time.perf_counter()
        env.open()
        t1 = time.perf_counter()
        env.close()
        return t1 - t0, time.perf_counter() - t1
    return run


def redis_host(name: str) -> tuple[Service, dict[str, Any]]:
    return Service(name, [HOST_REDIS, *REDIS_ARGS], ports=[PORT], ready=probe.tcp(PORT)), {}


def redis_image(ref: str) -> Callable[[str], tuple[Service, dict[str, Any]]]:
    def make(name: str) -> tuple[Service, dict[str, Any]]:
        return Service(name, image=ref, ports=[PORT], ready=probe.tcp(PORT)), {}
    return make


def bench_start_stop(ref: str, tmp: Path, n: int, warmup: int) -> dict[str, Any]:
    from bench_image_start import BUSYBOX, busybox_image

    (tmp / "busybox").mkdir()
    img = busybox_image(tmp / "busybox")
    httpd = ["httpd", "-f", "-p", str(HTTPD_PORT), "-h", "/tmp"]

    def bb_host(name: str) -> tuple[Service, dict[str, Any]]:
        return Service(name, [BUSYBOX, *httpd], ports=[HTTPD_PORT], ready=probe.tcp(HTTPD_PORT)), {}

    def bb_image(name: str) -> tuple[Service, dict[str, Any]]:
        svc = Service(name, ["busybox", *httpd], image=img.reference, ports=[HTTPD_PORT],
                      ready=probe.tcp(HTTPD_PORT))  # fmt: skip
        return svc, {name: img}

    raw = M.measure({
        "redis_host": open_close(redis_host, tmp),
        "redis_image": open_close(redis_image(ref), tmp),
        "busybox_host": open_close(bb_host, tmp),
        "busybox_image": open_close(bb_image, tmp),
    }, n, warmup)  # fmt: skip
    broken = [k for k, parts in raw.items() if "dropped" in parts]
    if broken:  # every variant here is envbox: none is dropped quietly
        raise RuntimeError(f"{', '.join(broken)} failed three times in a row")
    failures = {k: len(parts.pop("failures", [])) for k, parts in raw.items()}
    stats = {k: {part: M.summary(v) for part, v in parts.items()} for k, parts in raw.items()}
    med = {k: s["total"]["median"] for k, s in stats.items()}
    ready = {k: s["ready"]["median"] for k, s in stats.items()}
    return {"n": n, "ms": stats, "ratio_redis": med["redis_image"] / med["redis_host"],
            "ratio_busybox": med["busybox_image"] / med["busybox_host"],
            "ratio_redis_ready": ready["redis_image"] / ready["redis_host"],
            "failed_runs": {k: v for k, v in failures.items() if v},
            "command": [HOST_REDIS, *REDIS_ARGS], "busybox_command": [BUSYBOX, *httpd]}  # fmt: skip


# --- 2. pytest ------------------------------------------------------------------------------------

PING_TEST = '''
    import socket

    import pytest


    def ping(port):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"PING\\r\\n")
            return s.recv(16)


    @pytest.mark.envbox("{svc}")
    @pytest.mark.parametrize("i", range(100))
    def test_redis(envbox, i):
        assert ping(envbox["{svc}"].port(6379)).startswith(b"+PONG")
    '''
PYTEST_FILES = {
    "image": PING_TEST.replace("{svc}", "redis-image"),
    "host": PING_TEST.replace("{svc}", "redis-host"),
    "none": '''
        import pytest


        @pytest.mark.parametrize("i", range(100))
        def test_no_services(i):
            assert i >= 0
        ''',
}


def bench_pytest(ref: str, store: Path, tmp: Path, reps: int, log: Log) -> dict[str, Any]:
    root = tmp / "pytest"
    root.mkdir()
    args = ", ".join(f'"{a}"' for a in REDIS_ARGS)
    (root / "pyproject.toml").write_text(
        '[tool.pytest.ini_options]\naddopts = "-p no:cacheprovider"\n\n'
        f'[tool.envbox.services.redis-host]\ncommand = ["{HOST_REDIS}", {args}]\n'
        f"ports = [{PORT}]\nready = {{ tcp = {PORT} }}\n\n"
        f'[tool.envbox.services.redis-image]\nimage = "{ref}"\n'
        f"ports = [{PORT}]\nready = {{ tcp = {PORT} }}\n")
    for name, text in PYTEST_FILES.items():
        (root / f"test_{name}.py").write_text(textwrap.dedent(text))
    env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1", "ENVBOX_STORE": str(store),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    times: dict[str, list[float]] = defaultdict(list)
    failed: list[dict[str, str]] = []
    names = list(PYTEST_FILES)
    for r in range(reps):
        for name in names[r % 3:] + names[: r % 3]:
            for attempt in range(3):  # a run with a failed test is not timed: reported, run again
                t0 = time.perf_counter()
                p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "pytest_envbox.plugin",
                                    f"test_{name}.py"], cwd=root, env=env, capture_output=True, text=True)
                took = time.perf_counter() - t0
                if p.returncode == 0 and "100 passed" in p.stdout:
                    times[name].append(took)
                    break
                lines = p.stdout.splitlines()
                why = [x for x in lines if x.startswith(("E ", "FAILED", "ERROR"))][:6] + lines[-1:]
                failed.append({"variant": name, "output": "\n".join(why)})
                log(f"  pytest run {name} failed ({lines[-1] if lines else p.stderr[-300:]}), "
                    f"{'again' if attempt < 2 else 'giving up'}")  # fmt: skip
            else:
                raise RuntimeError(f"pytest run {name} failed 3 times:\n{p.stdout[-2000:]}{p.stderr[-2000:]}")
    s = {k: M.summary(v, 1.0) for k, v in times.items()}
    image, host, none = (s[k]["median"] for k in ("image", "host", "none"))
    return {"tests": 100, "reps": reps, "seconds": s, "samples_s": times, "failed_runs": failed,
            "overhead_image_s": image - none, "overhead_host_s": host - none,
            "ratio": (image - none) / (host - none),
            "per_test_ms": {"image": (image - none) * 10, "host": (host - none) * 10}}  # fmt: skip


# --- 3. pull + unpack -----------------------------------------------------------------------------


def bench_pull(ref: str, tmp: Path, reps: int) -> dict[str, Any]:
    """Pull + unpack, envbox and skopeo + umoci interleaved, each into a fresh directory that is
    removed (and the removal synced to disk) before the next one starts: no variant pays for
    another's writeback. No warm-up round: the set-up's first pull has read the registry's blob
    into the page cache for both."""
    work = tmp / "pull"
    work.mkdir()
    parts: dict[str, list[float]] = defaultdict(list)
    rootless = ["--rootless"] if os.geteuid() != 0 else []
    count = itertools.count()

    def fresh() -> Path:
        d = work / f"{next(count)}"
        d.mkdir()
        return d

    def done(d: Path) -> None:
        subprocess.run(["rm", "-rf", str(d)], check=True)
        os.sync()

    def envbox() -> float:
        d = fresh()
        with store_at(d / "store"):
            t0 = time.perf_counter()
            store = open_store()  # the store envbox_pull's open_store() returns: same root
            unpack = store.unpack

            def timed_unpack(*args: Any, **kw: Any) -> Any:
                t = time.perf_counter()
                try:
                    return unpack(*args, **kw)
                finally:
                    parts["envbox unpack"].append(time.perf_counter() - t)

            store.unpack = timed_unpack  # type: ignore[method-assign]
            envbox_pull(ref)
            took = time.perf_counter() - t0
        parts["envbox download+verify"].append(took - parts["envbox unpack"][-1])
        done(d)
        return took

    def skopeo_umoci() -> float:
        d = fresh()
        t0 = time.perf_counter()
        subprocess.run(["skopeo", "--insecure-policy", "copy", "--quiet", "--src-tls-verify=false",
                        f"docker://{ref}", f"oci:{d / 'layout'}:latest"], check=True, capture_output=True,
                       env={**os.environ, "HOME": str(d)})  # fmt: skip
        t1 = time.perf_counter()
        subprocess.run(["umoci", "unpack", *rootless, "--image", f"{d / 'layout'}:latest", str(d / "bundle")],
                       check=True, capture_output=True)  # fmt: skip
        t2 = time.perf_counter()
        parts["skopeo copy"].append(t1 - t0)
        parts["umoci unpack"].append(t2 - t1)
        done(d)
        return t2 - t0

    variants: dict[str, Callable[[], float]] = {"envbox": envbox, "skopeo_umoci": skopeo_umoci}
    times: dict[str, list[float]] = defaultdict(list)
    names = list(variants)
    for i in range(reps):
        for name in names[i % len(names):] + names[: i % len(names)]:
            times[name].append(variants[name]())
    s = {k: M.summary(v, 1.0) for k, v in [*times.items(), *parts.items()]}
    return {"reps": reps, "seconds": s, "samples_s": {**times, **parts}, "order": names,
            "ratio": s["envbox"]["median"] / s["skopeo_umoci"]["median"],
            "umoci_rootless": bool(rootless)}  # fmt: skip


# --- 4. podman and testcontainers, to ready -------------------------------------------------------


def testcontainers_cycle(ref: str) -> tuple[float, float]:
    """testcontainers-python's ``DockerContainer``: start, ``PING`` answered through the
    published port (how a user waits for it), stop; (start-to-ready, stop) in seconds."""
    from testcontainers.core.container import DockerContainer  # type: ignore[import-not-found]

    c = DockerContainer(ref).with_exposed_ports(PORT)
    t0 = time.perf_counter()
    c.start()
    port = int(c.get_exposed_port(PORT))
    answered = wait_until(lambda: ping(port), Deadline(30), interval=0.001)
    t1 = time.perf_counter()
    c.stop()
    if not answered:
        raise TimeoutError("the testcontainers redis never answered PING on its published port")
    return t1 - t0, time.perf_counter() - t1


def bare_redis() -> tuple[float, float]:
    """``redis-server`` as a plain host process (no sandbox, no image): what redis itself takes
    to accept a connection, the floor under every variant's figure."""
    from tests.imagekit.registry import free_port

    port = free_port()
    t0 = time.perf_counter()
    p = subprocess.Popen([HOST_REDIS, "--port", str(port), *REDIS_ARGS], stdout=subprocess.DEVNULL)
    M.wait_accepting(p.pid, port, own_netns=False)
    t1 = time.perf_counter()
    p.terminate()
    p.wait()
    return t1 - t0, time.perf_counter() - t1


def bench_podman(ref: str, tmp: Path, n: int, log: Log) -> dict[str, Any]:
    why = _podman.install_if_missing(log, _podman.PODMAN)
    if why is not None:
        return {"skipped": why}
    saved = {k: os.environ.get(k) for k in _podman.testcontainers_env("")}
    try:
        with _podman.podman_session(log) as (pm, info):
            t0 = time.perf_counter()
            pm("pull", "--quiet", "--tls-verify=false", ref)
            info["pull_into_podman_s"] = time.perf_counter() - t0
            variants: dict[str, M.Cycle] = {
                "envbox": open_close(redis_image(ref), tmp),
                "bare": bare_redis,
                "podman": lambda: _podman.run_container(pm, ["--rm", "-p", f"127.0.0.1::{PORT}"], [], PORT,
                                                        image=ref),
            }  # fmt: skip
            try:
                import testcontainers  # type: ignore[import-not-found]  # noqa: F401

                os.environ.update(_podman.testcontainers_env(pm.start_service()))
                variants["testcontainers"] = lambda: testcontainers_cycle(ref)
            except ImportError:
                info["testcontainers"] = "not installed (pip install testcontainers; tox -e bench does)"
            raw = M.measure(variants, n, 1)
            result: dict[str, Any] = {"n": n, "podman": info}
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    failures = {k: len(parts.pop("failures", [])) for k, parts in raw.items()}
    dropped = sorted(k for k, parts in raw.items() if parts.pop("dropped", None))
    for k in dropped:
        del raw[k]
    stats = {k: {part: M.summary(v) for part, v in parts.items()} for k, parts in raw.items()}
    ready = {k: s["ready"]["median"] for k, s in stats.items()}
    ratios = {f"{k} / envbox": ready[k] / ready["envbox"] for k in ready if k not in ("envbox", "bare")}
    # The floor: how much slower than redis-server itself each tool is. A target above it cannot
    # be met by any sandbox that starts redis-server, however fast.
    floor = {f"{k} / bare": ready[k] / ready["bare"] for k in ready if k != "bare"} if "bare" in ready else {}
    result.update({"ms": stats, "ratios": ratios, "ratios_to_bare": floor,
                   "failed_runs": {k: v for k, v in failures.items() if v}, "dropped": dropped})  # fmt: skip
    return result


# --- the section ----------------------------------------------------------------------------------


def bench_images(n: int, reps: int, pull_reps: int, n_podman: int, podman: bool, log: Log) -> dict[str, Any]:
    """Every part, in one run: see the module's docstring."""
    tmp = Path(tempfile.mkdtemp(prefix="envbox-bench-images-"))
    out: dict[str, Any] = {}
    try:
        with redis_in_registry(tmp, log) as (ref, layout):
            store = tmp / "store"
            out["reference"] = ref
            out["layout"] = str(layout)
            with store_at(store):
                t0 = time.perf_counter()
                envbox_pull(ref)  # into the store the cached parts use
                out["first_pull_s"] = time.perf_counter() - t0
                os.sync()  # the push's and the pull's writes on disk now, not during what follows

                def part(name: str, fn: Callable[[], dict[str, Any]]) -> None:
                    log(f"  images: {name} ...")
                    t = time.monotonic()
                    out[name] = fn()
                    out[name]["seconds_taken"] = time.monotonic() - t

                part("start_stop", lambda: bench_start_stop(ref, tmp, n, 3))
                part("pytest", lambda: bench_pytest(ref, store, tmp, reps, log))
                if podman:
                    part("podman", lambda: bench_podman(ref, tmp, n_podman, log))
                else:
                    out["podman"] = {"skipped": "--podman no"}
            part("pull", lambda: bench_pull(ref, tmp, pull_reps))
    finally:
        subprocess.run(["rm", "-rf", str(tmp)], check=False)  # layers may hold read-only dirs
    return out


# --- report ---------------------------------------------------------------------------------------


def figures(r: dict[str, Any]) -> dict[str, float]:
    """The figures ``run.py``'s targets are about."""
    out = {"images: redis image start+stop / host redis-server": r["start_stop"]["ratio_redis"],
           "images: 1-layer busybox image start+stop / host busybox": r["start_stop"]["ratio_busybox"],
           "images: 100 redis image tests, overhead / host redis": r["pytest"]["ratio"],
           "images: pull+unpack / skopeo copy + umoci unpack": r["pull"]["ratio"]}  # fmt: skip
    ratios = r.get("podman", {}).get("ratios", {})
    if "podman / envbox" in ratios:
        out["images: podman run --rm to ready / envbox"] = ratios["podman / envbox"]
    if "testcontainers / envbox" in ratios:
        out["images: testcontainers to ready / envbox"] = ratios["testcontainers / envbox"]
    return out


def print_images(r: dict[str, Any], row: Callable[..., str], head: str) -> None:
    print(f"\n== 6. images: {r['reference']} (the test suite's Debian redis image, 1 layer)")
    s = r["start_stop"]
    print(f"  start-to-ready + stop, fresh Environment, image in the store (n={s['n']})")
    print(head + "       ratio")
    for k, label, ratio in (("redis_host", "redis-server, host program", ""),
                            ("redis_image", "redis-server, image", f"{s['ratio_redis']:6.2f}x host"),
                            ("busybox_host", "busybox httpd, host program", ""),
                            ("busybox_image", "busybox httpd, 1-layer image",
                             f"{s['ratio_busybox']:6.2f}x host")):
        print(row(label, s["ms"][k]["total"], ratio=ratio))
        print(row("  of which start-to-ready", s["ms"][k]["ready"]))
    p = r["pytest"]
    print("  a real pytest run of 100 tests, each with a function-scoped redis (wall time)")
    print(head)
    for k, label in (("none", "no services"), ("host", "redis-server on the host"), ("image", "redis image")):
        print(row(label, p["seconds"][k], unit="s"))
    print(f"  overhead: image {p['overhead_image_s']:.2f} s ({p['per_test_ms']['image']:.1f} ms a test), "
          f"host {p['overhead_host_s']:.2f} s ({p['per_test_ms']['host']:.1f} ms a test): {p['ratio']:.2f}x")
    for f in p.get("failed_runs", []):
        said = f["output"].replace("\n", " | ")[:300]
        print(f"  a {f['variant']} run failed (not timed, run again): {said}")
    q = r["pull"]
    print(f"  pull + unpack into an empty directory (n={q['reps']}; the set-up's first pull "
          f"{r['first_pull_s']:.2f} s)")
    print(head)
    for k, label in (("envbox", "envbox (Puller, as envbox pull)"),
                     ("envbox download+verify", "  of which download + verify"),
                     ("envbox unpack", "  of which unpack"),
                     ("skopeo_umoci", "skopeo copy + umoci unpack"),
                     ("skopeo copy", "  of which skopeo copy"),
                     ("umoci unpack", "  of which umoci unpack")):
        print(row(label, q["seconds"][k], unit="s"))
    print(f"  envbox / skopeo+umoci: {q['ratio']:.2f}")
    d = r["podman"]
    if "ms" in d:
        print(f"  start-to-ready of the image (n={d['n']}), and stop")
        print(head + "       ratio")
        for k, label in (("bare", "redis-server on the host, no sandbox"),
                         ("envbox", "envbox, image cached"), ("podman", "podman run --rm -d -p"),
                         ("testcontainers", "testcontainers-python (podman service)")):
            if k in d["ms"]:
                ratio = d["ratios"].get(f"{k} / envbox")
                print(row(label, d["ms"][k]["ready"], ratio=f"{ratio:6.1f}x envbox" if ratio else ""))
                print(row("  stop", d["ms"][k]["stop"]))
        if d.get("ratios_to_bare"):
            print("  to ready / bare redis-server: " + ", ".join(
                f"{k.split()[0]} {v:.1f}x" for k, v in d["ratios_to_bare"].items()))
        print(f"  podman: {d['podman']}")
        if d.get("failed_runs"):
            print(f"  runs that failed and were run again: {d['failed_runs']}")
    else:
        print(f"  podman: {d.get('skipped') or d}")
