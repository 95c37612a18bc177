//! Recovery: rebuild everything derived from the commit log.
//!
//! Replays the log from the start of the segment the checkpoint points into,
//! verifying every record's checksum. The first record that is torn or
//! corrupt ends the log: the rest of its segment is zeroed and later
//! segments are deleted, so new appends continue right after the last intact
//! record. Records of a transaction group (the half messages of a prepare,
//! the visible messages of a commit) count only when the whole group is
//! there: a group cut short by a crash is cut as a whole, so a commit is
//! never half visible and never visible without being the transaction's end.
//! Replayed records rewrite their consume-queue entries (idempotently: each
//! record carries its queue offset) and consumer offsets; consume-queue
//! entries that point past the recovered end are dropped.
//!
//! Transactions still pending at the checkpoint may have been prepared long
//! before it, so the log is also scanned, headers only, from the oldest such
//! transaction, for transaction records.
//!
//! Delayed messages (see `delay.rs`) need nothing before the checkpoint: the
//! delay levels are consume queues, durable up to it, and their progress is
//! in the checkpoint's offsets. After it, a `Delayed` record is indexed into
//! its level as the writer did, and a `DelayMove` marker writes its target
//! entry and moves its level's progress, so a delivery made before a crash
//! is made once.

use std::collections::BTreeMap;
use std::sync::Arc;

use foldhash::HashMap;
use txmq_protocol::{tag_hash, validate_topic_name, MsgId, RecordRef};

use super::checkpoint::{Checkpoint, OffsetTable};
use super::commit_log::CommitLog;
use super::consume_queue::{ConsumeQueue, Entry, ENTRY_LEN};
use super::delay::{self, MoveBody, MoveKind, DELAY_TOPIC};
use super::pop::{self, PopChange, PopOp, PopTable};
use super::producers::{Batch, ProducerTable, PREPARE_KEY};
use super::record::{self, check_answer, Check, Record, RecordKind};
use super::{ensure_queues, RecoveredTransactions, RecoveredTx, StoreConfig, StoreError};
use crate::pending_map::PendingMap;

pub(crate) struct Recovered {
    pub log: CommitLog,
    pub queues: HashMap<String, Vec<Arc<ConsumeQueue>>>,
    pub offsets: OffsetTable,
    pub transactions: RecoveredTransactions,
    pub producers: ProducerTable,
    pub pop: PopTable,
    /// Where new writes start: a fresh segment past every position used
    /// before (a slave: right after its last whole record).
    pub end: u64,
    /// A slave's last whole record.
    pub last_record: Option<RecordRef>,
    /// Deleted topics and the positions below which their records no
    /// longer count.
    pub deleted: super::deleted_topics::Deleted,
}

type Queues = HashMap<String, Vec<Arc<ConsumeQueue>>>;

/// Queue ids recovery accepts from a record: far above the 1024 queues a
/// topic may have, far below what would exhaust memory creating them.
const MAX_QUEUE_ID: u32 = 1 << 16;

/// Checks a replayed record's topic and queue id.
fn plausible_queue(topic: &str, queue: u32) -> Result<(), String> {
    validate_topic_name(topic)?;
    if queue >= MAX_QUEUE_ID {
        return Err(format!("queue {queue} is out of range"));
    }
    Ok(())
}

/// A transaction group being read: it counts once all its records are there.
struct OpenGroup {
    start: u64,
    tx_id: u64,
    kind: RecordKind,
    expected: u16,
    records: Vec<(u64, u32, Record)>,
}

/// Whether a record belongs to a group: half messages, a commit's messages
/// and the consumer offsets committed with them, and an idempotent send's
/// messages carry their group's size in flags (tx ids start at 0, so aux
/// alone cannot tell).
fn is_grouped(kind: RecordKind, flags: u16) -> bool {
    matches!(
        kind,
        RecordKind::Half | RecordKind::Message | RecordKind::OffsetCommit
    ) && flags > 0
}

/// The kind of group a grouped record belongs to: `Half` for a prepare,
/// `Message` for a commit (its offset records included).
fn group_kind_of(kind: RecordKind) -> RecordKind {
    match kind {
        RecordKind::OffsetCommit => RecordKind::Message,
        other => other,
    }
}

/// Whether a record continues the open group of transaction `tx_id` of
/// kind `group_kind`: groups are written contiguously, so anything else
/// inside one means it was torn.
fn continues(tx_id: u64, group_kind: RecordKind, kind: RecordKind, flags: u16, aux: u64) -> bool {
    is_grouped(kind, flags) && tx_id == aux && group_kind == group_kind_of(kind)
}

/// The queues a replayed record may name: found or made.
pub(crate) trait QueueSet {
    /// Queue `queue` of `topic`, made (with the ones below it) when missing.
    ///
    /// # Errors
    /// I/O errors making it.
    fn queue(&mut self, topic: &str, queue: u32) -> Result<Arc<ConsumeQueue>, StoreError>;
    /// The queue of delay level `level`.
    ///
    /// # Errors
    /// [`StoreError::NoQueue`] for a level that does not exist.
    fn level(&mut self, level: u32) -> Result<Arc<ConsumeQueue>, StoreError>;
    /// Forgets deleted topic `topic` (its records below log position
    /// `below`): its queues and their files; live, also its committed
    /// offsets, and the delete is recorded for the next recovery.
    ///
    /// # Errors
    /// I/O errors removing the files.
    fn remove_topic(&mut self, topic: &str, below: u64) -> Result<(), StoreError>;
}

/// Recovery's queues: a map it owns until the store opens.
struct MapQueues<'a> {
    config: &'a StoreConfig,
    map: &'a mut Queues,
}

impl QueueSet for MapQueues<'_> {
    fn queue(&mut self, topic: &str, queue: u32) -> Result<Arc<ConsumeQueue>, StoreError> {
        if self
            .map
            .get(topic)
            .is_none_or(|q| q.len() <= queue as usize)
        {
            ensure_queues(self.config, self.map, topic, queue + 1)?;
        }
        Ok(self.map[topic][queue as usize].clone())
    }

    fn level(&mut self, level: u32) -> Result<Arc<ConsumeQueue>, StoreError> {
        self.map
            .get(DELAY_TOPIC)
            .and_then(|levels| levels.get(level as usize))
            .cloned()
            .ok_or_else(|| StoreError::NoQueue {
                topic: DELAY_TOPIC.to_string(),
                queue: level,
            })
    }

    fn remove_topic(&mut self, topic: &str, _below: u64) -> Result<(), StoreError> {
        // The delete's record stays in the log: nothing more to record.
        self.map
            .remove(topic)
            .iter()
            .flatten()
            .for_each(|q| q.discard());
        super::remove_queue_files(self.config, topic)
    }
}

/// What a change to a transaction's state looks like to the broker's
/// transaction table (a slave's, fed by replication).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxChange {
    /// Prepared, or its state (checks, parked, where its halves are) changed.
    Pending(RecoveredTx),
    /// Committed (true) or rolled back, with its first message id.
    Ended(u64, bool, MsgId),
}

/// What replay keeps between records: open transaction groups and the
/// transactions' state. Recovery uses it once; a slave keeps one for its
/// whole run and feeds it every record replication brings.
#[derive(Default)]
pub(crate) struct ReplayState {
    pending: PendingMap<RecoveredTx>,
    ended: BTreeMap<u64, (bool, MsgId)>,
    /// Ended transactions whose half messages were carried forward: where
    /// the first one is now, and how many (see `RecoveredTransactions`).
    ended_carried: BTreeMap<u64, (u64, u16)>,
    group: Option<OpenGroup>,
    /// Live (a slave): record what changed, for the store and the broker.
    live: bool,
    /// Half-message positions that became pending (true) or not (false).
    pub(crate) halves_changes: Vec<(u64, bool)>,
    /// Transactions whose state changed.
    pub(crate) tx_changes: Vec<TxChange>,
}

impl ReplayState {
    /// A state for a slave's replication, starting from what recovery found.
    pub(crate) fn live(recovered: &RecoveredTransactions) -> ReplayState {
        ReplayState {
            pending: recovered.pending.clone(),
            live: true,
            ..ReplayState::default()
        }
    }

    fn changed(&mut self, tx_id: u64) {
        if !self.live {
            return;
        }
        let change = match self.pending.get(&tx_id) {
            Some(t) => TxChange::Pending(t.clone()),
            None => match self.ended.get(&tx_id) {
                Some(&(committed, id)) => TxChange::Ended(tx_id, committed, id),
                None => return,
            },
        };
        self.tx_changes.push(change);
    }

    /// Checks that whole records `data` (checksums verified) keep the
    /// transaction groups whole, from the group open now: a group another
    /// record interrupts would be read as torn (recovery cuts it), so a
    /// slave must not store it.
    ///
    /// # Errors
    /// Where and how a group is broken.
    pub(crate) fn check_groups(&self, pos: u64, data: &[u8]) -> Result<(), String> {
        let mut open = self
            .group
            .as_ref()
            .map(|g| (g.tx_id, g.kind, g.expected, g.records.len() as u16));
        let mut rel = 0usize;
        while let Some(h) = data.get(rel..rel + record::HEADER_LEN) {
            let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
            let at = pos + rel as u64;
            let (Some(kind), flags, aux) = (
                record::kind_of(h[9]),
                u16::from_le_bytes([h[10], h[11]]),
                u64::from_le_bytes(h[56..64].try_into().unwrap_or_default()),
            ) else {
                return Err(format!("the record at {at} has an unknown kind"));
            };
            if let Some((tx_id, group_kind, _, _)) = open {
                if !continues(tx_id, group_kind, kind, flags, aux) {
                    return Err(format!(
                        "the record at {at} interrupts the transaction group of transaction {tx_id}"
                    ));
                }
            }
            if is_grouped(kind, flags) {
                let (tx_id, group_kind, expected, seen) =
                    open.unwrap_or((aux, group_kind_of(kind), flags.max(1), 0));
                open = (seen + 1 < expected).then_some((tx_id, group_kind, expected, seen + 1));
            }
            if len == 0 {
                break;
            }
            rel += len;
        }
        Ok(())
    }

    /// A slave forgets ended transactions once reported (recovery needs
    /// them for carried groups; live, a carried group is always pending).
    pub(crate) fn forget_ended(&mut self) {
        if self.live {
            self.ended.clear();
            self.ended_carried.clear();
        }
    }
}

pub(crate) struct Replayer<'a> {
    pub(crate) queues: &'a mut dyn QueueSet,
    pub(crate) offsets: &'a mut OffsetTable,
    pub(crate) batcher: &'a mut Batcher,
    pub(crate) state: &'a mut ReplayState,
    /// Producer ids and their batches.
    pub(crate) producers: &'a mut ProducerTable,
    /// The pop table (see `pop.rs`).
    pub(crate) pop: &'a mut PopTable,
    /// Live (a slave): every pop record applied, for the store's table.
    pub(crate) pop_log: Option<&'a mut Vec<PopOp>>,
    /// Below this position only transaction state is rebuilt.
    pub(crate) dispatch_from: u64,
    /// Deleted topics: their messages and offset commits below the
    /// position are ignored (see `deleted_topics.rs`); `None` live.
    pub(crate) deleted: Option<&'a super::deleted_topics::Deleted>,
    /// Recovery: the topic deletes replayed, (topic, position), so that
    /// one whose entry in `deleted-topics.log` a crash kept from being
    /// written is recorded there now. `None` live (a slave records each).
    pub(crate) deletes_seen: Option<&'a mut Vec<(String, u64)>>,
}

impl Replayer<'_> {
    /// Visits one intact record; returns where to cut the log when the
    /// record shows that an earlier group was cut short.
    pub(crate) fn visit(
        &mut self,
        rec: Record,
        pos: u64,
        size: u32,
    ) -> Result<Option<u64>, StoreError> {
        let grouped = is_grouped(rec.kind, rec.flags);
        if let Some(open) = &self.state.group {
            if !continues(open.tx_id, open.kind, rec.kind, rec.flags, rec.aux) {
                // Groups are written contiguously: another record inside one
                // means it was torn (only possible at the tail).
                return Ok(Some(open.start));
            }
        }
        if grouped {
            let open = self.state.group.get_or_insert_with(|| OpenGroup {
                start: pos,
                tx_id: rec.aux,
                kind: group_kind_of(rec.kind),
                expected: rec.flags.max(1),
                records: Vec::new(),
            });
            open.records.push((pos, size, rec));
            if open.records.len() >= open.expected as usize {
                if let Some(done) = self.state.group.take() {
                    self.complete(done)?;
                }
            }
            return Ok(None);
        }
        match rec.kind {
            RecordKind::Message => {
                if pos >= self.dispatch_from {
                    self.dispatch(&rec, pos, size)?;
                }
            }
            RecordKind::OffsetCommit => {
                if pos >= self.dispatch_from && !self.is_deleted(&rec.message.topic, pos) {
                    let group = rec.message.key.unwrap_or_default();
                    self.offsets
                        .insert((group, rec.message.topic, rec.queue), rec.queue_offset);
                }
            }
            RecordKind::TxRollback => {
                self.end_tx(rec.aux, false, rec.message.msg_id);
            }
            RecordKind::TxCheck => {
                if let Some(t) = self.state.pending.get_mut(&rec.aux) {
                    t.checks += 1;
                    t.last_check_at = rec.store_timestamp;
                    if matches!(
                        rec.flags,
                        check_answer::UNKNOWN | check_answer::COMMIT | check_answer::ROLLBACK
                    ) {
                        t.last_answer = rec.flags;
                    }
                    self.state.changed(rec.aux);
                }
            }
            RecordKind::TxPark => {
                if let Some(t) = self.state.pending.get_mut(&rec.aux) {
                    t.parked = true;
                    self.state.changed(rec.aux);
                }
            }
            RecordKind::Delayed => {
                if pos >= self.dispatch_from {
                    let (level, wake) = delay::place(rec.store_timestamp, rec.aux);
                    let entry = Entry {
                        log_offset: pos,
                        size,
                        tag_hash: wake,
                    };
                    let cq = self.level(level)?;
                    self.batcher.add(&cq, rec.queue_offset, entry)?;
                }
            }
            RecordKind::DelayMove => {
                if pos >= self.dispatch_from {
                    self.apply_move(&rec, pos)?;
                }
            }
            RecordKind::DelayedCopy => {
                if pos >= self.dispatch_from {
                    // Visible as a message, and the level entry it moved.
                    self.dispatch(&rec, pos, size)?;
                    let (level, offset) = delay::parse_copy_aux(rec.aux);
                    self.offsets.insert(delay::progress_key(level), offset + 1);
                }
            }
            RecordKind::ProducerInit => {
                self.producers
                    .init(rec.aux, rec.queue_offset, rec.store_timestamp);
            }
            RecordKind::TopicDelete => {
                if pos >= self.dispatch_from {
                    self.delete_topic(&rec.message.topic, pos)?;
                }
            }
            RecordKind::TxRecheck => {
                if let Some(t) = self.state.pending.get_mut(&rec.aux) {
                    t.parked = false;
                    t.rechecked_at = t.checks;
                    self.state.changed(rec.aux);
                }
            }
            RecordKind::PopReceive
            | RecordKind::PopAck
            | RecordKind::PopChange
            | RecordKind::PopReset => {
                if pos >= self.dispatch_from && !self.is_deleted(&rec.message.topic, pos) {
                    self.apply_pop(&rec, pos, size);
                }
            }
            RecordKind::Half => {}
        }
        Ok(None)
    }

    fn level(&mut self, level: u32) -> Result<Arc<ConsumeQueue>, StoreError> {
        self.queues.level(level)
    }

    /// Applies a pop record as the writer did; the group's committed
    /// offset on the queue follows its lowest offset not yet acknowledged.
    fn apply_pop(&mut self, rec: &Record, pos: u64, size: u32) {
        let Some(op) = pop_op(rec, pos, size) else {
            // The checksum was good, so this is a bug, not damage.
            tracing::error!(position = pos, "pop record with a malformed body; skipped");
            return;
        };
        if let Some(low) = self.pop.apply(&op) {
            self.offsets.insert(op.key.clone(), low);
        }
        if let Some(log) = self.pop_log.as_mut() {
            log.push(op);
        }
    }

    /// A topic deleted at `pos`: what its records before built goes (the
    /// entries still batched first, so none lands after the delete).
    fn delete_topic(&mut self, topic: &str, pos: u64) -> Result<(), StoreError> {
        if let Some(seen) = self.deletes_seen.as_deref_mut() {
            seen.push((topic.to_string(), pos));
        }
        self.batcher.flush()?;
        self.queues.remove_topic(topic, pos)?;
        self.offsets.retain(|(_, t, _), _| t != topic);
        self.pop.remove_topic(topic);
        Ok(())
    }

    /// A transaction ended (committed when `committed`).
    fn end_tx(&mut self, tx_id: u64, committed: bool, first_msg_id: MsgId) {
        if let Some(t) = self.state.pending.remove(&tx_id) {
            if self.state.live {
                if let Some((at, _)) = t.first_half {
                    self.state.halves_changes.push((at, false));
                }
            }
            if let Some((at, _)) = t.first_half.filter(|(at, _)| *at != tx_id) {
                self.state.ended_carried.insert(tx_id, (at, t.halves));
            }
        }
        self.state.ended.insert(tx_id, (committed, first_msg_id));
        self.state.changed(tx_id);
    }

    /// Applies a delay move as the writer did: the target entry, then the
    /// source level's progress.
    fn apply_move(&mut self, rec: &Record, pos: u64) -> Result<(), StoreError> {
        let Some(body) = MoveBody::decode(&rec.message.body) else {
            // The checksum was good, so this is a bug, not damage; the
            // level's progress still moves, as it did when it was written.
            tracing::error!(position = pos, "delay move marker with a malformed body");
            self.offsets
                .insert(delay::progress_key(rec.queue), rec.queue_offset + 1);
            return Ok(());
        };
        let entry = Entry {
            log_offset: rec.aux,
            size: body.size,
            tag_hash: body.third,
        };
        match body.kind {
            MoveKind::Queue => {
                let cq = self.queues.queue(&rec.message.topic, body.queue)?;
                self.batcher.add(&cq, body.offset, entry)?;
            }
            MoveKind::Level => {
                let cq = self.level(body.queue)?;
                self.batcher.add(&cq, body.offset, entry)?;
            }
            MoveKind::Dropped => {}
        }
        self.offsets
            .insert(delay::progress_key(rec.queue), rec.queue_offset + 1);
        Ok(())
    }

    fn complete(&mut self, group: OpenGroup) -> Result<(), StoreError> {
        match group.kind {
            RecordKind::Half => {
                let Some((_, _, first)) = group.records.first() else {
                    return Ok(());
                };
                if let Some(stamp) = first.stamp.filter(|_| group.start >= self.dispatch_from) {
                    let end = group
                        .records
                        .last()
                        .map_or(group.start, |(p, s, _)| p + u64::from(*s));
                    let batch = Batch {
                        first_seq: stamp.sequence,
                        count: 1,
                        first_offset: group.tx_id,
                        end,
                    };
                    self.producers.record(
                        stamp.producer_id,
                        PREPARE_KEY,
                        0,
                        batch,
                        first.store_timestamp,
                    );
                }
                let first_half = group.records.first().map(|(p, s, _)| (*p, *s));
                let halves = u16::try_from(group.records.len()).unwrap_or(u16::MAX);
                // Half messages carried forward past retention (written at
                // another position than their tx id) carry the state the
                // transaction had; they replace the old ones.
                let carried = group.tx_id != group.start;
                if carried && self.state.ended.contains_key(&group.tx_id) {
                    return Ok(());
                }
                let props = &first.message.properties;
                let number = |name: &str| props.get(name).and_then(|v| v.parse::<u64>().ok());
                let prepared_at = number(super::PROP_CARRIED_PREPARED_AT)
                    .filter(|_| carried)
                    .unwrap_or(first.store_timestamp);
                let checks = number(super::PROP_CARRIED_CHECKS)
                    .filter(|_| carried)
                    .unwrap_or(0) as u32;
                let parked = carried && props.contains_key(super::PROP_CARRIED_PARKED);
                let rechecked_at = number(super::PROP_CARRIED_RECHECKED)
                    .filter(|_| carried)
                    .unwrap_or(0) as u32;
                let live = self.state.live;
                let t = self
                    .state
                    .pending
                    .get_or_insert_with(group.tx_id, || RecoveredTx {
                        tx_id: group.tx_id,
                        first_half: None,
                        halves: 0,
                        prepared_at,
                        checks: 0,
                        last_check_at: 0,
                        last_answer: 0,
                        parked: false,
                        rechecked_at: 0,
                    });
                let old = t.first_half.map(|h| h.0);
                t.first_half = first_half;
                t.halves = halves;
                t.prepared_at = t.prepared_at.min(prepared_at);
                t.checks = t.checks.max(checks);
                t.parked |= parked;
                t.rechecked_at = t.rechecked_at.max(rechecked_at);
                if live {
                    if let Some(old) = old.filter(|o| *o != group.start) {
                        self.state.halves_changes.push((old, false));
                    }
                    self.state.halves_changes.push((group.start, true));
                }
                self.state.changed(group.tx_id);
            }
            RecordKind::Message
                if group
                    .records
                    .first()
                    .is_some_and(|(_, _, r)| r.stamp.is_some()) =>
            {
                // An idempotent send: its messages, and the batch it was.
                for (pos, size, rec) in &group.records {
                    if *pos >= self.dispatch_from {
                        self.dispatch(rec, *pos, *size)?;
                    }
                }
                if let (Some((_, _, first)), Some((last_pos, last_size, _))) =
                    (group.records.first(), group.records.last())
                {
                    if let Some(stamp) = first.stamp.filter(|_| group.start >= self.dispatch_from) {
                        let batch = Batch {
                            first_seq: stamp.sequence,
                            count: group.records.len() as u32,
                            first_offset: first.queue_offset,
                            end: last_pos + u64::from(*last_size),
                        };
                        self.producers.record(
                            stamp.producer_id,
                            &first.message.topic,
                            first.queue,
                            batch,
                            first.store_timestamp,
                        );
                    }
                }
            }
            _ => {
                // The group is whole: its messages become visible and its
                // consumer offsets apply, together (never one without the other).
                let first_msg_id = group
                    .records
                    .iter()
                    .find(|(_, _, r)| r.kind == RecordKind::Message)
                    .map(|(_, _, r)| r.message.msg_id)
                    .unwrap_or_default();
                self.end_tx(group.tx_id, true, first_msg_id);
                for (pos, size, rec) in group.records {
                    if pos < self.dispatch_from {
                        continue;
                    }
                    if rec.kind == RecordKind::OffsetCommit {
                        if self.is_deleted(&rec.message.topic, pos) {
                            continue;
                        }
                        let group = rec.message.key.unwrap_or_default();
                        self.offsets
                            .insert((group, rec.message.topic, rec.queue), rec.queue_offset);
                    } else {
                        self.dispatch(&rec, pos, size)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Whether a record of `topic` at `pos` belongs to a deleted topic.
    fn is_deleted(&self, topic: &str, pos: u64) -> bool {
        self.deleted
            .and_then(|d| d.get(topic))
            .is_some_and(|below| pos < *below)
    }

    fn dispatch(&mut self, rec: &Record, pos: u64, size: u32) -> Result<(), StoreError> {
        let topic = &rec.message.topic;
        if self.is_deleted(topic, pos) {
            return Ok(());
        }
        // The store only writes valid topic names and queues of existing
        // topics, so a checksummed record naming anything else comes from a
        // bug or a hand-edited file. Creating its queue would make
        // directories outside the data dir, overflow, or make billions of
        // queues: leave it out of every queue (it stays in the log).
        if let Err(why) = plausible_queue(topic, rec.queue) {
            tracing::error!(
                position = pos,
                why,
                "record names an impossible queue; not served"
            );
            return Ok(());
        }
        let cq = self.queues.queue(topic, rec.queue)?;
        let entry = Entry {
            log_offset: pos,
            size,
            tag_hash: tag_hash(rec.message.tag.as_deref()),
        };
        self.batcher.add(&cq, rec.queue_offset, entry)
    }
}

pub(crate) fn recover(
    config: &StoreConfig,
    topics: &[(String, u32)],
) -> Result<Recovered, StoreError> {
    let started = std::time::Instant::now();
    let log_dir = config.dir.join("commitlog");
    let log = CommitLog::open(&log_dir, config.segment_size).map_err(|e| {
        StoreError::io(
            format!("cannot open commit log in {}", log_dir.display()),
            &e,
        )
    })?;
    // New writes start in a fresh segment past every segment on disk, taken
    // before a torn tail is cut: a position handed out before a crash (a
    // transaction id is the position of its first half message, answered
    // under async flush before it is durable) may have been lost with the
    // tail, and must never name another record. Segment creation is
    // durable (file and directory fsync) before any of its positions is
    // handed out, so every such position lies below this one.
    let next_start = log.last_segment().map_or(0, |s| s.end());
    let mut queues = HashMap::default();
    // The delay levels, and no other queue of their topic.
    ensure_queues(config, &mut queues, DELAY_TOPIC, delay::LEVELS)?;
    for (topic, count) in topics {
        if topic != DELAY_TOPIC {
            ensure_queues(config, &mut queues, topic, *count)?;
        }
    }
    let cq_root = config.dir.join("consumequeue");
    for (topic, count) in existing_queues(&cq_root) {
        if topic != DELAY_TOPIC {
            ensure_queues(config, &mut queues, &topic, count)?;
        }
    }
    let checkpoint =
        Checkpoint::load(&config.dir).map_err(|e| StoreError::io("cannot read checkpoint", &e))?;
    let first = log.segments().first().map_or(0, |s| s.start);
    let mut deleted = super::deleted_topics::load(&config.dir)
        .map_err(|e| StoreError::io("cannot read the deleted topics", &e))?;
    let mut deletes_seen = Vec::new();
    let (mut offsets, mut checkpointed, mut oldest_pending, mut justified, mut producers, mut pop) =
        match checkpoint {
            Some(cp) => (
                cp.offsets,
                cp.position.max(first),
                cp.oldest_pending_tx,
                cp.queues,
                cp.producers,
                cp.pop,
            ),
            None => (
                OffsetTable::new(),
                first,
                None,
                None,
                ProducerTable::default(),
                PopTable::default(),
            ),
        };
    // Up to where the log was durable when the checkpoint was written.
    let durable = checkpointed;
    // A checkpoint written before a topic's delete (its position at most
    // the delete's) still holds the topic's offsets and queue entries:
    // drop them (the queues are cut to nothing); the replay from the
    // checkpoint brings back whatever came after the delete.
    for (topic, below) in &deleted {
        if checkpointed <= *below {
            offsets.retain(|(_, t, _), _| t != topic);
            if let Some(j) = justified.as_mut() {
                j.retain(|(t, _), _| t != topic);
            }
        }
    }
    // A consume queue shorter than the checkpoint says was cut or removed
    // by hand (queues are fsynced before a checkpoint names them): the
    // replay from the checkpoint would leave its entries below the
    // checkpoint missing, and their messages never delivered. Everything
    // is rebuilt from the log instead, as without a checkpoint.
    let mut short = None;
    if let Some(j) = &justified {
        for cq in queues.values().flatten() {
            let Some(&want) = j.get(&(cq.topic.clone(), cq.queue)) else {
                continue;
            };
            let has = cq.stored_end().map_err(|e| {
                StoreError::io(
                    format!("cannot read consume queue {}/{}", cq.topic, cq.queue),
                    &e,
                )
            })?;
            if has < want {
                short = Some((cq.topic.clone(), cq.queue, has, want));
                break;
            }
        }
    }
    if let Some((topic, queue, has, want)) = short {
        tracing::warn!(%topic, queue, entries = has, checkpoint_entries = want, "a consume queue is shorter than the checkpoint says (its file was cut or removed); rebuilding every consume queue from the whole commit log");
        // Only where the replay starts moves: the checkpoint's offsets,
        // producer table and pop table stay (the replay of older records
        // changes none of them: offset records are newer, or retention
        // took them; producer batches and pop records apply once), and so
        // do its justified counts (the cut of entries a crash left without
        // their record) and its durable position (below which damage is
        // no torn write).
        checkpointed = first;
        oldest_pending = None;
    }
    // Entries past what the checkpoint's records justify may have lost
    // their record or move marker in a crash (consume queues are fsynced
    // after the log, while the writer goes on): cut them; the replay from
    // the checkpoint writes back every justified one. A queue the
    // checkpoint does not list was made after it.
    if let Some(justified) = &justified {
        for cq in queues.values().flatten() {
            let next = justified
                .get(&(cq.topic.clone(), cq.queue))
                .copied()
                .unwrap_or(0);
            cq.truncate(next).map_err(|e| {
                StoreError::io(
                    format!("cannot cut consume queue {}/{}", cq.topic, cq.queue),
                    &e,
                )
            })?;
        }
    }
    // Verify the whole segment the checkpoint points into, not just what
    // follows it: a tail damaged after the checkpoint was written (a torn
    // last record, a file cut short by hand) must be found and cut too.
    // A checkpoint exactly at a segment's end (the writer rolled there)
    // points into no segment: verify the one it ends.
    let verify_from = log
        .segment_for(checkpointed)
        .or_else(|| checkpointed.checked_sub(1).and_then(|p| log.segment_for(p)))
        .map_or(checkpointed, |s| s.start.min(checkpointed));
    // Transaction records are also read (headers first) from the oldest
    // transaction still pending, and back over the segments before the
    // verified one until they hold a whole segment's worth of records (each
    // start of the broker begins a segment, so the one before may hold
    // little), so that ends repeated after a restart are still recognised.
    let previous_segment = {
        let mut back = None;
        let mut bytes = 0u64;
        for s in log
            .segments()
            .iter()
            .rev()
            .filter(|s| s.start < verify_from)
        {
            back = Some(s.start);
            bytes += s.used();
            if bytes >= config.segment_size {
                break;
            }
        }
        back
    };
    let scan_from = [
        Some(verify_from),
        previous_segment,
        oldest_pending.map(|p| p.max(first)),
    ]
    .into_iter()
    .flatten()
    .min()
    .unwrap_or(verify_from);

    let mut map_queues = MapQueues {
        config,
        map: &mut queues,
    };
    let mut batcher = Batcher::default();
    let mut state = ReplayState::default();
    let mut replayer = Replayer {
        queues: &mut map_queues,
        offsets: &mut offsets,
        batcher: &mut batcher,
        state: &mut state,
        producers: &mut producers,
        pop: &mut pop,
        pop_log: None,
        dispatch_from: verify_from,
        deleted: Some(&deleted),
        deletes_seen: Some(&mut deletes_seen),
    };
    if scan_from < verify_from {
        // Verified by an earlier run: read for transaction records only. A
        // record that does not parse here ends this scan, never the log.
        let (stopped, damaged) = replay(&log, scan_from, verify_from, false, |rec, pos, size| {
            replayer.visit(rec, pos, size)
        })?;
        if damaged.is_some() {
            tracing::warn!(position = stopped, "unreadable record before the checkpoint's segment; transaction records before it may be missed");
        }
        // Groups never span segments, and verify_from starts one.
        replayer.state.group = None;
    }
    let (mut end, mut cut) = replay(&log, verify_from, u64::MAX, true, |rec, pos, size| {
        replayer.visit(rec, pos, size)
    })?;
    if let Some(open) = replayer.state.group.take() {
        // The log ends inside a group: the write was torn; drop the whole group.
        end = open.start;
        cut = Some(open.start);
    }
    replayer.batcher.flush()?;
    // A delete whose record is in the log but whose entry a crash kept out
    // of `deleted-topics.log` (written right after the record): recorded
    // now, so that lookups and later recoveries leave the topic's older
    // records out too.
    for (topic, pos) in deletes_seen {
        if deleted.get(&topic).is_none_or(|below| *below < pos) {
            super::deleted_topics::append(&config.dir, &topic, pos).map_err(|e| {
                StoreError::io(format!("cannot record the delete of topic {topic}"), &e)
            })?;
            deleted.insert(topic, pos);
        }
    }
    // A topic deleted and made again: the replay of its delete's record
    // (the replay starts at the start of the checkpoint's segment) took
    // the queues the topic table lists, and only those that records came
    // after the delete to were made again. The others come back empty.
    for (topic, count) in topics {
        if topic != DELAY_TOPIC {
            ensure_queues(config, &mut queues, topic, *count)?;
        }
    }
    let transactions = RecoveredTransactions {
        pending: std::mem::take(&mut state.pending),
        ended: std::mem::take(&mut state.ended)
            .into_iter()
            .map(|(tx_id, (committed, first))| (tx_id, committed, first))
            .collect(),
        ended_carried: std::mem::take(&mut state.ended_carried)
            .into_iter()
            .map(|(tx_id, (at, count))| (tx_id, at, count))
            .collect(),
    };
    if let Some(pos) = cut {
        let damaged = log.segment_for(pos).map_or_else(
            || log_dir.display().to_string(),
            |s| s.path.display().to_string(),
        );
        // Only a tail may be cut: a damaged record followed by segments that
        // hold data is damage in the middle of acknowledged data.
        if let Some(later) = log
            .segments()
            .into_iter()
            .find(|s| s.start > pos && s.map.get(..4).is_some_and(|b| b != [0, 0, 0, 0]))
        {
            return Err(StoreError::Io {
                context: format!("the commit log is damaged at position {pos} (in {damaged})"),
                message: format!(
                    "a record there is corrupt but later segments hold data (from {}); refusing to cut acknowledged data. Restore the segment from a backup, or move it and the ones after it out of {} to discard them",
                    later.path.display(),
                    log_dir.display()
                ),
            });
        }
        // Nor is damage below the checkpoint's position a torn write: the
        // log was durable up to there when the checkpoint was written.
        if pos < durable {
            return Err(StoreError::Io {
                context: format!("the commit log is damaged at position {pos} (in {damaged})"),
                message: format!(
                    "a record there is corrupt below position {durable}, up to which the checkpoint says the log was durable: not a torn write; refusing to cut acknowledged data. Restore the segment from a backup; or, to cut the log at the damage and lose the records after it, remove {}",
                    config.dir.join("checkpoint").display()
                ),
            });
        }
        tracing::warn!(
            position = pos,
            "commit log has a torn or corrupt tail; cutting it"
        );
    }
    // What was replayed may have been in the page cache only (a kill -9):
    // make it durable before anything is acknowledged or checkpointed on it,
    // and before the new segment can hold data (a power cut must never
    // leave data after a torn record).
    for seg in log.segments() {
        if seg.end() > verify_from && seg.start < end {
            seg.file
                .sync_data()
                .map_err(|e| StoreError::io(format!("cannot sync {}", seg.path.display()), &e))?;
        }
    }
    // The segment the records end in (not the one before an empty
    // segment the end is the start of: its records may end sooner).
    if let Some(seg) = log
        .segment_for(end)
        .or_else(|| log.segment_for(end.checked_sub(1)?))
    {
        seg.set_used_until(end);
    }
    // A master starts a fresh segment past every position used before. A
    // slave continues right after its last whole record, at the master's
    // positions (they are the master's to hand out), with nothing of its
    // own past that record.
    let (end, last_record, fresh) = if config.replica {
        let last = last_record_before(&log, end);
        let ref_of = |r: RecordAt| RecordRef {
            pos: r.pos,
            crc: r.crc,
        };
        (
            last.map_or(0, |r| r.pos + u64::from(r.len)),
            last.map(ref_of),
            None,
        )
    } else {
        (end, None, Some(next_start))
    };
    if let Some(start) = fresh {
        // Created before the cut deletes anything: a crash in between
        // leaves it on disk, so the next start begins past it too.
        log.create_segment(start).map_err(|e| {
            StoreError::io(format!("cannot create commit-log segment at {start}"), &e)
        })?;
    }
    // Zero whatever lies past the end (a torn tail, or bytes a lost write
    // left behind), so that nothing stale can ever read as a record; empty
    // segments between the end and the new one (a slave: all later ones) go.
    let until = fresh.unwrap_or(u64::MAX);
    if end < until {
        log.cut(end, until)
            .map_err(|e| StoreError::io("cannot cut the tail of the commit log", &e))?;
    }
    // The ends of the segments read (and cut) are known now: kept for the
    // next start, whose look back may not reach them.
    if let Err(e) = log.save_ends() {
        tracing::debug!(error = %e, "cannot write the segments' ends");
    }
    // Pop state of topics deleted meanwhile goes with them.
    pop.retain_topics(|t| queues.contains_key(t));
    let log_min = log.min_offset();
    for cq in queues.values().flatten() {
        cq.recover(log_min, end).map_err(|e| {
            StoreError::io(
                format!("cannot recover consume queue {}/{}", cq.topic, cq.queue),
                &e,
            )
        })?;
    }
    // An offset past its queue's end names messages this log does not hold
    // (a replica cut back to a new master's history, whose offsets came
    // from the old checkpoint): the messages written there next are new to
    // the group, so it resumes at the end instead.
    for ((_, topic, queue), offset) in offsets.iter_mut() {
        let end = queues
            .get(topic)
            .and_then(|q| q.get(*queue as usize))
            .map(|cq| cq.next_offset());
        if let Some(end) = end.filter(|e| *offset > *e) {
            *offset = end;
        }
    }
    tracing::info!(
        end,
        next_start = fresh,
        slave = config.replica,
        verified_bytes = end.saturating_sub(verify_from),
        pending_transactions = transactions.pending.len(),
        producer_ids = producers.len(),
        queues = queues.values().map(Vec::len).sum::<usize>(),
        elapsed = ?started.elapsed(),
        "store recovered"
    );
    Ok(Recovered {
        log,
        queues,
        offsets,
        transactions,
        producers,
        pop,
        end: fresh.unwrap_or(end),
        last_record,
        deleted,
    })
}

/// The pop record `rec` at `pos`, decoded.
fn pop_op(rec: &Record, pos: u64, size: u32) -> Option<PopOp> {
    let change = match rec.kind {
        RecordKind::PopReceive => PopChange::Receive {
            start: rec.aux,
            next: rec.queue_offset,
            deliveries: pop::decode_deliveries(&rec.message.body)?,
        },
        RecordKind::PopAck => PopChange::Ack {
            offset: rec.queue_offset,
            receipt: rec.aux,
            dead: rec.flags == 1,
        },
        RecordKind::PopChange => PopChange::Change {
            offset: rec.queue_offset,
            receipt: rec.aux,
            until: u64::from_le_bytes(rec.message.body.get(..8)?.try_into().ok()?),
        },
        RecordKind::PopReset => PopChange::Reset {
            next: rec.queue_offset,
        },
        _ => return None,
    };
    Some(PopOp {
        key: (
            rec.message.key.clone().unwrap_or_default(),
            rec.message.topic.clone(),
            rec.queue,
        ),
        pos,
        end: pos + u64::from(size),
        change,
    })
}

/// A record's place, length and stored checksum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RecordAt {
    pub pos: u64,
    pub len: u32,
    pub crc: u32,
}

/// The last record that ends at or before `end`: found by walking the
/// length fields of the last segment below `end` that holds any (records
/// there were verified by recovery or on arrival).
pub(crate) fn last_record_before(log: &CommitLog, end: u64) -> Option<RecordAt> {
    for seg in log.segments().iter().rev().filter(|s| s.start < end) {
        let limit = (end.min(seg.end()) - seg.start) as usize;
        let mut rel = 0usize;
        let mut last = None;
        while rel + record::HEADER_LEN <= limit {
            let b = &seg.map[rel..rel + 8];
            let len = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            let crc = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
            if len == 0 || rel + len as usize > limit {
                break;
            }
            last = Some(RecordAt {
                pos: seg.start + rel as u64,
                len,
                crc,
            });
            rel += len as usize;
        }
        if last.is_some() {
            return last;
        }
    }
    None
}

/// Bytes of a segment replayed between two releases of their pages.
const RELEASE_REPLAYED: usize = 32 << 20;

/// Calls `visit` for every intact record from `start` up to `limit`,
/// verifying checksums when `verify` (otherwise the records were verified
/// by an earlier run). Returns the end of the intact log and, when a torn or corrupt
/// record was found (or `visit` asked for it), where to cut.
fn replay(
    log: &CommitLog,
    start: u64,
    limit: u64,
    verify: bool,
    mut visit: impl FnMut(Record, u64, u32) -> Result<Option<u64>, StoreError>,
) -> Result<(u64, Option<u64>), StoreError> {
    let segments = log.segments();
    let mut pos = start;
    for seg in segments
        .iter()
        .filter(|s| s.end() > start && s.start < limit)
    {
        pos = pos.max(seg.start);
        let mut rel = (pos - seg.start) as usize;
        let mut released = rel;
        while rel < seg.map.len() {
            // What was read need not stay mapped in: a segment is up to 1
            // GiB, and a million pending transactions' log is one segment
            // (holding it all raised recovery's peak by its size).
            if rel - released >= RELEASE_REPLAYED {
                if let Err(e) = seg.release_range(released, rel) {
                    tracing::debug!(segment = %seg.path.display(), error = %e, "madvise failed");
                }
                released = rel;
            }
            let at = seg.start + rel as u64;
            if at >= limit {
                return Ok((at, None));
            }
            let len = if verify {
                match record::check(&seg.map[rel..]) {
                    Check::Valid(len) => len,
                    Check::End => break,
                    Check::Truncated | Check::Corrupt => return Ok((at, Some(at))),
                }
            } else {
                match seg.map.get(rel..rel + 4) {
                    Some(b) => u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize,
                    None => break,
                }
            };
            if len == 0 {
                break;
            }
            let Some(rec) = seg
                .map
                .get(rel..rel + len)
                .map(|_| seg.map.slice(rel..rel + len))
            else {
                return Ok((at, Some(at)));
            };
            // Checked above when verifying; trusted from an earlier run otherwise.
            let Some(rec) = record::decode_unverified(&rec, false) else {
                return Ok((at, Some(at)));
            };
            if let Some(cut) = visit(rec, at, len as u32)? {
                return Ok((cut, Some(cut)));
            }
            rel += len;
        }
        pos = seg.start + rel as u64;
        // Read to the end of its records: how many bytes it holds is now
        // known exactly (it was estimated from the file's blocks, which
        // counted the rest of the last block: the store size would grow
        // at a restart).
        seg.set_used_until(pos);
        // Done with this segment: its pages need not stay mapped in
        // (recovery of a long log would otherwise hold all of it at once).
        if let Err(e) = seg.release_pages() {
            tracing::debug!(segment = %seg.path.display(), error = %e, "madvise failed");
        }
    }
    Ok((pos, None))
}

/// Queues found on disk: topic -> number of queues (highest id + 1).
fn existing_queues(root: &std::path::Path) -> Vec<(String, u32)> {
    let mut out = Vec::new();
    let Ok(topics) = std::fs::read_dir(root) else {
        return out;
    };
    for t in topics.flatten() {
        let Some(topic) = t.file_name().to_str().map(str::to_string) else {
            continue;
        };
        let Ok(qs) = std::fs::read_dir(t.path()) else {
            continue;
        };
        // Directories that are not a queue the store could have made (a
        // stray name, queue 4294967295) are not queues.
        let max = qs
            .flatten()
            .filter_map(|q| q.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
            .filter(|q| plausible_queue(&topic, *q).is_ok())
            .max();
        if let Some(max) = max {
            out.push((topic, max + 1));
        }
    }
    out
}

/// Groups replayed entries per queue so that a long replay writes each
/// queue's entries in large contiguous writes.
#[derive(Default)]
pub(crate) struct Batcher {
    open: Vec<(Arc<ConsumeQueue>, u64, Vec<u8>)>,
    /// Live (a slave): each queue written and one past its last entry, to publish.
    pub(crate) live: bool,
    pub(crate) written: Vec<(Arc<ConsumeQueue>, u64)>,
}

impl Batcher {
    /// A slave's: it also notes what it wrote, to publish.
    pub(crate) fn live() -> Batcher {
        Batcher {
            live: true,
            ..Batcher::default()
        }
    }

    fn add(&mut self, cq: &Arc<ConsumeQueue>, offset: u64, entry: Entry) -> Result<(), StoreError> {
        let idx = match self.open.iter().position(|(q, _, _)| Arc::ptr_eq(q, cq)) {
            Some(i) => i,
            None => {
                self.open
                    .push((cq.clone(), offset, Vec::with_capacity(64 * 1024)));
                self.open.len() - 1
            }
        };
        let (q, first, buf) = &mut self.open[idx];
        let expected = *first + (buf.len() / ENTRY_LEN) as u64;
        if offset != expected || buf.len() >= 64 * 1024 {
            write(q, *first, buf)?;
            if self.live && !buf.is_empty() {
                let next = *first + (buf.len() / ENTRY_LEN) as u64;
                note_written(&mut self.written, q, next);
            }
            buf.clear();
            *first = offset;
        }
        let at = buf.len();
        buf.resize(at + ENTRY_LEN, 0);
        entry.encode(&mut buf[at..]);
        Ok(())
    }

    pub(crate) fn flush(&mut self) -> Result<(), StoreError> {
        for (q, first, buf) in self.open.drain(..) {
            write(&q, first, &buf)?;
            if self.live && !buf.is_empty() {
                let next = first + (buf.len() / ENTRY_LEN) as u64;
                note_written(&mut self.written, &q, next);
            }
        }
        Ok(())
    }
}

fn note_written(written: &mut Vec<(Arc<ConsumeQueue>, u64)>, q: &Arc<ConsumeQueue>, next: u64) {
    match written.iter_mut().find(|(w, _)| Arc::ptr_eq(w, q)) {
        Some(slot) => slot.1 = slot.1.max(next),
        None => written.push((q.clone(), next)),
    }
}

fn write(q: &ConsumeQueue, first: u64, buf: &[u8]) -> Result<(), StoreError> {
    if buf.is_empty() {
        return Ok(());
    }
    q.write(first, buf).map_err(|e| {
        StoreError::io(
            format!("cannot rebuild consume queue {}/{}", q.topic, q.queue),
            &e,
        )
    })
}
