//! Failover mode of the chaos harness ([`ChaosConfig::failover`](super::ChaosConfig)):
//! the controller embedded in the nameservers, and how the harness finds
//! what it decided (the master of each broker group, the Raft leader).
//!
//! Every controller member is known to everyone (its peers and the
//! brokers) by the address of a [`Proxy`] in front of its
//! `--controller-listen` port, so that the harness can cut one broker off
//! the controller ([`Proxy::black_hole`] on the broker's client id) while
//! the Raft traffic between the members still flows.

use std::time::{Duration, Instant};

use txmq_protocol::{BrokerGroupState, ControllerInfo, GetControllerInfo, Hello, Role};
use txmq_remoting::{Connection, ConnectionConfig};

use crate::proxy::Proxy;

/// The controller's `--master-expiry`: short, so a partitioned master
/// loses its group within the fault.
pub const MASTER_EXPIRY: &str = "2s";

/// The arguments that make nameserver `index` (of `proxies.len()`) a
/// controller member: id `index + 1`, listening on `listen`, its data in
/// `data_dir`, every member known by its proxy's address.
pub fn controller_args(
    index: usize,
    listen: &str,
    proxies: &[String],
    data_dir: &std::path::Path,
) -> Vec<String> {
    let peers: Vec<String> = proxies
        .iter()
        .enumerate()
        .map(|(i, p)| format!("{}={p}", i + 1))
        .collect();
    vec![
        "--controller-id".into(),
        (index + 1).to_string(),
        "--controller-listen".into(),
        listen.to_string(),
        "--controller-peers".into(),
        peers.join(","),
        "--controller-data-dir".into(),
        data_dir.display().to_string(),
        "--master-expiry".into(),
        MASTER_EXPIRY.into(),
    ]
}

/// What the controller's members say, put together: the leader of the
/// highest term any member knows, and each group's latest state.
#[derive(Debug, Clone, Default)]
pub struct ControllerView {
    /// The Raft leader's member id and the term it leads, when known.
    pub leader: Option<(u64, u64)>,
    /// Every group's state, the newest any member holds.
    pub groups: Vec<BrokerGroupState>,
    /// How many members answered.
    pub answered: usize,
}

impl ControllerView {
    /// The state of group `name`.
    pub fn group(&self, name: &str) -> Option<&BrokerGroupState> {
        self.groups.iter().find(|g| g.broker_name == name)
    }

    /// The master of group `name` and its epoch.
    pub fn master(&self, name: &str) -> Option<(String, u64)> {
        self.group(name)
            .and_then(|g| g.master.clone().map(|m| (m, g.epoch)))
    }
}

/// Asks every nameserver of `ns_addrs` for its controller member's view
/// (`GetControllerInfo`, 1 s each) and merges the answers: the newest state
/// of each group (highest epoch, then version) and the leader of the
/// highest term. Members that do not answer are skipped.
pub async fn view(ns_addrs: &[String]) -> ControllerView {
    let answers = futures_util::future::join_all(ns_addrs.iter().map(|a| ask(a.as_str()))).await;
    let mut v = ControllerView::default();
    let mut leader_term = 0;
    for info in answers.into_iter().flatten() {
        v.answered += 1;
        if let Some(id) = info.leader_id {
            if v.leader.is_none() || info.term > leader_term {
                v.leader = Some((id, info.term));
                leader_term = info.term;
            }
        }
        for g in info.groups {
            match v.groups.iter_mut().find(|h| h.broker_name == g.broker_name) {
                Some(h) if (g.epoch, g.version) > (h.epoch, h.version) => *h = g,
                Some(_) => {}
                None => v.groups.push(g),
            }
        }
    }
    v
}

async fn ask(addr: &str) -> Option<ControllerInfo> {
    let hello = Hello {
        version: txmq_protocol::PROTOCOL_VERSION,
        role: Role::Admin,
        client_id: "chaos-harness".into(),
        group: None,
    };
    let config = ConnectionConfig {
        request_timeout: Duration::from_secs(1),
        ..Default::default()
    };
    let conn = tokio::time::timeout(
        Duration::from_secs(1),
        Connection::connect(addr, hello, None, config),
    )
    .await
    .ok()?
    .ok()?;
    let info = conn.call(GetControllerInfo {}).await.ok();
    conn.close();
    info
}

/// Polls the controller until `check` accepts its view, or `limit` passed;
/// returns the last view and whether it was accepted.
pub async fn wait_for(
    ns_addrs: &[String],
    limit: Duration,
    mut check: impl FnMut(&ControllerView) -> bool,
) -> (ControllerView, bool) {
    let deadline = Instant::now() + limit;
    loop {
        let v = view(ns_addrs).await;
        if check(&v) {
            return (v, true);
        }
        if Instant::now() > deadline {
            return (v, false);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Cuts the broker whose client id is `broker_name@addr` off every
/// controller member: its connections through `controller_proxies` pass
/// nothing, both ways, and stay open (its heartbeats go unanswered, and the
/// controller stops hearing it).
pub fn cut_from_controller(controller_proxies: &[Proxy], broker_name: &str, addr: &str) {
    for p in controller_proxies {
        p.black_hole(&format!("{broker_name}@{addr}"));
    }
}

/// The median (of an even count, the mean of the middle two) and the
/// maximum of `values`.
pub fn median_max(values: &[u64]) -> Option<(u64, u64)> {
    let mut v = values.to_vec();
    v.sort_unstable();
    let max = *v.last()?;
    let n = v.len();
    Some(((v[(n - 1) / 2] + v[n / 2]) / 2, max))
}

#[cfg(test)]
mod tests {
    #[test]
    fn median_and_max() {
        assert_eq!(super::median_max(&[]), None);
        assert_eq!(super::median_max(&[5]), Some((5, 5)));
        assert_eq!(super::median_max(&[900, 100]), Some((500, 900)));
        assert_eq!(super::median_max(&[3, 1, 2]), Some((2, 3)));
    }
}
