//! txmq-controller: elects the master of every broker group and fences the
//! old one with an epoch. The controller is a Raft group (on the `openraft`
//! crate) of 1, 3 or 5 members, embedded in the nameservers.
//!
//! Start reading at [`Controller`] (`controller.rs`: bind, run, leadership
//! and proposals). The replicated state and its commands are in
//! `state.rs`; `requests.rs` answers brokers and admins; `election.rs` is
//! the leader's task that elects masters; `liveness.rs` the leader's
//! in-memory heartbeat table. Raft plumbing: `log_store.rs` (durable log and
//! vote), `state_machine.rs` (applying entries, snapshots), `network.rs`
//! (Raft messages over txmq connections), `durable.rs` (on-disk framing).
//! `security.rs` holds TLS, the ACL file and the permission each request
//! needs ([`ClusterSecurity`]).
//!
//! What is replicated per group: the master, its epoch, the in-sync set,
//! the known replicas and a planned switch in progress. What is not:
//! liveness. Only the leader hears heartbeats; a new leader gives every
//! replica one master expiry to reach it before it takes anyone for dead.

#![warn(missing_docs)]

mod config;
mod controller;
mod durable;
mod election;
mod error;
mod liveness;
mod log_store;
mod network;
mod requests;
mod security;
mod state;
mod state_machine;
mod types;

pub use config::{parse_peers, ControllerConfig, DEFAULT_MASTER_EXPIRY};
pub use controller::{Controller, ControllerHandle};
pub use error::Error;
pub use log_store::LogStore;
pub use security::{ClusterSecurity, Permission};
pub use state::{Command, ControllerState, GroupRecord};
pub use state_machine::StateMachineStore;
pub use types::{Outcome, TypeConfig};
