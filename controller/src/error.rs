//! Errors of starting a controller. Errors of requests travel as
//! [`WireError`](txmq_protocol::WireError)s instead.

/// What can keep a controller from starting.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A setting is missing or out of range; the message says which.
    #[error("invalid controller configuration: {0}")]
    InvalidConfig(String),
    /// The controller-listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: String,
        /// The operating system's reason.
        #[source]
        source: std::io::Error,
    },
    /// The data directory could not be opened or recovered.
    #[error("cannot open the controller's data in {dir}: {source}")]
    Storage {
        /// The data directory.
        dir: String,
        /// The reason.
        #[source]
        source: std::io::Error,
    },
    /// openraft refused to start.
    #[error("cannot start Raft: {0}")]
    Raft(String),
}
