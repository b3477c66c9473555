"""kv: send commands to a cache server and print the replies. Standard library only.

    python3 services/kv.py PING
    python3 services/kv.py --port 7000 "SET colour blue" "GET colour"

Exits 1 when the server cannot be reached, which makes it a readiness check:
``ready = { exec = ["python3", "services/kv.py", "PING"] }``.
"""

from __future__ import annotations

import argparse
import socket
import sys


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=6379)
    parser.add_argument("commands", nargs="+")
    args = parser.parse_args()
    try:
        with socket.create_connection((args.host, args.port), timeout=2) as conn:
            replies = conn.makefile("r")
            for command in args.commands:
                conn.sendall(command.encode() + b"\n")
                print(replies.readline().rstrip("\n"))
    except OSError as e:
        print(f"kv: {args.host}:{args.port}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
