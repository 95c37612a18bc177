//! The RocketMQ 5 front door: `apache.rocketmq.v2.MessagingService` over
//! gRPC (`--grpc-listen`), so the official RocketMQ clients of every
//! language work with txmq.
//!
//! Each RPC maps onto the broker's own services: a send is the send
//! handler's, a transactional send is a prepare whose producer group is the
//! topic (RocketMQ 5 clients name no group), a check-back goes out over the
//! client's telemetry stream (`telemetry.rs`) and its answer comes back as
//! an `EndTransaction`. The protobuf files are in `broker/proto`.
//!
//! Answers carry RocketMQ's own status codes inside the response
//! (`status.rs`); an RPC txmq does not serve answers gRPC `UNIMPLEMENTED`
//! naming it.

mod auth;
mod consume;
mod convert;
mod incoming;
mod route;
mod send;
mod stall;
mod status;
mod telemetry;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use txmq_remoting::Op;

use crate::BrokerInner;
pub(crate) use telemetry::Session;

/// The generated messages, client and service of the RocketMQ 5 API.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("apache.rocketmq.v2");
}

use pb::messaging_service_server::{MessagingService, MessagingServiceServer};

/// Largest request the front door decodes: a message of the broker's
/// `--max-message-size` with room for its properties. Larger requests are
/// refused with `OUT_OF_RANGE` ("decoded message length too large"), and
/// the connection goes on.
fn max_request(b: &BrokerInner) -> usize {
    b.config.max_message_size + (64 << 10)
}

/// The service: one per incarnation of the broker.
pub(crate) struct Front {
    b: Arc<BrokerInner>,
    sessions: Arc<telemetry::Sessions>,
    /// Round robin over a topic's queues for messages without a message group.
    next_queue: std::sync::atomic::AtomicU32,
}

/// Serves the front door on `listener` until `shutdown`.
pub(crate) async fn serve(
    b: Arc<BrokerInner>,
    listener: tokio::net::TcpListener,
    tcp: txmq_remoting::ConnectionConfig,
    tls: Option<txmq_remoting::TlsServer>,
    shutdown: CancellationToken,
) {
    let addr = listener.local_addr().ok();
    if let Some(addr) = &addr {
        b.security.server.warn_if_open(addr, "the gRPC port");
        if tls.is_none() && b.security.server.authenticates() && !addr.ip().is_loopback() {
            tracing::warn!(%addr, "the gRPC port listens beyond loopback without TLS: a RocketMQ client's signature covers only its call's date-time, so a signed header seen on the network can be sent again (give --tls-cert/--tls-key)");
        }
    }
    let limit = max_request(&b);
    let front_timeout = b.config.frame_timeout;
    let max_streams = b.config.grpc_max_streams;
    // gRPC runs over HTTP/2, which its clients ask for in the handshake.
    let tls = tls.map(|t| t.with_alpn(&[b"h2", b"http/1.1"]));
    let tls_on = tls.is_some();
    let incoming = incoming::accepted(b.clone(), listener, tcp, tls);
    let front = Front {
        b,
        sessions: Arc::default(),
        next_queue: Default::default(),
    };
    let service = MessagingServiceServer::new(front)
        .max_decoding_message_size(limit)
        .max_encoding_message_size(limit);
    let service = stall::StallLimit::new(service, front_timeout);
    tracing::info!(?addr, tls = tls_on, "serving the RocketMQ 5 gRPC API");
    // HTTP/1.1 is accepted so that a client speaking it gets a gRPC
    // status (UNIMPLEMENTED for a path the API lacks), not a closed socket.
    // TCP_NODELAY and keepalive are set by `incoming`, as on txmq's own
    // port (tonic's own settings are not applied to connections handed to
    // it). Each open call may hold a request of up to `limit` bytes, so
    // the streams of a connection are bounded (tonic's default is none).
    let served = tonic::transport::Server::builder()
        .accept_http1(true)
        .max_concurrent_streams(max_streams)
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await;
    if let Err(e) = served {
        tracing::error!(?addr, error = %e, "the gRPC front door stopped");
    }
}

/// The client id RocketMQ clients send with every call.
fn client_id<T>(request: &Request<T>) -> Option<String> {
    request
        .metadata()
        .get("x-mq-client-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

fn unimplemented(rpc: &str) -> Status {
    Status::unimplemented(format!(
        "txmq does not serve {rpc} (see the README's RocketMQ section for what it serves)"
    ))
}

type Answer<T> = Result<Response<T>, Status>;
type Stream<T> = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl MessagingService for Front {
    async fn query_route(
        &self,
        r: Request<pb::QueryRouteRequest>,
    ) -> Answer<pb::QueryRouteResponse> {
        let user = self.caller(&r)?;
        // A topic is created on first use for a user who may send to it,
        // as a send on txmq's own port creates it (others find none).
        let topic = r.get_ref().topic.as_ref().map_or("", |t| t.name.as_str());
        let may_create = self.b.security.allows_user(user.as_deref(), Op::Pub(topic));
        Ok(Response::new(
            route::query_route(&self.b, r.into_inner(), may_create).await,
        ))
    }

    async fn heartbeat(&self, r: Request<pb::HeartbeatRequest>) -> Answer<pb::HeartbeatResponse> {
        let user = self.caller(&r)?;
        if let Some(group) = r.get_ref().group.as_ref().filter(|g| !g.name.is_empty()) {
            self.allow(user.as_deref(), Op::Group(&group.name))?;
        }
        let client = client_id(&r);
        Ok(Response::new(route::heartbeat(
            &self.b,
            client,
            r.into_inner(),
        )))
    }

    async fn send_message(
        &self,
        r: Request<pb::SendMessageRequest>,
    ) -> Answer<pb::SendMessageResponse> {
        let user = self.caller(&r)?;
        for m in &r.get_ref().messages {
            let topic = m.topic.as_ref().map_or("", |t| t.name.as_str());
            self.allow(user.as_deref(), Op::Pub(topic))?;
            // A transactional send prepares under its topic as the group.
            let kind = m.system_properties.as_ref().map(|p| p.message_type);
            if kind == Some(pb::MessageType::Transaction as i32) {
                self.allow(user.as_deref(), Op::Tx(topic))?;
            }
        }
        Ok(Response::new(send::send(self, r.into_inner()).await))
    }

    async fn query_assignment(
        &self,
        r: Request<pb::QueryAssignmentRequest>,
    ) -> Answer<pb::QueryAssignmentResponse> {
        let user = self.caller(&r)?;
        let (topic, group) = (&r.get_ref().topic, &r.get_ref().group);
        self.allow_read(user.as_deref(), topic, Some(group))?;
        Ok(Response::new(route::query_assignment(
            &self.b,
            r.into_inner(),
        )))
    }

    type ReceiveMessageStream = Stream<pb::ReceiveMessageResponse>;

    async fn receive_message(
        &self,
        r: Request<pb::ReceiveMessageRequest>,
    ) -> Answer<Self::ReceiveMessageStream> {
        let user = self.caller(&r)?;
        let topic = r.get_ref().message_queue.as_ref().map(|q| &q.topic);
        let topic = topic.unwrap_or(&None);
        self.allow_read(user.as_deref(), topic, Some(&r.get_ref().group))?;
        let answers = consume::receive(self, r.into_inner()).await;
        Ok(Response::new(Box::pin(tokio_stream::iter(
            answers.into_iter().map(Ok),
        ))))
    }

    async fn ack_message(
        &self,
        r: Request<pb::AckMessageRequest>,
    ) -> Answer<pb::AckMessageResponse> {
        let user = self.caller(&r)?;
        let (topic, group) = (&r.get_ref().topic, &r.get_ref().group);
        self.allow_read(user.as_deref(), topic, Some(group))?;
        Ok(Response::new(consume::ack(self, r.into_inner()).await))
    }

    async fn forward_message_to_dead_letter_queue(
        &self,
        r: Request<pb::ForwardMessageToDeadLetterQueueRequest>,
    ) -> Answer<pb::ForwardMessageToDeadLetterQueueResponse> {
        let user = self.caller(&r)?;
        let (topic, group) = (&r.get_ref().topic, &r.get_ref().group);
        self.allow_read(user.as_deref(), topic, Some(group))?;
        Ok(Response::new(
            consume::forward_to_dead_letters(self, r.into_inner()).await,
        ))
    }

    type PullMessageStream = Stream<pb::PullMessageResponse>;

    async fn pull_message(
        &self,
        _r: Request<pb::PullMessageRequest>,
    ) -> Answer<Self::PullMessageStream> {
        Err(unimplemented("PullMessage"))
    }

    async fn update_offset(
        &self,
        _r: Request<pb::UpdateOffsetRequest>,
    ) -> Answer<pb::UpdateOffsetResponse> {
        Err(unimplemented("UpdateOffset"))
    }

    async fn get_offset(&self, _r: Request<pb::GetOffsetRequest>) -> Answer<pb::GetOffsetResponse> {
        Err(unimplemented("GetOffset"))
    }

    async fn query_offset(
        &self,
        _r: Request<pb::QueryOffsetRequest>,
    ) -> Answer<pb::QueryOffsetResponse> {
        Err(unimplemented("QueryOffset"))
    }

    async fn end_transaction(
        &self,
        r: Request<pb::EndTransactionRequest>,
    ) -> Answer<pb::EndTransactionResponse> {
        let user = self.caller(&r)?;
        self.allow_end(user.as_deref(), r.get_ref())?;
        let client = client_id(&r);
        Ok(Response::new(
            send::end_transaction(self, client, r.into_inner()).await,
        ))
    }

    type TelemetryStream = Stream<pb::TelemetryCommand>;

    async fn telemetry(
        &self,
        r: Request<tonic::Streaming<pb::TelemetryCommand>>,
    ) -> Answer<Self::TelemetryStream> {
        let user = self.caller(&r)?;
        telemetry::open(self, r, user).map(Response::new)
    }

    async fn notify_client_termination(
        &self,
        r: Request<pb::NotifyClientTerminationRequest>,
    ) -> Answer<pb::NotifyClientTerminationResponse> {
        let user = self.caller(&r)?;
        if let Some(client) = client_id(&r) {
            self.sessions.terminated(&self.b, &client, user.as_deref());
        }
        Ok(Response::new(pb::NotifyClientTerminationResponse {
            status: Some(status::ok()),
        }))
    }

    async fn change_invisible_duration(
        &self,
        r: Request<pb::ChangeInvisibleDurationRequest>,
    ) -> Answer<pb::ChangeInvisibleDurationResponse> {
        let user = self.caller(&r)?;
        let (topic, group) = (&r.get_ref().topic, &r.get_ref().group);
        self.allow_read(user.as_deref(), topic, Some(group))?;
        Ok(Response::new(
            consume::change_invisible(self, r.into_inner()).await,
        ))
    }

    async fn recall_message(
        &self,
        _r: Request<pb::RecallMessageRequest>,
    ) -> Answer<pb::RecallMessageResponse> {
        Err(unimplemented("RecallMessage"))
    }

    async fn sync_lite_subscription(
        &self,
        _r: Request<pb::SyncLiteSubscriptionRequest>,
    ) -> Answer<pb::SyncLiteSubscriptionResponse> {
        Err(unimplemented("SyncLiteSubscription"))
    }
}
