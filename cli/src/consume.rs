//! `txmq consume`: prints a topic's messages as a member of a consumer
//! group, committing the group's offsets for what it printed.
//!
//! It is a [`PushConsumer`] in the group: several `txmq consume` of one
//! group share the topic's queues (or, with `--broadcast`, each gets
//! everything). Each queue is handled in order, one message at a time: a
//! message counts as consumed once printed, and the offsets committed
//! (periodically and before exiting) cover exactly the printed messages,
//! so `--count` leaves the rest to the group's next consumer. A message
//! printed but not yet committed when the process is killed is printed
//! again by the group's next consumer (at least once).

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use tokio::sync::{mpsc, oneshot};
use txmq::{
    handler_fn, Admin, ClientConfig, ConsumeFrom, ConsumeResult, PushConsumer, ReceivedMessage,
};

use crate::args::{
    parse_consumer_group, parse_group, parse_positive_duration, parse_tag_filter, GlobalArgs,
};
use crate::output::{received_json, received_text, OutputFormat, Printer};
use crate::signal::interrupted;

/// `txmq consume TOPIC --group G ...`
#[derive(Debug, Args)]
pub struct ConsumeArgs {
    /// The topic to read.
    pub topic: String,

    /// The consumer group; its offsets are stored on the brokers. A
    /// clustering member's group name is one a topic name could hold
    /// (its retry topic is `%RETRY%GROUP`); a broadcasting one's, any.
    #[arg(long, env = "TXMQ_GROUP", value_parser = parse_group)]
    pub group: String,

    /// Exit after printing this many messages.
    #[arg(long, env = "TXMQ_COUNT", value_parser = clap::value_parser!(u64).range(1..))]
    pub count: Option<u64>,

    /// Exit after this long without a new message (e.g. 5s).
    #[arg(long, env = "TXMQ_IDLE_TIMEOUT", value_parser = parse_positive_duration, value_name = "DURATION")]
    pub idle_timeout: Option<Duration>,

    /// Where a group without a committed offset starts: the first stored
    /// message, or only messages sent from now on.
    #[arg(long, env = "TXMQ_FROM", value_enum, default_value_t = StartFrom::First)]
    pub from: StartFrom,

    /// How often the offsets of printed messages are committed while running.
    #[arg(long, env = "TXMQ_COMMIT_INTERVAL", value_parser = parse_positive_duration, default_value = "5s", value_name = "DURATION")]
    pub commit_interval: Duration,

    /// How often the topic's route is fetched to find new queues.
    #[arg(long, env = "TXMQ_ROUTE_REFRESH", value_parser = parse_positive_duration, default_value = "30s", value_name = "DURATION")]
    pub route_refresh: Duration,

    /// Only messages with these tags: `*` (every message; also an empty expression, as in RocketMQ) or `a || b`.
    #[arg(long, env = "TXMQ_TAG", default_value = "*", value_name = "EXPR", value_parser = parse_tag_filter)]
    pub tag: String,

    /// Receive every message of the topic, whatever the other members of
    /// the group receive (positions are not stored on the brokers).
    #[arg(long, env = "TXMQ_BROADCAST")]
    pub broadcast: bool,

    /// How often the consumer heartbeats and rebalances the group's queues.
    #[arg(long, env = "TXMQ_REBALANCE_INTERVAL", value_parser = parse_positive_duration, default_value = "10s", value_name = "DURATION")]
    pub rebalance_interval: Duration,
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
    if !args.broadcast {
        // Said before connecting, naming the flag, as clap would have.
        parse_consumer_group(&args.group).map_err(|e| {
            crate::exit::usage(format!(
                "invalid value '{}' for '--group <GROUP>': {e}",
                args.group
            ))
        })?;
    }
    let from = match args.from {
        StartFrom::First => ConsumeFrom::First,
        StartFrom::Last => ConsumeFrom::Last,
    };
    // The handler passes each message here and waits until it is printed;
    // one not printed (after --count, or on exit) is never finished, so
    // its offset is not committed.
    let (tx, mut rx) = mpsc::channel::<(ReceivedMessage, oneshot::Sender<()>)>(64);
    let handler = handler_fn(move |m: &ReceivedMessage| {
        let tx = tx.clone();
        let m = m.clone();
        async move {
            let (done, printed) = oneshot::channel();
            if tx.send((m, done)).await.is_err() {
                std::future::pending::<()>().await;
            }
            match printed.await {
                Ok(()) => ConsumeResult::Success,
                Err(_) => std::future::pending().await,
            }
        }
    });
    let config = global.client_config()?;
    let consumer = PushConsumer::builder()
        .config(config.clone())
        .route_refresh_interval(args.route_refresh)
        .group(args.group.clone())
        .subscribe(args.topic.clone(), args.tag.clone())
        // A write-only topic would only be waited on until the idle
        // timeout, and the command exit 0: say so instead.
        .require_readable(true)
        .broadcast(args.broadcast)
        .orderly(true)
        .from(from)
        .commit_interval(args.commit_interval)
        .rebalance_interval(args.rebalance_interval)
        .drain_timeout(Duration::from_millis(200))
        .start(handler)
        .await?;
    let missing = note_missing_topic(config, &args.topic).await;
    let printer = Printer::stdout(global.output);
    let interrupted = interrupted();
    tokio::pin!(interrupted);
    let refused = crate::refusal::refused();
    tokio::pin!(refused);

    let mut printed: u64 = 0;
    let mut last_message = Instant::now();
    // Acknowledgements held back until the end (a message beyond --count).
    let mut unprinted = Vec::new();
    loop {
        if args.count.is_some_and(|c| printed >= c) {
            break;
        }
        let idle = match args.idle_timeout {
            Some(idle) => {
                let left = idle.saturating_sub(last_message.elapsed());
                if left.is_zero() {
                    // (A topic no broker serves was noted already.)
                    if printed == 0 && !missing && consumer.queues().is_empty() {
                        note_no_queue(&args.topic, &args.group);
                    }
                    break;
                }
                left
            }
            None => Duration::from_secs(3600),
        };
        let (m, done) = tokio::select! {
            next = rx.recv() => match next {
                Some(x) => x,
                None => break,
            },
            _ = tokio::time::sleep(idle) => continue,
            _ = &mut interrupted => break,
            why = &mut refused => {
                drop(consumer);
                // Its offsets are committed as it goes: a refusal (its
                // rights revoked, say) stops the commits too.
                let again = if printed > 0 {
                    "; the messages it printed since its last commit will be delivered again"
                } else {
                    ""
                };
                return Err(anyhow::anyhow!(why).context(format!(
                    "consuming {} as group {}: refused{again}",
                    args.topic, args.group
                )));
            }
        };
        last_message = Instant::now();
        if let Err(e) = print_message(&printer, &m) {
            // Standard output is closed (`| head`) or full: the end of
            // this consume, as Ctrl-C would be. This message is never
            // finished, so it comes again; the ones printed before are
            // committed, and the member leaves its group so that the next
            // consumer reads at once instead of after the member's expiry.
            drop((m, done));
            let _ = consumer.shutdown().await;
            return Err(e);
        }
        printed += 1;
        let _ = done.send(());
    }
    // Messages handed over but not printed stay unfinished.
    while let Ok(x) = rx.try_recv() {
        unprinted.push(x);
    }
    let committed = consumer.shutdown().await;
    drop(unprinted);
    committed.context("committing the consumed offsets")
}

/// Says on stderr why a consume that printed nothing may have: it was
/// given no queue to read (a group's queues wait for a member the brokers
/// lost until it comes back or its expiry passes), which an empty topic
/// would look like otherwise.
fn note_no_queue(topic: &str, group: &str) {
    stderr!(
        "note: no queue of \"{topic}\" was assigned to this member of group \"{group}\" while it waited: \
         another member holds them, or the brokers keep the queues of a member they lost \
         (a consumer killed, a broker restarted) for it until --consumer-expiry (30s by default) passes; \
         `txmq group show {group}` shows each queue's owner and lag"
    );
}

/// Says on stderr when no broker serves `topic` now: the command waits
/// for one (a first send may create the topic), but a mistyped name would
/// otherwise wait in silence. Awaited before the first message is, so the
/// note comes first and an early exit cannot lose it; a nameserver that
/// does not answer within the bound costs only the note. True when noted.
async fn note_missing_topic(config: ClientConfig, topic: &str) -> bool {
    let check = async {
        let admin = Admin::with_config(config).await.ok()?;
        let missing = matches!(admin.route(topic).await, Err(txmq::Error::NoRoute { .. }));
        admin.close().await.ok();
        Some(missing)
    };
    let missing = matches!(
        tokio::time::timeout(Duration::from_secs(2), check).await,
        Ok(Some(true))
    );
    if missing {
        stderr!(
            "note: no broker serves topic \"{topic}\" now; waiting for one \
             (`txmq topic create {topic}` creates a topic, as does a first send where brokers create topics)"
        );
    }
    missing
}

fn print_message(printer: &Printer, m: &ReceivedMessage) -> Result<()> {
    match printer.format {
        OutputFormat::Text => printer.line(&received_text(m)),
        OutputFormat::Json => printer.json(&received_json(m)),
    }
    .context("writing to standard output")
}
