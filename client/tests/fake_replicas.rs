//! The client against fake replicated broker groups: a fake nameserver
//! whose routes name each group's master (or none) and its slaves, and
//! fake brokers, masters and slaves, each with its own copy of the queues,
//! over real connections. Replication is the test copying messages from a
//! master's copy to a slave's, so a slave can be made to lag on purpose.
//! It checks the client's own logic: writes go to the master only, a
//! slave's `NOT_MASTER` is followed, groups without a master are skipped,
//! and consumers read from a slave while the master is gone without
//! moving back or skipping. End-to-end tests against real replicated
//! processes live in `tests/`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use txmq::{
    BoxError, CheckRequest, ConsumeFrom, Message, Producer, PullConsumer, SendStatus,
    TransactionListener, TransactionProducer, TransactionState, TxContext, PERM_READ_WRITE,
};
use txmq_protocol::{
    BrokerInfo, BrokerQueues, BrokerRole, ClusterInfo, Done, Ended, ErrorCode, HeartbeatOk, Hello,
    HelloOk, Prepared, PullResult, QueueOffsets, QueueRef, Request, Response, Role, SendResult,
    StoredMessage, TopicRoute, TxAction, TxState, WireError, PROTOCOL_VERSION,
};
use txmq_remoting::connection_types::BoxFuture;
use txmq_remoting::{Connection, ConnectionConfig, Service};

type TestResult<T = ()> = std::result::Result<T, Box<dyn std::error::Error>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

const TOPIC: &str = "orders";

/// One broker's copy of the queues and the group's offsets.
#[derive(Default)]
struct Store {
    queues: Mutex<HashMap<u32, Vec<StoredMessage>>>,
    offsets: Mutex<HashMap<(String, u32), u64>>,
    appended: Notify,
}

impl Store {
    fn len(&self, queue: u32) -> usize {
        lock(&self.queues).get(&queue).map_or(0, Vec::len)
    }

    fn push(&self, queue: u32, message: txmq::WireMessage) -> u64 {
        let mut queues = lock(&self.queues);
        let q = queues.entry(queue).or_default();
        let queue_offset = q.len() as u64;
        q.push(StoredMessage {
            message,
            queue,
            queue_offset,
            log_offset: queue_offset,
            store_timestamp: 1,
        });
        drop(queues);
        self.appended.notify_waiters();
        queue_offset
    }

    /// Copies `from`'s queue `queue` up to offset `upto` (replication).
    fn replicate_from(&self, from: &Store, queue: u32, upto: usize) {
        let source: Vec<StoredMessage> = lock(&from.queues)
            .get(&queue)
            .map(|q| q[..upto.min(q.len())].to_vec())
            .unwrap_or_default();
        let mut queues = lock(&self.queues);
        let q = queues.entry(queue).or_default();
        if source.len() > q.len() {
            q.extend_from_slice(&source[q.len()..]);
        }
        drop(queues);
        self.appended.notify_waiters();
    }
}

/// A fake broker: a master stores sends, a slave refuses them.
struct Node {
    group: String,
    role: BrokerRole,
    /// This run of the broker ([`PullResult::epoch`]).
    epoch: u64,
    /// Where the group's master is (named in `NOT_MASTER`).
    master_addr: Mutex<String>,
    store: Arc<Store>,
    /// Messages stored by sends.
    stored: AtomicU32,
    /// Writes refused with `NOT_MASTER`.
    refused: AtomicU32,
    pulls: AtomicU32,
    commits: AtomicU32,
    /// Transactions prepared and ended here.
    prepares: AtomicU32,
    ends: AtomicU32,
    /// Connections that said hello as a transaction producer (for check-backs).
    tx_producers: AtomicU32,
    /// Answer sends and prepares with this status.
    send_status: Mutex<SendStatus>,
    /// Store commits but answer with this error (sync replication short of slaves).
    commit_error: Mutex<Option<ErrorCode>>,
}

impl Node {
    fn new(group: &str, role: BrokerRole, epoch: u64) -> Node {
        Node {
            group: group.into(),
            role,
            epoch,
            master_addr: Mutex::new(String::new()),
            store: Arc::new(Store::default()),
            stored: AtomicU32::new(0),
            refused: AtomicU32::new(0),
            pulls: AtomicU32::new(0),
            commits: AtomicU32::new(0),
            prepares: AtomicU32::new(0),
            ends: AtomicU32::new(0),
            tx_producers: AtomicU32::new(0),
            send_status: Mutex::new(SendStatus::SendOk),
            commit_error: Mutex::new(None),
        }
    }

    fn not_master(&self) -> WireError {
        self.refused.fetch_add(1, Ordering::SeqCst);
        WireError::new(
            ErrorCode::NotMaster,
            format!(
                "this broker is a slave: the master of broker group '{}' is at {}",
                self.group,
                lock(&self.master_addr)
            ),
        )
    }

    fn read(&self, req: &txmq_protocol::PullRequest) -> PullResult {
        let queues = lock(&self.store.queues);
        // Only TOPIC has messages (a push consumer's retry topic has none).
        let q = queues
            .get(&req.queue)
            .filter(|_| req.topic == TOPIC)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let len = q.len() as u64;
        // As the real broker: a reader last answered by another run whose
        // last message is not where it read it is sent back to it.
        if let Some((at, id)) = req.after {
            if req.epoch != 0 && req.epoch != self.epoch && at < req.offset {
                let here = q.get(at as usize).map(|m| m.message.msg_id);
                if here != Some(id) {
                    return PullResult {
                        messages: Vec::new(),
                        next_offset: at,
                        min_offset: 0,
                        max_offset: len,
                        epoch: self.epoch,
                        topic_generation: 0,
                    };
                }
            }
        }
        let start = req.offset.min(len) as usize;
        let end = (start + req.max_messages as usize).min(q.len());
        PullResult {
            messages: q[start..end].to_vec(),
            next_offset: end as u64,
            min_offset: 0,
            max_offset: len,
            epoch: self.epoch,
            topic_generation: 0,
        }
    }

    async fn pull(self: Arc<Self>, req: txmq_protocol::PullRequest) -> PullResult {
        self.pulls.fetch_add(1, Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + Duration::from_millis(req.max_wait_ms);
        loop {
            let notified = self.store.appended.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let r = self.read(&req);
            if !r.messages.is_empty() || r.next_offset != req.offset {
                return r;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.read(&req);
            }
        }
    }

    async fn handle(self: Arc<Self>, request: Request) -> Result<Response, WireError> {
        let slave = self.role == BrokerRole::Slave;
        Ok(match request {
            Request::Send(_)
            | Request::CreateTopic(_)
            | Request::PrepareTransaction(_)
            | Request::EndTransaction(_)
                if slave =>
            {
                return Err(self.not_master());
            }
            Request::PrepareTransaction(_) => {
                let tx_id = u64::from(self.prepares.fetch_add(1, Ordering::SeqCst)) + 1;
                Response::PrepareTransaction(Prepared {
                    duplicate: false,
                    tx_id,
                    status: *lock(&self.send_status),
                })
            }
            Request::EndTransaction(e) => {
                self.ends.fetch_add(1, Ordering::SeqCst);
                Response::EndTransaction(Ended::new(
                    match e.action {
                        TxAction::Commit => TxState::Committed,
                        TxAction::Rollback => TxState::RolledBack,
                    },
                    false,
                    SendStatus::SendOk,
                ))
            }
            Request::Send(s) => {
                let first_offset = self.store.len(s.queue) as u64;
                let msg_ids = s.messages.iter().map(|m| m.msg_id).collect();
                for m in s.messages {
                    self.store.push(s.queue, m);
                    self.stored.fetch_add(1, Ordering::SeqCst);
                }
                Response::Send(SendResult {
                    duplicate: false,
                    status: *lock(&self.send_status),
                    queue: s.queue,
                    first_offset,
                    msg_ids,
                })
            }
            Request::Pull(p) => Response::Pull(self.clone().pull(*p).await),
            Request::QueryOffset(q) if q.topic != TOPIC => Response::QueryOffset(QueueOffsets {
                committed: None,
                min_offset: 0,
                max_offset: 0,
                since_offset: None,
                topic_generation: 0,
            }),
            Request::QueryOffset(q) => Response::QueryOffset(QueueOffsets {
                committed: lock(&self.store.offsets).get(&(q.group, q.queue)).copied(),
                min_offset: 0,
                max_offset: self.store.len(q.queue) as u64,
                since_offset: None,
                topic_generation: 0,
            }),
            Request::CommitOffset(c) if c.topic != TOPIC => Response::CommitOffset(Done {}),
            Request::CommitOffset(c) => {
                self.commits.fetch_add(1, Ordering::SeqCst);
                lock(&self.store.offsets).insert((c.group, c.queue), c.offset);
                if let Some(code) = *lock(&self.commit_error) {
                    return Err(WireError::new(code, "stored on the master only"));
                }
                Response::CommitOffset(Done {})
            }
            Request::Heartbeat(h) => Response::Heartbeat(HeartbeatOk {
                assigned: h
                    .subscriptions
                    .iter()
                    .map(|s| QueueRef {
                        topic: s.topic.clone(),
                        queue: 0,
                    })
                    .collect(),
                expiry_ms: 0,
                expired: false,
            }),
            Request::LeaveGroup(_) => Response::LeaveGroup(Done {}),
            other => {
                return Err(WireError::new(ErrorCode::UnsupportedRequest, other.kind()));
            }
        })
    }
}

struct NodeService(Arc<Node>);

impl Service for NodeService {
    fn hello(&self, _conn: &Connection, hello: &Hello) -> Result<HelloOk, WireError> {
        if hello.role == Role::TransactionProducer {
            self.0.tx_producers.fetch_add(1, Ordering::SeqCst);
        }
        Ok(HelloOk {
            version: PROTOCOL_VERSION,
            server: self.0.group.clone(),
            challenge: None,
        })
    }

    fn call(&self, _conn: &Connection, request: Request) -> BoxFuture<Result<Response, WireError>> {
        Box::pin(self.0.clone().handle(request))
    }
}

/// A running fake broker; stops (closing its connections) when dropped.
struct Running {
    node: Arc<Node>,
    addr: String,
    stop: CancellationToken,
}

impl Running {
    fn kill(&self) {
        self.stop.cancel();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn serve(node: Arc<Node>, listener: TcpListener) -> TestResult<Running> {
    let addr = listener.local_addr()?.to_string();
    let stop = CancellationToken::new();
    tokio::spawn(txmq_remoting::server::serve(
        listener,
        Arc::new(NodeService(node.clone())),
        ConnectionConfig::default(),
        stop.clone(),
    ));
    Ok(Running { node, addr, stop })
}

async fn run_node(node: Node) -> TestResult<Running> {
    serve(Arc::new(node), TcpListener::bind("127.0.0.1:0").await?).await
}

/// One broker group as the nameserver lists it.
#[derive(Clone)]
struct GroupRoute {
    name: String,
    master: String,
    slaves: Vec<String>,
}

/// The fake nameserver.
#[derive(Default)]
struct Names {
    groups: Mutex<Vec<GroupRoute>>,
    queues: u32,
    /// The next this many route answers name this address as the master of
    /// every group (a route gone stale: it names a slave).
    stale: Mutex<Option<(u32, String)>>,
}

impl Names {
    fn set_master(&self, group: &str, master: &str) {
        for g in lock(&self.groups).iter_mut() {
            if g.name == group {
                g.master = master.to_string();
            }
        }
    }

    fn route(&self, topic: &str) -> TopicRoute {
        let mut stale = lock(&self.stale);
        let stale_addr = match stale.as_mut() {
            Some((n, addr)) if *n > 0 => {
                *n -= 1;
                Some(addr.clone())
            }
            _ => None,
        };
        TopicRoute {
            topic: topic.into(),
            brokers: lock(&self.groups)
                .iter()
                .map(|g| BrokerQueues {
                    epoch: Default::default(),
                    broker_name: g.name.clone(),
                    addr: stale_addr.clone().unwrap_or_else(|| g.master.clone()),
                    slaves: g.slaves.clone(),
                    queues: self.queues,
                    perm: PERM_READ_WRITE,
                })
                .collect(),
        }
    }

    fn cluster(&self) -> ClusterInfo {
        let mut brokers = Vec::new();
        for g in lock(&self.groups).iter() {
            let info = |addr: &str, role| BrokerInfo {
                epoch: Default::default(),
                cluster: "c".into(),
                broker_name: g.name.clone(),
                addr: addr.into(),
                last_heartbeat_ms_ago: 1,
                topic_count: 1,
                role,
            };
            if !g.master.is_empty() {
                brokers.push(info(&g.master, BrokerRole::Master));
            }
            for s in &g.slaves {
                brokers.push(info(s, BrokerRole::Slave));
            }
        }
        ClusterInfo { brokers }
    }
}

struct NamesService(Arc<Names>);

impl Service for NamesService {
    fn call(&self, _conn: &Connection, request: Request) -> BoxFuture<Result<Response, WireError>> {
        let answer = match request {
            Request::GetRoute(r) => Ok(Response::GetRoute(self.0.route(&r.topic))),
            Request::GetCluster(_) => Ok(Response::GetCluster(self.0.cluster())),
            other => Err(WireError::new(ErrorCode::UnsupportedRequest, other.kind())),
        };
        Box::pin(async move { answer })
    }
}

struct Nameserver {
    names: Arc<Names>,
    addr: String,
    _stop: tokio_util::sync::DropGuard,
}

async fn nameserver(groups: Vec<GroupRoute>, queues: u32) -> TestResult<Nameserver> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    let names = Arc::new(Names {
        groups: Mutex::new(groups),
        queues,
        stale: Mutex::new(None),
    });
    let stop = CancellationToken::new();
    tokio::spawn(txmq_remoting::server::serve(
        listener,
        Arc::new(NamesService(names.clone())),
        ConnectionConfig::default(),
        stop.clone(),
    ));
    Ok(Nameserver {
        names,
        addr,
        _stop: stop.drop_guard(),
    })
}

/// A master and one slave of group `name`, the slave knowing the master.
async fn group(name: &str) -> TestResult<(Running, Running)> {
    let master = run_node(Node::new(name, BrokerRole::Master, 1)).await?;
    let slave = run_node(Node::new(name, BrokerRole::Slave, 2)).await?;
    *lock(&slave.node.master_addr) = master.addr.clone();
    Ok((master, slave))
}

fn route_of(name: &str, master: &str, slaves: &[&str]) -> GroupRoute {
    GroupRoute {
        name: name.into(),
        master: master.into(),
        slaves: slaves.iter().map(|s| s.to_string()).collect(),
    }
}

async fn poll_until(
    consumer: &mut PullConsumer,
    n: usize,
    within: Duration,
) -> TestResult<Vec<txmq::ReceivedMessage>> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    while got.len() < n && tokio::time::Instant::now() < deadline {
        got.extend(consumer.poll(Duration::from_millis(100)).await?);
    }
    Ok(got)
}

#[tokio::test]
async fn a_slaves_not_master_is_followed_to_the_master_which_alone_stores() -> TestResult {
    let (master, slave) = group("broker-a").await?;
    let ns = nameserver(vec![route_of("broker-a", &master.addr, &[&slave.addr])], 2).await?;
    // The producer's first route is stale: it names the slave as the master.
    *lock(&ns.names.stale) = Some((1, slave.addr.clone()));
    let producer = Producer::builder()
        .nameserver(&ns.addr)
        .retries(1)
        .build()
        .await?;
    let id = txmq::MsgId::generate();
    let m = Message::new(TOPIC, "one").with_msg_id(id);
    let receipt = producer.send(m).await?;
    assert_eq!(receipt.msg_id, id);
    assert_eq!(receipt.broker_name, "broker-a");
    assert_eq!(slave.node.refused.load(Ordering::SeqCst), 1);
    assert_eq!(slave.node.stored.load(Ordering::SeqCst), 0);
    assert_eq!(
        master.node.stored.load(Ordering::SeqCst),
        1,
        "stored once, on the master"
    );

    // A batch follows it too, stored whole on the master.
    *lock(&ns.names.stale) = Some((1, slave.addr.clone()));
    producer.close().await.unwrap();
    let producer = Producer::builder()
        .nameserver(&ns.addr)
        .retries(1)
        .build()
        .await?;
    let receipts = producer
        .send_batch(
            (0..3)
                .map(|i| Message::new(TOPIC, format!("b{i}")))
                .collect(),
        )
        .await?;
    assert_eq!(receipts.len(), 3);
    assert_eq!(slave.node.refused.load(Ordering::SeqCst), 2);
    assert_eq!(slave.node.stored.load(Ordering::SeqCst), 0);
    assert_eq!(master.node.stored.load(Ordering::SeqCst), 4);

    // A master's replication statuses reach the caller as they are.
    for status in [SendStatus::FlushSlaveTimeout, SendStatus::SlaveNotAvailable] {
        *lock(&master.node.send_status) = status;
        let r = producer.send(Message::new(TOPIC, "s")).await?;
        assert_eq!(r.status, status);
    }
    Ok(())
}

#[tokio::test]
async fn a_group_without_a_live_master_is_skipped_for_sends() -> TestResult {
    let (master_a, slave_a) = group("broker-a").await?;
    let (master_b, slave_b) = group("broker-b").await?;
    // broker-a's master is gone: the route names only its slave.
    let ns = nameserver(
        vec![
            route_of("broker-a", "", &[&slave_a.addr]),
            route_of("broker-b", &master_b.addr, &[&slave_b.addr]),
        ],
        2,
    )
    .await?;
    // No retries: a send that picked broker-a would fail.
    let producer = Producer::builder()
        .nameserver(&ns.addr)
        .retries(0)
        .build()
        .await?;
    for i in 0..20 {
        let r = producer.send(Message::new(TOPIC, format!("{i}"))).await?;
        assert_eq!(r.broker_name, "broker-b");
    }
    assert_eq!(master_b.node.stored.load(Ordering::SeqCst), 20);
    assert_eq!(slave_a.node.refused.load(Ordering::SeqCst), 0);
    assert_eq!(master_a.node.stored.load(Ordering::SeqCst), 0);
    let queues = producer.writable_queues(TOPIC).await?;
    assert!(queues.iter().all(|q| q.broker_name == "broker-b"));

    // No group has a master: a clear error that says only slaves are live.
    ns.names.set_master("broker-b", "");
    producer.close().await.unwrap();
    let producer = Producer::builder()
        .nameserver(&ns.addr)
        .retries(0)
        .build()
        .await?;
    let Err(e) = producer.send(Message::new(TOPIC, "x")).await else {
        panic!("no master is live: the send must fail");
    };
    assert_eq!(e.code(), Some(ErrorCode::NoRoute));
    assert!(
        matches!(&e, txmq::Error::NoMaster { brokers, .. } if brokers == &["broker-a", "broker-b"]),
        "{e:?}"
    );
    assert!(e.to_string().contains("only slaves"), "{e}");
    assert_eq!(slave_b.node.refused.load(Ordering::SeqCst), 0);
    Ok(())
}

#[tokio::test]
async fn a_consumer_reads_from_the_slave_while_the_master_is_gone_then_from_the_master_again(
) -> TestResult {
    let (master, slave) = group("broker-a").await?;
    let master_port = master.addr.clone();
    let ns = nameserver(vec![route_of("broker-a", &master.addr, &[&slave.addr])], 1).await?;
    let producer = Producer::builder().nameserver(&ns.addr).build().await?;
    for i in 0..10 {
        producer.send(Message::new(TOPIC, format!("m{i}"))).await?;
    }
    producer.close().await.unwrap();
    // The slave lags: it holds 0..8 of the master's 10.
    slave.node.store.replicate_from(&master.node.store, 0, 8);

    let mut consumer = PullConsumer::builder()
        .nameserver(&ns.addr)
        .group("g")
        .topic(TOPIC)
        .from(ConsumeFrom::First)
        .max_wait(Duration::from_millis(200))
        .route_refresh_interval(Duration::from_millis(100))
        .build()
        .await?;
    // Three handed out and committed, then the rest handed out only.
    let mut seen: Vec<u64> = Vec::new();
    while seen.len() < 3 {
        let got = consumer
            .poll_at_most(3 - seen.len(), Duration::from_secs(5))
            .await?;
        assert!(!got.is_empty(), "the first messages must come");
        seen.extend(got.iter().map(|m| m.queue_offset()));
    }
    consumer.commit().await?;
    let rest = poll_until(&mut consumer, 7, Duration::from_secs(5)).await?;
    seen.extend(rest.iter().map(|m| m.queue_offset()));
    assert_eq!(seen, (0..10).collect::<Vec<_>>());
    assert_eq!(
        lock(&master.node.store.offsets).get(&("g".to_string(), 0)),
        Some(&3),
        "the group's committed offset is below what was read"
    );

    // The master dies, and the nameserver drops it from the route.
    master.kill();
    ns.names.set_master("broker-a", "");
    let pulls_before = slave.node.pulls.load(Ordering::SeqCst);
    // Nothing comes while the slave lags behind the reader: no rewind to
    // the committed offset (that would deliver 0..8 again).
    let early = poll_until(&mut consumer, 1, Duration::from_millis(800)).await?;
    assert!(
        early.is_empty(),
        "delivered again: {:?}",
        early.iter().map(|m| m.queue_offset()).collect::<Vec<_>>()
    );
    assert!(
        slave.node.pulls.load(Ordering::SeqCst) > pulls_before,
        "the consumer must pull from the slave"
    );
    // The slave catches up with what the master had, and more (messages
    // the master stored before it died, say).
    slave.node.store.replicate_from(&master.node.store, 0, 10);
    for i in 10..13 {
        slave
            .node
            .store
            .push(0, txmq::WireMessage::new(TOPIC, format!("m{i}")));
    }
    let from_slave = poll_until(&mut consumer, 3, Duration::from_secs(5)).await?;
    let offsets: Vec<u64> = from_slave.iter().map(|m| m.queue_offset()).collect();
    assert_eq!(
        offsets,
        [10, 11, 12],
        "continues at its position: no rewind, no skip"
    );
    seen.extend(offsets);
    consumer.commit().await?;
    assert_eq!(
        lock(&slave.node.store.offsets).get(&("g".to_string(), 0)),
        Some(&13),
        "the commit is kept by the slave"
    );

    // The master comes back at its address with the log the slave has and
    // more; the route names it again: the consumer goes back to it.
    let back = Node::new("broker-a", BrokerRole::Master, 3);
    back.store.replicate_from(&slave.node.store, 0, 13);
    back.store.push(0, txmq::WireMessage::new(TOPIC, "m13"));
    back.store.push(0, txmq::WireMessage::new(TOPIC, "m14"));
    let master = serve(Arc::new(back), TcpListener::bind(&master_port).await?).await?;
    ns.names.set_master("broker-a", &master.addr);
    let from_master = poll_until(&mut consumer, 2, Duration::from_secs(5)).await?;
    let offsets: Vec<u64> = from_master.iter().map(|m| m.queue_offset()).collect();
    assert_eq!(offsets, [13, 14]);
    assert!(
        master.node.pulls.load(Ordering::SeqCst) > 0,
        "read from the master again"
    );
    seen.extend(offsets);
    assert!(
        poll_until(&mut consumer, 1, Duration::from_millis(300))
            .await?
            .is_empty(),
        "nothing more"
    );
    consumer.shutdown().await?;
    assert_eq!(
        lock(&master.node.store.offsets).get(&("g".to_string(), 0)),
        Some(&15),
        "the final commit goes to the master"
    );
    // Every message once, in order.
    assert_eq!(seen, (0..15).collect::<Vec<_>>());
    Ok(())
}

#[tokio::test]
async fn a_consumer_whose_master_does_not_connect_uses_the_slave_though_the_route_names_it(
) -> TestResult {
    let (master, slave) = group("broker-a").await?;
    let ns = nameserver(vec![route_of("broker-a", &master.addr, &[&slave.addr])], 1).await?;
    let producer = Producer::builder().nameserver(&ns.addr).build().await?;
    for i in 0..4 {
        producer.send(Message::new(TOPIC, format!("m{i}"))).await?;
    }
    slave.node.store.replicate_from(&master.node.store, 0, 4);
    let mut consumer = PullConsumer::builder()
        .nameserver(&ns.addr)
        .group("g")
        .topic(TOPIC)
        .max_wait(Duration::from_millis(200))
        .build()
        .await?;
    let got = poll_until(&mut consumer, 2, Duration::from_secs(5)).await?;
    let mut offsets: Vec<u64> = got.iter().map(|m| m.queue_offset()).collect();
    // The master dies; the route still names it (the nameserver has not
    // noticed yet): its connection closed and connecting fails.
    master.kill();
    slave
        .node
        .store
        .push(0, txmq::WireMessage::new(TOPIC, "m4"));
    let more = poll_until(&mut consumer, 5 - offsets.len(), Duration::from_secs(5)).await?;
    offsets.extend(more.iter().map(|m| m.queue_offset()));
    assert_eq!(offsets, [0, 1, 2, 3, 4], "nothing skipped, nothing twice");
    consumer.commit().await?;
    assert_eq!(
        lock(&slave.node.store.offsets).get(&("g".to_string(), 0)),
        Some(&5)
    );
    Ok(())
}

#[tokio::test]
async fn a_commit_stored_on_the_master_only_is_committed_again() -> TestResult {
    let (master, slave) = group("broker-a").await?;
    let ns = nameserver(vec![route_of("broker-a", &master.addr, &[&slave.addr])], 1).await?;
    let producer = Producer::builder().nameserver(&ns.addr).build().await?;
    for i in 0..3 {
        producer.send(Message::new(TOPIC, format!("m{i}"))).await?;
    }
    let mut consumer = PullConsumer::builder()
        .nameserver(&ns.addr)
        .group("g")
        .topic(TOPIC)
        .max_wait(Duration::from_millis(200))
        .build()
        .await?;
    assert_eq!(
        poll_until(&mut consumer, 3, Duration::from_secs(5))
            .await?
            .len(),
        3
    );
    let commits = master.node.commits.load(Ordering::SeqCst);
    for code in [ErrorCode::FlushSlaveTimeout, ErrorCode::SlaveNotAvailable] {
        *lock(&master.node.commit_error) = Some(code);
        // Stored on the master: not an error, but not confirmed either.
        consumer.commit().await?;
    }
    assert_eq!(master.node.commits.load(Ordering::SeqCst), commits + 2);
    assert_eq!(
        lock(&master.node.store.offsets).get(&("g".to_string(), 0)),
        Some(&3)
    );
    *lock(&master.node.commit_error) = None;
    consumer.commit().await?;
    assert_eq!(master.node.commits.load(Ordering::SeqCst), commits + 3);
    // Confirmed now: nothing more to commit.
    consumer.commit().await?;
    assert_eq!(master.node.commits.load(Ordering::SeqCst), commits + 3);
    Ok(())
}

/// Commits every local transaction, counting them.
#[derive(Default)]
struct Commits {
    executed: AtomicU32,
}

impl TransactionListener for Commits {
    async fn execute(&self, _: &Message, _: &TxContext) -> Result<TransactionState, BoxError> {
        self.executed.fetch_add(1, Ordering::SeqCst);
        Ok(TransactionState::Commit)
    }

    async fn check(&self, _: &CheckRequest) -> Result<TransactionState, BoxError> {
        Ok(TransactionState::Commit)
    }
}

#[tokio::test]
async fn a_transaction_goes_to_the_master_through_a_stale_route_and_checks_back_only_there(
) -> TestResult {
    let (master, slave) = group("broker-a").await?;
    let ns = nameserver(vec![route_of("broker-a", &master.addr, &[&slave.addr])], 1).await?;
    *lock(&ns.names.stale) = Some((1, slave.addr.clone()));
    let producer = TransactionProducer::builder()
        .nameserver(&ns.addr)
        .group("pg")
        .listener(Commits::default())
        .retries(1)
        .start()
        .await?;
    // Only the master checks back: only it is connected to for that.
    assert_eq!(producer.connected_brokers(), ["broker-a"]);
    assert_eq!(master.node.tx_producers.load(Ordering::SeqCst), 1);
    assert_eq!(slave.node.tx_producers.load(Ordering::SeqCst), 0);

    let outcome = producer
        .send_in_transaction(Message::new(TOPIC, "order"))
        .await?;
    assert_eq!(outcome.state, TransactionState::Commit);
    assert_eq!(outcome.prepare_status, SendStatus::SendOk);
    assert_eq!(outcome.ended().map(|e| e.state), Some(TxState::Committed));
    assert_eq!(slave.node.refused.load(Ordering::SeqCst), 1);
    assert_eq!(
        master.node.prepares.load(Ordering::SeqCst),
        1,
        "prepared once, on the master"
    );
    assert_eq!(master.node.ends.load(Ordering::SeqCst), 1);
    assert_eq!(producer.listener().executed.load(Ordering::SeqCst), 1);

    // A prepare stored on the master only (sync replication short of
    // slaves) is rolled back without running the local transaction.
    for status in [SendStatus::FlushSlaveTimeout, SendStatus::SlaveNotAvailable] {
        *lock(&master.node.send_status) = status;
        let outcome = producer
            .send_in_transaction(Message::new(TOPIC, "order"))
            .await?;
        assert_eq!(outcome.prepare_status, status);
        assert_eq!(outcome.state, TransactionState::Rollback);
        assert_eq!(outcome.ended().map(|e| e.state), Some(TxState::RolledBack));
    }
    assert_eq!(producer.listener().executed.load(Ordering::SeqCst), 1);
    producer.close().await.unwrap();
    Ok(())
}

#[tokio::test]
async fn a_push_consumer_reads_from_the_slave_while_the_master_is_gone() -> TestResult {
    let (master, slave) = group("broker-a").await?;
    let ns = nameserver(vec![route_of("broker-a", &master.addr, &[&slave.addr])], 1).await?;
    let producer = Producer::builder().nameserver(&ns.addr).build().await?;
    for i in 0..5 {
        producer.send(Message::new(TOPIC, format!("m{i}"))).await?;
    }
    // The slave lags: 0..3 of 5.
    slave.node.store.replicate_from(&master.node.store, 0, 3);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let handled = seen.clone();
    let consumer = txmq::PushConsumer::builder()
        .nameserver(&ns.addr)
        .group("g")
        .subscribe(TOPIC, "*")
        .max_wait(Duration::from_millis(200))
        .rebalance_interval(Duration::from_millis(100))
        .route_refresh_interval(Duration::from_millis(100))
        .commit_interval(Duration::from_millis(50))
        .start(txmq::handler_fn(move |m: &txmq::ReceivedMessage| {
            lock(&handled).push(m.queue_offset());
            async { txmq::ConsumeResult::Success }
        }))
        .await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while lock(&seen).len() < 5 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(*lock(&seen), [0, 1, 2, 3, 4]);

    master.kill();
    ns.names.set_master("broker-a", "");
    // Behind the reader, the slave delivers nothing again.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(lock(&seen).len(), 5, "no rewind: {:?}", lock(&seen));
    assert!(slave.node.pulls.load(Ordering::SeqCst) > 0);
    slave.node.store.replicate_from(&master.node.store, 0, 5);
    slave
        .node
        .store
        .push(0, txmq::WireMessage::new(TOPIC, "m5"));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while lock(&seen).len() < 6 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        *lock(&seen),
        [0, 1, 2, 3, 4, 5],
        "continues at its position"
    );
    consumer.shutdown().await?;
    assert_eq!(
        lock(&slave.node.store.offsets).get(&("g".to_string(), 0)),
        Some(&6),
        "the final commit is kept by the slave"
    );
    Ok(())
}
