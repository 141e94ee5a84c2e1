//! The server-side functions: one Redis Functions library named `fleetq`, assembled from
//! the Lua files in `broker/src/lua/` and loaded idempotently by any process at start.
//!
//! Why Redis Functions rather than `EVALSHA` scripts: a library is loaded once and then
//! callable by name from any language (`FCALL fleetq_enqueue 1 fleetq:{q}:stream '{…}'`),
//! so a producer in Python or a shell needs no copy of the script text; functions are
//! persisted and replicated with the data set. Every step that touches more than one key is
//! one function, so it is atomic.
//!
//! Versioning: `fleetq_version` answers the library version (`<semver>+<hash of the
//! sources>`). At start a process loads the library when the server has none or one with an
//! older semver; it leaves an equal or newer one in place (so two builds of one version never
//! take turns replacing each other). Bump [`LIBRARY_SEMVER`] with every change to the Lua.

use redis::aio::ConnectionLike;
use redis::FromRedisValue;

use crate::connection::SharedConn;
use crate::keys::QueueKeys;
use crate::{Error, Result};

/// The library's name in `FUNCTION LIST`.
pub const LIBRARY_NAME: &str = "fleetq";
/// Wire-protocol and library version; the major number is the protocol version.
pub const LIBRARY_SEMVER: &str = "2.0.0";

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
    for (_, src) in SOURCES {
        for b in src.bytes() {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{LIBRARY_SEMVER}+{:08x}", hash >> 32)
}

/// The library text passed to `FUNCTION LOAD`.
pub fn library_source() -> String {
    let mut out = format!("#!lua name={LIBRARY_NAME}\n");
    for (name, src) in SOURCES {
        out.push_str(&format!("\n-- ===== {name} =====\n"));
        out.push_str(&src.replace("__FLEETQ_VERSION__", &library_version()));
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

/// Loads the library on the node behind `conn` unless it already has this version or a
/// newer one.
pub async fn load<C: ConnectionLike + Send>(conn: &mut C) -> Result<()> {
    let source = library_source();
    let loaded: redis::RedisResult<String> = redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg(&source)
        .query_async(conn)
        .await;
    match loaded {
        Ok(_) => Ok(()),
        Err(e) if e.to_string().contains("already exists") => {
            let theirs: Option<String> = redis::cmd("FCALL_RO")
                .arg("fleetq_version")
                .arg(0)
                .query_async(conn)
                .await
                .ok();
            let ours = library_version();
            let replace = match &theirs {
                None => true,
                Some(v) => semver_of(v) < semver_of(&ours),
            };
            if let Some(v) = theirs
                .as_ref()
                .filter(|v| **v != ours && semver_of(v) == semver_of(&ours))
            {
                tracing::debug!(server = %v, ours = %ours, "the server has another build of this library version; keeping it");
            }
            if replace {
                redis::cmd("FUNCTION")
                    .arg("LOAD")
                    .arg("REPLACE")
                    .arg(&source)
                    .query_async::<String>(conn)
                    .await
                    .map_err(|e| Error::redis("load functions", e))?;
            }
            Ok(())
        }
        Err(e) => Err(Error::redis("load functions", e)),
    }
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
        Err(e) if e.to_string().contains("Function not found") => {
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
        Err(e) if e.to_string().contains("Function not found") => {
            load_all(conn).await?;
            pipe.query_async(conn)
                .await
                .map_err(|e| Error::redis(step, e))
        }
        Err(e) => Err(Error::redis(step, e)),
    }
}
