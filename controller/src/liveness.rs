//! Which replicas are alive: the Raft leader's memory of heartbeats.
//!
//! Liveness is not replicated (heartbeats never go through Raft): a member
//! that becomes leader starts with an empty table and gives every known
//! replica a grace of one master expiry to heartbeat it.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;
use txmq_protocol::ControllerReplica;

use crate::state::GroupRecord;

/// The last heartbeat of one replica.
#[derive(Debug, Clone)]
pub(crate) struct Seen {
    pub(crate) at: Instant,
    /// The epoch it said it is master of (0: none).
    pub(crate) master_epoch: u64,
    pub(crate) log_end: u64,
    /// The group version it knew when it sent the heartbeat.
    pub(crate) known_version: u64,
    /// The connection it came on, and whether that is still open.
    pub(crate) conn: u64,
    pub(crate) open: bool,
}

/// The leader's liveness table.
#[derive(Debug, Default)]
pub(crate) struct Liveness {
    /// The term this table belongs to, and when this member became its leader.
    term: Option<(u64, Instant)>,
    seen: HashMap<(String, String), Seen>,
    /// Planned switches in progress: when this leader saw them start.
    pub(crate) drains: HashMap<String, Instant>,
    /// When "no in-sync replica is alive" was last logged, per group.
    pub(crate) last_warned: HashMap<String, Instant>,
}

impl Liveness {
    /// Starts a new table when `term` is not the one it belongs to (this
    /// member just became leader).
    pub(crate) fn ensure_term(&mut self, term: u64, now: Instant) {
        if self.term.map(|(t, _)| t) != Some(term) {
            *self = Liveness {
                term: Some((term, now)),
                ..Liveness::default()
            };
        }
    }

    pub(crate) fn record(&mut self, group: &str, addr: &str, seen: Seen) {
        self.seen
            .insert((group.to_string(), addr.to_string()), seen);
    }

    /// A connection closed: every replica that last heartbeated on it is
    /// dead at once. Returns whether any was.
    pub(crate) fn connection_closed(&mut self, conn: u64) -> bool {
        let mut any = false;
        for s in self.seen.values_mut().filter(|s| s.conn == conn && s.open) {
            s.open = false;
            any = true;
        }
        any
    }

    pub(crate) fn seen(&self, group: &str, addr: &str) -> Option<&Seen> {
        self.seen.get(&(group.to_string(), addr.to_string()))
    }

    /// Whether `addr` of `group` is alive now.
    pub(crate) fn alive(&self, group: &str, addr: &str, now: Instant, expiry: Duration) -> bool {
        match self.seen(group, addr) {
            Some(s) => s.open && now.saturating_duration_since(s.at) <= expiry,
            None => self.in_grace(now, expiry),
        }
    }

    fn in_grace(&self, now: Instant, expiry: Duration) -> bool {
        self.term
            .is_some_and(|(_, since)| now.saturating_duration_since(since) <= expiry)
    }

    /// Whether the group's master is alive and still master of the
    /// group's epoch. A heartbeat sent before the current election (its
    /// known version predates it) cannot say the new epoch yet; a fresh
    /// process (known version 0) that says no epoch is a restarted master,
    /// whose epoch is over.
    pub(crate) fn master_live(
        &self,
        group: &str,
        g: &GroupRecord,
        now: Instant,
        expiry: Duration,
    ) -> bool {
        let Some(master) = g.master.as_deref() else {
            return false;
        };
        if !self.alive(group, master, now, expiry) {
            return false;
        }
        match self.seen(group, master) {
            Some(s) => {
                s.master_epoch == g.epoch || (s.known_version > 0 && s.known_version < g.elected_at)
            }
            None => true, // in grace
        }
    }

    /// The log end a replica last reported (0 when not heard from).
    pub(crate) fn log_end(&self, group: &str, addr: &str) -> u64 {
        self.seen(group, addr).map(|s| s.log_end).unwrap_or(0)
    }

    /// The replicas of a group as reported to brokers and admins.
    pub(crate) fn replicas(
        &self,
        group: &str,
        g: &GroupRecord,
        now: Instant,
        expiry: Duration,
    ) -> Vec<ControllerReplica> {
        g.replicas
            .iter()
            .map(|addr| {
                let seen = self.seen(group, addr);
                ControllerReplica {
                    addr: addr.clone(),
                    alive: self.alive(group, addr, now, expiry),
                    last_heartbeat_ms_ago: seen
                        .map(|s| now.saturating_duration_since(s.at).as_millis() as u64)
                        .unwrap_or(u64::MAX),
                    log_end: seen.map(|s| s.log_end).unwrap_or(0),
                }
            })
            .collect()
    }

    /// The best of `candidates` to elect: the longest log, then the smallest address.
    pub(crate) fn best<'a>(
        &self,
        group: &str,
        candidates: impl Iterator<Item = &'a String>,
    ) -> Option<String> {
        candidates
            .max_by(|a, b| {
                self.log_end(group, a)
                    .cmp(&self.log_end(group, b))
                    .then_with(|| b.cmp(a))
            })
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(at: Instant, master_epoch: u64, known_version: u64, conn: u64) -> Seen {
        Seen {
            at,
            master_epoch,
            log_end: 0,
            known_version,
            conn,
            open: true,
        }
    }

    #[test]
    fn silence_or_a_closed_connection_is_death_and_a_new_leader_gives_grace() {
        let t0 = Instant::now();
        let exp = Duration::from_secs(5);
        let mut l = Liveness::default();
        l.ensure_term(1, t0);
        assert!(l.alive("g", "a", t0 + Duration::from_secs(4), exp), "grace");
        assert!(!l.alive("g", "a", t0 + Duration::from_secs(6), exp));
        l.record("g", "a", seen(t0, 0, 0, 7));
        assert!(l.alive("g", "a", t0 + exp, exp));
        assert!(!l.alive("g", "a", t0 + exp + Duration::from_millis(1), exp));
        assert!(l.connection_closed(7));
        assert!(!l.alive("g", "a", t0, exp));
        // A new term forgets everything.
        l.ensure_term(2, t0);
        assert!(l.seen("g", "a").is_none());
    }

    #[test]
    fn a_restarted_master_is_not_live_but_one_not_told_yet_is() {
        let t0 = Instant::now();
        let exp = Duration::from_secs(5);
        let mut l = Liveness::default();
        l.ensure_term(1, t0);
        let g = GroupRecord {
            master: Some("a".into()),
            epoch: 3,
            elected_at: 20,
            ..GroupRecord::default()
        };
        l.record("g", "a", seen(t0, 3, 20, 1));
        assert!(l.master_live("g", &g, t0, exp));
        // Sent before the election at index 20: it could not know.
        l.record("g", "a", seen(t0, 2, 19, 1));
        assert!(l.master_live("g", &g, t0, exp));
        // Knows the election, yet is not master of epoch 3: over.
        l.record("g", "a", seen(t0, 0, 20, 1));
        assert!(!l.master_live("g", &g, t0, exp));
        // A fresh process.
        l.record("g", "a", seen(t0, 0, 0, 2));
        assert!(!l.master_live("g", &g, t0, exp));
    }
}
