//! Delivery through a real nameserver and broker: every message exactly
//! once and in order within its queue; offsets survive a restart.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use txmq::{Message, PullConsumer, PERM_READ_WRITE, PERM_WRITE};
use txmq_broker::FlushMode;
use txmq_tests::metrics::{http_get, sample};
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

/// The pulls a broker has served or refused so far, from its metrics.
fn pulls(metrics: &str) -> f64 {
    let (_, text) = http_get(metrics, "/metrics").expect("metrics answer");
    sample(&text, "txmq_pull_latency_seconds_count").expect("pulls are counted")
}

/// Polls `consumer` until `n` messages came (10 s at most); body -> times.
async fn receive(consumer: &mut PullConsumer, n: usize, seen: &mut BTreeMap<String, u32>) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut got = 0;
    while got < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {got} of {n} messages arrived"
        );
        for m in consumer
            .poll_at_most(n - got, Duration::from_millis(200))
            .await
            .unwrap()
        {
            got += 1;
            *seen.entry(common::body_text(&m)).or_default() += 1;
        }
    }
}

/// A topic made write only while a pull consumer reads it: the consumer
/// stops pulling its queues (the broker gets no pull at all, `queues` lists
/// none) and, once the topic may be read again, goes on where it stopped:
/// what was sent meanwhile arrives, and nothing twice. The route refresh
/// keeps its default 30 s: the first refused pull asks for the route at
/// once, and while nothing may be read the route is asked for every second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_consumer_stops_pulling_a_write_only_topic_and_goes_on_where_it_stopped() {
    let (cluster, metrics) = Cluster::start_with_metrics().await;
    let ns = cluster.nameserver.clone();
    let admin = cluster.admin().await;
    admin
        .create_topic("feed", 2, PERM_READ_WRITE, None)
        .await
        .unwrap();
    common::wait_for_perm(&ns, "feed", PERM_READ_WRITE).await;
    let producer = cluster.producer().await;
    let send = |range: std::ops::Range<u32>| {
        let producer = &producer;
        async move {
            for i in range {
                producer
                    .send(Message::new("feed", format!("m{i}")))
                    .await
                    .unwrap();
            }
        }
    };
    send(0..6).await;
    let max_wait = Duration::from_millis(300);
    let mut consumer = PullConsumer::builder()
        .nameserver(&ns)
        .group("g")
        .topic("feed")
        .max_wait(max_wait)
        .build()
        .await
        .unwrap();
    let mut seen = BTreeMap::new();
    receive(&mut consumer, 6, &mut seen).await;
    assert_eq!(consumer.queues().len(), 2);

    // Write only: the long polls waiting at the broker are refused when
    // their wait ends, as new pulls would be; the route, asked for then,
    // takes the queues out of `queues`, and the broker is asked for
    // nothing more.
    admin
        .create_topic("feed", 2, PERM_WRITE, None)
        .await
        .unwrap();
    common::wait_for_perm(&ns, "feed", PERM_WRITE).await;
    common::wait_until(
        "the queues are no longer read",
        Duration::from_secs(5),
        || {
            let empty = consumer.queues().is_empty();
            async move { empty }
        },
    )
    .await;
    send(6..10).await;
    tokio::time::sleep(max_wait * 2).await;
    let before = pulls(&metrics);
    assert!(before >= 2.0, "{before} pulls");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        pulls(&metrics),
        before,
        "a write-only topic's queues were pulled"
    );
    assert!(consumer
        .poll(Duration::from_millis(100))
        .await
        .unwrap()
        .is_empty());

    // Readable again: what was sent meanwhile arrives, nothing twice.
    admin
        .create_topic("feed", 2, PERM_READ_WRITE, None)
        .await
        .unwrap();
    receive(&mut consumer, 4, &mut seen).await;
    assert!(consumer
        .poll(Duration::from_millis(500))
        .await
        .unwrap()
        .is_empty());
    assert_eq!(consumer.queues().len(), 2);
    let want: BTreeMap<String, u32> = (0..10).map(|i| (format!("m{i}"), 1)).collect();
    assert_eq!(seen, want);
    consumer.shutdown().await.unwrap();
    producer.close().await.unwrap();
    admin.close().await.unwrap();
    cluster.shutdown().await;
}

/// A long poll waiting at the broker while its topic becomes write only is
/// refused when a message wakes it, as a new pull would be, rather than
/// handed the message; the message stays for when the topic may be read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_long_poll_is_refused_once_its_topic_became_write_only() {
    use txmq_protocol::{ErrorCode, PullRequest, Role};
    let cluster = Cluster::start(FlushMode::Async).await;
    let ns = cluster.nameserver.clone();
    let admin = cluster.admin().await;
    admin
        .create_topic("held", 1, PERM_READ_WRITE, None)
        .await
        .unwrap();
    common::wait_for_perm(&ns, "held", PERM_READ_WRITE).await;
    let addr = cluster.brokers[0].local_addr().to_string();
    let conn = common::connect_as(&addr, Role::Consumer).await;
    let pull = |max_wait_ms| PullRequest {
        topic: "held".into(),
        queue: 0,
        offset: 0,
        max_messages: 8,
        max_wait_ms,
        tag_filter: Vec::new(),
        owner: None,
        epoch: 0,
        after: None,
        browse: false,
    };
    let waiting = tokio::spawn({
        let conn = conn.clone();
        let pull = pull(10_000);
        async move { conn.call_with_timeout(pull, Duration::from_secs(15)).await }
    });
    // Long enough for the pull to reach the broker and wait there.
    tokio::time::sleep(Duration::from_millis(300)).await;
    admin
        .create_topic("held", 1, PERM_WRITE, None)
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    let producer = cluster.producer().await;
    producer.send(Message::new("held", "kept")).await.unwrap();
    let e = waiting.await.unwrap().expect_err("a refusal");
    assert_eq!(
        e.remote().map(|w| w.code),
        Some(ErrorCode::NoPermission),
        "{e}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "woken by the message, not at the end of its wait"
    );
    admin
        .create_topic("held", 1, PERM_READ_WRITE, None)
        .await
        .unwrap();
    let r = conn.call(pull(0)).await.unwrap();
    let bodies: Vec<&[u8]> = r.messages.iter().map(|m| &m.message.body[..]).collect();
    assert_eq!(bodies, [b"kept"]);
    conn.close();
    producer.close().await.unwrap();
    admin.close().await.unwrap();
    cluster.shutdown().await;
}

/// The properties the broker sets on a retried or dead-lettered message
/// are its own: a producer's message does not bring them (a message sent
/// with `TXMQ_RECONSUME_TIMES` 16 went to the dead-letter topic at its
/// first retry), and its own properties are kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_cannot_set_the_brokers_retry_properties() {
    let cluster = Cluster::start(FlushMode::Async).await;
    let producer = cluster.producer().await;
    producer
        .send(
            Message::new("forwarded", "x")
                .with_property(txmq::PROPERTY_RECONSUME_TIMES, "16")
                .with_property(txmq::PROPERTY_REAL_TOPIC, "elsewhere")
                .with_property("TXMQ_REAL_QUEUE", "3")
                .with_property("source", "web"),
        )
        .await
        .unwrap();
    let got = consume_all(
        &cluster.nameserver,
        "g",
        "forwarded",
        1,
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(got.len(), 1);
    let props = &got[0].message().properties;
    assert_eq!(
        props.iter().collect::<Vec<_>>(),
        [(&"source".to_string(), &"web".to_string())],
        "{props:?}"
    );
    assert_eq!(got[0].reconsume_times(), 0);
    assert_eq!(got[0].topic(), "forwarded");
    producer.close().await.unwrap();
    cluster.shutdown().await;
}
