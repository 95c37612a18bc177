//! One shared connection per peer address, opened on first use and opened
//! again once it has closed (until the pool is closed).
//!
//! Every request of a client object to the same broker or nameserver is
//! pipelined over that one [`Connection`]. Opening is single-flight: when
//! many sends find no connection at once, one of them connects and the others
//! wait for it (and share its failure, instead of each trying and timing out
//! in turn).

use std::sync::{Arc, Mutex};
use std::time::Instant;

use dashmap::DashMap;
use txmq_protocol::{Hello, Role, PROTOCOL_VERSION};
use txmq_remoting::{Connection, ConnectionConfig, Service};

use crate::flight::{Remember, SingleFlight};
use crate::ClientConfig;

/// A set of connections that all introduce themselves with the same hello.
/// Cloning is cheap; the connections close when the last clone is dropped
/// or on [`ConnectionPool::close`].
#[derive(Clone)]
pub struct ConnectionPool {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    hello: Hello,
    config: ConnectionConfig,
    service: Option<Arc<dyn Service>>,
    slots: DashMap<String, Arc<Slot>, foldhash::fast::RandomState>,
    /// Set by [`ConnectionPool::close`]: no connection is opened after it.
    closed: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
struct Slot {
    conn: Mutex<Option<Connection>>,
    /// One caller connects at a time; the others wait and take its
    /// connection, or its failure.
    opening: Arc<SingleFlight<txmq_remoting::Error>>,
}

impl Slot {
    fn current(&self) -> Option<Connection> {
        lock(&self.conn)
            .as_ref()
            .filter(|c| !c.is_closed())
            .cloned()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Nothing panics while holding these locks; a poisoned one is still consistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl std::fmt::Debug for ConnectionPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionPool")
            .field("client_id", &self.inner.hello.client_id)
            .field("peers", &self.inner.slots.len())
            .finish()
    }
}

impl ConnectionPool {
    /// A pool whose connections say hello as `role` of `group`, with the
    /// timeouts of `config`. `service`, if given, answers requests the peers
    /// send back on these connections.
    pub fn new(
        config: &ClientConfig,
        role: Role,
        group: Option<String>,
        service: Option<Arc<dyn Service>>,
    ) -> ConnectionPool {
        ConnectionPool {
            inner: Arc::new(PoolInner {
                hello: Hello {
                    version: PROTOCOL_VERSION,
                    role,
                    client_id: config.client_id.clone(),
                    group,
                },
                config: config.connection_config(),
                service,
                slots: DashMap::default(),
                closed: Default::default(),
            }),
        }
    }

    /// The open connection to `addr`, connecting first if there is none or
    /// it has closed.
    ///
    /// # Errors
    /// The connect or hello failure ([`txmq_remoting::Error::Connect`], ...).
    /// Callers that waited for a concurrent attempt get that attempt's error.
    pub async fn get(&self, addr: &str) -> Result<Connection, txmq_remoting::Error> {
        // Every request asks: the open connection is handed out without
        // taking a handle on its slot (without one, the map is read twice).
        if let Some(conn) = self.current(addr) {
            return Ok(conn);
        }
        let slot = self.slot(addr);
        if let Some(conn) = slot.current() {
            return Ok(conn);
        }
        if self.is_closed() {
            return Err(txmq_remoting::Error::Closed {
                peer: addr.to_string(),
            });
        }
        let waiting_since = Instant::now();
        let target = addr.to_string();
        let (slot, addr, inner) = (slot.clone(), addr.to_string(), self.inner.clone());
        let opening = slot.opening.clone();
        let attempt = opening.run(waiting_since, move |failed| async move {
            if let Some(conn) = slot.current() {
                return (Ok(conn), Remember::Nothing);
            }
            if let Some(e) = failed {
                return (Err(e), Remember::Nothing);
            }
            let hello = inner.hello.clone();
            let service = inner.service.clone();
            match Connection::connect(&addr, hello, service, inner.config.clone()).await {
                Ok(conn) => {
                    tracing::debug!(%addr, "connected");
                    *lock(&slot.conn) = Some(conn.clone());
                    // Closed while connecting: this one closes too.
                    if inner.closed.load(std::sync::atomic::Ordering::SeqCst) {
                        inner.close_all();
                        return (
                            Err(txmq_remoting::Error::Closed { peer: addr }),
                            Remember::Nothing,
                        );
                    }
                    (Ok(conn), Remember::Success)
                }
                Err(e) => {
                    tracing::debug!(%addr, error = %e, "connect failed");
                    (Err(e.clone()), Remember::Failure(e))
                }
            }
        });
        attempt.await.unwrap_or_else(|e| {
            Err(txmq_remoting::Error::Connect {
                addr: target,
                message: format!("the connect task failed: {e}"),
            })
        })
    }

    /// The open connection to `addr`, if there is one; never connects.
    pub fn current(&self, addr: &str) -> Option<Connection> {
        self.inner.slots.get(addr).and_then(|slot| slot.current())
    }

    /// Closes every connection for good: later calls to
    /// [`ConnectionPool::get`] fail with [`txmq_remoting::Error::Closed`]
    /// instead of opening new ones (a closed client must not come back, as
    /// a transaction producer that would answer check-backs).
    pub fn close(&self) {
        self.inner
            .closed
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.inner.close_all();
    }

    /// Whether [`ConnectionPool::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn slot(&self, addr: &str) -> Arc<Slot> {
        if let Some(slot) = self.inner.slots.get(addr) {
            return slot.clone();
        }
        self.inner
            .slots
            .entry(addr.to_string())
            .or_default()
            .clone()
    }
}

impl PoolInner {
    fn close_all(&self) {
        for slot in self.slots.iter() {
            if let Some(conn) = lock(&slot.conn).take() {
                conn.close();
            }
        }
    }
}

impl Drop for PoolInner {
    fn drop(&mut self) {
        // A connection outlives its handles; close ours with the last user.
        self.close_all();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::net::TcpListener;

    use super::*;

    /// A caller left suspended in the middle of connecting (a future in a
    /// `select!` whose task awaits something else) must not hold up the
    /// other callers for the same peer: the attempt runs on its own task.
    #[tokio::test]
    async fn a_caller_suspended_mid_connect_does_not_block_the_others() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        // Accepts and never answers the hello.
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                held.push(s);
            }
        });
        let config = ClientConfig {
            request_timeout: Duration::from_millis(200),
            ..ClientConfig::default()
        };
        let pool = ConnectionPool::new(&config, Role::Admin, None, None);
        let mut first = Box::pin(pool.get(&addr));
        assert!(
            tokio::time::timeout(Duration::from_millis(50), &mut first)
                .await
                .is_err(),
            "the first attempt is under way"
        );
        // `first` is never polled again; the second caller still gets its
        // answer (the hello timed out) in bounded time.
        let second = tokio::time::timeout(Duration::from_secs(3), pool.get(&addr)).await;
        assert!(matches!(second, Ok(Err(_))), "{second:?}");
        drop(first);
    }
}
