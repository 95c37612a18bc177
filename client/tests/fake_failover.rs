//! The client across a controller's failover, against fakes: fake
//! nameservers whose routes name a group's master with its epoch (and
//! which answer the controller's admin requests, or refuse them as a
//! nameserver without a controller does), and fake brokers that store
//! writes as the master or refuse them as a fenced master (`STALE_EPOCH`)
//! or a slave (`NOT_MASTER`), over real connections. It checks the
//! client's own logic: a refused write goes to the new master after a
//! route refresh, a lagging nameserver cannot send writes back to an older
//! master, a transaction prepared on the old master ends on the new one,
//! and `Admin` finds the controller behind the nameservers. End-to-end
//! failover with real processes lives in `tests/`.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use txmq::{
    Admin, BoxError, CheckRequest, ConsumeFrom, Message, Producer, PullConsumer,
    TransactionListener, TransactionProducer, TransactionState, TxContext, PERM_READ_WRITE,
};
use txmq_protocol::{
    BrokerGroupState, BrokerInfo, BrokerQueues, BrokerRole, ClusterInfo, ControllerInfo, Done,
    Ended, ErrorCode, Prepared, QueueOffsets, Request, Response, SendResult, SendStatus,
    TopicRoute, TxAction, TxState, WireError,
};
use txmq_remoting::connection_types::BoxFuture;
use txmq_remoting::{Connection, ConnectionConfig, Service};

type TestResult<T = ()> = std::result::Result<T, Box<dyn std::error::Error>>;

const TOPIC: &str = "orders";
const GROUP: &str = "broker-a";

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// How a fake broker answers writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Stores them.
    Master,
    /// Refuses them with this code, storing nothing.
    Refuse(ErrorCode),
}

/// A fake broker of group [`GROUP`].
struct Broker {
    mode: Mutex<Mode>,
    /// Requests (sends, prepares, ends, commits) stored.
    sends: AtomicU32,
    prepares: AtomicU32,
    /// Transaction ids ended here.
    ended: Mutex<Vec<u64>>,
    commits: Mutex<Vec<u64>>,
    refused: AtomicU32,
    /// The first tx id this broker hands out (ids stay unique across the group).
    next_tx: AtomicU64,
}

impl Broker {
    fn new(mode: Mode, first_tx: u64) -> Broker {
        Broker {
            mode: Mutex::new(mode),
            sends: AtomicU32::new(0),
            prepares: AtomicU32::new(0),
            ended: Mutex::new(Vec::new()),
            commits: Mutex::new(Vec::new()),
            refused: AtomicU32::new(0),
            next_tx: AtomicU64::new(first_tx),
        }
    }

    fn handle(&self, request: Request) -> Result<Response, WireError> {
        let writes = matches!(
            request,
            Request::Send(_)
                | Request::PrepareTransaction(_)
                | Request::EndTransaction(_)
                | Request::CommitOffset(_)
        );
        if let (true, Mode::Refuse(code)) = (writes, *lock(&self.mode)) {
            self.refused.fetch_add(1, Ordering::SeqCst);
            return Err(WireError::new(code, "not the group's master"));
        }
        Ok(match request {
            Request::Send(s) => {
                self.sends.fetch_add(1, Ordering::SeqCst);
                Response::Send(SendResult {
                    duplicate: false,
                    status: SendStatus::SendOk,
                    queue: s.queue,
                    first_offset: 0,
                    msg_ids: s.messages.iter().map(|m| m.msg_id).collect(),
                })
            }
            Request::PrepareTransaction(_) => {
                self.prepares.fetch_add(1, Ordering::SeqCst);
                Response::PrepareTransaction(Prepared {
                    duplicate: false,
                    tx_id: self.next_tx.fetch_add(1, Ordering::SeqCst),
                    status: SendStatus::SendOk,
                })
            }
            Request::EndTransaction(e) => {
                lock(&self.ended).push(e.tx_id);
                Response::EndTransaction(Ended::new(
                    match e.action {
                        TxAction::Commit => TxState::Committed,
                        TxAction::Rollback => TxState::RolledBack,
                    },
                    false,
                    SendStatus::SendOk,
                ))
            }
            Request::CommitOffset(c) => {
                lock(&self.commits).push(c.offset);
                Response::CommitOffset(Done {})
            }
            // A group with no offset yet, on an empty queue.
            Request::QueryOffset(_) => Response::QueryOffset(QueueOffsets {
                committed: None,
                min_offset: 0,
                max_offset: 0,
                since_offset: None,
                topic_generation: 0,
            }),
            other => {
                return Err(WireError::new(ErrorCode::UnsupportedRequest, other.kind()));
            }
        })
    }
}

/// What a fake nameserver knows: the group's master and epoch, its slaves,
/// and its controller (none: `UNSUPPORTED_REQUEST`, as a nameserver
/// started without one).
struct Names {
    master: Mutex<(String, u64)>,
    slaves: Mutex<Vec<String>>,
    controller: Mutex<Option<Controller>>,
    elections: Mutex<Vec<Option<String>>>,
    routes: AtomicU32,
}

/// A fake controller's answers.
#[derive(Clone)]
enum Controller {
    /// Elects whom it is asked to, raising the epoch.
    Elects,
    /// Refuses with this code.
    Refuses(ErrorCode),
}

impl Names {
    fn new(master: &str, epoch: u64) -> Names {
        Names {
            master: Mutex::new((master.to_string(), epoch)),
            slaves: Mutex::new(Vec::new()),
            controller: Mutex::new(None),
            elections: Mutex::new(Vec::new()),
            routes: AtomicU32::new(0),
        }
    }

    fn set_master(&self, addr: &str, epoch: u64) {
        *lock(&self.master) = (addr.to_string(), epoch);
    }

    fn group_state(&self) -> BrokerGroupState {
        let (master, epoch) = lock(&self.master).clone();
        let mut in_sync = vec![master.clone()];
        in_sync.extend(lock(&self.slaves).iter().cloned());
        BrokerGroupState {
            broker_name: GROUP.into(),
            master: Some(master),
            epoch,
            in_sync,
            ..BrokerGroupState::default()
        }
    }

    fn handle(&self, request: Request) -> Result<Response, WireError> {
        let (master, epoch) = lock(&self.master).clone();
        let slaves = lock(&self.slaves).clone();
        Ok(match request {
            Request::GetRoute(r) => {
                self.routes.fetch_add(1, Ordering::SeqCst);
                Response::GetRoute(TopicRoute {
                    topic: r.topic,
                    brokers: vec![BrokerQueues {
                        broker_name: GROUP.into(),
                        addr: master,
                        slaves,
                        queues: 1,
                        perm: PERM_READ_WRITE,
                        epoch,
                    }],
                })
            }
            Request::GetCluster(_) => Response::GetCluster(ClusterInfo {
                brokers: vec![BrokerInfo {
                    cluster: "c".into(),
                    broker_name: GROUP.into(),
                    addr: master,
                    last_heartbeat_ms_ago: 0,
                    topic_count: 1,
                    role: BrokerRole::Master,
                    epoch,
                }],
            }),
            Request::ElectMaster(e) => {
                let controller = lock(&self.controller).clone();
                match controller {
                    None => return Err(unsupported()),
                    Some(Controller::Refuses(code)) => {
                        return Err(WireError::new(code, "refused by the fake controller"))
                    }
                    Some(Controller::Elects) => {
                        lock(&self.elections).push(e.replica.clone());
                        let to = e.replica.unwrap_or_else(|| "elsewhere:1".into());
                        self.set_master(&to, epoch + 1);
                        Response::ElectMaster(Box::new(self.group_state()))
                    }
                }
            }
            Request::GetControllerInfo(_) => match lock(&self.controller).clone() {
                None => return Err(unsupported()),
                Some(Controller::Refuses(code)) => {
                    return Err(WireError::new(code, "refused by the fake controller"))
                }
                Some(Controller::Elects) => Response::GetControllerInfo(Box::new(ControllerInfo {
                    id: 2,
                    leader_id: Some(1),
                    leader_addr: Some("127.0.0.1:9878".into()),
                    term: 7,
                    members: vec![(1, "127.0.0.1:9878".into()), (2, "127.0.0.1:9879".into())],
                    groups: vec![self.group_state()],
                })),
            },
            other => {
                return Err(WireError::new(ErrorCode::UnsupportedRequest, other.kind()));
            }
        })
    }
}

fn unsupported() -> WireError {
    WireError::new(
        ErrorCode::UnsupportedRequest,
        "requests are not served by a nameserver",
    )
}

struct BrokerService(Arc<Broker>);

impl Service for BrokerService {
    fn call(&self, _conn: &Connection, request: Request) -> BoxFuture<Result<Response, WireError>> {
        Box::pin(std::future::ready(self.0.handle(request)))
    }
}

struct NamesService(Arc<Names>);

impl Service for NamesService {
    fn call(&self, _conn: &Connection, request: Request) -> BoxFuture<Result<Response, WireError>> {
        Box::pin(std::future::ready(self.0.handle(request)))
    }
}

/// A running fake; stops (closing its connections) when dropped.
struct Running<T> {
    state: Arc<T>,
    addr: String,
    stop: CancellationToken,
}

impl<T> Drop for Running<T> {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn run<T>(state: T, service: impl Fn(Arc<T>) -> Arc<dyn Service>) -> TestResult<Running<T>> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    let state = Arc::new(state);
    let stop = CancellationToken::new();
    tokio::spawn(txmq_remoting::server::serve(
        listener,
        service(state.clone()),
        ConnectionConfig::default(),
        stop.clone(),
    ));
    Ok(Running { state, addr, stop })
}

async fn broker(mode: Mode, first_tx: u64) -> TestResult<Running<Broker>> {
    run(Broker::new(mode, first_tx), |b| Arc::new(BrokerService(b))).await
}

async fn nameserver(master: &str, epoch: u64) -> TestResult<Running<Names>> {
    run(Names::new(master, epoch), |n| Arc::new(NamesService(n))).await
}

#[tokio::test]
async fn a_send_refused_by_the_old_master_goes_to_the_new_one_after_a_route_refresh() -> TestResult
{
    for code in [ErrorCode::StaleEpoch, ErrorCode::NotMaster] {
        let old = broker(Mode::Master, 1).await?;
        let new = broker(Mode::Master, 1000).await?;
        let ns = nameserver(&old.addr, 1).await?;
        let producer = Producer::builder()
            .nameserver(&ns.addr)
            .retries(2)
            .route_refresh_interval(Duration::from_secs(60))
            .build()
            .await?;
        producer.send(Message::new(TOPIC, "before")).await?;
        assert_eq!(old.state.sends.load(Ordering::SeqCst), 1);

        // The controller elected `new` (epoch 2) and fenced `old`.
        *lock(&old.state.mode) = Mode::Refuse(code);
        ns.state.set_master(&new.addr, 2);
        let receipt = producer.send(Message::new(TOPIC, "after")).await?;
        assert_eq!(receipt.broker_name, GROUP);
        assert_eq!(old.state.refused.load(Ordering::SeqCst), 1, "{code:?}");
        assert_eq!(old.state.sends.load(Ordering::SeqCst), 1, "{code:?}");
        assert_eq!(new.state.sends.load(Ordering::SeqCst), 1, "{code:?}");
        producer.close().await.unwrap();
    }
    Ok(())
}

#[tokio::test]
async fn a_nameserver_that_missed_the_election_cannot_send_writes_back_to_the_old_master(
) -> TestResult {
    let old = broker(Mode::Master, 1).await?;
    let new = broker(Mode::Master, 1000).await?;
    // The first nameserver heard of the election; the second did not.
    let fresh = nameserver(&new.addr, 2).await?;
    let lagging = nameserver(&old.addr, 1).await?;
    let producer = Producer::builder()
        .nameserver(&format!("{},{}", fresh.addr, lagging.addr))
        .route_refresh_interval(Duration::from_millis(50))
        .build()
        .await?;
    producer.send(Message::new(TOPIC, "1")).await?;
    assert_eq!(new.state.sends.load(Ordering::SeqCst), 1);

    // Only the lagging one answers from now on.
    drop(fresh);
    let asked = lagging.state.routes.load(Ordering::SeqCst);
    for i in 0..5 {
        tokio::time::sleep(Duration::from_millis(60)).await;
        producer.send(Message::new(TOPIC, format!("{i}"))).await?;
    }
    assert!(
        lagging.state.routes.load(Ordering::SeqCst) > asked,
        "the lagging nameserver was asked"
    );
    assert_eq!(old.state.sends.load(Ordering::SeqCst), 0);
    assert_eq!(new.state.sends.load(Ordering::SeqCst), 6);
    producer.close().await.unwrap();
    Ok(())
}

/// Commits every transaction; the first one's local transaction runs
/// while the controller moves the group to another master.
struct FailoverDuringTx {
    failover: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl TransactionListener for FailoverDuringTx {
    async fn execute(&self, _: &Message, _: &TxContext) -> Result<TransactionState, BoxError> {
        let failover = lock(&self.failover).take();
        if let Some(failover) = failover {
            failover();
        }
        Ok(TransactionState::Commit)
    }

    async fn check(&self, _: &CheckRequest) -> Result<TransactionState, BoxError> {
        Ok(TransactionState::Commit)
    }
}

#[tokio::test]
async fn a_transaction_prepared_on_the_old_master_is_committed_on_the_new_one() -> TestResult {
    let old = broker(Mode::Master, 1).await?;
    let new = broker(Mode::Master, 1000).await?;
    let ns = nameserver(&old.addr, 1).await?;
    let (old_state, new_addr, names) = (old.state.clone(), new.addr.clone(), ns.state.clone());
    let listener = FailoverDuringTx {
        failover: Mutex::new(Some(Box::new(move || {
            *lock(&old_state.mode) = Mode::Refuse(ErrorCode::StaleEpoch);
            names.set_master(&new_addr, 2);
        }))),
    };
    let producer = TransactionProducer::builder()
        .nameserver(&ns.addr)
        .group("pg")
        .listener(listener)
        .retries(2)
        .start()
        .await?;
    let outcome = producer
        .send_in_transaction(Message::new(TOPIC, "order"))
        .await?;
    assert_eq!(outcome.state, TransactionState::Commit);
    assert_eq!(outcome.ended().map(|e| e.state), Some(TxState::Committed));
    assert_eq!(old.state.prepares.load(Ordering::SeqCst), 1);
    // The old master refused the commit; the new one ended the same id.
    assert!(lock(&old.state.ended).is_empty());
    assert_eq!(*lock(&new.state.ended), vec![outcome.tx_id]);
    assert_eq!(outcome.tx_id, 1);
    producer.close().await.unwrap();
    Ok(())
}

#[tokio::test]
async fn an_offset_commit_refused_by_a_fenced_master_is_stored_on_the_new_one() -> TestResult {
    let old = broker(Mode::Master, 1).await?;
    let new = broker(Mode::Master, 1000).await?;
    let ns = nameserver(&old.addr, 1).await?;
    let consumer = PullConsumer::builder()
        .nameserver(&ns.addr)
        .group("cg")
        .topic(TOPIC)
        .from(ConsumeFrom::First)
        .build()
        .await?;
    // The start offset is committed by the first commit.
    *lock(&old.state.mode) = Mode::Refuse(ErrorCode::StaleEpoch);
    ns.state.set_master(&new.addr, 2);
    consumer.commit().await?;
    assert!(old.state.refused.load(Ordering::SeqCst) >= 1);
    assert!(lock(&old.state.commits).is_empty());
    assert_eq!(*lock(&new.state.commits), vec![0]);
    consumer.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn admin_finds_the_controller_behind_the_nameservers() -> TestResult {
    let without = nameserver("a:1", 1).await?;
    let with = nameserver("a:1", 1).await?;
    *lock(&with.state.controller) = Some(Controller::Elects);
    let admin = Admin::connect([format!("{},{}", without.addr, with.addr)]).await?;

    let info = admin.controller_info().await?;
    assert_eq!((info.leader_id, info.term), (Some(1), 7));
    assert_eq!(info.groups[0].master.as_deref(), Some("a:1"));

    let state = admin.elect_master(GROUP, Some("b:1")).await?;
    assert_eq!((state.master.as_deref(), state.epoch), (Some("b:1"), 2));
    assert_eq!(*lock(&with.state.elections), vec![Some("b:1".to_string())]);

    // The controller's refusal is the answer: not asked again elsewhere.
    *lock(&with.state.controller) = Some(Controller::Refuses(ErrorCode::NotInSync));
    let e = admin.elect_master(GROUP, Some("c:1")).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NotInSync));
    assert!(admin.elect_master(" ", None).await.is_err());
    admin.close().await.unwrap();

    // No nameserver runs a controller.
    *lock(&with.state.controller) = None;
    let admin = Admin::connect([format!("{},{}", without.addr, with.addr)]).await?;
    let e = admin.elect_master(GROUP, None).await.unwrap_err();
    assert!(matches!(e, txmq::Error::NoController { .. }), "{e:?}");
    assert_eq!(e.code(), Some(ErrorCode::UnsupportedRequest));
    assert!(e.to_string().contains("--controller-id"), "{e}");
    let e = admin.controller_info().await.unwrap_err();
    assert!(matches!(e, txmq::Error::NoController { .. }), "{e:?}");
    admin.close().await.unwrap();
    Ok(())
}
