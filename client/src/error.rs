//! The client's one error type.
//!
//! An [`Error`]'s display never repeats its source (`broker b (addr)`
//! alone, say): print the whole chain with [`chain`] (or `{:#}` with
//! anyhow) to see the broker's code and message.

use txmq_protocol::{ErrorCode, TxAction, WireError};

/// What can go wrong in a client call.
///
/// New kinds of failure are added as the client grows, so a `match` on it
/// needs a `_` arm; [`Error::code`], [`Error::is_retriable`] and
/// [`Error::wire_error`] answer most questions without one.
///
/// ```no_run
/// # async fn demo(producer: txmq::Producer) {
/// use txmq::error::chain;
/// use txmq::{Error, ErrorCode, Message};
///
/// match producer.send(Message::new("orders", "order 42")).await {
///     Ok(receipt) => println!("stored as {}", receipt.msg_id),
///     Err(e) if e.code() == Some(ErrorCode::UnknownTopic) => eprintln!("create the topic first"),
///     Err(e @ Error::Closed(_)) => eprintln!("{e}"),
///     // The whole chain: "broker b (addr): MESSAGE_TOO_LARGE (9): ...".
///     Err(e) if e.is_retriable() => eprintln!("try again later: {}", chain(&e)),
///     Err(e) => eprintln!("failed: {}", chain(&e)),
/// }
/// # }
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A request failed on its connection: cannot connect, closed, timed
    /// out, or the peer answered with an error ([`txmq_remoting::Error::Remote`]).
    #[error(transparent)]
    Remoting(#[from] txmq_remoting::Error),
    /// A request to a broker failed; the source says how.
    #[error("broker {broker} ({addr})")]
    Broker {
        /// The broker's name.
        broker: String,
        /// The broker's address.
        addr: String,
        /// What went wrong.
        #[source]
        source: txmq_remoting::Error,
    },
    /// No nameserver knows a route for the topic (and, for a send, no broker
    /// is registered that could auto-create it; an ordered send, whose key
    /// picks among the topic's queues, never auto-creates one).
    #[error("no route for topic {topic:?}: no broker serves it")]
    NoRoute {
        /// The topic.
        topic: String,
    },
    /// The broker groups that would take a write have no live master now:
    /// only their slaves are live, and slaves take no writes (reads go on).
    #[error("topic {topic:?} cannot be written now: broker group(s) {} have no live master (only slaves are live, and slaves take no writes)", .brokers.join(", "))]
    NoMaster {
        /// The topic.
        topic: String,
        /// The broker groups without a master.
        brokers: Vec<String>,
    },
    /// The topic's route has no queue with the needed permission.
    #[error("topic {topic:?} has no {what} queue")]
    NoQueue {
        /// The topic.
        topic: String,
        /// `"writable"` or `"readable"`.
        what: &'static str,
    },
    /// No broker is registered with the nameservers.
    #[error("no broker is registered with the nameservers")]
    NoBroker,
    /// No broker of that name (or address) is registered with the nameservers.
    #[error("no broker named {name:?} is registered with the nameservers")]
    UnknownBroker {
        /// The name asked for.
        name: String,
    },
    /// An argument was rejected before anything was sent.
    #[error("bad argument: {0}")]
    BadArgument(String),
    /// A peer's answer does not fit the request (a bug on one side).
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// No broker has a writable queue of every topic of a transaction.
    #[error("no broker serves all of the topics {topics:?} with a writable queue")]
    NoCommonBroker {
        /// The transaction's topics.
        topics: Vec<String>,
    },
    /// A transaction was prepared and its local transaction ran, but ending
    /// it as decided failed: the broker refused (e.g. `TRANSACTION_ROLLED_BACK`
    /// when a check-back already rolled it back, `TRANSACTION_PARKED`), or
    /// the request was lost, in which case the broker checks back later.
    /// A transactional send never returns it as its `Err`: it is inside the
    /// send's [`TxOutcome`](crate::TxOutcome), as
    /// [`TxEnd::Refused`](crate::TxEnd::Refused) or
    /// [`TxEnd::Lost`](crate::TxEnd::Lost).
    #[error("cannot {} transaction {tx_id} on broker {broker}", action_verb(.action))]
    EndTransaction {
        /// The transaction id.
        tx_id: u64,
        /// The broker holding it.
        broker: String,
        /// What the local transaction decided.
        action: TxAction,
        /// What went wrong.
        #[source]
        source: txmq_remoting::Error,
    },
    /// No broker knows the transaction id.
    #[error("transaction {tx_id} is not known to any broker ({})", .brokers.join(", "))]
    UnknownTransaction {
        /// The transaction id.
        tx_id: u64,
        /// The brokers asked.
        brokers: Vec<String>,
    },
    /// Several brokers know the transaction id (ids are unique per broker only).
    #[error("transaction {tx_id} is known to several brokers ({}); name the broker (--broker)", .brokers.join(", "))]
    AmbiguousTransaction {
        /// The transaction id.
        tx_id: u64,
        /// The brokers that know it.
        brokers: Vec<String>,
    },
    /// No nameserver runs the controller: every one answered
    /// `UNSUPPORTED_REQUEST` (or could not be reached).
    #[error("no nameserver runs the controller (asked {}); start the nameservers with --controller-id, --controller-listen and --controller-peers", .nameservers.join(", "))]
    NoController {
        /// The nameservers asked.
        nameservers: Vec<String>,
    },
    /// The client object was closed.
    #[error("{0} is closed")]
    Closed(&'static str),
    /// Closing waited for the calls in flight and some were still running
    /// at its timeout ([`ClientConfig::close_timeout`](crate::ClientConfig::close_timeout)):
    /// the connections were closed under them, so they fail, each with its
    /// own error to its caller.
    #[error("{what} closed with {in_flight} call(s) still in flight after {after:?}")]
    Unfinished {
        /// The handle closed.
        what: &'static str,
        /// How many calls were still running.
        in_flight: usize,
        /// How long closing waited.
        after: std::time::Duration,
    },
    /// A consumer gave queues up without storing its final position there
    /// (the brokers could not be reached): their last messages come again.
    #[error("the final offsets of {queues} queue(s) could not be committed; their last messages will be delivered again")]
    CommitFailed {
        /// How many queues.
        queues: u64,
    },
}

fn action_verb(action: &TxAction) -> &'static str {
    match action {
        TxAction::Commit => "commit",
        TxAction::Rollback => "roll back",
    }
}

/// An error and its sources as one line, `outer: inner: innermost`, leaving
/// out a source whose text the previous one already shows.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut previous = out.clone();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !text.is_empty() && !previous.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        previous = text;
        source = s.source();
    }
    out
}

/// True when trying `e`'s request again, possibly elsewhere, may succeed:
/// [`txmq_remoting::Error::is_retriable`], and [`not_master`] (the broker
/// is not its group's master; the master of its group takes it).
pub(crate) fn retriable(e: &txmq_remoting::Error) -> bool {
    e.is_retriable() || not_master(e)
}

/// True when the broker refused because it is not its group's master: a
/// slave's `NOT_MASTER`, or a fenced master's `STALE_EPOCH` (the controller
/// elected another since). Nothing was stored; the group's master, as a
/// refreshed route names it, takes the request.
pub(crate) fn not_master(e: &txmq_remoting::Error) -> bool {
    e.remote()
        .is_some_and(|w| matches!(w.code, ErrorCode::NotMaster | ErrorCode::StaleEpoch))
}

/// True when a request that was sent may have been stored by the broker:
/// a timeout, a lost connection, a master that lost its role, and any
/// answer but those that guarantee nothing was written (validation,
/// refusals before the write, the producer table's sequence refusals). A
/// stamped request that may have been stored keeps its stamp and queue.
pub(crate) fn maybe_stored(e: &txmq_remoting::Error) -> bool {
    let Some(w) = e.remote() else {
        return matches!(
            e,
            txmq_remoting::Error::Timeout { .. } | txmq_remoting::Error::Closed { .. }
        );
    };
    !matches!(
        w.code,
        ErrorCode::UnsupportedVersion
            | ErrorCode::HelloRequired
            | ErrorCode::UnsupportedRequest
            | ErrorCode::BadArgument
            | ErrorCode::UnknownTopic
            | ErrorCode::UnknownQueue
            | ErrorCode::NoPermission
            | ErrorCode::MessageTooLarge
            | ErrorCode::FrameTooLarge
            | ErrorCode::MalformedRequest
            | ErrorCode::StoreFull
            | ErrorCode::TooManyConnections
            | ErrorCode::TooManyTopics
            | ErrorCode::Busy
            | ErrorCode::DuplicateMsgId
            | ErrorCode::OutOfOrderSequence
            | ErrorCode::UnknownProducerId
            | ErrorCode::AccessDenied
            | ErrorCode::AuthenticationFailed
            | ErrorCode::ProducerFenced
            | ErrorCode::DuplicateSequence
    )
}

/// `Result` with the client's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The remoting error underneath, if any.
    pub fn remoting(&self) -> Option<&txmq_remoting::Error> {
        match self {
            Error::Remoting(e)
            | Error::Broker { source: e, .. }
            | Error::EndTransaction { source: e, .. } => Some(e),
            _ => None,
        }
    }

    /// The error a peer answered with, if this is one.
    pub fn wire_error(&self) -> Option<&WireError> {
        self.remoting().and_then(|e| e.remote())
    }

    /// The wire error code: the peer's, or the matching code of a
    /// client-side error ([`ErrorCode::NoRoute`] for [`Error::NoRoute`] and
    /// [`Error::NoCommonBroker`], [`ErrorCode::BadArgument`] for
    /// [`Error::BadArgument`] and [`Error::AmbiguousTransaction`],
    /// [`ErrorCode::UnknownTransaction`] for [`Error::UnknownTransaction`],
    /// [`ErrorCode::UnsupportedRequest`] for [`Error::NoController`], the
    /// code of a request refused before sending,
    /// [`txmq_remoting::Error::NotSent`]: `FRAME_TOO_LARGE` for one over the
    /// frame size).
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Error::NoRoute { .. } | Error::NoCommonBroker { .. } | Error::NoMaster { .. } => {
                Some(ErrorCode::NoRoute)
            }
            Error::BadArgument(_) | Error::AmbiguousTransaction { .. } => {
                Some(ErrorCode::BadArgument)
            }
            Error::UnknownTransaction { .. } => Some(ErrorCode::UnknownTransaction),
            Error::NoController { .. } => Some(ErrorCode::UnsupportedRequest),
            _ => match self.remoting() {
                Some(txmq_remoting::Error::NotSent { code, .. }) => Some(*code),
                _ => self.wire_error().map(|e| e.code),
            },
        }
    }

    /// True when trying again, possibly on another broker, may succeed
    /// (see [`txmq_remoting::Error::is_retriable`]; also `NOT_MASTER` and
    /// `STALE_EPOCH`: a slave or a fenced master refused a write, and its
    /// group's master takes it; and [`Error::NoMaster`], a failover in
    /// progress). Never for [`Error::EndTransaction`]: sending the
    /// transaction again would run the local transaction twice.
    ///
    /// Some of these last (a topic no broker has, `UNKNOWN_TOPIC`, is
    /// retriable because another broker may have it): a retry loop of your
    /// own should pause between attempts and stop after a few.
    pub fn is_retriable(&self) -> bool {
        match self {
            Error::EndTransaction { .. } => false,
            Error::NoMaster { .. } => true,
            _ => self.remoting().is_some_and(retriable),
        }
    }

    /// True when a slave (`NOT_MASTER`) or a fenced master (`STALE_EPOCH`)
    /// refused a write: the route is stale.
    pub fn is_not_master(&self) -> bool {
        matches!(
            self.code(),
            Some(ErrorCode::NotMaster | ErrorCode::StaleEpoch)
        )
    }

    pub(crate) fn at_broker(broker: &str, addr: &str, source: txmq_remoting::Error) -> Error {
        Error::Broker {
            broker: broker.to_string(),
            addr: addr.to_string(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_errors_expose_the_wire_code_and_retriability() {
        let e = Error::at_broker(
            "b1",
            "127.0.0.1:1",
            txmq_remoting::Error::Remote(WireError::new(ErrorCode::UnknownTopic, "no topic x")),
        );
        assert_eq!(e.code(), Some(ErrorCode::UnknownTopic));
        assert!(e.is_retriable());
        assert_eq!(e.to_string(), "broker b1 (127.0.0.1:1)");
        let source = std::error::Error::source(&e).map(|s| s.to_string());
        assert_eq!(source.as_deref(), Some("UNKNOWN_TOPIC (6): no topic x"));

        let bad = Error::Remoting(txmq_remoting::Error::Remote(WireError::new(
            ErrorCode::BadArgument,
            "queues must be 1 to 1024",
        )));
        assert!(!bad.is_retriable());
        assert_eq!(
            bad.to_string(),
            "BAD_ARGUMENT (5): queues must be 1 to 1024"
        );
        assert_eq!(
            Error::NoRoute { topic: "t".into() }.code(),
            Some(ErrorCode::NoRoute)
        );
    }

    #[test]
    fn a_slave_or_a_fenced_master_refusing_is_retried_at_the_new_master() {
        for code in [ErrorCode::NotMaster, ErrorCode::StaleEpoch] {
            let refusal = txmq_remoting::Error::Remote(WireError::new(code, "elsewhere"));
            assert!(not_master(&refusal), "{code:?}");
            assert!(retriable(&refusal), "{code:?}");
            let e = Error::at_broker("b1", "127.0.0.1:1", refusal);
            assert!(e.is_retriable() && e.is_not_master(), "{code:?}");
        }
        for code in [ErrorCode::NotInSync, ErrorCode::BrokerNameTaken] {
            let other = txmq_remoting::Error::Remote(WireError::new(code, "no"));
            assert!(!not_master(&other), "{code:?}");
        }
        // A prepared transaction is never ended again by a blind retry.
        let end = Error::EndTransaction {
            tx_id: 1,
            broker: "b1".into(),
            action: TxAction::Commit,
            source: txmq_remoting::Error::Remote(WireError::new(ErrorCode::StaleEpoch, "")),
        };
        assert!(!end.is_retriable());
        // Between two masters of a group: the next one is elected shortly.
        let between = Error::NoMaster {
            topic: "t".into(),
            brokers: vec!["b1".into()],
        };
        assert!(between.is_retriable());
    }

    #[test]
    fn transaction_errors_say_which_transaction_and_carry_the_code() {
        let e = Error::EndTransaction {
            tx_id: 42,
            broker: "b1".into(),
            action: TxAction::Commit,
            source: txmq_remoting::Error::Remote(WireError::new(
                ErrorCode::TransactionRolledBack,
                "transaction 42 was rolled back",
            )),
        };
        assert_eq!(e.code(), Some(ErrorCode::TransactionRolledBack));
        assert!(!e.is_retriable());
        assert_eq!(
            chain(&e),
            "cannot commit transaction 42 on broker b1: TRANSACTION_ROLLED_BACK (21): transaction 42 was rolled back"
        );
        let unknown = Error::UnknownTransaction {
            tx_id: 7,
            brokers: vec!["a".into(), "b".into()],
        };
        assert_eq!(unknown.code(), Some(ErrorCode::UnknownTransaction));
        assert_eq!(
            unknown.to_string(),
            "transaction 7 is not known to any broker (a, b)"
        );
        let ambiguous = Error::AmbiguousTransaction {
            tx_id: 7,
            brokers: vec!["a".into(), "b".into()],
        };
        assert!(ambiguous.to_string().contains("--broker"));
    }
}
