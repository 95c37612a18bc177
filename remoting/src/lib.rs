//! txmq-remoting: the one implementation of a txmq connection, used by the
//! nameserver, the broker and the client alike.
//!
//! Start with [`Connection`]: a cheap, cloneable handle to one TCP
//! connection over which either side may send requests. Requests are
//! pipelined and multiplexed by id; responses may come back in any order.
//! Each connection runs exactly two tasks: a reader, which also drives the
//! in-flight handlers of requests received from the peer, and a writer,
//! which encodes every frame queued since its last write into one buffer
//! and writes it with one system call.
//!
//! A server hands accepted sockets to [`server::serve`] with a [`Service`];
//! a client calls [`Connection::connect`] (optionally with a [`Service`]
//! that answers requests the server sends back, such as check-backs).

#![warn(missing_docs)]

mod connection;
mod error;
pub mod server;

pub use connection::{Connection, ConnectionConfig, Service};

/// Types a [`Service`] implementation names.
pub mod connection_types {
    pub use crate::connection::BoxFuture;
}
pub use error::Error;
