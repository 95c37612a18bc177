//! txmq-remoting: the one implementation of a txmq connection, used by the
//! nameserver, the broker and the client alike.
//!
//! Start with [`Connection`]: a cheap, cloneable handle to one TCP
//! connection over which either side may send requests. Requests are
//! pipelined and multiplexed by id; responses may come back in any order.
//! Each connection runs exactly two tasks: a reader, which also drives the
//! in-flight handlers of requests received from the peer, and a writer,
//! which writes every frame queued since its last write with one system
//! call. Senders encode their frames straight into that queue, which is
//! bounded in bytes; a request's timeout counts its wait for room there,
//! and requests that time out in a row with the peer silent close the
//! connection. TCP keepalive is on.
//!
//! A server hands accepted sockets to [`server::serve`] with a [`Service`];
//! a client calls [`Connection::connect`] (optionally with a [`Service`]
//! that answers requests the server sends back, such as check-backs).

#![warn(missing_docs)]

pub mod acl;
mod addr;
mod connection;
mod error;
pub mod flags;
pub mod logging;
pub mod metrics;
pub mod server;
pub mod tls;

pub use acl::{auth_signature, shown_key, AclStore, Credentials, Op, ServerSecurity};
pub use addr::check_host_port;
pub use connection::{prepare_tcp, Connection, ConnectionConfig, Queued, Reply, Service};
pub use tls::{TlsClient, TlsFiles, TlsServer, TlsSetupError};

/// Types a [`Service`] implementation names.
pub mod connection_types {
    pub use crate::connection::BoxFuture;
}
pub use error::Error;
