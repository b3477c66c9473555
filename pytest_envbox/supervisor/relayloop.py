"""The one thread that moves the bytes of every published port: an epoll loop.

Every relay of a supervisor (:mod:`.relay`) shares one :class:`Loop`: one thread blocked in
``epoll_wait`` over every listening socket, every upstream connect in flight and both sockets of
every relayed connection, all non-blocking. A connection costs two sockets and, once it moves
bulk, a pipe per direction, never a thread: a burst of two thousand clients is two thousand
entries in a table, where a thread per direction made four thousand threads and stalled the host.

Bulk moves with ``splice(2)``, source socket into the direction's pipe and pipe into the
destination socket: the kernel passes page references and the bytes never enter Python. Until a
direction has filled a 64 KiB read (a request, an answer), its bytes are copied through one
buffer of the loop instead: the same two system calls, and no pipe to make and close. A
direction reads only once what it read before is written out, and stops reading (its socket
leaves the epoll interest set) while that cannot be: the kernel's socket buffers are the only
buffering, as on a direct connection (plus at most 64 KiB per direction, in copies).

What a peer does is passed on as it did it: an end-of-file as ``shutdown(SHUT_WR)`` on the other
side (the other direction keeps flowing: a half-close stays a half-close), a reset (or an error)
as a reset of the other side (``SO_LINGER`` 0, then close), so that neither end mistakes an abort
for a clean end.

Sockets are touched by the loop's thread only (other threads hand it work with :meth:`Loop.call`),
and closed at the end of an iteration, after every event of that iteration was handled: a number
freed and reused in the same iteration would otherwise get its predecessor's stale events.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import os
import select
import socket
import struct
import sys
import threading
from collections.abc import Callable
from typing import Any

from pytest_envbox.kernel import linux as L

__all__ = ["ERR", "HUP", "IN", "OUT", "Conn", "Loop", "linger0", "log", "shared_loop"]

IN, OUT, ERR, HUP = select.EPOLLIN, select.EPOLLOUT, select.EPOLLERR, select.EPOLLHUP
_CHUNK = 1 << 20
_F_SETPIPE_SZ = 1031
_PIPE = 1 << 16  # a new pipe's size (16 pages)
_BUF = bytearray(1 << 16)  # the loop's buffer, for what is copied (see _copy)
_VIEW = memoryview(_BUF)
# Never blocks on the pipe. No SPLICE_F_MORE: it holds back small writes (Nagle-like stalls).
_NB = os.SPLICE_F_NONBLOCK | os.SPLICE_F_MOVE
_LINGER_0 = struct.pack("ii", 1, 0)

Handler = Callable[[int], None]


class Loop:
    """An epoll loop in one thread: handlers by fd, work handed in from other threads.

    The thread also makes the relays' upstream sockets, which must be made in the network
    namespace they will connect from (a socket's namespace is fixed at its creation): it
    :meth:`enter`\\ s that namespace first. It stays there, and leaves only by being replaced
    (:meth:`replace`, from a thread of the supervisor's own namespace): in rootless mode nothing
    may enter the host's namespace again, and a thread that stayed in a released service's
    namespace would keep it alive.
    """

    def __init__(self) -> None:
        self.ep = select.epoll()
        self.handlers: dict[int, Handler] = {}
        self.masks: dict[int, int] = {}  # what each registered fd is watched for
        self.doomed: list[socket.socket | int] = []  # closed once this iteration is done
        self.resting: list[Callable[[], None]] = []  # listeners out of descriptors: resume them
        self._calls: collections.deque[Callable[[], None]] = collections.deque()
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.handlers[self._wake] = self._on_wake
        self.ep.register(self._wake, IN)
        self.where: int | None = None  # the namespace (inode) the thread is in; None: home
        self.thread: threading.Thread | None = None
        self._lock = threading.Lock()  # starting and replacing the thread

    # --- the thread ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the thread if it is not running (from a thread in the supervisor's namespace)."""
        with self._lock:
            if self.thread is None:
                self._spawn()

    def replace(self) -> None:
        """A new thread, started here (so in this thread's network namespace), takes over the
        loop; the current one ends after its iteration and lets go of the namespace it was in."""
        with self._lock:
            self._spawn()
        self._kick()

    def _spawn(self) -> None:
        before = self.thread
        self.thread = threading.Thread(target=self._run, args=(before,), name="relays", daemon=True)
        self.thread.start()

    def _run(self, before: threading.Thread | None) -> None:
        if before is not None:
            before.join()  # one thread at a time runs the loop
        self.where = None
        me = threading.current_thread()
        poll, handlers, doomed = self.ep.poll, self.handlers, self.doomed
        while self.thread is me:
            events = poll(0.1 if self.resting else -1)
            for fd, ev in events:
                h = handlers.get(fd)
                if h is None:
                    continue  # closed earlier in this iteration
                try:
                    h(ev)
                except Exception as e:  # a bug must not stop every other port
                    log(f"relay: {type(e).__name__}: {e}")
            if doomed:
                for s in doomed:
                    with contextlib.suppress(OSError):
                        s.close() if isinstance(s, socket.socket) else os.close(s)
                doomed.clear()
            elif events or not self.resting:
                continue
            if self.resting:  # descriptors were freed, or a moment passed: try again
                resting, self.resting = self.resting, []
                for resume in resting:
                    try:
                        resume()
                    except Exception as e:
                        log(f"relay: {type(e).__name__}: {e}")

    def enter(self, ns_fd: int, ino: int) -> None:
        """Move the loop's thread into the network namespace ``ns_fd`` (inode ``ino``), so that
        the sockets it makes next are made there. Loop thread only."""
        if self.where != ino:
            L.setns(ns_fd, L.CLONE_NEWNET)
            self.where = ino

    # --- work from other threads -------------------------------------------------------------

    def call(self, fn: Callable[[], Any], timeout: float = 5.0) -> Any:
        """``fn()`` run by the loop's thread; its result (or exception) once it has run."""
        done = threading.Event()
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                box["result"] = fn()
            except BaseException as e:
                box["error"] = e
            finally:
                done.set()

        self.post(run)
        if not done.wait(timeout):
            raise OSError(f"the relay loop did not answer within {timeout:g} s")
        if "error" in box:
            raise box["error"]
        return box.get("result")

    def post(self, fn: Callable[[], None]) -> None:
        """Have the loop's thread run ``fn()`` soon; do not wait for it."""
        self._calls.append(fn)
        self._kick()

    def _kick(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_write(self._wake, 1)

    def _on_wake(self, ev: int) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._wake)
        while self._calls:
            fn = self._calls.popleft()
            try:
                fn()
            except Exception as e:  # (call() hands its own back to its caller)
                log(f"relay: {type(e).__name__}: {e}")

    # --- registration (loop thread) ------------------------------------------------------------

    def watch(self, fd: int, mask: int, handler: Handler | None = None) -> None:
        """Watch ``fd`` for ``mask`` (0: not at all, for now); ``handler`` gets the events."""
        if handler is not None:
            self.handlers[fd] = handler
        old = self.masks.get(fd)
        if old == mask or (old is None and not mask):
            return
        if not mask:
            del self.masks[fd]
            self.ep.unregister(fd)
        elif old is None:
            self.masks[fd] = mask
            self.ep.register(fd, mask)
        else:
            self.masks[fd] = mask
            self.ep.modify(fd, mask)

    def drop(self, s: socket.socket | int) -> None:
        """Forget ``s`` and close it at the end of this iteration (a forked child may hold a
        copy of it: epoll forgets it only when told)."""
        fd = s if isinstance(s, int) else s.fileno()
        if self.masks.pop(fd, None) is not None:
            with contextlib.suppress(OSError):
                self.ep.unregister(fd)
        self.handlers.pop(fd, None)
        self.doomed.append(s)


_shared: Loop | None = None
_shared_lock = threading.Lock()


def shared_loop() -> Loop:
    """The supervisor's one relay loop, made and started on first use."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = Loop()
    _shared.start()
    return _shared


class _Half:
    """One direction: from ``src`` to ``dst``, copied at first, spliced through a pipe once it
    moves bulk."""

    __slots__ = ("dst", "eof", "inp", "left", "out", "pending", "r", "room", "src", "w")

    def __init__(self, src: socket.socket, dst: socket.socket) -> None:
        self.src, self.dst = src.fileno(), dst.fileno()
        self.inp, self.out = src, dst
        self.left = b""  # bytes read by _copy, not yet written to dst
        self.r = self.w = -1
        self.room = 0  # the pipe's size: the default at first, larger once a read fills it
        self.pending = 0  # bytes read (in the pipe, or left), not yet written to dst
        self.eof = False  # src said end-of-file (and dst was shut for writing once flushed)


class Conn:
    """A relayed connection: two connected sockets, and the bytes between them both ways."""

    __slots__ = ("a", "ab", "b", "ba", "done", "loop", "ma", "mb")

    def __init__(self, loop: Loop, a: socket.socket, b: socket.socket,
                 done: Callable[[Conn], None]) -> None:  # fmt: skip
        self.loop, self.a, self.b, self.done = loop, a, b, done
        self.ab = _Half(a, b)
        self.ba = _Half(b, a)
        self.ma = self.mb = 0
        for s in (a, b):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        loop.handlers[self.ab.src] = self._on_a
        loop.handlers[self.ba.src] = self._on_b
        self._update()

    def _on_a(self, ev: int) -> None:
        self._on(ev, self.ab, self.ba)

    def _on_b(self, ev: int) -> None:
        self._on(ev, self.ba, self.ab)

    def _on(self, ev: int, out: _Half, back: _Half) -> None:
        """Events on one socket: ``out`` reads from it, ``back`` writes to it."""
        try:
            if ev & OUT and back.pending:
                _flush(back)
            if ev & (IN | HUP | ERR) and not out.eof and not out.pending:
                _pump(out)  # with ERR too: what came before a reset, as a direct peer gets it
            if ev & ERR:
                raise OSError("socket error")  # a reset, or an error: passed on as a reset
        except OSError:
            self.abort()
            return
        if self.ab.eof and self.ba.eof and not self.ab.pending and not self.ba.pending:
            self._end((self.a, self.b))
        else:
            self._update()

    def _update(self) -> None:
        ab, ba = self.ab, self.ba
        ma = (0 if ab.eof or ab.pending else IN) | (OUT if ba.pending else 0)
        mb = (0 if ba.eof or ba.pending else IN) | (OUT if ab.pending else 0)
        if ma != self.ma:
            self.loop.watch(ab.src, ma)
            self.ma = ma
        if mb != self.mb:
            self.loop.watch(ba.src, mb)
            self.mb = mb

    def abort(self) -> None:
        """Reset both sides: whichever failed first, the other sees a reset too, not an EOF."""
        for s in (self.a, self.b):
            linger0(s)
        self._end((self.a, self.b))

    def cut(self) -> None:
        """End both directions at once (the relay is closing): each peer sees end-of-file."""
        for s in (self.a, self.b):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        self._end((self.a, self.b))

    def _end(self, socks: tuple[socket.socket, ...]) -> None:
        if self.ma < 0:
            return  # ended already
        for s in socks:
            self.loop.drop(s)
        for h in (self.ab, self.ba):
            self.loop.handlers.pop(h.src, None)
            if h.r >= 0:
                self.loop.doomed += (h.r, h.w)
                h.r = h.w = -1
        self.ma = self.mb = -1
        self.done(self)


def _pump(h: _Half) -> None:
    """Read what ``src`` has and write it on (the direction has nothing pending)."""
    if h.r < 0:
        _copy(h)
        return
    try:
        n = os.splice(h.src, h.w, _CHUNK, flags=_NB)
    except BlockingIOError:
        return
    if n == 0:
        h.eof = True
        _shut_wr(h.out)
        return
    h.pending = n
    _flush(h)
    if n >= h.room and h.room < _CHUNK:
        # The pipe filled: a larger one moves a socket's whole queue per call. Refused past
        # fs.pipe-max-size, or past the user's pipe pages in rootless mode: the default then does.
        with contextlib.suppress(OSError):
            h.room = fcntl.fcntl(h.w, _F_SETPIPE_SZ, _CHUNK)


def _copy(h: _Half) -> None:
    """Until a direction moves bulk, through the loop's buffer: a request or an answer costs no
    pipe (two descriptors, a pipe2 and two closes per connection and direction). A read that
    fills the buffer is bulk: the direction gets its pipe and splices from then on (or goes on
    copying, if no pipe can be had: out of descriptors)."""
    n = h.inp.recv_into(_BUF)
    if n == 0:
        h.eof = True
        _shut_wr(h.out)
        return
    try:
        k = h.out.send(_VIEW[:n])
    except BlockingIOError:
        k = 0
    if k < n:
        h.left = bytes(_VIEW[k:n])
        h.pending = n - k
    if n == len(_BUF):
        with contextlib.suppress(OSError):
            h.r, h.w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
            h.room = _PIPE


def _flush(h: _Half) -> None:
    """Write what is pending to ``dst`` until nothing is or ``dst`` is full."""
    try:
        if h.left:  # (read by _copy)
            k = h.out.send(h.left)
            h.left = h.left[k:]
            h.pending -= k
            return
        while h.pending:
            h.pending -= os.splice(h.r, h.dst, h.pending, flags=_NB)
    except BlockingIOError:
        pass


def _shut_wr(s: socket.socket) -> None:
    with contextlib.suppress(OSError):
        s.shutdown(socket.SHUT_WR)


def linger0(s: socket.socket) -> None:
    """Make ``s`` close with RST: the peer sees an abort (a refusal, a reset), not a clean
    end-of-file."""
    with contextlib.suppress(OSError):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_0)


def log(text: str) -> None:
    """A note on the test process's stderr, for what has no caller to tell."""
    with contextlib.suppress(OSError, ValueError):
        print(f"envbox supervisor: {text}", file=sys.stderr, flush=True)
