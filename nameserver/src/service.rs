//! The requests a nameserver answers, dispatched from one `match`.
//!
//! Every handler is a short synchronous update or read of the
//! [`Registry`]; none awaits, so each answer is a ready future. The
//! exceptions are the controller's admin requests (`ElectMaster`,
//! `GetControllerInfo`), handed to the embedded controller when there is one.
//!
//! Every request is first checked against the connection's user
//! (`permission`); without an ACL file everything is allowed.

use std::sync::Arc;

use tokio::time::Instant;
use tracing::debug;
use txmq_controller::{ControllerHandle, Permission};
use txmq_protocol::{
    Call, Done, ElectMaster, ErrorCode, GetControllerInfo, Hello, HelloOk, Pong, Request, Response,
    UnregisterBroker, WireError, PROTOCOL_VERSION,
};
use txmq_remoting::connection_types::BoxFuture;
use txmq_remoting::{Connection, ServerSecurity, Service};

use crate::registry::Registry;

/// The nameserver's [`Service`]: answers brokers' registrations and clients' queries.
pub(crate) struct NameService {
    registry: Arc<Registry>,
    /// `nameserver <addr>`, sent in every hello answer.
    server_name: String,
    /// The embedded controller member, if any.
    controller: Option<ControllerHandle>,
    /// TLS and the ACL file of the listener: who may do what.
    security: ServerSecurity,
    /// Connections and requests counted (`--metrics-listen`).
    metrics: Arc<crate::metrics::Metrics>,
}

/// The permission `request` needs from the connection's user: changing
/// the route table is for cluster members and admins, a planned master
/// switch for admins, reading for anyone signed in.
fn permission(request: &Request) -> Permission {
    match request {
        Request::RegisterBroker(r) => {
            Permission::Cluster(format!("register broker {}", r.broker_name))
        }
        Request::UnregisterBroker(r) => {
            Permission::Cluster(format!("unregister broker {}", r.broker_name))
        }
        Request::ElectMaster(r) => Permission::Admin(format!("elect master of {}", r.broker_name)),
        _ => Permission::Authenticated,
    }
}

impl NameService {
    pub(crate) fn new(
        registry: Arc<Registry>,
        local_addr: std::net::SocketAddr,
        controller: Option<ControllerHandle>,
        security: ServerSecurity,
    ) -> NameService {
        NameService {
            registry,
            server_name: format!("nameserver {local_addr}"),
            controller,
            security,
            metrics: Arc::new(crate::metrics::Metrics::new()),
        }
    }

    pub(crate) fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> NameService {
        self.metrics = metrics;
        self
    }

    /// Removes the brokers `req` names that `conn` registered. A goodbye
    /// from any other connection (even of the same user) is refused: by
    /// name or address alone anyone could drop a live broker from the
    /// routes. Under an ACL file the refusal is `ACCESS_DENIED` naming
    /// the user; without one it stays `BROKER_NAME_TAKEN`, as before.
    fn unregister(&self, conn: &Connection, req: &UnregisterBroker) -> Result<(), WireError> {
        // Idempotent: a broker unknown (already expired, say) is already gone.
        match self.registry.unregister(req, conn.id(), conn.peer_addr()) {
            Ok(_) => Ok(()),
            Err(e) if e.code == ErrorCode::BrokerNameTaken && self.security.authenticates() => {
                Err(WireError::new(
                    ErrorCode::AccessDenied,
                    format!(
                        "user '{}' may not unregister broker '{}' from this connection: {}",
                        conn.user().unwrap_or("(not authenticated)"),
                        req.broker_name,
                        e.message
                    ),
                ))
            }
            Err(e) => Err(e),
        }
    }

    /// The embedded controller, or the error saying there is none.
    fn controller(&self, kind: &str) -> Result<ControllerHandle, WireError> {
        self.controller.clone().ok_or_else(|| {
            WireError::new(
                ErrorCode::UnsupportedRequest,
                format!(
                    "{kind}: this nameserver runs no controller (start it with --controller-id, \
                     --controller-listen, --controller-peers and --controller-data-dir)"
                ),
            )
        })
    }

    /// Answers one request that came over `conn`.
    fn handle(&self, conn: &Connection, request: Request) -> Result<Response, WireError> {
        let now = Instant::now();
        match request {
            Request::Ping(_) => Ok(Response::Ping(Pong {})),
            Request::RegisterBroker(req) => {
                self.registry.register(*req, conn.id(), now)?;
                Ok(Response::RegisterBroker(Done {}))
            }
            Request::UnregisterBroker(req) => {
                self.unregister(conn, &req)?;
                Ok(Response::UnregisterBroker(Done {}))
            }
            Request::GetRoute(req) => self.registry.route(&req.topic, now).map(Response::GetRoute),
            Request::GetCluster(_) => Ok(Response::GetCluster(self.registry.cluster(now))),
            Request::ListTopics(_) => Ok(Response::ListTopics(self.registry.topics(now))),
            // Broker requests (and any kind added later) are not a nameserver's job.
            other => Err(WireError::new(
                ErrorCode::UnsupportedRequest,
                format!(
                    "{} requests are not served by a nameserver; send them to a broker",
                    other.kind()
                ),
            )),
        }
    }
}

impl Service for NameService {
    fn hello(&self, conn: &Connection, hello: &Hello) -> Result<HelloOk, WireError> {
        debug!(
            peer = %conn.peer_addr(),
            conn = conn.id(),
            role = ?hello.role,
            client_id = %hello.client_id,
            "hello"
        );
        self.metrics.connected();
        Ok(HelloOk {
            version: PROTOCOL_VERSION,
            server: self.server_name.clone(),
            challenge: None,
        })
    }

    fn call(&self, conn: &Connection, request: Request) -> BoxFuture<Result<Response, WireError>> {
        self.metrics.request(request.kind());
        if let Err(e) = self.security.check(conn.user(), permission(&request).op()) {
            return Box::pin(std::future::ready(Err(e)));
        }
        match request {
            Request::ElectMaster(req) => match self.controller("ElectMaster") {
                Ok(c) => {
                    Box::pin(async move { c.elect_master(req).await.map(ElectMaster::response) })
                }
                Err(e) => Box::pin(std::future::ready(Err(e))),
            },
            Request::GetControllerInfo(_) => Box::pin(std::future::ready(
                self.controller("GetControllerInfo")
                    .map(|c| GetControllerInfo::response(c.info())),
            )),
            other => Box::pin(std::future::ready(self.handle(conn, other))),
        }
    }

    fn closed(&self, conn: &Connection) {
        if conn.peer_hello().is_some() {
            self.metrics.disconnected();
        }
        // Drops (and logs) every broker whose latest registration came over it.
        self.registry.connection_closed(conn.id());
    }
}
