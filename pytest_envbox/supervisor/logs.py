"""A service's output: a pipe the supervisor empties into its log file, up to a cap."""

from __future__ import annotations

import contextlib
import fcntl
import os
import selectors
import struct
import termios
import time
from dataclasses import dataclass, field

__all__ = ["LOG_CAP", "LOG_CPU_SHARE", "LOG_TAIL", "LogPump", "LogSink", "close_sink", "drain",
           "open_log"]

#: A service's log file grows to this size at most; later output is counted, its last
#: ``LOG_TAIL`` bytes kept, and written after a marker line when the service's output ends.
LOG_CAP = 64 << 20
LOG_TAIL = 64 << 10

#: What one service's output may cost the supervisor: this share of one core (CPU time of its
#: loop thread, measured), with a burst of LOG_CPU_BURST seconds. Past it, the supervisor stops
#: reading that service's pipe for a while (at least LOG_PAUSE); once the pipe is full, the
#: service blocks in write(): backpressure, and its CPU time is its own. A service that writes
#: now and then never comes near it, and its lines are read the moment they are written.
LOG_CPU_SHARE = 0.03
LOG_CPU_BURST = 0.03
LOG_PAUSE = 0.05
#: A wake-up's cost that the drain's own clock does not see (the selector, the dispatch): charged
#: as well, so that many tiny writes count as what they cost.
WAKE_COST = 20e-6


@dataclass
class LogSink:
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
    #: CPU seconds of the supervisor this output may still spend now, and when that was reckoned
    credit: float = LOG_CPU_BURST
    reckoned: float = field(default_factory=time.monotonic)
    #: while its reading is paused: when it resumes (see LOG_CPU_SHARE)
    resume_at: float | None = None

    __hash__ = object.__hash__  # one sink is one pipe: by identity


def open_log(log_path: str) -> tuple[LogSink, int]:
    """A run's sink, appending to ``log_path``, and the pipe's writing end for the service."""
    # Not O_APPEND (splice refuses it): only this process writes the file, at its end.
    log_file = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    os.lseek(log_file, 0, os.SEEK_END)
    sink = LogSink(-1, log_file, 0)  # the cap is per run
    sink.pipe, log_fd = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    os.set_blocking(log_fd, True)  # the service's end: blocking, as a file would be
    with contextlib.suppress(OSError):
        fcntl.fcntl(log_fd, 1031, 1 << 20)  # F_SETPIPE_SZ: fewer wake-ups for a chatty service
    return sink, log_fd


def drain(sink: LogSink) -> bool:
    """Move what the service wrote into its log file, up to LOG_CAP; then count and keep the
    tail. True at end of output (every writer gone): then the caller finishes the file (see
    :func:`close_sink`).

    At most 64 MiB per call: a service that never stops writing must not keep the event
    loop here (the selector reports the pipe again)."""
    if sink.pipe < 0:  # closed by an earlier event of the same select()
        return True
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
                n = _discard(sink)
        except BlockingIOError:
            return False
        except OSError:
            n = 0
        if n == 0:  # end of output
            return True
    return False


def _discard(sink: LogSink) -> int:
    """Past the cap: count what is in the pipe and keep its last LOG_TAIL bytes as the tail.

    All but those are spliced to ``/dev/null``, never copied into this process: dropping a
    flood costs the supervisor next to nothing. The bytes taken; 0 at end of output."""
    global _devnull
    pending = struct.unpack("i", fcntl.ioctl(sink.pipe, termios.FIONREAD, b"\0\0\0\0"))[0]
    n = 0
    if pending > LOG_TAIL:
        if _devnull < 0:
            _devnull = os.open("/dev/null", os.O_WRONLY | os.O_CLOEXEC)
        n = os.splice(sink.pipe, _devnull, pending - LOG_TAIL, flags=os.SPLICE_F_NONBLOCK)
        sink.dropped += n
        sink.tail.clear()  # at least LOG_TAIL newer bytes are still in the pipe
    try:
        data = os.read(sink.pipe, LOG_TAIL)
    except BlockingIOError:
        if n:
            return n
        raise
    sink.dropped += len(data)
    sink.tail += data
    del sink.tail[:-LOG_TAIL]
    return n + len(data)


_devnull = -1


def close_sink(sel: selectors.BaseSelector, sink: LogSink) -> None:
    """Stop reading the service's output; say in the file what went past the cap."""
    if sink.pipe < 0:
        return
    with contextlib.suppress(KeyError, ValueError):  # (not registered while paused)
        sel.unregister(sink.pipe)
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


class LogPump:
    """Drains the services' pipes within their CPU budget (LOG_CPU_SHARE), pausing the greedy.

    The selector reports a sink's pipe (registered with the sink as its data); ``drain`` moves
    what is there and charges its cost; over budget, the pipe leaves the selector until its
    ``resume_at``, which the loop learns from ``timeout`` and acts on in ``resume``.
    """

    def __init__(self, sel: selectors.BaseSelector) -> None:
        self.sel = sel
        self.paused: set[LogSink] = set()

    def watch(self, sink: LogSink) -> None:
        self.sel.register(sink.pipe, selectors.EVENT_READ, sink)

    def drain(self, sink: LogSink) -> bool:
        """:func:`drain`, charged to the sink; True at end of output."""
        t0 = time.thread_time()
        if drain(sink):
            return True
        now = time.monotonic()
        cost = time.thread_time() - t0 + WAKE_COST
        sink.credit = min(LOG_CPU_BURST, sink.credit + (now - sink.reckoned) * LOG_CPU_SHARE) - cost
        sink.reckoned = now
        if sink.credit < 0:
            sink.resume_at = now + max(LOG_PAUSE, -sink.credit / LOG_CPU_SHARE)
            self.sel.unregister(sink.pipe)
            self.paused.add(sink)
        return False

    def timeout(self) -> float | None:
        """Seconds until the next paused pipe is to be read again; None if none is paused."""
        due = [s.resume_at for s in self.paused if s.resume_at is not None]
        return max(0.0, min(due) - time.monotonic()) if due else None

    def resume(self) -> None:
        """Give the selector back the pipes whose pause is over (or forget the closed ones)."""
        if not self.paused:
            return
        now = time.monotonic()
        for sink in list(self.paused):
            if sink.pipe < 0:
                self.paused.discard(sink)
            elif sink.resume_at is not None and now >= sink.resume_at:
                self.paused.discard(sink)
                sink.resume_at = None
                self.sel.register(sink.pipe, selectors.EVENT_READ, sink)
