//! Message index tests on a real temp directory: lookups by id and key
//! across index file rolls, a rebuild after a crash (a copy of the data
//! directory taken while the store runs, before the index was synced), a
//! torn log tail, retention, and transactions' records.

use txmq_protocol::Message;

use super::tests::{config, topics};
use super::*;

/// Small index files: several of them after a few hundred messages.
fn small(dir: &std::path::Path) -> StoreConfig {
    let mut c = config(dir, FlushMode::Async);
    c.index = index::IndexConfig {
        slots: 64,
        entries: 100,
        ..index::IndexConfig::default()
    };
    c
}

fn keyed(i: usize) -> Message {
    Message::new("orders", format!("body-{i}").into_bytes())
        .with_key(format!("order-{i} customer-{}", i % 3))
}

fn bodies(found: &[Found]) -> Vec<String> {
    found
        .iter()
        .map(|f| String::from_utf8_lossy(&f.record.message.body).into_owned())
        .collect()
}

/// Copies a data directory file by file (what a crash at this instant
/// leaves on disk, as far as a `kill -9` goes: the page cache survives it).
pub(super) fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

/// An index written by an older broker (version 1 files, hashed with
/// FNV-1a) keeps answering after an upgrade: its unsealed file goes on
/// filling in version 1, and the files after it are version 2.
#[tokio::test]
async fn index_files_of_the_previous_version_are_read_and_filled_after_an_upgrade() {
    let dir = tempfile::tempdir().unwrap();
    let mut old = small(dir.path());
    old.index.version = 1;
    let store = Store::open(old, &topics()).unwrap();
    let mut ids = Vec::new();
    let send = |store: Store, from: usize, to: usize| async move {
        let mut sent = Vec::new();
        for i in from..to {
            let m = keyed(i);
            sent.push(m.msg_id);
            store.append("orders", 0, vec![m]).await.unwrap();
        }
        (store, sent)
    };
    // 3 entries a message: 3 full files and one a third full.
    let (store, sent) = send(store, 0, 110).await;
    ids.extend(sent);
    store.shutdown().await;
    let versions = |dir: &std::path::Path| {
        let mut v: Vec<(String, u32)> = std::fs::read_dir(dir.join("index"))
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let h = std::fs::read(e.path()).unwrap();
                let name = e.file_name().to_string_lossy().into_owned();
                (name, u32::from_le_bytes([h[4], h[5], h[6], h[7]]))
            })
            .collect();
        v.sort();
        v.into_iter().map(|(_, v)| v).collect::<Vec<u32>>()
    };
    assert_eq!(versions(dir.path()), vec![1, 1, 1, 1]);

    let store = Store::open(small(dir.path()), &topics()).unwrap();
    let (store, sent) = send(store, 110, 200).await;
    ids.extend(sent);
    let v = versions(dir.path());
    assert_eq!(
        v[..4],
        [1, 1, 1, 1],
        "the unsealed file filled in its own version"
    );
    assert!(v.len() >= 6 && v[4..].iter().all(|v| *v == 2), "{v:?}");
    for i in [0, 5, 105, 109, 110, 120, 199] {
        let found = store.find_by_id(&ids[i], 8).unwrap();
        assert_eq!(bodies(&found), vec![format!("body-{i}")], "message {i}");
        let by_key = store.find_by_key("orders", &format!("order-{i}"), 0, u64::MAX, 8);
        assert_eq!(bodies(&by_key.unwrap()), vec![format!("body-{i}")]);
    }
    // A key in both versions: every message, newest first.
    let found = store
        .find_by_key("orders", "customer-2", 0, u64::MAX, 100)
        .unwrap();
    assert_eq!(found.len(), 66);
    assert_eq!(bodies(&found[..2]), vec!["body-197", "body-194"]);
    assert_eq!(bodies(&found[64..]), vec!["body-5", "body-2"]);
    store.shutdown().await;
}

#[tokio::test]
async fn messages_are_found_by_id_and_by_each_key_across_index_files() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(small(dir.path()), &topics()).unwrap();
    let mut ids = Vec::new();
    for i in 0..300 {
        let m = keyed(i);
        ids.push(m.msg_id);
        store
            .append("orders", (i % 2) as u32, vec![m])
            .await
            .unwrap();
    }
    // 3 entries a message, 100 a file.
    assert!(store.inner.index.as_ref().unwrap().file_count() >= 9);
    for i in [0, 1, 150, 299] {
        let found = store.find_by_id(&ids[i], 8).unwrap();
        assert_eq!(bodies(&found), vec![format!("body-{i}")]);
        assert_eq!(found[0].record.queue_offset, (i / 2) as u64);
        let by_key = store.find_by_key("orders", &format!("order-{i}"), 0, u64::MAX, 8);
        assert_eq!(bodies(&by_key.unwrap()), vec![format!("body-{i}")]);
    }
    // The second key: newest first, bounded.
    let found = store
        .find_by_key("orders", "customer-1", 0, u64::MAX, 5)
        .unwrap();
    assert_eq!(
        bodies(&found),
        vec!["body-298", "body-295", "body-292", "body-289", "body-286"]
    );
    // Another topic, a time range before the messages: nothing.
    assert!(store
        .find_by_key("other", "order-1", 0, u64::MAX, 8)
        .unwrap()
        .is_empty());
    let first_ts = store.find_by_id(&ids[0], 1).unwrap()[0]
        .record
        .store_timestamp;
    assert!(store
        .find_by_key("orders", "order-1", 0, first_ts - 1, 8)
        .unwrap()
        .is_empty());
    assert!(store.find_by_id(&MsgId::generate(), 8).unwrap().is_empty());
    store.shutdown().await;

    // After a clean restart (nothing re-indexed) as before.
    let store = Store::open(small(dir.path()), &topics()).unwrap();
    let found = store.find_by_id(&ids[42], 8).unwrap();
    assert_eq!(bodies(&found), vec!["body-42"]);
    store.shutdown().await;
}

#[tokio::test]
async fn a_crash_before_the_index_was_synced_loses_no_lookup() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = small(dir.path());
    // No checkpoint (and so no index sync) while the test runs.
    c.checkpoint_interval = Duration::from_secs(3600);
    let store = Store::open(c.clone(), &topics()).unwrap();
    let mut ids = Vec::new();
    for i in 0..200 {
        let m = keyed(i);
        ids.push(m.msg_id);
        store.append("orders", 0, vec![m]).await.unwrap();
    }
    let end = store.log_end();
    let crashed = tempfile::tempdir().unwrap();
    copy_dir(dir.path(), crashed.path());
    let torn = tempfile::tempdir().unwrap();
    copy_dir(dir.path(), torn.path());
    store.shutdown().await;

    // Every acknowledged message is found in the crashed copy.
    let mut c2 = small(crashed.path());
    c2.checkpoint_interval = Duration::from_secs(3600);
    let store = Store::open(c2, &topics()).unwrap();
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(
            bodies(&store.find_by_id(id, 8).unwrap()),
            vec![format!("body-{i}")]
        );
    }
    store.shutdown().await;

    // A torn last record: its lookup finds nothing, and the message written
    // at its place afterwards is found instead (stale entries are checked).
    let seg = {
        let mut segs: Vec<_> = std::fs::read_dir(torn.path().join("commitlog"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        segs.sort();
        segs.pop().unwrap()
    };
    let start: u64 = seg.file_name().unwrap().to_str().unwrap().parse().unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
    f.set_len(end - start - 10).unwrap();
    drop(f);
    let mut c3 = small(torn.path());
    c3.checkpoint_interval = Duration::from_secs(3600);
    let store = Store::open(c3, &topics()).unwrap();
    assert!(store.find_by_id(&ids[199], 8).unwrap().is_empty());
    assert_eq!(
        bodies(&store.find_by_id(&ids[198], 8).unwrap()),
        vec!["body-198"]
    );
    let m = Message::new("orders", &b"after"[..]).with_key("order-199");
    let id = m.msg_id;
    store.append("orders", 0, vec![m]).await.unwrap();
    assert_eq!(bodies(&store.find_by_id(&id, 8).unwrap()), vec!["after"]);
    let by_key = store
        .find_by_key("orders", "order-199", 0, u64::MAX, 8)
        .unwrap();
    assert_eq!(bodies(&by_key), vec!["after"]);
    store.shutdown().await;
}

#[tokio::test]
async fn a_lost_index_is_rebuilt_from_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(small(dir.path()), &topics()).unwrap();
    let m = keyed(7);
    let id = m.msg_id;
    store.append("orders", 1, vec![m]).await.unwrap();
    store.shutdown().await;
    std::fs::remove_dir_all(dir.path().join("index")).unwrap();
    let store = Store::open(small(dir.path()), &topics()).unwrap();
    assert_eq!(bodies(&store.find_by_id(&id, 8).unwrap()), vec!["body-7"]);
    store.shutdown().await;
}

/// A rebuild indexes a whole segment in one pass: 9,000 entries, written
/// and linked 2,048 at a time, in files with the default (large) sizes.
/// Every chain stays whole across those writes.
#[tokio::test]
async fn a_rebuild_larger_than_one_index_write_keeps_every_chain() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path(), FlushMode::Async), &topics()).unwrap();
    let mut ids = Vec::new();
    for batch in 0..30 {
        let messages: Vec<Message> = (0..100).map(|i| keyed(batch * 100 + i)).collect();
        ids.extend(messages.iter().map(|m| m.msg_id));
        store.append("orders", 0, messages).await.unwrap();
    }
    store.shutdown().await;
    std::fs::remove_dir_all(dir.path().join("index")).unwrap();
    let store = Store::open(config(dir.path(), FlushMode::Async), &topics()).unwrap();
    for i in [0, 2047, 2048, 2999] {
        let body = format!("body-{i}");
        assert_eq!(
            bodies(&store.find_by_id(&ids[i], 8).unwrap()),
            vec![body.clone()]
        );
        let key = format!("order-{i}");
        assert_eq!(
            bodies(&store.find_by_key("orders", &key, 0, u64::MAX, 8).unwrap()),
            vec![body]
        );
    }
    // One chain of 1,000 entries, newest first.
    let found = store
        .find_by_key("orders", "customer-0", 0, u64::MAX, 2000)
        .unwrap();
    let expected: Vec<String> = (0..3000)
        .rev()
        .filter(|i| i % 3 == 0)
        .map(|i| format!("body-{i}"))
        .collect();
    assert_eq!(bodies(&found), expected);
    store.shutdown().await;
}

#[tokio::test]
async fn retention_deletes_index_files_of_deleted_segments() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = small(dir.path());
    c.retention = Duration::ZERO;
    let store = Store::open(c, &topics()).unwrap();
    let mut ids = Vec::new();
    for i in 0..3000 {
        let m = keyed(i);
        ids.push(m.msg_id);
        store.append("orders", 0, vec![m]).await.unwrap();
    }
    // Sealed files count as removable once synced (by the checkpoint).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let index = store.inner.index.as_ref().unwrap();
    let before = index.file_count();
    assert!(store.enforce_retention().unwrap() >= 1);
    let after = index.file_count();
    assert!(after < before, "{after} index files of {before} left");
    assert!(store.find_by_id(&ids[0], 8).unwrap().is_empty());
    assert_eq!(
        bodies(&store.find_by_id(&ids[2999], 8).unwrap()),
        vec!["body-2999"]
    );
    let remaining = std::fs::read_dir(dir.path().join("index")).unwrap().count();
    assert_eq!(remaining, after);
    store.shutdown().await;
}

#[tokio::test]
async fn half_messages_commits_and_rollbacks_are_indexed() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(small(dir.path()), &topics()).unwrap();
    let a = keyed(1);
    let b = keyed(2);
    let tx_a = store
        .prepare(vec![(1, a.clone())], None)
        .await
        .unwrap()
        .first_offset;
    let tx_b = store
        .prepare(vec![(1, b.clone())], None)
        .await
        .unwrap()
        .first_offset;
    let found = store.find_by_id(&a.msg_id, 8).unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].record.kind, record::RecordKind::Half);
    assert!(store.is_pending_half(found[0].pos));
    let tx = |id, first_msg_id| TxRef {
        id,
        first_msg_id,
        halves_at: id,
    };
    store
        .commit_transaction(tx(tx_a, a.msg_id), vec![(1, a.clone())])
        .await
        .unwrap();
    store
        .transaction_marker(record::RecordKind::TxRollback, tx(tx_b, b.msg_id))
        .await
        .unwrap();
    let kinds = |id| -> Vec<record::RecordKind> {
        store
            .find_by_id(id, 8)
            .unwrap()
            .iter()
            .map(|f| f.record.kind)
            .collect()
    };
    use record::RecordKind::{Half, Message as Msg, TxRollback};
    assert_eq!(kinds(&a.msg_id), vec![Msg, Half]);
    assert_eq!(kinds(&b.msg_id), vec![TxRollback, Half]);
    assert!(!store.is_pending_half(tx_b));
    // By key: the committed message and its half, not the marker.
    let by_key = store
        .find_by_key("orders", "order-2", 0, u64::MAX, 8)
        .unwrap();
    assert_eq!(by_key.len(), 1);
    store.shutdown().await;
}

#[tokio::test]
async fn no_index_when_switched_off() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = small(dir.path());
    c.message_index = false;
    let store = Store::open(c, &topics()).unwrap();
    store.append("orders", 0, vec![keyed(1)]).await.unwrap();
    assert!(matches!(
        store.find_by_id(&MsgId::generate(), 1),
        Err(StoreError::Invalid(_))
    ));
    assert!(!dir.path().join("index").exists());
    store.shutdown().await;
}

/// New entries are written 64 KiB at a time: a lookup finds those written
/// and those still gathered in memory alike, and a copy of the data taken
/// before any sync (a `kill -9`) still finds every message once reopened.
#[tokio::test]
async fn entries_gathered_in_memory_are_found_before_and_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path(), FlushMode::Async), &topics()).unwrap();
    let mut ids = Vec::new();
    // 3 entries per message (id and two keys): past one 2048-entry write.
    for i in 0..1000 {
        let m = keyed(i);
        ids.push(m.msg_id);
        store.append("orders", 0, vec![m]).await.unwrap();
    }
    for i in [0, 500, 683, 999] {
        let found = store.find_by_id(&ids[i], 10).unwrap();
        assert_eq!(bodies(&found), vec![format!("body-{i}")], "message {i}");
    }
    let by_key = store
        .find_by_key("orders", "order-999", 0, u64::MAX, 10)
        .unwrap();
    assert_eq!(bodies(&by_key), vec!["body-999"]);
    let crashed = tempfile::tempdir().unwrap();
    copy_dir(dir.path(), crashed.path());
    store.shutdown().await;
    let reopened = Store::open(config(crashed.path(), FlushMode::Async), &topics()).unwrap();
    for (i, id) in ids.iter().enumerate() {
        let found = reopened.find_by_id(id, 10).unwrap();
        assert_eq!(bodies(&found), vec![format!("body-{i}")], "message {i}");
    }
    reopened.shutdown().await;
}
