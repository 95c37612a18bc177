//! `txmq-nameserver`: parses flags, starts a [`Nameserver`] and stops it on
//! SIGINT or SIGTERM. Everything else is in the library.

use std::io::IsTerminal as _;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tracing::info;
use tracing_subscriber::EnvFilter;
use txmq_nameserver::{Nameserver, NameserverConfig};

/// The txmq name service: brokers register here, clients look up topic routes here.
#[derive(Debug, Parser)]
#[command(name = "txmq-nameserver", version, about)]
struct Args {
    /// Address to listen on (host:port).
    #[arg(long, env = "TXMQ_LISTEN", default_value = txmq_nameserver::DEFAULT_LISTEN)]
    listen: String,

    /// Drop a broker from all routes after this long without a heartbeat (e.g. 500ms, 6s, 2m).
    #[arg(long, env = "TXMQ_BROKER_EXPIRY", default_value = "30s", value_parser = humantime::parse_duration)]
    broker_expiry: Duration,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Colours only on a terminal, so logs captured to a file stay plain text.
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` prints the whole chain on one line; our errors already
            // name their cause in their own message, so print the top one.
            eprintln!("txmq-nameserver: error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let config = NameserverConfig {
        listen: args.listen,
        broker_expiry: args.broker_expiry,
    };
    let shutdown = CancellationToken::new();
    // Install the handlers before binding, so a signal that comes right after
    // start-up still shuts down cleanly.
    let mut sigint = signal(SignalKind::interrupt())
        .map_err(|e| anyhow::anyhow!("cannot install a SIGINT handler: {e}"))?;
    let mut sigterm = signal(SignalKind::terminate())
        .map_err(|e| anyhow::anyhow!("cannot install a SIGTERM handler: {e}"))?;
    let nameserver = Nameserver::bind(config).await?;
    let token = shutdown.clone();
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = sigint.recv() => "SIGINT",
            _ = sigterm.recv() => "SIGTERM",
        };
        info!(signal = name, "shutting down");
        token.cancel();
    });
    nameserver.run(shutdown).await;
    Ok(())
}
