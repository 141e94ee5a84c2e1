//! `fleetq demo` as a script or a log file sees it: stdout to a pipe, from a clean environment
//! (the demo starts its own redis-server). Plain lines and one summary that tells each
//! incident — the hung node and the timeout that caught it, the crashing child, the dead
//! host's jobs and who finished them, the suspensions — with no terminal codes and no log
//! lines of the in-process services (they go to the log file the summary names); and the
//! `--json` form as one document with the incidents.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Stdio;
use std::time::{Duration, Instant};

use fleetq_tests::bin_path;
use serde_json::Value;

/// The demo's own limit is 55 s; on two loaded cores it takes well under that.
const DEMO_DEADLINE: Duration = Duration::from_secs(90);

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs `fleetq demo ARGS` with stdout and stderr to pipes, RUST_LOG as given.
async fn demo(args: &[&str], rust_log: Option<&str>) -> Run {
    let mut cmd = tokio::process::Command::new(bin_path("fleetq"));
    cmd.arg("demo")
        .args(args)
        .env_remove("REDIS_URL")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(filter) = rust_log {
        cmd.env("RUST_LOG", filter);
    }
    let started = Instant::now();
    let out = tokio::time::timeout(DEMO_DEADLINE, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("fleetq demo {args:?} did not end within {DEMO_DEADLINE:?}"))
        .unwrap();
    eprintln!("fleetq demo {args:?} took {:?}", started.elapsed());
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Log lines as the tracing formatter writes them (level between spaces).
fn log_lines(text: &str) -> Vec<&str> {
    text.lines()
        .filter(|l| {
            [" TRACE ", " DEBUG ", " INFO ", " WARN ", " ERROR "]
                .iter()
                .any(|lvl| l.contains(lvl))
        })
        .collect()
}

fn count(text: &str, needle: &str) -> usize {
    text.matches(needle).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn piped_demo_prints_plain_lines_and_one_summary_that_tells_each_incident() {
    // Logging on: the services' lines must still go to the log file, not to the output.
    let r = demo(&[], Some("info")).await;
    let all = format!("stdout:\n{}\nstderr:\n{}", r.stdout, r.stderr);
    assert_eq!(r.code, Some(0), "{all}");
    let out = &r.stdout;

    // Plain text: no escape sequence (cursor movement, clearing, colour), no log lines.
    assert!(!out.contains('\u{1b}'), "an escape code in stdout:\n{all}");
    assert!(
        !r.stderr.contains('\u{1b}'),
        "an escape code in stderr:\n{all}"
    );
    assert!(log_lines(out).is_empty(), "log lines in stdout:\n{all}");
    assert!(
        log_lines(&r.stderr).is_empty(),
        "log lines in stderr:\n{all}"
    );
    let progress = out
        .lines()
        .filter(|l| l.contains("jobs ended after"))
        .count();
    assert!((1..=4).contains(&progress), "a few progress lines:\n{all}");

    // One summary.
    assert_eq!(count(out, "fleetq demo: 24 jobs on queue"), 1, "{all}");
    assert_eq!(count(out, "fleetq demo: 24 jobs in "), 1, "{all}");
    assert_eq!(count(out, "what happened\n"), 1, "{all}");
    assert_eq!(count(out, "every job ended exactly once: yes"), 1, "{all}");
    assert!(
        out.trim_end()
            .lines()
            .last()
            .unwrap()
            .starts_with("logs of the broker and workers: "),
        "{all}"
    );

    // The hung node, the timeout that caught it, after how long.
    assert!(
        out.lines().any(|l| l.contains("gpu-3 hung on job ")
            && l.contains(": the progress timeout caught it after ")
            && l.contains("retried on gpu-")),
        "{all}"
    );
    // The crashing child, its job retried on another node.
    assert!(
        out.lines()
            .any(|l| l.contains("gpu-4's child crashed on job ")
                && l.contains("exited")
                && l.contains("retried on gpu-")
                && !l.contains("retried on gpu-4")),
        "{all}"
    );
    // The dead host: which jobs it held, who took them over, how fast, how they ended.
    let death = out
        .lines()
        .find(|l| l.contains("gpu-5's host died at "))
        .unwrap_or_else(|| panic!("no death told:\n{all}"));
    let held: Vec<&str> = death
        .split_once(" job: ")
        .or_else(|| death.split_once(" jobs: "))
        .unwrap_or_else(|| panic!("the dead host held no job:\n{all}"))
        .1
        .split(", ")
        .collect();
    for job in held {
        let line = out
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("job {job}: ")))
            .unwrap_or_else(|| panic!("job {job} of the dead host not told:\n{all}"));
        assert!(
            line.contains("the broker put it back in line") || line.contains("its lease ran out"),
            "{line}"
        );
        assert!(
            line.contains(" took it over ") && line.contains("after the death"),
            "{line}"
        );
        assert!(line.contains("succeeded on gpu-"), "{line}");
        assert!(!line.contains("succeeded on gpu-5"), "{line}");
    }
    // The suspensions: which node, for how long, why.
    for node in ["gpu-3", "gpu-4"] {
        assert!(
            out.lines()
                .any(|l| l.contains(&format!("{node} suspended itself at "))
                    && l.contains(" for 120 s: ")
                    && l.contains("in a row")),
            "{all}"
        );
    }
    // The node table: no column that says only "suspended itself", no dead host without a
    // word.
    let row = |node: &str| {
        out.lines()
            .find(|l| l.starts_with(&format!("│ {node} ")))
            .unwrap_or_else(|| panic!("no table row of {node} with its incidents:\n{all}"))
    };
    assert!(row("gpu-3").contains("progress timeout"), "{all}");
    assert!(row("gpu-3").contains("suspended itself for 120 s"), "{all}");
    assert!(row("gpu-4").contains("child crash"), "{all}");
    assert!(row("gpu-5").contains("host died holding "), "{all}");

    // The services' log lines went to the file the summary names.
    let path = out
        .lines()
        .last()
        .unwrap()
        .trim_start_matches("logs of the broker and workers: ")
        .to_owned();
    let log = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}\n{all}"));
    let _ = std::fs::remove_file(&path);
    assert!(
        log.contains(" INFO ") && log.contains("worker started"),
        "{log}"
    );
    assert!(log.contains("node suspended"), "{log}");
    assert!(
        !log.contains('\u{1b}'),
        "escape codes in the log file:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_json_is_one_document_with_the_incidents() {
    let r = demo(&["--json"], None).await;
    let all = format!("stdout:\n{}\nstderr:\n{}", r.stdout, r.stderr);
    assert_eq!(r.code, Some(0), "{all}");
    let s: Value = serde_json::from_str(&r.stdout)
        .unwrap_or_else(|e| panic!("not one JSON document ({e}):\n{all}"));
    for key in [
        "queue",
        "jobs",
        "outcomes",
        "wait_ms",
        "per_node",
        "timeouts",
        "timeouts_by_node",
        "reclaims",
        "retries",
        "suspended_nodes",
        "incidents",
        "exactly_once",
        "duration_s",
        "log_file",
    ] {
        assert!(s.get(key).is_some(), "no {key}:\n{all}");
    }
    assert_eq!(s["exactly_once"], true);
    let i = &s["incidents"];
    let list = |k: &str| {
        i[k].as_array()
            .unwrap_or_else(|| panic!("no incidents.{k}:\n{all}"))
            .clone()
    };

    let hang = list("timeouts")
        .into_iter()
        .find(|t| t["node"] == "gpu-3" && t["kind"] == "progress")
        .unwrap_or_else(|| panic!("no progress timeout of gpu-3:\n{all}"));
    assert!(
        hang["after_ms"].as_u64().unwrap() >= 1500,
        "the queue's progress timeout is 1.5 s: {hang}"
    );
    assert_eq!(hang["ended"], "succeeded");
    assert!(s["timeouts_by_node"]["gpu-3"]["progress"].as_i64().unwrap() >= 1);

    let crash = list("crashes")
        .into_iter()
        .find(|c| c["node"] == "gpu-4")
        .unwrap_or_else(|| panic!("no crash of gpu-4:\n{all}"));
    assert!(
        crash["error"].as_str().unwrap().contains("exited"),
        "{crash}"
    );
    assert_ne!(crash["retried_on"], "gpu-4");
    assert!(crash["retried_on"].is_string(), "{crash}");

    let dead = list("dead_hosts");
    assert_eq!(dead.len(), 1, "{all}");
    assert_eq!(dead[0]["node"], "gpu-5");
    let held = dead[0]["jobs"].as_array().unwrap();
    assert!(!held.is_empty(), "the host died with a job in hand:\n{all}");
    for j in held {
        assert!(
            ["connections_closed", "lease_expired"].contains(&j["how"].as_str().unwrap()),
            "{j}"
        );
        assert!(j["taken_by"].is_string() && j["taken_by"] != "gpu-5", "{j}");
        assert!(j["taken_after_ms"].as_u64().is_some(), "{j}");
        assert_eq!(j["ended"], "succeeded", "{j}");
    }

    let suspended: Vec<Value> = list("suspensions");
    for node in ["gpu-3", "gpu-4"] {
        let x = suspended
            .iter()
            .find(|x| x["node"] == node)
            .unwrap_or_else(|| panic!("no suspension of {node}:\n{all}"));
        assert!(x["reason"].as_str().unwrap().contains("in a row"), "{x}");
        assert!(x["for_ms"].as_u64().unwrap() > 100_000, "{x}");
    }
    let _ = std::fs::remove_file(s["log_file"].as_str().unwrap());
}
