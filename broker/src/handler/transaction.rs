//! Transactions: prepare, end (commit or roll back), list.

use txmq_protocol::{
    validate_topic_name, EndTransaction, Ended, ErrorCode, ListTransactions, PrepareTransaction,
    Prepared, SendStatus, TransactionList, WireError, PERM_READ_WRITE, PERM_WRITE,
    PROPERTY_DELIVER_AT,
};

use super::{bad_argument, check_queue, topic};
use crate::BrokerInner;

/// At most this many messages in one transaction.
const MAX_MESSAGES: usize = 1024;

pub(super) async fn prepare(
    b: &BrokerInner,
    req: PrepareTransaction,
) -> Result<Prepared, WireError> {
    if req.producer_group.is_empty() || req.producer_group.len() > 255 {
        return Err(bad_argument("producer group must be 1 to 255 bytes long"));
    }
    if req.messages.is_empty() || req.messages.len() > MAX_MESSAGES {
        return Err(bad_argument(format!(
            "a transaction holds 1 to {MAX_MESSAGES} messages"
        )));
    }
    for half in &req.messages {
        let name = &half.message.topic;
        validate_topic_name(name).map_err(bad_argument)?;
        let config = match b.topics.get(name) {
            Some(c) => c,
            None if b.config.auto_create_topics => {
                topic::create_topic(b, name, b.config.default_queues, PERM_READ_WRITE, false)
                    .await?
            }
            None => return Err(super::unknown_topic(b, name)),
        };
        if config.perm & PERM_WRITE == 0 {
            return Err(WireError::new(
                ErrorCode::NoPermission,
                format!(
                    "topic '{name}' is not writable on broker {}",
                    b.config.broker_name
                ),
            ));
        }
        check_queue(&config, half.queue)?;
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
    let messages = req
        .messages
        .into_iter()
        .map(|h| (h.queue, h.message))
        .collect();
    let (tx_id, status, duplicate) = b
        .transactions
        .prepare(
            &req.producer_group,
            req.first_check_delay_ms,
            req.attempt,
            messages,
            req.producer,
        )
        .await?;
    Ok(Prepared {
        duplicate,
        tx_id,
        status: replicated(b, status).await,
    })
}

pub(super) async fn end(b: &BrokerInner, req: EndTransaction) -> Result<Ended, WireError> {
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

pub(super) fn list(b: &BrokerInner, _req: ListTransactions) -> TransactionList {
    b.transactions.list()
}
