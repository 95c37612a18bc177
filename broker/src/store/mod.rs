//! The broker's storage: one commit log, consume queues derived from it, a
//! checkpoint, and recovery.
//!
//! Start with [`Store`]: [`Store::open`] recovers, then [`Store::append`]
//! and [`Store::commit_offset`] write through the single writer
//! (`writer.rs`, run by whichever caller takes its lock) and [`Store::read`] serves consumers from the consume
//! queues and the mapped log. Durability is explicit in [`FlushMode`].
//! Delayed messages ([`Store::append_delayed`], [`Store::deliver_due`]) are
//! indexed in consume queues of an internal topic too (see `delay.rs`).

mod checkpoint;
pub mod commit_log;
pub mod consume_queue;
pub mod delay;
mod deleted_topics;
pub mod dir_lock;
pub(crate) mod entry_log;
mod flusher;
pub mod index;
pub mod pop;
pub mod producers;
pub mod record;
mod recovery;
mod reserve;
mod writer;

#[cfg(test)]
mod delay_tests;
#[cfg(test)]
mod delete_tests;
#[cfg(test)]
mod index_tests;
#[cfg(test)]
mod pop_tests;
#[cfg(test)]
mod replica_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tx_offset_tests;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use dashmap::DashMap;
use foldhash::HashMap;
use tokio::sync::{oneshot, watch};
use txmq_protocol::{Message, MsgId, ProducerStamp, RecordRef, StoredMessage, TxOffset};

use crate::pending_map::PendingMap;

use self::commit_log::CommitLog;
use self::consume_queue::ConsumeQueue;
pub use self::delay::{DelayStats, DELAY_TOPIC};
pub use self::recovery::TxChange;

/// When a write is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushMode {
    /// Acknowledged once in the page cache; fsynced in the background.
    Async,
    /// Acknowledged only after an fdatasync that covers the record; one
    /// fdatasync covers every record written meanwhile (group commit).
    Sync,
}

/// What a message's record may take beside its body (at most
/// [`StoreConfig::max_message_size`]): its topic, key, tag and properties
/// (RocketMQ's properties take at most 32 KiB too). Frames have 64 KiB
/// of room past the largest body (`--max-frame-size`).
pub const MAX_HEADERS: usize = 32 << 10;

/// Storage settings.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Root of the data directory.
    pub dir: PathBuf,
    /// Acknowledgement policy.
    pub flush: FlushMode,
    /// Size of each commit-log segment file.
    pub segment_size: u64,
    /// The most bytes the commit log may take (whole segments); `None`: no limit.
    pub max_log_bytes: Option<u64>,
    /// New messages are refused while the file system holding the store
    /// has fewer bytes free than this (0: never), so that ends of
    /// transactions, offset commits, the queues, the index and a restart
    /// still find room; they are taken again once space is freed.
    pub disk_free_limit: u64,
    /// Entries per consume-queue file.
    pub cq_entries_per_file: u64,
    /// Largest message body accepted; its record may take
    /// [`MAX_HEADERS`] more (topic, key, tag, properties), as in RocketMQ.
    pub max_message_size: usize,
    /// How long a sync-flush send waits for its fsync before answering
    /// FLUSH_DISK_TIMEOUT; zero: not at all (durable only if already fsynced).
    pub sync_flush_timeout: Duration,
    /// Background fsync period under async flush.
    pub async_flush_interval: Duration,
    /// How often the checkpoint is written.
    pub checkpoint_interval: Duration,
    /// Segments older than this are deleted.
    pub retention: Duration,
    /// The furthest delivery time a delayed message may have.
    pub max_delay: Duration,
    /// A slave's store: it takes the master's records at the master's
    /// positions ([`Store::append_replicated`]) and, after a restart,
    /// continues right after its last whole record.
    pub replica: bool,
    /// A producer id unused this long is forgotten (its stamped sends are
    /// then refused `UNKNOWN_PRODUCER_ID`).
    pub producer_id_expiry: Duration,
    /// Where each flush round's fdatasync time goes (the broker's metrics).
    pub(crate) fdatasync_latency: Option<prometheus_client::metrics::histogram::Histogram>,
    /// Keep the message index (lookups by id and key, `index.rs`); off,
    /// lookups are refused and nothing is written for them.
    pub message_index: bool,
    /// The index files' sizes.
    pub index: index::IndexConfig,
}

impl StoreConfig {
    /// Defaults for a data directory: async flush, 1 GiB segments, 4 MiB
    /// messages, 72h retention, delays up to 7 days.
    pub fn new(dir: impl Into<PathBuf>) -> StoreConfig {
        StoreConfig {
            dir: dir.into(),
            flush: FlushMode::Async,
            segment_size: 1 << 30,
            max_log_bytes: None,
            disk_free_limit: 0,
            cq_entries_per_file: 300_000,
            max_message_size: 4 << 20,
            sync_flush_timeout: Duration::from_secs(5),
            async_flush_interval: Duration::from_millis(500),
            checkpoint_interval: Duration::from_secs(1),
            retention: Duration::from_secs(72 * 3600),
            max_delay: Duration::from_secs(7 * 24 * 3600),
            replica: false,
            producer_id_expiry: Duration::from_secs(7 * 24 * 3600),
            fdatasync_latency: None,
            message_index: true,
            index: index::IndexConfig::default(),
        }
    }
}

/// Errors of the store.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// A file operation failed.
    #[error("{context}: {message}")]
    Io {
        /// What was being done.
        context: String,
        /// The operating system's reason.
        message: String,
    },
    /// An fsync failed earlier, or a failed write could not be cleared;
    /// the store refuses writes until restarted.
    #[error("the store stopped accepting writes after a failed fsync or a failed write it could not clear (the broker's log says which: a full disk, an I/O error); fix the cause, then restart the broker")]
    Poisoned,
    /// The store is shutting down.
    #[error("the store is shutting down")]
    ShuttingDown,
    /// A message or batch is larger than accepted.
    #[error("{0}")]
    TooLarge(String),
    /// The commit log reached its size limit; nothing was written.
    #[error("{0}")]
    Full(String),
    /// A message field does not fit the record layout.
    #[error("{0}")]
    Invalid(String),
    /// The topic or queue does not exist in the store.
    #[error("queue {queue} of topic '{topic}' does not exist")]
    NoQueue {
        /// Topic.
        topic: String,
        /// Queue id.
        queue: u32,
    },
    /// A pop consumer's receipt that names no delivery in flight now.
    #[error("{0}")]
    Receipt(String),
    /// A stamped request the producer table refuses (a sequence gap, an
    /// unknown or forged producer id); nothing was written.
    #[error("{message}")]
    Producer {
        /// The wire code to answer.
        code: txmq_protocol::ErrorCode,
        /// Why.
        message: String,
    },
    /// Internal: a stamped request seen before; the store answers it as
    /// [`Appended::duplicate`], never as an error.
    #[error("a retried request stored before")]
    Duplicate {
        /// Its first result.
        first_offset: u64,
        /// Where its records end.
        end: u64,
    },
    /// A transaction's commit found a consumer offset it was conditional
    /// on moved ([`txmq_protocol::TxOffset::expected`]): the transaction
    /// was rolled back instead (its rollback marker is written).
    #[error("{0}")]
    OffsetConflict(String),
}

/// Whether `e` says the disk (or the quota) is full.
pub(crate) fn no_space(e: &std::io::Error) -> bool {
    e.raw_os_error()
        .is_some_and(|c| c == libc::ENOSPC || c == libc::EDQUOT)
}

impl StoreError {
    fn io(context: impl Into<String>, e: &std::io::Error) -> StoreError {
        let full = no_space(e);
        StoreError::Io {
            context: context.into(),
            message: if full {
                format!("{e}: the disk holding the data dir is full; free space on it")
            } else {
                e.to_string()
            },
        }
    }
}

/// What an append returns once written (and, under sync flush, fsynced).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// Queue offset of the first message (a prepare: the transaction id).
    pub first_offset: u64,
    /// Whether the write was durable in time (always true under async flush).
    pub durable: bool,
    /// The log position past the write: replicas hold it once they hold this.
    pub end: u64,
    /// A stamped request stored before: nothing was written now, and this
    /// is its first result (durability as of now).
    pub duplicate: bool,
}

/// A read from a queue.
#[derive(Debug, Clone)]
pub struct ReadResult {
    /// The messages, in queue order.
    pub messages: Vec<StoredMessage>,
    /// Where to read next.
    pub next_offset: u64,
    /// Smallest readable offset.
    pub min_offset: u64,
    /// One past the last readable offset.
    pub max_offset: u64,
    /// The read stopped at a record past the log limit asked for (under
    /// sync replication: not yet held by every in-sync replica).
    pub held_back: bool,
}

/// What a read skips or stops at.
#[derive(Debug, Clone, Copy)]
pub struct ReadFilter<'a> {
    /// Tag hashes to keep (empty: every message).
    pub tags: &'a [u64],
    /// Stop before a record that ends past this log position.
    pub log_limit: u64,
}

/// Properties on the first half message of a transaction carried forward
/// (its half messages re-written past retention): when it was prepared, how
/// many checks were sent, whether it was parked, the checks sent when an
/// operator last re-checked it, and the checks sent before the carry with
/// their times and answers (their `TxCheck` records go with the old
/// segment).
pub(crate) const PROP_CARRIED_PREPARED_AT: &str = "__txmq.prepared_at";
/// See [`PROP_CARRIED_PREPARED_AT`].
pub(crate) const PROP_CARRIED_CHECKS: &str = "__txmq.checks";
/// See [`PROP_CARRIED_PREPARED_AT`].
pub(crate) const PROP_CARRIED_PARKED: &str = "__txmq.parked";
/// See [`PROP_CARRIED_PREPARED_AT`].
pub(crate) const PROP_CARRIED_RECHECKED: &str = "__txmq.rechecked";
/// See [`PROP_CARRIED_PREPARED_AT`]: `at_ms:answer` pairs, oldest first,
/// comma separated; the answer as a `TxCheck` record's flags
/// ([`record::check_answer`]).
pub(crate) const PROP_CARRIED_HISTORY: &str = "__txmq.check_history";

/// A transaction as its records name it: its id, its first message id, and
/// where its half messages are now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxRef {
    /// The transaction id.
    pub id: u64,
    /// Its first message's id (carried by its markers).
    pub first_msg_id: MsgId,
    /// Log position of its first half message.
    pub halves_at: u64,
}

/// A transaction recovery found not yet committed or rolled back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveredTx {
    /// Its id (the log position of its first half message).
    pub tx_id: u64,
    /// Log position and size of its first half message (`None` until
    /// recovery saw one); the others follow it contiguously, one group.
    /// No per-transaction allocation: a million pending recover small.
    pub first_half: Option<(u64, u32)>,
    /// How many half messages it has.
    pub halves: u16,
    /// When it was prepared (broker clock, ms).
    pub prepared_at: u64,
    /// Check-backs sent.
    pub checks: u32,
    /// When the last check was sent (ms), 0 if never.
    pub last_check_at: u64,
    /// The last answer a check got, as its record's flags say
    /// ([`record::check_answer`]: unknown, commit or rollback), 0 if no
    /// check was answered.
    pub last_answer: u16,
    /// Parked after the maximum number of checks.
    pub parked: bool,
    /// Checks sent when an operator last re-checked it (`txmq tx
    /// recheck`): its allowance of checks counts from there.
    pub rechecked_at: u32,
}

/// Transactions as recovery rebuilt them from the log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveredTransactions {
    /// Pending (prepared or parked), by tx id.
    pub pending: PendingMap<RecoveredTx>,
    /// Ended since the oldest pending one: (tx id, committed?, first msg
    /// id, the default id when the marker did not carry it).
    pub ended: Vec<(u64, bool, MsgId)>,
    /// Of those, the ones whose half messages were carried forward past
    /// retention (not at their tx id): (tx id, where the first half
    /// message is now, how many there are). `tx show` reads them there.
    pub ended_carried: Vec<(u64, u64, u16)>,
}

/// The writer's position, shared with the flusher.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct FlushState {
    /// Everything below this log position is fsynced.
    pub flushed: u64,
    /// An fsync failed.
    pub failed: bool,
}

pub(crate) enum WriteCmd {
    Messages {
        queue: Arc<ConsumeQueue>,
        messages: Vec<Message>,
        stamp: Option<ProducerStamp>,
        reply: oneshot::Sender<Result<(u64, u64), StoreError>>,
    },
    /// Half messages of one transaction: (real queue, message).
    Prepare {
        messages: Vec<(u32, Message)>,
        stamp: Option<ProducerStamp>,
        reply: oneshot::Sender<Result<(u64, u64), StoreError>>,
    },
    /// Hand out a producer id (the reply's value); fsynced whatever the
    /// flush mode.
    ProducerInit {
        epoch: u64,
        reply: oneshot::Sender<Result<(u64, u64), StoreError>>,
    },
    /// The visible messages of a committed transaction and the consumer
    /// offsets committed with it, one atomic group; rolled back instead
    /// when an offset's `expected` does not match (see `writer.rs`).
    Commit {
        tx: TxRef,
        messages: Vec<(Arc<ConsumeQueue>, Message)>,
        offsets: Vec<TxOffset>,
        reply: oneshot::Sender<Result<(u64, u64), StoreError>>,
    },
    /// A rollback, check or park marker.
    Marker {
        kind: record::RecordKind,
        tx: TxRef,
        flags: u16,
        reply: oneshot::Sender<Result<(u64, u64), StoreError>>,
    },
    /// An operator's topic delete (answered with the record's position).
    TopicDelete {
        topic: String,
        reply: oneshot::Sender<Result<(u64, u64), StoreError>>,
    },
    /// The half messages of a pending transaction, re-written (retention).
    Carry {
        tx: TxRef,
        messages: Vec<(u32, Message)>,
        reply: oneshot::Sender<Result<(u64, u64), StoreError>>,
    },
    OffsetCommit {
        group: String,
        topic: String,
        queue: u32,
        offset: u64,
        /// The queue committed to: refused once it is discarded (its
        /// topic deleted), so no commit lands after the delete's record.
        of: Arc<ConsumeQueue>,
        reply: oneshot::Sender<Result<(u64, u64), StoreError>>,
    },
    /// Delayed messages for a real queue, indexed into a delay level.
    Delayed {
        queue: u32,
        messages: Vec<Message>,
        deliver_at: u64,
        reply: oneshot::Sender<Result<(u64, u64), StoreError>>,
    },
    /// Delay-level entries that woke up: one marker each.
    DelayMoves {
        moves: Vec<delay::DelayMove>,
        reply: oneshot::Sender<Result<(u64, u64), StoreError>>,
    },
    /// A pop group's receive, acknowledgement or change of deadline
    /// (decided by the writer against the pop table, see `pop.rs`);
    /// answered with the record's position (a receive that delivers
    /// nothing writes nothing and is answered `(0, 0)`).
    Pop {
        cmd: pop::PopCmd,
        reply: oneshot::Sender<Result<(u64, u64), StoreError>>,
    },
    /// A slave: whole records copied from the master, at its position.
    Replicated {
        pos: u64,
        data: bytes::Bytes,
        reply: oneshot::Sender<Result<(u64, u64), StoreError>>,
    },
}

pub(crate) struct StoreInner {
    config: StoreConfig,
    log: CommitLog,
    queues: RwLock<HashMap<String, Vec<Arc<ConsumeQueue>>>>,
    offsets: DashMap<(String, String, u32), u64>,
    /// Producer ids and their recent batches (see `producers.rs`); used by
    /// the writer (and a slave's replay) and the checkpoint, never across
    /// an await.
    producers: Mutex<producers::ProducerTable>,
    /// The pop table as of the write position (see `pop.rs`): applied by
    /// the writer with the position, under the `tx_pending` lock, so the
    /// checkpoint's snapshot holds exactly the records below its position.
    /// The writer decides against its own copy, ahead of this one.
    pop: Mutex<pop::PopTable>,
    /// Where the half messages of every transaction prepared and not yet
    /// committed or rolled back start (the tx id, unless carried forward):
    /// retention keeps them, recovery scans from the oldest.
    tx_pending: Mutex<std::collections::BTreeSet<u64>>,
    /// What recovery found about transactions, until taken.
    recovered_tx: Mutex<Option<RecoveredTransactions>>,
    /// The queues of `%DELAY%`, index = level.
    delay_levels: Vec<Arc<ConsumeQueue>>,
    /// Serialises `deliver_due` calls.
    delay_lock: tokio::sync::Mutex<()>,
    /// Counters for `GetStoreStats`.
    pub(crate) stats: StoreCounters,
    /// Lookups by message id and key (`None`: switched off).
    pub(crate) index: Option<index::MessageIndex>,
    /// Topics deleted by an operator, each with the log position below
    /// which its records no longer count: lookups leave them out (a topic
    /// made again under the same name starts anew).
    deleted_below: RwLock<deleted_topics::Deleted>,
    /// One past the last byte written to the log.
    written: AtomicU64,
    /// The same, for waiting on (a master's replication).
    written_tx: watch::Sender<u64>,
    /// A slave: told of every transaction change replication brings.
    tx_listener: std::sync::OnceLock<TxListener>,
    /// A slave: its last whole record when the store opened.
    opened_last_record: Option<RecordRef>,
    flush_state: watch::Sender<FlushState>,
    poisoned: AtomicBool,
    /// Bytes free on the store's file system when last looked at (by the
    /// flusher, every [`flusher::DISK_CHECK`]); `u64::MAX` if unknown.
    disk_free: AtomicU64,
    /// The writer; `None` once shut down. Taken with `try_lock` only, by
    /// whoever queued a command (see `writer.rs`).
    writer: Mutex<Option<writer::Writer>>,
    /// Commands waiting for the writer.
    queue: Mutex<Vec<WriteCmd>>,
    /// Bounds the queue: a caller waits for a slot when the disk falls behind.
    slots: tokio::sync::Semaphore,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl StoreInner {
    /// See [`Store::disk_low`].
    fn disk_low(&self) -> Option<String> {
        let limit = self.config.disk_free_limit;
        let free = self.disk_free.load(Ordering::Relaxed);
        (limit > 0 && free < limit).then(|| {
            format!(
                "the disk is nearly full: the file system holding {} has {} MiB free, below \
                 --disk-free-limit ({} MiB)",
                self.config.dir.display(),
                free >> 20,
                limit >> 20
            )
        })
    }

    /// Wakes whoever waits for the log to grow (a master's replica
    /// fetches); nothing, not even a lock, when nobody does.
    fn announce_written(&self, end: u64) {
        // Pairs with the fence in `wait_shippable`: a waiter that
        // subscribed after this reads the new end, or this sees it.
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.written_tx.receiver_count() > 0 {
            self.written_tx.send_replace(end);
        }
    }
}

/// Told of transaction changes replicated records made (a slave's table).
pub type TxListener = Box<dyn Fn(Vec<TxChange>) + Send + Sync>;

/// Why the log cannot be served from a position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogReadError {
    /// Below the log's start (deleted by retention).
    Gone {
        /// Where the log starts now.
        min: u64,
    },
    /// Past the log's end.
    Ahead {
        /// Where the log ends.
        end: u64,
    },
}

/// A replica's claim about its last record, checked against this log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordCheck {
    /// The same record, ending exactly there.
    Same,
    /// This log has another record there, or none.
    Differs,
    /// That part of the log was deleted by retention.
    Gone,
}

/// A handle to the store. Cloning is cheap.
#[derive(Clone)]
pub struct Store {
    inner: Arc<StoreInner>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.inner.config.dir)
            .finish()
    }
}

/// Cuts the commit log of the closed store in `config.dir` at `to` (a
/// record boundary): a replica dropping what a new master's history does
/// not have. Derived state follows at the next [`Store::open`]: consume
/// queue entries past the cut are dropped there, and a checkpoint past the
/// cut is replaced by one that replays the whole log (its consumer offsets
/// kept as a base, each capped at its queue's end).
///
/// # Errors
/// I/O errors.
pub fn truncate_log(config: &StoreConfig, to: u64) -> Result<(), StoreError> {
    let log_dir = config.dir.join("commitlog");
    let log = commit_log::CommitLog::open(&log_dir, config.segment_size).map_err(|e| {
        StoreError::io(
            format!("cannot open commit log in {}", log_dir.display()),
            &e,
        )
    })?;
    // The checkpoint first: one past the cut would, after a crash between
    // the two, make recovery take a torn write of the new data for damage
    // below the checkpoint and refuse to start.
    let cp = checkpoint::Checkpoint::load(&config.dir)
        .map_err(|e| StoreError::io("cannot read checkpoint", &e))?;
    if let Some(mut cp) = cp.filter(|cp| cp.position > to) {
        // Producer ids stay known (never handed out again); their batches
        // come back from the replay of what the cut left.
        cp.producers.forget_batches();
        // The pop table is rebuilt from what the cut left (its snapshot
        // may hold records past the cut); the committed offsets it made
        // stay as the base where its queues start again.
        let replay_all = checkpoint::Checkpoint {
            position: 0,
            oldest_pending_tx: None,
            offsets: cp.offsets,
            queues: None,
            producers: cp.producers,
            pop: pop::PopTable::default(),
        };
        replay_all
            .store(&config.dir)
            .map_err(|e| StoreError::io("cannot write checkpoint", &e))?;
    }
    log.cut(to, u64::MAX)
        .map_err(|e| StoreError::io(format!("cannot cut the commit log at {to}"), &e))?;
    drop(log);
    Ok(())
}

impl Store {
    /// Opens the store in `config.dir`, recovering from whatever state a
    /// crash left: replays the log from the checkpoint, verifies checksums,
    /// cuts a torn tail, rebuilds consume queues and consumer offsets. Then
    /// starts the flusher thread. `topics` lists (topic, queue
    /// count) pairs whose queues must exist even when empty.
    ///
    /// # Errors
    /// I/O errors opening or repairing files.
    pub fn open(config: StoreConfig, topics: &[(String, u32)]) -> Result<Store, StoreError> {
        commit_log::create_dir_durable(&config.dir).map_err(|e| {
            StoreError::io(
                format!("cannot create data dir {}", config.dir.display()),
                &e,
            )
        })?;
        let recovered = recovery::recover(&config, topics)?;
        let (flush_tx, _) = watch::channel(FlushState {
            flushed: recovered.end,
            failed: false,
        });
        let offsets = DashMap::new();
        for (k, v) in recovered.offsets {
            offsets.insert(k, v);
        }
        let tx_pending = recovered
            .transactions
            .pending
            .values()
            .filter_map(|t| t.first_half.map(|h| h.0))
            .collect();
        let replica = config.replica.then(|| writer::ReplicaWrite {
            state: recovery::ReplayState::live(&recovered.transactions),
            batcher: recovery::Batcher::live(),
        });
        let delay_levels = recovered
            .queues
            .get(DELAY_TOPIC)
            .map(|levels| levels[..delay::LEVELS as usize].to_vec())
            .unwrap_or_default();
        if delay_levels.len() != delay::LEVELS as usize {
            return Err(StoreError::Io {
                context: "cannot open the delay levels".into(),
                message: format!("recovery made {} of them", delay_levels.len()),
            });
        }
        let disk_free = reserve::free_bytes(&config.dir).unwrap_or(u64::MAX);
        let index = if config.message_index {
            let dir = config.dir.join("index");
            let opened =
                index::MessageIndex::open(dir, config.index, &recovered.log, recovered.end)
                    .map_err(|e| StoreError::io("cannot open the message index", &e))?;
            Some(opened)
        } else {
            None
        };
        let inner = Arc::new(StoreInner {
            deleted_below: RwLock::new(recovered.deleted),
            config,
            log: recovered.log,
            queues: RwLock::new(recovered.queues),
            offsets,
            producers: Mutex::new(recovered.producers),
            pop: Mutex::new(recovered.pop),
            tx_pending: Mutex::new(tx_pending),
            recovered_tx: Mutex::new(Some(recovered.transactions)),
            delay_levels,
            delay_lock: tokio::sync::Mutex::new(()),
            stats: StoreCounters::default(),
            index,
            written: AtomicU64::new(recovered.end),
            written_tx: watch::channel(recovered.end).0,
            tx_listener: std::sync::OnceLock::new(),
            opened_last_record: recovered.last_record,
            flush_state: flush_tx,
            poisoned: AtomicBool::new(false),
            disk_free: AtomicU64::new(disk_free),
            writer: Mutex::new(None),
            queue: Mutex::new(Vec::with_capacity(1024)),
            slots: tokio::sync::Semaphore::new(MAX_QUEUED),
            threads: Mutex::new(Vec::new()),
        });
        let (flusher, flush_cmds) = flusher::Flusher::new(inner.clone(), recovered.end);
        let writer = writer::Writer::new(inner.clone(), flush_cmds, recovered.end, replica)?;
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(f)
                .map_err(|e| StoreError::io("cannot start store thread", &e))
        };
        // The writer holds the store (a cycle broken by `shutdown`).
        *inner.writer.lock().unwrap_or_else(|e| e.into_inner()) = Some(writer);
        let f = spawn("txmq-flusher", Box::new(move || flusher.run()))?;
        inner
            .threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(f);
        Ok(Store { inner })
    }

    /// Deletes a topic's consume queues (in memory and on disk) and every
    /// consumer group's offsets of it, then records the delete durably
    /// (see `deleted_topics.rs`) so that recovery does not rebuild them
    /// from the log; the log's records stay until retention drops them.
    /// Returns the position below which the topic's records are ignored,
    /// and how many offsets were removed; returns once the record is
    /// fsynced. The caller stops new writes to the topic first (it is
    /// removed from the topic table).
    ///
    /// # Errors
    /// [`StoreError::Invalid`] for an internal topic; I/O errors.
    pub async fn delete_topic(&self, topic: &str) -> Result<(u64, usize), StoreError> {
        check_not_internal(topic)?;
        self.check_writable()?;
        let gone = self
            .inner
            .queues
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(topic);
        // A checkpoint holding them must not write their files back.
        gone.iter().flatten().for_each(|q| q.discard());
        remove_queue_files(&self.inner.config, topic)?;
        let before = self.inner.offsets.len();
        self.inner.offsets.retain(|(_, t, _), _| t != topic);
        lock(&self.inner.pop).remove_topic(topic);
        let removed = before.saturating_sub(self.inner.offsets.len());
        // The delete's record, after everything of the topic written so
        // far, carries it to the replicas (and to recovery).
        let (reply, rx) = oneshot::channel();
        let cmd = WriteCmd::TopicDelete {
            topic: topic.to_string(),
            reply,
        };
        let below = self.submit(cmd, rx).await?.first_offset;
        // A commit the writer took before the queues were discarded may
        // have been applied after the first sweep; the writer refuses any
        // later one, so this sweep is the last.
        self.inner.offsets.retain(|(_, t, _), _| t != topic);
        record_deleted(&self.inner, topic, below)?;
        Ok((below, removed))
    }

    /// The store's configuration.
    pub fn config(&self) -> &StoreConfig {
        &self.inner.config
    }

    /// Makes sure `topic` has at least `queues` queues.
    ///
    /// # Errors
    /// I/O errors, or [`StoreError::Invalid`] for an internal topic.
    pub fn ensure_queues(&self, topic: &str, queues: u32) -> Result<(), StoreError> {
        check_not_internal(topic)?;
        ensure_queues(
            &self.inner.config,
            &mut self.inner.queues.write().unwrap_or_else(|e| e.into_inner()),
            topic,
            queues,
        )
    }

    /// Every topic with queues in the store, with its queue count; internal
    /// topics (the delay levels) are left out.
    pub fn topics(&self) -> Vec<(String, u32)> {
        let queues = self.inner.queues.read().unwrap_or_else(|e| e.into_inner());
        queues
            .iter()
            .filter(|(t, _)| t.as_str() != DELAY_TOPIC)
            .map(|(t, q)| (t.clone(), q.len() as u32))
            .collect()
    }

    /// A queue of a user topic (not internal) that exists.
    fn user_queue(&self, topic: &str, queue: u32) -> Result<Arc<ConsumeQueue>, StoreError> {
        check_not_internal(topic)?;
        self.queue(topic, queue).ok_or_else(|| StoreError::NoQueue {
            topic: topic.to_string(),
            queue,
        })
    }

    /// The queue, if it exists.
    pub fn queue(&self, topic: &str, queue: u32) -> Option<Arc<ConsumeQueue>> {
        let queues = self.inner.queues.read().unwrap_or_else(|e| e.into_inner());
        queues.get(topic)?.get(queue as usize).cloned()
    }

    fn check_writable(&self) -> Result<(), StoreError> {
        if self.inner.poisoned.load(Ordering::Acquire) || self.inner.flush_state.borrow().failed {
            return Err(StoreError::Poisoned);
        }
        Ok(())
    }

    /// Appends `messages` (one topic) to queue `queue`, contiguously. Returns
    /// once written to the page cache under async flush, or once an fdatasync
    /// covers them under sync flush (`durable` is false when that took longer
    /// than the sync-flush timeout).
    ///
    /// # Errors
    /// Too large or invalid messages, an unknown queue, I/O errors, or a
    /// store that is poisoned or shutting down.
    pub async fn append(
        &self,
        topic: &str,
        queue: u32,
        messages: Vec<Message>,
    ) -> Result<Appended, StoreError> {
        self.append_gathering(topic, queue, messages, false).await
    }

    /// [`Store::append`]; with `more_coming` (the caller knows of other
    /// appends about to be made, such as the rest of the requests read from
    /// one socket) the write waits until the tasks ready to run have queued
    /// theirs, so that one write takes them all.
    ///
    /// # Errors
    /// As [`Store::append`].
    pub async fn append_gathering(
        &self,
        topic: &str,
        queue: u32,
        messages: Vec<Message>,
        more_coming: bool,
    ) -> Result<Appended, StoreError> {
        self.append_stamped(topic, queue, messages, None, more_coming)
            .await
    }

    /// [`Store::append_gathering`] for an idempotent producer: with a
    /// stamp, the messages are written as one group and the producer table
    /// decides first (see `producers.rs`): a retry of a remembered batch is
    /// answered with its first result ([`Appended::duplicate`]) and writes
    /// nothing.
    ///
    /// # Errors
    /// As [`Store::append`], and [`StoreError::Producer`] for a refused stamp.
    pub async fn append_stamped(
        &self,
        topic: &str,
        queue: u32,
        messages: Vec<Message>,
        stamp: Option<ProducerStamp>,
        more_coming: bool,
    ) -> Result<Appended, StoreError> {
        self.check_writable()?;
        let cq = self.user_queue(topic, queue)?;
        self.check_sizes(messages.iter())?;
        if stamp.is_some() && messages.len() > u16::MAX as usize {
            return Err(StoreError::TooLarge(format!(
                "an idempotent send holds at most {} messages; this one has {}",
                u16::MAX,
                messages.len()
            )));
        }
        let (reply, rx) = oneshot::channel();
        self.submit_gathering(
            WriteCmd::Messages {
                queue: cq,
                messages,
                stamp,
                reply,
            },
            rx,
            more_coming,
        )
        .await
    }

    /// Durably records a consumer group's offset (as a small log record).
    ///
    /// # Errors
    /// I/O errors, or a store that is poisoned or shutting down.
    pub async fn commit_offset(
        &self,
        group: &str,
        topic: &str,
        queue: u32,
        offset: u64,
    ) -> Result<Appended, StoreError> {
        self.check_writable()?;
        let of = self.user_queue(topic, queue)?;
        let (reply, rx) = oneshot::channel();
        let cmd = WriteCmd::OffsetCommit {
            group: group.to_string(),
            topic: topic.to_string(),
            queue,
            offset,
            of,
            reply,
        };
        self.submit(cmd, rx).await
    }

    /// A pop group's receive from one queue (see `pop.rs`): the single
    /// writer picks the due redeliveries, then new messages, and records
    /// them as one `PopReceive` record. Returns the deliveries and their
    /// receipt (the record's position) once the record is durable as the
    /// flush mode says; nothing to deliver writes nothing (receipt 0).
    ///
    /// # Errors
    /// [`StoreError::NoQueue`], I/O errors, or a store that is poisoned or
    /// shutting down.
    pub async fn pop_receive(
        &self,
        pick: pop::PopPick,
    ) -> Result<(Vec<pop::Delivery>, Appended), StoreError> {
        self.check_writable()?;
        let queue = self.user_queue(&pick.key.1, pick.key.2)?;
        let (reply, rx) = oneshot::channel();
        let (deliveries, picked) = oneshot::channel();
        let cmd = pop::PopCmd::Receive {
            pick: Box::new(pick),
            queue,
            deliveries,
        };
        let appended = self.submit(WriteCmd::Pop { cmd, reply }, rx).await?;
        let deliveries = picked.await.unwrap_or_default();
        Ok((deliveries, appended))
    }

    /// Acknowledges the delivery `receipt` of `offset` of a pop group's
    /// queue (`dead`: it went to the dead-letter topic): it is never
    /// delivered to the group again. Returns once the `PopAck` record is
    /// durable as the flush mode says.
    ///
    /// # Errors
    /// [`StoreError::Receipt`] when that delivery is not in flight (acked
    /// before, or superseded by a newer one); I/O errors.
    pub async fn pop_ack(
        &self,
        key: pop::PopKey,
        offset: u64,
        receipt: u64,
        dead: bool,
    ) -> Result<Appended, StoreError> {
        self.check_writable()?;
        let (reply, rx) = oneshot::channel();
        let cmd = pop::PopCmd::Ack {
            key,
            offset,
            receipt,
            dead,
        };
        self.submit(WriteCmd::Pop { cmd, reply }, rx).await
    }

    /// Moves the deadline of the delivery `receipt` of `offset` to `until`
    /// (ms); the answer's `first_offset` is its new receipt (the old one is
    /// stale from now on). Durable as [`Store::pop_ack`].
    ///
    /// # Errors
    /// As [`Store::pop_ack`].
    pub async fn pop_change(
        &self,
        key: pop::PopKey,
        offset: u64,
        receipt: u64,
        until: u64,
    ) -> Result<Appended, StoreError> {
        self.check_writable()?;
        let (reply, rx) = oneshot::channel();
        let cmd = pop::PopCmd::Change {
            key,
            offset,
            receipt,
            until,
        };
        self.submit(WriteCmd::Pop { cmd, reply }, rx).await
    }

    /// Resets a pop group's offset on a queue (`txmq group reset-offset`):
    /// what it holds in flight there is dropped (those receipts are stale
    /// from now on), its next receive starts at `next`, and its committed
    /// offset is `next`. Returns once the `PopReset` record is durable as
    /// the flush mode says.
    ///
    /// # Errors
    /// [`StoreError::NoQueue`] (also when the topic is deleted meanwhile),
    /// I/O errors, or a store that is poisoned or shutting down.
    pub async fn pop_reset(&self, key: pop::PopKey, next: u64) -> Result<Appended, StoreError> {
        self.check_writable()?;
        let of = self.user_queue(&key.1, key.2)?;
        let (reply, rx) = oneshot::channel();
        let cmd = pop::PopCmd::Reset { key, next, of };
        self.submit(WriteCmd::Pop { cmd, reply }, rx).await
    }

    /// Whether `group` receives `topic` as a pop group (RocketMQ 5's
    /// simple and push consumers): it has received from a queue of it.
    pub fn is_pop_group(&self, group: &str, topic: &str) -> bool {
        lock(&self.inner.pop).holds(group, topic)
    }

    /// A pop group's queue as of the write position (a copy).
    pub fn pop_queue(&self, key: &pop::PopKey) -> Option<pop::PopQueue> {
        lock(&self.inner.pop).get(key).cloned()
    }

    /// The earliest deadline after `after` (ms) in flight on a pop group's
    /// queue: when a message of it is due again (or a FIFO hold ends).
    pub fn pop_next_deadline(&self, key: &pop::PopKey, after: u64) -> Option<u64> {
        lock(&self.inner.pop)
            .get(key)
            .and_then(|q| q.next_deadline(after))
    }

    /// Messages in flight over all pop groups, and the queues they use.
    pub fn pop_stats(&self) -> (usize, usize) {
        let t = lock(&self.inner.pop);
        (t.in_flight(), t.len())
    }

    async fn submit(
        &self,
        cmd: WriteCmd,
        rx: oneshot::Receiver<Result<(u64, u64), StoreError>>,
    ) -> Result<Appended, StoreError> {
        self.submit_gathering(cmd, rx, false).await
    }

    async fn submit_gathering(
        &self,
        cmd: WriteCmd,
        rx: oneshot::Receiver<Result<(u64, u64), StoreError>>,
        more_coming: bool,
    ) -> Result<Appended, StoreError> {
        let mut cmd = Some(cmd);
        // The writer free (as it mostly is), the command is written at once
        // and never waits in the queue: it needs no slot. Not under sync
        // flush, where the slots also bound the appends waiting for an
        // fdatasync; and not while an append waits for a slot (none free),
        // which may be an earlier one of the same connection: the slots
        // are handed out in turn, and it must be written first.
        if !more_coming
            && self.inner.config.flush == FlushMode::Async
            && self.inner.slots.available_permits() > 0
        {
            write_at_once(&self.inner, &mut cmd);
        }
        // `cmd` kept in its one place across the wait for a slot: moved into
        // a binding there, it would take a second place in every append's
        // future.
        let _slot = if cmd.is_none() {
            None
        } else {
            let slot = self.slot().await?;
            lock(&self.inner.queue).extend(cmd.take());
            if more_coming {
                // Let the tasks ready to run (the rest of a read of many
                // requests, other connections' requests) queue theirs
                // first, so that one write takes them all. Dropped in
                // the yield, this still writes what is queued: nothing
                // is left behind.
                let combine_anyway = CombineOnDrop(&self.inner);
                tokio::task::yield_now().await;
                drop(combine_anyway);
            } else {
                combine(&self.inner);
            }
            Some(slot)
        };
        self.answer(rx).await
    }

    /// A place in the writer's queue (see `StoreInner::slots`).
    async fn slot(&self) -> Result<tokio::sync::SemaphorePermit<'_>, StoreError> {
        self.inner
            .slots
            .acquire()
            .await
            .map_err(|_| StoreError::ShuttingDown)
    }

    /// The answer of a queued command, once durable as the flush mode says.
    async fn answer(
        &self,
        rx: oneshot::Receiver<Result<(u64, u64), StoreError>>,
    ) -> Result<Appended, StoreError> {
        let (first_offset, end, duplicate) = match rx.await.map_err(|_| StoreError::ShuttingDown)? {
            Ok((first_offset, end)) => (first_offset, end, false),
            Err(StoreError::Duplicate { first_offset, end }) => (first_offset, end, true),
            Err(e) => return Err(e),
        };
        self.wait_durable(first_offset, end, duplicate, false).await
    }

    /// Waits as the flush mode says for the log to be durable up to `end`
    /// (`always`: also under async flush).
    async fn wait_durable(
        &self,
        first_offset: u64,
        end: u64,
        duplicate: bool,
        always: bool,
    ) -> Result<Appended, StoreError> {
        if self.inner.config.flush == FlushMode::Async && !always {
            return Ok(Appended {
                first_offset,
                durable: true,
                end,
                duplicate,
            });
        }
        let mut watch = self.inner.flush_state.subscribe();
        if self.inner.config.sync_flush_timeout.is_zero() {
            // Zero: answer at once, durable only if an fdatasync already covers it.
            let s = *watch.borrow();
            return Ok(Appended {
                first_offset,
                durable: s.flushed >= end && !s.failed,
                end,
                duplicate,
            });
        }
        // Boxed: every append's future holds this one's place otherwise,
        // under async flush too (see `handler::send_call`).
        let waited = Box::pin(tokio::time::timeout(
            self.inner.config.sync_flush_timeout,
            async {
                watch
                    .wait_for(|s| s.flushed >= end || s.failed)
                    .await
                    .map(|s| s.failed)
            },
        ))
        .await;
        match waited {
            Ok(Ok(false)) => Ok(Appended {
                first_offset,
                durable: true,
                end,
                duplicate,
            }),
            Ok(_) => Err(StoreError::Poisoned),
            Err(_) => Ok(Appended {
                first_offset,
                durable: false,
                end,
                duplicate,
            }),
        }
    }

    /// Stores the half messages of one transaction, (real queue, message)
    /// each, as one atomic group; `first_offset` of the answer is the
    /// transaction id. Durability as for [`Store::append`].
    ///
    /// # Errors
    /// As [`Store::append`].
    pub async fn prepare(
        &self,
        messages: Vec<(u32, Message)>,
        stamp: Option<ProducerStamp>,
    ) -> Result<Appended, StoreError> {
        self.check_writable()?;
        self.check_sizes(messages.iter().map(|(_, m)| m))?;
        let (reply, rx) = oneshot::channel();
        self.submit(
            WriteCmd::Prepare {
                messages,
                stamp,
                reply,
            },
            rx,
        )
        .await
    }

    /// Hands out a producer id with its token, for a master at `epoch`.
    /// Returns once the record that makes it known is fsynced (whatever
    /// the flush mode: an id is never handed out twice, also across power
    /// loss) and the `Appended` of that record.
    ///
    /// # Errors
    /// As [`Store::append`]; a sync that does not finish in the sync-flush
    /// timeout (5 s when that is zero) is a [`StoreError::Io`].
    pub async fn init_producer(&self, epoch: u64) -> Result<(u64, u64, Appended), StoreError> {
        self.check_writable()?;
        let (reply, rx) = oneshot::channel();
        let _slot = self.slot().await?;
        lock(&self.inner.queue).push(WriteCmd::ProducerInit { epoch, reply });
        combine(&self.inner);
        let (pid, end) = rx.await.map_err(|_| StoreError::ShuttingDown)??;
        let mut watch = self.inner.flush_state.subscribe();
        let timeout = match self.inner.config.sync_flush_timeout {
            t if t.is_zero() => Duration::from_secs(5),
            t => t,
        };
        let synced = tokio::time::timeout(timeout, async {
            watch
                .wait_for(|s| s.flushed >= end || s.failed)
                .await
                .map(|s| !s.failed)
        })
        .await;
        match synced {
            Ok(Ok(true)) => {}
            Ok(_) => return Err(StoreError::Poisoned),
            Err(_) => {
                return Err(StoreError::Io {
                    context: "cannot hand out a producer id".into(),
                    message: format!("its record was not fsynced within {timeout:?}"),
                })
            }
        }
        let token = lock(&self.inner.producers)
            .token(pid)
            .ok_or_else(|| StoreError::Io {
                context: "cannot hand out a producer id".into(),
                message: format!("producer id {pid} vanished (expired at once?)"),
            })?;
        Ok((
            pid,
            token,
            Appended {
                first_offset: pid,
                durable: true,
                end,
                duplicate: false,
            },
        ))
    }

    /// The stamp of the record at `pos` (a transaction id: the first half
    /// message of its prepare): `Some(None)` when it has none, `None` when
    /// nothing is readable there (retention deleted it).
    pub fn stamp_at(&self, pos: u64) -> Option<Option<record::Stamp>> {
        let head = self.inner.log.read(pos, record::HEADER_LEN + 16)?;
        Some(record::decode_stamp(&head))
    }

    /// Producer ids the store remembers.
    pub fn producer_ids(&self) -> usize {
        lock(&self.inner.producers).len()
    }

    /// Makes a transaction's messages visible in their queues, as one atomic
    /// group that is also the transaction's commit marker.
    ///
    /// # Errors
    /// As [`Store::append`].
    pub async fn commit_transaction(
        &self,
        tx: TxRef,
        messages: Vec<(u32, Message)>,
    ) -> Result<Appended, StoreError> {
        self.commit_with_offsets(tx, messages, Vec::new()).await
    }

    /// Makes a transaction's messages visible in their queues and commits
    /// the consumer `offsets` that go with it, as one atomic group that is
    /// also the transaction's commit marker: after a crash, recovery (and a
    /// slave's replay) applies all of it or none.
    ///
    /// An offset with `expected` commits only if the group's offset is that
    /// one when the single writer appends the group (a group with no
    /// offset on the queue matches any; an offset below the queue's first
    /// stored message counts as that message's), so of two commits racing
    /// for one queue at most one applies. Otherwise the transaction is
    /// rolled back instead, in the same append (a rollback marker), and
    /// the answer is [`StoreError::OffsetConflict`], given once the marker
    /// is written (not waiting for its fdatasync: a rollback lost in a
    /// crash leaves the transaction pending, and its commit conflicts
    /// again).
    ///
    /// # Errors
    /// As [`Store::append`], and [`StoreError::OffsetConflict`].
    pub async fn commit_with_offsets(
        &self,
        tx: TxRef,
        messages: Vec<(u32, Message)>,
        offsets: Vec<TxOffset>,
    ) -> Result<Appended, StoreError> {
        self.check_writable()?;
        self.check_sizes(messages.iter().map(|(_, m)| m))?;
        let mut placed = Vec::with_capacity(messages.len());
        for (queue, m) in messages {
            let cq = match self.queue(&m.topic, queue) {
                Some(q) => q,
                None => {
                    self.ensure_queues(&m.topic, queue + 1)?;
                    self.queue(&m.topic, queue)
                        .ok_or_else(|| StoreError::NoQueue {
                            topic: m.topic.clone(),
                            queue,
                        })?
                }
            };
            placed.push((cq, m));
        }
        let (reply, rx) = oneshot::channel();
        self.submit(
            WriteCmd::Commit {
                tx,
                messages: placed,
                offsets,
                reply,
            },
            rx,
        )
        .await
    }

    /// Appends a small transaction marker (rollback, check, park) that
    /// names the transaction by its id and its first message id.
    ///
    /// # Errors
    /// As [`Store::append`].
    pub async fn transaction_marker(
        &self,
        kind: record::RecordKind,
        tx: TxRef,
    ) -> Result<Appended, StoreError> {
        self.transaction_marker_flagged(kind, tx, 0).await
    }

    /// A transaction marker whose flags say more: a `TxCheck`'s answer
    /// (see [`record::check_answer`]).
    ///
    /// # Errors
    /// As [`Store::append`].
    pub async fn transaction_marker_flagged(
        &self,
        kind: record::RecordKind,
        tx: TxRef,
        flags: u16,
    ) -> Result<Appended, StoreError> {
        self.check_writable()?;
        let (reply, rx) = oneshot::channel();
        let cmd = WriteCmd::Marker {
            kind,
            tx,
            flags,
            reply,
        };
        self.submit(cmd, rx).await
    }

    /// Re-writes the half messages of pending transaction `tx` (from
    /// `tx.halves_at`) at the end of the log, as one group under the same
    /// tx id, so that retention can delete their old segment; returns where
    /// they are now, once fdatasynced (also under async flush: the old copy
    /// goes next). The first message should carry the transaction's state
    /// (`PROP_CARRIED_*`).
    ///
    /// # Errors
    /// As [`Store::append`]. Never refused for a full store: it frees space.
    pub async fn carry_transaction(
        &self,
        tx: TxRef,
        messages: Vec<(u32, Message)>,
    ) -> Result<u64, StoreError> {
        // No size check: the copy carries a few more properties than the
        // half messages had, and must never be refused for it (it always
        // fits a segment: messages are at most half of one).
        self.check_writable()?;
        let (reply, rx) = oneshot::channel();
        let a = self
            .submit(
                WriteCmd::Carry {
                    tx,
                    messages,
                    reply,
                },
                rx,
            )
            .await?;
        if self.inner.config.flush == FlushMode::Async || !a.durable {
            // Retention deletes the old copy right after: this one must be
            // on disk first, whatever the flush mode.
            if let Some(seg) = self.inner.log.segment_for(a.first_offset) {
                let synced = tokio::task::spawn_blocking(move || seg.file.sync_data()).await;
                let failed = match synced {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => Some(e.to_string()),
                    Err(e) => Some(e.to_string()),
                };
                if let Some(message) = failed {
                    // The copy is written and the pending set already names
                    // it, but it may not be on disk: acknowledge nothing
                    // more and delete nothing (as after any failed fsync).
                    tracing::error!(%message, "fdatasync of carried half messages failed; the store refuses writes from now on");
                    self.inner.poisoned.store(true, Ordering::Release);
                    self.inner.flush_state.send_modify(|s| s.failed = true);
                }
            }
        }
        Ok(a.first_offset)
    }

    /// Positions of pending transactions' half messages in the segments
    /// retention would delete now (oldest first, never the active one): the
    /// ones to carry forward before those segments can go.
    pub fn expiring_halves(&self) -> Vec<u64> {
        let segments = self.inner.log.segments();
        let written = self.inner.written.load(Ordering::Acquire);
        let mut boundary = None;
        for seg in segments.iter().take(segments.len().saturating_sub(1)) {
            if seg.end() > written || self.segment_age(seg) < self.inner.config.retention {
                break;
            }
            boundary = Some(seg.end());
        }
        let Some(boundary) = boundary else {
            return Vec::new();
        };
        self.inner
            .tx_pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .range(..boundary)
            .copied()
            .collect()
    }

    /// How many pending transactions' half messages the store keeps.
    pub fn pending_halves(&self) -> usize {
        self.inner
            .tx_pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    fn segment_age(&self, seg: &commit_log::Segment) -> Duration {
        seg.file
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .unwrap_or_default()
    }

    /// Reads and decodes the record at `pos` (e.g. a half message).
    pub fn read_record(&self, pos: u64, size: u32) -> Option<record::Record> {
        let data = self.inner.log.read(pos, size as usize)?;
        record::decode(&data, false)
    }

    /// The message id in the header of the record at `pos`, without
    /// decoding the record (not checksummed: for naming a transaction in
    /// its markers, which recovery reads as a hint).
    pub fn read_msg_id(&self, pos: u64) -> Option<MsgId> {
        let bytes = self.inner.log.read(pos + record::MSG_ID_AT, 16)?;
        Some(MsgId(bytes[..].try_into().ok()?))
    }

    /// The first and one-past-the-last offsets of a user queue.
    pub fn queue_bounds(&self, topic: &str, queue: u32) -> Option<(u64, u64)> {
        let cq = self.user_queue(topic, queue).ok()?;
        Some((cq.min_offset(), cq.max_offset()))
    }

    /// The id of the message at `offset` of a user queue, if one is there.
    pub fn msg_id_at(&self, topic: &str, queue: u32, offset: u64) -> Option<MsgId> {
        let cq = self.user_queue(topic, queue).ok()?;
        let entry = cq.read(offset, 1).ok()?.into_iter().next()?;
        self.read_msg_id(entry.log_offset)
    }

    /// Reads and decodes the record starting at `pos`, whatever its size;
    /// returns it with its size.
    pub fn read_record_at(&self, pos: u64) -> Option<(record::Record, u32)> {
        let head = self.inner.log.read(pos, 4)?;
        let size = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
        Some((self.read_record(pos, size)?, size))
    }

    /// What recovery found about transactions; `None` after the first call.
    pub fn take_recovered_transactions(&self) -> Option<RecoveredTransactions> {
        self.inner
            .recovered_tx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    fn check_sizes<'a>(
        &self,
        messages: impl Iterator<Item = &'a Message>,
    ) -> Result<(), StoreError> {
        let mut total = 0;
        let mut count = 0;
        for m in messages {
            check_not_internal(&m.topic)?;
            record::validate(m).map_err(StoreError::Invalid)?;
            let max = self.inner.config.max_message_size;
            let body = m.body.len();
            if body > max {
                return Err(StoreError::TooLarge(format!(
                    "message body of {body} bytes exceeds the maximum message size of {max} bytes"
                )));
            }
            let len = record::message_len(m);
            if len - body > MAX_HEADERS {
                return Err(StoreError::TooLarge(format!(
                    "message of {len} bytes: its topic, key, tag and properties take {} bytes, \
                     more than the {MAX_HEADERS} allowed beside its body",
                    len - body
                )));
            }
            total += len;
            count += 1;
        }
        if total as u64 > self.inner.config.segment_size / 2 + MAX_HEADERS as u64 {
            return Err(StoreError::TooLarge(format!(
                "batch of {total} bytes is too large; split it"
            )));
        }
        if count > u16::MAX as usize {
            return Err(StoreError::TooLarge(format!(
                "{count} messages in one request; at most {}",
                u16::MAX
            )));
        }
        Ok(())
    }

    /// (group, topic, queue) of every committed offset, internal groups
    /// (`%...`) left out.
    pub fn committed_queues(&self) -> Vec<(String, String, u32)> {
        self.inner
            .offsets
            .iter()
            .filter(|e| !e.key().0.starts_with('%'))
            .map(|e| e.key().clone())
            .collect()
    }

    /// (group, topic) of every committed offset, internal groups (`%...`) left out.
    pub fn committed_groups(&self) -> Vec<(String, String)> {
        let set: std::collections::BTreeSet<(String, String)> = self
            .inner
            .offsets
            .iter()
            .filter(|e| !e.key().0.starts_with('%'))
            .map(|e| (e.key().0.clone(), e.key().1.clone()))
            .collect();
        set.into_iter().collect()
    }

    /// A group's committed offset for a queue.
    pub fn committed_offset(&self, group: &str, topic: &str, queue: u32) -> Option<u64> {
        self.inner
            .offsets
            .get(&(group.to_string(), topic.to_string(), queue))
            .map(|v| *v)
    }

    /// Reads up to `max_messages` (and about `max_bytes`) from a queue.
    /// Each message carries the queue offset it was read at.
    ///
    /// # Errors
    /// [`StoreError::NoQueue`], [`StoreError::Invalid`] for an internal
    /// topic (the delay levels hold messages not due yet), or an I/O error
    /// reading the consume queue.
    pub fn read(
        &self,
        topic: &str,
        queue: u32,
        offset: u64,
        max_messages: usize,
        max_bytes: usize,
    ) -> Result<ReadResult, StoreError> {
        self.read_filtered(
            topic,
            queue,
            offset,
            max_messages,
            max_bytes,
            ReadFilter {
                tags: &[],
                log_limit: u64::MAX,
            },
        )
    }

    /// As [`Store::read`], but only messages whose tag hash (kept in the
    /// consume-queue entry, so others are not even read from the log) is in
    /// `tags`; empty `tags`: every message. Entries skipped count against
    /// `max_messages`, and `next_offset` moves past them.
    ///
    /// # Errors
    /// As [`Store::read`].
    pub fn read_filtered(
        &self,
        topic: &str,
        queue: u32,
        offset: u64,
        max_messages: usize,
        max_bytes: usize,
        filter: ReadFilter<'_>,
    ) -> Result<ReadResult, StoreError> {
        let ReadFilter { tags, log_limit } = filter;
        let cq = self.user_queue(topic, queue)?;
        let (min, max) = (cq.min_offset(), cq.max_offset());
        let mut result = ReadResult {
            messages: Vec::new(),
            next_offset: offset.clamp(min, max),
            min_offset: min,
            max_offset: max,
            held_back: false,
        };
        if offset < min || offset >= max {
            return Ok(result);
        }
        let entries = cq.read(offset, max_messages).map_err(|e| {
            StoreError::io(format!("cannot read consume queue {topic}/{queue}"), &e)
        })?;
        let mut bytes = 0;
        let mut next = offset;
        for e in entries {
            let at = next;
            if bytes > 0 && bytes + e.size as usize > max_bytes {
                break;
            }
            if e.log_offset + u64::from(e.size) > log_limit {
                result.held_back = true;
                break;
            }
            next += 1;
            if !tags.is_empty() && !tags.contains(&e.tag_hash) {
                continue;
            }
            // A record below the log's start was deleted by retention.
            let Some(data) = self.inner.log.read(e.log_offset, e.size as usize) else {
                continue;
            };
            let Some(rec) = record::decode(&data, false) else {
                tracing::error!(
                    topic,
                    queue,
                    offset = next - 1,
                    log_offset = e.log_offset,
                    "undecodable record; skipping"
                );
                continue;
            };
            bytes += e.size as usize;
            // The offset read at, not the record's: a delivered delayed
            // message's record holds its delay-level offset.
            result.messages.push(rec.into_stored(e.log_offset, at));
        }
        result.next_offset = next;
        Ok(result)
    }

    /// Deletes commit-log segments older than the retention time (never the
    /// active one, nor one holding a pending transaction's half message or
    /// an undelivered delayed message) and the consume-queue entries that
    /// pointed into them.
    /// Returns how many segments were deleted.
    ///
    /// # Errors
    /// I/O errors.
    pub fn enforce_retention(&self) -> Result<usize, StoreError> {
        if self.inner.poisoned.load(Ordering::Acquire) {
            // After a failed fsync, nothing is known durable: keep it all.
            return Ok(0);
        }
        let segments = self.inner.log.segments();
        let written = self.inner.written.load(Ordering::Acquire);
        let mut deleted = 0;
        let mut oldest_delayed: Option<Option<u64>> = None;
        for seg in segments.iter().take(segments.len().saturating_sub(1)) {
            if seg.end() > written {
                break;
            }
            // Half messages of pending transactions are never copied
            // elsewhere, so their segment stays until they end.
            let oldest_pending = self
                .inner
                .tx_pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .first()
                .copied();
            if oldest_pending.is_some_and(|p| p < seg.end()) {
                break;
            }
            let age = self.segment_age(seg);
            if age < self.inner.config.retention {
                break;
            }
            // Nor are delayed messages: a level entry points at the record
            // until it is delivered. Looked up once, and only when a segment
            // is old enough to go (it reads every pending level entry).
            if oldest_delayed.is_none() {
                oldest_delayed = Some(self.oldest_pending_delayed()?);
            }
            if oldest_delayed.flatten().is_some_and(|p| p < seg.end()) {
                break;
            }
            self.inner.log.remove_segment(seg.start).map_err(|e| {
                StoreError::io(format!("cannot delete segment {}", seg.path.display()), &e)
            })?;
            tracing::info!(segment = %seg.path.display(), ?age, "deleted segment past retention");
            deleted += 1;
        }
        if deleted > 0 {
            let min = self.inner.log.min_offset();
            for cq in self.all_queues() {
                cq.trim_below(min)
                    .map_err(|e| StoreError::io("cannot trim consume queue", &e))?;
            }
            if let Some(index) = &self.inner.index {
                index
                    .trim_below(min)
                    .map_err(|e| StoreError::io("cannot trim the message index", &e))?;
            }
        }
        Ok(deleted)
    }

    fn all_queues(&self) -> Vec<Arc<ConsumeQueue>> {
        all_queues(&self.inner)
    }

    /// Drops the commit-log pages readers mapped from the broker's resident
    /// memory (they stay in the page cache); called periodically so that the
    /// resident size does not grow with the log.
    pub fn release_mapped_pages(&self) {
        for seg in self.inner.log.segments() {
            if let Err(e) = seg.release_pages() {
                tracing::debug!(segment = %seg.path.display(), error = %e, "madvise failed");
            }
        }
    }

    /// Commit-log segment files, and the bytes of records they hold.
    pub fn disk_usage(&self) -> (usize, u64) {
        let log = &self.inner.log;
        (log.segments().len(), log.used_bytes(self.log_end()))
    }

    /// Whether the file system holding the store has less free than
    /// `--disk-free-limit`, as the flusher last looked (every 250 ms): what
    /// to say, or `None` when there is room (or no limit).
    pub(crate) fn disk_low(&self) -> Option<String> {
        self.inner.disk_low()
    }

    /// Bytes free on the file system holding the store, looked at now
    /// (`None` if it cannot be).
    pub fn disk_free(&self) -> Option<u64> {
        reserve::free_bytes(&self.inner.config.dir)
    }

    /// Records, bytes and `pwrite` calls appended, and fdatasync rounds, since open.
    pub fn stats(&self) -> (u64, u64, u64, u64) {
        let s = &self.inner.stats;
        (
            s.records.load(Ordering::Relaxed),
            s.bytes.load(Ordering::Relaxed),
            s.writes.load(Ordering::Relaxed),
            s.fdatasyncs.load(Ordering::Relaxed),
        )
    }

    /// Log bytes the flusher handed to the kernel to start writing to disk
    /// ahead of its fdatasync, since the store opened (see the flusher's
    /// `write_back`).
    pub fn written_back(&self) -> u64 {
        self.inner.stats.written_back.load(Ordering::Relaxed)
    }

    /// The log position one past the last byte written.
    pub fn log_end(&self) -> u64 {
        self.inner.written.load(Ordering::Acquire)
    }

    /// Bytes of records between log positions `from` and `to` (see
    /// [`commit_log::CommitLog::stored_between`]).
    pub fn stored_between(&self, from: u64, to: u64) -> u64 {
        self.inner.log.stored_between(from, to)
    }

    /// The smallest log position still stored.
    pub fn log_min(&self) -> u64 {
        self.inner.log.min_offset()
    }

    /// How far the log may be copied to replicas: what is written, or under
    /// sync flush what is fsynced (a replica must never hold what a power
    /// cut can take from this log, or the two would differ after it).
    pub fn shippable_end(&self) -> u64 {
        match self.inner.config.flush {
            FlushMode::Async => self.log_end(),
            FlushMode::Sync => self.inner.flush_state.borrow().flushed,
        }
    }

    /// Waits up to `timeout` for [`Store::shippable_end`] to pass `after`;
    /// returns it.
    pub async fn wait_shippable(&self, after: u64, timeout: Duration) -> u64 {
        let _ = tokio::time::timeout(timeout, async {
            match self.inner.config.flush {
                FlushMode::Async => {
                    // The watch is only updated while someone listens, so
                    // its value may be stale: the position is read from
                    // the writer's own counter, after subscribing.
                    let mut w = self.inner.written_tx.subscribe();
                    std::sync::atomic::fence(Ordering::SeqCst);
                    let _ = w.wait_for(|_| self.log_end() > after).await;
                }
                FlushMode::Sync => {
                    let mut w = self.inner.flush_state.subscribe();
                    let _ = w.wait_for(|s| s.flushed > after || s.failed).await;
                }
            }
        })
        .await;
        self.shippable_end()
    }

    /// Whole records from log position `from`, at most `max_bytes` (but
    /// at least one record), none past `limit`, none across a segment end:
    /// `(position, bytes, records)`. The position is `from`, or the start of the
    /// next segment when the log's data in `from`'s segment ends there.
    /// `None`: nothing past `from` yet.
    ///
    /// # Errors
    /// [`LogReadError::Gone`] below the log's start, [`LogReadError::Ahead`]
    /// past `limit`.
    pub fn read_log(
        &self,
        from: u64,
        max_bytes: usize,
        limit: u64,
    ) -> Result<Option<(u64, bytes::Bytes, u64)>, LogReadError> {
        let segments = self.inner.log.segments();
        let min = segments.first().map_or(0, |s| s.start);
        if from < min {
            return Err(LogReadError::Gone { min });
        }
        if from > limit {
            return Err(LogReadError::Ahead { end: limit });
        }
        let mut pos = from;
        for seg in &segments {
            if seg.end() <= pos {
                continue;
            }
            pos = pos.max(seg.start);
            if pos >= limit {
                return Ok(None);
            }
            let rel = (pos - seg.start) as usize;
            let end = (limit.min(seg.end()) - seg.start) as usize;
            let mut at = rel;
            let mut records = 0;
            while at + 4 <= end {
                let b = &seg.map[at..at + 4];
                let len = u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize;
                // At least one record, then none past `max_bytes`.
                if len == 0 || at + len > end || (at > rel && at + len - rel > max_bytes) {
                    break;
                }
                at += len;
                records += 1;
            }
            if at > rel {
                return Ok(Some((pos, seg.map.slice(rel..at), records)));
            }
            // No record at `pos`: this segment's data ended; the log goes
            // on in the next segment (a roll, or a restart).
            pos = seg.end();
        }
        Ok(None)
    }

    /// Whether this log holds `last` (the same checksum at the same
    /// position) as its record ending exactly at `end`.
    pub fn check_record(&self, last: RecordRef, end: u64) -> RecordCheck {
        if last.pos < self.inner.log.min_offset() {
            return RecordCheck::Gone;
        }
        if end > self.shippable_end() {
            return RecordCheck::Differs;
        }
        match self.inner.log.read(last.pos, 8) {
            Some(b) => {
                let len = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                let crc = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
                if crc == last.crc && len != 0 && last.pos + u64::from(len) == end {
                    RecordCheck::Same
                } else {
                    RecordCheck::Differs
                }
            }
            None => RecordCheck::Differs,
        }
    }

    /// A slave: appends whole records copied from the master (their
    /// checksums verified by the caller) at the master's position `pos`,
    /// and derives from them what recovery would: consume queues, offsets,
    /// transactions, delay levels. Answered per the flush mode, as an append.
    ///
    /// # Errors
    /// [`StoreError::Invalid`] when `pos` does not continue this log or the
    /// store is not a slave's; I/O errors.
    pub async fn append_replicated(
        &self,
        pos: u64,
        data: bytes::Bytes,
    ) -> Result<Appended, StoreError> {
        self.check_writable()?;
        let (reply, rx) = oneshot::channel();
        self.submit(WriteCmd::Replicated { pos, data, reply }, rx)
            .await
    }

    /// The records of message `id` the index finds, newest first (at most
    /// `max`): the message, a transaction's half message and its commit
    /// copy, a retried copy, and the rollback or park marker naming it.
    ///
    /// # Errors
    /// [`StoreError::Invalid`] when the index is switched off; I/O errors.
    pub fn find_by_id(&self, id: &MsgId, max: usize) -> Result<Vec<Found>, StoreError> {
        let hashes = index::id_hashes(id);
        self.find(hashes, 0, u64::MAX, max, |r| r.message.msg_id == *id)
    }

    /// Where the delayed message stored at log position `pos` (at
    /// `stored_at`, ms) was delivered: its queue and queue offset, once its
    /// delay ended and it was moved into its queue (a move that copies it
    /// instead is a record of its own, found by its id).
    ///
    /// # Errors
    /// As [`Store::find_by_id`].
    pub fn delivered_at(&self, pos: u64, stored_at: u64) -> Result<Option<(u32, u64)>, StoreError> {
        // Its moves come after it: the index files before it (less a
        // minute, should the clock have stepped back) are not read.
        let since = stored_at.saturating_sub(60_000);
        let moves = self.find(index::delay_move_hashes(pos), since, u64::MAX, 8, |r| {
            r.kind == record::RecordKind::DelayMove && r.aux == pos
        })?;
        Ok(moves.iter().find_map(|f| {
            let body = delay::MoveBody::decode(&f.record.message.body)?;
            (body.kind == delay::MoveKind::Queue).then_some((body.queue, body.offset))
        }))
    }

    /// The log position of the delayed record a delivered copy
    /// (`DelayedCopy`) was made from: the one its delay-level entry points
    /// at. `None` when that entry is gone (the level's file cut by
    /// retention) or the record is no copy.
    pub fn copied_from(&self, copy: &record::Record) -> Option<u64> {
        if copy.kind != record::RecordKind::DelayedCopy {
            return None;
        }
        let (level, offset) = delay::parse_copy_aux(copy.aux);
        let cq = self.inner.delay_levels.get(level as usize)?;
        let entry = cq.read(offset, 1).ok()?.into_iter().next()?;
        Some(entry.log_offset)
    }

    /// The messages (and half messages) of `topic` with key `key` (one of
    /// the space-separated keys of their key property), stored in `[since,
    /// until]` (ms), newest first, at most `max`.
    ///
    /// # Errors
    /// As [`Store::find_by_id`].
    pub fn find_by_key(
        &self,
        topic: &str,
        key: &str,
        since: u64,
        until: u64,
        max: usize,
    ) -> Result<Vec<Found>, StoreError> {
        let hashes = index::key_hashes(topic, key);
        self.find(hashes, since, until, max, |r| {
            matches!(
                r.kind,
                record::RecordKind::Message
                    | record::RecordKind::Half
                    | record::RecordKind::Delayed
                    | record::RecordKind::DelayedCopy
            ) && r.message.topic == topic
                && r.message
                    .key
                    .as_deref()
                    .is_some_and(|k| index::keys_of(k).any(|k| k == key))
        })
    }

    fn find(
        &self,
        hashes: index::Hashes,
        since: u64,
        until: u64,
        max: usize,
        wanted: impl Fn(&record::Record) -> bool,
    ) -> Result<Vec<Found>, StoreError> {
        let index = self.inner.index.as_ref().ok_or_else(|| {
            StoreError::Invalid(
                "the message index is switched off on this broker (--message-index false)".into(),
            )
        })?;
        let mut found = Vec::new();
        index
            .lookup(hashes, since, until, |hit| {
                // An entry is a hint: the record there must be the one asked
                // for, and not one of a topic deleted since.
                if let Some(rec) = self.read_record(hit.pos, hit.size) {
                    if wanted(&rec) && !self.deleted_before(&rec.message.topic, hit.pos) {
                        found.push(Found {
                            pos: hit.pos,
                            size: hit.size,
                            record: rec,
                        });
                    }
                }
                found.len() < max
            })
            .map_err(|e| StoreError::io("cannot read the message index", &e))?;
        Ok(found)
    }

    /// Up to `count` records of a user queue from `offset`, with their
    /// queue offsets (records deleted by retention left out).
    ///
    /// # Errors
    /// [`StoreError::NoQueue`]; I/O errors reading the consume queue.
    pub fn read_found(
        &self,
        topic: &str,
        queue: u32,
        offset: u64,
        count: usize,
    ) -> Result<Vec<(u64, Found)>, StoreError> {
        let cq = self.user_queue(topic, queue)?;
        let entries = cq.read(offset, count).map_err(|e| {
            StoreError::io(format!("cannot read consume queue {topic}/{queue}"), &e)
        })?;
        Ok(entries
            .into_iter()
            .enumerate()
            .filter_map(|(i, e)| {
                let record = self.read_record(e.log_offset, e.size)?;
                Some((
                    offset + i as u64,
                    Found {
                        pos: e.log_offset,
                        size: e.size,
                        record,
                    },
                ))
            })
            .collect())
    }

    /// Which topic of this name the queues hold now: 0 for one never
    /// deleted here, else the log position of its last delete (see
    /// [`txmq_protocol::PullResult::topic_generation`]).
    pub fn topic_generation(&self, topic: &str) -> u64 {
        let deleted = self
            .inner
            .deleted_below
            .read()
            .unwrap_or_else(|e| e.into_inner());
        deleted.get(topic).copied().unwrap_or(0)
    }

    /// Whether a record of `topic` at log position `pos` was deleted with
    /// the topic (`txmq topic delete`).
    fn deleted_before(&self, topic: &str, pos: u64) -> bool {
        let deleted = self
            .inner
            .deleted_below
            .read()
            .unwrap_or_else(|e| e.into_inner());
        deleted.get(topic).is_some_and(|below| pos < *below)
    }

    /// Whether half messages at log position `pos` belong to a transaction
    /// still pending (prepared or parked).
    pub fn is_pending_half(&self, pos: u64) -> bool {
        lock(&self.inner.tx_pending).contains(&pos)
    }

    /// Whether the message index is kept.
    pub fn has_index(&self) -> bool {
        self.inner.index.is_some()
    }

    /// A slave: who to tell of transaction changes replication brings.
    pub fn set_tx_listener(&self, listener: TxListener) {
        let _ = self.inner.tx_listener.set(listener);
    }

    /// A slave: its last whole record when the store opened.
    pub fn opened_last_record(&self) -> Option<RecordRef> {
        self.inner.opened_last_record
    }

    /// Flushes everything, writes a final checkpoint and stops the store's
    /// threads. Appends after this fail with [`StoreError::ShuttingDown`].
    pub async fn shutdown(&self) {
        let inner = self.inner.clone();
        let _ = tokio::task::spawn_blocking(move || {
            let writer = lock(&inner.writer).take();
            if let Some(mut writer) = writer {
                let mut rest = std::mem::take(&mut *lock(&inner.queue));
                writer.process(&mut rest);
                writer.stop_flusher();
            }
            // Anything queued from now on is refused (see `combine`).
            inner.slots.close();
            combine(&inner);
        })
        .await;
        let threads: Vec<_> =
            std::mem::take(&mut *self.inner.threads.lock().unwrap_or_else(|e| e.into_inner()));
        for t in threads {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }
}

/// A record the message index found, verified.
#[derive(Debug, Clone)]
pub struct Found {
    /// Its log position.
    pub pos: u64,
    /// Its size in the log.
    pub size: u32,
    /// The record.
    pub record: record::Record,
}

/// Write and fsync counters since the store opened.
#[derive(Debug, Default)]
pub(crate) struct StoreCounters {
    pub(crate) records: AtomicU64,
    pub(crate) bytes: AtomicU64,
    pub(crate) writes: AtomicU64,
    pub(crate) fdatasyncs: AtomicU64,
    /// Log bytes the flusher handed to the kernel to start writing to disk
    /// between two fdatasyncs (under async flush).
    pub(crate) written_back: AtomicU64,
}

/// At most this many commands wait for the writer.
const MAX_QUEUED: usize = 8192;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs [`combine`] when dropped: after a yield, or when the future
/// waiting in that yield is dropped.
struct CombineOnDrop<'a>(&'a StoreInner);

impl Drop for CombineOnDrop<'_> {
    fn drop(&mut self) {
        combine(self.0);
    }
}

/// Flat combining: if the writer is free, take it and write everything
/// queued, repeatedly, until the queue is empty when the writer is let go.
/// A caller that finds the writer busy leaves its command to the holder,
/// which checks the queue again after letting go, so none is stranded.
fn combine(inner: &StoreInner) {
    if let Some(writer) = try_writer(inner) {
        combine_holding(inner, writer);
    }
}

/// The writer, unless another caller holds it.
fn try_writer(inner: &StoreInner) -> Option<std::sync::MutexGuard<'_, Option<writer::Writer>>> {
    match inner.writer.try_lock() {
        Ok(w) => Some(w),
        Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
        Err(std::sync::TryLockError::WouldBlock) => None,
    }
}

/// Writes `cmd` (taking it) and whatever is queued, if the writer is free.
fn write_at_once(inner: &StoreInner, cmd: &mut Option<WriteCmd>) {
    if let Some(writer) = try_writer(inner) {
        lock(&inner.queue).extend(cmd.take());
        combine_holding(inner, writer);
    }
}

/// [`combine`] with the writer already taken.
fn combine_holding<'a>(
    inner: &'a StoreInner,
    mut writer: std::sync::MutexGuard<'a, Option<writer::Writer>>,
) {
    loop {
        match writer.as_mut() {
            // The queue and the writer's spare trade places: both keep
            // their capacity (the slots bound the queue to `MAX_QUEUED`
            // commands, and the holder's own), so a write allocates no
            // vector.
            Some(w) => loop {
                let mut batch = std::mem::take(&mut w.spare);
                std::mem::swap(&mut batch, &mut *lock(&inner.queue));
                if batch.is_empty() {
                    w.spare = batch;
                    break;
                }
                w.process(&mut batch);
                // `process` drains it: anything left would be taken
                // again with the next round, twice and out of order.
                debug_assert!(batch.is_empty());
                w.spare = batch;
            },
            None => {
                // Shut down: refuse what is queued.
                for cmd in std::mem::take(&mut *lock(&inner.queue)) {
                    writer::fail(cmd, StoreError::ShuttingDown);
                }
            }
        }
        drop(writer);
        if lock(&inner.queue).is_empty() {
            return;
        }
        writer = match try_writer(inner) {
            Some(w) => w,
            None => return,
        };
    }
}

/// Removes the consume queue files of a deleted topic.
pub(crate) fn remove_queue_files(config: &StoreConfig, topic: &str) -> Result<(), StoreError> {
    let root = config.dir.join("consumequeue");
    match std::fs::remove_dir_all(root.join(topic)) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(StoreError::io(
                format!("cannot remove the consume queues of topic {topic}"),
                &e,
            ))
        }
    }
    if root.exists() {
        commit_log::sync_dir(&root)
            .map_err(|e| StoreError::io("cannot sync the consume queue directory", &e))?;
    }
    Ok(())
}

/// Records `topic` deleted below log position `below` (fsynced), so that
/// recovery skips its older records without dispatching them, and lookups
/// leave them out from now on.
pub(crate) fn record_deleted(
    inner: &StoreInner,
    topic: &str,
    below: u64,
) -> Result<(), StoreError> {
    deleted_topics::append(&inner.config.dir, topic, below)
        .map_err(|e| StoreError::io(format!("cannot record the delete of topic {topic}"), &e))?;
    let mut deleted = inner
        .deleted_below
        .write()
        .unwrap_or_else(|e| e.into_inner());
    let at = deleted.entry(topic.to_string()).or_insert(below);
    *at = (*at).max(below);
    Ok(())
}

/// Internal topics are written by the store only.
fn check_not_internal(topic: &str) -> Result<(), StoreError> {
    if topic == DELAY_TOPIC {
        return Err(StoreError::Invalid(format!(
            "topic '{topic}' is internal to the broker"
        )));
    }
    Ok(())
}

fn all_queues(inner: &StoreInner) -> Vec<Arc<ConsumeQueue>> {
    inner
        .queues
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .values()
        .flat_map(|v| v.iter().cloned())
        .collect()
}

fn ensure_queues(
    config: &StoreConfig,
    queues: &mut HashMap<String, Vec<Arc<ConsumeQueue>>>,
    topic: &str,
    count: u32,
) -> Result<(), StoreError> {
    let list = queues.entry(topic.to_string()).or_default();
    while list.len() < count as usize {
        let id = list.len() as u32;
        let dir = consume_queue::queue_dir(&config.dir.join("consumequeue"), topic, id);
        let cq = ConsumeQueue::open(topic, id, dir, config.cq_entries_per_file)
            .map_err(|e| StoreError::io(format!("cannot open consume queue {topic}/{id}"), &e))?;
        list.push(Arc::new(cq));
    }
    Ok(())
}

#[cfg(test)]
mod size_tests {
    /// Every write command, a send's too, is moved several times on its way
    /// to the writer (into the queue, out of it, into the encoder): up to
    /// 128 bytes a move is a few register copies, past it a `memcpy` call
    /// (four per send at 136 bytes, with a pop receive's pick inline).
    #[test]
    fn a_write_command_moves_in_registers() {
        let size = std::mem::size_of::<super::WriteCmd>();
        assert!(size <= 96, "{size}");
    }
}
