//! The single writer: owns the active segment and appends in batches.
//!
//! There is no writer thread to hand work to: a caller queues its command,
//! and whoever holds the writer lock (usually the caller itself, on its own
//! task) takes every command queued meanwhile, encodes them into one buffer
//! and writes that with one `pwrite`, then writes the consume-queue entries
//! and applies offset commits (flat combining: no wake-up of another thread
//! on the way to the disk, and batching whenever callers meet). Under async flush it makes the
//! new messages visible at once; under sync flush it hands them to the
//! flusher, which makes them visible after the fdatasync that covers them.

use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::sync::oneshot;
use txmq_protocol::{now_millis, tag_hash, Message, MsgId, ProducerStamp};

use super::checkpoint::OffsetTable;
use super::commit_log::Segment;
use super::consume_queue::{ConsumeQueue, Entry, ENTRY_LEN};
use super::delay::{self, MoveBody, MoveKind, MoveTarget};
use super::flusher::FlushCmd;
use super::pop::{self, PopChange, PopCmd, PopOp};
use super::producers::{Batch, Verdict};
use super::record::{self, RecordHead, RecordKind};
use super::recovery::{Batcher, QueueSet, ReplayState, Replayer, TxChange};
use super::{FlushMode, StoreError, StoreInner, WriteCmd};

type ReplyValue = Result<(u64, u64), StoreError>;
type Reply = oneshot::Sender<ReplyValue>;

/// What to do once the buffer holding a command's records is written, in order.
enum Encoded {
    /// Write these consume-queue entries and publish the queue.
    Queue {
        queue: Arc<ConsumeQueue>,
        first: u64,
        count: u64,
        cq: std::ops::Range<usize>,
    },
    /// Apply an offset commit.
    Offset {
        key: (String, String, u32),
        offset: u64,
    },
    /// Half messages at this position became pending (true) or ended or
    /// moved (false).
    TxPending { at: u64, pending: bool },
    /// Answer the command with this value (a queue offset or tx id).
    Reply { reply: Reply, value: u64 },
    /// Answer the command with this error once the records before it are
    /// written (a commit rolled back for an offset conflict).
    Refuse { reply: Reply, error: StoreError },
    /// A pop record: applied to the store's pop table with the position.
    Pop(PopOp),
    /// Records copied from the master at `pos`: derive what they change.
    Replicated { pos: u64, data: bytes::Bytes },
    /// A stamped request stored before: answer with its first result once
    /// this chunk is written (its original may be in it).
    Duplicate {
        reply: Reply,
        first_offset: u64,
        end: u64,
    },
}

/// A change to the producer table made while encoding, undone when the
/// chunk's write fails.
enum ProducerUndo {
    /// A batch of a queue (`None`: a prepare).
    Batch {
        producer_id: u64,
        queue: Option<Arc<ConsumeQueue>>,
        first_seq: u64,
    },
    Init(u64),
}

/// A slave's writer: what replay keeps between replicated batches.
pub(crate) struct ReplicaWrite {
    pub(crate) state: ReplayState,
    pub(crate) batcher: Batcher,
}

/// The live store's queues, for replaying replicated records.
struct LiveQueues<'a>(&'a StoreInner);

impl QueueSet for LiveQueues<'_> {
    fn queue(&mut self, topic: &str, queue: u32) -> Result<Arc<ConsumeQueue>, StoreError> {
        if let Some(q) = self
            .0
            .queues
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(topic)
            .and_then(|qs| qs.get(queue as usize))
        {
            return Ok(q.clone());
        }
        let mut map = self.0.queues.write().unwrap_or_else(|e| e.into_inner());
        super::ensure_queues(&self.0.config, &mut map, topic, queue + 1)?;
        Ok(map[topic][queue as usize].clone())
    }

    fn remove_topic(&mut self, topic: &str, below: u64) -> Result<(), StoreError> {
        let removed = self
            .0
            .queues
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(topic);
        removed.iter().flatten().for_each(|q| q.discard());
        super::remove_queue_files(&self.0.config, topic)?;
        self.0.offsets.retain(|(_, t, _), _| t != topic);
        super::lock(&self.0.pop).remove_topic(topic);
        super::record_deleted(self.0, topic, below)
    }

    fn level(&mut self, level: u32) -> Result<Arc<ConsumeQueue>, StoreError> {
        self.0
            .delay_levels
            .get(level as usize)
            .cloned()
            .ok_or_else(|| StoreError::NoQueue {
                topic: super::DELAY_TOPIC.to_string(),
                queue: level,
            })
    }
}

pub(crate) struct Writer {
    store: Arc<StoreInner>,
    flusher: std::sync::mpsc::Sender<FlushCmd>,
    segment: Option<Arc<Segment>>,
    /// Log position of the first byte in `buf`.
    pos: u64,
    buf: BytesMut,
    cq_buf: Vec<u8>,
    chunk: Vec<Encoded>,
    /// Next queue offsets of queues touched by the current chunk.
    next: Vec<(Arc<ConsumeQueue>, u64)>,
    publish: Vec<(Arc<ConsumeQueue>, u64)>,
    /// Reused per chunk: answers held until the chunk is visible.
    replies: Vec<(Reply, ReplyValue)>,
    tx_changes: Vec<(u64, bool)>,
    /// Reused per chunk: offsets (consumer commits, delay-level progress)
    /// applied with the position.
    offset_changes: Vec<((String, String, u32), u64)>,
    /// Records encoded into `buf`.
    chunk_records: u64,
    /// A slave: replicated records of this chunk, written as they came
    /// (never copied into `buf`, which is empty while these are not).
    pieces: Vec<bytes::Bytes>,
    /// Their bytes.
    pieces_len: usize,
    /// On a slave: replay state for replicated records.
    replica: Option<ReplicaWrite>,
    /// Producer-table changes of the current chunk.
    producer_undo: Vec<ProducerUndo>,
    /// A producer id was handed out in this batch: fsync it even under
    /// async flush.
    force_flush: bool,
    /// The pop table as every record encoded so far leaves it (ahead of
    /// the store's, which moves with the position): pop commands are
    /// decided against it (see `pop.rs`).
    pop: pop::PopTable,
    /// Reused per chunk: pop records applied with the position.
    pop_changes: Vec<PopOp>,
    /// The command queue's other half (see `store::combine`): drained,
    /// swapped in for the queue as a batch is taken, so that neither the
    /// queue nor the batch is allocated anew per write.
    pub(crate) spare: Vec<WriteCmd>,
}

const MAX_BATCH_BYTES: usize = 4 << 20;

impl Writer {
    pub(crate) fn new(
        store: Arc<StoreInner>,
        flusher: std::sync::mpsc::Sender<FlushCmd>,
        end: u64,
        replica: Option<ReplicaWrite>,
    ) -> Result<Writer, StoreError> {
        let segment = store.log.segment_for(end);
        let pop = super::lock(&store.pop).clone();
        Ok(Writer {
            flusher,
            segment,
            pos: end,
            buf: BytesMut::with_capacity(MAX_BATCH_BYTES + (1 << 20)),
            cq_buf: Vec::with_capacity(64 * 1024),
            chunk: Vec::with_capacity(1024),
            next: Vec::new(),
            publish: Vec::new(),
            replies: Vec::with_capacity(1024),
            tx_changes: Vec::new(),
            offset_changes: Vec::new(),
            chunk_records: 0,
            pieces: Vec::new(),
            pieces_len: 0,
            replica,
            producer_undo: Vec::new(),
            force_flush: false,
            pop,
            pop_changes: Vec::new(),
            spare: Vec::with_capacity(1024),
            store,
        })
    }

    /// Writes a batch of commands: everything queued since the last write,
    /// one `pwrite` for all of it (more when it exceeds the batch size or a
    /// segment rolls). Leaves `batch` empty: `combine` reuses the vector.
    pub(crate) fn process(&mut self, batch: &mut Vec<WriteCmd>) {
        for cmd in batch.drain(..) {
            self.encode(cmd);
            if self.chunk_len() >= MAX_BATCH_BYTES {
                self.write_chunk();
            }
        }
        self.write_chunk();
        self.finish_batch();
    }

    /// Stops the flusher after a final flush and checkpoint.
    pub(crate) fn stop_flusher(&self) {
        let (tx, done) = std::sync::mpsc::channel();
        if self.flusher.send(FlushCmd::Shutdown(tx)).is_ok() {
            let _ = done.recv();
        }
    }

    fn at(&self) -> u64 {
        self.pos + self.chunk_len() as u64
    }

    /// Bytes of the chunk being built: encoded records or replicated pieces.
    fn chunk_len(&self) -> usize {
        self.buf.len() + self.pieces_len
    }

    fn encode(&mut self, cmd: WriteCmd) {
        if self.store.poisoned.load(Ordering::Acquire) {
            return fail(cmd, StoreError::Poisoned);
        }
        let cmd = match cmd {
            WriteCmd::Replicated { pos, data, reply } => {
                return self.encode_replicated(pos, data, reply);
            }
            WriteCmd::Pop { cmd, reply } => {
                if !self.pieces.is_empty() {
                    self.write_chunk();
                }
                return self.encode_pop(cmd, reply);
            }
            other => other,
        };
        // Encoded records and replicated pieces never share a chunk.
        if !self.pieces.is_empty() {
            self.write_chunk();
        }
        let empty = Default::default();
        // A command's records are one group in one segment: they are written
        // (and, after a crash, recovered or cut) together.
        let len = match &cmd {
            WriteCmd::Messages {
                messages,
                stamp: Some(_),
                ..
            } => messages.iter().map(record::stamped_len).sum(),
            WriteCmd::Messages { messages, .. } => messages.iter().map(record::message_len).sum(),
            WriteCmd::Prepare {
                messages,
                stamp: Some(_),
                ..
            } => messages.iter().map(|(_, m)| record::stamped_len(m)).sum(),
            WriteCmd::Prepare { messages, .. } | WriteCmd::Carry { messages, .. } => {
                messages.iter().map(|(_, m)| record::message_len(m)).sum()
            }
            WriteCmd::ProducerInit { .. } => record::encoded_len("", None, None, &empty, 0),
            WriteCmd::Commit {
                messages, offsets, ..
            } => {
                messages
                    .iter()
                    .map(|(_, m)| record::message_len(m))
                    .sum::<usize>()
                    + offsets
                        .iter()
                        .map(|o| record::encoded_len(&o.topic, Some(&o.group), None, &empty, 0))
                        .sum::<usize>()
            }
            WriteCmd::OffsetCommit { group, topic, .. } => {
                record::encoded_len(topic, Some(group), None, &empty, 0)
            }
            WriteCmd::Marker { .. } => record::encoded_len("", None, None, &empty, 0),
            WriteCmd::TopicDelete { topic, .. } => {
                record::encoded_len(topic, None, None, &empty, 0)
            }
            WriteCmd::Delayed { messages, .. } => messages.iter().map(record::message_len).sum(),
            // A delivery may be written as a copy: room for the larger.
            WriteCmd::DelayMoves { moves, .. } => moves
                .iter()
                .map(|m| match m.target {
                    MoveTarget::Queue { .. } => {
                        delay::marker_len(m.target.topic()).max(m.size as usize)
                    }
                    _ => delay::marker_len(m.target.topic()),
                })
                .sum(),
            WriteCmd::Replicated { data, .. } => data.len(),
            WriteCmd::Pop { .. } => 0,
        };
        let new_data = matches!(
            cmd,
            WriteCmd::Messages { .. } | WriteCmd::Prepare { .. } | WriteCmd::Delayed { .. }
        );
        if let Err(e) = self.make_room(len, new_data) {
            return fail(cmd, e);
        }
        self.chunk_records += match &cmd {
            WriteCmd::Messages { messages, .. } => messages.len() as u64,
            WriteCmd::Prepare { messages, .. } | WriteCmd::Carry { messages, .. } => {
                messages.len() as u64
            }
            WriteCmd::Commit {
                messages, offsets, ..
            } => (messages.len() + offsets.len()) as u64,
            WriteCmd::Delayed { messages, .. } => messages.len() as u64,
            WriteCmd::DelayMoves { moves, .. } => moves.len() as u64,
            WriteCmd::OffsetCommit { .. } | WriteCmd::Marker { .. } => 1,
            // Bookkeeping of the producer table, not a record a user wrote
            // (the store's record count is what a producer's sends stored).
            WriteCmd::ProducerInit { .. }
            | WriteCmd::Replicated { .. }
            | WriteCmd::Pop { .. }
            | WriteCmd::TopicDelete { .. } => 0,
        };
        let now = now_millis();
        let head = |kind, queue, queue_offset, aux, flags| RecordHead {
            kind,
            queue,
            queue_offset,
            store_timestamp: now,
            aux,
            flags,
            stamp: None,
        };
        match cmd {
            WriteCmd::Messages {
                queue,
                messages,
                stamp: None,
                reply,
            } => {
                let first = self.next_offset(&queue);
                for msg in &messages {
                    self.encode_visible(
                        &queue,
                        head(RecordKind::Message, queue.queue, 0, 0, 0),
                        msg,
                    );
                }
                self.chunk.push(Encoded::Reply {
                    reply,
                    value: first,
                });
            }
            WriteCmd::Messages {
                queue,
                messages,
                stamp: Some(stamp),
                reply,
            } => {
                let count = messages.len() as u32;
                let Some(reply) = self.admit(&stamp, &queue.topic, queue.queue, count, now, reply)
                else {
                    // Answered without a write (a duplicate or a refusal).
                    self.chunk_records -= u64::from(count);
                    return;
                };
                let first = self.next_offset(&queue);
                // One group (flags = count, aux = producer id): kept or cut whole.
                let mut h = head(
                    RecordKind::Message,
                    queue.queue,
                    0,
                    stamp.producer_id,
                    count as u16,
                );
                h.stamp = Some(record::Stamp {
                    producer_id: stamp.producer_id,
                    sequence: stamp.sequence,
                });
                for msg in &messages {
                    self.encode_visible(&queue, h, msg);
                }
                self.remember(&stamp, Some(&queue), count, first, now);
                self.chunk.push(Encoded::Reply {
                    reply,
                    value: first,
                });
            }
            WriteCmd::ProducerInit { epoch, reply } => {
                let (pid, token) = {
                    let mut table = self
                        .store
                        .producers
                        .lock()
                        .unwrap_or_else(|e| e.into_inner());
                    let pid = table.next_id(epoch);
                    let token = super::producers::new_token();
                    table.init(pid, token, now);
                    (pid, token)
                };
                self.producer_undo.push(ProducerUndo::Init(pid));
                self.force_flush = true;
                record::encode(
                    &mut self.buf,
                    head(RecordKind::ProducerInit, 0, token, pid, 0),
                    &empty_message("", None),
                );
                self.chunk.push(Encoded::Reply { reply, value: pid });
            }
            WriteCmd::Commit {
                tx,
                messages,
                offsets,
                reply,
            } => {
                // Compared here, in the single writer, against the offsets
                // as every earlier command left them: atomic with the append.
                if let Some(why) = self.offset_conflict(&offsets) {
                    let mut marker = empty_message("", None);
                    marker.msg_id = tx.first_msg_id;
                    record::encode(
                        &mut self.buf,
                        head(RecordKind::TxRollback, 0, 0, tx.id, 0),
                        &marker,
                    );
                    self.chunk.push(Encoded::TxPending {
                        at: tx.halves_at,
                        pending: false,
                    });
                    self.chunk.push(Encoded::Refuse {
                        reply,
                        error: StoreError::OffsetConflict(why),
                    });
                    return;
                }
                // One group: the visible messages, then the offsets, all
                // with the group's size in flags and the tx id in aux.
                let n = (messages.len() + offsets.len()) as u16;
                for (queue, msg) in &messages {
                    self.encode_visible(
                        queue,
                        head(RecordKind::Message, queue.queue, 0, tx.id, n),
                        msg,
                    );
                }
                for o in offsets {
                    let msg = empty_message(&o.topic, Some(&o.group));
                    record::encode(
                        &mut self.buf,
                        head(RecordKind::OffsetCommit, o.queue, o.offset, tx.id, n),
                        &msg,
                    );
                    self.chunk.push(Encoded::Offset {
                        key: (o.group, o.topic, o.queue),
                        offset: o.offset,
                    });
                }
                self.chunk.push(Encoded::TxPending {
                    at: tx.halves_at,
                    pending: false,
                });
                self.chunk.push(Encoded::Reply {
                    reply,
                    value: tx.id,
                });
            }
            WriteCmd::Carry {
                tx,
                messages,
                reply,
            } => {
                let at = self.at();
                let n = messages.len() as u16;
                for (queue, msg) in &messages {
                    record::encode(
                        &mut self.buf,
                        head(RecordKind::Half, *queue, 0, tx.id, n),
                        msg,
                    );
                }
                self.chunk.push(Encoded::TxPending {
                    at: tx.halves_at,
                    pending: false,
                });
                self.chunk.push(Encoded::TxPending { at, pending: true });
                self.chunk.push(Encoded::Reply { reply, value: at });
            }
            WriteCmd::Prepare {
                messages,
                stamp,
                reply,
            } => {
                let reply = match &stamp {
                    Some(stamp) => {
                        let key = super::producers::PREPARE_KEY;
                        match self.admit(stamp, key, 0, 1, now, reply) {
                            Some(reply) => reply,
                            None => {
                                // Answered without a write.
                                self.chunk_records -= messages.len() as u64;
                                return;
                            }
                        }
                    }
                    None => reply,
                };
                let tx_id = self.at();
                let n = messages.len() as u16;
                let mut h = head(RecordKind::Half, 0, 0, tx_id, n);
                h.stamp = stamp.map(|s| record::Stamp {
                    producer_id: s.producer_id,
                    sequence: s.sequence,
                });
                for (queue, msg) in &messages {
                    record::encode(&mut self.buf, RecordHead { queue: *queue, ..h }, msg);
                }
                if let Some(stamp) = &stamp {
                    self.remember(stamp, None, 1, tx_id, now);
                }
                self.chunk.push(Encoded::TxPending {
                    at: tx_id,
                    pending: true,
                });
                self.chunk.push(Encoded::Reply {
                    reply,
                    value: tx_id,
                });
            }
            WriteCmd::TopicDelete { topic, reply } => {
                self.pop.remove_topic(&topic);
                let at = self.at();
                let head = head(RecordKind::TopicDelete, 0, 0, 0, 0);
                record::encode(&mut self.buf, head, &empty_message(&topic, None));
                self.chunk.push(Encoded::Reply { reply, value: at });
            }
            WriteCmd::Marker {
                kind,
                tx,
                flags,
                reply,
            } => {
                let mut marker = empty_message("", None);
                marker.msg_id = tx.first_msg_id;
                record::encode(&mut self.buf, head(kind, 0, 0, tx.id, flags), &marker);
                if kind == RecordKind::TxRollback {
                    self.chunk.push(Encoded::TxPending {
                        at: tx.halves_at,
                        pending: false,
                    });
                }
                self.chunk.push(Encoded::Reply {
                    reply,
                    value: tx.id,
                });
            }
            WriteCmd::OffsetCommit {
                group,
                topic,
                queue,
                offset,
                of,
                reply,
            } => {
                if of.is_discarded() {
                    let _ = reply.send(Err(StoreError::NoQueue { topic, queue }));
                    return;
                }
                let msg = empty_message(&topic, Some(&group));
                record::encode(
                    &mut self.buf,
                    head(RecordKind::OffsetCommit, queue, offset, 0, 0),
                    &msg,
                );
                self.chunk.push(Encoded::Offset {
                    key: (group, topic, queue),
                    offset,
                });
                self.chunk.push(Encoded::Reply { reply, value: 0 });
            }
            WriteCmd::Delayed {
                queue,
                messages,
                deliver_at,
                reply,
            } => {
                // The same pure function recovery applies to the record's
                // store timestamp (`now`) and delivery time (aux).
                let (level, wake) = delay::place(now, deliver_at);
                let cq = self.store.delay_levels[level as usize].clone();
                let first = self.next_offset(&cq);
                for msg in &messages {
                    self.encode_indexed(
                        &cq,
                        head(RecordKind::Delayed, queue, 0, deliver_at, 0),
                        msg,
                        wake,
                    );
                }
                self.chunk.push(Encoded::Reply {
                    reply,
                    value: first,
                });
            }
            WriteCmd::DelayMoves { moves, reply } => {
                let count = moves.len() as u64;
                let active_start = self.segment.as_ref().map_or(0, |s| s.start);
                for mv in moves {
                    // A delayed record outside the active segment may expire
                    // before the delivered message has had its retention,
                    // and pointing back at it would put the queue's entries
                    // out of segment order: deliver a copy instead.
                    if let MoveTarget::Queue { queue, tag_hash } = &mv.target {
                        let copy = (mv.pos < active_start)
                            .then(|| self.store.log.read(mv.pos, mv.size as usize))
                            .flatten()
                            .and_then(|data| record::decode(&data, false));
                        if let Some(rec) = copy {
                            let aux = delay::copy_aux(mv.level, mv.offset);
                            let head = head(RecordKind::DelayedCopy, queue.queue, 0, aux, 0);
                            self.encode_indexed(queue, head, &rec.message, *tag_hash);
                            self.chunk.push(Encoded::Offset {
                                key: delay::progress_key(mv.level),
                                offset: mv.offset + 1,
                            });
                            continue;
                        }
                    }
                    let (kind, target, queue, third) = match &mv.target {
                        MoveTarget::Queue { queue, tag_hash } => {
                            (MoveKind::Queue, Some(queue.clone()), queue.queue, *tag_hash)
                        }
                        MoveTarget::Level { level, wake } => (
                            MoveKind::Level,
                            Some(self.store.delay_levels[*level as usize].clone()),
                            *level,
                            *wake,
                        ),
                        MoveTarget::Dropped => (MoveKind::Dropped, None, 0, 0),
                    };
                    let offset = target.as_ref().map_or(0, |q| self.next_offset(q));
                    let body = MoveBody {
                        kind,
                        queue,
                        offset,
                        size: mv.size,
                        third,
                    };
                    let msg = delay::marker_message(mv.target.topic(), body.encode());
                    record::encode(
                        &mut self.buf,
                        head(RecordKind::DelayMove, mv.level, mv.offset, mv.pos, 0),
                        &msg,
                    );
                    // The entry first, then the progress: whoever sees the
                    // progress past the entry finds it at its target.
                    if let Some(target) = &target {
                        self.push_entry(
                            target,
                            offset,
                            Entry {
                                log_offset: mv.pos,
                                size: mv.size,
                                tag_hash: third,
                            },
                        );
                    }
                    self.chunk.push(Encoded::Offset {
                        key: delay::progress_key(mv.level),
                        offset: mv.offset + 1,
                    });
                }
                self.chunk.push(Encoded::Reply {
                    reply,
                    value: count,
                });
            }
            // Taken above; never here.
            WriteCmd::Replicated { reply, .. } | WriteCmd::Pop { reply, .. } => {
                let _ = reply.send(Err(StoreError::Invalid(
                    "replicated data reached the wrong write path".into(),
                )));
            }
        }
    }

    /// Decides a pop command against the writer's pop table, encodes its
    /// record and applies it there (the store's table follows once the
    /// chunk is written). A refused receipt is answered at once, writing
    /// nothing; so is a receive with nothing to deliver.
    fn encode_pop(&mut self, cmd: PopCmd, reply: Reply) {
        let (key, change) = match cmd {
            PopCmd::Receive {
                pick,
                queue,
                deliveries,
            } => {
                // A queue new to the group starts at the group's committed
                // offset (it may have consumed it otherwise before), else
                // at the queue's first message.
                let first = self
                    .store
                    .offsets
                    .get(&pick.key)
                    .map_or_else(|| queue.min_offset(), |v| *v);
                match pop::decide(&self.pop, &pick, &queue, first) {
                    None => {
                        let _ = deliveries.send(Vec::new());
                        let _ = reply.send(Ok((0, 0)));
                        return;
                    }
                    Some(change) => {
                        if let PopChange::Receive { deliveries: d, .. } = &change {
                            let _ = deliveries.send(d.clone());
                        }
                        (pick.key, change)
                    }
                }
            }
            PopCmd::Ack {
                key,
                offset,
                receipt,
                dead,
            } => {
                if let Err(stale) = self.pop.check(&key, offset, receipt) {
                    let why = pop::describe(&stale, &key, offset);
                    return fail_reply(reply, StoreError::Receipt(why));
                }
                let change = PopChange::Ack {
                    offset,
                    receipt,
                    dead,
                };
                (key, change)
            }
            PopCmd::Change {
                key,
                offset,
                receipt,
                until,
            } => {
                if let Err(stale) = self.pop.check(&key, offset, receipt) {
                    let why = pop::describe(&stale, &key, offset);
                    return fail_reply(reply, StoreError::Receipt(why));
                }
                let change = PopChange::Change {
                    offset,
                    receipt,
                    until,
                };
                (key, change)
            }
            PopCmd::Reset { key, next, of } => {
                if of.is_discarded() {
                    let (_, topic, queue) = key;
                    return fail_reply(reply, StoreError::NoQueue { topic, queue });
                }
                (key, PopChange::Reset { next })
            }
        };
        let (kind, queue_offset, aux, flags, body) = match &change {
            PopChange::Receive {
                start,
                next,
                deliveries,
            } => (
                RecordKind::PopReceive,
                *next,
                *start,
                0,
                pop::encode_deliveries(deliveries),
            ),
            PopChange::Ack {
                offset,
                receipt,
                dead,
            } => (
                RecordKind::PopAck,
                *offset,
                *receipt,
                u16::from(*dead),
                bytes::Bytes::new(),
            ),
            PopChange::Change {
                offset,
                receipt,
                until,
            } => (
                RecordKind::PopChange,
                *offset,
                *receipt,
                0,
                bytes::Bytes::copy_from_slice(&until.to_le_bytes()),
            ),
            PopChange::Reset { next } => (RecordKind::PopReset, *next, 0, 0, bytes::Bytes::new()),
        };
        let (group, topic, queue) = &key;
        let mut msg = empty_message(topic, Some(group));
        msg.body = body;
        let len = record::message_len(&msg);
        if let Err(e) = self.make_room(len, false) {
            return fail_reply(reply, e);
        }
        self.chunk_records += 1;
        let pos = self.at();
        let head = RecordHead {
            kind,
            queue: *queue,
            queue_offset,
            store_timestamp: now_millis(),
            aux,
            flags,
            stamp: None,
        };
        record::encode(&mut self.buf, head, &msg);
        let op = PopOp {
            key,
            pos,
            end: self.at(),
            change,
        };
        self.pop.apply(&op);
        self.chunk.push(Encoded::Pop(op));
        self.chunk.push(Encoded::Reply { reply, value: pos });
    }

    /// Asks the producer table about a stamped request of `count` messages
    /// for `topic`/`queue`: the reply back when it is to be written, `None`
    /// when it was answered (a duplicate: once this chunk is written; a
    /// refusal: now).
    fn admit(
        &mut self,
        stamp: &ProducerStamp,
        topic: &str,
        queue: u32,
        count: u32,
        now: u64,
        reply: Reply,
    ) -> Option<Reply> {
        let expiry = self.store.config.producer_id_expiry.as_millis() as u64;
        let verdict = self
            .store
            .producers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .check(stamp, topic, queue, count, now, expiry);
        match verdict {
            Verdict::Fresh => Some(reply),
            Verdict::Duplicate(b) => {
                self.chunk.push(Encoded::Duplicate {
                    reply,
                    first_offset: b.first_offset,
                    end: b.end,
                });
                None
            }
            Verdict::Refused(code, message) => {
                fail_reply(reply, StoreError::Producer { code, message });
                None
            }
        }
    }

    /// Records a stamped request just encoded (ending at the current
    /// position) in the producer table: a batch of `queue`, or a prepare.
    fn remember(
        &mut self,
        stamp: &ProducerStamp,
        queue: Option<&Arc<ConsumeQueue>>,
        count: u32,
        first_offset: u64,
        now: u64,
    ) {
        let (topic, queue_id) = undo_key(queue);
        let batch = Batch {
            first_seq: stamp.sequence,
            count,
            first_offset,
            end: self.at(),
        };
        self.store
            .producers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .record(stamp.producer_id, topic, queue_id, batch, now);
        self.producer_undo.push(ProducerUndo::Batch {
            producer_id: stamp.producer_id,
            queue: queue.cloned(),
            first_seq: stamp.sequence,
        });
    }

    /// A slave: appends records copied from the master at `pos`, the
    /// master's position for them. `pos` is where this log ends, or the
    /// start of a later segment (the master's log continues there: it
    /// rolled, or restarted in a fresh segment).
    fn encode_replicated(&mut self, pos: u64, data: bytes::Bytes, reply: Reply) {
        if self.replica.is_none() {
            return fail_reply(
                reply,
                StoreError::Invalid(
                    "this store is not a slave's: it takes no replicated data".into(),
                ),
            );
        }
        // The group check below reads the replay state, which a replicated
        // batch already in this chunk has not moved yet: write that first.
        if self
            .chunk
            .iter()
            .any(|e| matches!(e, Encoded::Replicated { .. }))
        {
            self.write_chunk();
        }
        if let Some(rw) = &self.replica {
            if let Err(why) = rw.state.check_groups(pos, &data) {
                return fail_reply(
                    reply,
                    StoreError::Invalid(format!("replicated data refused: {why}")),
                );
            }
        }
        let at = self.at();
        let seg_size = self.store.log.segment_size();
        if pos != at && (pos < at || !pos.is_multiple_of(seg_size)) {
            return fail_reply(
                reply,
                StoreError::Invalid(format!(
                    "replicated data at position {pos} does not continue this log, which ends at {at}"
                )),
            );
        }
        let fits = |w: &Writer| {
            w.segment
                .as_ref()
                .is_some_and(|seg| pos >= seg.start && pos + data.len() as u64 <= seg.end())
        };
        if pos != at || !fits(self) {
            if let Err(e) = self.roll_to(pos) {
                return fail_reply(reply, e);
            }
            if !fits(self) {
                return fail_reply(
                    reply,
                    StoreError::Invalid(format!(
                        "replicated data at position {pos} ({} bytes) crosses a segment boundary",
                        data.len()
                    )),
                );
            }
        }
        if !self.buf.is_empty() {
            self.write_chunk();
        }
        self.pieces_len += data.len();
        self.pieces.push(data.clone());
        let mut rel = 0usize;
        while let Some(b) = data.get(rel..rel + 4) {
            let len = u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize;
            if len == 0 {
                break;
            }
            rel += len;
            self.chunk_records += 1;
        }
        self.chunk.push(Encoded::Replicated { pos, data });
        self.chunk.push(Encoded::Reply { reply, value: pos });
    }

    /// Derives what replicated records change (consume queues, offsets,
    /// transactions, delay levels), as recovery does.
    fn replay_replicated(
        &mut self,
        pos: u64,
        data: &bytes::Bytes,
        offsets: &mut Vec<((String, String, u32), u64)>,
        halves: &mut Vec<(u64, bool)>,
        changes: &mut Vec<TxChange>,
        pops: &mut Vec<PopOp>,
    ) -> Result<(), StoreError> {
        let Some(rw) = self.replica.as_mut() else {
            return Ok(());
        };
        let mut queues = LiveQueues(&self.store);
        let mut table = OffsetTable::new();
        let mut producers = self
            .store
            .producers
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let mut replayer = Replayer {
            queues: &mut queues,
            offsets: &mut table,
            batcher: &mut rw.batcher,
            state: &mut rw.state,
            producers: &mut producers,
            pop: &mut self.pop,
            pop_log: Some(pops),
            dispatch_from: 0,
            deleted: None,
            deletes_seen: None,
        };
        let mut rel = 0usize;
        while let Some(b) = data.get(rel..rel + 4) {
            let len = u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize;
            if len == 0 {
                break;
            }
            let at = pos + rel as u64;
            let rec = data
                .get(rel..rel + len)
                .and_then(|_| record::decode_unverified(&data.slice(rel..rel + len), false))
                .ok_or_else(|| {
                    StoreError::Invalid(format!("replicated record at {at} does not decode"))
                })?;
            if replayer.visit(rec, at, len as u32)?.is_some() {
                return Err(StoreError::Invalid(format!(
                    "replicated record at {at} interrupts a transaction group"
                )));
            }
            rel += len;
        }
        replayer.batcher.flush()?;
        self.publish.append(&mut rw.batcher.written);
        offsets.extend(table);
        halves.append(&mut rw.state.halves_changes);
        changes.append(&mut rw.state.tx_changes);
        rw.state.forget_ended();
        Ok(())
    }

    /// Why a transaction's offsets cannot be committed now, if one of them
    /// expects another committed offset than the group has: the offsets as
    /// the records before it leave them (this chunk's own commits
    /// included). A group with no offset on the queue matches any
    /// expectation (the first commit sets it); an offset below the queue's
    /// first stored message counts as that message's (what lies between is
    /// gone, so nothing can consume it twice).
    fn offset_conflict(&self, offsets: &[txmq_protocol::TxOffset]) -> Option<String> {
        for o in offsets {
            let Some(expected) = o.expected else {
                continue;
            };
            let key = (o.group.clone(), o.topic.clone(), o.queue);
            let in_chunk = self.chunk.iter().rev().find_map(|e| match e {
                Encoded::Offset { key: k, offset } if *k == key => Some(*offset),
                _ => None,
            });
            let Some(committed) = in_chunk.or_else(|| self.store.offsets.get(&key).map(|v| *v))
            else {
                continue;
            };
            let first = self
                .store
                .queues
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .get(&o.topic)
                .and_then(|qs| qs.get(o.queue as usize))
                .map_or(0, |q| q.min_offset());
            let actual = committed.max(first);
            if actual != expected {
                return Some(format!(
                    "consumer group '{}' has offset {actual} on queue {} of '{}', not the {expected} \
                     the transaction expected (another transaction or consumer moved it); \
                     the transaction was rolled back",
                    o.group, o.queue, o.topic
                ));
            }
        }
        None
    }

    /// Encodes a message that becomes visible in `queue` at the next offset.
    fn encode_visible(&mut self, queue: &Arc<ConsumeQueue>, head: RecordHead, msg: &Message) {
        self.encode_indexed(queue, head, msg, tag_hash(msg.tag.as_deref()));
    }

    /// Encodes a message indexed in `queue` at the next offset (its queue
    /// offset in the record), with `third` as the entry's third field (the
    /// tag hash, or a delay level's wake-up time).
    fn encode_indexed(
        &mut self,
        queue: &Arc<ConsumeQueue>,
        mut head: RecordHead,
        msg: &Message,
        third: u64,
    ) {
        let offset = self.next_offset(queue);
        head.queue_offset = offset;
        let log_offset = self.at();
        let before = self.buf.len();
        record::encode(&mut self.buf, head, msg);
        let entry = Entry {
            log_offset,
            size: (self.buf.len() - before) as u32,
            tag_hash: third,
        };
        self.push_entry(queue, offset, entry);
    }

    /// Queues `entry` for `queue` at `offset`, which must be its next offset.
    fn push_entry(&mut self, queue: &Arc<ConsumeQueue>, offset: u64, entry: Entry) {
        let at = self.cq_buf.len();
        self.cq_buf.resize(at + ENTRY_LEN, 0);
        entry.encode(&mut self.cq_buf[at..]);
        self.set_next(queue, offset + 1);
        // Consecutive messages of one queue share one consume-queue write.
        if let Some(Encoded::Queue {
            queue: q,
            count,
            cq,
            ..
        }) = self.chunk.last_mut()
        {
            if Arc::ptr_eq(q, queue) && cq.end == at {
                *count += 1;
                cq.end = self.cq_buf.len();
                return;
            }
        }
        self.chunk.push(Encoded::Queue {
            queue: queue.clone(),
            first: offset,
            count: 1,
            cq: at..self.cq_buf.len(),
        });
    }

    fn next_offset(&self, queue: &Arc<ConsumeQueue>) -> u64 {
        self.next
            .iter()
            .find(|(q, _)| Arc::ptr_eq(q, queue))
            .map_or_else(|| queue.next_offset(), |(_, n)| *n)
    }

    fn set_next(&mut self, queue: &Arc<ConsumeQueue>, next: u64) {
        match self.next.iter_mut().find(|(q, _)| Arc::ptr_eq(q, queue)) {
            Some(slot) => slot.1 = next,
            None => self.next.push((queue.clone(), next)),
        }
    }

    /// Makes sure `len` more bytes fit in the active segment, writing the
    /// current chunk and rolling to a new segment when they do not. Only
    /// `new_data` (messages, half messages, delayed messages) is refused
    /// when the log reached its size limit: ends of transactions, offset
    /// commits and delay moves always get written.
    fn make_room(&mut self, len: usize, new_data: bool) -> Result<(), StoreError> {
        let end = self.at();
        let fits = self
            .segment
            .as_ref()
            .is_some_and(|seg| end + len as u64 <= seg.end());
        if let Some(max) = self.store.config.max_log_bytes.filter(|_| new_data) {
            // Bytes of records, not whole segments: every start of the
            // broker begins a fresh one, which would count whole.
            let used = self.store.log.used_bytes(end);
            if used + len as u64 > max {
                return Err(StoreError::Full(format!(
                    "the store is full: the commit log holds {} MiB and the limit is {} MiB (--max-store-size); \
                     nothing was written. Segments older than --retention are deleted, or raise the limit",
                    used >> 20,
                    max >> 20
                )));
            }
        }
        if new_data {
            if let Some(low) = self.store.disk_low() {
                return Err(StoreError::Full(format!(
                    "{low}; nothing was written. Free space on it (segments older than \
                     --retention are deleted) or lower the limit: new messages are taken again \
                     as soon as there is room"
                )));
            }
        }
        if fits {
            return Ok(());
        }
        let next_start = match &self.segment {
            // The rest of a full segment stays zero: recovery reads that as its end.
            Some(seg) => seg.end(),
            None => self.pos,
        };
        self.roll_to(next_start)
    }

    /// Writes the current chunk, makes the active segment durable and
    /// starts a new one at `next_start`.
    fn roll_to(&mut self, next_start: u64) -> Result<(), StoreError> {
        self.write_chunk();
        if let Some(seg) = &self.segment {
            // The full segment's tail reaches the disk before anything of
            // the next one: a crash then never leaves data after a torn
            // record, which recovery would refuse to cut.
            blocking(|| seg.file.sync_data()).map_err(|e| {
                self.store.poisoned.store(true, Ordering::Release);
                StoreError::io("cannot fdatasync the full commit-log segment", &e)
            })?;
            seg.set_used_until(self.pos);
        }
        let seg = blocking(|| self.store.log.create_segment(next_start)).map_err(|e| {
            StoreError::io(
                format!("cannot create commit-log segment at {next_start}"),
                &e,
            )
        })?;
        tracing::debug!(start = next_start, "rolled to a new commit-log segment");
        // The full segment's end, for the store size after a restart.
        if let Err(e) = blocking(|| self.store.log.save_ends()) {
            tracing::debug!(error = %e, "cannot write the segments' ends");
        }
        self.segment = Some(seg);
        self.pos = next_start;
        self.store.written.store(next_start, Ordering::Release);
        self.store.announce_written(next_start);
        Ok(())
    }

    /// Writes the buffer, then the consume-queue entries, then answers.
    fn write_chunk(&mut self) {
        if self.chunk.is_empty() {
            return;
        }
        let result = match &self.segment {
            Some(seg) if !self.pieces.is_empty() => {
                let mut at = self.pos - seg.start;
                self.pieces
                    .iter()
                    .try_for_each(|p| {
                        let written = seg.file.write_all_at(p, at);
                        at += p.len() as u64;
                        written
                    })
                    .map_err(|e| StoreError::io("cannot write the commit log", &e))
            }
            Some(seg) => {
                if let Some(index) = &self.store.index {
                    index.prefetch(&self.buf);
                }
                seg.file
                    .write_all_at(&self.buf, self.pos - seg.start)
                    .map_err(|e| StoreError::io("cannot write the commit log", &e))
            }
            None => Err(StoreError::Io {
                context: "cannot write the commit log".into(),
                message: "no active segment".into(),
            }),
        };
        let end = self.at();
        // Taken for the loops below (which call methods of `self`), and put
        // back emptied: the next chunk reuses its allocation.
        let mut chunk = std::mem::take(&mut self.chunk);
        match result {
            Ok(()) => {
                self.index_chunk();
                let stats = &self.store.stats;
                stats.writes.fetch_add(1, Ordering::Relaxed);
                stats
                    .bytes
                    .fetch_add(self.chunk_len() as u64, Ordering::Relaxed);
                stats
                    .records
                    .fetch_add(self.chunk_records, Ordering::Relaxed);
                let mut replies = std::mem::take(&mut self.replies);
                let mut tx_changes = std::mem::take(&mut self.tx_changes);
                let mut offset_changes = std::mem::take(&mut self.offset_changes);
                let mut pop_changes = std::mem::take(&mut self.pop_changes);
                let published_from = self.publish.len();
                let mut cmd_error: Option<StoreError> = None;
                let mut replicated_tx = Vec::new();
                for enc in chunk.drain(..) {
                    match enc {
                        Encoded::Replicated { pos, data } => {
                            if let Err(e) = self.replay_replicated(
                                pos,
                                &data,
                                &mut offset_changes,
                                &mut tx_changes,
                                &mut replicated_tx,
                                &mut pop_changes,
                            ) {
                                // The log has the records; recovery derives them again.
                                tracing::error!(position = pos, error = %e, "cannot apply replicated records");
                                self.store.poisoned.store(true, Ordering::Release);
                                cmd_error = Some(e);
                            }
                        }
                        Encoded::Queue {
                            queue,
                            first,
                            count,
                            cq,
                        } => {
                            if let Err(e) = queue.write(first, &self.cq_buf[cq]) {
                                // The log has the records; recovery rebuilds the queue.
                                tracing::error!(topic = %queue.topic, queue = queue.queue, error = %e, "cannot write consume queue");
                                self.store.poisoned.store(true, Ordering::Release);
                                cmd_error = Some(StoreError::io("cannot write consume queue", &e));
                                continue;
                            }
                            self.publish.push((queue, first + count));
                        }
                        Encoded::Offset { key, offset } => {
                            offset_changes.push((key, offset));
                        }
                        Encoded::TxPending { at, pending } => tx_changes.push((at, pending)),
                        Encoded::Pop(op) => pop_changes.push(op),
                        Encoded::Duplicate {
                            reply,
                            first_offset,
                            end,
                        } => {
                            let result = match cmd_error.take() {
                                None => Err(StoreError::Duplicate { first_offset, end }),
                                Some(e) => Err(e),
                            };
                            replies.push((reply, result));
                        }
                        Encoded::Reply { reply, value } => {
                            let result = match cmd_error.take() {
                                None => Ok((value, end)),
                                Some(e) => Err(e),
                            };
                            replies.push((reply, result));
                        }
                        Encoded::Refuse { reply, error } => {
                            replies.push((reply, Err(cmd_error.take().unwrap_or(error))));
                        }
                    }
                }
                {
                    // The checkpoint reads the write position and the oldest
                    // pending transaction under this lock: they must agree.
                    let mut set = self
                        .store
                        .tx_pending
                        .lock()
                        .unwrap_or_else(|e| e.into_inner());
                    for (at, pending) in tx_changes.drain(..) {
                        if pending {
                            set.insert(at);
                        } else {
                            set.remove(&at);
                        }
                    }
                    // Offsets and the queues' justified entries move with the
                    // position: a checkpoint that sees an offset (a delay
                    // level's progress, a consumer's commit) also flushes
                    // the record that wrote it.
                    for (key, offset) in offset_changes.drain(..) {
                        self.store.offsets.insert(key, offset);
                    }
                    if !pop_changes.is_empty() {
                        // A pop group's committed offset is its lowest
                        // offset not yet acknowledged.
                        let mut table = super::lock(&self.store.pop);
                        for op in pop_changes.drain(..) {
                            if let Some(low) = table.apply(&op) {
                                self.store.offsets.insert(op.key, low);
                            }
                        }
                    }
                    for (q, next) in &self.publish[published_from..] {
                        q.set_logged(*next);
                    }
                    self.pos = end;
                    self.store.written.store(end, Ordering::Release);
                }
                self.store.announce_written(end);
                if !replicated_tx.is_empty() {
                    if let Some(listener) = self.store.tx_listener.get() {
                        listener(replicated_tx);
                    }
                }
                // Visible before acknowledged (async flush; under sync flush
                // the flusher publishes after the fdatasync).
                if self.store.config.flush == FlushMode::Async {
                    for (q, max) in self.publish.drain(..) {
                        q.publish(max);
                    }
                }
                for (reply, result) in replies.drain(..) {
                    let _ = reply.send(result);
                }
                self.replies = replies;
                self.tx_changes = tx_changes;
                self.offset_changes = offset_changes;
                self.pop_changes = pop_changes;
            }
            Err(e) => {
                tracing::error!(error = %e, "commit-log write failed; the batch is refused");
                // A partial write must not stay behind the end: after a roll
                // to a new segment, recovery would meet it as a corrupt
                // record in the middle of the log. Zero it (on a full disk,
                // where writing zeros fails too, by punching a hole), or
                // stop writing.
                let zeroed = self.segment.as_ref().is_some_and(|seg| {
                    let (at, len) = (self.pos - seg.start, self.chunk_len());
                    seg.file.write_all_at(&vec![0u8; len], at).is_ok()
                        || super::reserve::punch_hole(&seg.file, at, len as u64).is_ok()
                });
                if !zeroed {
                    tracing::error!(
                        "cannot clear the failed write; the store refuses writes from now on"
                    );
                    self.store.poisoned.store(true, Ordering::Release);
                }
                for enc in chunk.drain(..) {
                    if let Encoded::Reply { reply, .. }
                    | Encoded::Duplicate { reply, .. }
                    | Encoded::Refuse { reply, .. } = enc
                    {
                        let _ = reply.send(Err(e.clone()));
                    }
                }
                // What the pop table learnt from this chunk was not written:
                // back to the store's, which holds every chunk written.
                self.pop = super::lock(&self.store.pop).clone();
                // What the table learnt from this chunk was not written.
                let mut table = self
                    .store
                    .producers
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                for undo in self.producer_undo.drain(..).rev() {
                    match undo {
                        ProducerUndo::Batch {
                            producer_id,
                            queue,
                            first_seq,
                        } => {
                            let (topic, queue) = undo_key(queue.as_ref());
                            table.unrecord(producer_id, topic, queue, first_seq);
                        }
                        ProducerUndo::Init(pid) => table.uninit(pid),
                    }
                }
            }
        }
        self.chunk = chunk;
        self.producer_undo.clear();
        self.buf.clear();
        self.pieces.clear();
        self.pieces_len = 0;
        self.cq_buf.clear();
        self.next.clear();
        self.chunk_records = 0;
    }

    /// Indexes the records just written (before anyone is answered, so a
    /// lookup finds every acknowledged message): one index write per chunk.
    fn index_chunk(&mut self) {
        let Some(index) = &self.store.index else {
            return;
        };
        let indexed = if self.pieces.is_empty() {
            index.add_chunk(self.pos, &self.buf)
        } else {
            let mut at = self.pos;
            self.pieces.iter().try_for_each(|p| {
                let r = index.add_chunk(at, p);
                at += p.len() as u64;
                r
            })
        };
        if let Err(e) = indexed {
            // The log has the records: the next start indexes them again.
            tracing::error!(error = %e, "cannot write the message index; lookups of these messages miss until the broker restarts");
        }
    }

    /// Under sync flush, hands the batch's messages to the flusher, which
    /// publishes them once fsynced (async flush published them already).
    fn finish_batch(&mut self) {
        if self.store.config.flush == FlushMode::Sync {
            let publish = std::mem::take(&mut self.publish);
            let _ = self.flusher.send(FlushCmd::Written(self.pos, publish));
        } else if std::mem::take(&mut self.force_flush) {
            let _ = self.flusher.send(FlushCmd::Written(self.pos, Vec::new()));
        }
    }
}

/// Runs blocking file work (the fdatasync and the file creation of a
/// segment roll) without stalling the other tasks of a tokio worker: the
/// writer runs on whichever task holds it. `block_in_place` on a
/// multi-thread runtime (the worker's other tasks move to another thread),
/// directly elsewhere (a plain thread, or a current-thread runtime, where
/// the other tasks wait: on `--network-threads`, the other connections of
/// that thread).
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// The producer-table key of a stamped batch of `queue`, or of a prepare.
fn undo_key(queue: Option<&Arc<ConsumeQueue>>) -> (&str, u32) {
    match queue {
        Some(q) => (&q.topic, q.queue),
        None => (super::producers::PREPARE_KEY, 0),
    }
}

pub(crate) fn fail(cmd: WriteCmd, e: StoreError) {
    match cmd {
        WriteCmd::Messages { reply, .. }
        | WriteCmd::OffsetCommit { reply, .. }
        | WriteCmd::Prepare { reply, .. }
        | WriteCmd::ProducerInit { reply, .. }
        | WriteCmd::Commit { reply, .. }
        | WriteCmd::Carry { reply, .. }
        | WriteCmd::Marker { reply, .. }
        | WriteCmd::TopicDelete { reply, .. }
        | WriteCmd::Delayed { reply, .. }
        | WriteCmd::DelayMoves { reply, .. }
        | WriteCmd::Pop { reply, .. }
        | WriteCmd::Replicated { reply, .. } => fail_reply(reply, e),
    }
}

fn fail_reply(reply: Reply, e: StoreError) {
    let _ = reply.send(Err(e));
}

/// An offset commit is a small record: key = group, topic and queue of the
/// queue, queue offset = the committed offset. A transaction marker is an
/// empty record with the tx id in aux.
fn empty_message(topic: &str, key: Option<&str>) -> Message {
    Message {
        msg_id: MsgId::default(),
        topic: topic.to_string(),
        key: key.map(str::to_string),
        tag: None,
        properties: Default::default(),
        body: bytes::Bytes::new(),
        born_timestamp: 0,
    }
}
