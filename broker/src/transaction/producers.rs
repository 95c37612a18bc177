//! Live transactional producers, by producer group: where check-backs go,
//! round robin. A producer is a txmq connection, or a RocketMQ 5 client's
//! telemetry stream (`crate::grpc`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use txmq_remoting::Connection;

/// A producer that can answer check-backs.
#[derive(Clone)]
pub(crate) enum Producer {
    /// A txmq transactional producer's connection.
    Conn(Connection),
    /// A RocketMQ 5 client publishing the group's topic.
    Grpc(Arc<crate::grpc::Session>),
}

impl Producer {
    fn is_closed(&self) -> bool {
        match self {
            Producer::Conn(c) => c.is_closed(),
            Producer::Grpc(s) => s.is_closed(),
        }
    }
}

/// Producer group -> its live producers.
#[derive(Default)]
pub(crate) struct ProducerGroups {
    groups: Mutex<HashMap<String, Vec<Producer>>>,
    next: AtomicUsize,
}

impl ProducerGroups {
    /// Adds a producer; returns true when it is the group's only one.
    pub(crate) fn add(&self, group: &str, producer: Producer) -> bool {
        let mut groups = self.groups.lock().unwrap_or_else(|e| e.into_inner());
        let list = groups.entry(group.to_string()).or_default();
        list.retain(|p| !p.is_closed());
        list.push(producer);
        list.len() == 1
    }

    /// Removes a closed connection.
    pub(crate) fn remove(&self, group: &str, conn_id: u64) {
        self.remove_where(
            group,
            |p| matches!(p, Producer::Conn(c) if c.id() == conn_id),
        );
    }

    /// Removes a closed telemetry stream.
    pub(crate) fn remove_session(&self, group: &str, session_id: u64) {
        self.remove_where(
            group,
            |p| matches!(p, Producer::Grpc(s) if s.id() == session_id),
        );
    }

    fn remove_where(&self, group: &str, gone: impl Fn(&Producer) -> bool) {
        let mut groups = self.groups.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(list) = groups.get_mut(group) {
            list.retain(|p| !gone(p) && !p.is_closed());
            if list.is_empty() {
                groups.remove(group);
            }
        }
    }

    /// The next live producer of `group` that `eligible` accepts, round robin.
    pub(crate) fn pick(
        &self,
        group: &str,
        eligible: impl Fn(&Producer) -> bool,
    ) -> Option<Producer> {
        let groups = self.groups.lock().unwrap_or_else(|e| e.into_inner());
        let live: Vec<&Producer> = groups
            .get(group)?
            .iter()
            .filter(|p| !p.is_closed() && eligible(p))
            .collect();
        if live.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % live.len();
        Some(live[i].clone())
    }
}
