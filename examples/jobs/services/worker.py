"""worker: takes jobs from the queue (QUEUE_URL, redis://queue:6379/0), runs them, stores the results.

    python3 -u services/worker.py

Each job moves atomically from the queue to this worker's own processing list (BLMOVE), so a
worker that dies mid-job loses nothing: on its next start it puts what it held back on the queue.
It logs one line per job, and "worker ready" once it is connected and about to take jobs.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import sys
import time
from collections import Counter

import redis
from jobqueue import DONE, QUEUE, connect, job_key, processing


def run(op: str, payload: object) -> object:
    if op == "wordcount":
        assert isinstance(payload, str)
        words = payload.lower().split()
        return {"words": len(words), "top": Counter(words).most_common(3)}
    if op == "sha256":
        assert isinstance(payload, str)
        return hashlib.sha256(payload.encode()).hexdigest()
    if op == "sleep":
        assert isinstance(payload, int | float)
        time.sleep(payload)
        return {"slept": payload}
    raise ValueError(f"unknown op {op!r}")


def main() -> None:
    name = os.environ.get("WORKER_NAME") or socket.gethostname()  # envbox sets the hostname: "worker"
    mine = processing(name)
    queue = connect(name)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # envbox stops a service with SIGTERM

    # Jobs a previous run of this worker took and never finished (it was killed): back on the queue,
    # at the end that is served first.
    requeued = 0
    while queue.lmove(mine, QUEUE, "LEFT", "RIGHT") is not None:
        requeued += 1
    if requeued:
        print(f"worker {name}: requeued {requeued} unfinished job(s) of a previous run")
    print(f"worker ready: {name} waiting on {QUEUE!r}")

    try:
        while True:
            try:
                job_id = queue.blmove(QUEUE, mine, timeout=5, src="RIGHT", dest="LEFT")
            except redis.ConnectionError as e:  # the queue restarted: try again until it is back
                print(f"worker {name}: queue unavailable ({e}); retrying")
                time.sleep(0.5)
                continue
            if job_id is None:
                continue
            key = job_key(job_id)
            record = queue.hgetall(key)
            started = time.time()
            queue.hset(key, mapping={"status": "running", "worker": name, "started": started})
            print(f"worker {name}: {job_id} {record.get('op')} started")
            try:
                result = run(record["op"], json.loads(record["payload"]))
            except Exception as e:
                outcome = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
            else:
                outcome = {"status": "done", "result": json.dumps(result)}
            with queue.pipeline() as tx:  # the result, the counter, and off the processing list
                tx.hset(key, mapping={**outcome, "finished": time.time()})
                tx.incr(DONE)
                tx.lrem(mine, 1, job_id)
                tx.execute()
            took = (time.time() - started) * 1000
            print(f"worker {name}: {job_id} {record.get('op')} {outcome['status']} in {took:.1f} ms")
    finally:
        print(f"worker {name}: stopping")


if __name__ == "__main__":
    main()
