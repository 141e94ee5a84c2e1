#!/usr/bin/env python3
"""A fleetq worker written from docs/protocol.md alone (redis-py only).

It follows §17: reads with XREADGROUP in the `workers` group (COUNT = free slots), takes with
fleetq_take (a new fencing token per take), renews every lease/3, reports progress, ends each
attempt with fleetq_complete, reclaims stale entries of dead workers with fleetq_reclaim, keeps
its node record (§16) and, on SIGTERM or SIGINT, stops in two phases and releases what it holds.

    worker.py --queue Q --node N [--slots 2] [--grace-secs 0] [--heartbeat-secs 10]

REDIS_URL selects the server (default redis://127.0.0.1:6379). Logs go to stderr.

The handler echoes the payload: {"echo": <payload>, "node": <node>}. A payload object may ask
for `"py_sleep_ms": N` (run that long, reporting progress every 100 ms) and `"py_fail":
"retry" | "fatal"`. It does not enforce the start, progress and run timeouts (§13), and it
ignores operator suspensions.
"""

import argparse
import json
import os
import random
import secrets
import signal
import sys
import threading
import time

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

GROUP = "workers"
PROTOCOL = "3"
VERSION = "0.1.0-python"
MAX_FIELDS = 100
TEXT_FIELDS = ("id", "workflow", "traceparent")
# (min, max) of each numeric entry field (§3, Numbers).
NUMBERS = {
    "max_attempts": (1, 1_000_000),
    "queue_timeout_ms": (1, 10**12),
    "start_timeout_ms": (1, 10**12),
    "progress_timeout_ms": (1, 10**12),
    "run_timeout_ms": (1, 10**12),
    "attempts": (0, 1_000_000),
    "enqueued_ms": (0, 10**13),
    "avoid_until": (0, 10**13),
    "passes": (0, 1_000_000),
    "seq": (0, 10**13),
}


def log(msg):
    print(f"worker.py: {msg}", file=sys.stderr, flush=True)


def now_ms():
    return int(time.time() * 1000)


def number(text, lo, hi):
    """§3 Numbers: 1 to 16 decimal digits, within [lo, hi]; None otherwise."""
    if not (1 <= len(text) <= 16) or not text.isascii() or not text.isdigit():
        return None
    n = int(text)
    return n if lo <= n <= hi else None


def entries_of(reply):
    """(entry id, flat fields) of an XREADGROUP reply, as redis-py gives it: a list of
    [stream, entries] or a map of stream to entries; each entry [id, [field, value, …]] (or
    its fields as a map, which keeps only one of two equal names)."""
    if not reply:
        return []
    streams = reply.items() if isinstance(reply, dict) else reply
    out = []
    for _stream, entries in streams:
        for entry_id, fields in entries:
            if fields is None:  # a pending entry deleted meanwhile comes back without fields
                continue
            if isinstance(fields, dict):
                fields = [x for kv in fields.items() for x in kv]
            out.append((entry_id.decode() if isinstance(entry_id, bytes) else entry_id, list(fields)))
    return out


class Malformed(Exception):
    pass


class Entry:
    """One stream entry, checked as §3 says (Validation by the worker)."""

    def __init__(self, entry_id, flat, max_payload):
        self.entry_id = entry_id
        self.ms = int(entry_id.split("-")[0])
        self.fields = {}
        self.error = None
        names = flat[0::2]
        values = flat[1::2]
        # The job id: the first `id` field when it is 1-200 bytes of UTF-8, else the entry id.
        self.job_id = entry_id
        for n, v in zip(names, values):
            if n == b"id":
                if 1 <= len(v) <= 200:
                    try:
                        self.job_id = v.decode("utf-8")
                    except UnicodeDecodeError:
                        pass
                break
        try:
            self._check(names, values, max_payload)
        except Malformed as e:
            self.error = str(e)

    def _check(self, names, values, max_payload):
        if len(names) > MAX_FIELDS:
            raise Malformed(f"entry has {len(names)} fields, more than the 100 a job may carry; "
                            "put large or many inputs in the payload, or pass a reference to them")
        for n, v in zip(names, values):
            try:
                name = n.decode("utf-8")
            except UnicodeDecodeError:
                raise Malformed(f'field name "{n.decode("utf-8", "replace")}" is not UTF-8 '
                                "(bad bytes shown as U+FFFD); write field names as UTF-8 text")
            if name not in self.fields:  # of two fields of one name, the first counts
                self.fields[name] = v
        raw = self.fields.get("payload")
        if raw is None:
            raise Malformed("entry has no payload field; add the job as XADD <stream> * payload '<json>'")
        if len(raw) > max_payload:
            raise Malformed(f"payload is {len(raw)} bytes, over the queue limit of {max_payload} "
                            "(config max_payload_bytes); pass a reference to large inputs instead")
        try:
            self.payload = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise Malformed(f'payload is not valid JSON ({e}); send a JSON text such as {{"prompt":"…"}}')
        self.nums = {}
        for name, (lo, hi) in NUMBERS.items():
            if name in self.fields:
                text = self.fields[name].decode("utf-8", "replace")
                n = number(text, lo, hi)
                if n is None:
                    raise Malformed(f'field {name} must be a whole number from {lo} to {hi} '
                                    f'(decimal digits only), got "{text[:100]}"')
                self.nums[name] = n
        self.text = {}
        for name in TEXT_FIELDS + ("avoid",):
            if name in self.fields:
                v = self.fields[name]
                try:
                    s = v.decode("utf-8")
                except UnicodeDecodeError:
                    s = None
                if s is None or len(v) > 200 or (name == "avoid" and len(s.split(",")) > 8):
                    raise Malformed(f'field {name} must be UTF-8 text of at most 200 bytes, got '
                                    f'"{v.decode("utf-8", "replace")[:100]}"')
                self.text[name] = s

    def take_values(self, token, config):
        """The 11 values of this entry for fleetq_take (§17 step 3)."""
        if self.error is not None:
            return [self.entry_id, self.job_id, token, "0", "1000000", "0", str(self.ms), "", "0", "", "0"]
        prior = self.nums.get("attempts", 0)
        max_attempts = self.nums.get("max_attempts", config["max_attempts"])
        enqueued = self.nums.get("enqueued_ms", self.ms)
        queue_timeout = self.nums.get("queue_timeout_ms", config["queue_timeout_ms"])
        deadline = enqueued + queue_timeout if queue_timeout and prior == 0 else 0
        self.max_attempts = max_attempts
        return [self.entry_id, self.job_id, token, str(prior), str(max_attempts), str(deadline),
                str(enqueued), self.text.get("avoid", ""), str(self.nums.get("avoid_until", 0)),
                self.text.get("workflow", ""), str(self.nums.get("passes", 0))]


class Held:
    """One take this worker holds: the fencing token goes with every later call about it."""

    def __init__(self, entry, token, attempt):
        self.entry = entry
        self.token = token
        self.attempt = attempt
        self.began = time.monotonic()
        self.began_ms = now_ms()
        self.confirmed = time.monotonic()  # the take confirmed the lease
        self.stop = threading.Event()
        self.stop_reason = None  # 'lost' | 'cancel' | 'release'
        self.returned = False  # the handler has returned (its result only waits to be recorded)

    def halt(self, reason):
        if self.stop_reason is None:
            self.stop_reason = reason
        self.stop.set()


class Stopped(Exception):
    pass


class Worker:
    def __init__(self, url, queue, node, slots, grace, heartbeat):
        self.queue, self.node, self.slots, self.grace, self.heartbeat = queue, node, slots, grace, heartbeat
        self.stream = f"fleetq:{{{queue}}}:stream"
        self.config_key = f"fleetq:{{{queue}}}:config"
        self.node_key = f"fleetq:node:{node}"
        self.consumer = f"{node}:{os.getpid()}:{now_ms()}"
        self.url = url
        # Short calls. Retries off: take, complete, reclaim and XREADGROUP are not idempotent,
        # and each error is handled where it happens.
        self.r = self.client(5.0, decode=True)
        self.held = {}
        self.read_ids = {}  # entry id -> job id of entries read and not yet settled
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.stopping = threading.Event()
        self.background_stop = threading.Event()
        self.busy_changed = threading.Event()
        self.last_alive = 0.0
        self.threads = []

    def client(self, timeout, decode):
        # client_name: CLIENT SETNAME <consumer> on every connection, reconnects included (§17).
        return redis.Redis.from_url(self.url, decode_responses=decode, socket_timeout=timeout,
                                    socket_connect_timeout=5, retry=Retry(NoBackoff(), 0),
                                    client_name=self.consumer)

    # ---- start ----------------------------------------------------------------------------

    def start(self):
        while True:  # a worker never loads the library; it waits for it (§18)
            try:
                version = self.r.fcall_ro("fleetq_version", 0)
                if version.split(".", 1)[0] == PROTOCOL:
                    break
                log(f"the server's library is {version}; waiting for protocol {PROTOCOL}")
            except redis.ResponseError as e:
                log(f"no fleetq library yet ({e}); waiting")
            time.sleep(0.2)
        try:
            self.r.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        self.config = self.read_config()
        self.lease_ms = self.config["lease_ms"]
        # The blocking reader: its socket timeout outlasts the longest BLOCK (a lease here).
        self.reader = self.client(self.lease_ms / 1000 + 5, decode=False)
        self.reader.set_response_callback("XREADGROUP", lambda resp, **kw: resp)
        self.reader.set_response_callback("XRANGE", lambda resp, **kw: resp)
        # Renewals: one not answered within lease/3 counts as failed (§17 step 5).
        self.renewer = self.client(self.lease_ms / 3000, decode=True)
        log(f"started as {self.consumer}, lease {self.lease_ms} ms")
        for target in (self.renew_loop, self.heartbeat_loop):
            t = threading.Thread(target=target, daemon=True)
            t.start()
            self.threads.append(t)
        # Own pending entries first (normally none: the consumer name is new).
        self.intake(self.read(block=None, from_start=True))

    def read_config(self):
        m = self.r.hgetall(self.config_key)

        def num(name, default):
            v = m.get(name)
            return default if v is None else int(v)

        max_attempts = num("max_attempts", 3)
        return {
            "lease_ms": num("lease_ms", 10000),
            "max_attempts": max(max_attempts, 1),
            "backoff_base_ms": num("backoff_base_ms", 0) or 1000,
            "backoff_max_ms": num("backoff_max_ms", 0) or 60000,
            "queue_timeout_ms": num("queue_timeout_ms", 0),
            "max_payload_bytes": num("max_payload_bytes", 1048576),
        }

    # ---- read, reclaim, take --------------------------------------------------------------

    def free(self):
        with self.lock:
            return self.slots - len(self.held)

    def read(self, block, from_start=False):
        """XREADGROUP for the free slots; entries as (entry id, flat fields)."""
        args = ["XREADGROUP", "GROUP", GROUP, self.consumer, "COUNT", str(max(self.free(), 1))]
        if block is not None:
            args += ["BLOCK", str(max(int(block), 1))]  # BLOCK 0 would block forever
        args += ["STREAMS", self.stream, "0" if from_start else ">"]
        return entries_of(self.reader.execute_command(*args))

    def reclaim(self):
        """fleetq_reclaim for the free slots; returns (entries, seconds until the next call)."""
        free = self.free()
        reply = self.reader.fcall("fleetq_reclaim", 1, self.stream, self.consumer, str(self.lease_ms),
                                  str(free), self.node)
        entries, next_wake, server_now = reply
        if next_wake:
            wait = min(max((int(next_wake) - int(server_now)) / 1000 + 0.005, 0.05), self.lease_ms / 1000)
        else:
            wait = self.lease_ms / 1000
        claimed = [(e[0].decode(), e[1]) for e in entries]
        if claimed:
            log(f"reclaimed {[e for e, _ in claimed]}")
        return claimed, wait

    def intake(self, raw):
        if not raw:
            return
        entries = [Entry(eid, flat, self.config["max_payload_bytes"]) for eid, flat in raw]
        with self.lock:
            for e in entries:
                self.read_ids[e.entry_id] = e.job_id
        tokens = [secrets.token_hex(8) for _ in entries]  # 64 random bits, 16 hex digits
        args = [self.consumer, self.node, str(self.lease_ms), "1"]
        alive = time.monotonic() - self.last_alive >= self.lease_ms / 4000
        args.append("1" if alive else "0")
        if alive:
            self.last_alive = time.monotonic()
        for e, token in zip(entries, tokens):
            args += e.take_values(token, self.config)
        rows = self.r.fcall("fleetq_take", 1, self.stream, *args)
        for e, token, (entry_id, decision, _deliveries, n) in zip(entries, tokens, rows):
            if decision != "run":
                log(f"entry {entry_id} of job {e.job_id}: {decision}")
                with self.lock:
                    self.read_ids.pop(entry_id, None)
                continue
            job = Held(e, token, int(n))
            with self.lock:
                self.held[entry_id] = job
            self.busy_changed.set()
            if e.error is not None:
                self.commit(job, "dead", e.error, reason="malformed")
                continue
            t = threading.Thread(target=self.run_job, args=(job,), daemon=True)
            t.start()

    # ---- run ------------------------------------------------------------------------------

    def stages(self, job):
        return json.dumps([{"name": "work", "start_ms": job.began_ms, "duration_ms": now_ms() - job.began_ms}])

    def report(self, job, step, total, last):
        """fleetq_progress, at most once a second (the first at once)."""
        if time.monotonic() - last < 1.0:
            return last
        progress = json.dumps({"step": step, "total": total, "stage": "work"})
        try:
            word = self.r.fcall("fleetq_progress", 1, self.stream, self.consumer, job.entry.entry_id,
                                job.token, job.entry.job_id, "progress", progress, self.stages(job))
        except redis.RedisError as e:
            log(f"progress of {job.entry.job_id} not written: {e}")
            return last
        if word == "lost":
            job.halt("lost")
        elif word == "cancel":
            job.halt("cancel")
        return time.monotonic()

    def handle(self, job):
        payload = job.entry.payload
        opts = payload if isinstance(payload, dict) else {}
        sleep_ms = int(opts.get("py_sleep_ms", 0))
        steps = max(sleep_ms // 100, 1)
        last = 0.0
        for i in range(1, steps + 1):
            if job.stop.wait(sleep_ms / steps / 1000):
                raise Stopped()
            last = self.report(job, i, steps, last)
        if opts.get("py_fail") == "fatal":
            raise ValueError("simulated fatal failure")
        if opts.get("py_fail") == "retry":
            raise RuntimeError("simulated retryable failure")
        return {"echo": payload, "node": self.node}

    def run_job(self, job):
        try:
            result = self.handle(job)
        except Stopped:
            result = None
        except ValueError as e:
            job.returned = True
            self.commit(job, "failed", f"{type(e).__name__}: {e}")
            return
        except Exception as e:  # retryable
            job.returned = True
            err = f"{type(e).__name__}: {e}"
            cfg = self.config
            if job.attempt < job.entry.max_attempts:
                base = min(cfg["backoff_base_ms"] * 2 ** (job.attempt - 1), cfg["backoff_max_ms"])
                self.commit(job, "retry", err, delay=int(base * (0.75 + 0.5 * random.random())))
            else:
                self.commit(job, "dead", f"attempts exhausted ({job.attempt} of {job.entry.max_attempts}); "
                                         f"last error: {err}", reason="attempts_exhausted")
            return
        if result is not None and not job.stop.is_set():
            job.returned = True
            self.commit(job, "succeeded", json.dumps(result))
            return
        reason = job.stop_reason
        if reason == "cancel":
            self.commit(job, "cancelled", "")
        elif reason == "release":
            self.commit(job, "release", "")
        else:  # lost: another host holds it now; commit nothing
            log(f"job {job.entry.job_id} lost; not committed")
            self.forget(job)

    def forget(self, job):
        with self.changed:
            self.held.pop(job.entry.entry_id, None)
            self.read_ids.pop(job.entry.entry_id, None)
            self.changed.notify_all()
        self.busy_changed.set()

    def commit(self, job, outcome, data, delay=0, reason=""):
        """fleetq_complete for one entry, tried again until Redis answers (§17 step 6)."""
        values = [job.entry.entry_id, job.token, job.entry.job_id, outcome, data, str(delay), reason,
                  "", "", str(int((time.monotonic() - job.began) * 1000)), self.stages(job), str(job.attempt)]
        give_up = time.monotonic() + (2 * self.lease_ms / 1000 if outcome == "release" else 60)
        tried = False
        while True:
            try:
                (word,) = self.r.fcall("fleetq_complete", 1, self.stream, self.consumer, self.node, *values)
                break
            except (redis.ConnectionError, redis.TimeoutError) as e:
                if time.monotonic() > give_up:
                    log(f"cannot record {outcome} of {job.entry.job_id}: {e}; its lease will run out")
                    word = None
                    break
                tried = True
                time.sleep(0.2)
        if word == "fenced" and tried:
            # A retry after a lost reply: the first try may have recorded it.
            log(f"{outcome} of {job.entry.job_id} answered fenced after a retry; see its status")
        elif word == "fenced":
            log(f"{outcome} of {job.entry.job_id} fenced: another host holds it")
        else:
            log(f"{outcome} of {job.entry.job_id} recorded ({word})")
        self.forget(job)

    # ---- renew, heartbeat -----------------------------------------------------------------

    def renew_loop(self):
        period = self.lease_ms / 3000
        fence_after = (self.lease_ms - max(self.lease_ms / 5, 200)) / 1000
        while not self.background_stop.wait(period):
            with self.lock:
                jobs = list(self.held.values())
            if not jobs:
                continue
            args = [self.consumer, str(self.lease_ms), self.node]
            for j in jobs:
                args += [j.entry.entry_id, j.token, j.entry.job_id]
            try:
                words = self.renewer.fcall("fleetq_renew", 1, self.stream, *args)
            except redis.RedisError as e:
                log(f"renewal failed: {e}")
                words = None
            now = time.monotonic()
            for i, j in enumerate(jobs):
                word = words[i] if words else None
                if word in ("ok", "cancel"):
                    j.confirmed = now
                if word == "cancel":
                    j.halt("cancel")
                elif word == "lost":
                    j.halt("lost")
                elif not j.returned and now - j.confirmed > fence_after:
                    # Self-fencing: another host may take it over by now.
                    j.halt("release")

    def beat(self):
        busy = self.slots - self.free()
        fields = {"node": self.node, "queues": self.queue, "slots": self.slots, "busy": busy,
                  "version": VERSION, "consumer": self.consumer, "started_ms": self.started_ms,
                  "suspended_until": 0, "failure_streak": 0, "metrics_addr": ""}
        flat = [str(x) for kv in fields.items() for x in kv]
        command = self.r.fcall("fleetq_node_beat", 1, self.node_key, str(int(self.heartbeat * 3000)), *flat)
        if command:
            log(f"operator command {command!r} ignored: this worker does not suspend")

    def heartbeat_loop(self):
        self.started_ms = now_ms()
        while not self.background_stop.is_set():
            try:
                self.beat()
            except redis.RedisError as e:
                log(f"heartbeat failed: {e}")
            self.busy_changed.wait(self.heartbeat)
            self.busy_changed.clear()
        try:
            self.r.delete(self.node_key)
        except redis.RedisError as e:
            log(f"cannot delete the node record: {e}")

    # ---- loop and stop --------------------------------------------------------------------

    def run(self):
        self.start()
        next_reclaim = time.monotonic()
        while not self.stopping.is_set():
            try:
                if self.free() == 0:
                    with self.changed:
                        self.changed.wait(0.5)
                    continue
                if time.monotonic() >= next_reclaim:
                    claimed, wait = self.reclaim()
                    next_reclaim = time.monotonic() + wait
                    self.intake(claimed)
                    continue
                block_ms = min((next_reclaim - time.monotonic()) * 1000, self.lease_ms)
                self.intake(self.read(block=block_ms))
            except (redis.ConnectionError, redis.TimeoutError) as e:
                log(f"Redis unreachable ({e}); trying again")
                time.sleep(0.5)
                # What a lost reply may have delivered to this consumer: read it again.
                try:
                    self.intake([(e, f) for e, f in self.read(block=None, from_start=True)
                                 if e not in self.held])
                except redis.RedisError:
                    pass
        self.shutdown()

    def shutdown(self):
        log("stopping: no new jobs")
        deadline = time.monotonic() + self.grace
        with self.changed:
            while self.held and time.monotonic() < deadline:
                self.changed.wait(0.1)
            left = list(self.held.values())
        for job in left:
            job.halt("release")  # its thread commits release with its token
        deadline = time.monotonic() + 5
        with self.changed:
            while self.held and time.monotonic() < deadline:
                self.changed.wait(0.1)
        self.background_stop.set()
        self.busy_changed.set()
        for t in self.threads:
            t.join(timeout=5)
        # Entries read but never taken: release them without a token (§17 step 7).
        pending = self.r.xpending_range(self.stream, GROUP, "-", "+", 10000, consumername=self.consumer)
        for p in pending:
            entry_id = p["message_id"]
            job_id = self.read_ids.get(entry_id)
            if job_id is None:
                rows = entries_of([(b"", self.reader.execute_command("XRANGE", self.stream, entry_id, entry_id))])
                job_id = Entry(entry_id, rows[0][1], 1 << 62).job_id if rows else entry_id
            (word,) = self.r.fcall("fleetq_complete", 1, self.stream, self.consumer, self.node, entry_id, "",
                                   job_id, "release", "", "0", "", "", "", "0", "", "0")
            log(f"released unstarted entry {entry_id} ({word})")
        if not self.r.xpending_range(self.stream, GROUP, "-", "+", 1, consumername=self.consumer):
            self.r.xgroup_delconsumer(self.stream, GROUP, self.consumer)
        log("stopped")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queue", required=True)
    ap.add_argument("--node", required=True)
    ap.add_argument("--slots", type=int, default=2)
    ap.add_argument("--grace-secs", type=float, default=0.0)
    ap.add_argument("--heartbeat-secs", type=float, default=10.0)
    args = ap.parse_args()
    w = Worker(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379"), args.queue, args.node,
               args.slots, args.grace_secs, args.heartbeat_secs)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: w.stopping.set())
    w.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
