#!/usr/bin/env python3
"""Put a job on a fleetq queue with a plain XADD, then wait for its result without polling.

Needs only redis-py (pip install redis). Follows docs/protocol.md:

    python3 producer.py --queue images --payload '{"prompt": "a red fox"}'

REDIS_URL selects the server (default redis://127.0.0.1:6379). Prints one JSON object
(id, state, result or error) and exits 0 when the job succeeded, 1 when it ended otherwise,
2 when the wait timed out, 3 on bad arguments.
"""

import argparse
import json
import os
import sys

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

TERMINAL = {"succeeded", "failed", "dead", "expired", "cancelled", "not_found"}


def stream_key(queue: str) -> str:
    return f"fleetq:{{{queue}}}:stream"


def notify_key(queue: str, job_id: str) -> str:
    return f"fleetq:{{{queue}}}:notify:{job_id}"


def enqueue(r: redis.Redis, queue: str, payload: dict) -> str:
    """A plain XADD: the entry id is the job id."""
    return r.xadd(stream_key(queue), {"payload": json.dumps(payload)})


def status(r: redis.Redis, queue: str, job_id: str, watch: bool = False) -> dict:
    """fleetq_status, or fleetq_watch, which also registers this caller as a waiter."""
    name = "fleetq_watch" if watch else "fleetq_status"
    flat = r.fcall(name, 1, stream_key(queue), job_id)
    return dict(zip(flat[::2], flat[1::2]))


def wait(r: redis.Redis, queue: str, job_id: str, timeout: float) -> dict:
    """Blocks on BLPOP of the job's notify key until the job ends (or the timeout passes)."""
    st = status(r, queue, job_id, watch=True)
    if st["state"] in TERMINAL:
        return st
    if r.blpop([notify_key(queue, job_id)], timeout=timeout) is None:
        raise TimeoutError(f"job {job_id} did not end within {timeout} s")
    return status(r, queue, job_id)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queue", required=True)
    ap.add_argument("--payload", required=True, help="the job payload, a JSON object")
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds to wait (default 30)")
    args = ap.parse_args()
    try:
        payload = json.loads(args.payload)
    except json.JSONDecodeError as e:
        print(f"--payload is not valid JSON ({e}); pass e.g. '{{\"prompt\": \"a red fox\"}}'", file=sys.stderr)
        return 3
    url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379")
    # The socket timeout must outlast the blocking wait, and retries stay off: redis-py 8
    # would send a plain XADD again after a late reply, adding the job twice (protocol.md §19).
    r = redis.Redis.from_url(url, decode_responses=True, socket_timeout=args.timeout + 5,
                             socket_connect_timeout=5, retry=Retry(NoBackoff(), 0))
    job_id = enqueue(r, args.queue, payload)
    try:
        st = wait(r, args.queue, job_id, args.timeout)
    except TimeoutError as e:
        print(json.dumps({"id": job_id, "state": "timeout", "error": str(e)}))
        return 2
    out = {"id": job_id, "state": st["state"]}
    if "result" in st:
        out["result"] = json.loads(st["result"])
    if "error" in st:
        out["error"] = st["error"]
    print(json.dumps(out))
    return 0 if st["state"] == "succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())
