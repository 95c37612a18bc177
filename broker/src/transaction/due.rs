//! When each prepared transaction is next due for a check-back: tx ids in
//! buckets of due time, so that the scheduler takes the due ones without
//! walking every pending transaction under the table's lock (a million
//! pending cost 8 bytes each here).
//!
//! Entries are never removed early: one whose transaction ended, moved its
//! due time or is busy (being checked, ended or carried) is dropped when its
//! bucket is taken, and whoever makes a transaction due again (a check
//! done, a failed end, a carry) adds a new entry. The transaction table
//! stays the truth.

use std::collections::BTreeMap;

/// Width of a bucket: a check is taken at most this much after it is due.
const BUCKET_MS: u64 = 10;

#[derive(Debug, Default)]
pub(crate) struct DueIndex {
    /// Bucket k holds the transactions due in ((k - 1) x width, k x width].
    buckets: BTreeMap<u64, Vec<u64>>,
}

impl DueIndex {
    /// Notes that `tx_id` is due at `due_ms` (`u64::MAX`: never).
    pub(crate) fn insert(&mut self, tx_id: u64, due_ms: u64) {
        if due_ms == u64::MAX {
            return;
        }
        let key = due_ms.div_ceil(BUCKET_MS);
        // Buckets mostly fill in time order: once a later one starts, the
        // last one is done growing and gives back its spare capacity (a
        // million pending cost 8 MB here, not up to twice that).
        if let Some(mut last) = self.buckets.last_entry() {
            if *last.key() < key {
                last.get_mut().shrink_to_fit();
            }
        }
        self.buckets.entry(key).or_default().push(tx_id);
    }

    /// When the earliest entry is due (its bucket's end), if any.
    pub(crate) fn next_due(&self) -> Option<u64> {
        self.buckets
            .first_key_value()
            .map(|(k, _)| k.saturating_mul(BUCKET_MS))
    }

    /// Takes every entry due at `now_ms` or before (and nothing later).
    pub(crate) fn take_due(&mut self, now_ms: u64) -> Vec<u64> {
        let mut out = Vec::new();
        while let Some(bucket) = self.buckets.first_entry() {
            if bucket.key().saturating_mul(BUCKET_MS) > now_ms {
                break;
            }
            out.extend(bucket.remove());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_come_out_once_when_due_never_before() {
        let mut due = DueIndex::default();
        due.insert(1, 1_000);
        due.insert(2, 1_005);
        due.insert(3, 2_000);
        due.insert(4, u64::MAX);
        assert!(due.take_due(999).is_empty());
        assert_eq!(due.next_due(), Some(1_000));
        assert_eq!(due.take_due(1_000), vec![1]);
        assert_eq!(due.next_due(), Some(1_010), "2's bucket ends at 1010");
        assert!(due.take_due(1_004).is_empty(), "2 is due at 1005");
        assert_eq!(due.take_due(1_010), vec![2]);
        assert_eq!(due.take_due(u64::MAX - 1), vec![3]);
        assert!(due.take_due(u64::MAX - 1).is_empty());
    }
}
