//! Consumer offsets inside transactions (consume, transform, produce):
//! committed with the transaction's messages or not at all, refused when
//! they expect another offset or name another broker's queue, and a
//! pipeline that is `kill -9`ed (and its broker too) still makes exactly one
//! output per input.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{create_topic, jitter, start_broker, wait_for_route, wait_until};
use txmq::{
    BoxError, CheckRequest, ConsumedOffset, Error, ErrorCode, Message, PullConsumer,
    ReceivedMessage, TransactionListener, TransactionProducer, TransactionState, TxContext, TxEnd,
    TxState,
};
use txmq_tests::{binary, consume_all, Cluster};

/// Commits, except a message whose body is `rollback` (rolled back) or
/// `unknown` (left to an operator).
struct ByBody;

impl TransactionListener for ByBody {
    async fn execute(&self, m: &Message, _: &TxContext) -> Result<TransactionState, BoxError> {
        Ok(match &m.body()[..] {
            b"rollback" => TransactionState::Rollback,
            b"unknown" => TransactionState::Unknown,
            _ => TransactionState::Commit,
        })
    }

    async fn check(&self, _: &CheckRequest) -> Result<TransactionState, BoxError> {
        Ok(TransactionState::Unknown)
    }
}

async fn tx_producer(ns: &str) -> TransactionProducer<ByBody> {
    TransactionProducer::builder()
        .nameserver(ns)
        .group("transform-pg")
        .listener(ByBody)
        .start()
        .await
        .expect("transaction producer starts")
}

/// `n` messages read from `topic` as `group`, without committing anything.
async fn read_uncommitted(ns: &str, group: &str, topic: &str, n: usize) -> Vec<ReceivedMessage> {
    let mut consumer = PullConsumer::builder()
        .nameserver(ns)
        .group(group)
        .topic(topic)
        .max_wait(Duration::from_millis(200))
        .build()
        .await
        .expect("consumer builds");
    let mut got = Vec::new();
    for _ in 0..50 {
        if got.len() >= n {
            break;
        }
        got.extend(
            consumer
                .poll(Duration::from_millis(200))
                .await
                .expect("poll"),
        );
    }
    // Dropped, not shut down: nothing is committed.
    drop(consumer);
    assert_eq!(got.len(), n, "read {n} messages of {topic}");
    got
}

/// `group`'s committed offset on `queue` of `topic`, as an operator sees it.
async fn committed(ns: &str, group: &str, topic: &str, queue: u32) -> Option<u64> {
    let admin = txmq::Admin::connect([ns]).await.expect("admin connects");
    let states = admin.group_state(group, None).await.expect("group state");
    admin.close().await.unwrap();
    states
        .iter()
        .flat_map(|s| &s.queues)
        .find(|q| q.topic == topic && q.queue == queue)
        .and_then(|q| q.committed)
}

async fn send_inputs(c: &Cluster, topic: &str, n: usize) {
    let producer = c.producer().await;
    for i in 0..n {
        producer
            .send(Message::new(topic, format!("in-{i}")))
            .await
            .expect("input sent");
    }
}

/// Commit: the output is visible and the input's offset committed; the
/// rollback of the next input shows neither; an offset expected where the
/// group no longer is rolls the transaction back with OFFSET_CONFLICT, and
/// nothing of it is visible.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offsets_commit_with_the_transaction_or_not_at_all() {
    let c = Cluster::start(txmq_broker::FlushMode::Sync).await;
    let ns = c.nameserver.clone();
    create_topic(&ns, "in", 1).await;
    create_topic(&ns, "out", 1).await;
    send_inputs(&c, "in", 3).await;
    let inputs = read_uncommitted(&ns, "transform", "in", 3).await;
    let producer = tx_producer(&ns).await;

    // (1) Commit.
    let outcome = producer
        .send_in_transaction_with_offsets(
            vec![Message::new("out", "out-0")],
            vec![ConsumedOffset::after("transform", &inputs[0])],
        )
        .await
        .expect("committed");
    assert_eq!(outcome.ended().map(|e| e.state), Some(TxState::Committed));
    assert_eq!(committed(&ns, "transform", "in", 0).await, Some(1));

    // (2) Rollback: the offset does not move.
    let outcome = producer
        .send_in_transaction_with_offsets(
            vec![Message::new("out", "rollback")],
            vec![ConsumedOffset::after("transform", &inputs[1])],
        )
        .await
        .expect("rolled back");
    assert_eq!(outcome.ended().map(|e| e.state), Some(TxState::RolledBack));
    assert_eq!(committed(&ns, "transform", "in", 0).await, Some(1));

    // (3) A second transaction made from input 0 (expected 0, the group is
    // at 1): rolled back, OFFSET_CONFLICT naming where the group is. The
    // local transaction ran, so the send is Ok and its end says so.
    let outcome = producer
        .send_in_transaction_with_offsets(
            vec![Message::new("out", "out-0-again")],
            vec![ConsumedOffset::after("transform", &inputs[0])],
        )
        .await
        .expect("prepared and decided");
    let TxEnd::Refused(err) = outcome.end else {
        panic!("the commit is refused: {:?}", outcome.end)
    };
    assert_eq!(err.code(), Some(ErrorCode::OffsetConflict), "{err}");
    let text = txmq::error::chain(&err);
    assert!(
        text.contains("'transform'") && text.contains("offset 1") && text.contains("the 0"),
        "{text}"
    );
    assert!(matches!(err, Error::EndTransaction { .. }), "{err:?}");
    assert_eq!(committed(&ns, "transform", "in", 0).await, Some(1));
    let admin = c.admin().await;
    let pending: usize = admin
        .list_transactions(None)
        .await
        .unwrap()
        .iter()
        .map(|l| l.transactions.len())
        .sum();
    assert_eq!(pending, 0, "the conflicting transaction was rolled back");

    // (4) Left pending, then committed by an operator: the offset with it.
    let outcome = producer
        .send_in_transaction_with_offsets(
            vec![Message::new("out", "unknown")],
            vec![ConsumedOffset::after("transform", &inputs[1])],
        )
        .await
        .expect("prepared");
    assert!(matches!(outcome.end, TxEnd::NotSent), "{:?}", outcome.end);
    assert_eq!(committed(&ns, "transform", "in", 0).await, Some(1));
    admin
        .resolve_transaction(outcome.tx_id, txmq::TxAction::Commit, Some("broker-a"))
        .await
        .expect("resolved");
    assert_eq!(committed(&ns, "transform", "in", 0).await, Some(2));

    let out = consume_all(&ns, "check", "out", 10, Duration::from_secs(1)).await;
    let bodies: Vec<String> = out
        .iter()
        .map(|m| String::from_utf8_lossy(m.body()).into_owned())
        .collect();
    assert_eq!(
        bodies,
        vec!["out-0", "unknown"],
        "only the committed outputs are visible"
    );
    producer.close().await.unwrap();
    admin.close().await.unwrap();
    c.shutdown().await;
}

/// Offsets of a queue on another broker are refused: by the client before
/// anything is sent when it can tell, by the broker (BAD_ARGUMENT naming
/// the queue, nothing stored) when a request names them anyway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offsets_of_another_brokers_queue_are_refused() {
    let mut c = Cluster::start(txmq_broker::FlushMode::Async).await;
    let addr_a = c.brokers[0].local_addr().to_string();
    c.add_broker("broker-b", |_| {}).await;
    let ns = c.nameserver.clone();
    let admin = c.admin().await;
    admin
        .create_topic("out", 1, txmq::PERM_READ_WRITE, Some("broker-a"))
        .await
        .unwrap();
    admin
        .create_topic("in-b", 1, txmq::PERM_READ_WRITE, Some("broker-b"))
        .await
        .unwrap();
    wait_for_route(&ns, "out", &["broker-a"]).await;
    wait_for_route(&ns, "in-b", &["broker-b"]).await;
    let producer = tx_producer(&ns).await;

    let on_b = ConsumedOffset::new("transform", "broker-b", "in-b", 0, 0, None);
    let err = producer
        .send_in_transaction_with_offsets(vec![Message::new("out", "x")], vec![on_b.clone()])
        .await
        .expect_err("out has no queue on broker-b");
    assert!(matches!(err, Error::BadArgument(_)), "{err:?}");
    assert!(err.to_string().contains("broker-b"), "{err}");
    let on_a = ConsumedOffset::new("transform", "broker-a", "out", 0, 0, None);
    let err = producer
        .send_in_transaction_with_offsets(vec![Message::new("out", "x")], vec![on_a, on_b])
        .await
        .expect_err("two brokers");
    assert!(matches!(err, Error::BadArgument(_)), "{err:?}");

    // The broker's own check: broker-a has no topic in-b.
    let conn = common::connect_as(&addr_a, txmq_protocol::Role::Producer).await;
    let refused = conn
        .call(txmq_protocol::PrepareTransaction {
            producer_group: "transform-pg".into(),
            messages: vec![txmq_protocol::HalfMessage {
                queue: 0,
                message: txmq::WireMessage::new("out", "x"),
            }],
            first_check_delay_ms: None,
            attempt: Some(1),
            producer: None,
            offsets: vec![txmq_protocol::TxOffset {
                group: "transform".into(),
                topic: "in-b".into(),
                queue: 0,
                offset: 0,
                expected: None,
            }],
        })
        .await
        .expect_err("refused");
    let wire = refused.remote().expect("an answer from the broker");
    assert_eq!(wire.code, ErrorCode::BadArgument, "{wire}");
    assert!(
        wire.message.contains("queue 0 of topic 'in-b'") && wire.message.contains("broker-a"),
        "{wire}"
    );
    conn.close();
    let pending: usize = admin
        .list_transactions(Some("broker-a"))
        .await
        .unwrap()
        .iter()
        .map(|l| l.transactions.len())
        .sum();
    assert_eq!(pending, 0, "nothing stored");
    producer.close().await.unwrap();
    admin.close().await.unwrap();
    c.shutdown().await;
}

/// The `transform-pipeline` process, killed when dropped.
struct Pipeline {
    child: Option<Child>,
    args: Vec<String>,
    log: std::path::PathBuf,
}

impl Pipeline {
    fn start(ns: &str, log: &Path) -> Pipeline {
        let mut p = Pipeline {
            child: None,
            args: vec!["--nameserver".into(), ns.into()],
            log: log.to_path_buf(),
        };
        p.spawn();
        p
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("pipeline log");
        let child = Command::new(binary("transform-pipeline"))
            .args(&self.args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start transform-pipeline");
        self.child = Some(child);
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Inputs sent in rounds; in each, the pipeline, the broker (sync flush)
/// or both are `kill -9`ed at a random moment and restarted. At the end
/// every input has exactly one output: no gap, no duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_killed_at_random_makes_exactly_one_output_per_input() {
    const ROUNDS: usize = 6;
    const PER_ROUND: usize = 150;
    let c = Cluster::nameserver_only(Duration::from_secs(30)).await;
    let ns = c.nameserver.clone();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("broker-a");
    let mut broker = start_broker(
        &data,
        &ns,
        "broker-a",
        &[
            "--flush",
            "sync",
            "--transaction-timeout",
            "1s",
            "--transaction-check-interval",
            "200ms",
            "--transaction-check-timeout",
            "1s",
        ],
    )
    .await;
    create_topic(&ns, "in", 2).await;
    create_topic(&ns, "out", 1).await;
    let mut pipeline = tokio::task::block_in_place(|| {
        binary("transform-pipeline");
        Pipeline::start(&ns, &tmp.path().join("pipeline.log"))
    });
    // One attempt per input: a send whose outcome is unknown is stored at
    // most once (the inputs' own exactly once is another matter), and the
    // inputs are what `in` holds at the end.
    let producer = txmq::Producer::builder()
        .nameserver(&ns)
        .send_timeout(Duration::from_secs(2))
        .retries(0)
        .build()
        .await
        .unwrap();
    let mut acked = 0usize;
    for round in 0..ROUNDS {
        // Inputs arrive while the pipeline works and the kill comes.
        let sending = {
            let producer = producer.clone();
            tokio::spawn(async move {
                let mut acked = 0;
                for i in 0..PER_ROUND {
                    let m = Message::new("in", format!("in-{round}-{i}"));
                    match producer.send(m).await {
                        Ok(r) if r.status == txmq::SendStatus::SendOk => acked += 1,
                        _ => tokio::time::sleep(Duration::from_millis(20)).await,
                    }
                }
                acked
            })
        };
        tokio::time::sleep(jitter(
            Duration::from_millis(20),
            Duration::from_millis(400),
        ))
        .await;
        let kill_broker = round % 3 != 0;
        let kill_pipeline = round % 3 != 1;
        eprintln!("round {round}: kill broker {kill_broker}, pipeline {kill_pipeline}");
        if kill_pipeline {
            tokio::task::block_in_place(|| pipeline.kill9());
        }
        if kill_broker {
            tokio::task::block_in_place(|| broker.restart());
            wait_for_route(&ns, "in", &["broker-a"]).await;
        }
        if kill_pipeline {
            tokio::task::block_in_place(|| pipeline.spawn());
        }
        acked += sending.await.unwrap();
    }
    // The pipeline drains the input, and every transaction left pending is
    // checked back and committed or rolled back.
    let admin = txmq::Admin::connect([ns.clone()]).await.unwrap();
    wait_until(
        "the pipeline consumed every input",
        Duration::from_secs(40),
        || {
            let (ns, admin) = (ns.clone(), admin.clone());
            async move {
                let mut done = true;
                for q in 0..2 {
                    let states = admin
                        .group_state("transform", None)
                        .await
                        .unwrap_or_default();
                    let queue = states
                        .iter()
                        .flat_map(|s| &s.queues)
                        .find(|g| g.topic == "in" && g.queue == q)
                        .cloned();
                    done &= queue.is_some_and(|g| g.committed == Some(g.max_offset));
                }
                let pending: usize = admin
                    .list_transactions(None)
                    .await
                    .map(|l| l.iter().map(|l| l.transactions.len()).sum())
                    .unwrap_or(1);
                let _ = ns;
                done && pending == 0
            }
        },
    )
    .await;
    let log = std::fs::read_to_string(tmp.path().join("pipeline.log")).unwrap_or_default();
    // The inputs as stored (a send that failed may be there too).
    let stored = consume_all(
        &ns,
        "check-in",
        "in",
        ROUNDS * PER_ROUND,
        Duration::from_secs(2),
    )
    .await;
    let mut inputs: HashMap<String, String> = HashMap::new();
    for m in &stored {
        let again = inputs.insert(
            m.msg_id().to_string(),
            String::from_utf8_lossy(m.body()).into_owned(),
        );
        assert!(again.is_none(), "input {} stored twice", m.msg_id());
    }
    eprintln!(
        "{} inputs stored ({acked} acknowledged); broker: {} commits refused for an offset conflict; \
         pipeline: {} offset conflicts, {} other failures",
        inputs.len(),
        broker.log_text().matches("offset conflict").count(),
        log.matches("offset conflict").count(),
        log.matches("transaction failed").count()
    );
    assert!(inputs.len() >= acked);
    let out = consume_all(
        &ns,
        "check",
        "out",
        inputs.len() * 2,
        Duration::from_secs(2),
    )
    .await;
    let mut per_input: HashMap<String, usize> = HashMap::new();
    for m in &out {
        let key = m.key().unwrap_or_default().to_string();
        let body = String::from_utf8_lossy(m.body()).into_owned();
        assert_eq!(
            inputs.get(&key).map(|b| format!("out:{b}")),
            Some(body),
            "an output of an input that is stored"
        );
        *per_input.entry(key).or_default() += 1;
    }
    let duplicates: Vec<_> = per_input.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        duplicates.is_empty(),
        "inputs with several outputs: {duplicates:?}"
    );
    let missing = inputs
        .keys()
        .filter(|k| !per_input.contains_key(*k))
        .count();
    assert_eq!(missing, 0, "inputs without an output");
    assert_eq!(out.len(), inputs.len());
    pipeline.kill9();
    producer.close().await.unwrap();
    admin.close().await.unwrap();
    drop(broker);
    c.shutdown().await;
}

/// The topic a pending transaction commits consumed offsets of is not
/// deleted (BUSY) unless forced, which rolls the transaction back: its
/// commit stored those offsets in the topic made again under the name,
/// past messages nobody had read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_whose_offsets_a_pending_transaction_commits_is_not_deleted() {
    let c = Cluster::start(txmq_broker::FlushMode::Async).await;
    let ns = c.nameserver.clone();
    create_topic(&ns, "in-del", 1).await;
    create_topic(&ns, "out-del", 1).await;
    send_inputs(&c, "in-del", 2).await;
    let inputs = read_uncommitted(&ns, "transform", "in-del", 2).await;
    let producer = tx_producer(&ns).await;
    // Left pending: its local result is unknown and nobody answers.
    let outcome = producer
        .send_in_transaction_with_offsets(
            vec![Message::new("out-del", "unknown")],
            vec![ConsumedOffset::after("transform", &inputs[1])],
        )
        .await
        .expect("prepared");
    assert!(outcome.pending(), "{:?}", outcome.end);
    let admin = c.admin().await;
    let e = admin
        .delete_topic("in-del", false, None)
        .await
        .expect_err("a pending transaction commits offsets of it");
    assert_eq!(e.code(), Some(ErrorCode::Busy), "{e}");
    let deleted = admin
        .delete_topic("in-del", true, None)
        .await
        .expect("forced");
    assert_eq!(deleted.len(), 1);
    assert_eq!(committed(&ns, "transform", "in-del", 0).await, None);
    admin.close().await.unwrap();
    producer.close().await.ok();
    c.shutdown().await;
}
