"""The test process's end of the supervisor's socket: calls and their replies, events.

:class:`Channel` frames requests (:mod:`pytest_envbox.supervisor.wire`), matches each reply to
its call by request id, collects an exec's output parts, and hands events to their slot's
handler. One thread reads, and no message can stop it: a frame it cannot read fails the call it
names (or is logged, with no id), a handler's exception is logged, and if the thread ends
anyway, or the supervisor dies, every waiting and later call fails at once instead of hanging.
A call can also be given a deadline that holds whatever the supervisor does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import select
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import cast

from pytest_envbox.errors import EnvboxError, HostUnsupported
from pytest_envbox.supervisor.protocol import (
    EXEC_CHUNK,
    EXEC_STREAM_CAP,
    ErrorReply,
    ExecOutput,
    ExecReply,
    ExitedEvent,
    Message,
    Reply,
    ReplyT,
    Request,
    SupervisorDied,
)
from pytest_envbox.supervisor.wire import BadFrame, FrameReader, ProtocolError, encode, recv_messages

__all__ = ["DIED", "Channel", "EventHandler", "SupervisorError"]

EventHandler = Callable[[ExitedEvent | SupervisorDied], None]

_log = logging.getLogger("pytest_envbox")
#: Why calls fail once the supervisor's socket has reached its end.
DIED = "the envbox supervisor process has died"


class SupervisorError(EnvboxError):
    """The supervisor refused an operation, failed to carry it out, or died."""


def _raise(error: ErrorReply) -> None:
    """The one place where the supervisor's error replies become exceptions."""
    if error.kind == "unsupported":
        raise HostUnsupported(error.message)
    raise SupervisorError(error.message)


class Channel:
    """Calls over ``sock``, a stream socket to a supervisor. Thread-safe: calls may come from
    several threads."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._send_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._waiting: dict[int, _Call] = {}
        self._handlers: dict[str, EventHandler] = {}
        self._lock = threading.Lock()
        self.dead = False
        self._why = DIED  # why calls fail once dead
        self._hung_up: str | None = None  # why we closed the stream ourselves
        self._reader = threading.Thread(target=self._read_loop, name="envbox-supervisor", daemon=True)
        self._reader.start()

    # --- reading: one thread, which no message can stop -----------------------------------------

    def _read_loop(self) -> None:
        why = DIED
        try:
            reader = FrameReader()
            while True:
                try:
                    msgs = recv_messages(self._sock, reader)
                except OSError:
                    msgs = None
                if msgs is None:
                    why = self._hung_up or DIED
                    break
                for req_id, msg in msgs:
                    try:
                        self._dispatch(req_id, msg)
                    except Exception:  # an event handler's bug: logged, the reading goes on
                        _log.exception("envbox: a message from the supervisor could not be handled")
        except BaseException as e:  # a bug here: no call may wait for a reply that cannot come
            _log.exception("envbox: the client stopped reading its supervisor")
            why = f"the envbox client stopped reading its supervisor ({type(e).__name__}: {e})"
            self._hang_up(why)
        finally:
            self._die(why)

    def _dispatch(self, req_id: int | None, msg: Message | BadFrame) -> None:
        if isinstance(msg, ExitedEvent):
            handler = self._handlers.get(msg.slot)
            if handler is not None:
                handler(msg)
        elif req_id is None:
            _log.warning("envbox: ignored a message from the supervisor with no request id: %.200r", msg)
        elif isinstance(msg, ExecOutput):
            with self._lock:
                call = self._waiting.get(req_id)
            if call is not None and not call.collect(msg):
                self._finish(req_id, error=f"the envbox supervisor sent more than {EXEC_STREAM_CAP} bytes "
                                           f"of {msg.stream} for one exec")  # fmt: skip
        elif isinstance(msg, BadFrame):
            self._finish(req_id, error=f"the envbox supervisor's reply could not be read: {msg.reason}")
        elif isinstance(msg, Reply):
            self._finish(req_id, reply=msg)
        else:
            self._finish(req_id, error=f"the envbox supervisor answered with a {type(msg).__name__}")

    def _finish(self, req_id: int, *, reply: Reply | None = None, error: str | None = None) -> None:
        """The call ``req_id`` is over (an unknown id: one that gave up waiting, or a request
        sent without waiting)."""
        with self._lock:
            call = self._waiting.pop(req_id, None)
        if call is not None:
            call.reply, call.error = reply, error
            call.done.set()

    def _die(self, why: str) -> None:
        """Every call waiting now, and every later one, fails with ``why``; every slot hears it."""
        with self._lock:
            self.dead, self._why = True, why
            waiting = list(self._waiting.values())
            self._waiting.clear()
            handlers = list(self._handlers.items())
        for call in waiting:
            call.error = why
            call.done.set()
        for slot, handler in handlers:
            try:
                handler(SupervisorDied(slot))
            except Exception:
                _log.exception("envbox: the supervisor's death could not be handled")

    # --- calling ---------------------------------------------------------------------------

    def call(self, request: Request[ReplyT], *, timeout: float | None = None,
             parts: Iterable[Message] = ()) -> ReplyT:  # fmt: skip
        """Send one request (then ``parts``, under its id) and wait for its reply.

        ``timeout``: raise :class:`SupervisorError` if the reply has not come by then, whatever
        the supervisor does (None: wait as long as it lives). An exec's reply comes with its
        whole output, joined from its parts.

        Raises :class:`~pytest_envbox.errors.HostUnsupported` when the host lacks what it needs,
        :class:`SupervisorError` when it fails otherwise (or the supervisor died).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        req_id = next(self._ids)
        call = _Call()
        with self._lock:
            if self.dead:
                raise SupervisorError(self._why)
            self._waiting[req_id] = call
        try:
            self._send(request, req_id, deadline)
            for part in parts:
                if call.done.is_set():  # refused, or dead: the rest is not wanted
                    break
                self._send(part, req_id, deadline)
            if not call.done.wait(_left(deadline)):
                raise SupervisorError(f"the envbox supervisor did not answer within {timeout:g} s")
        finally:
            with self._lock:
                self._waiting.pop(req_id, None)
        if call.error is not None:
            raise SupervisorError(call.error)
        reply = call.reply
        if isinstance(reply, ErrorReply):
            _raise(reply)
        if isinstance(reply, ExecReply):
            reply = call.joined(reply)
        # Each request is answered by its own reply type (or an error): see protocol.py.
        return cast(ReplyT, reply)

    def send(self, request: Request[Reply]) -> None:
        """Send a request without waiting for its reply (errors are then ignored)."""
        with self._lock:
            if self.dead:
                raise SupervisorError(self._why)
        self._send(request, next(self._ids), None)

    def _send(self, msg: Message, req_id: int, deadline: float | None) -> None:
        """One frame, whole, by ``deadline``. A supervisor that stops reading must not hold the
        caller past it: the socket is written without blocking, and waited on with poll."""
        try:
            frame = memoryview(encode(msg, req_id))
        except ProtocolError as e:
            raise SupervisorError(f"cannot send this {type(msg).__name__}: {e}") from None
        late = f"the envbox supervisor did not take the {type(msg).__name__} in time"
        left = _left(deadline)
        if not self._send_lock.acquire(timeout=-1 if left is None else left):
            raise SupervisorError(late)
        try:
            sent = 0
            while sent < len(frame):
                try:
                    sent += self._sock.send(frame[sent:], socket.MSG_DONTWAIT)
                    continue
                except BlockingIOError:
                    pass
                except OSError:
                    raise SupervisorError(self._why if self.dead else DIED) from None
                left = _left(deadline)
                poll = select.poll()
                poll.register(self._sock, select.POLLOUT)
                if left == 0 or not poll.poll(None if left is None else left * 1000):
                    if sent:  # half a frame is on the wire: the stream is lost, and the calls on it
                        self._hang_up(f"the envbox client hung up on its supervisor: {late}")
                    raise SupervisorError(late)
        finally:
            self._send_lock.release()

    def _hang_up(self, why: str) -> None:
        """End the stream from this side: the reader then fails every call with ``why``, and the
        supervisor, at end-of-file, tears down."""
        self._hung_up = self._hung_up or why
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def on_event(self, slot: str, handler: EventHandler | None) -> None:
        with self._lock:
            if handler is None:
                self._handlers.pop(slot, None)
            else:
                self._handlers[slot] = handler


class _Call:
    """A call waiting for its reply; an exec's output parts collect here until it comes."""

    __slots__ = ("done", "error", "made", "out", "reply")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.reply: Reply | None = None
        self.error: str | None = None  # why it failed without a reply
        self.out: dict[str, list[bytes]] = {"stdout": [], "stderr": []}
        self.made = {"stdout": 0, "stderr": 0}

    def collect(self, part: ExecOutput) -> bool:
        """Keep a part; False if its stream has passed the cap (the supervisor enforces it: this
        bounds what a bug could make the test process hold)."""
        self.made[part.stream] += len(part.data)
        if self.made[part.stream] > EXEC_STREAM_CAP + EXEC_CHUNK:
            return False
        self.out[part.stream].append(part.data)
        return True

    def joined(self, reply: ExecReply) -> ExecReply:
        if not (self.out["stdout"] or self.out["stderr"]):
            return reply
        return dataclasses.replace(reply, stdout=b"".join([*self.out["stdout"], reply.stdout]),
                                   stderr=b"".join([*self.out["stderr"], reply.stderr]))  # fmt: skip


def _left(deadline: float | None) -> float | None:
    """Seconds until ``deadline`` (never negative), None for none."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())
