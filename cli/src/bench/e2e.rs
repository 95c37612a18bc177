//! `txmq bench e2e TOPIC`: produces at `--rate` (open loop) and consumes at
//! once. Each body carries its producer, sequence number and intended send
//! time ([`super::body`]); consumers measure end-to-end latency from that
//! time (so a generator that fell behind does not hide the delay: the
//! coordinated-omission correction), and count what never arrived (lost)
//! and what arrived twice (duplicated).
//!
//! The consumers start first, at the end of the topic, in a fresh group.
//! After the last send they keep reading until every acknowledged message
//! arrived or `--grace` passed; whatever is still missing then is lost.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::Args;
use tokio::sync::watch;
use txmq::{ConsumeFrom, Message, Producer, PullConsumer};

use super::body::{elapsed_ns, new_run_id, producer_id, Clock, Header, CONNECT_SEQ};
use super::histogram::Latencies;
use super::load::{drive, Plan};
use super::produce::{connect_producers, SendStats};
use super::progress::{Counters, Progress};
use super::report::round;
use super::sequences::{Bits, Received};
use super::{ensure_topic, secs_between, show_progress, stop_on_interrupt, LoadArgs};
use crate::args::{parse_duration, GlobalArgs};
use crate::output::{error_text, Printer};

/// The rate when `--rate` is not given.
const DEFAULT_RATE: f64 = 1000.0;
/// The longest single wait for messages, so the stop signal is seen soon.
const POLL_SLICE: Duration = Duration::from_millis(100);
/// Most messages one poll hands out.
const POLL_MAX: usize = 1024;

/// `txmq bench e2e TOPIC ...`
#[derive(Debug, Args)]
pub struct E2eArgs {
    /// The topic to produce to and consume from.
    pub topic: String,

    #[command(flatten)]
    pub load: LoadArgs,

    /// Consumers, each its own client, all in one group.
    #[arg(long, env = "TXMQ_CONSUMERS", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub consumers: u32,

    /// The consumer group (default: a new one for this run).
    #[arg(long, env = "TXMQ_GROUP", value_parser = crate::args::parse_consumer_group)]
    pub group: Option<String>,

    /// After the last send, how long to wait for messages still missing.
    #[arg(long, env = "TXMQ_GRACE", value_parser = parse_duration, default_value = "10s", value_name = "DURATION")]
    pub grace: Duration,
}

/// What every consumer shares: which messages arrived.
#[derive(Debug, Default)]
struct Arrivals {
    received: Received,
    /// Messages of this run received in the measured period (first arrivals).
    measured: u64,
    measured_bytes: u64,
    /// Messages of other runs or without a header.
    foreign: u64,
}

/// Runs the end-to-end benchmark and prints its report.
///
/// # Errors
/// When the cluster cannot be reached, or no message could be sent.
pub async fn run(global: &GlobalArgs, mut args: E2eArgs) -> Result<()> {
    args.load.rate.get_or_insert(DEFAULT_RATE);
    args.load.validate()?;
    ensure_topic(global, &args.topic, args.load.queues).await?;
    let run_id = new_run_id();
    let clock = Clock::new();
    let group = args
        .group
        .clone()
        .unwrap_or_else(|| format!("txmq-bench-e2e-{run_id:012x}"));

    // Consumers first, from the end of the topic, so nothing sent is missed.
    let mut consumers = Vec::with_capacity(args.consumers as usize);
    for _ in 0..args.consumers {
        consumers.push(
            PullConsumer::builder()
                .config(global.client_config()?)
                .group(group.clone())
                .topic(args.topic.clone())
                .from(ConsumeFrom::Last)
                .build()
                .await?,
        );
    }
    let size = args.load.size;
    let padding = Bytes::from(vec![b'x'; size]);
    let producers = connect_producers(global, &args.topic, &args.load, true, |i| {
        let header = Header {
            producer: producer_id(run_id, i),
            seq: CONNECT_SEQ,
            timestamp_ns: clock.now_ns(),
        };
        Message::new(args.topic.clone(), header.encode(size, &padding))
    })
    .await?;

    let counters = Arc::new(Counters::default());
    let (_interrupt_tx, interrupt) = stop_on_interrupt();
    let (consumers_stop_tx, consumers_stop) = watch::channel(false);
    let timing = args.load.timing(Instant::now() + Duration::from_millis(20));
    let measure_from_ns = clock.ns(timing.measure_from);
    let progress = Progress::start(
        show_progress(global),
        counters.clone(),
        timing.extent(1),
        timing.warmup_until(),
    );
    let arrivals = Arc::new(Mutex::new(Arrivals::default()));
    let consumer_tasks: Vec<_> = consumers
        .into_iter()
        .map(|c| {
            tokio::spawn(consume(
                c,
                run_id,
                clock,
                measure_from_ns,
                arrivals.clone(),
                counters.clone(),
                consumers_stop.clone(),
            ))
        })
        .collect();
    let topic: Arc<str> = Arc::from(args.topic.as_str());
    let producer_tasks: Vec<_> = producers
        .iter()
        .enumerate()
        .map(|(i, producer)| {
            let plan = args.load.plan(&timing, i as u32, 1);
            tokio::spawn(produce(
                producer.clone(),
                producer_id(run_id, i as u32),
                plan,
                topic.clone(),
                padding.clone(),
                clock,
                counters.clone(),
                interrupt.clone(),
            ))
        })
        .collect();
    let mut stats = SendStats::default();
    let mut acked = HashMap::new();
    for t in producer_tasks {
        let (id, s, bits) = *t.await.context("a producer task failed")?;
        stats.merge(&s);
        acked.insert(id, bits);
    }
    for p in &producers {
        p.close().await.ok();
    }

    // Wait for the stragglers.
    let expected: u64 = acked.values().map(Bits::len).sum();
    let grace_until = Instant::now() + args.grace;
    let mut interrupt_watch = interrupt.clone();
    loop {
        let unique = lock(&arrivals).received.unique();
        if unique >= expected || Instant::now() >= grace_until || *interrupt_watch.borrow() {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            Ok(()) = interrupt_watch.changed() => {}
        }
    }
    let _ = consumers_stop_tx.send(true);
    let mut e2e = Latencies::new();
    for t in consumer_tasks {
        e2e.merge(&t.await.context("a consumer task failed")?);
    }
    progress.finish();

    let arrivals = lock(&arrivals);
    let secs = stats.measured_secs(&timing);
    let mut report = super::new_report(global, "e2e");
    report
        .field("topic", args.topic.as_str())
        .field("group", group.as_str())
        .field("producers", args.load.producers)
        .field("consumers", args.consumers)
        .field("in_flight", args.load.in_flight)
        .field("message_size", size.max(super::body::HEADER_LEN) as u64)
        .field("target_rate", args.load.target_rate())
        .field(
            "warmup_s",
            round(secs_between(timing.start, timing.measure_from), 3),
        );
    stats.report(&mut report, &timing, true);
    report
        .rates("consume", arrivals.measured, arrivals.measured_bytes, secs)
        .field("sent", expected)
        .field("received", arrivals.received.unique())
        .field("lost", arrivals.received.lost(&acked))
        .field("duplicated", arrivals.received.duplicates())
        .field("foreign", arrivals.foreign)
        .field("grace_s", round(args.grace.as_secs_f64(), 3))
        .latency("e2e_latency_us", e2e.summary());
    report.print(&Printer::stdout(global.output))?;
    if stats.messages == 0 && stats.errors > 0 {
        bail!(
            "no message was sent: {}",
            stats.first_error.clone().unwrap_or_default()
        );
    }
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Nothing panics while holding it; a poisoned one is still consistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One producer's loop; returns its id, figures and the sequence numbers
/// acknowledged (boxed, as `produce::produce` returns its figures).
#[allow(clippy::too_many_arguments)]
async fn produce(
    producer: Producer,
    id: u64,
    plan: Plan,
    topic: Arc<str>,
    padding: Bytes,
    clock: Clock,
    counters: Arc<Counters>,
    stop: watch::Receiver<bool>,
) -> Box<(u64, SendStats, Bits)> {
    let mut stats = SendStats::default();
    let mut acked = Bits::default();
    let size = padding.len();
    let p = &producer;
    let unsent = drive(
        &plan,
        stop,
        |op| {
            let header = Header {
                producer: id,
                seq: op.index,
                timestamp_ns: clock.ns(op.intended),
            };
            let message = Message::new(&*topic, header.encode(size, &padding));
            async move {
                let sent_at = Instant::now();
                let result = p.send(message).await;
                (op, sent_at, Instant::now(), result)
            }
        },
        |(op, sent_at, done_at, result)| {
            let error = match result {
                Ok(_) => {
                    acked.insert(op.index);
                    None
                }
                Err(e) => Some(error_text(&anyhow::Error::from(e))),
            };
            stats.complete(&counters, &op, true, sent_at, done_at, 1, size, error);
        },
    )
    .await;
    stats.unsent = unsent;
    Box::new((id, stats, acked))
}

/// One consumer's loop, until `stop`: records arrivals and end-to-end
/// latency of measured messages. Offsets are not committed: the group is
/// the run's own.
async fn consume(
    mut consumer: PullConsumer,
    run_id: u64,
    clock: Clock,
    measure_from_ns: u64,
    arrivals: Arc<Mutex<Arrivals>>,
    counters: Arc<Counters>,
    mut stop: watch::Receiver<bool>,
) -> Latencies {
    let mut e2e = Latencies::new();
    loop {
        if *stop.borrow() {
            break;
        }
        let messages = tokio::select! {
            r = consumer.poll_at_most(POLL_MAX, POLL_SLICE) => r.unwrap_or_default(),
            Ok(()) = stop.changed() => break,
        };
        if messages.is_empty() {
            continue;
        }
        let now_ns = clock.now_ns();
        let mut arrived = 0;
        // One lock per poll, not per message.
        let mut a = lock(&arrivals);
        for m in &messages {
            let Some(h) = Header::decode(m.body()).filter(|h| h.run() == run_id) else {
                a.foreign += 1;
                continue;
            };
            if h.seq == CONNECT_SEQ {
                continue;
            }
            arrived += 1;
            if a.received.record(h.producer, h.seq) && h.timestamp_ns >= measure_from_ns {
                a.measured += 1;
                a.measured_bytes += m.body().len() as u64;
                e2e.record(elapsed_ns(h.timestamp_ns, now_ns));
            }
        }
        drop(a);
        counters.add_received(arrived);
    }
    // Stop the background pulls; nothing to commit in a throwaway group.
    drop(consumer);
    e2e
}
