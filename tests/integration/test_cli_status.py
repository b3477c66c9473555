"""``envbox up`` says what a slow start waits for, as the pytest plugin does."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from tests.integration.test_cli import read_until

REPO = Path(__file__).parents[2]


# Python itself as the program (not `sh -c`): its prefix stays visible in the sandbox even when it
# lives under /tmp (a checkout's tox venv), which the sandbox's private /tmp hides otherwise.
SLOW = "import http.server, time; time.sleep(2.5); http.server.test(port=8000, bind='127.0.0.1')"


def test_envbox_up_says_what_a_slow_start_waits_for(tmp_path: Path) -> None:
    (tmp_path / "envbox.toml").write_text(f"""
[services.slow]
command = ["{sys.executable}", "-c", "{SLOW}"]
ports = [8000]
ready = {{ tcp = 8000 }}
""")
    # --logs: the logs a Ctrl-C keeps go to tmp_path, not to a new /tmp/envbox-up-* left behind
    proc = subprocess.Popen([sys.executable, "-m", "pytest_envbox.cli", "up", "--logs",
                             str(tmp_path / "logs")], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    try:
        out = read_until(proc, "services are up")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = out.splitlines()
    # not a terminal: whole lines, before the services are listed
    waited = [i for i, ln in enumerate(lines)
              if re.fullmatch(r"envbox: waiting for slow: tcp port 8000 accepts connections "
                              r"\(\d+\.\ds of 30s\)", ln)]  # fmt: skip
    ready = [i for i, ln in enumerate(lines) if re.fullmatch(r"envbox: slow ready after \d+\.\ds", ln)]
    listed = [i for i, ln in enumerate(lines) if ln.startswith("slow: ")]
    assert waited and ready and listed, out
    assert waited[-1] < ready[0] < listed[0], out
