//! The epoch file: which master epoch wrote which part of this log, as
//! (epoch, first log position) pairs, like Kafka's leader-epoch checkpoint.
//!
//! A broker elected master at epoch E appends (E, its log end) before it
//! takes a write; a slave appends its master's entries as the log it copies
//! reaches them. Everything before the first entry is epoch 0 (a log
//! written before any election). Two replicas agree on the log up to where
//! their histories of an epoch both end, which is what a rejoining replica
//! truncates to ([`Epochs::end_of`]).
//!
//! The file is text, one `epoch start` pair per line, rewritten whole and
//! atomically (temporary file, fsync, rename, directory fsync).

use std::io::Write;
use std::path::{Path, PathBuf};

use txmq_protocol::EpochStart;

/// The epoch file's name in the data directory.
const FILE: &str = "epochs";

/// The epoch history of one data directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Epochs {
    path: PathBuf,
    entries: Vec<EpochStart>,
}

impl Epochs {
    /// Reads the epoch file of `dir` (none yet: an empty history).
    ///
    /// # Errors
    /// An unreadable file, or one whose lines are not increasing `epoch
    /// start` pairs.
    pub(crate) fn load(dir: &Path) -> Result<Epochs, String> {
        let path = dir.join(FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        let mut entries: Vec<EpochStart> = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let bad = || {
                format!(
                    "{} line {}: '{line}' is not 'epoch start'",
                    path.display(),
                    n + 1
                )
            };
            let mut parts = line.split_whitespace();
            let (Some(epoch), Some(start), None) = (parts.next(), parts.next(), parts.next())
            else {
                return Err(bad());
            };
            let entry = EpochStart {
                epoch: epoch.parse().map_err(|_| bad())?,
                start: start.parse().map_err(|_| bad())?,
            };
            if entries
                .last()
                .is_some_and(|l| l.epoch >= entry.epoch || l.start > entry.start)
            {
                return Err(format!(
                    "{} line {}: epochs and positions must increase",
                    path.display(),
                    n + 1
                ));
            }
            entries.push(entry);
        }
        Ok(Epochs { path, entries })
    }

    /// Every entry, oldest first.
    #[cfg(test)]
    pub(crate) fn entries(&self) -> &[EpochStart] {
        &self.entries
    }

    /// The last epoch of this history (0: none).
    pub(crate) fn last_epoch(&self) -> u64 {
        self.entries.last().map_or(0, |e| e.epoch)
    }

    /// Where this history of `epoch` ends, for a log ending at `log_end`:
    /// the largest epoch not above `epoch` (0: the part before the first
    /// entry) and the start of the epoch after it (or the log end).
    pub(crate) fn end_of(&self, epoch: u64, log_end: u64) -> (u64, u64) {
        let idx = self.entries.partition_point(|e| e.epoch <= epoch);
        let found = if idx == 0 {
            0
        } else {
            self.entries[idx - 1].epoch
        };
        let end = self.entries.get(idx).map_or(log_end, |e| e.start);
        (found, end.min(log_end))
    }

    /// The entries after `epoch`.
    pub(crate) fn after(&self, epoch: u64) -> Vec<EpochStart> {
        self.entries
            .iter()
            .filter(|e| e.epoch > epoch)
            .copied()
            .collect()
    }

    /// Appends `entry` (a later epoch, at or past the last start) durably;
    /// an entry for an epoch already held is ignored.
    ///
    /// # Errors
    /// An entry that goes back, or the file cannot be written.
    pub(crate) fn push(&mut self, entry: EpochStart) -> Result<(), String> {
        if let Some(last) = self.entries.last() {
            if entry.epoch <= last.epoch {
                return Ok(());
            }
            if entry.start < last.start {
                return Err(format!(
                    "epoch {} starting at {} would start before epoch {} at {}",
                    entry.epoch, entry.start, last.epoch, last.start
                ));
            }
        }
        self.entries.push(entry);
        self.store()
    }

    /// Forgets the epochs after `epoch` and the ones starting at or past
    /// `log_end` (a log cut there), durably.
    ///
    /// # Errors
    /// The file cannot be written.
    pub(crate) fn truncate(&mut self, epoch: u64, log_end: u64) -> Result<(), String> {
        let before = self.entries.len();
        self.entries
            .retain(|e| e.epoch <= epoch && e.start < log_end);
        if self.entries.len() == before {
            return Ok(());
        }
        self.store()
    }

    fn store(&self) -> Result<(), String> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let tmp = dir.join(format!("{FILE}.tmp"));
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            for e in &self.entries {
                writeln!(f, "{} {}", e.epoch, e.start)?;
            }
            f.sync_all()?;
            drop(f);
            std::fs::rename(&tmp, &self.path)?;
            crate::store::commit_log::sync_dir(dir)
        };
        write().map_err(|e| format!("cannot write {}: {e}", self.path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(epoch: u64, start: u64) -> EpochStart {
        EpochStart { epoch, start }
    }

    #[test]
    fn entries_survive_a_reload_and_bad_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut epochs = Epochs::load(dir.path()).unwrap();
        assert_eq!(epochs.last_epoch(), 0);
        epochs.push(e(1, 0)).unwrap();
        epochs.push(e(3, 500)).unwrap();
        epochs.push(e(2, 900)).unwrap(); // an older epoch: ignored
        assert!(epochs.push(e(4, 100)).is_err(), "a start that goes back");
        let again = Epochs::load(dir.path()).unwrap();
        assert_eq!(again.entries(), &[e(1, 0), e(3, 500)]);
        std::fs::write(dir.path().join(FILE), "2 10\n1 20\n").unwrap();
        assert!(Epochs::load(dir.path()).is_err());
        std::fs::write(dir.path().join(FILE), "2 x\n").unwrap();
        assert!(Epochs::load(dir.path()).unwrap_err().contains("line 1"));
    }

    #[test]
    fn an_epoch_ends_where_the_next_begins_or_at_the_log_end() {
        let dir = tempfile::tempdir().unwrap();
        let mut epochs = Epochs::load(dir.path()).unwrap();
        assert_eq!(epochs.end_of(5, 1000), (0, 1000));
        for entry in [e(1, 100), e(3, 500), e(4, 800)] {
            epochs.push(entry).unwrap();
        }
        assert_eq!(epochs.end_of(0, 1000), (0, 100), "before the first epoch");
        assert_eq!(epochs.end_of(1, 1000), (1, 500));
        assert_eq!(
            epochs.end_of(2, 1000),
            (1, 500),
            "an epoch this log never had"
        );
        assert_eq!(epochs.end_of(4, 1000), (4, 1000));
        assert_eq!(epochs.end_of(9, 700), (4, 700), "never past the log end");
        assert_eq!(epochs.after(1), vec![e(3, 500), e(4, 800)]);
        epochs.truncate(3, 600).unwrap();
        assert_eq!(
            Epochs::load(dir.path()).unwrap().entries(),
            &[e(1, 100), e(3, 500)]
        );
        epochs.truncate(9, 300).unwrap();
        assert_eq!(epochs.entries(), &[e(1, 100)]);
    }
}
