"""Real containers for the tests: podman (with runc) running this host's own Python, pytest and
checkout, so that envbox can be tried where users run it: inside a container.

No image is pulled or built. Each container's root is an overlay whose lower layer is the host's
``/`` (read-only to the container: its writes land in an upper directory on a tmpfs of ours), so
it has the host's exact interpreter and packages. What the overlay of ``/`` cannot show is bound
in read-only at the same path: the checkout, and the interpreter's prefixes and package dirs when
they live on another mount or under ``/tmp`` or ``/run`` (CI's clone and its tox venv live in
``/tmp``; the container gets a tmpfs of its own on ``/tmp`` and ``/run``, so that nothing it
writes there reaches the host and the host's envbox records do not show up in it).

Podman itself is the benchmark's (``benchmarks/_podman.py``): storage, run root and
``containers.conf`` in a temporary directory, runc and cgroupfs, lower rlimits. Containers run
with ``--network none``, so podman makes no bridge, iptables chain or ``/run/netns`` file; what
podman still leaves on the host (its empty ``libpod_parent`` cgroups) is removed, and
:meth:`PodmanHost.close` returns what else differs from before (the tests assert: nothing).
Only podman's own leftovers are removed, never anything else that appeared meanwhile (a test
running in parallel may own it).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType

from tests.conftest import load_by_path

REPO = Path(__file__).resolve().parents[1]
#: podman's own default PATH, after the interpreter's directory (a venv's bin)
#: where a user's container sees this interpreter's venv
VENV = "/opt/envbox-venv"
_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _bench_podman() -> ModuleType:
    """``benchmarks/_podman.py``, loaded by path (the benchmarks are not a package)."""
    return load_by_path("_envbox_bench_podman", REPO / "benchmarks" / "_podman.py")


def unavailable() -> str | None:
    """Why real containers cannot run here (a skip reason), or None when they can."""
    if not sys.platform.startswith("linux"):
        return "podman containers need Linux"
    if os.geteuid() != 0:
        return "the container tests run rootful podman: they need root"
    missing = [tool for tool in ("podman", "runc") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not installed (Debian: apt-get install podman runc; .ci/run does)"
    return None


def _mounts() -> list[str]:
    """Mount points of this mount namespace, longest first."""
    with open("/proc/self/mountinfo") as f:
        points = {line.split()[4].replace("\\040", " ") for line in f}
    return sorted(points, key=len, reverse=True)


def _mount_of(path: str, mounts: list[str]) -> str:
    return next(m for m in mounts if m == "/" or path == m or path.startswith(m.rstrip("/") + "/"))


def binds_needed(paths: Sequence[str]) -> list[str]:
    """Of ``paths`` (and the interpreter's own), those an overlay of ``/`` would not show as
    they are here, outermost only: on another mount than ``/``, or under ``/tmp`` or ``/run``
    (which the container gets empty)."""
    mounts = _mounts()
    wanted = [*paths, sys.prefix, sys.base_prefix, *site.getsitepackages(),
              sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"],
              *(p for p in sys.path if p and os.path.isdir(p))]  # fmt: skip
    chosen: list[str] = []
    for p in sorted({os.path.realpath(p) for p in wanted if os.path.exists(p)}, key=len):
        if any(p == c or p.startswith(c + "/") for c in chosen):
            continue
        hidden = p == "/tmp" or p.startswith(("/tmp/", "/run/")) or _mount_of(p, mounts) != "/"
        if hidden or p in {os.path.realpath(x) for x in paths}:
            chosen.append(p)
    return chosen


def _traversable(root: Path, paths: list[str]) -> None:
    """Every directory above ``paths`` searchable by all (``o+x``), in the overlay at ``root``
    (the change is copied up into its upper layer, a tmpfs: the host's directories keep their
    modes). Bound paths are mount points in the container, not in ``root``: only their parents."""
    for path in paths:
        parent = Path(os.path.realpath(path)).parent
        for d in [parent, *parent.parents]:
            inside = root / str(d).lstrip("/")
            with contextlib.suppress(OSError):
                mode = inside.stat().st_mode
                if not mode & 0o001:
                    inside.chmod((mode & 0o7777) | 0o001)


class PodmanHost:
    """Podman with private storage, and containers whose root is an overlay of the host's ``/``."""

    def __init__(self) -> None:
        self._bench = _bench_podman()
        self._before = self._bench.HostState()
        self.tmp = Path(tempfile.mkdtemp(prefix="envbox-podman-"))
        self.podman = self._bench.Podman(self.tmp)
        self._layers = self.tmp / "layers"
        self._layers.mkdir()
        # A tmpfs for the upper layers: an upper directory inside the lower layer (/) would
        # overlap it, which overlayfs refuses.
        self._run(["mount", "-t", "tmpfs", "-o", "mode=0700", "envbox-podman-layers", str(self._layers)])
        self._count = 0

    @staticmethod
    def _run(argv: list[str]) -> None:
        r = subprocess.run(argv, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: {r.stderr.strip()}")

    @contextlib.contextmanager
    def _rootfs(self) -> Iterator[Path]:
        """A fresh overlay of ``/`` for one container; gone after it."""
        self._count += 1
        base = self._layers / str(self._count)
        for d in ("upper", "work", "root"):
            (base / d).mkdir(parents=True)
        root = base / "root"
        self._run(["mount", "-t", "overlay", "envbox-podman-root", "-o",
                   f"lowerdir=/,upperdir={base}/upper,workdir={base}/work", str(root)])  # fmt: skip
        try:
            yield root
        finally:
            subprocess.run(["umount", str(root)], capture_output=True)
            shutil.rmtree(base, ignore_errors=True)

    def run(self, cmd: Sequence[str], *, options: Sequence[str] = (), env: dict[str, str] | None = None,
            binds: Sequence[str] = (), cwd: str | None = None, timeout: float = 120,
            user: str | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
        """``cmd`` as root in a new container (``podman run --rm --network none``), with
        ``options`` (``--privileged``...), ``env`` (nothing else of ours is passed), and the
        checkout plus ``binds`` visible read-only at their own paths. With ``user`` (``uid:gid``),
        as that user: the directories above the interpreter (``/root`` is private) are made
        traversable in the container's overlay, never on the host; ``sys.executable`` as the
        command is a venv's interpreter bound at :data:`VENV`."""
        environ = {
            "PATH": f"{os.path.dirname(sys.executable)}:{_PATH}",
            "HOME": "/root",
            "LANG": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1",  # the checkout is read-only in the container
        }
        if os.environ.get("PYTHONPATH"):
            environ["PYTHONPATH"] = os.environ["PYTHONPATH"]
        environ.update(env or {})
        argv = [*self.podman.base, "run", "--rm", "--network", "none",
                # notmpcopyup: not a copy of the host's /tmp (the overlay's) into the tmpfs
                "--tmpfs", "/tmp:rw,mode=1777,notmpcopyup",
                "--tmpfs", "/run:rw,mode=0755,notmpcopyup"]  # fmt: skip
        for path in binds_needed([str(REPO), *binds]):
            argv += ["--volume", f"{path}:{path}:ro"]
        for k, v in environ.items():
            argv += ["--env", f"{k}={v}"]
        argv += ["--workdir", cwd or str(REPO), *options]
        if user is not None:
            argv += ["--user", user]
            if cmd and cmd[0] == sys.executable and sys.prefix != sys.base_prefix:
                # A venv inside a private directory (tox's .tox is 0700): bound at a path of its
                # own, from where it runs as well (a venv finds itself by its pyvenv.cfg).
                argv += ["--volume", f"{os.path.realpath(sys.prefix)}:{VENV}:ro"]
                cmd = [f"{VENV}/bin/{os.path.basename(sys.executable)}", *cmd[1:]]
        with self._rootfs() as root:
            if user is not None:
                _traversable(root, [sys.executable, sys.base_prefix, *binds_needed([str(REPO), *binds])])
            cidfile = root.parent / "cid"
            # --rootfs takes the image's place: the last option.
            try:
                return subprocess.run([*argv, "--cidfile", str(cidfile), "--rootfs", str(root), *cmd],
                                      env=self.podman.env, capture_output=True, text=True,
                                      timeout=timeout)  # fmt: skip
            except subprocess.TimeoutExpired:
                # Killing podman's client leaves the container running: remove it, so that its
                # root can be unmounted, and say so.
                with contextlib.suppress(OSError):
                    self.podman("rm", "--force", "--time", "0", cidfile.read_text().strip(), check=False)
                raise

    def close(self) -> list[str]:
        """Every container and mount of ours gone, podman's own leftovers removed; returns
        what else podman, this helper or envbox made that is still there (one line each; empty:
        nothing)."""
        with contextlib.suppress(Exception):
            self.podman.close()  # containers, storage; unmounts what is under self.tmp
        for m in _mounts():
            if m.startswith(str(self.tmp) + "/"):
                subprocess.run(["umount", "-l", m], capture_output=True)
        after = self._bench.HostState()
        for cg in sorted(after.cgroups - self._before.cgroups, key=len, reverse=True):
            # Podman's parent (cgroupfs manager) and conmon's cgroup in it, empty once the
            # containers are gone; any other child (a container's, envbox's in it) is a leak,
            # and stays (rmdir fails on a cgroup with children or processes).
            if cg.endswith("/libpod_parent"):
                with contextlib.suppress(OSError):
                    os.rmdir(os.path.join(cg, "conmon"))
                with contextlib.suppress(OSError):
                    os.rmdir(cg)
        shutil.rmtree(self.tmp, ignore_errors=True)
        left: list[str] = self._before.diff(self._bench.HostState())
        # Only what podman, this helper or envbox in a container could have made counts: the host
        # is shared (other tests, xdist workers, other programs change its links, mounts, sysctls
        # and iptables meanwhile), and a container run with --network none changes none of those.
        ours = ("podman", "libpod", "cni", "containers", "envbox", str(self.tmp))
        return [x for x in left if any(name in x for name in ours)]
