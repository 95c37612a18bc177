//! Consume queues: per (topic, queue), files of fixed-size entries that
//! consumers read by queue offset.
//!
//! An entry is 20 bytes: commit-log offset (u64), record size (u32) and tag
//! hash (u64), little-endian. Files hold `entries_per_file` entries and are
//! named by the queue offset of their first entry. They are derived from the
//! commit log and rebuilt from it after a crash (see `recovery.rs`).
//!
//! New entries are not written to their file one batch at a time: they
//! gather in memory (readers read them there) and are written with one
//! `pwrite` once [`WRITE_AT`] bytes are waiting, or by the checkpoint before
//! it fsyncs the queue. So a message costs its commit-log write and no
//! second system call. A crash loses nothing this way: the checkpoint
//! names, per queue, the entries its fsync covered, and recovery rebuilds
//! every entry after those from the log. The checkpoint also reserves the
//! blocks a little ahead of the appends (see `reserve.rs`), and makes a
//! queue's next file before the writer needs it.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use tokio::sync::futures::Notified;
use tokio::sync::Notify;

use super::reserve::Ahead;

/// Bytes per entry.
pub const ENTRY_LEN: usize = 20;

/// Entries waiting in memory are written to their file once this many bytes
/// (204 entries, about a page) are waiting.
const WRITE_AT: usize = 4096 / ENTRY_LEN * ENTRY_LEN;

/// One consume-queue entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// Where the record starts in the commit log.
    pub log_offset: u64,
    /// The record's length.
    pub size: u32,
    /// Hash of the message's tag (`txmq_protocol::tag_hash`).
    pub tag_hash: u64,
}

impl Entry {
    /// Writes the entry's 20 bytes into `out`.
    pub fn encode(&self, out: &mut [u8]) {
        out[..8].copy_from_slice(&self.log_offset.to_le_bytes());
        out[8..12].copy_from_slice(&self.size.to_le_bytes());
        out[12..20].copy_from_slice(&self.tag_hash.to_le_bytes());
    }

    fn decode(b: &[u8]) -> Entry {
        let mut o = [0u8; 8];
        o.copy_from_slice(&b[..8]);
        let mut s = [0u8; 4];
        s.copy_from_slice(&b[8..12]);
        let mut t = [0u8; 8];
        t.copy_from_slice(&b[12..20]);
        Entry {
            log_offset: u64::from_le_bytes(o),
            size: u32::from_le_bytes(s),
            tag_hash: u64::from_le_bytes(t),
        }
    }
}

/// One queue of one topic.
#[derive(Debug)]
pub struct ConsumeQueue {
    /// Topic name.
    pub topic: String,
    /// Queue id.
    pub queue: u32,
    dir: PathBuf,
    entries_per_file: u64,
    files: RwLock<BTreeMap<u64, Arc<File>>>,
    /// One past the last offset consumers may read (durable under sync flush).
    visible: AtomicU64,
    /// The smallest offset still readable.
    min: AtomicU64,
    /// One past the last entry written; only the writer advances it.
    next: AtomicU64,
    /// One past the last entry whose record lies below the writer's
    /// position: set with the position, under the same lock, so that a
    /// checkpoint takes both together (see `Checkpoint::queues`).
    logged: AtomicU64,
    /// Starts of the files written since the last checkpoint.
    dirty: std::sync::Mutex<std::collections::BTreeSet<u64>>,
    /// Entries not written to their file yet.
    unwritten: std::sync::Mutex<Unwritten>,
    /// The queue's topic was deleted: nothing is written any more.
    discarded: AtomicBool,
    /// Writing out waiting entries failed (a full disk) and has not
    /// succeeded since: logged once each way.
    write_failing: AtomicBool,
    /// Blocks reserved ahead of the appends (only the checkpoint takes it).
    ahead: std::sync::Mutex<Ahead>,
    /// The next file (its start), made ahead by the checkpoint; the writer
    /// takes it when it gets there (see `prepare_next`).
    spare: std::sync::Mutex<Option<(u64, Arc<File>)>>,
    /// Woken whenever `visible` grows while a long poll waits on it (see
    /// [`ConsumeQueue::arrival`]).
    arrived: Notify,
    /// The long polls holding an [`Interest`].
    interested: AtomicUsize,
    /// Which queue object this is in the broker's run (see
    /// [`ConsumeQueue::incarnation`]).
    incarnation: u64,
}

/// The incarnation of the next queue opened in this process.
static NEXT_INCARNATION: AtomicU64 = AtomicU64::new(1);

/// A long poll's interest in a queue's growth (see [`ConsumeQueue::arrival`]).
#[must_use = "a publish wakes only the polls that hold an interest"]
pub struct Interest<'a>(&'a AtomicUsize);

impl Drop for Interest<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl ConsumeQueue {
    /// Opens (or prepares) the queue's files under `dir`.
    ///
    /// # Errors
    /// I/O errors.
    pub fn open(
        topic: &str,
        queue: u32,
        dir: PathBuf,
        entries_per_file: u64,
    ) -> io::Result<ConsumeQueue> {
        let mut files = BTreeMap::new();
        if dir.exists() {
            for entry in std::fs::read_dir(&dir)? {
                let entry = entry?;
                if let Some(start) = entry
                    .file_name()
                    .to_str()
                    .and_then(|n| n.parse::<u64>().ok())
                {
                    let f = OpenOptions::new()
                        .read(true)
                        .write(true)
                        .open(entry.path())?;
                    files.insert(start, Arc::new(f));
                }
            }
        }
        let min = files.keys().next().copied().unwrap_or(0);
        Ok(ConsumeQueue {
            topic: topic.to_string(),
            queue,
            dir,
            entries_per_file,
            files: RwLock::new(files),
            visible: AtomicU64::new(min),
            min: AtomicU64::new(min),
            next: AtomicU64::new(min),
            logged: AtomicU64::new(min),
            dirty: std::sync::Mutex::new(std::collections::BTreeSet::new()),
            unwritten: std::sync::Mutex::new(Unwritten::default()),
            discarded: AtomicBool::new(false),
            write_failing: AtomicBool::new(false),
            ahead: std::sync::Mutex::new(Ahead::default()),
            spare: std::sync::Mutex::new(None),
            arrived: Notify::new(),
            interested: AtomicUsize::new(0),
            incarnation: NEXT_INCARNATION.fetch_add(1, Ordering::Relaxed),
        })
    }

    /// One past the last offset consumers may read.
    pub fn max_offset(&self) -> u64 {
        self.visible.load(Ordering::Acquire)
    }

    /// The smallest offset still readable.
    pub fn min_offset(&self) -> u64 {
        self.min.load(Ordering::Acquire).min(self.max_offset())
    }

    /// The offset the next written entry gets (the writer).
    pub fn next_offset(&self) -> u64 {
        self.next.load(Ordering::Acquire)
    }

    /// One past the last entry justified by a record below the writer's
    /// position (read with that position, under the writer's lock).
    pub fn logged(&self) -> u64 {
        self.logged.load(Ordering::Acquire)
    }

    /// The writer: entries below `next` are justified by written records.
    pub(crate) fn set_logged(&self, next: u64) {
        self.logged.fetch_max(next, Ordering::AcqRel);
    }

    /// Recovery, before the replay: drops every entry from `next` on. A
    /// checkpoint's count of justified entries cuts entries a crash left
    /// without their record (a delivered delayed message whose move marker
    /// was lost would otherwise be delivered again); the replay writes the
    /// justified ones back.
    ///
    /// # Errors
    /// I/O errors.
    pub fn truncate(&self, next: u64) -> io::Result<()> {
        // A checkpoint older than retention's trimming: nothing below the
        // queue's minimum is kept anyway.
        let next = next.max(self.min.load(Ordering::Acquire));
        let _unwritten = self.written_out()?;
        let mut files = self.files.write().unwrap_or_else(|e| e.into_inner());
        let starts: Vec<u64> = files.keys().rev().copied().collect();
        for start in starts {
            let Some(file) = files.get(&start).cloned() else {
                continue;
            };
            if start >= next && start > 0 && files.len() > 1 {
                files.remove(&start);
                std::fs::remove_file(self.dir.join(format!("{start:020}")))?;
                continue;
            }
            let keep = next.saturating_sub(start).min(self.entries_per_file) * ENTRY_LEN as u64;
            if file.metadata()?.len() > keep {
                file.set_len(keep)?;
                self.dirty
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(start);
            }
            break;
        }
        drop(files);
        self.next.fetch_min(next, Ordering::AcqRel);
        Ok(())
    }

    /// Makes offsets below `max` readable and wakes long polls.
    pub fn publish(&self, max: u64) {
        if self.visible.fetch_max(max, Ordering::AcqRel) < max {
            // Pairs with the fence in `arrival`: either this sees the
            // poll's interest, or the poll's look sees the new `visible`.
            std::sync::atomic::fence(Ordering::SeqCst);
            // Nobody waiting (as for most writes), `notify_waiters` would
            // still take the Notify's lock.
            if self.interested.load(Ordering::Relaxed) > 0 {
                self.arrived.notify_waiters();
            }
        }
    }

    /// What a long poll waits on for the queue to grow: taken before it
    /// looks at the queue, so that a publish after the look wakes it. The
    /// `Notified` ends at the first publish after this call; the
    /// [`Interest`] must be held until the poll is done waiting on it (a
    /// publish wakes nobody while no poll holds one).
    pub fn arrival(&self) -> (Interest<'_>, Notified<'_>) {
        self.interested.fetch_add(1, Ordering::Relaxed);
        std::sync::atomic::fence(Ordering::SeqCst);
        (Interest(&self.interested), self.arrived.notified())
    }

    /// Wakes the long polls waiting on the queue, to look at it again
    /// though it did not grow: a pop group's message in flight was made
    /// due sooner (its invisible time shortened), and a poll sleeps only
    /// until the deadline it saw when it looked.
    pub fn wake_polls(&self) {
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.interested.load(Ordering::Relaxed) > 0 {
            self.arrived.notify_waiters();
        }
    }

    /// Adds `entries` (encoded, `ENTRY_LEN` each) at `first_offset`, which
    /// must be [`ConsumeQueue::next_offset`] (or an offset being rebuilt).
    /// They are readable at once and written to their file later (see the
    /// module's documentation).
    ///
    /// # Errors
    /// I/O errors of writing out a run waiting at another offset, or of
    /// writing entries not at the end (which are not kept waiting). Entries
    /// at the end whose run cannot be written out (a full disk) stay
    /// readable and waiting, and are written with the next run or
    /// checkpoint: that is logged, not returned, since the commit log
    /// holds their records and recovery rebuilds them from it.
    pub fn write(&self, first_offset: u64, entries: &[u8]) -> io::Result<()> {
        let mut u = self.unwritten.lock().unwrap_or_else(|e| e.into_inner());
        // Only a run of entries waits: another offset writes out the run first.
        if !u.bytes.is_empty() && u.end() != first_offset {
            self.write_run(&mut u)?;
        }
        // Entries not at the end (a replica's queue that skips an offset,
        // a rebuild) are written at once, as they always were: the files
        // then hold everything below the waiting run, holes included.
        let at_end = first_offset == self.next.load(Ordering::Acquire);
        if u.bytes.is_empty() {
            u.first = first_offset;
        }
        u.bytes.extend_from_slice(entries);
        self.next.fetch_max(u.end(), Ordering::AcqRel);
        if !at_end {
            if let Err(e) = self.write_run(&mut u) {
                // Recovery replays from the checkpoint's offsets, within
                // what the files hold: on a full disk that run waits too.
                if !(super::no_space(&e) && first_offset <= self.files_end()?) {
                    return Err(e);
                }
                self.waiting(&e);
            }
        } else if u.bytes.len() >= WRITE_AT {
            if let Err(e) = self.write_run(&mut u) {
                self.waiting(&e);
            }
        }
        Ok(())
    }

    /// Logs (once, until they are written again) that entries wait in
    /// memory because writing them failed with `e`.
    fn waiting(&self, e: &io::Error) {
        if !self.write_failing.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                topic = %self.topic,
                queue = self.queue,
                error = %e,
                "cannot write consume-queue entries; they wait in memory, readable, until there is room"
            );
        }
    }

    /// One past the last entry the files hold (the queue's minimum when
    /// they hold none); files made ahead, still empty, hold none.
    fn files_end(&self) -> io::Result<u64> {
        let files = self.files.read().unwrap_or_else(|e| e.into_inner());
        for (start, file) in files.iter().rev() {
            let len = file.metadata()?.len() / ENTRY_LEN as u64;
            if len > 0 {
                return Ok(start + len);
            }
        }
        Ok(self.min.load(Ordering::Acquire))
    }

    /// Writes the entries waiting in memory to their files; returns with
    /// the lock that keeps new ones waiting until it is dropped, so that
    /// the files hold every entry below `next` meanwhile.
    ///
    /// # Errors
    /// I/O errors; the entries stay waiting.
    fn written_out(&self) -> io::Result<std::sync::MutexGuard<'_, Unwritten>> {
        let mut u = self.unwritten.lock().unwrap_or_else(|e| e.into_inner());
        self.write_run(&mut u)?;
        Ok(u)
    }

    /// [`ConsumeQueue::written_out`], except that on a full disk (no space,
    /// or the quota) the run stays waiting in memory, readable: with the
    /// lock, the first offset of the run still waiting (`None`: none), below
    /// which the files hold every entry. Recovery and retention go on with
    /// it, so that a broker restarted on a full disk starts.
    fn written_out_or_waiting(
        &self,
    ) -> io::Result<(std::sync::MutexGuard<'_, Unwritten>, Option<u64>)> {
        let mut u = self.unwritten.lock().unwrap_or_else(|e| e.into_inner());
        match self.write_run(&mut u) {
            Ok(()) => Ok((u, None)),
            Err(e) if super::no_space(&e) => {
                self.waiting(&e);
                let first = u.first;
                Ok((u, Some(first)))
            }
            Err(e) => Err(e),
        }
    }

    /// The topic was deleted: drops the waiting entries and writes nothing
    /// from now on, so that no file (or directory) of it comes back.
    pub fn discard(&self) {
        let mut u = self.unwritten.lock().unwrap_or_else(|e| e.into_inner());
        self.discarded.store(true, Ordering::Release);
        *u = Unwritten::default();
        // Taken after a `prepare_next` under way: its file, made by then,
        // goes with the topic's directory.
        *self.spare.lock().unwrap_or_else(|e| e.into_inner()) = None;
        drop(u);
        // Long polls on it end now: a topic made again under the name has
        // other queues.
        self.arrived.notify_waiters();
    }

    /// Whether the queue's topic was deleted.
    pub fn is_discarded(&self) -> bool {
        self.discarded.load(Ordering::Acquire)
    }

    /// A number no other queue object of this process has: a queue of a
    /// topic deleted and made again under the same name (offsets from 0
    /// again) has another one, so a reader's position in the old one is
    /// told apart from one in the new.
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// Writes `u`'s run of entries to their files, under its lock: a reader
    /// finds each entry either in memory or in its file.
    fn write_run(&self, u: &mut Unwritten) -> io::Result<()> {
        if self.discarded.load(Ordering::Acquire) {
            u.bytes.clear();
            return Ok(());
        }
        let mut offset = u.first;
        let mut rest = &u.bytes[..];
        while !rest.is_empty() {
            let start = offset - offset % self.entries_per_file;
            let room = (start + self.entries_per_file - offset) as usize * ENTRY_LEN;
            let (now, later) = rest.split_at(room.min(rest.len()));
            let file = self.file_for(start)?;
            file.write_all_at(now, (offset - start) * ENTRY_LEN as u64)?;
            self.dirty
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(start);
            offset += (now.len() / ENTRY_LEN) as u64;
            rest = later;
        }
        u.first = offset;
        u.bytes.clear();
        if self.write_failing.swap(false, Ordering::Relaxed) {
            tracing::info!(topic = %self.topic, queue = self.queue, "consume-queue entries written again");
        }
        if u.bytes.capacity() > 2 * WRITE_AT {
            // Recovery writes whole batches at once: keep no more than a
            // page's worth of room per queue.
            u.bytes = Vec::new();
        }
        Ok(())
    }

    fn file_for(&self, start: u64) -> io::Result<Arc<File>> {
        if let Some(f) = self
            .files
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&start)
        {
            return Ok(f.clone());
        }
        {
            let mut spare = self.spare.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((_, f)) = spare.take_if(|(s, _)| *s == start) {
                self.files
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(start, f.clone());
                return Ok(f);
            }
        }
        super::commit_log::create_dir_durable(&self.dir)?;
        let path = self.dir.join(format!("{start:020}"));
        let f = Arc::new(
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)?,
        );
        super::commit_log::sync_dir(&self.dir)?;
        self.files
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(start, f.clone());
        Ok(f)
    }

    /// Reads up to `max` entries from `offset`, stopping at the readable end.
    ///
    /// # Errors
    /// I/O errors.
    pub fn read(&self, offset: u64, max: usize) -> io::Result<Vec<Entry>> {
        self.read_until(offset, max, self.max_offset())
    }

    /// Reads up to `max` entries from `offset`, stopping at the written end,
    /// which under sync flush may be past the readable end (entries whose
    /// records await their fdatasync).
    ///
    /// # Errors
    /// I/O errors.
    pub fn read_written(&self, offset: u64, max: usize) -> io::Result<Vec<Entry>> {
        self.read_until(offset, max, self.next_offset())
    }

    fn read_until(&self, offset: u64, max: usize, limit: u64) -> io::Result<Vec<Entry>> {
        let end = limit.min(offset.saturating_add(max as u64));
        if end <= offset {
            return Ok(Vec::new());
        }
        let mut out = Vec::with_capacity((end - offset) as usize);
        // The entries still in memory are taken first: those below them
        // are in their files by then, and stay there.
        let (file_end, waiting) = {
            let u = self.unwritten.lock().unwrap_or_else(|e| e.into_inner());
            if u.bytes.is_empty() || end <= u.first || offset >= u.end() {
                (end, None)
            } else {
                let from = offset.max(u.first);
                let to = end.min(u.end());
                let bytes = &u.bytes[(from - u.first) as usize * ENTRY_LEN..]
                    [..(to - from) as usize * ENTRY_LEN];
                let entries = bytes.chunks_exact(ENTRY_LEN).map(Entry::decode);
                if offset >= u.first {
                    // All of it in memory (a consumer at the queue's end).
                    out.extend(entries);
                    return Ok(out);
                }
                (u.first, Some(entries.collect::<Vec<_>>()))
            }
        };
        let mut buf = [0u8; ENTRY_LEN * 64];
        let mut at = offset;
        while at < file_end {
            let start = at - at % self.entries_per_file;
            let Some(file) = self
                .files
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .get(&start)
                .cloned()
            else {
                return Ok(out);
            };
            let n = ((file_end - at).min(start + self.entries_per_file - at) as usize).min(64);
            let bytes = &mut buf[..n * ENTRY_LEN];
            match file.read_exact_at(bytes, (at - start) * ENTRY_LEN as u64) {
                Ok(()) => {}
                // A file cut short (a crash mid-rebuild): what is missing is
                // not readable; the consumer waits as at the end.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(out),
                Err(e) => return Err(e),
            }
            out.extend(bytes.chunks_exact(ENTRY_LEN).map(Entry::decode));
            at += n as u64;
        }
        out.extend(waiting.into_iter().flatten());
        Ok(out)
    }

    /// Writes out the entries waiting in memory and fsyncs the files
    /// written since the last call.
    ///
    /// # Errors
    /// I/O errors.
    pub fn sync_if_dirty(&self) -> io::Result<()> {
        {
            let mut u = self.unwritten.lock().unwrap_or_else(|e| e.into_inner());
            self.write_run(&mut u)?;
            // An idle queue keeps no buffer; a busy one grows it again.
            u.bytes = Vec::new();
        }
        let dirty = std::mem::take(&mut *self.dirty.lock().unwrap_or_else(|e| e.into_inner()));
        if dirty.is_empty() {
            return Ok(());
        }
        self.reserve_ahead();
        let files: Vec<(u64, Arc<File>)> = {
            let files = self.files.read().unwrap_or_else(|e| e.into_inner());
            dirty
                .iter()
                .filter_map(|s| files.get(s).map(|f| (*s, f.clone())))
                .collect()
        };
        for (i, (_, f)) in files.iter().enumerate() {
            if let Err(e) = f.sync_data() {
                // This file and those not synced yet stay dirty: the next
                // checkpoint tries them again.
                self.dirty
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend(files[i..].iter().map(|(start, _)| *start));
                return Err(e);
            }
        }
        Ok(())
    }

    /// Reserves blocks ahead of the appends to the file being filled (see
    /// `reserve.rs`), so that they do not wait for the file system to
    /// allocate them while it writes the file back. The file's length stays.
    fn reserve_ahead(&self) {
        if self.discarded.load(Ordering::Acquire) {
            return;
        }
        let next = self.next_offset();
        let start = next - next % self.entries_per_file;
        let file = self
            .files
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&start)
            .cloned();
        let Some(file) = file else {
            return;
        };
        let filling = self.ahead.lock().unwrap_or_else(|e| e.into_inner()).top_up(
            start,
            &file,
            0,
            (next - start) * ENTRY_LEN as u64,
            self.entries_per_file * ENTRY_LEN as u64,
        );
        if let Some(first) = filling {
            self.prepare_next(start + self.entries_per_file, first);
        }
    }

    /// Makes the queue's next file, starting at `start`, with its first
    /// `first` bytes reserved, before the writer needs it: making a file
    /// fsyncs the directory, which took up to 25 ms under load here. The
    /// writer takes it when it gets there (`file_for`). Best effort: where
    /// this fails, the writer makes the file itself as before. A file made
    /// ahead and never written is removed by recovery (`recover`: the
    /// queue's last file with no entry), or replaced here by the next one.
    ///
    /// Every caller that removes a queue's files discards it first
    /// (`discard`), which waits for a file being made here.
    fn prepare_next(&self, start: u64, first: u64) {
        let file = {
            let mut spare = self.spare.lock().unwrap_or_else(|e| e.into_inner());
            let files = self.files.read().unwrap_or_else(|e| e.into_inner());
            if self.discarded.load(Ordering::Acquire)
                || spare.as_ref().is_some_and(|(s, _)| *s == start)
                || files.contains_key(&start)
            {
                return;
            }
            // A file made ahead that the writer went past (a replica's
            // queue skipping offsets) holds no entry.
            if let Some((old, _)) = spare.take() {
                if !files.contains_key(&old) {
                    let _ = std::fs::remove_file(self.dir.join(format!("{old:020}")));
                }
            }
            drop(files);
            let path = self.dir.join(format!("{start:020}"));
            let made = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path);
            let file = match made.and_then(|f| super::commit_log::sync_dir(&self.dir).map(|()| f)) {
                Ok(f) => Arc::new(f),
                Err(e) => {
                    tracing::debug!(topic = %self.topic, queue = self.queue, error = %e, "next consume-queue file not made ahead");
                    let _ = std::fs::remove_file(&path);
                    return;
                }
            };
            *spare = Some((start, file.clone()));
            file
        };
        // Outside the lock: the writer may take the file meanwhile.
        if let Err(e) = super::reserve::reserve(&file, 0, first, true) {
            tracing::debug!(error = %e, "not reserved ahead of the appends");
        }
    }

    /// Recovery, before anything is written: one past the last entry its
    /// files hold (by their lengths), whether the entries are valid or not.
    ///
    /// # Errors
    /// I/O errors.
    pub fn stored_end(&self) -> io::Result<u64> {
        let files = self.files.read().unwrap_or_else(|e| e.into_inner());
        match files.iter().next_back() {
            Some((start, file)) => Ok(start + file.metadata()?.len() / ENTRY_LEN as u64),
            None => Ok(self.min.load(Ordering::Acquire)),
        }
    }

    /// Recovery: drops entries that point at or past `log_end` (their records
    /// were cut) and sets the next, visible and minimum offsets.
    ///
    /// # Errors
    /// I/O errors.
    pub fn recover(&self, log_min: u64, log_end: u64) -> io::Result<()> {
        let (unwritten, waiting) = self.written_out_or_waiting()?;
        let mut files = self.files.write().unwrap_or_else(|e| e.into_inner());
        let mut next = None;
        let starts: Vec<u64> = match waiting {
            Some(_) => Vec::new(),
            None => files.keys().rev().copied().collect(),
        };
        if let Some(first) = waiting {
            // The run waiting in memory was replayed from the log, below its
            // end, and the files hold every entry before it: what lies in
            // them from its start on (old copies, or entries of records the
            // log lost) goes, and so do the files past it (made ahead, or
            // left by the run's write that failed); cutting needs no room.
            let past: Vec<u64> = files.range(first + 1..).map(|(s, _)| *s).collect();
            for start in past {
                files.remove(&start);
                std::fs::remove_file(self.dir.join(format!("{start:020}")))?;
            }
            for (start, file) in files.iter() {
                let keep = first.saturating_sub(*start).min(self.entries_per_file);
                if file.metadata()?.len() > keep * ENTRY_LEN as u64 {
                    file.set_len(keep * ENTRY_LEN as u64)?;
                }
            }
            next = Some(unwritten.end());
        }
        for start in starts {
            let Some(file) = files.get(&start).cloned() else {
                continue;
            };
            let count = file.metadata()?.len() / ENTRY_LEN as u64;
            let mut buf = [0u8; ENTRY_LEN];
            let mut valid = 0;
            for i in (0..count).rev() {
                file.read_exact_at(&mut buf, i * ENTRY_LEN as u64)?;
                let e = Entry::decode(&buf);
                if e.size > 0
                    && e.log_offset
                        .checked_add(u64::from(e.size))
                        .is_some_and(|x| x <= log_end)
                {
                    valid = i + 1;
                    break;
                }
            }
            file.set_len(valid * ENTRY_LEN as u64)?;
            if valid == 0 && files.len() > 1 {
                files.remove(&start);
                std::fs::remove_file(self.dir.join(format!("{start:020}")))?;
                continue;
            }
            next = Some(start + valid);
            break;
        }
        drop(files);
        drop(unwritten);
        let next = next.unwrap_or_else(|| self.min.load(Ordering::Acquire));
        self.next.store(next, Ordering::Release);
        self.logged.store(next, Ordering::Release);
        self.visible.store(next, Ordering::Release);
        self.trim_below(log_min)?;
        Ok(())
    }

    /// Retention: forgets entries whose records are below `log_min`, deleting
    /// files that hold only such entries (never the last file).
    ///
    /// # Errors
    /// I/O errors.
    pub fn trim_below(&self, log_min: u64) -> io::Result<()> {
        // Held throughout: an entry appended meanwhile would be counted
        // below `next` and not found in its file.
        let (_unwritten, waiting) = self.written_out_or_waiting()?;
        let mut files = self.files.write().unwrap_or_else(|e| e.into_inner());
        let next = self.next.load(Ordering::Acquire);
        // The files hold the entries below this; a run waiting in memory
        // (a full disk) was written after the checkpoint, above `log_min`.
        let in_files = waiting.unwrap_or(next);
        let mut min = files.keys().next().copied().unwrap_or(next);
        let starts: Vec<u64> = files.keys().copied().collect();
        let mut buf = [0u8; ENTRY_LEN];
        for (i, start) in starts.iter().enumerate() {
            // The file that holds the end of the files' entries is the
            // last one looked at: any after it are empty (made ahead), or
            // belong to a run waiting in memory.
            let is_last = i + 1 == starts.len() || start + self.entries_per_file > in_files;
            let Some(file) = files.get(start).cloned() else {
                continue;
            };
            let count = (in_files.saturating_sub(*start)).min(self.entries_per_file);
            // Entries are in log order: find the first one at or above log_min.
            let (mut lo, mut hi) = (0u64, count);
            while lo < hi {
                let mid = (lo + hi) / 2;
                // An entry missing from a short file counts as below log_min.
                let below = match file.read_exact_at(&mut buf, mid * ENTRY_LEN as u64) {
                    Ok(()) => Entry::decode(&buf).log_offset < log_min,
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => true,
                    Err(e) => return Err(e),
                };
                if below {
                    lo = mid + 1;
                } else {
                    hi = mid;
                }
            }
            min = start + lo;
            if lo < count || is_last {
                break;
            }
            files.remove(start);
            std::fs::remove_file(self.dir.join(format!("{start:020}")))?;
        }
        self.min.store(min, Ordering::Release);
        Ok(())
    }
}

/// A run of entries not written to their file yet.
#[derive(Debug, Default)]
struct Unwritten {
    /// The queue offset of the first entry in `bytes`.
    first: u64,
    bytes: Vec<u8>,
}

impl Unwritten {
    /// One past the run's last entry.
    fn end(&self) -> u64 {
        self.first + (self.bytes.len() / ENTRY_LEN) as u64
    }
}

/// The directory of a queue's files.
pub fn queue_dir(root: &Path, topic: &str, queue: u32) -> PathBuf {
    root.join(topic).join(queue.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(range: std::ops::Range<u64>) -> Vec<u8> {
        let mut out = vec![0u8; (range.end - range.start) as usize * ENTRY_LEN];
        for (i, chunk) in range.zip(out.chunks_exact_mut(ENTRY_LEN)) {
            entry(i).encode(chunk);
        }
        out
    }

    fn entry(i: u64) -> Entry {
        Entry {
            log_offset: 100 * i,
            size: 50,
            tag_hash: i,
        }
    }

    fn file_bytes(dir: &Path) -> u64 {
        std::fs::read_dir(dir)
            .map(|fs| fs.map(|f| f.unwrap().metadata().unwrap().len()).sum())
            .unwrap_or(0)
    }

    /// A tmpfs of 256 KiB mounted on a temporary directory (it needs the
    /// privilege to mount: `None`, saying so, without), unmounted when
    /// dropped.
    struct SmallDisk(tempfile::TempDir);

    impl SmallDisk {
        fn mount() -> Option<SmallDisk> {
            let tmp = tempfile::tempdir().unwrap();
            let mounted = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", "size=256k", "tmpfs"])
                .arg(tmp.path())
                .status()
                .is_ok_and(|s| s.success());
            if !mounted {
                eprintln!("SKIPPED: cannot mount a tmpfs to fill (needs root, as .ci/run has)");
                return None;
            }
            Some(SmallDisk(tmp))
        }

        /// Fills what is left with a file, returned open with its path.
        fn fill(&self) -> (PathBuf, File) {
            let filler = self.0.path().join("filler");
            let mut f = File::create(&filler).unwrap();
            while std::io::Write::write(&mut f, &[0u8; 4096]).is_ok_and(|n| n > 0) {}
            (filler, f)
        }
    }

    impl Drop for SmallDisk {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(self.0.path())
                .status();
        }
    }

    /// A full disk (a real tmpfs, filled; it needs the privilege to mount):
    /// entries whose run cannot be written out stay readable in memory,
    /// and are written once there is room; nothing is lost across a
    /// reopen. Recovery on the full disk keeps the entries it replays
    /// waiting the same way, and retention leaves them be.
    #[test]
    fn entries_that_cannot_be_written_out_on_a_full_disk_wait_and_stay_readable() {
        let Some(disk) = SmallDisk::mount() else {
            return;
        };
        let tmp = &disk.0;
        let dir = tmp.path().join("q");
        let q = ConsumeQueue::open("t", 0, dir.clone(), 10_000).unwrap();
        q.write(0, &entries(0..10)).unwrap();
        q.publish(10);
        q.sync_if_dirty().unwrap();
        let (filler, f) = disk.fill();
        let page = (WRITE_AT / ENTRY_LEN) as u64;
        let end = 10 + 2 * page;
        q.write(10, &entries(10..end))
            .expect("taken, though not written out");
        q.publish(end);
        assert_eq!(
            q.read(0, 10_000).unwrap(),
            (0..end).map(entry).collect::<Vec<_>>()
        );
        assert!(q.sync_if_dirty().is_err(), "the disk is still full");
        // A crash: the waiting entries go with the process. Recovery cuts
        // the queue back to its checkpoint's 10 and replays the rest from
        // the log (above the queue's `next`, still its minimum), on a disk
        // still full: they wait again, readable, and the queue recovers.
        drop(q);
        let q = ConsumeQueue::open("t", 0, dir.clone(), 10_000).unwrap();
        q.truncate(10).unwrap();
        q.write(10, &entries(10..end))
            .expect("replayed, though not written out");
        q.recover(0, u64::MAX).unwrap();
        assert_eq!((q.min_offset(), q.next_offset()), (0, end));
        assert_eq!(
            q.read(0, 10_000).unwrap(),
            (0..end).map(entry).collect::<Vec<_>>()
        );
        drop(f);
        std::fs::remove_file(&filler).unwrap();
        q.write(end, &entries(end..end + 1)).unwrap();
        q.sync_if_dirty().unwrap();
        drop(q);
        let q = ConsumeQueue::open("t", 0, dir, 10_000).unwrap();
        q.recover(0, u64::MAX).unwrap();
        assert_eq!(q.next_offset(), end + 1, "all of them in the file");

        // Retention on a full disk: the entries waiting in memory are above
        // the files', so trimming below a position looks at the files only,
        // and never past the waiting run's first entry (files of a page).
        let q = ConsumeQueue::open("t", 0, tmp.path().join("r"), page).unwrap();
        q.write(0, &entries(0..150)).unwrap();
        q.publish(150);
        q.sync_if_dirty().unwrap();
        let _filled = disk.fill();
        q.write(150, &entries(150..450))
            .expect("taken, though not written out");
        q.publish(450);
        q.trim_below(entry(150).log_offset).unwrap();
        assert_eq!((q.min_offset(), q.next_offset()), (150, 450));
        assert_eq!(
            q.read(150, 10_000).unwrap(),
            (150..450).map(entry).collect::<Vec<_>>()
        );
    }

    #[test]
    fn entries_wait_in_memory_until_a_page_and_read_across_files_and_memory() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("q");
        // Files of 100 entries, so that a page of entries spans three.
        let q = ConsumeQueue::open("t", 0, dir.clone(), 100).unwrap();
        q.write(0, &entries(0..10)).unwrap();
        q.publish(10);
        assert_eq!(file_bytes(&dir), 0, "nothing written yet");
        assert_eq!(
            q.read(0, 100).unwrap(),
            (0..10).map(entry).collect::<Vec<_>>()
        );
        let page = (WRITE_AT / ENTRY_LEN) as u64;
        q.write(10, &entries(10..page + 20)).unwrap();
        q.publish(page + 20);
        assert_eq!(
            file_bytes(&dir),
            (page + 20) * ENTRY_LEN as u64,
            "written out"
        );
        q.write(page + 20, &entries(page + 20..page + 30)).unwrap();
        q.publish(page + 30);
        // From the files, across their boundaries, into memory.
        assert_eq!(
            q.read(5, 1000).unwrap(),
            (5..page + 30).map(entry).collect::<Vec<_>>()
        );
        assert_eq!(
            q.read(page + 25, 3).unwrap(),
            (page + 25..page + 28).map(entry).collect::<Vec<_>>()
        );
        q.sync_if_dirty().unwrap();
        assert_eq!(file_bytes(&dir), (page + 30) * ENTRY_LEN as u64);
        drop(q);
        let q = ConsumeQueue::open("t", 0, dir, 100).unwrap();
        q.recover(0, u64::MAX).unwrap();
        assert_eq!(q.next_offset(), page + 30, "all of them in the files");
    }

    #[test]
    fn the_file_being_filled_is_reserved_ahead_of_its_appends_and_keeps_its_length() {
        use std::os::unix::fs::MetadataExt;
        let tmp = tempfile::tempdir().unwrap();
        if !super::super::reserve::reserves_past_length(tmp.path()) {
            eprintln!("skipped: this file system does not reserve past a file's length");
            return;
        }
        let dir = tmp.path().join("q");
        let q = ConsumeQueue::open("t", 0, dir.clone(), 100_000).unwrap();
        q.write(0, &entries(0..1000)).unwrap();
        q.publish(1000);
        // Growth is measured from the first checkpoint on.
        q.sync_if_dirty().unwrap();
        q.write(1000, &entries(1000..11_000)).unwrap();
        q.publish(11_000);
        q.sync_if_dirty().unwrap();
        let meta = std::fs::metadata(dir.join(format!("{:020}", 0))).unwrap();
        assert_eq!(meta.len(), 11_000 * ENTRY_LEN as u64);
        assert!(
            meta.blocks() * 512 >= 31_000 * ENTRY_LEN as u64,
            "{} bytes of blocks for {} bytes of entries",
            meta.blocks() * 512,
            meta.len()
        );
        drop(q);
        let q = ConsumeQueue::open("t", 0, dir, 100_000).unwrap();
        q.recover(0, u64::MAX).unwrap();
        assert_eq!(q.next_offset(), 11_000);
        assert_eq!(
            q.read(0, 20_000).unwrap(),
            (0..11_000).map(entry).collect::<Vec<_>>()
        );
    }

    #[test]
    fn the_next_file_is_made_ahead_and_taken_by_the_writer_or_removed_by_recovery() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("q");
        let file = |start: u64| dir.join(format!("{start:020}"));
        // Files of 10,000 entries (200,000 bytes).
        let q = ConsumeQueue::open("t", 0, dir.clone(), 10_000).unwrap();
        q.write(0, &entries(0..1000)).unwrap();
        q.sync_if_dirty().unwrap();
        assert!(!file(10_000).exists());
        // 3,000 entries in an interval: the file fills within four more.
        q.write(1000, &entries(1000..4000)).unwrap();
        q.sync_if_dirty().unwrap();
        assert_eq!(std::fs::metadata(file(10_000)).unwrap().len(), 0);
        let made = q.spare.lock().unwrap().clone().unwrap();
        assert_eq!(made.0, 10_000);

        q.write(4000, &entries(4000..10_300)).unwrap();
        q.publish(10_300);
        q.sync_if_dirty().unwrap();
        let taken = q.files.read().unwrap()[&10_000].clone();
        assert!(
            Arc::ptr_eq(&taken, &made.1),
            "the writer took the file made ahead"
        );
        assert_eq!(taken.metadata().unwrap().len(), 300 * ENTRY_LEN as u64);
        assert_eq!(
            q.read(0, 20_000).unwrap(),
            (0..10_300).map(entry).collect::<Vec<_>>()
        );
        // The next one is made ahead too; unwritten, recovery removes it.
        q.write(10_300, &entries(10_300..14_000)).unwrap();
        q.sync_if_dirty().unwrap();
        assert!(file(20_000).exists());
        drop(q);
        let q = ConsumeQueue::open("t", 0, dir.clone(), 10_000).unwrap();
        q.recover(0, u64::MAX).unwrap();
        assert!(!file(20_000).exists());
        assert_eq!(q.next_offset(), 14_000);
        q.publish(14_000);
        assert_eq!(
            q.read(9_990, 100).unwrap(),
            (9_990..10_090).map(entry).collect::<Vec<_>>()
        );

        // A discarded queue (its topic deleted) lets go of the file made
        // ahead, which goes with the directory, and makes no other.
        q.write(14_000, &entries(14_000..15_000)).unwrap();
        q.sync_if_dirty().unwrap();
        q.write(15_000, &entries(15_000..19_000)).unwrap();
        q.sync_if_dirty().unwrap();
        assert!(file(20_000).exists());
        // A replica's queue that skipped past it: the next one replaces it.
        q.prepare_next(40_000, 4096);
        assert!(!file(20_000).exists());
        assert!(file(40_000).exists());
        q.discard();
        assert!(q.spare.lock().unwrap().is_none());
        std::fs::remove_dir_all(&dir).unwrap();
        q.prepare_next(30_000, 4096);
        assert!(!dir.exists(), "nothing comes back");
    }

    #[test]
    fn a_read_past_the_readable_end_is_empty_also_among_waiting_entries() {
        let tmp = tempfile::tempdir().unwrap();
        let q = ConsumeQueue::open("t", 0, tmp.path().join("q"), 100).unwrap();
        q.write(0, &entries(0..10)).unwrap();
        q.publish(5);
        assert!(q.read(7, 10).unwrap().is_empty());
        assert!(q.read(5, 0).unwrap().is_empty());
        assert_eq!(q.read_written(7, 10).unwrap().len(), 3);
        assert_eq!(q.read(3, 10).unwrap().len(), 2);
    }

    #[test]
    fn entries_after_a_skipped_offset_read_as_they_did_with_the_hole() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("q");
        let q = ConsumeQueue::open("t", 0, dir.clone(), 100).unwrap();
        // Offset 0 is skipped (a replica leaves out a record it cannot serve).
        q.write(1, &entries(1..2)).unwrap();
        q.write(2, &entries(2..10)).unwrap();
        q.publish(10);
        assert_eq!(
            file_bytes(&dir),
            2 * ENTRY_LEN as u64,
            "the first written at once"
        );
        let got = q.read(0, 100).unwrap();
        assert_eq!(got.len(), 10);
        assert_eq!(got[0].size, 0, "the hole");
        assert_eq!(got[1..], (1..10).map(entry).collect::<Vec<_>>());
    }

    #[test]
    fn a_discarded_queue_writes_nothing_back() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("q");
        let q = ConsumeQueue::open("t", 0, dir.clone(), 100).unwrap();
        q.write(0, &entries(0..10)).unwrap();
        q.discard();
        q.sync_if_dirty().unwrap();
        q.write(10, &entries(10..300)).unwrap();
        assert!(!dir.exists(), "no directory made for a deleted topic");
    }

    #[test]
    fn retention_counts_waiting_entries_as_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("q");
        let q = ConsumeQueue::open("t", 0, dir, 100).unwrap();
        q.write(0, &entries(0..150)).unwrap();
        q.sync_if_dirty().unwrap();
        q.write(150, &entries(150..160)).unwrap();
        q.publish(160);
        // Everything below entry 120's record went: the first file goes.
        q.trim_below(100 * 120).unwrap();
        assert_eq!(q.min_offset(), 120);
        assert_eq!(q.read(0, 1000).unwrap().len(), 0, "below the minimum");
        assert_eq!(
            q.read(120, 1000).unwrap(),
            (120..160).map(entry).collect::<Vec<_>>()
        );
    }

    /// A poll that took its arrival before looking is woken by a publish
    /// from another thread after the look; a publish with nobody waiting
    /// still makes the entries readable.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_publish_wakes_the_polls_that_registered_interest() {
        let tmp = tempfile::tempdir().unwrap();
        let q = Arc::new(ConsumeQueue::open("t", 0, tmp.path().join("q"), 100).unwrap());
        // Nobody interested: published, no wake-up owed.
        q.write(0, &entries(0..1)).unwrap();
        q.publish(1);
        assert_eq!(q.max_offset(), 1);
        for round in 0..200u64 {
            let (interest, arrived) = q.arrival();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            // The look after registering: nothing new yet (the other
            // thread publishes only once told to).
            assert_eq!(q.max_offset(), round + 1);
            let publisher = q.clone();
            let published = tokio::spawn(async move {
                publisher
                    .write(round + 1, &entries(round + 1..round + 2))
                    .unwrap();
                publisher.publish(round + 2);
            });
            tokio::time::timeout(std::time::Duration::from_secs(5), arrived)
                .await
                .expect("the publish woke the poll");
            drop(interest);
            published.await.unwrap();
        }
        assert_eq!(q.interested.load(Ordering::Relaxed), 0);
    }
}
