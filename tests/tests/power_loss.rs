//! Power cuts under the real `txmq-broker` process: its data directory is
//! on [`LazyFs`], a filesystem that keeps writes in a volatile cache until
//! they are fsynced; a power cut is `kill -9`, then everything not fsynced
//! is dropped (the last unsynced write of each file torn at a random byte),
//! then a restart.
//!
//! The tests take a lock so that they run one at a time: each one is a
//! cluster of processes, and two at once overload a small machine.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{create_topic, jitter, start_broker, wait_for_route};
use txmq::{Message, Producer, SendStatus};
use txmq_tests::chaos::{default_out_dir, ChaosConfig, Fault};
use txmq_tests::lazyfs::LazyFs;
use txmq_tests::{consume_all, json_lines, txmq_cli, wait_for_broker, BrokerProcess, Cluster};

/// Asserts that every body of `wanted` was consumed (in `got`) and that
/// nothing was consumed twice; returns how often each body was consumed.
fn assert_each_once(got: &[txmq::ReceivedMessage], wanted: &[String]) -> HashMap<String, usize> {
    let mut counts: HashMap<String, usize> = HashMap::new();
    for m in got {
        *counts
            .entry(String::from_utf8_lossy(m.body()).into_owned())
            .or_default() += 1;
    }
    let lost: Vec<&String> = wanted.iter().filter(|b| !counts.contains_key(*b)).collect();
    assert!(
        lost.is_empty(),
        "{} messages lost, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    let twice: Vec<(&String, &usize)> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "consumed more than once: {twice:?}");
    counts
}

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Mounts the lazy filesystem at `tmp/broker-a`, the broker's data
/// directory, so that its log (`tmp/broker-a.log`) stays off the mount and
/// tells what happened after a cut.
fn mount_data_dir(tmp: &std::path::Path) -> (LazyFs, std::path::PathBuf) {
    let data = tmp.join("broker-a");
    std::fs::create_dir_all(&data).expect("create the mount point");
    (
        LazyFs::mount(&data).expect("mount the lazy filesystem"),
        data,
    )
}

/// `kill -9`, drop what was never fsynced (tearing the last unsynced write
/// with `seed`), restart, and wait until the broker routes `topic` again.
async fn power_cut(broker: &mut BrokerProcess, fs: &LazyFs, seed: u64, ns: &str, topic: &str) {
    tokio::task::block_in_place(|| {
        broker.kill9();
        fs.power_cut(Some(seed)).expect("power cut");
        broker.restart();
    });
    wait_for_broker(ns, "broker-a").await;
    wait_for_route(ns, topic, &["broker-a"]).await;
}

/// The defect under a true power cut: transactions prepared under
/// async flush (answered before they are durable) are lost with the cache,
/// and every later prepare must still get an id never handed out before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_ids_are_never_handed_out_twice_across_power_cuts() {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::nameserver_only(Duration::from_secs(30)).await;
    let ns = cluster.nameserver.clone();
    let tmp = tempfile::tempdir().unwrap();
    let (fs, data) = mount_data_dir(tmp.path());
    let mut broker = start_broker(&data, &ns, "broker-a", &["--transaction-timeout", "60s"]).await;
    create_topic(&ns, "tt", 1).await;

    let mut seen: HashMap<u64, String> = HashMap::new();
    for round in 0..5u64 {
        for group in ["g1", "g2"] {
            let out = tokio::task::block_in_place(|| {
                txmq_cli(
                    &ns,
                    &[
                        "--output",
                        "json",
                        "tx",
                        "send",
                        "tt",
                        "--group",
                        group,
                        "--body",
                        &format!("r{round}"),
                        "--local",
                        "unknown",
                    ],
                    None,
                )
            });
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let v = json_lines(&out.stdout).pop().expect("an outcome");
            let tx_id = v["tx_id"].as_u64().expect("tx_id");
            let what = format!("round {round} group {group}");
            if let Some(before) = seen.insert(tx_id, what.clone()) {
                panic!("tx id {tx_id} handed out twice: {before}, then {what}");
            }
        }
        power_cut(&mut broker, &fs, round, &ns, "tt").await;
    }
    // Every transaction the broker still holds is one of ours, under its id.
    let admin = txmq::Admin::connect([ns.as_str()]).await.unwrap();
    for list in admin.list_transactions(None).await.unwrap() {
        for t in list.transactions {
            assert!(
                seen.contains_key(&t.tx_id),
                "unknown pending transaction {t:?}"
            );
        }
    }
    admin.close().await.unwrap();
}

/// Producers send continuously to a sync-flush broker; the power is cut at
/// a random moment, 20 times. Every message acknowledged `SEND_OK` is
/// consumed exactly once, and nothing that was never sent appears.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_send_ok_message_survives_twenty_power_cuts_exactly_once() {
    let _serial = SERIAL.lock().await;
    const TOPIC: &str = "cut";
    let cluster = Cluster::nameserver_only(Duration::from_secs(30)).await;
    let ns = cluster.nameserver.clone();
    let tmp = tempfile::tempdir().unwrap();
    let (fs, data) = mount_data_dir(tmp.path());
    let mut broker = start_broker(&data, &ns, "broker-a", &["--flush", "sync"]).await;
    create_topic(&ns, TOPIC, 2).await;

    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut attempted = HashSet::new();
    for cut in 0..20u64 {
        // One attempt per message (no retries): a message is stored at most
        // once whatever the cut does to its reply.
        let producer = Producer::builder()
            .nameserver(&ns)
            .retries(0)
            .send_timeout(Duration::from_secs(2))
            .build()
            .await
            .expect("producer");
        let stop = Arc::new(AtomicBool::new(false));
        let mut senders = Vec::new();
        for p in 0..2 {
            let producer = producer.clone();
            let stop = stop.clone();
            let acked = acked.clone();
            senders.push(tokio::spawn(async move {
                let mut tried = Vec::new();
                for i in 0.. {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let body = format!("c{cut}-p{p}-{i}");
                    tried.push(body.clone());
                    match producer.send(Message::new(TOPIC, body.clone())).await {
                        Ok(r) if r.status == SendStatus::SendOk => acked.lock().unwrap().push(body),
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
                tried
            }));
        }
        tokio::time::sleep(jitter(
            Duration::from_millis(50),
            Duration::from_millis(300),
        ))
        .await;
        tokio::task::block_in_place(|| broker.kill9());
        stop.store(true, Ordering::Relaxed);
        for s in senders {
            attempted.extend(s.await.expect("sender"));
        }
        producer.close().await.unwrap();
        power_cut(&mut broker, &fs, cut, &ns, TOPIC).await;
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 100,
        "the workload sent little: {}",
        acked.len()
    );
    let got = consume_all(
        &ns,
        "reader",
        TOPIC,
        attempted.len() + 1,
        Duration::from_secs(3),
    )
    .await;
    let counts = assert_each_once(&got, &acked);
    let foreign: Vec<&String> = counts.keys().filter(|b| !attempted.contains(*b)).collect();
    assert!(foreign.is_empty(), "never sent, yet consumed: {foreign:?}");
    drop(broker);
}

/// The chaos harness with power cuts only, about twenty in a minute, each
/// of a random broker at a random moment: producers (sync flush), ordered
/// consumers committing offsets, and transactional producers whose local
/// transactions commit, roll back or stay unknown (resolved by check-back).
/// Every checker must pass: no acknowledged send lost, nothing duplicated
/// outside a fault's window or out of order, every acknowledged commit
/// visible once, no rolled-back message visible, no transaction left
/// prepared, none stored twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_power_cuts_under_the_chaos_workload_pass_every_checker() {
    let _serial = SERIAL.lock().await;
    let out = default_out_dir(
        Some(std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))),
        "chaos-power",
    );
    let mut config = ChaosConfig::new(Duration::from_secs(65), out);
    config.faults = vec![Fault::PowerCut];
    config.quiet = Duration::from_millis(1500);
    if let Some(seed) = std::env::var("TXMQ_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        config.seed = seed;
    }
    let report = txmq_tests::chaos::run(config).await;
    println!("{}", report.summary());
    let cuts = report.counts.faults.get("power-cut").copied().unwrap_or(0);
    assert!(cuts >= 15, "only {cuts} power cuts:\n{}", report.summary());
    assert!(report.passed(), "a checker failed:\n{}", report.summary());
}

/// A sync-flush broker on the lazy filesystem with `topic` (`queues`
/// queues) created, in a fresh nameserver cluster.
async fn broker_on_lazyfs(
    tmp: &std::path::Path,
    extra: &[&str],
    topic: &str,
    queues: u32,
) -> (Cluster, LazyFs, BrokerProcess) {
    let cluster = Cluster::nameserver_only(Duration::from_secs(30)).await;
    let (fs, data) = mount_data_dir(tmp);
    let mut args = vec!["--flush", "sync"];
    args.extend_from_slice(extra);
    let broker = start_broker(&data, &cluster.nameserver, "broker-a", &args).await;
    create_topic(&cluster.nameserver, topic, queues).await;
    (cluster, fs, broker)
}

/// Sends `bodies` one by one, each acknowledged `SEND_OK`.
async fn send_all(ns: &str, topic: &str, bodies: impl IntoIterator<Item = String>) {
    let producer = Producer::builder().nameserver(ns).build().await.unwrap();
    for body in bodies {
        let r = producer
            .send(Message::new(topic, body))
            .await
            .expect("send");
        assert_eq!(r.status, SendStatus::SendOk);
    }
    producer.close().await.unwrap();
}

/// A consumer group commits its offsets (acknowledged, sync flush), reads
/// on without committing, and the power goes: the group resumes at or
/// after every offset it committed, never before, and skips nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_never_resumes_before_an_acknowledged_commit_after_a_power_cut() {
    const TOPIC: &str = "offsets";
    let _serial = SERIAL.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    let (cluster, fs, mut broker) = broker_on_lazyfs(tmp.path(), &[], TOPIC, 2).await;
    let ns = cluster.nameserver.clone();
    send_all(&ns, TOPIC, (0..300).map(|i| format!("m{i}"))).await;

    let mut seen: HashSet<String> = HashSet::new();
    let mut previous: Option<HashMap<u32, u64>> = None;
    for round in 0..3u64 {
        let mut consumer = txmq::PullConsumer::builder()
            .nameserver(&ns)
            .group("cg")
            .topic(TOPIC)
            .build()
            .await
            .unwrap();
        // Where the group resumes: per queue, the first offset handed out.
        let mut first: HashMap<u32, u64> = HashMap::new();
        let mut committed: HashMap<u32, u64> = HashMap::new();
        let mut handled = 0;
        // At most 80 a round (60 committed, up to 20 more handed out), so
        // each of the 3 rounds finds its 60 among the 300.
        let deadline = Instant::now() + Duration::from_secs(20);
        while handled < 60 {
            assert!(
                Instant::now() < deadline,
                "round {round}: only {handled} messages came"
            );
            let batch = consumer
                .poll_at_most(60 - handled, Duration::from_millis(500))
                .await
                .unwrap();
            for m in batch {
                first.entry(m.queue()).or_insert(m.queue_offset());
                committed.insert(m.queue(), m.queue_offset() + 1);
                seen.insert(String::from_utf8_lossy(m.body()).into_owned());
                handled += 1;
            }
        }
        if let Some(prev) = previous.take() {
            for (q, at) in &first {
                let before = prev.get(q).copied().unwrap_or(0);
                assert!(*at >= before, "round {round}: queue {q} resumed at {at}, before the acknowledged commit of {before}");
            }
        }
        consumer.commit().await.expect("commit acknowledged");
        previous = Some(committed);
        // Read on past the commit; these are handed out again after the cut.
        let _ = consumer
            .poll_at_most(20, Duration::from_millis(300))
            .await
            .unwrap();
        drop(consumer);
        power_cut(&mut broker, &fs, round, &ns, TOPIC).await;
    }
    let rest = consume_all(&ns, "cg", TOPIC, 300, Duration::from_secs(2)).await;
    seen.extend(
        rest.iter()
            .map(|m| String::from_utf8_lossy(m.body()).into_owned()),
    );
    assert_eq!(seen.len(), 300, "the group skipped messages");
    drop(broker);
}

/// Delayed messages due before, during and after a power cut are each
/// delivered once, none lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_messages_crossing_power_cuts_are_delivered_once() {
    const TOPIC: &str = "later";
    let _serial = SERIAL.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    let (cluster, fs, mut broker) = broker_on_lazyfs(tmp.path(), &[], TOPIC, 2).await;
    let ns = cluster.nameserver.clone();
    let producer = Producer::builder().nameserver(&ns).build().await.unwrap();
    let mut sent = Vec::new();
    for round in 0..4u64 {
        for i in 0..50u64 {
            let body = format!("r{round}-{i}");
            // Spread over 0.2 s to 2.7 s: some due before the cut, some while
            // the broker is down, some after.
            let delay = Duration::from_millis(200 + i * 50);
            let r = producer
                .send(Message::new(TOPIC, body.clone()).with_delay(delay))
                .await
                .expect("send");
            assert_eq!(r.status, SendStatus::SendOk);
            sent.push(body);
        }
        tokio::time::sleep(jitter(
            Duration::from_millis(300),
            Duration::from_millis(1500),
        ))
        .await;
        power_cut(&mut broker, &fs, round, &ns, TOPIC).await;
    }
    producer.close().await.unwrap();
    let got = consume_all(&ns, "reader", TOPIC, sent.len() + 1, Duration::from_secs(5)).await;
    assert_each_once(&got, &sent);
    drop(broker);
}
