"""The supervisor's protocol: framing edge cases, every message through the codec, and the
client's reader surviving whatever frame comes."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_envbox.engine.channel import Channel, SupervisorError
from pytest_envbox.sandbox.plan import SandboxPlan
from pytest_envbox.supervisor import protocol
from pytest_envbox.supervisor.protocol import (
    EXEC_CHUNK,
    CgroupLimits,
    Done,
    ErrorReply,
    ExecOutput,
    ExecReply,
    ExitedEvent,
    HelloReply,
    Message,
    NetWiring,
    SignalRequest,
    StartReply,
    StartRequest,
    StatsRequest,
)
from pytest_envbox.supervisor.wire import (
    HEADER_SIZE,
    MAX_FRAME,
    BadFrame,
    FrameReader,
    ProtocolError,
    decode,
    encode,
)
from pytest_envbox.wait import Deadline, wait_until

PLAN = SandboxPlan(name="web", argv=["python3", "-m", "http.server"], executable="/usr/bin/python3",
                   env={"PATH": "/usr/bin"}, cwd="/srv", uid=0, gid=0, groups=[0],
                   mounts=[("/data", "/var/lib/data", True)], etc_files={"/etc/hostname": "web\n"},
                   expose=[("/srv", "/srv")])  # fmt: skip
START = StartRequest("env1/web", PLAN, "/tmp/web.log", [8000, 9000], 3,
                     CgroupLimits(64 << 20, 0.5, None), NetWiring("10.0.0.2", 24, "10.0.0.1"))  # fmt: skip
SAMPLES: list[Message] = [START, StartReply(1234, {8000: 40001}), SignalRequest("env1/web", 15, "main"),
                          ExitedEvent("env1/web", 3, 137, True, 1, 1 << 20, 0.25)]  # fmt: skip


def _frames() -> bytes:
    return b"".join(encode(m, i) for i, m in enumerate(SAMPLES, 1))


def _expected() -> list[tuple[int | None, Message]]:
    return [(i, m) for i, m in enumerate(SAMPLES, 1)]


# --- framing ---------------------------------------------------------------------------------


def _frame(body: bytes, req_id: int = 0, length: int | None = None) -> bytes:
    """A frame as a peer might send it: any body, any id (0: none), any claimed length."""
    return struct.pack(">IQ", len(body) if length is None else length, req_id) + body


def test_several_frames_in_one_feed_come_out_in_order() -> None:
    assert FrameReader().feed(_frames()) == _expected()


def test_a_frame_split_at_any_byte_comes_out_whole_once() -> None:
    data = encode(START, 7)
    for cut in range(1, len(data)):
        reader = FrameReader()
        assert reader.feed(data[:cut]) == [], cut
        assert reader.feed(data[cut:]) == [(7, START)], cut
        assert reader.feed(b"") == []


def test_frames_fed_one_byte_at_a_time() -> None:
    reader = FrameReader()
    out = []
    for b in _frames():
        out += reader.feed(bytes([b]))
    assert out == _expected()


@pytest.mark.parametrize("cut", range(1, HEADER_SIZE))
def test_a_header_split_waits_for_the_rest(cut: int) -> None:
    data = encode(START, 1)
    reader = FrameReader()
    assert reader.feed(data[:cut]) == []
    assert reader.feed(data[cut:]) == [(1, START)]


def test_a_frame_of_exactly_the_maximum_size_is_taken() -> None:
    empty = encode(ErrorReply("failed", ""), 1)
    reply = ErrorReply("failed", "x" * (MAX_FRAME - (len(empty) - HEADER_SIZE)))
    data = encode(reply, 1)
    assert struct.unpack(">I", data[:4])[0] == MAX_FRAME
    assert FrameReader().feed(data) == [(1, reply)]


def test_a_message_past_the_maximum_is_refused_by_encode_on_either_end() -> None:
    with pytest.raises(ProtocolError, match="larger than a frame may be"):
        encode(ErrorReply("failed", "x" * MAX_FRAME), 3)


def test_an_oversized_frame_fails_its_own_id_and_is_skipped_unread() -> None:
    # The body is never held: the reader drops it as it comes, and reads the next frame.
    reader = FrameReader()
    size = MAX_FRAME + 10
    [(req_id, bad)] = reader.feed(struct.pack(">IQ", size, 9))
    assert req_id == 9 and isinstance(bad, BadFrame) and "larger than a frame may be" in bad.reason
    for _ in range(size // (1 << 20)):
        assert reader.feed(bytes(1 << 20)) == []
    assert reader.feed(bytes(size % (1 << 20)) + encode(Done(), 10)) == [(10, Done())]
    assert len(reader._buf) == 0


def test_an_oversized_frame_in_one_feed_with_the_next() -> None:
    data = _frame(b"x" * 100, 4, length=MAX_FRAME + 1)
    reader = FrameReader()
    [(req_id, bad)] = reader.feed(data)
    assert req_id == 4 and isinstance(bad, BadFrame)
    rest = MAX_FRAME + 1 - 100
    assert reader.feed(bytes(rest) + encode(Done(), 5)) == [(5, Done())]


@pytest.mark.parametrize(("body", "why"), [
    (b"{not json", "not JSON"),
    (b"\xff\xfe", "not JSON"),
    (b"[1, 2]", "not a message"),
    (b'{"t": ["unhashable"]}', "not a message"),
    (b'{"t": "launch_missiles"}', "not a message"),
    (b'{"t": "signal", "slot": "e/a"}', "SignalRequest with the wrong fields"),
    (b'{"t": "start", "slot": "e/a"}', "StartRequest with the wrong fields"),
    (b'{"t": "exec_output", "stream": "stdout", "data": "not base64!"}', "ExecOutput with the wrong fields"),
    (b"[" * 100_000 + b"]" * 100_000, "not JSON"),
])  # fmt: skip
def test_a_malformed_frame_with_an_id_fails_that_id_and_the_next_frame_is_read(body: bytes, why: str) -> None:
    out = FrameReader().feed(_frame(body, 12) + encode(Done(), 13))
    assert len(out) == 2
    (req_id, bad), after = out
    assert req_id == 12 and isinstance(bad, BadFrame) and why in bad.reason, bad
    assert after == (13, Done())


def test_a_malformed_frame_without_an_id_comes_out_with_none() -> None:
    [(req_id, bad), after] = FrameReader().feed(_frame(b"{oops") + encode(Done(), 2))
    assert req_id is None and isinstance(bad, BadFrame)
    assert after == (2, Done())


@settings(max_examples=200, deadline=None)
@given(body=st.binary(max_size=200), req_id=st.integers(0, 2**64 - 1))
def test_no_body_makes_the_reader_raise(body: bytes, req_id: int) -> None:
    out = FrameReader().feed(_frame(body, req_id) + encode(Done(), 1))
    assert len(out) == 2 and out[1] == (1, Done())
    assert out[0][0] == (req_id or None)


def test_decode_refuses_missing_fields() -> None:
    with pytest.raises(ProtocolError, match="SignalRequest"):
        decode(b'{"t": "signal", "slot": "e/a"}')


def test_exec_output_is_base64_on_the_wire_not_escaped_nuls() -> None:
    part = ExecOutput("stdout", bytes(EXEC_CHUNK))
    data = encode(part, 3)
    assert len(data) < EXEC_CHUNK * 4 // 3 + 100  # JSON would make each NUL 6 bytes: \u0000
    assert FrameReader().feed(data) == [(3, part)]


def test_published_ports_keep_int_keys_and_id_ranges_stay_tuples() -> None:
    [(_, reply)] = FrameReader().feed(encode(StartReply(None, {80: 1, 443: 2}), 5))
    assert isinstance(reply, StartReply) and reply.ports == {80: 1, 443: 2}
    [(_, hello)] = FrameReader().feed(encode(HelloReply(9, None, [(0, 1), (1, 65536)], []), 6))
    assert isinstance(hello, HelloReply) and hello.uid_map == [(0, 1), (1, 65536)]


def test_an_event_has_no_request_id() -> None:
    ev = ExitedEvent("e/a", 1, 0, False, 0, None, None)
    assert struct.unpack(">IQ", encode(ev)[:HEADER_SIZE])[1] == 0
    assert FrameReader().feed(encode(ev)) == [(None, ev)]


# --- every message type through the codec ------------------------------------------------------

_text = st.text(max_size=20)
_floats = st.floats(allow_nan=False)
_plans = st.builds(SandboxPlan, name=_text, argv=st.lists(_text, max_size=3), executable=_text,
                   env=st.dictionaries(_text, _text, max_size=3), cwd=_text, uid=st.integers(0, 2**32),
                   gid=st.integers(0, 2**32), groups=st.lists(st.integers(0, 2**32), max_size=3),
                   mounts=st.lists(st.tuples(_text, _text, st.booleans()), max_size=3),
                   etc_files=st.dictionaries(_text, _text, max_size=2),
                   expose=st.lists(st.tuples(_text, _text), max_size=2))  # fmt: skip


st.register_type_strategy(SandboxPlan, _plans)
st.register_type_strategy(float, _floats)


@pytest.mark.parametrize("cls", protocol.MESSAGE_TYPES, ids=lambda c: c.__name__)
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_every_message_survives_the_codec(cls: type[Message], data: st.DataObject) -> None:
    msg = data.draw(st.from_type(cls))
    req_id = data.draw(st.one_of(st.none(), st.integers(1, 2**64 - 1)))
    [(got_id, got)] = FrameReader().feed(encode(msg, req_id))
    assert (got_id, got) == (req_id, msg)
    assert type(got) is cls


def test_every_message_type_has_its_own_tag() -> None:
    tags = [t.TAG for t in protocol.MESSAGE_TYPES]
    assert len(tags) == len(set(tags))
    tagged = {t for t in vars(protocol).values()
              if isinstance(t, type) and issubclass(t, Message) and hasattr(t, "TAG")}  # fmt: skip
    assert tagged == set(protocol.MESSAGE_TYPES)


# --- the client's reader: no frame stops it ----------------------------------------------------


class FakeSupervisor:
    """The supervisor's end of a Channel's socket, played by the test: it reads the requests
    and writes whatever bytes the test wants back."""

    def __init__(self) -> None:
        ours, self.sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.channel = Channel(ours)
        self._reader = FrameReader()
        self._got: list[tuple[int | None, Message | BadFrame]] = []
        self._pool = ThreadPoolExecutor(max_workers=4)

    def call(self, **kw: object) -> Future[object]:
        """A call of the channel's, from another thread (it blocks until answered)."""
        return self._pool.submit(self.channel.call, StatsRequest("e/a"), **kw)  # type: ignore[arg-type]

    def next_request(self) -> tuple[int | None, Message | BadFrame]:
        while not self._got:
            data = self.sock.recv(1 << 16)
            assert data, "the channel closed its socket"
            self._got += self._reader.feed(data)
        return self._got.pop(0)

    def close(self) -> None:
        self.sock.close()
        self._pool.shutdown(wait=True)
        self.channel._sock.close()


LogCapture = pytest.LogCaptureFixture


@pytest.fixture
def sup() -> Iterator[FakeSupervisor]:
    fake = FakeSupervisor()
    yield fake
    fake.close()


def _answered(sup: FakeSupervisor, reply: Message) -> object:
    """A call answered with ``reply``: its result (or exception) once the channel has read it."""
    fut = sup.call()
    req_id, _ = sup.next_request()
    sup.sock.sendall(encode(reply, req_id))
    return fut.result(timeout=5)


@pytest.mark.parametrize(("body", "why"), [
    (b"{bad json", "not JSON"),
    (b'{"t": "launch_missiles"}', "not a message"),
    (b'{"t": "stats_reply"}', "StatsReply with the wrong fields"),
])  # fmt: skip
def test_a_bad_reply_fails_its_call_and_the_next_works(sup: FakeSupervisor, body: bytes, why: str) -> None:
    fut = sup.call()
    req_id, _ = sup.next_request()
    assert req_id is not None
    sup.sock.sendall(_frame(body, req_id))
    with pytest.raises(SupervisorError, match=f"reply could not be read: .*{why}"):
        fut.result(timeout=5)
    assert _answered(sup, Done()) == Done()


def test_an_oversized_reply_fails_its_call_and_the_reader_reads_on(sup: FakeSupervisor) -> None:
    fut = sup.call()
    req_id, _ = sup.next_request()
    assert req_id is not None
    size = MAX_FRAME + 1
    sup.sock.sendall(struct.pack(">IQ", size, req_id))
    with pytest.raises(SupervisorError, match="larger than a frame may be"):
        fut.result(timeout=5)  # at once, from the header, before the body comes
    sup.sock.sendall(bytes(size))  # skipped as it comes, never held
    assert _answered(sup, Done()) == Done()


def test_a_bad_frame_without_an_id_is_logged_and_skipped(sup: FakeSupervisor, caplog: LogCapture) -> None:
    sup.sock.sendall(_frame(b"{junk"))
    assert _answered(sup, Done()) == Done()
    assert "no request id" in caplog.text


def test_a_reply_of_a_kind_the_client_does_not_expect_fails_its_call(sup: FakeSupervisor) -> None:
    with pytest.raises(SupervisorError, match="answered with a SignalRequest"):
        _answered(sup, SignalRequest("e/a", 15, "main"))
    assert _answered(sup, Done()) == Done()


def test_an_event_handler_that_raises_is_logged_and_the_reading_goes_on(sup: FakeSupervisor,
                                                                        caplog: LogCapture) -> None:
    def broken(msg: object) -> None:
        raise RuntimeError("handler bug")

    sup.channel.on_event("e/a", broken)
    sup.sock.sendall(encode(ExitedEvent("e/a", 1, 0, False, 0, None, None)))
    assert _answered(sup, Done()) == Done()
    assert "handler bug" in caplog.text


def test_an_execs_output_parts_are_joined_to_its_reply(sup: FakeSupervisor) -> None:
    fut = sup.call()
    req_id, _ = sup.next_request()
    for i in range(3):
        sup.sock.sendall(encode(ExecOutput("stdout", bytes([i]) * EXEC_CHUNK), req_id))
    sup.sock.sendall(encode(ExecOutput("stderr", b"err1"), req_id))
    sup.sock.sendall(encode(ExecReply(0, b"tail", b"err2", False, None), req_id))
    reply = fut.result(timeout=5)
    assert isinstance(reply, ExecReply)
    assert reply.stdout == bytes(EXEC_CHUNK) + b"\1" * EXEC_CHUNK + b"\2" * EXEC_CHUNK + b"tail"
    assert reply.stderr == b"err1err2"


def test_the_supervisors_death_fails_waiting_and_later_calls_at_once(sup: FakeSupervisor) -> None:
    died: list[object] = []
    sup.channel.on_event("e/a", died.append)
    fut = sup.call()
    sup.next_request()
    sup.sock.shutdown(socket.SHUT_RDWR)
    with pytest.raises(SupervisorError, match="has died"):
        fut.result(timeout=5)
    with pytest.raises(SupervisorError, match="has died"):
        sup.channel.call(StatsRequest("e/a"))
    assert sup.channel.dead and [type(m).__name__ for m in died] == ["SupervisorDied"]


def test_a_reader_that_fails_fails_every_call_and_hangs_up(sup: FakeSupervisor, caplog: LogCapture,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: FrameReader, data: bytes) -> list[object]:
        raise RuntimeError("reader bug")

    fut = sup.call()
    sup.next_request()
    monkeypatch.setattr(FrameReader, "feed", broken)
    sup.sock.sendall(encode(Done(), 1))
    with pytest.raises(SupervisorError, match=r"stopped reading its supervisor .*reader bug"):
        fut.result(timeout=5)
    with pytest.raises(SupervisorError, match="reader bug"):
        sup.channel.call(StatsRequest("e/a"))
    assert sup.sock.recv(1) == b""  # the supervisor sees EOF, and tears down
    assert "reader bug" in caplog.text  # and the test process's log says why


def test_a_call_with_a_timeout_returns_whatever_the_supervisor_does(sup: FakeSupervisor) -> None:
    deadline = Deadline(5)
    with pytest.raises(SupervisorError, match=r"did not answer within 0\.2 s"):
        sup.call(timeout=0.2).result(timeout=5)
    assert deadline.remaining() > 3
    # The late reply goes nowhere; the channel still works.
    late, _ = sup.next_request()
    sup.sock.sendall(encode(Done(), late))
    assert _answered(sup, Done()) == Done()


def test_a_supervisor_that_stops_reading_cannot_hold_a_call_past_its_timeout(sup: FakeSupervisor) -> None:
    # Parts that fill the socket, which nobody reads: the send gives up at the deadline.
    parts = [ExecOutput("stdout", bytes(EXEC_CHUNK)) for _ in range(64)]
    deadline = Deadline(10)
    with pytest.raises(SupervisorError, match="did not take the ExecOutput in time"):
        sup.call(timeout=0.5, parts=parts).result(timeout=10)
    assert deadline.remaining() > 7
    # Half a frame went out: the stream is lost, so the channel has hung up (the supervisor
    # tears down), and says so.
    assert wait_until(lambda: sup.channel.dead or None, Deadline(5))
    with pytest.raises(SupervisorError, match="hung up on its supervisor"):
        sup.channel.call(StatsRequest("e/a"))
