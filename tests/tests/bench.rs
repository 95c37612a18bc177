//! `txmq bench`: each scenario run as a user would (the real binary, a
//! real cluster, `--output json`), checking what its report says and what
//! the broker holds afterwards. Speed is never asserted here; only counts,
//! the report's fields, and that nothing was lost or duplicated.

mod common;

use std::time::Duration;

use serde_json::Value;
use txmq_broker::FlushMode;
use txmq_tests::{json_lines, Cluster};

use common::{create_topic, txmq};

/// Runs `txmq bench ARGS --output json` and returns its one report.
async fn bench(ns: &str, args: &[&str]) -> Value {
    let mut all = vec!["bench"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--output", "json"]);
    let out = txmq(ns, &all, None).await;
    assert!(
        out.status.success(),
        "txmq {all:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut lines = json_lines(&out.stdout);
    assert_eq!(lines.len(), 1, "one summary object: {lines:?}");
    lines.remove(0)
}

/// The latency summary `field` holds every figure OpenMessaging Benchmark
/// reports, in order, for `count` samples.
fn assert_latency(report: &Value, field: &str, count: u64) {
    let l = &report[field];
    assert_eq!(l["count"], count, "{field}: {l}");
    let order = ["p50", "p75", "p95", "p99", "p99_9", "p99_99", "max"];
    let values: Vec<u64> = order
        .iter()
        .map(|k| {
            l[k].as_u64()
                .unwrap_or_else(|| panic!("{field}.{k} in {l}"))
        })
        .collect();
    assert!(values.windows(2).all(|w| w[0] <= w[1]), "{field}: {l}");
    assert!(l["avg"].as_f64().is_some_and(|a| a > 0.0), "{field}: {l}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_reports_what_the_broker_stored_also_over_shared_clients() {
    let cluster = Cluster::start(FlushMode::Async).await;
    let ns = cluster.nameserver.clone();
    create_topic(&ns, "p", 4).await;

    // 8 producers over 2 clients (connections), one request in flight each.
    let r = bench(
        &ns,
        &[
            "produce",
            "p",
            "--producers",
            "8",
            "--clients",
            "2",
            "--in-flight",
            "1",
            "--size",
            "256",
            "--count",
            "800",
        ],
    )
    .await;
    assert_eq!(r["scenario"], "produce");
    assert_eq!(r["messages"], 800, "{r}");
    assert_eq!(r["bytes"], 800 * 256);
    assert_eq!(r["errors"], 0);
    assert_eq!(r["broker_records"], 800, "the broker stored each once: {r}");
    assert!(r["publish_rate_msg_s"].as_f64().is_some_and(|x| x > 0.0));
    assert_latency(&r, "latency_us", 800);

    // Batches: rates and counts are in messages.
    let r = bench(
        &ns,
        &[
            "produce",
            "p",
            "--producers",
            "2",
            "--batch",
            "16",
            "--count",
            "320",
        ],
    )
    .await;
    assert_eq!(r["messages"], 320, "{r}");
    assert_eq!(r["broker_records"], 320);

    // Everything sent (the 8 connecting sends, one per producer handle,
    // and the 2 of the batch run come on top) is in the topic.
    let admin = cluster.admin().await;
    let stored = admin.browse("p", 10_000).await.unwrap();
    assert_eq!(stored.len(), 800 + 320 + 8 + 2);

    // More clients than producers to drive them: refused, by name, before
    // anything is sent.
    let args = [
        "bench",
        "produce",
        "p",
        "--producers",
        "4",
        "--clients",
        "9",
        "--count",
        "10",
    ];
    let out = txmq(&ns, &args, None).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--clients 9 is more than --producers 4"),
        "{stderr}"
    );
    assert_eq!(admin.browse("p", 10_000).await.unwrap().len(), stored.len());
    cluster.shutdown().await;
}

/// One worker thread on each side: the real broker binary serves on the
/// threads its config file gives it (and says how many), and the bench's
/// producers (`--worker-threads 1`) share one thread and one connection,
/// losing and repeating nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_worker_thread_on_each_side_serves_a_shared_client_load() {
    let cluster = Cluster::nameserver_only(Duration::from_secs(30)).await;
    let ns = cluster.nameserver.clone();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("broker.toml");
    std::fs::write(&config, "worker_threads = 1\n").unwrap();
    let broker = txmq_tests::BrokerProcess::start(
        &dir.path().join("a"),
        &ns,
        "broker-a",
        &["--config", config.to_str().unwrap()],
    );
    txmq_tests::wait_for_broker(&ns, "broker-a").await;
    let log = broker.log_text();
    assert!(
        log.lines()
            .any(|l| l.ends_with("runtime started worker_threads=1")),
        "{log}"
    );
    create_topic(&ns, "w", 4).await;

    let r = bench(
        &ns,
        &[
            "produce",
            "w",
            "--worker-threads",
            "1",
            "--producers",
            "8",
            "--clients",
            "1",
            "--in-flight",
            "1",
            "--count",
            "800",
        ],
    )
    .await;
    assert_eq!(r["messages"], 800, "{r}");
    assert_eq!(r["errors"], 0, "{r}");
    assert_eq!(r["broker_records"], 800, "the broker stored each once: {r}");
    drop(broker);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_at_a_rate_loses_and_repeats_nothing_with_either_pacing() {
    let cluster = Cluster::start(FlushMode::Async).await;
    let ns = cluster.nameserver.clone();
    create_topic(&ns, "e", 4).await;
    for pacing in [None, Some("--precise-pacing")] {
        let mut args = vec![
            "e2e",
            "e",
            "--producers",
            "2",
            "--rate",
            "1000",
            "--count",
            "500",
            "--size",
            "128",
        ];
        args.extend(pacing);
        let r = bench(&ns, &args).await;
        assert_eq!(r["scenario"], "e2e");
        assert_eq!(r["sent"], 500, "{pacing:?}: {r}");
        assert_eq!(r["received"], 500, "{pacing:?}: {r}");
        assert_eq!(r["lost"], 0);
        assert_eq!(r["duplicated"], 0);
        assert_eq!(r["target_rate"], 1000.0);
        assert_latency(&r, "e2e_latency_us", 500);
        assert_latency(&r, "latency_us", 500);
        // Open loop: how late sends went out is reported (OMB's publish delay).
        assert_latency(&r, "publish_delay_us", 500);
        // 500 messages at 1,000/s take about half a second, not less.
        let secs = r["duration_s"].as_f64().unwrap_or_default();
        assert!(secs >= 0.45, "{pacing:?}: {secs} s for 500 at 1000/s");
    }
    // A rate far above what any machine takes: the run still ends at its
    // --duration (it used to send its whole backlog, late, however long
    // that took), and says how much of the schedule it never sent.
    let r = tokio::time::timeout(
        Duration::from_secs(60),
        bench(
            &ns,
            &[
                "e2e",
                "e",
                "--producers",
                "1",
                "--rate",
                "10000000",
                "--duration",
                "1s",
                "--warmup",
                "0s",
                "--size",
                "128",
            ],
        ),
    )
    .await
    .expect("the run ends at its duration, not when its backlog would");
    let unsent = r["unsent"]
        .as_u64()
        .unwrap_or_else(|| panic!("unsent in {r}"));
    let sent = r["sent"].as_u64().unwrap_or_else(|| panic!("sent in {r}"));
    assert!(sent > 0 && unsent > 0, "{r}");
    assert_eq!(sent + unsent, 10_000_000, "the schedule, sent or not: {r}");
    assert_eq!(r["lost"], 0, "{r}");
    assert_eq!(r["duplicated"], 0, "{r}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tx_with_unknown_local_results_settles_every_transaction_by_check_back() {
    let mut cluster = Cluster::nameserver_only(Duration::from_secs(30)).await;
    cluster
        .add_broker("broker-a", |c| {
            c.transactions.timeout = Duration::from_millis(300);
            c.transactions.check_interval = Duration::from_millis(200);
        })
        .await;
    let ns = cluster.nameserver.clone();
    create_topic(&ns, "x", 4).await;
    let r = bench(
        &ns,
        &[
            "tx",
            "x",
            "--producers",
            "4",
            "--clients",
            "2",
            "--count",
            "200",
            "--rollback-ratio",
            "0.25",
            "--unknown-ratio",
            "0.25",
            "--first-check-delay",
            "300ms",
        ],
    )
    .await;
    assert_eq!(r["scenario"], "tx");
    assert_eq!(r["transactions"], 200, "{r}");
    let n = |k: &str| r[k].as_u64().unwrap_or_else(|| panic!("{k} in {r}"));
    assert_eq!(
        n("local_commit") + n("local_rollback") + n("local_unknown"),
        200
    );
    assert!(n("local_unknown") > 0, "the mix asked for unknowns: {r}");
    // Every unknown was settled by a check-back, each committed one is
    // visible once and no rolled-back one is.
    assert_eq!(n("checked_transactions"), n("local_unknown"), "{r}");
    assert_eq!(n("committed"), n("visible"), "{r}");
    assert_eq!(n("rolled_back"), n("local_rollback"));
    assert_eq!(n("unresolved"), 0);
    assert_eq!(n("lost"), 0);
    assert_eq!(n("duplicated"), 0);
    assert_eq!(n("visible_not_committed"), 0);
    assert_eq!(n("unexpected_checks"), 0);
    assert_latency(&r, "prepare_latency_us", 200);
    cluster.shutdown().await;
}

/// `bench floor` measures the machine's echo floor in a process of its
/// own and leaves none behind; `produce --compare-floor` reports its rate
/// and p99 as ratios to the floor of the same shape.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_floor_is_measured_alone_and_beside_a_produce_run() {
    let cluster = Cluster::start(FlushMode::Async).await;
    let ns = cluster.nameserver.clone();
    let f = bench(
        &ns,
        &[
            "floor",
            "--connections",
            "4",
            "--size",
            "128",
            "--duration",
            "300ms",
            "--warmup",
            "50ms",
        ],
    )
    .await;
    assert_eq!(f["scenario"], "floor");
    assert_eq!(f["connections"], 4);
    let round_trips = f["round_trips"].as_u64().unwrap_or(0);
    assert!(round_trips > 0, "{f}");
    assert_latency(&f, "latency_us", round_trips);
    assert!(
        f["round_trip_rate_s"].as_f64().is_some_and(|x| x > 0.0),
        "{f}"
    );
    for cpu in [
        "server_cpu_us_per_round_trip",
        "client_cpu_us_per_round_trip",
    ] {
        assert!(f[cpu].as_f64().is_some_and(|x| x >= 0.0), "{cpu} in {f}");
    }

    create_topic(&ns, "fl", 4).await;
    let pid = std::process::id().to_string();
    // The cluster's broker runs in this process.
    let r = floor_run(&ns, &["--duration", "300ms", "--broker-pid", &pid]).await;
    assert_eq!(r["floor_connections"], 2, "{r}");
    // The echo server was started on the CPUs the broker may run on.
    assert_eq!(r["floor_placed_like_broker"], true, "{r}");
    let rate = r["publish_rate_msg_s"].as_f64().unwrap_or(0.0);
    let floor = r["floor_round_trip_rate_s"].as_f64().unwrap_or(0.0);
    assert!(rate > 0.0 && floor > 0.0, "{r}");
    let ratio = r["floor_ratio"].as_f64().unwrap_or(0.0);
    assert!((ratio - rate / floor).abs() < 0.01, "{r}");
    assert!(r["p99_to_floor"].as_f64().is_some_and(|x| x > 0.0), "{r}");
    // CPU per message on both sides, and as ratios to the echo's per round
    // trip (none where the echo's side used less than a tick).
    for (ours, floor, ratio) in [
        (
            "client_cpu_us_per_msg",
            "floor_client_cpu_us_per_round_trip",
            "client_cpu_to_floor",
        ),
        (
            "broker_cpu_us_per_msg",
            "floor_server_cpu_us_per_round_trip",
            "broker_cpu_to_floor",
        ),
    ] {
        let ours = r[ours].as_f64().unwrap_or(-1.0);
        assert!(ours >= 0.0, "{r}");
        match r[floor].as_f64() {
            Some(f) if f > 0.0 => {
                let got = r[ratio].as_f64().unwrap_or(-1.0);
                assert!(
                    (got - ours / f).abs() <= 0.01 * got.max(1.0),
                    "{ratio} in {r}"
                );
            }
            _ => assert!(r[ratio].is_null(), "{r}"),
        }
    }

    // Three rounds, each with its floor: the median round's figures, and
    // every round's ratio listed in order.
    let r = floor_run(&ns, &["--duration", "200ms", "--rounds", "3"]).await;
    assert_eq!(r["rounds"], 3, "{r}");
    let ratios: Vec<f64> = r["rounds_floor_ratio"]
        .as_array()
        .unwrap_or_else(|| panic!("{r}"))
        .iter()
        .map(|v| v.as_f64().unwrap_or_else(|| panic!("{r}")))
        .collect();
    let rates = r["rounds_publish_rate_msg_s"].as_array().unwrap();
    assert_eq!((ratios.len(), rates.len()), (3, 3), "{r}");
    let chosen = r["round"].as_u64().unwrap() as usize;
    assert_eq!(r["floor_ratio"].as_f64(), Some(ratios[chosen - 1]), "{r}");
    assert_eq!(r["publish_rate_msg_s"], rates[chosen - 1], "{r}");
    let mut sorted = ratios.clone();
    sorted.sort_by(f64::total_cmp);
    assert_eq!(ratios[chosen - 1], sorted[1], "the median: {r}");

    // A broker process that is not there: a clear error before any load.
    let out = txmq(
        &ns,
        &["bench", "produce", "fl", "--broker-pid", "999999999"],
        None,
    )
    .await;
    assert_eq!(out.status.code(), Some(2), "a usage error");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--broker-pid 999999999: no such process"),
        "{err}"
    );

    // Each run's echo server went with it.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while echo_servers() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "an echo server was left running"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A floor against a server that is not there: a clear error.
    let out = txmq(
        &ns,
        &[
            "bench",
            "floor",
            "--server",
            "127.0.0.1:1",
            "--duration",
            "100ms",
        ],
        None,
    )
    .await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot connect to the echo server"), "{err}");
    cluster.shutdown().await;
}

/// `bench produce fl` with two producers, one request in flight each,
/// and the floor after it; `more` adds to the arguments.
async fn floor_run(ns: &str, more: &[&str]) -> Value {
    let mut args = vec![
        "produce",
        "fl",
        "--producers",
        "2",
        "--in-flight",
        "1",
        "--warmup",
        "50ms",
        "--compare-floor",
    ];
    args.extend_from_slice(more);
    bench(ns, &args).await
}

/// Processes running `txmq bench echo-server` (only the floor test starts
/// them).
fn echo_servers() -> usize {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| {
            std::fs::read(e.path().join("cmdline"))
                .is_ok_and(|c| c.windows(12).any(|w| w == b"\0echo-server"))
        })
        .count()
}
