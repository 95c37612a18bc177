//! RocketMQ's status codes: what a RocketMQ client reads inside every
//! response (`Status { code, message }`), from txmq's error codes.

use txmq_protocol::{ErrorCode, SendStatus, WireError};

use super::pb::{Code, Status};

pub(super) fn ok() -> Status {
    Status {
        code: Code::Ok as i32,
        message: "OK".into(),
    }
}

pub(super) fn new(code: Code, message: impl Into<String>) -> Status {
    Status {
        code: code as i32,
        message: message.into(),
    }
}

/// A txmq error as RocketMQ's nearest code, keeping txmq's message.
pub(super) fn from_wire(e: &WireError) -> Status {
    new(code_of(e.code), e.message.clone())
}

fn code_of(code: ErrorCode) -> Code {
    use ErrorCode as E;
    match code {
        E::BadArgument | E::MalformedRequest | E::UnknownQueue => Code::BadRequest,
        E::UnknownTopic | E::NoRoute => Code::TopicNotFound,
        E::NoPermission | E::AccessDenied | E::NotMaster => Code::Forbidden,
        E::AuthenticationFailed => Code::Unauthorized,
        E::MessageTooLarge | E::FrameTooLarge => Code::MessageBodyTooLarge,
        E::UnknownTransaction
        | E::TransactionRolledBack
        | E::TransactionCommitted
        | E::TransactionParked => Code::InvalidTransactionId,
        E::DuplicateMsgId => Code::IllegalMessageId,
        E::InvalidReceiptHandle => Code::InvalidReceiptHandle,
        E::OffsetOutOfRange => Code::MessageNotFound,
        E::TooManyConnections | E::Busy => Code::TooManyRequests,
        E::Timeout => Code::ProxyTimeout,
        E::FlushSlaveTimeout | E::NotInSync | E::SlaveNotAvailable => Code::SlavePersistenceTimeout,
        E::UnsupportedRequest | E::UnsupportedVersion => Code::Unsupported,
        E::StoreFull | E::StoreUnavailable => Code::HaNotAvailable,
        _ => Code::InternalServerError,
    }
}

/// A send's durability as a status: stored but not yet flushed or
/// replicated is RocketMQ's persistence timeouts.
pub(super) fn from_send(status: SendStatus) -> Status {
    match status {
        SendStatus::SendOk => ok(),
        SendStatus::FlushDiskTimeout => new(
            Code::MasterPersistenceTimeout,
            "stored, but not flushed to disk within the sync flush timeout",
        ),
        SendStatus::FlushSlaveTimeout => new(
            Code::SlavePersistenceTimeout,
            "stored, but not on the in-sync replicas within the replication timeout",
        ),
        SendStatus::SlaveNotAvailable => new(
            Code::SlavePersistenceTimeout,
            "stored, but no in-sync replica is available",
        ),
    }
}
