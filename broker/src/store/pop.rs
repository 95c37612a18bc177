//! The pop table: what RocketMQ 5's "pop" consumers (simple consumers)
//! hold in flight, per (group, topic, queue).
//!
//! A group receives messages with an invisible time: each is hidden from
//! the group until acknowledged or until its deadline (broker clock), then
//! delivered again with its attempt counted. Per queue the table keeps
//! `next`, the first offset the group never received, and the messages in
//! flight: offset -> (attempt, deadline, receipt). The receipt is the log
//! position of the record that made the delivery (or moved its deadline):
//! unique, the same on every replica, so a receipt handle names exactly one
//! delivery and a handle of an older delivery is stale.
//!
//! Like the producer table it lives in the log: four record kinds
//! (`record.rs`), decided and applied by the single writer in log order,
//! replayed by recovery and by a slave, and snapshotted in the checkpoint:
//!
//! - `PopReceive`: topic, key = group, queue; aux = `next` before (the
//!   start of a queue new to the table), queue offset = `next` after; the
//!   body is 20 bytes per delivery: u64 queue offset, u32 attempt, u64
//!   deadline (ms).
//! - `PopAck`: topic, key = group, queue; queue offset = the offset; aux =
//!   the receipt; flags = 1 when it went to the dead-letter topic.
//! - `PopChange`: topic, key = group, queue; queue offset = the offset;
//!   aux = the old receipt; body = u64 new deadline (ms). Its own position
//!   is the new receipt.
//! - `PopReset`: topic, key = group, queue; queue offset = the new `next`.
//!   An operator's `txmq group reset-offset`: the queue's messages in flight
//!   are dropped (their receipts are stale from then on) and the next
//!   receive starts at the offset, up or down.
//!
//! Applying is idempotent per queue: each queue remembers the end of the
//! last record applied to it, and a record before that is skipped, so the
//! replay of records the checkpoint's snapshot already holds changes
//! nothing. The group's committed offset on the queue (its lag) is the
//! lowest offset not yet acknowledged: the first in flight, else `next`.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::checkpoint::{get_name, put_name};
use bytes::{Buf, BufMut, BytesMut};

/// (group, topic, queue).
pub type PopKey = (String, String, u32);

/// Messages one group may hold in flight on one queue; a queue at the
/// bound hands out nothing new until acknowledgements come.
pub const MAX_IN_FLIGHT: usize = 65_536;

/// Consume-queue entries one receive looks at past `next` (filtered-out
/// ones included).
pub const MAX_SCAN: usize = 1024;

/// A message in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InFlight {
    /// Delivery attempt (1 on the first delivery).
    pub attempt: u32,
    /// Hidden until then (ms, broker clock).
    pub until: u64,
    /// The log position of the record that made this delivery or last
    /// moved its deadline.
    pub receipt: u64,
}

/// One queue of one group.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PopQueue {
    /// The first offset the group never received.
    pub next: u64,
    /// Offset -> what is in flight there (changed only through
    /// `PopQueue::put` and `PopQueue::take`, which keep the deadline
    /// index in step).
    pub in_flight: BTreeMap<u64, InFlight>,
    /// (deadline, offset) of everything in flight: the due ones and the
    /// next deadline without a walk over every message in flight (the
    /// single writer decides every receive).
    by_deadline: BTreeSet<(u64, u64)>,
    /// The end of the last record applied (replay skips records before it).
    pub applied: u64,
}

impl PopQueue {
    /// The lowest offset not yet acknowledged.
    pub fn low(&self) -> u64 {
        self.in_flight
            .keys()
            .next()
            .copied()
            .unwrap_or(self.next)
            .min(self.next)
    }

    /// The earliest deadline in flight after `after` (ms).
    pub fn next_deadline(&self, after: u64) -> Option<u64> {
        self.by_deadline
            .range((after.saturating_add(1), 0)..)
            .next()
            .map(|(until, _)| *until)
    }

    /// Puts `f` in flight at `offset` (replacing what was there).
    fn put(&mut self, offset: u64, f: InFlight) {
        if let Some(old) = self.in_flight.insert(offset, f) {
            self.by_deadline.remove(&(old.until, offset));
        }
        self.by_deadline.insert((f.until, offset));
    }

    /// Takes `offset` out of flight.
    fn take(&mut self, offset: u64) {
        if let Some(old) = self.in_flight.remove(&offset) {
            self.by_deadline.remove(&(old.until, offset));
        }
    }
}

/// One delivery of a `PopReceive` record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    /// Queue offset.
    pub offset: u64,
    /// Attempt (1 on the first delivery).
    pub attempt: u32,
    /// Hidden until (ms).
    pub until: u64,
}

/// A pop record, decoded (or about to be encoded), with its place in the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PopOp {
    /// Group, topic, queue.
    pub key: PopKey,
    /// The record's log position (a receive's or change's receipt).
    pub pos: u64,
    /// Where the record ends.
    pub end: u64,
    /// What it does.
    pub change: PopChange,
}

/// What a pop record does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PopChange {
    /// Deliveries made: new offsets from `start` on (`next` becomes
    /// `next`), and redeliveries of offsets in flight.
    Receive {
        /// `next` before (where a queue new to the table starts).
        start: u64,
        /// `next` after.
        next: u64,
        /// The deliveries.
        deliveries: Vec<Delivery>,
    },
    /// The delivery `receipt` of `offset` was acknowledged (`dead`: moved
    /// to the dead-letter topic).
    Ack {
        /// Queue offset.
        offset: u64,
        /// The delivery's receipt.
        receipt: u64,
        /// Dead-lettered rather than consumed.
        dead: bool,
    },
    /// The deadline of delivery `receipt` of `offset` moved; this record's
    /// position is its new receipt.
    Change {
        /// Queue offset.
        offset: u64,
        /// The delivery's receipt until now.
        receipt: u64,
        /// The new deadline (ms).
        until: u64,
    },
    /// The group's offset on the queue was reset: nothing is in flight
    /// any more, and the next receive starts at `next`.
    Reset {
        /// The first offset to hand out.
        next: u64,
    },
}

/// Bytes per delivery in a `PopReceive` body.
pub const DELIVERY_LEN: usize = 20;

/// A `PopReceive` body.
pub fn encode_deliveries(deliveries: &[Delivery]) -> bytes::Bytes {
    let mut b = BytesMut::with_capacity(deliveries.len() * DELIVERY_LEN);
    for d in deliveries {
        b.put_u64_le(d.offset);
        b.put_u32_le(d.attempt);
        b.put_u64_le(d.until);
    }
    b.freeze()
}

/// Reads a `PopReceive` body; `None` when malformed.
pub fn decode_deliveries(mut body: &[u8]) -> Option<Vec<Delivery>> {
    if !body.len().is_multiple_of(DELIVERY_LEN) {
        return None;
    }
    let mut out = Vec::with_capacity(body.len() / DELIVERY_LEN);
    while body.has_remaining() {
        out.push(Delivery {
            offset: body.get_u64_le(),
            attempt: body.get_u32_le(),
            until: body.get_u64_le(),
        });
    }
    Some(out)
}

/// Why a receipt is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stale {
    /// Nothing of this group is in flight at that offset (acknowledged,
    /// dead-lettered, or never received).
    NotInFlight,
    /// In flight under a newer receipt (delivered again, or its deadline
    /// moved).
    Superseded {
        /// The receipt it has now.
        current: u64,
    },
}

/// Every queue's pop state (see the module docs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PopTable {
    queues: HashMap<PopKey, PopQueue>,
}

impl PopTable {
    /// The state of a queue, if the group ever received from it.
    pub fn get(&self, key: &PopKey) -> Option<&PopQueue> {
        self.queues.get(key)
    }

    /// Queues in the table.
    pub fn len(&self) -> usize {
        self.queues.len()
    }

    /// Whether no queue is in the table.
    pub fn is_empty(&self) -> bool {
        self.queues.is_empty()
    }

    /// Whether `group` has a queue of `topic` in the table.
    pub fn holds(&self, group: &str, topic: &str) -> bool {
        self.queues.keys().any(|(g, t, _)| g == group && t == topic)
    }

    /// Messages in flight over all queues.
    pub fn in_flight(&self) -> usize {
        self.queues.values().map(|q| q.in_flight.len()).sum()
    }

    /// Checks a receipt against what is in flight.
    ///
    /// # Errors
    /// Why it is stale.
    pub fn check(&self, key: &PopKey, offset: u64, receipt: u64) -> Result<InFlight, Stale> {
        let f = self
            .queues
            .get(key)
            .and_then(|q| q.in_flight.get(&offset))
            .ok_or(Stale::NotInFlight)?;
        if f.receipt != receipt {
            return Err(Stale::Superseded { current: f.receipt });
        }
        Ok(*f)
    }

    /// Applies a record (idempotently, see the module docs); returns the
    /// queue's lowest offset not yet acknowledged when the record changed it.
    pub fn apply(&mut self, op: &PopOp) -> Option<u64> {
        let start = match &op.change {
            PopChange::Receive { start, .. } => *start,
            PopChange::Reset { next } => *next,
            _ => 0,
        };
        let q = match self.queues.get_mut(&op.key) {
            Some(q) => q,
            None => {
                if !matches!(
                    op.change,
                    PopChange::Receive { .. } | PopChange::Reset { .. }
                ) {
                    return None;
                }
                self.queues.entry(op.key.clone()).or_insert(PopQueue {
                    next: start,
                    ..PopQueue::default()
                })
            }
        };
        if op.pos < q.applied {
            return None;
        }
        q.applied = op.end;
        let before = q.low();
        match &op.change {
            PopChange::Receive {
                next, deliveries, ..
            } => {
                for d in deliveries {
                    let f = InFlight {
                        attempt: d.attempt,
                        until: d.until,
                        receipt: op.pos,
                    };
                    q.put(d.offset, f);
                }
                q.next = q.next.max(*next);
            }
            PopChange::Ack {
                offset, receipt, ..
            } => {
                if q.in_flight
                    .get(offset)
                    .is_some_and(|f| f.receipt == *receipt)
                {
                    q.take(*offset);
                }
            }
            PopChange::Change {
                offset,
                receipt,
                until,
            } => {
                if let Some(&f) = q.in_flight.get(offset).filter(|f| f.receipt == *receipt) {
                    let f = InFlight {
                        until: *until,
                        receipt: op.pos,
                        ..f
                    };
                    q.put(*offset, f);
                }
            }
            PopChange::Reset { next } => {
                q.in_flight.clear();
                q.by_deadline.clear();
                q.next = *next;
            }
        }
        let after = q.low();
        let always = matches!(
            op.change,
            PopChange::Receive { .. } | PopChange::Reset { .. }
        );
        (after != before || always).then_some(after)
    }

    /// Forgets every queue of a deleted topic.
    pub fn remove_topic(&mut self, topic: &str) {
        self.queues.retain(|(_, t, _), _| t != topic);
    }

    /// Keeps the queues of topics `keep` says exist.
    pub fn retain_topics(&mut self, keep: impl Fn(&str) -> bool) {
        self.queues.retain(|(_, t, _), _| keep(t));
    }

    /// Every queue's lowest offset not yet acknowledged (the committed
    /// offsets of pop groups).
    pub fn lows(&self) -> Vec<(PopKey, u64)> {
        self.queues
            .iter()
            .map(|(k, q)| (k.clone(), q.low()))
            .collect()
    }

    /// Appends the table to a checkpoint:
    ///
    /// ```text
    /// u32 queue count, per queue: u16 len + group, u16 len + topic,
    /// u32 queue, u64 next, u64 applied, u32 in flight count,
    /// per message: u64 offset, u32 attempt, u64 deadline, u64 receipt
    /// ```
    pub fn encode(&self, b: &mut BytesMut) {
        b.put_u32_le(self.queues.len() as u32);
        for ((group, topic, queue), q) in &self.queues {
            put_name(b, group);
            put_name(b, topic);
            b.put_u32_le(*queue);
            b.put_u64_le(q.next);
            b.put_u64_le(q.applied);
            b.put_u32_le(q.in_flight.len() as u32);
            for (offset, f) in &q.in_flight {
                b.put_u64_le(*offset);
                b.put_u32_le(f.attempt);
                b.put_u64_le(f.until);
                b.put_u64_le(f.receipt);
            }
        }
    }

    /// Reads what [`PopTable::encode`] wrote; `None` when malformed.
    pub fn decode(b: &mut &[u8]) -> Option<PopTable> {
        if b.remaining() < 4 {
            return None;
        }
        let n = b.get_u32_le();
        let mut t = PopTable::default();
        for _ in 0..n {
            let group = get_name(b)?;
            let topic = get_name(b)?;
            if b.remaining() < 24 {
                return None;
            }
            let queue = b.get_u32_le();
            let mut q = PopQueue {
                next: b.get_u64_le(),
                applied: b.get_u64_le(),
                ..PopQueue::default()
            };
            let m = b.get_u32_le() as usize;
            if b.remaining() < m.checked_mul(28)? {
                return None;
            }
            for _ in 0..m {
                let offset = b.get_u64_le();
                let f = InFlight {
                    attempt: b.get_u32_le(),
                    until: b.get_u64_le(),
                    receipt: b.get_u64_le(),
                };
                q.put(offset, f);
            }
            t.queues.insert((group, topic, queue), q);
        }
        Some(t)
    }
}

/// What a receive asks of one queue (decided by the single writer).
#[derive(Debug, Clone)]
pub struct PopPick {
    /// Group, topic, queue.
    pub key: PopKey,
    /// At most this many deliveries.
    pub max: u32,
    /// Broker time now (ms): messages whose deadline is not after it are due.
    pub now: u64,
    /// The deadline of the deliveries made (ms).
    pub until: u64,
    /// Tag hashes to deliver (empty: all); others are passed over for good.
    pub tags: Vec<u64>,
    /// A FIFO group: a queue with a message in flight and not due hands
    /// out nothing.
    pub fifo: bool,
    /// Deliver nothing whose record ends past this log position (under
    /// sync replication: not yet on every in-sync replica).
    pub log_limit: u64,
}

/// A pop command for the single writer.
pub(crate) enum PopCmd {
    /// Receive from one queue; the deliveries go to `deliveries` as soon
    /// as decided (the reply says whether their record was written). The
    /// pick is boxed: inline, it made every write command (sends too)
    /// larger than a move in registers (see `store::size_tests`).
    Receive {
        pick: Box<PopPick>,
        queue: std::sync::Arc<super::consume_queue::ConsumeQueue>,
        deliveries: tokio::sync::oneshot::Sender<Vec<Delivery>>,
    },
    /// Acknowledge a delivery.
    Ack {
        key: PopKey,
        offset: u64,
        receipt: u64,
        dead: bool,
    },
    /// Move a delivery's deadline.
    Change {
        key: PopKey,
        offset: u64,
        receipt: u64,
        until: u64,
    },
    /// Reset the group's offset on the queue `of` (refused once it is
    /// discarded: its topic deleted).
    Reset {
        key: PopKey,
        next: u64,
        of: std::sync::Arc<super::consume_queue::ConsumeQueue>,
    },
}

/// Why a receipt is refused, for a person.
pub fn describe(stale: &Stale, key: &PopKey, offset: u64) -> String {
    let (group, topic, queue) = key;
    match stale {
        Stale::NotInFlight => format!(
            "the receipt handle names no message in flight for group '{group}': offset {offset} \
             of {topic}:{queue} was acknowledged or dead-lettered already, never received, or \
             the group's offset was reset since"
        ),
        Stale::Superseded { .. } => format!(
            "the receipt handle is stale: offset {offset} of {topic}:{queue} was delivered to \
             group '{group}' again, or its invisible time changed, under a newer handle"
        ),
    }
}

/// What one queue's receive decided: the change to record, if any.
pub(crate) fn decide(
    table: &PopTable,
    pick: &PopPick,
    cq: &super::consume_queue::ConsumeQueue,
    first: u64,
) -> Option<PopChange> {
    let empty = PopQueue::default();
    let state = table.get(&pick.key).unwrap_or(&empty);
    let min = cq.min_offset();
    let start = table.get(&pick.key).map_or(first, |q| q.next);
    let max = pick.max as usize;
    let mut deliveries = Vec::new();
    if pick.fifo {
        // Held while anything is in flight and not due; once all is due,
        // it comes again in queue order, first.
        if state.by_deadline.last().is_some_and(|(u, _)| *u > pick.now) {
            return None;
        }
        for (offset, f) in state.in_flight.iter().take(max) {
            deliveries.push(Delivery {
                offset: *offset,
                attempt: f.attempt.saturating_add(1),
                until: pick.until,
            });
        }
    } else {
        // The due ones, earliest deadline first (the index, not a walk
        // over everything in flight).
        for (_, offset) in state
            .by_deadline
            .range(..(pick.now.saturating_add(1), 0))
            .take(max)
        {
            let attempt = state.in_flight.get(offset).map_or(1, |f| f.attempt);
            deliveries.push(Delivery {
                offset: *offset,
                attempt: attempt.saturating_add(1),
                until: pick.until,
            });
        }
        deliveries.sort_unstable_by_key(|d| d.offset);
    }
    // A queue cut by retention past `next`: what was below is gone.
    let mut next = start.max(min);
    let room = MAX_IN_FLIGHT.saturating_sub(state.in_flight.len());
    let wanted = max.saturating_sub(deliveries.len()).min(room);
    if wanted > 0 && next < cq.max_offset() {
        let entries = cq.read(next, MAX_SCAN).unwrap_or_default();
        let mut new = 0;
        for e in entries {
            if new >= wanted || e.log_offset + u64::from(e.size) > pick.log_limit {
                break;
            }
            if pick.tags.is_empty() || pick.tags.contains(&e.tag_hash) {
                deliveries.push(Delivery {
                    offset: next,
                    attempt: 1,
                    until: pick.until,
                });
                new += 1;
            }
            next += 1;
        }
    }
    if deliveries.is_empty() && next == start {
        return None;
    }
    Some(PopChange::Receive {
        start,
        next,
        deliveries,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> PopKey {
        ("g".into(), "t".into(), 0)
    }

    fn op(pos: u64, change: PopChange) -> PopOp {
        PopOp {
            key: key(),
            pos,
            end: pos + 10,
            change,
        }
    }

    fn receive(pos: u64, start: u64, next: u64, offsets: &[(u64, u32)]) -> PopOp {
        op(
            pos,
            PopChange::Receive {
                start,
                next,
                deliveries: offsets
                    .iter()
                    .map(|&(offset, attempt)| Delivery {
                        offset,
                        attempt,
                        until: 1000,
                    })
                    .collect(),
            },
        )
    }

    #[test]
    fn acks_follow_receipts_and_replay_is_idempotent() {
        let mut t = PopTable::default();
        let ops = [
            receive(100, 5, 8, &[(5, 1), (6, 1), (7, 1)]),
            op(
                200,
                PopChange::Ack {
                    offset: 6,
                    receipt: 100,
                    dead: false,
                },
            ),
            op(
                300,
                PopChange::Change {
                    offset: 5,
                    receipt: 100,
                    until: 5000,
                },
            ),
            // Stale: the receipt of 5 is 300 now.
            op(
                400,
                PopChange::Ack {
                    offset: 5,
                    receipt: 100,
                    dead: false,
                },
            ),
            receive(500, 8, 8, &[(7, 2)]),
        ];
        for o in &ops {
            t.apply(o);
        }
        let q = t.get(&key()).unwrap();
        assert_eq!(q.next, 8);
        assert_eq!(q.low(), 5);
        assert_eq!(q.in_flight[&5].receipt, 300);
        assert_eq!(q.in_flight[&5].until, 5000);
        assert_eq!(q.in_flight[&7].attempt, 2);
        assert!(!q.in_flight.contains_key(&6));
        // The deadline index follows: 7 at 1000, 5 at 5000 (moved).
        assert_eq!(q.by_deadline.len(), q.in_flight.len());
        assert_eq!(q.next_deadline(0), Some(1000));
        assert_eq!(q.next_deadline(1000), Some(5000));
        assert_eq!(q.next_deadline(5000), None);
        assert_eq!(
            t.check(&key(), 5, 100),
            Err(Stale::Superseded { current: 300 })
        );
        assert_eq!(t.check(&key(), 6, 100), Err(Stale::NotInFlight));
        // Replayed again over the result: nothing changes.
        let before = t.clone();
        for o in &ops {
            t.apply(o);
        }
        assert_eq!(t, before);
    }

    /// A reset drops what is in flight (its receipts are stale) and moves
    /// `next` either way; the committed offset follows; replayed, it
    /// changes nothing more.
    #[test]
    fn a_reset_drops_what_is_in_flight_and_moves_next() {
        let mut t = PopTable::default();
        t.apply(&receive(
            100,
            0,
            5,
            &[(0, 1), (1, 1), (2, 1), (3, 1), (4, 1)],
        ));
        t.apply(&op(
            200,
            PopChange::Ack {
                offset: 0,
                receipt: 100,
                dead: false,
            },
        ));
        let back = op(300, PopChange::Reset { next: 0 });
        assert_eq!(t.apply(&back), Some(0), "the committed offset moves back");
        let q = t.get(&key()).unwrap();
        assert_eq!((q.next, q.low(), q.in_flight.len()), (0, 0, 0));
        assert_eq!(q.next_deadline(0), None);
        assert_eq!(t.check(&key(), 3, 100), Err(Stale::NotInFlight));
        let before = t.clone();
        assert_eq!(t.apply(&back), None);
        assert_eq!(t, before);
        // Forward, past what was never received.
        t.apply(&receive(400, 0, 2, &[(0, 1), (1, 1)]));
        assert_eq!(t.apply(&op(500, PopChange::Reset { next: 9 })), Some(9));
        let q = t.get(&key()).unwrap();
        assert_eq!((q.next, q.low(), q.in_flight.len()), (9, 9, 0));
        // A queue the group never received from starts there.
        let other: PopKey = ("g".into(), "t".into(), 1);
        let reset = PopOp {
            key: other.clone(),
            pos: 600,
            end: 610,
            change: PopChange::Reset { next: 4 },
        };
        assert_eq!(t.apply(&reset), Some(4));
        assert_eq!(t.get(&other).map(|q| q.next), Some(4));
    }

    #[test]
    fn the_snapshot_round_trips_and_refuses_damage() {
        let mut t = PopTable::default();
        t.apply(&receive(100, 0, 3, &[(0, 1), (1, 1), (2, 4)]));
        let mut b = BytesMut::new();
        t.encode(&mut b);
        let mut data = &b[..];
        assert_eq!(PopTable::decode(&mut data), Some(t.clone()));
        assert!(data.is_empty());
        for cut in 0..b.len() {
            let mut d = &b[..cut];
            assert!(PopTable::decode(&mut d).is_none(), "cut at {cut}");
        }
    }

    #[test]
    fn deliveries_round_trip() {
        let d = vec![
            Delivery {
                offset: 1,
                attempt: 2,
                until: 3,
            },
            Delivery {
                offset: u64::MAX,
                attempt: u32::MAX,
                until: 9,
            },
        ];
        assert_eq!(decode_deliveries(&encode_deliveries(&d)), Some(d));
        assert_eq!(decode_deliveries(&[0; 19]), None);
    }
}
