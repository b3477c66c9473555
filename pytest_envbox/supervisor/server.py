"""The supervisor: one helper process per test process that owns every sandbox resource.

It is started once per pytest process (and per xdist worker) by :mod:`pytest_envbox.engine.client`, from
a fresh interpreter so that nothing of the test process (threads, locks, open files) leaks into it.
It then forks every sandbox from itself, a warm process, which costs far less than a new interpreter
per service.

Why a separate process: teardown must happen even when the test process is SIGKILLed. The test
process holds the only other end of the supervisor's socket; its death is an EOF here, at once, and
the supervisor tears everything down and exits. If the supervisor itself is SIGKILLed, every
sandbox's init has PR_SET_PDEATHSIG=SIGKILL pointed at it, and an init's death ends its whole PID
namespace: nothing survives either way.

Nothing here assumes real root beyond what a user namespace grants (namespaces, mounts, setns on
namespaces we created), so the same code can run inside a user namespace of its own (rootless).

Concurrency: one thread runs the event loop and does every fork (``PR_SET_PDEATHSIG`` is tied to the
forking thread, which must live as long as the supervisor). Relays run in threads of their own.
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import gc
import json
import os
import select
import selectors
import signal
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pytest_envbox.kernel import cgroups, netlink, nftables, seccomp
from pytest_envbox.kernel import linux as L
from pytest_envbox.sandbox.init import close_fds_except, exec_command, run_spare
from pytest_envbox.sandbox.plan import SandboxPlan
from pytest_envbox.supervisor import records
from pytest_envbox.supervisor.protocol import FrameReader, encode
from pytest_envbox.supervisor.relay import Relay

_NS_FOR_EXEC = (("ipc", L.CLONE_NEWIPC), ("uts", L.CLONE_NEWUTS), ("net", L.CLONE_NEWNET),
                ("cgroup", L.CLONE_NEWCGROUP), ("pid", L.CLONE_NEWPID),
                ("mnt", L.CLONE_NEWNS))  # fmt: skip


#: A service's log file grows to this size at most; later output is counted, its last
#: ``LOG_TAIL`` bytes kept, and written after a marker line when the service's output ends.
LOG_CAP = 64 << 20
LOG_TAIL = 64 << 10
#: Hubs of closed environments kept for the next ones (see Supervisor._drop_hub).
MAX_FREE_HUBS = 4


@dataclass
class _LogSink:
    """Where a service's stdout and stderr go: a pipe the supervisor empties into its log file.

    A pipe, not the file itself, so that a service that floods its output cannot fill the disk
    (see LOG_CAP). ``splice`` moves the bytes without copying them through this process.
    """

    pipe: int
    file: int
    written: int
    dropped: int = 0
    tail: bytearray = field(default_factory=bytearray)
    #: why the file could not take more (a full disk, say): the rest is counted, as past the cap
    failed: str | None = None


@dataclass
class _Slot:
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
    #: this run's output (see _LogSink); None once it has ended
    log: _LogSink | None = None


@dataclass
class _Hub:
    """An environment's network: a namespace of its own holding the bridge every service is on.

    Nothing of it is in the host's namespace: two environments (two xdist workers) may use the
    same subnet. When its environment ends, it is reset and kept for the next one (see
    ``Supervisor._drop_hub``); closing ``netns`` frees it all: bridge, veths, addresses. So does
    the supervisor's death.
    """

    netns: int
    nl: netlink.Netlink
    bridge: int
    veths: int = 0  # veths made on it so far, also by earlier environments (names stay unique)
    gateway: tuple[str, int] | None = None  # its address on the environment's subnet
    #: faults made of drop rules (nftables.py): veth -> percent lost; partitions between groups
    loss: dict[str, int] = field(default_factory=dict)
    partitions: list[tuple[list[str], list[str]]] = field(default_factory=list)


@dataclass
class _Pending:
    """A start (or an exec) waiting for its sync socket to say exec happened, or why not."""

    kind: str  # "start" | "exec"
    req_id: int
    slot: str
    sock: socket.socket
    pid: int  # init (start) or helper (exec)
    main_pid: int | None = None
    pidfd: int | None = None
    got_exec: bool = False
    error: str | None = None
    replied: bool = False


@dataclass
class _Exec:
    req_id: int
    pid: int
    deadline: float | None
    stdin: bytes
    out: bytearray = field(default_factory=bytearray)
    err: bytearray = field(default_factory=bytearray)
    fds: dict[int, str] = field(default_factory=dict)  # open pipe fd -> "out" | "err" | "in"
    status: int | None = None
    timed_out: bool = False
    error: str | None = None
    command_pid: int | None = None  # host pid of the command itself (the helper's child)
    #: its sync socket reached EOF: any setup error it carried is known (see _maybe_finish_exec)
    synced: bool = False


class Supervisor:
    """The event loop and the resources it owns."""

    def __init__(self, sock: socket.socket, *, refused: str | None = None) -> None:
        #: why this supervisor cannot serve (rootless mode on a host without user namespaces):
        #: the answer to ``hello``, so that the caller raises HostUnsupported before any start
        self.refused = refused
        self.sock = sock
        self.sel = selectors.DefaultSelector()
        self.reader = FrameReader()
        self.slots: dict[str, _Slot] = {}
        self.hubs: dict[str, _Hub] = {}  # environment id -> its network
        self.hub_ahead: _HubAhead | None = None  # the next environment's hub (see _hub)
        self.free_hubs: list[_Hub] = []  # hubs of closed environments, reset for the next
        self.want_hub = False  # only once an environment had a network
        self.inits: dict[int, str] = {}  # init pid -> slot
        self.pending: dict[int, _Pending] = {}  # sync socket fd -> pending
        self.execs: dict[int, _Exec] = {}  # helper pid -> exec
        self.dirs: set[str] = set()
        self.spares: list[_Spare] = []  # prepared inits (_spawn_spare)
        self.want_spare = True  # False after a spare died unused: then prepare on demand only
        # How many spares to keep ready between starts: the widest level asked for lately (a
        # test suite starts the same environments again and again), at least one, at most 8.
        self.spare_target = 1
        self.running = True
        self.devnull = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
        r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self.sigchld_r = r
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, lambda *_: self._stop())
        self.sel.register(sock, selectors.EVENT_READ, "control")
        self.sel.register(r, selectors.EVENT_READ, "sigchld")
        # Orphans of our sandboxes (and the spares, see _start_zygote) are reaped here.
        L.set_child_subreaper()
        # Every service gets a cgroup below ours (see cgroups.py); runs SIGKILLed earlier left
        # theirs behind, empty: remove them first.
        self.cgroups_host = cgroups.detect()
        # This run's record for `envbox ps` (state.py), written when idle.
        self.state_name = cgroups.run_name(os.getpid())
        self.state_dirty = False
        self.state_writer: _StateWriter | None = None  # started on first use (after the zygote)
        self.watched: list[int] = []
        self.test_pid = os.getppid()  # (once detached, our parent is no longer the test process)
        self.watch_fds: list[int] = []  # pidfds of the processes in ``watched``
        # --envbox-keep: environments (id -> why) to leave running when the test process ends;
        # once it has, the supervisor is detached and serves them until SIGTERM (`envbox clean`).
        self.kept: dict[str, str] = {}
        self.detached = False
        # What dead runs left (cgroups, records) goes now, by whichever of the supervisors
        # starting together (xdist workers) takes the janitor's lock; never a live run's.
        with records.janitor() as mine:
            if mine:
                cgroups.clean_stale(self.cgroups_host)
                with contextlib.suppress(OSError):
                    records.clean_stale()
        self.cgroups = cgroups.CgroupTree(cgroups.CgroupHost("none"), "")  # made at hello
        self._start_zygote()

    def _stop(self) -> None:
        self.running = False

    # --- main loop ---------------------------------------------------------------------------

    def serve(self) -> None:
        try:
            while self.running:
                timeout = self._next_deadline()
                for key, _ in self.sel.select(timeout):
                    tag = key.data
                    if tag == "control":
                        self._on_control()
                    elif tag == "watched":  # a process we must not outlive has died
                        self.running = False
                    elif tag == "sigchld":
                        with contextlib.suppress(OSError):
                            os.read(self.sigchld_r, 4096)
                        self._reap()
                    elif isinstance(tag, _LogSink):
                        self._drain(tag)
                    elif isinstance(tag, _Pending):
                        self._on_sync(tag)
                    elif isinstance(tag, tuple):
                        self._on_exec_pipe(*tag)
                self._check_deadlines()
                self._reap()  # a SIGCHLD racing with a select() timeout must not be lost
                # Prepare the next sandbox off the critical path: only while no start is in
                # flight (forking and making a namespace take this thread a millisecond or two,
                # which a waiting start would otherwise pay).
                while (self.running and not self.pending and self.want_spare
                        and len(self.spares) < self.spare_target):  # fmt: skip
                    self._spawn_spare()
                if self.running and not self.pending and self.state_dirty:
                    self._write_state()
                if (self.running and not self.pending and self.want_hub and self.hub_ahead is None
                        and not self.free_hubs):  # fmt: skip
                    self.hub_ahead = _HubAhead()
        finally:
            self.teardown()

    def _send(self, msg: dict[str, Any]) -> None:
        try:
            self.sock.sendall(encode(msg))
        except OSError:  # the test process is gone: tear down (unless it asked to keep, see _detach)
            if not (self.detached or self.kept):
                self.running = False

    def _reply(self, req_id: int, **kw: Any) -> None:
        self._send({"id": req_id, **kw})

    def _on_control(self) -> None:
        try:
            data = self.sock.recv(1 << 16)
        except OSError:
            data = b""
        if not data:  # the test process is gone: tear down now, unless it asked to keep
            if self.kept and not self.detached:
                self._detach()
            if self.detached:
                self.sel.unregister(self.sock)
                self.sock.close()
            else:
                self.running = False
            return
        for msg in self.reader.feed(data):
            req_id = msg.pop("id")
            op = msg.pop("op")
            handler = _OPS.get(op)
            try:
                if handler is None:
                    raise ValueError(f"unknown operation {op!r}")
                result = handler(self, req_id, **msg)
            except Exception as e:  # reported to the caller, who raises it
                self._reply(req_id, error=f"{type(e).__name__}: {e}", errno=getattr(e, "errno", None))
                continue
            if result is not None:
                self._reply(req_id, **result)

    # --- operations --------------------------------------------------------------------------

    def op_hello(self, req_id: int, watch: list[int] | None = None) -> dict[str, Any]:
        """Greet; also tear down when any of ``watch`` dies (as when the test process does).

        The cgroups are made here, not in ``__init__``: the caller gets any problem with them in
        the reply, before it starts a service.
        """
        if self.refused is not None:
            self.running = False
            raise ValueError(f"unsupported:{self.refused}")
        self.cgroups = cgroups.CgroupTree(self.cgroups_host, cgroups.run_name(os.getpid()))
        self.watched = list(watch or ())
        self.state_dirty = True
        for pid in watch or ():
            try:
                fd = os.pidfd_open(pid)
            except OSError:  # already gone
                self.running = False
                continue
            self.watch_fds.append(fd)
            self.sel.register(fd, selectors.EVENT_READ, "watched")
        return {"pid": os.getpid(), "cgroups": {"version": self.cgroups.host.version,
                                                "problem": self.cgroups.problem},
                "ids": {"uid": _id_map("uid_map"), "gid": _id_map("gid_map")}}

    def _start_zygote(self) -> None:
        """Fork the process that forks spares, while this one is still small and single-threaded.

        Forking the supervisor itself takes its loop thread about a millisecond, which a request
        would wait for; asking the zygote takes a few microseconds. The zygote's children
        (the spares) are made children of the supervisor (``CLONE_PARENT``), so their exits are
        reaped here as if it had forked them.
        """
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        seccomp.program()  # assembled once, here: every sandbox forked from now on has it
        gc.freeze()  # objects the collector never walks: fewer pages copied after fork
        _fork_running(_zygote, theirs, close=ours, code=0)
        theirs.close()
        self.zygote: socket.socket | None = ours

    def _spawn_spare(self, direct: bool = False) -> None:
        """Have the next sandbox's init prepared (see :func:`sandbox.init.run_spare`).

        By the zygote; by a fork of our own (slower) when it is gone or ``direct`` is asked.
        """
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        parent.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)  # the spare's pid, on ready
        cg, fds, into = self._spare_cgroup()
        try:
            if self.zygote is None or direct:
                raise OSError("no zygote")
            socket.send_fds(self.zygote, [b"spare-into" if into else b"spare"], [child.fileno(), *fds])
        except OSError:
            if not direct:
                self.zygote = None  # it died
            if into and cg is not None:  # a fork of ours moves itself in, the v1 way
                for fd in fds:
                    os.close(fd)
                fds, into = [os.open(f, os.O_WRONLY | os.O_CLOEXEC) for f in cg.procs_files()], False
            # The child is PID 1 of a new PID namespace (cloned so: unshare and setns back would
            # not do in rootless mode, where our own PID namespace is out of reach once left).
            # A raw clone is safe only in a single-threaded process, and we have relay threads:
            # a forked helper clones the spare as our child (CLONE_PARENT), as the zygote does.
            helper = os.fork()
            if helper == 0:  # pragma: no cover - the helper
                code = 125
                try:
                    parent.close()
                    if L.fork_with(L.CLONE_PARENT | L.CLONE_NEWPID, python_fixups=False) == 0:
                        run_spare(child, fds)
                    code = 0
                finally:
                    os._exit(code)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(helper, 0)
        finally:
            for fd in fds:
                os.close(fd)
        child.close()
        self.spares.append(_Spare(parent, cg))

    def _spare_cgroup(self) -> tuple[cgroups.ServiceCgroup | None, list[int], bool]:
        """A new cgroup for the next spare, and how it gets in, off the start's path: on cgroup
        v2 the zygote clones it straight in (the cgroup's directory fd, ``True``: no move at
        all); otherwise the spare writes itself into the ``cgroup.procs`` files opened here."""
        if not self.cgroups.usable:
            return None, [], False
        fds: list[int] = []
        cg = None
        try:
            cg = self.cgroups.new()
            if cg.v2 and cg.unified is not None:
                return cg, [os.open(cg.unified, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)], True
            for path in cg.procs_files():
                fds.append(os.open(path, os.O_WRONLY | os.O_CLOEXEC))
        except (OSError, cgroups.CgroupError):
            for fd in fds:
                os.close(fd)
            if cg is not None:
                self.cgroups.discard(cg)
            return None, [], False  # then the start moves it (see _give_cgroup)
        return cg, fds, False

    def op_start(self, req_id: int, slot: str, plan: dict[str, Any], log_path: str,
                 ports: list[int], generation: int, limits: dict[str, Any] | None = None,
                 net: dict[str, Any] | None = None) -> dict[str, Any] | None:  # fmt: skip
        """Start a service (see :meth:`_start`); a start that fails leaves no cgroup behind."""
        try:
            self._start(req_id, slot, plan, log_path, ports, generation, limits, net)
        except BaseException:
            s = self.slots.get(slot)
            if s is None or s.init_pid is None:
                self.cgroups.release(slot)
            raise
        return None  # the reply comes when the sandbox says it started (_start_done)

    def _start(self, req_id: int, slot: str, plan: dict[str, Any], log_path: str,
               ports: list[int], generation: int, limits: dict[str, Any] | None,
               net: dict[str, Any] | None) -> None:  # fmt: skip
        """Start a service in ``slot`` (created on first use, with its published ports).

        A new slot takes the spare's own network namespace; a restarted service goes back into its
        slot's, so that its address and published ports stay. ``generation`` numbers the starts
        of a slot; the client chooses it, so that an exit event is never matched to the wrong
        run, even after a start that failed half-way.
        """
        old = self.slots.get(slot)
        if old is not None and old.init_pid is not None:
            raise ValueError(f"{slot} is already running")
        if not self.cgroups.usable and limits and any(v is not None for v in limits.values()):
            raise ValueError(f"unsupported:{self.cgroups.problem}")
        # Not O_APPEND (splice refuses it): only this process writes the file, at its end.
        log_file = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        os.lseek(log_file, 0, os.SEEK_END)
        sink = _LogSink(-1, log_file, 0)  # the cap is per run
        sink.pipe, log_fd = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        os.set_blocking(log_fd, True)  # the service's end: blocking, as a file would be
        with contextlib.suppress(OSError):
            fcntl.fcntl(log_fd, 1031, 1 << 20)  # F_SETPIPE_SZ: fewer wake-ups for a chatty service
        try:
            for attempt in (1, 2):  # a spare may have died while it waited: then one fresh try
                if not self.spares:
                    self._spawn_spare(direct=attempt == 2)
                spare = self.spares.pop(0)
                ctl = spare.ctl
                self.want_spare = True
                netns = None
                try:
                    netns, pid = _await_ready(ctl)
                    if self.cgroups.usable:
                        self._give_cgroup(slot, spare, pid, limits)
                    new = old is None and slot not in self.slots
                    wired = None
                    if new and net:
                        try:
                            wired = self._wire(slot, netns, net)
                        except OSError as e:  # not the spare's fault: no retry with another
                            raise ValueError(_network_unsupported(e)) from None
                    fds = [log_fd] if new else [log_fd, self.slots[slot].netns_fd]
                    socket.send_fds(ctl, [json.dumps(plan).encode()], fds)
                except (OSError, SpareFailed, ValueError) as e:
                    ctl.close()  # the spare, if alive, exits on this end-of-file
                    if spare.cgroup is not None:
                        self.cgroups.discard(spare.cgroup)
                    if netns is not None:
                        os.close(netns)
                    if isinstance(e, ValueError):
                        raise
                    self.want_spare = False  # no background preparing until a start succeeds
                    if attempt == 2 or str(e).startswith("unsupported:"):
                        raise SpareFailed(str(e) or "the sandbox could not be prepared") from None
                    continue
                if new:
                    self.slots[slot] = _Slot(netns_fd=netns)
                    if wired is not None and net is not None:
                        s_new = self.slots[slot]
                        s_new.ip = net["ip"]
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
            self._drain(s.log)
            self._end_log(s)
        s.log = sink
        self.sel.register(sink.pipe, selectors.EVENT_READ, sink)
        hub = self.hubs.get(_env_of(slot))
        try:
            for port in ports:
                if port not in s.relays:
                    via = (hub.netns, s.ip) if hub is not None and s.ip is not None else None
                    s.relays[port] = Relay(s.netns_fd, port, via=via)
        except BaseException:
            # The plan is sent: the sandbox is starting the service. Stop it, nothing half-made.
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            ctl.close()
            raise
        s.init_pid = pid
        s.main_pid = None
        s.generation = generation
        s.killed = False
        self.inits[pid] = slot
        pend = _Pending("start", req_id, slot, ctl, pid)
        self.pending[ctl.fileno()] = pend
        self.sel.register(ctl, selectors.EVENT_READ, pend)
        return None

    def _on_sync(self, pend: _Pending) -> None:
        try:
            msg, anc, _flags, _addr = pend.sock.recvmsg(  # fds (close-on-exec) and credentials
                4096, socket.CMSG_SPACE(16) + socket.CMSG_SPACE(12), socket.MSG_CMSG_CLOEXEC)
        except OSError:
            msg, anc = b"", []
        for level, typ, data in anc:
            if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                for fd in array.array("i", data[: len(data) - len(data) % 4]):
                    if pend.kind == "start" and pend.pidfd is None:
                        pend.pidfd = fd  # the service: kept, to signal it safely
                        pend.main_pid = _pidfd_pid(fd)  # None if it is already gone
                    else:
                        os.close(fd)
            elif level == socket.SOL_SOCKET and typ == socket.SCM_CREDENTIALS and pend.kind == "exec":
                # exec's command reports itself; a start's init sends a pidfd of the service.
                pid = int.from_bytes(data[:4], sys.byteorder, signed=True)
                pend.main_pid = pend.main_pid or (pid if pid > 0 else None)
        if msg.startswith(b"error:"):
            pend.error = msg[6:].decode(errors="replace")
        elif msg.startswith(b"unsupported:"):
            pend.error = msg.decode(errors="replace")
        elif msg == b"exec" and pend.kind == "start":
            pend.got_exec = True
            self._start_done(pend)  # at once: the init's EOF follows in a moment
        if msg:
            return
        # EOF: the init has spawned the service and closed its end, or failed.
        self.sel.unregister(pend.sock)
        del self.pending[pend.sock.fileno()]
        pend.sock.close()
        if pend.kind == "start":
            if not pend.replied:
                self._start_done(pend)
        else:
            ex = self.execs.get(pend.pid)
            if ex is not None:
                ex.error = pend.error
                ex.command_pid = pend.main_pid
                ex.synced = True
                self._maybe_finish_exec(ex)

    def _wire(self, slot: str, netns: int, net: dict[str, Any]) -> tuple[str, int]:
        """Put a new service on its environment's network: a veth pair, ``eth0`` inside with its
        address (and the subnet's route, no default route: nothing beyond the network), the
        other end on the environment's bridge. Four netlink requests (see netlink.py)."""
        hub = self._hub(_env_of(slot), net)
        hub.veths += 1
        name = f"v{hub.veths}"
        index = netlink.attach(hub.nl, hub.bridge, name, netns, net["ip"], int(net["prefix"]))
        return name, index

    def _hub(self, env: str, net: dict[str, Any]) -> _Hub:
        """The environment's hub: the one made ahead if there is one (a new network namespace
        costs about a millisecond, and more while the kernel is freeing others), with its
        address now; its next one is made when the loop is idle (see serve)."""
        hub = self.hubs.get(env)
        if hub is not None:
            return hub
        if self.free_hubs:
            hub = self.free_hubs.pop()  # a closed environment's, reset (see _drop_hub)
        else:
            ahead, self.hub_ahead = self.hub_ahead, None
            made = ahead.take() if ahead is not None else None
            if ahead is not None and made is None:
                self.want_hub = False  # it failed: made on demand from now on (its error shown)
            hub = _Hub(*(made or netlink.make_hub()))
            self.want_hub = True
        gateway = (net["gateway"], int(net["prefix"]))
        try:
            hub.nl.add_address(hub.bridge, *gateway)  # published ports reach services from here
        except BaseException:
            self._close_hub(hub)
            raise
        hub.gateway = gateway
        self.hubs[env] = hub
        return hub

    def _drop_hub(self, env: str) -> None:
        """The environment's network is done with: its hub is reset and kept for the next one.

        Destroying a namespace with a bridge in it holds the kernel's RTNL lock for tens of
        milliseconds (seen here: 50 to 160 ms, every third or fourth time), and every network
        change of every other start waits for it. A reset hub is as good as new: the services'
        veths were cut off at their release (down) and go with their namespaces; here its
        address, its fault rules and its neighbour entries (the bridge goes down and up) go.
        """
        hub = self.hubs.pop(env, None)
        if hub is None:
            return
        if self.running and not self.detached and len(self.free_hubs) < MAX_FREE_HUBS:
            try:
                if hub.loss or hub.partitions:
                    netlink.call_in(hub.netns, lambda: nftables.replace_table("envbox", []))
                if hub.gateway is not None:
                    hub.nl.del_address(hub.bridge, *hub.gateway)
                hub.nl.set_up(hub.bridge, False)  # down and up: its neighbour entries are flushed
                hub.nl.set_up(hub.bridge, True)
            except Exception:
                pass  # not reusable: closed below
            else:
                self.free_hubs.append(_Hub(hub.netns, hub.nl, hub.bridge, veths=hub.veths))
                return
        self._close_hub(hub)

    def _close_hub(self, hub: _Hub) -> None:
        hub.nl.close()
        os.close(hub.netns)

    def _give_cgroup(self, slot: str, spare: _Spare, pid: int, limits: dict[str, Any] | None) -> None:
        """The service's cgroup for this run: the spare's own, with the limits in place before
        the service's first instruction. A spare prepared before cgroups were set up (or without
        one) is moved into a new cgroup here, on the start's path (see :meth:`cgroups.CgroupTree.new`)."""
        cg, spare.cgroup = spare.cgroup, None
        if cg is None:
            cg = self.cgroups.new()
            try:
                cg.add(pid)  # the init, so every process of the service, from the start
            except OSError:
                self.cgroups.discard(cg)
                raise
        self.cgroups.adopt(slot, cg)
        try:
            cg.set_limits(**(limits or {}))
        except OSError as e:
            why = e.strerror
            if e.errno == errno.EBUSY:
                used = cg.stats()["memory_bytes"]
                why = (f"the sandbox's init already uses {cgroups.format_memory(int(used))} "
                       "of memory; raise the memory limit")  # fmt: skip
            raise ValueError(f"the kernel refused the limits {limits}: {why}") from None

    def _start_done(self, pend: _Pending) -> None:
        pend.replied = True
        s = self.slots.get(pend.slot)
        pidfd, pend.pidfd = pend.pidfd, None
        # The service may have exited (and been reaped) already: its own event says so, and its
        # pid is then unknown (None).
        self.state_dirty = True
        if pend.error is None and pend.got_exec and s is not None:
            if s.init_pid == pend.pid:
                s.main_pid = pend.main_pid
                s.main_pidfd, pidfd = pidfd, None
            if pidfd is not None:
                os.close(pidfd)
            self._reply(pend.req_id, pid=pend.main_pid,
                        ports={str(p): r.host_port for p, r in s.relays.items()})  # fmt: skip
        else:
            if pidfd is not None:
                os.close(pidfd)
            if s is not None and s.init_pid == pend.pid:
                # Its cgroup goes now, not at the next start or the environment's end. The init
                # is gone or going (it failed); the supervisor reaps it as usual.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pend.pid, signal.SIGKILL)
                self.cgroups.release(pend.slot)
            self._reply(pend.req_id, error=pend.error or "the sandbox exited during setup",
                        setup=True)  # fmt: skip

    def op_signal(self, req_id: int, slot: str, sig: int, target: str = "init",
                  thaw: bool = False) -> dict[str, Any]:  # fmt: skip
        """Signal the service (through its pidfd) or its init. Never a pid that is not ours.

        A paused service handles no signal until it is thawed: ``thaw`` (stop) and SIGKILL
        resume it first; any other signal waits, queued by the kernel, until ``resume()``.
        """
        s = self.slots[slot]
        if thaw or sig == signal.SIGKILL:
            self._thaw(slot)
        if sig == signal.SIGKILL:
            s.killed = True
        try:
            if target == "main" and s.main_pidfd is not None:
                signal.pidfd_send_signal(s.main_pidfd, sig)
            elif s.init_pid is not None and s.init_pid > 0:
                os.kill(s.init_pid, sig)
            else:
                return {"sent": False}
        except ProcessLookupError:
            return {"sent": False}
        return {"sent": True}

    def op_tcp_check(self, req_id: int, slot: str, port: int) -> dict[str, Any]:
        """Does ``port`` accept a connection on the service's loopback, in its namespace?"""
        s = self.slots[slot]

        def make() -> list[tuple[socket.socket, str]]:
            socks = []
            addrs = [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")]
            if s.ip is not None:  # a service may listen on its network address only
                addrs.append((socket.AF_INET, s.ip))
            for family, addr in addrs:
                with contextlib.suppress(OSError):  # no IPv6 on this host: IPv4 only
                    socks.append((socket.socket(family, socket.SOCK_STREAM), addr))
            return socks

        socks = netlink.call_in(s.netns_fd, make)
        ok = False
        for sk, addr in socks:
            with sk:
                sk.settimeout(0.2)  # loopback answers at once; a full backlog is "not yet"
                if not ok:
                    with contextlib.suppress(OSError):
                        sk.connect((addr, port))
                        ok = True
        return {"ok": ok}

    def op_exec(self, req_id: int, slot: str, plan: dict[str, Any], argv: list[str],
                input: str | None, timeout: float | None) -> None:  # fmt: skip
        s = self.slots[slot]
        if s.init_pid is None:
            raise ValueError("the service is not running")
        cg = self.cgroups.services.get(slot)
        if cg is not None and cg.frozen:
            raise ValueError("the service is paused: its cgroup would freeze the command too; "
                             "resume() it first")  # fmt: skip
        p = SandboxPlan.from_dict(plan)
        ns_fds = [(os.open(f"/proc/{s.init_pid}/ns/{n}", os.O_RDONLY | os.O_CLOEXEC), t)
                  for n, t in _NS_FOR_EXEC]  # fmt: skip
        pipes = [os.pipe2(os.O_CLOEXEC) for _ in range(3)]  # stdin, stdout, stderr
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        parent.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)  # the command's host pid
        procs = cg.procs_files() if cg is not None else []
        into = None
        try:
            if cg is not None and cg.v2 and cg.unified is not None:
                # The command is cloned straight into the service's cgroup: no move, no
                # grace-period wait. By the helper, which is single-threaded: a raw clone3 here,
                # beside the supervisor's other threads, could copy a lock one of them holds
                # (glibc's malloc locks, say) and hang the child.
                with contextlib.suppress(OSError):
                    into = os.open(cg.unified, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            pid = _fork_running(_exec_helper, p, argv, ns_fds, [] if into is not None else procs,
                                (pipes[0][0], pipes[1][1], pipes[2][1]), child, into,
                                close=parent, code=126)  # fmt: skip
        finally:
            if into is not None:
                os.close(into)
            for fd, _ in ns_fds:
                os.close(fd)
            os.close(pipes[0][0])
            os.close(pipes[1][1])
            os.close(pipes[2][1])
            child.close()
        ex = _Exec(req_id, pid, time.monotonic() + timeout if timeout is not None else None,
                   (input or "").encode())  # fmt: skip
        self.execs[pid] = ex
        for fd, kind, ev in ((pipes[0][1], "in", selectors.EVENT_WRITE),
                             (pipes[1][0], "out", selectors.EVENT_READ),
                             (pipes[2][0], "err", selectors.EVENT_READ)):  # fmt: skip
            os.set_blocking(fd, False)
            ex.fds[fd] = kind
            self.sel.register(fd, ev, (ex, fd))
        pend = _Pending("exec", req_id, slot, parent, pid)
        self.pending[parent.fileno()] = pend
        self.sel.register(parent, selectors.EVENT_READ, pend)
        return None

    def _on_exec_pipe(self, ex: _Exec, fd: int) -> None:
        kind = ex.fds[fd]
        try:
            if kind == "in":
                n = os.write(fd, ex.stdin[:65536])
                ex.stdin = ex.stdin[n:]
                if not ex.stdin:
                    self._close_exec_fd(ex, fd)
                return
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close_exec_fd(ex, fd)
            return
        (ex.out if kind == "out" else ex.err).extend(data)

    def _close_exec_fd(self, ex: _Exec, fd: int) -> None:
        self.sel.unregister(fd)
        os.close(fd)
        del ex.fds[fd]
        self._maybe_finish_exec(ex)

    def _maybe_finish_exec(self, ex: _Exec) -> None:
        readers_open = any(k != "in" for k in ex.fds.values())
        # The command's exit, its output and its sync socket's EOF come in any order: a command
        # that could not be run says why on the socket, which must be read before the reply.
        if ex.status is None or not ex.synced or (readers_open and not ex.timed_out):
            return
        for fd in list(ex.fds):
            self.sel.unregister(fd)
            os.close(fd)
        ex.fds.clear()
        del self.execs[ex.pid]
        self._reply(ex.req_id, returncode=ex.status, stdout=ex.out.decode(errors="replace"),
                    stderr=ex.err.decode(errors="replace"), timed_out=ex.timed_out,
                    exec_error=ex.error)  # fmt: skip

    def op_release(self, req_id: int, slots: list[str], disown: str | None = None) -> dict[str, Any]:
        """Free the slots (killing anything still running there); forget a directory."""
        for slot in slots:  # each step of each slot, whatever an earlier one did
            self._thaw(slot)
            s = self.slots.pop(slot, None)
            if s is not None:
                with contextlib.suppress(Exception):
                    self._release(s)
                hub = self.hubs.get(_env_of(slot))
                if hub is not None and s.veth_index:
                    # Its hub will be reused: its veth is cut off now (down: nothing crosses it
                    # any more), and deleted with the service's namespace, by the kernel, later.
                    # (Deleting it here would wait ten milliseconds or more for the kernel.)
                    with contextlib.suppress(OSError):
                        hub.nl.set_up(s.veth_index, False)
            self.cgroups.release(slot)
        self.state_dirty = True
        for env in {_env_of(slot) for slot in slots}:
            if not any(_env_of(other) == env for other in self.slots):
                self._drop_hub(env)  # its last service is gone: so is its network
        if disown is not None:
            self.dirs.discard(disown)
        return {}

    def op_link(self, req_id: int, slot: str, action: str, delay_ms: float = 0.0,
                jitter_ms: float = 0.0, percent: int = 0) -> dict[str, Any]:  # fmt: skip
        """A fault on the service's link, applied on the hub's end of its veth pair.

        ``down``/``up``: the link state (the service's ``eth0`` loses its carrier). ``delay``:
        netem on the hub's end, so packets *to* the service wait (a round trip grows by the
        delay). ``loss``: a drop rule on the bridge for that share of packets, each way.
        ``clear``: none of these, link up. The service, without CAP_NET_ADMIN, can undo none.
        """
        s = self.slots.get(slot)
        hub = self.hubs.get(_env_of(slot))
        if s is None or hub is None or s.veth is None:
            raise ValueError("the service is not on a network (it has not been started)")
        if action in ("down", "up"):
            hub.nl.set_up(s.veth_index, action == "up")
        elif action == "delay":
            try:
                hub.nl.netem(s.veth_index, delay_ms, jitter_ms)
            except OSError as e:
                if e.errno == errno.ENOENT:
                    raise ValueError(
                        "unsupported:link.delay() needs the kernel's netem queueing discipline "
                        "(sch_netem), which this kernel does not have: load it with `modprobe "
                        "sch_netem` (Debian and Ubuntu ship it in linux-modules-extra or the "
                        "stock kernel), or use a kernel built with CONFIG_NET_SCH_NETEM") from None
                raise
        elif action == "loss":
            loss = {k: v for k, v in hub.loss.items() if k != s.veth}
            if percent:
                loss[s.veth] = percent
            self._apply_faults(hub, loss=loss)
        elif action == "clear":
            hub.nl.clear_qdisc(s.veth_index)
            hub.nl.set_up(s.veth_index, True)
            if s.veth in hub.loss:
                self._apply_faults(hub, loss={k: v for k, v in hub.loss.items() if k != s.veth})
        else:
            raise ValueError(f"unknown link action {action!r}")
        return {}

    def op_partition(self, req_id: int, env: str, a: list[str], b: list[str]) -> dict[str, Any]:
        """Drop all traffic between the services of group ``a`` and those of group ``b``."""
        hub = self.hubs.get(env)
        if hub is None:
            raise ValueError("the environment has no network yet (no service was started)")
        veths = []
        for group in (a, b):
            names = []
            for name in group:
                s = self.slots.get(f"{env}/{name}")
                if s is None or s.veth is None:
                    raise ValueError(f"service {name!r} is not on the network (never started)")
                names.append(s.veth)
            veths.append(names)
        cut = (sorted(veths[0]), sorted(veths[1]))
        if cut not in hub.partitions and cut[::-1] not in hub.partitions:
            self._apply_faults(hub, partitions=[*hub.partitions, cut])
        return {}

    def op_heal(self, req_id: int, env: str) -> dict[str, Any]:
        hub = self.hubs.get(env)
        if hub is not None and hub.partitions:
            self._apply_faults(hub, partitions=[])
        return {}

    def _apply_faults(self, hub: _Hub, loss: dict[str, int] | None = None,
                      partitions: list[tuple[list[str], list[str]]] | None = None) -> None:  # fmt: skip
        """Make the hub's drop rules say ``loss`` and ``partitions`` (one atomic batch); they
        become the hub's faults only once the kernel took them."""
        loss = hub.loss if loss is None else loss
        partitions = hub.partitions if partitions is None else partitions
        drops: dict[nftables.Drop, None] = {}  # ordered, without duplicates
        for veth, percent in sorted(loss.items()):
            drops[nftables.Drop(iif=veth, percent=percent)] = None
            drops[nftables.Drop(oif=veth, percent=percent)] = None
        for group_a, group_b in partitions:
            for x in group_a:
                for y in group_b:
                    drops[nftables.Drop(iif=x, oif=y)] = None
                    drops[nftables.Drop(iif=y, oif=x)] = None
        try:
            netlink.call_in(hub.netns, lambda: nftables.replace_table("envbox", list(drops)))
            hub.loss, hub.partitions = dict(loss), list(partitions)
        except OSError as e:
            if e.errno in (errno.EPROTONOSUPPORT, errno.ENOENT, errno.EAFNOSUPPORT, errno.EOPNOTSUPP):
                raise ValueError(
                    "unsupported:link.loss() and network.partition() need nf_tables with its "
                    "bridge family and numgen (CONFIG_NF_TABLES, CONFIG_NF_TABLES_BRIDGE, "
                    f"CONFIG_NFT_NUMGEN; the kernel said: {e.strerror}): load them with "
                    "`modprobe nf_tables nft_numgen nf_tables_bridge`, or use a kernel that "
                    "has them (every major distribution's does)") from None
            raise

    def _write_state(self) -> None:
        """This run's record for ``envbox ps``: whose it is, its services' pids and addresses."""
        self.state_dirty = False
        envs: dict[str, dict[str, Any]] = {}
        for slot, s in self.slots.items():
            env, _, name = slot.partition("/")
            envs.setdefault(env, {})[name] = {"pid": s.main_pid, "init": s.init_pid, "ip": s.ip}
        tests = [self.test_pid, *(p for p in self.watched if p != self.test_pid)]
        record = {"supervisor": os.getpid(), "owner": records.outer_uid(), "tests": tests,
                  "cwd": os.getcwd(), "environments": envs, "kept": self.kept,
                  "dirs": sorted(self.dirs),
                  "rootless": "in-userns" in sys.argv}  # fmt: skip
        if self.state_writer is None:
            self.state_writer = _StateWriter(self.state_name)
        self.state_writer.put(record)

    def _thaw(self, slot: str) -> None:
        """Resume a paused service: a frozen process cannot act on a signal (on cgroup v1 it
        cannot even die of SIGKILL)."""
        cg = self.cgroups.services.get(slot)
        if cg is not None and cg.frozen:  # set whenever it may be frozen (see freeze())
            with contextlib.suppress(cgroups.CgroupError, OSError):
                cg.freeze(False, timeout=1.0)

    def _cgroup(self, slot: str) -> cgroups.ServiceCgroup:
        cg = self.cgroups.services.get(slot)
        if cg is None:
            raise ValueError(f"unsupported:{self.cgroups.problem or 'the service has no cgroup'}")
        return cg

    def op_stats(self, req_id: int, slot: str) -> dict[str, Any]:
        return self._cgroup(slot).stats()

    def op_freeze(self, req_id: int, slot: str, frozen: bool) -> dict[str, Any]:
        try:
            self._cgroup(slot).freeze(frozen)
        except (cgroups.CgroupError, OSError) as e:
            raise ValueError(f"could not {'pause' if frozen else 'resume'} the service: {e}") from None
        return {}

    def op_prepare(self, req_id: int, count: int) -> dict[str, Any]:
        """Have ``count`` sandboxes prepared at once, in parallel: a level of services follows.
        As many are kept ready from now on, for the next environment like this one."""
        self.spare_target = max(1, min(count, 8))
        while len(self.spares) < min(count, 64):
            self._spawn_spare()
        return {}

    def op_census(self, req_id: int) -> dict[str, Any]:
        """What this supervisor holds now (for ``envbox ps`` and for tests that check teardown)."""
        return {"slots": sorted(self.slots), "hubs": sorted(self.hubs), "spares": len(self.spares),
                "hub_netns": {env: os.fstat(h.netns).st_ino for env, h in self.hubs.items()},
                "spare_hubs": len(self.free_hubs) + int(self.hub_ahead is not None
                                                        and self.hub_ahead.ready())}  # fmt: skip

    def op_own_dir(self, req_id: int, path: str, own: bool) -> dict[str, Any]:
        """Directories to delete if the test process dies before it can.

        Recorded at once in the run's record: if this supervisor is SIGKILLed too, `envbox clean`
        (or the next run) removes them."""
        (self.dirs.add if own else self.dirs.discard)(path)
        self._write_state()
        return {}

    def op_shutdown(self, req_id: int) -> dict[str, Any]:
        """End; or, with environments to keep, free everything else and serve those alone."""
        if not self.kept:
            self.running = False
            return {}
        self._detach()
        return {"kept": sorted(self.kept)}

    def op_keep(self, req_id: int, env: str, why: str) -> dict[str, Any]:
        """Keep environment ``env`` running after the test process ends (``--envbox-keep``)."""
        self.kept[env] = why
        self.state_dirty = True
        return {}

    def _detach(self) -> None:
        """Outlive the test process for the kept environments: release every other slot,
        the spares and what was made ahead, stop watching the test processes and writing to
        their terminal. SIGTERM (``envbox clean``) then tears down the rest, as ever."""
        self.detached = True
        others = [slot for slot in self.slots if _env_of(slot) not in self.kept]
        with contextlib.suppress(Exception):
            self.op_release(0, others)
        with contextlib.suppress(Exception):  # each step whatever an earlier one did
            self._drop_spares()
        self.want_spare = self.want_hub = False
        for fd in self.watch_fds:
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(fd)
            with contextlib.suppress(OSError):
                os.close(fd)
        self.watch_fds.clear()
        with contextlib.suppress(OSError):
            os.dup2(self.devnull, 1)
            os.dup2(self.devnull, 2)
        self.state_dirty = True
        self._maybe_done()

    def _maybe_done(self) -> None:
        """A detached supervisor whose kept services have all exited has nothing left to show:
        it ends (their logs stay in the test run's directory)."""
        if self.detached and not any(s.init_pid is not None for s in self.slots.values()):
            self.running = False

    def _drop_spares(self) -> None:
        for spare in self.spares:
            spare.ctl.close()  # end-of-file: a spare exits by itself
            if spare.cgroup is not None:
                self.cgroups.discard(spare.cgroup)
        self.spares.clear()
        if self.zygote is not None:
            self.zygote.close()  # and so does the zygote
            self.zygote = None
        ahead, self.hub_ahead = self.hub_ahead, None
        made = ahead.take() if ahead is not None else None
        if made is not None:
            made[1].close()
            os.close(made[0])
        for hub in self.free_hubs:
            self._close_hub(hub)
        self.free_hubs.clear()

    # --- processes ---------------------------------------------------------------------------

    def _drain(self, sink: _LogSink) -> None:
        """Move what the service wrote into its log file, up to LOG_CAP; then count and keep the
        tail. At end of output (every writer gone), finish the file (see _end_log).

        At most 64 MiB per call: a service that never stops writing must not keep the event
        loop here (the selector reports the pipe again)."""
        for _ in range(64):
            try:
                if sink.written < LOG_CAP and sink.failed is None:
                    try:
                        n = os.splice(sink.pipe, sink.file, min(1 << 20, LOG_CAP - sink.written),
                                      flags=os.SPLICE_F_NONBLOCK)  # fmt: skip
                    except BlockingIOError:
                        raise
                    except OSError as e:  # the file refuses (ENOSPC...): count the rest instead
                        sink.failed = e.strerror or str(e)
                        continue
                    sink.written += n
                else:
                    data = os.read(sink.pipe, 1 << 20)
                    n = len(data)
                    sink.dropped += n
                    sink.tail += data
                    del sink.tail[:-LOG_TAIL]
            except BlockingIOError:
                return
            except OSError:
                n = 0
            if n == 0:  # end of output
                for s in self.slots.values():
                    if s.log is sink:
                        self._end_log(s)
                        return
                self._close_sink(sink)
                return

    def _end_log(self, s: _Slot) -> None:
        sink, s.log = s.log, None
        if sink is not None:
            self._close_sink(sink)

    def _close_sink(self, sink: _LogSink) -> None:
        if sink.pipe < 0:
            return
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(sink.pipe)
        os.close(sink.pipe)
        sink.pipe = -1
        if sink.dropped:
            with contextlib.suppress(OSError):
                why = (f"could not be written ({sink.failed})" if sink.failed
                       else f"reached {LOG_CAP >> 20} MiB")
                os.write(sink.file, (f"\n[envbox: the log {why}; "
                                     f"{sink.dropped} more bytes were dropped; their last "
                                     f"{len(sink.tail)} follow]\n").encode() + bytes(sink.tail))  # fmt: skip
        os.close(sink.file)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            code = os.waitstatus_to_exitcode(status)
            if code < 0:
                code = 128 - code
            slot = self.inits.pop(pid, None)
            if slot is not None:
                s = self.slots.get(slot)
                if s is not None and s.init_pid == pid:
                    s.init_pid = None
                    s.main_pid = None
                    self.state_dirty = True
                    _close(s, "main_pidfd")
                    if s.log is not None:  # its last words in the file before anyone looks
                        self._drain(s.log)
                    cg = self.cgroups.services.get(slot)
                    figures: dict[str, int | float] = {}
                    if cg is not None:  # the run's totals, read before its cgroup goes
                        with contextlib.suppress(OSError):
                            figures = cg.stats()
                    self._send({"event": "exited", "slot": slot, "returncode": code,
                                "generation": s.generation, "killed": s.killed,
                                "oom_kills": figures.get("oom_kills", 0),
                                "stats": figures})  # fmt: skip
                    self._maybe_done()
            ex = self.execs.get(pid)
            if ex is not None:
                ex.status = code
                self._maybe_finish_exec(ex)

    def _next_deadline(self) -> float | None:
        deadlines = [e.deadline for e in self.execs.values() if e.deadline and not e.timed_out]
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - time.monotonic())

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        for ex in list(self.execs.values()):
            if ex.deadline is not None and not ex.timed_out and now >= ex.deadline:
                ex.timed_out = True
                for pid in (ex.command_pid, ex.pid):  # the command, then its helper
                    if pid is not None:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)

    def _release(self, s: _Slot, wait: float = 2.0) -> None:
        try:
            self._release_processes(s, wait)
        finally:
            if s.log is not None:
                self._drain(s.log)
                self._end_log(s)

    def _release_processes(self, s: _Slot, wait: float) -> None:
        _close(s, "main_pidfd")
        for r in s.relays.values():
            r.close()
        s.relays.clear()
        if s.init_pid is not None:
            pid = s.init_pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            # Reaping the init means its whole PID namespace is gone (the kernel empties it first).
            with contextlib.suppress(OSError):
                pidfd = os.pidfd_open(pid)
                try:
                    select.select([pidfd], [], [], wait)
                finally:
                    os.close(pidfd)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            self.inits.pop(pid, None)
            s.init_pid = None
        os.close(s.netns_fd)

    def teardown(self) -> None:
        self._drop_spares()
        for slot in list(self.slots):
            self._thaw(slot)
            with contextlib.suppress(Exception):  # one slot's trouble must not keep the rest
                self._release(self.slots.pop(slot))
        for ex in list(self.execs.values()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(ex.pid, signal.SIGKILL)
        import shutil  # only here: the supervisor stays small, and so do its forks

        for d in self.dirs:
            shutil.rmtree(d, ignore_errors=True)
        self.dirs.clear()
        if self.state_writer is not None:
            self.state_writer.close()  # its last write done before the record goes
        with contextlib.suppress(OSError):
            records.remove(self.state_name)
        for env in list(self.hubs):
            self._drop_hub(env)
        with contextlib.suppress(Exception):
            self.cgroups.remove()


_OPS = {name[3:]: fn for name, fn in vars(Supervisor).items() if name.startswith("op_")}


class _HubAhead:
    """The next environment's hub, made on a thread of its own while the loop serves requests.

    A hub is a new network namespace with a bridge: two milliseconds or more of the kernel's
    time, which a probe's request arriving just after a start would otherwise wait out.
    """

    def __init__(self) -> None:
        self.done = threading.Event()
        self.hub: tuple[int, netlink.Netlink, int] | None = None
        threading.Thread(target=self._make, name="hub", daemon=True).start()

    def _make(self) -> None:
        try:
            self.hub = netlink.make_hub()
        except OSError:
            pass  # made on demand, then, and its error shown there
        finally:
            self.done.set()

    def ready(self) -> bool:
        """Whether it was made (waiting for the thread to end)."""
        self.done.wait()
        return self.hub is not None

    def take(self) -> tuple[int, netlink.Netlink, int] | None:
        self.done.wait()
        hub, self.hub = self.hub, None
        return hub


class _StateWriter:
    """Writes the run's record on a thread of its own, the newest version only.

    A write is a file replaced by rename, which on ext4 (``auto_da_alloc``) waits for the new
    file's data to reach the disk: a millisecond or more under I/O load, which a request on the
    loop would otherwise wait out (every ``open()`` of an environment records its directory).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.cond = threading.Condition()
        self.record: dict[str, Any] | None = None
        self.closed = False
        self.thread = threading.Thread(target=self._run, name="state", daemon=True)
        self.thread.start()

    def put(self, record: dict[str, Any]) -> None:
        with self.cond:
            self.record = record  # an older one not yet written is superseded
            self.cond.notify()

    def _run(self) -> None:
        while True:
            with self.cond:
                while self.record is None and not self.closed:
                    self.cond.wait()
                record, self.record = self.record, None
                if record is None:
                    return  # closed, and nothing left to write
            with contextlib.suppress(OSError):
                records.write(self.name, record)

    def close(self) -> None:
        """Write what is pending, then stop."""
        with self.cond:
            self.closed = True
            self.cond.notify()
        self.thread.join(timeout=5)


@dataclass
class _Spare:
    """A sandbox's init being prepared ahead of a start, and the cgroup it moves itself into."""

    ctl: socket.socket
    cgroup: cgroups.ServiceCgroup | None


def _network_unsupported(e: OSError) -> str:
    """Why an environment's network could not be made, and what to do (an ``unsupported:``
    message when the kernel lacks what it needs)."""
    if e.errno in (errno.EOPNOTSUPP, errno.ENOENT, errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT):
        return (f"unsupported:the environment's private network needs bridge and veth devices "
                f"in the kernel (CONFIG_BRIDGE, CONFIG_VETH; the kernel said: {e}): load them "
                "with `modprobe bridge veth`, or use a kernel that has them (every major "
                "distribution's does)")  # fmt: skip
    return f"the environment's network could not be set up: {e}"


def _env_of(slot: str) -> str:
    """A slot is ``<environment id>/<service>``."""
    return slot.split("/", 1)[0]


class SpareFailed(Exception):
    """A prepared sandbox died before it could be used; the message says why."""


def _await_ready(ctl: socket.socket) -> tuple[int, int]:
    """Wait for a spare to be ready; return the fd of its network namespace, and its pid.

    A spare that could not prepare itself says why (``error:``/``unsupported:``) and exits.
    """
    ctl.settimeout(30.0)
    try:
        msg, anc, _flags, _addr = ctl.recvmsg(4096, socket.CMSG_SPACE(4) + socket.CMSG_SPACE(12),
                                              socket.MSG_CMSG_CLOEXEC)
    except TimeoutError:
        raise SpareFailed("the sandbox was not prepared within 30 s") from None
    finally:
        ctl.settimeout(None)
    fds: list[int] = []
    pid = None
    for level, typ, data in anc:
        if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
            fds += array.array("i", data[: len(data) - len(data) % 4])
        elif level == socket.SOL_SOCKET and typ == socket.SCM_CREDENTIALS:
            pid = int.from_bytes(data[:4], sys.byteorder)
    if msg == b"ready" and len(fds) == 1 and pid is not None:
        return fds[0], pid
    for fd in fds:
        os.close(fd)
    text = msg.decode(errors="replace")
    raise SpareFailed(text[6:] if text.startswith("error:") else text or "the sandbox died")


def _zygote(sock: socket.socket) -> None:
    """Fork spares on request; returns at EOF.

    ``clone(CLONE_PARENT | CLONE_NEWPID)``: each spare is PID 1 of a new PID namespace and a
    child of the supervisor (our parent), which reaps it like any child of its own.
    """
    L.set_pdeathsig(signal.SIGKILL)
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGCHLD, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    close_fds_except([sock.fileno()])
    gc.disable()
    while True:
        # Its socket, its cgroup's files; close-on-exec, as every fd of ours.
        msg, fds, _flags, _addr = socket.recv_fds(sock, 16, 8, socket.MSG_CMSG_CLOEXEC)
        if not msg or not fds:
            return
        into = msg == b"spare-into"  # fds[1]: the cgroup (v2) to clone the spare straight into
        try:
            # No Python at-fork hooks: this process has no threads and no locks to reset.
            pid = L.fork_with(L.CLONE_PARENT | L.CLONE_NEWPID, python_fixups=False,
                              cgroup_fd=fds[1] if into else None)  # fmt: skip
        except OSError as e:
            # Say why; the supervisor then forks a spare itself (see op_start's second try).
            with contextlib.suppress(OSError):
                os.write(fds[0], f"error:clone: {e.strerror}".encode())
            pid = -1
        if pid == 0:
            try:
                sock.close()
                if into:
                    os.close(fds[1])
                run_spare(socket.socket(fileno=fds[0]), () if into else fds[1:], in_cgroup=into)
            finally:
                os._exit(125)
        for fd in fds:
            os.close(fd)


def _fork_running(target: Callable[..., object], *args: Any, close: socket.socket,
                  code: int = 125) -> int:  # fmt: skip
    """Fork; the child closes ``close`` (the parent's end), runs ``target(*args)``, and exits.

    ``os.fork``, never a raw clone: the supervisor has threads (relays, its record's writer,
    the next hub's maker), and only fork runs the handlers that make a child of a threaded
    process safe (glibc's malloc locks, Python's own).
    """
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            close.close()
            target(*args)
        finally:
            os._exit(code)
    return pid


def _pidfd_pid(fd: int) -> int | None:
    """The pid (in our PID namespace) of the process a pidfd refers to, from its fdinfo.

    None when it has been reaped already (the kernel then says -1) or cannot be told.
    """
    try:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            for line in f:
                if line.startswith("Pid:"):
                    pid = int(line.split()[1])
                    return pid if pid > 0 else None
    except (OSError, ValueError):
        pass
    return None


def _close(obj: Any, attr: str) -> None:
    fd = getattr(obj, attr)
    if fd is not None:
        setattr(obj, attr, None)
        with contextlib.suppress(OSError):
            os.close(fd)


def _exec_helper(plan: SandboxPlan, argv: list[str], ns_fds: list[tuple[int, int]],
                 cgroup_procs: list[str], stdio: tuple[int, int, int],
                 sync: socket.socket, cgroup_fd: int | None = None) -> None:  # fmt: skip
    """Join a running sandbox's namespaces and run ``argv`` there as the service would.

    Not dumpable: while it still holds the supervisor's privileges, nothing inside the sandbox may
    ptrace it. It forks once more because joining a PID namespace only applies to children;
    with ``cgroup_fd`` (cgroup v2) that child starts in the service's cgroup (clone3).
    """
    code = 126
    try:
        L.set_pdeathsig(signal.SIGKILL)
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        L.set_dumpable(False)
        keep = [] if cgroup_fd is None else [cgroup_fd]
        close_fds_except([fd for fd, _ in ns_fds] + [*stdio, sync.fileno(), *keep])
        for path in cgroup_procs:  # into the service's cgroup: its limits count the command too
            cgroups._write(path, "0")
        for fd, nstype in ns_fds:
            L.setns(fd, nstype)
        pid = os.fork() if cgroup_fd is None else L.fork_with(0, cgroup_fd=cgroup_fd)
        if pid == 0:
            L.set_pdeathsig(signal.SIGKILL)
            exec_command(plan, argv, sync, stdio)
        sync.close()
        for fd in stdio:
            os.close(fd)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        code = 128 - code if code < 0 else code
    except BaseException as e:
        with contextlib.suppress(OSError):
            sync.send(f"error:exec setup failed: {e}".encode())
    os._exit(code)


def enter_user_namespace() -> None:
    """Rootless mode: become root of a new user namespace, mapped to our own user and group.

    Everything the supervisor and its sandboxes make from now on (PID, mount, network...
    namespaces) is owned by it, so the supervisor may do there all that root may; on the host it
    is still its user. With a subordinate id range (``/etc/subuid``, ``/etc/subgid``) and the
    setuid ``newuidmap``/``newgidmap``, ids 1... inside map to that range, so services may run as
    other users (``nobody``, ``postgres``), as podman does; otherwise only our own id is mapped
    and ``setgroups`` is denied, as the kernel requires for an unprivileged map. Must run while
    the process has a single thread.
    """
    uid, gid = os.geteuid(), os.getegid()
    sub = None
    if uid != 0:
        from pytest_envbox.kernel import hostcheck  # pwd, shutil: only in rootless mode

        ids = hostcheck.subids(uid)
        if ids.usable:
            sub = ids
    if sub is None:
        L.unshare(L.CLONE_NEWUSER)
        L.map_own_ids(uid, gid)
        return
    assert sub.uid_range is not None and sub.gid_range is not None
    # newuidmap must run outside the new namespace, on our pid: a child does it once we are in.
    r, w = os.pipe2(os.O_CLOEXEC)
    child = os.fork()
    if child == 0:
        code = 1
        try:
            os.close(w)
            os.read(r, 1)
            parent = str(os.getppid())
            (us, uc), (gs, gc) = sub.uid_range, sub.gid_range
            import subprocess

            ok = subprocess.run(["newuidmap", parent, "0", str(uid), "1", "1", str(us), str(uc)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0
            ok = ok and subprocess.run(["newgidmap", parent, "0", str(gid), "1", "1", str(gs), str(gc)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0
            code = 0 if ok else 1
        finally:
            os._exit(code)
    os.close(r)
    try:
        L.unshare(L.CLONE_NEWUSER)
    finally:
        os.write(w, b"x")
        os.close(w)
        _, status = os.waitpid(child, 0)
    if status != 0:
        maps = []
        for name in ("uid_map", "gid_map"):
            with open(f"/proc/self/{name}") as f:
                maps.append(f.read().strip())
        if not any(maps):  # the helpers failed before writing anything: map our own id only
            L.map_own_ids(uid, gid)
        elif not all(maps):  # newuidmap worked, newgidmap not: no half-mapped namespace
            raise OSError(errno.EPERM, "newgidmap failed after newuidmap: check /etc/subgid")


def _id_map(name: str) -> list[list[int]]:
    """Our user namespace's id map: ``[inside, outside, count]`` lines."""
    with open(f"/proc/self/{name}") as f:
        return [[int(x) for x in line.split()] for line in f if line.strip()]


def _no_user_namespace(e: OSError) -> str:
    """Why rootless mode cannot start here, and how to enable it."""
    from pytest_envbox.kernel import hostcheck

    fixes = "; ".join(f"{why}: enable with `{fix}`" for why, fix in hostcheck.userns_sysctls())
    return (f"rootless mode needs an unprivileged user namespace, and this host refused one "
            f"({e}). " + (fixes or "Check `envbox doctor` for what is missing") +
            "; or run the tests as root (--envbox-rootless=no).")  # fmt: skip


def main(fd: int | None = None) -> None:
    """Entry point of the supervisor process (``python -c``): serve on the inherited socket."""
    warnings.simplefilter("ignore", DeprecationWarning)  # fork() with relay threads running
    if fd is None:
        fd = int(sys.argv[1])
    refused = None
    if "rootless" in sys.argv[2:] and "in-userns" not in sys.argv[2:]:
        try:
            enter_user_namespace()
        except OSError as e:
            refused = _no_user_namespace(e)
        else:
            # Start again, now inside: a process's memory belongs to the user namespace it was
            # exec'd in, and the kernel checks access to a non-dumpable process (a sandbox's init)
            # against that one. Exec'd here, our sandboxes are ours and the test process's (its
            # user owns this namespace) to inspect, and still not their services'.
            os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:], "in-userns"])
    sock = socket.socket(fileno=fd)
    os.set_inheritable(fd, False)
    Supervisor(sock, refused=refused).serve()
    os._exit(0)
