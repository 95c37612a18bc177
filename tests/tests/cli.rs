//! The `txmq` command line against an in-process nameserver and broker:
//! the README flow, text and JSON output, sending from stdin or N times,
//! consuming with a count, an idle timeout or from the end, the admin
//! listings, and how errors are reported.

mod common;

use std::collections::{BTreeSet, HashSet};
use std::process::Output;
use std::time::{Duration, Instant};

use common::{txmq, wait_for_perm, wait_for_route};
use serde_json::Value;
use txmq::{Message, PERM_READ_WRITE};
use txmq_broker::FlushMode;
use txmq_tests::{consume_all, free_port, json_lines, txmq_cli, Cluster};

use txmq_tests::output::{ok, stderr, stdout};

/// Asserts a failure with a message on stderr and nothing on stdout; returns stderr.
#[track_caller]
fn failed(o: &Output) -> String {
    assert!(
        !o.status.success(),
        "txmq should have failed\nstdout:\n{}\nstderr:\n{}",
        stdout(o),
        stderr(o)
    );
    assert!(
        stdout(o).trim().is_empty(),
        "nothing on stdout: {}",
        stdout(o)
    );
    let err = stderr(o);
    assert!(err.contains("error"), "stderr says what went wrong: {err}");
    err
}

fn text(v: &Value, field: &str) -> String {
    v[field]
        .as_str()
        .unwrap_or_else(|| panic!("{field} is not a string in {v}"))
        .to_string()
}

fn number(v: &Value, field: &str) -> u64 {
    v[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{field} is not a number in {v}"))
}

fn body_set(objects: &[Value]) -> BTreeSet<String> {
    objects.iter().map(|o| text(o, "body")).collect()
}

fn msg_id_of_text_line(line: &str) -> String {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("msg_id="))
        .unwrap_or_else(|| panic!("no msg_id in {line:?}"))
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_flow_in_text() {
    let cluster = Cluster::start(FlushMode::Async).await;
    let ns = &cluster.nameserver;
    let addr = cluster.brokers[0].local_addr().to_string();

    let out = ok(&txmq(ns, &["topic", "create", "orders", "--queues", "4"], None).await);
    assert_eq!(
        out.trim(),
        format!("created topic orders on broker-a ({addr}): 4 queues, perm rw")
    );

    let out = ok(&txmq(
        ns,
        &[
            "send", "orders", "--body", "hello", "--key", "k1", "--tag", "t1",
        ],
        None,
    )
    .await);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 1, "one acknowledgement: {out}");
    assert!(
        lines[0].starts_with("SEND_OK orders broker=broker-a q="),
        "{out}"
    );
    assert!(lines[0].ends_with("key=k1 tag=t1"), "{out}");
    let msg_id = msg_id_of_text_line(lines[0]);
    assert_eq!(msg_id.len(), 32);

    let started = Instant::now();
    let out = ok(&txmq(
        ns,
        &["consume", "orders", "--group", "g1", "--count", "1"],
        None,
    )
    .await);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "--count 1 exits once it has the message"
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 1, "{out}");
    assert!(lines[0].starts_with("orders broker=broker-a q="), "{out}");
    assert_eq!(
        msg_id_of_text_line(lines[0]),
        msg_id,
        "the message sent: {out}"
    );
    assert!(lines[0].ends_with("key=k1 tag=t1 body=hello"), "{out}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_flow_in_json() {
    let cluster = Cluster::start(FlushMode::Async).await;
    let ns = &cluster.nameserver;
    let addr = cluster.brokers[0].local_addr().to_string();

    let out = txmq(
        ns,
        &[
            "--output", "json", "topic", "create", "orders", "--queues", "4",
        ],
        None,
    )
    .await;
    let created = json_lines(ok(&out).as_bytes());
    assert_eq!(created.len(), 1, "{created:?}");
    assert_eq!(text(&created[0], "topic"), "orders");
    assert_eq!(text(&created[0], "broker"), "broker-a");
    assert_eq!(text(&created[0], "addr"), addr);
    assert_eq!(number(&created[0], "queues"), 4);
    assert_eq!(text(&created[0], "perm"), "rw");

    let args = [
        "send", "orders", "--body", "hello", "--key", "k1", "--tag", "t1", "--output", "json",
    ];
    let sent = json_lines(ok(&txmq(ns, &args, None).await).as_bytes());
    assert_eq!(sent.len(), 1, "{sent:?}");
    let s = &sent[0];
    let msg_id = text(s, "msg_id");
    assert_eq!(msg_id.len(), 32);
    assert!(msg_id.chars().all(|c| c.is_ascii_hexdigit()), "{msg_id}");
    assert_eq!(text(s, "topic"), "orders");
    assert!(number(s, "queue") < 4, "{s}");
    assert_eq!(
        number(s, "queue_offset"),
        0,
        "the first message of its queue: {s}"
    );
    assert_eq!(text(s, "key"), "k1");
    assert_eq!(text(s, "tag"), "t1");
    assert_eq!(text(s, "body"), "hello");
    assert_eq!(text(s, "status"), "SEND_OK");
    assert!(s.get("body_base64").is_none(), "{s}");

    let args = [
        "consume", "orders", "--group", "g1", "--count", "1", "--output", "json",
    ];
    let got = json_lines(ok(&txmq(ns, &args, None).await).as_bytes());
    assert_eq!(got.len(), 1, "{got:?}");
    let r = &got[0];
    assert_eq!(text(r, "msg_id"), msg_id);
    assert_eq!(text(r, "topic"), "orders");
    assert_eq!(r["queue"], s["queue"]);
    assert_eq!(r["queue_offset"], s["queue_offset"]);
    assert_eq!(text(r, "key"), "k1");
    assert_eq!(text(r, "tag"), "t1");
    assert_eq!(text(r, "body"), "hello");
    assert!(r.get("body_base64").is_none(), "{r}");

    // Without a key or tag the fields are there, as null.
    let args = ["send", "orders", "--body", "plain", "--output", "json"];
    let sent = json_lines(ok(&txmq(ns, &args, None).await).as_bytes());
    assert_eq!(
        (&sent[0]["key"], &sent[0]["tag"]),
        (&Value::Null, &Value::Null),
        "{}",
        sent[0]
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_is_not_utf8_is_printed_as_base64() {
    let cluster = Cluster::start(FlushMode::Async).await;
    let ns = &cluster.nameserver;
    cluster
        .admin()
        .await
        .create_topic("bin", 1, PERM_READ_WRITE, None)
        .await
        .unwrap();
    let producer = cluster.producer().await;
    let binary = producer
        .send(Message::new("bin", vec![0xffu8, 0x00, 0x80]).with_key("raw"))
        .await
        .unwrap();
    let utf8 = producer.send(Message::new("bin", "café")).await.unwrap();
    producer.close().await.unwrap();

    let args = [
        "consume", "bin", "--group", "json", "--count", "2", "--output", "json",
    ];
    let got = json_lines(ok(&txmq(ns, &args, None).await).as_bytes());
    assert_eq!(got.len(), 2, "{got:?}");
    let b = got
        .iter()
        .find(|o| text(o, "msg_id") == binary.msg_id.to_string())
        .expect("the binary message");
    assert_eq!(
        text(b, "body_base64"),
        "/wCA",
        "standard base64 of ff 00 80: {b}"
    );
    assert!(
        b.get("body").is_none(),
        "no text body for bytes that are not UTF-8: {b}"
    );
    assert_eq!(text(b, "key"), "raw");
    let u = got
        .iter()
        .find(|o| text(o, "msg_id") == utf8.msg_id.to_string())
        .expect("the UTF-8 message");
    assert_eq!(text(u, "body"), "café");
    assert!(u.get("body_base64").is_none(), "{u}");

    // In text, too, the bytes come out as base64, on one line.
    let args = ["consume", "bin", "--group", "text", "--count", "2"];
    let out = ok(&txmq(ns, &args, None).await);
    assert_eq!(out.lines().count(), 2, "{out}");
    assert!(
        out.lines().any(|l| l.ends_with("body_base64=/wCA")),
        "{out}"
    );
    assert!(out.lines().any(|l| l.ends_with("body=café")), "{out}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdin_sends_one_message_per_line() {
    let cluster = Cluster::start(FlushMode::Async).await;
    let ns = &cluster.nameserver;
    // The last line has no line ending; a Windows line ending is stripped.
    let input = "first line\nsecond line\r\nthird line";
    let args = [
        "send", "lines", "--stdin", "--key", "k", "--tag", "t", "--output", "json",
    ];
    let sent = json_lines(ok(&txmq(ns, &args, Some(input)).await).as_bytes());
    assert_eq!(sent.len(), 3, "{sent:?}");
    let expected: BTreeSet<String> = ["first line", "second line", "third line"]
        .map(String::from)
        .into();
    assert_eq!(body_set(&sent), expected);
    for s in &sent {
        assert_eq!(text(s, "status"), "SEND_OK");
        assert_eq!((text(s, "key"), text(s, "tag")), ("k".into(), "t".into()));
    }
    let ids: HashSet<String> = sent.iter().map(|s| text(s, "msg_id")).collect();
    assert_eq!(ids.len(), 3, "a message id each");

    let got = consume_all(ns, "g", "lines", 3, Duration::from_secs(2)).await;
    let got_bodies: BTreeSet<String> = got.iter().map(common::body_text).collect();
    assert_eq!(got_bodies, expected, "each line stored once, as it was");
    assert_eq!(got.len(), 3);
    let got_ids: HashSet<String> = got.iter().map(|m| m.msg_id().to_string()).collect();
    assert_eq!(got_ids, ids, "the ids printed are the ids stored");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn count_sends_the_body_that_many_times() {
    let cluster = Cluster::start(FlushMode::Async).await;
    let ns = &cluster.nameserver;
    let args = [
        "send", "ticks", "--body", "tick", "--count", "25", "--output", "json",
    ];
    let out = txmq(ns, &args, None).await;
    let sent = json_lines(ok(&out).as_bytes());
    assert_eq!(sent.len(), 25, "{sent:?}");
    assert!(sent
        .iter()
        .all(|s| text(s, "body") == "tick" && text(s, "status") == "SEND_OK"));
    let ids: HashSet<String> = sent.iter().map(|s| text(s, "msg_id")).collect();
    assert_eq!(ids.len(), 25, "25 distinct messages");
    let places: HashSet<(u64, u64)> = sent
        .iter()
        .map(|s| (number(s, "queue"), number(s, "queue_offset")))
        .collect();
    assert_eq!(places.len(), 25, "each stored in its own place");
    assert!(
        stderr(&out).contains("sent 25 messages"),
        "{}",
        stderr(&out)
    );

    let got = consume_all(ns, "g", "ticks", 26, Duration::from_secs(1)).await;
    assert_eq!(got.len(), 25);
    cluster.shutdown().await;
}

/// `--shard-key` sends to the key's queue among the topic's queues: a
/// topic no broker serves yet is not auto-created by it (the key would go
/// to queue 0 of a broker, and after the creation to its own queue), and
/// the error says what to do. Once created, the key's messages share a
/// queue, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_key_send_to_a_topic_not_created_fails_saying_to_create_it() {
    let cluster = Cluster::start(FlushMode::Async).await;
    let ns = &cluster.nameserver;
    let send = ["send", "keyed", "--body", "k-1", "--shard-key", "k"];
    let err = failed(&txmq(ns, &send, None).await);
    assert!(
        err.contains("NO_ROUTE (12)") && err.contains("txmq topic create"),
        "{err}"
    );
    // Nothing was created by it.
    let err = failed(&txmq(ns, &["topic", "route", "keyed"], None).await);
    assert!(err.contains("NO_ROUTE"), "{err}");

    ok(&txmq(ns, &["topic", "create", "keyed", "--queues", "8"], None).await);
    wait_for_route(ns, "keyed", &["broker-a"]).await;
    let mut places = Vec::new();
    for body in ["k-1", "k-2", "k-3"] {
        let args = [
            "--output",
            "json",
            "send",
            "keyed",
            "--body",
            body,
            "--shard-key",
            "k",
        ];
        let sent = json_lines(ok(&txmq(ns, &args, None).await).as_bytes());
        places.push((number(&sent[0], "queue"), number(&sent[0], "queue_offset")));
    }
    let queue = places[0].0;
    assert_eq!(
        places,
        [
            (queue, places[0].1),
            (queue, places[0].1 + 1),
            (queue, places[0].1 + 2)
        ],
        "one queue, in order"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consume_with_an_idle_timeout_exits_with_what_it_got() {
    let cluster = Cluster::start(FlushMode::Async).await;
    let ns = &cluster.nameserver;
    ok(&txmq(ns, &["topic", "create", "quiet", "--queues", "2"], None).await);
    wait_for_route(ns, "quiet", &["broker-a"]).await;

    // Nothing there: exits 0 without printing.
    let started = Instant::now();
    let args = [
        "consume",
        "quiet",
        "--group",
        "g",
        "--idle-timeout",
        "500ms",
        "--output",
        "json",
    ];
    let output = txmq(ns, &args, None).await;
    let out = ok(&output);
    assert!(out.trim().is_empty(), "{out}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    // The topic is there: no note about it.
    let err = stderr(&output);
    assert!(!err.contains("note:"), "{err}");

    let producer = cluster.producer().await;
    for i in 0..3 {
        producer
            .send(Message::new("quiet", format!("m{i}")))
            .await
            .unwrap();
    }
    producer.close().await.unwrap();
    let started = Instant::now();
    let got = json_lines(ok(&txmq(ns, &args, None).await).as_bytes());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(body_set(&got), ["m0", "m1", "m2"].map(String::from).into());
    assert_eq!(got.len(), 3);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consume_of_a_topic_no_broker_serves_says_so_and_waits_for_it() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    let cluster = Cluster::start(FlushMode::Async).await;
    let ns = &cluster.nameserver;

    // A mistyped name waited in silence; it still waits (a first send may
    // create the topic), and says why on stderr, once.
    let args = ["consume", "typo", "--group", "g", "--idle-timeout", "1s"];
    let output = txmq(ns, &args, None).await;
    let out = ok(&output);
    assert!(out.trim().is_empty(), "{out}");
    let err = stderr(&output);
    assert!(
        err.contains(r#"no broker serves topic "typo" now"#)
            && err.contains("txmq topic create typo"),
        "{err}"
    );
    assert_eq!(err.matches("note:").count(), 1, "said once: {err}");

    // Created while a consume waits (its note read first, so it surely
    // started before), the topic's message is printed.
    let mut child = Command::new(txmq_tests::binary("txmq"))
        .args(["--nameserver", ns])
        .args(["consume", "late", "--group", "g", "--count", "1"])
        .args(["--idle-timeout", "20s", "--rebalance-interval", "200ms"])
        .args(["--route-refresh", "200ms"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start txmq consume");
    let mut note = String::new();
    let mut err_lines = BufReader::new(child.stderr.take().unwrap());
    let read = tokio::task::spawn_blocking(move || {
        let _ = err_lines.read_line(&mut note);
        note
    });
    let note = match tokio::time::timeout(Duration::from_secs(20), read).await {
        Ok(note) => note.unwrap(),
        Err(_) => {
            let _ = child.kill();
            panic!("no note from the waiting consume");
        }
    };
    assert!(note.contains(r#"topic "late""#), "{note}");
    ok(&txmq(ns, &["topic", "create", "late"], None).await);
    wait_for_route(ns, "late", &["broker-a"]).await;
    ok(&txmq(ns, &["send", "late", "--body", "found"], None).await);
    let output = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .expect("wait for txmq consume");
    assert!(output.status.success(), "{output:?}");
    assert!(stdout(&output).contains("found"), "{output:?}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consume_and_bench_consume_of_a_write_only_topic_fail_at_once() {
    let cluster = Cluster::start(FlushMode::Async).await;
    let ns = &cluster.nameserver;
    ok(&txmq(ns, &["topic", "create", "wo", "--perm", "w"], None).await);
    wait_for_route(ns, "wo", &["broker-a"]).await;
    ok(&txmq(ns, &["send", "wo", "--body", "kept"], None).await);

    // Without the check it waited out the idle timeout and exited 0.
    let started = Instant::now();
    let args = ["consume", "wo", "--group", "g", "--idle-timeout", "30s"];
    let out = txmq(ns, &args, None).await;
    let err = failed(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(r#"topic "wo" has no readable queue"#), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );

    let args = [
        "bench",
        "consume",
        "wo",
        "--group",
        "g",
        "--duration",
        "30s",
    ];
    let out = txmq(ns, &args, None).await;
    let err = failed(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(r#"topic "wo" has no readable queue"#), "{err}");

    // Made readable, the message sent meanwhile is there.
    ok(&txmq(ns, &["topic", "create", "wo", "--perm", "rw"], None).await);
    wait_for_perm(ns, "wo", PERM_READ_WRITE).await;
    let args = [
        "consume",
        "wo",
        "--group",
        "g",
        "--count",
        "1",
        "--idle-timeout",
        "10s",
    ];
    let out = ok(&txmq(ns, &args, None).await);
    assert!(out.contains("kept"), "{out}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consume_from_last_skips_the_messages_already_there() {
    let cluster = Cluster::start(FlushMode::Async).await;
    let ns = &cluster.nameserver;
    ok(&txmq(ns, &["topic", "create", "news", "--queues", "2"], None).await);
    wait_for_route(ns, "news", &["broker-a"]).await;
    ok(&txmq(ns, &["send", "news", "--stdin"], Some("old1\nold2\n")).await);

    let late = [
        "consume",
        "news",
        "--group",
        "late",
        "--from",
        "last",
        "--idle-timeout",
        "500ms",
        "--output",
        "json",
    ];
    let out = ok(&txmq(ns, &late, None).await);
    assert!(
        out.trim().is_empty(),
        "a new group from last skips what is there: {out}"
    );

    ok(&txmq(ns, &["send", "news", "--body", "new"], None).await);
    let got = json_lines(ok(&txmq(ns, &late, None).await).as_bytes());
    assert_eq!(
        body_set(&got),
        ["new"].map(String::from).into(),
        "only what came after it started"
    );
    assert_eq!(got.len(), 1);

    // A group starting from first sees everything.
    let args = [
        "consume",
        "news",
        "--group",
        "early",
        "--idle-timeout",
        "500ms",
        "--output",
        "json",
    ];
    let got = json_lines(ok(&txmq(ns, &args, None).await).as_bytes());
    assert_eq!(
        body_set(&got),
        ["new", "old1", "old2"].map(String::from).into()
    );
    assert_eq!(got.len(), 3);
    cluster.shutdown().await;
}

/// A consume with a tag filter that stops before its long poll's wait is
/// over commits past the messages the filter skipped: the broker answers
/// a pull that skipped some at once (it waited the whole wait, and an
/// `--idle-timeout` shorter than that left the skipped backlog as lag).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consume_with_a_tag_filter_commits_past_what_it_skipped() {
    let cluster = Cluster::start(FlushMode::Async).await;
    let ns = &cluster.nameserver;
    ok(&txmq(ns, &["topic", "create", "mixed", "--queues", "2"], None).await);
    wait_for_route(ns, "mixed", &["broker-a"]).await;
    let lines: String = (0..40).map(|i| format!("m{i}\n")).collect();
    ok(&txmq(
        ns,
        &["send", "mixed", "--stdin", "--tag", "plain"],
        Some(&lines),
    )
    .await);
    ok(&txmq(
        ns,
        &["send", "mixed", "--body", "wanted", "--tag", "rare"],
        None,
    )
    .await);
    let args = [
        "consume",
        "mixed",
        "--group",
        "rare-only",
        "--tag",
        "rare",
        "--idle-timeout",
        "1s",
        "--output",
        "json",
    ];
    let got = json_lines(ok(&txmq(ns, &args, None).await).as_bytes());
    assert_eq!(body_set(&got), ["wanted"].map(String::from).into());
    let show = ok(&txmq(
        ns,
        &["group", "show", "rare-only", "--output", "json"],
        None,
    )
    .await);
    let brokers = json_lines(show.as_bytes());
    let lags: Vec<u64> = brokers
        .iter()
        .flat_map(|b| b["queues"].as_array().cloned().unwrap_or_default())
        .filter(|q| q["topic"] == "mixed")
        .map(|q| number(&q, "lag"))
        .collect();
    assert_eq!(lags, [0, 0], "{show}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_consume_of_a_group_does_not_repeat_what_the_first_printed() {
    let cluster = Cluster::start(FlushMode::Async).await;
    let ns = &cluster.nameserver;
    ok(&txmq(ns, &["topic", "create", "jobs", "--queues", "4"], None).await);
    wait_for_route(ns, "jobs", &["broker-a"]).await;
    ok(&txmq(
        ns,
        &["send", "jobs", "--stdin"],
        Some("j1\nj2\nj3\nj4\nj5\n"),
    )
    .await);

    let first = [
        "consume", "jobs", "--group", "workers", "--count", "3", "--output", "json",
    ];
    let out = txmq(ns, &first, None).await;
    let first = json_lines(ok(&out).as_bytes());
    assert_eq!(first.len(), 3, "{first:?}");
    // Stopping with messages handed over but not printed is the command's
    // own choice, not a warning; and stderr, a pipe here, has no colours.
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("WARN"), "no warning: {err}");
    assert!(!err.contains('\x1b'), "no terminal colour codes: {err:?}");
    let rest = [
        "consume",
        "jobs",
        "--group",
        "workers",
        "--idle-timeout",
        "1s",
        "--output",
        "json",
    ];
    let second = json_lines(ok(&txmq(ns, &rest, None).await).as_bytes());
    assert_eq!(second.len(), 2, "the two not printed yet: {second:?}");
    let (a, b) = (body_set(&first), body_set(&second));
    assert!(a.is_disjoint(&b), "repeated: {a:?} and {b:?}");
    let all: BTreeSet<String> = a.union(&b).cloned().collect();
    assert_eq!(all, ["j1", "j2", "j3", "j4", "j5"].map(String::from).into());

    let third = txmq(ns, &rest, None).await;
    assert!(
        ok(&third).trim().is_empty(),
        "everything was committed: {}",
        ok(&third)
    );
    // Its queues were given to it (the earlier members left): no note.
    let err = String::from_utf8_lossy(&third.stderr);
    assert!(!err.contains("no queue"), "{err}");

    // A member killed while it holds the queues: they wait for it until
    // the brokers' consumer expiry, and the next consume, given none,
    // says so instead of exiting as if the topic were empty.
    ok(&txmq(ns, &["send", "jobs", "--body", "j6"], None).await);
    tokio::task::block_in_place(|| {
        use std::io::BufRead as _;
        let mut held = std::process::Command::new(txmq_tests::binary("txmq"))
            .args(["--nameserver", ns, "consume", "jobs", "--group", "workers"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("txmq consume starts");
        // Read on a thread of its own, so a consume that never prints
        // fails the test instead of hanging it.
        let stdout = held.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = std::io::BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(20));
        if line.is_err() {
            let _ = held.kill();
        }
        let line = line.expect("the held consumer prints j6");
        assert!(line.contains("j6"), "{line}");
        held.kill().expect("kill -9");
        held.wait().expect("reaped");
    });
    let out = txmq(ns, &rest, None).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("note: no queue of \"jobs\" was assigned to this member of group \"workers\"")
            && err.contains("txmq group show workers"),
        "{err}"
    );
    cluster.shutdown().await;
}

/// A consume whose reader stops (`| head`) ends as a shell reports a
/// process its closed pipe ended (141), without an error message, commits
/// what it printed and leaves its group: the next consume reads at once
/// (before, it was given no queue until the brokers' consumer expiry),
/// and gets the message whose line could not be written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consume_whose_reader_stops_leaves_its_group_and_exits_141() {
    let cluster = Cluster::start(FlushMode::Async).await;
    let ns = &cluster.nameserver;
    ok(&txmq(ns, &["topic", "create", "piped", "--queues", "1"], None).await);
    wait_for_route(ns, "piped", &["broker-a"]).await;
    ok(&txmq(ns, &["send", "piped", "--stdin"], Some("p1\np2\np3\n")).await);
    let mut child = std::process::Command::new(txmq_tests::binary("txmq"))
        .args(["--nameserver", ns, "consume", "piped", "--group", "readers"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("txmq consume starts");
    let stdout = child.stdout.take().expect("stdout");
    let first = tokio::task::block_in_place(|| {
        use std::io::BufRead as _;
        let mut lines = std::io::BufReader::new(stdout).lines();
        let first = lines.next().and_then(|l| l.ok()).unwrap_or_default();
        // The reader stops: the pipe closes.
        drop(lines);
        first
    });
    assert!(first.contains("body=p"), "{first}");
    // The next line written finds the pipe closed.
    ok(&txmq(ns, &["send", "piped", "--body", "p4"], None).await);
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("consume did not end when its standard output closed");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut err)
        .expect("stderr read");
    assert_eq!(status.code(), Some(141), "{status:?}: {err}");
    assert!(!err.contains("error"), "no error message: {err}");

    let rest = [
        "consume",
        "piped",
        "--group",
        "readers",
        "--idle-timeout",
        "1s",
    ];
    let out = txmq(ns, &rest, None).await;
    let (printed, err) = (ok(&out), String::from_utf8_lossy(&out.stderr));
    assert!(
        !err.contains("no queue"),
        "its queue was given at once: {err}"
    );
    // The line read was written, and committed; p4's never was (the
    // lines between may have been written before the pipe closed).
    let read = first.split("body=").nth(1).unwrap_or_default();
    assert!(printed.contains("body=p4"), "{printed}");
    assert!(
        !printed.contains(&format!("body={read}\n")),
        "{read} again: {printed}"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_list_topic_route_and_cluster_show_the_brokers() {
    let mut cluster = Cluster::start(FlushMode::Async).await;
    cluster.add_broker("broker-b", |_| {}).await;
    let ns = cluster.nameserver.clone();
    let ns = &ns;
    let addr_a = cluster.brokers[0].local_addr().to_string();
    let addr_b = cluster.brokers[1].local_addr().to_string();
    ok(&txmq(ns, &["topic", "create", "inventory", "--queues", "3"], None).await);
    let out = ok(&txmq(
        ns,
        &[
            "topic", "create", "audit", "--queues", "2", "--broker", "broker-b",
        ],
        None,
    )
    .await);
    assert!(out.contains("on broker-b"), "{out}");
    assert!(!out.contains("broker-a"), "only on broker-b: {out}");
    wait_for_route(ns, "inventory", &["broker-a", "broker-b"]).await;
    wait_for_route(ns, "audit", &["broker-b"]).await;

    // topic list
    let listed =
        json_lines(ok(&txmq(ns, &["topic", "list", "--output", "json"], None).await).as_bytes());
    let mut rows: Vec<(String, String, u64, String)> = listed
        .iter()
        .map(|t| {
            (
                text(t, "topic"),
                text(t, "broker"),
                number(t, "queues"),
                text(t, "perm"),
            )
        })
        .collect();
    rows.sort();
    assert_eq!(
        rows,
        [
            ("audit".into(), "broker-b".into(), 2, "rw".into()),
            ("inventory".into(), "broker-a".into(), 3, "rw".into()),
            ("inventory".into(), "broker-b".into(), 3, "rw".into()),
        ]
    );
    let out = ok(&txmq(ns, &["topic", "list"], None).await);
    assert!(
        out.lines().next().is_some_and(|h| h.contains("TOPIC")),
        "a header: {out}"
    );
    assert!(
        out.lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["audit", "broker-b", "2", "rw"]),
        "{out}"
    );

    // topic route
    let route = json_lines(
        ok(&txmq(
            ns,
            &["topic", "route", "inventory", "--output", "json"],
            None,
        )
        .await)
        .as_bytes(),
    );
    let mut brokers: Vec<(String, String, u64)> = route
        .iter()
        .map(|r| {
            assert_eq!(text(r, "topic"), "inventory");
            assert_eq!(text(r, "perm"), "rw");
            (text(r, "broker"), text(r, "addr"), number(r, "queues"))
        })
        .collect();
    brokers.sort();
    assert_eq!(
        brokers,
        [
            ("broker-a".into(), addr_a.clone(), 3),
            ("broker-b".into(), addr_b.clone(), 3)
        ]
    );
    let out = ok(&txmq(ns, &["topic", "route", "audit"], None).await);
    assert!(
        out.lines()
            .any(|l| l.contains("broker-b") && l.contains(&addr_b)),
        "the broker's name and address: {out}"
    );
    assert!(!out.contains("broker-a"), "{out}");

    // cluster
    let listed = json_lines(ok(&txmq(ns, &["cluster", "--output", "json"], None).await).as_bytes());
    assert_eq!(listed.len(), 2, "{listed:?}");
    for (b, (name, addr, topics)) in listed
        .iter()
        .zip([("broker-a", &addr_a, 1), ("broker-b", &addr_b, 2)])
    {
        assert_eq!(text(b, "broker_name"), name);
        assert_eq!(&text(b, "addr"), addr);
        assert!(!text(b, "cluster").is_empty());
        assert_eq!(number(b, "topic_count"), topics, "{b}");
        // Heartbeats come every 200 ms.
        assert!(number(b, "last_heartbeat_ms_ago") < 5_000, "{b}");
    }
    let out = ok(&txmq(ns, &["cluster"], None).await);
    for (name, addr) in [("broker-a", &addr_a), ("broker-b", &addr_b)] {
        assert!(
            out.lines()
                .any(|l| l.contains(name) && l.contains(addr.as_str()) && l.contains("s ago")),
            "{name} with its address and heartbeat age: {out}"
        );
    }
    cluster.shutdown().await;
}

#[test]
fn usage_errors_exit_with_code_2_and_say_how_to_call() {
    // No nameserver is needed: these fail before connecting.
    let ns = "127.0.0.1:1";
    for args in [
        &["frobnicate"][..],
        &["send", "t", "--body", "x", "--bogus"],
        &["send", "t"],
        &["consume", "t"],
        &["topic", "create", "t", "--queues", "many"],
        &["consume", "t", "--group", ""],
        &["consume", "t", "--group", "g", "--count", "0"],
        &["send", "t", "--body", "x", "--count", "0"],
        &["group", "show", ""],
        &["dlq", "list", ""],
        &["tx", "list", "--group", ""],
        &[
            "group",
            "reset-offset",
            "g",
            "--topic",
            "t",
            "--to",
            "yesterday",
        ],
        &["dlq", "list", "g", "--limit", "0"],
    ] {
        let o = txmq_cli(ns, args, None);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains("Usage:") || err.contains("--help"),
            "{args:?}: {err}"
        );
        assert!(err.starts_with("error:"), "{args:?}: {err}");
        assert!(stdout(&o).is_empty(), "{args:?}");
    }
    let o = txmq_cli(ns, &["frobnicate"], None);
    assert!(stderr(&o).contains("Usage: txmq"), "{}", stderr(&o));
    assert!(stderr(&o).contains("frobnicate"), "{}", stderr(&o));
    let o = txmq_cli(ns, &["send", "t", "--body", "x", "--bogus"], None);
    assert!(stderr(&o).contains("Usage: txmq send"), "{}", stderr(&o));
    assert!(stderr(&o).contains("--bogus"), "{}", stderr(&o));

    let o = txmq_cli(
        ns,
        &["consume", "t", "--group", "g", "--idle-timeout", "soon"],
        None,
    );
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("'soon'") && err.contains("--idle-timeout"),
        "names the bad value and flag: {err}"
    );
    assert!(
        err.contains("500ms"),
        "shows how durations are written: {err}"
    );
    assert!(err.contains("--help"), "{err}");
    let o = txmq_cli(ns, &["group", "show", ""], None);
    assert!(
        stderr(&o).contains("a group name cannot be empty"),
        "{}",
        stderr(&o)
    );

    // Checked after parsing, before connecting: exit 2 too.
    for (args, says) in [
        (&["bench", "e2e", "t", "--rate", "0"][..], "--rate"),
        (&["bench", "produce", "t", "--count", "0"], "--count"),
        (&["bench", "produce", "t", "--duration", "0s"], "--duration"),
        // Values no broker could take: named with their flag, exit 2.
        (&["bench", "produce", "t", "--queues", "0"], "--queues"),
        (
            &["consume", "t", "--group", "g", "--commit-interval", "0s"],
            "--commit-interval",
        ),
        (
            &["consume", "t", "--group", "g", "--rebalance-interval", "0s"],
            "--rebalance-interval",
        ),
        (
            &["consume", "t", "--group", "g", "--route-refresh", "0s"],
            "--route-refresh",
        ),
        // It exited 0 at once, printing nothing, with messages waiting.
        (
            &["consume", "t", "--group", "g", "--idle-timeout", "0s"],
            "--idle-timeout",
        ),
        (
            &[
                "bench",
                "consume",
                "t",
                "--group",
                "g",
                "--idle-timeout",
                "0s",
            ],
            "--idle-timeout",
        ),
        (&["consume", "t", "--group", "g", "--tag", "a ||"], "--tag"),
        (&["topic", "list", "--timeout", "0s"], "--timeout"),
        (&["topic", "list", "--nameserver", ""], "--nameserver"),
        (
            &["topic", "list", "--nameserver", "notanaddr"],
            "--nameserver",
        ),
        (
            &["topic", "list", "--nameserver", "127.0.0.1:9876,:9"],
            "--nameserver",
        ),
        (&["msg", "find", "--topic", "t", "--key", ""], "--key"),
        (&["msg", "find", "--topic", "t", "--key", "a b"], "--key"),
        (
            &["msg", "find", "--topic", "t", "--key", "k", "--max", "0"],
            "--max",
        ),
        (&["send", "t", "--body", "x", "--tag", "a || b"], "--tag"),
        (&["send", "t", "--body", "x", "--tag", "*"], "--tag"),
        (
            &[
                "tx", "send", "t", "--group", "g", "--body", "x", "--local", "commit", "--tag", "",
            ],
            "--tag",
        ),
        (
            &[
                "msg", "get", "--topic", "t", "--queue", "0", "--offset", "0", "--count", "0",
            ],
            "--count",
        ),
        (
            &["bench", "consume", "t", "--group", "g", "--count", "0"],
            "--count",
        ),
    ] {
        let o = txmq_cli(ns, args, None);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.starts_with("error:") && err.contains(says),
            "{args:?}: {err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_requests_print_the_error_code_and_exit_non_zero() {
    let mut cluster = Cluster::nameserver_only(Duration::from_secs(30)).await;
    // No broker yet: a dead-letter listing cannot say there are none.
    let err = failed(&txmq(&cluster.nameserver, &["dlq", "list", "g"], None).await);
    assert!(err.contains("no broker is registered"), "{err}");
    cluster
        .add_broker("broker-a", |c| c.auto_create_topics = false)
        .await;
    let ns = &cluster.nameserver;
    // A broker, and no dead letters: nothing, exit 0.
    let out = ok(&txmq(ns, &["dlq", "list", "g"], None).await);
    assert!(out.is_empty(), "{out}");
    // A group no broker knows (a typo, say): the table is empty, and a note
    // on stderr says why.
    let o = txmq(ns, &["group", "show", "nosuch"], None).await;
    ok(&o);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("note: no broker knows group \"nosuch\""),
        "{err}"
    );

    let err = failed(&txmq(ns, &["send", "ghost", "--body", "boo"], None).await);
    assert!(
        err.contains("UNKNOWN_TOPIC") || err.contains("NO_ROUTE"),
        "{err}"
    );
    assert!(err.contains("ghost"), "{err}");
    let err = failed(
        &txmq(
            ns,
            &["--output", "json", "send", "ghost", "--body", "boo"],
            None,
        )
        .await,
    );
    assert!(
        err.contains("UNKNOWN_TOPIC") || err.contains("NO_ROUTE"),
        "{err}"
    );

    let err = failed(&txmq(ns, &["topic", "route", "ghost"], None).await);
    assert!(err.contains("NO_ROUTE") && err.contains("ghost"), "{err}");
    // A name no topic can have is a usage error, not each broker's
    // UNKNOWN_TOPIC.
    for args in [
        &["topic", "status", ""][..],
        &["topic", "status", "a/b"],
        &["topic", "delete", ""],
        &["topic", "route", "a b"],
    ] {
        let o = txmq(ns, args, None).await;
        let err = failed(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("topic name"), "{args:?}: {err}");
    }

    let err = failed(&txmq(ns, &["topic", "create", "bad/name"], None).await);
    assert!(
        err.contains("BAD_ARGUMENT") && err.contains("bad/name"),
        "{err}"
    );
    let err = failed(&txmq(ns, &["topic", "create", "wide", "--queues", "5000"], None).await);
    assert!(
        err.contains("BAD_ARGUMENT") && err.contains("5000"),
        "{err}"
    );
    let o = txmq(ns, &["topic", "create", "narrow", "--queues", "0"], None).await;
    let err = failed(&o);
    assert_eq!(o.status.code(), Some(2), "a usage error: {err}");
    assert!(err.contains("--queues"), "{err}");
    let err = failed(&txmq(ns, &["send", "a/b", "--body", "x"], None).await);
    assert!(err.contains("BAD_ARGUMENT") && err.contains("a/b"), "{err}");
    let err = failed(&txmq(ns, &["topic", "create", "t", "--broker", "broker-z"], None).await);
    assert!(err.contains("broker-z"), "{err}");
    // A group's own retry topic, consumed as that group: its members read
    // it already. (The brokers refused the heartbeat; the command waited
    // for its idle timeout and exited 0 with a note blaming other members.)
    let o = txmq(
        ns,
        &[
            "consume",
            "%RETRY%billing",
            "--group",
            "billing",
            "--idle-timeout",
            "20s",
        ],
        None,
    )
    .await;
    let err = failed(&o);
    assert!(
        err.contains("the retry topic of group 'billing'") && !err.contains("note: no queue"),
        "{err}"
    );

    // None of it created anything.
    let listed = ok(&txmq(ns, &["topic", "list", "--output", "json"], None).await);
    assert!(listed.trim().is_empty(), "{listed}");
    cluster.shutdown().await;
}

#[test]
fn an_unreachable_nameserver_fails_quickly_with_a_clear_message() {
    let ns = format!("127.0.0.1:{}", free_port());
    for args in [
        &["topic", "list"][..],
        &["topic", "create", "t"],
        &["topic", "route", "t"],
        &["cluster"],
        &["send", "t", "--body", "x"],
        &["consume", "t", "--group", "g", "--count", "1"],
    ] {
        let started = Instant::now();
        let o = txmq_cli(&ns, args, None);
        let took = started.elapsed();
        let err = failed(&o);
        assert!(took < Duration::from_secs(10), "{args:?} took {took:?}");
        assert!(
            err.contains("cannot connect") && err.contains(&ns),
            "{args:?}: {err}"
        );
    }
}

/// `tx resolve` ends a transaction only as typed: `TXMQ_ROLLBACK=false`
/// (or `TXMQ_COMMIT=false`) in the environment rolled one back.
#[test]
fn tx_resolve_takes_its_action_only_from_the_command_line() {
    let ns = format!("127.0.0.1:{}", free_port());
    for var in ["TXMQ_ROLLBACK", "TXMQ_COMMIT"] {
        for value in ["false", "true"] {
            let o = std::process::Command::new(txmq_tests::binary("txmq"))
                .args(["--nameserver", &ns, "tx", "resolve", "7"])
                .env(var, value)
                .stdin(std::process::Stdio::null())
                .output()
                .expect("txmq runs");
            assert_eq!(o.status.code(), Some(2), "{var}={value}: {}", stderr(&o));
            assert!(stderr(&o).contains("--commit"), "{}", stderr(&o));
        }
    }
}

/// A standard error closed before the command writes its error (`2>&1 |
/// head -1` once `head` has its line) keeps the command's exit code: it
/// panicked, exit 101.
#[test]
fn a_closed_standard_error_keeps_the_exit_code() {
    let ns = format!("127.0.0.1:{}", free_port());
    let mut child = std::process::Command::new(txmq_tests::binary("txmq"))
        .args(["--nameserver", &ns, "cluster"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start txmq");
    drop(child.stderr.take());
    let status = child.wait().expect("txmq ends");
    assert_eq!(status.code(), Some(1), "{status:?}");
}

/// `txmq topic create` (that is, `Admin::create_topic`) promises that the
/// route is visible right after: the broker answers the create only once its
/// re-registration with the nameservers is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_created_topic_is_routable_as_soon_as_create_returns() {
    let cluster = Cluster::start(FlushMode::Async).await;
    let admin = cluster.admin().await;
    let mut missing = Vec::new();
    for i in 0..100 {
        let topic = format!("fresh{i}");
        admin
            .create_topic(&topic, 1, PERM_READ_WRITE, None)
            .await
            .unwrap();
        if admin.route(&topic).await.is_err() {
            missing.push(topic);
        }
    }
    assert!(
        missing.is_empty(),
        "no route right after create for {missing:?}"
    );
    admin.close().await.unwrap();
    cluster.shutdown().await;
}

/// `txmq topic create` of a topic that exists changes only what it is
/// given: the queue count and permission left out stay as each broker has
/// them; where the topic is new, 4 queues and rw unless given. Without
/// `--broker` it changes the brokers that have it, and `--broker` adds it
/// to another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_create_of_an_existing_topic_keeps_what_it_is_not_given() {
    let mut cluster = Cluster::nameserver_only(Duration::from_secs(30)).await;
    cluster.add_broker("broker-a", |_| {}).await;
    cluster.add_broker("broker-b", |_| {}).await;
    let ns = &cluster.nameserver;
    let create = |args: &'static [&'static str]| async move {
        let mut all = vec!["--output", "json", "topic", "create", "keep"];
        all.extend_from_slice(args);
        let lines = json_lines(ok(&txmq(ns, &all, None).await).as_bytes());
        lines
            .iter()
            .map(|l| {
                let q = l["queues"].as_u64().unwrap_or_default();
                let updated = l["updated"].as_bool().unwrap_or_default();
                (text(l, "broker"), q, text(l, "perm"), updated)
            })
            .collect::<Vec<_>>()
    };
    let row = |b: &str, q: u64, p: &str, u: bool| (b.to_string(), q, p.to_string(), u);
    // New on one broker: 4 queues unless given.
    assert_eq!(
        create(&["--perm", "r", "--broker", "broker-a"]).await,
        [row("broker-a", 4, "r", false)]
    );
    // More queues where it is: broker-a stays read only (it used to become
    // rw again); broker-b does not get it (it used to).
    assert_eq!(
        create(&["--queues", "6"]).await,
        [row("broker-a", 6, "r", true)]
    );
    // Named, broker-b gets it new, rw.
    assert_eq!(
        create(&["--queues", "8", "--broker", "broker-b"]).await,
        [row("broker-b", 8, "rw", false)]
    );
    // The permission alone: each broker keeps its own queue count (it used
    // to ask for 4 and be refused, as queue counts cannot shrink).
    assert_eq!(
        create(&["--perm", "r"]).await,
        [row("broker-a", 6, "r", true), row("broker-b", 8, "r", true)]
    );
    let out = ok(&txmq(
        ns,
        &["topic", "create", "keep", "--broker", "broker-a"],
        None,
    )
    .await);
    assert!(
        out.starts_with("updated topic keep on broker-a") && out.contains("6 queues, perm r"),
        "{out}"
    );
    cluster.shutdown().await;
}
