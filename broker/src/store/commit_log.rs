//! The commit log: fixed-size segment files named by their start offset.
//!
//! Every record of every topic is appended here; it is the only source of
//! truth. Segments are created at their full size so that they can be
//! memory-mapped once and read without system calls: a read hands out a
//! `Bytes` slice of the mapping, and the mapping lives as long as any slice.
//! Writes go through `pwrite` by the single writer (see `writer.rs`), never
//! through the mapping, so a full disk is an error and not a `SIGBUS`.
//!
//! A new segment's blocks are allocated when it is created (`fallocate`),
//! not as the writer reaches them: in a sparse file the kernel allocates
//! blocks while it writes dirty pages back, holding locks the writer's next
//! `pwrite` waits for (milliseconds on a busy disk, seen in the end-to-end
//! p99.9). Where the file system cannot, on tmpfs, or where the disk has
//! little room, the segment stays sparse as before and a full disk shows on
//! the write. The part of the last segment a restart leaves unused is
//! released when recovery cuts the log there (see [`CommitLog::cut`]).
//!
//! How many bytes of records a closed segment holds is known exactly when
//! the writer closes it and when recovery reads it to its end or cuts it,
//! but the segment does not say (its rest is zeros). So that the store
//! size counts records only, the same after a restart, those ends are kept
//! in `commitlog.ends` beside the segments' folder:
//!
//! ```text
//! u32 magic "TXSE", u32 version (1), u32 count,
//! count x (u64 segment start, u64 bytes of records),
//! u32 CRC32C of everything before
//! ```
//!
//! It is a hint, written without an fsync: an entry is taken only when the
//! segment is there and nothing is written where it says the records end
//! (else, and without the file, the end is estimated as before).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;

/// One segment file and its read-only mapping.
#[derive(Debug)]
pub struct Segment {
    /// Log offset of its first byte.
    pub start: u64,
    /// Its path.
    pub path: PathBuf,
    /// The file, opened for reading and writing.
    pub file: Arc<File>,
    /// The whole file, mapped read-only.
    pub map: Bytes,
    /// The same mapping, for telling the kernel which pages are not needed.
    mapping: Arc<memmap2::Mmap>,
    /// Bytes of records it holds: exact once the writer has closed it, or
    /// recovery has read it to its end or cut it, or `commitlog.ends` says;
    /// estimated for another segment found on disk (see
    /// [`written_estimate`]), 0 for a new one. For the size limit, the
    /// store size reported and recovery's look back, not for reading.
    used: AtomicU64,
    /// `used` is exact.
    exact: AtomicBool,
}

impl Segment {
    /// Bytes of records it holds (see the field).
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }

    /// Its records end at log position `end`, exactly (the writer closed
    /// it there, or recovery read or cut it there).
    pub fn set_used_until(&self, end: u64) {
        self.used
            .store(end.saturating_sub(self.start), Ordering::Release);
        self.exact.store(true, Ordering::Release);
    }

    /// Whether [`Segment::used`] is exact (not estimated).
    pub fn used_is_exact(&self) -> bool {
        self.exact.load(Ordering::Acquire)
    }

    /// Whether its records may end `used` bytes from its start: no more
    /// than its blocks hold, and no record starts there.
    fn may_end_at(&self, used: u64) -> bool {
        let Ok(at) = usize::try_from(used) else {
            return false;
        };
        used <= self.used()
            && self
                .map
                .get(at..at.saturating_add(4))
                .is_none_or(|b| b == [0, 0, 0, 0])
    }

    /// Log offset one past its last byte.
    pub fn end(&self) -> u64 {
        self.start + self.map.len() as u64
    }

    /// Unmaps the pages readers touched from this process (they stay in the
    /// page cache), so that the broker's resident memory does not grow with
    /// the log; the next read of a page maps it again (a minor fault).
    ///
    /// # Errors
    /// The `madvise` error.
    #[allow(unsafe_code)]
    pub fn release_pages(&self) -> io::Result<()> {
        // SAFETY: a read-only shared file mapping: MADV_DONTNEED only drops
        // this process's page-table entries, and later accesses read the
        // same bytes from the file (mapped bytes never change, see
        // `map_file`), so every slice handed out stays valid and unchanged.
        unsafe {
            self.mapping
                .unchecked_advise(memmap2::UncheckedAdvice::DontNeed)
        }
    }

    /// [`Segment::release_pages`] for the bytes `[from, to)` of the segment
    /// only (a reader going through a segment once: recovery).
    ///
    /// # Errors
    /// The `madvise` error.
    #[allow(unsafe_code)]
    pub fn release_range(&self, from: usize, to: usize) -> io::Result<()> {
        let to = to.min(self.mapping.len());
        if from >= to {
            return Ok(());
        }
        // SAFETY: as in `release_pages`: dropping this process's mapping of
        // read-only file pages changes no byte a slice can see.
        unsafe {
            self.mapping
                .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, from, to - from)
        }
    }

    /// Starts writing the segment's dirty pages in `[from, to)` (offsets in
    /// the file) to disk and returns without waiting for them, as
    /// `sync_file_range(SYNC_FILE_RANGE_WRITE)` does: no durability by
    /// itself (no metadata, no cache flush), only less left for the next
    /// fdatasync to do at once (see the flusher's `write_back`).
    ///
    /// # Errors
    /// The system call's error.
    #[allow(unsafe_code)]
    pub fn start_writeback(&self, from: u64, to: u64) -> io::Result<()> {
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            if to <= from {
                return Ok(());
            }
            let (Ok(offset), Ok(len)) = (i64::try_from(from), i64::try_from(to - from)) else {
                return Ok(());
            };
            // SAFETY: a plain system call on a descriptor this segment owns.
            let r = unsafe {
                libc::sync_file_range(
                    self.file.as_raw_fd(),
                    offset,
                    len,
                    libc::SYNC_FILE_RANGE_WRITE,
                )
            };
            if r != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        #[cfg(not(target_os = "linux"))]
        let _ = (from, to);
        Ok(())
    }
}

/// Lends the mapping to `Bytes` while the segment keeps a handle too.
struct SharedMap(Arc<memmap2::Mmap>);

impl AsRef<[u8]> for SharedMap {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// The set of segments.
#[derive(Debug)]
pub struct CommitLog {
    dir: PathBuf,
    segment_size: u64,
    segments: RwLock<BTreeMap<u64, Arc<Segment>>>,
    min_offset: AtomicU64,
    /// Serialises writes of `commitlog.ends`.
    ends_lock: Mutex<()>,
}

const ENDS_MAGIC: u32 = u32::from_le_bytes(*b"TXSE");
const ENDS_VERSION: u32 = 1;

/// `commitlog.ends` (see the module's doc) for these (start, bytes) pairs.
fn encode_ends(ends: &[(u64, u64)]) -> Vec<u8> {
    let mut b = Vec::with_capacity(16 + ends.len() * 16);
    b.extend_from_slice(&ENDS_MAGIC.to_le_bytes());
    b.extend_from_slice(&ENDS_VERSION.to_le_bytes());
    b.extend_from_slice(&(ends.len() as u32).to_le_bytes());
    for (start, used) in ends {
        b.extend_from_slice(&start.to_le_bytes());
        b.extend_from_slice(&used.to_le_bytes());
    }
    let crc = crc32c::crc32c(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b
}

/// The (start, bytes) pairs of a `commitlog.ends`; `None` when it is
/// damaged or of another version.
fn decode_ends(data: &[u8]) -> Option<Vec<(u64, u64)>> {
    let (body, crc) = data.split_at(data.len().checked_sub(4)?);
    if crc32c::crc32c(body).to_le_bytes() != crc {
        return None;
    }
    let u32_at = |at: usize| Some(u32::from_le_bytes(body.get(at..at + 4)?.try_into().ok()?));
    let u64_at = |at: usize| Some(u64::from_le_bytes(body.get(at..at + 8)?.try_into().ok()?));
    if u32_at(0)? != ENDS_MAGIC || u32_at(4)? != ENDS_VERSION {
        return None;
    }
    let count = u32_at(8)? as usize;
    if body.len() != 12 + count.checked_mul(16)? {
        return None;
    }
    (0..count)
        .map(|i| Some((u64_at(12 + i * 16)?, u64_at(20 + i * 16)?)))
        .collect()
}

fn segment_name(start: u64) -> String {
    format!("{start:020}")
}

#[allow(unsafe_code)]
fn map_file(file: &File) -> io::Result<(Bytes, Arc<memmap2::Mmap>)> {
    // SAFETY: txmq never truncates a segment file while it is mapped (recovery
    // drops the mapping before cutting a torn tail), other processes must not
    // write to the data dir, and bytes are only appended past the readable end
    // by the single writer, so no mapped byte a reader can see changes.
    let map = Arc::new(unsafe { memmap2::Mmap::map(file)? });
    Ok((Bytes::from_owner(SharedMap(map.clone())), map))
}

fn open_segment(path: &Path, start: u64, segment_size: u64) -> io::Result<Segment> {
    let file = OpenOptions::new().read(true).write(true).open(path)?;
    if file.metadata()?.len() != segment_size {
        // A segment shorter than the configured size was cut (or copied
        // short); grow it with zeros, which read as "nothing written".
        file.set_len(segment_size)?;
    }
    let (map, mapping) = map_file(&file)?;
    let used = written_estimate(&file)?.min(segment_size);
    Ok(Segment {
        start,
        path: path.to_path_buf(),
        file: Arc::new(file),
        map,
        mapping,
        used: AtomicU64::new(used),
        exact: AtomicBool::new(false),
    })
}

/// Bytes written to a segment found on disk, estimated: records are
/// appended from its start, so the first hole (preallocated blocks never
/// written read as one) is about where they end; where the file system
/// reports no holes, the allocated blocks of a sparse file tell instead.
fn written_estimate(file: &File) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let allocated = file.metadata()?.blocks().saturating_mul(512);
    Ok(first_hole(file).map_or(allocated, |hole| hole.min(allocated)))
}

#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn first_hole(file: &File) -> Option<u64> {
    use std::os::fd::AsRawFd;
    // SAFETY: lseek on a descriptor this function borrows; it only moves
    // the file position, which txmq never uses (all I/O is positioned).
    let at = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_HOLE) };
    u64::try_from(at).ok()
}

#[cfg(not(target_os = "linux"))]
fn first_hole(_file: &File) -> Option<u64> {
    None
}

/// Reserves the blocks of bytes `from..len` of a segment file `len` bytes
/// long (see `reserve.rs`). Best effort: where the file system cannot,
/// the segment stays sparse; if the disk or a quota runs out meanwhile,
/// whatever was reserved is released again.
fn preallocate(file: &File, from: u64, len: u64) -> io::Result<()> {
    let Err(e) = super::reserve::reserve(file, from, len.saturating_sub(from), false) else {
        return Ok(());
    };
    tracing::debug!(error = %e, "commit-log segment not preallocated; it stays sparse");
    if super::no_space(&e) {
        // Part of the range may be reserved: cutting the file at `from`
        // and growing it again frees that part, and nothing before it.
        file.set_len(from)?;
        file.set_len(len)?;
    }
    Ok(())
}

/// Fsyncs a directory so that a file created or renamed in it survives a crash.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates `dir` and any missing parents, fsyncing the parent of each
/// directory it creates: a directory entry is durable only once its parent
/// is fsynced, and without it a power cut can take a whole queue's files.
///
/// # Errors
/// I/O errors.
pub fn create_dir_durable(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_dir_durable(parent)?;
    }
    match std::fs::create_dir(dir) {
        Ok(()) => {}
        // Made meanwhile by another thread, which may not have fsynced the
        // parent yet: do it here too, before anything is made inside.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => {}
        Err(e) => return Err(e),
    }
    match dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(parent) => sync_dir(parent),
        None => Ok(()),
    }
}

impl CommitLog {
    /// Opens the segments in `dir` (created if missing).
    ///
    /// # Errors
    /// I/O errors, or a segment larger than `segment_size` (the size cannot
    /// change once data is written).
    pub fn open(dir: &Path, segment_size: u64) -> io::Result<CommitLog> {
        create_dir_durable(dir)?;
        let mut segments = BTreeMap::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(start) = name.to_str().and_then(|n| n.parse::<u64>().ok()) else {
                continue;
            };
            let len = entry.metadata()?.len();
            if len > segment_size {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "segment {} is {len} bytes but the segment size is {segment_size}; start with the segment size the data was written with",
                        entry.path().display()
                    ),
                ));
            }
            segments.insert(
                start,
                Arc::new(open_segment(&entry.path(), start, segment_size)?),
            );
        }
        let log = CommitLog {
            dir: dir.to_path_buf(),
            segment_size,
            min_offset: AtomicU64::new(segments.keys().next().copied().unwrap_or(0)),
            segments: RwLock::new(segments),
            ends_lock: Mutex::new(()),
        };
        log.load_ends();
        Ok(log)
    }

    fn ends_path(&self) -> PathBuf {
        self.dir.with_extension("ends")
    }

    /// Takes the ends of `commitlog.ends` that the segments agree with
    /// (see the module's doc); a missing or damaged file changes nothing.
    fn load_ends(&self) {
        let ends = match std::fs::read(self.ends_path()) {
            // Empty: renamed over the old one, and a power cut took its
            // data (it is not fsynced).
            Ok(data) if data.is_empty() => Vec::new(),
            Ok(data) => decode_ends(&data).unwrap_or_else(|| {
                tracing::warn!(
                    path = %self.ends_path().display(),
                    "the segments' ends file is damaged; their ends are estimated"
                );
                Vec::new()
            }),
            Err(_) => Vec::new(),
        };
        let segs = self.read_lock();
        for (start, used) in ends {
            if let Some(seg) = segs.get(&start).filter(|s| s.may_end_at(used)) {
                seg.set_used_until(start + used);
            }
        }
    }

    /// Writes `commitlog.ends` with the exact ends of the segments but the
    /// last (the writer's): after the writer closed one, and after
    /// recovery read and cut the log. Not fsynced (a hint, see the
    /// module's doc).
    ///
    /// # Errors
    /// I/O errors (the file is then as before).
    pub fn save_ends(&self) -> io::Result<()> {
        // Taken first: the snapshot written last is the newest.
        let _one = self.ends_lock.lock().unwrap_or_else(|e| e.into_inner());
        let ends: Vec<(u64, u64)> = {
            let segs = self.read_lock();
            let last = segs.keys().next_back().copied();
            segs.values()
                .filter(|s| Some(s.start) != last && s.used_is_exact())
                .map(|s| (s.start, s.used()))
                .collect()
        };
        let path = self.ends_path();
        let tmp = path.with_extension("ends.tmp");
        std::fs::write(&tmp, encode_ends(&ends))?;
        std::fs::rename(&tmp, &path)
    }

    /// The configured segment size.
    pub fn segment_size(&self) -> u64 {
        self.segment_size
    }

    /// The segments, in order.
    pub fn segments(&self) -> Vec<Arc<Segment>> {
        self.read_lock().values().cloned().collect()
    }

    /// The last segment, if any.
    pub fn last_segment(&self) -> Option<Arc<Segment>> {
        self.read_lock().values().next_back().cloned()
    }

    /// Bytes of records in the log: every segment's (see [`Segment::used`]),
    /// the one holding `end`, the write position, counted up to it.
    pub fn used_bytes(&self, end: u64) -> u64 {
        self.read_lock()
            .values()
            .map(|s| {
                if (s.start..s.end()).contains(&end) {
                    end - s.start
                } else {
                    s.used()
                }
            })
            .sum()
    }

    /// Bytes of records between log positions `from` and `to` (the write
    /// position): what a replica at `from` has left to copy. The unused
    /// tail of a closed segment does not count (a restart after a crash
    /// starts a fresh segment: the positions up to it hold nothing).
    pub fn stored_between(&self, from: u64, to: u64) -> u64 {
        self.read_lock()
            .values()
            .map(|s| {
                let data_end = if (s.start..s.end()).contains(&to) {
                    to
                } else {
                    s.start + s.used()
                };
                data_end.min(to).saturating_sub(from.max(s.start))
            })
            .sum()
    }

    /// The segment holding `offset`.
    pub fn segment_for(&self, offset: u64) -> Option<Arc<Segment>> {
        let segs = self.read_lock();
        let (_, seg) = segs.range(..=offset).next_back()?;
        (offset < seg.end()).then(|| seg.clone())
    }

    /// `size` bytes at log `offset`, without copying.
    pub fn read(&self, offset: u64, size: usize) -> Option<Bytes> {
        let seg = self.segment_for(offset)?;
        let rel = (offset - seg.start) as usize;
        let end = rel.checked_add(size)?;
        (end <= seg.map.len()).then(|| seg.map.slice(rel..end))
    }

    /// Creates the segment starting at `start`, fsyncing it and the directory.
    ///
    /// # Errors
    /// I/O errors (a full disk among them).
    pub fn create_segment(&self, start: u64) -> io::Result<Arc<Segment>> {
        let path = self.dir.join(segment_name(start));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        // Only a new file is reserved (a failed create may have left one);
        // a release after a full disk cuts it.
        let new = file.metadata()?.len() == 0;
        file.set_len(self.segment_size)?;
        if new {
            preallocate(&file, 0, self.segment_size)?;
        }
        file.sync_all()?;
        sync_dir(&self.dir)?;
        drop(file);
        let seg = Arc::new(open_segment(&path, start, self.segment_size)?);
        self.write_lock().insert(start, seg.clone());
        Ok(seg)
    }

    /// Cuts the log at `pos`: zeroes the rest of its segment (releasing its
    /// blocks unless writes go on in it) and deletes every
    /// later segment that starts before `until` (the segment recovery opened
    /// for new writes starts there and stays). Only for recovery, before any
    /// reader exists.
    ///
    /// # Errors
    /// I/O errors.
    pub fn cut(&self, pos: u64, until: u64) -> io::Result<()> {
        let mut segs = self.write_lock();
        let later: Vec<u64> = segs.range(pos..until).map(|(s, _)| *s).collect();
        for start in later {
            if let Some(seg) = segs.remove(&start) {
                std::fs::remove_file(&seg.path)?;
            }
        }
        // The segment's end, kept before it is cut: after a crash in
        // between, the records past it show the entry wrong, and it is not
        // taken.
        if let Some((_, seg)) = segs.range(..pos).next_back().filter(|(_, s)| pos < s.end()) {
            seg.set_used_until(pos);
        }
        drop(segs);
        if let Err(e) = self.save_ends() {
            tracing::debug!(error = %e, "cannot write the segments' ends");
        }
        let mut segs = self.write_lock();
        if let Some((&start, _)) = segs.range(..pos).next_back() {
            let seg = segs
                .remove(&start)
                .ok_or_else(|| io::Error::other("segment vanished"))?;
            let path = seg.path.clone();
            let file = seg.file.clone();
            let exact = seg.used_is_exact().then(|| seg.used());
            drop(seg); // drop the mapping before shrinking the file
            file.set_len(pos - start)?;
            file.set_len(self.segment_size)?;
            if segs.range(pos..).next().is_none() {
                // Writes go on in this segment (a replica's): its rest is
                // reserved again, as in a new one.
                preallocate(&file, pos - start, self.segment_size)?;
            }
            file.sync_all()?;
            drop(file);
            let seg = open_segment(&path, start, self.segment_size)?;
            // Its records end at `pos` exactly: the estimate of a segment
            // found on disk would count the rest of the block `pos` is in
            // (the store size grew by it at every restart). A cut at its
            // very end (the next segment held nothing) leaves what the
            // replay found: its records may end before.
            if pos < seg.end() {
                seg.set_used_until(pos);
            } else if let Some(used) = exact {
                seg.set_used_until(start + used);
            }
            segs.insert(start, Arc::new(seg));
        }
        sync_dir(&self.dir)?;
        let min = segs.keys().next().copied().unwrap_or(pos);
        self.min_offset.store(min, Ordering::Release);
        Ok(())
    }

    /// Deletes the segment starting at `start` (retention). Readers holding
    /// slices of it keep their bytes.
    ///
    /// # Errors
    /// I/O errors.
    pub fn remove_segment(&self, start: u64) -> io::Result<()> {
        let removed = self.write_lock().remove(&start);
        if let Some(seg) = removed {
            std::fs::remove_file(&seg.path)?;
        }
        let min = self.read_lock().keys().next().copied().unwrap_or(start);
        self.min_offset.store(min, Ordering::Release);
        Ok(())
    }

    /// The smallest log offset still stored.
    pub fn min_offset(&self) -> u64 {
        self.min_offset.load(Ordering::Acquire)
    }

    fn read_lock(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<u64, Arc<Segment>>> {
        self.segments.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_lock(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<u64, Arc<Segment>>> {
        self.segments.write().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{FileExt, MetadataExt};

    use super::*;

    const SEGMENT: u64 = 8 << 20;

    fn allocated(seg: &Segment) -> u64 {
        seg.file.metadata().unwrap().blocks() * 512
    }

    /// Whether the file system under `dir` allocates blocks on request (the
    /// tests below say what they skip where it does not).
    fn preallocates(dir: &Path) -> bool {
        let probe = File::create(dir.join("probe")).unwrap();
        probe.set_len(1 << 20).unwrap();
        preallocate(&probe, 0, 1 << 20).unwrap();
        let yes = probe.metadata().unwrap().blocks() * 512 >= 1 << 20;
        std::fs::remove_file(dir.join("probe")).unwrap();
        yes
    }

    /// A log in a temporary directory with its first segment just created
    /// and checked to be preallocated and empty; then 100,000 bytes are
    /// written at its start. `None` where the file system cannot preallocate.
    fn log_with_a_written_segment() -> Option<(tempfile::TempDir, CommitLog, Arc<Segment>)> {
        let dir = tempfile::tempdir().unwrap();
        if !preallocates(dir.path()) {
            eprintln!("skipped: this file system does not preallocate");
            return None;
        }
        let log = CommitLog::open(&dir.path().join("log"), SEGMENT).unwrap();
        let seg = log.create_segment(0).unwrap();
        assert!(allocated(&seg) >= SEGMENT, "{} allocated", allocated(&seg));
        assert_eq!(seg.used(), 0);
        // Not read through the mapping: pages read into the cache (zeros)
        // would count as written for the estimate of a segment on disk.
        seg.file.write_all_at(&[7u8; 100_000], 0).unwrap();
        Some((dir, log, seg))
    }

    /// What a replica lacks is records, not positions: after a crash the
    /// master writes on in a fresh segment, and a replica at the end of the
    /// old one lacks nothing (it showed a lag of a whole segment).
    #[test]
    fn the_bytes_between_two_positions_leave_out_a_closed_segments_unused_tail() {
        let dir = tempfile::tempdir().unwrap();
        let log = CommitLog::open(&dir.path().join("log"), SEGMENT).unwrap();
        log.create_segment(0).unwrap().set_used_until(5_000);
        log.create_segment(SEGMENT).unwrap();
        assert_eq!(log.stored_between(5_000, SEGMENT), 0);
        assert_eq!(log.stored_between(1_000, SEGMENT), 4_000);
        assert_eq!(log.stored_between(1_000, SEGMENT + 300), 4_300);
        assert_eq!(log.stored_between(SEGMENT + 100, SEGMENT + 300), 200);
        assert_eq!(
            log.stored_between(3_000, 4_000),
            1_000,
            "within one segment"
        );
    }

    /// A cut segment holds exactly the records before the cut, not the
    /// rest of the block the cut is in (the store size grew by it at
    /// every restart: 77974 bytes became 81920).
    #[test]
    fn a_cut_segment_counts_its_records_to_the_byte() {
        let dir = tempfile::tempdir().unwrap();
        let log = CommitLog::open(&dir.path().join("log"), SEGMENT).unwrap();
        let seg = log.create_segment(0).unwrap();
        seg.file.write_all_at(&[7u8; 100_000], 0).unwrap();
        drop(seg);
        log.cut(77_974, SEGMENT).unwrap();
        assert_eq!(log.last_segment().unwrap().used(), 77_974);
        assert_eq!(log.used_bytes(SEGMENT), 77_974);
        assert_eq!(log.stored_between(0, SEGMENT), 77_974);
    }

    /// A closed segment's exact end is kept for the next open (its rest
    /// of the block counted otherwise); an entry the segment contradicts
    /// (records past it), a damaged file or none leave the estimate.
    #[test]
    fn closed_segments_keep_their_exact_end_across_an_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let log = CommitLog::open(&path, SEGMENT).unwrap();
        let seg = log.create_segment(0).unwrap();
        seg.file.write_all_at(&[7u8; 100_000], 0).unwrap();
        seg.set_used_until(100_000);
        drop(seg);
        log.create_segment(SEGMENT).unwrap();
        log.save_ends().unwrap();
        drop(log);
        let log = CommitLog::open(&path, SEGMENT).unwrap();
        let first = &log.segments()[0];
        assert!(first.used_is_exact());
        assert_eq!(first.used(), 100_000);
        assert!(
            !log.segments()[1].used_is_exact(),
            "the last one is the writer's"
        );
        drop(log);

        let ends = path.with_extension("ends");
        for wrong in [
            encode_ends(&[(0, 60_000)]),
            encode_ends(&[(0, SEGMENT + 1)]),
            b"damaged".to_vec(),
        ] {
            std::fs::write(&ends, &wrong).unwrap();
            let log = CommitLog::open(&path, SEGMENT).unwrap();
            let first = &log.segments()[0];
            assert!(!first.used_is_exact(), "{wrong:?}");
            assert!(first.used() >= 100_000);
        }
        let mut flipped = encode_ends(&[(0, 100_000)]);
        flipped[14] ^= 1;
        assert_eq!(decode_ends(&flipped), None);
        assert_eq!(
            decode_ends(&encode_ends(&[(0, 5), (SEGMENT, 7)])),
            Some(vec![(0, 5), (SEGMENT, 7)])
        );
    }

    #[test]
    fn a_new_segment_has_its_blocks_and_counts_as_empty_until_written() {
        let Some((dir, log, seg)) = log_with_a_written_segment() else {
            return;
        };
        drop((seg, log));

        // Found on disk, its records are estimated by where they end, not
        // by its blocks: the size limit and recovery's look back use this.
        let log = CommitLog::open(&dir.path().join("log"), SEGMENT).unwrap();
        let seg = log.last_segment().unwrap();
        assert!(
            (100_000..=1 << 20).contains(&seg.used()),
            "estimated {} bytes written",
            seg.used()
        );
    }

    #[test]
    fn a_cut_releases_the_unwritten_rest_of_a_preallocated_segment() {
        let Some((_dir, log, seg)) = log_with_a_written_segment() else {
            return;
        };
        drop(seg);
        log.create_segment(SEGMENT).unwrap();
        log.cut(100_000, SEGMENT).unwrap();
        let seg = log.segment_for(0).unwrap();
        assert!(allocated(&seg) < 1 << 20, "{} allocated", allocated(&seg));
        assert_eq!(seg.map.len() as u64, SEGMENT);
        assert!(seg.map[..100_000].iter().all(|b| *b == 7));
        assert!(seg.map[100_000..].iter().all(|b| *b == 0));
    }

    #[test]
    fn a_cut_of_the_last_segment_keeps_its_rest_reserved() {
        // A replica's recovery: writes go on in the cut segment.
        let Some((_dir, log, seg)) = log_with_a_written_segment() else {
            return;
        };
        drop(seg);
        log.cut(100_000, u64::MAX).unwrap();
        let seg = log.segment_for(0).unwrap();
        assert!(
            allocated(&seg) >= SEGMENT - (1 << 20),
            "{}",
            allocated(&seg)
        );
        assert!(seg.map[..100_000].iter().all(|b| *b == 7));
        assert!(seg.map[100_000..].iter().all(|b| *b == 0));
    }
}
