"""Tests for fleetq_child, driving sim_gpu.py as a real child process.

    cd examples/python && python3 -m unittest test_fleetq_child
"""

import json
import os
import subprocess
import sys
import tempfile
import textwrap
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
SIM_GPU = os.path.join(HERE, "sim_gpu.py")


def job_line(job_id, payload, attempt=1):
    msg = {"type": "job", "id": job_id, "queue": "gpu", "payload": payload,
           "attempt": attempt, "max_attempts": 3, "deadline_ms": None}
    return json.dumps(msg) + "\n"


def run_child(argv, stdin_text, timeout=20):
    """Feed stdin_text, close stdin, and return (returncode, stdout lines, stderr)."""
    proc = subprocess.run(argv, input=stdin_text, capture_output=True, text=True,
                          timeout=timeout, cwd=HERE)
    return proc.returncode, proc.stdout.splitlines(), proc.stderr


def run_sim(flags, stdin_text):
    return run_child([sys.executable, SIM_GPU, "--step-ms", "1", *flags], stdin_text)


def parse(lines):
    """Every stdout line must be a JSON protocol message."""
    return [json.loads(line) for line in lines]


class SimGpuTest(unittest.TestCase):
    def test_happy_path_echoes_payload_verbatim(self):
        with tempfile.TemporaryDirectory() as tmp:
            marker = os.path.join(tmp, "pwned")
            payload = {"cmd": f"$(touch {marker}); `id`; rm -rf / | cat",
                       "quotes": "'\"\\", "unicode": "caf\u00e9 \u2603", "nested": [1, None, True]}
            code, out, err = run_sim(["--steps", "3"], job_line("j1", payload))
            self.assertFalse(os.path.exists(marker), "payload was executed")

        self.assertEqual(code, 0, err)
        msgs = parse(out)
        self.assertEqual([m["type"] for m in msgs], ["started"] + ["progress"] * 3 + ["result"])
        self.assertEqual([(m["step"], m["total"], m["stage"]) for m in msgs[1:4]],
                         [(1, 3, "sampling"), (2, 3, "sampling"), (3, 3, "sampling")])
        result = msgs[-1]["result"]
        self.assertEqual(result["echo"], payload)
        self.assertEqual(result["steps"], 3)
        self.assertEqual(result["jobs_done"], 1)
        self.assertIn("sim_gpu: job j1 attempt 1", err)

    def test_fail_flags(self):
        for flag, retryable in (("--fail", True), ("--fail-fatal", False)):
            with self.subTest(flag=flag):
                code, out, err = run_sim(["--steps", "2", flag], job_line("j1", {}))
                self.assertEqual(code, 0, err)
                msgs = parse(out)
                self.assertEqual([m["type"] for m in msgs], ["started", "progress", "progress", "error"])
                self.assertEqual(msgs[-1], {"type": "error", "message": "simulated failure",
                                            "retryable": retryable})

    def test_one_child_many_jobs_with_per_job_behaviour(self):
        jobs = (job_line("a", {"steps": 1}) + job_line("b", {"steps": 0, "fail": "fatal"}, attempt=2)
                + job_line("c", {"steps": 0}))
        code, out, err = run_sim([], jobs)
        self.assertEqual(code, 0, err)
        finals = [m for m in parse(out) if m["type"] in ("result", "error")]
        self.assertEqual([m["type"] for m in finals], ["result", "error", "result"])
        self.assertFalse(finals[1]["retryable"])
        self.assertEqual(finals[0]["result"]["pid"], finals[2]["result"]["pid"])
        self.assertEqual([finals[0]["result"]["jobs_done"], finals[2]["result"]["jobs_done"]], [1, 2])
        self.assertIn("sim_gpu: job b attempt 2", err)

    def test_crash_mid_run(self):
        code, out, err = run_sim(["--crash-mid-run"], job_line("j1", {}))
        self.assertEqual(code, 3, err)
        self.assertEqual([m["type"] for m in parse(out)], ["started", "progress"])

    def test_garbage_flag_writes_non_json_to_stdout(self):
        code, out, err = run_sim(["--steps", "0", "--garbage"], job_line("j1", {}))
        self.assertEqual(code, 0, err)
        self.assertIn("loading weights 42%", out)

    def test_eof_without_jobs_exits_zero(self):
        code, out, err = run_sim(["--load-ms", "10"], "")
        self.assertEqual((code, out), (0, []), err)

    def test_garbage_input_exits_2(self):
        code, out, err = run_sim([], job_line("j1", {"steps": 0}) + "this is not json\n"
                                 + job_line("j2", {}))
        self.assertEqual(code, 2, err)
        self.assertEqual([m["type"] for m in parse(out)], ["started", "result"])
        self.assertIn("not valid JSON", err)

    def test_non_job_object_exits_2(self):
        code, out, err = run_sim([], '{"type":"ping"}\n')
        self.assertEqual((code, out), (2, []), err)


# A tiny model server that misbehaves in ways sim_gpu does not.
NOISY_CHILD = textwrap.dedent("""
    import os, sys, subprocess
    import fleetq_child

    def handle(job):
        kind = job.payload["kind"]
        print("print from the model")                # Python-level stdout
        os.write(1, b"raw write to fd 1\\n")         # native-level stdout
        subprocess.run([sys.executable, "-c", "print('from a subprocess')"])
        job.started()
        job.started()                                # sent once
        if kind == "set":
            return {1, 2}                            # not JSON-serialisable
        if kind == "boom":
            raise KeyError("missing")
        return {"stdin": sys.stdin.read()}           # user code sees no jobs

    fleetq_child.serve(handle)
""")


class HelperTest(unittest.TestCase):
    def run_noisy(self, *kinds):
        jobs = "".join(job_line(f"j{i}", {"kind": k}) for i, k in enumerate(kinds))
        return run_child([sys.executable, "-c", NOISY_CHILD], jobs)

    def test_user_output_goes_to_stderr(self):
        code, out, err = self.run_noisy("ok", "ok")
        self.assertEqual(code, 0, err)
        msgs = parse(out)  # fails if any stray text reached stdout
        self.assertEqual(msgs, [{"type": "started"}, {"type": "result", "result": {"stdin": ""}}] * 2)
        for text in ("print from the model", "raw write to fd 1", "from a subprocess"):
            self.assertIn(text, err)

    def test_unserialisable_result_and_unexpected_exception(self):
        code, out, err = self.run_noisy("set", "boom")
        self.assertEqual(code, 0, err)
        errors = [m for m in parse(out) if m["type"] == "error"]
        self.assertEqual(len(errors), 2)
        self.assertFalse(errors[0]["retryable"])
        self.assertIn("not JSON-serialisable", errors[0]["message"])
        self.assertEqual(errors[1], {"type": "error", "message": "KeyError: 'missing'", "retryable": True})
        self.assertIn("Traceback", err)


if __name__ == "__main__":
    unittest.main()
