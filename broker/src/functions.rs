//! The server-side functions: one Redis Functions library named `fleetq`, assembled from
//! the Lua files in `broker/src/lua/`.
//!
//! Why Redis Functions rather than `EVALSHA` scripts: a library is loaded once and then
//! callable by name from any language (`FCALL fleetq_enqueue 1 fleetq:{q}:stream '{…}'`),
//! so a producer in Python or a shell needs no copy of the script text; functions are
//! persisted and replicated with the data set. Every step that touches more than one key is
//! one function, so it is atomic.
//!
//! Versioning: `fleetq_version` answers the library version (`<semver>+<hash of the
//! sources>`). [`check`] compares it with this build's ([`LibraryState`]); [`load`] loads the
//! library when the server has none or one with an older semver, and leaves an equal or newer
//! one in place (so two builds of one version never take turns replacing each other). Bump
//! [`LIBRARY_SEMVER`] with every change to the Lua.
//!
//! Who loads it: the broker at start (and on `/readyz`), `fleetq functions load`, and for
//! convenience Rust producers and any call that finds the library gone, when their Redis user
//! may (`function|load`). A worker never loads it at start: it [waits](wait_until_usable)
//! until the library is there, so a worker's user needs no right to rewrite the server-side
//! logic of every queue.

use redis::aio::ConnectionLike;
use redis::FromRedisValue;

use crate::connection::SharedConn;
use crate::keys::QueueKeys;
use crate::{Error, Result};

/// The library's name in `FUNCTION LIST`.
pub const LIBRARY_NAME: &str = "fleetq";
/// Wire-protocol and library version; the major number is the protocol version.
pub const LIBRARY_SEMVER: &str = "3.2.0";

/// The Lua sources, in load order (helpers first). Each file documents its KEYS, ARGV and reply.
pub const SOURCES: &[(&str, &str)] = &[
    // Helpers, by concept.
    ("base.lua", include_str!("lua/base.lua")),
    ("events.lua", include_str!("lua/events.lua")),
    ("record.lua", include_str!("lua/record.lua")),
    ("fencing.lua", include_str!("lua/fencing.lua")),
    ("position.lua", include_str!("lua/position.lua")),
    ("requeue.lua", include_str!("lua/requeue.lua")),
    ("eligible.lua", include_str!("lua/eligible.lua")),
    // Functions.
    ("enqueue.lua", include_str!("lua/enqueue.lua")),
    ("take.lua", include_str!("lua/take.lua")),
    ("renew.lua", include_str!("lua/renew.lua")),
    ("complete.lua", include_str!("lua/complete.lua")),
    ("cycle.lua", include_str!("lua/cycle.lua")),
    ("promote.lua", include_str!("lua/promote.lua")),
    ("reclaim.lua", include_str!("lua/reclaim.lua")),
    ("abandon.lua", include_str!("lua/abandon.lua")),
    ("cancel.lua", include_str!("lua/cancel.lua")),
    ("progress.lua", include_str!("lua/progress.lua")),
    ("expire.lua", include_str!("lua/expire.lua")),
    ("node.lua", include_str!("lua/node.lua")),
    ("dead_retry.lua", include_str!("lua/dead_retry.lua")),
    ("status.lua", include_str!("lua/status.lua")),
    ("version.lua", include_str!("lua/version.lua")),
];

/// The full library version, `<semver>+<hash of the sources>`.
pub fn library_version() -> String {
    // FNV-1a: tiny, stable across builds and platforms.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for (_, src) in filled_sources() {
        for b in src.bytes() {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{LIBRARY_SEMVER}+{:08x}", hash >> 32)
}

/// The sources with the tables of [`limits`](crate::limits) written in (the version not yet).
fn filled_sources() -> Vec<(&'static str, String)> {
    let tables = crate::limits::lua_tables();
    SOURCES
        .iter()
        .map(|(name, src)| {
            let filled = tables
                .iter()
                .fold((*src).to_owned(), |s, (hole, text)| s.replace(hole, text));
            (*name, filled)
        })
        .collect()
}

/// The library text passed to `FUNCTION LOAD`.
pub fn library_source() -> String {
    let version = library_version();
    let mut out = format!("#!lua name={LIBRARY_NAME}\n");
    for (name, src) in filled_sources() {
        out.push_str(&format!("\n-- ===== {name} =====\n"));
        out.push_str(&src.replace("__FLEETQ_VERSION__", &version));
        out.push('\n');
    }
    out
}

/// Loads the library on every primary (one server, the Sentinel's primary, or each cluster
/// primary) unless it already has this version or a newer one. Replicas get it from their
/// primary.
pub async fn load_all(conn: &SharedConn) -> Result<()> {
    for mut primary in conn.primaries().await? {
        load(&mut primary).await?;
    }
    Ok(())
}

/// What the server holds compared with this build's library (see [`check`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LibraryState {
    /// No `fleetq` library (a fresh server, `FUNCTION FLUSH`, a restart without persistence),
    /// or one without `fleetq_version`.
    Missing,
    /// A library with an older semver than this build's; the server's version.
    Older(String),
    /// This build's semver (the hash after `+` may differ: another build of the same
    /// version); the server's version.
    Current(String),
    /// A newer semver than this build's, left in place; the server's version.
    Newer(String),
}

impl LibraryState {
    /// Compares the server's version `theirs` (`<semver>+<hash>`) with this build's.
    pub fn of(theirs: String) -> Self {
        let (t, o) = (semver_of(&theirs), semver_of(LIBRARY_SEMVER));
        match t.cmp(&o) {
            std::cmp::Ordering::Less => Self::Older(theirs),
            std::cmp::Ordering::Equal => Self::Current(theirs),
            std::cmp::Ordering::Greater => Self::Newer(theirs),
        }
    }

    /// True when this build can work against the server's library: the same semver or a
    /// newer one (the major number is the protocol; a newer minor keeps every function).
    pub fn usable(&self) -> bool {
        matches!(self, Self::Current(_) | Self::Newer(_))
    }

    /// The server's version, when it has a library.
    pub fn version(&self) -> Option<&str> {
        match self {
            Self::Missing => None,
            Self::Older(v) | Self::Current(v) | Self::Newer(v) => Some(v),
        }
    }

    /// What is wrong and what to do, when the library is not [usable](Self::usable).
    pub fn problem(&self) -> Option<String> {
        match self {
            Self::Missing => Some(format!(
                "the fleetq function library is not loaded on this Redis: {REMEDY}"
            )),
            Self::Older(v) => Some(format!(
                "the fleetq function library on this Redis is older than this build's ({v} < {}): {REMEDY}",
                library_version()
            )),
            Self::Current(_) | Self::Newer(_) => None,
        }
    }
}

impl std::fmt::Display for LibraryState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Missing => f.write_str("missing"),
            Self::Older(v) => write!(f, "older ({v})"),
            Self::Current(v) => write!(f, "current ({v})"),
            Self::Newer(v) => write!(f, "newer ({v})"),
        }
    }
}

/// [`check`] on every primary: the least usable state found (missing before older before
/// current), so a cluster primary without the library is not hidden by the others.
pub async fn check_all(conn: &SharedConn) -> Result<LibraryState> {
    let rank = |s: &LibraryState| match s {
        LibraryState::Missing => 0,
        LibraryState::Older(_) => 1,
        LibraryState::Current(_) | LibraryState::Newer(_) => 2,
    };
    let mut worst: Option<LibraryState> = None;
    for mut primary in conn.primaries().await? {
        let state = check(&mut primary).await?;
        if worst.as_ref().is_none_or(|w| rank(&state) < rank(w)) {
            worst = Some(state);
        }
    }
    Ok(worst.unwrap_or(LibraryState::Missing))
}

/// What to do about a missing or older library, in every message that reports one.
pub const REMEDY: &str = "start fleetq-broker or run `fleetq functions load` (as a Redis user allowed FUNCTION LOAD; see docs/operations.md)";

/// Asks the server which `fleetq` library it has (`FCALL_RO fleetq_version 0`), without
/// loading anything: what a worker does at start, and what [`load`] does first.
pub async fn check<C: ConnectionLike + Send>(conn: &mut C) -> Result<LibraryState> {
    let reply: redis::RedisResult<String> = redis::cmd("FCALL_RO")
        .arg("fleetq_version")
        .arg(0)
        .query_async(conn)
        .await;
    match reply {
        Ok(theirs) => Ok(LibraryState::of(theirs)),
        Err(e) if is_not_found(&e) => Ok(LibraryState::Missing),
        Err(e) => Err(Error::redis("check the function library", e)),
    }
}

/// Loads the library unless the server already has this version or a newer one. Looks
/// first ([`check`]), so a user without `function|load` gets through when the library is
/// current; when it must load and may not (`NOPERM`), the error ([`Error::Library`]) says
/// what is missing and what to do.
pub async fn load<C: ConnectionLike + Send>(conn: &mut C) -> Result<()> {
    let state = check(conn).await?;
    match &state {
        LibraryState::Current(v) if *v != library_version() => {
            tracing::debug!(server = %v, ours = %library_version(), "the server has another build of this library version; keeping it");
            return Ok(());
        }
        LibraryState::Current(_) | LibraryState::Newer(_) => return Ok(()),
        LibraryState::Older(_) => return load_source(conn, true, &state).await,
        LibraryState::Missing => {}
    }
    match load_source(conn, false, &state).await {
        Err(Error::Redis { source, .. }) if source.to_string().contains("already exists") => {
            // Another process loaded it meanwhile, or a foreign library has the name.
            let now = check(conn).await?;
            if now.usable() {
                Ok(())
            } else {
                load_source(conn, true, &now).await
            }
        }
        other => other,
    }
}

/// `FUNCTION LOAD [REPLACE]` of this build's library; a refusal for want of permission
/// becomes [`Error::Library`] naming what the server has (`state`).
async fn load_source<C: ConnectionLike + Send>(
    conn: &mut C,
    replace: bool,
    state: &LibraryState,
) -> Result<()> {
    let mut cmd = redis::cmd("FUNCTION");
    cmd.arg("LOAD");
    if replace {
        cmd.arg("REPLACE");
    }
    match cmd.arg(library_source()).query_async::<String>(conn).await {
        Ok(_) => Ok(()),
        Err(e) if e.code() == Some("NOPERM") => Err(Error::Library(format!(
            "{}; this Redis user may not load it ({e})",
            state
                .problem()
                .unwrap_or_else(|| "the fleetq function library cannot be replaced".into())
        ))),
        Err(e) => Err(Error::redis("load functions", e)),
    }
}

/// Waits until the server has a library this build can use ([`LibraryState::usable`]),
/// looking with [`check`] after a capped, jittered [`Backoff`](crate::retry::Backoff) (50 ms
/// doubling to 500 ms, so work starts within about half a second of the library appearing).
/// Never loads it. Says once what is wrong and what to do (again when that changes), waits
/// out Redis outages ([`OutageLog`](crate::retry::OutageLog)); `Ok(None)` when `stop` is
/// cancelled first, `Err` for what waiting cannot fix (`NOPERM` for `FCALL_RO`, say).
pub async fn wait_until_usable(
    conn: &SharedConn,
    stop: &tokio_util::sync::CancellationToken,
) -> Result<Option<LibraryState>> {
    let mut backoff = crate::retry::Backoff::default();
    let mut outage = crate::retry::OutageLog::new();
    let mut said: Option<String> = None;
    loop {
        let looked = tokio::select! {
            _ = stop.cancelled() => return Ok(None),
            r = check_all(conn) => r,
        };
        match looked {
            Ok(state) => {
                outage.recovered();
                match state.problem() {
                    None => {
                        if said.is_some() {
                            tracing::info!(
                                server = state.version().unwrap_or(""),
                                "the fleetq function library is loaded now; going on"
                            );
                        }
                        return Ok(Some(state));
                    }
                    Some(problem) if said.as_deref() != Some(problem.as_str()) => {
                        tracing::warn!(state = %state, "{problem}; waiting for it");
                        said = Some(problem);
                    }
                    Some(_) => {}
                }
            }
            Err(e) if e.is_transient() => {
                outage.failed("check the function library", &e);
            }
            Err(e) => return Err(e),
        }
        tokio::select! {
            _ = stop.cancelled() => return Ok(None),
            _ = tokio::time::sleep(backoff.next()) => {}
        }
    }
}

/// True for the server's answer to a call of a function it does not have.
fn is_not_found(e: &redis::RedisError) -> bool {
    e.to_string().contains("Function not found")
}

fn semver_of(v: &str) -> Vec<u64> {
    v.split('+')
        .next()
        .unwrap_or("")
        .split('.')
        .map(|p| p.parse().unwrap_or(0))
        .collect()
}

/// An `FCALL` of function `name` on queue `keys`, ready for its arguments.
pub fn fcall(name: &str, keys: &QueueKeys) -> redis::Cmd {
    let mut cmd = redis::cmd("FCALL");
    cmd.arg(name).arg(1).arg(keys.stream());
    cmd
}

/// Runs `cmd` (an [`fcall`]); when the node lost the library (a restart without
/// persistence, a new primary after resharding), loads it everywhere and tries once more.
pub async fn call<T>(conn: &mut SharedConn, cmd: &redis::Cmd, step: &'static str) -> Result<T>
where
    T: FromRedisValue,
{
    // Not a one-command pipeline: redis-rs would wrap the function's own error (`fleetq: …`).
    match cmd.query_async(conn).await {
        Ok(v) => Ok(v),
        Err(e) if is_not_found(&e) => {
            load_all(conn).await?;
            cmd.query_async(conn)
                .await
                .map_err(|e| Error::redis(step, e))
        }
        Err(e) => Err(Error::redis(step, e)),
    }
}

/// Runs a pipeline of [`fcall`]s; when the node lost the library, loads it everywhere and
/// tries once more.
pub async fn call_pipeline<T>(
    conn: &mut SharedConn,
    pipe: &redis::Pipeline,
    step: &'static str,
) -> Result<T>
where
    T: FromRedisValue,
{
    match pipe.query_async(conn).await {
        Ok(v) => Ok(v),
        Err(e) if is_not_found(&e) => {
            load_all(conn).await?;
            pipe.query_async(conn)
                .await
                .map_err(|e| Error::redis(step, e))
        }
        Err(e) => Err(Error::redis(step, e)),
    }
}
