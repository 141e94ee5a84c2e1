#!/usr/bin/env python3
"""A simulated GPU model server for exercising the fleetq worker.

It speaks the child protocol through fleetq_child and can misbehave on demand:
hang, crash, fail, or write garbage to stdout. Flags set the behaviour for
every job; a dict payload can set it per job with these keys:

    "steps": int, "step_ms": int, "stage": str   override --steps/--step-ms
    "fail": "retry" | "fatal"                    like --fail / --fail-fatal
    "crash": true                                like --crash-mid-run
    "hang": "before_start" | "mid_run"           like --hang-before-start / --hang-mid-run
    "garbage": true                              like --garbage

The result is {"echo": <payload as received>, "steps": N, "pid": <pid>,
"jobs_done": <jobs this process has finished, including this one>}.
Nothing in the payload is ever executed.

    python3 sim_gpu.py --load-ms 2000 --steps 20 --step-ms 50
"""

import argparse
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fleetq_child  # noqa: E402
from fleetq_child import JobError  # noqa: E402

jobs_done = 0


def sleep_forever():
    threading.Event().wait()


def int_option(payload, key, default):
    value = payload.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise JobError(f"payload {key!r} must be a non-negative integer", retryable=False)
    return value


def make_handler(args):
    def handle(job):
        global jobs_done
        # print() lands on stderr: fleetq_child keeps stdout for the protocol.
        print(f"sim_gpu: job {job.id} attempt {job.attempt}", flush=True)

        opts = job.payload if isinstance(job.payload, dict) else {}
        steps = int_option(opts, "steps", args.steps)
        step_ms = int_option(opts, "step_ms", args.step_ms)
        stage = str(opts.get("stage", "sampling"))
        hang = opts.get("hang") or ("before_start" if args.hang_before_start
                                    else "mid_run" if args.hang_mid_run else None)
        crash = opts.get("crash") is True or args.crash_mid_run
        fail = opts.get("fail") or ("fatal" if args.fail_fatal else "retry" if args.fail else None)
        garbage = opts.get("garbage") is True or args.garbage
        if hang not in (None, "before_start", "mid_run"):
            raise JobError(f"payload 'hang' must be 'before_start' or 'mid_run', not {hang!r}",
                           retryable=False)
        if fail not in (None, "retry", "fatal"):
            raise JobError(f"payload 'fail' must be 'retry' or 'fatal', not {fail!r}", retryable=False)

        if hang == "before_start":
            sleep_forever()

        job.started()
        if garbage:
            # Not a protocol line: the worker should treat this as an error.
            fleetq_child._write_raw("loading weights 42%")

        if hang == "mid_run" or crash:
            # One step of real progress, then never finish.
            time.sleep(step_ms / 1000)
            job.progress(step=1, total=max(steps, 1), stage=stage)
            if hang == "mid_run":
                sleep_forever()
            print(f"sim_gpu: crashing on job {job.id}", flush=True)
            os._exit(3)

        for i in range(1, steps + 1):
            time.sleep(step_ms / 1000)
            job.progress(step=i, total=steps, stage=stage)

        if fail in ("retry", "fatal"):
            raise JobError("simulated failure", retryable=(fail == "retry"))

        jobs_done += 1
        return {"echo": job.payload, "steps": steps, "pid": os.getpid(), "jobs_done": jobs_done}

    return handle


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--load-ms", type=int, default=0, help="simulated model load time at start")
    p.add_argument("--steps", type=int, default=5, help="progress steps per job")
    p.add_argument("--step-ms", type=int, default=100, help="sleep before each step")
    p.add_argument("--hang-before-start", action="store_true", help="take the job, never start")
    p.add_argument("--hang-mid-run", action="store_true", help="hang after the first step")
    p.add_argument("--crash-mid-run", action="store_true", help="exit(3) after the first step")
    p.add_argument("--fail", action="store_true", help="retryable error after the steps")
    p.add_argument("--fail-fatal", action="store_true", help="non-retryable error after the steps")
    p.add_argument("--garbage", action="store_true", help="write a non-JSON line to stdout")
    args = p.parse_args()

    if args.load_ms > 0:
        print(f"sim_gpu: loading model ({args.load_ms} ms)", file=sys.stderr, flush=True)
        time.sleep(args.load_ms / 1000)
    fleetq_child.serve(make_handler(args))


if __name__ == "__main__":
    main()
