//! The core tests again, on Valkey 8.1: `core_queue.rs` (the queue end to end),
//! `functions.rs` (each server-side function on its own) and `dead_letters.rs` (retry and
//! purge) included as modules, unchanged, with [`SERVER`] switched. Between them they call
//! every function of the library.
//!
//! Without a `valkey-server` these tests fail and say how to install one (`./dev test` does).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use fleetq_tests::Server;

/// The server the included tests start (they read it as `crate::SERVER`).
const SERVER: Server = Server::Valkey;

#[path = "core_queue.rs"]
mod core_queue;

#[path = "functions.rs"]
mod functions;

#[path = "dead_letters.rs"]
mod dead_letters;
