//! The `fleetq` command line: what a new user runs first and an operator reaches for at 3 a.m.
//!
//! - [`args`] — the commands and flags (clap), with examples in every `--help`.
//! - [`commands`] — enqueue, status, watch, queues, nodes, dead letters, the function library,
//!   top.
//! - [`demo`] — the whole story in one command: a local Redis, a broker and a small fleet of
//!   simulated GPU nodes, one of which hangs, one crashes and one dies.
//! - [`output`] — tables for people, `--json` for scripts.
//! - [`exit`] — errors a person can act on, and exit codes scripts can rely on.

pub mod args;
pub mod commands;
pub mod demo;
pub mod exit;
pub mod output;

pub use args::Cli;
pub use exit::CliError;

/// Runs the command `cli` describes.
pub async fn run(cli: Cli) -> Result<(), CliError> {
    commands::dispatch(cli).await
}
