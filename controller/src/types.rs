//! The Raft type configuration: what travels through the controller's log.

use std::io::Cursor;

use serde::{Deserialize, Serialize};

use crate::state::Command;

openraft::declare_raft_types!(
    /// The controller's Raft types: members are `u64` ids with their
    /// controller-listen address, log entries carry [`Command`]s.
    pub TypeConfig:
        D = Command,
        R = Outcome,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// What applying a [`Command`] did. A refusal is not an error of Raft: the
/// entry is committed either way, it just changed nothing, and the
/// proposer turns the refusal into the matching wire error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// The command changed the group (or a non-command entry was applied).
    Applied,
    /// The command's epoch or master is not the group's current one.
    StaleEpoch {
        /// The group's epoch at apply time.
        epoch: u64,
        /// The group's master at apply time.
        master: Option<String>,
    },
    /// Another precondition failed; the reason, for a person.
    Refused(String),
}

/// openraft's log id with our node id.
pub type LogId = openraft::LogId<u64>;
/// openraft's vote with our node id.
pub type Vote = openraft::Vote<u64>;
/// A log entry.
pub type Entry = openraft::Entry<TypeConfig>;
/// A storage error.
pub type StorageError = openraft::StorageError<u64>;
/// The Raft handle.
pub type Raft = openraft::Raft<TypeConfig>;
/// Membership as stored in the state machine.
pub type StoredMembership = openraft::StoredMembership<u64, openraft::BasicNode>;
