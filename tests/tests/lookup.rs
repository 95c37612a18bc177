//! `txmq msg show|find|get` against a real `txmq-broker` process: lookups
//! by id, by key (with a time range) and by offset; per-group consumption;
//! transactional messages (pending, committed, rolled back halves); bad
//! input; and every lookup again after a `kill -9` and restart.

mod common;

use std::process::Output;
use std::time::Duration;

use common::{create_topic, start_broker, txmq, wait_for_route};
use serde_json::Value;
use txmq_tests::output::{ok, stderr, stdout};
use txmq_tests::{json_lines, Cluster};

fn one_json(o: &Output) -> Value {
    let mut lines = json_lines(ok(o).as_bytes());
    assert_eq!(lines.len(), 1, "one JSON line: {}", stdout(o));
    lines.remove(0)
}

#[track_caller]
fn failed_with(o: &Output, code: i32, text: &str) -> String {
    let err = stderr(o);
    assert_eq!(
        o.status.code(),
        Some(code),
        "exit {code} expected; stdout:\n{}\nstderr:\n{err}",
        stdout(o)
    );
    assert!(err.contains(text), "stderr names {text:?}: {err}");
    err
}

fn s(v: &Value, field: &str) -> String {
    v[field]
        .as_str()
        .unwrap_or_else(|| panic!("{field} is not a string in {v}"))
        .to_string()
}

async fn send(ns: &str, body: &str, key: &str) -> Value {
    one_json(
        &txmq(
            ns,
            &[
                "--output", "json", "send", "orders", "--body", body, "--key", key, "--tag", "paid",
            ],
            None,
        )
        .await,
    )
}

async fn tx_send(ns: &str, body: &str, key: &str, local: &str) -> Value {
    one_json(
        &txmq(
            ns,
            &[
                "--output", "json", "tx", "send", "orders", "--group", "pg", "--body", body,
                "--key", key, "--local", local,
            ],
            None,
        )
        .await,
    )
}

async fn show(ns: &str, id: &str) -> Vec<Value> {
    json_lines(ok(&txmq(ns, &["--output", "json", "msg", "show", id], None).await).as_bytes())
}

/// Everything a lookup answers, checked before and after a crash.
async fn check_lookups(
    ns: &str,
    a: &Value,
    b: &Value,
    half: &Value,
    rolled: &Value,
    committed: &Value,
) {
    // By id, text.
    let out = ok(&txmq(ns, &["msg", "show", &s(a, "msg_id")], None).await);
    for want in [
        "topic:       orders",
        "key:         order-1 cust-7",
        "tag:         paid",
        "state:       normal",
        "body:        first",
        &format!("msg_id:      {}", s(a, "msg_id")),
        &format!("offset:      {}", a["queue_offset"]),
    ] {
        assert!(out.contains(want), "{want:?} in:\n{out}");
    }
    // By id, JSON.
    let found = show(ns, &s(a, "msg_id")).await;
    assert_eq!(found.len(), 1, "{found:?}");
    let m = &found[0];
    assert_eq!(s(m, "topic"), "orders");
    assert_eq!(m["queue"], a["queue"]);
    assert_eq!(m["queue_offset"], a["queue_offset"]);
    assert_eq!(s(m, "body"), "first");
    assert_eq!(m["keys"], serde_json::json!(["order-1", "cust-7"]));
    assert_eq!(s(m, "state"), "normal");
    assert!(m["store_timestamp"].as_u64().unwrap() > 0 && m["size"].as_u64().unwrap() > 0);

    // By key: both messages of cust-7, newest first; by the other key one.
    let out = ok(&txmq(
        ns,
        &[
            "--output", "json", "msg", "find", "--topic", "orders", "--key", "cust-7",
        ],
        None,
    )
    .await);
    let bodies: Vec<String> = json_lines(out.as_bytes())
        .iter()
        .map(|v| s(v, "body"))
        .collect();
    assert_eq!(bodies, vec!["second", "first"]);
    let out = ok(&txmq(
        ns,
        &["msg", "find", "--topic", "orders", "--key", "order-2"],
        None,
    )
    .await);
    assert!(out.starts_with("BROKER"), "a table: {out}");
    assert_eq!(out.lines().count(), 2, "{out}");
    assert!(
        out.contains(&s(b, "msg_id")) && out.contains("second"),
        "{out}"
    );
    // A time range that holds them, and one that excludes them.
    let out = ok(&txmq(
        ns,
        &[
            "msg", "find", "--topic", "orders", "--key", "cust-7", "--since", "10m",
        ],
        None,
    )
    .await);
    assert_eq!(out.lines().count(), 3, "{out}");
    let o = txmq(
        ns,
        &[
            "msg",
            "find",
            "--topic",
            "orders",
            "--key",
            "cust-7",
            "--since",
            "2000-01-01T00:00:00Z",
            "--until",
            "2001-01-01T00:00:00Z",
        ],
        None,
    )
    .await;
    failed_with(
        &o,
        1,
        "no message of topic 'orders' with key 'cust-7' stored between",
    );

    // By offset.
    let q = a["queue"].to_string();
    let off = a["queue_offset"].to_string();
    let got = one_json(
        &txmq(
            ns,
            &[
                "--output", "json", "msg", "get", "--topic", "orders", "--queue", &q, "--offset",
                &off,
            ],
            None,
        )
        .await,
    );
    assert_eq!(
        (s(&got, "msg_id"), s(&got, "body")),
        (s(a, "msg_id"), "first".into())
    );

    // Transactions: pending half, rolled back half, committed message.
    let h = show(ns, &s(half, "msg_id")).await;
    assert_eq!(h.len(), 1, "{h:?}");
    assert_eq!(s(&h[0], "state"), "half_pending");
    assert_eq!(h[0]["queue_offset"], Value::Null);
    assert_eq!(h[0]["tx_id"], half["tx_id"]);
    let out = ok(&txmq(ns, &["msg", "show", &s(half, "msg_id")], None).await);
    assert!(
        out.contains("state:       half_pending (transaction"),
        "{out}"
    );
    let r = show(ns, &s(rolled, "msg_id")).await;
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(s(&r[0], "state"), "rolled_back");
    let c = show(ns, &s(committed, "msg_id")).await;
    assert_eq!(c.len(), 1, "{c:?}");
    assert_eq!(s(&c[0], "state"), "committed");
    assert!(
        c[0]["queue_offset"].is_u64(),
        "a committed message is in its queue: {c:?}"
    );
    assert_eq!(s(&c[0], "body"), "tx-commit");
    // By key, a half message shows as what became of it.
    let out = ok(&txmq(
        ns,
        &[
            "--output", "json", "msg", "find", "--topic", "orders", "--key", "tx-key",
        ],
        None,
    )
    .await);
    let mut states: Vec<String> = json_lines(out.as_bytes())
        .iter()
        .map(|v| s(v, "state"))
        .collect();
    states.sort();
    assert_eq!(states, vec!["committed", "half_pending", "rolled_back"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_are_found_by_id_key_and_offset_also_after_kill9() {
    let cluster = Cluster::nameserver_only(Duration::from_secs(30)).await;
    let ns = cluster.nameserver.clone();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("broker-a");
    let mut broker = start_broker(&data, &ns, "broker-a", &["--flush", "sync"]).await;
    create_topic(&ns, "orders", 2).await;

    let a = send(&ns, "first", "order-1 cust-7").await;
    let b = send(&ns, "second", "order-2 cust-7").await;
    let half = tx_send(&ns, "tx-pending", "tx-key", "unknown").await;
    let rolled = tx_send(&ns, "tx-rollback", "tx-key", "rollback").await;
    let committed = tx_send(&ns, "tx-commit", "tx-key", "commit").await;

    // No group has consumed anything yet.
    let out = ok(&txmq(&ns, &["msg", "show", &s(&a, "msg_id")], None).await);
    assert!(out.contains("consumed_by: - (no consumer group"), "{out}");
    check_lookups(&ns, &a, &b, &half, &rolled, &committed).await;

    // A group consumes everything visible: 2 sent, 1 committed.
    ok(&txmq(
        &ns,
        &[
            "consume", "orders", "--group", "g1", "--count", "3", "--from", "first",
        ],
        None,
    )
    .await);
    let later = send(&ns, "third", "order-3").await;
    let m = &show(&ns, &s(&a, "msg_id")).await[0];
    assert_eq!(
        m["consumed_by"],
        serde_json::json!([{"group": "g1", "committed_offset": m["consumed_by"][0]["committed_offset"], "consumed": true}]),
        "{m}"
    );
    let out = ok(&txmq(&ns, &["msg", "show", &s(&a, "msg_id")], None).await);
    assert!(
        out.contains("consumed_by: g1 yes (committed offset"),
        "{out}"
    );
    let l = &show(&ns, &s(&later, "msg_id")).await[0];
    assert_eq!(l["consumed_by"][0]["group"], "g1", "{l}");
    assert_eq!(l["consumed_by"][0]["consumed"], false, "{l}");

    // Bad input.
    let o = txmq(&ns, &["msg", "show", "not-an-id"], None).await;
    failed_with(&o, 2, "not a message id");
    let unknown = "0123456789ABCDEF0123456789ABCDEF";
    let o = txmq(&ns, &["msg", "show", unknown], None).await;
    failed_with(&o, 1, &format!("no message with id {unknown}"));
    let o = txmq(
        &ns,
        &[
            "msg", "get", "--topic", "orders", "--queue", "0", "--offset", "1000",
        ],
        None,
    )
    .await;
    let err = failed_with(&o, 1, "OFFSET_OUT_OF_RANGE");
    assert!(
        err.contains("max offset"),
        "names the queue's max offset: {err}"
    );
    let o = txmq(
        &ns,
        &[
            "msg", "get", "--topic", "orders", "--queue", "9", "--offset", "0",
        ],
        None,
    )
    .await;
    failed_with(&o, 1, "no queue 9");
    let o = txmq(&ns, &["msg", "find", "--topic", "nope", "--key", "k"], None).await;
    failed_with(&o, 1, "nope");
    let o = txmq(
        &ns,
        &[
            "msg", "get", "--topic", "nope", "--queue", "0", "--offset", "0",
        ],
        None,
    )
    .await;
    failed_with(&o, 1, "nope");
    let o = txmq(
        &ns,
        &[
            "msg",
            "find",
            "--topic",
            "orders",
            "--key",
            "k",
            "--since",
            "yesterday-ish",
        ],
        None,
    )
    .await;
    failed_with(&o, 2, "is not a time");
    // A time past year 9999 is a time; a lookup that finds nothing up to it
    // says so without writing it as RFC 3339 (which ends at 9999).
    let o = txmq(
        &ns,
        &[
            "msg",
            "find",
            "--topic",
            "orders",
            "--key",
            "nokey",
            "--until",
            "253402300800000",
        ],
        None,
    )
    .await;
    failed_with(
        &o,
        1,
        "253402300800000 ms after the Unix epoch (past year 9999)",
    );
    // A first check-back further ahead than the broker's --max-delay (7
    // days) is refused: such a transaction would in effect never be checked.
    let o = txmq(
        &ns,
        &[
            "tx",
            "send",
            "orders",
            "--group",
            "pg",
            "--body",
            "late",
            "--local",
            "unknown",
            "--first-check-delay",
            "10000y",
        ],
        None,
    )
    .await;
    failed_with(&o, 1, "longer than the broker's --max-delay (7days)");

    // A broker that does not answer: the lookup cannot tell, and says so
    // (not that there is no such message).
    broker.signal("STOP");
    let o = txmq(
        &ns,
        &["--timeout", "500ms", "msg", "show", &s(&a, "msg_id")],
        None,
    )
    .await;
    broker.signal("CONT");
    let err = failed_with(
        &o,
        1,
        "could not look for it: 1 broker(s) did not answer: broker-a",
    );
    assert!(!err.contains("no message"), "{err}");

    // A crash: every lookup still answers the same.
    tokio::task::block_in_place(|| broker.kill9());
    tokio::task::block_in_place(|| broker.restart());
    wait_for_route(&ns, "orders", &["broker-a"]).await;
    check_lookups(&ns, &a, &b, &half, &rolled, &committed).await;
    let l = &show(&ns, &s(&later, "msg_id")).await[0];
    assert_eq!(s(l, "body"), "third");

    // Keys are words separated by spaces only: a tab stays in its word,
    // and a find names it so (it was refused as two words).
    send(&ns, "tabbed", "tab\tword other").await;
    let out = ok(&txmq(
        &ns,
        &[
            "--output",
            "json",
            "msg",
            "find",
            "--topic",
            "orders",
            "--key",
            "tab\tword",
        ],
        None,
    )
    .await);
    let found: Vec<String> = json_lines(out.as_bytes())
        .iter()
        .map(|v| s(v, "body"))
        .collect();
    assert_eq!(found, ["tabbed"]);
}

/// A delayed message: its send has no queue offset to give yet (the
/// broker holds it in its delay index), and once delivered `msg show`
/// finds it at its place in its queue, with the groups that consumed it,
/// also after a `kill -9` and restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_message_is_shown_where_it_was_delivered() {
    let cluster = Cluster::nameserver_only(Duration::from_secs(30)).await;
    let ns = cluster.nameserver.clone();
    let dir = tempfile::tempdir().unwrap();
    let mut broker = start_broker(&dir.path().join("b"), &ns, "broker-a", &[]).await;
    create_topic(&ns, "later", 1).await;

    let sent = one_json(
        &txmq(
            &ns,
            &[
                "--output", "json", "send", "later", "--body", "delayed", "--delay", "1s",
            ],
            None,
        )
        .await,
    );
    assert_eq!(
        sent["queue_offset"],
        Value::Null,
        "not in its queue yet: {sent}"
    );
    let text = ok(&txmq(
        &ns,
        &["send", "later", "--body", "text", "--delay", "1s"],
        None,
    )
    .await);
    assert!(text.contains(" offset=- "), "{text}");
    let now = send_to(&ns, "later", "now").await;
    assert_eq!(now["queue_offset"], 0, "{now}");
    // A delivery time that is not ahead is no delay: an offset at once.
    for when in [&["--delay", "0s"][..], &["--deliver-at", "1"]] {
        let mut args = vec!["--output", "json", "send", "later", "--body", "at-once"];
        args.extend_from_slice(when);
        let sent = one_json(&txmq(&ns, &args, None).await);
        assert!(sent["queue_offset"].as_u64().is_some(), "{when:?}: {sent}");
    }
    let id = s(&sent, "msg_id");
    let shown = &show(&ns, &id).await[0];
    assert_eq!(s(shown, "state"), "delayed", "{shown}");
    assert_eq!(shown["queue_offset"], Value::Null, "{shown}");

    // Delivered: where `msg get` finds it is where `msg show` says it is.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let delivered = loop {
        let m = show(&ns, &id).await.remove(0);
        if m["state"] == "normal" {
            break m;
        }
        assert!(std::time::Instant::now() < deadline, "not delivered: {m}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let offset = delivered["queue_offset"]
        .as_u64()
        .expect("an offset once delivered");
    let got = one_json(
        &txmq(
            &ns,
            &[
                "--output",
                "json",
                "msg",
                "get",
                "--topic",
                "later",
                "--queue",
                "0",
                "--offset",
                &offset.to_string(),
            ],
            None,
        )
        .await,
    );
    assert_eq!(s(&got, "msg_id"), id, "{got}");
    assert_eq!(s(&got, "body"), "delayed");
    assert_eq!(s(&got, "state"), "normal", "as msg show says: {got}");
    assert_eq!(got["queue"], 0, "{got}");
    assert_eq!(got["queue_offset"], offset, "{got}");

    // Consumed: `msg show` says by whom.
    ok(&txmq(
        &ns,
        &[
            "consume", "later", "--group", "g", "--count", "5", "--from", "first",
        ],
        None,
    )
    .await);
    let m = &show(&ns, &id).await[0];
    assert_eq!(m["consumed_by"][0]["group"], "g", "{m}");
    assert_eq!(m["consumed_by"][0]["consumed"], true, "{m}");

    // The index is rebuilt from the log after a crash: the same answer.
    tokio::task::block_in_place(|| broker.kill9());
    tokio::task::block_in_place(|| broker.restart());
    wait_for_route(&ns, "later", &["broker-a"]).await;
    let m = &show(&ns, &id).await[0];
    assert_eq!(s(m, "state"), "normal", "{m}");
    assert_eq!(m["queue_offset"], offset, "{m}");
}

async fn send_to(ns: &str, topic: &str, body: &str) -> Value {
    one_json(
        &txmq(
            ns,
            &["--output", "json", "send", topic, "--body", body],
            None,
        )
        .await,
    )
}

/// A broker without a message index (`--message-index false`) cannot say
/// whether it holds a message: `msg show`/`msg find` of one found on
/// another broker succeed with a note, and of one found nowhere exit 3
/// ("could not say"). Its BAD_ARGUMENT read as "not here" (a false "no
/// message", exit 1) or as a broker that did not answer (exit 3 after
/// every successful lookup).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_without_a_message_index_cannot_say_and_is_not_a_failure() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cluster = Cluster::nameserver_only(Duration::from_secs(30)).await;
    let ns = cluster.nameserver.clone();
    let a = start_broker(&dir.path().join("a"), &ns, "broker-a", &[]).await;
    let c = start_broker(
        &dir.path().join("c"),
        &ns,
        "broker-c",
        &["--message-index", "false"],
    )
    .await;
    ok(&txmq(
        &ns,
        &[
            "topic", "create", "orders", "--queues", "1", "--broker", "broker-a",
        ],
        None,
    )
    .await);
    ok(&txmq(
        &ns,
        &[
            "topic", "create", "orders", "--queues", "1", "--broker", "broker-c",
        ],
        None,
    )
    .await);
    wait_for_route(&ns, "orders", &["broker-a", "broker-c"]).await;
    let mut on_a = None;
    for i in 0..20 {
        let sent = send(&ns, &format!("m{i}"), "k1").await;
        if s(&sent, "broker") == "broker-a" {
            on_a = Some(s(&sent, "msg_id"));
            break;
        }
    }
    let id = on_a.expect("a send landed on broker-a");
    let shown = txmq(&ns, &["--output", "json", "msg", "show", &id], None).await;
    let found = json_lines(ok(&shown).as_bytes());
    assert_eq!(s(&found[0], "msg_id"), id);
    assert!(
        stderr(&shown).contains("note: not looked up on broker-c"),
        "{}",
        stderr(&shown)
    );
    let by_key = txmq(
        &ns,
        &["msg", "find", "--topic", "orders", "--key", "k1"],
        None,
    )
    .await;
    ok(&by_key);

    let nowhere = "0".repeat(32);
    failed_with(
        &txmq(&ns, &["msg", "show", &nowhere], None).await,
        3,
        "could not say: broker-c",
    );
    // A topic only broker-c has: broker-a's "no such topic" does not
    // settle it either.
    ok(&txmq(
        &ns,
        &[
            "topic", "create", "onlyc", "--queues", "1", "--broker", "broker-c",
        ],
        None,
    )
    .await);
    wait_for_route(&ns, "onlyc", &["broker-c"]).await;
    failed_with(
        &txmq(
            &ns,
            &["msg", "find", "--topic", "onlyc", "--key", "k1"],
            None,
        )
        .await,
        3,
        "broker-c",
    );
    // broker-a gone: none can say; exit 3, not "did not answer" (exit 1),
    // since broker-c did answer.
    drop(a);
    let err = failed_with(
        &txmq(&ns, &["msg", "show", &nowhere], None).await,
        3,
        "could not look for it: ",
    );
    assert!(err.contains("could not say"), "{err}");
    drop(c);
    cluster.shutdown().await;
}
