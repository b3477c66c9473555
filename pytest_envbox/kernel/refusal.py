"""Why this host refuses to run services, and the fix for that host.

The hosts CI pipelines give are not a developer's Linux box, and each says no in its own way:

- **a container** (GitLab's docker executor, Jenkins agents, devcontainers, Codespaces): root
  without ``CAP_SYS_ADMIN`` (so the kernel refuses namespaces and mounts), a read-only
  ``/proc/sys``, a partly hidden ``/proc``, and a seccomp profile: Docker's refuses ``unshare``,
  ``clone`` with namespace flags and ``mount`` without ``CAP_SYS_ADMIN``; Podman's lets those
  through (the kernel decides) but refuses ``sethostname`` (docs/containers.md has the figures);
- **AppArmor's user namespace restriction** (Ubuntu 23.10 and later, GitHub's ``ubuntu-24.04``
  runners): ``kernel.apparmor_restrict_unprivileged_userns=1`` lets an unprivileged program make
  a user namespace, then denies it every capability inside (writing ``uid_map`` already fails);
- **user namespaces switched off** by a sysctl;
- **not Linux** at all (macOS, Windows).

Nothing here guesses from file names: :func:`probe` forks a child that takes the sandbox's first
steps (a user namespace and its id map in rootless mode; new namespaces; private mounts) and
reports the errno of the first that fails, and the facts that tell the causes apart are read
from the kernel: this process's ``Seccomp`` mode and effective capabilities
(``/proc/self/status``), the sysctls, the AppArmor label the kernel gave the child in its new
user namespace, and AppArmor's ``DENIED`` lines for the child in the kernel log where root may
read it. :func:`classify` (pure, unit-tested) turns the facts into a :class:`Refusal`: what was
refused, why, and the exact fix. ``envbox doctor`` prints it; the first failing start raises it
as :class:`~pytest_envbox.errors.HostUnsupported`.

Standard library only (the CLI's checks import it without the engine).
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "ANCHORS",
    "DOCS",
    "Facts",
    "Refusal",
    "boxed_root",
    "classify",
    "platform_refusal",
    "probe",
    "status",
]

#: where docs/ci.md is published (its anchors are named in each refusal)
DOCS = "docs/ci.md"
#: the sections of docs/ci.md a refusal may point at (tests/unit/test_ci_recipes.py checks them)
ANCHORS = frozenset({"containers", "apparmor", "user-namespaces", "macos-and-windows"})
_CAP_SYS_ADMIN = 21
_NAMESPACES = "CLONE_NEWNS|CLONE_NEWPID|CLONE_NEWUTS|CLONE_NEWIPC|CLONE_NEWNET|CLONE_NEWCGROUP"
_APPARMOR_SYSCTL = "kernel.apparmor_restrict_unprivileged_userns"
#: a sysctl every sandbox writes in its new network namespace (init.NET_SYSCTLS)
_SYSCTL_PROBE = "/proc/sys/net/ipv6/conf/all/accept_ra"
_SYSCTLS = ("user.max_user_namespaces", "kernel.unprivileged_userns_clone", _APPARMOR_SYSCTL)
#: how to run the tests as root without losing the user's PATH and virtualenv
SUDO = 'sudo -E env "PATH=$PATH" python -m pytest'


@dataclass(frozen=True)
class Refusal:
    """What was refused, why, and how to fix it on this host; :meth:`block` is what users read."""

    #: ``platform``, ``container-seccomp``, ``container-capabilities``, ``container-paths``,
    #: ``userns-capabilities``, ``userns-disabled``, ``userns-refused``, ``refused``
    kind: str
    headline: str
    refused: str
    why: str
    fixes: tuple[str, ...]
    #: the section of docs/ci.md with the recipe
    anchor: str

    def __post_init__(self) -> None:
        assert self.anchor in ANCHORS, self.anchor

    def block(self) -> str:
        """One block: the headline, then what was refused, why, and each fix on its own line."""
        lines = [f"pytest-envbox cannot start services here: {self.headline}",
                 f"  refused: {self.refused}", f"  why:     {self.why}"]  # fmt: skip
        for i, fix in enumerate(self.fixes):
            lines.append(f"  {'fix:' if i == 0 else 'or:':<8} {fix}")
        lines.append(f"  more:    `envbox doctor`; {DOCS}#{self.anchor}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.block()


@dataclass(frozen=True)
class Step:
    """One step the probe took: its name, the call as users would recognise it, and its errno
    (None: it worked)."""

    name: str
    call: str
    errno: int | None = None
    message: str = ""


@dataclass(frozen=True)
class Facts:
    """What the kernel says about this process and the probe's child."""

    platform: str = "linux"
    uid: int = 0
    rootless: bool = False
    #: ``Seccomp:`` of /proc/self/status: 0 none, 1 strict, 2 a filter
    seccomp: int = 0
    cap_sys_admin: bool = True
    #: sysctl name -> value, for those present
    sysctls: dict[str, str] = field(default_factory=dict)
    #: the AppArmor label of the child once in its new user namespace ("" when none)
    apparmor: str = ""
    #: AppArmor's DENIED lines about the child, from the kernel log (when it could be read)
    denials: tuple[str, ...] = ()
    steps: tuple[Step, ...] = ()

    @property
    def failed(self) -> Step | None:
        return next((s for s in self.steps if s.errno is not None), None)


def _errno_text(step: Step) -> str:
    name = errno.errorcode.get(step.errno or 0, str(step.errno))
    return f"{step.call}: {name} ({os.strerror(step.errno or 0)})"


def platform_refusal(platform: str | None = None) -> Refusal:
    """The refusal of a platform that is not Linux (said without importing anything of Linux)."""
    platform = platform or sys.platform
    if platform.startswith("win"):
        fixes = ("run the tests in WSL 2 (a real Linux kernel: install the project and pytest in "
                 "the WSL distribution, not on Windows)", "on a Linux CI runner or VM")  # fmt: skip
        name = "Windows"
    else:
        fixes = ("run the tests on Linux: a Linux CI runner, or a Linux VM on this machine "
                 "(Lima, colima, UTM, multipass), with the checkout shared into it",
                 "in a Linux container started with --privileged (Docker Desktop, Podman "
                 "machine), see the containers recipe")  # fmt: skip
        name = "macOS" if platform == "darwin" else platform
    return Refusal("platform", f"this is {name}, not Linux", f"namespaces and cgroups on {name}",
                   "pytest-envbox runs services in Linux namespaces and cgroups, which only a Linux "
                   "kernel has", fixes, "macos-and-windows")  # fmt: skip


def classify(f: Facts) -> Refusal | None:
    """The refusal the facts show, or None when the probe's steps all worked."""
    if not f.platform.startswith("linux"):
        return platform_refusal(f.platform)
    step = f.failed
    if step is None:
        return None
    refused = _errno_text(step)
    filtered = f.seccomp == 2
    if step.name in ("network sysctls", "proc", "host name") and (filtered or step.name != "host name"):
        return _container_defaults(f, step, refused)
    if f.rootless and step.name == "user namespace" and step.errno == errno.ENOSPC:
        return _no_userns(f, step, refused, False)  # max_user_namespaces = 0 answers ENOSPC
    if step.errno not in (errno.EPERM, errno.EACCES):
        return _other(f, step, refused)
    if not f.rootless:
        return _root(f, step, refused, filtered)
    if step.name == "user namespace":
        return _no_userns(f, step, refused, filtered)
    return _userns_capabilities(f, step, refused, filtered)


def _privileged_fixes() -> tuple[str, ...]:
    return ("start the container with --privileged (`docker run --privileged`, `podman run "
            "--privileged`; GitLab's docker executor: `privileged = true` under [runners.docker] "
            "in the runner's config.toml; Kubernetes: securityContext.privileged: true)",
            "run the job on the host: GitLab's shell executor, a VM runner, or "
            f"`{SUDO}` where sudo is available")  # fmt: skip


def _root(f: Facts, step: Step, refused: str, filtered: bool) -> Refusal:
    if not f.cap_sys_admin:
        why = ("this process is root without CAP_SYS_ADMIN (its effective capabilities lack it), "
               "as in a container's default capability set: making namespaces and mounts needs it")
        if filtered:
            why += ("; a seccomp filter is also on this process (Seccomp: 2 in /proc/self/status), "
                    "like a container runtime's default profile (Docker's refuses these calls too)")
        return Refusal("container-capabilities", "root in a container without CAP_SYS_ADMIN",
                       refused, why, _privileged_fixes(), "containers")  # fmt: skip
    if filtered:
        return Refusal(
            "container-seccomp", "a seccomp filter refuses the namespace calls", refused,
            "this process is root with CAP_SYS_ADMIN, yet the call was refused: a seccomp filter is "
            "on it (Seccomp: 2 in /proc/self/status), as Docker's default profile refuses "
            "unshare, clone with namespace flags and mount",
            (*_privileged_fixes()[:1], "keep the capabilities and drop only the filter: "
             "`--security-opt seccomp=unconfined` (docker, podman)", *_privileged_fixes()[1:]),
            "containers",
        )  # fmt: skip
    return _lsm(f, step, refused)


def _profile_fix() -> str:
    """Rootless in a container with the profile envbox ships (tools/seccomp_profile.py). It is
    named by its place in the package: this process's path to it, in the container, is not the
    host's, where the container is started."""
    return ("without privileges, services without limits (rootless mode, no capability added): "
            "`podman run --user 1000 --security-opt seccomp=seccomp-envbox.json --security-opt "
            "unmask=ALL --security-opt no-new-privileges ...` (docker: `--security-opt "
            "systempaths=unconfined` for unmask=ALL), with seccomp-envbox.json copied to the host "
            "from the installed pytest_envbox package (its data directory)")


def _container_defaults(f: Facts, step: Step, refused: str) -> Refusal:
    """The namespaces were made, then a container's other defaults refused a later step."""
    if step.name == "host name":
        kind, headline = "container-seccomp", "a seccomp filter refuses the sandbox's host name"
        why = ("a seccomp filter on this process (Seccomp: 2 in /proc/self/status) refuses "
               "sethostname, even in a UTS namespace of its own, as Podman's default profile does "
               "in a container without CAP_SYS_ADMIN; each service is named after itself")
    elif step.name == "proc":
        kind, headline = "container-paths", "the container hides parts of /proc"
        why = ("the container's runtime masks parts of /proc (/proc/kcore, /proc/keys...), and the "
               "kernel lets a user namespace mount a /proc of its own only where all of the "
               "container's /proc is visible")
    else:
        kind, headline = "container-paths", "/proc/sys is read-only in this container"
        why = ("a container runtime mounts /proc/sys read-only by default, and each service's "
               "network is set up through it (its sysctls)")
    mode = "rootless mode" if f.rootless else "root mode"
    return Refusal(
        kind, headline, refused, f"{why} ({mode})",
        (*_privileged_fixes()[:1], _profile_fix(), *_privileged_fixes()[1:]),
        "containers",
    )  # fmt: skip


def _lsm(f: Facts, step: Step, refused: str) -> Refusal:
    """Root with the capability and no filter, refused anyway: a security module (AppArmor, SELinux)."""
    seen = f"; the kernel log says: {f.denials[-1]}" if f.denials else ""
    return Refusal(
        "refused", "a security module refuses the namespace calls", refused,
        "the capability is there and no seccomp filter is on this process, so a Linux security "
        f"module (AppArmor or SELinux) refused it{seen}",
        ("look for `apparmor=\"DENIED\"` or `avc: denied` in `sudo dmesg` or the audit log and "
         "allow the Python interpreter that runs pytest there", "run the tests in a VM or on "
         "another host"), "containers")  # fmt: skip


def _no_userns(f: Facts, step: Step, refused: str, filtered: bool) -> Refusal:
    """Rootless, and the user namespace itself was refused."""
    off = [(k, v) for k, v in f.sysctls.items()
           if (k, v) in (("user.max_user_namespaces", "0"), ("kernel.unprivileged_userns_clone", "0"))]
    if off:
        name, value = off[0]
        good = "15000" if name == "user.max_user_namespaces" else "1"
        return Refusal(
            "userns-disabled", "user namespaces are switched off", refused,
            f"rootless mode runs services in a user namespace, and {name} = {value} forbids them",
            (f"`sudo sysctl -w {name}={good}` (to keep it: `echo '{name} = {good}' | sudo tee "
             "/etc/sysctl.d/60-envbox-userns.conf`)", f"run the tests as root: `{SUDO}`"),
            "user-namespaces")  # fmt: skip
    if step.errno == errno.ENOSPC:
        return _other(f, step, refused)
    if filtered:
        return Refusal(
            "container-seccomp", "a seccomp filter refuses user namespaces", refused,
            "rootless mode runs services in a user namespace, and a seccomp filter on this process "
            "(Seccomp: 2 in /proc/self/status) refuses to make one, as Docker's default profile "
            "does in a container without CAP_SYS_ADMIN",
            (*_privileged_fixes()[:1], _profile_fix(), *_privileged_fixes()[1:]),
            "containers")  # fmt: skip
    return Refusal("userns-refused", "user namespaces are refused", refused,
                   "rootless mode runs services in a user namespace and this kernel refused to make "
                   "one for this user", (f"run the tests as root: `{SUDO}`",
                   "ask the host's administrator to allow unprivileged user namespaces"),
                   "user-namespaces")  # fmt: skip


def _userns_capabilities(f: Facts, step: Step, refused: str, filtered: bool) -> Refusal:
    """Rootless: the user namespace was made, then its capabilities were denied."""
    value = f.sysctls.get(_APPARMOR_SYSCTL)
    if "unprivileged_userns" in f.apparmor or value == "1":
        here = (f"here {_APPARMOR_SYSCTL} = {value}" if value is not None else "here")
        if f.apparmor:
            here += f", and the kernel put the new namespace under AppArmor profile {f.apparmor!r}"
        if f.denials:
            here += f"; the kernel log says: {f.denials[-1]}"
    elif filtered:
        here = ("here a seccomp filter on this process (Seccomp: 2 in /proc/self/status) refuses "
                "the calls, to the same effect")
    else:
        here = f"here {_APPARMOR_SYSCTL} is {value or 'not set'}; a security module denied them"
    return Refusal(
        "userns-capabilities", "the user namespace's capabilities are denied",
        f"{refused}, in a new user namespace (which was made)",
        "the kernel made a user namespace for this user, then refused the calls that need the "
        "capabilities it should have inside (mounts, namespaces). AppArmor does this on Ubuntu 23.10 "
        f"and later and on GitHub's ubuntu-24.04 runners ({_APPARMOR_SYSCTL} = 1); {here}",
        (f"run the tests as root: `{SUDO}` (on GitHub Actions: sudo needs no password)",
         f"allow user namespaces again: `sudo sysctl -w {_APPARMOR_SYSCTL}=0` (to keep it: "
         f"`echo '{_APPARMOR_SYSCTL} = 0' | sudo tee /etc/sysctl.d/60-envbox-userns.conf`)",
         "an AppArmor profile that allows `userns,` for the Python interpreter that runs pytest"),
        "apparmor",
    )  # fmt: skip


def _other(f: Facts, step: Step, refused: str) -> Refusal:
    if step.errno == errno.ENOSPC:
        why = "the limit on user namespaces (user.max_user_namespaces) is reached"
        fixes: tuple[str, ...] = ("`sudo sysctl -w user.max_user_namespaces=15000`",)
    elif step.errno == errno.EINVAL and step.name == "user namespace":
        why = "this kernel was built without user namespaces (CONFIG_USER_NS)"
        fixes = (f"run the tests as root: `{SUDO}`", "use a kernel with CONFIG_USER_NS=y")
    else:
        why = f"the kernel answered {step.message or os.strerror(step.errno or 0)}"
        fixes = ("run `envbox doctor` for what this host supports",)
    return Refusal("refused", f"{step.name} cannot be made", refused, why, fixes,
                   "user-namespaces" if f.rootless else "containers")  # fmt: skip


# --- the facts ----------------------------------------------------------------------------------


def status() -> dict[str, str]:
    """This process's /proc/self/status, key -> value."""
    out = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


def _has_cap_sys_admin(st: dict[str, str]) -> bool:
    try:
        return bool(int(st.get("CapEff", "0"), 16) >> _CAP_SYS_ADMIN & 1)
    except ValueError:
        return False


def boxed_root() -> bool:
    """Root without CAP_SYS_ADMIN (a container's default): namespaces other than a user namespace
    cannot be made, so rootless mode is the only way services can run here."""
    return os.geteuid() == 0 and not _has_cap_sys_admin(status())


def _sysctls() -> dict[str, str]:
    out = {}
    for name in _SYSCTLS:
        with contextlib.suppress(OSError):
            out[name] = Path("/proc/sys", *name.split(".")).read_text().strip()
    return out


def _denials(pid: int) -> tuple[str, ...]:
    """AppArmor's DENIED lines about ``pid`` in the kernel log (root, or dmesg_restrict=0)."""
    found = []
    try:
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return ()
    try:
        for _ in range(100_000):  # the ring buffer holds a few thousand records: bounded anyway
            try:
                record = os.read(fd, 8192).decode(errors="replace")
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno == errno.EPIPE:  # a record overwritten while reading: go on
                    continue
                break
            if 'apparmor="DENIED"' in record and f"pid={pid} " in record:
                found.append(record.split(";", 1)[-1].strip())
    finally:
        os.close(fd)
    return tuple(found[-3:])


def probe(rootless: bool, timeout: float = 10.0) -> Facts:
    """Take the sandbox's first steps in a forked child; the facts, with each step's errno."""
    if not sys.platform.startswith("linux"):
        return Facts(platform=sys.platform, rootless=rootless)
    from pytest_envbox.kernel.hostcheck import in_child

    uid, gid = os.getuid(), os.getgid()

    def work() -> list[dict[str, object]]:
        steps: list[dict[str, object]] = []
        with contextlib.suppress(BaseException):  # the failed step is in steps already
            _child(uid, gid, rootless, steps)
        return steps

    out, pid = in_child(work, timeout)
    raw: list[dict[str, Any]] = out if isinstance(out, list) else []
    label = next((str(s.get("label", "")) for s in raw if s.get("label")), "")
    steps_ = tuple(Step(str(s["name"]), str(s["call"]), s.get("errno"), str(s.get("message", "")))
                   for s in raw if "call" in s)  # fmt: skip
    st = status()
    failed = any(s.errno is not None for s in steps_)
    return Facts(platform=sys.platform, uid=uid, rootless=rootless,
                 seccomp=int(st.get("Seccomp", "0") or 0), cap_sys_admin=_has_cap_sys_admin(st),
                 sysctls=_sysctls(), apparmor=label,
                 denials=_denials(pid) if failed else (), steps=steps_)  # fmt: skip


def _child(uid: int, gid: int, rootless: bool, steps: list[dict[str, object]]) -> None:
    from pytest_envbox.kernel import linux as L

    def step(name: str, call: str, fn: object) -> None:
        try:
            fn()  # type: ignore[operator]
        except OSError as e:
            steps.append({"name": name, "call": call, "errno": e.errno or errno.EPERM,
                          "message": e.strerror or str(e)})  # fmt: skip
            raise
        steps.append({"name": name, "call": call})

    if rootless:
        step("user namespace", "unshare(CLONE_NEWUSER)", lambda: L.unshare(L.CLONE_NEWUSER))
        for path in ("/proc/self/attr/apparmor/current", "/proc/self/attr/current"):
            with contextlib.suppress(OSError):
                label = Path(path).read_text().strip("\0\n ")
                if label and label != "unconfined":
                    steps.append({"label": label})
                break
        step("id map", "writing /proc/self/uid_map", lambda: L.map_own_ids(uid, gid))
    flags = (L.CLONE_NEWNS | L.CLONE_NEWPID | L.CLONE_NEWUTS | L.CLONE_NEWIPC | L.CLONE_NEWNET
             | L.CLONE_NEWCGROUP)  # fmt: skip
    step("namespaces", f"unshare({_NAMESPACES})", lambda: L.unshare(flags))

    def mounts() -> None:
        L.mount(None, "/", None, L.MS_REC | L.MS_PRIVATE)
        L.mount("tmpfs", "/tmp", "tmpfs", L.MS_NOSUID | L.MS_NODEV, "mode=0755")

    step("mounts", "mount(MS_PRIVATE) and a tmpfs", mounts)
    # What a container's defaults refuse further on, in the sandbox's order: its network's
    # sysctls (/proc/sys is read-only in a container), a /proc of its own (refused to a user
    # namespace where the container hides parts of /proc), its host name (podman's seccomp
    # profile refuses sethostname without CAP_SYS_ADMIN, even in a UTS namespace of one's own).
    step("network sysctls", f"writing {_SYSCTL_PROBE}", _write_net_sysctl)
    step("proc", 'mount("proc") in the new pid namespace', _mount_proc)
    step("host name", "sethostname() in the new UTS namespace", lambda: socket.sethostname("envbox"))


def _write_net_sysctl() -> None:
    """A sysctl of the child's new network namespace, as each sandbox sets (a kernel without
    IPv6 has no such file: nothing to learn)."""
    try:
        fd = os.open(_SYSCTL_PROBE, os.O_WRONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        os.write(fd, b"0")
    finally:
        os.close(fd)


def _mount_proc() -> None:
    """A proc mounted by the first process of the new pid namespace (a grandchild: the child
    itself stays in its parent's), on the child's private tmpfs; its errno, raised."""
    from pytest_envbox.kernel import linux as L

    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            L.mount("proc", "/tmp", "proc", L.MS_NOSUID | L.MS_NODEV | L.MS_NOEXEC)
        except OSError as e:
            code = e.errno or errno.EPERM
        os._exit(code)
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    if code:
        raise OSError(code, os.strerror(code) if code > 0 else "killed")
