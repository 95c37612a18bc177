//! Deleting a topic survives recovery whatever checkpoint the crash left:
//! one from before the delete (which still lists the topic's queues and
//! offsets), none at all (a replay of the whole log), and a topic made
//! again under the same name after the delete.

use std::time::Duration;

use txmq_protocol::Message;

use super::checkpoint::Checkpoint;
use super::tests::config;
use super::*;

fn msg(topic: &str, body: &str) -> Message {
    Message::new(topic, body.as_bytes().to_vec())
}

fn bodies(store: &Store, topic: &str, queue: u32) -> Vec<String> {
    store
        .read(topic, queue, 0, 100, 1 << 20)
        .map(|r| {
            r.messages
                .iter()
                .map(|m| String::from_utf8_lossy(&m.message.body).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Writes `orders` messages and an offset, waits for a checkpoint and
/// keeps a copy of it, then deletes `orders`; returns the copy.
async fn written_then_deleted(dir: &std::path::Path) -> (Store, Vec<u8>) {
    let topics = vec![("orders".to_string(), 2), ("keep".to_string(), 1)];
    let store = Store::open(config(dir, FlushMode::Sync), &topics).unwrap();
    store
        .append(
            "orders",
            1,
            (0..5).map(|i| msg("orders", &format!("old-{i}"))).collect(),
        )
        .await
        .unwrap();
    store
        .append("keep", 0, vec![msg("keep", "kept")])
        .await
        .unwrap();
    store.commit_offset("g1", "orders", 1, 3).await.unwrap();
    store.commit_offset("g1", "keep", 0, 1).await.unwrap();
    // A checkpoint that lists the topic's queues and offsets.
    let path = dir.join("checkpoint");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let old = loop {
        tokio::time::sleep(Duration::from_millis(60)).await;
        if let Ok(cp) = std::fs::read(&path) {
            if Checkpoint::load(dir)
                .ok()
                .flatten()
                .is_some_and(|c| c.offsets.contains_key(&("g1".into(), "keep".into(), 0)))
            {
                break cp;
            }
        }
        assert!(std::time::Instant::now() < deadline, "no checkpoint");
    };
    let (_, removed) = store.delete_topic("orders").await.unwrap();
    assert_eq!(removed, 1);
    assert!(store.queue("orders", 0).is_none());
    assert_eq!(store.committed_offset("g1", "orders", 1), None);
    (store, old)
}

#[tokio::test]
async fn a_checkpoint_from_before_the_delete_does_not_bring_the_topic_back() {
    let dir = tempfile::tempdir().unwrap();
    let (store, old) = written_then_deleted(dir.path()).await;
    store.shutdown().await;
    std::fs::write(dir.path().join("checkpoint"), old).unwrap();
    let store = Store::open(config(dir.path(), FlushMode::Sync), &[("keep".into(), 1)]).unwrap();
    assert!(
        store.topics().iter().all(|(t, _)| t != "orders"),
        "{:?}",
        store.topics()
    );
    assert_eq!(store.committed_offset("g1", "orders", 1), None);
    assert_eq!(bodies(&store, "keep", 0), vec!["kept"]);
    assert_eq!(store.committed_offset("g1", "keep", 0), Some(1));
    store.shutdown().await;
}

#[tokio::test]
async fn a_replay_of_the_whole_log_does_not_bring_the_topic_back() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = written_then_deleted(dir.path()).await;
    store.shutdown().await;
    std::fs::remove_file(dir.path().join("checkpoint")).unwrap();
    let store = Store::open(config(dir.path(), FlushMode::Sync), &[("keep".into(), 1)]).unwrap();
    assert!(store.topics().iter().all(|(t, _)| t != "orders"));
    assert_eq!(store.committed_offset("g1", "orders", 1), None);
    assert_eq!(bodies(&store, "keep", 0), vec!["kept"]);
    store.shutdown().await;
}

#[tokio::test]
async fn a_topic_made_again_starts_anew_and_keeps_only_what_came_after() {
    let dir = tempfile::tempdir().unwrap();
    let (store, old) = written_then_deleted(dir.path()).await;
    store.ensure_queues("orders", 2).unwrap();
    let a = store
        .append("orders", 1, vec![msg("orders", "new")])
        .await
        .unwrap();
    assert_eq!(a.first_offset, 0);
    store.commit_offset("g1", "orders", 1, 1).await.unwrap();
    store.shutdown().await;
    // A crash that left the checkpoint from before the delete.
    std::fs::write(dir.path().join("checkpoint"), old).unwrap();
    let topics = [("keep".to_string(), 1), ("orders".to_string(), 2)];
    let store = Store::open(config(dir.path(), FlushMode::Sync), &topics).unwrap();
    assert_eq!(bodies(&store, "orders", 1), vec!["new"]);
    assert!(store.queue("orders", 0).is_some(), "queue 0 lost");
    assert_eq!(store.committed_offset("g1", "orders", 1), Some(1));
    store.shutdown().await;
    // And with no checkpoint at all.
    std::fs::remove_file(dir.path().join("checkpoint")).unwrap();
    let store = Store::open(config(dir.path(), FlushMode::Sync), &topics).unwrap();
    assert_eq!(bodies(&store, "orders", 1), vec!["new"]);
    assert_eq!(bodies(&store, "orders", 0), Vec::<String>::new());
    assert!(store.queue("orders", 0).is_some(), "queue 0 lost");
    assert_eq!(store.committed_offset("g1", "orders", 1), Some(1));
    store.shutdown().await;
}

/// A topic deleted and made again with no message since, then a clean
/// restart: its queues are there, empty, and take sends (the replay of the
/// delete's record, in the checkpoint's segment, had taken them).
#[tokio::test]
async fn a_topic_made_again_keeps_its_empty_queues_through_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = written_then_deleted(dir.path()).await;
    store.ensure_queues("orders", 2).unwrap();
    store.shutdown().await;
    let topics = [("keep".to_string(), 1), ("orders".to_string(), 2)];
    let store = Store::open(config(dir.path(), FlushMode::Sync), &topics).unwrap();
    for queue in 0..2 {
        let q = store
            .queue("orders", queue)
            .expect("the queue after a restart");
        assert_eq!(q.next_offset(), 0);
    }
    let a = store
        .append("orders", 0, vec![msg("orders", "after")])
        .await
        .unwrap();
    assert_eq!(a.first_offset, 0);
    store.shutdown().await;
}

#[tokio::test]
async fn a_slave_deletes_the_topic_with_the_masters_record_and_never_brings_it_back() {
    use super::replica_tests::{copy, slave_config};
    let mdir = tempfile::tempdir().unwrap();
    let sdir = tempfile::tempdir().unwrap();
    let topics = vec![("orders".to_string(), 2), ("keep".to_string(), 1)];
    let master = Store::open(config(mdir.path(), FlushMode::Async), &topics).unwrap();
    let slave = Store::open(slave_config(sdir.path()), &[]).unwrap();
    let mut last = None;
    for i in 0..5 {
        master
            .append("orders", 1, vec![msg("orders", &format!("old-{i}"))])
            .await
            .unwrap();
    }
    master
        .append("keep", 0, vec![msg("keep", "kept")])
        .await
        .unwrap();
    master.commit_offset("g1", "orders", 1, 3).await.unwrap();
    copy(&master, &slave, &mut last).await;
    assert_eq!(bodies(&slave, "orders", 1).len(), 5);
    assert_eq!(slave.committed_offset("g1", "orders", 1), Some(3));

    master.delete_topic("orders").await.unwrap();
    copy(&master, &slave, &mut last).await;
    assert!(
        slave.queue("orders", 1).is_none(),
        "the slave still has the queue"
    );
    assert_eq!(slave.committed_offset("g1", "orders", 1), None);
    assert_eq!(bodies(&slave, "keep", 0), vec!["kept"]);
    slave.shutdown().await;
    master.shutdown().await;

    // The slave's data directory started as a master (a failover), with no
    // checkpoint and without its own note of the delete: the record in the
    // log alone keeps the topic deleted.
    std::fs::remove_file(sdir.path().join("checkpoint")).ok();
    std::fs::remove_file(sdir.path().join("deleted-topics.log")).unwrap();
    let promoted =
        Store::open(config(sdir.path(), FlushMode::Async), &[("keep".into(), 1)]).unwrap();
    assert!(
        promoted.topics().iter().all(|(t, _)| t != "orders"),
        "{:?}",
        promoted.topics()
    );
    assert_eq!(promoted.committed_offset("g1", "orders", 1), None);
    assert_eq!(bodies(&promoted, "keep", 0), vec!["kept"]);
    promoted.shutdown().await;
}

#[tokio::test]
async fn a_rechecked_transaction_is_not_parked_again_by_recovery() {
    use super::tests::tx_ref;
    let dir = tempfile::tempdir().unwrap();
    let topics = vec![("orders".to_string(), 2)];
    let store = Store::open(config(dir.path(), FlushMode::Sync), &topics).unwrap();
    let tx = store
        .prepare(vec![(1, msg("orders", "half"))], None)
        .await
        .unwrap()
        .first_offset;
    for kind in [
        record::RecordKind::TxCheck,
        record::RecordKind::TxCheck,
        record::RecordKind::TxPark,
        record::RecordKind::TxRecheck,
        record::RecordKind::TxCheck,
    ] {
        store.transaction_marker(kind, tx_ref(tx)).await.unwrap();
    }
    store.shutdown().await;
    let store = Store::open(config(dir.path(), FlushMode::Sync), &topics).unwrap();
    let rec = store.take_recovered_transactions().unwrap();
    let t = rec.pending.values().next().unwrap();
    assert_eq!(
        (t.tx_id, t.checks, t.parked, t.rechecked_at),
        (tx, 3, false, 2)
    );
    store.shutdown().await;
}

/// Lookups by id leave a deleted topic's records out, also after a crash
/// that wrote the delete's record to the log but not its entry in
/// `deleted-topics.log`: recovery records it from the log.
#[tokio::test]
async fn lookups_leave_a_deleted_topic_out_also_when_a_crash_lost_its_entry() {
    let dir = tempfile::tempdir().unwrap();
    let topics = vec![("orders".to_string(), 1)];
    let store = Store::open(config(dir.path(), FlushMode::Sync), &topics).unwrap();
    let old = msg("orders", "old");
    let old_id = old.msg_id;
    store.append("orders", 0, vec![old]).await.unwrap();
    assert_eq!(store.find_by_id(&old_id, 8).unwrap().len(), 1);
    store.delete_topic("orders").await.unwrap();
    assert!(store.find_by_id(&old_id, 8).unwrap().is_empty());
    store.shutdown().await;

    std::fs::remove_file(dir.path().join("deleted-topics.log")).unwrap();
    let store = Store::open(config(dir.path(), FlushMode::Sync), &[]).unwrap();
    assert!(
        store.find_by_id(&old_id, 8).unwrap().is_empty(),
        "the old record stays out"
    );
    assert!(deleted_topics::load(dir.path())
        .unwrap()
        .contains_key("orders"));
    // Made again: only what came after is found.
    store.ensure_queues("orders", 1).unwrap();
    let new = msg("orders", "new");
    let new_id = new.msg_id;
    store.append("orders", 0, vec![new]).await.unwrap();
    assert_eq!(store.find_by_id(&new_id, 8).unwrap().len(), 1);
    assert!(store.find_by_id(&old_id, 8).unwrap().is_empty());
    store.shutdown().await;
}
