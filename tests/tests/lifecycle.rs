//! Process lifecycle: several independent nameservers, graceful shutdown on
//! SIGTERM and SIGINT, the README's standalone mode, and connections served
//! on threads of their own (`--network-threads`), with real processes.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use std::collections::BTreeSet;

use futures_util::future::join_all;
use txmq::{BoxError, CheckRequest, Message, TransactionListener, TransactionState, TxContext};
use txmq_tests::{
    binary, consume_all, free_port, txmq_cli, wait_for_broker, BrokerProcess, Cluster,
};

/// A real `txmq-nameserver` process on a free port; killed on drop.
struct NameserverProcess {
    child: std::process::Child,
    addr: String,
}

impl NameserverProcess {
    fn start() -> NameserverProcess {
        let addr = format!("127.0.0.1:{}", free_port());
        let child = Command::new(binary("txmq-nameserver"))
            .args(["--listen", &addr, "--broker-expiry", "2s"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start txmq-nameserver");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(Instant::now() < deadline, "nameserver did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        NameserverProcess { child, addr }
    }
}

impl Drop for NameserverProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_registers_with_every_nameserver_and_clients_survive_losing_one() {
    let ns_a = NameserverProcess::start();
    let mut ns_b = NameserverProcess::start();
    let dir = tempfile::tempdir().unwrap();
    let both = format!("{},{}", ns_a.addr, ns_b.addr);
    let _broker = BrokerProcess::start(dir.path(), &both, "broker-a", &[]);
    wait_for_broker(&ns_a.addr, "broker-a").await;
    wait_for_broker(&ns_b.addr, "broker-a").await;

    let producer = txmq::Producer::builder()
        .nameserver(&both)
        .build()
        .await
        .unwrap();
    producer
        .send(Message::new("events", "before"))
        .await
        .unwrap();
    // Each nameserver answers on its own: they share no state but the broker's registrations.
    for ns in [&ns_a.addr, &ns_b.addr] {
        let admin = txmq::Admin::connect([ns.clone()]).await.unwrap();
        let route = admin.route("events").await.unwrap();
        assert_eq!(route.brokers.len(), 1, "{ns} knows the route");
    }

    // Losing one nameserver: clients that know both keep working.
    let _ = ns_b.child.kill();
    let _ = ns_b.child.wait();
    let fresh = txmq::Producer::builder()
        .nameserver(&both)
        .build()
        .await
        .unwrap();
    fresh.send(Message::new("events", "after")).await.unwrap();
    let got = consume_all(&both, "g", "events", 2, Duration::from_secs(5)).await;
    let mut bodies: Vec<String> = got
        .iter()
        .map(|m| String::from_utf8(m.body().to_vec()).unwrap())
        .collect();
    bodies.sort();
    assert_eq!(bodies, vec!["after", "before"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_and_sigint_shut_down_gracefully_keeping_messages_and_offsets() {
    let cluster = Cluster::nameserver_only(Duration::from_secs(30)).await;
    let dir = tempfile::tempdir().unwrap();
    let mut broker = BrokerProcess::start(dir.path(), &cluster.nameserver, "broker-a", &[]);
    wait_for_broker(&cluster.nameserver, "broker-a").await;
    let producer = cluster.producer().await;
    for i in 0..100 {
        producer
            .send(Message::new("ledger", format!("{i}")))
            .await
            .unwrap();
    }
    let first = consume_all(
        &cluster.nameserver,
        "g",
        "ledger",
        100,
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(first.len(), 100);

    // Async flush: only the graceful shutdown flushes what the page cache holds.
    assert_eq!(
        broker.stop(),
        Some(0),
        "SIGTERM exits 0; log:\n{}",
        broker.log_text()
    );
    assert!(
        broker.log_text().contains("stopped"),
        "{}",
        broker.log_text()
    );
    assert!(dir.path().join("checkpoint").exists());
    broker.restart();
    wait_for_broker(&cluster.nameserver, "broker-a").await;
    for i in 100..150 {
        producer
            .send(Message::new("ledger", format!("{i}")))
            .await
            .unwrap();
    }
    // The group resumes after its committed 100: exactly the 50 new ones.
    let rest = consume_all(
        &cluster.nameserver,
        "g",
        "ledger",
        150,
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(rest.len(), 50);
    for m in &rest {
        let n: u32 = String::from_utf8(m.body().to_vec())
            .unwrap()
            .parse()
            .unwrap();
        assert!(n >= 100, "message {n} was consumed before the restart");
    }

    broker.signal("INT");
    let deadline = Instant::now() + Duration::from_secs(15);
    while !broker.log_text().contains("stopped broker=broker-a") {
        assert!(
            Instant::now() < deadline,
            "SIGINT did not stop the broker:\n{}",
            broker.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// SIGHUP (an operator's reload, logrotate's postrotate) leaves a broker
/// and a nameserver that run without an ACL file serving: it killed both
/// (exit 129), without the graceful shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_without_an_acl_file_leaves_broker_and_nameserver_serving() {
    let mut ns = NameserverProcess::start();
    let dir = tempfile::tempdir().unwrap();
    let mut broker = BrokerProcess::start(dir.path(), &ns.addr, "broker-a", &[]);
    wait_for_broker(&ns.addr, "broker-a").await;
    let cli = |args: &[&str]| {
        let out = txmq_cli(&ns.addr, args, None);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{args:?}: {err}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    cli(&["send", "hup", "--body", "before"]);

    broker.signal("HUP");
    let hup = Command::new("kill")
        .args(["-HUP", &ns.child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(hup.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    while !broker.log_text().contains("no ACL file") {
        assert!(
            Instant::now() < deadline,
            "the broker did not log the SIGHUP:\n{}",
            broker.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        ns.child.try_wait().expect("ask the nameserver").is_none(),
        "SIGHUP ended the nameserver"
    );

    // Both serve on: new connections find the route at the nameserver and
    // send to the broker, and the group reads what came before and after.
    cli(&["send", "hup", "--body", "after"]);
    let out = cli(&[
        "consume",
        "hup",
        "--group",
        "g",
        "--count",
        "2",
        "--idle-timeout",
        "10s",
    ]);
    assert!(
        out.contains("body=before") && out.contains("body=after"),
        "{out}"
    );
    assert!(
        ns.child.try_wait().expect("ask the nameserver").is_none(),
        "SIGHUP ended the nameserver"
    );
    assert_eq!(
        broker.stop(),
        Some(0),
        "the broker still shuts down gracefully; log:\n{}",
        broker.log_text()
    );
}

#[test]
fn standalone_mode_serves_the_readme_flow_and_a_taken_port_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let ns = format!("127.0.0.1:{}", free_port());
    let listen = format!("127.0.0.1:{}", free_port());
    let mut child = Command::new(binary("txmq-broker"))
        .args([
            "--standalone",
            "--nameserver-listen",
            &ns,
            "--listen",
            &listen,
        ])
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(&listen).is_err() {
        assert!(
            Instant::now() < deadline,
            "standalone broker did not listen"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The port opens before the broker's first registration reaches its
    // nameserver; a user typing the next command is slower than that.
    tokio::runtime::Runtime::new()
        .expect("a runtime")
        .block_on(txmq_tests::wait_for_broker(&ns, "broker-a"));
    let run = |args: &[&str]| txmq_tests::txmq_cli(&ns, args, None);
    assert!(run(&["topic", "create", "orders", "--queues", "4"])
        .status
        .success());
    assert!(
        run(&["send", "orders", "--body", "hello", "--key", "k1", "--tag", "t1"])
            .status
            .success()
    );
    let out = run(&["consume", "orders", "--group", "g1", "--count", "1"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("body=hello"));
    // Data lives under ./txmq-data of the working directory, as the README says.
    assert!(dir.path().join("txmq-data/commitlog").is_dir());

    // A second broker on the same data directory fails at once, naming it
    // and the broker that has it (it would hand out the same positions,
    // and remove the segment the first one writes in).
    let second = |args: &[&str]| {
        let out = Command::new(binary("txmq-broker"))
            .arg("--standalone")
            .args(args)
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let other_ns = format!("127.0.0.1:{}", free_port());
    let other_listen = format!("127.0.0.1:{}", free_port());
    let err = second(&["--nameserver-listen", &other_ns, "--listen", &other_listen]);
    assert!(
        err.contains("is in use by another broker") && err.contains(&format!("pid {}", child.id())),
        "{err}"
    );
    // And one on the same ports, with a directory of its own.
    let err = second(&[
        "--nameserver-listen",
        &ns,
        "--listen",
        &listen,
        "--data-dir",
        "other",
    ]);
    assert!(
        err.contains("cannot listen on") || err.contains("Address already in use"),
        "{err}"
    );

    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
}

/// Leaves every local transaction unknown and commits it when checked back.
struct CommitWhenChecked;

impl TransactionListener for CommitWhenChecked {
    async fn execute(&self, _: &Message, _: &TxContext) -> Result<TransactionState, BoxError> {
        Ok(TransactionState::Unknown)
    }

    async fn check(&self, _: &CheckRequest) -> Result<TransactionState, BoxError> {
        Ok(TransactionState::Commit)
    }
}

/// The names of a process's threads, from `/proc`.
fn thread_names(pid: u32) -> BTreeSet<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|tasks| {
            tasks
                .flatten()
                .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
                .map(|n| n.trim().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// With `--network-threads 2` the broker serves its connections on two
/// threads of their own, each connection on one, in turn. Producers on
/// both threads (a connection each) send at once and every message is
/// consumed once; a consumer's long poll is answered by a send;
/// a check-back, the broker's own request, reaches a transaction
/// producer's connection there; and SIGTERM still stops it with exit 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_on_network_threads_send_long_poll_check_back_and_stop_cleanly() {
    let cluster = Cluster::nameserver_only(Duration::from_secs(30)).await;
    let ns = cluster.nameserver.clone();
    let dir = tempfile::tempdir().unwrap();
    let mut broker = BrokerProcess::start(
        dir.path(),
        &ns,
        "broker-a",
        &[
            "--network-threads",
            "2",
            "--transaction-timeout",
            "300ms",
            "--transaction-check-interval",
            "100ms",
        ],
    );
    wait_for_broker(&ns, "broker-a").await;
    let names = thread_names(broker.pid());
    for t in ["txmq-net-0", "txmq-net-1"] {
        assert!(names.contains(t), "no thread {t} among {names:?}");
    }

    // Four producers, a connection each: two on each thread.
    let producers = join_all((0..4).map(|_| cluster.producer())).await;
    join_all(
        producers
            .iter()
            .enumerate()
            .map(|(p, producer)| async move {
                for i in 0..50 {
                    producer
                        .send(Message::new("ledger", format!("{p}-{i}")))
                        .await
                        .unwrap();
                }
            }),
    )
    .await;
    let got = consume_all(&ns, "g", "ledger", 200, Duration::from_secs(5)).await;
    let bodies: BTreeSet<String> = got
        .iter()
        .map(|m| String::from_utf8_lossy(m.body()).into_owned())
        .collect();
    assert_eq!((got.len(), bodies.len()), (200, 200), "each message once");

    // A consume from the end waits in a long poll and is answered by a
    // send. Sent every 100 ms until it returns: it may take its start
    // offset after the first ones.
    let waiting = {
        let ns = ns.clone();
        tokio::task::spawn_blocking(move || {
            txmq_cli(
                &ns,
                &[
                    "consume",
                    "ledger",
                    "--group",
                    "late",
                    "--from",
                    "last",
                    "--count",
                    "1",
                    "--idle-timeout",
                    "10s",
                ],
                None,
            )
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut late = 0;
    while !waiting.is_finished() {
        producers[late % producers.len()]
            .send(Message::new("ledger", "late"))
            .await
            .unwrap();
        late += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = waiting.await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("body=late"), "{stdout}");

    // A transaction left unknown is checked back over the producer's
    // connection, committed, and then visible.
    let tx = txmq::TransactionProducer::builder()
        .nameserver(&ns)
        .group("payments")
        .listener(CommitWhenChecked)
        .start()
        .await
        .expect("transaction producer starts");
    tx.send_in_transaction(Message::new("paid", "order-1"))
        .await
        .unwrap();
    let paid = consume_all(&ns, "g", "paid", 1, Duration::from_secs(10)).await;
    assert_eq!(paid.len(), 1, "committed by the check-back");
    assert_eq!(paid[0].body().as_ref(), b"order-1");

    assert_eq!(
        broker.stop(),
        Some(0),
        "SIGTERM exits 0; log:\n{}",
        broker.log_text()
    );
    // A panic on a network thread would not change the exit code.
    let log = broker.log_text();
    assert!(!log.contains("panicked"), "{log}");
}
