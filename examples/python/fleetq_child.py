"""Child-side helper for the fleetq worker protocol (standard library only).

A fleetq worker runs jobs in a long-lived child process. The two talk JSON
lines: the worker writes one job per line on the child's stdin, and the child
answers on stdout with ``started``, any number of ``progress`` lines, then
exactly one ``result`` or ``error`` line per job. EOF on stdin means "finish
and exit 0". Anything else on stdout is a protocol error and the worker kills
the child, so this module keeps stdout clean for you:

* while ``serve()`` runs, ``sys.stdout`` points at stderr, and so does file
  descriptor 1 (native libraries and subprocesses that write to fd 1 land on
  stderr too); protocol lines go through a private handle on the real stdout;
* file descriptor 0 is pointed at /dev/null, so user code that reads stdin
  cannot swallow job lines; jobs are read from a private handle.

The payload only ever arrives on stdin, never in argv or the environment.

API
---
``Job``
    ``id``, ``queue``, ``payload``, ``attempt``, ``max_attempts``,
    ``deadline_ms`` (milliseconds since the epoch, or None), plus
    ``started()`` (sent at most once) and
    ``progress(step=None, total=None, stage=None, message=None)``.
``JobError(message, retryable=True)``
    Raise it from a handler to report an error with an explicit retry flag.
    Any other exception is reported as ``"<Type>: <message>"``, retryable,
    with the traceback on stderr.
``serve(handler)``
    Calls ``handler(job)`` for each job; its return value (which must be
    JSON-serialisable) becomes the result. Returns on EOF. Exits with status
    2 on a line that is not a valid job (blank lines are ignored).

Example::

    import fleetq_child

    model = load_model()              # may print(); that goes to stderr

    def handle(job):
        job.started()
        for i in range(1, 21):
            run_step(model, job.payload)
            job.progress(step=i, total=20, stage="sampling")
        if out_of_memory():
            raise fleetq_child.JobError("CUDA out of memory", retryable=True)
        return {"image": "s3://bucket/out.png"}

    if __name__ == "__main__":
        fleetq_child.serve(handle)
"""

import json
import os
import sys
import threading
import traceback

__all__ = ["Job", "JobError", "serve"]

# Private handles on the real stdin/stdout; only set while serve() runs.
_in = None
_out = None
_write_lock = threading.Lock()


class JobError(Exception):
    """Raised by a handler to report a job error with an explicit retry flag."""

    def __init__(self, message, retryable=True):
        super().__init__(message)
        self.message = str(message)
        self.retryable = bool(retryable)


def _log(text):
    print(f"fleetq_child: {text}", file=sys.stderr, flush=True)


def _write_raw(text):
    """Write ``text`` plus a newline to the real stdout and flush.

    Every protocol line goes through here. It is also a deliberate hook for
    tests that need to put something that is *not* a protocol line on stdout
    (see sim_gpu.py --garbage); normal code should never call it directly.
    """
    if _out is None:
        raise RuntimeError("fleetq_child: serve() is not running")
    data = text.encode("utf-8") + b"\n"
    with _write_lock:  # handlers may report progress from other threads
        _out.write(data)
        _out.flush()


def _send(msg):
    # ensure_ascii keeps the line pure ASCII (safe for any payload string);
    # allow_nan=False refuses NaN/Infinity, which are not valid JSON.
    _write_raw(json.dumps(msg, ensure_ascii=True, allow_nan=False, separators=(",", ":")))


class Job:
    """One job as received from the worker."""

    def __init__(self, msg):
        self.id = msg["id"]
        self.queue = msg.get("queue", "")
        self.payload = msg.get("payload")
        self.attempt = msg.get("attempt", 1)
        self.max_attempts = msg.get("max_attempts", 1)
        self.deadline_ms = msg.get("deadline_ms")
        self._started = False
        self._open = True  # False once the result/error has been sent

    def __repr__(self):
        return f"Job(id={self.id!r}, queue={self.queue!r}, attempt={self.attempt})"

    def _check_open(self, what):
        if not self._open:
            _log(f"ignoring {what}() for job {self.id}: it already finished")
        return self._open

    def started(self):
        """Report that the work really began. Only the first call is sent."""
        if self._check_open("started") and not self._started:
            self._started = True
            _send({"type": "started"})

    def progress(self, step=None, total=None, stage=None, message=None):
        """Report progress; fields left as None are omitted."""
        if not self._check_open("progress"):
            return
        msg = {"type": "progress"}
        for key, value in (("step", step), ("total", total), ("stage", stage), ("message", message)):
            if value is not None:
                msg[key] = value
        _send(msg)


def _parse_job(line):
    """Return a Job, or an explanation (str) of why ``line`` is not one."""
    try:
        msg = json.loads(line)
    except ValueError as e:
        return f"input is not valid JSON ({e}): {line[:200]!r}"
    if not isinstance(msg, dict) or msg.get("type") != "job":
        return f'input is not a {{"type":"job"}} object: {line[:200]!r}'
    if not isinstance(msg.get("id"), str):
        return f"job has no string id: {line[:200]!r}"
    return Job(msg)


def _run_one(handler, job):
    """Call the handler and send exactly one result or error line."""
    try:
        value = handler(job)
    except JobError as e:
        reply = {"type": "error", "message": e.message, "retryable": e.retryable}
    except Exception as e:
        traceback.print_exc(file=sys.stderr)
        reply = {"type": "error", "message": f"{type(e).__name__}: {e}", "retryable": True}
    else:
        reply = {"type": "result", "result": value}
        try:
            json.dumps(reply, allow_nan=False)
        except (TypeError, ValueError) as e:
            reply = {
                "type": "error",
                "message": f"handler returned a value that is not JSON-serialisable: {e}",
                "retryable": False,
            }
    job._open = False
    _send(reply)


def serve(handler):
    """Run ``handler(job)`` for every job on stdin until EOF, then return."""
    global _in, _out
    if _out is not None:
        raise RuntimeError("fleetq_child: serve() is already running")

    # Take private copies of fd 0 and fd 1 (os.dup makes them non-inheritable),
    # then point fd 0 at /dev/null and fd 1 at stderr for everything else.
    sys.stdout.flush()
    saved_in, saved_out = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    old_stdout = sys.stdout
    sys.stdout = sys.stderr
    _in = os.fdopen(saved_in, "rb")
    _out = os.fdopen(saved_out, "wb")

    try:
        while True:
            raw = _in.readline()
            if not raw:
                return  # EOF: the worker wants us to finish
            line = raw.decode("utf-8", errors="replace").strip()
            if not line:
                continue
            job = _parse_job(line)
            if isinstance(job, str):
                _log(f"protocol error: {job}")
                sys.exit(2)
            _run_one(handler, job)
    finally:
        # Put the real stdin/stdout back so the process is left as found.
        sys.stderr.flush()
        os.dup2(_in.fileno(), 0)
        os.dup2(_out.fileno(), 1)
        _in.close()
        _out.close()
        _in = _out = None
        sys.stdout = old_stdout
