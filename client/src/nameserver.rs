//! Asking the nameservers: any one will do, so they are tried in turn.
//!
//! Nameservers are independent and hold the same view once brokers have
//! registered with all of them. A request goes to the nameserver that
//! answered last; on any failure the next one is tried, so a nameserver
//! that is down or has just restarted (and does not know a route yet) is
//! skipped.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use txmq_protocol::{
    BrokerInfo, Call, ErrorCode, GetCluster, GetRoute, ListTopics, TopicOnBroker, TopicRoute,
};

use crate::pool::ConnectionPool;
use crate::{Error, Result};

/// A client of a set of nameservers. Cloning is cheap.
#[derive(Debug, Clone)]
pub struct NameserverClient {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    addrs: Vec<String>,
    pool: ConnectionPool,
    preferred: AtomicUsize,
}

impl NameserverClient {
    /// A client of the nameservers at `addrs` whose connections come from `pool`.
    pub fn new(addrs: Vec<String>, pool: ConnectionPool) -> NameserverClient {
        NameserverClient {
            inner: Arc::new(Inner {
                addrs,
                pool,
                preferred: AtomicUsize::new(0),
            }),
        }
    }

    /// The nameserver addresses.
    pub fn addrs(&self) -> &[String] {
        &self.inner.addrs
    }

    /// Sends `request` to the nameservers in turn until one answers.
    ///
    /// # Errors
    /// When none answers: an error answer from one of them if any gave one
    /// (it says more than a refused connection), else the last failure.
    pub async fn call<C: Call + Clone>(
        &self,
        request: C,
    ) -> Result<C::Reply, txmq_remoting::Error> {
        let addrs = &self.inner.addrs;
        let start = self.inner.preferred.load(Ordering::Relaxed);
        let mut remote_error = None;
        let mut other_error = None;
        for i in 0..addrs.len() {
            let idx = (start + i) % addrs.len();
            let addr = &addrs[idx];
            let result = match self.inner.pool.get(addr).await {
                Ok(conn) => conn.call(request.clone()).await,
                Err(e) => Err(e),
            };
            match result {
                Ok(reply) => {
                    self.inner.preferred.store(idx, Ordering::Relaxed);
                    return Ok(reply);
                }
                Err(e) => {
                    tracing::debug!(nameserver = %addr, error = %e, "nameserver request failed");
                    if e.remote().is_some() {
                        remote_error.get_or_insert(e);
                    } else {
                        other_error = Some(e);
                    }
                }
            }
        }
        Err(remote_error
            .or(other_error)
            .unwrap_or_else(|| txmq_remoting::Error::Connect {
                addr: String::new(),
                message: "no nameserver address configured".into(),
            }))
    }

    /// The route of `topic`.
    ///
    /// # Errors
    /// [`Error::NoRoute`] when the nameservers know no broker serving the
    /// topic; [`Error::Remoting`] when none could be asked.
    pub async fn route(&self, topic: &str) -> Result<TopicRoute> {
        let request = GetRoute {
            topic: topic.to_string(),
        };
        match self.call(request).await {
            Ok(route) => Ok(route),
            Err(e) if e.remote().is_some_and(|w| w.code == ErrorCode::NoRoute) => {
                Err(Error::NoRoute {
                    topic: topic.to_string(),
                })
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The brokers the nameservers know, sorted by cluster then name.
    ///
    /// # Errors
    /// [`Error::Remoting`] when no nameserver answers.
    pub async fn cluster(&self) -> Result<Vec<BrokerInfo>> {
        Ok(self.call(GetCluster {}).await?.brokers)
    }

    /// Every topic on every broker, as the nameservers know them.
    ///
    /// # Errors
    /// [`Error::Remoting`] when no nameserver answers.
    pub async fn topics(&self) -> Result<Vec<TopicOnBroker>> {
        Ok(self.call(ListTopics {}).await?.topics)
    }
}
