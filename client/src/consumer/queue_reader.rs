//! One background task per (broker, queue): long-polls the broker and hands
//! each non-empty batch to the consumer's channel, in queue order.
//!
//! The channel is bounded, so a consumer that stops polling stops the
//! pulling. A failed pull is retried after a back-off (200 ms doubling to
//! 1 s), never in a tight loop; only the first failure in a row is logged
//! as a warning.

use std::sync::Arc;
use std::time::Duration;

use txmq_protocol::{ErrorCode, PullRequest, QueryOffset, StoredMessage};
use txmq_remoting::Connection;

use super::offsets::{start_offset, QueueKey};
use super::pull_step::{self, Trail, EARLY_EMPTY_PAUSE};
use super::{ConsumeFrom, Shared};
use crate::{Error, Result};

const MIN_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// A batch read from one queue.
#[derive(Debug)]
pub(crate) struct Fetched {
    pub(crate) key: Arc<QueueKey>,
    pub(crate) messages: Vec<StoredMessage>,
    /// Where the next pull of this queue starts: the position after the batch.
    pub(crate) next_offset: u64,
    /// The topic they were read from.
    pub(crate) generation: Option<u64>,
}

/// Reads `key` until the consumer is shut down. `offset` is where to start;
/// `None` asks the broker for the group's committed offset first.
pub(crate) async fn run(
    shared: Arc<Shared>,
    key: Arc<QueueKey>,
    mut offset: Option<u64>,
    from: ConsumeFrom,
) {
    let mut backoff = MIN_BACKOFF;
    let mut failing = false;
    // A start asked for before (`initial_offset`) is of the topic it named.
    let mut trail = shared
        .offsets()
        .generation(&key)
        .map_or_else(Trail::default, Trail::of_generation);
    loop {
        if shared.unreadable.borrow().contains(&*key) {
            // The route lists the queue as not readable: no pull until it
            // may be read, then on from the same position.
            tracing::debug!(topic = %shared.topic, broker = %key.broker_name, queue = key.queue, "queue not readable; waiting");
            let mut listed = shared.unreadable.subscribe();
            tokio::select! {
                r = listed.wait_for(|s| !s.contains(&*key)) => if r.is_err() { return },
                _ = shared.cancel.cancelled() => return,
            }
            continue;
        }
        let step = tokio::select! {
            r = pull_once(&shared, &key, &mut offset, &mut trail, from) => r,
            _ = shared.cancel.cancelled() => return,
        };
        let pause = match step {
            Ok(pause) => {
                if failing {
                    tracing::debug!(topic = %shared.topic, broker = %key.broker_name, queue = key.queue, "pulling again");
                    failing = false;
                    backoff = MIN_BACKOFF;
                }
                (!pause.is_zero()).then_some(pause)
            }
            Err(e) => {
                if e.code() == Some(ErrorCode::UnknownTopic) {
                    // Deleted: the group's positions went with the topic.
                    // Made again under its name (offsets from 0), it is
                    // read from the group's offset there, not from where
                    // this reader stood, which would skip its first
                    // messages; nor is that old position committed there.
                    offset = None;
                    shared.offsets().rewound(&key);
                }
                if e.code() == Some(ErrorCode::NoPermission) {
                    // Most likely made write only: the route says so
                    // sooner than the next periodic refresh.
                    shared.refresh_now.notify_one();
                }
                let cause = e.remoting().map(ToString::to_string).unwrap_or_default();
                if failing {
                    tracing::debug!(topic = %shared.topic, broker = %key.broker_name, queue = key.queue, error = %e, %cause, "pull failed again");
                } else {
                    tracing::warn!(topic = %shared.topic, broker = %key.broker_name, queue = key.queue, error = %e, %cause, "pull failed; retrying");
                }
                failing = true;
                let pause = backoff;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                Some(pause)
            }
        };
        if let Some(pause) = pause {
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = shared.cancel.cancelled() => return,
            }
        }
    }
}

async fn pull_once(
    shared: &Shared,
    key: &Arc<QueueKey>,
    offset: &mut Option<u64>,
    trail: &mut Trail,
    from: ConsumeFrom,
) -> Result<Duration> {
    let target = shared.connect(key).await?;
    let conn = &target.conn;
    let at_broker = |e| Error::at_broker(&key.broker_name, &target.addr, e);
    let start = match *offset {
        Some(o) => o,
        None => {
            // A position asked for afresh has no last message yet; its
            // first pull is checked against the topic it was asked of.
            let (o, generation) = query_start(shared, conn, key, from)
                .await
                .map_err(at_broker)?;
            *trail = Trail::of_generation(generation);
            *offset = Some(o);
            o
        }
    };
    let request = PullRequest {
        topic: shared.topic.clone(),
        queue: key.queue,
        offset: start,
        max_messages: shared.settings.batch_size,
        max_wait_ms: u64::try_from(shared.settings.max_wait.as_millis()).unwrap_or(u64::MAX),
        tag_filter: Vec::new(),
        owner: None,
        epoch: 0,
        after: None,
        browse: false,
    };
    let timeout = shared.settings.max_wait + shared.settings.request_timeout;
    let pulled = pull_step::pull(
        conn,
        target.slave,
        &key.broker_name,
        &shared.group,
        request,
        timeout,
        *trail,
    )
    .await
    .map_err(at_broker)?;
    *trail = pulled.trail;
    let pause = pulled.pause();
    if !pulled.messages.is_empty() {
        let batch = Fetched {
            key: key.clone(),
            messages: pulled.messages,
            next_offset: pulled.next_offset,
            generation: pulled.trail.generation(),
        };
        // Waits while the consumer's buffer is full.
        if shared.tx.send(batch).await.is_err() {
            // The consumer is gone; its cancellation stops this task.
            return Ok(EARLY_EMPTY_PAUSE);
        }
    }
    // Backwards too: see `pull_step`.
    *offset = Some(pulled.next_offset);
    Ok(pause)
}

fn query(shared: &Shared, key: &QueueKey) -> QueryOffset {
    QueryOffset {
        group: shared.group.clone(),
        topic: shared.topic.clone(),
        queue: key.queue,
        stored_since_ms: None,
    }
}

/// Asks the broker where the group stands on `key` and records it.
async fn query_start(
    shared: &Shared,
    conn: &Connection,
    key: &QueueKey,
    from: ConsumeFrom,
) -> Result<(u64, u64), txmq_remoting::Error> {
    let mut request = query(shared, key);
    if from == ConsumeFrom::Last {
        // "From last" is "stored since the consumer started", also on a
        // queue met later (a broker added, or away at the start).
        request.stored_since_ms = Some(shared.started_ms);
    }
    let q = conn.call(request).await?;
    let start = start_offset(
        q.committed,
        q.min_offset,
        q.max_offset,
        from,
        q.since_offset,
    );
    {
        let mut offsets = shared.offsets();
        // First: a start in another topic of the name begins anew.
        offsets.read_from(key, Some(q.topic_generation));
        offsets.started(key, q.committed, start);
    }
    tracing::debug!(topic = %shared.topic, broker = %key.broker_name, queue = key.queue, committed = ?q.committed, start, "starting queue");
    Ok((start, q.topic_generation))
}

/// The start offset of `key`, asked before the consumer's `build` returns
/// so that [`ConsumeFrom::Last`] means "after what is stored now".
///
/// # Errors
/// When the broker cannot be asked; the reader then asks again itself.
pub(crate) async fn initial_offset(
    shared: &Shared,
    key: &QueueKey,
    from: ConsumeFrom,
) -> Result<u64> {
    let target = shared.connect(key).await?;
    query_start(shared, &target.conn, key, from)
        .await
        .map(|(start, _)| start)
        .map_err(|e| Error::at_broker(&key.broker_name, &target.addr, e))
}
