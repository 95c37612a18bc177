//! Routes under faults, with real processes: two brokers under one name
//! (the default `broker-a`, say) do not take turns in the route table, an
//! unregister from another broker does not drop the live one, and a cut
//! broker-nameserver connection does not hide the broker until its next
//! heartbeat.

use std::path::Path;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use txmq_protocol::{ErrorCode, Hello, Role, UnregisterBroker, PROTOCOL_VERSION};
use txmq_remoting::{Connection, ConnectionConfig};
use txmq_tests::chaos::process::Process;
use txmq_tests::proxy::Proxy;
use txmq_tests::{binary, free_port, Cluster};

/// A real `txmq-nameserver` or `txmq-broker` listening on `addr`, with its
/// log in a file; continued and killed when dropped.
struct Node {
    process: Process,
    addr: String,
}

impl Node {
    /// Starts `bin` with `args` (which make it listen on `addr`), logging to
    /// `dir/label.log`.
    fn spawn(bin: &str, addr: String, args: Vec<String>, dir: &Path, label: &str) -> Node {
        let process = Process::start(
            label,
            binary(bin),
            dir.join(format!("{label}.log")),
            move |_| args.clone(),
        );
        Node { process, addr }
    }

    /// A nameserver on a free port whose brokers expire after `expiry`.
    fn nameserver(dir: &Path, label: &str, expiry: &str) -> Node {
        let addr = format!("127.0.0.1:{}", free_port());
        let args = ["--listen", &addr, "--broker-expiry", expiry].map(String::from);
        let node = Node::spawn("txmq-nameserver", addr.clone(), args.to_vec(), dir, label);
        node.wait_listening();
        node
    }

    /// A broker named `name` registering with `nameservers` (comma
    /// separated) every `heartbeat`; not waited for.
    fn broker(dir: &Path, label: &str, nameservers: &str, name: &str, heartbeat: &str) -> Node {
        let addr = format!("127.0.0.1:{}", free_port());
        let data = dir.join(label);
        let args = [
            "--listen",
            &addr,
            "--nameserver",
            nameservers,
            "--data-dir",
            data.to_str().expect("utf-8 temp path"),
            "--broker-name",
            name,
            "--heartbeat-interval",
            heartbeat,
            "--segment-size",
            "8MiB",
        ]
        .map(String::from);
        Node::spawn("txmq-broker", addr.clone(), args.to_vec(), dir, label)
    }

    /// Waits until the process accepts connections; panics with its log if
    /// it does not.
    fn wait_listening(&self) -> &Node {
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&self.addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "{} did not listen; log:\n{}",
                self.addr,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self
    }

    fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        self.process.wait_exit(within)
    }

    fn signal(&self, signal: &str) {
        self.process.signal(signal);
    }

    fn log_text(&self) -> String {
        self.process.log_text()
    }

    fn log_lines_with(&self, parts: &[&str]) -> Vec<String> {
        self.process.log_lines_with(parts)
    }
}

/// The brokers nameserver `ns` lists, as (name, address).
async fn listed(ns: &str) -> Vec<(String, String)> {
    let admin = txmq::Admin::connect([ns.to_string()])
        .await
        .expect("admin connects");
    let brokers = admin.cluster().await.expect("cluster listing");
    admin.close().await.unwrap();
    brokers
        .into_iter()
        .map(|b| (b.broker_name, b.addr))
        .collect()
}

/// The addresses in `topic`'s route at nameserver `ns` (empty: no route).
async fn route_addrs(ns: &str, topic: &str) -> Vec<String> {
    let admin = txmq::Admin::connect([ns.to_string()])
        .await
        .expect("admin connects");
    let route = admin.route(topic).await;
    admin.close().await.unwrap();
    route
        .map(|r| r.brokers.into_iter().map(|b| b.addr).collect())
        .unwrap_or_default()
}

/// Polls until nameserver `ns` lists exactly `want`; panics after `within`.
async fn wait_listed(ns: &str, want: &[(&str, &str)], within: Duration) -> Duration {
    let want: Vec<(String, String)> = want
        .iter()
        .map(|(n, a)| (n.to_string(), a.to_string()))
        .collect();
    let start = Instant::now();
    loop {
        let got = listed(ns).await;
        if got == want {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "{ns} lists {got:?}, not {want:?}, after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// For `period`, nameserver `ns` keeps listing only `name` at `addr` and
/// routes `topic` to it.
async fn keeps_pointing_at(ns: &str, name: &str, addr: &str, topic: &str, period: Duration) {
    let until = Instant::now() + period;
    while Instant::now() < until {
        assert_eq!(
            listed(ns).await,
            vec![(name.to_string(), addr.to_string())],
            "{ns}"
        );
        assert_eq!(route_addrs(ns, topic).await, vec![addr.to_string()], "{ns}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn create_topic(ns: &str, topic: &str) {
    let admin = txmq::Admin::connect([ns.to_string()])
        .await
        .expect("admin connects");
    admin
        .create_topic(topic, 2, txmq::PERM_READ_WRITE, None)
        .await
        .expect("topic created");
    admin.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_broker_under_a_live_name_does_not_start_and_routes_keep_the_first() {
    let tmp = tempfile::tempdir().unwrap();
    let ns = Node::nameserver(tmp.path(), "ns", "30s");
    // Both run under the default name, as two brokers started without
    // --broker-name would.
    let first = Node::broker(tmp.path(), "first", &ns.addr, "broker-a", "200ms");
    first.wait_listening();
    wait_listed(
        &ns.addr,
        &[("broker-a", &first.addr)],
        Duration::from_secs(10),
    )
    .await;
    create_topic(&ns.addr, "orders").await;

    let mut second = Node::broker(tmp.path(), "second", &ns.addr, "broker-a", "200ms");
    let status = second.wait_exit(Duration::from_secs(15));
    let second_log = second.log_text();
    assert!(
        status.is_some_and(|s| s.code() == Some(1)),
        "the second broker exits 1 when every nameserver refuses its name, \
         got {status:?}; its log:\n{second_log}"
    );
    // Its log says who holds the name and what to do.
    let holder = format!("another master broker at {} already registered", first.addr);
    assert!(
        !second
            .log_lines_with(&[&holder, "'broker-a'", "--broker-name", "ERROR"])
            .is_empty(),
        "an error naming the holder and --broker-name in:\n{second_log}"
    );
    assert!(
        !second
            .log_lines_with(&[
                "txmq-broker: error: broker name 'broker-a' is taken",
                &holder
            ])
            .is_empty(),
        "the exit reason in:\n{second_log}"
    );
    // The nameserver's warning names both addresses.
    assert!(
        !ns.log_lines_with(&["WARN", "refused", &first.addr, &second.addr])
            .is_empty(),
        "a warning with both addresses in the nameserver log:\n{}",
        ns.log_text()
    );
    // The route never moved: the first broker keeps its name and queues.
    keeps_pointing_at(
        &ns.addr,
        "broker-a",
        &first.addr,
        "orders",
        Duration::from_millis(600),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_broker_keeps_trying_and_takes_the_name_after_the_holder_expires() {
    let tmp = tempfile::tempdir().unwrap();
    // Short enough to wait for, long enough for a busy machine's heartbeats.
    let expiry = Duration::from_secs(2);
    let shared = Node::nameserver(tmp.path(), "shared", "2s");
    let own = Node::nameserver(tmp.path(), "own", "2s");
    let first = Node::broker(tmp.path(), "first", &shared.addr, "broker-a", "200ms");
    first.wait_listening();
    wait_listed(
        &shared.addr,
        &[("broker-a", &first.addr)],
        Duration::from_secs(10),
    )
    .await;
    create_topic(&shared.addr, "orders").await;

    // The second one is taken by its own nameserver, so it starts, and is
    // refused by the shared one, which keeps routing to the first.
    let both = format!("{},{}", shared.addr, own.addr);
    let second = Node::broker(tmp.path(), "second", &both, "broker-a", "200ms");
    second.wait_listening();
    wait_listed(
        &own.addr,
        &[("broker-a", &second.addr)],
        Duration::from_secs(10),
    )
    .await;
    keeps_pointing_at(
        &shared.addr,
        "broker-a",
        &first.addr,
        "orders",
        Duration::from_secs(1),
    )
    .await;
    let holder = format!("another master broker at {} already registered", first.addr);
    assert!(
        !second
            .log_lines_with(&["ERROR", &shared.addr, &holder, "--broker-name"])
            .is_empty(),
        "an error naming the shared nameserver, the holder and --broker-name in:\n{}",
        second.log_text()
    );
    assert!(
        !shared
            .log_lines_with(&["WARN", "refused", &first.addr, &second.addr])
            .is_empty(),
        "a warning with both addresses in the nameserver log:\n{}",
        shared.log_text()
    );

    // The first one falls silent (its connection stays open): once it
    // expires, the second one's retries get it the name.
    first.signal("STOP");
    let took = wait_listed(
        &shared.addr,
        &[("broker-a", &second.addr)],
        expiry + Duration::from_secs(5),
    )
    .await;
    eprintln!("the second broker took the name {took:?} after the first stopped");
    assert!(
        took >= expiry / 2,
        "taken {took:?} after the stop, long before the {expiry:?} expiry"
    );
    assert!(
        !second
            .log_lines_with(&[
                "registered with nameserver: the broker that held the name is gone",
                &shared.addr
            ])
            .is_empty(),
        "{}",
        second.log_text()
    );

    // The first one wakes up: now it is the one refused, and the name stays
    // with the second.
    first.signal("CONT");
    let refused = format!(
        "another master broker at {} already registered",
        second.addr
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while first.log_lines_with(&["ERROR", &refused]).is_empty() {
        assert!(
            Instant::now() < deadline,
            "no refusal in the first broker's log:\n{}",
            first.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        listed(&shared.addr).await,
        vec![("broker-a".to_string(), second.addr.clone())]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unregister_from_another_broker_does_not_drop_the_live_one() {
    let tmp = tempfile::tempdir().unwrap();
    let ns = Node::nameserver(tmp.path(), "ns", "30s");
    let spare = Node::nameserver(tmp.path(), "spare", "30s");
    let first = Node::broker(tmp.path(), "first", &ns.addr, "broker-a", "200ms");
    first.wait_listening();
    wait_listed(
        &ns.addr,
        &[("broker-a", &first.addr)],
        Duration::from_secs(10),
    )
    .await;
    create_topic(&ns.addr, "orders").await;

    // A goodbye for the name from another broker's address, or from a
    // connection that never registered it (no address: an older broker).
    let other = Connection::connect(
        &ns.addr,
        Hello {
            version: PROTOCOL_VERSION,
            role: Role::Broker,
            client_id: "broker-a@127.0.0.1:1".into(),
            group: None,
        },
        None,
        ConnectionConfig::default(),
    )
    .await
    .expect("connects");
    for addr in ["127.0.0.1:1", ""] {
        let err = other
            .call(UnregisterBroker {
                broker_name: "broker-a".into(),
                addr: addr.into(),
            })
            .await
            .expect_err("a goodbye from another broker is refused");
        assert_eq!(
            err.remote().map(|w| w.code),
            Some(ErrorCode::BrokerNameTaken),
            "{err}"
        );
        assert!(err.to_string().contains(&first.addr), "{err}");
    }
    other.close();
    keeps_pointing_at(
        &ns.addr,
        "broker-a",
        &first.addr,
        "orders",
        Duration::from_millis(600),
    )
    .await;

    // A broker refused the name (and taken by another nameserver) shuts down
    // gracefully: its goodbye does not drop the first one either.
    let both = format!("{},{}", ns.addr, spare.addr);
    let mut second = Node::broker(tmp.path(), "second", &both, "broker-a", "200ms");
    second.wait_listening();
    wait_listed(
        &spare.addr,
        &[("broker-a", &second.addr)],
        Duration::from_secs(10),
    )
    .await;
    second.signal("TERM");
    let status = second.wait_exit(Duration::from_secs(15));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    assert!(
        listed(&spare.addr).await.is_empty(),
        "said goodbye to its own"
    );
    keeps_pointing_at(
        &ns.addr,
        "broker-a",
        &first.addr,
        "orders",
        Duration::from_millis(600),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_nameserver_connection_is_registered_again_at_once() {
    // Long expiry and heartbeat: only the closed connection drops the broker,
    // and only the reaction to it can bring it back within the test.
    let cluster = Cluster::nameserver_only(Duration::from_secs(120)).await;
    let ns = cluster.nameserver.clone();
    let proxy = Proxy::bind().await.unwrap();
    proxy.set_target(&ns);
    let tmp = tempfile::tempdir().unwrap();
    let broker = Node::broker(
        tmp.path(),
        "broker",
        &proxy.addr().to_string(),
        "broker-a",
        "60s",
    );
    broker.wait_listening();
    wait_listed(&ns, &[("broker-a", &broker.addr)], Duration::from_secs(10)).await;
    create_topic(&ns, "orders").await;
    assert_eq!(route_addrs(&ns, "orders").await, vec![broker.addr.clone()]);

    // The connection is cut: the nameserver drops the broker's routes at
    // once, and the broker registers again without waiting 60 s.
    proxy.cut();
    let cut = Instant::now();
    let back = loop {
        if route_addrs(&ns, "orders").await == vec![broker.addr.clone()]
            && proxy.stats().accepted >= 2
        {
            break cut.elapsed();
        }
        assert!(
            cut.elapsed() < Duration::from_secs(3),
            "no route 3 s after the cut (heartbeat interval 60 s); broker log:\n{}",
            broker.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    eprintln!("route back {back:?} after the cut");

    // The nameserver is unreachable for a while (the proxy closes every new
    // connection): the broker retries with a backoff, not in a busy loop,
    // and comes back soon after the nameserver does.
    let dead = format!("127.0.0.1:{}", free_port());
    proxy.set_target(&dead);
    let accepted = proxy.stats().accepted;
    proxy.cut();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let attempts = proxy.stats().accepted - accepted;
    assert!(
        (1..=15).contains(&attempts),
        "{attempts} connection attempts in 2 s while the nameserver was down"
    );
    proxy.set_target(&ns);
    let healed = Instant::now();
    loop {
        if route_addrs(&ns, "orders").await == vec![broker.addr.clone()] {
            break;
        }
        assert!(
            healed.elapsed() < Duration::from_secs(3),
            "no route 3 s after the nameserver came back; broker log:\n{}",
            broker.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(broker);
    cluster.shutdown().await;
}
