//! Raft messages between members, over txmq connections.
//!
//! A Raft message travels as a `Request::Raft` whose body is openraft's
//! request in MessagePack; the answer's body is openraft's
//! `Result<response, RaftError>` in MessagePack. [`Peers`] keeps one
//! connection per member address (requests are multiplexed on it) and
//! opens a new one when it closed. A member that cannot be connected to is
//! `Unreachable` (openraft backs off); a failure on an open connection is a
//! `NetworkError`. The connections use the member's TLS and credentials
//! ([`ClusterSecurity`]): under an ACL file, the members' user needs
//! `broker = true`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use serde::de::DeserializeOwned;
use serde::Serialize;
use txmq_protocol::{Hello, RaftRpc, RaftRpcKind, Request, Response, Role, PROTOCOL_VERSION};
use txmq_remoting::{Connection, ConnectionConfig};

use crate::durable;
use crate::security::ClusterSecurity;
use crate::types::TypeConfig;

/// Connections to other members (and to the leader, for forwarded
/// requests), one per address.
#[derive(Debug)]
pub(crate) struct Peers {
    id: u64,
    conns: Mutex<HashMap<String, Connection>>,
    config: ConnectionConfig,
}

impl Peers {
    /// Connections of member `id`, with the TLS and credentials of `security`.
    pub(crate) fn new(id: u64, security: &ClusterSecurity) -> Peers {
        Peers {
            id,
            conns: Mutex::new(HashMap::new()),
            config: ConnectionConfig {
                // A dead member should be noticed quickly; Raft retries.
                request_timeout: Duration::from_secs(3),
                keepalive: Duration::from_secs(2),
                tls: security.client_tls.clone(),
                credentials: security.credentials.clone(),
                ..ConnectionConfig::default()
            },
        }
    }

    fn cached(&self, addr: &str) -> Option<Connection> {
        let conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        conns.get(addr).filter(|c| !c.is_closed()).cloned()
    }

    /// An open connection to `addr`, opened now if there is none.
    ///
    /// # Errors
    /// The connection could not be opened.
    pub(crate) async fn get(&self, addr: &str) -> Result<Connection, txmq_remoting::Error> {
        if let Some(c) = self.cached(addr) {
            return Ok(c);
        }
        let hello = Hello {
            version: PROTOCOL_VERSION,
            role: Role::Controller,
            client_id: format!("controller-{}", self.id),
            group: None,
        };
        let conn = Connection::connect(addr, hello, None, self.config.clone()).await?;
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        match conns.get(addr) {
            // Another task connected meanwhile: use its connection, close ours.
            Some(existing) if !existing.is_closed() => {
                conn.close();
                Ok(existing.clone())
            }
            _ => {
                conns.insert(addr.to_string(), conn.clone());
                Ok(conn)
            }
        }
    }

    /// Closes every connection (shutdown).
    pub(crate) fn close_all(&self) {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        for (_, c) in conns.drain() {
            c.close();
        }
    }
}

/// openraft's network factory: a client per target member.
pub(crate) struct Network {
    pub(crate) peers: Arc<Peers>,
}

/// A client to one member.
pub(crate) struct PeerClient {
    peers: Arc<Peers>,
    target: u64,
    addr: String,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> PeerClient {
        PeerClient {
            peers: self.peers.clone(),
            target,
            addr: node.addr.clone(),
        }
    }
}

type RpcResult<T, E> = Result<T, RPCError<u64, BasicNode, RaftError<u64, E>>>;

impl PeerClient {
    async fn send<Q, P, E>(&self, kind: RaftRpcKind, req: &Q, ttl: Duration) -> RpcResult<P, E>
    where
        Q: Serialize,
        P: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let body = durable::encode(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let conn = self
            .peers
            .get(&self.addr)
            .await
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))?;
        let rpc = RaftRpc {
            kind,
            from: self.peers.id,
            body: Bytes::from(body),
        };
        let reply = match conn.request(Request::Raft(rpc), ttl).await {
            Ok(Response::Raft(r)) => r,
            Ok(_) => {
                let e = std::io::Error::other("unexpected response to a Raft request");
                return Err(RPCError::Network(NetworkError::new(&e)));
            }
            Err(e) => return Err(RPCError::Network(NetworkError::new(&e))),
        };
        let answer: Result<P, RaftError<u64, E>> =
            durable::decode(&reply.body).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        answer.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<u64>, openraft::error::Infallible> {
        self.send(RaftRpcKind::AppendEntries, &rpc, option.hard_ttl())
            .await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<u64>, InstallSnapshotError> {
        self.send(RaftRpcKind::InstallSnapshot, &rpc, option.hard_ttl())
            .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<u64>, openraft::error::Infallible> {
        self.send(RaftRpcKind::Vote, &rpc, option.hard_ttl()).await
    }
}

/// Serves one Raft message received from a peer: decodes it, hands it to
/// the local Raft, and encodes the answer.
///
/// # Errors
/// The body does not decode (the error names why).
pub(crate) async fn serve_rpc(raft: &crate::types::Raft, rpc: RaftRpc) -> Result<Bytes, String> {
    fn dec<T: DeserializeOwned>(b: &[u8]) -> Result<T, String> {
        durable::decode(b).map_err(|e| format!("undecodable Raft message: {e}"))
    }
    fn enc<T: Serialize>(v: &T) -> Result<Bytes, String> {
        durable::encode(v)
            .map(Bytes::from)
            .map_err(|e| format!("cannot encode Raft answer: {e}"))
    }
    match rpc.kind {
        RaftRpcKind::AppendEntries => enc(&raft.append_entries(dec(&rpc.body)?).await),
        RaftRpcKind::Vote => enc(&raft.vote(dec(&rpc.body)?).await),
        RaftRpcKind::InstallSnapshot => enc(&raft.install_snapshot(dec(&rpc.body)?).await),
    }
}
