"""What a request's handler raises when the host lacks what it needs (re-exported by
:mod:`.protocol`, whose error reply carries it). The standard library only: imported by the
supervisor's lean interpreter."""

from __future__ import annotations

__all__ = ["Unsupported"]


class Unsupported(Exception):
    """This host cannot do what was asked; the message says why and how to enable it.

    Raised in the supervisor; crosses the socket as ``protocol.ErrorReply(kind="unsupported")`` and is
    raised in the test process as :class:`~pytest_envbox.errors.HostUnsupported`.
    """
