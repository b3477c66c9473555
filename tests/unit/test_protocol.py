"""The supervisor's protocol: framing edge cases, and every message through the codec."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_envbox.sandbox.plan import SandboxPlan
from pytest_envbox.supervisor import protocol
from pytest_envbox.supervisor.protocol import (
    MAX_FRAME,
    CgroupLimits,
    ExecReply,
    ExitedEvent,
    FrameReader,
    HelloReply,
    Message,
    NetWiring,
    ProtocolError,
    SignalRequest,
    StartReply,
    StartRequest,
    decode,
    encode,
)

PLAN = SandboxPlan(name="web", argv=["python3", "-m", "http.server"], executable="/usr/bin/python3",
                   env={"PATH": "/usr/bin"}, cwd="/srv", uid=0, gid=0, groups=[0],
                   mounts=[("/data", "/var/lib/data", True)], etc_files={"/etc/hostname": "web\n"},
                   expose=[("/srv", "/srv")])  # fmt: skip
START = StartRequest("env1/web", PLAN, "/tmp/web.log", [8000, 9000], 3,
                     CgroupLimits(64 << 20, 0.5, None), NetWiring("10.0.0.2", 24, "10.0.0.1"))  # fmt: skip
SAMPLES: list[Message] = [START, StartReply(1234, {8000: 40001}), SignalRequest("env1/web", 15, "main"),
                          ExitedEvent("env1/web", 3, 137, True, 1, 1 << 20, 0.25)]  # fmt: skip


def _frames() -> bytes:
    return b"".join(encode(m, i) for i, m in enumerate(SAMPLES))


def _expected() -> list[tuple[int | None, Message]]:
    return [(i, m) for i, m in enumerate(SAMPLES)]


# --- framing ----------------------------------------------------------------------------------


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


@pytest.mark.parametrize("cut", [1, 2, 3])
def test_a_header_split_waits_for_the_rest(cut: int) -> None:
    data = encode(START, 1)
    reader = FrameReader()
    assert reader.feed(data[:cut]) == []
    assert reader.feed(data[cut:]) == [(1, START)]


def test_a_frame_of_exactly_the_maximum_size_is_taken() -> None:
    empty = encode(ExecReply(0, "", "", False, None), 1)
    pad = MAX_FRAME - (len(empty) - 4)
    reply = ExecReply(0, "x" * pad, "", False, None)
    data = encode(reply, 1)
    assert struct.unpack(">I", data[:4])[0] == MAX_FRAME
    assert FrameReader().feed(data) == [(1, reply)]


def test_an_oversized_frame_is_refused_from_its_header() -> None:
    with pytest.raises(ProtocolError, match="too large"):
        FrameReader().feed(struct.pack(">I", MAX_FRAME + 1))


def test_an_unknown_type_tag_is_a_protocol_error() -> None:
    data = json.dumps({"t": "launch_missiles", "id": 1}).encode()
    with pytest.raises(ProtocolError, match="not a message"):
        FrameReader().feed(struct.pack(">I", len(data)) + data)


def test_a_message_with_missing_fields_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="SignalRequest"):
        decode({"t": "signal", "id": 1, "slot": "e/a"})


def test_published_ports_keep_int_keys_and_id_ranges_stay_tuples() -> None:
    [(_, reply)] = FrameReader().feed(encode(StartReply(None, {80: 1, 443: 2}), 5))
    assert isinstance(reply, StartReply) and reply.ports == {80: 1, 443: 2}
    [(_, hello)] = FrameReader().feed(encode(HelloReply(9, None, [(0, 1), (1, 65536)], []), 6))
    assert isinstance(hello, HelloReply) and hello.uid_map == [(0, 1), (1, 65536)]


def test_an_event_has_no_request_id() -> None:
    ev = ExitedEvent("e/a", 1, 0, False, 0, None, None)
    assert "id" not in json.loads(encode(ev)[4:])
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
    req_id = data.draw(st.one_of(st.none(), st.integers(0, 2**53)))
    [(got_id, got)] = FrameReader().feed(encode(msg, req_id))
    assert (got_id, got) == (req_id, msg)
    assert type(got) is cls


def test_every_message_type_has_its_own_tag() -> None:
    tags = [t.TAG for t in protocol.MESSAGE_TYPES]
    assert len(tags) == len(set(tags))
    tagged = {t for t in vars(protocol).values()
              if isinstance(t, type) and issubclass(t, Message) and hasattr(t, "TAG")}  # fmt: skip
    assert tagged == set(protocol.MESSAGE_TYPES)
