//! Closing a client handle (issue 21): `close().await` lets the work in
//! flight finish, refuses new work with `Error::Closed`, and reports work
//! it had to cut off, against a real broker process.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{body_text, create_topic};
use tokio::sync::Notify;
use txmq::{
    BoxError, CheckRequest, Error, Message, Producer, TransactionListener, TransactionProducer,
    TransactionState, TxContext,
};
use txmq_tests::proxy::Proxy;
use txmq_tests::{consume_all, wait_for_broker, BrokerProcess, Cluster};

/// A nameserver in this process and one broker process, `broker-a`,
/// reached through `proxy` when one is given.
async fn cluster(
    topic: &str,
    proxy: Option<&Proxy>,
) -> (Cluster, BrokerProcess, tempfile::TempDir) {
    let cluster = Cluster::nameserver_only(Duration::from_secs(30)).await;
    let tmp = tempfile::tempdir().unwrap();
    let advertised = proxy.map(|p| p.addr().to_string());
    let extra: Vec<&str> = match &advertised {
        Some(a) => vec!["--advertise-addr", a],
        None => vec![],
    };
    let broker = tokio::task::block_in_place(|| {
        BrokerProcess::start(
            &tmp.path().join("broker-a"),
            &cluster.nameserver,
            "broker-a",
            &extra,
        )
    });
    if let Some(p) = proxy {
        p.set_target(&broker.addr);
    }
    wait_for_broker(&cluster.nameserver, "broker-a").await;
    create_topic(&cluster.nameserver, topic, 2).await;
    (cluster, broker, tmp)
}

/// The bodies a new group reads from `topic`, waiting for `want` of them.
async fn bodies_of(cluster: &Cluster, topic: &str, want: usize) -> Vec<String> {
    let got = consume_all(
        &cluster.nameserver,
        "readers",
        topic,
        want,
        Duration::from_secs(2),
    )
    .await;
    got.iter().map(body_text).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_a_producer_lets_its_sends_in_flight_finish_and_refuses_later_ones() {
    const TOPIC: &str = "closing-sends";
    let proxy = Proxy::bind().await.unwrap();
    let (cluster, _broker, _tmp) = cluster(TOPIC, Some(&proxy)).await;
    let producer = Producer::builder()
        .nameserver(&cluster.nameserver)
        .build()
        .await
        .unwrap();
    producer.send(Message::new(TOPIC, "before")).await.unwrap();

    // Every byte to and from the broker now takes 300 ms: the send's
    // answer cannot arrive before 600 ms from here.
    proxy.set_delay(Some((Duration::from_millis(300), Duration::ZERO)));
    let started = tokio::time::Instant::now();
    let sender = producer.clone();
    let in_flight =
        tokio::spawn(async move { sender.send(Message::new(TOPIC, "in flight")).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    producer.close().await.expect("nothing was cut off");
    // The send's task may still be returning on the other worker when
    // close returns, so the proof is the clock: close waited for the answer.
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(600),
        "close returned after {waited:?}, before the send in flight could finish"
    );
    let receipt = in_flight
        .await
        .unwrap()
        .expect("the send in flight was stored");
    assert_eq!(receipt.broker_name, "broker-a");

    // Closed for every clone, before anything is sent.
    match producer.send(Message::new(TOPIC, "after")).await {
        Err(Error::Closed(what)) => assert_eq!(what, "the producer"),
        other => panic!("a send after close must fail with Closed, got {other:?}"),
    }
    proxy.heal();
    let mut bodies = bodies_of(&cluster, TOPIC, 2).await;
    bodies.sort();
    assert_eq!(bodies, ["before", "in flight"]);
    // An admin closed answers nothing either, not even what the
    // nameservers know.
    let admin = cluster.admin().await;
    admin.close().await.unwrap();
    let after = [
        admin.list_topics().await.map(drop),
        admin.route(TOPIC).await.map(drop),
        admin.cluster().await.map(drop),
        admin.list_groups(None).await.map(drop),
        admin.topic_status(TOPIC, None).await.map(drop),
    ];
    for r in after {
        assert!(matches!(r, Err(Error::Closed("the admin client"))), "{r:?}");
    }
    cluster.shutdown().await;
}

/// Commits each local transaction once the test lets it go.
#[derive(Default)]
struct Gated {
    started: AtomicBool,
    go: Notify,
}

impl TransactionListener for Gated {
    async fn execute(&self, _: &Message, _: &TxContext) -> Result<TransactionState, BoxError> {
        self.started.store(true, Ordering::SeqCst);
        self.go.notified().await;
        Ok(TransactionState::Commit)
    }

    async fn check(&self, _: &CheckRequest) -> Result<TransactionState, BoxError> {
        Ok(TransactionState::Commit)
    }
}

async fn gated_producer(
    ns: &str,
    close_timeout: Duration,
) -> (TransactionProducer<Gated>, Arc<Gated>) {
    let listener = Arc::new(Gated::default());
    let producer = TransactionProducer::builder()
        .nameserver(ns)
        .group("closing-producers")
        .listener_arc(listener.clone())
        .close_timeout(close_timeout)
        .start()
        .await
        .unwrap();
    (producer, listener)
}

async fn until_started(listener: &Gated) {
    while !listener.started.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_a_transaction_producer_ends_its_transactions_in_flight_at_the_broker() {
    const TOPIC: &str = "closing-transactions";
    let (cluster, _broker, _tmp) = cluster(TOPIC, None).await;
    let (producer, listener) = gated_producer(&cluster.nameserver, Duration::from_secs(30)).await;

    let sender = producer.clone();
    let tx = tokio::spawn(async move {
        sender
            .send_in_transaction(Message::new(TOPIC, "order 42"))
            .await
    });
    until_started(&listener).await;
    let closer = producer.clone();
    let closing = tokio::spawn(async move { closer.close().await });
    // Once closing, the producer refuses new work at once...
    while !matches!(producer.refresh_brokers().await, Err(Error::Closed(_))) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    match producer
        .send_in_transaction(Message::new(TOPIC, "late"))
        .await
    {
        Err(Error::Closed(what)) => assert_eq!(what, "the transaction producer"),
        other => panic!("a transaction after close must fail with Closed, got {other:?}"),
    }
    // ...and waits for the local transaction still running.
    assert!(
        !closing.is_finished(),
        "close returned while a local transaction ran"
    );
    listener.go.notify_one();

    closing.await.unwrap().expect("nothing was cut off");
    let outcome = tx.await.unwrap().expect("the transaction ran");
    assert!(
        outcome.committed(),
        "the commit reached the broker before the connections closed: {outcome:?}"
    );
    let bodies = bodies_of(&cluster, TOPIC, 1).await;
    assert_eq!(
        bodies,
        ["order 42"],
        "committed once, and the refused one never prepared"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_that_times_out_says_how_much_it_cut_off() {
    const TOPIC: &str = "closing-cut-off";
    let (cluster, _broker, _tmp) = cluster(TOPIC, None).await;
    let (producer, listener) =
        gated_producer(&cluster.nameserver, Duration::from_millis(200)).await;
    let sender = producer.clone();
    let tx = tokio::spawn(async move {
        sender
            .send_in_transaction(Message::new(TOPIC, "stuck"))
            .await
    });
    until_started(&listener).await;
    match producer.close().await {
        Err(e @ Error::Unfinished { in_flight: 1, .. }) => {
            let text = e.to_string();
            assert!(
                text.contains("the transaction producer") && text.contains("1 call"),
                "{text}"
            );
        }
        other => panic!("close must report the transaction it cut off, got {other:?}"),
    }
    // The local transaction was not interrupted: it still returns its outcome.
    listener.go.notify_one();
    tx.await.unwrap().expect("the local transaction ran");
    cluster.shutdown().await;
}
