//! Shared by the controller's in-process tests: members on 127.0.0.1 with
//! short timings, each in its own temp dir, and fake brokers that
//! heartbeat the leader the way a broker does.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use txmq_controller::{Controller, ControllerConfig, ControllerHandle};
use txmq_protocol::{
    BrokerGroupState, Call, ControllerHeartbeat, ControllerInfo, ErrorCode, GetControllerInfo,
    Hello, MasterDrained, Role, WireError, PROTOCOL_VERSION,
};
use txmq_remoting::{Connection, ConnectionConfig};

/// The master expiry of these tests: long enough for a fake broker to find
/// a new controller leader within its grace while the whole workspace's
/// tests load the machine (2 s failed there twice).
pub const EXPIRY: Duration = Duration::from_millis(3000);

pub fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

pub fn init_log() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "txmq_controller=info".into()),
        )
        .with_test_writer()
        .try_init();
}

/// One running member.
pub struct Member {
    pub id: u64,
    pub addr: String,
    pub handle: ControllerHandle,
    pub dir: Arc<tempfile::TempDir>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Member {
    pub async fn stop(self) -> (u64, Arc<tempfile::TempDir>) {
        self.stop.cancel();
        self.task.await.unwrap();
        (self.id, self.dir)
    }
}

/// A test cluster's settings.
#[derive(Clone)]
pub struct Setup {
    pub peers: BTreeMap<u64, String>,
    pub unclean: bool,
    pub drain_timeout: Duration,
}

impl Setup {
    pub fn new(n: u64) -> Setup {
        Setup {
            peers: (1..=n).map(|i| (i, free_addr())).collect(),
            unclean: false,
            drain_timeout: Duration::from_secs(10),
        }
    }

    pub fn config(&self, id: u64, dir: &std::path::Path) -> ControllerConfig {
        let mut c = ControllerConfig::new(id, self.peers[&id].clone(), self.peers.clone(), dir);
        c.master_expiry = EXPIRY;
        c.unclean_election = self.unclean;
        c.raft_heartbeat = Duration::from_millis(50);
        c.raft_election_timeout = Duration::from_millis(300);
        c.drain_timeout = self.drain_timeout;
        c
    }

    pub async fn start(&self, id: u64, dir: Arc<tempfile::TempDir>) -> Member {
        let c = Controller::bind(self.config(id, dir.path())).await.unwrap();
        let handle = c.handle();
        let stop = CancellationToken::new();
        let task = tokio::spawn(c.run(stop.clone()));
        Member {
            id,
            addr: self.peers[&id].clone(),
            handle,
            dir,
            stop,
            task,
        }
    }

    pub async fn start_all(&self) -> Vec<Member> {
        let mut members = Vec::new();
        for id in self.peers.keys() {
            members.push(
                self.start(*id, Arc::new(tempfile::tempdir().unwrap()))
                    .await,
            );
        }
        members
    }
}

pub async fn wait_for<T>(what: &str, within: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the members agree on a leader; returns its index in `members`.
pub async fn leader(members: &[Member]) -> usize {
    wait_for("a controller leader", Duration::from_secs(10), || {
        let infos: Vec<ControllerInfo> = members.iter().map(|m| m.handle.info()).collect();
        let l = infos[0].leader_id?;
        infos
            .iter()
            .all(|i| i.leader_id == Some(l))
            .then(|| members.iter().position(|m| m.id == l))
            .flatten()
    })
    .await
}

pub async fn connect(addr: &str, role: Role) -> Connection {
    let hello = Hello {
        version: PROTOCOL_VERSION,
        role,
        client_id: "test".into(),
        group: None,
    };
    Connection::connect(addr, hello, None, ConnectionConfig::default())
        .await
        .unwrap()
}

/// Sends `req` to `addr` and returns the wire error or the answer.
pub async fn ask<C: Call>(addr: &str, req: C) -> Result<C::Reply, WireError> {
    let conn = connect(addr, Role::Admin).await;
    let r = conn.call(req).await;
    conn.close();
    r.map_err(|e| {
        e.remote()
            .cloned()
            .unwrap_or_else(|| panic!("transport error: {e}"))
    })
}

pub async fn info(addr: &str) -> ControllerInfo {
    ask(addr, GetControllerInfo {}).await.unwrap()
}

/// A broker as the controller sees one: heartbeats the leader (following
/// `NOT_CONTROLLER_LEADER`), becomes master of the epoch it is elected
/// to, and (if asked to) reports drained when a planned switch starts.
pub struct FakeBroker {
    pub addr: String,
    pub log_end: Arc<AtomicU64>,
    pub state: watch::Receiver<BrokerGroupState>,
    pub answers_drain: Arc<AtomicBool>,
    /// While set, no heartbeats are sent (the connection stays open): a
    /// paused or hung process.
    pub paused: Arc<AtomicBool>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl FakeBroker {
    pub fn start(controllers: Vec<String>, group: &str, addr: &str, log_end: u64) -> FakeBroker {
        let (tx, rx) = watch::channel(BrokerGroupState::default());
        let stop = CancellationToken::new();
        let log = Arc::new(AtomicU64::new(log_end));
        let drain = Arc::new(AtomicBool::new(false));
        let paused = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(heartbeat_loop(
            controllers,
            group.to_string(),
            addr.to_string(),
            Knobs {
                log_end: log.clone(),
                answers_drain: drain.clone(),
                paused: paused.clone(),
            },
            tx,
            stop.clone(),
        ));
        FakeBroker {
            addr: addr.to_string(),
            log_end: log,
            state: rx,
            answers_drain: drain,
            paused,
            stop,
            task,
        }
    }

    /// The process dies: its connection closes.
    pub async fn kill(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }

    pub fn current(&self) -> BrokerGroupState {
        self.state.borrow().clone()
    }

    pub async fn wait_state(
        &mut self,
        what: &str,
        mut f: impl FnMut(&BrokerGroupState) -> bool,
    ) -> BrokerGroupState {
        let found = {
            let r =
                tokio::time::timeout(Duration::from_secs(10), self.state.wait_for(|s| f(s))).await;
            match r {
                Ok(Ok(s)) => Some(s.clone()),
                _ => None,
            }
        };
        found.unwrap_or_else(|| panic!("timed out waiting for {what}; state {:?}", self.current()))
    }
}

/// The knobs a test turns on a running fake broker.
struct Knobs {
    log_end: Arc<AtomicU64>,
    answers_drain: Arc<AtomicBool>,
    paused: Arc<AtomicBool>,
}

async fn heartbeat_loop(
    controllers: Vec<String>,
    group: String,
    addr: String,
    knobs: Knobs,
    tx: watch::Sender<BrokerGroupState>,
    stop: CancellationToken,
) {
    let Knobs {
        log_end,
        answers_drain,
        paused,
    } = knobs;
    let mut target = controllers[0].clone();
    let mut next = 0;
    let mut conn: Option<Connection> = None;
    let mut master_epoch = 0;
    let mut drained_for = 0;
    loop {
        if stop.is_cancelled() {
            break;
        }
        if paused.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        let c = match &conn {
            Some(c) if !c.is_closed() => c.clone(),
            _ => {
                let hello = Hello {
                    version: PROTOCOL_VERSION,
                    role: Role::Broker,
                    client_id: addr.clone(),
                    group: None,
                };
                match Connection::connect(&target, hello, None, ConnectionConfig::default()).await {
                    Ok(c) => {
                        conn = Some(c.clone());
                        c
                    }
                    Err(_) => {
                        next = (next + 1) % controllers.len();
                        target = controllers[next].clone();
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                }
            }
        };
        let hb = ControllerHeartbeat {
            cluster: "c".into(),
            broker_name: group.clone(),
            addr: addr.clone(),
            master_epoch,
            log_end: log_end.load(Ordering::Relaxed),
            known_version: tx.borrow().version,
            wait_ms: 200,
        };
        let res = tokio::select! {
            r = c.call_with_timeout(hb, Duration::from_secs(6)) => r,
            _ = stop.cancelled() => break,
        };
        match res {
            Ok(state) => {
                if state.master.as_deref() == Some(addr.as_str()) {
                    master_epoch = state.epoch;
                } else {
                    master_epoch = 0;
                }
                if state.master.as_deref() == Some(addr.as_str())
                    && state.draining.is_some()
                    && answers_drain.load(Ordering::Relaxed)
                    && drained_for != state.epoch
                {
                    drained_for = state.epoch;
                    let _ = c
                        .call(MasterDrained {
                            broker_name: group.clone(),
                            master: addr.clone(),
                            epoch: state.epoch,
                        })
                        .await;
                }
                tx.send_replace(state);
            }
            Err(e) => {
                if let Some(w) = e.remote() {
                    if w.code == ErrorCode::NotControllerLeader && !w.message.is_empty() {
                        target = w.message.clone();
                    } else {
                        next = (next + 1) % controllers.len();
                        target = controllers[next].clone();
                    }
                } else {
                    next = (next + 1) % controllers.len();
                    target = controllers[next].clone();
                }
                if let Some(c) = conn.take() {
                    c.close();
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    if let Some(c) = conn {
        c.close();
    }
}
