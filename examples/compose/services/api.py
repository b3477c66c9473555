"""api: a small JSON API for notes, stored in PostgreSQL and cached in Redis.

    DATABASE_URL=postgresql://notes:notes-secret@db:5432/notes REDIS_URL=redis://cache:6379/0 \\
        python3 services/api.py --port 8000

GET    /health         {"status": "ok", "db": "15.20 (Debian ...)", "cache": "7.0.15"}, the
                       servers' own versions; 503 with the error while one is unreachable
GET    /notes          the newest notes, [{"id": 1, "title": "..."}] (?limit=, at most 500)
POST   /notes          {"title": "...", "body": "..."} -> 201 and the note
GET    /notes/<id>     the note, from Redis when cached (header X-Cache: hit), else from PostgreSQL

examples/images/services/api.py, but for the schema: the API does not create its table; the
``migrate`` service of compose.yaml does (migrations/001_notes.sql), and the API, as it starts,
checks that the schema is at the version it needs (the table ``schema_migrations``) and exits
with a message if it is not, rather than serve errors. A connection per request: a database that
restarts is simply reached again by the next request.

Needs: redis (redis-py) and psycopg (v3). Configuration comes from the environment.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import psycopg
import redis

CACHE_TTL = 300  # seconds a cached note may be served
MAX_BODY = 1 << 20
NOTE_PATH = re.compile(r"/notes/(\d{1,18})")
COLUMNS = "id, title, body, created_at"
SCHEMA_VERSION = 1  # the newest migration this code needs (migrations/001_notes.sql)


class BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def note_json(row: tuple[Any, ...]) -> str:
    id_, title, body, created = row
    return json.dumps({"id": id_, "title": title, "body": body, "created_at": created.isoformat()})


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # one request per connection: no idle client holds a thread
    timeout = 10
    database_url: str
    cache: redis.Redis

    @contextmanager
    def db(self) -> Iterator[psycopg.Connection[Any]]:
        # Short timeouts: a database that is restarting answers 503 at once, not after minutes.
        with psycopg.connect(self.database_url, autocommit=True, connect_timeout=2,
                             application_name="notes-api") as conn:  # fmt: skip
            yield conn

    def reply(self, status: int, body: object = None, *, raw: str | None = None,
              headers: dict[str, str] | None = None) -> None:  # fmt: skip
        data = (raw if raw is not None else json.dumps(body)).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def read_note(self) -> tuple[str, str]:
        size = int(self.headers.get("Content-Length") or 0)
        if not 0 < size <= MAX_BODY:
            raise BadRequest(400 if size <= 0 else 413, "a JSON body of at most 1 MiB is required")
        try:
            note = json.loads(self.rfile.read(size))
        except ValueError as e:
            raise BadRequest(400, f"invalid JSON: {e}") from None
        title, body = (note.get("title"), note.get("body", "")) if isinstance(note, dict) else (None, None)
        if not isinstance(title, str) or not 0 < len(title) <= 200 or not isinstance(body, str):
            raise BadRequest(400, "expected {\"title\": 1 to 200 characters, \"body\": a string}")
        return title, body

    def dispatch(self, method: str) -> None:
        try:
            getattr(self, method)(urlsplit(self.path))
        except BadRequest as e:
            self.reply(e.status, {"error": str(e)})
        except psycopg.OperationalError as e:
            self.reply(503, {"error": "database unavailable", "detail": " ".join(str(e).split())})
        except redis.RedisError as e:
            self.reply(503, {"error": "cache unavailable", "detail": str(e)})

    def do_GET(self) -> None:
        self.dispatch("get")

    def do_POST(self) -> None:
        self.dispatch("post")

    def get(self, url: Any) -> None:
        if url.path == "/health":
            with self.db() as conn:
                row = conn.execute("SHOW server_version").fetchone()
            info: dict[str, Any] = self.cache.info("server")
            self.reply(200, {"status": "ok", "db": row and row[0], "cache": info["redis_version"]})
        elif url.path == "/notes":
            try:
                limit = min(int(parse_qs(url.query).get("limit", ["50"])[0]), 500)
            except ValueError:
                raise BadRequest(400, "limit: an integer is expected") from None
            with self.db() as conn:
                rows = conn.execute("SELECT id, title FROM notes ORDER BY id DESC LIMIT %s",
                                    (limit,)).fetchall()  # fmt: skip
            self.reply(200, [{"id": id_, "title": title} for id_, title in rows])
        elif match := NOTE_PATH.fullmatch(url.path):
            key = f"note:{match[1]}"
            cached = self.cache.get(key)  # cache-aside: the cache first...
            if cached is not None:
                self.reply(200, raw=cached, headers={"X-Cache": "hit"})
                return
            with self.db() as conn:  # ...then the database, and remember the answer
                row = conn.execute(f"SELECT {COLUMNS} FROM notes WHERE id = %s", (int(match[1]),)).fetchone()
            if row is None:
                self.reply(404, {"error": "no such note"})
                return
            data = note_json(row)
            self.cache.set(key, data, ex=CACHE_TTL)
            self.reply(200, raw=data, headers={"X-Cache": "miss"})
        else:
            self.reply(404, {"error": "not found"})

    def post(self, url: Any) -> None:
        if url.path != "/notes":
            self.reply(404, {"error": "not found"})
            return
        title, body = self.read_note()
        with self.db() as conn:
            row = conn.execute(f"INSERT INTO notes (title, body) VALUES (%s, %s) RETURNING {COLUMNS}",
                               (title, body)).fetchone()  # fmt: skip
        assert row is not None  # INSERT ... RETURNING returns the row
        self.reply(201, raw=note_json(row), headers={"Location": f"/notes/{row[0]}"})


def check_schema(database_url: str) -> None:
    """Exit unless the migrations have run: the schema is the migrate service's job, not ours."""
    try:
        with psycopg.connect(database_url, connect_timeout=5, application_name="notes-api") as conn:
            row = conn.execute("SELECT max(version) FROM schema_migrations").fetchone()
    except psycopg.errors.UndefinedTable:
        sys.exit("api: no schema_migrations table: run the migrations first (the migrate service)")
    except psycopg.OperationalError as e:
        sys.exit(f"api: the database is unreachable: {' '.join(str(e).split())}")
    version = row[0] if row else None
    if version is None or version < SCHEMA_VERSION:
        sys.exit(f"api: the schema is at version {version}, this code needs {SCHEMA_VERSION}")
    print(f"api: schema version {version}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()

    Handler.database_url = os.environ["DATABASE_URL"]
    check_schema(Handler.database_url)
    Handler.cache = redis.Redis.from_url(os.environ["REDIS_URL"], socket_timeout=2,
                                         socket_connect_timeout=2, decode_responses=True)  # fmt: skip
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # envbox's stop: end serve_forever()
    print(f"api: listening on {args.host}:{args.port}")
    server.serve_forever()


if __name__ == "__main__":
    main()
