"""Image services on the real kernel: the image's layers under an overlay are the service's root.

The image is built by hand from the host's static busybox (no registry, no store): layer 1 holds
busybox and its links, /etc/passwd and /etc/group; layer 2 a whiteout over a file of layer 1 and
an opaque directory. Everything is checked from inside the service, and on disk afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pytest_envbox import ConfigError, Environment, Service, ServiceFailed, probe
from pytest_envbox.engine.client import rootless
from pytest_envbox.engine.imageplan import PreparedImage
from pytest_envbox.images.imageconfig import ImageConfig
from pytest_envbox.supervisor import records
from pytest_envbox.wait import Deadline, wait_until
from tests.kernel import alive, ns_inode

BUSYBOX = "/usr/bin/busybox"
APPLETS = ("sh", "sleep", "cat", "ls", "id", "echo", "test", "touch", "mkdir", "env", "pwd",
           "readlink", "httpd", "wget", "chown", "chmod", "grep", "stat")  # fmt: skip
REF = "oci:/images/busybox-test:1"

pytestmark = pytest.mark.skipif(not os.path.isfile(BUSYBOX), reason="needs the host's busybox")


def eventually(cond: object, timeout: float = 10.0) -> bool:
    return wait_until(lambda: True if cond() else None, Deadline(timeout)) is True  # type: ignore[operator]


def _put(root: Path, rel: str, content: str, mode: int = 0o644) -> None:
    p = root / rel.lstrip("/")
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(content)
    p.chmod(mode)


def build_layers(base: Path) -> list[Path]:
    """The two layers (bottom first), as the store would unpack them."""
    l1, l2 = base / "layer1", base / "layer2"
    (l1 / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, l1 / "bin/busybox")
    for name in APPLETS:
        os.symlink("busybox", l1 / "bin" / name)
    os.symlink("bin", l1 / "sbin")  # reached through a link inside the image
    _put(l1, "/etc/passwd", "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n")
    _put(l1, "/etc/group", "root:x:0:\napp:x:1000:\nstaff:x:50:app\n")
    _put(l1, "/etc/marker", "from the image\n")
    _put(l1, "/etc/gone", "hidden by layer 2\n")
    _put(l1, "/opt/lib/a", "a\n")
    _put(l1, "/www/index.html", "hello from web\n")
    for d in ("root", "tmp", "data"):
        (l1 / d).mkdir(mode=0o1777 if d == "tmp" else 0o755)
    (l1 / "tmp").chmod(0o1777)
    (l2 / "etc").mkdir(parents=True)
    try:
        os.mknod(l2 / "etc/gone", stat.S_IFCHR, os.makedev(0, 0))
    except PermissionError as e:
        pytest.skip(f"cannot make a whiteout here ({e}); the kernel allows it unprivileged since 5.8")
    (l2 / "opt/lib").mkdir(parents=True)
    _put(l2, "/opt/lib/c", "c\n")
    xattr = "trusted.overlay.opaque" if os.geteuid() == 0 else "user.overlay.opaque"
    os.setxattr(l2 / "opt/lib", xattr, b"y")
    return [l1, l2]


def config(**c: object) -> ImageConfig:
    doc = {"config": {"Env": ["PATH=/bin:/sbin", "FROM_IMAGE=yes"], "Cmd": ["sleep", "1000"], **c}}
    return ImageConfig.from_json(json.dumps(doc).encode())


def image(tmp_path: Path, **c: object) -> PreparedImage:
    base = tmp_path / "img"
    layers = build_layers(base) if not base.exists() else [base / "layer1", base / "layer2"]
    return PreparedImage(REF, config(**c), tuple(layers), tmp_path / "rw", userxattr=rootless())


def tree(root: Path) -> str:
    """Every path, mode, owner and content digest under ``root``: to prove nothing changed."""
    h = hashlib.sha256()
    for dirpath, dirs, files in os.walk(root):
        for name in sorted(dirs + files):
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            h.update(f"{p} {st.st_mode} {st.st_uid} {st.st_size} {st.st_mtime_ns}\n".encode())
            if stat.S_ISREG(st.st_mode):
                h.update(Path(p).read_bytes())
    return h.hexdigest()


def overlays_of(path: Path) -> list[str]:
    """Overlay mounts anywhere on the host whose options name ``path`` (any process's view)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            text = Path(f"/proc/{pid}/mountinfo").read_text()
        except OSError:
            continue
        found += [line for line in text.splitlines() if " overlay " in line and str(path) in line]
    return found


def sh(h: object, script: str) -> str:
    r = h.exec(["sh", "-c", script])  # type: ignore[attr-defined]
    assert r.returncode == 0, r.stderr
    return str(r.stdout)


def test_the_service_sees_the_image_not_the_host(tmp_path: Path) -> None:
    img = image(tmp_path, WorkingDir="/work")
    hostdir = tmp_path / "host"
    hostdir.mkdir()
    (hostdir / "f").write_text("from the host\n")
    layers_before = tree(tmp_path / "img")
    svc = Service("app", image=REF,
                  mounts=[{"source": str(hostdir), "target": "/mnt/host", "readonly": False}])
    with Environment([svc, Service("peer", image=REF)], images={"app": img, "peer": img},
                     rootdir=tmp_path) as env:  # fmt: skip
        app = env["app"]
        assert sh(app, "cat /etc/marker") == "from the image\n"
        r = app.exec(["test", "-e", "/usr/bin/python3"])
        assert r.returncode == 1  # the host has it; the image does not
        assert app.exec(["test", "-e", "/etc/gone"]).returncode == 1  # the whiteout
        assert sh(app, "ls /opt/lib") == "c\n"  # the opaque directory hides layer 1's a
        hosts = sh(app, "cat /etc/hosts")
        assert f"{env['peer'].ip}\tpeer" in hosts and f"{app.ip}\tapp" in hosts
        assert sh(app, "cat /etc/hostname") == "app\n"
        assert sh(app, "readlink /proc/self/ns/pid").strip() == ns_inode(app.pid, "pid")  # type: ignore[arg-type]
        assert sh(app, "readlink /proc/self/ns/pid").strip() != ns_inode(os.getpid(), "pid")
        assert sh(app, "cat /mnt/host/f") == "from the host\n"
        env_lines = sh(app, "env").splitlines()
        assert {"FROM_IMAGE=yes", "PATH=/bin:/sbin", "HOSTNAME=app", "HOME=/root"} <= set(env_lines)
        assert not any(k.startswith(("LANG=", "TMPDIR=")) for k in env_lines)
        assert sh(app, "pwd") == "/work\n"  # the image's WorkingDir, made in the writable layer
        # Writes go to the writable layer: root writing to /bin leaves the layer untouched.
        sh(app, "echo new > /bin/x; echo tmp > /tmp/private; echo f > /mnt/host/back")
        assert sh(env["peer"], "test ! -e /tmp/private && test ! -e /bin/x && echo ok") == "ok\n"
        # /tmp is the sandbox's private tmpfs, as for host programs (API.md 6), not the layer
        tmp_mounts = [ln.split() for ln in sh(app, "cat /proc/self/mountinfo").splitlines()]
        assert [m[m.index("-") + 1] for m in tmp_mounts if m[4] == "/tmp"] == ["tmpfs"]
        assert not [p for p in (tmp_path / "rw").rglob("private")]
        assert not (tmp_path / "img/layer1/bin/x").exists()
        rw = [p for p in (tmp_path / "rw").glob("*/*") if p.is_dir()]
        assert len(rw) == 2
        assert [(p / "upper/bin/x").read_text() for p in rw if p.name.endswith("-app")] == ["new\n"]
        assert [p for p in rw if (p / "upper/bin/x").exists()] == [p for p in rw if p.name.endswith("-app")]
        assert (hostdir / "back").read_text() == "f\n"  # a mount is the host's directory
        assert overlays_of(tmp_path)
    assert not [p for p in (tmp_path / "rw").rglob("*")], "a writable layer was left behind"
    assert not overlays_of(tmp_path)
    assert (hostdir / "back").exists()
    assert tree(tmp_path / "img") == layers_before  # the layers' files never changed


def test_the_writable_layer_survives_restart_stop_and_start(tmp_path: Path) -> None:
    img = image(tmp_path)
    with Environment([Service("db", image=REF)], images={"db": img}, rootdir=tmp_path) as env:
        db = env["db"]
        sh(db, "echo kept > /data/file")
        db.restart()
        assert sh(db, "cat /data/file") == "kept\n"
        db.stop()
        db.start()
        assert sh(db, "cat /data/file") == "kept\n"
    assert not list((tmp_path / "rw").rglob("*"))


def test_user_from_the_image_passwd(tmp_path: Path) -> None:
    img = image(tmp_path, User="app")
    with Environment([Service("u", image=REF), Service("r", image=REF, user="0")],
                     images={"u": img, "r": img}, rootdir=tmp_path) as env:  # fmt: skip
        assert sh(env["u"], "id") == "uid=1000(app) gid=1000(app) groups=50(staff),1000(app)\n"
        assert sh(env["u"], "echo $HOME") == "/home/app\n"
        assert sh(env["r"], "id -u") == "0\n"


def test_a_user_with_a_group_by_name_as_docker_writes_it(tmp_path: Path) -> None:
    img = image(tmp_path)
    with Environment([Service("g", image=REF, user="app:staff")], images={"g": img},
                     rootdir=tmp_path) as env:  # fmt: skip
        assert sh(env["g"], "id") == "uid=1000(app) gid=50(staff) groups=50(staff)\n"
    with pytest.raises(ConfigError, match="no group 'wheel' in the image's /etc/group"):
        Environment([Service("g", image=REF, user="app:wheel")], images={"g": img}, rootdir=tmp_path)


def test_unknown_user_or_program_fails_before_anything_starts(tmp_path: Path) -> None:
    img = image(tmp_path)
    with pytest.raises(ConfigError, match=r"'nobody2'.*image's /etc/passwd"):
        Environment([Service("u", image=REF, user="nobody2")], images={"u": img}, rootdir=tmp_path)
    with pytest.raises(ConfigError, match=rf"'redis-server' is not an executable file in the image {REF} on "
                                          "PATH"):  # fmt: skip
        Environment([Service("u", ["redis-server"], image=REF)], images={"u": img}, rootdir=tmp_path)
    assert not (tmp_path / "rw").exists()


def test_stop_signal_from_the_image(tmp_path: Path) -> None:
    script = ('trap "echo got-quit; exit 0" QUIT; trap "echo got-term; exit 3" TERM; echo up; '
              "while :; do sleep 0.05; done")
    img = image(tmp_path, StopSignal="SIGQUIT", Cmd=["sh", "-c", script])
    with Environment([Service("q", image=REF, ready=probe.log("up"))], images={"q": img},
                     rootdir=tmp_path) as env:  # fmt: skip
        q = env["q"]
        q.stop()
        assert q.returncode == 0
        assert "got-quit" in q.logs() and "got-term" not in q.logs()


def test_a_service_reaches_another_by_name(tmp_path: Path) -> None:
    img = image(tmp_path)
    web = Service("web", ["httpd", "-f", "-p", "8000", "-h", "/www"], image=REF, ports=[8000],
                  ready=probe.tcp(8000))
    with Environment([web, Service("client", image=REF, depends_on=["web"])],
                     images={"web": img, "client": img}, rootdir=tmp_path) as env:  # fmt: skip
        assert sh(env["client"], "wget -qO- http://web:8000/index.html") == "hello from web\n"
        assert env["web"].http.get("/index.html").text == "hello from web\n"


INNER = """
    import json, os, sys, threading
    from pathlib import Path
    sys.path.insert(0, os.environ["TESTS"])
    from pytest_envbox import Environment, Service
    from pytest_envbox.engine.client import get_supervisor
    from pytest_envbox.engine.imageplan import PreparedImage
    from pytest_envbox.images.imageconfig import ImageConfig

    tmp = Path(os.environ["TMP"])
    script = ("mkdir -p /sub/d && echo x > /sub/d/f && chown -R 1000:1000 /sub && chmod 700 /sub/d"
              " && echo up && sleep 1000")
    doc = {"config": {"Env": ["PATH=/bin"], "Cmd": ["sh", "-c", script]}}
    cfg = ImageConfig.from_json(json.dumps(doc).encode())
    img = PreparedImage("oci:/x", cfg, (tmp / "img/layer1", tmp / "img/layer2"), tmp / "rw",
                        userxattr=os.environ["USERXATTR"] == "1")
    env = Environment([Service("victim", image="oci:/x")], images={"victim": img}, rootdir=tmp)
    env.open()
    env["victim"].wait_for_log("up")
    Path(os.environ["REPORT"] + ".tmp").write_text(f"{env['victim'].pid} {get_supervisor().pid}")
    os.rename(os.environ["REPORT"] + ".tmp", os.environ["REPORT"])
    threading.Event().wait(120)
"""


@pytest.mark.parametrize("kill_supervisor", [False, True], ids=["test-process", "supervisor-too"])
def test_nothing_remains_after_sigkill(tmp_path: Path, kill_supervisor: bool) -> None:
    """SIGKILL of the test process: its supervisor removes the writable layer. SIGKILL of both:
    the run's record lists the layer, and the janitor (``envbox clean``) removes it, files of
    other users (subordinate ids, rootless) included."""
    image(tmp_path)  # the layers
    report = tmp_path / "report"
    env = {**os.environ, "REPORT": str(report), "TMP": str(tmp_path), "USERXATTR": "1" if rootless() else "0",
           "TESTS": str(Path(__file__).parents[2])}  # fmt: skip
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(INNER)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        assert eventually(lambda: report.exists() or child.poll() is not None, 60)
        assert report.exists(), child.communicate()[0]
        pid, sup = map(int, report.read_text().split())
        layers = list((tmp_path / "rw").glob("*/*"))
        assert len(layers) == 1
        # Another user's files (a subordinate id, rootless): only a user namespace deletes them.
        assert os.stat(layers[0] / "upper/sub").st_uid not in (0, os.getuid())
        if kill_supervisor:
            def listed() -> bool:
                return any(rec and str(layers[0]) in rec.get("rw", []) for _, rec in records.runs())

            assert eventually(listed), "the run's record does not list the writable layer"
            os.kill(sup, signal.SIGKILL)
        child.kill()
        child.wait()
        assert eventually(lambda: not alive(pid) and not alive(sup), 20)
        if kill_supervisor:
            assert layers[0].exists()  # nobody removed it yet: the janitor's job
            records.clean_stale()
        assert not list((tmp_path / "rw").rglob("*")), "the writable layer was left behind"
        assert not overlays_of(tmp_path)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def _stack(tmp_path: Path, names: list[str]) -> PreparedImage:
    """The test image with one more layer per name (each adds ``/etc/layerN``), on top."""
    img = image(tmp_path)
    extra = []
    for i, name in enumerate(names):
        d = tmp_path / "img" / name
        (d / "etc").mkdir(parents=True)
        (d / "etc" / f"layer{i}").write_text(f"{i}\n")
        extra.append(d)
    layers = (*img.layers, *extra)
    assert len(":".join(str(p) for p in layers)) > 4096
    return PreparedImage(REF, img.config, layers, img.rw_root, img.userxattr)


def test_a_stack_whose_options_exceed_a_page(tmp_path: Path) -> None:
    """mount(2) takes one page of options; past it, the layers go one by one (fsconfig,
    Linux 6.8), or before 6.8 by names relative to the store's layer directory."""
    names = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(56)]  # as the store names them
    big = _stack(tmp_path, names)
    with Environment([Service("big", image=REF)], images={"big": big}, rootdir=tmp_path) as env:
        assert sh(env["big"], "cat /etc/layer0 /etc/layer55 /etc/marker") == "0\n55\nfrom the image\n"


def test_a_stack_past_a_page_even_relative(tmp_path: Path) -> None:
    """Past a page even by relative names: mounted with lowerdir+ where the kernel has it
    (6.8), else a clear error naming the layer count and the fix."""
    big = _stack(tmp_path, [f"{i:02d}" + "x" * 120 for i in range(40)])
    major, minor = (int(x) for x in re.match(r"(\d+)\.(\d+)", os.uname().release).groups())  # type: ignore[union-attr]
    if (major, minor) >= (6, 8):
        with Environment([Service("big", image=REF)], images={"big": big}, rootdir=tmp_path) as env:
            assert sh(env["big"], "cat /etc/layer0 /etc/layer39") == "0\n39\n"
    else:
        with pytest.raises(ServiceFailed, match=r"42 layers, too many for one mount option page.*"
                                                r"lowerdir\+.*flatten the image"):  # fmt: skip
            Environment([Service("big", image=REF)], images={"big": big}, rootdir=tmp_path).open()
    assert not overlays_of(tmp_path)
