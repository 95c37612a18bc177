//! Answering check-backs: the [`Service`] a transaction producer puts on
//! each of its broker connections.
//!
//! Each check runs the listener's [`check`](TransactionListener::check) on
//! a task of its own, so checks run concurrently, a slow one holds up
//! nothing else on the connection, and a panicking listener costs one
//! answer ([`TransactionState::Unknown`]) instead of the connection.
//!
//! The broker says how long it waits for an answer (`timeout_ms`); an
//! answer after that is thrown away. So a check is answered within the
//! broker's time (`Unknown` when the listener is not done by then), and a
//! listener that decides later still counts: its commit or rollback is sent
//! as an end of the transaction over the same connection, as RocketMQ's
//! producers answer checks.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::task_tracker::TaskTrackerToken;
use txmq_protocol::{
    CheckAnswer, CheckTransaction, EndTransaction, ErrorCode, Request, Response, TxAction,
    TxSource, WireError,
};
use txmq_remoting::connection_types::BoxFuture;
use txmq_remoting::{Connection, Service};

use super::listener::{CheckRequest, TransactionListener, TransactionState};
use crate::drain::Drain;

/// Answers `CheckTransaction` requests with a listener.
pub(crate) struct CheckService<L> {
    pub(crate) listener: Arc<L>,
    pub(crate) group: String,
    /// How long a check may take before it is answered `Unknown`; `None`: no limit.
    pub(crate) timeout: Option<Duration>,
    /// Cancelled when the producer closes: checks still running answer `Unknown`.
    pub(crate) closed: CancellationToken,
    /// The producer's work in flight: a check counts until answered, and
    /// once the producer is closing, new checks are answered `Unknown`.
    pub(crate) drain: Arc<Drain>,
}

impl<L: TransactionListener> Service for CheckService<L> {
    fn call(&self, conn: &Connection, request: Request) -> BoxFuture<Result<Response, WireError>> {
        let check = match request {
            Request::CheckTransaction(check) => check,
            other => {
                let e = WireError::new(
                    ErrorCode::UnsupportedRequest,
                    format!(
                        "a transaction producer does not serve {} requests",
                        other.kind()
                    ),
                );
                return Box::pin(std::future::ready(Err(e)));
            }
        };
        let Ok(in_flight) = self.drain.enter(super::producer::TX_PRODUCER) else {
            tracing::debug!(
                tx_id = check.tx_id,
                "check-back while closing; answering unknown"
            );
            let resolution = TransactionState::Unknown;
            return Box::pin(std::future::ready(Ok(Response::CheckTransaction(
                CheckAnswer { resolution },
            ))));
        };
        let listener = self.listener.clone();
        let group = self.group.clone();
        let timeout = self.timeout;
        let closed = self.closed.clone();
        let peer = conn.peer_addr().to_string();
        // A late decision is work in flight too: `close` waits for it.
        let late = (conn.clone(), in_flight.clone());
        Box::pin(async move {
            let resolution =
                answer(listener, &group, *check, timeout, closed, &peer, Some(late)).await?;
            drop(in_flight);
            Ok(Response::CheckTransaction(CheckAnswer { resolution }))
        })
    }
}

/// How long after a check arrives it is answered at the latest, when the
/// broker waits `broker_ms`: a margin for the way back.
fn answer_within(broker_ms: u64) -> Duration {
    Duration::from_millis(broker_ms.saturating_sub((broker_ms / 10).max(20)).max(1))
}

/// Asks the listener about `check`. Everything but a `Commit` or `Rollback`
/// it returns in time (an error, a panic, the timeout, the producer
/// closing, a check for another group) is `Unknown`. When the broker's
/// time runs out first and `late` is given, the listener goes on (up to
/// `timeout` in all) and a commit or rollback it then returns is sent over
/// `late`'s connection as an end of the transaction, holding `late`'s
/// token (the producer's work in flight, which `close` waits for) until
/// then.
///
/// # Errors
/// `BAD_ARGUMENT` for a check that names no message.
pub(crate) async fn answer<L: TransactionListener>(
    listener: Arc<L>,
    group: &str,
    check: CheckTransaction,
    timeout: Option<Duration>,
    closed: CancellationToken,
    peer: &str,
    late: Option<(Connection, TaskTrackerToken)>,
) -> Result<TransactionState, WireError> {
    let tx_id = check.tx_id;
    let broker = check.broker_name.clone();
    let first_msg_id = check.messages.first().map(|m| m.msg_id);
    let started = tokio::time::Instant::now();
    let broker_limit = (check.timeout_ms > 0).then(|| answer_within(check.timeout_ms));
    if check.producer_group != group {
        tracing::warn!(tx_id, %broker, %peer, asked = %check.producer_group, %group,
            "check-back for another producer group; answering unknown");
        return Ok(TransactionState::Unknown);
    }
    let req = CheckRequest::try_from(check)
        .map_err(|e| WireError::new(ErrorCode::BadArgument, e.to_string()))?;
    let mut task = tokio::spawn(async move { listener.check(&req).await });
    let limit = async {
        match timeout {
            Some(t) => tokio::time::sleep(t).await,
            None => std::future::pending().await,
        }
    };
    let broker_gone = async {
        match broker_limit {
            Some(t) if timeout.is_none_or(|own| t < own) => tokio::time::sleep(t).await,
            _ => std::future::pending().await,
        }
    };
    // The JoinHandle is cancel safe: it is polled again or aborted below.
    let joined = tokio::select! {
        j = &mut task => Some(j),
        _ = limit => None,
        _ = closed.cancelled() => None,
        _ = broker_gone => {
            let rest = timeout.map(|t| t.saturating_sub(started.elapsed()));
            match (late, first_msg_id) {
                (Some((conn, in_flight)), Some(msg_id)) => {
                    tracing::info!(tx_id, %broker, "check-back not decided within the broker's time; answering unknown, a later decision ends the transaction");
                    tokio::spawn(async move {
                        end_late(task, rest, closed, conn, tx_id, msg_id).await;
                        drop(in_flight);
                    });
                }
                _ => task.abort(),
            }
            return Ok(TransactionState::Unknown);
        }
    };
    let state = match joined {
        Some(Ok(Ok(state))) => state,
        Some(Ok(Err(e))) => {
            tracing::info!(tx_id, %broker, error = %crate::error::chain(&*e), "check-back failed; answering unknown");
            TransactionState::Unknown
        }
        Some(Err(e)) => {
            tracing::warn!(tx_id, %broker, error = %e, "check-back panicked; answering unknown");
            TransactionState::Unknown
        }
        None => {
            task.abort();
            if !closed.is_cancelled() {
                tracing::warn!(tx_id, %broker, ?timeout, "check-back took too long; answering unknown");
            }
            TransactionState::Unknown
        }
    };
    tracing::debug!(tx_id, %broker, answer = state.name(), "answered check-back");
    Ok(state)
}

/// Waits up to `rest` for a check the broker stopped waiting for, and ends
/// the transaction as it decides (nothing for `Unknown`, an error or a
/// panic: the broker checks again).
async fn end_late(
    mut task: tokio::task::JoinHandle<Result<TransactionState, super::BoxError>>,
    rest: Option<Duration>,
    closed: CancellationToken,
    conn: Connection,
    tx_id: u64,
    msg_id: txmq_protocol::MsgId,
) {
    let limit = async {
        match rest {
            Some(t) => tokio::time::sleep(t).await,
            None => std::future::pending().await,
        }
    };
    let action = tokio::select! {
        j = &mut task => match j {
            Ok(Ok(TransactionState::Commit)) => TxAction::Commit,
            Ok(Ok(TransactionState::Rollback)) => TxAction::Rollback,
            _ => return,
        },
        _ = limit => { task.abort(); return }
        _ = closed.cancelled() => { task.abort(); return }
    };
    let request = EndTransaction {
        producer: None,
        tx_id,
        action,
        source: TxSource::Producer,
        msg_id: Some(msg_id),
    };
    match conn.call(request).await {
        Ok(_) => tracing::info!(
            tx_id,
            ?action,
            "ended the transaction with a check-back's late answer"
        ),
        Err(e) => {
            tracing::info!(tx_id, ?action, error = %crate::error::chain(&e), "cannot end the transaction with a check-back's late answer; the broker checks again")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transaction::{BoxError, TxContext};
    use crate::Message;

    /// Answers from the message body: "commit", "rollback", "fail", "panic", "hang".
    struct ByBody;

    impl TransactionListener for ByBody {
        async fn execute(
            &self,
            _msg: &Message,
            _ctx: &TxContext,
        ) -> Result<TransactionState, BoxError> {
            Ok(TransactionState::Unknown)
        }

        async fn check(&self, req: &CheckRequest) -> Result<TransactionState, BoxError> {
            match &req.message().body()[..] {
                b"commit" => Ok(TransactionState::Commit),
                b"rollback" => Ok(TransactionState::Rollback),
                b"panic" => panic!("listener bug"),
                b"hang" => std::future::pending().await,
                _ => Err("database unavailable".into()),
            }
        }
    }

    fn check(group: &str, body: &'static str) -> CheckTransaction {
        CheckTransaction {
            tx_id: 1,
            broker_name: "broker-a".into(),
            producer_group: group.into(),
            messages: vec![txmq_protocol::Message::new("t", body)],
            checks: 0,
            timeout_ms: 0,
        }
    }

    async fn ask(body: &'static str, timeout: Option<Duration>) -> TransactionState {
        let result = answer(
            Arc::new(ByBody),
            "pg",
            check("pg", body),
            timeout,
            CancellationToken::new(),
            "peer",
            None,
        )
        .await;
        match result {
            Ok(state) => state,
            Err(e) => panic!("unexpected refusal: {e}"),
        }
    }

    #[tokio::test]
    async fn answers_are_passed_on_and_failures_count_as_unknown() {
        let t = Some(Duration::from_secs(5));
        assert_eq!(ask("commit", t).await, TransactionState::Commit);
        assert_eq!(ask("rollback", t).await, TransactionState::Rollback);
        assert_eq!(ask("fail", t).await, TransactionState::Unknown);
        assert_eq!(ask("panic", t).await, TransactionState::Unknown);
    }

    #[tokio::test]
    async fn a_check_that_takes_too_long_is_unknown() {
        assert_eq!(
            ask("hang", Some(Duration::from_millis(50))).await,
            TransactionState::Unknown
        );
    }

    #[tokio::test]
    async fn closing_the_producer_ends_pending_checks() {
        let closed = CancellationToken::new();
        let pending = tokio::spawn(answer(
            Arc::new(ByBody),
            "pg",
            check("pg", "hang"),
            None,
            closed.clone(),
            "peer",
            None,
        ));
        closed.cancel();
        let Ok(Ok(state)) = pending.await else {
            panic!("the check ends with an answer")
        };
        assert_eq!(state, TransactionState::Unknown);
    }

    #[tokio::test]
    async fn foreign_groups_and_empty_checks_are_not_asked() {
        let other = answer(
            Arc::new(ByBody),
            "pg",
            check("other", "commit"),
            None,
            CancellationToken::new(),
            "peer",
            None,
        )
        .await;
        assert_eq!(other.ok(), Some(TransactionState::Unknown));
        let mut empty = check("pg", "commit");
        empty.messages.clear();
        let refused = answer(
            Arc::new(ByBody),
            "pg",
            empty,
            None,
            CancellationToken::new(),
            "peer",
            None,
        )
        .await;
        assert_eq!(refused.err().map(|e| e.code), Some(ErrorCode::BadArgument));
    }
}
