//! The producer table: what makes a retried send idempotent.
//!
//! Per producer id: its token (the secret that proves ownership) and when
//! it was last used; per (producer id, topic, queue): the sequence ranges
//! and results of the last [`KEPT_BATCHES`] batches it stored there. The
//! single writer checks a stamped request against it before encoding
//! (a retry of a remembered batch is answered with its first result; a
//! gap or a wrong token is refused; nothing else is stored) and records the
//! batch as it encodes it, so two copies of one request in one write batch
//! still store once.
//!
//! Like everything else it is derived from the log: recovery and a slave's
//! replay rebuild it from stamped record groups and `ProducerInit` records,
//! starting from the snapshot in the checkpoint (batches whose records are
//! all below the checkpoint's position; later ones are replayed).
//!
//! Prepares of a producer share one sequence per broker, kept under the
//! pseudo-queue [`PREPARE_KEY`] with the transaction id as the "offset".

use std::collections::VecDeque;

use bytes::{Buf, BufMut, BytesMut};
use foldhash::HashMap;
use txmq_protocol::{ErrorCode, ProducerStamp};

/// Batches remembered per (producer id, topic, queue), as in Kafka.
pub const KEPT_BATCHES: usize = 5;

/// The pseudo-topic under which a producer's prepares are sequenced.
pub const PREPARE_KEY: &str = "%PREPARE%";

/// Producer ids of an epoch start at `epoch << EPOCH_SHIFT`: a master
/// elected at a newer epoch hands out ids no earlier master could have,
/// whatever of their log it holds.
const EPOCH_SHIFT: u32 = 40;

/// One stored batch: its sequence range and the result it got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batch {
    /// Sequence of its first message.
    pub first_seq: u64,
    /// Messages in it (1 for a prepare).
    pub count: u32,
    /// Queue offset of its first message (a prepare: the tx id).
    pub first_offset: u64,
    /// Log position right after its records.
    pub end: u64,
}

/// What to do with a stamped request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The next in sequence: store it.
    Fresh,
    /// Stored before: answer with this.
    Duplicate(Batch),
    /// Store nothing; answer this error.
    Refused(ErrorCode, String),
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Producer {
    token: u64,
    /// Broker clock, ms.
    last_used: u64,
    queues: HashMap<String, HashMap<u32, VecDeque<Batch>>>,
}

/// Producer ids, tokens and recent batches (see the module docs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProducerTable {
    producers: HashMap<u64, Producer>,
    /// The next id to hand out (ids below it may have been handed out).
    next_id: u64,
}

impl ProducerTable {
    /// Checks a stamped request of `count` messages (1 for a prepare) for
    /// `topic`/`queue` at broker time `now`; ids unused for `expiry_ms` are
    /// forgotten first.
    pub fn check(
        &mut self,
        stamp: &ProducerStamp,
        topic: &str,
        queue: u32,
        count: u32,
        now: u64,
        expiry_ms: u64,
    ) -> Verdict {
        let pid = stamp.producer_id;
        let Some(p) = self.producers.get_mut(&pid) else {
            return Verdict::Refused(
                ErrorCode::UnknownProducerId,
                format!(
                    "producer id {pid} is unknown here (never handed out by this broker group, \
                     or forgotten); ask for a new one"
                ),
            );
        };
        if p.last_used.saturating_add(expiry_ms) < now {
            self.producers.remove(&pid);
            return Verdict::Refused(
                ErrorCode::UnknownProducerId,
                format!(
                    "producer id {pid} was forgotten after {} unused; ask for a new one",
                    humantime::format_duration(std::time::Duration::from_millis(expiry_ms))
                ),
            );
        }
        if p.token != stamp.token {
            return Verdict::Refused(
                ErrorCode::ProducerFenced,
                format!(
                    "producer id {pid} belongs to another producer (wrong token); nothing stored"
                ),
            );
        }
        let s = stamp.sequence;
        let batches = p.queues.get(topic).and_then(|q| q.get(&queue));
        let verdict = match batches.and_then(|b| b.back().map(|last| (b, last))) {
            None if s == 0 => Verdict::Fresh,
            None => Verdict::Refused(
                ErrorCode::OutOfOrderSequence,
                format!(
                    "sequence {s} of producer id {pid} on {} but nothing of it is stored there: \
                     expected 0; nothing stored",
                    place(topic, queue)
                ),
            ),
            Some((batches, last)) => {
                let next = last.first_seq + u64::from(last.count);
                if s == next {
                    Verdict::Fresh
                } else if let Some(b) = batches
                    .iter()
                    .find(|b| b.first_seq == s && b.count == count)
                {
                    Verdict::Duplicate(*b)
                } else if s > next {
                    Verdict::Refused(
                        ErrorCode::OutOfOrderSequence,
                        format!(
                            "sequence {s} of producer id {pid} on {}: expected {next} (an earlier \
                             send was not stored); nothing stored",
                            place(topic, queue)
                        ),
                    )
                } else {
                    // Below the next one: stored before (the broker takes
                    // sequences only in order), by a batch no longer
                    // remembered. Storing it again would be a duplicate.
                    Verdict::Refused(
                        ErrorCode::DuplicateSequence,
                        format!(
                            "sequence {s} ({count} messages) of producer id {pid} on {} was \
                             stored before, by a batch older than the last {KEPT_BATCHES} \
                             remembered: its first answer is forgotten; nothing stored now",
                            place(topic, queue)
                        ),
                    )
                }
            }
        };
        if !matches!(verdict, Verdict::Refused(..)) {
            p.last_used = p.last_used.max(now);
        }
        verdict
    }

    /// Remembers a stored batch (idempotent: a batch already remembered is
    /// left as it is). `at` is its store time.
    pub fn record(&mut self, producer_id: u64, topic: &str, queue: u32, batch: Batch, at: u64) {
        let p = self.producers.entry(producer_id).or_default();
        p.last_used = p.last_used.max(at);
        let batches = match p.queues.get_mut(topic) {
            Some(q) => q.entry(queue).or_default(),
            None => p
                .queues
                .entry(topic.to_string())
                .or_default()
                .entry(queue)
                .or_default(),
        };
        // A producer's batches come in sequence: the new one goes last.
        if batches
            .back()
            .is_none_or(|last| last.first_seq < batch.first_seq)
        {
            batches.push_back(batch);
            // More than one over after a checkpoint that kept more.
            while batches.len() > KEPT_BATCHES {
                batches.pop_front();
            }
            return;
        }
        if batches.iter().any(|b| b.first_seq == batch.first_seq) {
            return;
        }
        let at = batches
            .iter()
            .position(|b| b.first_seq > batch.first_seq)
            .unwrap_or(batches.len());
        batches.insert(at, batch);
        while batches.len() > KEPT_BATCHES {
            batches.pop_front();
        }
    }

    /// Forgets a batch recorded for a write that then failed.
    pub fn unrecord(&mut self, producer_id: u64, topic: &str, queue: u32, first_seq: u64) {
        if let Some(batches) = self
            .producers
            .get_mut(&producer_id)
            .and_then(|p| p.queues.get_mut(topic))
            .and_then(|q| q.get_mut(&queue))
        {
            batches.retain(|b| b.first_seq != first_seq);
        }
    }

    /// The next producer id for a master at `epoch` (not yet handed out:
    /// see [`ProducerTable::init`]).
    pub fn next_id(&self, epoch: u64) -> u64 {
        self.next_id.max(epoch << EPOCH_SHIFT).max(1)
    }

    /// A producer id handed out (by this writer, or replayed): known from
    /// now on, and never handed out again.
    pub fn init(&mut self, producer_id: u64, token: u64, at: u64) {
        self.next_id = self.next_id.max(producer_id.saturating_add(1));
        let p = self.producers.entry(producer_id).or_default();
        p.token = token;
        p.last_used = p.last_used.max(at);
    }

    /// Forgets every batch, keeping the ids (a log cut back: the replay of
    /// what is left brings back the batches it holds).
    pub fn forget_batches(&mut self) {
        for p in self.producers.values_mut() {
            p.queues.clear();
        }
    }

    /// Forgets a producer id whose init record could not be written.
    pub fn uninit(&mut self, producer_id: u64) {
        self.producers.remove(&producer_id);
    }

    /// Forgets producer ids unused for `expiry_ms` at broker time `now`.
    pub fn expire(&mut self, now: u64, expiry_ms: u64) -> usize {
        let before = self.producers.len();
        self.producers
            .retain(|_, p| p.last_used.saturating_add(expiry_ms) >= now);
        before - self.producers.len()
    }

    /// The token of a known producer id.
    pub fn token(&self, producer_id: u64) -> Option<u64> {
        self.producers.get(&producer_id).map(|p| p.token)
    }

    /// Producer ids known.
    pub fn len(&self) -> usize {
        self.producers.len()
    }

    /// Whether no producer id is known.
    pub fn is_empty(&self) -> bool {
        self.producers.is_empty()
    }

    /// The batches remembered for a producer id on a queue, oldest first.
    pub fn batches(&self, producer_id: u64, topic: &str, queue: u32) -> Vec<Batch> {
        self.producers
            .get(&producer_id)
            .and_then(|p| p.queues.get(topic))
            .and_then(|q| q.get(&queue))
            .map(|b| b.iter().copied().collect())
            .unwrap_or_default()
    }

    /// The table as of log position `position`, for the checkpoint: batches
    /// ending past it are left out (replay brings them back if they
    /// survived a crash), producer ids are all kept (an id handed out is
    /// never handed out again, durable or not).
    pub fn encode_below(&self, position: u64, b: &mut BytesMut) {
        b.put_u64_le(self.next_id);
        b.put_u32_le(self.producers.len() as u32);
        for (pid, p) in &self.producers {
            b.put_u64_le(*pid);
            b.put_u64_le(p.token);
            b.put_u64_le(p.last_used);
            let queues: Vec<_> = p
                .queues
                .iter()
                .flat_map(|(topic, qs)| qs.iter().map(move |(q, bs)| (topic, *q, bs)))
                .collect();
            b.put_u32_le(queues.len() as u32);
            for (topic, queue, batches) in queues {
                super::checkpoint::put_name(b, topic);
                b.put_u32_le(queue);
                let kept: Vec<_> = batches.iter().filter(|x| x.end <= position).collect();
                b.put_u8(kept.len() as u8);
                for x in kept {
                    b.put_u64_le(x.first_seq);
                    b.put_u32_le(x.count);
                    b.put_u64_le(x.first_offset);
                    b.put_u64_le(x.end);
                }
            }
        }
    }

    /// Reads what [`ProducerTable::encode_below`] wrote; `None` when
    /// malformed.
    pub fn decode(b: &mut &[u8]) -> Option<ProducerTable> {
        let mut t = ProducerTable::default();
        if b.remaining() < 12 {
            return None;
        }
        t.next_id = b.get_u64_le();
        let n = b.get_u32_le();
        for _ in 0..n {
            if b.remaining() < 28 {
                return None;
            }
            let pid = b.get_u64_le();
            let mut p = Producer {
                token: b.get_u64_le(),
                last_used: b.get_u64_le(),
                queues: HashMap::default(),
            };
            let nq = b.get_u32_le();
            for _ in 0..nq {
                let topic = super::checkpoint::get_name(b)?;
                if b.remaining() < 5 {
                    return None;
                }
                let queue = b.get_u32_le();
                let nb = b.get_u8() as usize;
                if b.remaining() < nb * 28 {
                    return None;
                }
                let batches = p.queues.entry(topic).or_default().entry(queue).or_default();
                for _ in 0..nb {
                    batches.push_back(Batch {
                        first_seq: b.get_u64_le(),
                        count: b.get_u32_le(),
                        first_offset: b.get_u64_le(),
                        end: b.get_u64_le(),
                    });
                }
            }
            t.producers.insert(pid, p);
        }
        Some(t)
    }
}

fn place(topic: &str, queue: u32) -> String {
    if topic == PREPARE_KEY {
        "its prepares".to_string()
    } else {
        format!("{topic}:{queue}")
    }
}

/// A random token for a new producer id, from the system's secure random
/// source: another connection cannot guess it to write under the id.
pub fn new_token() -> u64 {
    let mut bytes = [0u8; 8];
    txmq_remoting::acl::random_fill(&mut bytes);
    u64::from_le_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 86_400_000;

    fn stamp(pid: u64, token: u64, sequence: u64) -> ProducerStamp {
        ProducerStamp {
            producer_id: pid,
            token,
            sequence,
        }
    }

    fn batch(first_seq: u64, count: u32, first_offset: u64) -> Batch {
        Batch {
            first_seq,
            count,
            first_offset,
            end: 1000 + first_offset,
        }
    }

    fn code(v: Verdict) -> Option<ErrorCode> {
        match v {
            Verdict::Refused(c, _) => Some(c),
            _ => None,
        }
    }

    #[test]
    fn sequences_run_on_duplicates_answer_and_gaps_refuse() {
        let mut t = ProducerTable::default();
        t.init(7, 99, 0);
        assert_eq!(t.check(&stamp(7, 99, 0), "t", 0, 3, 1, DAY), Verdict::Fresh);
        t.record(7, "t", 0, batch(0, 3, 10), 1);
        assert_eq!(
            t.check(&stamp(7, 99, 0), "t", 0, 3, 2, DAY),
            Verdict::Duplicate(batch(0, 3, 10))
        );
        assert_eq!(t.check(&stamp(7, 99, 3), "t", 0, 1, 2, DAY), Verdict::Fresh);
        assert_eq!(
            code(t.check(&stamp(7, 99, 4), "t", 0, 1, 2, DAY)),
            Some(ErrorCode::OutOfOrderSequence)
        );
        // Another queue starts at 0.
        assert_eq!(
            code(t.check(&stamp(7, 99, 3), "t", 1, 1, 2, DAY)),
            Some(ErrorCode::OutOfOrderSequence)
        );
        assert_eq!(t.check(&stamp(7, 99, 0), "t", 1, 1, 2, DAY), Verdict::Fresh);
        // Same start, other length: not the batch that was stored, but
        // its sequences were: never stored again.
        assert_eq!(
            code(t.check(&stamp(7, 99, 0), "t", 0, 2, 2, DAY)),
            Some(ErrorCode::DuplicateSequence)
        );
    }

    #[test]
    fn only_the_last_five_batches_are_remembered() {
        let mut t = ProducerTable::default();
        t.init(1, 1, 0);
        for i in 0..7 {
            t.record(1, "t", 0, batch(i, 1, i), 0);
        }
        let kept: Vec<u64> = t.batches(1, "t", 0).iter().map(|b| b.first_seq).collect();
        assert_eq!(kept, vec![2, 3, 4, 5, 6]);
        assert!(matches!(
            t.check(&stamp(1, 1, 2), "t", 0, 1, 0, DAY),
            Verdict::Duplicate(_)
        ));
        assert_eq!(
            code(t.check(&stamp(1, 1, 1), "t", 0, 1, 0, DAY)),
            Some(ErrorCode::DuplicateSequence)
        );
        // Replaying a batch twice (checkpoint, then replay) keeps one.
        t.record(1, "t", 0, batch(6, 1, 6), 0);
        assert_eq!(t.batches(1, "t", 0).len(), 5);
        // A batch recorded after a later one still takes its place in order.
        t.record(1, "t", 1, batch(0, 1, 0), 0);
        t.record(1, "t", 1, batch(2, 1, 2), 0);
        t.record(1, "t", 1, batch(1, 1, 1), 0);
        let kept: Vec<u64> = t.batches(1, "t", 1).iter().map(|b| b.first_seq).collect();
        assert_eq!(kept, vec![0, 1, 2]);
    }

    #[test]
    fn unknown_forged_and_expired_ids_are_refused() {
        let mut t = ProducerTable::default();
        assert_eq!(
            code(t.check(&stamp(5, 1, 0), "t", 0, 1, 0, DAY)),
            Some(ErrorCode::UnknownProducerId)
        );
        t.init(5, 1, 0);
        assert_eq!(
            code(t.check(&stamp(5, 2, 0), "t", 0, 1, 0, DAY)),
            Some(ErrorCode::ProducerFenced)
        );
        assert_eq!(
            t.check(&stamp(5, 1, 0), "t", 0, 1, DAY, DAY),
            Verdict::Fresh
        );
        assert_eq!(
            code(t.check(&stamp(5, 1, 1), "t", 0, 1, 2 * DAY + 1, DAY)),
            Some(ErrorCode::UnknownProducerId)
        );
        assert!(t.is_empty());
        t.init(6, 1, 0);
        t.init(8, 1, 5 * DAY);
        assert_eq!(t.expire(5 * DAY, DAY), 1);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn ids_are_never_handed_out_twice_and_jump_to_the_epoch() {
        let mut t = ProducerTable::default();
        let a = t.next_id(0);
        t.init(a, 1, 0);
        let b = t.next_id(0);
        assert!(b > a);
        t.init(b, 1, 0);
        t.uninit(b);
        assert!(t.next_id(0) > b, "an id whose record failed is not reused");
        let c = t.next_id(3);
        assert_eq!(c, 3 << EPOCH_SHIFT);
        t.init(c, 1, 0);
        assert!(t.next_id(2) > c, "an older epoch never goes back");
    }

    #[test]
    fn the_checkpoint_keeps_batches_below_its_position() {
        let mut t = ProducerTable::default();
        t.init(3, 42, 7);
        t.record(3, "orders", 2, batch(0, 2, 0), 7);
        t.record(3, "orders", 2, batch(2, 1, 500), 8);
        t.record(3, PREPARE_KEY, 0, batch(0, 1, 9), 8);
        let mut b = BytesMut::new();
        t.encode_below(1100, &mut b);
        let mut data = &b[..];
        let back = ProducerTable::decode(&mut data).expect("decodes");
        assert!(data.is_empty());
        assert_eq!(back.batches(3, "orders", 2), vec![batch(0, 2, 0)]);
        assert_eq!(back.batches(3, PREPARE_KEY, 0), vec![batch(0, 1, 9)]);
        assert_eq!(back.next_id(0), 4);
        assert_eq!(
            back.clone().check(&stamp(3, 42, 2), "orders", 2, 1, 9, DAY),
            Verdict::Fresh
        );
        for cut in 0..b.len() {
            let mut d = &b[..cut];
            assert!(ProducerTable::decode(&mut d).is_none(), "cut at {cut}");
        }
    }
}
