"""gateway: a small HTTP reverse proxy in front of the api. Standard library only.

    python3 -u services/gateway.py --port 8080 --upstream api:8000

Every request but /health is forwarded to the upstream, which it reaches by its service name
(resolved on each request, from the sandbox's /etc/hosts); answers carry "Via: 1.1 gateway".
GET /health -> 200 {"status": "ok", "upstream": ...} when the upstream's /health answers 200, else 502.
"""

from __future__ import annotations

import argparse
import http.client
import json
import signal
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
              "upgrade", "host", "content-length"}  # fmt: skip


class Proxy(BaseHTTPRequestHandler):
    upstream = "api:8000"
    timeout_s = 15.0

    def do_GET(self) -> None:
        if self.path == "/health":
            return self.health()
        self.forward()

    def do_POST(self) -> None:
        self.forward()

    def forward(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        headers["X-Forwarded-For"] = self.client_address[0]
        conn = http.client.HTTPConnection(self.upstream, timeout=self.timeout_s)
        try:
            conn.request(self.command, self.path, body=body, headers=headers)
            upstream = conn.getresponse()
            data = upstream.read()
        except OSError as e:
            return self.reply(502, {"error": f"upstream {self.upstream} unreachable: {e}"})
        finally:
            conn.close()
        self.send_response(upstream.status)
        for k, v in upstream.getheaders():
            if k.lower() not in HOP_BY_HOP | {"server", "date"}:
                self.send_header(k, v)
        self.send_header("Via", "1.1 gateway")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def health(self) -> None:
        conn = http.client.HTTPConnection(self.upstream, timeout=2)
        try:
            conn.request("GET", "/health")
            status = conn.getresponse().status
        except OSError as e:
            return self.reply(502, {"status": "degraded", "upstream": self.upstream, "error": str(e)})
        finally:
            conn.close()
        if status != 200:
            return self.reply(502, {"status": "degraded", "upstream": self.upstream,
                                    "error": f"upstream /health answered {status}"})  # fmt: skip
        self.reply(200, {"status": "ok", "upstream": self.upstream})

    def reply(self, status: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Via", "1.1 gateway")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        if self.path != "/health":
            super().log_message(format, *args)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--upstream", default="api:8000", help="host:port of the api")
    args = parser.parse_args()

    Proxy.upstream = args.upstream
    server = ThreadingHTTPServer((args.host, args.port), Proxy)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"gateway: listening on {args.host}:{args.port}, forwarding to {args.upstream}")
    try:
        server.serve_forever()
    finally:
        print("gateway: shutting down")


if __name__ == "__main__":
    main()
