//! The idempotent producer against fake brokers that apply the broker's
//! sequence rules (a producer id per broker group with its token; per
//! (producer id, topic, queue) contiguous sequences; the last 5 batches
//! answered again as duplicates; a gap refused with `OUT_OF_ORDER_SEQUENCE`,
//! an unknown id with `UNKNOWN_PRODUCER_ID`, nothing stored then), over real
//! connections. The fakes lose answers, handle requests out of order,
//! forget ids and fail over, and the tests check what a user sees: every
//! message stored once, on the queue of its first attempt. End-to-end
//! tests against the real broker live in `tests/`.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use txmq::{Message, Producer, PERM_READ_WRITE};
use txmq_protocol::{
    BrokerInfo, BrokerQueues, BrokerRole, ClusterInfo, ErrorCode, ProducerIdentity, ProducerStamp,
    Request, Response, SendRequest, SendResult, SendStatus, TopicRoute, WireError,
};
use txmq_remoting::connection_types::BoxFuture;
use txmq_remoting::{Connection, ConnectionConfig, Service};

type TestResult<T = ()> = std::result::Result<T, Box<dyn std::error::Error>>;

const TOPIC: &str = "orders";
const GROUP: &str = "broker-a";
const QUEUES: u32 = 4;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The producer table and the stored messages of broker group [`GROUP`]:
/// shared by its fake master and its fake new master (replicated).
#[derive(Default)]
struct Group {
    next_id: AtomicU64,
    tokens: Mutex<HashMap<u64, u64>>,
    seqs: Mutex<HashMap<(u64, String, u32), Batches>>,
    /// Stored messages: (queue, body, the stamp of their send).
    log: Mutex<Vec<(u32, String, Option<ProducerStamp>)>>,
    inits: AtomicU32,
    out_of_order: AtomicU32,
    unknown_ids: AtomicU32,
}

#[derive(Default)]
struct Batches {
    next: u64,
    last: VecDeque<(u64, u64, SendResult)>,
}

impl Group {
    fn init(&self) -> ProducerIdentity {
        self.inits.fetch_add(1, Ordering::SeqCst);
        let producer_id = 100 + self.next_id.fetch_add(1, Ordering::SeqCst);
        let token = producer_id * 31 + 7;
        lock(&self.tokens).insert(producer_id, token);
        ProducerIdentity {
            producer_id,
            token,
            expiry_ms: 60_000,
        }
    }

    fn send(&self, s: &SendRequest) -> Result<SendResult, WireError> {
        let topic = s
            .messages
            .first()
            .map(|m| m.topic.clone())
            .unwrap_or_default();
        let count = s.messages.len() as u64;
        let Some(stamp) = s.producer else {
            return Ok(self.store(s, None));
        };
        match lock(&self.tokens).get(&stamp.producer_id) {
            None => {
                self.unknown_ids.fetch_add(1, Ordering::SeqCst);
                return Err(WireError::new(ErrorCode::UnknownProducerId, "who?"));
            }
            Some(&t) if t != stamp.token => {
                return Err(WireError::new(ErrorCode::ProducerFenced, "not yours"))
            }
            Some(_) => {}
        }
        let mut seqs = lock(&self.seqs);
        let batches = seqs.entry((stamp.producer_id, topic, s.queue)).or_default();
        if let Some((_, _, first)) = batches
            .last
            .iter()
            .find(|(seq, n, _)| *seq == stamp.sequence && *n == count)
        {
            return Ok(SendResult {
                duplicate: true,
                ..first.clone()
            });
        }
        if stamp.sequence != batches.next {
            self.out_of_order.fetch_add(1, Ordering::SeqCst);
            return Err(WireError::new(
                ErrorCode::OutOfOrderSequence,
                format!("expected {}, got {}", batches.next, stamp.sequence),
            ));
        }
        let result = self.store(s, Some(stamp));
        batches.next += count;
        batches
            .last
            .push_back((stamp.sequence, count, result.clone()));
        if batches.last.len() > 5 {
            batches.last.pop_front();
        }
        Ok(result)
    }

    fn store(&self, s: &SendRequest, stamp: Option<ProducerStamp>) -> SendResult {
        let mut log = lock(&self.log);
        let first_offset = log.iter().filter(|(q, _, _)| *q == s.queue).count() as u64;
        for m in &s.messages {
            let body = String::from_utf8_lossy(&m.body).into_owned();
            log.push((s.queue, body, stamp));
        }
        SendResult {
            status: SendStatus::SendOk,
            queue: s.queue,
            first_offset,
            msg_ids: s.messages.iter().map(|m| m.msg_id).collect(),
            duplicate: false,
        }
    }

    fn bodies(&self) -> Vec<String> {
        lock(&self.log).iter().map(|(_, b, _)| b.clone()).collect()
    }
}

/// How a fake broker treats sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Master,
    /// Stores the send, then answers with this code: a master that lost
    /// its role while the send was being replicated.
    StoreThenRefuse(ErrorCode),
}

/// One fake broker of the group.
struct Broker {
    group: Arc<Group>,
    mode: Mutex<Mode>,
    /// Sends to store but never answer (the answer is lost).
    lose_answers: AtomicU32,
    /// Hold the next send with sequence 0 back this long (it is overtaken).
    hold_first: Mutex<Option<Duration>>,
    /// Every send received: (queue, stamp).
    received: Mutex<Vec<(u32, Option<ProducerStamp>)>>,
}

impl Broker {
    fn new(group: Arc<Group>) -> Broker {
        Broker {
            group,
            mode: Mutex::new(Mode::Master),
            lose_answers: AtomicU32::new(0),
            hold_first: Mutex::new(None),
            received: Mutex::new(Vec::new()),
        }
    }

    fn handle(&self, request: Request) -> Result<Response, WireError> {
        match request {
            Request::InitProducer(_) => Ok(Response::InitProducer(self.group.init())),
            Request::Send(s) => {
                lock(&self.received).push((s.queue, s.producer));
                let result = self.group.send(&s)?;
                match *lock(&self.mode) {
                    Mode::Master => Ok(Response::Send(result)),
                    Mode::StoreThenRefuse(code) => Err(WireError::new(code, "lost the role")),
                }
            }
            other => Err(WireError::new(ErrorCode::UnsupportedRequest, other.kind())),
        }
    }

    fn stamps(&self) -> Vec<(u32, Option<ProducerStamp>)> {
        lock(&self.received).clone()
    }
}

struct BrokerService(Arc<Broker>);

impl Service for BrokerService {
    fn call(&self, _conn: &Connection, request: Request) -> BoxFuture<Result<Response, WireError>> {
        let broker = self.0.clone();
        Box::pin(async move {
            if let Request::Send(s) = &request {
                if s.producer.map(|p| p.sequence) == Some(0) {
                    let hold = lock(&broker.hold_first).take();
                    if let Some(hold) = hold {
                        tokio::time::sleep(hold).await;
                    }
                }
            }
            let is_send = matches!(request, Request::Send(_));
            let lose = is_send
                && broker
                    .lose_answers
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok();
            let answer = broker.handle(request);
            if lose {
                std::future::pending::<()>().await;
            }
            answer
        })
    }
}

/// A fake nameserver naming the group's master, with [`QUEUES`] queues.
struct Names {
    master: Mutex<String>,
}

impl Service for NamesService {
    fn call(&self, _conn: &Connection, request: Request) -> BoxFuture<Result<Response, WireError>> {
        let master = lock(&self.0.master).clone();
        let answer = match request {
            Request::GetRoute(r) => Ok(Response::GetRoute(TopicRoute {
                topic: r.topic,
                brokers: vec![BrokerQueues {
                    broker_name: GROUP.into(),
                    addr: master,
                    slaves: Vec::new(),
                    queues: QUEUES,
                    perm: PERM_READ_WRITE,
                    epoch: 0,
                }],
            })),
            Request::GetCluster(_) => Ok(Response::GetCluster(ClusterInfo {
                brokers: vec![BrokerInfo {
                    cluster: "c".into(),
                    broker_name: GROUP.into(),
                    addr: master,
                    last_heartbeat_ms_ago: 0,
                    topic_count: 1,
                    role: BrokerRole::Master,
                    epoch: 0,
                }],
            })),
            other => Err(WireError::new(ErrorCode::UnsupportedRequest, other.kind())),
        };
        Box::pin(std::future::ready(answer))
    }
}

struct NamesService(Arc<Names>);

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

async fn run<T>(state: Arc<T>, service: Arc<dyn Service>) -> TestResult<Running<T>> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    let stop = CancellationToken::new();
    tokio::spawn(txmq_remoting::server::serve(
        listener,
        service,
        ConnectionConfig::default(),
        stop.clone(),
    ));
    Ok(Running { state, addr, stop })
}

async fn broker(group: &Arc<Group>) -> TestResult<Running<Broker>> {
    let b = Arc::new(Broker::new(group.clone()));
    run(b.clone(), Arc::new(BrokerService(b))).await
}

async fn nameserver(master: &str) -> TestResult<Running<Names>> {
    let n = Arc::new(Names {
        master: Mutex::new(master.to_string()),
    });
    run(n.clone(), Arc::new(NamesService(n))).await
}

async fn producer(ns: &str, retries: u32) -> TestResult<Producer> {
    Ok(Producer::builder()
        .nameserver(ns)
        .retries(retries)
        .send_timeout(Duration::from_millis(300))
        .route_refresh_interval(Duration::from_secs(60))
        .build()
        .await?)
}

#[tokio::test]
async fn a_send_whose_answer_was_lost_is_retried_with_its_stamp_on_its_queue_and_stored_once(
) -> TestResult {
    let group = Arc::new(Group::default());
    let b = broker(&group).await?;
    let ns = nameserver(&b.addr).await?;
    let producer = producer(&ns.addr, 2).await?;
    assert!(producer.idempotent(), "on by default");

    b.state.lose_answers.store(1, Ordering::SeqCst);
    let receipt = producer.send(Message::new(TOPIC, "one")).await?;
    assert!(
        receipt.duplicate,
        "the retry was answered with the first result"
    );
    assert_eq!(receipt.queue_offset, 0);
    // A batch too.
    b.state.lose_answers.store(1, Ordering::SeqCst);
    let batch = producer
        .send_batch(vec![Message::new(TOPIC, "b1"), Message::new(TOPIC, "b2")])
        .await?;
    assert!(batch.iter().all(|r| r.duplicate));
    assert_eq!(group.bodies(), ["one", "b1", "b2"], "each stored once");

    let sent = b.state.stamps();
    assert_eq!(sent.len(), 4, "two attempts each: {sent:?}");
    assert_eq!(sent[0], sent[1], "same queue, same stamp");
    assert_eq!(sent[2], sent[3], "same queue, same stamp");
    assert!(sent[0].1.is_some() && sent[2].1.is_some());
    assert_eq!(receipt.queue, sent[0].0);
    assert_eq!(batch[0].queue, sent[2].0);
    assert_eq!(group.inits.load(Ordering::SeqCst), 1);
    producer.close().await.unwrap();
    Ok(())
}

#[tokio::test]
async fn a_message_resent_by_the_caller_after_an_unknown_outcome_keeps_its_stamp() -> TestResult {
    let group = Arc::new(Group::default());
    let b = broker(&group).await?;
    let ns = nameserver(&b.addr).await?;
    // No retries of its own, like `txmq send`, which retries itself.
    let producer = producer(&ns.addr, 0).await?;

    b.state.lose_answers.store(1, Ordering::SeqCst);
    // A retry loop of the caller's own: the id is fixed before the first send.
    let message = Message::new(TOPIC, "once").with_msg_id(txmq::MsgId::generate());
    let lost = producer.send(message.clone()).await;
    assert!(lost.is_err(), "the only attempt timed out");
    // Later sends take a new id and are not held up by the unknown one.
    let other = producer.send(Message::new(TOPIC, "other")).await?;
    assert!(!other.duplicate);
    let again = producer.send(message).await?;
    assert!(again.duplicate, "recognised as stored");

    assert_eq!(group.bodies(), ["once", "other"]);
    let sent = b.state.stamps();
    assert_eq!(
        sent[0], sent[2],
        "the resend went with its first stamp and queue"
    );
    assert_ne!(
        sent[0].1.map(|s| s.producer_id),
        sent[1].1.map(|s| s.producer_id),
        "a new producer id after the unknown outcome"
    );
    producer.close().await.unwrap();
    Ok(())
}

#[tokio::test]
async fn a_send_overtaken_by_a_later_one_of_its_queue_is_not_a_gap() -> TestResult {
    let group = Arc::new(Group::default());
    let b = broker(&group).await?;
    let ns = nameserver(&b.addr).await?;
    let producer = producer(&ns.addr, 0).await?;
    // The first send of the queue (sequence 0) is held back, and the
    // second (sequence 1) reaches the broker first: OUT_OF_ORDER_SEQUENCE,
    // then accepted once the first is in.
    *lock(&b.state.hold_first) = Some(Duration::from_millis(150));
    let (first, second) = tokio::join!(
        producer.send_to_queue(Message::new(TOPIC, "x"), GROUP, 1),
        producer.send_to_queue(Message::new(TOPIC, "y"), GROUP, 1),
    );
    let (first, second) = (first?, second?);
    assert!(group.out_of_order.load(Ordering::SeqCst) >= 1, "overtaken");
    let mut offsets = [first.queue_offset, second.queue_offset];
    offsets.sort_unstable();
    assert_eq!(offsets, [0, 1]);
    assert_eq!(group.bodies().len(), 2);
    assert_eq!(group.inits.load(Ordering::SeqCst), 1, "no new id needed");
    producer.close().await.unwrap();
    Ok(())
}

#[tokio::test]
async fn an_id_the_broker_forgot_is_replaced_and_the_send_stamped_again() -> TestResult {
    let group = Arc::new(Group::default());
    let b = broker(&group).await?;
    let ns = nameserver(&b.addr).await?;
    let producer = producer(&ns.addr, 0).await?;
    producer
        .send_to_queue(Message::new(TOPIC, "a"), GROUP, 0)
        .await?;
    producer
        .send_to_queue(Message::new(TOPIC, "b"), GROUP, 0)
        .await?;
    // The id expired.
    lock(&group.tokens).clear();
    let c = producer
        .send_to_queue(Message::new(TOPIC, "c"), GROUP, 0)
        .await?;
    assert!(!c.duplicate);
    assert_eq!(group.bodies(), ["a", "b", "c"]);
    assert_eq!(group.unknown_ids.load(Ordering::SeqCst), 1);
    assert_eq!(group.inits.load(Ordering::SeqCst), 2, "a new id");
    let stamps: Vec<ProducerStamp> = lock(&group.log).iter().filter_map(|(_, _, s)| *s).collect();
    assert_eq!(stamps[1].sequence, 1);
    assert_eq!(stamps[2].sequence, 0, "numbered from 0 under the new id");
    assert_ne!(stamps[2].producer_id, stamps[1].producer_id);
    producer.close().await.unwrap();
    Ok(())
}

#[tokio::test]
async fn without_idempotence_sends_carry_no_stamp() -> TestResult {
    let group = Arc::new(Group::default());
    let b = broker(&group).await?;
    let ns = nameserver(&b.addr).await?;
    let producer = Producer::builder()
        .nameserver(&ns.addr)
        .idempotence(false)
        .build()
        .await?;
    assert!(!producer.idempotent());
    producer.send(Message::new(TOPIC, "plain")).await?;
    assert_eq!(b.state.stamps().len(), 1);
    assert_eq!(b.state.stamps()[0].1, None);
    assert_eq!(
        group.inits.load(Ordering::SeqCst),
        0,
        "no producer id asked for"
    );
    producer.close().await.unwrap();
    Ok(())
}

#[tokio::test]
async fn after_a_failover_the_retry_goes_to_the_new_master_with_its_stamp_and_queue() -> TestResult
{
    let group = Arc::new(Group::default());
    let old = broker(&group).await?;
    let new = broker(&group).await?;
    let ns = nameserver(&old.addr).await?;
    let producer = producer(&ns.addr, 2).await?;
    producer.send(Message::new(TOPIC, "before")).await?;

    // The old master stores the next send but loses its role before
    // answering; the group's new master (same table, replicated) takes over.
    *lock(&old.state.mode) = Mode::StoreThenRefuse(ErrorCode::NotMaster);
    *lock(&ns.state.master) = new.addr.clone();
    let receipt = producer.send(Message::new(TOPIC, "during")).await?;
    assert!(receipt.duplicate, "the new master knew it");
    assert_eq!(group.bodies(), ["before", "during"], "stored once");
    let at_old = old.state.stamps();
    let at_new = new.state.stamps();
    assert_eq!(at_new.len(), 1);
    assert_eq!(at_old[1], at_new[0], "same queue, same stamp");
    assert_eq!(receipt.queue, at_old[1].0);
    producer.close().await.unwrap();
    Ok(())
}
