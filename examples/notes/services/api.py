"""api: a small JSON API for notes, stored in PostgreSQL and cached in Redis.

    DATABASE_URL=postgresql://postgres@db:5432/notes REDIS_URL=redis://cache:6379/0 \\
        python3 services/api.py --port 8000

GET    /health         {"status": "ok", "db": "up", "cache": "up"}; 503 when the database is down
GET    /notes          the newest notes, [{"id": 1, "title": "..."}] (?limit=, at most 500)
POST   /notes          {"title": "...", "body": "..."} -> 201 and the note
GET    /notes/<id>     the note, from Redis when cached (header X-Cache: hit), else from PostgreSQL
PUT    /notes/<id>     {"title": "...", "body": "..."} -> the note; the cached copy is dropped
DELETE /notes/<id>     204; the cached copy is dropped

Designed degradation:
- the cache is optional: when Redis is unreachable every read goes to the database
  (/health says "cache": "down", status 200, "status": "degraded");
- when the database is unreachable, notes in the cache are still served; everything else answers
  503 {"error": "database unavailable", "dependency": "db", ...} within a few seconds at most
  (connect timeout, TCP user timeout, statement timeout), and at once for a second after a
  failure (a small circuit breaker), so that clients are not kept waiting on a dead link;
- when the database comes back, the next request after that second reconnects: no restart needed.

Bounded by design: at most WORKERS requests are handled at once (the others wait in the kernel's
listen queue), and a request body larger than MAX_BODY is read in small chunks and discarded
(413), so memory stays flat under load.

Needs: redis (redis-py) and psycopg (v3). Configuration comes from the environment.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import psycopg
import redis
from psycopg.pq import TransactionStatus
from redis.backoff import NoBackoff
from redis.retry import Retry

CACHE_TTL = 300  # seconds a cached note may be served without the database
DB_RETRY_AFTER = 1.0  # after a database failure, fail fast this long before trying again
DRAIN_LIMIT = 64 * 2**20  # beyond this, an oversized body is not even read: the connection closes


class DatabaseDown(Exception):
    """The database cannot be reached (or answer) right now."""


class Database:
    """A small pool of psycopg connections with short timeouts and a circuit breaker."""

    def __init__(self, url: str, pool_size: int) -> None:
        self.url = url
        self.pool_size = pool_size
        self.idle: list[psycopg.Connection[Any]] = []
        self.lock = threading.Lock()
        self.schema_lock = threading.Lock()
        self.schema_ready = False
        self.down_until = 0.0
        self.last_error = ""

    def _connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(
            self.url,
            autocommit=True,
            application_name="notes-api",
            connect_timeout=2,  # libpq's minimum
            # A cut link must not leave a query waiting for TCP's retransmissions (minutes): the
            # kernel gives up when sent data (or a keepalive probe) is unacknowledged for 2 s.
            tcp_user_timeout=2000,
            keepalives=1, keepalives_idle=2, keepalives_interval=1, keepalives_count=2,
            options="-c statement_timeout=2000",
        )  # fmt: skip

    def _ensure_schema(self, conn: psycopg.Connection[Any]) -> None:
        with self.schema_lock:
            if self.schema_ready:
                return
            conn.execute(
                """CREATE TABLE IF NOT EXISTS notes (
                       id bigserial PRIMARY KEY,
                       title text NOT NULL,
                       body text NOT NULL,
                       created_at timestamptz NOT NULL DEFAULT now(),
                       updated_at timestamptz NOT NULL DEFAULT now())"""
            )
            self.schema_ready = True

    def _mark_down(self, error: Exception) -> None:
        with self.lock:
            self.down_until = time.monotonic() + DB_RETRY_AFTER
            self.last_error = " ".join(str(error).split()) or type(error).__name__
            stale, self.idle = self.idle, []  # their server is likely gone too: start afresh
        for conn in stale:
            conn.close()

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        with self.lock:
            if time.monotonic() < self.down_until:
                raise DatabaseDown(self.last_error)
            conn = self.idle.pop() if self.idle else None
        try:
            if conn is None:
                conn = self._connect()
            self._ensure_schema(conn)
            yield conn
        except psycopg.OperationalError as e:
            # Could not connect, the connection broke, or a statement timed out.
            if conn is not None:
                conn.close()
            self._mark_down(e)
            raise DatabaseDown(self.last_error) from e
        except BaseException:
            if conn is not None:
                conn.close()
            raise
        if conn.broken or conn.info.transaction_status != TransactionStatus.IDLE:
            conn.close()
            return
        with self.lock:
            if len(self.idle) < self.pool_size:
                self.idle.append(conn)
                conn = None
        if conn is not None:
            conn.close()

    def ping(self) -> str | None:
        """None when the database answers, else why not."""
        try:
            with self.connection() as conn:
                conn.execute("SELECT 1")
        except DatabaseDown as e:
            return str(e)
        return None


class Cache:
    """Redis as an optional cache: every failure is a miss, logged once per outage."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(
            url,
            socket_timeout=1,
            socket_connect_timeout=1,
            retry=Retry(NoBackoff(), 0),  # fail at once; the database is the fallback
            decode_responses=True,
        )
        self.failing = False

    def _failed(self, error: Exception) -> None:
        if not self.failing:
            print(f"api: cache unavailable: {error}", file=sys.stderr)
        self.failing = True

    def get(self, key: str) -> str | None:
        try:
            value = self.client.get(key)
        except redis.RedisError as e:
            self._failed(e)
            return None
        self.failing = False
        return value  # type: ignore[return-value]

    def set(self, key: str, value: str) -> None:
        try:
            self.client.set(key, value, ex=CACHE_TTL)
        except redis.RedisError as e:
            self._failed(e)

    def delete(self, key: str) -> None:
        try:
            self.client.delete(key)
        except redis.RedisError as e:
            # The stale copy expires after CACHE_TTL at the latest.
            self._failed(e)

    def ping(self) -> str | None:
        try:
            self.client.ping()
        except redis.RedisError as e:
            return str(e)
        return None


class BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


NOTE_PATH = re.compile(r"/notes/(\d{1,18})")
COLUMNS = "id, title, body, created_at, updated_at"


def note_json(row: tuple[Any, ...]) -> str:
    id_, title, body, created, updated = row
    return json.dumps({"id": id_, "title": title, "body": body,
                       "created_at": created.isoformat(), "updated_at": updated.isoformat()})  # fmt: skip


class Handler(BaseHTTPRequestHandler):
    # HTTP/1.0: one request per connection, so an idle keep-alive client never holds a worker.
    protocol_version = "HTTP/1.0"
    timeout = 10  # a client that stops sending does not hold a worker for ever
    db: Database
    cache: Cache
    max_body: int

    # --- plumbing ----------------------------------------------------------------------------

    def reply(self, status: int, body: object = None, *, raw: str | None = None,
              headers: dict[str, str] | None = None) -> None:  # fmt: skip
        data = b"" if status == 204 else (raw if raw is not None else json.dumps(body)).encode()
        self.send_response(status)
        if status != 204:
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def read_note(self) -> tuple[str, str]:
        """The request's {"title", "body"}; an oversized body is discarded, not kept in memory."""
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise BadRequest(411, "a JSON body with a Content-Length is required")
        size = int(length)
        if size > self.max_body:
            if size > DRAIN_LIMIT:
                self.close_connection = True
            else:
                while size > 0:  # read and drop, 64 KiB at a time
                    chunk = self.rfile.read(min(size, 65536))
                    if not chunk:
                        break
                    size -= len(chunk)
            raise BadRequest(413, f"body larger than {self.max_body} bytes")
        try:
            note = json.loads(self.rfile.read(size))
        except ValueError as e:
            raise BadRequest(400, f"invalid JSON: {e}") from None
        if not isinstance(note, dict):
            raise BadRequest(400, "expected a JSON object")
        title, body = note.get("title"), note.get("body", "")
        if not isinstance(title, str) or not 0 < len(title) <= 200:
            raise BadRequest(400, "title: a string of 1 to 200 characters is required")
        if not isinstance(body, str):
            raise BadRequest(400, "body: must be a string")
        if "\x00" in title or "\x00" in body:
            raise BadRequest(400, "NUL characters are not allowed")
        return title, body

    def dispatch(self, method: str) -> None:
        try:
            getattr(self, method)(urlsplit(self.path))
        except BadRequest as e:
            self.reply(e.status, {"error": str(e)})
        except DatabaseDown as e:
            self.reply(503, {"error": "database unavailable", "dependency": "db", "detail": str(e)},
                       headers={"Retry-After": str(int(DB_RETRY_AFTER))})  # fmt: skip
        except Exception as e:  # a bug, or an error of the database that is not an outage
            self.log_error("%s %s failed: %r", self.command, self.path, e)
            self.reply(500, {"error": "internal error", "detail": f"{type(e).__name__}: {e}"})

    def do_GET(self) -> None:
        self.dispatch("get")

    def do_POST(self) -> None:
        self.dispatch("post")

    def do_PUT(self) -> None:
        self.dispatch("put")

    def do_DELETE(self) -> None:
        self.dispatch("delete")

    # --- the API -------------------------------------------------------------------------------

    def get(self, url: Any) -> None:
        if url.path == "/health":
            db, cache = self.db.ping(), self.cache.ping()
            health: dict[str, str] = {
                "status": "ok" if db is None and cache is None else "degraded" if db is None else "down",
                "db": "up" if db is None else "down",
                "cache": "up" if cache is None else "down",
            }
            if db is not None:
                health["db_error"] = db
            if cache is not None:
                health["cache_error"] = cache
            self.reply(200 if db is None else 503, health)
        elif url.path == "/notes":
            try:
                limit = min(int(parse_qs(url.query).get("limit", ["50"])[0]), 500)
            except ValueError:
                raise BadRequest(400, "limit: an integer is expected") from None
            with self.db.connection() as conn:
                rows = conn.execute("SELECT id, title FROM notes ORDER BY id DESC LIMIT %s",
                                    (limit,)).fetchall()  # fmt: skip
            self.reply(200, [{"id": id_, "title": title} for id_, title in rows])
        elif match := NOTE_PATH.fullmatch(url.path):
            key = f"note:{match[1]}"
            cached = self.cache.get(key)  # cache-aside: the cache first...
            if cached is not None:
                self.reply(200, raw=cached, headers={"X-Cache": "hit"})
                return
            with self.db.connection() as conn:  # ...then the database, and remember the answer
                row = conn.execute(f"SELECT {COLUMNS} FROM notes WHERE id = %s", (int(match[1]),)).fetchone()
            if row is None:
                self.reply(404, {"error": "no such note"})
                return
            data = note_json(row)
            self.cache.set(key, data)
            self.reply(200, raw=data, headers={"X-Cache": "miss"})
        else:
            self.reply(404, {"error": "not found"})

    def post(self, url: Any) -> None:
        if url.path != "/notes":
            self.reply(404, {"error": "not found"})
            return
        title, body = self.read_note()
        with self.db.connection() as conn:
            row = conn.execute(f"INSERT INTO notes (title, body) VALUES (%s, %s) RETURNING {COLUMNS}",
                               (title, body)).fetchone()  # fmt: skip
        assert row is not None
        self.reply(201, raw=note_json(row), headers={"Location": f"/notes/{row[0]}"})

    def put(self, url: Any) -> None:
        match = NOTE_PATH.fullmatch(url.path)
        if match is None:
            self.reply(404, {"error": "not found"})
            return
        title, body = self.read_note()
        with self.db.connection() as conn:
            row = conn.execute(
                "UPDATE notes SET title = %s, body = %s, updated_at = now() "
                f"WHERE id = %s RETURNING {COLUMNS}",
                (title, body, int(match[1])),
            ).fetchone()
        self.cache.delete(f"note:{match[1]}")
        if row is None:
            self.reply(404, {"error": "no such note"})
        else:
            self.reply(200, raw=note_json(row))

    def delete(self, url: Any) -> None:
        match = NOTE_PATH.fullmatch(url.path)
        if match is None:
            self.reply(404, {"error": "not found"})
            return
        with self.db.connection() as conn:
            deleted = conn.execute("DELETE FROM notes WHERE id = %s", (int(match[1]),)).rowcount
        self.cache.delete(f"note:{match[1]}")
        if deleted:
            self.reply(204)
        else:
            self.reply(404, {"error": "no such note"})


class Server(ThreadingHTTPServer):
    """A thread per request, but at most ``workers`` of them at once."""

    daemon_threads = True
    request_queue_size = 256  # connections waiting for a worker wait in the kernel

    def __init__(self, address: tuple[str, int], workers: int) -> None:
        super().__init__(address, Handler)
        self.slots = threading.BoundedSemaphore(workers)

    def process_request(self, request: Any, client_address: Any) -> None:
        self.slots.acquire()  # the accept loop waits here while every worker is busy
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()

    workers = int(os.environ.get("WORKERS", "8"))
    Handler.db = Database(os.environ["DATABASE_URL"], pool_size=workers)
    Handler.cache = Cache(os.environ["REDIS_URL"])
    Handler.max_body = int(os.environ.get("MAX_BODY", str(2**20)))

    server = Server((args.host, args.port), workers)
    # SIGTERM (sent by envbox on stop) ends serve_forever() cleanly.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"api: listening on {args.host}:{args.port} with {workers} workers")
    try:
        server.serve_forever()
    finally:
        print("api: shutting down")


if __name__ == "__main__":
    main()
