//! `chaos-client`: one client of the chaos harness's workload (a producer,
//! a transactional producer or a consumer) as its own process, so the
//! harness can `kill -9` it. SIGTERM stops it gracefully; SIGUSR1 makes a
//! transactional producer stop inside its next local transaction. See
//! `txmq_tests::chaos::client`.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use txmq_tests::chaos::client::{run, ClientArgs};
use txmq_tests::chaos::history::Recorder;

#[tokio::main]
async fn main() -> ExitCode {
    let args = ClientArgs::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let rec = match Recorder::open(&args.out, &args.name) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("chaos-client: cannot open {}: {e}", args.out.display());
            return ExitCode::FAILURE;
        }
    };
    let stop = CancellationToken::new();
    let hold = Arc::new(AtomicBool::new(false));
    let (Ok(mut term), Ok(mut usr1)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::user_defined1()),
    ) else {
        eprintln!("chaos-client: cannot install signal handlers");
        return ExitCode::FAILURE;
    };
    {
        let (stop, hold) = (stop.clone(), hold.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = term.recv() => { stop.cancel(); return; }
                    _ = usr1.recv() => hold.store(true, Ordering::SeqCst),
                }
            }
        });
    }
    match run(args, rec, stop, hold).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chaos-client: {e:#}");
            ExitCode::FAILURE
        }
    }
}
