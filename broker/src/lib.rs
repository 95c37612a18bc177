//! txmq-broker: the broker. Stores every message in one durable commit log,
//! serves consumers from consume queues derived from it, and registers its
//! topics with the nameservers.
//!
//! Start reading at [`Broker::start`]; requests are dispatched in
//! `handler/mod.rs` (one file per request), storage is [`store`] (start at
//! [`store::Store`]), settings are [`config`].

#![warn(missing_docs)]

pub mod config;
mod dead_letters;
mod groups;
mod grpc;
mod handler;
mod metrics;
pub mod pending_map;
mod pop;
mod registration;
mod replication;
mod security;
pub mod store;
mod topics;
mod transaction;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use txmq_nameserver::{Nameserver, NameserverConfig};
use txmq_remoting::ConnectionConfig;

pub use config::{BrokerArgs, BrokerConfig, ReplicationConfig, ReplicationMode};
/// The RocketMQ 5 API (`apache.rocketmq.v2`) as generated from
/// `broker/proto`: the messages, and a tonic client for tests and benches.
pub use grpc::pb as rocketmq_v2;
pub use security::Security;
pub use store::FlushMode;
pub use transaction::{TxConfig, PROP_USER_CHECK_DELAY};

use crate::store::{Store, StoreConfig};
use crate::topics::TopicTable;

/// Errors starting a broker.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The settings cannot work.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The store could not be opened or recovered.
    #[error("cannot open the store in {dir}: {source}")]
    Store {
        /// The data directory.
        dir: String,
        /// Why.
        #[source]
        source: store::StoreError,
    },
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The threads of `--network-threads` could not start.
    #[error("cannot start the network threads: {0}")]
    NetworkThreads(#[source] std::io::Error),
    /// The in-process nameserver could not start.
    #[error("cannot start the standalone nameserver: {0}")]
    Nameserver(#[from] txmq_nameserver::Error),
    /// A TLS file or the ACL file cannot be used.
    #[error("security settings: {0}")]
    Security(String),
    /// Every nameserver refused the broker: another live broker, at another
    /// address, holds its name.
    #[error("broker name '{name}' is taken: {detail}")]
    NameTaken {
        /// The broker name.
        name: String,
        /// Each nameserver's answer (naming the broker that holds the name).
        detail: String,
    },
}

/// Takes one of `max` places counted by `open` (`--max-connections`);
/// false when all are taken. The caller gives it back with `fetch_sub`.
pub(crate) fn take_slot(open: &std::sync::atomic::AtomicUsize, max: usize) -> bool {
    use std::sync::atomic::Ordering;
    open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
        (n < max).then_some(n + 1)
    })
    .is_ok()
}

pub(crate) struct BrokerInner {
    pub(crate) config: BrokerConfig,
    pub(crate) advertised_addr: String,
    pub(crate) store: Store,
    pub(crate) topics: TopicTable,
    pub(crate) topics_changed: Notify,
    /// Topic-table versions: asked for (bumped on change) and registered
    /// with the nameservers (a create waits for its version to be registered).
    pub(crate) topics_version: std::sync::atomic::AtomicU64,
    pub(crate) registered_version: tokio::sync::watch::Sender<u64>,
    pub(crate) transactions: Arc<transaction::Transactions>,
    pub(crate) groups: Arc<groups::Groups>,
    /// This run, for readers to tell it from earlier ones (its start time in
    /// ms, later than any earlier run's).
    pub(crate) epoch: u64,
    pub(crate) shutdown: CancellationToken,
    /// Connections greeted and not yet closed (`--max-connections`).
    pub(crate) connections: std::sync::atomic::AtomicUsize,
    /// Connections open on the gRPC port (`--grpc-listen`), counted
    /// against `--max-connections` apart from `connections`.
    pub(crate) grpc_connections: std::sync::atomic::AtomicUsize,
    /// Its part in its broker group (master or slave).
    pub(crate) replication: replication::Replication,
    /// TLS, users and permissions (`--tls-*`, `--acl-file`), and the
    /// broker's own credentials.
    pub(crate) security: Arc<security::Security>,
    /// Counters and histograms (`--metrics-listen`), the broker's for its life.
    pub(crate) metrics: Arc<metrics::Metrics>,
    /// Dead letters re-sent (`txmq dlq resend`), durable in the data dir.
    pub(crate) resent: dead_letters::ResendLog,
    /// Pop consumption (RocketMQ 5's simple consumers); its state is the
    /// store's (`store/pop.rs`), rebuilt with it.
    pub(crate) pop: pop::Pop,
}

/// A running broker.
pub struct Broker {
    run: Run,
    broker_name: String,
    addr: SocketAddr,
    nameserver_addr: Option<SocketAddr>,
    nameserver_shutdown: CancellationToken,
    nameserver_task: TaskTracker,
    /// Stops reloading the ACL file.
    acl_watch: CancellationToken,
    /// Where `/metrics` is served (`--metrics-listen`).
    metrics_addr: Option<SocketAddr>,
    /// Stops serving `/metrics`.
    metrics_stop: CancellationToken,
    /// Where the RocketMQ 5 gRPC API is served (`--grpc-listen`).
    grpc_addr: Option<SocketAddr>,
    /// The threads connections are served on (`--network-threads`), held
    /// until the store is shut down: dropping the last handle stops them,
    /// and with them any request still running there.
    network: Option<Arc<txmq_remoting::server::NetworkThreads>>,
    /// The data directory's lock, held for the broker's life.
    _dir_lock: store::dir_lock::DirLock,
}

/// The sockets a broker binds once for its life: incarnations serve clones.
struct Listeners {
    broker: std::net::TcpListener,
    /// The RocketMQ 5 gRPC API (`--grpc-listen`).
    grpc: Option<std::net::TcpListener>,
    /// Where accepted connections are served (`--network-threads`).
    network: Option<Arc<txmq_remoting::server::NetworkThreads>>,
}

/// How the broker runs: one role for its life, or the roles a controller
/// gives it, one incarnation after another.
enum Run {
    Single(Incarnation),
    Controlled {
        stop: CancellationToken,
        task: tokio::task::JoinHandle<()>,
    },
}

/// The serving part of a broker in one role: store, tables, tasks.
struct Incarnation {
    inner: Arc<BrokerInner>,
    tasks: TaskTracker,
}

/// Where an incarnation stands in its group.
struct Part {
    role: txmq_protocol::BrokerRole,
    /// Under a controller: the link, the epoch (a master's own, or the one
    /// of the master a slave follows), the in-sync set of a master, and a
    /// slave's master to follow.
    control: Option<ControlledPart>,
}

/// A slave's master to follow, as the controller names it (address, epoch).
type MasterWatch = tokio::sync::watch::Receiver<Option<(String, u64)>>;

/// (the link, the epoch, a master's in-sync set, a slave's master).
type ControlledPart = (
    Arc<replication::controlled::Control>,
    u64,
    Vec<String>,
    Option<MasterWatch>,
);

impl Incarnation {
    /// Stops serving, says goodbye to the nameservers, flushes the store,
    /// writes the checkpoint.
    async fn stop(self) {
        self.inner.shutdown.cancel();
        self.tasks.close();
        let stopped = tokio::time::timeout(Duration::from_secs(5), self.tasks.wait())
            .await
            .is_ok();
        // Only when nothing may still change who reads what: no request is
        // served any more, and no slave served (or serves) the groups
        // while this broker is down.
        if stopped && !self.inner.replication.had_replicas() {
            self.inner.groups.write_held_at_stop(
                &self.inner.config.data_dir,
                self.inner.store.committed_queues(),
            );
        }
        self.inner.store.shutdown().await;
    }
}

impl Broker {
    /// Recovers the store, binds the listener, starts serving and registers
    /// with the nameservers (with `standalone`, first starts a nameserver in
    /// this process). Returns once clients can connect and every nameserver
    /// answered the first registration (or one took it, or one could not be
    /// reached).
    ///
    /// # Errors
    /// Invalid settings, a TLS or ACL file that cannot be used, an
    /// unrecoverable data directory, an address in use, or
    /// [`BrokerError::NameTaken`] when every nameserver refused the broker
    /// name because another live broker holds it.
    pub async fn start(config: BrokerConfig) -> Result<Broker, BrokerError> {
        config.validate().map_err(BrokerError::Config)?;
        let security = Security::load(&config.security).map_err(BrokerError::Security)?;
        Broker::start_with(config, security).await
    }

    /// [`Broker::start`] with the security files already loaded from
    /// `config.security` ([`Security::load`]), as `txmq-broker` loads them
    /// before anything starts.
    ///
    /// # Errors
    /// As [`Broker::start`], but for the security files.
    pub async fn start_with(
        config: BrokerConfig,
        security: Security,
    ) -> Result<Broker, BrokerError> {
        config.validate().map_err(BrokerError::Config)?;
        // One broker per data directory, for the broker's life (through
        // every incarnation), taken before anything in it is read.
        let dir = &config.data_dir;
        let store_err = |context: &str, message: String| BrokerError::Store {
            dir: dir.display().to_string(),
            source: store::StoreError::Io {
                context: context.to_string(),
                message,
            },
        };
        store::commit_log::create_dir_durable(dir).map_err(|e| {
            store_err(
                &format!("cannot create data dir {}", dir.display()),
                e.to_string(),
            )
        })?;
        let dir_lock = store::dir_lock::DirLock::acquire(dir)
            .map_err(|e| store_err("cannot lock the data directory", e))?;
        let security = Arc::new(security);
        let nameserver_task = TaskTracker::new();
        let nameserver_shutdown = CancellationToken::new();
        let mut nameservers = config.nameservers.clone();
        let mut nameserver_addr = None;
        if config.standalone {
            let ns = Nameserver::bind_with(
                NameserverConfig {
                    listen: config.nameserver_listen.clone(),
                    broker_expiry: config.broker_expiry,
                    controller: None,
                },
                security.cluster(),
            )
            .await?;
            let addr = ns.local_addr();
            nameserver_addr = Some(addr);
            if !nameservers.iter().any(|n| n == &addr.to_string()) {
                nameservers.push(addr.to_string());
            }
            nameserver_task.spawn(ns.run(nameserver_shutdown.clone()));
        }

        let bind_err = |source| BrokerError::Bind {
            addr: config.listen.clone(),
            source,
        };
        // Bound once for the broker's life: incarnations serve clones.
        let listener = TcpListener::bind(&config.listen)
            .await
            .map_err(bind_err)?
            .into_std()
            .map_err(bind_err)?;
        let addr = listener.local_addr().map_err(bind_err)?;
        security.server.warn_if_open(&addr, "broker");
        let grpc = match &config.grpc_listen {
            Some(listen) => {
                let grpc_err = |source| BrokerError::Bind {
                    addr: format!("{listen} (--grpc-listen)"),
                    source,
                };
                let l = TcpListener::bind(listen)
                    .await
                    .map_err(grpc_err)?
                    .into_std()
                    .map_err(grpc_err)?;
                Some(l)
            }
            None => None,
        };
        let grpc_addr = grpc.as_ref().and_then(|l| l.local_addr().ok());
        let network = match config.network_threads {
            0 => None,
            n => {
                let threads = txmq_remoting::server::NetworkThreads::start(n, "txmq-net")
                    .map_err(BrokerError::NetworkThreads)?;
                tracing::info!(
                    network_threads = n,
                    "connections served on threads of their own"
                );
                Some(threads)
            }
        };
        let listeners = Listeners {
            broker: listener,
            grpc,
            network: network.clone(),
        };
        let acl_watch = CancellationToken::new();
        security.server.watch(acl_watch.clone());
        let advertised = config
            .advertise_addr
            .clone()
            .unwrap_or_else(|| addr.to_string());
        let broker_name = config.broker_name.clone();
        let metrics = Arc::new(metrics::Metrics::new());
        let metrics_stop = CancellationToken::new();
        let metrics_addr = match &config.metrics_listen {
            Some(listen) => {
                let (listener, addr) =
                    txmq_remoting::metrics::bind(listen)
                        .await
                        .map_err(|source| BrokerError::Bind {
                            addr: format!("{listen} (--metrics-listen)"),
                            source,
                        })?;
                tokio::spawn(txmq_remoting::metrics::serve(
                    listener,
                    metrics.registry(),
                    metrics_stop.clone(),
                ));
                Some(addr)
            }
            None => None,
        };
        // Stops the metrics endpoint when the start fails past here.
        let stop_guard = metrics_stop.clone().drop_guard();
        let run = if config.replication.controlled() {
            if config.replication.mode == config::ReplicationMode::Async {
                // An election after the master's crash keeps only what the
                // new master had fetched: an acknowledged send may be lost.
                tracing::warn!(
                    "--replication async under --controller: a failover may lose acknowledged sends \
                     that the new master had not fetched yet (up to --replica-lag-max of writes); \
                     --replication sync keeps every acknowledged write"
                );
            }
            let dir = config.data_dir.clone();
            store::commit_log::create_dir_durable(&dir).map_err(|e| BrokerError::Store {
                dir: dir.display().to_string(),
                source: store::StoreError::Io {
                    context: format!("cannot create data dir {}", dir.display()),
                    message: e.to_string(),
                },
            })?;
            let epochs = replication::epochs::Epochs::load(&dir).map_err(BrokerError::Config)?;
            let (control, events) =
                replication::controlled::Control::new(&config, advertised, epochs, &security);
            let stop = CancellationToken::new();
            let (master_tx, master_rx) = tokio::sync::watch::channel(None::<(String, u64)>);
            // The first incarnation (a slave without a master) starts here,
            // so that a bad data directory fails the start.
            let first = start_incarnation(
                &config,
                &listeners,
                &nameservers,
                &security,
                &metrics,
                Part {
                    role: txmq_protocol::BrokerRole::Slave,
                    control: Some((control.clone(), 0, Vec::new(), Some(master_rx))),
                },
            )
            .await?;
            let task = tokio::spawn(run_controlled(
                config.clone(),
                listeners,
                nameservers,
                security,
                control,
                events,
                first,
                master_tx,
                stop.clone(),
                metrics.clone(),
            ));
            Run::Controlled { stop, task }
        } else {
            let role = config.replication.role;
            let (inc, startup) = start_incarnation(
                &config,
                &listeners,
                &nameservers,
                &security,
                &metrics,
                Part {
                    role,
                    control: None,
                },
            )
            .await?;
            // Two brokers started under one name (the default one, say) must
            // not both run: when every nameserver refuses this one, it does
            // not start. A nameserver that cannot be asked leaves the
            // question open, and the broker starts and keeps trying.
            if let Ok(registration::Startup::NameTaken(detail)) = startup.await {
                inc.stop().await;
                nameserver_shutdown.cancel();
                acl_watch.cancel();
                return Err(BrokerError::NameTaken {
                    name: broker_name,
                    detail,
                });
            }
            Run::Single(inc)
        };
        stop_guard.disarm();
        Ok(Broker {
            run,
            broker_name,
            addr,
            nameserver_addr,
            nameserver_shutdown,
            nameserver_task,
            acl_watch,
            metrics_addr,
            metrics_stop,
            grpc_addr,
            network,
            _dir_lock: dir_lock,
        })
    }

    /// The address clients connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where the RocketMQ 5 gRPC API is served (`--grpc-listen`), with the
    /// real port when 0 was asked for.
    pub fn grpc_addr(&self) -> Option<SocketAddr> {
        self.grpc_addr
    }

    /// Where `/metrics` is served (`--metrics-listen`), with the real port
    /// when 0 was asked for.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The in-process nameserver's address (standalone mode).
    pub fn nameserver_addr(&self) -> Option<SocketAddr> {
        self.nameserver_addr
    }

    /// Graceful shutdown: stop accepting and close connections, say goodbye
    /// to the nameservers, flush the store, write the checkpoint, stop.
    pub async fn shutdown(self) {
        tracing::info!(broker = %self.broker_name, "shutting down");
        match self.run {
            Run::Single(inc) => inc.stop().await,
            Run::Controlled { stop, task } => {
                stop.cancel();
                let _ = task.await;
            }
        }
        // Its store shut down, no request of the broker's is left to run.
        drop(self.network);
        self.acl_watch.cancel();
        self.metrics_stop.cancel();
        // The nameserver goes last so the broker's goodbye reaches it.
        self.nameserver_shutdown.cancel();
        self.nameserver_task.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.nameserver_task.wait()).await;
        tracing::info!(broker = %self.broker_name, "stopped");
    }
}

async fn start_incarnation(
    config: &BrokerConfig,
    listeners: &Listeners,
    nameservers: &[String],
    security: &Arc<security::Security>,
    metrics: &Arc<metrics::Metrics>,
    part: Part,
) -> Result<
    (
        Incarnation,
        tokio::sync::oneshot::Receiver<registration::Startup>,
    ),
    BrokerError,
> {
    let mut config = config.clone();
    config.replication.role = part.role;
    let bind_err = |source| BrokerError::Bind {
        addr: config.listen.clone(),
        source,
    };
    let listener =
        TcpListener::from_std(listeners.broker.try_clone().map_err(bind_err)?).map_err(bind_err)?;
    let grpc = match &listeners.grpc {
        Some(l) => Some(
            l.try_clone()
                .and_then(TcpListener::from_std)
                .map_err(|source| BrokerError::Bind {
                    addr: format!("{:?} (--grpc-listen)", config.grpc_listen),
                    source,
                })?,
        ),
        None => None,
    };
    let addr = listener.local_addr().map_err(bind_err)?;
    let tasks = TaskTracker::new();

    let dir = config.data_dir.clone();
    let store_err = |source| BrokerError::Store {
        dir: dir.display().to_string(),
        source,
    };
    store::commit_log::create_dir_durable(&dir).map_err(|e| {
        store_err(store::StoreError::Io {
            context: format!("cannot create data dir {}", dir.display()),
            message: e.to_string(),
        })
    })?;
    let topics = TopicTable::load(&dir).map_err(BrokerError::Config)?;
    let resent = dead_letters::ResendLog::load(&dir).map_err(BrokerError::Config)?;
    let topic_queues: Vec<(String, u32)> = topics
        .all()
        .into_iter()
        .map(|t| (t.name, t.queues))
        .collect();
    let mut store_config = StoreConfig::new(dir.clone());
    store_config.flush = config.flush;
    store_config.sync_flush_timeout = config.sync_flush_timeout;
    store_config.async_flush_interval = config.flush_interval;
    store_config.checkpoint_interval = config.checkpoint_interval;
    store_config.segment_size = config.segment_size;
    store_config.max_message_size = config.max_message_size;
    store_config.retention = config.retention;
    store_config.max_delay = config.max_delay;
    store_config.producer_id_expiry = config.producer_id_expiry;
    store_config.max_log_bytes = config.max_store_size;
    store_config.disk_free_limit = config.disk_free_limit;
    store_config.fdatasync_latency = Some(metrics.fdatasync_latency.clone());
    store_config.message_index = config.message_index;
    let is_slave = config.replication.role == txmq_protocol::BrokerRole::Slave;
    // Under a controller every role continues its log where it ends
    // (positions a master hands out are the group's, and a replica's
    // epoch history must meet its log end).
    store_config.replica = is_slave || part.control.is_some();
    let store_dir = dir.clone();
    let store = tokio::task::spawn_blocking(move || Store::open(store_config, &topic_queues))
        .await
        .map_err(|e| BrokerError::Config(format!("store recovery panicked: {e}")))?
        .map_err(|source| BrokerError::Store {
            dir: store_dir.display().to_string(),
            source,
        })?;
    // Topics found in the log but missing from the table (a lost
    // topics.json) are restored from what recovery rebuilt.
    for (name, queues) in store.topics() {
        if topics.get(&name).is_none() {
            tracing::warn!(topic = %name, queues, "topic found in the store but not in topics.json; restoring it");
            topics
                .upsert(&name, |_, _| {
                    Ok(txmq_protocol::TopicConfig {
                        name: name.clone(),
                        queues,
                        perm: txmq_protocol::PERM_READ_WRITE,
                    })
                })
                .map_err(|e| BrokerError::Config(e.message))?;
        }
    }
    let shutdown = CancellationToken::new();
    let recovered = store.take_recovered_transactions().unwrap_or_default();
    let transactions = Arc::new(
        transaction::Transactions::new(
            store.clone(),
            config.transactions.clone(),
            config.broker_name.clone(),
            recovered,
        )
        .with_security(security.clone())
        .with_metrics(metrics.clone()),
    );
    // Recovery and the table's rebuild read the log through its mappings
    // (a million pending transactions: every half message's first page);
    // none of it is needed now, and retention would let go of it only at
    // its first round.
    store.release_mapped_pages();
    release_freed_heap();
    if is_slave {
        // Replicated transaction records reach the slave's table as
        // they are written, as recovery would have found them.
        let table = transactions.clone();
        store.set_tx_listener(Box::new(move |changes| table.apply_replicated(changes)));
    }
    // A master not run by a controller: no other broker served its queues
    // while it was down, so what its clean stop wrote about readers holds.
    let remembers_stops = part.control.is_none() && !is_slave;
    let replication = match part.control {
        Some((control, epoch, in_sync, master)) => {
            if !is_slave {
                // The epoch's first position, durable before any write.
                control
                    .epochs()
                    .push(txmq_protocol::EpochStart {
                        epoch,
                        start: store.log_end(),
                    })
                    .map_err(BrokerError::Config)?;
            }
            replication::Replication::controlled(
                config.replication.clone(),
                control,
                epoch,
                in_sync,
                master,
            )
        }
        None => replication::Replication::new(config.replication.clone()),
    };
    let inner = Arc::new(BrokerInner {
        replication,
        transactions,
        groups: Arc::new({
            let held = groups::take_held_at_stop(&config.data_dir, remembers_stops);
            let g = groups::Groups::new(config.consumer_expiry);
            if remembers_stops {
                g.remembering_stops(held)
            } else {
                g
            }
        }),
        advertised_addr: config
            .advertise_addr
            .clone()
            .unwrap_or_else(|| addr.to_string()),
        config,
        store,
        topics,
        topics_changed: Notify::new(),
        topics_version: std::sync::atomic::AtomicU64::new(0),
        epoch: txmq_protocol::now_millis(),
        registered_version: tokio::sync::watch::channel(0).0,
        shutdown: shutdown.clone(),
        connections: std::sync::atomic::AtomicUsize::new(0),
        grpc_connections: std::sync::atomic::AtomicUsize::new(0),
        security: security.clone(),
        metrics: metrics.clone(),
        resent,
        pop: pop::Pop::default(),
    });
    metrics.serve_state_of(&inner);

    let conn_config = ConnectionConfig {
        max_frame_len: inner.config.max_frame_size,
        max_inflight_bytes: inner.config.max_inflight_bytes,
        frame_timeout: inner.config.frame_timeout,
        ..Default::default()
    };
    let service = Arc::new(handler::BrokerService {
        broker: inner.clone(),
    });
    tasks.spawn(txmq_remoting::server::serve_on(
        listener,
        service,
        conn_config.clone(),
        security.server.clone(),
        listeners.network.clone(),
        shutdown.clone(),
    ));
    if let Some(grpc) = grpc {
        tasks.spawn(grpc::serve(
            inner.clone(),
            grpc,
            conn_config,
            security.server.tls.clone(),
            shutdown.clone(),
        ));
    }
    let (startup_tx, startup) = tokio::sync::oneshot::channel();
    tasks.spawn(registration::run(
        inner.clone(),
        nameservers.to_vec(),
        startup_tx,
    ));
    tasks.spawn(retention(inner.clone()));
    tasks.spawn(groups::run_expiry(inner.groups.clone(), shutdown.clone()));
    if is_slave {
        // Only the master writes: delay deliveries, check-backs and
        // their markers reach a slave through its master's log.
        tasks.spawn(replication::run_slave(inner.clone(), nameservers.to_vec()));
    } else {
        tasks.spawn(replication::run_isr(inner.clone()));
        tasks.spawn(deliver_delayed(inner.clone()));
        tasks.spawn(transaction::run_check_back(
            inner.transactions.clone(),
            shutdown.clone(),
        ));
    }
    tracing::info!(
        broker = %inner.config.broker_name,
        %addr,
        data_dir = %inner.config.data_dir.display(),
        flush = ?inner.config.flush,
        role = inner.config.replication.role.name(),
        replication = inner.config.replication.mode.name(),
        epoch = inner.replication.epoch(),
        "broker listening"
    );
    Ok((Incarnation { inner, tasks }, startup))
}

/// Runs a broker under a controller: heartbeats, and one incarnation after
/// another as the controller's decisions (or a needed cut of the log) ask.
// Each argument is one piece the start hands over; bundling them in a
// struct used once would only rename them.
#[allow(clippy::too_many_arguments)]
async fn run_controlled(
    config: BrokerConfig,
    listeners: Listeners,
    nameservers: Vec<String>,
    security: Arc<security::Security>,
    control: Arc<replication::controlled::Control>,
    mut events: tokio::sync::mpsc::UnboundedReceiver<replication::controlled::Event>,
    first: (
        Incarnation,
        tokio::sync::oneshot::Receiver<registration::Startup>,
    ),
    master_tx: tokio::sync::watch::Sender<Option<(String, u64)>>,
    stop: CancellationToken,
    metrics: Arc<metrics::Metrics>,
) {
    use replication::controlled::{wanted, Event, Wanted};
    use txmq_protocol::BrokerRole;
    let heartbeats = tokio::spawn(control.clone().run(config.clone(), stop.clone()));
    let mut state = control.state.subscribe();
    let mut current: Option<(Incarnation, Wanted)> = Some((first.0, Wanted::Slave(None)));
    let mut cut: Option<(u64, u64)> = None;
    let mut report = tokio::time::interval(Duration::from_millis(200));
    report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let want = match state.borrow_and_update().as_ref() {
            Some(g) => wanted(
                g,
                &control.addr,
                control.epochs().last_epoch(),
                control
                    .master_epoch
                    .load(std::sync::atomic::Ordering::Acquire),
            ),
            None => Wanted::Slave(None),
        };
        if let Wanted::Slave(m) = &want {
            master_tx.send_if_modified(|held| {
                let changed = held != m;
                held.clone_from(m);
                changed
            });
        }
        let restart = cut.is_some()
            || match (&current, &want) {
                (None, _) => true,
                (Some((_, Wanted::Master(e))), Wanted::Master(w)) => e != w,
                (Some((_, Wanted::Slave(_))), Wanted::Slave(_)) => false,
                _ => true,
            };
        if restart {
            if let Some((inc, was)) = current.take() {
                tracing::info!(from = ?was, to = ?want, "changing role");
                inc.stop().await;
            }
            control
                .master_epoch
                .store(0, std::sync::atomic::Ordering::Release);
            if let Some((to, epoch)) = cut.take() {
                let mut store_config = StoreConfig::new(config.data_dir.clone());
                store_config.segment_size = config.segment_size;
                let truncated =
                    tokio::task::spawn_blocking(move || store::truncate_log(&store_config, to))
                        .await;
                match truncated {
                    Ok(Ok(())) => {
                        if let Err(e) = control.epochs().truncate(epoch, to) {
                            tracing::error!(error = %e, "cannot cut the epoch file");
                        }
                        tracing::info!(
                            to,
                            epoch,
                            "cut the log to where it agrees with the new master's"
                        );
                    }
                    Ok(Err(e)) => tracing::error!(to, error = %e, "cannot cut the log"),
                    Err(e) => tracing::error!(to, error = %e, "cutting the log failed"),
                }
            }
            let (role, epoch, in_sync) = match (&want, state.borrow().as_ref()) {
                (Wanted::Master(e), Some(g)) => (BrokerRole::Master, *e, g.in_sync.clone()),
                (Wanted::Slave(Some((_, e))), _) => (BrokerRole::Slave, *e, Vec::new()),
                _ => (BrokerRole::Slave, 0, Vec::new()),
            };
            let part = Part {
                role,
                control: Some((
                    control.clone(),
                    epoch,
                    in_sync,
                    (role == BrokerRole::Slave).then(|| master_tx.subscribe()),
                )),
            };
            match start_incarnation(&config, &listeners, &nameservers, &security, &metrics, part)
                .await
            {
                Ok((inc, _)) => {
                    if role == BrokerRole::Master {
                        control
                            .master_epoch
                            .store(epoch, std::sync::atomic::Ordering::Release);
                        tracing::info!(epoch, "serving as the master of the broker group");
                    }
                    // Tell the controller at once (a new master's heartbeat
                    // is what keeps it elected).
                    control.fenced();
                    current = Some((inc, want));
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot start in the role the controller gave; retrying in a second");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = stop.cancelled() => break,
                    }
                    continue;
                }
            }
        }
        tokio::select! {
            _ = state.changed() => {}
            Some(event) = events.recv() => match event {
                Event::Truncate { to, epoch } => cut = Some((to, epoch)),
            },
            _ = report.tick() => {
                if let Some((inc, _)) = &current {
                    control.log_end.store(inc.inner.store.log_end(), std::sync::atomic::Ordering::Release);
                }
            }
            _ = stop.cancelled() => break,
        }
    }
    if let Some((inc, _)) = current.take() {
        inc.stop().await;
    }
    let _ = heartbeats.await;
}

/// Deletes expired segments every minute (or sooner for short retentions),
/// and lets go of the log pages readers mapped and the heap pages freed
/// meanwhile.
async fn retention(b: Arc<BrokerInner>) {
    let period = (b.config.retention / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = b.shutdown.cancelled() => return,
        }
        // Pending transactions in segments about to expire move forward
        // first, so that one stuck transaction never pins the whole log.
        let store = b.store.clone();
        let expiring = tokio::task::spawn_blocking(move || store.expiring_halves())
            .await
            .unwrap_or_default();
        // A slave never writes: the master carries its transactions forward.
        if !expiring.is_empty() && !b.replication.is_slave() {
            b.transactions.carry_forward(&expiring).await;
        }
        let store = b.store.clone();
        let result = tokio::task::spawn_blocking(move || {
            store.release_mapped_pages();
            release_freed_heap();
            store.enforce_retention()
        })
        .await;
        match result {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "retention failed"),
            Err(e) => tracing::warn!(error = %e, "retention task failed"),
        }
    }
}

/// Delayed messages due per `deliver_due` call.
const DELAY_BATCH: usize = 4096;

/// Drives delayed messages: every 100 ms, moves the delay-level entries that
/// are due (one task for all of them, no timer per message).
async fn deliver_delayed(b: Arc<BrokerInner>) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = b.shutdown.cancelled() => return,
        }
        loop {
            match b
                .store
                .deliver_due(txmq_protocol::now_millis(), DELAY_BATCH)
                .await
            {
                // Something moved: more may be due at once (a call moves at
                // most DELAY_BATCH entries, or one write's worth of markers).
                Ok(n) if n > 0 && !b.shutdown.is_cancelled() => {}
                Ok(_) => break,
                Err(store::StoreError::ShuttingDown) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "delivering delayed messages failed; retrying in a second");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = b.shutdown.cancelled() => return,
                    }
                    break;
                }
            }
        }
    }
}

/// Hands the heap pages freed since back to the system, after recovery
/// and at every retention round. Rebuilding a million pending transactions
/// allocates and frees far more than the table keeps, as do bursts of
/// traffic; glibc keeps freed pages inside its arenas otherwise, so the
/// broker would stay as large as its largest moment.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn release_freed_heap() {
    // SAFETY: malloc_trim only returns free memory of the allocator's own
    // arenas to the kernel; no live allocation moves or changes.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_freed_heap() {}

#[cfg(test)]
mod tests {
    use super::*;

    /// The broker's own task delivers a delayed message, without anyone
    /// calling `deliver_due` by hand.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_broker_delivers_delayed_messages_by_itself() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = BrokerConfig::new(dir.path());
        config.listen = "127.0.0.1:0".into();
        config.standalone = true;
        config.nameserver_listen = "127.0.0.1:0".into();
        config.nameservers = Vec::new();
        config.segment_size = 8 << 20;
        let broker = Broker::start(config).await.unwrap();
        let Run::Single(inc) = &broker.run else {
            panic!("a single broker")
        };
        let store = inc.inner.store.clone();
        store.ensure_queues("orders", 1).unwrap();
        let deliver_at = txmq_protocol::now_millis() + 300;
        let msg = txmq_protocol::Message::new("orders", &b"later"[..]);
        store
            .append_delayed("orders", 0, vec![msg], deliver_at)
            .await
            .unwrap();
        let started = std::time::Instant::now();
        let mut got = Vec::new();
        while got.is_empty() && started.elapsed() < Duration::from_secs(3) {
            got = store.read("orders", 0, 0, 10, 1 << 20).unwrap().messages;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let at = txmq_protocol::now_millis();
        assert_eq!(got.len(), 1, "delivered");
        assert!(
            at >= deliver_at && at < deliver_at + 1000,
            "{}",
            at as i64 - deliver_at as i64
        );
        assert_eq!(store.delay_stats().pending, 0);
        broker.shutdown().await;
    }
}
