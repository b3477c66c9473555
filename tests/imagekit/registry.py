"""Real registries for tests: Debian's ``docker-registry`` (distribution 2.8) on a free loopback port.

Three setups, as session fixtures: ``open_registry`` (anonymous pull and push), ``basic_registry``
(htpasswd, bcrypt, as ``htpasswd -Bbn`` writes it) and ``token_registry`` (the registry's
``auth: token``: it trusts a test-made RSA key, and :class:`TokenServer`, an HTTP server on
127.0.0.1 in a thread, checks basic credentials and issues JWTs signed with that key, as Docker
Hub's auth service does). The key and its certificate are made with the ``openssl`` CLI, which is
on every host that has ``docker-registry``; tokens are signed with ``openssl dgst`` too (the
``cryptography`` package is not a test dependency: one path, the same everywhere).

Each registry runs in its own temp dir, dies with the test process (PDEATHSIG) and is removed at
teardown. :func:`push_layout` puts an OCI layout into one with ``skopeo copy``; :func:`make_layout`
builds a tiny layout with ``umoci``. :class:`Proxy` stands in front of one and misbehaves (cuts,
stalls, redirects, fails, tampers) for the failure cases. Traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from pytest_envbox.kernel.linux import set_pdeathsig
from pytest_envbox.wait import Deadline, wait_until

__all__ = [
    "PASSWORD",
    "REFRESH_TOKEN",
    "SERVICE",
    "USER",
    "Proxy",
    "RegistryServer",
    "TokenServer",
    "basic_registry",
    "make_layout",
    "need_registry_tools",
    "open_registry",
    "push_layout",
    "token_registry",
]

USER, PASSWORD = "alice", "wonder-land"
REFRESH_TOKEN = "refresh-for-alice"  # an identity token, as `docker login` stores for OAuth2 logins
SERVICE, ISSUER = "envbox-test-registry", "envbox-test-issuer"
TOOLS = ("docker-registry", "skopeo", "umoci", "htpasswd", "openssl")


def need_registry_tools() -> None:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (apt: docker-registry skopeo umoci apache2-utils openssl)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _child_setup() -> None:
    set_pdeathsig(signal.SIGKILL)  # a pytest killed with -9 takes its registries along


@dataclass
class RegistryServer:
    """A running ``docker-registry serve``; ``host`` is ``127.0.0.1:PORT`` (plain HTTP)."""

    root: Path
    auth: str  # "open", "basic", "token"
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    token: TokenServer | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def creds(self) -> str | None:
        return None if self.auth == "open" else f"{USER}:{PASSWORD}"

    def start(self) -> None:
        auth = ""
        if self.auth == "basic":
            line = subprocess.run(["htpasswd", "-Bbn", USER, PASSWORD], check=True, capture_output=True,
                                  text=True).stdout.strip()
            (self.root / "htpasswd").write_text(line + "\n")
            auth = f"auth:\n  htpasswd:\n    realm: envbox-test\n    path: {self.root / 'htpasswd'}\n"
        elif self.auth == "token":
            assert self.token is not None
            auth = (f"auth:\n  token:\n    realm: {self.token.url}/token\n    service: {SERVICE}\n"
                    f"    issuer: {ISSUER}\n    rootcertbundle: {self.token.cert}\n")
        log = self.root / "registry.log"
        for _ in range(3):  # a port taken between free_port() and the registry's bind: try another
            self.port = free_port()
            (self.root / "config.yml").write_text(
                "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: true\n"
                f"storage:\n  filesystem:\n    rootdirectory: {self.root / 'data'}\n"
                "  delete:\n    enabled: true\n"
                f"http:\n  addr: {self.host}\n  secret: envbox-test-secret\n" + auth
            )
            with open(log, "wb") as out:
                self.proc = subprocess.Popen(["docker-registry", "serve", str(self.root / "config.yml")],
                                             stdout=out, stderr=subprocess.STDOUT, cwd=self.root,
                                             preexec_fn=_child_setup)
            if wait_until(self._answers, Deadline(30)):
                return
            self.stop()
            if b"address already in use" not in log.read_bytes():
                break
        raise RuntimeError(f"docker-registry did not start:\n{log.read_text()[-2000:]}")

    def _answers(self) -> bool | None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            return False
        try:
            return requests.get(f"{self.url}/v2/", timeout=1).status_code in (200, 401) or None
        except requests.RequestException:
            return None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class TokenServer:
    """A token endpoint (``GET /token?service=&scope=``) as distribution's ``auth: token`` expects.

    Authenticated users get what they ask for; anonymous users get ``pull`` on ``public/*`` only
    (Docker Hub's behaviour for public repositories). ``asked`` records (user, service, scope)
    for each GET; ``refused`` counts wrong credentials. ``POST /token`` is the OAuth2 form Docker
    uses with an identity token (``grant_type=refresh_token``), recorded in ``posted``.
    """

    root: Path
    asked: list[tuple[str, str, str]] = field(default_factory=list)
    posted: list[tuple[str, str, str]] = field(default_factory=list)
    refused: int = 0
    httpd: http.server.ThreadingHTTPServer | None = None

    @property
    def key(self) -> Path:
        return self.root / "token.key"

    @property
    def cert(self) -> Path:
        return self.root / "token.crt"

    @property
    def url(self) -> str:
        assert self.httpd is not None
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def start(self) -> None:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                        "-subj", "/CN=envbox-test-token", "-keyout", str(self.key), "-out", str(self.cert)],
                       check=True, capture_output=True)
        der = subprocess.run(["openssl", "pkey", "-in", str(self.key), "-pubout", "-outform", "DER"],
                             check=True, capture_output=True).stdout
        # libtrust's key id, which distribution 2.8 looks the signing key up by (the JWT's "kid")
        b32 = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode()
        self.kid = ":".join(b32[i:i + 4] for i in range(0, len(b32), 4))
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.answer(self)

            def do_POST(self) -> None:
                server.refresh(self)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()

    def answer(self, req: http.server.BaseHTTPRequestHandler) -> None:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(req.path).query)
        service, scope = query.get("service", [""])[0], query.get("scope", [""])[0]
        user = ""
        given = req.headers.get("Authorization", "")
        if given.startswith("Basic "):
            user, _, password = base64.b64decode(given[6:]).decode().partition(":")
            if (user, password) != (USER, PASSWORD):
                self.refused += 1
                body = json.dumps({"errors": [{"code": "UNAUTHORIZED", "message": "wrong user or password"}]})
                return _reply(req, 401, body.encode())
        self.asked.append((user, service, scope))
        _reply(req, 200, json.dumps({"token": self.token(user, service, scope), "expires_in": 300}).encode())

    def token(self, user: str, service: str, scope: str) -> str:
        access = []
        if scope.count(":") == 2:
            kind, name, actions = scope.split(":")
            wanted = actions.split(",")
            granted = wanted if user else ["pull"] if name.startswith("public/") and "pull" in wanted else []
            access.append({"type": kind, "name": name, "actions": granted})
        now = int(time.time())
        claims = {"iss": ISSUER, "sub": user, "aud": service, "exp": now + 300, "nbf": now - 10, "iat": now,
                  "jti": os.urandom(8).hex(), "access": access}
        return self.sign(claims)

    def refresh(self, req: http.server.BaseHTTPRequestHandler) -> None:
        length = int(req.headers.get("Content-Length", "0"))
        form = urllib.parse.parse_qs(req.rfile.read(length).decode())
        if form.get("grant_type") != ["refresh_token"] or form.get("refresh_token") != [REFRESH_TOKEN]:
            body = json.dumps({"errors": [{"code": "UNAUTHORIZED", "message": "invalid refresh token"}]})
            return _reply(req, 401, body.encode())
        service, scope = form.get("service", [""])[0], form.get("scope", [""])[0]
        self.posted.append((USER, service, scope))
        _reply(req, 200, json.dumps({"access_token": self.token(USER, service, scope)}).encode())

    def sign(self, claims: dict[str, object]) -> str:
        header = {"typ": "JWT", "alg": "RS256", "kid": self.kid}
        payload = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        sig = subprocess.run(["openssl", "dgst", "-sha256", "-sign", str(self.key)], input=payload.encode(),
                             check=True, capture_output=True).stdout
        return f"{payload}.{_b64url(sig)}"


def _reply(req: http.server.BaseHTTPRequestHandler, status: int, body: bytes) -> None:
    req.send_response(status)
    req.send_header("Content-Type", "application/json")
    req.send_header("Content-Length", str(len(body)))
    req.end_headers()
    req.wfile.write(body)


def make_layout(dest: Path, tag: str, files: dict[str, bytes], arch: str | None = None) -> Path:
    """An OCI layout at ``dest`` holding ``tag``: an empty image plus one layer with ``files``."""
    rootless = ["--rootless"] if os.geteuid() != 0 else []
    if not (dest / "index.json").exists():
        subprocess.run(["umoci", "init", "--layout", str(dest)], check=True, capture_output=True)
    subprocess.run(["umoci", "new", "--image", f"{dest}:{tag}"], check=True, capture_output=True)
    src = Path(tempfile.mkdtemp(prefix="layer-", dir=dest.parent))
    try:
        for name, data in files.items():
            (src / name).write_bytes(data)
        subprocess.run(["umoci", "insert", *rootless, "--image", f"{dest}:{tag}", str(src), "/data"],
                       check=True, capture_output=True)
    finally:
        shutil.rmtree(src)
    if arch is not None:
        subprocess.run(["umoci", "config", "--image", f"{dest}:{tag}", f"--architecture={arch}"],
                       check=True, capture_output=True)
    return dest


def push_layout(layout: Path, tag: str, registry: RegistryServer, target: str, fmt: str = "") -> None:
    """``skopeo copy oci:LAYOUT:TAG docker://REGISTRY/TARGET`` (with the test login when needed).

    ``fmt="v2s2"`` converts to a Docker schema 2 manifest on the way (``--format``).
    """
    creds = registry.creds()
    cmd = ["skopeo", "--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false",
           *(["--format", fmt] if fmt else []),
           *(["--dest-creds", creds] if creds else []), f"oci:{layout}:{tag}", f"docker://{registry.host}/{target}"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False,
                          # the test's own (absent) credentials file: not the user's, nor
                          # /run/containers/UID/auth.json, which root's podman may have made unreadable
                          env={**os.environ, "HOME": str(layout.parent),
                               "REGISTRY_AUTH_FILE": str(layout.parent / "auth.json")})  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr}")


def _serve(auth: str, factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    need_registry_tools()
    # under pytest's basetemp: removed here, and by pytest's rotation should this process be killed
    root = Path(tempfile.mkdtemp(prefix=f"registry-{auth}-", dir=factory.getbasetemp()))
    token = TokenServer(root) if auth == "token" else None
    server = RegistryServer(root, auth, token=token)
    try:
        if token is not None:
            token.start()
        server.start()
        yield server
    finally:
        server.stop()
        if token is not None:
            token.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def open_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    yield from _serve("open", tmp_path_factory)


@pytest.fixture(scope="session")
def basic_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    yield from _serve("basic", tmp_path_factory)


@pytest.fixture(scope="session")
def token_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    yield from _serve("token", tmp_path_factory)


class Proxy:
    """A loopback HTTP proxy in front of a real registry, misbehaving as ``mode`` says.

    ``flaky``: the first ``fail`` requests of each path answer 503; ``cut``: blob bodies end
    halfway; ``stall``: blob bodies stop halfway until the test ends; ``short``: blobs are
    complete answers one byte short; ``redirect``: blobs are redirected to ``storage``;
    ``tamper``: manifests gain a byte; ``schema1``: manifests are schema 1; ``slow``: each blob
    body takes ``pace`` seconds. ``seen`` records (path, headers) of every request.
    """

    def __init__(self, upstream: str, mode: str = "pass", fail: int = 0, auth: str | None = None,
                 pace: float = 2.0) -> None:  # fmt: skip
        self.upstream, self.mode, self.fail, self.auth = upstream, mode, fail, auth
        self.pace = pace  # ``slow``: seconds each blob takes
        self.seen: list[tuple[str, dict[str, str]]] = []
        self.counts: dict[str, int] = {}
        self.release = threading.Event()
        self.storage: Proxy | None = None
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                proxy.handle(self)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.host = f"127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def handle(self, req: http.server.BaseHTTPRequestHandler) -> None:
        self.seen.append((req.path, dict(req.headers)))
        count = self.counts[req.path] = self.counts.get(req.path, 0) + 1
        blob, manifest = "/blobs/" in req.path, "/manifests/" in req.path
        if self.mode == "flaky" and count <= self.fail:
            return self.send(req, 503, {"Content-Type": "application/json"},
                             b'{"errors":[{"code":"UNAVAILABLE","message":"try later"}]}')
        if self.mode == "redirect" and blob and self.storage is not None:
            return self.send(req, 307, {"Location": f"http://{self.storage.host}{req.path}"}, b"")
        headers = {k: v for k, v in req.headers.items() if k in ("Accept", "Authorization")}
        if self.auth:
            headers["Authorization"] = self.auth
        got = requests.get(self.upstream + req.path, headers=headers, timeout=10, allow_redirects=False)
        body = got.content
        out = {k: v for k, v in got.headers.items()
               if k.lower() in ("content-type", "docker-content-digest", "www-authenticate", "location")}
        if manifest and self.mode == "tamper":
            body += b" "
        if manifest and self.mode == "schema1":
            body = json.dumps({"schemaVersion": 1, "name": "x", "tag": "1", "fsLayers": []}).encode()
            out = {"Content-Type": "application/vnd.docker.distribution.manifest.v1+prettyjws"}
        if blob and got.status_code == 200 and self.mode == "slow":  # a far registry's pace
            req.send_response(200)
            req.send_header("Content-Length", str(len(body)))
            req.end_headers()
            step = max(1, len(body) // 20)
            for i in range(0, len(body), step):
                req.wfile.write(body[i:i + step])
                req.wfile.flush()
                self.release.wait(self.pace / 20)  # pacing the bytes, not waiting for anything
            return None
        if blob and got.status_code == 200 and self.mode == "short":
            return self.send(req, 200, out, body[:-1])  # a whole answer, one byte short of the blob
        if blob and got.status_code == 200 and self.mode in ("cut", "stall"):
            req.send_response(200)
            req.send_header("Content-Length", str(len(body)))
            req.end_headers()
            req.wfile.write(body[: len(body) // 2])
            req.wfile.flush()
            if self.mode == "stall":
                self.release.wait(60)
            req.close_connection = True
            return None
        return self.send(req, got.status_code, out, body)

    @staticmethod
    def send(req: http.server.BaseHTTPRequestHandler, status: int, headers: dict[str, str],
             body: bytes) -> None:
        req.send_response(status)
        for k, v in headers.items():
            req.send_header(k, v)
        req.send_header("Content-Length", str(len(body)))
        req.end_headers()
        req.wfile.write(body)
