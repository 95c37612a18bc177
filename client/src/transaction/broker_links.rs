//! Keeping a connection open to every broker (the master of every broker
//! group) of the cluster, so that any broker can check back on this producer's group, even one this producer
//! never sent to, and even for a transaction another member prepared.
//!
//! A background task asks the nameservers for the cluster every refresh
//! interval (and at once when one of the connections closes) and connects
//! to each broker it does not have an open connection to. The connections
//! are those of the producer's [`ConnectionPool`], so sends reuse them: one
//! connection per broker for the whole producer.

use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use futures_util::future::join_all;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::nameserver::NameserverClient;
use crate::pool::ConnectionPool;
use crate::Result;

/// Pause after a connection closed before connecting again, so a broker that
/// refuses at once is not hammered.
const RECONNECT_PAUSE: Duration = Duration::from_millis(100);

/// The producer's connections to all brokers. Cloning is cheap.
#[derive(Debug, Clone)]
pub(crate) struct BrokerLinks {
    inner: Arc<LinksInner>,
}

#[derive(Debug)]
struct LinksInner {
    pool: ConnectionPool,
    nameservers: NameserverClient,
    /// Broker name -> (address, id of the connection being watched).
    brokers: DashMap<String, (String, Option<u64>)>,
    /// Woken when a watched connection closes.
    lost: Notify,
    stop: CancellationToken,
}

impl BrokerLinks {
    pub(crate) fn new(
        pool: ConnectionPool,
        nameservers: NameserverClient,
        stop: CancellationToken,
    ) -> BrokerLinks {
        BrokerLinks {
            inner: Arc::new(LinksInner {
                pool,
                nameservers,
                brokers: DashMap::new(),
                lost: Notify::new(),
                stop,
            }),
        }
    }

    /// Asks the nameservers for the cluster and connects to every broker
    /// not connected yet, all at once. Returns the names of the brokers
    /// that could not be connected to (they are tried again later).
    ///
    /// # Errors
    /// When no nameserver answers.
    pub(crate) async fn refresh(&self) -> Result<Vec<(String, crate::Error)>> {
        let brokers = self.inner.nameservers.cluster().await?;
        // Only a group's master checks back (and takes prepares and ends);
        // its slaves are not connected to.
        let mut wanted: Vec<(String, String)> = brokers
            .into_iter()
            .filter(|b| b.role == txmq_protocol::BrokerRole::Master)
            .map(|b| (b.broker_name, b.addr))
            .collect();
        wanted.sort();
        wanted.dedup_by(|a, b| a.0 == b.0);
        let attempts = wanted.into_iter().map(|(name, addr)| async move {
            let result = self.connect(&name, &addr).await;
            (name, result)
        });
        Ok(join_all(attempts)
            .await
            .into_iter()
            .filter_map(|(name, r)| r.err().map(|e| (name, e)))
            .collect())
    }

    async fn connect(&self, name: &str, addr: &str) -> Result<()> {
        let conn = self
            .inner
            .pool
            .get(addr)
            .await
            .map_err(|e| crate::Error::at_broker(name, addr, e))?;
        let watched = self
            .inner
            .brokers
            .get(name)
            .is_some_and(|e| e.0 == addr && e.1 == Some(conn.id()));
        if !watched {
            tracing::debug!(broker = %name, %addr, "connected for check-backs");
            self.inner
                .brokers
                .insert(name.to_string(), (addr.to_string(), Some(conn.id())));
            let links = self.inner.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = conn.closed() => links.lost.notify_one(),
                    _ = links.stop.cancelled() => {}
                }
            });
        }
        Ok(())
    }

    /// Names of the brokers this producer has an open connection to, sorted.
    pub(crate) fn connected(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .inner
            .brokers
            .iter()
            .filter(|e| self.inner.pool.current(&e.value().0).is_some())
            .map(|e| e.key().clone())
            .collect();
        names.sort();
        names
    }

    /// Refreshes every `interval`, and soon after a connection closes,
    /// until stopped.
    pub(crate) async fn keep(self, interval: Duration) {
        let stop = self.inner.stop.clone();
        loop {
            let lost = tokio::select! {
                _ = tokio::time::sleep(interval) => false,
                _ = self.inner.lost.notified() => true,
                _ = stop.cancelled() => return,
            };
            if lost {
                tokio::select! {
                    _ = tokio::time::sleep(RECONNECT_PAUSE.min(interval)) => {}
                    _ = stop.cancelled() => return,
                }
            }
            let refreshed = tokio::select! {
                r = self.refresh() => r,
                _ = stop.cancelled() => return,
            };
            match refreshed {
                Ok(failed) => {
                    for (broker, e) in failed {
                        tracing::debug!(%broker, error = %crate::error::chain(&e), "cannot connect for check-backs; will try again");
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "cannot list the cluster's brokers; will try again")
                }
            }
        }
    }
}
