//! Asking the nameservers: any one will do, so they are tried in turn.
//!
//! Nameservers are independent and hold the same view once brokers have
//! registered with all of them. A request goes to the nameserver that
//! answered last; on any failure the next one is tried, so a nameserver
//! that is down or has just restarted (and does not know a route yet) is
//! skipped. One that could not be reached lately is tried last.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use txmq_protocol::{
    BrokerInfo, Call, ErrorCode, GetCluster, GetRoute, ListTopics, TopicOnBroker, TopicRoute,
};

use crate::pool::ConnectionPool;
use crate::{Error, Result};

/// How long a nameserver that could not be reached is tried after the
/// others, by every client of the process (a command makes several, each
/// of which paid a timeout to a paused nameserver first).
const UNREACHABLE_FOR: Duration = Duration::from_secs(10);

/// When each nameserver address last could not be reached.
static UNREACHABLE: Mutex<Option<HashMap<String, Instant>>> = Mutex::new(None);

fn unreachable_lately(addr: &str) -> bool {
    lock_unreachable()
        .as_ref()
        .and_then(|m| m.get(addr))
        .is_some_and(|at| at.elapsed() < UNREACHABLE_FOR)
}

/// Records whether `addr` was reached: an answer (an error answer too)
/// says it was; a connection that could not be made, or whose hello went
/// unanswered, that not. Anything else (a connection closed under a
/// request, a request's own timeout) says neither.
pub(crate) fn note_reached<T>(addr: &str, result: &Result<T, txmq_remoting::Error>) {
    use txmq_remoting::Error as E;
    let reached = match result {
        Ok(_) | Err(E::Remote(_)) => true,
        Err(E::Connect { .. }) => false,
        Err(E::Timeout { kind, .. }) if *kind == "Hello" => false,
        Err(_) => return,
    };
    let mut map = lock_unreachable();
    if reached {
        if let Some(m) = map.as_mut() {
            m.remove(addr);
        }
    } else {
        map.get_or_insert_with(HashMap::new)
            .insert(addr.to_string(), Instant::now());
    }
}

fn lock_unreachable() -> std::sync::MutexGuard<'static, Option<HashMap<String, Instant>>> {
    UNREACHABLE.lock().unwrap_or_else(|e| e.into_inner())
}

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

    /// The nameserver addresses (with their index in
    /// [`NameserverClient::addrs`]) in the order a request tries them: from
    /// the one that answered last.
    /// A nameserver that could not be reached lately, by any client of
    /// this process, comes last.
    pub fn in_turn(&self) -> impl Iterator<Item = (usize, &String)> {
        let addrs = &self.inner.addrs;
        let start = self.inner.preferred.load(Ordering::Relaxed);
        let mut order: Vec<usize> = (0..addrs.len())
            .map(|i| (start + i) % addrs.len())
            .collect();
        order.sort_by_key(|&i| unreachable_lately(&addrs[i]));
        order.into_iter().map(move |i| (i, &addrs[i]))
    }

    /// Sends the next request to the nameserver at `index` of
    /// [`NameserverClient::addrs`] first (one known to answer).
    pub fn prefer(&self, index: usize) {
        if index < self.inner.addrs.len() {
            self.inner.preferred.store(index, Ordering::Relaxed);
        }
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
        let mut remote_error = None;
        let mut other_error = None;
        for (idx, addr) in self.in_turn() {
            // One answered (no such route, say): one that could not be
            // reached lately is not waited for on top (it comes last).
            if remote_error.is_some() && unreachable_lately(addr) {
                break;
            }
            let result = match self.inner.pool.get(addr).await {
                Ok(conn) => conn.call(request.clone()).await,
                Err(e) => Err(e),
            };
            note_reached(addr, &result);
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
