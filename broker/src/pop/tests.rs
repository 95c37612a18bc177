//! Pop through a real broker started in-process on port 0: receive,
//! acknowledge, redelivery with the attempt counted, stale handles, the
//! dead-letter topic, long polling, and a restart.

use std::sync::Arc;
use std::time::{Duration, Instant};

use txmq_protocol::{dlq_topic, ErrorCode, Message, PERM_READ_WRITE, PERM_WRITE};

use super::*;
use crate::{Broker, BrokerConfig, Run};

fn broker_config(dir: &std::path::Path) -> BrokerConfig {
    let mut config = BrokerConfig::new(dir);
    config.listen = "127.0.0.1:0".into();
    config.standalone = true;
    config.nameserver_listen = "127.0.0.1:0".into();
    config.nameservers = Vec::new();
    config.segment_size = 8 << 20;
    config
}

async fn start(dir: &std::path::Path) -> (Broker, Arc<BrokerInner>) {
    let broker = Broker::start(broker_config(dir)).await.unwrap();
    let Run::Single(inc) = &broker.run else {
        panic!("a single broker")
    };
    let inner = inc.inner.clone();
    (broker, inner)
}

fn request(max: u32, invisible: Duration, poll: Duration) -> ReceiveRequest {
    ReceiveRequest {
        group: "g".into(),
        topic: "orders".into(),
        queue: None,
        max_messages: max,
        invisible,
        poll,
        tags: Vec::new(),
        fifo: false,
        max_attempts: 16,
    }
}

async fn send(b: &BrokerInner, queue: u32, body: &str) {
    let m = Message::new("orders", body.as_bytes().to_vec());
    b.store.append("orders", queue, vec![m]).await.unwrap();
}

fn body(r: &Received) -> String {
    String::from_utf8(r.message.message.body.to_vec()).unwrap()
}

async fn setup(b: &BrokerInner) {
    crate::handler::topic::create_topic_now(b, "orders", 2, PERM_READ_WRITE, true).unwrap();
}

/// A write-only topic refuses a receive, from any of its queues or from
/// one, naming itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_only_topic_refuses_a_receive() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, b) = start(dir.path()).await;
    crate::handler::topic::create_topic_now(&b, "orders", 2, PERM_WRITE, true).unwrap();
    send(&b, 0, "a").await;
    for queue in [None, Some(0)] {
        let r = ReceiveRequest {
            queue,
            ..request(1, Duration::from_secs(1), Duration::ZERO)
        };
        let e = receive(&b, r).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::NoPermission, "{e}");
        assert!(e.message.contains("topic 'orders' is not readable"), "{e}");
    }
    broker.shutdown().await;
}

/// A long poll that waits while its topic becomes write only is refused
/// when it wakes, as a new receive would be; the message that woke it
/// stays for when the topic may be read again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_poll_is_refused_once_its_topic_became_write_only() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, b) = start(dir.path()).await;
    setup(&b).await;
    let waiting = tokio::spawn({
        let b = b.clone();
        async move {
            receive(
                &b,
                request(4, Duration::from_secs(30), Duration::from_secs(10)),
            )
            .await
        }
    });
    // Until the receive has looked at the queues (and waits).
    let deadline = Instant::now() + Duration::from_secs(5);
    while b.pop.looks.load(Ordering::Relaxed) == 0 {
        assert!(Instant::now() < deadline, "the receive never looked");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    crate::handler::topic::create_topic_now(&b, "orders", 2, PERM_WRITE, true).unwrap();
    let started = Instant::now();
    send(&b, 1, "kept").await;
    let e = waiting.await.unwrap().unwrap_err();
    assert_eq!(e.code, ErrorCode::NoPermission, "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "woken by the arrival"
    );
    crate::handler::topic::create_topic_now(&b, "orders", 2, PERM_READ_WRITE, true).unwrap();
    let got = receive(&b, request(4, Duration::from_secs(30), Duration::ZERO))
        .await
        .unwrap();
    assert_eq!(got.iter().map(body).collect::<Vec<_>>(), ["kept"]);
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn received_messages_come_back_after_their_invisible_time_until_acked() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, b) = start(dir.path()).await;
    setup(&b).await;
    send(&b, 0, "a").await;
    send(&b, 1, "b").await;
    let second = Duration::from_secs(1);
    let got = receive(&b, request(32, second, Duration::ZERO))
        .await
        .unwrap();
    let mut bodies: Vec<String> = got.iter().map(body).collect();
    bodies.sort();
    assert_eq!(bodies, ["a", "b"]);
    assert!(got.iter().all(|r| r.attempt == 1));
    let (acked, kept): (Vec<_>, Vec<_>) = got.into_iter().partition(|r| body(r) == "a");
    ack(&b, "g", "orders", &acked[0].handle).await.unwrap();
    let err = ack(&b, "g", "orders", &acked[0].handle).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidReceiptHandle, "{err}");
    assert_eq!(b.store.pop_stats(), (1, 2), "one in flight over two queues");
    // Hidden now: an empty answer.
    assert!(receive(&b, request(32, second, Duration::ZERO))
        .await
        .unwrap()
        .is_empty());
    // A long poll wakes when "b" becomes due again, before its 5 s.
    let started = Instant::now();
    let again = receive(&b, request(32, second, Duration::from_secs(5)))
        .await
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(again.iter().map(body).collect::<Vec<_>>(), ["b"]);
    assert_eq!(again[0].attempt, 2);
    assert!(again[0].invisible_until_ms >= kept[0].invisible_until_ms + 900);
    let err = ack(&b, "g", "orders", &kept[0].handle).await.unwrap_err();
    assert_eq!(
        err.code,
        ErrorCode::InvalidReceiptHandle,
        "superseded: {err}"
    );
    ack(&b, "g", "orders", &again[0].handle).await.unwrap();
    // Lag follows the acks.
    assert_eq!(b.store.committed_offset("g", "orders", 0), Some(1));
    assert_eq!(b.store.committed_offset("g", "orders", 1), Some(1));
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_poll_wakes_on_arrival() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, b) = start(dir.path()).await;
    setup(&b).await;
    let sender = b.clone();
    let started = Instant::now();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        send(&sender, 1, "late").await;
    });
    let got = receive(
        &b,
        request(4, Duration::from_secs(30), Duration::from_secs(10)),
    )
    .await
    .unwrap();
    let waited = started.elapsed();
    assert_eq!(got.iter().map(body).collect::<Vec<_>>(), ["late"]);
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    // Nothing comes: answered empty at the poll time.
    let started = Instant::now();
    let none = receive(
        &b,
        request(4, Duration::from_secs(30), Duration::from_millis(300)),
    )
    .await
    .unwrap();
    assert!(none.is_empty());
    assert!(started.elapsed() >= Duration::from_millis(290));
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn change_invisible_makes_the_old_handle_stale() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, b) = start(dir.path()).await;
    setup(&b).await;
    send(&b, 0, "x").await;
    let got = receive(&b, request(1, Duration::from_secs(1), Duration::ZERO))
        .await
        .unwrap();
    let changed = change_invisible(&b, "g", "orders", &got[0].handle, Duration::from_secs(60))
        .await
        .unwrap();
    assert_ne!(changed.handle, got[0].handle);
    assert_eq!((body(&changed), changed.attempt), ("x".to_string(), 1));
    assert!(changed.invisible_until_ms >= got[0].invisible_until_ms + 58_000);
    let err = ack(&b, "g", "orders", &got[0].handle).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidReceiptHandle);
    // Past the first deadline it stays hidden: the new one counts.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(
        receive(&b, request(1, Duration::from_secs(1), Duration::ZERO))
            .await
            .unwrap()
            .is_empty()
    );
    ack(&b, "g", "orders", &changed.handle).await.unwrap();
    // Bad input.
    for bad in [
        "",
        "p1-0-0",
        "p1-x-0-0",
        "p2-0-0-0",
        "p1-0-0-0-0",
        "p1-100000000-0-0",
    ] {
        let err = ack(&b, "g", "orders", bad).await.unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidReceiptHandle, "{bad:?}");
    }
    let err = change_invisible(
        &b,
        "g",
        "orders",
        &changed.handle,
        Duration::from_millis(10),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code, ErrorCode::BadArgument);
    for r in [
        ReceiveRequest {
            max_messages: 33,
            ..request(1, Duration::from_secs(1), Duration::ZERO)
        },
        ReceiveRequest {
            max_attempts: 0,
            ..request(1, Duration::from_secs(1), Duration::ZERO)
        },
        request(1, Duration::from_secs(13 * 3600), Duration::ZERO),
        request(1, Duration::from_secs(1), Duration::from_secs(31)),
    ] {
        let err = receive(&b, r).await.unwrap_err();
        assert_eq!(err.code, ErrorCode::BadArgument, "{err}");
    }
    let err = receive(
        &b,
        ReceiveRequest {
            topic: "nope".into(),
            ..request(1, Duration::from_secs(1), Duration::ZERO)
        },
    )
    .await
    .unwrap_err();
    assert_eq!(err.code, ErrorCode::UnknownTopic);
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_attempts_and_on_request_messages_go_to_the_dead_letter_topic() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, b) = start(dir.path()).await;
    setup(&b).await;
    send(&b, 0, "poison").await;
    send(&b, 1, "unwanted").await;
    let once = ReceiveRequest {
        max_attempts: 1,
        ..request(32, Duration::from_secs(1), Duration::ZERO)
    };
    let got = receive(&b, once.clone()).await.unwrap();
    assert_eq!(got.len(), 2);
    let unwanted = got.iter().find(|r| body(r) == "unwanted").unwrap();
    forward_to_dead_letters(&b, "g", "orders", &unwanted.handle, 1)
        .await
        .unwrap();
    let err = forward_to_dead_letters(&b, "g", "orders", &unwanted.handle, 1)
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidReceiptHandle);
    // "poison" is due again at attempt 2 > 1: dead-lettered, not delivered.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let none = receive(
        &b,
        ReceiveRequest {
            poll: Duration::from_millis(200),
            ..once
        },
    )
    .await
    .unwrap();
    assert!(none.is_empty());
    let dlq = dlq_topic("g");
    let letters = b.store.read(&dlq, 0, 0, 10, 1 << 20).unwrap().messages;
    let mut bodies: Vec<String> = letters
        .iter()
        .map(|m| String::from_utf8(m.message.body.to_vec()).unwrap())
        .collect();
    bodies.sort();
    assert_eq!(bodies, ["poison", "unwanted"]);
    assert_eq!(b.store.committed_offset("g", "orders", 0), Some(1));
    assert_eq!(b.store.committed_offset("g", "orders", 1), Some(1));
    broker.shutdown().await;
}

/// A dead letter says how many times the group was handed the message
/// (its reconsume times), as a push consumer's does: a pop consumer's
/// attempts were counted nowhere else, so every such letter said 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_counts_the_deliveries_it_had() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, b) = start(dir.path()).await;
    setup(&b).await;
    send(&b, 0, "poison").await;
    send(&b, 1, "unwanted").await;
    let twice = ReceiveRequest {
        max_attempts: 2,
        ..request(32, Duration::from_secs(1), Duration::from_millis(400))
    };
    // Two deliveries of each; "unwanted" is forwarded by the client at its
    // second, "poison" goes when its third attempt is due.
    for attempt in 1..=2 {
        let got = receive(&b, twice.clone()).await.unwrap();
        assert_eq!(got.len(), 2, "attempt {attempt}");
        if attempt == 2 {
            let u = got.iter().find(|r| body(r) == "unwanted").unwrap();
            forward_to_dead_letters(&b, "g", "orders", &u.handle, 2)
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    let none = receive(&b, twice.clone()).await.unwrap();
    assert!(none.is_empty(), "poison is dead-lettered, not delivered");
    let dlq = dlq_topic("g");
    let letters = b.store.read(&dlq, 0, 0, 10, 1 << 20).unwrap().messages;
    let times: std::collections::BTreeMap<String, String> = letters
        .iter()
        .map(|m| {
            (
                String::from_utf8(m.message.body.to_vec()).unwrap(),
                m.message.properties[txmq_protocol::PROPERTY_RECONSUME_TIMES].clone(),
            )
        })
        .collect();
    assert_eq!(
        times.get("poison").map(String::as_str),
        Some("2"),
        "{times:?}"
    );
    assert_eq!(
        times.get("unwanted").map(String::as_str),
        Some("2"),
        "{times:?}"
    );
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_broker_keeps_messages_hidden_and_acked_ones_gone() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, b) = start(dir.path()).await;
    setup(&b).await;
    for body in ["one", "two", "three"] {
        send(&b, 0, body).await;
    }
    let r = ReceiveRequest {
        queue: Some(0),
        ..request(32, Duration::from_secs(2), Duration::ZERO)
    };
    let got = receive(&b, r.clone()).await.unwrap();
    assert_eq!(got.len(), 3);
    ack(&b, "g", "orders", &got[1].handle).await.unwrap();
    drop(b);
    broker.shutdown().await;

    let (broker, b) = start(dir.path()).await;
    assert!(
        receive(&b, r.clone()).await.unwrap().is_empty(),
        "still hidden"
    );
    let again = receive(
        &b,
        ReceiveRequest {
            poll: Duration::from_secs(5),
            ..r
        },
    )
    .await
    .unwrap();
    assert_eq!(again.iter().map(body).collect::<Vec<_>>(), ["one", "three"]);
    assert!(again.iter().all(|m| m.attempt == 2));
    // The handles of the run before are stale.
    let err = ack(&b, "g", "orders", &got[0].handle).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidReceiptHandle);
    for m in &again {
        ack(&b, "g", "orders", &m.handle).await.unwrap();
    }
    assert_eq!(b.store.committed_offset("g", "orders", 0), Some(3));
    drop(b);
    broker.shutdown().await;
}

/// Four consumers of one group drain 10,000 messages: each is received
/// once (nothing is due again within the test) and the lag ends at zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_of_a_group_share_the_messages_once_each() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, b) = start(dir.path()).await;
    setup(&b).await;
    const N: usize = 10_000;
    for queue in 0..2u32 {
        let batch: Vec<Message> = (0..N / 2)
            .map(|i| Message::new("orders", format!("{queue}-{i}").into_bytes()))
            .collect();
        b.store.append("orders", queue, batch).await.unwrap();
    }
    let started = Instant::now();
    let consumers: Vec<_> = (0..4)
        .map(|_| {
            let b = b.clone();
            tokio::spawn(async move {
                let mut seen = Vec::new();
                loop {
                    let got = receive(&b, request(32, Duration::from_secs(60), Duration::ZERO))
                        .await
                        .unwrap();
                    if got.is_empty() {
                        return seen;
                    }
                    for m in got {
                        assert_eq!(m.attempt, 1);
                        ack(&b, "g", "orders", &m.handle).await.unwrap();
                        seen.push(body(&m));
                    }
                }
            })
        })
        .collect();
    let mut all = Vec::new();
    for c in consumers {
        all.extend(c.await.unwrap());
    }
    let elapsed = started.elapsed();
    println!(
        "{N} messages received and acked by 4 consumers in {elapsed:?} ({:.0}/s)",
        N as f64 / elapsed.as_secs_f64()
    );
    all.sort();
    all.dedup();
    assert_eq!(all.len(), N);
    for queue in 0..2 {
        assert_eq!(
            b.store.committed_offset("g", "orders", queue),
            Some((N / 2) as u64)
        );
    }
    drop(b);
    broker.shutdown().await;
}

/// A tag filter passes over many other messages in one receive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_filter_finds_a_message_behind_many_others() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, b) = start(dir.path()).await;
    setup(&b).await;
    let mut batch: Vec<Message> = (0..5000)
        .map(|_| Message::new("orders", &b"other"[..]).with_tag("b"))
        .collect();
    batch.push(Message::new("orders", &b"wanted"[..]).with_tag("a"));
    b.store.append("orders", 0, batch).await.unwrap();
    let r = ReceiveRequest {
        queue: Some(0),
        tags: vec![txmq_protocol::tag_hash(Some("a"))],
        ..request(32, Duration::from_secs(60), Duration::ZERO)
    };
    let got = receive(&b, r).await.unwrap();
    assert_eq!(got.iter().map(body).collect::<Vec<_>>(), ["wanted"]);
    assert_eq!(got[0].message.queue_offset, 5000);
    ack(&b, "g", "orders", &got[0].handle).await.unwrap();
    assert_eq!(b.store.committed_offset("g", "orders", 0), Some(5001));
    drop(b);
    broker.shutdown().await;
}

/// A slave broker replicating its master holds the same pop state (acked
/// messages stay acked after a failover to it) and takes no pop writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slave_broker_holds_the_masters_pop_state_and_refuses_pop_writes() {
    let mdir = tempfile::tempdir().unwrap();
    let sdir = tempfile::tempdir().unwrap();
    let (master, b) = start(mdir.path()).await;
    setup(&b).await;
    for body in ["one", "two", "three"] {
        send(&b, 0, body).await;
    }
    let r = ReceiveRequest {
        queue: Some(0),
        ..request(32, Duration::from_secs(60), Duration::ZERO)
    };
    let got = receive(&b, r.clone()).await.unwrap();
    assert_eq!(got.len(), 3);
    ack(&b, "g", "orders", &got[1].handle).await.unwrap();

    let mut config = broker_config(sdir.path());
    config.standalone = false;
    config.nameservers = vec![master.nameserver_addr().unwrap().to_string()];
    config.replication.role = txmq_protocol::BrokerRole::Slave;
    config.replication.master_addr = Some(master.local_addr().to_string());
    let slave = Broker::start(config).await.unwrap();
    let Run::Single(inc) = &slave.run else {
        panic!("a single broker")
    };
    let s = inc.inner.clone();
    let key = ("g".to_string(), "orders".to_string(), 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.store.log_end() < b.store.log_end() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(s.store.log_end(), b.store.log_end(), "replicated");
    assert_eq!(s.store.pop_queue(&key), b.store.pop_queue(&key));
    assert_eq!(s.store.committed_offset("g", "orders", 0), Some(0));
    let in_flight: Vec<u64> = s
        .store
        .pop_queue(&key)
        .unwrap()
        .in_flight
        .keys()
        .copied()
        .collect();
    assert_eq!(
        in_flight,
        [0, 2],
        "the acked one is not in flight on the slave"
    );
    let err = receive(&s, r).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::NotMaster, "{err}");
    let err = ack(&s, "g", "orders", &got[0].handle).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::NotMaster, "{err}");
    drop((b, s));
    slave.shutdown().await;
    master.shutdown().await;
}

/// A FIFO receive that finds its queue held waits for the hold to end
/// (the message in flight becoming due), not in a busy loop, and gets the
/// held message first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fifo_long_poll_waits_for_the_hold_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, b) = start(dir.path()).await;
    setup(&b).await;
    for body in ["first", "second", "third"] {
        send(&b, 0, body).await;
    }
    let fifo = ReceiveRequest {
        queue: Some(0),
        fifo: true,
        ..request(2, Duration::from_secs(1), Duration::ZERO)
    };
    let got = receive(&b, fifo.clone()).await.unwrap();
    assert_eq!(
        got.iter().map(body).collect::<Vec<_>>(),
        ["first", "second"]
    );
    // "first" stays due soon, "second" is held 2 s: the queue is held
    // while "second" is in flight, whatever "first" does.
    change_invisible(&b, "g", "orders", &got[1].handle, Duration::from_secs(2))
        .await
        .unwrap();
    let looks_before = b.pop.looks.load(std::sync::atomic::Ordering::Relaxed);
    let started = Instant::now();
    let again = receive(
        &b,
        ReceiveRequest {
            max_messages: 3,
            poll: Duration::from_secs(5),
            ..fifo
        },
    )
    .await
    .unwrap();
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(4),
        "{waited:?}"
    );
    assert_eq!(
        again
            .iter()
            .map(|m| (body(m), m.attempt))
            .collect::<Vec<_>>(),
        [
            ("first".to_string(), 2),
            ("second".to_string(), 2),
            ("third".to_string(), 1)
        ]
    );
    let looks = b.pop.looks.load(std::sync::atomic::Ordering::Relaxed) - looks_before;
    assert!(looks <= 4, "{looks} looks while held: a busy loop");
    drop(b);
    broker.shutdown().await;
}
