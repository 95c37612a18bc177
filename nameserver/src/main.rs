//! `txmq-nameserver`: parses flags, starts a [`Nameserver`] and stops it on
//! SIGINT or SIGTERM; SIGHUP reloads the ACL file, and without one is
//! logged and otherwise ignored. Everything else is in the library.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory as _, FromArgMatches as _, Parser};
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tracing::info;
use txmq_nameserver::{
    parse_peers, ClusterSecurity, ControllerConfig, Nameserver, NameserverConfig,
};
use txmq_remoting::flags::{parse_duration, DURATION_HINT};
use txmq_remoting::{Credentials, TlsFiles};

/// The txmq name service: brokers register here, clients look up topic routes here.
#[derive(Debug, Parser)]
#[command(name = "txmq-nameserver", version, about)]
struct Args {
    /// TOML file with settings: each flag's name with underscores as a key
    /// (`broker_expiry = "10s"`); flags and environment variables beat it.
    #[arg(long, env = "TXMQ_CONFIG")]
    config: Option<PathBuf>,

    /// How log lines are written: text, or one JSON object per line.
    #[arg(long, env = "TXMQ_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,

    /// Which log lines are written, in `RUST_LOG`'s filter syntax (`debug`,
    /// `info,txmq_nameserver=debug`) [default: RUST_LOG, else info,openraft=error].
    #[arg(long, env = "TXMQ_LOG_LEVEL")]
    log_level: Option<String>,

    /// Address to listen on (host:port).
    #[arg(long, env = "TXMQ_LISTEN", default_value = txmq_nameserver::DEFAULT_LISTEN, value_parser = parse_listen)]
    listen: String,

    /// Drop a broker from all routes after this long without a heartbeat (e.g. 500ms, 6s, 2m).
    #[arg(long, env = "TXMQ_BROKER_EXPIRY", default_value = "30s", value_parser = parse_duration)]
    broker_expiry: Duration,

    /// Run a controller member (the Raft group that elects broker groups'
    /// masters) with this member id; needs the other --controller-* flags.
    #[arg(long, env = "TXMQ_CONTROLLER_ID")]
    controller_id: Option<u64>,

    /// Address the controller member listens on for Raft peers, brokers and admins (host:port).
    #[arg(long, env = "TXMQ_CONTROLLER_LISTEN", value_parser = parse_listen)]
    controller_listen: Option<String>,

    /// Every controller member: ID=HOST:PORT,ID=HOST:PORT,... (1, 3 or 5 members).
    #[arg(long, env = "TXMQ_CONTROLLER_PEERS", value_parser = parse_peers)]
    controller_peers: Option<BTreeMap<u64, String>>,

    /// Where the controller keeps its Raft log, vote and snapshot.
    #[arg(long, env = "TXMQ_CONTROLLER_DATA_DIR")]
    controller_data_dir: Option<PathBuf>,

    /// The controller takes a broker for dead after this long without a heartbeat.
    #[arg(long, env = "TXMQ_MASTER_EXPIRY", default_value = "5s", value_parser = parse_duration)]
    master_expiry: Duration,

    /// When no in-sync replica of a group is alive, elect one that is not
    /// (acknowledged records may be lost).
    #[arg(long, env = "TXMQ_UNCLEAN_ELECTION")]
    unclean_election: bool,

    /// This server's TLS certificate chain (PEM); with --tls-key, both
    /// listeners (nameserver and controller) serve TLS only.
    #[arg(long, env = "TXMQ_TLS_CERT")]
    tls_cert: Option<PathBuf>,

    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "TXMQ_TLS_KEY")]
    tls_key: Option<PathBuf>,

    /// The CA (PEM) that signs client certificates and the other
    /// controller members' certificates; connections to those members use
    /// TLS when it is given.
    #[arg(long, env = "TXMQ_TLS_CA")]
    tls_ca: Option<PathBuf>,

    /// Require a client certificate signed by --tls-ca (mutual TLS).
    #[arg(long, env = "TXMQ_TLS_CLIENT_AUTH")]
    tls_client_auth: bool,

    /// Users and their permissions (TOML, reloaded when it changes or on
    /// SIGHUP); every connection must then authenticate. Without it,
    /// anyone who reaches the port may do anything.
    #[arg(long, env = "TXMQ_ACL_FILE")]
    acl_file: Option<PathBuf>,

    /// The user the controller signs in as to the other members (a user
    /// with `broker = true` in their ACL file).
    #[arg(long, env = "TXMQ_ACCESS_KEY")]
    access_key: Option<String>,

    /// The secret of --access-key.
    #[arg(long, env = "TXMQ_SECRET_KEY", hide_env_values = true)]
    secret_key: Option<String>,

    /// Serve Prometheus metrics over HTTP at http://ADDR/metrics, e.g.
    /// 127.0.0.1:9101 [default: not served].
    #[arg(long, env = "TXMQ_METRICS_LISTEN", value_parser = parse_listen)]
    metrics_listen: Option<String>,
}

/// A listen address: `host:port`, port 0 for any free one.
fn parse_listen(s: &str) -> Result<String, String> {
    txmq_remoting::check_host_port(s, true).map(|()| s.to_string())
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

    /// The credentials of the controller's connections: both keys or
    /// neither; an empty one counts as not given.
    fn credentials(&self) -> Result<Option<Credentials>, String> {
        Credentials::from_flags(self.access_key.as_deref(), self.secret_key.as_deref())
            .map_err(String::from)
    }

    /// TLS, the ACL file and the credentials the flags ask for.
    fn security(&self, credentials: Option<Credentials>) -> Result<ClusterSecurity, String> {
        let files = TlsFiles {
            cert: self.tls_cert.clone(),
            key: self.tls_key.clone(),
            ca: self.tls_ca.clone(),
        };
        ClusterSecurity::load(
            &files,
            self.tls_client_auth,
            self.acl_file.as_deref(),
            credentials,
        )
    }
}

/// The flags with the `--config` file's settings under them: each key of
/// the file that the command line and the environment leave unset is
/// passed as its flag, and the whole is parsed again.
fn parse_with_config() -> Result<Args, String> {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let matches = Args::command().get_matches_from(&argv);
    let Some(path) = matches.get_one::<PathBuf>("config") else {
        return Args::from_arg_matches(&matches).map_err(|e| e.to_string());
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
    let table: toml::Table = toml::from_str(&text)
        .map_err(|e| format!("invalid config file {}: {e}", path.display()))?;
    let mut argv = argv;
    let command = Args::command();
    for (key, value) in table {
        let known = command
            .get_arguments()
            .any(|a| a.get_id() == key.as_str() && key != "config");
        if !known {
            return Err(format!(
                "invalid config file {}: unknown key '{key}'",
                path.display()
            ));
        }
        let given = matches!(
            matches.value_source(&key),
            Some(clap::parser::ValueSource::CommandLine | clap::parser::ValueSource::EnvVariable)
        );
        if given {
            continue;
        }
        let flag = format!("--{}", key.replace('_', "-"));
        let text = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(n) => n.to_string(),
            toml::Value::Boolean(true) => {
                argv.push(flag.into());
                continue;
            }
            toml::Value::Boolean(false) => continue,
            toml::Value::Array(items) => items
                .iter()
                .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string))
                .collect::<Vec<_>>()
                .join(","),
            other => {
                return Err(format!(
                    "invalid config file {}: key '{key}' cannot be {}",
                    path.display(),
                    other.type_str()
                ))
            }
        };
        argv.push(format!("{flag}={text}").into());
    }
    Args::try_parse_from(argv).map_err(|e| format!("invalid config file {}: {e}", path.display()))
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_with_config() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("txmq-nameserver: error: {e}");
            return ExitCode::from(2);
        }
    };
    // Flag combinations are usage errors: clap's message and exit code 2.
    let usage = |m: String| -> ! {
        Args::command()
            .error(clap::error::ErrorKind::ArgumentConflict, m)
            .exit()
    };
    if args.broker_expiry.is_zero() {
        usage(format!("--broker-expiry must be above 0 ({DURATION_HINT})"));
    }
    if args.tls_client_auth && (args.tls_cert.is_none() || args.tls_key.is_none()) {
        usage("--tls-client-auth needs --tls-cert and --tls-key".into());
    }
    let controller = args.controller().unwrap_or_else(|m| usage(m));
    let credentials = args.credentials().unwrap_or_else(|m| usage(m));
    let logging = args
        .log_format
        .parse()
        .and_then(|format| txmq_remoting::logging::init(format, args.log_level.as_deref()));
    if let Err(e) = logging {
        usage(e);
    }
    for w in controller.iter().flat_map(ControllerConfig::warnings) {
        tracing::warn!("{w}");
    }
    // After the logger: loading the ACL file logs. A certificate, key or
    // ACL file that cannot be used is a bad setting (exit 2, as the
    // broker's), named with why, found before anything is bound.
    let security = match args.security(credentials) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("txmq-nameserver: error: security settings: {e}");
            return ExitCode::from(2);
        }
    };
    match run(args, controller, security).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` prints the whole chain on one line; our errors already
            // name their cause in their own message, so print the top one.
            eprintln!("txmq-nameserver: error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(
    args: Args,
    controller: Option<ControllerConfig>,
    security: ClusterSecurity,
) -> anyhow::Result<()> {
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
    // SIGHUP's default action would end the process at once, without the
    // graceful shutdown, for a signal operators send to reload.
    let mut sighup = signal(SignalKind::hangup())
        .map_err(|e| anyhow::anyhow!("cannot install a SIGHUP handler: {e}"))?;
    let has_acl = args.acl_file.is_some();
    let mut nameserver = Nameserver::bind_with(config, security).await?;
    if let Some(listen) = &args.metrics_listen {
        nameserver = nameserver.with_metrics_listen(listen).await?;
    }
    let token = shutdown.clone();
    tokio::spawn(async move {
        let name = loop {
            tokio::select! {
                _ = sigint.recv() => break "SIGINT",
                _ = sigterm.recv() => break "SIGTERM",
                // With an ACL file, its watcher reloads it on the same signal.
                _ = sighup.recv() => if !has_acl {
                    info!("SIGHUP: no ACL file (--acl-file) to reload; the nameserver goes on");
                },
            }
        };
        info!(signal = name, "shutting down");
        token.cancel();
    });
    nameserver.run(shutdown).await;
    Ok(())
}
