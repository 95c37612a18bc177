//! Routes, assignments and heartbeats.
//!
//! A front door serves its own broker's queues. The endpoints in a route
//! are the ones the client reached it by (as RocketMQ's proxy in cluster
//! mode answers), so a client behind any address keeps using it.

use txmq_protocol::{validate_topic_name, PERM_READ, PERM_WRITE};

use super::{pb, status};
use crate::handler::front;
use crate::BrokerInner;

fn resource(name: &str) -> pb::Resource {
    pb::Resource {
        resource_namespace: String::new(),
        name: name.to_string(),
    }
}

fn permission(perm: u8) -> pb::Permission {
    match (perm & PERM_READ != 0, perm & PERM_WRITE != 0) {
        (true, true) => pb::Permission::ReadWrite,
        (true, false) => pb::Permission::Read,
        (false, true) => pb::Permission::Write,
        (false, false) => pb::Permission::None,
    }
}

/// The topic's queues on this broker, reached at `endpoints`.
fn queues(
    b: &BrokerInner,
    config: &txmq_protocol::TopicConfig,
    endpoints: Option<pb::Endpoints>,
) -> Vec<pb::MessageQueue> {
    let broker = pb::Broker {
        name: b.config.broker_name.clone(),
        id: 0,
        endpoints,
    };
    let types = [
        pb::MessageType::Normal,
        pb::MessageType::Fifo,
        pb::MessageType::Delay,
        pb::MessageType::Transaction,
    ]
    .map(|t| t as i32)
    .to_vec();
    (0..config.queues)
        .map(|id| pb::MessageQueue {
            topic: Some(resource(&config.name)),
            id: id as i32,
            permission: permission(config.perm) as i32,
            broker: Some(broker.clone()),
            accept_message_types: types.clone(),
        })
        .collect()
}

/// The route of the topic `r` names; a topic not there yet is created
/// first when the broker creates topics on first use and `may_create`.
pub(super) async fn query_route(
    b: &BrokerInner,
    r: pb::QueryRouteRequest,
    may_create: bool,
) -> pb::QueryRouteResponse {
    let name = r.topic.map(|t| t.name).unwrap_or_default();
    let answer = |status, message_queues| pb::QueryRouteResponse {
        status: Some(status),
        message_queues,
    };
    if let Err(e) = validate_topic_name(&name) {
        return answer(status::new(pb::Code::IllegalTopic, e), Vec::new());
    }
    let found = match b.topics.get(&name) {
        Some(config) => Ok(config),
        None if may_create => front::topic(b, &name).await,
        None => Err(crate::handler::unknown_topic(b, &name)),
    };
    match found {
        Ok(config) => {
            let queues = queues(b, &config, r.endpoints);
            answer(status::ok(), queues)
        }
        Err(e) => answer(status::from_wire(&e), Vec::new()),
    }
}

pub(super) fn heartbeat(
    b: &BrokerInner,
    client: Option<String>,
    r: pb::HeartbeatRequest,
) -> pb::HeartbeatResponse {
    if client.is_none() {
        return pb::HeartbeatResponse {
            status: Some(status::new(
                pb::Code::ClientIdRequired,
                "a heartbeat needs the x-mq-client-id header",
            )),
        };
    }
    tracing::trace!(broker = %b.config.broker_name, ?client, group = ?r.group.map(|g| g.name), "heartbeat");
    pb::HeartbeatResponse {
        status: Some(status::ok()),
    }
}

/// Every member of a group receives from every queue (the pop model), so
/// a push consumer is assigned the topic on this broker as one queue.
pub(super) fn query_assignment(
    b: &BrokerInner,
    r: pb::QueryAssignmentRequest,
) -> pb::QueryAssignmentResponse {
    let name = r.topic.map(|t| t.name).unwrap_or_default();
    let Some(config) = b.topics.get(&name) else {
        return pb::QueryAssignmentResponse {
            status: Some(status::from_wire(&crate::handler::unknown_topic(b, &name))),
            assignments: Vec::new(),
        };
    };
    let assignments = if config.perm & PERM_READ == 0 {
        Vec::new()
    } else {
        let mut queue = queues(b, &config, r.endpoints)
            .into_iter()
            .next()
            .expect("a topic has at least one queue");
        queue.id = -1;
        vec![pb::Assignment {
            message_queue: Some(queue),
        }]
    };
    pb::QueryAssignmentResponse {
        status: Some(status::ok()),
        assignments,
    }
}
