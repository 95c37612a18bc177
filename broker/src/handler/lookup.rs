//! Message lookup: by id (`LookupMessage`), by topic and key
//! (`FindMessages`), by queue offset (`GetMessages`). The store's message
//! index finds the records; this file says what became of each message.

use txmq_protocol::{
    ErrorCode, FindMessages, FoundMessage, FoundMessages, GetMessages, GroupConsumption,
    LookupMessage, MessageState, WireError, LOOKUP_MAX,
};

use super::{existing_queue, store_error, unknown_topic};
use crate::store::record::{Record, RecordKind};
use crate::store::Found;
use crate::BrokerInner;

/// An answer stops growing past this many bytes of bodies (the frame limit
/// is 8 MiB); it always holds at least one message.
const MAX_BODY_BYTES: usize = 4 << 20;

/// Records of one id looked at, at most (a message, its half, its commit
/// copy, retried copies, markers).
const MAX_RECORDS_BY_ID: usize = 64;

fn answer(b: &BrokerInner, messages: Vec<FoundMessage>) -> FoundMessages {
    FoundMessages {
        broker_name: b.config.broker_name.clone(),
        messages,
        min_offset: None,
        max_offset: None,
    }
}

/// The state and tx id of a visible or delayed record.
fn visible_state(r: &Record) -> (MessageState, Option<u64>) {
    match r.kind {
        RecordKind::Delayed => (MessageState::Delayed, None),
        _ if r.is_commit_copy() => (MessageState::Committed, Some(r.aux)),
        _ => (MessageState::Normal, None),
    }
}

/// What became of the transaction of a half message, given the other
/// records of its id: committed (a commit copy), parked or pending (the
/// store still keeps its halves), else rolled back.
fn half_state(b: &BrokerInner, half: &Found, others: &[Found]) -> MessageState {
    let tx = half.record.aux;
    if others
        .iter()
        .any(|f| f.record.is_commit_copy() && f.record.aux == tx)
    {
        return MessageState::Committed;
    }
    let pending = others.iter().chain(std::iter::once(half)).any(|f| {
        f.record.kind == RecordKind::Half && f.record.aux == tx && b.store.is_pending_half(f.pos)
    });
    if pending {
        let parked = others
            .iter()
            .any(|f| f.record.kind == RecordKind::TxPark && f.record.aux == tx)
            || half.record.message.properties.contains_key("__txmq.parked");
        return if parked {
            MessageState::HalfParked
        } else {
            MessageState::HalfPending
        };
    }
    MessageState::RolledBack
}

fn found_message(f: Found, state: MessageState, tx_id: Option<u64>) -> FoundMessage {
    let queue_offset = match f.record.kind {
        RecordKind::Message | RecordKind::DelayedCopy => Some(f.record.queue_offset),
        _ => None,
    };
    FoundMessage {
        queue: f.record.queue,
        queue_offset,
        log_offset: f.pos,
        size: f.size,
        store_timestamp: f.record.store_timestamp,
        state,
        tx_id,
        groups: Vec::new(),
        message: f.record.message,
    }
}

/// A delayed message as found: delivered (a normal message at its place
/// in its queue) once its delay ended, else still delayed; `None` when a
/// delivered copy of it is among `found` (that copy shows it).
fn delayed_message(b: &BrokerInner, f: &Found, found: &[Found]) -> Option<FoundMessage> {
    // A consumer's retries of one message keep its id: only the copy made
    // from this very record shows it.
    let copied = found.iter().any(|c| {
        c.record.kind == RecordKind::DelayedCopy
            && c.record.message.msg_id == f.record.message.msg_id
            && b.store.copied_from(&c.record) == Some(f.pos)
    });
    if copied {
        return None;
    }
    // A lookup that cannot read the index shows it as stored.
    match b
        .store
        .delivered_at(f.pos, f.record.store_timestamp)
        .ok()
        .flatten()
    {
        Some((queue, offset)) => {
            let mut m = found_message(f.clone(), MessageState::Normal, None);
            m.queue = queue;
            m.queue_offset = Some(offset);
            Some(m)
        }
        None => Some(found_message(f.clone(), MessageState::Delayed, None)),
    }
}

/// Whether each consumer group with an offset on the message's topic has
/// consumed it.
fn consumption(b: &BrokerInner, m: &FoundMessage) -> Vec<GroupConsumption> {
    let Some(offset) = m.queue_offset else {
        return Vec::new();
    };
    b.store
        .committed_groups()
        .into_iter()
        .filter(|(_, topic)| *topic == m.message.topic)
        .map(|(group, topic)| {
            let committed = super::offset::committed(b, &group, &topic, m.queue);
            GroupConsumption {
                consumed: committed.is_some_and(|c| c > offset),
                committed_offset: committed,
                group,
            }
        })
        .collect()
}

/// The messages among `found` (newest first): a transaction shows once,
/// as its commit copy when committed, else as its newest half message.
fn messages_of(b: &BrokerInner, found: Vec<Found>, with_groups: bool) -> Vec<FoundMessage> {
    let mut out: Vec<FoundMessage> = Vec::new();
    let mut txs_shown = Vec::new();
    for f in &found {
        match f.record.kind {
            RecordKind::Delayed => {
                if let Some(m) = delayed_message(b, f, &found) {
                    out.push(m);
                }
            }
            RecordKind::Message | RecordKind::DelayedCopy => {
                let (state, tx) = visible_state(&f.record);
                if let Some(tx) = tx {
                    txs_shown.push(tx);
                }
                out.push(found_message(f.clone(), state, tx));
            }
            RecordKind::Half => {
                let tx = f.record.aux;
                if txs_shown.contains(&tx) {
                    continue;
                }
                let state = half_state(b, f, &found);
                if state == MessageState::Committed {
                    // Shown as its commit copy.
                    continue;
                }
                txs_shown.push(tx);
                out.push(found_message(f.clone(), state, Some(tx)));
            }
            // Records that name a message without being one: a rollback,
            // a check-back sent, a park, an operator's recheck. They say
            // what became of a half message (`half_state`), no more.
            _ => continue,
        }
    }
    if with_groups {
        for m in &mut out {
            m.groups = consumption(b, m);
        }
    }
    bounded(out)
}

/// Cuts `messages` to the answer's byte budget (keeping at least one).
fn bounded(mut messages: Vec<FoundMessage>) -> Vec<FoundMessage> {
    let mut bytes = 0;
    let keep = messages
        .iter()
        .take_while(|m| {
            bytes += m.message.body.len();
            bytes <= MAX_BODY_BYTES
        })
        .count()
        .max(1)
        .min(messages.len());
    messages.truncate(keep);
    messages
}

/// Lookups by id or key need the message index: a broker without one
/// cannot say (`UNSUPPORTED_REQUEST`), which is not "not here".
fn check_index(b: &BrokerInner) -> Result<(), WireError> {
    if b.store.has_index() {
        return Ok(());
    }
    Err(WireError::new(
        ErrorCode::UnsupportedRequest,
        format!(
            "broker {} keeps no message index (--message-index false): it cannot look messages up by id or key",
            b.config.broker_name
        ),
    ))
}

pub(super) fn by_id(b: &BrokerInner, r: LookupMessage) -> Result<FoundMessages, WireError> {
    check_index(b)?;
    let found = b
        .store
        .find_by_id(&r.msg_id, MAX_RECORDS_BY_ID)
        .map_err(store_error)?;
    let mut messages = messages_of(b, found, true);
    // Internal records of the broker's own topics are not the user's.
    messages.retain(|m| !m.message.topic.starts_with("%DELAY%"));
    Ok(answer(b, messages))
}

pub(super) fn by_key(b: &BrokerInner, r: FindMessages) -> Result<FoundMessages, WireError> {
    if b.topics.get(&r.topic).is_none() {
        return Err(unknown_topic(b, &r.topic));
    }
    check_index(b)?;
    if r.key.is_empty() || r.key.contains(' ') {
        return Err(super::bad_argument(
            "a key to find is one non-empty word (a message's key property may hold several, separated by spaces)",
        ));
    }
    let since = r.since_ms.unwrap_or(0);
    let until = r.until_ms.unwrap_or(u64::MAX);
    if since > until {
        return Err(super::bad_argument(format!(
            "the time range is empty: since {since} ms is after until {until} ms"
        )));
    }
    let max = r.max.clamp(1, LOOKUP_MAX) as usize;
    let found = b
        .store
        .find_by_key(&r.topic, &r.key, since, until, max)
        .map_err(store_error)?;
    // A half message's fate is named by the other records of its id.
    let mut resolved = Vec::with_capacity(found.len());
    for f in &found {
        if f.record.kind == RecordKind::Delayed {
            resolved.extend(delayed_message(b, f, &found));
            continue;
        }
        let f = f.clone();
        if f.record.kind == RecordKind::Half {
            let others = b
                .store
                .find_by_id(&f.record.message.msg_id, MAX_RECORDS_BY_ID)
                .map_err(store_error)?;
            let state = half_state(b, &f, &others);
            if state == MessageState::Committed {
                // Its commit copy carries the same key: found already.
                continue;
            }
            let tx = f.record.aux;
            resolved.push(found_message(f, state, Some(tx)));
        } else {
            let (state, tx) = visible_state(&f.record);
            resolved.push(found_message(f, state, tx));
        }
    }
    Ok(answer(b, bounded(resolved)))
}

pub(super) fn by_offset(b: &BrokerInner, r: GetMessages) -> Result<FoundMessages, WireError> {
    existing_queue(b, &r.topic, r.queue)?;
    let (min, max) = b
        .store
        .queue_bounds(&r.topic, r.queue)
        .ok_or_else(|| unknown_topic(b, &r.topic))?;
    if r.offset >= max || r.offset < min {
        return Err(WireError::new(
            ErrorCode::OffsetOutOfRange,
            format!(
                "offset {} is outside queue {} of '{}' on broker {}: it holds offsets {min}..{max} (max offset {max})",
                r.offset, r.queue, r.topic, b.config.broker_name
            ),
        ));
    }
    let count = r.count.clamp(1, LOOKUP_MAX) as usize;
    let found = b
        .store
        .read_found(&r.topic, r.queue, r.offset, count)
        .map_err(store_error)?;
    let messages = found
        .into_iter()
        .map(|(offset, f)| {
            // What a queue holds is delivered: a delayed message's record
            // there is its delivery (its own queue and offset are its
            // delay level's).
            let (state, tx) = match f.record.kind {
                RecordKind::Delayed => (MessageState::Normal, None),
                _ => visible_state(&f.record),
            };
            let mut m = found_message(f, state, tx);
            m.queue = r.queue;
            m.queue_offset = Some(offset);
            m
        })
        .collect();
    let mut a = answer(b, bounded(messages));
    a.min_offset = Some(min);
    a.max_offset = Some(max);
    Ok(a)
}
