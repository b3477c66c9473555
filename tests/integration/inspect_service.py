"""Run as a sandboxed service: report, as one JSON line, what the service sees; then wait.

argv: [host file that must stay invisible] [host loopback port that must be unreachable]
"""

import errno
import json
import os
import signal
import socket
import sys
from pathlib import Path

# First thing: the fds this process was exec'd with (the listdir fd itself is closed again
# before readlink, so it drops out).
fds = {}
for fd in os.listdir("/proc/self/fd"):
    try:
        fds[int(fd)] = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        pass


def writable(path: str) -> str:
    target = os.path.join(path, f".envbox-probe-{os.getpid()}")
    try:
        with open(target, "w") as f:
            f.write("x")
        os.unlink(target)
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno or 0, str(e.errno))


def connect(port: int) -> str:
    s = socket.socket()
    s.settimeout(2)
    try:
        s.connect(("127.0.0.1", port))
        return "connected"
    except OSError as e:
        return errno.errorcode.get(e.errno or 0, str(e))
    finally:
        s.close()


status = {}
with open("/proc/self/status") as f:
    for line in f:
        key, _, value = line.partition(":")
        if key in ("NoNewPrivs", "CapBnd", "CapEff", "CapInh", "CapAmb", "CapPrm", "Seccomp"):
            status[key] = value.strip()
with open("/proc/net/route") as f:
    routes = f.read().splitlines()[1:]
with open("/proc/net/ipv6_route") as f:
    routes6 = [r for r in f.read().splitlines() if r.split()[-1] != "lo"]

report = {
    "fds": fds,
    "pid": os.getpid(),
    "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
    "hostname": socket.gethostname(),
    "etc_hostname": Path("/etc/hostname").read_text().strip(),
    "etc_hosts": Path("/etc/hosts").read_text(),
    "writable": {p: writable(p) for p in ("/", "/usr", "/etc", "/tmp", os.environ.get("HOME", "/"),
                                           os.getcwd(), "/dev/shm", "/run")},
    "host_file_visible": os.path.exists(sys.argv[1]),
    "env": dict(os.environ),
    "status": status,
    "routes": routes,
    "routes6": routes6,
    "host_loopback": connect(int(sys.argv[2])),
    "uid": os.getuid(),
    "gid": os.getgid(),
    "groups": sorted(os.getgroups()),
    "dev": sorted(os.listdir("/dev")),
    "session_leader": os.getsid(0) == os.getpid(),
    "cwd": os.getcwd(),
}
print("REPORT " + json.dumps(report), flush=True)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
while True:
    signal.pause()
