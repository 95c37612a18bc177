//! [`PullConsumer`]: reads a topic as a member of a consumer group, with the
//! group's offsets stored on the brokers.
//!
//! # Delivery guarantee: at least once
//!
//! The group's offset of a queue moves only when [`PullConsumer::commit`]
//! (or [`PullConsumer::shutdown`]) stores it, and it moves exactly to the
//! position after the last message [`PullConsumer::poll`] handed out from
//! that queue. So:
//!
//! - a message handed out and committed is not delivered to the group again;
//! - a message handed out but not committed (the process crashed, or was
//!   dropped without `shutdown`, or the commit failed) is delivered again to
//!   the next consumer of the group, together with everything after it;
//! - a message pulled in the background but never handed out by `poll` is
//!   never committed, so it is delivered again as well.
//!
//! A group's first consumer also commits where it started on each queue
//! that had no offset (the first message, or the end with
//! [`ConsumeFrom::Last`]), so the group's position is fixed from then on.
//!
//! Process what `poll` returns before calling `commit`, and a crash can only
//! cause redelivery, never loss. Duplicates are possible; use
//! [`MsgId`] or the message key to detect them.
//!
//! A broker that comes back with a queue shorter than the consumer had read
//! (a power cut under async flush loses the unflushed tail) sends the
//! consumer back to the group's committed offset there, with a warning
//! giving both positions: messages written again below the old position
//! are delivered, and those between the committed offset and the old
//! position may be delivered again.
//!
//! # Replicated broker groups
//!
//! A consumer reads a broker group at its master, and at one of its slaves
//! while the master is unreachable (the route names no live master, or it
//! does not connect), as RocketMQ's consumers do; it goes back to the
//! master once the route names it again and it connects. A slave holds the
//! same queues at the same offsets, so the consumer goes on from where it
//! stands: never back, never skipping. A slave that has not caught up with
//! that position yet is waited for. Commits made to a slave are kept there
//! and reach the master when it is back (forward only).
//!
//! Under the master's sync replication, a commit may be answered
//! `FLUSH_SLAVE_TIMEOUT` or `SLAVE_NOT_AVAILABLE`: the master stored the
//! offset, but too few slaves hold it yet. [`PullConsumer::commit`] does
//! not fail for that; the queue stays to be committed, and the next commit
//! stores the offset again.
//!
//! # Queues
//!
//! A consumer reads every readable queue of the topic on every broker (there
//! is no rebalancing among members of a group yet: two consumers of one
//! group both read everything). Queues that appear later (a new broker, more
//! queues, or a topic that did not exist when the consumer started) are picked
//! up by the periodic route refresh and read from their first message when
//! the group has no offset there. A queue whose broker the route lists
//! without read permission (a topic made write only while the consumer
//! runs), or without that queue, is not pulled: its reader waits, at its
//! position, until a refresh lists it as readable again, and then goes on
//! from there. A pull the broker refuses for its permission asks for that
//! refresh at once; while every queue waits, the route is asked for every
//! second.

mod offsets;
mod pull_step;
pub mod push;
mod queue_reader;
mod read_targets;

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::join_all;
use tokio::sync::{mpsc, watch, Notify};
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;
use txmq_protocol::{validate_topic_name, CommitOffset, ErrorCode, MsgId, Role, StoredMessage};

use crate::config::{
    at_most_a_year, client_setters, countable, most_a_pull_returns, required_group,
};
use crate::nameserver::NameserverClient;
use crate::pool::ConnectionPool;
use crate::route::{RouteCache, RouteInfo};
use crate::{ClientConfig, Error, Result};

use offsets::OffsetTable;
pub use offsets::QueueKey;
use queue_reader::Fetched;
use read_targets::{ReadTargets, Target};

/// Default long-poll wait of one pull (5 s).
pub const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(5);
/// Default number of messages asked for by one pull (32).
pub const DEFAULT_BATCH_SIZE: u32 = 32;
/// Default number of pulled batches buffered ahead of `poll` (64).
pub const DEFAULT_BUFFERED_BATCHES: usize = 64;
/// Default largest number of messages one `poll` returns (256).
pub const DEFAULT_MAX_POLL_MESSAGES: usize = 256;
/// How often the route is asked for while the topic has no queue yet.
const NO_ROUTE_REFRESH: Duration = Duration::from_secs(1);

/// Where a group starts on a queue for which it has no committed offset.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConsumeFrom {
    /// At the first message still stored (the default).
    #[default]
    First,
    /// After the last message stored when the consumer starts: only new
    /// messages. A queue met later (a broker added, or away at the start,
    /// a rebalance, a topic made again) starts at its first message stored
    /// since the consumer started (the broker's store times against this
    /// machine's clock).
    Last,
}

/// A message as [`PullConsumer::poll`] hands it out.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReceivedMessage {
    /// The broker it was read from.
    pub broker_name: String,
    /// The message and where it is stored.
    pub stored: StoredMessage,
}

impl ReceivedMessage {
    /// `stored` as read from `broker_name`: for testing a handler;
    /// consumers make the real ones.
    pub fn new(broker_name: impl Into<String>, stored: StoredMessage) -> ReceivedMessage {
        ReceivedMessage {
            broker_name: broker_name.into(),
            stored,
        }
    }

    /// The message as sent, with its id.
    pub fn message(&self) -> &crate::WireMessage {
        &self.stored.message
    }
    /// Its id.
    pub fn msg_id(&self) -> MsgId {
        self.stored.message.msg_id
    }
    /// The topic it was sent to; for a retry (read from the group's retry
    /// topic) its original topic, as RocketMQ's consumers show it.
    pub fn topic(&self) -> &str {
        let m = &self.stored.message;
        if !m.topic.starts_with(txmq_protocol::RETRY_TOPIC_PREFIX) {
            return &m.topic;
        }
        m.properties
            .get(txmq_protocol::PROPERTY_REAL_TOPIC)
            .unwrap_or(&m.topic)
    }
    /// The topic of the queue [`ReceivedMessage::queue`] and
    /// [`ReceivedMessage::queue_offset`] name: [`ReceivedMessage::topic`],
    /// or for a retry the group's retry topic (`%RETRY%GROUP`).
    pub fn queue_topic(&self) -> &str {
        &self.stored.message.topic
    }
    /// Its key, if it has one.
    pub fn key(&self) -> Option<&str> {
        self.stored.message.key.as_deref()
    }
    /// Its tag, if it has one.
    pub fn tag(&self) -> Option<&str> {
        self.stored.message.tag.as_deref()
    }
    /// Its payload.
    pub fn body(&self) -> &Bytes {
        &self.stored.message.body
    }
    /// The queue it is stored in (on [`ReceivedMessage::broker_name`]).
    pub fn queue(&self) -> u32 {
        self.stored.queue
    }
    /// Its offset in that queue.
    pub fn queue_offset(&self) -> u64 {
        self.stored.queue_offset
    }
    /// When the broker stored it, in milliseconds since the Unix epoch.
    pub fn store_timestamp(&self) -> u64 {
        self.stored.store_timestamp
    }
    /// How many times it was handed back for retry before this delivery
    /// (0 on the first delivery).
    pub fn reconsume_times(&self) -> u32 {
        self.stored
            .message
            .properties
            .get(txmq_protocol::PROPERTY_RECONSUME_TIMES)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

/// Builds a [`PullConsumer`].
#[derive(Debug, Clone)]
pub struct PullConsumerBuilder {
    config: ClientConfig,
    group: Option<String>,
    topic: Option<String>,
    from: ConsumeFrom,
    settings: Settings,
}

#[derive(Debug, Clone)]
struct Settings {
    max_wait: Duration,
    batch_size: u32,
    buffered_batches: usize,
    max_poll_messages: usize,
    request_timeout: Duration,
}

impl Default for PullConsumerBuilder {
    fn default() -> Self {
        PullConsumerBuilder {
            config: ClientConfig::default(),
            group: None,
            topic: None,
            from: ConsumeFrom::First,
            settings: Settings {
                max_wait: DEFAULT_MAX_WAIT,
                batch_size: DEFAULT_BATCH_SIZE,
                buffered_batches: DEFAULT_BUFFERED_BATCHES,
                max_poll_messages: DEFAULT_MAX_POLL_MESSAGES,
                request_timeout: ClientConfig::default().request_timeout,
            },
        }
    }
}

impl PullConsumerBuilder {
    client_setters! {
        /// The consumer group (required). The group's offsets are stored on the brokers.
        group;
        /// How long a request other than a pull waits for its answer (default 3 s);
        /// a pull waits this much longer than its long-poll wait.
        request_timeout(timeout: Duration) => request_timeout;
        /// How often the topic's route is fetched to find new queues (default 30 s).
        route_refresh_interval(interval: Duration) => route_refresh_interval;
    }

    /// The topic to read (required).
    pub fn topic(mut self, topic: impl Into<String>) -> Self {
        self.topic = Some(topic.into());
        self
    }

    /// Where to start on queues the group has no offset for (default [`ConsumeFrom::First`]).
    pub fn from(mut self, from: ConsumeFrom) -> Self {
        self.from = from;
        self
    }

    /// How long one pull waits at the broker for a message (default 5 s).
    /// Longer means fewer requests when idle; it does not delay messages.
    pub fn max_wait(mut self, wait: Duration) -> Self {
        self.settings.max_wait = wait;
        self
    }

    /// How many messages one pull asks for (default 32).
    pub fn batch_size(mut self, n: u32) -> Self {
        self.settings.batch_size = n;
        self
    }

    /// How many pulled batches are buffered ahead of `poll` (default 64).
    pub fn buffered_batches(mut self, n: usize) -> Self {
        self.settings.buffered_batches = n;
        self
    }

    /// The largest number of messages one [`PullConsumer::poll`] returns (default 256).
    pub fn max_poll_messages(mut self, n: usize) -> Self {
        self.settings.max_poll_messages = n;
        self
    }

    /// Starts the consumer: fetches the topic's route, asks each broker
    /// where the group stands on each queue, and starts reading every queue
    /// in the background. A topic with no route yet is not an error: the
    /// consumer waits for it to appear (checking every second).
    ///
    /// # Errors
    /// [`Error::BadArgument`] when the group or topic is missing or invalid,
    /// or a setting is zero; [`Error::Remoting`] when no nameserver answers.
    pub async fn build(self) -> Result<PullConsumer> {
        self.config.validate()?;
        let group = required_group(self.group, "consumer")?;
        let topic = self
            .topic
            .ok_or_else(|| Error::BadArgument("a consumer needs a topic".into()))?;
        validate_topic_name(&topic).map_err(Error::BadArgument)?;
        let mut settings = self.settings;
        if settings.batch_size == 0
            || settings.buffered_batches == 0
            || settings.max_poll_messages == 0
        {
            return Err(Error::BadArgument(
                "batch size, buffered batches and max poll messages must be above zero".into(),
            ));
        }
        countable("buffered batches", settings.buffered_batches)?;
        most_a_pull_returns(settings.batch_size)?;
        at_most_a_year("max wait", settings.max_wait)?;
        settings.request_timeout = self.config.request_timeout;

        let pool = ConnectionPool::new(&self.config, Role::Consumer, Some(group.clone()), None);
        let nameservers = NameserverClient::new(self.config.nameservers.clone(), pool.clone());
        let routes = RouteCache::new(nameservers, self.config.route_refresh_interval, false);
        let initial = match routes.get(&topic).await {
            Ok(info) => {
                warn_if_unreadable(&topic, &info);
                Some(info)
            }
            Err(Error::NoRoute { .. }) => {
                tracing::warn!(%topic, "no route for the topic yet; waiting for it to appear");
                None
            }
            Err(e) => return Err(e),
        };

        let (tx, rx) = mpsc::channel(settings.buffered_batches);
        let cancel = CancellationToken::new();
        let shared = Arc::new(Shared {
            topic,
            group,
            settings,
            from: self.from,
            started_ms: txmq_protocol::now_millis(),
            refresh_interval: self.config.route_refresh_interval,
            pool,
            routes,
            brokers: ReadTargets::default(),
            offsets: Mutex::new(OffsetTable::default()),
            readers: Mutex::new(HashSet::new()),
            unreadable: watch::Sender::new(HashSet::new()),
            refresh_now: Notify::new(),
            tx,
            cancel: cancel.clone(),
            tracker: TaskTracker::new(),
        });
        if let Some(info) = initial {
            shared.adopt_route(&info, Some(self.from)).await;
        }
        shared.tracker.spawn(refresh_routes(shared.clone()));
        Ok(PullConsumer {
            shared,
            rx,
            pending: VecDeque::new(),
            _stop: cancel.drop_guard(),
        })
    }
}

/// A consumer that the application polls for messages.
///
/// Background tasks long-poll every queue of the topic and buffer what they
/// read; [`PullConsumer::poll`] hands it out, and [`PullConsumer::commit`]
/// stores the group's position. See the [module docs](self) for exactly
/// what is delivered again after a restart. Dropping the consumer stops the
/// background tasks without committing; call [`PullConsumer::shutdown`] to
/// commit.
///
/// ```no_run
/// # async fn demo() -> txmq::Result<()> {
/// use std::time::Duration;
/// use txmq::PullConsumer;
///
/// let mut consumer = PullConsumer::builder()
///     .nameserver("127.0.0.1:9876")
///     .group("billing")
///     .topic("orders")
///     .build()
///     .await?;
/// loop {
///     let batch = consumer.poll(Duration::from_secs(1)).await?;
///     if batch.is_empty() {
///         break;
///     }
///     for m in &batch {
///         println!("{} {:?}", m.msg_id(), m.body());
///     }
///     consumer.commit().await?; // the group stands after this batch
/// }
/// consumer.shutdown().await
/// # }
/// ```
#[derive(Debug)]
pub struct PullConsumer {
    shared: Arc<Shared>,
    rx: mpsc::Receiver<Fetched>,
    pending: VecDeque<PendingBatch>,
    _stop: DropGuard,
}

#[derive(Debug)]
struct PendingBatch {
    key: Arc<QueueKey>,
    messages: VecDeque<StoredMessage>,
    next_offset: u64,
    generation: Option<u64>,
}

/// What the consumer's background tasks share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) topic: String,
    pub(crate) group: String,
    settings: Settings,
    /// Where a queue the group has no offset for starts.
    from: ConsumeFrom,
    /// When the consumer started (ms, this machine's clock): where
    /// [`ConsumeFrom::Last`] starts such a queue.
    pub(crate) started_ms: u64,
    refresh_interval: Duration,
    pub(crate) pool: ConnectionPool,
    routes: RouteCache,
    /// Where each broker group is read (master or slave), from the latest route.
    pub(crate) brokers: ReadTargets,
    offsets: Mutex<OffsetTable>,
    readers: Mutex<HashSet<QueueKey>>,
    /// The queues read that the latest route does not let be read (no
    /// read permission on their broker, or no such queue): their readers
    /// wait without pulling. Never locked together with `readers`.
    pub(crate) unreadable: watch::Sender<HashSet<QueueKey>>,
    /// Asks the route refresh to run now (a pull refused for permission).
    pub(crate) refresh_now: Notify,
    pub(crate) tx: mpsc::Sender<Fetched>,
    pub(crate) cancel: CancellationToken,
    tracker: TaskTracker,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while holding these locks; a poisoned one is still consistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    pub(crate) fn offsets(&self) -> MutexGuard<'_, OffsetTable> {
        lock(&self.offsets)
    }

    /// The pooled connection to `key`'s broker group: its master, or a
    /// slave while the master is unreachable (see [`ReadTargets`]).
    ///
    /// # Errors
    /// [`Error::UnknownBroker`] when no route named the broker;
    /// [`Error::Broker`] when none of its brokers can be connected to.
    pub(crate) async fn connect(&self, key: &QueueKey) -> Result<Target> {
        self.brokers.connect(&self.pool, &key.broker_name).await
    }

    /// Notes the brokers of `info`, which queues read it does not let be
    /// read, and starts a reader for each readable queue not read yet.
    /// With `initial`, the start offsets are asked for before returning,
    /// from that position; later queues start where the consumer's
    /// [`ConsumeFrom`] says when the group has no offset.
    async fn adopt_route(self: &Arc<Self>, info: &RouteInfo, initial: Option<ConsumeFrom>) {
        for b in &info.route.brokers {
            self.brokers.update(b);
        }
        let (new, unreadable): (Vec<QueueKey>, HashSet<QueueKey>) = {
            let mut readers = lock(&self.readers);
            let new = info
                .readable
                .iter()
                .map(|q| QueueKey {
                    broker_name: q.broker_name.clone(),
                    queue: q.queue,
                })
                .filter(|k| readers.insert(k.clone()))
                .collect();
            let unreadable = readers
                .iter()
                .filter(|k| listed_unreadable(info, k))
                .cloned()
                .collect();
            (new, unreadable)
        };
        self.unreadable.send_if_modified(|now| {
            if *now == unreadable {
                return false;
            }
            let stopped = unreadable.difference(now).count();
            let resumed = now.difference(&unreadable).count();
            if stopped > 0 {
                tracing::warn!(topic = %self.topic, queues = stopped, "the route no longer lets queues of the topic be read (write only, or gone); they are not pulled until it does");
            }
            if resumed > 0 {
                tracing::info!(topic = %self.topic, queues = resumed, "queues of the topic may be read again; pulling them from where they stopped");
            }
            *now = unreadable;
            true
        });
        if new.is_empty() {
            return;
        }
        let from = initial.unwrap_or(self.from);
        let starts: Vec<Option<u64>> = if initial.is_some() {
            join_all(new.iter().map(|k| async move {
                match queue_reader::initial_offset(self, k, from).await {
                    Ok(o) => Some(o),
                    Err(e) => {
                        tracing::warn!(topic = %self.topic, broker = %k.broker_name, queue = k.queue, error = %crate::error::chain(&e), "cannot ask for the group's offset yet");
                        None
                    }
                }
            }))
            .await
        } else {
            vec![None; new.len()]
        };
        for (key, start) in new.into_iter().zip(starts) {
            tracing::debug!(topic = %self.topic, broker = %key.broker_name, queue = key.queue, "reading queue");
            self.tracker
                .spawn(queue_reader::run(self.clone(), Arc::new(key), start, from));
        }
    }
}

/// Whether `info` lists `key`'s broker but not `key` among its readable
/// queues (no read permission there, or no such queue). A broker the route
/// does not list (gone from the nameserver for now) is not such a refusal:
/// its readers keep trying, as with any broker that does not answer.
fn listed_unreadable(info: &RouteInfo, key: &QueueKey) -> bool {
    info.route
        .brokers
        .iter()
        .any(|b| b.broker_name == key.broker_name)
        && !info
            .readable
            .iter()
            .any(|q| q.broker_name == key.broker_name && q.queue == key.queue)
}

/// Whether `info` names brokers but none lets the topic be read.
pub(crate) fn unreadable(info: &RouteInfo) -> bool {
    info.readable.is_empty() && !info.route.brokers.is_empty()
}

/// Warns that `topic`'s route names brokers but none lets it be read
/// (write only): none of its queues is read until its permission includes
/// read again.
pub(crate) fn warn_if_unreadable(topic: &str, info: &RouteInfo) {
    if unreadable(info) {
        tracing::warn!(%topic, "the topic may not be read on any of its brokers (write only); waiting until it may");
    }
}

/// Fetches the route periodically (every second while there is no queue)
/// and starts readers for new queues.
async fn refresh_routes(shared: Arc<Shared>) {
    loop {
        // Nothing to read: look again soon.
        let reading = lock(&shared.readers).len();
        let idle = reading == 0 || reading == shared.unreadable.borrow().len();
        let wait = if idle {
            NO_ROUTE_REFRESH.min(shared.refresh_interval)
        } else {
            shared.refresh_interval
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shared.refresh_now.notified() => {}
            _ = shared.cancel.cancelled() => return,
        }
        let refreshed = tokio::select! {
            r = shared.routes.refresh(&shared.topic) => r,
            _ = shared.cancel.cancelled() => return,
        };
        match refreshed {
            Ok(info) => shared.adopt_route(&info, None).await,
            Err(Error::NoRoute { .. }) => {
                tracing::debug!(topic = %shared.topic, "still no route for the topic");
            }
            Err(e) => {
                tracing::warn!(topic = %shared.topic, error = %crate::error::chain(&e), "cannot refresh the route")
            }
        }
    }
}

impl PullConsumer {
    /// A builder; give it a nameserver, a group and a topic.
    pub fn builder() -> PullConsumerBuilder {
        PullConsumerBuilder::default()
    }

    /// The consumer group.
    pub fn group(&self) -> &str {
        &self.shared.group
    }

    /// The topic read.
    pub fn topic(&self) -> &str {
        &self.shared.topic
    }

    /// The queues being read, sorted: the topic's queues the route lets
    /// this consumer read (not those of a broker it lists as write only).
    pub fn queues(&self) -> Vec<QueueKey> {
        let unreadable = self.shared.unreadable.borrow().clone();
        let mut keys: Vec<QueueKey> = lock(&self.shared.readers)
            .iter()
            .filter(|k| !unreadable.contains(*k))
            .cloned()
            .collect();
        keys.sort();
        keys
    }

    /// Up to the configured maximum of messages (default 256): whatever is
    /// buffered, or, when nothing is, the first batch to arrive within
    /// `timeout` (an empty `Vec` when none does). Messages of one queue come
    /// in queue order.
    ///
    /// Cancel safe: if the future is dropped before it completes, no message
    /// is lost or marked handed out.
    ///
    /// # Errors
    /// None at present: failed pulls are retried in the background and
    /// logged. The `Result` leaves room for reporting them.
    pub async fn poll(&mut self, timeout: Duration) -> Result<Vec<ReceivedMessage>> {
        let max = self.shared.settings.max_poll_messages;
        self.poll_at_most(max, timeout).await
    }

    /// As [`PullConsumer::poll`], but at most `max` messages (at least one).
    /// The rest stays buffered for the next poll.
    ///
    /// # Errors
    /// As [`PullConsumer::poll`].
    pub async fn poll_at_most(
        &mut self,
        max: usize,
        timeout: Duration,
    ) -> Result<Vec<ReceivedMessage>> {
        let max = max.max(1);
        if self.pending.is_empty() {
            // The only await: receiving is cancel safe, and nothing below awaits.
            match tokio::time::timeout(timeout, self.rx.recv()).await {
                Ok(Some(batch)) => self.pending.push_back(batch.into()),
                Ok(None) | Err(_) => return Ok(Vec::new()),
            }
        }
        let mut available: usize = self.pending.iter().map(|b| b.messages.len()).sum();
        while available < max {
            match self.rx.try_recv() {
                Ok(batch) => {
                    available += batch.messages.len();
                    self.pending.push_back(batch.into());
                }
                Err(_) => break,
            }
        }
        Ok(take_messages(
            &mut self.pending,
            max,
            &mut self.shared.offsets(),
        ))
    }

    /// Stores the group's offset of every queue that `poll` handed messages
    /// out from since the last commit: the position after the last one (and
    /// the start position of queues where the group had no offset yet).
    /// Call it after processing what `poll` returned. Positions of
    /// messages read from a topic deleted since (and maybe made again
    /// under its name) are dropped, not committed: they mean nothing in
    /// the new topic, and that is not an error.
    ///
    /// # Errors
    /// The first failure among the queues' commits; the others are still
    /// committed, and a failed queue is tried again by the next commit.
    pub async fn commit(&self) -> Result<()> {
        commit(&self.shared).await
    }

    /// Stops reading, commits what `poll` handed out, and closes the
    /// connections. Messages buffered but not handed out are not committed,
    /// so the group gets them again.
    ///
    /// # Errors
    /// As [`PullConsumer::commit`].
    pub async fn shutdown(self) -> Result<()> {
        self.shared.cancel.cancel();
        self.shared.tracker.close();
        self.shared.tracker.wait().await;
        let result = commit(&self.shared).await;
        self.shared.pool.close();
        result
    }
}

impl From<Fetched> for PendingBatch {
    fn from(f: Fetched) -> Self {
        PendingBatch {
            key: f.key,
            messages: f.messages.into(),
            next_offset: f.next_offset,
            generation: f.generation,
        }
    }
}

/// Takes up to `max` messages from the front of `pending`, recording per
/// queue the position after the last one taken (after the whole batch when
/// it is used up).
fn take_messages(
    pending: &mut VecDeque<PendingBatch>,
    max: usize,
    offsets: &mut OffsetTable,
) -> Vec<ReceivedMessage> {
    let mut out = Vec::new();
    while out.len() < max {
        let Some(batch) = pending.front_mut() else {
            break;
        };
        if batch.messages.front().is_some_and(|m| {
            offsets
                .handed_out_to(&batch.key)
                .is_some_and(|h| m.queue_offset < h)
        }) {
            // The reader went back (see `pull_step`).
            offsets.rewound(&batch.key);
        }
        offsets.read_from(&batch.key, batch.generation);
        let take = (max - out.len()).min(batch.messages.len());
        let mut last = None;
        for stored in batch.messages.drain(..take) {
            last = Some(stored.queue_offset);
            out.push(ReceivedMessage {
                broker_name: batch.key.broker_name.clone(),
                stored,
            });
        }
        if batch.messages.is_empty() {
            offsets.handed_out(&batch.key, batch.next_offset);
            pending.pop_front();
        } else if let Some(last) = last {
            offsets.handed_out(&batch.key, last + 1);
        }
    }
    out
}

async fn commit(shared: &Shared) -> Result<()> {
    let todo: Vec<_> = {
        let offsets = shared.offsets();
        offsets
            .to_commit()
            .into_iter()
            .map(|(key, offset)| {
                let generation = offsets.generation(&key);
                (key, offset, generation)
            })
            .collect()
    };
    let results = join_all(todo.into_iter().map(|(key, offset, generation)| async move {
        let request = CommitOffset {
            group: shared.group.clone(),
            topic: shared.topic.clone(),
            queue: key.queue,
            offset,
            owner: None,
            forward_only: false,
            topic_generation: generation,
        };
        let mut target = shared.connect(&key).await?;
        let mut answer = target.conn.call(request.clone()).await;
        if answer.as_ref().is_err_and(crate::error::not_master) {
            // A fenced master (the controller elected another): commit at
            // the master a fresh route names, once.
            if let Ok(info) = shared.routes.refresh(&shared.topic).await {
                for b in &info.route.brokers {
                    shared.brokers.update(b);
                }
            }
            target = shared.connect(&key).await?;
            answer = target.conn.call(request).await;
        }
        match answer {
            Ok(_) => {}
            Err(e) if unconfirmed_commit(&e) => {
                // Stored on the master, not yet on enough of its slaves:
                // not marked committed, so the next commit stores it again.
                tracing::debug!(topic = %shared.topic, broker = %key.broker_name, queue = key.queue, offset, error = %e, "commit stored on the master only; committing again next time");
                return Ok(());
            }
            Err(e)
                if generation.is_some()
                    && e.remote().is_some_and(|w| w.code == ErrorCode::UnknownTopic) =>
            {
                // Read from a topic deleted since (maybe made again under
                // its name): its positions went with it.
                tracing::info!(topic = %shared.topic, broker = %key.broker_name, queue = key.queue, offset, "not committed: the topic was deleted after these messages were read");
                let mut offsets = shared.offsets();
                if offsets.generation(&key) == generation {
                    offsets.rewound(&key);
                }
                return Ok(());
            }
            Err(e) => return Err(Error::at_broker(&key.broker_name, &target.addr, e)),
        }
        let mut offsets = shared.offsets();
        // Not when the queue's topic changed while the commit was on its
        // way (its positions start anew).
        if offsets.generation(&key) == generation {
            offsets.committed(&key, offset);
        }
        drop(offsets);
        tracing::debug!(topic = %shared.topic, broker = %key.broker_name, queue = key.queue, offset, slave = target.slave, "committed");
        Ok(())
    }))
    .await;
    results.into_iter().collect()
}

/// A commit answered `FLUSH_SLAVE_TIMEOUT` or `SLAVE_NOT_AVAILABLE`: the
/// master stored the offset, but too few of its slaves confirmed it under
/// sync replication. Not an error for the caller; committed again later.
pub(crate) fn unconfirmed_commit(e: &txmq_remoting::Error) -> bool {
    e.remote().is_some_and(|w| {
        matches!(
            w.code,
            txmq_protocol::ErrorCode::FlushSlaveTimeout
                | txmq_protocol::ErrorCode::SlaveNotAvailable
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(broker: &str, queue: u32, offsets: std::ops::Range<u64>, next: u64) -> PendingBatch {
        let messages = offsets
            .map(|o| StoredMessage {
                message: txmq_protocol::Message::new("t", format!("m{o}")),
                queue,
                queue_offset: o,
                log_offset: 0,
                store_timestamp: 0,
            })
            .collect();
        PendingBatch {
            key: Arc::new(QueueKey {
                broker_name: broker.into(),
                queue,
            }),
            messages,
            next_offset: next,
            generation: None,
        }
    }

    #[test]
    fn poll_hands_out_in_order_and_records_what_it_handed_out() {
        let mut pending = VecDeque::from([batch("a", 0, 0..3, 3), batch("b", 1, 10..12, 12)]);
        let mut table = OffsetTable::default();

        let first = take_messages(&mut pending, 2, &mut table);
        let got: Vec<(String, u64)> = first
            .iter()
            .map(|m| (m.broker_name.clone(), m.queue_offset()))
            .collect();
        assert_eq!(got, [("a".to_string(), 0), ("a".to_string(), 1)]);
        let key_a = QueueKey {
            broker_name: "a".into(),
            queue: 0,
        };
        assert_eq!(table.to_commit(), vec![(key_a.clone(), 2)]);

        let rest = take_messages(&mut pending, 10, &mut table);
        assert_eq!(rest.len(), 3);
        assert_eq!(rest[0].queue_offset(), 2);
        assert_eq!(rest[2].queue_offset(), 11);
        assert!(pending.is_empty());
        let key_b = QueueKey {
            broker_name: "b".into(),
            queue: 1,
        };
        assert_eq!(table.to_commit(), vec![(key_a, 3), (key_b, 12)]);
    }

    #[test]
    fn a_batch_below_what_was_handed_out_moves_the_commit_back() {
        let key = QueueKey {
            broker_name: "a".into(),
            queue: 0,
        };
        let mut table = OffsetTable::default();
        table.started(&key, Some(0), 0);
        let mut pending = VecDeque::from([batch("a", 0, 0..8, 8)]);
        take_messages(&mut pending, 8, &mut table);
        table.committed(&key, 8);
        assert!(table.to_commit().is_empty());
        // The broker lost 3..8 and the reader went back to 3, where new
        // messages were written.
        let mut pending = VecDeque::from([batch("a", 0, 3..5, 5)]);
        assert_eq!(take_messages(&mut pending, 8, &mut table).len(), 2);
        assert_eq!(table.to_commit(), vec![(key, 5)]);
    }

    #[test]
    fn a_used_up_batch_commits_its_next_offset() {
        // The broker may skip offsets (e.g. below its min offset); the
        // position after the batch is what the next consumer starts from.
        let mut pending = VecDeque::from([batch("a", 0, 5..6, 9)]);
        let mut table = OffsetTable::default();
        assert_eq!(take_messages(&mut pending, 5, &mut table).len(), 1);
        let key = QueueKey {
            broker_name: "a".into(),
            queue: 0,
        };
        assert_eq!(table.to_commit(), vec![(key, 9)]);
    }
}
