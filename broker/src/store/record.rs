//! The commit-log record: an explicit little-endian layout with a length and
//! a CRC32C, never a serde format.
//!
//! ```text
//! 0   u32  total length of the record, this field included
//! 4   u32  CRC32C of bytes 8..total
//! 8   u8   format version: 1, or 2 for a record with a producer stamp
//! 9   u8   kind (see RecordKind)
//! 10  u16  flags: the record count of a transaction group (half messages,
//!          or the messages of a commit), else 0
//! 12  u32  queue id
//! 16  u64  queue offset (for an offset commit: the committed offset)
//! 24  u64  store timestamp, ms since the Unix epoch, the broker's clock
//! 32  u64  born timestamp, ms, the producer's clock
//! 40  [16] message id
//! 56  u64  aux: the transaction id for transaction records, the delivery
//!          time for a delayed message, the delayed record's log position
//!          for a delay move, else 0
//! (version 2 only)
//! 64  u64  producer id
//! 72  u64  sequence: the stamp of the request that wrote the record (the
//!          first message's sequence of an idempotent send, the sequence
//!          of an idempotent prepare), the same in every record it wrote
//! 64 (80 in version 2)
//!     u16 topic length, topic bytes
//!     u16 key length (0xffff: none), key bytes
//!     u16 tag length (0xffff: none), tag bytes
//!     u32 properties length, properties (u16 len, name, u16 len, value)*
//!     u32 body length, body bytes
//! ```
//!
//! An idempotent send's records are one group (flags = its message count,
//! aux = the producer id), so a crash keeps all of them or none: the
//! producer table rebuilt from them never remembers a batch that is half
//! there.
//!
//! A producer id handed out (`ProducerInit`) is an empty record: aux = the
//! id, queue offset = its token.
//!
//! A record carries its real topic and queue, so internal topics (half
//! messages, offset commits, transaction markers, delayed messages) share
//! one log.
//!
//! A delayed message (`Delayed`) is a whole message record whose topic and
//! queue are its real destination; queue offset = its offset in the delay
//! level it was indexed into, aux = the delivery time (ms, broker clock).
//! The level and the level entry's wake-up time are a pure function of
//! (store timestamp, delivery time), see `delay.rs`, so recovery indexes it
//! exactly as the writer did. The record is never copied: a delivery only
//! adds a consume-queue entry pointing at it.
//!
//! A delay move (`DelayMove`) is a small marker written when a delay level
//! entry wakes up: queue = the source level, queue offset = the entry's
//! offset in that level, aux = the delayed record's log position, topic =
//! the target topic (`%DELAY%` for a lower level, empty when dropped), no
//! key, tag or properties, and a 25-byte body:
//!
//! ```text
//! 0   u8   target: 0 = the real queue (delivered), 1 = a lower delay
//!          level, 2 = none (dropped: the delayed record is unreadable)
//! 1   u32  target queue id (the real queue, or the level)
//! 5   u64  offset of the new entry in the target queue
//! 13  u32  size of the delayed record
//! 17  u64  the new entry's third field: the tag hash (real queue) or the
//!          wake-up time in ms (level)
//! ```
//!
//! Applying it (by the writer, and again by recovery) writes that entry and
//! moves the source level's progress to queue offset + 1.
//!
//! A delayed copy (`DelayedCopy`) is a delivery that copies the message
//! instead: written when the delayed record is no longer in the active
//! segment, so that the delivered message stays readable for the whole
//! retention after its delivery (the old segment may expire sooner) and a
//! queue's entries stay in segment order. It is a whole message record,
//! visible in its real queue like `Message` (queue offset = its place
//! there); aux = the delay-level entry it moves: level << 56 | offset in
//! the level. One record, so the copy and the move are atomic.
//!
//! A pop group's receive, acknowledgement, change of deadline and reset
//! (`PopReceive`, `PopAck`, `PopChange`, `PopReset`) are small records
//! with topic = the topic, key = the group, queue = the queue; their
//! fields and bodies are described in `pop.rs`.

use std::collections::BTreeMap;

use bytes::{Bytes, BytesMut};
use txmq_protocol::gather::Gather;
use txmq_protocol::{Message, MsgId, StoredMessage};

/// Bytes before the variable part (version 1; see [`header_len`]).
pub const HEADER_LEN: usize = 64;
/// Where the message id is in a record (see the layout above).
pub const MSG_ID_AT: u64 = 40;
const VERSION: u8 = 1;
/// The version of a record with a producer stamp.
const VERSION_STAMPED: u8 = 2;
/// The producer stamp's bytes in a version 2 header.
const STAMP_LEN: usize = 16;

/// The header length of a record of `version` (`None`: not a version
/// this build writes).
fn header_len(version: u8) -> Option<usize> {
    match version {
        VERSION => Some(HEADER_LEN),
        VERSION_STAMPED => Some(HEADER_LEN + STAMP_LEN),
        _ => None,
    }
}

/// Who wrote a record, for idempotence: the producer id and the sequence
/// of the request that wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Stamp {
    /// The producer id.
    pub producer_id: u64,
    /// The request's sequence number.
    pub sequence: u64,
}
const NONE_LEN: u16 = 0xffff;

/// What a record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RecordKind {
    /// A message visible in its topic and queue.
    Message = 1,
    /// A consumer group's committed offset: key = group, topic/queue = the queue,
    /// queue offset = the committed offset.
    OffsetCommit = 2,
    /// A half message: invisible, keeps its real topic and queue; aux = tx id,
    /// flags = number of half messages in the transaction.
    Half = 3,
    /// A transaction was rolled back; aux = tx id.
    TxRollback = 4,
    /// A check-back was sent; aux = tx id.
    TxCheck = 5,
    /// A transaction was parked after the maximum number of checks; aux = tx id.
    TxPark = 6,
    /// A delayed message: topic/queue = its real destination, queue offset =
    /// its offset in its delay level, aux = the delivery time (ms).
    Delayed = 7,
    /// A delay-level entry moved to its real queue or a lower level: queue =
    /// source level, queue offset = source offset, aux = the delayed record's
    /// position, topic and body = the target (see the module docs).
    DelayMove = 8,
    /// A delivered delayed message, copied into its real queue: visible as
    /// a `Message`; aux = level << 56 | the level entry's offset.
    DelayedCopy = 9,
    /// A producer id was handed out: aux = the id, queue offset = its token.
    ProducerInit = 10,
    /// An operator deleted a topic (`txmq topic delete`): topic = the topic;
    /// its records before this one no longer count. In the log, so that
    /// replicas delete it too and recovery never brings it back.
    TopicDelete = 11,
    /// An operator re-checked a transaction (`txmq tx recheck`): aux = tx
    /// id; it is no longer parked and gets a fresh allowance of checks.
    TxRecheck = 12,
    /// A pop group received messages of a queue (see `pop.rs`): topic/queue
    /// = the queue, key = group, aux = the group's next offset before,
    /// queue offset = after, body = the deliveries.
    PopReceive = 13,
    /// A pop group acknowledged a delivery: topic/queue, key = group, queue
    /// offset = the message's, aux = the delivery's receipt, flags = 1 when
    /// dead-lettered.
    PopAck = 14,
    /// A pop group moved a delivery's deadline: topic/queue, key = group,
    /// queue offset = the message's, aux = the old receipt, body = u64 the
    /// new deadline (ms); the record's position is the new receipt.
    PopChange = 15,
    /// An operator reset a pop group's offset on a queue: topic/queue, key
    /// = group, queue offset = where its next receive starts; what was in
    /// flight there is dropped.
    PopReset = 16,
}

/// What a `TxCheck` record's flags say of the check's answer (a check is
/// recorded once it reached a producer).
pub mod check_answer {
    /// Written before answers were recorded.
    pub const NOT_RECORDED: u16 = 0;
    /// No answer came (timed out, or the connection failed).
    pub const NONE: u16 = 1;
    /// The producer answered "unknown".
    pub const UNKNOWN: u16 = 2;
    /// The producer answered "commit".
    pub const COMMIT: u16 = 3;
    /// The producer answered "rollback".
    pub const ROLLBACK: u16 = 4;
}

/// The kind a record's kind byte names, if any.
pub fn kind_of(b: u8) -> Option<RecordKind> {
    RecordKind::from_u8(b)
}

impl RecordKind {
    fn from_u8(b: u8) -> Option<RecordKind> {
        match b {
            1 => Some(RecordKind::Message),
            2 => Some(RecordKind::OffsetCommit),
            3 => Some(RecordKind::Half),
            4 => Some(RecordKind::TxRollback),
            5 => Some(RecordKind::TxCheck),
            6 => Some(RecordKind::TxPark),
            7 => Some(RecordKind::Delayed),
            8 => Some(RecordKind::DelayMove),
            9 => Some(RecordKind::DelayedCopy),
            10 => Some(RecordKind::ProducerInit),
            11 => Some(RecordKind::TopicDelete),
            12 => Some(RecordKind::TxRecheck),
            13 => Some(RecordKind::PopReceive),
            14 => Some(RecordKind::PopAck),
            15 => Some(RecordKind::PopChange),
            16 => Some(RecordKind::PopReset),
            _ => None,
        }
    }
}

/// Fixed fields of a record to be written.
#[derive(Debug, Clone, Copy)]
pub struct RecordHead {
    /// Kind.
    pub kind: RecordKind,
    /// Queue id.
    pub queue: u32,
    /// Queue offset.
    pub queue_offset: u64,
    /// Store timestamp (ms).
    pub store_timestamp: u64,
    /// Kind-specific extra value (the transaction id).
    pub aux: u64,
    /// The size of the record's transaction group, 0 when none.
    pub flags: u16,
    /// The producer stamp (written as a version 2 record), if any.
    pub stamp: Option<Stamp>,
}

/// The encoded length of a message record.
pub fn encoded_len(
    topic: &str,
    key: Option<&str>,
    tag: Option<&str>,
    props: &BTreeMap<String, String>,
    body: usize,
) -> usize {
    HEADER_LEN
        + 2
        + topic.len()
        + 2
        + key.map_or(0, str::len)
        + 2
        + tag.map_or(0, str::len)
        + 4
        + props
            .iter()
            .map(|(k, v)| 4 + k.len() + v.len())
            .sum::<usize>()
        + 4
        + body
}

/// The encoded length of `msg` as a record with a producer stamp.
pub fn stamped_len(msg: &Message) -> usize {
    message_len(msg) + STAMP_LEN
}

/// The encoded length of `msg` as a record.
pub fn message_len(msg: &Message) -> usize {
    encoded_len(
        &msg.topic,
        msg.key.as_deref(),
        msg.tag.as_deref(),
        &msg.properties,
        msg.body.len(),
    )
}

/// Appends one record for `msg` to `buf`. Field lengths must already have
/// been validated (see [`validate`]).
pub fn encode(buf: &mut BytesMut, head: RecordHead, msg: &Message) {
    let start = buf.len();
    let len = message_len(msg) + head.stamp.map_or(0, |_| STAMP_LEN);
    buf.reserve(len);
    {
        // The fields are gathered on the stack and put in a few at a time
        // (usually all but the body at once): a `put` per field cost a
        // call, a capacity check and a small `memcpy` each.
        let mut out = Gather::new(buf);
        out.bytes(&(len as u32).to_le_bytes());
        out.bytes(&0u32.to_le_bytes()); // CRC, patched below
        out.byte(if head.stamp.is_some() {
            VERSION_STAMPED
        } else {
            VERSION
        });
        out.byte(head.kind as u8);
        out.bytes(&head.flags.to_le_bytes());
        out.bytes(&head.queue.to_le_bytes());
        out.bytes(&head.queue_offset.to_le_bytes());
        out.bytes(&head.store_timestamp.to_le_bytes());
        out.bytes(&msg.born_timestamp.to_le_bytes());
        out.bytes(&msg.msg_id.0);
        out.bytes(&head.aux.to_le_bytes());
        if let Some(stamp) = head.stamp {
            out.bytes(&stamp.producer_id.to_le_bytes());
            out.bytes(&stamp.sequence.to_le_bytes());
        }
        put_str16(&mut out, Some(&msg.topic));
        put_str16(&mut out, msg.key.as_deref());
        put_str16(&mut out, msg.tag.as_deref());
        let props_len: usize = msg
            .properties
            .iter()
            .map(|(k, v)| 4 + k.len() + v.len())
            .sum();
        out.bytes(&(props_len as u32).to_le_bytes());
        for (k, v) in &msg.properties {
            put_str16(&mut out, Some(k));
            put_str16(&mut out, Some(v));
        }
        out.bytes(&(msg.body.len() as u32).to_le_bytes());
        out.bytes(&msg.body);
    }
    debug_assert_eq!(buf.len() - start, len);
    let crc = crc32c::crc32c(&buf[start + 8..]);
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

fn put_str16(out: &mut Gather<'_>, s: Option<&str>) {
    match s {
        None => out.bytes(&NONE_LEN.to_le_bytes()),
        Some(s) => {
            out.bytes(&(s.len() as u16).to_le_bytes());
            out.bytes(s.as_bytes());
        }
    }
}

/// The producer stamp in the header of the record at `head[0]` (at
/// least its first 80 bytes), if it is a version 2 record. Reads the
/// header only, without the CRC: for a position known to hold a record.
pub fn decode_stamp(head: &[u8]) -> Option<Stamp> {
    if *head.get(8)? != VERSION_STAMPED {
        return None;
    }
    let u64_at = |at: usize| -> Option<u64> {
        Some(u64::from_le_bytes(head.get(at..at + 8)?.try_into().ok()?))
    };
    Some(Stamp {
        producer_id: u64_at(HEADER_LEN)?,
        sequence: u64_at(HEADER_LEN + 8)?,
    })
}

/// Checks that a message's variable fields fit the record layout.
///
/// # Errors
/// A message naming the field that is too long.
pub fn validate(msg: &Message) -> Result<(), String> {
    let too_long = |what: &str, len: usize| {
        Err(format!(
            "{what} is {len} bytes; at most {} allowed",
            u16::MAX - 1
        ))
    };
    if msg.topic.len() >= NONE_LEN as usize {
        return too_long("topic", msg.topic.len());
    }
    if let Some(k) = &msg.key {
        if k.len() >= NONE_LEN as usize {
            return too_long("key", k.len());
        }
    }
    if let Some(t) = &msg.tag {
        if t.len() >= NONE_LEN as usize {
            return too_long("tag", t.len());
        }
    }
    for (k, v) in &msg.properties {
        if k.len() >= NONE_LEN as usize || v.len() >= NONE_LEN as usize {
            return too_long("a property", k.len().max(v.len()));
        }
    }
    Ok(())
}

/// What [`check`] finds at a position of the log.
#[derive(Debug, PartialEq, Eq)]
pub enum Check {
    /// A whole record of this length with a good checksum.
    Valid(usize),
    /// Zero bytes where a length should be: nothing was written here.
    End,
    /// Not enough bytes for the announced record.
    Truncated,
    /// A length or checksum that cannot be right.
    Corrupt,
}

/// Checks the record starting at `buf[0]`, verifying its CRC.
pub fn check(buf: &[u8]) -> Check {
    if buf.len() < 4 {
        return if buf.iter().all(|b| *b == 0) {
            Check::End
        } else {
            Check::Truncated
        };
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len == 0 {
        return Check::End;
    }
    if len < HEADER_LEN + 14 {
        return Check::Corrupt;
    }
    if len > buf.len() {
        return Check::Truncated;
    }
    let stored = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
    if crc32c::crc32c(&buf[8..len]) != stored
        || header_len(buf[8]).is_none_or(|h| len < h + 14)
        || RecordKind::from_u8(buf[9]).is_none()
    {
        return Check::Corrupt;
    }
    Check::Valid(len)
}

/// A decoded record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Kind.
    pub kind: RecordKind,
    /// Queue id.
    pub queue: u32,
    /// Queue offset.
    pub queue_offset: u64,
    /// Store timestamp (ms).
    pub store_timestamp: u64,
    /// Kind-specific extra value (the transaction id).
    pub aux: u64,
    /// The size of the record's transaction group, 0 when none.
    pub flags: u16,
    /// The producer stamp of a version 2 record.
    pub stamp: Option<Stamp>,
    /// The message (topic, key, tag, properties, body, id, born time).
    pub message: Message,
}

impl Record {
    /// Whether this is a committed transaction's visible copy of a half
    /// message: a message record with its transaction group's size in the
    /// flags and no producer stamp; aux = the transaction id.
    pub fn is_commit_copy(&self) -> bool {
        self.kind == RecordKind::Message && self.flags > 0 && self.stamp.is_none()
    }

    /// The stored message as a consumer sees it, read at `queue_offset` of
    /// its queue (a delayed message's record holds its delay-level offset,
    /// not the offset it was delivered at).
    pub fn into_stored(self, log_offset: u64, queue_offset: u64) -> StoredMessage {
        StoredMessage {
            message: self.message,
            queue: self.queue,
            queue_offset,
            log_offset,
            store_timestamp: self.store_timestamp,
        }
    }
}

/// Decodes a record from `buf` (which starts at the record), verifying its
/// CRC: a damaged record reads as `None`, never as a message with damaged
/// fields. The body is a zero-copy slice of `buf`. With `header_only`,
/// stops after the fixed header (the CRC still covers the whole record).
///
/// Recovery re-verifies only the segment its checkpoint points into, so the
/// read path cannot trust older segments to be as they were written.
pub fn decode(buf: &Bytes, header_only: bool) -> Option<Record> {
    match check(buf) {
        Check::Valid(_) => decode_unverified(buf, header_only),
        Check::End | Check::Truncated | Check::Corrupt => None,
    }
}

/// [`decode`] without the CRC, for a caller that has just run [`check`]
/// on the same bytes. Checks bounds, the version, and that the fields fill
/// the record exactly: a record whose tail was zeroed or cut reads as
/// `None`, not as a message.
pub fn decode_unverified(buf: &Bytes, header_only: bool) -> Option<Record> {
    let mut r = Reader { buf, pos: 0 };
    let len = r.u32()? as usize;
    if len > buf.len() || len < HEADER_LEN {
        return None;
    }
    let _crc = r.u32()?;
    let version = r.u8()?;
    let header = header_len(version)?;
    if len < header {
        return None;
    }
    let kind = RecordKind::from_u8(r.u8()?)?;
    let flags = r.u16()?;
    let queue = r.u32()?;
    let queue_offset = r.u64()?;
    let store_timestamp = r.u64()?;
    let born_timestamp = r.u64()?;
    let mut id = [0u8; 16];
    id.copy_from_slice(r.take(16)?);
    let aux = r.u64()?;
    let stamp = if version == VERSION_STAMPED {
        Some(Stamp {
            producer_id: r.u64()?,
            sequence: r.u64()?,
        })
    } else {
        None
    };
    let mut message = Message {
        msg_id: MsgId(id),
        topic: String::new(),
        key: None,
        tag: None,
        properties: BTreeMap::new(),
        body: Bytes::new(),
        born_timestamp,
    };
    if !header_only {
        let r = &mut Reader {
            buf: &buf.slice(..len),
            pos: header,
        };
        message.topic = r.str16()?.unwrap_or_default();
        message.key = r.str16()?;
        message.tag = r.str16()?;
        let props_len = r.u32()? as usize;
        let props_end = r.pos.checked_add(props_len)?;
        while r.pos < props_end {
            let k = r.str16()??;
            let v = r.str16()??;
            message.properties.insert(k, v);
        }
        if r.pos != props_end {
            return None;
        }
        let body_len = r.u32()? as usize;
        let start = r.pos;
        r.take(body_len)?;
        if r.pos != len {
            // The length says more than the fields hold: not a record we wrote.
            return None;
        }
        message.body = r.buf.slice(start..start + body_len);
    }
    Some(Record {
        kind,
        queue,
        queue_offset,
        store_timestamp,
        aux,
        flags,
        stamp,
        message,
    })
}

/// Whether the record at `buf[0]` is one [`decode_unverified`] reads
/// whole: its fields fill it exactly. Builds nothing (no allocation), for a
/// caller that has run [`check`] and must not store what no reader could
/// decode (a slave verifying a batch from its master).
pub fn well_formed(buf: &[u8]) -> bool {
    struct Cursor<'a> {
        rec: &'a [u8],
        pos: usize,
    }
    impl Cursor<'_> {
        fn take(&mut self, n: usize) -> Option<&[u8]> {
            let end = self.pos.checked_add(n)?;
            let s = self.rec.get(self.pos..end)?;
            self.pos = end;
            Some(s)
        }
        fn u32(&mut self) -> Option<usize> {
            let b = self.take(4)?;
            Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
        }
        /// `Some(false)` for an absent string.
        fn str16(&mut self) -> Option<bool> {
            let b = self.take(2)?;
            let n = u16::from_le_bytes([b[0], b[1]]);
            if n == NONE_LEN {
                return Some(false);
            }
            self.take(n as usize).map(|_| true)
        }
    }
    fn walk(buf: &[u8]) -> Option<()> {
        let len = u32::from_le_bytes(buf.get(..4)?.try_into().ok()?) as usize;
        if len < HEADER_LEN {
            return None;
        }
        let rec = buf.get(..len)?;
        let header = header_len(rec[8])?;
        if len < header {
            return None;
        }
        RecordKind::from_u8(rec[9])?;
        let mut c = Cursor { rec, pos: header };
        // Topic, key, tag.
        for _ in 0..3 {
            c.str16()?;
        }
        let props_len = c.u32()?;
        let props_end = c.pos.checked_add(props_len)?;
        while c.pos < props_end {
            // A property is a present name and a present value.
            if !c.str16()? || !c.str16()? {
                return None;
            }
        }
        if c.pos != props_end {
            return None;
        }
        let body_len = c.u32()?;
        c.take(body_len)?;
        (c.pos == len).then_some(())
    }
    walk(buf).is_some()
}

struct Reader<'a> {
    buf: &'a Bytes,
    pos: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    /// `Some(None)` for an absent string, `None` for malformed input.
    fn str16(&mut self) -> Option<Option<String>> {
        let len = self.u16()?;
        if len == NONE_LEN {
            return Some(None);
        }
        let s = self.take(len as usize)?;
        Some(Some(String::from_utf8_lossy(s).into_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;

    /// The bytes a record is written as, at the offsets the module's
    /// documentation gives: the format on disk, which logs written before
    /// any change of the encoder must still be read in.
    #[test]
    fn a_stamped_records_bytes_are_laid_out_as_documented() {
        let mut msg = Message::new("orders", &b"body!"[..]).with_tag("t1");
        msg.born_timestamp = 0x3031_3233_3435_3637;
        let head = RecordHead {
            kind: RecordKind::Message,
            queue: 0x0102_0304,
            queue_offset: 0x1011_1213_1415_1617,
            store_timestamp: 0x2021_2223_2425_2627,
            aux: 0x4041_4243_4445_4647,
            flags: 0x0506,
            stamp: Some(Stamp {
                producer_id: 0x5051_5253_5455_5657,
                sequence: 0x6061_6263_6465_6667,
            }),
        };
        let mut buf = BytesMut::new();
        buf.put_slice(b"before");
        encode(&mut buf, head, &msg);
        let r = &buf[6..];
        let u16_at = |at: usize| u16::from_le_bytes(r[at..at + 2].try_into().unwrap());
        let u32_at = |at: usize| u32::from_le_bytes(r[at..at + 4].try_into().unwrap());
        let u64_at = |at: usize| u64::from_le_bytes(r[at..at + 8].try_into().unwrap());
        assert_eq!(u32_at(0) as usize, r.len());
        assert_eq!(u32_at(4), crc32c::crc32c(&r[8..]));
        assert_eq!((r[8], r[9]), (VERSION_STAMPED, RecordKind::Message as u8));
        assert_eq!(u16_at(10), 0x0506);
        assert_eq!(u32_at(12), 0x0102_0304);
        assert_eq!(u64_at(16), 0x1011_1213_1415_1617);
        assert_eq!(u64_at(24), 0x2021_2223_2425_2627);
        assert_eq!(u64_at(32), 0x3031_3233_3435_3637);
        assert_eq!(&r[40..56], &msg.msg_id.0);
        assert_eq!(u64_at(56), 0x4041_4243_4445_4647);
        assert_eq!(u64_at(64), 0x5051_5253_5455_5657);
        assert_eq!(u64_at(72), 0x6061_6263_6465_6667);
        let mut tail = Vec::new();
        tail.extend_from_slice(&6u16.to_le_bytes());
        tail.extend_from_slice(b"orders");
        tail.extend_from_slice(&NONE_LEN.to_le_bytes());
        tail.extend_from_slice(&2u16.to_le_bytes());
        tail.extend_from_slice(b"t1");
        tail.extend_from_slice(&0u32.to_le_bytes());
        tail.extend_from_slice(&5u32.to_le_bytes());
        tail.extend_from_slice(b"body!");
        assert_eq!(&r[80..], &tail[..]);
        // Without a stamp: version 1, and the topic right after aux.
        let mut buf = BytesMut::new();
        encode(
            &mut buf,
            RecordHead {
                stamp: None,
                ..head
            },
            &msg,
        );
        assert_eq!(buf[8], VERSION);
        assert_eq!(&buf[64..], &tail[..]);
    }

    fn sample() -> Message {
        Message::new("orders", &b"hello world"[..])
            .with_key("k1")
            .with_tag("t1")
            .with_property("a", "b")
    }

    fn head() -> RecordHead {
        RecordHead {
            kind: RecordKind::Message,
            queue: 3,
            queue_offset: 77,
            store_timestamp: 123,
            aux: 0,
            flags: 0,
            stamp: None,
        }
    }

    #[test]
    fn round_trip() {
        let msg = sample();
        let mut buf = BytesMut::new();
        encode(&mut buf, head(), &msg);
        assert_eq!(buf.len(), message_len(&msg));
        assert_eq!(check(&buf), Check::Valid(buf.len()));
        let rec = decode(&buf.freeze(), false).unwrap();
        assert_eq!(rec.message, msg);
        assert_eq!(
            (rec.queue, rec.queue_offset, rec.store_timestamp),
            (3, 77, 123)
        );
    }

    #[test]
    fn every_truncation_is_detected() {
        let mut buf = BytesMut::new();
        encode(&mut buf, head(), &sample());
        for cut in 1..buf.len() {
            let c = check(&buf[..cut]);
            assert!(
                matches!(c, Check::Truncated | Check::Corrupt),
                "cut {cut}: {c:?}"
            );
        }
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let mut buf = BytesMut::new();
        encode(&mut buf, head(), &sample());
        for i in 0..buf.len() {
            let mut bad = buf.clone();
            bad[i] ^= 0x40;
            assert_ne!(check(&bad), Check::Valid(buf.len()), "byte {i}");
        }
    }

    #[test]
    fn a_record_with_a_zeroed_tail_does_not_decode() {
        let mut buf = BytesMut::new();
        encode(&mut buf, head(), &sample());
        // Zeros from inside the variable part's lengths on (zeros inside the
        // body itself only the CRC can tell).
        for from in [16, HEADER_LEN, HEADER_LEN + 3] {
            let mut bad = buf.clone();
            bad[from..].fill(0);
            assert!(
                decode_unverified(&bad.freeze(), false).is_none(),
                "zeroed from {from}"
            );
        }
        let mut old = buf.clone();
        old[8] = 0;
        assert!(
            decode_unverified(&old.freeze(), true).is_none(),
            "unknown version"
        );
    }

    #[test]
    fn decode_refuses_a_flipped_byte_anywhere() {
        let mut buf = BytesMut::new();
        encode(&mut buf, head(), &sample());
        for i in 0..buf.len() {
            let mut bad = buf.clone();
            bad[i] ^= 0x01;
            assert!(decode(&bad.freeze(), false).is_none(), "byte {i}");
        }
    }

    #[test]
    fn well_formed_agrees_with_decode() {
        let bare = Message::new("t", &b""[..]);
        for msg in [sample(), bare] {
            let mut buf = BytesMut::new();
            encode(&mut buf, head(), &msg);
            assert!(well_formed(&buf));
            let decodes = |b: &[u8]| decode_unverified(&Bytes::copy_from_slice(b), false).is_some();
            for i in 0..buf.len() {
                for x in [0x01u8, 0x80, 0xff] {
                    let mut bad = buf.clone();
                    bad[i] ^= x;
                    assert_eq!(well_formed(&bad), decodes(&bad), "byte {i} ^ {x:#x}");
                }
            }
            for cut in 0..buf.len() {
                assert_eq!(well_formed(&buf[..cut]), decodes(&buf[..cut]), "cut {cut}");
            }
        }
    }

    #[test]
    fn zeros_are_the_end_and_garbage_is_corrupt() {
        assert_eq!(check(&[0u8; 100]), Check::End);
        // 0xABABABAB announces a record longer than the 100 bytes there.
        assert_eq!(check(&[0xAB; 100]), Check::Truncated);
        let mut plausible = [0x5Au8; 100];
        plausible[..4].copy_from_slice(&90u32.to_le_bytes());
        assert_eq!(check(&plausible), Check::Corrupt);
    }
}
