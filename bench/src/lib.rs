//! fleetq-bench: what a job costs, what an idle worker costs, how fast a job starts and how
//! fast a dead or frozen host's job moves on — measured against a private `redis-server`, and
//! set beside what Redis itself allows (the floor); and how a hot queue's partitions spread
//! over a private Redis Cluster.
//!
//! - [`suite`] — [`Options`] and [`run`]: every scenario in order, one [`Report`].
//! - [`plan`] — the sizes and windows of a full run and of a `--quick` one.
//! - [`report`] — every figure of a run and the JSON line.
//! - [`targets`] — the targets and whether a run met each.
//! - [`table`] — the tables for people.
//! - [`server`] — a fresh `redis-server` per scenario (persistence off) and what is read from it.
//! - [`cluster`] — a local Redis Cluster of 3 primaries for the cluster scenario.
//! - [`commandstats`] — `INFO commandstats` snapshots, deltas, and which commands only
//!   clients send.
//! - [`sample`] — commands and CPU time of a server in one `INFO`, and their deltas.
//! - [`steps`] — the steps of a job (enqueue, take, complete, maintenance) driven directly:
//!   every fleetq function call the bench builds itself.
//! - [`payload`] — the 200-byte no-op job payload.
//! - [`worker_process`] — a worker in a process of its own (this binary re-executed), to
//!   stop, kill and freeze.
//! - [`bench_worker`] — the hidden `worker` subcommand that such a process runs.
//! - [`poll`] — waiting for a condition with a deadline.
//! - [`scenarios`] — enqueue, end to end, floor, by step, payload sweep, drain by slots,
//!   memory, idle, dispatch, recovery, cluster.
//!
//! # Running it from a test
//!
//! The worker processes are this package's binary re-executed with its hidden `worker`
//! subcommand, so [`run`] takes the path of that binary in [`Options::worker_exe`] rather than
//! using `std::env::current_exe()` (inside a test, that is the test harness):
//!
//! - the `fleetq-bench` binary passes `std::env::current_exe()`;
//! - an integration test of this package passes `env!("CARGO_BIN_EXE_fleetq-bench")`;
//! - a test in another package passes the path of the built binary (for example
//!   `fleetq_tests::bin_path("fleetq-bench")`).
//!
//! ```no_run
//! # async fn example(bench_binary: std::path::PathBuf) -> anyhow::Result<()> {
//! // In an integration test of this package: env!("CARGO_BIN_EXE_fleetq-bench").into()
//! let opts = fleetq_bench::Options {
//!     quick: true,
//!     worker_exe: bench_binary,
//! };
//! let report = fleetq_bench::run(&opts).await?;
//! assert!(report.problems().is_empty(), "{:?}", report.problems());
//! # Ok(()) }
//! ```
//!
//! Errors are `anyhow` errors: this crate is a measuring harness run as a binary (or by one
//! test), not a library for users, and every failure is reported with the step it happened in.

pub mod bench_worker;
pub mod cluster;
pub mod commandstats;
pub mod payload;
pub mod plan;
pub mod poll;
pub mod report;
pub mod sample;
pub mod scenarios;
pub mod server;
pub mod steps;
pub mod suite;
pub mod table;
pub mod targets;
pub mod worker_process;

pub use plan::Plan;
pub use report::Report;
pub use suite::{run, Options};
