//! `ResendDeadLetters`: an operator re-sends a consumer group's dead
//! letters (`%DLQ%<group>`) to their original topic (or another one), with
//! the reconsume count reset, and each is recorded as re-sent (see
//! `crate::dead_letters`) so that a second `--all` re-sends nothing new.
//!
//! A letter is recorded once it was appended: a crash in between may let
//! a later `--all` send it again (at least once, never lost). The answer
//! waits, as a send's does, until the copies are flushed (sync flush) and
//! held by the in-sync replicas (sync replication); if they are not in
//! time the request fails with the letters already recorded, and says so.

use std::collections::{BTreeMap, HashSet};

use txmq_protocol::{
    dlq_topic, now_millis, DeadLettersResent, ErrorCode, Message, MsgId, ResendDeadLetters,
    ResentLetter, StoredMessage, WireError, PROPERTY_DELIVER_AT, PROPERTY_REAL_QUEUE,
    PROPERTY_REAL_TOPIC, PROPERTY_REPORTED_ORIGIN,
};

use super::{bad_argument, offset::validate_group, store_error, unknown_topic};
use crate::BrokerInner;

/// Why a letter handed back from a consumer's own copy does not go back
/// to the topic it names (see `PROPERTY_REPORTED_ORIGIN`).
const REPORTED: &str = "its original topic was reported by a consumer (its record was gone), not recorded by the broker";

/// Dead letters read from the log per round.
const BATCH: usize = 256;
/// At most this many letters re-sent by one request (`--all` again sends the rest).
const MAX_PER_REQUEST: usize = 10_000;

/// Every letter still stored in the group's dead-letter topic on this broker.
fn dead_letters(b: &BrokerInner, topic: &str) -> Result<Vec<StoredMessage>, WireError> {
    let Some(config) = b.topics.get(topic) else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for queue in 0..config.queues {
        let Some((mut offset, max)) = b.store.queue_bounds(topic, queue) else {
            continue;
        };
        while offset < max {
            let read = b
                .store
                .read(topic, queue, offset, BATCH, 4 << 20)
                .map_err(store_error)?;
            if read.next_offset <= offset {
                break;
            }
            offset = read.next_offset;
            out.extend(read.messages);
        }
    }
    Ok(out)
}

pub(super) async fn resend(
    b: &BrokerInner,
    req: ResendDeadLetters,
) -> Result<DeadLettersResent, WireError> {
    validate_group(&req.group)?;
    if req.all != req.msg_ids.is_empty() {
        return Err(bad_argument(
            "name the dead letters to re-send (msg ids) or ask for all of them, not both",
        ));
    }
    if let Some(refusal) = b.replication.write_refusal(b) {
        return Err(refusal);
    }
    if let Some(to) = &req.to {
        txmq_protocol::validate_topic_name(to).map_err(bad_argument)?;
        // A letter re-sent there would be a letter again, without the
        // topic it came from (a retry topic's messages go to one group).
        if crate::topics::is_group_topic(to) {
            return Err(bad_argument(format!(
                "cannot re-send dead letters to {to}: a retry or dead-letter topic; name the topic the group consumes"
            )));
        }
    }
    let dlq = dlq_topic(&req.group);
    // One resend at a time: two at once could both send a letter.
    let _one = b.resent.busy.lock().await;
    let letters = dead_letters(b, &dlq)?;
    let mut answer = DeadLettersResent {
        broker_name: b.config.broker_name.clone(),
        dead_letters: letters.len() as u64,
        ..DeadLettersResent::default()
    };
    let wanted: HashSet<MsgId> = req.msg_ids.iter().copied().collect();
    let mut seen = HashSet::new();
    // Per msg id: its letters not re-sent yet, and the last one re-sent.
    let mut fresh: Vec<StoredMessage> = Vec::new();
    let mut resent_before: BTreeMap<MsgId, StoredMessage> = BTreeMap::new();
    for letter in letters {
        let id = letter.message.msg_id;
        if !req.all && !wanted.contains(&id) {
            continue;
        }
        seen.insert(id);
        if b.resent.was_resent(&req.group, letter.log_offset) {
            resent_before.insert(id, letter);
        } else {
            fresh.push(letter);
        }
    }
    let fresh_ids: HashSet<MsgId> = fresh.iter().map(|l| l.message.msg_id).collect();
    let mut chosen = fresh;
    for (id, letter) in resent_before {
        if fresh_ids.contains(&id) {
            continue;
        }
        if req.force && !req.all {
            chosen.push(letter);
        } else {
            answer.already.push(id);
        }
    }
    if req.all && req.to.is_none() {
        // A letter that cannot go back where it came from (it does not
        // say where, or that topic is gone) stays, and the others go: the
        // operator re-sends it by id with a topic to send it to. Left out
        // before the cap, so such letters never hold up the rest.
        chosen.retain(|l| {
            let why = match l.message.properties.get(PROPERTY_REAL_TOPIC) {
                _ if l.message.properties.contains_key(PROPERTY_REPORTED_ORIGIN) => {
                    REPORTED.to_string()
                }
                None => "it does not say its original topic".to_string(),
                Some(t) if b.topics.get(t).is_none() => {
                    format!("its original topic '{t}' does not exist on this broker")
                }
                Some(_) => return true,
            };
            tracing::info!(group = %req.group, msg_id = %l.message.msg_id, reason = %why, "dead letter left in place");
            answer.left.push((l.message.msg_id, why));
            false
        });
    }
    chosen.truncate(MAX_PER_REQUEST);
    // A topic named to re-send to is taken as a send's would be: writable,
    // made on first use where brokers make topics (only once there is a
    // letter to put in it).
    let mut created = None;
    if let Some(to) = req.to.as_deref().filter(|_| !chosen.is_empty()) {
        created = super::writable_queue(b, to, 0)?;
    }
    answer.not_found = req
        .msg_ids
        .iter()
        .filter(|id| !seen.contains(id))
        .copied()
        .collect();
    // Group by (target topic, queue) to append each queue's letters at once.
    let mut by_queue: BTreeMap<(String, u32), Vec<(u64, Message)>> = BTreeMap::new();
    for letter in chosen {
        let pos = letter.log_offset;
        let mut m = letter.message;
        let original = m.properties.get(PROPERTY_REAL_TOPIC).cloned();
        if req.to.is_none() && m.properties.contains_key(PROPERTY_REPORTED_ORIGIN) {
            return Err(bad_argument(format!(
                "dead letter {}: {REPORTED}; name the topic to re-send it to with --to",
                m.msg_id
            )));
        }
        let Some(target) = req.to.clone().or(original) else {
            return Err(bad_argument(format!(
                "dead letter {} does not say its original topic ({PROPERTY_REAL_TOPIC}); name one with --to",
                m.msg_id
            )));
        };
        let Some(config) = b.topics.get(&target) else {
            let mut e = unknown_topic(b, &target);
            e.message
                .push_str("; name another topic to re-send to with --to");
            return Err(e);
        };
        let real_queue = m
            .properties
            .get(PROPERTY_REAL_QUEUE)
            .and_then(|q| q.parse::<u32>().ok())
            .filter(|q| *q < config.queues && req.to.is_none());
        let queue = real_queue.unwrap_or_else(|| {
            (txmq_protocol::fnv1a(&m.msg_id.0) % u64::from(config.queues.max(1))) as u32
        });
        super::drop_broker_properties(&mut m);
        m.properties.remove(PROPERTY_DELIVER_AT);
        m.topic = target.clone();
        by_queue.entry((target, queue)).or_default().push((pos, m));
    }
    let mut durable = true;
    for ((topic, queue), letters) in by_queue {
        let ids: Vec<(u64, MsgId)> = letters.iter().map(|(p, m)| (*p, m.msg_id)).collect();
        let bytes = letters.iter().map(|(_, m)| m.body.len()).sum();
        let messages: Vec<Message> = letters.into_iter().map(|(_, m)| m).collect();
        let appended = b
            .store
            .append(&topic, queue, messages)
            .await
            .map_err(store_error)?;
        durable &= appended.durable;
        // Stored in the topic as a send's messages are: counted alike.
        b.metrics.messages_in(&topic, ids.len(), bytes);
        b.resent
            .record(&req.group, &ids, now_millis())
            .map_err(|e| WireError::new(ErrorCode::StoreUnavailable, e))?;
        for (i, (_, msg_id)) in ids.into_iter().enumerate() {
            answer.resent.push(ResentLetter {
                msg_id,
                topic: topic.clone(),
                queue,
                queue_offset: appended.first_offset + i as u64,
            });
        }
        tracing::info!(group = %req.group, %topic, queue, "dead letters re-sent");
    }
    if let Some(version) = created {
        super::topic::registered(b, version).await;
    }
    // Under sync replication, answered once the replicas hold the copies
    // (as a send is): a failover must not lose a letter recorded as resent.
    if !durable {
        return Err(WireError::new(
            ErrorCode::Timeout,
            format!(
                "the re-sent copies of {} dead letter(s) were not flushed to disk in time (recorded as resent: see them with txmq msg show, or resend again with --force)",
                answer.resent.len()
            ),
        ));
    }
    if !answer.resent.is_empty() {
        b.replication
            .confirm(b.store.log_end())
            .await
            .into_result(&format!(
                "the re-sent copies of {} dead letter(s) (recorded as resent: see them with txmq msg show, or resend again with --force)",
                answer.resent.len()
            ))?;
    }
    Ok(answer)
}
