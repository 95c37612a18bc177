//! The Telemetry stream: a RocketMQ 5 client's settings, and the way back
//! to it for check-backs.
//!
//! A client opens one stream per endpoint and sends its settings first;
//! the broker answers with the settings it is to use (body size limit,
//! retry policy, consumer batch and polling limits). A producer's stream
//! joins the producer group of each topic it publishes (the group a
//! transactional send prepares under, see `send.rs`), so the check-back
//! scheduler can pick it: a check goes out as a
//! `RecoverOrphanedTransactionCommand`, and the client's
//! `TransactionChecker` answers with an `EndTransaction` whose source is
//! `SOURCE_SERVER_CHECK`, which [`Sessions::answer`] hands to the waiting
//! check. An UNKNOWN answer sends nothing: the check times out, is counted,
//! and comes again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Status};
use txmq_protocol::{CheckTransaction, StoredMessage, TxResolution};
use txmq_remoting::Error as RemotingError;

use super::{convert, pb, status, Front, Stream};
use crate::transaction::Producer;
use crate::BrokerInner;

/// Commands waiting to go to one client.
const OUTBOX: usize = 64;
/// Delivery attempts a consumer group gets before a message goes to its
/// dead-letter topic (RocketMQ's default of 16 retries).
pub(super) const CONSUMER_MAX_ATTEMPTS: i32 = 17;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The live telemetry streams, by client id.
#[derive(Default)]
pub(crate) struct Sessions {
    by_client: Mutex<HashMap<String, Arc<Session>>>,
    next_id: AtomicU64,
}

/// One client's telemetry stream.
pub(crate) struct Session {
    id: u64,
    client_id: String,
    peer: String,
    out: mpsc::Sender<Result<pb::TelemetryCommand, Status>>,
    closed: CancellationToken,
    /// Check-backs sent and not yet answered, by transaction id.
    waiters: Mutex<HashMap<u64, oneshot::Sender<TxResolution>>>,
    /// The producer groups (topics) it joined.
    groups: Mutex<Vec<String>>,
    /// The user it signed in as (`--acl-file`).
    user: Option<String>,
}

impl Session {
    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    /// The user the stream signed in as (`None` without an ACL file).
    pub(crate) fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.is_cancelled() || self.out.is_closed()
    }

    /// Sends a check-back and waits for its answer. Errors as a txmq
    /// connection's would be: not sent (`Closed` before sending), timed
    /// out, or closed after sending.
    pub(crate) async fn check(
        &self,
        req: CheckTransaction,
        timeout: Duration,
    ) -> Result<TxResolution, RemotingError> {
        let closed = || RemotingError::Closed {
            peer: self.peer.clone(),
        };
        let Some(first) = req.messages.into_iter().next() else {
            return Err(RemotingError::Remote(txmq_protocol::WireError::new(
                txmq_protocol::ErrorCode::Internal,
                "a check-back without its message",
            )));
        };
        let stored = StoredMessage {
            message: first,
            queue: 0,
            queue_offset: 0,
            log_offset: req.tx_id,
            store_timestamp: 0,
        };
        let command = pb::TelemetryCommand {
            status: None,
            command: Some(
                pb::telemetry_command::Command::RecoverOrphanedTransactionCommand(
                    pb::RecoverOrphanedTransactionCommand {
                        message: Some(convert::to_rocketmq(
                            &stored,
                            &req.broker_name,
                            pb::MessageType::Transaction,
                        )),
                        transaction_id: req.tx_id.to_string(),
                    },
                ),
            ),
        };
        let (tx, rx) = oneshot::channel();
        lock(&self.waiters).insert(req.tx_id, tx);
        let result = match self.out.try_send(Ok(command)) {
            Err(_) => Err(closed()),
            Ok(()) => match tokio::time::timeout(timeout, rx).await {
                Ok(Ok(resolution)) => Ok(resolution),
                Ok(Err(_)) => Err(closed()),
                Err(_) => Err(RemotingError::Timeout {
                    kind: "RecoverOrphanedTransactionCommand",
                    peer: self.peer.clone(),
                    after: timeout,
                }),
            },
        };
        lock(&self.waiters).remove(&req.tx_id);
        result
    }
}

impl Sessions {
    /// Hands a check-back's answer to the check waiting for it; false when
    /// none waits (it timed out, or the broker restarted since).
    pub(super) fn answer(&self, client: Option<&str>, tx_id: u64, r: TxResolution) -> bool {
        let sessions: Vec<Arc<Session>> = {
            let all = lock(&self.by_client);
            match client.and_then(|c| all.get(c)) {
                Some(s) => vec![s.clone()],
                None => all.values().cloned().collect(),
            }
        };
        sessions.iter().any(|s| {
            lock(&s.waiters)
                .remove(&tx_id)
                .is_some_and(|w| w.send(r).is_ok())
        })
    }

    /// The client said goodbye (NotifyClientTermination), as `user`: a
    /// stream of another user's is left alone.
    pub(super) fn terminated(&self, b: &BrokerInner, client: &str, user: Option<&str>) {
        let session = {
            let mut all = lock(&self.by_client);
            match all.get(client) {
                Some(s) if s.user() == user => all.remove(client),
                _ => None,
            }
        };
        if let Some(s) = session {
            s.closed.cancel();
            leave_groups(b, &s);
        }
    }
}

fn leave_groups(b: &BrokerInner, s: &Session) {
    for group in lock(&s.groups).drain(..) {
        b.transactions.producers.remove_session(&group, s.id);
    }
}

/// Opens a client's telemetry stream.
pub(super) fn open(
    f: &Front,
    r: Request<tonic::Streaming<pb::TelemetryCommand>>,
    user: Option<String>,
) -> Result<Stream<pb::TelemetryCommand>, Status> {
    let client_id = super::client_id(&r).ok_or_else(|| {
        Status::invalid_argument("a telemetry stream needs the x-mq-client-id header")
    })?;
    let peer = r
        .extensions()
        .get::<super::incoming::Peer>()
        .and_then(|p| p.addr)
        .map(|a| a.to_string())
        .unwrap_or_else(|| client_id.clone());
    let mut inbound = r.into_inner();
    let (out, outbox) = mpsc::channel(OUTBOX);
    let session = Arc::new(Session {
        id: f.sessions.next_id.fetch_add(1, Ordering::Relaxed),
        client_id: client_id.clone(),
        peer,
        out,
        closed: CancellationToken::new(),
        waiters: Mutex::default(),
        groups: Mutex::default(),
        user,
    });
    {
        // A client id is one client's: another user's stream does not
        // replace its stream (nor take its check-backs).
        let mut all = lock(&f.sessions.by_client);
        if let Some(old) = all.get(&client_id) {
            if old.user != session.user {
                return Err(Status::permission_denied(format!(
                    "client id '{}' is in use by another user's telemetry stream",
                    txmq_remoting::shown_key(&client_id)
                )));
            }
        }
        if let Some(old) = all.insert(client_id, session.clone()) {
            old.closed.cancel();
        }
    }
    let b = f.b.clone();
    let sessions = f.sessions.clone();
    tokio::spawn(async move {
        loop {
            let command = tokio::select! {
                c = inbound.message() => c,
                _ = session.closed.cancelled() => break,
                _ = session.out.closed() => break,
                _ = b.shutdown.cancelled() => break,
            };
            match command {
                Ok(Some(c)) => on_command(&b, &session, c).await,
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(client = %session.client_id, error = %e, "telemetry stream failed");
                    // The call ends with the reason (a message cut off by
                    // the frame timeout, say), not with OK.
                    let _ = session.out.try_send(Err(e));
                    break;
                }
            }
        }
        session.closed.cancel();
        {
            let mut all = lock(&sessions.by_client);
            if all
                .get(&session.client_id)
                .is_some_and(|s| s.id == session.id)
            {
                all.remove(&session.client_id);
            }
        }
        leave_groups(&b, &session);
    });
    Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(
        outbox,
    )))
}

async fn on_command(b: &Arc<BrokerInner>, s: &Arc<Session>, c: pb::TelemetryCommand) {
    use pb::telemetry_command::Command;
    match c.command {
        Some(Command::Settings(settings)) => {
            if let Some(pb::settings::PubSub::Publishing(p)) = &settings.pub_sub {
                join_groups(b, s, p);
            }
            let reply = pb::TelemetryCommand {
                status: Some(status::ok()),
                command: Some(Command::Settings(server_settings(b, settings))),
            };
            let _ = s.out.send(Ok(reply)).await;
        }
        Some(other) => {
            tracing::trace!(client = %s.client_id, command = ?std::mem::discriminant(&other), "telemetry command ignored");
        }
        None => {}
    }
}

/// A producer joins the producer group of each topic it publishes.
fn join_groups(b: &BrokerInner, s: &Arc<Session>, p: &pb::Publishing) {
    let mut groups = lock(&s.groups);
    for topic in &p.topics {
        if !groups.contains(&topic.name) {
            groups.push(topic.name.clone());
            b.transactions
                .producer_connected(&topic.name, Producer::Grpc(s.clone()));
        }
    }
}

/// The client's settings with the broker's values filled in.
fn server_settings(b: &BrokerInner, mut s: pb::Settings) -> pb::Settings {
    let d = convert::duration;
    match &mut s.pub_sub {
        Some(pb::settings::PubSub::Publishing(p)) => {
            p.max_body_size = i32::try_from(b.config.max_message_size).unwrap_or(i32::MAX);
            p.validate_message_type = false;
            s.backoff_policy = Some(pb::RetryPolicy {
                max_attempts: 3,
                strategy: Some(pb::retry_policy::Strategy::ExponentialBackoff(
                    pb::ExponentialBackoff {
                        initial: Some(d(Duration::from_millis(10))),
                        max: Some(d(Duration::from_secs(1))),
                        multiplier: 2.0,
                    },
                )),
            });
        }
        Some(pb::settings::PubSub::Subscription(sub)) => {
            sub.fifo = Some(false);
            sub.receive_batch_size = Some(32);
            sub.long_polling_timeout = Some(d(Duration::from_secs(20)));
            // Redelivery backoff of a message a push consumer failed, as
            // RocketMQ's delay levels from 1 s.
            let next = [
                1, 5, 10, 30, 60, 120, 180, 240, 300, 360, 420, 480, 540, 600, 1200, 1800, 3600,
                7200,
            ]
            .map(|secs| d(Duration::from_secs(secs)))
            .to_vec();
            s.backoff_policy = Some(pb::RetryPolicy {
                max_attempts: CONSUMER_MAX_ATTEMPTS,
                strategy: Some(pb::retry_policy::Strategy::CustomizedBackoff(
                    pb::CustomizedBackoff { next },
                )),
            });
        }
        None => {}
    }
    s
}
