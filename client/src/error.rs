//! The client's one error type.
//!
//! An [`Error`]'s display never repeats its source: print the whole chain
//! (`{:#}` with anyhow, or walk [`std::error::Error::source`]) to see the
//! broker's code and message.

use txmq_protocol::{ErrorCode, WireError};

/// What can go wrong in a client call.
#[derive(Debug, thiserror::Error)]
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
    /// is registered that could auto-create it).
    #[error("no route for topic {topic:?}: no broker serves it")]
    NoRoute {
        /// The topic.
        topic: String,
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
}

/// `Result` with the client's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The remoting error underneath, if any.
    pub fn remoting(&self) -> Option<&txmq_remoting::Error> {
        match self {
            Error::Remoting(e) | Error::Broker { source: e, .. } => Some(e),
            _ => None,
        }
    }

    /// The error a peer answered with, if this is one.
    pub fn wire_error(&self) -> Option<&WireError> {
        self.remoting().and_then(|e| e.remote())
    }

    /// The wire error code: the peer's, or [`ErrorCode::NoRoute`] and
    /// [`ErrorCode::BadArgument`] for the matching client-side errors.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Error::NoRoute { .. } => Some(ErrorCode::NoRoute),
            Error::BadArgument(_) => Some(ErrorCode::BadArgument),
            _ => self.wire_error().map(|e| e.code),
        }
    }

    /// True when trying again, possibly on another broker, may succeed
    /// (see [`txmq_remoting::Error::is_retriable`]).
    pub fn is_retriable(&self) -> bool {
        self.remoting().is_some_and(|e| e.is_retriable())
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
}
