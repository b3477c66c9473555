"""The supervisor: one helper process per test process that owns every sandbox resource.

It is started once per pytest process (and per xdist worker) by :mod:`pytest_envbox.engine.client`,
from a fresh interpreter so that nothing of the test process (threads, locks, open files) leaks
into it. It then forks every sandbox from itself, a warm process, which costs far less than a new
interpreter per service.

Why a separate process: teardown must happen even when the test process is SIGKILLed. The test
process holds the only other end of the supervisor's socket; its death is an EOF here, at once, and
the supervisor tears everything down and exits. If the supervisor itself is SIGKILLed, every
sandbox's init has PR_SET_PDEATHSIG=SIGKILL pointed at it, and an init's death ends its whole PID
namespace: nothing survives either way.

Nothing here assumes real root beyond what a user namespace grants (namespaces, mounts, setns on
namespaces we created), so the same code can run inside a user namespace of its own (rootless).

Concurrency: one thread runs the event loop and does every fork (``PR_SET_PDEATHSIG`` is tied to the
forking thread, which must live as long as the supervisor). Every relay runs on one thread of its
own, an epoll loop (:mod:`.relayloop`).

This module is the loop, the dispatch and teardown; each concern, with its requests' handlers,
is a module of its own: :mod:`.services` (slots: start, signal, release, exit events; through
the :mod:`.slotkernel` seam), :mod:`.spares` (the zygote and prepared sandboxes), :mod:`.network`
(hubs, wiring, faults), :mod:`.hostports` (fixed host ports, held from an environment's open),
:mod:`.limits` (the services' cgroups), :mod:`.exec`, :mod:`.logs`, :mod:`.records` (the run's
record) and :mod:`.userns` (rootless mode). The messages are :mod:`.protocol`'s.
"""

from __future__ import annotations

import contextlib
import os
import resource
import selectors
import signal
import socket
import sys
import warnings

from pytest_envbox.errors import HostUnsupported
from pytest_envbox.kernel import cgroups
from pytest_envbox.kernel import linux as L
from pytest_envbox.supervisor import records, statedir
from pytest_envbox.supervisor.exec import Execs
from pytest_envbox.supervisor.hostports import HostPorts
from pytest_envbox.supervisor.limits import ServiceCgroups
from pytest_envbox.supervisor.logs import LogSink
from pytest_envbox.supervisor.network import Network, env_of
from pytest_envbox.supervisor.protocol import (
    CensusReply,
    CensusRequest,
    ErrorReply,
    Handlers,
    HelloReply,
    HelloRequest,
    Message,
    Reply,
    ShutdownReply,
    ShutdownRequest,
    Unsupported,
)
from pytest_envbox.supervisor.services import Services
from pytest_envbox.supervisor.slotkernel import LinuxSlotKernel
from pytest_envbox.supervisor.spares import Spares
from pytest_envbox.supervisor.sync import Pending
from pytest_envbox.supervisor.userns import enter_user_namespace, id_map, no_user_namespace
from pytest_envbox.supervisor.vips import Vips
from pytest_envbox.supervisor.wire import BadFrame, FrameReader, ProtocolError, encode

__all__ = ["Supervisor", "handler_table", "main"]


class Supervisor:
    """The event loop, the dispatch of requests to their concern, and teardown."""

    def __init__(self, sock: socket.socket, *, refused: str | None = None,
                 fds: socket.socket | None = None) -> None:  # fmt: skip
        #: why this supervisor cannot serve (rootless mode on a host without user namespaces):
        #: the answer to ``hello``, so that the caller raises HostUnsupported before any start
        self.refused = refused
        self.sock = sock
        #: where sockets made in an environment's network go to the test process (SCM_RIGHTS)
        self.fds = fds
        self.sel: selectors.BaseSelector = selectors.DefaultSelector()
        self.reader = FrameReader()
        self.pending: dict[int, Pending] = {}  # sync socket fd -> pending
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
        # Orphans of our sandboxes (and the spares, see Spares.start_zygote) are reaped here.
        L.set_child_subreaper()
        # Every service gets a cgroup below ours (see kernel/cgroups/); runs SIGKILLed earlier left
        # theirs behind, empty: the janitor removes them below.
        self.cgroups_host = cgroups.detect()
        # This run's record for `envbox ps` (records.py), written when idle.
        self.record = records.RunRecord(self)
        self.watched: list[int] = []
        self.test_pid = os.getppid()  # (once detached, our parent is no longer the test process)
        self.watch_fds: list[int] = []  # pidfds of the processes in ``watched``
        # --envbox-keep: environments (id -> why) to leave running when the test process ends;
        # once it has, the supervisor is detached and serves them until SIGTERM (`envbox clean`).
        self.kept: dict[str, str] = {}
        self.detached = False
        # What dead runs left (cgroups, records) goes now, by whichever of the supervisors
        # starting together (xdist workers) takes the janitor's lock; never a live run's. A state
        # directory another user could write is refused (statedir.py): the answer to hello.
        if self.refused is None:
            try:
                with records.janitor() as mine:
                    if mine:
                        cgroups.clean_stale(self.cgroups_host)
                        with contextlib.suppress(OSError):
                            records.clean_stale()
            except HostUnsupported as e:
                self.refused = str(e)
        self.cgroups = cgroups.CgroupTree(cgroups.CgroupHost("none"), "")  # made at hello
        self.spares = Spares(self)
        self.network = Network(self)
        self.service_cgroups = ServiceCgroups(self)
        self.execs = Execs(self)
        self.services = Services(self, LinuxSlotKernel(self))
        self.host_ports = HostPorts(self)
        self.vips = Vips(self)
        self.handlers = handler_table(self)
        self.spares.start_zygote()

    def _stop(self) -> None:
        self.running = False

    # --- main loop ---------------------------------------------------------------------------

    def serve(self) -> None:
        try:
            while self.running:
                timeout = _sooner(self.execs.next_deadline(), self.services.logs.timeout())
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
                    elif isinstance(tag, LogSink):
                        self.services.on_output(tag)
                    elif isinstance(tag, Pending):
                        (self.services.on_sync if tag.kind == "start" else self.execs.on_sync)(tag)
                    elif isinstance(tag, tuple):
                        self.execs.on_pipe(*tag)
                self.execs.check_deadlines()
                self.services.logs.resume()
                self._reap()  # a SIGCHLD racing with a select() timeout must not be lost
                # Prepare the next sandbox off the critical path: only while no start is in
                # flight (forking and making a namespace take this thread a millisecond or two,
                # which a waiting start would otherwise pay).
                if not self.pending:
                    self.spares.top_up()
                if self.running and not self.pending and self.record.dirty:
                    self.record.write()
                if not self.pending:
                    self.network.top_up()
        finally:
            self.teardown()

    def send(self, msg: Message, req_id: int | None = None) -> None:
        try:
            frame = encode(msg, req_id)
        except ProtocolError as e:  # too large to send: that call fails, not the client's reader
            if req_id is None:
                _log(f"an event could not be sent: {e}")
                return
            frame = encode(ErrorReply("failed", f"its reply could not be sent: {e}"), req_id)
        try:
            self.sock.sendall(frame)
        except OSError:  # the test process is gone: tear down (unless it asked to keep, see _detach)
            if not (self.detached or self.kept):
                self.running = False

    def reply(self, req_id: int, reply: Reply) -> None:
        self.send(reply, req_id)

    def changed(self) -> None:
        self.record.dirty = True

    def disown(self, path: str) -> None:
        self.record.dirs.discard(path)

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
        for req_id, msg in self.reader.feed(data):
            # A bad frame fails its call, or is skipped: the loop serves on either way.
            if req_id is None:
                _log(f"ignored a message without a request id: {msg!r:.200}")
                continue
            if isinstance(msg, BadFrame):
                self.reply(req_id, ErrorReply("failed", f"ProtocolError: {msg.reason}"))
                continue
            handler = self.handlers.get(type(msg))
            result: Reply | None
            try:
                if handler is None:
                    raise ValueError(f"not a request: {type(msg).__name__}")
                result = handler(req_id, msg)
            except Unsupported as e:  # the caller raises HostUnsupported
                result = ErrorReply("unsupported", str(e))
            except Exception as e:  # reported to the caller, who raises it
                result = ErrorReply("failed", f"{type(e).__name__}: {e}")
            if result is not None:
                self.reply(req_id, result)

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
            self.services.on_exit(pid, code)
            self.execs.on_exit(pid, code)

    # --- the supervisor's own requests -------------------------------------------------------

    def hello(self, req_id: int, req: HelloRequest) -> HelloReply:
        """Greet; also tear down when any of ``watch`` dies (as when the test process does).

        The cgroups are made here, not in ``__init__``: the caller gets any problem with them in
        the reply, before it starts a service.
        """
        if self.refused is not None:
            self.running = False
            raise Unsupported(self.refused)
        self.cgroups = cgroups.CgroupTree(self.cgroups_host, cgroups.run_name(os.getpid()))
        self.watched = list(req.watch)
        self.record.dirty = True
        for pid in req.watch:
            try:
                fd = os.pidfd_open(pid)
            except OSError:  # already gone
                self.running = False
                continue
            self.watch_fds.append(fd)
            self.sel.register(fd, selectors.EVENT_READ, "watched")
        return HelloReply(os.getpid(), self.cgroups.problem, id_map("uid_map"), id_map("gid_map"))

    def census(self, req_id: int, req: CensusRequest) -> CensusReply:
        """What this supervisor holds now (for ``envbox ps`` and for tests that check teardown)."""
        hubs = self.network.hubs
        return CensusReply(slots=sorted(self.services.slots), hubs=sorted(hubs),
                           spares=len(self.spares.spares),
                           hub_netns={env: os.fstat(h.netns).st_ino for env, h in hubs.items()},
                           spare_hubs=self.network.spare_hubs(),
                           host_links=self.network.host_links())  # fmt: skip

    def shutdown(self, req_id: int, req: ShutdownRequest) -> ShutdownReply:
        """End; or, with environments to keep, free everything else and serve those alone."""
        if not self.kept:
            self.running = False
            return ShutdownReply([])
        self._detach()
        return ShutdownReply(sorted(self.kept))

    # --- keep, detach, teardown ----------------------------------------------------------------

    def _detach(self) -> None:
        """Outlive the test process for the kept environments: release every other slot,
        the spares and what was made ahead, stop watching the test processes and writing to
        their terminal. SIGTERM (``envbox clean``) then tears down the rest, as ever."""
        self.detached = True
        others = [slot for slot in self.services.slots if env_of(slot) not in self.kept]
        with contextlib.suppress(Exception):
            self.services.release_slots(others)
        with contextlib.suppress(Exception):  # each step whatever an earlier one did
            self._drop_spares()
        self.spares.want = self.network.want = False
        for fd in self.watch_fds:
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(fd)
            with contextlib.suppress(OSError):
                os.close(fd)
        self.watch_fds.clear()
        with contextlib.suppress(OSError):
            os.dup2(self.devnull, 1)
            os.dup2(self.devnull, 2)
        self.record.dirty = True
        self.maybe_done()

    def maybe_done(self) -> None:
        """A detached supervisor whose kept services have all exited has nothing left to show:
        it ends (their logs stay in the test run's directory)."""
        if self.detached and not any(s.init_pid is not None for s in self.services.slots.values()):
            self.running = False

    def _drop_spares(self) -> None:
        """The spares, the zygote, and the hubs made or kept for the next environments go."""
        self.spares.drop()
        self.network.drop_spare_hubs()

    def teardown(self) -> None:
        self._drop_spares()
        self.services.teardown()
        self.host_ports.drop()
        self.execs.kill_all()
        self.record.close()
        for env in list(self.network.hubs):
            self.network.drop_hub(env)
        with contextlib.suppress(Exception):
            self.cgroups.remove()


def _log(text: str) -> None:
    """A note on the test process's stderr (where pytest captures it): for what has no caller
    to tell."""
    with contextlib.suppress(OSError, ValueError):
        print(f"envbox supervisor: {text}", file=sys.stderr, flush=True)


def _sooner(a: float | None, b: float | None) -> float | None:
    """The shorter of two select() timeouts, where None is no timeout."""
    return b if a is None else a if b is None else min(a, b)


def handler_table(sup: Supervisor) -> Handlers:
    """Each request's handler, from the table of the concern it belongs to (a request type
    claimed twice is a bug)."""
    tables: list[Handlers] = [
        {HelloRequest: sup.hello, CensusRequest: sup.census, ShutdownRequest: sup.shutdown},
        sup.services.handlers(), sup.spares.handlers(), sup.network.handlers(),
        sup.service_cgroups.handlers(), sup.execs.handlers(), sup.record.handlers(),
        sup.host_ports.handlers(), sup.vips.handlers(),
    ]  # fmt: skip
    table: Handlers = {}
    for t in tables:
        for request_type, handler in t.items():
            if request_type in table:
                raise RuntimeError(f"two handlers for {request_type.__name__}")
            table[request_type] = handler
    return table


def _raise_open_files() -> None:
    """The soft limit of open files up to the hard one: a published port holds two sockets and
    up to two pipes per connection, and a burst of clients may hold thousands. (Services get
    their own limit, the one they declare, set in their sandbox.)"""
    with contextlib.suppress(OSError, ValueError):
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(fd: int | None = None) -> None:
    """Entry point of the supervisor process (``python -c``): serve on the inherited socket."""
    warnings.simplefilter("ignore", DeprecationWarning)  # fork() with the relay loop's thread running
    if fd is None:
        fd = int(sys.argv[1])
    refused = None
    if "in-userns" not in sys.argv[2:]:
        # Before any user namespace, where another user's uid would read as "nobody": the message
        # names the real owner. (Checked again inside, by the janitor.)
        refused = statedir.problem()
    if refused is None and "rootless" in sys.argv[2:] and "in-userns" not in sys.argv[2:]:
        try:
            enter_user_namespace()
        except OSError as e:
            refused = no_user_namespace(e)
        else:
            # Start again, now inside: a process's memory belongs to the user namespace it was
            # exec'd in, and the kernel checks access to a non-dumpable process (a sandbox's init)
            # against that one. Exec'd here, our sandboxes are ours and the test process's (its
            # user owns this namespace) to inspect, and still not their services'.
            os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:], "in-userns"])
    sock = socket.socket(fileno=fd)
    os.set_inheritable(fd, False)
    _raise_open_files()
    fds = None
    for arg in sys.argv[2:]:
        if arg.startswith("fds="):  # the descriptor socket (see engine/reach.py)
            fds = socket.socket(fileno=int(arg[4:]))
            os.set_inheritable(fds.fileno(), False)
    Supervisor(sock, refused=refused, fds=fds).serve()
    os._exit(0)
