//! One controller member: its Raft node, its listener, and what every
//! request handler needs (leadership checks, proposals, group views).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use openraft::error::{ClientWriteError, InitializeError, RaftError};
use openraft::{BasicNode, ServerState};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use txmq_protocol::{BrokerGroupState, ControllerInfo, ElectMaster, ErrorCode, WireError};
use txmq_remoting::ConnectionConfig;

use crate::config::ControllerConfig;
use crate::liveness::Liveness;
use crate::log_store::LogStore;
use crate::network::{Network, Peers};
use crate::security::ClusterSecurity;
use crate::state::{Command, GroupRecord};
use crate::state_machine::{Shared, StateMachineStore};
use crate::types::{Outcome, Raft};
use crate::Error;

/// How long a request waits for Raft to commit (or for a leader) before
/// it is answered `CONTROLLER_UNAVAILABLE`.
pub(crate) const COMMIT_WAIT: Duration = Duration::from_secs(3);

/// A bound controller member, ready to [`run`](Controller::run).
pub struct Controller {
    inner: Arc<Inner>,
    listener: TcpListener,
    security: ClusterSecurity,
}

/// A cheap handle for the embedding process (the nameserver) to ask the
/// controller what an admin asked it.
#[derive(Clone)]
pub struct ControllerHandle {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) id: u64,
    pub(crate) config: ControllerConfig,
    pub(crate) local_addr: SocketAddr,
    /// Every member's controller address (this one's real one included).
    pub(crate) members: BTreeMap<u64, String>,
    pub(crate) raft: Raft,
    pub(crate) shared: Arc<Shared>,
    pub(crate) peers: Arc<Peers>,
    pub(crate) live: Mutex<Liveness>,
    /// Wakes the election task (a master's connection closed, a replica
    /// appeared, a drain finished).
    pub(crate) wake: Notify,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("id", &self.inner.id)
            .field("addr", &self.inner.local_addr)
            .finish()
    }
}

impl std::fmt::Debug for ControllerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControllerHandle")
            .field("id", &self.inner.id)
            .finish()
    }
}

impl Controller {
    /// Checks `config`, binds the listener, recovers the Raft log, vote and
    /// snapshot from the data directory and starts the Raft node; on a
    /// fresh data directory it initializes the Raft group with every peer.
    /// Plaintext and unauthenticated; see [`Controller::bind_with`].
    ///
    /// # Errors
    /// [`Error::InvalidConfig`], [`Error::Bind`], [`Error::Storage`], [`Error::Raft`].
    pub async fn bind(config: ControllerConfig) -> Result<Controller, Error> {
        Controller::bind_with(config, ClusterSecurity::default()).await
    }

    /// [`Controller::bind`] with `security`: its listener serves TLS and
    /// checks every request against the ACL file, and its connections to
    /// the other members use TLS and sign in with the credentials. The ACL
    /// file is not watched here: the embedding process watches it once for
    /// all its listeners ([`ServerSecurity::watch`](txmq_remoting::ServerSecurity::watch)).
    ///
    /// # Errors
    /// As [`Controller::bind`].
    pub async fn bind_with(
        config: ControllerConfig,
        security: ClusterSecurity,
    ) -> Result<Controller, Error> {
        config.validate()?;
        let bind_err = |source| Error::Bind {
            addr: config.listen.clone(),
            source,
        };
        let listener = TcpListener::bind(&config.listen).await.map_err(bind_err)?;
        let local_addr = listener.local_addr().map_err(bind_err)?;
        let mut members = config.peers.clone();
        if let Some(own) = members.get_mut(&config.id) {
            if own.ends_with(":0") {
                *own = local_addr.to_string();
            }
        }
        let storage_err = |source| Error::Storage {
            dir: config.data_dir.display().to_string(),
            source,
        };
        let log = LogStore::open(&config.data_dir).map_err(storage_err)?;
        let (sm, shared) = StateMachineStore::open(&config.data_dir).map_err(storage_err)?;
        let timeout = config.raft_election_timeout.as_millis() as u64;
        let raft_config = openraft::Config {
            cluster_name: "txmq-controller".into(),
            heartbeat_interval: config.raft_heartbeat.as_millis() as u64,
            election_timeout_min: timeout,
            election_timeout_max: timeout * 2,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(config.snapshot_every),
            max_in_snapshot_log_to_keep: config.snapshot_every,
            ..openraft::Config::default()
        }
        .validate()
        .map_err(|e| Error::Raft(e.to_string()))?;
        let peers = Arc::new(Peers::new(config.id, &security));
        let raft = Raft::new(
            config.id,
            Arc::new(raft_config),
            Network {
                peers: peers.clone(),
            },
            log,
            sm,
        )
        .await
        .map_err(|e| Error::Raft(e.to_string()))?;
        let initialized = raft
            .is_initialized()
            .await
            .map_err(|e| Error::Raft(e.to_string()))?;
        if !initialized {
            let nodes: BTreeMap<u64, BasicNode> = members
                .iter()
                .map(|(id, addr)| (*id, BasicNode::new(addr)))
                .collect();
            // Every member does this on its first start; whoever is not
            // first is told it is not allowed, which is fine.
            match raft.initialize(nodes).await {
                Ok(()) => {
                    info!(id = config.id, members = ?members, "controller Raft group initialized")
                }
                Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {}
                Err(e) => return Err(Error::Raft(e.to_string())),
            }
        }
        Ok(Controller {
            inner: Arc::new(Inner {
                id: config.id,
                local_addr,
                members,
                raft,
                shared,
                peers,
                live: Mutex::new(Liveness::default()),
                wake: Notify::new(),
                config,
            }),
            listener,
            security,
        })
    }

    /// The address the controller listens on (the real port when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    /// A handle for the embedding process.
    pub fn handle(&self) -> ControllerHandle {
        ControllerHandle {
            inner: self.inner.clone(),
        }
    }

    /// Serves Raft peers, brokers and admins, and (while leader) elects
    /// masters, until `shutdown` is cancelled; then stops Raft and returns.
    pub async fn run(self, shutdown: CancellationToken) {
        let inner = self.inner;
        info!(
            id = inner.id,
            addr = %inner.local_addr,
            master_expiry = ?inner.config.master_expiry,
            unclean_election = inner.config.unclean_election,
            "controller listening"
        );
        let elections = tokio::spawn(crate::election::run(inner.clone(), shutdown.clone()));
        self.security
            .server
            .warn_if_open(&inner.local_addr, "controller");
        let service = Arc::new(crate::requests::ControllerService {
            inner: inner.clone(),
            security: self.security.clone(),
        });
        txmq_remoting::server::serve_with(
            self.listener,
            service,
            ConnectionConfig::default(),
            self.security.server,
            shutdown,
        )
        .await;
        if let Err(e) = elections.await {
            tracing::error!(error = %e, "election task failed");
        }
        inner.peers.close_all();
        if let Err(e) = inner.raft.shutdown().await {
            warn!(error = %e, "Raft did not shut down cleanly");
        }
        info!(id = inner.id, "controller stopped");
    }
}

impl ControllerHandle {
    /// A planned switch of a group's master (see `ElectMaster`); forwarded
    /// to the Raft leader when this member is not it.
    ///
    /// # Errors
    /// The wire error to answer with.
    pub async fn elect_master(&self, req: ElectMaster) -> Result<BrokerGroupState, WireError> {
        crate::requests::elect_master(&self.inner, req).await
    }

    /// This member's view of the controller.
    pub fn info(&self) -> ControllerInfo {
        self.inner.info()
    }

    /// The controller's listen address.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }
}

impl Inner {
    pub(crate) fn live(&self) -> MutexGuard<'_, Liveness> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn addr_of(&self, id: u64) -> Option<String> {
        self.members.get(&id).cloned()
    }

    fn not_leader(&self, leader: Option<u64>) -> WireError {
        WireError::new(
            ErrorCode::NotControllerLeader,
            leader.and_then(|l| self.addr_of(l)).unwrap_or_default(),
        )
    }

    /// The term, when this member is the Raft leader and has applied every
    /// entry of earlier terms (so its state is current).
    pub(crate) fn leading_term(&self) -> Option<u64> {
        let m = self.raft.metrics();
        let m = m.borrow();
        let ready = m.state == ServerState::Leader
            && m.current_leader == Some(self.id)
            && m.last_applied.map(|l| l.leader_id.term) == Some(m.current_term);
        ready.then_some(m.current_term)
    }

    /// Waits (up to [`COMMIT_WAIT`]) until this member leads, and returns
    /// the term; a member that knows another leader answers at once with
    /// `NOT_CONTROLLER_LEADER` naming it.
    pub(crate) async fn leader_ready(&self) -> Result<u64, WireError> {
        let deadline = Instant::now() + COMMIT_WAIT;
        let mut rx = self.raft.metrics();
        loop {
            if let Some(term) = self.leading_term() {
                let mut live = self.live();
                live.ensure_term(term, Instant::now());
                return Ok(term);
            }
            let leader = rx.borrow().current_leader;
            if let Some(l) = leader.filter(|l| *l != self.id) {
                return Err(self.not_leader(Some(l)));
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                _ => {
                    return Err(WireError::new(
                        ErrorCode::ControllerUnavailable,
                        "the controller has no Raft leader (no quorum of members reachable)",
                    ))
                }
            }
        }
    }

    /// The current leader's controller address, waiting up to
    /// [`COMMIT_WAIT`] for one to be known.
    pub(crate) async fn leader_addr(&self) -> Result<(u64, String), WireError> {
        let deadline = Instant::now() + COMMIT_WAIT;
        let mut rx = self.raft.metrics();
        loop {
            let leader = rx.borrow().current_leader;
            if let Some(addr) = leader.and_then(|l| self.addr_of(l).map(|a| (l, a))) {
                return Ok(addr);
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return Err(WireError::new(
                    ErrorCode::ControllerUnavailable,
                    "the controller has no Raft leader (no quorum of members reachable)",
                ));
            }
        }
    }

    /// Proposes `command` and waits until it is committed and applied.
    /// Returns what applying it did and its log index.
    ///
    /// # Errors
    /// `NOT_CONTROLLER_LEADER` when leadership moved; `CONTROLLER_UNAVAILABLE`
    /// when it cannot commit within [`COMMIT_WAIT`].
    pub(crate) async fn propose(&self, command: Command) -> Result<(Outcome, u64), WireError> {
        match tokio::time::timeout(COMMIT_WAIT, self.raft.client_write(command)).await {
            Ok(Ok(r)) => Ok((r.data, r.log_id.index)),
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
                Err(self.not_leader(f.leader_id))
            }
            Ok(Err(e)) => Err(WireError::new(
                ErrorCode::ControllerUnavailable,
                format!("the controller cannot commit: {e}"),
            )),
            Err(_) => Err(WireError::new(
                ErrorCode::ControllerUnavailable,
                format!(
                    "the controller could not commit within {COMMIT_WAIT:?} (no quorum of members reachable?)"
                ),
            )),
        }
    }

    /// A group's record, if the group is known.
    pub(crate) fn group(&self, name: &str) -> Option<GroupRecord> {
        self.shared.lock().state.groups.get(name).cloned()
    }

    /// A group as brokers and admins see it (liveness from this member's table).
    pub(crate) fn group_state(&self, name: &str, g: &GroupRecord) -> BrokerGroupState {
        let now = Instant::now();
        let expiry = self.config.master_expiry;
        let leading = self.leading_term().is_some();
        let replicas = if leading {
            self.live().replicas(name, g, now, expiry)
        } else {
            // Only the leader hears heartbeats.
            Liveness::default().replicas(name, g, now, expiry)
        };
        BrokerGroupState {
            broker_name: name.to_string(),
            master: g.master.clone(),
            epoch: g.epoch,
            in_sync: g.in_sync.iter().cloned().collect(),
            replicas,
            version: g.version,
            draining: g.draining.clone(),
            master_expiry_ms: expiry.as_millis() as u64,
        }
    }

    pub(crate) fn info(&self) -> ControllerInfo {
        let (leader, term) = {
            let m = self.raft.metrics();
            let m = m.borrow();
            (m.current_leader, m.current_term)
        };
        let groups: Vec<(String, GroupRecord)> = self
            .shared
            .lock()
            .state
            .groups
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        ControllerInfo {
            id: self.id,
            leader_id: leader,
            leader_addr: leader.and_then(|l| self.addr_of(l)),
            term,
            members: self.members.iter().map(|(k, v)| (*k, v.clone())).collect(),
            groups: groups
                .iter()
                .map(|(name, g)| self.group_state(name, g))
                .collect(),
        }
    }
}

/// The wire error for a refused command.
pub(crate) fn refusal(outcome: Outcome, group: &str) -> Result<(), WireError> {
    match outcome {
        Outcome::Applied => Ok(()),
        Outcome::StaleEpoch { epoch, master } => Err(WireError::new(
            ErrorCode::StaleEpoch,
            format!(
                "broker group '{group}' is at epoch {epoch} with master {}",
                master.as_deref().unwrap_or("(none)")
            ),
        )),
        Outcome::Refused(why) => Err(WireError::new(ErrorCode::BadArgument, why)),
    }
}
