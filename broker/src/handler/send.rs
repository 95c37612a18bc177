//! Send: append one message or a batch to one queue.

use txmq_protocol::{
    now_millis, validate_topic_name, Message, ProducerIdentity, SendRequest, SendResult, WireError,
    PROPERTY_DELIVER_AT,
};

use super::{bad_argument, store_error, topic, writable_queue};
use crate::BrokerInner;

/// `more_coming`: more requests were read with this one, so its write may
/// wait for theirs (see [`crate::store::Store::append_gathering`]).
pub(super) async fn handle(
    b: &BrokerInner,
    mut req: SendRequest,
    more_coming: bool,
) -> Result<SendResult, WireError> {
    let _timer = crate::metrics::Timer::start(&b.metrics.send_latency);
    let Some(first) = req.messages.first() else {
        return Err(bad_argument("a send needs at least one message"));
    };
    let topic_name = first.topic.clone();
    validate_topic_name(&topic_name).map_err(bad_argument)?;
    if let Some(other) = req.messages.iter().find(|m| m.topic != topic_name) {
        return Err(bad_argument(format!(
            "all messages of one send must have the same topic; found '{topic_name}' and '{}'",
            other.topic
        )));
    }
    let created = writable_queue(b, &topic_name, req.queue)?;
    req.messages
        .iter_mut()
        .for_each(super::drop_broker_properties);
    let deliver_at = delivery_time(b, &req.messages)?;
    let msg_ids = req.messages.iter().map(|m| m.msg_id).collect();
    let (count, bytes) = (
        req.messages.len(),
        req.messages.iter().map(|m| m.body.len()).sum(),
    );
    let appended = match deliver_at {
        Some(_) if req.producer.is_some() => {
            // A delayed record is indexed into a delay level, not its queue:
            // it has no place in a queue's sequence yet.
            return Err(bad_argument(
                "a delayed message cannot be sent idempotently; send it without a producer stamp",
            ));
        }
        // Boxed, as the rare waits below: the future of every send holds
        // the largest of its waits in place (see `handler::send_call`).
        Some(at) => {
            Box::pin(
                b.store
                    .append_delayed(&topic_name, req.queue, req.messages, at),
            )
            .await
        }
        None => {
            b.store
                .append_stamped(
                    &topic_name,
                    req.queue,
                    req.messages,
                    req.producer,
                    more_coming,
                )
                .await
        }
    }
    .map_err(store_error)?;
    if let Some(version) = created {
        Box::pin(topic::registered(b, version)).await;
    }
    if !appended.duplicate {
        b.metrics.messages_in(&topic_name, count, bytes);
    }
    let confirmed = b.replication.confirm(appended.end).await;
    Ok(SendResult {
        status: confirmed.status(appended.durable),
        queue: req.queue,
        first_offset: appended.first_offset,
        msg_ids,
        duplicate: appended.duplicate,
    })
}

/// InitProducer: a producer id and its token, known to the broker group
/// once answered (fsynced, and under sync replication held by the in-sync
/// replicas, so a new master knows it too).
pub(super) async fn init_producer(b: &BrokerInner) -> Result<ProducerIdentity, WireError> {
    let epoch = b.replication.epoch();
    let (producer_id, token, appended) = b.store.init_producer(epoch).await.map_err(store_error)?;
    let _ = b.replication.confirm(appended.end).await;
    tracing::debug!(producer_id, "producer id handed out");
    Ok(ProducerIdentity {
        producer_id,
        token,
        expiry_ms: b.config.producer_id_expiry.as_millis() as u64,
    })
}

/// The delivery time of a delayed send ([`PROPERTY_DELIVER_AT`]), `None`
/// when the messages are to be visible now (no time, or a time passed).
/// Every message of a batch must carry the same time.
fn delivery_time(b: &BrokerInner, messages: &[Message]) -> Result<Option<u64>, WireError> {
    let parse = |m: &Message| -> Result<Option<u64>, WireError> {
        m.properties
            .get(PROPERTY_DELIVER_AT)
            .map(|v| {
                v.parse::<u64>().map_err(|_| {
                    bad_argument(format!(
                        "{PROPERTY_DELIVER_AT} must be milliseconds since the Unix epoch; got {v:?}"
                    ))
                })
            })
            .transpose()
    };
    let at = parse(&messages[0])?;
    for m in &messages[1..] {
        if parse(m)? != at {
            return Err(bad_argument(
                "all messages of one send must have the same delivery time",
            ));
        }
    }
    let Some(at) = at else { return Ok(None) };
    let now = now_millis();
    if at <= now {
        return Ok(None);
    }
    let max = b.config.max_delay.as_millis() as u64;
    if at - now > max {
        return Err(bad_argument(format!(
            "delivery time is {} ahead; at most {} allowed",
            humantime::format_duration(std::time::Duration::from_secs((at - now) / 1000)),
            humantime::format_duration(b.config.max_delay)
        )));
    }
    Ok(Some(at))
}
