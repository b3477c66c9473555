"""Podman (and testcontainers-python against ``podman system service``) as the Docker-compatible
reference, with everything it changes on the host put back afterwards.

Podman is run with a storage root, run root, tmp dir and ``containers.conf`` of its own in a
temporary directory (``/var/lib/containers`` is never touched). What it still changes on the host,
and what :class:`HostState` snapshots before and restores after: ``ip_forward`` (and the other
forwarding sysctls), iptables chains (CNI's ``CNI-*`` chains, NAT rules), the bridge
(``cni-podman0`` or ``podman0``), network namespace files under ``/run/netns``, IPAM state under
``/var/lib/cni``, and ``libpod_parent`` cgroups. The restore is checked by a second snapshot;
the JSON says whether both agree.

Two host quirks, handled here, not by hand: this machine's OCI runtime ``crun`` fails on the hybrid
cgroup layout, so ``runc`` is used; and the host lacks ``CAP_SYS_RESOURCE``, so podman's default
rlimits (``nproc`` above what the host allows) make runc fail: ``default_ulimits`` sets lower
ones.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

IMAGE = "localhost/envbox-bench-busybox:latest"
SYSCTLS = ["net/ipv4/ip_forward", "net/ipv6/conf/all/forwarding", "net/ipv4/conf/all/route_localnet"]
PATHS = ["/var/lib/containers", "/run/containers", "/run/libpod", "/var/lib/cni", "/run/cni", "/run/netns"]


def _run(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, **kw)


# --- host state -------------------------------------------------------------------------------


def _iptables(tool: str) -> dict[str, list[str]]:
    """``iptables-save`` by table, without comments and counters; a table holding nothing but
    its built-in chains with ACCEPT policies counts as absent (nf_tables keeps emptied tables)."""
    if shutil.which(tool) is None:
        return {}
    out = _run([tool]).stdout
    tables: dict[str, list[str]] = {}
    cur: list[str] = []
    for line in out.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        if line.startswith("*"):
            cur = tables.setdefault(line[1:], [])
        elif line != "COMMIT":
            cur.append(re.sub(r" \[\d+:\d+\]$", "", line))
    return {t: rules for t, rules in tables.items()
            if not all(re.fullmatch(r":[A-Z]+ ACCEPT", r) for r in rules)}  # fmt: skip


def _cgroup_dirs() -> set[str]:
    found = set()
    root = Path("/sys/fs/cgroup")
    for hier in [root, *(p for p in root.iterdir() if p.is_dir())] if root.is_dir() else []:
        for pattern in ("*libpod*", "*/*libpod*", "machine.slice"):
            found.update(str(p) for p in hier.glob(pattern) if p.is_dir())
    return found


class HostState:
    """What podman may change, read off the host."""

    def __init__(self) -> None:
        self.sysctls = {}
        for s in SYSCTLS:
            with contextlib.suppress(OSError):
                self.sysctls[s] = Path("/proc/sys", s).read_text().strip()
        self.links = set(Path("/sys/class/net").iterdir()) if Path("/sys/class/net").is_dir() else set()
        self.iptables = {t: _iptables(t) for t in ("iptables-save", "ip6tables-save")}
        self.cgroups = _cgroup_dirs()
        self.paths = {p: os.path.lexists(p) for p in PATHS}
        self.netns = set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()
        with open("/proc/self/mountinfo") as f:
            self.mounts = {line.split()[4] for line in f}

    def diff(self, other: HostState) -> list[str]:
        """What differs in ``other``, one line each (empty: the same)."""
        out = []
        for k, v in self.sysctls.items():
            if other.sysctls.get(k) != v:
                out.append(f"sysctl {k}: {v} -> {other.sysctls.get(k)}")
        out += [f"new link {p.name}" for p in other.links - self.links]
        for tool, tables in self.iptables.items():
            if other.iptables.get(tool) != tables:
                out.append(f"{tool} differs")
        out += [f"new cgroup {c}" for c in sorted(other.cgroups - self.cgroups)]
        out += [f"{p} now {'exists' if other.paths[p] else 'gone'}" for p in PATHS
                if other.paths[p] != self.paths[p]]  # fmt: skip
        out += [f"new netns {n}" for n in sorted(other.netns - self.netns)]
        out += [f"new mount {m}" for m in sorted(other.mounts - self.mounts)]
        return out

    def restore(self) -> None:
        """Put back what podman changed (best effort, each step on its own)."""
        now = HostState()
        for m in sorted(now.mounts - self.mounts, key=len, reverse=True):
            _run(["umount", "-l", m])
        for n in now.netns - self.netns:
            with contextlib.suppress(OSError):
                os.unlink(f"/run/netns/{n}")
        for link in now.links - self.links:
            _run(["ip", "link", "delete", link.name])
        for tool, before in self.iptables.items():
            if now.iptables.get(tool) == before:
                continue
            restore = tool.replace("-save", "-restore")
            text = "".join(f"*{t}\n" + "".join(r + "\n" for r in rules) + "COMMIT\n"
                           for t, rules in before.items())  # fmt: skip
            for table in set(now.iptables.get(tool, {})) - set(before):
                # A table that was empty: flush it back to its built-in chains.
                text += f"*{table}\nCOMMIT\n"
            _run([restore], input=text)
        for cg in sorted(now.cgroups - self.cgroups, key=len, reverse=True):
            for sub in sorted(Path(cg).glob("**/"), key=lambda p: len(str(p)), reverse=True):
                with contextlib.suppress(OSError):
                    sub.rmdir()
        for p, existed in self.paths.items():
            if not existed and os.path.lexists(p):
                shutil.rmtree(p, ignore_errors=True)
        for k, v in self.sysctls.items():
            with contextlib.suppress(OSError):
                Path("/proc/sys", k).write_text(v + "\n")


# --- podman -------------------------------------------------------------------------------------


def install_if_missing(log: Any, commands: dict[str, str]) -> str | None:
    """Debian's packages for the ``commands`` (command -> package) that are missing, as root with
    apt; None when all are there, else the reason they are not."""
    missing = sorted({pkg for cmd, pkg in commands.items() if shutil.which(cmd) is None})
    if not missing:
        return None
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return f"{', '.join(missing)} not installed (and this is not root with apt-get to install them)"
    log(f"installing {' '.join(missing)} with apt-get (once) ...")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update", "-q"],
                 ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]):
        r = _run(argv, env=env)
        if r.returncode != 0:
            return f"{' '.join(argv)} failed: {r.stderr.strip()[-500:]}"
    return None


PODMAN = {"podman": "podman", "runc": "runc", "iptables": "iptables"}


def _rootfs(root: Path) -> None:
    """A minimal root filesystem: busybox, the libraries it links to (none if static), applets."""
    bb = shutil.which("busybox")
    if bb is None:
        raise RuntimeError("busybox is not installed (apt-get install busybox)")
    bb = os.path.realpath(bb)
    (root / "bin").mkdir(parents=True)
    shutil.copy2(bb, root / "bin" / "busybox")
    ldd = _run(["ldd", bb]).stdout
    for lib in re.findall(r"(/\S+\.so[.\d]*)", ldd):
        dest = root / lib.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.realpath(lib), dest)
    for applet in ("sh", "httpd", "true", "sleep"):
        (root / "bin" / applet).symlink_to("busybox")
    for d in ("tmp", "proc", "dev", "sys", "etc", "www"):
        (root / d).mkdir(exist_ok=True)


class Podman:
    """Podman with private storage and configuration (see the module's docstring)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        hard_nofile = _run(["sh", "-c", "ulimit -Hn"]).stdout.strip() or "1024"
        nofile = min(int(hard_nofile) if hard_nofile.isdigit() else 1024, 65536)
        conf = tmp / "containers.conf"
        conf.write_text(
            "[containers]\n"
            f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc=4096:4096"]\n'
            "[engine]\n"
            'runtime = "runc"\n'
            'cgroup_manager = "cgroupfs"\n'
            f'tmp_dir = "{tmp}/libpod"\n'
            'events_logger = "none"\n'
        )
        self.env = {**os.environ, "CONTAINERS_CONF": str(conf)}
        self.base = ["podman", "--root", str(tmp / "storage"), "--runroot", str(tmp / "run")]
        self.service: subprocess.Popen[bytes] | None = None

    def __call__(self, *args: str, check: bool = True) -> str:
        r = _run([*self.base, *args], env=self.env)
        if check and r.returncode != 0:
            raise RuntimeError(f"podman {' '.join(args)}: {r.stderr.strip()[-800:]}")
        return r.stdout

    def import_image(self) -> None:
        root = self.tmp / "rootfs"
        _rootfs(root)
        tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        r = subprocess.run([*self.base, "import", "-", IMAGE], stdin=tar.stdout,
                           capture_output=True, text=True, env=self.env)  # fmt: skip
        tar.wait()
        if r.returncode != 0:
            raise RuntimeError(f"podman import: {r.stderr.strip()[-800:]}")

    def start_service(self) -> str:
        """``podman system service`` on a socket of our own; returns its ``unix://`` address."""
        sock = self.tmp / "podman.sock"
        self.service = subprocess.Popen([*self.base, "system", "service", "--time=0", f"unix://{sock}"],
                                        env=self.env, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)  # fmt: skip
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
                s.connect(str(sock))
                s.sendall(b"GET /_ping HTTP/1.0\r\n\r\n")
                if b"OK" in s.recv(4096):
                    return f"unix://{sock}"
            if self.service.poll() is not None:
                break
            time.sleep(0.02)
        raise RuntimeError("podman system service did not answer /_ping within 30 s")

    def close(self) -> None:
        """Every container gone, the service stopped, the storage unmounted and removed."""
        self("rm", "--all", "--force", "--time", "0", check=False)
        if self.service is not None:
            self.service.send_signal(signal.SIGTERM)
            try:
                self.service.wait(10)
            except subprocess.TimeoutExpired:
                self.service.kill()
                self.service.wait()
        self("system", "reset", "--force", check=False)
        with open("/proc/self/mountinfo") as f:
            mounts = [line.split()[4] for line in f]
        for m in sorted((m for m in mounts if m.startswith(str(self.tmp))), key=len, reverse=True):
            _run(["umount", "-l", m])


@contextlib.contextmanager
def podman_session(log: Any) -> Iterator[tuple[Podman, dict[str, Any]]]:
    """A ready :class:`Podman` with the image imported; on exit, the host as it was before.
    The second value is filled with ``host_state_restored`` and, if not, what still differs."""
    before = HostState()
    info: dict[str, Any] = {}
    tmp = Path(tempfile.mkdtemp(prefix="envbox-bench-podman-"))
    pm = Podman(tmp)
    try:
        pm.import_image()
        info["version"] = pm("version", "--format", "{{.Client.Version}}").strip()
        info["runtime"] = "runc"
        info["network_backend"] = pm("info", "--format", "{{.Host.NetworkBackend}}", check=False).strip()
        yield pm, info
    finally:
        with contextlib.suppress(Exception):
            pm.close()
        before.restore()
        shutil.rmtree(tmp, ignore_errors=True)
        left = before.diff(HostState())
        info["host_state_restored"] = not left
        info["host_state_left"] = left
        if left:
            log("WARNING: podman left host state behind: " + "; ".join(left))


def run_container(pm: Podman, args: list[str], cmd: list[str], port: int, image: str = IMAGE
                  ) -> tuple[float, float]:  # fmt: skip
    """``podman run -d`` of ``cmd`` (``[]``: the image's own) in ``image`` until its port
    listens, then ``podman rm -f -t 0``; returns (start-to-ready, stop) in seconds."""
    from _measure import wait_accepting

    pidfile = pm.tmp / "pid"
    with contextlib.suppress(FileNotFoundError):
        pidfile.unlink()
    t0 = time.perf_counter()
    cid = pm("run", "-d", "--pidfile", str(pidfile), *args, image, *cmd).strip()
    pid = int(pidfile.read_text().strip())
    wait_accepting(pid, port)
    t1 = time.perf_counter()
    pm("rm", "--force", "--time", "0", cid)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def run_true(pm: Podman, args: list[str]) -> float:
    """``podman run --rm IMAGE true`` to completion: the figure usually quoted."""
    t0 = time.perf_counter()
    pm("run", "--rm", *args, IMAGE, "true")
    return time.perf_counter() - t0


def testcontainers_cycle(docker_host: str, port: int, limits: dict[str, Any]) -> tuple[float, float]:
    """testcontainers-python's ``DockerContainer``: start, an HTTP answer through the published
    port (its readiness, as a user would wait), stop; returns (start-to-ready, stop) seconds."""
    from testcontainers.core.container import DockerContainer  # type: ignore[import-not-found]

    c = (DockerContainer(IMAGE)
         .with_command(f"httpd -f -p {port} -h /www")
         .with_exposed_ports(port)
         .with_kwargs(mem_limit=_docker_memory(limits["memory"]), nano_cpus=int(limits["cpu"] * 1e9),
                      pids_limit=limits["pids"]))  # fmt: skip
    t0 = time.perf_counter()
    c.start()
    host_port = int(c.get_exposed_port(port))
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", host_port), timeout=1) as s:
                s.sendall(b"GET / HTTP/1.0\r\n\r\n")
                if s.recv(16).startswith(b"HTTP/"):
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            c.stop()
            raise TimeoutError("the testcontainers container never answered on its published port")
        time.sleep(0.001)
    t1 = time.perf_counter()
    c.stop()
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def _docker_memory(q: str) -> str:
    """``256Mi`` (envbox, Kubernetes style) as Docker writes it: ``256m``."""
    return q[:-2] + q[-2].lower() if q.endswith("i") else q


def testcontainers_env(docker_host: str) -> dict[str, str]:
    """What testcontainers-python needs to use podman's Docker API here (this host has a
    ``/.dockerenv``, which would otherwise make it look for a Docker gateway)."""
    return {"DOCKER_HOST": docker_host, "TESTCONTAINERS_CONNECTION_MODE": "docker_host",
            "TC_HOST": "127.0.0.1", "TESTCONTAINERS_RYUK_DISABLED": "true"}  # fmt: skip
