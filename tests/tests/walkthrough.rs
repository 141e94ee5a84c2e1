//! The README's 5-minute walkthrough, run line by line as a reader would paste it into one
//! shell: its own Redis (a free port instead of 6390, a temporary data directory instead of
//! /tmp/fleetq-walkthrough), the broker (a free port instead of 8080), two workers with the
//! Python child, a job watched, its host killed mid-job, the job finished by the other node.
//! Only the build line is left out (the harness builds the binaries) and the binaries' folder
//! is the harness's.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fleetq_tests::{bin_path, free_port, signal_group};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .into()
}

/// The lines of the walkthrough's `sh` block.
fn walkthrough() -> String {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let from = readme
        .find("## A 5-minute walkthrough")
        .expect("README has the walkthrough");
    let block = &readme[from..];
    let start = block.find("```sh\n").expect("its sh block") + "```sh\n".len();
    let len = block[start..].find("```").expect("the block's end");
    block[start..start + len].to_owned()
}

/// Shuts the walkthrough's Redis down however the test ends.
struct RedisGuard(u16);

impl Drop for RedisGuard {
    fn drop(&mut self) {
        let _ = Command::new("redis-cli")
            .args(["-p", &self.0.to_string(), "shutdown", "nosave"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

#[test]
fn every_walkthrough_line_works_as_written() {
    let script = walkthrough();
    assert!(script.starts_with("cargo build --release\n"), "{script}");
    let bins = bin_path("fleetq").parent().unwrap().to_owned();
    bin_path("fleetq-broker");
    let dir = tempfile::tempdir().unwrap();
    let (redis_port, http_port) = (free_port(), free_port());
    let _redis = RedisGuard(redis_port);
    let script = script
        .replacen("cargo build --release\n", "", 1)
        .replace("$PWD/target/release", &bins.display().to_string())
        .replace("/tmp/fleetq-walkthrough", &dir.path().display().to_string())
        .replace("6390", &redis_port.to_string())
        .replace("127.0.0.1:8080", &format!("127.0.0.1:{http_port}"));
    let mut child = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(root())
        .env("FLEETQ_LISTEN", format!("127.0.0.1:{http_port}"))
        .env_remove("REDIS_URL")
        .env_remove("FLEETQ_QUEUE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    let started = Instant::now();
    let pgid = child.id();
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        stdout.read_to_string(&mut s).unwrap();
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        stderr.read_to_string(&mut s).unwrap();
        s
    });
    let limit = Duration::from_secs(120);
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > limit {
            signal_group(pgid, libc::SIGKILL);
            break;
        }
        std::thread::sleep(Duration::from_millis(100)); // polling a child process we started
    }
    let _ = child.wait();
    // Whatever the walkthrough left behind (it stops its own jobs in step 9).
    signal_group(pgid, libc::SIGKILL);
    let (out, err) = (out.join().unwrap(), err.join().unwrap());
    let logs: String = ["broker.log", "gpu-1.log", "gpu-2.log"]
        .iter()
        .map(|f| {
            let text = std::fs::read_to_string(dir.path().join(f)).unwrap_or_default();
            format!("--- {f}\n{}\n", tail(&text, 3000))
        })
        .collect();
    let all = format!("stdout:\n{out}\nstderr:\n{err}\n{logs}");
    assert!(
        started.elapsed() < limit,
        "the walkthrough did not end within {limit:?}\n{all}"
    );

    assert!(!err.contains("kill: usage"), "step 6 found no pid:\n{all}");
    // What the job's record says, from the walkthrough's own data (its Redis started again
    // on its directory): it succeeded on its second attempt, the two nodes one after the other.
    // Step 9 stopped Redis: its port is closed.
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", redis_port)).is_err(),
        "the walkthrough's Redis still runs after step 9\n{all}"
    );
    let again = Command::new("redis-server")
        .args(["--port", &redis_port.to_string(), "--dir"])
        .arg(dir.path())
        .args(["--appendonly", "yes", "--daemonize", "yes", "--logfile"])
        .arg(dir.path().join("redis-again.log"))
        .status()
        .unwrap();
    assert!(again.success());
    let client = redis::Client::open(format!("redis://127.0.0.1:{redis_port}")).unwrap();
    let record: std::collections::HashMap<String, String> = (0..100)
        .find_map(|_| {
            let mut c = client.get_connection().ok()?;
            let m: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
                .arg("fleetq:{images}:job:fox-1")
                .query(&mut c)
                .ok()?;
            Some(m)
        })
        .expect("the walkthrough's Redis back on its data");
    let field = |f: &str| record.get(f).map(String::as_str).unwrap_or("");
    assert_eq!(field("state"), "succeeded", "{record:?}\n{all}");
    assert_eq!(field("attempts"), "2", "{record:?}\n{all}");
    let nodes: Vec<&str> = field("nodes").split(',').collect();
    assert!(
        nodes == ["gpu-1", "gpu-2"] || nodes == ["gpu-2", "gpu-1"],
        "{record:?}\n{all}"
    );
    // Step 8: `top --json` printed one JSON document, with the one node left.
    let top: serde_json::Value = out
        .match_indices("\n{")
        .find_map(|(at, _)| {
            serde_json::Deserializer::from_str(&out[at..])
                .into_iter::<serde_json::Value>()
                .next()?
                .ok()
        })
        .unwrap_or_else(|| panic!("no JSON document from `fleetq top --json`:\n{all}"));
    let nodes = top["nodes"].as_array().map(Vec::len);
    assert_eq!(nodes, Some(1), "{top}\n{all}");
    // The metrics line, from the broker on its port.
    assert!(out.contains("fleetq_queue_waiting{"), "{all}");
    // Nothing written into the checkout.
    assert!(!root().join("appendonlydir").exists());
}

fn tail(s: &str, n: usize) -> &str {
    let mut at = s.len().saturating_sub(n);
    while !s.is_char_boundary(at) {
        at += 1;
    }
    &s[at..]
}
