//! Where a consumer's requests to a broker group go: the group's master,
//! or one of its slaves while the master is unreachable, as RocketMQ's
//! consumers read from a slave when the master is down.
//!
//! A slave's queues are byte-identical copies of the master's, at the same
//! offsets, so a reader keeps its position when it switches. A slave serves
//! pulls, offset queries and heartbeats, and keeps offset commits to hand
//! them to the master later.
//!
//! The master is used whenever the route names it (its address is empty
//! when no master of the group is live) and it connects. After it failed
//! to connect, it is tried again only [`MASTER_RETRY`] later (a master that
//! does not answer its connects must not cost every pull a connect
//! timeout); meanwhile, and whenever it fails, the slaves are tried in
//! turn, starting with the one that connected last.

use std::time::{Duration, Instant};

use dashmap::DashMap;
use txmq_protocol::BrokerQueues;
use txmq_remoting::Connection;

use crate::pool::ConnectionPool;
use crate::{Error, Result};

/// How long after a failed connect to the master the slaves are used
/// without trying it first.
pub(crate) const MASTER_RETRY: Duration = Duration::from_millis(500);

/// The addresses of the broker groups a consumer reads, by group name.
#[derive(Debug, Default)]
pub(crate) struct ReadTargets {
    groups: DashMap<String, Group>,
}

#[derive(Debug, Clone, Default)]
struct Group {
    /// The master's address; empty when no master of the group is live.
    master: String,
    /// Live slaves, as the route lists them.
    slaves: Vec<String>,
    /// The slave tried first: the one that connected last.
    next_slave: usize,
    /// When the master last failed to connect.
    master_failed: Option<Instant>,
    /// Where the last request went (to log a switch once).
    current: String,
}

/// A broker of a group, connected.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    /// Its address.
    pub(crate) addr: String,
    /// The connection to it.
    pub(crate) conn: Connection,
    /// True for a slave (the master is unreachable).
    pub(crate) slave: bool,
}

impl ReadTargets {
    /// Takes the addresses of a route entry. A new master address is tried
    /// at once.
    pub(crate) fn update(&self, b: &BrokerQueues) {
        if let Some(g) = self.groups.get(&b.broker_name) {
            if g.master == b.addr && g.slaves == b.slaves {
                return;
            }
        }
        let mut g = self.groups.entry(b.broker_name.clone()).or_default();
        if g.master != b.addr {
            g.master_failed = None;
        }
        g.master = b.addr.clone();
        if g.slaves != b.slaves {
            g.slaves = b.slaves.clone();
            g.next_slave = 0;
        }
    }

    /// The names of the groups known, in no particular order.
    pub(crate) fn names(&self) -> Vec<String> {
        self.groups.iter().map(|e| e.key().clone()).collect()
    }

    /// A connection to group `name`: its master, else the first slave that
    /// connects (see the module docs).
    ///
    /// # Errors
    /// [`Error::UnknownBroker`] when no route named the group, or it has
    /// neither a master nor a slave; [`Error::Broker`] with the master's
    /// connect failure (else the last slave's) when none connects.
    pub(crate) async fn connect(&self, pool: &ConnectionPool, name: &str) -> Result<Target> {
        // A copy: nothing is held across the connects.
        let g = self
            .groups
            .get(name)
            .map(|g| g.clone())
            .ok_or_else(|| Error::UnknownBroker {
                name: name.to_string(),
            })?;
        let has_master = !g.master.is_empty();
        let master_first =
            has_master && g.master_failed.is_none_or(|t| t.elapsed() >= MASTER_RETRY);
        let mut failure = None;
        if master_first {
            match self.try_master(pool, name, &g.master).await {
                Ok(target) => return Ok(target),
                Err(e) => failure = Some(e),
            }
        }
        let n = g.slaves.len();
        for i in 0..n {
            let at = (g.next_slave + i) % n;
            let addr = &g.slaves[at];
            match pool.get(addr).await {
                Ok(conn) => {
                    self.used(name, addr, Some(at));
                    return Ok(Target {
                        addr: addr.clone(),
                        conn,
                        slave: true,
                    });
                }
                Err(e) => {
                    tracing::debug!(broker = %name, slave = %addr, error = %e, "cannot connect to the slave");
                    failure.get_or_insert(Error::at_broker(name, addr, e));
                }
            }
        }
        if has_master && !master_first {
            // No slave connects: the master may be back already.
            return self.try_master(pool, name, &g.master).await;
        }
        Err(failure.unwrap_or_else(|| Error::UnknownBroker {
            name: name.to_string(),
        }))
    }

    async fn try_master(&self, pool: &ConnectionPool, name: &str, addr: &str) -> Result<Target> {
        match pool.get(addr).await {
            Ok(conn) => {
                self.used(name, addr, None);
                Ok(Target {
                    addr: addr.to_string(),
                    conn,
                    slave: false,
                })
            }
            Err(e) => {
                if let Some(mut g) = self.groups.get_mut(name) {
                    if g.master == addr {
                        g.master_failed = Some(Instant::now());
                    }
                }
                Err(Error::at_broker(name, addr, e))
            }
        }
    }

    /// Notes that requests to `name` go to `addr` (slave number `slave`),
    /// logging a switch.
    fn used(&self, name: &str, addr: &str, slave: Option<usize>) {
        if let Some(g) = self.groups.get(name) {
            if g.current == addr && slave.is_none_or(|s| s == g.next_slave) {
                return;
            }
        }
        let Some(mut g) = self.groups.get_mut(name) else {
            return;
        };
        if let Some(s) = slave {
            g.next_slave = s;
        } else {
            g.master_failed = None;
        }
        if g.current != addr {
            match slave {
                Some(_) => {
                    tracing::info!(broker = %name, slave = %addr, master = %g.master, "the master is unreachable; reading from a slave")
                }
                None if !g.current.is_empty() => {
                    tracing::info!(broker = %name, master = %addr, "reading from the master again")
                }
                None => {}
            }
            g.current = addr.to_string();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ClientConfig;
    use txmq_protocol::Role;

    fn entry(master: &str, slaves: &[&str]) -> BrokerQueues {
        BrokerQueues {
            epoch: Default::default(),
            broker_name: "g".into(),
            addr: master.into(),
            slaves: slaves.iter().map(|s| s.to_string()).collect(),
            queues: 1,
            perm: txmq_protocol::PERM_READ_WRITE,
        }
    }

    #[tokio::test]
    async fn a_group_without_any_live_broker_is_an_error_not_a_hang() {
        let config = ClientConfig::with_nameservers(["127.0.0.1:1"]);
        let pool = ConnectionPool::new(&config, Role::Consumer, Some("g".into()), None);
        let targets = ReadTargets::default();
        assert!(matches!(
            targets.connect(&pool, "g").await,
            Err(Error::UnknownBroker { .. })
        ));
        targets.update(&entry("", &[]));
        assert!(matches!(
            targets.connect(&pool, "g").await,
            Err(Error::UnknownBroker { .. })
        ));
        assert_eq!(targets.names(), ["g"]);
    }
}
