//! [`Admin`]: create topics, look at what the nameservers know, and list
//! and resolve transactions by hand.

use std::time::Duration;

use futures_util::future::join_all;
use txmq_protocol::{
    BrokerGroupState, BrokerInfo, BrokerRole, ControllerInfo, CreateTopic, ElectMaster,
    EndTransaction, Ended, ErrorCode, GetControllerInfo, GetReplication, ListTransactions,
    ReplicationInfo, Role, TopicConfig, TopicOnBroker, TopicRoute, TransactionList, TxAction,
    TxSource, TxState,
};

pub use txmq_protocol::{GroupList, GroupQueue, GroupState, OffsetsReset};

use crate::drain::Drain;
use crate::nameserver::NameserverClient;
use crate::pool::ConnectionPool;
use crate::{ClientConfig, Error, Result};

#[path = "admin_dashboard.rs"]
mod dashboard;
#[path = "admin_ops.rs"]
mod ops;

/// A topic created (or updated) on one broker.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CreatedTopic {
    /// The broker's name.
    pub broker_name: String,
    /// The broker's address.
    pub addr: String,
    /// The topic's configuration there, as the broker answered.
    pub config: TopicConfig,
    /// The topic was there already (as the route said), and this updated
    /// it (see [`Admin::create_or_update_topic`]); always `false` from
    /// [`Admin::create_topic`].
    pub updated: bool,
}

/// One broker's answer to a request sent to several brokers: the data of
/// the brokers that answered stays usable when one did not.
#[derive(Debug)]
#[non_exhaustive]
pub struct BrokerAnswer<T> {
    /// The broker's name.
    pub broker_name: String,
    /// The broker's address.
    pub addr: String,
    /// Its answer, or why there is none ([`Error::Broker`]: a refusal, or a
    /// connection that failed, closed or timed out).
    pub result: Result<T>,
}

/// Administration: topics, routes and the cluster. A cheap `Clone` handle.
///
/// ```no_run
/// # async fn demo() -> txmq::Result<()> {
/// use txmq::{Admin, PERM_READ_WRITE};
///
/// let admin = Admin::connect(["127.0.0.1:9876"]).await?;
/// admin.create_topic("orders", 4, PERM_READ_WRITE, None).await?;
/// for broker in admin.cluster().await? {
///     println!("{} at {}", broker.broker_name, broker.addr);
/// }
/// admin.close().await
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Admin {
    pool: ConnectionPool,
    nameservers: NameserverClient,
    request_timeout: Duration,
    close_timeout: Duration,
    /// Requests to brokers and controllers in flight, for [`Admin::close`].
    drain: std::sync::Arc<Drain>,
}

/// What a closed admin's errors call it.
const ADMIN: &str = "the admin client";

/// How long [`Admin::elect_master`] waits at least: a planned switch lets
/// the master drain before the election is committed, which takes longer
/// than an ordinary request (the controller waits up to 15 s for it, and
/// 5 s more when it forwards the request to its leader).
const ELECT_TIMEOUT: Duration = Duration::from_secs(25);

impl Admin {
    /// Connects to the first reachable nameserver of `nameservers` (each
    /// item may be a comma-separated list), with default settings.
    ///
    /// # Errors
    /// [`Error::BadArgument`] when no address is given; [`Error::Remoting`]
    /// when no nameserver can be reached.
    pub async fn connect<I, S>(nameservers: I) -> Result<Admin>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        Admin::with_config(ClientConfig::with_nameservers(nameservers)).await
    }

    /// As [`Admin::connect`], with the given settings.
    ///
    /// # Errors
    /// As [`Admin::connect`].
    pub async fn with_config(config: ClientConfig) -> Result<Admin> {
        config.validate()?;
        let pool = ConnectionPool::new(&config, Role::Admin, None, None);
        let nameservers = NameserverClient::new(config.nameservers.clone(), pool.clone());
        let mut last = None;
        let order: Vec<(usize, String)> =
            nameservers.in_turn().map(|(i, a)| (i, a.clone())).collect();
        for (i, addr) in order {
            let addr = &addr;
            let connected = pool.get(addr).await;
            crate::nameserver::note_reached(addr, &connected);
            match connected {
                Ok(_) => {
                    // The first request goes there too, not to the one
                    // that just failed (a paused nameserver cost every
                    // command two timeouts).
                    nameservers.prefer(i);
                    return Ok(Admin {
                        pool,
                        nameservers,
                        request_timeout: config.request_timeout,
                        close_timeout: config.close_timeout,
                        drain: Default::default(),
                    });
                }
                Err(e) => last = Some(e),
            }
        }
        Err(match last {
            Some(e) => Error::Remoting(e),
            None => Error::BadArgument("no nameserver address given".into()),
        })
    }

    /// Creates `topic` with `queues` queues and permission bits `perm`
    /// ([`PERM_READ`](crate::PERM_READ) | [`PERM_WRITE`](crate::PERM_WRITE)),
    /// or updates it if it exists. On the broker named `broker` (a broker
    /// address is accepted too), or on every broker the nameservers know.
    /// Each broker registers the topic with the nameservers at once, so the
    /// route is visible right after.
    ///
    /// # Errors
    /// [`Error::NoBroker`] when no broker is registered;
    /// [`Error::UnknownBroker`] when `broker` names none of them;
    /// [`Error::Broker`] with the first broker's refusal (`BAD_ARGUMENT` for
    /// an invalid name or queue count, ...). Brokers before the failing one
    /// keep the topic.
    pub async fn create_topic(
        &self,
        topic: &str,
        queues: u32,
        perm: u8,
        broker: Option<&str>,
    ) -> Result<Vec<CreatedTopic>> {
        let _in_flight = self.drain.enter(ADMIN)?;
        let targets = self.targets(broker).await?;
        let mut created = Vec::with_capacity(targets.len());
        for (broker_name, addr) in targets {
            let request = CreateTopic {
                topic: topic.to_string(),
                queues,
                perm,
            };
            created.push(self.create_on(broker_name, addr, request, false).await?);
        }
        Ok(created)
    }

    /// Sends one broker a topic's create (or update).
    async fn create_on(
        &self,
        broker_name: String,
        addr: String,
        request: CreateTopic,
        updated: bool,
    ) -> Result<CreatedTopic> {
        let config = self.ask(&broker_name, &addr, request).await?;
        Ok(CreatedTopic {
            broker_name,
            addr,
            config,
            updated,
        })
    }

    /// Creates `topic`, on every broker group when no broker serves it yet
    /// (or on `broker` only), or updates it where it exists, changing only
    /// what is given: on each broker where the route has the topic, a queue
    /// count or permission left out stays as that broker has it (queue
    /// counts only grow); where it is new, 4 queues and read-write unless
    /// given. A topic that exists is not spread to brokers that do not
    /// have it (a permission change would have added queues nobody chose,
    /// and moved where shard keys land): name a broker to add it there.
    ///
    /// # Errors
    /// As [`Admin::create_topic`]; [`Error::Remoting`] when no nameserver
    /// answers the route.
    pub async fn create_or_update_topic(
        &self,
        topic: &str,
        queues: Option<u32>,
        perm: Option<u8>,
        broker: Option<&str>,
    ) -> Result<Vec<CreatedTopic>> {
        let existing = match self.route(topic).await {
            Ok(route) => route.brokers,
            Err(Error::NoRoute { .. }) => Vec::new(),
            Err(e) => return Err(e),
        };
        let _in_flight = self.drain.enter(ADMIN)?;
        let mut targets = self.targets(broker).await?;
        if broker.is_none() && !existing.is_empty() {
            targets.retain(|(name, _)| existing.iter().any(|b| b.broker_name == *name));
        }
        let mut created = Vec::with_capacity(targets.len());
        for (broker_name, addr) in targets {
            let there = existing.iter().find(|b| b.broker_name == broker_name);
            let request = CreateTopic {
                topic: topic.to_string(),
                queues: queues
                    .or(there.map(|b| b.queues))
                    .unwrap_or(DEFAULT_TOPIC_QUEUES),
                perm: perm
                    .or(there.map(|b| b.perm))
                    .unwrap_or(txmq_protocol::PERM_READ_WRITE),
            };
            let updated = there.is_some();
            created.push(self.create_on(broker_name, addr, request, updated).await?);
        }
        Ok(created)
    }

    /// Every topic on every broker, as the nameservers know them.
    ///
    /// # Errors
    /// [`Error::Remoting`] when no nameserver answers.
    pub async fn list_topics(&self) -> Result<Vec<TopicOnBroker>> {
        let _in_flight = self.drain.enter(ADMIN)?;
        self.nameservers.topics().await
    }

    /// The route of `topic`: its brokers, their addresses, queue counts and permissions.
    ///
    /// # Errors
    /// [`Error::NoRoute`] when no broker serves it; [`Error::Remoting`] when
    /// no nameserver answers.
    pub async fn route(&self, topic: &str) -> Result<TopicRoute> {
        let _in_flight = self.drain.enter(ADMIN)?;
        self.nameservers.route(topic).await
    }

    /// The brokers the nameservers know, sorted by cluster then name.
    ///
    /// # Errors
    /// [`Error::Remoting`] when no nameserver answers.
    pub async fn cluster(&self) -> Result<Vec<BrokerInfo>> {
        let _in_flight = self.drain.enter(ADMIN)?;
        self.nameservers.cluster().await
    }

    /// The records of message `id` on every broker of the cluster (msg ids
    /// are not tied to a broker): each broker's answer apart, by broker
    /// name; a message is found where some answer holds it. Needs `admin`.
    ///
    /// # Errors
    /// [`Error::NoBroker`] when no broker is registered; the nameservers'
    /// failure. A broker's refusal or failure is in its [`BrokerAnswer`].
    pub async fn message_by_id(
        &self,
        id: txmq_protocol::MsgId,
    ) -> Result<Vec<BrokerAnswer<txmq_protocol::FoundMessages>>> {
        let targets = self.targets(None).await?;
        let request = txmq_protocol::LookupMessage { msg_id: id };
        Ok(self.ask_each(targets, request).await)
    }

    /// The messages of `topic` with key `key`, stored between `since` and
    /// `until` (ms since the Unix epoch; `None`: unbounded), newest first,
    /// at most [`DEFAULT_FIND_MAX`] per broker, from every broker of the
    /// topic's route.
    ///
    /// # Errors
    /// [`Error::NoRoute`] for an unknown topic; as
    /// [`Admin::message_by_id`].
    pub async fn messages_by_key(
        &self,
        topic: &str,
        key: &str,
        since: Option<u64>,
        until: Option<u64>,
    ) -> Result<Vec<BrokerAnswer<txmq_protocol::FoundMessages>>> {
        self.messages_by_key_max(topic, key, since, until, DEFAULT_FIND_MAX)
            .await
    }

    /// As [`Admin::messages_by_key`], at most `max` per broker.
    ///
    /// # Errors
    /// As [`Admin::messages_by_key`].
    pub async fn messages_by_key_max(
        &self,
        topic: &str,
        key: &str,
        since: Option<u64>,
        until: Option<u64>,
        max: u32,
    ) -> Result<Vec<BrokerAnswer<txmq_protocol::FoundMessages>>> {
        let targets = self.route_targets(topic).await?;
        let request = txmq_protocol::FindMessages {
            topic: topic.to_string(),
            key: key.to_string(),
            since_ms: since,
            until_ms: until,
            max,
        };
        Ok(self.ask_each(targets, request).await)
    }

    /// Up to `count` messages of queue `queue` of `topic` from `offset`,
    /// on every broker of the topic's route that has that queue (without
    /// a consumer group: nothing is committed).
    ///
    /// # Errors
    /// [`Error::NoRoute`] for an unknown topic; as
    /// [`Admin::message_by_id`]. A queue's `OFFSET_OUT_OF_RANGE` (naming
    /// its offsets) is in the broker's [`BrokerAnswer`].
    pub async fn messages_at(
        &self,
        topic: &str,
        queue: u32,
        offset: u64,
        count: u32,
    ) -> Result<Vec<BrokerAnswer<txmq_protocol::FoundMessages>>> {
        let route = self.route(topic).await?;
        let targets = route
            .brokers
            .iter()
            .filter(|b| queue < b.queues)
            .map(route_target)
            .collect();
        let request = txmq_protocol::GetMessages {
            topic: topic.to_string(),
            queue,
            offset,
            count,
        };
        Ok(self.ask_each(targets, request).await)
    }

    /// (name, address) of every broker of `topic`'s route.
    async fn route_targets(&self, topic: &str) -> Result<Vec<(String, String)>> {
        let route = self.route(topic).await?;
        Ok(route.brokers.iter().map(route_target).collect())
    }

    /// The pending and parked transactions of the broker named `broker` (a
    /// broker address is accepted too), or of every broker the nameservers
    /// know, with each broker's transaction counters; one list per broker,
    /// by broker name.
    ///
    /// # Errors
    /// [`Error::NoBroker`] when no broker is registered;
    /// [`Error::UnknownBroker`] when `broker` names none of them;
    /// [`Error::Broker`] when a broker cannot be asked (the first such one).
    pub async fn list_transactions(&self, broker: Option<&str>) -> Result<Vec<TransactionList>> {
        let targets = self.targets(broker).await?;
        let answers = join_all(
            targets
                .iter()
                .map(|(name, addr)| self.ask(name, addr, ListTransactions::default())),
        )
        .await;
        answers.into_iter().collect()
    }

    /// As [`Admin::list_transactions`], only the transactions `filter`
    /// keeps (filtered by each broker before it cuts its list at its oldest
    /// 1000; [`TransactionList::matching`] counts them all), with each
    /// broker's answer or failure apart, by broker name (see
    /// [`Admin::list_groups_by_broker`]).
    ///
    /// # Errors
    /// As [`Admin::list_groups_by_broker`].
    pub async fn list_transactions_by_broker(
        &self,
        filter: ListTransactions,
        broker: Option<&str>,
    ) -> Result<Vec<BrokerAnswer<TransactionList>>> {
        let targets = self.targets(broker).await?;
        Ok(self.ask_each(targets, filter).await)
    }

    /// Every broker's store counters (or one broker's): records, bytes and
    /// writes appended, and fdatasync rounds, since it started.
    ///
    /// # Errors
    /// [`Error::UnknownBroker`] when `broker` names no registered broker, or
    /// a broker that cannot be asked.
    pub async fn store_stats(
        &self,
        broker: Option<&str>,
    ) -> Result<Vec<txmq_protocol::StoreStats>> {
        let targets = self.targets(broker).await?;
        let answers = join_all(
            targets
                .iter()
                .map(|(name, addr)| self.ask(name, addr, txmq_protocol::GetStoreStats {})),
        )
        .await;
        answers.into_iter().collect()
    }

    /// The consumer groups each broker knows (with live members or committed offsets).
    ///
    /// # Errors
    /// As [`Admin::store_stats`].
    pub async fn list_groups(&self, broker: Option<&str>) -> Result<Vec<txmq_protocol::GroupList>> {
        self.each_broker(broker, txmq_protocol::ListGroups {}).await
    }

    /// As [`Admin::list_groups`], with each broker's answer or failure
    /// apart, by broker name: one broker that is down or paused does not
    /// hide what the others know. All brokers are asked at once, so a
    /// silent one costs one request timeout.
    ///
    /// # Errors
    /// [`Error::NoBroker`], [`Error::UnknownBroker`], or the nameservers'
    /// failure; a broker's failure is in its [`BrokerAnswer`].
    pub async fn list_groups_by_broker(
        &self,
        broker: Option<&str>,
    ) -> Result<Vec<BrokerAnswer<txmq_protocol::GroupList>>> {
        let targets = self.targets(broker).await?;
        Ok(self.ask_each(targets, txmq_protocol::ListGroups {}).await)
    }

    /// As [`Admin::group_state`], with each broker's answer or failure
    /// apart, by broker name (see [`Admin::list_groups_by_broker`]).
    ///
    /// # Errors
    /// As [`Admin::list_groups_by_broker`].
    pub async fn group_state_by_broker(
        &self,
        group: &str,
        broker: Option<&str>,
    ) -> Result<Vec<BrokerAnswer<txmq_protocol::GroupState>>> {
        let targets = self.targets(broker).await?;
        let request = txmq_protocol::GetGroupState {
            group: group.to_string(),
        };
        Ok(self.ask_each(targets, request).await)
    }

    /// As [`Admin::reset_offsets`], with each broker's result apart, by
    /// broker name: every broker serving the topic is asked, and one that
    /// refuses or cannot be reached does not keep the others from moving
    /// (nor hide that they did).
    ///
    /// # Errors
    /// [`Error::NoRoute`] for an unknown topic; as
    /// [`Admin::list_groups_by_broker`]. A broker's refusal (`GROUP_ACTIVE`,
    /// ...) or failure is in its [`BrokerAnswer`].
    pub async fn reset_offsets_by_broker(
        &self,
        group: &str,
        topic: &str,
        to: txmq_protocol::OffsetTarget,
        broker: Option<&str>,
    ) -> Result<Vec<BrokerAnswer<txmq_protocol::OffsetsReset>>> {
        let route = self.route(topic).await?;
        let targets: Vec<(String, String)> = self
            .targets(broker)
            .await?
            .into_iter()
            .filter(|(name, _)| route.brokers.iter().any(|b| b.broker_name == *name))
            .collect();
        let request = txmq_protocol::ResetOffset {
            group: group.to_string(),
            topic: topic.to_string(),
            to,
        };
        Ok(self.ask_each(targets, request).await)
    }

    /// A group's members, queue owners, committed offsets and lag, per broker.
    ///
    /// # Errors
    /// As [`Admin::store_stats`].
    pub async fn group_state(
        &self,
        group: &str,
        broker: Option<&str>,
    ) -> Result<Vec<txmq_protocol::GroupState>> {
        let request = txmq_protocol::GetGroupState {
            group: group.to_string(),
        };
        self.each_broker(broker, request).await
    }

    /// Moves a stopped group's committed offsets of `topic` on every broker
    /// serving it (or on `broker`).
    ///
    /// # Errors
    /// [`Error::Broker`] with code `GROUP_ACTIVE` while the group has live
    /// consumers of the topic; `UNKNOWN_TOPIC`; as [`Admin::store_stats`].
    pub async fn reset_offsets(
        &self,
        group: &str,
        topic: &str,
        to: txmq_protocol::OffsetTarget,
        broker: Option<&str>,
    ) -> Result<Vec<txmq_protocol::OffsetsReset>> {
        self.reset_offsets_by_broker(group, topic, to, broker)
            .await?
            .into_iter()
            .map(|a| a.result)
            .collect()
    }

    /// Reads up to `limit` messages of `topic` from the first stored one on,
    /// queue by queue, without a consumer group (nothing is committed):
    /// for inspecting a dead-letter topic, say.
    ///
    /// # Errors
    /// [`Error::NoRoute`] for an unknown topic; a broker that cannot be asked.
    pub async fn browse(&self, topic: &str, limit: usize) -> Result<Vec<crate::ReceivedMessage>> {
        let mut out = Vec::new();
        for answer in self.browse_by_broker(topic, limit).await? {
            out.extend(answer.result?);
        }
        Ok(out)
    }

    /// As [`Admin::browse`], with each broker's messages or failure apart,
    /// in the route's order (brokers by name): a broker that cannot be
    /// reached does not hide the others' messages. The brokers are read
    /// at once; together they hold at most `limit` messages, the first
    /// brokers' first.
    ///
    /// # Errors
    /// [`Error::NoRoute`] for an unknown topic; no nameserver answers.
    pub async fn browse_by_broker(
        &self,
        topic: &str,
        limit: usize,
    ) -> Result<Vec<BrokerAnswer<Vec<crate::ReceivedMessage>>>> {
        let route = self.route(topic).await?;
        let read = join_all(
            route
                .brokers
                .iter()
                .map(|b| self.browse_broker(topic, b, limit)),
        )
        .await;
        let mut left = limit;
        Ok(route
            .brokers
            .into_iter()
            .zip(read)
            .map(|(b, result)| {
                let result = result.map(|mut messages| {
                    messages.truncate(left);
                    left -= messages.len();
                    messages
                });
                let (broker_name, addr) = route_target(&b);
                BrokerAnswer {
                    broker_name,
                    addr,
                    result,
                }
            })
            .collect())
    }

    /// Up to `limit` messages of `topic` on one broker, queue by queue.
    async fn browse_broker(
        &self,
        topic: &str,
        b: &txmq_protocol::BrokerQueues,
        limit: usize,
    ) -> Result<Vec<crate::ReceivedMessage>> {
        let (_, addr) = route_target(b);
        let mut out = Vec::new();
        for queue in 0..b.queues {
            let mut offset = 0;
            while out.len() < limit {
                let request = txmq_protocol::PullRequest {
                    topic: topic.to_string(),
                    queue,
                    offset,
                    max_messages: u32::try_from(limit - out.len()).unwrap_or(1024).min(1024),
                    max_wait_ms: 0,
                    tag_filter: Vec::new(),
                    owner: None,
                    epoch: 0,
                    after: None,
                    browse: true,
                };
                let r = self.ask(&b.broker_name, &addr, request).await?;
                if r.messages.is_empty() && r.next_offset <= offset {
                    break;
                }
                offset = r.next_offset;
                out.extend(r.messages.into_iter().map(|stored| crate::ReceivedMessage {
                    broker_name: b.broker_name.clone(),
                    stored,
                }));
                if offset >= r.max_offset {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Sends `request` to every target at once; their answers, in order.
    async fn ask_each<C>(
        &self,
        targets: Vec<(String, String)>,
        request: C,
    ) -> Vec<BrokerAnswer<C::Reply>>
    where
        C: txmq_protocol::Call + Clone,
    {
        let answers = join_all(
            targets
                .iter()
                .map(|(name, addr)| self.ask(name, addr, request.clone())),
        )
        .await;
        targets
            .into_iter()
            .zip(answers)
            .map(|((broker_name, addr), result)| BrokerAnswer {
                broker_name,
                addr,
                result,
            })
            .collect()
    }

    async fn each_broker<C>(&self, broker: Option<&str>, request: C) -> Result<Vec<C::Reply>>
    where
        C: txmq_protocol::Call + Clone,
    {
        let targets = self.targets(broker).await?;
        let answers = join_all(
            targets
                .iter()
                .map(|(name, addr)| self.ask(name, addr, request.clone())),
        )
        .await;
        answers.into_iter().collect()
    }

    /// Ends transaction `tx_id` by hand, as an operator: commits or rolls it
    /// back, parked or not. Returns the broker that holds it and its answer
    /// (a repeated end answers with `already` set).
    ///
    /// Transaction ids are unique per broker only. Without `broker`, the
    /// transaction is looked for on every broker: first among each broker's
    /// pending and parked transactions (nothing is ended when more than one
    /// lists it), then, when none lists it, by asking each broker to end it
    /// (an already ended transaction is not changed by that; brokers that do
    /// not know the id are skipped).
    ///
    /// # Errors
    /// [`Error::UnknownBroker`] when `broker` names no registered broker;
    /// [`Error::UnknownTransaction`] (code `UNKNOWN_TRANSACTION`) when no
    /// broker knows the id; [`Error::AmbiguousTransaction`] when several do
    /// (name the broker then); [`Error::Broker`] with the broker's refusal:
    /// `UNKNOWN_TRANSACTION`, `TRANSACTION_ROLLED_BACK` (commit after a
    /// rollback), `TRANSACTION_COMMITTED` (rollback after a commit), or a
    /// connection failure (also when a broker that could hold the
    /// transaction cannot be asked).
    pub async fn resolve_transaction(
        &self,
        tx_id: u64,
        action: TxAction,
        broker: Option<&str>,
    ) -> Result<(String, Ended)> {
        let request = EndTransaction {
            producer: None,
            tx_id,
            action,
            source: TxSource::Operator,
            msg_id: None,
        };
        if let Some(wanted) = broker {
            let targets = self.targets(Some(wanted)).await?;
            let (name, addr) = targets.into_iter().next().ok_or(Error::NoBroker)?;
            let ended = self.ask(&name, &addr, request).await?;
            return Ok((name, ended));
        }
        let targets = self.targets(None).await?;
        let all: Vec<String> = targets.iter().map(|t| t.0.clone()).collect();

        // First, without changing anything: who holds it pending or parked?
        // (Asked by id: a list stops at a broker's oldest 1000.)
        let shown =
            join_all(targets.iter().map(|(name, addr)| {
                self.ask(name, addr, txmq_protocol::ShowTransaction { tx_id })
            }))
            .await;
        let mut unreachable = None;
        let mut pending_on = Vec::new();
        for (target, shown) in targets.iter().zip(shown) {
            match shown {
                Ok(d) if matches!(d.state, TxState::Prepared | TxState::Parked) => {
                    pending_on.push(target.clone())
                }
                Ok(_) => {}
                Err(e) if e.code() == Some(ErrorCode::UnknownTransaction) => {}
                Err(e) => {
                    tracing::warn!(broker = %target.0, error = %crate::error::chain(&e), "cannot ask the broker for the transaction");
                    unreachable.get_or_insert(e);
                }
            }
        }
        // Ids are unique per broker only: a broker that could not be asked
        // may hold a transaction of this id too, so nothing is ended (the
        // caller names the broker then).
        if let Some(e) = unreachable {
            return Err(e);
        }
        match pending_on.len() {
            0 => {}
            1 => {
                let (name, addr) = pending_on.swap_remove(0);
                let ended = self.ask(&name, &addr, request).await?;
                return Ok((name, ended));
            }
            _ => {
                return Err(Error::AmbiguousTransaction {
                    tx_id,
                    brokers: pending_on.into_iter().map(|t| t.0).collect(),
                })
            }
        }

        // Not pending anywhere: ending an ended transaction changes nothing,
        // so every broker may be asked; each answers or does not know it.
        let answers = join_all(
            targets
                .iter()
                .map(|(name, addr)| self.ask(name, addr, request.clone())),
        )
        .await;
        let mut unreachable = None;
        let mut known = Vec::new();
        for (target, answer) in targets.into_iter().zip(answers) {
            match answer {
                Err(e) if e.code() == Some(ErrorCode::UnknownTransaction) => {}
                Err(e) if e.wire_error().is_none() => {
                    unreachable.get_or_insert(e);
                }
                answer => known.push((target.0, answer)),
            }
        }
        match known.len() {
            0 => Err(unreachable.unwrap_or(Error::UnknownTransaction {
                tx_id,
                brokers: all,
            })),
            1 => {
                let (name, answer) = known.swap_remove(0);
                answer.map(|ended| (name, ended))
            }
            _ => Err(Error::AmbiguousTransaction {
                tx_id,
                brokers: known.into_iter().map(|k| k.0).collect(),
            }),
        }
    }

    /// The replication state of the broker at `addr`: its role and log end;
    /// on a master its slaves with their lag and in-sync flag, on a slave
    /// its master, the master's log end as last heard, and why it stopped
    /// replicating if it did.
    ///
    /// # Errors
    /// [`Error::Broker`] when the broker cannot be asked (or refuses, e.g.
    /// `UNSUPPORTED_REQUEST` from a broker older than replication).
    pub async fn replication(&self, broker: &str, addr: &str) -> Result<ReplicationInfo> {
        self.ask(broker, addr, GetReplication {}).await
    }

    /// Asks the controller (through the nameservers that embed it) for a
    /// planned switch of broker group `broker_name`'s master: the master
    /// drains, then `replica` (or, without it, another live in-sync
    /// replica) is elected with a new epoch. Returns the group's state as
    /// the controller answered it.
    ///
    /// The nameservers are asked in turn; one that runs no controller
    /// (`UNSUPPORTED_REQUEST`), cannot be reached, or whose controller
    /// member cannot decide now (`NOT_CONTROLLER_LEADER`,
    /// `CONTROLLER_UNAVAILABLE`) is skipped. An answer that may have been
    /// acted on (a timeout, a closed connection) is not asked again
    /// elsewhere, so one request elects at most once. It waits for the
    /// answer at least 25 s (the master drains first), or the configured
    /// request timeout when that is longer.
    ///
    /// # Errors
    /// [`Error::BadArgument`] for an empty group name; [`Error::NoController`]
    /// when no nameserver runs the controller; [`Error::Remoting`] with the
    /// controller's refusal: `NOT_IN_SYNC` (the replica is not in sync or
    /// not alive), `BAD_ARGUMENT` (no such group), ...; [`Error::Broker`]
    /// when `replica` takes a connection but does not answer (paused, hung:
    /// asked first, nothing is elected then).
    pub async fn elect_master(
        &self,
        broker_name: &str,
        replica: Option<&str>,
    ) -> Result<BrokerGroupState> {
        if broker_name.trim().is_empty() {
            return Err(Error::BadArgument("the broker group name is empty".into()));
        }
        if let Some(addr) = replica {
            // The controller knows a replica alive by its heartbeats, the
            // last of which may be a few seconds old: a replica paused
            // since would be made master, and the group would take no
            // replicated write until the controller noticed. Asked first:
            // one that takes the connection but does not answer is not
            // elected (one that cannot be reached at all is the
            // controller's to judge, by its heartbeats).
            match self.ask(broker_name, addr, GetReplication {}).await {
                Err(e)
                    if e.remoting()
                        .is_some_and(|r| matches!(r, txmq_remoting::Error::Timeout { .. })) =>
                {
                    return Err(e);
                }
                _ => {}
            }
        }
        let request = ElectMaster {
            broker_name: broker_name.to_string(),
            replica: replica.map(str::to_string),
        };
        let timeout = self.request_timeout.max(ELECT_TIMEOUT);
        self.ask_controller(request, timeout, false).await
    }

    /// The controller as one of its members sees it: its members, the
    /// Raft leader and term, and every broker group's master, epoch and
    /// in-sync set. Asked of the nameservers in turn (see
    /// [`Admin::elect_master`]); any failure moves on to the next.
    ///
    /// # Errors
    /// [`Error::NoController`] when no nameserver runs the controller;
    /// [`Error::Remoting`] with the last failure when none answered.
    ///
    /// Only the Raft leader hears the brokers' heartbeats: a follower's
    /// answer is passed on only when the leader it names cannot be asked
    /// directly (at its controller address); its replicas are then not
    /// known to be alive.
    pub async fn controller_info(&self) -> Result<ControllerInfo> {
        let info = self
            .ask_controller(GetControllerInfo {}, self.request_timeout, true)
            .await?;
        let leader = match (&info.leader_id, &info.leader_addr) {
            (Some(id), Some(addr)) if *id != info.id => addr.clone(),
            _ => return Ok(info),
        };
        let answer = match self.pool.get(&leader).await {
            Ok(conn) => {
                conn.call_with_timeout(GetControllerInfo {}, self.request_timeout)
                    .await
            }
            Err(e) => Err(e),
        };
        match answer {
            Ok(from_leader) => Ok(from_leader),
            Err(e) => {
                tracing::debug!(%leader, error = %e, "cannot ask the controller's leader; a follower's view");
                Ok(info)
            }
        }
    }

    /// Asks each member of the controller `info` lists, at its controller
    /// address and at once, how it sees the controller: a member that is
    /// down or cut off fails (the leader's own view names it a follower
    /// whatever its state). In `info.members`' order.
    pub async fn controller_members(
        &self,
        info: &ControllerInfo,
    ) -> Vec<(u64, Result<ControllerInfo>)> {
        let asks = info.members.iter().map(|(id, addr)| async move {
            let answer = match self.pool.get(addr).await {
                Ok(conn) => conn
                    .call_with_timeout(GetControllerInfo {}, self.request_timeout)
                    .await
                    .map_err(Error::Remoting),
                Err(e) => Err(Error::Remoting(e)),
            };
            (*id, answer)
        });
        join_all(asks).await
    }

    /// Sends `request` to the nameservers in turn until one's controller
    /// answers (see [`Admin::elect_master`]), waiting up to `timeout` for
    /// each. With `idempotent`, any failure moves on to the next nameserver.
    async fn ask_controller<C>(
        &self,
        request: C,
        timeout: Duration,
        idempotent: bool,
    ) -> Result<C::Reply>
    where
        C: txmq_protocol::Call + Clone,
    {
        let _in_flight = self.drain.enter(ADMIN)?;
        let addrs = self.nameservers.addrs();
        // A controller's "not now" says more than a nameserver that cannot
        // be reached, which says more than "no controller here".
        let mut refusal = None;
        let mut unreachable = None;
        for (i, addr) in self.nameservers.in_turn() {
            let answer = match self.pool.get(addr).await {
                Ok(conn) => conn.call_with_timeout(request.clone(), timeout).await,
                Err(e) => Err(e),
            };
            crate::nameserver::note_reached(addr, &answer);
            let e = match answer {
                Ok(reply) => {
                    self.nameservers.prefer(i);
                    return Ok(reply);
                }
                Err(e) => e,
            };
            tracing::debug!(nameserver = %addr, error = %e, "controller request failed");
            match e.remote().map(|w| w.code) {
                Some(ErrorCode::UnsupportedRequest) => {}
                Some(ErrorCode::NotControllerLeader | ErrorCode::ControllerUnavailable) => {
                    refusal.get_or_insert(e);
                }
                Some(_) => return Err(Error::Remoting(e)),
                None if idempotent || matches!(e, txmq_remoting::Error::Connect { .. }) => {
                    unreachable.get_or_insert(e);
                }
                None => return Err(Error::Remoting(e)),
            }
        }
        match refusal.or(unreachable) {
            Some(e) => Err(Error::Remoting(e)),
            None => Err(Error::NoController {
                nameservers: addrs.to_vec(),
            }),
        }
    }

    /// Closes the admin: later requests (to nameservers, brokers and
    /// controllers) fail with [`Error::Closed`]; those in flight (a topic being created, an
    /// election) finish first, for up to
    /// [`ClientConfig::close_timeout`]; then the connections close.
    ///
    /// # Errors
    /// [`Error::Unfinished`] when requests were still in flight at the
    /// timeout (they fail); the admin is closed all the same.
    pub async fn close(&self) -> Result<()> {
        let drained = self.drain.close(ADMIN, self.close_timeout).await;
        self.pool.close();
        drained
    }

    /// (name, address) of the broker named (or at) `broker`, or of every
    /// registered broker, by name.
    async fn targets(&self, broker: Option<&str>) -> Result<Vec<(String, String)>> {
        // Closed: `Error::Closed`, not the closed pool's connection error.
        let _in_flight = self.drain.enter(ADMIN)?;
        let brokers = self.nameservers.cluster().await?;
        let targets = select_brokers(&brokers, broker)?;
        if targets.is_empty() {
            return Err(Error::NoBroker);
        }
        Ok(targets)
    }

    async fn ask<C: txmq_protocol::Call>(
        &self,
        broker: &str,
        addr: &str,
        request: C,
    ) -> Result<C::Reply> {
        let _in_flight = self.drain.enter(ADMIN)?;
        let answer = match self.pool.get(addr).await {
            Ok(conn) => conn.call(request).await,
            Err(e) => Err(e),
        };
        answer.map_err(|e| Error::at_broker(broker, addr, e))
    }
}

/// The queue count of a topic [`Admin::create_or_update_topic`] makes when
/// none is given.
pub const DEFAULT_TOPIC_QUEUES: u32 = 4;

/// How many messages [`Admin::messages_by_key`] asks each broker for.
pub const DEFAULT_FIND_MAX: u32 = 32;

/// Where to ask a broker group of a route: its master, or a slave while
/// no master is live (lookups are reads).
fn route_target(b: &txmq_protocol::BrokerQueues) -> (String, String) {
    let addr = match (b.addr.as_str(), b.slaves.first()) {
        ("", Some(slave)) => slave.clone(),
        (addr, _) => addr.to_string(),
    };
    (b.broker_name.clone(), addr)
}

/// The broker group named `wanted` (or the broker at that address), or
/// every broker group once, as (name, address) sorted by name. A group is
/// asked at its master; at a slave only while no master of it is live (a
/// write there is refused with `NOT_MASTER`, reads are answered).
fn select_brokers(brokers: &[BrokerInfo], wanted: Option<&str>) -> Result<Vec<(String, String)>> {
    // Masters sort first within a group.
    let mut all: Vec<(&str, bool, &str)> = brokers
        .iter()
        .map(|b| {
            (
                b.broker_name.as_str(),
                b.role != BrokerRole::Master,
                b.addr.as_str(),
            )
        })
        .collect();
    all.sort();
    all.dedup_by(|a, b| a.0 == b.0);
    match wanted {
        Some(wanted) => {
            let found = all
                .iter()
                .find(|b| b.0 == wanted)
                .map(|b| (b.0, b.2))
                .or_else(|| {
                    brokers
                        .iter()
                        .find(|b| b.addr == wanted)
                        .map(|b| (b.broker_name.as_str(), b.addr.as_str()))
                })
                .ok_or_else(|| Error::UnknownBroker {
                    name: wanted.to_string(),
                })?;
            Ok(vec![(found.0.to_string(), found.1.to_string())])
        }
        None => Ok(all
            .into_iter()
            .map(|(name, _, addr)| (name.to_string(), addr.to_string()))
            .collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn broker(name: &str, addr: &str) -> BrokerInfo {
        BrokerInfo {
            epoch: Default::default(),
            role: Default::default(),
            cluster: "c".into(),
            broker_name: name.into(),
            addr: addr.into(),
            last_heartbeat_ms_ago: 0,
            topic_count: 0,
        }
    }

    #[test]
    fn brokers_are_selected_by_name_or_address_or_all_once() {
        let brokers = [broker("b", "h:2"), broker("a", "h:1"), broker("b", "h:2")];
        let all = select_brokers(&brokers, None).ok();
        assert_eq!(
            all,
            Some(vec![
                ("a".to_string(), "h:1".to_string()),
                ("b".to_string(), "h:2".to_string())
            ])
        );
        // A group is asked at its master, at a slave only when it has none.
        let mut slave = broker("a", "h:0");
        slave.role = BrokerRole::Slave;
        let mut lone_slave = broker("c", "h:3");
        lone_slave.role = BrokerRole::Slave;
        let grouped = [slave.clone(), broker("a", "h:1"), lone_slave];
        assert_eq!(
            select_brokers(&grouped, None).ok(),
            Some(vec![
                ("a".to_string(), "h:1".to_string()),
                ("c".to_string(), "h:3".to_string())
            ])
        );
        assert_eq!(
            select_brokers(&grouped, Some("a")).ok(),
            Some(vec![("a".to_string(), "h:1".to_string())])
        );
        assert_eq!(
            select_brokers(&grouped, Some("h:0")).ok(),
            Some(vec![("a".to_string(), "h:0".to_string())])
        );
        let by_addr = select_brokers(&brokers, Some("h:2")).ok();
        assert_eq!(by_addr, Some(vec![("b".to_string(), "h:2".to_string())]));
        assert!(matches!(
            select_brokers(&brokers, Some("zz")),
            Err(Error::UnknownBroker { .. })
        ));
    }
}
