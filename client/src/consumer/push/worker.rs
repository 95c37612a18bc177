//! One task per owned queue: pulls, runs the handler on each message (up
//! to the consumer's concurrency, or one at a time in order), hands
//! retried messages back, and commits the position of the first
//! unfinished message.
//!
//! Handlers run as futures polled by this task (a `FuturesUnordered`),
//! not as tasks of their own. The periodic commit is polled beside them,
//! never awaited in their way: a broker that does not answer must not hold
//! up a handler's next step, nor an orderly queue's fence.
//!
//! A message is finished when its handler succeeded or it was stored again
//! on the broker (handed back for retry, or dead-lettered). One whose hand
//! back fails (the broker is restarting, unreachable, or lost the record)
//! stays unfinished and is handled here again after a pause, as RocketMQ's
//! push consumer re-consumes locally when `sendMessageBack` fails; it is
//! never dropped, so the committed offset never passes it. The other
//! messages of the queue go on meanwhile. (Orderly consumers hand a message
//! back only to the dead-letter topic, after the maximum; before that, and
//! when that fails, they retry in place, holding the queue.)
//!
//! The read position follows the broker's answer, backwards too (a queue
//! cut short by a power cut; see `pull_step`).

use std::collections::{BTreeMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use tokio_util::sync::CancellationToken;
use txmq_protocol::{
    CommitOffset, ErrorCode, PullRequest, QueryOffset, QueueOwner, SendBack, StoredMessage,
    PROPERTY_RECONSUME_TIMES,
};

use super::{lock, ConsumeResult, DeliveryMode, MessageHandler, QueueId, Shared};
use crate::consumer::offsets::start_offset;
use crate::consumer::pull_step::{self, Pulled, Trail};
use crate::consumer::{unconfirmed_commit, ConsumeFrom, ReceivedMessage};
use crate::{Error, Result};

const MIN_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// The queue's positions.
#[derive(Debug, Default)]
struct Progress {
    /// Offsets pulled and not finished (handed to a handler or waiting for
    /// one), each with how many such messages it holds: after the queue was
    /// cut short and written again, a new message may be pulled at the
    /// offset of an old one still being handled.
    unfinished: BTreeMap<u64, u32>,
    /// How many messages `unfinished` counts.
    count: usize,
    /// Bytes of their bodies.
    bytes: usize,
    /// Where the next pull starts.
    next: u64,
    /// The offset last committed (or known committed).
    committed: Option<u64>,
    /// How many times `committed` was forgotten (the queue was cut short):
    /// a commit that was under way then must not mark its offset committed.
    forgotten: u64,
}

impl Progress {
    fn new(next: u64, committed: Option<u64>) -> Progress {
        Progress {
            next,
            committed,
            ..Progress::default()
        }
    }

    /// Where the group may safely stand: the first unfinished message, or
    /// where the next pull starts when that is lower (everything pulled is
    /// finished, or the queue was cut short below what is being handled).
    fn committable(&self) -> u64 {
        self.unfinished
            .first_key_value()
            .map_or(self.next, |(o, _)| (*o).min(self.next))
    }

    fn started(&mut self, offset: u64, bytes: usize) {
        *self.unfinished.entry(offset).or_default() += 1;
        self.count += 1;
        self.bytes += bytes;
    }

    fn finished(&mut self, offset: u64, bytes: usize) {
        if let Some(n) = self.unfinished.get_mut(&offset) {
            *n -= 1;
            if *n == 0 {
                self.unfinished.remove(&offset);
            }
            self.count -= 1;
            self.bytes -= bytes;
        }
    }

    /// The broker answered a pull at `self.next` with `next`.
    fn pulled_to(&mut self, next: u64) {
        if next < self.next && self.committed.is_some_and(|c| c > next) {
            // The queue was cut short: what the broker holds now as the
            // group's offset is not known, so the next commit stores ours.
            self.committed = None;
            self.forgotten += 1;
        }
        self.next = next;
    }
}

pub(crate) async fn run<H: MessageHandler>(
    shared: Arc<Shared<H>>,
    key: Arc<QueueId>,
    release: CancellationToken,
    expired: CancellationToken,
) {
    let outcome = tokio::select! {
        r = consume(&shared, &key, &release, &expired) => r,
        _ = shared.cancel.cancelled() => Ok(()),
    };
    if let Err(e) = outcome {
        tracing::warn!(group = %shared.group, broker = %key.broker_name, topic = %key.topic, queue = key.queue, error = %crate::error::chain(&e), "queue worker stopped");
    }
    {
        let mut workers = lock(&shared.workers);
        workers.remove(&key);
        shared
            .released
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }
    // Tell the brokers at once that the queue is free.
    shared.rebalance.notify_one();
}

/// Where the member starts on `key`: the offset, the group's committed
/// offset, and the topic generation the broker named (`None` for a
/// broadcasting member going on from its own position).
async fn start<H>(shared: &Shared<H>, key: &QueueId) -> Result<(u64, Option<u64>, Option<u64>)> {
    if shared.settings.broadcast {
        if let Some(o) = lock(&shared.local_offsets).get(key) {
            return Ok((*o, Some(*o), None));
        }
    }
    let target = shared.connect(&key.broker_name).await?;
    // A retry topic is always read from its start: a message handed back
    // before this member first looked must not be skipped.
    let from = if key.topic.starts_with(txmq_protocol::RETRY_TOPIC_PREFIX) {
        ConsumeFrom::First
    } else {
        shared.settings.from
    };
    // "From last" is "stored since the consumer started", also on a queue
    // assigned later (a broker added or back, a rebalance, a topic made
    // again): its end then skipped what came meanwhile, for good.
    let stored_since_ms = (from == ConsumeFrom::Last).then_some(shared.started_ms);
    let q = target
        .conn
        .call(QueryOffset {
            group: shared.group.clone(),
            topic: key.topic.clone(),
            queue: key.queue,
            stored_since_ms,
        })
        .await
        .map_err(|e| Error::at_broker(&key.broker_name, &target.addr, e))?;
    let committed = if shared.settings.broadcast {
        None
    } else {
        q.committed
    };
    let from = start_offset(committed, q.min_offset, q.max_offset, from, q.since_offset);
    Ok((from, committed, Some(q.topic_generation)))
}

async fn consume<H: MessageHandler>(
    shared: &Arc<Shared<H>>,
    key: &Arc<QueueId>,
    release: &CancellationToken,
    expired: &CancellationToken,
) -> Result<()> {
    let settings = &shared.settings;
    let mut backoff = MIN_BACKOFF;
    let (first, committed, generation) = loop {
        match start(shared, key).await {
            Ok(s) => break s,
            Err(e) => {
                tracing::warn!(broker = %key.broker_name, topic = %key.topic, queue = key.queue, error = %crate::error::chain(&e), "cannot ask where the group stands; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = release.cancelled() => return Ok(()),
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    };
    let mut progress = Progress::new(first, committed);
    // A group without an offset here fixes where it starts.
    if committed.is_none()
        && commit(shared, key, &mut progress, generation).await == Committed::NotOwner
    {
        return Ok(());
    }
    let sub = shared.sub(&key.topic).cloned();
    let filter = sub.as_ref().map(|s| s.hashes.clone()).unwrap_or_default();
    let mut handling = FuturesUnordered::new();
    // Orderly: pulled messages waiting for their turn.
    let mut waiting: VecDeque<StoredMessage> = VecDeque::new();
    let mut pulling = None;
    let mut pull_delay = Duration::ZERO;
    let mut released = false;
    let mut lost = false;
    let mut drain_deadline = None;
    // Looked up before each pull and at each tick; between lookups an
    // orderly start compares the clock with the deadline found then.
    let mut cut_off = false;
    let mut fence_at = None;
    // The tick's commit runs beside the handlers, so that a broker that
    // does not answer stalls neither them nor the fence.
    let mut committing = None;
    // The first pull is checked against the topic the start was asked of.
    let mut trail = generation.map_or_else(Trail::default, Trail::of_generation);
    let mut tick = tokio::time::interval(settings.commit_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let room = progress.count < settings.max_queued_messages
            && progress.bytes < settings.max_queued_bytes
            && progress.next.saturating_sub(progress.committable()) < settings.max_span;
        if pulling.is_none() && !released && room && !cut_off {
            pulling = Some(Box::pin(pull(
                shared,
                key,
                progress.next,
                filter.clone(),
                pull_delay,
                trail,
            )));
        }
        if settings.orderly && handling.is_empty() && !waiting.is_empty() && !cut_off {
            // An orderly queue must not start a message once the broker may
            // have given the queue away.
            if fence_at.is_some_and(|at| std::time::Instant::now() >= at) {
                fence_at = refresh_fence(shared, key, &mut cut_off);
            }
        }
        if settings.orderly && handling.is_empty() && !cut_off {
            if let Some(m) = waiting.pop_front() {
                handling.push(handle(shared, key, m, release, expired));
            }
        }
        if released && handling.is_empty() {
            break;
        }
        tokio::select! {
            pulled = async { pulling.as_mut().expect("guarded").await }, if pulling.is_some() => {
                pulling = None;
                fence_at = refresh_fence(shared, key, &mut cut_off);
                match pulled {
                    Ok(r) => {
                        trail = r.trail;
                        pull_delay = r.pause();
                        backoff = MIN_BACKOFF;
                        if settings.mode == DeliveryMode::AtMostOnce && !r.messages.is_empty() {
                            // Commit first: whatever happens next, none of
                            // these comes again. Not committed: not handled
                            // (pulled again after a pause).
                            let mut ahead = Progress::new(r.next_offset, progress.committed);
                            match commit(shared, key, &mut ahead, trail.generation()).await {
                                Committed::Yes => progress.committed = ahead.committed,
                                // On the master (not on enough slaves yet):
                                // never commit a lower position after it.
                                Committed::Unconfirmed => {
                                    progress.committed = Some(ahead.committable())
                                }
                                Committed::NotOwner => break,
                                Committed::Failed => {
                                    pull_delay = backoff;
                                    backoff = (backoff * 2).min(MAX_BACKOFF);
                                    continue;
                                }
                            }
                        }
                        for m in r.messages {
                            if !sub.as_ref().is_none_or(|s| s.matches(m.message.tag.as_deref())) {
                                continue;
                            }
                            progress.started(m.queue_offset, m.message.body.len());
                            if settings.orderly {
                                waiting.push_back(m);
                            } else {
                                handling.push(handle(shared, key, m, release, expired));
                            }
                        }
                        progress.pulled_to(r.next_offset);
                    }
                    Err(e) if not_owner(&e) => {
                        tracing::info!(broker = %key.broker_name, topic = %key.topic, queue = key.queue, "the queue moved to another member; giving it up");
                        lost = true;
                        break;
                    }
                    Err(e) if topic_gone(&e) => {
                        // Its positions went with it: a commit of this
                        // worker's would land in the topic made again
                        // under the same name, past its first messages.
                        tracing::info!(broker = %key.broker_name, topic = %key.topic, queue = key.queue, "the topic is gone (deleted); giving the queue up without committing");
                        lost = true;
                        break;
                    }
                    Err(e) if e.code() == Some(ErrorCode::HeartbeatRequired) => {
                        // The broker restarted or the connection was new: it
                        // asked this member to heartbeat, which is under way.
                        tracing::debug!(broker = %key.broker_name, topic = %key.topic, queue = key.queue, "the broker waits for a heartbeat; pulling again shortly");
                        pull_delay = MIN_BACKOFF;
                    }
                    Err(e) => {
                        tracing::warn!(broker = %key.broker_name, topic = %key.topic, queue = key.queue, error = %crate::error::chain(&e), "pull failed; retrying");
                        pull_delay = backoff;
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                }
            }
            Some(done) = handling.next(), if !handling.is_empty() => {
                // Not done: left unstarted (or between attempts) as the
                // queue is given up, so the next owner handles it.
                if let Some((offset, bytes)) = done {
                    progress.finished(offset, bytes);
                }
            }
            _ = tick.tick() => {
                fence_at = refresh_fence(shared, key, &mut cut_off);
                let offset = progress.committable();
                // Cut off, the broker may have given the queue away, and
                // its new reader read past this position: wait for the
                // next answered heartbeat (which says whether it did).
                if committing.is_none()
                    && !cut_off
                    && !expired.is_cancelled()
                    && progress.committed.is_none_or(|c| c < offset)
                {
                    let forgotten = progress.forgotten;
                    let generation = trail.generation();
                    committing = Some(Box::pin(async move {
                        (offset, forgotten, store_offset(shared, key, offset, generation).await)
                    }));
                }
            }
            (offset, forgotten, done) = async { committing.as_mut().expect("guarded").await }, if committing.is_some() => {
                committing = None;
                match done {
                    Committed::Yes if forgotten == progress.forgotten => {
                        progress.committed = Some(progress.committed.map_or(offset, |c| c.max(offset)));
                    }
                    Committed::NotOwner => {
                        lost = true;
                        break;
                    }
                    _ => {}
                }
            }
            () = expired.cancelled() => {
                lost = true;
                break;
            }
            _ = release.cancelled(), if !released => {
                released = true;
                pulling = None;
                waiting.clear();
                drain_deadline = Some(tokio::time::Instant::now() + settings.drain_timeout);
            }
            _ = tokio::time::sleep_until(drain_deadline.unwrap_or_else(tokio::time::Instant::now)), if drain_deadline.is_some() => {
                if shared.shutting_down.load(std::sync::atomic::Ordering::Acquire) {
                    // The application stops the consumer and chose how long
                    // to wait: nothing to warn of (what was not finished is
                    // not committed, and comes again).
                    tracing::info!(broker = %key.broker_name, topic = %key.topic, queue = key.queue, unfinished = progress.count, "shutting down: handlers unfinished after the drain timeout are given up; their messages come again");
                } else {
                    tracing::warn!(broker = %key.broker_name, topic = %key.topic, queue = key.queue, unfinished = progress.count, "handlers did not finish within the drain timeout; giving the queue up without them");
                }
                break;
            }
        }
    }
    if lost {
        // Another member reads it now: committing would only move its
        // position back.
        return Ok(());
    }
    // The final commit is what lets the next owner start where this one
    // stopped: retry it for a while before giving up.
    let deadline = tokio::time::Instant::now() + settings.drain_timeout.max(Duration::from_secs(1));
    loop {
        match commit(shared, key, &mut progress, trail.generation()).await {
            // Unconfirmed: the master holds it; its slaves get it from the master.
            Committed::Yes | Committed::NotOwner | Committed::Unconfirmed => return Ok(()),
            Committed::Failed if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(MIN_BACKOFF).await;
            }
            Committed::Failed => {
                shared
                    .commit_failures
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return Ok(());
            }
        }
    }
}

/// What a commit did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Committed {
    /// Stored (or nothing to store).
    Yes,
    /// Not stored; try again later.
    Failed,
    /// Refused: the queue belongs to another member now, or its topic is
    /// gone (deleted, maybe made again: new queues, new positions).
    NotOwner,
    /// Stored on the master, but too few of its slaves confirmed it (sync
    /// replication): committed again at the next tick.
    Unconfirmed,
}

/// Looks the fence up: sets `cut_off`, logs a change, and returns when the
/// fence falls if no heartbeat is answered before then.
fn refresh_fence<H>(
    shared: &Shared<H>,
    key: &QueueId,
    cut_off: &mut bool,
) -> Option<std::time::Instant> {
    let at = fence_at(shared, &key.broker_name);
    let now = at.is_some_and(|at| std::time::Instant::now() >= at);
    if now == *cut_off {
        return at;
    }
    *cut_off = now;
    if now {
        tracing::warn!(group = %shared.group, broker = %key.broker_name, topic = %key.topic, queue = key.queue,
            "no heartbeat answered by the broker for two thirds of its consumer expiry: pausing the queue, which another member may own soon");
    } else {
        tracing::info!(group = %shared.group, broker = %key.broker_name, topic = %key.topic, queue = key.queue, "the broker answers heartbeats again: the queue goes on");
    }
    at
}

/// When this member must stop taking new messages of a queue of `broker`
/// (`None`: never, so far): two thirds of the broker's consumer expiry
/// after the last heartbeat it answered was sent, since from then on it may
/// expire this member and give the queue to another one any moment (a
/// member cut off from its broker keeps running). Handlers already running
/// finish. As RocketMQ's orderly consumer lets its queue lock lapse on the
/// client before the broker's.
fn fence_at<H>(shared: &Shared<H>, broker: &str) -> Option<std::time::Instant> {
    if shared.settings.broadcast {
        return None;
    }
    let expiry = shared
        .broker_expiry_ms
        .load(std::sync::atomic::Ordering::Relaxed);
    if expiry == 0 {
        return None;
    }
    shared
        .answered
        .get(broker)
        .map(|sent| *sent + Duration::from_millis(expiry * 2 / 3))
}

/// How often a message waiting for the fence to lift looks again.
const FENCE_POLL: Duration = Duration::from_millis(20);

fn not_owner(e: &Error) -> bool {
    e.code() == Some(ErrorCode::QueueNotOwned)
}

/// The topic was deleted: its queues and the group's positions in them
/// are gone (a topic made again under its name starts from offset 0).
fn topic_gone(e: &Error) -> bool {
    e.code() == Some(ErrorCode::UnknownTopic)
}

/// Who this member is when it reads a queue assigned to it (none when broadcasting).
fn owner<H>(shared: &Shared<H>) -> Option<QueueOwner> {
    (!shared.settings.broadcast).then(|| QueueOwner {
        group: shared.group.clone(),
        client_id: shared.client_id.clone(),
    })
}

/// Stores the queue's safe position if it moved. Failures are logged; the
/// next commit tries again.
/// `generation`: the topic it was read from (the trail's), `None` before
/// the first pull.
async fn commit<H>(
    shared: &Shared<H>,
    key: &QueueId,
    progress: &mut Progress,
    generation: Option<u64>,
) -> Committed {
    let offset = progress.committable();
    if progress.committed.is_some_and(|c| c >= offset) {
        return Committed::Yes;
    }
    let done = store_offset(shared, key, offset, generation).await;
    if done == Committed::Yes {
        progress.committed = Some(offset);
    }
    done
}

/// Stores `offset` as the group's position in the queue (here only when
/// broadcasting). Failures are logged.
async fn store_offset<H>(
    shared: &Shared<H>,
    key: &QueueId,
    offset: u64,
    generation: Option<u64>,
) -> Committed {
    if shared.settings.broadcast {
        lock(&shared.local_offsets).insert(key.clone(), offset);
        return Committed::Yes;
    }
    let result = async {
        let target = shared.connect(&key.broker_name).await?;
        target
            .conn
            .call(CommitOffset {
                group: shared.group.clone(),
                topic: key.topic.clone(),
                queue: key.queue,
                offset,
                owner: owner(shared),
                forward_only: false,
                topic_generation: generation,
            })
            .await
            .map_err(|e| Error::at_broker(&key.broker_name, &target.addr, e))
    }
    .await;
    match result {
        Ok(_) => Committed::Yes,
        Err(e) if not_owner(&e) || topic_gone(&e) => Committed::NotOwner,
        Err(e) if e.remoting().is_some_and(unconfirmed_commit) => {
            // Stored on the master, not yet on enough of its slaves: not
            // marked committed, so the next tick stores it again.
            tracing::debug!(broker = %key.broker_name, topic = %key.topic, queue = key.queue, offset, error = %e, "commit stored on the master only; committing again next tick");
            Committed::Unconfirmed
        }
        Err(e) if e.is_not_master() => {
            // A fenced master (the controller elected another): the next
            // tick commits at the master a fresh route names.
            tracing::info!(broker = %key.broker_name, topic = %key.topic, queue = key.queue, offset, error = %crate::error::chain(&e), "commit refused by a broker that is no longer master; refreshing the route");
            if let Ok(info) = shared.routes.refresh(&key.topic).await {
                for b in &info.route.brokers {
                    shared.brokers.update(b);
                }
            }
            Committed::Failed
        }
        Err(e) => {
            tracing::warn!(broker = %key.broker_name, topic = %key.topic, queue = key.queue, offset, error = %crate::error::chain(&e), "commit failed; will retry");
            Committed::Failed
        }
    }
}

async fn pull<H>(
    shared: &Shared<H>,
    key: &QueueId,
    offset: u64,
    tag_filter: Vec<u64>,
    delay: Duration,
    trail: Trail,
) -> Result<Pulled> {
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let settings = &shared.settings;
    let target = shared.connect(&key.broker_name).await?;
    let request = PullRequest {
        topic: key.topic.clone(),
        queue: key.queue,
        offset,
        max_messages: settings.batch_size,
        max_wait_ms: u64::try_from(settings.max_wait.as_millis()).unwrap_or(u64::MAX),
        tag_filter,
        owner: owner(shared),
        epoch: 0,
        after: None,
        browse: false,
    };
    let timeout = settings.max_wait + settings.request_timeout;
    pull_step::pull(
        &target.conn,
        target.slave,
        &key.broker_name,
        &shared.group,
        request,
        timeout,
        trail,
    )
    .await
    .map_err(|e| Error::at_broker(&key.broker_name, &target.addr, e))
}

/// Runs the handler on one message until it is done with: succeeded,
/// handed back for retry (or dead-lettered), or retried in place.
/// Returns its offset and body size; `None` when the queue was given up
/// (`release`) before the handler started on it, or while it waited to
/// try again: the message is left unfinished for the queue's next owner
/// (except at most once, where its offset is committed already).
async fn handle<H: MessageHandler>(
    shared: &Shared<H>,
    key: &QueueId,
    stored: StoredMessage,
    release: &CancellationToken,
    expired: &CancellationToken,
) -> Option<(u64, usize)> {
    let offset = stored.queue_offset;
    let bytes = stored.message.body.len();
    // A retry shows the topic it was sent to (`ReceivedMessage::topic`).
    let mut message = ReceivedMessage {
        broker_name: key.broker_name.clone(),
        stored,
    };
    let settings = &shared.settings;
    // Only the first failed hand-back of the message is a warning.
    let mut handed_back_failed = false;
    // At most once, a message pulled is committed: it is handled here or
    // never.
    let leave = settings.mode != DeliveryMode::AtMostOnce;
    loop {
        let result = {
            let _permit = loop {
                let permit = tokio::select! {
                    biased;
                    () = release.cancelled(), if leave => return None,
                    // Another member may have handled it: never started here.
                    () = expired.cancelled() => return None,
                    permit = shared.permits.acquire() => permit,
                };
                // Not started while the broker may have given the queue
                // away (no heartbeat answered lately): the next answer
                // says whether it did. The slot waits for it too.
                if fence_at(shared, &key.broker_name)
                    .is_none_or(|at| std::time::Instant::now() < at)
                {
                    break permit;
                }
                drop(permit);
                tokio::select! {
                    biased;
                    () = expired.cancelled() => return None,
                    () = release.cancelled(), if leave => return None,
                    () = tokio::time::sleep(FENCE_POLL) => {}
                }
            };
            match AssertUnwindSafe(shared.handler.handle(&message))
                .catch_unwind()
                .await
            {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => {
                    tracing::info!(msg_id = %message.msg_id(), error = %crate::error::chain(&*e), "handler failed; retrying the message");
                    ConsumeResult::retry()
                }
                Err(_) => {
                    tracing::warn!(msg_id = %message.msg_id(), "handler panicked; retrying the message");
                    ConsumeResult::retry()
                }
            }
        };
        let delay = match result {
            ConsumeResult::Success => return Some((offset, bytes)),
            ConsumeResult::Retry { .. } if settings.mode == DeliveryMode::AtMostOnce => {
                tracing::info!(msg_id = %message.msg_id(), "at most once: a message asked to be retried is dropped");
                return Some((offset, bytes));
            }
            ConsumeResult::Retry { delay } => delay,
        };
        let attempts = message.reconsume_times();
        let exhausted = attempts >= settings.max_reconsume_times;
        let pause = if settings.broadcast {
            if exhausted {
                tracing::warn!(msg_id = %message.msg_id(), attempts, "broadcast message failed too often; dropped");
                return Some((offset, bytes));
            }
            delay.unwrap_or(settings.local_retry_delay)
        } else if settings.orderly && !exhausted {
            // Retried in place, holding the queue.
            delay.unwrap_or(settings.local_retry_delay)
        } else {
            // Handed back for a retry, or past the maximum (local attempts
            // count too; the broker applies the same limit to its own count)
            // dead-lettered, after which an orderly queue moves on.
            let delay = if settings.orderly { None } else { delay };
            match send_back(shared, key, &message, delay, exhausted).await {
                Ok(()) => return Some((offset, bytes)),
                Err(e) => {
                    // Not finished: it keeps the committed offset below it
                    // until it is handled or stored again. Handled here
                    // again, as RocketMQ's consumers do, rather than only
                    // retrying the hand-back: a record the broker no longer
                    // has can never be handed back.
                    let cause = e.remoting().map(ToString::to_string).unwrap_or_default();
                    if handed_back_failed {
                        tracing::debug!(msg_id = %message.msg_id(), attempts, dead_letter = exhausted, error = %e, %cause, "cannot hand the message back again; handling it here again after a pause");
                    } else {
                        tracing::warn!(msg_id = %message.msg_id(), attempts, dead_letter = exhausted, error = %e, %cause, "cannot hand the message back; handling it here again after a pause (it stays unfinished until handled or stored again)");
                    }
                    handed_back_failed = true;
                }
            }
            settings.local_retry_delay
        };
        message
            .stored
            .message
            .properties
            .insert(PROPERTY_RECONSUME_TIMES.into(), (attempts + 1).to_string());
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = release.cancelled(), if leave => return None,
        }
    }
}

async fn send_back<H>(
    shared: &Shared<H>,
    key: &QueueId,
    message: &ReceivedMessage,
    delay: Option<Duration>,
    dead_letter: bool,
) -> Result<()> {
    let target = shared.connect(&key.broker_name).await?;
    let (addr, conn) = (&target.addr, &target.conn);
    let mut request = SendBack {
        group: shared.group.clone(),
        log_offset: message.stored.log_offset,
        delay_ms: delay.map(|d| d.as_millis() as u64),
        max_reconsume_times: shared.settings.max_reconsume_times,
        dead_letter,
        msg_id: Some(message.stored.message.msg_id),
        message: None,
    };
    let sent = match conn.call(request.clone()).await {
        Err(e) if e.remote().is_some_and(|w| w.code == ErrorCode::OffsetOutOfRange) => {
            // Its record is gone, or the log was cut short and another
            // message stands there now: hand back this copy instead.
            tracing::info!(msg_id = %message.msg_id(), error = %crate::error::chain(&e), "the message's record is gone from the broker; handing back the copy received");
            request.message = Some(Box::new(message.stored.clone()));
            conn.call(request).await
        }
        other => other,
    }
    .map_err(|e| Error::at_broker(&key.broker_name, addr, e))?;
    tracing::debug!(msg_id = %message.msg_id(), topic = %sent.topic, attempt = sent.reconsume_times, "handed back");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_commit_position_stops_at_the_first_unfinished_message() {
        let mut p = Progress::new(0, Some(0));
        for o in 0..3 {
            p.started(o, 10);
        }
        p.pulled_to(3);
        p.finished(1, 10);
        p.finished(2, 10);
        // 0 is still being handled (or retried here): the group stays at it.
        assert_eq!(p.committable(), 0);
        assert_eq!((p.count, p.bytes), (1, 10));
        p.finished(0, 10);
        assert_eq!(p.committable(), 3);
        assert_eq!((p.count, p.bytes), (0, 0));
    }

    #[test]
    fn a_queue_cut_short_moves_the_positions_back() {
        let mut p = Progress::new(0, Some(0));
        for o in 0..8 {
            p.started(o, 1);
        }
        p.pulled_to(8);
        for o in 0..5 {
            p.finished(o, 1);
        }
        p.committed = Some(5);
        // The broker lost offsets 3.. and the group's offset is 3 there:
        // the reader goes back to 3, and 5..8 of the lost history are still
        // being handled.
        p.pulled_to(3);
        assert_eq!(p.next, 3);
        assert_eq!(p.committable(), 3, "not past what the broker has");
        assert_eq!(p.committed, None, "the broker's offset is not known now");
        // A new message at offset 5 while the old one is still handled:
        // both are counted, and the position waits for both.
        p.started(3, 1);
        p.started(4, 1);
        p.started(5, 1);
        p.pulled_to(6);
        p.finished(3, 1);
        p.finished(4, 1);
        p.finished(5, 1);
        assert_eq!(p.committable(), 5);
        p.finished(5, 1);
        assert_eq!(p.committable(), 6);
        p.finished(6, 1);
        p.finished(7, 1);
        assert_eq!((p.count, p.bytes), (0, 0));
    }
}
