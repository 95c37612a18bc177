//! SendMessage and EndTransaction.
//!
//! RocketMQ 5 clients leave the queue to the server: a message with a
//! message group goes to the queue its group hashes to (so a group's
//! messages keep their order), any other to the next queue round robin. A
//! transactional message is a prepare of one half message whose producer
//! group is the topic: RocketMQ 5 producers name no group, and the ones
//! publishing the topic are the ones to check back with.
//!
//! An answer's `offset` is the message's queue offset, or [`NO_OFFSET`]
//! for a message that has none yet: a delayed one gets its offset when it
//! is delivered, a transactional one when it is committed.

use std::sync::atomic::Ordering;

use txmq_protocol::{
    now_millis, EndTransaction, HalfMessage, PrepareTransaction, SendRequest, TxAction,
    TxResolution, TxSource, WireError, PROPERTY_DELIVER_AT,
};

use super::convert::{self, message_group};
use super::{pb, status, Front};
use crate::handler::front;

/// The `offset` of a send's answer when the message has no queue offset
/// yet (`txmq send` prints `offset=-` then, JSON `null`; RocketMQ's field
/// is a plain integer, and 0 is a real offset).
const NO_OFFSET: i64 = -1;

pub(super) async fn send(f: &Front, r: pb::SendMessageRequest) -> pb::SendMessageResponse {
    if r.messages.is_empty() {
        return pb::SendMessageResponse {
            status: Some(status::new(
                pb::Code::BadRequest,
                "a send needs at least one message",
            )),
            entries: Vec::new(),
        };
    }
    // As RocketMQ's proxy: the clients send one topic per request (their
    // batches are checked so), so another is a corrupt request.
    let topic = |m: &pb::Message| m.topic.as_ref().map(|t| t.name.clone()).unwrap_or_default();
    let first = topic(&r.messages[0]);
    if let Some(other) = r.messages.iter().map(topic).find(|t| *t != first) {
        return pb::SendMessageResponse {
            status: Some(status::new(
                pb::Code::MessageCorrupted,
                format!(
                    "all messages of one send must have the same topic; found '{first}' and '{other}'"
                ),
            )),
            entries: Vec::new(),
        };
    }
    let mut entries = Vec::with_capacity(r.messages.len());
    for m in r.messages {
        let id = m
            .system_properties
            .as_ref()
            .map(|s| s.message_id.clone())
            .unwrap_or_default();
        let entry = match send_one(f, m).await {
            Ok(entry) => entry,
            Err(status) => pb::SendResultEntry {
                status: Some(status),
                message_id: id,
                ..Default::default()
            },
        };
        entries.push(entry);
    }
    // One status for the request: the entries' own when they agree.
    let first = entries[0].status.clone();
    let status = if entries.iter().all(|e| e.status == first) {
        first
    } else {
        Some(status::new(
            pb::Code::MultipleResults,
            "the messages had different results; see each entry",
        ))
    };
    pb::SendMessageResponse { status, entries }
}

async fn send_one(f: &Front, m: pb::Message) -> Result<pb::SendResultEntry, pb::Status> {
    let b = &f.b;
    let wire = |e: WireError| status::from_wire(&e);
    if let Some(refusal) = b.replication.write_refusal(b) {
        return Err(wire(refusal));
    }
    let sys = m.system_properties.clone().unwrap_or_default();
    let group = message_group(&m).map(str::to_string);
    let transactional = sys.message_type == pb::MessageType::Transaction as i32;
    // Named as a route query names it.
    let topic = m
        .topic
        .as_ref()
        .map(|t| t.name.as_str())
        .unwrap_or_default();
    txmq_protocol::validate_topic_name(topic)
        .map_err(|e| status::new(pb::Code::IllegalTopic, e))?;
    let message = convert::to_txmq(m)?;
    if message.body.is_empty() {
        return Err(status::new(
            pb::Code::MessageBodyEmpty,
            "a message needs a body",
        ));
    }
    let config = front::topic(b, &message.topic).await.map_err(wire)?;
    let queue = match &group {
        // Stable across restarts and brokers of any build: a group's
        // messages always land in one queue.
        Some(g) => crc32fast::hash(g.as_bytes()) % config.queues,
        None => f.next_queue.fetch_add(1, Ordering::Relaxed) % config.queues,
    };
    let message_id = sys.message_id;
    if transactional {
        if group.is_some() || message.properties.contains_key(PROPERTY_DELIVER_AT) {
            return Err(status::new(
                pb::Code::MessagePropertyConflictWithType,
                "a transactional message cannot have a message group or a delivery time",
            ));
        }
        let first_check_delay_ms = sys
            .orphaned_transaction_recovery_duration
            .as_ref()
            .and_then(convert::std_duration)
            .map(|d| d.as_millis() as u64);
        let prepared = front::prepare(
            b.clone(),
            PrepareTransaction {
                producer_group: message.topic.clone(),
                messages: vec![HalfMessage { queue, message }],
                first_check_delay_ms,
                attempt: None,
                producer: None,
                offsets: Vec::new(),
            },
        )
        .await
        .map_err(wire)?;
        return Ok(pb::SendResultEntry {
            status: Some(status::from_send(prepared.status)),
            message_id,
            transaction_id: prepared.tx_id.to_string(),
            offset: NO_OFFSET,
            recall_handle: String::new(),
        });
    }
    // Delayed, its answer holds its place in the delay index, not a queue
    // offset. Judged before the send: a time that passes meanwhile (the
    // broker stores the message as any other then) costs a known offset,
    // never gives a wrong one.
    let delayed = message
        .properties
        .get(PROPERTY_DELIVER_AT)
        .and_then(|at| at.parse::<u64>().ok())
        .is_some_and(|at| at > now_millis());
    let sent = front::send(
        b,
        SendRequest {
            queue,
            messages: vec![message],
            producer: None,
        },
    )
    .await
    .map_err(wire)?;
    Ok(pb::SendResultEntry {
        status: Some(status::from_send(sent.status)),
        message_id,
        transaction_id: String::new(),
        offset: if delayed {
            NO_OFFSET
        } else {
            i64::try_from(sent.first_offset).unwrap_or(NO_OFFSET)
        },
        recall_handle: String::new(),
    })
}

pub(super) async fn end_transaction(
    f: &Front,
    client: Option<String>,
    r: pb::EndTransactionRequest,
) -> pb::EndTransactionResponse {
    let answer = |status| pb::EndTransactionResponse {
        status: Some(status),
    };
    let Ok(tx_id) = r.transaction_id.parse::<u64>() else {
        return answer(status::new(
            pb::Code::InvalidTransactionId,
            format!(
                "'{}' is not a transaction id of this broker",
                r.transaction_id
            ),
        ));
    };
    let resolution = match pb::TransactionResolution::try_from(r.resolution) {
        Ok(pb::TransactionResolution::Commit) => TxResolution::Commit,
        Ok(pb::TransactionResolution::Rollback) => TxResolution::Rollback,
        _ => TxResolution::Unknown,
    };
    // The answer to a check-back this broker is waiting for: the check
    // ends the transaction (and records that a check-back ended it). A
    // checker that does not know yet answers with no resolution (the
    // Python client sends UNSPECIFIED for UNKNOWN): checked again later.
    if r.source == pb::TransactionSource::SourceServerCheck as i32
        && f.sessions.answer(client.as_deref(), tx_id, resolution)
    {
        return answer(status::ok());
    }
    let action = match resolution {
        TxResolution::Commit => TxAction::Commit,
        TxResolution::Rollback => TxAction::Rollback,
        TxResolution::Unknown => {
            return answer(status::new(
                pb::Code::BadRequest,
                "the resolution must be COMMIT or ROLLBACK",
            ))
        }
    };
    if let Some(refusal) = f.b.replication.write_refusal(&f.b) {
        return answer(status::from_wire(&refusal));
    }
    let (msg_id, _) = convert::msg_id(&r.message_id);
    let ended = front::end(
        f.b.clone(),
        EndTransaction {
            tx_id,
            action,
            source: TxSource::Producer,
            msg_id: (!r.message_id.is_empty()).then_some(msg_id),
            producer: None,
        },
    )
    .await;
    match ended {
        Ok(e) => answer(status::from_send(e.status)),
        Err(e) => answer(status::from_wire(&e)),
    }
}
