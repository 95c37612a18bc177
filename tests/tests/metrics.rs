//! `--metrics-listen`: a real nameserver and broker export Prometheus
//! metrics while the `txmq` CLI produces load (sends, a transaction left
//! pending, one left unanswered until it parks, a consumer group behind);
//! `/metrics` is scraped directly, then by Debian's `prometheus` server,
//! whose HTTP API must show the transaction and lag series. The alert
//! rules in `examples/prometheus` pass `promtool check rules`.
//!
//! The Prometheus parts skip, saying so, only where the `prometheus` or
//! `promtool` binary cannot be found (`.ci/run` installs them).

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use txmq_tests::metrics::{http_get, sample};
use txmq_tests::output::ok;
use txmq_tests::{binary, free_port, txmq_cli, wait_for_broker, BrokerProcess, NameserverProcess};

/// Scrapes `addr` until `check` accepts the text (bounded wait).
fn scrape_until(addr: &str, what: &str, check: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = http_get(addr, "/metrics")
            .filter(|(status, _)| *status == 200)
            .map(|(_, body)| body)
            .unwrap_or_default();
        if check(&text) {
            return text;
        }
        assert!(Instant::now() < deadline, "{what}; last scrape:\n{text}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A binary of Debian's prometheus package, if installed.
fn prometheus_tool(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// A `prometheus` server process; killed when dropped.
struct PrometheusServer {
    child: Child,
    addr: String,
}

impl Drop for PrometheusServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl PrometheusServer {
    /// Scrapes `targets` every second, keeping its data in `dir`.
    fn start(bin: &Path, dir: &Path, targets: &[&str]) -> PrometheusServer {
        let config = dir.join("prometheus.yml");
        let list = targets
            .iter()
            .map(|t| format!("'{t}'"))
            .collect::<Vec<_>>()
            .join(", ");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 rule_files: ['{}']\n\
                 scrape_configs:\n  - job_name: txmq\n    static_configs:\n      - targets: [{list}]\n",
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("../examples/prometheus/txmq-alerts.yml")
                    .display()
            ),
        )
        .unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new(bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        PrometheusServer { child, addr }
    }

    fn log(&self, dir: &Path) -> String {
        std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default()
    }

    /// The instant vector of `metric` as (labels, value).
    fn query(&self, metric: &str) -> Vec<(serde_json::Value, f64)> {
        let Some((200, body)) = http_get(&self.addr, &format!("/api/v1/query?query={metric}"))
        else {
            return Vec::new();
        };
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        v["data"]["result"]
            .as_array()
            .map(|rs| {
                rs.iter()
                    .filter_map(|r| {
                        let value = r["value"][1].as_str()?.parse().ok()?;
                        Some((r["metric"].clone(), value))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Waits until `broker-a` registered with the nameserver at `ns`: a send
/// before finds no route (CI saw one).
fn registered(ns: &str) {
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(wait_for_broker(ns, "broker-a"));
}

#[test]
fn a_real_broker_and_nameserver_export_transactions_lag_and_traffic() {
    let dir = tempfile::tempdir().unwrap();
    let ns_addr = format!("127.0.0.1:{}", free_port());
    let ns_metrics = format!("127.0.0.1:{}", free_port());
    let ns = NameserverProcess::start(
        &ns_addr,
        &["--metrics-listen", &ns_metrics],
        &dir.path().join("ns.log"),
    );
    let broker_metrics = format!("127.0.0.1:{}", free_port());
    let broker = BrokerProcess::start(
        &dir.path().join("broker"),
        &ns_addr,
        "broker-a",
        &[
            "--metrics-listen",
            &broker_metrics,
            // Transactions left unknown are checked soon, parked after one
            // unanswered check.
            "--transaction-timeout",
            "300ms",
            "--transaction-check-interval",
            "200ms",
            "--transaction-check-timeout",
            "300ms",
            "--transaction-check-max",
            "1",
        ],
    );
    // Anything but /metrics is a 404.
    let deadline = Instant::now() + Duration::from_secs(10);
    let (status, _) = loop {
        if let Some(r) = http_get(&broker_metrics, "/") {
            break r;
        }
        assert!(Instant::now() < deadline, "the metrics port never answered");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status, 404);
    registered(&ns_addr);

    // Load: five sends, a transaction left pending (its producer is gone,
    // so every check-back fails), a consumer group two messages in.
    ok(&txmq_cli(
        &ns_addr,
        &["send", "orders", "--body", "hello", "--count", "5"],
        None,
    ));
    ok(&txmq_cli(
        &ns_addr,
        &[
            "tx",
            "send",
            "orders",
            "--group",
            "pg",
            "--body",
            "pending",
            "--local",
            "unknown",
            // Checked only once the producer is gone.
            "--first-check-delay",
            "2s",
        ],
        None,
    ));
    ok(&txmq_cli(
        &ns_addr,
        &["consume", "orders", "--group", "g1", "--count", "2"],
        None,
    ));
    // A producer that stays connected and never answers: its one check
    // comes back "unknown" and the transaction parks.
    ok(&txmq_cli(
        &ns_addr,
        &[
            "tx",
            "send",
            "audit",
            "--group",
            "pg-silent",
            "--body",
            "unanswered",
            "--local",
            "unknown",
            "--first-check-delay",
            "100ms",
            "--linger",
            "1500ms",
        ],
        None,
    ));

    let text = scrape_until(&broker_metrics, "the transaction series", |t| {
        sample(t, r#"txmq_check_back_failures_total{group="pg"}"#).is_some_and(|v| v >= 1.0)
            && sample(t, r#"txmq_transactions_parked_now{group="pg-silent"}"#) == Some(1.0)
    });
    let v = |s: &str| sample(&text, s).unwrap_or_else(|| panic!("no {s} in:\n{text}"));
    assert_eq!(v(r#"txmq_transactions_pending{group="pg"}"#), 1.0, "{text}");
    assert_eq!(
        v(r#"txmq_transactions_prepared_total{group="pg"}"#),
        1.0,
        "{text}"
    );
    assert_eq!(
        v(r#"txmq_transactions_parked_now{group="pg"}"#),
        0.0,
        "{text}"
    );
    assert!(
        v(r#"txmq_transaction_oldest_pending_age_seconds{group="pg"}"#) >= 1.0,
        "{text}"
    );
    assert_eq!(
        v(r#"txmq_transactions_checked_total{group="pg"}"#),
        0.0,
        "{text}"
    );
    assert_eq!(
        v(r#"txmq_transactions_pending{group="pg-silent"}"#),
        0.0,
        "{text}"
    );
    assert_eq!(
        v(r#"txmq_transactions_parked_total{group="pg-silent"}"#),
        1.0,
        "{text}"
    );
    assert_eq!(
        v(r#"txmq_transactions_checked_total{group="pg-silent"}"#),
        1.0,
        "{text}"
    );
    // The client answers "unknown" for a listener that does not answer
    // within the broker's check timeout.
    assert_eq!(
        v(r#"txmq_check_back_answers_total{group="pg-silent",answer="unknown"}"#),
        1.0,
        "{text}"
    );
    assert_eq!(
        v(r#"txmq_check_back_answers_total{group="pg-silent",answer="commit"}"#),
        0.0,
        "{text}"
    );
    assert_eq!(
        v(r#"txmq_consumer_lag{group="g1",topic="orders"}"#),
        3.0,
        "{text}"
    );
    assert_eq!(
        v(r#"txmq_messages_in_total{topic="orders"}"#),
        5.0,
        "{text}"
    );
    assert_eq!(v(r#"txmq_bytes_in_total{topic="orders"}"#), 25.0, "{text}");
    assert!(
        v(r#"txmq_messages_out_total{topic="orders"}"#) >= 2.0,
        "{text}"
    );
    assert!(v("txmq_send_latency_seconds_count") >= 1.0, "{text}");
    assert!(v("txmq_pull_latency_seconds_count") >= 1.0, "{text}");
    assert!(v("txmq_store_size_bytes") > 0.0, "{text}");
    assert_eq!(v("txmq_store_segments"), 1.0, "{text}");

    let ns_text = scrape_until(&ns_metrics, "the nameserver's series", |t| {
        sample(t, "txmq_nameserver_brokers") == Some(1.0)
    });
    let n = |s: &str| sample(&ns_text, s).unwrap_or_else(|| panic!("no {s} in:\n{ns_text}"));
    assert!(n(r#"txmq_nameserver_requests_total{kind="RegisterBroker"}"#) >= 1.0);
    assert!(n(r#"txmq_nameserver_requests_total{kind="GetRoute"}"#) >= 1.0);
    assert!(n("txmq_connections") >= 1.0, "the broker's connection");

    // Debian's Prometheus server scrapes both and answers queries.
    let Some(prometheus) = prometheus_tool("prometheus") else {
        eprintln!(
            "SKIPPED: the Prometheus server part: no `prometheus` binary on PATH \
             (apt-get install prometheus; .ci/run does)"
        );
        return;
    };
    let prom_dir = tempfile::tempdir().unwrap();
    let server = PrometheusServer::start(
        &prometheus,
        prom_dir.path(),
        &[&broker_metrics, &ns_metrics],
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let (pending, lag, brokers) = loop {
        let pending = server.query("txmq_transactions_pending");
        let lag = server.query("txmq_consumer_lag");
        let brokers = server.query("txmq_nameserver_brokers");
        if !pending.is_empty() && !lag.is_empty() && !brokers.is_empty() {
            break (pending, lag, brokers);
        }
        assert!(
            Instant::now() < deadline,
            "prometheus never had the series; its log:\n{}",
            server.log(prom_dir.path())
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    let pg = pending
        .iter()
        .find(|(m, _)| m["group"] == "pg")
        .unwrap_or_else(|| panic!("{pending:?}"));
    assert_eq!(pg.1, 1.0);
    assert_eq!(pg.0["instance"], broker_metrics.as_str());
    let g1 = lag
        .iter()
        .find(|(m, _)| m["group"] == "g1" && m["topic"] == "orders")
        .unwrap_or_else(|| panic!("{lag:?}"));
    assert_eq!(g1.1, 3.0);
    assert_eq!(brokers[0].1, 1.0);
    assert_eq!(brokers[0].0["instance"], ns_metrics.as_str());
    drop(server);
    drop(broker);
    drop(ns);
}

/// A metrics address that cannot be bound fails the start: a clear
/// message naming the flag, exit code 1.
#[test]
fn a_metrics_address_in_use_fails_the_start() {
    let held = TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = held.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let wait = |mut child: Child| {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                return (status.code(), err);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("still running with --metrics-listen {taken}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let broker = Command::new(binary("txmq-broker"))
        .args(["--standalone", "--listen", "127.0.0.1:0"])
        .args(["--nameserver-listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir.path())
        .args(["--metrics-listen", &taken])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (code, err) = wait(broker);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!("cannot listen on {taken} (--metrics-listen)")),
        "{err}"
    );
    let ns = Command::new(binary("txmq-nameserver"))
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", &taken])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (code, err) = wait(ns);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!("cannot listen on {taken} (--metrics-listen)")),
        "{err}"
    );
    let bad = Command::new(binary("txmq-broker"))
        .args(["--standalone", "--metrics-listen", "not-an-address"])
        .arg("--data-dir")
        .arg(dir.path())
        .args([
            "--listen",
            "127.0.0.1:0",
            "--nameserver-listen",
            "127.0.0.1:0",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Not an address at all: a usage error (exit 2), before anything starts.
    let (code, err) = wait(bad);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("--metrics-listen") && err.contains("is not host:port"),
        "{err}"
    );
}

/// The alerting rules shipped in `examples/prometheus` are valid.
#[test]
fn the_example_alert_rules_pass_promtool() {
    let Some(promtool) = prometheus_tool("promtool") else {
        eprintln!(
            "SKIPPED: no `promtool` binary on PATH (apt-get install prometheus; .ci/run does)"
        );
        return;
    };
    let rules =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/prometheus/txmq-alerts.yml");
    let out = Command::new(promtool)
        .args(["check", "rules"])
        .arg(&rules)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains("SUCCESS: 8 rules found"), "{text}");
}

/// A master exports each slave's replication lag and in-sync state.
#[test]
fn a_master_exports_its_replicas_lag_and_in_sync_state() {
    let dir = tempfile::tempdir().unwrap();
    let ns_addr = format!("127.0.0.1:{}", free_port());
    let _ns = NameserverProcess::start(&ns_addr, &[], &dir.path().join("ns.log"));
    let metrics = format!("127.0.0.1:{}", free_port());
    let _master = BrokerProcess::start(
        &dir.path().join("master"),
        &ns_addr,
        "broker-a",
        &["--metrics-listen", &metrics, "--replica-lag-max", "500ms"],
    );
    let slave = BrokerProcess::start(
        &dir.path().join("slave"),
        &ns_addr,
        "broker-a",
        &["--role", "slave"],
    );
    registered(&ns_addr);
    ok(&txmq_cli(
        &ns_addr,
        &["send", "orders", "--body", "replicated", "--count", "3"],
        None,
    ));
    let in_sync = format!("txmq_replica_in_sync{{replica=\"{}\"}}", slave.addr);
    let lag = format!("txmq_replica_lag_bytes{{replica=\"{}\"}}", slave.addr);
    let text = scrape_until(&metrics, "the slave in sync, nothing left to copy", |t| {
        sample(t, &in_sync) == Some(1.0) && sample(t, &lag) == Some(0.0)
    });
    assert_eq!(
        sample(&text, r#"txmq_messages_in_total{topic="orders"}"#),
        Some(3.0),
        "{text}"
    );
    assert!(
        sample(&text, "txmq_connections").is_some_and(|c| c >= 1.0),
        "the slave's connection: {text}"
    );
}

/// A message that fails with no redeliveries left goes to the group's
/// dead-letter topic, and the broker counts it for that group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_lettered_message_is_counted_for_its_group() {
    use txmq::{handler_fn, ConsumeResult, Message, PushConsumer, ReceivedMessage};
    let (cluster, metrics) = txmq_tests::Cluster::start_with_metrics().await;
    let ns = cluster.nameserver.clone();
    let producer = cluster.producer().await;
    producer
        .send(Message::new("bills", "poison"))
        .await
        .unwrap();
    let consumer = PushConsumer::builder()
        .nameserver(&ns)
        .group("billing")
        .subscribe("bills", "*")
        .max_reconsume_times(0)
        .rebalance_interval(Duration::from_millis(300))
        .max_wait(Duration::from_millis(500))
        .start(handler_fn(|_: &ReceivedMessage| async {
            ConsumeResult::retry()
        }))
        .await
        .unwrap();
    let scrape = metrics.clone();
    let text = tokio::task::spawn_blocking(move || {
        scrape_until(&scrape, "the dead letter counted", |t| {
            sample(t, r#"txmq_dead_letters_total{group="billing"}"#) == Some(1.0)
        })
    })
    .await
    .unwrap();
    assert!(
        sample(&text, r#"txmq_messages_out_total{topic="bills"}"#).is_some_and(|n| n >= 1.0),
        "{text}"
    );
    consumer.shutdown().await.unwrap();
    // Into the dead-letter topic, as a send; an operator reading it
    // (`dlq list`) consumes nothing: not counted out.
    assert_eq!(
        sample(&text, r#"txmq_messages_in_total{topic="%DLQ%billing"}"#),
        Some(1.0),
        "{text}"
    );
    let out_before = sample(&text, r#"txmq_messages_out_total{topic="%DLQ%billing"}"#);
    let ns2 = ns.clone();
    let listed = tokio::task::spawn_blocking(move || {
        txmq_tests::txmq_cli(&ns2, &["dlq", "list", "billing"], None)
    })
    .await
    .unwrap();
    assert!(String::from_utf8_lossy(&listed.stdout).contains("poison"));
    let after = txmq_tests::metrics::http_get(&metrics, "/metrics")
        .expect("scrape")
        .1;
    assert_eq!(
        sample(&after, r#"txmq_messages_out_total{topic="%DLQ%billing"}"#),
        out_before,
        "{after}"
    );
    // Re-sent to its topic, the letter is counted in as a send's are.
    let ns2 = ns.clone();
    tokio::task::spawn_blocking(move || {
        let out = txmq_tests::txmq_cli(&ns2, &["dlq", "resend", "billing", "--all"], None);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        scrape_until(&metrics, "the re-sent letter counted in", |t| {
            sample(t, r#"txmq_messages_in_total{topic="bills"}"#) == Some(2.0)
        })
    })
    .await
    .unwrap();
    producer.close().await.unwrap();
    cluster.shutdown().await;
}

/// A deleted topic's traffic series go with it (no series for a topic the
/// broker no longer has); made again under its name, it counts from zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_topics_series_go_with_it() {
    use txmq::Message;
    let (cluster, metrics) = txmq_tests::Cluster::start_with_metrics().await;
    let ns = cluster.nameserver.clone();
    let producer = cluster.producer().await;
    for body in ["a", "b"] {
        producer.send(Message::new("gone", body)).await.unwrap();
    }
    let m = metrics.clone();
    tokio::task::spawn_blocking(move || {
        scrape_until(&m, "the two sends counted", |t| {
            sample(t, r#"txmq_messages_in_total{topic="gone"}"#) == Some(2.0)
        })
    })
    .await
    .unwrap();
    let n = ns.clone();
    let out =
        tokio::task::spawn_blocking(move || ok(&txmq_cli(&n, &["topic", "delete", "gone"], None)))
            .await
            .unwrap();
    assert!(out.contains("deleted topic gone"), "{out}");
    let m = metrics.clone();
    let text = tokio::task::spawn_blocking(move || http_get(&m, "/metrics"))
        .await
        .unwrap()
        .expect("a scrape")
        .1;
    for family in ["txmq_messages_in_total", "txmq_bytes_in_total"] {
        assert_eq!(
            sample(&text, &format!(r#"{family}{{topic="gone"}}"#)),
            None,
            "{family} of a deleted topic:\n{text}"
        );
    }
    // Made again on first use: from zero, not from the old count.
    producer.send(Message::new("gone", "c")).await.unwrap();
    tokio::task::spawn_blocking(move || {
        scrape_until(&metrics, "the new topic's send counted once", |t| {
            sample(t, r#"txmq_messages_in_total{topic="gone"}"#) == Some(1.0)
        })
    })
    .await
    .unwrap();
    producer.close().await.unwrap();
    cluster.shutdown().await;
}

/// Under async flush the flusher starts writing the log's new pages to
/// disk between its fdatasyncs (so that an fdatasync does not write half a
/// second of a busy log at once): with an hour between fdatasyncs, the
/// bytes sent are counted as written back within seconds while no
/// fdatasync ran. Under sync flush every fdatasync writes them and none are
/// counted.
#[test]
fn the_log_is_written_back_between_fdatasyncs_under_async_flush() {
    let dir = tempfile::tempdir().unwrap();
    let ns_addr = format!("127.0.0.1:{}", free_port());
    let _ns = NameserverProcess::start(&ns_addr, &[], &dir.path().join("ns.log"));
    let body = "x".repeat(3000);
    for (name, flush) in [("broker-a", "async"), ("broker-b", "sync")] {
        let metrics = format!("127.0.0.1:{}", free_port());
        let broker = BrokerProcess::start(
            &dir.path().join(name),
            &ns_addr,
            name,
            &[
                "--metrics-listen",
                &metrics,
                "--flush",
                flush,
                "--flush-interval",
                "1h",
                "--checkpoint-interval",
                "1h",
            ],
        );
        tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(wait_for_broker(&ns_addr, name));
        let topic = format!("wb-{flush}");
        ok(&txmq_cli(
            &ns_addr,
            &["topic", "create", &topic, "--queues", "1", "--broker", name],
            None,
        ));
        ok(&txmq_cli(
            &ns_addr,
            &[
                "send",
                &topic,
                "--body",
                &body,
                "--count",
                "300",
                "--idempotence",
                "false",
            ],
            None,
        ));
        let counted = |t: &str| sample(t, "txmq_store_writeback_bytes_total");
        if flush == "async" {
            let text = scrape_until(&metrics, "the sent bytes written back", |t| {
                counted(t).is_some_and(|n| n >= 300.0 * 3000.0)
            });
            assert_eq!(sample(&text, "txmq_fdatasync_total"), Some(0.0), "{text}");
            // And the pages did go to disk: the segment holds no dirty
            // page but the one the writer fills (the kernel would keep them
            // dirty for 30 s by itself).
            let segment = std::fs::read_dir(dir.path().join(name).join("commitlog"))
                .unwrap()
                .next()
                .unwrap()
                .unwrap()
                .path();
            let started = Instant::now();
            loop {
                let Some(dirty) = dirty_pages(&segment) else {
                    eprintln!("skipped the dirty-page check: no cachestat(2) here");
                    break;
                };
                if dirty <= 1 {
                    break;
                }
                assert!(
                    started.elapsed() < Duration::from_secs(10),
                    "{dirty} dirty pages left in {}",
                    segment.display()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        } else {
            let text = scrape_until(&metrics, "the sync broker's fdatasyncs", |t| {
                sample(t, "txmq_fdatasync_total").is_some_and(|n| n >= 1.0)
            });
            assert_eq!(counted(&text), Some(0.0), "{text}");
        }
        drop(broker);
    }
}

/// Dirty pages of `file` in the page cache, by `cachestat(2)` (Linux 6.5);
/// `None` where the kernel has no such call.
#[allow(unsafe_code)]
fn dirty_pages(file: &Path) -> Option<u64> {
    use std::os::fd::AsRawFd;
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct Stat {
        nr_cache: u64,
        nr_dirty: u64,
        nr_writeback: u64,
        nr_evicted: u64,
        nr_recently_evicted: u64,
    }
    // The same number on every architecture (system calls since 424 share
    // one table).
    const SYS_CACHESTAT: libc::c_long = 451;
    let f = std::fs::File::open(file).ok()?;
    let range = Range { off: 0, len: 0 };
    let mut stat = Stat::default();
    // SAFETY: the call reads `range` and writes `stat`, both live and laid
    // out as the kernel's structs.
    let r = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            f.as_raw_fd(),
            &range as *const Range,
            &mut stat as *mut Stat,
            0u32,
        )
    };
    (r == 0).then_some(stat.nr_dirty)
}

/// `txmq_store_size_bytes` counts records only, the same after a restart
/// (SIGTERM or `kill -9`) as before, also once the log holds segments the
/// writer filled and segments restarts left part full: it counted the
/// segment a restart left up to the end of its last 4 KiB block (77974
/// bytes became 81920, the recovery log saying end=77974), and grew so at
/// every restart. The counters the dashboard shows as "Store size" say the
/// same. (found by a tester)
#[test]
fn the_store_size_is_the_same_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let ns_addr = format!("127.0.0.1:{}", free_port());
    let _ns = NameserverProcess::start(&ns_addr, &[], &dir.path().join("ns.log"));
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut broker = BrokerProcess::start(
        &dir.path().join("broker"),
        &ns_addr,
        "broker-a",
        &[
            "--metrics-listen",
            &metrics,
            "--segment-size",
            "1MiB",
            "--max-message-size",
            "256KiB",
        ],
    );
    registered(&ns_addr);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store_size = |broker: &BrokerProcess| {
        let text = scrape_until(&metrics, "the store size", |t| {
            sample(t, "txmq_store_size_bytes").is_some()
        });
        let bytes = sample(&text, "txmq_store_size_bytes").unwrap_or_default() as u64;
        // The figure the dashboard samples.
        let counters = rt.block_on(async {
            let admin = txmq::Admin::connect([ns_addr.as_str()]).await.unwrap();
            admin.broker_counters().await.unwrap()
        });
        let c = counters[0].result.as_ref().expect("the broker answers");
        assert_eq!(c.store_bytes, bytes, "{}", broker.log_text());
        bytes
    };
    let body = "s".repeat(99_999);
    let send = |count: &str| {
        ok(&txmq_cli(
            &ns_addr,
            &["send", "sizes", "--body", &body, "--count", count],
            None,
        ));
    };
    // 2.5 MB: two segments filled, a third part full.
    send("25");
    let before = store_size(&broker);
    assert!(before > 2_500_000, "{before}");
    assert_eq!(broker.stop_and_start(), Some(0));
    registered(&ns_addr);
    assert_eq!(store_size(&broker), before, "after a SIGTERM restart");
    // More segments filled after the one the restart left part full.
    send("31");
    send("1");
    let before = store_size(&broker);
    assert!(before > 5_600_000, "{before}");
    broker.restart();
    registered(&ns_addr);
    assert_eq!(store_size(&broker), before, "after a kill -9 and restart");
    for _ in 0..2 {
        assert_eq!(broker.stop_and_start(), Some(0));
        registered(&ns_addr);
        assert_eq!(store_size(&broker), before, "after another restart");
    }
}
