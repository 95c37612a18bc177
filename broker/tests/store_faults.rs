//! The store under damage and crashes, as property tests through its public
//! API on real temp directories (bounded case counts; `PROPTEST_CASES`
//! raises them):
//!
//! - recovery over an arbitrarily damaged commit log (bytes flipped, set,
//!   overwritten with garbage, a segment cut short, with or without the
//!   checkpoint and consume queues) never panics or hangs, keeps every
//!   record that lies wholly before the first damaged byte, serves nothing
//!   twice, refuses to start only for damage in the middle of the log, and
//!   cuts damage at the tail (`recovery.rs` says what it promises);
//! - random sequences of sync-flush appends, flushes, crashes (unflushed
//!   bytes dropped, the last write torn, out-of-order persistence) and
//!   restarts keep every acknowledged record readable exactly once, in order.

use std::collections::{BTreeMap, HashSet};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use txmq_broker::store::record::{encode, message_len, RecordHead, RecordKind};
use txmq_broker::store::{FlushMode, Store, StoreConfig, StoreError};
use txmq_protocol::{Message, MsgId, StoredMessage};

const TOPIC: &str = "t";
const QUEUES: u32 = 2;
/// Small segments, so that a few dozen records span several.
const SEGMENT: u64 = 4096;
/// Longest a recovery may take before it counts as a hang.
const HANG: Duration = Duration::from_secs(30);

fn config(dir: &Path, flush: FlushMode) -> StoreConfig {
    let mut c = StoreConfig::new(dir);
    c.flush = flush;
    c.segment_size = SEGMENT;
    c.cq_entries_per_file = 16;
    c.max_message_size = 1024;
    c.checkpoint_interval = Duration::from_millis(20);
    c
}

fn topics() -> Vec<(String, u32)> {
    vec![(TOPIC.to_string(), QUEUES)]
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime")
    })
}

/// Opens the store on another thread; a recovery that does not finish in
/// [`HANG`] fails the test (a panic inside is reported as one).
fn open(dir: &Path, flush: FlushMode) -> Result<Store, StoreError> {
    let cfg = config(dir, flush);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(Store::open(cfg, &topics()));
    });
    match rx.recv_timeout(HANG) {
        Ok(r) => r,
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!("recovery hung"),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => panic!("recovery panicked"),
    }
}

/// A message whose id and body name its sequence number `n`.
fn message(n: u64, body_len: usize) -> Message {
    let mut id = [0u8; 16];
    id[8..].copy_from_slice(&n.to_be_bytes());
    let mut body = format!("m{n}-").into_bytes();
    body.resize(body.len() + body_len, b'x');
    Message {
        msg_id: MsgId(id),
        topic: TOPIC.into(),
        key: (n % 3 == 1).then(|| format!("k{n}")),
        tag: None,
        properties: BTreeMap::new(),
        body: Bytes::from(body),
        born_timestamp: n,
    }
}

/// Everything the store serves, both queues, in log order.
fn served(store: &Store) -> Vec<StoredMessage> {
    let mut all = Vec::new();
    for q in 0..QUEUES {
        let mut offset = 0;
        loop {
            let r = store.read(TOPIC, q, offset, 7, 1 << 20).expect("read");
            if r.next_offset == offset && r.messages.is_empty() {
                break;
            }
            for m in &r.messages {
                assert_eq!(m.queue, q);
                assert!(m.queue_offset >= offset && m.queue_offset < r.next_offset);
            }
            all.extend(r.messages);
            offset = r.next_offset;
        }
    }
    all.sort_by_key(|m| m.log_offset);
    all
}

/// A record as written: where it is and what it holds.
#[derive(Debug, Clone)]
struct Written {
    queue: u32,
    queue_offset: u64,
    log_offset: u64,
    size: u64,
    message: Message,
}

impl Written {
    fn end(&self) -> u64 {
        self.log_offset + self.size
    }
}

/// The records the store serves now, as [`Written`]s. Bodies are copied:
/// a served body is a slice of the segment's mapping, which later damage
/// to the file would change too.
fn written(store: &Store) -> Vec<Written> {
    served(store)
        .into_iter()
        .map(|mut m| {
            m.message.body = Bytes::copy_from_slice(&m.message.body);
            m
        })
        .map(|m| Written {
            queue: m.queue,
            queue_offset: m.queue_offset,
            log_offset: m.log_offset,
            size: message_len(&m.message) as u64,
            message: m.message,
        })
        .collect()
}

// ---- the commit log's files, addressed by log position ----

fn segment_path(dir: &Path, start: u64) -> PathBuf {
    dir.join("commitlog").join(format!("{start:020}"))
}

/// Every segment's bytes (a short file reads as zeros up to the segment size).
fn log_bytes(dir: &Path) -> BTreeMap<u64, Vec<u8>> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir.join("commitlog")).expect("commitlog dir") {
        let path = e.expect("entry").path();
        let Some(start) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        let mut bytes = std::fs::read(&path).expect("read segment");
        bytes.resize(SEGMENT as usize, 0);
        out.insert(start, bytes);
    }
    out
}

/// The first log position whose byte differs (a missing segment reads as
/// zeros).
fn first_difference(
    before: &BTreeMap<u64, Vec<u8>>,
    after: &BTreeMap<u64, Vec<u8>>,
) -> Option<u64> {
    let zeros = vec![0u8; SEGMENT as usize];
    let starts: std::collections::BTreeSet<u64> =
        before.keys().chain(after.keys()).copied().collect();
    starts.into_iter().find_map(|s| {
        let a = before.get(&s).unwrap_or(&zeros);
        let b = after.get(&s).unwrap_or(&zeros);
        let i = a.iter().zip(b).position(|(x, y)| x != y)?;
        Some(s + i as u64)
    })
}

fn write_at(dir: &Path, pos: u64, bytes: &[u8]) {
    let mut pos = pos;
    let mut rest = bytes;
    while !rest.is_empty() {
        let start = pos - pos % SEGMENT;
        let room = (start + SEGMENT - pos) as usize;
        let (now, later) = rest.split_at(room.min(rest.len()));
        let path = segment_path(dir, start);
        if !path.exists() {
            return; // past the last segment: nothing there to damage
        }
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open segment");
        f.write_all_at(now, pos - start).expect("write segment");
        pos += now.len() as u64;
        rest = later;
    }
}

/// Cuts the log at `pos`, as a crash that persisted nothing from there on
/// would: the segment holding `pos` is cut short, later ones are emptied
/// (their files were created, and fsynced, before anything was written).
fn cut_at(dir: &Path, pos: u64) {
    for (start, _) in log_bytes(dir) {
        let path = segment_path(dir, start);
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open segment");
        if start + SEGMENT <= pos {
            continue;
        }
        f.set_len(pos.saturating_sub(start)).expect("cut segment");
        f.set_len(SEGMENT).expect("regrow segment");
    }
}

// ---- recovery over a damaged log ----

#[derive(Debug, Clone)]
enum Damage {
    /// XOR one byte.
    Flip { at: u64, mask: u8 },
    /// Overwrite a run of bytes.
    Overwrite { at: u64, bytes: Vec<u8> },
    /// Cut one segment file short at this log position.
    Truncate { at: u64 },
}

#[derive(Debug, Clone, Copy)]
enum Derived {
    /// Keep the checkpoint and consume queues of the clean shutdown.
    Keep,
    /// Delete the checkpoint: the whole log is replayed and verified.
    NoCheckpoint,
    /// Delete the checkpoint and the consume queues: rebuilt from the log.
    Nothing,
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        (any::<u64>(), 1u8..).prop_map(|(at, mask)| Damage::Flip { at, mask }),
        (any::<u64>(), proptest::collection::vec(any::<u8>(), 1..40))
            .prop_map(|(at, bytes)| Damage::Overwrite { at, bytes }),
        any::<u64>().prop_map(|at| Damage::Truncate { at }),
    ]
}

fn derived() -> impl Strategy<Value = Derived> {
    prop_oneof![
        Just(Derived::Keep),
        Just(Derived::NoCheckpoint),
        Just(Derived::Nothing)
    ]
}

fn apply(dir: &Path, damage: &Damage, log_end: u64) {
    // Mostly inside the written log, sometimes in the zeros after it.
    let span = log_end + 200;
    match damage {
        Damage::Flip { at, mask } => {
            let at = at % span;
            let start = at - at % SEGMENT;
            if let Some(seg) = log_bytes(dir).get(&start) {
                write_at(dir, at, &[seg[(at - start) as usize] ^ mask]);
            }
        }
        Damage::Overwrite { at, bytes } => write_at(dir, at % span, bytes),
        Damage::Truncate { at } => {
            let at = at % span;
            let start = at - at % SEGMENT;
            let path = segment_path(dir, start);
            if path.exists() {
                let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
                f.set_len(at - start).expect("truncate");
            }
        }
    }
}

fn config_cases(cases: u32) -> ProptestConfig {
    ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::with_cases(cases)
    }
}

proptest! {
    #![proptest_config(config_cases(48))]

    #[test]
    fn recovery_keeps_every_record_before_the_first_damaged_byte(
        batches in proptest::collection::vec((0..QUEUES, 1usize..=3, 0usize..300), 1..40),
        damage in damage(),
        derived in derived(),
    ) {
        damaged_log_recovers(&batches, &damage, derived)?;
    }
}

/// Writes `batches` (queue, count, body length), damages the log, recovers.
fn damaged_log_recovers(
    batches: &[(u32, usize, usize)],
    damage: &Damage,
    derived: Derived,
) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path();
    // Write the log through the real store, then shut it down cleanly.
    let store = open(path, FlushMode::Async).expect("a fresh store opens");
    let mut n = 0;
    runtime().block_on(async {
        for (queue, count, len) in batches {
            let msgs = (0..*count).map(|i| message(n + i as u64, *len)).collect();
            n += *count as u64;
            store.append(TOPIC, *queue, msgs).await.expect("append");
        }
    });
    let original = written(&store);
    prop_assert_eq!(original.len() as u64, n);
    let log_end = store.log_end();
    runtime().block_on(store.shutdown());

    let before = log_bytes(path);
    // How far the checkpoint says the log is durable (its bytes 8..16).
    let durable = std::fs::read(path.join("checkpoint"))
        .ok()
        .and_then(|b| Some(u64::from_le_bytes(b.get(8..16)?.try_into().ok()?)))
        .unwrap_or(0);
    apply(path, damage, log_end);
    match derived {
        Derived::Keep => {}
        Derived::NoCheckpoint => std::fs::remove_file(path.join("checkpoint")).unwrap(),
        Derived::Nothing => {
            std::fs::remove_file(path.join("checkpoint")).unwrap();
            std::fs::remove_dir_all(path.join("consumequeue")).unwrap();
        }
    }
    let Some(first_bad) = first_difference(&before, &log_bytes(path)) else {
        return Ok(()); // the damage changed nothing
    };
    // The tail is the segment holding the last record; damage there
    // (or after it) is a torn or corrupt tail.
    let last = original.last().expect("records");
    let tail_start = last.log_offset - last.log_offset % SEGMENT;
    // Damage below the checkpoint's position is no torn write: refused
    // like damage in the middle (kept checkpoint only).
    let at_tail =
        first_bad >= tail_start && (!matches!(derived, Derived::Keep) || first_bad >= durable);

    let store = match open(path, FlushMode::Async) {
        Ok(s) => s,
        Err(e) => {
            // Refusing to start is for damage in the middle of the log.
            prop_assert!(!at_tail, "tail damage at {} refused: {}", first_bad, e);
            prop_assert!(e.to_string().contains("damaged at position"), "{}", e);
            return Ok(());
        }
    };
    let got = written(&store);
    let by_pos: BTreeMap<u64, &Written> = original.iter().map(|w| (w.log_offset, w)).collect();
    let mut seen = HashSet::new();
    for g in &got {
        prop_assert!(
            seen.insert(g.log_offset),
            "record at {} served twice",
            g.log_offset
        );
        let w = by_pos.get(&g.log_offset);
        prop_assert!(
            w.is_some(),
            "served a record nobody wrote at {}",
            g.log_offset
        );
        // Never a damaged record: reads verify checksums.
        let w = w.unwrap();
        prop_assert_eq!(&g.message, &w.message);
        prop_assert_eq!((g.queue, g.queue_offset), (w.queue, w.queue_offset));
    }
    let intact: Vec<u64> = original
        .iter()
        .filter(|w| w.end() <= first_bad)
        .map(|w| w.log_offset)
        .collect();
    for pos in &intact {
        prop_assert!(
            seen.contains(pos),
            "intact record at {} lost (damage at {})",
            pos,
            first_bad
        );
    }
    if at_tail {
        // Verified and cut: exactly the records before the damage.
        let got_pos: Vec<u64> = got.iter().map(|g| g.log_offset).collect();
        prop_assert_eq!(&got_pos, &intact, "damage at {}", first_bad);
    }

    // Appending goes on after whatever was kept, and serves nothing twice.
    let fresh = message(1_000_000, 5);
    runtime()
        .block_on(store.append(TOPIC, 0, vec![fresh.clone()]))
        .expect("append after recovery");
    let again = served(&store);
    prop_assert_eq!(again.iter().filter(|m| m.message == fresh).count(), 1);
    prop_assert_eq!(again.len(), got.len() + 1);
    runtime().block_on(store.shutdown());

    // A second recovery finds the same.
    let store = open(path, FlushMode::Async).expect("reopens after a recovery");
    let third: Vec<u64> = served(&store).iter().map(|m| m.log_offset).collect();
    let again: Vec<u64> = again.iter().map(|m| m.log_offset).collect();
    prop_assert_eq!(third, again);
    runtime().block_on(store.shutdown());
    Ok(())
}

// ---- crashes under sync flush ----

#[derive(Debug, Clone)]
enum Op {
    /// Append `count` messages with bodies of `len` bytes to `queue`.
    Append {
        queue: u32,
        count: usize,
        len: usize,
    },
    /// Everything appended so far is acknowledged.
    Flush,
    /// A crash: what was appended since the last flush is lost from
    /// `from` (a fraction of it, 0..=255), with the bytes in `kept` (also
    /// fractions) persisted anyway (out of order) and, with `junk`, a run
    /// of garbage after the cut.
    Crash {
        from: u8,
        kept: Option<(u8, u8)>,
        junk: Option<Vec<u8>>,
        checkpoint: CrashCheckpoint,
    },
    /// A clean shutdown and restart.
    Restart,
}

#[derive(Debug, Clone, Copy)]
enum CrashCheckpoint {
    /// The checkpoint on disk at the last flush.
    AtLastFlush,
    /// None at all.
    Missing,
    /// None, and no consume queues either.
    MissingWithQueues,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..QUEUES, 1usize..=3, 0usize..300)
            .prop_map(|(queue, count, len)| Op::Append { queue, count, len }),
        3 => Just(Op::Flush),
        2 => (
            any::<u8>(),
            proptest::option::of((any::<u8>(), any::<u8>())),
            proptest::option::weighted(0.2, proptest::collection::vec(any::<u8>(), 1..64)),
            prop_oneof![
                Just(CrashCheckpoint::AtLastFlush),
                Just(CrashCheckpoint::Missing),
                Just(CrashCheckpoint::MissingWithQueues)
            ],
        )
            .prop_map(|(from, kept, junk, checkpoint)| Op::Crash { from, kept, junk, checkpoint }),
        1 => Just(Op::Restart),
    ]
}

fn fraction(lo: u64, hi: u64, f: u8) -> u64 {
    lo + (hi - lo) * u64::from(f) / 255
}

/// Whether `sub` is a subsequence of `seq`.
fn is_subsequence(sub: &[u64], seq: &[u64]) -> bool {
    let mut it = seq.iter();
    sub.iter().all(|x| it.any(|y| y == x))
}

fn ids(ws: &[Written]) -> Vec<u64> {
    ws.iter().map(|w| w.message.born_timestamp).collect()
}

proptest! {
    #![proptest_config(config_cases(24))]

    #[test]
    fn crashes_lose_no_acknowledged_record(ops in proptest::collection::vec(op(), 1..24)) {
        crashes_keep_acknowledged(ops)?;
    }
}

/// Runs `ops` on a sync-flush store, checking after every recovery.
fn crashes_keep_acknowledged(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path();
    let mut store = open(path, FlushMode::Sync).expect("a fresh store opens");
    // Readable and acknowledged; appended since the last flush.
    let mut acked: Vec<Written> = Vec::new();
    let mut unacked: Vec<Written> = Vec::new();
    let mut durable_end = 0;
    let mut checkpoint_at_flush: Option<Vec<u8>> = None;
    let mut n = 0u64;
    for op in ops {
        match op {
            Op::Append { queue, count, len } => {
                let msgs: Vec<Message> = (0..count).map(|i| message(n + i as u64, len)).collect();
                n += count as u64;
                let a = runtime()
                    .block_on(store.append(TOPIC, queue, msgs.clone()))
                    .expect("append");
                prop_assert!(a.durable);
                let r = store
                    .read(TOPIC, queue, a.first_offset, count, 1 << 20)
                    .expect("read");
                prop_assert_eq!(r.messages.len(), count);
                for (m, sent) in r.messages.into_iter().zip(msgs) {
                    prop_assert_eq!(&m.message, &sent);
                    unacked.push(Written {
                        queue,
                        queue_offset: m.queue_offset,
                        log_offset: m.log_offset,
                        size: message_len(&sent) as u64,
                        message: sent,
                    });
                }
            }
            Op::Flush => {
                acked.append(&mut unacked);
                durable_end = store.log_end();
                checkpoint_at_flush = std::fs::read(path.join("checkpoint")).ok();
            }
            Op::Restart => {
                runtime().block_on(store.shutdown());
                acked.append(&mut unacked);
                store = open(path, FlushMode::Sync).expect("reopens after a clean shutdown");
                let got = written(&store);
                prop_assert_eq!(ids(&got), ids(&acked));
                durable_end = store.log_end();
                checkpoint_at_flush = std::fs::read(path.join("checkpoint")).ok();
            }
            Op::Crash {
                from,
                kept,
                junk,
                checkpoint,
            } => {
                let end = store.log_end();
                runtime().block_on(store.shutdown());
                // Lose the unflushed tail from `cut` on...
                let cut = fraction(durable_end, end, from);
                // Out-of-order persistence stays within the segment of the
                // cut: the writer fdatasyncs a full segment before its
                // first write to the next one, so a crash cannot keep the
                // new segment's data while losing the old one's tail.
                let seg_end = (cut - cut % SEGMENT + SEGMENT).min(end);
                let kept_bytes = kept.map(|(a, b)| {
                    let (a, b) = (
                        fraction(cut, seg_end, a.min(b)),
                        fraction(cut, seg_end, a.max(b)),
                    );
                    let bytes = log_bytes(path);
                    let mut out = Vec::new();
                    for pos in a..b {
                        let start = pos - pos % SEGMENT;
                        out.push(bytes.get(&start).map_or(0, |s| s[(pos - start) as usize]));
                    }
                    (a, out)
                });
                cut_at(path, cut);
                // ...but some of it reached the disk anyway, out of order.
                if let Some((a, bytes)) = kept_bytes {
                    write_at(path, a, &bytes);
                }
                if let Some(mut junk) = junk {
                    junk.truncate((seg_end.max(cut) - cut) as usize);
                    write_at(path, cut, &junk);
                }
                let _ = std::fs::remove_file(path.join("checkpoint"));
                match checkpoint {
                    CrashCheckpoint::AtLastFlush => {
                        if let Some(cp) = &checkpoint_at_flush {
                            std::fs::write(path.join("checkpoint"), cp).unwrap();
                        }
                    }
                    CrashCheckpoint::Missing => {}
                    CrashCheckpoint::MissingWithQueues => {
                        let _ = std::fs::remove_dir_all(path.join("consumequeue"));
                    }
                }
                store = open(path, FlushMode::Sync).expect("recovers after a crash");
                let got = written(&store);
                let got_ids = ids(&got);
                // Every acknowledged record, once, in order, first...
                prop_assert!(
                    got_ids.len() >= acked.len(),
                    "lost acknowledged records: {:?} of {:?}",
                    got_ids,
                    ids(&acked)
                );
                prop_assert_eq!(&got_ids[..acked.len()], &ids(&acked)[..]);
                // ...then at most some of the unacknowledged, once each, in order.
                prop_assert!(
                    is_subsequence(&got_ids[acked.len()..], &ids(&unacked)),
                    "{:?} after {:?}",
                    got_ids,
                    ids(&acked)
                );
                // What recovery kept is durable now.
                acked = got;
                unacked.clear();
                durable_end = store.log_end();
                checkpoint_at_flush = std::fs::read(path.join("checkpoint")).ok();
            }
        }
    }
    // In the end, with no crash: everything, once, in order.
    acked.append(&mut unacked);
    let got = written(&store);
    prop_assert_eq!(ids(&got), ids(&acked));
    for (g, w) in got.iter().zip(&acked) {
        prop_assert_eq!(&g.message, &w.message);
    }
    runtime().block_on(store.shutdown());
    Ok(())
}

// ---- records that pass their checksum but make no sense ----

/// Appends one record, encoded by hand with a valid checksum, right after
/// the log's end, as a buggy writer (or someone editing the data dir) would.
fn plant(dir: &Path, log_end: u64, head: RecordHead, msg: &Message) {
    let mut buf = BytesMut::new();
    encode(&mut buf, head, msg);
    write_at(dir, log_end, &buf);
}

/// A record naming queue 4294967295, or a topic that is a path out of the
/// data dir, is not a reason to panic, hang, or create directories
/// anywhere: recovery logs it and skips it, and keeps the rest. Neither is
/// a consume-queue directory named like that.
#[test]
fn a_checksummed_record_with_an_impossible_queue_or_topic_is_skipped() {
    let parent = tempfile::tempdir().unwrap();
    for (topic, queue) in [
        (TOPIC, u32::MAX),
        (TOPIC, u32::MAX - 1),
        ("../../escaped", 0),
        ("a/b", 0),
        ("", 0),
    ] {
        let dir = parent.path().join("data");
        let _ = std::fs::remove_dir_all(&dir);
        let store = open(&dir, FlushMode::Async).expect("opens");
        let before = message(1, 3);
        runtime()
            .block_on(store.append(TOPIC, 0, vec![before.clone()]))
            .unwrap();
        let end = store.log_end();
        runtime().block_on(store.shutdown());
        let head = RecordHead {
            stamp: None,
            kind: RecordKind::Message,
            queue,
            queue_offset: 0,
            store_timestamp: 0,
            aux: 0,
            flags: 0,
        };
        let mut planted = message(2, 3);
        planted.topic = topic.into();
        plant(&dir, end, head, &planted);
        let after = message(3, 3);
        plant(
            &dir,
            end + message_len(&planted) as u64,
            RecordHead { queue: 1, ..head },
            &after,
        );
        std::fs::remove_file(dir.join("checkpoint")).unwrap();
        // Stray consume-queue directories of the same kind.
        for stray in ["t/4294967295", "t/99999999", "t/notaqueue", "bad name/0"] {
            std::fs::create_dir_all(dir.join("consumequeue").join(stray)).unwrap();
        }

        let store = open(&dir, FlushMode::Async).expect("recovers");
        let got: Vec<Message> = served(&store).into_iter().map(|m| m.message).collect();
        assert_eq!(got, vec![before, after], "{topic:?} {queue}");
        runtime().block_on(store.shutdown());
        // Nothing was created outside the data dir.
        let outside: Vec<_> = std::fs::read_dir(parent.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(outside, vec!["data"], "{topic:?}");
    }
}

/// Recovery re-verifies only the segment its checkpoint points into, and
/// reads do not re-check checksums: a record in an older segment whose
/// tail was lost (zeros, as a bad sector or a cut-short file leaves) must
/// not be served as an empty message claiming queue offset 0.
#[test]
fn a_zeroed_record_in_an_older_segment_is_not_served_as_a_bogus_message() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), FlushMode::Async).unwrap();
    runtime().block_on(async {
        for n in 0..60 {
            store.append(TOPIC, 0, vec![message(n, 100)]).await.unwrap();
        }
    });
    let original = written(&store);
    runtime().block_on(store.shutdown());
    // The fifth record of the first segment loses all but its first 16 bytes.
    let victim = &original[4];
    assert!(victim.end() < SEGMENT);
    write_at(
        dir.path(),
        victim.log_offset + 16,
        &vec![0; victim.size as usize - 16],
    );

    let store = open(dir.path(), FlushMode::Async).unwrap();
    let got = written(&store);
    for g in &got {
        let w = original
            .iter()
            .find(|w| w.log_offset == g.log_offset)
            .unwrap();
        assert_eq!((g.queue_offset, &g.message), (w.queue_offset, &w.message));
    }
    assert_eq!(
        got.len(),
        original.len() - 1,
        "only the damaged record is missing"
    );
    runtime().block_on(store.shutdown());
}

/// A case the property found: a flipped bit in the first record's length.
#[test]
fn a_damaged_first_record_ends_the_log_there() {
    let batches = [
        (0, 3, 168),
        (0, 3, 43),
        (0, 3, 13),
        (0, 2, 12),
        (0, 2, 23),
        (0, 3, 288),
        (0, 1, 72),
        (0, 3, 250),
    ];
    let damage = Damage::Flip {
        at: 153466485972766680,
        mask: 1,
    };
    damaged_log_recovers(&batches, &damage, Derived::Keep).unwrap();
}
