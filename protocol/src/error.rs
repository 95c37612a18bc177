//! Errors that cross the wire: a stable numbered code plus a human message.
//!
//! A code's number never changes and a retired number is never reused.

use serde::{Deserialize, Serialize};

/// A numbered error code. The discriminant is the number on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    /// Anything not covered by a more precise code.
    Internal = 1,
    /// The peer speaks a protocol version this side cannot.
    UnsupportedVersion = 2,
    /// The first frame on a connection was not a hello, or a second hello came.
    HelloRequired = 3,
    /// The request kind is not served by this process (e.g. a send to a nameserver).
    UnsupportedRequest = 4,
    /// An argument is out of range or malformed; the message says which.
    BadArgument = 5,
    /// The topic does not exist and was not auto-created.
    UnknownTopic = 6,
    /// The queue id is not a queue of the topic.
    UnknownQueue = 7,
    /// The topic's permission forbids this operation.
    NoPermission = 8,
    /// The message (or batch) is larger than the broker accepts.
    MessageTooLarge = 9,
    /// The store cannot accept writes (disk full, I/O error, shutting down).
    StoreUnavailable = 10,
    /// The topic already exists with a different configuration.
    TopicExists = 11,
    /// No route is known for the topic.
    NoRoute = 12,
    /// The request timed out before an answer came.
    Timeout = 13,
    /// The requested offset is outside the queue's range.
    OffsetOutOfRange = 14,
    /// A frame (request or response) exceeds the maximum frame length.
    FrameTooLarge = 15,
    /// The request's body could not be decoded (unknown kind, wrong types).
    MalformedRequest = 16,
    /// The broker's store reached its size limit (`--max-store-size`); nothing was written.
    StoreFull = 17,
    /// The transaction id is not known to this broker.
    UnknownTransaction = 20,
    /// Commit asked of a transaction that was rolled back.
    TransactionRolledBack = 21,
    /// Rollback asked of a transaction that was committed.
    TransactionCommitted = 22,
    /// The transaction was parked after too many checks; only an operator may end it.
    TransactionParked = 23,
    /// The message id is already used by another transaction (a message
    /// reused for a second send without a new id).
    DuplicateMsgId = 24,
    /// The broker serves as many connections as it may (`--max-connections`).
    TooManyConnections = 25,
    /// The broker holds as many topics as it may (`--max-topics`).
    TooManyTopics = 26,
    /// The peer is too busy to take more requests on this connection now
    /// (its answers cannot go out as fast as requests come); retry later.
    Busy = 28,
    /// The consumer group has live members where the request needs none (e.g. an offset reset).
    GroupActive = 30,
    /// The queue is assigned to another member of the group (a rebalance moved it).
    QueueNotOwned = 31,
    /// The request names a member of a consumer group that has not
    /// heartbeated to this broker since the broker started or since the
    /// member's connection closed: heartbeat, then try again. Unlike
    /// [`ErrorCode::QueueNotOwned`] it does not mean the queue moved.
    HeartbeatRequired = 32,
    /// The broker name is held by another live broker (another address):
    /// the registration, or an unregister from elsewhere, was refused.
    BrokerNameTaken = 40,
    /// The broker is a slave of a replicated broker group and takes no
    /// writes; the message names the master's address when it knows it.
    NotMaster = 41,
    /// Replication: the replica's log differs from the master's at the
    /// replica's end (or runs past the master's end). The replica stops
    /// replicating; it must not silently continue.
    ReplicaDiverged = 42,
    /// Replication: the position asked for is no longer in the master's log
    /// (retention deleted it) or is not a position the master can serve.
    ReplicaPositionUnavailable = 43,
    /// Sync replication: the record is stored on the master but too few
    /// in-sync replicas confirmed it within `--replication-timeout`
    /// (for requests whose answer has no status field, e.g. an offset commit).
    FlushSlaveTimeout = 44,
    /// Sync replication: no replica was available to hold the record; it is
    /// stored on the master only.
    SlaveNotAvailable = 45,
    /// Controller: this member is not the Raft leader; the message is the
    /// leader's controller address, or empty when no leader is known.
    NotControllerLeader = 46,
    /// The request comes from (or names) a master whose epoch is not its
    /// group's current one: it was fenced by a newer election. The message
    /// names the current epoch and master when known.
    StaleEpoch = 47,
    /// Controller: the Raft group cannot decide now (no quorum, shutting down).
    ControllerUnavailable = 48,
    /// Controller: the replica asked to be elected is not in the in-sync
    /// set, or not alive.
    NotInSync = 49,
    /// An idempotent send or prepare whose sequence is not the next one of
    /// its producer id on that queue (a gap: an earlier send was lost), or
    /// older than the batches the broker still remembers. Nothing was stored.
    OutOfOrderSequence = 50,
    /// A producer id this broker (group) never handed out, or forgot after
    /// `--producer-id-expiry` of disuse: ask for a new one with `InitProducer`.
    UnknownProducerId = 51,
    /// A producer id used with the wrong token: it belongs to another
    /// producer (a forged or stale id). Nothing was stored.
    ProducerFenced = 52,
    /// A transaction's consumer offsets could not be committed with it: the
    /// group's committed offset is not the one the transaction expected
    /// (another transaction or consumer moved it). The transaction was
    /// rolled back.
    OffsetConflict = 53,
    /// An idempotent send or prepare whose sequence was stored before, by
    /// a batch older than those the broker still remembers: it is stored
    /// (once), but its first answer is forgotten. Nothing was stored now.
    DuplicateSequence = 54,
    /// The connection's user may not do this (the message names the
    /// user, the operation and the resource). The connection stays open.
    AccessDenied = 55,
    /// The hello's authentication failed: no such access key, a wrong
    /// signature, or none given where the server requires one.
    AuthenticationFailed = 56,
    /// A pop consumer's receipt handle that names no message in flight
    /// for its group now: already acknowledged, dead-lettered, or
    /// superseded by a newer delivery or a change of its invisible time.
    InvalidReceiptHandle = 57,
    /// A code this build does not know (sent by a newer peer).
    Unknown = 0xffff,
}

impl ErrorCode {
    /// The code for a wire number; numbers this build does not know map to [`ErrorCode::Unknown`].
    pub fn from_u16(n: u16) -> ErrorCode {
        use ErrorCode::*;
        match n {
            1 => Internal,
            2 => UnsupportedVersion,
            3 => HelloRequired,
            4 => UnsupportedRequest,
            5 => BadArgument,
            6 => UnknownTopic,
            7 => UnknownQueue,
            8 => NoPermission,
            9 => MessageTooLarge,
            10 => StoreUnavailable,
            11 => TopicExists,
            12 => NoRoute,
            13 => Timeout,
            14 => OffsetOutOfRange,
            15 => FrameTooLarge,
            16 => MalformedRequest,
            17 => StoreFull,
            20 => UnknownTransaction,
            21 => TransactionRolledBack,
            22 => TransactionCommitted,
            23 => TransactionParked,
            24 => DuplicateMsgId,
            25 => TooManyConnections,
            26 => TooManyTopics,
            28 => Busy,
            30 => GroupActive,
            31 => QueueNotOwned,
            32 => HeartbeatRequired,
            40 => BrokerNameTaken,
            41 => NotMaster,
            42 => ReplicaDiverged,
            43 => ReplicaPositionUnavailable,
            44 => FlushSlaveTimeout,
            45 => SlaveNotAvailable,
            46 => NotControllerLeader,
            47 => StaleEpoch,
            48 => ControllerUnavailable,
            49 => NotInSync,
            50 => OutOfOrderSequence,
            51 => UnknownProducerId,
            52 => ProducerFenced,
            53 => OffsetConflict,
            54 => DuplicateSequence,
            55 => AccessDenied,
            56 => AuthenticationFailed,
            57 => InvalidReceiptHandle,
            _ => Unknown,
        }
    }

    /// A short upper-case name, e.g. `UNKNOWN_TOPIC`, for logs and JSON output.
    pub fn name(self) -> &'static str {
        use ErrorCode::*;
        match self {
            Internal => "INTERNAL",
            UnsupportedVersion => "UNSUPPORTED_VERSION",
            HelloRequired => "HELLO_REQUIRED",
            UnsupportedRequest => "UNSUPPORTED_REQUEST",
            BadArgument => "BAD_ARGUMENT",
            UnknownTopic => "UNKNOWN_TOPIC",
            UnknownQueue => "UNKNOWN_QUEUE",
            NoPermission => "NO_PERMISSION",
            MessageTooLarge => "MESSAGE_TOO_LARGE",
            StoreUnavailable => "STORE_UNAVAILABLE",
            TopicExists => "TOPIC_EXISTS",
            NoRoute => "NO_ROUTE",
            Timeout => "TIMEOUT",
            OffsetOutOfRange => "OFFSET_OUT_OF_RANGE",
            FrameTooLarge => "FRAME_TOO_LARGE",
            MalformedRequest => "MALFORMED_REQUEST",
            StoreFull => "STORE_FULL",
            UnknownTransaction => "UNKNOWN_TRANSACTION",
            TransactionRolledBack => "TRANSACTION_ROLLED_BACK",
            TransactionCommitted => "TRANSACTION_COMMITTED",
            TransactionParked => "TRANSACTION_PARKED",
            DuplicateMsgId => "DUPLICATE_MSG_ID",
            TooManyConnections => "TOO_MANY_CONNECTIONS",
            TooManyTopics => "TOO_MANY_TOPICS",
            Busy => "BUSY",
            GroupActive => "GROUP_ACTIVE",
            QueueNotOwned => "QUEUE_NOT_OWNED",
            BrokerNameTaken => "BROKER_NAME_TAKEN",
            NotMaster => "NOT_MASTER",
            ReplicaDiverged => "REPLICA_DIVERGED",
            ReplicaPositionUnavailable => "REPLICA_POSITION_UNAVAILABLE",
            FlushSlaveTimeout => "FLUSH_SLAVE_TIMEOUT",
            SlaveNotAvailable => "SLAVE_NOT_AVAILABLE",
            NotControllerLeader => "NOT_CONTROLLER_LEADER",
            StaleEpoch => "STALE_EPOCH",
            ControllerUnavailable => "CONTROLLER_UNAVAILABLE",
            NotInSync => "NOT_IN_SYNC",
            OutOfOrderSequence => "OUT_OF_ORDER_SEQUENCE",
            UnknownProducerId => "UNKNOWN_PRODUCER_ID",
            ProducerFenced => "PRODUCER_FENCED",
            OffsetConflict => "OFFSET_CONFLICT",
            DuplicateSequence => "DUPLICATE_SEQUENCE",
            AccessDenied => "ACCESS_DENIED",
            AuthenticationFailed => "AUTHENTICATION_FAILED",
            InvalidReceiptHandle => "INVALID_RECEIPT_HANDLE",
            HeartbeatRequired => "HEARTBEAT_REQUIRED",
            Unknown => "UNKNOWN",
        }
    }
}

impl Serialize for ErrorCode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u16(*self as u16)
    }
}

impl<'de> Deserialize<'de> for ErrorCode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(ErrorCode::from_u16(u16::deserialize(d)?))
    }
}

/// An error answer: a code a program can match and a message a person can read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{} ({}): {message}", code.name(), *code as u16)]
pub struct WireError {
    /// What went wrong, as a stable number.
    pub code: ErrorCode,
    /// What went wrong, for a person.
    pub message: String,
}

impl WireError {
    /// An error with `code` and `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> WireError {
        WireError {
            code,
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_through_their_numbers() {
        for code in [
            ErrorCode::Internal,
            ErrorCode::UnknownTopic,
            ErrorCode::TransactionParked,
            ErrorCode::DuplicateMsgId,
            ErrorCode::TooManyConnections,
            ErrorCode::TooManyTopics,
            ErrorCode::Busy,
            ErrorCode::OffsetOutOfRange,
            ErrorCode::BrokerNameTaken,
            ErrorCode::HeartbeatRequired,
            ErrorCode::AccessDenied,
            ErrorCode::AuthenticationFailed,
            ErrorCode::InvalidReceiptHandle,
        ] {
            assert_eq!(ErrorCode::from_u16(code as u16), code);
        }
        assert_eq!(ErrorCode::from_u16(4242), ErrorCode::Unknown);
    }

    #[test]
    fn display_names_code_and_number() {
        let e = WireError::new(ErrorCode::UnknownTopic, "topic 'x' does not exist");
        assert_eq!(e.to_string(), "UNKNOWN_TOPIC (6): topic 'x' does not exist");
    }
}
