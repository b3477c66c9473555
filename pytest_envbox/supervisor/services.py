"""Slots and their services' lifecycle: start (with one retry on a fresh sandbox), the exec'd
sync, signals, release, and the exit event of each run.

Every kernel-facing step goes through a :class:`~.slotkernel.SlotKernel`, so that this state
machine can be tested without root (``tests/unit/test_services.py``).
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
from dataclasses import dataclass, field
from typing import Protocol

from pytest_envbox.sandbox.status import Why
from pytest_envbox.supervisor.logs import LogPump, LogSink, close_sink, drain, open_log
from pytest_envbox.supervisor.network import env_of, network_error
from pytest_envbox.supervisor.protocol import (
    Done,
    ErrorReply,
    ExitedEvent,
    Handlers,
    Message,
    ReleaseRequest,
    Reply,
    SignalRequest,
    StartReply,
    StartRequest,
    Unsupported,
)
from pytest_envbox.supervisor.relay import Relay
from pytest_envbox.supervisor.rwlayers import make_rw, remove_rw, reuse_rw
from pytest_envbox.supervisor.slotkernel import SlotKernel
from pytest_envbox.supervisor.spares import SpareFailed, SpareUnsupported
from pytest_envbox.supervisor.statedir import remove_temp_dir
from pytest_envbox.supervisor.sync import Pending, close_sync, receive

__all__ = ["Services", "Slot", "SlotHost"]


@dataclass
class Slot:
    """A service's place: its network namespace and published ports outlive restarts."""

    netns_fd: int
    relays: dict[int, Relay] = field(default_factory=dict)
    init_pid: int | None = None
    main_pid: int | None = None
    #: a pidfd of the service: signals go through it, never to a pid that may have been reused
    main_pidfd: int | None = None
    generation: int = 0
    #: this run got a SIGKILL from us (stop, kill): its 137 is then no OOM kill
    killed: bool = False
    #: on its environment's network: its address, and its veth's name and index in the hub
    ip: str | None = None
    veth: str | None = None
    veth_index: int = 0
    #: this run's output (see LogSink); None once it has ended
    log: LogSink | None = None
    #: the file its output goes to (the run's record lists it, for `envbox logs`)
    log_path: str | None = None
    #: the signal that stops it (an image's StopSignal), instead of SIGTERM
    stop_signal: int | None = None


class SlotHost(Protocol):
    """What the slots need of the supervisor around them: its loop and its socket."""

    sel: selectors.BaseSelector
    #: sync socket fd -> the start or exec waiting on it (the loop prepares nothing meanwhile)
    pending: dict[int, Pending]

    def reply(self, req_id: int, reply: Reply) -> None: ...
    def send(self, msg: Message) -> None: ...
    def changed(self) -> None:
        """The run's record is out of date."""

    def disown(self, path: str) -> None:
        """Forget a directory the supervisor was to delete."""

    def maybe_done(self) -> None:
        """A detached supervisor ends once its kept services have all exited."""


class Services:
    """Every slot, and the init pids that are theirs."""

    def __init__(self, host: SlotHost, kernel: SlotKernel) -> None:
        self.host = host
        self.kernel = kernel
        self.slots: dict[str, Slot] = {}
        self.inits: dict[int, str] = {}  # init pid -> slot
        self.logs = LogPump(host.sel)  # the services' output, each within its CPU budget
        #: slot -> its writable layer (image services): kept across restarts, removed at
        #: release; listed in the run's record, for the janitor should this supervisor die
        self.rw: dict[str, str] = {}

    def handlers(self) -> Handlers:
        return {StartRequest: self.start, SignalRequest: self.signal, ReleaseRequest: self.release}

    # --- start --------------------------------------------------------------------------------

    def start(self, req_id: int, req: StartRequest) -> None:
        """Start a service (see :meth:`_start`); a start that fails leaves no cgroup behind."""
        try:
            self._start(req_id, req)
        except BaseException:
            s = self.slots.get(req.slot)
            if s is None or s.init_pid is None:
                self.kernel.release_cgroup(req.slot)
            raise
        return None  # the reply comes when the sandbox says it started (start_done)

    def _start(self, req_id: int, req: StartRequest) -> None:
        """Start a service in ``slot`` (created on first use, with its published ports).

        A new slot takes the spare's own network namespace; a restarted service goes back into its
        slot's, so that its address and published ports stay. ``generation`` numbers the starts
        of a slot; the client chooses it, so that an exit event is never matched to the wrong
        run, even after a start that failed half-way.
        """
        slot, net, k = req.slot, req.net, self.kernel
        old = self.slots.get(slot)
        if old is not None and old.init_pid is not None:
            raise ValueError(f"{slot} is already running")
        refused = k.limits_refused(req.limits)
        if refused is not None:
            raise Unsupported(refused)
        if req.plan.image is not None and req.plan.image.rw != self.rw.get(slot):
            make_rw(req.plan.image.rw)  # before the record lists it: nothing listed is not ours
            self.rw[slot] = req.plan.image.rw
            self.host.changed()
        elif req.plan.image is not None:
            reuse_rw(req.plan.image.rw)
        sink, log_fd = open_log(req.log_path)
        try:
            for attempt in (1, 2):  # a spare may have died while it waited: then one fresh try
                spare = k.take_spare(direct=attempt == 2)
                ctl = spare.ctl
                netns = None
                try:
                    netns, pid = k.await_ready(spare)
                    k.give_cgroup(slot, spare, pid, req.limits)
                    new = old is None and slot not in self.slots
                    wired = None
                    if new and req.join is not None:  # a pod's container: into its namespace
                        owner = self.slots.get(req.join)
                        if owner is None:
                            raise ValueError(f"{req.join} has no network namespace to join yet")
                        joined = os.dup(owner.netns_fd)
                        os.close(netns)
                        netns = joined
                        fds = [log_fd, netns]
                    elif new and net:
                        try:
                            wired = k.wire(slot, netns, net)
                        except OSError as e:  # not the spare's fault: no retry with another
                            raise network_error(e) from None
                        fds = [log_fd]
                    else:
                        fds = [log_fd] if new else [log_fd, self.slots[slot].netns_fd]
                    k.send_plan(spare, req.plan, fds)
                except (OSError, SpareFailed, ValueError, Unsupported) as e:
                    k.discard_spare(spare)  # the spare, if alive, exits on its end-of-file
                    if netns is not None:
                        os.close(netns)
                    if not isinstance(e, (OSError, SpareFailed)):  # refused: not the spare's fault
                        raise
                    k.spare_failed()  # no background preparing until a start succeeds
                    if isinstance(e, SpareUnsupported):
                        raise
                    if attempt == 2:
                        raise SpareFailed(str(e) or "the sandbox could not be prepared") from None
                    continue
                if new:
                    self.slots[slot] = Slot(netns_fd=netns)
                    if req.join is not None:  # the pod's address: relays reach it the same way
                        self.slots[slot].ip = self.slots[req.join].ip
                    elif wired is not None and net is not None:
                        s_new = self.slots[slot]
                        s_new.ip = net.ip
                        s_new.veth, s_new.veth_index = wired
                else:
                    os.close(netns)
                break
        except BaseException:
            os.close(sink.pipe)
            os.close(sink.file)
            raise
        finally:
            os.close(log_fd)
        s = self.slots[slot]
        if s.log is not None:  # the previous run's, if its output never ended (should not happen)
            drain(s.log)
            self._end_log(s)
        s.log = sink
        s.log_path = req.log_path
        self.logs.watch(sink)
        try:
            for port in req.ports:
                if port not in s.relays:
                    s.relays[port] = k.publish(slot, s, port)
        except BaseException:
            # The plan is sent: the sandbox is starting the service. Stop it, nothing half-made.
            with contextlib.suppress(ProcessLookupError):
                k.kill(pid)
            ctl.close()
            raise
        s.init_pid = pid
        s.main_pid = None
        s.generation = req.generation
        s.killed = False
        s.stop_signal = req.plan.stop_signal
        self.inits[pid] = slot
        pend = Pending("start", req_id, slot, ctl, pid)
        self.host.pending[ctl.fileno()] = pend
        self.host.sel.register(ctl, selectors.EVENT_READ, pend)

    def on_sync(self, pend: Pending) -> None:
        """The init says the service's command was exec'd (``exec``, with a pidfd of it), or
        why not; at end-of-file it has spawned the service and closed its end, or failed."""
        msg = receive(pend)
        if pend.got_exec and not pend.replied:
            self.start_done(pend)  # at once: the init's EOF follows in a moment
        if msg:
            return
        close_sync(self.host.sel, self.host.pending, pend)
        if not pend.replied:
            self.start_done(pend)

    def start_done(self, pend: Pending) -> None:
        pend.replied = True
        s = self.slots.get(pend.slot)
        pidfd, pend.pidfd = pend.pidfd, None
        # The service may have exited (and been reaped) already: its own event says so, and its
        # pid is then unknown (None).
        self.host.changed()
        if pend.error is None and pend.got_exec and s is not None:
            if s.init_pid == pend.pid:
                s.main_pid = pend.main_pid
                s.main_pidfd, pidfd = pidfd, None
            if pidfd is not None:
                os.close(pidfd)
            self.host.reply(pend.req_id, StartReply(pend.main_pid,
                                                    {p: r.host_port for p, r in s.relays.items()}))
        else:
            if pidfd is not None:
                os.close(pidfd)
            if s is not None and s.init_pid == pend.pid:
                # Its cgroup goes now, not at the next start or the environment's end. The init
                # is gone or going (it failed); the supervisor reaps it as usual.
                with contextlib.suppress(ProcessLookupError):
                    self.kernel.kill(pend.pid)
                self.kernel.release_cgroup(pend.slot)
            why = pend.error or Why("the sandbox exited during setup")
            self.host.reply(pend.req_id, ErrorReply("unsupported" if why.unsupported else "failed", why.text))

    # --- signals, output, exits ----------------------------------------------------------------

    def signal(self, req_id: int, req: SignalRequest) -> Done:
        """Signal the service (through its pidfd) or its init. Never a pid that is not ours.

        A paused service handles no signal until it is thawed: ``thaw`` (stop) and SIGKILL
        resume it first; any other signal waits, queued by the kernel, until ``resume()``.
        """
        s = self.slots[req.slot]
        sig = req.sig
        if req.thaw or sig == signal.SIGKILL:
            self.kernel.thaw(req.slot)
        if sig == signal.SIGKILL:
            s.killed = True
        elif req.thaw and sig == signal.SIGTERM and s.stop_signal:  # a stop: the image's signal
            sig = s.stop_signal
        with contextlib.suppress(ProcessLookupError):  # gone already: its exit event says so
            if req.target == "main" and s.main_pidfd is not None:
                self.kernel.pidfd_send_signal(s.main_pidfd, sig)
            elif s.init_pid is not None and s.init_pid > 0:
                self.kernel.kill(s.init_pid, sig)
        return Done()

    def on_output(self, sink: LogSink) -> None:
        """The service wrote: into its log file; at end of output, the file is finished."""
        if self.logs.drain(sink):
            self._end_output(sink)

    def _end_output(self, sink: LogSink) -> None:
        for s in self.slots.values():
            if s.log is sink:
                self._end_log(s)
                return
        close_sink(self.host.sel, sink)

    def _end_log(self, s: Slot) -> None:
        sink, s.log = s.log, None
        if sink is not None:
            close_sink(self.host.sel, sink)

    def _drain(self, s: Slot) -> None:
        """Its last words in the file before anyone looks."""
        if s.log is not None and drain(s.log):
            self._end_output(s.log)

    def on_exit(self, pid: int, code: int) -> None:
        """A child was reaped: if it was a slot's init, that run has ended; say so."""
        slot = self.inits.pop(pid, None)
        if slot is None:
            return
        s = self.slots.get(slot)
        if s is not None and s.init_pid == pid:
            s.init_pid = None
            s.main_pid = None
            self.host.changed()
            _close_pidfd(s)
            self._drain(s)  # its last words in the file before anyone looks
            figures = self.kernel.figures(slot)  # the run's totals, read before its cgroup goes
            peak, cpu = figures.get("memory_peak_bytes"), figures.get("cpu_seconds")
            self.host.send(ExitedEvent(slot, s.generation, code, s.killed,
                                       int(figures.get("oom_kills", 0)),
                                       None if peak is None else int(peak),
                                       None if cpu is None else float(cpu)))  # fmt: skip
            self.host.maybe_done()

    # --- release ------------------------------------------------------------------------------

    def release(self, req_id: int, req: ReleaseRequest) -> Done:
        """Free the slots (killing anything still running there); forget a directory."""
        self.release_slots(req.slots)
        if req.disown is not None:
            self.host.disown(req.disown)
        if req.remove is not None:  # the environment's volumes: files of the services' users,
            self.host.disown(req.remove)  # which only we can remove (rootless: subordinate ids)
            remove_temp_dir(req.remove)
        return Done()

    def release_slots(self, slots: list[str]) -> None:
        for slot in slots:  # each step of each slot, whatever an earlier one did
            self.kernel.thaw(slot)
            s = self.slots.pop(slot, None)
            if s is not None:
                with contextlib.suppress(Exception):
                    self._release(s)
                self.kernel.cut_link(slot, s)
            self.kernel.release_cgroup(slot)
            self._remove_rw(slot)
        self.host.changed()
        for env in {env_of(slot) for slot in slots}:
            if not any(env_of(other) == env for other in self.slots):
                self.kernel.drop_network(env)  # its last service is gone: so is its network

    def teardown(self) -> None:
        for slot in list(self.slots):
            self.kernel.thaw(slot)
            with contextlib.suppress(Exception):  # one slot's trouble must not keep the rest
                self._release(self.slots.pop(slot))
        for slot in list(self.rw):
            self._remove_rw(slot)

    def _remove_rw(self, slot: str) -> None:
        """The slot's writable layer goes (its processes are gone: nothing writes there now)."""
        path = self.rw.pop(slot, None)
        if path is not None:
            with contextlib.suppress(OSError):
                remove_rw(path)

    def _release(self, s: Slot, wait: float = 2.0) -> None:
        try:
            self._release_processes(s, wait)
        finally:
            if s.log is not None:
                drain(s.log)
                self._end_log(s)

    def _release_processes(self, s: Slot, wait: float) -> None:
        _close_pidfd(s)
        for r in s.relays.values():
            r.close()
        s.relays.clear()
        if s.init_pid is not None:
            pid = s.init_pid
            self.kernel.end_init(pid, wait)
            self.inits.pop(pid, None)
            s.init_pid = None
        os.close(s.netns_fd)


def _close_pidfd(s: Slot) -> None:
    fd, s.main_pidfd = s.main_pidfd, None
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)
