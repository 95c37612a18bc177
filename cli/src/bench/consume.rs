//! `txmq bench consume TOPIC --group G`: `--consumers` push consumers of
//! one group share the topic's queues (each queue read by one of them).
//! Without `--duration` they drain the backlog: the run ends once nothing
//! arrived for `--idle-timeout`. With it they follow the topic for that
//! long. Reports the consume rate.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use anyhow::Result;
use clap::Args;
use std::sync::atomic::AtomicU64;

use txmq::{handler_fn, ConsumeFrom, ConsumeResult, PushConsumer, ReceivedMessage};

use super::progress::{Counters, Extent, Progress};
use super::report::round;
use super::{secs_between, show_progress, stop_on_interrupt};
use crate::args::{parse_duration, parse_positive_duration, GlobalArgs};
use crate::consume::StartFrom;
use crate::output::Printer;

/// Messages one pull asks for.
const BATCH: u32 = 256;
/// How often consumed offsets are committed while running.
const COMMIT_INTERVAL: Duration = Duration::from_secs(2);

/// `txmq bench consume TOPIC --group G ...`
#[derive(Debug, Args)]
pub struct ConsumeArgs {
    /// The topic to read.
    pub topic: String,

    /// The consumer group; its offsets are committed as it goes.
    #[arg(long, env = "TXMQ_GROUP", value_parser = crate::args::parse_consumer_group)]
    pub group: String,

    /// Consumers, each its own client, all in the group.
    #[arg(long, env = "TXMQ_CONSUMERS", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub consumers: u32,

    /// Follow the topic for this long; without it, drain the backlog and
    /// stop after --idle-timeout without a message.
    #[arg(long, env = "TXMQ_DURATION", value_parser = parse_duration, value_name = "DURATION")]
    pub duration: Option<Duration>,

    /// Stop after this many messages.
    #[arg(long, env = "TXMQ_COUNT", value_parser = clap::value_parser!(u64).range(1..))]
    pub count: Option<u64>,

    /// When draining, stop after this long without a new message.
    #[arg(long, env = "TXMQ_IDLE_TIMEOUT", value_parser = parse_positive_duration, default_value = "3s", value_name = "DURATION")]
    pub idle_timeout: Duration,

    /// Where a group without a committed offset starts.
    #[arg(long, env = "TXMQ_FROM", value_enum, default_value_t = StartFrom::First)]
    pub from: StartFrom,

    /// Each message takes this long to handle (a stand-in for the work an
    /// application does; `0s`: none).
    #[arg(long, env = "TXMQ_HANDLE_TIME", value_parser = parse_duration, default_value = "0s", value_name = "DURATION")]
    pub handle_time: Duration,

    /// Messages handled at once per consumer.
    #[arg(long, env = "TXMQ_CONCURRENCY", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub concurrency: u32,
}

/// What one consumer read.
#[derive(Debug, Default, Clone, Copy)]
struct Consumed {
    messages: u64,
    bytes: u64,
}

/// Runs the consume benchmark and prints its report.
///
/// # Errors
/// When a consumer cannot start or its final commit fails.
pub async fn run(global: &GlobalArgs, args: ConsumeArgs) -> Result<()> {
    let from = match args.from {
        StartFrom::First => ConsumeFrom::First,
        StartFrom::Last => ConsumeFrom::Last,
    };
    let counters = Arc::new(Counters::default());
    let (stop_tx, stop) = stop_on_interrupt();
    let start = Instant::now();
    let extent = match (args.duration, args.count) {
        (Some(d), _) => Extent::Time(d),
        _ => Extent::Open,
    };
    let bytes = Arc::new(AtomicU64::new(0));
    let mut consumers = Vec::with_capacity(args.consumers as usize);
    for _ in 0..args.consumers {
        let (counters, bytes) = (counters.clone(), bytes.clone());
        let handle_time = args.handle_time;
        let handler = handler_fn(move |m: &ReceivedMessage| {
            counters.add_received(1);
            bytes.fetch_add(m.body().len() as u64, Ordering::Relaxed);
            async move {
                if !handle_time.is_zero() {
                    tokio::time::sleep(handle_time).await;
                }
                ConsumeResult::Success
            }
        });
        consumers.push(
            PushConsumer::builder()
                .config(global.client_config()?)
                .group(args.group.clone())
                .subscribe(args.topic.clone(), "*")
                .require_readable(true)
                .from(from)
                .batch_size(BATCH)
                .concurrency(args.concurrency as usize)
                .commit_interval(COMMIT_INTERVAL)
                .start(handler)
                .await?,
        );
    }
    let progress = Progress::start(show_progress(global), counters.clone(), extent, None);

    // Decide when to stop: deadline, count, idleness or Ctrl-C. The
    // counter is looked at often enough (20 ms) to date the last message.
    let mut stop_watch = stop.clone();
    let (mut received, mut last_message) = (0u64, start);
    loop {
        let now = Instant::now();
        let now_received = counters.received.load(Ordering::Relaxed);
        if now_received != received {
            (received, last_message) = (now_received, now);
        }
        let done = match args.duration {
            Some(d) => now >= start + d,
            None => now.duration_since(last_message) >= args.idle_timeout,
        } || args.count.is_some_and(|n| received >= n);
        if done || *stop_watch.borrow() || crate::refusal::noticed().is_some() {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            Ok(()) = stop_watch.changed() => {}
        }
    }
    let _ = stop_tx.send(true);
    futures_util::future::join_all(consumers.into_iter().map(PushConsumer::shutdown)).await;
    let total = Consumed {
        messages: counters.received.load(Ordering::Relaxed),
        bytes: bytes.load(Ordering::Relaxed),
    };
    progress.finish();
    if let Some(why) = crate::refusal::noticed() {
        anyhow::bail!(
            "consuming {} as group {}: refused: {why}",
            args.topic,
            args.group
        );
    }

    // Draining: the time to the last message; following: the whole period.
    let end = match args.duration {
        Some(d) => start + d,
        None => last_message,
    };
    let secs = secs_between(start, end);
    let mut report = super::new_report(global, "consume");
    report
        .field("topic", args.topic.as_str())
        .field("group", args.group.as_str())
        .field("consumers", args.consumers)
        .field("duration_s", round(secs, 3))
        .field("messages", total.messages)
        .field("bytes", total.bytes)
        .rates("consume", total.messages, total.bytes, secs);
    report.print(&Printer::stdout(global.output))?;
    Ok(())
}
