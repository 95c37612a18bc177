//! Errors of starting a nameserver. Errors of requests travel as
//! [`WireError`](txmq_protocol::WireError)s instead.

/// What can keep a nameserver from starting.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The listen address could not be bound (in use, not local, not an address).
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: String,
        /// The operating system's reason.
        #[source]
        source: std::io::Error,
    },
    /// A setting is out of range; the message says which.
    #[error("invalid nameserver configuration: {0}")]
    InvalidConfig(String),
    /// The embedded controller could not start.
    #[error(transparent)]
    Controller(#[from] txmq_controller::Error),
}
