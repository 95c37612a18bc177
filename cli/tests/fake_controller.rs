//! `txmq broker elect`, `txmq controller` and `txmq cluster`'s epochs, the
//! real binary against fake nameservers (which answer for their embedded
//! controller, or refuse as a nameserver without one) and a fake broker,
//! over real connections. The real controller with real processes is
//! tested in `tests/`.

use std::process::Output;
use std::sync::{Arc, Mutex};

use serde_json::Value;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use txmq_protocol::{
    BrokerGroupState, BrokerInfo, BrokerRole, ClusterInfo, ControllerInfo, ErrorCode, ReplicaInfo,
    ReplicationInfo, Request, Response, WireError,
};
use txmq_remoting::connection_types::BoxFuture;
use txmq_remoting::{Connection, ConnectionConfig, Service};

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// How a fake nameserver's controller answers.
#[derive(Clone)]
enum Controller {
    /// No controller here: `UNSUPPORTED_REQUEST`.
    None,
    /// Elects as asked, raising the epoch.
    Elects,
    /// Refuses with this code.
    Refuses(ErrorCode),
}

/// A fake nameserver of one broker group: its master and epoch, one slave.
struct Names {
    controller: Mutex<Controller>,
    master: Mutex<(String, u64)>,
    slave: String,
    elections: Mutex<Vec<Option<String>>>,
}

impl Names {
    fn state(&self) -> BrokerGroupState {
        let (master, epoch) = lock(&self.master).clone();
        BrokerGroupState {
            broker_name: "broker-a".into(),
            master: Some(master.clone()),
            epoch,
            in_sync: vec![master, self.slave.clone()],
            ..BrokerGroupState::default()
        }
    }

    fn handle(&self, request: Request) -> Result<Response, WireError> {
        let controller = lock(&self.controller).clone();
        let refuse = |code| Err(WireError::new(code, "refused by the fake controller"));
        Ok(match (request, controller) {
            (Request::GetCluster(_), _) => {
                let (master, epoch) = lock(&self.master).clone();
                let info = |addr: &str, role, epoch| BrokerInfo {
                    cluster: "c".into(),
                    broker_name: "broker-a".into(),
                    addr: addr.into(),
                    last_heartbeat_ms_ago: 100,
                    topic_count: 1,
                    role,
                    epoch,
                };
                Response::GetCluster(ClusterInfo {
                    brokers: vec![
                        info(&master, BrokerRole::Master, epoch),
                        info(&self.slave, BrokerRole::Slave, 0),
                    ],
                })
            }
            (Request::ElectMaster(_) | Request::GetControllerInfo(_), Controller::None) => {
                return refuse(ErrorCode::UnsupportedRequest)
            }
            (Request::ElectMaster(_) | Request::GetControllerInfo(_), Controller::Refuses(c)) => {
                return refuse(c)
            }
            (Request::ElectMaster(e), Controller::Elects) => {
                lock(&self.elections).push(e.replica.clone());
                let epoch = lock(&self.master).1;
                let to = e.replica.unwrap_or_else(|| self.slave.clone());
                *lock(&self.master) = (to, epoch + 1);
                Response::ElectMaster(Box::new(self.state()))
            }
            (Request::GetControllerInfo(_), Controller::Elects) => {
                Response::GetControllerInfo(Box::new(ControllerInfo {
                    id: 3,
                    leader_id: Some(1),
                    leader_addr: Some("127.0.0.1:9878".into()),
                    term: 5,
                    members: vec![
                        (1, "127.0.0.1:9878".into()),
                        (2, "127.0.0.1:9879".into()),
                        (3, "127.0.0.1:9880".into()),
                    ],
                    groups: vec![self.state()],
                }))
            }
            (other, _) => {
                return Err(WireError::new(ErrorCode::UnsupportedRequest, other.kind()));
            }
        })
    }
}

/// A fake master broker answering `GetReplication` with its epoch and one
/// in-sync slave.
struct Master {
    addr: Mutex<String>,
    slave: String,
    epoch: u64,
}

impl Master {
    fn handle(&self, request: Request) -> Result<Response, WireError> {
        match request {
            Request::GetReplication(_) => Ok(Response::GetReplication(Box::new(ReplicationInfo {
                broker_name: "broker-a".into(),
                role: BrokerRole::Master,
                addr: lock(&self.addr).clone(),
                log_end: 4096,
                epoch: self.epoch,
                replication: "sync".into(),
                min_insync_replicas: 2,
                master_addr: None,
                master_end: None,
                error: None,
                replicas: vec![ReplicaInfo {
                    addr: self.slave.clone(),
                    acked: 4096,
                    lag_bytes: 0,
                    in_sync: true,
                    last_seen_ms_ago: 5,
                }],
                shipped_records: 0,
                shipped_frames: 0,
                shipped_bytes: 0,
            }))),
            other => Err(WireError::new(ErrorCode::UnsupportedRequest, other.kind())),
        }
    }
}

type Handler<T> = fn(&T, Request) -> Result<Response, WireError>;

struct Fake<T>(Arc<T>, Handler<T>);

impl<T: Send + Sync + 'static> Service for Fake<T> {
    fn call(&self, _conn: &Connection, request: Request) -> BoxFuture<Result<Response, WireError>> {
        Box::pin(std::future::ready((self.1)(&self.0, request)))
    }
}

/// Serves `state` on 127.0.0.1:0 until `stop` is cancelled; its address.
async fn serve<T: Send + Sync + 'static>(
    state: Arc<T>,
    handle: Handler<T>,
    stop: &CancellationToken,
) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(txmq_remoting::server::serve(
        listener,
        Arc::new(Fake(state, handle)),
        ConnectionConfig::default(),
        stop.clone(),
    ));
    addr
}

/// Runs the `txmq` binary with `--nameserver ns` and `args`.
async fn txmq(ns: &str, args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_txmq"))
        .arg("--nameserver")
        .arg(ns)
        .args(args)
        .env_remove("TXMQ_OUTPUT")
        .kill_on_drop(true)
        .output()
        .await
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

struct Setup {
    /// The nameserver without a controller, then the one with: "ADDR,ADDR".
    nameservers: String,
    names: Arc<Names>,
    without: Arc<Names>,
    master: String,
    slave: String,
    stop: CancellationToken,
}

async fn setup() -> Setup {
    let stop = CancellationToken::new();
    let slave = "127.0.0.1:1".to_string();
    let broker = Arc::new(Master {
        addr: Mutex::new(String::new()),
        slave: slave.clone(),
        epoch: 4,
    });
    let master = serve(broker.clone(), Master::handle, &stop).await;
    *lock(&broker.addr) = master.clone();
    let names = |controller| {
        Arc::new(Names {
            controller: Mutex::new(controller),
            master: Mutex::new((master.clone(), 4)),
            slave: slave.clone(),
            elections: Mutex::new(Vec::new()),
        })
    };
    let (without, with) = (names(Controller::None), names(Controller::Elects));
    let a = serve(without.clone(), Names::handle, &stop).await;
    let b = serve(with.clone(), Names::handle, &stop).await;
    Setup {
        nameservers: format!("{a},{b}"),
        names: with,
        without,
        master,
        slave,
        stop,
    }
}

#[tokio::test]
async fn broker_elect_prints_the_new_master_and_epoch_in_text_and_json() {
    let s = setup().await;
    let o = txmq(
        &s.nameservers,
        &["broker", "elect", "broker-a", "--replica", &s.slave],
    )
    .await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        format!("broker-a: master is now {} (epoch 5)\n", s.slave)
    );
    assert_eq!(*lock(&s.names.elections), vec![Some(s.slave.clone())]);
    assert!(lock(&s.without.elections).is_empty());

    let o = txmq(
        &s.nameservers,
        &["broker", "elect", "broker-a", "--output", "json"],
    )
    .await;
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(v["broker_name"], "broker-a");
    assert_eq!(v["master"], s.slave.as_str());
    assert_eq!(v["epoch"], 6);
    assert!(
        v["in_sync"].as_array().is_some_and(|a| !a.is_empty()),
        "{v}"
    );
    assert_eq!(lock(&s.names.elections).last(), Some(&None));
    s.stop.cancel();
}

#[tokio::test]
async fn broker_elect_says_why_the_controller_refused_and_exits_with_1() {
    let s = setup().await;
    for (code, name) in [
        (ErrorCode::NotInSync, "NOT_IN_SYNC"),
        (ErrorCode::BadArgument, "BAD_ARGUMENT"),
    ] {
        *lock(&s.names.controller) = Controller::Refuses(code);
        let o = txmq(
            &s.nameservers,
            &["broker", "elect", "broker-a", "--replica", "h:9"],
        )
        .await;
        assert_eq!(o.status.code(), Some(1), "{name}");
        let err = stderr(&o);
        assert!(
            err.contains(name) && err.contains("cannot elect h:9 master of broker group broker-a"),
            "{err}"
        );
        assert!(stdout(&o).is_empty());
    }

    // No nameserver runs the controller.
    *lock(&s.names.controller) = Controller::None;
    for args in [&["broker", "elect", "broker-a"][..], &["controller"]] {
        let o = txmq(&s.nameservers, args).await;
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        let err = stderr(&o);
        assert!(
            err.contains("UNSUPPORTED_REQUEST")
                && err.contains("no nameserver runs the controller"),
            "{args:?}: {err}"
        );
    }
    s.stop.cancel();
}

#[tokio::test]
async fn controller_shows_its_leader_term_members_and_groups() {
    let s = setup().await;
    let o = txmq(&s.nameservers, &["controller"]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.starts_with("controller: leader 1 (127.0.0.1:9878), term 5, as member 3 sees it\n"),
        "{out}"
    );
    assert!(
        out.lines().any(|l| {
            let cells: Vec<&str> = l.split_whitespace().collect();
            cells.len() >= 3 && cells[0] == "broker-a" && cells[1] == s.master && cells[2] == "4"
        }),
        "{out}"
    );
    let o = txmq(&s.nameservers, &["controller", "--output", "json"]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(v["term"], 5);
    assert_eq!(v["leader_id"], 1);
    assert_eq!(v["members"].as_array().map(Vec::len), Some(3));
    assert_eq!(v["groups"][0]["master"], s.master.as_str());
    assert_eq!(v["groups"][0]["epoch"], 4);
    s.stop.cancel();
}

#[tokio::test]
async fn cluster_shows_the_epoch_of_the_master_and_of_the_slave_that_follows_it() {
    let s = setup().await;
    // The slave (nothing listens at its address) is listed by its master,
    // so it is not asked itself.
    let o = txmq(&s.nameservers, &["cluster", "--output", "json"]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let rows: Vec<Value> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2);
    let role_epoch = |r: &Value| (r["role"].as_str().map(String::from), r["epoch"].as_u64());
    assert_eq!(role_epoch(&rows[0]), (Some("master".into()), Some(4)));
    assert_eq!(role_epoch(&rows[1]), (Some("slave".into()), Some(4)));
    assert_eq!(rows[1]["in_sync"], true);

    let o = txmq(&s.nameservers, &["cluster"]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let lines: Vec<Vec<&str>> = out
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        lines[0][..5],
        ["CLUSTER", "BROKER", "ROLE", "ADDR", "EPOCH"]
    );
    assert_eq!(lines[1][2..5], ["master", s.master.as_str(), "4"]);
    assert_eq!(lines[2][2..5], ["slave", s.slave.as_str(), "4"]);
    s.stop.cancel();
}
