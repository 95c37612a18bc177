//! Delayed-message tests on a real temp directory: delivery on time, at the
//! right queue offset, once; moves through the levels as small markers;
//! reopen, an old checkpoint (a crash) and a lost index; retention.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use txmq_protocol::{now_millis, Message, StoredMessage};

use super::delay::{self, DELAY_TOPIC, LEVELS};
use super::*;

use super::tests::{config, topics};

fn msg(body: impl Into<String>) -> Message {
    Message::new("orders", body.into().into_bytes())
}

fn body(m: &StoredMessage) -> String {
    String::from_utf8(m.message.body.to_vec()).unwrap()
}

/// Everything readable in `queue` from `*offset` on; moves `*offset`.
fn drain(store: &Store, queue: u32, offset: &mut u64) -> Vec<StoredMessage> {
    let mut out = Vec::new();
    loop {
        let r = store.read("orders", queue, *offset, 64, 1 << 20).unwrap();
        if r.messages.is_empty() {
            return out;
        }
        for (i, m) in r.messages.iter().enumerate() {
            assert_eq!(m.queue_offset, *offset + i as u64, "queue offsets as read");
        }
        *offset = r.next_offset;
        out.extend(r.messages);
    }
}

/// Calls `deliver_due` every `tick` (as the broker's task does every 100
/// ms) until dropped.
struct Deliverer {
    stop: Arc<AtomicBool>,
    task: Option<tokio::task::JoinHandle<usize>>,
}

impl Deliverer {
    fn start(store: &Store, tick: Duration) -> Deliverer {
        let stop = Arc::new(AtomicBool::new(false));
        let (s, flag) = (store.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let mut moved = 0;
            while !flag.load(Ordering::Acquire) {
                moved += s.deliver_due(now_millis(), 10_000).await.unwrap();
                tokio::time::sleep(tick).await;
            }
            moved
        });
        Deliverer {
            stop,
            task: Some(task),
        }
    }

    /// Stops it; returns how many entries it moved.
    async fn stop(mut self) -> usize {
        self.stop.store(true, Ordering::Release);
        self.task.take().unwrap().await.unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_message_is_invisible_until_its_time_then_read_at_its_queue_offset() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path(), FlushMode::Async), &topics()).unwrap();
    store
        .append("orders", 0, vec![msg("a"), msg("b")])
        .await
        .unwrap();
    let deliver_at = now_millis() + 300;
    let delayed = msg("later").with_tag("tagged").with_key("k");
    store
        .append_delayed("orders", 0, vec![delayed.clone()], deliver_at)
        .await
        .unwrap();
    store.append("orders", 0, vec![msg("c")]).await.unwrap();
    assert_eq!(store.delay_stats().pending, 1);
    assert!(store.topics().iter().all(|(t, _)| t != DELAY_TOPIC));

    let deliverer = Deliverer::start(&store, Duration::from_millis(20));
    let mut offset = 0;
    let mut seen = Vec::new();
    let started = Instant::now();
    while seen.len() < 4 && started.elapsed() < Duration::from_secs(3) {
        for m in drain(&store, 0, &mut offset) {
            seen.push((now_millis(), m));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    deliverer.stop().await;
    let bodies: Vec<String> = seen.iter().map(|(_, m)| body(m)).collect();
    assert_eq!(bodies, ["a", "b", "c", "later"]);
    let (at, m) = &seen[3];
    assert!(*at >= deliver_at, "read {} ms early", deliver_at - at);
    assert!(*at < deliver_at + 1000, "read {} ms late", at - deliver_at);
    assert_eq!(m.queue_offset, 3, "the offset it was delivered at");
    assert_eq!(m.queue, 0);
    assert_eq!(m.message, delayed, "body, tag, key and id as sent");
    let tagged = store.queue("orders", 0).unwrap().read(3, 1).unwrap()[0];
    assert_eq!(tagged.tag_hash, txmq_protocol::tag_hash(Some("tagged")));
    assert_eq!(store.delay_stats().pending, 0);
    store.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_random_delays_are_each_delivered_once_never_early() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path(), FlushMode::Async);
    c.segment_size = 1 << 20;
    let store = Store::open(c, &topics()).unwrap();
    let mut rng = 0x2545_f491_4f6c_dd1d_u64;
    let mut due = HashMap::new();
    let deliverer = Deliverer::start(&store, Duration::from_millis(50));
    for i in 0..1000u32 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let deliver_at = now_millis() + rng % 3000;
        let name = format!("m{i}");
        due.insert(name.clone(), deliver_at);
        store
            .append_delayed("orders", i % 2, vec![msg(name)], deliver_at)
            .await
            .unwrap();
    }
    let mut offsets = [0, 0];
    let mut seen: HashMap<String, u64> = HashMap::new();
    let started = Instant::now();
    while seen.len() < 1000 && started.elapsed() < Duration::from_secs(10) {
        for q in 0..2 {
            for m in drain(&store, q, &mut offsets[q as usize]) {
                let name = body(&m);
                assert!(
                    seen.insert(name.clone(), now_millis()).is_none(),
                    "{name} delivered twice"
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    deliverer.stop().await;
    assert_eq!(seen.len(), 1000, "all delivered");
    let mut worst = 0;
    for (name, at) in &seen {
        let deliver_at = due[name];
        assert!(
            *at >= deliver_at,
            "{name} read {} ms early",
            deliver_at - at
        );
        worst = worst.max(at - deliver_at);
    }
    // A 50 ms tick and a 5 ms reader: about 60 ms late on an idle machine;
    // the margin is for a loaded one.
    assert!(worst <= 300, "the latest was {worst} ms late");
    assert_eq!(store.delay_stats().pending, 0);
    // Nothing more comes.
    assert_eq!(
        store
            .deliver_due(now_millis() + 10_000, 10_000)
            .await
            .unwrap(),
        0
    );
    assert_eq!(offsets, [500, 500]);
    store.shutdown().await;
}

#[tokio::test]
async fn a_long_delay_moves_down_the_levels_as_small_markers() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path(), FlushMode::Sync), &topics()).unwrap();
    let big = "x".repeat(4000);
    let t0 = now_millis();
    let deliver_at = t0 + 3000;
    store
        .append_delayed("orders", 1, vec![msg(big.clone())], deliver_at)
        .await
        .unwrap();
    let start_level = delay::level_for(3000);
    assert!(store.delay_stats().by_level[start_level as usize] == 1);
    let (records, bytes, _, _) = store.stats();
    // Simulated time: deliver_due's clock is its argument.
    let mut levels = vec![start_level];
    let mut delivered_at = None;
    let mut moves = 0;
    for now in (t0..t0 + 4000).step_by(25) {
        moves += store.deliver_due(now, 100).await.unwrap() as u64;
        let stats = store.delay_stats();
        if stats.pending == 0 {
            delivered_at = Some(now);
            break;
        }
        let level = stats.by_level.iter().position(|n| *n == 1).unwrap() as u32;
        if Some(&level) != levels.last() {
            assert!(
                level < *levels.last().unwrap(),
                "levels go down: {levels:?}"
            );
            levels.push(level);
        }
        assert_eq!(stats.pending, 1);
        let r = store.read("orders", 1, 0, 10, 1 << 20).unwrap();
        assert!(r.messages.is_empty(), "not visible before its time");
    }
    let delivered_at = delivered_at.unwrap();
    assert!(
        delivered_at >= deliver_at && delivered_at < deliver_at + 25,
        "delivered at {delivered_at}, due {deliver_at}"
    );
    assert!(levels.len() >= 4, "went through {levels:?}");
    let (records2, bytes2, _, _) = store.stats();
    assert!(moves as usize >= levels.len());
    assert_eq!(records2 - records, moves, "one marker per move");
    let per_move = (bytes2 - bytes) / moves;
    assert!(per_move < 200, "{per_move} bytes per move");
    let r = store.read("orders", 1, 0, 10, 1 << 20).unwrap();
    assert_eq!(r.messages.len(), 1);
    assert_eq!(body(&r.messages[0]), big);
    store.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_delayed_messages_survive_a_reopen_and_are_delivered_once() {
    for flush in [FlushMode::Async, FlushMode::Sync] {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(config(dir.path(), flush), &topics()).unwrap();
        let t0 = now_millis();
        for i in 0..40u64 {
            store
                .append_delayed("orders", 0, vec![msg(format!("m{i}"))], t0 + 100 + i * 50)
                .await
                .unwrap();
        }
        let deliverer = Deliverer::start(&store, Duration::from_millis(20));
        tokio::time::sleep(Duration::from_millis(600)).await;
        deliverer.stop().await;
        let mut offset = 0;
        let before: Vec<String> = drain(&store, 0, &mut offset).iter().map(body).collect();
        assert!(!before.is_empty() && before.len() < 40, "{}", before.len());
        let pending = store.delay_stats().pending;
        assert_eq!(pending as usize, 40 - before.len());
        store.shutdown().await;

        let store = Store::open(config(dir.path(), flush), &topics()).unwrap();
        assert_eq!(store.delay_stats().pending, pending);
        let mut offset = 0;
        let again: Vec<String> = drain(&store, 0, &mut offset).iter().map(body).collect();
        assert_eq!(again, before);
        let deliverer = Deliverer::start(&store, Duration::from_millis(20));
        let mut all = again;
        let started = Instant::now();
        while all.len() < 40 && started.elapsed() < Duration::from_secs(5) {
            all.extend(drain(&store, 0, &mut offset).iter().map(body));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        deliverer.stop().await;
        all.extend(drain(&store, 0, &mut offset).iter().map(body));
        let mut want: Vec<String> = (0..40).map(|i| format!("m{i}")).collect();
        let mut got = all.clone();
        got.sort();
        want.sort();
        assert_eq!(got, want, "each once ({flush:?})");
        assert_eq!(store.delay_stats().pending, 0);
        store.shutdown().await;
    }
}

#[tokio::test]
async fn a_delivery_time_passed_while_closed_is_delivered_by_the_first_call() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path(), FlushMode::Async), &topics()).unwrap();
    let t0 = now_millis();
    store
        .append_delayed("orders", 0, vec![msg("short")], t0 + 300)
        .await
        .unwrap();
    store
        .append_delayed("orders", 1, vec![msg("long")], t0 + 1000)
        .await
        .unwrap();
    store.shutdown().await;
    tokio::time::sleep(Duration::from_millis(1100)).await;

    let store = Store::open(config(dir.path(), FlushMode::Async), &topics()).unwrap();
    assert_eq!(store.delay_stats().pending, 2);
    assert_eq!(store.deliver_due(now_millis(), 100).await.unwrap(), 2);
    let (mut a, mut b) = (0, 0);
    assert_eq!(body(&drain(&store, 0, &mut a)[0]), "short");
    assert_eq!(body(&drain(&store, 1, &mut b)[0]), "long");
    assert_eq!(store.delay_stats().pending, 0);
    store.shutdown().await;
}

/// A crash leaves a checkpoint older than the log: recovery replays the
/// moves made since, and delivers nothing twice.
#[tokio::test]
async fn after_a_crash_with_an_old_checkpoint_nothing_is_delivered_twice() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path(), FlushMode::Sync), &topics()).unwrap();
    let t0 = now_millis();
    for i in 0..30u64 {
        // Half due soon, half in a minute.
        let at = if i % 2 == 0 { t0 + 200 } else { t0 + 60_000 };
        store
            .append_delayed("orders", 0, vec![msg(format!("m{i}"))], at)
            .await
            .unwrap();
    }
    // Let the flusher checkpoint the appends, then keep that checkpoint.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let old_checkpoint = std::fs::read(dir.path().join("checkpoint")).unwrap();
    // Simulated time: move the due ones, and the others down a level or more.
    let mut moved = 0;
    // The far ones wake up at about t0 + 51.2 s (level 9), move to level 6,
    // wake up again at t0 + 59.4 s and move to level 2.
    for now in [t0 + 250, t0 + 53_000, t0 + 59_500] {
        moved += store.deliver_due(now, 1000).await.unwrap();
        store
            .append("orders", 1, vec![msg("traffic")])
            .await
            .unwrap();
    }
    assert_eq!(moved, 15 + 2 * 15);
    let mut offset = 0;
    let delivered: Vec<String> = drain(&store, 0, &mut offset).iter().map(body).collect();
    assert_eq!(delivered.len(), 15);
    let by_level = store.delay_stats().by_level;
    store.shutdown().await;

    for lose_index in [false, true] {
        std::fs::write(dir.path().join("checkpoint"), &old_checkpoint).unwrap();
        if lose_index {
            // Worse: no checkpoint and no consume queues at all.
            std::fs::remove_file(dir.path().join("checkpoint")).unwrap();
            std::fs::remove_dir_all(dir.path().join("consumequeue")).unwrap();
        }
        let store = Store::open(config(dir.path(), FlushMode::Sync), &topics()).unwrap();
        let mut offset = 0;
        let again: Vec<String> = drain(&store, 0, &mut offset).iter().map(body).collect();
        assert_eq!(again, delivered, "lose_index {lose_index}");
        assert_eq!(store.delay_stats().by_level, by_level);
        assert_eq!(store.deliver_due(t0 + 59_500, 1000).await.unwrap(), 0);
        store.shutdown().await;
    }

    let store = Store::open(config(dir.path(), FlushMode::Sync), &topics()).unwrap();
    assert_eq!(store.deliver_due(t0 + 70_000, 1000).await.unwrap(), 15);
    let mut offset = 0;
    let mut all: Vec<String> = drain(&store, 0, &mut offset).iter().map(body).collect();
    all.sort();
    let mut want: Vec<String> = (0..30).map(|i| format!("m{i}")).collect();
    want.sort();
    assert_eq!(all, want);
    assert_eq!(store.delay_stats().pending, 0);
    store.shutdown().await;
}

#[tokio::test]
async fn retention_keeps_the_segment_of_an_undelivered_delayed_message() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path(), FlushMode::Async);
    c.retention = Duration::ZERO;
    let store = Store::open(c, &topics()).unwrap();
    let t0 = now_millis();
    let deliver_at = t0 + 60_000;
    store
        .append_delayed("orders", 1, vec![msg("kept")], deliver_at)
        .await
        .unwrap();
    for i in 0..3000 {
        store
            .append("orders", 0, vec![msg(format!("filler-{i}"))])
            .await
            .unwrap();
    }
    assert_eq!(store.enforce_retention().unwrap(), 0);
    // Moved to a lower level (it woke up at about t0 + 51.2 s), still
    // pending: still kept.
    assert_eq!(store.deliver_due(t0 + 55_000, 100).await.unwrap(), 1);
    assert_eq!(store.delay_stats().pending, 1);
    assert_eq!(store.enforce_retention().unwrap(), 0);
    assert_eq!(store.deliver_due(deliver_at, 100).await.unwrap(), 1);
    let r = store.read("orders", 1, 0, 10, 1 << 20).unwrap();
    assert_eq!(body(&r.messages[0]), "kept");
    // Delivered: its old segment may go now, and the delivered message
    // stays readable (it was delivered as a copy in the active segment).
    assert!(store.enforce_retention().unwrap() >= 1);
    let r = store.read("orders", 1, 0, 10, 1 << 20).unwrap();
    let bodies: Vec<String> = r.messages.iter().map(body).collect();
    assert_eq!(
        bodies,
        vec!["kept"],
        "readable after its old segment expired"
    );
    // And across a restart (recovery replays the copy and the level move).
    store.shutdown().await;
    let mut c = config(dir.path(), FlushMode::Async);
    c.retention = Duration::ZERO;
    let store = Store::open(c, &topics()).unwrap();
    let r = store.read("orders", 1, 0, 10, 1 << 20).unwrap();
    assert_eq!(
        r.messages.iter().map(body).collect::<Vec<_>>(),
        vec!["kept"]
    );
    assert_eq!(store.delay_stats().pending, 0);
    assert_eq!(store.deliver_due(deliver_at + 1000, 100).await.unwrap(), 0);
    store.shutdown().await;
}

#[tokio::test]
async fn bad_delayed_appends_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path(), FlushMode::Async), &topics()).unwrap();
    let later = now_millis() + 10_000;
    assert!(matches!(
        store
            .append_delayed("orders", 5, vec![msg("x")], later)
            .await,
        Err(StoreError::NoQueue { .. })
    ));
    assert!(matches!(
        store
            .append_delayed("orders", 0, vec![msg("x")], later + 8 * 24 * 3600 * 1000)
            .await,
        Err(StoreError::Invalid(_))
    ));
    assert!(matches!(
        store
            .append_delayed("other", 0, vec![msg("x")], later)
            .await,
        Err(StoreError::Invalid(_))
    ));
    let internal = Message::new(DELAY_TOPIC, &b"x"[..]);
    assert!(matches!(
        store.append(DELAY_TOPIC, 0, vec![internal.clone()]).await,
        Err(StoreError::Invalid(_))
    ));
    assert!(matches!(
        store.read(DELAY_TOPIC, 0, 0, 10, 1 << 20),
        Err(StoreError::Invalid(_))
    ));
    assert!(matches!(
        store.ensure_queues(DELAY_TOPIC, LEVELS + 1),
        Err(StoreError::Invalid(_))
    ));
    assert!(matches!(
        store.prepare(vec![(0, internal)], None).await,
        Err(StoreError::Invalid(_))
    ));
    // A time already passed is an ordinary append.
    let a = store
        .append_delayed("orders", 0, vec![msg("now")], 1)
        .await
        .unwrap();
    assert_eq!(a.first_offset, 0);
    assert_eq!(
        store
            .read("orders", 0, 0, 10, 1 << 20)
            .unwrap()
            .messages
            .len(),
        1
    );
    assert_eq!(store.delay_stats().pending, 0);
    store.shutdown().await;
}

/// `cargo test -p txmq-broker --release --lib -- --ignored --nocapture a_million`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: a million delayed messages"]
async fn a_million_delayed_messages_cost_no_memory_per_message() {
    fn rss_kib() -> u64 {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse().ok())
            })
            .unwrap_or(0)
    }
    let dir = tempfile::tempdir().unwrap();
    let mut c = StoreConfig::new(dir.path());
    c.segment_size = 256 << 20;
    let store = Store::open(c, &topics()).unwrap();
    let before = rss_kib();
    let started = Instant::now();
    let deliver_at = now_millis() + 3_600_000;
    for batch in 0..1000 {
        let messages = (0..1000).map(|i| msg(format!("{batch}-{i}"))).collect();
        store
            .append_delayed("orders", batch % 2, messages, deliver_at)
            .await
            .unwrap();
    }
    let after = rss_kib();
    assert_eq!(store.delay_stats().pending, 1_000_000);
    println!(
        "1,000,000 delayed messages appended in {:?}; RSS {} MiB -> {} MiB (the mapped log and consume queues count in RSS; no per-message structure does)",
        started.elapsed(),
        before / 1024,
        after / 1024
    );
    let started = Instant::now();
    let moved = store.deliver_due(deliver_at, 10_000).await.unwrap();
    println!("deliver_due moved {moved} in {:?}", started.elapsed());
    store.shutdown().await;
}

/// A power cut after deliveries: the log's move markers were never
/// fsynced, but the real queue's consume-queue entries were (a checkpoint
/// syncs the queues while the writer goes on). Recovery cuts the entries
/// the checkpoint's records do not justify, so each message is delivered
/// once, not twice.
#[tokio::test]
async fn entries_whose_move_markers_were_lost_are_not_delivered_twice() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path(), FlushMode::Sync), &topics()).unwrap();
    let t0 = now_millis();
    for i in 0..10u64 {
        store
            .append_delayed("orders", 0, vec![msg(format!("m{i}"))], t0 + 200)
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let old_checkpoint = std::fs::read(dir.path().join("checkpoint")).unwrap();
    let position = super::checkpoint::Checkpoint::load(dir.path())
        .unwrap()
        .expect("a checkpoint")
        .position;
    assert_eq!(store.deliver_due(t0 + 250, 1000).await.unwrap(), 10);
    let mut offset = 0;
    assert_eq!(drain(&store, 0, &mut offset).len(), 10);
    store.shutdown().await;

    // The power cut: the log loses everything after the old checkpoint
    // (the move markers), the consume queues keep their entries.
    std::fs::write(dir.path().join("checkpoint"), &old_checkpoint).unwrap();
    for seg in std::fs::read_dir(dir.path().join("commitlog")).unwrap() {
        let path = seg.unwrap().path();
        let start: u64 = path.file_name().unwrap().to_str().unwrap().parse().unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        let len = f.metadata().unwrap().len();
        if start + len > position {
            let from = position.saturating_sub(start);
            std::os::unix::fs::FileExt::write_all_at(&f, &vec![0u8; (len - from) as usize], from)
                .unwrap();
        }
    }

    let store = Store::open(config(dir.path(), FlushMode::Sync), &topics()).unwrap();
    store.deliver_due(t0 + 300, 1000).await.unwrap();
    let mut offset = 0;
    let mut got: Vec<String> = drain(&store, 0, &mut offset).iter().map(body).collect();
    got.sort();
    let mut want: Vec<String> = (0..10).map(|i| format!("m{i}")).collect();
    want.sort();
    assert_eq!(got, want, "each delivered once");
    store.shutdown().await;
}
