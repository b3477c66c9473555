"""Test images, built offline with the tools production uses, and cached between runs.

- :func:`busybox_layout`: an OCI layout (tag ``latest``) of one layer: ``/bin/busybox`` (static)
  with its applets as symlinks, ``/etc/passwd`` and ``/etc/group`` with ``root`` and ``app``
  (1000), ``/home/app`` owned by app, ``/www/index.html``; config Entrypoint ``/bin/busybox``, Cmd
  ``httpd -f -v -p 8080 -h /www``, Env, WorkingDir ``/www``, ExposedPorts ``8080/tcp``.
- :func:`redis_layout`: ``mmdebstrap --variant=apt --include=redis-server`` (Debian bookworm,
  from Debian's mirror: the one network access, cached) repacked with umoci; Cmd
  ``redis-server --protected-mode no``, User ``redis``, ExposedPorts ``6379/tcp``.
- :func:`postgres_layout`: ``mmdebstrap --variant=essential --include=postgresql`` (bookworm:
  PostgreSQL 15) without documentation, with :data:`POSTGRES_ENTRYPOINT`, which does what the
  official image's entrypoint does for what tests use of it; its config as the official image's:
  Entrypoint ``docker-entrypoint.sh``, Cmd ``postgres``, ``PGDATA=/var/lib/postgresql/data``,
  ExposedPorts ``5432/tcp``, StopSignal ``SIGINT``, and User ``postgres``.
- :func:`whiteout_layout`: busybox plus a layer that adds ``/data/{a,b}`` and ``/etc/motd``, and
  on top one that deletes ``/etc/motd`` (``.wh.motd``) and makes ``/data`` opaque
  (``.wh..wh..opq``) with a new ``/data/c``.
- :func:`busybox_archives`: ``skopeo copy`` of the busybox layout to ``oci-archive:`` and
  ``docker-archive:`` files.

The cache is ``$ENVBOX_TEST_IMAGES``, else ``~/.cache/envbox-test-images``, one directory per
:data:`VERSION` (bump it when a recipe changes). Each image is built in a temporary directory
and renamed into place under a ``filelock``, so parallel xdist workers build it once and a killed
build leaves nothing used. As root the tools run as they are; as another user, mmdebstrap runs in
its ``unshare`` mode and umoci as root of ``unshare --map-auto --map-root-user`` (the user's
subordinate ids), so the images' files keep their owners either way.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
from filelock import FileLock

__all__ = [
    "BUSYBOX_APPLETS",
    "VERSION",
    "busybox_archives",
    "busybox_layout",
    "cache_dir",
    "postgres_layout",
    "redis_layout",
    "whiteout_layout",
]

VERSION = "1"
BUSYBOX = "/bin/busybox"
BUSYBOX_APPLETS = ("sh", "httpd", "nc", "cat", "ls", "echo", "sleep", "id", "wget", "env", "ps",
                   "kill", "mkdir", "touch", "rm", "hostname", "true", "false", "whoami", "pwd",
                   "test", "stat", "grep", "head")  # fmt: skip
PASSWD = "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n"
GROUP = "root:x:0:\napp:x:1000:\n"


def cache_dir() -> Path:
    base = os.environ.get("ENVBOX_TEST_IMAGES") or os.path.expanduser("~/.cache/envbox-test-images")
    path = Path(base) / VERSION
    path.mkdir(parents=True, exist_ok=True)
    return path


def _run(*argv: str, cwd: str | Path | None = None, root: bool = True) -> None:
    """A build command; as non-root, run as root of a user namespace with the subordinate ids."""
    cmd = list(argv)
    if root and os.geteuid() != 0:
        cmd = ["unshare", "--map-auto", "--map-root-user", *cmd]
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")


def _cached(name: str, build: Callable[[Path], None]) -> Path:
    """``cache_dir()/name``, built by ``build(tmpdir)`` once (across processes) if missing."""
    cache = cache_dir()
    final = cache / name
    if final.exists():
        return final
    with FileLock(str(cache / f"{name}.lock")):
        if final.exists():
            return final
        work = cache / f"{name}.tmp"
        if work.exists():  # a killed build: its files may belong to subordinate ids
            _run("rm", "-rf", str(work))
        work.mkdir()
        build(work)
        os.rename(work / "out", final)
        _run("rm", "-rf", str(work))
    return final


def _layout_from_tree(layout: Path, bundle: Path, fill: Callable[[Path], None], config: list[str]) -> None:
    """umoci init/new/unpack, ``fill(rootfs)``, umoci repack/config: an image tagged ``latest``."""
    image = f"{layout}:latest"
    _run("umoci", "init", "--layout", str(layout))
    _run("umoci", "new", "--image", image)
    _run("umoci", "unpack", "--image", image, str(bundle))
    fill(bundle / "rootfs")
    _run("umoci", "repack", "--image", image, str(bundle))
    _run("umoci", "config", "--image", image, *config)
    _run("umoci", "gc", "--layout", str(layout))


def _busybox_script(rootfs: Path) -> str:
    """A shell script that fills ``rootfs`` (run as root of the namespace, so chown works)."""
    links = " ".join(BUSYBOX_APPLETS)
    r = str(rootfs)
    return (
        f"set -e; cd {r}; mkdir -p bin etc home/app www root tmp; chmod 1777 tmp; "
        f"cp {BUSYBOX} bin/busybox; chmod 755 bin/busybox; "
        f"for a in {links}; do ln -s busybox bin/$a; done; "
        f"printf '{PASSWD}' > etc/passwd; printf '{GROUP}' > etc/group; "
        "echo 'hello from busybox' > www/index.html; "
        "echo app > home/app/.profile; chown -R 1000:1000 home/app; chmod 700 home/app"
    )


def _busybox_config() -> list[str]:
    return ["--config.entrypoint", "/bin/busybox",
            *[a for c in ("httpd", "-f", "-v", "-p", "8080", "-h", "/www") for a in ("--config.cmd", c)],
            "--config.env", "PATH=/bin", "--config.env", "GREETING=hello from the image",
            "--config.workingdir", "/www", "--config.exposedports", "8080/tcp"]  # fmt: skip


def busybox_layout() -> Path:
    """The busybox OCI layout (tag ``latest``)."""
    if not os.path.exists(BUSYBOX):
        pytest.skip(f"{BUSYBOX} is missing: install busybox-static")

    def build(work: Path) -> None:
        def fill(rootfs: Path) -> None:
            _run("sh", "-c", _busybox_script(rootfs))

        _layout_from_tree(work / "out", work / "bundle", fill, _busybox_config())

    return _cached("busybox", build)


#: /usr/local/bin/redis-server of the test image, before Debian's in PATH (as in the official one)
REDIS_SERVER = r"""#!/bin/sh
# The official redis image builds redis-server with protected mode off by default ("unnecessary
# in the context of Docker", docker-library/redis), so that a command naming no --protected-mode
# still serves other containers. Debian's has it on: this gives the official default, last (redis
# reads --version and a config file first), unless the command line names it.
case " $* " in
    *" --protected-mode "*) exec /usr/bin/redis-server "$@" ;;
esac
exec /usr/bin/redis-server "$@" --protected-mode no
"""

#: the image's redis user and group become 999, with what they own
REDIS_USER_999 = r"""set -eu
r=$1
uid=$(awk -F: '$1 == "redis" {print $3}' "$r/etc/passwd")
gid=$(awk -F: '$1 == "redis" {print $3}' "$r/etc/group")
if awk -F: '$3 == 999' "$r/etc/passwd" "$r/etc/group" | grep -q .; then echo "999 is taken" >&2; exit 1; fi
find "$r" -xdev -uid "$uid" -exec chown -h 999 {} +
find "$r" -xdev -gid "$gid" -exec chgrp -h 999 {} +
sed -i -E "s/^redis:x:$uid:$gid:/redis:x:999:999:/" "$r/etc/passwd"
sed -i -E "s/^redis:x:$gid:/redis:x:999:/" "$r/etc/group"
"""


def redis_layout() -> Path:
    """The Debian redis-server OCI layout (tag ``latest``), made like the official image where
    tests and docs rely on it (the redis user is 999:999, protected mode is off unless asked for);
    about 30 s to build, once."""
    for tool in ("mmdebstrap", "umoci"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is missing: apt-get install {tool}")

    def build(work: Path) -> None:
        rootfs_tar = work / "rootfs.tar"
        # As a user: mmdebstrap's own unshare mode (it needs the subordinate ids, as we do).
        _run("mmdebstrap", "--quiet", "--variant=apt", "--include=redis-server", "--format=tar",
             "bookworm", str(rootfs_tar), root=False)  # fmt: skip

        def fill(rootfs: Path) -> None:
            # Device nodes left out: a user namespace cannot make them, a sandbox brings its own.
            _run("tar", "-xpf", str(rootfs_tar), "--numeric-owner", "--exclude=./dev/*", "-C", str(rootfs))
            # As in the official image: the redis user is 999:999 (the docs declare that user),
            # redis-server defaults to protected mode off. As root (of a user namespace): the
            # rootfs belongs to it.
            (work / "redis-server").write_text(REDIS_SERVER)
            _run("install", "-m", "0755", str(work / "redis-server"), str(rootfs / "usr/local/bin"))
            _run("sh", "-c", REDIS_USER_999, "sh", str(rootfs))

        config = [*[a for c in ("redis-server", "--protected-mode", "no", "--save", "")
                    for a in ("--config.cmd", c)],
                  "--config.user", "redis", "--config.exposedports", "6379/tcp",
                  "--config.workingdir", "/var/lib/redis",
                  "--config.env", "PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]  # fmt: skip
        _layout_from_tree(work / "out", work / "bundle", fill, config)
        rootfs_tar.unlink()

    return _cached("redis-3", build)  # -3: made like the official image


POSTGRES_ENTRYPOINT = r"""#!/bin/sh
# docker-entrypoint.sh: what the official postgres image's entrypoint (docker-library/postgres)
# does, for what tests use of it. On the first start, with an empty $PGDATA: initdb with
# POSTGRES_USER (default postgres) and POSTGRES_PASSWORD, listen on every address, password
# authentication (POSTGRES_HOST_AUTH_METHOD, default scram-sha-256) from the network, the
# database POSTGRES_DB (default: the user's name). Then exec the server, as the postgres user.
# Not here: /docker-entrypoint-initdb.d, POSTGRES_INITDB_WALDIR, *_FILE secrets.
set -eu

# Options alone ("-c fsync=off") are the server's, as with the official image.
case "${1:-}" in -*) set -- postgres "$@" ;; esac

if [ "$1" = postgres ]; then
    if [ "$(id -u)" = 0 ]; then
        # Started as root (user = "root"): own what the server writes, then become postgres.
        mkdir -p "$PGDATA" /run/postgresql
        chown postgres:postgres "$PGDATA" /run/postgresql
        chmod 700 "$PGDATA"
        exec setpriv --reuid=postgres --regid=postgres --init-groups "$0" "$@"
    fi
    if [ ! -s "$PGDATA/PG_VERSION" ]; then
        if [ -z "${POSTGRES_PASSWORD:-}" ] && [ "${POSTGRES_HOST_AUTH_METHOD:-}" != trust ]; then
            echo "error: database is uninitialized and superuser password is not specified." >&2
            echo "  Set POSTGRES_PASSWORD, or POSTGRES_HOST_AUTH_METHOD=trust (no password at all)." >&2
            exit 1
        fi
        user=${POSTGRES_USER:-postgres}
        db=${POSTGRES_DB:-$user}
        mkdir -p "$PGDATA"
        chmod 700 "$PGDATA"
        if [ -n "${POSTGRES_PASSWORD:-}" ]; then
            pwfile=$(mktemp)
            printf '%s\n' "$POSTGRES_PASSWORD" > "$pwfile"
            # shellcheck disable=SC2086  # a list of words, as upstream
            initdb --username="$user" --pwfile="$pwfile" -D "$PGDATA" ${POSTGRES_INITDB_ARGS:-}
            rm -f "$pwfile"
        else
            # shellcheck disable=SC2086
            initdb --username="$user" -D "$PGDATA" ${POSTGRES_INITDB_ARGS:-}
        fi
        printf "\nlisten_addresses = '*'\n" >> "$PGDATA/postgresql.conf"
        printf '\nhost all all all %s\n' "${POSTGRES_HOST_AUTH_METHOD:-scram-sha-256}" \
            >> "$PGDATA/pg_hba.conf"
        if [ "$db" != postgres ]; then
            # As upstream: a server on the socket only (not yet reachable over TCP), psql, stop.
            pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -w start
            echo 'CREATE DATABASE :"db";' |
                psql -X -q -v ON_ERROR_STOP=1 -U "$user" -d postgres --set db="$db"
            pg_ctl -D "$PGDATA" -m fast -w stop
        fi
        echo "PostgreSQL init process complete; ready for start up."
    fi
fi
exec "$@"
"""


def _postgres_versions(rootfs_tar: Path) -> tuple[str, str]:
    """(major, Debian package version) of the PostgreSQL server in a rootfs tarball: the image's
    ``PG_MAJOR`` and ``PG_VERSION``, as the official image has them."""
    with tarfile.open(rootfs_tar) as tf:
        majors = {m.name.split("/")[4] for m in tf if m.name.startswith("./usr/lib/postgresql/")
                  and m.name.count("/") >= 4}  # fmt: skip
        status = tf.extractfile("./var/lib/dpkg/status")
        assert status is not None and len(majors) == 1, majors
        major = majors.pop()
        for para in status.read().decode().split("\n\n"):
            if f"Package: postgresql-{major}\n" in para:
                return major, next(line[9:] for line in para.splitlines() if line.startswith("Version: "))
    raise RuntimeError(f"postgresql-{major} is not in the rootfs' dpkg status")


def postgres_layout() -> Path:
    """The Debian PostgreSQL OCI layout (tag ``latest``), as the official image behaves; about a
    minute to build, once."""
    for tool in ("mmdebstrap", "umoci"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is missing: apt-get install {tool}")

    def build(work: Path) -> None:
        rootfs_tar = work / "rootfs.tar"
        # Essential packages plus the server, as small as Debian allows: no apt (an image is not
        # upgraded in place); no documentation, man pages or translations (copyrights kept), as
        # Debian's slim images (PostgreSQL's own man pages stay: update-alternatives needs them);
        # no cluster made by the package's postinst (the entrypoint makes one in $PGDATA).
        # libLLVM (JIT, 105 MB) is a hard dependency of postgresql-15: it stays.
        _run("mmdebstrap", "--quiet", "--variant=essential", "--include=postgresql",
             *[f"--dpkgopt={o}" for o in (
                 "path-exclude=/usr/share/doc/*", "path-include=/usr/share/doc/*/copyright",
                 "path-exclude=/usr/share/man/*", "path-exclude=/usr/share/info/*",
                 "path-exclude=/usr/share/locale/*")],
             "--customize-hook=rm -rf \"$1\"/etc/postgresql/* \"$1\"/var/lib/postgresql/*",
             "--format=tar", "bookworm", str(rootfs_tar), root=False)  # fmt: skip
        major, version = _postgres_versions(rootfs_tar)
        entrypoint = work / "docker-entrypoint.sh"  # the name the official image gives it
        entrypoint.write_text(POSTGRES_ENTRYPOINT)

        def fill(rootfs: Path) -> None:
            _run("tar", "-xpf", str(rootfs_tar), "--numeric-owner", "--exclude=./dev/*", "-C", str(rootfs))
            # As the official image: $PGDATA and the socket's directory belong to postgres.
            _run("sh", "-c", f"set -e; install -m 755 {entrypoint} {rootfs}/usr/local/bin/; "
                 f"/usr/sbin/chroot {rootfs} sh -c 'mkdir -p /var/lib/postgresql/data /run/postgresql; "
                 "chown postgres:postgres /var/lib/postgresql/data /run/postgresql; "
                 "chmod 1777 /var/lib/postgresql/data; chmod 3777 /run/postgresql'")  # fmt: skip

        config = ["--config.entrypoint", "docker-entrypoint.sh", "--config.cmd", "postgres",
                  "--config.user", "postgres", "--config.exposedports", "5432/tcp",
                  "--config.stopsignal", "SIGINT", "--config.volume", "/var/lib/postgresql/data",
                  "--config.env", f"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:"
                                  f"/usr/lib/postgresql/{major}/bin",
                  "--config.env", "LANG=C.UTF-8", "--config.env", f"PG_MAJOR={major}",
                  "--config.env", f"PG_VERSION={version}",
                  "--config.env", "PGDATA=/var/lib/postgresql/data"]  # fmt: skip
        _layout_from_tree(work / "out", work / "bundle", fill, config)
        rootfs_tar.unlink()

    return _cached("postgres", build)


def _layer_tar(path: Path, entries: list[tuple[str, bytes | None]]) -> None:
    """A layer: (name, content) files, None content for a directory."""
    with tarfile.open(path, "w") as tf:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.mtime = 1700000000
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tf.addfile(info)
            else:
                info.size, info.mode = len(data), 0o644
                tf.addfile(info, io.BytesIO(data))


def whiteout_layout() -> Path:
    """Busybox + a layer adding ``/data/{a,b}`` and ``/etc/motd`` + a layer deleting ``/etc/motd``
    and making ``/data`` opaque with a new ``/data/c``."""
    base = busybox_layout()

    def build(work: Path) -> None:
        shutil.copytree(base, work / "out", symlinks=True)
        image = f"{work / 'out'}:latest"
        lower, upper = work / "lower.tar", work / "upper.tar"
        _layer_tar(lower, [("data", None), ("data/a", b"a\n"), ("data/b", b"b\n"),
                           ("etc", None), ("etc/motd", b"motd\n")])  # fmt: skip
        _layer_tar(upper, [("data", None), ("data/.wh..wh..opq", b""), ("data/c", b"c\n"),
                           ("etc", None), ("etc/.wh.motd", b"")])  # fmt: skip
        for layer in (lower, upper):
            _run("umoci", "raw", "add-layer", "--image", image, str(layer), root=False)

    return _cached("whiteout", build)


def busybox_archives() -> dict[str, Path]:
    """``{"oci-archive": FILE, "docker-archive": FILE}`` of the busybox image."""
    if shutil.which("skopeo") is None:
        pytest.skip("skopeo is missing: apt-get install skopeo")
    base = busybox_layout()

    def build(work: Path) -> None:
        out = work / "out"
        out.mkdir()
        policy = work / "policy.json"
        policy.write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
        for transport, dest in (("oci-archive", "busybox.oci.tar:latest"),
                                ("docker-archive", "busybox.docker.tar:envbox/busybox:latest")):  # fmt: skip
            _run("skopeo", "--policy", str(policy), "copy", "--quiet", f"oci:{base}:latest",
                 f"{transport}:{out / dest}", root=False)  # fmt: skip

    archives = _cached("archives", build)
    return {"oci-archive": archives / "busybox.oci.tar", "docker-archive": archives / "busybox.docker.tar"}


# Session fixtures: import them into a test module (or a conftest) to use them.


@pytest.fixture(scope="session")
def busybox_image() -> Path:
    return busybox_layout()


@pytest.fixture(scope="session")
def redis_image() -> Path:
    return redis_layout()


@pytest.fixture(scope="session")
def postgres_image() -> Path:
    return postgres_layout()


@pytest.fixture(scope="session")
def whiteout_image() -> Path:
    return whiteout_layout()


@pytest.fixture(scope="session")
def busybox_archive_files() -> dict[str, Path]:
    return busybox_archives()
