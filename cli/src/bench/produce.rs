//! `txmq bench produce TOPIC`: publishes from `--producers` clients with
//! `--in-flight` requests each, closed loop or open loop at `--rate`, one
//! message or a `--batch` per request, and reports the publish rate and
//! the publish latency (from the intended send time under `--rate`).

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::Args;
use futures_util::future::try_join_all;
use tokio::sync::watch;
use txmq::{Message, Producer};

use super::histogram::Latencies;
use super::load::{drive, Op, Plan};
use super::progress::{Counters, Progress};
use super::report::Report;
use super::{ensure_topic, secs_between, show_progress, stop_on_interrupt, LoadArgs, Timing};
use crate::args::GlobalArgs;
use crate::output::{error_text, Printer};

/// `txmq bench produce TOPIC ...`
#[derive(Debug, Args)]
pub struct ProduceArgs {
    /// The topic to publish to.
    pub topic: String,

    #[command(flatten)]
    pub load: LoadArgs,

    /// Messages per request (send_batch); rates and counts are in messages.
    #[arg(long, env = "TXMQ_BATCH", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub batch: u32,

    /// Idempotent sends (true or false), as `txmq send --idempotence`: run
    /// once with each to measure what idempotence costs.
    #[arg(long, env = "TXMQ_IDEMPOTENCE", default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub idempotence: bool,

    /// Then measure the machine's floor (`txmq bench floor`: a minimal echo
    /// over --producers connections with --in-flight requests each, the
    /// same size and duration) and report the rate and p99 as ratios to it
    /// (`floor_ratio`, `p99_to_floor`).
    #[arg(long, env = "TXMQ_COMPARE_FLOOR")]
    pub compare_floor: bool,

    /// The broker's process id, when it runs on this machine: also report
    /// its CPU per message over the measured period
    /// (`broker_cpu_us_per_msg`, from `/proc`), and with --compare-floor
    /// its ratio to the echo server's CPU per round trip. The echo server
    /// then runs on the CPUs the broker may run on (a broker started with
    /// `taskset -c 0` gets an echo server on CPU 0), so that the floor is
    /// measured with the same placement.
    #[arg(long, env = "TXMQ_BROKER_PID", value_name = "PID")]
    pub broker_pid: Option<u32>,

    /// Measure this many times in a row (each with its warm-up, and with
    /// --compare-floor each followed by the floor) and report the median
    /// round: the one with the median `floor_ratio`, or without
    /// --compare-floor the median publish rate (of an even number, the
    /// lower of the middle two). The figures that vary most are also
    /// listed for every round, in order (`rounds_floor_ratio`, ...).
    #[arg(long, env = "TXMQ_ROUNDS", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub rounds: u32,
}

/// The figures listed for every round when there are several.
const ROUND_FIGURES: [&str; 7] = [
    "publish_rate_msg_s",
    "errors",
    "floor_round_trip_rate_s",
    "floor_ratio",
    "p99_to_floor",
    "client_cpu_to_floor",
    "broker_cpu_to_floor",
];

/// What one producer task saw.
#[derive(Debug, Clone, Default)]
pub struct SendStats {
    /// Send latency, from the intended send time.
    pub latency: Latencies,
    /// How late requests went out (open loop only): OMB's publish delay.
    pub delay: Latencies,
    /// Messages acknowledged in the measured period.
    pub messages: u64,
    /// Their body bytes.
    pub bytes: u64,
    /// Messages whose send failed (warm-up included).
    pub errors: u64,
    /// The first failure.
    pub first_error: Option<String>,
    /// When the last measured request completed.
    pub last_done: Option<Instant>,
    /// Requests of the open-loop schedule never sent: the run's deadline
    /// came first (the generator fell behind its rate).
    pub unsent: u64,
}

impl SendStats {
    /// Notes a request of `n` messages of `size` bytes, sent at `sent_at`
    /// and done at `done_at`, that succeeded or failed with `error`.
    #[allow(clippy::too_many_arguments)]
    pub fn complete(
        &mut self,
        counters: &Counters,
        op: &Op,
        open_loop: bool,
        sent_at: Instant,
        done_at: Instant,
        n: u64,
        size: usize,
        error: Option<String>,
    ) {
        if let Some(e) = error {
            self.errors += n;
            counters.add_errors(n);
            if self.first_error.is_none() {
                tracing::warn!(error = %e, "send failed");
                self.first_error = Some(e);
            }
            return;
        }
        counters.add_sent(n);
        if !op.measured {
            return;
        }
        self.messages += n;
        self.bytes += n * size as u64;
        self.latency
            .record_n(done_at.saturating_duration_since(op.intended), n);
        if open_loop {
            self.delay
                .record_n(sent_at.saturating_duration_since(op.intended), n);
        }
        self.last_done = Some(self.last_done.map_or(done_at, |t| t.max(done_at)));
    }

    /// Adds another task's figures.
    pub fn merge(&mut self, other: &SendStats) {
        self.latency.merge(&other.latency);
        self.delay.merge(&other.delay);
        self.messages += other.messages;
        self.bytes += other.bytes;
        self.errors += other.errors;
        self.unsent += other.unsent;
        if self.first_error.is_none() {
            self.first_error.clone_from(&other.first_error);
        }
        self.last_done = match (self.last_done, other.last_done) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
    }

    /// Seconds from the end of the warm-up to the last measured completion.
    pub fn measured_secs(&self, timing: &Timing) -> f64 {
        self.last_done
            .map_or(0.0, |t| secs_between(timing.measure_from, t))
    }

    /// Adds the publish figures to `report`.
    pub fn report(&self, report: &mut Report, timing: &Timing, open_loop: bool) {
        let secs = self.measured_secs(timing);
        report
            .field("duration_s", super::report::round(secs, 3))
            .field("messages", self.messages)
            .field("bytes", self.bytes)
            .rates("publish", self.messages, self.bytes, secs)
            .field("errors", self.errors)
            .field("first_error", self.first_error.clone())
            .latency("latency_us", self.latency.summary());
        if open_loop {
            report
                .field("unsent", self.unsent)
                .latency("publish_delay_us", self.delay.summary());
        }
    }
}

/// Builds `load.producers` producer handles over `load.clients` clients
/// (handle i is a clone of client i mod N, sharing its connections), and
/// opens their connections by fetching the route and sending `connect(i)`
/// once per handle, so the measured requests do not pay for connecting.
///
/// # Errors
/// When a producer cannot be built or its first send fails.
pub async fn connect_producers(
    global: &GlobalArgs,
    topic: &str,
    load: &LoadArgs,
    idempotence: bool,
    connect: impl Fn(u32) -> Message,
) -> Result<Vec<Producer>> {
    let producers = super::shared_clients(load, || async {
        Ok(Producer::builder()
            .config(global.client_config()?)
            .idempotence(idempotence)
            .build()
            .await?)
    })
    .await?;
    try_join_all(producers.iter().enumerate().map(|(i, p)| {
        let message = connect(i as u32);
        async move {
            p.writable_queues(topic).await?;
            p.send(message).await
        }
    }))
    .await
    .with_context(|| format!("connecting {} producer(s) to topic {topic}", load.producers))?;
    Ok(producers)
}

/// Runs the produce benchmark (`--rounds` times) and prints its report.
///
/// # Errors
/// When the cluster cannot be reached, or no message could be sent.
pub async fn run(global: &GlobalArgs, args: ProduceArgs) -> Result<()> {
    args.load.validate()?;
    if let Some(pid) = args.broker_pid {
        super::floor::check_pid(pid, "--broker-pid")?;
    }
    ensure_topic(global, &args.topic, args.load.queues).await?;
    let body = Bytes::from(vec![b'x'; args.load.size]);
    let producers = connect_producers(global, &args.topic, &args.load, args.idempotence, |_| {
        Message::new(args.topic.clone(), body.clone())
    })
    .await?;
    // One for every round: an interrupt ends the round it comes in, and
    // no other starts.
    let (_stop_tx, stop) = stop_on_interrupt();
    let mut rounds = Vec::new();
    let mut failed = None;
    for i in 0..args.rounds {
        let measured = measure_round(global, &args, &producers, &body, stop.clone()).await;
        let (mut report, stats) = match measured {
            Ok(done) => done,
            Err(e) => {
                close_all(&producers).await;
                return Err(e);
            }
        };
        if stats.messages == 0 && stats.errors > 0 {
            // This round, as it is, says what failed.
            if args.rounds > 1 {
                report
                    .field("rounds", u64::from(args.rounds))
                    .field("round", u64::from(i) + 1);
            }
            failed = Some((report, stats.first_error.unwrap_or_default()));
            break;
        }
        rounds.push(report);
        if *stop.borrow() {
            break;
        }
    }
    close_all(&producers).await;
    if let Some((report, error)) = failed {
        report.print(&Printer::stdout(global.output))?;
        bail!("no message was sent: {error}");
    }
    let mut report = median_round(rounds, args.compare_floor);
    if *stop.borrow() && args.rounds > 1 {
        report.field("interrupted", true);
    }
    report.print(&Printer::stdout(global.output))?;
    Ok(())
}

async fn close_all(producers: &[Producer]) {
    for p in producers {
        p.close().await.ok();
    }
}

/// The round with the median `floor_ratio` (`compare_floor`) or publish
/// rate, with every round's [`ROUND_FIGURES`] added when there are several.
fn median_round(mut rounds: Vec<Report>, compare_floor: bool) -> Report {
    let n = rounds.len();
    if n == 1 {
        return rounds.remove(0);
    }
    let key = if compare_floor {
        "floor_ratio"
    } else {
        "publish_rate_msg_s"
    };
    let value = |i: usize| rounds[i].get(key).and_then(serde_json::Value::as_f64);
    // Rounds without the figure (no floor rate) are not in the running,
    // unless none has it.
    let mut order: Vec<usize> = (0..n).filter(|&i| value(i).is_some()).collect();
    if order.is_empty() {
        order = (0..n).collect();
    }
    order.sort_by(|&a, &b| value(a).unwrap_or(0.0).total_cmp(&value(b).unwrap_or(0.0)));
    let median = order[(order.len() - 1) / 2];
    let lists: Vec<(String, serde_json::Value)> = ROUND_FIGURES
        .iter()
        .filter(|k| {
            rounds
                .iter()
                .any(|r| r.get(k).is_some_and(|v| !v.is_null()))
        })
        .map(|k| {
            let all: Vec<serde_json::Value> = rounds
                .iter()
                .map(|r| r.get(k).cloned().unwrap_or_default())
                .collect();
            (format!("rounds_{k}"), serde_json::Value::from(all))
        })
        .collect();
    let mut report = rounds.swap_remove(median);
    report
        .field("rounds", n as u64)
        .field("round", median as u64 + 1);
    for (k, v) in lists {
        report.field(&k, v);
    }
    report
}

/// One measured round over `producers`: its report and what was sent.
async fn measure_round(
    global: &GlobalArgs,
    args: &ProduceArgs,
    producers: &[Producer],
    body: &Bytes,
    stop: watch::Receiver<bool>,
) -> Result<(Report, SendStats)> {
    let counters = Arc::new(Counters::default());
    let store_before = super::store_counters(global).await;
    let started = Instant::now();
    let timing = args.load.timing(Instant::now() + Duration::from_millis(20));
    let progress = Progress::start(
        show_progress(global),
        counters.clone(),
        timing.extent(u64::from(args.batch)),
        timing.warmup_until(),
    );
    let topic: Arc<str> = Arc::from(args.topic.as_str());
    let cpu = super::floor::CpuMeter::start_at(timing.measure_from, args.broker_pid);
    let tasks: Vec<_> = producers
        .iter()
        .enumerate()
        .map(|(i, producer)| {
            let plan = args.load.plan(&timing, i as u32, args.batch);
            tokio::spawn(produce(
                producer.clone(),
                plan,
                topic.clone(),
                body.clone(),
                args.batch as usize,
                counters.clone(),
                stop.clone(),
            ))
        })
        .collect();
    let mut stats = SendStats::default();
    for t in tasks {
        let done: Box<SendStats> = t.await.context("a producer task failed")?;
        stats.merge(&done);
    }
    let cpu = cpu.stop().await?;
    progress.finish();
    let run_secs = started.elapsed().as_secs_f64();
    let store_after = super::store_counters(global).await;

    let mut report = super::new_report(global, "produce");
    report
        .field("topic", args.topic.as_str())
        .field("producers", args.load.producers)
        .field("in_flight", args.load.in_flight)
        .field("batch", args.batch)
        .field("idempotence", args.idempotence)
        .field("message_size", args.load.size as u64)
        .field("target_rate", args.load.target_rate())
        .field(
            "warmup_s",
            super::report::round(secs_between(timing.start, timing.measure_from), 3),
        );
    stats.report(&mut report, &timing, args.load.rate.is_some());
    // Whole run, warm-up included: the broker cannot tell them apart.
    super::report_store_counters(&mut report, store_before, store_after, run_secs);
    let per_msg = |cpu_s: Option<f64>| {
        cpu_s
            .filter(|_| stats.messages > 0)
            .map(|s| super::report::round(s * 1e6 / stats.messages as f64, 3))
    };
    let (client_cpu_us, broker_cpu_us) = (per_msg(cpu.own), per_msg(cpu.other));
    report.field("client_cpu_us_per_msg", client_cpu_us);
    if args.broker_pid.is_some() {
        report.field("broker_cpu_us_per_msg", broker_cpu_us);
    }
    if args.compare_floor {
        let secs = stats.measured_secs(&timing);
        let shape = super::floor::Shape {
            connections: args.load.producers,
            in_flight: args.load.in_flight,
            size: args.load.size,
            reply: super::floor::DEFAULT_REPLY,
            warmup: timing.measure_from.duration_since(timing.start),
            duration: Duration::from_secs_f64(secs.max(0.1)),
        };
        let rate = if secs > 0.0 {
            stats.messages as f64 / secs
        } else {
            0.0
        };
        let latency = stats.latency.summary();
        let measured = super::floor::Measured {
            rate,
            latency: &latency,
            client_cpu_us,
            broker_cpu_us,
            broker_pid: args.broker_pid,
        };
        super::floor::compare(&mut report, shape, measured).await?;
    }
    Ok((report, stats))
}

/// One producer's loop: `batch` messages per request with the shared body.
/// Its figures come back boxed: the task's output is copied out of its
/// poll on every wake-up (once per message here), 8 bytes rather than
/// the 200-odd of the figures themselves.
async fn produce(
    producer: Producer,
    plan: Plan,
    topic: Arc<str>,
    body: Bytes,
    batch: usize,
    counters: Arc<Counters>,
    stop: watch::Receiver<bool>,
) -> Box<SendStats> {
    let mut stats = Box::<SendStats>::default();
    let open_loop = plan.interval.is_some();
    let size = body.len();
    let p = &producer;
    let unsent = drive(
        &plan,
        stop,
        |op| {
            let new = || Message::new(&*topic, body.clone());
            // A single message goes to `send` as users send one, with one
            // vector fewer (an allocation per message) than `send_batch`.
            let (single, messages): (_, Vec<Message>) = match batch {
                1 => (Some(new()), Vec::new()),
                n => (None, (0..n).map(|_| new()).collect()),
            };
            async move {
                // Only open loop reports how late a request went out; in
                // closed loop it goes out as it is issued, at its intended
                // time (one clock read fewer per message).
                let sent_at = if open_loop {
                    Instant::now()
                } else {
                    op.intended
                };
                let result = match single {
                    Some(m) => p.send(m).await.map(drop),
                    None => p.send_batch(messages).await.map(drop),
                };
                (op, sent_at, Instant::now(), result)
            }
        },
        |(op, sent_at, done_at, result)| {
            let error = result.err().map(|e| error_text(&anyhow::Error::from(e)));
            stats.complete(
                &counters,
                &op,
                open_loop,
                sent_at,
                done_at,
                batch as u64,
                size,
                error,
            );
        },
    )
    .await;
    stats.unsent = unsent;
    stats
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, clap::Parser)]
    struct ProduceOnly {
        #[command(flatten)]
        args: ProduceArgs,
    }

    fn rounds_of(figures: &[(f64, f64)]) -> Vec<Report> {
        figures
            .iter()
            .map(|&(rate, ratio)| {
                let mut r = Report::new("produce");
                r.field("publish_rate_msg_s", rate)
                    .field("floor_ratio", ratio)
                    .field("broker_cpu_to_floor", serde_json::Value::Null);
                r
            })
            .collect()
    }

    #[test]
    fn the_median_round_is_reported_with_every_rounds_figures() {
        let figures = [(100.0, 0.6), (90.0, 0.5), (80.0, 0.7), (70.0, 0.65)];
        let r = median_round(rounds_of(&figures[..3]), true).json();
        assert_eq!(r["round"], 1);
        assert_eq!(r["rounds"], 3);
        assert_eq!(r["floor_ratio"], 0.6);
        assert_eq!(r["rounds_floor_ratio"], serde_json::json!([0.6, 0.5, 0.7]));
        assert_eq!(
            r["rounds_publish_rate_msg_s"],
            serde_json::json!([100.0, 90.0, 80.0])
        );
        // A figure no round has is not listed.
        assert!(r.get("rounds_broker_cpu_to_floor").is_none(), "{r}");
        // Without the floor, by the rate; of four, the lower middle one.
        let r = median_round(rounds_of(&figures), false).json();
        assert_eq!(
            (r["round"].as_u64(), r["publish_rate_msg_s"].as_f64()),
            (Some(3), Some(80.0))
        );
        // One round is reported as it is.
        let r = median_round(rounds_of(&figures[..1]), true).json();
        assert!(r.get("rounds").is_none(), "{r}");
        // A round without a floor ratio is not the median; the lists say
        // null there, and read as text like the other figures.
        let mut rounds = rounds_of(&figures[..3]);
        rounds[0].field("floor_ratio", serde_json::Value::Null);
        let report = median_round(rounds, true);
        let r = report.json();
        assert_eq!(
            (r["round"].as_u64(), r["floor_ratio"].as_f64()),
            (Some(2), Some(0.5))
        );
        assert_eq!(r["rounds_floor_ratio"], serde_json::json!([null, 0.5, 0.7]));
        let text = report.text().join("\n");
        assert!(text.contains("[null, 0.500, 0.700]"), "{text}");
    }

    #[test]
    fn idempotence_can_be_turned_off_to_measure_it() {
        use clap::Parser;
        let on = ProduceOnly::try_parse_from(["produce", "t"]).map(|p| p.args.idempotence);
        assert!(matches!(on, Ok(true)));
        let off = ProduceOnly::try_parse_from(["produce", "t", "--idempotence", "false"]);
        assert!(matches!(off.map(|p| p.args.idempotence), Ok(false)));
        let bad = ProduceOnly::try_parse_from(["produce", "t", "--idempotence", "no way"]);
        assert!(matches!(bad, Err(e) if e.exit_code() == 2));
    }

    #[test]
    fn send_stats_count_measured_messages_and_every_error() {
        let counters = Counters::default();
        let t0 = Instant::now();
        let mut s = SendStats::default();
        let warm = Op {
            index: 0,
            intended: t0,
            measured: false,
        };
        let op = Op {
            index: 1,
            intended: t0 + Duration::from_millis(10),
            measured: true,
        };
        s.complete(
            &counters,
            &warm,
            true,
            t0,
            t0 + Duration::from_millis(1),
            64,
            100,
            None,
        );
        s.complete(
            &counters,
            &op,
            true,
            op.intended + Duration::from_millis(2),
            op.intended + Duration::from_millis(5),
            64,
            100,
            None,
        );
        s.complete(&counters, &op, true, t0, t0, 1, 100, Some("boom".into()));
        assert_eq!(s.messages, 64);
        assert_eq!(s.bytes, 6400);
        assert_eq!(s.errors, 1);
        assert_eq!(s.first_error.as_deref(), Some("boom"));
        assert_eq!(s.latency.count(), 64);
        let lat = s.latency.summary();
        assert!(
            lat.p50.abs_diff(5_000) <= 5,
            "from the intended time: {lat:?}"
        );
        assert!(s.delay.summary().p50.abs_diff(2_000) <= 2);
        assert_eq!(
            counters.sent.load(std::sync::atomic::Ordering::Relaxed),
            128
        );

        let mut total = SendStats::default();
        total.merge(&s);
        total.merge(&s);
        assert_eq!(total.messages, 128);
        assert_eq!(total.latency.count(), 128);
        assert_eq!(
            total.last_done,
            Some(op.intended + Duration::from_millis(5))
        );
    }
}
