//! Half-message transactions end to end, through an in-process nameserver
//! and broker, the client's `TransactionProducer` and the `txmq` binary:
//! a prepared message stays invisible until it is committed; ending is
//! idempotent and a contradicting end is refused with its own code;
//! unknown transactions are checked back on any live producer of the
//! group, round robin and rate limited, and parked for an operator after
//! the maximum number of checks; nothing is lost while no producer is
//! online; and the port of RocketMQ's own transaction integration test.
//!
//! Brokers run with short transaction settings (timeout 300 ms, a check
//! every 100 ms, 3 checks before parking) and tests wait with deadlines.
//! "Visible" is decided by [`visible`]: a plain message is appended to every
//! queue of the topic as a seal, and a fresh consumer group reads until all
//! seals arrived, so anything committed before is seen and nothing that
//! arrives later is mistaken for it.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::process::Output;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::txmq;
use serde_json::Value;
use tokio::sync::Semaphore;
use txmq::{
    Admin, BoxError, BoxListener, CheckRequest, Ended, Error, ErrorCode, Message, MsgId, Producer,
    PullConsumer, ReceivedMessage, TransactionList, TransactionListener, TransactionProducer,
    TransactionState, TxAction, TxContext, TxEnd, TxInfo, TxState, PERM_READ_WRITE,
};
use txmq_broker::{BrokerConfig, FlushMode, TxConfig, PROP_USER_CHECK_DELAY};
use txmq_protocol::{EndTransaction, Hello, Role, TxSource, PROTOCOL_VERSION};
use txmq_remoting::{Connection, ConnectionConfig};
use txmq_tests::{json_lines, Cluster};

const BROKER: &str = "broker-a";
/// The prefix of the plain messages [`visible`] appends as seals.
const SEAL: &str = "__seal ";

use TransactionState::{Commit, Rollback, Unknown};

// ---------------------------------------------------------------------------
// Harness: cluster, listener, observation
// ---------------------------------------------------------------------------

/// Short transaction settings: first check after 300 ms, then every 100 ms,
/// parked after 3 checks.
fn short_tx() -> TxConfig {
    // The broker's defaults for anything not set here.
    let mut tx = BrokerConfig::new("unused").transactions;
    tx.timeout = Duration::from_millis(300);
    tx.check_interval = Duration::from_millis(100);
    tx.check_max = 3;
    tx.check_rate = 1000;
    tx.check_timeout = Duration::from_secs(5);
    tx
}

/// A nameserver and broker `broker-a` with [`short_tx`] adjusted by `tweak`.
async fn cluster_with(tweak: impl FnOnce(&mut TxConfig)) -> Cluster {
    let mut tx = short_tx();
    tweak(&mut tx);
    let mut c = Cluster::nameserver_only(Duration::from_secs(30)).await;
    c.add_broker(BROKER, move |cfg| {
        cfg.flush = FlushMode::Async;
        cfg.transactions = tx;
    })
    .await;
    c
}

async fn create_topic(c: &Cluster, topic: &str, queues: u32) {
    let admin = c.admin().await;
    admin
        .create_topic(topic, queues, PERM_READ_WRITE, None)
        .await
        .unwrap_or_else(|e| panic!("create {topic}: {e}"));
    admin.close().await.unwrap();
}

/// What a [`Scripted`] listener answers: at once, or once the test releases
/// it ([`Scripted::release`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plan {
    Now(TransactionState),
    Held(TransactionState),
}

type Rule<T> = Box<dyn Fn(&T) -> Plan + Send + Sync>;

/// A check-back as the listener saw it.
#[derive(Debug, Clone)]
struct Seen {
    tx_id: u64,
    msg_id: MsgId,
    body: String,
    /// Checks the broker sent before this one.
    checks: u32,
    at: Instant,
}

#[derive(Default)]
struct Log {
    /// Transactions whose local transaction started.
    executed: Vec<u64>,
    /// Those of them now waiting for a release.
    held: Vec<u64>,
    checks: Vec<Seen>,
}

/// A listener whose answers follow rules on the message, recording what
/// it was asked.
struct Scripted {
    local: Rule<Message>,
    check: Rule<CheckRequest>,
    gate: Semaphore,
    log: Mutex<Log>,
}

impl Scripted {
    fn new(
        local: impl Fn(&Message) -> Plan + Send + Sync + 'static,
        check: impl Fn(&CheckRequest) -> Plan + Send + Sync + 'static,
    ) -> Arc<Scripted> {
        Arc::new(Scripted {
            local: Box::new(local),
            check: Box::new(check),
            gate: Semaphore::new(0),
            log: Mutex::new(Log::default()),
        })
    }

    /// Always `local` for the local transaction and `check` for check-backs.
    fn always(local: TransactionState, check: TransactionState) -> Arc<Scripted> {
        Scripted::new(move |_| Plan::Now(local), move |_| Plan::Now(check))
    }

    fn log(&self) -> std::sync::MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Lets `n` held answers go.
    fn release(&self, n: usize) {
        self.gate.add_permits(n);
    }

    fn checks(&self) -> Vec<Seen> {
        self.log().checks.clone()
    }

    fn checks_of(&self, tx_id: u64) -> Vec<Seen> {
        self.checks()
            .into_iter()
            .filter(|s| s.tx_id == tx_id)
            .collect()
    }

    fn held(&self) -> Vec<u64> {
        self.log().held.clone()
    }

    async fn wait(&self, plan: Plan, tx_id: u64) -> Result<TransactionState, BoxError> {
        match plan {
            Plan::Now(state) => Ok(state),
            Plan::Held(state) => {
                self.log().held.push(tx_id);
                self.gate.acquire().await?.forget();
                self.log().held.retain(|t| *t != tx_id);
                Ok(state)
            }
        }
    }
}

impl TransactionListener for Scripted {
    async fn execute(&self, msg: &Message, ctx: &TxContext) -> Result<TransactionState, BoxError> {
        self.log().executed.push(ctx.tx_id());
        let plan = (self.local)(msg);
        self.wait(plan, ctx.tx_id()).await
    }

    async fn check(&self, req: &CheckRequest) -> Result<TransactionState, BoxError> {
        self.log().checks.push(Seen {
            tx_id: req.tx_id(),
            msg_id: req.msg_id(),
            body: text_of(req.message().body()),
            checks: req.checks(),
            at: Instant::now(),
        });
        let plan = (self.check)(req);
        self.wait(plan, req.tx_id()).await
    }
}

async fn tx_producer(c: &Cluster, group: &str, l: &Arc<Scripted>) -> TransactionProducer<Scripted> {
    TransactionProducer::builder()
        .nameserver(&c.nameserver)
        .group(group)
        .listener_arc(l.clone())
        .check_timeout(Some(Duration::from_secs(10)))
        .start()
        .await
        .expect("transaction producer starts")
}

fn text_of(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn body(m: &ReceivedMessage) -> String {
    text_of(m.body())
}

fn bodies(ms: &[ReceivedMessage]) -> Vec<String> {
    ms.iter().map(body).collect()
}

/// Polls `probe` every 20 ms until it gives a value; fails after `within`.
async fn eventually<T>(
    what: &str,
    within: Duration,
    mut probe: impl AsyncFnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "gave up after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The broker's pending and parked transactions and counters.
async fn tx_list(admin: &Admin) -> TransactionList {
    let mut lists = admin
        .list_transactions(Some(BROKER))
        .await
        .expect("list transactions");
    assert_eq!(lists.len(), 1);
    lists.remove(0)
}

async fn tx_info(admin: &Admin, tx_id: u64) -> Option<TxInfo> {
    tx_list(admin)
        .await
        .transactions
        .into_iter()
        .find(|t| t.tx_id == tx_id)
}

/// The most instants of `sorted` that fall within any one `window`.
fn busiest(sorted: &[Instant], window: Duration) -> usize {
    let mut most = 0;
    let mut lo = 0;
    for hi in 0..sorted.len() {
        while sorted[hi] - sorted[lo] >= window {
            lo += 1;
        }
        most = most.max(hi - lo + 1);
    }
    most
}

static READERS: AtomicU64 = AtomicU64::new(0);

/// Everything a consumer can see in `topic` now, in queue order: appends a
/// seal to every queue of the topic and reads with a fresh group until all
/// seals arrived. Seals (of any earlier call too) are left out.
async fn visible(c: &Cluster, topic: &str) -> Vec<ReceivedMessage> {
    let n = READERS.fetch_add(1, Ordering::Relaxed);
    let admin = c.admin().await;
    let route = admin.route(topic).await.expect("topic has a route");
    admin.close().await.unwrap();
    let producer = c.producer().await;
    let mut seals = HashSet::new();
    for b in &route.brokers {
        for q in 0..b.queues {
            let seal = format!("{SEAL}{n} {} {q}", b.broker_name);
            producer
                .send_to_queue(Message::new(topic, seal.clone()), &b.broker_name, q)
                .await
                .expect("seal sent");
            seals.insert(seal);
        }
    }
    producer.close().await.unwrap();
    let mut consumer = PullConsumer::builder()
        .nameserver(&c.nameserver)
        .group(format!("reader-{n}"))
        .topic(topic)
        .build()
        .await
        .expect("consumer builds");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut got = Vec::new();
    while !seals.is_empty() {
        assert!(
            Instant::now() < deadline,
            "seals of {topic} never arrived: {seals:?}"
        );
        for m in consumer
            .poll(Duration::from_millis(200))
            .await
            .expect("poll")
        {
            let b = body(&m);
            if b.starts_with(SEAL) {
                seals.remove(&b);
            } else {
                got.push(m);
            }
        }
    }
    consumer.shutdown().await.expect("consumer shuts down");
    got
}

/// How often each message id is visible in `topic`.
async fn visible_ids(c: &Cluster, topic: &str) -> HashMap<MsgId, usize> {
    let mut counts = HashMap::new();
    for m in visible(c, topic).await {
        *counts.entry(m.msg_id()).or_insert(0) += 1;
    }
    counts
}

/// `EndTransaction` as a producer sends it, over a connection of its own.
async fn raw_end(c: &Cluster, tx_id: u64, action: TxAction) -> Result<Ended, txmq::RemotingError> {
    let addr = c.brokers[0].local_addr().to_string();
    let hello = Hello {
        version: PROTOCOL_VERSION,
        role: Role::Producer,
        client_id: "raw-end".into(),
        group: None,
    };
    let conn = Connection::connect(&addr, hello, None, ConnectionConfig::default())
        .await
        .expect("connect to the broker");
    let answer = conn
        .call(EndTransaction {
            producer: None,
            tx_id,
            action,
            source: TxSource::Producer,
            msg_id: None,
        })
        .await;
    conn.close();
    answer
}

/// Asserts a zero exit; returns the JSON lines printed.
#[track_caller]
fn ok_json(o: &Output) -> Vec<Value> {
    assert!(
        o.status.success(),
        "txmq failed with {}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    json_lines(&o.stdout)
}

/// The objects of `tx list --output json` that describe a transaction.
fn listed_txs(objects: &[Value]) -> Vec<&Value> {
    objects
        .iter()
        .filter(|v| v.get("tx_id").is_some())
        .collect()
}

/// The counters object of `tx list --output json` for [`BROKER`].
fn listed_counters(objects: &[Value]) -> &Value {
    objects
        .iter()
        .find(|v| v.get("counters").is_some() && v["broker"] == BROKER)
        .map(|v| &v["counters"])
        .unwrap_or_else(|| panic!("no counters line in {objects:?}"))
}

// ---------------------------------------------------------------------------
// 1. Invisible until committed
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prepared_message_is_invisible_until_committed_and_a_rolled_back_one_never_appears() {
    // No check-back interferes: the local transactions decide.
    let cluster = cluster_with(|t| t.timeout = Duration::from_secs(60)).await;
    let topic = "t1-orders";
    create_topic(&cluster, topic, 1).await;
    let admin = cluster.admin().await;
    let listener = Scripted::new(
        |m| match &m.body()[..] {
            b"to commit" => Plan::Held(Commit),
            _ => Plan::Held(Rollback),
        },
        |_| Plan::Now(Unknown),
    );
    let producer = tx_producer(&cluster, "t1-pg", &listener).await;
    // A consumer that stays subscribed the whole time.
    let mut live = PullConsumer::builder()
        .nameserver(&cluster.nameserver)
        .group("t1-live")
        .topic(topic)
        .build()
        .await
        .unwrap();

    // The local transaction is running: the message is prepared, not visible.
    let p = producer.clone();
    let sending = tokio::spawn(async move {
        p.send_in_transaction(Message::new(topic, "to commit"))
            .await
    });
    let tx_id = eventually(
        "the local transaction to run",
        Duration::from_secs(10),
        async || listener.held().first().copied(),
    )
    .await;
    let info = tx_info(&admin, tx_id).await.expect("listed as pending");
    assert_eq!(info.state, TxState::Prepared);
    assert_eq!(info.topics, [topic]);
    let until = Instant::now() + Duration::from_millis(600);
    while Instant::now() < until {
        let got = live.poll(Duration::from_millis(100)).await.unwrap();
        assert!(
            got.is_empty(),
            "prepared message delivered: {:?}",
            bodies(&got)
        );
    }
    assert!(
        visible(&cluster, topic).await.is_empty(),
        "a fresh group sees nothing"
    );

    // Commit: exactly one copy arrives, with the prepared id.
    listener.release(1);
    let outcome = sending.await.unwrap().expect("transaction committed");
    assert_eq!(outcome.tx_id, tx_id);
    assert_eq!(outcome.state, Commit);
    let ended = outcome.ended().expect("ended by the producer");
    assert_eq!((ended.state, ended.already), (TxState::Committed, false));
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.is_empty() && Instant::now() < deadline {
        let batch = live.poll(Duration::from_millis(200)).await.unwrap();
        // The seal `visible` appended above comes first.
        got.extend(batch.into_iter().filter(|m| !body(m).starts_with(SEAL)));
    }
    assert_eq!(bodies(&got), ["to commit"]);
    assert_eq!(got[0].msg_id(), outcome.msg_id);

    // Rollback: never visible, to the live group or a fresh one.
    let p = producer.clone();
    let sending = tokio::spawn(async move {
        p.send_in_transaction(Message::new(topic, "to roll back"))
            .await
    });
    let rolled = eventually(
        "the second local transaction",
        Duration::from_secs(10),
        async || listener.held().first().copied(),
    )
    .await;
    assert!(visible(&cluster, topic)
        .await
        .iter()
        .all(|m| body(m) == "to commit"));
    listener.release(1);
    let outcome = sending.await.unwrap().expect("transaction rolled back");
    assert_eq!(outcome.tx_id, rolled);
    assert_eq!(
        outcome.ended().map(|e| (e.state, e.already)),
        Some((TxState::RolledBack, false))
    );
    let seen = visible(&cluster, topic).await;
    assert_eq!(
        bodies(&seen),
        ["to commit"],
        "only the committed message, once"
    );
    let until = Instant::now() + Duration::from_millis(400);
    while Instant::now() < until {
        let more = live.poll(Duration::from_millis(100)).await.unwrap();
        assert!(
            more.iter().all(|m| body(m).starts_with(SEAL)),
            "the live group got {:?}",
            bodies(&more)
        );
    }
    let list = tx_list(&admin).await;
    assert!(list.transactions.is_empty());
    assert_eq!(
        (
            list.counters.prepared,
            list.counters.committed,
            list.counters.rolled_back
        ),
        (2, 1, 1)
    );
    assert_eq!(list.counters.checks_sent, 0);

    live.shutdown().await.unwrap();
    producer.close().await.unwrap();
    admin.close().await.unwrap();
    cluster.shutdown().await;
}

// ---------------------------------------------------------------------------
// 2. What a commit publishes
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_publishes_the_message_once_in_its_topic_and_queue_with_id_key_tag_and_properties()
{
    let cluster = cluster_with(|_| {}).await;
    let topic = "t2-payments";
    create_topic(&cluster, topic, 4).await;
    let plain = cluster.producer().await;
    let listener = Scripted::always(Commit, Unknown);
    let producer = tx_producer(&cluster, "t2-pg", &listener).await;

    // Keys that land on three different queues.
    let mut keys = Vec::new();
    let mut queues_used = BTreeSet::new();
    for i in 0.. {
        let key = format!("acct-{i}");
        if queues_used.insert(txmq::producer::shard_hash(&key) % 4) {
            keys.push(key);
        }
        if keys.len() == 3 {
            break;
        }
    }

    // Each key: a plain message, then a transactional one on the same queue
    // (by key hash): the committed copy must be right behind the plain one.
    let mut expected = Vec::new();
    for key in &keys {
        let marker = plain
            .send_ordered(Message::new(topic, format!("marker {key}")), key)
            .await
            .unwrap();
        let properties: BTreeMap<String, String> = [
            ("order".to_string(), key.clone()),
            ("currency".to_string(), "EUR".to_string()),
            ("empty".to_string(), String::new()),
        ]
        .into();
        let m = properties.iter().fold(
            Message::new(topic, format!("payment {key}"))
                .with_key(key.clone())
                .with_tag("payment"),
            |m, (k, v)| m.with_property(k, v),
        );
        let outcome = producer
            .send_in_transaction_ordered(m.clone(), key)
            .await
            .unwrap();
        assert_eq!(m.msg_id(), None, "the id is assigned at send");
        assert_eq!(outcome.ended().map(|e| e.state), Some(TxState::Committed));
        expected.push((m, outcome.msg_id, marker.queue, marker.queue_offset + 1));
    }

    let seen = visible(&cluster, topic).await;
    let txs: Vec<&ReceivedMessage> = seen
        .iter()
        .filter(|m| body(m).starts_with("payment"))
        .collect();
    assert_eq!(
        txs.len(),
        3,
        "each committed message once: {:?}",
        bodies(&seen)
    );
    for (m, id, queue, offset) in &expected {
        let got: Vec<&&ReceivedMessage> = txs.iter().filter(|r| r.msg_id() == *id).collect();
        assert_eq!(
            got.len(),
            1,
            "{id} visible once, with the id the outcome reported"
        );
        let r = got[0];
        assert_eq!(r.broker_name, BROKER);
        assert_eq!(r.topic(), topic, "in its real topic, not the half topic");
        assert_eq!(
            (r.queue(), r.queue_offset()),
            (*queue, *offset),
            "in its real queue"
        );
        assert_eq!(r.key(), m.key());
        assert_eq!(r.tag(), Some("payment"));
        assert_eq!(r.body(), m.body());
        assert_eq!(
            &r.message().properties,
            m.properties(),
            "user properties, nothing else"
        );
        assert!(r
            .message()
            .properties
            .keys()
            .all(|k| !k.starts_with("__txmq")));
        assert_ne!(r.message().born_timestamp, 0, "born when sent");
    }
    assert_eq!(queues_used.len(), 3);

    plain.close().await.unwrap();
    producer.close().await.unwrap();
    cluster.shutdown().await;
}

// ---------------------------------------------------------------------------
// 3. Idempotent and checked ends
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ending_is_idempotent_and_a_contradicting_end_is_refused_with_its_own_code() {
    let cluster = cluster_with(|_| {}).await;
    let topic = "t3-ledger";
    create_topic(&cluster, topic, 1).await;
    let admin = cluster.admin().await;
    let listener = Scripted::new(
        |m| match &m.body()[..] {
            b"commit" => Plan::Now(Commit),
            b"rollback" => Plan::Now(Rollback),
            _ => Plan::Held(Commit),
        },
        |_| Plan::Now(Unknown),
    );
    let producer = tx_producer(&cluster, "t3-pg", &listener).await;

    // A repeated commit answers OK, already ended, and adds no copy.
    let committed = producer
        .send_in_transaction(Message::new(topic, "commit"))
        .await
        .unwrap();
    let a = committed.tx_id;
    let (broker, again) = admin
        .resolve_transaction(a, TxAction::Commit, Some(BROKER))
        .await
        .expect("a second commit is fine");
    assert_eq!(broker, BROKER);
    assert_eq!((again.state, again.already), (TxState::Committed, true));
    let again = raw_end(&cluster, a, TxAction::Commit)
        .await
        .expect("a producer's second commit is fine");
    assert_eq!((again.state, again.already), (TxState::Committed, true));
    let (_, again) = admin
        .resolve_transaction(a, TxAction::Commit, None)
        .await
        .expect("found without naming the broker");
    assert!(again.already);

    // Rollback after commit.
    let e = admin
        .resolve_transaction(a, TxAction::Rollback, Some(BROKER))
        .await
        .expect_err("rollback after commit is refused");
    let committed_code = e.code().expect("a wire code");
    assert_eq!(committed_code, ErrorCode::TransactionCommitted, "{e}");
    let e = raw_end(&cluster, a, TxAction::Rollback)
        .await
        .expect_err("also for a producer");
    assert_eq!(
        e.remote().map(|w| w.code),
        Some(ErrorCode::TransactionCommitted)
    );

    // Commit after rollback.
    let rolled = producer
        .send_in_transaction(Message::new(topic, "rollback"))
        .await
        .unwrap();
    let b = rolled.tx_id;
    let again = raw_end(&cluster, b, TxAction::Rollback).await.unwrap();
    assert_eq!((again.state, again.already), (TxState::RolledBack, true));
    let e = admin
        .resolve_transaction(b, TxAction::Commit, None)
        .await
        .expect_err("commit after rollback is refused");
    let rolled_back_code = e.code().expect("a wire code");
    assert_eq!(rolled_back_code, ErrorCode::TransactionRolledBack, "{e}");
    let e = raw_end(&cluster, b, TxAction::Commit).await.unwrap_err();
    assert_eq!(
        e.remote().map(|w| w.code),
        Some(ErrorCode::TransactionRolledBack)
    );

    // Unknown transaction id.
    let nobody = a + b + 1_000_000;
    let e = admin
        .resolve_transaction(nobody, TxAction::Commit, Some(BROKER))
        .await
        .expect_err("unknown id");
    let unknown_code = e.code().expect("a wire code");
    assert_eq!(unknown_code, ErrorCode::UnknownTransaction, "{e}");
    let e = admin
        .resolve_transaction(nobody, TxAction::Rollback, None)
        .await
        .expect_err("unknown id on every broker");
    assert!(
        matches!(e, Error::UnknownTransaction { tx_id, .. } if tx_id == nobody),
        "{e}"
    );
    let e = raw_end(&cluster, nobody, TxAction::Commit)
        .await
        .unwrap_err();
    assert_eq!(
        e.remote().map(|w| w.code),
        Some(ErrorCode::UnknownTransaction)
    );

    // The local transaction takes so long that the broker parks the
    // transaction (3 checks answered unknown); the producer's commit then
    // is refused, and only an operator can end it.
    let p = producer.clone();
    let sending =
        tokio::spawn(async move { p.send_in_transaction(Message::new(topic, "slow")).await });
    let c = eventually(
        "the slow local transaction",
        Duration::from_secs(10),
        async || listener.held().first().copied(),
    )
    .await;
    let parked = eventually(
        "the transaction to be parked",
        Duration::from_secs(10),
        async || {
            tx_info(&admin, c)
                .await
                .filter(|t| t.state == TxState::Parked)
        },
    )
    .await;
    assert_eq!(parked.checks, 3);
    listener.release(1);
    let outcome = sending
        .await
        .unwrap()
        .expect("the local transaction ran: an outcome, not an error");
    assert_eq!(outcome.state, Commit);
    let TxEnd::Refused(e) = outcome.end else {
        panic!("commit after parking is refused: {:?}", outcome.end)
    };
    let parked_code = e.code().expect("a wire code");
    assert_eq!(parked_code, ErrorCode::TransactionParked, "{e}");
    assert!(
        matches!(&e, Error::EndTransaction { tx_id, action: TxAction::Commit, .. } if *tx_id == c),
        "{e}"
    );
    let e = raw_end(&cluster, c, TxAction::Rollback).await.unwrap_err();
    assert_eq!(
        e.remote().map(|w| w.code),
        Some(ErrorCode::TransactionParked)
    );
    let counts = visible_ids(&cluster, topic).await;
    assert_eq!(counts.get(&committed.msg_id), Some(&1));
    assert_eq!(
        counts.len(),
        1,
        "neither the rolled back nor the parked one is visible"
    );

    let (broker, ended) = admin
        .resolve_transaction(c, TxAction::Commit, None)
        .await
        .expect("an operator commits the parked transaction");
    assert_eq!(broker, BROKER);
    assert_eq!((ended.state, ended.already), (TxState::Committed, false));
    let counts = visible_ids(&cluster, topic).await;
    assert_eq!(counts.len(), 2);
    assert_eq!(
        counts.values().copied().collect::<Vec<_>>(),
        [1, 1],
        "each once"
    );
    assert!(!counts.contains_key(&rolled.msg_id));

    let codes: HashSet<u16> = [committed_code, rolled_back_code, parked_code, unknown_code]
        .into_iter()
        .map(|c| c as u16)
        .collect();
    assert_eq!(codes.len(), 4, "four distinct codes");
    let list = tx_list(&admin).await;
    assert!(list.transactions.is_empty());
    assert_eq!(
        (
            list.counters.committed,
            list.counters.rolled_back,
            list.counters.parked
        ),
        (2, 1, 1)
    );

    producer.close().await.unwrap();
    admin.close().await.unwrap();
    cluster.shutdown().await;
}

// ---------------------------------------------------------------------------
// 4. Check-back
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_transaction_is_checked_back_on_another_producer_of_the_group_once_the_first_is_gone(
) {
    let cluster = cluster_with(|_| {}).await;
    let topic = "t4-orders";
    create_topic(&cluster, topic, 1).await;
    let admin = cluster.admin().await;

    let first = Scripted::always(Unknown, Unknown);
    let gone = tx_producer(&cluster, "t4-pg", &first).await;
    // The message asks for its own first check after 1 s (not the broker's 300 ms).
    let m = Message::new(topic, "order 1")
        .with_key("o-1")
        .with_property(PROP_USER_CHECK_DELAY, "1s");
    let sent_at = Instant::now();
    let outcome = gone.send_in_transaction(m).await.unwrap();
    assert_eq!((outcome.state, outcome.ended().is_some()), (Unknown, false));
    gone.close().await.unwrap();
    let info = tx_info(&admin, outcome.tx_id).await.expect("pending");
    assert_eq!((info.state, info.checks), (TxState::Prepared, 0));

    let second = Scripted::always(Unknown, Commit);
    let other = tx_producer(&cluster, "t4-pg", &second).await;
    eventually(
        "the transaction to end",
        Duration::from_secs(10),
        async || tx_info(&admin, outcome.tx_id).await.is_none().then_some(()),
    )
    .await;
    let checks = second.checks_of(outcome.tx_id);
    assert_eq!(checks.len(), 1, "checked once: {checks:?}");
    assert_eq!((checks[0].msg_id, checks[0].checks), (outcome.msg_id, 0));
    assert_eq!(checks[0].body, "order 1");
    let waited = checks[0].at - sent_at;
    assert!(
        waited >= Duration::from_millis(980),
        "checked after {waited:?}, before the message's own 1 s delay"
    );
    assert!(
        first.checks().is_empty(),
        "the closed producer was not asked"
    );

    let seen = visible(&cluster, topic).await;
    assert_eq!(bodies(&seen), ["order 1"]);
    assert_eq!(seen[0].msg_id(), outcome.msg_id);
    assert_eq!(seen[0].key(), Some("o-1"));
    let c = tx_list(&admin).await.counters;
    assert_eq!((c.committed, c.checks_sent, c.pending), (1, 1, 0));

    other.close().await.unwrap();
    admin.close().await.unwrap();
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_backs_go_round_robin_over_the_live_producers_of_a_group() {
    let cluster = cluster_with(|_| {}).await;
    let topic = "t4-rr";
    create_topic(&cluster, topic, 2).await;
    let admin = cluster.admin().await;
    let one = Scripted::always(Unknown, Commit);
    let two = Scripted::always(Unknown, Commit);
    let p1 = tx_producer(&cluster, "t4-rr-pg", &one).await;
    let p2 = tx_producer(&cluster, "t4-rr-pg", &two).await;

    let mut ids = HashSet::new();
    for i in 0..8 {
        let o = p1
            .send_in_transaction(Message::new(topic, format!("rr {i}")))
            .await
            .unwrap();
        assert_eq!(o.state, Unknown);
        ids.insert(o.msg_id);
    }
    eventually(
        "all eight to be committed by check-back",
        Duration::from_secs(10),
        async || {
            let c = tx_list(&admin).await.counters;
            (c.committed == 8 && c.pending == 0).then_some(())
        },
    )
    .await;
    let (n1, n2) = (one.checks().len(), two.checks().len());
    assert_eq!(n1 + n2, 8, "each checked once");
    assert!(
        n1 >= 2 && n2 >= 2,
        "both producers were asked: {n1} and {n2}"
    );
    let counts = visible_ids(&cluster, topic).await;
    assert_eq!(counts.keys().copied().collect::<HashSet<_>>(), ids);
    assert!(counts.values().all(|&n| n == 1));

    p1.close().await.unwrap();
    p2.close().await.unwrap();
    admin.close().await.unwrap();
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_answered_unknown_leaves_the_transaction_pending_for_the_next_check() {
    let cluster = cluster_with(|t| {
        t.check_max = 5;
        t.check_interval = Duration::from_millis(150);
    })
    .await;
    let topic = "t4-unknown";
    create_topic(&cluster, topic, 1).await;
    let admin = cluster.admin().await;
    // Unknown twice; the third check waits for the test, then commits.
    let listener = Scripted::new(
        |_| Plan::Now(Unknown),
        |req| match req.checks() {
            0 | 1 => Plan::Now(Unknown),
            _ => Plan::Held(Commit),
        },
    );
    let producer = tx_producer(&cluster, "t4-unknown-pg", &listener).await;
    let outcome = producer
        .send_in_transaction(Message::new(topic, "pending"))
        .await
        .unwrap();
    let tx = outcome.tx_id;

    eventually("the third check", Duration::from_secs(10), async || {
        (listener.checks_of(tx).len() == 3).then_some(())
    })
    .await;
    let info = tx_info(&admin, tx).await.expect("still pending");
    assert_eq!(info.state, TxState::Prepared);
    assert_eq!(info.checks, 2, "two checks answered so far");
    assert_eq!(info.last_check, Some(Unknown));
    assert!(visible(&cluster, topic).await.is_empty());

    listener.release(1);
    eventually("the commit", Duration::from_secs(10), async || {
        tx_info(&admin, tx).await.is_none().then_some(())
    })
    .await;
    let seen = listener.checks_of(tx);
    assert_eq!(seen.iter().map(|s| s.checks).collect::<Vec<_>>(), [0, 1, 2]);
    for w in seen.windows(2) {
        let gap = w[1].at - w[0].at;
        assert!(gap >= Duration::from_millis(140), "checks {gap:?} apart");
    }
    assert_eq!(bodies(&visible(&cluster, topic).await), ["pending"]);
    let c = tx_list(&admin).await.counters;
    assert_eq!((c.checks_sent, c.committed, c.parked), (3, 1, 0));

    producer.close().await.unwrap();
    admin.close().await.unwrap();
    cluster.shutdown().await;
}

// ---------------------------------------------------------------------------
// 5. Parking after check_max
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_maximum_checks_a_transaction_is_parked_and_an_operator_commits_it_with_the_cli()
{
    let cluster = cluster_with(|_| {}).await;
    let ns = cluster.nameserver.clone();
    let topic = "t5-orders";
    create_topic(&cluster, topic, 1).await;
    let admin = cluster.admin().await;
    let listener = Scripted::always(Unknown, Unknown);
    let producer = tx_producer(&cluster, "t5-pg", &listener).await;
    let outcome = producer
        .send_in_transaction(Message::new(topic, "undecided"))
        .await
        .unwrap();
    let tx = outcome.tx_id;
    eventually("parking", Duration::from_secs(10), async || {
        tx_info(&admin, tx)
            .await
            .filter(|t| t.state == TxState::Parked)
    })
    .await;

    let listed = ok_json(&txmq(&ns, &["tx", "list", "--output", "json"], None).await);
    let txs = listed_txs(&listed);
    assert_eq!(txs.len(), 1, "{listed:?}");
    let t = txs[0];
    assert_eq!(t["tx_id"], tx);
    assert_eq!(t["state"], "parked");
    assert_eq!(t["checks"], 3);
    assert_eq!(t["last_check"], "unknown");
    assert_eq!(t["producer_group"], "t5-pg");
    assert_eq!(t["msg_id"], outcome.msg_id.to_string());
    assert_eq!(t["topic"], topic);
    assert_eq!(listed_counters(&listed)["parked"], 1);

    // A parked transaction is not checked any more.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let seen = listener.checks_of(tx);
    assert_eq!(seen.iter().map(|s| s.checks).collect::<Vec<_>>(), [0, 1, 2]);
    assert!(visible(&cluster, topic).await.is_empty());

    let tx_arg = tx.to_string();
    let resolved = ok_json(
        &txmq(
            &ns,
            &["tx", "resolve", &tx_arg, "--commit", "--output", "json"],
            None,
        )
        .await,
    );
    assert_eq!(resolved.len(), 1);
    assert_eq!(resolved[0]["tx_id"], tx);
    assert_eq!(resolved[0]["state"], "committed");
    assert_eq!(resolved[0]["already"], false);
    assert_eq!(resolved[0]["broker"], BROKER);
    // Again: nothing changes; the other way: refused, with the reason.
    let again = ok_json(
        &txmq(
            &ns,
            &["tx", "resolve", &tx_arg, "--commit", "--output", "json"],
            None,
        )
        .await,
    );
    assert_eq!(
        (&again[0]["state"], &again[0]["already"]),
        (&Value::from("committed"), &Value::from(true))
    );
    let refused = txmq(&ns, &["tx", "resolve", &tx_arg, "--rollback"], None).await;
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("TRANSACTION_COMMITTED"), "{err}");
    let seen = visible(&cluster, topic).await;
    assert_eq!(bodies(&seen), ["undecided"]);
    assert_eq!(seen[0].msg_id(), outcome.msg_id);

    let listed = ok_json(&txmq(&ns, &["tx", "list", "--output", "json"], None).await);
    assert!(listed_txs(&listed).is_empty());
    let c = listed_counters(&listed);
    assert_eq!(
        (
            c["committed"].as_u64(),
            c["parked"].as_u64(),
            c["pending"].as_u64()
        ),
        (Some(1), Some(1), Some(0))
    );

    producer.close().await.unwrap();
    admin.close().await.unwrap();
    cluster.shutdown().await;
}

// ---------------------------------------------------------------------------
// 6. No producer online
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_producer_online_a_transaction_waits_and_is_checked_as_soon_as_one_connects() {
    let cluster = cluster_with(|_| {}).await;
    let ns = cluster.nameserver.clone();
    let topic = "t6-orders";
    create_topic(&cluster, topic, 1).await;
    let admin = cluster.admin().await;
    let crashed = Scripted::always(Unknown, Unknown);
    let producer = tx_producer(&cluster, "t6-pg", &crashed).await;
    let outcome = producer
        .send_in_transaction(Message::new(topic, "orphan"))
        .await
        .unwrap();
    producer.close().await.unwrap();
    let tx = outcome.tx_id;

    let info = eventually(
        "a check to find no producer",
        Duration::from_secs(10),
        async || tx_info(&admin, tx).await.filter(|t| t.last_error.is_some()),
    )
    .await;
    assert_eq!((info.state, info.checks), (TxState::Prepared, 0));
    // Well past check_max scheduler rounds: still waiting, nothing counted.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let listed = ok_json(&txmq(&ns, &["tx", "list", "--output", "json"], None).await);
    let txs = listed_txs(&listed);
    assert_eq!(txs.len(), 1, "{listed:?}");
    assert_eq!(txs[0]["tx_id"], tx);
    assert_eq!(txs[0]["state"], "prepared");
    assert_eq!(txs[0]["checks"], 0);
    let error = txs[0]["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(error.contains("no producer"), "last_error: {error:?}");
    assert_eq!(listed_counters(&listed)["checks_sent"], 0);
    assert!(crashed.checks().is_empty());
    assert!(visible(&cluster, topic).await.is_empty());

    let rescuer = Scripted::always(Unknown, Commit);
    let connected_at = Instant::now();
    let back = tx_producer(&cluster, "t6-pg", &rescuer).await;
    eventually("the commit", Duration::from_secs(10), async || {
        tx_info(&admin, tx).await.is_none().then_some(())
    })
    .await;
    let checks = rescuer.checks_of(tx);
    assert_eq!(checks.len(), 1);
    assert_eq!(checks[0].checks, 0, "the failed attempts did not count");
    let waited = checks[0].at - connected_at;
    assert!(
        waited < Duration::from_secs(1),
        "checked {waited:?} after connecting"
    );
    let seen = visible(&cluster, topic).await;
    assert_eq!(bodies(&seen), ["orphan"]);

    back.close().await.unwrap();
    admin.close().await.unwrap();
    cluster.shutdown().await;
}

/// A producer closed while a transaction of it was still running opens no
/// connection afterwards: the check-backs of its group go to live members
/// only. (Its transaction's end reconnected, as a producer of the group, and
/// the closed producer answered every check of another member's
/// transaction Unknown, which parked it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_closed_with_a_transaction_running_is_asked_no_check_backs() {
    let cluster = cluster_with(|_| {}).await;
    let topic = "t6b-orders";
    create_topic(&cluster, topic, 1).await;
    let admin = cluster.admin().await;
    let slow = Scripted::new(|_| Plan::Held(Commit), |_| Plan::Now(Unknown));
    let closed = Arc::new(
        TransactionProducer::builder()
            .nameserver(&cluster.nameserver)
            .group("t6b-pg")
            .listener_arc(slow.clone())
            .close_timeout(Duration::from_millis(200))
            .start()
            .await
            .expect("transaction producer starts"),
    );
    let running = {
        let p = closed.clone();
        tokio::spawn(async move { p.send_in_transaction(Message::new(topic, "slow")).await })
    };
    eventually(
        "the local transaction runs",
        Duration::from_secs(10),
        async || (!slow.held().is_empty()).then_some(()),
    )
    .await;
    let closing = closed.close().await;
    assert!(
        matches!(closing, Err(txmq::Error::Unfinished { .. })),
        "{closing:?}"
    );
    slow.release(1);
    // Its end cannot reach the broker any more: the transaction stays pending.
    eprintln!(
        "the closed producer's transaction: {:?}",
        running.await.unwrap()
    );

    // Another member leaves a transaction unknown and goes away.
    let crashed = Scripted::always(Unknown, Unknown);
    let gone = tx_producer(&cluster, "t6b-pg", &crashed).await;
    let orphan = gone
        .send_in_transaction(Message::new(topic, "orphan"))
        .await
        .unwrap();
    gone.close().await.unwrap();
    // Well past the rounds that would park it (3 checks, 100 ms apart).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let info = tx_info(&admin, orphan.tx_id).await.expect("still pending");
    assert_eq!(
        (info.state, info.checks),
        (TxState::Prepared, 0),
        "{info:?}"
    );
    assert!(slow.checks().is_empty(), "asked: {:?}", slow.checks());

    // A live member answers both.
    let rescuer = Scripted::always(Unknown, Commit);
    let back = tx_producer(&cluster, "t6b-pg", &rescuer).await;
    eventually("both committed", Duration::from_secs(10), async || {
        let mut seen = bodies(&visible(&cluster, topic).await);
        seen.sort();
        (seen == ["orphan", "slow"]).then_some(())
    })
    .await;
    assert!(slow.checks().is_empty(), "asked: {:?}", slow.checks());
    back.close().await.unwrap();
    admin.close().await.unwrap();
    cluster.shutdown().await;
}

// ---------------------------------------------------------------------------
// 8. Several messages, two topics
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_of_one_transaction_across_two_topics_commit_or_roll_back_together() {
    let cluster = cluster_with(|t| t.timeout = Duration::from_secs(60)).await;
    let (orders, audit) = ("t8-orders", "t8-audit");
    create_topic(&cluster, orders, 1).await;
    create_topic(&cluster, audit, 1).await;
    let admin = cluster.admin().await;
    let listener = Scripted::new(
        |m| {
            let b = text_of(m.body());
            if b.starts_with("commit") {
                Plan::Now(Commit)
            } else if b.starts_with("rollback") {
                Plan::Now(Rollback)
            } else {
                Plan::Held(Commit)
            }
        },
        |_| Plan::Now(Unknown),
    );
    let producer = tx_producer(&cluster, "t8-pg", &listener).await;

    let committed = producer
        .send_messages_in_transaction(vec![
            Message::new(orders, "commit o1"),
            Message::new(audit, "commit a1"),
            Message::new(orders, "commit o2"),
        ])
        .await
        .unwrap();
    assert_eq!(committed.msg_ids.len(), 3);
    assert_eq!(committed.ended().map(|e| e.state), Some(TxState::Committed));
    let rolled = producer
        .send_messages_in_transaction(vec![
            Message::new(orders, "rollback o3"),
            Message::new(audit, "rollback a2"),
        ])
        .await
        .unwrap();
    assert_eq!(rolled.ended().map(|e| e.state), Some(TxState::RolledBack));

    // One still running: neither half shows.
    let p = producer.clone();
    let sending = tokio::spawn(async move {
        p.send_messages_in_transaction(vec![
            Message::new(audit, "held a3"),
            Message::new(orders, "held o4"),
        ])
        .await
    });
    let held = eventually(
        "the held local transaction",
        Duration::from_secs(10),
        async || listener.held().first().copied(),
    )
    .await;
    let info = tx_info(&admin, held).await.expect("pending");
    assert_eq!(info.msg_ids.len(), 2);
    assert_eq!(
        info.topics.iter().collect::<BTreeSet<_>>(),
        [audit.to_string(), orders.to_string()].iter().collect()
    );
    assert_eq!(
        bodies(&visible(&cluster, orders).await),
        ["commit o1", "commit o2"]
    );
    assert_eq!(bodies(&visible(&cluster, audit).await), ["commit a1"]);

    listener.release(1);
    let late = sending.await.unwrap().unwrap();
    assert_eq!(late.ended().map(|e| e.state), Some(TxState::Committed));
    let o = visible(&cluster, orders).await;
    let a = visible(&cluster, audit).await;
    assert_eq!(bodies(&o), ["commit o1", "commit o2", "held o4"]);
    assert_eq!(bodies(&a), ["commit a1", "held a3"]);
    let ids: Vec<MsgId> = o.iter().chain(&a).map(ReceivedMessage::msg_id).collect();
    for id in committed.msg_ids.iter().chain(&late.msg_ids) {
        assert_eq!(ids.iter().filter(|i| *i == id).count(), 1);
    }
    let c = tx_list(&admin).await.counters;
    assert_eq!(
        (c.prepared, c.committed, c.rolled_back, c.pending),
        (3, 2, 1, 0)
    );

    producer.close().await.unwrap();
    admin.close().await.unwrap();
    cluster.shutdown().await;
}

// ---------------------------------------------------------------------------
// 9. Rate limiting
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_pending_transactions_are_checked_back_at_the_configured_rate_while_sends_go_on()
{
    const RATE: u32 = 200;
    const TXS: usize = 1000;
    let cluster = cluster_with(|t| t.check_rate = RATE).await;
    let (tx_topic, plain_topic) = ("t9-tx", "t9-plain");
    create_topic(&cluster, tx_topic, 4).await;
    create_topic(&cluster, plain_topic, 4).await;
    let admin = cluster.admin().await;
    let listener = Scripted::always(Unknown, Commit);
    let producer = tx_producer(&cluster, "t9-pg", &listener).await;

    // Plain sends all along.
    let plain: Producer = cluster.producer().await;
    let stop = tokio_util::sync::CancellationToken::new();
    let sender = {
        let (plain, stop) = (plain.clone(), stop.clone());
        tokio::spawn(async move {
            let mut slowest = Duration::ZERO;
            let mut sent = 0usize;
            while !stop.is_cancelled() {
                let started = Instant::now();
                plain
                    .send(Message::new(plain_topic, format!("plain {sent}")))
                    .await
                    .expect("a plain send succeeds during the checks");
                slowest = slowest.max(started.elapsed());
                sent += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (sent, slowest)
        })
    };

    let mut prepares = tokio::task::JoinSet::new();
    for w in 0..8 {
        let p = producer.clone();
        prepares.spawn(async move {
            let mut ids = Vec::new();
            for i in (w..TXS).step_by(8) {
                let o = p
                    .send_in_transaction(Message::new(tx_topic, format!("tx {i}")))
                    .await
                    .expect("prepared");
                assert_eq!(o.state, Unknown);
                ids.push(o.msg_id);
            }
            ids
        });
    }
    let mut ids = HashSet::new();
    while let Some(r) = prepares.join_next().await {
        ids.extend(r.unwrap());
    }
    assert_eq!(ids.len(), TXS);
    eventually(
        "every transaction to be committed by check-back",
        Duration::from_secs(30),
        async || {
            let c = tx_list(&admin).await.counters;
            (c.committed == TXS as u64 && c.pending == 0).then_some(())
        },
    )
    .await;
    stop.cancel();
    let (sent, slowest) = sender.await.unwrap();

    let checks = listener.checks();
    assert_eq!(checks.len(), TXS, "each transaction checked once");
    assert_eq!(
        checks.iter().map(|s| s.tx_id).collect::<HashSet<_>>().len(),
        TXS
    );
    let mut at: Vec<Instant> = checks.iter().map(|s| s.at).collect();
    at.sort();
    let per_second = busiest(&at, Duration::from_secs(1));
    let per_tenth = busiest(&at, Duration::from_millis(100));
    let span = at[at.len() - 1] - at[0];
    eprintln!(
        "{TXS} checks over {span:?}, at most {per_second} in one second and {per_tenth} in 100 ms; \
         {sent} plain sends, slowest {slowest:?}"
    );
    let rate = RATE as usize;
    assert!(
        per_second <= rate + rate / 4,
        "{per_second} checks in one second at {RATE}/s"
    );
    // Paced, not released in bursts of the in-flight limit (64); the slack
    // is for a busy machine delaying some arrivals into the next window.
    assert!(
        per_tenth <= rate / 10 * 2 + 5,
        "{per_tenth} checks within 100 ms at {RATE}/s"
    );
    let expected = Duration::from_millis(1000 * TXS as u64 / u64::from(RATE));
    assert!(
        span >= expected - Duration::from_millis(200),
        "{TXS} checks in {span:?}: faster than {RATE}/s"
    );
    assert!(
        span <= expected * 2,
        "{TXS} checks took {span:?}: far below {RATE}/s"
    );
    assert!(sent > 50, "plain sends went on: {sent}");
    assert!(
        slowest < Duration::from_secs(2),
        "a plain send took {slowest:?}"
    );

    let counts = visible_ids(&cluster, tx_topic).await;
    assert_eq!(counts.len(), TXS);
    assert!(counts.keys().all(|id| ids.contains(id)));
    assert!(counts.values().all(|&n| n == 1));
    let plain_seen = visible(&cluster, plain_topic).await;
    assert_eq!(plain_seen.len(), sent, "every plain message arrived");

    plain.close().await.unwrap();
    producer.close().await.unwrap();
    admin.close().await.unwrap();
    cluster.shutdown().await;
}

// ---------------------------------------------------------------------------
// 10. RocketMQ's transaction integration test
// ---------------------------------------------------------------------------

/// Port of RocketMQ's `TransactionalMsgIT`: 120 transactional sends where
/// `i % 5` picks commit now, rollback now, unknown then commit on check,
/// unknown then rollback on check, unknown forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rocketmq_transactional_msg_it_five_fates_of_120_sends() {
    let cluster = cluster_with(|_| {}).await;
    let ns = cluster.nameserver.clone();
    let topic = "t10-rmq";
    create_topic(&cluster, topic, 4).await;
    let admin = cluster.admin().await;
    let fate = |b: &[u8]| -> u32 { text_of(b).parse::<u32>().expect("numeric body") % 5 };
    let listener = Scripted::new(
        move |m| {
            Plan::Now(match fate(m.body()) {
                0 => Commit,
                1 => Rollback,
                _ => Unknown,
            })
        },
        move |req| {
            Plan::Now(match fate(req.message().body()) {
                2 => Commit,
                3 => Rollback,
                _ => Unknown,
            })
        },
    );
    let producer = tx_producer(&cluster, "t10-pg", &listener).await;
    let mut msg_ids = HashMap::new();
    for i in 0..120u32 {
        let o = producer
            .send_in_transaction(Message::new(topic, i.to_string()))
            .await
            .unwrap();
        msg_ids.insert(i, o.msg_id);
    }

    eventually(
        "every transaction to settle",
        Duration::from_secs(20),
        async || {
            let c = tx_list(&admin).await.counters;
            (c.committed == 48 && c.rolled_back == 48 && c.parked == 24).then_some(())
        },
    )
    .await;

    let listed = ok_json(&txmq(&ns, &["tx", "list", "--output", "json"], None).await);
    let txs = listed_txs(&listed);
    assert_eq!(txs.len(), 24, "{listed:?}");
    let forever: BTreeSet<String> = (0..120)
        .filter(|i| i % 5 == 4)
        .map(|i| msg_ids[&i].to_string())
        .collect();
    let listed_ids: BTreeSet<String> = txs
        .iter()
        .map(|t| t["msg_id"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(
        listed_ids, forever,
        "exactly the unknown-forever ones are left"
    );
    for t in &txs {
        assert_eq!(t["state"], "parked", "{t}");
        assert_eq!(t["checks"], 3, "{t}");
    }
    let c = listed_counters(&listed);
    let counters: Vec<u64> = [
        "prepared",
        "committed",
        "rolled_back",
        "parked",
        "pending",
        "checks_sent",
    ]
    .iter()
    .map(|k| c[*k].as_u64().unwrap_or(u64::MAX))
    .collect();
    // checks: one each for the 48 decided on check, three each for the 24 parked.
    assert_eq!(counters, [120, 48, 48, 24, 24, 48 + 72], "{c}");

    let seen = visible(&cluster, topic).await;
    let mut got: Vec<u32> = seen.iter().map(|m| body(m).parse().unwrap()).collect();
    got.sort_unstable();
    let want: Vec<u32> = (0..120).filter(|i| i % 5 == 0 || i % 5 == 2).collect();
    assert_eq!(got, want, "exactly the 48 committed bodies, each once");
    for m in &seen {
        let i: u32 = body(m).parse().unwrap();
        assert_eq!(m.msg_id(), msg_ids[&i]);
    }
    let asked: HashSet<u32> = listener
        .checks()
        .iter()
        .map(|s| s.body.parse::<u32>().unwrap() % 5)
        .collect();
    assert_eq!(
        asked,
        [2, 3, 4].into(),
        "decided transactions are never checked"
    );

    producer.close().await.unwrap();
    admin.close().await.unwrap();
    cluster.shutdown().await;
}

// ---------------------------------------------------------------------------
// 11. The command line
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_tx_send_with_a_local_commit_prints_the_transaction_and_the_message_is_consumable() {
    let cluster = cluster_with(|_| {}).await;
    let ns = cluster.nameserver.clone();
    let topic = "t11-send";
    create_topic(&cluster, topic, 1).await;
    let out = ok_json(
        &txmq(
            &ns,
            &[
                "tx", "send", topic, "--group", "cli-pg", "--body", "hello tx", "--key", "k1",
                "--tag", "t1", "--local", "commit", "--output", "json",
            ],
            None,
        )
        .await,
    );
    assert_eq!(out.len(), 1, "{out:?}");
    let sent = &out[0];
    assert!(sent["tx_id"].is_u64(), "{sent}");
    let msg_id = sent["msg_id"].as_str().expect("msg_id").to_string();
    assert_eq!(msg_id.len(), 32);
    assert_eq!(sent["state"], "commit");
    assert_eq!(sent["ended"], "committed");
    assert_eq!(sent["already"], false);
    assert_eq!(sent["topic"], topic);

    let consumed = ok_json(
        &txmq(
            &ns,
            &[
                "consume",
                topic,
                "--group",
                "cli-reader",
                "--count",
                "1",
                "--idle-timeout",
                "5s",
                "--output",
                "json",
            ],
            None,
        )
        .await,
    );
    assert_eq!(consumed.len(), 1, "{consumed:?}");
    assert_eq!(consumed[0]["msg_id"], msg_id.as_str());
    assert_eq!(consumed[0]["body"], "hello tx");
    assert_eq!(consumed[0]["key"], "k1");
    assert_eq!(consumed[0]["tag"], "t1");
    let seen = visible(&cluster, topic).await;
    assert_eq!(bodies(&seen), ["hello tx"], "once");
    let admin = cluster.admin().await;
    assert!(tx_list(&admin).await.transactions.is_empty());
    admin.close().await.unwrap();
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_tx_send_with_an_unknown_local_result_is_checked_back_and_committed_while_lingering() {
    let cluster = cluster_with(|_| {}).await;
    let ns = cluster.nameserver.clone();
    let topic = "t11-linger";
    create_topic(&cluster, topic, 1).await;
    let running = {
        let ns = ns.clone();
        tokio::spawn(async move {
            txmq(
                &ns,
                &[
                    "tx",
                    "send",
                    topic,
                    "--group",
                    "cli-linger",
                    "--body",
                    "decided later",
                    "--local",
                    "unknown",
                    "--check",
                    "commit",
                    "--linger",
                    "3s",
                    "--output",
                    "json",
                ],
                None,
            )
            .await
        })
    };
    // Visible while the command still lingers.
    let mut consumer = PullConsumer::builder()
        .nameserver(&ns)
        .group("t11-linger-reader")
        .topic(topic)
        .build()
        .await
        .unwrap();
    let got = eventually(
        "the checked-back message",
        Duration::from_secs(10),
        async || {
            let got = consumer.poll(Duration::from_millis(200)).await.unwrap();
            (!got.is_empty()).then_some(got)
        },
    )
    .await;
    consumer.shutdown().await.unwrap();
    assert_eq!(bodies(&got), ["decided later"]);

    let out = ok_json(&running.await.unwrap());
    let sent = out
        .iter()
        .find(|v| v.get("state").is_some())
        .unwrap_or_else(|| panic!("no send line in {out:?}"));
    assert_eq!(sent["state"], "unknown");
    assert!(
        sent.get("ended").is_none(),
        "not ended by the local result: {sent}"
    );
    let check = out
        .iter()
        .find(|v| v.get("answer").is_some())
        .unwrap_or_else(|| panic!("no check line in {out:?}"));
    assert_eq!(check["tx_id"], sent["tx_id"]);
    assert_eq!(check["msg_id"], sent["msg_id"]);
    assert_eq!(check["answer"], "commit");
    assert_eq!(check["checks"], 0);
    assert_eq!(
        got[0].msg_id().to_string(),
        sent["msg_id"].as_str().unwrap()
    );
    assert_eq!(out.len(), 2, "one send line and one check line: {out:?}");
    assert_eq!(bodies(&visible(&cluster, topic).await), ["decided later"]);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_tx_listen_rolls_back_a_transaction_another_process_left_unknown() {
    let cluster = cluster_with(|_| {}).await;
    let ns = cluster.nameserver.clone();
    let topic = "t11-listen";
    create_topic(&cluster, topic, 1).await;
    let admin = cluster.admin().await;
    let out = ok_json(
        &txmq(
            &ns,
            &[
                "tx",
                "send",
                topic,
                "--group",
                "cli-listen",
                "--body",
                "abandoned",
                "--local",
                "unknown",
                "--output",
                "json",
            ],
            None,
        )
        .await,
    );
    let tx = out[0]["tx_id"].as_u64().expect("tx_id");
    // The sender is gone: the broker finds nobody to ask.
    eventually(
        "a check to find no producer",
        Duration::from_secs(10),
        async || tx_info(&admin, tx).await.filter(|t| t.last_error.is_some()),
    )
    .await;

    let listening = {
        let ns = ns.clone();
        tokio::spawn(async move {
            txmq(
                &ns,
                &[
                    "tx",
                    "listen",
                    "--group",
                    "cli-listen",
                    "--check",
                    "rollback",
                    "--duration",
                    "3s",
                    "--output",
                    "json",
                ],
                None,
            )
            .await
        })
    };
    eventually("the rollback", Duration::from_secs(10), async || {
        tx_info(&admin, tx).await.is_none().then_some(())
    })
    .await;
    let c = tx_list(&admin).await.counters;
    assert_eq!((c.rolled_back, c.committed, c.pending), (1, 0, 0));
    let listened = listening.await.unwrap();
    let lines = ok_json(&listened);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["tx_id"], tx);
    assert_eq!(lines[0]["answer"], "rollback");
    assert_eq!(lines[0]["msg_id"], out[0]["msg_id"]);
    let err = String::from_utf8_lossy(&listened.stderr);
    assert!(
        err.contains("answering check-backs of group cli-listen"),
        "{err}"
    );
    assert!(visible(&cluster, topic).await.is_empty(), "never visible");

    admin.close().await.unwrap();
    cluster.shutdown().await;
}

/// Answers by body: the local transaction of "later" is not decided
/// (Unknown), any other commits; every check-back commits.
struct ByBody;

impl TransactionListener for ByBody {
    async fn execute(&self, msg: &Message, _: &TxContext) -> Result<TransactionState, BoxError> {
        Ok(if &msg.body()[..] == b"later" {
            Unknown
        } else {
            Commit
        })
    }

    async fn check(&self, _: &CheckRequest) -> Result<TransactionState, BoxError> {
        Ok(Commit)
    }
}

/// A listener behind a trait object ([`BoxListener`]) runs local
/// transactions and answers check-backs like any other: one committed at
/// once, one committed by the check-back, each visible once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_boxed_listener_commits_and_answers_check_backs() {
    let topic = "t-boxed";
    let cluster = cluster_with(|_| {}).await;
    create_topic(&cluster, topic, 1).await;
    let producer: TransactionProducer<BoxListener> = TransactionProducer::builder()
        .nameserver(&cluster.nameserver)
        .group("boxed-pg")
        .listener(BoxListener::new(ByBody))
        .start()
        .await
        .expect("transaction producer starts");
    let now = producer
        .send_in_transaction(Message::new(topic, "now"))
        .await
        .unwrap();
    assert!(now.committed(), "{:?}", now.end);
    let later = producer
        .send_in_transaction(Message::new(topic, "later"))
        .await
        .unwrap();
    assert!(matches!(later.end, TxEnd::NotSent), "{:?}", later.end);
    assert!(later.pending());
    let admin = cluster.admin().await;
    eventually(
        "the check-back's commit",
        Duration::from_secs(10),
        async || tx_info(&admin, later.tx_id).await.is_none().then_some(()),
    )
    .await;
    let counts = visible_ids(&cluster, topic).await;
    assert_eq!(counts.get(&now.msg_id), Some(&1));
    assert_eq!(counts.get(&later.msg_id), Some(&1));
    assert_eq!(counts.len(), 2);
    producer.close().await.unwrap();
    admin.close().await.unwrap();
    cluster.shutdown().await;
}
