//! Store counters as an operator or `txmq bench` reads them.

use txmq::Message;
use txmq_broker::FlushMode;
use txmq_tests::Cluster;

/// One test at a time: how the sends of one are gathered into writes
/// depends on the machine's cores being free, not busy with the other.
static ALONE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_stats_count_records_writes_and_group_commits() {
    let _alone = ALONE.lock().await;
    let cluster = Cluster::start(FlushMode::Sync).await;
    let admin = cluster.admin().await;
    admin
        .create_topic("s", 2, txmq::PERM_READ_WRITE, None)
        .await
        .unwrap();
    let before = admin.store_stats(None).await.unwrap();
    assert_eq!(before.len(), 1);
    assert_eq!(before[0].flush, "sync");

    let producer = cluster.plain_producer().await;
    let sends: Vec<_> = (0..200)
        .map(|i| {
            let p = producer.clone();
            tokio::spawn(async move { p.send(Message::new("s", format!("{i}"))).await })
        })
        .collect();
    for s in sends {
        s.await.unwrap().unwrap();
    }
    let after = admin.store_stats(Some("broker-a")).await.unwrap();
    let (b, a) = (&before[0], &after[0]);
    assert_eq!(a.broker_name, "broker-a");
    assert_eq!(a.records - b.records, 200, "one record per message");
    assert!(a.bytes - b.bytes >= 200 * 64);
    assert!(a.writes > b.writes && a.writes - b.writes <= 200);
    // Every acknowledged message was covered by an fdatasync; concurrent
    // sends share them (group commit), so there are no more than messages.
    let syncs = a.fdatasyncs - b.fdatasyncs;
    assert!(
        (1..=200).contains(&syncs),
        "{syncs} fdatasyncs for 200 messages"
    );
    cluster.shutdown().await;
}

/// Sends in flight together on one connection go out in one write, are
/// read by the broker together and appended with one commit-log write
/// (not one each), and every one is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_in_flight_together_share_commit_log_writes() {
    let _alone = ALONE.lock().await;
    let cluster = Cluster::start(FlushMode::Async).await;
    let admin = cluster.admin().await;
    admin
        .create_topic("g", 4, txmq::PERM_READ_WRITE, None)
        .await
        .unwrap();
    let producer = cluster.plain_producer().await;
    // Connected, so that the measured sends are not held up by connecting.
    producer.send(Message::new("g", "first")).await.unwrap();
    let before = admin.store_stats(None).await.unwrap();

    // Polled by one task: all 64 requests are queued before any answer.
    let receipts = futures_util::future::join_all(
        (0..64).map(|i| producer.send(Message::new("g", format!("m{i}")))),
    )
    .await;
    let mut placed: Vec<(u32, u64)> = receipts
        .into_iter()
        .map(|r| {
            let r = r.expect("every send is answered");
            (r.queue, r.queue_offset)
        })
        .collect();
    placed.sort_unstable();
    placed.dedup();
    assert_eq!(placed.len(), 64, "each send has its own place");

    let after = admin.store_stats(None).await.unwrap();
    let (b, a) = (&before[0], &after[0]);
    assert_eq!(a.records - b.records, 64);
    let writes = a.writes - b.writes;
    assert!(
        writes <= 8,
        "64 sends in flight together took {writes} commit-log writes"
    );
    cluster.shutdown().await;
}
