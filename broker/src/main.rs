//! `txmq-broker`: parses settings and runs [`txmq_broker::Broker`] until
//! SIGINT or SIGTERM, then shuts down gracefully and exits 0.

use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};
use tracing_subscriber::EnvFilter;
use txmq_broker::{Broker, BrokerArgs};

fn main() -> std::process::ExitCode {
    let args = BrokerArgs::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new("info,openraft=error")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let config = match args.resolve() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("txmq-broker: error: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("txmq-broker: error: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let broker = match Broker::start(config).await {
            Ok(b) => b,
            Err(e) => {
                eprintln!("txmq-broker: error: {e}");
                return std::process::ExitCode::FAILURE;
            }
        };
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            eprintln!("txmq-broker: error: cannot install signal handlers");
            return std::process::ExitCode::FAILURE;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        broker.shutdown().await;
        std::process::ExitCode::SUCCESS
    })
}
