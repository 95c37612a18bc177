//! RocketMQ 5's gRPC API (`--grpc-listen`) driven by the official RocketMQ
//! clients (Python from PyPI, Node.js from npm, installed by `.ci/run`)
//! against a real `txmq-broker` process, with txmq's own CLI on the other
//! side; and bad input on the gRPC port from a raw tonic client.

mod common;

use std::time::Duration;

use common::{start_broker, txmq};
use serde_json::Value;
use txmq_broker::rocketmq_v2 as pb;
use txmq_tests::output::ok;
use txmq_tests::{free_port, json_lines, rocketmq, BrokerProcess, Cluster, NameserverProcess};

/// The broker process of [`setup`] and its data directory (removed when
/// dropped).
struct Running {
    broker: BrokerProcess,
    _data: tempfile::TempDir,
}

/// A nameserver, and a broker process serving the gRPC API with `extra`
/// flags: the cluster, the nameserver's address, the gRPC address.
async fn setup(extra: &[&str]) -> (Cluster, String, String, Running) {
    let cluster = Cluster::nameserver_only(Duration::from_secs(30)).await;
    let ns = cluster.nameserver.clone();
    let data = tempfile::tempdir().unwrap();
    let grpc = format!("127.0.0.1:{}", free_port());
    let mut args = vec![
        "--grpc-listen",
        &grpc,
        "--auto-create-topics",
        "--transaction-timeout",
        "1s",
        "--transaction-check-interval",
        "300ms",
    ];
    args.extend_from_slice(extra);
    let broker = start_broker(data.path(), &ns, "broker-a", &args).await;
    let running = Running {
        broker,
        _data: data,
    };
    (cluster, ns, grpc, running)
}

/// Every message of `topic`, from the first, through `txmq consume`.
async fn consume_all(ns: &str, topic: &str, group: &str, count: usize) -> Vec<Value> {
    let (ns, topic, group) = (ns.to_string(), topic.to_string(), group.to_string());
    tokio::task::spawn_blocking(move || {
        txmq_tests::cli_consume(&ns, &topic, &group, count, "15s", &["--from", "first"])
    })
    .await
    .expect("txmq runs")
}

fn body(m: &Value) -> &str {
    m["body"].as_str().unwrap_or_default()
}

fn ids(v: &Value) -> Vec<String> {
    v.as_array()
        .expect("an array of ids")
        .iter()
        .map(|i| i.as_str().unwrap().to_string())
        .collect()
}

/// The Python producer sends normal, FIFO and delayed messages and three
/// transactions (committed, rolled back, left open and committed by its
/// checker at the second check-back over the telemetry stream, after an
/// UNKNOWN at the first); txmq's
/// CLI sees exactly the visible ones, with their keys, tags, properties
/// and ids, the FIFO ones in order in one queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_producer_and_transactional_producer_are_seen_by_txmq() {
    let Some(python) = rocketmq::python() else {
        return;
    };
    let (cluster, ns, grpc, _running) = setup(&[]).await;

    let sent = tokio::task::spawn_blocking(move || {
        rocketmq::python_json(&python, "producer.py", &[&grpc, "rmq-plain", "rmq-tx"])
    })
    .await
    .unwrap();
    assert_eq!(
        sent["asked"],
        serde_json::json!([["k-check"], ["k-check"]]),
        "{sent}"
    );

    // The delayed message is not there before its time, and is after.
    let delay_until = sent["delay_until_ms"].as_u64().unwrap();
    let plain = consume_all(&ns, "rmq-plain", "txmq-side", 4).await;
    if txmq_protocol::now_millis() < delay_until {
        assert!(plain.iter().all(|m| body(m) != "delayed"), "{plain:?}");
    }
    let plain = consume_all(&ns, "rmq-plain", "txmq-side-2", 5).await;
    assert!(txmq_protocol::now_millis() >= delay_until);
    let bodies: Vec<&str> = plain.iter().map(body).collect();
    assert_eq!(plain.len(), 5, "{bodies:?}");
    assert!(bodies.contains(&"delayed"), "{bodies:?}");
    let fifo: Vec<&Value> = plain
        .iter()
        .filter(|m| body(m).starts_with("fifo-"))
        .collect();
    assert_eq!(
        fifo.iter().map(|m| body(m)).collect::<Vec<_>>(),
        ["fifo-0", "fifo-1", "fifo-2"]
    );
    assert!(
        fifo.iter().all(|m| m["queue"] == fifo[0]["queue"]),
        "one queue: {fifo:?}"
    );
    let rmq_ids: Vec<String> = fifo
        .iter()
        .map(|m| format!("01{}", m["msg_id"].as_str().unwrap()))
        .collect();
    assert_eq!(rmq_ids, ids(&sent["fifo"]));
    let normal = plain.iter().find(|m| body(m) == "normal").unwrap();
    assert_eq!(normal["key"], "k-normal");
    assert_eq!(normal["tag"], "rmq");
    assert_eq!(normal["properties"]["origin"], "python");

    let tx = consume_all(&ns, "rmq-tx", "txmq-side", 2).await;
    let mut bodies: Vec<&str> = tx.iter().map(body).collect();
    bodies.sort();
    assert_eq!(
        bodies,
        ["checked", "committed"],
        "the rolled-back one stays invisible"
    );

    // `txmq msg show` takes the id as the RocketMQ client printed it.
    let id = sent["checked"].as_str().unwrap();
    let shown = txmq(&ns, &["--output", "json", "msg", "show", id], None).await;
    let shown = json_lines(ok(&shown).as_bytes()).remove(0);
    assert_eq!(body(&shown), "checked", "{shown}");
    // Its first check was answered UNKNOWN (the Python client's
    // EndTransaction without a resolution), not left to time out.
    let tx_id = shown["tx_id"].to_string();
    let tx = txmq(&ns, &["--output", "json", "tx", "show", &tx_id], None).await;
    let tx = json_lines(ok(&tx).as_bytes()).remove(0);
    let answers: Vec<&Value> = tx["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| &c["answer"])
        .collect();
    assert_eq!(answers, ["unknown", "commit"], "{tx}");
    cluster.shutdown().await;
}

/// The Node.js producer sends a message and two transactions (committed,
/// and left open for its checker); txmq's CLI sees all three.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_producer_and_transactional_producer_are_seen_by_txmq() {
    let Some(node) = rocketmq::node() else { return };
    let (cluster, ns, grpc, _running) = setup(&[]).await;

    let sent = tokio::task::spawn_blocking(move || {
        rocketmq::node_json(&node, "producer.js", &[&grpc, "node-plain", "node-tx"])
    })
    .await
    .unwrap();
    assert_eq!(
        sent["asked"],
        serde_json::json!([["k-node-check"]]),
        "{sent}"
    );

    let plain = consume_all(&ns, "node-plain", "txmq-side", 1).await;
    assert_eq!(body(&plain[0]), "from-node");
    assert_eq!(plain[0]["key"], "k-node");
    assert_eq!(plain[0]["tag"], "node");
    assert_eq!(plain[0]["properties"]["origin"], "node");
    assert_eq!(
        format!("01{}", plain[0]["msg_id"].as_str().unwrap()),
        sent["normal"].as_str().unwrap()
    );
    let tx = consume_all(&ns, "node-tx", "txmq-side", 2).await;
    let mut bodies: Vec<&str> = tx.iter().map(body).collect();
    bodies.sort();
    assert_eq!(bodies, ["node-checked", "node-committed"]);
    cluster.shutdown().await;
}

/// Sends `bodies` to `topic` with `txmq send` (key k-BODY, tag t).
async fn txmq_send(ns: &str, topic: &str, bodies: &[&str]) {
    for b in bodies {
        let key = format!("k-{b}");
        ok(&txmq(
            ns,
            &["send", topic, "--body", b, "--key", &key, "--tag", "t"],
            None,
        )
        .await);
    }
}

/// Messages txmq's CLI sent reach the Python simple consumer with their
/// key and tag; the one it does not acknowledge comes again
/// after its invisible duration with its delivery attempt counted; the
/// group's lag ends at 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_simple_consumer_receives_acks_and_sees_an_unacked_message_again() {
    let Some(python) = rocketmq::python() else {
        return;
    };
    let (cluster, ns, grpc, _running) = setup(&[]).await;
    txmq_send(&ns, "simple", &["m1", "m2", "m3"]).await;

    let got = tokio::task::spawn_blocking(move || {
        rocketmq::python_json(
            &python,
            "simple_consumer.py",
            &[&grpc, "simple", "sg", "3", "m2"],
        )
    })
    .await
    .unwrap();
    let mut first: Vec<&str> = got["first"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    first.sort();
    assert_eq!(first, ["m1", "m2", "m3"], "{got}");
    assert_eq!(got["attempts"], serde_json::json!([1, 1, 1]), "{got}");
    assert_eq!(got["tags"]["m1"], "t", "{got}");
    assert_eq!(got["keys"]["m1"], serde_json::json!(["k-m1"]), "{got}");
    assert_eq!(got["again"], "m2", "{got}");
    assert_eq!(got["again_attempt"], 2, "{got}");
    let after = got["again_after_s"].as_f64().unwrap();
    assert!(
        after >= 1.5,
        "hidden for its invisible duration (2 s): {after}"
    );
    assert!(
        got.get("unexpected").is_none(),
        "acked messages never came again: {got}"
    );

    let show = txmq(&ns, &["--output", "json", "group", "show", "sg"], None).await;
    let lags: Vec<u64> = json_lines(ok(&show).as_bytes())
        .iter()
        .flat_map(|g| g["queues"].as_array().cloned().unwrap_or_default())
        .map(|q| q["lag"].as_u64().unwrap_or(0))
        .collect();
    assert!(lags.iter().all(|l| *l == 0), "no lag left: {lags:?}");
    cluster.shutdown().await;
}

/// The bodies a Python script received (its `bodies`), sorted.
fn python_bodies(got: &serde_json::Value) -> Vec<&str> {
    let mut bodies: Vec<&str> = got["bodies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    bodies.sort_unstable();
    bodies
}

/// The Python push consumer consumes what txmq's CLI sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_push_consumer_consumes_a_topic_txmq_wrote() {
    let Some(python) = rocketmq::python() else {
        return;
    };
    let (cluster, ns, grpc, _running) = setup(&[]).await;
    let sent = ["p1", "p2", "p3", "p4", "p5"];
    txmq_send(&ns, "pushed", &sent).await;

    let got = tokio::task::spawn_blocking(move || {
        rocketmq::python_json(&python, "push_consumer.py", &[&grpc, "pushed", "pg", "5"])
    })
    .await
    .unwrap();
    let bodies = python_bodies(&got);
    assert_eq!(bodies, sent, "{got}");
    cluster.shutdown().await;
}

/// A RocketMQ client of the gRPC API, by a client id.
struct Rmq {
    client: pb::messaging_service_client::MessagingServiceClient<tonic::transport::Channel>,
}

impl Rmq {
    async fn connect(addr: &str) -> Rmq {
        let client =
            pb::messaging_service_client::MessagingServiceClient::connect(format!("http://{addr}"))
                .await
                .expect("connects");
        Rmq { client }
    }

    fn request<T>(message: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(message);
        r.metadata_mut()
            .insert("x-mq-client-id", "txmq-test-client".parse().unwrap());
        r
    }

    /// Up to 16 messages of `topic` for `group`, hidden for `invisible`.
    async fn receive(&mut self, topic: &str, group: &str, invisible: Duration) -> Vec<pb::Message> {
        self.receive_waiting(topic, group, invisible, Duration::ZERO)
            .await
    }

    /// As [`Rmq::receive`], waiting up to `poll` when there are none.
    async fn receive_waiting(
        &mut self,
        topic: &str,
        group: &str,
        invisible: Duration,
        poll: Duration,
    ) -> Vec<pb::Message> {
        let request = pb::ReceiveMessageRequest {
            group: Some(resource(group)),
            message_queue: Some(pb::MessageQueue {
                topic: Some(resource(topic)),
                id: -1,
                ..Default::default()
            }),
            batch_size: 16,
            invisible_duration: Some(prost_types::Duration {
                seconds: invisible.as_secs() as i64,
                nanos: 0,
            }),
            long_polling_timeout: Some(prost_types::Duration {
                seconds: poll.as_secs() as i64,
                nanos: 0,
            }),
            ..Default::default()
        };
        let mut stream = self
            .client
            .receive_message(Self::request(request))
            .await
            .expect("receive answered")
            .into_inner();
        let mut messages = Vec::new();
        while let Some(answer) = stream.message().await.expect("stream") {
            match answer.content {
                Some(pb::receive_message_response::Content::Message(m)) => messages.push(m),
                Some(pb::receive_message_response::Content::Status(s)) => assert!(
                    s.code == pb::Code::Ok as i32 || s.code == pb::Code::MessageNotFound as i32,
                    "{s:?}"
                ),
                _ => {}
            }
        }
        messages
    }

    async fn ack(&mut self, topic: &str, group: &str, m: &pb::Message) -> pb::Status {
        let sys = m.system_properties.clone().unwrap();
        let request = pb::AckMessageRequest {
            group: Some(resource(group)),
            topic: Some(resource(topic)),
            entries: vec![pb::AckMessageEntry {
                message_id: sys.message_id,
                receipt_handle: sys.receipt_handle.unwrap(),
                lite_topic: None,
            }],
        };
        let answer = self
            .client
            .ack_message(Self::request(request))
            .await
            .unwrap();
        answer.into_inner().status.unwrap()
    }

    /// Hides `m` for `invisible` from now; the answer holds its new handle.
    async fn change_invisible(
        &mut self,
        topic: &str,
        group: &str,
        m: &pb::Message,
        invisible: Duration,
    ) -> pb::ChangeInvisibleDurationResponse {
        let sys = m.system_properties.clone().unwrap();
        let request = pb::ChangeInvisibleDurationRequest {
            group: Some(resource(group)),
            topic: Some(resource(topic)),
            receipt_handle: sys.receipt_handle.unwrap(),
            invisible_duration: Some(prost_types::Duration {
                seconds: invisible.as_secs() as i64,
                nanos: 0,
            }),
            message_id: sys.message_id,
            ..Default::default()
        };
        self.client
            .change_invisible_duration(Self::request(request))
            .await
            .unwrap()
            .into_inner()
    }
}

fn resource(name: &str) -> pb::Resource {
    pb::Resource {
        resource_namespace: String::new(),
        name: name.into(),
    }
}

fn bodies(messages: &[pb::Message]) -> Vec<String> {
    let mut b: Vec<String> = messages
        .iter()
        .map(|m| String::from_utf8(m.body.clone()).unwrap())
        .collect();
    b.sort();
    b
}

fn attempt(m: &pb::Message) -> i32 {
    m.system_properties
        .as_ref()
        .unwrap()
        .delivery_attempt
        .unwrap()
}

/// `kill -9`, and a start with the same data until gRPC is served again.
async fn kill9_and_restart(broker: &mut BrokerProcess, grpc: &str) {
    broker.kill9();
    broker.restart();
    common::wait_until(
        "the broker serves gRPC again",
        Duration::from_secs(20),
        || {
            let grpc = grpc.to_string();
            async move { tokio::net::TcpStream::connect(&grpc).await.is_ok() }
        },
    )
    .await;
}

/// Receipts and invisibility outlive a `kill -9`: a received message stays
/// hidden across a restart until its duration ends, then comes again with
/// attempt 2; an acknowledged one never comes again; a stale receipt is
/// refused with INVALID_RECEIPT_HANDLE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn received_and_acked_messages_stay_so_across_a_kill9() {
    let (cluster, ns, grpc, mut running) = setup(&["--flush", "sync"]).await;
    txmq_send(&ns, "durable", &["a", "b"]).await;

    let mut rmq = Rmq::connect(&grpc).await;
    // The broker's deadline is at least this (it is set when it answers).
    let hidden_until = std::time::Instant::now() + Duration::from_secs(4);
    let first = rmq.receive("durable", "dg", Duration::from_secs(4)).await;
    assert_eq!(bodies(&first), ["a", "b"]);
    let a = first.iter().find(|m| m.body == b"a").unwrap();
    let b = first.iter().find(|m| m.body == b"b").unwrap();
    assert_eq!(rmq.ack("durable", "dg", a).await.code, pb::Code::Ok as i32);

    kill9_and_restart(&mut running.broker, &grpc).await;
    let mut rmq = Rmq::connect(&grpc).await;
    let early = rmq.receive("durable", "dg", Duration::from_secs(4)).await;
    if std::time::Instant::now() < hidden_until {
        assert!(
            early.is_empty(),
            "b is still hidden, a is acked: {:?}",
            bodies(&early)
        );
    }
    let mut again = early;
    while again.is_empty() {
        tokio::time::sleep(Duration::from_millis(200)).await;
        again = rmq.receive("durable", "dg", Duration::from_secs(30)).await;
    }
    assert!(std::time::Instant::now() >= hidden_until);
    assert_eq!(bodies(&again), ["b"], "only the unacked one comes again");
    assert_eq!(attempt(&again[0]), 2);
    let stale = rmq.ack("durable", "dg", b).await;
    assert_eq!(
        stale.code,
        pb::Code::InvalidReceiptHandle as i32,
        "{stale:?}"
    );
    assert_eq!(
        rmq.ack("durable", "dg", &again[0]).await.code,
        pb::Code::Ok as i32
    );

    kill9_and_restart(&mut running.broker, &grpc).await;
    let mut rmq = Rmq::connect(&grpc).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(rmq
        .receive("durable", "dg", Duration::from_secs(30))
        .await
        .is_empty());
    cluster.shutdown().await;
}

/// ChangeInvisibleDuration gives a new receipt and makes the old one
/// stale; ForwardMessageToDeadLetterQueue moves a message to the group's
/// dead-letter topic, where `txmq dlq list` shows it, and it does not come
/// again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn change_invisible_duration_and_forward_to_the_dead_letter_queue() {
    let (cluster, ns, grpc, _running) = setup(&[]).await;
    txmq_send(&ns, "dead", &["x", "y"]).await;
    let mut rmq = Rmq::connect(&grpc).await;
    let got = rmq.receive("dead", "xg", Duration::from_secs(2)).await;
    assert_eq!(bodies(&got), ["x", "y"]);
    let x = got.iter().find(|m| m.body == b"x").unwrap();
    let y = got.iter().find(|m| m.body == b"y").unwrap();
    let handle = |m: &pb::Message| m.system_properties.clone().unwrap().receipt_handle.unwrap();

    // x: hidden for 30 s more, under a new handle.
    let changed = rmq
        .client
        .change_invisible_duration(Rmq::request(pb::ChangeInvisibleDurationRequest {
            group: Some(resource("xg")),
            topic: Some(resource("dead")),
            receipt_handle: handle(x),
            invisible_duration: Some(prost_types::Duration {
                seconds: 30,
                nanos: 0,
            }),
            message_id: x.system_properties.clone().unwrap().message_id,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(changed.status.unwrap().code, pb::Code::Ok as i32);
    assert_ne!(changed.receipt_handle, handle(x));
    assert_eq!(
        rmq.ack("dead", "xg", x).await.code,
        pb::Code::InvalidReceiptHandle as i32,
        "the old handle is stale"
    );

    // y: to the dead letters.
    let forwarded = rmq
        .client
        .forward_message_to_dead_letter_queue(Rmq::request(
            pb::ForwardMessageToDeadLetterQueueRequest {
                group: Some(resource("xg")),
                topic: Some(resource("dead")),
                receipt_handle: handle(y),
                message_id: y.system_properties.clone().unwrap().message_id,
                delivery_attempt: 1,
                max_delivery_attempts: 17,
                lite_topic: None,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(forwarded.status.unwrap().code, pb::Code::Ok as i32);
    let list = txmq(&ns, &["--output", "json", "dlq", "list", "xg"], None).await;
    let dead = json_lines(ok(&list).as_bytes());
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(body(&dead[0]), "y");

    // After y's 2 s, neither comes: x is hidden for 30 s, y is dead.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(rmq
        .receive("dead", "xg", Duration::from_secs(2))
        .await
        .is_empty());
    cluster.shutdown().await;
}

/// A message whose invisible time a consumer shortens goes to a long poll
/// already waiting once its new deadline passes, not when that poll times
/// out (a push consumer's retry backoff works so: its failed message came
/// back after the 20 s poll instead of the advertised 1 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shortened_invisible_time_wakes_a_waiting_long_poll() {
    let (cluster, ns, grpc, _running) = setup(&[]).await;
    txmq_send(&ns, "shortened", &["w1"]).await;
    let mut holder = Rmq::connect(&grpc).await;
    let got = holder
        .receive("shortened", "wg", Duration::from_secs(30))
        .await;
    assert_eq!(bodies(&got), ["w1"]);

    let waiting = tokio::spawn({
        let grpc = grpc.clone();
        async move {
            let mut rmq = Rmq::connect(&grpc).await;
            let started = std::time::Instant::now();
            let got = rmq
                .receive_waiting(
                    "shortened",
                    "wg",
                    Duration::from_secs(30),
                    Duration::from_secs(20),
                )
                .await;
            (got, started.elapsed())
        }
    });
    // The poll waits (nothing is due for 30 s) when the holder gives up.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let changed_at = std::time::Instant::now();
    let changed = holder
        .change_invisible("shortened", "wg", &got[0], Duration::from_secs(1))
        .await;
    assert_eq!(changed.status.unwrap().code, pb::Code::Ok as i32);

    let (again, waited) = waiting.await.unwrap();
    let after_change = changed_at.elapsed();
    assert_eq!(bodies(&again), ["w1"], "waited {waited:?}");
    assert_eq!(attempt(&again[0]), 2);
    assert!(
        after_change >= Duration::from_millis(900) && after_change < Duration::from_secs(5),
        "delivered {after_change:?} after the change to 1 s (the poll waited {waited:?} of its 20 s)"
    );
    cluster.shutdown().await;
}

/// The official push consumer's failed message comes again after the
/// retry backoff the broker gives it (1 s for the first retry), with its
/// delivery attempt counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_push_consumer_gets_a_failed_message_again_after_its_backoff() {
    let Some(python) = rocketmq::python() else {
        return;
    };
    let (cluster, ns, grpc, _running) = setup(&[]).await;
    txmq_send(&ns, "retried", &["ok1"]).await;
    let consumer = tokio::task::spawn_blocking(move || {
        rocketmq::python_json(
            &python,
            "push_consumer.py",
            &[&grpc, "retried", "rg", "2", "fail1"],
        )
    });
    // Sent while the consumer waits in a long poll: it receives the message,
    // and polls again while its listener fails it.
    tokio::time::sleep(Duration::from_secs(4)).await;
    txmq_send(&ns, "retried", &["fail1"]).await;
    let got = consumer.await.unwrap();
    let bodies = python_bodies(&got);
    assert_eq!(bodies, ["fail1", "ok1"], "{got}");
    assert_eq!(got["fail_again_attempt"], 2, "{got}");
    let after = got["fail_again_after_s"].as_f64().unwrap();
    assert!(
        (0.5..5.0).contains(&after),
        "came again after the 1 s backoff, not the 20 s long poll: {after} s"
    );
    cluster.shutdown().await;
}

/// Each queue of `group` in `txmq group show`: (topic, committed, max
/// offset, lag).
async fn group_queues(ns: &str, group: &str) -> Vec<(String, Option<u64>, u64, u64)> {
    let show = txmq(ns, &["--output", "json", "group", "show", group], None).await;
    json_lines(ok(&show).as_bytes())
        .iter()
        .flat_map(|g| g["queues"].as_array().cloned().unwrap_or_default())
        .map(|q| {
            (
                q["topic"].as_str().unwrap_or_default().to_string(),
                q["committed"].as_u64(),
                q["max_offset"].as_u64().unwrap_or(0),
                q["lag"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

/// `txmq group reset-offset` moves a group of RocketMQ 5 consumers too,
/// durably: `--to first` has the acknowledged messages delivered again
/// (and `group show`'s lag drains as they are acknowledged), also after a
/// `kill -9`; `--to last` skips what was not received, drops what was in
/// flight (its receipt is refused, and it does not come again, also
/// after a `kill -9`), and what comes next is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_reset_offset_moves_a_rocketmq_consumer_group_durably() {
    let (cluster, ns, grpc, mut running) = setup(&["--flush", "sync"]).await;
    ok(&txmq(&ns, &["topic", "create", "rewound", "--queues", "2"], None).await);
    txmq_send(&ns, "rewound", &["a", "b", "c"]).await;
    let mut rmq = Rmq::connect(&grpc).await;
    let got = rmq.receive("rewound", "rg", Duration::from_secs(30)).await;
    assert_eq!(bodies(&got), ["a", "b", "c"]);
    for m in &got {
        assert_eq!(rmq.ack("rewound", "rg", m).await.code, pb::Code::Ok as i32);
    }
    assert!(rmq
        .receive("rewound", "rg", Duration::from_secs(30))
        .await
        .is_empty());

    let reset = |to: &'static str| {
        let ns = ns.clone();
        async move {
            let out = txmq(
                &ns,
                &[
                    "--output",
                    "json",
                    "group",
                    "reset-offset",
                    "rg",
                    "--topic",
                    "rewound",
                    "--to",
                    to,
                ],
                None,
            )
            .await;
            json_lines(ok(&out).as_bytes())
        }
    };
    let moved = reset("first").await;
    assert!(moved.iter().all(|q| q["offset"] == 0), "{moved:?}");
    let queues = group_queues(&ns, "rg").await;
    assert_eq!(queues.iter().map(|q| q.3).sum::<u64>(), 3, "{queues:?}");

    // Durable: the acknowledged messages come again after a kill -9.
    kill9_and_restart(&mut running.broker, &grpc).await;
    let mut rmq = Rmq::connect(&grpc).await;
    let again = rmq.receive("rewound", "rg", Duration::from_secs(30)).await;
    assert_eq!(bodies(&again), ["a", "b", "c"], "delivered again");
    assert!(again.iter().all(|m| attempt(m) == 1));
    for m in &again {
        assert_eq!(rmq.ack("rewound", "rg", m).await.code, pb::Code::Ok as i32);
    }
    let queues = group_queues(&ns, "rg").await;
    assert!(
        queues.iter().all(|q| q.3 == 0),
        "the lag drained: {queues:?}"
    );

    // --to last: d and e in flight, f never received.
    txmq_send(&ns, "rewound", &["d", "e"]).await;
    let held = rmq.receive("rewound", "rg", Duration::from_secs(2)).await;
    assert_eq!(bodies(&held), ["d", "e"]);
    txmq_send(&ns, "rewound", &["f"]).await;
    let moved = reset("last").await;
    assert_eq!(
        moved
            .iter()
            .map(|q| q["offset"].as_u64().unwrap())
            .sum::<u64>(),
        6,
        "{moved:?}"
    );
    let stale = rmq.ack("rewound", "rg", &held[0]).await;
    assert_eq!(
        stale.code,
        pb::Code::InvalidReceiptHandle as i32,
        "{stale:?}"
    );
    assert!(stale.message.contains("reset"), "{stale:?}");
    let queues = group_queues(&ns, "rg").await;
    assert!(
        queues.iter().all(|q| q.3 == 0 && q.1 == Some(q.2)),
        "{queues:?}"
    );
    assert!(rmq
        .receive("rewound", "rg", Duration::from_secs(30))
        .await
        .is_empty());
    kill9_and_restart(&mut running.broker, &grpc).await;
    let mut rmq = Rmq::connect(&grpc).await;
    // Past d's and e's invisible time: dropped, they do not come again.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(rmq
        .receive("rewound", "rg", Duration::from_secs(30))
        .await
        .is_empty());
    txmq_send(&ns, "rewound", &["g"]).await;
    let next = rmq.receive("rewound", "rg", Duration::from_secs(30)).await;
    assert_eq!(bodies(&next), ["g"]);
    cluster.shutdown().await;
}

/// A message as the official clients send it: an id of `01` and 32 hex
/// digits, a tag, its type, and for a DELAY one its delivery time (ms).
fn rmq_message(
    topic: &str,
    body: &str,
    kind: pb::MessageType,
    deliver_at: Option<u64>,
) -> pb::Message {
    let now = txmq::now_millis();
    let ts = |ms: u64| prost_types::Timestamp {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    };
    pb::Message {
        topic: Some(resource(topic)),
        system_properties: Some(pb::SystemProperties {
            tag: Some("t".into()),
            message_id: format!("01{}", txmq::MsgId::generate()),
            message_type: kind as i32,
            born_timestamp: Some(ts(now)),
            born_host: "127.0.0.1".into(),
            delivery_timestamp: deliver_at.map(ts),
            ..Default::default()
        }),
        body: body.as_bytes().to_vec(),
        ..Default::default()
    }
}

/// Sends `messages` in one SendMessage request.
async fn send_raw(grpc: &str, messages: Vec<pb::Message>) -> pb::SendMessageResponse {
    let mut client =
        pb::messaging_service_client::MessagingServiceClient::connect(format!("http://{grpc}"))
            .await
            .expect("connects");
    client
        .send_message(Rmq::request(pb::SendMessageRequest { messages }))
        .await
        .expect("answered")
        .into_inner()
}

/// The answer to a send of a delayed message holds no queue offset (-1:
/// it gets one at delivery), as `txmq send` prints `offset=-`, nor does a
/// transactional one's (it gets one at commit); a normal message's answer
/// holds its own; the delayed one lands after them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_and_transactional_sends_answer_no_queue_offset() {
    let (cluster, ns, grpc, _running) = setup(&[]).await;
    ok(&txmq(&ns, &["topic", "create", "later", "--queues", "1"], None).await);
    let at = txmq::now_millis() + 2000;
    let mut offsets = Vec::new();
    for (body, kind, deliver_at) in [
        ("n0", pb::MessageType::Normal, None),
        ("d", pb::MessageType::Delay, Some(at)),
        ("tx", pb::MessageType::Transaction, None),
        ("n1", pb::MessageType::Normal, None),
    ] {
        let answer = send_raw(&grpc, vec![rmq_message("later", body, kind, deliver_at)]).await;
        assert_eq!(
            answer.status.as_ref().unwrap().code,
            pb::Code::Ok as i32,
            "{answer:?}"
        );
        offsets.push(answer.entries[0].offset);
    }
    assert_eq!(offsets, [0, -1, -1, 1]);

    let mut rmq = Rmq::connect(&grpc).await;
    let mut got = Vec::new();
    while got.len() < 3 {
        let more = rmq
            .receive_waiting(
                "later",
                "lg",
                Duration::from_secs(30),
                Duration::from_secs(5),
            )
            .await;
        assert!(!more.is_empty(), "the delayed one is delivered: {got:?}");
        got.extend(more);
    }
    let place = |body: &[u8]| {
        let m = got.iter().find(|m| m.body == body).unwrap();
        m.system_properties.as_ref().unwrap().queue_offset
    };
    assert_eq!(place(b"d"), Some(2), "delivered after the other two");
    cluster.shutdown().await;
}

/// A send RocketMQ 5 clients never make is refused with RocketMQ's code
/// for it, and nothing of it is stored: a message id that is not `01` and
/// 32 hex digits (or none; txmq stored such a message under an id derived
/// from the string, shared by every message sent with it, that the client
/// never learnt), messages of two topics in one request, a DELAY message
/// without a delivery time. A well-formed message is stored under the id
/// it was sent with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_sends_are_refused_with_rocketmqs_codes() {
    let (cluster, ns, grpc, _running) = setup(&[]).await;
    for topic in ["strict", "other"] {
        ok(&txmq(&ns, &["topic", "create", topic, "--queues", "1"], None).await);
    }
    let normal = pb::MessageType::Normal;
    let with_id = |id: &str| {
        let mut m = rmq_message("strict", "bad-id", normal, None);
        m.system_properties.as_mut().unwrap().message_id = id.into();
        m
    };
    let refused = |answer: pb::SendMessageResponse, code: pb::Code, says: &str| {
        let status = answer.status.clone().unwrap();
        assert_eq!(status.code, code as i32, "{answer:?}");
        assert!(status.message.contains(says), "{answer:?}");
        for e in &answer.entries {
            assert_eq!(e.status.as_ref().unwrap().code, code as i32, "{answer:?}");
        }
    };
    let not_hex = format!("01{}", "G".repeat(32));
    let too_long = format!("01{}", "A".repeat(34));
    for id in [
        "zzz",
        &not_hex,
        &too_long,
        "01+234567890ABCDEF1234567890ABCDEF",
    ] {
        let answer = send_raw(&grpc, vec![with_id(id)]).await;
        refused(
            answer,
            pb::Code::IllegalMessageId,
            "is not 01 and 32 hexadecimal digits",
        );
    }
    let answer = send_raw(&grpc, vec![with_id("")]).await;
    refused(answer, pb::Code::IllegalMessageId, "needs a message id");
    let answer = send_raw(
        &grpc,
        vec![
            rmq_message("strict", "mixed", normal, None),
            rmq_message("other", "mixed", normal, None),
        ],
    )
    .await;
    assert!(answer.entries.is_empty(), "{answer:?}");
    refused(answer, pb::Code::MessageCorrupted, "same topic");
    let answer = send_raw(
        &grpc,
        vec![rmq_message("strict", "when", pb::MessageType::Delay, None)],
    )
    .await;
    refused(answer, pb::Code::IllegalDeliveryTime, "delivery timestamp");

    // Nothing of them was stored; a good one is, under its own id.
    let good = rmq_message("strict", "good", normal, None);
    let id = good.system_properties.as_ref().unwrap().message_id.clone();
    let answer = send_raw(&grpc, vec![good]).await;
    assert_eq!(answer.entries[0].message_id, id, "{answer:?}");
    assert_eq!(answer.entries[0].offset, 0, "the first message stored");
    let shown = txmq(&ns, &["--output", "json", "msg", "show", &id], None).await;
    let shown = json_lines(ok(&shown).as_bytes());
    assert_eq!(shown[0]["body"], "good", "{shown:?}");
    let status = txmq(&ns, &["--output", "json", "topic", "status", "other"], None).await;
    let queues = json_lines(ok(&status).as_bytes());
    assert!(queues.iter().all(|q| q["max_offset"] == 0), "{queues:?}");
    cluster.shutdown().await;
}

/// A raw gRPC call of `path` with `request`, decoding the answer as `R`.
async fn raw_call<Q, R>(addr: &str, path: &'static str, request: Q) -> Result<R, tonic::Status>
where
    Q: prost::Message + Send + Sync + 'static,
    R: prost::Message + Default + Send + Sync + 'static,
{
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connects");
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    let codec = tonic_prost::ProstCodec::<Q, R>::default();
    grpc.unary(
        tonic::Request::new(request),
        tonic::codegen::http::uri::PathAndQuery::from_static(path),
        codec,
    )
    .await
    .map(tonic::Response::into_inner)
}

/// A QueryRoute request whose field 1 has the wrong wire type.
#[derive(Clone, PartialEq, prost::Message)]
struct NotAQueryRoute {
    #[prost(uint64, tag = "1")]
    topic: u64,
}

async fn query_route(addr: &str, topic: &str) -> pb::QueryRouteResponse {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connects");
    query_route_on(channel, topic).await.expect("answered")
}

/// Garbage, HTTP/1.1, an unknown RPC, an RPC txmq does not serve,
/// malformed protobuf and an oversized message each get a clear answer,
/// and a well-formed client on another connection is served throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_on_the_grpc_port_gets_clear_statuses_and_hurts_no_one_else() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (cluster, ns, grpc, _running) = setup(&[]).await;
    let good = query_route(&grpc, "bad-input").await;
    assert_eq!(good.status.unwrap().code, pb::Code::Ok as i32);
    assert_eq!(good.message_queues.len(), 4);

    // Garbage instead of the HTTP/2 preface: the connection closes.
    let mut raw = tokio::net::TcpStream::connect(&grpc).await.unwrap();
    raw.write_all(&[0xde, 0xad, 0xbe, 0xef].repeat(64))
        .await
        .unwrap();
    let mut sink = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), raw.read_to_end(&mut sink)).await;
    assert!(read.is_ok(), "garbage gets the connection closed");

    // HTTP/1.1: an answer with a gRPC status, not a hang.
    let mut http1 = tokio::net::TcpStream::connect(&grpc).await.unwrap();
    http1
        .write_all(b"GET / HTTP/1.1\r\nHost: txmq\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), http1.read_to_end(&mut answer))
        .await
        .expect("HTTP/1.1 is answered")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer).to_lowercase();
    assert!(answer.starts_with("http/1.1 200"), "{answer}");
    assert!(
        answer.contains("grpc-status: 12"),
        "UNIMPLEMENTED: {answer}"
    );

    // An RPC the API lacks, and one txmq does not serve.
    let unknown = raw_call::<pb::QueryRouteRequest, pb::QueryRouteResponse>(
        &grpc,
        "/apache.rocketmq.v2.MessagingService/NoSuchRpc",
        pb::QueryRouteRequest::default(),
    )
    .await
    .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::Unimplemented, "{unknown:?}");
    let pull = raw_call::<pb::PullMessageRequest, pb::PullMessageResponse>(
        &grpc,
        "/apache.rocketmq.v2.MessagingService/PullMessage",
        pb::PullMessageRequest::default(),
    )
    .await
    .unwrap_err();
    assert_eq!(pull.code(), tonic::Code::Unimplemented);
    assert!(pull.message().contains("PullMessage"), "{pull:?}");

    // Malformed protobuf.
    let malformed = raw_call::<NotAQueryRoute, pb::QueryRouteResponse>(
        &grpc,
        "/apache.rocketmq.v2.MessagingService/QueryRoute",
        NotAQueryRoute { topic: 7 },
    )
    .await
    .unwrap_err();
    assert_eq!(malformed.code(), tonic::Code::Internal, "{malformed:?}");
    assert!(malformed.message().contains("decode"), "{malformed:?}");

    // A message past the broker's --max-message-size (1 MiB here) and the
    // request limit: refused whole, nothing stored.
    let huge = pb::SendMessageRequest {
        messages: vec![pb::Message {
            topic: Some(pb::Resource {
                resource_namespace: String::new(),
                name: "bad-input".into(),
            }),
            body: vec![b'x'; 2 << 20],
            ..Default::default()
        }],
    };
    let refused = raw_call::<pb::SendMessageRequest, pb::SendMessageResponse>(
        &grpc,
        "/apache.rocketmq.v2.MessagingService/SendMessage",
        huge,
    )
    .await
    .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::OutOfRange, "{refused:?}");
    assert!(refused.message().contains("too large"), "{refused:?}");

    // A send with an empty topic name and one with a reserved property.
    let mut client =
        pb::messaging_service_client::MessagingServiceClient::connect(format!("http://{grpc}"))
            .await
            .unwrap();
    let reserved = pb::Message {
        topic: Some(pb::Resource {
            resource_namespace: String::new(),
            name: "bad-input".into(),
        }),
        user_properties: [("__rmq.keys".to_string(), "x".to_string())].into(),
        body: b"x".to_vec(),
        ..Default::default()
    };
    let answer = client
        .send_message(pb::SendMessageRequest {
            messages: vec![reserved],
        })
        .await
        .unwrap()
        .into_inner();
    let status = answer.status.unwrap();
    assert_eq!(status.code, pb::Code::BadRequest as i32, "{status:?}");
    assert!(status.message.contains("__rmq.keys"), "{status:?}");
    // A name no topic may have: ILLEGAL_TOPIC, as a route query says.
    let illegal = pb::Message {
        topic: Some(resource("a/b")),
        body: b"x".to_vec(),
        ..Default::default()
    };
    let status = client
        .send_message(pb::SendMessageRequest {
            messages: vec![illegal],
        })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    assert_eq!(status.code, pb::Code::IllegalTopic as i32, "{status:?}");
    assert_eq!(
        query_route(&grpc, "a/b").await.status.unwrap().code,
        pb::Code::IllegalTopic as i32
    );

    // Still served, and nothing of the bad input was stored.
    let again = query_route(&grpc, "bad-input").await;
    assert_eq!(again.status.unwrap().code, pb::Code::Ok as i32);
    let status = txmq(
        &ns,
        &["--output", "json", "topic", "status", "bad-input"],
        None,
    )
    .await;
    let queues = json_lines(ok(&status).as_bytes());
    assert!(
        queues.iter().all(|q| q["max_offset"] == 0),
        "nothing stored: {queues:?}"
    );
    cluster.shutdown().await;
}

/// A request body fed by the test, a chunk at a time; open until the
/// sender is dropped.
struct Fed(tokio::sync::mpsc::UnboundedReceiver<bytes::Bytes>);

impl http_body::Body for Fed {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|c| Ok(http_body::Frame::data(c))))
    }
}

/// The gRPC status code and message a call ended with, and when they came.
type Ended = (String, String, std::time::Instant);

/// A call of `rpc` on `channel` whose body the caller feeds through the
/// sender; its end ([`Ended`]), once it comes.
fn fed_call(
    channel: &tonic::transport::Channel,
    grpc: &str,
    rpc: &str,
) -> (
    tokio::sync::mpsc::UnboundedSender<bytes::Bytes>,
    tokio::task::JoinHandle<Ended>,
) {
    use tonic::codegen::Service;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let request = tonic::codegen::http::Request::builder()
        .method("POST")
        .uri(format!(
            "http://{grpc}/apache.rocketmq.v2.MessagingService/{rpc}"
        ))
        .header("content-type", "application/grpc")
        .header("x-mq-client-id", "stall-test")
        .header("te", "trailers")
        .body(tonic::body::Body::new(Fed(rx)))
        .unwrap();
    let mut channel = channel.clone();
    let answer = tokio::spawn(async move {
        std::future::poll_fn(|cx| channel.poll_ready(cx))
            .await
            .expect("ready");
        let response = channel.call(request).await.expect("answered");
        let header = |map: &tonic::codegen::http::HeaderMap, key: &str| {
            map.get(key)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        };
        if let Some(code) = header(response.headers(), "grpc-status") {
            let message = header(response.headers(), "grpc-message").unwrap_or_default();
            return (code, message, std::time::Instant::now());
        }
        // A whole answer: its status is in the trailers after the body.
        let mut body = response.into_body();
        loop {
            let frame = std::future::poll_fn(|cx| {
                http_body::Body::poll_frame(std::pin::Pin::new(&mut body), cx)
            })
            .await
            .expect("trailers")
            .expect("a frame");
            if let Ok(trailers) = frame.into_trailers() {
                let code = header(&trailers, "grpc-status").unwrap_or_default();
                let message = header(&trailers, "grpc-message").unwrap_or_default();
                return (code, message, std::time::Instant::now());
            }
        }
    });
    (tx, answer)
}

/// The end of a [`fed_call`], waited for at most 10 s (`what` says which).
async fn call_end(answer: tokio::task::JoinHandle<Ended>, what: &str) -> Ended {
    tokio::time::timeout(Duration::from_secs(10), answer)
        .await
        .unwrap_or_else(|_| panic!("{what}: no end within 10 s"))
        .expect("the call's task")
}

/// A SendMessage request of one message to `topic`, as gRPC frames it.
fn framed_send(topic: &str, body: &str) -> Vec<u8> {
    let request = pb::SendMessageRequest {
        messages: vec![rmq_message(topic, body, pb::MessageType::Normal, None)],
    };
    let encoded = prost::Message::encode_to_vec(&request);
    let mut framed = vec![0];
    framed.extend_from_slice(&(encoded.len() as u32).to_be_bytes());
    framed.extend(encoded);
    framed
}

/// `--frame-timeout` on the gRPC port: a message that starts and stops,
/// or trickles, ends its own call with DEADLINE_EXCEEDED between the
/// timeout and twice it, with a WARN line; the connection's other calls
/// and other clients are served meanwhile; a request that waits before its
/// message, or a message slow but within the timeout, is served; nothing
/// of a cut message is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_message_stalled_mid_way_ends_only_its_call_after_the_frame_timeout() {
    const TIMEOUT: Duration = Duration::from_millis(600);
    let (cluster, ns, grpc, running) = setup(&["--frame-timeout", "600ms"]).await;
    let topic = "stalled";
    assert_eq!(
        query_route(&grpc, topic).await.status.unwrap().code,
        pb::Code::Ok as i32
    );
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{grpc}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let whole = framed_send(topic, "cut");

    // Half a message, then nothing.
    let (stalled, answer) = fed_call(&channel, &grpc, "SendMessage");
    let began = std::time::Instant::now();
    stalled
        .send(whole[..whole.len() / 2].to_vec().into())
        .unwrap();
    // Another client is served while that call waits.
    assert_eq!(
        query_route(&grpc, topic).await.status.unwrap().code,
        pb::Code::Ok as i32
    );
    let (code, message, ended) = call_end(answer, "the stalled call is ended").await;
    let took = ended - began;
    assert_eq!(code, "4", "DEADLINE_EXCEEDED: {message}");
    assert!(message.contains("--frame-timeout"), "{message}");
    assert!(
        took >= TIMEOUT && took < TIMEOUT + Duration::from_secs(2),
        "ended after {took:?}"
    );

    // Trickled, a byte every 50 ms.
    let (trickled, answer) = fed_call(&channel, &grpc, "SendMessage");
    let began = std::time::Instant::now();
    let feeding = tokio::spawn(async move {
        for b in whole {
            if trickled.send(vec![b].into()).is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let (code, message, ended) = call_end(answer, "the trickled call is ended").await;
    assert_eq!(code, "4", "DEADLINE_EXCEEDED: {message}");
    assert!(ended - began >= TIMEOUT, "ended after {:?}", ended - began);
    feeding.abort();

    // A telemetry stream: a whole command, then three bytes of the next
    // one's prefix. The stream ends with DEADLINE_EXCEEDED, not OK.
    let (telemetry, answer) = fed_call(&channel, &grpc, "Telemetry");
    let began = std::time::Instant::now();
    telemetry.send(vec![0, 0, 0, 0, 0, 0, 0, 0].into()).unwrap();
    let (code, message, ended) = call_end(answer, "the stalled stream is ended").await;
    assert_eq!(code, "4", "DEADLINE_EXCEEDED: {message}");
    assert!(ended - began >= TIMEOUT, "ended after {:?}", ended - began);
    drop(telemetry);

    // Headers, a wait longer than the timeout before the message, then
    // the message: served (the time between messages does not count).
    let (late, answer) = fed_call(&channel, &grpc, "SendMessage");
    tokio::time::sleep(TIMEOUT * 2).await;
    late.send(framed_send(topic, "late").into()).unwrap();
    drop(late);
    let (code, message, _) = call_end(answer, "answered").await;
    assert_eq!(code, "0", "served: {message}");

    // Slow, but whole within the timeout: served, on the same connection.
    let slow_message = framed_send(topic, "slow");
    let (slow, answer) = fed_call(&channel, &grpc, "SendMessage");
    slow.send(slow_message[..3].to_vec().into()).unwrap();
    tokio::time::sleep(TIMEOUT / 3).await;
    slow.send(slow_message[3..].to_vec().into()).unwrap();
    drop(slow);
    let (code, message, _) = call_end(answer, "answered").await;
    assert_eq!(code, "0", "served: {message}");

    let log = running.broker.log_text();
    assert!(
        log.contains("did not finish within the frame timeout"),
        "{log}"
    );
    let got = consume_all(&ns, topic, "stall-check", 2).await;
    let mut got: Vec<&str> = got.iter().map(body).collect();
    got.sort_unstable();
    assert_eq!(got, ["late", "slow"], "nothing of a cut message stored");
    cluster.shutdown().await;
}

/// A route query on `channel` (one HTTP/2 connection).
async fn query_route_on(
    channel: tonic::transport::Channel,
    topic: &str,
) -> Result<pb::QueryRouteResponse, tonic::Status> {
    let mut client = pb::messaging_service_client::MessagingServiceClient::new(channel);
    let mut request = tonic::Request::new(pb::QueryRouteRequest {
        topic: Some(resource(topic)),
        endpoints: None,
    });
    request
        .metadata_mut()
        .insert("x-mq-client-id", "bad-input-test".parse().unwrap());
    client
        .query_route(request)
        .await
        .map(tonic::Response::into_inner)
}

/// A connection to the gRPC port, served: `None` when the broker closed it
/// before it answered a route query.
async fn served_connection(grpc: &str) -> Option<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{grpc}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .ok()?;
    let answer = tokio::time::timeout(
        Duration::from_secs(5),
        query_route_on(channel.clone(), "connections"),
    )
    .await
    .ok()?
    .ok()?;
    (answer.status.unwrap().code == pb::Code::Ok as i32).then_some(channel)
}

/// CPU time (user and system) the process has used, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command's closing parenthesis; utime and stime are
    // the 14th and 15th of the whole line.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// `--max-connections` on the gRPC port: a connection past it is closed
/// at once, with a WARN line, while the others are served; a closed one
/// frees its slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_connections_past_the_limit_are_closed_and_a_freed_slot_is_taken() {
    let metrics = format!("127.0.0.1:{}", free_port());
    let (cluster, _ns, grpc, running) =
        setup(&["--max-connections", "2", "--metrics-listen", &metrics]).await;
    let first = served_connection(&grpc).await.expect("the first is served");
    let second = served_connection(&grpc)
        .await
        .expect("the second is served");
    let (_, text) = txmq_tests::metrics::http_get(&metrics, "/metrics").expect("metrics");
    assert_eq!(
        txmq_tests::metrics::sample(&text, "txmq_grpc_connections"),
        Some(2.0),
        "{text}"
    );
    assert!(
        served_connection(&grpc).await.is_none(),
        "a third connection is closed"
    );
    let log = running.broker.log_text();
    assert!(
        log.contains("gRPC connection refused: --max-connections reached"),
        "{log}"
    );
    assert!(query_route_on(first.clone(), "connections").await.is_ok());
    // A closed connection gives its slot back.
    drop(second);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let third = loop {
        if let Some(c) = served_connection(&grpc).await {
            break c;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "a freed slot is taken"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    drop((first, third));
    cluster.shutdown().await;
}

/// The bodies `group` reads from the first message of `topic` (`txmq
/// consume --from first`, with `flags`: TLS, keys), sorted.
async fn bodies_read(
    ns: &str,
    topic: &str,
    group: &str,
    count: usize,
    flags: &[&str],
) -> Vec<String> {
    let (ns, topic, group) = (ns.to_string(), topic.to_string(), group.to_string());
    let mut extra: Vec<String> = vec!["--from".into(), "first".into()];
    extra.extend(flags.iter().map(|f| f.to_string()));
    let got = tokio::task::spawn_blocking(move || {
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        txmq_tests::cli_consume(&ns, &topic, &group, count, "10s", &extra)
    })
    .await
    .unwrap();
    let mut bodies: Vec<String> = got.iter().map(|m| body(m).to_string()).collect();
    bodies.sort_unstable();
    bodies
}

/// A CA for a test, and an ACL file of `users` (TOML) beside it.
fn pki_with_acl(users: &str) -> (txmq_tests::pki::Pki, String) {
    let pki = txmq_tests::pki::Pki::new("txmq gRPC ACL test CA");
    let acl = pki.acl("acl.toml", users).display().to_string();
    (pki, acl)
}

/// A nameserver and a broker serving TLS with a certificate of `pki`'s
/// CA, on the gRPC port too (`--grpc-listen`, `--auto-create-topics`, and
/// `extra`).
struct TlsSite {
    ns: String,
    grpc: String,
    /// The CA's certificate, for the clients.
    ca: String,
    broker: BrokerProcess,
    _nameserver: NameserverProcess,
    _dir: tempfile::TempDir,
}

fn tls_site(pki: &txmq_tests::pki::Pki, extra: &[&str]) -> TlsSite {
    let tls = pki.server_flags(&pki.issue("127.0.0.1"));
    let tls: Vec<&str> = tls.iter().map(String::as_str).collect();
    let dir = tempfile::tempdir().unwrap();
    let ns = format!("127.0.0.1:{}", free_port());
    let log = dir.path().join("nameserver.log");
    let nameserver = tokio::task::block_in_place(|| NameserverProcess::start(&ns, &tls, &log));
    let grpc = format!("127.0.0.1:{}", free_port());
    let mut args = vec!["--grpc-listen", &grpc, "--auto-create-topics"];
    args.extend(&tls);
    args.extend(extra);
    let data = dir.path().join("data");
    let broker =
        tokio::task::block_in_place(|| BrokerProcess::start(&data, &ns, "broker-a", &args));
    TlsSite {
        ca: pki.ca().display().to_string(),
        ns,
        grpc,
        broker,
        _nameserver: nameserver,
        _dir: dir,
    }
}

/// With `--tls-cert` and `--tls-key` the gRPC port serves TLS, as txmq's
/// own port does: the official Python client, TLS on and trusting the
/// broker's CA, sends a message that txmq's CLI reads over TLS; a
/// plaintext gRPC client is closed, with a WARN line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grpc_port_serves_tls_with_the_brokers_certificate() {
    let Some(python) = rocketmq::python() else {
        return;
    };
    let pki = txmq_tests::pki::Pki::new("txmq gRPC test CA");
    let site = tls_site(&pki, &[]);
    let (grpc, ca, ns) = (site.grpc.clone(), site.ca.clone(), site.ns.clone());

    let (endpoint, ca_file) = (grpc.clone(), ca.clone());
    let sent = tokio::task::spawn_blocking(move || {
        rocketmq::python_json(
            &python,
            "secure_producer.py",
            &[&endpoint, "rmq-tls", &ca_file],
        )
    })
    .await
    .unwrap();
    assert!(sent["id"].is_string(), "sent over TLS: {sent}");

    assert!(
        served_connection(&grpc).await.is_none(),
        "a plaintext gRPC client is not served"
    );
    let log = site.broker.log_text();
    assert!(
        log.contains("plaintext (not TLS) connection to a TLS port"),
        "{log}"
    );
    let got = bodies_read(&ns, "rmq-tls", "tls-check", 1, &["--tls-ca", &ca]).await;
    assert_eq!(got, ["over-tls"]);
}

/// With `--acl-file` every gRPC call signs in, as RocketMQ 5 clients do
/// with an access key (an HMAC-SHA1 `authorization` header) and is held to
/// the user's permissions: the official Python client, over TLS, sends as
/// a user with `pub` on the topic; a wrong secret and a client without
/// keys are refused as not authenticated, a user without `pub` as not
/// permitted (`PERMISSION_DENIED` naming the user and the topic), each with
/// a log line; the Node.js client sends as alice too (its signature in
/// upper-case hex); txmq's CLI reads only the messages alice sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_sign_in_with_access_keys_and_keep_to_the_acl() {
    let Some(python) = rocketmq::python() else {
        return;
    };
    let (pki, acl) = pki_with_acl(
        r#"
[[user]]
access_key = "alice"
secret_key = "alice-secret"
topics = { "rmq-acl" = ["pub", "sub"] }
groups = { "acl-check" = ["sub"] }

[[user]]
access_key = "bob"
secret_key = "bob-secret"
topics = { "other" = ["pub"] }
"#,
    );
    let site = tls_site(&pki, &["--acl-file", &acl]);
    let (grpc, ca, ns) = (site.grpc.clone(), site.ca.clone(), site.ns.clone());
    let send_as = |key: &str, secret: &str| {
        let (python, grpc, ca) = (python.clone(), grpc.clone(), ca.clone());
        let (key, secret) = (key.to_string(), secret.to_string());
        tokio::task::spawn_blocking(move || {
            rocketmq::python_json(
                &python,
                "secure_producer.py",
                &[&grpc, "rmq-acl", &ca, &key, &secret],
            )
        })
    };
    // Alice first: the topic is made for a user who may send to it.
    let alice = send_as("alice", "alice-secret").await.unwrap();
    assert!(alice["id"].is_string(), "alice sends: {alice}");
    // The Node.js client signs in hex of upper case, over TLS too.
    let mut node_sent = false;
    if let Some(node) = rocketmq::node() {
        let (grpc, ca) = (grpc.clone(), ca.clone());
        let sent = tokio::task::spawn_blocking(move || {
            let args = [grpc.as_str(), "rmq-acl", &ca, "alice", "alice-secret"];
            rocketmq::node_json(&node, "secure_producer.js", &args)
        })
        .await
        .unwrap();
        assert!(sent["id"].is_string(), "alice sends from Node.js: {sent}");
        node_sent = true;
    }
    let (wrong, bob, anonymous) = tokio::join!(
        send_as("alice", "not-her-secret"),
        send_as("bob", "bob-secret"),
        send_as("", ""),
    );
    // The client names the refusal of a send; one of its start (the route
    // query) it reports as a route it could not fetch: the log says why.
    let bob = bob.unwrap();
    let error = bob["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("PERMISSION_DENIED")
            && error.contains("user 'bob' may not pub to topic 'rmq-acl'"),
        "{bob}"
    );
    for refused in [wrong.unwrap(), anonymous.unwrap()] {
        assert!(
            refused["id"].is_null() && refused["error"].is_string(),
            "{refused}"
        );
    }
    let log = site.broker.log_text();
    for line in [
        "gRPC call refused: authentication failed for access key 'alice': unknown access key or wrong secret",
        "gRPC call refused: the authorization header names no Credential",
        "access denied",
    ] {
        assert!(log.contains(line), "{line}: {log}");
    }

    let alice = [
        "--tls-ca",
        &ca,
        "--access-key",
        "alice",
        "--secret-key",
        "alice-secret",
    ];
    let mut want = vec!["over-tls"];
    if node_sent {
        want.insert(0, "node-over-tls");
    }
    let got = bodies_read(&ns, "rmq-acl", "acl-check", want.len(), &alice).await;
    assert_eq!(got, want);
}

/// Under `--acl-file` a transaction of a RocketMQ client whose user has
/// `tx` of the group (its topic) is checked back over its telemetry
/// stream, as without an ACL file: the checker is asked twice and commits.
/// And a check-back goes only to a client whose user has `tx`: a client of
/// a user with `pub` alone, publishing the topic, is asked nothing while
/// a transaction waits; one whose user has `tx` is asked, and its commit
/// ends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_check_backs_under_the_acl_go_to_clients_whose_user_has_tx() {
    let Some(python) = rocketmq::python() else {
        return;
    };
    let (_pki, acl) = pki_with_acl(
        r#"
[[user]]
access_key = "carol"
secret_key = "carol-secret"
topics = { "rmq-acl-*" = ["pub", "sub"] }
groups = { "rmq-acl-tx" = ["tx"], "rmq-acl-deny" = ["tx"], "acl-tx-check" = ["sub"], "acl-deny-check" = ["sub"] }

[[user]]
access_key = "dave"
secret_key = "dave-secret"
topics = { "rmq-acl-deny" = ["pub"] }
"#,
    );
    let (cluster, ns, grpc, _running) = setup(&["--acl-file", &acl]).await;
    let carol = ["--access-key", "carol", "--secret-key", "carol-secret"];
    let sent = {
        let (python, grpc) = (python.clone(), grpc.clone());
        tokio::task::spawn_blocking(move || {
            let args = [
                &grpc,
                "rmq-acl-plain",
                "rmq-acl-tx",
                "carol",
                "carol-secret",
            ];
            rocketmq::python_json(&python, "producer.py", &args)
        })
        .await
        .unwrap()
    };
    assert_eq!(
        sent["asked"],
        serde_json::json!([["k-check"], ["k-check"]]),
        "{sent}"
    );
    let got = bodies_read(&ns, "rmq-acl-tx", "acl-tx-check", 2, &carol).await;
    assert_eq!(got, ["checked", "committed"]);

    // A transaction left open by a txmq producer of the group (the topic).
    let topic = "rmq-acl-deny";
    let mut args = vec!["tx", "send", topic, "--group", topic, "--body", "open"];
    args.extend(["--key", "k-open", "--local", "unknown"]);
    args.extend(carol);
    ok(&txmq(&ns, &args, None).await);
    let listen = |user: &'static str, seconds: &'static str| {
        let (python, grpc) = (python.clone(), grpc.clone());
        tokio::task::spawn_blocking(move || {
            let secret = format!("{user}-secret");
            let args = [grpc.as_str(), topic, seconds, user, &secret];
            rocketmq::python_json(&python, "tx_listener.py", &args)
        })
    };
    // Checks come every 300 ms once the transaction is 1 s old: dave's
    // client listens 3 s and is asked nothing; carol's until it is asked.
    let dave = listen("dave", "3").await.unwrap();
    assert_eq!(dave["asked"], serde_json::json!([]), "{dave}");
    let carol_asked = listen("carol", "60").await.unwrap();
    assert_eq!(
        carol_asked["asked"][0],
        serde_json::json!(["k-open"]),
        "{carol_asked}"
    );
    let got = bodies_read(&ns, topic, "acl-deny-check", 1, &carol).await;
    assert_eq!(got, ["open"]);
    cluster.shutdown().await;
}

/// `message` as a call of client `client` signed by `user` (whose secret
/// is `USER-secret`), as RocketMQ 5 clients sign: the HMAC-SHA1 of the
/// call's `x-mq-date-time`, in hex.
fn signed<T>(message: T, user: &str, client: &str) -> tonic::Request<T> {
    let date = "20261207T120000Z";
    let key = ring::hmac::Key::new(
        ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY,
        format!("{user}-secret").as_bytes(),
    );
    let signature: String = ring::hmac::sign(&key, date.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut r = tonic::Request::new(message);
    let authorization = format!(
        "MQv2-HMAC-SHA1 Credential={user}, SignedHeaders=x-mq-date-time, Signature={signature}"
    );
    let metadata = r.metadata_mut();
    metadata.insert("x-mq-date-time", date.parse().unwrap());
    metadata.insert("authorization", authorization.parse().unwrap());
    metadata.insert("x-mq-client-id", client.parse().unwrap());
    r
}

/// Under `--acl-file`, RPC by RPC, a user is held to what txmq's own port
/// holds it to: a route query creates a topic only for a user who may
/// send to it; receiving and acknowledging need `sub` of the topic and the
/// group; ending a transaction needs `tx` of its group; a client id in use
/// by another user's telemetry stream is refused, and another user's
/// goodbye does not end that stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_grpc_call_is_held_to_its_users_permissions() {
    let (_pki, acl) = pki_with_acl(
        r#"
[[user]]
access_key = "alice"
secret_key = "alice-secret"
topics = { "orders" = ["pub", "sub"] }
groups = { "orders" = ["tx"], "g" = ["sub"] }

[[user]]
access_key = "eve"
secret_key = "eve-secret"
topics = { "orders" = ["pub"] }
groups = { "g" = ["sub"] }
"#,
    );
    let (cluster, _ns, grpc, _running) = setup(&["--acl-file", &acl]).await;
    let channel = served_connection_unsigned(&grpc).await;
    let mut rpc = pb::messaging_service_client::MessagingServiceClient::new(channel);
    let denied = |answer: Result<tonic::Status, String>, says: &str| {
        let status = answer.unwrap_or_else(|e| panic!("{says}: answered {e}"));
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
        assert!(status.message().contains(says), "{says}: {status:?}");
    };

    // Route queries: a topic is made only for a user who may send to it.
    let route = |topic: &str| pb::QueryRouteRequest {
        topic: Some(resource(topic)),
        endpoints: None,
    };
    let code = |r: pb::QueryRouteResponse| r.status.unwrap().code;
    let eve_new = rpc.query_route(signed(route("eve-new"), "eve", "e1")).await;
    assert_eq!(
        code(eve_new.unwrap().into_inner()),
        pb::Code::TopicNotFound as i32
    );
    let again = rpc
        .query_route(signed(route("eve-new"), "alice", "a1"))
        .await;
    assert_eq!(
        code(again.unwrap().into_inner()),
        pb::Code::TopicNotFound as i32,
        "not made"
    );
    let orders = rpc
        .query_route(signed(route("orders"), "alice", "a1"))
        .await;
    assert_eq!(code(orders.unwrap().into_inner()), pb::Code::Ok as i32);

    // Receiving and acknowledging: eve has the group, not the topic.
    let receive = pb::ReceiveMessageRequest {
        group: Some(resource("g")),
        message_queue: Some(pb::MessageQueue {
            topic: Some(resource("orders")),
            ..Default::default()
        }),
        batch_size: 1,
        invisible_duration: Some(prost_types::Duration {
            seconds: 30,
            nanos: 0,
        }),
        ..Default::default()
    };
    let received = rpc.receive_message(signed(receive, "eve", "e1")).await;
    denied(
        received
            .map(|_| "a stream".to_string())
            .err()
            .ok_or("served".into()),
        "user 'eve' may not sub to topic 'orders'",
    );
    let ack = pb::AckMessageRequest {
        group: Some(resource("g")),
        topic: Some(resource("orders")),
        entries: vec![pb::AckMessageEntry {
            message_id: "01".into(),
            receipt_handle: "p1-0-0-receipt".into(),
            lite_topic: None,
        }],
    };
    let acked = rpc.ack_message(signed(ack, "eve", "e1")).await;
    denied(
        acked.map(|r| format!("{r:?}")).err().ok_or("served".into()),
        "user 'eve' may not sub to topic 'orders'",
    );

    // A transaction alice opened: eve may not end it, alice may.
    let half = rmq_message("orders", "half", pb::MessageType::Transaction, None);
    let sent = rpc
        .send_message(signed(
            pb::SendMessageRequest {
                messages: vec![half],
            },
            "alice",
            "a1",
        ))
        .await
        .unwrap()
        .into_inner();
    let entry = &sent.entries[0];
    let end = |resolution: pb::TransactionResolution| pb::EndTransactionRequest {
        topic: Some(resource("orders")),
        message_id: entry.message_id.clone(),
        transaction_id: entry.transaction_id.clone(),
        resolution: resolution as i32,
        source: pb::TransactionSource::SourceClient as i32,
        trace_context: String::new(),
    };
    let by_eve = rpc
        .end_transaction(signed(
            end(pb::TransactionResolution::Rollback),
            "eve",
            "e1",
        ))
        .await;
    denied(
        by_eve
            .map(|r| format!("{r:?}"))
            .err()
            .ok_or("served".into()),
        "user 'eve' may not tx as producer group 'orders'",
    );
    let by_alice = rpc
        .end_transaction(signed(
            end(pb::TransactionResolution::Commit),
            "alice",
            "a1",
        ))
        .await;
    assert_eq!(
        by_alice.unwrap().into_inner().status.unwrap().code,
        pb::Code::Ok as i32
    );

    // Telemetry: alice's stream of client "a1" is hers.
    let settings = pb::TelemetryCommand {
        status: None,
        command: Some(pb::telemetry_command::Command::Settings(pb::Settings {
            client_type: Some(pb::ClientType::Producer as i32),
            pub_sub: Some(pb::settings::PubSub::Publishing(pb::Publishing {
                topics: vec![resource("orders")],
                ..Default::default()
            })),
            ..Default::default()
        })),
    };
    use futures_util::StreamExt;
    let stream = futures_util::stream::iter([settings]).chain(futures_util::stream::pending());
    let mut alice = rpc
        .telemetry(signed(stream, "alice", "a1"))
        .await
        .expect("alice's stream")
        .into_inner();
    alice
        .message()
        .await
        .expect("settings answered")
        .expect("a reply");
    let eve_stream = futures_util::stream::pending::<pb::TelemetryCommand>();
    let taken = rpc.telemetry(signed(eve_stream, "eve", "a1")).await;
    denied(
        taken
            .map(|_| "a stream".to_string())
            .err()
            .ok_or("served".into()),
        "client id 'a1' is in use by another user",
    );
    let goodbye = pb::NotifyClientTerminationRequest { group: None };
    rpc.notify_client_termination(signed(goodbye, "eve", "a1"))
        .await
        .expect("answered");
    let still = tokio::time::timeout(Duration::from_millis(500), alice.message()).await;
    assert!(still.is_err(), "alice's stream goes on: {still:?}");
    // The connection's streams end before the broker stops.
    drop((alice, rpc));
    cluster.shutdown().await;
}

/// A connection to the gRPC port.
async fn served_connection_unsigned(grpc: &str) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{grpc}"))
        .unwrap()
        .connect()
        .await
        .expect("connects")
}

/// One HTTP/2 frame: its 9-byte header (length, type, flags, stream) and
/// payload.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut frame = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    frame.extend([kind, flags]);
    frame.extend(stream.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// The request headers of a gRPC call of `rpc`, HPACK-encoded without
/// the dynamic table (static-table names, literal values).
fn h2_call_headers(authority: &str, rpc: &str) -> Vec<u8> {
    let path = format!("/apache.rocketmq.v2.MessagingService/{rpc}");
    // :method POST and :scheme http are indexed fields of the static table.
    let mut block = vec![0x83, 0x86];
    let mut literal = |name: &[u8], value: &str| {
        block.extend_from_slice(name);
        block.push(value.len() as u8);
        block.extend_from_slice(value.as_bytes());
    };
    literal(&[0x04], &path); // :path
    literal(&[0x01], authority); // :authority
    literal(&[0x0f, 0x10], "application/grpc"); // content-type (index 31)
    literal(&[0x00, 0x02, b't', b'e'], "trailers");
    block
}

/// `--grpc-max-streams`: the broker announces the limit in its HTTP/2
/// settings; a client that keeps to it queues its calls past it (the next
/// one is served once one of them ends), and a stream opened past it
/// anyway is refused with REFUSED_STREAM, while the connection and the
/// others go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_streams_past_the_limit_wait_or_are_refused_and_the_connection_goes_on() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (cluster, ns, grpc, _running) = setup(&["--grpc-max-streams", "2"]).await;
    let topic = "streams";

    // A client that keeps to the limit: two calls held open (half a
    // message each), a third waits, and is served once one of them ends.
    let channel = served_connection(&grpc).await.expect("served");
    let half = framed_send(topic, "held");
    let half = bytes::Bytes::from(half[..half.len() / 2].to_vec());
    let (held, held_end) = fed_call(&channel, &grpc, "SendMessage");
    held.send(half.clone()).unwrap();
    let (other, other_end) = fed_call(&channel, &grpc, "SendMessage");
    other.send(half).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let third = tokio::spawn(query_route_on(channel.clone(), topic));
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(!third.is_finished(), "the third call waits for a stream");
    // Another connection is served meanwhile.
    assert!(served_connection(&grpc).await.is_some());
    // The held call ends (its body ends half-way): its stream is free.
    drop(held);
    let (code, message, _) = call_end(held_end, "the cut call ends").await;
    assert_ne!(code, "0", "a half message is not taken: {message}");
    let answer = tokio::time::timeout(Duration::from_secs(10), third)
        .await
        .expect("the third call is served once a stream is free")
        .unwrap()
        .expect("answered");
    assert_eq!(answer.status.unwrap().code, pb::Code::Ok as i32);
    drop(other);
    call_end(other_end, "the second cut call ends").await;

    // A client that does not keep to it, in raw HTTP/2 frames.
    let mut conn = tokio::net::TcpStream::connect(&grpc).await.unwrap();
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend(h2_frame(0x4, 0, 0, &[])); // our SETTINGS: none
    conn.write_all(&hello).await.unwrap();
    // The next frame from the broker: its type, flags, stream and payload.
    async fn read_frame(conn: &mut tokio::net::TcpStream) -> (u8, u8, u32, Vec<u8>) {
        let mut header = [0u8; 9];
        tokio::time::timeout(Duration::from_secs(10), conn.read_exact(&mut header))
            .await
            .expect("a frame within 10 s")
            .expect("the connection is open");
        let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
        let stream = u32::from_be_bytes(header[5..9].try_into().unwrap()) & 0x7fff_ffff;
        let mut payload = vec![0; len];
        conn.read_exact(&mut payload).await.unwrap();
        (header[3], header[4], stream, payload)
    }
    // The broker's SETTINGS (not the ACK of ours) announce the limit.
    let announced = loop {
        let (kind, flags, _, payload) = read_frame(&mut conn).await;
        if kind == 0x4 && flags & 0x1 == 0 {
            break payload
                .chunks(6)
                .find(|p| u16::from_be_bytes([p[0], p[1]]) == 0x3)
                .map(|p| u32::from_be_bytes(p[2..6].try_into().unwrap()));
        }
    };
    assert_eq!(announced, Some(2), "SETTINGS_MAX_CONCURRENT_STREAMS");
    conn.write_all(&h2_frame(0x4, 0x1, 0, &[])).await.unwrap(); // ACK
                                                                // Streams 1, 3 and 5 open (headers, no end of stream); only 5 is past
                                                                // the limit.
    let headers = h2_call_headers(&grpc, "SendMessage");
    let mut opened = Vec::new();
    for stream in [1, 3, 5] {
        opened.extend(h2_frame(0x1, 0x4, stream, &headers)); // END_HEADERS
    }
    conn.write_all(&opened).await.unwrap();
    let refused = loop {
        let (kind, _, stream, payload) = read_frame(&mut conn).await;
        if kind == 0x3 {
            break (stream, u32::from_be_bytes(payload[..4].try_into().unwrap()));
        }
        assert_ne!(kind, 0x7, "GOAWAY: the connection was closed");
    };
    assert_eq!(refused, (5, 0x7), "RST_STREAM(REFUSED_STREAM) on stream 5");
    // The connection goes on: a PING is answered.
    conn.write_all(&h2_frame(0x6, 0, 0, b"txmq-pin"))
        .await
        .unwrap();
    loop {
        let (kind, flags, _, payload) = read_frame(&mut conn).await;
        if kind == 0x6 && flags & 0x1 == 1 {
            assert_eq!(payload, b"txmq-pin");
            break;
        }
        assert_ne!(kind, 0x7, "GOAWAY: the connection was closed");
    }
    drop(conn);
    // Nothing of the cut calls was stored, and the broker serves on.
    txmq_send(&ns, topic, &["after"]).await;
    let got = consume_all(&ns, topic, "streams-check", 1).await;
    assert_eq!(got.iter().map(body).collect::<Vec<_>>(), ["after"]);
    cluster.shutdown().await;
}

/// An accept that fails (the broker out of file descriptors), on the gRPC
/// port and on txmq's own, backs off instead of spinning a core, with a
/// WARN line, and both serve again once descriptors are free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_grpc_accept_backs_off_and_the_port_recovers() {
    let (cluster, ns, grpc, running) = setup(&[]).await;
    assert!(served_connection(&grpc).await.is_some());
    // Out of file descriptors: the broker may open only two more.
    let pid = running.broker.pid();
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let soft = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .expect("the soft limit of open files")
        .to_string();
    let limit = |n: String| {
        let status = std::process::Command::new("prlimit")
            .args(["--pid", &pid.to_string(), &format!("--nofile={n}:")])
            .status()
            .expect("prlimit runs");
        assert!(status.success());
    };
    limit((open + 2).to_string());
    // Both ports: txmq's own accepts the same way.
    let mut waiting = Vec::new();
    for _ in 0..8 {
        waiting.push(tokio::net::TcpStream::connect(&grpc).await.unwrap());
        let own = tokio::net::TcpStream::connect(&running.broker.addr).await;
        waiting.push(own.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = cpu_ticks(pid);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let used = cpu_ticks(pid) - before;
    // A loop that tried again at once would use the whole second (100
    // ticks at the usual 100 Hz); backing off, a few.
    assert!(
        used < 40,
        "{used} ticks of CPU in a second out of descriptors"
    );
    let log = running.broker.log_text();
    assert!(log.contains("gRPC accept failed"), "{log}");
    assert!(
        log.contains("txmq_remoting::server: accept failed"),
        "{log}"
    );
    limit(soft);
    drop(waiting);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while served_connection(&grpc).await.is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "served again with descriptors free"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let sent = txmq(&ns, &["send", "connections", "--body", "after"], None).await;
    assert!(ok(&sent).contains("SEND_OK"), "txmq's own port serves too");
    cluster.shutdown().await;
}
