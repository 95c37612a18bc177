//! Delayed messages: a time-bucketed index made of consume queues.
//!
//! A delayed message is stored once, as a `Delayed` record whose topic and
//! queue are its real destination and whose aux field is its delivery time
//! (see `record.rs`). It is not in its real queue yet: the writer indexes it
//! into one of [`LEVELS`] consume queues of the internal topic
//! [`DELAY_TOPIC`]. Level `L` holds entries that wake up after
//! `BASE_MS << L`; a level entry is an ordinary 20-byte consume-queue entry
//! whose (position, size) point at the delayed record and whose third field
//! (the tag hash in a real queue) holds the wake-up time. Within a level,
//! entries are appended in (about) wake-up order, so each level is read
//! like a consumer reads a queue: from its progress offset while the entry
//! there is due. Nothing per message lives in memory, and one task drives
//! delivery ([`Store::deliver_due`]), never a timer per message.
//!
//! When an entry wakes up, its message is either due (it goes to its real
//! queue) or not yet (it goes to a lower level, whose wake-up is closer to
//! its delivery time). Either way the move is a small `DelayMove` marker
//! record, never a copy of the message; applying a marker writes the
//! target entry and moves the level's progress, which is kept like a
//! consumer offset (key `(%DELAY%, %DELAY%, level)`) and so is snapshotted
//! by the checkpoint. Recovery replays `Delayed` records and markers after
//! the checkpoint exactly as the writer applied them: a message delivered
//! before a crash is not delivered again, and one whose time passed while
//! the broker was down is delivered by the first [`Store::deliver_due`].
//!
//! Retention keeps every segment that holds a delayed record still pending
//! in some level (see [`Store::oldest_pending_delayed`]).
//!
//! Known limits:
//! - Delivery lags its time by up to the caller's period (100 ms in the
//!   broker), plus up to `BASE_MS` when an entry of level 0 waits behind one
//!   that wakes up later (level 0 is the one level not in wake-up order).
//! - A process crash (`kill -9`) cannot deliver twice: the writer writes a
//!   marker to the log before the entry it adds, and both reach the page
//!   cache. An OS crash or power loss could keep a consume-queue page
//!   written after a marker and lose the marker (the kernel writes pages
//!   back in any order before the next fdatasync); the message would then
//!   be delivered again. Recovery cannot tell such an entry from a good one:
//!   it points at an intact record.
//! - A delivered message's entry points back at its original record, so a
//!   real queue's entries are not in log order any more. Retention of a
//!   delivered message counts from when it was sent, and trimming a queue
//!   after retention may hide a few older messages of that queue whose
//!   segment is still there.

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::sync::oneshot;
use txmq_protocol::{now_millis, tag_hash, Message, MsgId};

use super::consume_queue::{ConsumeQueue, Entry};
use super::record::{self, RecordKind};
use super::{Appended, Store, StoreError, WriteCmd};

/// The internal topic whose queues are the delay levels. It is not listed by
/// [`Store::topics`] and cannot be written to directly.
pub const DELAY_TOPIC: &str = "%DELAY%";
/// Number of delay levels (queues of [`DELAY_TOPIC`]).
pub const LEVELS: u32 = 24;
/// Level `L` entries wake up `BASE_MS << L` ms after they were indexed.
pub const BASE_MS: u64 = 100;

/// The level for a message still `remaining` ms from its delivery:
/// `floor(log2(remaining / BASE_MS))`, clamped to `0..LEVELS`.
pub fn level_for(remaining: u64) -> u32 {
    match remaining / BASE_MS {
        0 => 0,
        q => (63 - q.leading_zeros()).min(LEVELS - 1),
    }
}

/// Where a message to deliver at `deliver_at` is indexed at time `now`:
/// its level and the level entry's wake-up time, never later than
/// `deliver_at`. A pure function, so that recovery, replaying a `Delayed`
/// record with `now` = its store timestamp, indexes it exactly as the
/// writer did.
pub fn place(now: u64, deliver_at: u64) -> (u32, u64) {
    let remaining = deliver_at.saturating_sub(now);
    let level = level_for(remaining);
    (level, now + (BASE_MS << level).min(remaining))
}

/// The offsets-table key that holds a level's progress.
pub(crate) fn progress_key(level: u32) -> (String, String, u32) {
    (DELAY_TOPIC.to_string(), DELAY_TOPIC.to_string(), level)
}

/// Length of a `DelayMove` record's body.
pub(crate) const MOVE_BODY_LEN: usize = 25;

/// What a `DelayMove` marker moved a level entry to, as written in its body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MoveKind {
    /// The real queue: the message is delivered.
    Queue = 0,
    /// A lower level.
    Level = 1,
    /// Nowhere: the delayed record could not be read.
    Dropped = 2,
}

/// The body of a `DelayMove` record (layout in `record.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MoveBody {
    pub kind: MoveKind,
    /// The real queue id, or the level.
    pub queue: u32,
    /// Offset of the new entry in the target queue.
    pub offset: u64,
    /// Size of the delayed record.
    pub size: u32,
    /// The new entry's third field: tag hash, or wake-up time.
    pub third: u64,
}

impl MoveBody {
    pub(crate) fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(MOVE_BODY_LEN);
        b.put_u8(self.kind as u8);
        b.put_u32_le(self.queue);
        b.put_u64_le(self.offset);
        b.put_u32_le(self.size);
        b.put_u64_le(self.third);
        b.freeze()
    }

    pub(crate) fn decode(b: &[u8]) -> Option<MoveBody> {
        if b.len() != MOVE_BODY_LEN {
            return None;
        }
        let kind = match b[0] {
            0 => MoveKind::Queue,
            1 => MoveKind::Level,
            2 => MoveKind::Dropped,
            _ => return None,
        };
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(x)
        };
        Some(MoveBody {
            kind,
            queue: u32_at(1),
            offset: u64_at(5),
            size: u32_at(13),
            third: u64_at(17),
        })
    }
}

/// The marker record of a move (the writer fills in the body, which holds
/// the target offset only it knows).
pub(crate) fn marker_message(topic: &str, body: Bytes) -> Message {
    Message {
        msg_id: MsgId::default(),
        topic: topic.to_string(),
        key: None,
        tag: None,
        properties: Default::default(),
        body,
        born_timestamp: 0,
    }
}

/// The aux field of a `DelayedCopy` record: the level entry it moves.
pub(crate) fn copy_aux(level: u32, offset: u64) -> u64 {
    u64::from(level) << 56 | offset
}

/// The level and offset in a `DelayedCopy` record's aux field.
pub(crate) fn parse_copy_aux(aux: u64) -> (u32, u64) {
    ((aux >> 56) as u32, aux & ((1 << 56) - 1))
}

/// The encoded length of a marker whose target topic is `topic`.
pub(crate) fn marker_len(topic: &str) -> usize {
    record::encoded_len(topic, None, None, &Default::default(), MOVE_BODY_LEN)
}

/// One level entry to move, as handed to the writer.
pub(crate) struct DelayMove {
    /// The source level and the entry's offset in it.
    pub level: u32,
    pub offset: u64,
    /// The delayed record.
    pub pos: u64,
    pub size: u32,
    pub target: MoveTarget,
}

/// Where a level entry goes.
pub(crate) enum MoveTarget {
    /// The real queue, with the message's tag hash.
    Queue {
        queue: Arc<ConsumeQueue>,
        tag_hash: u64,
    },
    /// A lower level, waking up at `wake`.
    Level { level: u32, wake: u64 },
    /// Nowhere (the record is unreadable); only the progress moves.
    Dropped,
}

impl MoveTarget {
    pub(crate) fn topic(&self) -> &str {
        match self {
            MoveTarget::Queue { queue, .. } => &queue.topic,
            MoveTarget::Level { .. } => DELAY_TOPIC,
            MoveTarget::Dropped => "",
        }
    }
}

/// Delayed messages not delivered yet.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DelayStats {
    /// In all levels.
    pub pending: u64,
    /// Per level (index = level).
    pub by_level: Vec<u64>,
}

/// At most this many marker bytes per [`Store::deliver_due`] call (and at
/// most half a segment): one write.
const MAX_MOVE_BYTES: usize = 1 << 20;

impl Store {
    /// Stores `messages` (all of topic `topic`) for delivery to queue `queue`
    /// at `deliver_at` (ms since the Unix epoch, the broker's clock): they
    /// become readable in that queue, at the offsets their delivery assigns
    /// them, within about 100 ms after that time (driven by
    /// [`Store::deliver_due`]), also across a restart. A time not in the
    /// future is an ordinary [`Store::append`]. Durability as for
    /// [`Store::append`].
    ///
    /// `first_offset` in the answer is the queue offset for an ordinary
    /// append; for delayed messages it is their offset in the internal delay
    /// level, NOT an offset of the real queue, which is only known at
    /// delivery.
    ///
    /// # Errors
    /// As [`Store::append`]; also [`StoreError::Invalid`] for a delivery time
    /// further away than the configured maximum delay, or a message of
    /// another topic.
    pub async fn append_delayed(
        &self,
        topic: &str,
        queue: u32,
        messages: Vec<Message>,
        deliver_at: u64,
    ) -> Result<Appended, StoreError> {
        let now = now_millis();
        if deliver_at <= now {
            return self.append(topic, queue, messages).await;
        }
        let max = self.inner.config.max_delay.as_millis() as u64;
        if deliver_at - now > max {
            return Err(StoreError::Invalid(format!(
                "delivery time is {} ms away; at most {max} ms allowed",
                deliver_at - now
            )));
        }
        if let Some(m) = messages.iter().find(|m| m.topic != topic) {
            return Err(StoreError::Invalid(format!(
                "a delayed append for topic '{topic}' holds a message of topic '{}'",
                m.topic
            )));
        }
        self.check_writable()?;
        // The real queue must exist now (it is looked up again at delivery).
        self.user_queue(topic, queue)?;
        self.check_sizes(messages.iter())?;
        let (reply, rx) = oneshot::channel();
        self.submit(
            WriteCmd::Delayed {
                queue,
                messages,
                deliver_at,
                reply,
            },
            rx,
        )
        .await
    }

    /// Moves the delay-level entries due at `now_ms` (at most `max`): each
    /// message whose delivery time has come becomes readable in its real
    /// queue, the others go to a lower level. All moves of one call are one
    /// write of small markers (at most 1 MiB of them). Returns how many
    /// entries were moved; when that is not 0, more may be due: call again.
    /// Calls are serialised; the broker runs one task that calls this every
    /// 100 ms.
    ///
    /// A real queue missing at delivery (not possible while queues are never
    /// deleted) is created, as a commit does. A delayed record that cannot
    /// be read (damage) is dropped with an error logged, so that it does not
    /// block its level forever.
    ///
    /// # Errors
    /// I/O errors reading a level or creating a queue, or a store that is
    /// poisoned or shutting down; nothing was moved then.
    pub async fn deliver_due(&self, now_ms: u64, max: usize) -> Result<usize, StoreError> {
        self.check_writable()?;
        let _one_at_a_time = self.inner.delay_lock.lock().await;
        let budget = MAX_MOVE_BYTES.min(self.inner.config.segment_size as usize / 2);
        let mut moves = Vec::new();
        let mut bytes = 0;
        // Lowest level first: under a backlog, deliveries go before moves
        // between levels (which are not due before their next wake-up).
        'levels: for level in 0..LEVELS {
            let cq = &self.inner.delay_levels[level as usize];
            let mut at = self.delay_progress(level);
            while moves.len() < max {
                let entries = cq
                    .read(at, (max - moves.len()).min(256))
                    .map_err(|e| StoreError::io(format!("cannot read delay level {level}"), &e))?;
                if entries.is_empty() {
                    continue 'levels;
                }
                for e in entries {
                    if e.tag_hash > now_ms {
                        continue 'levels;
                    }
                    let target = self.move_target(level, at, &e, now_ms)?;
                    // A delivery may be written as a copy of the message.
                    bytes += match target {
                        MoveTarget::Queue { .. } => marker_len(target.topic()).max(e.size as usize),
                        _ => marker_len(target.topic()),
                    };
                    if bytes > budget && !moves.is_empty() {
                        break 'levels;
                    }
                    moves.push(DelayMove {
                        level,
                        offset: at,
                        pos: e.log_offset,
                        size: e.size,
                        target,
                    });
                    at += 1;
                }
            }
            break;
        }
        if moves.is_empty() {
            return Ok(0);
        }
        let n = moves.len();
        let (reply, rx) = oneshot::channel();
        self.submit(WriteCmd::DelayMoves { moves, reply }, rx)
            .await?;
        Ok(n)
    }

    fn move_target(
        &self,
        level: u32,
        offset: u64,
        e: &Entry,
        now_ms: u64,
    ) -> Result<MoveTarget, StoreError> {
        let rec = self
            .read_record(e.log_offset, e.size)
            .filter(|r| r.kind == RecordKind::Delayed);
        let Some(rec) = rec else {
            tracing::error!(
                level,
                offset,
                log_offset = e.log_offset,
                "a delay level points at an unreadable delayed message; dropping it"
            );
            return Ok(MoveTarget::Dropped);
        };
        let deliver_at = rec.aux;
        if deliver_at > now_ms {
            let (level, wake) = place(now_ms, deliver_at);
            return Ok(MoveTarget::Level { level, wake });
        }
        let topic = &rec.message.topic;
        let queue = match self.queue(topic, rec.queue) {
            Some(q) => q,
            None => {
                self.ensure_queues(topic, rec.queue + 1)?;
                self.queue(topic, rec.queue)
                    .ok_or_else(|| StoreError::NoQueue {
                        topic: topic.clone(),
                        queue: rec.queue,
                    })?
            }
        };
        Ok(MoveTarget::Queue {
            queue,
            tag_hash: tag_hash(rec.message.tag.as_deref()),
        })
    }

    /// The next offset to move in a level.
    fn delay_progress(&self, level: u32) -> u64 {
        let done = self
            .inner
            .offsets
            .get(&progress_key(level))
            .map_or(0, |v| *v);
        done.max(self.inner.delay_levels[level as usize].min_offset())
    }

    /// How many delayed messages wait for delivery.
    pub fn delay_stats(&self) -> DelayStats {
        let by_level: Vec<u64> = (0..LEVELS)
            .map(|level| {
                self.inner.delay_levels[level as usize]
                    .max_offset()
                    .saturating_sub(self.delay_progress(level))
            })
            .collect();
        DelayStats {
            pending: by_level.iter().sum(),
            by_level,
        }
    }

    /// The log position of the oldest delayed record not delivered yet (its
    /// segment must outlive retention). Reads every pending level entry:
    /// meant for retention, not for a hot path.
    ///
    /// # Errors
    /// I/O errors reading a level.
    pub fn oldest_pending_delayed(&self) -> Result<Option<u64>, StoreError> {
        let mut oldest: Option<u64> = None;
        // Highest level first, each level's progress before its entries, and
        // up to the written (not only the readable) end: an entry moving
        // meanwhile from level L to a lower one is written there before L's
        // progress passes it, so it is seen in one place or the other.
        for level in (0..LEVELS).rev() {
            let cq = &self.inner.delay_levels[level as usize];
            let mut at = self.delay_progress(level);
            loop {
                let entries = cq
                    .read_written(at, 4096)
                    .map_err(|e| StoreError::io(format!("cannot read delay level {level}"), &e))?;
                if entries.is_empty() {
                    break;
                }
                at += entries.len() as u64;
                if let Some(min) = entries.iter().map(|e| e.log_offset).min() {
                    oldest = Some(oldest.map_or(min, |o| o.min(min)));
                }
            }
        }
        Ok(oldest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_double_and_wake_ups_never_pass_the_delivery_time() {
        assert_eq!(level_for(0), 0);
        assert_eq!(level_for(99), 0);
        assert_eq!(level_for(100), 0);
        assert_eq!(level_for(199), 0);
        assert_eq!(level_for(200), 1);
        assert_eq!(level_for(3000), 4);
        assert_eq!(level_for(7 * 24 * 3600 * 1000), 22);
        assert_eq!(level_for(u64::MAX), LEVELS - 1);
        for remaining in [0, 1, 50, 100, 150, 250, 3000, 86_400_000] {
            let (level, wake) = place(1_000, 1_000 + remaining);
            assert!(wake <= 1_000 + remaining);
            assert_eq!(level, level_for(remaining));
            // A level-L entry that wakes up leaves less than BASE_MS << L:
            // the next level is strictly lower.
            let left = 1_000 + remaining - wake;
            if level > 0 {
                assert!(level_for(left) < level, "{remaining}");
            } else {
                // Level 0 wakes up at the delivery time, or BASE_MS before
                // it at most, and then at the delivery time.
                assert!(left < BASE_MS);
                assert_eq!(place(wake, 1_000 + remaining).1, 1_000 + remaining);
            }
        }
    }

    #[test]
    fn copy_aux_round_trip() {
        for (level, offset) in [(0, 0), (23, 1 << 40), (LEVELS - 1, (1 << 56) - 1)] {
            assert_eq!(parse_copy_aux(copy_aux(level, offset)), (level, offset));
        }
    }

    #[test]
    fn move_body_round_trip() {
        let b = MoveBody {
            kind: MoveKind::Level,
            queue: 3,
            offset: 77,
            size: 1234,
            third: 1_700_000_000_000,
        };
        let enc = b.encode();
        assert_eq!(enc.len(), MOVE_BODY_LEN);
        assert_eq!(MoveBody::decode(&enc), Some(b));
        assert_eq!(MoveBody::decode(&enc[..24]), None);
        let mut bad = enc.to_vec();
        bad[0] = 9;
        assert_eq!(MoveBody::decode(&bad), None);
    }
}
