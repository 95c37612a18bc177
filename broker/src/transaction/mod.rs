//! Transactions: the table of pending (prepared or parked) transactions,
//! their state machine, and the check-back scheduler (`check_back.rs`).
//!
//! States: prepared -> committed | rolled back | parked; parked ->
//! committed | rolled back by an operator. Every transition is first made
//! durable in the commit log (the commit's visible messages are themselves
//! the commit marker, written as one atomic group), then applied here; the
//! table is rebuilt from the log after a restart.

mod check_back;
mod due;
mod forensics;
mod offsets;
mod producers;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{watch, Notify};
use txmq_protocol::{
    now_millis, CheckRecord, Ended, EndedBy, ErrorCode, ListTransactions, Message, MsgId,
    ProducerStamp, SendStatus, TransactionList, TxAction, TxCounters, TxInfo, TxOffset,
    TxResolution, TxSource, TxState, WireError, CHECK_HISTORY,
};

pub(crate) use check_back::run as run_check_back;
pub(crate) use producers::{Producer, ProducerGroups};

use crate::handler::store_error;
use crate::pending_map::PendingMap;
use crate::store::record::RecordKind;
use crate::store::{
    RecoveredTransactions, RecoveredTx, Store, StoreError, TxChange, TxRef, PROP_CARRIED_CHECKS,
    PROP_CARRIED_HISTORY, PROP_CARRIED_PARKED, PROP_CARRIED_PREPARED_AT, PROP_CARRIED_RECHECKED,
};

/// Properties the broker keeps inside a half message; removed on commit.
pub(crate) const PROP_PRODUCER_GROUP: &str = "__txmq.producer_group";
pub(crate) const PROP_CHECK_DELAY: &str = "__txmq.check_delay_ms";
/// The prepare's attempt token (on the first half message): a retry of the
/// same prepare carries the same token.
pub(crate) const PROP_ATTEMPT: &str = "__txmq.attempt";
/// A user property that sets a message's own first-check delay (e.g. `2s`, `500ms`).
pub const PROP_USER_CHECK_DELAY: &str = "txmq.check-delay";

/// The broker's own properties of a half message (but the consumer
/// offsets a commit takes, see `offsets.rs`): a committed message and
/// `tx show` leave them out.
const BROKER_PROPS: [&str; 8] = [
    PROP_PRODUCER_GROUP,
    PROP_CHECK_DELAY,
    PROP_ATTEMPT,
    PROP_CARRIED_PREPARED_AT,
    PROP_CARRIED_CHECKS,
    PROP_CARRIED_PARKED,
    PROP_CARRIED_RECHECKED,
    PROP_CARRIED_HISTORY,
];

/// At most this many transactions in one listing (oldest first).
const LIST_LIMIT: usize = 1000;

/// How many ended transactions are remembered for idempotent ends.
const ENDED_MEMORY: usize = 1_000_000;

/// How many ended transactions keep their check history (for `tx show`).
const ENDED_HISTORY: usize = 10_000;

/// What a transaction's check-backs left: allocated at its first check
/// (or failure to check) only, and boxed, so that a transaction never
/// checked costs 8 bytes for all of it (a million pending stay small).
#[derive(Debug, Default)]
struct Checked {
    last_check: Option<TxResolution>,
    last_error: Option<Box<str>>,
    /// Its last check-backs, oldest first (at most [`CHECK_HISTORY`]).
    history: VecDeque<CheckRecord>,
}

/// How many recovered transactions are rebuilt between two releases of
/// the log pages their half messages were read from.
const RELEASE_EVERY: usize = 65_536;

/// Transaction settings.
#[derive(Debug, Clone)]
pub struct TxConfig {
    /// Age before the first check-back.
    pub timeout: Duration,
    /// How often the scheduler looks for due transactions (and the pause between checks of one).
    pub check_interval: Duration,
    /// Checks before a transaction is parked.
    pub check_max: u32,
    /// Checks per second per producer group.
    pub check_rate: u32,
    /// How long a check waits for the producer's answer.
    pub check_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Prepared,
    Parked,
    /// An end is being written; a second end of the same kind is answered OK.
    Ending(TxAction, bool),
    /// Its half messages are being re-written past retention; was parked?
    Carrying(bool),
}

/// A producer group's name, shared by its transactions: a thin pointer,
/// 8 bytes where an `Arc<str>` takes 16 (a million pending stay small).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct GroupName(Arc<String>);

impl std::ops::Deref for GroupName {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for GroupName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug)]
struct Pending {
    group: GroupName,
    /// `msg_key` of its first message's id (the key of `Table::by_msg_id`),
    /// 0 when unknown; the id itself is read from the log when a marker
    /// needs it (8 bytes here instead of 16: a million pending stay small).
    first_msg_key: u64,
    /// The half messages: `count` records contiguous from `halves.first`
    /// (the tx id, unless carried forward past retention; no
    /// per-transaction allocation: a million pending stay small).
    halves: Halves,
    prepared_at: u64,
    next_check_at: u64,
    checks: u32,
    phase: Phase,
    checking: bool,
    /// Checks counted when an operator last rechecked it: the maximum
    /// applies to the checks made since (0: never rechecked).
    rechecked_at: u32,
    /// What its check-backs left (this run of the broker only).
    checked: Option<Box<Checked>>,
}

impl Pending {
    fn last_check(&self) -> Option<TxResolution> {
        self.checked.as_ref().and_then(|c| c.last_check)
    }

    fn last_error(&self) -> Option<&str> {
        self.checked.as_ref().and_then(|c| c.last_error.as_deref())
    }

    /// Its check history, oldest first.
    fn history(&self) -> impl Iterator<Item = &CheckRecord> {
        self.checked.iter().flat_map(|c| c.history.iter())
    }
}

/// Where a transaction's half messages are. Packed: 10 bytes instead of
/// 16 in each pending transaction (fields are read by value only).
#[derive(Debug, Clone, Copy)]
#[repr(C, packed(2))]
struct Halves {
    first: u64,
    count: u16,
}

#[derive(Default)]
struct Table {
    pending: PendingMap<Pending>,
    /// The first message id of each pending transaction -> its tx id: a
    /// prepare retried after a lost reply finds its transaction here
    /// instead of storing a second copy.
    /// Keyed by `msg_key` (8 bytes, not the 16-byte id: a million pending
    /// stay small); a hit is confirmed against the stored half message.
    by_msg_id: HashMap<u64, u64>,
    /// Prepares being written, by first message id, with their attempt
    /// token; a retry arriving meanwhile waits for the first attempt's tx id.
    preparing: HashMap<MsgId, (Option<u64>, watch::Sender<Option<u64>>)>,
    /// Ends being written, by tx id; a repeat of the same end waits for the
    /// first one's outcome (true: written) instead of trusting it early.
    ending: HashMap<u64, watch::Sender<Option<bool>>>,
    ended: HashMap<u64, EndedTx>,
    /// The first message id (as `msg_key`) of each remembered ended
    /// transaction -> its tx id: a prepare retried after its transaction
    /// ended is refused instead of starting a second one.
    ended_by_msg: HashMap<u64, u64>,
    ended_order: std::collections::VecDeque<u64>,
    /// Check histories of the last ended transactions, by tx id, with
    /// their order (bounded by [`ENDED_HISTORY`]).
    ended_history: HashMap<u64, VecDeque<CheckRecord>>,
    ended_history_order: VecDeque<u64>,
    /// Where the half messages of the remembered ended transactions that
    /// were carried forward past retention are (not at their tx id), for
    /// `tx show`; forgotten with them.
    ended_carried: HashMap<u64, Halves>,
    groups: HashMap<String, GroupName>,
    /// When prepared transactions are next due for a check.
    due: due::DueIndex,
}

/// What is remembered of an ended transaction.
#[derive(Debug, Clone, Copy)]
struct EndedTx {
    committed: bool,
    /// Rolled back because its commit's offsets conflicted (this run
    /// only): a repeated commit is answered `OFFSET_CONFLICT` again.
    offset_conflict: bool,
    /// `msg_key` of its first message id; 0 when not known (a rollback
    /// marker written before markers carried the id).
    msg_key: u64,
    /// Who ended it ([`EndedBy::Unknown`] before this run).
    by: EndedBy,
    /// When it ended, ms (broker clock); 0 before this run.
    at: u64,
}

impl Table {
    fn remember_end(&mut self, tx_id: u64, committed: bool, msg_key: u64) {
        self.remember_end_by(tx_id, committed, msg_key, EndedBy::Unknown, 0);
    }

    fn remember_end_by(&mut self, tx_id: u64, committed: bool, msg_key: u64, by: EndedBy, at: u64) {
        if self
            .ended
            .insert(
                tx_id,
                EndedTx {
                    committed,
                    offset_conflict: false,
                    msg_key,
                    by,
                    at,
                },
            )
            .is_none()
        {
            if msg_key != 0 {
                self.ended_by_msg.insert(msg_key, tx_id);
            }
            self.ended_order.push_back(tx_id);
            if self.ended_order.len() > ENDED_MEMORY {
                if let Some(old) = self.ended_order.pop_front() {
                    if let Some(e) = self.ended.remove(&old) {
                        if self.ended_by_msg.get(&e.msg_key) == Some(&old) {
                            self.ended_by_msg.remove(&e.msg_key);
                        }
                    }
                    self.ended_carried.remove(&old);
                }
            }
        }
    }

    /// Keeps where the half messages of a remembered ended transaction
    /// are, when they were carried forward (not at its id).
    fn remember_carried(&mut self, tx_id: u64, halves: Halves) {
        if halves.first != tx_id && self.ended.contains_key(&tx_id) {
            self.ended_carried.insert(tx_id, halves);
        }
    }

    /// Keeps the check history of a transaction that just ended.
    fn keep_history(&mut self, tx_id: u64, checked: Option<Box<Checked>>) {
        let Some(history) = checked.map(|c| c.history).filter(|h| !h.is_empty()) else {
            return;
        };
        if self.ended_history.insert(tx_id, history).is_none() {
            self.ended_history_order.push_back(tx_id);
            if self.ended_history_order.len() > ENDED_HISTORY {
                if let Some(old) = self.ended_history_order.pop_front() {
                    self.ended_history.remove(&old);
                }
            }
        }
    }

    fn group(&mut self, name: &str) -> GroupName {
        self.groups
            .entry(name.to_string())
            .or_insert_with(|| GroupName(Arc::new(name.to_string())))
            .clone()
    }
}

#[derive(Default)]
struct Counters {
    prepared: AtomicU64,
    committed: AtomicU64,
    rolled_back: AtomicU64,
    checks_sent: AtomicU64,
    parked: AtomicU64,
}

/// The broker's transactions.
pub(crate) struct Transactions {
    store: Store,
    config: TxConfig,
    broker_name: String,
    table: Mutex<Table>,
    counters: Counters,
    pub(crate) producers: ProducerGroups,
    /// Wakes the scheduler early (a producer group came online).
    pub(crate) wake: Notify,
    /// Who may still answer a group's check-backs (its `tx` permission
    /// is checked again before each one, as the ACL file stands then).
    security: Arc<crate::security::Security>,
    /// Counters per producer group (`--metrics-listen`).
    pub(crate) metrics: Arc<crate::metrics::Metrics>,
    /// When this table was made (ms): checks made before it are known
    /// from their records in the log only (see `forensics.rs`).
    started_at: u64,
}

fn lock(m: &Mutex<Table>) -> std::sync::MutexGuard<'_, Table> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A delay in milliseconds: a number of them, or a duration (`2s`).
pub(crate) fn parse_delay(s: &str) -> Option<u64> {
    s.parse::<u64>().ok().or_else(|| {
        humantime::parse_duration(s)
            .ok()
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    })
}

fn status(durable: bool) -> SendStatus {
    if durable {
        SendStatus::SendOk
    } else {
        SendStatus::FlushDiskTimeout
    }
}

impl Transactions {
    /// The table rebuilt from what recovery found.
    pub(crate) fn new(
        store: Store,
        config: TxConfig,
        broker_name: String,
        recovered: RecoveredTransactions,
    ) -> Transactions {
        let mut table = Table::default();
        for (tx_id, committed, first_msg_id) in recovered.ended {
            table.remember_end(tx_id, committed, known_key(&first_msg_id));
        }
        for (tx_id, first, count) in recovered.ended_carried {
            table.remember_carried(tx_id, Halves { first, count });
        }
        // Sized once: growing by doubling holds the old table and the new
        // one at the same time.
        table.by_msg_id.reserve(recovered.pending.len());
        let mut converted = 0;
        // Converted where recovery left them: the recovered and the
        // table's transactions never take memory side by side. In id order,
        // so that their half messages are read in log order (recovery's
        // slots are reused out of order when transactions end).
        let mut recovered_pending = recovered.pending;
        recovered_pending.pack_in_order();
        let pending = recovered_pending.map_values(|_, t| {
            converted += 1;
            // Each reads its first half message through the log's mappings:
            // let go of those pages as it goes, not a million at once.
            if converted % RELEASE_EVERY == 0 {
                store.release_mapped_pages();
            }
            recovered_entry(&mut table, &store, &config, t)
        });
        table.pending = pending;
        if !table.pending.is_empty() {
            tracing::info!(
                pending = table.pending.len(),
                "pending transactions rebuilt from the log"
            );
        }
        Transactions {
            store,
            config,
            broker_name,
            table: Mutex::new(table),
            counters: Counters::default(),
            producers: ProducerGroups::default(),
            wake: Notify::new(),
            security: Arc::default(),
            metrics: Arc::default(),
            started_at: now_millis(),
        }
    }

    /// Counts the table's transactions and check-backs in `metrics`
    /// (the broker's, served at `--metrics-listen`).
    pub(crate) fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Check-backs go only to connections whose user has the group's
    /// `tx` permission under `security` (every connection without an ACL
    /// file).
    pub(crate) fn with_security(mut self, security: Arc<crate::security::Security>) -> Self {
        self.security = security;
        self
    }

    /// A live connection of `group` that may answer its check-backs now,
    /// round robin: its user has the group's `tx`, and `pub` on each of
    /// `topics` (the transaction's), since its answer may end the
    /// transaction, which `pub` is needed for.
    fn check_back_connection(&self, group: &str, topics: &[String]) -> Option<Producer> {
        self.producers.pick(group, |p| match p {
            Producer::Conn(conn) => end_ops(group, topics).all(|op| self.security.allows(conn, op)),
            Producer::Grpc(session) => {
                end_ops(group, topics).all(|op| self.security.allows_user(session.user(), op))
            }
        })
    }

    /// The topics of pending transaction `tx_id`'s half messages, each
    /// once; `None` when it is not pending here (or its halves are
    /// unreadable).
    pub(crate) fn pending_topics(&self, tx_id: u64) -> Option<Vec<String>> {
        let halves = lock(&self.table).pending.get(&tx_id)?.halves;
        // Read after the lock is released.
        let messages = self.read_halves_raw(halves)?;
        Some(topics_of(messages.iter().map(|(_, m)| m)))
    }

    /// The producer group of transaction `tx_id`, as its half message
    /// stored it (pending or ended); `None` when unknown here.
    pub(crate) fn producer_group(&self, tx_id: u64) -> Option<String> {
        let halves_at = {
            let table = lock(&self.table);
            if let Some(p) = table.pending.get(&tx_id) {
                return Some(p.group.to_string());
            }
            table.ended_carried.get(&tx_id).map_or(tx_id, |h| h.first)
        };
        let (record, _) = self.store.read_record_at(halves_at)?;
        if record.kind != RecordKind::Half || record.aux != tx_id {
            return None;
        }
        record.message.properties.get(PROP_PRODUCER_GROUP).cloned()
    }

    /// A slave: applies the transaction changes its master's log brought
    /// (prepared, checked, parked, carried, ended), as recovery would.
    pub(crate) fn apply_replicated(&self, changes: Vec<TxChange>) {
        let mut table = lock(&self.table);
        for change in changes {
            match change {
                TxChange::Pending(t) => insert_recovered(&mut table, &self.store, &self.config, t),
                TxChange::Ended(tx_id, committed, first_msg_id) => {
                    let removed = table.pending.remove(&tx_id);
                    if let Some(p) = &removed {
                        if table.by_msg_id.get(&p.first_msg_key) == Some(&tx_id) {
                            table.by_msg_id.remove(&p.first_msg_key);
                        }
                    }
                    table.remember_end(tx_id, committed, known_key(&first_msg_id));
                    if let Some(p) = removed {
                        table.remember_carried(tx_id, p.halves);
                    }
                    let counter = if committed {
                        &self.counters.committed
                    } else {
                        &self.counters.rolled_back
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Stores the half messages (already validated) and registers the
    /// transaction; returns its id.
    #[cfg(test)]
    pub(crate) async fn prepare(
        &self,
        group: &str,
        first_check_delay_ms: Option<u64>,
        attempt: Option<u64>,
        messages: Vec<(u32, Message)>,
        stamp: Option<ProducerStamp>,
    ) -> Result<(u64, SendStatus, bool), WireError> {
        self.prepare_with_offsets(group, first_check_delay_ms, attempt, messages, stamp, &[])
            .await
    }

    /// As [`Transactions::prepare`], with consumer `offsets` (already
    /// validated: queues of this broker) kept with the half messages and
    /// committed with them, atomically (see `offsets.rs`).
    pub(crate) async fn prepare_with_offsets(
        &self,
        group: &str,
        first_check_delay_ms: Option<u64>,
        attempt: Option<u64>,
        mut messages: Vec<(u32, Message)>,
        stamp: Option<ProducerStamp>,
        offsets: &[TxOffset],
    ) -> Result<(u64, SendStatus, bool), WireError> {
        let user_delay = messages.iter().find_map(|(_, m)| {
            m.properties
                .get(PROP_USER_CHECK_DELAY)
                .and_then(|d| parse_delay(d))
        });
        let delay = first_check_delay_ms
            .or(user_delay)
            .unwrap_or(self.config.timeout.as_millis() as u64);
        for (_, m) in &mut messages {
            m.properties
                .insert(PROP_PRODUCER_GROUP.into(), group.into());
            m.properties
                .insert(PROP_CHECK_DELAY.into(), delay.to_string());
        }
        let count = messages.len();
        let Some((_, first_message)) = messages.first_mut() else {
            return Err(WireError::new(
                ErrorCode::BadArgument,
                "a transaction needs at least one message",
            ));
        };
        if let Some(a) = attempt {
            first_message
                .properties
                .insert(PROP_ATTEMPT.into(), a.to_string());
        }
        if !offsets.is_empty() {
            first_message
                .properties
                .insert(offsets::PROP_OFFSETS.into(), offsets::encode(offsets));
        }
        let key = first_message.msg_id;
        // A retried stamped prepare is recognised by the producer table, in
        // the store's writer. The msg id match stays in front of it: it
        // refuses a second transaction that reuses a message id (another
        // stamp), and answers unstamped retries.
        let waiting = {
            let mut table = lock(&self.table);
            if let Some(&tx_id) = table.by_msg_id.get(&msg_key(&key)) {
                let stored = table
                    .pending
                    .get(&tx_id)
                    .and_then(|p| self.store.read_record_at(p.halves.first))
                    .map(|(r, _)| r.message)
                    .filter(|m| m.msg_id == key);
                if let Some(stored) = stored {
                    if !same_attempt(&stored, attempt, &messages[0].1) {
                        return Err(WireError::new(
                            ErrorCode::DuplicateMsgId,
                            format!(
                                "message id {key} is already used by pending transaction {tx_id}; \
                                 every transaction needs messages with their own ids (Message::new draws one)"
                            ),
                        ));
                    }
                    tracing::debug!(tx_id, msg_id = %key, "repeated prepare answered with its transaction");
                    return Ok((tx_id, SendStatus::SendOk, true));
                }
            }
            if let Some(&tx_id) = table.ended_by_msg.get(&msg_key(&key)) {
                let committed = table.ended.get(&tx_id).is_some_and(|e| e.committed);
                let (code, state) = if committed {
                    (ErrorCode::TransactionCommitted, "committed")
                } else {
                    (ErrorCode::TransactionRolledBack, "rolled back")
                };
                return Err(WireError::new(
                    code,
                    format!(
                        "message id {key} belongs to transaction {tx_id}, already {state}: \
                         a retried prepare must not run its local transaction again, and a new \
                         transaction needs messages with their own ids"
                    ),
                ));
            }
            match table.preparing.get(&key) {
                Some((token, _)) if *token != attempt || attempt.is_none() => {
                    return Err(WireError::new(
                        ErrorCode::DuplicateMsgId,
                        format!(
                            "message id {key} is being prepared by another transaction; \
                             every transaction needs messages with their own ids"
                        ),
                    ));
                }
                Some((_, first)) => Some(first.subscribe()),
                None => {
                    table
                        .preparing
                        .insert(key, (attempt, watch::channel(None).0));
                    None
                }
            }
        };
        if let Some(mut first) = waiting {
            let tx_id = first.wait_for(Option::is_some).await.ok().and_then(|v| *v);
            return tx_id.map(|t| (t, SendStatus::SendOk, true)).ok_or_else(|| {
                WireError::new(
                    ErrorCode::StoreUnavailable,
                    "an earlier attempt of this prepare failed; try again",
                )
            });
        }
        let stored = self
            .store
            .prepare(messages, stamp)
            .await
            .map_err(store_error);
        let (tx_id, durable) = match stored {
            Ok(a) if a.duplicate => {
                if let Some((_, first)) = lock(&self.table).preparing.remove(&key) {
                    first.send_replace(Some(a.first_offset));
                }
                return self.prepared_again(a.first_offset, a.durable);
            }
            Ok(a) => (a.first_offset, a.durable),
            Err(e) => {
                // Waiting retries see the sender dropped and are told to try again.
                lock(&self.table).preparing.remove(&key);
                return Err(e);
            }
        };
        // Half messages are contiguous from the tx id on.
        let halves = Halves {
            first: tx_id,
            count: count as u16,
        };
        let now = now_millis();
        // One critical section: a retry finds either the attempt or the
        // transaction, never neither.
        let mut table = lock(&self.table);
        if let Some((_, first)) = table.preparing.remove(&key) {
            first.send_replace(Some(tx_id));
        }
        self.metrics.prepared(group);
        let group = table.group(group);
        table.by_msg_id.entry(msg_key(&key)).or_insert(tx_id);
        table.pending.insert(
            tx_id,
            Pending {
                group,
                first_msg_key: known_key(&key),
                halves,
                prepared_at: now,
                next_check_at: now.saturating_add(delay),
                checks: 0,
                phase: Phase::Prepared,
                checking: false,
                rechecked_at: 0,
                checked: None,
            },
        );
        table.due.insert(tx_id, now.saturating_add(delay));
        drop(table);
        self.counters.prepared.fetch_add(1, Ordering::Relaxed);
        Ok((tx_id, status(durable), false))
    }

    /// A stamped prepare stored before: its transaction, unless it ended
    /// (then the retry must not run its local transaction again).
    fn prepared_again(
        &self,
        tx_id: u64,
        durable: bool,
    ) -> Result<(u64, SendStatus, bool), WireError> {
        let ended = lock(&self.table).ended.get(&tx_id).map(|e| e.committed);
        match ended {
            None => {
                tracing::debug!(
                    tx_id,
                    "repeated stamped prepare answered with its transaction"
                );
                Ok((tx_id, status(durable), true))
            }
            Some(committed) => {
                let (code, state) = if committed {
                    (ErrorCode::TransactionCommitted, "committed")
                } else {
                    (ErrorCode::TransactionRolledBack, "rolled back")
                };
                Err(WireError::new(
                    code,
                    format!(
                        "this prepare made transaction {tx_id}, already {state}: a retried \
                         prepare must not run its local transaction again"
                    ),
                ))
            }
        }
    }

    /// Commits or rolls back a transaction. Idempotent: ending it the same
    /// way again answers OK with `already`; the other way is an error.
    pub(crate) async fn end(
        &self,
        tx_id: u64,
        action: TxAction,
        source: TxSource,
        msg_id: Option<MsgId>,
    ) -> Result<Ended, WireError> {
        let by = match source {
            TxSource::Producer => EndedBy::Producer,
            TxSource::Operator => EndedBy::Operator,
        };
        self.end_as(tx_id, action, source, msg_id, by).await
    }

    /// As [`Transactions::end`], remembering `by` as who ended it.
    pub(crate) async fn end_as(
        &self,
        tx_id: u64,
        action: TxAction,
        source: TxSource,
        msg_id: Option<MsgId>,
        by: EndedBy,
    ) -> Result<Ended, WireError> {
        let unknown = || {
            WireError::new(
                ErrorCode::UnknownTransaction,
                format!(
                    "transaction {tx_id} is not known to broker {}",
                    self.broker_name
                ),
            )
        };
        // The caller's first msg id must be this transaction's: an id the
        // caller kept across a power cut must not end another transaction.
        let other = |key: u64| {
            msg_id
                .filter(|id| key != 0 && msg_key(id) != key)
                .map(|id| {
                    WireError::new(
                        ErrorCode::UnknownTransaction,
                        format!(
                        "transaction {tx_id} on broker {} is not the one with first message {id}",
                        self.broker_name
                    ),
                    )
                })
        };
        let first_attempt = {
            let mut table = lock(&self.table);
            if let Some(&ended) = table.ended.get(&tx_id) {
                if let Some(e) = other(ended.msg_key) {
                    return Err(e);
                }
                return ended_again_tx(tx_id, ended, action);
            }
            let Some(p) = table.pending.get_mut(&tx_id) else {
                return Err(unknown());
            };
            if let Some(e) = other(p.first_msg_key) {
                return Err(e);
            }
            match p.phase {
                // The same end, or a contradicting one, while an end is
                // being written: both wait for its outcome, so no answer
                // is given before the first end is durable.
                Phase::Ending(..) => None,
                Phase::Carrying(_) => {
                    return Err(WireError::new(
                        ErrorCode::StoreUnavailable,
                        format!("transaction {tx_id} is being moved past retention; try again"),
                    ));
                }
                Phase::Parked if source == TxSource::Producer => {
                    return Err(WireError::new(
                        ErrorCode::TransactionParked,
                        format!(
                            "transaction {tx_id} was parked after {} checks; only an operator can end it (txmq tx resolve)",
                            p.checks
                        ),
                    ));
                }
                Phase::Parked | Phase::Prepared => {
                    let previous = p.phase;
                    p.phase = Phase::Ending(action, previous == Phase::Parked);
                    let halves = p.halves;
                    let first_msg_key = p.first_msg_key;
                    table.ending.insert(tx_id, watch::channel(None).0);
                    Some((halves, previous, first_msg_key))
                }
            }
            .ok_or_else(|| table.ending.get(&tx_id).map(watch::Sender::subscribe))
        };
        let (halves, previous, first_msg_key) = match first_attempt {
            Ok(first) => first,
            Err(waiting) => {
                // An end is being written: answer with its outcome.
                let written = match waiting {
                    Some(mut w) => w.wait_for(Option::is_some).await.ok().and_then(|v| *v),
                    None => None,
                };
                let ended = lock(&self.table).ended.get(&tx_id).copied();
                return match (written, ended) {
                    (Some(true), Some(ended)) => ended_again_tx(tx_id, ended, action),
                    _ => Err(WireError::new(
                        ErrorCode::StoreUnavailable,
                        format!("ending transaction {tx_id} failed; try again"),
                    )),
                };
            }
        };
        // Read from the log (the half message's header), not kept in memory.
        let first_msg_id = self.store.read_msg_id(halves.first).unwrap_or_default();
        // (topic, messages, body bytes) a commit makes visible, for the metrics.
        let mut visible = Vec::new();
        let result = match action {
            TxAction::Commit => match self
                .read_commit(halves)
                .inspect(|(messages, _)| visible = crate::metrics::by_topic(messages))
            {
                Some((messages, offsets)) => self
                    .store
                    .commit_with_offsets(
                        TxRef {
                            id: tx_id,
                            first_msg_id,
                            halves_at: halves.first,
                        },
                        messages,
                        offsets,
                    )
                    .await
                    .map(|a| a.durable)
                    .map_err(|e| match e {
                        // Rolled back instead: ended, not failed.
                        StoreError::OffsetConflict(why) => Conflict(why),
                        other => Failed(store_error(other)),
                    }),
                None => Err(Failed(WireError::new(
                    ErrorCode::Internal,
                    format!("half messages of transaction {tx_id} are unreadable"),
                ))),
            },
            TxAction::Rollback => self
                .store
                .transaction_marker(
                    RecordKind::TxRollback,
                    TxRef {
                        id: tx_id,
                        first_msg_id,
                        halves_at: halves.first,
                    },
                )
                .await
                .map(|a| a.durable)
                .map_err(|e| Failed(store_error(e))),
        };
        let mut table = lock(&self.table);
        if let Some(first) = table.ending.remove(&tx_id) {
            first.send_replace(Some(!matches!(result, Err(Failed(_)))));
        }
        match result {
            Ok(durable) => {
                table.remember_end_by(
                    tx_id,
                    action == TxAction::Commit,
                    first_msg_key,
                    by,
                    now_millis(),
                );
                if let Some(p) = table.pending.remove(&tx_id) {
                    self.metrics.ended(&p.group, action == TxAction::Commit);
                    let key = p.first_msg_key;
                    if table.by_msg_id.get(&key) == Some(&tx_id) {
                        table.by_msg_id.remove(&key);
                    }
                    table.remember_carried(tx_id, p.halves);
                    table.keep_history(tx_id, p.checked);
                }
                drop(table);
                match action {
                    TxAction::Commit => self.counters.committed.fetch_add(1, Ordering::Relaxed),
                    TxAction::Rollback => self.counters.rolled_back.fetch_add(1, Ordering::Relaxed),
                };
                for (topic, messages, bytes) in &visible {
                    self.metrics.messages_in(topic, *messages, *bytes);
                }
                tracing::debug!(tx_id, ?action, ?source, "transaction ended");
                Ok(Ended::new(final_state(action), false, status(durable)))
            }
            Err(Conflict(why)) => {
                table.remember_end_by(
                    tx_id,
                    false,
                    first_msg_key,
                    EndedBy::OffsetConflict,
                    now_millis(),
                );
                if let Some(p) = table.pending.remove(&tx_id) {
                    self.metrics.ended(&p.group, false);
                    let key = p.first_msg_key;
                    if table.by_msg_id.get(&key) == Some(&tx_id) {
                        table.by_msg_id.remove(&key);
                    }
                    table.remember_carried(tx_id, p.halves);
                    table.keep_history(tx_id, p.checked);
                }
                if let Some(e) = table.ended.get_mut(&tx_id) {
                    e.offset_conflict = true;
                }
                drop(table);
                self.counters.rolled_back.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(tx_id, ?source, reason = %why, "commit refused for an offset conflict; transaction rolled back");
                Err(WireError::new(
                    ErrorCode::OffsetConflict,
                    format!("transaction {tx_id}: {why}"),
                ))
            }
            Err(Failed(e)) => {
                if let Some(p) = table.pending.get_mut(&tx_id) {
                    p.phase = previous;
                    let due = p.next_check_at;
                    if previous == Phase::Prepared {
                        table.due.insert(tx_id, due);
                    }
                }
                Err(e)
            }
        }
    }

    /// The half messages as stored, internal properties included.
    fn read_halves_raw(&self, halves: Halves) -> Option<Vec<(u32, Message)>> {
        let mut pos = halves.first;
        (0..halves.count)
            .map(|_| {
                let (rec, size) = self.store.read_record_at(pos)?;
                pos += u64::from(size);
                Some((rec.queue, rec.message))
            })
            .collect()
    }

    /// Carries forward the pending transactions whose half messages start
    /// at one of `positions` (segments about to expire): their halves are
    /// re-written at the end of the log, under the same id, with the
    /// transaction's prepare time, check count and parked state, so that
    /// retention proceeds and no transaction is forgotten. One whose halves
    /// are unreadable is rolled back (it can never be committed). A
    /// transaction being checked or ended waits for the next round.
    /// Returns how many were carried.
    pub(crate) async fn carry_forward(&self, positions: &[u64]) -> usize {
        let wanted: std::collections::HashSet<u64> = positions.iter().copied().collect();
        let chosen: Vec<(TxRef, Halves, Carried)> = {
            let mut table = lock(&self.table);
            table
                .pending
                .iter_mut()
                .filter(|(_, p)| {
                    wanted.contains(&{ p.halves.first })
                        && matches!(p.phase, Phase::Prepared | Phase::Parked)
                        && !p.checking
                })
                .map(|(&id, p)| {
                    let parked = p.phase == Phase::Parked;
                    p.phase = Phase::Carrying(parked);
                    let tx = TxRef {
                        id,
                        first_msg_id: self.store.read_msg_id(p.halves.first).unwrap_or_default(),
                        halves_at: p.halves.first,
                    };
                    let state = Carried {
                        parked,
                        prepared_at: p.prepared_at,
                        checks: p.checks,
                        rechecked_at: p.rechecked_at,
                        sent: p
                            .history()
                            .filter(|c| c.sent)
                            .map(|c| (c.at_ms, check_back::answer_flags(c.answer)))
                            .collect(),
                    };
                    (tx, p.halves, state)
                })
                .collect()
        };
        let mut carried = 0;
        for (tx, halves, state) in chosen {
            let Carried {
                parked,
                prepared_at,
                checks,
                rechecked_at,
                sent,
            } = state;
            let restore = |at: Option<u64>| {
                let mut table = lock(&self.table);
                if let Some(p) = table.pending.get_mut(&tx.id) {
                    p.phase = if parked {
                        Phase::Parked
                    } else {
                        Phase::Prepared
                    };
                    if let Some(at) = at {
                        p.halves.first = at;
                    }
                    let due = p.next_check_at;
                    if !parked {
                        table.due.insert(tx.id, due);
                    }
                }
            };
            let Some(mut messages) = self.read_halves_raw(halves) else {
                restore(None);
                tracing::error!(
                    tx_id = tx.id,
                    "half messages of a pending transaction expire unreadable; rolling it back"
                );
                if let Err(e) = self
                    .end(tx.id, TxAction::Rollback, TxSource::Operator, None)
                    .await
                {
                    tracing::warn!(tx_id = tx.id, error = %e, "cannot roll back an unreadable transaction");
                }
                continue;
            };
            if let Some((_, first)) = messages.first_mut() {
                let props = &mut first.properties;
                props.insert(PROP_CARRIED_PREPARED_AT.into(), prepared_at.to_string());
                props.insert(PROP_CARRIED_CHECKS.into(), checks.to_string());
                if rechecked_at > 0 {
                    props.insert(PROP_CARRIED_RECHECKED.into(), rechecked_at.to_string());
                } else {
                    props.remove(PROP_CARRIED_RECHECKED);
                }
                if parked {
                    props.insert(PROP_CARRIED_PARKED.into(), "1".into());
                } else {
                    props.remove(PROP_CARRIED_PARKED);
                }
                // The checks sent go with the old segment (their `TxCheck`
                // records): their times and answers go with the copy, those
                // of earlier runs (from the log) before this run's. The log
                // is looked up only when this run's do not tell them all.
                let earlier = if (checks as usize) > sent.len() && sent.len() < CHECK_HISTORY {
                    self.logged_checks(tx.id, halves.first)
                } else {
                    Vec::new()
                };
                let mut history: Vec<(u64, u16)> = earlier
                    .iter()
                    .map(|c| (c.at_ms, forensics::record_flags(c)))
                    .chain(sent)
                    .collect();
                let extra = history.len().saturating_sub(CHECK_HISTORY);
                history.drain(..extra);
                if history.is_empty() {
                    props.remove(PROP_CARRIED_HISTORY);
                } else {
                    props.insert(
                        PROP_CARRIED_HISTORY.into(),
                        forensics::encode_history(&history),
                    );
                }
            }
            match self.store.carry_transaction(tx, messages).await {
                Ok(at) => {
                    restore(Some(at));
                    carried += 1;
                    tracing::info!(
                        tx_id = tx.id,
                        from = tx.halves_at,
                        to = at,
                        "pending transaction carried forward past retention"
                    );
                }
                Err(e) => {
                    restore(None);
                    tracing::warn!(tx_id = tx.id, error = %e, "cannot carry a pending transaction forward; its segment stays");
                }
            }
        }
        carried
    }

    /// The half messages as they become visible: internal properties removed.
    fn read_halves(&self, halves: Halves) -> Option<Vec<(u32, Message)>> {
        self.read_commit(halves).map(|(messages, _)| messages)
    }

    /// What a commit appends: the half messages as they become visible,
    /// and the consumer offsets the prepare kept on the first one. `None`
    /// when a half message, or the offsets, cannot be read.
    fn read_commit(&self, halves: Halves) -> Option<Commit> {
        let mut pos = halves.first;
        let mut found = Vec::new();
        let messages = (0..halves.count)
            .map(|_| {
                let (rec, size) = self.store.read_record_at(pos)?;
                pos += u64::from(size);
                let mut m = rec.message;
                if let Some(value) = m.properties.remove(offsets::PROP_OFFSETS) {
                    found.extend(offsets::decode(&value)?);
                }
                for p in BROKER_PROPS {
                    m.properties.remove(p);
                }
                Some((rec.queue, m))
            })
            .collect::<Option<Vec<_>>>()?;
        Some((messages, found))
    }

    /// Pending and parked transactions `filter` keeps, oldest first, and
    /// the counters.
    pub(crate) fn list(&self, filter: &ListTransactions) -> TransactionList {
        let now = now_millis();
        let table = lock(&self.table);
        // Half messages are read after the lock is released.
        // The oldest ones only: an answer must fit in a frame; `matching`
        // says how many the filters keep in all. Filtered before the cut,
        // so that one parked among many pending is listed.
        let mut matching = 0u64;
        let unfiltered =
            filter.state.is_none() && filter.group.is_none() && filter.older_than_ms.is_none();
        let entries: Vec<(Halves, TxInfo)> = table
            .pending
            .iter()
            // Without filters the rest need not be looked at (the table's
            // lock is every prepare's and end's).
            .take(if unfiltered { LIST_LIMIT } else { usize::MAX })
            .filter_map(|(&tx_id, p)| {
                let age_ms = now.saturating_sub(p.prepared_at);
                let state = if matches!(p.phase, Phase::Parked | Phase::Carrying(true)) {
                    TxState::Parked
                } else {
                    TxState::Prepared
                };
                let kept = filter.state.is_none_or(|s| s == state)
                    && filter.group.as_deref().is_none_or(|g| *p.group == *g)
                    && filter.older_than_ms.is_none_or(|o| age_ms > o);
                if !kept {
                    return None;
                }
                matching += 1;
                if matching > LIST_LIMIT as u64 {
                    return None;
                }
                let info = TxInfo {
                    tx_id,
                    msg_ids: Vec::new(),
                    topics: Vec::new(),
                    producer_group: p.group.to_string(),
                    age_ms,
                    checks: p.checks,
                    last_check: p.last_check(),
                    last_error: p.last_error().map(str::to_string),
                    state,
                };
                Some((p.halves, info))
            })
            .collect();
        if unfiltered {
            matching = table.pending.len() as u64;
        }
        drop(table);
        let transactions = entries
            .into_iter()
            .map(|(halves, mut info)| {
                for (_, m) in self.read_halves(halves).unwrap_or_default() {
                    info.msg_ids.push(m.msg_id);
                    if !info.topics.contains(&m.topic) {
                        info.topics.push(m.topic);
                    }
                }
                info
            })
            .collect();
        TransactionList {
            broker_name: self.broker_name.clone(),
            transactions,
            counters: self.counters(),
            matching,
        }
    }

    /// The counters now.
    pub(crate) fn counters(&self) -> TxCounters {
        let pending = lock(&self.table).pending.len() as u64;
        let c = &self.counters;
        TxCounters {
            prepared: c.prepared.load(Ordering::Relaxed),
            committed: c.committed.load(Ordering::Relaxed),
            rolled_back: c.rolled_back.load(Ordering::Relaxed),
            checks_sent: c.checks_sent.load(Ordering::Relaxed),
            parked: c.parked.load(Ordering::Relaxed),
            pending,
        }
    }

    /// A transactional producer of `group` connected: if it is the group's
    /// first, its waiting transactions are checked right away.
    pub(crate) fn producer_connected(&self, group: &str, producer: Producer) {
        if self.producers.add(group, producer) {
            let now = now_millis();
            let mut table = lock(&self.table);
            let Table { pending, due, .. } = &mut *table;
            for (&tx_id, p) in pending.iter_mut() {
                if &*p.group == group && p.phase == Phase::Prepared && p.last_error().is_some() {
                    p.next_check_at = p.next_check_at.min(now);
                    due.insert(tx_id, p.next_check_at);
                }
            }
            drop(table);
            self.wake.notify_one();
        }
    }

    /// How long until the next transaction is due for a check, at most
    /// `longest` (also when none is).
    fn until_next_due(&self, now: u64, longest: Duration) -> Duration {
        lock(&self.table).due.next_due().map_or(longest, |at| {
            Duration::from_millis(at.saturating_sub(now)).min(longest)
        })
    }

    /// Ids of the prepared transactions due for a check, marked as being checked.
    fn take_due(&self, now: u64) -> Vec<(u64, GroupName)> {
        let mut table = lock(&self.table);
        let Table { pending, due, .. } = &mut *table;
        // Entries of ended, rescheduled or busy transactions are dropped
        // here (see `due.rs`).
        due.take_due(now)
            .into_iter()
            .filter_map(|tx_id| {
                let p = pending.get_mut(&tx_id)?;
                if p.phase != Phase::Prepared || p.checking || p.next_check_at > now {
                    return None;
                }
                p.checking = true;
                Some((tx_id, p.group.clone()))
            })
            .collect()
    }
}

/// `msg_key` of a known message id; 0 for the default id (not known: a
/// rollback marker written before markers carried the id).
fn known_key(id: &MsgId) -> u64 {
    if *id == MsgId::default() {
        0
    } else {
        msg_key(id)
    }
}

/// Whether `stored`, the first half message of a pending transaction with
/// the same msg id, was stored by this same prepare (a retry). With a token
/// the token decides; without one (an older client) the content does.
fn same_attempt(stored: &Message, attempt: Option<u64>, first: &Message) -> bool {
    let stored_attempt = stored
        .properties
        .get(PROP_ATTEMPT)
        .and_then(|a| a.parse::<u64>().ok());
    match attempt {
        Some(a) => stored_attempt == Some(a),
        None => {
            stored_attempt.is_none()
                && stored.topic == first.topic
                && stored.key == first.key
                && stored.tag == first.tag
                && stored.body == first.body
        }
    }
}

/// The 8-byte key of a message id in `Table::by_msg_id`.
fn msg_key(id: &MsgId) -> u64 {
    txmq_protocol::fnv1a(&id.0)
}

fn final_state(action: TxAction) -> TxState {
    match action {
        TxAction::Commit => TxState::Committed,
        TxAction::Rollback => TxState::RolledBack,
    }
}

/// Puts a transaction as recovery (or replication) found it in the table.
fn insert_recovered(table: &mut Table, store: &Store, config: &TxConfig, t: RecoveredTx) {
    let tx_id = t.tx_id;
    if let Some(pending) = recovered_entry(table, store, config, t) {
        table.pending.insert(tx_id, pending);
    }
}

/// The table's entry for a recovered (or replicated) pending transaction,
/// indexed by its first message id and due time; `None` when it has no
/// half message yet.
fn recovered_entry(
    table: &mut Table,
    store: &Store,
    config: &TxConfig,
    t: RecoveredTx,
) -> Option<Pending> {
    let (pos, size) = t.first_half?;
    let halves = Halves {
        first: pos,
        count: t.halves,
    };
    let Some(first) = store.read_record(pos, size) else {
        // Kept, parked and listed, so that the store's pending set
        // and this table agree: an operator can roll it back, and
        // retention rolls it back when its segment expires (it can
        // never be committed).
        tracing::error!(
            tx_id = t.tx_id,
            "half message of a pending transaction is unreadable; parked for an operator"
        );
        return Some(Pending {
            group: table.group(""),
            first_msg_key: 0,
            halves,
            prepared_at: t.prepared_at,
            next_check_at: u64::MAX,
            checks: t.checks,
            checked: Some(Box::new(Checked {
                last_error: Some("its half message is unreadable (damaged log)".into()),
                ..Checked::default()
            })),
            phase: Phase::Parked,
            checking: false,
            rechecked_at: t.rechecked_at,
        });
    };
    table
        .by_msg_id
        .entry(msg_key(&first.message.msg_id))
        .or_insert(t.tx_id);
    let props = &first.message.properties;
    let group = table.group(props.get(PROP_PRODUCER_GROUP).map_or("", String::as_str));
    let delay = props
        .get(PROP_CHECK_DELAY)
        .and_then(|d| d.parse::<u64>().ok())
        .unwrap_or(config.timeout.as_millis() as u64);
    let next_check_at = if t.checks == 0 {
        t.prepared_at.saturating_add(delay)
    } else {
        t.last_check_at + config.check_interval.as_millis() as u64
    };
    if !t.parked {
        table.due.insert(t.tx_id, next_check_at);
    }
    Some(Pending {
        group,
        first_msg_key: known_key(&first.message.msg_id),
        halves,
        prepared_at: t.prepared_at,
        next_check_at,
        checks: t.checks,
        phase: if t.parked {
            Phase::Parked
        } else {
            Phase::Prepared
        },
        checking: false,
        rechecked_at: t.rechecked_at,
        // Its last answer, for `tx list` (`tx show` reads the history
        // from the log).
        checked: check_back::flags_answer(t.last_answer).ok().map(|answer| {
            Box::new(Checked {
                last_check: Some(answer),
                ..Checked::default()
            })
        }),
    })
}

/// What a commit appends: the visible messages (real queue, message) and
/// the consumer offsets committed with them.
type Commit = (Vec<(u32, Message)>, Vec<TxOffset>);

/// Why an end failed: the store refused it, or (a commit) its offsets
/// conflicted and the transaction was rolled back instead.
enum EndFailure {
    Failed(WireError),
    Conflict(String),
}
use EndFailure::{Conflict, Failed};

/// The answer to an end of a transaction that already ended as `ended`.
fn ended_again_tx(tx_id: u64, ended: EndedTx, action: TxAction) -> Result<Ended, WireError> {
    if ended.offset_conflict && action == TxAction::Commit {
        return Err(WireError::new(
            ErrorCode::OffsetConflict,
            format!(
                "transaction {tx_id} was rolled back: its consumer offsets conflicted when it was committed"
            ),
        ));
    }
    ended_again(tx_id, ended.committed, action)
}

fn ended_again(tx_id: u64, committed: bool, action: TxAction) -> Result<Ended, WireError> {
    match (committed, action) {
        (true, TxAction::Commit) => Ok(Ended::new(TxState::Committed, true, SendStatus::SendOk)),
        (false, TxAction::Rollback) => {
            Ok(Ended::new(TxState::RolledBack, true, SendStatus::SendOk))
        }
        (false, TxAction::Commit) => Err(WireError::new(
            ErrorCode::TransactionRolledBack,
            format!("transaction {tx_id} was rolled back; it cannot be committed"),
        )),
        (true, TxAction::Rollback) => Err(WireError::new(
            ErrorCode::TransactionCommitted,
            format!("transaction {tx_id} was committed; it cannot be rolled back"),
        )),
    }
}

/// For the check-back module: read access to what it needs.
impl Transactions {
    /// The group, the checks sent, the checks that count against the
    /// maximum (those since the last recheck) and the messages.
    fn check_request(&self, tx_id: u64) -> Option<(GroupName, u32, u32, Vec<Message>)> {
        let (group, checks, counted, halves) = {
            let table = lock(&self.table);
            let p = table.pending.get(&tx_id)?;
            (
                p.group.clone(),
                p.checks,
                p.checks.saturating_sub(p.rechecked_at),
                p.halves,
            )
        };
        // Read after the lock is released.
        let messages = self
            .read_halves(halves)?
            .into_iter()
            .map(|(_, m)| m)
            .collect();
        Some((group, checks, counted, messages))
    }

    /// Records a check's outcome; `sent` says whether it reached the
    /// producer. Returns the checks that count against the maximum.
    fn check_done(
        &self,
        tx_id: u64,
        sent: bool,
        answer: Option<TxResolution>,
        error: Option<String>,
    ) -> u32 {
        let now = now_millis();
        let mut table = lock(&self.table);
        let Some(p) = table.pending.get_mut(&tx_id) else {
            return 0;
        };
        p.checking = false;
        if sent {
            p.checks += 1;
        }
        if sent || error.is_some() {
            let history = &mut p.checked.get_or_insert_with(Box::default).history;
            match history.back_mut() {
                // The same failure again: one entry, counted.
                Some(last) if !sent && !last.sent && last.error == error => {
                    last.at_ms = now;
                    last.times = last.times.saturating_add(1);
                }
                _ => {
                    if history.len() >= CHECK_HISTORY {
                        history.pop_front();
                    }
                    history.push_back(CheckRecord {
                        at_ms: now,
                        sent,
                        answer,
                        error: error.clone(),
                        times: 1,
                    });
                }
            }
        }
        if answer.is_some() || error.is_some() {
            let checked = p.checked.get_or_insert_with(Box::default);
            if answer.is_some() {
                checked.last_check = answer;
            }
            checked.last_error = error.map(String::into_boxed_str);
        } else if let Some(checked) = p.checked.as_mut() {
            checked.last_error = None;
        }
        p.next_check_at = now + self.config.check_interval.as_millis() as u64;
        let (checks, due, prepared) = (
            p.checks.saturating_sub(p.rechecked_at),
            p.next_check_at,
            p.phase == Phase::Prepared,
        );
        if prepared {
            table.due.insert(tx_id, due);
        }
        checks
    }

    /// A pending transaction as its markers name it.
    fn tx_ref(&self, tx_id: u64) -> Option<TxRef> {
        lock(&self.table).pending.get(&tx_id).map(|p| TxRef {
            id: tx_id,
            first_msg_id: self.store.read_msg_id(p.halves.first).unwrap_or_default(),
            halves_at: p.halves.first,
        })
    }

    fn park(&self, tx_id: u64) {
        let mut table = lock(&self.table);
        if let Some(p) = table.pending.get_mut(&tx_id) {
            if p.phase == Phase::Prepared {
                p.phase = Phase::Parked;
                self.counters.parked.fetch_add(1, Ordering::Relaxed);
                self.metrics.parked(&p.group);
                tracing::warn!(tx_id, group = %p.group, checks = p.checks, "transaction parked after the maximum number of checks; resolve it with txmq tx resolve");
            }
        }
    }
}

/// One producer group's transactions now (the metrics' gauges).
pub(crate) struct GroupPending {
    pub(crate) group: GroupName,
    /// Prepared, not parked.
    pub(crate) pending: u64,
    pub(crate) parked: u64,
    /// When the oldest pending (not parked) one was prepared (ms).
    pub(crate) oldest_prepared_at: Option<u64>,
}

impl Transactions {
    /// Counts the pending table by producer group: one pass under the
    /// lock, at scrape time only.
    pub(crate) fn pending_by_group(&self) -> Vec<GroupPending> {
        let mut by: HashMap<GroupName, GroupPending> = HashMap::new();
        let table = lock(&self.table);
        for p in table.pending.values() {
            let g = by.entry(p.group.clone()).or_insert_with(|| GroupPending {
                group: p.group.clone(),
                pending: 0,
                parked: 0,
                oldest_prepared_at: None,
            });
            if matches!(p.phase, Phase::Parked | Phase::Carrying(true)) {
                g.parked += 1;
            } else {
                g.pending += 1;
                g.oldest_prepared_at = Some(
                    g.oldest_prepared_at
                        .map_or(p.prepared_at, |o| o.min(p.prepared_at)),
                );
            }
        }
        // Groups seen this run stay listed at 0 once their last one ended.
        for name in table.groups.values() {
            by.entry(name.clone()).or_insert_with(|| GroupPending {
                group: name.clone(),
                pending: 0,
                parked: 0,
                oldest_prepared_at: None,
            });
        }
        drop(table);
        let mut all: Vec<GroupPending> = by.into_values().collect();
        all.sort_by(|a, b| a.group.cmp(&b.group));
        all
    }
}

/// What a transaction's carried copy says of its state.
struct Carried {
    parked: bool,
    prepared_at: u64,
    checks: u32,
    rechecked_at: u32,
    /// The checks sent in this run, oldest first: (time, answer as a
    /// `TxCheck` record's flags).
    sent: Vec<(u64, u16)>,
}

/// What ending a transaction of producer group `group` with messages of
/// `topics` needs of a producer's user: the group's `tx` and `pub` on each
/// topic. An end the producer sends and a check-back's answer (which ends
/// it too) need the same.
pub(crate) fn end_ops<'a>(
    group: &'a str,
    topics: &'a [String],
) -> impl Iterator<Item = txmq_remoting::Op<'a>> {
    std::iter::once(txmq_remoting::Op::Tx(group))
        .chain(topics.iter().map(|t| txmq_remoting::Op::Pub(t)))
}

/// The topics of `messages`, each once.
pub(crate) fn topics_of<'a>(messages: impl Iterator<Item = &'a Message>) -> Vec<String> {
    let mut topics: Vec<String> = Vec::new();
    for m in messages {
        if !topics.contains(&m.topic) {
            topics.push(m.topic.clone());
        }
    }
    topics
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreConfig;

    /// A million pending transactions are a million of these: keep them
    /// small (each slot of the pending map also holds the tx id).
    #[test]
    fn a_pending_transaction_stays_small() {
        let size = std::mem::size_of::<Pending>();
        println!("Pending: {size} bytes");
        assert!(size <= 64, "Pending grew to {size} bytes");
        // Recovery converts its transactions into these in place, which
        // std does only while both slots have the same layout.
        type TableSlot = Option<(u64, Pending)>;
        type RecoveredSlot = Option<(u64, RecoveredTx)>;
        assert_eq!(
            (
                std::mem::size_of::<TableSlot>(),
                std::mem::align_of::<TableSlot>()
            ),
            (
                std::mem::size_of::<RecoveredSlot>(),
                std::mem::align_of::<RecoveredSlot>()
            ),
            "a table slot and a recovered slot must stay the same size"
        );
    }

    fn config() -> TxConfig {
        TxConfig {
            timeout: Duration::from_secs(60),
            check_interval: Duration::from_secs(60),
            check_max: 3,
            check_rate: 100,
            check_timeout: Duration::from_secs(1),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn identical_ends_racing_write_once_and_contradicting_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = StoreConfig::new(dir.path());
        c.segment_size = 1 << 20;
        c.max_message_size = 64 * 1024;
        let store = Store::open(c, &[("t".to_string(), 1)]).unwrap();
        let tx = Arc::new(Transactions::new(
            store.clone(),
            config(),
            "b".into(),
            Default::default(),
        ));
        for round in 0..20 {
            let (id, _, _) = tx
                .prepare(
                    "pg",
                    None,
                    None,
                    vec![(0, Message::new("t", format!("m{round}")))],
                    None,
                )
                .await
                .unwrap();
            let ends: Vec<_> = (0..4)
                .map(|_| {
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        tx.end(id, TxAction::Commit, TxSource::Producer, None).await
                    })
                })
                .collect();
            let mut fresh = 0;
            for e in ends {
                let ended = e.await.unwrap().unwrap();
                assert_eq!(ended.state, TxState::Committed);
                fresh += usize::from(!ended.already);
            }
            assert_eq!(fresh, 1, "exactly one end wrote the commit");
            let err = tx
                .end(id, TxAction::Rollback, TxSource::Operator, None)
                .await
                .unwrap_err();
            assert_eq!(err.code, ErrorCode::TransactionCommitted);
        }
        let r = store.read("t", 0, 0, 100, 1 << 20).unwrap();
        assert_eq!(r.messages.len(), 20, "each transaction visible once");
        store.shutdown().await;
    }

    /// A transaction table over `store` with one transaction of group
    /// `pg` prepared: `message` on queue 0. The table and the id.
    async fn one_pending(store: &Store, message: Message) -> (Transactions, u64) {
        let tx = Transactions::new(store.clone(), config(), "b".into(), Default::default());
        let (id, _, _) = tx
            .prepare("pg", None, Some(1), vec![(0, message)], None)
            .await
            .unwrap();
        (tx, id)
    }

    /// A store of topic `t` whose segments expire at once (retention zero).
    fn expiring_store(dir: &std::path::Path) -> Store {
        let mut c = StoreConfig::new(dir);
        c.segment_size = 1 << 20;
        c.max_message_size = 64 * 1024;
        c.retention = Duration::ZERO;
        Store::open(c, &[("t".to_string(), 1)]).unwrap()
    }

    /// One stuck transaction no longer pins the log: when its segment
    /// expires it is carried forward (same id, its checks and parked state),
    /// retention deletes the old segments, and the transaction survives a
    /// restart and can still be committed, once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stuck_transaction_is_carried_forward_and_retention_proceeds() {
        let dir = tempfile::tempdir().unwrap();
        let open = || expiring_store(dir.path());
        let store = open();
        let (tx, stuck) = one_pending(&store, Message::new("t", "stuck")).await;
        {
            // Two checks counted, then parked.
            let mut table = lock(&tx.table);
            let p = table.pending.get_mut(&stuck).unwrap();
            p.checks = 2;
            p.phase = Phase::Parked;
        }
        for i in 0..60 {
            store
                .append(
                    "t",
                    0,
                    vec![Message::new("t", vec![b'x'; 60_000]).with_key(format!("{i}"))],
                )
                .await
                .unwrap();
        }
        assert_eq!(
            store.enforce_retention().unwrap(),
            0,
            "pinned by the stuck transaction"
        );
        let expiring = store.expiring_halves();
        assert_eq!(expiring, vec![stuck]);
        assert_eq!(tx.carry_forward(&expiring).await, 1);
        assert!(
            store.enforce_retention().unwrap() >= 3,
            "retention proceeds"
        );
        assert!(store.expiring_halves().is_empty());
        let listed = tx.list(&ListTransactions::default()).transactions;
        assert_eq!(listed.len(), 1);
        assert_eq!(
            (listed[0].tx_id, listed[0].checks, listed[0].state),
            (stuck, 2, TxState::Parked)
        );
        assert_eq!(listed[0].topics, vec!["t".to_string()]);
        store.shutdown().await;

        // After a restart: the same transaction, nothing else, and the
        // store's pending set agrees with the table.
        let store = open();
        let recovered = store.take_recovered_transactions().unwrap_or_default();
        let tx = Transactions::new(store.clone(), config(), "b".into(), recovered);
        let listed = tx.list(&ListTransactions::default()).transactions;
        assert_eq!(listed.len(), 1);
        assert_eq!(
            (listed[0].tx_id, listed[0].checks, listed[0].state),
            (stuck, 2, TxState::Parked)
        );
        assert_eq!(store.pending_halves(), 1);
        let ended = tx
            .end(stuck, TxAction::Commit, TxSource::Operator, None)
            .await
            .unwrap();
        assert_eq!(ended.state, TxState::Committed);
        assert_eq!(store.pending_halves(), 0);
        // After the 60 fillers (whose segments have expired).
        let r = store.read("t", 0, 60, 1000, 64 << 20).unwrap();
        let stuck_bodies = r
            .messages
            .iter()
            .filter(|m| &m.message.body[..] == b"stuck")
            .count();
        assert_eq!(stuck_bodies, 1, "committed once");
        let visible = r
            .messages
            .iter()
            .find(|m| &m.message.body[..] == b"stuck")
            .unwrap();
        assert!(
            !visible
                .message
                .properties
                .keys()
                .any(|k| k.starts_with("__txmq")),
            "no internal property leaks: {:?}",
            visible.message.properties
        );
        store.shutdown().await;
    }

    /// A transaction carried forward keeps what `tx show` shows: the
    /// checks sent before the carry (their records go with the old
    /// segment) with their times and answers, across restarts, and once it
    /// ended its group, prepare time and half messages (the carried copy).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_carried_transaction_keeps_its_forensics_across_restarts_and_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let open = || expiring_store(dir.path());
        let store = open();
        let (tx, id) = one_pending(&store, Message::new("t", "carried").with_key("k")).await;
        // Two checks that reached the producer, answered "unknown", then
        // one that could not be sent.
        for answer in [Some(TxResolution::Unknown), None] {
            let r = tx.tx_ref(id).unwrap();
            let flags = check_back::answer_flags(answer);
            store
                .transaction_marker_flagged(RecordKind::TxCheck, r, flags)
                .await
                .unwrap();
            tx.check_done(
                id,
                true,
                answer,
                answer.is_none().then(|| "timed out".into()),
            );
        }
        tx.check_done(id, false, None, Some("no producer".into()));
        let prepared_at = tx.show(id).unwrap().prepared_at_ms;
        let sent = |d: &txmq_protocol::TxDetail| -> Vec<(u64, Option<TxResolution>)> {
            d.history
                .iter()
                .filter(|c| c.sent)
                .map(|c| (c.at_ms, c.answer))
                .collect()
        };
        let before = sent(&tx.show(id).unwrap());
        assert_eq!(before.len(), 2);
        for i in 0..60 {
            store
                .append(
                    "t",
                    0,
                    vec![Message::new("t", vec![b'x'; 60_000]).with_key(format!("{i}"))],
                )
                .await
                .unwrap();
        }
        let expiring = store.expiring_halves();
        assert_eq!(expiring, vec![id]);
        assert_eq!(tx.carry_forward(&expiring).await, 1);
        assert!(store.enforce_retention().unwrap() >= 3);
        assert!(store.read_record_at(id).is_none(), "the old copy is gone");
        let d = tx.show(id).unwrap();
        assert_eq!(d.history.len(), 3, "this run's, unsent too: {d:?}");
        assert_eq!(sent(&d), before);
        store.shutdown().await;

        for round in 0..2 {
            let store = open();
            let recovered = store.take_recovered_transactions().unwrap_or_default();
            let tx = Transactions::new(store.clone(), config(), "b".into(), recovered);
            let d = tx.show(id).unwrap();
            assert_eq!(d.producer_group.as_deref(), Some("pg"), "{round}: {d:?}");
            assert_eq!(d.prepared_at_ms, prepared_at, "{round}: {d:?}");
            assert_eq!(d.messages.len(), 1, "{round}: {d:?}");
            assert_eq!(&d.messages[0].message.body[..], b"carried");
            assert!(
                d.messages[0]
                    .message
                    .properties
                    .keys()
                    .all(|k| !k.starts_with("__txmq")),
                "{d:?}"
            );
            // The two checks sent, with their times and answers, from
            // the carried copy (their records went with the old segment).
            let shown = sent(&d);
            assert_eq!(
                shown.iter().map(|c| c.1).collect::<Vec<_>>(),
                vec![Some(TxResolution::Unknown), None],
                "{round}: {d:?}"
            );
            assert_eq!(shown, before, "{round}: the times too");
            if round == 0 {
                let ended = tx
                    .end(id, TxAction::Commit, TxSource::Operator, None)
                    .await
                    .unwrap();
                assert_eq!(ended.state, TxState::Committed);
                let d = tx.show(id).unwrap();
                assert_eq!(d.state, TxState::Committed);
                assert_eq!(d.producer_group.as_deref(), Some("pg"), "{d:?}");
                assert_eq!(d.prepared_at_ms, prepared_at, "{d:?}");
                assert_eq!(d.messages.len(), 1, "{d:?}");
                assert_eq!(sent(&d).len(), 2, "{d:?}");
                assert_eq!(tx.producer_group(id).as_deref(), Some("pg"));
            } else {
                assert_eq!(d.state, TxState::Committed, "ended before the restart");
            }
            store.shutdown().await;
        }
    }

    /// A pending transaction whose half message is damaged is listed
    /// (parked, with the reason), the store's pending set agrees, and when
    /// its segment expires it is rolled back, so retention proceeds.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unreadable_pending_transaction_is_listed_and_rolled_back_at_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let open = || expiring_store(dir.path());
        let store = open();
        let (_tx, stuck) = one_pending(&store, Message::new("t", "stuck")).await;
        let (_, size) = store.read_record_at(stuck).unwrap();
        store.shutdown().await;
        // A clean restart: the checkpoint moves to the next segment.
        open().shutdown().await;
        // Damage the half message's last byte (its body), in a segment an
        // earlier run verified.
        let segment = dir.path().join("commitlog").join(format!("{:020}", 0));
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(segment)
            .unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, b"?", stuck + u64::from(size) - 1).unwrap();
        drop(f);

        let store = open();
        let recovered = store.take_recovered_transactions().unwrap_or_default();
        let tx = Transactions::new(store.clone(), config(), "b".into(), recovered);
        let listed = tx.list(&ListTransactions::default()).transactions;
        assert_eq!(listed.len(), 1, "listed, not forgotten");
        assert_eq!((listed[0].tx_id, listed[0].state), (stuck, TxState::Parked));
        assert!(listed[0]
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("unreadable"));
        assert_eq!(store.pending_halves(), 1, "the store agrees");
        let err = tx
            .end(stuck, TxAction::Commit, TxSource::Operator, None)
            .await
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::Internal, "{err}");
        store
            .append("t", 0, vec![Message::new("t", vec![b'x'; 60_000])])
            .await
            .unwrap();
        let expiring = store.expiring_halves();
        assert_eq!(expiring, vec![stuck]);
        assert_eq!(tx.carry_forward(&expiring).await, 0);
        assert!(
            tx.list(&ListTransactions::default())
                .transactions
                .is_empty(),
            "rolled back"
        );
        assert_eq!(store.pending_halves(), 0);
        assert!(
            store.enforce_retention().unwrap() >= 1,
            "retention proceeds"
        );
        store.shutdown().await;
    }

    /// A rollback that meets a commit being written is answered only once
    /// the commit is durable: under sync flush, the committed message is
    /// readable when the refusal comes (it was answered at once before,
    /// and would have been false had the commit's write failed).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_contradicting_end_is_answered_only_once_the_first_is_durable() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = StoreConfig::new(dir.path());
        c.segment_size = 1 << 20;
        c.max_message_size = 64 * 1024;
        c.flush = crate::FlushMode::Sync;
        let store = Store::open(c, &[("t".to_string(), 1)]).unwrap();
        let tx = Arc::new(Transactions::new(
            store.clone(),
            config(),
            "b".into(),
            Default::default(),
        ));
        let mut refused = 0;
        for round in 0..20u64 {
            let (id, _, _) = tx
                .prepare(
                    "pg",
                    None,
                    Some(round),
                    vec![(0, Message::new("t", format!("m{round}")))],
                    None,
                )
                .await
                .unwrap();
            let commit = {
                let tx = tx.clone();
                tokio::spawn(
                    async move { tx.end(id, TxAction::Commit, TxSource::Producer, None).await },
                )
            };
            // Wait until the commit is being written.
            while !matches!(
                lock(&tx.table).pending.get(&id).map(|p| p.phase),
                Some(Phase::Ending(..)) | None
            ) {
                tokio::task::yield_now().await;
            }
            let answer = tx
                .end(id, TxAction::Rollback, TxSource::Operator, None)
                .await;
            if let Err(e) = &answer {
                assert_eq!(e.code, ErrorCode::TransactionCommitted, "{e}");
                let r = store.read("t", 0, round, 1, 1 << 20).unwrap();
                assert_eq!(r.messages.len(), 1, "refused before the commit was durable");
                refused += 1;
            }
            assert_eq!(commit.await.unwrap().unwrap().state, TxState::Committed);
        }
        assert!(refused > 0, "no rollback met a commit being written");
        store.shutdown().await;
    }
}
