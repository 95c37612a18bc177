//! Consumer offsets committed with a transaction: one atomic group with its
//! messages (recovered whole or cut whole), and `expected` compared in the
//! single writer (a conflict writes a rollback instead).

use txmq_protocol::{Message, TxOffset};

use super::tests::{config, topics};
use super::*;

fn tx_ref(id: u64) -> TxRef {
    TxRef {
        id,
        first_msg_id: MsgId::default(),
        halves_at: id,
    }
}

fn half(body: &str) -> (u32, Message) {
    (1, Message::new("orders", body.to_string().into_bytes()))
}

fn offset(offset: u64, expected: Option<u64>) -> TxOffset {
    TxOffset {
        group: "pipeline".into(),
        topic: "orders".into(),
        queue: 0,
        offset,
        expected,
    }
}

fn visible(store: &Store) -> usize {
    store
        .read("orders", 1, 0, 100, 1 << 20)
        .unwrap()
        .messages
        .len()
}

/// Fills queue 0 (the consumed one) with `n` messages.
async fn fill_input(store: &Store, n: usize) {
    for i in 0..n {
        store
            .append("orders", 0, vec![Message::new("orders", format!("in-{i}"))])
            .await
            .unwrap();
    }
}

/// Restarts as after a crash that lost the checkpoint: everything is
/// replayed from the log.
fn reopen_replaying(dir: &std::path::Path) -> Store {
    let _ = std::fs::remove_file(dir.join("checkpoint"));
    Store::open(config(dir, FlushMode::Sync), &topics()).unwrap()
}

#[tokio::test]
async fn offsets_commit_with_the_messages_and_are_recovered_with_them() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path(), FlushMode::Sync), &topics()).unwrap();
    fill_input(&store, 5).await;
    let tx = store
        .prepare(vec![half("out")], None)
        .await
        .unwrap()
        .first_offset;
    store
        .commit_with_offsets(tx_ref(tx), vec![half("out")], vec![offset(3, Some(0))])
        .await
        .unwrap();
    assert_eq!(visible(&store), 1);
    assert_eq!(store.committed_offset("pipeline", "orders", 0), Some(3));
    store.shutdown().await;

    let store = reopen_replaying(dir.path());
    assert_eq!(visible(&store), 1);
    assert_eq!(store.committed_offset("pipeline", "orders", 0), Some(3));
    let rec = store.take_recovered_transactions().unwrap();
    assert!(rec.pending.is_empty());
    assert!(rec
        .ended
        .iter()
        .any(|(id, committed, _)| *id == tx && *committed));
    store.shutdown().await;
}

#[tokio::test]
async fn a_torn_commit_loses_its_messages_and_its_offsets_together() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path(), FlushMode::Sync), &topics()).unwrap();
    fill_input(&store, 5).await;
    let tx = store
        .prepare(vec![half("out")], None)
        .await
        .unwrap()
        .first_offset;
    store
        .commit_with_offsets(tx_ref(tx), vec![half("out")], vec![offset(3, None)])
        .await
        .unwrap();
    let end = store.log_end();
    store.shutdown().await;
    // Tear the group's last record (the offset record; its last 8 bytes
    // are zero lengths, so cut into its tag): the messages before it are
    // whole, but must not count without it.
    let seg = {
        let mut segs: Vec<_> = std::fs::read_dir(dir.path().join("commitlog"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        segs.sort();
        segs.pop().unwrap()
    };
    let start: u64 = seg.file_name().unwrap().to_str().unwrap().parse().unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(end - start - 12)
        .unwrap();

    let store = reopen_replaying(dir.path());
    assert_eq!(visible(&store), 0, "no message of a torn commit is visible");
    assert_eq!(store.committed_offset("pipeline", "orders", 0), None);
    let rec = store.take_recovered_transactions().unwrap();
    assert_eq!(
        rec.pending.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        vec![tx]
    );
    // Committed again: both, once.
    store
        .commit_with_offsets(tx_ref(tx), vec![half("out")], vec![offset(3, None)])
        .await
        .unwrap();
    assert_eq!(visible(&store), 1);
    assert_eq!(store.committed_offset("pipeline", "orders", 0), Some(3));
    store.shutdown().await;
}

#[tokio::test]
async fn a_commit_expecting_another_offset_is_rolled_back_instead() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path(), FlushMode::Sync), &topics()).unwrap();
    fill_input(&store, 5).await;
    store
        .commit_offset("pipeline", "orders", 0, 2)
        .await
        .unwrap();
    let tx = store
        .prepare(vec![half("out")], None)
        .await
        .unwrap()
        .first_offset;
    let err = store
        .commit_with_offsets(tx_ref(tx), vec![half("out")], vec![offset(4, Some(1))])
        .await
        .unwrap_err();
    let StoreError::OffsetConflict(why) = &err else {
        panic!("not a conflict: {err}");
    };
    assert!(
        why.contains("'pipeline'") && why.contains("offset 2") && why.contains("the 1"),
        "{why}"
    );
    assert_eq!(visible(&store), 0);
    assert_eq!(store.committed_offset("pipeline", "orders", 0), Some(2));
    assert_eq!(store.pending_halves(), 0, "rolled back");
    store.shutdown().await;

    let store = reopen_replaying(dir.path());
    let rec = store.take_recovered_transactions().unwrap();
    assert!(rec.pending.is_empty());
    assert!(rec
        .ended
        .iter()
        .any(|(id, committed, _)| *id == tx && !*committed));
    assert_eq!(visible(&store), 0);
    assert_eq!(store.committed_offset("pipeline", "orders", 0), Some(2));
    store.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_commits_racing_from_one_offset_exactly_one_applies() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path(), FlushMode::Async), &topics()).unwrap();
    fill_input(&store, 50).await;
    for round in 0..20u64 {
        let mut tasks = Vec::new();
        for racer in 0..4 {
            let body = format!("r{round}-{racer}");
            let tx = store
                .prepare(vec![half(&body)], None)
                .await
                .unwrap()
                .first_offset;
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                store
                    .commit_with_offsets(
                        tx_ref(tx),
                        vec![half(&body)],
                        vec![offset(round + 1, Some(round))],
                    )
                    .await
            }));
        }
        let mut won = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(_) => won += 1,
                Err(StoreError::OffsetConflict(_)) => {}
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(won, 1, "round {round}");
        assert_eq!(
            store.committed_offset("pipeline", "orders", 0),
            Some(round + 1)
        );
    }
    assert_eq!(visible(&store), 20, "one output per input");
    store.shutdown().await;
}

#[tokio::test]
async fn a_group_without_an_offset_matches_any_expectation() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path(), FlushMode::Async), &topics()).unwrap();
    fill_input(&store, 10).await;
    let tx = store
        .prepare(vec![half("a")], None)
        .await
        .unwrap()
        .first_offset;
    store
        .commit_with_offsets(tx_ref(tx), vec![half("a")], vec![offset(8, Some(7))])
        .await
        .unwrap();
    assert_eq!(store.committed_offset("pipeline", "orders", 0), Some(8));
    store.shutdown().await;
}
