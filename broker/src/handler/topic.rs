//! Topics: create (or grow), list.

use txmq_protocol::{
    validate_topic_name, CreateTopic, ErrorCode, TopicConfig, TopicList, TopicOnBroker, WireError,
    PERM_READ_WRITE,
};

use super::{bad_argument, store_error};
use crate::BrokerInner;

pub(super) async fn create(b: &BrokerInner, req: CreateTopic) -> Result<TopicConfig, WireError> {
    create_topic(b, &req.topic, req.queues, req.perm, true).await
}

/// Creates `name` with `queues` queues, or grows an existing topic to that
/// many; `explicit` requests may also change the permission. Persists the
/// table, creates the queues, and re-registers with the nameservers at once.
pub(super) async fn create_topic(
    b: &BrokerInner,
    name: &str,
    queues: u32,
    perm: u8,
    explicit: bool,
) -> Result<TopicConfig, WireError> {
    let (config, version) = create_topic_now(b, name, queues, perm, explicit)?;
    if let Some(version) = version {
        registered(b, version).await;
    }
    Ok(config)
}

/// [`create_topic`] without waiting for the nameservers: the topic's
/// config, and the topics' version to wait for ([`registered`]) when it
/// changed. A send that auto-creates its topic appends first and waits
/// after, so that sends behind it on its connection cannot overtake it
/// (an idempotent producer's next sequence would arrive first).
pub(crate) fn create_topic_now(
    b: &BrokerInner,
    name: &str,
    queues: u32,
    perm: u8,
    explicit: bool,
) -> Result<(TopicConfig, Option<u64>), WireError> {
    validate_topic_name(name).map_err(bad_argument)?;
    if name == crate::store::DELAY_TOPIC {
        return Err(bad_argument(format!(
            "topic name {name:?} is reserved for the broker's delay index"
        )));
    }
    if queues == 0 || queues > 1024 {
        return Err(bad_argument(format!(
            "queue count {queues} is out of range; use 1 to 1024"
        )));
    }
    if perm & !PERM_READ_WRITE != 0 {
        return Err(bad_argument(format!(
            "permission {perm} is not a combination of read (4) and write (2)"
        )));
    }
    let (config, changed) = b.topics.upsert(name, |existing, count| {
        let config = match existing {
            // Retry and dead-letter topics have a bound of their own, of
            // the same size: groups cannot crowd out topics, nor the
            // reverse.
            None if count >= b.config.max_topics => {
                tracing::warn!(topic = name, max = b.config.max_topics, "topic refused: --max-topics reached");
                Err(WireError::new(
                    ErrorCode::TooManyTopics,
                    format!(
                        "broker {} holds its maximum of {} topics (--max-topics); topic '{name}' was not created",
                        b.config.broker_name, b.config.max_topics
                    ),
                ))
            }
            None => Ok(TopicConfig {
                name: name.to_string(),
                queues,
                perm,
            }),
            Some(old) if !explicit => Ok(old.clone()),
            Some(old) if queues < old.queues => Err(bad_argument(format!(
                "topic '{name}' has {} queues; the queue count cannot shrink",
                old.queues
            ))),
            Some(_) => Ok(TopicConfig {
                name: name.to_string(),
                queues,
                perm,
            }),
        }?;
        // The store's queues before the topic is seen: a send on another
        // thread that finds the topic finds its queues too (it got
        // UNKNOWN_QUEUE in between).
        b.store
            .ensure_queues(name, config.queues)
            .map_err(store_error)?;
        Ok(config)
    })?;
    if changed {
        tracing::info!(
            topic = name,
            queues = config.queues,
            perm = config.perm,
            "topic created or updated"
        );
        let version = b
            .topics_version
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel)
            + 1;
        b.topics_changed.notify_one();
        // A member reading a topic made write-only stops, and one waiting
        // for a topic made readable (or given more queues) starts, now.
        crate::groups::notify(b.groups.subscribers_of(name));
        return Ok((config, Some(version)));
    }
    Ok((config, None))
}

/// Waits (at most 3 s) until the nameservers know the topics' `version`,
/// so a topic's route is there once its create is answered.
pub(super) async fn registered(b: &BrokerInner, version: u64) {
    let mut registered = b.registered_version.subscribe();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(3),
        registered.wait_for(|v| *v >= version),
    )
    .await;
}

pub(super) fn list(b: &BrokerInner) -> TopicList {
    TopicList {
        topics: b
            .topics
            .all()
            .into_iter()
            .map(|config| TopicOnBroker {
                broker_name: b.config.broker_name.clone(),
                config,
            })
            .collect(),
    }
}

/// A topic's queues on this broker, with their bounds and when each last
/// stored a message.
///
/// # Errors
/// `UNKNOWN_TOPIC`.
pub(super) fn status(
    b: &BrokerInner,
    req: txmq_protocol::GetTopicStatus,
) -> Result<txmq_protocol::TopicStatus, WireError> {
    let config = b
        .topics
        .get(&req.topic)
        .ok_or_else(|| super::unknown_topic(b, &req.topic))?;
    let queues = (0..config.queues)
        .map(|queue| {
            let (min_offset, max_offset) =
                b.store.queue_bounds(&req.topic, queue).unwrap_or((0, 0));
            let last_store_ms = (max_offset > min_offset)
                .then(|| b.store.read(&req.topic, queue, max_offset - 1, 1, 1))
                .and_then(Result::ok)
                .and_then(|r| r.messages.first().map(|m| m.store_timestamp));
            txmq_protocol::QueueStatus {
                queue,
                min_offset,
                max_offset,
                last_store_ms,
            }
        })
        .collect();
    Ok(txmq_protocol::TopicStatus {
        broker_name: b.config.broker_name.clone(),
        topic: req.topic,
        queues,
    })
}

/// Deletes a topic: refused while a transaction with a half message for
/// it is pending, unless `force` (then those are rolled back: their topic
/// is gone); then its configuration (the next registration leaves it
/// out, so the nameservers drop its route), its consume queues and its
/// group offsets, recorded durably so recovery does not bring them back.
///
/// # Errors
/// `UNKNOWN_TOPIC`; `BUSY` with pending transactions; `BAD_ARGUMENT` for
/// the broker's internal topic; store errors.
pub(super) async fn delete(
    b: &BrokerInner,
    req: txmq_protocol::DeleteTopic,
) -> Result<txmq_protocol::TopicDeleted, WireError> {
    let topic = req.topic;
    if topic == crate::store::DELAY_TOPIC {
        return Err(bad_argument(format!(
            "topic {topic:?} is the broker's delay index; it cannot be deleted"
        )));
    }
    if let Some(refusal) = b.replication.write_refusal(b) {
        return Err(refusal);
    }
    let config = b
        .topics
        .get(&topic)
        .ok_or_else(|| super::unknown_topic(b, &topic))?;
    let pending = b.transactions.pending_on_topic(&topic);
    if req.check_only && (req.force || pending.is_empty()) {
        return Ok(txmq_protocol::TopicDeleted {
            broker_name: b.config.broker_name.clone(),
            topic,
            queues: config.queues,
            offsets_removed: 0,
            deleted_below: 0,
        });
    }
    if !pending.is_empty() {
        if !req.force {
            let ids: Vec<String> = pending.iter().take(10).map(u64::to_string).collect();
            return Err(WireError::new(
                ErrorCode::Busy,
                format!(
                    "topic '{topic}' has {} pending transaction{} on broker {} (tx {}{}); resolve them, or delete with --force (rolls them back)",
                    pending.len(),
                    if pending.len() == 1 { "" } else { "s" },
                    b.config.broker_name,
                    ids.join(", "),
                    if pending.len() > ids.len() { ", ..." } else { "" }
                ),
            ));
        }
        for tx_id in pending {
            b.transactions
                .end(
                    tx_id,
                    txmq_protocol::TxAction::Rollback,
                    txmq_protocol::TxSource::Operator,
                    None,
                )
                .await?;
            tracing::warn!(tx_id, %topic, "pending transaction rolled back: its topic is deleted (--force)");
        }
    }
    b.topics.remove(&topic)?;
    let (deleted_below, offsets_removed) =
        b.store.delete_topic(&topic).await.map_err(store_error)?;
    b.metrics.forget_topic(&topic);
    tracing::info!(%topic, deleted_below, offsets_removed, "topic deleted");
    let version = b
        .topics_version
        .fetch_add(1, std::sync::atomic::Ordering::AcqRel)
        + 1;
    b.topics_changed.notify_one();
    // Answer once the nameservers no longer route it.
    let mut registered = b.registered_version.subscribe();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(3),
        registered.wait_for(|v| *v >= version),
    )
    .await;
    Ok(txmq_protocol::TopicDeleted {
        broker_name: b.config.broker_name.clone(),
        topic,
        queues: config.queues,
        offsets_removed,
        deleted_below,
    })
}
