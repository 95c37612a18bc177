//! Process lifecycle: several independent nameservers, graceful shutdown on
//! SIGTERM and SIGINT, and the README's standalone mode, with real processes.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use txmq::Message;
use txmq_tests::{binary, consume_all, free_port, wait_for_broker, BrokerProcess, Cluster};

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

    // A second broker on the same ports fails at once with a clear message.
    let second = Command::new(binary("txmq-broker"))
        .args([
            "--standalone",
            "--nameserver-listen",
            &ns,
            "--listen",
            &listen,
        ])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!second.status.success());
    let err = String::from_utf8_lossy(&second.stderr);
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
