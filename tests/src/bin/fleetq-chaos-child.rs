//! `fleetq-chaos-child`: a process-executor child for the chaos suite. For each job line on
//! stdin (`{"type":"job","id":…,"payload":{"ms":N}}`) it appends `<id> <pid> start` to the
//! executions log named by `FLEETQ_CHAOS_LOG`, sends `started`, sleeps N ms, appends
//! `<id> <pid> end` and sends the result. EOF on stdin: exit 0.

use std::io::{BufRead, Write};
use std::time::Duration;

fn main() -> anyhow::Result<()> {
    let log_path = std::env::var(fleetq_tests::chaos::EXEC_LOG_ENV)?;
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)?;
    let pid = std::process::id();
    let stdout = std::io::stdout();
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let job: serde_json::Value = serde_json::from_str(&line)?;
        let id = job["id"].as_str().unwrap_or_default().to_owned();
        let ms = job["payload"]["ms"].as_u64().unwrap_or(0);
        // One write per line on an O_APPEND file: lines of concurrent children never mix.
        log.write_all(format!("{id} {pid} start\n").as_bytes())?;
        let mut out = stdout.lock();
        writeln!(out, r#"{{"type":"started"}}"#)?;
        out.flush()?;
        std::thread::sleep(Duration::from_millis(ms));
        log.write_all(format!("{id} {pid} end\n").as_bytes())?;
        let reply = serde_json::json!({"type": "result", "result": {"slept_ms": ms, "pid": pid}});
        writeln!(out, "{reply}")?;
        out.flush()?;
    }
    Ok(())
}
