//! What travels on a connection: requests and responses, each with an id.

use serde::{Deserialize, Serialize};

use crate::error::WireError;
use crate::request::{Request, Response};

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// One frame. Either side may send requests; a response carries the id of its request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Frame {
    /// A request with the sender's id for it.
    Request(u64, Request),
    /// The answer to the request with that id.
    Response(u64, Result<Response, WireError>),
}

/// The frame envelope without its body: what can still be read from a frame
/// whose body does not decode, so the sender can be answered with an error.
#[derive(Debug, Deserialize)]
pub(crate) enum FrameHeader {
    Request(u64, serde::de::IgnoredAny),
    Response(u64, serde::de::IgnoredAny),
}

/// Who is on the other end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// A broker (talking to a nameserver).
    Broker,
    /// A plain producer.
    Producer,
    /// A transactional producer that answers check-backs.
    TransactionProducer,
    /// A consumer.
    Consumer,
    /// An administrative tool.
    Admin,
    /// A slave broker replicating its master's commit log.
    Replica,
    /// A controller member (Raft traffic between controllers).
    Controller,
}

/// The first request on every connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// Protocol version the sender speaks.
    pub version: u32,
    /// The sender's role.
    pub role: Role,
    /// The sender's client id (process-unique; for logs and group membership).
    pub client_id: String,
    /// Producer or consumer group, if any.
    pub group: Option<String>,
}

/// The answer to [`Hello`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HelloOk {
    /// Protocol version the server speaks.
    pub version: u32,
    /// The server's name (nameserver address, broker name).
    pub server: String,
    /// Set when the server requires authentication: a fresh random value
    /// the client signs in an [`Authenticate`](crate::Authenticate), the
    /// next request it must send. The connection is not greeted until then.
    #[serde(default, with = "serde_bytes")]
    pub challenge: Option<Vec<u8>>,
}

impl HelloOk {
    /// A plain welcome: `version`, `server`, no challenge.
    pub fn new(version: u32, server: impl Into<String>) -> HelloOk {
        HelloOk {
            version,
            server: server.into(),
            challenge: None,
        }
    }
}
