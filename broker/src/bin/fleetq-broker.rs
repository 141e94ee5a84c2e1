//! `fleetq-broker`: maintenance, metrics and the HTTP API beside a fleet. Parses flags, sets up
//! logging, binds the listener and calls `fleetq_broker::service::run` until SIGTERM or Ctrl-C.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use fleetq_broker::flags::CommonFlags;
use fleetq_broker::http::DEFAULT_MAX_BODY_BYTES;
use fleetq_broker::listener::{
    HttpLimits, DEFAULT_BODY_TIMEOUT, DEFAULT_HEADER_TIMEOUT, DEFAULT_MAX_CONNECTIONS,
};
use fleetq_broker::maintenance::DEFAULT_INTERVAL;
use fleetq_broker::service::{BrokerConfig, DEFAULT_LISTEN};

/// Run the fleetq broker: promotes retries, expires old jobs, serves /metrics and the HTTP API.
///
/// Example: fleetq-broker --listen 0.0.0.0:8080 --api-token "$(openssl rand -hex 32)"
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    #[command(flatten)]
    common: CommonFlags,
    /// HTTP address for the API, /metrics and health checks (loopback unless you say so).
    #[arg(long, env = "FLEETQ_LISTEN", default_value = DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// Bearer token required on /v1 routes. Required when --listen is not loopback (unless
    /// --open-api); unset on loopback: /v1 answers only requests addressed to a loopback name.
    #[arg(long, env = "FLEETQ_API_TOKEN", hide_env_values = true)]
    api_token: Option<String>,
    /// Serve /v1 without a token on a listener that is not loopback: anyone who reaches the
    /// port may enqueue, cancel, retry and purge. Only behind a network boundary you trust.
    #[arg(long, env = "FLEETQ_OPEN_API", value_parser = clap::builder::BoolishValueParser::new())]
    open_api: bool,
    /// Milliseconds a client has to send a request's headers, from when the connection opens
    /// or its previous answer was sent; also the keep-alive idle timeout.
    #[arg(long, env = "FLEETQ_HTTP_HEADER_TIMEOUT_MS", default_value_t = DEFAULT_HEADER_TIMEOUT.as_millis() as u64)]
    http_header_timeout_ms: u64,
    /// Milliseconds a client has to send a request's body, from its headers.
    #[arg(long, env = "FLEETQ_HTTP_BODY_TIMEOUT_MS", default_value_t = DEFAULT_BODY_TIMEOUT.as_millis() as u64)]
    http_body_timeout_ms: u64,
    /// Most HTTP connections open at once; more wait in the listen backlog.
    #[arg(long, env = "FLEETQ_HTTP_MAX_CONNECTIONS", default_value_t = DEFAULT_MAX_CONNECTIONS)]
    http_max_connections: usize,
    /// Queues to tend and report, comma-separated; empty: every queue found.
    #[arg(long, env = "FLEETQ_QUEUES", value_delimiter = ',')]
    queues: Vec<String>,
    /// Largest HTTP request body, bytes.
    #[arg(long, env = "FLEETQ_MAX_BODY_BYTES", default_value_t = DEFAULT_MAX_BODY_BYTES)]
    max_body_bytes: usize,
    /// Milliseconds between maintenance runs (promote retries, expire old jobs).
    #[arg(long, env = "FLEETQ_MAINTENANCE_INTERVAL_MS", default_value_t = DEFAULT_INTERVAL.as_millis() as u64)]
    maintenance_interval_ms: u64,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    fleetq_broker::flags::exit(run(args).await)
}

async fn run(args: Args) -> anyhow::Result<()> {
    args.common.init_logging();
    let config = BrokerConfig {
        queues: args.queues.into_iter().filter(|q| !q.is_empty()).collect(),
        api_token: args.api_token,
        open_api: args.open_api,
        http: HttpLimits {
            header_timeout: Duration::from_millis(args.http_header_timeout_ms),
            body_timeout: Duration::from_millis(args.http_body_timeout_ms),
            max_connections: args.http_max_connections,
        },
        max_body_bytes: args.max_body_bytes,
        maintenance_interval: Duration::from_millis(args.maintenance_interval_ms),
    };
    config.validate()?;
    config.validate_listen(args.listen)?;
    // Bind first: a port in use is a mistake to report at once, not after Redis is up.
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {}; is another process using it? set --listen",
                args.listen
            )
        })?;
    let shutdown = fleetq_broker::shutdown::Shutdown::new(fleetq_broker::shutdown::signal());
    let stop = shutdown.token();
    let Some(redis) = args
        .common
        .connect_patiently("fleetq-broker", &stop)
        .await?
    else {
        return Ok(());
    };
    fleetq_broker::service::run(redis, listener, config, stop.cancelled_owned()).await?;
    Ok(())
}
