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

use std::path::Path;
use std::time::Duration;

use txmq_tests::chaos::{default_out_dir, run, ChaosConfig, Fault};

fn config(duration: Duration) -> ChaosConfig {
    let out = default_out_dir(Some(Path::new(env!("CARGO_TARGET_TMPDIR"))), "chaos");
    let mut config = ChaosConfig::new(duration, out);
    if let Some(seed) = std::env::var("TXMQ_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        config.seed = seed;
    }
    config
}

/// One chaos run at a time: each takes the machine's cores.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn run_and_check(config: ChaosConfig) {
    let _alone = ONE_AT_A_TIME.lock().await;
    let report = run(config).await;
    println!("{}", report.summary());
    assert!(report.passed(), "a checker failed:\n{}", report.summary());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minute_of_faults_loses_duplicates_and_reorders_nothing() {
    run_and_check(config(Duration::from_secs(60))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: TXMQ_CHAOS_DURATION (default 10m)"]
async fn a_long_run_under_faults() {
    let duration = std::env::var("TXMQ_CHAOS_DURATION")
        .ok()
        .map(|d| humantime::parse_duration(&d).expect("TXMQ_CHAOS_DURATION like 10m"))
        .unwrap_or(Duration::from_secs(600));
    run_and_check(config(duration)).await;
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
