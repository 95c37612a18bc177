//! [`TransactionProducer`]: prepares half messages, runs the local
//! transaction, commits or rolls back, and answers the brokers' check-backs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use txmq_protocol::{
    validate_topic_name, EndTransaction, Ended, ErrorCode, HalfMessage, Message as WireMessage,
    MsgId, PrepareTransaction, Prepared, ProducerStamp, Role, SendStatus, TxAction, TxSource,
};

use super::broker_links::BrokerLinks;
use super::check_service::CheckService;
use super::listener::{state_of, TransactionListener, TransactionState, TxContext};
use super::offsets::ConsumedOffset;
use super::placement::{distinct, place, Placement};
use crate::config::{at_most_a_year, client_setters, required_group};
use crate::drain::Drain;
use crate::nameserver::NameserverClient;
use crate::pool::ConnectionPool;
use crate::producer::idempotence::{
    id_refused, queue_stamped, Ending, Grant, Idempotence, Ids, Place, PREPARES,
};
use crate::producer::{random_start, shard_hash};
use crate::route::{RouteCache, RouteInfo};
use crate::{ClientConfig, Error, Message, Result};

/// What a closed transaction producer's errors call it.
pub(super) const TX_PRODUCER: &str = "the transaction producer";

/// Default interval at which the producer looks for new brokers and
/// reconnects to brokers it lost (1 s).
pub const DEFAULT_BROKER_REFRESH_INTERVAL: Duration = Duration::from_secs(1);

/// Default time a check-back may take before it is answered
/// [`TransactionState::Unknown`] (30 s).
pub const DEFAULT_CHECK_TIMEOUT: Duration = Duration::from_secs(30);

/// Pause before trying the same broker again (times the attempt number).
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// Pause before sending again a prepare the broker refused because an
/// earlier prepare of this producer, still in flight, had not arrived yet.
const REORDER_PAUSE: Duration = Duration::from_millis(10);

/// How many times one prepare takes a new producer id before it fails.
const MAX_RENEWALS: u32 = 3;

/// What became of a transactional send whose transaction was prepared.
///
/// A send returns it whenever the broker stored the half message, so the
/// local transaction may have run (see [`TxOutcome::state`]): never send
/// the message again on the strength of it. What became of the end is
/// [`TxOutcome::end`]; [`TxOutcome::committed`] and the other helpers read
/// it.
///
/// ```
/// # fn demo(outcome: txmq::TxOutcome) {
/// use txmq::TxEnd;
///
/// match &outcome.end {
///     TxEnd::Ended(ended) => println!("{}: {}", outcome.tx_id, ended.state.name()),
///     TxEnd::Refused(e) => eprintln!("not ended as decided: {e}"),
///     TxEnd::Lost(_) | TxEnd::NotSent => println!("the broker checks back"),
///     _ => {}
/// }
/// # }
/// ```
#[derive(Debug)]
#[non_exhaustive]
pub struct TxOutcome {
    /// The transaction id, unique on [`TxOutcome::broker_name`].
    pub tx_id: u64,
    /// The broker holding the transaction.
    pub broker_name: String,
    /// The id of the (first) message.
    pub msg_id: MsgId,
    /// The ids of all messages, in the order given.
    pub msg_ids: Vec<MsgId>,
    /// What the local transaction decided ([`TransactionListener::execute`];
    /// an error there is [`TransactionState::Unknown`]); `Rollback` without
    /// running it when the prepare was not [`SendStatus::SendOk`].
    pub state: TransactionState,
    /// How the prepare was stored. Anything but [`SendStatus::SendOk`]
    /// (say `FlushDiskTimeout`: the half message may not survive a power
    /// cut; `FlushSlaveTimeout` or `SlaveNotAvailable`: it is on the master
    /// only, not on enough slaves under sync replication) means the local
    /// transaction did not run and the transaction was rolled back, as
    /// RocketMQ does.
    pub prepare_status: SendStatus,
    /// What became of the commit or rollback [`TxOutcome::state`] asked for.
    pub end: TxEnd,
}

impl TxOutcome {
    /// An outcome: for testing code that handles outcomes; sends make the
    /// real ones. [`TxOutcome::msg_id`] is the first of `msg_ids`.
    ///
    /// # Errors
    /// [`Error::BadArgument`] when `msg_ids` is empty.
    pub fn new(
        tx_id: u64,
        broker_name: impl Into<String>,
        msg_ids: Vec<MsgId>,
        state: TransactionState,
        prepare_status: SendStatus,
        end: TxEnd,
    ) -> Result<TxOutcome> {
        let Some(&msg_id) = msg_ids.first() else {
            return Err(Error::BadArgument(format!(
                "outcome of transaction {tx_id} names no message"
            )));
        };
        Ok(TxOutcome {
            tx_id,
            broker_name: broker_name.into(),
            msg_id,
            msg_ids,
            state,
            prepare_status,
            end,
        })
    }

    /// True when the broker took the end as a commit: the messages are
    /// visible (also when the transaction was committed before, by a
    /// check-back: [`Ended::already`]).
    pub fn committed(&self) -> bool {
        self.ended()
            .is_some_and(|e| e.state == txmq_protocol::TxState::Committed)
    }

    /// True when the broker took the end as a rollback: the messages are
    /// dropped.
    pub fn rolled_back(&self) -> bool {
        self.ended()
            .is_some_and(|e| e.state == txmq_protocol::TxState::RolledBack)
    }

    /// True when the transaction may still be open on the broker, which
    /// then checks back ([`TransactionListener::check`]) until it learns
    /// the answer: [`TxEnd::NotSent`] and [`TxEnd::Lost`].
    pub fn pending(&self) -> bool {
        matches!(self.end, TxEnd::NotSent | TxEnd::Lost(_))
    }

    /// The broker's answer to the end, when it applied it ([`TxEnd::Ended`]).
    pub fn ended(&self) -> Option<&Ended> {
        match &self.end {
            TxEnd::Ended(e) => Some(e),
            _ => None,
        }
    }

    /// Why the end failed ([`TxEnd::Refused`] or [`TxEnd::Lost`]): an
    /// [`Error::EndTransaction`] naming the transaction and the action.
    pub fn end_error(&self) -> Option<&Error> {
        match &self.end {
            TxEnd::Refused(e) | TxEnd::Lost(e) => Some(e),
            _ => None,
        }
    }
}

/// What became of the end (commit or rollback) of a prepared transaction.
///
/// Whatever it is, the local transaction has already run (or was skipped
/// for a prepare not stored with [`SendStatus::SendOk`]): do not run it
/// again. The errors are [`Error::EndTransaction`], with the broker's code
/// when it answered ([`Error::code`]).
#[derive(Debug)]
#[non_exhaustive]
pub enum TxEnd {
    /// The broker applied the end: [`Ended::state`] is the transaction's
    /// state now ([`Ended::already`] when it had been ended so before, by a
    /// check-back, say; [`Ended::status`] is how durably the end is stored).
    Ended(Ended),
    /// The broker answered that it does not end the transaction as asked,
    /// and said why ([`Error::code`]): `TRANSACTION_ROLLED_BACK` (a
    /// check-back or an operator rolled it back first), `OFFSET_CONFLICT`
    /// (a commit whose consumed offsets moved meanwhile: the broker rolled
    /// it back), `TRANSACTION_PARKED` (the broker gave up checking back:
    /// only an operator ends it now), `UNKNOWN_TRANSACTION`, ...
    Refused(Error),
    /// The end, retried, did not reach the group's master or its answer
    /// never came (no connection, a timeout, `NOT_MASTER` during a
    /// failover): the broker may or may not have applied it. If it did not,
    /// the transaction stays open and the broker checks back.
    Lost(Error),
    /// Nothing was sent: the local transaction answered
    /// [`TransactionState::Unknown`] (or failed). The transaction stays
    /// open and the broker checks back.
    NotSent,
}

impl TxEnd {
    /// The end of a failed `EndTransaction`: [`TxEnd::Refused`] when the
    /// broker answered with a code no retry changes, else [`TxEnd::Lost`].
    fn failed(error: Error) -> TxEnd {
        let refused = error
            .remoting()
            .is_some_and(|e| e.remote().is_some() && !crate::error::retriable(e));
        if refused {
            TxEnd::Refused(error)
        } else {
            TxEnd::Lost(error)
        }
    }
}

/// Builds a [`TransactionProducer`].
pub struct TransactionProducerBuilder<L> {
    config: ClientConfig,
    group: Option<String>,
    listener: Option<Arc<L>>,
    first_check_delay: Option<Duration>,
    check_timeout: Option<Duration>,
    broker_refresh_interval: Duration,
}

impl<L> std::fmt::Debug for TransactionProducerBuilder<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransactionProducerBuilder")
            .field("config", &self.config)
            .field("group", &self.group)
            .field("listener", &self.listener.is_some())
            .field("first_check_delay", &self.first_check_delay)
            .field("check_timeout", &self.check_timeout)
            .field("broker_refresh_interval", &self.broker_refresh_interval)
            .finish()
    }
}

impl<L: TransactionListener> TransactionProducerBuilder<L> {
    fn new() -> Self {
        TransactionProducerBuilder {
            config: ClientConfig::default(),
            group: None,
            listener: None,
            first_check_delay: None,
            check_timeout: Some(DEFAULT_CHECK_TIMEOUT),
            broker_refresh_interval: DEFAULT_BROKER_REFRESH_INTERVAL,
        }
    }

    client_setters! {
        /// The producer group (required). The brokers check back on any live
        /// member of the group, so every process that may prepare transactions
        /// of the group must be able to answer for all of them.
        group;
        /// How long one request (prepare, end) waits for the broker's answer (default 3 s).
        send_timeout(timeout: Duration) => request_timeout;
        /// How many more attempts a prepare or an end gets after a retriable failure (default 2).
        retries(retries: u32) => send_retries;
        /// How long a topic's route is cached (default 30 s).
        route_refresh_interval(interval: Duration) => route_refresh_interval;
        /// How long [`TransactionProducer::close`] waits for transactions
        /// and check-backs in flight (default 10 s).
        close_timeout(timeout: Duration) => close_timeout;
    }

    /// The listener that runs local transactions and answers check-backs (required).
    pub fn listener(mut self, listener: L) -> Self {
        self.listener = Some(Arc::new(listener));
        self
    }

    /// As [`TransactionProducerBuilder::listener`], for a listener the
    /// application keeps a handle to.
    pub fn listener_arc(mut self, listener: Arc<L>) -> Self {
        self.listener = Some(listener);
        self
    }

    /// How old a transaction must be before the broker first checks back;
    /// `None` (the default) uses the broker's `--transaction-timeout`. At
    /// most the broker's `--max-delay` (7 days by default): a send asking
    /// for longer is refused (`BAD_ARGUMENT`).
    pub fn first_check_delay(mut self, delay: Option<Duration>) -> Self {
        self.first_check_delay = delay;
        self
    }

    /// How long [`TransactionListener::check`] may take before the producer
    /// answers [`TransactionState::Unknown`] for it (default 30 s); `None`:
    /// wait as long as it takes. An answer that comes after the broker gave
    /// up waiting is dropped by the broker.
    pub fn check_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.check_timeout = timeout;
        self
    }

    /// How often the producer asks the nameservers for the cluster's brokers
    /// and connects to those it has no connection to (default 1 s).
    pub fn broker_refresh_interval(mut self, interval: Duration) -> Self {
        self.broker_refresh_interval = interval;
        self
    }

    /// Starts the producer: connects to every broker the nameservers know,
    /// saying hello as a transaction producer of the group, so each can
    /// check back from now on; then keeps those connections open in the
    /// background (see [`TransactionProducer`]). Brokers that cannot be
    /// reached now are tried again every refresh interval.
    ///
    /// # Errors
    /// [`Error::BadArgument`] when no nameserver, group or listener is given
    /// or a setting is invalid; [`Error::Remoting`] when no nameserver answers.
    pub async fn start(self) -> Result<TransactionProducer<L>> {
        self.config.validate()?;
        let group = required_group(self.group, "transaction producer")?;
        let listener = self
            .listener
            .ok_or_else(|| Error::BadArgument("a transaction producer needs a listener".into()))?;
        at_most_a_year("the broker refresh interval", self.broker_refresh_interval)?;
        // (The first check delay goes to the broker, which holds it to its
        // --max-delay and says so.)
        at_most_a_year("the check timeout", self.check_timeout.unwrap_or_default())?;
        if self.broker_refresh_interval.is_zero() {
            return Err(Error::BadArgument(
                "the broker refresh interval must be above zero".into(),
            ));
        }
        let first_check_delay_ms = self
            .first_check_delay
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));

        let stop = CancellationToken::new();
        let drain = Arc::new(Drain::default());
        let service = Arc::new(CheckService {
            listener: listener.clone(),
            group: group.clone(),
            timeout: self.check_timeout,
            closed: stop.clone(),
            drain: drain.clone(),
        });
        let pool = ConnectionPool::new(
            &self.config,
            Role::TransactionProducer,
            Some(group.clone()),
            Some(service),
        );
        // Nameserver connections never carry check-backs.
        let ns_pool = ConnectionPool::new(
            &self.config,
            Role::TransactionProducer,
            Some(group.clone()),
            None,
        );
        let nameservers = NameserverClient::new(self.config.nameservers.clone(), ns_pool.clone());
        let routes = RouteCache::new(
            nameservers.clone(),
            self.config.route_refresh_interval,
            true,
        );
        let links = BrokerLinks::new(pool.clone(), nameservers, stop.clone());
        for (broker, e) in links.refresh().await? {
            tracing::warn!(%broker, error = %crate::error::chain(&e), "cannot connect to broker for check-backs; will try again");
        }
        tokio::spawn(links.clone().keep(self.broker_refresh_interval));
        Ok(TransactionProducer {
            inner: Arc::new(Inner {
                config: self.config,
                group,
                listener,
                first_check_delay_ms,
                pool,
                ns_pool,
                routes,
                links,
                turn: AtomicU64::new(random_start()),
                idempotence: Idempotence::default(),
                stop,
                drain,
            }),
        })
    }
}

/// Sends messages in transactions: the messages are stored invisibly
/// (prepared), the application's local transaction runs, and the messages
/// become visible (commit) or are dropped (rollback) as it decides.
///
/// A cheap `Clone` handle; many transactions may run at once. From
/// [`start`](TransactionProducerBuilder::start) until
/// [`close`](TransactionProducer::close) (or the last handle is dropped) the
/// producer keeps a connection to every broker of the cluster, looking for
/// new brokers and reconnecting lost ones every refresh interval (1 s), and
/// answers the brokers' check-backs for its group on those connections with
/// [`TransactionListener::check`], concurrently. Sends reuse the same
/// connections.
///
/// ```no_run
/// # use txmq::{BoxError, CheckRequest, Message, TransactionListener, TransactionState, TxContext};
/// # struct Orders;
/// # impl TransactionListener for Orders {
/// #     async fn execute(&self, _: &Message, _: &TxContext) -> Result<TransactionState, BoxError> { Ok(TransactionState::Commit) }
/// #     async fn check(&self, _: &CheckRequest) -> Result<TransactionState, BoxError> { Ok(TransactionState::Commit) }
/// # }
/// # async fn demo() -> Result<(), txmq::Error> {
/// use txmq::TransactionProducer;
///
/// let producer = TransactionProducer::builder()
///     .nameserver("127.0.0.1:9876")
///     .group("order-producers")
///     .listener(Orders)
///     .start()
///     .await?;
/// let outcome = producer
///     .send_in_transaction(Message::new("orders", "order 42").with_key("42"))
///     .await?;
/// println!("transaction {} on {}: {}", outcome.tx_id, outcome.broker_name, outcome.state.name());
/// producer.close().await?;
/// # Ok(())
/// # }
/// ```
pub struct TransactionProducer<L> {
    inner: Arc<Inner<L>>,
}

impl<L> Clone for TransactionProducer<L> {
    fn clone(&self) -> Self {
        TransactionProducer {
            inner: self.inner.clone(),
        }
    }
}

impl<L> std::fmt::Debug for TransactionProducer<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransactionProducer")
            .field("group", &self.inner.group)
            .field("client_id", &self.inner.config.client_id)
            .field("brokers", &self.inner.links.connected())
            .finish()
    }
}

struct Inner<L> {
    config: ClientConfig,
    group: String,
    listener: Arc<L>,
    first_check_delay_ms: Option<u64>,
    /// Broker connections, with the check-back service.
    pool: ConnectionPool,
    ns_pool: ConnectionPool,
    routes: RouteCache,
    links: BrokerLinks,
    turn: AtomicU64,
    /// Producer ids and prepare sequences per broker group.
    idempotence: Idempotence,
    stop: CancellationToken,
    /// Transactions and check-backs in flight, for [`TransactionProducer::close`].
    drain: Arc<Drain>,
}

impl<L> Inner<L> {
    fn shut(&self) {
        self.stop.cancel();
        self.pool.close();
        self.ns_pool.close();
    }
}

impl<L> Drop for Inner<L> {
    fn drop(&mut self) {
        // The background task holds clones of the pool; stop it with the last handle.
        self.shut();
    }
}

impl<L: TransactionListener> TransactionProducer<L> {
    /// A builder; give it a nameserver, a group and a listener.
    pub fn builder() -> TransactionProducerBuilder<L> {
        TransactionProducerBuilder::new()
    }

    /// The producer group.
    pub fn group(&self) -> &str {
        &self.inner.group
    }

    /// The listener.
    pub fn listener(&self) -> &L {
        &self.inner.listener
    }

    /// The settings in use.
    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    /// Names of the brokers this producer has an open connection to (and
    /// so can be checked back on), sorted.
    pub fn connected_brokers(&self) -> Vec<String> {
        self.inner.links.connected()
    }

    /// Asks the nameservers for the cluster now and connects to every broker
    /// not connected yet, instead of waiting for the next refresh; returns
    /// [`TransactionProducer::connected_brokers`].
    ///
    /// # Errors
    /// [`Error::Remoting`] when no nameserver answers; [`Error::Closed`]
    /// after [`TransactionProducer::close`].
    pub async fn refresh_brokers(&self) -> Result<Vec<String>> {
        let _in_flight = self.enter()?;
        for (broker, e) in self.inner.links.refresh().await? {
            tracing::debug!(%broker, error = %crate::error::chain(&e), "cannot connect for check-backs");
        }
        Ok(self.connected_brokers())
    }

    /// Sends `message` in a transaction: prepares it on the next writable
    /// queue in turn, runs [`TransactionListener::execute`], and commits or
    /// rolls back as it decides (nothing for [`TransactionState::Unknown`]
    /// or an error: the broker checks back later).
    ///
    /// The prepare is retried like [`Producer::send`](crate::Producer::send)
    /// (the same message id), on another broker only when the failed
    /// attempt cannot have reached its broker (no connection) or was
    /// refused: after a timeout or a connection lost while waiting it is
    /// retried on the same broker, which answers a repeated prepare with the
    /// transaction it already holds, so one message never becomes two
    /// transactions. The local transaction runs once, and the end is retried
    /// on the same broker after a lost connection (ending is idempotent).
    /// A prepare stored with any status but [`SendStatus::SendOk`] is rolled
    /// back without running the local transaction (see
    /// [`TxOutcome::prepare_status`]).
    ///
    /// A message's id names it in one transaction only: send a copy of a
    /// message in a second transaction and the broker refuses it with
    /// `DUPLICATE_MSG_ID` while it remembers the first. A message without
    /// an id of its own gets a new one at each send, so this concerns only
    /// ids fixed with [`Message::with_msg_id`] and the messages a listener
    /// is handed (they carry the id they were sent with).
    ///
    /// Once the half message is stored the answer is `Ok`, whatever
    /// becomes of the end: [`TxOutcome::end`] says whether the broker
    /// applied it ([`TxEnd::Ended`]), refused it ([`TxEnd::Refused`], say
    /// `TRANSACTION_ROLLED_BACK` because a check-back rolled it back while
    /// the local transaction ran), never answered ([`TxEnd::Lost`]: the
    /// broker checks back), or nothing was sent ([`TxEnd::NotSent`]). So an
    /// `Err` is safe to retry: the local transaction did not run.
    ///
    /// ```no_run
    /// # async fn demo<L: txmq::TransactionListener>(producer: txmq::TransactionProducer<L>) -> txmq::Result<()> {
    /// let outcome = producer.send_in_transaction(txmq::Message::new("orders", "o-1")).await?;
    /// if !outcome.committed() {
    ///     // Rolled back, refused, or left to the broker's check-back.
    ///     eprintln!("order o-1 not committed (yet): {:?}", outcome.end);
    /// }
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// Only before the local transaction ran: [`Error::Closed`],
    /// [`Error::BadArgument`], [`Error::NoRoute`], [`Error::NoQueue`], or
    /// [`Error::Broker`] with the prepare's failure (after a timeout the
    /// broker may hold the half message; it then checks back, and
    /// [`TransactionListener::check`] answers for a transaction that never
    /// ran).
    pub async fn send_in_transaction(&self, message: Message) -> Result<TxOutcome> {
        self.transact(vec![message], Placement::RoundRobin, &[])
            .await
    }

    /// As [`TransactionProducer::send_in_transaction`], on the queue that
    /// `shard_key` maps to (see [`Producer::send_ordered`](crate::Producer::send_ordered)),
    /// so that committed messages with the same key keep their order. As
    /// that send, it never auto-creates a topic: [`Error::NoRoute`] (and
    /// no local transaction) while the nameservers know no route of it.
    ///
    /// # Errors
    /// As [`TransactionProducer::send_in_transaction`].
    pub async fn send_in_transaction_ordered(
        &self,
        message: Message,
        shard_key: &str,
    ) -> Result<TxOutcome> {
        self.transact(vec![message], Placement::Hash(shard_hash(shard_key)), &[])
            .await
    }

    /// Sends several messages, of one topic or several, in one transaction:
    /// all are prepared on one broker that serves all their topics (each
    /// message on a queue of its topic; messages of one topic share a
    /// queue, in the order given) and all are committed or rolled back
    /// together. [`TransactionListener::execute`] gets the first message;
    /// [`TxContext::messages`] has all.
    ///
    /// # Errors
    /// As [`TransactionProducer::send_in_transaction`], and
    /// [`Error::NoCommonBroker`] when no broker serves all the topics.
    pub async fn send_messages_in_transaction(&self, messages: Vec<Message>) -> Result<TxOutcome> {
        self.transact(messages, Placement::RoundRobin, &[]).await
    }

    /// Sends `messages` in one transaction (as
    /// [`TransactionProducer::send_messages_in_transaction`]) that also
    /// commits consumer `offsets`: on commit the broker makes the messages
    /// visible and stores the offsets in one atomic log append; on rollback
    /// neither. With [`ConsumedOffset::after`] (an `expected` offset) this
    /// is a consume-transform-produce step that happens exactly once (see
    /// [`offsets`](super::offsets)).
    ///
    /// The offsets' queues must all be on one broker, and the transaction
    /// is placed there: each message's topic needs a writable queue on it.
    ///
    /// # Errors
    /// As [`TransactionProducer::send_in_transaction`]; before anything is
    /// sent, [`Error::BadArgument`] for offsets of several brokers or a
    /// topic with no writable queue on theirs. A commit whose offset moved
    /// meanwhile is rolled back by the broker: not an error but
    /// [`TxEnd::Refused`] with
    /// [`ErrorCode::OffsetConflict`] (see [`Error::code`]), naming the group, queue, expected and actual
    /// offsets; read the input again from the group's committed offset.
    pub async fn send_in_transaction_with_offsets(
        &self,
        messages: Vec<Message>,
        offsets: Vec<ConsumedOffset>,
    ) -> Result<TxOutcome> {
        self.transact(messages, Placement::RoundRobin, &offsets)
            .await
    }

    /// Closes the producer, and every clone of it. Later transactions fail
    /// with [`Error::Closed`] before anything is sent, and no check-back
    /// reaches it any more: its connections close and are not opened again
    /// (the broker asks the group's other members). What is in
    /// flight finishes, for up to [`ClientConfig::close_timeout`]: each
    /// transaction runs its local transaction and ends at the broker, each
    /// check-back is answered by the listener. Then the check-backs still
    /// running are answered `Unknown` and the connections close.
    ///
    /// ```no_run
    /// # use txmq::{TransactionProducer, TransactionListener};
    /// # async fn demo<L: TransactionListener>(producer: TransactionProducer<L>) {
    /// if let Err(e) = producer.close().await {
    ///     // Some transactions were cut off: the broker checks them back.
    ///     eprintln!("{e}");
    /// }
    /// # }
    /// ```
    ///
    /// # Errors
    /// [`Error::Unfinished`] when transactions or check-backs were still
    /// running at the timeout; the producer is closed all the same.
    pub async fn close(&self) -> Result<()> {
        let drained = self
            .inner
            .drain
            .close(TX_PRODUCER, self.inner.config.close_timeout)
            .await;
        self.inner.shut();
        drained
    }

    /// Counts a call as in flight until the token drops.
    fn enter(&self) -> Result<tokio_util::task::task_tracker::TaskTrackerToken> {
        if self.inner.stop.is_cancelled() {
            return Err(Error::Closed(TX_PRODUCER));
        }
        self.inner.drain.enter(TX_PRODUCER)
    }

    async fn transact(
        &self,
        messages: Vec<Message>,
        placement: Placement,
        offsets: &[ConsumedOffset],
    ) -> Result<TxOutcome> {
        let _in_flight = self.enter()?;
        let messages = complete(messages)?;
        let only_broker = offsets_broker(offsets)?;
        let (broker, addr, prepared, stamp) = self
            .prepare(&messages, placement, only_broker, offsets)
            .await?;
        let tx_id = prepared.tx_id;
        let msg_ids: Vec<MsgId> = messages.iter().map(|m| m.msg_id).collect();
        // `complete` refused an empty list, so there is a first message.
        let (first_topic, first_id) = (messages[0].topic.clone(), msg_ids[0]);
        // The listener sees the messages as sent, with their ids.
        let messages = messages.into_iter().map(Message::from_wire).collect();
        let ctx = TxContext::new(tx_id, broker.clone(), self.inner.group.clone(), messages);
        let first = &ctx.messages()[0];
        let state = if prepared.status == SendStatus::SendOk {
            state_of(self.inner.listener.execute(first, &ctx).await)
        } else {
            // The half message may not outlive a crash: a local transaction
            // committed on it could be left without its message.
            tracing::warn!(tx_id, %broker, status = ?prepared.status, "prepare not stored with SEND_OK; rolling back without running the local transaction");
            TransactionState::Rollback
        };
        let action = match state {
            TransactionState::Commit => Some(TxAction::Commit),
            TransactionState::Rollback => Some(TxAction::Rollback),
            TransactionState::Unknown => None,
        };
        // From here on the local transaction has run: whatever becomes of
        // the end is an outcome, never an `Err` a caller might retry.
        let end = match action {
            Some(action) => match self
                .end(
                    &broker,
                    &addr,
                    &first_topic,
                    tx_id,
                    (first_id, stamp),
                    action,
                )
                .await
            {
                Ok(ended) => TxEnd::Ended(ended),
                Err(e) => {
                    tracing::debug!(tx_id, %broker, cause = %crate::error::chain(&e), "the end failed after the local transaction ran");
                    TxEnd::failed(e)
                }
            },
            None => TxEnd::NotSent,
        };
        Ok(TxOutcome {
            tx_id,
            broker_name: broker,
            msg_id: first_id,
            msg_ids,
            state,
            prepare_status: prepared.status,
            end,
        })
    }

    /// Prepares on one broker; returns its name, address, answer, and the
    /// idempotence stamp it was prepared with (`None` on a broker that does
    /// not support idempotence).
    ///
    /// An attempt that failed before its request could reach the broker
    /// (no connection) or that the broker refused is retried on another
    /// broker. One that may have reached it (a timeout, a connection lost
    /// while waiting, a master that lost its role) is retried on the same
    /// broker group and queues only, with the same stamp: that group
    /// answers a repeated prepare with the transaction it already holds,
    /// where another broker would start a second transaction of the same
    /// message, and both would be committed.
    ///
    /// With `only_broker` (the broker of the transaction's offsets), only
    /// that broker's queues are candidates.
    async fn prepare(
        &self,
        messages: &[WireMessage],
        placement: Placement,
        only_broker: Option<&str>,
        offsets: &[ConsumedOffset],
    ) -> Result<(String, String, Prepared, Option<ProducerStamp>)> {
        let topics = distinct(messages.iter().map(|m| m.topic.as_str()));
        let attempts = self.inner.config.send_retries.saturating_add(1);
        let timeout = self.inner.config.request_timeout;
        let idem = &self.inner.idempotence;
        let mut failed_broker: Option<String> = None;
        // The address of the previous attempt, if it failed: a pause before the same one again.
        let mut failed_addr: Option<String> = None;
        let mut last_error: Option<Error> = None;
        // Set once an attempt may have reached its broker.
        let mut pinned: Option<(String, String, Vec<crate::MessageQueue>)> = None;
        // The stamp drawn for a broker group, kept across the retries there.
        let mut held = HeldPrepare { idem, stamp: None };
        let mut permit: Option<Place> = None;
        // Drawn once and kept across the retries: the broker tells a retry
        // of this prepare from another transaction reusing a message id.
        let token = txmq_protocol::fnv1a(&MsgId::generate().0);
        let reorder_deadline = Instant::now() + timeout * attempts.saturating_add(1);
        let mut attempt = 0u32;
        let mut renewals = 0u32;
        let mut recheck_gap = true;
        loop {
            let last_attempt = attempt + 1 >= attempts;
            let (broker, addr, placed, routes) = match &pinned {
                Some((broker, addr, placed)) => {
                    // The same broker group, at its master as the route
                    // names it now (it may have moved after a NOT_MASTER).
                    let addr = self
                        .master_of(topics[0], broker)
                        .await
                        .unwrap_or_else(|| addr.clone());
                    (broker.clone(), addr, placed.clone(), None)
                }
                None => {
                    let routes = match self.routes(&topics).await {
                        Ok(routes) => routes,
                        Err(e) if e.is_retriable() && !last_attempt => {
                            tracing::debug!(error = %e, "route lookup failed; retrying");
                            last_error = Some(e);
                            attempt += 1;
                            tokio::time::sleep(RETRY_PAUSE * attempt).await;
                            continue;
                        }
                        Err(e) => {
                            held.give_up(false);
                            return Err(last_error.unwrap_or(e));
                        }
                    };
                    if matches!(placement, Placement::Hash(_))
                        && routes.iter().any(|r| r.provisional)
                    {
                        // A shard key's queue is one of the topic's queues,
                        // which the nameservers do not know now (see
                        // `Producer::send_ordered`).
                        held.give_up(false);
                        return Err(last_error.unwrap_or(Error::NoRoute {
                            topic: topics.join(","),
                        }));
                    }
                    let on_broker: Vec<Vec<crate::MessageQueue>> = routes
                        .iter()
                        .map(|r| {
                            r.writable
                                .iter()
                                .filter(|q| only_broker.is_none_or(|b| q.broker_name == b))
                                .cloned()
                                .collect()
                        })
                        .collect();
                    if let Some(b) = only_broker {
                        if let Some((topic, _)) =
                            topics.iter().zip(&on_broker).find(|(_, q)| q.is_empty())
                        {
                            if last_attempt || routes.iter().all(|r| !r.writable.is_empty()) {
                                // A stamp held here was refused as out of order.
                                held.give_up(false);
                                return Err(Error::BadArgument(format!(
                                    "topic '{topic}' has no writable queue on broker {b}, where the transaction's \
                                     consumed queues are: a transaction commits offsets of its own broker only"
                                )));
                            }
                        }
                    }
                    let lists: Vec<(&str, &[crate::MessageQueue])> = topics
                        .iter()
                        .zip(&on_broker)
                        .map(|(t, q)| (*t, &q[..]))
                        .collect();
                    let turn = self.inner.turn.fetch_add(1, Ordering::Relaxed);
                    let placed = place(&lists, placement, turn, failed_broker.as_deref());
                    let Some(placed) = placed.filter(|p| !p.is_empty()) else {
                        let error = no_queue(&topics, &routes);
                        if matches!(error, Error::NoMaster { .. }) && !last_attempt {
                            // A failover in progress: the group's next
                            // master registers within moments; ask again.
                            for (topic, route) in topics.iter().zip(&routes) {
                                self.inner.routes.invalidate(topic, route.generation);
                            }
                            last_error = Some(error);
                            attempt += 1;
                            tokio::time::sleep(RETRY_PAUSE * attempt).await;
                            continue;
                        }
                        held.give_up(false);
                        return Err(last_error.unwrap_or(error));
                    };
                    let broker = placed[0].broker_name.clone();
                    let addr = placed[0].addr.clone();
                    (broker, addr, placed, Some(routes))
                }
            };
            if failed_addr.as_deref() == Some(addr.as_str()) {
                tokio::time::sleep(RETRY_PAUSE * attempt).await;
            }
            failed_addr = Some(addr.clone());
            if held.stamp.as_ref().is_some_and(|(b, _, _)| *b != broker) {
                // Never sent there, or surely not stored: give it back.
                held.give_up(false);
            }
            let mut fresh = None;
            let granted = if held.stamp.is_some() {
                Ok(())
            } else {
                match idem.grant(&broker, &addr, &self.inner.pool, timeout).await {
                    Ok(Grant::Stamped(ids)) => {
                        if !permit
                            .as_ref()
                            .is_some_and(|p| p.is_for(&broker, PREPARES.1))
                        {
                            drop(permit.take());
                            permit = idem.permit(&broker, PREPARES.0, PREPARES.1, timeout).await;
                        }
                        if permit.is_some() {
                            // Its sequence is drawn as its frame is queued.
                            fresh = Some(ids);
                            Ok(())
                        } else {
                            // Its broker answers none of the prepares in flight.
                            Err(txmq_remoting::Error::Timeout {
                                kind: "Prepare",
                                peer: addr.clone(),
                                after: timeout,
                            })
                        }
                    }
                    Ok(Grant::Plain) => Ok(()),
                    Err(e) => Err(e),
                }
            };
            let halves = messages
                .iter()
                .map(|m| HalfMessage {
                    queue: topics
                        .iter()
                        .position(|t| *t == m.topic)
                        .and_then(|i| placed.get(i))
                        .map_or(0, |q| q.queue),
                    message: m.clone(),
                })
                .collect();
            let request = PrepareTransaction {
                producer: held.stamp.as_ref().map(|(_, _, s)| *s),
                offsets: offsets.iter().map(|o| o.offset.clone()).collect(),
                producer_group: self.inner.group.clone(),
                messages: halves,
                first_check_delay_ms: self.inner.first_check_delay_ms,
                attempt: Some(token),
            };
            let (result, sent) = match granted {
                Err(e) => (Err(e), false),
                Ok(()) => match (self.inner.pool.get(&addr).await, fresh) {
                    (Ok(conn), None) => (conn.call_with_timeout(request, timeout).await, true),
                    (Ok(conn), Some(ids)) => {
                        let mut draw = |_| Some(ids.stamp_prepare());
                        let request = txmq_protocol::Call::into_request(request);
                        let (stamp, queued) =
                            queue_stamped(&conn, &ids, request, timeout, &mut draw).await;
                        if let Some(stamp) = stamp {
                            held.stamp = Some((broker.clone(), ids, stamp));
                        }
                        let result = match queued {
                            Ok(reply) => reply.answer_as::<PrepareTransaction>().await,
                            Err(e) => Err(e),
                        };
                        (result, stamp.is_some())
                    }
                    (Err(e), _) => (Err(e), false),
                },
            };
            let stamp = held.stamp.as_ref().map(|(_, _, s)| *s);
            if let Some(place) = &permit {
                place.answered(&result);
            }
            let e = match result {
                Ok(prepared) => {
                    if let Some((_, ids, stamp)) = held.stamp.take() {
                        ids.finish_prepare(stamp, Ending::Stored);
                    }
                    return Ok((broker, addr, prepared, stamp));
                }
                Err(e) => e,
            };
            if let (Some((held_broker, ids, stamp)), Some(code)) =
                (&held.stamp, e.remote().map(|w| w.code))
            {
                // An earlier prepare may also have been stored (and
                // answered) between this one's refusal and now: one retry tells.
                let recheck = std::mem::take(&mut recheck_gap);
                if code == ErrorCode::OutOfOrderSequence
                    && (recheck || ids.earlier_in_flight(PREPARES.0, PREPARES.1, stamp.sequence))
                    && Instant::now() < reorder_deadline
                {
                    // An earlier prepare has not reached the broker yet.
                    failed_addr = None;
                    tokio::time::sleep(REORDER_PAUSE).await;
                    continue;
                }
                if code == ErrorCode::OutOfOrderSequence || id_refused(code) {
                    // Nothing was stored: a new id, and this prepare stamped anew.
                    let error = Error::at_broker(&broker, &addr, e);
                    renewals += 1;
                    if renewals > MAX_RENEWALS {
                        held.give_up(false);
                        return Err(error);
                    }
                    if idem.drop_ids(held_broker, ids) {
                        tracing::warn!(broker = %held_broker, producer_id = ids.producer_id(), sequence = stamp.sequence, cause = %crate::error::chain(&error), "the broker refused the producer's sequence; taking a new producer id (nothing was stored)");
                    }
                    ids.finish_prepare(*stamp, Ending::NotStored);
                    held.stamp = None;
                    failed_addr = None;
                    continue;
                }
            }
            let retriable = crate::error::retriable(&e);
            // A slave refused it (a stale route), or a master that lost
            // its role, which may have stored it: the group's master
            // takes the retry, with the same stamp.
            let not_master = crate::error::not_master(&e);
            let maybe_delivered = sent && (not_master || crate::error::maybe_stored(&e));
            let error = Error::at_broker(&broker, &addr, e);
            let pin = maybe_delivered || pinned.is_some();
            if retriable {
                // Also on the last attempt: the routes are fetched again
                // for the next transaction (a caller's retry too).
                for (topic, route) in topics.iter().zip(routes.iter().flatten()) {
                    self.inner.routes.invalidate(topic, route.generation);
                }
            }
            if !retriable || last_attempt {
                held.give_up(pin);
                if last_attempt {
                    tracing::debug!(%broker, attempt, cause = %crate::error::chain(&error), "prepare failed");
                }
                return Err(error);
            }
            if not_master {
                // Where the group's master is now.
                let _ = self.inner.routes.refresh(topics[0]).await;
            }
            let cause = crate::error::chain(&error);
            if pin {
                tracing::info!(%broker, attempt, %cause, "prepare failed; retrying on the same broker group, which may hold it already");
            } else {
                tracing::info!(%broker, attempt, %cause, "prepare failed; retrying");
                held.give_up(false);
            }
            if maybe_delivered && pinned.is_none() {
                pinned = Some((broker.clone(), addr.clone(), placed));
            }
            if !not_master {
                failed_broker = Some(broker);
            }
            last_error = Some(error);
            attempt += 1;
        }
    }

    /// The address of the master of broker group `broker` in the route of
    /// `topic` (cached), if the route names one.
    async fn master_of(&self, topic: &str, broker: &str) -> Option<String> {
        let route = self.inner.routes.get(topic).await.ok()?;
        route
            .route
            .brokers
            .iter()
            .find(|b| b.broker_name == broker && !b.addr.is_empty())
            .map(|b| b.addr.clone())
    }

    async fn routes(&self, topics: &[&str]) -> Result<Vec<Arc<RouteInfo>>> {
        let mut routes = Vec::with_capacity(topics.len());
        for topic in topics {
            routes.push(self.inner.routes.get(topic).await?);
        }
        Ok(routes)
    }

    /// Commits or rolls back as the producer, retrying a lost request. A
    /// slave's `NOT_MASTER` (the group's master moved) sends the retry to
    /// the master the refreshed route of `topic` names.
    async fn end(
        &self,
        broker: &str,
        addr: &str,
        topic: &str,
        tx_id: u64,
        (msg_id, stamp): (MsgId, Option<ProducerStamp>),
        action: TxAction,
    ) -> Result<Ended> {
        let attempts = self.inner.config.send_retries.saturating_add(1);
        let timeout = self.inner.config.request_timeout;
        let mut addr = addr.to_string();
        let mut attempt = 0;
        loop {
            // The prepare's stamp names the transaction; the msg id too,
            // for brokers that match on it.
            let request = EndTransaction {
                producer: stamp,
                tx_id,
                action,
                source: TxSource::Producer,
                msg_id: Some(msg_id),
            };
            let result = match self.inner.pool.get(&addr).await {
                Ok(conn) => conn.call_with_timeout(request, timeout).await,
                Err(e) => Err(e),
            };
            attempt += 1;
            match result {
                Ok(ended) => return Ok(ended),
                Err(e) if crate::error::retriable(&e) && attempt < attempts => {
                    tracing::info!(tx_id, %broker, %addr, error = %crate::error::chain(&e), "ending the transaction failed; retrying");
                    if crate::error::not_master(&e) {
                        let _ = self.inner.routes.refresh(topic).await;
                        if let Some(master) = self.master_of(topic, broker).await {
                            addr = master;
                        }
                    }
                    tokio::time::sleep(RETRY_PAUSE * attempt).await;
                }
                Err(source) => {
                    return Err(Error::EndTransaction {
                        tx_id,
                        broker: broker.to_string(),
                        action,
                        source,
                    })
                }
            }
        }
    }
}

/// The one broker of a transaction's offsets, if it has any.
fn offsets_broker(offsets: &[ConsumedOffset]) -> Result<Option<&str>> {
    let Some(first) = offsets.first() else {
        return Ok(None);
    };
    if let Some(other) = offsets.iter().find(|o| o.broker_name != first.broker_name) {
        return Err(Error::BadArgument(format!(
            "transaction offsets name queues of brokers {} and {}: a transaction commits \
             offsets of its own broker only; use one transaction per broker",
            first.broker_name, other.broker_name
        )));
    }
    Ok(Some(first.broker_name.as_str()))
}

/// Checks the messages and turns them into the messages sent, each with
/// its id (assigned here where the user gave none, so that every retry of
/// the prepare carries the same one).
fn complete(messages: Vec<Message>) -> Result<Vec<WireMessage>> {
    if messages.is_empty() {
        return Err(Error::BadArgument(
            "a transaction needs at least one message".into(),
        ));
    }
    for m in &messages {
        validate_topic_name(m.topic()).map_err(Error::BadArgument)?;
    }
    Ok(messages.into_iter().map(Message::into_wire).collect())
}

fn no_queue(topics: &[&str], routes: &[Arc<RouteInfo>]) -> Error {
    // Only slaves are live where the queues are: say so.
    let mut masterless: Vec<String> = routes
        .iter()
        .flat_map(|r| crate::route::groups_without_master(&r.route))
        .collect();
    masterless.sort();
    masterless.dedup();
    if !masterless.is_empty() && routes.iter().any(|r| r.writable.is_empty()) {
        return Error::NoMaster {
            topic: topics.join(","),
            brokers: masterless,
        };
    }
    match topics {
        [topic] => Error::NoQueue {
            topic: topic.to_string(),
            what: "writable",
        },
        _ => Error::NoCommonBroker {
            topics: topics.iter().map(|t| t.to_string()).collect(),
        },
    }
}

/// The stamp a prepare holds for a broker group until it ends. A prepare
/// its caller drops while it holds one ends it as maybe stored, as one
/// that gave up after reaching its broker would.
struct HeldPrepare<'a> {
    idem: &'a Idempotence,
    stamp: Option<(String, Arc<Ids>, ProducerStamp)>,
}

impl HeldPrepare<'_> {
    /// Ends the stamp held, if any: maybe stored (its producer id is then
    /// dropped, so that later prepares do not wait behind a gap) or surely
    /// not (its sequence may be drawn again).
    fn give_up(&mut self, maybe_stored: bool) {
        if let Some((broker, ids, stamp)) = self.stamp.take() {
            if maybe_stored {
                ids.finish_prepare(stamp, Ending::Unknown);
                self.idem.drop_ids(&broker, &ids);
            } else {
                ids.finish_prepare(stamp, Ending::NotStored);
            }
        }
    }
}

impl Drop for HeldPrepare<'_> {
    fn drop(&mut self) {
        // Dropped while it held a stamp: its frame may have gone out.
        self.give_up(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_checked_and_given_ids_before_preparing() {
        assert!(matches!(complete(Vec::new()), Err(Error::BadArgument(_))));
        let bad = vec![Message::new("ok", "1"), Message::new("not ok", "2")];
        assert!(matches!(complete(bad), Err(Error::BadArgument(_))));
        let id = MsgId::generate();
        let m = Message::new("a", "1");
        let Ok(sent) = complete(vec![m.clone(), m, Message::new("b", "2").with_msg_id(id)]) else {
            panic!("valid messages were refused");
        };
        assert_ne!(sent[0].msg_id, sent[1].msg_id);
        assert_ne!(sent[0].born_timestamp, 0);
        assert_eq!(sent[2].msg_id, id);
    }

    #[test]
    fn no_queue_names_the_topic_or_all_of_them() {
        assert!(matches!(no_queue(&["t"], &[]), Error::NoQueue { .. }));
        assert!(
            matches!(no_queue(&["t", "u"], &[]), Error::NoCommonBroker { topics } if topics == ["t", "u"])
        );
    }

    #[tokio::test]
    async fn start_needs_a_group_and_a_listener() {
        struct Never;
        impl TransactionListener for Never {
            async fn execute(
                &self,
                _: &Message,
                _: &TxContext,
            ) -> std::result::Result<TransactionState, super::super::BoxError> {
                Ok(TransactionState::Unknown)
            }
            async fn check(
                &self,
                _: &super::super::CheckRequest,
            ) -> std::result::Result<TransactionState, super::super::BoxError> {
                Ok(TransactionState::Unknown)
            }
        }
        let no_group = TransactionProducer::builder()
            .nameserver("127.0.0.1:1")
            .listener(Never)
            .start()
            .await;
        assert!(matches!(no_group, Err(Error::BadArgument(_))));
        let no_listener = TransactionProducer::<Never>::builder()
            .nameserver("127.0.0.1:1")
            .group("pg")
            .start()
            .await;
        assert!(matches!(no_listener, Err(Error::BadArgument(_))));
        let no_nameserver = TransactionProducer::builder()
            .group("pg")
            .listener(Never)
            .start()
            .await;
        assert!(matches!(no_nameserver, Err(Error::BadArgument(_))));
    }
}
