//! Transactions: prepare, end (commit or roll back), list.

use txmq_protocol::{
    validate_topic_name, EndTransaction, Ended, ErrorCode, ListTransactions, PrepareTransaction,
    Prepared, SendStatus, TransactionList, TxOffset, WireError, PROPERTY_DELIVER_AT,
};

use super::{bad_argument, topic};
use crate::transaction::{parse_delay, PROP_USER_CHECK_DELAY};
use crate::BrokerInner;

/// At most this many messages in one transaction.
const MAX_MESSAGES: usize = 1024;
/// At most this many consumer offsets in one transaction (they travel in
/// one property of the first half message, at most 64 KiB).
const MAX_OFFSETS: usize = 64;

/// Checks a prepare's consumer offsets: queues of this broker (a
/// transaction commits atomically on one broker only), offsets within
/// their queue, an offset not behind the one it expects, each queue once.
fn check_offsets(b: &BrokerInner, offsets: &[TxOffset]) -> Result<(), WireError> {
    if offsets.len() > MAX_OFFSETS {
        return Err(bad_argument(format!(
            "a transaction commits at most {MAX_OFFSETS} consumer offsets, not {}",
            offsets.len()
        )));
    }
    let broker = &b.config.broker_name;
    let mut seen = std::collections::HashSet::new();
    for o in offsets {
        super::offset::validate_group(&o.group)?;
        let here = b.topics.get(&o.topic).is_some_and(|c| o.queue < c.queues);
        let queue = b.store.queue(&o.topic, o.queue).filter(|_| here);
        let Some(queue) = queue else {
            return Err(bad_argument(format!(
                "transaction offset of group '{}': queue {} of topic '{}' is not on broker {broker}; \
                 a transaction commits offsets of its own broker's queues only",
                o.group, o.queue, o.topic
            )));
        };
        if o.offset > queue.max_offset() {
            return Err(WireError::new(
                ErrorCode::OffsetOutOfRange,
                format!(
                    "transaction offset of group '{}': offset {} is past the end of queue {} of '{}' ({})",
                    o.group,
                    o.offset,
                    o.queue,
                    o.topic,
                    queue.max_offset()
                ),
            ));
        }
        if o.expected.is_some_and(|e| o.offset < e) {
            return Err(bad_argument(format!(
                "transaction offset of group '{}' on queue {} of '{}': offset {} is behind the expected {}",
                o.group,
                o.queue,
                o.topic,
                o.offset,
                o.expected.unwrap_or_default()
            )));
        }
        if !seen.insert((&o.group, &o.topic, o.queue)) {
            return Err(bad_argument(format!(
                "transaction offsets name queue {} of '{}' twice for group '{}'",
                o.queue, o.topic, o.group
            )));
        }
    }
    Ok(())
}

/// A first check-back delay no further ahead than a delayed message may go.
fn check_first_delay(b: &BrokerInner, ms: u64) -> Result<(), WireError> {
    if ms > b.config.max_delay.as_millis() as u64 {
        return Err(bad_argument(format!(
            "first check delay {} is longer than the broker's --max-delay ({})",
            humantime::format_duration(std::time::Duration::from_millis(ms)),
            humantime::format_duration(b.config.max_delay)
        )));
    }
    Ok(())
}

pub(super) async fn prepare(
    b: &BrokerInner,
    mut req: PrepareTransaction,
) -> Result<Prepared, WireError> {
    if req.producer_group.is_empty() || req.producer_group.len() > 255 {
        return Err(bad_argument("producer group must be 1 to 255 bytes long"));
    }
    if req.messages.is_empty() || req.messages.len() > MAX_MESSAGES {
        return Err(bad_argument(format!(
            "a transaction holds 1 to {MAX_MESSAGES} messages"
        )));
    }
    // A first check as far ahead as a delayed message may go, no further:
    // a transaction whose producer never answers must still be checked
    // back (or parked) within the operator's lifetime.
    if let Some(ms) = req.first_check_delay_ms {
        check_first_delay(b, ms)?;
    }
    // So does a message's own (its property, as gRPC clients set it); one
    // that is not a duration is refused rather than left to the default.
    for half in &req.messages {
        let m = &half.message;
        if let Some(delay) = m.properties.get(PROP_USER_CHECK_DELAY) {
            let ms = parse_delay(delay).ok_or_else(|| {
                bad_argument(format!(
                    "message {}: property {PROP_USER_CHECK_DELAY} '{delay}' is not a duration \
                     (milliseconds, or e.g. 500ms, 2s, 1m)",
                    m.msg_id
                ))
            })?;
            check_first_delay(b, ms)?;
        }
    }
    req.messages
        .iter_mut()
        .for_each(|half| super::drop_broker_properties(&mut half.message));
    // Auto-created topics are waited for after the prepare, as in a send.
    let mut created = None;
    for half in &req.messages {
        let name = &half.message.topic;
        validate_topic_name(name).map_err(bad_argument)?;
        created = created.max(super::writable_queue(b, name, half.queue)?);
        // Refused rather than dropped: a transactional message becomes
        // visible when it is committed (as in RocketMQ).
        if half.message.properties.contains_key(PROPERTY_DELIVER_AT) {
            return Err(bad_argument(format!(
                "message {} has a delivery time: transactional messages cannot be delayed; \
                 they become visible when committed",
                half.message.msg_id
            )));
        }
    }
    check_offsets(b, &req.offsets)?;
    let messages = req
        .messages
        .into_iter()
        .map(|h| (h.queue, h.message))
        .collect();
    let (tx_id, status, duplicate) = b
        .transactions
        .prepare_with_offsets(
            &req.producer_group,
            req.first_check_delay_ms,
            req.attempt,
            messages,
            req.producer,
            &req.offsets,
        )
        .await?;
    if let Some(version) = created {
        topic::registered(b, version).await;
    }
    Ok(Prepared {
        duplicate,
        tx_id,
        status: replicated(b, status).await,
    })
}

pub(super) async fn end(b: &BrokerInner, req: EndTransaction) -> Result<Ended, WireError> {
    let _timer = crate::metrics::Timer::start(&b.metrics.end_latency);
    if let Some(stamp) = &req.producer {
        // The prepare's stamp names the transaction (a producer id is never
        // handed out twice): a tx id whose halves another request wrote (a
        // position reused after a power cut) is not this transaction.
        // Unreadable (carried past retention): the msg id decides.
        if let Some(stored) = b.store.stamp_at(req.tx_id) {
            let same = stored.is_some_and(|s| {
                s.producer_id == stamp.producer_id && s.sequence == stamp.sequence
            });
            if !same {
                return Err(WireError::new(
                    ErrorCode::UnknownTransaction,
                    format!(
                        "transaction {} on broker {} is not the one prepared by producer id {} \
                         with sequence {}",
                        req.tx_id, b.config.broker_name, stamp.producer_id, stamp.sequence
                    ),
                ));
            }
        }
    }
    let mut ended = b
        .transactions
        .end(req.tx_id, req.action, req.source, req.msg_id)
        .await?;
    ended.status = replicated(b, ended.status).await;
    Ok(ended)
}

/// Under sync replication, the status once replicas hold what was written
/// (up to the log's end now, which covers this request's records, and for
/// a repeated request the first one's).
async fn replicated(b: &BrokerInner, status: SendStatus) -> SendStatus {
    let confirmed = b.replication.confirm(b.store.log_end()).await;
    match status {
        SendStatus::SendOk => confirmed.status(true),
        other => other,
    }
}

pub(super) fn list(b: &BrokerInner, req: ListTransactions) -> TransactionList {
    b.transactions.list(&req)
}

pub(super) fn show(
    b: &BrokerInner,
    req: txmq_protocol::ShowTransaction,
) -> Result<txmq_protocol::TxDetail, WireError> {
    b.transactions.show(req.tx_id)
}

pub(super) async fn recheck(
    b: &BrokerInner,
    req: txmq_protocol::RecheckTransaction,
) -> Result<txmq_protocol::Rechecked, WireError> {
    if let Some(refusal) = b.replication.write_refusal(b) {
        return Err(refusal);
    }
    b.transactions.recheck(req.tx_id).await
}
