//! The commands and flags of `fleetq`. Every command has examples in its `--help`.

use clap::{Args, Parser, Subcommand};

/// fleetq: a job queue for GPU fleets on Redis Streams.
///
/// Start with `fleetq demo`. REDIS_URL selects the server (default redis://127.0.0.1:6379).
/// Exit codes: 0 done, 1 a job did not succeed, 2 bad command line, 3 Redis unreachable,
/// 4 not found, 5 bad input, 6 timed out.
#[derive(Debug, Parser)]
#[command(name = "fleetq", version)]
pub struct Cli {
    /// Redis server: redis://[user:password@]host:port/db or rediss://… for TLS.
    #[arg(long, global = true, env = "REDIS_URL", default_value = fleetq_broker::connection::DEFAULT_REDIS_URL, hide_env_values = true)]
    pub redis_url: String,
    /// Print machine-readable JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the whole story locally: Redis, a broker, a fleet with a hanging, a crashing and a
    /// dying node, a burst of jobs, live progress, and a summary proving every job ended once.
    ///
    /// Starts its own redis-server in a temporary directory when REDIS_URL is unset (and
    /// removes it afterwards). Needs python3 for the simulated GPU children.
    ///
    /// Examples:
    ///   fleetq demo
    ///   fleetq demo --jobs 40 --json
    #[command(verbatim_doc_comment)]
    Demo(DemoArgs),
    /// Put a job on a queue; with --wait, follow it to its end.
    ///
    /// Examples:
    ///   fleetq enqueue images '{"prompt":"a red fox"}'
    ///   fleetq enqueue images '{"prompt":"a red fox"}' --id order-17 --wait
    ///   fleetq enqueue images @job.json --progress-timeout-ms 60000 --json
    #[command(verbatim_doc_comment)]
    Enqueue(EnqueueArgs),
    /// Show a job: state, position, attempts, nodes, progress, result or error, one line per
    /// attempt, and the pid and host of the node running it.
    ///
    /// With --field NAME, prints just that field of the `--json` document (a key of it, or of
    /// its `fields`), for scripts; a field the job does not have exits 4.
    ///
    /// Examples:
    ///   fleetq status 1795404558780-0
    ///   fleetq status order-17 --queue images --json
    ///   fleetq status order-17 --field state
    ///   kill -9 $(fleetq status order-17 --field pid)     (on the node's host)
    #[command(verbatim_doc_comment)]
    Status(StatusArgs),
    /// Follow a job live until it ends (progress bar from its events).
    ///
    /// Says what happens on the way: an attempt that timed out or failed, and the next one it
    /// waits for; at the end, how the job ended and why. Exits 0 when it succeeded, 1 when it
    /// ended otherwise, 6 when --timeout-secs passed first.
    ///
    /// Examples:
    ///   fleetq watch order-17 --queue images
    #[command(verbatim_doc_comment)]
    Watch(WatchArgs),
    /// Cancel a job: a waiting or delayed one will not run; a running one's worker is told at
    /// its next lease renewal and stops it.
    ///
    /// Says what happened: cancelled while waiting, asked the running worker to stop, or
    /// already ended (and how). Exits 0 with the resulting state (`cancelled`, `cancelling`,
    /// or the end it already had), 4 when no queue knows the id. With --json:
    /// {"id", "queue", "state", "outcome"}, outcome one of cancelled, cancelling,
    /// already_ended, not_found.
    ///
    /// Examples:
    ///   fleetq cancel order-17
    ///   fleetq cancel 1795404558780-0 --queue images --json
    #[command(verbatim_doc_comment)]
    Cancel(JobArgs),
    /// List queues: waiting, in flight, delayed, dead, oldest wait, consumers.
    ///
    /// Examples:
    ///   fleetq queues
    ///   fleetq queues --json
    #[command(verbatim_doc_comment)]
    Queues,
    /// List the fleet's nodes (state, slots, pid, host, consumer, …), or suspend / resume one.
    ///
    /// Examples:
    ///   fleetq nodes
    ///   fleetq nodes suspend gpu-07 --for-secs 600
    ///   fleetq nodes resume gpu-07
    #[command(verbatim_doc_comment)]
    Nodes(NodesArgs),
    /// Dead letters of a queue: list, show, retry, purge.
    ///
    /// Examples:
    ///   fleetq dead images list
    ///   fleetq dead images show 1795404558999-0
    ///   fleetq dead images retry 1795404558999-0
    ///   fleetq dead images purge            (all of them)
    #[command(verbatim_doc_comment, override_usage = "fleetq dead <QUEUE> <COMMAND>")]
    Dead(DeadArgs),
    /// The server-side function library: load it, compare the server's with this build's, or
    /// print its text.
    ///
    /// Workers never load the library: they wait for it. The broker loads it at start; this
    /// command does the same for fleets without a broker, or after `FUNCTION FLUSH`. It needs
    /// a Redis user allowed FUNCTION LOAD (the broker role in docs/operations.md).
    /// `status` exits 0 when this build can use the server's library, 4 when it is missing or
    /// older.
    ///
    /// Examples:
    ///   fleetq functions load
    ///   fleetq functions status --json
    ///   fleetq functions dump | redis-cli -x FUNCTION LOAD REPLACE
    #[command(verbatim_doc_comment)]
    Functions(FunctionsArgs),
    /// Show or set how many partitions a queue is split in.
    ///
    /// A hot queue split in P partitions is P streams, each in its own Redis Cluster slot,
    /// so the load spreads over the primaries. Producers spread jobs over them (by id, or in
    /// turn), workers read them all. A position is then per partition. Producers and workers
    /// read the count when they start; workers also read the queue itself, so jobs of a
    /// producer started before the change still run. Lowering the count is refused while a
    /// dropped partition holds jobs.
    ///
    /// Examples:
    ///   fleetq partitions images
    ///   fleetq partitions images 3
    ///   fleetq partitions images 1          (back to one stream)
    #[command(verbatim_doc_comment)]
    Partitions(PartitionsArgs),
    /// A live, refreshing view of queues and nodes (Ctrl-C to leave).
    ///
    /// With --json, prints one snapshot of the same data as one JSON document and exits:
    /// {"queues": [...], "nodes": [...], "server_ms": ...}.
    ///
    /// Examples:
    ///   fleetq top
    ///   fleetq top --interval-ms 500
    ///   fleetq top --json
    #[command(verbatim_doc_comment)]
    Top(TopArgs),
}

/// `fleetq partitions`.
#[derive(Debug, Args)]
pub struct PartitionsArgs {
    /// Queue name.
    pub queue: String,
    /// The new partition count (1 to 64); without it, show the current one.
    pub count: Option<u32>,
}

/// `fleetq demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Jobs in the burst.
    #[arg(long, default_value_t = 24)]
    pub jobs: usize,
    /// No live progress bars (summary only).
    #[arg(long)]
    pub quiet: bool,
}

/// `fleetq enqueue`.
#[derive(Debug, Args)]
pub struct EnqueueArgs {
    /// Queue name.
    pub queue: String,
    /// The payload: JSON text, or @FILE to read it from a file.
    pub payload: String,
    /// Idempotency key and job id.
    #[arg(long)]
    pub id: Option<String>,
    /// Workflow key (a node that fails it is avoided for it for a while).
    #[arg(long)]
    pub workflow: Option<String>,
    /// Attempts before the job is dead-lettered.
    #[arg(long)]
    pub max_attempts: Option<u32>,
    /// Expire unless started within this many ms.
    #[arg(long)]
    pub queue_timeout_ms: Option<u64>,
    /// Time out when taken but not started within this many ms.
    #[arg(long)]
    pub start_timeout_ms: Option<u64>,
    /// Time out after this many ms without progress.
    #[arg(long)]
    pub progress_timeout_ms: Option<u64>,
    /// Cap one attempt at this many ms.
    #[arg(long)]
    pub run_timeout_ms: Option<u64>,
    /// Run no earlier than this many ms from now.
    #[arg(long)]
    pub delay_ms: Option<u64>,
    /// Wait for the end, with a progress bar, then print the result.
    #[arg(long)]
    pub wait: bool,
    /// Longest wait, seconds.
    #[arg(long, default_value_t = 600)]
    pub wait_timeout_secs: u64,
}

/// A job by id.
#[derive(Debug, Args)]
pub struct JobArgs {
    /// The job id.
    pub id: String,
    /// The job's queue (looked up in every queue when omitted).
    #[arg(long, env = "FLEETQ_QUEUE")]
    pub queue: Option<String>,
}

/// `fleetq status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The job and its queue.
    #[command(flatten)]
    pub job: JobArgs,
    /// Print only this field of the JSON status (e.g. state, node, pid, host, attempts, or a
    /// key of its `fields` such as started_ms), on one line.
    #[arg(long, value_name = "NAME")]
    pub field: Option<String>,
}

/// `fleetq watch`.
#[derive(Debug, Args)]
pub struct WatchArgs {
    /// The job and its queue.
    #[command(flatten)]
    pub job: JobArgs,
    /// Longest wait, seconds.
    #[arg(long, default_value_t = 3600)]
    pub timeout_secs: u64,
}

/// `fleetq nodes`.
#[derive(Debug, Args)]
pub struct NodesArgs {
    /// What to do (default: list).
    #[command(subcommand)]
    pub action: Option<NodeAction>,
}

/// Node actions.
#[derive(Debug, Subcommand)]
pub enum NodeAction {
    /// List live nodes (the default).
    List,
    /// Stop a node taking new jobs (it finishes what it runs).
    Suspend {
        /// Node name.
        node: String,
        /// For how long, seconds.
        #[arg(long, default_value_t = 3600)]
        for_secs: u64,
    },
    /// Let a suspended node take jobs again.
    Resume {
        /// Node name.
        node: String,
    },
}

/// `fleetq dead`. Both parts are optional for clap, so that a command line missing one gets
/// a message naming the subcommands with an example, not a bare usage error.
#[derive(Debug, Args)]
pub struct DeadArgs {
    /// Queue name.
    pub queue: Option<String>,
    /// What to do.
    #[command(subcommand)]
    pub action: Option<DeadAction>,
}

/// Dead-letter actions.
#[derive(Debug, Subcommand)]
pub enum DeadAction {
    /// List dead letters, oldest first.
    List {
        /// How many.
        #[arg(long, default_value_t = 50)]
        count: usize,
    },
    /// Show one dead letter in full.
    Show {
        /// Dead-letter id (from `list`).
        dead_id: String,
    },
    /// Put a dead letter back in line as a fresh job.
    Retry {
        /// Dead-letter id (from `list`).
        dead_id: String,
    },
    /// Delete one dead letter, or all of the queue's without an id.
    Purge {
        /// Dead-letter id (from `list`); none: all.
        dead_id: Option<String>,
    },
}

/// `fleetq functions`.
#[derive(Debug, Args)]
pub struct FunctionsArgs {
    /// What to do (without it, a message naming the subcommands).
    #[command(subcommand)]
    pub action: Option<FunctionsAction>,
}

/// Function library actions.
#[derive(Debug, Subcommand)]
pub enum FunctionsAction {
    /// Load this build's library unless the server has it or a newer one.
    Load,
    /// Show the server's library version against this build's.
    Status,
    /// Print the library text this build loads, for FUNCTION LOAD from any client.
    ///
    /// The version is filled in, as the broker loads it; needs no Redis.
    Dump,
}

/// `fleetq top`.
#[derive(Debug, Args)]
pub struct TopArgs {
    /// Refresh interval, ms.
    #[arg(long, default_value_t = 1000)]
    pub interval_ms: u64,
    /// Stop after this many refreshes (default: until Ctrl-C; with --json, one).
    #[arg(long)]
    pub iterations: Option<u64>,
}
