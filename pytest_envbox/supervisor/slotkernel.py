"""The seam between a slot's lifecycle (:mod:`.services`) and the kernel.

:class:`SlotKernel` is every kernel-facing step a start, a signal, a release or an exit takes:
taking a prepared sandbox, giving it its cgroup and its network, sending it its plan, publishing
ports, signalling and ending processes. :class:`LinuxSlotKernel` does them, through the
supervisor's other concerns; the unit tests drive :class:`~.services.Services` with a fake that
records the calls (as youki tests its cgroup manager with a recording ``Syscall``).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
from typing import TYPE_CHECKING, Protocol

from pytest_envbox.kernel import cgroups
from pytest_envbox.sandbox.plan import SandboxPlan
from pytest_envbox.supervisor.protocol import CgroupLimits, NetWiring
from pytest_envbox.supervisor.relay import Relay
from pytest_envbox.supervisor.spares import Spare, await_ready

if TYPE_CHECKING:
    from pytest_envbox.supervisor.server import Supervisor
    from pytest_envbox.supervisor.services import Slot

__all__ = ["LinuxSlotKernel", "SlotKernel"]


class SlotKernel(Protocol):
    """The kernel-facing operations of a slot's lifecycle."""

    def limits_refused(self, limits: CgroupLimits) -> str | None:
        """Why these limits cannot be set on this host (None: they can, or none is declared)."""

    def take_spare(self, direct: bool) -> Spare:
        """A prepared sandbox (``direct``: a fresh one, forked by the supervisor itself)."""

    def await_ready(self, spare: Spare) -> tuple[int, int]:
        """Its network namespace's fd and its init's pid, once ready; raises SpareFailed."""

    def give_cgroup(self, slot: str, spare: Spare, pid: int, limits: CgroupLimits) -> None:
        """The slot's cgroup for this run, with its limits (nothing without cgroups)."""

    def wire(self, slot: str, netns: int, net: NetWiring) -> tuple[str, int]:
        """Put a new service on its environment's network: its veth's name and index."""

    def send_plan(self, spare: Spare, plan: SandboxPlan, fds: list[int]) -> None:
        """Send the plan (with the log pipe and, on restart, the slot's network namespace)."""

    def discard_spare(self, spare: Spare) -> None:
        """Let a spare go (it exits on its socket's end-of-file), and its cgroup."""

    def spare_failed(self) -> None:
        """A spare died unused: prepare none in the background until a start succeeds."""

    def publish(self, slot: str, s: Slot, port: int) -> Relay:
        """Publish the service's ``port`` on the host (a relay), on the host port reserved for it
        at the environment's open if it fixes one, else on a free one."""

    def kill(self, pid: int, sig: int = signal.SIGKILL) -> None:
        """Signal a pid of ours (an init); ProcessLookupError when it is gone."""

    def pidfd_send_signal(self, pidfd: int, sig: int) -> None:
        """Signal a service through its pidfd; ProcessLookupError when it is gone."""

    def end_init(self, pid: int, wait: float) -> None:
        """SIGKILL an init and reap it: its whole PID namespace is then gone."""

    def thaw(self, slot: str) -> None:
        """Resume the slot's service if it is paused."""

    def figures(self, slot: str) -> dict[str, int | float]:
        """The run's totals from its cgroup (empty without one)."""

    def release_cgroup(self, slot: str) -> None:
        """The slot's cgroup goes."""

    def cut_link(self, slot: str, s: Slot) -> None:
        """A released service's veth goes down."""

    def drop_network(self, env: str) -> None:
        """The environment's network goes (its last service was released), and the host ports
        still reserved for it (its services that never started)."""


class LinuxSlotKernel:
    """The real :class:`SlotKernel`: the supervisor's spares, cgroups and networks."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup

    def limits_refused(self, limits: CgroupLimits) -> str | None:
        try:
            self.sup.cgroups.check_limits(limits.memory, limits.cpu, limits.pids)
        except cgroups.CgroupsUnavailable as e:
            return str(e)
        return None

    def take_spare(self, direct: bool) -> Spare:
        return self.sup.spares.take(direct)

    def await_ready(self, spare: Spare) -> tuple[int, int]:
        return await_ready(spare.ctl)

    def give_cgroup(self, slot: str, spare: Spare, pid: int, limits: CgroupLimits) -> None:
        self.sup.service_cgroups.give(slot, spare, pid, limits)

    def wire(self, slot: str, netns: int, net: NetWiring) -> tuple[str, int]:
        return self.sup.network.wire(slot, netns, net)

    def send_plan(self, spare: Spare, plan: SandboxPlan, fds: list[int]) -> None:
        socket.send_fds(spare.ctl, [json.dumps(plan.to_dict()).encode()], fds)

    def discard_spare(self, spare: Spare) -> None:
        self.sup.spares.discard(spare)

    def spare_failed(self) -> None:
        self.sup.spares.want = False

    def publish(self, slot: str, s: Slot, port: int) -> Relay:
        listener = self.sup.host_ports.take(slot, port)
        try:
            return Relay(s.netns_fd, port, via=self.sup.network.via(slot, s), listener=listener)
        except BaseException:
            if listener is not None:
                listener.close()
            raise

    def kill(self, pid: int, sig: int = signal.SIGKILL) -> None:
        os.kill(pid, sig)

    def pidfd_send_signal(self, pidfd: int, sig: int) -> None:
        signal.pidfd_send_signal(pidfd, sig)

    def end_init(self, pid: int, wait: float) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        # Reaping the init means its whole PID namespace is gone (the kernel empties it first).
        with contextlib.suppress(OSError):
            pidfd = os.pidfd_open(pid)
            try:
                waiting = select.poll()  # not select(): no fd past 1023, and relays hold thousands
                waiting.register(pidfd, select.POLLIN)
                waiting.poll(wait * 1000)
            finally:
                os.close(pidfd)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)

    def thaw(self, slot: str) -> None:
        self.sup.service_cgroups.thaw(slot)

    def figures(self, slot: str) -> dict[str, int | float]:
        return self.sup.service_cgroups.figures(slot)

    def release_cgroup(self, slot: str) -> None:
        self.sup.cgroups.release(slot)

    def cut_link(self, slot: str, s: Slot) -> None:
        self.sup.network.cut(slot, s)

    def drop_network(self, env: str) -> None:
        self.sup.host_ports.drop(env)
        self.sup.network.drop_hub(env)
