//! txmq: the client library of the txmq message broker.
//!
//! Start with [`Producer`] to send messages, [`PullConsumer`] to read them as
//! a consumer group, [`TransactionProducer`] with a [`TransactionListener`]
//! to send messages that become visible only when a local transaction
//! commits (see [`transaction`]), and [`Admin`] to create topics, inspect
//! the cluster and resolve transactions by hand. A handler that must apply
//! each message's effect once, though txmq delivers at least once, records
//! what it applied through [`dedup`] ([`MemoryDedup`], or `SqliteDedup`
//! with the `sqlite` feature, inside the handler's own SQLite transaction).
//! All three are configured with builders that take the nameserver
//! addresses ([`ClientConfig`] holds the settings they share) and are cheap to
//! drive from tests: everything runs on the caller's tokio runtime.
//!
//! ```no_run
//! # async fn demo() -> Result<(), txmq::Error> {
//! use std::time::Duration;
//! use txmq::{ConsumeFrom, Message, Producer, PullConsumer};
//!
//! let producer = Producer::builder().nameserver("127.0.0.1:9876").build().await?;
//! let receipt = producer.send(Message::new("orders", "hello")).await?;
//! println!("stored at queue {} offset {}", receipt.queue, receipt.queue_offset);
//!
//! let mut consumer = PullConsumer::builder()
//!     .nameserver("127.0.0.1:9876")
//!     .group("billing")
//!     .topic("orders")
//!     .from(ConsumeFrom::First)
//!     .build()
//!     .await?;
//! for m in consumer.poll(Duration::from_secs(1)).await? {
//!     println!("{}: {:?}", m.msg_id(), m.body());
//! }
//! consumer.shutdown().await?; // commits what poll handed out
//! producer.close().await?; // waits for sends in flight
//! # Ok(())
//! # }
//! ```
//!
//! # One shape
//!
//! - **Starting.** A builder ends with `build().await` when the handle only
//!   does what it is asked ([`Producer`], [`PullConsumer`]), and with
//!   `start(..).await` when it also runs the application's code in the
//!   background from then on ([`PushConsumer`] calls its handler,
//!   [`TransactionProducer`] answers check-backs with its listener).
//!   [`Admin::connect`] takes only the nameservers.
//! - **Settings.** Durations are [`std::time::Duration`]; an optional
//!   setting is a builder method that is simply not called.
//! - **Ending.** Every handle ends with an async call that lets the work in
//!   flight finish and reports what did not: `close().await` on the
//!   cheaply cloned handles ([`Producer`], [`TransactionProducer`],
//!   [`Admin`]; it closes every clone), `shutdown().await` on the consumers,
//!   which own their background tasks and are consumed by it. After it,
//!   calls fail with [`Error::Closed`]; a close that timed out with work
//!   still running says so with [`Error::Unfinished`].
//!
//! Inside (private modules), `route` caches topic routes from the
//! nameservers (`nameserver` tries them in turn), `pool` keeps one shared
//! connection per broker, and every request goes over a pipelined
//! [`txmq_remoting::Connection`], so many sends from one producer are in
//! flight at once.

#![warn(missing_docs)]

// The README's Rust blocks compile (and run, unless marked `no_run`) as
// doctests of this crate, so that they cannot drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct ReadmeDoctests;

pub mod admin;
pub mod config;
pub mod consumer;
pub mod dedup;
mod drain;
pub mod error;
mod flight;
mod message;
mod nameserver;
mod pool;
pub mod producer;
mod route;
pub mod transaction;

pub use admin::{Admin, CreatedTopic};
pub use config::ClientConfig;
pub use consumer::push::{
    handler_fn, ConsumeResult, DeliveryMode, MessageHandler, PushConsumer, PushConsumerBuilder,
    QueueId,
};
pub use consumer::{ConsumeFrom, PullConsumer, PullConsumerBuilder, ReceivedMessage};
#[cfg(feature = "sqlite")]
pub use dedup::SqliteDedup;
pub use dedup::{DedupKey, Deduped, MemoryDedup, Seen};
pub use error::{Error, Result};
pub use message::Message;
pub use producer::{Producer, ProducerBuilder, SendReceipt};
pub use route::MessageQueue;
pub use transaction::{
    BoxError, BoxListener, CheckRequest, ConsumedOffset, DynTransactionListener, ListenerFuture,
    TransactionListener, TransactionProducer, TransactionProducerBuilder, TransactionState,
    TxContext, TxEnd, TxOutcome,
};
pub use txmq_protocol::{
    dlq_topic, now_millis, retry_topic, OffsetTarget, PROPERTY_DELIVER_AT, PROPERTY_REAL_TOPIC,
    PROPERTY_RECONSUME_TIMES, RETRY_TOPIC_PREFIX,
};

/// A message as the broker stores it and hands it back
/// ([`ReceivedMessage::message`], [`StoredMessage`], [`FoundMessage`]):
/// its id always set, its fields public. Sends take a [`Message`], whose
/// id is assigned at send.
pub use txmq_protocol::Message as WireMessage;

/// The connection-level error inside [`Error::Remoting`] and [`Error::Broker`].
pub use txmq_remoting::Error as RemotingError;
pub use txmq_remoting::{Credentials, TlsClient, TlsFiles, TlsSetupError};

/// Standard error as a `tracing-subscriber` writer that keeps each log
/// line one line (a line break inside it is written `\n`): error texts
/// this crate logs may quote names other clients chose (a group, a key),
/// which must not add lines to your log. The servers and `txmq` log
/// through it: `tracing_subscriber::fmt().with_writer(txmq::one_line_stderr)`.
pub use txmq_remoting::logging::{one_line_stderr, OneLine};

pub use txmq_protocol::{
    BrokerInfo, BrokerQueues, Ended, ErrorCode, ListTransactions, MsgId, SendStatus, StoredMessage,
    TopicConfig, TopicOnBroker, TopicRoute, TransactionList, TxAction, TxCounters, TxInfo, TxState,
    WireError, PERM_READ, PERM_READ_WRITE, PERM_WRITE,
};

/// Transaction forensics, dead-letter resend and topic administration
/// ([`Admin::show_transaction`], [`Admin::resend_dead_letters`], ...).
pub use txmq_protocol::{
    CheckRecord, DeadLettersResent, EndedBy, QueueStatus, Rechecked, ResendDeadLetters,
    ResentLetter, TopicDeleted, TopicStatus, TxDetail, TxEnding, TxMessage,
};

/// A broker's role and replication state ([`Admin::replication`]).
pub use txmq_protocol::{BrokerRole, ReplicaInfo, ReplicationInfo};

/// A broker group as the controller decided it, and the controller's own
/// state ([`Admin::elect_master`], [`Admin::controller_info`]).
pub use txmq_protocol::{BrokerGroupState, ControllerInfo, ControllerReplica};

/// Checks a subscription's tag expression (`*`, or `a || b`) as consumers
/// and brokers read it: the tags, or `None` for every tag.
pub use txmq_protocol::parse_tag_expression;
/// Checks a consumer group's name as the brokers do where its retry topic
/// is made (a clustering member's heartbeat, a hand-back).
pub use txmq_protocol::{validate_group_name, MAX_CONSUMER_GROUP_LEN};
/// The dashboard's counters of a broker (`Admin::broker_counters`).
pub use txmq_protocol::{validate_topic_name, BrokerCounters, TopicTraffic};
/// Messages found by [`Admin::message_by_id`], [`Admin::messages_by_key`]
/// and [`Admin::messages_at`].
pub use txmq_protocol::{FoundMessage, FoundMessages, GroupConsumption, MessageState};
