//! Message lookup (`txmq msg show|find|get`): by message id, by topic and
//! key, and by queue offset. A broker answers from its message index and
//! its consume queues, with what it knows about each message: where it is
//! stored, its transaction state and which consumer groups consumed it.

use serde::{Deserialize, Serialize};

use crate::message::{Message, MsgId};

/// The most messages one lookup answers.
pub const LOOKUP_MAX: u32 = 1024;

/// Operator -> broker: the records of one message id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LookupMessage {
    /// The message id.
    pub msg_id: MsgId,
}

/// Client -> broker: messages of a topic with a key, newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FindMessages {
    /// The topic.
    pub topic: String,
    /// One key (a message whose key property holds several, separated by
    /// spaces, is found by each of them).
    pub key: String,
    /// Stored at or after this time (ms since the Unix epoch).
    pub since_ms: Option<u64>,
    /// Stored at or before this time (ms).
    pub until_ms: Option<u64>,
    /// At most this many (capped at [`LOOKUP_MAX`]).
    pub max: u32,
}

/// Client -> broker: messages of a queue from an offset, without a
/// consumer group (nothing is committed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GetMessages {
    /// The topic.
    pub topic: String,
    /// The queue.
    pub queue: u32,
    /// The first queue offset.
    pub offset: u64,
    /// How many (capped at [`LOOKUP_MAX`]).
    pub count: u32,
}

/// What became of a message, as far as the broker knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MessageState {
    /// A message sent as such: visible to consumers.
    Normal,
    /// Made visible by the commit of its transaction.
    Committed,
    /// A half message whose transaction is prepared, not yet ended.
    HalfPending,
    /// A half message whose transaction was parked after its check-backs.
    HalfParked,
    /// A half message whose transaction was rolled back: never visible.
    RolledBack,
    /// A delayed message waiting for its delivery time.
    Delayed,
}

impl MessageState {
    /// The state's name, as in JSON.
    pub fn name(self) -> &'static str {
        match self {
            MessageState::Normal => "normal",
            MessageState::Committed => "committed",
            MessageState::HalfPending => "half_pending",
            MessageState::HalfParked => "half_parked",
            MessageState::RolledBack => "rolled_back",
            MessageState::Delayed => "delayed",
        }
    }
}

/// Whether a consumer group consumed a message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupConsumption {
    /// The consumer group.
    pub group: String,
    /// Its committed offset on the message's queue, if any.
    pub committed_offset: Option<u64>,
    /// The committed offset is past the message's offset.
    pub consumed: bool,
}

/// One message found.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FoundMessage {
    /// The message (id, topic, key, tag, properties, body, born time).
    pub message: Message,
    /// Its queue (a half message: the queue it goes to when committed).
    pub queue: u32,
    /// Its queue offset; `None` for a message in no queue yet (a half
    /// message, a delayed one).
    pub queue_offset: Option<u64>,
    /// Its position in the commit log.
    pub log_offset: u64,
    /// Its record's size in the log.
    pub size: u32,
    /// When the broker stored it (ms, the broker's clock).
    pub store_timestamp: u64,
    /// What became of it.
    pub state: MessageState,
    /// Its transaction id, for a transactional message.
    pub tx_id: Option<u64>,
    /// Each consumer group with an offset on its topic (`msg show` only).
    pub groups: Vec<GroupConsumption>,
}

/// A broker's answer to a lookup.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FoundMessages {
    /// The broker that answered.
    pub broker_name: String,
    /// The messages, newest first (by key or id) or in queue order (by
    /// offset).
    pub messages: Vec<FoundMessage>,
    /// For a read by offset: the queue's smallest and one-past-the-last
    /// offsets.
    pub min_offset: Option<u64>,
    /// See `min_offset`.
    pub max_offset: Option<u64>,
}
