//! Live connections of transactional producers, by producer group: where
//! check-backs go, round robin.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use txmq_remoting::Connection;

/// Producer group -> its live connections.
#[derive(Default)]
pub(crate) struct ProducerGroups {
    groups: Mutex<HashMap<String, Vec<Connection>>>,
    next: AtomicUsize,
}

impl ProducerGroups {
    /// Adds a connection; returns true when it is the group's only one.
    pub(crate) fn add(&self, group: &str, conn: Connection) -> bool {
        let mut groups = self.groups.lock().unwrap_or_else(|e| e.into_inner());
        let list = groups.entry(group.to_string()).or_default();
        list.retain(|c| !c.is_closed());
        list.push(conn);
        list.len() == 1
    }

    /// Removes a closed connection.
    pub(crate) fn remove(&self, group: &str, conn_id: u64) {
        let mut groups = self.groups.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(list) = groups.get_mut(group) {
            list.retain(|c| c.id() != conn_id && !c.is_closed());
            if list.is_empty() {
                groups.remove(group);
            }
        }
    }

    /// The next live connection of `group` that `eligible` accepts, round robin.
    pub(crate) fn pick(
        &self,
        group: &str,
        eligible: impl Fn(&Connection) -> bool,
    ) -> Option<Connection> {
        let groups = self.groups.lock().unwrap_or_else(|e| e.into_inner());
        let live: Vec<&Connection> = groups
            .get(group)?
            .iter()
            .filter(|c| !c.is_closed() && eligible(c))
            .collect();
        if live.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % live.len();
        Some(live[i].clone())
    }
}
