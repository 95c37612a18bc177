//! The pop table in the store: receipts, redelivery, FIFO, the bound, and
//! durability (a clean reopen, a crash, an old checkpoint, retention
//! cutting the records, a slave replaying the log).

use txmq_protocol::{tag_hash, Message, RecordRef};

use super::index_tests::copy_dir;
use super::pop::{Delivery, PopKey, PopPick, MAX_IN_FLIGHT};
use super::replica_tests::{copy, slave_config};
use super::tests::{config, topics};
use super::*;

const T0: u64 = 1_000_000;

fn key(queue: u32) -> PopKey {
    ("g".to_string(), "orders".to_string(), queue)
}

fn pick(queue: u32, max: u32, now: u64) -> PopPick {
    PopPick {
        key: key(queue),
        max,
        now,
        until: now + 1000,
        tags: Vec::new(),
        fifo: false,
        log_limit: u64::MAX,
    }
}

async fn fill(store: &Store, queue: u32, n: usize) {
    for i in 0..n {
        let m = Message::new("orders", format!("m{i}").into_bytes());
        store.append("orders", queue, vec![m]).await.unwrap();
    }
}

/// (offset, attempt) of each delivery, and their receipt.
async fn receive(store: &Store, p: PopPick) -> (Vec<(u64, u32)>, u64) {
    let (d, a) = store.pop_receive(p).await.unwrap();
    (
        d.iter().map(|d: &Delivery| (d.offset, d.attempt)).collect(),
        a.first_offset,
    )
}

fn is_receipt_error<T: std::fmt::Debug>(r: Result<T, StoreError>) -> bool {
    matches!(r, Err(StoreError::Receipt(_)))
}

#[tokio::test]
async fn receive_ack_redeliver_and_change_follow_their_receipts() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path(), FlushMode::Sync), &topics()).unwrap();
    fill(&store, 0, 5).await;
    let (got, r1) = receive(&store, pick(0, 3, T0)).await;
    assert_eq!(got, vec![(0, 1), (1, 1), (2, 1)]);
    assert_eq!(store.committed_offset("g", "orders", 0), Some(0));
    store.pop_ack(key(0), 1, r1, false).await.unwrap();
    assert!(
        is_receipt_error(store.pop_ack(key(0), 1, r1, false).await),
        "acked twice"
    );
    // Not due yet: only the rest.
    let (got, r2) = receive(&store, pick(0, 32, T0 + 500)).await;
    assert_eq!(got, vec![(3, 1), (4, 1)]);
    store.pop_ack(key(0), 0, r1, false).await.unwrap();
    assert_eq!(store.committed_offset("g", "orders", 0), Some(2));
    // Nothing left and nothing due: no record written.
    let end = store.log_end();
    let (got, _) = receive(&store, pick(0, 32, T0 + 900)).await;
    assert!(got.is_empty());
    assert_eq!(store.log_end(), end);
    // 2 moves its deadline: its old receipt is stale, the new one works.
    let changed = store
        .pop_change(key(0), 2, r1, T0 + 10_000)
        .await
        .unwrap()
        .first_offset;
    assert!(is_receipt_error(store.pop_ack(key(0), 2, r1, false).await));
    // Past the first deadline: 3 and 4 come again with attempt 2, not 2.
    let (got, r3) = receive(&store, pick(0, 32, T0 + 2000)).await;
    assert_eq!(got, vec![(3, 2), (4, 2)]);
    assert!(
        is_receipt_error(store.pop_ack(key(0), 3, r2, false).await),
        "superseded"
    );
    store.pop_ack(key(0), 3, r3, false).await.unwrap();
    store.pop_ack(key(0), 4, r3, false).await.unwrap();
    store.pop_ack(key(0), 2, changed, false).await.unwrap();
    assert_eq!(store.committed_offset("g", "orders", 0), Some(5));
    assert!(
        is_receipt_error(store.pop_ack(key(0), 9, r3, false).await),
        "never received"
    );
    store.shutdown().await;
}

#[tokio::test]
async fn a_fifo_receive_holds_a_queue_until_its_message_is_done() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path(), FlushMode::Async), &topics()).unwrap();
    fill(&store, 0, 3).await;
    let fifo = |max, now| PopPick {
        fifo: true,
        ..pick(0, max, now)
    };
    let (got, r1) = receive(&store, fifo(1, T0)).await;
    assert_eq!(got, vec![(0, 1)]);
    let (got, _) = receive(&store, fifo(1, T0 + 10)).await;
    assert!(got.is_empty(), "the queue is held while 0 is in flight");
    // Its deadline passes: 0 comes again first, then 1 in the same receive.
    let (got, r2) = receive(&store, fifo(2, T0 + 1500)).await;
    assert_eq!(got, vec![(0, 2), (1, 1)]);
    assert!(is_receipt_error(store.pop_ack(key(0), 0, r1, false).await));
    store.pop_ack(key(0), 0, r2, false).await.unwrap();
    let (got, _) = receive(&store, fifo(2, T0 + 1600)).await;
    assert!(got.is_empty(), "1 is still in flight");
    store.pop_ack(key(0), 1, r2, false).await.unwrap();
    let (got, _) = receive(&store, fifo(2, T0 + 1700)).await;
    assert_eq!(got, vec![(2, 1)]);
    store.shutdown().await;
}

#[tokio::test]
async fn tags_filter_and_the_group_starts_at_its_committed_offset() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path(), FlushMode::Async), &topics()).unwrap();
    for i in 0..6 {
        let tag = if i % 2 == 0 { "a" } else { "b" };
        let m = Message::new("orders", &b"x"[..]).with_tag(tag);
        store.append("orders", 1, vec![m]).await.unwrap();
    }
    // The group consumed 0 and 1 by pull before.
    store.commit_offset("g", "orders", 1, 2).await.unwrap();
    let p = PopPick {
        tags: vec![tag_hash(Some("b"))],
        ..pick(1, 32, T0)
    };
    let (got, r) = receive(&store, p).await;
    assert_eq!(got, vec![(3, 1), (5, 1)]);
    store.pop_ack(key(1), 3, r, false).await.unwrap();
    store.pop_ack(key(1), 5, r, false).await.unwrap();
    // Passed over for good: nothing is in flight, the group is at the end.
    assert_eq!(store.committed_offset("g", "orders", 1), Some(6));
    store.shutdown().await;
}

#[tokio::test]
async fn a_queue_holds_at_most_the_bound_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path(), FlushMode::Async);
    c.segment_size = 64 << 20;
    c.cq_entries_per_file = 100_000;
    let store = Store::open(c, &topics()).unwrap();
    let batch: Vec<Message> = (0..1000)
        .map(|_| Message::new("orders", &b""[..]))
        .collect();
    let total = MAX_IN_FLIGHT + 100;
    for _ in 0..total.div_ceil(1000) {
        store.append("orders", 0, batch.clone()).await.unwrap();
    }
    let mut received = 0;
    loop {
        let (got, _) = receive(&store, pick(0, 1024, T0)).await;
        if got.is_empty() {
            break;
        }
        received += got.len();
    }
    assert_eq!(received, MAX_IN_FLIGHT);
    let (_, r) = receive(&store, pick(0, 1, T0 + 5000)).await;
    assert!(r > 0, "due ones come again");
    store.shutdown().await;
}

/// Some state: offsets 0..6 received, 1 and 4 acked, 2 changed, 0 again;
/// returns where the last of its records ends.
async fn make_state(store: &Store) -> u64 {
    fill(store, 0, 6).await;
    fill(store, 1, 2).await;
    let (_, r1) = receive(store, pick(0, 6, T0)).await;
    store.pop_ack(key(0), 1, r1, false).await.unwrap();
    store.pop_ack(key(0), 4, r1, false).await.unwrap();
    store.pop_change(key(0), 2, r1, T0 + 60_000).await.unwrap();
    let (got, _) = receive(store, pick(0, 1, T0 + 1500)).await;
    assert_eq!(got, vec![(0, 2)]);
    let (got, _) = receive(store, pick(1, 5, T0)).await;
    assert_eq!(got, vec![(0, 1), (1, 1)]);
    store.log_end()
}

fn state(store: &Store) -> Vec<Option<pop::PopQueue>> {
    vec![store.pop_queue(&key(0)), store.pop_queue(&key(1))]
}

#[tokio::test]
async fn the_state_survives_a_reopen_a_crash_and_an_old_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path(), FlushMode::Sync), &topics()).unwrap();
    // A checkpoint from before any pop record, kept to play a crash that
    // lost every later one.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let old_checkpoint = std::fs::read(dir.path().join("checkpoint")).unwrap();
    make_state(&store).await;
    let want = state(&store);
    let low = store.committed_offset("g", "orders", 0);
    assert_eq!(low, Some(0));
    // A crash now: the files as they are, without a shutdown.
    let crashed = tempfile::tempdir().unwrap();
    copy_dir(dir.path(), crashed.path());
    store.shutdown().await;

    let reopened = Store::open(config(dir.path(), FlushMode::Sync), &topics()).unwrap();
    assert_eq!(state(&reopened), want, "clean reopen");
    assert_eq!(reopened.committed_offset("g", "orders", 0), low);
    reopened.shutdown().await;

    let after_crash = Store::open(config(crashed.path(), FlushMode::Sync), &topics()).unwrap();
    assert_eq!(state(&after_crash), want, "after a crash");
    // Received and unacked comes again once due, acked never.
    let (got, _) = receive(&after_crash, pick(0, 32, T0 + 100_000)).await;
    assert_eq!(got, vec![(0, 3), (2, 2), (3, 2), (5, 2)]);
    after_crash.shutdown().await;

    std::fs::write(dir.path().join("checkpoint"), &old_checkpoint).unwrap();
    let replayed = Store::open(config(dir.path(), FlushMode::Sync), &topics()).unwrap();
    assert_eq!(state(&replayed), want, "replayed over an old checkpoint");
    replayed.shutdown().await;

    // Replayed twice over (no checkpoint at all): the same.
    std::fs::remove_file(dir.path().join("checkpoint")).unwrap();
    let from_scratch = Store::open(config(dir.path(), FlushMode::Sync), &topics()).unwrap();
    assert_eq!(state(&from_scratch), want, "replayed from the log's start");
    from_scratch.shutdown().await;
}

#[tokio::test]
async fn retention_cutting_the_pop_records_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path(), FlushMode::Async);
    c.retention = Duration::ZERO;
    let store = Store::open(c.clone(), &topics()).unwrap();
    let pop_end = make_state(&store).await;
    // Traffic on another queue rolls the pop records into old segments.
    let big = Message::new("orders", vec![7u8; 8000]);
    for _ in 0..40 {
        store.append("orders", 1, vec![big.clone()]).await.unwrap();
    }
    let want = state(&store);
    // Let the checkpoint pass the pop records, then delete their segments.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let min_before = store.log_min();
    assert!(store.enforce_retention().unwrap() > 0);
    assert!(store.log_min() > min_before);
    assert!(store.log_min() >= pop_end, "every pop record is deleted");
    store.shutdown().await;

    let reopened = Store::open(c, &topics()).unwrap();
    assert_eq!(state(&reopened), want);
    reopened.shutdown().await;
}

#[tokio::test]
async fn a_slave_replaying_the_log_holds_the_same_state() {
    let mdir = tempfile::tempdir().unwrap();
    let sdir = tempfile::tempdir().unwrap();
    let master = Store::open(config(mdir.path(), FlushMode::Async), &topics()).unwrap();
    let slave = Store::open(slave_config(sdir.path()), &[]).unwrap();
    let mut last: Option<RecordRef> = None;
    make_state(&master).await;
    copy(&master, &slave, &mut last).await;
    let want = state(&master);
    assert_eq!(state(&slave), want);
    assert_eq!(
        slave.committed_offset("g", "orders", 0),
        master.committed_offset("g", "orders", 0)
    );
    // More after a first copy, then a slave restart.
    let (_, r) = receive(&master, pick(0, 32, T0 + 200_000)).await;
    master.pop_ack(key(0), 0, r, false).await.unwrap();
    copy(&master, &slave, &mut last).await;
    assert_eq!(state(&slave), state(&master));
    // An operator's reset, back on one queue and forward on the other.
    master.pop_reset(key(0), 0).await.unwrap();
    master.pop_reset(key(1), 2).await.unwrap();
    let reset = state(&master);
    assert!(reset.iter().flatten().all(|q| q.in_flight.is_empty()));
    assert_eq!(master.committed_offset("g", "orders", 0), Some(0));
    assert_eq!(master.committed_offset("g", "orders", 1), Some(2));
    copy(&master, &slave, &mut last).await;
    assert_eq!(state(&slave), reset);
    slave.shutdown().await;
    let slave = Store::open(slave_config(sdir.path()), &[]).unwrap();
    assert_eq!(state(&slave), state(&master));
    assert_eq!(
        slave.committed_offset("g", "orders", 0),
        master.committed_offset("g", "orders", 0)
    );
    slave.shutdown().await;
    master.shutdown().await;
}

/// Acknowledgements are records like any other: concurrent ones share
/// the writer's batches and, under sync flush, their fdatasyncs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_acks_share_writes_and_fdatasyncs() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path(), FlushMode::Sync);
    c.segment_size = 64 << 20;
    c.cq_entries_per_file = 10_000;
    let store = Store::open(c, &topics()).unwrap();
    let batch: Vec<Message> = (0..1000)
        .map(|i| Message::new("orders", format!("m{i}").into_bytes()))
        .collect();
    store.append("orders", 0, batch).await.unwrap();
    let (got, receipt) = receive(&store, pick(0, 1000, T0)).await;
    assert_eq!(got.len(), 1000);
    let (_, _, writes_before, syncs_before) = store.stats();
    let started = std::time::Instant::now();
    let acks: Vec<_> = got
        .iter()
        .map(|&(offset, _)| {
            let store = store.clone();
            tokio::spawn(async move { store.pop_ack(key(0), offset, receipt, false).await })
        })
        .collect();
    for a in acks {
        assert!(a.await.unwrap().unwrap().durable);
    }
    let elapsed = started.elapsed();
    let (_, _, writes, syncs) = store.stats();
    let (writes, syncs) = (writes - writes_before, syncs - syncs_before);
    println!(
        "1000 concurrent acks under sync flush: {writes} writes, {syncs} fdatasyncs, {elapsed:?}"
    );
    assert!(syncs < 100, "{writes} writes, {syncs} fdatasyncs");
    assert_eq!(store.committed_offset("g", "orders", 0), Some(1000));
    store.shutdown().await;
}
