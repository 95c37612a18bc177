//! [`Producer`]: sends messages to a topic's queues, choosing the queue,
//! retrying on another broker, and pipelining many sends over one
//! connection per broker. Idempotent by default: see [`Producer`] for
//! what it guarantees (the bookkeeping is in the private `idempotence`
//! module).

pub(crate) mod idempotence;
mod queue_select;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use txmq_protocol::{
    validate_topic_name, Message as WireMessage, MsgId, Role, SendRequest, SendResult, SendStatus,
};

use crate::config::client_setters;
use crate::drain::Drain;
use crate::nameserver::NameserverClient;
use crate::pool::ConnectionPool;
use crate::route::{MessageQueue, RouteCache, RouteInfo};
use crate::{ClientConfig, Error, Message, Result};

use idempotence::{id_refused, no_place, Ending, Grant, Idempotence, Pending};
use queue_select::Target;
pub(crate) use queue_select::{random_start, round_robin};
pub use queue_select::{select_by_hash, select_round_robin, shard_hash};

/// Pause before retrying on the broker that just failed (times the attempt
/// number), so a restarting broker is not hammered.
const SAME_BROKER_RETRY_PAUSE: Duration = Duration::from_millis(100);

/// Pause before sending again a stamped send the broker refused because an
/// earlier send of its queue, still in flight, had not arrived yet.
const REORDER_PAUSE: Duration = Duration::from_millis(10);

/// How many times one send takes a new producer id (after its sequence or
/// id was refused) before it fails.
const MAX_RENEWALS: u32 = 3;

/// What a closed producer's errors call it.
const PRODUCER: &str = "the producer";

/// Where one sent message was stored.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SendReceipt {
    /// The message's id (assigned before the first attempt).
    pub msg_id: MsgId,
    /// The topic.
    pub topic: String,
    /// The broker that stored it.
    pub broker_name: String,
    /// The queue it was stored in.
    pub queue: u32,
    /// Its offset in that queue. For a delayed message, its place in the
    /// broker's delay index instead: its queue offset is known only once
    /// it is delivered.
    pub queue_offset: u64,
    /// How the broker acknowledged it.
    pub status: SendStatus,
    /// True when the broker had stored this send already (an idempotent
    /// retry whose first attempt's answer was lost): nothing was stored
    /// again, and the receipt is the first attempt's.
    pub duplicate: bool,
}

impl SendReceipt {
    /// A receipt of a first (not [`duplicate`](SendReceipt::duplicate))
    /// send: for testing code that handles receipts; sends make the real
    /// ones.
    pub fn new(
        msg_id: MsgId,
        topic: impl Into<String>,
        broker_name: impl Into<String>,
        queue: u32,
        queue_offset: u64,
        status: SendStatus,
    ) -> SendReceipt {
        SendReceipt {
            msg_id,
            topic: topic.into(),
            broker_name: broker_name.into(),
            queue,
            queue_offset,
            status,
            duplicate: false,
        }
    }
}

/// Builds a [`Producer`].
#[derive(Debug, Clone)]
pub struct ProducerBuilder {
    config: ClientConfig,
    group: Option<String>,
    idempotence: bool,
}

impl Default for ProducerBuilder {
    fn default() -> Self {
        ProducerBuilder {
            config: ClientConfig::default(),
            group: None,
            idempotence: true,
        }
    }
}

impl ProducerBuilder {
    client_setters! {
        /// The producer group, sent in the hello to brokers.
        group;
        /// How long one send attempt waits for the broker's answer (default 3 s).
        send_timeout(timeout: Duration) => request_timeout;
        /// How many more attempts a send gets after a retriable failure (default 2).
        retries(retries: u32) => send_retries;
        /// How long a topic's route is cached (default 30 s).
        route_refresh_interval(interval: Duration) => route_refresh_interval;
        /// How long [`Producer::close`] waits for sends in flight (default 10 s).
        close_timeout(timeout: Duration) => close_timeout;
    }

    /// Idempotent sends (default: on): every send carries the producer's
    /// id at that broker group and a sequence number per queue, so that a
    /// send retried after its answer was lost (a timeout, a connection
    /// lost, a failover) is stored once and answered with its first
    /// result. Such a retry goes to the same queue of the same broker
    /// group (its new master after a failover), never to another queue,
    /// and at most 5 sends per queue are in flight at once. Off: a retry
    /// may go to another queue, and a send whose answer was lost may be
    /// stored twice. Brokers that do not support it get plain sends (a
    /// warning is logged).
    pub fn idempotence(mut self, on: bool) -> Self {
        self.idempotence = on;
        self
    }

    /// Creates the producer. Nothing is connected yet: connections to the
    /// nameservers and brokers open on the first send.
    ///
    /// # Errors
    /// [`Error::BadArgument`] when no nameserver is given or a setting is invalid.
    pub async fn build(self) -> Result<Producer> {
        self.config.validate()?;
        let pool = ConnectionPool::new(&self.config, Role::Producer, self.group.clone(), None);
        let nameservers = NameserverClient::new(self.config.nameservers.clone(), pool.clone());
        let routes = RouteCache::new(nameservers, self.config.route_refresh_interval, true);
        Ok(Producer {
            inner: Arc::new(Inner {
                config: self.config,
                group: self.group,
                pool,
                routes,
                turn: AtomicU64::new(random_start()),
                idempotence: self.idempotence.then(Idempotence::default),
                drain: Drain::default(),
            }),
        })
    }
}

/// Sends messages. A cheap `Clone` handle; every method takes `&self`, and
/// many sends may be in flight at once from one producer (they are pipelined
/// over one connection per broker).
///
/// A send returns once the broker has stored the message: in the page cache
/// under the broker's `async` flush mode, fsynced under `sync` (else the
/// status is [`SendStatus::FlushDiskTimeout`]); under a master's sync
/// replication, also held by enough slaves (else the status is
/// [`SendStatus::FlushSlaveTimeout`] or [`SendStatus::SlaveNotAvailable`]:
/// stored on the master, not yet on enough slaves).
///
/// Sends go to the master of each broker group; a group whose master is
/// not live (only slaves) is skipped like an unavailable broker. A slave's
/// `NOT_MASTER` refusal (a stale route) refreshes the route and the send is
/// retried on the master, within the retry budget.
///
/// On a retriable failure (connection lost, timeout, broker unavailable,
/// unknown topic or no permission on that broker) the producer marks the
/// route stale, fetches it again and tries the next queue, preferring a
/// broker other than the one that failed, up to
/// [`ClientConfig::send_retries`] more times. Every attempt carries the same
/// message id, so a message stored by an attempt whose answer was lost can be
/// recognised as a duplicate.
///
/// A topic without a route is sent to the registered brokers, which create
/// it on its first message unless their auto-creation is off (not by
/// [`Producer::send_ordered`], which needs the topic's queues).
///
/// # Idempotence (on by default)
///
/// The producer asks each broker group for a producer id on its first send
/// there and numbers its sends per queue; the broker stores each numbered
/// send once and answers a repeat with the first answer
/// ([`SendReceipt::duplicate`]). So a send whose outcome is unknown (a
/// timeout, a lost connection, a master that lost its role) is retried
/// with the same number on the same queue of the same broker group (at its
/// new master after a failover), never on another queue. When all retries
/// fail with an unknown outcome, the send fails and the producer takes a
/// new id for that group; sending the same message again (the same id,
/// fixed with [`Message::with_msg_id`]) retries it with its first number,
/// on its first queue, so a caller's own retry loop is safe too when it
/// fixes the id first. A message without a fixed id gets a new id at each
/// send: each send of it, or of a clone, is another message. A refused number (a
/// gap after a send failed for good, an id the broker forgot) makes the
/// producer take a new id and number the send again: nothing was stored.
/// See [`ProducerBuilder::idempotence`] to turn it off.
#[derive(Debug, Clone)]
pub struct Producer {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: ClientConfig,
    group: Option<String>,
    pool: ConnectionPool,
    routes: RouteCache,
    turn: AtomicU64,
    /// `None`: idempotence off.
    idempotence: Option<Idempotence>,
    /// Sends in flight, for [`Producer::close`].
    drain: Drain,
}

impl Producer {
    /// A builder; give it at least one nameserver.
    pub fn builder() -> ProducerBuilder {
        ProducerBuilder::default()
    }

    /// The producer group, if one was given.
    pub fn group(&self) -> Option<&str> {
        self.inner.group.as_deref()
    }

    /// The settings in use.
    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    /// True when sends are idempotent ([`ProducerBuilder::idempotence`]).
    pub fn idempotent(&self) -> bool {
        self.inner.idempotence.is_some()
    }

    /// Sends one message to the next writable queue in turn (round robin
    /// over all queues of all brokers of the topic).
    ///
    /// # Errors
    /// [`Error::BadArgument`] for an invalid topic name; [`Error::NoRoute`]
    /// when no broker serves the topic or could create it; [`Error::Broker`]
    /// with the broker's error (e.g. `UNKNOWN_TOPIC`, `MESSAGE_TOO_LARGE`) or
    /// the connection failure of the last attempt.
    pub async fn send(&self, message: Message) -> Result<SendReceipt> {
        let mut receipts = self.send_to(vec![message], Target::RoundRobin).await?;
        receipts
            .pop()
            .ok_or_else(|| Error::Protocol("empty send result".into()))
    }

    /// Sends a batch in one request to one queue; the messages are stored
    /// contiguously and in order. All must have the same topic.
    ///
    /// # Errors
    /// [`Error::BadArgument`] for an empty batch or mixed topics; otherwise as
    /// [`Producer::send`]. A batch is stored whole or not at all.
    pub async fn send_batch(&self, messages: Vec<Message>) -> Result<Vec<SendReceipt>> {
        self.send_to(messages, Target::RoundRobin).await
    }

    /// Sends a message to the queue chosen by a stable hash of `shard_key`
    /// ([`shard_hash`]) over the topic's writable queues, so that messages
    /// with the same key are stored in one queue, in send order (as long as
    /// each is sent after the previous one was acknowledged, and the topic's
    /// queues do not change). A retry goes to the queue the key maps to
    /// again, never to another one.
    ///
    /// The topic must have a route: unlike [`Producer::send`], an ordered
    /// send does not auto-create a topic no broker serves yet, because the
    /// key's queue is picked among the topic's queues, which are not known
    /// before it exists. Create the topic first (`txmq topic create`). The
    /// same holds while every broker of the topic is away (a restart after a
    /// power cut): the send fails rather than go to a queue the key's
    /// earlier messages are not in.
    ///
    /// # Errors
    /// As [`Producer::send`]; [`Error::NoRoute`] when the nameservers know
    /// no route of the topic.
    pub async fn send_ordered(&self, message: Message, shard_key: &str) -> Result<SendReceipt> {
        let target = Target::Hash(shard_hash(shard_key));
        let mut receipts = self.send_to(vec![message], target).await?;
        receipts
            .pop()
            .ok_or_else(|| Error::Protocol("empty send result".into()))
    }

    /// Sends a message to queue `queue` of broker `broker_name`.
    ///
    /// # Errors
    /// [`Error::NoQueue`] when the topic's route has no such writable queue;
    /// otherwise as [`Producer::send`].
    pub async fn send_to_queue(
        &self,
        message: Message,
        broker_name: &str,
        queue: u32,
    ) -> Result<SendReceipt> {
        let target = Target::Queue {
            broker: broker_name,
            queue,
        };
        let mut receipts = self.send_to(vec![message], target).await?;
        receipts
            .pop()
            .ok_or_else(|| Error::Protocol("empty send result".into()))
    }

    /// The writable queues of `topic`, from the route cache. For a topic the
    /// nameservers know no route of, these are provisional: queue 0 of each
    /// registered broker, where a send would auto-create the topic, not the
    /// queues it will have; do not place keys by them.
    ///
    /// # Errors
    /// As fetching a route: [`Error::NoRoute`] or [`Error::Remoting`].
    pub async fn writable_queues(&self, topic: &str) -> Result<Vec<MessageQueue>> {
        Ok(self.inner.routes.get(topic).await?.writable.clone())
    }

    /// Closes the producer, and every clone of it: later sends fail with
    /// [`Error::Closed`]; sends in flight finish (each with its own
    /// receipt or error to its caller) for up to
    /// [`ClientConfig::close_timeout`]; then the connections close.
    ///
    /// ```no_run
    /// # async fn demo() -> txmq::Result<()> {
    /// let producer = txmq::Producer::builder().nameserver("127.0.0.1:9876").build().await?;
    /// producer.send(txmq::Message::new("orders", "order 42")).await?;
    /// producer.close().await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`Error::Unfinished`] when sends were still in flight at the
    /// timeout (they fail); the producer is closed all the same.
    pub async fn close(&self) -> Result<()> {
        let drained = self
            .inner
            .drain
            .close(PRODUCER, self.inner.config.close_timeout)
            .await;
        self.inner.pool.close();
        drained
    }

    async fn send_to(
        &self,
        messages: Vec<Message>,
        target: Target<'_>,
    ) -> Result<Vec<SendReceipt>> {
        let _in_flight = self.inner.drain.enter(PRODUCER)?;
        let messages = prepare(messages)?;
        // Every message has it (checked); each moves it into its receipt.
        let topic = messages[0].topic.as_str();
        // A delayed message waits in the broker's delay index, outside any
        // queue's sequence: it is sent plain (at least once).
        let delayed = messages.iter().any(|m| {
            m.properties
                .contains_key(txmq_protocol::PROPERTY_DELIVER_AT)
        });
        let (broker_name, result) = match &self.inner.idempotence {
            Some(idem) if !delayed => self.send_idempotent(idem, topic, &messages, target).await?,
            _ => self.send_with_retries(topic, &messages, target).await?,
        };
        Ok(receipts(broker_name, &result, messages))
    }

    async fn send_with_retries(
        &self,
        topic: &str,
        messages: &[WireMessage],
        target: Target<'_>,
    ) -> Result<(String, SendResult)> {
        let attempts = self.inner.config.send_retries.saturating_add(1);
        let timeout = self.inner.config.request_timeout;
        let mut failed_broker: Option<String> = None;
        // The address of the last failed attempt: a pause before the same one again.
        let mut failed_addr: Option<String> = None;
        let mut last_error = None;
        for attempt in 0..attempts {
            let last_attempt = attempt + 1 == attempts;
            let route = match self.inner.routes.get(topic).await {
                Ok(route) => route,
                Err(e) if e.is_retriable() && !last_attempt => {
                    tracing::debug!(%topic, error = %e, "route lookup failed; retrying");
                    last_error = Some(e);
                    tokio::time::sleep(SAME_BROKER_RETRY_PAUSE * (attempt + 1)).await;
                    continue;
                }
                // After a broker failed, its disappearance from the route
                // (NoRoute, say) says less than the failure itself.
                Err(e) => return Err(last_error.unwrap_or(e)),
            };
            let turn = self.inner.turn.fetch_add(1, Ordering::Relaxed);
            let Some(mq) = target.select(&route, turn, failed_broker.as_deref()) else {
                let error = no_queue(topic, &route, target);
                if matches!(error, Error::NoMaster { .. }) {
                    // A failover in progress: the group's next master
                    // registers within moments; ask for the route again
                    // (for the next send too, a caller's retry included).
                    self.inner.routes.invalidate(topic, route.generation);
                }
                if matches!(error, Error::NoMaster { .. }) && !last_attempt {
                    last_error = Some(error);
                    tokio::time::sleep(SAME_BROKER_RETRY_PAUSE * (attempt + 1)).await;
                    continue;
                }
                return Err(last_error.unwrap_or(error));
            };
            if failed_addr.as_deref() == Some(mq.addr.as_str()) {
                tokio::time::sleep(SAME_BROKER_RETRY_PAUSE * attempt).await;
            }
            let request = SendRequest {
                producer: None,
                queue: mq.queue,
                messages: messages.to_vec(),
            };
            let result = match self.inner.pool.get(&mq.addr).await {
                Ok(conn) => conn.call_with_timeout(request, timeout).await,
                Err(e) => Err(e),
            };
            match result {
                Ok(result) => return Ok((mq.broker_name.clone(), result)),
                Err(e) => {
                    let retriable = crate::error::retriable(&e);
                    // A slave refused: nothing was stored, and the group's
                    // master (in the refreshed route) takes the retry.
                    let not_master = crate::error::not_master(&e);
                    let error = Error::at_broker(&mq.broker_name, &mq.addr, e);
                    if !retriable {
                        return Err(error);
                    }
                    self.note_failure(topic, &route, mq, attempt, last_attempt, target, &error);
                    if !not_master {
                        failed_broker = Some(mq.broker_name.clone());
                    }
                    failed_addr = Some(mq.addr.clone());
                    last_error = Some(error);
                }
            }
        }
        Err(last_error.unwrap_or_else(|| Error::Protocol("no send attempt was made".into())))
    }

    /// An idempotent send (see [`Producer`]): stamped, retried with the
    /// same stamp on the same queue once an attempt may have stored it.
    async fn send_idempotent(
        &self,
        idem: &Idempotence,
        topic: &str,
        messages: &[WireMessage],
        target: Target<'_>,
    ) -> Result<(String, SendResult)> {
        let count = messages.len() as u64;
        let first = messages.first().map(|m| m.msg_id).unwrap_or_default();
        let attempts = self.inner.config.send_retries.saturating_add(1);
        let timeout = self.inner.config.request_timeout;
        // The stamp this send holds, and whether an attempt with it may have
        // stored the send (then it keeps that stamp and queue to the end).
        // A send resent after an unknown outcome starts with its old stamp.
        let mut held = Held {
            idem,
            first,
            topic,
            count,
            stamp: idem.recall(first, topic, count),
        };
        let mut maybe_stored = held.stamp.is_some();
        let mut permit: Option<idempotence::Place> = None;
        let mut failed_broker: Option<String> = None;
        let mut failed_addr: Option<String> = None;
        // Boxed: kept across every wait below, in this future's place.
        let mut last_error: Option<Box<Error>> = None;
        let mut attempt = 0u32;
        let mut renewals = 0u32;
        let mut recheck_gap = true;
        // Waiting for earlier sends of the queue that the broker has not
        // seen yet ends after as long as their own attempts may take,
        // counted from the first refusal (no clock read for sends that
        // see none).
        let mut reorder_deadline: Option<std::time::Instant> = None;
        loop {
            let last_attempt = attempt + 1 >= attempts;
            // The waits of this loop come after the match that decides on
            // them, not in its arms: a match's value is kept across a wait
            // in one of its arms, and this future (held by every caller's)
            // would keep a place for each such value.
            let route = match self.inner.routes.get(topic).await {
                Ok(route) => Some(route),
                Err(e) if e.is_retriable() && !last_attempt => {
                    tracing::debug!(%topic, error = %e, "route lookup failed; retrying");
                    last_error = Some(Box::new(e));
                    attempt += 1;
                    None
                }
                Err(e) => {
                    let error = last_error.map_or(e, |b| *b);
                    return Err(held.give_up(maybe_stored, error));
                }
            };
            let Some(route) = route else {
                tokio::time::sleep(SAME_BROKER_RETRY_PAUSE * attempt).await;
                continue;
            };
            let chosen = match &held.stamp {
                Some(h) => route
                    .writable
                    .iter()
                    .find(|q| q.broker_name == h.broker_name && q.queue == h.queue),
                None => {
                    let turn = self.inner.turn.fetch_add(1, Ordering::Relaxed);
                    target.select(&route, turn, failed_broker.as_deref())
                }
            };
            let Some(mq) = chosen else {
                let error = match &held.stamp {
                    // Its group has no master now (a failover), or the
                    // queue is gone: only that queue can recognise it.
                    Some(h) => no_queue(
                        topic,
                        &route,
                        Target::Queue {
                            broker: &h.broker_name,
                            queue: h.queue,
                        },
                    ),
                    None => no_queue(topic, &route, target),
                };
                let waits = held.stamp.is_some() || matches!(error, Error::NoMaster { .. });
                if waits {
                    // Also on the last attempt: the next send (a caller's
                    // retry too) asks for the route again.
                    self.inner.routes.invalidate(topic, route.generation);
                }
                if waits && !last_attempt {
                    last_error = Some(Box::new(error));
                    attempt += 1;
                    tokio::time::sleep(SAME_BROKER_RETRY_PAUSE * attempt).await;
                    continue;
                }
                let error = last_error.map_or(error, |b| *b);
                return Err(held.give_up(maybe_stored, error));
            };
            if failed_addr.as_deref() == Some(mq.addr.as_str()) {
                tokio::time::sleep(SAME_BROKER_RETRY_PAUSE * attempt).await;
            }
            let mut fresh = None;
            // The common case in one look: the group's ids, and a place free
            // now. Otherwise ask for ids, and wait for a place, below.
            if held.stamp.is_none() && permit.is_none() {
                if let Some((ids, place)) = idem.ready(&mq.broker_name, topic, mq.queue) {
                    permit = Some(place);
                    fresh = Some(ids);
                }
            }
            if held.stamp.is_none() && fresh.is_none() {
                let grant = match idem
                    .grant(&mq.broker_name, &mq.addr, &self.inner.pool, timeout)
                    .await
                {
                    Ok(grant) => grant,
                    Err(e) => {
                        // Nothing was sent: like a connection that failed.
                        let error = Error::at_broker(&mq.broker_name, &mq.addr, e);
                        if !error.is_retriable() {
                            return Err(error);
                        }
                        // Also on the last attempt: the route is fetched
                        // again for the next send (a caller's retry too).
                        self.note_failure(topic, &route, mq, attempt, last_attempt, target, &error);
                        if last_attempt {
                            return Err(error);
                        }
                        if !error.is_not_master() {
                            failed_broker = Some(mq.broker_name.clone());
                        }
                        failed_addr = Some(mq.addr.clone());
                        last_error = Some(Box::new(error));
                        attempt += 1;
                        continue;
                    }
                };
                if let Grant::Stamped(ids) = grant {
                    // At most a few stamped sends in flight per queue,
                    // so that the broker remembers any of them.
                    if !permit
                        .as_ref()
                        .is_some_and(|p| p.is_for(&mq.broker_name, mq.queue))
                    {
                        // Never wait for one queue while holding another's place.
                        drop(permit.take());
                        // A place while the queue moves; sends queued
                        // behind a silent broker end on time.
                        let Some(place) =
                            idem.permit(&mq.broker_name, topic, mq.queue, timeout).await
                        else {
                            let error = no_place("Send", &mq.broker_name, &mq.addr, timeout);
                            return Err(held.give_up(maybe_stored, error));
                        };
                        permit = Some(place);
                    }
                    // Its sequence is drawn as its frame is queued.
                    fresh = Some(ids);
                }
            }
            if let Some(h) = held.stamp.as_ref().filter(|_| permit.is_none()) {
                // A resend of a remembered send: it takes a place too.
                match idem.permit(&h.broker_name, topic, h.queue, timeout).await {
                    Some(p) => permit = Some(p),
                    None => {
                        let error = no_place("Send", &mq.broker_name, &mq.addr, timeout);
                        return Err(held.give_up(maybe_stored, error));
                    }
                }
            }
            let request = SendRequest {
                producer: held.stamp.as_ref().map(|h| h.stamp),
                queue: mq.queue,
                messages: messages.to_vec(),
            };
            let (result, sent) = 'attempt: {
                let conn = match self.inner.pool.get(&mq.addr).await {
                    Ok(conn) => conn,
                    Err(e) => break 'attempt (Err(e), false),
                };
                let Some(ids) = fresh else {
                    break 'attempt (conn.call_with_timeout(request, timeout).await, true);
                };
                let mut draw = |anyway| ids.try_stamp_send(topic, mq.queue, count, anyway);
                let request = txmq_protocol::Call::into_request(request);
                let (stamp, queued) =
                    idempotence::queue_stamped(&conn, &ids, request, timeout, &mut draw).await;
                if let Some(stamp) = stamp {
                    held.stamp = Some(Pending {
                        broker_name: mq.broker_name.clone(),
                        queue: mq.queue,
                        count,
                        stamp,
                        ids,
                    });
                }
                let reply = match queued {
                    Ok(reply) => reply,
                    Err(e) => break 'attempt (Err(e), stamp.is_some()),
                };
                (reply.answer_as::<SendRequest>().await, stamp.is_some())
            };
            if let Some(place) = &permit {
                place.answered(&result);
            }
            let e = match result {
                Ok(result) => {
                    let Some(h) = held.stamp.take() else {
                        return Ok((mq.broker_name.clone(), result));
                    };
                    h.ids
                        .finish_send(topic, h.queue, h.stamp, count, Ending::Stored);
                    idem.forget(first);
                    // The stamp's copy of the name (the queue's broker) goes
                    // to the receipt: one allocation fewer per send.
                    return Ok((h.broker_name, result));
                }
                Err(e) => e,
            };
            let code = e.remote().map(|w| w.code);
            if let (Some(h), Some(txmq_protocol::ErrorCode::DuplicateSequence)) =
                (&held.stamp, code)
            {
                // Stored before, by an attempt whose answer was lost and
                // which the broker no longer remembers: never store it
                // again; its offsets are not known.
                h.ids
                    .finish_send(topic, h.queue, h.stamp, count, Ending::Stored);
                idem.forget(first);
                held.stamp = None;
                return Err(Error::at_broker(&mq.broker_name, &mq.addr, e));
            }
            if let (Some(h), Some(code)) = (&held.stamp, code) {
                // An earlier send may also have been stored (and answered)
                // between this one's refusal and now: one retry tells.
                let recheck = std::mem::take(&mut recheck_gap);
                let now = std::time::Instant::now();
                let reorder_until =
                    *reorder_deadline.get_or_insert(now + timeout * attempts.saturating_add(1));
                if code == txmq_protocol::ErrorCode::OutOfOrderSequence
                    && (recheck || h.ids.earlier_in_flight(topic, h.queue, h.stamp.sequence))
                    && now < reorder_until
                {
                    // An earlier send of this queue has not reached the
                    // broker yet: one connection keeps them in sequence
                    // order, but an earlier one may be a retry on a new
                    // connection. This one is next once it has.
                    tokio::time::sleep(REORDER_PAUSE).await;
                    continue;
                }
                if code == txmq_protocol::ErrorCode::OutOfOrderSequence || id_refused(code) {
                    // Nothing was stored: a new id, and this send stamped anew.
                    let error = Error::at_broker(&mq.broker_name, &mq.addr, e);
                    renewals += 1;
                    if renewals > MAX_RENEWALS {
                        return Err(held.give_up(false, error));
                    }
                    if idem.drop_ids(&h.broker_name, &h.ids) {
                        tracing::warn!(%topic, broker = %h.broker_name, producer_id = h.ids.producer_id(), sequence = h.stamp.sequence, cause = %crate::error::chain(&error), "the broker refused the producer's sequence; taking a new producer id (nothing was stored)");
                    }
                    h.ids
                        .finish_send(topic, h.queue, h.stamp, count, Ending::NotStored);
                    idem.forget(first);
                    held.stamp = None;
                    maybe_stored = false;
                    continue;
                }
            }
            let retriable = crate::error::retriable(&e);
            let not_master = crate::error::not_master(&e);
            let reached = sent && (not_master || crate::error::maybe_stored(&e));
            let error = Error::at_broker(&mq.broker_name, &mq.addr, e);
            if held.stamp.is_some() && reached {
                maybe_stored = true;
            }
            if retriable {
                // Also on the last attempt: the route is fetched again for
                // the next send (a caller's retry too, as `txmq send`'s,
                // which sends with no retries of the producer's own).
                self.note_failure(topic, &route, mq, attempt, last_attempt, target, &error);
            }
            if !retriable || last_attempt {
                return Err(held.give_up(maybe_stored, error));
            }
            if !maybe_stored {
                // Nothing stored: the next attempt may choose its queue again.
                if let Some(h) = held.stamp.take() {
                    h.ids
                        .finish_send(topic, h.queue, h.stamp, count, Ending::NotStored);
                }
            }
            if !not_master {
                failed_broker = Some(mq.broker_name.clone());
            }
            failed_addr = Some(mq.addr.clone());
            last_error = Some(Box::new(error));
            attempt += 1;
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn note_failure(
        &self,
        topic: &str,
        route: &RouteInfo,
        mq: &MessageQueue,
        attempt: u32,
        last_attempt: bool,
        target: Target<'_>,
        error: &Error,
    ) {
        self.inner.routes.invalidate(topic, route.generation);
        let cause = error
            .remoting()
            .map(ToString::to_string)
            .unwrap_or_default();
        if last_attempt {
            tracing::debug!(%topic, broker = %mq.broker_name, queue = mq.queue, attempt, %cause, "send failed");
        } else {
            let next = if target.may_switch_broker() {
                "retrying on the next queue"
            } else {
                "retrying"
            };
            // Info, not warn: a retry is routine, and the caller sees the
            // error if the last attempt fails too.
            tracing::info!(%topic, broker = %mq.broker_name, queue = mq.queue, attempt, %cause, "send failed; {next}");
        }
    }
}

/// Checks a batch and turns it into the messages sent, each with its id
/// (assigned here where the user gave none, so that every retry of this
/// send carries the same one). They all have the first one's topic.
fn prepare(messages: Vec<Message>) -> Result<Vec<WireMessage>> {
    let topic = match messages.first() {
        Some(m) => m.topic(),
        None => {
            return Err(Error::BadArgument(
                "a batch needs at least one message".into(),
            ))
        }
    };
    validate_topic_name(topic).map_err(Error::BadArgument)?;
    if let Some(other) = messages.iter().find(|m| m.topic() != topic) {
        return Err(Error::BadArgument(format!(
            "all messages of a batch must have the same topic; found {:?} and {:?}",
            topic,
            other.topic()
        )));
    }
    Ok(messages.into_iter().map(Message::into_wire).collect())
}

fn no_queue(topic: &str, route: &RouteInfo, target: Target<'_>) -> Error {
    let masterless = crate::route::groups_without_master(&route.route);
    match target {
        // The nameservers know no route: the topic is new, or its brokers
        // are all away.
        Target::Hash(_) if route.provisional => Error::NoRoute {
            topic: topic.to_string(),
        },
        Target::Queue { broker, .. } if masterless.iter().any(|b| b == broker) => Error::NoMaster {
            topic: topic.to_string(),
            brokers: vec![broker.to_string()],
        },
        _ if route.writable.is_empty() && !masterless.is_empty() => Error::NoMaster {
            topic: topic.to_string(),
            brokers: masterless,
        },
        Target::Queue { broker, queue } => Error::BadArgument(format!(
            "topic {topic:?} has no writable queue {queue} on broker {broker:?}"
        )),
        _ => Error::NoQueue {
            topic: topic.to_string(),
            what: "writable",
        },
    }
}

/// The receipts of a send, one per message: the i-th got queue offset
/// `first_offset + i`. Each takes its message's topic, and the last takes
/// `broker_name` itself (a single message's send copies neither).
fn receipts(
    broker_name: String,
    result: &SendResult,
    mut messages: Vec<WireMessage>,
) -> Vec<SendReceipt> {
    // Each message gives up its topic where it lies: moved out whole, a
    // message is a copy of 152 bytes.
    let last = messages.len().saturating_sub(1);
    let mut broker_name = Some(broker_name);
    messages
        .iter_mut()
        .enumerate()
        .map(|(i, m)| SendReceipt {
            msg_id: result.msg_ids.get(i).copied().unwrap_or(m.msg_id),
            topic: std::mem::take(&mut m.topic),
            broker_name: if i == last {
                broker_name.take()
            } else {
                broker_name.clone()
            }
            .unwrap_or_default(),
            queue: result.queue,
            queue_offset: result.first_offset + i as u64,
            status: result.status,
            duplicate: result.duplicate,
        })
        .collect()
}

/// The stamp a send holds until it ends. A send its caller drops (a
/// timeout around it, a `select!`) while it holds one ends it as a send
/// whose outcome is unknown, as one that gave up would: otherwise its
/// sequence stays open, and every later send to its queue waits behind it
/// for room in the window.
struct Held<'a> {
    idem: &'a Idempotence,
    first: MsgId,
    topic: &'a str,
    count: u64,
    stamp: Option<Pending>,
}

impl Held<'_> {
    /// Ends a send that failed for good and returns its error (see
    /// [`end_unfinished`]).
    fn give_up(&mut self, maybe_stored: bool, error: Error) -> Error {
        if let Some(h) = self.stamp.take() {
            end_unfinished(
                self.idem,
                self.first,
                self.topic,
                h,
                maybe_stored,
                self.count,
            );
        }
        error
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        // Dropped while it held a stamp: its frame may have gone out.
        if let Some(h) = self.stamp.take() {
            end_unfinished(self.idem, self.first, self.topic, h, true, self.count);
        }
    }
}

/// Ends a send that will not be answered. One that may have been stored
/// keeps its sequence and is remembered for a resend of the same message;
/// its producer id is dropped so that the later sends of the queue do not
/// wait behind a gap.
fn end_unfinished(
    idem: &Idempotence,
    first: MsgId,
    topic: &str,
    h: Pending,
    maybe_stored: bool,
    count: u64,
) {
    if maybe_stored {
        h.ids
            .finish_send(topic, h.queue, h.stamp, count, Ending::Unknown);
        if idem.drop_ids(&h.broker_name, &h.ids) {
            tracing::info!(%topic, broker = %h.broker_name, producer_id = h.ids.producer_id(), "a send's outcome is unknown; later sends take a new producer id, and resending the same message retries it with its first sequence");
        }
        idem.remember(first, topic, h);
    } else {
        h.ids
            .finish_send(topic, h.queue, h.stamp, count, Ending::NotStored);
        idem.forget(first);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_is_checked_and_given_ids_before_sending() {
        assert!(matches!(prepare(Vec::new()), Err(Error::BadArgument(_))));

        let mixed = vec![Message::new("a", "1"), Message::new("b", "2")];
        assert!(matches!(prepare(mixed), Err(Error::BadArgument(_))));

        let bad_name = vec![Message::new("no spaces", "1")];
        assert!(matches!(prepare(bad_name), Err(Error::BadArgument(_))));

        let id = MsgId::generate();
        let fresh = Message::new("t", "x");
        let batch = vec![fresh.clone(), fresh, Message::new("t", "y").with_msg_id(id)];
        let Ok(sent) = prepare(batch) else {
            panic!("a valid batch was refused");
        };
        assert!(sent.iter().all(|m| m.topic == "t"));
        // Two copies of one message are two messages.
        assert_ne!(sent[0].msg_id, sent[1].msg_id);
        assert_ne!(sent[0].born_timestamp, 0);
        assert_eq!(sent[2].msg_id, id);
    }

    #[test]
    fn receipts_number_a_batch_from_the_first_offset() {
        let messages = vec![
            Message::new("t", "a").into_wire(),
            Message::new("t", "b").into_wire(),
        ];
        let result = SendResult {
            duplicate: false,
            status: SendStatus::SendOk,
            queue: 2,
            first_offset: 7,
            msg_ids: messages.iter().map(|m| m.msg_id).collect(),
        };
        let ids: Vec<_> = messages.iter().map(|m| m.msg_id).collect();
        let r = receipts("b1".into(), &result, messages);
        assert_eq!(r.len(), 2);
        assert_eq!(
            (r[0].queue, r[0].queue_offset, r[1].queue_offset),
            (2, 7, 8)
        );
        assert_eq!(r[1].msg_id, ids[1]);
        assert_eq!(r[0].broker_name, "b1");
        assert_eq!(
            (r[1].topic.as_str(), r[1].broker_name.as_str()),
            ("t", "b1")
        );
    }
}
