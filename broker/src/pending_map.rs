//! The pending transactions by id, kept small: an ordered index of slot
//! numbers over one dense vector of values. Recovery rebuilds them in one
//! and the transaction table keeps them in another, converted in place.
//!
//! A `BTreeMap<u64, Pending>` fed in ascending order (transaction ids are
//! log positions) leaves its nodes a little over half full, and each node
//! holds eleven whole values: about 190 bytes per transaction, most of the
//! broker's memory with a million pending. Here the tree holds only
//! 12-byte (id, slot) pairs and the values sit packed in a vector whose
//! free slots are reused; the vector is compacted when it is mostly free,
//! so a burst that ended gives its memory back.

use std::collections::BTreeMap;

/// Below this many slots the vector is never compacted.
const COMPACT_FLOOR: usize = 1024;

/// An ordered map from transaction id to `V`.
#[derive(Debug, Clone)]
pub struct PendingMap<V> {
    /// Id -> slot in `slots`, in id order.
    index: BTreeMap<u64, u32>,
    /// The values with their ids; `None`: free.
    slots: Vec<Option<(u64, V)>>,
    /// Free slots.
    free: Vec<u32>,
}

impl<V> Default for PendingMap<V> {
    fn default() -> Self {
        PendingMap {
            index: BTreeMap::new(),
            slots: Vec::new(),
            free: Vec::new(),
        }
    }
}

impl<V: PartialEq> PartialEq for PendingMap<V> {
    /// The same ids with equal values, wherever their slots are.
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

impl<V: Eq> Eq for PendingMap<V> {}

impl<V> PendingMap<V> {
    /// How many ids it holds.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// The value of `id`.
    pub fn get(&self, id: &u64) -> Option<&V> {
        let slot = *self.index.get(id)?;
        self.slots[slot as usize].as_ref().map(|(_, v)| v)
    }

    /// The value of `id`, to change.
    pub fn get_mut(&mut self, id: &u64) -> Option<&mut V> {
        let slot = *self.index.get(id)?;
        self.slots[slot as usize].as_mut().map(|(_, v)| v)
    }

    /// Inserts or replaces the value of `id`; returns the one replaced.
    pub fn insert(&mut self, id: u64, value: V) -> Option<V> {
        if let Some(&slot) = self.index.get(&id) {
            let old = self.slots[slot as usize].replace((id, value));
            return old.map(|(_, v)| v);
        }
        let slot = match self.free.pop() {
            Some(slot) => {
                self.slots[slot as usize] = Some((id, value));
                slot
            }
            None => {
                let slot = u32::try_from(self.slots.len()).expect("fewer than 4 billion pending");
                self.slots.push(Some((id, value)));
                slot
            }
        };
        self.index.insert(id, slot);
        None
    }

    /// The value of `id`, inserted by `make` when there is none.
    pub fn get_or_insert_with(&mut self, id: u64, make: impl FnOnce() -> V) -> &mut V {
        let slot = match self.index.get(&id) {
            Some(&slot) => slot,
            None => {
                self.insert(id, make());
                self.index[&id]
            }
        };
        let (_, v) = self.slots[slot as usize]
            .as_mut()
            .expect("an indexed slot holds a value");
        v
    }

    /// Packs the values in id order in the vector they sit in (no second
    /// copy): a walk in slot order is then a walk in id order, which for
    /// transactions is the order of their half messages in the log.
    pub fn pack_in_order(&mut self) {
        self.slots
            .sort_unstable_by_key(|s| s.as_ref().map_or((1, 0), |(id, _)| (0, *id)));
        self.slots.truncate(self.index.len());
        for (slot, at) in self.index.values_mut().zip(0u32..) {
            *slot = at;
        }
        self.free.clear();
    }

    /// Converts every value with `convert` (in slot order), keeping the
    /// index; those it turns into `None` are removed. When the slots of
    /// `V` and `W` have the same layout the values are rewritten in the
    /// vector they sit in, so a million recovered transactions become the
    /// table's without a second copy.
    pub fn map_values<W>(self, mut convert: impl FnMut(u64, V) -> Option<W>) -> PendingMap<W> {
        let PendingMap {
            mut index,
            slots,
            mut free,
        } = self;
        let mut dropped = Vec::new();
        let slots: Vec<Option<(u64, W)>> = slots
            .into_iter()
            .enumerate()
            .map(|(slot, value)| {
                let (id, v) = value?;
                let w = convert(id, v);
                if w.is_none() {
                    dropped.push((id, slot as u32));
                }
                w.map(|w| (id, w))
            })
            .collect();
        for (id, slot) in dropped {
            index.remove(&id);
            free.push(slot);
        }
        PendingMap { index, slots, free }
    }

    /// Removes `id`; returns its value.
    pub fn remove(&mut self, id: &u64) -> Option<V> {
        let slot = self.index.remove(id)?;
        let value = self.slots[slot as usize].take().map(|(_, v)| v);
        self.free.push(slot);
        if self.slots.len() > COMPACT_FLOOR && self.index.len() * 4 < self.slots.len() {
            self.compact();
        }
        value
    }

    /// In id order.
    pub fn iter(&self) -> impl Iterator<Item = (&u64, &V)> {
        self.index.iter().map(|(id, &slot)| {
            let (_, v) = self.slots[slot as usize]
                .as_ref()
                .expect("an indexed slot holds a value");
            (id, v)
        })
    }

    /// In no particular order.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&u64, &mut V)> {
        self.slots.iter_mut().flatten().map(|(id, v)| (&*id, v))
    }

    /// In no particular order.
    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.slots.iter().flatten().map(|(_, v)| v)
    }

    /// Packs the values into a vector of their own size, in id order.
    fn compact(&mut self) {
        let mut slots = Vec::with_capacity(self.index.len());
        for (id, slot) in self.index.iter_mut() {
            let value = self.slots[*slot as usize].take();
            debug_assert!(value.as_ref().is_some_and(|(i, _)| i == id));
            *slot = slots.len() as u32;
            slots.push(value);
        }
        self.slots = slots;
        self.free = Vec::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn behaves_as_an_ordered_map_through_reuse_and_compaction() {
        let mut m = PendingMap::default();
        let mut model = BTreeMap::new();
        // A deterministic mix: a burst of inserts, removals of most, more
        // inserts reusing slots, replacements.
        let mut x: u64 = 7;
        for round in 0..20_000u64 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let id = (x >> 33) % 5_000;
            match round % 5 {
                0..=2 => assert_eq!(m.insert(id, round), model.insert(id, round)),
                _ => assert_eq!(m.remove(&id), model.remove(&id)),
            }
            assert_eq!(m.len(), model.len());
        }
        for id in 0..5_000 {
            assert_eq!(m.get(&id), model.get(&id));
        }
        assert!(m
            .iter()
            .map(|(k, v)| (*k, *v))
            .eq(model.iter().map(|(k, v)| (*k, *v))));
        for (_, v) in m.iter_mut() {
            *v += 1;
        }
        let mut values: Vec<u64> = m.values().copied().collect();
        values.sort_unstable();
        let mut want: Vec<u64> = model.values().map(|v| v + 1).collect();
        want.sort_unstable();
        assert_eq!(values, want);
    }

    #[test]
    fn values_convert_in_place_and_those_refused_leave() {
        let mut m = PendingMap::default();
        for id in 0..1_000u64 {
            m.insert(id * 10, [id as u8; 64]);
        }
        for id in (0..1_000u64).step_by(3) {
            m.remove(&(id * 10));
        }
        *m.get_or_insert_with(20, || unreachable!()) = [7; 64];
        m.get_or_insert_with(5, || [5; 64])[0] = 6;
        let before = m.slots.as_ptr() as usize;
        let len = m.len();
        // Odd ids (only 5) are refused; every other value becomes its sum.
        let converted = m.map_values(|id, v| {
            (id % 2 == 0).then(|| {
                [
                    v.iter().map(|&b| u64::from(b)).sum::<u64>(),
                    id,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                ]
            })
        });
        assert_eq!(
            converted.slots.as_ptr() as usize,
            before,
            "converted in place"
        );
        assert_eq!(converted.len(), len - 1);
        assert!(converted.get(&5).is_none());
        assert_eq!(converted.get(&20).unwrap()[0], 7 * 64);
        assert!(converted.iter().all(|(id, v)| v[1] == *id && id % 30 != 0));
        // The refused one's slot is reused.
        let mut converted = converted;
        let slots = converted.slots.len();
        converted.insert(7, [0; 8]);
        assert_eq!(converted.slots.len(), slots);
    }

    #[test]
    fn packing_puts_the_values_in_id_order_where_they_are() {
        let mut m = PendingMap::default();
        let mut model = BTreeMap::new();
        let mut x: u64 = 11;
        for round in 0..5_000u64 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let id = (x >> 33) % 2_000;
            if round % 3 == 2 {
                assert_eq!(m.remove(&id), model.remove(&id));
            } else {
                assert_eq!(m.insert(id, round), model.insert(id, round));
            }
        }
        let at = m.slots.as_ptr() as usize;
        m.pack_in_order();
        assert_eq!(m.slots.as_ptr() as usize, at, "packed in place");
        assert!(
            m.values().copied().eq(model.values().copied()),
            "slot order is id order"
        );
        assert!(m
            .iter()
            .map(|(k, v)| (*k, *v))
            .eq(model.iter().map(|(k, v)| (*k, *v))));
        for id in 0..2_000 {
            assert_eq!(m.get(&id), model.get(&id));
        }
        // Still a map: new ids go on the end, removed ones free their slot.
        m.insert(5_000, 1);
        m.remove(&5_000);
        assert_eq!(m.len(), model.len());
    }

    #[test]
    fn a_drained_burst_gives_its_slots_back() {
        let mut m = PendingMap::default();
        for id in 0..100_000u64 {
            m.insert(id, [0u8; 64]);
        }
        for id in 0..99_990u64 {
            m.remove(&id);
        }
        assert_eq!(m.len(), 10);
        assert!(m.slots.len() <= COMPACT_FLOOR, "{} slots", m.slots.len());
        assert!(m.iter().map(|(k, _)| *k).eq(99_990..100_000));
        assert!(m.get(&99_995).is_some() && m.get(&5).is_none());
    }
}
