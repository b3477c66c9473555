"""The queue's layout in Redis, shared by the api (producer) and the worker (consumer).

Keys:

    jobs:seq                  INCR counter: job ids are j1, j2, ...
    jobs                      LIST of queued job ids: LPUSH by the api, BLMOVE (right end) by a worker
    jobs:processing:<worker>  LIST of the ids a worker has taken and not finished yet
    job:<id>                  HASH: op, payload, status (queued, running, done, failed), result,
                              error, worker, submitted, started, finished
    jobs:done                 INCR counter of the jobs finished (done or failed)
"""

from __future__ import annotations

import os

import redis

QUEUE = "jobs"
SEQUENCE = "jobs:seq"
DONE = "jobs:done"
OPS = ("wordcount", "sha256", "sleep")


def processing(worker: str) -> str:
    return f"jobs:processing:{worker}"


def job_key(job_id: str) -> str:
    return f"job:{job_id}"


def connect(name: str, socket_timeout: float | None = None) -> redis.Redis:
    """A client of the queue named by QUEUE_URL (here redis://queue:6379/0: the alias, not "redis").

    ``client_name`` shows up in the server's CLIENT LIST, next to the address the client came from.
    """
    url = os.environ.get("QUEUE_URL", "redis://127.0.0.1:6379/0")
    return redis.Redis.from_url(url, decode_responses=True, client_name=name, socket_connect_timeout=2,
                                socket_timeout=socket_timeout, health_check_interval=10)  # fmt: skip
