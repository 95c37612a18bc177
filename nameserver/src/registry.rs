//! The route table: which brokers are alive and which topics each serves.
//!
//! One entry per broker name, whose topic table every registration replaces
//! (so a heartbeat also carries the broker's current topic table). A name
//! belongs to one live broker at a time: a registration under a name a live
//! broker at another address holds is refused ([`Registry::register`],
//! the rule in [`may_take`]), because clients key queues, offsets and queue
//! ownership by broker name and two brokers taking turns under one name
//! would send them to either at random. A broker leaves the table when it
//! unregisters (from the connection or the address that registered it),
//! when the connection it registered over closes, or when it has been
//! silent for longer than the expiry. Queries also skip brokers past their
//! expiry, so an answer never names a broker the scanner simply has not
//! reached yet.
//!
//! Time is passed in (`now`) rather than read inside, which keeps every
//! method a pure function of its inputs and easy to test.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;
use tracing::{debug, info, warn};
use txmq_protocol::{
    BrokerInfo, BrokerQueues, ClusterInfo, ErrorCode, RegisterBroker, TopicConfig, TopicList,
    TopicOnBroker, TopicRoute, UnregisterBroker, WireError,
};

/// A refused contender for a name is logged as a warning at most this often
/// (it retries about every second); in between, at debug level.
const REFUSAL_WARN_EVERY: Duration = Duration::from_secs(60);

/// At most this many refused addresses are remembered per name (for the
/// warning's rate limit); past that, the memory starts over.
const MAX_CONTENDERS: usize = 64;

/// One registered broker.
#[derive(Debug)]
struct BrokerEntry {
    cluster: String,
    addr: String,
    topics: BTreeMap<String, TopicConfig>,
    last_heartbeat: Instant,
    /// The connection the latest registration came over.
    conn_id: u64,
    /// Addresses refused this name, with when that was last logged as a warning.
    contenders: BTreeMap<String, Instant>,
}

/// Whether a registration `req` may take a name that the live broker `held`
/// holds: the one place that decides who may share a broker name.
///
/// Today a name is one broker, known by its address: the same address
/// (a heartbeat, a reconnect, a restart at the same address) may, any other
/// may not. Master and slave roles under one name (replication) are to be
/// admitted here, by role, and nowhere else.
fn may_take(held: &BrokerEntry, req: &RegisterBroker) -> bool {
    held.addr == req.addr
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
    /// `BAD_ARGUMENT` when the broker name or address is empty;
    /// `BROKER_NAME_TAKEN` when a live broker at another address holds the
    /// name (see [`may_take`]): the holder stays, untouched, and the refusal
    /// is logged as a warning naming both addresses.
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
        let mut brokers = self.lock();
        // A broker past its expiry that the scanner has not removed yet
        // counts as gone: it was already missing from every answer.
        let held = brokers
            .get_mut(&req.broker_name)
            .filter(|old| now.saturating_duration_since(old.last_heartbeat) <= self.expiry);
        let Some(held) = held else {
            info!(
                cluster = %req.cluster,
                broker = %req.broker_name,
                addr = %req.addr,
                topics = req.topics.len(),
                "broker registered"
            );
            let entry = BrokerEntry {
                cluster: req.cluster,
                addr: req.addr,
                topics: topic_table(req.topics),
                last_heartbeat: now,
                conn_id,
                contenders: BTreeMap::new(),
            };
            brokers.insert(req.broker_name, entry);
            return Ok(());
        };
        if !may_take(held, &req) {
            let refusal = name_taken(&req.broker_name, &held.addr, &req.addr);
            let warn_now = held
                .contenders
                .get(&req.addr)
                .is_none_or(|last| now.saturating_duration_since(*last) >= REFUSAL_WARN_EVERY);
            if warn_now {
                if held.contenders.len() >= MAX_CONTENDERS {
                    held.contenders.clear();
                }
                held.contenders.insert(req.addr.clone(), now);
            }
            let (holder_addr, holder_cluster) = (held.addr.clone(), held.cluster.clone());
            drop(brokers);
            if warn_now {
                warn!(
                    broker = %req.broker_name,
                    holder_addr = %holder_addr,
                    %holder_cluster,
                    refused_addr = %req.addr,
                    refused_cluster = %req.cluster,
                    "refused a registration of broker '{}' from {}: the live broker at {} holds that name; \
                     the refused broker needs a distinct --broker-name",
                    req.broker_name,
                    req.addr,
                    holder_addr,
                );
            } else {
                debug!(broker = %req.broker_name, holder_addr = %holder_addr, refused_addr = %req.addr, "registration refused again");
            }
            return Err(refusal);
        }
        if held.cluster != req.cluster {
            info!(
                broker = %req.broker_name,
                cluster = %req.cluster,
                addr = %req.addr,
                old_cluster = %held.cluster,
                "broker registered again with a new cluster"
            );
        } else {
            debug!(
                broker = %req.broker_name,
                topics = req.topics.len(),
                old_topics = held.topics.len(),
                "broker heartbeat"
            );
        }
        held.cluster = req.cluster;
        held.topics = topic_table(req.topics);
        held.last_heartbeat = now;
        held.conn_id = conn_id;
        Ok(())
    }

    /// Removes a broker that said goodbye over connection `conn_id`; true if
    /// it was registered. Only the broker that holds the name may remove it:
    /// the goodbye must come over the connection of its latest registration,
    /// or name its address.
    ///
    /// # Errors
    /// `BROKER_NAME_TAKEN` when the name is held by another broker (a
    /// goodbye from a broker that was refused the name, say); the holder stays.
    pub(crate) fn unregister(
        &self,
        req: &UnregisterBroker,
        conn_id: u64,
        peer: &str,
    ) -> Result<bool, WireError> {
        let mut brokers = self.lock();
        let Some(held) = brokers.get(&req.broker_name) else {
            return Ok(false);
        };
        if held.conn_id != conn_id && (req.addr.is_empty() || req.addr != held.addr) {
            let holder_addr = held.addr.clone();
            drop(brokers);
            let from = if req.addr.is_empty() {
                format!("a connection from {peer}")
            } else {
                req.addr.clone()
            };
            warn!(
                broker = %req.broker_name,
                holder_addr = %holder_addr,
                from = %from,
                "ignored an unregister of broker '{}' from {}: the broker at {} holds that name",
                req.broker_name,
                from,
                holder_addr,
            );
            return Err(WireError::new(
                ErrorCode::BrokerNameTaken,
                format!(
                    "broker '{}' is registered by the broker at {holder_addr}; an unregister from {from} does not remove it",
                    req.broker_name
                ),
            ));
        }
        let removed = brokers.remove(&req.broker_name);
        drop(brokers);
        if let Some(entry) = &removed {
            log_drop(&req.broker_name, entry, DropReason::Unregistered);
        }
        Ok(removed.is_some())
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
                    slaves: Vec::new(),
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
                role: txmq_protocol::BrokerRole::Master,
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

fn topic_table(topics: Vec<TopicConfig>) -> BTreeMap<String, TopicConfig> {
    topics.into_iter().map(|t| (t.name.clone(), t)).collect()
}

/// The refusal a broker at `refused` gets for `name`, held by the broker at `holder`.
fn name_taken(name: &str, holder: &str, refused: &str) -> WireError {
    WireError::new(
        ErrorCode::BrokerNameTaken,
        format!(
            "another broker at {holder} already registered under the name '{name}'; \
             the broker at {refused} was refused: start it with a distinct --broker-name \
             (or stop the broker at {holder}: its registration ends when its connection \
             closes or it misses heartbeats for the broker expiry)"
        ),
    )
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
            role: Default::default(),
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
                    slaves: Vec::new(),
                    broker_name: "b1".into(),
                    addr: "b1.local:10911".into(),
                    queues: 8,
                    perm: PERM_READ_WRITE
                },
                BrokerQueues {
                    slaves: Vec::new(),
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

    fn bye(name: &str, addr: &str) -> UnregisterBroker {
        UnregisterBroker {
            broker_name: name.into(),
            addr: addr.into(),
        }
    }

    #[test]
    fn unregister_drops_the_broker_and_is_idempotent() {
        let r = Registry::new(EXPIRY);
        let t0 = Instant::now();
        r.register(reg("c", "b1", vec![topic("t", 1)]), 1, t0)
            .unwrap();
        assert_eq!(r.unregister(&bye("b1", ""), 1, "peer"), Ok(true));
        assert_eq!(r.unregister(&bye("b1", ""), 1, "peer"), Ok(false));
        assert!(r.route("t", t0).is_err());
        // By address, over another connection (a broker that reconnected).
        r.register(reg("c", "b1", vec![topic("t", 1)]), 1, t0)
            .unwrap();
        assert_eq!(
            r.unregister(&bye("b1", "b1.local:10911"), 7, "peer"),
            Ok(true)
        );
        assert!(r.route("t", t0).is_err());
    }

    #[test]
    fn a_live_name_is_refused_to_another_address_and_the_holder_stays() {
        let r = Registry::new(EXPIRY);
        let t0 = Instant::now();
        r.register(reg("c", "b1", vec![topic("t", 4)]), 1, t0)
            .unwrap();
        let mut other = reg("c", "b1", vec![topic("u", 1)]);
        other.addr = "elsewhere:10911".into();
        let e = r.register(other, 2, t0).unwrap_err();
        assert_eq!(e.code, ErrorCode::BrokerNameTaken);
        assert!(e.message.contains("b1.local:10911"), "{}", e.message);
        assert!(e.message.contains("elsewhere:10911"), "{}", e.message);
        assert!(e.message.contains("--broker-name"), "{}", e.message);
        // The holder is untouched: its address, topics and connection.
        let route = r.route("t", t0).unwrap();
        assert_eq!(route.brokers[0].addr, "b1.local:10911");
        assert!(r.route("u", t0).is_err());
        assert_eq!(r.connection_closed(2), Vec::<String>::new());
        assert_eq!(route_names(&r, "t", t0), vec!["b1"]);
        // The holder's own heartbeats, even over a new connection, go on.
        r.register(reg("c", "b1", vec![topic("t", 4)]), 3, t0)
            .unwrap();
        assert_eq!(r.connection_closed(1), Vec::<String>::new());
        assert_eq!(route_names(&r, "t", t0), vec!["b1"]);
    }

    #[test]
    fn a_name_is_free_again_once_its_holder_expired_or_left() {
        let r = Registry::new(EXPIRY);
        let t0 = Instant::now();
        r.register(reg("c", "b1", vec![topic("t", 4)]), 1, t0)
            .unwrap();
        let mut other = reg("c", "b1", vec![topic("t", 2)]);
        other.addr = "elsewhere:10911".into();
        assert!(r.register(other.clone(), 2, t0 + EXPIRY).is_err());
        // Past the expiry (scanned or not), the contender takes the name.
        let late = t0 + EXPIRY + Duration::from_millis(1);
        r.register(other.clone(), 2, late).unwrap();
        assert_eq!(
            r.route("t", late).unwrap().brokers[0].addr,
            "elsewhere:10911"
        );
        // After a goodbye or a closed connection, too.
        assert_eq!(r.connection_closed(2), vec!["b1"]);
        r.register(reg("c", "b1", vec![topic("t", 4)]), 3, late)
            .unwrap();
        assert!(r.register(other.clone(), 2, late).is_err());
        assert_eq!(r.unregister(&bye("b1", ""), 3, "peer"), Ok(true));
        r.register(other, 2, late).unwrap();
    }

    #[test]
    fn an_unregister_from_another_broker_is_refused_and_the_holder_stays() {
        let r = Registry::new(EXPIRY);
        let t0 = Instant::now();
        r.register(reg("c", "b1", vec![topic("t", 1)]), 1, t0)
            .unwrap();
        let e = r
            .unregister(&bye("b1", "elsewhere:10911"), 2, "10.0.0.2:5555")
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::BrokerNameTaken);
        assert!(e.message.contains("b1.local:10911"), "{}", e.message);
        assert!(e.message.contains("elsewhere:10911"), "{}", e.message);
        // Without an address (an older broker), over a connection that did
        // not register it.
        let e = r
            .unregister(&bye("b1", ""), 2, "10.0.0.2:5555")
            .unwrap_err();
        assert!(e.message.contains("10.0.0.2:5555"), "{}", e.message);
        assert_eq!(route_names(&r, "t", t0), vec!["b1"]);
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
