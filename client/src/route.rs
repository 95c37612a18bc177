//! Topic routes: which brokers serve a topic, at which address, with how
//! many queues and which permissions.
//!
//! [`RouteCache`] asks the nameservers once per topic and keeps the answer
//! for the refresh interval; a send error invalidates it so the retry sees
//! brokers that left or joined. Fetches are single-flight per topic.
//!
//! A topic nobody has created yet has no route, but a broker auto-creates a
//! topic on its first send (unless configured not to). A producer's cache
//! therefore answers an unknown topic with a *provisional* route: queue 0
//! (the one queue an auto-created topic surely has, whatever the broker's
//! default queue count) of every registered broker, kept for a second only,
//! until the brokers have registered the real route. A send whose queue a
//! shard key picks never goes by it: one queue per broker is not the
//! topic's queues, so the key would land on another queue than its later
//! messages (and a topic whose brokers are all away for a moment, a power
//! cut say, looks unknown too).
//!
//! Masters elected by the controller carry an epoch, and a group's master
//! never goes back to an older one: nameservers are independent, and one
//! may not have heard of the latest election yet. The cache remembers the
//! highest-epoch master it has seen of each broker group (across topics),
//! and a route answer naming an older master of a group gets the newer one
//! instead (see [`keep_newest_masters`]).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use txmq_protocol::{
    BrokerInfo, BrokerQueues, BrokerRole, TopicRoute, PERM_READ, PERM_READ_WRITE, PERM_WRITE,
};

use crate::flight::{Remember, SingleFlight};
use crate::nameserver::NameserverClient;
use crate::{Error, Result};

/// The queues per broker of a provisional route: only queue 0 surely
/// exists in a topic a broker auto-creates.
pub const PROVISIONAL_QUEUES: u32 = 1;

/// How long a provisional route (see the module docs) is used.
const PROVISIONAL_TTL: Duration = Duration::from_secs(1);

/// How long a stale route is used again when the nameservers cannot be reached.
const STALE_RETRY: Duration = Duration::from_secs(1);

/// One queue of a topic on one broker.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageQueue {
    /// The broker's name.
    pub broker_name: String,
    /// The broker's address.
    pub addr: String,
    /// The queue id on that broker.
    pub queue: u32,
}

/// A topic's route with its queues listed, as the cache hands it out.
#[derive(Debug)]
pub struct RouteInfo {
    /// The route as the nameserver answered (or the provisional one).
    pub route: TopicRoute,
    /// Queues that may be sent to, by broker name then queue id: those of
    /// broker groups with a live master (a slave takes no writes).
    pub writable: Vec<MessageQueue>,
    /// Queues that may be read, by broker name then queue id.
    pub readable: Vec<MessageQueue>,
    /// Changes with every fetch; see [`RouteCache::invalidate`].
    pub generation: u64,
    /// The nameservers knew no route, and this is the provisional one (see
    /// the module docs): one queue per broker, not the topic's queues.
    pub provisional: bool,
}

impl RouteInfo {
    /// Lists the queues of `route`.
    pub fn new(route: TopicRoute, generation: u64) -> RouteInfo {
        let mut writable = queues_with(&route, PERM_WRITE);
        writable.retain(|q| !q.addr.is_empty());
        RouteInfo {
            writable,
            readable: queues_with(&route, PERM_READ),
            route,
            generation,
            provisional: false,
        }
    }
}

/// Every queue of `route` on brokers whose permission has all bits of
/// `perm`, ordered by broker name then queue id. A broker group with no
/// live master is listed too, with an empty address.
pub fn queues_with(route: &TopicRoute, perm: u8) -> Vec<MessageQueue> {
    let mut brokers: Vec<&BrokerQueues> = route
        .brokers
        .iter()
        .filter(|b| b.perm & perm == perm)
        .collect();
    brokers.sort_by(|a, b| a.broker_name.cmp(&b.broker_name));
    brokers
        .into_iter()
        .flat_map(|b| {
            (0..b.queues).map(move |queue| MessageQueue {
                broker_name: b.broker_name.clone(),
                addr: b.addr.clone(),
                queue,
            })
        })
        .collect()
}

/// The names of the broker groups of `route` that would take writes
/// (write permission) but have no live master now, only slaves.
pub fn groups_without_master(route: &TopicRoute) -> Vec<String> {
    route
        .brokers
        .iter()
        .filter(|b| b.perm & PERM_WRITE == PERM_WRITE && b.addr.is_empty())
        .map(|b| b.broker_name.clone())
        .collect()
}

/// Queues for unit tests: `n` queues on each `(broker, n)` of `spec`, in
/// the order given; broker `b` is at `b:1`.
#[cfg(test)]
pub(crate) fn test_queues(spec: &[(&str, u32)]) -> Vec<MessageQueue> {
    spec.iter()
        .flat_map(|&(b, n)| {
            (0..n).map(move |q| MessageQueue {
                broker_name: b.to_string(),
                addr: format!("{b}:1"),
                queue: q,
            })
        })
        .collect()
}

/// The route a broker will create on the first send to an unknown topic:
/// every broker group of `brokers` with a live master, at the master,
/// read-write, [`PROVISIONAL_QUEUES`] queue each (slaves create nothing).
pub fn provisional_route(topic: &str, brokers: &[BrokerInfo]) -> TopicRoute {
    // Of two masters of a group (a nameserver between two elections), the
    // one with the higher epoch.
    let mut by_name: BTreeMap<&str, (&str, u64)> = BTreeMap::new();
    for b in brokers.iter().filter(|b| b.role == BrokerRole::Master) {
        let entry = by_name
            .entry(b.broker_name.as_str())
            .or_insert((b.addr.as_str(), b.epoch));
        if b.epoch > entry.1 {
            *entry = (b.addr.as_str(), b.epoch);
        }
    }
    TopicRoute {
        topic: topic.to_string(),
        brokers: by_name
            .into_iter()
            .map(|(name, (addr, epoch))| BrokerQueues {
                epoch,
                broker_name: name.to_string(),
                addr: addr.to_string(),
                slaves: Vec::new(),
                queues: PROVISIONAL_QUEUES,
                perm: PERM_READ_WRITE,
            })
            .collect(),
    }
}

/// A cache of topic routes. Cloning is cheap and shares the cache.
#[derive(Debug, Clone)]
pub struct RouteCache {
    inner: Arc<CacheInner>,
}

/// One fetch of a topic's route at a time; it keeps when and how the
/// last fetch that reached no nameserver failed.
type Flight = SingleFlight<txmq_remoting::Error>;

#[derive(Debug)]
struct CacheInner {
    nameservers: NameserverClient,
    refresh_interval: Duration,
    provisional: bool,
    entries: DashMap<String, Entry, foldhash::fast::RandomState>,
    /// The highest-epoch master seen of each broker group, by group name.
    masters: DashMap<String, KnownMaster>,
    /// One fetch of a topic at a time, by topic.
    flights: DashMap<String, Arc<Flight>>,
    next_generation: AtomicU64,
}

/// A broker group's master as the newest route answer named it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownMaster {
    /// Its controller epoch (0: not run by a controller).
    pub epoch: u64,
    /// Its address.
    pub addr: String,
}

/// A route fetch whose task panicked.
fn fetch_panicked(e: tokio::task::JoinError) -> Error {
    Error::Protocol(format!("the route fetch failed: {e}"))
}

/// Makes `route` name no master older than one seen before: for each broker
/// group whose entry names a master (a non-empty address), a master with a
/// lower epoch than the one in `known` is replaced by the known one (and
/// that address taken out of the slaves); a higher epoch is remembered. An
/// entry with no master is left alone: a dead master is not put back.
pub fn keep_newest_masters(route: &mut TopicRoute, known: &DashMap<String, KnownMaster>) {
    for b in route.brokers.iter_mut().filter(|b| !b.addr.is_empty()) {
        let mut seen = known
            .entry(b.broker_name.clone())
            .or_insert_with(|| KnownMaster {
                epoch: b.epoch,
                addr: b.addr.clone(),
            });
        if b.epoch > seen.epoch {
            *seen = KnownMaster {
                epoch: b.epoch,
                addr: b.addr.clone(),
            };
        } else if b.epoch < seen.epoch {
            tracing::debug!(
                broker = %b.broker_name,
                answered = %b.addr,
                answered_epoch = b.epoch,
                kept = %seen.addr,
                kept_epoch = seen.epoch,
                "a nameserver named an older master; keeping the newer one"
            );
            b.slaves.retain(|s| *s != seen.addr);
            b.addr = seen.addr.clone();
            b.epoch = seen.epoch;
        }
    }
}

#[derive(Debug)]
struct Entry {
    info: Arc<RouteInfo>,
    expires: Instant,
}

impl RouteCache {
    /// A cache that keeps routes for `refresh_interval`. With
    /// `provisional`, an unknown topic gets a provisional route (for sending).
    pub fn new(
        nameservers: NameserverClient,
        refresh_interval: Duration,
        provisional: bool,
    ) -> RouteCache {
        RouteCache {
            inner: Arc::new(CacheInner {
                nameservers,
                refresh_interval,
                provisional,
                entries: DashMap::default(),
                masters: DashMap::new(),
                flights: DashMap::new(),
                next_generation: AtomicU64::new(1),
            }),
        }
    }

    /// The route of `topic`, from the cache while it is fresh.
    ///
    /// When the nameservers cannot be reached, an expired route is used for
    /// another second rather than failing.
    ///
    /// # Errors
    /// [`Error::NoRoute`], or the failure to reach any nameserver when
    /// nothing is cached.
    pub async fn get(&self, topic: &str) -> Result<Arc<RouteInfo>> {
        if let Some(info) = self.fresh(topic) {
            return Ok(info);
        }
        // Boxed: a fetch's future is large (1.6 KB), and a caller's future
        // holds the place of every future it may await, whether or not it
        // runs: every send's future held it, and a send's future is copied
        // whole as it starts (2,960 bytes a send with it, 2,472 without it
        // and the other slow paths a send awaits).
        Box::pin(self.fetch_unless_fresh(topic)).await
    }

    /// [`RouteCache::get`] once the cache had no fresh route: one caller
    /// per topic fetches, the others wait and take what it got.
    async fn fetch_unless_fresh(&self, topic: &str) -> Result<Arc<RouteInfo>> {
        let waiting_since = Instant::now();
        let flight = self.flight(topic);
        let (cache, topic) = (self.clone(), topic.to_string());
        let fetched = flight.run(waiting_since, move |failed| async move {
            if let Some(info) = cache.fresh(&topic) {
                return (Ok(info), Remember::Nothing);
            }
            // A fetch that failed while this caller waited is its failure
            // too: with a nameserver that does not answer, each waiter
            // trying again in turn made the last of many sends wait one
            // timeout per caller before it.
            if let Some(e) = failed {
                return (Err(Error::Remoting(e)), Remember::Nothing);
            }
            match cache.fetch(&topic).await {
                Ok(info) => (Ok(info), Remember::Success),
                // A nameserver answered.
                Err(e @ (Error::NoRoute { .. } | Error::NoMaster { .. })) => {
                    (Err(e), Remember::Success)
                }
                Err(e) => match cache.inner.entries.get_mut(&topic) {
                    Some(mut stale) => {
                        tracing::warn!(%topic, error = %crate::error::chain(&e), "cannot refresh route; using the cached one");
                        stale.expires = Instant::now() + STALE_RETRY;
                        (Ok(stale.info.clone()), Remember::Nothing)
                    }
                    None => {
                        let remember = match &e {
                            Error::Remoting(r) => Remember::Failure(r.clone()),
                            _ => Remember::Nothing,
                        };
                        (Err(e), remember)
                    }
                },
            }
        });
        fetched.await.unwrap_or_else(|e| Err(fetch_panicked(e)))
    }

    /// Fetches the route of `topic` now, whether or not one is cached.
    ///
    /// # Errors
    /// [`Error::NoRoute`], or the failure to reach any nameserver.
    pub async fn refresh(&self, topic: &str) -> Result<Arc<RouteInfo>> {
        let flight = self.flight(topic);
        let (cache, topic) = (self.clone(), topic.to_string());
        let fetched = flight.run(Instant::now(), move |_| async move {
            (cache.fetch(&topic).await, Remember::Nothing)
        });
        fetched.await.unwrap_or_else(|e| Err(fetch_panicked(e)))
    }

    /// Marks the route of `topic` stale if it is still the one of
    /// `generation`, so the next [`RouteCache::get`] fetches it again. Many
    /// sends failing on one route cause one fetch, not one each.
    pub fn invalidate(&self, topic: &str, generation: u64) {
        if let Some(mut entry) = self.inner.entries.get_mut(topic) {
            if entry.info.generation == generation {
                entry.expires = Instant::now();
            }
        }
    }

    fn fresh(&self, topic: &str) -> Option<Arc<RouteInfo>> {
        let entry = self.inner.entries.get(topic)?;
        (entry.expires > Instant::now()).then(|| entry.info.clone())
    }

    fn flight(&self, topic: &str) -> Arc<Flight> {
        if let Some(flight) = self.inner.flights.get(topic) {
            return flight.clone();
        }
        self.inner
            .flights
            .entry(topic.to_string())
            .or_default()
            .clone()
    }

    async fn fetch(&self, topic: &str) -> Result<Arc<RouteInfo>> {
        let ns = &self.inner.nameservers;
        let (mut route, provisional) = match ns.route(topic).await {
            Ok(route) => (route, false),
            Err(Error::NoRoute { .. }) if self.inner.provisional => {
                let brokers = ns.cluster().await?;
                if !brokers.iter().any(|b| b.role == BrokerRole::Master) {
                    self.inner.entries.remove(topic);
                    let mut slaves_only: Vec<String> =
                        brokers.into_iter().map(|b| b.broker_name).collect();
                    slaves_only.sort();
                    slaves_only.dedup();
                    if !slaves_only.is_empty() {
                        return Err(Error::NoMaster {
                            topic: topic.to_string(),
                            brokers: slaves_only,
                        });
                    }
                    return Err(Error::NoRoute {
                        topic: topic.to_string(),
                    });
                }
                tracing::debug!(%topic, "no route yet; sending to any broker, which auto-creates the topic");
                (provisional_route(topic, &brokers), true)
            }
            Err(e @ Error::NoRoute { .. }) => {
                self.inner.entries.remove(topic);
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        keep_newest_masters(&mut route, &self.inner.masters);
        let generation = self.inner.next_generation.fetch_add(1, Ordering::Relaxed);
        let info = Arc::new(RouteInfo {
            provisional,
            ..RouteInfo::new(route, generation)
        });
        // A group without a live master is between two masters (a
        // failover): its next master registers within moments, so such a
        // route is asked for again soon rather than kept for the whole
        // refresh interval (a send finds no queue there and fails at once,
        // with no failure to invalidate the route).
        let ttl = if provisional || !groups_without_master(&info.route).is_empty() {
            PROVISIONAL_TTL.min(self.inner.refresh_interval)
        } else {
            self.inner.refresh_interval
        };
        self.inner.entries.insert(
            topic.to_string(),
            Entry {
                info: info.clone(),
                expires: Instant::now() + ttl,
            },
        );
        Ok(info)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use txmq_protocol::PERM_READ;

    fn bq(name: &str, queues: u32, perm: u8) -> BrokerQueues {
        BrokerQueues {
            epoch: Default::default(),
            slaves: Vec::new(),
            broker_name: name.into(),
            addr: format!("{name}:10911"),
            queues,
            perm,
        }
    }

    #[test]
    fn queues_are_listed_per_permission_in_broker_then_queue_order() {
        let route = TopicRoute {
            topic: "t".into(),
            brokers: vec![
                bq("b", 2, PERM_READ_WRITE),
                bq("a", 1, PERM_READ_WRITE),
                bq("c", 2, PERM_READ),
            ],
        };
        let info = RouteInfo::new(route, 1);
        let w: Vec<(&str, u32)> = info
            .writable
            .iter()
            .map(|q| (q.broker_name.as_str(), q.queue))
            .collect();
        assert_eq!(w, [("a", 0), ("b", 0), ("b", 1)]);
        let r: Vec<(&str, u32)> = info
            .readable
            .iter()
            .map(|q| (q.broker_name.as_str(), q.queue))
            .collect();
        assert_eq!(r, [("a", 0), ("b", 0), ("b", 1), ("c", 0), ("c", 1)]);
        assert_eq!(info.writable[1].addr, "b:10911");
    }

    #[test]
    fn a_group_without_a_live_master_is_readable_but_not_writable() {
        let mut masterless = bq("a", 2, PERM_READ_WRITE);
        masterless.addr = String::new();
        masterless.slaves = vec!["a-slave:10921".into()];
        let route = TopicRoute {
            topic: "t".into(),
            brokers: vec![masterless, bq("b", 1, PERM_READ_WRITE)],
        };
        let info = RouteInfo::new(route, 1);
        let w: Vec<&str> = info
            .writable
            .iter()
            .map(|q| q.broker_name.as_str())
            .collect();
        assert_eq!(w, ["b"]);
        assert_eq!(info.readable.len(), 3);
        assert_eq!(groups_without_master(&info.route), ["a"]);
    }

    fn elected(name: &str, addr: &str, epoch: u64, slaves: &[&str]) -> BrokerQueues {
        BrokerQueues {
            epoch,
            addr: addr.into(),
            slaves: slaves.iter().map(|s| s.to_string()).collect(),
            ..bq(name, 2, PERM_READ_WRITE)
        }
    }

    fn masters_of(route: &TopicRoute) -> Vec<(&str, &str, u64, Vec<&str>)> {
        route
            .brokers
            .iter()
            .map(|b| {
                (
                    b.broker_name.as_str(),
                    b.addr.as_str(),
                    b.epoch,
                    b.slaves.iter().map(String::as_str).collect(),
                )
            })
            .collect()
    }

    #[test]
    fn a_route_never_goes_back_to_an_older_master_of_a_group() {
        let known = DashMap::new();
        let answer = |brokers| TopicRoute {
            topic: "t".into(),
            brokers,
        };
        let mut first = answer(vec![elected("a", "a2:1", 2, &["a1:1"])]);
        keep_newest_masters(&mut first, &known);
        assert_eq!(masters_of(&first), [("a", "a2:1", 2, vec!["a1:1"])]);

        // A nameserver that missed the election still names a1 (epoch 1),
        // listing a2 as its slave: a2 stays the master, listed once.
        let mut lagging = answer(vec![
            elected("a", "a1:1", 1, &["a2:1", "a3:1"]),
            elected("b", "b:1", 0, &[]),
        ]);
        keep_newest_masters(&mut lagging, &known);
        assert_eq!(
            masters_of(&lagging),
            [("a", "a2:1", 2, vec!["a3:1"]), ("b", "b:1", 0, vec![])]
        );

        // A newer election is taken, and remembered for other topics too.
        let mut newer = answer(vec![elected("a", "a3:1", 3, &["a2:1"])]);
        keep_newest_masters(&mut newer, &known);
        assert_eq!(masters_of(&newer), [("a", "a3:1", 3, vec!["a2:1"])]);
        let mut other_topic = answer(vec![elected("a", "a2:1", 2, &[])]);
        keep_newest_masters(&mut other_topic, &known);
        assert_eq!(masters_of(&other_topic), [("a", "a3:1", 3, vec![])]);

        // No master live: the group stays masterless (reads go to slaves).
        let mut masterless = answer(vec![elected("a", "", 0, &["a2:1"])]);
        keep_newest_masters(&mut masterless, &known);
        assert_eq!(masters_of(&masterless), [("a", "", 0, vec!["a2:1"])]);

        // Brokers not run by a controller (epoch 0 everywhere) move freely.
        let mut plain = answer(vec![elected("b", "b2:1", 0, &[])]);
        keep_newest_masters(&mut plain, &known);
        assert_eq!(masters_of(&plain), [("b", "b2:1", 0, vec![])]);
    }

    #[test]
    fn provisional_route_covers_every_broker_once() {
        let broker = |name: &str| BrokerInfo {
            epoch: Default::default(),
            role: Default::default(),
            cluster: "c".into(),
            broker_name: name.into(),
            addr: format!("{name}:1"),
            last_heartbeat_ms_ago: 0,
            topic_count: 0,
        };
        let mut slave = broker("x");
        slave.addr = "x-slave:1".into();
        slave.role = BrokerRole::Slave;
        let route = provisional_route(
            "new",
            &[broker("y"), slave.clone(), broker("x"), broker("y"), slave],
        );
        // At the master: a slave creates nothing.
        assert_eq!(route.brokers[0].addr, "x:1");
        assert_eq!(route.topic, "new");
        let names: Vec<&str> = route
            .brokers
            .iter()
            .map(|b| b.broker_name.as_str())
            .collect();
        assert_eq!(names, ["x", "y"]);
        assert!(route
            .brokers
            .iter()
            .all(|b| b.queues == PROVISIONAL_QUEUES && b.perm == PERM_READ_WRITE));
    }
}
