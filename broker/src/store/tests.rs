//! Store tests on a real temp directory: append and read back, reopen,
//! torn and corrupt tails, segment rolls, sync flush and offsets.

use std::io::Write;
use std::os::unix::fs::FileExt;

use txmq_protocol::Message;

use super::*;

/// Small segments and queue files, a fast checkpoint (shared with `delay_tests.rs`).
pub(super) fn config(dir: &std::path::Path, flush: FlushMode) -> StoreConfig {
    let mut c = StoreConfig::new(dir);
    c.flush = flush;
    c.segment_size = 64 * 1024;
    c.cq_entries_per_file = 100;
    c.max_message_size = 16 * 1024;
    c.checkpoint_interval = Duration::from_millis(50);
    c
}

/// A transaction whose half messages were never carried forward.
pub(super) fn tx_ref(id: u64) -> TxRef {
    TxRef {
        id,
        first_msg_id: MsgId::default(),
        halves_at: id,
    }
}

/// The test topic: `orders` with 2 queues.
pub(super) fn topics() -> Vec<(String, u32)> {
    vec![("orders".to_string(), 2)]
}

fn msg(i: usize) -> Message {
    Message::new("orders", format!("body-{i}").into_bytes()).with_key(format!("k{i}"))
}

fn bodies(store: &Store, queue: u32) -> Vec<String> {
    let mut out = Vec::new();
    let mut offset = 0;
    loop {
        let r = store.read("orders", queue, offset, 32, 1 << 20).unwrap();
        if r.messages.is_empty() {
            return out;
        }
        for (i, m) in r.messages.iter().enumerate() {
            assert_eq!(m.queue_offset, offset + i as u64);
        }
        out.extend(
            r.messages
                .iter()
                .map(|m| String::from_utf8(m.message.body.to_vec()).unwrap()),
        );
        offset = r.next_offset;
    }
}

#[tokio::test]
async fn append_read_and_reopen_across_segment_rolls() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path(), FlushMode::Async), &topics()).unwrap();
    // ~40 KiB per 1000 messages: several 64 KiB segments.
    for i in 0..3000 {
        let a = store
            .append("orders", (i % 2) as u32, vec![msg(i)])
            .await
            .unwrap();
        assert_eq!(a.first_offset, (i / 2) as u64);
    }
    let want0: Vec<String> = (0..3000)
        .filter(|i| i % 2 == 0)
        .map(|i| format!("body-{i}"))
        .collect();
    assert_eq!(bodies(&store, 0), want0);
    store.commit_offset("g1", "orders", 0, 500).await.unwrap();
    store.shutdown().await;
    assert!(
        std::fs::read_dir(dir.path().join("commitlog"))
            .unwrap()
            .count()
            > 2
    );

    let store = Store::open(config(dir.path(), FlushMode::Async), &topics()).unwrap();
    assert_eq!(bodies(&store, 0), want0);
    assert_eq!(bodies(&store, 1).len(), 1500);
    assert_eq!(store.committed_offset("g1", "orders", 0), Some(500));
    let a = store.append("orders", 0, vec![msg(9999)]).await.unwrap();
    assert_eq!(a.first_offset, 1500);
    store.shutdown().await;
}

#[tokio::test]
async fn recovery_without_checkpoint_rebuilds_queues_and_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path(), FlushMode::Sync), &topics()).unwrap();
    store
        .append("orders", 1, (0..10).map(msg).collect())
        .await
        .unwrap();
    store.commit_offset("g1", "orders", 1, 7).await.unwrap();
    store.shutdown().await;
    std::fs::remove_file(dir.path().join("checkpoint")).unwrap();
    std::fs::remove_dir_all(dir.path().join("consumequeue")).unwrap();
    let store = Store::open(config(dir.path(), FlushMode::Sync), &topics()).unwrap();
    assert_eq!(bodies(&store, 1).len(), 10);
    assert_eq!(store.committed_offset("g1", "orders", 1), Some(7));
    store.shutdown().await;
}

/// Drops the last `bytes` bytes before log position `end` from the last
/// segment, as a write torn by a crash would.
fn tear_tail(dir: &std::path::Path, end: u64, bytes: u64) {
    let seg = last_segment(dir);
    let start: u64 = seg.file_name().unwrap().to_str().unwrap().parse().unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(end - start - bytes)
        .unwrap();
}

fn last_segment(dir: &std::path::Path) -> std::path::PathBuf {
    let mut segs: Vec<_> = std::fs::read_dir(dir.join("commitlog"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    segs.sort();
    segs.pop().unwrap()
}

#[tokio::test]
async fn torn_tail_is_cut_and_new_appends_follow() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path(), FlushMode::Sync), &topics()).unwrap();
    for i in 0..5 {
        store.append("orders", 0, vec![msg(i)]).await.unwrap();
    }
    let end = store.log_end();
    store.shutdown().await;
    // Tear the last record: drop its final 10 bytes.
    tear_tail(dir.path(), end, 10);
    // Below the position of the checkpoint written at shutdown, that is
    // damage, not a tear (the log was durable there): refused, naming the
    // way out.
    let Err(e) = Store::open(config(dir.path(), FlushMode::Sync), &topics()) else {
        panic!("damage below the checkpoint is refused");
    };
    assert!(
        e.to_string().contains("below position") && e.to_string().contains("checkpoint"),
        "{e}"
    );
    // A crash leaves a checkpoint from before the torn record (here none).
    std::fs::remove_file(dir.path().join("checkpoint")).unwrap();

    let store = Store::open(config(dir.path(), FlushMode::Sync), &topics()).unwrap();
    assert_eq!(
        bodies(&store, 0),
        vec!["body-0", "body-1", "body-2", "body-3"]
    );
    let a = store.append("orders", 0, vec![msg(100)]).await.unwrap();
    assert_eq!(a.first_offset, 4);
    assert_eq!(bodies(&store, 0).last().unwrap(), "body-100");
    store.shutdown().await;
}

#[tokio::test]
async fn garbage_after_the_tail_is_cut() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path(), FlushMode::Sync), &topics()).unwrap();
    store
        .append("orders", 0, (0..3).map(msg).collect())
        .await
        .unwrap();
    let end = store.log_end();
    store.shutdown().await;
    let seg = last_segment(dir.path());
    let start: u64 = seg.file_name().unwrap().to_str().unwrap().parse().unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
    f.write_all_at(&[0x5a; 300], end - start).unwrap();
    // Also leave a stray file that is not a segment.
    std::fs::File::create(dir.path().join("commitlog/README"))
        .unwrap()
        .write_all(b"x")
        .unwrap();
    for _ in 0..2 {
        let store = Store::open(config(dir.path(), FlushMode::Sync), &topics()).unwrap();
        assert_eq!(bodies(&store, 0).len(), 3);
        store.shutdown().await;
    }
    let store = Store::open(config(dir.path(), FlushMode::Sync), &topics()).unwrap();
    let a = store.append("orders", 0, vec![msg(7)]).await.unwrap();
    assert_eq!(a.first_offset, 3);
    let r = store.read("orders", 0, 3, 10, 1 << 20).unwrap();
    assert_eq!((r.max_offset, r.messages.len()), (4, 1), "{r:?}");
    assert_eq!(bodies(&store, 0).len(), 4);
    store.shutdown().await;
}

#[tokio::test]
async fn too_large_and_unknown_queue_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path(), FlushMode::Async), &topics()).unwrap();
    let big = Message::new("orders", vec![0u8; 20 * 1024]);
    assert!(matches!(
        store.append("orders", 0, vec![big]).await,
        Err(StoreError::TooLarge(_))
    ));
    assert!(matches!(
        store.append("orders", 9, vec![msg(1)]).await,
        Err(StoreError::NoQueue { .. })
    ));
    assert!(matches!(
        store.append("nope", 0, vec![msg(1)]).await,
        Err(StoreError::NoQueue { .. })
    ));
    store.shutdown().await;
}

#[tokio::test]
async fn sync_flush_group_commit_acknowledges_concurrent_sends() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path(), FlushMode::Sync), &topics()).unwrap();
    let mut tasks = Vec::new();
    for i in 0..200 {
        let s = store.clone();
        tasks.push(tokio::spawn(async move {
            s.append("orders", (i % 2) as u32, vec![msg(i)]).await
        }));
    }
    for t in tasks {
        assert!(t.await.unwrap().unwrap().durable);
    }
    assert_eq!(bodies(&store, 0).len() + bodies(&store, 1).len(), 200);
    store.shutdown().await;
}

#[tokio::test]
async fn gathered_appends_share_one_write_and_a_dropped_one_is_still_written() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path(), FlushMode::Async), &topics()).unwrap();
    let (_, _, writes_before, _) = store.stats();
    // Ten appends that know more are coming, polled together: one write.
    let appends = (0..10).map(|i| store.append_gathering("orders", 0, vec![msg(i)], i < 9));
    let offsets: Vec<u64> = futures_util::future::join_all(appends)
        .await
        .into_iter()
        .map(|a| a.unwrap().first_offset)
        .collect();
    assert_eq!(offsets, (0..10).collect::<Vec<u64>>());
    let (_, _, writes, _) = store.stats();
    assert_eq!(writes - writes_before, 1, "ten gathered appends, one write");

    // An append dropped while it waits for the others is written anyway,
    // and nothing waits behind it.
    {
        let mut dropped = Box::pin(store.append_gathering("orders", 1, vec![msg(100)], true));
        let polled = futures_util::poll!(dropped.as_mut());
        assert!(polled.is_pending(), "it waits for the others first");
    }
    let next = tokio::time::timeout(
        Duration::from_secs(5),
        store.append("orders", 1, vec![msg(101)]),
    )
    .await
    .expect("an append after a dropped one completes")
    .unwrap();
    assert_eq!(next.first_offset, 1, "the dropped append took offset 0");
    assert_eq!(bodies(&store, 1), ["body-100", "body-101"]);
    store.shutdown().await;
}

#[tokio::test]
async fn retention_deletes_old_segments_and_moves_queue_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path(), FlushMode::Async);
    c.retention = Duration::ZERO;
    let store = Store::open(c, &topics()).unwrap();
    for i in 0..3000 {
        store.append("orders", 0, vec![msg(i)]).await.unwrap();
    }
    let deleted = store.enforce_retention().unwrap();
    assert!(deleted >= 1);
    let r = store.read("orders", 0, 0, 10, 1 << 20).unwrap();
    assert!(r.min_offset > 0 && r.messages.is_empty() && r.next_offset == r.min_offset);
    let r = store.read("orders", 0, r.min_offset, 10, 1 << 20).unwrap();
    assert_eq!(r.messages[0].queue_offset, r.min_offset);
    store.shutdown().await;
}

fn half(i: usize) -> (u32, Message) {
    (1, msg(i))
}

#[tokio::test]
async fn a_prepared_transaction_is_invisible_until_committed_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path(), FlushMode::Sync), &topics()).unwrap();
    let tx_a = store
        .prepare(vec![half(1), half(2)], None)
        .await
        .unwrap()
        .first_offset;
    let tx_b = store
        .prepare(vec![half(3)], None)
        .await
        .unwrap()
        .first_offset;
    assert!(bodies(&store, 1).is_empty(), "half messages are invisible");
    store
        .commit_transaction(tx_ref(tx_a), vec![half(1), half(2)])
        .await
        .unwrap();
    store
        .transaction_marker(record::RecordKind::TxRollback, tx_ref(tx_b))
        .await
        .unwrap();
    let tx_c = store
        .prepare(vec![half(4)], None)
        .await
        .unwrap()
        .first_offset;
    store
        .transaction_marker(record::RecordKind::TxCheck, tx_ref(tx_c))
        .await
        .unwrap();
    assert_eq!(bodies(&store, 1), vec!["body-1", "body-2"]);
    // Enough traffic to move the checkpoint into later segments.
    for i in 0..3000 {
        store.append("orders", 0, vec![msg(i)]).await.unwrap();
    }
    store.shutdown().await;

    let store = Store::open(config(dir.path(), FlushMode::Sync), &topics()).unwrap();
    let rec = store.take_recovered_transactions().unwrap();
    assert_eq!(rec.pending.len(), 1);
    let t = rec.pending.values().next().unwrap();
    assert_eq!((t.tx_id, t.checks), (tx_c, 1));
    let _ = (tx_a, tx_b);
    assert_eq!(bodies(&store, 1), vec!["body-1", "body-2"]);
    store.shutdown().await;
}

#[tokio::test]
async fn a_commit_torn_by_a_crash_is_cut_whole_and_the_transaction_stays_pending() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path(), FlushMode::Sync), &topics()).unwrap();
    let tx = store
        .prepare(vec![half(1), half(2), half(3)], None)
        .await
        .unwrap()
        .first_offset;
    store
        .commit_transaction(tx_ref(tx), vec![half(1), half(2), half(3)])
        .await
        .unwrap();
    let end = store.log_end();
    store.shutdown().await;
    // Tear the commit group: its last record loses its tail, in a crash
    // before a checkpoint covered it.
    tear_tail(dir.path(), end, 5);
    std::fs::remove_file(dir.path().join("checkpoint")).unwrap();

    let store = Store::open(config(dir.path(), FlushMode::Sync), &topics()).unwrap();
    let r = store.read("orders", 1, 0, 10, 1 << 20).unwrap();
    assert!(
        r.messages.is_empty(),
        "no part of a torn commit is visible: {:?} end {} log_end {}",
        r.messages.iter().map(|m| m.log_offset).collect::<Vec<_>>(),
        end,
        store.log_end()
    );
    let rec = store.take_recovered_transactions().unwrap();
    assert_eq!(
        rec.pending.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        vec![tx]
    );
    assert_eq!(rec.pending.get(&tx).unwrap().halves, 3);
    // Committing again works and shows each message once.
    store
        .commit_transaction(tx_ref(tx), vec![half(1), half(2), half(3)])
        .await
        .unwrap();
    assert_eq!(bodies(&store, 1), vec!["body-1", "body-2", "body-3"]);
    store.shutdown().await;
}

#[tokio::test]
async fn released_pages_read_back_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path(), FlushMode::Async), &topics()).unwrap();
    for i in 0..3000 {
        store.append("orders", 0, vec![msg(i)]).await.unwrap();
    }
    let before = bodies(&store, 0);
    let slice = store.read("orders", 0, 2999, 1, 1 << 20).unwrap();
    store.release_mapped_pages();
    assert_eq!(bodies(&store, 0), before);
    // Part of a segment (recovery releases what it replayed), at
    // unaligned ends, empty, and past its end: no byte changes either.
    let segments = store.inner.log.segments();
    segments[0].release_range(5000, 100_001).unwrap();
    segments[0].release_range(7, 7).unwrap();
    segments[0].release_range(0, usize::MAX).unwrap();
    assert_eq!(bodies(&store, 0), before);
    // A slice handed out before the releases still reads the same bytes.
    assert_eq!(slice.messages[0].message.body, &b"body-2999"[..]);
    store.shutdown().await;
}

/// Every start begins a fresh segment, yet a few restarts that each write
/// a little never make the store "full": the size limit counts bytes of
/// records, not segments.
#[tokio::test]
async fn restarts_do_not_use_up_the_size_limit() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path(), FlushMode::Async);
    c.max_log_bytes = Some(4 * 64 * 1024);
    for round in 0..8 {
        let store = Store::open(c.clone(), &topics()).unwrap();
        let sent = store.append("orders", 0, vec![msg(round)]).await;
        assert!(sent.is_ok(), "round {round}: {sent:?}");
        store.shutdown().await;
    }
    // The limit still holds for what is really written.
    let store = Store::open(c, &topics()).unwrap();
    let big = Message::new("orders", vec![b'x'; 8 * 1024]);
    let mut refused = None;
    for _ in 0..64 {
        if let Err(e) = store.append("orders", 1, vec![big.clone()]).await {
            refused = Some(e);
            break;
        }
    }
    assert!(matches!(refused, Some(StoreError::Full(_))), "{refused:?}");
    store.shutdown().await;
}

/// The bytes of records the store holds are the same after a restart as
/// before: the segment a restart leaves counted the rest of its last block
/// (77974 bytes became 81920, at every restart), and so did a segment the
/// writer filled. Across segment rolls, with and without new records.
#[tokio::test]
async fn the_store_size_is_the_same_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let c = config(dir.path(), FlushMode::Async);
    let mut before = 0;
    for round in 0..4 {
        let store = Store::open(c.clone(), &topics()).unwrap();
        assert_eq!(store.disk_usage().1, before, "start {round}");
        // About 70 KB: a segment filled and rolled, and one left part
        // full. The third start writes nothing.
        if round != 2 {
            for i in 0..700 {
                store.append("orders", 0, vec![msg(i)]).await.unwrap();
            }
        }
        let (segments, bytes) = store.disk_usage();
        assert!(segments > round, "{segments} segments");
        assert!(bytes >= before, "{bytes} after {before}");
        before = bytes;
        store.shutdown().await;
    }
    assert!(before > 200_000 && before % 4096 != 0, "{before}");
}

/// Ended transactions are remembered across several short runs (each start
/// begins a segment that may hold a record or two): the look back covers a
/// segment's worth of records, not just the previous run's segment.
#[tokio::test]
async fn ended_transactions_are_remembered_across_short_runs() {
    let dir = tempfile::tempdir().unwrap();
    let c = config(dir.path(), FlushMode::Async);
    let store = Store::open(c.clone(), &topics()).unwrap();
    let tx = store
        .prepare(vec![(0, msg(0))], None)
        .await
        .unwrap()
        .first_offset;
    store
        .transaction_marker(record::RecordKind::TxRollback, tx_ref(tx))
        .await
        .unwrap();
    store.shutdown().await;
    for round in 1..5 {
        let store = Store::open(c.clone(), &topics()).unwrap();
        let recovered = store.take_recovered_transactions().unwrap_or_default();
        let ended: Vec<u64> = recovered.ended.iter().map(|e| e.0).collect();
        assert_eq!(ended, vec![tx], "start {round}");
        store.append("orders", 0, vec![msg(round)]).await.unwrap();
        store.shutdown().await;
    }
}

/// A half message at the size limit can still be carried forward with the
/// state properties added (a carry is never refused for its size).
#[tokio::test]
async fn a_half_message_at_the_size_limit_is_carried_forward() {
    let dir = tempfile::tempdir().unwrap();
    let c = config(dir.path(), FlushMode::Sync);
    let max = c.max_message_size;
    let store = Store::open(c, &topics()).unwrap();
    // The largest half message the store takes.
    let mut body = max - record::HEADER_LEN - 64;
    let at = loop {
        let m = Message::new("orders", vec![b'h'; body + 1]);
        if store.prepare(vec![(0, m)], None).await.is_err() {
            break store
                .prepare(vec![(0, Message::new("orders", vec![b'h'; body]))], None)
                .await
                .unwrap()
                .first_offset;
        }
        body += 1;
    };
    let (rec, size) = store.read_record_at(at).unwrap();
    assert!(size as usize > max - 16, "{size} of {max}");
    let mut m = rec.message;
    m.properties
        .insert(PROP_CARRIED_PREPARED_AT.into(), "1764633600000".into());
    m.properties.insert(PROP_CARRIED_CHECKS.into(), "15".into());
    m.properties.insert(PROP_CARRIED_PARKED.into(), "1".into());
    let pending = store.pending_halves();
    let carried = store
        .carry_transaction(tx_ref(at), vec![(0, m)])
        .await
        .expect("a carry is never refused for its size");
    assert!(carried > at);
    assert_eq!(store.pending_halves(), pending, "moved, not added");
    store.shutdown().await;
}

/// A consume-queue file removed or cut by hand (entries the checkpoint
/// says are there): every queue is rebuilt from the whole log, and every
/// message is read again. Before, the replay from the checkpoint left the
/// entries below it as zeros, skipped, and their messages never delivered.
#[tokio::test]
async fn a_consume_queue_file_removed_or_cut_is_rebuilt_from_the_log() {
    for cut in [None, Some(super::consume_queue::ENTRY_LEN as u64 * 3 + 7)] {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(config(dir.path(), FlushMode::Sync), &topics()).unwrap();
        // 10 KB each: the log spans several 64 KiB segments, and the
        // checkpoint's (where the replay starts) holds the last few only.
        let pad = "x".repeat(10_000);
        for i in 0..10 {
            let m = Message::new("orders", format!("body-{i}:{pad}").into_bytes());
            store.append("orders", 0, vec![m]).await.unwrap();
        }
        store.commit_offset("g", "orders", 0, 4).await.unwrap();
        store.shutdown().await;
        let file = dir
            .path()
            .join("consumequeue/orders/0/00000000000000000000");
        match cut {
            None => std::fs::remove_file(&file).unwrap(),
            Some(len) => std::fs::OpenOptions::new()
                .write(true)
                .open(&file)
                .unwrap()
                .set_len(len)
                .unwrap(),
        }
        let store = Store::open(config(dir.path(), FlushMode::Sync), &topics()).unwrap();
        let want: Vec<String> = (0..10).map(|i| format!("body-{i}:{pad}")).collect();
        assert!(
            bodies(&store, 0) == want,
            "cut to {cut:?}: {} bodies",
            bodies(&store, 0).len()
        );
        assert_eq!(store.committed_offset("g", "orders", 0), Some(4));
        store.shutdown().await;
    }
}
