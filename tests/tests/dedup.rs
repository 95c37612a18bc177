//! The consumer-side dedup helper against a real broker: a group that gets
//! every message twice (consumed, then replayed from the first offset by an
//! operator's reset) applies each message's effect once, because the
//! handler records the msg id with `SqliteDedup` in the same SQLite
//! transaction as its effect.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant, SystemTime};

use common::create_topic;
use rusqlite::Connection;
use txmq::{
    ConsumeFrom, Deduped, ErrorCode, Message, MsgId, OffsetTarget, PullConsumer, SqliteDedup,
};
use txmq_broker::FlushMode;
use txmq_tests::Cluster;

const TOPIC: &str = "payments";
const GROUP: &str = "ledger";
const N: usize = 40;

/// The consumer's database: the effect (`ledger`, one row per payment) and
/// the dedup table.
fn open_db(path: &std::path::Path, dedup: &SqliteDedup) -> Connection {
    let conn = Connection::open(path).expect("open the database");
    dedup.ensure_schema(&conn).expect("dedup table");
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS ledger (msg_id TEXT NOT NULL, body TEXT NOT NULL)",
    )
    .expect("ledger table");
    conn
}

/// What one pass of the group did.
#[derive(Debug, Default)]
struct Pass {
    delivered: BTreeSet<MsgId>,
    applied: usize,
    duplicates: usize,
}

/// Consumes `GROUP` until `N` messages were delivered (or 20 s passed),
/// applying each through `dedup`, committing after each batch, then shuts
/// the consumer down.
async fn consume_pass(ns: &str, conn: &mut Connection, dedup: &SqliteDedup) -> Pass {
    let mut consumer = PullConsumer::builder()
        .nameserver(ns)
        .group(GROUP)
        .topic(TOPIC)
        .from(ConsumeFrom::First)
        .max_wait(Duration::from_millis(200))
        .build()
        .await
        .expect("consumer builds");
    let mut pass = Pass::default();
    let deadline = Instant::now() + Duration::from_secs(20);
    while pass.delivered.len() < N && Instant::now() < deadline {
        let batch = consumer
            .poll(Duration::from_millis(200))
            .await
            .expect("poll");
        for m in &batch {
            pass.delivered.insert(m.msg_id());
            let body = String::from_utf8_lossy(m.body()).into_owned();
            let id = m.msg_id().to_string();
            let done = dedup
                .apply(conn, m, SystemTime::now(), |tx| {
                    tx.execute(
                        "INSERT INTO ledger (msg_id, body) VALUES (?1, ?2)",
                        [&id, &body],
                    )
                })
                .expect("apply");
            match done {
                Deduped::Applied(_) => pass.applied += 1,
                Deduped::Duplicate => pass.duplicates += 1,
            }
        }
        consumer.commit().await.expect("commit");
    }
    consumer.shutdown().await.expect("shutdown");
    pass
}

/// Resets the stopped group to the first offset, waiting (up to 10 s) for
/// the broker to notice that its last member left.
async fn replay_from_first(cluster: &Cluster) {
    let admin = cluster.admin().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match admin
            .reset_offsets(GROUP, TOPIC, OffsetTarget::First, None)
            .await
        {
            Ok(_) => break,
            Err(txmq::Error::Broker { ref source, .. })
                if source.remote().map(|w| w.code) == Some(ErrorCode::GroupActive)
                    && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("reset offsets: {e}"),
        }
    }
    admin.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_replayed_from_the_start_applies_each_message_once() {
    let cluster = Cluster::start(FlushMode::Async).await;
    let ns = cluster.nameserver.clone();
    create_topic(&ns, TOPIC, 4).await;
    let producer = cluster.producer().await;
    let mut sent = BTreeSet::new();
    for i in 0..N {
        let receipt = producer
            .send(Message::new(TOPIC, format!("payment-{i}")))
            .await
            .expect("send");
        sent.insert(receipt.msg_id);
    }
    producer.close().await.unwrap();

    let dir = tempfile::tempdir().expect("temp dir");
    let dedup = SqliteDedup::new("applied_ids", Duration::from_secs(3600));
    let mut conn = open_db(&dir.path().join("ledger.db"), &dedup);

    let first = consume_pass(&ns, &mut conn, &dedup).await;
    assert_eq!(first.delivered, sent, "the first pass got every message");
    assert_eq!((first.applied, first.duplicates), (N, 0));

    // An operator replays the group: every message is delivered again.
    replay_from_first(&cluster).await;
    let second = consume_pass(&ns, &mut conn, &dedup).await;
    assert_eq!(second.delivered, sent, "the replay got every message again");
    assert_eq!(
        (second.applied, second.duplicates),
        (0, N),
        "the dedup absorbed every redelivery"
    );

    let rows: usize = conn
        .query_row("SELECT COUNT(*) FROM ledger", [], |r| r.get(0))
        .expect("count");
    let distinct: usize = conn
        .query_row("SELECT COUNT(DISTINCT msg_id) FROM ledger", [], |r| {
            r.get(0)
        })
        .expect("count");
    assert_eq!((rows, distinct), (N, N), "each payment booked exactly once");
    assert_eq!(dedup.len(&conn).expect("len"), N as u64);
    cluster.shutdown().await;
}
