//! The "pop" consumption model of RocketMQ 5's simple consumers, for any
//! consumer group: receive with an invisible time, acknowledge, change the
//! invisible time, forward to the dead-letter topic.
//!
//! A group *receives* up to 32 messages of a topic (one queue, or every
//! queue round robin). Each is hidden from the group until acknowledged or
//! until its invisible time runs out, then delivered again (to any member)
//! with its attempt counted. Every delivery carries a receipt handle; only
//! the handle of the latest delivery of a message acknowledges it or moves
//! its deadline. A delivery whose attempt would exceed the group's maximum
//! goes to the group's dead-letter topic instead (the same `%DLQ%group`
//! topic and metrics as a handed-back message, `handler/group.rs`).
//!
//! The state lives in the store (`store/pop.rs`): every receive,
//! acknowledgement and change is a small commit-log record decided by the
//! single writer, replayed by recovery and by slaves, snapshotted in the
//! checkpoint. Redelivery reads the message again from the log where it
//! is: nothing is copied to a retry topic.
//!
//! A FIFO receive hands out nothing more from a queue while a message of
//! it is in flight and not yet due; once due, that message comes again
//! first: the order per queue is kept.
//!
//! Every answer that changes state is given once its record is durable as
//! the flush mode says, and under a controller with sync replication once
//! the in-sync replicas hold it.

#[cfg(test)]
mod tests;

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::Poll;
use std::time::Duration;

use txmq_protocol::{now_millis, ErrorCode, SendBack, StoredMessage, WireError, PERM_READ};

use crate::handler::{bad_argument, store_error, unknown_topic};
use crate::store::pop::{PopKey, PopPick};
use crate::BrokerInner;

/// Most messages one receive asks for.
pub(crate) const MAX_MESSAGES: u32 = 32;
/// The shortest invisible time.
pub(crate) const MIN_INVISIBLE: Duration = Duration::from_secs(1);
/// The longest invisible time.
pub(crate) const MAX_INVISIBLE: Duration = Duration::from_secs(12 * 3600);
/// The longest a receive waits for messages.
pub(crate) const MAX_POLL: Duration = Duration::from_secs(30);
/// Most tags in one receive's filter.
const MAX_TAGS: usize = 64;
/// Picks of one queue that only pass over filtered-out messages before a
/// receive moves on (each looks at up to 1024 entries).
const MAX_SKIP_ROUNDS: u32 = 64;
/// Receipt handles start with this (the format's version).
const HANDLE_PREFIX: &str = "p1";

/// The broker's pop side: where the next receive over every queue
/// starts, and how many times receives looked at their queues.
#[derive(Debug, Default)]
pub(crate) struct Pop {
    next_start: AtomicUsize,
    /// Looks at the queues (a long poll looks once, then again each time
    /// it wakes up).
    pub(crate) looks: std::sync::atomic::AtomicU64,
}

/// A receive.
#[derive(Debug, Clone)]
pub(crate) struct ReceiveRequest {
    /// The consumer group.
    pub group: String,
    /// The topic.
    pub topic: String,
    /// One queue, or `None`: every queue of the topic, fairly (the start
    /// goes round).
    pub queue: Option<u32>,
    /// 1..=32.
    pub max_messages: u32,
    /// How long a received message stays hidden: 1 s ..= 12 h.
    pub invisible: Duration,
    /// How long to wait for messages when there are none: 0 ..= 30 s.
    pub poll: Duration,
    /// Tag hashes to receive ([`txmq_protocol::tag_hash`]); empty: all.
    /// Messages with other tags are passed over for good by this group.
    pub tags: Vec<u64>,
    /// Keep the order per queue (see the module docs).
    pub fifo: bool,
    /// Delivery attempts before the dead-letter topic (>= 1).
    pub max_attempts: u32,
}

/// A message received.
#[derive(Debug, Clone)]
pub(crate) struct Received {
    /// The message, with its queue and queue offset.
    pub message: StoredMessage,
    /// Its delivery attempt: 1 on the first delivery.
    pub attempt: u32,
    /// The receipt handle of this delivery (printable ASCII, under 64 bytes).
    pub handle: String,
    /// Hidden from the group until then (ms since the Unix epoch, broker clock).
    pub invisible_until_ms: u64,
}

/// Where a receipt handle points: queue, offset, the delivery's receipt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Handle {
    queue: u32,
    offset: u64,
    receipt: u64,
}

impl Handle {
    fn encode(&self) -> String {
        format!(
            "{HANDLE_PREFIX}-{:x}-{:x}-{:x}",
            self.queue, self.offset, self.receipt
        )
    }

    fn parse(s: &str) -> Result<Handle, WireError> {
        let bad = || {
            WireError::new(
                ErrorCode::InvalidReceiptHandle,
                format!(
                    "'{}' is not a receipt handle of this broker",
                    s.chars().take(80).collect::<String>()
                ),
            )
        };
        let mut parts = s.split('-');
        if parts.next() != Some(HANDLE_PREFIX) {
            return Err(bad());
        }
        let mut num = || {
            parts
                .next()
                .filter(|p| !p.is_empty() && p.len() <= 16)
                .and_then(|p| u64::from_str_radix(p, 16).ok())
                .ok_or_else(bad)
        };
        let queue = u32::try_from(num()?).map_err(|_| bad())?;
        let (offset, receipt) = (num()?, num()?);
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(Handle {
            queue,
            offset,
            receipt,
        })
    }
}

fn check_invisible(invisible: Duration) -> Result<(), WireError> {
    if invisible < MIN_INVISIBLE || invisible > MAX_INVISIBLE {
        return Err(bad_argument(format!(
            "the invisible duration must be between {} and {}; {} asked",
            humantime::format_duration(MIN_INVISIBLE),
            humantime::format_duration(MAX_INVISIBLE),
            humantime::format_duration(invisible)
        )));
    }
    Ok(())
}

/// Checks the group, the topic (it exists and is readable) and the
/// queue; returns the topic's queue count.
fn check_place(
    b: &BrokerInner,
    group: &str,
    topic: &str,
    queue: Option<u32>,
) -> Result<u32, WireError> {
    crate::handler::offset::validate_group(group)?;
    let config = b.topics.get(topic).ok_or_else(|| unknown_topic(b, topic))?;
    crate::handler::check_perm(b, &config, PERM_READ)?;
    if let Some(q) = queue {
        crate::handler::check_queue(&config, q)?;
    }
    Ok(config.queues)
}

/// A write is refused on a slave (and on a master a controller fences).
fn check_writable(b: &BrokerInner) -> Result<(), WireError> {
    match b.replication.write_refusal(b) {
        Some(refusal) => Err(refusal),
        None => Ok(()),
    }
}

/// Under a controller with sync replication: waits for the in-sync
/// replicas to hold the log up to `end`.
async fn confirm(b: &BrokerInner, end: u64, what: &str) -> Result<(), WireError> {
    if b.replication.control.is_some() && end > 0 {
        b.replication.confirm(end).await.into_result(what)?;
    }
    Ok(())
}

/// Receives up to `r.max_messages` messages for `r.group`, waiting up to
/// `r.poll` when there are none. Deliveries past `r.max_attempts` go to
/// the group's dead-letter topic instead. Answered once the receive's
/// records are durable (see the module docs); an empty answer after the
/// poll time.
///
/// # Errors
/// UNKNOWN_TOPIC, UNKNOWN_QUEUE, NO_PERMISSION, BAD_ARGUMENT for
/// arguments out of range, NOT_MASTER on a slave, STORE_UNAVAILABLE.
pub(crate) async fn receive(
    b: &BrokerInner,
    r: ReceiveRequest,
) -> Result<Vec<Received>, WireError> {
    check_writable(b)?;
    let queues = check_place(b, &r.group, &r.topic, r.queue)?;
    if r.max_messages == 0 || r.max_messages > MAX_MESSAGES {
        return Err(bad_argument(format!(
            "a receive asks for 1 to {MAX_MESSAGES} messages; {} asked",
            r.max_messages
        )));
    }
    check_invisible(r.invisible)?;
    if r.poll > MAX_POLL {
        return Err(bad_argument(format!(
            "a receive waits at most {}; {} asked",
            humantime::format_duration(MAX_POLL),
            humantime::format_duration(r.poll)
        )));
    }
    if r.max_attempts == 0 {
        return Err(bad_argument("max delivery attempts must be at least 1"));
    }
    if r.tags.len() > MAX_TAGS {
        return Err(bad_argument(format!("at most {MAX_TAGS} tags in a filter")));
    }
    let order: Vec<u32> = match r.queue {
        Some(q) => vec![q],
        None => {
            let start = b.pop.next_start.fetch_add(1, Ordering::Relaxed) % queues.max(1) as usize;
            (0..queues).map(|i| (i + start as u32) % queues).collect()
        }
    };
    let cqs: Vec<_> = order
        .iter()
        .map(|q| {
            b.store
                .queue(&r.topic, *q)
                .ok_or_else(|| unknown_topic(b, &r.topic))
        })
        .collect::<Result<_, _>>()?;
    let deadline = tokio::time::Instant::now() + r.poll;
    loop {
        // Interest registered before looking, so an arrival in between still wakes us.
        let mut arrivals: Vec<_> = cqs
            .iter()
            .map(|cq| {
                let (interest, n) = cq.arrival();
                let mut n = Box::pin(n);
                n.as_mut().enable();
                (interest, n)
            })
            .collect();
        b.pop.looks.fetch_add(1, Ordering::Relaxed);
        let (got, end) = receive_once(b, &r, &order).await?;
        if !got.is_empty() || tokio::time::Instant::now() >= deadline {
            // Done waiting: publishes meanwhile need not wake anyone.
            drop(arrivals);
            confirm(b, end, "the received messages' receipts").await?;
            b.metrics.messages_out(
                &r.topic,
                got.len(),
                got.iter().map(|m| m.message.message.body.len()).sum(),
            );
            return Ok(got);
        }
        // Also woken when a message in flight becomes due again.
        let now = now_millis();
        let due = order
            .iter()
            .filter_map(|q| {
                b.store
                    .pop_next_deadline(&(r.group.clone(), r.topic.clone(), *q), now)
            })
            .min()
            .map(|at| tokio::time::Instant::now() + Duration::from_millis(at.saturating_sub(now)));
        let wake = due.map_or(deadline, |d| d.min(deadline));
        let arrived = std::future::poll_fn(|cx| {
            for (_, n) in arrivals.iter_mut() {
                if n.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(());
                }
            }
            Poll::Pending
        });
        let (limit, mut confirmed) = b.replication.read_limit();
        tokio::select! {
            _ = arrived => {}
            _ = tokio::time::sleep_until(wake) => {}
            _ = async {
                match confirmed.as_mut() {
                    Some(rx) => { let _ = rx.changed().await; }
                    None => std::future::pending().await,
                }
            }, if limit != u64::MAX => {}
            _ = b.shutdown.cancelled() => {
                return Err(WireError::new(ErrorCode::StoreUnavailable, "the broker is shutting down"));
            }
        }
        // Checked again as a new receive would be: the topic may have
        // become write only (or been deleted), or this broker a slave,
        // while this one waited. (Its queues stay those counted at the
        // start: a topic's queues are never fewer.)
        check_writable(b)?;
        check_place(b, &r.group, &r.topic, r.queue)?;
    }
}

/// One look at every queue in `order`: returns what was received and the
/// end of the last record written for it.
async fn receive_once(
    b: &BrokerInner,
    r: &ReceiveRequest,
    order: &[u32],
) -> Result<(Vec<Received>, u64), WireError> {
    let mut got = Vec::new();
    let mut end = 0;
    let (log_limit, _) = b.replication.read_limit();
    for &queue in order {
        let left = r.max_messages.saturating_sub(got.len() as u32);
        if left == 0 {
            break;
        }
        let key: PopKey = (r.group.clone(), r.topic.clone(), queue);
        // A pick that only passed over filtered-out messages (its record
        // moved the group past them) goes on, a bounded number of rounds.
        let mut rounds = 0;
        let (deliveries, appended) = loop {
            let now = now_millis();
            let pick = PopPick {
                key: key.clone(),
                max: left,
                now,
                until: now.saturating_add(r.invisible.as_millis() as u64),
                tags: r.tags.clone(),
                fifo: r.fifo,
                log_limit,
            };
            let (deliveries, appended) = b.store.pop_receive(pick).await.map_err(store_error)?;
            end = end.max(appended.end);
            rounds += 1;
            if !deliveries.is_empty() || appended.end == 0 || rounds >= MAX_SKIP_ROUNDS {
                break (deliveries, appended);
            }
        };
        if deliveries.is_empty() {
            continue;
        }
        let receipt = appended.first_offset;
        let messages = read_offsets(b, &r.topic, queue, deliveries.iter().map(|d| d.offset))?;
        for d in deliveries {
            let handle = Handle {
                queue,
                offset: d.offset,
                receipt,
            };
            let Some(message) = messages.iter().find(|m| m.queue_offset == d.offset) else {
                // Deleted by retention since: nothing left to deliver.
                let a = b
                    .store
                    .pop_ack(key.clone(), d.offset, receipt, false)
                    .await
                    .map_err(store_error)?;
                end = end.max(a.end);
                continue;
            };
            if d.attempt > r.max_attempts {
                // This attempt is not made: the ones before it were.
                let a = dead_letter(
                    b,
                    &key,
                    handle,
                    message,
                    r.max_attempts,
                    d.attempt.saturating_sub(1),
                )
                .await?;
                end = end.max(a);
                continue;
            }
            got.push(Received {
                message: message.clone(),
                attempt: d.attempt,
                handle: handle.encode(),
                invisible_until_ms: d.until,
            });
        }
    }
    Ok((got, end))
}

/// The messages at `offsets` (ascending) of a queue: one read per run of
/// consecutive offsets. Messages deleted by retention are left out.
fn read_offsets(
    b: &BrokerInner,
    topic: &str,
    queue: u32,
    offsets: impl Iterator<Item = u64>,
) -> Result<Vec<StoredMessage>, WireError> {
    let mut sorted: Vec<u64> = offsets.collect();
    sorted.sort_unstable();
    let mut out = Vec::with_capacity(sorted.len());
    let mut i = 0;
    while i < sorted.len() {
        let first = sorted[i];
        let mut n = 1;
        while i + n < sorted.len() && sorted[i + n] == first + n as u64 {
            n += 1;
        }
        let read = b
            .store
            .read(topic, queue, first, n, usize::MAX)
            .map_err(store_error)?;
        out.extend(read.messages);
        i += n;
    }
    Ok(out)
}

/// Copies `message` to the group's dead-letter topic (through the same
/// code as a handed-back message), then acknowledges its delivery as
/// dead. Returns the end of the acknowledgement's record.
/// `delivered`: how many times the group was handed it (its copy's
/// reconsume times say so, as a push consumer's dead letter's do).
async fn dead_letter(
    b: &BrokerInner,
    key: &PopKey,
    handle: Handle,
    message: &StoredMessage,
    max_attempts: u32,
    delivered: u32,
) -> Result<u64, WireError> {
    let back = SendBack {
        group: key.0.clone(),
        log_offset: message.log_offset,
        delay_ms: None,
        max_reconsume_times: max_attempts,
        dead_letter: true,
        msg_id: Some(message.message.msg_id),
        message: None,
    };
    crate::handler::group::send_back_delivered(b, None, back, Some(delivered)).await?;
    let a = b
        .store
        .pop_ack(key.clone(), handle.offset, handle.receipt, true)
        .await
        .map_err(store_error)?;
    Ok(a.end)
}

/// Acknowledges the delivery `handle` names: the message is never
/// delivered to the group again. Answered once the record is durable.
///
/// # Errors
/// INVALID_RECEIPT_HANDLE for a malformed handle or one whose delivery
/// is no longer in flight (acknowledged, or superseded by a newer
/// delivery or change); UNKNOWN_TOPIC, NOT_MASTER, STORE_UNAVAILABLE.
pub(crate) async fn ack(
    b: &BrokerInner,
    group: &str,
    topic: &str,
    handle: &str,
) -> Result<(), WireError> {
    check_writable(b)?;
    let h = Handle::parse(handle)?;
    check_place(b, group, topic, Some(h.queue))?;
    let key = (group.to_string(), topic.to_string(), h.queue);
    let a = b
        .store
        .pop_ack(key, h.offset, h.receipt, false)
        .await
        .map_err(store_error)?;
    confirm(b, a.end, "the acknowledgement").await
}

/// Hides the message `handle` names for `invisible` from now, as a new
/// delivery of the same attempt: returns it with its new handle (the old
/// one is stale from now on) and deadline.
///
/// # Errors
/// As [`ack`], and BAD_ARGUMENT for a duration out of range.
pub(crate) async fn change_invisible(
    b: &BrokerInner,
    group: &str,
    topic: &str,
    handle: &str,
    invisible: Duration,
) -> Result<Received, WireError> {
    check_writable(b)?;
    let h = Handle::parse(handle)?;
    check_place(b, group, topic, Some(h.queue))?;
    check_invisible(invisible)?;
    let key = (group.to_string(), topic.to_string(), h.queue);
    let until = now_millis().saturating_add(invisible.as_millis() as u64);
    let a = b
        .store
        .pop_change(key.clone(), h.offset, h.receipt, until)
        .await
        .map_err(store_error)?;
    confirm(b, a.end, "the change of invisible time").await?;
    // A long poll of the queue sleeps until the earliest deadline it saw:
    // woken, it looks again and sleeps until this one when it is sooner
    // (a push consumer's retry backoff shortens a deadline so).
    if let Some(cq) = b.store.queue(topic, h.queue) {
        cq.wake_polls();
    }
    let new = Handle {
        receipt: a.first_offset,
        ..h
    };
    let attempt = b
        .store
        .pop_queue(&key)
        .and_then(|q| q.in_flight.get(&h.offset).map(|f| f.attempt))
        .unwrap_or(1);
    let message = read_offsets(b, topic, h.queue, std::iter::once(h.offset))?
        .into_iter()
        .next()
        .ok_or_else(|| {
            WireError::new(
                ErrorCode::OffsetOutOfRange,
                format!(
                    "the message at offset {} of {topic}:{} is gone (retention)",
                    h.offset, h.queue
                ),
            )
        })?;
    Ok(Received {
        message,
        attempt,
        handle: new.encode(),
        invisible_until_ms: until,
    })
}

/// Moves the message `handle` names to the group's dead-letter topic now
/// (`max_attempts` as the group's setting, for the copy's reconsume
/// count), then acknowledges it.
///
/// # Errors
/// As [`ack`].
pub(crate) async fn forward_to_dead_letters(
    b: &BrokerInner,
    group: &str,
    topic: &str,
    handle: &str,
    max_attempts: u32,
) -> Result<(), WireError> {
    check_writable(b)?;
    let h = Handle::parse(handle)?;
    check_place(b, group, topic, Some(h.queue))?;
    let key = (group.to_string(), topic.to_string(), h.queue);
    // Checked before the copy is written, so a stale handle copies nothing
    // (the acknowledgement checks again, in the writer).
    let in_flight = b
        .store
        .pop_queue(&key)
        .and_then(|q| q.in_flight.get(&h.offset).copied());
    let delivered = match in_flight {
        Some(f) if f.receipt == h.receipt => f.attempt,
        Some(f) => {
            let stale = crate::store::pop::Stale::Superseded { current: f.receipt };
            return Err(WireError::new(
                ErrorCode::InvalidReceiptHandle,
                crate::store::pop::describe(&stale, &key, h.offset),
            ));
        }
        None => {
            let stale = crate::store::pop::Stale::NotInFlight;
            return Err(WireError::new(
                ErrorCode::InvalidReceiptHandle,
                crate::store::pop::describe(&stale, &key, h.offset),
            ));
        }
    };
    let message = read_offsets(b, topic, h.queue, std::iter::once(h.offset))?
        .into_iter()
        .next();
    let end = match message {
        Some(m) => dead_letter(b, &key, h, &m, max_attempts, delivered).await?,
        None => {
            // Gone by retention: nothing to copy; it leaves the group.
            b.store
                .pop_ack(key, h.offset, h.receipt, true)
                .await
                .map_err(store_error)?
                .end
        }
    };
    confirm(b, end, "the acknowledgement").await
}
