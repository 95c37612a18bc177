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
