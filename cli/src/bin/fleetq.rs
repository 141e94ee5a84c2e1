//! `fleetq`: the command line. Parses the command, sets up logging (errors only unless
//! RUST_LOG says otherwise; on stderr, coloured only when it is a terminal) and runs it; errors print one line and map to the exit codes listed
//! in `fleetq --help`.

use clap::Parser;
use fleetq_cli::Cli;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(fleetq_broker::flags::stderr_is_terminal())
        .init();
    match fleetq_cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            e.exit_code()
        }
    }
}
