"""Real-world Kubernetes manifests (tests/data/kubernetes, unchanged: see its README for where each
comes from and its licence) run by envbox: redis images pointed at a locally built one, the
teams' own services replaced by host programs through overrides, the manifests' Services as
kube-proxy makes them (one address, port to targetPort, several replicas behind it)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pytest_envbox import Environment
from pytest_envbox.config import load_project_config
from pytest_envbox.wait import Deadline, wait_until
from tests.imagekit.build import redis_layout

DATA = Path(__file__).resolve().parents[1] / "data" / "kubernetes"
PY = sys.executable

# RESP over a socket, for the stand-ins (the host's Python has no redis client to rely on).
RESP = """
import os, socket
def redis(addr, *args):
    host, port = addr.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        command = "*%d\\r\\n" % len(args) + "".join("$%d\\r\\n%s\\r\\n" % (len(a), a) for a in args)
        s.sendall(command.encode())
        f = s.makefile("rb")
        head = f.readline()  # +OK, -ERR, :1, or $<length> and a bulk string ($-1: none)
        if head.startswith(b"$") and int(head[1:]) >= 0:
            head += f.read(int(head[1:]) + 2)
    return head.decode()
"""

# The guestbook's PHP frontend, as a stand-in: writes go to the redis-master Service, reads to the
# redis-replica Service (two replicas behind one address), as the PHP code does (GET_HOSTS_FROM=dns).
GUESTBOOK = RESP + """
import http.server, urllib.parse
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        url = urllib.parse.urlparse(self.path); q = dict(urllib.parse.parse_qsl(url.query))
        if url.path == "/set":
            out = redis("redis-master:6379", "SET", q["key"], q["value"])
        elif url.path == "/get":
            out = redis("redis-replica:6379", "GET", q["key"])
        else:  # which replica answered: its run_id
            info = redis("redis-replica:6379", "INFO", "server").split()
            out = [line for line in info if line.startswith("run_id:")][0]
        self.send_response(200); self.end_headers(); self.wfile.write(out.encode())
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("0.0.0.0", 80), H).serve_forever()
"""


def toml_str(code: str) -> str:
    return json.dumps(textwrap.dedent(code))


def doctor(root: Path) -> str:
    r = subprocess.run([PY, "-m", "pytest_envbox.cli", "doctor", "--config", "--rootdir", str(root)],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.needs_cgroups  # the manifests' resources are limits
def test_guestbook_writes_to_the_master_and_reads_from_replicas_behind_one_service(tmp_path: Path) -> None:
    shutil.copytree(DATA / "guestbook", tmp_path / "deploy")
    redis = f"oci:{redis_layout()}:latest"
    (tmp_path / "pyproject.toml").write_text(textwrap.dedent(f"""
        [tool.envbox]
        kubernetes = ["deploy/*.yaml"]

        [tool.envbox.services.redis-master]
        image = "{redis}"

        [tool.envbox.services.redis-replica]          # both replicas
        image = "{redis}"
        args = ["redis-server", "--protected-mode", "no", "--replicaof", "redis-master", "6379"]
        ready = {{ tcp = 6379 }}

        [tool.envbox.services.frontend]               # its three replicas, from the "checkout"
        image = false
        command = ["{PY}", "-c", {toml_str(GUESTBOOK)}]
        ready = {{ http = 80 }}
        user = "0"
    """))
    catalog = load_project_config(tmp_path)
    with Environment(topology="kubernetes", catalog=catalog, rootdir=tmp_path) as env:
        assert sorted(env) == ["frontend-0", "frontend-1", "frontend-2", "redis-master",
                               "redis-replica-0", "redis-replica-1"]
        assert env["frontend-0"].http.get("/set?key=greeting&value=hello", timeout=10).text == "+OK\r\n"

        def replicated() -> bool | None:  # through the replicas' Service, from another frontend
            got = env["frontend-2"].http.get("/get?key=greeting", timeout=10).text
            return True if "hello" in got else None

        assert wait_until(replicated, Deadline(30)), env["redis-replica-0"].logs()
        # Both replicas answer behind the one address: each connection goes to one at random.
        seen = {env["frontend-1"].http.get("/who", timeout=10).text for _ in range(40)}
        assert len(seen) == 2, seen
        # The name is the Service's: one address that is no pod's, in every pod's /etc/hosts.
        hosts = env["frontend-0"].exec(["cat", "/etc/hosts"]).stdout
        line = next(h for h in hosts.splitlines() if h.split()[1:2] == ["redis-replica"])
        assert line.split()[0] not in {env[n].ip for n in env}
        assert "redis-replica.default.svc.cluster.local" in line
    assert "ignored: nothing" in doctor(tmp_path)


CART = RESP + """
import socketserver
class H(socketserver.BaseRequestHandler):
    def handle(self):
        self.request.sendall(("cart:" + redis(os.environ["REDIS_ADDR"], "PING").strip()).encode())
socketserver.ThreadingTCPServer(("0.0.0.0", 7070), H).serve_forever()
"""
EMAIL = """
import socketserver
class H(socketserver.BaseRequestHandler):
    def handle(self):
        self.request.sendall(b"email:ok")
socketserver.ThreadingTCPServer(("0.0.0.0", 8080), H).serve_forever()
"""
FRONTEND = """
import http.server, os, socket
def ask(addr):
    host, port = addr.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        return s.recv(100).decode()
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = "ok" if self.path == "/_healthz" else " ".join(
            ask(os.environ[k]) for k in ("CART_SERVICE_ADDR", "EMAIL_SERVICE_ADDR"))
        self.send_response(200); self.end_headers(); self.wfile.write(body.encode())
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("0.0.0.0", int(os.environ["PORT"])), H).serve_forever()
"""


@pytest.mark.needs_cgroups
def test_online_boutique_frontend_reaches_cart_and_email_through_their_services(tmp_path: Path) -> None:
    shutil.copytree(DATA / "microservices-demo", tmp_path / "deploy")
    (tmp_path / "pyproject.toml").write_text(textwrap.dedent(f"""
        [tool.envbox]
        kubernetes = ["deploy/kubernetes-manifests.yaml"]

        [tool.envbox.services.redis-cart]
        image = "oci:{redis_layout()}:latest"
        # Docker Hub's redis works in /data (its WorkingDir), where the manifest mounts an
        # emptyDir; Debian's redis-server in /var/lib/redis, which user 1000 may not read.
        args = ["redis-server", "--protected-mode", "no", "--dir", "/data"]

        [tool.envbox.services.cartservice]
        image = false
        command = ["{PY}", "-c", {toml_str(CART)}]

        [tool.envbox.services.emailservice]
        image = false
        command = ["{PY}", "-c", {toml_str(EMAIL)}]

        [tool.envbox.services.frontend]
        image = false
        command = ["{PY}", "-c", {toml_str(FRONTEND)}]
        env = {{ EMAIL_SERVICE_ADDR = "emailservice:5000" }}   # added to the manifest's env
    """))
    catalog = load_project_config(tmp_path)
    # The manifests' own readiness probes, user and limits apply: frontend's httpGet /_healthz,
    # the others' gRPC probes as TCP connects; redis-cart runs as 1000:1000 with its emptyDir.
    with Environment(["frontend", "cartservice", "redis-cart", "emailservice"], catalog=catalog,
                     rootdir=tmp_path) as env:  # fmt: skip
        # emailservice's Service maps port 5000 to the pod's 8080; cartservice's 7070 to 7070.
        assert env["frontend"].http.get("/", timeout=10).text == "cart:+PONG email:ok"
        assert env["redis-cart"].exec(["id", "-u"]).stdout.strip() == "1000"
        assert env["redis-cart"].exec(["sh", "-c", "touch /data/x && echo ok"]).stdout == "ok\n"
    report = doctor(tmp_path)
    assert "ServiceAccount/cartservice (the whole document)" in report
    assert "readinessProbe.grpc (checked as tcpSocket on port 7070" in report
    assert "Deployment/frontend spec.template.spec.containers[0].livenessProbe" in report
