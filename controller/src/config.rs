//! How a controller member is set up.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use crate::Error;

/// The default `--master-expiry`.
pub const DEFAULT_MASTER_EXPIRY: Duration = Duration::from_secs(5);

/// Settings of one controller member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControllerConfig {
    /// This member's id (one of `peers`).
    pub id: u64,
    /// Address to listen on for Raft traffic, brokers and admins. Port 0
    /// picks a free port; then this member's entry in `peers` may say port
    /// 0 too and is replaced by the real address (single-member setups).
    pub listen: String,
    /// Every member: id -> controller-listen address (1, 3 or 5 members).
    pub peers: BTreeMap<u64, String>,
    /// Where the Raft log, vote and snapshot live.
    pub data_dir: PathBuf,
    /// A replica not heard from for this long is dead (default 5 s).
    pub master_expiry: Duration,
    /// Elect a replica outside the in-sync set when no in-sync one is
    /// alive (may lose acknowledged records; default off).
    pub unclean_election: bool,
    /// Raft heartbeat interval (default 100 ms).
    pub raft_heartbeat: Duration,
    /// Raft election timeout, lower bound (default 500 ms; the upper bound is twice it).
    pub raft_election_timeout: Duration,
    /// How long a planned switch waits for the master to drain before it
    /// elects the target anyway (default 10 s).
    pub drain_timeout: Duration,
    /// Build a snapshot every this many log entries (default 1000).
    pub snapshot_every: u64,
}

impl ControllerConfig {
    /// A member with the default timings.
    pub fn new(
        id: u64,
        listen: impl Into<String>,
        peers: BTreeMap<u64, String>,
        data_dir: impl Into<PathBuf>,
    ) -> ControllerConfig {
        ControllerConfig {
            id,
            listen: listen.into(),
            peers,
            data_dir: data_dir.into(),
            master_expiry: DEFAULT_MASTER_EXPIRY,
            unclean_election: false,
            raft_heartbeat: Duration::from_millis(100),
            raft_election_timeout: Duration::from_millis(500),
            drain_timeout: Duration::from_secs(10),
            snapshot_every: 1000,
        }
    }

    /// Settings that work but are likely mistakes, each as a sentence:
    /// a listen address that is not the member's own address in the peer
    /// list (where the others and the brokers dial it; a proxy or a NAT in
    /// between makes them differ on purpose), and a member count without
    /// a majority's benefit (2 or 4 members survive no more failures than
    /// 1 or 3).
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(own) = self.peers.get(&self.id) {
            let port = |a: &str| a.rsplit_once(':').map(|(_, p)| p.to_string());
            let host = |a: &str| a.rsplit_once(':').map(|(h, _)| h.to_string());
            let any_host =
                host(&self.listen).is_some_and(|h| matches!(h.as_str(), "0.0.0.0" | "[::]" | "::"));
            let differs = if any_host {
                port(&self.listen) != port(own)
            } else {
                self.listen != *own
            };
            if differs {
                out.push(format!(
                    "--controller-listen {} is not member {}'s address in --controller-peers ({own}), where the other members and the brokers reach it; fine behind a proxy or a NAT, else a mistake",
                    self.listen, self.id
                ));
            }
        }
        if matches!(self.peers.len(), 2 | 4) {
            out.push(format!(
                "{} controller members survive no more failures than {}: use 1, 3 or 5",
                self.peers.len(),
                self.peers.len() - 1
            ));
        }
        out
    }

    /// Checks the settings.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming the problem.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |m: String| Err(Error::InvalidConfig(m));
        if self.peers.is_empty() {
            return bad("--controller-peers names no member".into());
        }
        if !self.peers.contains_key(&self.id) {
            return bad(format!(
                "--controller-id {} is not one of --controller-peers ({})",
                self.id,
                self.peers
                    .keys()
                    .map(u64::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        if self.master_expiry.is_zero() {
            return bad("--master-expiry must be greater than zero".into());
        }
        if self.raft_heartbeat.is_zero() || self.raft_election_timeout <= self.raft_heartbeat {
            return bad("the Raft election timeout must be longer than its heartbeat".into());
        }
        if self.snapshot_every == 0 {
            return bad("snapshot interval must be greater than zero".into());
        }
        Ok(())
    }
}

/// Parses `--controller-peers`: `ID=HOST:PORT,ID=HOST:PORT,...`.
///
/// # Errors
/// A message naming the malformed or repeated item.
pub fn parse_peers(s: &str) -> Result<BTreeMap<u64, String>, String> {
    let mut peers = BTreeMap::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (id, addr) = item
            .split_once('=')
            .ok_or_else(|| format!("'{item}' is not ID=HOST:PORT"))?;
        let id: u64 = id
            .trim()
            .parse()
            .map_err(|_| format!("'{id}' in '{item}' is not a member id (a number)"))?;
        let addr = addr.trim();
        if txmq_remoting::check_host_port(addr, false).is_err() {
            return Err(format!("'{addr}' in '{item}' is not HOST:PORT"));
        }
        if peers.insert(id, addr.to_string()).is_some() {
            return Err(format!("member id {id} is given twice"));
        }
    }
    if peers.is_empty() {
        return Err("no members given".into());
    }
    Ok(peers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listen_address_other_than_the_peer_entry_and_two_or_four_members_are_warned_of() {
        let peers = parse_peers("1=127.0.0.1:9878,2=127.0.0.1:9879,3=127.0.0.1:9880").unwrap();
        let c = |listen: &str, peers: &BTreeMap<u64, String>| {
            ControllerConfig::new(1, listen, peers.clone(), PathBuf::from("d")).warnings()
        };
        assert!(c("127.0.0.1:9878", &peers).is_empty());
        assert!(c("0.0.0.0:9878", &peers).is_empty());
        let w = c("127.0.0.1:9875", &peers);
        assert!(
            w.len() == 1 && w[0].contains("--controller-listen 127.0.0.1:9875"),
            "{w:?}"
        );
        assert_eq!(c("0.0.0.0:9875", &peers).len(), 1);
        let two = parse_peers("1=127.0.0.1:9878,2=127.0.0.1:9879").unwrap();
        let w = c("127.0.0.1:9878", &two);
        assert!(w.len() == 1 && w[0].contains("use 1, 3 or 5"), "{w:?}");
    }

    #[test]
    fn peers_parse_and_bad_ones_are_named() {
        let p = parse_peers("1=127.0.0.1:9878, 2=127.0.0.1:9879,3=h:1").unwrap();
        assert_eq!(p.len(), 3);
        assert_eq!(p[&2], "127.0.0.1:9879");
        assert!(parse_peers("1=a:1,1=b:2").unwrap_err().contains("twice"));
        assert!(parse_peers("x=a:1").unwrap_err().contains("'x'"));
        assert!(parse_peers("1=nohost").unwrap_err().contains("HOST:PORT"));
        assert!(parse_peers("").is_err());
    }

    #[test]
    fn the_id_must_be_a_member() {
        let c = ControllerConfig::new(4, "127.0.0.1:0", parse_peers("1=a:1").unwrap(), "/tmp/x");
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("--controller-id 4"), "{e}");
    }
}
