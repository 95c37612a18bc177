//! Operator requests of issue 17, part C: transaction forensics
//! ([`ShowTransaction`], [`RecheckTransaction`]), dead-letter resend
//! ([`ResendDeadLetters`]) and topic administration ([`DeleteTopic`],
//! [`GetTopicStatus`]). Their `Request` variants are in `request.rs`.

use serde::{Deserialize, Serialize};

use crate::message::{Message, MsgId};
use crate::request::{TxResolution, TxState};

/// Operator -> broker: everything the broker knows of one transaction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShowTransaction {
    /// The transaction id.
    pub tx_id: u64,
}

/// One check-back of a transaction, as the broker saw it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckRecord {
    /// When it was made, ms since the Unix epoch (broker clock).
    pub at_ms: u64,
    /// Whether it reached a producer (counted against the maximum).
    pub sent: bool,
    /// The producer's answer, if one came.
    pub answer: Option<TxResolution>,
    /// Why it could not be made, or failed, if it did.
    pub error: Option<String>,
    /// How many checks in a row ended the same way (not sent, with the
    /// same error), the last at `at_ms`: a producer group that stays away
    /// for an hour takes one entry, not the whole history.
    #[serde(default = "one")]
    pub times: u32,
}

fn one() -> u32 {
    1
}

/// Who ended a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EndedBy {
    /// The producer, after its local transaction.
    Producer,
    /// The producer's answer to a check-back.
    CheckBack,
    /// An operator (`txmq tx resolve`).
    Operator,
    /// Rolled back because the offsets committed with it conflicted.
    OffsetConflict,
    /// Not known: it ended before the broker last started (the log keeps
    /// the outcome, not who decided it).
    Unknown,
}

impl EndedBy {
    /// `producer`, `check_back`, `operator`, `offset_conflict`, `unknown`.
    pub fn name(self) -> &'static str {
        match self {
            EndedBy::Producer => "producer",
            EndedBy::CheckBack => "check_back",
            EndedBy::Operator => "operator",
            EndedBy::OffsetConflict => "offset_conflict",
            EndedBy::Unknown => "unknown",
        }
    }
}

/// How a transaction ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TxEnding {
    /// Who ended it.
    pub by: EndedBy,
    /// When, ms since the Unix epoch (broker clock); `None` when it ended
    /// before the broker last started.
    pub at_ms: Option<u64>,
}

/// One half message of a transaction, as stored (the broker's own
/// `__txmq.*` properties removed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TxMessage {
    /// The real queue it goes to when committed.
    pub queue: u32,
    /// The message, with its real topic.
    pub message: Message,
}

/// The answer to [`ShowTransaction`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TxDetail {
    /// The broker's name.
    pub broker_name: String,
    /// The transaction id.
    pub tx_id: u64,
    /// Prepared, parked, committed or rolled back.
    pub state: TxState,
    /// The producer group, when known.
    pub producer_group: Option<String>,
    /// When it was prepared, ms since the Unix epoch (broker clock), when known.
    pub prepared_at_ms: Option<u64>,
    /// Milliseconds since it was prepared, when known.
    pub age_ms: Option<u64>,
    /// Check-backs sent (counted durably).
    pub checks: u32,
    /// When the next check is due (prepared only), ms since the Unix epoch.
    pub next_check_at_ms: Option<u64>,
    /// Its half messages, when still readable.
    pub messages: Vec<TxMessage>,
    /// The last check-backs (at most [`CHECK_HISTORY`]), oldest first, made
    /// since the broker started.
    pub history: Vec<CheckRecord>,
    /// How it ended (committed or rolled back only).
    pub ended: Option<TxEnding>,
}

/// How many check-backs a broker remembers per transaction.
pub const CHECK_HISTORY: usize = 32;

/// Operator -> broker: un-park a parked transaction (or hurry a prepared
/// one) and check it back now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecheckTransaction {
    /// The transaction id.
    pub tx_id: u64,
}

/// The answer to [`RecheckTransaction`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rechecked {
    /// The broker's name.
    pub broker_name: String,
    /// The transaction id.
    pub tx_id: u64,
    /// Its state before: parked (now un-parked) or prepared (checked now).
    pub previous: TxState,
    /// Check-backs sent so far; it gets a fresh allowance of the broker's
    /// maximum from here.
    pub checks: u32,
}

/// Operator -> broker: re-send dead letters of a consumer group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResendDeadLetters {
    /// The consumer group (its dead letters are in `%DLQ%<group>`).
    pub group: String,
    /// These dead letters (by message id); empty with `all`.
    pub msg_ids: Vec<MsgId>,
    /// Every dead letter not resent before.
    pub all: bool,
    /// Send to this topic instead of each letter's original topic.
    pub to: Option<String>,
    /// Resend named letters even when they were resent before.
    pub force: bool,
}

/// One dead letter re-sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResentLetter {
    /// Its message id (kept by the resent copy).
    pub msg_id: MsgId,
    /// Where it was sent.
    pub topic: String,
    /// The queue.
    pub queue: u32,
    /// Its offset there.
    pub queue_offset: u64,
}

/// The answer to [`ResendDeadLetters`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DeadLettersResent {
    /// The broker's name.
    pub broker_name: String,
    /// Dead letters in the group's dead-letter topic on this broker.
    pub dead_letters: u64,
    /// What was re-sent now.
    pub resent: Vec<ResentLetter>,
    /// Named (or, with `all`, found) letters skipped: resent before.
    pub already: Vec<MsgId>,
    /// Named letters not in the dead-letter topic of this broker.
    pub not_found: Vec<MsgId>,
    /// With `all` and no `to`: letters left in place, with why (they do
    /// not say their original topic, or it is gone); re-sent by id with a
    /// `to`.
    #[serde(default)]
    pub left: Vec<(MsgId, String)>,
}

/// Operator -> broker: delete a topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeleteTopic {
    /// The topic.
    pub topic: String,
    /// Delete even while transactions with half messages for it are pending.
    pub force: bool,
    /// Only say whether it would be deleted: the same refusals, and an
    /// answer with nothing removed (`offsets_removed` and `deleted_below`
    /// 0). An operator's tool asks every broker first, so that one broker's
    /// refusal leaves the topic whole on all of them.
    #[serde(default)]
    pub check_only: bool,
}

/// The answer to [`DeleteTopic`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopicDeleted {
    /// The broker's name.
    pub broker_name: String,
    /// The topic.
    pub topic: String,
    /// Queues it had.
    pub queues: u32,
    /// Consumer-group offsets removed.
    pub offsets_removed: usize,
    /// Log position from which records of the topic count again: below
    /// it recovery ignores them.
    pub deleted_below: u64,
}

/// Anyone -> broker: a topic's queues with their bounds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GetTopicStatus {
    /// The topic.
    pub topic: String,
}

/// One queue of a topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueueStatus {
    /// The queue id.
    pub queue: u32,
    /// The first offset still stored.
    pub min_offset: u64,
    /// One past the last offset stored.
    pub max_offset: u64,
    /// When its last message was stored, ms since the Unix epoch (broker
    /// clock); `None` for an empty queue.
    pub last_store_ms: Option<u64>,
}

/// The answer to [`GetTopicStatus`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopicStatus {
    /// The broker's name.
    pub broker_name: String,
    /// The topic.
    pub topic: String,
    /// Its queues on this broker.
    pub queues: Vec<QueueStatus>,
}
