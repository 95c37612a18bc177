//! The record of dead letters re-sent (`txmq dlq resend`), so that the
//! same dead letter is not re-sent twice by accident.
//!
//! It lives beside the topic table, in `dlq-resent.log` in the data
//! directory: the commit log is the wrong place (a resend record there
//! would have to be a new record kind every reader of the log learns,
//! and retention would drop it while the dead letter, copied later into
//! the dead-letter topic, may still be there), and a separate small file
//! costs one append and one fsync per resend request. Each entry:
//!
//! ```text
//! 0   u32  total length of the entry, this field included
//! 4   u32  CRC32C of bytes 8..total
//! 8   u64  when it was re-sent, ms since the Unix epoch
//! 16  u64  the dead letter's position in the commit log
//! 24  [16] the dead letter's message id
//! 40  u16  group length, group bytes
//! ```
//!
//! A dead letter is known by its position: a message re-sent, failed
//! again and dead-lettered again is a new dead letter (same msg id,
//! another position) that `--all` re-sends once more.
//!
//! A torn or damaged tail (a crash in the middle of an append) is cut at
//! load. The file grows by 42 bytes plus the group name per letter
//! re-sent; it is not trimmed (a resend is an operator's action, rare).

use std::collections::HashSet;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use txmq_protocol::MsgId;

use crate::store::entry_log;

const FILE: &str = "dlq-resent.log";

/// Dead letters re-sent, by (group, log position).
pub(crate) struct ResendLog {
    path: PathBuf,
    inner: Mutex<Inner>,
    /// One resend at a time, so two concurrent ones cannot both send a letter.
    pub(crate) busy: tokio::sync::Mutex<()>,
}

struct Inner {
    file: Option<File>,
    sent: HashSet<(String, u64)>,
}

fn encode(group: &str, pos: u64, id: &MsgId, at: u64, out: &mut Vec<u8>) {
    entry_log::frame(out, |b| {
        b.extend_from_slice(&at.to_le_bytes());
        b.extend_from_slice(&pos.to_le_bytes());
        b.extend_from_slice(&id.0);
        entry_log::put_str(b, group);
    });
}

/// The entries of `data` up to the first damaged one, and where that is.
fn decode_all(data: &[u8]) -> (Vec<(String, u64)>, usize) {
    let mut out = Vec::new();
    let mut good = 0;
    for (body, end) in entry_log::entries(data) {
        let (Some(pos), Some(group)) = (entry_log::u64_at(body, 8), entry_log::str_at(body, 32))
        else {
            break;
        };
        out.push((group.to_string(), pos));
        good = end;
    }
    (out, good)
}

impl ResendLog {
    /// Loads the record from `dir`, cutting a damaged tail.
    ///
    /// # Errors
    /// An I/O error reading or cutting the file.
    pub(crate) fn load(dir: &Path) -> Result<ResendLog, String> {
        let path = dir.join(FILE);
        let data =
            entry_log::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let (entries, good) = decode_all(&data);
        if good < data.len() {
            tracing::warn!(file = %path.display(), at = good, "damaged tail of the dead-letter resend record cut");
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .and_then(|f| f.set_len(good as u64).and_then(|()| f.sync_all()));
            f.map_err(|e| format!("cannot cut {}: {e}", path.display()))?;
        }
        Ok(ResendLog {
            path,
            inner: Mutex::new(Inner {
                file: None,
                sent: entries.into_iter().collect(),
            }),
            busy: tokio::sync::Mutex::new(()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the letter of `group` at log position `pos` was re-sent before.
    pub(crate) fn was_resent(&self, group: &str, pos: u64) -> bool {
        self.lock().sent.contains(&(group.to_string(), pos))
    }

    /// Records letters of `group` (log position, msg id) as re-sent;
    /// returns once the record is fsynced.
    ///
    /// # Errors
    /// An I/O error (the letters were re-sent but are not recorded).
    pub(crate) fn record(&self, group: &str, ids: &[(u64, MsgId)], at: u64) -> Result<(), String> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::new();
        for (pos, id) in ids {
            encode(group, *pos, id, at, &mut buf);
        }
        let mut inner = self.lock();
        let io = |e: std::io::Error| format!("cannot write {}: {e}", self.path.display());
        if inner.file.is_none() {
            inner.file = Some(entry_log::open_append(&self.path).map_err(io)?);
        }
        if let Some(f) = inner.file.as_mut() {
            f.write_all(&buf).map_err(io)?;
            f.sync_data().map_err(io)?;
        }
        for (pos, _) in ids {
            inner.sent.insert((group.to_string(), *pos));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An entry without its group: header, time, position, id, group length.
    const FIXED: usize = 8 + 8 + 8 + 16 + 2;

    #[test]
    fn entries_round_trip_and_a_torn_tail_is_cut() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = ResendLog::load(dir.path()).expect("load");
        log.record("g1", &[(10, MsgId([1; 16])), (20, MsgId([2; 16]))], 7)
            .expect("record");
        assert!(log.was_resent("g1", 10) && log.was_resent("g1", 20));
        assert!(!log.was_resent("g2", 10) && !log.was_resent("g1", 30));
        // A torn append after the good entries.
        let path = dir.path().join(FILE);
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .expect("open");
        f.write_all(&[40, 0, 0, 0, 1, 2]).expect("write");
        drop(f);
        let again = ResendLog::load(dir.path()).expect("reload");
        assert!(again.was_resent("g1", 10) && again.was_resent("g1", 20));
        assert_eq!(
            std::fs::metadata(&path).expect("meta").len() as usize,
            2 * (FIXED + 2)
        );
    }

    #[test]
    fn every_truncation_keeps_the_whole_entries_only() {
        let mut buf = Vec::new();
        encode("group", 1, &MsgId([3; 16]), 1, &mut buf);
        encode("g", 2, &MsgId([4; 16]), 2, &mut buf);
        let first = FIXED + 5;
        for cut in 0..buf.len() {
            let (entries, good) = decode_all(&buf[..cut]);
            let expect = usize::from(cut >= first);
            assert_eq!(entries.len(), expect, "cut at {cut}");
            assert_eq!(good, if expect == 1 { first } else { 0 });
        }
        let mut bad = buf.clone();
        bad[first + 10] ^= 1;
        assert_eq!(decode_all(&bad).0.len(), 1);
    }
}
