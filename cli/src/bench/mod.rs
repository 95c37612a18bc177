//! `txmq bench produce|consume|e2e|tx|floor`: load generators against a running
//! cluster, one subcommand per scenario (as Apache Iggy's bench has).
//!
//! Each scenario is a file: [`produce`] (publish rate and latency),
//! [`consume`] (drain a backlog or follow a topic), [`e2e`] (produce and
//! consume together, end-to-end latency, lost and duplicated messages),
//! [`tx`] (transactional sends with a mix of local results and check-back
//! answers) and [`floor`] (a minimal echo: what a request and its reply cost
//! on this machine, to hold the others against). They share the load loop ([`load`]: K requests in flight per
//! producer, closed or open loop with coordinated-omission correction), the
//! latency histograms ([`histogram`]), the message header receivers
//! recognise ([`body`]), sequence accounting ([`sequences`]), the progress
//! bar ([`progress`]) and the final summary ([`report`]).
//!
//! The generator is built not to be the bottleneck: one client (and so one
//! connection per broker) per `--producers`, up to `--in-flight` requests
//! in flight on each, a body allocated once and shared (produce), and a
//! histogram per task, merged at the end.

mod body;
mod consume;
mod e2e;
mod floor;
mod histogram;
mod load;
mod pacer;
mod produce;
mod progress;
mod report;
mod sequences;
mod tx;

use std::time::Duration;

use tokio::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use tokio::sync::watch;
use txmq::{Admin, PERM_READ_WRITE};

use crate::args::{parse_duration, GlobalArgs};
use crate::output::OutputFormat;
use crate::signal::interrupted;

use self::load::{share, Plan, Stop};
use self::progress::Extent;

/// How long a run lasts when neither `--duration` nor `--count` is given.
const DEFAULT_DURATION: Duration = Duration::from_secs(10);
/// Warm-up of a `--duration` run unless `--warmup` says otherwise.
const DEFAULT_WARMUP: Duration = Duration::from_secs(1);
/// Queues of a topic the benchmark creates.
const DEFAULT_QUEUES: u32 = 4;

/// `txmq bench ...`
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Publish as fast as possible (or at --rate): publish rate and latency.
    Produce(produce::ProduceArgs),
    /// Consume a topic as a group: drain its backlog, or follow it for --duration.
    Consume(consume::ConsumeArgs),
    /// Produce at --rate and consume at once: end-to-end latency, lost and
    /// duplicated messages.
    E2e(e2e::E2eArgs),
    /// Transactional sends with a mix of local results and check-back
    /// answers: prepare, commit, check-back and prepare-to-visible times.
    Tx(tx::TxArgs),
    /// The machine's floor: a minimal TCP echo in a separate process, the
    /// round trips per second and CPU per round trip that any broker's
    /// request and reply cost here (compare with `produce --compare-floor`).
    Floor(floor::FloorArgs),
    /// The floor's echo server (started by `bench floor`).
    #[command(hide = true)]
    EchoServer(floor::EchoServerArgs),
}

/// Runs a benchmark.
///
/// # Errors
/// When the cluster cannot be reached, the arguments cannot work, or
/// nothing at all could be sent.
pub async fn run(global: &GlobalArgs, cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Produce(args) => produce::run(global, args).await,
        BenchCommand::Consume(args) => consume::run(global, args).await,
        BenchCommand::E2e(args) => e2e::run(global, args).await,
        BenchCommand::Tx(args) => tx::run(global, args).await,
        BenchCommand::Floor(args) => floor::run(global, args).await,
        BenchCommand::EchoServer(args) => floor::echo_server(args).await,
    }
}

/// The load flags of every sending scenario.
#[derive(Debug, Clone, Args)]
pub struct LoadArgs {
    /// Producers: load loops, each with --in-flight requests of its own.
    #[arg(long, env = "TXMQ_PRODUCERS", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=i64::from(body::MAX_PRODUCERS)))]
    pub producers: u32,

    /// Client objects the producers share, each with one connection per
    /// broker (producer i uses client i mod N). Default: one per producer.
    #[arg(long, env = "TXMQ_CLIENTS", value_parser = clap::value_parser!(u32).range(1..=i64::from(body::MAX_PRODUCERS)))]
    pub clients: Option<u32>,

    /// Requests in flight at once per producer.
    #[arg(long, env = "TXMQ_IN_FLIGHT", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub in_flight: u32,

    /// Message body size in bytes.
    #[arg(long, env = "TXMQ_SIZE", default_value_t = 1024)]
    pub size: usize,

    /// How long to measure, after the warm-up (default 10s when --count is
    /// not given either).
    #[arg(long, env = "TXMQ_DURATION", value_parser = parse_duration, value_name = "DURATION", conflicts_with = "count")]
    pub duration: Option<Duration>,

    /// How many messages to measure, over all producers (after the
    /// warm-up; rounded up to whole batches).
    #[arg(long, env = "TXMQ_COUNT")]
    pub count: Option<u64>,

    /// Target rate in messages per second over all producers: open loop,
    /// latency measured from each message's intended send time. Without
    /// it, closed loop: each producer keeps --in-flight requests going.
    #[arg(long, env = "TXMQ_RATE", value_name = "MSGS_PER_S")]
    pub rate: Option<f64>,

    /// Under --rate, wait for each request's send time on a timerfd (to
    /// the microsecond) instead of tokio's millisecond timer, which sends
    /// up to a millisecond late (counted in the latency). Costs a wake-up
    /// per request, CPU that a small machine takes from the broker. Use it
    /// at low rates: at 62,000 msg/s on two cores it about tripled the e2e
    /// p99.
    #[arg(long, env = "TXMQ_PRECISE_PACING")]
    pub precise_pacing: bool,

    /// Load before measuring, left out of the figures (default 1s with
    /// --duration, none with --count).
    #[arg(long, env = "TXMQ_WARMUP", value_parser = parse_duration, value_name = "DURATION")]
    pub warmup: Option<Duration>,

    /// Create (or update) the topic with this many queues per broker first
    /// (default: create it with 4 queues when it does not exist).
    #[arg(long, env = "TXMQ_QUEUES", value_parser = clap::value_parser!(u32).range(1..))]
    pub queues: Option<u32>,
}

/// `load.producers` handles over `load.clients` clients made by `build`:
/// handle i is client i mod N (a clone shares its connections).
///
/// # Errors
/// The first client that cannot be built.
pub async fn shared_clients<T, F, Fut>(load: &LoadArgs, mut build: F) -> Result<Vec<T>>
where
    T: Clone,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let n = load.producers as usize;
    // At most one client per producer (`LoadArgs::validate` refuses more).
    let clients = (load.clients.unwrap_or(load.producers) as usize).min(n);
    let mut handles: Vec<T> = Vec::with_capacity(n);
    for i in 0..n {
        let handle = if i < clients {
            build().await?
        } else {
            handles[i % clients].clone()
        };
        handles.push(handle);
    }
    Ok(handles)
}

/// When a run starts, measures and stops, over all producers.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// When the first request is due.
    pub start: Instant,
    /// End of the warm-up.
    pub measure_from: Instant,
    /// End of the measured period (duration runs).
    pub measure_until: Option<Instant>,
    /// Messages to measure (count runs).
    pub count: Option<u64>,
}

impl Timing {
    /// What the progress bar measures against.
    pub fn extent(&self, batch: u64) -> Extent {
        match (self.measure_until, self.count) {
            (Some(until), _) => Extent::Time(until.duration_since(self.start)),
            (None, Some(n)) => Extent::Sent(n.div_ceil(batch.max(1)) * batch.max(1)),
            (None, None) => Extent::Open,
        }
    }

    /// The warm-up's end, if there is a warm-up.
    pub fn warmup_until(&self) -> Option<Instant> {
        (self.measure_from > self.start).then_some(self.measure_from)
    }
}

impl LoadArgs {
    /// Checks what clap cannot.
    ///
    /// # Errors
    /// A usage error (exit 2) naming the flag.
    pub fn validate(&self) -> Result<()> {
        if let Some(rate) = self.rate {
            if !(rate.is_finite() && rate > 0.0) {
                return Err(crate::exit::usage(
                    "--rate must be a number of messages per second above 0",
                ));
            }
        }
        if self.count == Some(0) {
            return Err(crate::exit::usage("--count must be above 0"));
        }
        if self.duration.is_some_and(|d| d.is_zero()) {
            return Err(crate::exit::usage("--duration must be above 0"));
        }
        if let Some(clients) = self.clients.filter(|c| *c > self.producers) {
            return Err(crate::exit::usage(format!(
                "--clients {clients} is more than --producers {}: each client is driven by at least one producer",
                self.producers
            )));
        }
        Ok(())
    }

    /// The run's timing, starting at `start`.
    pub fn timing(&self, start: Instant) -> Timing {
        let warmup = match (self.warmup, self.count) {
            (Some(w), _) => w,
            (None, Some(_)) => Duration::ZERO,
            (None, None) => DEFAULT_WARMUP,
        };
        let measure_from = start + warmup;
        Timing {
            start,
            measure_from,
            measure_until: match self.count {
                Some(_) => None,
                None => Some(measure_from + self.duration.unwrap_or(DEFAULT_DURATION)),
            },
            count: self.count,
        }
    }

    /// The plan of producer `index`, each request carrying `batch`
    /// messages.
    pub fn plan(&self, timing: &Timing, index: u32, batch: u32) -> Plan {
        let producers = u64::from(self.producers.max(1));
        let batch = u64::from(batch.max(1));
        // Seconds between two requests of one producer; producers are
        // staggered by a fraction of it so that the total is even.
        let interval = self.rate.map(|rate| producers as f64 * batch as f64 / rate);
        let offset = interval.map_or(Duration::ZERO, |i| {
            Duration::from_secs_f64(i * f64::from(index) / producers as f64)
        });
        let stop = match (timing.measure_until, timing.count) {
            (Some(until), _) => Stop::Deadline(until),
            (None, Some(n)) => Stop::Count(share(n.div_ceil(batch), producers, u64::from(index))),
            (None, None) => Stop::Count(0),
        };
        Plan {
            start: timing.start + offset,
            measure_from: timing.measure_from,
            stop,
            interval,
            in_flight: self.in_flight as usize,
            precise: self.precise_pacing,
        }
    }

    /// The target rate as shown in the report.
    pub fn target_rate(&self) -> serde_json::Value {
        self.rate
            .map_or(serde_json::Value::Null, serde_json::Value::from)
    }
}

/// Whether the progress bar may be drawn.
pub fn show_progress(global: &GlobalArgs) -> bool {
    global.output == OutputFormat::Text
}

/// A stop signal that turns true on Ctrl-C or SIGTERM (or when the
/// returned sender says so).
pub fn stop_on_interrupt() -> (watch::Sender<bool>, watch::Receiver<bool>) {
    let (tx, rx) = watch::channel(false);
    let on_signal = tx.clone();
    tokio::spawn(async move {
        interrupted().await;
        let _ = on_signal.send(true);
    });
    (tx, rx)
}

/// A report of `scenario` that says whether the run used TLS and signed
/// in, so that runs with and without security can be told apart.
pub fn new_report(global: &GlobalArgs, scenario: &str) -> report::Report {
    let security = &global.security;
    let mut report = report::Report::new(scenario);
    report
        .field("tls", security.tls_ca.is_some())
        .field("auth", security.access_key.is_some());
    report
}

/// Makes sure `topic` exists: creates it with `queues` queues when given,
/// else with [`DEFAULT_QUEUES`] when it has no route.
///
/// # Errors
/// When no nameserver or broker answers, or the topic cannot be created.
pub async fn ensure_topic(global: &GlobalArgs, topic: &str, queues: Option<u32>) -> Result<()> {
    let admin = Admin::with_config(global.client_config()?).await?;
    let result = async {
        let queues = match queues {
            Some(q) => q,
            None => match admin.route(topic).await {
                Ok(route) if !route.brokers.is_empty() => return Ok(()),
                _ => DEFAULT_QUEUES,
            },
        };
        admin
            .create_topic(topic, queues, PERM_READ_WRITE, None)
            .await
            .with_context(|| format!("creating topic {topic}"))?;
        Ok(())
    }
    .await;
    admin.close().await.ok();
    result
}

/// The brokers' store counters summed: (records, writes, fdatasyncs), or
/// `None` when a broker cannot be asked (the report then leaves them out).
pub async fn store_counters(global: &GlobalArgs) -> Option<(u64, u64, u64)> {
    let admin = Admin::with_config(global.client_config().ok()?)
        .await
        .ok()?;
    let stats = admin.store_stats(None).await.ok();
    admin.close().await.ok();
    stats.map(|all| {
        all.iter().fold((0, 0, 0), |(r, w, f), s| {
            (r + s.records, w + s.writes, f + s.fdatasyncs)
        })
    })
}

/// Adds the broker-side write and fdatasync rates between two
/// `store_counters` readings `secs` apart.
pub fn report_store_counters(
    report: &mut report::Report,
    before: Option<(u64, u64, u64)>,
    after: Option<(u64, u64, u64)>,
    secs: f64,
) {
    let (Some(b), Some(a)) = (before, after) else {
        return;
    };
    if secs <= 0.0 {
        return;
    }
    let (records, writes, syncs) = (
        a.0.saturating_sub(b.0),
        a.1.saturating_sub(b.1),
        a.2.saturating_sub(b.2),
    );
    report
        .field("broker_records", records)
        .field(
            "broker_writes_per_s",
            report::round(writes as f64 / secs, 1),
        )
        .field(
            "broker_records_per_write",
            report::round(records as f64 / writes.max(1) as f64, 2),
        )
        .field("fdatasync_per_s", report::round(syncs as f64 / secs, 1))
        .field(
            "messages_per_fdatasync",
            if syncs == 0 {
                0.0
            } else {
                report::round(records as f64 / syncs as f64, 2)
            },
        );
}

/// Seconds between two instants, 0 when `to` is not later.
pub fn secs_between(from: Instant, to: Instant) -> f64 {
    to.checked_duration_since(from)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: BenchCommand,
    }

    fn parse(args: &[&str]) -> Option<BenchCommand> {
        let mut all = vec!["bench"];
        all.extend_from_slice(args);
        Cli::try_parse_from(all).ok().map(|c| c.cmd)
    }

    fn load(args: &[&str]) -> LoadArgs {
        let mut all = vec!["produce", "t"];
        all.extend_from_slice(args);
        match parse(&all) {
            Some(BenchCommand::Produce(p)) => p.load,
            other => panic!("produce parses: {other:?}"),
        }
    }

    #[test]
    fn every_scenario_parses_with_its_flags() {
        let Some(BenchCommand::Produce(p)) = parse(&[
            "produce",
            "t",
            "--producers",
            "4",
            "--in-flight",
            "8",
            "--size",
            "128",
            "--batch",
            "64",
            "--duration",
            "3s",
            "--rate",
            "1000",
            "--warmup",
            "500ms",
        ]) else {
            panic!("produce parses")
        };
        assert_eq!(
            (p.load.producers, p.load.in_flight, p.load.size),
            (4, 8, 128)
        );
        assert_eq!(p.batch, 64);
        assert_eq!(p.load.duration, Some(Duration::from_secs(3)));
        assert_eq!(p.load.rate, Some(1000.0));
        assert_eq!(p.load.warmup, Some(Duration::from_millis(500)));

        assert!(matches!(
            parse(&[
                "consume",
                "t",
                "--group",
                "g",
                "--consumers",
                "2",
                "--duration",
                "5s"
            ]),
            Some(BenchCommand::Consume(_))
        ));
        assert!(parse(&["consume", "t"]).is_none(), "--group is required");
        assert!(matches!(
            parse(&["e2e", "t", "--rate", "500", "--consumers", "1"]),
            Some(BenchCommand::E2e(_))
        ));
        let Some(BenchCommand::Tx(t)) = parse(&[
            "tx",
            "t",
            "--producers",
            "16",
            "--rollback-ratio",
            "0.1",
            "--unknown-ratio",
            "0.2",
            "--check-rollback-ratio",
            "0.3",
            "--check-unknown-ratio",
            "0.4",
        ]) else {
            panic!("tx parses")
        };
        assert_eq!(t.load.producers, 16);
        assert_eq!(
            (
                t.rollback_ratio,
                t.unknown_ratio,
                t.check_rollback_ratio,
                t.check_unknown_ratio
            ),
            (0.1, 0.2, 0.3, 0.4)
        );
        assert!(parse(&["produce", "t", "--duration", "1s", "--count", "5"]).is_none());
        assert!(parse(&["produce", "t", "--producers", "0"]).is_none());
        assert!(parse(&["produce", "t", "--in-flight", "0"]).is_none());
    }

    #[test]
    fn duration_runs_warm_up_a_second_and_count_runs_not_at_all() {
        let t0 = Instant::now();
        let d = load(&["--duration", "3s"]).timing(t0);
        assert_eq!(d.measure_from, t0 + Duration::from_secs(1));
        assert_eq!(d.measure_until, Some(t0 + Duration::from_secs(4)));
        assert_eq!(d.warmup_until(), Some(t0 + Duration::from_secs(1)));

        let c = load(&["--count", "100"]).timing(t0);
        assert_eq!(c.measure_from, t0);
        assert_eq!((c.measure_until, c.count), (None, Some(100)));
        assert_eq!(c.warmup_until(), None);

        let default = load(&[]).timing(t0);
        assert_eq!(default.measure_until, Some(t0 + Duration::from_secs(11)));
        let no_warmup = load(&["--warmup", "0s"]).timing(t0);
        assert_eq!(no_warmup.measure_from, t0);
    }

    #[test]
    fn plans_spread_the_rate_and_the_count_over_producers() {
        let t0 = Instant::now();
        let args = load(&["--producers", "4", "--rate", "1000", "--count", "1002"]);
        let timing = args.timing(t0);
        let plans: Vec<Plan> = (0..4).map(|i| args.plan(&timing, i, 1)).collect();
        // 250 msg/s each: one every 4 ms, staggered by 1 ms.
        for (i, p) in plans.iter().enumerate() {
            let interval = p.interval.unwrap_or_default();
            assert!((interval - 0.004).abs() < 1e-12);
            assert_eq!(p.start, t0 + Duration::from_millis(i as u64));
        }
        let counts: Vec<Stop> = plans.iter().map(|p| p.stop).collect();
        assert_eq!(
            counts,
            [
                Stop::Count(251),
                Stop::Count(251),
                Stop::Count(250),
                Stop::Count(250)
            ]
        );
        // Batches of 10 count messages: 1002 messages are 101 requests,
        // and the rate is 100 requests/s.
        let p = args.plan(&timing, 0, 10);
        assert!((p.interval.unwrap_or_default() - 0.04).abs() < 1e-12);
        assert_eq!(p.stop, Stop::Count(26));
        assert!(matches!(timing.extent(10), Extent::Sent(1010)));
        let closed = load(&["--duration", "2s"]);
        let p = closed.plan(&closed.timing(t0), 3, 1);
        assert_eq!(p.interval, None);
        assert_eq!(p.start, t0);
        assert_eq!(p.stop, Stop::Deadline(t0 + Duration::from_secs(3)));
    }

    #[test]
    fn impossible_loads_are_refused() {
        assert!(load(&["--rate", "0"]).validate().is_err());
        assert!(load(&["--rate=-5"]).validate().is_err());
        assert!(load(&["--count", "0"]).validate().is_err());
        assert!(load(&["--duration", "0s"]).validate().is_err());
        assert!(load(&["--rate", "10.5", "--count", "3"]).validate().is_ok());
        assert!(load(&["--producers", "4", "--clients", "9"])
            .validate()
            .is_err());
        assert!(load(&["--producers", "4", "--clients", "4"])
            .validate()
            .is_ok());
    }
}
