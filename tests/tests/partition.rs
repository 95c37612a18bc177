//! A consumer cut off from its broker (a firewall that drops its packets:
//! no close on either side) while it still holds a backlog of an ordered
//! queue: the broker expires it and gives the queue to another member, and
//! the cut-off member must have stopped handling by then, or the queue is
//! handled in two places at once.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use txmq::{handler_fn, ConsumeResult, Message, Producer, PushConsumer, ReceivedMessage};
use txmq_tests::proxy::Proxy;
use txmq_tests::{wait_for_broker, BrokerProcess, Cluster};

/// (member, queue offset, start, end) of every handling.
type Handled = Arc<Mutex<Vec<(String, u64, Instant, Instant)>>>;

async fn member(ns: &str, id: &str, handled: &Handled) -> PushConsumer {
    let handled = handled.clone();
    let me = id.to_string();
    PushConsumer::builder()
        .nameserver(ns)
        .client_id(id)
        .group("partitioned")
        .subscribe("part", "*")
        .orderly(true)
        .rebalance_interval(Duration::from_millis(300))
        .commit_interval(Duration::from_millis(100))
        .max_wait(Duration::from_millis(300))
        .request_timeout(Duration::from_millis(500))
        .start(handler_fn(move |m: &ReceivedMessage| {
            let (handled, me, offset) = (handled.clone(), me.clone(), m.queue_offset());
            async move {
                let start = Instant::now();
                tokio::time::sleep(Duration::from_millis(150)).await;
                handled
                    .lock()
                    .unwrap()
                    .push((me, offset, start, Instant::now()));
                ConsumeResult::Success
            }
        }))
        .await
        .unwrap()
}

fn count(handled: &Handled, who: &str) -> usize {
    handled
        .lock()
        .unwrap()
        .iter()
        .filter(|h| h.0 == who)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_cut_off_from_its_broker_stops_before_its_queue_moves() {
    let cluster = Cluster::nameserver_only(Duration::from_secs(60)).await;
    let ns = cluster.nameserver.clone();
    let tmp = tempfile::tempdir().unwrap();
    let proxy = Proxy::bind().await.unwrap();
    let advertised = proxy.addr().to_string();
    let broker = tokio::task::block_in_place(|| {
        BrokerProcess::start(
            &tmp.path().join("a"),
            &ns,
            "broker-a",
            &["--advertise-addr", &advertised, "--consumer-expiry", "3s"],
        )
    });
    proxy.set_target(&broker.addr);
    wait_for_broker(&ns, "broker-a").await;
    let admin = txmq::Admin::connect([ns.as_str()]).await.unwrap();
    admin
        .create_topic("part", 1, txmq::PERM_READ_WRITE, None)
        .await
        .unwrap();
    let producer = Producer::builder().nameserver(&ns).build().await.unwrap();
    // A backlog of 45 s of handling on the one queue.
    for i in 0..300 {
        producer
            .send(Message::new("part", format!("m{i}")))
            .await
            .unwrap();
    }

    let handled: Handled = Arc::default();
    let a = member(&ns, "member-a", &handled).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while count(&handled, "member-a") < 10 {
        assert!(Instant::now() < deadline, "member-a handled nothing");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // member-a can no longer reach the broker, and nobody sees a close.
    proxy.black_hole("member-a");
    let b = member(&ns, "member-b", &handled).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while count(&handled, "member-b") < 10 {
        assert!(
            Instant::now() < deadline,
            "member-b never took the queue over"
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
    }

    let handled = handled.lock().unwrap().clone();
    let b_first = handled
        .iter()
        .filter(|h| h.0 == "member-b")
        .map(|h| h.2)
        .min()
        .unwrap();
    let a_after: Vec<u64> = handled
        .iter()
        .filter(|h| h.0 == "member-a" && h.3 > b_first)
        .map(|h| h.1)
        .collect();
    eprintln!(
        "member-a handled {} messages, member-b {}; member-a still handled {} after member-b started",
        handled.iter().filter(|h| h.0 == "member-a").count(),
        handled.iter().filter(|h| h.0 == "member-b").count(),
        a_after.len()
    );
    assert!(
        a_after.is_empty(),
        "the cut-off member-a went on handling the queue after member-b took it: offsets {a_after:?}"
    );

    proxy.heal();
    b.shutdown().await.unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(10), a.shutdown()).await;
    producer.close().await.unwrap();
    admin.close().await.unwrap();
    drop(broker);
    cluster.shutdown().await;
}
