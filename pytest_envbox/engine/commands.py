"""``ServiceHandle.exec``'s call: a command run inside a service, as ``subprocess.run`` would.

Its input goes to the supervisor in parts of ``EXEC_CHUNK`` bytes after the request, its output
comes back in parts before the reply (see :mod:`pytest_envbox.supervisor.protocol`): a 12 MB
dump to stdout is a normal exec. Each stream is capped at ``EXEC_STREAM_CAP`` bytes, the input
too: past that, the error says how to move the data through a mount instead.
"""

from __future__ import annotations

import shlex
import subprocess
from collections.abc import Iterator

from pytest_envbox.engine.client import SupervisorClient, SupervisorError
from pytest_envbox.errors import EnvboxError
from pytest_envbox.sandbox.plan import SandboxPlan
from pytest_envbox.supervisor.protocol import EXEC_CHUNK, EXEC_STREAM_CAP, ExecInput, ExecRequest

__all__ = ["EXEC_GRACE", "run_command"]

#: Seconds past an exec's ``timeout`` that the test process waits for the supervisor's answer
#: (the supervisor kills the command at the timeout and answers at once): past it, the call
#: fails whatever the supervisor does.
EXEC_GRACE = 5.0

_CAP_MIB = EXEC_STREAM_CAP >> 20


def run_command(sup: SupervisorClient, service: str, slot: str, plan: SandboxPlan, args: list[str],
                *, timeout: float | None, input: str | None) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """Run ``args`` in the service's running sandbox ``slot``, as ``plan`` says."""
    data = b"" if input is None else input.encode()
    if len(data) > EXEC_STREAM_CAP:
        raise EnvboxError(
            f"service {service!r}: exec {_shown(args)}: input= has {len(data)} bytes, more than "
            f"exec() sends ({_CAP_MIB} MiB); put it in a file the service can read (a mount: "
            f'mounts = [{{ source = "./in", target = "/in" }}]) and read it there '
            f"(sh -c '... < /in/data')"
        )
    request = ExecRequest(slot, plan, args, data[:EXEC_CHUNK], len(data) > EXEC_CHUNK, timeout)
    try:
        r = sup.call(request, timeout=None if timeout is None else timeout + EXEC_GRACE,
                     parts=_input_parts(data))  # fmt: skip
    except SupervisorError as e:
        raise EnvboxError(f"service {service!r}: cannot exec {args[0]!r}: {e}") from None
    if r.overflow is not None:
        raise EnvboxError(
            f"service {service!r}: exec {_shown(args)} wrote more than {_CAP_MIB} MiB to "
            f"{r.overflow}, the most exec() collects, and was killed. Write that output to a file in "
            f'a writable mount instead (mounts = [{{ source = "./out", target = "/out", readonly = '
            f"false }}], then sh -c '... > /out/{r.overflow}') and read the file on the host"
        )
    stdout, stderr = r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")
    if r.exec_error:
        stderr += f"envbox: {r.exec_error}\n"
    if r.timed_out:
        raise subprocess.TimeoutExpired(args, timeout or 0.0, stdout, stderr)
    return subprocess.CompletedProcess(args, r.returncode, stdout, stderr)


def _input_parts(data: bytes) -> Iterator[ExecInput]:
    """The input after the request's first part, made as it is sent (not all copied at once)."""
    for at in range(EXEC_CHUNK, len(data), EXEC_CHUNK):
        yield ExecInput(data[at : at + EXEC_CHUNK], at + EXEC_CHUNK >= len(data))


def _shown(args: list[str]) -> str:
    """The command as a shell line, cut short: an error names it, not the whole script."""
    line = shlex.join(args)
    return repr(line if len(line) <= 120 else line[:117] + "...")
