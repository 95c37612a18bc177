//! The client against an in-memory fake that answers as both nameserver and
//! broker, over real connections. It checks the client's own logic (queue
//! choice, retries, offsets, long polls, route pick-up); the end-to-end
//! tests against the real servers live in `tests/`.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use txmq::{Admin, ConsumeFrom, ErrorCode, Message, Producer, PullConsumer, PERM_READ_WRITE};
use txmq_protocol::{
    BrokerInfo, BrokerQueues, BrokerRole, ClusterInfo, Done, PullResult, QueueOffsets, Request,
    Response, SendResult, SendStatus, StoredMessage, TopicConfig, TopicList, TopicOnBroker,
    TopicRoute, WireError,
};
use txmq_remoting::connection_types::BoxFuture;
use txmq_remoting::{Connection, ConnectionConfig, Service};

type TestResult<T = ()> = std::result::Result<T, Box<dyn std::error::Error>>;

#[derive(Default)]
struct State {
    addr: String,
    auto_create: bool,
    /// Brokers listed in every route besides this one (e.g. dead ones).
    extra_brokers: Vec<(String, String)>,
    topics: Mutex<HashMap<String, u32>>,
    queues: Mutex<HashMap<(String, u32), Vec<StoredMessage>>>,
    offsets: Mutex<HashMap<(String, String, u32), u64>>,
    /// Sends to refuse with STORE_UNAVAILABLE before accepting again.
    fail_sends: AtomicU32,
    sends: AtomicU32,
    appended: Notify,
}

const NAME: &str = "fake-a";

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl State {
    fn route(&self, topic: &str) -> Result<TopicRoute, WireError> {
        let Some(&queues) = lock(&self.topics).get(topic) else {
            return Err(WireError::new(
                ErrorCode::NoRoute,
                format!("no route for {topic}"),
            ));
        };
        let mut brokers = vec![BrokerQueues {
            epoch: Default::default(),
            broker_name: NAME.into(),
            addr: self.addr.clone(),
            slaves: Vec::new(),
            queues,
            perm: PERM_READ_WRITE,
        }];
        for (name, addr) in &self.extra_brokers {
            brokers.push(BrokerQueues {
                epoch: Default::default(),
                broker_name: name.clone(),
                addr: addr.clone(),
                slaves: Vec::new(),
                queues,
                perm: PERM_READ_WRITE,
            });
        }
        brokers.sort_by(|a, b| a.broker_name.cmp(&b.broker_name));
        Ok(TopicRoute {
            topic: topic.into(),
            brokers,
        })
    }

    fn send(&self, req: txmq_protocol::SendRequest) -> Result<SendResult, WireError> {
        self.sends.fetch_add(1, Ordering::SeqCst);
        if self
            .fail_sends
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(WireError::new(
                ErrorCode::StoreUnavailable,
                "injected failure",
            ));
        }
        let topic = req.messages[0].topic.clone();
        {
            let mut topics = lock(&self.topics);
            if !topics.contains_key(&topic) {
                if !self.auto_create {
                    return Err(WireError::new(
                        ErrorCode::UnknownTopic,
                        format!("topic {topic:?} does not exist"),
                    ));
                }
                topics.insert(topic.clone(), 4);
            }
            if req.queue >= topics[&topic] {
                return Err(WireError::new(ErrorCode::UnknownQueue, "no such queue"));
            }
        }
        let mut queues = lock(&self.queues);
        let q = queues.entry((topic, req.queue)).or_default();
        let first_offset = q.len() as u64;
        let msg_ids = req.messages.iter().map(|m| m.msg_id).collect();
        for message in req.messages {
            let queue_offset = q.len() as u64;
            q.push(StoredMessage {
                message,
                queue: req.queue,
                queue_offset,
                log_offset: 0,
                store_timestamp: 1,
            });
        }
        drop(queues);
        self.appended.notify_waiters();
        Ok(SendResult {
            duplicate: false,
            status: SendStatus::SendOk,
            queue: req.queue,
            first_offset,
            msg_ids,
        })
    }

    fn read(&self, req: &txmq_protocol::PullRequest) -> PullResult {
        let queues = lock(&self.queues);
        let q = queues
            .get(&(req.topic.clone(), req.queue))
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let start = (req.offset as usize).min(q.len());
        let end = (start + req.max_messages as usize).min(q.len());
        PullResult {
            messages: q[start..end].to_vec(),
            next_offset: end as u64,
            min_offset: 0,
            max_offset: q.len() as u64,
            epoch: 1,
            topic_generation: 0,
        }
    }

    async fn pull(self: Arc<Self>, req: txmq_protocol::PullRequest) -> PullResult {
        let deadline = tokio::time::Instant::now() + Duration::from_millis(req.max_wait_ms);
        loop {
            let notified = self.appended.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let r = self.read(&req);
            if !r.messages.is_empty() {
                return r;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.read(&req);
            }
        }
    }

    async fn handle(self: Arc<Self>, request: Request) -> Result<Response, WireError> {
        Ok(match request {
            Request::GetRoute(r) => Response::GetRoute(self.route(&r.topic)?),
            Request::GetCluster(_) => Response::GetCluster(ClusterInfo {
                brokers: vec![BrokerInfo {
                    epoch: Default::default(),
                    cluster: "c".into(),
                    broker_name: NAME.into(),
                    addr: self.addr.clone(),
                    last_heartbeat_ms_ago: 5,
                    topic_count: lock(&self.topics).len() as u32,
                    role: BrokerRole::Master,
                }],
            }),
            Request::ListTopics(_) => Response::ListTopics(TopicList {
                topics: lock(&self.topics)
                    .iter()
                    .map(|(name, &queues)| TopicOnBroker {
                        broker_name: NAME.into(),
                        config: TopicConfig {
                            name: name.clone(),
                            queues,
                            perm: PERM_READ_WRITE,
                        },
                    })
                    .collect(),
            }),
            Request::CreateTopic(c) => {
                if c.queues == 0 {
                    return Err(WireError::new(
                        ErrorCode::BadArgument,
                        "queues must be 1 to 1024",
                    ));
                }
                lock(&self.topics).insert(c.topic.clone(), c.queues);
                Response::CreateTopic(TopicConfig {
                    name: c.topic,
                    queues: c.queues,
                    perm: c.perm,
                })
            }
            Request::Send(s) => Response::Send(self.send(s)?),
            Request::Pull(p) => Response::Pull(self.clone().pull(*p).await),
            Request::CommitOffset(c) => {
                lock(&self.offsets).insert((c.group, c.topic, c.queue), c.offset);
                Response::CommitOffset(Done {})
            }
            Request::QueryOffset(q) => {
                let committed = lock(&self.offsets)
                    .get(&(q.group, q.topic.clone(), q.queue))
                    .copied();
                let max = lock(&self.queues)
                    .get(&(q.topic, q.queue))
                    .map_or(0, |v| v.len() as u64);
                Response::QueryOffset(QueueOffsets {
                    committed,
                    min_offset: 0,
                    max_offset: max,
                    since_offset: None,
                    topic_generation: 0,
                })
            }
            other => {
                return Err(WireError::new(ErrorCode::UnsupportedRequest, other.kind()));
            }
        })
    }
}

struct Fake(Arc<State>);

impl Service for Fake {
    fn call(&self, _conn: &Connection, request: Request) -> BoxFuture<Result<Response, WireError>> {
        Box::pin(self.0.clone().handle(request))
    }
}

struct Cluster {
    state: Arc<State>,
    addr: String,
    stop: CancellationToken,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn start(configure: impl FnOnce(&mut State)) -> TestResult<Cluster> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    let mut state = State {
        addr: addr.clone(),
        auto_create: true,
        ..State::default()
    };
    configure(&mut state);
    let state = Arc::new(state);
    let stop = CancellationToken::new();
    tokio::spawn(txmq_remoting::server::serve(
        listener,
        Arc::new(Fake(state.clone())),
        ConnectionConfig::default(),
        stop.clone(),
    ));
    Ok(Cluster { state, addr, stop })
}

async fn dead_addr() -> TestResult<String> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    Ok(l.local_addr()?.to_string())
}

async fn consume_all(
    consumer: &mut PullConsumer,
    n: usize,
) -> TestResult<Vec<txmq::ReceivedMessage>> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while got.len() < n && tokio::time::Instant::now() < deadline {
        got.extend(consumer.poll(Duration::from_millis(200)).await?);
    }
    Ok(got)
}

#[tokio::test]
async fn concurrent_sends_are_consumed_once_in_queue_order_and_offsets_persist() -> TestResult {
    let c = start(|_| {}).await?;
    let admin = Admin::connect([c.addr.as_str()]).await?;
    admin
        .create_topic("orders", 3, PERM_READ_WRITE, None)
        .await?;

    let producer = Producer::builder()
        .nameserver(&c.addr)
        .group("pg")
        .build()
        .await?;
    let sends = (0..90)
        .map(|i| producer.send(Message::new("orders", format!("m{i}")).with_key(format!("k{i}"))));
    let receipts = futures_util::future::try_join_all(sends).await?;
    // Round robin: 30 per queue.
    for q in 0..3 {
        assert_eq!(receipts.iter().filter(|r| r.queue == q).count(), 30);
    }

    let mut consumer = PullConsumer::builder()
        .nameserver(&c.addr)
        .group("g1")
        .topic("orders")
        .max_wait(Duration::from_millis(300))
        .build()
        .await?;
    let got = consume_all(&mut consumer, 90).await?;
    assert_eq!(got.len(), 90);
    let ids: HashSet<_> = got.iter().map(|m| m.msg_id()).collect();
    let sent: HashSet<_> = receipts.iter().map(|r| r.msg_id).collect();
    assert_eq!(ids, sent, "every message exactly once");
    for q in 0..3 {
        let offsets: Vec<u64> = got
            .iter()
            .filter(|m| m.queue() == q)
            .map(|m| m.queue_offset())
            .collect();
        assert_eq!(offsets, (0..30).collect::<Vec<_>>());
    }
    assert!(got.iter().all(|m| m.broker_name == NAME));
    consumer.shutdown().await?;

    // The group resumes after what it committed; another group starts over.
    producer.send(Message::new("orders", "late")).await?;
    let mut again = PullConsumer::builder()
        .nameserver(&c.addr)
        .group("g1")
        .topic("orders")
        .build()
        .await?;
    let more = consume_all(&mut again, 1).await?;
    assert_eq!(more.len(), 1);
    assert_eq!(&more[0].body()[..], b"late");
    assert!(again.poll(Duration::from_millis(300)).await?.is_empty());
    again.shutdown().await?;

    let mut other = PullConsumer::builder()
        .nameserver(&c.addr)
        .group("g2")
        .topic("orders")
        .build()
        .await?;
    assert_eq!(consume_all(&mut other, 91).await?.len(), 91);
    Ok(())
}

#[tokio::test]
async fn uncommitted_messages_are_delivered_again() -> TestResult {
    let c = start(|_| {}).await?;
    let producer = Producer::builder().nameserver(&c.addr).build().await?;
    producer
        .send_batch((0..5).map(|i| Message::new("t", format!("{i}"))).collect())
        .await?;

    let mut first = PullConsumer::builder()
        .nameserver(&c.addr)
        .group("g")
        .topic("t")
        .build()
        .await?;
    let got = first.poll_at_most(2, Duration::from_secs(5)).await?;
    assert_eq!(got.len(), 2);
    first.commit().await?;
    let rest = first.poll_at_most(10, Duration::from_secs(5)).await?;
    assert_eq!(rest.len(), 3);
    drop(first); // crash: the last three were never committed

    let mut second = PullConsumer::builder()
        .nameserver(&c.addr)
        .group("g")
        .topic("t")
        .build()
        .await?;
    let again = consume_all(&mut second, 3).await?;
    let offsets: Vec<u64> = again.iter().map(|m| m.queue_offset()).collect();
    assert_eq!(offsets, [2, 3, 4]);
    Ok(())
}

#[tokio::test]
async fn ordered_sends_keep_a_key_on_one_queue() -> TestResult {
    let c = start(|_| {}).await?;
    Admin::connect([&c.addr])
        .await?
        .create_topic("o", 8, PERM_READ_WRITE, None)
        .await?;
    let producer = Producer::builder().nameserver(&c.addr).build().await?;
    for key in ["alice", "bob", "carol"] {
        let mut queue = None;
        let mut last_offset = None;
        for i in 0..5 {
            let r = producer
                .send_ordered(Message::new("o", format!("{key}-{i}")), key)
                .await?;
            assert!(queue.is_none_or(|q| q == r.queue));
            assert!(last_offset.is_none_or(|o| r.queue_offset > o));
            queue = Some(r.queue);
            last_offset = Some(r.queue_offset);
        }
    }
    let r = producer
        .send_to_queue(Message::new("o", "x"), NAME, 5)
        .await?;
    assert_eq!(r.queue, 5);
    let missing = producer
        .send_to_queue(Message::new("o", "x"), NAME, 9)
        .await;
    assert!(matches!(missing, Err(txmq::Error::BadArgument(_))));
    Ok(())
}

#[tokio::test]
async fn unknown_topics_are_auto_created_or_refused_with_the_broker_code() -> TestResult {
    let c = start(|_| {}).await?;
    let producer = Producer::builder().nameserver(&c.addr).build().await?;
    let r = producer.send(Message::new("fresh", "x")).await?;
    assert_eq!(r.queue_offset, 0);

    let strict = start(|s| s.auto_create = false).await?;
    let producer = Producer::builder()
        .nameserver(&strict.addr)
        .retries(1)
        .build()
        .await?;
    let e = producer.send(Message::new("nope", "x")).await;
    let Err(e) = e else {
        panic!("a send to an unknown topic must fail")
    };
    assert_eq!(e.code(), Some(ErrorCode::UnknownTopic));
    Ok(())
}

#[tokio::test]
async fn a_failed_send_is_retried_with_the_same_msg_id() -> TestResult {
    let c = start(|s| s.fail_sends = AtomicU32::new(2)).await?;
    let producer = Producer::builder().nameserver(&c.addr).build().await?;
    let id = txmq::MsgId::generate();
    let m = Message::new("t", "x").with_msg_id(id);
    let r = producer.send(m).await?;
    assert_eq!(r.msg_id, id);
    assert_eq!(c.state.sends.load(Ordering::SeqCst), 3);

    c.state.fail_sends.store(5, Ordering::SeqCst);
    let e = producer.send(Message::new("t", "y")).await;
    assert!(matches!(&e, Err(e) if e.code() == Some(ErrorCode::StoreUnavailable)));
    Ok(())
}

#[tokio::test]
async fn sends_avoid_a_dead_broker() -> TestResult {
    let dead = dead_addr().await?;
    let c = start(|s| s.extra_brokers = vec![("fake-b".into(), dead)]).await?;
    Admin::connect([&c.addr])
        .await?
        .create_topic("t", 2, PERM_READ_WRITE, Some(NAME))
        .await?;
    let producer = Producer::builder()
        .nameserver(&c.addr)
        .retries(1)
        .build()
        .await?;
    for i in 0..20 {
        let r = producer.send(Message::new("t", format!("{i}"))).await?;
        assert_eq!(r.broker_name, NAME);
    }
    Ok(())
}

#[tokio::test]
async fn consume_from_last_skips_what_was_stored_before() -> TestResult {
    let c = start(|_| {}).await?;
    let producer = Producer::builder().nameserver(&c.addr).build().await?;
    producer.send(Message::new("t", "old")).await?;
    let mut consumer = PullConsumer::builder()
        .nameserver(&c.addr)
        .group("g")
        .topic("t")
        .from(ConsumeFrom::Last)
        .build()
        .await?;
    producer.send(Message::new("t", "new")).await?;
    let got = consume_all(&mut consumer, 1).await?;
    assert_eq!(got.len(), 1);
    assert_eq!(&got[0].body()[..], b"new");
    Ok(())
}

#[tokio::test]
async fn a_consumer_waits_for_a_topic_that_does_not_exist_yet() -> TestResult {
    let c = start(|_| {}).await?;
    let mut consumer = PullConsumer::builder()
        .nameserver(&c.addr)
        .group("g")
        .topic("later")
        .route_refresh_interval(Duration::from_millis(100))
        .build()
        .await?;
    assert!(consumer.queues().is_empty());
    let producer = Producer::builder().nameserver(&c.addr).build().await?;
    producer.send(Message::new("later", "hello")).await?;
    let got = consume_all(&mut consumer, 1).await?;
    assert_eq!(got.len(), 1);
    assert_eq!(consumer.queues().len(), 4);
    Ok(())
}

#[tokio::test]
async fn admin_reports_topics_routes_and_errors() -> TestResult {
    let c = start(|_| {}).await?;
    let admin = Admin::connect([format!("{},{}", dead_addr().await?, c.addr)]).await?;
    let created = admin.create_topic("a", 2, PERM_READ_WRITE, None).await?;
    assert_eq!(created.len(), 1);
    assert_eq!(created[0].broker_name, NAME);
    assert_eq!(admin.route("a").await?.brokers[0].queues, 2);
    assert!(matches!(
        admin.route("zzz").await,
        Err(txmq::Error::NoRoute { .. })
    ));
    assert_eq!(admin.list_topics().await?.len(), 1);
    assert_eq!(admin.cluster().await?[0].broker_name, NAME);
    let bad = admin.create_topic("b", 0, PERM_READ_WRITE, None).await;
    assert!(matches!(&bad, Err(e) if e.code() == Some(ErrorCode::BadArgument)));
    let unknown = admin
        .create_topic("b", 1, PERM_READ_WRITE, Some("nobody"))
        .await;
    assert!(matches!(unknown, Err(txmq::Error::UnknownBroker { .. })));

    assert!(Admin::connect([dead_addr().await?]).await.is_err());
    Ok(())
}
