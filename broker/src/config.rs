//! Broker settings: command-line flags, `TXMQ_*` environment variables and
//! a TOML file (`--config`), in that order of precedence, over defaults.
//!
//! TOML keys are the flag names with underscores, e.g.
//! `data_dir = "/var/lib/txmq"`, `flush = "sync"`, `heartbeat_interval = "10s"`.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;
use txmq_remoting::flags::{parse_duration, DURATION_HINT};

use crate::store::FlushMode;
use crate::transaction::TxConfig;

/// The broker's resolved settings.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// Address clients connect to.
    pub listen: String,
    /// Address registered with the nameservers, so the one clients are
    /// routed to; `None`: the address bound for `listen`. For a broker behind
    /// a proxy or a NAT.
    pub advertise_addr: Option<String>,
    /// Nameservers to register with. Empty with `standalone`: the in-process one.
    pub nameservers: Vec<String>,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Unique broker name.
    pub broker_name: String,
    /// Cluster name.
    pub cluster: String,
    /// Acknowledgement policy.
    pub flush: FlushMode,
    /// Under sync flush, how long an answer waits for its fdatasync before
    /// it is sent with status `FLUSH_DISK_TIMEOUT`.
    pub sync_flush_timeout: Duration,
    /// Under async flush, how often the commit log is fdatasynced.
    pub flush_interval: Duration,
    /// How often the consume queues are fsynced and a checkpoint written.
    pub checkpoint_interval: Duration,
    /// How often to re-register with the nameservers.
    pub heartbeat_interval: Duration,
    /// Create unknown topics on first send.
    pub auto_create_topics: bool,
    /// Queues of an auto-created topic.
    pub default_queues: u32,
    /// Also run a nameserver in this process.
    pub standalone: bool,
    /// Where the in-process nameserver listens (standalone only).
    pub nameserver_listen: String,
    /// Broker expiry of the in-process nameserver (standalone only).
    pub broker_expiry: Duration,
    /// Commit-log segments older than this are deleted.
    pub retention: Duration,
    /// Commit-log segment size in bytes.
    pub segment_size: u64,
    /// Largest message body accepted, in bytes (its topic, key, tag and
    /// properties may take 32 KiB more).
    pub max_message_size: usize,
    /// Largest frame accepted on a connection, in bytes.
    pub max_frame_size: usize,
    /// How long a frame may take to arrive once its first bytes have;
    /// zero: no limit.
    pub frame_timeout: Duration,
    /// Transaction timeouts and check-back limits.
    pub transactions: TxConfig,
    /// A consumer without a heartbeat for this long has left its group.
    /// Also how long, after the broker starts or a consumer's connection
    /// closes, a queue someone may still read waits for a member that
    /// holds it (see `groups.rs`).
    pub consumer_expiry: Duration,
    /// Back-off before each redelivery of a message handed back for retry
    /// (the last one repeats).
    pub retry_delays: Vec<Duration>,
    /// The furthest ahead a delayed message may be delivered.
    pub max_delay: Duration,
    /// An idempotent producer's id unused this long is forgotten.
    pub producer_id_expiry: Duration,
    /// The most the commit log's records may take; sends are refused beyond
    /// it (the active segment reserves its whole size on disk).
    pub max_store_size: Option<u64>,
    /// New messages are refused while the disk holding the data dir has
    /// less free (0: no limit).
    pub disk_free_limit: u64,
    /// Connections served at once (greeted ones); more are refused.
    pub max_connections: usize,
    /// Topics this broker holds; consumer groups' `%RETRY%`/`%DLQ%`
    /// topics are bounded apart, by the same number.
    pub max_topics: usize,
    /// Bytes of requests one connection may have in flight.
    pub max_inflight_bytes: usize,
    /// Replication within the broker group (`--broker-name`).
    pub replication: ReplicationConfig,
    /// TLS and the ACL file for the broker's port, and how the broker's
    /// own connections (to nameservers, its master, the controller) show
    /// who they are.
    pub security: SecurityConfig,
    /// Where Prometheus metrics are served at `/metrics`; `None`: not served.
    pub metrics_listen: Option<String>,
    /// Where the RocketMQ 5 gRPC API is served (`crate::grpc`); `None`:
    /// not served.
    pub grpc_listen: Option<String>,
    /// Calls (HTTP/2 streams) one gRPC connection may have open at once.
    pub grpc_max_streams: u32,
    /// Keep the message index (`txmq msg show|find`; see the store's
    /// `index.rs`).
    pub message_index: bool,
    /// Threads of their own that serve the connections of `listen`, each
    /// connection on one (`txmq_remoting::server::NetworkThreads`); 0: the
    /// runtime's worker threads serve them.
    pub network_threads: usize,
}

/// The security flags: TLS when cert and key are given (`--tls-*`),
/// authentication and permissions with `--acl-file`, and the user the
/// broker signs in as elsewhere (`--access-key`, `--secret-key`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SecurityConfig {
    /// The broker's certificate and key (its port serves TLS when both
    /// are set), and the CA its own connections verify servers with (TLS
    /// to them when set) and client certificates are checked against.
    pub tls: txmq_remoting::TlsFiles,
    /// Clients must present a certificate signed by the CA (mutual TLS).
    pub tls_client_auth: bool,
    /// Users and permissions; `None`: anyone may do anything.
    pub acl_file: Option<PathBuf>,
    /// The user the broker's own connections sign in as.
    pub credentials: Option<txmq_remoting::Credentials>,
}

/// A broker's part in its broker group.
#[derive(Debug, Clone)]
pub struct ReplicationConfig {
    /// Master (takes writes) or slave (copies the master's log).
    pub role: txmq_protocol::BrokerRole,
    /// A master: whether answers wait for replicas.
    pub mode: ReplicationMode,
    /// Under sync replication, how many replicas (the master counts) must
    /// hold a record before it is answered.
    pub min_insync_replicas: u32,
    /// How long an answer waits for replicas before `FLUSH_SLAVE_TIMEOUT`.
    pub timeout: Duration,
    /// A slave is in sync while it has held everything the master wrote up
    /// to this long ago.
    pub lag_max: Duration,
    /// A slave: the master's address; `None`: found through the nameservers.
    pub master_addr: Option<String>,
    /// The controller's addresses (`--controller`): when given, the
    /// controller elects the group's master and `role` is only where the
    /// broker starts (a slave without a master, until it hears).
    pub controllers: Vec<String>,
    /// Under a controller: how long a heartbeat answer may be held.
    pub controller_wait: Duration,
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        ReplicationConfig {
            role: txmq_protocol::BrokerRole::Master,
            mode: ReplicationMode::Async,
            min_insync_replicas: 2,
            timeout: Duration::from_secs(3),
            lag_max: Duration::from_secs(1),
            master_addr: None,
            controllers: Vec::new(),
            controller_wait: Duration::from_secs(1),
        }
    }
}

impl ReplicationConfig {
    /// Whether a controller decides this broker's role.
    pub fn controlled(&self) -> bool {
        !self.controllers.is_empty()
    }
}

/// When a master answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplicationMode {
    /// Once stored on the master; slaves copy it afterwards.
    Async,
    /// Once `--min-insync-replicas` replicas hold it.
    Sync,
}

impl ReplicationMode {
    /// `async`, `sync`.
    pub fn name(self) -> &'static str {
        match self {
            ReplicationMode::Async => "async",
            ReplicationMode::Sync => "sync",
        }
    }
}

/// A broker's role as written on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RoleArg {
    /// Takes writes; slaves copy its commit log.
    Master,
    /// Copies its master's commit log; serves reads.
    Slave,
}

/// RocketMQ's retry back-off: levels 3 to 18 of its delay levels.
pub const DEFAULT_RETRY_DELAYS: &str = "10s,30s,1m,2m,3m,4m,5m,6m,7m,8m,9m,10m,20m,30m,1h,2h";

impl BrokerConfig {
    /// Defaults, with the data in `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> BrokerConfig {
        BrokerConfig {
            listen: "127.0.0.1:10911".into(),
            advertise_addr: None,
            nameservers: vec!["127.0.0.1:9876".into()],
            data_dir: data_dir.into(),
            broker_name: "broker-a".into(),
            cluster: "DefaultCluster".into(),
            flush: FlushMode::Async,
            sync_flush_timeout: Duration::from_secs(5),
            flush_interval: Duration::from_millis(500),
            checkpoint_interval: Duration::from_secs(1),
            heartbeat_interval: Duration::from_secs(10),
            auto_create_topics: true,
            default_queues: 4,
            standalone: false,
            nameserver_listen: "127.0.0.1:9876".into(),
            broker_expiry: Duration::from_secs(30),
            retention: Duration::from_secs(72 * 3600),
            segment_size: 1 << 30,
            max_message_size: 4 << 20,
            max_frame_size: txmq_protocol::DEFAULT_MAX_FRAME_LEN,
            frame_timeout: Duration::from_secs(30),
            transactions: TxConfig {
                timeout: Duration::from_secs(6),
                check_interval: Duration::from_secs(5),
                check_max: 15,
                check_rate: 1000,
                check_timeout: Duration::from_secs(3),
            },
            consumer_expiry: Duration::from_secs(30),
            retry_delays: parse_durations(DEFAULT_RETRY_DELAYS).unwrap_or_default(),
            max_delay: Duration::from_secs(7 * 24 * 3600),
            producer_id_expiry: Duration::from_secs(7 * 24 * 3600),
            max_store_size: None,
            disk_free_limit: 1 << 30,
            max_connections: 10_000,
            max_topics: 10_000,
            max_inflight_bytes: 64 << 20,
            replication: ReplicationConfig::default(),
            security: SecurityConfig::default(),
            metrics_listen: None,
            grpc_listen: None,
            grpc_max_streams: 128,
            message_index: true,
            network_threads: 0,
        }
    }

    /// Checks every address setting is `host:port` (port 0 only where
    /// the broker listens), naming the flag of one that is not.
    fn check_addresses(&self) -> Result<(), String> {
        let listen = [
            ("--listen", Some(&self.listen)),
            (
                "--nameserver-listen",
                Some(&self.nameserver_listen).filter(|_| self.standalone),
            ),
            ("--metrics-listen", self.metrics_listen.as_ref()),
            ("--grpc-listen", self.grpc_listen.as_ref()),
        ];
        for (flag, addr) in listen {
            if let Some(addr) = addr {
                txmq_remoting::check_host_port(addr, true).map_err(|e| format!("{flag}: {e}"))?;
            }
        }
        let peers = [
            ("--advertise-addr", self.advertise_addr.as_slice()),
            ("--master-addr", self.replication.master_addr.as_slice()),
            ("--nameserver", &self.nameservers),
            ("--controller", &self.replication.controllers),
        ];
        for (flag, list) in peers {
            if list.iter().any(|a| a.trim().is_empty()) {
                return Err(format!(
                    "{flag} lists an empty address (give host:port addresses, comma-separated)"
                ));
            }
            for addr in list {
                txmq_remoting::check_host_port(addr, false).map_err(|e| format!("{flag}: {e}"))?;
            }
        }
        Ok(())
    }

    /// Checks the settings for values that cannot work.
    ///
    /// # Errors
    /// A message naming the setting.
    pub fn validate(&self) -> Result<(), String> {
        check_network_threads(self.network_threads)
            .map_err(|e| format!("--network-threads {e}"))?;
        if self.broker_name.is_empty() || self.cluster.is_empty() {
            return Err("broker name and cluster must not be empty".into());
        }
        if self.segment_size < 1 << 20 {
            return Err(format!(
                "segment size {} is too small; at least 1 MiB",
                self.segment_size
            ));
        }
        // Each would make a broker that starts and serves nobody.
        if self.max_message_size == 0 {
            return Err(
                "--max-message-size must be above 0: 0 refuses every message with a body".into(),
            );
        }
        if self.max_connections == 0 {
            return Err("--max-connections must be at least 1: 0 refuses every client".into());
        }
        if self.grpc_max_streams == 0 {
            return Err("--grpc-max-streams must be at least 1: 0 refuses every gRPC call".into());
        }
        if self.max_message_size as u64 > self.segment_size / 2 {
            return Err("max message size must be at most half the segment size".into());
        }
        if self.max_message_size + 64 * 1024 > self.max_frame_size {
            return Err("max frame size must exceed max message size by at least 64 KiB".into());
        }
        if self.frame_timeout > Duration::from_secs(365 * 24 * 3600) {
            return Err(format!(
                "--frame-timeout must be at most a year (0s: no limit), not {}",
                humantime::format_duration(self.frame_timeout)
            ));
        }
        if self.default_queues == 0 || self.default_queues > 1024 {
            return Err("default queues must be between 1 and 1024".into());
        }
        self.check_addresses()?;
        if self.heartbeat_interval.is_zero() {
            return Err("heartbeat interval must not be zero".into());
        }
        if self.flush_interval.is_zero() || self.checkpoint_interval.is_zero() {
            return Err("--flush-interval and --checkpoint-interval must not be zero".into());
        }
        let tx = &self.transactions;
        if tx.check_interval.is_zero()
            || tx.check_rate == 0
            || tx.check_max == 0
            || tx.check_timeout.is_zero()
        {
            // A zero check timeout ended every check-back unanswered, so
            // every transaction was parked.
            return Err(
                "transaction check interval, rate, maximum and timeout must not be zero".into(),
            );
        }
        if self
            .max_store_size
            .is_some_and(|m| m < 2 * self.segment_size)
        {
            return Err(format!(
                "max store size must be at least two segments ({} bytes)",
                2 * self.segment_size
            ));
        }
        if self.consumer_expiry.is_zero() {
            return Err("consumer expiry must not be zero".into());
        }
        if self.retry_delays.is_empty() {
            return Err("--retry-delays must list at least one delay".into());
        }
        if let Some(d) = self.retry_delays.iter().find(|d| **d > self.max_delay) {
            return Err(format!(
                "each of --retry-delays must be at most --max-delay ({}): {} is longer",
                humantime::format_duration(self.max_delay),
                humantime::format_duration(*d)
            ));
        }
        if self.standalone && self.broker_expiry.is_zero() {
            return Err(format!("--broker-expiry must be above 0 ({DURATION_HINT})"));
        }
        if !self.standalone && self.nameservers.is_empty() {
            return Err("no nameserver given (use --nameserver or --standalone)".into());
        }
        let sec = &self.security;
        if self.standalone && sec.tls.cert.is_some() && sec.tls.ca.is_none() {
            return Err("--standalone with --tls-cert needs --tls-ca: the broker registers with its own nameserver over TLS and verifies it like any other".into());
        }
        if sec.tls_client_auth && (sec.tls.cert.is_none() || sec.tls.key.is_none()) {
            return Err("--tls-client-auth needs --tls-cert and --tls-key".into());
        }
        // Without credentials only a client certificate can sign the broker
        // in, and only a server asking for one reads it.
        if self.standalone
            && sec.acl_file.is_some()
            && sec.credentials.is_none()
            && !(sec.tls_client_auth && sec.tls.cert.is_some())
        {
            return Err("--standalone with --acl-file needs --access-key and --secret-key of a user with broker = true (or --tls-client-auth and a certificate whose common name is such a user): the broker signs in to its own nameserver".into());
        }
        let r = &self.replication;
        if r.min_insync_replicas == 0 {
            return Err("--min-insync-replicas must be at least 1 (the master counts)".into());
        }
        if r.timeout.is_zero() || r.lag_max.is_zero() {
            return Err("--replication-timeout and --replica-lag-max must not be zero".into());
        }
        if r.controlled() && r.master_addr.is_some() {
            return Err("--master-addr and --controller do not go together: the controller names the master".into());
        }
        if r.role == txmq_protocol::BrokerRole::Master && r.master_addr.is_some() && !r.controlled()
        {
            return Err("--master-addr is for a slave (--role slave)".into());
        }
        if r.role == txmq_protocol::BrokerRole::Slave
            && r.mode == ReplicationMode::Sync
            && !r.controlled()
        {
            return Err(
                "--replication is a master's setting; a slave copies its master's log".into(),
            );
        }
        Ok(())
    }
}

/// The most `--worker-threads` (and `--network-threads`) takes: more than
/// any machine's cores, and few enough that the system can start them (a
/// runtime that cannot start one panics).
const MAX_WORKER_THREADS: usize = 1024;

fn parse_worker_threads(s: &str) -> Result<usize, String> {
    parse_threads(s).and_then(check_worker_threads)
}

fn check_worker_threads(n: usize) -> Result<usize, String> {
    check_threads(n, 1)
}

fn parse_network_threads(s: &str) -> Result<usize, String> {
    parse_threads(s).and_then(check_network_threads)
}

/// 0 is allowed: connections on the worker threads.
fn check_network_threads(n: usize) -> Result<usize, String> {
    check_threads(n, 0)
}

fn parse_threads(s: &str) -> Result<usize, String> {
    s.parse::<usize>()
        .map_err(|_| format!("{s:?} is not a number of threads"))
}

fn check_threads(n: usize, least: usize) -> Result<usize, String> {
    if (least..=MAX_WORKER_THREADS).contains(&n) {
        Ok(n)
    } else {
        Err(format!("must be between {least} and {MAX_WORKER_THREADS}"))
    }
}

/// A comma-separated list of durations, e.g. `10s,30s,1m`.
fn parse_durations(s: &str) -> Result<Vec<Duration>, String> {
    split_list(s).iter().map(|d| parse_duration(d)).collect()
}

fn de_durations<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Vec<Duration>>, D::Error> {
    de_list(d)?
        .map(|v| parse_durations(&v.join(",")).map_err(serde::de::Error::custom))
        .transpose()
}

/// A byte size: `1048576`, `64KiB`, `16MiB`, `1GiB` (also K/M/G, KB/MB/GB as powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid size {s:?}; write e.g. 1048576, 64KiB, 1GiB"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return Err(format!("invalid size unit in {s:?}; use KiB, MiB or GiB")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

fn de_opt<'de, D, T>(d: D, parse: fn(&str) -> Result<T, String>) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    let s: Option<String> = Option::deserialize(d)?;
    s.map(|s| parse(&s).map_err(serde::de::Error::custom))
        .transpose()
}

fn de_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    de_opt(d, parse_duration)
}

fn de_size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum NumOrStr {
        N(u64),
        S(String),
    }
    match Option::<NumOrStr>::deserialize(d)? {
        None => Ok(None),
        Some(NumOrStr::N(n)) => Ok(Some(n)),
        Some(NumOrStr::S(s)) => parse_size(&s).map(Some).map_err(serde::de::Error::custom),
    }
}

fn de_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(Option::<OneOrMany>::deserialize(d)?.map(|v| match v {
        OneOrMany::One(s) => split_list(&s),
        OneOrMany::Many(v) => v,
    }))
}

fn split_list(s: &str) -> Vec<String> {
    s.split([',', ';'])
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// Flush policy as written on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FlushArg {
    /// Acknowledge once in the page cache.
    Async,
    /// Acknowledge after fdatasync (group commit).
    Sync,
}

/// `txmq-broker`'s command line; every flag is also `TXMQ_<NAME>` in the
/// environment and a key of the `--config` TOML file.
#[derive(Debug, Default, Parser, Deserialize)]
#[command(
    name = "txmq-broker",
    version,
    about = "The txmq broker: durable storage, transactions and consumption"
)]
#[serde(deny_unknown_fields)]
pub struct BrokerArgs {
    /// TOML file with settings (flags and environment variables override it).
    #[arg(long, env = "TXMQ_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:10911].
    #[arg(long, env = "TXMQ_LISTEN")]
    pub listen: Option<String>,
    /// Address registered with the nameservers, where clients are routed
    /// (for a broker behind a proxy or a NAT) [default: the bound listen address].
    #[arg(long, env = "TXMQ_ADVERTISE_ADDR")]
    pub advertise_addr: Option<String>,
    /// Nameserver address(es), comma-separated [default: 127.0.0.1:9876].
    #[arg(long, env = "TXMQ_NAMESERVER", value_delimiter = ',')]
    #[serde(default, deserialize_with = "de_list")]
    pub nameserver: Option<Vec<String>>,
    /// Data directory [default: ./txmq-data].
    #[arg(long, env = "TXMQ_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Broker name, unique in the cluster [default: broker-a].
    #[arg(long, env = "TXMQ_BROKER_NAME")]
    pub broker_name: Option<String>,
    /// Cluster name [default: DefaultCluster].
    #[arg(long, env = "TXMQ_CLUSTER")]
    pub cluster: Option<String>,
    /// async: acknowledge once in the page cache; sync: after fdatasync (group commit) [default: async].
    #[arg(long, env = "TXMQ_FLUSH", value_enum)]
    pub flush: Option<FlushArg>,
    /// Under sync flush, how long an answer waits for its fdatasync before
    /// it goes out with status FLUSH_DISK_TIMEOUT; 0s: no wait [default: 5s].
    #[arg(long, env = "TXMQ_SYNC_FLUSH_TIMEOUT", value_parser = parse_duration)]
    #[serde(default, deserialize_with = "de_duration")]
    pub sync_flush_timeout: Option<Duration>,
    /// Under async flush, how often the commit log is fdatasynced: what a
    /// power cut may lose at most [default: 500ms].
    #[arg(long, env = "TXMQ_FLUSH_INTERVAL", value_parser = parse_duration)]
    #[serde(default, deserialize_with = "de_duration")]
    pub flush_interval: Option<Duration>,
    /// How often the consume queues are fsynced and a checkpoint is
    /// written: a restart replays the log from the last one [default: 1s].
    #[arg(long, env = "TXMQ_CHECKPOINT_INTERVAL", value_parser = parse_duration)]
    #[serde(default, deserialize_with = "de_duration")]
    pub checkpoint_interval: Option<Duration>,
    /// How often to re-register with the nameservers [default: 10s].
    #[arg(long, env = "TXMQ_HEARTBEAT_INTERVAL", value_parser = parse_duration)]
    #[serde(default, deserialize_with = "de_duration")]
    pub heartbeat_interval: Option<Duration>,
    /// Create unknown topics on first send [default: true].
    #[arg(long, env = "TXMQ_AUTO_CREATE_TOPICS", num_args = 0..=1, default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new())]
    pub auto_create_topics: Option<bool>,
    /// Queues of an auto-created topic [default: 4].
    #[arg(long, env = "TXMQ_DEFAULT_QUEUES")]
    pub default_queues: Option<u32>,
    /// Also run a nameserver in this process (on --nameserver-listen) [default: false].
    #[arg(long, env = "TXMQ_STANDALONE", num_args = 0..=1, default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new())]
    pub standalone: Option<bool>,
    /// Where the standalone nameserver listens [default: 127.0.0.1:9876].
    #[arg(long, env = "TXMQ_NAMESERVER_LISTEN")]
    pub nameserver_listen: Option<String>,
    /// Broker expiry of the standalone nameserver [default: 30s].
    #[arg(long, env = "TXMQ_BROKER_EXPIRY", value_parser = parse_duration)]
    #[serde(default, deserialize_with = "de_duration")]
    pub broker_expiry: Option<Duration>,
    /// Delete commit-log segments older than this [default: 72h].
    #[arg(long, env = "TXMQ_RETENTION", value_parser = parse_duration)]
    #[serde(default, deserialize_with = "de_duration")]
    pub retention: Option<Duration>,
    /// Commit-log segment size, e.g. 1GiB [default: 1GiB].
    #[arg(long, env = "TXMQ_SEGMENT_SIZE", value_parser = parse_size)]
    #[serde(default, deserialize_with = "de_size")]
    pub segment_size: Option<u64>,
    /// Largest message body accepted, e.g. 4MiB [default: 4MiB]; its topic, key, tag and properties may take 32 KiB more.
    #[arg(long, env = "TXMQ_MAX_MESSAGE_SIZE", value_parser = parse_size)]
    #[serde(default, deserialize_with = "de_size")]
    pub max_message_size: Option<u64>,
    /// Largest frame accepted on a connection, e.g. 8MiB [default: 8MiB].
    #[arg(long, env = "TXMQ_MAX_FRAME_SIZE", value_parser = parse_size)]
    #[serde(default, deserialize_with = "de_size")]
    pub max_frame_size: Option<u64>,
    /// How long a frame may take to arrive once its first bytes have; a
    /// connection whose peer stops or trickles mid-frame is closed between
    /// once and twice this after the frame began; 0s: no limit [default: 30s].
    #[arg(long, env = "TXMQ_FRAME_TIMEOUT", value_parser = parse_duration)]
    #[serde(default, deserialize_with = "de_duration")]
    pub frame_timeout: Option<Duration>,
    /// Age of a prepared transaction before its first check-back [default: 6s].
    #[arg(long, env = "TXMQ_TRANSACTION_TIMEOUT", value_parser = parse_duration)]
    #[serde(default, deserialize_with = "de_duration")]
    pub transaction_timeout: Option<Duration>,
    /// How often the check-back scheduler looks for due transactions, and the
    /// pause between two checks of one transaction [default: 5s].
    #[arg(long, env = "TXMQ_TRANSACTION_CHECK_INTERVAL", value_parser = parse_duration)]
    #[serde(default, deserialize_with = "de_duration")]
    pub transaction_check_interval: Option<Duration>,
    /// Check-backs before a transaction is parked for an operator [default: 15].
    #[arg(long, env = "TXMQ_TRANSACTION_CHECK_MAX")]
    pub transaction_check_max: Option<u32>,
    /// Check-backs per second per producer group [default: 1000].
    #[arg(long, env = "TXMQ_TRANSACTION_CHECK_RATE")]
    pub transaction_check_rate: Option<u32>,
    /// How long a check-back waits for the producer's answer [default: 3s].
    #[arg(long, env = "TXMQ_TRANSACTION_CHECK_TIMEOUT", value_parser = parse_duration)]
    #[serde(default, deserialize_with = "de_duration")]
    pub transaction_check_timeout: Option<Duration>,
    /// A consumer without a heartbeat for this long has left its group; also how long, after
    /// the broker starts or a consumer's connection closes, its queues wait for it [default: 30s].
    #[arg(long, env = "TXMQ_CONSUMER_EXPIRY", value_parser = parse_duration)]
    #[serde(default, deserialize_with = "de_duration")]
    pub consumer_expiry: Option<Duration>,
    /// Back-off before each redelivery of a message handed back for retry,
    /// comma-separated; the last repeats [default: 10s,30s,1m,2m,...,30m,1h,2h].
    #[arg(long, env = "TXMQ_RETRY_DELAYS", value_parser = parse_duration, value_delimiter = ',')]
    #[serde(default, deserialize_with = "de_durations")]
    pub retry_delays: Option<Vec<Duration>>,
    /// The furthest ahead a delayed message may be delivered [default: 7d].
    #[arg(long, env = "TXMQ_MAX_DELAY", value_parser = parse_duration)]
    #[serde(default, deserialize_with = "de_duration")]
    pub max_delay: Option<Duration>,
    /// An idempotent producer's id unused this long is forgotten; its next
    /// stamped send gets UNKNOWN_PRODUCER_ID and the producer asks for a
    /// new one [default: 7d].
    #[arg(long, env = "TXMQ_PRODUCER_ID_EXPIRY", value_parser = parse_duration)]
    #[serde(default, deserialize_with = "de_duration")]
    pub producer_id_expiry: Option<Duration>,
    /// The most the commit log's records may take, e.g. 50GiB; sends are
    /// refused with STORE_FULL beyond it (ends of transactions and offset
    /// commits still go through). The active segment reserves its whole
    /// size on disk [default: no limit].
    #[arg(long, env = "TXMQ_MAX_STORE_SIZE", value_parser = parse_size)]
    #[serde(default, deserialize_with = "de_size")]
    pub max_store_size: Option<u64>,
    /// Sends of new messages are refused with STORE_FULL while the file
    /// system holding --data-dir has less than this free, e.g. 512MiB; ends
    /// of transactions, offset commits and reads go on, and sends are taken
    /// again once space is freed. 0 turns it off [default: 1GiB].
    #[arg(long, env = "TXMQ_DISK_FREE_LIMIT", value_parser = parse_size)]
    #[serde(default, deserialize_with = "de_size")]
    pub disk_free_limit: Option<u64>,
    /// Connections served at once; a hello past it is refused with
    /// TOO_MANY_CONNECTIONS [default: 10000].
    #[arg(long, env = "TXMQ_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Topics the broker holds; creating or auto-creating one more is
    /// refused with TOO_MANY_TOPICS. Consumer groups' %RETRY%/%DLQ% topics
    /// are bounded apart, by the same number [default: 10000].
    #[arg(long, env = "TXMQ_MAX_TOPICS")]
    pub max_topics: Option<usize>,
    /// Bytes of requests one connection may have in flight; past it the
    /// broker reads no more from it until answers go out [default: 64MiB].
    #[arg(long, env = "TXMQ_MAX_INFLIGHT_BYTES", value_parser = parse_size)]
    #[serde(default, deserialize_with = "de_size")]
    pub max_inflight_bytes: Option<u64>,
    /// master: takes writes; slave: copies the master of its broker group
    /// (same --broker-name) and serves reads [default: master].
    #[arg(long, env = "TXMQ_ROLE", value_enum)]
    pub role: Option<RoleArg>,
    /// A master's replication: async answers once stored here; sync once
    /// --min-insync-replicas replicas hold the record [default: async].
    #[arg(long, env = "TXMQ_REPLICATION", value_enum)]
    pub replication: Option<ReplicationMode>,
    /// Under sync replication, replicas (the master counts) that must hold
    /// a record before it is answered [default: 2].
    #[arg(long, env = "TXMQ_MIN_INSYNC_REPLICAS")]
    pub min_insync_replicas: Option<u32>,
    /// Under sync replication, how long an answer waits for the replicas
    /// before it goes out with FLUSH_SLAVE_TIMEOUT [default: 3s].
    #[arg(long, env = "TXMQ_REPLICATION_TIMEOUT", value_parser = parse_duration)]
    #[serde(default, deserialize_with = "de_duration")]
    pub replication_timeout: Option<Duration>,
    /// A slave is in sync while it holds everything the master wrote up to
    /// this long ago [default: 1s].
    #[arg(long, env = "TXMQ_REPLICA_LAG_MAX", value_parser = parse_duration)]
    #[serde(default, deserialize_with = "de_duration")]
    pub replica_lag_max: Option<Duration>,
    /// A slave's master, host:port [default: found through the nameservers
    /// by --broker-name].
    #[arg(long, env = "TXMQ_MASTER_ADDR")]
    pub master_addr: Option<String>,
    /// The controller (its members' --controller-listen addresses,
    /// comma-separated): it elects this broker group's master and fails
    /// over automatically; replaces --role.
    #[arg(long, env = "TXMQ_CONTROLLER", value_delimiter = ',', conflicts_with_all = ["role", "master_addr"])]
    #[serde(default, deserialize_with = "de_list")]
    pub controller: Option<Vec<String>>,
    /// This broker's certificate (PEM); with --tls-key, its port serves
    /// TLS and refuses plaintext.
    #[arg(long, env = "TXMQ_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "TXMQ_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// The CA (PEM) that signs the servers this broker connects to (its
    /// connections to nameservers, its master and the controller use TLS
    /// when given) and, with --tls-client-auth, its clients' certificates.
    #[arg(long, env = "TXMQ_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Clients must present a certificate signed by --tls-ca (mutual
    /// TLS); one whose common name is a user's access key signs in as
    /// that user without a secret [default: false].
    #[arg(long, env = "TXMQ_TLS_CLIENT_AUTH", num_args = 0..=1, default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new())]
    pub tls_client_auth: Option<bool>,
    /// Users and their permissions (TOML, reloaded on change and on
    /// SIGHUP): every connection must sign in and every request is
    /// checked [default: none, anyone may do anything].
    #[arg(long, env = "TXMQ_ACL_FILE")]
    pub acl_file: Option<PathBuf>,
    /// The user this broker signs in as at nameservers, its master and
    /// the controller (with --secret-key).
    #[arg(long, env = "TXMQ_ACCESS_KEY")]
    pub access_key: Option<String>,
    /// The secret of --access-key.
    #[arg(long, env = "TXMQ_SECRET_KEY", hide_env_values = true)]
    pub secret_key: Option<String>,
    /// How log lines are written: text, or one JSON object per line [default: text].
    #[arg(long, env = "TXMQ_LOG_FORMAT", value_parser = ["text", "json"])]
    pub log_format: Option<String>,
    /// Which log lines are written, in `RUST_LOG`'s filter syntax (`debug`,
    /// `info,txmq_broker::transaction=debug`) [default: RUST_LOG, else info,openraft=error].
    #[arg(long, env = "TXMQ_LOG_LEVEL")]
    pub log_level: Option<String>,
    /// Serve Prometheus metrics over HTTP at http://ADDR/metrics, e.g.
    /// 127.0.0.1:9100 [default: not served].
    #[arg(long, env = "TXMQ_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// Serve the RocketMQ 5 gRPC API (apache.rocketmq.v2.MessagingService)
    /// at ADDR, for the official RocketMQ clients, e.g. 127.0.0.1:8081
    /// [default: not served].
    #[arg(long, env = "TXMQ_GRPC_LISTEN")]
    pub grpc_listen: Option<String>,
    /// Calls (HTTP/2 streams) one gRPC connection may have open at once;
    /// the broker announces it, so a client queues its calls past it, and
    /// refuses a stream past it with REFUSED_STREAM [default: 128].
    #[arg(long, env = "TXMQ_GRPC_MAX_STREAMS")]
    pub grpc_max_streams: Option<u32>,
    /// Keep the message index by msg id and key, for `txmq msg show` and
    /// `txmq msg find`; false saves its writes (lookups are then refused;
    /// `txmq msg get` still works) [default: true].
    #[arg(long, env = "TXMQ_MESSAGE_INDEX", num_args = 0..=1, default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new())]
    pub message_index: Option<bool>,
    /// Threads that serve connections and run the store's writes. One can
    /// serve many connections; fewer than the cores leaves cores to other
    /// processes, and spares the hand-offs of work between threads (on a
    /// machine the broker shares with its clients, 1 is often fastest)
    /// [default: one per core].
    #[arg(long, env = "TXMQ_WORKER_THREADS", value_name = "N", value_parser = parse_worker_threads)]
    pub worker_threads: Option<usize>,
    /// Threads of their own that serve the connections of `--listen`:
    /// each connection stays on one of them, with its reads, writes and
    /// requests; 0 serves connections on the worker threads
    /// (`--worker-threads`) [default: 0].
    #[arg(long, env = "TXMQ_NETWORK_THREADS", value_name = "N", value_parser = parse_network_threads)]
    pub network_threads: Option<usize>,
}

impl BrokerArgs {
    /// The settings of the `--config` file (all unset without one).
    fn file(&self) -> Result<BrokerArgs, String> {
        match &self.config {
            None => Ok(BrokerArgs::default()),
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
                toml::from_str::<BrokerArgs>(&text)
                    .map_err(|e| format!("invalid config file {}: {e}", path.display()))
            }
        }
    }

    /// How the process logs (`--log-format`, `--log-level`, or their
    /// keys in the `--config` file).
    ///
    /// # Errors
    /// An unreadable or invalid config file, or an unknown format.
    pub fn logging(&self) -> Result<(txmq_remoting::logging::LogFormat, Option<String>), String> {
        let file = self.file()?;
        let format = match self.log_format.as_deref().or(file.log_format.as_deref()) {
            Some(f) => f.parse()?,
            None => txmq_remoting::logging::LogFormat::Text,
        };
        Ok((format, self.log_level.clone().or(file.log_level)))
    }

    /// How many threads the process's runtime runs on (`--worker-threads`
    /// or its key in the `--config` file); `None`: one per core.
    ///
    /// # Errors
    /// An unreadable or invalid config file, or a count out of range.
    pub fn worker_threads(&self) -> Result<Option<usize>, String> {
        if self.worker_threads.is_some() {
            // Checked as the flag (or its variable) was parsed.
            return Ok(self.worker_threads);
        }
        let Some(n) = self.file()?.worker_threads else {
            return Ok(None);
        };
        check_worker_threads(n).map(Some).map_err(|e| {
            let path = self.config.as_deref().unwrap_or(std::path::Path::new(""));
            format!("invalid config file {}: worker_threads {e}", path.display())
        })
    }

    /// Reads the `--config` file, if any, and resolves every setting.
    ///
    /// # Errors
    /// An unreadable or invalid config file, or invalid settings.
    pub fn resolve(self) -> Result<BrokerConfig, String> {
        let file = self.file()?;
        let d = BrokerConfig::new("./txmq-data");
        let standalone = self.standalone.or(file.standalone).unwrap_or(d.standalone);
        let explicit_ns = self.nameserver.or(file.nameserver);
        let to_usize =
            |n: u64, what: &str| usize::try_from(n).map_err(|_| format!("{what} is too large"));
        let config = BrokerConfig {
            listen: self.listen.or(file.listen).unwrap_or(d.listen),
            advertise_addr: self.advertise_addr.or(file.advertise_addr),
            // Standalone without an explicit list registers with its own nameserver only.
            nameservers: match explicit_ns {
                Some(list) => list,
                None if standalone => Vec::new(),
                None => d.nameservers,
            },
            data_dir: self.data_dir.or(file.data_dir).unwrap_or(d.data_dir),
            broker_name: self
                .broker_name
                .or(file.broker_name)
                .unwrap_or(d.broker_name),
            cluster: self.cluster.or(file.cluster).unwrap_or(d.cluster),
            flush: match self.flush.or(file.flush) {
                Some(FlushArg::Sync) => FlushMode::Sync,
                Some(FlushArg::Async) => FlushMode::Async,
                None => d.flush,
            },
            sync_flush_timeout: self
                .sync_flush_timeout
                .or(file.sync_flush_timeout)
                .unwrap_or(d.sync_flush_timeout),
            flush_interval: self
                .flush_interval
                .or(file.flush_interval)
                .unwrap_or(d.flush_interval),
            checkpoint_interval: self
                .checkpoint_interval
                .or(file.checkpoint_interval)
                .unwrap_or(d.checkpoint_interval),
            heartbeat_interval: self
                .heartbeat_interval
                .or(file.heartbeat_interval)
                .unwrap_or(d.heartbeat_interval),
            auto_create_topics: self
                .auto_create_topics
                .or(file.auto_create_topics)
                .unwrap_or(d.auto_create_topics),
            default_queues: self
                .default_queues
                .or(file.default_queues)
                .unwrap_or(d.default_queues),
            standalone,
            nameserver_listen: self
                .nameserver_listen
                .or(file.nameserver_listen)
                .unwrap_or(d.nameserver_listen),
            broker_expiry: self
                .broker_expiry
                .or(file.broker_expiry)
                .unwrap_or(d.broker_expiry),
            retention: self.retention.or(file.retention).unwrap_or(d.retention),
            segment_size: self
                .segment_size
                .or(file.segment_size)
                .unwrap_or(d.segment_size),
            max_message_size: match self.max_message_size.or(file.max_message_size) {
                Some(n) => to_usize(n, "max message size")?,
                None => d.max_message_size,
            },
            max_frame_size: match self.max_frame_size.or(file.max_frame_size) {
                Some(n) => to_usize(n, "max frame size")?,
                None => d.max_frame_size,
            },
            frame_timeout: self
                .frame_timeout
                .or(file.frame_timeout)
                .unwrap_or(d.frame_timeout),
            transactions: TxConfig {
                timeout: self
                    .transaction_timeout
                    .or(file.transaction_timeout)
                    .unwrap_or(d.transactions.timeout),
                check_interval: self
                    .transaction_check_interval
                    .or(file.transaction_check_interval)
                    .unwrap_or(d.transactions.check_interval),
                check_max: self
                    .transaction_check_max
                    .or(file.transaction_check_max)
                    .unwrap_or(d.transactions.check_max),
                check_rate: self
                    .transaction_check_rate
                    .or(file.transaction_check_rate)
                    .unwrap_or(d.transactions.check_rate),
                check_timeout: self
                    .transaction_check_timeout
                    .or(file.transaction_check_timeout)
                    .unwrap_or(d.transactions.check_timeout),
            },
            consumer_expiry: self
                .consumer_expiry
                .or(file.consumer_expiry)
                .unwrap_or(d.consumer_expiry),
            retry_delays: self
                .retry_delays
                .or(file.retry_delays)
                .unwrap_or(d.retry_delays),
            max_delay: self.max_delay.or(file.max_delay).unwrap_or(d.max_delay),
            producer_id_expiry: self
                .producer_id_expiry
                .or(file.producer_id_expiry)
                .unwrap_or(d.producer_id_expiry),
            max_store_size: self.max_store_size.or(file.max_store_size),
            disk_free_limit: self
                .disk_free_limit
                .or(file.disk_free_limit)
                .unwrap_or(d.disk_free_limit),
            max_connections: self
                .max_connections
                .or(file.max_connections)
                .unwrap_or(d.max_connections),
            max_topics: self.max_topics.or(file.max_topics).unwrap_or(d.max_topics),
            max_inflight_bytes: self
                .max_inflight_bytes
                .or(file.max_inflight_bytes)
                .map_or(d.max_inflight_bytes, |b| b as usize),
            replication: ReplicationConfig {
                role: match self.role.or(file.role) {
                    Some(RoleArg::Slave) => txmq_protocol::BrokerRole::Slave,
                    Some(RoleArg::Master) | None => txmq_protocol::BrokerRole::Master,
                },
                mode: self
                    .replication
                    .or(file.replication)
                    .unwrap_or(d.replication.mode),
                min_insync_replicas: self
                    .min_insync_replicas
                    .or(file.min_insync_replicas)
                    .unwrap_or(d.replication.min_insync_replicas),
                timeout: self
                    .replication_timeout
                    .or(file.replication_timeout)
                    .unwrap_or(d.replication.timeout),
                lag_max: self
                    .replica_lag_max
                    .or(file.replica_lag_max)
                    .unwrap_or(d.replication.lag_max),
                master_addr: self.master_addr.or(file.master_addr),
                controllers: self.controller.or(file.controller).unwrap_or_default(),
                controller_wait: d.replication.controller_wait,
            },
            security: SecurityConfig {
                tls: txmq_remoting::TlsFiles {
                    cert: self.tls_cert.or(file.tls_cert),
                    key: self.tls_key.or(file.tls_key),
                    ca: self.tls_ca.or(file.tls_ca),
                },
                tls_client_auth: self
                    .tls_client_auth
                    .or(file.tls_client_auth)
                    .unwrap_or(false),
                acl_file: self.acl_file.or(file.acl_file),
                credentials: credentials(
                    self.access_key.or(file.access_key),
                    self.secret_key.or(file.secret_key),
                )?,
            },
            metrics_listen: self.metrics_listen.or(file.metrics_listen),
            grpc_listen: self.grpc_listen.or(file.grpc_listen),
            grpc_max_streams: self
                .grpc_max_streams
                .or(file.grpc_max_streams)
                .unwrap_or(d.grpc_max_streams),
            message_index: self
                .message_index
                .or(file.message_index)
                .unwrap_or(d.message_index),
            // The flag was checked as it was parsed; the file's key is here.
            network_threads: match (self.network_threads, file.network_threads) {
                (Some(n), _) => n,
                (None, Some(n)) => check_network_threads(n).map_err(|e| {
                    let path = self.config.as_deref().unwrap_or(std::path::Path::new(""));
                    format!(
                        "invalid config file {}: network_threads {e}",
                        path.display()
                    )
                })?,
                (None, None) => d.network_threads,
            },
        };
        config.validate()?;
        Ok(config)
    }
}

/// `--access-key` and `--secret-key` go together; an empty one counts as
/// not given (an empty secret is no secret).
fn credentials(
    access_key: Option<String>,
    secret_key: Option<String>,
) -> Result<Option<txmq_remoting::Credentials>, String> {
    txmq_remoting::Credentials::from_flags(access_key.as_deref(), secret_key.as_deref())
        .map_err(String::from)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn flags_beat_the_file_and_the_file_beats_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker.toml");
        std::fs::write(
            &path,
            "broker_name = \"from-file\"\ncluster = \"c1\"\nflush = \"sync\"\nheartbeat_interval = \"2s\"\nnameserver = \"a:1,b:2\"\nsegment_size = \"64MiB\"\n",
        )
        .unwrap();
        let args = BrokerArgs::parse_from([
            "txmq-broker",
            "--config",
            path.to_str().unwrap(),
            "--broker-name",
            "from-flag",
        ]);
        let c = args.resolve().unwrap();
        assert_eq!(c.broker_name, "from-flag");
        assert_eq!(c.cluster, "c1");
        assert_eq!(c.flush, FlushMode::Sync);
        assert_eq!(c.heartbeat_interval, Duration::from_secs(2));
        assert_eq!(c.nameservers, vec!["a:1", "b:2"]);
        assert_eq!(c.segment_size, 64 << 20);
        assert_eq!(c.listen, "127.0.0.1:10911");
        assert_eq!(c.advertise_addr, None);
        assert_eq!(c.flush_interval, Duration::from_millis(500));
        assert_eq!(c.checkpoint_interval, Duration::from_secs(1));
    }

    #[test]
    fn the_disk_free_limit_comes_from_the_flag_or_the_file_and_0_turns_it_off() {
        let c = BrokerArgs::parse_from(["txmq-broker"]).resolve().unwrap();
        assert_eq!(c.disk_free_limit, 1 << 30);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker.toml");
        std::fs::write(&path, "disk_free_limit = \"512MiB\"\n").unwrap();
        let file = ["txmq-broker", "--config", path.to_str().unwrap()];
        let c = BrokerArgs::parse_from(file).resolve().unwrap();
        assert_eq!(c.disk_free_limit, 512 << 20);
        let c = BrokerArgs::parse_from([&file[..], &["--disk-free-limit", "0"]].concat())
            .resolve()
            .unwrap();
        assert_eq!(c.disk_free_limit, 0);
        let bad = BrokerArgs::try_parse_from(["txmq-broker", "--disk-free-limit", "lots"]);
        assert!(bad.unwrap_err().to_string().contains("invalid size"));
    }

    #[test]
    fn flush_and_checkpoint_intervals_come_from_flags_or_the_file_and_are_not_zero() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker.toml");
        std::fs::write(
            &path,
            "flush_interval = \"200ms\"\ncheckpoint_interval = \"5s\"\n",
        )
        .unwrap();
        let file = path.to_str().unwrap();
        let c = BrokerArgs::parse_from(["txmq-broker", "--config", file])
            .resolve()
            .unwrap();
        assert_eq!(c.flush_interval, Duration::from_millis(200));
        assert_eq!(c.checkpoint_interval, Duration::from_secs(5));
        let c = BrokerArgs::parse_from([
            "txmq-broker",
            "--config",
            file,
            "--checkpoint-interval",
            "2s",
        ])
        .resolve()
        .unwrap();
        assert_eq!(c.checkpoint_interval, Duration::from_secs(2));
        for flag in ["--flush-interval", "--checkpoint-interval"] {
            let err = BrokerArgs::parse_from(["txmq-broker", flag, "0s"])
                .resolve()
                .unwrap_err();
            assert!(err.contains("must not be zero"), "{flag}: {err}");
        }
    }

    #[test]
    fn the_advertised_address_is_a_host_and_port() {
        let c = BrokerArgs::parse_from(["txmq-broker", "--advertise-addr", "127.0.0.1:20911"])
            .resolve()
            .unwrap();
        assert_eq!(c.advertise_addr.as_deref(), Some("127.0.0.1:20911"));
        let err = BrokerArgs::parse_from(["txmq-broker", "--advertise-addr", "proxy"])
            .resolve()
            .unwrap_err();
        assert!(
            err.contains("--advertise-addr") && err.contains("'proxy' is not host:port"),
            "{err}"
        );
    }

    #[test]
    fn retry_delays_come_from_the_flag_and_must_fit_the_max_delay() {
        let c = BrokerArgs::parse_from(["txmq-broker", "--retry-delays", "10s,30s, 1m"])
            .resolve()
            .unwrap();
        assert_eq!(
            c.retry_delays,
            [10, 30, 60].map(Duration::from_secs).to_vec()
        );
        assert!(BrokerArgs::try_parse_from(["txmq-broker", "--retry-delays", "10s,soon"]).is_err());
        let err = BrokerArgs::parse_from(["txmq-broker", "--max-delay", "0s"])
            .resolve()
            .unwrap_err();
        assert!(
            err.contains("--retry-delays")
                && err.contains("--max-delay (0s)")
                && err.contains("10s is longer"),
            "{err}"
        );
    }

    #[test]
    fn addresses_are_host_and_port() {
        for (args, says) in [
            (
                &["--nameserver", ""][..],
                "--nameserver lists an empty address",
            ),
            (
                &["--nameserver", "127.0.0.1:9876,,"],
                "--nameserver lists an empty address",
            ),
            (
                &["--nameserver", "foo"],
                "--nameserver: 'foo' is not host:port",
            ),
            (&["--listen", "bad"], "--listen: 'bad' is not host:port"),
            (&["--metrics-listen", "bad"], "--metrics-listen: 'bad'"),
            (&["--grpc-listen", "bad:port"], "--grpc-listen: 'bad:port'"),
            (
                &["--standalone", "--nameserver-listen", "bad"],
                "--nameserver-listen: 'bad'",
            ),
            (
                &["--role", "slave", "--master-addr", "m"],
                "--master-addr: 'm'",
            ),
            (
                &["--standalone", "--broker-expiry", "0s"],
                "--broker-expiry must be above 0",
            ),
        ] {
            let err =
                BrokerArgs::parse_from(std::iter::once("txmq-broker").chain(args.iter().copied()))
                    .resolve()
                    .unwrap_err();
            assert!(err.contains(says), "{args:?}: {err}");
        }
        let c = BrokerArgs::parse_from([
            "txmq-broker",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "localhost:0",
        ])
        .resolve()
        .unwrap();
        assert_eq!(c.listen, "127.0.0.1:0");
    }

    #[test]
    fn bad_files_and_values_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker.toml");
        std::fs::write(&path, "flush = \"sometimes\"").unwrap();
        let err = BrokerArgs::parse_from(["txmq-broker", "--config", path.to_str().unwrap()])
            .resolve()
            .unwrap_err();
        assert!(err.contains("invalid config file"), "{err}");
        std::fs::write(&path, "no_such_key = 1").unwrap();
        let err = BrokerArgs::parse_from(["txmq-broker", "--config", path.to_str().unwrap()])
            .resolve()
            .unwrap_err();
        assert!(err.contains("no_such_key"), "{err}");
        assert!(
            BrokerArgs::try_parse_from(["txmq-broker", "--heartbeat-interval", "soon"]).is_err()
        );
        assert!(BrokerArgs::try_parse_from(["txmq-broker", "--flush", "maybe"]).is_err());
        let err = BrokerArgs::parse_from(["txmq-broker", "--controller", ""])
            .resolve()
            .unwrap_err();
        assert!(err.contains("--controller lists an empty address"), "{err}");
        let err = BrokerArgs::parse_from(["txmq-broker", "--controller", "127.0.0.1:9878,"])
            .resolve()
            .unwrap_err();
        assert!(err.contains("empty address"), "{err}");
        assert!(BrokerArgs::try_parse_from([
            "txmq-broker",
            "--controller",
            "127.0.0.1:9878",
            "--role",
            "slave"
        ])
        .is_err());
    }

    #[test]
    fn security_flags_come_from_flags_and_the_file_and_keys_go_in_pairs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker.toml");
        std::fs::write(
            &path,
            "tls_cert = \"/etc/txmq/broker.pem\"\ntls_key = \"/etc/txmq/broker.key\"\nacl_file = \"/etc/txmq/acl.toml\"\n",
        )
        .unwrap();
        let c = BrokerArgs::parse_from([
            "txmq-broker",
            "--config",
            path.to_str().unwrap(),
            "--tls-ca",
            "/etc/txmq/ca.pem",
            "--tls-client-auth",
            "--access-key",
            "broker",
            "--secret-key",
            "s",
        ])
        .resolve()
        .unwrap();
        let s = &c.security;
        assert_eq!(
            s.tls.cert.as_deref(),
            Some(Path::new("/etc/txmq/broker.pem"))
        );
        assert_eq!(s.tls.ca.as_deref(), Some(Path::new("/etc/txmq/ca.pem")));
        assert_eq!(s.acl_file.as_deref(), Some(Path::new("/etc/txmq/acl.toml")));
        assert!(s.tls_client_auth);
        assert_eq!(
            s.credentials.as_ref().map(|c| c.access_key.as_str()),
            Some("broker")
        );
        let err = BrokerArgs::parse_from(["txmq-broker", "--secret-key", "s"])
            .resolve()
            .unwrap_err();
        assert!(err.contains("--access-key"), "{err}");
        // An empty secret is no secret.
        let err = BrokerArgs::parse_from(["txmq-broker", "--access-key", "b", "--secret-key", ""])
            .resolve()
            .unwrap_err();
        assert!(err.contains("--access-key needs its --secret-key"), "{err}");
    }

    #[test]
    fn metrics_listen_comes_from_the_flag_or_the_file_and_is_off_by_default() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker.toml");
        std::fs::write(&path, "metrics_listen = \"127.0.0.1:9100\"\n").unwrap();
        let from_file = BrokerArgs::parse_from(["txmq-broker", "--config", path.to_str().unwrap()])
            .resolve()
            .unwrap();
        assert_eq!(from_file.metrics_listen.as_deref(), Some("127.0.0.1:9100"));
        let from_flag = BrokerArgs::parse_from([
            "txmq-broker",
            "--config",
            path.to_str().unwrap(),
            "--metrics-listen",
            "0.0.0.0:9200",
        ])
        .resolve()
        .unwrap();
        assert_eq!(from_flag.metrics_listen.as_deref(), Some("0.0.0.0:9200"));
        let default = BrokerArgs::parse_from(["txmq-broker"]).resolve().unwrap();
        assert_eq!(default.metrics_listen, None);
    }

    #[test]
    fn standalone_and_bool_flags() {
        let c = BrokerArgs::parse_from([
            "txmq-broker",
            "--standalone",
            "--auto-create-topics",
            "false",
        ])
        .resolve()
        .unwrap();
        assert!(c.standalone && !c.auto_create_topics);
        assert!(c.nameservers.is_empty());
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert!(parse_size("12 parsecs").is_err());
    }
}
