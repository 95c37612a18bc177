//! `txmq-broker`: parses settings and runs [`txmq_broker::Broker`] until
//! SIGINT or SIGTERM, then shuts down gracefully and exits 0. SIGHUP
//! reloads the ACL file (`--acl-file`), and without one is logged and
//! otherwise ignored: it never ends the broker.

use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};
use txmq_broker::{Broker, BrokerArgs, Security};

fn main() -> std::process::ExitCode {
    let args = BrokerArgs::parse();
    let logging = args
        .logging()
        .and_then(|(format, level)| txmq_remoting::logging::init(format, level.as_deref()));
    if let Err(e) = logging {
        eprintln!("txmq-broker: error: {e}");
        return std::process::ExitCode::from(2);
    }
    let settings = args
        .worker_threads()
        .and_then(|threads| Ok((args.resolve()?, threads)));
    let (config, threads) = match settings {
        Ok(s) => s,
        Err(e) => {
            eprintln!("txmq-broker: error: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    // The certificate, key and ACL files are settings too: one that cannot
    // be used is found before anything starts, and exits 2 as other bad
    // settings do.
    let security = match Security::load(&config.security) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("txmq-broker: error: security settings: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = threads {
        builder.worker_threads(n);
    }
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("txmq-broker: error: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    tracing::info!(
        worker_threads = runtime.metrics().num_workers(),
        "runtime started"
    );
    let has_acl = config.security.acl_file.is_some();
    runtime.block_on(async move {
        // Installed before the listeners are bound, as the nameserver's: a
        // SIGTERM that comes as soon as the broker listens (a supervisor's,
        // a test's) shuts it down cleanly once it has started, rather than
        // killing it mid-start.
        // SIGHUP too: its default action would end the broker at once,
        // without the graceful shutdown, for a signal operators send to
        // reload (and logrotate sends after a rotation).
        let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
        ) else {
            eprintln!("txmq-broker: error: cannot install signal handlers");
            return std::process::ExitCode::FAILURE;
        };
        let broker = match Broker::start_with(config, security).await {
            Ok(b) => b,
            Err(e) => {
                eprintln!("txmq-broker: error: {e}");
                return std::process::ExitCode::FAILURE;
            }
        };
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                // With an ACL file, the broker's watcher reloads it on the
                // same signal.
                _ = hup.recv() => if !has_acl {
                    tracing::info!("SIGHUP: no ACL file (--acl-file) to reload; the broker goes on");
                },
            }
        }
        broker.shutdown().await;
        std::process::ExitCode::SUCCESS
    })
}
