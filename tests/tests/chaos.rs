//! The chaos test: two brokers (sync flush) and two nameservers as real
//! processes, producers, transactional producers and orderly push
//! consumers as `chaos-client` processes, ~200 operations per second under
//! a fault schedule (broker kill -9 and SIGSTOP, transactional producer
//! killed between prepare and end, consumer killed, connections cut,
//! delayed and replies dropped by a proxy); then every checker must pass.
//! See `txmq_tests::chaos`.
//!
//! `cargo test -p txmq-tests --test chaos` runs 60 s of workload;
//! `TXMQ_CHAOS_DURATION=10m cargo test -p txmq-tests --test chaos -- --ignored`
//! runs longer (`TXMQ_CHAOS_SEED` repeats a fault schedule). A second,
//! 30 s run pauses brokers while a consumer hands messages back to them.
//!
//! Every run checks exactly what is stored: no message at two positions
//! (the producers are idempotent), and consumption repeats only as
//! consumer-side redelivery. Dedup mode (`ChaosConfig::dedup`) has the
//! consumers apply effects through the SQLite dedup helper, and checks
//! each acknowledged message was applied exactly once.
//!
//! Failover mode: 3 nameservers embed the controller, broker-a is a group
//! of 3 replicas it elects the master of (sync replication, min-insync 2),
//! broker-b a single broker; the schedule adds killing broker-a's master,
//! partitioning it from the controller and its slaves while clients still
//! reach it, and killing the controller's Raft leader. 60 s by default;
//! `TXMQ_CHAOS_DURATION=10m cargo test -p txmq-tests --test chaos --
//! --ignored a_long_run_of_failovers` runs longer.

use std::path::Path;
use std::time::Duration;

use txmq_tests::chaos::{default_out_dir, run, ChaosConfig, Fault};

fn config(duration: Duration) -> ChaosConfig {
    let out = default_out_dir(Some(Path::new(env!("CARGO_TARGET_TMPDIR"))), "chaos");
    seeded(ChaosConfig::new(duration, out))
}

fn failover_config(duration: Duration) -> ChaosConfig {
    let out = default_out_dir(
        Some(Path::new(env!("CARGO_TARGET_TMPDIR"))),
        "chaos-failover",
    );
    seeded(ChaosConfig::failover(duration, out))
}

fn seeded(mut config: ChaosConfig) -> ChaosConfig {
    if let Some(seed) = std::env::var("TXMQ_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        config.seed = seed;
    }
    config
}

fn long_duration() -> Duration {
    std::env::var("TXMQ_CHAOS_DURATION")
        .ok()
        .map(|d| humantime::parse_duration(&d).expect("TXMQ_CHAOS_DURATION like 10m"))
        .unwrap_or(Duration::from_secs(600))
}

/// One chaos run at a time: each takes the machine's cores.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn run_and_check(config: ChaosConfig) -> txmq_tests::chaos::ChaosReport {
    let _alone = ONE_AT_A_TIME.lock().await;
    let report = run(config).await;
    println!("{}", report.summary());
    assert!(report.passed(), "a checker failed:\n{}", report.summary());
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minute_of_faults_loses_duplicates_and_reorders_nothing() {
    run_and_check(config(Duration::from_secs(60))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: TXMQ_CHAOS_DURATION (default 10m)"]
async fn a_long_run_under_faults() {
    run_and_check(config(long_duration())).await;
}

/// A minute of workload while broker-a's master is killed (twice),
/// partitioned from the controller and its slaves, and the controller's
/// leader is killed, among the other faults: nothing acknowledged is lost,
/// nothing rolled back is seen, nothing is handed out that a failover
/// later cut, orders hold, and every transaction is resolved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minute_of_failovers_loses_nothing_acknowledged() {
    let report = run_and_check(failover_config(Duration::from_secs(60))).await;
    // The schedule starts with the failover faults; each must have been
    // injected, and broker-a's master replaced at least once.
    for fault in ["kill-master", "partition-master", "kill-controller-leader"] {
        assert!(
            report.counts.faults.contains_key(fault),
            "{fault} was not injected:\n{}",
            report.summary()
        );
    }
    assert!(
        report.counts.failovers >= 2,
        "broker-a's master was never replaced:\n{}",
        report.summary()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: TXMQ_CHAOS_DURATION (default 10m)"]
async fn a_long_run_of_failovers() {
    run_and_check(failover_config(long_duration())).await;
}

/// Dedup mode: the orderly consumers apply each message's effect through
/// `txmq::SqliteDedup` (keyed by msg id) in one SQLite transaction with
/// the effects row, under the usual faults (consumers and brokers killed,
/// replies dropped, power cut): the effects table ends with exactly one
/// row per acknowledged send and committed transaction, whatever the
/// redeliveries; and no message is stored twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minute_of_faults_applies_each_acknowledged_message_exactly_once() {
    let mut config = config(Duration::from_secs(60));
    config.dedup = true;
    let report = run_and_check(config).await;
    assert!(
        report.verdicts.iter().any(|v| v.name == "applied-once"),
        "the applied-once checker did not run:\n{}",
        report.summary()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: TXMQ_CHAOS_DURATION (default 10m)"]
async fn a_long_run_applies_each_acknowledged_message_exactly_once() {
    let mut config = config(long_duration());
    config.dedup = true;
    run_and_check(config).await;
}

/// The retrying consumer hands messages back to a broker that is paused
/// for longer than its hand-back attempts last (and consumers die): its
/// group must never commit past a message it neither handled nor
/// dead-lettered (the `unhandled` checker), and every other checker holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_broker_while_messages_are_handed_back_skips_nothing() {
    let mut config = config(Duration::from_secs(30));
    config.faults = vec![
        Fault::PauseWhileRetrying,
        Fault::KillConsumer,
        Fault::PauseWhileRetrying,
        Fault::CutConnections,
    ];
    run_and_check(config).await;
}
