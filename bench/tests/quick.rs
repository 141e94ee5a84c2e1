//! Runs the benchmark suite in its `--quick` mode so it cannot rot: every scenario runs and
//! every job succeeds exactly once. Speed is reported, never asserted.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_benchmark_runs_every_scenario_correctly() {
    let opts = fleetq_bench::Options {
        quick: true,
        worker_exe: env!("CARGO_BIN_EXE_fleetq-bench").into(),
    };
    let report = fleetq_bench::run(&opts).await.unwrap();
    assert!(report.problems().is_empty(), "{:?}", report.problems());
    let json = report.to_json();
    for key in [
        "enqueue_jobs_per_sec",
        "e2e_jobs_per_sec",
        "floor_jobs_per_sec",
        "redis_cmds_per_job",
        "redis_cpu_us_per_job",
        "floor_redis_cpu_us_per_job",
        "redis_bytes_per_waiting_job",
        "idle_cmds_per_worker_per_sec",
        "dispatch_p50_ms",
        "dispatch_p99_ms",
        "recovery_kill_s",
        "recovery_hang_s",
    ] {
        assert!(
            json.get(key).is_some_and(|v| !v.is_null()),
            "{key} missing from {json}"
        );
    }
    for key in ["server_cmds_per_job_by_step", "redis_cpu_us_by_step"] {
        let by_step = &json[key];
        for step in ["enqueue", "take", "complete", "maintenance"] {
            assert!(
                by_step[step].is_number(),
                "{key}.{step} missing from {json}"
            );
        }
        // Every job is enqueued, taken and completed: each of those steps costs something.
        for step in ["enqueue", "take", "complete"] {
            assert!(
                by_step[step].as_f64() > Some(0.0),
                "{key}.{step} is 0 in {json}"
            );
        }
    }
    let sweep: Vec<u64> = json["payload_sweep"]
        .as_array()
        .expect("payload_sweep")
        .iter()
        .filter_map(|r| r["payload_bytes"].as_u64())
        .collect();
    assert_eq!(sweep, [200, 10_000, 1_000_000], "{json}");
    let slots: Vec<u64> = json["drain_by_slots"]
        .as_array()
        .expect("drain_by_slots")
        .iter()
        .filter_map(|r| r["slots"].as_u64())
        .collect();
    assert_eq!(slots, [1, 8, 64], "{json}");
    let cluster = &json["cluster"];
    assert_eq!(cluster["exactly_once"], true, "{cluster}");
    let runs = cluster["runs"].as_array().expect("cluster runs");
    let partitions: Vec<u64> = runs
        .iter()
        .filter_map(|r| r["partitions"].as_u64())
        .collect();
    assert_eq!(partitions, [1, 3], "{cluster}");
    for run in runs {
        let by_primary = run["redis_cpu_us_per_job_by_primary"].as_array();
        assert_eq!(by_primary.map(Vec::len), Some(3), "{run}");
    }
}
