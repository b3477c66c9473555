"""The error tree of pytest-envbox.

Every error a user can meet derives from :class:`EnvboxError`, so ``except EnvboxError`` catches
them all. Each message is written to be read in a test report without the traceback: it names the
service, what went wrong, and what to do about it.
"""

from __future__ import annotations

__all__ = ["ConfigError", "EnvboxError", "HostUnsupported", "ImageError", "NotReady", "ServiceFailed",
           "hide_frames"]


def hide_frames(excinfo: object) -> bool:
    """The ``__tracebackhide__`` of the modules that check declarations: pytest shows none of their
    frames for an :class:`EnvboxError`, whose message says what to fix (a ``Service(...)`` in a
    marker fails at import, where the plugin's report hooks do not reach; see plugin/failures.py).
    Other exceptions, bugs of pytest-envbox, keep their frames; ``--full-trace`` shows all."""
    return isinstance(getattr(excinfo, "value", None), EnvboxError)


class EnvboxError(Exception):
    """Base class of every error raised by pytest-envbox."""


class ConfigError(EnvboxError):
    """A declaration is invalid: raised before anything is started.

    ``service`` and ``key`` name what is wrong (either may be None when the error is not about one
    service or key); the message always says what is accepted instead.
    """

    def __init__(self, message: str, *, service: str | None = None, key: str | None = None) -> None:
        parts = []
        if service is not None:
            parts.append(f"service {service!r}")
        if key is not None:
            parts.append(f"key {key!r}")
        prefix = ", ".join(parts)
        super().__init__(f"{prefix}: {message}" if prefix else message)
        self.service = service
        self.key = key


def located(error: ConfigError, where: str) -> ConfigError:
    """The same error with the declaration's place appended, keeping ``service`` and ``key``."""
    out = ConfigError(f"{error} (in {where})")
    out.service, out.key = error.service, error.key
    return out


class ServiceFailed(EnvboxError):
    """A service exited before it was ready (or could not be started at all)."""

    def __init__(self, service: str, returncode: int | None, log_tail: str, reason: str = "") -> None:
        what = reason or f"exited with return code {returncode} before it was ready"
        msg = f"service {service!r} {what}"
        if log_tail:
            msg += f"\n--- last lines of its log ---\n{log_tail}"
        super().__init__(msg)
        self.service = service
        self.returncode = returncode
        self.log_tail = log_tail


class NotReady(EnvboxError):
    """A readiness probe (or ``wait_for_log``) timed out."""

    def __init__(self, service: str, probe: str, timeout: float, log_tail: str) -> None:
        msg = f"service {service!r} was not ready after {timeout:g}s: {probe}"
        if log_tail:
            msg += f"\n--- last lines of its log ---\n{log_tail}"
        else:
            msg += "\n(its log is empty)"
        super().__init__(msg)
        self.service = service
        self.probe = probe
        self.timeout = timeout
        self.log_tail = log_tail


class HostUnsupported(EnvboxError):
    """This host lacks a kernel feature pytest-envbox needs: says which, why, and how to enable it.

    ``refusal`` names the situation when the host refuses services altogether (``platform``,
    ``container-seccomp``, ``userns-capabilities``...: see docs/ci.md): then no test that needs a
    service can run here, and ``envbox_unavailable`` decides whether such tests skip or error.
    None for a missing feature that only some services need (netem, cgroups for limits).
    """

    def __init__(self, message: str, *, refusal: str | None = None) -> None:
        super().__init__(message)
        self.refusal = refusal


class ImageError(EnvboxError):
    """An image could not be had: unknown, refused, corrupt, or its registry did not answer.

    The message names the reference and quotes the registry's own answer (or the file's problem),
    so that a report says what to fix without a traceback. ``reference`` is the image as written.
    """

    def __init__(self, message: str, *, reference: str | None = None) -> None:
        super().__init__(f"image {reference!r}: {message}" if reference else message)
        self.reference = reference
