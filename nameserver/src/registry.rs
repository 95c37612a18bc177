//! The route table: which brokers are alive and which topics each serves.
//!
//! One entry per broker name, replaced wholesale by every registration (so a
//! heartbeat also carries the broker's current topic table). A broker leaves
//! the table when it unregisters, when the connection it registered over
//! closes, or when it has been silent for longer than the expiry. Queries
//! also skip brokers past their expiry, so an answer never names a broker
//! the scanner simply has not reached yet.
//!
//! Time is passed in (`now`) rather than read inside, which keeps every
//! method a pure function of its inputs and easy to test.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;
use tracing::{debug, info};
use txmq_protocol::{
    BrokerInfo, BrokerQueues, ClusterInfo, ErrorCode, RegisterBroker, TopicConfig, TopicList,
    TopicOnBroker, TopicRoute, WireError,
};

/// One registered broker.
#[derive(Debug)]
struct BrokerEntry {
    cluster: String,
    addr: String,
    topics: BTreeMap<String, TopicConfig>,
    last_heartbeat: Instant,
    /// The connection the latest registration came over.
    conn_id: u64,
}

/// Why a broker left the table (for the log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DropReason {
    /// No heartbeat for longer than the expiry.
    Expired {
        /// How long it had been silent.
        silent_for: Duration,
    },
    /// The connection it registered over closed.
    ConnectionClosed,
    /// It said goodbye.
    Unregistered,
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DropReason::Expired { silent_for } => {
                write!(f, "no heartbeat for {} ms", silent_for.as_millis())
            }
            DropReason::ConnectionClosed => f.write_str("its connection closed"),
            DropReason::Unregistered => f.write_str("it unregistered"),
        }
    }
}

/// The shared route table. All methods take the lock briefly and never await.
#[derive(Debug)]
pub(crate) struct Registry {
    expiry: Duration,
    brokers: Mutex<BTreeMap<String, BrokerEntry>>,
}

impl Registry {
    /// An empty table whose brokers expire after `expiry` without a heartbeat.
    pub(crate) fn new(expiry: Duration) -> Registry {
        Registry {
            expiry,
            brokers: Mutex::new(BTreeMap::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, BrokerEntry>> {
        // Every update below replaces or removes whole entries, so a panic
        // elsewhere cannot leave the map half-updated: recover from poisoning.
        self.brokers.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn is_live(&self, entry: &BrokerEntry, now: Instant) -> bool {
        now.saturating_duration_since(entry.last_heartbeat) <= self.expiry
    }

    /// Registers a broker or records its heartbeat, replacing its topic table.
    ///
    /// # Errors
    /// `BAD_ARGUMENT` when the broker name or address is empty.
    pub(crate) fn register(
        &self,
        req: RegisterBroker,
        conn_id: u64,
        now: Instant,
    ) -> Result<(), WireError> {
        if req.broker_name.trim().is_empty() {
            return Err(WireError::new(
                ErrorCode::BadArgument,
                "cannot register a broker: its name is empty",
            ));
        }
        if req.addr.trim().is_empty() {
            return Err(WireError::new(
                ErrorCode::BadArgument,
                format!(
                    "cannot register broker '{}': its address is empty",
                    req.broker_name
                ),
            ));
        }
        let topics: BTreeMap<String, TopicConfig> = req
            .topics
            .into_iter()
            .map(|t| (t.name.clone(), t))
            .collect();
        let entry = BrokerEntry {
            cluster: req.cluster,
            addr: req.addr,
            topics,
            last_heartbeat: now,
            conn_id,
        };
        let mut brokers = self.lock();
        // A broker past its expiry that the scanner has not removed yet
        // counts as new: it was already gone from every answer.
        let previous = brokers
            .get(&req.broker_name)
            .filter(|old| self.is_live(old, now))
            .map(|old| (old.addr.clone(), old.cluster.clone(), old.topics.len()));
        match previous {
            None => info!(
                cluster = %entry.cluster,
                broker = %req.broker_name,
                addr = %entry.addr,
                topics = entry.topics.len(),
                "broker registered"
            ),
            Some((old_addr, old_cluster, _))
                if old_addr != entry.addr || old_cluster != entry.cluster =>
            {
                info!(
                    broker = %req.broker_name,
                    cluster = %entry.cluster,
                    addr = %entry.addr,
                    %old_cluster,
                    %old_addr,
                    "broker registered again with a new address or cluster"
                )
            }
            Some((_, _, old_topics)) => debug!(
                broker = %req.broker_name,
                topics = entry.topics.len(),
                old_topics,
                "broker heartbeat"
            ),
        }
        brokers.insert(req.broker_name, entry);
        Ok(())
    }

    /// Removes a broker that said goodbye; true if it was registered.
    pub(crate) fn unregister(&self, broker_name: &str) -> bool {
        let removed = self.lock().remove(broker_name);
        match removed {
            Some(entry) => {
                log_drop(broker_name, &entry, DropReason::Unregistered);
                true
            }
            None => false,
        }
    }

    /// Removes every broker whose latest registration came over connection
    /// `conn_id`; returns their names. A broker that has since registered over
    /// another connection stays.
    pub(crate) fn connection_closed(&self, conn_id: u64) -> Vec<String> {
        self.remove_where(|_, entry| {
            (entry.conn_id == conn_id).then_some(DropReason::ConnectionClosed)
        })
    }

    /// Removes every broker silent for longer than the expiry; returns their names.
    pub(crate) fn expire(&self, now: Instant) -> Vec<String> {
        self.remove_where(|registry, entry| {
            (!registry.is_live(entry, now)).then(|| DropReason::Expired {
                silent_for: now.saturating_duration_since(entry.last_heartbeat),
            })
        })
    }

    fn remove_where(
        &self,
        why: impl Fn(&Registry, &BrokerEntry) -> Option<DropReason>,
    ) -> Vec<String> {
        let removed: Vec<(String, BrokerEntry, DropReason)> = {
            let mut brokers = self.lock();
            let doomed: Vec<(String, DropReason)> = brokers
                .iter()
                .filter_map(|(name, entry)| why(self, entry).map(|reason| (name.clone(), reason)))
                .collect();
            doomed
                .into_iter()
                .filter_map(|(name, reason)| {
                    brokers.remove(&name).map(|entry| (name, entry, reason))
                })
                .collect()
        };
        // Log after the lock is released.
        removed
            .into_iter()
            .map(|(name, entry, reason)| {
                log_drop(&name, &entry, reason);
                name
            })
            .collect()
    }

    /// The route of `topic`: one entry per live broker serving it, sorted by broker name.
    ///
    /// # Errors
    /// `NO_ROUTE` when no live broker serves the topic.
    pub(crate) fn route(&self, topic: &str, now: Instant) -> Result<TopicRoute, WireError> {
        let brokers: Vec<BrokerQueues> = self
            .lock()
            .iter()
            .filter(|(_, entry)| self.is_live(entry, now))
            .filter_map(|(name, entry)| {
                entry.topics.get(topic).map(|t| BrokerQueues {
                    broker_name: name.clone(),
                    addr: entry.addr.clone(),
                    queues: t.queues,
                    perm: t.perm,
                })
            })
            .collect();
        if brokers.is_empty() {
            return Err(WireError::new(
                ErrorCode::NoRoute,
                format!("no route for topic '{topic}': no live broker serves it"),
            ));
        }
        // The map iterates in broker-name order, so `brokers` is already sorted.
        Ok(TopicRoute {
            topic: topic.to_string(),
            brokers,
        })
    }

    /// Every live broker, sorted by cluster then broker name.
    pub(crate) fn cluster(&self, now: Instant) -> ClusterInfo {
        let mut brokers: Vec<BrokerInfo> = self
            .lock()
            .iter()
            .filter(|(_, entry)| self.is_live(entry, now))
            .map(|(name, entry)| BrokerInfo {
                cluster: entry.cluster.clone(),
                broker_name: name.clone(),
                addr: entry.addr.clone(),
                last_heartbeat_ms_ago: u64::try_from(
                    now.saturating_duration_since(entry.last_heartbeat)
                        .as_millis(),
                )
                .unwrap_or(u64::MAX),
                topic_count: u32::try_from(entry.topics.len()).unwrap_or(u32::MAX),
            })
            .collect();
        brokers.sort_by(|a, b| (&a.cluster, &a.broker_name).cmp(&(&b.cluster, &b.broker_name)));
        ClusterInfo { brokers }
    }

    /// Every (topic, live broker) pair, sorted by topic then broker name.
    pub(crate) fn topics(&self, now: Instant) -> TopicList {
        let mut topics: Vec<TopicOnBroker> = self
            .lock()
            .iter()
            .filter(|(_, entry)| self.is_live(entry, now))
            .flat_map(|(name, entry)| {
                entry.topics.values().map(move |t| TopicOnBroker {
                    broker_name: name.clone(),
                    config: t.clone(),
                })
            })
            .collect();
        topics.sort_by(|a, b| {
            (&a.config.name, &a.broker_name).cmp(&(&b.config.name, &b.broker_name))
        });
        TopicList { topics }
    }
}

fn log_drop(name: &str, entry: &BrokerEntry, reason: DropReason) {
    info!(cluster = %entry.cluster, broker = %name, addr = %entry.addr, %reason, "broker dropped from all routes");
}

#[cfg(test)]
mod tests {
    use super::*;
    use txmq_protocol::PERM_READ_WRITE;

    const EXPIRY: Duration = Duration::from_secs(10);

    fn topic(name: &str, queues: u32) -> TopicConfig {
        TopicConfig {
            name: name.into(),
            queues,
            perm: PERM_READ_WRITE,
        }
    }

    fn reg(cluster: &str, name: &str, topics: Vec<TopicConfig>) -> RegisterBroker {
        RegisterBroker {
            cluster: cluster.into(),
            broker_name: name.into(),
            addr: format!("{name}.local:10911"),
            topics,
        }
    }

    fn route_names(r: &Registry, topic: &str, now: Instant) -> Vec<String> {
        match r.route(topic, now) {
            Ok(route) => route.brokers.into_iter().map(|b| b.broker_name).collect(),
            Err(_) => Vec::new(),
        }
    }

    #[test]
    fn route_lists_live_brokers_sorted_and_unknown_topics_have_no_route() {
        let r = Registry::new(EXPIRY);
        let t0 = Instant::now();
        r.register(reg("c", "b2", vec![topic("orders", 4)]), 1, t0)
            .unwrap();
        r.register(
            reg("c", "b1", vec![topic("orders", 8), topic("pay", 2)]),
            2,
            t0,
        )
        .unwrap();
        let route = r.route("orders", t0).unwrap();
        assert_eq!(route.topic, "orders");
        assert_eq!(
            route.brokers,
            vec![
                BrokerQueues {
                    broker_name: "b1".into(),
                    addr: "b1.local:10911".into(),
                    queues: 8,
                    perm: PERM_READ_WRITE
                },
                BrokerQueues {
                    broker_name: "b2".into(),
                    addr: "b2.local:10911".into(),
                    queues: 4,
                    perm: PERM_READ_WRITE
                },
            ]
        );
        let err = r.route("nope", t0).unwrap_err();
        assert_eq!(err.code, ErrorCode::NoRoute);
        assert!(err.message.contains("'nope'"), "{}", err.message);
    }

    #[test]
    fn a_broker_past_its_expiry_is_hidden_before_and_removed_by_the_scan() {
        let r = Registry::new(EXPIRY);
        let t0 = Instant::now();
        r.register(reg("c", "b1", vec![topic("orders", 4)]), 1, t0)
            .unwrap();
        r.register(reg("c", "b2", vec![topic("orders", 4)]), 2, t0)
            .unwrap();
        // b1 keeps heartbeating, b2 falls silent.
        r.register(reg("c", "b1", vec![topic("orders", 4)]), 1, t0 + EXPIRY)
            .unwrap();
        let late = t0 + EXPIRY + Duration::from_millis(1);
        assert_eq!(route_names(&r, "orders", late), vec!["b1"]);
        assert_eq!(r.cluster(late).brokers.len(), 1);
        assert_eq!(r.expire(t0 + EXPIRY), Vec::<String>::new());
        assert_eq!(r.expire(late), vec!["b2"]);
        assert_eq!(route_names(&r, "orders", late), vec!["b1"]);
    }

    #[test]
    fn reregistration_replaces_the_topic_table() {
        let r = Registry::new(EXPIRY);
        let t0 = Instant::now();
        r.register(reg("c", "b1", vec![topic("a", 4), topic("b", 4)]), 1, t0)
            .unwrap();
        r.register(reg("c", "b1", vec![topic("b", 2), topic("c", 1)]), 1, t0)
            .unwrap();
        assert!(r.route("a", t0).is_err());
        assert_eq!(r.route("b", t0).unwrap().brokers[0].queues, 2);
        assert_eq!(route_names(&r, "c", t0), vec!["b1"]);
    }

    #[test]
    fn closing_a_connection_drops_only_brokers_registered_over_it() {
        let r = Registry::new(EXPIRY);
        let t0 = Instant::now();
        r.register(reg("c", "b1", vec![topic("t", 1)]), 1, t0)
            .unwrap();
        r.register(reg("c", "b2", vec![topic("t", 1)]), 2, t0)
            .unwrap();
        // b2 reconnected: its latest registration came over connection 3.
        r.register(reg("c", "b2", vec![topic("t", 1)]), 3, t0)
            .unwrap();
        assert_eq!(r.connection_closed(2), Vec::<String>::new());
        assert_eq!(r.connection_closed(1), vec!["b1"]);
        assert_eq!(route_names(&r, "t", t0), vec!["b2"]);
    }

    #[test]
    fn unregister_drops_the_broker_and_is_idempotent() {
        let r = Registry::new(EXPIRY);
        let t0 = Instant::now();
        r.register(reg("c", "b1", vec![topic("t", 1)]), 1, t0)
            .unwrap();
        assert!(r.unregister("b1"));
        assert!(!r.unregister("b1"));
        assert!(r.route("t", t0).is_err());
    }

    #[test]
    fn empty_name_or_address_is_a_bad_argument() {
        let r = Registry::new(EXPIRY);
        let t0 = Instant::now();
        let mut no_name = reg("c", "b1", vec![]);
        no_name.broker_name = " ".into();
        assert_eq!(
            r.register(no_name, 1, t0).unwrap_err().code,
            ErrorCode::BadArgument
        );
        let mut no_addr = reg("c", "b1", vec![]);
        no_addr.addr.clear();
        assert_eq!(
            r.register(no_addr, 1, t0).unwrap_err().code,
            ErrorCode::BadArgument
        );
        assert!(r.cluster(t0).brokers.is_empty());
    }

    #[test]
    fn listings_are_sorted() {
        let r = Registry::new(EXPIRY);
        let t0 = Instant::now();
        r.register(reg("z", "a", vec![topic("y", 1), topic("x", 1)]), 1, t0)
            .unwrap();
        r.register(reg("a", "b", vec![topic("x", 1)]), 2, t0)
            .unwrap();
        let later = t0 + Duration::from_millis(250);
        let cluster: Vec<(String, String, u32, u64)> = r
            .cluster(later)
            .brokers
            .into_iter()
            .map(|b| {
                (
                    b.cluster,
                    b.broker_name,
                    b.topic_count,
                    b.last_heartbeat_ms_ago,
                )
            })
            .collect();
        assert_eq!(
            cluster,
            vec![
                ("a".into(), "b".into(), 1, 250),
                ("z".into(), "a".into(), 2, 250)
            ]
        );
        let topics: Vec<(String, String)> = r
            .topics(t0)
            .topics
            .into_iter()
            .map(|t| (t.config.name, t.broker_name))
            .collect();
        assert_eq!(
            topics,
            vec![
                ("x".into(), "a".into()),
                ("x".into(), "b".into()),
                ("y".into(), "a".into())
            ]
        );
    }
}
