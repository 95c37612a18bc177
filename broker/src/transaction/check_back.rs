//! The check-back scheduler.
//!
//! When the next check is due (at least every check interval, and at once
//! when a producer group comes online) it takes the prepared transactions
//! whose next check is due, by the broker's clock, and hands them to one worker per producer group. A worker sends at
//! most `check_rate` checks per second and keeps at most 64 in flight, each
//! over a live connection of the group, round robin, so thousands of
//! pending transactions cause no storm. A check is counted, with a small
//! durable marker record, only once it was sent; after `check_max` counted
//! checks without an answer the transaction is parked for an operator.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use txmq_protocol::{now_millis, CheckTransaction, EndedBy, TxAction, TxResolution, TxSource};
use txmq_remoting::Error as RemotingError;

use super::{Producer, Transactions};
use crate::metrics::CheckOutcome;
use crate::store::record::RecordKind;

/// At most this many checks of one group in flight.
const MAX_IN_FLIGHT: usize = 64;

pub(crate) async fn run(tx: Arc<Transactions>, shutdown: CancellationToken) {
    let mut workers: HashMap<super::GroupName, mpsc::UnboundedSender<u64>> = HashMap::new();
    let mut last_report = (Instant::now(), tx.counters());
    loop {
        // Until the next check is due: a transaction checked at some
        // instant is due again one interval later, not at the tick after.
        let wait = tx.until_next_due(now_millis(), tx.config.check_interval);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = tx.wake.notified() => {}
            _ = shutdown.cancelled() => return,
        }
        // The counters go to the log once a minute when they changed.
        if last_report.0.elapsed() >= Duration::from_secs(60) {
            let now = tx.counters();
            if now != last_report.1 {
                tracing::info!(
                    prepared = now.prepared,
                    committed = now.committed,
                    rolled_back = now.rolled_back,
                    checks_sent = now.checks_sent,
                    parked = now.parked,
                    pending = now.pending,
                    "transaction counters"
                );
            }
            last_report = (Instant::now(), now);
        }
        let due = tx.take_due(now_millis());
        if !due.is_empty() {
            tracing::debug!(due = due.len(), "transactions due for a check");
        }
        for (tx_id, group) in due {
            let sender = workers.entry(group.clone()).or_insert_with(|| {
                let (s, r) = mpsc::unbounded_channel();
                tokio::spawn(group_worker(tx.clone(), r, shutdown.clone()));
                s
            });
            // A worker only stops at shutdown.
            let _ = sender.send(tx_id);
        }
    }
}

async fn group_worker(
    tx: Arc<Transactions>,
    mut due: mpsc::UnboundedReceiver<u64>,
    shutdown: CancellationToken,
) {
    let gap = Duration::from_secs(1) / tx.config.check_rate.max(1);
    let mut next_slot = Instant::now();
    let mut inflight = FuturesUnordered::new();
    loop {
        tokio::select! {
            id = due.recv(), if inflight.len() < MAX_IN_FLIGHT => {
                let Some(id) = id else { break };
                // Each check waits for its own slot inside `inflight`, so
                // the checks already started keep being driven meanwhile
                // (sleeping here would hold them all, and they would then
                // go out in one burst), and the slots stay exactly `gap`
                // apart while there is a backlog (no drift from timer lag).
                let slot = next_slot.max(Instant::now());
                next_slot = slot + gap;
                let tx = tx.clone();
                inflight.push(async move {
                    tokio::time::sleep_until(slot).await;
                    check_one(tx, id).await;
                });
            }
            Some(()) = inflight.next(), if !inflight.is_empty() => {}
            _ = shutdown.cancelled() => break,
        }
    }
}

async fn check_one(tx: Arc<Transactions>, tx_id: u64) {
    let Some((group, checks, counted, messages)) = tx.check_request(tx_id) else {
        let error = "the transaction's half messages are unreadable".to_string();
        tx.check_done(tx_id, false, None, Some(error));
        return;
    };
    if counted >= tx.config.check_max {
        park(&tx, tx_id).await;
        tx.check_done(tx_id, false, None, None);
        return;
    }
    let topics = super::topics_of(messages.iter());
    let Some(producer) = tx.check_back_connection(&group, &topics) else {
        let error = if tx.producers.pick(&group, |_| true).is_some() {
            // Connected, but their users may not end it: say why (it
            // shows in `tx show` and `tx list`).
            format!(
                "producers of group '{group}' are connected, but none whose user may end it \
                 (tx of the group and pub on {})",
                topics.join(", ")
            )
        } else {
            format!("no producer of group '{group}' allowed to answer is connected")
        };
        tx.metrics.check_back(&group, false, CheckOutcome::Failed);
        tx.check_done(tx_id, false, None, Some(error));
        return;
    };
    let request = CheckTransaction {
        tx_id,
        broker_name: tx.broker_name.clone(),
        producer_group: group.to_string(),
        messages,
        checks,
        timeout_ms: tx.config.check_timeout.as_millis() as u64,
    };
    // A connection that closes after the check went out (the producer
    // crashed on it, say) still counts the check: otherwise a check that
    // kills its producer is sent forever and never parks.
    let timeout = tx.config.check_timeout;
    let (closed_before, result) = match producer {
        Producer::Conn(conn) => (
            conn.is_closed(),
            conn.call_with_timeout(request, timeout)
                .await
                .map(|a| a.resolution),
        ),
        Producer::Grpc(session) => (session.is_closed(), session.check(request, timeout).await),
    };
    let timed_out = matches!(result, Err(RemotingError::Timeout { .. }));
    let (sent, answer, error) = match result {
        Ok(resolution) => (true, Some(resolution), None),
        Err(e @ RemotingError::Timeout { .. }) | Err(e @ RemotingError::Remote(_)) => {
            (true, None, Some(e.to_string()))
        }
        Err(e @ RemotingError::Closed { .. }) if !closed_before => (
            true,
            None,
            Some(format!("connection closed after the check was sent: {e}")),
        ),
        Err(e) => (false, None, Some(format!("check not sent: {e}"))),
    };
    tx.metrics.check_back(
        &group,
        sent,
        match answer {
            Some(a) => CheckOutcome::Answered(a),
            None if timed_out => CheckOutcome::TimedOut,
            None => CheckOutcome::Failed,
        },
    );
    if sent {
        tx.counters
            .checks_sent
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let marker = match tx.tx_ref(tx_id) {
            Some(r) => tx
                .store
                .transaction_marker_flagged(RecordKind::TxCheck, r, answer_flags(answer))
                .await
                .map(drop),
            None => Ok(()), // ended meanwhile: nothing to count
        };
        if let Err(e) = marker {
            tracing::warn!(tx_id, error = %e, "cannot record a check");
        }
    }
    let checks = tx.check_done(tx_id, sent, answer, error);
    tracing::debug!(tx_id, %group, checks, ?answer, "checked back");
    let action = match answer {
        Some(TxResolution::Commit) => TxAction::Commit,
        Some(TxResolution::Rollback) => TxAction::Rollback,
        Some(TxResolution::Unknown) | None => {
            if sent && checks >= tx.config.check_max {
                park(&tx, tx_id).await;
            }
            return;
        }
    };
    if let Err(e) = tx
        .end_as(tx_id, action, TxSource::Producer, None, EndedBy::CheckBack)
        .await
    {
        tracing::warn!(tx_id, ?action, error = %e, "cannot end a transaction after its check");
    }
}

async fn park(tx: &Transactions, tx_id: u64) {
    let Some(r) = tx.tx_ref(tx_id) else {
        return;
    };
    match tx.store.transaction_marker(RecordKind::TxPark, r).await {
        Ok(_) => tx.park(tx_id),
        Err(e) => tracing::warn!(tx_id, error = %e, "cannot park a transaction"),
    }
}

/// A check's answer as its `TxCheck` record keeps it.
pub(super) fn answer_flags(answer: Option<TxResolution>) -> u16 {
    use crate::store::record::check_answer;
    match answer {
        None => check_answer::NONE,
        Some(TxResolution::Unknown) => check_answer::UNKNOWN,
        Some(TxResolution::Commit) => check_answer::COMMIT,
        Some(TxResolution::Rollback) => check_answer::ROLLBACK,
    }
}

/// A check's answer from its `TxCheck` record's flags: the answer, or
/// why there is none.
pub(super) fn flags_answer(flags: u16) -> Result<TxResolution, &'static str> {
    use crate::store::record::check_answer;
    match flags {
        check_answer::UNKNOWN => Ok(TxResolution::Unknown),
        check_answer::COMMIT => Ok(TxResolution::Commit),
        check_answer::ROLLBACK => Ok(TxResolution::Rollback),
        check_answer::NONE => Err("no answer (timed out, or the connection failed)"),
        _ => Err("its answer was not recorded"),
    }
}
