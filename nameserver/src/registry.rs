//! The route table: which broker groups are alive and which topics each serves.
//!
//! A broker name is a broker GROUP: at most one live master and any number
//! of live slaves, each known by its address. Every broker of a group has
//! its own entry: its own topic table (which every registration replaces,
//! so a heartbeat also carries the broker's current topic table), its own
//! heartbeat time and the connection it registered over. Who may join a
//! name is decided in one place, [`may_take`]: a second master at another
//! address is refused while the first is live, because clients send writes
//! to a group's master and two masters taking turns would split the log;
//! slaves are admitted. Masters elected by the controller carry an epoch:
//! a master with a higher epoch than the live one takes its place at once
//! (the old one was fenced and leaves the routes until it registers again,
//! as a slave), and one with a lower epoch is refused. A broker leaves the table when it unregisters (over
//! the connection that registered it), when the connection
//! it registered over closes, or when it has been silent for longer than
//! the expiry; each of these removes that one broker, never its group.
//! Queries also skip brokers past their expiry, so an answer never names a
//! broker the scanner simply has not reached yet.
//!
//! A route names a group once: its live master's address and epoch (empty
//! and 0 when the master is gone, so clients read from the slaves) and its
//! live slaves.
//!
//! Time is passed in (`now`) rather than read inside, which keeps every
//! method a pure function of its inputs and easy to test.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;
use tracing::{debug, info, warn};
use txmq_protocol::{
    BrokerInfo, BrokerQueues, BrokerRole, ClusterInfo, ErrorCode, RegisterBroker, TopicConfig,
    TopicList, TopicOnBroker, TopicRoute, UnregisterBroker, WireError,
};

/// A refused contender for a name is logged as a warning at most this often
/// (it retries about every second); in between, at debug level.
const REFUSAL_WARN_EVERY: Duration = Duration::from_secs(60);

/// At most this many refused addresses are remembered per name (for the
/// warning's rate limit); past that, the memory starts over.
const MAX_CONTENDERS: usize = 64;

/// One registered broker (a master or a slave of its group).
#[derive(Debug)]
struct BrokerEntry {
    cluster: String,
    addr: String,
    role: BrokerRole,
    /// A master's controller epoch (0: not run by a controller).
    epoch: u64,
    topics: BTreeMap<String, TopicConfig>,
    last_heartbeat: Instant,
    /// The connection the latest registration came over.
    conn_id: u64,
}

/// The brokers registered under one broker name. Never empty in the table:
/// a group whose last broker leaves is removed.
#[derive(Debug, Default)]
struct Group {
    /// The master, live or past its expiry but not yet scanned.
    master: Option<BrokerEntry>,
    /// The slaves by address, live or past their expiry but not yet scanned.
    slaves: BTreeMap<String, BrokerEntry>,
    /// Addresses refused the master's place, with when that was last logged
    /// as a warning.
    contenders: BTreeMap<String, Instant>,
}

impl Group {
    /// Every broker of the group: the master first, then the slaves by address.
    fn members(&self) -> impl Iterator<Item = &BrokerEntry> {
        self.master.iter().chain(self.slaves.values())
    }

    fn is_empty(&self) -> bool {
        self.master.is_none() && self.slaves.is_empty()
    }

    /// Removes the broker at `addr`, whichever its role.
    fn take(&mut self, addr: &str) -> Option<BrokerEntry> {
        if self.master.as_ref().is_some_and(|m| m.addr == addr) {
            return self.master.take();
        }
        self.slaves.remove(addr)
    }
}

/// Whether a registration `req` may join the group whose live master (if
/// any) is `master`: the one place that decides who may share a broker name.
///
/// A master may when no live master holds the name, or when it is that
/// master (the same address is the same broker: a heartbeat, a reconnect,
/// a restart) at an epoch not below the holder's, or when the controller
/// elected it later than the holder (a higher epoch): the holder was fenced
/// and is only slow to learn it. A master at a lower epoch than the holder
/// is a fenced one and is refused, even at the holder's address (a stale
/// heartbeat sent before it demoted); with equal epochs (0 for brokers not
/// run by a controller) a second master at another address is refused. A
/// slave may, at any address and epoch: at the master's own address it is
/// that broker come back as a slave (two brokers cannot listen at one
/// address), and it replaces the master's entry.
fn may_take(master: Option<&BrokerEntry>, req: &RegisterBroker) -> bool {
    match req.role {
        BrokerRole::Master => master
            .is_none_or(|m| req.epoch > m.epoch || (req.epoch == m.epoch && m.addr == req.addr)),
        BrokerRole::Slave => true,
    }
}

/// Why a broker left the table (for the log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum DropReason {
    /// A master elected later (a higher epoch) took its place.
    Superseded {
        /// The new master's address.
        by: String,
        /// The new master's epoch.
        epoch: u64,
    },
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
            DropReason::Superseded { by, epoch } => {
                write!(f, "the master at {by} was elected after it (epoch {epoch})")
            }
            DropReason::Unregistered => f.write_str("it unregistered"),
        }
    }
}

/// What a registration did, for the log written once the lock is released.
enum Registered {
    /// Refused: a live master at another address (or a higher epoch) holds the name.
    Refused {
        holder_addr: String,
        holder_cluster: String,
        holder_epoch: u64,
        warn_now: bool,
    },
    /// Admitted.
    Admitted {
        /// The broker's previous entry at this address (role, cluster), if any.
        before: Option<(BrokerRole, String)>,
        old_topics: usize,
        /// A master past its expiry (not yet scanned) that this master replaced.
        replaced: Option<BrokerEntry>,
        /// A live master at a lower epoch that this master replaced: it is
        /// out of the routes until it registers again (as a slave, once it
        /// learns it was fenced).
        superseded: Option<Box<BrokerEntry>>,
        /// Another live broker of the group in a different cluster (addr, role, cluster).
        other_cluster: Option<(String, BrokerRole, String)>,
    },
}

/// The shared route table. All methods take the lock briefly and never await.
#[derive(Debug)]
pub(crate) struct Registry {
    expiry: Duration,
    groups: Mutex<BTreeMap<String, Group>>,
}

impl Registry {
    /// An empty table whose brokers expire after `expiry` without a heartbeat.
    pub(crate) fn new(expiry: Duration) -> Registry {
        Registry {
            expiry,
            groups: Mutex::new(BTreeMap::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Group>> {
        // Every update below replaces or removes whole entries, so a panic
        // elsewhere cannot leave the map half-updated: recover from poisoning.
        self.groups.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn is_live(&self, entry: &BrokerEntry, now: Instant) -> bool {
        now.saturating_duration_since(entry.last_heartbeat) <= self.expiry
    }

    fn live_master<'a>(&self, group: &'a Group, now: Instant) -> Option<&'a BrokerEntry> {
        group.master.as_ref().filter(|m| self.is_live(m, now))
    }

    fn live_slaves<'a>(
        &self,
        group: &'a Group,
        now: Instant,
    ) -> impl Iterator<Item = &'a BrokerEntry> + use<'a, '_> {
        group.slaves.values().filter(move |s| self.is_live(s, now))
    }

    /// The group's configuration of `topic`: its live master's when the
    /// master has it, else that of the first live slave (by address) that
    /// has it; `None` when no live broker of the group serves it.
    fn serving<'a>(&self, group: &'a Group, topic: &str, now: Instant) -> Option<&'a TopicConfig> {
        self.live_master(group, now)
            .and_then(|m| m.topics.get(topic))
            .or_else(|| {
                self.live_slaves(group, now)
                    .find_map(|s| s.topics.get(topic))
            })
    }

    /// Registers a broker or records its heartbeat, replacing its topic
    /// table. A broker already registered at the same address under the
    /// name is the same broker: its entry is replaced, with its new role.
    ///
    /// # Errors
    /// `BAD_ARGUMENT` when the broker name or address is empty;
    /// `BROKER_NAME_TAKEN` when it registers as master and a live master at
    /// another address and the same epoch holds the name, or a live master
    /// with a higher epoch does (see [`may_take`]): the holder stays,
    /// untouched, and the refusal is logged naming both addresses (a
    /// warning; for a fenced master's lower epoch, at info level).
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
        let mut req = req;
        // Built before the lock is taken, and moved in, not copied.
        let topic_count = req.topics.len();
        let table = topic_table(std::mem::take(&mut req.topics));
        let outcome = self.admit(&req, table, conn_id, now);
        let name = &req.broker_name;
        let role = req.role.name();
        match outcome {
            Registered::Refused {
                holder_addr,
                holder_cluster,
                holder_epoch,
                warn_now,
            } => {
                if req.epoch < holder_epoch {
                    // A fenced master, still heartbeating until it learns of
                    // the newer election: routine during a failover.
                    if warn_now {
                        info!(
                            broker = %name,
                            holder_addr = %holder_addr,
                            holder_epoch,
                            refused_addr = %req.addr,
                            refused_epoch = req.epoch,
                            "refused a registration of broker '{}' as master from {} at epoch {}: the master at {} has epoch {}",
                            name,
                            req.addr,
                            req.epoch,
                            holder_addr,
                            holder_epoch,
                        );
                    }
                    return Err(stale_epoch(
                        name,
                        &holder_addr,
                        holder_epoch,
                        &req.addr,
                        req.epoch,
                    ));
                }
                if warn_now {
                    warn!(
                        broker = %name,
                        holder_addr = %holder_addr,
                        %holder_cluster,
                        refused_addr = %req.addr,
                        refused_cluster = %req.cluster,
                        "refused a registration of broker '{}' as master from {}: the live master at {} holds that name; \
                         the refused broker needs a distinct --broker-name (or --role slave to join its group)",
                        name,
                        req.addr,
                        holder_addr,
                    );
                } else {
                    debug!(broker = %name, holder_addr = %holder_addr, refused_addr = %req.addr, "registration refused again");
                }
                Err(name_taken(name, &holder_addr, &req.addr))
            }
            Registered::Admitted {
                before,
                old_topics,
                replaced,
                superseded,
                other_cluster,
            } => {
                if let Some(old) = &superseded {
                    log_drop(
                        name,
                        old,
                        DropReason::Superseded {
                            by: req.addr.clone(),
                            epoch: req.epoch,
                        },
                    );
                }
                if let Some(stale) = &replaced {
                    log_drop(
                        name,
                        stale,
                        DropReason::Expired {
                            silent_for: now.saturating_duration_since(stale.last_heartbeat),
                        },
                    );
                }
                match &before {
                    None => info!(
                        cluster = %req.cluster,
                        broker = %name,
                        addr = %req.addr,
                        role,
                        topics = topic_count,
                        "broker registered"
                    ),
                    Some((old_role, _)) if *old_role != req.role => info!(
                        cluster = %req.cluster,
                        broker = %name,
                        addr = %req.addr,
                        role,
                        old_role = old_role.name(),
                        topics = topic_count,
                        "broker registered with a new role"
                    ),
                    Some((_, old_cluster)) if *old_cluster != req.cluster => info!(
                        broker = %name,
                        cluster = %req.cluster,
                        addr = %req.addr,
                        role,
                        %old_cluster,
                        "broker registered again with a new cluster"
                    ),
                    Some(_) => debug!(
                        broker = %name,
                        addr = %req.addr,
                        role,
                        topics = topic_count,
                        old_topics,
                        "broker heartbeat"
                    ),
                }
                if let Some((other_addr, other_role, other_cluster)) = other_cluster {
                    info!(
                        broker = %name,
                        addr = %req.addr,
                        role,
                        cluster = %req.cluster,
                        %other_addr,
                        other_role = other_role.name(),
                        %other_cluster,
                        "the brokers of group '{}' name different clusters: {} {} in '{}', {} {} in '{}'",
                        name,
                        role,
                        req.addr,
                        req.cluster,
                        other_role.name(),
                        other_addr,
                        other_cluster,
                    );
                }
                Ok(())
            }
        }
    }

    /// The update of [`register`](Registry::register), under the lock; logs nothing.
    /// `req.topics` has been moved into `topics`.
    fn admit(
        &self,
        req: &RegisterBroker,
        topics: BTreeMap<String, TopicConfig>,
        conn_id: u64,
        now: Instant,
    ) -> Registered {
        let mut groups = self.lock();
        let group = groups.entry(req.broker_name.clone()).or_default();
        // A broker past its expiry that the scanner has not removed yet
        // counts as gone: it was already missing from every answer.
        let master = self.live_master(group, now);
        if !may_take(master, req) {
            let (holder_addr, holder_cluster, holder_epoch) = master
                .map(|m| (m.addr.clone(), m.cluster.clone(), m.epoch))
                .unwrap_or_default();
            let warn_now = group
                .contenders
                .get(&req.addr)
                .is_none_or(|last| now.saturating_duration_since(*last) >= REFUSAL_WARN_EVERY);
            if warn_now {
                if group.contenders.len() >= MAX_CONTENDERS {
                    group.contenders.clear();
                }
                group.contenders.insert(req.addr.clone(), now);
            }
            return Registered::Refused {
                holder_addr,
                holder_cluster,
                holder_epoch,
                warn_now,
            };
        }
        // A master elected after the live one: the old one leaves the
        // routes at once (not listed as a slave: it is not replicating from
        // the new master yet) until it registers again.
        let superseded = match (req.role, master) {
            (BrokerRole::Master, Some(m)) if m.addr != req.addr && req.epoch > m.epoch => {
                group.master.take().map(Box::new)
            }
            _ => None,
        };
        let old = group.take(&req.addr);
        let changed = old
            .as_ref()
            .is_none_or(|o| o.role != req.role || o.cluster != req.cluster);
        // Said once, when the broker joins or changes, not at every heartbeat.
        let other_cluster = if changed {
            group
                .members()
                .filter(|b| self.is_live(b, now) && b.cluster != req.cluster)
                .map(|b| (b.addr.clone(), b.role, b.cluster.clone()))
                .next()
        } else {
            None
        };
        let entry = BrokerEntry {
            cluster: req.cluster.clone(),
            addr: req.addr.clone(),
            role: req.role,
            epoch: req.epoch,
            topics,
            last_heartbeat: now,
            conn_id,
        };
        let replaced = match req.role {
            // may_take admitted it, so a master still here is past its expiry.
            BrokerRole::Master => group.master.replace(entry),
            BrokerRole::Slave => {
                group.slaves.insert(req.addr.clone(), entry);
                None
            }
        };
        Registered::Admitted {
            old_topics: old.as_ref().map_or(0, |o| o.topics.len()),
            before: old.map(|o| (o.role, o.cluster)),
            replaced,
            superseded,
            other_cluster,
        }
    }

    /// Removes a broker that said goodbye over connection `conn_id`; true if
    /// it was registered. Only brokers whose latest registration came over
    /// this connection are removed, never the rest of their group: the one
    /// at the goodbye's address, or all of them when it names none (an
    /// older broker). An address alone proves nothing: anyone can send it.
    ///
    /// # Errors
    /// `BROKER_NAME_TAKEN` when the name is held by brokers of other
    /// connections only (a goodbye from a broker that was refused the
    /// name, or from a stranger); they stay.
    pub(crate) fn unregister(
        &self,
        req: &UnregisterBroker,
        conn_id: u64,
        peer: &str,
    ) -> Result<bool, WireError> {
        let mut groups = self.lock();
        let Some(group) = groups.get_mut(&req.broker_name) else {
            return Ok(false);
        };
        let leaving: Vec<String> = group
            .members()
            .filter(|b| b.conn_id == conn_id && (req.addr.is_empty() || b.addr == req.addr))
            .map(|b| b.addr.clone())
            .collect();
        if leaving.is_empty() {
            let holders = holders(group);
            drop(groups);
            let from = if req.addr.is_empty() {
                format!("a connection from {peer}")
            } else {
                req.addr.clone()
            };
            warn!(
                broker = %req.broker_name,
                holders = %holders,
                from = %from,
                "ignored an unregister of broker '{}' from {}: it is registered by {}",
                req.broker_name,
                from,
                holders,
            );
            return Err(WireError::new(
                ErrorCode::BrokerNameTaken,
                format!(
                    "broker '{}' is registered by {holders}; an unregister from {from} does not remove it",
                    req.broker_name
                ),
            ));
        }
        let removed: Vec<BrokerEntry> = leaving.iter().filter_map(|a| group.take(a)).collect();
        if group.is_empty() {
            groups.remove(&req.broker_name);
        }
        drop(groups);
        for entry in &removed {
            log_drop(&req.broker_name, entry, DropReason::Unregistered);
        }
        Ok(!removed.is_empty())
    }

    /// Removes every broker whose latest registration came over connection
    /// `conn_id`; returns their names, one per broker. A broker that has
    /// since registered over another connection stays, and so do the other
    /// brokers of its group.
    pub(crate) fn connection_closed(&self, conn_id: u64) -> Vec<String> {
        self.remove_where(|_, entry| {
            (entry.conn_id == conn_id).then_some(DropReason::ConnectionClosed)
        })
    }

    /// Removes every broker silent for longer than the expiry; returns their
    /// names, one per broker.
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
        let mut removed: Vec<(String, BrokerEntry, DropReason)> = Vec::new();
        {
            let mut groups = self.lock();
            groups.retain(|name, group| {
                let doomed: Vec<(String, DropReason)> = group
                    .members()
                    .filter_map(|b| why(self, b).map(|reason| (b.addr.clone(), reason)))
                    .collect();
                for (addr, reason) in doomed {
                    if let Some(entry) = group.take(&addr) {
                        removed.push((name.clone(), entry, reason));
                    }
                }
                !group.is_empty()
            });
        }
        // Log after the lock is released.
        removed
            .into_iter()
            .map(|(name, entry, reason)| {
                log_drop(&name, &entry, reason);
                name
            })
            .collect()
    }

    /// The route of `topic`: one entry per broker group (name) a live broker
    /// of which serves it, sorted by broker name. An entry's `addr` is the
    /// live master's (empty without one), `slaves` the live slaves'
    /// addresses, sorted; queues and permission come from the master's
    /// topic table, or else from the first live slave (by address) that has
    /// the topic.
    ///
    /// # Errors
    /// `NO_ROUTE` when no live broker serves the topic.
    pub(crate) fn route(&self, topic: &str, now: Instant) -> Result<TopicRoute, WireError> {
        let brokers: Vec<BrokerQueues> = self
            .lock()
            .iter()
            .filter_map(|(name, group)| {
                let config = self.serving(group, topic, now)?;
                let master = self.live_master(group, now);
                Some(BrokerQueues {
                    epoch: master.map_or(0, |m| m.epoch),
                    broker_name: name.clone(),
                    addr: master.map(|m| m.addr.clone()).unwrap_or_default(),
                    // The map is keyed by address, so these come sorted.
                    slaves: self
                        .live_slaves(group, now)
                        .map(|s| s.addr.clone())
                        .collect(),
                    queues: config.queues,
                    perm: config.perm,
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

    /// Every live broker, masters and slaves, sorted by cluster, broker
    /// name, then the master first and the slaves by address.
    pub(crate) fn cluster(&self, now: Instant) -> ClusterInfo {
        let mut brokers: Vec<BrokerInfo> = self
            .lock()
            .iter()
            .flat_map(|(name, group)| {
                group
                    .members()
                    .filter(move |b| self.is_live(b, now))
                    .map(move |b| BrokerInfo {
                        // A master's own; a slave's is not known here.
                        epoch: match b.role {
                            BrokerRole::Master => b.epoch,
                            BrokerRole::Slave => 0,
                        },
                        cluster: b.cluster.clone(),
                        broker_name: name.clone(),
                        addr: b.addr.clone(),
                        last_heartbeat_ms_ago: u64::try_from(
                            now.saturating_duration_since(b.last_heartbeat).as_millis(),
                        )
                        .unwrap_or(u64::MAX),
                        topic_count: u32::try_from(b.topics.len()).unwrap_or(u32::MAX),
                        role: b.role,
                    })
            })
            .collect();
        // Stable: within a (cluster, name), `members` already put the master
        // first and the slaves in address order.
        brokers.sort_by(|a, b| (&a.cluster, &a.broker_name).cmp(&(&b.cluster, &b.broker_name)));
        ClusterInfo { brokers }
    }

    /// Every (topic, broker group) pair a live broker serves, once per
    /// group (with the configuration a route gives), sorted by topic then
    /// broker name.
    pub(crate) fn topics(&self, now: Instant) -> TopicList {
        let mut topics: Vec<TopicOnBroker> = Vec::new();
        for (name, group) in self.lock().iter() {
            let names: BTreeSet<&String> = group
                .members()
                .filter(|b| self.is_live(b, now))
                .flat_map(|b| b.topics.keys())
                .collect();
            topics.extend(names.into_iter().filter_map(|topic| {
                self.serving(group, topic, now).map(|config| TopicOnBroker {
                    broker_name: name.clone(),
                    config: config.clone(),
                })
            }));
        }
        topics.sort_by(|a, b| {
            (&a.config.name, &a.broker_name).cmp(&(&b.config.name, &b.broker_name))
        });
        TopicList { topics }
    }
}

fn topic_table(topics: Vec<TopicConfig>) -> BTreeMap<String, TopicConfig> {
    topics.into_iter().map(|t| (t.name.clone(), t)).collect()
}

/// "the broker at A (master)" or "the brokers at A (master), B (slave)":
/// who holds a name, for a refused goodbye.
fn holders(group: &Group) -> String {
    let list: Vec<String> = group
        .members()
        .map(|b| format!("{} ({})", b.addr, b.role.name()))
        .collect();
    let plural = if list.len() == 1 { "" } else { "s" };
    format!("the broker{plural} at {}", list.join(", "))
}

/// The refusal a master at `refused` gets for `name`, held by the live master at `holder`.
fn name_taken(name: &str, holder: &str, refused: &str) -> WireError {
    WireError::new(
        ErrorCode::BrokerNameTaken,
        format!(
            "another master broker at {holder} already registered under the name '{name}'; \
             the broker at {refused} was refused as master: start it with a distinct --broker-name, \
             or with --role slave to join that group (or stop the broker at {holder}: its \
             registration ends when its connection closes or it misses heartbeats for the \
             broker expiry)"
        ),
    )
}

/// The refusal a master at `refused` with epoch `refused_epoch` gets for
/// `name`, whose live master at `holder` has the higher epoch `holder_epoch`.
fn stale_epoch(
    name: &str,
    holder: &str,
    holder_epoch: u64,
    refused: &str,
    refused_epoch: u64,
) -> WireError {
    WireError::new(
        ErrorCode::BrokerNameTaken,
        format!(
            "the group's master is at {holder} with epoch {holder_epoch}; the broker at {refused} \
             was refused as master of '{name}' at epoch {refused_epoch}: a newer election fenced it, \
             and it serves again once it registers as a slave"
        ),
    )
}

fn log_drop(name: &str, entry: &BrokerEntry, reason: DropReason) {
    info!(
        cluster = %entry.cluster,
        broker = %name,
        addr = %entry.addr,
        role = entry.role.name(),
        %reason,
        "broker dropped from all routes"
    );
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
            epoch: Default::default(),
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
                    epoch: Default::default(),
                    slaves: Vec::new(),
                    broker_name: "b1".into(),
                    addr: "b1.local:10911".into(),
                    queues: 8,
                    perm: PERM_READ_WRITE
                },
                BrokerQueues {
                    epoch: Default::default(),
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
        // By address: only over the connection that registered it.
        r.register(reg("c", "b1", vec![topic("t", 1)]), 1, t0)
            .unwrap();
        let e = r
            .unregister(&bye("b1", "b1.local:10911"), 7, "peer")
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::BrokerNameTaken);
        assert!(r.route("t", t0).is_ok());
        assert_eq!(
            r.unregister(&bye("b1", "b1.local:10911"), 1, "peer"),
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

    // Broker groups: one master and its slaves under one name.

    fn member(
        role: BrokerRole,
        name: &str,
        addr: &str,
        topics: Vec<TopicConfig>,
    ) -> RegisterBroker {
        RegisterBroker {
            epoch: Default::default(),
            role,
            cluster: "c".into(),
            broker_name: name.into(),
            addr: addr.into(),
            topics,
        }
    }

    fn master(name: &str, addr: &str, topics: Vec<TopicConfig>) -> RegisterBroker {
        member(BrokerRole::Master, name, addr, topics)
    }

    fn slave(name: &str, addr: &str, topics: Vec<TopicConfig>) -> RegisterBroker {
        member(BrokerRole::Slave, name, addr, topics)
    }

    /// `topic`'s route as (name, master addr, slaves, queues), or nothing.
    fn route(r: &Registry, topic: &str, now: Instant) -> Vec<(String, String, Vec<String>, u32)> {
        match r.route(topic, now) {
            Ok(route) => route
                .brokers
                .into_iter()
                .map(|b| (b.broker_name, b.addr, b.slaves, b.queues))
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    fn entry(
        name: &str,
        addr: &str,
        slaves: &[&str],
        queues: u32,
    ) -> (String, String, Vec<String>, u32) {
        (
            name.into(),
            addr.into(),
            slaves.iter().map(|s| s.to_string()).collect(),
            queues,
        )
    }

    /// Every live broker as (cluster, name, role, addr).
    fn cluster(r: &Registry, now: Instant) -> Vec<(String, String, BrokerRole, String)> {
        r.cluster(now)
            .brokers
            .into_iter()
            .map(|b| (b.cluster, b.broker_name, b.role, b.addr))
            .collect()
    }

    #[test]
    fn a_second_master_is_refused_while_slaves_at_other_addresses_are_admitted() {
        let r = Registry::new(EXPIRY);
        let t0 = Instant::now();
        r.register(master("g", "m:1", vec![topic("t", 4)]), 1, t0)
            .unwrap();
        let e = r
            .register(master("g", "x:1", vec![topic("t", 2)]), 2, t0)
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::BrokerNameTaken);
        assert!(e.message.contains("m:1"), "{}", e.message);
        assert!(e.message.contains("x:1"), "{}", e.message);
        // Registered in reverse address order: the route sorts them.
        r.register(slave("g", "s2:1", vec![topic("t", 4)]), 3, t0)
            .unwrap();
        r.register(slave("g", "s1:1", vec![topic("t", 4)]), 2, t0)
            .unwrap();
        assert_eq!(
            route(&r, "t", t0),
            vec![entry("g", "m:1", &["s1:1", "s2:1"], 4)]
        );
        // A slave cannot make itself a second master while the master lives.
        let e = r
            .register(master("g", "s1:1", vec![topic("t", 4)]), 2, t0)
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::BrokerNameTaken);
        assert_eq!(
            route(&r, "t", t0),
            vec![entry("g", "m:1", &["s1:1", "s2:1"], 4)]
        );
        // Heartbeats of all three go on, none disturbing another.
        let t1 = t0 + EXPIRY;
        r.register(master("g", "m:1", vec![topic("t", 4)]), 1, t1)
            .unwrap();
        r.register(slave("g", "s1:1", vec![topic("t", 4)]), 2, t1)
            .unwrap();
        r.register(slave("g", "s2:1", vec![topic("t", 4)]), 3, t1)
            .unwrap();
        assert_eq!(cluster(&r, t1).len(), 3);
    }

    #[test]
    fn a_slave_in_another_cluster_is_admitted() {
        let r = Registry::new(EXPIRY);
        let t0 = Instant::now();
        r.register(master("g", "m:1", vec![topic("t", 4)]), 1, t0)
            .unwrap();
        let mut other = slave("g", "s:1", vec![topic("t", 4)]);
        other.cluster = "elsewhere".into();
        r.register(other, 2, t0).unwrap();
        assert_eq!(route(&r, "t", t0), vec![entry("g", "m:1", &["s:1"], 4)]);
    }

    #[test]
    fn a_master_that_expires_leaves_its_slaves_in_the_route_without_an_address() {
        let r = Registry::new(EXPIRY);
        let t0 = Instant::now();
        r.register(master("g", "m:1", vec![topic("t", 8)]), 1, t0)
            .unwrap();
        r.register(slave("g", "s:1", vec![topic("t", 4)]), 2, t0)
            .unwrap();
        // The slave keeps heartbeating; the master falls silent.
        r.register(slave("g", "s:1", vec![topic("t", 4)]), 2, t0 + EXPIRY)
            .unwrap();
        let late = t0 + EXPIRY + Duration::from_millis(1);
        // Hidden before the scan, and removed by it, alone.
        assert_eq!(route(&r, "t", late), vec![entry("g", "", &["s:1"], 4)]);
        assert_eq!(r.expire(late), vec!["g"]);
        assert_eq!(route(&r, "t", late), vec![entry("g", "", &["s:1"], 4)]);
        assert_eq!(
            cluster(&r, late),
            vec![("c".into(), "g".into(), BrokerRole::Slave, "s:1".into())]
        );
        // The master comes back: the route has its address again.
        r.register(master("g", "m:1", vec![topic("t", 8)]), 3, late)
            .unwrap();
        assert_eq!(route(&r, "t", late), vec![entry("g", "m:1", &["s:1"], 8)]);
    }

    #[test]
    fn a_new_master_replaces_an_expired_one_and_the_slaves_stay() {
        let r = Registry::new(EXPIRY);
        let t0 = Instant::now();
        r.register(master("g", "m:1", vec![topic("t", 8)]), 1, t0)
            .unwrap();
        let late = t0 + EXPIRY + Duration::from_millis(1);
        r.register(slave("g", "s:1", vec![topic("t", 4)]), 2, late)
            .unwrap();
        // Not scanned yet: the expired master counts as gone.
        r.register(master("g", "n:1", vec![topic("t", 8)]), 3, late)
            .unwrap();
        assert_eq!(route(&r, "t", late), vec![entry("g", "n:1", &["s:1"], 8)]);
        assert_eq!(r.expire(late), Vec::<String>::new());
        assert_eq!(r.connection_closed(1), Vec::<String>::new());
        assert_eq!(cluster(&r, late).len(), 2);
    }

    #[test]
    fn a_slave_that_expires_leaves_its_master_and_the_other_slaves() {
        let r = Registry::new(EXPIRY);
        let t0 = Instant::now();
        r.register(master("g", "m:1", vec![topic("t", 8)]), 1, t0)
            .unwrap();
        r.register(slave("g", "s1:1", vec![topic("t", 8)]), 2, t0)
            .unwrap();
        r.register(slave("g", "s2:1", vec![topic("t", 8)]), 3, t0)
            .unwrap();
        let t1 = t0 + EXPIRY;
        r.register(master("g", "m:1", vec![topic("t", 8)]), 1, t1)
            .unwrap();
        r.register(slave("g", "s2:1", vec![topic("t", 8)]), 3, t1)
            .unwrap();
        let late = t1 + Duration::from_millis(1);
        assert_eq!(r.expire(late), vec!["g"]);
        assert_eq!(route(&r, "t", late), vec![entry("g", "m:1", &["s2:1"], 8)]);
    }

    #[test]
    fn closing_a_connection_drops_only_the_broker_registered_over_it() {
        let r = Registry::new(EXPIRY);
        let t0 = Instant::now();
        r.register(master("g", "m:1", vec![topic("t", 8)]), 1, t0)
            .unwrap();
        r.register(slave("g", "s1:1", vec![topic("t", 8)]), 2, t0)
            .unwrap();
        r.register(slave("g", "s2:1", vec![topic("t", 8)]), 3, t0)
            .unwrap();
        assert_eq!(r.connection_closed(2), vec!["g"]);
        assert_eq!(route(&r, "t", t0), vec![entry("g", "m:1", &["s2:1"], 8)]);
        assert_eq!(r.connection_closed(1), vec!["g"]);
        assert_eq!(route(&r, "t", t0), vec![entry("g", "", &["s2:1"], 8)]);
        assert_eq!(r.connection_closed(3), vec!["g"]);
        assert!(r.route("t", t0).is_err());
        assert!(r.cluster(t0).brokers.is_empty());
    }

    #[test]
    fn reregistering_at_the_same_address_with_a_new_role_replaces_the_entry() {
        let r = Registry::new(EXPIRY);
        let t0 = Instant::now();
        r.register(master("g", "a:1", vec![topic("t", 8)]), 1, t0)
            .unwrap();
        r.register(slave("g", "b:1", vec![topic("t", 8)]), 2, t0)
            .unwrap();
        // The master restarted as a slave before its old connection was
        // seen to close: it is one broker, now a slave.
        r.register(slave("g", "a:1", vec![topic("t", 8)]), 3, t0)
            .unwrap();
        assert_eq!(route(&r, "t", t0), vec![entry("g", "", &["a:1", "b:1"], 8)]);
        assert_eq!(
            cluster(&r, t0),
            vec![
                ("c".into(), "g".into(), BrokerRole::Slave, "a:1".into()),
                ("c".into(), "g".into(), BrokerRole::Slave, "b:1".into()),
            ]
        );
        // Its old connection closing takes nothing with it.
        assert_eq!(r.connection_closed(1), Vec::<String>::new());
        // A slave becomes the master (no live master holds the name).
        r.register(master("g", "b:1", vec![topic("t", 8)]), 2, t0)
            .unwrap();
        assert_eq!(route(&r, "t", t0), vec![entry("g", "b:1", &["a:1"], 8)]);
        assert_eq!(
            cluster(&r, t0),
            vec![
                ("c".into(), "g".into(), BrokerRole::Master, "b:1".into()),
                ("c".into(), "g".into(), BrokerRole::Slave, "a:1".into()),
            ]
        );
    }

    #[test]
    fn queues_come_from_the_master_else_the_first_slave_that_has_the_topic() {
        let r = Registry::new(EXPIRY);
        let t0 = Instant::now();
        r.register(master("g", "m:1", vec![topic("t", 8)]), 1, t0)
            .unwrap();
        r.register(
            slave("g", "s2:1", vec![topic("t", 2), topic("new", 3)]),
            3,
            t0,
        )
        .unwrap();
        r.register(slave("g", "s1:1", vec![topic("t", 4)]), 2, t0)
            .unwrap();
        assert_eq!(
            route(&r, "t", t0),
            vec![entry("g", "m:1", &["s1:1", "s2:1"], 8)]
        );
        // Only a slave serves it: the group is in the route all the same.
        assert_eq!(
            route(&r, "new", t0),
            vec![entry("g", "m:1", &["s1:1", "s2:1"], 3)]
        );
        // Without a live master, the first slave by address decides.
        r.register(slave("g", "s1:1", vec![topic("t", 4)]), 2, t0 + EXPIRY)
            .unwrap();
        r.register(
            slave("g", "s2:1", vec![topic("t", 2), topic("new", 3)]),
            3,
            t0 + EXPIRY,
        )
        .unwrap();
        let late = t0 + EXPIRY + Duration::from_millis(1);
        assert_eq!(
            route(&r, "t", late),
            vec![entry("g", "", &["s1:1", "s2:1"], 4)]
        );
    }

    #[test]
    fn cluster_lists_every_broker_with_its_role_master_first() {
        let r = Registry::new(EXPIRY);
        let t0 = Instant::now();
        r.register(slave("b", "b-s:1", vec![]), 1, t0).unwrap();
        r.register(slave("a", "a-s2:1", vec![]), 2, t0).unwrap();
        r.register(master("a", "a-z:1", vec![]), 3, t0).unwrap();
        r.register(slave("a", "a-s1:1", vec![]), 4, t0).unwrap();
        let mut far = master("0", "f:1", vec![]);
        far.cluster = "z".into();
        r.register(far, 5, t0).unwrap();
        let c = |name: &str, role, addr: &str| {
            ("c".to_string(), name.to_string(), role, addr.to_string())
        };
        assert_eq!(
            cluster(&r, t0),
            vec![
                c("a", BrokerRole::Master, "a-z:1"),
                c("a", BrokerRole::Slave, "a-s1:1"),
                c("a", BrokerRole::Slave, "a-s2:1"),
                c("b", BrokerRole::Slave, "b-s:1"),
                ("z".into(), "0".into(), BrokerRole::Master, "f:1".into()),
            ]
        );
    }

    #[test]
    fn topics_name_a_group_once() {
        let r = Registry::new(EXPIRY);
        let t0 = Instant::now();
        r.register(master("g", "m:1", vec![topic("t", 8)]), 1, t0)
            .unwrap();
        r.register(
            slave("g", "s1:1", vec![topic("t", 4), topic("u", 1)]),
            2,
            t0,
        )
        .unwrap();
        r.register(slave("g", "s2:1", vec![topic("t", 2)]), 3, t0)
            .unwrap();
        r.register(master("h", "h:1", vec![topic("t", 1)]), 4, t0)
            .unwrap();
        let topics = |now| -> Vec<(String, String, u32)> {
            r.topics(now)
                .topics
                .into_iter()
                .map(|t| (t.config.name, t.broker_name, t.config.queues))
                .collect()
        };
        assert_eq!(
            topics(t0),
            vec![
                ("t".into(), "g".into(), 8),
                ("t".into(), "h".into(), 1),
                ("u".into(), "g".into(), 1),
            ]
        );
        // The master gone, the first slave's table speaks for the group.
        assert_eq!(r.connection_closed(1), vec!["g"]);
        assert_eq!(
            topics(t0),
            vec![
                ("t".into(), "g".into(), 4),
                ("t".into(), "h".into(), 1),
                ("u".into(), "g".into(), 1),
            ]
        );
    }

    #[test]
    fn unregister_removes_only_that_broker_and_strangers_are_refused() {
        let r = Registry::new(EXPIRY);
        let t0 = Instant::now();
        r.register(master("g", "m:1", vec![topic("t", 8)]), 1, t0)
            .unwrap();
        r.register(slave("g", "s1:1", vec![topic("t", 8)]), 2, t0)
            .unwrap();
        r.register(slave("g", "s2:1", vec![topic("t", 8)]), 3, t0)
            .unwrap();
        // A slave by its address, from another connection: refused.
        let e = r.unregister(&bye("g", "s1:1"), 9, "peer").unwrap_err();
        assert_eq!(e.code, ErrorCode::BrokerNameTaken);
        // From its own connection.
        assert_eq!(r.unregister(&bye("g", "s1:1"), 2, "peer"), Ok(true));
        assert_eq!(route(&r, "t", t0), vec![entry("g", "m:1", &["s2:1"], 8)]);
        // A slave by its connection (an older broker sends no address).
        assert_eq!(r.unregister(&bye("g", ""), 3, "peer"), Ok(true));
        assert_eq!(route(&r, "t", t0), vec![entry("g", "m:1", &[], 8)]);
        // A stranger, by address or connection, removes nothing.
        r.register(slave("g", "s1:1", vec![topic("t", 8)]), 2, t0)
            .unwrap();
        let e = r
            .unregister(&bye("g", "x:1"), 8, "10.0.0.8:5555")
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::BrokerNameTaken);
        assert!(e.message.contains("m:1"), "{}", e.message);
        assert!(e.message.contains("s1:1"), "{}", e.message);
        assert!(e.message.contains("x:1"), "{}", e.message);
        let e = r.unregister(&bye("g", ""), 8, "10.0.0.8:5555").unwrap_err();
        assert!(e.message.contains("10.0.0.8:5555"), "{}", e.message);
        assert_eq!(route(&r, "t", t0), vec![entry("g", "m:1", &["s1:1"], 8)]);
        // The master's goodbye leaves its slave.
        assert_eq!(r.unregister(&bye("g", "m:1"), 1, "peer"), Ok(true));
        assert_eq!(route(&r, "t", t0), vec![entry("g", "", &["s1:1"], 8)]);
        assert_eq!(r.unregister(&bye("g", "s1:1"), 2, "peer"), Ok(true));
        assert_eq!(r.unregister(&bye("g", "s1:1"), 2, "peer"), Ok(false));
        assert!(r.route("t", t0).is_err());
    }

    // Controller epochs: the group's master is the one elected last.

    fn elected(name: &str, addr: &str, epoch: u64) -> RegisterBroker {
        let mut r = master(name, addr, vec![topic("t", 4)]);
        r.epoch = epoch;
        r
    }

    /// `t`'s route entries as (master addr, epoch, slaves).
    fn epochs(r: &Registry, now: Instant) -> Vec<(String, u64, Vec<String>)> {
        r.route("t", now)
            .map(|route| {
                route
                    .brokers
                    .into_iter()
                    .map(|b| (b.addr, b.epoch, b.slaves))
                    .collect()
            })
            .unwrap_or_default()
    }

    #[test]
    fn a_master_with_a_higher_epoch_takes_the_group_and_the_old_one_leaves_the_routes() {
        let r = Registry::new(EXPIRY);
        let t0 = Instant::now();
        r.register(elected("g", "a:1", 1), 1, t0).unwrap();
        r.register(slave("g", "b:1", vec![topic("t", 4)]), 2, t0)
            .unwrap();
        r.register(slave("g", "c:1", vec![topic("t", 4)]), 3, t0)
            .unwrap();
        assert_eq!(
            epochs(&r, t0),
            vec![("a:1".into(), 1, vec!["b:1".into(), "c:1".into()])]
        );
        // b was elected (epoch 2) while a still heartbeats as epoch 1.
        r.register(elected("g", "b:1", 2), 2, t0).unwrap();
        assert_eq!(epochs(&r, t0), vec![("b:1".into(), 2, vec!["c:1".into()])]);
        let listed: Vec<(String, BrokerRole, u64)> = r
            .cluster(t0)
            .brokers
            .into_iter()
            .map(|b| (b.addr, b.role, b.epoch))
            .collect();
        assert_eq!(
            listed,
            vec![
                ("b:1".into(), BrokerRole::Master, 2),
                ("c:1".into(), BrokerRole::Slave, 0),
            ]
        );
        // a's stale heartbeat is refused, naming the master and its epoch.
        let e = r.register(elected("g", "a:1", 1), 1, t0).unwrap_err();
        assert_eq!(e.code, ErrorCode::BrokerNameTaken);
        assert!(
            e.message
                .contains("the group's master is at b:1 with epoch 2"),
            "{}",
            e.message
        );
        assert_eq!(epochs(&r, t0), vec![("b:1".into(), 2, vec!["c:1".into()])]);
        // Its old connection closing takes nothing with it.
        assert_eq!(r.connection_closed(1), Vec::<String>::new());
        // Demoted, it joins as a slave.
        r.register(slave("g", "a:1", vec![topic("t", 4)]), 4, t0)
            .unwrap();
        assert_eq!(
            epochs(&r, t0),
            vec![("b:1".into(), 2, vec!["a:1".into(), "c:1".into()])]
        );
    }

    #[test]
    fn equal_epochs_keep_the_first_master_and_a_lower_epoch_is_refused() {
        let r = Registry::new(EXPIRY);
        let t0 = Instant::now();
        r.register(elected("g", "a:1", 3), 1, t0).unwrap();
        let e = r.register(elected("g", "b:1", 3), 2, t0).unwrap_err();
        assert_eq!(e.code, ErrorCode::BrokerNameTaken);
        assert!(
            e.message.contains("another master broker at a:1"),
            "{}",
            e.message
        );
        let e = r.register(elected("g", "b:1", 2), 2, t0).unwrap_err();
        assert!(
            e.message
                .contains("the group's master is at a:1 with epoch 3"),
            "{}",
            e.message
        );
        // A slave is admitted whatever its epoch.
        let mut s = slave("g", "b:1", vec![topic("t", 4)]);
        s.epoch = 1;
        r.register(s, 2, t0).unwrap();
        assert_eq!(epochs(&r, t0), vec![("a:1".into(), 3, vec!["b:1".into()])]);
        // The master's own heartbeats go on.
        r.register(elected("g", "a:1", 3), 1, t0 + EXPIRY).unwrap();
        // Once the master is gone, a master at any epoch may register.
        let late = t0 + EXPIRY * 2 + Duration::from_millis(1);
        r.register(elected("g", "b:1", 1), 2, late).unwrap();
        assert_eq!(epochs(&r, late), vec![("b:1".into(), 1, vec![])]);
    }

    #[test]
    fn a_slave_elected_master_replaces_its_own_slave_entry() {
        let r = Registry::new(EXPIRY);
        let t0 = Instant::now();
        r.register(elected("g", "a:1", 4), 1, t0).unwrap();
        r.register(slave("g", "b:1", vec![topic("t", 4)]), 2, t0)
            .unwrap();
        r.register(elected("g", "b:1", 5), 2, t0).unwrap();
        assert_eq!(epochs(&r, t0), vec![("b:1".into(), 5, vec![])]);
        assert_eq!(r.cluster(t0).brokers.len(), 1);
        // Brokers not run by a controller stay at epoch 0 in the answers.
        r.register(master("h", "h:1", vec![topic("t", 1)]), 3, t0)
            .unwrap();
        assert_eq!(
            epochs(&r, t0),
            vec![("b:1".into(), 5, vec![]), ("h:1".into(), 0, vec![])]
        );
    }
}
