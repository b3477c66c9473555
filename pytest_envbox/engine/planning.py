"""Checking a declaration against this host, before anything starts: users, commands, working
directories and mount sources become a :class:`~pytest_envbox.sandbox.plan.SandboxPlan`; subnets
become addresses. Bad input is a ``ConfigError`` with nothing to clean up.
"""

from __future__ import annotations

import fnmatch
import grp
import os
import pwd
import shutil
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

from pytest_envbox.engine.client import SupervisorClient, rootless
from pytest_envbox.errors import ConfigError, HostUnsupported
from pytest_envbox.sandbox.plan import HOME, NOFILE, SandboxPlan
from pytest_envbox.spec import Service, parse_subnet
from pytest_envbox.supervisor.protocol import NetWiring
from pytest_envbox.validate import real_source

__all__ = ["Subnet", "check_cgroups", "check_ids", "plan_for"]


class Subnet:
    """An environment's IPv4 subnet: the hub (bridge) takes the first address, services the
    next; the last usable one is the host's end of the environment's link (see
    supervisor/subnets.py), never a service's."""

    def __init__(self, subnet: str) -> None:
        import ipaddress

        self.network = ipaddress.IPv4Network(parse_subnet(subnet))
        hosts = self.network.hosts()
        self.gateway = str(next(hosts))
        self._free = hosts
        self._host = self.network.broadcast_address - 1
        self.assigned: dict[str, str] = {}

    def address(self, name: str) -> str:
        """The service's address (the same one for the environment's lifetime)."""
        if name not in self.assigned:
            ip = next(self._free, self._host)
            if ip >= self._host:
                raise ConfigError(f"subnet {self.network} has no address left for service "
                                  f"{name!r}; choose a larger subnet")  # fmt: skip
            self.assigned[name] = str(ip)
        return self.assigned[name]

    def wire(self, name: str) -> NetWiring:
        return NetWiring(self.address(name), self.network.prefixlen, self.gateway)

_DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _resolve_user(spec: Service) -> tuple[int, int, list[int]]:
    """(uid, gid, supplementary groups) for the service's ``user`` (default: the caller's):
    ``name`` or ``uid``, optionally ``:group`` or ``:gid``, as Docker reads ``--user``. Without a
    group, the user's passwd group and the groups that list it; with one, that group alone."""
    user = spec.user
    if user is None:
        return os.getuid(), os.getgid(), sorted(set(os.getgroups()) | {os.getgid()})
    name, _, group = user.partition(":")
    if name.isdigit():
        uid = int(name)
        try:
            pw: pwd.struct_passwd | None = pwd.getpwuid(uid)
        except KeyError:
            pw = None  # no passwd entry: its own group, nothing else
    else:
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            raise ConfigError(
                f"there is no user {name!r} on this host; use a name from /etc/passwd, "
                "a numeric uid, or 'uid:gid'", service=spec.name, key="user",
            ) from None
        uid = pw.pw_uid
    if group:
        if group.isdigit():
            gid = int(group)
        else:
            try:
                gid = grp.getgrnam(group).gr_gid
            except KeyError:
                raise ConfigError(
                    f"there is no group {group!r} on this host; use a name from /etc/group or "
                    "a numeric gid", service=spec.name, key="user",
                ) from None
        return uid, gid, [gid]
    if pw is None:
        return uid, uid, [uid]
    return uid, pw.pw_gid, sorted(set(os.getgrouplist(pw.pw_name, pw.pw_gid)))


def _rootless_ids(uid: int, gid: int, groups: list[int]) -> tuple[int, int, list[int]]:
    """Ids inside rootless mode's user namespace: the caller is root there; other users keep
    their numbers, which exist there when a subordinate id range is mapped (checked at open)."""
    if uid in (os.getuid(), 0):  # the caller, or root: both are the namespace's root
        return 0, 0, []
    return uid, gid, groups


def check_ids(sup: SupervisorClient, specs: Iterable[Service], plans: Mapping[str, SandboxPlan]
               ) -> None:  # fmt: skip
    """Refuse, before anything starts, a service whose user does not exist in the user namespace."""
    for spec in specs:
        plan = plans[spec.name]
        missing = [f"{kind} {i}" for kind, ids in (("uid", [plan.uid]), ("gid", [plan.gid, *plan.groups]))
                   for i in sorted(set(ids)) if not sup.maps(kind, i)]  # fmt: skip
        if missing:
            raise HostUnsupported(
                f"service {spec.name!r} runs as user {spec.user!r}, but in rootless mode only your "
                f"own user (as root) and a subordinate id range exist in the services' user "
                f"namespace, and {', '.join(missing)} is not mapped. Give your user a range of "
                f"65536 ids (`sudo usermod --add-subuids 100000-165535 --add-subgids "
                f"100000-165535 $USER`) and install newuidmap (`sudo apt install uidmap`); or "
                f"remove `user` to run it as yourself; or run the tests as root "
                f"(--envbox-rootless=no).")  # fmt: skip


def _base_env(spec: Service) -> dict[str, str]:
    """API 1.1: a fixed base, ``pass_env`` matches from the host, then the service's ``env``."""
    env = {
        "PATH": os.environ.get("PATH", _DEFAULT_PATH),
        "HOME": HOME,
        "HOSTNAME": spec.name,
        "LANG": "C.UTF-8",
        "TMPDIR": "/tmp",
    }
    for pattern in spec.pass_env:
        for key, value in os.environ.items():
            if fnmatch.fnmatchcase(key, pattern):
                env[key] = value
    env.update(spec.env)
    return env


def plan_for(spec: Service, rootdir: Path) -> SandboxPlan:
    """Check a declaration against this host and turn it into a sandbox plan. Starts nothing."""
    uid, gid, groups = _resolve_user(spec)
    if rootless():
        uid, gid, groups = _rootless_ids(uid, gid, groups)
    env = _base_env(spec)
    cwd = Path(spec.cwd) if spec.cwd else rootdir
    if not cwd.is_absolute():
        cwd = rootdir / cwd
    if not cwd.is_dir():
        raise ConfigError(f"working directory {str(cwd)!r} does not exist on this host; "
                          "give an existing directory (relative paths start at the rootdir)",
                          service=spec.name, key="cwd")  # fmt: skip
    # Sources hold no symbolic link (refused here), so the sandbox can refuse one at each start.
    real_root = os.path.realpath(rootdir)
    mounts = [(real_source(m.source, real_root, spec.name, f"mounts[{i}].source"), m.target,
               m.readonly) for i, m in enumerate(spec.mounts)]  # fmt: skip
    argv0 = spec.command[0]
    if "/" in argv0:
        exe = argv0 if os.path.isabs(argv0) else str(cwd / argv0)
        inside_mount = any(exe == t or exe.startswith(t.rstrip("/") + "/") for _, t, _ in mounts)
        if not inside_mount and not (os.path.isfile(exe) and os.access(exe, os.X_OK)):
            raise ConfigError(f"{argv0!r} is not an executable file on this host",
                              service=spec.name, key="command")  # fmt: skip
        executable = exe if not inside_mount else ""
    else:
        found = shutil.which(argv0, path=env["PATH"])
        if found is None:
            raise ConfigError(f"{argv0!r} was not found on PATH ({env['PATH']}); install it or "
                              "give its full path", service=spec.name, key="command")  # fmt: skip
        executable = found
    # The cwd and the program's prefix (a virtualenv, say) stay visible even under /tmp, which is
    # otherwise private: a checkout or a tox env living there must still run.
    # Each is bound from its real path (which the sandbox opens refusing symbolic links) at the
    # path the declaration gives.
    inside = [str(cwd)]
    if executable:
        inside.append(os.path.dirname(os.path.dirname(executable)))
    expose = [(os.path.realpath(path), path) for path in inside]
    return SandboxPlan(name=spec.name, argv=list(spec.command), executable=executable, env=env,
                       cwd=str(cwd), uid=uid, gid=gid, groups=groups, mounts=mounts,
                       expose=expose, nofile=spec.limits.nofile or NOFILE,
                       tmpfs=dict(spec.tmpfs))  # fmt: skip


_warned_no_cgroups = False


def check_cgroups(sup: SupervisorClient, specs: Iterable[Service]) -> None:
    """Refuse limits where cgroups cannot be written, before anything starts; else warn once."""
    global _warned_no_cgroups
    problem = sup.cgroup_problem
    if not problem:
        return
    # (nofile is no cgroup limit: a service may declare it anywhere)
    limited = [s.name for s in specs
               if any(v is not None for v in (s.limits.memory, s.limits.cpu, s.limits.pids))]
    if limited:
        raise HostUnsupported(f"service {limited[0]!r} declares limits, but {problem}")
    if not _warned_no_cgroups:
        _warned_no_cgroups = True
        warnings.warn(f"pytest-envbox runs services without cgroups (no limits, no stats(), no "
                      f"pause()): {problem}", RuntimeWarning, stacklevel=3)  # fmt: skip


