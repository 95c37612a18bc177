//! Delivery through a real nameserver and broker: every message exactly
//! once and in order within its queue; offsets survive a restart.

use std::collections::HashMap;
use std::time::Duration;

use txmq::Message;
use txmq_broker::FlushMode;
use txmq_tests::{consume_all, Cluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_messages_over_four_queues_arrive_once_in_queue_order() {
    let cluster = Cluster::start(FlushMode::Async).await;
    cluster
        .admin()
        .await
        .create_topic("orders", 4, txmq::PERM_READ_WRITE, None)
        .await
        .unwrap();
    let producer = cluster.producer().await;
    let mut sends = tokio::task::JoinSet::new();
    for chunk in 0..10 {
        let p = producer.clone();
        sends.spawn(async move {
            let mut receipts = Vec::new();
            for i in chunk * 1000..(chunk + 1) * 1000 {
                let r = p
                    .send(Message::new("orders", format!("m{i}")))
                    .await
                    .unwrap();
                receipts.push((i, r));
            }
            receipts
        });
    }
    let mut sent = HashMap::new();
    while let Some(r) = sends.join_next().await {
        for (i, receipt) in r.unwrap() {
            sent.insert(format!("m{i}"), (receipt.queue, receipt.queue_offset));
        }
    }
    assert_eq!(sent.len(), 10_000);
    let queues: std::collections::HashSet<u32> = sent.values().map(|(q, _)| *q).collect();
    assert_eq!(queues.len(), 4, "round robin spreads over all queues");

    let got = consume_all(
        &cluster.nameserver,
        "g1",
        "orders",
        10_000,
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(got.len(), 10_000);
    let mut seen = HashMap::new();
    let mut last_offset: HashMap<u32, u64> = HashMap::new();
    for m in &got {
        let body = String::from_utf8(m.body().to_vec()).unwrap();
        assert!(
            seen.insert(body.clone(), ()).is_none(),
            "{body} delivered twice"
        );
        assert_eq!(
            sent[&body],
            (m.queue(), m.queue_offset()),
            "{body} where it was acknowledged"
        );
        if let Some(prev) = last_offset.insert(m.queue(), m.queue_offset()) {
            assert_eq!(
                m.queue_offset(),
                prev + 1,
                "queue {} out of order",
                m.queue()
            );
        }
    }
    // The group committed everything: nothing more for it.
    let again = consume_all(
        &cluster.nameserver,
        "g1",
        "orders",
        1,
        Duration::from_millis(500),
    )
    .await;
    assert!(again.is_empty());
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_offsets_survive_a_broker_restart() {
    let mut cluster = Cluster::nameserver_only(Duration::from_secs(30)).await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_path_buf();
    cluster
        .add_broker("broker-a", |c| {
            c.data_dir = data.clone();
        })
        .await;
    cluster
        .admin()
        .await
        .create_topic("ledger", 1, txmq::PERM_READ_WRITE, None)
        .await
        .unwrap();
    let producer = cluster.producer().await;
    for i in 1..=1000 {
        producer
            .send(Message::new("ledger", format!("{i}")))
            .await
            .unwrap();
    }
    // A group that handles and commits exactly 500 of the 1,000.
    let mut consumer = txmq::PullConsumer::builder()
        .nameserver(&cluster.nameserver)
        .group("g")
        .topic("ledger")
        .build()
        .await
        .unwrap();
    let mut handled = 0;
    while handled < 500 {
        handled += consumer
            .poll_at_most(500 - handled, Duration::from_secs(1))
            .await
            .unwrap()
            .len();
    }
    consumer.shutdown().await.unwrap();
    let committed = handled;
    assert_eq!(committed, 500);

    let broker = cluster.brokers.pop().unwrap();
    broker.shutdown().await;
    cluster
        .add_broker("broker-a", |c| c.data_dir = data.clone())
        .await;

    let rest = consume_all(
        &cluster.nameserver,
        "g",
        "ledger",
        1000,
        Duration::from_secs(2),
    )
    .await;
    let first_body = String::from_utf8(rest[0].body().to_vec()).unwrap();
    assert_eq!(
        first_body,
        format!("{}", committed + 1),
        "resumes right after the committed offset"
    );
    assert_eq!(rest.len(), 1000 - committed);
    cluster.shutdown().await;
}
