"""The environment's own volumes (``Service.volumes``): directories made in a temporary directory
of the environment's own, shared by the services that name the same volume, gone with the
environment (removed by the supervisor, which can remove what the services' users wrote there,
also rootless; and by the janitor if the test process is killed), even when its work directory
(logs) is kept.

Compose's named volumes and Kubernetes' emptyDir, ConfigMap and Secret volumes become these (see
:class:`~pytest_envbox.mounts.Volume`). A volume is made once per environment, when the first
service naming it starts; its ``files`` (a ConfigMap's keys) are written then. A new, empty
directory belongs to the user of the first service that mounts it (the sandbox changes its owner
as it starts), as a volume Docker creates for a container is writable by it (Docker copies the
image's directory, owner included; envbox does not copy: the volume starts empty).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from pytest_envbox.errors import ConfigError
from pytest_envbox.sandbox.plan import SandboxPlan
from pytest_envbox.spec import Service, Volume

__all__ = ["make_volumes"]


def make_volumes(base: Path, specs: Iterable[Service], plans: dict[str, SandboxPlan],
                 made: dict[str, Volume]) -> None:  # fmt: skip
    """Make the volumes of ``specs`` not made yet (``made``: this environment's, by name) in
    ``base`` and add their mounts to the services' plans."""
    for spec in specs:
        plan = plans[spec.name]
        for volume in spec.volumes:
            path = base / volume.name
            earlier = made.get(volume.name)
            if earlier is None:
                _make(path, volume, plan)
                made[volume.name] = volume
            elif earlier.files != volume.files or earlier.single_file != volume.single_file:
                raise ConfigError(f"volume {volume.name!r} is declared with other files by "
                                  "another service; give one of them another name",
                                  service=spec.name, key="volumes")  # fmt: skip
            if (str(path), volume.target, volume.readonly) not in plan.mounts:
                plan.mounts.append((str(path), volume.target, volume.readonly))


def _make(path: Path, volume: Volume, plan: SandboxPlan) -> None:
    if volume.single_file:
        _write(path, volume.files[0][1], volume.files[0][2])
        return
    path.mkdir(mode=0o755)
    for name, content, mode in volume.files:
        target = path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        _write(target, content, mode)
    if not volume.files:
        # The sandbox gives it to the service's user as it starts (sandbox/rootfs.py): as root of
        # the user namespace it can, where this process (rootless) cannot.
        plan.own.append(str(path))


def _write(path: Path, content: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, content)  # ConfigMaps are at most 1 MiB: one write
        # The mode as given (a Secret's 0400 is root's alone, as in a pod without fsGroup).
        os.fchmod(fd, mode & 0o7777)
    finally:
        os.close(fd)
