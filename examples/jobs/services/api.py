"""api: an HTTP front for the job queue, which it reaches as QUEUE_URL (redis://queue:6379/0).

    python3 -u services/api.py --port 8000

POST /jobs        {"op": "wordcount" | "sha256" | "sleep", "payload": ...}
                  -> 202 {"id": "j1", "status": "queued"}; 400 for a bad job
GET  /jobs/<id>   -> 200 {"id", "op", "status", "result", "error", "worker", ...}; 404 if unknown
GET  /stats       -> {"queued": n, "done": n}: the queue's length and the jobs finished
GET  /health      -> 200 {"status": "ok", "queue": "up"}, or 503 when the queue does not answer
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import redis
from jobqueue import DONE, OPS, QUEUE, SEQUENCE, connect, job_key

MAX_BODY = 1 << 20  # 1 MiB of JSON per job is plenty for an example


def validate(job: object) -> str | None:
    """The reason a submitted job is refused, or None."""
    if not isinstance(job, dict):
        return "a job is a JSON object"
    op, payload = job.get("op"), job.get("payload")
    if op not in OPS:
        return f"op must be one of {', '.join(OPS)}"
    if op in ("wordcount", "sha256") and not isinstance(payload, str):
        return f"{op} needs a string payload"
    if op == "sleep" and not (isinstance(payload, int | float) and 0 <= payload <= 10):
        return "sleep needs a number of seconds between 0 and 10"
    return None


class Handler(BaseHTTPRequestHandler):
    queue: redis.Redis

    def do_POST(self) -> None:
        if self.path != "/jobs":
            return self.reply(404, {"error": "not found"})
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            return self.reply(413, {"error": "job too large"})
        try:
            job = json.loads(self.rfile.read(length) or b"null")
        except ValueError:
            return self.reply(400, {"error": "the body is not JSON"})
        reason = validate(job)
        if reason is not None:
            return self.reply(400, {"error": reason})
        try:
            job_id = f"j{self.queue.incr(SEQUENCE)}"
            with self.queue.pipeline() as tx:  # MULTI/EXEC: the record exists before a worker sees the id
                tx.hset(job_key(job_id), mapping={"op": job["op"], "payload": json.dumps(job["payload"]),
                                                  "status": "queued", "submitted": time.time()})  # fmt: skip
                tx.lpush(QUEUE, job_id)
                tx.execute()
        except redis.RedisError as e:
            return self.reply(503, {"error": f"queue unavailable: {e}"})
        print(f"api: queued {job_id} ({job['op']})")
        self.reply(202, {"id": job_id, "status": "queued"})

    def do_GET(self) -> None:
        try:
            if self.path == "/health":
                self.queue.ping()
                return self.reply(200, {"status": "ok", "queue": "up"})
            if self.path == "/stats":
                queued, done = self.queue.llen(QUEUE), int(self.queue.get(DONE) or 0)
                return self.reply(200, {"queued": queued, "done": done})
            if self.path.startswith("/jobs/"):
                job_id = self.path.removeprefix("/jobs/")
                record = self.queue.hgetall(job_key(job_id))
                if not record:
                    return self.reply(404, {"error": f"no job {job_id}"})
                return self.reply(200, describe(job_id, record))
        except redis.RedisError as e:
            return self.reply(503, {"status": "degraded", "queue": "down", "error": str(e)})
        self.reply(404, {"error": "not found"})

    def reply(self, status: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        if self.path != "/health":  # the readiness probe's polling would drown the rest
            super().log_message(format, *args)


def describe(job_id: str, record: dict[str, str]) -> dict[str, object]:
    out: dict[str, object] = {"id": job_id, **record}
    out["payload"] = json.loads(record["payload"])
    if "result" in record:
        out["result"] = json.loads(record["result"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()

    Handler.queue = connect("api", socket_timeout=5)
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # envbox stops a service with SIGTERM
    print(f"api: listening on {args.host}:{args.port}, queue at {Handler.queue.connection_pool}")
    try:
        server.serve_forever()
    finally:
        print("api: shutting down")


if __name__ == "__main__":
    main()
