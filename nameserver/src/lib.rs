//! txmq-nameserver: the name service of txmq. Brokers register here with
//! their topic tables and keep registering as a heartbeat; clients ask here
//! where a topic's queues are.
//!
//! A nameserver holds no durable state and talks to no other nameserver:
//! running several gives availability without consensus, since every broker
//! registers with each of them. The one exception is opt-in: with
//! [`NameserverConfig::controller`] set, the nameserver also runs a member
//! of the controller (crate `txmq-controller`), the Raft group that elects
//! broker groups' masters, on its own listen address; the nameserver's own
//! port then answers admins' `ElectMaster` and `GetControllerInfo` through it.
//!
//! With [`Nameserver::bind_with`] both listeners serve TLS and, with an
//! ACL file, authenticate every connection and check every request
//! against its user ([`ClusterSecurity`]): reading routes needs a signed-in
//! user, registering a broker a cluster member (`broker = true`) or an
//! admin, and a broker is unregistered only from the connection that
//! registered it.
//!
//! Start reading at [`Nameserver`] (bind, then run until cancelled), then
//! `service.rs` (the one `match` over request kinds) and `registry.rs` (the
//! route table: broker groups of one master and its slaves, and each
//! broker's liveness). `expiry.rs` is the scanner that drops
//! silent brokers; [`NameserverConfig`] holds the settings.
//!
//! ```no_run
//! # async fn example() -> Result<(), txmq_nameserver::Error> {
//! use txmq_nameserver::{Nameserver, NameserverConfig};
//! use tokio_util::sync::CancellationToken;
//!
//! let config = NameserverConfig { listen: "127.0.0.1:0".into(), ..Default::default() };
//! let nameserver = Nameserver::bind(config).await?;
//! println!("listening on {}", nameserver.local_addr());
//! let shutdown = CancellationToken::new();
//! nameserver.run(shutdown).await;
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

mod config;
mod error;
mod expiry;
mod metrics;
mod registry;
mod service;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;
use txmq_controller::Controller;
use txmq_remoting::ConnectionConfig;

pub use config::{NameserverConfig, DEFAULT_BROKER_EXPIRY, DEFAULT_LISTEN};
pub use error::Error;
pub use txmq_controller::{parse_peers, ClusterSecurity, ControllerConfig, DEFAULT_MASTER_EXPIRY};

use registry::Registry;
use service::NameService;

/// A bound nameserver, ready to [`run`](Nameserver::run).
#[derive(Debug)]
pub struct Nameserver {
    config: NameserverConfig,
    listener: TcpListener,
    local_addr: SocketAddr,
    controller: Option<Controller>,
    security: ClusterSecurity,
    metrics: Arc<metrics::Metrics>,
    /// `--metrics-listen`: bound, served by `run`.
    metrics_listener: Option<(TcpListener, SocketAddr)>,
}

impl Nameserver {
    /// Checks `config` and binds the listener, so that port 0 works and
    /// [`local_addr`](Nameserver::local_addr) is known before [`run`](Nameserver::run).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a zero broker expiry; [`Error::Bind`] when
    /// the address cannot be listened on (in use, not local, malformed);
    /// [`Error::Controller`] when the embedded controller cannot start
    /// (its listener, its data directory, its settings).
    pub async fn bind(config: NameserverConfig) -> Result<Nameserver, Error> {
        Nameserver::bind_with(config, ClusterSecurity::default()).await
    }

    /// [`Nameserver::bind`] with `security` on the nameserver's listener
    /// and the embedded controller's: TLS, and with an ACL file every
    /// connection authenticated and every request checked against its
    /// user. The controller's connections to its peers use the TLS and
    /// credentials of `security`.
    ///
    /// # Errors
    /// As [`Nameserver::bind`].
    pub async fn bind_with(
        config: NameserverConfig,
        security: ClusterSecurity,
    ) -> Result<Nameserver, Error> {
        config.validate()?;
        let bind_err = |source| Error::Bind {
            addr: config.listen.clone(),
            source,
        };
        let listener = TcpListener::bind(&config.listen).await.map_err(bind_err)?;
        let local_addr = listener.local_addr().map_err(bind_err)?;
        let controller = match &config.controller {
            Some(c) => Some(Controller::bind_with(c.clone(), security.clone()).await?),
            None => None,
        };
        Ok(Nameserver {
            config,
            listener,
            local_addr,
            controller,
            security,
            metrics: Arc::new(metrics::Metrics::new()),
            metrics_listener: None,
        })
    }

    /// Also serves Prometheus metrics at `http://<listen>/metrics` once
    /// [`run`](Nameserver::run) starts; binds `listen` now.
    ///
    /// # Errors
    /// [`Error::Bind`] when `listen` cannot be listened on.
    pub async fn with_metrics_listen(mut self, listen: &str) -> Result<Nameserver, Error> {
        let bound = txmq_remoting::metrics::bind(listen)
            .await
            .map_err(|source| Error::Bind {
                addr: format!("{listen} (--metrics-listen)"),
                source,
            })?;
        self.metrics_listener = Some(bound);
        Ok(self)
    }

    /// Where metrics are served, when [`Nameserver::with_metrics_listen`] was called.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener.as_ref().map(|(_, a)| *a)
    }

    /// The embedded controller's listen address, when it runs one.
    pub fn controller_addr(&self) -> Option<SocketAddr> {
        self.controller.as_ref().map(Controller::local_addr)
    }

    /// The address the nameserver listens on (with the real port when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves brokers and clients until `shutdown` is cancelled; then stops
    /// accepting, closes every connection and returns. The route table is
    /// in memory only and is gone once this returns.
    pub async fn run(self, shutdown: CancellationToken) {
        let registry = Arc::new(Registry::new(self.config.broker_expiry));
        self.metrics.watch(registry.clone());
        let service = Arc::new(
            NameService::new(
                registry.clone(),
                self.local_addr,
                self.controller.as_ref().map(Controller::handle),
                self.security.server.clone(),
            )
            .with_metrics(self.metrics.clone()),
        );
        if let Some((listener, _)) = self.metrics_listener {
            tokio::spawn(txmq_remoting::metrics::serve(
                listener,
                self.metrics.registry(),
                shutdown.clone(),
            ));
        }
        // One watcher for both listeners: they share the ACL file.
        self.security.server.watch(shutdown.clone());
        self.security
            .server
            .warn_if_open(&self.local_addr, "nameserver");
        let controller = self
            .controller
            .map(|c| tokio::spawn(c.run(shutdown.clone())));
        info!(
            broker_expiry = ?self.config.broker_expiry,
            "nameserver listening on {}",
            self.local_addr
        );
        let scanner = tokio::spawn(expiry::scan(
            registry,
            self.config.scan_interval(),
            shutdown.clone(),
        ));
        txmq_remoting::server::serve_with(
            self.listener,
            service,
            ConnectionConfig::default(),
            self.security.server,
            shutdown,
        )
        .await;
        // The scanner watches the same token; it only fails to join if it panicked.
        if let Err(e) = scanner.await {
            tracing::error!(error = %e, "expiry scanner failed");
        }
        if let Some(Err(e)) = match controller {
            Some(c) => Some(c.await),
            None => None,
        } {
            tracing::error!(error = %e, "controller failed");
        }
        info!(addr = %self.local_addr, "nameserver stopped");
    }
}
