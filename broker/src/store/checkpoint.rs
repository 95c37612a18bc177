//! The checkpoint: how far the commit log is durable and every derived
//! structure (consume queues, consumer offsets) is built and durable, plus
//! the consumer offsets as of that point.
//!
//! Written atomically: write a temporary file, fsync it, rename it over the
//! old one, fsync the directory. Layout (little-endian):
//!
//! ```text
//! u32 magic "TXCP", u32 version (2), u64 position, u64 oldest pending
//! transaction (u64::MAX: none), u32 offset count,
//! per offset: u16 len + group, u16 len + topic, u32 queue, u64 offset,
//! (version 2) u32 queue count,
//! per queue: u16 len + topic, u32 queue, u64 entries justified at position,
//! (version 3) the producer table (see `producers.rs`: the next producer
//! id, then per id its token, last use and per queue its last batches
//! ending at or below position),
//! (version 4) the pop table (see `pop.rs`: per pop group's queue its
//! next offset, the end of its last record, and what is in flight),
//! exactly as the records below position left it,
//! u32 CRC32C of everything before it
//! ```
//!
//! Versions 1 (without the queue counts), 2 (without the producer
//! table) and 3 (without the pop table) are still read.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Write};
use std::path::Path;

use bytes::{Buf, BufMut, BytesMut};

use super::pop::PopTable;
use super::producers::ProducerTable;

const MAGIC: u32 = u32::from_le_bytes(*b"TXCP");
const VERSION: u32 = 4;

/// (group, topic, queue) -> next offset to consume.
pub type OffsetTable = BTreeMap<(String, String, u32), u64>;

/// (topic, queue) -> entries justified by records below the position.
pub type QueueTable = BTreeMap<(String, u32), u64>;

/// A checkpoint's content.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Checkpoint {
    /// Log position up to which everything is durable and dispatched.
    pub position: u64,
    /// The oldest transaction still pending at `position` (its half messages
    /// are where recovery must start looking for transaction records).
    pub oldest_pending_tx: Option<u64>,
    /// Consumer offsets as of `position`.
    pub offsets: OffsetTable,
    /// Every consume queue's count of entries whose records lie below
    /// `position` (durable with it); `None` from a version 1 checkpoint.
    /// Entries past it may have lost their record in a crash and are
    /// rebuilt by the replay.
    pub queues: Option<QueueTable>,
    /// Producer ids and their batches; written as of `position`.
    pub producers: ProducerTable,
    /// The pop table as of `position`.
    pub pop: PopTable,
}

impl Checkpoint {
    fn encode(&self) -> BytesMut {
        let mut b = BytesMut::new();
        b.put_u32_le(MAGIC);
        b.put_u32_le(VERSION);
        b.put_u64_le(self.position);
        b.put_u64_le(self.oldest_pending_tx.unwrap_or(u64::MAX));
        b.put_u32_le(self.offsets.len() as u32);
        for ((group, topic, queue), offset) in &self.offsets {
            put_name(&mut b, group);
            put_name(&mut b, topic);
            b.put_u32_le(*queue);
            b.put_u64_le(*offset);
        }
        let queues = self.queues.as_ref();
        b.put_u32_le(queues.map_or(0, BTreeMap::len) as u32);
        for ((topic, queue), next) in queues.into_iter().flatten() {
            put_name(&mut b, topic);
            b.put_u32_le(*queue);
            b.put_u64_le(*next);
        }
        self.producers.encode_below(self.position, &mut b);
        self.pop.encode(&mut b);
        let crc = crc32c::crc32c(&b);
        b.put_u32_le(crc);
        b
    }

    fn decode(data: &[u8]) -> Option<Checkpoint> {
        let (body, crc) = data.split_at(data.len().checked_sub(4)?);
        if crc32c::crc32c(body).to_le_bytes() != crc {
            return None;
        }
        let mut b = body;
        if b.remaining() < 28 || b.get_u32_le() != MAGIC {
            return None;
        }
        let version = b.get_u32_le();
        if !(1..=VERSION).contains(&version) {
            return None;
        }
        let position = b.get_u64_le();
        let oldest_pending_tx = Some(b.get_u64_le()).filter(|p| *p != u64::MAX);
        let n = b.get_u32_le();
        let mut offsets = BTreeMap::new();
        for _ in 0..n {
            let group = get_name(&mut b)?;
            let topic = get_name(&mut b)?;
            if b.remaining() < 12 {
                return None;
            }
            let queue = b.get_u32_le();
            offsets.insert((group, topic, queue), b.get_u64_le());
        }
        let queues = if version >= 2 {
            if b.remaining() < 4 {
                return None;
            }
            let n = b.get_u32_le();
            let mut queues = BTreeMap::new();
            for _ in 0..n {
                let topic = get_name(&mut b)?;
                if b.remaining() < 12 {
                    return None;
                }
                let queue = b.get_u32_le();
                queues.insert((topic, queue), b.get_u64_le());
            }
            Some(queues)
        } else {
            None
        };
        let producers = if version >= 3 {
            ProducerTable::decode(&mut b)?
        } else {
            ProducerTable::default()
        };
        let pop = if version >= 4 {
            PopTable::decode(&mut b)?
        } else {
            PopTable::default()
        };
        if !b.is_empty() {
            return None;
        }
        Some(Checkpoint {
            position,
            oldest_pending_tx,
            offsets,
            queues,
            producers,
            pop,
        })
    }

    /// Reads the checkpoint in `dir`. `Ok(None)` when there is none or it is
    /// damaged (then everything is rebuilt from the start of the log).
    ///
    /// # Errors
    /// I/O errors other than "not found".
    pub fn load(dir: &Path) -> io::Result<Option<Checkpoint>> {
        match std::fs::read(dir.join("checkpoint")) {
            Ok(data) => {
                let cp = Checkpoint::decode(&data);
                if cp.is_none() {
                    tracing::warn!(
                        "checkpoint is damaged; rebuilding from the start of the commit log"
                    );
                }
                Ok(cp)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes the checkpoint atomically into `dir`.
    ///
    /// # Errors
    /// I/O errors; the previous checkpoint is then still in place.
    pub fn store(&self, dir: &Path) -> io::Result<()> {
        let tmp = dir.join("checkpoint.tmp");
        let mut f = File::create(&tmp)?;
        f.write_all(&self.encode())?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, dir.join("checkpoint"))?;
        super::commit_log::sync_dir(dir)
    }
}

/// Writes a group or topic name after its u16 length (names are at most
/// 255 bytes, see `validate_topic_name`), as every table of the
/// checkpoint keeps them.
pub(super) fn put_name(b: &mut BytesMut, name: &str) {
    b.put_u16_le(name.len() as u16);
    b.put_slice(name.as_bytes());
}

/// Reads what [`put_name`] wrote; `None` when cut short or not UTF-8.
pub(super) fn get_name(b: &mut &[u8]) -> Option<String> {
    if b.remaining() < 2 {
        return None;
    }
    let len = b.get_u16_le() as usize;
    if b.remaining() < len {
        return None;
    }
    let s = String::from_utf8(b[..len].to_vec()).ok()?;
    b.advance(len);
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage() {
        let dir = tempfile::tempdir().unwrap();
        let mut cp = Checkpoint {
            position: 4096,
            oldest_pending_tx: Some(100),
            offsets: BTreeMap::new(),
            queues: Some(BTreeMap::from([(("orders".into(), 3), 700)])),
            producers: ProducerTable::default(),
            pop: PopTable::default(),
        };
        cp.producers.init(9, 77, 1);
        cp.offsets.insert(("g1".into(), "orders".into(), 3), 500);
        cp.store(dir.path()).unwrap();
        assert_eq!(Checkpoint::load(dir.path()).unwrap(), Some(cp.clone()));
        let data = cp.encode();
        for i in 0..data.len() {
            let mut bad = data.to_vec();
            bad[i] ^= 1;
            assert_eq!(Checkpoint::decode(&bad), None, "byte {i}");
        }
        for cut in 0..data.len() {
            assert_eq!(Checkpoint::decode(&data[..cut]), None);
        }
    }

    #[test]
    fn a_version_1_checkpoint_is_read_without_queue_counts() {
        let mut b = BytesMut::new();
        b.put_u32_le(MAGIC);
        b.put_u32_le(1);
        b.put_u64_le(4096);
        b.put_u64_le(u64::MAX);
        b.put_u32_le(0);
        let crc = crc32c::crc32c(&b);
        b.put_u32_le(crc);
        let cp = Checkpoint::decode(&b).expect("a version 1 checkpoint");
        assert_eq!(
            (cp.position, cp.oldest_pending_tx, cp.queues),
            (4096, None, None)
        );
    }
}
