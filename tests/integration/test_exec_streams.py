"""``exec()`` with large output and input, and frames that are not messages.

A command inside a service chooses how much it writes: 12 MB of NULs once made a 72 MB frame,
past the protocol's limit, which ended the test process's reader and hung every call after it.
Output now streams in parts, each stream capped at 256 MiB, and a bad frame fails one call.
"""

from __future__ import annotations

import hashlib
import struct
import time
from collections.abc import Callable, Iterator

import pytest

from pytest_envbox import EnvboxError, Environment, Service
from pytest_envbox.engine import channel
from pytest_envbox.engine.client import SupervisorError, get_supervisor
from pytest_envbox.supervisor import wire
from pytest_envbox.supervisor.protocol import EXEC_STREAM_CAP, CensusRequest, Message
from tests.kernel import alive

TWELVE_MB = 12_000_000


@pytest.fixture(scope="module")
def box() -> Iterator[Environment]:
    with Environment([Service("box", ["sleep", "1000"])]) as env:
        yield env


def test_exec_returns_12_mb_of_nuls_whole_and_quickly(box: Environment) -> None:
    t0 = time.monotonic()
    r = box["box"].exec(["head", "-c", str(TWELVE_MB), "/dev/zero"], timeout=20)
    took = time.monotonic() - t0
    assert r.returncode == 0 and r.stderr == ""
    assert len(r.stdout) == TWELVE_MB and r.stdout == "\0" * TWELVE_MB
    assert took < 10, took


def test_exec_returns_12_mb_of_text_on_each_stream_byte_for_byte(box: Environment) -> None:
    # Both streams at once, each a numbered line at a time: a lost, doubled or reordered part
    # would show.
    script = ("import sys\nfor i in range(1_000_000):\n"
              "    sys.stdout.write(f'{i:011d}\\n'); sys.stderr.write(f'{i:011x}\\n')\n")  # fmt: skip
    r = box["box"].exec(["python3", "-c", script], timeout=60)
    assert r.returncode == 0, r.stderr[-500:]
    assert len(r.stdout) == len(r.stderr) == TWELVE_MB
    assert r.stdout == "".join(f"{i:011d}\n" for i in range(1_000_000))
    assert r.stderr == "".join(f"{i:011x}\n" for i in range(1_000_000))


def test_a_multibyte_character_split_between_parts_comes_back_whole(box: Environment) -> None:
    # 1 MiB parts: a 3-byte character written across a boundary must not become U+FFFD.
    text = "é" * 700_000 + "€" * 300_000  # 2.3 MB, not a multiple of anything
    r = box["box"].exec(["cat"], input=text, timeout=30)
    assert r.returncode == 0 and r.stdout == text


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_output_past_the_cap_kills_the_command_with_a_clear_error_and_all_still_works(stream: str) -> None:
    # 300 MB, just past the 256 MiB cap: bounded, and done in seconds.
    flood = f"head -c 300000000 /dev/zero{' >&2' if stream == 'stderr' else ''}"
    with Environment([Service("flood", ["sleep", "1000"])]) as env:
        h = env["flood"]
        t0 = time.monotonic()
        with pytest.raises(EnvboxError) as caught:
            h.exec(["sh", "-c", flood], timeout=120)
        took = time.monotonic() - t0
        message = str(caught.value)
        assert type(caught.value) is EnvboxError
        assert "service 'flood'" in message and "head -c 300000000" in message
        assert f"more than {EXEC_STREAM_CAP >> 20} MiB to {stream}" in message
        assert "was killed" in message and "mount" in message and "readonly = false" in message
        assert took < 60, took
        # The service, and the environment, are as they were.
        assert h.running
        again = h.exec(["sh", "-c", "echo still-here"], timeout=10)
        assert again.returncode == 0 and again.stdout == "still-here\n"
        assert env.workdir is not None
        workdir = env.workdir
    assert not workdir.exists()
    # And the next environment works too.
    with Environment([Service("next", ["sleep", "1000"])]) as env2:
        assert env2["next"].exec(["true"], timeout=10).returncode == 0


def test_a_large_input_reaches_the_command_whole(box: Environment) -> None:
    data = "".join(f"{i:09d}\n" for i in range(2_000_000))  # 20 MB, 20 parts
    r = box["box"].exec(["sha256sum"], input=data, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == hashlib.sha256(data.encode()).hexdigest()


def test_a_large_input_the_command_never_reads_does_not_hold_the_call(box: Environment) -> None:
    t0 = time.monotonic()
    r = box["box"].exec(["true"], input="x" * 20_000_000, timeout=60)
    assert r.returncode == 0
    assert time.monotonic() - t0 < 20


def test_an_input_past_the_cap_is_refused_before_it_is_sent(box: Environment) -> None:
    huge = "x" * (EXEC_STREAM_CAP + 1)
    with pytest.raises(EnvboxError, match=r"service 'box': exec 'cat': input= has 268435457 bytes.*mount"):
        box["box"].exec(["cat"], input=huge, timeout=10)
    del huge
    assert box["box"].exec(["echo", "ok"], timeout=10).stdout == "ok\n"


def _sent_instead(body: bytes) -> Callable[[Message, int | None], bytes]:
    """``encode`` for the client's next frame only: that frame's body replaced by ``body``, its
    header's request id kept (as a bug in the test process might send it)."""
    real = wire.encode
    sent = []

    def encode(msg: Message, req_id: int | None = None) -> bytes:
        frame = real(msg, req_id)
        if sent:
            return frame
        sent.append(frame)
        return struct.pack(">IQ", len(body), req_id or 0) + body

    return encode


@pytest.mark.parametrize("body", [
    pytest.param(b"{not json", id="not-json"),
    pytest.param(b'{"t": "launch_missiles"}', id="unknown-type"),
    pytest.param(b'{"t": "census", "extra": 1}', id="wrong-fields"),
    pytest.param(bytes(wire.MAX_FRAME + 1), id="oversized"),
])  # fmt: skip
def test_a_bad_frame_from_the_test_process_fails_that_call_and_the_supervisor_serves_on(
    box: Environment, body: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    sup = get_supervisor()
    pid = sup.pid
    monkeypatch.setattr(channel, "encode", _sent_instead(body))
    with pytest.raises(SupervisorError, match="ProtocolError"):
        sup.call(CensusRequest(), timeout=30)
    monkeypatch.undo()
    assert alive(pid) and not sup.dead
    assert sup.call(CensusRequest(), timeout=30).slots  # the same supervisor, with its slots
    assert box["box"].running and box["box"].exec(["echo", "ok"], timeout=10).stdout == "ok\n"
