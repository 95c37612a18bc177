//! Pull: read a queue from an offset, long-polling when nothing is there.
//!
//! An empty pull waits on the queue's notification (woken when messages
//! become visible), not on a timer loop, up to the request's deadline.
//!
//! A member's pull (one that names its group and client id) is checked
//! against the group's owners when it starts and again before a pull that
//! waited answers: a queue that moved to another member meanwhile is
//! answered with QUEUE_NOT_OWNED, not with messages the new owner reads too.

use std::time::Duration;

use txmq_protocol::{ErrorCode, PullRequest, PullResult, WireError, PERM_READ};
use txmq_remoting::Connection;

use super::{bad_argument, existing_queue, store_error};
use crate::BrokerInner;

/// At most this many messages per pull.
const MAX_MESSAGES: u32 = 1024;
/// About this many bytes per pull (at least one message is always returned).
const MAX_BYTES: usize = 4 << 20;
/// Most tags in one pull's filter.
const MAX_TAGS: usize = 64;
/// Rounds of filtered-out reads one pull makes before answering with none.
const MAX_SKIP_ROUNDS: u32 = 64;
/// The longest a pull may wait.
const MAX_WAIT: Duration = Duration::from_secs(30);

pub(super) async fn handle(
    b: &BrokerInner,
    conn: &Connection,
    req: PullRequest,
) -> Result<PullResult, WireError> {
    // Working time only: a long poll restarts it when it wakes up.
    let mut timer = crate::metrics::Timer::start(&b.metrics.pull_latency);
    check_readable(b, conn, &req)?;
    if req.tag_filter.len() > MAX_TAGS {
        return Err(bad_argument(format!("at most {MAX_TAGS} tags in a filter")));
    }
    if req.max_messages == 0 || req.max_messages > MAX_MESSAGES {
        return Err(bad_argument(format!(
            "max messages must be between 1 and {MAX_MESSAGES}"
        )));
    }
    let queue = b
        .store
        .queue(&req.topic, req.queue)
        .ok_or_else(|| super::unknown_topic(b, &req.topic))?;
    let epoch = queue_epoch(b, &queue);
    // Read after the queue: a delete after this is seen as a discarded
    // queue below, so an answer never pairs new messages with an old
    // generation.
    let topic_generation = b.store.topic_generation(&req.topic);
    if let Some(back) = rewritten(b, &req, epoch, topic_generation) {
        return Ok(back);
    }
    let deadline =
        tokio::time::Instant::now() + Duration::from_millis(req.max_wait_ms).min(MAX_WAIT);
    let mut offset = req.offset;
    let mut skipped = 0;
    let mut waited = false;
    loop {
        if queue.is_discarded() {
            // Deleted while this pull waited (and maybe made again: new
            // queues, offsets from 0, where this reader's position means
            // nothing).
            return Err(WireError::new(
                ErrorCode::UnknownTopic,
                format!(
                    "topic '{}' was deleted on broker {} while this pull waited",
                    req.topic, b.config.broker_name
                ),
            ));
        }
        // Register interest before looking, so an arrival in between still wakes us.
        let (_interest, arrived) = queue.arrival();
        tokio::pin!(arrived);
        arrived.as_mut().enable();
        // Under sync replication with a controller, readers see only what
        // every in-sync replica holds: a record a failover may cut is
        // never delivered.
        let (limit, mut confirmed) = b.replication.read_limit();
        let r = b
            .store
            .read_filtered(
                &req.topic,
                req.queue,
                offset,
                req.max_messages as usize,
                MAX_BYTES,
                crate::store::ReadFilter {
                    tags: &req.tag_filter,
                    log_limit: limit,
                },
            )
            .map_err(store_error)?;
        if queue.is_discarded() {
            // Deleted (and maybe made again) between the look above and
            // this read, which went by name: not this reader's queue.
            continue;
        }
        // Everything read was filtered out (or below the first offset): go
        // on from there, a bounded number of rounds per request, and wait
        // at the end as for an empty queue.
        if r.messages.is_empty() && r.next_offset > offset {
            offset = r.next_offset;
            skipped += 1;
            if skipped < MAX_SKIP_ROUNDS && offset < r.max_offset {
                continue;
            }
        }
        // A pull that skipped filtered-out messages answers at once with
        // where it got to, as RocketMQ's does: a reader that stops before
        // the wait is over then commits past them (`txmq consume --tag`
        // left its whole skipped backlog as lag).
        let waiting_for_more = r.messages.is_empty()
            && skipped == 0
            && (offset >= r.max_offset || r.held_back)
            && offset == r.next_offset;
        if !waiting_for_more || tokio::time::Instant::now() >= deadline {
            if waited {
                // The topic may have become write only, or the queue
                // another member's, while this one waited.
                check_readable(b, conn, &req)?;
            }
            if !req.browse {
                b.metrics.messages_out(
                    &req.topic,
                    r.messages.len(),
                    r.messages.iter().map(|m| m.message.body.len()).sum(),
                );
            }
            return Ok(PullResult {
                messages: r.messages,
                next_offset: r.next_offset,
                min_offset: r.min_offset,
                max_offset: r.max_offset,
                epoch,
                topic_generation,
            });
        }
        timer.pause();
        tokio::select! {
            _ = &mut arrived => {}
            _ = async {
                match confirmed.as_mut() {
                    Some(rx) => { let _ = rx.changed().await; }
                    None => std::future::pending().await,
                }
            }, if r.held_back => {}
            _ = tokio::time::sleep_until(deadline) => {}
            _ = b.shutdown.cancelled() => {}
        }
        waited = true;
        timer.restart();
        if b.shutdown.is_cancelled() {
            return Err(WireError::new(
                ErrorCode::StoreUnavailable,
                "the broker is shutting down",
            ));
        }
    }
}

/// Checks that `req`'s queue exists and may be read, by this connection's
/// member when the pull names an owner: when a pull starts, and again
/// before it answers after waiting, as a new pull would be checked.
fn check_readable(b: &BrokerInner, conn: &Connection, req: &PullRequest) -> Result<(), WireError> {
    let config = existing_queue(b, &req.topic, req.queue)?;
    super::check_perm(b, &config, PERM_READ)?;
    super::group::check_reader(b, conn, req.owner.as_ref(), &req.topic, req.queue)
}

/// A reader last answered by an earlier run of this broker (or by an
/// earlier queue of the same name: its topic was deleted and made again)
/// whose last message no longer stands where it read it: the log came back
/// cut short (a power cut under async flush) and new messages took the
/// lost offsets, or the new topic's messages did, so the queue may have
/// grown back past the reader's position and a short queue would not show. The answer sends the reader below its position
/// (to that offset), which makes it go back to the group's committed offset.
fn rewritten(
    b: &BrokerInner,
    req: &PullRequest,
    epoch: u64,
    topic_generation: u64,
) -> Option<PullResult> {
    let (at, id) = req.after?;
    if req.epoch == 0 || req.epoch == epoch || at >= req.offset {
        return None;
    }
    let (min, max) = b.store.queue_bounds(&req.topic, req.queue)?;
    if at < min || b.store.msg_id_at(&req.topic, req.queue, at) == Some(id) {
        return None;
    }
    tracing::info!(topic = %req.topic, queue = req.queue, offset = at, %id, "a reader's last message is no longer in the queue (the log came back cut short, or the topic was deleted and made again); sending it back");
    Some(PullResult {
        messages: Vec::new(),
        next_offset: at,
        min_offset: min,
        max_offset: max,
        epoch,
        topic_generation,
    })
}

/// What a pull's answer names as the run that answered it: the broker's
/// run and the queue object, so that a reader of a topic deleted and made
/// again under its name meets the same check as after a restart (its
/// last message is not where it read it: it goes back).
fn queue_epoch(b: &BrokerInner, queue: &crate::store::consume_queue::ConsumeQueue) -> u64 {
    (b.epoch ^ queue.incarnation().wrapping_mul(0x9E37_79B9_7F4A_7C15)).max(1)
}
