//! Consumer groups: live members (by heartbeat), and which member owns
//! which of this broker's queues.
//!
//! Every member of a clustering group heartbeats to every broker of its
//! topics. Each broker assigns its own queues of a topic among the live
//! members subscribed to it: members sorted by id, queues split into
//! contiguous ranges of near-equal size (RocketMQ's "averagely"). A queue
//! changes hands only when its holder no longer lists it in its heartbeat
//! (it stopped reading it and committed its offset) or is gone, so a queue
//! has at most one owner at any time.
//!
//! A member is gone when its connection closes, when it leaves, or when no
//! heartbeat came within the expiry. Any change of membership or
//! subscriptions notifies the other members over their connections, so
//! they heartbeat at once instead of at their next interval.
//!
//! # Queues nobody owns that someone may still read
//!
//! The owner table lives in memory. Two faults make the broker forget a
//! reader while the reader goes on handling what it pulled: the broker
//! restarts (the table is empty), or a member's connection closes (a blip
//! is indistinguishable from a crash). Handing such a queue to the first
//! member that heartbeats would have two members handle it at once (an
//! ordered queue in two places). So, for one consumer expiry:
//!
//! - after the broker starts, a queue the group has read here (it has a
//!   committed offset) and that nobody owns goes only to a member whose
//!   heartbeat lists it as held, unless it had an owner since the start
//!   (its reader is known then: a member that left or expired since frees
//!   it as usual);
//! - after a member's connection closes, the queues it owned or held are
//!   reserved the same way: it keeps them if it heartbeats again (on a new
//!   connection) listing them as held; a queue it no longer lists is free
//!   at once; if it does not come back, they are assigned as usual when
//!   the expiry has passed (members are told then, so they heartbeat at
//!   once).
//!
//! A member that has not heartbeated since the broker started or since its
//! connection closed is not a member here: its owner-tagged pulls are
//! refused with `HEARTBEAT_REQUIRED` (retriable; the queue did not move)
//! until it heartbeats and so says what it holds. One expiry is what a
//! member that is really gone would have had anyway before it expired,
//! and a live member heartbeats several times within it. A member leaving
//! cleanly, or expiring without heartbeats, frees its queues at once.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use txmq_protocol::{GroupQueue, MemberInfo, NotifyRebalance, QueueRef, Subscription};
use txmq_remoting::Connection;

/// A heartbeat, as the table needs it.
pub(crate) struct Beat {
    pub(crate) group: String,
    pub(crate) client_id: String,
    pub(crate) subscriptions: Vec<Subscription>,
    pub(crate) broadcast: bool,
    pub(crate) held: Vec<QueueRef>,
}

struct Member {
    conn: Connection,
    subscriptions: Vec<Subscription>,
    broadcast: bool,
    held: BTreeSet<QueueRef>,
    last_seen: Instant,
}

#[derive(Default)]
struct Group {
    members: BTreeMap<String, Member>,
    /// Current owner of each queue (clustering members only).
    owners: HashMap<QueueRef, String>,
    /// Queues of members whose connection closed: the member, and until
    /// when nobody else may take the queue (only a member that holds it).
    reserved: HashMap<QueueRef, (String, Instant)>,
    /// Queues that had an owner since the broker started: whoever read
    /// them before is known (it claimed them, or let go and left), so the
    /// start grace no longer applies to them.
    known: HashSet<QueueRef>,
    /// Clustering members that expired (no heartbeat within the expiry),
    /// and when: their queues may have been read past where their readers
    /// stand, so the first heartbeat of one that comes back says so (see
    /// `HeartbeatOk::expired`). Forgotten after [`EXPIRED_KEPT`].
    expired: HashMap<String, Instant>,
}

/// How long an expired member is remembered, in expiries.
const EXPIRED_KEPT: u32 = 20;

impl Group {
    /// Whether the group holds anything worth keeping: members, owners,
    /// reservations, or what the start grace needs to know.
    fn in_use(&self) -> bool {
        !self.members.is_empty()
            || !self.owners.is_empty()
            || !self.reserved.is_empty()
            || !self.known.is_empty()
            || !self.expired.is_empty()
    }

    /// Clustering members subscribed to `topic`, sorted by id.
    fn subscribed(&self, topic: &str) -> Vec<String> {
        self.members
            .iter()
            .filter(|(_, m)| !m.broadcast && m.subscriptions.iter().any(|s| s.topic == topic))
            .map(|(id, _)| id.clone())
            .collect()
    }
}

/// Where a master not run by a controller lists, as it stops cleanly,
/// the queues its groups' members owned, held or had reserved: the only
/// ones the start grace needs to keep for a reader at the next start.
const HELD_AT_STOP: &str = "groups-at-stop.json";

/// Queues that may have had a reader, by group.
pub(crate) type HeldAtStop = HashMap<String, HashSet<QueueRef>>;

#[derive(serde::Serialize, serde::Deserialize)]
struct HeldQueue {
    group: String,
    topic: String,
    queue: u32,
}

/// Reads and removes the list a clean stop left in `dir` (removed in any
/// case, so that a crash later never finds a stale one); returns it when
/// `use_it` (a master not run by a controller: no other broker served the
/// queues since). `None`: no list (a first start, a crash before, or
/// another role), or one that cannot be read: every queue the group read
/// here then waits for its reader, as before.
pub(crate) fn take_held_at_stop(dir: &std::path::Path, use_it: bool) -> Option<HeldAtStop> {
    let path = dir.join(HELD_AT_STOP);
    let data = std::fs::read(&path).ok()?;
    let removed = std::fs::remove_file(&path)
        .and_then(|()| std::fs::File::open(dir).and_then(|d| d.sync_all()));
    if let Err(e) = removed {
        tracing::warn!(path = %path.display(), error = %e, "cannot remove the list of queues read at the last stop; not using it");
        return None;
    }
    if !use_it {
        return None;
    }
    let list: Vec<HeldQueue> = match serde_json::from_slice(&data) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read the list of queues read at the last stop; every queue read here waits for its reader");
            return None;
        }
    };
    let mut held = HeldAtStop::new();
    for h in list {
        held.entry(h.group).or_default().insert(QueueRef {
            topic: h.topic,
            queue: h.queue,
        });
    }
    Some(held)
}

/// The consumer groups of this broker.
pub(crate) struct Groups {
    groups: Mutex<HashMap<String, Group>>,
    /// The queues that had a reader when this broker last stopped cleanly
    /// (`None`: not known, so any queue read here may have one).
    held_at_stop: Option<HeldAtStop>,
    /// Whether a clean stop writes that list (a master not run by a
    /// controller).
    remembers_stop: bool,
    expiry: Duration,
    /// One expiry after the broker started: until then a queue the group
    /// read here and nobody owns goes only to a member that holds it.
    start_grace: Instant,
    /// Whether the members were told that the start grace is over.
    start_grace_told: AtomicBool,
}

/// Why a member may not pull a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Another member owns the queue.
    NotOwner,
    /// The member has not heartbeated since the broker started or since
    /// its connection closed.
    NotMember,
}

/// Ends the reservations whose time is up: a member that did not come
/// back for its reserved queues in time lost them as an expired one does.
fn end_reservations(g: &mut Group, now: Instant) {
    for (id, _) in g.reserved.values().filter(|(_, until)| *until <= now) {
        if !g.members.contains_key(id) {
            g.expired.insert(id.clone(), now);
        }
    }
    g.reserved.retain(|_, (_, until)| *until > now);
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The member index `queue` is allocated to among `members` (the inverse
/// of [`allocate`]).
pub(crate) fn allocated_to(queues: u32, members: usize, queue: u32) -> Option<usize> {
    if members == 0 || queue >= queues {
        return None;
    }
    let (q, m) = (queue as usize, members);
    let base = queues as usize / m;
    let extra = queues as usize % m;
    // The first `extra` members get base + 1 queues each.
    let big = extra * (base + 1);
    Some(if q < big {
        q / (base + 1)
    } else {
        extra + (q - big) / base
    })
}

/// The queues `index` of `members` members gets out of `queues`: a
/// contiguous range, sizes differing by at most one.
pub(crate) fn allocate(queues: u32, members: usize, index: usize) -> std::ops::Range<u32> {
    if members == 0 || index >= members {
        return 0..0;
    }
    let (q, m, i) = (queues as usize, members, index);
    let base = q / m;
    let extra = q % m;
    let start = i * base + i.min(extra);
    let len = base + usize::from(i < extra);
    start as u32..(start + len) as u32
}

impl Groups {
    /// The groups of a broker starting now; `expiry` is the consumer
    /// expiry (also the grace of the start and of a closed connection).
    pub(crate) fn new(expiry: Duration) -> Groups {
        Groups {
            groups: Mutex::new(HashMap::new()),
            held_at_stop: None,
            remembers_stop: false,
            expiry,
            start_grace: Instant::now() + expiry,
            start_grace_told: AtomicBool::new(false),
        }
    }

    /// A master not run by a controller: a clean stop writes which queues
    /// had a reader, and `held` is what the last clean stop wrote (see
    /// [`take_held_at_stop`]), so that after a restart only those wait for
    /// their readers.
    pub(crate) fn remembering_stops(mut self, held: Option<HeldAtStop>) -> Groups {
        self.remembers_stop = true;
        self.held_at_stop = held;
        self
    }

    /// Until when queue `q` of `group`, which nobody owns, waits for a
    /// reader the broker may have lost track of (see the module docs):
    /// the member whose connection closed, or, within the start grace,
    /// whoever read it before the restart. `read_here`: whether the group
    /// has a committed offset for it here. `None`: it does not wait.
    fn wait_end(
        &self,
        g: &Group,
        group: &str,
        q: &QueueRef,
        now: Instant,
        read_here: impl FnOnce() -> bool,
    ) -> Option<Instant> {
        if let Some((_, until)) = g.reserved.get(q).filter(|(_, until)| *until > now) {
            return Some(*until);
        }
        (now < self.start_grace
            && !g.known.contains(q)
            && self.maybe_read_at_stop(group, q)
            && read_here())
        .then_some(self.start_grace)
    }

    /// How much longer queue `q` of `group` waits for a reader the broker
    /// may have lost track of before another member gets it (see
    /// [`Groups::wait_end`]); `None` when it is owned or does not wait.
    pub(crate) fn waiting(&self, group: &str, q: &QueueRef, read_here: bool) -> Option<Duration> {
        let groups = lock(&self.groups);
        // A group no member heartbeated since the start has no entry yet:
        // its queues wait all the same.
        let empty = Group::default();
        let g = groups.get(group).unwrap_or(&empty);
        if g.owners.contains_key(q) {
            return None;
        }
        let now = Instant::now();
        self.wait_end(g, group, q, now, || read_here)
            .map(|until| until.duration_since(now))
    }

    /// Whether a queue of `group` may have had a reader when the broker
    /// last stopped.
    fn maybe_read_at_stop(&self, group: &str, q: &QueueRef) -> bool {
        self.held_at_stop
            .as_ref()
            .is_none_or(|h| h.get(group).is_some_and(|qs| qs.contains(q)))
    }

    /// Writes which queues had a reader (owned, held or reserved) into
    /// `dir`, for the next start, when this broker remembers its stops.
    /// Called as it stops cleanly, once no heartbeat is served any more.
    /// `committed`: the (group, topic, queue) of every committed offset:
    /// within the start grace, one of them that nobody claimed yet may
    /// still wait for its reader, and is listed too.
    pub(crate) fn write_held_at_stop(
        &self,
        dir: &std::path::Path,
        committed: Vec<(String, String, u32)>,
    ) {
        if !self.remembers_stop {
            return;
        }
        let starting = Instant::now() < self.start_grace;
        let groups = lock(&self.groups);
        let mut queues: BTreeSet<(&str, &QueueRef)> = BTreeSet::new();
        for (name, g) in groups.iter() {
            let held = g.members.values().flat_map(|m| m.held.iter());
            queues.extend(
                g.owners
                    .keys()
                    .chain(g.reserved.keys())
                    .chain(held)
                    .map(|q| (name.as_str(), q)),
            );
        }
        let mut list: Vec<HeldQueue> = queues
            .into_iter()
            .map(|(group, q)| HeldQueue {
                group: group.to_string(),
                topic: q.topic.clone(),
                queue: q.queue,
            })
            .collect();
        if starting {
            for (group, topic, queue) in committed {
                let q = QueueRef { topic, queue };
                let claimed = groups.get(&group).is_some_and(|g| {
                    g.known.contains(&q) || g.owners.contains_key(&q) || g.reserved.contains_key(&q)
                });
                if !claimed && self.maybe_read_at_stop(&group, &q) {
                    list.push(HeldQueue {
                        group,
                        topic: q.topic,
                        queue: q.queue,
                    });
                }
            }
        }
        drop(groups);
        let path = dir.join(HELD_AT_STOP);
        let tmp = dir.join(format!("{HELD_AT_STOP}.tmp"));
        let written = serde_json::to_vec(&list)
            .map_err(std::io::Error::other)
            .and_then(|data| {
                use std::io::Write;
                let mut f = std::fs::File::create(&tmp)?;
                f.write_all(&data)?;
                f.sync_all()?;
                std::fs::rename(&tmp, &path)?;
                std::fs::File::open(dir)?.sync_all()
            });
        if let Err(e) = written {
            tracing::warn!(path = %path.display(), error = %e, "cannot write which queues had readers; after the restart every queue read here waits one consumer expiry for its reader");
        }
    }

    /// Records a heartbeat and answers the member's queues on this broker.
    /// `queues` gives a topic's queue count here (`None`: not served here);
    /// `read_here` whether the group has a committed offset for a queue
    /// here (so a member may still be reading it after a restart).
    /// Returns the assignment and the connections to notify of a change.
    pub(crate) fn heartbeat(
        &self,
        conn: &Connection,
        beat: Beat,
        queues: impl Fn(&str) -> Option<u32>,
        read_here: impl Fn(&str, u32) -> bool,
    ) -> (Vec<QueueRef>, Notices, bool) {
        let mut groups = lock(&self.groups);
        let group = groups.entry(beat.group.clone()).or_default();
        let now = Instant::now();
        let held: BTreeSet<QueueRef> = beat.held.into_iter().collect();
        // A reservation ends with the expiry, or when its member comes back
        // without the queue (it let go of it).
        end_reservations(group, now);
        group
            .reserved
            .retain(|q, (id, _)| *id != beat.client_id || held.contains(q));
        let expired = group.expired.remove(&beat.client_id).is_some();
        let changed = match group.members.get_mut(&beat.client_id) {
            Some(m) => {
                let changed = m.subscriptions != beat.subscriptions
                    || m.broadcast != beat.broadcast
                    || m.conn.id() != conn.id();
                m.subscriptions = beat.subscriptions;
                m.broadcast = beat.broadcast;
                m.conn = conn.clone();
                m.held = held;
                m.last_seen = now;
                changed
            }
            None => {
                group.members.insert(
                    beat.client_id.clone(),
                    Member {
                        conn: conn.clone(),
                        subscriptions: beat.subscriptions,
                        broadcast: beat.broadcast,
                        held,
                        last_seen: now,
                    },
                );
                true
            }
        };
        let member = &group.members[&beat.client_id];
        let topics: Vec<String> = member
            .subscriptions
            .iter()
            .map(|s| s.topic.clone())
            .collect();
        let broadcast = member.broadcast;
        let mut assigned = Vec::new();
        // Members that were just handed a queue someone let go of.
        let mut handed = BTreeSet::new();
        for topic in topics {
            let Some(n) = queues(&topic) else { continue };
            if broadcast {
                assigned.extend((0..n).map(|queue| QueueRef {
                    topic: topic.clone(),
                    queue,
                }));
                continue;
            }
            let members = group.subscribed(&topic);
            let Some(index) = members.iter().position(|id| *id == beat.client_id) else {
                continue;
            };
            let count = members.len();
            // Settle owners: a queue whose owner let go of it (or is gone)
            // goes to the member it is allocated to.
            for queue in 0..n {
                let q = QueueRef {
                    topic: topic.clone(),
                    queue,
                };
                let desired = allocated_to(n, count, queue).map(|i| members[i].clone());
                let mut current = group.owners.get(&q).cloned();
                // A queue nobody owns that this member still reads (the
                // broker restarted, or forgot the member for a moment) stays
                // with it until it lets go, as for any other owner.
                if current.is_none() && group.members[&beat.client_id].held.contains(&q) {
                    group.owners.insert(q.clone(), beat.client_id.clone());
                    group.reserved.remove(&q);
                    group.known.insert(q.clone());
                    current = Some(beat.client_id.clone());
                }
                let keep = current.as_ref().is_some_and(|c| {
                    Some(c) == desired.as_ref()
                        || group.members.get(c).is_some_and(|m| m.held.contains(&q))
                });
                // Nobody owns it, but a member the broker forgot may still
                // read it: it waits for that member (see the module docs).
                let waits = current.is_none()
                    && self
                        .wait_end(group, &beat.group, &q, now, || read_here(&topic, queue))
                        .is_some();
                if !keep && !waits {
                    match desired {
                        Some(d) => {
                            if d != beat.client_id {
                                handed.insert(d.clone());
                            }
                            group.known.insert(q.clone());
                            group.owners.insert(q.clone(), d)
                        }
                        None => group.owners.remove(&q),
                    };
                }
            }
            let mine = allocate(n, count, index);
            for queue in mine {
                let q = QueueRef {
                    topic: topic.clone(),
                    queue,
                };
                if group.owners.get(&q).is_some_and(|o| *o == beat.client_id) {
                    assigned.push(q);
                }
            }
        }
        // The member starts reading what it is assigned before its next
        // heartbeat says so: count those queues as held from now on, so
        // that nobody else gets them meanwhile.
        if let Some(m) = group.members.get_mut(&beat.client_id) {
            m.held.extend(assigned.iter().cloned());
        }
        let notices = if changed {
            others(&beat.group, group, &beat.client_id)
        } else {
            group
                .members
                .iter()
                .filter(|(id, _)| handed.contains(*id))
                .map(|(_, m)| (beat.group.clone(), m.conn.clone()))
                .collect()
        };
        (assigned, notices, expired)
    }

    /// Every member of every group subscribed to `topic`: whom to tell that
    /// the topic changed (its permission or queues), so that they rebalance
    /// now rather than at their next heartbeat.
    pub(crate) fn subscribers_of(&self, topic: &str) -> Notices {
        lock(&self.groups)
            .iter()
            .flat_map(|(name, g)| {
                g.members
                    .values()
                    .filter(|m| m.subscriptions.iter().any(|s| s.topic == topic))
                    .map(move |m| (name.clone(), m.conn.clone()))
            })
            .collect()
    }

    /// Removes a member (it left); returns the connections to notify.
    pub(crate) fn leave(&self, group: &str, client_id: &str) -> Notices {
        let mut groups = lock(&self.groups);
        let Some(g) = groups.get_mut(group) else {
            return Vec::new();
        };
        if g.members.remove(client_id).is_none() {
            return Vec::new();
        }
        release(g, client_id);
        others(group, g, client_id)
    }

    /// Removes every member on a closed connection, reserving its queues
    /// for it for one expiry (it may still be handling them); returns the
    /// groups' connections to notify.
    pub(crate) fn connection_closed(&self, conn_id: u64) -> Notices {
        let until = Instant::now() + self.expiry;
        self.remove_where(|_, m| m.conn.id() == conn_id, Some(until), false)
    }

    /// Removes members without a heartbeat within the expiry, and ends
    /// the reservations and the start grace whose time has passed; returns
    /// the connections to notify (the members of groups where queues are
    /// free now).
    pub(crate) fn expire(&self) -> Notices {
        let expiry = self.expiry;
        let mut notify = self.remove_where(
            |id, m| {
                let gone = m.last_seen.elapsed() > expiry;
                if gone {
                    tracing::info!(client = %id, "consumer expired: no heartbeat within {expiry:?}");
                }
                gone
            },
            None,
            true,
        );
        let now = Instant::now();
        let grace_over =
            now >= self.start_grace && !self.start_grace_told.swap(true, Ordering::AcqRel);
        let mut groups = lock(&self.groups);
        for (name, g) in groups.iter_mut() {
            g.expired
                .retain(|_, at| now.duration_since(*at) < expiry * EXPIRED_KEPT);
            let before = g.reserved.len();
            end_reservations(g, now);
            if grace_over {
                g.known = HashSet::new();
            }
            if grace_over || g.reserved.len() != before {
                notify.extend(others(name, g, ""));
            }
        }
        groups.retain(|_, g| g.in_use());
        notify
    }

    /// Removes the members `gone` picks; with `reserve_until`, what they
    /// owned or held waits for them until then.
    fn remove_where(
        &self,
        gone: impl Fn(&str, &Member) -> bool,
        reserve_until: Option<Instant>,
        expiring: bool,
    ) -> Notices {
        let mut groups = lock(&self.groups);
        let mut notify = Vec::new();
        for (name, g) in groups.iter_mut() {
            let ids: Vec<String> = g
                .members
                .iter()
                .filter(|(id, m)| gone(id, m))
                .map(|(id, _)| id.clone())
                .collect();
            for id in &ids {
                let Some(m) = g.members.remove(id) else {
                    continue;
                };
                if expiring && !m.broadcast {
                    g.expired.insert(id.clone(), Instant::now());
                }
                if let Some(until) = reserve_until {
                    let owned: Vec<QueueRef> = g
                        .owners
                        .iter()
                        .filter(|(_, o)| *o == id)
                        .map(|(q, _)| q.clone())
                        .collect();
                    for q in owned.into_iter().chain(m.held) {
                        g.reserved.insert(q, (id.clone(), until));
                    }
                }
                release(g, id);
            }
            if !ids.is_empty() {
                notify.extend(others(name, g, ""));
            }
        }
        groups.retain(|_, g| g.in_use());
        notify
    }

    /// Whether `client_id` may pull a queue of `group` as its member: not
    /// when another member owns it, nor before the member heartbeated
    /// since the broker started or since its connection closed (it has not
    /// said what it holds yet).
    pub(crate) fn may_pull(
        &self,
        group: &str,
        client_id: &str,
        topic: &str,
        queue: u32,
    ) -> Result<(), Refusal> {
        let groups = lock(&self.groups);
        let Some(g) = groups.get(group) else {
            return Err(Refusal::NotMember);
        };
        let q = QueueRef {
            topic: topic.to_string(),
            queue,
        };
        if g.owners.get(&q).is_some_and(|o| o != client_id) {
            return Err(Refusal::NotOwner);
        }
        if !g.members.contains_key(client_id) {
            return Err(Refusal::NotMember);
        }
        Ok(())
    }

    /// Whether `client_id` may commit a queue of `group`: yes unless the
    /// queue is owned by another member.
    pub(crate) fn may_use(&self, group: &str, client_id: &str, topic: &str, queue: u32) -> bool {
        let groups = lock(&self.groups);
        let Some(g) = groups.get(group) else {
            return true;
        };
        let q = QueueRef {
            topic: topic.to_string(),
            queue,
        };
        g.owners.get(&q).is_none_or(|o| o == client_id)
    }

    /// Whether `group` consumes in clustering mode here: a member that
    /// is not broadcasting heartbeated, or a queue of it has an owner.
    /// Its members divide the queues, so a commit must say whose it is.
    pub(crate) fn is_clustering(&self, group: &str) -> bool {
        lock(&self.groups)
            .get(group)
            .is_some_and(|g| !g.owners.is_empty() || g.members.values().any(|m| !m.broadcast))
    }

    /// Whether the group has a live member subscribed to `topic`.
    pub(crate) fn has_live_members(&self, group: &str, topic: &str) -> bool {
        lock(&self.groups).get(group).is_some_and(|g| {
            g.members
                .values()
                .any(|m| m.subscriptions.iter().any(|s| s.topic == topic))
        })
    }

    /// Groups with live members: (group, member count, subscribed topics).
    pub(crate) fn list(&self) -> Vec<(String, u32, Vec<String>)> {
        lock(&self.groups)
            .iter()
            .filter(|(_, g)| !g.members.is_empty())
            .map(|(name, g)| {
                let topics: BTreeSet<String> = g
                    .members
                    .values()
                    .flat_map(|m| m.subscriptions.iter().map(|s| s.topic.clone()))
                    .collect();
                (
                    name.clone(),
                    g.members.len() as u32,
                    topics.into_iter().collect(),
                )
            })
            .collect()
    }

    /// A group's members and queue owners.
    pub(crate) fn state(&self, group: &str) -> (Vec<MemberInfo>, Vec<GroupQueue>) {
        let groups = lock(&self.groups);
        let Some(g) = groups.get(group) else {
            return (Vec::new(), Vec::new());
        };
        let members = g
            .members
            .iter()
            .map(|(id, m)| MemberInfo {
                client_id: id.clone(),
                addr: m.conn.peer_addr().to_string(),
                broadcast: m.broadcast,
                subscriptions: m.subscriptions.clone(),
                last_heartbeat_ms_ago: m.last_seen.elapsed().as_millis() as u64,
            })
            .collect();
        let owners = g
            .owners
            .iter()
            .map(|(q, o)| GroupQueue {
                topic: q.topic.clone(),
                queue: q.queue,
                owner: Some(o.clone()),
                committed: None,
                max_offset: 0,
                lag: 0,
                waiting_ms: None,
            })
            .collect();
        (members, owners)
    }
}

/// Queues owned by a member that is gone have no owner until reassigned.
fn release(g: &mut Group, client_id: &str) {
    g.owners.retain(|_, o| o != client_id);
}

/// Whom to tell that a group changed: (group, a member's connection).
pub(crate) type Notices = Vec<(String, Connection)>;

fn others(name: &str, g: &Group, except: &str) -> Notices {
    g.members
        .iter()
        .filter(|(id, _)| *id != except)
        .map(|(_, m)| (name.to_string(), m.conn.clone()))
        .collect()
}

/// Tells each consumer that its group changed. Fire and forget: a
/// consumer that misses it learns at its next heartbeat.
pub(crate) fn notify(notices: Notices) {
    if notices.is_empty() {
        return;
    }
    tokio::spawn(async move {
        let calls = notices.into_iter().map(|(group, c)| {
            let request = NotifyRebalance { group };
            async move {
                let _ = c.call_with_timeout(request, Duration::from_secs(3)).await;
            }
        });
        futures_util::future::join_all(calls).await;
    });
}

/// Removes expired members every quarter of the expiry and notifies the rest.
pub(crate) async fn run_expiry(groups: Arc<Groups>, shutdown: tokio_util::sync::CancellationToken) {
    let period = (groups.expiry / 4).max(Duration::from_millis(50));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = shutdown.cancelled() => return,
        }
        notify(groups.expire());
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use tokio_util::sync::CancellationToken;
    use txmq_protocol::{
        ErrorCode, Hello, QueueRef, Request, Response, Role, Subscription, WireError,
        PROTOCOL_VERSION,
    };
    use txmq_remoting::connection_types::BoxFuture;
    use txmq_remoting::{Connection, ConnectionConfig, Service};

    use super::{allocate, Beat, Groups, Refusal};

    struct Nothing;

    impl Service for Nothing {
        fn call(&self, _: &Connection, _: Request) -> BoxFuture<Result<Response, WireError>> {
            Box::pin(std::future::ready(Err(WireError::new(
                ErrorCode::UnsupportedRequest,
                "nothing served",
            ))))
        }
    }

    /// `n` loopback connections (the table only keeps them, for their ids
    /// and for notices).
    async fn connections(n: usize) -> Vec<Connection> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(txmq_remoting::server::serve(
            listener,
            Arc::new(Nothing),
            ConnectionConfig::default(),
            CancellationToken::new(),
        ));
        let mut conns = Vec::new();
        for i in 0..n {
            let hello = Hello {
                version: PROTOCOL_VERSION,
                role: Role::Consumer,
                client_id: format!("c{i}"),
                group: Some("g".into()),
            };
            conns.push(
                Connection::connect(&addr, hello, None, ConnectionConfig::default())
                    .await
                    .unwrap(),
            );
        }
        conns
    }

    /// A heartbeat of `id` on `conn` for topic "t" (2 queues here), holding
    /// `held`, with `read` saying whether the group read a queue here;
    /// returns the queues assigned.
    fn beat(groups: &Groups, conn: &Connection, id: &str, held: &[u32], read: bool) -> Vec<u32> {
        beat_told(groups, conn, id, held, read).0
    }

    /// As [`beat`], with whether the member is told it had expired.
    fn beat_told(
        groups: &Groups,
        conn: &Connection,
        id: &str,
        held: &[u32],
        read: bool,
    ) -> (Vec<u32>, bool) {
        let beat = Beat {
            group: "g".into(),
            client_id: id.into(),
            subscriptions: vec![Subscription {
                topic: "t".into(),
                expression: "*".into(),
            }],
            broadcast: false,
            held: held
                .iter()
                .map(|&queue| QueueRef {
                    topic: "t".into(),
                    queue,
                })
                .collect(),
        };
        let (assigned, _, expired) = groups.heartbeat(conn, beat, |_| Some(2), |_, _| read);
        (assigned.into_iter().map(|q| q.queue).collect(), expired)
    }

    const LONG: Duration = Duration::from_secs(600);

    #[tokio::test]
    async fn after_a_start_a_queue_read_here_goes_only_to_its_holder() {
        let c = connections(2).await;
        let groups = Groups::new(LONG);
        assert_eq!(beat(&groups, &c[1], "b", &[], true), Vec::<u32>::new());
        assert_eq!(
            groups.may_pull("g", "a", "t", 0),
            Err(Refusal::NotMember),
            "a has not heartbeated since the start"
        );
        assert_eq!(beat(&groups, &c[0], "a", &[0], true), [0]);
        assert_eq!(groups.may_pull("g", "a", "t", 0), Ok(()));
        assert_eq!(groups.may_pull("g", "b", "t", 0), Err(Refusal::NotOwner));
        // Queue 1 is b's share, but a member the broker does not know yet
        // may be reading it.
        assert_eq!(beat(&groups, &c[1], "b", &[], true), Vec::<u32>::new());

        // A queue the group never read here is assigned at once.
        let fresh = Groups::new(LONG);
        assert_eq!(beat(&fresh, &c[1], "b", &[], false), [0, 1]);
    }

    /// After a clean stop only the queues that had a reader then wait for
    /// it: a group whose consumers had all left got nothing for one
    /// consumer expiry after every restart.
    #[tokio::test]
    async fn after_a_clean_stop_only_the_queues_read_then_wait_for_their_reader() {
        let c = connections(2).await;
        let dir = tempfile::tempdir().unwrap();
        let before = Groups::new(LONG).remembering_stops(None);
        assert_eq!(beat(&before, &c[0], "a", &[], false), [0, 1]);
        before.write_held_at_stop(dir.path(), Vec::new());

        let held = super::take_held_at_stop(dir.path(), true);
        assert!(
            super::take_held_at_stop(dir.path(), true).is_none(),
            "taken once"
        );
        let after = Groups::new(LONG).remembering_stops(held);
        // Both queues had a reader (a owned both) and wait for it.
        assert_eq!(beat(&after, &c[1], "b", &[], true), Vec::<u32>::new());

        // A stop with no member left frees every queue at the start.
        after.leave("g", "b");
        let empty = Groups::new(LONG).remembering_stops(None);
        empty.write_held_at_stop(dir.path(), Vec::new());
        let after = Groups::new(LONG).remembering_stops(super::take_held_at_stop(dir.path(), true));
        assert_eq!(beat(&after, &c[1], "b", &[], true), [0, 1]);

        // A stop within the start grace of a start that knew nothing (a
        // crash before): a queue read here that nobody claimed since may
        // still have its reader out there, and waits at the next start.
        let after_crash = Groups::new(LONG).remembering_stops(None);
        after_crash.write_held_at_stop(dir.path(), vec![("g".into(), "t".into(), 1)]);
        let after = Groups::new(LONG).remembering_stops(super::take_held_at_stop(dir.path(), true));
        assert_eq!(beat(&after, &c[1], "b", &[], true), [0]);

        // Not remembered (a crash, a controller's broker): every queue
        // read here waits, as before.
        let unknown =
            Groups::new(LONG).remembering_stops(super::take_held_at_stop(dir.path(), true));
        assert_eq!(beat(&unknown, &c[1], "b", &[], true), Vec::<u32>::new());
    }

    #[tokio::test]
    async fn after_a_start_a_queue_whose_reader_left_since_is_assigned_at_once() {
        let c = connections(2).await;
        let groups = Groups::new(LONG);
        assert_eq!(beat(&groups, &c[0], "a", &[0, 1], true), [0, 1]);
        groups.leave("g", "a");
        groups.expire();
        assert_eq!(beat(&groups, &c[1], "b", &[], true), [0, 1]);
    }

    #[tokio::test]
    async fn after_the_start_grace_queues_are_assigned_as_usual() {
        let c = connections(2).await;
        let groups = Groups::new(Duration::from_millis(30));
        assert_eq!(beat(&groups, &c[0], "a", &[0], true), [0]);
        assert_eq!(beat(&groups, &c[1], "b", &[], true), Vec::<u32>::new());
        tokio::time::sleep(Duration::from_millis(40)).await;
        groups.expire();
        assert_eq!(beat(&groups, &c[1], "b", &[], true), [0, 1]);
    }

    #[tokio::test]
    async fn a_closed_members_queues_wait_for_it_and_it_keeps_what_it_holds() {
        let c = connections(3).await;
        let groups = Groups::new(LONG);
        assert_eq!(beat(&groups, &c[0], "a", &[], false), [0, 1]);
        assert_eq!(beat(&groups, &c[1], "b", &[], false), Vec::<u32>::new());
        groups.connection_closed(c[0].id());
        assert_eq!(groups.may_pull("g", "a", "t", 0), Err(Refusal::NotMember));
        assert_eq!(
            beat(&groups, &c[1], "b", &[], false),
            Vec::<u32>::new(),
            "a may still handle both"
        );
        // a is back on a new connection, still reading queue 0 only: queue
        // 1 is free at once.
        assert_eq!(beat(&groups, &c[2], "a", &[0], false), [0]);
        assert_eq!(groups.may_pull("g", "a", "t", 0), Ok(()));
        assert_eq!(beat(&groups, &c[1], "b", &[], false), [1]);
    }

    #[tokio::test]
    async fn a_closed_members_queues_move_when_the_expiry_has_passed() {
        let c = connections(2).await;
        let groups = Groups::new(Duration::from_millis(200));
        assert_eq!(beat(&groups, &c[0], "a", &[], false), [0, 1]);
        assert_eq!(beat(&groups, &c[1], "b", &[], false), Vec::<u32>::new());
        groups.connection_closed(c[0].id());
        assert_eq!(beat(&groups, &c[1], "b", &[], false), Vec::<u32>::new());
        tokio::time::sleep(Duration::from_millis(150)).await;
        // b heartbeats within its expiry; the reservation runs out later.
        assert_eq!(beat(&groups, &c[1], "b", &[], false), Vec::<u32>::new());
        tokio::time::sleep(Duration::from_millis(100)).await;
        let notices = groups.expire();
        assert!(
            notices.iter().any(|(_, conn)| conn.id() == c[1].id()),
            "b is told that queues are free"
        );
        assert_eq!(beat(&groups, &c[1], "b", &[], false), [0, 1]);
    }

    /// A member that expired, or did not come back for its reserved queues
    /// in time, is told so at its next heartbeat, once; one that only
    /// reconnected in time, or left, is not.
    #[tokio::test]
    async fn a_member_back_after_it_expired_is_told_so_once() {
        let c = connections(3).await;
        let groups = Groups::new(Duration::from_millis(100));
        let told =
            |conn: &Connection, id: &str, held: &[u32]| beat_told(&groups, conn, id, held, false).1;
        assert!(!told(&c[0], "a", &[]));
        assert!(!told(&c[1], "b", &[]));
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(!told(&c[1], "b", &[]));
        tokio::time::sleep(Duration::from_millis(60)).await;
        groups.expire();
        assert!(told(&c[0], "a", &[0]), "a expired");
        assert!(!told(&c[0], "a", &[0]), "told once");
        // b's connection closes; back in time, it keeps its queues.
        groups.connection_closed(c[1].id());
        assert!(!told(&c[2], "b", &[1]));
        // a's closes, and it is not back before its reservation ends.
        groups.connection_closed(c[0].id());
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert!(!told(&c[2], "b", &[1]));
        groups.expire();
        assert!(told(&c[2], "a", &[0]), "a's reservation ran out");
        groups.leave("g", "a");
        assert!(!told(&c[2], "a", &[]), "a left: nothing to tell");
    }

    #[tokio::test]
    async fn a_leaving_member_frees_its_queues_at_once() {
        let c = connections(2).await;
        let groups = Groups::new(LONG);
        assert_eq!(beat(&groups, &c[0], "a", &[], false), [0, 1]);
        assert_eq!(beat(&groups, &c[1], "b", &[], false), Vec::<u32>::new());
        groups.leave("g", "a");
        assert_eq!(beat(&groups, &c[1], "b", &[], false), [0, 1]);
    }

    #[test]
    fn allocated_to_inverts_allocate() {
        for queues in 0..40u32 {
            for members in 1..9usize {
                for i in 0..members {
                    for q in allocate(queues, members, i) {
                        assert_eq!(
                            super::allocated_to(queues, members, q),
                            Some(i),
                            "{queues} {members} {q}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn allocation_covers_every_queue_once() {
        for queues in 0..20u32 {
            for members in 1..7usize {
                let mut seen = vec![0; queues as usize];
                for i in 0..members {
                    let r = allocate(queues, members, i);
                    assert!(r.len() as u32 <= queues / members as u32 + 1);
                    for q in r {
                        seen[q as usize] += 1;
                    }
                }
                assert!(seen.iter().all(|&n| n == 1), "{queues} {members}");
            }
        }
        assert_eq!(allocate(8, 3, 0), 0..3);
        assert_eq!(allocate(8, 3, 1), 3..6);
        assert_eq!(allocate(8, 3, 2), 6..8);
        assert_eq!(allocate(2, 3, 2), 2..2);
    }
}
