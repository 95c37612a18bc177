//! Routes as brokers come and go, with real `txmq-broker` processes: a
//! silent broker leaves the route after the expiry and returns when it
//! speaks again; a dead broker leaves at once and its traffic moves to the
//! broker that is left.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{body_text, start_broker};
use txmq::{
    Admin, BoxError, CheckRequest, Message, Producer, SendReceipt, SendStatus, TransactionListener,
    TransactionProducer, TransactionState, TxContext,
};
use txmq_tests::{consume_all, wait_for_broker, BrokerProcess, Cluster};

/// Whether the nameserver lists `broker` in the route of `topic` and in the
/// cluster. `None` when the two disagree (a moment of change).
async fn listed(admin: &Admin, topic: &str, broker: &str) -> Option<bool> {
    let in_route = match admin.route(topic).await {
        Ok(route) => route.brokers.iter().any(|b| b.broker_name == broker),
        Err(txmq::Error::NoRoute { .. }) => false,
        Err(e) => panic!("route of {topic}: {e}"),
    };
    let in_cluster = admin
        .cluster()
        .await
        .expect("cluster")
        .iter()
        .any(|b| b.broker_name == broker);
    (in_route == in_cluster).then_some(in_route)
}

/// Polls until `broker` is listed (or not, per `want`) in both the route of
/// `topic` and the cluster; returns how long that took from `since`.
async fn wait_listed(
    admin: &Admin,
    topic: &str,
    broker: &str,
    want: bool,
    since: Instant,
    limit: Duration,
) -> Duration {
    loop {
        if listed(admin, topic, broker).await == Some(want) {
            return since.elapsed();
        }
        assert!(
            since.elapsed() < limit,
            "{broker} still {} after {limit:?}",
            if want { "absent" } else { "listed" }
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_stops_heartbeating_leaves_the_route_after_the_expiry() {
    let expiry = Duration::from_millis(1500);
    let cluster = Cluster::nameserver_only(expiry).await;
    let ns = cluster.nameserver.clone();
    let tmp = tempfile::tempdir().unwrap();
    // The harness starts brokers with `--heartbeat-interval 200ms`.
    let broker = start_broker(&tmp.path().join("broker-a"), &ns, "broker-a", &[]).await;
    let admin = cluster.admin().await;
    admin
        .create_topic("beats", 2, txmq::PERM_READ_WRITE, None)
        .await
        .unwrap();
    wait_listed(
        &admin,
        "beats",
        "broker-a",
        true,
        Instant::now(),
        Duration::from_secs(10),
    )
    .await;

    // Stopped, the broker keeps its connection open but sends nothing.
    broker.signal("STOP");
    let stopped = Instant::now();
    let gone_after = wait_listed(&admin, "beats", "broker-a", false, stopped, expiry * 4).await;
    assert!(
        gone_after >= expiry / 2,
        "dropped after {gone_after:?}, long before the {expiry:?} expiry"
    );

    broker.signal("CONT");
    let back_after = wait_listed(
        &admin,
        "beats",
        "broker-a",
        true,
        Instant::now(),
        Duration::from_secs(5),
    )
    .await;
    eprintln!("dropped {gone_after:?} after SIGSTOP, back {back_after:?} after SIGCONT");
    // The route it comes back with is the one it had.
    let route = admin.route("beats").await.unwrap();
    assert_eq!(route.brokers.len(), 1);
    assert_eq!(
        (route.brokers[0].addr.as_str(), route.brokers[0].queues),
        (broker.addr.as_str(), 2)
    );
    drop(broker);
    cluster.shutdown().await;
}

/// One send: when it started and how it ended.
struct Outcome {
    started: Instant,
    finished: Instant,
    result: Result<SendReceipt, String>,
    body: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_two_brokers_sends_go_on_to_the_other_when_one_dies() {
    // A long expiry: only the closed connection can remove the dead broker quickly.
    let cluster = Cluster::nameserver_only(Duration::from_secs(30)).await;
    let ns = cluster.nameserver.clone();
    let tmp = tempfile::tempdir().unwrap();
    let (mut a, b) = tokio::task::block_in_place(|| {
        (
            BrokerProcess::start(&tmp.path().join("broker-a"), &ns, "broker-a", &[]),
            BrokerProcess::start(&tmp.path().join("broker-b"), &ns, "broker-b", &[]),
        )
    });
    wait_for_broker(&ns, "broker-a").await;
    wait_for_broker(&ns, "broker-b").await;
    let admin = cluster.admin().await;
    let created = admin
        .create_topic("failover", 2, txmq::PERM_READ_WRITE, None)
        .await
        .unwrap();
    assert_eq!(created.len(), 2, "created on both brokers");
    for name in ["broker-a", "broker-b"] {
        wait_listed(
            &admin,
            "failover",
            name,
            true,
            Instant::now(),
            Duration::from_secs(10),
        )
        .await;
    }

    let producer = Producer::builder()
        .nameserver(&ns)
        .send_timeout(Duration::from_secs(1))
        .retries(2)
        .build()
        .await
        .unwrap();
    let outcomes: Arc<Mutex<Vec<Outcome>>> = Arc::default();
    let stop = tokio_util::sync::CancellationToken::new();
    let mut senders = tokio::task::JoinSet::new();
    for s in 0..4 {
        let (p, outcomes, stop) = (producer.clone(), outcomes.clone(), stop.clone());
        senders.spawn(async move {
            let mut n = 0;
            while !stop.is_cancelled() {
                let body = format!("s{s}-{n}");
                n += 1;
                let started = Instant::now();
                let result = p
                    .send(Message::new("failover", body.clone()))
                    .await
                    .map_err(|e| e.to_string());
                let failed = result.is_err();
                outcomes.lock().unwrap().push(Outcome {
                    started,
                    finished: Instant::now(),
                    result,
                    body,
                });
                if failed {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        });
    }
    let acked_on = |outcomes: &[Outcome], broker: &str| {
        outcomes
            .iter()
            .filter(|o| o.result.as_ref().is_ok_and(|r| r.broker_name == broker))
            .count()
    };
    // Both brokers take messages before the kill.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (on_a, on_b) = {
            let o = outcomes.lock().unwrap();
            (acked_on(&o, "broker-a"), acked_on(&o, "broker-b"))
        };
        if on_a >= 50 && on_b >= 50 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "sends before the kill: {on_a} on a, {on_b} on b"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    tokio::task::block_in_place(|| a.kill9());
    // No send that starts from now on can reach broker-a.
    let killed = Instant::now();
    let gone_after = wait_listed(
        &admin,
        "failover",
        "broker-a",
        false,
        killed,
        Duration::from_secs(2),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1500).saturating_sub(killed.elapsed())).await;
    stop.cancel();
    while let Some(r) = senders.join_next().await {
        r.unwrap();
    }
    let outcomes = std::mem::take(&mut *outcomes.lock().unwrap());

    let after: Vec<&Outcome> = outcomes.iter().filter(|o| o.started >= killed).collect();
    let first_ok = after
        .iter()
        .filter(|o| o.result.is_ok())
        .map(|o| o.finished - killed)
        .min()
        .expect("a send succeeded after the kill");
    let acked_after: Vec<&SendReceipt> = after
        .iter()
        .filter_map(|o| o.result.as_ref().ok())
        .collect();
    assert!(
        acked_after.len() >= 20,
        "only {} sends succeeded after the kill",
        acked_after.len()
    );
    assert!(
        acked_after.iter().all(|r| r.broker_name == "broker-b"),
        "sends after the kill landed on broker-b only"
    );
    let late_failures: Vec<&String> = after
        .iter()
        .filter(|o| o.started >= killed + Duration::from_millis(500))
        .filter_map(|o| o.result.as_ref().err())
        .collect();
    assert!(
        late_failures.is_empty(),
        "sends still failing 500 ms after the kill: {late_failures:?}"
    );
    assert!(
        first_ok < Duration::from_secs(1),
        "first send after the kill acknowledged after {first_ok:?}"
    );
    eprintln!(
        "broker-a left the route {gone_after:?} after the kill; first send on broker-b after {first_ok:?}; \
         {} sends after the kill, {} acknowledged",
        after.len(),
        acked_after.len()
    );

    // Everything broker-b acknowledged can be read, once, where it was stored.
    let on_b: HashMap<&str, &SendReceipt> = outcomes
        .iter()
        .filter_map(|o| o.result.as_ref().ok().map(|r| (o.body.as_str(), r)))
        .filter(|(_, r)| r.broker_name == "broker-b")
        .collect();
    assert!(on_b.values().all(|r| r.status == SendStatus::SendOk));
    let got = consume_all(&ns, "check", "failover", usize::MAX, Duration::from_secs(1)).await;
    let mut seen: HashMap<String, (String, u32, u64)> = HashMap::new();
    for m in &got {
        let body = body_text(m);
        let at = (m.broker_name.clone(), m.queue(), m.queue_offset());
        assert!(
            seen.insert(body.clone(), at).is_none(),
            "{body} consumed twice"
        );
    }
    for (body, r) in &on_b {
        assert_eq!(
            seen.get(*body),
            Some(&(r.broker_name.clone(), r.queue, r.queue_offset)),
            "{body}, acknowledged by broker-b, is consumed where it was stored"
        );
    }
    drop((a, b));
    cluster.shutdown().await;
}

/// Commits every transaction, counting the local transactions run.
#[derive(Default)]
struct Commits {
    executed: AtomicUsize,
}

impl TransactionListener for Commits {
    async fn execute(&self, _: &Message, _: &TxContext) -> Result<TransactionState, BoxError> {
        self.executed.fetch_add(1, Ordering::SeqCst);
        Ok(TransactionState::Commit)
    }

    async fn check(&self, _: &CheckRequest) -> Result<TransactionState, BoxError> {
        Ok(TransactionState::Commit)
    }
}

/// An ordered send picks its key's queue among the topic's queues, so it
/// never goes by the provisional route a producer uses for a topic the
/// nameservers do not know (queue 0 of every broker): neither while the
/// topic's only broker is away (there it would have landed on another
/// broker, which auto-creates the topic, and a consumer could read the
/// key's later messages before its earlier ones), nor for a topic never
/// created. Both fail with `NoRoute` and store nothing; once the broker is
/// back, the key's messages go on in its queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ordered_send_without_a_route_fails_instead_of_moving_its_key() {
    let cluster = Cluster::nameserver_only(Duration::from_secs(30)).await;
    let ns = cluster.nameserver.clone();
    let tmp = tempfile::tempdir().unwrap();
    let (a, mut b) = tokio::task::block_in_place(|| {
        (
            BrokerProcess::start(&tmp.path().join("broker-a"), &ns, "broker-a", &[]),
            BrokerProcess::start(&tmp.path().join("broker-b"), &ns, "broker-b", &[]),
        )
    });
    wait_for_broker(&ns, "broker-a").await;
    wait_for_broker(&ns, "broker-b").await;
    let admin = cluster.admin().await;
    admin
        .create_topic("keyed", 4, txmq::PERM_READ_WRITE, Some("broker-b"))
        .await
        .unwrap();
    // Until broker-b is listed in the topic's route and the cluster (or not).
    let listed = |want| {
        wait_listed(
            &admin,
            "keyed",
            "broker-b",
            want,
            Instant::now(),
            Duration::from_secs(10),
        )
    };
    listed(true).await;
    let producer = Producer::builder()
        .nameserver(&ns)
        .route_refresh_interval(Duration::from_millis(100))
        .build()
        .await
        .unwrap();
    let send = |body: &str| producer.send_ordered(Message::new("keyed", body.to_string()), "k");
    let first = send("k-1").await.unwrap();
    assert_eq!(first.broker_name, "broker-b");

    // broker-b dies: it leaves the route at once (its connection closed),
    // and the nameservers know no route of the topic.
    tokio::task::block_in_place(|| b.kill9());
    listed(false).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    for _ in 0..3 {
        let away = send("k-away").await;
        assert!(
            matches!(away, Err(txmq::Error::NoRoute { ref topic }) if topic == "keyed"),
            "an ordered send while the topic's broker is away: {away:?}"
        );
    }
    let never = producer
        .send_ordered(Message::new("never-created", "x"), "k")
        .await;
    assert!(
        matches!(never, Err(txmq::Error::NoRoute { .. })),
        "an ordered send to a topic never created: {never:?}"
    );
    // The same for a transaction's half message placed by a key: no
    // prepare is sent, so the local transaction never runs.
    let tx = TransactionProducer::builder()
        .nameserver(&ns)
        .group("keyed-pg")
        .listener(Commits::default())
        .route_refresh_interval(Duration::from_millis(100))
        .start()
        .await
        .unwrap();
    for topic in ["keyed", "never-created"] {
        let prepared = tx
            .send_in_transaction_ordered(Message::new(topic, "tx"), "k")
            .await;
        assert!(
            matches!(prepared, Err(txmq::Error::NoRoute { .. })),
            "an ordered transaction on {topic}: {prepared:?}"
        );
    }
    assert_eq!(tx.listener().executed.load(Ordering::SeqCst), 0);
    tx.close().await.unwrap();
    for topic in ["keyed", "never-created"] {
        let route = admin.route(topic).await;
        assert!(
            matches!(route, Err(txmq::Error::NoRoute { .. })),
            "broker-a created {topic}: {route:?}"
        );
    }

    tokio::task::block_in_place(|| b.restart());
    listed(true).await;
    // The producer keeps the provisional route it was answered with for
    // up to the route refresh interval (100 ms here; 1 s at most).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let second = send("k-2").await.unwrap();
    assert_eq!(
        (
            second.broker_name.as_str(),
            second.queue,
            second.queue_offset
        ),
        (
            first.broker_name.as_str(),
            first.queue,
            first.queue_offset + 1
        ),
        "the key's next message follows its first one in its queue"
    );
    let got = consume_all(&ns, "check", "keyed", 2, Duration::from_secs(1)).await;
    let bodies: Vec<String> = got.iter().map(body_text).collect();
    assert_eq!(bodies, ["k-1", "k-2"]);
    producer.close().await.unwrap();
    drop((a, b));
    cluster.shutdown().await;
}
