//! Lost and duplicated messages, from per-producer sequence numbers: each
//! producer notes which sequence numbers were acknowledged, each receiver
//! which ones arrived; lost = acknowledged but never received, duplicated =
//! received more than once.

use std::collections::HashMap;

/// A growable set of small numbers, one bit each.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Bits {
    words: Vec<u64>,
    len: u64,
}

impl Bits {
    /// Adds `i`; returns whether it was new.
    pub fn insert(&mut self, i: u64) -> bool {
        let (w, bit) = ((i / 64) as usize, 1u64 << (i % 64));
        if w >= self.words.len() {
            self.words.resize(w + 1, 0);
        }
        let new = self.words[w] & bit == 0;
        self.words[w] |= bit;
        self.len += u64::from(new);
        new
    }

    /// Whether `i` is in the set.
    #[cfg(test)]
    pub fn contains(&self, i: u64) -> bool {
        self.words
            .get((i / 64) as usize)
            .is_some_and(|w| w & (1u64 << (i % 64)) != 0)
    }

    /// How many numbers are in the set.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// How many numbers of `self` are not in `other`.
    pub fn count_missing_from(&self, other: &Bits) -> u64 {
        self.words
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let theirs = other.words.get(i).copied().unwrap_or(0);
                u64::from((w & !theirs).count_ones())
            })
            .sum()
    }
}

/// What the receivers saw, per producer.
#[derive(Debug, Default)]
pub struct Received {
    per_producer: HashMap<u64, Bits>,
    unique: u64,
    duplicates: u64,
}

impl Received {
    /// Notes that `producer`'s message `seq` arrived; returns whether it
    /// was its first arrival.
    pub fn record(&mut self, producer: u64, seq: u64) -> bool {
        let new = self.per_producer.entry(producer).or_default().insert(seq);
        if new {
            self.unique += 1;
        } else {
            self.duplicates += 1;
        }
        new
    }

    /// Messages received at least once.
    pub fn unique(&self) -> u64 {
        self.unique
    }

    /// Arrivals after the first.
    pub fn duplicates(&self) -> u64 {
        self.duplicates
    }

    /// Messages acknowledged to their producer (`acked`, by producer id)
    /// that never arrived.
    pub fn lost(&self, acked: &HashMap<u64, Bits>) -> u64 {
        let none = Bits::default();
        acked
            .iter()
            .map(|(p, bits)| bits.count_missing_from(self.per_producer.get(p).unwrap_or(&none)))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_insert_once_and_count() {
        let mut b = Bits::default();
        assert!(b.insert(0));
        assert!(b.insert(200));
        assert!(!b.insert(200));
        assert!(b.contains(200) && b.contains(0) && !b.contains(1) && !b.contains(10_000));
        assert_eq!(b.len(), 2);
        let mut other = Bits::default();
        other.insert(200);
        assert_eq!(b.count_missing_from(&other), 1);
        assert_eq!(other.count_missing_from(&b), 0);
        assert_eq!(b.count_missing_from(&Bits::default()), 2);
    }

    #[test]
    fn lost_and_duplicated_are_counted_per_producer() {
        let (p1, p2) = (1u64 << 16, (1u64 << 16) | 1);
        let mut acked = HashMap::new();
        let mut a1 = Bits::default();
        let mut a2 = Bits::default();
        for s in 0..100 {
            a1.insert(s);
        }
        // p2's send of 5 failed: it was never acknowledged, so not lost.
        for s in (0..10).filter(|s| *s != 5) {
            a2.insert(s);
        }
        acked.insert(p1, a1);
        acked.insert(p2, a2);

        let mut r = Received::default();
        for s in 0..100 {
            if s != 17 && s != 63 {
                assert!(r.record(p1, s));
            }
        }
        assert!(!r.record(p1, 3), "a second arrival is a duplicate");
        for s in 0..10 {
            // p2's 5 arrives although its send failed (stored, answer lost).
            r.record(p2, s);
        }
        // The same sequence from another producer is a different message.
        assert!(r.record((2u64 << 16) | 1, 3));
        assert_eq!(r.lost(&acked), 2);
        assert_eq!(r.duplicates(), 1);
        assert_eq!(r.unique(), 98 + 10 + 1);
    }

    #[test]
    fn a_producer_never_heard_from_lost_everything() {
        let mut acked = HashMap::new();
        let mut a = Bits::default();
        a.insert(0);
        a.insert(1);
        acked.insert(9, a);
        assert_eq!(Received::default().lost(&acked), 2);
    }
}
