//! Command-line flags every fleetq service binary shares (`fleetq-broker`, `fleetq-worker`):
//! where Redis is, and how to log. Flatten [`CommonFlags`] into a binary's clap arguments.

use clap::{Args, ValueEnum};

use crate::connection::{RedisConfig, DEFAULT_REDIS_URL};

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Flags shared by the service binaries.
#[derive(Debug, Clone, Args)]
pub struct CommonFlags {
    /// Redis server, redis://[user:password@]host:port/db or rediss://… for TLS.
    #[arg(long, env = "REDIS_URL", default_value = DEFAULT_REDIS_URL, hide_env_values = true)]
    pub redis_url: String,
    /// PEM file of a private CA for rediss:// servers.
    #[arg(long, env = "FLEETQ_REDIS_CA_CERT")]
    pub redis_ca_cert: Option<std::path::PathBuf>,
    /// Log format.
    #[arg(long, env = "FLEETQ_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

impl CommonFlags {
    /// The Redis connection settings these flags describe.
    pub fn redis_config(&self) -> RedisConfig {
        let mut c = RedisConfig::new(&self.redis_url);
        c.ca_cert = self.redis_ca_cert.clone();
        c
    }

    /// Connects for a service binary (`who`, e.g. "fleetq-worker"): waits while Redis is down,
    /// loading or read-only (an outage, not a reason to exit), then warns when the eviction
    /// policy could delete fleetq keys. `None` when `stop` fired first.
    pub async fn connect_patiently(
        &self,
        who: &str,
        stop: &tokio_util::sync::CancellationToken,
    ) -> anyhow::Result<Option<crate::Redis>> {
        use anyhow::Context as _;
        let Some(redis) = crate::Redis::connect_patiently(self.redis_config(), stop)
            .await
            .with_context(|| format!("{who} cannot start"))?
        else {
            tracing::info!("stopped while waiting for Redis");
            return Ok(None);
        };
        if let Err(e) = redis.check_eviction_policy().await {
            tracing::warn!(error = %e, "cannot read the Redis eviction policy");
        }
        Ok(Some(redis))
    }

    /// Sets up logging as asked (`RUST_LOG` filters; default `info`): to stderr, so stdout
    /// stays for output, with colours only when stderr is a terminal (a log file or a
    /// collector gets no escape codes).
    pub fn init_logging(&self) {
        let filter =
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
        let fmt = tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_ansi(stderr_is_terminal())
            .with_env_filter(filter);
        match self.log_format {
            LogFormat::Json => fmt.json().init(),
            LogFormat::Text => fmt.init(),
        }
    }
}

/// Whether stderr is a terminal: log lines carry ANSI colours only then.
pub fn stderr_is_terminal() -> bool {
    use std::io::IsTerminal as _;
    std::io::stderr().is_terminal()
}

/// How a service binary ends: 0, or 1 after one line on stderr that says what went wrong.
pub fn exit(result: anyhow::Result<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", crate::error::report(e.chain()));
            std::process::ExitCode::FAILURE
        }
    }
}
