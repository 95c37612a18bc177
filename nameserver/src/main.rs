//! `txmq-nameserver`: parses flags, starts a [`Nameserver`] and stops it on
//! SIGINT or SIGTERM. Everything else is in the library.

use std::collections::BTreeMap;
use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory as _, Parser};
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tracing::info;
use tracing_subscriber::EnvFilter;
use txmq_nameserver::{parse_peers, ControllerConfig, Nameserver, NameserverConfig};

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

    /// Run a controller member (the Raft group that elects broker groups'
    /// masters) with this member id; needs the other --controller-* flags.
    #[arg(long, env = "TXMQ_CONTROLLER_ID")]
    controller_id: Option<u64>,

    /// Address the controller member listens on for Raft peers, brokers and admins (host:port).
    #[arg(long, env = "TXMQ_CONTROLLER_LISTEN")]
    controller_listen: Option<String>,

    /// Every controller member: ID=HOST:PORT,ID=HOST:PORT,... (1, 3 or 5 members).
    #[arg(long, env = "TXMQ_CONTROLLER_PEERS", value_parser = parse_peers)]
    controller_peers: Option<BTreeMap<u64, String>>,

    /// Where the controller keeps its Raft log, vote and snapshot.
    #[arg(long, env = "TXMQ_CONTROLLER_DATA_DIR")]
    controller_data_dir: Option<PathBuf>,

    /// The controller takes a broker for dead after this long without a heartbeat.
    #[arg(long, env = "TXMQ_MASTER_EXPIRY", default_value = "5s", value_parser = humantime::parse_duration)]
    master_expiry: Duration,

    /// When no in-sync replica of a group is alive, elect one that is not
    /// (acknowledged records may be lost).
    #[arg(long, env = "TXMQ_UNCLEAN_ELECTION")]
    unclean_election: bool,
}

impl Args {
    /// The controller's settings: all four controller flags or none.
    fn controller(&self) -> Result<Option<ControllerConfig>, String> {
        let given = [
            ("--controller-id", self.controller_id.is_some()),
            ("--controller-listen", self.controller_listen.is_some()),
            ("--controller-peers", self.controller_peers.is_some()),
            ("--controller-data-dir", self.controller_data_dir.is_some()),
        ];
        let missing: Vec<&str> = given.iter().filter(|(_, g)| !g).map(|(n, _)| *n).collect();
        if missing.len() == given.len() {
            return Ok(None);
        }
        if !missing.is_empty() {
            return Err(format!(
                "a controller needs --controller-id, --controller-listen, --controller-peers and \
                 --controller-data-dir together; missing: {}",
                missing.join(", ")
            ));
        }
        let (Some(id), Some(listen), Some(peers), Some(dir)) = (
            self.controller_id,
            self.controller_listen.clone(),
            self.controller_peers.clone(),
            self.controller_data_dir.clone(),
        ) else {
            return Err("controller flags incomplete".into());
        };
        let mut c = ControllerConfig::new(id, listen, peers, dir);
        c.master_expiry = self.master_expiry;
        c.unclean_election = self.unclean_election;
        c.validate().map_err(|e| e.to_string())?;
        Ok(Some(c))
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    // Flag combinations are usage errors: clap's message and exit code 2.
    let controller = match args.controller() {
        Ok(c) => c,
        Err(m) => Args::command()
            .error(clap::error::ErrorKind::ArgumentConflict, m)
            .exit(),
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Colours only on a terminal, so logs captured to a file stay plain text.
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new("info,openraft=error")),
        )
        .init();
    match run(args, controller).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` prints the whole chain on one line; our errors already
            // name their cause in their own message, so print the top one.
            eprintln!("txmq-nameserver: error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args, controller: Option<ControllerConfig>) -> anyhow::Result<()> {
    let config = NameserverConfig {
        listen: args.listen,
        broker_expiry: args.broker_expiry,
        controller,
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
