//! A broker under a controller (`--controller`): it heartbeats the
//! controller's Raft leader, and the controller decides its role.
//!
//! [`Control`] lives as long as the process: the heartbeat loop, the latest
//! group state the controller sent, the epoch file and the lease. The
//! broker's serving part (store, tables, tasks) is an *incarnation*: one
//! role at one epoch. A change of role (a slave elected master, a master
//! replaced) or a cut of the log (a replica whose history diverged from the
//! new master's) ends the incarnation and starts the next one from the data
//! directory, so that every role starts from the same recovery and every
//! derived structure is rebuilt from the log as it now is
//! ([`crate::Broker`] runs the loop).
//!
//! Safety rests on three rules: a broker becomes master only at an epoch
//! its epoch file has not seen (a restarted master waits to be elected
//! again); a master takes writes only while the controller answered it
//! within a master expiry (the lease, counted from when the heartbeat was
//! sent, so it ends before the controller's expiry does); and a slave
//! truncates to where its history and its new master's agree before it
//! copies anything.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{mpsc, watch, Notify};
use tokio_util::sync::CancellationToken;
use txmq_protocol::{
    now_millis, AlterInSync, BrokerGroupState, ControllerHeartbeat, ErrorCode, MasterDrained, Role,
    WireError,
};
use txmq_remoting::{Connection, ConnectionConfig};

use super::epochs::Epochs;
use crate::config::BrokerConfig;

/// How long to wait for a controller member that does not answer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Pause before the next member after a failure.
const RETRY: Duration = Duration::from_millis(100);

/// What an incarnation tells the loop that runs incarnations.
#[derive(Debug)]
pub(crate) enum Event {
    /// Cut the log at `to`: the new master's history of epoch `epoch` ends
    /// there (a slave found it while starting to copy).
    Truncate {
        /// Where.
        to: u64,
        /// The last epoch both histories share.
        epoch: u64,
    },
}

/// A broker's link to the controller, across incarnations.
pub(crate) struct Control {
    /// The broker's address: its identity in the group.
    pub(crate) addr: String,
    broker_name: String,
    cluster: String,
    controllers: Vec<String>,
    wait: Duration,
    /// The latest group state the controller sent.
    pub(crate) state: watch::Sender<Option<BrokerGroupState>>,
    /// The epoch this broker is master of now (0: none): what heartbeats say.
    pub(crate) master_epoch: AtomicU64,
    /// The log end heartbeats report.
    pub(crate) log_end: AtomicU64,
    /// When (ms) the last heartbeat the controller answered was sent.
    answered_sent_at: AtomicU64,
    /// The controller's master expiry, ms (from its answers).
    expiry_ms: AtomicU64,
    /// Wakes the heartbeat loop to send now.
    wake: Notify,
    /// The connection to the controller's leader, when there is one.
    conn: Mutex<Option<Connection>>,
    epochs: Mutex<Epochs>,
    /// Events for the incarnation loop.
    pub(crate) events: mpsc::UnboundedSender<Event>,
    /// TLS and credentials of the connection to the controller.
    security: Arc<crate::security::Security>,
}

impl Control {
    /// A link for `config`'s broker, with the epoch history of its data dir.
    pub(crate) fn new(
        config: &BrokerConfig,
        addr: String,
        epochs: Epochs,
        security: &Arc<crate::security::Security>,
    ) -> (Arc<Control>, mpsc::UnboundedReceiver<Event>) {
        let (events, rx) = mpsc::unbounded_channel();
        let control = Control {
            addr,
            broker_name: config.broker_name.clone(),
            cluster: config.cluster.clone(),
            controllers: config.replication.controllers.clone(),
            wait: config.replication.controller_wait,
            state: watch::channel(None).0,
            master_epoch: AtomicU64::new(0),
            log_end: AtomicU64::new(0),
            answered_sent_at: AtomicU64::new(0),
            expiry_ms: AtomicU64::new(5000),
            wake: Notify::new(),
            conn: Mutex::new(None),
            epochs: Mutex::new(epochs),
            events,
            security: security.clone(),
        };
        (Arc::new(control), rx)
    }

    /// The epoch history.
    pub(crate) fn epochs(&self) -> MutexGuard<'_, Epochs> {
        self.epochs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a master may take writes: the controller answered a
    /// heartbeat sent less than a master expiry ago.
    pub(crate) fn lease_valid(&self) -> bool {
        let sent = self.answered_sent_at.load(Ordering::Acquire);
        now_millis() < sent.saturating_add(self.expiry_ms.load(Ordering::Acquire))
    }

    /// Something says this master was replaced: ask the controller now.
    pub(crate) fn fenced(&self) {
        self.wake.notify_one();
    }

    fn connection(&self) -> Option<Connection> {
        self.conn
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .filter(|c| !c.is_closed())
    }

    /// Asks the controller to change the group's in-sync set.
    pub(crate) async fn alter_in_sync(
        &self,
        epoch: u64,
        in_sync: Vec<String>,
    ) -> Result<BrokerGroupState, WireError> {
        let conn = self.connection().ok_or_else(no_controller)?;
        let answer = conn
            .call(AlterInSync {
                broker_name: self.broker_name.clone(),
                master: self.addr.clone(),
                epoch,
                in_sync,
            })
            .await
            .map_err(wire)?;
        self.adopt(answer.clone());
        Ok(answer)
    }

    /// Tells the controller this master drained for the planned switch.
    pub(crate) async fn drained(&self, epoch: u64) -> Result<(), WireError> {
        let conn = self.connection().ok_or_else(no_controller)?;
        let answer = conn
            .call_with_timeout(
                MasterDrained {
                    broker_name: self.broker_name.clone(),
                    master: self.addr.clone(),
                    epoch,
                },
                Duration::from_secs(15),
            )
            .await
            .map_err(wire)?;
        self.adopt(answer);
        Ok(())
    }

    /// Takes a group state the controller sent, unless it is older than
    /// the one held.
    fn adopt(&self, g: BrokerGroupState) {
        self.expiry_ms
            .store(g.master_expiry_ms.max(1), Ordering::Release);
        self.state.send_if_modified(|held| {
            let newer = held
                .as_ref()
                .is_none_or(|h| (g.epoch, g.version) >= (h.epoch, h.version) && *h != g);
            if newer {
                tracing::debug!(master = ?g.master, epoch = g.epoch, version = g.version, in_sync = ?g.in_sync, draining = ?g.draining, "the controller's view of the group");
                *held = Some(g);
            }
            newer
        });
    }

    /// Heartbeats the controller's leader until shutdown: one request
    /// always in flight, held by the controller until the group changes.
    pub(crate) async fn run(self: Arc<Self>, config: BrokerConfig, shutdown: CancellationToken) {
        let mut next = 0usize;
        let mut hint: Option<String> = None;
        let mut last_problem = String::new();
        loop {
            if shutdown.is_cancelled() {
                return;
            }
            let target = hint
                .take()
                .unwrap_or_else(|| self.controllers[next % self.controllers.len()].clone());
            let hello = crate::registration::hello_from(&config, &self.addr, Role::Broker);
            let conn_config = self.security.outgoing(ConnectionConfig {
                request_timeout: self.wait + Duration::from_secs(3),
                ..Default::default()
            });
            let connected = tokio::select! {
                c = tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(&target, hello, None, conn_config)) => c,
                _ = shutdown.cancelled() => return,
            };
            let conn = match connected {
                Ok(Ok(c)) => c,
                failed => {
                    let why = match failed {
                        Ok(Err(e)) => e.to_string(),
                        _ => "connect timed out".into(),
                    };
                    let problem = format!("controller {target}: {why}");
                    if problem != last_problem {
                        tracing::warn!(%problem, "cannot reach a controller member; trying the next");
                        last_problem = problem;
                    }
                    next += 1;
                    tokio::select! {
                        _ = tokio::time::sleep(RETRY) => {}
                        _ = shutdown.cancelled() => return,
                    }
                    continue;
                }
            };
            *self.conn.lock().unwrap_or_else(|e| e.into_inner()) = Some(conn.clone());
            let ended = self.heartbeat(&conn, &shutdown).await;
            conn.close();
            match ended {
                Ok(()) => return,
                Err(HeartbeatEnd::Leader(addr)) => {
                    tracing::debug!(from = %target, leader = ?addr, "the controller member is not the leader");
                    if addr.is_none() {
                        next += 1;
                        tokio::time::sleep(RETRY).await;
                    }
                    hint = addr;
                }
                Err(HeartbeatEnd::Failed(why)) => {
                    let problem = format!("controller {target}: {why}");
                    if problem != last_problem {
                        tracing::warn!(%problem, "lost the controller; trying the next member");
                        last_problem = problem;
                    }
                    next += 1;
                    tokio::select! {
                        _ = tokio::time::sleep(RETRY) => {}
                        _ = shutdown.cancelled() => return,
                    }
                }
            }
        }
    }

    async fn heartbeat(
        &self,
        conn: &Connection,
        shutdown: &CancellationToken,
    ) -> Result<(), HeartbeatEnd> {
        loop {
            let (known, master_epoch) = {
                let state = self.state.borrow();
                let serving = self.master_epoch.load(Ordering::Acquire);
                // A broker elected and still starting as master says so
                // already: its silence about the epoch would read as a
                // master that is gone.
                let becoming = state.as_ref().map_or(serving, |g| {
                    match wanted(g, &self.addr, self.epochs().last_epoch(), serving) {
                        Wanted::Master(e) => e,
                        Wanted::Slave(_) => serving,
                    }
                });
                (state.as_ref().map_or(0, |g| g.version), becoming)
            };
            let req = ControllerHeartbeat {
                cluster: self.cluster.clone(),
                broker_name: self.broker_name.clone(),
                addr: self.addr.clone(),
                master_epoch,
                log_end: self.log_end.load(Ordering::Acquire),
                known_version: known,
                wait_ms: self.wait.as_millis() as u32,
            };
            let sent_at = now_millis();
            let answer = tokio::select! {
                a = conn.call(req) => a,
                // Something changed here (a promotion, a fencing): tell the
                // controller now rather than after the held answer.
                _ = self.wake.notified() => continue,
                _ = shutdown.cancelled() => return Ok(()),
            };
            match answer {
                Ok(g) => {
                    self.answered_sent_at.fetch_max(sent_at, Ordering::AcqRel);
                    self.adopt(g);
                }
                Err(e) => {
                    return Err(match e.remote() {
                        Some(w) if w.code == ErrorCode::NotControllerLeader => {
                            HeartbeatEnd::Leader(Some(w.message.clone()).filter(|m| !m.is_empty()))
                        }
                        _ => HeartbeatEnd::Failed(e.to_string()),
                    })
                }
            }
        }
    }
}

enum HeartbeatEnd {
    /// Not the leader; the leader's address when known.
    Leader(Option<String>),
    Failed(String),
}

fn no_controller() -> WireError {
    WireError::new(
        ErrorCode::ControllerUnavailable,
        "no connection to the controller's leader now",
    )
}

fn wire(e: txmq_remoting::Error) -> WireError {
    match e.remote() {
        Some(w) => w.clone(),
        None => WireError::new(ErrorCode::ControllerUnavailable, e.to_string()),
    }
}

/// The role the controller's state asks of this broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Wanted {
    /// Master at this epoch.
    Master(u64),
    /// Slave of this master at this epoch (none: no master now).
    Slave(Option<(String, u64)>),
}

/// What the controller's `state` asks of the broker at `me`, whose epoch
/// file's last epoch is `last_epoch` and which is master of
/// `master_epoch` now (0: not a master).
pub(crate) fn wanted(
    state: &BrokerGroupState,
    me: &str,
    last_epoch: u64,
    master_epoch: u64,
) -> Wanted {
    match &state.master {
        Some(m) if m == me => {
            if master_epoch == state.epoch || state.epoch > last_epoch {
                Wanted::Master(state.epoch)
            } else {
                // Master of this epoch before a restart: its term is over
                // (a write may have been lost with the process); wait for
                // the controller to elect again.
                Wanted::Slave(None)
            }
        }
        Some(m) => Wanted::Slave(Some((m.clone(), state.epoch))),
        None => Wanted::Slave(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(master: Option<&str>, epoch: u64) -> BrokerGroupState {
        BrokerGroupState {
            master: master.map(String::from),
            epoch,
            ..Default::default()
        }
    }

    #[test]
    fn a_broker_becomes_master_only_at_an_epoch_it_never_held() {
        let s = state(Some("a"), 3);
        assert_eq!(wanted(&s, "a", 2, 0), Wanted::Master(3), "elected");
        assert_eq!(wanted(&s, "a", 3, 3), Wanted::Master(3), "stays");
        assert_eq!(
            wanted(&s, "a", 3, 0),
            Wanted::Slave(None),
            "restarted: waits for a new election"
        );
        assert_eq!(wanted(&s, "b", 1, 0), Wanted::Slave(Some(("a".into(), 3))));
        assert_eq!(wanted(&state(None, 0), "a", 0, 0), Wanted::Slave(None));
    }
}
