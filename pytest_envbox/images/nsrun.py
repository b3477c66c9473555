"""Running one function as root of the rootless user namespace, in a fresh Python process.

Rootless, an image's files must belong to the ids the services' user namespace sees (redis's
files to redis's uid there), and only root of a namespace with the same id map can make (and
later remove) them: ids 1... map to the user's subordinate range, which the user itself cannot
chown to. The supervisor's namespace is made by
:func:`pytest_envbox.supervisor.userns.enter_user_namespace`, which must run in a process with a
single thread: the test process has several (pytest, xdist, the engine's), so a fresh
Python process enters it and runs the function.

The request (a ``module:function`` name and JSON arguments) goes to the child's stdin; the child
writes JSON lines on a private pipe: ``{"progress": ...}`` as the function reports, then
``{"result": ...}`` or ``{"error": "..."}``. Errors come back as ``ImageError`` with the child's
message. Cost: one Python start and two ``newuidmap`` runs, about 40 ms here (measured in
tests/integration/test_store.py), paid once per batch of layers, not per file.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pytest_envbox.errors import ImageError

__all__ = ["call", "main"]


def call(target: str, args: dict[str, Any], progress: Callable[[Any], None] | None = None) -> Any:
    """``target(**args, progress=...)`` in a new process, as root of the rootless user namespace.

    ``target`` is ``"package.module:function"``; arguments and result must be JSON. The function
    gets a ``progress`` callable whose values reach ``progress`` here.
    """
    r, w = os.pipe2(os.O_CLOEXEC)
    # As the supervisor's start does (engine/client.py): the package's __init__ (the whole
    # engine) not run, only the modules needed; site-packages kept (``zstandard``, if there).
    code = (
        "import sys, types; p = types.ModuleType('pytest_envbox'); "
        f"p.__path__ = [{str(Path(__file__).resolve().parent.parent)!r}]; "
        "sys.modules['pytest_envbox'] = p; "
        "from pytest_envbox.images.nsrun import main; sys.exit(main())"
    )
    try:
        proc = subprocess.Popen(
            [sys.executable, "-P", "-c", code, str(w)],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, pass_fds=(w,),
        )  # fmt: skip
    finally:
        os.close(w)
    assert proc.stdin is not None and proc.stderr is not None
    result: Any = None
    error: str | None = None
    done = False
    try:
        proc.stdin.write(json.dumps({"target": target, "args": args}).encode())
        proc.stdin.close()
        with os.fdopen(r, "rb") as lines:
            r = -1
            for line in lines:
                msg = json.loads(line)
                if "progress" in msg:
                    if progress is not None:
                        progress(msg["progress"])
                elif "result" in msg:
                    result, done = msg["result"], True
                else:
                    error, done = str(msg.get("error")), True
        stderr = proc.stderr.read().decode(errors="replace").strip()
    finally:
        if r >= 0:
            os.close(r)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stderr.close()
    if error is not None:
        raise ImageError(error)
    if not done:
        raise ImageError(f"the helper in the user namespace died (exit {proc.returncode}): "
                         f"{stderr[-2000:] or 'no message'}")  # fmt: skip
    return result


def main() -> int:
    """The child: enter the user namespace, run the function, report (see :func:`call`)."""
    out = os.fdopen(int(sys.argv[1]), "w", buffering=1)

    def send(msg: dict[str, Any]) -> None:
        out.write(json.dumps(msg) + "\n")

    try:
        from pytest_envbox.kernel import linux as L

        L.set_pdeathsig(9)  # the caller's death ends the work: its locks are gone with it
        request = json.loads(sys.stdin.read())
        # Also as root in rootless mode (ENVBOX_ROOTLESS=yes): the supervisor's map is then 0 to 0.
        from pytest_envbox.supervisor.userns import enter_user_namespace, no_user_namespace

        try:
            enter_user_namespace()
        except OSError as e:
            send({"error": no_user_namespace(e)})
            return 1
        module, _, name = request["target"].partition(":")
        func = getattr(importlib.import_module(module), name)
        result = func(**request["args"], progress=lambda value: send({"progress": value}))
        send({"result": result})
        return 0
    except Exception as e:  # every failure goes back as a message, the caller raises it
        send({"error": str(e) or type(e).__name__})
        return 1

