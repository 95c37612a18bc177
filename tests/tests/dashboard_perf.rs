//! The dashboard's performance check (issue 18), a measurement and not a
//! timed assertion, so it is `#[ignore]`d; run it with
//!
//! ```text
//! cargo test -p txmq-tests --test dashboard_perf -- --ignored --nocapture
//! ```
//!
//! It sets up 1,000 topics and 10,000 pending transactions on one broker
//! (a producer prepares them, leaves them unknown and goes away; the broker
//! checks back only after an hour, so they stay pending), then prints
//! - the render time of /topics and /transactions (and a few more pages):
//!   median, min and max of 10 requests each (the target: under 200 ms);
//! - the broker's CPU time (utime + stime of /proc/PID/stat) over 30 s
//!   idle without a dashboard, then over 30 s with one running idle, then
//!   30 s without again (the spread of two quiet spans; the target: no
//!   measurable difference), and the dashboard's own CPU time.
//!
//! `TXMQ_PERF_TOPICS`, `TXMQ_PERF_TRANSACTIONS` and `TXMQ_PERF_IDLE_SECS`
//! change the sizes (for a quicker look).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use txmq::{
    Admin, BoxError, CheckRequest, Message, TransactionListener, TransactionProducer,
    TransactionState, TxContext, PERM_READ_WRITE,
};
use txmq_tests::browser::Dashboard;
use txmq_tests::{free_port, BrokerProcess, NameserverProcess};

/// Leaves every transaction unknown.
struct LeaveUnknown;

impl TransactionListener for LeaveUnknown {
    async fn execute(&self, _: &Message, _: &TxContext) -> Result<TransactionState, BoxError> {
        Ok(TransactionState::Unknown)
    }

    async fn check(&self, _: &CheckRequest) -> Result<TransactionState, BoxError> {
        Ok(TransactionState::Unknown)
    }
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// utime + stime of process `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/stat: {e}"));
    // The command name (field 2) is in parentheses and may hold spaces:
    // count the fields after its closing one. utime and stime are fields
    // 14 and 15, so the 12th and 13th after it.
    let rest = &stat[stat.rfind(')').expect("stat has a command name") + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields[11].parse().expect("utime");
    let stime: u64 = fields[12].parse().expect("stime");
    utime + stime
}

/// Clock ticks per second (`getconf CLK_TCK`, 100 on Linux).
fn ticks_per_second() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100)
}

/// CPU time in ms that each of `pids` used over `span`.
async fn cpu_over(pids: &[u32], span: Duration) -> Vec<f64> {
    let tck = ticks_per_second() as f64;
    let before: Vec<u64> = pids.iter().map(|&p| cpu_ticks(p)).collect();
    tokio::time::sleep(span).await;
    pids.iter()
        .zip(before)
        .map(|(&p, b)| (cpu_ticks(p) - b) as f64 * 1000.0 / tck)
        .collect()
}

/// One `GET path` on a fresh connection, read to the end: the status line
/// and the time from connecting to the last byte.
fn get(base: &str, path: &str) -> (String, usize, Duration) {
    let addr = base.trim_start_matches("http://");
    let started = Instant::now();
    let mut stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("read timeout");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("send request");
    let mut answer = Vec::new();
    stream
        .read_to_end(&mut answer)
        .unwrap_or_else(|e| panic!("read {path}: {e}"));
    let took = started.elapsed();
    let text = String::from_utf8_lossy(&answer);
    let status = text.lines().next().unwrap_or_default().to_string();
    (status, answer.len(), took)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Median, min and max of 10 renders of `path` (after one warm-up).
fn measure(base: &str, path: &str) -> (f64, f64, f64, usize) {
    let (status, _, _) = get(base, path);
    assert!(status.contains(" 200"), "GET {path}: {status}");
    let mut times = Vec::new();
    let mut size = 0;
    for _ in 0..10 {
        let (status, bytes, took) = get(base, path);
        assert!(status.contains(" 200"), "GET {path}: {status}");
        size = bytes;
        times.push(ms(took));
    }
    times.sort_by(f64::total_cmp);
    (
        (times[4] + times[5]) / 2.0,
        times[0],
        times[times.len() - 1],
        size,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement of a few minutes; run by hand with --ignored --nocapture"]
async fn dashboard_render_times_and_idle_broker_load() {
    let topics = env_usize("TXMQ_PERF_TOPICS", 1000);
    let transactions = env_usize("TXMQ_PERF_TRANSACTIONS", 10_000);
    let idle = Duration::from_secs(env_usize("TXMQ_PERF_IDLE_SECS", 30) as u64);

    let dir = tempfile::tempdir().expect("tempdir");
    let ns = format!("127.0.0.1:{}", free_port());
    let _nameserver = NameserverProcess::start(&ns, &[], &dir.path().join("nameserver.log"));
    let broker = BrokerProcess::start(
        &dir.path().join("broker"),
        &ns,
        "broker-a",
        &[
            "--transaction-timeout",
            "1h",
            "--transaction-check-interval",
            "1h",
        ],
    );
    txmq_tests::wait_for_broker(&ns, "broker-a").await;
    let admin = Admin::connect([ns.clone()]).await.expect("admin");

    let started = Instant::now();
    let names: Vec<String> = (0..topics).map(|i| format!("perf-topic-{i:04}")).collect();
    for chunk in names.chunks(16) {
        let creates = chunk
            .iter()
            .map(|t| admin.create_topic(t, 4, PERM_READ_WRITE, None));
        for r in futures_util::future::join_all(creates).await {
            r.expect("create topic");
        }
    }
    eprintln!(
        "{topics} topics created in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let started = Instant::now();
    admin
        .create_topic("perf-tx", 8, PERM_READ_WRITE, None)
        .await
        .expect("create perf-tx");
    let producer = TransactionProducer::builder()
        .nameserver(&ns)
        .group("perf-producers")
        .listener(LeaveUnknown)
        .first_check_delay(Some(Duration::from_secs(3600)))
        .start()
        .await
        .expect("transaction producer");
    let mut left = transactions;
    let mut n = 0usize;
    while left > 0 {
        let batch = left.min(64);
        let sends = (0..batch).map(|i| {
            producer.send_in_transaction(
                Message::new("perf-tx", format!("pending {}", n + i))
                    .with_key(format!("k{}", n + i)),
            )
        });
        for r in futures_util::future::join_all(sends).await {
            let outcome = r.expect("prepare");
            assert_eq!(outcome.state, TransactionState::Unknown);
        }
        n += batch;
        left -= batch;
    }
    producer.close().await.unwrap();
    // The broker lists its oldest 1,000; its counter has them all.
    let pending: u64 = admin
        .list_transactions(None)
        .await
        .expect("list transactions")
        .iter()
        .map(|l| l.counters.pending)
        .sum();
    eprintln!(
        "{transactions} transactions prepared in {:.1} s; {pending} pending",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(
        pending, transactions as u64,
        "every transaction stays pending"
    );

    // The broker idle, no dashboard.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let without = cpu_over(&[broker.pid()], idle).await[0];

    // The broker idle, a dashboard running with nobody looking at it.
    let dashboard = Dashboard::start(&ns, &[], &dir.path().join("dashboard.log"));
    tokio::time::sleep(Duration::from_secs(5)).await;
    let with = cpu_over(&[broker.pid(), dashboard.pid()], idle).await;

    let mut rows = Vec::new();
    for path in [
        "/",
        "/topics",
        "/topics?page=10",
        "/topics?q=perf-topic-09",
        "/transactions",
        "/transactions?sort=age&page=20",
        "/transactions?state=parked",
        "/groups",
    ] {
        rows.push((path, measure(&dashboard.url, path)));
    }

    // The broker idle again without it: how much two quiet spans differ
    // by themselves.
    let dashboard_cpu_total = cpu_ticks(dashboard.pid());
    drop(dashboard);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let without_again = cpu_over(&[broker.pid()], idle).await[0];

    println!();
    println!("dashboard performance: {topics} topics, {transactions} pending transactions");
    println!("page render (10 requests each, fresh connection, to the last byte):");
    for (path, (median, min, max, size)) in &rows {
        println!(
            "  {path:<36} median {median:7.1} ms   min {min:7.1} ms   max {max:7.1} ms   {size} bytes"
        );
    }
    let secs = idle.as_secs_f64();
    println!("broker CPU over {secs:.0} s idle:");
    println!(
        "  without a dashboard  {without:7.0} ms ({:.2}% of a core)",
        without / secs / 10.0
    );
    println!(
        "  with a dashboard     {:7.0} ms ({:.2}% of a core)",
        with[0],
        with[0] / secs / 10.0
    );
    println!(
        "  without it again     {without_again:7.0} ms ({:.2}% of a core)",
        without_again / secs / 10.0
    );
    println!(
        "  the dashboard itself {:7.0} ms ({:.2}% of a core)",
        with[1],
        with[1] / secs / 10.0
    );
    for (path, (median, ..)) in &rows {
        if *median >= 200.0 {
            println!("  over the 200 ms target: {path} ({median:.1} ms)");
        }
    }
    println!(
        "  the dashboard's CPU time in all, with the page renders: {:.0} ms",
        dashboard_cpu_total as f64 * 1000.0 / ticks_per_second() as f64
    );
    drop(broker);
}
