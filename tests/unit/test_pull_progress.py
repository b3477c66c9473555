"""What a pull shows: nothing when it is fast, each layer's bytes when it is not."""

from __future__ import annotations

import io

from pytest_envbox.cli.images import line_printer
from pytest_envbox.images.progress import PullProgress, human_bytes

A = "sha256:" + "a" * 64
B = "sha256:" + "b" * 64


def test_a_pull_faster_than_the_delay_draws_nothing() -> None:
    drawn: list[tuple[str, bool]] = []
    p = PullProgress("localhost:5000/redis:7", lambda t, f: drawn.append((t, f)), delay=3600)
    p.phase("downloading")
    p.layer(A, 10, 100)
    p.finish("pulled localhost:5000/redis:7")
    assert drawn == []


def test_a_slow_pull_shows_each_layers_bytes_then_a_summary() -> None:
    drawn: list[tuple[str, bool]] = []
    p = PullProgress("localhost:5000/redis:7", lambda t, f: drawn.append((t, f)), delay=0, every=0)
    p.phase("downloading")
    p.layer(A, 1536, 3 << 20)
    p.layer(B, 2048, 2048)
    text, final = drawn[-1]
    assert not final
    assert text.startswith("envbox: downloading localhost:5000/redis:7 ")
    assert "aaaaaaaaaaaa 1.5 KiB/3.0 MiB" in text  # a layer under way: its bytes
    assert "bbbbbbbbbbbb done" in text  # a finished one
    assert "in 2 layers" in text
    p.finish("pulled localhost:5000/redis:7")
    assert drawn[-1][1] is True and drawn[-1][0].startswith("envbox: pulled localhost:5000/redis:7 (")


def test_human_bytes() -> None:
    assert [human_bytes(n) for n in (0, 1023, 1024, 5 << 20, 3 << 30)] == [
        "0 B", "1023 B", "1.0 KiB", "5.0 MiB", "3.0 GiB"]


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


def test_envbox_pull_rewrites_one_line_on_a_terminal() -> None:
    out = _Stream(tty=True)
    show = line_printer(out)
    show("envbox: downloading x 1 B/2 B", False)
    show("envbox: downloading x 2 B/2 B", False)
    show("envbox: pulled x (1.2s)", True)
    assert out.getvalue() == ("\r\x1b[Kenvbox: downloading x 1 B/2 B\r\x1b[Kenvbox: downloading x "
                              "2 B/2 B\r\x1b[Kenvbox: pulled x (1.2s)\n")


def test_envbox_pull_in_a_log_writes_whole_lines_not_a_flood() -> None:
    out = _Stream(tty=False)
    show = line_printer(out)
    for i in range(100):
        show(f"envbox: downloading x {i} B/100 B", False)
    show("envbox: pulled x (1.2s)", True)
    lines = out.getvalue().splitlines()
    assert lines[0] == "envbox: downloading x 0 B/100 B"
    assert lines[-1] == "envbox: pulled x (1.2s)"
    assert len(lines) == 2  # within 3 s only the first update, then the final line
    assert "\r" not in out.getvalue()
