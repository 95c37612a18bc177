//! A slave's store fed by a master's log: the same bytes at the same
//! positions, and the same derived state (queues, offsets, transactions,
//! delay levels), across segment rolls, a master restart and a slave restart.

use std::sync::{Arc, Mutex};

use txmq_protocol::{now_millis, Message, RecordRef};

use super::tests::{config, topics};
use super::*;

fn msg(i: usize) -> Message {
    Message::new("orders", format!("body-{i}").into_bytes()).with_key(format!("k{i}"))
}

pub(super) fn slave_config(dir: &std::path::Path) -> StoreConfig {
    let mut c = config(dir, FlushMode::Async);
    c.replica = true;
    c
}

/// Copies the master's log into the slave as replication does: whole-record
/// batches from the slave's end, each checked against the master first.
pub(super) async fn copy(master: &Store, slave: &Store, last: &mut Option<RecordRef>) -> usize {
    let mut batches = 0;
    loop {
        let from = slave.log_end();
        if let Some(r) = *last {
            assert_eq!(master.check_record(r, from), RecordCheck::Same);
        }
        let from = if last.is_none() {
            from.max(master.log_min())
        } else {
            from
        };
        let Some((pos, data, records)) =
            master.read_log(from, 3000, master.shippable_end()).unwrap()
        else {
            return batches;
        };
        assert!(records > 0);
        let n = data.len() as u64;
        let crc_at = {
            // The last record of the batch.
            let mut rel = 0usize;
            let mut lastrel = 0usize;
            while rel < data.len() {
                lastrel = rel;
                rel += u32::from_le_bytes(data[rel..rel + 4].try_into().unwrap()) as usize;
            }
            lastrel
        };
        let crc = u32::from_le_bytes(data[crc_at + 4..crc_at + 8].try_into().unwrap());
        let a = slave.append_replicated(pos, data).await.unwrap();
        assert_eq!(a.end, pos + n);
        *last = Some(RecordRef {
            pos: pos + crc_at as u64,
            crc,
        });
        batches += 1;
    }
}

fn read_all(store: &Store, queue: u32) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    let mut offset = 0;
    loop {
        let r = store.read("orders", queue, offset, 64, 1 << 20).unwrap();
        if r.messages.is_empty() {
            return out;
        }
        out.extend(r.messages.iter().map(|m| {
            (
                m.queue_offset,
                String::from_utf8(m.message.body.to_vec()).unwrap(),
            )
        }));
        offset = r.next_offset;
    }
}

fn segment_bytes(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir.join("commitlog"))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slave_holds_the_masters_log_byte_for_byte_and_derives_the_same_state() {
    let mdir = tempfile::tempdir().unwrap();
    let sdir = tempfile::tempdir().unwrap();
    let master = Store::open(config(mdir.path(), FlushMode::Async), &topics()).unwrap();
    let slave = Store::open(slave_config(sdir.path()), &[]).unwrap();
    let changes: Arc<Mutex<Vec<TxChange>>> = Arc::default();
    let seen = changes.clone();
    slave.set_tx_listener(Box::new(move |c| seen.lock().unwrap().extend(c)));
    let mut last = None;

    // Messages across several 64 KiB segments, offsets, transactions
    // (committed, rolled back, pending), a delayed message.
    for i in 0..2500 {
        master
            .append("orders", (i % 2) as u32, vec![msg(i)])
            .await
            .unwrap();
    }
    master.commit_offset("g", "orders", 0, 700).await.unwrap();
    let committed = master
        .prepare(vec![(1, msg(9001)), (0, msg(9002))], None)
        .await
        .unwrap()
        .first_offset;
    let rolled = master
        .prepare(vec![(1, msg(9003))], None)
        .await
        .unwrap()
        .first_offset;
    let pending = master
        .prepare(vec![(0, msg(9004))], None)
        .await
        .unwrap()
        .first_offset;
    let tx = |id| TxRef {
        id,
        first_msg_id: MsgId::default(),
        halves_at: id,
    };
    master
        .commit_transaction(tx(committed), vec![(1, msg(9001)), (0, msg(9002))])
        .await
        .unwrap();
    master
        .transaction_marker(record::RecordKind::TxRollback, tx(rolled))
        .await
        .unwrap();
    master
        .transaction_marker(record::RecordKind::TxCheck, tx(pending))
        .await
        .unwrap();
    master
        .append_delayed("orders", 1, vec![msg(9100)], now_millis() + 60_000)
        .await
        .unwrap();
    let batches = copy(&master, &slave, &mut last).await;
    assert!(batches > 10, "copied in {batches} batches");

    assert_eq!(slave.log_end(), master.log_end());
    assert_eq!(read_all(&slave, 0), read_all(&master, 0));
    assert_eq!(read_all(&slave, 1), read_all(&master, 1));
    assert_eq!(slave.committed_offset("g", "orders", 0), Some(700));
    assert_eq!(slave.delay_stats().pending, 1);
    assert_eq!(
        slave.pending_halves(),
        1,
        "only the pending transaction's halves"
    );
    let changes = std::mem::take(&mut *changes.lock().unwrap());
    assert!(
        changes.contains(&TxChange::Ended(committed, true, msg(9001).msg_id))
            || changes
                .iter()
                .any(|c| matches!(c, TxChange::Ended(id, true, _) if *id == committed))
    );
    assert!(changes
        .iter()
        .any(|c| matches!(c, TxChange::Ended(id, false, _) if *id == rolled)));
    assert!(changes
        .iter()
        .any(|c| matches!(c, TxChange::Pending(t) if t.tx_id == pending && t.checks == 1)));

    // The master restarts (a fresh segment past its log), the slave too
    // (it resumes right after its last record): both go on.
    master.shutdown().await;
    slave.shutdown().await;
    let master = Store::open(config(mdir.path(), FlushMode::Async), &topics()).unwrap();
    let slave = Store::open(slave_config(sdir.path()), &[]).unwrap();
    assert_eq!(
        slave.opened_last_record(),
        last,
        "the slave finds its last record"
    );
    assert!(
        master.log_end() > slave.log_end(),
        "the master starts a fresh segment"
    );
    for i in 2500..2600 {
        master
            .append("orders", (i % 2) as u32, vec![msg(i)])
            .await
            .unwrap();
    }
    copy(&master, &slave, &mut last).await;
    assert_eq!(slave.log_end(), master.log_end());
    assert_eq!(read_all(&slave, 0), read_all(&master, 0));
    assert_eq!(read_all(&slave, 0).len(), 1300 + 1);
    let recovered = slave.take_recovered_transactions().unwrap();
    assert_eq!(
        recovered
            .pending
            .iter()
            .map(|(id, _)| *id)
            .collect::<Vec<_>>(),
        [pending]
    );
    master.shutdown().await;
    slave.shutdown().await;
    assert_eq!(segment_bytes(mdir.path()), segment_bytes(sdir.path()));
}

#[tokio::test]
async fn replicated_data_that_does_not_continue_the_log_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let master_dir = tempfile::tempdir().unwrap();
    let master = Store::open(config(master_dir.path(), FlushMode::Async), &topics()).unwrap();
    master
        .append("orders", 0, vec![msg(1), msg(2)])
        .await
        .unwrap();
    let (_, data, _) = master
        .read_log(0, 1 << 20, master.log_end())
        .unwrap()
        .unwrap();
    let slave = Store::open(slave_config(dir.path()), &[]).unwrap();
    // Not at the end, not a segment start.
    let e = slave
        .append_replicated(100, data.clone())
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Invalid(_)), "{e}");
    assert_eq!(slave.log_end(), 0);
    // A master's store takes none.
    let e = master
        .append_replicated(master.log_end(), data.clone())
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Invalid(_)), "{e}");
    slave.append_replicated(0, data).await.unwrap();
    assert_eq!(read_all(&slave, 0).len(), 2);
    // Reading past the end, or asking about a record that is not there.
    assert!(matches!(
        master.read_log(master.log_end() + 1, 10, master.log_end()),
        Err(LogReadError::Ahead { .. })
    ));
    assert_eq!(
        master.check_record(RecordRef { pos: 0, crc: 1 }, 10),
        RecordCheck::Differs
    );
    master.shutdown().await;
    slave.shutdown().await;
}

/// A replica cut back to a new master's history: the log ends at the cut,
/// queues and consumer offsets hold nothing past it, and writing goes on
/// right there (whether the checkpoint lay before the cut or past it).
#[tokio::test]
async fn a_log_cut_at_a_record_boundary_rebuilds_queues_and_offsets() {
    for checkpoint_past_cut in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let mut c = slave_config(dir.path());
        c.checkpoint_interval = Duration::from_secs(3600);
        let store = Store::open(c.clone(), &topics()).unwrap();
        for i in 0..5 {
            store.append("orders", 0, vec![msg(i)]).await.unwrap();
        }
        store.commit_offset("g", "orders", 0, 3).await.unwrap();
        let cut = store.log_end();
        if !checkpoint_past_cut {
            // A checkpoint at the cut, kept aside, as a replica's would be.
            store.shutdown().await;
            std::fs::copy(dir.path().join("checkpoint"), dir.path().join("cp.at-cut")).unwrap();
        }
        let store = if checkpoint_past_cut {
            store
        } else {
            Store::open(c.clone(), &topics()).unwrap()
        };
        for i in 5..9 {
            store.append("orders", 0, vec![msg(i)]).await.unwrap();
        }
        store.commit_offset("g", "orders", 0, 8).await.unwrap();
        store.shutdown().await;
        let cp = checkpoint::Checkpoint::load(dir.path()).unwrap().unwrap();
        assert!(cp.position > cut, "the last checkpoint lies past the cut");
        if !checkpoint_past_cut {
            std::fs::rename(dir.path().join("cp.at-cut"), dir.path().join("checkpoint")).unwrap();
        }

        truncate_log(&c, cut).unwrap();
        let store = Store::open(c.clone(), &topics()).unwrap();
        assert_eq!(
            store.log_end(),
            cut,
            "checkpoint past the cut: {checkpoint_past_cut}"
        );
        assert_eq!(store.queue_bounds("orders", 0), Some((0, 5)));
        // The commit of 8 was cut; 3 stands (or, replayed from an old
        // checkpoint's base, at most the queue's end).
        let committed = store.committed_offset("g", "orders", 0).unwrap();
        assert!(committed <= 5, "{committed}");
        assert_eq!(committed, 3);
        let next = store.append("orders", 0, vec![msg(100)]).await.unwrap();
        assert!(next.end > cut);
        let got = store.read("orders", 0, 5, 10, 1 << 20).unwrap().messages;
        assert_eq!(got.len(), 1);
        assert_eq!(&got[0].message.body[..], b"body-100");
        store.shutdown().await;
    }
}

#[tokio::test]
async fn a_slave_indexes_the_replicated_log_as_the_master_does() {
    let mdir = tempfile::tempdir().unwrap();
    let sdir = tempfile::tempdir().unwrap();
    let master = Store::open(config(mdir.path(), FlushMode::Async), &topics()).unwrap();
    let slave = Store::open(slave_config(sdir.path()), &topics()).unwrap();
    let mut ids = Vec::new();
    for i in 0..500 {
        let m = msg(i).with_key(format!("k{i} shared"));
        ids.push(m.msg_id);
        master
            .append("orders", (i % 2) as u32, vec![m])
            .await
            .unwrap();
    }
    let half = msg(1000);
    master.prepare(vec![(0, half.clone())], None).await.unwrap();
    let mut last = None;
    copy(&master, &slave, &mut last).await;
    let positions = |s: &Store, id| -> Vec<u64> {
        s.find_by_id(id, 8).unwrap().iter().map(|f| f.pos).collect()
    };
    for id in ids.iter().chain(std::iter::once(&half.msg_id)) {
        let on_master = positions(&master, id);
        assert_eq!(on_master.len(), 1);
        assert_eq!(positions(&slave, id), on_master);
    }
    let by_key = slave
        .find_by_key("orders", "shared", 0, u64::MAX, 3)
        .unwrap();
    let bodies: Vec<String> = by_key
        .iter()
        .map(|f| String::from_utf8_lossy(&f.record.message.body).into_owned())
        .collect();
    assert_eq!(bodies, vec!["body-499", "body-498", "body-497"]);
    slave.shutdown().await;
    // And after the slave restarts.
    let slave = Store::open(slave_config(sdir.path()), &topics()).unwrap();
    assert_eq!(positions(&slave, &ids[7]), positions(&master, &ids[7]));
    slave.shutdown().await;
    master.shutdown().await;
}
