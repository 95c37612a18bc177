//! [`PushConsumer`]: the consumer hands each message to your
//! [`MessageHandler`] and stores the group's position itself.
//!
//! # Delivery guarantees
//!
//! **At least once** ([`DeliveryMode::AtLeastOnce`], the default). A
//! queue's committed offset is moved, every commit interval and when the
//! queue is given up, to the first message whose handler has not finished
//! (or past the last one pulled when none is unfinished). It never passes
//! an unfinished message. So:
//!
//! - a message whose handler returned [`ConsumeResult::Success`] is not
//!   delivered again, *unless* the consumer dies (crash, kill -9, lost
//!   machine) before the next commit: then it and every message after the
//!   committed offset are delivered again to the queue's next owner;
//! - a message whose handler returned [`ConsumeResult::Retry`], failed or
//!   panicked is handed back to the broker, which redelivers it to the
//!   same group after a back-off (10 s, 30 s, 1 min, ... by default, or the
//!   delay given), with [`ReceivedMessage::reconsume_times`] counting up;
//!   after [`PushConsumerBuilder::max_reconsume_times`] (default 16) it
//!   goes to the group's dead-letter topic (`%DLQ%<group>`) and stays there
//!   for inspection (`txmq dlq list`, `txmq consume %DLQ%<group>`);
//! - when it cannot be handed back (the broker is restarting, unreachable
//!   or paused, or no longer holds the record), it stays unfinished and is
//!   handed to the handler again here after
//!   [`PushConsumerBuilder::local_retry_delay`], as RocketMQ's push consumer
//!   re-consumes locally when `sendMessageBack` fails; the next Retry tries
//!   the hand-back again (to the dead-letter topic once the attempts, local
//!   ones included, reach the maximum). It is never dropped, and the other
//!   messages of its queue go on meanwhile;
//! - when a queue moves to another member (rebalancing), its holder stops
//!   pulling it, starts no handler on what it pulled and had not started
//!   (nor another attempt of a message waiting to be tried again), waits
//!   for the handlers running (up to the drain timeout), commits, and only
//!   then lets go: the new owner continues from there, with the messages
//!   left unstarted, so a clean rebalance repeats nothing (except when a
//!   message was waiting to be handled here again because its hand-back
//!   failed: the next owner takes it over, and with it the messages after
//!   it this member had finished).
//!
//! Nothing is lost: a message is only passed by the committed offset after
//! its handler succeeded or it was stored again for retry.
//!
//! A broker that comes back with a queue shorter than the consumer had read
//! (a power cut under async flush loses the unflushed tail) sends the
//! consumer back to the group's committed offset there, with a warning
//! giving both positions: messages written again below the old position are
//! delivered, and those between the committed offset and the old position
//! may be delivered again.
//!
//! **At most once** ([`DeliveryMode::AtMostOnce`]). Each pulled batch's
//! offset is committed *before* its messages are handled. A message is
//! never handled twice by the group, but one whose handler fails, or that
//! was pulled when the consumer died, is lost. Retry results are ignored.
//!
//! # Clustering, broadcasting, ordering
//!
//! Clustering (the default): the members of a group share the queues;
//! each queue is read by exactly one live member. Members heartbeat to the
//! brokers every rebalance interval; a member that joins, leaves, or dies
//! (no heartbeat within the broker's `--consumer-expiry`; at once when its
//! connection closes) causes a reassignment within a rebalance interval
//! plus that expiry. Broadcasting ([`PushConsumerBuilder::broadcast`]):
//! every member reads every queue; positions are kept in the consumer's
//! memory only, and a retried message is handled again locally.
//!
//! Orderly ([`PushConsumerBuilder::orderly`]): each queue is handled one
//! message at a time, in queue order; a Retry retries the same message in
//! place after a pause (blocking its queue) instead of handing it back;
//! after the maximum reconsume count it goes to the dead-letter topic and
//! the queue moves on (while the dead-letter topic cannot be written, it is
//! handled again in place, the queue waiting). Send with a sharding key
//! ([`Producer::send_ordered`](crate::Producer::send_ordered)) so that
//! one key's messages share a queue.
//!
//! # Replicated broker groups
//!
//! Heartbeats, pulls, offset queries, commits and hand-backs go to a broker
//! group's master, and to one of its slaves while the master is
//! unreachable, keeping each queue's position (see the
//! [pull consumer's docs](crate::consumer) for the details). A commit
//! answered `FLUSH_SLAVE_TIMEOUT` or `SLAVE_NOT_AVAILABLE` is stored on the
//! master but not confirmed by enough slaves: it is sent again at the next
//! commit tick.

mod rebalance;
mod worker;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use txmq_protocol::{
    parse_tag_expression, retry_topic, tag_hash, validate_topic_name, Done, ErrorCode, Request,
    Response, Role, WireError,
};
use txmq_remoting::connection_types::BoxFuture;
use txmq_remoting::{Connection, Service};

use super::read_targets::{ReadTargets, Target};
use super::{ConsumeFrom, ReceivedMessage};
use crate::config::{
    at_most_a_year, client_setters, countable, most_a_pull_returns, required_group,
};
use crate::nameserver::NameserverClient;
use crate::pool::ConnectionPool;
use crate::route::RouteCache;
use crate::transaction::BoxError;
use crate::{ClientConfig, Error, Result};

/// What a handler decided about a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConsumeResult {
    /// Handled; the message is done.
    Success,
    /// Not handled now: deliver it again later, after `delay` (`None`: the
    /// broker's back-off for the attempt; orderly and broadcasting
    /// consumers pause their default instead).
    Retry {
        /// How long to wait before the next attempt.
        delay: Option<Duration>,
    },
}

impl ConsumeResult {
    /// Retry after the default back-off.
    pub fn retry() -> ConsumeResult {
        ConsumeResult::Retry { delay: None }
    }

    /// Retry after `delay`.
    pub fn retry_after(delay: Duration) -> ConsumeResult {
        ConsumeResult::Retry { delay: Some(delay) }
    }
}

/// Handles the messages a [`PushConsumer`] receives. An error or a panic
/// counts as [`ConsumeResult::retry`].
///
/// ```
/// use txmq::{BoxError, ConsumeResult, MessageHandler, ReceivedMessage};
///
/// struct Billing;
///
/// impl MessageHandler for Billing {
///     async fn handle(&self, m: &ReceivedMessage) -> Result<ConsumeResult, BoxError> {
///         println!("{} (attempt {})", m.msg_id(), m.reconsume_times() + 1);
///         Ok(ConsumeResult::Success)
///     }
/// }
/// ```
///
/// A closure works too, through [`handler_fn`].
pub trait MessageHandler: Send + Sync + 'static {
    /// Handles one message.
    ///
    /// # Errors
    /// Any error; it counts as a retry.
    fn handle(
        &self,
        message: &ReceivedMessage,
    ) -> impl Future<Output = std::result::Result<ConsumeResult, BoxError>> + Send;
}

/// A [`MessageHandler`] from a closure returning a future of a [`ConsumeResult`]:
/// `handler_fn(|m| { let id = m.msg_id(); async move { ConsumeResult::Success } })`.
pub fn handler_fn<F, Fut>(f: F) -> FnHandler<F>
where
    F: Fn(&ReceivedMessage) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ConsumeResult> + Send,
{
    FnHandler(f)
}

/// See [`handler_fn`].
#[derive(Debug, Clone)]
pub struct FnHandler<F>(F);

impl<F, Fut> MessageHandler for FnHandler<F>
where
    F: Fn(&ReceivedMessage) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ConsumeResult> + Send,
{
    async fn handle(&self, m: &ReceivedMessage) -> std::result::Result<ConsumeResult, BoxError> {
        Ok((self.0)(m).await)
    }
}

/// When the committed offset moves relative to handling.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeliveryMode {
    /// Commit after handling: nothing lost, repeats possible (see the module docs).
    #[default]
    AtLeastOnce,
    /// Commit before handling: nothing repeated, losses possible.
    AtMostOnce,
}

/// Default handler concurrency of a consumer (20).
pub const DEFAULT_CONCURRENCY: usize = 20;
/// Default rebalance (and heartbeat) interval (10 s).
pub const DEFAULT_REBALANCE_INTERVAL: Duration = Duration::from_secs(10);
/// Default redeliveries before the dead-letter topic (16).
pub const DEFAULT_MAX_RECONSUME_TIMES: u32 = 16;

#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) concurrency: usize,
    pub(crate) orderly: bool,
    pub(crate) broadcast: bool,
    pub(crate) mode: DeliveryMode,
    pub(crate) from: ConsumeFrom,
    pub(crate) batch_size: u32,
    pub(crate) max_wait: Duration,
    pub(crate) max_queued_messages: usize,
    pub(crate) max_queued_bytes: usize,
    pub(crate) max_span: u64,
    pub(crate) max_reconsume_times: u32,
    pub(crate) rebalance_interval: Duration,
    pub(crate) commit_interval: Duration,
    pub(crate) local_retry_delay: Duration,
    pub(crate) drain_timeout: Duration,
    pub(crate) request_timeout: Duration,
    pub(crate) require_readable: bool,
}

/// A subscribed topic with its parsed tag expression.
#[derive(Debug, Clone)]
pub(crate) struct Sub {
    pub(crate) topic: String,
    pub(crate) expression: String,
    /// `None`: every tag.
    pub(crate) tags: Option<Vec<String>>,
    /// Hashes of `tags` for the broker's filter (empty: every tag).
    pub(crate) hashes: Vec<u64>,
}

impl Sub {
    fn new(topic: String, expression: &str) -> Result<Sub> {
        validate_topic_name(&topic).map_err(Error::BadArgument)?;
        let tags = parse_tag_expression(expression).map_err(Error::BadArgument)?;
        let hashes = tags.iter().flatten().map(|t| tag_hash(Some(t))).collect();
        Ok(Sub {
            topic,
            expression: if tags.is_none() {
                "*".into()
            } else {
                expression.trim().into()
            },
            tags,
            hashes,
        })
    }

    /// Whether a message with `tag` matches (the client's re-check of the
    /// broker's hash filter).
    pub(crate) fn matches(&self, tag: Option<&str>) -> bool {
        match (&self.tags, tag) {
            (None, _) => true,
            (Some(tags), Some(t)) => tags.iter().any(|x| x == t),
            (Some(_), None) => false,
        }
    }
}

/// A queue the consumer reads: topic and queue id on a broker.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueueId {
    /// The broker's name.
    pub broker_name: String,
    /// The topic.
    pub topic: String,
    /// The queue id.
    pub queue: u32,
}

pub(crate) struct WorkerHandle {
    /// Cancelled to make the worker give the queue up (cleanly).
    pub(crate) release: CancellationToken,
    /// Cancelled when the broker may have expired this member and given
    /// the queue to another one meanwhile: the worker stops at once,
    /// starting nothing more and committing nothing.
    pub(crate) expired: CancellationToken,
}

pub(crate) struct Shared<H> {
    pub(crate) group: String,
    pub(crate) client_id: String,
    pub(crate) subs: Vec<Sub>,
    pub(crate) settings: Settings,
    /// When the consumer started (ms, this machine's clock): where
    /// [`ConsumeFrom::Last`] starts a queue the group has no offset for.
    pub(crate) started_ms: u64,
    pub(crate) handler: Arc<H>,
    pub(crate) pool: ConnectionPool,
    pub(crate) routes: RouteCache,
    /// Where each broker group is asked (master, or a slave while the
    /// master is unreachable), from the routes.
    pub(crate) brokers: ReadTargets,
    pub(crate) workers: Mutex<HashMap<QueueId, WorkerHandle>>,
    /// Counts queues given up; an assignment asked for before the last one
    /// was given up may be stale.
    pub(crate) released: std::sync::atomic::AtomicU64,
    /// The shortest member expiry the brokers announced, in ms (0: none yet).
    pub(crate) broker_expiry_ms: std::sync::atomic::AtomicU64,
    /// When the last heartbeat each broker answered was sent, by broker name.
    pub(crate) answered: dashmap::DashMap<String, std::time::Instant>,
    /// Queues given up without their final commit stored.
    pub(crate) commit_failures: std::sync::atomic::AtomicU64,
    /// Broadcasting: each queue's position, kept here only.
    pub(crate) local_offsets: Mutex<HashMap<QueueId, u64>>,
    /// Wakes the rebalance loop (a broker's notice, a queue given up).
    pub(crate) rebalance: Arc<Notify>,
    pub(crate) permits: Semaphore,
    /// Hard stop: every task ends at once, nothing more is committed.
    pub(crate) cancel: CancellationToken,
    /// Stops the rebalance loop (shutdown).
    pub(crate) stop_rebalance: CancellationToken,
    /// Shutting down: rounds still heartbeat (holding the queues being
    /// drained) but take no new queue.
    pub(crate) shutting_down: std::sync::atomic::AtomicBool,
    pub(crate) tracker: TaskTracker,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<H> Shared<H> {
    pub(crate) fn sub(&self, topic: &str) -> Option<&Sub> {
        self.subs.iter().find(|s| s.topic == topic)
    }

    /// The connection to a broker group named by a route: its master, or
    /// a slave while the master is unreachable.
    pub(crate) async fn connect(&self, broker: &str) -> Result<Target> {
        self.brokers.connect(&self.pool, broker).await
    }
}

/// Answers the brokers' `NotifyRebalance` on the consumer's connections.
struct NoticeService {
    rebalance: Arc<Notify>,
}

impl Service for NoticeService {
    fn call(
        &self,
        _conn: &Connection,
        request: Request,
    ) -> BoxFuture<std::result::Result<Response, WireError>> {
        let answer = match request {
            Request::NotifyRebalance(_) => {
                self.rebalance.notify_one();
                Ok(Response::NotifyRebalance(Done {}))
            }
            other => Err(WireError::new(
                ErrorCode::UnsupportedRequest,
                format!("a consumer does not serve {} requests", other.kind()),
            )),
        };
        Box::pin(std::future::ready(answer))
    }
}

/// Builds a [`PushConsumer`].
#[derive(Debug, Clone)]
pub struct PushConsumerBuilder {
    config: ClientConfig,
    group: Option<String>,
    subscriptions: Vec<(String, String)>,
    settings: Settings,
}

impl Default for PushConsumerBuilder {
    fn default() -> Self {
        PushConsumerBuilder {
            config: ClientConfig::default(),
            group: None,
            subscriptions: Vec::new(),
            settings: Settings {
                concurrency: DEFAULT_CONCURRENCY,
                orderly: false,
                broadcast: false,
                mode: DeliveryMode::AtLeastOnce,
                from: ConsumeFrom::First,
                batch_size: 32,
                max_wait: Duration::from_secs(5),
                max_queued_messages: 1000,
                max_span: 2000,
                max_queued_bytes: 64 << 20,
                max_reconsume_times: DEFAULT_MAX_RECONSUME_TIMES,
                rebalance_interval: DEFAULT_REBALANCE_INTERVAL,
                commit_interval: Duration::from_secs(1),
                local_retry_delay: Duration::from_secs(1),
                drain_timeout: Duration::from_secs(10),
                request_timeout: ClientConfig::default().request_timeout,
                require_readable: false,
            },
        }
    }
}

impl PushConsumerBuilder {
    client_setters! {
        /// The consumer group (required).
        group;
        /// How long a request other than a pull waits for its answer (default 3 s).
        request_timeout(timeout: Duration) => request_timeout;
        /// How often the subscribed topics' routes are fetched to find new brokers (default 30 s).
        route_refresh_interval(interval: Duration) => route_refresh_interval;
    }

    /// Subscribes to `topic` with a tag expression: `*` for every message,
    /// or `a || b` for messages tagged `a` or `b`. May be called for
    /// several topics.
    pub fn subscribe(mut self, topic: impl Into<String>, expression: impl Into<String>) -> Self {
        self.subscriptions.push((topic.into(), expression.into()));
        self
    }

    /// How many handlers run at once across the consumer's queues (default 20).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.settings.concurrency = n;
        self
    }

    /// Handle each queue one message at a time, in order; retry in place.
    pub fn orderly(mut self, orderly: bool) -> Self {
        self.settings.orderly = orderly;
        self
    }

    /// Every member receives every message (default: the group shares the queues).
    pub fn broadcast(mut self, broadcast: bool) -> Self {
        self.settings.broadcast = broadcast;
        self
    }

    /// At least once (default) or at most once.
    pub fn delivery_mode(mut self, mode: DeliveryMode) -> Self {
        self.settings.mode = mode;
        self
    }

    /// Fail at start with [`Error::NoQueue`] when a subscribed topic is
    /// served but may be read on none of its brokers (write only): the
    /// brokers assign none of its queues, so the consumer would only wait
    /// until the topic is readable again. Default: start, with a warning.
    /// A topic with no route yet is waited for either way.
    pub fn require_readable(mut self, require: bool) -> Self {
        self.settings.require_readable = require;
        self
    }

    /// Where to start on queues the group has no offset for (default [`ConsumeFrom::First`]).
    pub fn from(mut self, from: ConsumeFrom) -> Self {
        self.settings.from = from;
        self
    }

    /// Messages asked for by one pull (default 32).
    pub fn batch_size(mut self, n: u32) -> Self {
        self.settings.batch_size = n;
        self
    }

    /// How long one pull waits at the broker for a message (default 5 s).
    pub fn max_wait(mut self, wait: Duration) -> Self {
        self.settings.max_wait = wait;
        self
    }

    /// Flow control: a queue stops being pulled while its first unfinished
    /// message (where its committed offset stands) is this many offsets or
    /// more behind what was pulled (default 2000, RocketMQ's
    /// `consumeConcurrentlyMaxSpan`): one message stuck in a slow handler,
    /// or retried here while it cannot be handed back, does not let the
    /// consumer run far ahead of its committed offset, which a restart
    /// would deliver again from.
    pub fn max_span(mut self, span: u64) -> Self {
        self.settings.max_span = span;
        self
    }

    /// Flow control: a queue stops being pulled while this many of its
    /// messages are pulled but unfinished (default 1000) ...
    pub fn max_queued_messages(mut self, n: usize) -> Self {
        self.settings.max_queued_messages = n;
        self
    }

    /// ... or while their bodies add up to this many bytes (default 64 MiB).
    pub fn max_queued_bytes(mut self, n: usize) -> Self {
        self.settings.max_queued_bytes = n;
        self
    }

    /// Redeliveries before a message goes to the dead-letter topic (default
    /// 16). A broadcasting consumer retries in place and then drops the
    /// message, with a warning: a broadcast group has no dead-letter topic.
    pub fn max_reconsume_times(mut self, n: u32) -> Self {
        self.settings.max_reconsume_times = n;
        self
    }

    /// How often the consumer heartbeats and rebalances (default 10 s).
    pub fn rebalance_interval(mut self, interval: Duration) -> Self {
        self.settings.rebalance_interval = interval;
        self
    }

    /// How often finished positions are committed (default 1 s).
    pub fn commit_interval(mut self, interval: Duration) -> Self {
        self.settings.commit_interval = interval;
        self
    }

    /// Pause before an orderly or broadcasting consumer retries a message
    /// in place when the handler gave no delay, and before a message that
    /// could not be handed back to the broker is handled again (default 1 s).
    pub fn local_retry_delay(mut self, delay: Duration) -> Self {
        self.settings.local_retry_delay = delay;
        self
    }

    /// How long a queue being given up waits for the handlers running on
    /// its messages (default 10 s); after that it lets go without them
    /// (their messages are delivered again to the new owner). Messages
    /// pulled and not started are not started then: the new owner gets
    /// them.
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.settings.drain_timeout = timeout;
        self
    }

    /// Starts consuming with `handler`.
    ///
    /// # Errors
    /// [`Error::BadArgument`] for a missing group or subscription, an
    /// invalid topic name or tag expression, or a zero setting.
    pub async fn start<H: MessageHandler>(self, handler: H) -> Result<PushConsumer> {
        self.config.validate()?;
        let group = required_group(self.group, "consumer")?;
        if self.subscriptions.is_empty() {
            return Err(Error::BadArgument(
                "a push consumer needs at least one subscription".into(),
            ));
        }
        let mut settings = self.settings;
        if settings.concurrency == 0
            || settings.batch_size == 0
            || settings.max_queued_messages == 0
            || settings.max_span == 0
            || settings.rebalance_interval.is_zero()
            || settings.commit_interval.is_zero()
            || settings.max_wait.is_zero()
        {
            return Err(Error::BadArgument(
                "concurrency, batch size, queued messages, span, intervals and max wait must be above zero"
                    .into(),
            ));
        }
        countable("concurrency", settings.concurrency)?;
        most_a_pull_returns(settings.batch_size)?;
        for (what, d) in [
            ("max wait", settings.max_wait),
            ("the rebalance interval", settings.rebalance_interval),
            ("the commit interval", settings.commit_interval),
            ("the local retry delay", settings.local_retry_delay),
            ("the drain timeout", settings.drain_timeout),
        ] {
            at_most_a_year(what, d)?;
        }
        settings.request_timeout = self.config.request_timeout;
        if self.config.client_id.is_empty() || self.config.client_id.len() > 255 {
            return Err(Error::BadArgument(
                "a consumer's client id must be 1 to 255 bytes long".into(),
            ));
        }
        if group.len() > 255 {
            return Err(Error::BadArgument(
                "a group name must be at most 255 bytes long".into(),
            ));
        }
        if !settings.broadcast {
            // Its retry topic is made from its name (the brokers refuse the
            // heartbeat otherwise): say so now, naming the group.
            crate::validate_group_name(&group).map_err(Error::BadArgument)?;
        }
        let mut subs: Vec<Sub> = Vec::new();
        for (topic, expr) in self.subscriptions {
            if subs.iter().any(|s| s.topic == topic) {
                return Err(Error::BadArgument(format!(
                    "topic '{topic}' is subscribed twice"
                )));
            }
            subs.push(Sub::new(topic, &expr)?);
        }
        if !settings.broadcast && settings.mode == DeliveryMode::AtLeastOnce {
            let retry = retry_topic(&group);
            if subs.iter().any(|s| s.topic == retry) {
                // The brokers refuse its heartbeat ("subscribed twice"),
                // which the consumer would retry for ever, reading nothing.
                return Err(Error::BadArgument(format!(
                    "topic '{retry}' is the retry topic of group '{group}', which the group's \
                     members read already (a message to retry comes back to them through it); \
                     to read it apart, consume it as another group"
                )));
            }
            subs.push(Sub::new(retry, "*")?);
        }
        let rebalance = Arc::new(Notify::new());
        let service: Arc<dyn Service> = Arc::new(NoticeService {
            rebalance: rebalance.clone(),
        });
        let pool = ConnectionPool::new(
            &self.config,
            Role::Consumer,
            Some(group.clone()),
            Some(service),
        );
        let nameservers = NameserverClient::new(self.config.nameservers.clone(), pool.clone());
        let routes = RouteCache::new(nameservers, self.config.route_refresh_interval, false);
        let shared = Arc::new(Shared {
            group,
            started_ms: txmq_protocol::now_millis(),
            client_id: self.config.client_id.clone(),
            subs,
            permits: Semaphore::new(settings.concurrency),
            settings,
            handler: Arc::new(handler),
            pool,
            routes,
            brokers: ReadTargets::default(),
            workers: Mutex::new(HashMap::new()),
            released: std::sync::atomic::AtomicU64::new(0),
            commit_failures: std::sync::atomic::AtomicU64::new(0),
            broker_expiry_ms: std::sync::atomic::AtomicU64::new(0),
            answered: dashmap::DashMap::new(),
            local_offsets: Mutex::new(HashMap::new()),
            rebalance,
            cancel: CancellationToken::new(),
            stop_rebalance: CancellationToken::new(),
            shutting_down: std::sync::atomic::AtomicBool::new(false),
            tracker: TaskTracker::new(),
        });
        // As for the pull consumer: no nameserver answering is an error at
        // start; a topic without a route yet is not (it is waited for).
        let mut reached = None;
        for sub in shared.subs.iter().filter(|s| !s.topic.starts_with('%')) {
            match shared.routes.get(&sub.topic).await {
                Ok(info)
                    if crate::consumer::unreadable(&info) && shared.settings.require_readable =>
                {
                    shared.pool.close();
                    return Err(Error::NoQueue {
                        topic: sub.topic.clone(),
                        what: "readable",
                    });
                }
                Ok(info) => {
                    crate::consumer::warn_if_unreadable(&sub.topic, &info);
                    reached = Some(Ok(()));
                }
                Err(Error::NoRoute { .. }) => reached = Some(Ok(())),
                Err(e) => {
                    reached.get_or_insert(Err(e));
                }
            }
        }
        if let Some(Err(e)) = reached {
            shared.pool.close();
            return Err(e);
        }
        // The first round runs before start returns, so a consumer that
        // started owns its queues (when the topics exist).
        rebalance::round(&shared).await;
        shared.tracker.spawn(rebalance::run(shared.clone()));
        let stop: Arc<dyn Stop> = shared.clone();
        Ok(PushConsumer {
            stop,
            _cancel: shared.cancel.clone().drop_guard(),
        })
    }
}

/// The parts of a running consumer that do not depend on the handler type.
trait Stop: Send + Sync {
    fn queues(&self) -> Vec<QueueId>;
    fn client_id(&self) -> &str;
    fn group(&self) -> &str;
    fn shutdown(&self) -> futures_util::future::BoxFuture<'_, Result<()>>;
}

impl<H: MessageHandler> Stop for Shared<H> {
    fn queues(&self) -> Vec<QueueId> {
        let mut q: Vec<QueueId> = lock(&self.workers).keys().cloned().collect();
        q.sort();
        q
    }

    fn client_id(&self) -> &str {
        &self.client_id
    }

    fn group(&self) -> &str {
        &self.group
    }

    fn shutdown(&self) -> futures_util::future::BoxFuture<'_, Result<()>> {
        Box::pin(rebalance::shutdown(self))
    }
}

/// A consumer that runs a [`MessageHandler`] for each message of its
/// subscriptions, as a member of a consumer group. See the [module
/// docs](self) for what is delivered when.
///
/// Dropping it stops everything at once without committing, as a crash
/// would: its queues go to the group's other members only once the
/// brokers give the member up (`--consumer-expiry`), and what it handled
/// since its last commit comes again. Call [`PushConsumer::shutdown`] to
/// finish the handlers in flight, commit and leave the group at once.
pub struct PushConsumer {
    stop: Arc<dyn Stop>,
    _cancel: tokio_util::sync::DropGuard,
}

impl std::fmt::Debug for PushConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushConsumer")
            .field("group", &self.stop.group())
            .field("client_id", &self.stop.client_id())
            .finish()
    }
}

impl PushConsumer {
    /// A builder; give it a nameserver, a group and a subscription.
    pub fn builder() -> PushConsumerBuilder {
        PushConsumerBuilder::default()
    }

    /// The consumer group.
    pub fn group(&self) -> &str {
        self.stop.group()
    }

    /// This member's id in the group.
    pub fn client_id(&self) -> &str {
        self.stop.client_id()
    }

    /// The queues this member reads now, sorted.
    pub fn queues(&self) -> Vec<QueueId> {
        self.stop.queues()
    }

    /// Stops pulling, waits for the handlers running (up to the drain
    /// timeout; messages pulled and not started are left for the group),
    /// commits, and leaves the group so that the other members take its
    /// queues over at once.
    ///
    /// # Errors
    /// [`Error::CommitFailed`] when some final commits could not be stored
    /// (everything is stopped all the same).
    pub async fn shutdown(self) -> Result<()> {
        self.stop.shutdown().await
    }
}
