//! Clients against a broker process that is paused (SIGSTOP): its peers'
//! calls end at their timeouts, the dead connection is closed and opened
//! again once the broker is back, and a consumer's heartbeats to the
//! healthy brokers go on, so it keeps its queues there.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{start_broker, wait_for_route};
use futures_util::future::join_all;
use txmq::{handler_fn, ConsumeResult, Message, Producer, PushConsumer, ReceivedMessage};
use txmq_tests::Cluster;

/// A nameserver and one broker process (`broker-a`, data in the returned
/// directory) with `topic` of `queues` queues.
async fn one_broker_with_topic(
    topic: &str,
    queues: u32,
) -> (Cluster, tempfile::TempDir, txmq_tests::BrokerProcess) {
    let cluster = Cluster::nameserver_only(Duration::from_secs(30)).await;
    let tmp = tempfile::tempdir().unwrap();
    let broker = start_broker(&tmp.path().join("a"), &cluster.nameserver, "broker-a", &[]).await;
    common::create_topic(&cluster.nameserver, topic, queues).await;
    (cluster, tmp, broker)
}

/// 6000 sends of 16 KiB in flight to a paused broker fill the socket and
/// the client's queue: every one still ends near its timeout (before, the
/// ones waiting for room in the queue waited until the broker came back),
/// and once the broker is back a new send succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_to_a_paused_broker_end_at_their_timeout_and_recover() {
    let timeout = Duration::from_millis(800);
    let (cluster, _tmp, broker) = one_broker_with_topic("paused", 4).await;
    let producer = Producer::builder()
        .nameserver(&cluster.nameserver)
        .send_timeout(timeout)
        .retries(0)
        .build()
        .await
        .unwrap();
    producer
        .send(Message::new("paused", "before"))
        .await
        .unwrap();

    tokio::task::block_in_place(|| broker.signal("STOP"));
    let started = Instant::now();
    let body = vec![b'x'; 16 << 10];
    let sends = (0..6000).map(|_| producer.send(Message::new("paused", body.clone())));
    let outcomes = tokio::time::timeout(Duration::from_secs(20), join_all(sends)).await;
    let took = started.elapsed();
    tokio::task::block_in_place(|| broker.signal("CONT"));
    let outcomes = outcomes.expect("sends to a paused broker hung past their timeout");
    assert!(
        outcomes.iter().all(|o| o.is_err()),
        "a paused broker answered"
    );
    eprintln!("6000 sends to a paused broker all failed within {took:?}");
    assert!(took < Duration::from_secs(10), "took {took:?}");

    // Back: sends succeed again (over a new connection: the silent one was
    // closed after its timeouts).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match producer.send(Message::new("paused", "after")).await {
            Ok(_) => break,
            Err(e) => assert!(Instant::now() < deadline, "no send after SIGCONT: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    producer.close().await.unwrap();
    drop(broker);
    cluster.shutdown().await;
}

/// Sends waiting for a topic's route from a nameserver that does not
/// answer (it takes connections and never says hello back) share the
/// failed fetch: 20 of them fail together within their attempts' timeouts.
/// Before, each waiter fetched again in turn after the one before it had
/// timed out, so the last waited one timeout per send before it (`txmq
/// send` of 20 lines took a minute, and Ctrl-C waited for it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_waiting_for_a_route_from_a_silent_nameserver_fail_together() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let ns = silent.local_addr().unwrap().to_string();
    let timeout = Duration::from_millis(500);
    let producer = Producer::builder()
        .nameserver(&ns)
        .send_timeout(timeout)
        .build()
        .await
        .unwrap();
    let started = Instant::now();
    let sends = (0..20).map(|i| producer.send(Message::new("routeless", format!("m{i}"))));
    let outcomes = tokio::time::timeout(Duration::from_secs(60), join_all(sends))
        .await
        .expect("sends hung");
    let took = started.elapsed();
    for o in &outcomes {
        let e = o.as_ref().expect_err("a silent nameserver answered");
        assert!(
            txmq::error::chain(e).contains("timed out"),
            "{}",
            txmq::error::chain(e)
        );
    }
    eprintln!("20 sends failed within {took:?}");
    // Three attempts each (the default two retries): one after another
    // for each send, it took 20 times that.
    assert!(took < timeout * 12, "took {took:?}");
    producer.close().await.unwrap();
    drop(silent);
}

/// Sends of a new producer to a paused broker: they wait together for the
/// broker's producer id (the first stamped send there asks for one), and
/// fail together within their attempts' timeouts. Before, each waited for
/// the one before it to time out, then asked again itself: `txmq send` of
/// 20 lines with `--timeout 1s` took 49 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_waiting_for_a_producer_id_from_a_paused_broker_fail_together() {
    let timeout = Duration::from_millis(500);
    let (cluster, _tmp, broker) = one_broker_with_topic("idless", 2).await;
    let producer = Producer::builder()
        .nameserver(&cluster.nameserver)
        .send_timeout(timeout)
        .build()
        .await
        .unwrap();
    tokio::task::block_in_place(|| broker.signal("STOP"));
    let started = Instant::now();
    let sends = (0..20).map(|i| producer.send(Message::new("idless", format!("m{i}"))));
    let outcomes = tokio::time::timeout(Duration::from_secs(60), join_all(sends)).await;
    let took = started.elapsed();
    tokio::task::block_in_place(|| broker.signal("CONT"));
    let outcomes = outcomes.expect("sends hung");
    assert!(
        outcomes.iter().all(|o| o.is_err()),
        "a paused broker answered"
    );
    eprintln!("20 sends failed within {took:?}");
    // Three attempts each (the default two retries), with their pauses.
    assert!(took < timeout * 12, "took {took:?}");
    producer
        .send(Message::new("idless", "after"))
        .await
        .expect("a send once the broker is back");
    producer.close().await.unwrap();
    drop(broker);
    cluster.shutdown().await;
}

/// With the first of two nameservers silent (accepting, never answering):
/// a command pays its timeout once, not once per request (each client
/// object of the process, and `Admin`'s controller requests, try a
/// nameserver that did not answer last), and a topic the broker creates
/// on the way (a send's, a new group's retry topic) is answered once the
/// other nameserver has its route: the broker's registrations with the
/// silent one (each waiting out its timeout) hold up none with the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_nameserver_costs_a_command_one_timeout() {
    let cluster = Cluster::nameserver_only(Duration::from_secs(30)).await;
    let real = cluster.nameserver.clone();
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let both = format!("{},{real}", silent.local_addr().unwrap());
    let tmp = tempfile::tempdir().unwrap();
    let broker = tokio::task::block_in_place(|| {
        txmq_tests::BrokerProcess::start(&tmp.path().join("a"), &both, "broker-a", &[])
    });
    txmq_tests::wait_for_broker(&real, "broker-a").await;
    common::create_topic(&real, "both", 2).await;
    let timed = |args: &'static [&'static str]| {
        let both = both.clone();
        async move {
            let started = Instant::now();
            let mut all = vec!["--timeout", "2s"];
            all.extend_from_slice(args);
            let out = common::txmq(&both, &all, None).await;
            let took = started.elapsed();
            assert!(
                out.status.success(),
                "{args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            eprintln!("{args:?} took {took:?}");
            took
        }
    };
    for args in [
        &["cluster"][..],
        &["send", "both", "--body", "x"],
        &["send", "auto-made", "--body", "y"],
        &["consume", "both", "--group", "g", "--count", "1"],
        &["send", "auto-made-2", "--body", "z"],
        &["consume", "both", "--group", "g2", "--count", "1"],
    ] {
        let took = timed(args).await;
        // One --timeout and the command's own work; two timeouts (or one
        // and the broker's registration's 3 s) before.
        assert!(took < Duration::from_millis(3600), "{args:?} took {took:?}");
    }
    drop(broker);
    drop(silent);
    cluster.shutdown().await;
}

/// A send whose caller stops polling it while it fetches the topic's route
/// (a `select!` that went on with another branch) holds up no other send
/// of the topic: the fetch goes on by itself, and the next send takes its
/// route. Before, the first caller held the topic's fetch lock across its
/// fetch, and every later send of the topic waited for it to be polled
/// again or dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_left_unpolled_while_fetching_a_route_holds_up_no_other_send() {
    let cluster = Cluster::start(txmq_broker::FlushMode::Async).await;
    common::create_topic(&cluster.nameserver, "held", 2).await;
    let slow = txmq_tests::proxy::Proxy::bind().await.unwrap();
    slow.set_target(&cluster.nameserver);
    slow.set_delay(Some((Duration::from_millis(400), Duration::ZERO)));
    let producer = Producer::builder()
        .nameserver(&slow.addr().to_string())
        .send_timeout(Duration::from_secs(5))
        .build()
        .await
        .unwrap();
    let mut first = Box::pin(producer.send(Message::new("held", "first")));
    assert!(
        tokio::time::timeout(Duration::from_millis(100), &mut first)
            .await
            .is_err(),
        "the route came back before the first send was left"
    );
    // `first` is not polled from here on, until the end.
    slow.set_delay(None);
    let second = tokio::time::timeout(
        Duration::from_secs(4),
        producer.send(Message::new("held", "second")),
    )
    .await
    .expect("the second send waited for the unpolled first one")
    .expect("the second send");
    assert_eq!(second.topic, "held");
    first.await.expect("the first send, polled again");
    producer.close().await.unwrap();
    cluster.shutdown().await;
}

/// A consumer of a topic on two brokers, with the default 10 s request
/// timeout, while broker-b is paused for three of broker-a's consumer
/// expiries: broker-a keeps hearing from it, so it never expires there
/// and messages sent to broker-a meanwhile are handled at once. Before,
/// each heartbeat round waited the whole request timeout for broker-b.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_broker_does_not_expire_the_consumer_on_the_others() {
    let cluster = Cluster::nameserver_only(Duration::from_secs(60)).await;
    let ns = cluster.nameserver.clone();
    let tmp = tempfile::tempdir().unwrap();
    let expiry = ["--consumer-expiry", "2s"];
    let a = start_broker(&tmp.path().join("a"), &ns, "broker-a", &expiry).await;
    let b = start_broker(&tmp.path().join("b"), &ns, "broker-b", &expiry).await;
    let admin = txmq::Admin::connect([ns.as_str()]).await.unwrap();
    admin
        .create_topic("both", 2, txmq::PERM_READ_WRITE, None)
        .await
        .unwrap();
    wait_for_route(&ns, "both", &["broker-a", "broker-b"]).await;

    let seen: Arc<Mutex<Vec<(String, Instant)>>> = Arc::default();
    let seen2 = seen.clone();
    let consumer = PushConsumer::builder()
        .nameserver(&ns)
        .group("paused-peer")
        .subscribe("both", "*")
        .rebalance_interval(Duration::from_millis(300))
        .commit_interval(Duration::from_millis(100))
        .max_wait(Duration::from_millis(300))
        .start(handler_fn(move |m: &ReceivedMessage| {
            let body = String::from_utf8_lossy(m.body()).into_owned();
            seen2.lock().unwrap().push((body, Instant::now()));
            async { ConsumeResult::Success }
        }))
        .await
        .unwrap();
    let producer = Producer::builder().nameserver(&ns).build().await.unwrap();
    // Only broker-a takes these: the producer is told where to send.
    let to_a = |body: String| async {
        producer
            .send_to_queue(Message::new("both", body), "broker-a", 0)
            .await
            .unwrap()
    };
    to_a("warm".into()).await;
    wait_seen(&seen, "warm", Duration::from_secs(10)).await;

    tokio::task::block_in_place(|| b.signal("STOP"));
    let paused = Instant::now();
    let mut sent = Vec::new();
    let mut i = 0;
    while paused.elapsed() < Duration::from_secs(6) {
        let body = format!("m{i}");
        to_a(body.clone()).await;
        sent.push((body, Instant::now()));
        i += 1;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for (body, _) in &sent {
        wait_seen(&seen, body, Duration::from_secs(15)).await;
    }
    tokio::task::block_in_place(|| b.signal("CONT"));
    let seen = seen.lock().unwrap().clone();
    let worst = sent
        .iter()
        .map(|(body, at)| {
            let got = seen.iter().find(|(b, _)| b == body).unwrap().1;
            got.saturating_duration_since(*at)
        })
        .max()
        .unwrap();
    eprintln!("worst delay on broker-a while broker-b was paused: {worst:?}");
    let log = a.log_text();
    assert!(
        !log.contains("consumer expired"),
        "broker-a expired the consumer while broker-b was paused:\n{log}"
    );
    consumer.shutdown().await.unwrap();
    producer.close().await.unwrap();
    drop((a, b));
    cluster.shutdown().await;
}

async fn wait_seen(seen: &Arc<Mutex<Vec<(String, Instant)>>>, body: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    while !seen.lock().unwrap().iter().any(|(b, _)| b == body) {
        assert!(
            Instant::now() < deadline,
            "{body} not handled within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
