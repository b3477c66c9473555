"""The words a sandbox says to the supervisor, read back as the supervisor reads them."""

from __future__ import annotations

from pytest_envbox.sandbox import status


def test_an_error_and_an_unsupported_host_are_told_apart() -> None:
    assert status.why(status.error("mount /x: EPERM")) == status.Why("mount /x: EPERM")
    assert status.why(status.unsupported("use Linux 5.12")) == status.Why("use Linux 5.12", unsupported=True)


def test_ready_and_exec_are_no_reasons() -> None:
    assert status.why(status.READY) is None
    assert status.why(status.EXEC) is None
    assert status.why(b"") is None


def test_a_long_reason_fits_one_datagram_the_supervisor_reads_whole() -> None:
    msg = status.error("x" * 10_000)
    assert len(msg) <= 4096
    why = status.why(msg)
    assert why is not None and why.text == "x" * (len(msg) - len(b"error:"))
