//! Consumer groups against real brokers: push consumers sharing queues
//! and rebalancing when members join or die (kill -9 of a `txmq consume`
//! process), retries with growing back-off and dead letters, delayed
//! messages (also across a broker restart), ordered consumption per
//! sharding key, and tag filters.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{create_topic, start_broker, txmq, wait_for_route};
use txmq::{handler_fn, ConsumeResult, Message, PushConsumer, ReceivedMessage};
use txmq_broker::FlushMode;
use txmq_tests::{binary, json_lines, Cluster};

/// What a test's handlers saw, in arrival order: (body, reconsume times,
/// when handled, the member's id).
type Seen = Arc<Mutex<Vec<(String, u32, Instant, String)>>>;

fn body(m: &ReceivedMessage) -> String {
    String::from_utf8_lossy(m.body()).into_owned()
}

/// How often the tests' consumers rebalance, unless a test says otherwise.
const REBALANCE: Duration = Duration::from_millis(300);

/// A push consumer in `group` on `topic` with test timings (rebalancing
/// every `rebalance`), recording every message it handles successfully
/// into `seen`.
async fn recorder(
    ns: &str,
    group: &str,
    topic: &str,
    tags: &str,
    seen: &Seen,
    orderly: bool,
    rebalance: Duration,
) -> PushConsumer {
    let seen = seen.clone();
    let id = Arc::new(Mutex::new(String::new()));
    let id2 = id.clone();
    let consumer = PushConsumer::builder()
        .nameserver(ns)
        .group(group)
        .subscribe(topic, tags)
        .orderly(orderly)
        .rebalance_interval(rebalance)
        .commit_interval(Duration::from_millis(100))
        .max_wait(Duration::from_millis(500))
        .route_refresh_interval(Duration::from_millis(500))
        .start(handler_fn(move |m: &ReceivedMessage| {
            let entry = (
                body(m),
                m.reconsume_times(),
                Instant::now(),
                id2.lock().unwrap().clone(),
            );
            seen.lock().unwrap().push(entry);
            async { ConsumeResult::Success }
        }))
        .await
        .expect("consumer starts");
    *id.lock().unwrap() = consumer.client_id().to_string();
    consumer
}

/// Sends `{prefix}{i}` to `topic` for each `i` of `range`, one after the other.
async fn send_numbered(
    producer: &txmq::Producer,
    topic: &str,
    prefix: &str,
    range: std::ops::Range<u32>,
) {
    for i in range {
        producer
            .send(Message::new(topic, format!("{prefix}{i}")))
            .await
            .unwrap();
    }
}

async fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A `txmq consume --output json` process whose stdout goes to a file.
struct ConsumeProcess {
    child: Option<Child>,
    out: PathBuf,
}

impl ConsumeProcess {
    fn start(ns: &str, dir: &Path, name: &str, args: &[&str]) -> ConsumeProcess {
        let out = dir.join(format!("{name}.jsonl"));
        let file = std::fs::File::create(&out).expect("create output file");
        let child = Command::new(binary("txmq"))
            .arg("--nameserver")
            .arg(ns)
            .args(args)
            .args(["--output", "json"])
            .stdout(file)
            .stderr(Stdio::null())
            .spawn()
            .expect("start txmq consume");
        ConsumeProcess {
            child: Some(child),
            out,
        }
    }

    fn lines(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read(&self.out).unwrap_or_default();
        // A killed process may leave half a line.
        let complete = match text.iter().rposition(|&b| b == b'\n') {
            Some(i) => &text[..=i],
            None => &[][..],
        };
        json_lines(complete)
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends the process `sig` (STOP, CONT, ...).
    fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            Command::new("kill")
                .arg(format!("-{sig}"))
                .arg(c.id().to_string())
                .status()
                .expect("kill runs");
        }
    }

    fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
            let _ = c.wait();
        }
    }
}

impl Drop for ConsumeProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A nameserver and a broker whose consumers expire after 1.5 s, with
/// `topic` of `queues` queues; and the nameserver's address.
async fn short_expiry_cluster(topic: &str, queues: u32) -> (Cluster, String) {
    let mut cluster = Cluster::nameserver_only(Duration::from_secs(30)).await;
    cluster
        .add_broker("broker-a", |c| {
            c.consumer_expiry = Duration::from_millis(1500)
        })
        .await;
    let ns = cluster.nameserver.clone();
    create_topic(&ns, topic, queues).await;
    (cluster, ns)
}

/// The owners of each queue as the brokers see them.
async fn owners(
    ns: &str,
    group: &str,
) -> (
    BTreeSet<String>,
    BTreeMap<(String, String, u32), Option<String>>,
) {
    let out = txmq(ns, &["group", "show", group, "--output", "json"], None).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut members = BTreeSet::new();
    let mut queues = BTreeMap::new();
    for s in json_lines(&out.stdout) {
        for m in s["members"].as_array().unwrap() {
            members.insert(m["client_id"].as_str().unwrap().to_string());
        }
        for q in s["queues"].as_array().unwrap() {
            queues.insert(
                (
                    s["broker"].as_str().unwrap().to_string(),
                    q["topic"].as_str().unwrap().to_string(),
                    q["queue"].as_u64().unwrap() as u32,
                ),
                q["owner"].as_str().map(str::to_string),
            );
        }
    }
    (members, queues)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_share_queues_rebalance_on_join_and_kill_and_lose_nothing() {
    let mut cluster = Cluster::nameserver_only(Duration::from_secs(30)).await;
    cluster
        .add_broker("broker-a", |c| c.consumer_expiry = Duration::from_secs(2))
        .await;
    let ns = cluster.nameserver.clone();
    create_topic(&ns, "work", 8).await;
    let dir = tempfile::tempdir().unwrap();
    let consume = [
        "consume",
        "work",
        "--group",
        "workers",
        "--commit-interval",
        "100ms",
        "--rebalance-interval",
        "300ms",
        "--route-refresh",
        "500ms",
    ];
    let mut members: Vec<ConsumeProcess> = (0..3)
        .map(|i| ConsumeProcess::start(&ns, dir.path(), &format!("c{i}"), &consume))
        .collect();

    // 10,000 messages, sent in two halves around the join and the kill.
    let producer = cluster.producer().await;
    let send = |range: std::ops::Range<u32>| {
        let producer = producer.clone();
        async move {
            let batch: Vec<_> = range
                .map(|i| producer.send(Message::new("work", format!("m{i}"))))
                .collect();
            for r in futures_util::future::join_all(batch).await {
                r.expect("sent");
            }
        }
    };
    send(0..5000).await;
    // Every member gets a share.
    wait_until("every member consumed", Duration::from_secs(20), || {
        members.iter().all(|m| !m.lines().is_empty())
    })
    .await;
    members.push(ConsumeProcess::start(&ns, dir.path(), "c3", &consume));
    tokio::time::sleep(Duration::from_millis(500)).await;
    members[0].kill9();
    send(5000..10000).await;

    let live = |members: &[ConsumeProcess]| -> Vec<serde_json::Value> {
        members.iter().flat_map(ConsumeProcess::lines).collect()
    };
    wait_until("every message consumed", Duration::from_secs(30), || {
        let bodies: BTreeSet<String> = live(&members)
            .iter()
            .map(|l| l["body"].as_str().unwrap().to_string())
            .collect();
        bodies.len() == 10_000
    })
    .await;

    // Duplicates only of what the killed member printed (and had not committed).
    let killed: BTreeSet<String> = members[0]
        .lines()
        .iter()
        .map(|l| l["body"].as_str().unwrap().to_string())
        .collect();
    let mut count: HashMap<String, usize> = HashMap::new();
    for l in live(&members) {
        *count
            .entry(l["body"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    for (body, n) in &count {
        assert!(*n <= 2, "{body} consumed {n} times");
        if *n == 2 {
            assert!(
                killed.contains(body),
                "{body} repeated but the killed member never had it"
            );
        }
    }
    let repeated = count.values().filter(|n| **n == 2).count();
    assert!(repeated <= killed.len());

    // The fourth member got queues, and after the rebalance every queue
    // of the topic has exactly one owner, a live member.
    assert!(
        !members[3].lines().is_empty(),
        "the member that joined consumed"
    );
    let (group_members, queues) = owners(&ns, "workers").await;
    assert_eq!(
        group_members.len(),
        3,
        "the killed member left: {group_members:?}"
    );
    let work: Vec<_> = queues.iter().filter(|(k, _)| k.1 == "work").collect();
    assert_eq!(work.len(), 8);
    for (q, owner) in work {
        let owner = owner
            .as_ref()
            .unwrap_or_else(|| panic!("{q:?} has no owner"));
        assert!(
            group_members.contains(owner),
            "{q:?} owned by {owner}, not a member"
        );
    }
    let per_member: BTreeMap<&String, usize> = queues
        .iter()
        .filter(|(k, _)| k.1 == "work")
        .filter_map(|(_, o)| o.as_ref())
        .fold(BTreeMap::new(), |mut m, o| {
            *m.entry(o).or_default() += 1;
            m
        });
    assert!(
        per_member.values().all(|n| (2..=3).contains(n)),
        "{per_member:?}"
    );

    for m in &mut members {
        m.terminate();
    }
    producer.close().await.unwrap();
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_message_is_retried_with_growing_delays_then_dead_lettered() {
    let mut cluster = Cluster::nameserver_only(Duration::from_secs(30)).await;
    cluster
        .add_broker("broker-a", |c| {
            c.retry_delays = vec![
                Duration::from_millis(300),
                Duration::from_millis(600),
                Duration::from_millis(1200),
            ]
        })
        .await;
    let ns = cluster.nameserver.clone();
    create_topic(&ns, "bills", 2).await;
    let attempts: Arc<Mutex<Vec<(u32, Instant)>>> = Arc::default();
    let ok: Arc<Mutex<Vec<(String, Instant)>>> = Arc::default();
    let (a, o) = (attempts.clone(), ok.clone());
    let consumer = PushConsumer::builder()
        .nameserver(&ns)
        .group("billing")
        .subscribe("bills", "*")
        .max_reconsume_times(3)
        .rebalance_interval(Duration::from_millis(300))
        .commit_interval(Duration::from_millis(100))
        .max_wait(Duration::from_millis(500))
        .route_refresh_interval(Duration::from_millis(300))
        .start(handler_fn(move |m: &ReceivedMessage| {
            let b = body(m);
            let result = if b == "poison" {
                a.lock()
                    .unwrap()
                    .push((m.reconsume_times(), Instant::now()));
                ConsumeResult::retry()
            } else {
                o.lock().unwrap().push((b, Instant::now()));
                ConsumeResult::Success
            };
            async move { result }
        }))
        .await
        .unwrap();
    let producer = cluster.producer().await;
    producer
        .send(Message::new("bills", "poison"))
        .await
        .unwrap();
    send_numbered(&producer, "bills", "ok", 0..50).await;
    // Attempt 0, then 3 redeliveries, then the dead-letter topic.
    let admin = cluster.admin().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let dead = loop {
        let dead = admin
            .browse(&txmq::dlq_topic("billing"), 10)
            .await
            .unwrap_or_default();
        if !dead.is_empty() {
            break dead;
        }
        assert!(
            Instant::now() < deadline,
            "never dead-lettered: {:?}",
            attempts.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(dead.len(), 1);
    assert_eq!(body(&dead[0]), "poison");
    assert_eq!(
        dead[0].reconsume_times(),
        4,
        "{:?}",
        dead[0].message().properties
    );
    assert_eq!(
        dead[0]
            .message()
            .properties
            .get(txmq::PROPERTY_REAL_TOPIC)
            .map(String::as_str),
        Some("bills")
    );
    let attempts = attempts.lock().unwrap().clone();
    let counts: Vec<u32> = attempts.iter().map(|a| a.0).collect();
    assert_eq!(counts, [0, 1, 2, 3], "reconsume counts seen by the handler");
    let gaps: Vec<Duration> = attempts.windows(2).map(|w| w[1].1 - w[0].1).collect();
    for (gap, want) in gaps.iter().zip([300u64, 600, 1200]) {
        assert!(
            *gap >= Duration::from_millis(want - 50),
            "gap {gap:?} shorter than {want} ms: {gaps:?}"
        );
        assert!(
            *gap <= Duration::from_millis(want + 1500),
            "gap {gap:?} much longer than {want} ms: {gaps:?}"
        );
    }
    // The other messages flowed meanwhile: all handled before the first retry.
    let ok = ok.lock().unwrap().clone();
    assert_eq!(ok.len(), 50);
    assert!(
        ok.iter().all(|(_, t)| *t < attempts[1].1),
        "the other messages waited for the poison one"
    );
    // The dead letter is listed by the CLI.
    let out = txmq(&ns, &["dlq", "list", "billing", "--output", "json"], None).await;
    let listed = json_lines(&out.stdout);
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["body"], "poison");
    assert_eq!(listed[0]["reconsume_times"], 4);
    // And a dead-letter topic is consumed like any topic.
    let args = [
        "consume",
        "%DLQ%billing",
        "--group",
        "inspect",
        "--idle-timeout",
        "1s",
        "--output",
        "json",
    ];
    let consumed = json_lines(&txmq(&ns, &args, None).await.stdout);
    assert_eq!(consumed.len(), 1);
    assert_eq!(consumed[0]["body"], "poison");
    consumer.shutdown().await.expect("final commits");
    admin.close().await.unwrap();
    producer.close().await.unwrap();
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_messages_arrive_on_time_also_across_a_broker_restart() {
    let ns_cluster = Cluster::nameserver_only(Duration::from_secs(30)).await;
    let ns = ns_cluster.nameserver.clone();
    let data = tempfile::tempdir().unwrap();
    let mut broker = start_broker(data.path(), &ns, "broker-a", &[]).await;
    create_topic(&ns, "later", 2).await;
    // (body, wall-clock ms when handled)
    let seen: Arc<Mutex<Vec<(String, u64)>>> = Arc::default();
    let s = seen.clone();
    let consumer = PushConsumer::builder()
        .nameserver(&ns)
        .group("g")
        .subscribe("later", "*")
        .commit_interval(Duration::from_millis(100))
        .rebalance_interval(Duration::from_millis(300))
        .max_wait(Duration::from_millis(500))
        .route_refresh_interval(Duration::from_millis(300))
        .start(handler_fn(move |m: &ReceivedMessage| {
            s.lock().unwrap().push((body(m), txmq::now_millis()));
            async { ConsumeResult::Success }
        }))
        .await
        .unwrap();
    let producer = txmq::Producer::builder()
        .nameserver(&ns)
        .build()
        .await
        .unwrap();
    let sent_at = txmq::now_millis();
    producer
        .send(Message::new("later", "at").with_deliver_at(sent_at + 1500))
        .await
        .unwrap();
    producer
        .send(Message::new("later", "in").with_delay(Duration::from_millis(2500)))
        .await
        .unwrap();
    producer.send(Message::new("later", "now")).await.unwrap();
    let handled = |b: &str| seen.lock().unwrap().iter().find(|s| s.0 == b).map(|s| s.1);
    wait_until("the undelayed message", Duration::from_secs(5), || {
        handled("now").is_some()
    })
    .await;
    assert!(
        handled("at").is_none() && handled("in").is_none(),
        "a delayed message came early"
    );
    wait_until("both delayed messages", Duration::from_secs(10), || {
        handled("in").is_some()
    })
    .await;
    let at = handled("at").unwrap();
    assert!(
        (sent_at + 1500..=sent_at + 2500).contains(&at),
        "'at' handled {} ms after sending",
        at - sent_at
    );
    let inn = handled("in").unwrap();
    assert!(
        (sent_at + 2500..=sent_at + 3500).contains(&inn),
        "'in' handled {} ms after sending",
        inn - sent_at
    );

    // One whose time passes while the broker is down comes right after the
    // restart; one due after the restart comes on time.
    let sent_at = txmq::now_millis();
    producer
        .send(Message::new("later", "while-down").with_delay(Duration::from_millis(800)))
        .await
        .unwrap();
    producer
        .send(Message::new("later", "after-restart").with_delay(Duration::from_millis(4000)))
        .await
        .unwrap();
    assert_eq!(broker.stop(), Some(0));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let restarted_at = txmq::now_millis();
    tokio::task::block_in_place(|| broker.restart());
    wait_until(
        "the message due while the broker was down",
        Duration::from_secs(10),
        || handled("while-down").is_some(),
    )
    .await;
    let t = handled("while-down").unwrap();
    assert!(
        t <= restarted_at + 2500,
        "handled {} ms after the restart",
        t - restarted_at
    );
    wait_until(
        "the message due after the restart",
        Duration::from_secs(10),
        || handled("after-restart").is_some(),
    )
    .await;
    let t = handled("after-restart").unwrap();
    assert!(
        (sent_at + 4000..=sent_at + 5000).contains(&t),
        "handled {} ms after sending",
        t - sent_at
    );
    let bodies: Vec<String> = seen.lock().unwrap().iter().map(|s| s.0.clone()).collect();
    let admin = txmq::Admin::connect([ns.clone()]).await.unwrap();
    let stored: Vec<(String, u32, u64)> = admin
        .browse("later", 100)
        .await
        .unwrap()
        .iter()
        .map(|m| (body(m), m.queue(), m.queue_offset()))
        .collect();
    assert_eq!(bodies.len(), 5, "each once: {bodies:?}; stored {stored:?}");
    consumer.shutdown().await.expect("final commits");
    producer.close().await.unwrap();
    broker.stop();
    ns_cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orderly_consumers_see_each_keys_messages_in_send_order_across_a_restart() {
    let cluster = Cluster::start(FlushMode::Async).await;
    let ns = cluster.nameserver.clone();
    create_topic(&ns, "orders", 8).await;
    let seen: Seen = Arc::default();
    let first = recorder(&ns, "shipping", "orders", "*", &seen, true, REBALANCE).await;
    let second = recorder(&ns, "shipping", "orders", "*", &seen, true, REBALANCE).await;

    // 4 producers, 5,000 messages over 50 keys; a key belongs to one
    // producer, which sends its messages one after the other.
    let mut sends = Vec::new();
    for p in 0..4u32 {
        let producer = cluster.producer().await;
        sends.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            let keys: Vec<String> = (0..50u32)
                .filter(|k| k % 4 == p)
                .map(|k| format!("k{k}"))
                .collect();
            for i in 0..1250usize {
                let key = &keys[i % keys.len()];
                let body = format!("{key}:{p}:{i}");
                if producer
                    .send_ordered(Message::new("orders", body.clone()), key)
                    .await
                    .is_ok()
                {
                    acked.push((key.clone(), body));
                }
            }
            producer.close().await.unwrap();
            acked
        }));
    }
    // Restart one consumer midway.
    wait_until("some messages consumed", Duration::from_secs(20), || {
        seen.lock().unwrap().len() > 1000
    })
    .await;
    let old_first = first.client_id().to_string();
    first.shutdown().await.expect("final commits");
    let first = recorder(&ns, "shipping", "orders", "*", &seen, true, REBALANCE).await;
    eprintln!(
        "old first {old_first}, second {}, new first {}",
        second.client_id(),
        first.client_id()
    );
    let mut acked = Vec::new();
    for s in sends {
        acked.extend(s.await.unwrap());
    }
    let keys: BTreeSet<&String> = acked.iter().map(|a| &a.0).collect();
    assert_eq!(keys.len(), 50);
    let total = acked.len();
    wait_until(
        "every acknowledged message consumed",
        Duration::from_secs(30),
        || {
            let s = seen.lock().unwrap();
            s.iter().map(|x| &x.0).collect::<BTreeSet<_>>().len() >= total
        },
    )
    .await;
    // Per key, the acknowledged sends appear in the consumed sequence in
    // send order (first occurrences; a clean restart repeats nothing).
    let consumed: Vec<String> = seen.lock().unwrap().iter().map(|s| s.0.clone()).collect();
    let unique: BTreeSet<&String> = consumed.iter().collect();
    if unique.len() != consumed.len() {
        let all = seen.lock().unwrap().clone();
        let mut n: HashMap<&str, Vec<(usize, &str)>> = HashMap::new();
        for (i, x) in all.iter().enumerate() {
            n.entry(x.0.as_str()).or_default().push((i, x.3.as_str()));
        }
        let dups: Vec<_> = n.iter().filter(|(_, v)| v.len() > 1).take(10).collect();
        panic!("repeated: {dups:?}");
    }
    let mut position: HashMap<&str, usize> = HashMap::new();
    for (i, b) in consumed.iter().enumerate() {
        position.entry(b.as_str()).or_insert(i);
    }
    let mut by_key: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (key, body) in &acked {
        by_key.entry(key).or_default().push(body);
    }
    for (key, bodies) in by_key {
        let positions: Vec<usize> = bodies.iter().map(|b| position[b]).collect();
        assert!(
            positions.windows(2).all(|w| w[0] < w[1]),
            "key {key} out of order"
        );
    }
    first.shutdown().await.expect("final commits");
    second.shutdown().await.expect("final commits");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_filter_delivers_only_matching_tags() {
    let cluster = Cluster::start(FlushMode::Async).await;
    let ns = cluster.nameserver.clone();
    create_topic(&ns, "events", 2).await;
    let only_a: Seen = Arc::default();
    let a_or_c: Seen = Arc::default();
    let ca = recorder(&ns, "ga", "events", "a", &only_a, false, REBALANCE).await;
    let cac = recorder(&ns, "gac", "events", "a || c", &a_or_c, false, REBALANCE).await;
    let producer = cluster.producer().await;
    for i in 0..300 {
        let tag = ["a", "b", "c"][i % 3];
        producer
            .send(Message::new("events", format!("{tag}{i}")).with_tag(tag))
            .await
            .unwrap();
    }
    producer
        .send(Message::new("events", "untagged"))
        .await
        .unwrap();
    wait_until("100 a and 200 a||c", Duration::from_secs(10), || {
        only_a.lock().unwrap().len() >= 100 && a_or_c.lock().unwrap().len() >= 200
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let a = only_a.lock().unwrap().clone();
    assert_eq!(a.len(), 100);
    assert!(
        a.iter().all(|s| s.0.starts_with('a')),
        "tag a consumer saw another tag"
    );
    let ac = a_or_c.lock().unwrap().clone();
    assert_eq!(ac.len(), 200);
    assert!(ac
        .iter()
        .all(|s| s.0.starts_with('a') || s.0.starts_with('c')));
    // The CLI filters too.
    let out = txmq(
        &ns,
        &[
            "consume",
            "events",
            "--group",
            "cli-b",
            "--tag",
            "b",
            "--idle-timeout",
            "1s",
            "--output",
            "json",
        ],
        None,
    )
    .await;
    let lines = json_lines(&out.stdout);
    assert_eq!(lines.len(), 100);
    assert!(lines.iter().all(|l| l["tag"] == "b"));
    ca.shutdown().await.expect("final commits");
    cac.shutdown().await.expect("final commits");
    producer.close().await.unwrap();
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_only_topics_queues_are_assigned_once_it_may_be_read() {
    let cluster = Cluster::start(FlushMode::Async).await;
    let ns = cluster.nameserver.clone();
    let admin = cluster.admin().await;
    admin
        .create_topic("inbox", 2, txmq::PERM_WRITE, None)
        .await
        .unwrap();
    wait_for_route(&ns, "inbox", &["broker-a"]).await;
    let producer = cluster.producer().await;
    send_numbered(&producer, "inbox", "m", 0..4).await;

    // The first rebalance runs before start returns: it hands out no queue,
    // so no pull is refused and nothing arrives. (The group's retry topic,
    // readable, is assigned as usual.) The consumer heartbeats every 10 s
    // (a third of the brokers' 30 s member expiry): every change below
    // within 5 s comes from the broker telling the members that the topic
    // changed.
    let inbox = |c: &PushConsumer| c.queues().iter().filter(|q| q.topic == "inbox").count();
    let seen: Seen = Arc::default();
    let slow = Duration::from_secs(60);
    let consumer = recorder(&ns, "g", "inbox", "*", &seen, false, slow).await;
    assert_eq!(inbox(&consumer), 0);
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(inbox(&consumer), 0);
    assert!(seen.lock().unwrap().is_empty());

    // Readable: both queues are assigned, and what was sent meanwhile
    // arrives.
    admin
        .create_topic("inbox", 2, txmq::PERM_READ_WRITE, None)
        .await
        .unwrap();
    wait_until("the four messages", Duration::from_secs(5), || {
        seen.lock().unwrap().len() >= 4
    })
    .await;
    assert_eq!(inbox(&consumer), 2);
    let bodies: BTreeSet<String> = seen.lock().unwrap().iter().map(|s| s.0.clone()).collect();
    assert_eq!(bodies, (0..4).map(|i| format!("m{i}")).collect());

    // Write-only again while the consumer runs: both queues are taken
    // away; what is sent meanwhile waits for the next change.
    admin
        .create_topic("inbox", 2, txmq::PERM_WRITE, None)
        .await
        .unwrap();
    wait_until("the queues taken away", Duration::from_secs(5), || {
        inbox(&consumer) == 0
    })
    .await;
    // And `group show` lists them with no owner.
    let (_, queues) = owners(&ns, "g").await;
    let inbox_owners: Vec<_> = queues
        .iter()
        .filter(|((_, t, _), _)| t == "inbox")
        .map(|(_, o)| o.clone())
        .collect();
    assert_eq!(inbox_owners, [None, None]);
    send_numbered(&producer, "inbox", "m", 4..6).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(seen.lock().unwrap().len(), 4);
    admin
        .create_topic("inbox", 2, txmq::PERM_READ_WRITE, None)
        .await
        .unwrap();
    wait_until(
        "the two messages sent meanwhile",
        Duration::from_secs(5),
        || seen.lock().unwrap().len() >= 6,
    )
    .await;
    assert_eq!(inbox(&consumer), 2);
    let (_, queues) = owners(&ns, "g").await;
    assert!(
        queues
            .iter()
            .filter(|((_, t, _), _)| t == "inbox")
            .all(|(_, o)| o.is_some()),
        "{queues:?}"
    );
    let bodies: BTreeSet<String> = seen.lock().unwrap().iter().map(|s| s.0.clone()).collect();
    assert_eq!(bodies, (0..6).map(|i| format!("m{i}")).collect());
    assert_eq!(seen.lock().unwrap().len(), 6, "nothing twice");
    consumer.shutdown().await.expect("final commits");
    producer.close().await.unwrap();
    admin.close().await.unwrap();
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcasting_members_each_get_everything() {
    let cluster = Cluster::start(FlushMode::Async).await;
    let ns = cluster.nameserver.clone();
    create_topic(&ns, "notices", 4).await;
    let producer = cluster.producer().await;
    send_numbered(&producer, "notices", "n", 0..40).await;
    let args = [
        "consume",
        "notices",
        "--group",
        "caches",
        "--broadcast",
        "--idle-timeout",
        "1500ms",
        "--output",
        "json",
    ];
    let (a, b) = tokio::join!(txmq(&ns, &args, None), txmq(&ns, &args, None));
    for out in [a, b] {
        let bodies: BTreeSet<String> = json_lines(&out.stdout)
            .iter()
            .map(|l| l["body"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(bodies.len(), 40, "{}", String::from_utf8_lossy(&out.stderr));
    }
    producer.close().await.unwrap();
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_offset_replays_a_stopped_group_and_refuses_a_running_one() {
    let cluster = Cluster::start(FlushMode::Async).await;
    let ns = cluster.nameserver.clone();
    create_topic(&ns, "audit", 2).await;
    let producer = cluster.producer().await;
    send_numbered(&producer, "audit", "a", 0..10).await;
    let consume = [
        "consume",
        "audit",
        "--group",
        "auditors",
        "--idle-timeout",
        "1s",
        "--output",
        "json",
    ];
    assert_eq!(
        json_lines(&txmq(&ns, &consume, None).await.stdout).len(),
        10
    );
    assert!(json_lines(&txmq(&ns, &consume, None).await.stdout).is_empty());

    // Listed with its lag, and reset to the start: everything again.
    let out = txmq(&ns, &["group", "list", "--output", "json"], None).await;
    let groups = json_lines(&out.stdout);
    assert!(
        groups.iter().any(|g| g["group"] == "auditors"),
        "{groups:?}"
    );
    let reset = [
        "group",
        "reset-offset",
        "auditors",
        "--topic",
        "audit",
        "--to",
        "first",
    ];
    let out = txmq(&ns, &reset, None).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stderr.is_empty(),
        "a known group, no note: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        json_lines(&txmq(&ns, &consume, None).await.stdout).len(),
        10
    );
    // A group no broker knows (a typo, say) gets its offsets, and a note.
    let typo = [
        "group",
        "reset-offset",
        "auditros",
        "--topic",
        "audit",
        "--to",
        "first",
    ];
    let out = txmq(&ns, &typo, None).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("note: no broker knew group \"auditros\"") && err.contains("group list"),
        "{err}"
    );
    let shown = txmq(&ns, &["group", "show", "auditros"], None).await;
    assert!(
        !String::from_utf8_lossy(&shown.stderr).contains("no broker knows"),
        "now it has offsets: {}",
        String::from_utf8_lossy(&shown.stderr)
    );

    // By time: only what was stored after the instant.
    let middle = txmq::now_millis();
    tokio::time::sleep(Duration::from_millis(20)).await;
    send_numbered(&producer, "audit", "a", 10..13).await;
    let middle = middle.to_string();
    let by_time = [
        "group",
        "reset-offset",
        "auditors",
        "--topic",
        "audit",
        "--to",
        middle.as_str(),
    ];
    assert!(txmq(&ns, &by_time, None).await.status.success());
    let again = json_lines(&txmq(&ns, &consume, None).await.stdout);
    let bodies: BTreeSet<&str> = again.iter().map(|l| l["body"].as_str().unwrap()).collect();
    assert_eq!(bodies, ["a10", "a11", "a12"].into());

    // A running group is refused.
    let seen: Seen = Arc::default();
    let running = recorder(&ns, "auditors", "audit", "*", &seen, false, REBALANCE).await;
    let out = txmq(&ns, &reset, None).await;
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("GROUP_ACTIVE") && err.contains("stop them"),
        "{err}"
    );
    // No queue moved: no empty table on stdout.
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let show = txmq(&ns, &["group", "show", "auditors"], None).await;
    let text = String::from_utf8_lossy(&show.stdout);
    assert!(
        text.contains("1 member(s)") && text.contains(running.client_id()),
        "{text}"
    );
    assert!(
        !String::from_utf8_lossy(&show.stderr).contains("subscribe differently"),
        "{}",
        String::from_utf8_lossy(&show.stderr)
    );
    // A second member subscribing to another tag: group show warns, since
    // the members share the queues and each skips what the other wants.
    let other = recorder(&ns, "auditors", "audit", "b", &seen, false, REBALANCE).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let show = txmq(&ns, &["group", "show", "auditors"], None).await;
        let err = String::from_utf8_lossy(&show.stderr).into_owned();
        if err.contains("subscribe differently") {
            assert!(
                err.contains("audit (*)")
                    && err.contains("audit (b)")
                    && err.contains("same subscriptions"),
                "{err}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "no warning: {err}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    other.shutdown().await.expect("final commits");
    running.shutdown().await.expect("final commits");
    producer.close().await.unwrap();
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_retries_and_at_most_once_does_not() {
    let mut cluster = Cluster::nameserver_only(Duration::from_secs(30)).await;
    cluster
        .add_broker("broker-a", |c| {
            c.retry_delays = vec![Duration::from_millis(200)]
        })
        .await;
    let ns = cluster.nameserver.clone();
    create_topic(&ns, "jobs", 1).await;
    // Panics on the first delivery, succeeds on the retry.
    let seen: Seen = Arc::default();
    let s = seen.clone();
    let retrying = PushConsumer::builder()
        .nameserver(&ns)
        .group("retrying")
        .subscribe("jobs", "*")
        .rebalance_interval(Duration::from_millis(300))
        .max_wait(Duration::from_millis(300))
        .route_refresh_interval(Duration::from_millis(300))
        .start(handler_fn(move |m: &ReceivedMessage| {
            let attempt = m.reconsume_times();
            s.lock()
                .unwrap()
                .push((body(m), attempt, Instant::now(), String::new()));
            assert!(attempt > 0, "handler bug on the first attempt");
            async { ConsumeResult::Success }
        }))
        .await
        .unwrap();
    let at_most_once: Seen = Arc::default();
    let s = at_most_once.clone();
    let dropping = PushConsumer::builder()
        .nameserver(&ns)
        .group("dropping")
        .subscribe("jobs", "*")
        .delivery_mode(txmq::DeliveryMode::AtMostOnce)
        .rebalance_interval(Duration::from_millis(300))
        .max_wait(Duration::from_millis(300))
        .route_refresh_interval(Duration::from_millis(300))
        .start(handler_fn(move |m: &ReceivedMessage| {
            s.lock()
                .unwrap()
                .push((body(m), m.reconsume_times(), Instant::now(), String::new()));
            async { ConsumeResult::retry_after(Duration::from_millis(100)) }
        }))
        .await
        .unwrap();
    let producer = cluster.producer().await;
    producer.send(Message::new("jobs", "j")).await.unwrap();
    // The retry of the panicked delivery comes after the broker's back-off.
    wait_until("the retry", Duration::from_secs(30), || {
        seen.lock().unwrap().len() >= 2
    })
    .await;
    let s = seen.lock().unwrap().clone();
    assert_eq!((s[0].1, s[1].1), (0, 1));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(at_most_once.lock().unwrap().len(), 1, "at most once");
    retrying.shutdown().await.expect("final commits");
    dropping.shutdown().await.expect("final commits");
    producer.close().await.unwrap();
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_without_heartbeats_expires_and_its_queues_move() {
    let (cluster, ns) = short_expiry_cluster("tasks", 4).await;
    let dir = tempfile::tempdir().unwrap();
    let consume = [
        "consume",
        "tasks",
        "--group",
        "g",
        "--commit-interval",
        "100ms",
        "--rebalance-interval",
        "300ms",
    ];
    let mut paused = ConsumeProcess::start(&ns, dir.path(), "paused", &consume);
    let mut live = ConsumeProcess::start(&ns, dir.path(), "live", &consume);
    wait_until_async(
        "two members own two queues each",
        Duration::from_secs(10),
        || {
            let ns = ns.clone();
            async move {
                let (members, queues) = owners(&ns, "g").await;
                let owned = queues
                    .iter()
                    .filter(|(k, o)| k.1 == "tasks" && o.is_some())
                    .count();
                members.len() == 2 && owned == 4
            }
        },
    )
    .await;
    paused.signal("STOP");
    let stopped_at = Instant::now();
    // Its connection stays open: only the missing heartbeats tell.
    wait_until_async("the paused member expires", Duration::from_secs(10), || {
        let ns = ns.clone();
        async move { owners(&ns, "g").await.0.len() == 1 }
    })
    .await;
    assert!(
        stopped_at.elapsed() >= Duration::from_millis(1200),
        "expired after {:?}, before the expiry",
        stopped_at.elapsed()
    );
    let producer = cluster.producer().await;
    send_numbered(&producer, "tasks", "t", 0..40).await;
    wait_until(
        "the live member consumes everything",
        Duration::from_secs(10),
        || live.lines().len() >= 40,
    )
    .await;
    paused.signal("CONT");
    paused.terminate();
    live.terminate();
    producer.close().await.unwrap();
    cluster.shutdown().await;
}

/// The group's committed offset of each queue of `topic`, and the queue's end.
async fn committed(ns: &str, group: &str, topic: &str) -> BTreeMap<u32, (Option<u64>, u64)> {
    let out = txmq(ns, &["group", "show", group, "--output", "json"], None).await;
    let mut offsets = BTreeMap::new();
    for s in json_lines(&out.stdout) {
        for q in s["queues"].as_array().into_iter().flatten() {
            if q["topic"] == topic {
                offsets.insert(
                    q["queue"].as_u64().unwrap() as u32,
                    (q["committed"].as_u64(), q["max_offset"].as_u64().unwrap()),
                );
            }
        }
    }
    offsets
}

/// A member paused past the broker's consumer expiry (a GC pause, a frozen
/// VM) while another member read its queues to the end never moves the
/// group's offset back when it resumes: its readers stopped there commit
/// nothing and start nothing they had buffered (it committed its old
/// positions once a queue came back to it, and the group handled a
/// thousand messages again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_paused_past_its_expiry_never_moves_the_offset_back() {
    let (cluster, ns) = short_expiry_cluster("slow", 2).await;
    let producer = cluster.producer().await;
    send_numbered(&producer, "slow", "s", 0..600).await;
    let dir = tempfile::tempdir().unwrap();
    let bench = |handle_time: &'static str, concurrency: &'static str| {
        [
            "bench",
            "consume",
            "slow",
            "--group",
            "g",
            "--duration",
            "60s",
            "--handle-time",
            handle_time,
            "--concurrency",
            concurrency,
        ]
    };
    let mut slow = ConsumeProcess::start(&ns, dir.path(), "slow", &bench("1s", "2"));
    wait_until_async(
        "the slow member owns both queues and handled some",
        Duration::from_secs(10),
        || {
            let ns = ns.clone();
            async move {
                let (_, queues) = owners(&ns, "g").await;
                queues
                    .iter()
                    .filter(|(k, o)| k.1 == "slow" && o.is_some())
                    .count()
                    == 2
                    && committed(&ns, "g", "slow")
                        .await
                        .values()
                        .any(|(c, _)| c.is_some_and(|c| c > 0))
            }
        },
    )
    .await;
    slow.signal("STOP");
    let mut fast = ConsumeProcess::start(&ns, dir.path(), "fast", &bench("0s", "64"));
    wait_until_async(
        "the fast member reads both queues to the end",
        Duration::from_secs(20),
        || {
            let ns = ns.clone();
            async move {
                committed(&ns, "g", "slow")
                    .await
                    .values()
                    .all(|(c, end)| *c == Some(*end))
            }
        },
    )
    .await;
    slow.signal("CONT");
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        let offsets = committed(&ns, "g", "slow").await;
        assert!(
            offsets.values().all(|(c, end)| *c == Some(*end)),
            "the group's offsets went back: {offsets:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    slow.terminate();
    fast.terminate();
    producer.close().await.unwrap();
    cluster.shutdown().await;
}

async fn wait_until_async<F, Fut>(what: &str, limit: Duration, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !done().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_consume_members_share_the_backlog() {
    let cluster = Cluster::start(FlushMode::Async).await;
    let ns = cluster.nameserver.clone();
    create_topic(&ns, "backlog", 4).await;
    let out = txmq(
        &ns,
        &["send", "backlog", "--body", "x", "--count", "2000"],
        None,
    )
    .await;
    assert!(out.status.success());
    let args = [
        "bench",
        "consume",
        "backlog",
        "--group",
        "b",
        "--consumers",
        "2",
        "--idle-timeout",
        "1s",
        "--output",
        "json",
    ];
    let out = txmq(&ns, &args, None).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = json_lines(&out.stdout);
    assert_eq!(report[0]["messages"], 2000, "{report:?}");
    cluster.shutdown().await;
}

/// Fencing: once a queue belongs to a member, another member's pulls and
/// commits of it are refused with QUEUE_NOT_OWNED, so a reader that missed
/// a rebalance stops instead of reading along or moving the offset back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_and_commits_of_a_queue_owned_by_another_member_are_refused() {
    use txmq_protocol::{
        CommitOffset, Heartbeat, Hello, PullRequest, QueueOwner, Role, Subscription,
        PROTOCOL_VERSION,
    };
    use txmq_remoting::{Connection, ConnectionConfig};
    let cluster = Cluster::start(FlushMode::Async).await;
    let ns = cluster.nameserver.clone();
    create_topic(&ns, "fenced", 2).await;
    let addr = cluster.brokers[0].local_addr().to_string();
    let hello = Hello {
        version: PROTOCOL_VERSION,
        role: Role::Consumer,
        client_id: "a".into(),
        group: Some("g".into()),
    };
    let conn = Connection::connect(&addr, hello, None, ConnectionConfig::default())
        .await
        .unwrap();
    let ok = conn
        .call(Heartbeat {
            group: "g".into(),
            client_id: "a".into(),
            subscriptions: vec![Subscription {
                topic: "fenced".into(),
                expression: "*".into(),
            }],
            broadcast: false,
            held: Vec::new(),
        })
        .await
        .unwrap();
    assert_eq!(ok.assigned.len(), 2, "the only member owns both queues");
    assert!(ok.expiry_ms > 0);
    let as_member = |id: &str| {
        Some(QueueOwner {
            group: "g".into(),
            client_id: id.into(),
        })
    };
    let pull = |id: &str| PullRequest {
        topic: "fenced".into(),
        queue: 0,
        offset: 0,
        max_messages: 1,
        max_wait_ms: 0,
        tag_filter: Vec::new(),
        owner: as_member(id),
        epoch: 0,
        after: None,
        browse: false,
    };
    conn.call(pull("a")).await.expect("the owner pulls");
    let e = conn.call(pull("b")).await.unwrap_err();
    let code = e.remote().map(|w| w.code);
    assert_eq!(code, Some(txmq::ErrorCode::QueueNotOwned), "{e}");
    let commit = |id: &str| CommitOffset {
        group: "g".into(),
        topic: "fenced".into(),
        queue: 1,
        offset: 0,
        owner: as_member(id),
        forward_only: false,
        topic_generation: None,
    };
    conn.call(commit("a")).await.expect("the owner commits");
    let e = conn.call(commit("b")).await.unwrap_err();
    assert_eq!(
        e.remote().map(|w| w.code),
        Some(txmq::ErrorCode::QueueNotOwned)
    );
    // Without an owner (a pull consumer, an operator) nothing is fenced.
    let mut anonymous = pull("b");
    anonymous.owner = None;
    conn.call(anonymous).await.expect("unfenced pull");
    conn.close();
    cluster.shutdown().await;
}

/// One message stuck in its handler holds the queue's committed offset
/// back: the consumer pulls no further than `max_span` offsets past it
/// (RocketMQ's `consumeConcurrentlyMaxSpan`), so a restart would not
/// deliver thousands again; once it finishes, everything is handled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_message_stops_the_pulls_past_the_span() {
    let cluster = Cluster::start(FlushMode::Async).await;
    let admin = cluster.admin().await;
    admin
        .create_topic("span", 1, txmq::PERM_READ_WRITE, None)
        .await
        .unwrap();
    let producer = cluster.producer().await;
    send_numbered(&producer, "span", "m", 0..400).await;

    let handled = Arc::new(Mutex::new(BTreeSet::new()));
    let release = Arc::new(tokio::sync::Notify::new());
    let consumer = {
        let (handled, release) = (handled.clone(), release.clone());
        PushConsumer::builder()
            .nameserver(&cluster.nameserver)
            .group("span-g")
            .subscribe("span", "*")
            .concurrency(64)
            .max_span(50)
            .rebalance_interval(Duration::from_millis(300))
            .commit_interval(Duration::from_millis(100))
            .max_wait(Duration::from_millis(300))
            .from(txmq::ConsumeFrom::First)
            .start(handler_fn(move |m: &ReceivedMessage| {
                let (b, handled, release) = (body(m), handled.clone(), release.clone());
                async move {
                    if b == "m0" {
                        release.notified().await;
                    }
                    handled.lock().unwrap().insert(b);
                    ConsumeResult::Success
                }
            }))
            .await
            .unwrap()
    };
    // Let it pull all it will while m0 is stuck.
    let mut last = usize::MAX;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = handled.lock().unwrap().len();
        if now == last && now > 0 {
            break;
        }
        last = now;
    }
    assert!(
        last < 50 + 32,
        "{last} messages handled past a stuck one with a span of 50"
    );
    release.notify_one();
    let deadline = Instant::now() + Duration::from_secs(15);
    while handled.lock().unwrap().len() < 400 {
        assert!(
            Instant::now() < deadline,
            "only {} of 400 handled after the stuck one finished",
            handled.lock().unwrap().len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    consumer.shutdown().await.unwrap();
    producer.close().await.unwrap();
    cluster.shutdown().await;
}

/// A member giving a queue up starts no handler on the messages of it that
/// it pulled and had not started: they go to the member taking the queue
/// over, and nothing is handled twice. (The holder used to work through
/// everything it had pulled, up to the drain timeout, and a handler cut off
/// by that timeout was handled again by the new owner.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_given_up_leaves_its_unstarted_messages_to_the_new_owner() {
    let cluster = Cluster::start(FlushMode::Async).await;
    let ns = cluster.nameserver.clone();
    create_topic(&ns, "handover", 2).await;
    let producer = cluster.producer().await;
    send_numbered(&producer, "handover", "h", 0..10).await;

    // (body, member) of every handler that started.
    let started: Arc<Mutex<Vec<(String, &'static str)>>> = Arc::default();
    let gate = Arc::new(tokio::sync::Notify::new());
    let member = |name: &'static str, concurrency: usize| {
        let (started, gate) = (started.clone(), gate.clone());
        PushConsumer::builder()
            .nameserver(&ns)
            .group("handover-g")
            .subscribe("handover", "*")
            .concurrency(concurrency)
            .rebalance_interval(REBALANCE)
            .commit_interval(Duration::from_millis(100))
            .max_wait(Duration::from_millis(500))
            .route_refresh_interval(Duration::from_millis(500))
            .start(handler_fn(move |m: &ReceivedMessage| {
                let first = {
                    let mut started = started.lock().unwrap();
                    started.push((body(m), name));
                    started.len() == 1
                };
                let gate = gate.clone();
                async move {
                    // The first handler of all holds the one member's only
                    // slot until the second member has joined.
                    if first {
                        gate.notified().await;
                    }
                    ConsumeResult::Success
                }
            }))
    };
    let first = member("first", 1).await.unwrap();
    wait_until("the first handler starts", Duration::from_secs(10), || {
        started.lock().unwrap().len() == 1
    })
    .await;
    // Its first heartbeat made, the second member's start returns; the
    // broker tells the first, which gives a queue up (the one it cannot let
    // go of before the gate opens, or the other).
    let second = member("second", 4).await.unwrap();
    // Given up at once, the other queue is the second member's as soon as
    // the first lets go of it; the gated one only after the gate opens: give
    // the first member a few rebalances for that one.
    let deadline = Instant::now() + REBALANCE * 10;
    while Instant::now() < deadline && !started.lock().unwrap().iter().any(|s| s.1 == "second") {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    gate.notify_one();
    wait_until("every message is handled", Duration::from_secs(20), || {
        started.lock().unwrap().len() >= 10
    })
    .await;
    tokio::time::sleep(REBALANCE * 2).await;
    let started = started.lock().unwrap().clone();
    let mut times: BTreeMap<&str, u32> = BTreeMap::new();
    for (b, _) in &started {
        *times.entry(b.as_str()).or_default() += 1;
    }
    assert!(
        times.len() == 10 && times.values().all(|n| *n == 1),
        "each message once: {started:?}"
    );
    // Five messages a queue: the one given up had at most one started.
    let by_second = started.iter().filter(|(_, m)| *m == "second").count();
    assert!(
        by_second >= 4,
        "the new owner handled {by_second}: {started:?}"
    );
    second.shutdown().await.unwrap();
    first.shutdown().await.unwrap();
    producer.close().await.unwrap();
    cluster.shutdown().await;
}

/// What a consumer read from a topic that was deleted since never moves
/// the group's offset in the topic made again under its name: a
/// PullConsumer still holding half a batch of the old topic handed it out
/// after the delete and committed the position after it (10) in the new
/// topic, past ten messages nobody had read, where a restarted consumer
/// of the group would have started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_of_a_deleted_topics_messages_never_lands_in_the_topic_made_again() {
    let cluster = Cluster::start(FlushMode::Async).await;
    let admin = cluster.admin().await;
    admin
        .create_topic("again", 1, txmq::PERM_READ_WRITE, None)
        .await
        .unwrap();
    let producer = cluster.producer().await;
    send_numbered(&producer, "again", "old", 0..10).await;
    let mut consumer = txmq::PullConsumer::builder()
        .nameserver(&cluster.nameserver)
        .group("g")
        .topic("again")
        .from(txmq::ConsumeFrom::First)
        .batch_size(10)
        .max_wait(Duration::from_millis(200))
        .build()
        .await
        .unwrap();
    // One pull brought all ten: five handed out, five kept for the next poll.
    let first = consumer
        .poll_at_most(5, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(first.len(), 5);
    admin.delete_topic("again", false, None).await.unwrap();
    admin
        .create_topic("again", 1, txmq::PERM_READ_WRITE, None)
        .await
        .unwrap();
    send_numbered(&producer, "again", "new", 0..20).await;
    let rest = consumer
        .poll_at_most(5, Duration::from_secs(10))
        .await
        .unwrap();
    let bodies: Vec<String> = rest.iter().map(body).collect();
    assert!(
        bodies.iter().all(|b| b.starts_with("old")),
        "the kept half of the old batch: {bodies:?}"
    );
    consumer
        .commit()
        .await
        .expect("not an error: nothing to commit");
    let committed: Vec<Option<u64>> = admin
        .group_state("g", None)
        .await
        .unwrap()
        .iter()
        .flat_map(|s| s.queues.iter())
        .filter(|q| q.topic == "again")
        .map(|q| q.committed)
        .collect();
    assert!(
        committed.iter().all(|c| c.unwrap_or(0) < 10),
        "the old topic's position is not the new one's: {committed:?}"
    );
    // The new topic is read whole.
    let mut new = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while new.len() < 20 && Instant::now() < deadline {
        for m in consumer.poll(Duration::from_millis(500)).await.unwrap() {
            let b = body(&m);
            if b.starts_with("new") {
                new.insert(b);
            }
        }
    }
    assert_eq!(new.len(), 20, "{new:?}");
    consumer.commit().await.unwrap();
    consumer.shutdown().await.unwrap();
    cluster.shutdown().await;
}

/// `consume --from last` reads, on a queue it meets after it started (here
/// the topic made on a second broker), every message stored there since
/// it started: it began such a queue at its end when it found it, so what
/// came meanwhile was skipped and committed past (lag 0, lost for the
/// group). Messages stored before it started are still not read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn from_last_reads_what_a_queue_met_later_stored_since_the_start() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut cluster = Cluster::nameserver_only(Duration::from_secs(30)).await;
    cluster.add_broker("broker-a", |_| {}).await;
    let ns = cluster.nameserver.clone();
    let run = |args: Vec<&'static str>| {
        let ns = ns.clone();
        async move {
            let out = txmq(&ns, &args, None).await;
            assert!(out.status.success(), "{args:?}: {out:?}");
            out
        }
    };
    run(vec![
        "topic", "create", "late", "--queues", "1", "--broker", "broker-a",
    ])
    .await;
    wait_for_route(&ns, "late", &["broker-a"]).await;
    run(vec!["send", "late", "--body", "old", "--count", "2"]).await;
    let consumer = ConsumeProcess::start(
        &ns,
        dir.path(),
        "from-last",
        &[
            "consume",
            "late",
            "--group",
            "g",
            "--from",
            "last",
            "--count",
            "12",
            "--idle-timeout",
            "20s",
            "--route-refresh",
            "300ms",
            "--rebalance-interval",
            "300ms",
        ],
    );
    // The member has its queue on broker-a: it started.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, owned) = owners(&ns, "g").await;
        if owned.values().any(Option::is_some) {
            break;
        }
        assert!(Instant::now() < deadline, "the consumer never joined");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Paused, it meets broker-b only after the sends below.
    consumer.signal("STOP");
    cluster.add_broker("broker-b", |_| {}).await;
    run(vec![
        "topic", "create", "late", "--queues", "1", "--broker", "broker-b",
    ])
    .await;
    wait_for_route(&ns, "late", &["broker-a", "broker-b"]).await;
    let sent = run(vec![
        "--output", "json", "send", "late", "--body", "new", "--count", "12",
    ])
    .await;
    let on_b = json_lines(&sent.stdout)
        .iter()
        .filter(|l| l["broker"] == "broker-b")
        .count();
    assert!(on_b > 0, "some sends went to broker-b");
    consumer.signal("CONT");
    let deadline = Instant::now() + Duration::from_secs(20);
    while consumer.lines().len() < 12 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let bodies: Vec<String> = consumer
        .lines()
        .iter()
        .map(|l| l["body"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(
        bodies.len(),
        12,
        "every new message, {on_b} of them on broker-b: {bodies:?}"
    );
    assert!(bodies.iter().all(|b| b == "new"), "{bodies:?}");
    drop(consumer);
    cluster.shutdown().await;
}
