"""cache: an in-memory key-value server speaking one command per line. Standard library only.

    python3 services/cache.py --port 6379

Commands (one per line; one reply line each):
    PING             PONG
    SET key value    OK
    GET key          the value, or (nil)
    DEL key          1 if it existed, else 0
    QUIT             closes the connection
"""

from __future__ import annotations

import argparse
import signal
import socketserver
import sys
import threading

store: dict[str, str] = {}
lock = threading.Lock()


def answer(line: str) -> str:
    command, _, rest = line.strip().partition(" ")
    command = command.upper()
    if command == "PING":
        return "PONG"
    if command == "SET":
        key, _, value = rest.partition(" ")
        with lock:
            store[key] = value
        return "OK"
    if command == "GET":
        with lock:
            return store.get(rest, "(nil)")
    if command == "DEL":
        with lock:
            return "1" if store.pop(rest, None) is not None else "0"
    return f"ERR unknown command {command!r}"


class Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        for raw in self.rfile:
            line = raw.decode(errors="replace").strip()
            if line.upper() == "QUIT":
                return
            if line:
                self.wfile.write((answer(line) + "\n").encode())


class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=6379)
    args = parser.parse_args()

    server = Server((args.host, args.port), Handler)
    # envbox stops a service with SIGTERM (forwarded by the sandbox's init), then SIGKILL.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"cache: ready to accept connections on port {args.port}")
    try:
        server.serve_forever()
    finally:
        print(f"cache: shutting down with {len(store)} keys")


if __name__ == "__main__":
    main()
