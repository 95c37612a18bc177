//! What an operator asks of one transaction: `tx show` (its half
//! messages, state and check history, or how it ended) and `tx recheck`
//! (un-park it and check it back now).
//!
//! The check history is kept in memory, per transaction, bounded by
//! [`CHECK_HISTORY`]. Each check that reached a producer is also a
//! `TxCheck` record in the log with its answer in the flags; the index
//! finds them by the transaction's first message id, so after a restart
//! (or a failover) `tx show` still lists the checks made before, with their
//! time and answer. A transaction carried forward past retention loses
//! those records with its old segment: its carried copy keeps the checks
//! sent before, with their times and answers (`PROP_CARRIED_HISTORY`), and
//! the records after the copy add to them. Checks that could not be sent
//! are in memory only. A recheck is a `TxRecheck` record: a restart keeps
//! it un-parked.

use txmq_protocol::{
    now_millis, CheckRecord, EndedBy, ErrorCode, MsgId, Rechecked, TxDetail, TxEnding, TxMessage,
    TxState, WireError, CHECK_HISTORY,
};

use super::{check_back, lock, Halves, Phase, Transactions, BROKER_PROPS, PROP_PRODUCER_GROUP};
use crate::handler::store_error;
use crate::store::record::RecordKind;
use crate::store::{PROP_CARRIED_HISTORY, PROP_CARRIED_PREPARED_AT};

/// A check that reached its producer, as its record (or a carried copy)
/// keeps it: its time and its answer as a `TxCheck` record's flags.
fn sent_check(at_ms: u64, flags: u16) -> CheckRecord {
    let answer = check_back::flags_answer(flags);
    CheckRecord {
        at_ms,
        sent: true,
        answer: answer.ok(),
        error: answer.err().map(str::to_string),
        times: 1,
    }
}

/// A sent check's answer as a `TxCheck` record's flags.
pub(super) fn record_flags(check: &CheckRecord) -> u16 {
    check_back::answer_flags(check.answer)
}

/// [`PROP_CARRIED_HISTORY`] for these (time, flags) pairs.
pub(super) fn encode_history(checks: &[(u64, u16)]) -> String {
    let pairs: Vec<String> = checks.iter().map(|(at, f)| format!("{at}:{f}")).collect();
    pairs.join(",")
}

/// The (time, flags) pairs of a [`PROP_CARRIED_HISTORY`]; a pair that does
/// not parse is left out.
fn decode_history(value: &str) -> Vec<(u64, u16)> {
    value
        .split(',')
        .filter_map(|pair| {
            let (at, flags) = pair.split_once(':')?;
            Some((at.parse().ok()?, flags.parse().ok()?))
        })
        .collect()
}

impl Transactions {
    /// Everything known of transaction `tx_id`: pending (prepared or
    /// parked) from the table, ended from what is remembered of it and its
    /// half messages while the log still holds them.
    ///
    /// # Errors
    /// `UNKNOWN_TRANSACTION` when the broker does not know the id.
    pub(crate) fn show(&self, tx_id: u64) -> Result<TxDetail, WireError> {
        let now = now_millis();
        let table = lock(&self.table);
        if let Some(p) = table.pending.get(&tx_id) {
            let state = if matches!(p.phase, Phase::Parked | Phase::Carrying(true)) {
                TxState::Parked
            } else {
                TxState::Prepared
            };
            let mut detail = TxDetail {
                broker_name: self.broker_name.clone(),
                tx_id,
                state,
                producer_group: Some(p.group.to_string()),
                prepared_at_ms: Some(p.prepared_at),
                age_ms: Some(now.saturating_sub(p.prepared_at)),
                checks: p.checks,
                next_check_at_ms: (state == TxState::Prepared).then_some(p.next_check_at),
                messages: Vec::new(),
                history: p.history().cloned().collect(),
                ended: None,
            };
            let halves = p.halves;
            drop(table);
            // Read after the lock is released.
            detail.messages = self.show_halves(halves);
            self.add_earlier_checks(&mut detail, halves.first);
            return Ok(detail);
        }
        let remembered = table.ended.get(&tx_id).copied();
        // The half messages start at the tx id unless they were carried
        // forward (then the id's record is gone or another one).
        let halves_at = table.ended_carried.get(&tx_id).map_or(tx_id, |h| h.first);
        let history = table
            .ended_history
            .get(&tx_id)
            .map(|h| h.iter().cloned().collect())
            .unwrap_or_default();
        drop(table);
        let (committed, by, at) = match remembered {
            Some(e) => (e.committed, e.by, e.at),
            // Ended before this run and outside what recovery read again:
            // the log tells while it holds the transaction's records.
            None => match self.ended_in_log(tx_id) {
                Some(committed) => (committed, EndedBy::Unknown, 0),
                None => {
                    return Err(WireError::new(
                        ErrorCode::UnknownTransaction,
                        format!(
                            "transaction {tx_id} is not known to broker {} (never prepared here, or ended long ago)",
                            self.broker_name
                        ),
                    ))
                }
            },
        };
        let mut detail = TxDetail {
            broker_name: self.broker_name.clone(),
            tx_id,
            state: if committed {
                TxState::Committed
            } else {
                TxState::RolledBack
            },
            producer_group: None,
            prepared_at_ms: None,
            age_ms: None,
            checks: 0,
            next_check_at_ms: None,
            messages: Vec::new(),
            history,
            ended: Some(TxEnding {
                by,
                at_ms: (by != EndedBy::Unknown && at != 0).then_some(at),
            }),
        };
        if let Some((first, _)) = self.store.read_record_at(halves_at) {
            if first.kind == RecordKind::Half && first.aux == tx_id {
                let props = &first.message.properties;
                detail.producer_group = props.get(PROP_PRODUCER_GROUP).cloned();
                let prepared_at = props
                    .get(PROP_CARRIED_PREPARED_AT)
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(first.store_timestamp);
                detail.prepared_at_ms = Some(prepared_at);
                detail.age_ms = Some(now.saturating_sub(prepared_at));
                detail.messages = self.show_halves(Halves {
                    first: halves_at,
                    count: first.flags.max(1),
                });
            }
        }
        self.add_earlier_checks(&mut detail, halves_at);
        detail.checks = detail.history.iter().filter(|c| c.sent).count() as u32;
        Ok(detail)
    }

    /// How a transaction the table does not remember ended (committed:
    /// `true`), from the log while it still holds its records: its first
    /// half message is at the position of its id, and the index finds its
    /// commit copy or its rollback marker by that message's id. `None` when
    /// the log cannot tell (or the id is no transaction's).
    fn ended_in_log(&self, tx_id: u64) -> Option<bool> {
        let (first, _) = self.store.read_record_at(tx_id)?;
        if first.kind != RecordKind::Half || first.aux != tx_id {
            return None;
        }
        let found = self.store.find_by_id(&first.message.msg_id, 64).ok()?;
        found.iter().find_map(|f| match &f.record {
            r if r.aux != tx_id => None,
            r if r.is_commit_copy() => Some(true),
            r if r.kind == RecordKind::TxRollback => Some(false),
            _ => None,
        })
    }

    /// Puts before the history kept in memory the checks made before this
    /// table was made (before a restart, or by the master this broker took
    /// over from), as [`Transactions::logged_checks`] finds them for the
    /// half messages at `halves_at` (not the checks that could not be
    /// sent: those are not recorded).
    fn add_earlier_checks(&self, detail: &mut TxDetail, halves_at: u64) {
        let mut earlier = self.logged_checks(detail.tx_id, halves_at);
        if earlier.is_empty() {
            return;
        }
        earlier.append(&mut detail.history);
        let extra = earlier.len().saturating_sub(CHECK_HISTORY);
        earlier.drain(..extra);
        detail.history = earlier;
    }

    /// The checks of transaction `tx_id` that reached a producer before
    /// this table was made, oldest first (at most [`CHECK_HISTORY`]), from
    /// the log: those its half messages at `halves_at` carried forward
    /// (when they are a carried copy), then its `TxCheck` records after
    /// them, which the index finds by its first message id (none when the
    /// index is switched off).
    pub(super) fn logged_checks(&self, tx_id: u64, halves_at: u64) -> Vec<CheckRecord> {
        let Some((first, _)) = self.store.read_record_at(halves_at) else {
            return Vec::new();
        };
        if first.kind != RecordKind::Half || first.aux != tx_id {
            return Vec::new();
        }
        let before_this_run = |at: u64| at < self.started_at;
        let mut checks: Vec<CheckRecord> = if halves_at == tx_id {
            Vec::new()
        } else {
            first
                .message
                .properties
                .get(PROP_CARRIED_HISTORY)
                .map(|v| decode_history(v))
                .unwrap_or_default()
                .into_iter()
                .filter(|(at, _)| before_this_run(*at))
                .map(|(at, flags)| sent_check(at, flags))
                .collect()
        };
        let id = first.message.msg_id;
        if id != MsgId::default() {
            // Newest first; the index may be switched off (then none).
            // Records before the copy are what it carried.
            let found = self
                .store
                .find_by_id(&id, 8 * CHECK_HISTORY)
                .unwrap_or_default();
            let mut recorded: Vec<CheckRecord> = found
                .into_iter()
                .filter(|f| {
                    f.record.kind == RecordKind::TxCheck
                        && f.record.aux == tx_id
                        && f.pos > halves_at
                        && before_this_run(f.record.store_timestamp)
                })
                .take(CHECK_HISTORY)
                .map(|f| sent_check(f.record.store_timestamp, f.record.flags))
                .collect();
            recorded.reverse();
            checks.append(&mut recorded);
        }
        let extra = checks.len().saturating_sub(CHECK_HISTORY);
        checks.drain(..extra);
        checks
    }

    /// The half messages with the broker's own properties removed (the
    /// user's stay).
    fn show_halves(&self, halves: Halves) -> Vec<TxMessage> {
        self.read_halves_raw(halves)
            .unwrap_or_default()
            .into_iter()
            .map(|(queue, mut message)| {
                message.properties.remove(super::offsets::PROP_OFFSETS);
                for p in BROKER_PROPS {
                    message.properties.remove(p);
                }
                TxMessage { queue, message }
            })
            .collect()
    }

    /// Un-parks a parked transaction, or hurries a prepared one: its next
    /// check is due now, and it gets a fresh allowance of `check_max`
    /// checks before it is parked again. The recheck is recorded in the log
    /// first, so a restart (or the slave taking over) does not park it
    /// again.
    ///
    /// # Errors
    /// `UNKNOWN_TRANSACTION`; `TRANSACTION_COMMITTED` or
    /// `TRANSACTION_ROLLED_BACK` for an ended one; `BUSY` while it is being
    /// ended or carried forward; a failure writing the record.
    pub(crate) async fn recheck(&self, tx_id: u64) -> Result<Rechecked, WireError> {
        self.recheckable(&lock(&self.table), tx_id)?;
        let tx = self.tx_ref(tx_id).ok_or_else(|| self.unknown(tx_id))?;
        self.store
            .transaction_marker(RecordKind::TxRecheck, tx)
            .await
            .map_err(store_error)?;
        let now = now_millis();
        let mut table = lock(&self.table);
        // It may have ended while the record was written: then the record
        // changes nothing either (it names a transaction no longer pending).
        let previous = self.recheckable(&table, tx_id)?;
        let super::Table { pending, due, .. } = &mut *table;
        let Some(p) = pending.get_mut(&tx_id) else {
            return Err(self.unknown(tx_id));
        };
        p.phase = Phase::Prepared;
        p.rechecked_at = p.checks;
        p.next_check_at = now;
        let checks = p.checks;
        if !p.checking {
            due.insert(tx_id, now);
        }
        let group = p.group.clone();
        drop(table);
        self.wake.notify_one();
        tracing::info!(tx_id, %group, ?previous, checks, "transaction rechecked by an operator");
        Ok(Rechecked {
            broker_name: self.broker_name.clone(),
            tx_id,
            previous,
            checks,
        })
    }

    /// The state of a transaction an operator may re-check, or why not.
    fn recheckable(&self, table: &super::Table, tx_id: u64) -> Result<TxState, WireError> {
        if let Some(ended) = table.ended.get(&tx_id) {
            let (code, state) = if ended.committed {
                (ErrorCode::TransactionCommitted, "committed")
            } else {
                (ErrorCode::TransactionRolledBack, "rolled back")
            };
            return Err(WireError::new(
                code,
                format!("transaction {tx_id} was already {state}; there is nothing to check"),
            ));
        }
        match table.pending.get(&tx_id).map(|p| p.phase) {
            None => Err(self.unknown(tx_id)),
            Some(Phase::Parked) => Ok(TxState::Parked),
            Some(Phase::Prepared) => Ok(TxState::Prepared),
            Some(Phase::Ending(..) | Phase::Carrying(_)) => Err(WireError::new(
                ErrorCode::Busy,
                format!("transaction {tx_id} is being ended or moved; try again"),
            )),
        }
    }

    fn unknown(&self, tx_id: u64) -> WireError {
        WireError::new(
            ErrorCode::UnknownTransaction,
            format!(
                "transaction {tx_id} is not known to broker {}",
                self.broker_name
            ),
        )
    }

    /// Pending (prepared or parked) transactions with a half message for
    /// `topic`, or that commit consumed offsets of it, by id.
    pub(crate) fn pending_on_topic(&self, topic: &str) -> Vec<u64> {
        let all: Vec<(u64, Halves)> = lock(&self.table)
            .pending
            .iter()
            .map(|(&id, p)| (id, p.halves))
            .collect();
        // Read after the lock is released.
        all.into_iter()
            .filter(|(_, halves)| {
                // Its messages' topic, or a topic whose consumed offsets
                // it commits (they would land in a topic made again under
                // the name).
                self.read_halves_raw(*halves).is_some_and(|h| {
                    h.iter().any(|(_, m)| {
                        m.topic == topic
                            || m.properties
                                .get(super::offsets::PROP_OFFSETS)
                                .and_then(|v| super::offsets::decode(v))
                                .is_some_and(|o| o.iter().any(|o| o.topic == topic))
                    })
                })
            })
            .map(|(id, _)| id)
            .collect()
    }
}
