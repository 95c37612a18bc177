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

use std::collections::{BTreeMap, BTreeSet, HashMap};
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
}

impl Group {
    /// Clustering members subscribed to `topic`, sorted by id.
    fn subscribed(&self, topic: &str) -> Vec<String> {
        self.members
            .iter()
            .filter(|(_, m)| !m.broadcast && m.subscriptions.iter().any(|s| s.topic == topic))
            .map(|(id, _)| id.clone())
            .collect()
    }
}

/// The consumer groups of this broker.
pub(crate) struct Groups {
    groups: Mutex<HashMap<String, Group>>,
    expiry: Duration,
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
    pub(crate) fn new(expiry: Duration) -> Groups {
        Groups {
            groups: Mutex::new(HashMap::new()),
            expiry,
        }
    }

    /// Records a heartbeat and answers the member's queues on this broker.
    /// `queues` gives a topic's queue count here (`None`: not served here).
    /// Returns the assignment and the connections to notify of a change.
    pub(crate) fn heartbeat(
        &self,
        conn: &Connection,
        beat: Beat,
        queues: impl Fn(&str) -> Option<u32>,
    ) -> (Vec<QueueRef>, Notices) {
        let mut groups = lock(&self.groups);
        let group = groups.entry(beat.group.clone()).or_default();
        let now = Instant::now();
        let held: BTreeSet<QueueRef> = beat.held.into_iter().collect();
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
                    current = Some(beat.client_id.clone());
                }
                let keep = current.as_ref().is_some_and(|c| {
                    Some(c) == desired.as_ref()
                        || group.members.get(c).is_some_and(|m| m.held.contains(&q))
                });
                if !keep {
                    match desired {
                        Some(d) => {
                            if d != beat.client_id {
                                handed.insert(d.clone());
                            }
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
        (assigned, notices)
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

    /// Removes every member on a closed connection; returns the groups'
    /// connections to notify.
    pub(crate) fn connection_closed(&self, conn_id: u64) -> Notices {
        self.remove_where(|_, m| m.conn.id() == conn_id)
    }

    /// Removes members without a heartbeat within the expiry.
    pub(crate) fn expire(&self) -> Notices {
        let expiry = self.expiry;
        self.remove_where(|id, m| {
            let gone = m.last_seen.elapsed() > expiry;
            if gone {
                tracing::info!(client = %id, "consumer expired: no heartbeat within {expiry:?}");
            }
            gone
        })
    }

    fn remove_where(&self, gone: impl Fn(&str, &Member) -> bool) -> Notices {
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
                g.members.remove(id);
                release(g, id);
            }
            if !ids.is_empty() {
                notify.extend(others(name, g, ""));
            }
        }
        groups.retain(|_, g| !g.members.is_empty() || !g.owners.is_empty());
        notify
    }

    /// Whether `client_id` may read or commit a queue of `group`: yes unless
    /// the queue is owned by another member.
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
    use super::allocate;

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
