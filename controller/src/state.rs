//! The replicated state: every broker group's master, epoch and in-sync
//! set, and the commands that change them.
//!
//! Applying a command is deterministic and checks its preconditions at
//! apply time (not at proposal time): two commands proposed from the same
//! view, say two elections, cannot both win, since the second one's
//! expected epoch is stale once the first is applied.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::types::Outcome;

/// One broker group as the controller decided it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRecord {
    /// The master (none before the first election).
    pub master: Option<String>,
    /// The master's epoch: raised by every election (0: never elected).
    pub epoch: u64,
    /// Replicas that hold every acknowledged record; the master's included.
    pub in_sync: BTreeSet<String>,
    /// Every replica ever heard from.
    pub replicas: BTreeSet<String>,
    /// A planned switch in progress: the replica to elect once the master drained.
    pub draining: Option<String>,
    /// The Raft log index of the entry that last changed the group.
    pub version: u64,
    /// The Raft log index of the election that started the current epoch
    /// (a heartbeat sent before it cannot know about it).
    pub elected_at: u64,
}

/// A change proposed through Raft.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// A replica heard from for the first time (creates the group too).
    AddReplica {
        /// The broker group.
        group: String,
        /// The replica's address.
        addr: String,
    },
    /// Elect `master`, if the group's epoch is still `expected_epoch`.
    Elect {
        /// The broker group.
        group: String,
        /// The epoch the proposer saw.
        expected_epoch: u64,
        /// The new master.
        master: String,
        /// The new in-sync set (the master's included).
        in_sync: BTreeSet<String>,
    },
    /// The master changes the in-sync set.
    AlterInSync {
        /// The broker group.
        group: String,
        /// The master asking.
        master: String,
        /// Its epoch.
        epoch: u64,
        /// The new set (contains the master).
        in_sync: BTreeSet<String>,
    },
    /// Start (`Some`) or give up (`None`) a planned switch to `target`.
    Drain {
        /// The broker group.
        group: String,
        /// The epoch of the master asked to drain.
        epoch: u64,
        /// The replica to elect once drained.
        target: Option<String>,
    },
}

impl std::fmt::Display for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self:?}")
    }
}

/// Every broker group, by name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControllerState {
    /// The groups.
    pub groups: BTreeMap<String, GroupRecord>,
}

impl ControllerState {
    /// Applies `command`, the entry at Raft log `index`, if its
    /// preconditions hold; otherwise changes nothing and says why.
    pub fn apply(&mut self, command: &Command, index: u64) -> Outcome {
        match command {
            Command::AddReplica { group, addr } => {
                let g = self.groups.entry(group.clone()).or_default();
                if g.replicas.insert(addr.clone()) {
                    g.version = index;
                }
                Outcome::Applied
            }
            Command::Elect {
                group,
                expected_epoch,
                master,
                in_sync,
            } => {
                let Some(g) = self.groups.get_mut(group) else {
                    return Outcome::Refused(format!("unknown broker group '{group}'"));
                };
                if g.epoch != *expected_epoch {
                    return stale(g);
                }
                if !g.replicas.contains(master) {
                    return Outcome::Refused(format!("'{master}' is not a replica of '{group}'"));
                }
                if !in_sync.contains(master) || !in_sync.is_subset(&g.replicas) {
                    return Outcome::Refused(format!(
                        "in-sync set {in_sync:?} must hold the master and only replicas of '{group}'"
                    ));
                }
                g.master = Some(master.clone());
                g.epoch = expected_epoch + 1;
                g.in_sync = in_sync.clone();
                g.draining = None;
                g.version = index;
                g.elected_at = index;
                Outcome::Applied
            }
            Command::AlterInSync {
                group,
                master,
                epoch,
                in_sync,
            } => {
                let Some(g) = self.groups.get_mut(group) else {
                    return Outcome::Refused(format!("unknown broker group '{group}'"));
                };
                if g.epoch != *epoch || g.master.as_deref() != Some(master.as_str()) {
                    return stale(g);
                }
                if !in_sync.contains(master) {
                    return Outcome::Refused(format!(
                        "the in-sync set must contain the master '{master}'"
                    ));
                }
                if let Some(unknown) = in_sync.iter().find(|a| !g.replicas.contains(*a)) {
                    return Outcome::Refused(format!(
                        "'{unknown}' is not a known replica of '{group}'"
                    ));
                }
                if g.in_sync != *in_sync {
                    g.in_sync = in_sync.clone();
                    g.version = index;
                }
                Outcome::Applied
            }
            Command::Drain {
                group,
                epoch,
                target,
            } => {
                let Some(g) = self.groups.get_mut(group) else {
                    return Outcome::Refused(format!("unknown broker group '{group}'"));
                };
                if g.epoch != *epoch {
                    return stale(g);
                }
                if g.draining != *target {
                    g.draining = target.clone();
                    g.version = index;
                }
                Outcome::Applied
            }
        }
    }
}

fn stale(g: &GroupRecord) -> Outcome {
    Outcome::StaleEpoch {
        epoch: g.epoch,
        master: g.master.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(items: &[&str]) -> BTreeSet<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    fn with_replicas(addrs: &[&str]) -> ControllerState {
        let mut s = ControllerState::default();
        for (i, a) in addrs.iter().enumerate() {
            let c = Command::AddReplica {
                group: "g".into(),
                addr: a.to_string(),
            };
            assert_eq!(s.apply(&c, i as u64 + 1), Outcome::Applied);
        }
        s
    }

    fn elect(expected_epoch: u64, master: &str, in_sync: &[&str]) -> Command {
        Command::Elect {
            group: "g".into(),
            expected_epoch,
            master: master.into(),
            in_sync: set(in_sync),
        }
    }

    #[test]
    fn election_raises_the_epoch_and_a_stale_expected_epoch_is_refused() {
        let mut s = with_replicas(&["a", "b"]);
        assert_eq!(s.apply(&elect(0, "a", &["a"]), 10), Outcome::Applied);
        let g = &s.groups["g"];
        assert_eq!(
            (g.master.as_deref(), g.epoch, g.version),
            (Some("a"), 1, 10)
        );
        // A second election proposed from the same (old) view loses.
        let before = s.clone();
        assert_eq!(
            s.apply(&elect(0, "b", &["b"]), 11),
            Outcome::StaleEpoch {
                epoch: 1,
                master: Some("a".into())
            }
        );
        assert_eq!(s, before, "a refused command changes nothing");
    }

    #[test]
    fn election_of_an_unknown_replica_is_refused() {
        let mut s = with_replicas(&["a"]);
        assert!(matches!(
            s.apply(&elect(0, "zz", &["zz"]), 5),
            Outcome::Refused(_)
        ));
        assert_eq!(s.groups["g"].epoch, 0);
    }

    #[test]
    fn alter_in_sync_only_from_the_current_master_and_epoch() {
        let mut s = with_replicas(&["a", "b", "c"]);
        s.apply(&elect(0, "a", &["a"]), 4);
        let alter = |master: &str, epoch, in_sync: &[&str]| Command::AlterInSync {
            group: "g".into(),
            master: master.into(),
            epoch,
            in_sync: set(in_sync),
        };
        assert_eq!(s.apply(&alter("a", 1, &["a", "b"]), 5), Outcome::Applied);
        assert_eq!(s.groups["g"].in_sync, set(&["a", "b"]));
        s.apply(&elect(1, "b", &["b"]), 6);
        // The old master (epoch 1) is fenced.
        assert_eq!(
            s.apply(&alter("a", 1, &["a", "b", "c"]), 7),
            Outcome::StaleEpoch {
                epoch: 2,
                master: Some("b".into())
            }
        );
        // Right epoch, wrong master: also stale.
        assert!(matches!(
            s.apply(&alter("a", 2, &["a"]), 8),
            Outcome::StaleEpoch { .. }
        ));
        // A set without the master, or with strangers, is refused.
        assert!(matches!(
            s.apply(&alter("b", 2, &["c"]), 9),
            Outcome::Refused(_)
        ));
        assert!(matches!(
            s.apply(&alter("b", 2, &["b", "x"]), 9),
            Outcome::Refused(_)
        ));
        assert_eq!(s.groups["g"].in_sync, set(&["b"]));
        assert_eq!(s.groups["g"].version, 6);
    }

    #[test]
    fn drain_needs_the_current_epoch_and_an_election_clears_it() {
        let mut s = with_replicas(&["a", "b"]);
        s.apply(&elect(0, "a", &["a", "b"]), 3);
        let drain = |epoch| Command::Drain {
            group: "g".into(),
            epoch,
            target: Some("b".into()),
        };
        assert!(matches!(s.apply(&drain(0), 4), Outcome::StaleEpoch { .. }));
        assert_eq!(s.apply(&drain(1), 5), Outcome::Applied);
        assert_eq!(s.groups["g"].draining.as_deref(), Some("b"));
        s.apply(&elect(1, "b", &["b"]), 6);
        assert_eq!(s.groups["g"].draining, None);
    }
}
