//! The consumer's bookkeeping per queue: how far [`poll`] has handed
//! messages out, and how far the group's offset is committed on the broker.
//!
//! [`poll`]: crate::PullConsumer::poll

use std::collections::HashMap;

use crate::consumer::ConsumeFrom;

/// One queue of the consumed topic: a broker and a queue id on it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueueKey {
    /// The broker's name.
    pub broker_name: String,
    /// The queue id.
    pub queue: u32,
}

#[derive(Debug, Default, Clone, Copy)]
struct QueueState {
    committed: Option<u64>,
    handed_out: Option<u64>,
    /// The topic generation what was handed out was read from.
    generation: Option<u64>,
}

/// Positions of every queue the consumer reads. Offsets are "next offset to
/// consume", as the broker stores them.
#[derive(Debug, Default)]
pub(crate) struct OffsetTable {
    queues: HashMap<QueueKey, QueueState>,
}

impl OffsetTable {
    /// Records where the group stands on a queue as the broker said and
    /// where reading starts. A group without an offset there gets `start`
    /// committed by the next commit, so its position is fixed from now on
    /// (a restart with [`ConsumeFrom::Last`] does not skip what came meanwhile).
    pub(crate) fn started(&mut self, key: &QueueKey, committed: Option<u64>, start: u64) {
        let state = self.queues.entry(key.clone()).or_default();
        if state.committed.is_none() {
            state.committed = committed;
        }
        if state.committed.is_none() && state.handed_out.is_none() {
            state.handed_out = Some(start);
        }
    }

    /// Where `poll` stands on the queue: the position after the last
    /// message it handed out.
    pub(crate) fn handed_out_to(&self, key: &QueueKey) -> Option<u64> {
        self.queues.get(key).and_then(|s| s.handed_out)
    }

    /// The queue's reader went back below what `poll` handed out (the
    /// broker lost the queue's tail and the reader returned to the group's
    /// committed offset): both positions start again from what comes next.
    pub(crate) fn rewound(&mut self, key: &QueueKey) {
        if let Some(state) = self.queues.get_mut(key) {
            *state = QueueState::default();
        }
    }

    /// What `poll` hands out next was read from topic `generation`
    /// ([`txmq_protocol::PullResult::topic_generation`]): another one than
    /// before (the topic was deleted and made again) starts the queue's
    /// positions anew, as [`OffsetTable::rewound`] does.
    pub(crate) fn read_from(&mut self, key: &QueueKey, generation: Option<u64>) {
        let Some(generation) = generation else {
            return;
        };
        let state = self.queues.entry(key.clone()).or_default();
        if state.generation.is_some_and(|g| g != generation) {
            *state = QueueState::default();
        }
        state.generation = Some(generation);
    }

    /// The topic generation a commit of the queue names.
    pub(crate) fn generation(&self, key: &QueueKey) -> Option<u64> {
        self.queues.get(key).and_then(|s| s.generation)
    }

    /// `poll` handed out every message of the queue before `next`.
    pub(crate) fn handed_out(&mut self, key: &QueueKey, next: u64) {
        let state = self.queues.entry(key.clone()).or_default();
        state.handed_out = Some(state.handed_out.map_or(next, |h| h.max(next)));
    }

    /// A commit of `offset` succeeded.
    pub(crate) fn committed(&mut self, key: &QueueKey, offset: u64) {
        let state = self.queues.entry(key.clone()).or_default();
        state.committed = Some(state.committed.map_or(offset, |c| c.max(offset)));
    }

    /// The queues whose handed-out position is past the committed one, with
    /// the offset to commit, in key order.
    pub(crate) fn to_commit(&self) -> Vec<(QueueKey, u64)> {
        let mut out: Vec<(QueueKey, u64)> = self
            .queues
            .iter()
            .filter_map(|(k, s)| {
                let h = s.handed_out?;
                s.committed.is_none_or(|c| h > c).then(|| (k.clone(), h))
            })
            .collect();
        out.sort();
        out
    }
}

/// Where a queue is read from: the group's committed offset when there is
/// one (kept within the queue's bounds), else the queue's first offset, or
/// for [`ConsumeFrom::Last`] the first one stored since the consumer
/// started (`since`, asked of the broker), else its end.
pub(crate) fn start_offset(
    committed: Option<u64>,
    min: u64,
    max: u64,
    from: ConsumeFrom,
    since: Option<u64>,
) -> u64 {
    match (committed, from) {
        (Some(c), _) => c.min(max).max(min),
        (None, ConsumeFrom::First) => min,
        (None, ConsumeFrom::Last) => since.unwrap_or(max).min(max).max(min),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: &str, q: u32) -> QueueKey {
        QueueKey {
            broker_name: b.into(),
            queue: q,
        }
    }

    #[test]
    fn only_queues_that_advanced_are_committed() {
        let mut t = OffsetTable::default();
        t.started(&key("a", 0), Some(10), 10);
        t.started(&key("b", 0), Some(3), 3);
        assert!(t.to_commit().is_empty());
        // No offset yet: the start position is committed.
        t.started(&key("a", 1), None, 2);
        assert_eq!(t.to_commit(), vec![(key("a", 1), 2)]);

        t.handed_out(&key("a", 0), 10); // nothing new
        t.handed_out(&key("a", 1), 4);
        t.handed_out(&key("b", 0), 5);
        t.handed_out(&key("b", 0), 4); // never moves back
        assert_eq!(t.to_commit(), vec![(key("a", 1), 4), (key("b", 0), 5)]);

        t.committed(&key("a", 1), 4);
        t.committed(&key("b", 0), 5);
        assert!(t.to_commit().is_empty());

        // The broker's value arriving late does not undo a local commit.
        t.started(&key("b", 0), Some(1), 1);
        assert!(t.to_commit().is_empty());

        // The queue was cut short and read again from 3: what is handed
        // out from there is committed, though below the old position.
        t.rewound(&key("b", 0));
        assert!(t.to_commit().is_empty());
        t.handed_out(&key("b", 0), 4);
        assert_eq!(t.to_commit(), vec![(key("b", 0), 4)]);
    }

    #[test]
    fn start_offset_prefers_the_committed_one() {
        assert_eq!(start_offset(Some(5), 0, 10, ConsumeFrom::Last, None), 5);
        assert_eq!(start_offset(None, 2, 10, ConsumeFrom::First, Some(4)), 2);
        assert_eq!(start_offset(None, 2, 10, ConsumeFrom::Last, None), 10);
        // A queue met later: what was stored since the consumer started.
        assert_eq!(start_offset(None, 2, 10, ConsumeFrom::Last, Some(4)), 4);
        assert_eq!(start_offset(None, 2, 10, ConsumeFrom::Last, Some(99)), 10);
        // Out of bounds: clamped (messages below min were deleted).
        assert_eq!(start_offset(Some(1), 2, 10, ConsumeFrom::First, None), 2);
        assert_eq!(start_offset(Some(99), 2, 10, ConsumeFrom::First, None), 10);
    }
}
