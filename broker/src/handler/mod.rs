//! Requests the broker serves: one enum dispatches, one file per request
//! holds its validation and handling.

pub(crate) mod authorize;
mod counters;
mod dead_letters;
pub(crate) mod group;
mod lookup;
pub(crate) mod offset;
mod pull;
mod send;
pub(crate) mod topic;
mod transaction;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use futures_util::FutureExt;
use txmq_protocol::{
    Call, DeleteTopic, ErrorCode, FindMessages, GetBrokerCounters, GetGroupState, GetMessages,
    GetReplication, GetStoreStats, GetTopicStatus, Hello, HelloOk, ListTransactions, LookupMessage,
    Pong, ReplicaFetch, Request, ResendDeadLetters, Response, Role, ShowTransaction, TopicConfig,
    WireError, PROTOCOL_VERSION,
};
use txmq_remoting::connection_types::BoxFuture;
use txmq_remoting::{Connection, Service};

use crate::store::StoreError;
use crate::BrokerInner;

/// The broker's [`Service`].
pub(crate) struct BrokerService {
    pub(crate) broker: Arc<BrokerInner>,
}

impl Service for BrokerService {
    fn hello(&self, conn: &Connection, hello: &Hello) -> Result<HelloOk, WireError> {
        if hello.role == Role::TransactionProducer
            && hello.group.as_deref().is_none_or(str::is_empty)
        {
            return Err(WireError::new(
                ErrorCode::BadArgument,
                "a transactional producer must name its producer group",
            ));
        }
        authorize::authorize_hello(&self.broker, conn, hello)?;
        // Counted once nothing else can refuse the hello: `closed` gives the
        // slot back for every greeted connection.
        let max = self.broker.config.max_connections;
        if !crate::take_slot(&self.broker.connections, max) {
            txmq_remoting::warn_throttled!(peer = %conn.peer_addr(), max, "connection refused: --max-connections reached");
            return Err(WireError::new(
                ErrorCode::TooManyConnections,
                format!(
                    "broker {} serves its maximum of {max} connections (--max-connections); try later or another broker",
                    self.broker.config.broker_name
                ),
            ));
        }
        if let (Role::TransactionProducer, Some(group)) = (hello.role, hello.group.as_deref()) {
            self.broker
                .transactions
                .producer_connected(group, crate::transaction::Producer::Conn(conn.clone()));
        }
        Ok(HelloOk {
            version: PROTOCOL_VERSION,
            server: self.broker.config.broker_name.clone(),
            challenge: None,
        })
    }

    fn closed(&self, conn: &Connection) {
        if conn.peer_hello().is_some() {
            self.broker.connections.fetch_sub(1, Ordering::AcqRel);
        }
        crate::groups::notify(self.broker.groups.connection_closed(conn.id()));
        if conn.peer_hello().map(|h| h.role) == Some(Role::Replica) {
            self.broker.replication.connection_closed(conn.id());
        }
        if let Some(hello) = conn.peer_hello() {
            if let (Role::TransactionProducer, Some(group)) = (hello.role, &hello.group) {
                self.broker.transactions.producers.remove(group, conn.id());
            }
        }
    }

    fn call(&self, conn: &Connection, request: Request) -> BoxFuture<Result<Response, WireError>> {
        // The user's permissions are the connection's: checked as the
        // request is read. Whether this broker takes it is checked as it
        // runs (a drain for a planned switch may begin in between).
        if let Err(refused) = authorize::authorize(&self.broker, conn, &request) {
            return Box::pin(std::future::ready(Err(refused)));
        }
        let b = self.broker.clone();
        if let Request::Send(r) = request {
            return Box::pin(send_call(b, r, conn.more_requests_read()));
        }
        let conn = conn.clone();
        Box::pin(async move {
            refusal(&b, &request)?;
            match request {
                // Sends have a future of their own (`send_call`).
                Request::Ping(_) => Ok(Response::Ping(Pong {})),
                Request::EpochEnd(r) => {
                    crate::replication::epoch_end(&b, r).map(Response::EpochEnd)
                }
                Request::ReplicaFetch(r) => crate::replication::fetch(&b, &conn, *r)
                    .await
                    .map(ReplicaFetch::response),
                Request::ReplicaAck(r) => b
                    .replication
                    .ack(&conn, r)
                    .map(|()| Response::ReplicaAck(txmq_protocol::Done {})),
                Request::GetReplication(_) => Ok(GetReplication::response(b.replication.info(&b))),
                Request::InitProducer(_) => {
                    detached(b, |b| async move { send::init_producer(&b).await })
                        .await
                        .map(Response::InitProducer)
                }
                Request::Pull(r) => pull::handle(&b, &conn, *r).await.map(Response::Pull),
                Request::CommitOffset(r) => {
                    offset::commit(&b, *r).await.map(Response::CommitOffset)
                }
                Request::QueryOffset(r) => offset::query(&b, r).map(Response::QueryOffset),
                Request::CreateTopic(r) => topic::create(&b, r).await.map(Response::CreateTopic),
                Request::ListTopics(_) => Ok(Response::ListTopics(topic::list(&b))),
                // A closed connection drops its in-flight handlers; these two
                // change the transaction table around a store write, so they
                // run to completion on their own task (one per transaction
                // step, not per message).
                Request::PrepareTransaction(r) => {
                    let metrics = b.metrics.clone();
                    detached(b, |b| async move { transaction::prepare(&b, *r).await })
                        .await
                        .inspect_err(|e| metrics.stamp_refused(e.code))
                        .map(Response::PrepareTransaction)
                }
                Request::EndTransaction(r) => {
                    detached(b, |b| async move { transaction::end(&b, r).await })
                        .await
                        .map(Response::EndTransaction)
                }
                Request::GetStoreStats(_) => {
                    let (records, bytes, writes, fdatasyncs) = b.store.stats();
                    Ok(GetStoreStats::response(txmq_protocol::StoreStats {
                        broker_name: b.config.broker_name.clone(),
                        flush: match b.config.flush {
                            crate::store::FlushMode::Async => "async".into(),
                            crate::store::FlushMode::Sync => "sync".into(),
                        },
                        records,
                        bytes,
                        writes,
                        fdatasyncs,
                    }))
                }
                Request::Heartbeat(r) => group::heartbeat(&b, &conn, *r)
                    .await
                    .map(Response::Heartbeat),
                Request::LeaveGroup(r) => group::leave(&b, r).map(Response::LeaveGroup),
                Request::SendBack(r) => group::send_back(&b, Some(&conn), *r)
                    .await
                    .map(Response::SendBack),
                Request::ListGroups(_) => Ok(Response::ListGroups(group::list(&b))),
                Request::GetGroupState(r) => group::state(&b, r).map(GetGroupState::response),
                Request::ResetOffset(r) => group::reset(&b, r).await.map(Response::ResetOffset),
                Request::ListTransactions(r) => {
                    Ok(ListTransactions::response(transaction::list(&b, r)))
                }
                Request::ShowTransaction(r) => {
                    transaction::show(&b, r).map(ShowTransaction::response)
                }
                Request::RecheckTransaction(r) => transaction::recheck(&b, r)
                    .await
                    .map(Response::RecheckTransaction),
                Request::ResendDeadLetters(r) => {
                    detached(b, |b| async move { dead_letters::resend(&b, *r).await })
                        .await
                        .map(ResendDeadLetters::response)
                }
                Request::GetTopicStatus(r) => topic::status(&b, r).map(GetTopicStatus::response),
                Request::DeleteTopic(r) => {
                    detached(b, |b| async move { topic::delete(&b, r).await })
                        .await
                        .map(DeleteTopic::response)
                }
                Request::LookupMessage(r) => lookup::by_id(&b, r).map(LookupMessage::response),
                Request::FindMessages(r) => lookup::by_key(&b, *r).map(FindMessages::response),
                Request::GetMessages(r) => lookup::by_offset(&b, r).map(GetMessages::response),
                Request::GetBrokerCounters(_) => Ok(GetBrokerCounters::response(counters::get(&b))),
                other => Err(WireError::new(
                    ErrorCode::UnsupportedRequest,
                    format!("{} requests are not served by a broker", other.kind()),
                )),
            }
        })
    }
}

/// The properties the broker sets on a message it hands back for retry or
/// dead-letters: a producer's message does not bring them (a message sent
/// with `TXMQ_RECONSUME_TIMES` of 16 went to the dead-letter topic at its
/// first retry; one consumed and sent on carries them): they are dropped
/// from what producers send.
/// (Each starts with `TXMQ_RE`, which [`drop_broker_properties`] looks for.)
pub(crate) const BROKER_PROPERTIES: [&str; 4] = [
    txmq_protocol::PROPERTY_RECONSUME_TIMES,
    txmq_protocol::PROPERTY_REAL_TOPIC,
    txmq_protocol::PROPERTY_REAL_QUEUE,
    txmq_protocol::PROPERTY_REPORTED_ORIGIN,
];

/// Drops [`BROKER_PROPERTIES`] from a producer's message: one look at the
/// sorted properties where their common prefix would be.
pub(super) fn drop_broker_properties(m: &mut txmq_protocol::Message) {
    use std::ops::Bound;
    let prefix = "TXMQ_RE";
    let any = m
        .properties
        .range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
        .next()
        .is_some_and(|(k, _)| k.starts_with(prefix));
    if any {
        for p in BROKER_PROPERTIES {
            m.properties.remove(p);
        }
    }
}

/// The requests the gRPC front door maps onto (`crate::grpc`): the same
/// handlers, with their validation, metrics and replication.
pub(crate) mod front {
    use std::sync::Arc;

    use txmq_protocol::{
        EndTransaction, Ended, PrepareTransaction, Prepared, SendRequest, SendResult, TopicConfig,
        WireError,
    };

    use crate::BrokerInner;

    pub(crate) async fn send(b: &BrokerInner, req: SendRequest) -> Result<SendResult, WireError> {
        super::send::handle(b, req, false).await
    }

    pub(crate) async fn prepare(
        b: Arc<BrokerInner>,
        req: PrepareTransaction,
    ) -> Result<Prepared, WireError> {
        super::detached(
            b,
            |b| async move { super::transaction::prepare(&b, req).await },
        )
        .await
    }

    pub(crate) async fn end(b: Arc<BrokerInner>, req: EndTransaction) -> Result<Ended, WireError> {
        super::detached(b, |b| async move { super::transaction::end(&b, req).await }).await
    }

    /// The topic's settings; a topic not there yet is created first when
    /// the broker creates topics on first use (`--auto-create-topics`).
    pub(crate) async fn topic(b: &BrokerInner, name: &str) -> Result<TopicConfig, WireError> {
        match b.topics.get(name) {
            Some(config) => Ok(config),
            None if b.config.auto_create_topics => {
                super::topic::create_topic(
                    b,
                    name,
                    b.config.default_queues,
                    txmq_protocol::PERM_READ_WRITE,
                    false,
                )
                .await
            }
            None => Err(super::unknown_topic(b, name)),
        }
    }
}

/// A send's own future: the one `call` makes for every other kind of
/// request holds the largest of their waits (about 1.5 KB), past the sizes
/// glibc's allocator serves from its per-thread cache (1,032 bytes); a send
/// is one allocation of this size per request.
async fn send_call(
    b: Arc<BrokerInner>,
    r: txmq_protocol::SendRequest,
    more_coming: bool,
) -> Result<Response, WireError> {
    if let Some(refusal) = b.replication.write_refusal(&b) {
        return Err(refusal);
    }
    send::handle(&b, r, more_coming)
        .await
        .inspect_err(|e| b.metrics.stamp_refused(e.code))
        .map(Response::Send)
}

/// Why this broker does not take `request` now: no writes on a slave (or,
/// under a controller, on a master draining for a planned switch or out of
/// touch with the controller), no replica's requests on a slave.
fn refusal(b: &BrokerInner, request: &Request) -> Result<(), WireError> {
    if matches!(
        request,
        Request::InitProducer(_)
            | Request::PrepareTransaction(_)
            | Request::EndTransaction(_)
            | Request::CreateTopic(_)
            | Request::SendBack(_)
            | Request::ResetOffset(_)
    ) {
        if let Some(refusal) = b.replication.write_refusal(b) {
            return Err(refusal);
        }
    }
    if b.replication.is_slave()
        && matches!(request, Request::ReplicaFetch(_) | Request::EpochEnd(_))
    {
        return Err(b.replication.not_master(b));
    }
    Ok(())
}

/// Runs `f` so that it completes even if the caller is dropped: polled
/// once here, then on its own task. The first poll keeps one connection's
/// requests in the order they were read up to their store writes (where a
/// prepare's producer stamp is checked): spawned at once, a task spawned
/// after it could run first. That poll runs on the connection's reader
/// task, so what `f` does before its first wait must stay short (checks
/// and queueing a store write, as today).
async fn detached<T, F, Fut>(b: Arc<BrokerInner>, f: F) -> Result<T, WireError>
where
    T: Send + 'static,
    F: FnOnce(Arc<BrokerInner>) -> Fut,
    Fut: std::future::Future<Output = Result<T, WireError>> + Send + 'static,
{
    let failed = |what: String| {
        Err(WireError::new(
            ErrorCode::Internal,
            format!("handler failed: {what}"),
        ))
    };
    // A panic fails the request alone, on either side of the first poll.
    let mut run = Box::pin(std::panic::AssertUnwindSafe(f(b)).catch_unwind());
    let done = match run.as_mut().now_or_never() {
        Some(done) => done,
        None => match tokio::spawn(run).await {
            Ok(done) => done,
            Err(e) => return failed(e.to_string()),
        },
    };
    done.unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        failed(format!("panicked: {what}"))
    })
}

/// The store's errors as wire errors.
pub(crate) fn store_error(e: StoreError) -> WireError {
    let code = match &e {
        StoreError::TooLarge(_) => ErrorCode::MessageTooLarge,
        StoreError::Full(_) => ErrorCode::StoreFull,
        StoreError::Invalid(_) => ErrorCode::BadArgument,
        StoreError::NoQueue { .. } => ErrorCode::UnknownQueue,
        StoreError::OffsetConflict(_) => ErrorCode::OffsetConflict,
        StoreError::Receipt(_) => ErrorCode::InvalidReceiptHandle,
        StoreError::Io { .. } | StoreError::Poisoned | StoreError::ShuttingDown => {
            ErrorCode::StoreUnavailable
        }
        StoreError::Producer { code, .. } => *code,
        // Answered as a success by the store; never reaches here.
        StoreError::Duplicate { .. } => ErrorCode::Internal,
    };
    WireError::new(code, e.to_string())
}

/// The topic's configuration, or UNKNOWN_TOPIC; checks the queue id.
pub(crate) fn existing_queue(
    b: &BrokerInner,
    topic: &str,
    queue: u32,
) -> Result<TopicConfig, WireError> {
    let config = b.topics.get(topic).ok_or_else(|| unknown_topic(b, topic))?;
    check_queue(&config, queue)?;
    Ok(config)
}

pub(crate) fn unknown_topic(b: &BrokerInner, topic: &str) -> WireError {
    WireError::new(
        ErrorCode::UnknownTopic,
        format!(
            "topic '{topic}' does not exist on broker {}",
            b.config.broker_name
        ),
    )
}

pub(crate) fn check_queue(config: &TopicConfig, queue: u32) -> Result<(), WireError> {
    if queue >= config.queues {
        return Err(WireError::new(
            ErrorCode::UnknownQueue,
            format!(
                "topic '{}' has queues 0..{}; there is no queue {queue}",
                config.name, config.queues
            ),
        ));
    }
    Ok(())
}

/// Whether `config`'s topic may be read (`perm` [`PERM_READ`]) or written
/// ([`PERM_WRITE`]) on this broker.
///
/// [`PERM_READ`]: txmq_protocol::PERM_READ
/// [`PERM_WRITE`]: txmq_protocol::PERM_WRITE
pub(crate) fn check_perm(b: &BrokerInner, config: &TopicConfig, perm: u8) -> Result<(), WireError> {
    debug_assert!(
        perm == txmq_protocol::PERM_READ || perm == txmq_protocol::PERM_WRITE,
        "one permission at a time"
    );
    if config.perm & perm != 0 {
        return Ok(());
    }
    let what = if perm == txmq_protocol::PERM_READ {
        "readable"
    } else {
        "writable"
    };
    Err(WireError::new(
        ErrorCode::NoPermission,
        format!(
            "topic '{}' is not {what} on broker {}",
            config.name, b.config.broker_name
        ),
    ))
}

/// Checks that `topic` takes writes to `queue` here, creating it first
/// where topics are created on first use; returns the registration version
/// of a topic created, to wait for once the write is done. Looked up in
/// place: every send does this.
pub(crate) fn writable_queue(
    b: &BrokerInner,
    topic: &str,
    queue: u32,
) -> Result<Option<u64>, WireError> {
    let check = |config: &TopicConfig| {
        check_perm(b, config, txmq_protocol::PERM_WRITE)?;
        check_queue(config, queue)
    };
    match b.topics.get_with(topic, check) {
        Some(checked) => checked.map(|()| None),
        None if b.config.auto_create_topics => {
            let (config, version) = topic::create_topic_now(
                b,
                topic,
                b.config.default_queues,
                txmq_protocol::PERM_READ_WRITE,
                false,
            )?;
            check(&config)?;
            Ok(version)
        }
        None => Err(unknown_topic(b, topic)),
    }
}

pub(crate) fn bad_argument(message: impl Into<String>) -> WireError {
    WireError::new(ErrorCode::BadArgument, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future `f` returns.
    fn future_size<F>(_: fn(Arc<BrokerInner>, txmq_protocol::SendRequest, bool) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Every send's future is one allocation (`call` boxes it). Up to
    /// 1,032 bytes glibc's allocator serves it from its per-thread cache;
    /// past that each send took its slower paths for the allocation and the
    /// free (about 5% of the broker's CPU at 16 producers). The rare waits
    /// are boxed apart to stay under.
    #[test]
    fn a_send_future_fits_the_allocators_thread_cache() {
        let size = future_size(send_call);
        assert!(size <= 1032, "a send's future takes {size} bytes");
    }

    #[test]
    fn a_producers_message_loses_only_the_brokers_properties() {
        let mut m = txmq_protocol::Message::new("t", "b");
        for (k, v) in [
            ("TXMQ_REAL_QUEUE", "3"),
            ("TXMQ_REAL_TOPIC", "x"),
            ("TXMQ_RECONSUME_TIMES", "16"),
            ("TXMQ_DELIVER_AT", "1"),
            ("TXMQ_RE", "mine"),
            ("a", "1"),
            ("z", "2"),
        ] {
            m.properties.insert(k.into(), v.into());
        }
        drop_broker_properties(&mut m);
        let left: Vec<&str> = m.properties.keys().map(String::as_str).collect();
        assert_eq!(left, ["TXMQ_DELIVER_AT", "TXMQ_RE", "a", "z"]);
        assert!(BROKER_PROPERTIES.iter().all(|p| p.starts_with("TXMQ_RE")));
    }
}
