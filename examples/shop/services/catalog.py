"""catalog: a small HTTP API over the products in a data directory. Standard library only.

    python3 services/catalog.py --port 8000 --data /data

GET /health          {"status": "ok"}
GET /products        every product of <data>/products.json
GET /products/<sku>  one product, or 404
GET /whoami          what the process sees of its machine: hostname, pid, uid
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def load_products(data: Path) -> dict[str, dict[str, object]]:
    products = json.loads((data / "products.json").read_text())
    return {p["sku"]: p for p in products}


class Handler(BaseHTTPRequestHandler):
    products: dict[str, dict[str, object]] = {}

    def do_GET(self) -> None:
        if self.path == "/health":
            self.reply(200, {"status": "ok"})
        elif self.path == "/products":
            self.reply(200, list(self.products.values()))
        elif self.path.startswith("/products/"):
            product = self.products.get(self.path.removeprefix("/products/"))
            if product is None:
                self.reply(404, {"error": "no such product"})
            else:
                self.reply(200, product)
        elif self.path == "/whoami":
            self.reply(200, {"hostname": socket.gethostname(), "pid": os.getpid(), "uid": os.getuid(),
                             "name": os.environ.get("CATALOG_NAME", "")})  # fmt: skip
        else:
            self.reply(404, {"error": "not found"})

    def reply(self, status: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")  # loopback is enough: envbox publishes it
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--data", type=Path, default=Path("/data"))
    args = parser.parse_args()

    Handler.products = load_products(args.data)
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    # SIGTERM (sent by envbox on stop) ends serve_forever() cleanly.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"catalog: serving {len(Handler.products)} products on {args.host}:{args.port}")
    try:
        server.serve_forever()
    finally:
        print("catalog: shutting down")


if __name__ == "__main__":
    main()
