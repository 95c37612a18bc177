//! The message index: find a record of the commit log by message id, or by
//! topic and key, without scanning the log.
//!
//! Like the consume queues it is derived from the log and rebuilt from it.
//! The layout follows the idea of RocketMQ's index file (hash slots whose
//! entries chain back to older entries of the same slot, one file per range
//! of the log), written here from scratch:
//!
//! ```text
//! header (64 bytes, little-endian):
//!   0  u32 magic "TXIX"     4  u32 version (2; 1: hashed with FNV-1a)
//!   8  u32 slot count      12  u32 entry capacity
//!  16  u32 entries durable 20  u32 flags (1: sealed; its slots are on disk)
//!  24  u64 log position of the first record indexed (also the file name)
//!  32  u64 log position up to which every record is indexed, durably
//!  40  u64 oldest store time   48  u64 newest store time (ms)
//!  56  u32 (reserved)      60  u32 CRC32C of bytes 0..60
//! slots: slot count x u32, entry number + 1 of the slot's newest entry
//!   (0: none); written when the file is sealed (full)
//! entries: capacity x 32 bytes:
//!   u64 hash, u64 log position, u64 store time (ms), u32 previous entry
//!   number + 1 of the same slot (0: none), u32 record size
//! ```
//!
//! A message is indexed under its id and under each of its keys (the key
//! property split at spaces, as RocketMQ does), hashed with its topic.
//! Version 2 files hash with XXH3 (a few nanoseconds for an id); version
//! 1 files, written before, hashed byte by byte with FNV-1a, which cost the
//! writer about as much as the rest of the entry. A lookup hashes what it
//! looks for once per version, and a file keeps its version while it fills.
//! The writer indexes every chunk it writes (`add_chunk`); new entries
//! gather in memory and go out with one `pwrite` per 64 KiB (2048 entries),
//! not one per chunk, and before each `sync`; the slots of the file being
//! filled live in memory and reach the disk when it is full. Entries are hints: a
//! lookup reads the record they point at and keeps it only when it really
//! is the message asked for, so a stale entry (a log cut after a crash, a
//! hash collision) can never answer wrongly.
//!
//! Durability: `sync` (with each checkpoint) reserves blocks a little
//! ahead of the entries (see `reserve.rs`), fdatasyncs the files, then
//! records in the header how many entries and how far in the log they are
//! durable. `open` trusts exactly that, and re-indexes the log from there
//! to its end: a `kill -9` or power cut loses no lookup of a record the log
//! kept. Retention deletes the files that cover only deleted segments.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use txmq_protocol::MsgId;
use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::commit_log::CommitLog;
use super::record::{RecordKind, HEADER_LEN as RECORD_HEADER_LEN};

const MAGIC: u32 = u32::from_le_bytes(*b"TXIX");
/// The version of new files.
const VERSION: u32 = 2;
/// Versions a lookup reads (their hashes differ).
const VERSIONS: std::ops::RangeInclusive<u32> = 1..=VERSION;
const HEADER_LEN: u64 = 64;
/// Bytes per index entry.
pub const ENTRY_LEN: usize = 32;
const SEALED: u32 = 1;

/// Index sizes.
#[derive(Debug, Clone, Copy)]
pub struct IndexConfig {
    /// Hash slots per file.
    pub slots: u32,
    /// Entries per file.
    pub entries: u32,
    /// The version new files are written in (older ones only for tests of
    /// an upgrade).
    pub version: u32,
}

impl Default for IndexConfig {
    /// 128 Ki slots and 4 Mi entries a file: 512 KiB of slots, 128 MiB
    /// of entries (written as they come), about 2 million keyed messages.
    /// The slots of the file being filled are updated at every entry, in
    /// random order: 512 KiB stay in the CPU's caches where 4 MiB did not
    /// (with 4 MiB, updating them was 8.6% of the broker's CPU under
    /// batched sends). A lookup walks a slot's chain: at most about 32
    /// entries of a full file.
    fn default() -> IndexConfig {
        IndexConfig {
            slots: 1 << 17,
            entries: 4 << 20,
            version: VERSION,
        }
    }
}

/// What a lookup looks for, hashed as each file version hashes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hashes {
    fnv: u64,
    xxh3: u64,
}

impl Hashes {
    fn of(&self, version: u32) -> u64 {
        if version == 1 {
            self.fnv
        } else {
            self.xxh3
        }
    }
}

/// A message id's hashes in the index.
pub fn id_hashes(id: &MsgId) -> Hashes {
    Hashes {
        fnv: id_hash(1, id),
        xxh3: id_hash(VERSION, id),
    }
}

/// The moves of the delayed message stored at log position `pos` (its
/// `DelayMove` records, which name it by position): their hashes in the
/// index, as keys under a name no topic may have (it holds spaces), so
/// never a message's.
pub fn delay_move_hashes(pos: u64) -> Hashes {
    Hashes {
        fnv: key_hash(1, DELAY_MOVES, &pos.to_le_bytes()),
        xxh3: key_hash(VERSION, DELAY_MOVES, &pos.to_le_bytes()),
    }
}

/// The topic `delay_move_hashes` keys under.
const DELAY_MOVES: &[u8] = b"%DELAY MOVES%";

/// One key of a topic: its hashes in the index.
pub fn key_hashes(topic: &str, key: &str) -> Hashes {
    Hashes {
        fnv: key_hash(1, topic.as_bytes(), key.as_bytes()),
        xxh3: key_hash(VERSION, topic.as_bytes(), key.as_bytes()),
    }
}

/// Seeds that keep ids and keys apart in version 2.
const ID_SEED: u64 = 0x6964;
const KEY_SEED: u64 = 0x006b_6579;

/// The hash of a message id in a file of `version`.
fn id_hash(version: u32, id: &MsgId) -> u64 {
    if version == 1 {
        fnv(&[b"i", &id.0])
    } else {
        xxh3_64_with_seed(&id.0, ID_SEED)
    }
}

/// The hash of one key of a topic in a file of `version`.
fn key_hash(version: u32, topic: &[u8], key: &[u8]) -> u64 {
    if version == 1 {
        fnv(&[b"k", topic, b"\0", key])
    } else {
        xxh3_64_with_seed(key, xxh3_64_with_seed(topic, KEY_SEED))
    }
}

/// Version 1's hash: FNV-1a over the parts, then a finaliser (ids differ
/// in their last bytes only, and the slot is the hash modulo the slot
/// count).
fn fnv(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in *p {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    // splitmix64's finaliser
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The slot of `hash` in a file of `slots` slots: the hash modulo the slot
/// count, by a mask when the count is a power of two (the default; a
/// 64-bit division at every entry cost the writer more than the rest of
/// the entry).
fn slot_of(hash: u64, slots: u32) -> u64 {
    if slots.is_power_of_two() {
        hash & u64::from(slots - 1)
    } else {
        hash % u64::from(slots)
    }
}

/// The keys of a key property: split at spaces, empty parts left out.
pub fn keys_of(key: &str) -> impl Iterator<Item = &str> {
    key.split(' ').filter(|k| !k.is_empty())
}

/// [`keys_of`] over the bytes of a record (the writer and recovery read
/// records without checking their strings again).
fn keys_in(key: &[u8]) -> impl Iterator<Item = &[u8]> {
    key.split(|b| *b == b' ').filter(|k| !k.is_empty())
}

/// Where a record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hit {
    /// Its log position.
    pub pos: u64,
    /// Its size.
    pub size: u32,
    /// Its store time (ms).
    pub store_timestamp: u64,
}

#[derive(Debug)]
struct IndexFile {
    start: u64,
    path: PathBuf,
    file: Arc<File>,
    /// How its entries are hashed.
    version: u32,
    slots: u32,
    capacity: u32,
    /// The file being filled: its slots (`None` once sealed: on disk).
    mem_slots: Option<Vec<u32>>,
    count: u32,
    /// One past the last record indexed.
    end: u64,
    min_ts: u64,
    max_ts: u64,
    /// Its header says sealed and durable.
    synced_sealed: bool,
    synced_count: u32,
    synced_end: u64,
}

impl IndexFile {
    fn entries_at(&self) -> u64 {
        HEADER_LEN + u64::from(self.slots) * 4
    }

    fn header(&self, count: u32, end: u64, sealed: bool) -> [u8; HEADER_LEN as usize] {
        let mut h = [0u8; HEADER_LEN as usize];
        h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        h[4..8].copy_from_slice(&self.version.to_le_bytes());
        h[8..12].copy_from_slice(&self.slots.to_le_bytes());
        h[12..16].copy_from_slice(&self.capacity.to_le_bytes());
        h[16..20].copy_from_slice(&count.to_le_bytes());
        h[20..24].copy_from_slice(&(if sealed { SEALED } else { 0 }).to_le_bytes());
        h[24..32].copy_from_slice(&self.start.to_le_bytes());
        h[32..40].copy_from_slice(&end.to_le_bytes());
        h[40..48].copy_from_slice(&self.min_ts.to_le_bytes());
        h[48..56].copy_from_slice(&self.max_ts.to_le_bytes());
        let crc = crc32c::crc32c(&h[..60]);
        h[60..64].copy_from_slice(&crc.to_le_bytes());
        h
    }

    fn create(dir: &Path, start: u64, config: IndexConfig) -> io::Result<IndexFile> {
        let path = dir.join(format!("{start:020}"));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)?;
        let f = IndexFile {
            start,
            path,
            file: Arc::new(file),
            version: config.version,
            slots: config.slots,
            capacity: config.entries,
            mem_slots: Some(vec![0; config.slots as usize]),
            count: 0,
            end: start,
            min_ts: u64::MAX,
            max_ts: 0,
            synced_sealed: false,
            synced_count: 0,
            synced_end: start,
        };
        f.file.write_all_at(&f.header(0, start, false), 0)?;
        f.file.sync_all()?;
        super::commit_log::sync_dir(dir)?;
        Ok(f)
    }

    /// Opens a file as its header says it was last synced; `None` for a
    /// header that is not an index file's.
    fn load(path: PathBuf, start: u64) -> io::Result<Option<IndexFile>> {
        let file = OpenOptions::new().read(true).write(true).open(&path)?;
        let mut h = [0u8; HEADER_LEN as usize];
        if file.read_exact_at(&mut h, 0).is_err() {
            return Ok(None);
        }
        let u32_at = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
        let u64_at = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&h[i..i + 8]);
            u64::from_le_bytes(b)
        };
        if u32_at(0) != MAGIC
            || !VERSIONS.contains(&u32_at(4))
            || crc32c::crc32c(&h[..60]) != u32_at(60)
            || u64_at(24) != start
            || u32_at(8) == 0
            || u32_at(16) > u32_at(12)
        {
            return Ok(None);
        }
        let count = u32_at(16);
        Ok(Some(IndexFile {
            start,
            path,
            file: Arc::new(file),
            version: u32_at(4),
            slots: u32_at(8),
            capacity: u32_at(12),
            mem_slots: None,
            count,
            end: u64_at(32),
            min_ts: u64_at(40),
            max_ts: u64_at(48),
            synced_sealed: u32_at(20) & SEALED != 0,
            synced_count: count,
            synced_end: u64_at(32),
        }))
    }

    /// Makes this the file being filled again: drops entries past the
    /// durable count and rebuilds the slots from the entries.
    fn reopen_for_writing(&mut self) -> io::Result<()> {
        self.file
            .set_len(self.entries_at() + u64::from(self.count) * ENTRY_LEN as u64)?;
        let mut slots = vec![0u32; self.slots as usize];
        let mut buf = vec![0u8; ENTRY_LEN * 4096];
        let mut i = 0u32;
        while i < self.count {
            let n = (self.count - i).min(4096) as usize;
            let bytes = &mut buf[..n * ENTRY_LEN];
            self.file
                .read_exact_at(bytes, self.entries_at() + u64::from(i) * ENTRY_LEN as u64)?;
            for e in bytes.chunks_exact(ENTRY_LEN) {
                let h = u64_le(&e[0..8]);
                // Each entry's own link was written from these slots, as
                // they stood: only the head of each chain is needed.
                slots[slot_of(h, self.slots) as usize] = i + 1;
                i += 1;
            }
        }
        self.mem_slots = Some(slots);
        self.synced_sealed = false;
        // The header may say sealed: it must not, until sealed again.
        let header = self.header(self.count, self.end, false);
        self.file.write_all_at(&header, 0)?;
        self.file.sync_data()?;
        Ok(())
    }

    /// What a lookup needs, taken under the lock: entries below `count`
    /// never change, so the walk itself runs without it.
    /// How a lookup of `hash` sees this file; `gathered`: its newest
    /// entries, not written yet.
    fn view(&self, hashes: Hashes, gathered: &[u8]) -> FileView {
        let hash = hashes.of(self.version);
        let slot = slot_of(hash, self.slots);
        let unwritten = (gathered.len() / ENTRY_LEN) as u32;
        let gathered = if gathered.is_empty() {
            Vec::new()
        } else {
            gathered.to_vec()
        };
        FileView {
            hash,
            gathered,
            written: self.count - unwritten,
            file: self.file.clone(),
            entries_at: self.entries_at(),
            slot,
            head: self.mem_slots.as_ref().map(|m| m[slot as usize]),
            count: self.count,
            min_ts: self.min_ts,
            max_ts: self.max_ts,
        }
    }
}

/// One file as a lookup sees it.
struct FileView {
    /// What the lookup looks for, as this file hashes it.
    hash: u64,
    /// The newest entries, not written yet (entry numbers from `written`).
    gathered: Vec<u8>,
    /// Entries on disk.
    written: u32,
    file: Arc<File>,
    entries_at: u64,
    slot: u64,
    /// The slot's head, for the file being filled (else read from disk).
    head: Option<u32>,
    count: u32,
    min_ts: u64,
    max_ts: u64,
}

impl FileView {
    /// Entries of the hash looked for, newest first, within `[since,
    /// until]`, until `keep` says stop (then `false`).
    fn walk(&self, since: u64, until: u64, mut keep: impl FnMut(Hit) -> bool) -> io::Result<bool> {
        if self.count == 0 || self.max_ts < since || self.min_ts > until {
            return Ok(true);
        }
        let mut next = match self.head {
            Some(h) => h,
            None => {
                let mut b = [0u8; 4];
                self.file
                    .read_exact_at(&mut b, HEADER_LEN + self.slot * 4)?;
                u32::from_le_bytes(b)
            }
        };
        let mut e = [0u8; ENTRY_LEN];
        while next != 0 && next <= self.count {
            let i = next - 1;
            if i >= self.written {
                let at = (i - self.written) as usize * ENTRY_LEN;
                e.copy_from_slice(&self.gathered[at..at + ENTRY_LEN]);
            } else {
                self.file
                    .read_exact_at(&mut e, self.entries_at + u64::from(i) * ENTRY_LEN as u64)?;
            }
            let ts = u64_le(&e[16..24]);
            if u64_le(&e[0..8]) == self.hash && ts >= since && ts <= until {
                let hit = Hit {
                    pos: u64_le(&e[8..16]),
                    size: u32_le(&e[28..32]),
                    store_timestamp: ts,
                };
                if !keep(hit) {
                    return Ok(false);
                }
            }
            let prev = u32_le(&e[24..28]);
            // Links point back only: a damaged one cannot loop.
            if prev >= next {
                break;
            }
            next = prev;
        }
        Ok(true)
    }
}

fn u64_le(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

fn u32_le(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// The whole records at the start of `chunk` (each begins with its length),
/// with where each begins in it.
fn records(chunk: &[u8]) -> impl Iterator<Item = (usize, &[u8])> {
    let mut at = 0usize;
    std::iter::from_fn(move || {
        let len = u32_le(chunk.get(at..at + 4)?) as usize;
        if len == 0 || at + len > chunk.len() {
            return None;
        }
        let rec = (at, &chunk[at..at + len]);
        at += len;
        Some(rec)
    })
}

/// Asks the CPU to bring the cache line of `v` in, without waiting for it.
#[inline]
#[allow(unsafe_code)]
fn prefetch_line<T>(v: &T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch only hints the cache (it never faults, and `v` is
    // a valid reference anyway), and SSE is part of every x86_64 CPU.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch::<_MM_HINT_T0>(std::ptr::from_ref(v).cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = v;
}

#[derive(Debug)]
struct State {
    /// Oldest first; the last one is being filled.
    files: Vec<IndexFile>,
    /// The newest entries of the file being filled, not written yet: they
    /// go out with one `pwrite` once [`WRITE_AT`] bytes have gathered (or
    /// the file fills, or `sync` runs), not one per chunk. Lookups read
    /// them from here.
    scratch: Vec<u8>,
}

/// Bytes of new entries gathered before they are written (2048 entries).
const WRITE_AT: usize = 64 * 1024;

/// The message index of a store. Cheap to share (`Arc`); the writer adds,
/// anyone looks up.
#[derive(Debug)]
pub struct MessageIndex {
    dir: PathBuf,
    config: IndexConfig,
    state: RwLock<State>,
    /// Blocks reserved ahead of the appends (only `sync` takes it).
    ahead: std::sync::Mutex<super::reserve::Ahead>,
}

/// What an index entry is made from: a record's header fields and its
/// topic and key, read in place.
struct Indexed<'a> {
    kind: RecordKind,
    store_timestamp: u64,
    id: MsgId,
    topic: &'a [u8],
    key: Option<&'a [u8]>,
    /// The record's aux field: for a delay move, the delayed record's
    /// position.
    aux: u64,
}

impl Indexed<'_> {
    /// The keys it is indexed under (a message's, not a transaction
    /// event's).
    fn keys(&self) -> impl Iterator<Item = &[u8]> {
        let keyed = matches!(
            self.kind,
            RecordKind::Message | RecordKind::Half | RecordKind::Delayed | RecordKind::DelayedCopy
        );
        self.key.filter(|_| keyed).into_iter().flat_map(keys_in)
    }

    /// The hashes of its entries in a file of `version`: its id's, then
    /// each key's.
    fn hashes(&self, version: u32) -> impl Iterator<Item = u64> + '_ {
        // A delay move is found by the position of the message it moves
        // (its own id is a marker's, not the message's).
        let moved = (self.kind == RecordKind::DelayMove)
            .then(|| key_hash(version, DELAY_MOVES, &self.aux.to_le_bytes()));
        let id = (self.kind != RecordKind::DelayMove).then(|| id_hash(version, &self.id));
        id.into_iter()
            .chain(moved)
            .chain(self.keys().map(move |k| key_hash(version, self.topic, k)))
    }
}

/// Reads what the index needs from the record at `rec[0]` (already known
/// whole and valid: written by the writer or checked by recovery).
fn indexed(rec: &[u8]) -> Option<Indexed<'_>> {
    let kind = super::record::kind_of(*rec.get(9)?)?;
    if !matches!(
        kind,
        RecordKind::Message
            | RecordKind::Half
            | RecordKind::Delayed
            | RecordKind::DelayedCopy
            | RecordKind::TxRollback
            | RecordKind::TxCheck
            | RecordKind::TxPark
            | RecordKind::DelayMove
    ) {
        return None;
    }
    let header = match rec.get(8)? {
        1 => RECORD_HEADER_LEN,
        2 => RECORD_HEADER_LEN + 16,
        _ => return None,
    };
    let store_timestamp = u64_le(rec.get(24..32)?);
    let mut id = [0u8; 16];
    id.copy_from_slice(rec.get(40..56)?);
    let aux = u64_le(rec.get(56..64)?);
    let mut at = header;
    let mut str16 = || -> Option<Option<&[u8]>> {
        let len = u16::from_le_bytes([*rec.get(at)?, *rec.get(at + 1)?]);
        at += 2;
        if len == 0xffff {
            return Some(None);
        }
        let s = rec.get(at..at + len as usize)?;
        at += len as usize;
        Some(Some(s))
    };
    let topic = str16()?.unwrap_or_default();
    let key = str16()?;
    Some(Indexed {
        kind,
        store_timestamp,
        id: MsgId(id),
        topic,
        key,
        aux,
    })
}

impl MessageIndex {
    /// Opens the index in `dir` (creating it), keeps what its headers say
    /// is durable, and indexes the records of `log` from there to `end`.
    ///
    /// # Errors
    /// I/O errors.
    pub fn open(
        dir: PathBuf,
        config: IndexConfig,
        log: &CommitLog,
        end: u64,
    ) -> io::Result<MessageIndex> {
        super::commit_log::create_dir_durable(&dir)?;
        let mut starts: Vec<u64> = Vec::new();
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            if let Some(start) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u64>().ok())
            {
                starts.push(start);
            }
        }
        starts.sort_unstable();
        let mut files: Vec<IndexFile> = Vec::new();
        let mut stop = false;
        for start in starts {
            let path = dir.join(format!("{start:020}"));
            if stop {
                std::fs::remove_file(&path)?;
                continue;
            }
            match IndexFile::load(path.clone(), start)? {
                Some(f) if f.synced_sealed => files.push(f),
                Some(mut f) => {
                    // Not durably sealed: the last file kept; what came
                    // after it is indexed again.
                    f.reopen_for_writing()?;
                    files.push(f);
                    stop = true;
                }
                None => {
                    std::fs::remove_file(&path)?;
                    stop = true;
                }
            }
        }
        let from = files
            .last()
            .map_or(log.min_offset(), |f| f.synced_end)
            .max(log.min_offset())
            .min(end);
        if files.last().is_none_or(|f| f.mem_slots.is_none()) {
            files.push(IndexFile::create(&dir, from, config)?);
        }
        if let Some(f) = files.last_mut() {
            f.end = f.end.min(end);
        }
        let index = MessageIndex {
            dir,
            config,
            state: RwLock::new(State {
                files,
                scratch: Vec::with_capacity(64 * 1024),
            }),
            ahead: std::sync::Mutex::new(super::reserve::Ahead::default()),
        };
        index.reindex(log, from, end)?;
        Ok(index)
    }

    /// Indexes the records of `log` in `[from, end)`, segment by segment.
    fn reindex(&self, log: &CommitLog, from: u64, end: u64) -> io::Result<()> {
        let mut count = 0u64;
        for seg in log.segments() {
            if seg.end() <= from || seg.start >= end {
                continue;
            }
            let start = from.max(seg.start);
            let stop = (end.min(seg.end()) - seg.start) as usize;
            let data = &seg.map[(start - seg.start) as usize..stop];
            // Whole records only (the zeroed tail of a segment ends it).
            let mut len = 0;
            while len + 4 <= data.len() {
                let n = u32_le(&data[len..]) as usize;
                if n == 0 || len + n > data.len() {
                    break;
                }
                len += n;
                count += 1;
            }
            self.add_chunk(start, &data[..len])?;
        }
        if count > 0 {
            tracing::info!(
                from,
                end,
                records = count,
                "message index rebuilt for the end of the log"
            );
        }
        Ok(())
    }

    /// Starts loading the slots that the records of `chunk` will be linked
    /// into, without waiting for them. The writer calls it before the
    /// chunk's `pwrite`, so that the slots' cache misses (most of what an
    /// entry costs, see [`link`]) overlap the system call instead of
    /// following it. Skipped while the index is busy.
    pub fn prefetch(&self, chunk: &[u8]) {
        let Ok(state) = self.state.try_read() else {
            return;
        };
        let Some((f, slots)) = state
            .files
            .last()
            .and_then(|f| f.mem_slots.as_deref().map(|slots| (f, slots)))
        else {
            return;
        };
        for ix in records(chunk).filter_map(|(_, rec)| indexed(rec)) {
            for hash in ix.hashes(f.version) {
                if let Some(slot) = slots.get(slot_of(hash, f.slots) as usize) {
                    prefetch_line(slot);
                }
            }
        }
    }

    /// Indexes the whole records in `chunk`, written at log position `pos`:
    /// its entries join those gathered, written once there are 64 KiB of
    /// them (a file that fills up is written, sealed and a new one started).
    ///
    /// # Errors
    /// I/O errors.
    pub fn add_chunk(&self, pos: u64, chunk: &[u8]) -> io::Result<()> {
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        let State { files, scratch } = &mut *state;
        // The chunk's entries go into `scratch` first and are linked into
        // their slots' chains afterwards, all at once (see `link`).
        let mut linked = scratch.len();
        // One past the last whole record.
        let mut end = 0usize;
        for (at, rec) in records(chunk) {
            let len = rec.len();
            let rec_pos = pos + at as u64;
            end = at + len;
            let Some(ix) = indexed(rec) else {
                continue;
            };
            let needed = 1 + ix.keys().count() as u32;
            let unlinked = ((scratch.len() - linked) / ENTRY_LEN) as u32;
            let full = files
                .last()
                .is_none_or(|f| f.count + unlinked + needed > f.capacity);
            if full {
                link(files, scratch, linked);
                flush_scratch(files, scratch)?;
                self.roll(files, rec_pos)?;
                linked = 0;
            }
            let size = len as u32;
            let ts = ix.store_timestamp;
            // The file an entry goes to says how it is hashed.
            let version = files.last().map_or(VERSION, |f| f.version);
            for hash in ix.hashes(version) {
                push_entry(scratch, hash, rec_pos, ts, size);
            }
            // Also bounds what a re-index of a whole segment gathers.
            if scratch.len() >= WRITE_AT {
                link(files, scratch, linked);
                flush_scratch(files, scratch)?;
                linked = 0;
            }
        }
        link(files, scratch, linked);
        if let Some(f) = files.last_mut() {
            f.end = f.end.max(pos + end as u64);
        }
        Ok(())
    }

    /// Seals the file being filled (its slots written) and starts one at
    /// log position `start`.
    fn roll(&self, files: &mut Vec<IndexFile>, start: u64) -> io::Result<()> {
        if let Some(f) = files.last_mut() {
            if let Some(slots) = f.mem_slots.take() {
                let mut bytes = Vec::with_capacity(slots.len() * 4);
                for s in &slots {
                    bytes.extend_from_slice(&s.to_le_bytes());
                }
                if let Err(e) = f.file.write_all_at(&bytes, HEADER_LEN) {
                    f.mem_slots = Some(slots);
                    return Err(e);
                }
                f.end = f.end.max(start);
            }
        }
        // Sealed and durable only once `sync` says so in the header.
        files.push(IndexFile::create(&self.dir, start, self.config)?);
        Ok(())
    }

    /// Makes the entries added so far durable and says so in the headers
    /// (fdatasync, header, fdatasync); called with each checkpoint. Runs
    /// beside the writer: it holds the index's lock only to write the
    /// entries gathered so far and to read where the files stand.
    ///
    /// # Errors
    /// I/O errors.
    pub fn sync(&self) -> io::Result<()> {
        let (todo, filling): (Vec<ToSync>, _) = {
            let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
            let State { files, scratch } = &mut *state;
            flush_scratch(files, scratch)?;
            let filling = files.last().filter(|f| f.mem_slots.is_some()).map(|f| {
                let at = |count: u32| f.entries_at() + u64::from(count) * ENTRY_LEN as u64;
                (f.start, f.file.clone(), at(0), at(f.count), at(f.capacity))
            });
            let todo = files
                .iter()
                .filter(|f| {
                    !f.synced_sealed
                        && (f.count != f.synced_count
                            || f.end != f.synced_end
                            || f.mem_slots.is_none())
                })
                .map(|f| {
                    let sealed = f.mem_slots.is_none();
                    ToSync {
                        file: f.file.clone(),
                        count: f.count,
                        end: f.end,
                        sealed,
                        header: f.header(f.count, f.end, sealed),
                    }
                })
                .collect();
            (todo, filling)
        };
        if let Some((start, file, empty, written, full)) = filling {
            self.ahead
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .top_up(start, &file, empty, written, full);
        }
        if todo.is_empty() {
            return Ok(());
        }
        let mut done = Vec::with_capacity(todo.len());
        for t in todo {
            t.file.sync_data()?;
            t.file.write_all_at(&t.header, 0)?;
            t.file.sync_data()?;
            done.push((t.file, t.count, t.end, t.sealed));
        }
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        for (file, count, end, sealed) in done {
            if let Some(f) = state.files.iter_mut().find(|f| Arc::ptr_eq(&f.file, &file)) {
                f.synced_count = count;
                f.synced_end = end;
                f.synced_sealed = sealed;
            }
        }
        Ok(())
    }

    /// Retention: deletes the files whose records all lie below `log_min`
    /// (never the one being filled).
    ///
    /// # Errors
    /// I/O errors.
    pub fn trim_below(&self, log_min: u64) -> io::Result<usize> {
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        let mut removed = 0;
        while state.files.len() > 1 {
            // A file's records end where the next file's begin.
            let next_start = state.files[1].start;
            if next_start > log_min || !state.files[0].synced_sealed {
                break;
            }
            let f = state.files.remove(0);
            std::fs::remove_file(&f.path)?;
            removed += 1;
        }
        Ok(removed)
    }

    /// Where records of `hash` are, newest first, stored in `[since,
    /// until]`, until `keep` says stop; each position once.
    ///
    /// # Errors
    /// I/O errors.
    pub fn lookup(
        &self,
        hashes: Hashes,
        since: u64,
        until: u64,
        mut keep: impl FnMut(Hit) -> bool,
    ) -> io::Result<()> {
        let views: Vec<FileView> = {
            let state = self.state.read().unwrap_or_else(|e| e.into_inner());
            let last = state.files.len().saturating_sub(1);
            let gathered = |i: usize| {
                if i == last {
                    &state.scratch[..]
                } else {
                    &[][..]
                }
            };
            state
                .files
                .iter()
                .enumerate()
                .rev()
                .map(|(i, f)| f.view(hashes, gathered(i)))
                .collect()
        };
        let mut seen = HashSet::new();
        for v in views {
            let go_on = v.walk(since, until, |hit| {
                if !seen.insert(hit.pos) {
                    return true;
                }
                keep(hit)
            })?;
            if !go_on {
                break;
            }
        }
        Ok(())
    }

    /// How many index files there are (for tests and stats).
    pub fn file_count(&self) -> usize {
        self.state
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .files
            .len()
    }
}

/// A file whose durable state `sync` records: what it holds now, and the
/// header that says so.
struct ToSync {
    file: Arc<File>,
    count: u32,
    end: u64,
    sealed: bool,
    header: [u8; HEADER_LEN as usize],
}

/// Appends an entry to `scratch`, not linked yet: `link` fills in the
/// previous entry of its slot.
fn push_entry(scratch: &mut Vec<u8>, hash: u64, pos: u64, ts: u64, size: u32) {
    scratch.extend_from_slice(&hash.to_le_bytes());
    scratch.extend_from_slice(&pos.to_le_bytes());
    scratch.extend_from_slice(&ts.to_le_bytes());
    scratch.extend_from_slice(&0u32.to_le_bytes());
    scratch.extend_from_slice(&size.to_le_bytes());
}

/// Links the entries of `scratch` from byte `from` on, in order, into the
/// chains of the file being filled (each takes the next entry number and
/// becomes its slot's newest).
///
/// The slots are 512 KiB read at random, and under load most reads miss
/// the CPU's caches (`perf`: 97% of the time an entry took, with one entry
/// linked per record parsed). So the whole chunk's slots are read first,
/// in a loop of loads only, whose misses the CPU overlaps; the linking
/// loop then finds them cached.
fn link(files: &mut [IndexFile], scratch: &mut Vec<u8>, from: usize) {
    let Some((f, slots)) = files
        .last_mut()
        .and_then(|f| f.mem_slots.take().map(|slots| (f, slots)))
    else {
        // No file being filled (cannot happen once a file was created):
        // the entries are dropped, as the log is indexed again at start.
        scratch.truncate(from);
        return;
    };
    let mut slots = slots;
    let entries = &mut scratch[from..];
    let mut touched = 0u32;
    for e in entries.chunks_exact(ENTRY_LEN) {
        touched ^= slots[slot_of(u64_le(&e[0..8]), f.slots) as usize];
    }
    std::hint::black_box(touched);
    for e in entries.chunks_exact_mut(ENTRY_LEN) {
        let slot = slot_of(u64_le(&e[0..8]), f.slots) as usize;
        let ts = u64_le(&e[16..24]);
        f.count += 1;
        let prev = std::mem::replace(&mut slots[slot], f.count);
        e[24..28].copy_from_slice(&prev.to_le_bytes());
        f.min_ts = f.min_ts.min(ts);
        f.max_ts = f.max_ts.max(ts);
    }
    f.mem_slots = Some(slots);
}

/// Writes the entries gathered in `scratch` (the newest of the last file)
/// with one `pwrite`.
fn flush_scratch(files: &mut [IndexFile], scratch: &mut Vec<u8>) -> io::Result<()> {
    if scratch.is_empty() {
        return Ok(());
    }
    let Some(f) = files.last_mut() else {
        return Ok(());
    };
    let n = (scratch.len() / ENTRY_LEN) as u32;
    let first = f.count - n;
    let at = f.entries_at() + u64::from(first) * ENTRY_LEN as u64;
    let written = f.file.write_all_at(scratch, at);
    scratch.clear();
    if let Err(e) = written {
        // Not written: forget them (recovery indexes the log again from
        // the last durable point; until then these lookups miss).
        f.count = first;
        if let Some(slots) = f.mem_slots.as_mut() {
            // Rebuilding the slots costs a full read: rare enough.
            slots.iter_mut().for_each(|s| {
                if *s > first {
                    *s = 0;
                }
            });
        }
        return Err(e);
    }
    Ok(())
}
