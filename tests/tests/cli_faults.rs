//! The `txmq` command line when brokers die or pause under it (issue 12,
//! item 9), with real broker processes: `send --stdin` when the only
//! broker is killed mid-stream (exit 3, every line not surely sent
//! reported, resending them delivers the rest), `--wait-for-broker`,
//! Ctrl-C (exit 130 with the unsent lines reported), input line numbers
//! in receipts, and the group commands answering for the brokers that
//! respond while naming the paused one.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{create_topic, start_broker, txmq, wait_for_route};
use serde_json::Value;
use txmq::{Message, PERM_READ_WRITE};
use txmq_broker::FlushMode;
use txmq_tests::{binary, consume_all, json_lines, make_dead_letters, Cluster};

/// A `txmq` process whose stdin the test writes and whose stdout it
/// reads line by line while it runs.
struct RunningCli {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    stderr: Option<JoinHandle<String>>,
}

impl RunningCli {
    fn start(ns: &str, args: &[&str]) -> RunningCli {
        let mut child = Command::new(binary("txmq"))
            .arg("--nameserver")
            .arg(ns)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start txmq");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut stderr = child.stderr.take().expect("stderr");
        let stderr = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            text
        });
        RunningCli {
            stdin: child.stdin.take(),
            child,
            lines,
            seen: Vec::new(),
            stderr: Some(stderr),
        }
    }

    /// Writes to its stdin; false once it no longer reads.
    fn write(&mut self, text: &str) -> bool {
        match self.stdin.as_mut() {
            Some(pipe) => pipe.write_all(text.as_bytes()).is_ok() && pipe.flush().is_ok(),
            None => false,
        }
    }

    fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Writes `m1`..`mN` (one per line) on a thread, pausing every few
    /// lines so the stream lasts a while, then closes stdin.
    fn feed_slowly(&mut self, lines: std::ops::RangeInclusive<u64>) -> JoinHandle<()> {
        let mut pipe = self.stdin.take().expect("stdin open");
        std::thread::spawn(move || {
            for i in lines {
                if writeln!(pipe, "m{i}").is_err() {
                    return;
                }
                if i % 10 == 0 {
                    let _ = pipe.flush();
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        })
    }

    /// Waits until it printed `n` lines on stdout.
    fn wait_for_lines(&mut self, n: usize, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.seen.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(_) => {
                    let _ = self.child.kill();
                    let err = self.stderr.take().map(|h| h.join().unwrap_or_default());
                    panic!(
                        "txmq printed {} of {n} lines; stdout: {:?}\nstderr: {}",
                        self.seen.len(),
                        self.seen,
                        err.unwrap_or_default()
                    );
                }
            }
        }
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success());
    }

    /// Waits (up to `limit`) for it to exit; its status, stdout lines and stderr.
    fn finish(mut self, limit: Duration) -> (ExitStatus, Vec<String>, String) {
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                let err = self.stderr.take().map(|h| h.join().unwrap_or_default());
                panic!(
                    "txmq did not exit within {limit:?}; stderr: {}",
                    err.unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        self.seen.extend(self.lines.iter());
        let err = self
            .stderr
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default();
        (status, std::mem::take(&mut self.seen), err)
    }
}

impl Drop for RunningCli {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// SIGSTOPs `broker` and waits until every thread of it has stopped
/// (`kill` returns before the signal has taken effect).
fn pause(broker: &txmq_tests::BrokerProcess) {
    broker.signal("STOP");
    let tasks = format!("/proc/{}/task", broker.pid());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let all_stopped = std::fs::read_dir(&tasks)
            .expect("read the broker's threads")
            .filter_map(Result::ok)
            .all(|t| {
                // "pid (name) STATE ...": the state follows the last ')'.
                std::fs::read_to_string(t.path().join("stat"))
                    .ok()
                    .and_then(|st| {
                        st.rsplit_once(')')
                            .map(|(_, rest)| rest.trim_start().starts_with('T'))
                    })
                    .unwrap_or(true)
            });
        if all_stopped {
            return;
        }
        assert!(Instant::now() < deadline, "the broker did not stop");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

fn text(v: &Value, field: &str) -> String {
    v[field]
        .as_str()
        .unwrap_or_else(|| panic!("{field} is not a string in {v}"))
        .to_string()
}

fn line_of(v: &Value) -> u64 {
    v["line"]
        .as_u64()
        .unwrap_or_else(|| panic!("no input line number in {v}"))
}

/// `m17` -> 17.
fn number_of(body: &str) -> u64 {
    body.strip_prefix('m')
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("not a numbered body: {body:?}"))
}

fn receipts(lines: &[String]) -> Vec<Value> {
    json_lines(lines.join("\n").as_bytes())
}

fn read_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
        .lines()
        .map(str::to_string)
        .collect()
}

/// How many times each body was consumed.
fn counts(got: &[txmq::ReceivedMessage]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for m in got {
        *counts.entry(common::body_text(m)).or_insert(0) += 1;
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_only_broker_mid_stream_reports_every_unsent_line_and_resending_them_delivers_the_rest(
) {
    let cluster = Cluster::nameserver_only(Duration::from_secs(30)).await;
    let ns = cluster.nameserver.clone();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut broker = start_broker(&dir.path().join("a"), &ns, "broker-a", &[]).await;
    create_topic(&ns, "stream", 4).await;
    let unsent = dir.path().join("unsent.txt");
    let unsent_arg = unsent.display().to_string();
    const N: u64 = 3000;
    let args = [
        "--timeout",
        "1s",
        "--output",
        "json",
        "send",
        "stream",
        "--stdin",
        "--window",
        "8",
        "--unsent",
        unsent_arg.as_str(),
    ];
    let mut cli = RunningCli::start(&ns, &args);
    let feeder = cli.feed_slowly(1..=N);
    blocking(|| cli.wait_for_lines(100, Duration::from_secs(30)));
    broker.kill9();
    let (status, out, err) = blocking(|| cli.finish(Duration::from_secs(60)));
    feeder.join().expect("feeder");

    assert_eq!(status.code(), Some(3), "a partial send exits 3\n{err}");
    let printed = receipts(&out);
    let mut sent = BTreeSet::new();
    let mut unknown = BTreeSet::new();
    for r in &printed {
        let line = line_of(r);
        assert_eq!(
            number_of(&text(r, "body")),
            line,
            "the receipt's line is its input line: {r}"
        );
        match text(r, "status").as_str() {
            "SEND_OK" => assert!(sent.insert(line), "one receipt per line: {line}"),
            "UNKNOWN" => assert!(unknown.insert(line), "one receipt per line: {line}"),
            other => panic!("status {other} in {r}"),
        }
    }
    assert!(sent.len() >= 100, "{} sent", sent.len());
    let resend = read_lines(&unsent);
    let unsent_lines: Vec<u64> = resend.iter().map(|l| number_of(l)).collect();
    assert!(
        unsent_lines.windows(2).all(|w| w[0] < w[1]),
        "the unsent lines come in input order, once each"
    );
    let unsent_set: BTreeSet<u64> = unsent_lines.iter().copied().collect();
    assert!(!unsent_set.is_empty(), "lines after the kill are unsent");
    assert!(
        sent.is_disjoint(&unsent_set),
        "a line sent is not reported unsent"
    );
    assert!(
        unknown.is_subset(&unsent_set),
        "an unknown outcome is reported unsent"
    );
    let all: BTreeSet<u64> = (1..=N).collect();
    let covered: BTreeSet<u64> = sent.union(&unsent_set).copied().collect();
    assert_eq!(covered, all, "every input line is either sent or reported");
    assert!(err.contains("not sent"), "{err}");
    assert!(err.contains(&unsent_arg), "names the unsent file: {err}");

    // Resuming from the report delivers the rest.
    blocking(|| broker.restart());
    wait_for_route(&ns, "stream", &["broker-a"]).await;
    let input = resend.join("\n");
    let out = txmq(
        &ns,
        &["--output", "json", "send", "stream", "--stdin"],
        Some(&input),
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(json_lines(&out.stdout).len(), resend.len());
    let want = N as usize + unknown.len();
    let got = consume_all(&ns, "check", "stream", want, Duration::from_secs(3)).await;
    let counts = counts(&got);
    let bodies: BTreeSet<u64> = counts.keys().map(|b| number_of(b)).collect();
    assert_eq!(bodies, all, "every line delivered");
    for (body, n) in &counts {
        let line = number_of(body);
        assert!(
            *n == 1 || (*n == 2 && unknown.contains(&line)),
            "line {line} stored {n} times (only an unknown outcome may repeat)"
        );
    }
    drop(broker);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_for_broker_sends_everything_once_a_broker_starts() {
    let mut cluster = Cluster::nameserver_only(Duration::from_secs(30)).await;
    let ns = cluster.nameserver.clone();
    let mut cli = RunningCli::start(
        &ns,
        &[
            "--output",
            "json",
            "send",
            "late",
            "--stdin",
            "--wait-for-broker",
            "10s",
        ],
    );
    assert!(cli.write("m1\nm2\nm3\nm4\nm5\n"));
    cli.close_stdin();
    // Longer than it takes to give up without waiting (about 0.3 s).
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        cli.child.try_wait().expect("try_wait").is_none(),
        "still waiting for a broker"
    );
    cluster.add_broker("broker-a", |_| {}).await;
    let (status, out, err) = blocking(|| cli.finish(Duration::from_secs(20)));
    assert!(
        status.success(),
        "exit 0 once everything is sent: {status}\n{err}"
    );
    assert!(
        err.contains("waiting up to 10s for a broker"),
        "says it waits: {err}"
    );
    let printed = receipts(&out);
    let lines: BTreeSet<u64> = printed.iter().map(line_of).collect();
    assert_eq!(lines, (1..=5).collect());
    assert!(printed.iter().all(|r| text(r, "status") == "SEND_OK"));
    let got = consume_all(&ns, "check", "late", 6, Duration::from_secs(2)).await;
    assert_eq!(got.len(), 5);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_for_broker_rides_out_a_restart_of_the_only_broker() {
    let cluster = Cluster::nameserver_only(Duration::from_secs(30)).await;
    let ns = cluster.nameserver.clone();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut broker = start_broker(&dir.path().join("a"), &ns, "broker-a", &[]).await;
    create_topic(&ns, "steady", 4).await;
    const N: u64 = 2000;
    let args = [
        "--timeout",
        "1s",
        "--output",
        "json",
        "send",
        "steady",
        "--stdin",
        "--window",
        "8",
        "--wait-for-broker",
        "20s",
    ];
    let mut cli = RunningCli::start(&ns, &args);
    let feeder = cli.feed_slowly(1..=N);
    blocking(|| cli.wait_for_lines(100, Duration::from_secs(30)));
    broker.kill9();
    tokio::time::sleep(Duration::from_millis(500)).await;
    blocking(|| broker.restart());
    let (status, out, err) = blocking(|| cli.finish(Duration::from_secs(60)));
    feeder.join().expect("feeder");
    assert!(status.success(), "{status}\n{err}");
    let printed = receipts(&out);
    let sent: BTreeSet<u64> = printed
        .iter()
        .filter(|r| text(r, "status") == "SEND_OK")
        .map(line_of)
        .collect();
    assert_eq!(sent, (1..=N).collect(), "every line sent");
    let got = consume_all(&ns, "check", "steady", N as usize, Duration::from_secs(3)).await;
    let bodies: BTreeSet<u64> = got
        .iter()
        .map(|m| number_of(&common::body_text(m)))
        .collect();
    assert_eq!(bodies, (1..=N).collect(), "every line delivered");
    drop(broker);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_mid_send_exits_130_and_reports_the_lines_read_but_not_sent() {
    let cluster = Cluster::nameserver_only(Duration::from_secs(30)).await;
    let ns = cluster.nameserver.clone();
    let dir = tempfile::tempdir().expect("temp dir");
    let broker = start_broker(&dir.path().join("a"), &ns, "broker-a", &[]).await;
    create_topic(&ns, "halt", 2).await;
    let unsent = dir.path().join("unsent.txt");
    let unsent_arg = unsent.display().to_string();
    let args = [
        "--timeout",
        "1s",
        "--output",
        "json",
        "send",
        "halt",
        "--stdin",
        "--window",
        "4",
        "--unsent",
        unsent_arg.as_str(),
    ];
    let mut cli = RunningCli::start(&ns, &args);
    let first: String = (1..=10).map(|i| format!("m{i}\n")).collect();
    assert!(cli.write(&first));
    blocking(|| cli.wait_for_lines(10, Duration::from_secs(20)));
    // The broker pauses: four sends hang in flight, the rest wait to be sent.
    pause(&broker);
    let second: String = (11..=20).map(|i| format!("m{i}\n")).collect();
    assert!(cli.write(&second));
    tokio::time::sleep(Duration::from_millis(300)).await;
    cli.signal("INT");
    // Stdin stays open: Ctrl-C does not wait for the end of the input.
    let (status, out, err) = blocking(|| cli.finish(Duration::from_secs(20)));
    broker.signal("CONT");

    assert_eq!(status.code(), Some(130), "{err}");
    let printed = receipts(&out);
    let sent: BTreeSet<u64> = printed
        .iter()
        .filter(|r| text(r, "status") == "SEND_OK")
        .map(line_of)
        .collect();
    assert_eq!(sent, (1..=10).collect());
    let unknown: BTreeSet<u64> = printed
        .iter()
        .filter(|r| text(r, "status") == "UNKNOWN")
        .map(line_of)
        .collect();
    assert_eq!(
        unknown,
        (11..=14).collect(),
        "the four in flight: {printed:?}"
    );
    let resend: Vec<u64> = read_lines(&unsent).iter().map(|l| number_of(l)).collect();
    assert_eq!(resend, (11..=20).collect::<Vec<_>>(), "{err}");
    assert!(err.contains("interrupted"), "{err}");
    assert!(err.contains("read up to line 20"), "{err}");
    assert!(err.contains("outcome unknown"), "{err}");
    drop(broker);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_carry_the_input_line_number() {
    let cluster = Cluster::start(FlushMode::Async).await;
    let ns = &cluster.nameserver;
    // Empty lines are skipped but counted.
    let input = "a\n\nb\r\n\nc";
    let out = txmq(
        ns,
        &["--output", "json", "send", "numbered", "--stdin"],
        Some(input),
    )
    .await;
    assert!(out.status.success());
    let by_line: BTreeMap<u64, String> = json_lines(&out.stdout)
        .iter()
        .map(|r| (line_of(r), text(r, "body")))
        .collect();
    let want: BTreeMap<u64, String> = [(1, "a"), (3, "b"), (5, "c")]
        .map(|(l, b)| (l, b.to_string()))
        .into();
    assert_eq!(by_line, want);

    let out = txmq(ns, &["send", "numbered", "--stdin"], Some(input)).await;
    assert!(out.status.success());
    let text_out = String::from_utf8_lossy(&out.stdout);
    let mut lines: Vec<&str> = text_out
        .lines()
        .filter_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("line=")))
        .collect();
    lines.sort();
    assert_eq!(lines, ["1", "3", "5"], "{text_out}");
    assert!(text_out
        .lines()
        .all(|l| l.starts_with("SEND_OK numbered broker=")));
    cluster.shutdown().await;
}

/// A nameserver, brokers `broker-a` and `broker-b` as processes, topic
/// `shared` on both, and group `g` with offsets committed on both.
async fn two_brokers_with_a_group(
    dir: &Path,
) -> (
    Cluster,
    txmq_tests::BrokerProcess,
    txmq_tests::BrokerProcess,
) {
    let cluster = Cluster::nameserver_only(Duration::from_secs(30)).await;
    let ns = cluster.nameserver.clone();
    let a = start_broker(&dir.join("a"), &ns, "broker-a", &[]).await;
    let b = start_broker(&dir.join("b"), &ns, "broker-b", &[]).await;
    let admin = txmq::Admin::connect([ns.as_str()]).await.expect("admin");
    admin
        .create_topic("shared", 2, PERM_READ_WRITE, None)
        .await
        .expect("create on both");
    admin.close().await.unwrap();
    wait_for_route(&ns, "shared", &["broker-a", "broker-b"]).await;
    let producer = cluster.producer().await;
    for i in 0..8 {
        let broker = if i % 2 == 0 { "broker-a" } else { "broker-b" };
        producer
            .send_to_queue(Message::new("shared", format!("s{i}")), broker, (i / 2) % 2)
            .await
            .expect("send");
    }
    producer.close().await.unwrap();
    let got = consume_all(&ns, "g", "shared", 8, Duration::from_secs(3)).await;
    assert_eq!(got.len(), 8);
    (cluster, a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_list_and_show_answer_for_the_brokers_that_respond_and_name_the_paused_one() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (cluster, a, b) = two_brokers_with_a_group(dir.path()).await;
    let ns = cluster.nameserver.clone();
    pause(&b);

    let out = txmq(
        &ns,
        &["--timeout", "1s", "--output", "json", "group", "list"],
        None,
    )
    .await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "partial: {err}");
    let objects = json_lines(&out.stdout);
    let (last, groups) = objects.split_last().expect("output");
    assert_eq!(
        last["unreachable"],
        serde_json::json!(["broker-b"]),
        "{objects:?}"
    );
    assert!(
        groups
            .iter()
            .any(|g| g["group"] == "g" && g["broker"] == "broker-a"),
        "{objects:?}"
    );
    assert!(
        groups.iter().all(|g| g["broker"] == "broker-a"),
        "{objects:?}"
    );
    assert!(err.contains("broker-b"), "names the silent broker: {err}");

    let out = txmq(&ns, &["--timeout", "1s", "group", "list"], None).await;
    assert_eq!(out.status.code(), Some(3));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("g ") && l.contains("broker-a")),
        "{table}"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("broker-b"));

    let out = txmq(
        &ns,
        &["--timeout", "1s", "--output", "json", "group", "show", "g"],
        None,
    )
    .await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    let objects = json_lines(&out.stdout);
    let (last, states) = objects.split_last().expect("output");
    assert_eq!(last["unreachable"], serde_json::json!(["broker-b"]));
    assert_eq!(states.len(), 1, "{objects:?}");
    assert_eq!(states[0]["broker"], "broker-a");
    let queues = states[0]["queues"].as_array().expect("queues");
    assert!(
        queues
            .iter()
            .any(|q| q["topic"] == "shared" && q["committed"] == 2),
        "{queues:?}"
    );
    assert!(err.contains("broker-b"), "{err}");

    let out = txmq(&ns, &["--timeout", "1s", "group", "show", "g"], None).await;
    assert_eq!(out.status.code(), Some(3));
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains("group g:") && shown.contains("broker-a"),
        "{shown}"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("broker-b"));

    // A message looked up while broker-b is silent: not on broker-a, and
    // broker-b could not say, so the answer is partial (exit 3), not "no
    // such message".
    let unknown = "0123456789ABCDEF0123456789ABCDEF";
    let out = txmq(&ns, &["--timeout", "1s", "msg", "show", unknown], None).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains(&format!("no message with id {unknown} on the brokers that answered; 1 broker(s) could not say: broker-b")),
        "{err}"
    );

    // Back again: both answer, exit 0.
    b.signal("CONT");
    answered_by_both(&ns, &["--output", "json", "group", "show", "g"]).await;
    drop((a, b));
    cluster.shutdown().await;
}

/// Updating a topic's permission (or queues) without `--broker` changes
/// it where it is: a topic on one broker of two stays on that one (it was
/// created on every other broker, with queues nobody chose), and
/// `--broker` adds it to another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updating_a_topic_keeps_it_on_its_brokers() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cluster = Cluster::nameserver_only(Duration::from_secs(30)).await;
    let ns = cluster.nameserver.clone();
    let a = start_broker(&dir.path().join("a"), &ns, "broker-a", &[]).await;
    let b = start_broker(&dir.path().join("b"), &ns, "broker-b", &[]).await;
    let run = |args: &'static [&'static str]| {
        let ns = ns.clone();
        async move {
            let out = txmq(&ns, args, None).await;
            assert!(out.status.success(), "{args:?}: {out:?}");
            String::from_utf8_lossy(&out.stdout).into_owned()
        }
    };
    run(&[
        "topic", "create", "onlyb", "--queues", "1", "--broker", "broker-b",
    ])
    .await;
    wait_for_route(&ns, "onlyb", &["broker-b"]).await;
    let out = txmq(&ns, &["topic", "create", "onlyb", "--perm", "r"], None).await;
    let (updated, err) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{err}");
    assert!(!updated.contains("broker-a"), "{updated}");
    assert!(
        err.contains("note: topic onlyb is not on broker-a"),
        "names the broker left alone: {err}"
    );
    let route = run(&["--output", "json", "topic", "route", "onlyb"]).await;
    let brokers: Vec<String> = json_lines(route.as_bytes())
        .iter()
        .map(|r| text(r, "broker"))
        .collect();
    assert_eq!(brokers, ["broker-b"], "{route}");
    run(&[
        "topic", "create", "onlyb", "--queues", "1", "--broker", "broker-a",
    ])
    .await;
    wait_for_route(&ns, "onlyb", &["broker-a", "broker-b"]).await;
    // A message at an offset of one broker's queue: the other broker, with
    // nothing there, answered too (it counted as one that did not, exit 3).
    run(&["topic", "create", "onlyb", "--perm", "rw"]).await;
    run(&["send", "onlyb", "--body", "one"]).await;
    let got = run(&[
        "msg", "get", "--topic", "onlyb", "--queue", "0", "--offset", "0",
    ])
    .await;
    assert!(got.contains("one"), "{got}");
    drop((a, b));
    cluster.shutdown().await;
}

/// `tx list` and `tx show` answer for the brokers that respond and name
/// the silent one (exit 3), as `group show` does: they failed whole, so
/// an operator lost transaction forensics in a partial outage, and a
/// filtered list (a cron alert) could not tell a paused broker from a
/// match. A match is still exit 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tx_list_and_show_answer_for_the_brokers_that_respond() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (cluster, a, b) = two_brokers_with_a_group(dir.path()).await;
    let ns = cluster.nameserver.clone();
    let sent = txmq(
        &ns,
        &[
            "--output", "json", "tx", "send", "shared", "--group", "pg", "--body", "t", "--local",
            "unknown",
        ],
        None,
    )
    .await;
    assert!(sent.status.success(), "{sent:?}");
    let tx_id = json_lines(&sent.stdout)[0]["tx_id"]
        .as_u64()
        .expect("tx_id")
        .to_string();
    let shown = txmq(&ns, &["--output", "json", "tx", "show", &tx_id], None).await;
    assert!(shown.status.success(), "{shown:?}");
    let holder = text(&json_lines(&shown.stdout)[0], "broker");
    let (silent, name) = if holder == "broker-a" {
        (&b, "broker-b")
    } else {
        (&a, "broker-a")
    };
    pause(silent);

    let out = txmq(
        &ns,
        &["--timeout", "1s", "--output", "json", "tx", "list"],
        None,
    )
    .await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "partial: {err}");
    let objects = json_lines(&out.stdout);
    assert!(
        objects
            .iter()
            .any(|o| o["tx_id"].as_u64().map(|t| t.to_string()) == Some(tx_id.clone())),
        "{objects:?}"
    );
    assert_eq!(
        objects.last().expect("output")["unreachable"],
        serde_json::json!([name])
    );

    let out = txmq(
        &ns,
        &["--timeout", "1s", "tx", "list", "--state", "pending"],
        None,
    )
    .await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "a match: {err}");
    assert!(
        err.contains(name) && err.contains("1 transaction matches"),
        "{err}"
    );
    // Only the silent broker asked: nothing can be said (3), not a match (1).
    let out = txmq(
        &ns,
        &[
            "--timeout",
            "1s",
            "tx",
            "list",
            "--state",
            "parked",
            "--broker",
            name,
        ],
        None,
    )
    .await;
    assert_eq!(out.status.code(), Some(3), "{out:?}");

    let out = txmq(
        &ns,
        &["--timeout", "1s", "--output", "json", "tx", "show", &tx_id],
        None,
    )
    .await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "partial: {err}");
    assert_eq!(text(&json_lines(&out.stdout)[0], "broker"), holder, "{err}");
    assert!(err.contains(name), "{err}");
    let out = txmq(&ns, &["--timeout", "1s", "tx", "recheck", &tx_id], None).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("name the one that holds it with --broker"),
        "{err}"
    );
    // The silent broker may hold another transaction of this id: nothing
    // is ended.
    let out = txmq(
        &ns,
        &["--timeout", "1s", "tx", "resolve", &tx_id, "--commit"],
        None,
    )
    .await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("name the one that holds it with --broker"),
        "{err}"
    );
    let out = txmq(
        &ns,
        &[
            "--output", "json", "tx", "show", &tx_id, "--broker", &holder,
        ],
        None,
    )
    .await;
    assert_eq!(text(&json_lines(&out.stdout)[0], "state"), "prepared");

    silent.signal("CONT");
    drop((a, b));
    cluster.shutdown().await;
}

/// Runs `txmq args` (with JSON output), which must succeed with a line
/// from each of the two brokers.
async fn answered_by_both(ns: &str, args: &[&str]) {
    let out = txmq(ns, args, None).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let brokers: BTreeSet<String> = json_lines(&out.stdout)
        .iter()
        .map(|o| text(o, "broker"))
        .collect();
    assert_eq!(
        brokers,
        ["broker-a".to_string(), "broker-b".to_string()].into()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_offset_reports_each_brokers_result_when_one_is_paused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (cluster, a, b) = two_brokers_with_a_group(dir.path()).await;
    let ns = cluster.nameserver.clone();
    pause(&b);

    let reset = [
        "--timeout",
        "1s",
        "--output",
        "json",
        "group",
        "reset-offset",
        "g",
        "--topic",
        "shared",
        "--to",
        "first",
    ];
    let out = txmq(&ns, &reset, None).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "partial: {err}");
    let objects = json_lines(&out.stdout);
    let moved: BTreeSet<(String, u64, u64)> = objects
        .iter()
        .filter(|o| o.get("error").is_none())
        .map(|o| {
            (
                text(o, "broker"),
                o["queue"].as_u64().expect("queue"),
                o["offset"].as_u64().expect("offset"),
            )
        })
        .collect();
    assert_eq!(
        moved,
        [
            ("broker-a".to_string(), 0, 0),
            ("broker-a".to_string(), 1, 0)
        ]
        .into(),
        "{objects:?}"
    );
    let failed: Vec<&Value> = objects
        .iter()
        .filter(|o| o.get("error").is_some())
        .collect();
    assert_eq!(failed.len(), 1, "{objects:?}");
    assert_eq!(failed[0]["broker"], "broker-b");
    assert!(
        err.contains("broker-b") && err.contains("broker-a"),
        "{err}"
    );

    // broker-a's messages come again; broker-b's offsets did not move.
    b.signal("CONT");
    let got = consume_all(&ns, "g", "shared", 5, Duration::from_secs(2)).await;
    assert_eq!(got.len(), 4, "{got:?}");
    assert!(got.iter().all(|m| m.broker_name == "broker-a"));

    // With both answering, every broker's result and exit 0.
    answered_by_both(&ns, &reset).await;
    drop((a, b));
    cluster.shutdown().await;
}

/// `dlq resend --all` (and `topic status`) with one of two brokers paused
/// report what the other did, name the paused one and exit 3; once it is back,
/// the next run re-sends its letters and skips those re-sent before.
/// (The paused broker's error was all it printed, with exit 1, so the
/// letters re-sent looked never re-sent.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_list_and_resend_report_what_the_answering_broker_has_when_one_is_paused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (cluster, a, b) = two_brokers_with_a_group(dir.path()).await;
    let ns = cluster.nameserver.clone();
    blocking(|| make_dead_letters(&ns, "shared", "dz", 8));
    pause(&b);
    // Each answers with broker-a's part (`rows` of them, picked by `is_row`),
    // names broker-b (on stderr and in JSON's last line), and exits 3.
    let partial = async |args: &[&str], is_row: fn(&Value) -> bool, rows: usize| {
        let mut all = vec!["--timeout", "1s", "--output", "json"];
        all.extend_from_slice(args);
        let out = txmq(&ns, &all, None).await;
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(3), "{args:?} partial: {err}");
        let objects = json_lines(&out.stdout);
        let found: Vec<&Value> = objects.iter().filter(|o| is_row(o)).collect();
        assert_eq!(found.len(), rows, "{args:?}: {objects:?}");
        assert!(
            found.iter().all(|o| o["broker"] == "broker-a"),
            "{args:?}: {objects:?}"
        );
        assert!(err.contains("broker-b"), "{args:?}: {err}");
        objects
    };
    let unreachable_b = |objects: &[Value]| {
        assert!(
            objects
                .iter()
                .any(|o| o["unreachable"] == serde_json::json!(["broker-b"])),
            "{objects:?}"
        );
    };
    let letter: fn(&Value) -> bool = |o| o["msg_id"].is_string();
    unreachable_b(&partial(&["dlq", "list", "dz"], letter, 4).await);
    let resend = ["dlq", "resend", "dz", "--all"];
    let objects = partial(&resend, letter, 4).await;
    unreachable_b(&objects);
    assert!(
        objects.iter().any(|o| o["resent"] == 4),
        "the summary: {objects:?}"
    );
    // So does topic status: broker-a's queues.
    partial(&["topic", "status", "shared"], |o| o["queue"].is_u64(), 2).await;

    b.signal("CONT");
    let out = txmq(&ns, &[&["--output", "json"][..], &resend].concat(), None).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let objects = json_lines(&out.stdout);
    let resent: Vec<&Value> = objects.iter().filter(|o| o["msg_id"].is_string()).collect();
    assert_eq!(resent.len(), 4, "{objects:?}");
    assert!(
        resent.iter().all(|o| o["broker"] == "broker-b"),
        "{objects:?}"
    );
    let summary = objects.last().expect("summary");
    assert_eq!(
        summary["already_resent"].as_array().map(Vec::len),
        Some(4),
        "{summary}"
    );
    drop((a, b));
    cluster.shutdown().await;
}

/// The CLI retries sends itself (to know whether an attempt may have
/// stored the message); a retry after a broker failed goes to another
/// broker, as the producer's own retries do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_one_of_two_brokers_paused_sends_are_retried_on_the_other() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (cluster, a, b) = two_brokers_with_a_group(dir.path()).await;
    let ns = cluster.nameserver.clone();
    pause(&b);
    let args = [
        "--timeout",
        "1s",
        "--output",
        "json",
        "send",
        "shared",
        "--body",
        "x",
        "--count",
        "20",
    ];
    let out = txmq(&ns, &args, None).await;
    let err = String::from_utf8_lossy(&out.stderr);
    b.signal("CONT");
    assert!(out.status.success(), "{err}");
    let printed = json_lines(&out.stdout);
    assert_eq!(printed.len(), 20);
    assert!(
        printed
            .iter()
            .all(|r| text(r, "status") == "SEND_OK" && text(r, "broker") == "broker-a"),
        "{printed:?}"
    );
    drop((a, b));
    cluster.shutdown().await;
}

/// `--unsent` without `--stdin` is a usage error (exit 2), said before
/// anything is sent or any file created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsent_without_stdin_is_a_usage_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("rest.txt");
    let out = txmq(
        "127.0.0.1:1",
        &[
            "send",
            "orders",
            "--body",
            "hi",
            "--unsent",
            file.to_str().unwrap(),
        ],
        None,
    )
    .await;
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("needs --stdin"), "{err}");
    assert!(!file.exists());
}

/// `txmq send --stdin --wait-for-broker` (idempotent, the default) across a
/// broker paused longer than `--timeout`: sends written before the pause
/// are retried after it with their stamps, and one the broker stored but
/// no longer remembers where (`DUPLICATE_SEQUENCE`: more than its last
/// few sends of the queue went out past the oldest unanswered one, after
/// a wait for room) is reported stored (`STORED_BEFORE`, no offset), not
/// an unknown outcome that ended the command (exit 3, every later line
/// not tried). Every line ends sent, and is stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_stored_by_an_earlier_attempt_counts_as_sent_across_a_pause() {
    const LINES: usize = 300;
    let dir = tempfile::tempdir().expect("temp dir");
    let cluster = Cluster::nameserver_only(Duration::from_secs(30)).await;
    let ns = cluster.nameserver.clone();
    let broker = start_broker(&dir.path().join("a"), &ns, "broker-a", &[]).await;
    create_topic(&ns, "paused-one", 1).await;
    let send = txmq_tests::StdinSend::start(
        &ns,
        &["--timeout", "1s"],
        "paused-one",
        &["--wait-for-broker", "1m"],
        "l",
        LINES,
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    pause(&broker);
    tokio::time::sleep(Duration::from_secs(3)).await;
    broker.signal("CONT");
    send.all_sent("");
    let got = consume_all(&ns, "g", "paused-one", LINES, Duration::from_secs(2)).await;
    let mut bodies: Vec<String> = got.iter().map(common::body_text).collect();
    bodies.sort();
    bodies.dedup();
    assert_eq!((got.len(), bodies.len()), (LINES, LINES), "each line once");
    drop(broker);
    cluster.shutdown().await;
}

/// `topic delete` refused by one broker (a pending transaction there)
/// deletes nothing anywhere: the other broker's queues, messages and
/// group offsets were deleted while the command said only that it was
/// refused, and `--force` later named just the broker that had refused.
/// A paused broker also deletes nothing anywhere (it cannot be asked).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_delete_one_broker_refuses_deletes_nothing_anywhere() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (cluster, a, b) = two_brokers_with_a_group(dir.path()).await;
    let ns = cluster.nameserver.clone();
    let sent = txmq(
        &ns,
        &[
            "tx",
            "send",
            "shared",
            "--group",
            "pg",
            "--body",
            "t",
            "--local",
            "unknown",
            "--first-check-delay",
            "10m",
        ],
        None,
    )
    .await;
    assert!(sent.status.success(), "{sent:?}");
    let brokers_with_it = || async {
        let out = txmq(
            &ns,
            &["--output", "json", "topic", "status", "shared"],
            None,
        )
        .await;
        let mut names: Vec<String> = json_lines(&out.stdout)
            .iter()
            .map(|l| text(l, "broker"))
            .collect();
        names.dedup();
        names
    };
    let refused = txmq(&ns, &["topic", "delete", "shared"], None).await;
    let err = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{err}");
    assert!(
        err.contains("BUSY") && err.contains("deleted on no broker"),
        "{err}"
    );
    assert_eq!(brokers_with_it().await, ["broker-a", "broker-b"]);

    pause(&b);
    let silent = txmq(&ns, &["topic", "delete", "shared", "--force"], None).await;
    let err = String::from_utf8_lossy(&silent.stderr);
    assert_ne!(silent.status.code(), Some(0), "{err}");
    assert!(err.contains("deleted on no broker"), "{err}");
    b.signal("CONT");
    assert_eq!(brokers_with_it().await, ["broker-a", "broker-b"]);

    let forced = txmq(&ns, &["topic", "delete", "shared", "--force"], None).await;
    let out = String::from_utf8_lossy(&forced.stdout);
    assert!(forced.status.success(), "{forced:?}");
    assert!(
        out.contains("deleted topic shared on broker-a") && out.contains("on broker-b"),
        "{out}"
    );
    drop((a, b));
    cluster.shutdown().await;
}

/// A message stored with a status short of SEND_OK (here FLUSH_DISK_TIMEOUT:
/// sync flush that answers without waiting for its fdatasync) is counted
/// by status in `send`'s summary: it said only "sent N messages", so a
/// script reading the summary saw a send to a master without its slaves
/// (SLAVE_NOT_AVAILABLE) as a plain success.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_counts_messages_stored_short_of_send_ok_in_its_summary() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cluster = Cluster::nameserver_only(Duration::from_secs(30)).await;
    let ns = cluster.nameserver.clone();
    let a = start_broker(
        &dir.path().join("a"),
        &ns,
        "broker-a",
        &["--flush", "sync", "--sync-flush-timeout", "0s"],
    )
    .await;
    let out = txmq(
        &ns,
        &[
            "--output", "json", "send", "flushy", "--body", "x", "--count", "20",
        ],
        None,
    )
    .await;
    assert!(out.status.success(), "{out:?}");
    let short = json_lines(&out.stdout)
        .iter()
        .filter(|l| l["status"] == "FLUSH_DISK_TIMEOUT")
        .count();
    assert!(short > 0, "no send was answered FLUSH_DISK_TIMEOUT");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "sent 20 messages, {short} with status FLUSH_DISK_TIMEOUT in"
        )),
        "{err}"
    );
    drop(a);
    cluster.shutdown().await;
}

/// A `tx send` whose prepare reached the broker but whose answer was lost
/// (the connection closed) names the message, says the broker may hold it
/// and checks it back, and exits 3; the half message is there, under
/// that id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tx_send_whose_prepare_was_not_answered_names_the_message_and_exits_3() {
    let proxy = txmq_tests::proxy::Proxy::bind().await.unwrap();
    let mut cluster = Cluster::nameserver_only(Duration::from_secs(30)).await;
    let via = proxy.addr().to_string();
    let addr = cluster
        .add_broker("broker-a", |c| c.advertise_addr = Some(via.clone()))
        .await;
    proxy.set_target(&addr.to_string());
    let ns = cluster.nameserver.clone();
    create_topic(&ns, "lost-prepare", 1).await;

    proxy.drop_reply_to("PrepareTransaction");
    let out = txmq(
        &ns,
        &[
            "--output",
            "json",
            "--timeout",
            "2s",
            "tx",
            "send",
            "lost-prepare",
            "--group",
            "pg-lost",
            "--body",
            "x",
            "--local",
            "rollback",
            "--retries",
            "0",
        ],
        None,
    )
    .await;
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!proxy.drop_pending(), "no prepare went up: {err}");
    assert_eq!(out.status.code(), Some(3), "{err}");
    let printed = json_lines(&out.stdout);
    assert_eq!(printed.len(), 1, "{printed:?}");
    let msg_id = text(&printed[0], "msg_id");
    assert_eq!(printed[0]["prepare_status"], Value::Null, "{printed:?}");
    assert_eq!(text(&printed[0], "topic"), "lost-prepare");
    assert!(
        err.contains(&format!("the prepare of message {msg_id} was not answered"))
            && err.contains("group pg-lost")
            && err.contains("answered rollback"),
        "{err}"
    );

    let listed = txmq(&ns, &["--output", "json", "tx", "list"], None).await;
    assert!(listed.status.success(), "{listed:?}");
    let listed = json_lines(&listed.stdout);
    assert!(
        listed
            .iter()
            .any(|t| t["msg_id"] == msg_id.as_str() && t["producer_group"] == "pg-lost"),
        "the half message is there under the id named: {listed:?}"
    );
    cluster.shutdown().await;
}

/// With no broker registered, `tx resolve` and `tx recheck` say so, and do
/// not send the user to `tx show` (which could not say either).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tx_resolve_with_no_broker_registered_says_so_without_a_hint_that_cannot_help() {
    let cluster = Cluster::nameserver_only(Duration::from_secs(30)).await;
    let ns = cluster.nameserver.clone();
    for args in [
        &["tx", "resolve", "5", "--commit"][..],
        &["tx", "recheck", "5"][..],
    ] {
        let out = txmq(&ns, args, None).await;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.contains("no broker is registered") && !err.contains("tx show"),
            "{args:?}: {err}"
        );
    }
    cluster.shutdown().await;
}
