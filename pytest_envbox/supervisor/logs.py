"""A service's output: a pipe the supervisor empties into its log file, up to a cap."""

from __future__ import annotations

import contextlib
import fcntl
import os
import selectors
from dataclasses import dataclass, field

__all__ = ["LOG_CAP", "LOG_TAIL", "LogSink", "close_sink", "drain", "open_log"]

#: A service's log file grows to this size at most; later output is counted, its last
#: ``LOG_TAIL`` bytes kept, and written after a marker line when the service's output ends.
LOG_CAP = 64 << 20
LOG_TAIL = 64 << 10


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
            return False
        except OSError:
            n = 0
        if n == 0:  # end of output
            return True
    return False


def close_sink(sel: selectors.BaseSelector, sink: LogSink) -> None:
    """Stop reading the service's output; say in the file what went past the cap."""
    if sink.pipe < 0:
        return
    with contextlib.suppress(KeyError, ValueError):
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
