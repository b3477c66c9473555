"""A service's log pipe: the cap with its tail, and the supervisor's CPU budget per service."""

from __future__ import annotations

import os
import selectors
from pathlib import Path

from pytest_envbox.supervisor.logs import LOG_CAP, LOG_TAIL, LogPump, close_sink, open_log


def test_past_the_cap_output_is_counted_and_only_its_last_bytes_are_kept(tmp_path: Path) -> None:
    sink, w = open_log(str(tmp_path / "s.log"))
    sink.written = LOG_CAP  # as if the file were full
    data = bytes(range(256)) * 1200  # 300 KiB, more than the tail
    os.write(w, data)
    os.close(w)
    with selectors.DefaultSelector() as sel:
        pump = LogPump(sel)
        pump.watch(sink)
        assert pump.drain(sink)  # all of it, then end of output
        assert sink.dropped == len(data) and bytes(sink.tail) == data[-LOG_TAIL:]
        close_sink(sel, sink)
    assert (tmp_path / "s.log").read_bytes().endswith(data[-LOG_TAIL:])


def test_a_sink_over_its_cpu_budget_leaves_the_selector_until_its_pause_is_over(tmp_path: Path) -> None:
    sink, w = open_log(str(tmp_path / "s.log"))
    with selectors.DefaultSelector() as sel:
        pump = LogPump(sel)
        pump.watch(sink)
        os.write(w, b"line\n")
        assert not pump.drain(sink)  # within budget: still watched, no pause
        assert sel.get_map().get(sink.pipe) is not None and pump.timeout() is None
        sink.credit = -0.001  # a flood spent it all
        os.write(w, b"more\n")
        assert not pump.drain(sink)
        assert sink.pipe not in sel.get_map() and sink in pump.paused
        timeout = pump.timeout()
        assert timeout is not None and 0 < timeout <= 1
        pump.resume()  # too early: still paused
        assert sink.pipe not in sel.get_map()
        assert sink.resume_at is not None
        sink.resume_at -= 1
        pump.resume()
        assert sel.get_map().get(sink.pipe) is not None and not pump.paused
        os.close(w)
        assert pump.drain(sink)
        close_sink(sel, sink)
    assert (tmp_path / "s.log").read_bytes() == b"line\nmore\n"


def test_a_sink_closed_earlier_in_the_same_select_is_at_its_end(tmp_path: Path) -> None:
    sink, w = open_log(str(tmp_path / "s.log"))
    os.write(w, b"last\n")
    with selectors.DefaultSelector() as sel:
        pump = LogPump(sel)
        pump.watch(sink)
        assert not pump.drain(sink)
        os.close(w)
        assert pump.drain(sink)
        close_sink(sel, sink)  # (the service's exit, say)
        assert pump.drain(sink)  # then its pipe's event, from the same select()
    sink, w = open_log(str(tmp_path / "t.log"))
    sink.written = LOG_CAP
    os.close(w)
    with selectors.DefaultSelector() as sel:
        close_sink(sel, sink)
        assert LogPump(sel).drain(sink)  # past the cap too
