//! Errors of a connection.

use std::time::Duration;

use txmq_protocol::WireError;

/// What can go wrong with a request on a connection.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The TCP connection could not be opened.
    #[error("cannot connect to {addr}: {message}")]
    Connect {
        /// Address tried.
        addr: String,
        /// The operating system's reason.
        message: String,
    },
    /// The connection closed before the answer came.
    #[error("connection to {peer} closed")]
    Closed {
        /// The peer's address.
        peer: String,
    },
    /// No answer within the timeout.
    #[error("{kind} request to {peer} timed out after {after:?}")]
    Timeout {
        /// The request kind.
        kind: &'static str,
        /// The peer's address.
        peer: String,
        /// The timeout.
        after: Duration,
    },
    /// The peer answered with an error.
    #[error(transparent)]
    Remote(#[from] WireError),
    /// The request was never sent: this side refused it before writing it,
    /// its frame being over the connection's maximum (`max_frame_len`;
    /// `code` [`FRAME_TOO_LARGE`](txmq_protocol::ErrorCode::FrameTooLarge)),
    /// or not encodable. The peer did not see it, so nothing was done.
    #[error("{kind} request refused before sending: {reason}")]
    NotSent {
        /// The request kind.
        kind: &'static str,
        /// The matching wire code, for callers that sort errors by code.
        code: txmq_protocol::ErrorCode,
        /// Why.
        reason: String,
    },
    /// The peer answered with a response of the wrong kind.
    #[error("unexpected response to a {kind} request")]
    UnexpectedResponse {
        /// The request kind.
        kind: &'static str,
    },
}

impl Error {
    /// The wire error, when the peer answered with one.
    pub fn remote(&self) -> Option<&WireError> {
        match self {
            Error::Remote(e) => Some(e),
            _ => None,
        }
    }

    /// True when the request may have failed because of the connection or the
    /// peer's availability, so that trying another broker makes sense.
    pub fn is_retriable(&self) -> bool {
        use txmq_protocol::ErrorCode;
        match self {
            Error::Connect { .. } | Error::Closed { .. } | Error::Timeout { .. } => true,
            Error::Remote(e) => matches!(
                e.code,
                ErrorCode::StoreUnavailable
                    | ErrorCode::NoPermission
                    | ErrorCode::UnknownTopic
                    | ErrorCode::TooManyConnections
                    | ErrorCode::Busy
            ),
            Error::NotSent { .. } | Error::UnexpectedResponse { .. } => false,
        }
    }
}
