//! Consumers under broker faults, against real broker processes: a push
//! consumer's message whose hand-back fails while the broker is down or
//! paused is handled again (never committed past, also when the queue is
//! given up meanwhile), and a broker that comes back with a shorter queue
//! sends a push or pull consumer back to the group's committed offset
//! there, so messages written again below its old position are delivered
//! once and the rewind is logged; a message whose record is gone by the
//! time it is handed back is handed back from the consumer's copy.

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use common::{create_topic, start_broker, wait_for_route};
use txmq::{
    handler_fn, ConsumeResult, Message, Producer, PullConsumer, PushConsumer, PushConsumerBuilder,
    ReceivedMessage,
};
use txmq_tests::{wait_for_broker, Cluster};

/// What the client's consumers logged (every test of this file shares it;
/// each test uses its own topic and group names).
static LOG: Mutex<Vec<u8>> = Mutex::new(Vec::new());

/// Starts capturing the client's log into [`LOG`] (once per process).
fn client_log() -> &'static Mutex<Vec<u8>> {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("txmq::consumer=info"))
            .with_ansi(false)
            .with_writer(|| LogWriter)
            .try_init();
    });
    &LOG
}

struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // Echoed, so that a failing test shows what the client did.
        eprint!("{}", String::from_utf8_lossy(buf));
        LOG.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn log_lines_with(words: &[&str]) -> Vec<String> {
    let log = client_log().lock().unwrap();
    String::from_utf8_lossy(&log)
        .lines()
        .filter(|l| words.iter().all(|w| l.contains(w)))
        .map(str::to_string)
        .collect()
}

fn body(m: &ReceivedMessage) -> String {
    String::from_utf8_lossy(m.body()).into_owned()
}

async fn send_all(producer: &Producer, topic: &str, bodies: &[&str]) {
    for b in bodies {
        producer
            .send(Message::new(topic, b.to_string()))
            .await
            .unwrap_or_else(|e| panic!("send {b}: {e}"));
    }
}

async fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The group's committed offset of queue 0 of `topic` (`None`: no commit,
/// or the broker cannot be asked).
async fn committed(admin: &txmq::Admin, group: &str, topic: &str) -> Option<u64> {
    let states = admin.group_state(group, None).await.ok()?;
    states
        .iter()
        .flat_map(|s| s.queues.iter())
        .find(|q| q.topic == topic && q.queue == 0)
        .and_then(|q| q.committed)
}

/// Bodies stored in `topic` (empty when it does not exist).
async fn stored_bodies(admin: &txmq::Admin, topic: &str) -> Vec<String> {
    admin
        .browse(topic, 1000)
        .await
        .map(|ms| ms.iter().map(body).collect())
        .unwrap_or_default()
}

/// A push consumer of `topic` in `group` with the short timings of these
/// tests: heartbeats come before the reader's next pull once the broker is
/// back, and a failed request is given up after 500 ms.
fn quick_consumer(ns: &str, group: &str, topic: &str) -> PushConsumerBuilder {
    PushConsumer::builder()
        .nameserver(ns)
        .group(group)
        .subscribe(topic, "*")
        .commit_interval(Duration::from_millis(100))
        .rebalance_interval(Duration::from_millis(100))
        .max_wait(Duration::from_millis(500))
        .request_timeout(Duration::from_millis(500))
        .route_refresh_interval(Duration::from_millis(500))
}

/// Copies the files of `from` into `to` (created), recursively.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create copy");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("dir entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy file");
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Fault {
    /// `kill -9`, then a restart on the same data: hand-backs are refused.
    Kill,
    /// SIGSTOP, then SIGCONT: hand-backs time out.
    Pause,
}

/// A handler that returns Retry for `m0` while the broker is down, after
/// the test took the broker away during its first attempt.
#[derive(Default)]
struct Poison {
    /// Calls with `m0`.
    attempts: AtomicU32,
    /// The first call with `m0` waits until this is set.
    go: AtomicBool,
    /// `m0` succeeds from now on.
    accept: AtomicBool,
    /// Bodies handled successfully.
    handled: Mutex<Vec<String>>,
}

impl Poison {
    fn handled(&self, b: &str) -> bool {
        self.handled.lock().unwrap().iter().any(|h| h == b)
    }
}

/// Whether m0 is finished: handled, or stored again (retry or dead-letter topic).
async fn settled(admin: &txmq::Admin, group: &str, poison: &Poison) -> Option<&'static str> {
    if poison.handled("m0") {
        return Some("handled");
    }
    let m0 = "m0".to_string();
    if stored_bodies(admin, &format!("%DLQ%{group}"))
        .await
        .contains(&m0)
    {
        return Some("dead-lettered");
    }
    if stored_bodies(admin, &format!("%RETRY%{group}"))
        .await
        .contains(&m0)
    {
        return Some("handed back");
    }
    None
}

/// A message handed back while the broker is away (`fault`): the group's
/// offset never passes it until it is handled or stored again, while the
/// queue's other messages are handled. With `shut_down`, the consumer is
/// shut down (giving its queue up) during the fault.
async fn hand_back_fails(fault: Fault, shut_down: bool) {
    client_log();
    let cluster = Cluster::nameserver_only(Duration::from_secs(30)).await;
    let ns = cluster.nameserver.clone();
    let dir = tempfile::tempdir().unwrap();
    let mut broker = start_broker(&dir.path().join("b"), &ns, "broker-a", &[]).await;
    let topic = format!(
        "handback-{}{}",
        match fault {
            Fault::Kill => "kill",
            Fault::Pause => "pause",
        },
        if shut_down { "-shutdown" } else { "" }
    );
    let group = format!("{topic}-g");
    let (topic, group) = (topic.as_str(), group.as_str());
    create_topic(&ns, topic, 1).await;
    let producer = Producer::builder().nameserver(&ns).build().await.unwrap();
    send_all(&producer, topic, &["m0", "m1", "m2"]).await;

    let poison = Arc::new(Poison::default());
    let p = poison.clone();
    let consumer = PushConsumer::builder()
        .nameserver(&ns)
        .group(group)
        .subscribe(topic, "*")
        .max_reconsume_times(2)
        .local_retry_delay(Duration::from_millis(100))
        .commit_interval(Duration::from_millis(100))
        .rebalance_interval(Duration::from_millis(300))
        .max_wait(Duration::from_millis(500))
        .request_timeout(Duration::from_millis(500))
        .route_refresh_interval(Duration::from_millis(500))
        .drain_timeout(Duration::from_secs(3))
        .start(handler_fn(move |m: &ReceivedMessage| {
            let p = p.clone();
            let b = body(m);
            async move {
                if b == "m0" {
                    p.attempts.fetch_add(1, Ordering::SeqCst);
                    while !p.go.load(Ordering::SeqCst) {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    if !p.accept.load(Ordering::SeqCst) {
                        return ConsumeResult::retry_after(Duration::from_millis(200));
                    }
                }
                p.handled.lock().unwrap().push(b);
                ConsumeResult::Success
            }
        }))
        .await
        .unwrap();
    wait_until(
        "m0 taken and m1, m2 handled",
        Duration::from_secs(10),
        || {
            poison.attempts.load(Ordering::SeqCst) >= 1
                && poison.handled("m1")
                && poison.handled("m2")
        },
    )
    .await;

    // The broker goes away while m0's handler runs; then it asks for a retry.
    match fault {
        Fault::Kill => broker.kill9(),
        Fault::Pause => broker.signal("STOP"),
    }
    poison.go.store(true, Ordering::SeqCst);
    // Long enough for every attempt the consumer allows (max reconsume
    // times 2) to fail to hand m0 back: it must go on handling it here.
    let started = Instant::now();
    while poison.attempts.load(Ordering::SeqCst) < 5 && started.elapsed() < Duration::from_secs(6) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut consumer = Some(consumer);
    let stopping = if shut_down {
        let c = consumer.take().unwrap();
        let stopping = tokio::spawn(c.shutdown());
        // The queue is given up while the broker is still away.
        tokio::time::sleep(Duration::from_millis(100)).await;
        Some(stopping)
    } else {
        None
    };
    match fault {
        Fault::Kill => {
            tokio::task::block_in_place(|| broker.restart());
            wait_for_broker(&ns, "broker-a").await;
        }
        Fault::Pause => broker.signal("CONT"),
    }
    poison.accept.store(true, Ordering::SeqCst);
    let admin = txmq::Admin::connect([ns.as_str()]).await.unwrap();

    if let Some(stopping) = stopping {
        // Whatever the final commit stored may pass m0 only if m0 is finished.
        let result = stopping.await.unwrap();
        eprintln!("shutdown: {result:?}");
        let c = committed(&admin, group, topic).await;
        if c.is_some_and(|c| c > 0) {
            assert!(
                settled(&admin, group, &poison).await.is_some(),
                "the queue was given up at {c:?}, past m0, which was neither handled nor stored again \
                 ({} attempts)",
                poison.attempts.load(Ordering::SeqCst)
            );
        }
        eprintln!(
            "committed {c:?}, m0 {:?}",
            settled(&admin, group, &poison).await
        );
    } else {
        // From now on the group's offset may pass m0 only once m0 was
        // handled or stored again (dead-lettered: it failed more than twice).
        let deadline = Instant::now() + Duration::from_secs(20);
        let outcome = loop {
            let c = committed(&admin, group, topic).await;
            if c.is_some_and(|c| c > 0) {
                let outcome = settled(&admin, group, &poison).await;
                assert!(
                    outcome.is_some(),
                    "the group's offset moved to {c:?}, past m0, which was neither handled nor \
                     stored again ({} attempts)",
                    poison.attempts.load(Ordering::SeqCst)
                );
                if c == Some(3) {
                    break outcome;
                }
            }
            assert!(
                Instant::now() < deadline,
                "m0 never finished: committed {c:?}, {} attempts, handled {:?}",
                poison.attempts.load(Ordering::SeqCst),
                poison.handled.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        eprintln!(
            "m0 {outcome:?} after {} attempts",
            poison.attempts.load(Ordering::SeqCst)
        );
    }
    assert!(
        poison.attempts.load(Ordering::SeqCst) >= 3,
        "m0 was tried {} times",
        poison.attempts.load(Ordering::SeqCst)
    );
    let dropped = log_lines_with(&["dropped"]);
    assert!(dropped.is_empty(), "messages were dropped: {dropped:?}");
    if let Some(c) = consumer {
        c.shutdown().await.unwrap();
    }
    admin.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_that_cannot_be_handed_back_to_a_killed_broker_is_not_committed_past() {
    hand_back_fails(Fault::Kill, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_that_cannot_be_handed_back_to_a_paused_broker_is_not_committed_past() {
    hand_back_fails(Fault::Pause, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_given_up_while_a_retry_cannot_be_handed_back_is_not_committed_past() {
    hand_back_fails(Fault::Pause, true).await;
}

/// A broker comes back with a shorter queue than the consumer had read (its
/// data directory restored from an earlier copy, as a power cut under async
/// flush would leave it), and new messages fill the lost offsets (perhaps
/// before the consumer pulls again): they are delivered (the consumer goes back to the
/// group's committed offset, not to the queue's end), and the rewind is
/// logged.
async fn queue_cut_short(pull: bool) {
    client_log();
    let (topic, group) = if pull {
        ("rewind-pull", "rewind-pull-g")
    } else {
        ("rewind-push", "rewind-push-g")
    };
    let cluster = Cluster::nameserver_only(Duration::from_secs(30)).await;
    let ns = cluster.nameserver.clone();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("b");
    let copy = dir.path().join("copy");
    let mut broker = start_broker(&data, &ns, "broker-a", &[]).await;
    create_topic(&ns, topic, 1).await;
    let producer = Producer::builder().nameserver(&ns).build().await.unwrap();

    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let consumer = Reader::start(pull, &ns, group, topic, &seen).await;
    let admin = txmq::Admin::connect([ns.as_str()]).await.unwrap();
    let has = |bodies: &[&str]| {
        let seen = seen.lock().unwrap();
        bodies.iter().all(|b| seen.iter().any(|s| s == b))
    };

    // Three messages handled and committed: the state the broker comes back to.
    send_all(&producer, topic, &["a0", "a1", "a2"]).await;
    wait_until("a0..a2", Duration::from_secs(10), || {
        has(&["a0", "a1", "a2"])
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while committed(&admin, group, topic).await != Some(3) {
        assert!(Instant::now() < deadline, "offset 3 never committed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::task::block_in_place(|| {
        assert_eq!(broker.stop(), Some(0), "the broker stops cleanly");
        copy_dir(&data, &copy);
        broker.restart();
    });
    wait_for_broker(&ns, "broker-a").await;
    wait_for_route(&ns, topic, &["broker-a"]).await;

    // Five more, read up to offset 8: then the broker loses them.
    send_all(&producer, topic, &["b0", "b1", "b2", "b3", "b4"]).await;
    wait_until("b0..b4", Duration::from_secs(10), || {
        has(&["b0", "b1", "b2", "b3", "b4"])
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while committed(&admin, group, topic).await != Some(8) {
        assert!(Instant::now() < deadline, "offset 8 never committed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::task::block_in_place(|| {
        assert_eq!(broker.stop(), Some(0), "the broker stops cleanly");
        std::fs::remove_dir_all(&data).unwrap();
        copy_dir(&copy, &data);
        broker.restart();
    });
    wait_for_broker(&ns, "broker-a").await;
    wait_for_route(&ns, topic, &["broker-a"]).await;

    // Offsets 3..6 again, below the consumer's position of 8.
    send_all(&producer, topic, &["c0", "c1", "c2"]).await;
    wait_until(
        "c0..c2, written below the consumer's old position",
        Duration::from_secs(15),
        || has(&["c0", "c1", "c2"]),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while committed(&admin, group, topic).await != Some(6) {
        assert!(Instant::now() < deadline, "offset 6 never committed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Logged once, from 8 to 3: the reader did not go on pulling past the end.
    let rewinds = log_lines_with(&[
        "the queue ends below this reader's position",
        &format!("topic={topic} "),
    ]);
    assert_eq!(rewinds.len(), 1, "{rewinds:#?}");
    assert!(
        rewinds[0].contains("from=8") && rewinds[0].contains("to=3"),
        "{}",
        rewinds[0]
    );
    // Each message once: the reader went back to the group's offset, not
    // to its start.
    let all: Vec<String> = seen.lock().unwrap().clone();
    let distinct: BTreeSet<&String> = all.iter().collect();
    assert_eq!(distinct.len(), all.len(), "repeated: {all:?}");
    consumer.shutdown().await;
    admin.close().await.unwrap();
    drop(broker);
}

/// A push consumer, or a pull consumer polled and committed by a task,
/// recording the bodies it gets.
enum Reader {
    Push(PushConsumer),
    Pull(Arc<AtomicBool>, tokio::task::JoinHandle<()>),
}

impl Reader {
    async fn start(
        pull: bool,
        ns: &str,
        group: &str,
        topic: &str,
        seen: &Arc<Mutex<Vec<String>>>,
    ) -> Reader {
        let seen = seen.clone();
        if pull {
            let mut consumer = PullConsumer::builder()
                .nameserver(ns)
                .group(group)
                .topic(topic)
                .max_wait(Duration::from_millis(500))
                .request_timeout(Duration::from_millis(500))
                .route_refresh_interval(Duration::from_millis(500))
                .build()
                .await
                .unwrap();
            let stop = Arc::new(AtomicBool::new(false));
            let stopping = stop.clone();
            let task = tokio::spawn(async move {
                while !stopping.load(Ordering::SeqCst) {
                    let batch = consumer.poll(Duration::from_millis(100)).await.unwrap();
                    seen.lock().unwrap().extend(batch.iter().map(body));
                    // Fails while the broker is away; the next round retries.
                    let _ = consumer.commit().await;
                }
                consumer.shutdown().await.unwrap();
            });
            return Reader::Pull(stop, task);
        }
        let consumer = quick_consumer(ns, group, topic)
            .start(handler_fn(move |m: &ReceivedMessage| {
                seen.lock().unwrap().push(body(m));
                async { ConsumeResult::Success }
            }))
            .await
            .unwrap();
        Reader::Push(consumer)
    }

    async fn shutdown(self) {
        match self {
            Reader::Push(c) => c.shutdown().await.unwrap(),
            Reader::Pull(stop, task) => {
                stop.store(true, Ordering::SeqCst);
                task.await.unwrap();
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_cut_short_is_read_again_from_the_groups_committed_offset() {
    queue_cut_short(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_consumer_reads_a_queue_cut_short_again_from_the_groups_committed_offset() {
    queue_cut_short(true).await;
}

/// A message asked to be retried whose record is gone from the broker by
/// then (the broker came back with its log cut short, as after a power cut
/// under async flush, and another message now stands at its log offset):
/// the consumer hands back its own copy, so the message itself reaches the
/// retry topic and comes again; neither the message standing at its old
/// offset is handed back instead, nor is the message only retried here.
/// The queue grows back to the reader's old position at once, so only the
/// reader's trail (the broker run and the last message it read) shows that
/// it must go back for the message standing there now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_whose_record_is_gone_is_handed_back_from_the_consumers_copy() {
    client_log();
    let (topic, group) = ("gone", "gone-g");
    let cluster = Cluster::nameserver_only(Duration::from_secs(30)).await;
    let ns = cluster.nameserver.clone();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("b");
    let copy = dir.path().join("copy");
    let mut broker = start_broker(&data, &ns, "broker-a", &[]).await;
    create_topic(&ns, topic, 1).await;
    let producer = Producer::builder().nameserver(&ns).build().await.unwrap();
    // The state the broker comes back to: the topic, nothing in it.
    tokio::task::block_in_place(|| {
        assert_eq!(broker.stop(), Some(0), "the broker stops cleanly");
        copy_dir(&data, &copy);
        broker.restart();
    });
    wait_for_broker(&ns, "broker-a").await;
    wait_for_route(&ns, topic, &["broker-a"]).await;

    // (body, reconsume times) of every handling; `x` waits in its first
    // handling until `release`, then asks to be retried.
    let seen: Arc<Mutex<Vec<(String, u32)>>> = Arc::default();
    let entered = Arc::new(AtomicBool::new(false));
    let release = Arc::new(tokio::sync::Notify::new());
    let consumer = {
        let (seen, entered, release) = (seen.clone(), entered.clone(), release.clone());
        quick_consumer(&ns, group, topic)
            .start(handler_fn(move |m: &ReceivedMessage| {
                let (b, times) = (body(m), m.reconsume_times());
                seen.lock().unwrap().push((b.clone(), times));
                let wait = b == "x" && times == 0;
                if wait {
                    entered.store(true, Ordering::SeqCst);
                }
                let release = release.clone();
                async move {
                    if wait {
                        release.notified().await;
                        return ConsumeResult::Retry {
                            delay: Some(Duration::from_millis(200)),
                        };
                    }
                    ConsumeResult::Success
                }
            }))
            .await
            .unwrap()
    };
    send_all(&producer, topic, &["x"]).await;
    wait_until("x handled", Duration::from_secs(10), || {
        entered.load(Ordering::SeqCst)
    })
    .await;

    // The broker loses x; y takes its place in the log.
    tokio::task::block_in_place(|| {
        assert_eq!(broker.stop(), Some(0), "the broker stops cleanly");
        std::fs::remove_dir_all(&data).unwrap();
        copy_dir(&copy, &data);
        broker.restart();
    });
    wait_for_broker(&ns, "broker-a").await;
    wait_for_route(&ns, topic, &["broker-a"]).await;
    // At once: the queue may grow back to the reader's old length before
    // it pulls again, and y must be delivered all the same.
    send_all(&producer, topic, &["y"]).await;
    wait_until("y handled", Duration::from_secs(15), || {
        seen.lock().unwrap().iter().any(|(b, _)| b == "y")
    })
    .await;
    release.notify_one();

    // x comes back from the retry topic.
    let admin = txmq::Admin::connect([ns.as_str()]).await.unwrap();
    let retry_topic = format!("%RETRY%{group}");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let handed_back = stored_bodies(&admin, &retry_topic).await;
        let again = seen
            .lock()
            .unwrap()
            .iter()
            .any(|(b, t)| b == "x" && *t == 1);
        if handed_back.iter().any(|b| b == "x") && again {
            assert!(
                !handed_back.iter().any(|b| b == "y"),
                "y was handed back in x's place: {handed_back:?}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "x never reached the retry topic (it holds {handed_back:?}); handled {:?}",
            seen.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ys: Vec<u32> = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|(b, _)| b == "y")
        .map(|(_, t)| *t)
        .collect();
    assert_eq!(ys, [0], "y is handled once, as itself");
    consumer.shutdown().await.unwrap();
    producer.close().await.unwrap();
    admin.close().await.unwrap();
    drop(broker);
    cluster.shutdown().await;
}
