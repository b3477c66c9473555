"""The slots' state machine (supervisor/services.py), driven through a recording fake of the
kernel (the SlotKernel seam): no root, no namespaces, no cgroups."""

from __future__ import annotations

import errno
import os
import selectors
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pytest_envbox.sandbox.plan import SandboxPlan
from pytest_envbox.supervisor.protocol import (
    CgroupLimits,
    Done,
    ErrorReply,
    ExitedEvent,
    Message,
    NetWiring,
    ReleaseRequest,
    Reply,
    SignalRequest,
    StartReply,
    StartRequest,
    Unsupported,
)
from pytest_envbox.supervisor.services import Services, Slot
from pytest_envbox.supervisor.spares import Spare, SpareFailed, SpareUnsupported
from pytest_envbox.supervisor.sync import Pending

PLAN = SandboxPlan(name="web", argv=["sleep", "1000"], executable="/bin/sleep", env={}, cwd="/",
                   uid=0, gid=0, groups=[])  # fmt: skip
NET = NetWiring("10.0.0.2", 24, "10.0.0.1")


class FakeRelay:
    def __init__(self, port: int) -> None:
        self.host_port = 10000 + port
        self.closed = False

    def close(self) -> None:
        self.closed = True


class FakeKernel:
    """Records every call; spares are real socket pairs (the test plays their init), network
    namespaces are /dev/null fds, cgroups are names in a set."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.inits: list[socket.socket] = []  # the init's end of each spare taken
        self.ready_errors: list[Exception] = []  # raised by the next await_ready calls
        self.wire_error: OSError | None = None
        self.cgroups: set[str] = set()  # live: the spares' and the slots'
        self.netns: list[int] = []
        self.next_pid = 100
        self.refused: str | None = None

    def limits_refused(self, limits: CgroupLimits) -> str | None:
        return self.refused if limits.any() else None

    def take_spare(self, direct: bool) -> Spare:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.inits.append(theirs)
        cg = f"spare{len(self.inits)}"
        self.cgroups.add(cg)
        self.calls.append(("take_spare", direct))
        return Spare(ours, cg)  # type: ignore[arg-type]  # a name stands for the cgroup

    def await_ready(self, spare: Spare) -> tuple[int, int]:
        self.calls.append(("await_ready",))
        if self.ready_errors:
            raise self.ready_errors.pop(0)
        fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        self.netns.append(fd)
        self.next_pid += 1
        return fd, self.next_pid

    def give_cgroup(self, slot: str, spare: Spare, pid: int, limits: CgroupLimits) -> None:
        self.calls.append(("give_cgroup", slot, pid, limits))
        self.cgroups.discard(str(spare.cgroup))
        spare.cgroup = None
        self.cgroups.add(slot)

    def wire(self, slot: str, netns: int, net: NetWiring) -> tuple[str, int]:
        self.calls.append(("wire", slot, net))
        if self.wire_error is not None:
            raise self.wire_error
        return "v1", 7

    def send_plan(self, spare: Spare, plan: SandboxPlan, fds: list[int]) -> None:
        self.calls.append(("send_plan", plan.name, len(fds)))

    def discard_spare(self, spare: Spare) -> None:
        self.calls.append(("discard_spare",))
        spare.ctl.close()
        if spare.cgroup is not None:
            self.cgroups.discard(str(spare.cgroup))

    def spare_failed(self) -> None:
        self.calls.append(("spare_failed",))

    def publish(self, slot: str, s: Slot, port: int) -> FakeRelay:
        self.calls.append(("publish", slot, port))
        return FakeRelay(port)

    def kill(self, pid: int, sig: int = signal.SIGKILL) -> None:
        self.calls.append(("kill", pid, sig))

    def pidfd_send_signal(self, pidfd: int, sig: int) -> None:
        self.calls.append(("pidfd_send_signal", sig))

    def end_init(self, pid: int, wait: float) -> None:
        self.calls.append(("end_init", pid))

    def thaw(self, slot: str) -> None:
        self.calls.append(("thaw", slot))

    def figures(self, slot: str) -> dict[str, int | float]:
        return {"oom_kills": 1, "memory_peak_bytes": 4096, "cpu_seconds": 0.5}

    def release_cgroup(self, slot: str) -> None:
        self.calls.append(("release_cgroup", slot))
        self.cgroups.discard(slot)

    def cut_link(self, slot: str, s: Slot) -> None:
        self.calls.append(("cut_link", slot))

    def drop_network(self, env: str) -> None:
        self.calls.append(("drop_network", env))

    def called(self, name: str) -> list[tuple[Any, ...]]:
        return [c for c in self.calls if c[0] == name]


class FakeHost:
    def __init__(self) -> None:
        self.sel = selectors.DefaultSelector()
        self.pending: dict[int, Pending] = {}
        self.replies: list[tuple[int, Reply]] = []
        self.sent: list[Message] = []
        self.disowned: list[str] = []

    def reply(self, req_id: int, reply: Reply) -> None:
        self.replies.append((req_id, reply))

    def send(self, msg: Message) -> None:
        self.sent.append(msg)

    def changed(self) -> None:
        pass

    def disown(self, path: str) -> None:
        self.disowned.append(path)

    def maybe_done(self) -> None:
        pass


@pytest.fixture
def kernel() -> FakeKernel:
    return FakeKernel()


@pytest.fixture
def host() -> Iterator[FakeHost]:
    h = FakeHost()
    yield h
    h.sel.close()


@pytest.fixture
def services(host: FakeHost, kernel: FakeKernel) -> Iterator[Services]:
    sv = Services(host, kernel)  # type: ignore[arg-type]  # the fakes stand for both
    yield sv
    sv.teardown()
    for s in kernel.inits:
        s.close()


def start(services: Services, tmp_path: Path, slot: str = "e1/web", generation: int = 1,
          ports: tuple[int, ...] = (80, 443), req_id: int = 1) -> None:  # fmt: skip
    services.start(req_id, StartRequest(slot, PLAN, str(tmp_path / "web.log"), list(ports),
                                        generation, CgroupLimits(64 << 20, None, None), NET))


def exec_sync(services: Services, host: FakeHost, init: socket.socket, *, close: bool = True) -> None:
    """Play the init: the command was exec'd (with a pidfd of the service: ours), then EOF."""
    pidfd = os.pidfd_open(os.getpid())
    socket.send_fds(init, [b"exec"], [pidfd])
    os.close(pidfd)
    [pend] = [p for p in host.pending.values() if p.sock.fileno() >= 0]
    services.on_sync(pend)
    if close:
        init.close()
        services.on_sync(pend)


def test_a_start_replies_with_the_services_pid_and_published_ports_once_exec_is_synced(
        services: Services, host: FakeHost, kernel: FakeKernel, tmp_path: Path) -> None:  # fmt: skip
    start(services, tmp_path)
    assert host.replies == []  # not before the sandbox says the command was exec'd
    assert [c[0] for c in kernel.calls] == ["take_spare", "await_ready", "give_cgroup", "wire",
                                            "send_plan", "publish", "publish"]  # fmt: skip
    assert kernel.called("send_plan") == [("send_plan", "web", 1)]  # the log pipe alone: a new slot
    exec_sync(services, host, kernel.inits[0])
    assert host.replies == [(1, StartReply(os.getpid(), {80: 10080, 443: 10443}))]
    assert host.pending == {}  # the sync socket is done with
    s = services.slots["e1/web"]
    assert (s.ip, s.veth, s.veth_index, s.generation) == ("10.0.0.2", "v1", 7, 1)
    assert kernel.cgroups == {"e1/web"}


def test_a_restart_goes_back_into_the_slots_network_namespace_and_keeps_its_ports(
        services: Services, host: FakeHost, kernel: FakeKernel, tmp_path: Path) -> None:  # fmt: skip
    start(services, tmp_path)
    exec_sync(services, host, kernel.inits[0])
    pid = services.slots["e1/web"].init_pid
    assert pid is not None
    services.on_exit(pid, 0)
    start(services, tmp_path, generation=2, req_id=2)
    assert len(kernel.called("wire")) == 1 and len(kernel.called("publish")) == 2  # not again
    assert kernel.called("send_plan")[-1] == ("send_plan", "web", 2)  # log pipe, the slot's netns
    exec_sync(services, host, kernel.inits[1])
    assert host.replies[-1] == (2, StartReply(os.getpid(), {80: 10080, 443: 10443}))


def test_a_spare_that_died_is_retried_once_with_a_fresh_one(
        services: Services, host: FakeHost, kernel: FakeKernel, tmp_path: Path) -> None:  # fmt: skip
    kernel.ready_errors = [SpareFailed("the sandbox died")]
    start(services, tmp_path)
    assert kernel.called("take_spare") == [("take_spare", False), ("take_spare", True)]
    assert len(kernel.called("discard_spare")) == 1 and kernel.called("spare_failed")
    exec_sync(services, host, kernel.inits[1])
    assert isinstance(host.replies[0][1], StartReply)
    assert kernel.cgroups == {"e1/web"}  # the dead spare's cgroup went with it


def test_a_second_failure_is_an_error_that_leaves_no_cgroup_nor_slot(
        services: Services, host: FakeHost, kernel: FakeKernel, tmp_path: Path) -> None:  # fmt: skip
    kernel.ready_errors = [SpareFailed("the sandbox died"), SpareFailed("clone: no memory")]
    with pytest.raises(SpareFailed, match="clone: no memory"):
        start(services, tmp_path)
    assert len(kernel.called("take_spare")) == 2 and len(kernel.called("discard_spare")) == 2
    assert kernel.called("release_cgroup") == [("release_cgroup", "e1/web")]
    assert kernel.cgroups == set()
    assert services.slots == {} and host.pending == {}


def test_a_spare_that_says_the_host_is_unsupported_is_not_retried(
        services: Services, kernel: FakeKernel, tmp_path: Path) -> None:  # fmt: skip
    kernel.ready_errors = [SpareUnsupported("no user namespaces")]
    with pytest.raises(Unsupported, match="no user namespaces"):
        start(services, tmp_path)
    assert len(kernel.called("take_spare")) == 1 and kernel.called("spare_failed")
    assert kernel.cgroups == set()


def test_a_network_that_cannot_be_made_is_refused_without_blaming_the_spare(
        services: Services, kernel: FakeKernel, tmp_path: Path) -> None:  # fmt: skip
    kernel.wire_error = OSError(errno.EOPNOTSUPP, "Operation not supported")
    with pytest.raises(Unsupported, match="modprobe bridge veth"):
        start(services, tmp_path)
    assert len(kernel.called("take_spare")) == 1 and not kernel.called("spare_failed")
    assert kernel.cgroups == set() and services.slots == {}


def test_limits_on_a_host_without_cgroups_are_refused_before_anything_is_taken(
        services: Services, kernel: FakeKernel, tmp_path: Path) -> None:  # fmt: skip
    kernel.refused = "cgroups are read-only here"
    with pytest.raises(Unsupported, match="read-only"):
        start(services, tmp_path)
    assert not kernel.called("take_spare")


def test_a_start_of_a_running_slot_is_refused_and_leaves_it_running(
        services: Services, host: FakeHost, kernel: FakeKernel, tmp_path: Path) -> None:  # fmt: skip
    start(services, tmp_path)
    exec_sync(services, host, kernel.inits[0])
    with pytest.raises(ValueError, match="e1/web is already running"):
        start(services, tmp_path, generation=2, req_id=2)
    assert len(kernel.called("take_spare")) == 1
    assert not kernel.called("release_cgroup")  # the running service keeps its cgroup
    assert services.slots["e1/web"].init_pid is not None


def test_a_setup_failure_is_an_error_reply_and_its_cgroup_goes_at_once(
        services: Services, host: FakeHost, kernel: FakeKernel, tmp_path: Path) -> None:  # fmt: skip
    start(services, tmp_path)
    init = kernel.inits[0]
    init.send(b"unsupported:no cgroup namespace here")
    [pend] = host.pending.values()
    services.on_sync(pend)
    init.close()
    services.on_sync(pend)
    assert host.replies == [(1, ErrorReply("unsupported", "no cgroup namespace here"))]
    pid = pend.pid
    assert ("kill", pid, signal.SIGKILL) in kernel.calls
    assert kernel.called("release_cgroup") == [("release_cgroup", "e1/web")]


def test_the_exit_event_carries_the_runs_generation_and_whether_we_killed_it(
        services: Services, host: FakeHost, kernel: FakeKernel, tmp_path: Path) -> None:  # fmt: skip
    start(services, tmp_path, generation=3)
    exec_sync(services, host, kernel.inits[0])
    assert services.signal(2, SignalRequest("e1/web", signal.SIGKILL, "main")) == Done()
    assert kernel.called("thaw") and kernel.called("pidfd_send_signal") == [
        ("pidfd_send_signal", signal.SIGKILL)]
    pid = services.slots["e1/web"].init_pid
    assert pid is not None
    services.on_exit(pid, 137)
    assert host.sent == [ExitedEvent("e1/web", 3, 137, True, 1, 4096, 0.5)]
    services.on_exit(pid, 137)  # reaped once only: no second event
    assert len(host.sent) == 1


def test_release_drops_the_network_after_its_last_service(
        services: Services, host: FakeHost, kernel: FakeKernel, tmp_path: Path) -> None:  # fmt: skip
    start(services, tmp_path, "e1/web")
    exec_sync(services, host, kernel.inits[0])
    start(services, tmp_path, "e1/db", req_id=2)
    exec_sync(services, host, kernel.inits[1])
    services.release(3, ReleaseRequest(["e1/web"]))
    assert not kernel.called("drop_network")  # db is still on it
    assert kernel.called("cut_link") == [("cut_link", "e1/web")]
    services.release(4, ReleaseRequest(["e1/db"], disown="/tmp/envbox-x"))
    assert kernel.called("drop_network") == [("drop_network", "e1")]
    assert kernel.cgroups == set() and services.slots == {} and services.inits == {}
    assert host.disowned == ["/tmp/envbox-x"]
    assert len(kernel.called("end_init")) == 2


def test_every_request_type_has_exactly_one_handler_in_the_supervisors_table() -> None:
    from types import SimpleNamespace

    from pytest_envbox.supervisor import protocol
    from pytest_envbox.supervisor.exec import Execs
    from pytest_envbox.supervisor.hostports import HostPorts
    from pytest_envbox.supervisor.limits import ServiceCgroups
    from pytest_envbox.supervisor.network import Network
    from pytest_envbox.supervisor.records import RunRecord
    from pytest_envbox.supervisor.server import handler_table
    from pytest_envbox.supervisor.spares import Spares
    from pytest_envbox.supervisor.vips import Vips

    sup = SimpleNamespace(hello=print, census=print, shutdown=print,
                          services=Services(FakeHost(), FakeKernel()))  # type: ignore[arg-type]  # fmt: skip
    for name, concern in (("spares", Spares), ("network", Network), ("execs", Execs),
                          ("service_cgroups", ServiceCgroups), ("record", RunRecord),
                          ("host_ports", HostPorts), ("vips", Vips)):  # fmt: skip
        setattr(sup, name, concern(sup))  # type: ignore[arg-type]
    table = handler_table(sup)  # type: ignore[arg-type]
    requests = {t for t in protocol.MESSAGE_TYPES if issubclass(t, protocol.Request)}
    assert set(table) == requests | {protocol.ExecInput}  # and the part of a request that follows it
