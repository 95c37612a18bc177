//! Operating txmq (issue 17, part C) through the real `txmq` CLI against
//! real `txmq-nameserver` and `txmq-broker` processes: transaction
//! forensics (`tx show`, `tx list` filters and exit codes, `tx recheck`),
//! dead-letter resend (`dlq resend`), and `topic delete` / `topic status`,
//! including a `kill -9` and restart after a delete, and bad input.

use std::process::Output;
use std::time::{Duration, Instant};

use serde_json::Value;
use txmq_tests::output::{ok, stderr, stdout};
use txmq_tests::{
    free_port, json_lines, make_dead_letters, txmq_cli, BrokerProcess, NameserverProcess,
};

/// A nameserver and one broker, real processes, in a temp dir.
struct Setup {
    _dir: tempfile::TempDir,
    _ns: NameserverProcess,
    broker: BrokerProcess,
    ns: String,
}

impl Setup {
    fn start(broker_flags: &[&str]) -> Setup {
        let dir = tempfile::tempdir().expect("tempdir");
        let ns = format!("127.0.0.1:{}", free_port());
        let nameserver = NameserverProcess::start(&ns, &[], &dir.path().join("nameserver.log"));
        let broker =
            BrokerProcess::start(&dir.path().join("broker"), &ns, "broker-a", broker_flags);
        let setup = Setup {
            _dir: dir,
            _ns: nameserver,
            broker,
            ns,
        };
        setup.wait_registered();
        setup
    }

    fn wait_registered(&self) {
        wait_until("the broker registers", || {
            self.cli(&["cluster"]).status.success()
                && stdout(&self.cli(&["cluster"])).contains("broker-a")
        });
    }

    fn cli(&self, args: &[&str]) -> Output {
        txmq_cli(&self.ns, args, None)
    }

    fn json(&self, args: &[&str]) -> (Output, Vec<Value>) {
        let mut all = vec!["--output", "json"];
        all.extend_from_slice(args);
        let out = self.cli(&all);
        let lines = json_lines(&out.stdout);
        (out, lines)
    }
}

#[track_caller]
fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Asserts exit code 1 with `needle` in stderr.
#[track_caller]
fn fails_with(o: &Output, needle: &str) {
    assert_eq!(
        o.status.code(),
        Some(1),
        "exit 1 expected\nstdout:\n{}\nstderr:\n{}",
        stdout(o),
        stderr(o)
    );
    assert!(
        stderr(o).contains(needle),
        "stderr should say {needle:?}: {}",
        stderr(o)
    );
}

fn show(s: &Setup, tx_id: u64) -> Value {
    let (out, lines) = s.json(&["tx", "show", &tx_id.to_string()]);
    ok(&out);
    lines.into_iter().next().expect("one object")
}

fn tx_send(s: &Setup, args: &[&str]) -> u64 {
    let mut all = vec!["tx", "send"];
    all.extend_from_slice(args);
    let (out, lines) = s.json(&all);
    ok(&out);
    lines[0]["tx_id"].as_u64().expect("tx_id")
}

fn consume(s: &Setup, topic: &str, group: &str) -> Vec<Value> {
    let (out, lines) = s.json(&[
        "consume",
        topic,
        "--group",
        group,
        "--idle-timeout",
        "2s",
        "--commit-interval",
        "100ms",
    ]);
    ok(&out);
    lines
}

/// A recheck is recorded in the log: a broker killed right after it does
/// not park the transaction again when it recovers; and the checks made
/// before the restart are still in `tx show`, with their answers.
#[test]
fn a_recheck_survives_a_kill9() {
    let mut s = Setup::start(&[
        "--transaction-timeout",
        "200ms",
        "--transaction-check-interval",
        "200ms",
        "--transaction-check-max",
        "2",
        "--transaction-check-timeout",
        "300ms",
    ]);
    ok(&s.cli(&["topic", "create", "orders", "--queues", "1"]));
    // Parked while its producer answers "unknown"; the producer then exits,
    // so later checks cannot be made (they do not count).
    let tx = tx_send(
        &s,
        &[
            "orders", "--group", "pg", "--body", "b", "--local", "unknown", "--check", "unknown",
            "--linger", "1500ms",
        ],
    );
    wait_until("the transaction is parked", || {
        show(&s, tx)["state"] == "parked"
    });
    ok(&s.cli(&["tx", "recheck", &tx.to_string()]));
    assert_eq!(show(&s, tx)["state"], "prepared");
    s.broker.restart();
    s.wait_registered();
    let d = show(&s, tx);
    assert_eq!(
        d["state"], "prepared",
        "parked again after the restart: {d}"
    );
    assert_eq!(d["checks"], 2, "{d}");
    // The checks made before the restart, from their records in the log.
    let history = d["history"].as_array().expect("history");
    let before: Vec<&Value> = history.iter().filter(|c| c["sent"] == true).collect();
    assert_eq!(before.len(), 2, "{d}");
    assert!(before.iter().all(|c| c["answer"] == "unknown"), "{d}");
    assert!(before.iter().all(|c| c["at_ms"].as_u64() > Some(0)), "{d}");
}

#[test]
fn tx_show_list_filters_and_recheck() {
    let s = Setup::start(&[
        "--transaction-timeout",
        "200ms",
        "--transaction-check-interval",
        "200ms",
        "--transaction-check-max",
        "3",
        "--transaction-check-timeout",
        "300ms",
    ]);
    ok(&s.cli(&["topic", "create", "orders", "--queues", "2"]));

    // Nothing pending: every filter finds nothing and exits 0.
    ok(&s.cli(&["tx", "list", "--state", "parked"]));

    // tx1: its producer answers every check "unknown" until it is parked.
    let tx1 = tx_send(
        &s,
        &[
            "orders", "--group", "pg", "--body", "first", "--key", "k1", "--local", "unknown",
            "--check", "unknown", "--linger", "2s",
        ],
    );
    wait_until("tx1 is parked", || show(&s, tx1)["state"] == "parked");
    let d1 = show(&s, tx1);
    assert_eq!(d1["producer_group"], "pg");
    assert_eq!(d1["checks"], 3);
    let history = d1["history"].as_array().expect("history");
    let answered: Vec<&Value> = history.iter().filter(|c| c["sent"] == true).collect();
    assert_eq!(answered.len(), 3, "three checks sent: {d1}");
    assert!(answered.iter().all(|c| c["answer"] == "unknown"), "{d1}");
    assert!(answered.iter().all(|c| c["at_ms"].as_u64() > Some(0)));
    // One check-back interval (200 ms) apart: never sooner, and not two
    // intervals (the scheduler once woke a fixed interval after its last
    // wake, just before the next check was due, and took it a tick later:
    // 400 ms and more every time). One gap of the two well under that is
    // enough on a loaded machine.
    let at: Vec<u64> = answered
        .iter()
        .filter_map(|c| c["at_ms"].as_u64())
        .collect();
    let gaps: Vec<u64> = at.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(gaps.iter().all(|g| *g >= 200), "{gaps:?}");
    assert!(gaps.iter().any(|g| *g < 380), "{gaps:?}");
    assert_eq!(d1["messages"][0]["body"], "first");
    assert_eq!(d1["messages"][0]["key"], "k1");
    assert_eq!(d1["messages"][0]["topic"], "orders");
    assert!(
        d1["messages"][0]["properties"]
            .as_object()
            .is_some_and(|p| p.keys().all(|k| !k.starts_with("__txmq"))),
        "the broker's own properties are not shown: {d1}"
    );
    // `msg show` of its message finds the message once, parked: the
    // records of its three check-backs and of its parking name it without
    // being messages.
    let msg_id = d1["messages"][0]["msg_id"].as_str().expect("msg_id");
    let (out, found) = s.json(&["msg", "show", msg_id]);
    ok(&out);
    assert_eq!(found.len(), 1, "one message: {found:?}");
    assert_eq!(found[0]["state"], "half_parked", "{found:?}");
    assert_eq!(found[0]["body"], "first", "{found:?}");

    // tx2: its producer is gone; checks cannot be made (not counted), so
    // it stays pending, with the reason in its history.
    let tx2 = tx_send(
        &s,
        &[
            "orders", "--group", "pg", "--body", "second", "--local", "unknown",
        ],
    );
    wait_until("tx2 has failed checks", || {
        show(&s, tx2)["history"][0]["times"].as_u64() >= Some(2)
    });
    let d2 = show(&s, tx2);
    assert_eq!(d2["state"], "prepared");
    assert_eq!(d2["checks"], 0);
    assert_eq!(
        d2["history"].as_array().map(Vec::len),
        Some(1),
        "the same failure in a row is one entry, counted: {d2}"
    );
    assert!(
        d2["history"][0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("no producer of group 'pg'")),
        "{d2}"
    );
    assert_eq!(d2["history"][0]["sent"], false);
    // The text form names the state, group, message and checks.
    let text = ok(&s.cli(&["tx", "show", &tx2.to_string()]));
    assert!(
        text.starts_with(&format!("transaction {tx2} on broker-a: prepared")),
        "{text}"
    );
    assert!(text.contains("producer group: pg"), "{text}");
    assert!(text.contains("body=second"), "{text}");
    assert!(text.contains("not sent error=no producer"), "{text}");

    // Filters: exit 1 when something matches (cron / alerting), 0 when not.
    let (out, lines) = s.json(&["tx", "list", "--state", "parked"]);
    fails_with(&out, "1 transaction matches");
    let listed: Vec<u64> = lines.iter().filter_map(|l| l["tx_id"].as_u64()).collect();
    assert_eq!(listed, vec![tx1]);
    let (out, lines) = s.json(&["tx", "list", "--state", "pending", "--group", "pg"]);
    fails_with(&out, "1 transaction matches");
    assert_eq!(lines[0]["tx_id"], tx2);
    assert_eq!(lines[0]["state"], "prepared");
    assert!(lines.last().is_some_and(|l| l["counters"].is_object()));
    let (out, _) = s.json(&["tx", "list", "--group", "pg", "--older-than", "0s"]);
    fails_with(&out, "2 transactions match");
    ok(&s.cli(&["tx", "list", "--group", "other"]));
    ok(&s.cli(&["tx", "list", "--older-than", "1h"]));
    // Without a filter the listing is as before: exit 0.
    let all = ok(&s.cli(&["tx", "list"]));
    assert!(all.contains(&tx1.to_string()) && all.contains(&tx2.to_string()));
    let bad = s.cli(&["tx", "list", "--state", "done"]);
    assert_eq!(bad.status.code(), Some(2));

    // Recheck the parked one: un-parked at once...
    let out = ok(&s.cli(&["tx", "recheck", &tx1.to_string()]));
    assert!(out.contains("was parked; un-parked"), "{out}");
    assert_eq!(show(&s, tx1)["state"], "prepared");
    // ... and once its producer is fixed, checked and committed.
    let ns = s.ns.clone();
    let listener = std::thread::spawn(move || {
        txmq_cli(
            &ns,
            &[
                "tx",
                "listen",
                "--group",
                "pg",
                "--check",
                "commit",
                "--duration",
                "4s",
            ],
            None,
        )
    });
    wait_until("tx1 is committed by its check-back", || {
        show(&s, tx1)["state"] == "committed"
    });
    let d1 = show(&s, tx1);
    assert_eq!(d1["ended_by"], "check_back");
    assert!(d1["ended_at_ms"].as_u64().is_some());
    assert!(
        d1["history"]
            .as_array()
            .is_some_and(|h| h.iter().any(|c| c["answer"] == "commit")),
        "{d1}"
    );
    assert_eq!(
        d1["messages"][0]["body"], "first",
        "bodies of an ended one too"
    );
    wait_until("tx2 is committed", || show(&s, tx2)["state"] == "committed");
    let _ = listener.join();
    let bodies: Vec<String> = consume(&s, "orders", "readers")
        .iter()
        .filter_map(|m| m["body"].as_str().map(str::to_string))
        .collect();
    assert!(bodies.contains(&"first".to_string()), "{bodies:?}");
    assert!(bodies.contains(&"second".to_string()), "{bodies:?}");

    // A pending one can be rechecked (checked now); an ended one cannot.
    let tx3 = tx_send(
        &s,
        &[
            "orders", "--group", "pg", "--body", "third", "--local", "unknown",
        ],
    );
    let out = ok(&s.cli(&["tx", "recheck", &tx3.to_string()]));
    assert!(out.contains("was pending"), "{out}");
    fails_with(
        &s.cli(&["tx", "recheck", &tx1.to_string()]),
        "already committed",
    );

    // Ended by an operator, and by the producer: tx show says so.
    ok(&s.cli(&["tx", "resolve", &tx3.to_string(), "--rollback"]));
    let d3 = show(&s, tx3);
    assert_eq!(d3["state"], "rolled_back");
    assert_eq!(d3["ended_by"], "operator");
    let text = ok(&s.cli(&["tx", "show", &tx3.to_string()]));
    assert!(
        text.contains("ended: rolled_back by operator at "),
        "{text}"
    );
    let tx4 = tx_send(
        &s,
        &[
            "orders", "--group", "pg", "--body", "fourth", "--local", "commit",
        ],
    );
    let d4 = show(&s, tx4);
    assert_eq!(
        (d4["state"].as_str(), d4["ended_by"].as_str()),
        (Some("committed"), Some("producer"))
    );

    // Unknown ids: exit 1 with a clear error.
    fails_with(&s.cli(&["tx", "show", "987654321"]), "987654321");
    fails_with(&s.cli(&["tx", "recheck", "987654321"]), "987654321");
    assert_eq!(
        s.cli(&["tx", "show", "not-a-number"]).status.code(),
        Some(2)
    );
}

#[test]
fn dlq_resend_all_once_by_id_with_force_and_to_another_topic() {
    let s = Setup::start(&[]);
    ok(&s.cli(&["topic", "create", "bills", "--queues", "2"]));
    ok(&s.cli(&["topic", "create", "replay", "--queues", "1"]));
    for body in ["b1", "b2", "b3"] {
        ok(&s.cli(&["send", "bills", "--body", body]));
    }
    make_dead_letters(&s.ns, "bills", "billing", 3);

    // Empty DLQ (a group with no dead letters): exit 1, clear message; a
    // list of it prints nothing and says why.
    fails_with(
        &s.cli(&["dlq", "resend", "nobody", "--all"]),
        "group nobody has no dead letters",
    );
    // With --broker, where none is (another broker may hold some).
    fails_with(
        &s.cli(&["dlq", "resend", "nobody", "--all", "--broker", "broker-a"]),
        "group nobody has no dead letters on broker broker-a",
    );
    let listed = s.cli(&["dlq", "list", "nobody"]);
    assert_eq!(ok(&listed), "");
    assert!(
        String::from_utf8_lossy(&listed.stderr).contains("note: group nobody has no dead letters"),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    // Neither --all nor --msg-id: usage error.
    assert_eq!(s.cli(&["dlq", "resend", "billing"]).status.code(), Some(2));
    // A message sent into the dead-letter topic by hand does not say where
    // it came from: --all leaves it and re-sends the others.
    let (out, poison) = s.json(&["send", "%DLQ%billing", "--body", "poison"]);
    ok(&out);
    let poison = poison[0]["msg_id"].as_str().expect("msg_id").to_string();

    // --all: each letter back to its original topic, reconsume count reset.
    let (out, lines) = s.json(&["dlq", "resend", "billing", "--all"]);
    ok(&out);
    let resent: Vec<&Value> = lines.iter().filter(|l| l["topic"].is_string()).collect();
    assert_eq!(resent.len(), 3, "{lines:?}");
    assert!(resent.iter().all(|r| r["topic"] == "bills"));
    let summary = lines.last().expect("summary");
    assert_eq!(summary["resent"], 3);
    // The letter left in place is named, with why.
    assert_eq!(summary["left"], 1, "{lines:?}");
    assert!(
        lines.iter().any(|l| l["msg_id"] == poison.as_str()
            && l["left"]
                .as_str()
                .is_some_and(|w| w.contains("does not say its original topic"))),
        "{lines:?}"
    );
    // It stays where it is.
    let (out, letters) = s.json(&["dlq", "list", "billing"]);
    ok(&out);
    assert!(
        letters.iter().any(|l| l["msg_id"] == poison.as_str()),
        "{letters:?}"
    );
    fails_with(
        &s.cli(&["dlq", "resend", "billing", "--msg-id", &poison]),
        "does not say its original topic",
    );
    // Nor may a letter go back into a retry or dead-letter topic.
    for to in ["%DLQ%billing", "%RETRY%billing"] {
        let out = s.cli(&["dlq", "resend", "billing", "--msg-id", &poison, "--to", to]);
        fails_with(&out, "BAD_ARGUMENT");
        fails_with(&out, "retry or dead-letter topic");
    }
    let again: Vec<Value> = consume(&s, "bills", "auditors");
    assert_eq!(again.len(), 6, "3 originals and 3 resent: {again:?}");
    let resent_ids: Vec<String> = resent
        .iter()
        .map(|r| r["msg_id"].as_str().unwrap_or_default().to_string())
        .collect();
    let copies: Vec<&Value> = again
        .iter()
        .filter(|m| m["queue_offset"].as_u64().is_some_and(|_| true))
        .filter(|m| resent_ids.contains(&m["msg_id"].as_str().unwrap_or_default().to_string()))
        .collect();
    assert_eq!(copies.len(), 6, "the copies keep their msg ids");
    assert!(again.iter().all(|m| m["reconsume_times"] == 0), "{again:?}");

    // A second --all resends nothing new, and says so (exit 1).
    let out = s.cli(&["dlq", "resend", "billing", "--all"]);
    fails_with(&out, "nothing resent");
    assert!(
        stdout(&out).contains("0 dead letters of group billing resent; 3 resent before"),
        "{}",
        stdout(&out)
    );

    // By id: refused when resent before, unless --force; --to another topic.
    let id = resent_ids[0].as_str();
    fails_with(
        &s.cli(&["dlq", "resend", "billing", "--msg-id", id]),
        "nothing resent",
    );
    let out = ok(&s.cli(&[
        "dlq", "resend", "billing", "--msg-id", id, "--force", "--to", "replay",
    ]));
    assert!(
        out.contains(&format!(
            "resent {id} from %DLQ%billing on broker-a to replay"
        )),
        "{out}"
    );
    let replayed = consume(&s, "replay", "auditors");
    assert_eq!(replayed.len(), 1);
    assert_eq!(replayed[0]["msg_id"], id);
    // Unknown ids, malformed ids, unknown --to topic.
    let other = "0123456789ABCDEF0123456789ABCDEF";
    let out = s.cli(&["dlq", "resend", "billing", "--msg-id", other]);
    fails_with(&out, "nothing resent");
    // Nothing to re-send: a --to topic is not made for nothing.
    let out = s.cli(&[
        "dlq", "resend", "billing", "--msg-id", other, "--to", "typo",
    ]);
    fails_with(&out, "nothing resent");
    assert!(!s.cli(&["topic", "route", "typo"]).status.success());
    assert!(
        stdout(&out).contains(&format!("not in %DLQ%billing: {other}")),
        "{}",
        stdout(&out)
    );
    assert_eq!(
        s.cli(&["dlq", "resend", "billing", "--msg-id", "xyz"])
            .status
            .code(),
        Some(2)
    );
    // A topic not made yet is made, as a send's would be (auto-create is
    // on here); a name no topic may have is refused, named.
    let out = ok(&s.cli(&[
        "dlq", "resend", "billing", "--msg-id", id, "--force", "--to", "fresh",
    ]));
    assert!(
        out.contains(&format!(
            "resent {id} from %DLQ%billing on broker-a to fresh"
        )),
        "{out}"
    );
    assert_eq!(consume(&s, "fresh", "auditors").len(), 1);
    let out = s.cli(&[
        "dlq",
        "resend",
        "billing",
        "--msg-id",
        id,
        "--force",
        "--to",
        "bad/topic",
    ]);
    fails_with(&out, "BAD_ARGUMENT");
    fails_with(&out, "bad/topic");

    // The record survives a restart: --all still resends nothing.
    let mut broker = s.broker;
    broker.restart();
    let s = Setup { broker, ..s };
    s.wait_registered();
    fails_with(
        &s.cli(&["dlq", "resend", "billing", "--all"]),
        "nothing resent",
    );
}

fn queue_sum(lines: &[Value]) -> u64 {
    lines.iter().filter_map(|q| q["max_offset"].as_u64()).sum()
}

fn topic_listed(s: &Setup, topic: &str) -> bool {
    let (out, lines) = s.json(&["topic", "list"]);
    ok(&out);
    lines.iter().any(|t| t["topic"] == topic)
}

#[test]
fn topic_status_and_delete_survive_kill_9() {
    let s = Setup::start(&["--flush", "sync"]);
    ok(&s.cli(&["topic", "create", "gone", "--queues", "2"]));
    let mut old_ids = Vec::new();
    for i in 0..5 {
        let (out, lines) = s.json(&["send", "gone", "--body", &format!("old-{i}"), "--key", "kk"]);
        ok(&out);
        old_ids.push(lines[0]["msg_id"].as_str().expect("msg_id").to_string());
    }
    // Status: per queue min and max offset and last store time.
    let (out, lines) = s.json(&["topic", "status", "gone"]);
    ok(&out);
    assert_eq!(lines.len(), 2);
    assert_eq!(queue_sum(&lines), 5);
    for q in &lines {
        assert_eq!(q["min_offset"], 0);
        let filled = q["max_offset"].as_u64() > Some(0);
        assert_eq!(q["last_store_ms"].as_u64().is_some(), filled, "{q}");
    }
    let text = ok(&s.cli(&["topic", "status", "gone"]));
    assert!(
        text.contains("MIN OFFSET") && text.contains("LAST STORED"),
        "{text}"
    );
    fails_with(&s.cli(&["topic", "status", "missing"]), "missing");
    assert_eq!(consume(&s, "gone", "g1").len(), 5);

    // Refused while a transaction with a half message for it is pending.
    let tx = tx_send(
        &s,
        &[
            "gone", "--group", "pg", "--body", "half", "--local", "unknown",
        ],
    );
    fails_with(&s.cli(&["topic", "delete", "gone"]), "pending transaction");
    assert!(topic_listed(&s, "gone"));
    let out = ok(&s.cli(&["topic", "delete", "gone", "--force"]));
    assert!(
        out.contains("deleted topic gone on broker-a: 2 queues"),
        "{out}"
    );
    assert_eq!(
        show(&s, tx)["state"],
        "rolled_back",
        "--force rolls it back"
    );

    // Routes, queues and offsets are gone.
    assert!(!topic_listed(&s, "gone"));
    wait_until("the route is gone", || {
        !s.cli(&["topic", "route", "gone"]).status.success()
    });
    fails_with(&s.cli(&["topic", "status", "gone"]), "gone");
    assert!(!s.broker.data_dir.join("consumequeue").join("gone").exists());
    fails_with(&s.cli(&["topic", "delete", "gone"]), "does not exist");

    // kill -9 and restart: still deleted (recovery does not rebuild it).
    let mut broker = s.broker;
    broker.restart();
    let s = Setup { broker, ..s };
    s.wait_registered();
    assert!(!topic_listed(&s, "gone"));
    fails_with(&s.cli(&["topic", "status", "gone"]), "gone");

    // Auto-create is on: a send makes a new, empty topic; offsets start
    // at 0 and no old message (nor old group offset) comes back.
    ok(&s.cli(&["send", "gone", "--body", "new", "--key", "kk"]));
    let (_, lines) = s.json(&["topic", "status", "gone"]);
    assert_eq!(queue_sum(&lines), 1);
    let queues = lines.len();
    assert!(queues > 1, "{lines:?}");
    let got = consume(&s, "gone", "g1");
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["body"], "new");
    assert_eq!(got[0]["queue_offset"], 0);
    // Lookups do not find the old topic's messages either (they were
    // found at offsets the new topic's messages hold now).
    let deleted_lookups = |s: &Setup| {
        let (out, found) = s.json(&["msg", "find", "--topic", "gone", "--key", "kk"]);
        ok(&out);
        let bodies: Vec<&str> = found.iter().filter_map(|m| m["body"].as_str()).collect();
        assert_eq!(bodies, vec!["new"], "{found:?}");
        fails_with(&s.cli(&["msg", "show", &old_ids[0]]), "no message with id");
    };
    deleted_lookups(&s);

    let mut broker = s.broker;
    broker.restart();
    let s = Setup { broker, ..s };
    s.wait_registered();
    let got = consume(&s, "gone", "g2");
    let bodies: Vec<&str> = got.iter().filter_map(|m| m["body"].as_str()).collect();
    assert_eq!(bodies, vec!["new"]);
    deleted_lookups(&s);
    // Every queue of the new topic is still there, those that hold no
    // message too (the replay of the delete had taken them: UNKNOWN_QUEUE).
    let (_, lines) = s.json(&["topic", "status", "gone"]);
    assert_eq!(lines.len(), queues, "{lines:?}");
    let count = queues.to_string();
    ok(&s.cli(&["send", "gone", "--body", "later", "--count", &count]));
}

#[test]
fn a_deleted_topic_is_unknown_with_auto_create_off() {
    let s = Setup::start(&["--auto-create-topics", "false"]);
    ok(&s.cli(&["topic", "create", "typo", "--queues", "1"]));
    ok(&s.cli(&["send", "typo", "--body", "x"]));
    ok(&s.cli(&["topic", "delete", "typo"]));
    let out = s.cli(&["send", "typo", "--body", "y"]);
    assert!(
        !out.status.success(),
        "a send to a deleted topic fails: {}",
        stdout(&out)
    );
    fails_with(&s.cli(&["topic", "delete", "typo"]), "does not exist");
}

/// `tx list`'s filters are the broker's, before it cuts its list at the
/// oldest 1000: one parked transaction behind 1001 pending ones is listed
/// (`--state parked` exited 0, "nothing parked", while it was), and a cut
/// list says so. An operator resolves a transaction past the oldest 1000
/// by id.
#[test]
fn tx_list_filters_see_past_the_oldest_thousand() {
    let s = Setup::start(&[
        "--transaction-timeout",
        "1h",
        "--transaction-check-interval",
        "100ms",
        "--transaction-check-max",
        "1",
    ]);
    ok(&s.cli(&["topic", "create", "many", "--queues", "2"]));
    ok(&s.cli(&[
        "bench",
        "tx",
        "many",
        "--count",
        "1001",
        "--unknown-ratio",
        "1",
        "--size",
        "10",
        "--group",
        "pold",
        "--grace",
        "0s",
        "--warmup",
        "0s",
    ]));
    let parked = tx_send(
        &s,
        &[
            "many",
            "--group",
            "ppark",
            "--body",
            "stuck",
            "--local",
            "unknown",
            "--check",
            "unknown",
            "--first-check-delay",
            "100ms",
            "--linger",
            "2s",
        ],
    );
    wait_until("it is parked", || show(&s, parked)["state"] == "parked");
    for filter in [&["--state", "parked"][..], &["--group", "ppark"]] {
        let mut args = vec!["tx", "list"];
        args.extend_from_slice(filter);
        let (out, lines) = s.json(&args);
        assert_eq!(out.status.code(), Some(1), "{filter:?}: {}", stderr(&out));
        let ids: Vec<u64> = lines.iter().filter_map(|l| l["tx_id"].as_u64()).collect();
        assert_eq!(ids, [parked], "{filter:?}: {lines:?}");
    }
    let all = s.cli(&["tx", "list"]);
    ok(&all);
    assert!(
        stderr(&all).contains("lists the oldest 1000 of the 1002 transactions that match"),
        "{}",
        stderr(&all)
    );
    let newest = s.cli(&["tx", "resolve", &parked.to_string(), "--rollback"]);
    ok(&newest);
    assert_eq!(show(&s, parked)["state"], "rolled_back");
}

/// A group's lag counts what it can still read: messages retention
/// removed below its committed offset are not lag (`group show` counted
/// them: committed 1, first offset 12, last 16 showed a lag of 15).
#[test]
fn lag_leaves_out_what_retention_removed() {
    let s = Setup::start(&[
        "--segment-size",
        "1MiB",
        "--max-message-size",
        "256KiB",
        "--retention",
        "1s",
    ]);
    ok(&s.cli(&["topic", "create", "kept", "--queues", "1"]));
    let body = "x".repeat(100 * 1024);
    ok(&s.cli(&["send", "kept", "--body", "first"]));
    let (out, _) = s.json(&[
        "consume",
        "kept",
        "--group",
        "g",
        "--count",
        "1",
        "--idle-timeout",
        "5s",
    ]);
    ok(&out);
    // Three segments' worth: retention removes the full ones.
    ok(&s.cli(&["send", "kept", "--body", &body, "--count", "25"]));
    let queue = |s: &Setup| {
        let (out, lines) = s.json(&["group", "show", "g"]);
        ok(&out);
        lines[0]["queues"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|q| q["topic"] == "kept")
            .cloned()
            .expect("the topic's queue")
    };
    wait_until("retention removes the first segments", || {
        let (out, lines) = s.json(&["topic", "status", "kept"]);
        out.status.success() && lines[0]["min_offset"].as_u64() > Some(1)
    });
    let (out, status) = s.json(&["topic", "status", "kept"]);
    ok(&out);
    let (min, max) = (
        status[0]["min_offset"].as_u64().unwrap(),
        status[0]["max_offset"].as_u64().unwrap(),
    );
    let q = queue(&s);
    assert_eq!(q["committed"], 1, "{q}");
    assert_eq!(
        q["lag"].as_u64(),
        Some(max - min),
        "{q} (queue holds {min}..{max})"
    );
}

/// `group reset-offset --to TIME` finds the first message that came into
/// the queue at or after the time: a delayed message comes in when it is
/// delivered (it was sent, and stored, before the messages around it),
/// and the search by store times skipped the messages between (reset to
/// a time between P2 and P3, the group went on at P6).
#[test]
fn reset_to_a_time_counts_a_delayed_message_from_its_delivery() {
    let s = Setup::start(&[]);
    ok(&s.cli(&["topic", "create", "late", "--queues", "1"]));
    ok(&s.cli(&["send", "late", "--body", "delayed", "--delay", "3s"]));
    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis()
    };
    let mut at = 0;
    for i in 1..=5 {
        if i == 3 {
            std::thread::sleep(Duration::from_millis(20));
            at = now_ms();
            std::thread::sleep(Duration::from_millis(20));
        }
        ok(&s.cli(&["send", "late", "--body", &format!("p{i}")]));
    }
    let max = |s: &Setup| {
        let (out, lines) = s.json(&["topic", "status", "late"]);
        ok(&out);
        lines[0]["max_offset"].as_u64().unwrap()
    };
    assert_eq!(max(&s), 5, "the delayed message is not delivered yet");
    wait_until("the delayed message is delivered", || max(&s) == 6);
    for i in 6..=9 {
        ok(&s.cli(&["send", "late", "--body", &format!("p{i}")]));
    }
    ok(&s.cli(&[
        "group",
        "reset-offset",
        "g",
        "--topic",
        "late",
        "--to",
        &at.to_string(),
    ]));
    let (out, lines) = s.json(&["group", "show", "g"]);
    ok(&out);
    let committed: Vec<u64> = lines[0]["queues"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|q| q["topic"] == "late")
        .filter_map(|q| q["committed"].as_u64())
        .collect();
    assert_eq!(committed, [2], "from p3 on: {lines:?}");
}

/// A consumer that keeps running while its topic is deleted and made
/// again reads the new topic from its first message: its old position
/// (5) is neither pulled from nor committed there (it skipped the new
/// topic's first five messages, and every tool showed them consumed).
#[test]
fn a_consumer_across_a_topic_delete_and_remake_reads_the_new_topic_from_its_start() {
    let s = Setup::start(&[]);
    ok(&s.cli(&["topic", "create", "remade", "--queues", "1"]));
    ok(&s.cli(&["send", "remade", "--body", "old", "--count", "5"]));
    let consumer = std::process::Command::new(txmq_tests::binary("txmq"))
        .args([
            "--nameserver",
            &s.ns,
            "--output",
            "json",
            "consume",
            "remade",
        ])
        .args(["--group", "g", "--count", "13", "--idle-timeout", "6s"])
        .args(["--commit-interval", "100ms", "--route-refresh", "300ms"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start txmq consume");
    wait_until("the old messages are consumed and committed", || {
        let (out, lines) = s.json(&["group", "show", "g"]);
        out.status.success()
            && lines
                .iter()
                .flat_map(|l| l["queues"].as_array().cloned().unwrap_or_default())
                .any(|q| q["topic"] == "remade" && q["committed"] == 5)
    });
    ok(&s.cli(&["topic", "delete", "remade"]));
    ok(&s.cli(&["topic", "create", "remade", "--queues", "1"]));
    ok(&s.cli(&["send", "remade", "--body", "new", "--count", "8"]));
    let out = consumer.wait_with_output().expect("consume ends");
    let bodies: Vec<String> = json_lines(&out.stdout)
        .iter()
        .map(|m| m["body"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(
        bodies.iter().filter(|b| *b == "new").count(),
        8,
        "every message of the topic made again: {bodies:?}\n{}",
        stderr(&out)
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

/// The users of the permission test: an operator, and an application that
/// may publish to and read `orders` only.
const ACL: &str = r#"
[[user]]
access_key = "ops"
secret_key = "ops-secret"
admin = true

[[user]]
access_key = "app"
secret_key = "app-secret"
topics = { "orders" = ["pub", "sub"] }

[[user]]
access_key = "broker"
secret_key = "cluster-secret"
broker = true
"#;

#[test]
fn the_operations_need_admin_and_topic_status_needs_sub() {
    let dir = tempfile::tempdir().expect("tempdir");
    let acl = dir.path().join("acl.toml");
    std::fs::write(&acl, ACL).expect("write acl");
    let acl = acl.display().to_string();
    let ns = format!("127.0.0.1:{}", free_port());
    let _nameserver = NameserverProcess::start(
        &ns,
        &["--acl-file", &acl],
        &dir.path().join("nameserver.log"),
    );
    let _broker = BrokerProcess::start(
        &dir.path().join("broker"),
        &ns,
        "broker-a",
        &[
            "--acl-file",
            &acl,
            "--access-key",
            "broker",
            "--secret-key",
            "cluster-secret",
        ],
    );
    let as_user = |user: (&str, &str), args: &[&str]| {
        let mut all = vec!["--access-key", user.0, "--secret-key", user.1];
        all.extend_from_slice(args);
        txmq_cli(&ns, &all, None)
    };
    let ops = ("ops", "ops-secret");
    let app = ("app", "app-secret");
    wait_until("the broker registers", || {
        stdout(&as_user(ops, &["cluster"])).contains("broker-a")
    });
    ok(&as_user(
        ops,
        &["topic", "create", "orders", "--queues", "1"],
    ));
    ok(&as_user(
        ops,
        &["topic", "create", "secret", "--queues", "1"],
    ));

    // Status: a reader of the topic may; of another topic not.
    ok(&as_user(app, &["topic", "status", "orders"]));
    fails_with(
        &as_user(app, &["topic", "status", "secret"]),
        "ACCESS_DENIED",
    );
    // The operator's tools: refused to the application, naming what.
    fails_with(&as_user(app, &["tx", "show", "1"]), "ACCESS_DENIED");
    fails_with(&as_user(app, &["tx", "recheck", "1"]), "ACCESS_DENIED");
    fails_with(
        &as_user(app, &["dlq", "resend", "billing", "--all"]),
        "ACCESS_DENIED",
    );
    fails_with(
        &as_user(app, &["topic", "delete", "orders"]),
        "ACCESS_DENIED",
    );
    ok(&as_user(app, &["topic", "status", "orders"]));
    // Granted to the operator.
    ok(&as_user(ops, &["topic", "status", "secret"]));
    fails_with(&as_user(ops, &["tx", "show", "1"]), "UNKNOWN_TRANSACTION");
    fails_with(
        &as_user(ops, &["dlq", "resend", "billing", "--all"]),
        "no dead letters",
    );
    ok(&as_user(ops, &["topic", "delete", "secret"]));
}

/// `tx show` of transactions that ended before a restart, outside what
/// recovery reads again (it reads transaction records back one segment's
/// worth before its checkpoint, and here three segments came after the
/// ends): the log still tells how they ended, `by unknown`.
#[test]
fn transactions_ended_before_a_restart_are_still_shown() {
    let s = Setup::start(&["--checkpoint-interval", "100ms"]);
    ok(&s.cli(&["topic", "create", "orders", "--queues", "1"]));
    let committed = tx_send(
        &s,
        &[
            "orders", "--group", "pg", "--body", "kept", "--local", "commit",
        ],
    );
    let rolled = tx_send(
        &s,
        &[
            "orders", "--group", "pg", "--body", "dropped", "--local", "rollback",
        ],
    );
    assert_eq!(show(&s, committed)["state"], "committed");
    assert_eq!(show(&s, committed)["ended_by"], "producer");
    // Three segments (8 MiB each in these tests) of other messages after
    // the ends.
    let body = "x".repeat(100_000);
    ok(&s.cli(&["send", "filler", "--body", &body, "--count", "260"]));

    let mut broker = s.broker;
    assert_eq!(broker.stop(), Some(0), "a graceful stop");
    broker.restart();
    let s = Setup { broker, ..s };
    s.wait_registered();
    for (tx, state, body) in [
        (committed, "committed", "kept"),
        (rolled, "rolled_back", "dropped"),
    ] {
        let d = show(&s, tx);
        assert_eq!(d["state"], state, "{d}");
        assert_eq!(d["ended_by"], "unknown", "{d}");
        assert_eq!(d["ended_at_ms"], Value::Null, "{d}");
        assert_eq!(d["messages"][0]["body"], body, "{d}");
        assert_eq!(d["producer_group"], "pg", "{d}");
    }
    // An id that is no transaction's is still unknown.
    fails_with(&s.cli(&["tx", "show", "3"]), "UNKNOWN_TRANSACTION");
}

/// After a clean restart a group whose consumers had all left reads at
/// once: every queue it had read waited one consumer expiry (30 s) for a
/// reader that no longer existed, and `consume` ended with nothing. (After
/// `kill -9` they still wait: the broker cannot know who read them.)
#[test]
fn after_a_clean_restart_a_group_without_consumers_reads_at_once() {
    let mut s = Setup::start(&[]);
    ok(&s.cli(&["topic", "create", "t", "--queues", "4"]));
    ok(&s.cli(&["send", "t", "--body", "a", "--count", "8"]));
    let consume = [
        "consume",
        "t",
        "--group",
        "g",
        "--count",
        "8",
        "--idle-timeout",
        "5s",
    ];
    let (out, lines) = s.json(&consume);
    assert_eq!(lines.len(), 8, "{}", stderr(&out));
    assert_eq!(s.broker.stop_and_start(), Some(0), "a clean stop");
    s.wait_registered();
    ok(&s.cli(&["send", "t", "--body", "b", "--count", "8"]));
    let (out, lines) = s.json(&consume);
    assert_eq!(lines.len(), 8, "{}", stderr(&out));
    assert!(lines.iter().all(|l| l["body"] == "b"), "{lines:?}");
}

/// A pending transaction carried forward past retention keeps what `tx
/// show` shows, across `kill -9`s and once it ended: the producer group,
/// the prepare time, the half message (the carried copy), and the checks
/// that reached its producer with their times and answers. Once the
/// transaction ended, `tx show` lost its group, prepare time and half
/// message, and after a `kill -9` its check history said "none since the
/// broker started" (the checks' records went with the old segment).
/// (found by a tester)
#[test]
fn a_transaction_carried_past_retention_keeps_its_forensics_across_kill9() {
    let mut s = Setup::start(&[
        "--transaction-timeout",
        "200ms",
        "--transaction-check-interval",
        "200ms",
        "--transaction-check-max",
        "2",
        "--transaction-check-timeout",
        "300ms",
        "--segment-size",
        "1MiB",
        "--max-message-size",
        "256KiB",
        "--retention",
        "2s",
    ]);
    ok(&s.cli(&["topic", "create", "r", "--queues", "1"]));
    // park1: its producer answers "unknown" until it is parked.
    let park1 = tx_send(
        &s,
        &[
            "r", "--group", "rg2", "--body", "PARK1", "--key", "park1", "--local", "unknown",
            "--check", "unknown", "--linger", "1500ms",
        ],
    );
    wait_until("park1 is parked", || show(&s, park1)["state"] == "parked");
    // pend2: no producer of its group answers; it stays pending.
    let pend2 = tx_send(
        &s,
        &[
            "r", "--group", "rgX", "--body", "PEND2", "--key", "pend2", "--local", "unknown",
        ],
    );
    let park1_before = show(&s, park1);
    let pend2_before = show(&s, pend2);
    let sent = |d: &Value| -> Vec<(u64, String)> {
        d["history"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| c["sent"] == true)
            .map(|c| {
                (
                    c["at_ms"].as_u64().unwrap_or(0),
                    c["answer"].as_str().unwrap_or("-").to_string(),
                )
            })
            .collect()
    };
    let park1_checks = sent(&park1_before);
    assert_eq!(park1_checks.len(), 2, "{park1_before}");
    assert!(
        park1_checks.iter().all(|(at, a)| *at > 0 && a == "unknown"),
        "{park1_before}"
    );

    // Their segment fills and expires: both are carried forward, and the
    // segment goes.
    let body = "f".repeat(100_000);
    ok(&s.cli(&["send", "fill", "--body", &body, "--count", "12"]));
    let first_segment = s
        .broker
        .data_dir
        .join("commitlog")
        .join(format!("{:020}", 0));
    wait_until("both are carried forward and their segment deleted", || {
        s.broker
            .log_text()
            .matches("pending transaction carried forward past retention")
            .count()
            >= 2
            && !first_segment.exists()
    });
    // The carried copies' segment stays while the test looks at them
    // (retention keeps a segment holding a delayed message not yet
    // delivered): an ended transaction's half messages are shown while
    // the log holds them.
    ok(&s.cli(&["send", "fill", "--body", "pin", "--delay", "1h"]));

    // Pending, after a kill -9: all of it, from the carried copies.
    s.broker.restart();
    s.wait_registered();
    let d = show(&s, park1);
    assert_eq!(d["state"], "parked", "{d}");
    assert_eq!(d["producer_group"], "rg2", "{d}");
    assert_eq!(d["prepared_at_ms"], park1_before["prepared_at_ms"], "{d}");
    assert_eq!(d["checks"], 2, "{d}");
    assert_eq!(sent(&d), park1_checks, "the checks sent before: {d}");
    assert_eq!(d["messages"][0]["body"], "PARK1", "{d}");
    let text = ok(&s.cli(&["tx", "show", &park1.to_string()]));
    assert!(!text.contains("check history: none"), "{text}");
    assert!(text.contains("sent answer=unknown"), "{text}");

    // pend2 ends by its check-back: still its group, prepare time and
    // half message.
    ok(&s.cli(&[
        "tx",
        "listen",
        "--group",
        "rgX",
        "--check",
        "commit",
        "--duration",
        "2s",
    ]));
    wait_until("pend2 is committed", || {
        show(&s, pend2)["state"] == "committed"
    });
    let ended = |d: &Value| {
        assert_eq!(d["state"], "committed", "{d}");
        assert_eq!(d["producer_group"], "rgX", "{d}");
        assert_eq!(d["prepared_at_ms"], pend2_before["prepared_at_ms"], "{d}");
        assert_eq!(d["messages"][0]["body"], "PEND2", "{d}");
        assert_eq!(d["messages"][0]["key"], "pend2", "{d}");
        assert!(
            sent(d).iter().any(|(_, a)| a == "commit"),
            "the check that committed it: {d}"
        );
    };
    let d = show(&s, pend2);
    ended(&d);
    assert_eq!(d["ended_by"], "check_back", "{d}");

    // And after another kill -9: the same, from the log.
    s.broker.restart();
    s.wait_registered();
    ended(&show(&s, pend2));
    let d = show(&s, park1);
    assert_eq!(sent(&d), park1_checks, "{d}");

    // park1 resolved by an operator: still all of it.
    ok(&s.cli(&["tx", "resolve", &park1.to_string(), "--commit"]));
    let d = show(&s, park1);
    assert_eq!(d["state"], "committed", "{d}");
    assert_eq!(d["ended_by"], "operator", "{d}");
    assert_eq!(d["producer_group"], "rg2", "{d}");
    assert_eq!(d["messages"][0]["body"], "PARK1", "{d}");
    assert_eq!(sent(&d), park1_checks, "{d}");

    // Each visible once, without the broker's own properties.
    let got = consume(&s, "r", "readers");
    let mut bodies: Vec<&str> = got.iter().filter_map(|m| m["body"].as_str()).collect();
    bodies.sort();
    assert_eq!(bodies, ["PARK1", "PEND2"], "{got:?}");
    for m in &got {
        assert!(
            m["properties"]
                .as_object()
                .is_none_or(|p| p.keys().all(|k| !k.starts_with("__txmq"))),
            "{m}"
        );
    }
}
