//! Transactions under the faults a power cut, a careless caller or a slow
//! listener bring: each test fails without the fix it names (issue 11).
//!
//! - a transaction id is never handed out twice by a data directory, even
//!   when a lost tail takes the record it named, and an end that names the
//!   wrong first message is refused;
//! - a message id reused by a second transaction is refused, never merged
//!   into the first; a prepare retried after its transaction ended is
//!   refused, never a second transaction;
//! - a prepare not stored `SEND_OK` is rolled back without running the
//!   local transaction;
//! - a delay on a transactional message is refused;
//! - a check answered later than the broker waits still ends the
//!   transaction; a check whose connection closes after it was sent counts.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{
    create_topic, pending, record_starts, segments, start_broker, wait_for_list, wait_for_route,
};
use txmq::{
    Admin, BoxError, CheckRequest, ErrorCode, Message, MsgId, SendStatus, TransactionListener,
    TransactionProducer, TransactionState, TxAction, TxContext, TxEnd, TxState,
};
use txmq_broker::{FlushMode, TxConfig};
use txmq_protocol::{
    EndTransaction, Ended, HalfMessage, Hello, PrepareTransaction, Prepared, Request, Response,
    Role, TxSource, WireError, PROTOCOL_VERSION,
};
use txmq_remoting::connection_types::BoxFuture;
use txmq_remoting::{Connection, ConnectionConfig, Service};
use txmq_tests::{consume_all, json_lines, txmq_cli, Cluster};

/// A listener: the local transaction answers `local`; a check waits
/// `check_delay`, then answers `check`. Counts both.
struct Fixed {
    local: TransactionState,
    check: TransactionState,
    check_delay: Duration,
    executed: AtomicUsize,
    checked: AtomicUsize,
}

impl Fixed {
    fn new(local: TransactionState, check: TransactionState) -> Arc<Fixed> {
        Arc::new(Fixed {
            local,
            check,
            check_delay: Duration::ZERO,
            executed: AtomicUsize::new(0),
            checked: AtomicUsize::new(0),
        })
    }
}

impl TransactionListener for Fixed {
    async fn execute(&self, _: &Message, _: &TxContext) -> Result<TransactionState, BoxError> {
        self.executed.fetch_add(1, Ordering::SeqCst);
        Ok(self.local)
    }

    async fn check(&self, _: &CheckRequest) -> Result<TransactionState, BoxError> {
        self.checked.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.check_delay).await;
        Ok(self.check)
    }
}

async fn producer(ns: &str, group: &str, listener: Arc<Fixed>) -> TransactionProducer<Fixed> {
    TransactionProducer::builder()
        .nameserver(ns)
        .group(group)
        .listener_arc(listener)
        .start()
        .await
        .expect("transaction producer starts")
}

/// Transaction settings with short intervals; `tweak` adjusts them.
async fn cluster(flush: FlushMode, tweak: impl FnOnce(&mut TxConfig)) -> Cluster {
    let mut c = Cluster::nameserver_only(Duration::from_secs(30)).await;
    c.add_broker("broker-a", |cfg| {
        cfg.flush = flush;
        cfg.transactions = TxConfig {
            timeout: Duration::from_secs(60),
            check_interval: Duration::from_millis(200),
            check_max: 3,
            check_rate: 100,
            check_timeout: Duration::from_secs(2),
        };
        tweak(&mut cfg.transactions);
    })
    .await;
    c
}

/// A producer's connection of its own to the broker at `addr`, answering
/// broker requests with `service`.
async fn raw_conn(
    addr: &str,
    group: Option<&str>,
    service: Option<Arc<dyn Service>>,
) -> Connection {
    let hello = Hello {
        version: PROTOCOL_VERSION,
        role: if group.is_some() {
            Role::TransactionProducer
        } else {
            Role::Producer
        },
        client_id: format!("raw-{}", MsgId::generate()),
        group: group.map(str::to_string),
    };
    Connection::connect(addr, hello, service, ConnectionConfig::default())
        .await
        .expect("connect to the broker")
}

fn prepare_request(
    group: &str,
    message: txmq::WireMessage,
    attempt: Option<u64>,
) -> PrepareTransaction {
    PrepareTransaction {
        producer: None,
        offsets: Vec::new(),
        producer_group: group.into(),
        messages: vec![HalfMessage { queue: 0, message }],
        first_check_delay_ms: None,
        attempt,
    }
}

fn end_request(tx_id: u64, action: TxAction, msg_id: Option<MsgId>) -> EndTransaction {
    EndTransaction {
        producer: None,
        tx_id,
        action,
        source: TxSource::Producer,
        msg_id,
    }
}

fn code(e: &txmq::RemotingError) -> Option<ErrorCode> {
    e.remote().map(|w| w.code)
}

fn bodies(messages: &[txmq::ReceivedMessage]) -> Vec<String> {
    messages
        .iter()
        .map(|m| String::from_utf8_lossy(m.body()).into_owned())
        .collect()
}

/// `txmq --output json tx send TOPIC --group G --body B --local unknown`:
/// (tx id, msg id).
fn cli_send_unknown(ns: &str, topic: &str, group: &str, body: &str) -> (u64, MsgId) {
    let out = tokio::task::block_in_place(|| {
        txmq_cli(
            ns,
            &[
                "--output", "json", "tx", "send", topic, "--group", group, "--body", body,
                "--local", "unknown",
            ],
            None,
        )
    });
    assert!(
        out.status.success(),
        "tx send failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = json_lines(&out.stdout).pop().expect("one outcome line");
    let tx_id = v["tx_id"].as_u64().expect("tx_id");
    let msg_id = MsgId::parse(v["msg_id"].as_str().expect("msg_id")).expect("a msg id");
    (tx_id, msg_id)
}

/// The reproduction: a prepared transaction's record lost with the
/// unsynced tail (here: the last 40 bytes zeroed after a `kill -9`); the
/// next prepare after the restart must get another id, and ends that name
/// the lost id, or the wrong first message, must end nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_id_is_never_handed_out_twice_after_a_lost_tail() {
    let cluster = Cluster::nameserver_only(Duration::from_secs(30)).await;
    let ns = cluster.nameserver.clone();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("broker-a");
    let mut broker = start_broker(&data, &ns, "broker-a", &["--transaction-timeout", "60s"]).await;
    create_topic(&ns, "tt", 1).await;

    let (lost_tx, lost_msg) = cli_send_unknown(&ns, "tt", "g1", "a");
    tokio::task::block_in_place(|| broker.kill9());
    // Lose the unsynced tail: the end of the half message.
    let segment = segments(&data)
        .into_iter()
        .rev()
        .find(|s| record_starts(s).len() > 1)
        .expect("a segment with records");
    let end = *record_starts(&segment).last().unwrap();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&segment)
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, &[0u8; 40], end - 40).unwrap();
    drop(file);
    tokio::task::block_in_place(|| broker.restart());
    txmq_tests::wait_for_broker(&ns, "broker-a").await;
    wait_for_route(&ns, "tt", &["broker-a"]).await;

    let (tx, msg) = cli_send_unknown(&ns, "tt", "g2", "b");
    assert_ne!(
        tx, lost_tx,
        "a new transaction got the id of the one lost with the tail"
    );
    let admin = Admin::connect([ns.as_str()]).await.unwrap();
    let listed: Vec<u64> = pending(&admin).await.iter().map(|t| t.tx_id).collect();
    assert_eq!(listed, vec![tx], "only the new transaction is pending");

    // The first producer's late end, and an operator's resolve of the lost id.
    let conn = raw_conn(&broker.addr, None, None).await;
    let late = conn
        .call(end_request(lost_tx, TxAction::Commit, Some(lost_msg)))
        .await;
    assert_eq!(
        late.as_ref().err().and_then(code),
        Some(ErrorCode::UnknownTransaction),
        "{late:?}"
    );
    let resolve = tokio::task::block_in_place(|| {
        txmq_cli(
            &ns,
            &["tx", "resolve", &lost_tx.to_string(), "--commit"],
            None,
        )
    });
    assert!(!resolve.status.success(), "resolving the lost id must fail");
    assert!(String::from_utf8_lossy(&resolve.stderr).contains("UNKNOWN_TRANSACTION"));

    // An end that names the right id with another first message ends nothing.
    let wrong = conn
        .call(end_request(tx, TxAction::Rollback, Some(lost_msg)))
        .await;
    assert_eq!(
        wrong.as_ref().err().and_then(code),
        Some(ErrorCode::UnknownTransaction),
        "{wrong:?}"
    );
    assert_eq!(
        pending(&admin)
            .await
            .iter()
            .map(|t| t.tx_id)
            .collect::<Vec<_>>(),
        vec![tx]
    );
    let ended: Ended = conn
        .call(end_request(tx, TxAction::Commit, Some(msg)))
        .await
        .expect("commit");
    assert_eq!(ended.state, TxState::Committed);
    let got = consume_all(&ns, "reader", "tt", 2, Duration::from_secs(2)).await;
    assert_eq!(
        bodies(&got),
        vec!["b"],
        "only the committed transaction is visible, once"
    );
    conn.close();
    admin.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_reused_by_a_second_transaction_is_refused_never_merged() {
    let c = cluster(FlushMode::Async, |_| {}).await;
    let ns = c.nameserver.clone();
    let listener = Fixed::new(TransactionState::Unknown, TransactionState::Unknown);
    let p = producer(&ns, "pg-reuse", listener.clone()).await;
    // One id fixed by the user, sent again: refused as a duplicate.
    let template = Message::new("reuse", "same").with_msg_id(MsgId::generate());

    let first = p
        .send_in_transaction(template.clone())
        .await
        .expect("first prepare");
    assert_eq!(first.prepare_status, SendStatus::SendOk);
    let second = p.send_in_transaction(template.clone()).await;
    assert_eq!(
        second.as_ref().err().and_then(|e| e.code()),
        Some(ErrorCode::DuplicateMsgId),
        "{second:?}"
    );
    let other_body = Message::new("reuse", "other").with_msg_id(template.msg_id().unwrap());
    let third = p.send_in_transaction(other_body).await;
    assert_eq!(
        third.as_ref().err().and_then(|e| e.code()),
        Some(ErrorCode::DuplicateMsgId),
        "{third:?}"
    );
    assert_eq!(
        listener.executed.load(Ordering::SeqCst),
        1,
        "refused prepares run no local transaction"
    );

    // A retry of the same prepare (same token) is answered with its
    // transaction; the same message under another token is refused.
    let addr = c.brokers[0].local_addr().to_string();
    let conn = raw_conn(&addr, None, None).await;
    let retried = txmq::WireMessage::new("reuse", "retried");
    let a: Prepared = conn
        .call(prepare_request("pg-reuse", retried.clone(), Some(7)))
        .await
        .unwrap();
    let again: Prepared = conn
        .call(prepare_request("pg-reuse", retried.clone(), Some(7)))
        .await
        .unwrap();
    assert_eq!(
        a.tx_id, again.tx_id,
        "a retried prepare finds its transaction"
    );
    let other = conn
        .call(prepare_request("pg-reuse", retried.clone(), Some(8)))
        .await;
    assert_eq!(
        other.as_ref().err().and_then(code),
        Some(ErrorCode::DuplicateMsgId),
        "{other:?}"
    );

    // Ended transactions too: a prepare retried after the end is refused.
    let admin = c.admin().await;
    admin
        .resolve_transaction(first.tx_id, TxAction::Commit, None)
        .await
        .expect("resolve");
    let after_commit = p.send_in_transaction(template.clone()).await;
    assert_eq!(
        after_commit.as_ref().err().and_then(|e| e.code()),
        Some(ErrorCode::TransactionCommitted),
        "{after_commit:?}"
    );
    conn.call(end_request(
        a.tx_id,
        TxAction::Rollback,
        Some(retried.msg_id),
    ))
    .await
    .unwrap();
    let after_rollback = conn
        .call(prepare_request("pg-reuse", retried, Some(7)))
        .await;
    assert_eq!(
        after_rollback.as_ref().err().and_then(code),
        Some(ErrorCode::TransactionRolledBack)
    );

    let listed = pending(&admin).await;
    assert!(listed.is_empty(), "nothing left pending: {listed:?}");
    let got = consume_all(&ns, "reader", "reuse", 3, Duration::from_secs(2)).await;
    assert_eq!(bodies(&got), vec!["same"], "one transaction, visible once");
    conn.close();
    admin.close().await.unwrap();
    p.close().await.unwrap();
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prepare_not_stored_send_ok_is_rolled_back_without_the_local_transaction() {
    let mut c = Cluster::nameserver_only(Duration::from_secs(30)).await;
    // Every answer gives up on its fdatasync at once: FLUSH_DISK_TIMEOUT.
    c.add_broker("broker-a", |cfg| {
        cfg.flush = FlushMode::Sync;
        cfg.sync_flush_timeout = Duration::ZERO;
    })
    .await;
    let ns = c.nameserver.clone();
    let listener = Fixed::new(TransactionState::Commit, TransactionState::Commit);
    let p = producer(&ns, "pg-flush", listener.clone()).await;
    let mut timed_out = 0;
    for i in 0..10 {
        let o = p
            .send_in_transaction(Message::new("flushy", format!("m{i}")))
            .await
            .expect("send");
        if o.prepare_status != SendStatus::SendOk {
            timed_out += 1;
            assert_eq!(o.state, TransactionState::Rollback);
            assert_eq!(o.ended().map(|e| e.state), Some(TxState::RolledBack));
        }
    }
    assert!(timed_out > 0, "no prepare was answered FLUSH_DISK_TIMEOUT");
    assert_eq!(
        listener.executed.load(Ordering::SeqCst),
        10 - timed_out,
        "the local transaction ran only for prepares stored SEND_OK"
    );
    let got = consume_all(&ns, "reader", "flushy", 10, Duration::from_secs(2)).await;
    assert_eq!(got.len(), 10 - timed_out, "only those are visible");
    p.close().await.unwrap();
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_transactional_message_is_refused() {
    let c = cluster(FlushMode::Async, |_| {}).await;
    let listener = Fixed::new(TransactionState::Commit, TransactionState::Commit);
    let p = producer(&c.nameserver, "pg-delay", listener.clone()).await;
    let sent = p
        .send_in_transaction(Message::new("delayed-tx", "later").with_delay(Duration::from_secs(1)))
        .await;
    let e = sent.expect_err("a delayed transactional message is refused");
    assert_eq!(e.code(), Some(ErrorCode::BadArgument), "{e}");
    let message = e
        .wire_error()
        .map(|w| w.message.clone())
        .unwrap_or_default();
    assert!(message.contains("cannot be delayed"), "{message}");
    assert_eq!(listener.executed.load(Ordering::SeqCst), 0);
    let admin = c.admin().await;
    assert!(pending(&admin).await.is_empty());
    admin.close().await.unwrap();
    p.close().await.unwrap();
    c.shutdown().await;
}

/// The broker waits 300 ms for an answer; the listener takes 700 ms. The
/// answer still commits the transaction (sent as an end), and it is never
/// parked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_answered_after_the_brokers_timeout_still_ends_the_transaction() {
    let c = cluster(FlushMode::Async, |t| {
        t.timeout = Duration::from_millis(200);
        t.check_interval = Duration::from_millis(300);
        t.check_timeout = Duration::from_millis(300);
        t.check_max = 2;
    })
    .await;
    let ns = c.nameserver.clone();
    let listener = Arc::new(Fixed {
        local: TransactionState::Unknown,
        check: TransactionState::Commit,
        check_delay: Duration::from_millis(700),
        executed: AtomicUsize::new(0),
        checked: AtomicUsize::new(0),
    });
    let p = producer(&ns, "pg-slow", listener.clone()).await;
    let o = p
        .send_in_transaction(Message::new("slow-check", "slow"))
        .await
        .expect("prepare");
    assert!(matches!(o.end, TxEnd::NotSent), "{:?}", o.end);
    let admin = c.admin().await;
    wait_for_list(
        &admin,
        Duration::from_secs(10),
        "the slow answer to commit",
        |l| l.is_empty(),
    )
    .await;
    let got = consume_all(&ns, "reader", "slow-check", 2, Duration::from_secs(2)).await;
    assert_eq!(
        bodies(&got),
        vec!["slow"],
        "committed by the late answer, once"
    );
    let list = admin.list_transactions(None).await.unwrap();
    assert_eq!(list[0].counters.parked, 0, "never parked");
    assert_eq!(list[0].counters.committed, 1);
    admin.close().await.unwrap();
    p.close().await.unwrap();
    c.shutdown().await;
}

/// A producer that dies on every check (its connection closes after the
/// check reached it): the checks count, and the transaction is parked
/// after the maximum instead of being checked forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_whose_connection_closes_after_it_was_sent_counts() {
    struct DiesOnCheck;
    impl Service for DiesOnCheck {
        fn call(&self, conn: &Connection, _: Request) -> BoxFuture<Result<Response, WireError>> {
            conn.close();
            Box::pin(std::future::pending())
        }
    }
    let c = cluster(FlushMode::Async, |t| {
        t.timeout = Duration::from_millis(100);
        t.check_interval = Duration::from_millis(100);
        t.check_max = 2;
    })
    .await;
    let addr = c.brokers[0].local_addr().to_string();
    let conn = raw_conn(&addr, None, None).await;
    let prepared: Prepared = conn
        .call(prepare_request(
            "pg-dies",
            txmq::WireMessage::new("dies", "x"),
            Some(1),
        ))
        .await
        .expect("prepare");
    conn.close();
    let admin = c.admin().await;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let list = pending(&admin).await;
        let t = list
            .iter()
            .find(|t| t.tx_id == prepared.tx_id)
            .expect("still listed");
        if t.state == TxState::Parked {
            assert_eq!(t.checks, 2, "parked after the maximum of counted checks");
            break;
        }
        assert!(Instant::now() < deadline, "never parked: {t:?}");
        // A fresh producer of the group, which the next check kills.
        let dying = raw_conn(&addr, Some("pg-dies"), Some(Arc::new(DiesOnCheck))).await;
        tokio::time::timeout(Duration::from_secs(2), dying.closed())
            .await
            .ok();
    }
    admin.close().await.unwrap();
    c.shutdown().await;
}

/// A transaction nobody ends no longer pins the log: with a 2 s retention
/// its segment's neighbours expire, it is carried forward (same id), the
/// old segments are deleted, and after a restart it is still listed and
/// can be committed by an operator, visible once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_transaction_does_not_pin_retention_and_is_not_forgotten() {
    let cluster = Cluster::nameserver_only(Duration::from_secs(30)).await;
    let ns = cluster.nameserver.clone();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("broker-a");
    // Segments are 8 MiB (the harness's size): 10 MB of traffic rolls one.
    let args = ["--transaction-timeout", "1h", "--retention", "2s"];
    let mut broker = start_broker(&data, &ns, "broker-a", &args).await;
    create_topic(&ns, "stuck", 1).await;
    create_topic(&ns, "filler", 1).await;
    let (stuck, _) = cli_send_unknown(&ns, "stuck", "pg-stuck", "stuck");
    let producer = txmq::Producer::builder()
        .nameserver(&ns)
        .build()
        .await
        .unwrap();
    for _ in 0..100 {
        producer
            .send(Message::new("filler", vec![b'x'; 100_000]))
            .await
            .unwrap();
    }
    producer.close().await.unwrap();
    let first_segment = data.join("commitlog").join(format!("{:020}", 0));
    let deadline = Instant::now() + Duration::from_secs(20);
    while first_segment.exists() {
        assert!(
            Instant::now() < deadline,
            "the stuck transaction's segment was never deleted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::task::block_in_place(|| broker.restart());
    txmq_tests::wait_for_broker(&ns, "broker-a").await;
    wait_for_route(&ns, "stuck", &["broker-a"]).await;
    let admin = Admin::connect([ns.as_str()]).await.unwrap();
    let listed: Vec<u64> = pending(&admin).await.iter().map(|t| t.tx_id).collect();
    assert_eq!(
        listed,
        vec![stuck],
        "still pending under its id after the restart"
    );
    let out = tokio::task::block_in_place(|| {
        txmq_cli(
            &ns,
            &["tx", "resolve", &stuck.to_string(), "--commit"],
            None,
        )
    });
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = consume_all(&ns, "reader", "stuck", 2, Duration::from_secs(2)).await;
    assert_eq!(bodies(&got), vec!["stuck"]);
    assert!(broker.log_text().contains("carried forward past retention"));
    admin.close().await.unwrap();
}

/// `close` waits for a check-back decided after the broker stopped waiting
/// (its late commit is sent), as its docs say: the late decision was left
/// out of what `close` waits for, so the producer closed at once, the
/// commit was never sent, and the transaction stayed pending with no
/// producer to answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_waits_for_a_late_check_back_decision_and_sends_it() {
    let c = cluster(FlushMode::Async, |t| {
        t.timeout = Duration::from_millis(200);
        t.check_interval = Duration::from_millis(300);
        t.check_timeout = Duration::from_millis(300);
        // Never parked while the late answer is on its way.
        t.check_max = 20;
    })
    .await;
    let ns = c.nameserver.clone();
    let listener = Arc::new(Fixed {
        local: TransactionState::Unknown,
        check: TransactionState::Commit,
        check_delay: Duration::from_millis(1000),
        executed: AtomicUsize::new(0),
        checked: AtomicUsize::new(0),
    });
    let p = producer(&ns, "pg-late-close", listener.clone()).await;
    p.send_in_transaction(Message::new("late-close", "late"))
        .await
        .expect("prepare");
    // The first check-back has reached the listener, which decides later.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while listener.checked.load(Ordering::SeqCst) == 0 {
        assert!(std::time::Instant::now() < deadline, "no check-back came");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    p.close()
        .await
        .expect("every check-back decided within the close timeout");
    let admin = c.admin().await;
    assert!(
        pending(&admin).await.is_empty(),
        "ended by the late answer before close returned"
    );
    let got = consume_all(&ns, "reader", "late-close", 2, Duration::from_secs(2)).await;
    assert_eq!(bodies(&got), vec!["late"]);
    admin.close().await.unwrap();
    c.shutdown().await;
}
