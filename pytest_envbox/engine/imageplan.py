"""Plans for image services: the declaration checked against its image instead of the host.

The image's config gives defaults (:func:`~pytest_envbox.images.imageconfig.apply_image_defaults`)
and its files answer what the host's would for a host program: the program on ``PATH``, the user
in ``/etc/passwd`` (:mod:`pytest_envbox.images.lookup`). Mount sources are still host paths,
checked here as for any service. Nothing starts; a bad declaration is a ``ConfigError``.

:class:`PreparedImage` is what the engine needs of an image once it is in the store (pulled and
unpacked); the pull code makes it, and ``Environment(images=...)`` takes one per service.
"""

from __future__ import annotations

import fnmatch
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from pytest_envbox.engine.client import rootless
from pytest_envbox.errors import ConfigError
from pytest_envbox.images.imageconfig import ImageConfig, apply_image_defaults, image_argv, parse_signal
from pytest_envbox.images.lookup import find_executable, resolve_user
from pytest_envbox.sandbox.plan import NOFILE, ImageRoot, SandboxPlan
from pytest_envbox.spec import Service
from pytest_envbox.validate import real_source

__all__ = ["DEFAULT_PATH", "PreparedImage", "plan_for_image", "prepare_image_service", "rw_dir"]

#: Docker's ``PATH`` for an image whose config sets none.
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

#: This process's share of the writable layers' directory: random, so that a killed run whose
#: pid comes again never finds its predecessor's layers (and their data) as its own.
_RUN_TOKEN = f"{os.getpid()}-{secrets.token_hex(4)}"


@dataclass(frozen=True)
class PreparedImage:
    """An image ready to run: its config, its unpacked layers (bottom first), where writable
    layers go (the store's ``rw_root``), and whether the layers use ``user.overlay.*`` (rootless)."""

    reference: str
    config: ImageConfig
    layers: tuple[Path, ...]
    rw_root: Path
    userxattr: bool = False


def rw_dir(rw_root: Path, env_id: str, service: str) -> str:
    """The writable layer of ``service`` in environment ``env_id``: under this run's token."""
    return os.path.join(os.path.realpath(rw_root), _RUN_TOKEN, f"{env_id}-{service}")


def prepare_image_service(spec: Service, image: PreparedImage, rootdir: Path, env_id: str
                          ) -> tuple[Service, SandboxPlan]:  # fmt: skip
    """The service with its image's defaults, and its plan: what ``Environment`` calls."""
    spec = apply_image_defaults(spec, image.config)
    plan = plan_for_image(spec, rootdir, image.config, list(image.layers),
                          rw_dir(image.rw_root, env_id, spec.name), image.userxattr,
                          image.reference)  # fmt: skip
    return spec, plan


def _env(spec: Service, home: str) -> dict[str, str]:
    """Docker's base (``PATH`` where the image sets none, ``HOSTNAME``, ``HOME``), ``pass_env``
    matches, then ``env`` (which holds the image's ``Env`` under the declaration's). No ``LANG``
    or ``TMPDIR`` a host program gets: an image sets its own, or goes without, as in Docker."""
    env = {"PATH": DEFAULT_PATH, "HOSTNAME": spec.name, "HOME": home}
    for pattern in spec.pass_env:
        for key, value in os.environ.items():
            if fnmatch.fnmatchcase(key, pattern):
                env[key] = value
    env.update(spec.env)
    return env


def plan_for_image(spec: Service, rootdir: Path, config: ImageConfig, layers: list[Path],
                   rw: str, userxattr: bool, reference: str) -> SandboxPlan:  # fmt: skip
    """Check an image service (already through ``apply_image_defaults``) and plan it."""
    layers = [Path(os.path.realpath(p)) for p in layers]  # the sandbox refuses links on the way
    user = spec.user if spec.user is not None else config.user
    uid, gid, groups, home = resolve_user(layers, user, service=spec.name)
    if rootless() and uid == 0 and set(groups) <= {0}:
        groups = []  # setgroups may be denied in the user namespace; root needs none
    env = _env(spec, home)
    cwd = spec.cwd or "/"
    if not cwd.startswith("/"):
        raise ConfigError(f"{cwd!r} is not an absolute path; with an image, cwd is a directory "
                          "inside the image (made if the image lacks it)",
                          service=spec.name, key="cwd")  # fmt: skip
    real_root = os.path.realpath(rootdir)
    mounts = [(real_source(m.source, real_root, spec.name, f"mounts[{i}].source"), m.target,
               m.readonly) for i, m in enumerate(spec.mounts)]  # fmt: skip
    argv = image_argv(spec, config)
    argv0 = argv[0]
    executable = find_executable(layers, argv0, env["PATH"], cwd=cwd) or ""
    if not executable:
        inside = argv0 if argv0.startswith("/") else (cwd.rstrip("/") + "/" + argv0)
        in_mount = "/" in argv0 and any(inside == t or inside.startswith(t.rstrip("/") + "/")
                                        for _, t, _ in mounts)  # fmt: skip
        if not in_mount:
            where = f"at {inside}" if "/" in argv0 else f"on PATH ({env['PATH']})"
            raise ConfigError(f"{argv0!r} is not an executable file in the image {reference} "
                              f"{where}; give a command the image has",
                              service=spec.name, key="command")  # fmt: skip
    return SandboxPlan(name=spec.name, argv=argv, executable=executable, env=env, cwd=cwd,
                       uid=uid, gid=gid, groups=groups, mounts=mounts,
                       nofile=spec.limits.nofile or NOFILE, tmpfs=dict(spec.tmpfs),
                       image=ImageRoot(lower=[str(p) for p in reversed(layers)],
                                       rw=os.path.realpath(rw), userxattr=userxattr),
                       stop_signal=parse_signal(config.stop_signal))  # fmt: skip

