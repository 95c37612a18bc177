//! The durable Raft log and vote (openraft's [`RaftLogStorage`]).
//!
//! The log is one append-only file, `raft-log`, of framed records (see
//! `durable.rs`): an entry, a truncation ("entries from this index on are
//! gone") or a purge mark. Appends fsync before openraft is told they are
//! flushed; a truncation is a record, fsynced too; a purge rewrites the
//! file atomically without the purged entries (purges follow snapshots, so
//! the file stays about as small as the snapshot policy's window). The
//! vote and the committed log id live in files of their own, replaced
//! atomically.
//!
//! The whole log is also held in memory: the controller's log only grows
//! on elections and in-sync changes, never on heartbeats. File I/O happens
//! inline on the calling task for the same reason: it is rare and small.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{AnyError, OptionalSend, RaftLogId, RaftLogReader, StorageIOError};
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::durable;
use crate::types::{Entry, LogId, StorageError, TypeConfig, Vote};

const LOG_FILE: &str = "raft-log";
const VOTE_FILE: &str = "raft-vote";
const COMMITTED_FILE: &str = "raft-committed";

/// One record of the log file.
#[derive(Debug, Serialize, Deserialize)]
enum LogRecord {
    Entry(Entry),
    /// Entries from this index on are deleted.
    Truncate(u64),
    /// Entries up to this log id (inclusive) are purged.
    Purged(LogId),
}

/// The log store: a cheap handle; clones share the same log.
#[derive(Clone)]
pub struct LogStore {
    inner: Arc<Mutex<LogInner>>,
}

struct LogInner {
    dir: PathBuf,
    file: File,
    entries: BTreeMap<u64, Entry>,
    last_purged: Option<LogId>,
    vote: Option<Vote>,
    committed: Option<LogId>,
    /// Set after a failed write or fsync: what is on disk is unknown, so
    /// nothing more is accepted (the member must restart and recover).
    poisoned: bool,
}

impl LogStore {
    /// Opens (or creates) the log in `dir`, recovering it: the log file is
    /// read up to its first torn or corrupt record, and cut there.
    ///
    /// # Errors
    /// I/O errors, or a damaged vote or committed file.
    pub fn open(dir: &Path) -> io::Result<LogStore> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(LOG_FILE);
        let existed = path.exists();
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)?;
        if !existed {
            durable::sync_dir(dir)?;
        }
        let mut buf = Vec::new();
        file.read_to_end(&mut buf)?;
        let (records, good) = durable::unframe(&buf);
        let mut entries = BTreeMap::new();
        let mut last_purged = None;
        for payload in records {
            match durable::decode::<LogRecord>(payload)? {
                LogRecord::Entry(e) => {
                    entries.insert(e.log_id.index, e);
                }
                LogRecord::Truncate(since) => {
                    entries.split_off(&since);
                }
                LogRecord::Purged(id) => {
                    entries = entries.split_off(&(id.index + 1));
                    last_purged = Some(id);
                }
            }
        }
        if good < buf.len() {
            warn!(
                file = %path.display(),
                kept = good,
                cut = buf.len() - good,
                "raft log has a torn or corrupt tail; cutting it"
            );
            file.set_len(good as u64)?;
            file.sync_all()?;
        }
        let vote = durable::read_atomic(dir, VOTE_FILE)?
            .map(|b| durable::decode(&b))
            .transpose()?;
        let committed = durable::read_atomic(dir, COMMITTED_FILE)?
            .map(|b| durable::decode(&b))
            .transpose()?;
        Ok(LogStore {
            inner: Arc::new(Mutex::new(LogInner {
                dir: dir.to_path_buf(),
                file,
                entries,
                last_purged,
                vote,
                committed,
                poisoned: false,
            })),
        })
    }

    fn lock(&self) -> MutexGuard<'_, LogInner> {
        // A panic while holding the lock leaves plain data behind; go on with it.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl LogInner {
    fn check(&self) -> io::Result<()> {
        if self.poisoned {
            return Err(io::Error::other(
                "an earlier write to the raft log failed; restart to recover",
            ));
        }
        Ok(())
    }

    /// Appends records to the file; returns once they are fsynced.
    fn write_records(&mut self, records: &[LogRecord]) -> io::Result<()> {
        self.check()?;
        let mut buf = Vec::new();
        for r in records {
            buf.extend(durable::frame(&durable::encode(r)?)?);
        }
        let res = self
            .file
            .write_all(&buf)
            .and_then(|()| self.file.sync_data());
        if res.is_err() {
            self.poisoned = true;
        }
        res
    }

    /// Rewrites the log file with only what is live, atomically.
    fn rewrite(&mut self) -> io::Result<()> {
        self.check()?;
        let mut buf = Vec::new();
        if let Some(p) = self.last_purged {
            buf.extend(durable::frame(&durable::encode(&LogRecord::Purged(p))?)?);
        }
        for e in self.entries.values() {
            buf.extend(durable::frame(&durable::encode(&LogRecord::Entry(
                e.clone(),
            ))?)?);
        }
        let tmp = self.dir.join(format!("{LOG_FILE}.tmp"));
        let res = (|| {
            let mut f = File::create(&tmp)?;
            f.write_all(&buf)?;
            f.sync_all()?;
            drop(f);
            std::fs::rename(&tmp, self.dir.join(LOG_FILE))?;
            durable::sync_dir(&self.dir)?;
            OpenOptions::new()
                .read(true)
                .append(true)
                .open(self.dir.join(LOG_FILE))
        })();
        match res {
            Ok(f) => {
                self.file = f;
                Ok(())
            }
            Err(e) => {
                self.poisoned = true;
                Err(e)
            }
        }
    }
}

fn write_err(e: io::Error) -> StorageError {
    StorageIOError::write_logs(AnyError::new(&e)).into()
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let inner = self.lock();
        Ok(inner.entries.range(range).map(|(_, e)| e.clone()).collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let inner = self.lock();
        let last = inner
            .entries
            .values()
            .next_back()
            .map(|e| *e.get_log_id())
            .or(inner.last_purged);
        Ok(LogState {
            last_purged_log_id: inner.last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    /// Returns once the vote is fsynced (and its rename durable).
    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        let mut inner = self.lock();
        let res =
            durable::encode(vote).and_then(|b| durable::write_atomic(&inner.dir, VOTE_FILE, &b));
        match res {
            Ok(()) => {
                inner.vote = Some(*vote);
                Ok(())
            }
            Err(e) => Err(StorageIOError::write_vote(AnyError::new(&e)).into()),
        }
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        Ok(self.lock().vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        let mut inner = self.lock();
        if inner.committed == committed {
            return Ok(());
        }
        durable::encode(&committed)
            .and_then(|b| durable::write_atomic(&inner.dir, COMMITTED_FILE, &b))
            .map_err(write_err)?;
        inner.committed = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.lock().committed)
    }

    /// Writes the entries and fsyncs them before `callback` is told.
    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let records: Vec<LogRecord> = entries.into_iter().map(LogRecord::Entry).collect();
        let mut inner = self.lock();
        match inner.write_records(&records) {
            Ok(()) => {
                for r in records {
                    if let LogRecord::Entry(e) = r {
                        inner.entries.insert(e.log_id.index, e);
                    }
                }
                drop(inner);
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                drop(inner);
                let err = write_err(io::Error::new(e.kind(), e.to_string()));
                callback.log_io_completed(Err(e));
                Err(err)
            }
        }
    }

    /// Deletes entries from `log_id` on; returns once that is durable.
    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let mut inner = self.lock();
        inner
            .write_records(&[LogRecord::Truncate(log_id.index)])
            .map_err(write_err)?;
        inner.entries.split_off(&log_id.index);
        Ok(())
    }

    /// Deletes entries up to `log_id`, inclusive; returns once durable.
    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let mut inner = self.lock();
        let kept = inner.entries.split_off(&(log_id.index + 1));
        let old = std::mem::replace(&mut inner.entries, kept);
        let old_purged = inner.last_purged.replace(log_id);
        if let Err(e) = inner.rewrite() {
            inner.entries.extend(old);
            inner.last_purged = old_purged;
            return Err(write_err(e));
        }
        Ok(())
    }
}

impl std::fmt::Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = self.lock();
        f.debug_struct("LogStore")
            .field("dir", &inner.dir)
            .field("entries", &inner.entries.len())
            .field("last_purged", &inner.last_purged)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use openraft::testing::{log_id, StoreBuilder, Suite};
    use openraft::{EntryPayload, LeaderId};

    use super::*;
    use crate::state::Command;
    use crate::state_machine::StateMachineStore;

    fn entry(term: u64, index: u64) -> Entry {
        Entry {
            log_id: log_id(term, 1, index),
            payload: EntryPayload::Normal(Command::AddReplica {
                group: "g".into(),
                addr: format!("a{index}"),
            }),
        }
    }

    fn put(store: &mut LogStore, entries: Vec<Entry>) {
        let mut inner = store.lock();
        let records: Vec<LogRecord> = entries.into_iter().map(LogRecord::Entry).collect();
        inner.write_records(&records).unwrap();
        for r in records {
            if let LogRecord::Entry(e) = r {
                inner.entries.insert(e.log_id.index, e);
            }
        }
    }

    fn indexes(store: &LogStore) -> Vec<u64> {
        store.lock().entries.keys().copied().collect()
    }

    #[tokio::test]
    async fn the_log_survives_a_reopen_with_truncations_and_purges() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = LogStore::open(dir.path()).unwrap();
        put(&mut s, (1..=6).map(|i| entry(1, i)).collect());
        s.truncate(log_id(1, 1, 5)).await.unwrap();
        put(&mut s, vec![entry(2, 5)]);
        s.purge(log_id(1, 1, 2)).await.unwrap();
        put(&mut s, vec![entry(2, 6)]);
        drop(s);
        let mut s = LogStore::open(dir.path()).unwrap();
        assert_eq!(indexes(&s), vec![3, 4, 5, 6]);
        let state = s.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, Some(log_id(1, 1, 2)));
        assert_eq!(state.last_log_id, Some(log_id(2, 1, 6)));
        let got = s.try_get_log_entries(5..=5).await.unwrap();
        assert_eq!(got[0].log_id, log_id(2, 1, 5));
    }

    #[tokio::test]
    async fn a_torn_tail_is_cut_and_appends_continue_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = LogStore::open(dir.path()).unwrap();
        put(&mut s, (1..=3).map(|i| entry(1, i)).collect());
        drop(s);
        let path = dir.path().join(LOG_FILE);
        let full = std::fs::read(&path).unwrap();
        // Every cut inside the last record loses that record only.
        let (records, _) = durable::unframe(&full);
        let last_len = durable::HEADER + records[2].len();
        for cut in 1..last_len {
            std::fs::write(&path, &full[..full.len() - cut]).unwrap();
            let s = LogStore::open(dir.path()).unwrap();
            assert_eq!(indexes(&s), vec![1, 2], "cut {cut}");
        }
        // A flipped byte in the middle record: it and what follows are cut.
        let mut bad = full.clone();
        let mid = durable::HEADER * 2 + records[0].len() + 2;
        bad[mid] ^= 0x55;
        std::fs::write(&path, &bad).unwrap();
        let mut s = LogStore::open(dir.path()).unwrap();
        assert_eq!(indexes(&s), vec![1]);
        put(&mut s, vec![entry(1, 2)]);
        drop(s);
        assert_eq!(indexes(&LogStore::open(dir.path()).unwrap()), vec![1, 2]);
    }

    #[tokio::test]
    async fn the_vote_and_committed_id_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = LogStore::open(dir.path()).unwrap();
        assert_eq!(s.read_vote().await.unwrap(), None);
        let vote = Vote::new_committed(3, 2);
        s.save_vote(&vote).await.unwrap();
        s.save_committed(Some(log_id(3, 2, 9))).await.unwrap();
        drop(s);
        let mut s = LogStore::open(dir.path()).unwrap();
        assert_eq!(s.read_vote().await.unwrap(), Some(vote));
        assert_eq!(s.read_committed().await.unwrap(), Some(log_id(3, 2, 9)));
        assert_eq!(vote.leader_id(), &LeaderId::new(3, 2));
    }

    /// openraft's conformance suite for storage implementations.
    struct Builder;

    impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for Builder {
        async fn build(
            &self,
        ) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), StorageError> {
            let dir = tempfile::tempdir().map_err(write_err)?;
            let log = LogStore::open(dir.path()).map_err(write_err)?;
            let (sm, _) = StateMachineStore::open(dir.path()).map_err(write_err)?;
            Ok((dir, log, sm))
        }
    }

    #[test]
    fn openraft_storage_suite_passes() {
        Suite::test_all(Builder).unwrap();
    }
}
