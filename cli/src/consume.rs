//! `txmq consume`: prints a topic's messages as a member of a consumer
//! group, committing the group's offsets for what it printed.
//!
//! Offsets are committed periodically and before exiting, and cover exactly
//! the messages printed: `--count` asks the consumer for no more than it
//! still needs. A message printed but not yet committed when the process is
//! killed is printed again by the group's next consumer (at least once).

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use txmq::{ConsumeFrom, PullConsumer, ReceivedMessage};

use crate::args::{parse_duration, GlobalArgs};
use crate::output::{received_json, received_text, OutputFormat, Printer};
use crate::signal::interrupted;

/// The longest single wait for messages, so deadlines are checked often.
const POLL_SLICE: Duration = Duration::from_millis(500);

/// `txmq consume TOPIC --group G ...`
#[derive(Debug, Args)]
pub struct ConsumeArgs {
    /// The topic to read.
    pub topic: String,

    /// The consumer group; its offsets are stored on the brokers.
    #[arg(long, env = "TXMQ_GROUP")]
    pub group: String,

    /// Exit after printing this many messages.
    #[arg(long, env = "TXMQ_COUNT")]
    pub count: Option<u64>,

    /// Exit after this long without a new message (e.g. 5s).
    #[arg(long, env = "TXMQ_IDLE_TIMEOUT", value_parser = parse_duration, value_name = "DURATION")]
    pub idle_timeout: Option<Duration>,

    /// Where a group without a committed offset starts: the first stored
    /// message, or only messages sent from now on.
    #[arg(long, env = "TXMQ_FROM", value_enum, default_value_t = StartFrom::First)]
    pub from: StartFrom,

    /// How often the offsets of printed messages are committed while running.
    #[arg(long, env = "TXMQ_COMMIT_INTERVAL", value_parser = parse_duration, default_value = "5s", value_name = "DURATION")]
    pub commit_interval: Duration,

    /// How often the topic's route is fetched to find new queues.
    #[arg(long, env = "TXMQ_ROUTE_REFRESH", value_parser = parse_duration, default_value = "30s", value_name = "DURATION")]
    pub route_refresh: Duration,
}

/// `--from`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StartFrom {
    /// The first message still stored.
    First,
    /// Only messages stored after the consumer starts.
    Last,
}

/// Consumes until `--count` messages, `--idle-timeout`, or Ctrl-C / SIGTERM.
///
/// # Errors
/// When the consumer cannot start, output cannot be written, or the final
/// commit fails.
pub async fn run(global: &GlobalArgs, args: ConsumeArgs) -> Result<()> {
    let from = match args.from {
        StartFrom::First => ConsumeFrom::First,
        StartFrom::Last => ConsumeFrom::Last,
    };
    let mut consumer = PullConsumer::builder()
        .config(global.client_config())
        .route_refresh_interval(args.route_refresh)
        .group(args.group.clone())
        .topic(args.topic.clone())
        .from(from)
        .build()
        .await?;
    let printer = Printer::stdout(global.output);
    let interrupted = interrupted();
    tokio::pin!(interrupted);

    let mut printed: u64 = 0;
    let mut last_message = Instant::now();
    let mut last_commit = Instant::now();
    loop {
        let mut max = 256usize;
        if let Some(count) = args.count {
            if printed >= count {
                break;
            }
            max = max.min(usize::try_from(count - printed).unwrap_or(usize::MAX));
        }
        let mut wait = POLL_SLICE;
        if let Some(idle) = args.idle_timeout {
            let left = idle.saturating_sub(last_message.elapsed());
            if left.is_zero() {
                break;
            }
            wait = wait.min(left);
        }
        let messages = tokio::select! {
            r = consumer.poll_at_most(max, wait) => r?,
            _ = &mut interrupted => break,
        };
        if !messages.is_empty() {
            last_message = Instant::now();
        }
        for m in &messages {
            // On failure, return without committing: what was handed out but
            // not printed must come again. Dropping the consumer stops it.
            print_message(&printer, m)?;
            printed += 1;
        }
        if last_commit.elapsed() >= args.commit_interval {
            if let Err(e) = consumer.commit().await {
                tracing::warn!(error = %e, "cannot commit offsets; will try again");
            }
            last_commit = Instant::now();
        }
    }
    consumer
        .shutdown()
        .await
        .context("committing the consumed offsets")?;
    Ok(())
}

fn print_message(printer: &Printer, m: &ReceivedMessage) -> Result<()> {
    match printer.format {
        OutputFormat::Text => printer.line(&received_text(m)),
        OutputFormat::Json => printer.json(&received_json(m)),
    }
    .context("writing to standard output")
}
