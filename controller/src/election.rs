//! The leader's election task: every ~100 ms (and at once when a master's
//! connection closes or a replica appears) it looks at every group and
//! proposes an election where one is due.
//!
//! Rules, per group:
//! - never elected (epoch 0): elect the alive replica with the longest log;
//! - master not live (silent, connection closed, or restarted: alive but no
//!   longer master of the group's epoch): elect the in-sync, alive replica
//!   with the longest log (the old master too, when it came back); with
//!   none, and `unclean_election`, any alive replica; else wait and warn;
//! - a planned switch (`draining`) whose master does not report drained in
//!   time: elect the target anyway if it is still alive and in sync, else
//!   give the switch up.
//!
//! Ties on the log end go to the smallest address, so every leader decides
//! alike. The proposal carries the epoch it was decided on: if anything
//! changed meanwhile, applying it is refused and the next tick decides again.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::controller::Inner;
use crate::liveness::Liveness;
use crate::state::{Command, GroupRecord};
use crate::types::Outcome;

const TICK: Duration = Duration::from_millis(100);
/// How often "no in-sync replica is alive" is logged per group.
const WARN_EVERY: Duration = Duration::from_secs(10);

pub(crate) async fn run(inner: Arc<Inner>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(TICK) => {}
            _ = inner.wake.notified() => {}
        }
        let Some(term) = inner.leading_term() else {
            continue;
        };
        let groups = inner.shared.lock().state.groups.clone();
        let mut proposals = Vec::new();
        {
            let mut live = inner.live();
            let now = Instant::now();
            live.ensure_term(term, now);
            for (name, g) in &groups {
                if let Some(p) = decide(&mut live, &inner.config, name, g, now) {
                    proposals.push(p);
                }
            }
        }
        // A member shutting down closes its brokers' connections, and each
        // close marks a replica dead and wakes this task: what it decided
        // since the shutdown began is about its own going, not the
        // brokers'. (The closes come after the cancellation, and are seen
        // through the liveness lock, so the cancellation is seen here.)
        if shutdown.is_cancelled() {
            break;
        }
        for (command, why) in proposals {
            let desc = command.clone();
            match inner.propose(command).await {
                Ok((Outcome::Applied, index)) => log_applied(&desc, why, index),
                Ok((refused, _)) => {
                    tracing::debug!(?desc, ?refused, "election proposal lost to a newer change")
                }
                Err(e) => warn!(?desc, error = %e, "cannot propose an election"),
            }
        }
    }
}

fn log_applied(command: &Command, why: &str, index: u64) {
    match command {
        Command::Elect {
            group,
            expected_epoch,
            master,
            in_sync,
        } => info!(
            group = %group,
            master = %master,
            epoch = expected_epoch + 1,
            in_sync = ?in_sync,
            reason = why,
            index,
            "elected a new master"
        ),
        Command::Drain { group, target, .. } => {
            info!(group = %group, ?target, reason = why, "planned switch given up")
        }
        other => info!(?other, reason = why, "applied"),
    }
}

/// What (if anything) to propose for one group now.
pub(crate) fn decide(
    live: &mut Liveness,
    config: &crate::ControllerConfig,
    name: &str,
    g: &GroupRecord,
    now: Instant,
) -> Option<(Command, &'static str)> {
    let expiry = config.master_expiry;
    let alive = |live: &Liveness, a: &String| live.alive(name, a, now, expiry);
    let elect = |master: String, in_sync: BTreeSet<String>| Command::Elect {
        group: name.to_string(),
        expected_epoch: g.epoch,
        master,
        in_sync,
    };
    let successor_set = |candidate: &String| -> BTreeSet<String> {
        let mut s = g.in_sync.clone();
        if g.master.as_ref() != Some(candidate) {
            if let Some(old) = &g.master {
                s.remove(old);
            }
            s.insert(candidate.clone());
        }
        s
    };

    if g.master.is_none() {
        let best = live.best(name, g.replicas.iter().filter(|a| alive(live, a)))?;
        return Some((elect(best.clone(), BTreeSet::from([best])), "first master"));
    }

    let master_live = live.master_live(name, g, now, expiry);
    if let Some(target) = &g.draining {
        let started = *live.drains.entry(name.to_string()).or_insert(now);
        let target_ok = alive(live, target) && g.in_sync.contains(target);
        if master_live {
            if now.saturating_duration_since(started) < config.drain_timeout {
                return None;
            }
            return Some(if target_ok {
                (
                    elect(target.clone(), successor_set(target)),
                    "planned switch: drain timed out",
                )
            } else {
                (
                    Command::Drain {
                        group: name.to_string(),
                        epoch: g.epoch,
                        target: None,
                    },
                    "planned switch: target no longer alive and in sync",
                )
            });
        }
        if target_ok {
            return Some((
                elect(target.clone(), successor_set(target)),
                "planned switch: master gone",
            ));
        }
        // Target gone too: fall through to an ordinary election.
    } else {
        live.drains.remove(name);
    }
    if master_live {
        return None;
    }

    let in_sync_alive = g.in_sync.iter().filter(|a| alive(live, a));
    if let Some(best) = live.best(name, in_sync_alive) {
        let set = successor_set(&best);
        return Some((elect(best, set), "master not live"));
    }
    if config.unclean_election {
        if let Some(best) = live.best(name, g.replicas.iter().filter(|a| alive(live, a))) {
            warn!(
                group = %name,
                replica = %best,
                "unclean election: no in-sync replica is alive; electing one outside the in-sync set (acknowledged records may be lost)"
            );
            return Some((
                elect(best.clone(), BTreeSet::from([best])),
                "unclean election",
            ));
        }
    }
    let due = live
        .last_warned
        .get(name)
        .is_none_or(|t| now.saturating_duration_since(*t) >= WARN_EVERY);
    if due {
        live.last_warned.insert(name.to_string(), now);
        warn!(
            group = %name,
            master = ?g.master,
            in_sync = ?g.in_sync,
            "master is not live and no in-sync replica is alive; not electing (unclean election is off)"
        );
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::liveness::Seen;

    fn config(unclean: bool) -> crate::ControllerConfig {
        let mut c =
            crate::ControllerConfig::new(1, "127.0.0.1:0", Default::default(), "/tmp/unused");
        c.master_expiry = Duration::from_secs(5);
        c.unclean_election = unclean;
        c
    }

    fn set(items: &[&str]) -> BTreeSet<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    fn hb(live: &mut Liveness, addr: &str, at: Instant, master_epoch: u64, log_end: u64) {
        live.record(
            "g",
            addr,
            Seen {
                at,
                master_epoch,
                log_end,
                known_version: 10,
                conn: 1,
                open: true,
            },
        );
    }

    fn group(master: &str, in_sync: &[&str], replicas: &[&str]) -> GroupRecord {
        GroupRecord {
            master: Some(master.into()),
            epoch: 3,
            in_sync: set(in_sync),
            replicas: set(replicas),
            version: 5,
            elected_at: 5,
            draining: None,
        }
    }

    fn elected(d: Option<(Command, &'static str)>) -> Option<(String, BTreeSet<String>)> {
        match d? {
            (
                Command::Elect {
                    master,
                    in_sync,
                    expected_epoch,
                    ..
                },
                _,
            ) => {
                assert_eq!(expected_epoch, 3);
                Some((master, in_sync))
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn the_longest_in_sync_log_wins_and_ties_go_to_the_smallest_address() {
        let t0 = Instant::now();
        // Past the new leader's grace: only heartbeats count.
        let now = t0 + Duration::from_secs(10);
        let mut live = Liveness::default();
        live.ensure_term(1, t0);
        let g = group("a", &["a", "b", "c"], &["a", "b", "c", "d"]);
        hb(&mut live, "b", now, 0, 50);
        hb(&mut live, "c", now, 0, 50);
        hb(&mut live, "d", now, 0, 99); // not in sync: never chosen
        let (m, s) = elected(decide(&mut live, &config(false), "g", &g, now)).unwrap();
        assert_eq!(m, "b");
        assert_eq!(s, set(&["b", "c"]));
        hb(&mut live, "c", now, 0, 51);
        assert_eq!(
            elected(decide(&mut live, &config(false), "g", &g, now))
                .unwrap()
                .0,
            "c"
        );
    }

    #[test]
    fn a_live_master_is_left_alone_and_a_restarted_one_is_reelected_keeping_the_set() {
        let t0 = Instant::now();
        let now = t0 + Duration::from_secs(10);
        let mut live = Liveness::default();
        live.ensure_term(1, t0);
        let g = group("a", &["a", "b"], &["a", "b"]);
        hb(&mut live, "a", now, 3, 100);
        hb(&mut live, "b", now, 0, 90);
        assert!(decide(&mut live, &config(false), "g", &g, now).is_none());
        // a restarted: alive, no longer master of epoch 3, longest log.
        hb(&mut live, "a", now, 0, 100);
        let (m, s) = elected(decide(&mut live, &config(false), "g", &g, now)).unwrap();
        assert_eq!((m.as_str(), s), ("a", set(&["a", "b"])));
    }

    #[test]
    fn without_a_live_in_sync_replica_only_unclean_election_elects() {
        let t0 = Instant::now();
        let now = t0 + Duration::from_secs(10);
        let mut live = Liveness::default();
        live.ensure_term(1, t0);
        let g = group("a", &["a", "b"], &["a", "b", "c"]);
        hb(&mut live, "c", now, 0, 1);
        assert!(decide(&mut live, &config(false), "g", &g, now).is_none());
        let (m, s) = elected(decide(&mut live, &config(true), "g", &g, now)).unwrap();
        assert_eq!((m.as_str(), s), ("c", set(&["c"])));
    }

    #[test]
    fn a_new_leader_waits_one_expiry_before_taking_a_silent_master_for_dead() {
        let t0 = Instant::now();
        let mut live = Liveness::default();
        live.ensure_term(7, t0);
        let g = group("a", &["a", "b"], &["a", "b"]);
        let soon = t0 + Duration::from_secs(1);
        hb(&mut live, "b", soon, 0, 1);
        assert!(decide(&mut live, &config(false), "g", &g, soon).is_none());
        let later = t0 + Duration::from_secs(6);
        hb(&mut live, "b", later, 0, 1);
        assert_eq!(
            elected(decide(&mut live, &config(false), "g", &g, later))
                .unwrap()
                .0,
            "b"
        );
    }
}
