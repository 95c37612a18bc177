//! Crashes and damaged commit logs, with a real `txmq-broker` process: a
//! `kill -9` under sync flush loses no acknowledged message, and recovery
//! cuts a torn or garbage tail (or everything from a corrupt record on) and
//! serves everything before it, for good.

mod common;

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{body_text, create_topic, jitter, record_starts, start_broker, wait_for_route};
use txmq::{Message, MsgId, Producer, SendStatus};
use txmq_tests::disk::{allocated, allocated_past_end, reserves_blocks};
use txmq_tests::{consume_all, BrokerProcess, Cluster};

/// A message the broker acknowledged with `SEND_OK`.
#[derive(Debug, Clone)]
struct Acked {
    body: String,
    msg_id: MsgId,
    queue: u32,
    queue_offset: u64,
}

/// Starts `broker` again on its data directory and waits until the
/// nameserver routes `topic` to it.
async fn restart(broker: &mut BrokerProcess, ns: &str, topic: &str) {
    tokio::task::block_in_place(|| broker.restart());
    wait_for_route(ns, topic, &["broker-a"]).await;
}

/// Damage done by hand below the position up to which the checkpoint says
/// the log was durable is not a torn write: a broker on `data` refuses to
/// start, naming the way out (removing the checkpoint), which is taken
/// here, as a crash before a checkpoint covered the last records leaves.
fn refused_until_the_checkpoint_goes(data: &std::path::Path) {
    let out = std::process::Command::new(txmq_tests::binary("txmq-broker"))
        .args(["--standalone", "--listen", "127.0.0.1:0"])
        .args(["--nameserver-listen", "127.0.0.1:0", "--data-dir"])
        .arg(data)
        .args(["--segment-size", "8MiB", "--max-message-size", "1MiB"])
        .output()
        .expect("txmq-broker runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("not a torn write") && err.contains("remove"),
        "{err}"
    );
    std::fs::remove_file(data.join("checkpoint")).expect("the checkpoint");
}

/// Stops `broker` gracefully (asserting a clean exit), then [`restart`]s it.
async fn stop_and_restart(broker: &mut BrokerProcess, ns: &str, topic: &str) {
    let code = tokio::task::block_in_place(|| broker.stop());
    assert_eq!(code, Some(0), "graceful stop; log:\n{}", broker.log_text());
    restart(broker, ns, topic).await;
}

/// A producer that gives up quickly: one attempt per message (so that no
/// retry can store a message twice) and a short timeout.
async fn impatient_producer(ns: &str) -> Producer {
    Producer::builder()
        .nameserver(ns)
        .send_timeout(Duration::from_secs(2))
        .retries(0)
        .build()
        .await
        .expect("producer builds")
}

/// Runs `senders` tasks that send unique bodies `<tag>-<sender>-<n>`
/// (followed by `pad` dots) to `topic` until `stop`; returns the messages
/// acknowledged with `SEND_OK` and the number of failed sends.
async fn send_until_stopped(
    producer: &Producer,
    topic: &str,
    tag: &str,
    senders: usize,
    pad: usize,
    stop: Arc<AtomicBool>,
) -> (Vec<Acked>, usize) {
    let mut tasks = tokio::task::JoinSet::new();
    for s in 0..senders {
        let p = producer.clone();
        let stop = stop.clone();
        let topic = topic.to_string();
        let prefix = format!("{tag}-{s}");
        tasks.spawn(async move {
            let mut acked = Vec::new();
            let mut failed = 0;
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let body = format!("{prefix}-{n}-{}", ".".repeat(pad));
                n += 1;
                match p.send(Message::new(topic.as_str(), body.clone())).await {
                    Ok(r) if r.status == SendStatus::SendOk => acked.push(Acked {
                        body,
                        msg_id: r.msg_id,
                        queue: r.queue,
                        queue_offset: r.queue_offset,
                    }),
                    Ok(_) => failed += 1,
                    Err(_) => {
                        failed += 1;
                        // The broker is gone; do not spin while it is.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            (acked, failed)
        });
    }
    let mut acked = Vec::new();
    let mut failed = 0;
    while let Some(r) = tasks.join_next().await {
        let (a, f) = r.expect("sender task");
        acked.extend(a);
        failed += f;
    }
    (acked, failed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_flush_kill_9_loses_no_acknowledged_message() {
    let cluster = Cluster::nameserver_only(Duration::from_secs(30)).await;
    let ns = cluster.nameserver.clone();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("broker-a");
    let mut broker = start_broker(&data, &ns, "broker-a", &["--flush", "sync"]).await;
    create_topic(&ns, "crash", 4).await;
    let producer = impatient_producer(&ns).await;

    let mut acked: Vec<Acked> = Vec::new();
    // Small messages, then 16 KiB ones that fill 8 MiB segments before the
    // kill, so that recovery also crosses segment boundaries.
    for (round, pad) in [(0, 0), (1, 16 << 10)] {
        let stop = Arc::new(AtomicBool::new(false));
        let sending = {
            let (p, stop) = (producer.clone(), stop.clone());
            let tag = format!("round{round}");
            tokio::spawn(async move { send_until_stopped(&p, "crash", &tag, 4, pad, stop).await })
        };
        let delay = jitter(Duration::from_millis(300), Duration::from_millis(1500));
        tokio::time::sleep(delay).await;
        tokio::task::block_in_place(|| broker.kill9());
        stop.store(true, Ordering::Relaxed);
        let (round_acked, failed) = sending.await.unwrap();
        eprintln!(
            "round {round}: killed after {delay:?}; {} acknowledged, {failed} failed",
            round_acked.len()
        );
        assert!(
            !round_acked.is_empty(),
            "round {round}: nothing was acknowledged before the kill"
        );
        acked.extend(round_acked);
        restart(&mut broker, &ns, "crash").await;
    }

    let got = consume_all(
        &ns,
        "after-crash",
        "crash",
        usize::MAX,
        Duration::from_secs(1),
    )
    .await;
    let mut ids = HashSet::new();
    let mut bodies = HashMap::new();
    for m in &got {
        let body = body_text(m);
        assert!(
            ids.insert(m.msg_id()),
            "message id {} consumed twice",
            m.msg_id()
        );
        assert!(
            bodies
                .insert(body.clone(), (m.queue(), m.queue_offset(), m.msg_id()))
                .is_none(),
            "{body} consumed twice"
        );
    }
    let lost: Vec<&Acked> = acked
        .iter()
        .filter(|a| !bodies.contains_key(&a.body))
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged messages lost, e.g. {:?}; broker log:\n{}",
        lost.len(),
        acked.len(),
        &lost[..lost.len().min(5)],
        broker.log_text()
    );
    for a in &acked {
        assert_eq!(
            bodies[&a.body],
            (a.queue, a.queue_offset, a.msg_id),
            "{} is where it was acknowledged",
            a.body
        );
    }
    drop(broker);
    cluster.shutdown().await;
}

/// How the broker is brought down before its log is damaged.
#[derive(Debug, Clone, Copy)]
enum Ending {
    /// SIGTERM: flush, final checkpoint, exit.
    Graceful,
    /// `kill -9` once the checkpoint covers every record, so recovery starts
    /// from a checkpoint that points past the damage.
    Kill9AfterCheckpoint,
}

/// The newest segment file of the commit log in `data`.
fn active_segment(data: &Path) -> PathBuf {
    common::segments(data).pop().expect("a commit-log segment")
}

/// Where the last record of `segment` starts and ends.
fn last_record(segment: &Path) -> (u64, u64) {
    let starts = record_starts(segment);
    assert!(starts.len() >= 2, "the segment holds a record");
    (starts[starts.len() - 2], starts[starts.len() - 1])
}

/// The log position the checkpoint file in `data` covers (bytes 8..16).
fn checkpoint_position(data: &Path) -> Option<u64> {
    let b = std::fs::read(data.join("checkpoint")).ok()?;
    Some(u64::from_le_bytes(b.get(8..16)?.try_into().ok()?))
}

/// Starts a broker serving a one-queue topic holding `n` messages `m0..`,
/// brings it down as `ending` says, and returns it (not running) with the
/// data directory's newest segment and the end of its last record.
async fn broker_with_messages(
    cluster: &Cluster,
    data: &Path,
    topic: &str,
    n: usize,
    ending: Ending,
) -> (BrokerProcess, PathBuf, u64, u64) {
    let ns = cluster.nameserver.clone();
    let mut broker = start_broker(data, &ns, "broker-a", &[]).await;
    create_topic(&ns, topic, 1).await;
    assert_eq!(send_numbered(cluster, topic, "m", n).await, offsets(0..n));
    match ending {
        Ending::Graceful => {
            let code = tokio::task::block_in_place(|| broker.stop());
            assert_eq!(code, Some(0), "graceful stop; log:\n{}", broker.log_text());
        }
        Ending::Kill9AfterCheckpoint => {
            let (_, end) = last_record(&active_segment(data));
            let deadline = Instant::now() + Duration::from_secs(10);
            while checkpoint_position(data).is_none_or(|p| p < end) {
                assert!(
                    Instant::now() < deadline,
                    "the checkpoint never reached {end}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            tokio::task::block_in_place(|| broker.kill9());
        }
    }
    let segment = active_segment(data);
    let (last_start, end) = last_record(&segment);
    (broker, segment, last_start, end)
}

/// Consumes `topic` with a fresh `group` and returns the bodies in order,
/// waiting a moment after `want` for anything unexpected.
async fn bodies(ns: &str, group: &str, topic: &str, want: usize) -> Vec<String> {
    consume_all(ns, group, topic, want + 1, Duration::from_secs(1))
        .await
        .iter()
        .map(body_text)
        .collect()
}

fn numbered(prefix: &str, range: Range<usize>) -> Vec<String> {
    range.map(|i| format!("{prefix}{i}")).collect()
}

fn offsets(range: Range<usize>) -> Vec<u64> {
    range.map(|i| i as u64).collect()
}

/// Sends `{prefix}0` to `{prefix}{count - 1}` to the one-queue `topic`, one
/// after the other; returns the queue offsets they were stored at.
async fn send_numbered(cluster: &Cluster, topic: &str, prefix: &str, count: usize) -> Vec<u64> {
    let producer = cluster.producer().await;
    let mut offsets = Vec::with_capacity(count);
    for body in numbered(prefix, 0..count) {
        let r = producer.send(Message::new(topic, body)).await.unwrap();
        assert_eq!(r.queue, 0, "{topic} has one queue");
        offsets.push(r.queue_offset);
    }
    producer.close().await.unwrap();
    offsets
}

/// Bytes in the consume-queue files of `topic`'s queue 0.
fn queue_file_bytes(data: &Path, topic: &str) -> u64 {
    let dir = data.join("consumequeue").join(topic).join("0");
    std::fs::read_dir(dir)
        .map(|files| files.map(|f| f.unwrap().metadata().unwrap().len()).sum())
        .unwrap_or(0)
}

/// A commit-log segment gets its blocks when it is created, so that the
/// writer's appends never wait for the kernel to allocate them (which it
/// does while writing pages back: the writer stalled behind it). A restart
/// begins a new segment and releases the rest of the last one, which no
/// record will fill; every message stays readable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segments_are_preallocated_and_a_restart_releases_what_it_leaves_unused() {
    const SEGMENT: u64 = 8 << 20;
    let tmp = tempfile::tempdir().unwrap();
    if !reserves_blocks(tmp.path()) {
        eprintln!("skipped: this file system does not preallocate");
        return;
    }
    let cluster = Cluster::nameserver_only(Duration::from_secs(30)).await;
    let ns = cluster.nameserver.clone();
    let data = tmp.path().join("data");
    let mut broker = start_broker(&data, &ns, "broker-a", &[]).await;
    create_topic(&ns, "prealloc", 1).await;
    assert_eq!(
        send_numbered(&cluster, "prealloc", "a", 50).await,
        offsets(0..50)
    );
    let first = active_segment(&data);
    assert!(
        allocated(&first) >= SEGMENT,
        "the segment holds {} bytes of disk",
        allocated(&first)
    );

    tokio::task::block_in_place(|| broker.kill9());
    restart(&mut broker, &ns, "prealloc").await;
    assert_eq!(
        send_numbered(&cluster, "prealloc", "b", 50).await,
        offsets(50..100)
    );
    let segments = common::segments(&data);
    assert_eq!(segments.len(), 2, "{segments:?}");
    assert_eq!(segments[0], first);
    assert!(
        allocated(&first) < 1 << 20,
        "the first segment still holds {} bytes of disk after the restart",
        allocated(&first)
    );
    assert!(allocated(&segments[1]) >= SEGMENT);

    stop_and_restart(&mut broker, &ns, "prealloc").await;
    assert!(
        allocated(&segments[1]) < 1 << 20,
        "released after a graceful stop too"
    );
    let mut want = numbered("a", 0..50);
    want.extend(numbered("b", 0..50));
    assert_eq!(bodies(&ns, "g1", "prealloc", 100).await, want);
}

/// The consume-queue and message-index files grow as entries come; each
/// checkpoint reserves blocks a little ahead of their ends, so that the
/// writer's appends do not wait for the file system to allocate them
/// while it writes the files back. Their lengths stay what the entries
/// make, and a `kill -9` and restart keep every message and lookup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_and_index_files_are_reserved_ahead_and_recover_after_a_kill_9() {
    let tmp = tempfile::tempdir().unwrap();
    if !reserves_blocks(tmp.path()) {
        eprintln!("skipped: this file system does not reserve blocks");
        return;
    }
    let cluster = Cluster::nameserver_only(Duration::from_secs(30)).await;
    let ns = cluster.nameserver.clone();
    let data = tmp.path().join("data");
    let often = ["--checkpoint-interval", "50ms"];
    let mut broker = start_broker(&data, &ns, "broker-a", &often).await;
    create_topic(&ns, "ahead", 1).await;
    use std::os::unix::fs::MetadataExt;
    let queue_file = data.join("consumequeue/ahead/0").join(format!("{:020}", 0));
    let index_dir = data.join("index");
    let index_file = || {
        std::fs::read_dir(&index_dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .max()
            .unwrap()
    };
    // Growth is measured from a checkpoint that saw the files: batches go
    // on until one has reserved ahead of both.
    let (mut sent, mut want) = (0, Vec::new());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let prefix = format!("b{sent}-");
        assert_eq!(
            send_numbered(&cluster, "ahead", &prefix, 100).await,
            offsets(sent..sent + 100)
        );
        want.extend(numbered(&prefix, 0..100));
        sent += 100;
        tokio::time::sleep(Duration::from_millis(150)).await;
        if queue_file.exists()
            && allocated_past_end(&queue_file) > 0
            && allocated_past_end(&index_file()) > 0
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not reserved past the ends: queue {:?}, index {} of {} bytes",
            std::fs::metadata(&queue_file).map(|m| (m.blocks() * 512, m.len())),
            allocated(&index_file()),
            std::fs::metadata(index_file()).unwrap().len(),
        );
    }
    // The last entries reach the file with a checkpoint.
    while queue_file_bytes(&data, "ahead") < sent as u64 * 20 {
        assert!(Instant::now() < deadline, "entries not written");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        queue_file_bytes(&data, "ahead"),
        sent as u64 * 20,
        "entries only"
    );
    let out = txmq_tests::output::ok(&txmq_tests::txmq_cli(
        &ns,
        &["send", "ahead", "--body", "keyed", "--key", "k-1"],
        None,
    ));
    assert!(out.contains(&format!("q=0 offset={sent}")), "{out}");

    tokio::task::block_in_place(|| broker.kill9());
    restart(&mut broker, &ns, "ahead").await;
    want.push("keyed".into());
    assert_eq!(bodies(&ns, "g1", "ahead", sent + 1).await, want);
    let found = txmq_tests::output::ok(&txmq_tests::txmq_cli(
        &ns,
        &["msg", "find", "--topic", "ahead", "--key", "k-1"],
        None,
    ));
    assert!(found.contains("keyed"), "{found}");
}

/// Consume-queue entries wait in memory and are written a page at a time
/// (or by the checkpoint): consumers read them there at once, and a
/// `kill -9` before they were written loses nothing, since recovery
/// rebuilds them from the log. A checkpoint interval of an hour keeps the
/// checkpoint from writing them meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_entries_not_yet_written_survive_a_kill_9() {
    const PAGE: usize = 4096 / 20;
    let cluster = Cluster::nameserver_only(Duration::from_secs(30)).await;
    let ns = cluster.nameserver.clone();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let hour = ["--checkpoint-interval", "1h"];
    let mut broker = start_broker(&data, &ns, "broker-a", &hour).await;
    create_topic(&ns, "waiting", 1).await;

    assert_eq!(
        send_numbered(&cluster, "waiting", "a", 50).await,
        offsets(0..50)
    );
    assert_eq!(
        queue_file_bytes(&data, "waiting"),
        0,
        "no entry written yet"
    );
    assert_eq!(
        bodies(&ns, "g1", "waiting", 50).await,
        numbered("a", 0..50),
        "consumed while the entries are only in memory"
    );
    tokio::task::block_in_place(|| broker.kill9());
    restart(&mut broker, &ns, "waiting").await;
    assert_eq!(
        bodies(&ns, "g2", "waiting", 50).await,
        numbered("a", 0..50),
        "rebuilt after the kill -9"
    );

    // More than a page: part of it is written on the way, the rest waits.
    let more = PAGE + 100;
    assert_eq!(
        send_numbered(&cluster, "waiting", "b", more).await,
        offsets(50..50 + more)
    );
    let written = queue_file_bytes(&data, "waiting");
    assert!(
        written >= (PAGE * 20) as u64 && written < ((50 + more) * 20) as u64,
        "a page written, the rest waiting: {written} bytes"
    );
    let mut want = numbered("a", 0..50);
    want.extend(numbered("b", 0..more));
    assert_eq!(
        bodies(&ns, "g3", "waiting", want.len()).await,
        want,
        "read across the files and memory"
    );
    tokio::task::block_in_place(|| broker.kill9());
    restart(&mut broker, &ns, "waiting").await;
    assert_eq!(
        bodies(&ns, "g4", "waiting", want.len()).await,
        want,
        "rebuilt after the second kill -9"
    );

    // A graceful stop writes every entry out.
    let code = tokio::task::block_in_place(|| broker.stop());
    assert_eq!(code, Some(0), "graceful stop; log:\n{}", broker.log_text());
    assert_eq!(queue_file_bytes(&data, "waiting"), (want.len() * 20) as u64);
    cluster.shutdown().await;
}

/// The checkpoint writes out (and fsyncs) the entries waiting in memory
/// before it counts them as covered: after it, the files hold them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_writes_out_the_waiting_queue_entries() {
    const N: usize = 50;
    let cluster = Cluster::nameserver_only(Duration::from_secs(30)).await;
    let ns = cluster.nameserver.clone();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let (mut broker, ..) =
        broker_with_messages(&cluster, &data, "counted", N, Ending::Kill9AfterCheckpoint).await;
    assert_eq!(queue_file_bytes(&data, "counted"), (N * 20) as u64);
    restart(&mut broker, &ns, "counted").await;
    assert_eq!(bodies(&ns, "g", "counted", N).await, numbered("m", 0..N));
    tokio::task::block_in_place(|| broker.stop());
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torn_tail_is_cut_and_the_broker_serves_what_came_before() {
    const N: usize = 50;
    let cluster = Cluster::nameserver_only(Duration::from_secs(30)).await;
    let ns = cluster.nameserver.clone();
    let tmp = tempfile::tempdir().unwrap();
    for ending in [Ending::Graceful, Ending::Kill9AfterCheckpoint] {
        let data = tmp.path().join(format!("{ending:?}"));
        let (mut broker, segment, last_start, end) =
            broker_with_messages(&cluster, &data, "torn", N, ending).await;
        // Tear the last record: its length prefix promises bytes that are gone.
        let torn_at = end - 10;
        assert!(torn_at > last_start + 4);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&segment)
            .unwrap()
            .set_len(torn_at)
            .unwrap();
        refused_until_the_checkpoint_goes(&data);

        restart(&mut broker, &ns, "torn").await;
        let got = bodies(&ns, &format!("{ending:?}-1"), "torn", N - 1).await;
        assert_eq!(
            got,
            numbered("m", 0..N - 1),
            "{ending:?}: all but the torn message, in order"
        );

        // New sends continue where the intact log ends.
        assert_eq!(
            send_numbered(&cluster, "torn", "new", 5).await,
            offsets(N - 1..N + 4),
            "{ending:?}: the new messages follow the cut"
        );
        let got = bodies(&ns, &format!("{ending:?}-2"), "torn", N + 4).await;
        let mut want = numbered("m", 0..N - 1);
        want.extend(numbered("new", 0..5));
        assert_eq!(
            got, want,
            "{ending:?}: the new messages come right after the old"
        );
        tokio::task::block_in_place(|| broker.stop());
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_after_the_tail_is_cut() {
    const N: usize = 50;
    let cluster = Cluster::nameserver_only(Duration::from_secs(30)).await;
    let ns = cluster.nameserver.clone();
    let tmp = tempfile::tempdir().unwrap();
    for ending in [Ending::Graceful, Ending::Kill9AfterCheckpoint] {
        let data = tmp.path().join(format!("{ending:?}"));
        let (mut broker, segment, _, end) =
            broker_with_messages(&cluster, &data, "junk", N, ending).await;
        // Non-zero bytes where the next record would start: not a record.
        let garbage: Vec<u8> = (0..200u32).map(|i| (i * 37 + 11) as u8 | 1).collect();
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&segment)
                .unwrap();
            f.write_all_at(&garbage, end).unwrap();
            f.sync_all().unwrap();
        }

        restart(&mut broker, &ns, "junk").await;
        let got = bodies(&ns, &format!("{ending:?}-1"), "junk", N).await;
        assert_eq!(
            got,
            numbered("m", 0..N),
            "{ending:?}: every message, in order"
        );

        assert_eq!(
            send_numbered(&cluster, "junk", "new", 5).await,
            offsets(N..N + 5),
            "{ending:?}: the new messages follow the last one"
        );
        let mut want = numbered("m", 0..N);
        want.extend(numbered("new", 0..5));
        let got = bodies(&ns, &format!("{ending:?}-2"), "junk", N + 5).await;
        assert_eq!(
            got, want,
            "{ending:?}: the new messages come right after the old"
        );

        // A second restart finds an intact log: the garbage is gone for good.
        stop_and_restart(&mut broker, &ns, "junk").await;
        let got = bodies(&ns, &format!("{ending:?}-3"), "junk", N + 5).await;
        assert_eq!(
            got, want,
            "{ending:?}: everything again after a second restart"
        );
        let producer = cluster.producer().await;
        let r = producer.send(Message::new("junk", "last")).await.unwrap();
        assert_eq!(r.queue_offset, (N + 5) as u64);
        producer.close().await.unwrap();
        tokio::task::block_in_place(|| broker.stop());
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_first_record_of_a_segment_takes_the_segment_with_it() {
    // Nine records of about 1 MB: eight fill the first 8 MiB segment, the
    // ninth opens the second one.
    const N: usize = 9;
    let big = |name: String| format!("{name}-{}", ".".repeat(1_000_000));
    let short = |m: &txmq::ReceivedMessage| {
        let body = String::from_utf8_lossy(m.body()).into_owned();
        body.split('-').next().unwrap_or_default().to_string()
    };
    let cluster = Cluster::nameserver_only(Duration::from_secs(30)).await;
    let ns = cluster.nameserver.clone();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("broker-a");
    let mut broker = start_broker(&data, &ns, "broker-a", &[]).await;
    create_topic(&ns, "big", 1).await;
    let producer = cluster.producer().await;
    for i in 0..N {
        producer
            .send(Message::new("big", big(format!("m{i}"))))
            .await
            .unwrap();
    }
    producer.close().await.unwrap();
    assert_eq!(tokio::task::block_in_place(|| broker.stop()), Some(0));
    let segment = active_segment(&data);
    assert_eq!(
        record_starts(&segment).len(),
        2,
        "the last segment holds one record"
    );
    let (_, end) = last_record(&segment);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&segment)
        .unwrap()
        .set_len(end - 10)
        .unwrap();
    refused_until_the_checkpoint_goes(&data);

    restart(&mut broker, &ns, "big").await;
    let got = consume_all(&ns, "g1", "big", N, Duration::from_secs(1)).await;
    let got: Vec<String> = got.iter().map(short).collect();
    assert_eq!(got, numbered("m", 0..N - 1), "all but the torn message");

    // The next message opens the second segment again.
    let producer = cluster.producer().await;
    let r = producer
        .send(Message::new("big", big("new".into())))
        .await
        .unwrap();
    assert_eq!(r.queue_offset, (N - 1) as u64);
    producer.close().await.unwrap();
    stop_and_restart(&mut broker, &ns, "big").await;
    let got = consume_all(&ns, "g2", "big", N + 1, Duration::from_secs(1)).await;
    let got: Vec<String> = got.iter().map(short).collect();
    let mut want = numbered("m", 0..N - 1);
    want.push("new".into());
    assert_eq!(got, want, "after another restart too");
    drop(broker);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_record_ends_the_log_for_good() {
    const N: usize = 20;
    const BAD: usize = 10;
    let cluster = Cluster::nameserver_only(Duration::from_secs(30)).await;
    let ns = cluster.nameserver.clone();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("broker-a");
    // Bodies of one length give records of one length, so that new records
    // written after the cut line up exactly with the old ones beyond it.
    let mut broker = start_broker(&data, &ns, "broker-a", &[]).await;
    create_topic(&ns, "flip", 1).await;
    let producer = cluster.plain_producer().await;
    for i in 0..N {
        producer
            .send(Message::new("flip", format!("m{i:02}")))
            .await
            .unwrap();
    }
    producer.close().await.unwrap();
    assert_eq!(tokio::task::block_in_place(|| broker.stop()), Some(0));

    // Flip the last body byte of record BAD: its checksum no longer matches,
    // while every record after it is intact.
    let segment = active_segment(&data);
    let starts = record_starts(&segment);
    assert_eq!(starts.len(), N + 1, "N records and their end");
    let at = starts[BAD + 1] - 1;
    let mut bytes = std::fs::read(&segment).unwrap();
    bytes[at as usize] ^= 0x40;
    std::fs::write(&segment, &bytes).unwrap();
    refused_until_the_checkpoint_goes(&data);

    restart(&mut broker, &ns, "flip").await;
    // Written where the corrupt record and the one after it were.
    let producer = cluster.plain_producer().await;
    for i in BAD..BAD + 2 {
        let r = producer
            .send(Message::new("flip", format!("n{i:02}")))
            .await
            .unwrap();
        assert_eq!(
            r.queue_offset, i as u64,
            "n{i:02} follows the last intact record"
        );
    }
    producer.close().await.unwrap();
    stop_and_restart(&mut broker, &ns, "flip").await;

    let mut want: Vec<String> = (0..BAD).map(|i| format!("m{i:02}")).collect();
    want.extend((BAD..BAD + 2).map(|i| format!("n{i:02}")));
    let got = bodies(&ns, "g", "flip", want.len()).await;
    assert_eq!(
        got, want,
        "the records after the corrupt one never come back"
    );
    drop(broker);
    cluster.shutdown().await;
}
