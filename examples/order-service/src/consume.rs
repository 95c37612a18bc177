//! The consumer's loop: poll, apply each order in its own SQLite
//! transaction (skipping message ids applied before), then commit the
//! group's offsets, so a crash anywhere means redelivery, never loss, and
//! redelivery means a skip, never a second effect.

use std::future::Future;
use std::time::Duration;

use txmq::{PullConsumer, ReceivedMessage};

use crate::applied_db::{Applied, AppliedDb};
use crate::order::Order;
use crate::Result;

/// How long one poll waits when there is no idle timeout.
const POLL_WAIT: Duration = Duration::from_secs(1);

/// What happened to one delivered message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handled {
    /// The order was applied.
    Applied(Order),
    /// The message was applied before: skipped.
    Skipped(Order),
    /// Another message already applied this order id: skipped.
    SkippedOrder(Order),
    /// The body is not an order; nothing was written.
    NotAnOrder(String),
}

/// Counts of a consumer run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ConsumeStats {
    /// Orders applied.
    pub applied: u64,
    /// Messages skipped because they (or their order) were applied before.
    pub skipped: u64,
    /// Messages that were not orders.
    pub invalid: u64,
}

impl ConsumeStats {
    /// Messages delivered.
    pub fn delivered(&self) -> u64 {
        self.applied + self.skipped + self.invalid
    }
}

/// Applies `messages` to `db` one by one, counting into `stats` and telling
/// `each` what became of every message.
///
/// # Errors
/// The first [`Error::Sqlite`](crate::Error::Sqlite); the messages before
/// it are applied, it and those after it are not.
pub async fn apply_messages(
    db: &AppliedDb,
    messages: &[ReceivedMessage],
    stats: &mut ConsumeStats,
    mut each: impl FnMut(&ReceivedMessage, &Handled),
) -> Result<()> {
    for m in messages {
        let handled = match Order::from_body(m.body()) {
            Err(e) => {
                stats.invalid += 1;
                Handled::NotAnOrder(e.to_string())
            }
            Ok(order) => match db.apply(m.msg_id(), order.clone()).await? {
                Applied::Applied => {
                    stats.applied += 1;
                    Handled::Applied(order)
                }
                Applied::Duplicate => {
                    stats.skipped += 1;
                    Handled::Skipped(order)
                }
                Applied::DuplicateOrder => {
                    stats.skipped += 1;
                    Handled::SkippedOrder(order)
                }
            },
        };
        each(m, &handled);
    }
    Ok(())
}

/// Polls `consumer` and applies what arrives to `db`, committing the
/// group's offsets after each batch is applied, until no message arrives
/// for `idle` (never, with `None`) or `stop` completes. Does not shut the
/// consumer down: call [`PullConsumer::shutdown`] after it to commit the
/// last batch for certain and close the connections.
///
/// An offset commit that fails is logged and left to the next commit (or
/// the shutdown): the worst it causes is redelivery, which is skipped.
///
/// # Errors
/// As [`apply_messages`]; the batch that failed is not committed, so the
/// group gets it again.
pub async fn consume_until_idle(
    consumer: &mut PullConsumer,
    db: &AppliedDb,
    idle: Option<Duration>,
    stop: impl Future<Output = ()>,
    mut each: impl FnMut(&ReceivedMessage, &Handled),
) -> Result<ConsumeStats> {
    let mut stats = ConsumeStats::default();
    tokio::pin!(stop);
    loop {
        // `poll` is cancel safe: a message it was about to hand out stays buffered.
        let batch = tokio::select! {
            batch = consumer.poll(idle.unwrap_or(POLL_WAIT)) => batch?,
            () = &mut stop => break,
        };
        if batch.is_empty() {
            if idle.is_some() {
                break;
            }
            continue;
        }
        apply_messages(db, &batch, &mut stats, &mut each).await?;
        if let Err(e) = consumer.commit().await {
            tracing::warn!(error = %e, "cannot commit offsets yet; the messages may come again (and will be skipped)");
        }
    }
    Ok(stats)
}
