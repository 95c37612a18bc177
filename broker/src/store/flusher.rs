//! The flusher thread: fdatasync for group commit and background flushing,
//! and the periodic checkpoint.
//!
//! Under sync flush, every batch the writer finishes is announced here; one
//! fdatasync then covers every record written up to that moment, however
//! many batches that is, and only then are the batches' messages made
//! visible and their senders answered. Under async flush the log is synced
//! every `async_flush_interval`. An fsync failure poisons the store: no
//! write is acknowledged after it (the page cache can no longer be trusted).
//!
//! Between two of those fdatasyncs, every [`WRITEBACK_STEP`], the flusher
//! starts writing the log's new whole pages to disk without waiting
//! ([`Segment::start_writeback`](super::commit_log::Segment::start_writeback)),
//! so that the fdatasync finds little left. The kernel's work of writing
//! pages back (finding them, marking them clean) runs on the thread that
//! asks for it: half a second of a busy log at once held one of a small
//! machine's cores for 3-4 ms, and the senders and consumers waiting for
//! that core made the end-to-end p99.9. What is durable when is unchanged.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::checkpoint::{Checkpoint, OffsetTable, QueueTable};
use super::consume_queue::ConsumeQueue;
use super::pop::PopTable;
use super::{all_queues, FlushMode, StoreInner};

/// How often, under async flush, writing the log's new pages to disk is
/// started between fdatasyncs (see the module's documentation).
pub(crate) const WRITEBACK_STEP: Duration = Duration::from_millis(50);
/// How often the flusher looks at the space left on the store's file
/// system (one `statvfs`), for `StoreConfig::disk_free_limit`.
pub(crate) const DISK_CHECK: Duration = Duration::from_millis(250);

/// Queues to publish and the offset each becomes readable up to.
pub(crate) type Publish = Vec<(Arc<ConsumeQueue>, u64)>;

pub(crate) enum FlushCmd {
    /// The writer wrote up to this position; publish these queues once
    /// durable. Under async flush: fsync now (a producer id was handed out).
    Written(u64, Publish),
    /// Flush, checkpoint, then answer.
    Shutdown(Sender<()>),
}

pub(crate) struct Flusher {
    store: Arc<StoreInner>,
    rx: Receiver<FlushCmd>,
    flushed: u64,
    pending: VecDeque<(u64, Publish)>,
    /// The largest end the writer announced: senders are woken up to it only.
    announced: u64,
    last_flush: Instant,
    /// The log position up to which writing to disk was started (or
    /// synced), and when the flusher last started it.
    written_back: u64,
    last_writeback: Instant,
    /// Writeback is started for whole pages only: the page the writer is
    /// still filling would be written twice.
    page: u64,
    last_checkpoint: Instant,
    checkpoint_pos: Option<u64>,
    /// Whether a step of the checkpoint failed since the last one written.
    checkpoint_failing: Failing,
    last_disk_check: Instant,
}

impl Flusher {
    pub(crate) fn new(store: Arc<StoreInner>, flushed: u64) -> (Flusher, Sender<FlushCmd>) {
        let (tx, rx) = std::sync::mpsc::channel();
        let f = Flusher {
            store,
            rx,
            flushed,
            pending: VecDeque::new(),
            announced: flushed,
            last_flush: Instant::now(),
            written_back: flushed,
            last_writeback: Instant::now(),
            page: page_size(),
            last_checkpoint: Instant::now(),
            checkpoint_pos: None,
            checkpoint_failing: Failing::default(),
            last_disk_check: Instant::now(),
        };
        (f, tx)
    }

    pub(crate) fn run(mut self) {
        let config = self.store.config.clone();
        let writes_back = cfg!(target_os = "linux")
            && config.flush == FlushMode::Async
            && config.async_flush_interval > WRITEBACK_STEP;
        loop {
            let mut due = self.last_checkpoint + config.checkpoint_interval;
            if config.flush == FlushMode::Async {
                due = due.min(self.last_flush + config.async_flush_interval);
            }
            if writes_back {
                due = due.min(self.last_writeback + WRITEBACK_STEP);
            }
            if config.disk_free_limit > 0 {
                due = due.min(self.last_disk_check + DISK_CHECK);
            }
            let wait = due
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1));
            let mut forced = false;
            match self.rx.recv_timeout(wait) {
                Ok(FlushCmd::Written(end, publish)) => {
                    forced = true;
                    self.announced = self.announced.max(end);
                    self.pending.push_back((end, publish));
                    // Everything announced meanwhile shares the next fdatasync.
                    loop {
                        match self.rx.try_recv() {
                            Ok(FlushCmd::Written(end, publish)) => {
                                self.announced = self.announced.max(end);
                                self.pending.push_back((end, publish))
                            }
                            Ok(FlushCmd::Shutdown(done)) => return self.stop(done),
                            Err(_) => break,
                        }
                    }
                }
                Ok(FlushCmd::Shutdown(done)) => return self.stop(done),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    let (tx, _rx) = std::sync::mpsc::channel();
                    return self.stop(tx);
                }
            }
            let now = Instant::now();
            if config.flush == FlushMode::Sync
                || forced
                || now >= self.last_flush + config.async_flush_interval
            {
                self.flush();
            } else if writes_back && now >= self.last_writeback + WRITEBACK_STEP {
                self.write_back();
            }
            if now >= self.last_checkpoint + config.checkpoint_interval {
                self.checkpoint();
            }
            if config.disk_free_limit > 0 && now >= self.last_disk_check + DISK_CHECK {
                self.check_disk(config.disk_free_limit);
            }
        }
    }

    /// Looks at the space left for the store; crossing the limit either way
    /// is logged once.
    fn check_disk(&mut self, limit: u64) {
        self.last_disk_check = Instant::now();
        let dir = &self.store.config.dir;
        // A file system that cannot be looked at keeps the last reading.
        let Some(free) = super::reserve::free_bytes(dir) else {
            return;
        };
        let before = self.store.disk_free.swap(free, Ordering::Relaxed);
        if free < limit && before >= limit {
            tracing::warn!(
                dir = %dir.display(),
                free_mib = free >> 20,
                limit_mib = limit >> 20,
                "the disk is nearly full: new messages are refused until space is freed (--disk-free-limit)"
            );
        } else if free >= limit && before < limit {
            tracing::info!(dir = %dir.display(), free_mib = free >> 20, "disk space freed: new messages are taken again");
        }
    }

    fn stop(mut self, done: Sender<()>) {
        self.flush();
        self.checkpoint();
        let _ = done.send(());
    }

    /// Starts writing the log's whole pages written since the last call
    /// (or fdatasync) to disk, without waiting for them.
    fn write_back(&mut self) {
        self.last_writeback = Instant::now();
        let written = self.store.written.load(Ordering::Acquire);
        let from = self.written_back.max(self.flushed);
        if written <= from {
            return;
        }
        let mut started = 0;
        for seg in self.store.log.segments() {
            if seg.end() <= from || seg.start >= written {
                continue;
            }
            // A segment the writer went past is written back to its end;
            // in the one it fills, the page it is filling waits (it is
            // started with the next range, which begins in it).
            let start = from.saturating_sub(seg.start);
            let end = if written >= seg.end() {
                seg.end() - seg.start
            } else {
                (written - seg.start) / self.page * self.page
            };
            if end <= start {
                continue;
            }
            if let Err(e) = seg.start_writeback(start, end) {
                // Only advice: the next fdatasync writes these pages anyway,
                // and fails loudly if they cannot be written.
                tracing::debug!(segment = %seg.path.display(), error = %e, "cannot start the commit log's writeback");
                break;
            }
            started += end - start;
        }
        self.store
            .stats
            .written_back
            .fetch_add(started, Ordering::Relaxed);
        self.written_back = written;
    }

    /// fdatasyncs the log up to what is written now, then publishes.
    fn flush(&mut self) {
        self.last_flush = Instant::now();
        // The fdatasync writes everything: the next writeback is a step on.
        self.last_writeback = self.last_flush;
        let target = self.store.written.load(Ordering::Acquire);
        if target > self.flushed {
            let started = Instant::now();
            for seg in self.store.log.segments() {
                if seg.end() <= self.flushed || seg.start >= target {
                    continue;
                }
                if let Err(e) = seg.file.sync_data() {
                    tracing::error!(segment = %seg.path.display(), error = %e, "fdatasync failed; the store refuses writes from now on");
                    self.store.poisoned.store(true, Ordering::Release);
                    self.store.flush_state.send_modify(|s| s.failed = true);
                    self.pending.clear();
                    return;
                }
            }
            self.flushed = target;
            self.store.stats.fdatasyncs.fetch_add(1, Ordering::Relaxed);
            if let Some(h) = &self.store.config.fdatasync_latency {
                h.observe(started.elapsed().as_secs_f64());
            }
        }
        // Visible before acknowledged: a consumer that hears of a send from
        // its producer can read the message.
        while self
            .pending
            .front()
            .is_some_and(|(end, _)| *end <= self.flushed)
        {
            if let Some((_, publish)) = self.pending.pop_front() {
                for (q, max) in publish {
                    q.publish(max);
                }
            }
        }
        // A batch written but not yet announced is not published yet: its
        // senders wait for the next round.
        let flushed = match self.store.config.flush {
            FlushMode::Sync => self.flushed.min(self.announced),
            FlushMode::Async => self.flushed,
        };
        self.store.flush_state.send_if_modified(|s| {
            let grew = s.flushed < flushed;
            s.flushed = s.flushed.max(flushed);
            grew
        });
    }

    /// Writes a checkpoint at the current write position.
    fn checkpoint(&mut self) {
        self.last_checkpoint = Instant::now();
        // The writer moves the position and the pending set under the same
        // lock, so these two agree.
        let (position, oldest_pending_tx, queues, justified, pop) = {
            let set = self
                .store
                .tx_pending
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            // Listed under the lock too: a queue made later has no entry
            // from a record below the position.
            let queues = all_queues(&self.store);
            let justified: QueueTable = queues
                .iter()
                .map(|q| ((q.topic.clone(), q.queue), q.logged()))
                .collect();
            // The writer applies pop records with the position, under
            // this lock: the copy holds exactly the records below it
            // (taken only when there is a new position to checkpoint).
            let position = self.store.written.load(Ordering::Acquire);
            let pop = if self.checkpoint_pos == Some(position) {
                PopTable::default()
            } else {
                super::lock(&self.store.pop).clone()
            };
            (position, set.first().copied(), queues, justified, pop)
        };
        if self.checkpoint_pos == Some(position) {
            return;
        }
        // Taken after reading the position, so it holds every commit below it.
        let offsets: OffsetTable = self
            .store
            .offsets
            .iter()
            .map(|e| (e.key().clone(), *e.value()))
            .collect();
        self.flush();
        if self.flushed < position {
            return;
        }
        let mut index_failed = false;
        if let Some(index) = &self.store.index {
            // The index keeps its own durable point (see `index.rs`).
            if let Err(e) = index.sync() {
                self.checkpoint_failing
                    .failed("cannot sync the message index", &e);
                index_failed = true;
            }
        }
        for cq in &queues {
            if let Err(e) = cq.sync_if_dirty() {
                let what = format!(
                    "cannot sync consume queue {}/{}; checkpoint skipped",
                    cq.topic, cq.queue
                );
                self.checkpoint_failing.failed(&what, &e);
                return;
            }
        }
        let producers = {
            let mut table = self
                .store
                .producers
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let expiry = self.store.config.producer_id_expiry.as_millis() as u64;
            let expired = table.expire(txmq_protocol::now_millis(), expiry);
            if expired > 0 {
                tracing::info!(expired, "producer ids unused for the expiry forgotten");
            }
            table.clone()
        };
        let cp = Checkpoint {
            position,
            oldest_pending_tx,
            offsets,
            queues: Some(justified),
            producers,
            pop,
        };
        match cp.store(&self.store.config.dir) {
            Ok(()) => {
                self.checkpoint_pos = Some(position);
                // Back to normal once a round had no failure at all.
                if !index_failed {
                    self.checkpoint_failing
                        .worked("checkpoint written: its writes work again");
                }
            }
            Err(e) => self
                .checkpoint_failing
                .failed("cannot write checkpoint", &e),
        }
    }
}

/// The checkpoint's steps fail the same way each interval while the disk
/// is full: the first failure since the last checkpoint written is logged
/// at ERROR, the next ones at DEBUG, and the next checkpoint written at
/// INFO. Until then a restart replays the log from the last one written.
#[derive(Default)]
struct Failing(bool);

impl Failing {
    fn failed(&mut self, what: &str, e: &std::io::Error) {
        if std::mem::replace(&mut self.0, true) {
            tracing::debug!(error = %e, "{what} (again)");
        } else {
            tracing::error!(error = %e, "{what}; tried again each --checkpoint-interval, and logged again once it works");
        }
    }

    fn worked(&mut self, what: &str) {
        if std::mem::take(&mut self.0) {
            tracing::info!("{what}");
        }
    }
}

/// The size of the kernel's pages, the unit writeback works in.
#[allow(unsafe_code)]
fn page_size() -> u64 {
    // SAFETY: sysconf reads a constant of the system.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).ok().filter(|&s| s > 0).unwrap_or(4096)
}
