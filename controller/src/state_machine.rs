//! The Raft state machine (openraft's [`RaftStateMachine`]): applies
//! committed [`Command`]s to the [`ControllerState`] and keeps snapshots.
//!
//! The state lives in memory, shared with the controller service through
//! [`Shared`], which also tells waiters (held heartbeats, elections in
//! progress) that something was applied. A snapshot is the MessagePack of
//! the whole state, persisted to `raft-snapshot` atomically; a restarted
//! member loads it, and openraft re-applies the committed entries after it.

use std::io::{self, Cursor};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::storage::{RaftStateMachine, Snapshot, SnapshotMeta};
use openraft::{AnyError, EntryPayload, OptionalSend, RaftSnapshotBuilder, StorageIOError};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::durable;
use crate::state::ControllerState;
use crate::types::{Entry, LogId, Outcome, StorageError, StoredMembership, TypeConfig};

const SNAPSHOT_FILE: &str = "raft-snapshot";

/// Everything the state machine holds; a snapshot is this, encoded.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct SmData {
    pub(crate) last_applied: Option<LogId>,
    pub(crate) membership: StoredMembership,
    pub(crate) state: ControllerState,
}

/// The applied state, shared between the state machine and the service.
#[derive(Debug)]
pub(crate) struct Shared {
    data: Mutex<SmData>,
    /// The last applied index, bumped on every apply or snapshot install.
    changed: watch::Sender<u64>,
}

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, SmData> {
        self.data.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A receiver that sees every apply.
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

/// The state machine store.
#[derive(Debug)]
pub struct StateMachineStore {
    shared: Arc<Shared>,
    dir: PathBuf,
}

/// Builds snapshots of the shared state.
#[derive(Debug)]
pub struct SnapshotBuilder {
    shared: Arc<Shared>,
    dir: PathBuf,
}

static SNAPSHOT_SEQ: AtomicU64 = AtomicU64::new(1);

#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<u64, openraft::BasicNode>,
    #[serde(with = "serde_bytes_compat")]
    data: Vec<u8>,
}

/// `Vec<u8>` as MessagePack binary instead of an array of integers.
mod serde_bytes_compat {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        Ok(bytes::Bytes::deserialize(d)?.to_vec())
    }
}

impl StateMachineStore {
    /// Opens the state machine in `dir`, starting from the persisted
    /// snapshot when there is one.
    ///
    /// # Errors
    /// I/O errors or a damaged snapshot file.
    pub(crate) fn open(dir: &Path) -> io::Result<(StateMachineStore, Arc<Shared>)> {
        std::fs::create_dir_all(dir)?;
        let data = match read_snapshot(dir)? {
            Some(s) => durable::decode::<SmData>(&s.data)?,
            None => SmData::default(),
        };
        let index = data.last_applied.map(|l| l.index).unwrap_or(0);
        let shared = Arc::new(Shared {
            data: Mutex::new(data),
            changed: watch::channel(index).0,
        });
        Ok((
            StateMachineStore {
                shared: shared.clone(),
                dir: dir.to_path_buf(),
            },
            shared,
        ))
    }
}

fn read_snapshot(dir: &Path) -> io::Result<Option<StoredSnapshot>> {
    durable::read_atomic(dir, SNAPSHOT_FILE)?
        .map(|b| durable::decode(&b))
        .transpose()
}

fn write_snapshot(dir: &Path, s: &StoredSnapshot) -> io::Result<()> {
    durable::write_atomic(dir, SNAPSHOT_FILE, &durable::encode(s)?)
}

fn sm_read_err(e: io::Error) -> StorageError {
    StorageIOError::read_state_machine(AnyError::new(&e)).into()
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    /// Returns once the snapshot is persisted (fsynced).
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let (data, meta) = {
            let d = self.shared.lock();
            let bytes = durable::encode(&*d).map_err(sm_read_err)?;
            let id = match d.last_applied {
                Some(l) => format!(
                    "{}-{}-{}",
                    l.leader_id.term,
                    l.index,
                    SNAPSHOT_SEQ.fetch_add(1, Ordering::Relaxed)
                ),
                None => format!("0-0-{}", SNAPSHOT_SEQ.fetch_add(1, Ordering::Relaxed)),
            };
            let meta = SnapshotMeta {
                last_log_id: d.last_applied,
                last_membership: d.membership.clone(),
                snapshot_id: id,
            };
            (bytes, meta)
        };
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data,
        };
        write_snapshot(&self.dir, &stored).map_err(|e| {
            StorageError::from(StorageIOError::write_snapshot(
                Some(meta.signature()),
                AnyError::new(&e),
            ))
        })?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(stored.data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let d = self.shared.lock();
        Ok((d.last_applied, d.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Outcome>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut out = Vec::new();
        let last = {
            let mut d = self.shared.lock();
            for e in entries {
                d.last_applied = Some(e.log_id);
                match e.payload {
                    EntryPayload::Blank => out.push(Outcome::Applied),
                    EntryPayload::Normal(cmd) => {
                        let o = d.state.apply(&cmd, e.log_id.index);
                        out.push(o);
                    }
                    EntryPayload::Membership(m) => {
                        d.membership = StoredMembership::new(Some(e.log_id), m);
                        out.push(Outcome::Applied);
                    }
                }
            }
            d.last_applied.map(|l| l.index).unwrap_or(0)
        };
        self.shared.changed.send_replace(last);
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            shared: self.shared.clone(),
            dir: self.dir.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    /// Replaces the state with the snapshot's; returns once it is persisted.
    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, openraft::BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let bytes = snapshot.into_inner();
        let snap_err = |e: io::Error| {
            StorageError::from(StorageIOError::write_snapshot(
                Some(meta.signature()),
                AnyError::new(&e),
            ))
        };
        let data: SmData = durable::decode(&bytes).map_err(snap_err)?;
        write_snapshot(
            &self.dir,
            &StoredSnapshot {
                meta: meta.clone(),
                data: bytes,
            },
        )
        .map_err(snap_err)?;
        let index = data.last_applied.map(|l| l.index).unwrap_or(0);
        *self.shared.lock() = data;
        self.shared.changed.send_replace(index);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let s = read_snapshot(&self.dir).map_err(sm_read_err)?;
        Ok(s.map(|s| Snapshot {
            meta: s.meta,
            snapshot: Box::new(Cursor::new(s.data)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use openraft::testing::log_id;
    use openraft::{EntryPayload, RaftSnapshotBuilder};

    use super::*;
    use crate::state::Command;

    fn add(index: u64, addr: &str) -> Entry {
        Entry {
            log_id: log_id(1, 1, index),
            payload: EntryPayload::Normal(Command::AddReplica {
                group: "g".into(),
                addr: addr.into(),
            }),
        }
    }

    #[tokio::test]
    async fn a_snapshot_round_trips_through_disk_and_install() {
        let dir = tempfile::tempdir().unwrap();
        let (mut sm, shared) = StateMachineStore::open(dir.path()).unwrap();
        let out = sm.apply(vec![add(1, "a"), add(2, "b")]).await.unwrap();
        assert_eq!(out, vec![Outcome::Applied, Outcome::Applied]);
        let snap = sm
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        assert_eq!(snap.meta.last_log_id, Some(log_id(1, 1, 2)));
        let state = shared.lock().state.clone();
        drop(sm);

        // A restarted member starts from the persisted snapshot.
        let (mut again, shared2) = StateMachineStore::open(dir.path()).unwrap();
        assert_eq!(shared2.lock().state, state);
        assert_eq!(
            again.applied_state().await.unwrap().0,
            Some(log_id(1, 1, 2))
        );
        let current = again.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(current.meta, snap.meta);

        // Another member installs it.
        let other_dir = tempfile::tempdir().unwrap();
        let (mut other, shared3) = StateMachineStore::open(other_dir.path()).unwrap();
        other
            .install_snapshot(&snap.meta, snap.snapshot)
            .await
            .unwrap();
        assert_eq!(shared3.lock().state, state);
        assert_eq!(shared3.lock().state.groups["g"].replicas.len(), 2);
    }
}
