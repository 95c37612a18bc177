//! The idempotent producer end to end, against real brokers (issue 15):
//!
//! - a reply lost on the way back (the proxy drops it after the request
//!   went through) to a send, a batch, a prepare and a commit: the client's
//!   retry is answered with the first result and one copy is stored;
//! - a producer sending through ten `kill -9`s of a sync-flush broker, and
//!   through power cuts: every acknowledged message consumed once, nothing
//!   twice;
//! - bad stamps on a raw connection (a sequence gap, an id never handed
//!   out, an expired id, another connection's id with a wrong token): their
//!   codes, nothing stored, the connection still served;
//! - `txmq send --idempotence false|bad`;
//! - the producer table survives a clean stop and a `kill -9`: a retried
//!   stamp is still answered as a duplicate with its first offsets.
//! - one `Producer` and one `TransactionProducer`, each shared by 16
//!   tasks: every message once, and no stamp refused as out of order.
//! - a send and a transaction abandoned by their caller while in flight:
//!   later ones go on at once, and an abandoned prepare the broker holds is
//!   settled by check-back.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{body_text, connect_as, create_topic, jitter, start_broker, txmq, wait_for_route};
use txmq::{
    BoxError, CheckRequest, ErrorCode, Message, Producer, SendStatus, TransactionListener,
    TransactionProducer, TransactionState, TxContext,
};
use txmq_broker::FlushMode;
use txmq_protocol::{
    InitProducer, Ping, ProducerIdentity, ProducerStamp, QueryOffset, Role, SendRequest, SendResult,
};
use txmq_remoting::Connection;
use txmq_tests::lazyfs::LazyFs;
use txmq_tests::proxy::Proxy;
use txmq_tests::{consume_all, Cluster};

/// How often each body and each msg id was consumed; panics when any was
/// consumed twice, or when an acknowledged body is missing, or when a body
/// was consumed that was never sent.
fn assert_exactly(got: &[txmq::ReceivedMessage], acked: &HashSet<String>, sent: &HashSet<String>) {
    let mut bodies: HashMap<String, usize> = HashMap::new();
    let mut ids: HashMap<String, usize> = HashMap::new();
    for m in got {
        *bodies.entry(body_text(m)).or_default() += 1;
        *ids.entry(m.msg_id().to_string()).or_default() += 1;
    }
    let twice: Vec<_> = bodies.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "bodies consumed twice: {twice:?}");
    let twice: Vec<_> = ids.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "msg ids consumed twice: {twice:?}");
    let lost: Vec<_> = acked.iter().filter(|b| !bodies.contains_key(*b)).collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged messages lost, e.g. {:?}",
        lost.len(),
        acked.len(),
        &lost[..lost.len().min(5)]
    );
    let strangers: Vec<_> = bodies.keys().filter(|b| !sent.contains(*b)).collect();
    assert!(strangers.is_empty(), "never sent: {strangers:?}");
}

/// A cluster whose one broker, `broker-a`, is reached only through `proxy`.
async fn proxied_cluster(proxy: &Proxy) -> Cluster {
    let mut cluster = Cluster::nameserver_only(Duration::from_secs(30)).await;
    let via = proxy.addr().to_string();
    let addr = cluster
        .add_broker("broker-a", |c| {
            c.flush = FlushMode::Sync;
            c.advertise_addr = Some(via.clone());
            c.transactions.timeout = Duration::from_millis(500);
            c.transactions.check_interval = Duration::from_millis(100);
        })
        .await;
    proxy.set_target(&addr.to_string());
    cluster
}

/// Drops the reply to the next request that goes up through `proxy` while
/// `call` runs; asserts that one reply was dropped.
async fn with_reply_dropped<T>(proxy: &Proxy, call: impl std::future::Future<Output = T>) -> T {
    let before = proxy.stats().replies_dropped;
    proxy.drop_next_reply();
    let out = call.await;
    assert!(!proxy.drop_pending(), "no request went up");
    assert_eq!(proxy.stats().replies_dropped, before + 1);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_or_a_batch_whose_reply_was_lost_is_stored_once_and_answered_as_first() {
    const TOPIC: &str = "lost-reply";
    let proxy = Proxy::bind().await.unwrap();
    let cluster = proxied_cluster(&proxy).await;
    let ns = cluster.nameserver.clone();
    create_topic(&ns, TOPIC, 2).await;
    let producer = Producer::builder()
        .nameserver(&ns)
        .send_timeout(Duration::from_secs(2))
        .build()
        .await
        .unwrap();
    // The connection and the producer id, before any reply is dropped.
    let warm = producer.send(Message::new(TOPIC, "warm")).await.unwrap();
    assert!(!warm.duplicate);

    let single = with_reply_dropped(&proxy, producer.send(Message::new(TOPIC, "single")))
        .await
        .expect("the retry is answered");
    assert_eq!(single.status, SendStatus::SendOk);
    assert!(single.duplicate, "the retry was a duplicate: {single:?}");

    let batch: Vec<Message> = (0..3)
        .map(|i| Message::new(TOPIC, format!("batch-{i}")))
        .collect();
    let receipts = with_reply_dropped(&proxy, producer.send_batch(batch))
        .await
        .expect("the batch's retry is answered");
    assert_eq!(receipts.len(), 3);
    assert!(receipts.iter().all(|r| r.duplicate), "{receipts:?}");
    let queue = receipts[0].queue;
    let offsets: Vec<u64> = receipts.iter().map(|r| r.queue_offset).collect();
    assert!(receipts.iter().all(|r| r.queue == queue));
    assert_eq!(offsets, (offsets[0]..offsets[0] + 3).collect::<Vec<_>>());

    let got = consume_all(&ns, "cg", TOPIC, 5, Duration::from_secs(2)).await;
    let sent: HashSet<String> = ["warm", "single", "batch-0", "batch-1", "batch-2"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_exactly(&got, &sent, &sent);
    assert_eq!(got.len(), 5);
    // The receipts name where the messages really are.
    let stored: HashMap<String, (u32, u64)> = got
        .iter()
        .map(|m| (body_text(m), (m.queue(), m.queue_offset())))
        .collect();
    assert_eq!(stored["single"], (single.queue, single.queue_offset));
    for (i, r) in receipts.iter().enumerate() {
        assert_eq!(stored[&format!("batch-{i}")], (r.queue, r.queue_offset));
    }
    producer.close().await.unwrap();
    cluster.shutdown().await;
}

/// Commits every transaction; when `arm` is set, drops the reply to what
/// goes up next (the commit) from inside the local transaction.
struct DropEnd {
    proxy: Arc<Proxy>,
    arm: AtomicBool,
    executed: AtomicUsize,
}

impl TransactionListener for DropEnd {
    async fn execute(&self, _: &Message, _: &TxContext) -> Result<TransactionState, BoxError> {
        self.executed.fetch_add(1, Ordering::SeqCst);
        if self.arm.swap(false, Ordering::SeqCst) {
            self.proxy.drop_next_reply();
        }
        Ok(TransactionState::Commit)
    }

    async fn check(&self, _: &CheckRequest) -> Result<TransactionState, BoxError> {
        // A second transaction of one message would be committed here.
        Ok(TransactionState::Commit)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prepare_or_a_commit_whose_reply_was_lost_makes_one_transaction_and_one_copy() {
    const TOPIC: &str = "lost-tx-reply";
    let proxy = Arc::new(Proxy::bind().await.unwrap());
    let cluster = proxied_cluster(&proxy).await;
    let ns = cluster.nameserver.clone();
    create_topic(&ns, TOPIC, 1).await;
    let listener = Arc::new(DropEnd {
        proxy: proxy.clone(),
        arm: AtomicBool::new(false),
        executed: AtomicUsize::new(0),
    });
    let producer = TransactionProducer::builder()
        .nameserver(&ns)
        .group("pg-lost")
        .listener_arc(listener.clone())
        .send_timeout(Duration::from_secs(2))
        .start()
        .await
        .unwrap();
    let warm = producer
        .send_in_transaction(Message::new(TOPIC, "warm"))
        .await
        .unwrap();
    assert_eq!(warm.state, TransactionState::Commit);

    // The prepare's reply is lost: the retry gets the same transaction.
    let prepared = with_reply_dropped(
        &proxy,
        producer.send_in_transaction(Message::new(TOPIC, "prepare-lost")),
    )
    .await
    .expect("the prepare's retry is answered");
    assert_eq!(prepared.state, TransactionState::Commit);
    assert!(prepared.ended().is_some());
    assert_ne!(prepared.tx_id, warm.tx_id);

    // The commit's reply is lost: the retried commit answers OK.
    listener.arm.store(true, Ordering::SeqCst);
    let before = proxy.stats().replies_dropped;
    let committed = producer
        .send_in_transaction(Message::new(TOPIC, "commit-lost"))
        .await
        .expect("the commit's retry is answered");
    assert_eq!(proxy.stats().replies_dropped, before + 1);
    assert_eq!(committed.state, TransactionState::Commit);
    assert!(committed.ended().is_some(), "{committed:?}");
    assert_eq!(listener.executed.load(Ordering::SeqCst), 3);

    // Nothing is left pending (a second transaction of a message would be,
    // and a check-back would then commit it a second time).
    let admin = cluster.admin().await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let pending = common::pending(&admin).await;
    assert!(pending.is_empty(), "pending: {pending:?}");
    let got = consume_all(&ns, "cg", TOPIC, 4, Duration::from_secs(2)).await;
    let sent: HashSet<String> = ["warm", "prepare-lost", "commit-lost"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_exactly(&got, &sent, &sent);
    assert_eq!(got.len(), 3);
    admin.close().await.unwrap();
    producer.close().await.unwrap();
    cluster.shutdown().await;
}

/// Senders that each send one message after another, each one again and
/// again (the same message, the same msg id) until it is acknowledged, as
/// a careful application does; `fault` runs `rounds` times in between.
/// Returns (acknowledged, attempted) bodies.
async fn send_through_faults<F, Fut>(
    ns: &str,
    topic: &str,
    rounds: u64,
    mut fault: F,
) -> (HashSet<String>, HashSet<String>)
where
    F: FnMut(u64) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let producer = Producer::builder()
        .nameserver(ns)
        .send_timeout(Duration::from_secs(1))
        .build()
        .await
        .unwrap();
    let acked = Arc::new(Mutex::new(HashSet::new()));
    let sent = Arc::new(Mutex::new(HashSet::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut senders = Vec::new();
    for p in 0..2 {
        let (producer, acked, sent, stop) =
            (producer.clone(), acked.clone(), sent.clone(), stop.clone());
        let topic = topic.to_string();
        senders.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let body = format!("p{p}-{i}");
                // Every attempt of this loop is the same message: its id is
                // fixed before the first, and the broker stores it once.
                let message =
                    Message::new(topic.as_str(), body.clone()).with_msg_id(txmq::MsgId::generate());
                sent.lock().unwrap().insert(body.clone());
                loop {
                    match producer.send(message.clone()).await {
                        Ok(r) if r.status == SendStatus::SendOk => break,
                        Ok(r) => panic!("{body}: {r:?}"),
                        Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                }
                acked.lock().unwrap().insert(body);
                i += 1;
            }
        }));
    }
    for round in 0..rounds {
        tokio::time::sleep(jitter(
            Duration::from_millis(200),
            Duration::from_millis(600),
        ))
        .await;
        fault(round).await;
    }
    // Let every sender get its message through after the last fault.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for s in senders {
        tokio::time::timeout(Duration::from_secs(30), s)
            .await
            .expect("the senders finish")
            .expect("sender");
    }
    producer.close().await.unwrap();
    let acked = acked.lock().unwrap().clone();
    let sent = sent.lock().unwrap().clone();
    (acked, sent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_sending_through_ten_kill9s_stores_each_message_once() {
    const TOPIC: &str = "kill9";
    let cluster = Cluster::nameserver_only(Duration::from_secs(30)).await;
    let ns = cluster.nameserver.clone();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("broker-a");
    let broker = Arc::new(Mutex::new(
        start_broker(&data, &ns, "broker-a", &["--flush", "sync"]).await,
    ));
    create_topic(&ns, TOPIC, 2).await;
    let (acked, sent) = send_through_faults(&ns, TOPIC, 10, |_| {
        let broker = broker.clone();
        async move {
            tokio::task::block_in_place(|| broker.lock().unwrap().restart());
        }
    })
    .await;
    assert!(
        acked.len() > 50,
        "the workload sent little: {}",
        acked.len()
    );
    let got = consume_all(&ns, "cg", TOPIC, usize::MAX, Duration::from_secs(3)).await;
    assert_exactly(&got, &acked, &sent);
    eprintln!(
        "{} acknowledged, {} consumed, {} attempted",
        acked.len(),
        got.len(),
        sent.len()
    );
    drop(broker);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_sending_through_power_cuts_stores_each_message_once() {
    const TOPIC: &str = "cut";
    let cluster = Cluster::nameserver_only(Duration::from_secs(30)).await;
    let ns = cluster.nameserver.clone();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("broker-a");
    std::fs::create_dir_all(&data).unwrap();
    let fs = Arc::new(LazyFs::mount(&data).expect("mount the lazy filesystem"));
    let broker = Arc::new(Mutex::new(
        start_broker(&data, &ns, "broker-a", &["--flush", "sync"]).await,
    ));
    create_topic(&ns, TOPIC, 2).await;
    // Five cuts: each is a kill, a dropped cache and a recovery on FUSE.
    let (acked, sent) = send_through_faults(&ns, TOPIC, 5, |round| {
        let (broker, fs) = (broker.clone(), fs.clone());
        async move {
            tokio::task::block_in_place(|| {
                let mut b = broker.lock().unwrap();
                b.kill9();
                fs.power_cut(Some(round)).expect("power cut");
                b.restart();
            });
        }
    })
    .await;
    assert!(
        acked.len() > 20,
        "the workload sent little: {}",
        acked.len()
    );
    let got = consume_all(&ns, "cg", TOPIC, usize::MAX, Duration::from_secs(3)).await;
    assert_exactly(&got, &acked, &sent);
    drop(broker);
    cluster.shutdown().await;
}

/// The broker's end of `topic`/`queue`.
async fn max_offset(conn: &Connection, topic: &str, queue: u32) -> u64 {
    conn.call(QueryOffset {
        group: "probe".into(),
        topic: topic.into(),
        queue,
        stored_since_ms: None,
    })
    .await
    .expect("query offset")
    .max_offset
}

async fn init(conn: &Connection) -> ProducerIdentity {
    conn.call(InitProducer {}).await.expect("init producer")
}

fn stamped(topic: &str, bodies: &[&str], stamp: ProducerStamp) -> SendRequest {
    SendRequest {
        queue: 0,
        messages: bodies
            .iter()
            .map(|b| txmq::WireMessage::new(topic, b.to_string()))
            .collect(),
        producer: Some(stamp),
    }
}

fn stamp(id: &ProducerIdentity, sequence: u64) -> ProducerStamp {
    ProducerStamp {
        producer_id: id.producer_id,
        token: id.token,
        sequence,
    }
}

/// Sends `request` and asserts that it is refused with `code`, that
/// nothing was stored, and that the connection still answers.
async fn assert_refused(conn: &Connection, request: SendRequest, code: ErrorCode) {
    let topic = request.messages[0].topic.clone();
    let before = max_offset(conn, &topic, 0).await;
    let e = conn
        .call(request)
        .await
        .expect_err("a bad stamp is refused");
    let wire = e.remote().unwrap_or_else(|| panic!("not a refusal: {e}"));
    assert_eq!(wire.code, code, "{wire:?}");
    assert!(!wire.message.is_empty());
    assert_eq!(max_offset(conn, &topic, 0).await, before, "stored anyway");
    conn.call(Ping {})
        .await
        .expect("the connection is still served");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_stamps_are_refused_with_their_codes_and_store_nothing() {
    const TOPIC: &str = "stamps";
    let mut cluster = Cluster::nameserver_only(Duration::from_secs(30)).await;
    let addr = cluster
        .add_broker("broker-a", |c| {
            c.producer_id_expiry = Duration::from_secs(1)
        })
        .await
        .to_string();
    create_topic(&cluster.nameserver, TOPIC, 1).await;
    let conn = connect_as(&addr, Role::Producer).await;
    let id = init(&conn).await;
    let first: SendResult = conn
        .call(stamped(TOPIC, &["a", "b"], stamp(&id, 0)))
        .await
        .unwrap();
    assert!(!first.duplicate);

    // A gap: 2 is next, 3 skips one.
    assert_refused(
        &conn,
        stamped(TOPIC, &["c"], stamp(&id, 3)),
        ErrorCode::OutOfOrderSequence,
    )
    .await;
    // An id never handed out.
    let never = ProducerIdentity {
        producer_id: id.producer_id + 1_000_000,
        ..id
    };
    assert_refused(
        &conn,
        stamped(TOPIC, &["c"], stamp(&never, 0)),
        ErrorCode::UnknownProducerId,
    )
    .await;
    // Another connection's id with a wrong token.
    let other = connect_as(&addr, Role::Producer).await;
    let theirs = init(&other).await;
    assert_ne!(theirs.producer_id, id.producer_id);
    let forged = ProducerIdentity {
        token: theirs.token ^ 1,
        ..theirs
    };
    assert_refused(
        &conn,
        stamped(TOPIC, &["c"], stamp(&forged, 0)),
        ErrorCode::ProducerFenced,
    )
    .await;
    // The owner still can use it.
    other
        .call(stamped(TOPIC, &["theirs"], stamp(&theirs, 0)))
        .await
        .expect("the owner's stamp is taken");
    // The right next sequence is taken after the refusals.
    let next = conn
        .call(stamped(TOPIC, &["c"], stamp(&id, 2)))
        .await
        .unwrap();
    assert!(!next.duplicate);
    // Unused for longer than the expiry (1 s): forgotten.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_refused(
        &conn,
        stamped(TOPIC, &["d"], stamp(&id, 3)),
        ErrorCode::UnknownProducerId,
    )
    .await;
    conn.close();
    other.close();
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn txmq_send_takes_idempotence_false_and_refuses_a_bad_value() {
    let cluster = Cluster::start(FlushMode::Async).await;
    let ns = cluster.nameserver.clone();
    create_topic(&ns, "plain", 1).await;
    let out = txmq(
        &ns,
        &[
            "send",
            "plain",
            "--body",
            "not stamped",
            "--idempotence",
            "false",
        ],
        None,
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = consume_all(&ns, "cg", "plain", 1, Duration::from_secs(2)).await;
    assert_eq!(
        got.iter().map(body_text).collect::<Vec<_>>(),
        ["not stamped"]
    );

    let out = txmq(
        &ns,
        &["send", "plain", "--body", "x", "--idempotence", "maybe"],
        None,
    )
    .await;
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--idempotence") && stderr.contains("maybe"),
        "{stderr}"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_producer_table_survives_a_clean_stop_and_a_kill9() {
    const TOPIC: &str = "table";
    let cluster = Cluster::nameserver_only(Duration::from_secs(30)).await;
    let ns = cluster.nameserver.clone();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("broker-a");
    let mut broker = start_broker(&data, &ns, "broker-a", &["--flush", "sync"]).await;
    create_topic(&ns, TOPIC, 1).await;
    let conn = connect_as(&broker.addr, Role::Producer).await;
    let id = init(&conn).await;
    let request = stamped(TOPIC, &["x", "y", "z"], stamp(&id, 0));
    let first = conn.call(request.clone()).await.unwrap();
    assert!(!first.duplicate);
    conn.close();

    for how in ["a clean stop", "kill -9"] {
        tokio::task::block_in_place(|| {
            if how == "kill -9" {
                broker.kill9();
            } else {
                assert_eq!(broker.stop(), Some(0), "{}", broker.log_text());
            }
            broker.restart();
        });
        wait_for_route(&ns, TOPIC, &["broker-a"]).await;
        let conn = connect_as(&broker.addr, Role::Producer).await;
        let before = max_offset(&conn, TOPIC, 0).await;
        let again = conn
            .call(request.clone())
            .await
            .unwrap_or_else(|e| panic!("after {how}: {e}"));
        assert!(again.duplicate, "after {how}: {again:?}");
        assert_eq!(again.first_offset, first.first_offset, "after {how}");
        assert_eq!(again.msg_ids, first.msg_ids, "after {how}");
        assert_eq!(again.status, SendStatus::SendOk);
        assert_eq!(max_offset(&conn, TOPIC, 0).await, before, "after {how}");
        conn.close();
    }
    // And the sequence goes on from where it was.
    let conn = connect_as(&broker.addr, Role::Producer).await;
    let next = conn
        .call(stamped(TOPIC, &["w"], stamp(&id, 3)))
        .await
        .unwrap();
    assert!(!next.duplicate);
    assert_eq!(next.first_offset, first.first_offset + 3);
    conn.close();
    drop(broker);
    cluster.shutdown().await;
}

/// The table is carried by replication: a stamped batch acknowledged under
/// sync replication, then the master gone and its slave's data directory
/// started as the group's master (a manual switch; controller failover is
/// tested elsewhere): the same stamp is recognised there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slave_holds_the_producer_table_and_recognises_a_retry_after_a_switch() {
    const TOPIC: &str = "replicated";
    let cluster = Cluster::nameserver_only(Duration::from_secs(30)).await;
    let ns = cluster.nameserver.clone();
    let tmp = tempfile::tempdir().unwrap();
    let master_flags = [
        "--flush",
        "sync",
        "--replication",
        "sync",
        "--min-insync-replicas",
        "2",
        "--replication-timeout",
        "2s",
    ];
    let mut master = start_broker(&tmp.path().join("master"), &ns, "broker-a", &master_flags).await;
    create_topic(&ns, TOPIC, 1).await;
    let slave_data = tmp.path().join("slave");
    let mut slave = start_broker(
        &slave_data,
        &ns,
        "broker-a",
        &[
            "--flush",
            "sync",
            "--role",
            "slave",
            "--master-addr",
            &master.addr,
        ],
    )
    .await;
    let slave_addr = slave.addr.clone();
    common::wait_until("the slave is in sync", Duration::from_secs(15), || async {
        common::replication(&master.addr)
            .await
            .replicas
            .iter()
            .any(|r| r.addr == slave_addr && r.in_sync)
    })
    .await;

    let conn = connect_as(&master.addr, Role::Producer).await;
    let id = init(&conn).await;
    let request = stamped(TOPIC, &["r1", "r2"], stamp(&id, 0));
    let first = conn.call(request.clone()).await.unwrap();
    assert_eq!(first.status, SendStatus::SendOk, "the slave holds it");
    conn.close();

    tokio::task::block_in_place(|| {
        master.kill9();
        slave.kill9();
    });
    let promoted = start_broker(&slave_data, &ns, "broker-a", &["--flush", "sync"]).await;
    let conn = connect_as(&promoted.addr, Role::Producer).await;
    let before = max_offset(&conn, TOPIC, 0).await;
    let again = conn
        .call(request)
        .await
        .unwrap_or_else(|e| panic!("the retry at the former slave: {e}"));
    assert!(again.duplicate, "{again:?}");
    assert_eq!(again.first_offset, first.first_offset);
    assert_eq!(again.msg_ids, first.msg_ids);
    assert_eq!(max_offset(&conn, TOPIC, 0).await, before);
    // The producer's next sequence follows on.
    let next = conn
        .call(stamped(TOPIC, &["r3"], stamp(&id, 2)))
        .await
        .unwrap();
    assert!(!next.duplicate);
    assert_eq!(next.first_offset, first.first_offset + 2);
    conn.close();
    drop((master, slave, promoted));
    cluster.shutdown().await;
}

/// Sends pipelined on one connection to a topic the first of them creates
/// (auto-create) are stored in their order: the first waits for the
/// nameservers only after its append, so the next sequences cannot
/// overtake it and be refused as out of order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_sends_to_an_auto_created_topic_keep_their_order() {
    const TOPIC: &str = "auto-created";
    let mut cluster = Cluster::nameserver_only(Duration::from_secs(30)).await;
    let addr = cluster.add_broker("broker-a", |_| {}).await.to_string();
    let conn = connect_as(&addr, Role::Producer).await;
    let id = init(&conn).await;
    let sends = (0..5u64).map(|seq| {
        let conn = conn.clone();
        let body = format!("m{seq}");
        async move { conn.call(stamped(TOPIC, &[&body], stamp(&id, seq))).await }
    });
    let results = futures_util::future::join_all(sends).await;
    for (seq, r) in results.into_iter().enumerate() {
        let r = r.unwrap_or_else(|e| panic!("send {seq} refused: {e}"));
        assert_eq!(r.first_offset, seq as u64, "send {seq} stored in its place");
    }
}

/// The broker's `/metrics` text.
async fn scrape(addr: &str) -> String {
    let addr = addr.to_string();
    tokio::task::spawn_blocking(move || {
        txmq_tests::metrics::http_get(&addr, "/metrics")
            .expect("the broker serves /metrics")
            .1
    })
    .await
    .unwrap()
}

/// Commits every transaction.
struct CommitAll;

impl TransactionListener for CommitAll {
    async fn execute(&self, _: &Message, _: &TxContext) -> Result<TransactionState, BoxError> {
        Ok(TransactionState::Commit)
    }

    async fn check(&self, _: &CheckRequest) -> Result<TransactionState, BoxError> {
        Ok(TransactionState::Commit)
    }
}

/// One idempotent producer shared by 16 tasks (as the producers of one
/// process are), and one transaction producer shared the same way: every
/// message is stored once, and the stamped requests reach the broker in the
/// order of their sequences, so the broker refuses none as out of order
/// (`txmq_producer_stamps_refused_total`; before, a sequence drawn before
/// the wait for a connection was often overtaken by a later one, refused,
/// and retried after a pause, or made the producer take a new id). A
/// sequence sent with a gap on purpose then shows in that counter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_shared_by_sixteen_tasks_sends_in_sequence_order() {
    const TOPIC: &str = "shared";
    const TASKS: usize = 16;
    const EACH: usize = 60;
    let cluster = Cluster::nameserver_only(Duration::from_secs(30)).await;
    let ns = cluster.nameserver.clone();
    let tmp = tempfile::tempdir().unwrap();
    let metrics = format!("127.0.0.1:{}", txmq_tests::free_port());
    let broker = start_broker(
        &tmp.path().join("broker-a"),
        &ns,
        "broker-a",
        &["--metrics-listen", &metrics],
    )
    .await;
    create_topic(&ns, TOPIC, 4).await;
    let producer = Producer::builder().nameserver(&ns).build().await.unwrap();
    let tx_producer = TransactionProducer::builder()
        .nameserver(&ns)
        .group("pg-shared")
        .listener(CommitAll)
        .start()
        .await
        .unwrap();
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            let (producer, tx_producer) = (producer.clone(), tx_producer.clone());
            tokio::spawn(async move {
                for i in 0..EACH {
                    let body = format!("{t}-{i}");
                    if i % 4 == 3 {
                        let r = tx_producer
                            .send_in_transaction(Message::new(TOPIC, body))
                            .await
                            .unwrap_or_else(|e| panic!("transaction {t}-{i}: {e}"));
                        assert_eq!(r.state, TransactionState::Commit);
                    } else {
                        producer
                            .send(Message::new(TOPIC, body))
                            .await
                            .unwrap_or_else(|e| panic!("send {t}-{i}: {e}"));
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("sender");
    }
    producer.close().await.unwrap();
    tx_producer.close().await.unwrap();

    let sent: HashSet<String> = (0..TASKS)
        .flat_map(|t| (0..EACH).map(move |i| format!("{t}-{i}")))
        .collect();
    let got = consume_all(&ns, "cg", TOPIC, sent.len(), Duration::from_secs(5)).await;
    assert_exactly(&got, &sent, &sent);
    let text = scrape(&metrics).await;
    let refused: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("txmq_producer_stamps_refused_total{"))
        .collect();
    assert!(
        refused.is_empty(),
        "stamped requests refused (sent out of sequence order?): {refused:?}"
    );
    // The counter does count: a sequence with a gap before it.
    let conn = connect_as(&broker.addr, Role::Producer).await;
    let id = init(&conn).await;
    assert_refused(
        &conn,
        stamped(TOPIC, &["gap"], stamp(&id, 1)),
        ErrorCode::OutOfOrderSequence,
    )
    .await;
    let text = scrape(&metrics).await;
    assert_eq!(
        txmq_tests::metrics::sample(
            &text,
            r#"txmq_producer_stamps_refused_total{code="OUT_OF_ORDER_SEQUENCE"}"#
        ),
        Some(1.0)
    );
    drop(broker);
    cluster.shutdown().await;
}

/// Calls `call` for the bodies `abandoned-0` and `abandoned-1` while every
/// answer through `proxy` takes 300 ms, and abandons each after 100 ms (its
/// request in flight); then heals the proxy.
async fn abandon_twice<F, Fut>(proxy: &Proxy, mut call: F)
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future,
{
    proxy.set_delay(Some((Duration::from_millis(300), Duration::ZERO)));
    for i in 0..2 {
        let abandoned =
            tokio::time::timeout(Duration::from_millis(100), call(format!("abandoned-{i}")));
        assert!(
            abandoned.await.is_err(),
            "the call was still in flight when abandoned"
        );
    }
    proxy.heal();
}

/// A send abandoned by its caller (a timeout around it, a `select!`) after
/// its frame went out: the producer's later sends to that queue go on at
/// once, and every message is stored once (the abandoned one at most once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_abandoned_in_flight_does_not_hold_up_the_queue() {
    const TOPIC: &str = "abandoned";
    let proxy = Proxy::bind().await.unwrap();
    let cluster = proxied_cluster(&proxy).await;
    let ns = cluster.nameserver.clone();
    create_topic(&ns, TOPIC, 1).await;
    // A send waiting for room in its queue's window waits this long before
    // it goes anyway: longer than the whole test is given below.
    let producer = Producer::builder()
        .nameserver(&ns)
        .send_timeout(Duration::from_secs(30))
        .build()
        .await
        .unwrap();
    producer.send(Message::new(TOPIC, "warm")).await.unwrap();

    abandon_twice(&proxy, |body| producer.send(Message::new(TOPIC, body))).await;

    let mut acked = HashSet::new();
    let later = async {
        for i in 0..10 {
            let body = format!("later-{i}");
            producer
                .send(Message::new(TOPIC, body.clone()))
                .await
                .unwrap();
            acked.insert(body);
        }
    };
    tokio::time::timeout(Duration::from_secs(15), later)
        .await
        .expect("later sends waited behind the abandoned ones");
    let mut sent = acked.clone();
    sent.extend(["warm", "abandoned-0", "abandoned-1"].map(String::from));
    acked.insert("warm".into());
    // Everything stored, abandoned ones included: waits until none comes.
    let got = consume_all(&ns, "cg", TOPIC, sent.len(), Duration::from_secs(1)).await;
    assert_exactly(&got, &acked, &sent);
    cluster.shutdown().await;
}

/// A transaction abandoned by its caller while its prepare is in flight:
/// the broker holds it and settles it by check-back with the producer,
/// which stays live; the producer's later transactions go on at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_abandoned_during_its_prepare_is_settled_and_later_ones_go_on() {
    const TOPIC: &str = "abandoned-tx";
    let proxy = Proxy::bind().await.unwrap();
    let cluster = proxied_cluster(&proxy).await;
    let ns = cluster.nameserver.clone();
    create_topic(&ns, TOPIC, 1).await;
    let producer = TransactionProducer::builder()
        .nameserver(&ns)
        .group("pg-abandoned")
        .listener(CommitAll)
        .send_timeout(Duration::from_secs(30))
        .start()
        .await
        .unwrap();
    producer
        .send_in_transaction(Message::new(TOPIC, "warm"))
        .await
        .unwrap();

    abandon_twice(&proxy, |body| {
        producer.send_in_transaction(Message::new(TOPIC, body))
    })
    .await;

    let later = async {
        for i in 0..5 {
            let outcome = producer
                .send_in_transaction(Message::new(TOPIC, format!("later-{i}")))
                .await
                .unwrap();
            assert!(outcome.committed(), "{outcome:?}");
        }
    };
    tokio::time::timeout(Duration::from_secs(15), later)
        .await
        .expect("later transactions waited behind the abandoned ones");
    // An abandoned prepare that reached the broker is not forgotten: the
    // check-back commits it (one still waiting for its producer id when it
    // was abandoned never went out).
    let admin = cluster.admin().await;
    common::wait_for_list(
        &admin,
        Duration::from_secs(10),
        "no transaction pending",
        |l| l.is_empty(),
    )
    .await;
    let acked: HashSet<String> = std::iter::once("warm".to_string())
        .chain((0..5).map(|i| format!("later-{i}")))
        .collect();
    let mut sent = acked.clone();
    sent.extend(["abandoned-0", "abandoned-1"].map(String::from));
    // Everything stored, abandoned ones included: waits until none comes.
    let got = consume_all(&ns, "cg", TOPIC, sent.len(), Duration::from_secs(1)).await;
    assert_exactly(&got, &acked, &sent);
    admin.close().await.unwrap();
    producer.close().await.unwrap();
    cluster.shutdown().await;
}
