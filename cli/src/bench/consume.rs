//! `txmq bench consume TOPIC --group G`: `--consumers` pull consumers of
//! one group read the topic. Without `--duration` they drain the backlog:
//! the run ends once nothing arrived for `--idle-timeout`. With it they
//! follow the topic for that long. Reports the consume rate.
//!
//! Until the client rebalances queues among a group's members, each
//! consumer reads every queue: N consumers read the topic N times, and
//! `messages` counts every copy.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use tokio::sync::watch;
use txmq::{ConsumeFrom, PullConsumer};

use super::progress::{Counters, Extent, Progress};
use super::report::{round, Report};
use super::{secs_between, show_progress, stop_on_interrupt};
use crate::args::{parse_duration, GlobalArgs};
use crate::consume::StartFrom;
use crate::output::Printer;

/// The longest single wait for messages, so stop conditions are seen soon.
const POLL_SLICE: Duration = Duration::from_millis(100);
/// Most messages one poll hands out.
const POLL_MAX: usize = 1024;
/// How often consumed offsets are committed while running.
const COMMIT_INTERVAL: Duration = Duration::from_secs(2);

/// `txmq bench consume TOPIC --group G ...`
#[derive(Debug, Args)]
pub struct ConsumeArgs {
    /// The topic to read.
    pub topic: String,

    /// The consumer group; its offsets are committed as it goes.
    #[arg(long, env = "TXMQ_GROUP")]
    pub group: String,

    /// Consumers, each its own client, all in the group.
    #[arg(long, env = "TXMQ_CONSUMERS", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub consumers: u32,

    /// Follow the topic for this long; without it, drain the backlog and
    /// stop after --idle-timeout without a message.
    #[arg(long, env = "TXMQ_DURATION", value_parser = parse_duration, value_name = "DURATION")]
    pub duration: Option<Duration>,

    /// Stop after this many messages.
    #[arg(long, env = "TXMQ_COUNT")]
    pub count: Option<u64>,

    /// When draining, stop after this long without a new message.
    #[arg(long, env = "TXMQ_IDLE_TIMEOUT", value_parser = parse_duration, default_value = "3s", value_name = "DURATION")]
    pub idle_timeout: Duration,

    /// Where a group without a committed offset starts.
    #[arg(long, env = "TXMQ_FROM", value_enum, default_value_t = StartFrom::First)]
    pub from: StartFrom,
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
    let mut consumers = Vec::with_capacity(args.consumers as usize);
    for _ in 0..args.consumers {
        consumers.push(
            PullConsumer::builder()
                .config(global.client_config())
                .group(args.group.clone())
                .topic(args.topic.clone())
                .from(from)
                .build()
                .await?,
        );
    }
    let counters = Arc::new(Counters::default());
    let (stop_tx, stop) = stop_on_interrupt();
    let start = Instant::now();
    let extent = match (args.duration, args.count) {
        (Some(d), _) => Extent::Time(d),
        _ => Extent::Open,
    };
    let progress = Progress::start(show_progress(global), counters.clone(), extent, None);
    let tasks: Vec<_> = consumers
        .into_iter()
        .map(|c| tokio::spawn(consume(c, counters.clone(), stop.clone())))
        .collect();

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
        if done || *stop_watch.borrow() {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            Ok(()) = stop_watch.changed() => {}
        }
    }
    let _ = stop_tx.send(true);
    let mut total = Consumed::default();
    let mut commit_error = None;
    for t in tasks {
        let (c, result) = t.await.context("a consumer task failed")?;
        total.messages += c.messages;
        total.bytes += c.bytes;
        if let Err(e) = result {
            commit_error.get_or_insert(e);
        }
    }
    progress.finish();

    // Draining: the time to the last message; following: the whole period.
    let end = match args.duration {
        Some(d) => start + d,
        None => last_message,
    };
    let secs = secs_between(start, end);
    let mut report = Report::new("consume");
    report
        .field("topic", args.topic.as_str())
        .field("group", args.group.as_str())
        .field("consumers", args.consumers)
        .field("duration_s", round(secs, 3))
        .field("messages", total.messages)
        .field("bytes", total.bytes)
        .rates("consume", total.messages, total.bytes, secs);
    report.print(&Printer::stdout(global.output))?;
    if let Some(e) = commit_error {
        return Err(anyhow::Error::from(e).context("committing the consumed offsets"));
    }
    Ok(())
}

/// One consumer's loop, until `stop`; commits as it goes and at the end.
async fn consume(
    mut consumer: PullConsumer,
    counters: Arc<Counters>,
    mut stop: watch::Receiver<bool>,
) -> (Consumed, txmq::Result<()>) {
    let mut seen = Consumed::default();
    let mut last_commit = Instant::now();
    loop {
        if *stop.borrow() {
            break;
        }
        let messages = tokio::select! {
            r = consumer.poll_at_most(POLL_MAX, POLL_SLICE) => r.unwrap_or_default(),
            Ok(()) = stop.changed() => break,
        };
        if !messages.is_empty() {
            let n = messages.len() as u64;
            seen.messages += n;
            seen.bytes += messages.iter().map(|m| m.body().len() as u64).sum::<u64>();
            counters.add_received(n);
        }
        if last_commit.elapsed() >= COMMIT_INTERVAL {
            if let Err(e) = consumer.commit().await {
                tracing::warn!(error = %e, "cannot commit offsets; will try again");
            }
            last_commit = Instant::now();
        }
    }
    let result = consumer.shutdown().await;
    (seen, result)
}
