#!/usr/bin/env python3
"""A fleetq producer written from docs/protocol.md alone (redis-py only).

Each subcommand does one thing a producer does and prints one JSON object on stdout:

    producer.py enqueue --queue Q --payload JSON [--id ID] [--delay-ms N] [--wait SECS]
    producer.py xadd    --queue Q --payload JSON [--id ID] [--wait SECS]
    producer.py status  --queue Q ID
    producer.py wait    --queue Q ID [--timeout SECS]
    producer.py cancel  --queue Q ID

REDIS_URL selects the server (default redis://127.0.0.1:6379). Exit status: 0 done, 2 the
wait timed out, 3 bad arguments, 4 Redis refused the call.
"""

import argparse
import json
import os
import sys
import time

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

# Terminal states, and `not_found` (§5).
TERMINAL = {"succeeded", "failed", "dead", "expired", "cancelled", "not_found"}
# Protocol (library major version) this producer speaks (§18).
PROTOCOL = "3"


def stream_key(queue):
    return f"fleetq:{{{queue}}}:stream"


def notify_key(queue, job_id):
    return f"fleetq:{{{queue}}}:notify:{job_id}"


def connect(url, longest_block_s):
    """A client for this producer (§19, redis-py).

    socket_timeout outlasts the longest BLPOP it sends, and retries are off: redis-py 8
    retries a timed-out or broken call up to 10 times by default, which re-sends a plain
    XADD (a second job) and turns a BLPOP of 8 s on a 5 s socket timeout into a minute of
    silent retries. Calls that are safe to repeat (fleetq_enqueue with an id, status) are
    retried here, explicitly.
    """
    return redis.Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=longest_block_s + 5,
        socket_connect_timeout=5,
        retry=Retry(NoBackoff(), 0),
    )


def as_dict(flat):
    return dict(zip(flat[::2], flat[1::2]))


def idempotent(call, tries=5):
    """Runs `call` again after a connection error or timeout: only for idempotent calls."""
    for i in range(tries):
        try:
            return call()
        except (redis.ConnectionError, redis.TimeoutError):
            if i == tries - 1:
                raise
            time.sleep(0.1 * 2**i)
    return None


def check_library(r):
    version = r.fcall_ro("fleetq_version", 0)
    if version.split(".", 1)[0] != PROTOCOL:
        raise SystemExit(f"the server's fleetq library is {version}; this producer speaks protocol {PROTOCOL}")


def enqueue(r, queue, payload, job_id=None, delay_ms=None):
    """fleetq_enqueue (§10): idempotent with an id, so it may be retried."""
    args = [payload]
    if job_id is not None:
        args += ["id", job_id]
    if delay_ms is not None:
        args += ["delay_ms", str(delay_ms)]

    def call():
        return r.fcall("fleetq_enqueue", 1, stream_key(queue), *args)

    reply = idempotent(call) if job_id is not None else call()
    jid, state, position, created = reply
    return {"job_id": jid, "state": state, "position": int(position), "created": int(created)}


def xadd(r, queue, payload, job_id=None):
    """A plain XADD (§1): never retried (a retry would add a second entry)."""
    fields = {"payload": payload}
    if job_id is not None:
        fields["id"] = job_id
    entry_id = r.xadd(stream_key(queue), fields)
    return {"job_id": job_id or entry_id, "entry_id": entry_id}


def status(r, queue, job_id):
    return as_dict(idempotent(lambda: r.fcall_ro("fleetq_status", 1, stream_key(queue), job_id)))


def wait(r, queue, job_id, timeout):
    """§11: watch, then BLPOP on the notify list, then status. None when the wait timed out."""
    st = as_dict(r.fcall("fleetq_watch", 1, stream_key(queue), job_id))
    if st["state"] in TERMINAL:
        return st
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        # BLPOP takes whole or fractional seconds; 0 would block forever.
        if r.blpop([notify_key(queue, job_id)], timeout=max(left, 0.01)) is not None:
            return status(r, queue, job_id)


def cancel(r, queue, job_id):
    (state,) = r.fcall("fleetq_cancel", 1, stream_key(queue), job_id)
    return {"job_id": job_id, "state": state}


def decoded(st):
    """A status with its JSON fields parsed, for printing."""
    out = dict(st)
    for key in ("result", "progress", "history", "stages"):
        if key in out:
            try:
                out[key] = json.loads(out[key])
            except ValueError:
                pass
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("enqueue", "xadd"):
        p = sub.add_parser(name)
        p.add_argument("--queue", required=True)
        p.add_argument("--payload", required=True)
        p.add_argument("--id")
        p.add_argument("--wait", type=float, help="seconds to wait for the end")
        if name == "enqueue":
            p.add_argument("--delay-ms", type=int)
    for name in ("status", "wait", "cancel"):
        p = sub.add_parser(name)
        p.add_argument("--queue", required=True)
        p.add_argument("job_id")
        if name == "wait":
            p.add_argument("--timeout", type=float, default=30.0)
    args = ap.parse_args()

    if hasattr(args, "payload"):
        try:
            json.loads(args.payload)
        except ValueError as e:
            print(f"--payload is not JSON ({e}); pass a JSON text such as '{{\"prompt\": \"a fox\"}}'",
                  file=sys.stderr)
            return 3
    longest = max(getattr(args, "wait", None) or 0, getattr(args, "timeout", None) or 0)
    r = connect(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379"), longest)
    try:
        check_library(r)
        if args.cmd in ("enqueue", "xadd"):
            if args.cmd == "enqueue":
                out = enqueue(r, args.queue, args.payload, args.id, args.delay_ms)
            else:
                out = xadd(r, args.queue, args.payload, args.id)
            if args.wait is not None:
                final = wait(r, args.queue, out["job_id"], args.wait)
                if final is None:
                    out["final"] = {"state": "timeout"}
                    print(json.dumps(out))
                    return 2
                out["final"] = decoded(final)
        elif args.cmd == "status":
            out = decoded(status(r, args.queue, args.job_id))
        elif args.cmd == "wait":
            final = wait(r, args.queue, args.job_id, args.timeout)
            if final is None:
                print(json.dumps({"state": "timeout"}))
                return 2
            out = decoded(final)
        else:
            out = cancel(r, args.queue, args.job_id)
    except redis.ResponseError as e:
        print(f"Redis refused the call: {e}", file=sys.stderr)
        return 4
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
